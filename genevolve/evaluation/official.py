"""The public GenEvolve-Data-Bench layout, loaded from a local folder with ``datasets``.

Expected layout (JSON Lines, JSON arrays or Parquet; the folder names tell the kinds apart)::

    <root>/bench/*.jsonl   {"id", "question", "gt_image", "eval_type", "category", "difficulty"}
    <root>/rl/*.jsonl      {"id"?, "prompt" | "question", "gt_image", ...}
    <root>/sft/*.jsonl     {"messages": [{"role", "content"}, ...], "images": [path, ...]}
    <root>/images/...      pictures the rows name by relative path

A file may also sit directly in ``<root>`` with ``bench``, ``rl`` or ``sft`` in its name. Image
fields are paths (relative to the row's file, to ``<root>`` or to ``<root>/images``), ``datasets``
Image values, or ``{"bytes"|"path"}`` objects.

What it becomes:

- bench and RL rows -> :class:`~genevolve.records.schema.Request` (split ``bench`` / ``rl``), ground
  truths stored by hash in an :class:`~genevolve.records.schema.ImageStore`; ``eval_type`` picks the track
  (anything naming knowledge -> ``knowledge``, else ``quality``), ``difficulty`` may be a number or
  easy / medium / hard;
- SFT rows -> :class:`~genevolve.records.schema.Trajectory` (via the protocol's ``messages`` import, turns
  read as the official runtime reads them), the ``images`` list giving the IMG ids their files: by
  the id in each file name when the names carry one (``images/traj_00213/IMG_001.jpg``), else by
  position (``IMG_001``, ``IMG_002``, ...); and back: our trajectories are exported as
  ``{"id", "request_id", "messages", "images"}`` rows in the same format, pictures named by id, the
  messages exactly as they were imported.

A row whose picture is missing raises :class:`DataError` naming the files (the first ten and the
count), unless ``allow_missing=True``: then the case is kept without it and the scorer records it
as a missing case (``no ground truth``), never a silent zero.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..records.schema import ImageStore, Request, Trajectory

DATA_EXTS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
KINDS = ("bench", "rl", "sft")
_DIFFICULTY = {"easy": 1, "medium": 2, "mid": 2, "hard": 3}


class DataError(ValueError):
    """A dataset folder that cannot be read as the official layout (missing files, pictures or fields)."""


@dataclass
class Loaded:
    requests: list[Request] = field(default_factory=list)
    trajectories: list[Trajectory] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # pictures that could not be found or read
    files: list[str] = field(default_factory=list)


def data_files(root: str | os.PathLike, kind: str) -> list[Path]:
    """The files of one kind (bench, rl or sft) under ``root`` (or ``root`` itself when it is a file)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"no dataset at {root}")
    if root.is_file():
        return [root]
    sub = root / kind
    found = sorted(p for p in sub.rglob("*") if p.suffix in DATA_EXTS) if sub.is_dir() else []
    if not found:
        pat = re.compile(rf"(^|[^a-z]){kind}([^a-z]|$)", re.I)
        found = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in DATA_EXTS and pat.search(p.stem))
    return found


def _rows(files: Sequence[Path]) -> Iterable[tuple[Path, dict[str, Any]]]:
    import datasets
    from datasets import load_dataset

    datasets.disable_progress_bars()  # the CLI prints its own results; keep stdout clean
    datasets.logging.set_verbosity_error()
    for f in files:
        try:
            ds = load_dataset(DATA_EXTS[f.suffix], data_files=str(f), split="train")
        except Exception as exc:  # datasets raises many types for a malformed file
            raise DataError(f"{f}: not readable as {DATA_EXTS[f.suffix]} ({type(exc).__name__}: {str(exc)[:200]})") from exc
        for row in ds:
            yield f, row


def _open_image(value: Any, roots: Sequence[Path]):
    """(PIL image, "") or (None, what is missing)."""
    from PIL import Image

    if value is None or value == "":
        return None, "no image given"
    if hasattr(value, "convert"):
        return value.convert("RGB"), ""
    if isinstance(value, dict):
        if value.get("bytes"):
            try:
                with Image.open(io.BytesIO(value["bytes"])) as im:
                    return im.convert("RGB"), ""
            except Exception as exc:
                return None, f"embedded image unreadable ({type(exc).__name__})"
        value = value.get("path")
        if not value:
            return None, "image object with neither bytes nor path"
    p = Path(str(value)).expanduser()
    candidates = [p] if p.is_absolute() else [r / p for r in roots]
    for c in candidates:
        if c.is_file():
            try:
                with Image.open(c) as im:
                    return im.convert("RGB"), ""
            except Exception as exc:  # PIL raises many types for corrupt files
                return None, f"{c}: not a readable image ({type(exc).__name__})"
    return None, f"{value} (looked in {', '.join(str(r) for r in roots)})"


def _roots(root: Path, f: Path) -> list[Path]:
    base = root if root.is_dir() else f.parent
    return list(dict.fromkeys([f.parent, base, base / "images"]))


