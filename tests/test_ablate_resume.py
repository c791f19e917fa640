"""`genevolve ablate` resumes: a finished arm and seed is loaded, never trained or evaluated again."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

import genevolve.cli.train as train_cmd
from genevolve.cli import app
from genevolve.evaluation import report as compare


@pytest.fixture
def spies(monkeypatch):
    calls = {"train": [], "evaluate": []}
    real_train, real_eval = train_cmd.train, compare.evaluate

    def train(cfg, *a, **k):
        calls["train"].append(cfg.out)
        return real_train(cfg, *a, **k)

    def evaluate(world, policy, *a, **k):
        calls["evaluate"].append(policy.name)
        return real_eval(world, policy, *a, **k)

    monkeypatch.setattr(train_cmd, "train", train)
    monkeypatch.setattr(compare, "evaluate", evaluate)
    return calls


def _ablate(folder, out, *extra):
    args = ["ablate", "--policy", str(folder), "--out", str(out), "--arms", "sft,ved", "--seeds", "0", "--steps", "1",
            "-B", "2", "-K", "2", "--eval-requests", "2", "--max-new-tokens", "16", "--no-probe", "--micro-batch", "1", *extra]
    return CliRunner().invoke(app, args)


def _without_seconds(out):
    data = json.loads((out / "ablation.json").read_text())
    assert data.pop("seconds") > 0
    return data


def test_a_rerun_loads_every_finished_arm_and_a_lost_one_runs_again(tmp_path, tiny_folder, spies):
    out = tmp_path / "abl"
    res = _ablate(tiny_folder, out)
    assert res.exit_code == 0, res.output
    # The two arms, then the teacher section (student and teacher, on the training requests that retrieve
    # their own experience and on the bench hits, when there are any).
    assert spies["train"] == [str(out / "ved-s0")] and spies["evaluate"][:2] == ["sft", "ved"]
    assert set(spies["evaluate"][2:]) <= {"ved"} and len(spies["evaluate"]) % 2 == 0
    first = _without_seconds(out)
    assert first["teacher"]["arm"] == "ved" and first["teacher"]["seed"] == 0
    assert (out / "teacher" / "teacher.md").read_text().startswith("## Teacher (ved, seed 0)")
    assert "## Teacher (ved, seed 0)" in (out / "report" / "report.md").read_text()
    assert [r["arm"] for r in first["runs"]] == ["sft", "ved"] and "identical_arms" in first
    for arm in ("sft", "ved"):
        assert {p.name for p in (out / f"{arm}-s0" / "eval").iterdir()} == {"eval.json", "trajectories.jsonl", "verdicts.jsonl"}
    assert json.loads((out / "ablate_config.json").read_text())["eval_samples"] == 1
    assert not (out / "ved-s0" / "probe.json").exists() and json.loads((out / "ved-s0" / "config.json").read_text())["probe"] is False
    assert json.loads((out / "ved-s0" / "config.json").read_text())["micro_batch"] == 1

    spies["train"].clear(), spies["evaluate"].clear()
    res = _ablate(tiny_folder, out)
    assert res.exit_code == 0, res.output
    assert spies == {"train": [], "evaluate": []}
    assert "[sft seed 0] done earlier, loaded" in res.output and "[ved seed 0] done earlier, loaded" in res.output
    assert _without_seconds(out) == first

    assert "[teacher] done earlier, loaded" in res.output

    # Killed between arms: the second arm's evaluation never landed. Only that arm runs again (its
    # training resumes from its own checkpoint, which holds the finished step) and the numbers are the same;
    # its weights are the same too, so the teacher section is loaded, not measured again.
    shutil.rmtree(out / "ved-s0" / "eval")
    res = _ablate(tiny_folder, out)
    assert res.exit_code == 0, res.output
    assert spies == {"train": [str(out / "ved-s0")], "evaluate": ["ved"]}
    assert "[sft seed 0] done earlier, loaded" in res.output and "[teacher] done earlier, loaded" in res.output
    assert _without_seconds(out) == first


def test_a_rerun_with_other_settings_is_refused(tmp_path, tiny_folder, spies):
    out = tmp_path / "abl"
    out.mkdir()
    (out / "ablate_config.json").write_text(json.dumps({"steps": 1}))
    res = _ablate(tiny_folder, out, "--eval-samples", "2")
    assert res.exit_code == 2 and "other settings" in res.output and "eval_samples: None -> 2" in res.output
    assert spies == {"train": [], "evaluate": []}
