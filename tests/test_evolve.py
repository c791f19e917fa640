"""The self-evolution loop end to end on a tiny random model: VED and GRPO paths, checkpoints, resume."""

from __future__ import annotations

import json

import pytest
import torch

from genevolve.experience.bank import ExperienceBank
from genevolve.agent.guides import SLOTS
from genevolve.training.evolve import EvolveConfig, evolve


def _cfg(out, folder, **kw):
    base = dict(out=str(out), policy=str(folder), steps=1, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=12,
                micro_batch=4, lora_rank=4, lr=1e-2, gate=-1.0)
    base.update(kw)
    return EvolveConfig(**base)


def _adapter_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoint" / "adapter" / "adapter_model.safetensors"))


def test_ved_step_uses_the_teacher_and_updates_the_adapter(tmp_path, tiny_folder, world):
    bank = ExperienceBank(tmp_path / "run" / "bank")
    bank.add("evolve-x", "any request", {s: "Query quantity_counting and write exact counts." for s in SLOTS}, reward_gap=0.5)
    row = evolve(_cfg(tmp_path / "run", tiny_folder, use_grpo=False), world=world, log=lambda _: None)
    assert row.retrieval_hit_rate == 1.0 and row.ved_loss > 0 and row.get("ved_tokens") > 0
    assert row.get("grad_norm") > 0
    lora_b = [v for k, v in _adapter_weights(tmp_path / "run").items() if "lora_B" in k]
    assert any(float(v.abs().sum()) > 0 for v in lora_b)  # LoRA B starts at zero: the step moved it
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and {"t_rollout", "t_teacher_scoring", "t_update"} <= set(rows[-1])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["use_grpo"] is False
    assert rows[-1]["logp_grad_norm_ved"] > 0 and rows[-1]["logp_grad_norm_grpo"] == 0.0  # no GRPO term in this arm


def test_unjudged_cases_neither_push_nor_pull(tmp_path, tiny_folder, world, monkeypatch):
    """A case the scorer could not judge (reward None) gets advantage 0, is left out of mining and of the means."""
    from genevolve.evaluation.bench import SandboxScorer
    from genevolve.training import losses

    real_score, seen = SandboxScorer.score, {}

    def flaky(self, req, tr, store, seed=0):
        img, v = real_score(self, req, tr, store, seed=seed)
        if tr.id.endswith("-k0"):
            v = v.model_copy(update={"F": None, "V": None, "T": None, "A": None, "kscore": None, "r_text": None, "reward": None})
        return img, v

    real_adv = losses.group_advantages

    def spy(r):
        seen["rewards"] = r.clone()
        return real_adv(r)

    monkeypatch.setattr(SandboxScorer, "score", flaky)
    monkeypatch.setattr(losses, "group_advantages", spy)
    row = evolve(_cfg(tmp_path / "run", tiny_folder, use_ved=False, rollouts_per_prompt=3), world=world, log=lambda _: None)
    assert row.get("unjudged") == 2
    r = seen["rewards"]
    assert torch.allclose(r[:, 0], r[:, 1:].mean(1))  # the unjudged one sits at its group's judged mean
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["reward_mean"] == pytest.approx(float(r[:, 1:].mean()))
    assert rows[-1]["logp_grad_norm_grpo"] >= 0 and rows[-1]["logp_grad_norm_ved"] == 0.0


def test_resume_after_an_interrupted_checkpoint(tmp_path, tiny_folder, world):
    out = tmp_path / "run"
    evolve(_cfg(out, tiny_folder, use_ved=False), world=world, log=lambda _: None)
    first = _adapter_weights(out)
    (out / "checkpoint.tmp").mkdir()  # a kill during the next checkpoint write leaves this behind
    (out / "checkpoint.tmp" / "state.pt").write_bytes(b"half a file")
    logs = []
    evolve(_cfg(out, tiny_folder, use_ved=False, steps=2), world=world, log=logs.append)
    assert any("resumed from step 1" in line for line in logs)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert not (out / "checkpoint.tmp").exists()
    assert set(_adapter_weights(out)) == set(first)


def test_config_is_validated():
    with pytest.raises(ValueError, match="at least one"):
        EvolveConfig(use_grpo=False, use_ved=False).validate()
    with pytest.raises(ValueError, match="rollouts_per_prompt"):
        EvolveConfig(rollouts_per_prompt=1).validate()


