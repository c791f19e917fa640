"""Where user data lives. The checkout (and an installed package) is read-only at run time: what a user
uploads or edits goes into a data folder they choose, never into the shipped ``assets/``."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def data_dir(given: str | os.PathLike | None = None) -> Path:
    """``given``, else ``$GENEVOLVE_DATA``, else ``$XDG_DATA_HOME/genevolve`` (``~/.local/share/genevolve``)."""
    if given:
        return Path(given).expanduser()
    if os.environ.get("GENEVOLVE_DATA"):
        return Path(os.environ["GENEVOLVE_DATA"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "genevolve"


def runs_dir(given: str | os.PathLike | None = None) -> Path:
    """Where run folders go when no ``--out`` is given, and what the studio opens: ``given``, else ``$GENEVOLVE_RUNS``,
    else ``runs/`` in the data folder (never the checkout, wherever a command is started from)."""
    if given:
        return Path(given).expanduser()
    if os.environ.get("GENEVOLVE_RUNS"):
        return Path(os.environ["GENEVOLVE_RUNS"]).expanduser()
    return data_dir() / "runs"


SHIPPED = Path(__file__).resolve().parents[2] / "assets"  # the shipped sandbox data and policy: read-only at run time


def is_shipped(path: str | os.PathLike) -> bool:
    return Path(path).resolve().is_relative_to(SHIPPED)


def index_cache(index_path: str | os.PathLike) -> Path:
    """Where an index rebuilt for a shipped store is kept (the data folder, one file per store and index name)."""
    p = Path(index_path).resolve()
    return data_dir() / "index-cache" / f"{hashlib.sha256(str(p).encode()).hexdigest()[:16]}-{p.name}"


def user_references(world_root: str | os.PathLike, data: str | os.PathLike) -> Path:
    """An editable copy of a world's reference store in the data folder, made on first use.

    One copy per world build (named by the hash of its ``world.json``), so a rebuilt world starts from
    its own references; the copy is swapped in whole, so an interrupted copy is never mistaken for one.
    """
    world_root = Path(world_root)
    digest = hashlib.sha256((world_root / "world.json").read_bytes()).hexdigest()[:12]
    dest = Path(data) / "references" / f"world-{digest}"
    if (dest / "refs.jsonl").exists():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(world_root / "refs", tmp / "refs")
    shutil.copy2(world_root / "refs.jsonl", tmp / "refs.jsonl")
    (tmp / "index").mkdir()
    for p in (world_root / "index").glob("refs.faiss*"):  # the index and its sidecar: no re-embedding needed
        shutil.copy2(p, tmp / "index" / p.name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