def _difficulty(v: Any) -> int:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return int(v)
    s = str(v or "").strip().lower()
    return int(s) if s.isdigit() else _DIFFICULTY.get(s, 1)


def _check(missing: list[str], allow_missing: bool, what: str) -> None:
    if missing and not allow_missing:
        head = "; ".join(missing[:10])
        raise DataError(f"{len(missing)} {what} picture(s) missing or unreadable: {head}"
                        + (" ..." if len(missing) > 10 else "") + " (pass allow_missing / --allow-missing to record them as missing cases)")


def load_requests(root: str | os.PathLike, store: ImageStore, kind: str = "bench", allow_missing: bool = False,
                  limit: int | None = None) -> Loaded:
    """Bench or RL rows as requests, ground truths put in ``store``."""
    if kind not in ("bench", "rl"):
        raise ValueError("kind is 'bench' or 'rl'")
    root = Path(root)
    files = data_files(root, kind)
    if not files:
        raise DataError(f"no {kind} files under {root} (expected {root / kind}/*.jsonl|json|parquet)")
    out = Loaded(files=[str(f) for f in files])
    for n, (f, row) in enumerate(_rows(files)):
        if limit is not None and len(out.requests) >= limit:
            break
        text = row.get("question") or row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{f}: row {n} has no 'question' (or 'prompt') text")
        rid = str(row.get("id") if row.get("id") is not None else f"{kind}-{n:05d}")
        image, why = _open_image(row.get("gt_image"), _roots(root, f))
        gt = store.put(image) if image is not None else None
        if image is None:
            out.missing.append(f"{rid}: {why}")
        eval_type = str(row.get("eval_type") or "")
        track = "knowledge" if re.search(r"know|ka\b", eval_type, re.I) else "quality"
        out.requests.append(Request(id=rid, text=text.strip(), track=track, category=str(row.get("category") or eval_type or "free"),
                                    difficulty=_difficulty(row.get("difficulty")), split=kind, gt_image=gt))
    _check(out.missing, allow_missing, f"{kind} ground-truth")
    return out


