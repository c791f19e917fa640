"""The report's aggregation: every seed averaged, the table's numbers and deltas, teacher-minus-student gains paired
by seed, and identical arms, against hand-worked values."""

from __future__ import annotations

import math

import pytest

import genevolve.evaluation.report as report
from genevolve.evaluation.report import _fmt, _n_seeds, _student_vs_teacher, identical_arms, table
from genevolve.records.schema import Trajectory, Turn

T975_2 = 4.302652729911275  # Student's t, 97.5 %, two degrees of freedom (printed tables)


def _sd(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_evaluate_averages_every_seed(world):
    reqs = [r for r in world.split("bench") if r.track == "knowledge"][:2] + \
           [r for r in world.split("bench") if r.track != "knowledge"][:1]
    out = report.evaluate(world, None, reqs, seeds=(0, 1, 2))
    recs = out["records"]
    assert [(r["seed"], r["request"], r["sample"]) for r in recs] == [(s, q.id, 0) for s in (0, 1, 2) for q in reqs]
    per_seed = [sum(r["verdict"].kscore for r in recs if r["seed"] == s) / 3 for s in (0, 1, 2)]
    assert len(set(per_seed)) > 1  # the premise: the seeds differ
    k = out["summary"]["overall"]["all"]["kscore"]
    assert k["per_seed"] == pytest.approx(per_seed)
    assert k["mean"] == pytest.approx(sum(per_seed) / 3)
    assert k["ci95"] == pytest.approx(T975_2 * _sd(per_seed) / math.sqrt(3))
    assert out["summary"]["overall"]["all"]["per_seed"] == pytest.approx(per_seed)
    know = [sum(r["verdict"].kscore for r in recs if r["seed"] == s and r["request"] in {q.id for q in reqs[:2]}) / 2
            for s in (0, 1, 2)]
    assert out["summary"]["track"]["knowledge"]["per_seed"] == pytest.approx(know)
    assert set(out["summary"]) == {"overall", "track"}
    one = report.evaluate(world, None, reqs[:1])
    assert one["summary"]["overall"]["all"]["kscore"]["ci95"] is None and len(one["records"]) == 1


def test_fmt_shows_a_ci_only_when_there_is_one():
    assert _fmt({"mean": 0.12345, "ci95": 0.0456}) == "0.123 ± 0.046"
    assert _fmt({"mean": 0.5, "ci95": None}) == "0.500" and _fmt({"mean": 0.5}) == "0.500"
    assert _fmt({"mean": 0.5, "ci95": float("nan")}) == "0.500"
    assert _fmt({"mean": None, "ci95": 0.1}) == "-" and _fmt({"mean": float("nan"), "ci95": 0.1}) == "-"


def _summary(k_all, tracks, seeds=1, ci=None):
    cell = lambda m: {"mean": m, "ci95": ci, "per_seed": [m] * seeds}  # noqa: E731
    row = lambda m: {d: cell(m if d in ("kscore", "F") else 0.5) for d in ("kscore", "F", "V", "T", "A")}  # noqa: E731
    return {"summary": {"overall": {"all": row(k_all)}, "track": {t: row(k) for t, k in tracks.items()}}, "records": []}


def test_table_rows_deltas_and_note():
    res = {"before": _summary(0.4, {"quality": 0.5, "knowledge": 0.3}),
           "after": _summary(0.45, {"quality": 0.25, "text": 0.9})}
    assert table(res) == "\n".join([
        "| policy | track | kscore | F | V | T | A | Δ KScore |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        "| before | all | 0.400 | 0.400 | 0.500 | 0.500 | 0.500 |  |",
        "| before | knowledge | 0.300 | 0.300 | 0.500 | 0.500 | 0.500 |  |",
        "| before | quality | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 |  |",
        "| after | all | 0.450 | 0.450 | 0.500 | 0.500 | 0.500 | +0.050 |",
        "| after | quality | 0.250 | 0.250 | 0.500 | 0.500 | 0.500 | -0.250 |",
        "| after | text | 0.900 | 0.900 | 0.500 | 0.500 | 0.500 |  |",
        "", "One seed, no CI. Δ KScore: change from before on the same requests."])
    three = table({"a": _summary(None, {}, seeds=3, ci=0.01), "b": _summary(0.2, {}, seeds=2, ci=0.01)}, dims=("kscore",))
    assert three.splitlines()[2:4] == ["| a | all | - |  |", "| b | all | 0.200 ± 0.010 |  |"]
    assert three.endswith("\n\nMean ± 95 % CI over 3 seeds. Δ KScore: change from a on the same requests.")
    assert _n_seeds({"a": _summary(0.1, {}, seeds=2), "b": _summary(0.1, {}, seeds=5)}) == 5 and _n_seeds({}) == 0
    assert table({}).endswith("One seed, no CI. Δ KScore: change from - on the same requests.")


def _records(raws):
    return [{"trajectory": Trajectory(id=f"t{i}", request_id="r", request_text="x", turns=[Turn(index=0, raw=raw)])}
            for i, raw in enumerate(raws)]


def _run(per_seed, raws):
    vals = [x for x in per_seed if x is not None]
    cell = {"mean": sum(vals) / len(vals) if vals else None, "ci95": None, "per_seed": per_seed}
    return {"summary": {"overall": {"all": {"kscore": cell, "F": cell, "V": cell, "T": cell, "A": cell, "per_seed": per_seed}},
                        "track": {}}, "records": _records(raws)}


def test_teacher_gain_is_paired_by_seed(monkeypatch):
    calls = []

    def fake(world, policy, requests, seeds, guides=None, progress=None, samples=1):
        calls.append((guides, tuple(seeds), samples))
        return _run([0.2, 0.5, 0.3, None], ["a", "b"]) if guides is None else _run([0.4, 0.6, 0.2, 0.9], ["a", "c"])

    monkeypatch.setattr(report, "evaluate", fake)
    lines, data = _student_vs_teacher(None, None, [], {"r": "guide"}, [0, 1, 2, 3], 2, None)
    gains = [0.4 - 0.2, 0.6 - 0.5, 0.2 - 0.3]  # the last seed has no student value: left out
    assert calls == [(None, (0, 1, 2, 3), 2), ({"r": "guide"}, (0, 1, 2, 3), 2)]
    assert data["gain"] == pytest.approx(sum(gains) / 3)
    assert data["gain_ci95"] == pytest.approx(T975_2 * _sd(gains) / math.sqrt(3)) and data["identical"] is False
    assert lines[-1] == f"Teacher minus student, paired by seed: {sum(gains) / 3:+.3f} ± {T975_2 * _sd(gains) / math.sqrt(3):.3f}."
    assert lines[1] == "" and lines[0].startswith("| policy |") and "| teacher | all |" in lines[0]
    assert set(data) == {"student (after)", "teacher", "identical", "gain", "gain_ci95"}


def test_teacher_with_one_seed_or_the_same_trajectories_or_the_same_scores(monkeypatch):
    runs = {None: _run([0.25], ["a"]), "one": _run([0.5], ["b"])}
    monkeypatch.setattr(report, "evaluate", lambda w, p, r, s, guides=None, progress=None, samples=1:
                        runs[None if guides is None else guides["r"]])
    lines, data = _student_vs_teacher(None, None, [], {"r": "one"}, [0], 1, None)
    assert lines[-1] == "Teacher minus student, paired by seed: +0.250 (one seed, no CI)."
    assert data["gain"] == 0.25 and data["gain_ci95"] is None
    runs["same"] = _run([0.9], ["a"])  # the same sampled turns: no teacher row whatever it scores
    lines, data = _student_vs_teacher(None, None, [], {"r": "same"}, [0], 1, None)
    assert data["identical"] is True and "teacher" in data and "gain" not in data and len(lines) == 1
    assert lines[0].startswith("With the guide the teacher wrote exactly the student's trajectories")
    runs["tie"] = _run([0.25], ["z"])
    lines, data = _student_vs_teacher(None, None, [], {"r": "tie"}, [0], 1, None)
    assert (data["identical"], data["gain"]) == (False, 0.0)
    assert lines == ["The teacher's trajectories differ from the student's but score exactly the same (KScore 0.250): "
                     "no separate teacher row."]


def test_identical_arms_pairs_runs_with_the_same_seed_and_fingerprint():
    runs = [{"arm": "grpo", "seed": 0, "eval_fingerprint": "f", "adapter": None, "policy_sha256": "1"},
            {"arm": "ved", "seed": 0, "eval_fingerprint": "f", "adapter": "x", "policy_sha256": "2"},
            {"arm": "both", "seed": 1, "eval_fingerprint": "f", "adapter": None, "policy_sha256": "3"},
            {"arm": "sft", "seed": 0, "eval_fingerprint": "g", "adapter": None, "policy_sha256": "4"},
            {"arm": "again", "seed": 0, "eval_fingerprint": "f", "adapter": None, "policy_sha256": "5"}]
    assert identical_arms(runs) == [
        {"seed": 0, "arms": ["grpo", "ved"], "sha256": ["1", "2"], "relative_distance": None},
        {"seed": 0, "arms": ["grpo", "again"], "sha256": ["1", "5"], "relative_distance": None},
        {"seed": 0, "arms": ["ved", "again"], "sha256": ["2", "5"], "relative_distance": None}]
    assert identical_arms([]) == []


def test_evaluate_passes_everything_to_the_one_evaluation_and_keeps_each_seeds_groups(world, monkeypatch):
    import genevolve.evaluation.bench as bench
    from genevolve.agent.loop import Tools
    from genevolve.evaluation.bench import Case, Evaluation, over_seeds
    from genevolve.records.schema import Request, Verdict

    seen = {}
    row = lambda k: {"kscore": k, "F": k, "V": k, "T": None, "A": k, "r_text": k, "reward": k, "n": 1, "failed": 0, "missing": 0}  # noqa: E731
    per_seed = {4: {"overall": {"all": row(0.5)}, "track": {"text": row(0.2)}}, 9: {"overall": {"all": row(0.7)}, "track": {}}}
    req = Request(id="q", text="q")
    traj = Trajectory(id="t", request_id="q", request_text="q")
    case = Case(4, 0, req, traj, None, Verdict(trajectory_id="t", request_id="q"))

    def spy(requests, policy, tools, scorer, store, seeds, **kw):
        seen.update(requests=requests, policy=policy, tools=tools, scorer=scorer, seeds=seeds, **kw)
        return Evaluation([case], per_seed, over_seeds(per_seed, kw["levels"]), {})

    monkeypatch.setattr(bench, "evaluate", spy)
    progress = [].append
    out = report.evaluate(world, "the-policy", [req], seeds=(4, 9), guides={"q": "g"}, params="p", progress=progress, samples=3)
    assert seen["requests"] == [req] and seen["policy"] == "the-policy" and isinstance(seen["tools"], Tools)
    assert seen["scorer"].world is world and seen["seeds"] == [4, 9]
    assert (seen["samples"], seen["params"], seen["guides"], seen["levels"], seen["progress"]) == (3, "p", {"q": "g"}, ("overall", "track"), progress)
    assert out["summary"]["track"]["text"]["per_seed"] == [0.2, None]  # a group one seed does not have
    assert out["summary"]["overall"]["all"]["per_seed"] == [0.5, 0.7]
    assert out["records"] == [{"seed": 4, "sample": 0, "request": "q", "trajectory": traj, "verdict": case.verdict}]


def test_teacher_and_student_are_evaluated_alike_and_undefined_scores_print_as_a_dash(monkeypatch):
    calls = []
    runs = {None: _run([None], ["a"]), "tie": _run([None], ["b"]), "dash": _run([0.5], ["c"])}

    def fake(world, policy, requests, seeds, guides=None, progress=None, samples=1):
        calls.append((world, policy, requests, progress))
        return runs[None if guides is None else guides["r"]]

    monkeypatch.setattr(report, "evaluate", fake)
    say = [].append
    lines, _ = _student_vs_teacher("W", "S", ["req"], {"r": "tie"}, [0], 1, say)
    assert calls == [("W", "S", ["req"], say)] * 2
    assert lines == ["The teacher's trajectories differ from the student's but score exactly the same (KScore -): "
                     "no separate teacher row."]
    lines, data = _student_vs_teacher("W", "S", ["req"], {"r": "dash"}, [0], 1, say)
    assert lines[-1] == "Teacher minus student, paired by seed: -." and data["gain"] is None
    runs["same"] = _run([0.1], ["a"])
    lines, _ = _student_vs_teacher("W", "S", ["req"], {"r": "same"}, [0], 1, say)
    assert lines == ["With the guide the teacher wrote exactly the student's trajectories here (the guide changed no "
                     "sampled token), so it scores the same: no separate teacher row."]


def test_identical_arms_measure_the_distance_between_their_adapters(monkeypatch):
    seen = []
    monkeypatch.setattr(report, "adapter_distance", lambda a, b: seen.append((a, b)) or 0.12345678)
    runs = [{"arm": "grpo", "seed": 0, "eval_fingerprint": "f", "adapter": "A", "policy_sha256": "1"},
            {"arm": "ved", "seed": 0, "eval_fingerprint": "f", "adapter": "B", "policy_sha256": "2"}]
    assert identical_arms(runs)[0]["relative_distance"] == 0.123457 and seen == [("A", "B")]