def test_cli_refuses_an_unknown_probe_request(tmp_path):
    from typer.testing import CliRunner

    from genevolve.cli import app

    for cmd in (["evolve", "--train-only"], ["ablate", "--arms", "ved"]):
        res = CliRunner().invoke(app, [*cmd, "--out", str(tmp_path / "run"), "--probe-request", "evolve-99999"])
        text = " ".join(res.output.replace("│", " ").split())  # the error box wraps long lines
        assert res.exit_code == 2 and "'evolve-99999' is not a sandbox request id" in text and not (tmp_path / "run").exists()


def test_live_files_probe_pairs_and_lock(tmp_path, tiny_folder, world, monkeypatch):
    import genevolve.experience.bank
    from genevolve.experience.bank import Pair
    from genevolve.records.live import RunLockedError, is_running, read_metrics, read_probe, run_lock

    # A random model never answers, so no real pair is mined: make the first group one.
    monkeypatch.setattr(genevolve.experience.bank, "mine_pairs", lambda groups, *a: [
        Pair(groups[0][0][0].request_id, groups[0][0][0].request_text, groups[0][0][0], groups[0][1][0], groups[0][0][1], groups[0][1][1])])
    out = tmp_path / "run"
    bank = ExperienceBank(out / "bank")
    bank.add("evolve-x", "any request", {s: "Query quantity_counting and write exact counts." for s in SLOTS}, reward_gap=0.5)
    probe_id = world.split("evolve")[5].id  # not the default (the first evolve request)
    seen = []
    evolve(_cfg(out, tiny_folder, steps=2, probe_request=probe_id), world=world, log=lambda _: None,
           on_step=lambda row: seen.append((row.step, read_probe(out).step, read_probe(out).request_id)))
    assert seen == [(1, 1, probe_id), (2, 2, probe_id)]  # the same request at every step
    probe = read_probe(out)
    assert probe.experience_id and probe.guide.startswith("- Search strategy")
    sampled = [t for t in probe.tokens if t.a]
    assert sampled and all(t.p is not None and t.q is not None and t.p <= 0 and t.q <= 0 for t in sampled)
    assert "".join(t.t for t in probe.tokens).count("<|im_start|>user") >= 1  # starts after the system block
    assert probe.student.verdict.trajectory_id == probe.student.trajectory.id
    teacher = probe.teacher.trajectory
    assert teacher.id.endswith("-teacher") and teacher.guide == probe.guide
    assert probe.student.trajectory.request_id == teacher.request_id == probe_id
    raw = json.loads((out / "probe.json").read_text())  # on disk: the token rows keep only the numbers they have
    assert all(set(t) <= {"t", "a", "p", "q"} and ("q" in t) == bool(t["a"]) for t in raw["tokens"])
    trained = {json.loads(line)["id"] for line in (out / "trajectories.jsonl").read_text().splitlines()}
    assert len(trained) == 2 * 2 * 2 and probe.student.trajectory.id not in trained  # the probe is not trained on
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 2 and pairs[0]["step"] == 1 and pairs[0]["best"].endswith("-k0")
    final = ExperienceBank(out / "bank")
    assert final.locate(pairs[0]["experience"]) is not None or pairs[0]["error"]
    for p in pairs:  # steps count from 1 everywhere; a pair's experience is there, or merged into one that is
        exp, folded = final.locate(p["experience"])
        assert p["step"] in {exp.step} | {m.step for m in exp.merged_from}
    assert read_metrics(out / "metrics.jsonl")[0].get("t_probe") > 0
    assert not is_running(out)
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from genevolve.records.live import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held" and is_running(out)  # another process trains there
        with pytest.raises(RunLockedError, match="another process"):
            evolve(_cfg(out, tiny_folder, steps=3), world=world, log=lambda _: None)
    finally:
        holder.kill()
        holder.wait()
    with run_lock(out):  # the same process may hold its folder while the trainer takes it again
        assert is_running(out)


