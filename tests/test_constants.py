"""The module-level constants that set results, tested where they act (mutation testing does not change
module-level constants, so a wrong gate, threshold or cap would otherwise pass every test)."""

from __future__ import annotations

import math

import pytest
import torch

from genevolve.agent import protocol
from genevolve.agent.guides import SLOTS
from genevolve.experience import mining
from genevolve.experience.bank import CAPACITY, ExperienceError, default_gate, validate_slots
from genevolve.training import losses


def test_the_gates_are_the_papers_for_raw_text_and_the_calibrated_one_for_situations():
    assert default_gate("request") == 0.84 and default_gate("situation") == 0.90


def test_a_slot_holds_400_characters_and_not_401():
    ok = {s: "x" * 400 for s in SLOTS}
    assert validate_slots(ok) == ok
    with pytest.raises(ExperienceError, match="401 characters"):
        validate_slots({**ok, SLOTS[0]: "x" * 401})


def test_the_bank_holds_500_experiences():
    assert CAPACITY == 500


def test_mining_needs_a_gap_of_0_20_and_keeps_at_most_8_pairs_a_step():
    assert (mining.DELTA_MIN, mining.MAX_PAIRS) == (0.20, 8)


def test_ved_selects_the_top_tenth_of_a_rows_tokens():
    mask = torch.ones(2, 20)
    mask[1, 5:] = 0  # 5 tokens: ceil(0.5) = 1
    gap = torch.arange(40, dtype=torch.float32).reshape(2, 20)
    sel = losses.select_top_tokens(gap, mask)
    assert losses.TOP_FRAC == 0.10 and sel[0].sum() == math.ceil(0.1 * 20) == 2 and sel[1].sum() == 1
    assert sel[0, 18:].sum() == 2 and sel[1, 4] == 1  # the largest gaps


def test_ved_clamps_the_gap_at_10_and_caps_the_ratio_at_2():
    logp = torch.tensor([[0.0]], requires_grad=True)
    far_teacher = torch.tensor([[-50.0]])  # l = 50, clamped to 10
    loss, _ = losses.ved_loss(logp, far_teacher, torch.tensor([[-5.0]]), torch.ones(1, 1), top_frac=1.0)
    k3 = math.exp(-10.0) - 1.0 + 10.0
    assert (losses.VED_CLAMP, losses.RHO_CAP) == (10.0, 2.0)
    assert float(loss) == pytest.approx(2.0 * k3)  # rho = exp(0 - (-5)) capped at 2
    loss.backward()
    assert float(logp.grad) == pytest.approx(2.0 * 10.0)  # min(rho, cap) * clamped l


def test_grpo_clips_at_0_20_below_and_0_28_above_with_beta_1e_3():
    import inspect

    d = inspect.signature(losses.grpo_loss).parameters
    assert (d["clip_low"].default, d["clip_high"].default, d["beta"].default) == (0.20, 0.28, 1e-3)
    logp_old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    _, up = losses.grpo_loss(logp, logp_old, None, torch.tensor([1.0]), torch.ones(1, 2))
    _, down = losses.grpo_loss(logp, logp_old, None, torch.tensor([-1.0]), torch.ones(1, 2))
    assert up.clip_high_frac == 0.5 and down.clip_low_frac == 0.5


def test_an_episode_has_at_most_11_turns_10_tool_calls_and_2_references():
    assert (protocol.MAX_TURNS, protocol.MAX_TOOL_CALLS, protocol.MAX_REFERENCES) == (11, 10, 2)
