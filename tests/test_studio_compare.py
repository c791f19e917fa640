"""Comparing runs in the studio: every sample counts, nothing is crowned across runs from one sample, intervals stay
inside [0, 1] or say the sample is too small, and different request sets are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from genevolve.records.runs import Run
from genevolve.records.schema import Program, Request, RunInfo, Trajectory, Verdict
from studio import StudioError
from studio.compare import (bootstrap_ci, case_rows, compare_runs, interval_text, largest_gaps, overall_text, samples_html,
                            sort_rows)


def run(name: str, rewards: dict[str, list[float | None]], tmp: Path, policy: str = "p") -> Run:
    """A run whose request ``r`` has one trajectory per reward, seeds 0, 1, 2, ..."""
    reqs = [Request(id=r, text=f"Draw request {r}", track="quality", category=f"cat-{r}") for r in rewards]
    trajs, verdicts = [], []
    for r, rs in rewards.items():
        for i, x in enumerate(rs):
            tid = f"{r}-s{i}"
            trajs.append(Trajectory(id=tid, request_id=r, request_text=f"Draw request {r}", seed=i,
                                    termination="answer" if x is not None else "max_rounds_reached",
                                    program=Program(gen_prompt="p") if x is not None else None))
            verdicts.append(Verdict(trajectory_id=tid, request_id=r, reward=x, kscore=x,
                                    failed=None if x is not None else "no program (max_rounds_reached)"))
    return Run(tmp / name, RunInfo(id=name, created="", command="rollout", policy=policy, k=len(next(iter(rewards.values()))),
                                   seed=0), reqs, trajs, [], verdicts)


def test_one_lucky_sample_is_not_crowned_against_a_run_with_a_better_mean(tmp_path):
    """The bug: the side-by-side view took each run's first trajectory and marked BEST / WORST across the two."""
    tiny = run("tiny", {"r1": [1.0, 0.0, 0.0, -0.016]}, tmp_path)  # mean 0.246, its first sample 1.000
    expert = run("expert", {"r1": [0.3, 0.5, 0.4, 0.392]}, tmp_path)  # mean 0.398
    html = samples_html({"tiny": tiny, "expert": expert}, "r1")
    assert html.count('data-traj=') == 8  # every sample of both runs
    assert "tiny · mean reward 0.246 over 4 sample(s)" in html and "expert · mean reward 0.398 over 4 sample(s)" in html
    # Best and worst are marked within each run, never one run's sample against the other's.
    assert html.count("ge-col ge-best") == 2 and html.count("ge-col ge-worst") == 2
    c = compare_runs({"tiny": tiny, "expert": expert})
    (row,) = c.rows
    assert row[:5] == ["r1", "cat-r1", 0.246, 0.398, 0.152] and row[-1] == 4
    lo, hi = (float(x) for x in row[5].strip("[]").split(", "))
    assert -1 <= lo < 0.152 < hi <= 1  # paired by seed: (0.3-1.0, 0.5-0, 0.4-0, 0.392+0.016)


def test_comparisons_use_every_seed_and_sample_pair_by_seed_and_sort(tmp_path):
    a = run("a", {"r1": [0.2, 0.4, 0.6], "r2": [0.9, 0.9, 0.9], "r3": [0.5, None, 0.5]}, tmp_path)
    b = run("b", {"r1": [0.3, 0.5, 0.7], "r2": [0.1, 0.1, 0.1], "r3": [0.5, 0.5, 0.6]}, tmp_path)
    c = compare_runs({"a": a, "b": b})
    by = {r[0]: r for r in c.rows}
    assert by["r1"][2:5] == [0.4, 0.5, 0.1] and by["r1"][5] == "[+0.100, +0.100]" and by["r1"][6] == 3
    assert by["r3"][2] == 0.5 and by["r3"][6] == 2 and by["r3"][5] == "n=2: too small"  # the unjudged sample is left out
    assert [r[0] for r in sort_rows(c.rows, 4)] == ["r1", "r3", "r2"]
    assert [r[0] for r in sort_rows(c.rows, 4, descending=False)] == ["r2", "r3", "r1"]
    assert c.overall["delta"] == pytest.approx((0.1 - 0.8 + (0.5333333 - 0.5)) / 3, abs=1e-6)
    assert "Δ (b − a)" in overall_text(c) and "bootstrap interval over requests" in overall_text(c)
    kc = compare_runs({"a": a, "b": b}, metric="kscore")
    assert kc.rows == c.rows  # kscore equals reward in these records
    with pytest.raises(StudioError, match="two or more"):
        compare_runs({"a": a})
    with pytest.raises(StudioError, match="reward or kscore"):
        compare_runs({"a": a, "b": b}, metric="F")


def test_different_request_sets_are_intersected_and_named(tmp_path):
    a = run("a", {f"r{i}": [0.5] for i in range(24)}, tmp_path)
    b = run("b", {f"r{i}": [0.6] for i in range(12)}, tmp_path)
    c = compare_runs({"a": a, "b": b})
    assert len(c.requests) == 12 and len(c.only["a"]) == 12 and not c.only["b"]
    assert "different requests" in c.warning and "a: 12 left out" in c.warning
    assert not compare_runs({"a": b, "b": b}).warning
    with pytest.raises(StudioError, match="share no request"):
        compare_runs({"a": a, "c": run("c", {"x": [0.1]}, tmp_path)})


def test_intervals_stay_in_range_or_say_the_sample_is_too_small():
    assert interval_text(0.5, 2.151, 2) == "0.500 (n=2: too small for an interval)"  # the two-seed "± 2.151"
    assert interval_text(0.95, 0.2, 3) == "0.950 [0.750, 1.000]" and interval_text(0.05, 0.2, 3) == "0.050 [0.000, 0.250]"
    assert interval_text(0.4, None, 1) == "0.400" and interval_text(None, None, 3) == "–"
    assert bootstrap_ci([0.1, 0.2]) is None
    lo, hi = bootstrap_ci([1.0, 1.0, 0.0, 1.0, 1.0])
    assert 0.0 <= lo <= hi <= 1.0 and bootstrap_ci([1.0, 1.0, 0.0, 1.0, 1.0]) == (lo, hi)  # seeded: the same twice
    assert bootstrap_ci([0.3] * 5) == (0.3, 0.3)


def test_a_runs_cases_filter_sort_and_largest_gaps(tmp_path):
    r = run("a", {"r1": [0.9, 0.1, None], "r2": [0.5, 0.45, 0.4], "r3": [1.0, 1.0, 0.2]}, tmp_path)
    rows = case_rows(r, sort="reward (high first)")
    assert [x[0] for x in rows[:2]] == ["r3-s0", "r3-s1"] and rows[-1][3] is None  # blanks last
    assert [x[0] for x in case_rows(r, termination="max_rounds_reached")] == ["r1-s2"]
    assert [x[0] for x in case_rows(r, failure="no program")] == ["r1-s2"]
    assert {x[1] for x in case_rows(r, category="cat-r2")} == {"r2"}
    with pytest.raises(StudioError, match="sort by one of"):
        case_rows(r, sort="colour")
    gaps = largest_gaps(r)
    assert [g[0] for g in gaps] == ["r1", "r3", "r2"] and gaps[0][2:] == [0.9, 0.1, 0.8, 2]
