"""What a test session wrote into the checkout: a snapshot of its files (path, size, mtime) before and after.

Tests write into ``tmp_path``; a file they create, change or delete in the checkout (a ground-truth image in
the shipped ``assets/world``, a run folder in ``runs/``, an ``out.json`` in the working directory) is reported
by ``guard``, which ``conftest.py`` runs around the whole session. Cheap by design: no contents are read, caches
and virtual environments are skipped, and ``runs/`` (model checkpoints of hundreds of MB) is looked at one
level deep only: a new entry there, or one whose size or mtime changed (a folder's mtime changes when an entry
is added to it or removed from it).

People edit the code while tests run (several share one checkout), so hand-edited kinds of files in the source
folders are not reported; everything else is, whatever git thinks of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis",
             ".ipynb_checkpoints", "node_modules", ".tox", ".nox", "mutants"}  # mutants/: mutmut's copy of the checkout
SHALLOW_DIRS = {"runs"}  # top-level folders looked at one level deep
SOURCE_DIRS = {"genevolve", "studio", "tests", "benchmarks", "scripts", "docs", "notebooks", ".ci"}
SOURCE_SUFFIXES = {".py", ".ipynb", ".md", ".toml", ".json", ".txt"}  # edited by hand in SOURCE_DIRS
ROOT_SOURCES = {"README.md", "pyproject.toml", "Makefile", ".gitignore"}

Snapshot = dict[str, tuple[int, int]]  # relative path -> (size, mtime in ns); folders end in "/"


def _skipped(name: str) -> bool:
    return name in SKIP_DIRS or name.endswith(".egg-info")


def _hand_edited(rel: str) -> bool:
    top, _, rest = rel.partition("/")
    if not rest:
        return rel in ROOT_SOURCES or (rel.endswith("/") and rel[:-1] in SOURCE_DIRS)
    return top in SOURCE_DIRS and (rel.endswith("/") or Path(rel).suffix in SOURCE_SUFFIXES)


def snapshot(root: str | os.PathLike, ignore: Iterable[str | os.PathLike] = ()) -> Snapshot:
    """Every file under ``root`` as (size, mtime), but in skipped folders and ``ignore`` (absolute paths)."""
    root = Path(root).resolve()
    ignored = {str(Path(p).resolve()) for p in ignore}
    out: Snapshot = {}
    stack = [(str(root), "", False)]  # (folder, its path relative to root + "/", only its entries)
    while stack:
        folder, rel, shallow = stack.pop()
        with os.scandir(folder) as entries:
            for e in entries:
                path = rel + e.name
                if e.is_dir(follow_symlinks=False):
                    if _skipped(e.name) or e.path in ignored:
                        continue
                    if shallow:
                        out[path + "/"] = (0, e.stat(follow_symlinks=False).st_mtime_ns)
                    else:  # a folder's existence (an empty one made by a test counts too), then its entries
                        out[path + "/"] = (0, 0)
                        stack.append((e.path, path + "/", not rel and e.name in SHALLOW_DIRS))
                else:
                    st = e.stat(follow_symlinks=False)
                    out[path] = (st.st_size, st.st_mtime_ns)
    return out


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """One line per path created, changed or deleted between two snapshots (hand-edited sources left out)."""
    lines = []
    for path in sorted(set(before) | set(after)):
        if _hand_edited(path) or before.get(path) == after.get(path):
            continue
        what = "created" if path not in before else "deleted" if path not in after else "changed"
        lines.append(f"{what}: {path}")
    return lines


def guard(root: str | os.PathLike, ignore: Iterable[str | os.PathLike] = ()) -> Iterator[None]:
    """A session fixture's body: fail at teardown, naming every file the session wrote into ``root``."""
    import pytest

    ignore = list(ignore)
    before = snapshot(root, ignore)
    yield
    found = changes(before, snapshot(root, ignore))
    if found:
        pytest.fail(f"the tests wrote into the checkout {root} (write into tmp_path instead):\n  " + "\n  ".join(found),
                    pytrace=False)
