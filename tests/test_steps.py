"""The named steps of a self-evolution step (genevolve/training/steps.py), each on small hand-made inputs with the
expected result written out: which prompts a step takes, what is judged and recorded, which pairs are mined and
summarised into the bank, the update's bookkeeping, the metrics row and the order of what a step records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from genevolve.agent.guides import SLOTS
from genevolve.experience.bank import ExperienceBank
from genevolve.experience.summarise import SummaryError
from genevolve.records.live import MetricsRow
from genevolve.records.schema import Program, Trajectory, Turn, Verdict
from genevolve.training import steps
from genevolve.training.timing import PhaseTimer


def _traj(tid, rid="r1", text="Draw three red circles", answered=True, ids=(1, 2, 3), mask=(0, 1, 1), error=None):
    return Trajectory(id=tid, request_id=rid, request_text=text, policy="tiny", seed=int(tid[-1]),
                      program=Program(gen_prompt=text) if answered else None,
                      termination="answer" if answered else "no_answer",
                      turns=[Turn(index=0, raw="x", error=error)], token_ids=list(ids), assistant_mask=list(mask),
                      system_prompt="sys")


def _verdict(tid, reward, rid="r1", kscore=None, failed=None):
    return Verdict(trajectory_id=tid, request_id=rid, reward=reward, kscore=reward if kscore is None else kscore,
                   failed=failed)


class _Progress:
    def __init__(self):
        self.calls = []

    def __call__(self, *a, **k):
        self.calls.append(a)


def test_prompts_for_takes_b_prompts_in_the_seeded_order_and_wraps_around():
    run = SimpleNamespace(cfg=SimpleNamespace(prompts_per_step=2), prompts=list("abcde"), order=[3, 1, 4, 0, 2])
    assert [steps.prompts_for(run, s) for s in range(4)] == [["d", "b"], ["e", "a"], ["c", "d"], ["b", "e"]]
    run.cfg.prompts_per_step = 3
    assert steps.prompts_for(run, 1) == ["a", "c", "d"]


def test_probe_seeds_are_distinct_per_run_seed_and_step():
    assert steps.probe_seed(SimpleNamespace(cfg=SimpleNamespace(seed=3)), 7) == 300_007
    assert steps.probe_seed(SimpleNamespace(cfg=SimpleNamespace(seed=0)), 99_999) == 99_999


def test_judge_scores_each_trajectory_against_its_own_request_with_its_seed():
    calls = []

    class Scorer:
        def score(self, req, tr, store, seed):
            calls.append((req, tr.id, store, seed))
            return ("render", f"verdict-{tr.id}")

    prog = _Progress()
    run = SimpleNamespace(cfg=SimpleNamespace(rollouts_per_prompt=2), scorer=Scorer(), store="store", progress=prog)
    trajs = [_traj(f"t{i}") for i in range(4)]
    assert steps.judge(run, ["A", "B"], trajs, step=4) == [f"verdict-t{i}" for i in range(4)]
    assert calls == [("A", "t0", "store", 0), ("A", "t1", "store", 1), ("B", "t2", "store", 2), ("B", "t3", "store", 3)]
    assert prog.calls == [(5, "judging", i, 4) for i in range(4)]
    assert steps.judge(run, ["A"], []) == []
    prog.calls.clear()
    steps.judge(run, ["A"], trajs[:1])  # before any step: step 1
    assert prog.calls == [(1, "judging", 0, 1)]


def test_record_cases_appends_trajectories_without_tensors_and_verdicts_on_the_main_process_only(tmp_path):
    trajs, verdicts = [_traj("t1"), _traj("t2")], [_verdict("t1", 0.5), _verdict("t2", 0.25)]
    run = SimpleNamespace(out=tmp_path, procs=SimpleNamespace(main=True))
    steps.record_cases(run, trajs, verdicts)
    steps.record_cases(run, trajs[:1], verdicts[:1])
    rows = [json.loads(x) for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["t1", "t2", "t1"]
    assert not {"token_ids", "assistant_mask", "token_logprobs"} & set(rows[0]) and rows[0]["system_prompt"] == "sys"
    assert [json.loads(x)["reward"] for x in (tmp_path / "verdicts.jsonl").read_text().splitlines()] == [0.5, 0.25, 0.5]
    other = tmp_path / "other"
    other.mkdir()
    steps.record_cases(SimpleNamespace(out=other, procs=SimpleNamespace(main=False)), trajs, verdicts)
    assert list(other.iterdir()) == []


def test_groups_of_pairs_each_trajectory_with_its_verdict_k_per_prompt():
    assert steps.groups_of(list("abcdef"), list("ABCDEF"), 3, 2) == [[("a", "A"), ("b", "B")], [("c", "C"), ("d", "D")],
                                                                     [("e", "E"), ("f", "F")]]
    assert steps.groups_of(list("abcdef"), list("ABCDEF"), 2, 3) == [[("a", "A"), ("b", "B"), ("c", "C")],
                                                                     [("d", "D"), ("e", "E"), ("f", "F")]]


def test_advantages_of_an_all_unjudged_group_are_zero():
    g = [[(None, SimpleNamespace(reward=None)), (None, SimpleNamespace(reward=None))],
         [(None, SimpleNamespace(reward=1.0)), (None, SimpleNamespace(reward=0.0))]]
    adv = steps.advantages(g)
    assert adv.shape == (2, 2) and adv.dtype == torch.float32
    assert adv[0].tolist() == [0.0, 0.0] and float(adv[1, 0]) > 0 > float(adv[1, 1])


# --- mining --------------------------------------------------------------------------------------------------


@dataclass
class _Summary:
    slots: dict
    key: dict


class _Summariser:
    name = "fake-v1"

    def __init__(self, fail_on=()):
        self.fail_on, self.seen = set(fail_on), []

    def summarise(self, pair):
        self.seen.append(pair.request_id)
        if pair.request_id in self.fail_on:
            raise SummaryError(f"no summary for {pair.request_id}")
        return _Summary({s: f"Count the objects ({pair.request_id})." for s in SLOTS},
                        {"trigger": "a request that names an exact count of objects",
                         "source_prompt_summary": f"a count request ({pair.request_id})"})


def _mining_run(tmp_path, use_ved=True, consolidate=False, delta_min=0.1, max_pairs=8, fail_on=()):
    cfg = SimpleNamespace(use_ved=use_ved, consolidate=consolidate, delta_min=delta_min, max_pairs=max_pairs)
    return SimpleNamespace(cfg=cfg, bank=ExperienceBank(tmp_path / "bank", gate=-1.0), summariser=_Summariser(fail_on),
                           out=tmp_path / "run-x", procs=SimpleNamespace(main=True))


def _groups():
    """Request r1: gap 0.7 (t1 best, t2 worst); r2: gap 0.3; r3: gap 0.05 (under delta_min)."""
    return [[(_traj("t1", "r1"), _verdict("t1", 0.9, "r1")), (_traj("t2", "r1"), _verdict("t2", 0.2, "r1"))],
            [(_traj("t3", "r2", "Draw two cubes"), _verdict("t3", 0.6, "r2")),
             (_traj("t4", "r2", "Draw two cubes"), _verdict("t4", 0.3, "r2"))],
            [(_traj("t5", "r3"), _verdict("t5", 0.5, "r3")), (_traj("t6", "r3"), _verdict("t6", 0.45, "r3"))]]


def test_mining_adds_one_experience_per_pair_with_its_provenance_and_logs_every_pair(tmp_path):
    run = _mining_run(tmp_path)
    (tmp_path / "run-x").mkdir()
    mined = steps.mine_and_summarise(run, _groups(), step=2)
    assert [e.source_request_id for e in mined.experiences] == ["r1", "r2"] and len(run.bank) == 2
    e = mined.experiences[0]
    assert (e.source_request, e.reward_gap, e.run_id, e.step, e.best_trajectory, e.worst_trajectory, e.summariser) == (
        "Draw three red circles", pytest.approx(0.7), "run-x", 3, "t1", "t2", "fake-v1")
    assert e.retrieval_key.trigger == "a request that names an exact count of objects"
    assert e.slots[SLOTS[0]] == "Count the objects (r1)."
    rows = [json.loads(x) for x in (tmp_path / "run-x" / "pairs.jsonl").read_text().splitlines()]
    assert [(r["step"], r["request_id"], r["best"], r["worst"], r["experience"]) for r in rows] == [
        (3, "r1", "t1", "t2", e.id), (3, "r2", "t3", "t4", mined.experiences[1].id)]
    assert rows[0]["request"] == "Draw three red circles" and rows[0]["best_reward"] == 0.9 and rows[0]["worst_reward"] == 0.2
    assert rows[0]["gap"] == pytest.approx(0.7) and rows[0]["passed_over"] == 0 and "error" not in rows[0]
    assert mined.errors == [] and mined.merged == []


def test_mining_follows_delta_min_and_max_pairs_and_records_a_failed_summary(tmp_path):
    run = _mining_run(tmp_path, delta_min=0.04, max_pairs=2, fail_on={"r1"})
    (tmp_path / "run-x").mkdir()
    mined = steps.mine_and_summarise(run, _groups(), step=0)
    assert run.summariser.seen == ["r1", "r2"]  # the two largest gaps; r3's 0.05 is the third
    assert [e.source_request_id for e in mined.experiences] == ["r2"]  # a failed summary does not stop the others
    assert mined.errors == ["no summary for r1"]
    rows = [json.loads(x) for x in (tmp_path / "run-x" / "pairs.jsonl").read_text().splitlines()]
    assert rows[0]["error"] == "no summary for r1" and rows[0]["experience"] is None and rows[0]["step"] == 1
    assert [r.error for r in mined.pair_rows] == ["no summary for r1", None]
    run = _mining_run(tmp_path / "b", delta_min=0.04, max_pairs=8)
    (tmp_path / "b" / "run-x").mkdir(parents=True)
    assert len(steps.mine_and_summarise(run, _groups(), step=0).experiences) == 3


def test_without_ved_nothing_is_mined_and_an_empty_pairs_row_set_is_written(tmp_path):
    run = _mining_run(tmp_path, use_ved=False)
    (tmp_path / "run-x").mkdir()
    mined = steps.mine_and_summarise(run, _groups(), step=0)
    assert (mined.experiences, mined.pair_rows, run.summariser.seen, len(run.bank)) == ([], [], [], 0)
    run.procs.main = False
    run.cfg.use_ved = True
    steps.mine_and_summarise(run, _groups(), step=0)
    assert not (tmp_path / "run-x" / "pairs.jsonl").exists() or (tmp_path / "run-x" / "pairs.jsonl").read_text() == ""


def test_consolidation_points_each_pair_at_the_merged_experience(tmp_path):
    run = _mining_run(tmp_path, consolidate=True)
    (tmp_path / "run-x").mkdir()
    mined = steps.mine_and_summarise(run, _groups(), step=0)
    assert len(mined.merged) == 1 and len(run.bank) == 1  # both share a trigger
    merged = mined.merged[0]
    first, second = mined.experiences
    assert merged.id == first.id and [m.id for m in merged.merged_from] == [second.id]  # the oldest's id stays put
    assert [r.experience for r in mined.pair_rows] == [merged.id, merged.id]
    rows = [json.loads(x) for x in (tmp_path / "run-x" / "pairs.jsonl").read_text().splitlines()]
    assert [r["experience"] for r in rows] == [merged.id, merged.id]
    run2 = _mining_run(tmp_path / "b", consolidate=False)
    (tmp_path / "b" / "run-x").mkdir(parents=True)
    assert steps.mine_and_summarise(run2, _groups(), step=0).merged == [] and len(run2.bank) == 2


# --- update targets ------------------------------------------------------------------------------------------


def test_update_targets_skip_rows_without_tokens_count_the_whole_steps_tokens_and_keep_this_processs_share(tmp_path):
    groups = [[(_traj("t1", ids=(1, 2, 3), mask=(0, 1, 1)), _verdict("t1", 1.0)),
               (_traj("t2", ids=(), mask=()), _verdict("t2", 0.0))],
              [(_traj("t3", ids=(4, 5), mask=(0, 0)), _verdict("t3", 0.5)),
               (_traj("t4", ids=(4, 5, 6, 7), mask=(0, 1, 1, 1)), _verdict("t4", 0.0))],
              [(_traj("t5", ids=(8, 9), mask=(0, 1)), _verdict("t5", 0.0)),
               (_traj("t6", ids=(8, 9), mask=(1, 1)), _verdict("t6", 0.2))]]
    run = SimpleNamespace(cfg=SimpleNamespace(use_ved=False), pol=SimpleNamespace(tokenizer=None),
                          bank=ExperienceBank(tmp_path / "bank"), procs=SimpleNamespace(world=2, rank=1))
    t = steps.update_targets(run, [SimpleNamespace(text="x")] * 3, groups)
    assert (t.n_scored, t.n_tokens, t.hits, t.teacher_errors) == (4, 2 + 3 + 1 + 2, 0, [])
    assert [(s.ids, s.group) for s in t.scored] == [([4, 5, 6, 7], 1)]  # group 1 of 0..2 is rank 1's share
    run.procs.rank = 0
    t0 = steps.update_targets(run, [SimpleNamespace(text="x")] * 3, groups)
    assert [s.group for s in t0.scored] == [0, 2, 2] and t0.n_tokens == t.n_tokens
    adv = steps.advantages(groups)
    assert [s.advantage for s in t0.scored] == pytest.approx([float(adv[0, 0]), float(adv[2, 0]), float(adv[2, 1])])
    assert all(s.teacher_ids is None for s in t0.scored)


def test_a_stream_that_does_not_start_with_its_system_block_is_a_recorded_teacher_error(tmp_path, tiny_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    bank = ExperienceBank(tmp_path / "bank", gate=-1.0)
    bank.add("r1", "Draw three red circles", {s: "Count the objects." for s in SLOTS})
    groups = [[(_traj("t1", ids=(1, 2, 3), mask=(0, 1, 1)), _verdict("t1", 1.0))]]
    run = SimpleNamespace(cfg=SimpleNamespace(use_ved=True), pol=SimpleNamespace(tokenizer=tok), bank=bank,
                          procs=SimpleNamespace(world=1, rank=0))
    t = steps.update_targets(run, [SimpleNamespace(text="Draw three red circles")], groups)
    assert t.hits == 0 and len(t.scored) == 1 and t.scored[0].teacher_ids is None
    assert t.teacher_errors == ["t1: the token stream does not start with the rendered system block"]
    run.cfg.use_ved = False
    assert steps.update_targets(run, [SimpleNamespace(text="Draw three red circles")], groups).teacher_errors == []


# --- the update's bookkeeping ----------------------------------------------------------------------------------


def test_update_zeroes_grads_sums_over_processes_clips_steps_and_times(monkeypatch):
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    model.weight.grad = torch.full((1, 3), 100.0)  # a stale gradient that must not survive
    seen = {}

    def fake_accumulate(m, scored, loss, device, pad_id, n_tokens, hits):
        seen.update(training=m.training, grad=None if m.weight.grad is None else m.weight.grad.clone(), scored=scored,
                    loss=loss, device=device, pad_id=pad_id, n_tokens=n_tokens, hits=hits)
        m.weight.grad = torch.tensor([[3.0, 4.0, 0.0]])  # norm 5
        return {"grpo": 0.1, "teacher_seconds": 2.0, "update_seconds": 3.0}

    monkeypatch.setattr(steps, "accumulate_gradients", fake_accumulate)
    calls = []

    class Procs:
        world = 1

        def sum_grads(self, params):
            calls.append("sum_grads")
            params[0].grad *= 2  # two processes' equal gradients: norm 10

        def sum_stats(self, stats):
            calls.append(("sum_stats", dict(stats)))
            return {k: v * 2 for k, v in stats.items()}

    cfg = SimpleNamespace(use_grpo=True, use_ved=True, lambda_ved=0.5, top_frac=0.2, clip_low=0.2, clip_high=0.28,
                          beta=0.0, micro_batch=2, grad_clip=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    run = SimpleNamespace(model=model, opt=opt, procs=Procs(), params=[model.weight], cfg=cfg, loss=steps.Run.loss.fget(
        SimpleNamespace(cfg=cfg)), pol=SimpleNamespace(device="cpu"), pad_id=7)
    timer = PhaseTimer()
    targets = steps.Targets(["s"], 1, 11, 1, [])
    stats = steps.update(run, targets, timer)
    assert seen["training"] and seen["grad"] is None and (seen["n_tokens"], seen["hits"], seen["pad_id"]) == (11, 1, 7)
    assert seen["scored"] == ["s"] and seen["device"] == "cpu"
    assert (seen["loss"].use_grpo, seen["loss"].lambda_ved, seen["loss"].clip_high, seen["loss"].micro_batch) == (True, 0.5, 0.28, 2)
    assert calls == ["sum_grads", ("sum_stats", {"grpo": 0.1})]  # the timings are taken out before summing
    assert stats["grpo"] == pytest.approx(0.2) and stats["grad_norm"] == pytest.approx(10.0)
    assert "teacher_seconds" not in stats and "replicas" not in stats
    # clipped to norm 1: grad [0.6, 0.8, 0] after summing; SGD lr 1 moves the weight by it
    assert model.weight.detach().tolist() == [pytest.approx([0.4, 1.2, 3.0])]
    assert timer.seconds["teacher_scoring"] == 2.0 and 3.0 <= timer.seconds["update"] < 4.0 and not model.training


def test_update_of_replicas_gathers_their_checksums(monkeypatch):
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))

    def fake_accumulate(m, *a):
        m.weight.grad = torch.zeros(1, 2)
        return {"teacher_seconds": 0.0, "update_seconds": 0.0}

    monkeypatch.setattr(steps, "accumulate_gradients", fake_accumulate)
    procs = SimpleNamespace(world=2, sum_grads=lambda p: None, sum_stats=lambda s: s, gather=lambda x: [x, x])
    run = SimpleNamespace(model=model, opt=torch.optim.SGD(model.parameters(), lr=1.0), procs=procs,
                          params=[model.weight], cfg=SimpleNamespace(grad_clip=1.0), loss=None,
                          pol=SimpleNamespace(device="cpu"), pad_id=0)
    assert steps.update(run, steps.Targets([], 0, 0, 0, []), PhaseTimer())["replicas"] == [3.0, 3.0]
    run.params, run.procs.world = [], 1  # a model with nothing to train: no norm to clip
    assert steps.update(run, steps.Targets([], 0, 0, 0, []), PhaseTimer())["grad_norm"] == 0.0


# --- the metrics row, the record and the summary line ----------------------------------------------------------


def _stats(**kw):
    base = {"grpo": -0.25, "ved": 0.125, "kl": 0.01, "clip_low": 0.1, "clip_high": 0.2, "ved_tokens": 6,
            "mean_gap": 0.3, "grad_norm": 1.5, "g2_grpo": 9.0, "g2_ved": 16.0}
    return base | kw


def test_the_metrics_row_is_computed_from_the_steps_cases(tmp_path):
    trajs = [_traj("t1", ids=(1, 2, 3), mask=(0, 1, 1)), _traj("t2", ids=(1, 2), mask=(1, 1), answered=False),
             _traj("t3", ids=(1,), mask=(1,), error="bad call"), _traj("t4", ids=(5, 6), mask=(0, 1))]
    verdicts = [_verdict("t1", 0.8, kscore=0.6), _verdict("t2", None, kscore=None), _verdict("t3", 0.2, kscore=0.4),
                _verdict("t4", 0.5, kscore=0.5)]
    bank = ExperienceBank(tmp_path / "bank")
    bank.add("r1", "x", {s: "Count the objects." for s in SLOTS})
    mined = steps.Mined(experiences=["e1", "e2"], errors=["x"], merged=["m"],
                        pair_rows=[SimpleNamespace(passed_over=2), SimpleNamespace(passed_over=1)])
    targets = steps.Targets([], 5, 10, 2, ["err"])
    timer = PhaseTimer()
    timer.add("rollouts", 1.5)
    run = SimpleNamespace(cfg=SimpleNamespace(arm="GRPO+VED"), bank=bank, procs=SimpleNamespace(world=1))
    row = steps.metrics_row(run, 4, trajs, verdicts, mined, targets, _stats(), timer)
    d = row.model_dump()
    assert d["step"] == 5 and d["arm"] == "GRPO+VED"
    assert d["reward_mean"] == pytest.approx(0.5) and d["reward_std"] == pytest.approx(0.3)
    assert d["kscore_mean"] == pytest.approx(0.5) and d["unjudged"] == 1
    assert d["protocol_valid"] == 0.5  # t2 did not answer, t3 has a turn error
    assert (d["grpo_loss"], d["ved_loss"], d["kl_ref"], d["clip_low_frac"], d["clip_high_frac"], d["ved_tokens"],
            d["teacher_student_gap"]) == (-0.25, 0.125, 0.01, 0.1, 0.2, 6, 0.3)
    assert d["retrieval_hit_rate"] == 0.4 and d["bank_size"] == 1
    assert (d["new_experiences"], d["experiences_merged"], d["summary_errors"], d["guesses_passed_over"],
            d["teacher_errors"]) == (2, 1, 1, 3, 1)
    assert d["grad_norm"] == 1.5 and d["logp_grad_norm_grpo"] == 3.0 and d["logp_grad_norm_ved"] == 4.0
    assert d["t_rollouts"] == 1.5 and 0 <= d["seconds"] < 60
    assert d["tokens_per_s"] == pytest.approx((2 + 2 + 1 + 1 + 10) / d["seconds"], rel=0.05)
    assert "probe_gap" not in d and "processes" not in d
    one = steps.metrics_row(run, 0, trajs[:1], verdicts[:1], steps.Mined(), steps.Targets([], 0, 0, 0, []),
                            _stats(grad_norm=float("nan")), PhaseTimer())
    assert one.reward_std is None and one.get("grad_norm") is None and one.retrieval_hit_rate == 0.0
    hit = steps.metrics_row(run, 0, trajs[:1], verdicts[:1], steps.Mined(), steps.Targets([], 1, 3, 1, []), _stats(),
                            PhaseTimer())
    assert hit.retrieval_hit_rate == 1.0


def test_means_and_deviations_skip_missing_values():
    assert steps._mean([]) is None and steps._mean([None, None]) is None and steps._mean([None, 0.5, 1.0]) == 0.75
    assert steps._std([1.0]) is None and steps._std([None, 1.0]) is None
    assert steps._std([1.0, 3.0, None]) == pytest.approx(2 ** 0.5)


def test_the_metrics_row_of_replicas_and_of_a_probed_step(monkeypatch, tmp_path):
    from genevolve.training import probe as probes

    monkeypatch.setattr(probes, "mean_gap", lambda result: 0.42 if result == "probe" else None)
    run = SimpleNamespace(cfg=SimpleNamespace(arm="VED"), bank=ExperienceBank(tmp_path / "bank"),
                          procs=SimpleNamespace(world=2))
    row = steps.metrics_row(run, 0, [_traj("t1")], [_verdict("t1", 0.5)], steps.Mined(), steps.Targets([], 1, 2, 0, []),
                            _stats(replicas=[1.0, 1.0]), PhaseTimer(), probe_result="probe").model_dump()
    assert row["probe_gap"] == 0.42 and row["processes"] == 2 and row["replica_checksums"] == [1.0, 1.0]


def test_record_step_writes_the_row_the_probe_then_the_checkpoint_and_forgets_the_journal(monkeypatch, tmp_path):
    from genevolve.training import checkpoint, probe as probes
    from genevolve.experience import journal

    order = []
    monkeypatch.setattr(checkpoint, "save", lambda out, model, opt, step: order.append(("save", out, model, opt, step)))
    monkeypatch.setattr(probes, "write", lambda out, tok, step, req, result, use_ved, how: order.append(
        ("probe", out, tok, step, req, result, use_ved, how)))
    monkeypatch.setattr(journal, "forget", lambda path, step: order.append(("forget", path, step)))
    prog = _Progress()
    run = SimpleNamespace(out=tmp_path, progress=prog, pol=SimpleNamespace(tokenizer="tok", model="m"), model="m",
                          opt="o", probe_req="req", cfg=SimpleNamespace(use_ved=True, probe_request=None))
    steps.record_step(run, 2, MetricsRow(step=3), "result")
    assert prog.calls == [(3, "checkpoint")]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3]
    assert order == [("probe", tmp_path, "tok", 3, "req", "result", True, probes.AUTO), ("save", tmp_path, "m", "o", 3),
                     ("forget", tmp_path / journal.NAME, 3)]
    order.clear()
    run.cfg.probe_request = "bench-0001"
    steps.record_step(run, 3, MetricsRow(step=4), "result")
    assert order[0][-1] == probes.GIVEN
    order.clear()
    steps.record_step(run, 4, MetricsRow(step=5), None)
    assert [o[0] for o in order] == ["save", "forget"]


def test_the_summary_line_names_the_step_arm_scores_losses_and_bank():
    cfg = SimpleNamespace(steps=20, arm="GRPO+VED")
    row = MetricsRow(step=3, reward_mean=0.51234, kscore_mean=None, ved_loss=0.12345, grpo_loss=-0.5,
                     retrieval_hit_rate=0.25, bank_size=7, seconds=12.6)
    assert steps.summary_line(cfg, row) == ("step 3/20 [GRPO+VED] reward 0.512 kscore - ved 0.1235 grpo -0.5000 "
                                            "hit 0.25 bank 7 (13s)")


def test_a_resume_with_other_settings_is_refused_naming_them(tmp_path):
    from genevolve.training.evolve import EvolveConfig

    cfg = EvolveConfig(out=str(tmp_path), steps=2)
    steps.check_same_config(tmp_path, cfg)  # nothing saved: nothing to compare
    (tmp_path / "config.json").write_text(json.dumps({"seed": 5, "steps": 9, "micro_batch": 99, "gone": 1}))
    steps.check_same_config(tmp_path, cfg)  # no checkpoint and no start: a new run
    (tmp_path / "checkpoint").mkdir()
    with pytest.raises(ValueError) as err:
        steps.check_same_config(tmp_path, cfg)
    msg = str(err.value)
    assert msg == (f"{tmp_path} was trained with other settings, so it cannot be resumed with these (seed: 5 in the "
                   f"run, {cfg.seed!r} now). Use the run's settings, another --out, or --force-new to start it again")
    (tmp_path / "config.json").write_text(json.dumps({"seed": 5, "K": 1, "rollouts_per_prompt": 2}))
    with pytest.raises(ValueError, match=rf"\(rollouts_per_prompt: 2 in the run, {cfg.rollouts_per_prompt} now; seed: 5 in "
                                         rf"the run, {cfg.seed} now\)"):
        steps.check_same_config(tmp_path, cfg)
    (tmp_path / "config.json").write_text(json.dumps({"seed": cfg.seed, "steps": 9, "micro_batch": 99}))
    steps.check_same_config(tmp_path, cfg)  # steps and micro_batch may change on a resume
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON \(.*\): the run cannot be resumed; start a new one$"):
        steps.check_same_config(tmp_path, cfg)
    (tmp_path / "checkpoint").rmdir()
    from genevolve.training import checkpoint

    (tmp_path / checkpoint.START).write_text("{}")
    with pytest.raises(ValueError, match="not valid JSON"):
        steps.check_same_config(tmp_path, cfg)


def test_a_best_that_guessed_a_name_is_passed_over_and_the_pair_row_counts_it(tmp_path):
    from genevolve.records.schema import Observation, ToolCall

    guesser = _traj("t0", "r1")
    guesser.turns = [Turn(index=0, raw="x", tool_call=ToolCall(name="image_search", arguments={"query": "red Zorblax circles"}),
                          observation=Observation(tool="image_search", text="no results"))]
    groups = [[(guesser, _verdict("t0", 1.0)), (_traj("t1"), _verdict("t1", 0.9)), (_traj("t2"), _verdict("t2", 0.2))]]
    run = _mining_run(tmp_path)
    (tmp_path / "run-x").mkdir()
    mined = steps.mine_and_summarise(run, groups, step=0)
    assert [(r.best, r.worst, r.passed_over) for r in mined.pair_rows] == [("t1", "t2", 1)]
    assert json.loads((tmp_path / "run-x" / "pairs.jsonl").read_text())["passed_over"] == 1
