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


def test_evolve_killed_at_random_moments_resumes_to_the_same_numbers(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import faults
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result = faults.trials("evolve", 2, random.Random(7), tmp_path)
    assert result["kills"] == 2 and result["survived"] == 2
    assert result["rows_lost"] == 0 and result["rows_duplicated"] == 0
    assert result["equal"] == 2, [t["files_differing"] for t in result["trials"]]


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


def test_a_cut_short_step_is_rolled_back_rows_and_bank(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    sizes = {n: (out / n).stat().st_size for n in ("trajectories.jsonl", "verdicts.jsonl", "metrics.jsonl")}
    bank = out / "bank" / "experiences.jsonl"
    bank_before = bank.read_bytes() if bank.exists() else None
    with open(out / "trajectories.jsonl", "a") as fh:
        fh.write('{"id": "half-written')  # a kill in the middle of a row
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 2}) + "\n")  # a row of a step that never reached its checkpoint
    bank.parent.mkdir(exist_ok=True)
    with open(bank, "a") as fh:
        fh.write('{"schema_version": 1, "id": "exp-0000000000"}\n')
    logs = []
    checkpoint.roll_back(out, bank, logs.append)
    assert {n: (out / n).stat().st_size for n in sizes} == sizes
    assert (bank.read_bytes() if bank.exists() else None) == bank_before
    assert "rolled back" in logs[0] and "trajectories.jsonl" in logs[0] and "the bank" in logs[0]
