"""The premise benchmark's verdicts (benchmarks/premise.py), without running a policy: the gate fixed in advance
and the pairing of two cold starts' unguided scores."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import premise  # noqa: E402


def _gain(per_seed):
    return {"mean": sum(per_seed) / len(per_seed), "ci95": 0.1, "per_seed": per_seed}


def _rows(oracle, shuffled):
    return {"no guide": {"gain_over_no_guide": None}, "oracle guide": {"gain_over_no_guide": _gain(oracle)},
            "shuffled experience": {"gain_over_no_guide": _gain(shuffled)}}


def test_the_gate_needs_the_oracle_on_every_seed_and_a_shuffled_guide_that_does_not_help():
    assert premise.gate_verdict(_rows([0.06, 0.05, 0.30], [-0.01, 0.0, 0.01]))["passes"]
    one_weak_seed = premise.gate_verdict(_rows([0.30, 0.30, 0.049], [-0.02, -0.02, -0.02]))
    assert not one_weak_seed["passes"] and one_weak_seed["oracle_worst_seed_gain"] == pytest.approx(0.049)
    presence_helps = premise.gate_verdict(_rows([0.3, 0.3, 0.3], [0.0, 0.0, 0.003]))
    assert not presence_helps["passes"] and presence_helps["shuffled_mean_gain"] == pytest.approx(0.001)
    assert premise.gate_verdict({"no guide": {}, "oracle guide": {"gain_over_no_guide": _gain([0.1])}}) is None
    unpaired = _rows([0.1], [0.0])
    unpaired["oracle guide"]["gain_over_no_guide"] = {"mean": None, "ci95": None, "per_seed": None}
    assert premise.gate_verdict(unpaired) is None


def _result(policy, per_seed, track_per_seed, requests=120, seeds="0,1,2"):
    arm = {"kscore": sum(per_seed) / len(per_seed), "per_seed": per_seed}
    full = {"by": {"track": {t: {"kscore": {"per_seed": v}} for t, v in track_per_seed.items()}}}
    return {"policy": policy, "requests": requests, "seeds": seeds, "arms": {"no guide": arm}, "full": {"no guide": full}}


def test_two_cold_starts_unguided_scores_are_paired_seed_by_seed():
    mine = _result("guided", [0.50, 0.52, 0.48], {"knowledge": [0.4, 0.4, 0.4], "quality": [0.6, 0.6, 0.5]})
    other = _result("guide-free", [0.51, 0.50, 0.50], {"knowledge": [0.3, 0.4, 0.5], "quality": [0.6, 0.6, 0.6]})
    c = premise.compare_no_guide(mine, other, 3)
    assert c["difference"]["per_seed"] == pytest.approx([-0.01, 0.02, -0.02])
    assert c["difference"]["mean"] == pytest.approx(-0.01 / 3)
    assert c["difference_by_track"]["knowledge"]["mean"] == pytest.approx(0.0)
    assert c["difference_by_track"]["quality"]["mean"] == pytest.approx(-0.1 / 3)
    with pytest.raises(ValueError, match="nothing to pair"):
        premise.compare_no_guide(mine, other | {"seeds": "0,1"}, 3)
    with pytest.raises(ValueError, match="nothing to pair"):
        premise.compare_no_guide(mine, other | {"requests": 60}, 3)
