"""``genevolve index``: turn any folder of documents and pictures into a searchable store.

The store has the layout of the sandbox's stores (see :mod:`genevolve.tools.local`), so the
offline search tools and the search gateway serve it unchanged:

- every ``.txt`` / ``.md`` file becomes corpus rows: the title is the first line of a file (its
  name when that line is long), the text is cut into passages of about ``chunk_chars`` characters
  at paragraph breaks;
- every picture (``.png .jpg .jpeg .webp .gif .bmp``) is copied into ``refs/`` with a title: the
  text of a caption file beside it with the same stem (``tower.png`` + ``tower.txt``), else its
  file name in words. Caption files are not indexed as documents.

Unreadable pictures are skipped and reported, never indexed; an empty folder is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from ..records.schema import atomic_write_text

TEXT_EXTS = {".txt", ".md"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}


def _passages(text: str, chunk_chars: int) -> list[str]:
    paras = [" ".join(p.split()) for p in text.replace("\r\n", "\n").split("\n\n")]
    out, cur = [], ""
    for p in (p for p in paras if p):
        if cur and len(cur) + 1 + len(p) > chunk_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur} {p}".strip()
        while len(cur) > chunk_chars * 2:  # one huge paragraph: cut at a space
            cut = cur.rfind(" ", 0, chunk_chars) if " " in cur[:chunk_chars] else chunk_chars
            out.append(cur[:cut].strip())
            cur = cur[cut:].strip()
    if cur:
        out.append(cur)
    return out


def _title_from_name(path: Path) -> str:
    return " ".join(path.stem.replace("_", " ").replace("-", " ").split()) or path.name


def index_folder(src: str | os.PathLike, out: str | os.PathLike, embedder=None, chunk_chars: int = 800,
                 log: Callable[[str], None] = print) -> dict:
    """Build the store in ``out`` from ``src`` and its FAISS indexes; return counts and skipped files."""
    from PIL import Image

    from .local import build_indexes

    src, out = Path(src).resolve(), Path(out).resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"no folder to index at {src}")
    files = sorted(p for p in src.rglob("*") if p.is_file() and out not in p.parents and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
    captions = {p.with_suffix("") for p in images}
    texts = [p for p in files if p.suffix.lower() in TEXT_EXTS and p.with_suffix("") not in captions]
    if not images and not texts:
        raise ValueError(f"{src} has no .txt/.md documents and no pictures ({', '.join(sorted(IMAGE_EXTS))}) to index")
    (out / "refs").mkdir(parents=True, exist_ok=True)
    corpus, refs, skipped = [], [], []
    for p in texts:
        raw = p.read_text("utf-8", errors="replace")
        first = raw.strip().splitlines()[0].strip("# ").strip() if raw.strip() else ""
        title = first if 0 < len(first) <= 120 else _title_from_name(p)
        rel = p.relative_to(src).as_posix()
        for i, passage in enumerate(_passages(raw, chunk_chars)):
            corpus.append({"id": f"doc-{len(corpus):06d}", "title": title, "url": f"file://{rel}#{i}", "text": passage})
    for p in images:
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as exc:  # PIL raises many types for corrupt files
            skipped.append(f"{p.relative_to(src)}: not a readable image ({type(exc).__name__})")
            continue
        cap = next((c for c in (p.with_suffix(".txt"), p.with_suffix(".md")) if c.exists()), None)
        title = " ".join(cap.read_text("utf-8", errors="replace").split())[:200] if cap else _title_from_name(p)
        rid = "ref-" + hashlib.sha1(p.relative_to(src).as_posix().encode()).hexdigest()[:12]
        dest = out / "refs" / f"{rid}{p.suffix.lower()}"
        shutil.copyfile(p, dest)
        refs.append({"id": rid, "title": title or _title_from_name(p), "file": f"refs/{dest.name}",
                     "source": p.relative_to(src).as_posix()})
    atomic_write_text(out / "corpus.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in corpus))
    atomic_write_text(out / "refs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in refs))
    if embedder is None:
        from .embed import default_embedder

        embedder = default_embedder()
    build_indexes(out, embedder)
    counts = {"documents": len(texts), "passages": len(corpus), "images": len(refs), "skipped": skipped, "store": str(out)}
    for s in skipped:
        log(f"skipped {s}")
    log(f"indexed {len(texts)} documents ({len(corpus)} passages) and {len(refs)} images into {out}")
    return counts
