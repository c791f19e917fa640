"""Check that a code change leaves every number the project produces unchanged.

``capture`` runs three commands into a folder of your choice and writes ``fingerprint.json`` there:

- ``genevolve evolve`` at its defaults (training, the before/after bench comparison and the teacher);
- ``genevolve bench --policy tiny --seeds 0,1,2`` (the 120-request bench, 3 seeds);
- ``genevolve ablate --quick`` (every arm, one seed).

The fingerprint holds one hash per output file: JSON and JSONL are hashed after dropping what may
differ between two identical runs (wall-clock times, throughputs, creation stamps, experience ids,
which hash the creation time, the output folder's and the checkout's paths); images and adapter weights are hashed byte for byte; Markdown reports, which
print times, and HTML reports are left out (their numbers are in the JSON beside them); a checkpoint's
``state.pt`` is hashed without its record of log-file sizes. ``compare`` prints every file
whose hash differs, with the first differing values, and exits 1 when any does; a JSON file that keeps
every earlier value and only adds fields counts as the same numbers (and says which fields it added).

    .venv/bin/python scripts/same_numbers.py capture /tmp/before      # on the old code
    .venv/bin/python scripts/same_numbers.py capture /tmp/after       # on the new code
    .venv/bin/python scripts/same_numbers.py compare /tmp/before /tmp/after
    .venv/bin/python scripts/same_numbers.py refingerprint /tmp/before   # after changing these rules
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VOLATILE = re.compile(r"^(seconds|t_.*|tokens_per_s|created|claimed|saved|step_started|updated|seconds_per_.*|wall.*|time.*|.*_seconds|elapsed.*)$")
EXPERIENCE_ID = re.compile(r"\bexp-[0-9a-f]{10}\b")  # hashed with the creation time: differs between identical runs
CHECKOUT = re.compile(r"[^\s\"']*/(?=assets/)")  # the checkout the code ran from (its shipped world and policy)
SKIP_SUFFIXES = (".md", ".html", ".lock", ".log", ".tmp")
SKIP_NAMES = {"fingerprint.json", "commands.json", ".lock"}

COMMANDS = {
    "evolve": ["evolve", "--out", "{out}/evolve"],
    "bench": ["bench", "--policy", "tiny", "--seeds", "0,1,2", "--out", "{out}/bench.json"],
    "ablate": ["ablate", "--quick", "--out", "{out}/ablate"],
}


def normalise(value: Any, root: str) -> Any:
    """The value with volatile keys dropped and the output folder's path replaced by ``<out>``."""
    if isinstance(value, dict):  # peft saves its target modules as a set, in hash order
        return {k: sorted(v) if k == "target_modules" and isinstance(v, list) else normalise(v, root)
                for k, v in value.items() if not VOLATILE.match(str(k))}
    if isinstance(value, list):
        return [normalise(v, root) for v in value]
    if isinstance(value, str):
        value = CHECKOUT.sub("<checkout>/", EXPERIENCE_ID.sub("exp-<id>", value.replace(root, "<out>")))
    return value


def load(path: Path, root: str) -> Any:
    text = path.read_text("utf-8")
    if path.suffix == ".jsonl":
        return [normalise(json.loads(line), root) for line in text.splitlines() if line.strip()]
    return normalise(json.loads(text), root)


def _state_blob(path: Path) -> bytes:
    """A training checkpoint's state without ``files`` (the byte sizes of the run's logs when it was saved, which
    change with the digits of their wall-clock times), serialised the same way whatever the run."""
    import io

    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    state.pop("files", None) if isinstance(state, dict) else None
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def fingerprint(folder: Path) -> dict[str, str]:
    root = str(folder.resolve())
    out: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if not path.is_file() or path.name in SKIP_NAMES or path.suffix in SKIP_SUFFIXES or "/.ranks/" in f"/{rel}":
            continue
        if path.suffix in (".json", ".jsonl") or path.name == ".kind":
            blob = json.dumps(load(path, root), sort_keys=True).encode()
        elif path.name == "state.pt":  # a checkpoint's optimizer and RNG states; its record of file sizes is not a number
            blob = _state_blob(path)
        else:
            blob = path.read_bytes()
        out[rel] = hashlib.sha256(blob).hexdigest()
    return out


def capture(folder: Path, only: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    times = {}
    for name in only:
        cmd = [sys.executable, "-m", "genevolve.cli", *(a.format(out=folder) for a in COMMANDS[name])]
        print("$", " ".join(cmd[1:]), flush=True)
        t = time.time()
        with open(folder / f"{name}.log", "w") as log:
            subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        times[name] = round(time.time() - t, 1)
        print(f"  {times[name]} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    (folder / "commands.json").write_text(json.dumps({"commit": commit, "seconds": times, "commands": COMMANDS}, indent=1))
    prints = fingerprint(folder)
    (folder / "fingerprint.json").write_text(json.dumps(prints, indent=1, sort_keys=True))
    print(f"{len(prints)} files fingerprinted -> {folder / 'fingerprint.json'}")


def first_difference(a: Any, b: Any, where: str = "", added: list[str] | None = None) -> str | None:
    """The first place where ``b`` does not hold ``a``'s value; keys only ``b`` has are listed in ``added``."""
    if type(a) is not type(b):
        return f"{where or '/'}: {a!r:.80} != {b!r:.80}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in b:
                return f"{where}/{k}: only in before"
            if k not in a:
                if added is not None:
                    added.append(f"{where}/{k}")
                continue
            d = first_difference(a[k], b[k], f"{where}/{k}", added)
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where or '/'}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{where}[{i}]", added)
            if d:
                return d
        return None
    return None if a == b else f"{where or '/'}: {a!r:.80} != {b!r:.80}"


def compare(before: Path, after: Path) -> int:
    fa = json.loads((before / "fingerprint.json").read_text())
    fb = json.loads((after / "fingerprint.json").read_text())
    bad = widened = 0
    for rel in sorted(set(fa) | set(fb)):
        if fa.get(rel) == fb.get(rel):
            continue
        if rel not in fa or rel not in fb:
            bad += rel in fa  # a new file is an addition; a file gone is a difference
            print(f"{'DIFF' if rel in fa else 'NEW '} {rel}: only in {'after' if rel in fb else 'before'}")
            continue
        why, added = None, []
        if rel.endswith((".json", ".jsonl")):
            why = first_difference(load(before / rel, str(before.resolve())), load(after / rel, str(after.resolve())),
                                   added=added)
        if rel.endswith((".json", ".jsonl")) and why is None:
            widened += 1
            print(f"SAME {rel}: every value kept; {len(added)} field(s) added, e.g. {', '.join(sorted(set(added))[:3])}")
            continue
        bad += 1
        print(f"DIFF {rel} {why or '(bytes differ)'}")
    print(f"{len(set(fa) | set(fb)) - bad - widened} files identical, {widened} with added fields only, {bad} differ")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("refingerprint", help="recompute a capture's fingerprint.json with this script's rules")
    r.add_argument("folder", type=Path)
    c = sub.add_parser("capture")
    c.add_argument("folder", type=Path)
    c.add_argument("--only", default=",".join(COMMANDS), help="comma-separated: evolve, bench, ablate")
    p = sub.add_parser("compare")
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "capture":
        capture(args.folder, [x for x in args.only.split(",") if x])
        return 0
    if args.cmd == "refingerprint":
        prints = fingerprint(args.folder)
        (args.folder / "fingerprint.json").write_text(json.dumps(prints, indent=1, sort_keys=True))
        print(f"{len(prints)} files fingerprinted -> {args.folder / 'fingerprint.json'}")
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
