"""The guard that fails a test session which wrote into the checkout (tests/_checkout_guard.py, run by conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from _checkout_guard import changes, snapshot

TESTS = Path(__file__).resolve().parent


def _fake_checkout(root: Path) -> None:
    """A few files of each kind, all dated a minute back (so that a write now always moves an mtime)."""
    for rel, data in {"assets/world/world.json": "{}", "assets/world/images/ab/ab1.png": "png", "assets/world/refs/r1.png": "ref",
                      "genevolve/judge.py": "x = 1\n", "runs/big/model.safetensors": "w" * 100, "runs/big/deep/state.pt": "s",
                      ".venv/lib/site.py": "", "genevolve/__pycache__/judge.pyc": "", "README.md": "# r\n",
                      "pkg.egg-info/PKG-INFO": ""}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(data)
    for p in [root, *root.rglob("*")]:
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - 60 * 10**9))


def test_created_changed_and_deleted_files_are_named(tmp_path):
    _fake_checkout(tmp_path)
    before = snapshot(tmp_path)
    (tmp_path / "assets/world/images/cd").mkdir()
    (tmp_path / "assets/world/images/cd/cd1.png").write_text("new ground truth")  # created
    (tmp_path / "assets/world/world.json").write_text("{} ")  # changed size
    (tmp_path / "assets/world/images/ab/ab1.png").touch()  # changed mtime only
    (tmp_path / "assets/world/refs/r1.png").unlink()  # deleted
    (tmp_path / "out.json").write_text("{}")  # a stray output in the working directory
    (tmp_path / "runs/new-run").mkdir()  # a new run folder
    (tmp_path / "runs/big/extra.bin").write_text("x")  # a new file in a run folder: that folder's mtime moves
    assert changes(before, snapshot(tmp_path)) == [  # in path order
        "changed: assets/world/images/ab/ab1.png", "created: assets/world/images/cd/", "created: assets/world/images/cd/cd1.png",
        "deleted: assets/world/refs/r1.png", "changed: assets/world/world.json", "created: out.json", "changed: runs/big/",
        "created: runs/new-run/"]


def test_caches_hand_edits_deep_run_files_and_ignored_folders_are_not_reported(tmp_path):
    _fake_checkout(tmp_path)
    (tmp_path / "tmp").mkdir()
    before = snapshot(tmp_path, ignore=[tmp_path / "tmp"])
    (tmp_path / ".venv/lib/site.py").write_text("changed")
    (tmp_path / "genevolve/__pycache__/judge.pyc").write_text("recompiled")
    (tmp_path / "pkg.egg-info/PKG-INFO").write_text("reinstalled")
    (tmp_path / "genevolve/judge.py").write_text("x = 2  # someone edits the code meanwhile\n")
    (tmp_path / "genevolve/new_module.py").write_text("")
    (tmp_path / "runs/big/deep/state.pt").write_text("a checkpoint two levels down: not looked at")
    (tmp_path / "tmp/scratch.png").write_text("the session's own temporary folder")
    assert changes(before, snapshot(tmp_path, ignore=[tmp_path / "tmp"])) == []
    (tmp_path / "genevolve/judge.png").write_text("not a kind of file people edit by hand")
    assert changes(before, snapshot(tmp_path, ignore=[tmp_path / "tmp"])) == ["created: genevolve/judge.png"]


def test_the_real_checkout_is_walked_cheaply():
    """No virtual environment, git objects or caches, and runs/ (model checkpoints) only one level deep."""
    snap = snapshot(TESTS.parent)
    assert "tests/_checkout_guard.py" in snap and any(p.startswith("assets/world/") for p in snap)
    assert not [p for p in snap if p.split("/")[0] in (".venv", ".git") or "__pycache__" in p or ".egg-info" in p]
    assert all(p.count("/") <= 1 or (p.count("/") == 2 and p.endswith("/")) for p in snap if p.startswith("runs/"))


def _session(project: Path, body: str) -> subprocess.CompletedProcess:
    """pytest in a fresh process on a project whose conftest runs the guard around the session, as ours does."""
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path

        import pytest

        sys.path.insert(0, {str(TESTS)!r})
        from _checkout_guard import guard


        @pytest.fixture(scope="session", autouse=True)
        def checkout_unchanged(tmp_path_factory):
            yield from guard(Path(__file__).parent, ignore=[tmp_path_factory.getbasetemp()])
    """))
    (project / "test_it.py").write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(project / "tmp")],
                          cwd=project, capture_output=True, text=True, timeout=120)


def test_a_session_that_writes_into_the_checkout_fails_naming_the_files(tmp_path):
    (tmp_path / "assets").mkdir()
    res = _session(tmp_path, """
        from pathlib import Path

        def test_writes_into_tmp_path(tmp_path):
            (tmp_path / "fine.png").write_bytes(b"x")

        def test_leaks():
            (Path(__file__).parent / "assets" / "gt.png").write_bytes(b"ground truth")
    """)
    assert res.returncode == 1, res.stdout
    assert "2 passed, 1 error" in res.stdout and "the tests wrote into the checkout" in res.stdout
    assert "created: assets/gt.png" in res.stdout and "fine.png" not in res.stdout


def test_a_session_that_writes_only_into_tmp_path_passes(tmp_path):
    res = _session(tmp_path, """
        def test_writes_into_tmp_path(tmp_path):
            (tmp_path / "fine.png").write_bytes(b"x")
    """)
    assert res.returncode == 0 and "1 passed" in res.stdout and "error" not in res.stdout, res.stdout
