"""Resume is exact: a run killed at any moment and started again writes what an uninterrupted run writes;
a checkpoint is whole or refused; a resume with other settings is refused; the run folder is held from
training through evaluation."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from genevolve.cli import app
from genevolve.training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _killed_and_resumed(tmp_path, n: int, seed: int) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import faults
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result = faults.trials("evolve", n, random.Random(seed), tmp_path)
    assert result["kills"] == n and result["survived"] == n
    assert result["rows_lost"] == 0 and result["rows_duplicated"] == 0
    assert result["equal"] == n, [t["files_differing"] for t in result["trials"]]


def test_evolve_killed_at_a_random_moment_resumes_to_the_same_numbers(tmp_path):
    """One kill -9 at a random moment (the default suite's short twin of the campaign below)."""
    _killed_and_resumed(tmp_path, 1, 7)


@pytest.mark.slow
def test_evolve_killed_at_random_moments_resumes_to_the_same_numbers(tmp_path):
    _killed_and_resumed(tmp_path, 3, 11)


def _args(out: Path, *extra: str) -> list[str]:
    return ["evolve", "--train-only", "--out", str(out), "--steps", "1", "-B", "1", "-K", "2", "--max-new-tokens", "16",
            "--no-probe", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    res = runner.invoke(app, _args(out))
    assert res.exit_code == 0, res.output
    return out


def test_a_checkpoint_without_its_adapter_is_refused_not_restarted(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    shutil.rmtree(out / "checkpoint" / "adapter")
    res = runner.invoke(app, _args(out, "--steps", "2"))
    assert res.exit_code == 2 and "is not a whole checkpoint" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 3  # one line, no traceback


def test_a_whole_checkpoint_left_as_tmp_by_a_kill_during_the_swap_is_recovered(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "checkpoint").rename(out / "checkpoint.tmp")  # killed between the renames
    logs = []
    checkpoint.recover(out, logs.append)
    assert (out / "checkpoint" / "state.pt").exists() and not (out / "checkpoint.tmp").exists()
    assert "recovered" in logs[0]
    res = runner.invoke(app, _args(out, "--steps", "2"))
    assert res.exit_code == 0 and "resumed from step 1" in res.output, res.output


def test_a_resume_with_other_settings_is_refused_naming_them_unless_forced_new(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    res = runner.invoke(app, _args(out, "--steps", "2", "--lr", "0.5"))
    assert res.exit_code == 2 and "lr: 0.001 in the run, 0.5 now" in res.output, res.output
    res = runner.invoke(app, _args(out, "--steps", "1", "--lr", "0.5", "--force-new"))
    assert res.exit_code == 0, res.output
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoint" / "state.pt").exists()  # the earlier run is kept, not deleted
    assert json.loads((out / "config.json").read_text())["lr"] == 0.5


def test_the_run_folder_is_held_through_the_evaluation(tmp_path, monkeypatch):
    import genevolve.evaluation.experiments as experiments
    from genevolve.records.live import is_running

    seen = {}

    def fake_compare(cfg, *args, **kwargs):
        seen["held"] = is_running(cfg.out)  # a second evolve into this folder now would be refused
        report = Path(cfg.out) / "report" / "report.md"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("# r\n")
        return report

    monkeypatch.setattr(experiments, "compare_after_training", fake_compare)
    out = tmp_path / "run"
    res = runner.invoke(app, [a for a in _args(out) if a != "--train-only"])
    assert res.exit_code == 0, res.output
    assert seen == {"held": True} and not is_running(out)


def test_a_cut_short_step_is_rolled_back_its_rows_and_only_its_own_bank_writes(trained, tmp_path):
    """Rows after the checkpoint go; in the bank, what the cut-short step wrote goes (it is in the trainer's journal)
    and what anyone else wrote meanwhile stays: a studio edit is never rolled back by a resume."""
    from genevolve.agent.guides import SLOTS
    from genevolve.experience import journal
    from genevolve.experience.bank import ExperienceBank

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    sizes = {n: (out / n).stat().st_size for n in ("trajectories.jsonl", "verdicts.jsonl", "metrics.jsonl")}
    with open(out / "trajectories.jsonl", "a") as fh:
        fh.write('{"id": "half-written')  # a kill in the middle of a row
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 2}) + "\n")  # a row of a step that never reached its checkpoint
    slots = {s: "Query spatial_layout and place each object." for s in SLOTS}
    other = ExperienceBank(out / "bank").add("evolve-0002", "written by hand", slots)  # no journal: not the trainer's
    before = (out / "bank" / "experiences.jsonl").read_bytes()
    trainer = ExperienceBank(out / "bank")
    trainer.journal = journal.Journal(out / journal.NAME, step=2)  # the cut-short step 2
    mine = trainer.add("evolve-0001", "a request", slots, reward_gap=0.5, step=2)
    trainer.edit(other.id, {"failure_avoidance": "Check the count twice."})  # the trainer changed theirs too
    logs = []
    checkpoint.roll_back(out, out / "bank" / "experiences.jsonl", logs.append)
    assert {n: (out / n).stat().st_size for n in sizes} == sizes
    now = ExperienceBank(out / "bank")
    assert mine.id not in now.items and now.items[other.id].version == 1  # the trainer's writes undone, exactly
    assert (out / "bank" / "experiences.jsonl").read_bytes() == before
    assert any("undid" in x and mine.id in x for x in logs) and any("trajectories.jsonl" in x for x in logs)
    assert journal.entries(out / journal.NAME, 0) == []  # undone once, not again on the next resume
