"""Run-time estimates: the plan of a run in rollouts, the cost of one (from past runs, else from the size of
the weights), and the ETA of a running run from its own logged steps."""

from __future__ import annotations

import json

import pytest

from genevolve.evaluation import estimate as est


def test_plans_count_every_rollout():
    p = est.plan_evolve(steps=2, b=4, k=4, probe=True, eval_requests=24)
    assert (p.train_rollouts, p.eval_rollouts, p.steps, p.rollouts_per_step) == (36, 72, 2, 18)
    assert est.plan_evolve(2, 4, 4, False, 24, use_ved=False).eval_rollouts == 48  # no teacher row
    a = est.plan_ablate(["sft", "grpo", "ved", "grpo+ved"], seeds=2, steps=1, b=4, k=4, probe=False, eval_requests=10)
    assert a.train_rollouts == 3 * 2 * 16 and a.eval_rollouts == 10 * 4 * 2 + 10 and a.steps == 6


def test_the_cost_per_rollout_comes_from_past_runs_else_from_the_weights(tmp_path):
    plan = est.plan_evolve(2, 4, 4, True, 24)
    small = est.estimate("tiny", plan, tmp_path)
    assert "MB of weights" in small.basis and small.seconds < 240  # the quick tiny run fits in four minutes
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with open(folder / "model.safetensors", "wb") as f:
        f.truncate(500_000_000)  # a sparse 500 MB file: a SmolLM2-sized student
    assert est.estimate(str(folder), plan, tmp_path).seconds > 5 * small.seconds
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"policy": "tiny", "prompts_per_step": 4, "rollouts_per_prompt": 4, "probe": True}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "seconds": 18.0}) + "\n" for i in (1, 2)))
    past = est.estimate("tiny", plan, tmp_path / "runs")
    assert past.seconds_per_rollout == pytest.approx(1.0) and "2 logged steps" in past.basis


def test_eta_uses_the_runs_own_steps(tmp_path):
    plan = est.plan_evolve(4, 4, 4, True, 10)
    e = est.Estimate(300.0, 1.0, "test", plan)
    est.save(tmp_path, e)
    loaded = est.load(tmp_path)
    assert loaded == e
    assert est.eta(loaded, [], elapsed=100) == pytest.approx(200)  # before the first step: the estimate, less time spent
    # two of four steps at 36 s (2 s a rollout): two more steps and 30 comparison rollouts at a share of 2 s, less 10 s
    assert est.eta(loaded, [36.0, 36.0], since_last_step=10) == pytest.approx(2 * 36 + est.EVAL_SHARE * 2 * 30 - 10)
    assert est.eta(None, [1.0]) is None and est.load(tmp_path / "nothing") is None
    assert est.minutes(125) == "2 min 05 s" and est.minutes(42) == "42 s"