def test_the_default_probe_follows_a_request_with_its_own_experience(tmp_path, tiny_folder, world, monkeypatch):
    """No --probe-request: the probe follows a step-1 request an experience was mined from, so its teacher reads
    that request's own experience from the first step on (a random model mines nothing: the second group is made
    a pair), and a resumed run keeps following it."""
    import genevolve.experience.bank
    from genevolve.experience.bank import Pair
    from genevolve.records.live import read_probe

    monkeypatch.setattr(genevolve.experience.bank, "mine_pairs", lambda groups, *a: [
        Pair(groups[1][0][0].request_id, groups[1][0][0].request_text, groups[1][0][0], groups[1][1][0], groups[1][0][1], groups[1][1][1])])
    out = tmp_path / "run"
    evolve(_cfg(out, tiny_folder, steps=1), world=world, log=lambda _: None)
    second = json.loads((out / "trajectories.jsonl").read_text().splitlines()[2])["request_id"]  # K=2: group 2's first
    probe = read_probe(out)
    mined = json.loads((out / "pairs.jsonl").read_text().splitlines()[0])
    assert probe.request_id == second == mined["request_id"] and mined["experience"]
    assert probe.retrieval == "own" and probe.experience_id == mined["experience"]
    bank = ExperienceBank(out / "bank")  # the probe's teacher reads what the update's reads: the nearest, at its similarity
    assert bank.retrieve(probe.request)[1] == pytest.approx(probe.similarity, abs=1e-6)
    assert probe.teacher is not None and any(t.q is not None for t in probe.tokens)
    evolve(_cfg(out, tiny_folder, steps=2), world=world, log=lambda _: None)  # resumed: the same probe request
    assert read_probe(out).step == 2 and read_probe(out).request_id == second


def test_a_step_mines_its_own_pairs_into_the_bank(tmp_path, world):
    """Real mining on the shipped tiny policy (it answers, so rewards spread): a group whose best and worst are
    at least δ_min apart gives one pair and one experience keyed by its request; a closer group gives none."""
    from collections import defaultdict

    out = tmp_path / "run"
    cfg = _cfg(out, "tiny", use_grpo=False, rollouts_per_prompt=4, max_new_tokens=192, probe=False, delta_min=0.2, gate=0.84)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny policy's matrices are small: two threads mostly wait on each other
    try:
        evolve(cfg, world=world, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    trajs = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    reward = {json.loads(line)["trajectory_id"]: json.loads(line)["reward"] for line in (out / "verdicts.jsonl").read_text().splitlines()}
    groups = defaultdict(list)
    for t in trajs:
        groups[t["request_id"]].append(t["id"])
    assert len(groups) == 2 and all(len(g) == 4 for g in groups.values())
    spread = {rid: max(reward[i] for i in ids) - min(reward[i] for i in ids) for rid, ids in groups.items()}
    wide = {rid for rid, gap in spread.items() if gap >= 0.2}
    assert len(wide) == 1, spread  # with this seed one group is above δ_min and one below: both sides are tested

    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert {p["request_id"] for p in pairs} == wide and len(pairs) == 1
    (pair,) = pairs
    ids = groups[pair["request_id"]]
    assert pair["best"] in ids and pair["worst"] in ids and pair["step"] == 1
    assert (pair["best_reward"], pair["worst_reward"]) == (reward[pair["best"]], reward[pair["worst"]])
    assert pair["best_reward"] == max(reward[i] for i in ids) and pair["worst_reward"] == min(reward[i] for i in ids)
    assert pair["gap"] == pytest.approx(spread[pair["request_id"]]) and pair["gap"] >= 0.2

    from genevolve.records.schema import Experience, read_jsonl

    (exp,) = read_jsonl(out / "bank" / "experiences.jsonl", Experience)
    assert exp.id == pair["experience"] and exp.step == 1 and exp.run_id == "run"
    assert (exp.source_request_id, exp.source_request) == (pair["request_id"], world.request(pair["request_id"]).text)
    assert (exp.best_trajectory, exp.worst_trajectory) == (pair["best"], pair["worst"])
    assert exp.reward_gap == pytest.approx(pair["gap"]) and set(exp.slots) == set(SLOTS) and all(exp.slots.values())


def test_probe_without_a_teacher_says_why(tmp_path, tiny_folder, world):
    from genevolve.records.live import read_probe

    evolve(_cfg(tmp_path / "run", tiny_folder, use_ved=False), world=world, log=lambda _: None)
    probe = read_probe(tmp_path / "run")
    first = json.loads((tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()[0])["request_id"]
    assert probe.request_id == first  # by default, step 1's first request when nothing was mined from any
    assert probe.chosen.startswith("the first request of step 1")
    assert probe.teacher is None and "without VED" in probe.note
    assert all(t.q is None for t in probe.tokens) and any(t.p is not None for t in probe.tokens)


def test_the_probe_changes_neither_the_batch_nor_the_update(tmp_path, tiny_folder, world):
    from genevolve.records.live import read_probe

    rows = {}
    for probe in (False, True):
        out = tmp_path / str(probe)
        ExperienceBank(out / "bank").add("evolve-x", "any request", {s: "Query spatial_layout first." for s in SLOTS},
                                         reward_gap=0.5)
        rows[probe] = evolve(_cfg(out, tiny_folder, probe=probe), world=world, log=lambda _: None)
        assert (read_probe(out) is not None) == probe
    for key in ("reward_mean", "grpo_loss", "ved_loss", "ved_tokens", "grad_norm", "retrieval_hit_rate"):
        assert rows[True].get(key) == rows[False].get(key), key
    a, b = _adapter_weights(tmp_path / "True"), _adapter_weights(tmp_path / "False")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["id"] for x in (tmp_path / "True" / "trajectories.jsonl").read_text().splitlines()] == \
        [json.loads(x)["id"] for x in (tmp_path / "False" / "trajectories.jsonl").read_text().splitlines()]
    with pytest.raises(ValueError, match="not a sandbox request id"):
        evolve(_cfg(tmp_path / "bad", tiny_folder, probe_request="evolve-99999"), world=world, log=lambda _: None)


def test_two_processes_share_a_step_and_stay_in_sync(tmp_path, tiny_folder, world):
    """torchrun with two gloo processes: prompts split, pairs and bank shared, gradients summed."""
    import os
    import sys
    from pathlib import Path

    from _loopback import run_process_group

    out = tmp_path / "run"
    ExperienceBank(out / "bank").add("evolve-x", "any request", {s: "Query spatial_layout and place each object." for s in SLOTS},
                                     reward_gap=0.5)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m", "genevolve.cli",
           "evolve", "--out", str(out), "--policy", str(tiny_folder), "--steps", "2", "-B", "2", "-K", "2",
           "--max-new-tokens", "16", "--gate", "-1", "--lora-rank", "4", "--lr", "1e-2", "--train-only"]
    code, err = run_process_group(cmd, env)
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["processes"] == 2 for r in rows)
    for r in rows:
        a, b = r["replica_checksums"]
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9)
        assert r["retrieval_hit_rate"] == 1.0 and r["ved_tokens"] > 0
    assert len((out / "trajectories.jsonl").read_text().splitlines()) == 2 * 2 * 2  # steps x B x K, written once
    assert (out / "checkpoint" / "adapter" / "adapter_model.safetensors").exists()
    assert (out / ".ranks" / "r1" / "bank").exists()
    from genevolve.records.live import read_probe

    probe = read_probe(out)  # written by the main process alone
    first = json.loads((out / "trajectories.jsonl").read_text().splitlines()[0])["request_id"]
    assert probe.step == 2 and probe.request_id == first and probe.teacher is not None  # step 1's first request


