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


def _premise(no_guide, gains, bank="B"):
    arms = {"no guide": {"kscore": sum(no_guide) / 3, "per_seed": no_guide}}
    for arm, per_seed in gains.items():
        arms[arm] = {"gain_over_no_guide": _gain(per_seed), "gain_by_track": {}}
    return {"policy": "p", "requests": 120, "seeds": "0,1,2", "bank": bank, "arms": arms, "gate": None}


def _ablation(sft, ved):
    def arm(per_seed):
        return {"overall": {"all": {"kscore": {"mean": sum(per_seed) / 3, "ci95": 0.1, "per_seed": per_seed}}},
                "track": {"quality": {"kscore": {"per_seed": per_seed}}}}

    return {"sft": arm(sft), "ved": arm(ved)}


def test_the_tiny_control_pairs_each_gain_of_the_two_policies_seed_by_seed():
    import tiny_control

    shipped = _premise([0.5, 0.5, 0.5], {"oracle guide": [0.3, 0.2, 0.25], "shuffled experience": [0.0, -0.1, 0.0]})
    control = _premise([0.6, 0.5, 0.4], {"oracle guide": [0.1, 0.1, 0.05], "shuffled experience": [0.0, 0.0, 0.0]})
    res = tiny_control.compare(shipped, control, _ablation([0.5, 0.5, 0.5], [0.6, 0.55, 0.6]),
                               _ablation([0.5, 0.4, 0.5], [0.5, 0.45, 0.5]))
    assert res["premise"]["no guide"]["shipped_minus_control"]["per_seed"] == pytest.approx([-0.1, 0.0, 0.1])
    assert res["premise"]["oracle guide"]["shipped_minus_control"]["per_seed"] == pytest.approx([0.2, 0.1, 0.2])
    assert "retrieved experience" not in res["premise"]  # an arm one of them lacks is left out, not invented
    ab = res["ablation"]
    assert ab["shipped"]["gain"]["per_seed"] == pytest.approx([0.1, 0.05, 0.1])
    assert ab["control"]["gain"]["per_seed"] == pytest.approx([0.0, 0.05, 0.0])
    assert ab["ved_gain_shipped_minus_control"]["mean"] == pytest.approx(0.2 / 3)
    with pytest.raises(ValueError, match="nothing to pair"):
        tiny_control.compare(shipped, control | {"bank": "other"}, None, None)


def test_the_arms_without_a_bank_shuffle_oracle_guides_and_the_own_arm_brings_its_own_baseline():
    every = list(premise.SHORT)
    plain = premise.plan_arms(None, None, every)
    assert list(plain) == ["no guide", "oracle guide", "shuffled experience"]
    assert plain["shuffled experience"][-2:] == ["--guide", "shuffled"]
    banked = premise.plan_arms("B", 0.8, every)
    assert banked[premise.TRAIN_BASE] == ["--split", "evolve"]
    assert banked["own experience (training)"] == ["--split", "evolve", "--guide", "bank:B", "--gate", "0.8"]
    assert "--leave-own-out" in banked["retrieved experience"] and banked["shuffled experience"][-1] == "shuffled:B"
    assert premise.TRAIN_BASE not in premise.plan_arms("B", None, ["none", "oracle"])


def test_the_premise_table_puts_each_policy_in_a_column_and_marks_an_arm_it_lacks():
    import premise_table

    a = _premise([0.5, 0.5, 0.5], {"oracle guide": [0.3, 0.2, 0.25], "shuffled experience": [0.0, -0.1, 0.0]})
    a["gate"] = {"passes": True, "oracle_worst_seed_gain": 0.2, "shuffled_mean_gain": -0.033}
    b = _premise([0.6, 0.5, 0.4], {"oracle guide": [0.1, 0.0, 0.05]})
    b["policy"] = "q"
    b["no_guide_vs"] = {"other_policy": "p", "difference": {"mean": 0.0, "ci95": 0.1, "per_seed": [0.1, 0.0, -0.1]}}
    text = premise_table.table([a, b], ["p", "q"])
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in text.splitlines() if line.startswith("| ")}
    assert rows["oracle guide, gain"][0].startswith("+0.250 ± 0.100") and "seeds +0.300 / +0.200 / +0.250" in rows["oracle guide, gain"][0]
    assert rows["oracle guide, gain"][1].startswith("+0.050")
    assert rows["shuffled experience, gain"][1].strip(" |") == "-"  # q never ran it: marked, not invented
    assert rows["premise gate"][0].startswith("passes") and rows["premise gate"][1].strip(" |") == "-"
    assert "vs `p`" in rows["no guide, minus the compared policy's (paired)"][1]
    assert rows["no guide, KScore"][0].startswith("0.500")