def _flatten(content: Any) -> str:
    """Multimodal message content (parts) as text: text parts joined, each picture as ``<image>``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text":
                parts.append(str(p.get("text", "")))
            elif isinstance(p, dict):
                parts.append("<image>")
        return "".join(parts)
    return "" if content is None else str(content)


def load_sft(root: str | os.PathLike, allow_missing: bool = False, image_dir: str | os.PathLike | None = None,
             limit: int | None = None, mode: str = "official") -> Loaded:
    """SFT rows as trajectories, turns parsed in ``mode``; each ``images`` entry becomes the local file of its IMG id.

    With ``image_dir`` every picture is copied into that content-addressed store and the trajectory
    names the copy; without it, the dataset's files are named in place (pictures given as bytes
    then need ``image_dir``).
    """
    from ..agent.protocol import trajectory_from_messages

    root = Path(root)
    files = data_files(root, "sft")
    if not files:
        raise DataError(f"no sft files under {root} (expected {root / 'sft'}/*.jsonl|json|parquet)")
    out = Loaded(files=[str(f) for f in files])
    for n, (f, row) in enumerate(_rows(files)):
        if limit is not None and len(out.trajectories) >= limit:
            break
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{f}: row {n} has no 'messages' list")
        messages = [{"role": m.get("role"), "content": _flatten(m.get("content"))} for m in msgs]
        tid = f"sft-{n:05d}"
        try:
            traj = trajectory_from_messages(messages, traj_id=tid, request_id=str(row.get("request_id") or row.get("id") or tid),
                                            mode=mode)
            pictures = _bind_pictures(traj, row.get("images") or [])
        except ValueError as exc:
            raise DataError(f"{f}: row {n}: {exc}") from exc
        for img_id, value in pictures.items():
            ref = traj.image(img_id)
            path = _image_path(value, _roots(root, f), image_dir)
            if isinstance(path, str) and path.startswith("missing:"):
                out.missing.append(f"{traj.id} {img_id}: {path[8:]}")
                traj.errors.append(f"{img_id}: picture missing from the dataset")
                continue
            if ref is None:
                from ..records.schema import ImageRef

                ref = ImageRef(img_id=img_id, title="image")
                traj.images.append(ref)
            ref.local_path = path
        out.trajectories.append(traj)
    _check(out.missing, allow_missing, "SFT")
    return out


_NAME_ID_RE = re.compile(r"IMG_\d{3,}(?!\d)")


def _bind_pictures(traj: Trajectory, values: Sequence[Any]) -> dict[str, Any]:
    """IMG id -> picture: by the id in each file name when the names carry one, else by list position.

    By position alone a list that skips or repeats a picture shifts every id after it, so names win;
    anything that makes the binding ambiguous raises instead of guessing.
    """
    names = [v if isinstance(v, str) else str((v.get("path") if isinstance(v, dict) else getattr(v, "filename", "")) or "")
             for v in values]
    found = [_NAME_ID_RE.search(Path(n).stem) for n in names]
    by_name = any(found)
    if by_name and not all(found):
        raise DataError("some picture names carry an IMG id and some do not: cannot tell which picture is which")
    ids = [m.group(0) for m in found] if by_name else [f"IMG_{i + 1:03d}" for i in range(len(values))]
    out: dict[str, Any] = {}
    named: dict[str, str] = {}
    for i, (img_id, name, value) in enumerate(zip(ids, names, values)):
        if by_name and traj.image(img_id) is None:
            raise DataError(f"{name}: no image_search result in this record hands out {img_id}")
        if named.setdefault(img_id, name) != name:
            raise DataError(f"{img_id} is claimed by two files: {named[img_id]} and {name}")
        base = Path(name).name
        other = next((im.img_id for im in traj.images if base and Path(im.local_path).name == base and im.img_id != img_id), None)
        if other:  # a tool response showed this very file under another id
            how = f"is named {img_id}" if by_name else f"is picture {i + 1} of the list ({img_id})"
            raise DataError(f"{name} {how} but the record gives it to {other}")
        out[img_id] = value
    return out


def _image_path(value: Any, roots: Sequence[Path], image_dir) -> str:
    if isinstance(value, str) and image_dir is None:
        p = Path(value).expanduser()
        for c in ([p] if p.is_absolute() else [r / p for r in roots]):
            if c.is_file():
                return str(c.resolve())
        return f"missing:{value}"
    image, why = _open_image(value, roots)
    if image is None:
        return f"missing:{why}"
    if image_dir is None:
        raise DataError("SFT rows carry pictures as bytes: give image_dir to write them to")
    store = ImageStore(image_dir)
    return str(store.path(store.put(image)).resolve())


def sft_messages(trajs: Iterable[Trajectory]) -> list[dict[str, Any]]:
    """Trajectories as ``{"messages"}`` rows (what ``genevolve sft --data`` trains on)."""
    from ..agent.protocol import trajectory_to_messages

    return [{"messages": trajectory_to_messages(t)} for t in trajs]


def export_sft(trajs: Iterable[Trajectory], out: str | os.PathLike, verdicts: dict[str, Any] | None = None,
               min_reward: float | None = None, allow_missing: bool = False) -> dict[str, int]:
    """Write ``{"id", "request_id", "messages", "images"}`` rows to ``out`` (JSONL).

    Only answered trajectories are exported; with ``min_reward``, only those whose verdict reaches it.
    Pictures are copied to ``<out dir>/images/<trajectory id>/<IMG id>.<ext>``: the names carry the
    ids, so a re-import binds each to its id whatever the list holds. A picture with no local file
    raises :class:`DataError` naming it, before anything is written; with ``allow_missing`` it is left
    out (its id then has no file) and counted.
    """
    from ..agent.protocol import trajectory_to_messages
    from ..records.schema import atomic_write_text

    out = Path(out)
    rows, copies, missing, skipped = [], [], [], 0
    for t in trajs:
        v = (verdicts or {}).get(t.id)
        if t.termination != "answer" or (min_reward is not None and (v is None or v.failed or v.reward < min_reward)):
            skipped += 1
            continue
        images = []
        for ref in t.images:
            src = Path(ref.local_path) if ref.local_path else None
            if src is None or not src.is_file():
                missing.append(f"{t.id} {ref.img_id}: " + (f"{src} is not a file" if src else "no local file"))
                continue
            rel = f"images/{re.sub(r'[^A-Za-z0-9._-]', '_', t.id)}/{ref.img_id}{src.suffix.lower()}"
            copies.append((src, out.parent / rel))
            images.append(rel)
        rows.append({"id": t.id, "request_id": t.request_id, "messages": trajectory_to_messages(t), "images": images})
    if missing and not allow_missing:
        raise DataError(f"{len(missing)} picture(s) have no local file to export: {'; '.join(missing[:10])}"
                        + (" ..." if len(missing) > 10 else "") + " (pass allow_missing / --allow-missing to leave them out)")
    for src, dest in copies:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"exported": len(rows), "skipped": skipped, "missing_pictures": len(missing)}


def run_bench(requests: Sequence[Request], policy, tools, scorer, store: ImageStore, seeds: Sequence[int], params,
              missing: str = "exclude", guides=None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """:func:`genevolve.evaluation.bench.evaluate` under the missing-case policy: the summary and every case.

    ``policy`` None is the raw baseline (request text straight to the generator).
    """
    from .bench import evaluate

    ev = evaluate(requests, policy, tools, scorer, store, list(seeds), params=params, guides=guides, missing=missing,
                  progress=progress)
    summary: dict[str, Any] = {"seeds": list(seeds), "n_requests": len(requests), "missing_policy": missing,
                               "missing": {s: ev.per_seed[s]["missing"] for s in seeds}, "by": ev.by}
    cases = [{"seed": c.seed, "trajectory": c.trajectory, "rendered": c.rendered, "verdict": c.verdict} for c in ev.cases]
    return {"summary": summary, "cases": cases}
