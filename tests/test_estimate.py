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


def test_the_eta_moves_inside_a_step_and_says_when_the_run_is_behind():
    """The quick distill once read "0 s (estimated before the first step)" for five minutes: inside a step the ETA now
    follows the rollouts done of B x K, then judging, then the update, and says when the run is behind its estimate."""
    plan = est.plan_evolve(2, 4, 4, True, 24)  # 18 rollouts a step (16 + the probe's 2), 72 comparison rollouts
    e = est.Estimate(100.0, 1.0, "test", plan)
    assert est.step_fraction("rollouts", 9, 18, 0, 18) == pytest.approx(0.275)
    assert est.step_fraction("judging", 18, 18, 0, 18) == pytest.approx(0.60)
    assert est.step_fraction("update", 0, 0, 50.0, 100.0) == pytest.approx(0.62)  # time-based, kept in the phase's span
    assert est.step_fraction("update", 0, 0, 90.0, 100.0) == pytest.approx(0.90)
    early = est.eta_progress(e, [], "rollouts", 0, 18, in_step=1.0, elapsed=5.0)
    half = est.eta_progress(e, [], "rollouts", 9, 18, in_step=40.0, elapsed=45.0)
    # before any logged step: the current step's own pace (40 s for 27.5 %: 145 s a step) once a tenth is done
    per = 40.0 / 0.275
    assert early.seconds == pytest.approx(2 * 18 + est.EVAL_SHARE * 18 / 18 * 72)  # the start's estimate: 18 s a step
    assert half.seconds == pytest.approx((2 - 0.275) * per + est.EVAL_SHARE * per / 18 * 72)
    assert half.behind == pytest.approx(45.0 - (10 + 0.275 * 18)) and early.behind is None
    logged = est.eta_progress(e, [20.0], "judging", 9, 18, in_step=12.0, elapsed=35.0)
    assert logged.seconds == pytest.approx((2 - 1 - 0.575) * 20 + est.EVAL_SHARE * 20 / 18 * 72) and logged.behind is None
    comparing = est.eta_progress(e, [20.0, 20.0], "comparison", in_phase=10.0)
    assert comparing.seconds == pytest.approx(est.EVAL_SHARE * 20 / 18 * 72 - 10)
    assert est.eta_progress(None, [], "rollouts") is None
    assert est.eta_progress(e, [20.0, 20.0], "done").seconds == pytest.approx(est.EVAL_SHARE * 20 / 18 * 72)


def test_a_gguf_policy_counts_its_weights_as_they_run():
    """A quantised GGUF file is dequantised to float32 on load: its size on disk would make runs look 5x cheaper."""
    from genevolve.evaluation.estimate import weight_bytes
    from genevolve.policies.resolve import smollm2_path

    try:
        folder, name = smollm2_path()
    except FileNotFoundError:
        pytest.skip("SmolLM2 is not installed")
    on_disk = (folder / name).stat().st_size
    assert weight_bytes("smollm2") == pytest.approx(4 * 134_515_008, rel=0.01) and weight_bytes("smollm2") > 4 * on_disk