def test_evaluate_averages_several_samples_per_request(world):
    from genevolve.evaluation.report import evaluate
    from genevolve.agent.expert import ExpertNoise, ExpertPolicy

    reqs = world.split("bench")[::40][:3]
    noisy = ExpertPolicy(world, ExpertNoise.cold_start())
    one = evaluate(world, noisy, reqs, seeds=[0], samples=1)
    three = evaluate(world, noisy, reqs, seeds=[0], samples=3)
    assert [(r["request"], r["sample"]) for r in three["records"]] == [(q.id, i) for q in reqs for i in range(3)]
    ks = [r["verdict"].kscore for r in three["records"]]
    assert three["summary"]["overall"]["all"]["kscore"]["mean"] == pytest.approx(sum(ks) / len(ks))
    # sample 0 is the same trajectory a one-sample evaluation draws
    assert [r["verdict"].kscore for r in three["records"] if r["sample"] == 0] == [r["verdict"].kscore for r in one["records"]]
    with pytest.raises(ValueError, match="samples"):
        evaluate(world, noisy, reqs, samples=0)


def test_ablate_records_what_each_arm_ran_and_flags_identical_arms(tmp_path, tiny_folder):
    """Every arm and seed is saved with its run folder, checksum and an evaluation fingerprint; two arms that
    wrote the same trajectories are named, with how far apart their adapters are."""
    from typer.testing import CliRunner

    from genevolve.cli import app

    out = tmp_path / "abl"
    res = CliRunner().invoke(app, ["ablate", "--out", str(out), "--policy", str(tiny_folder), "--arms", "sft,ved,grpo+ved",
                                   "--seeds", "0", "--steps", "1", "-B", "2", "-K", "2", "--eval-requests", "2",
                                   "--max-new-tokens", "16", "--lora-rank", "4"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "ablation.json").read_text())
    runs = {r["arm"]: r for r in data["runs"]}
    assert set(runs) == {"sft", "ved", "grpo+ved"}
    assert runs["sft"]["adapter"] is None and runs["ved"]["adapter"].endswith("ved-s0/checkpoint/adapter")
    assert runs["sft"]["policy_sha256"] not in {runs["ved"]["policy_sha256"], runs["grpo+ved"]["policy_sha256"]}
    # A random model never answers: every reward is 0, so GRPO's advantages are 0, and at step 1 its KL term is 0
    # (a fresh LoRA is the reference): +GRPO adds nothing, the two arms train the same weights and draw the same samples.
    assert runs["ved"]["policy_sha256"] == runs["grpo+ved"]["policy_sha256"]
    assert runs["ved"]["eval_fingerprint"] == runs["grpo+ved"]["eval_fingerprint"]
    assert runs["ved"]["last_metrics"]["step"] == 1 and runs["grpo+ved"]["last_metrics"]["logp_grad_norm_grpo"] >= 0
    # A random model at lr 1e-3 for one step barely moves: whatever the fingerprints say, the report agrees with them.
    same = {tuple(d["arms"]) for d in data["identical_arms"]}
    for a, b in (("sft", "ved"), ("sft", "grpo+ved"), ("ved", "grpo+ved")):
        assert ((a, b) in same) == (runs[a]["eval_fingerprint"] == runs[b]["eval_fingerprint"])
    for d in data["identical_arms"]:
        assert d["relative_distance"] is None or d["relative_distance"] >= 0


