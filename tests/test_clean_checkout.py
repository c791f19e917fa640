"""The checkout is read-only at run time: rollouts, free text and studio edits write only where the user said."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from genevolve.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _state() -> tuple[str, list[str]]:
    """git's view of the checkout, and every file under assets/ (ignored ones included)."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    return status, sorted(str(p.relative_to(ROOT)) for p in (ROOT / "assets").rglob("*") if p.is_file())


@pytest.fixture
def unchanged_checkout():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    before = _state()
    yield
    after = _state()
    # Others may edit source files meanwhile; only assets/ and what git does not know of are ours to check.
    mine = lambda s: sorted(line for line in s[0].splitlines() if "assets/" in line or line.startswith("??"))  # noqa: E731
    assert mine(after) == mine(before)
    assert after[1] == before[1]


def test_rollouts_and_studio_edits_leave_the_checkout_as_it_was(tmp_path, monkeypatch, unchanged_checkout):
    monkeypatch.setenv("GENEVOLVE_DATA", str(tmp_path / "data"))
    runner = CliRunner()
    for i, text in enumerate(("Draw the flag of the 2031 Aurora Cup champion above exactly three gold stars",
                              'Draw two orange circles above a green cat, with a banner that says "CLEAN 7341"',
                              "a watercolor of a cat reading")):
        res = runner.invoke(app, ["rollout", "-r", text, "-k", "1", "--out", str(tmp_path / f"run{i}")])
        assert res.exit_code == 0, res.output

    from studio.services import Services

    s = Services.create(runs_dir=tmp_path / "runs")  # the shipped world, the data folder from $GENEVOLVE_DATA
    assert s.refs.root.is_relative_to(tmp_path / "data")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    row = s.refs.add(buf.getvalue(), "Official banner of the Zorblat Guild", filename="banner.png")
    s.references_changed()
    assert any(h.source_id == row["id"] for h in s.world.image_search.image_search("Zorblat Guild banner", 3))
    s.refs.set_caption(row["id"], "Banner of the Zorblat Guild")
    bank = s.bank("studio-bank")
    req = s.world.split("evolve")[0]
    from genevolve.agent.guides import SLOTS

    e = bank.add(req.id, req.text, {k: "Query spatial_layout first." for k in SLOTS}, reward_gap=0.3)
    bank.edit(e.id, {"prompt_construction": "Write exactly three stars."})
    s.run_rollouts(s.resolve_request("Draw three gold stars in the top of the image"), "raw", 1, 0)


def test_the_data_folder_is_chosen_by_the_user_and_defaults_outside_the_package(tmp_path, monkeypatch):
    from genevolve.records.paths import data_dir

    monkeypatch.setenv("GENEVOLVE_DATA", str(tmp_path / "mine"))
    assert data_dir() == tmp_path / "mine"
    assert data_dir(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("GENEVOLVE_DATA")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_dir() == tmp_path / "xdg" / "genevolve"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert not data_dir().is_relative_to(ROOT)
