"""The one evaluation every caller uses: cases per seed and sample, each seed aggregated, then mean ± 95 % CI."""

from __future__ import annotations

import math
import statistics

import pytest

from genevolve.agent.expert import ExpertNoise, ExpertPolicy
from genevolve.agent.loop import Tools
from genevolve.evaluation.bench import SandboxScorer, evaluate, over_seeds
from genevolve.records.schema import ImageStore


def _agg(k_all, k_track, n=2, failed=0, missing=0):
    row = lambda k: {"kscore": k, "F": 1.0, "V": None, "T": None, "A": 0.5, "r_text": 0.0, "reward": k,  # noqa: E731
                     "n": n, "failed": failed, "missing": missing}
    return {"overall": {"all": row(k_all)}, "track": {t: row(k) for t, k in k_track.items()}}


def test_over_seeds_is_the_mean_and_students_t_interval_of_the_seed_values():
    per_seed = {0: _agg(0.2, {"quality": 0.4}), 1: _agg(0.5, {"quality": 0.1, "knowledge": 0.9}, failed=1),
                2: _agg(0.8, {"quality": 0.7}, missing=2)}
    by = over_seeds(per_seed, ("overall", "track"))
    k = by["overall"]["all"]["kscore"]
    assert k["per_seed"] == [0.2, 0.5, 0.8] and k["mean"] == pytest.approx(0.5)
    assert k["ci95"] == pytest.approx(4.302653 * statistics.stdev([0.2, 0.5, 0.8]) / math.sqrt(3), rel=1e-5)
    assert by["overall"]["all"]["V"] == {"mean": None, "ci95": None, "per_seed": []}  # undefined at every seed
    assert by["overall"]["all"]["failed"] == 1 and by["overall"]["all"]["missing"] == 2
    # A group that only one seed has: its one value, no interval.
    assert by["track"]["knowledge"]["kscore"] == {"mean": 0.9, "ci95": None, "per_seed": [0.9]}
    assert by["track"]["quality"]["kscore"]["per_seed"] == [0.4, 0.1, 0.7]


def test_evaluate_runs_every_seed_and_sample_and_aggregates_each_seed(world, tmp_path):
    reqs = world.split("bench")[::40][:3]
    seen = []
    ev = evaluate(reqs, ExpertPolicy(world, ExpertNoise.cold_start()), Tools.for_world(world), SandboxScorer(world),
                  ImageStore(tmp_path), [0, 1], samples=2, on_case=seen.append)
    assert [(c.seed, c.request.id, c.sample) for c in ev.cases] == [(s, r.id, i) for s in (0, 1) for r in reqs for i in (0, 1)]
    assert seen == ev.cases and sorted(ev.per_seed) == [0, 1]
    for s in (0, 1):
        ks = [c.verdict.kscore for c in ev.cases if c.seed == s]
        assert ev.per_seed[s]["overall"]["all"]["kscore"] == pytest.approx(statistics.fmean(ks))
    k = ev.by["overall"]["all"]["kscore"]
    assert k["per_seed"] == [ev.per_seed[0]["overall"]["all"]["kscore"], ev.per_seed[1]["overall"]["all"]["kscore"]]
    assert k["mean"] == pytest.approx(statistics.fmean(k["per_seed"]))
    assert set(ev.protocol_valid["per_seed"]) == {0, 1} and ev.by["overall"]["all"]["n"] == 6