def test_adapter_distance_and_identical_arms(tmp_path):
    from safetensors.torch import save_file

    from genevolve.evaluation.report import adapter_distance, identical_arms

    for name, scale in (("a", 1.0), ("b", 1.1)):
        (tmp_path / name).mkdir()
        save_file({"w": torch.ones(2, 2) * scale}, str(tmp_path / name / "adapter_model.safetensors"))
    assert adapter_distance(tmp_path / "a", tmp_path / "b") == pytest.approx(0.1)
    runs = [{"arm": "ved", "seed": 0, "adapter": str(tmp_path / "a"), "policy_sha256": "x" * 64, "eval_fingerprint": "f"},
            {"arm": "grpo+ved", "seed": 0, "adapter": str(tmp_path / "b"), "policy_sha256": "y" * 64, "eval_fingerprint": "f"},
            {"arm": "grpo+ved", "seed": 1, "adapter": str(tmp_path / "b"), "policy_sha256": "y" * 64, "eval_fingerprint": "f"},
            {"arm": "grpo", "seed": 0, "adapter": str(tmp_path / "b"), "policy_sha256": "z" * 64, "eval_fingerprint": "g"}]
    assert identical_arms(runs) == [{"seed": 0, "arms": ["ved", "grpo+ved"], "sha256": ["x" * 64, "y" * 64],
                                     "relative_distance": pytest.approx(0.1)}]


def test_a_step_writes_its_progress_phase_by_phase(tmp_path, tiny_folder, world, monkeypatch):
    """progress.json follows the step: rollouts done of B x K (+ the probe's), judging, mining, the update, the
    checkpoint; a viewer's status and ETA move inside a step, not only when it ends."""
    from genevolve.records import live

    seen = []
    real = live.ProgressWriter.__call__

    def spy(self, step, phase, done=0, total=0):
        seen.append((step, phase, done, total))
        return real(self, step, phase, done, total)

    monkeypatch.setattr(live.ProgressWriter, "__call__", spy)
    out = tmp_path / "run"
    evolve(_cfg(out, tiny_folder, steps=2), world=world, log=lambda _: None)
    for step in (1, 2):
        phases = [p for s, p, _, _ in seen if s == step]
        assert list(dict.fromkeys(phases)) == ["rollouts", "judging", "mining", "update", "checkpoint"], phases
        rollouts = [(d, t) for s, p, d, t in seen if s == step and p == "rollouts"]
        total = rollouts[0][1]
        assert rollouts[0][0] == 0 and 4 <= total <= 6 and rollouts[-1] == (total, total)  # B x K = 4, and the probe's rows
        assert [d for d, _ in rollouts] == sorted(d for d, _ in rollouts)
        judged = [(d, t) for s, p, d, t in seen if s == step and p == "judging"]
        assert judged == [(i, 4) for i in range(4)]
    final = live.read_progress(out)
    assert (final.step, final.steps, final.phase) == (2, 2, "checkpoint") and final.updated >= final.step_started > 0
