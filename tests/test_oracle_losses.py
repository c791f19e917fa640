"""Losses against a second, plain-Python implementation written from DESIGN.md section 1 (the oracle).

Every expected value here is computed token by token with ``math``, never by the code under test.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from genevolve.training.losses import combined_loss, group_advantages, grpo_loss, masked_mean, select_top_tokens, ved_loss


def _top(gaps: list[float], mask: list[float], frac: float) -> set[int]:
    """Indices of the ceil(frac * n) masked tokens with the largest gap (at least one when any is masked)."""
    idx = [i for i, m in enumerate(mask) if m > 0]
    if not idx:
        return set()
    k = max(1, math.ceil(frac * len(idx)))
    return set(sorted(idx, key=lambda i: -gaps[i])[:k])


def _ved_oracle(lp, lq, lold, mask, frac=0.10, clamp=10.0, cap=2.0):
    """(loss, d loss / d log p per token, selected, mean |gap| over selected, share of capped ratios)."""
    rows = []
    for b in range(len(lp)):
        sel = _top([abs(q - p) for p, q in zip(lp[b], lq[b])], mask[b], frac)
        rows += [(b, t) for t in sorted(sel)]
    grad = [[0.0] * len(lp[0]) for _ in lp]
    if not rows:
        return 0.0, grad, 0, 0.0, 0.0
    total = gaps = capped = 0.0
    for b, t in rows:
        ell = max(-clamp, min(clamp, lp[b][t] - lq[b][t]))
        rho = min(math.exp(lp[b][t] - lold[b][t]), cap)
        total += rho * (math.exp(-ell) - 1.0 + ell)
        grad[b][t] = rho * ell / len(rows)
        gaps += abs(lq[b][t] - lp[b][t])
        capped += rho >= cap
    return total / len(rows), grad, len(rows), gaps / len(rows), capped / len(rows)


def _tensors(*rows):
    return [torch.tensor(r, dtype=torch.float64) for r in rows]


def test_masked_mean_divides_by_the_masked_count_and_is_zero_on_an_empty_mask():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(masked_mean(x, torch.tensor([1.0, 0.0, 1.0, 0.0]))) == 2.0
    assert float(masked_mean(x, torch.tensor([0.0, 0.0, 0.0, 1.0]))) == 4.0  # one token: divided by 1
    assert float(masked_mean(x, torch.zeros(4))) == 0.0


def test_group_advantages_match_hand_computed_population_z_scores():
    rewards = [[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 0.0, 1.0]]
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float32))
    assert adv.dtype == torch.float32 and adv.shape == (3, 4)
    for row, got in zip(rewards, adv.tolist()):
        m = sum(row) / len(row)
        sd = math.sqrt(sum((r - m) ** 2 for r in row) / len(row))  # population std (unbiased=False)
        want = [0.0] * len(row) if sd == 0 else [(r - m) / (sd + 1e-6) for r in row]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # a constant group: exact zeros
    assert group_advantages(torch.tensor([[2.0, 2.0]]), eps=0.5).tolist() == [[0.0, 0.0]]
    got = group_advantages(torch.tensor([[0.0, 2.0]]), eps=1.0).tolist()[0]  # std 1: (r - 1) / (1 + 1)
    assert got == pytest.approx([-0.5, 0.5])


def test_select_top_tokens_matches_a_sorted_reference_for_many_masks_and_fractions():
    rng = random.Random(0)
    for trial in range(40):
        B, T = rng.randint(1, 4), rng.randint(1, 17)
        gaps = [[rng.uniform(-5, 5) for _ in range(T)] for _ in range(B)]
        mask = [[float(rng.random() < 0.6) for _ in range(T)] for _ in range(B)]
        if trial % 5 == 0:
            mask[0] = [0.0] * T
            mask[0][rng.randrange(T)] = 1.0  # exactly one masked token
        frac = rng.choice([0.01, 0.1, 0.25, 0.5, 0.99, 1.0])
        sel = select_top_tokens(torch.tensor(gaps), torch.tensor(mask), frac)
        for b in range(B):
            want = _top(gaps[b], mask[b], frac)
            assert sel[b].tolist() == [1.0 if t in want else 0.0 for t in range(T)], (trial, b)


def test_select_top_tokens_default_fraction_is_ten_percent_and_never_picks_unmasked_tokens():
    gap = torch.tensor([[9.0, 8.0] + [float(i) for i in range(21)]])
    mask = torch.ones(1, 23)
    mask[0, :2] = 0  # the two largest gaps are not assistant tokens
    sel = select_top_tokens(gap, mask)
    assert sel[0].tolist() == [0.0] * 20 + [1.0] * 3  # ceil(0.1 * 21) = 3 tokens, the three largest masked gaps
    assert select_top_tokens(gap, torch.zeros(1, 23)).sum() == 0


@pytest.mark.parametrize("seed", range(4))
def test_ved_loss_gradient_and_stats_match_the_oracle(seed):
    rng = random.Random(seed)
    B, T = 3, 12
    lp = [[rng.uniform(-6, 0) for _ in range(T)] for _ in range(B)]
    lq = [[p + rng.choice([-1, 1]) * rng.uniform(0, 14) for p in row] for row in lp]  # gaps of both signs, some clamped
    lold = [[p - rng.uniform(-1.5, 1.5) for p in row] for row in lp]  # ratios on both sides of the cap
    mask = [[float(rng.random() < 0.8) for _ in range(T)] for _ in range(B)]
    frac, clamp, cap = rng.choice([(0.1, 10.0, 2.0), (0.3, 3.0, 1.5), (0.5, 10.0, 2.0)])
    want, grad, n, gap, capped = _ved_oracle(lp, lq, lold, mask, frac, clamp, cap)
    p, q, old, m = _tensors(lp, lq, lold, mask)
    p.requires_grad_()
    if (frac, clamp, cap) == (0.1, 10.0, 2.0):
        loss, stats = ved_loss(p, q, old, m)  # the defaults are the paper's
    else:
        loss, stats = ved_loss(p, q, old, m, top_frac=frac, clamp=clamp, rho_cap=cap)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(want, rel=1e-9)
    assert p.grad.tolist() == [pytest.approx(row, rel=1e-9, abs=1e-12) for row in grad]
    assert (stats.loss, stats.selected, stats.mean_gap, stats.rho_capped) == (pytest.approx(want), n, pytest.approx(gap), pytest.approx(capped))


def test_ved_selects_the_largest_gap_in_size_even_when_the_teacher_is_less_confident():
    """Top 10 % by |log q - log p|: a token where the teacher is far less sure (negative gap) must be chosen."""
    lp = [[-1.0] * 10]
    lq = [[-1.0] * 10]
    lq[0][2] = -7.0  # log q - log p = -6: the largest gap in size
    lq[0][5] = 0.5  # +1.5: the largest signed gap
    p, q = _tensors(lp, lq)
    p.requires_grad_()
    loss, stats = ved_loss(p, q, p.detach(), torch.ones(1, 10, dtype=torch.float64))
    loss.backward()
    assert stats.selected == 1 and stats.mean_gap == pytest.approx(6.0)
    assert float(loss.detach()) == pytest.approx(math.exp(-6.0) - 1 + 6.0)  # l = 6, rho = 1
    assert [i for i, g in enumerate(p.grad[0].tolist()) if g != 0] == [2]


def test_ved_on_an_empty_mask_is_zero_with_zero_stats():
    p = torch.zeros(2, 3, requires_grad=True)
    loss, stats = ved_loss(p, torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    assert float(loss.detach()) == 0.0 and (stats.selected, stats.mean_gap, stats.rho_capped) == (0, 0.0, 0.0)


def test_ved_counts_a_ratio_exactly_at_the_cap_as_capped():
    p, q = torch.zeros(1, 2), torch.full((1, 2), -1.0)
    old = torch.tensor([[-3.0, 0.0]])  # rho = e^3 capped to exactly 2.0; rho = 1
    loss, stats = ved_loss(p, q, old, torch.ones(1, 2), top_frac=1.0)
    assert stats.rho_capped == 0.5
    k3 = math.exp(-1.0) - 1 + 1.0
    assert float(loss.detach()) == pytest.approx((2.0 * k3 + 1.0 * k3) / 2)


def _grpo_oracle(lp, lold, lref, adv, mask, cl, ch, beta):
    n = sum(sum(r) for r in mask) or 1.0
    tot = pg_sum = kl_sum = low = high = 0.0
    grad = [[0.0] * len(lp[0]) for _ in lp]
    for b in range(len(lp)):
        for t in range(len(lp[0])):
            if not mask[b][t]:
                continue
            r = math.exp(lp[b][t] - lold[b][t])
            a = adv[b]
            un, cl_ = r * a, min(max(r, 1 - cl), 1 + ch) * a
            pg = -min(un, cl_)
            kl = 0.0
            if lref is not None and beta:
                d = lref[b][t] - lp[b][t]
                kl = math.exp(d) - d - 1.0
            tot, pg_sum, kl_sum = tot + pg + beta * kl, pg_sum + pg, kl_sum + kl
            low += r < 1 - cl and a < 0
            high += r > 1 + ch and a > 0
            g_pg = -r * a if un <= cl_ else 0.0  # the clipped branch is constant in log p
            g_kl = (1.0 - math.exp(lref[b][t] - lp[b][t])) if lref is not None and beta else 0.0
            grad[b][t] = (g_pg + beta * g_kl) / n
    return tot / n, pg_sum / n, kl_sum / n, low / n, high / n, grad


@pytest.mark.parametrize("seed", range(4))
def test_grpo_loss_gradient_and_stats_match_the_oracle(seed):
    rng = random.Random(100 + seed)
    B, T = 4, 6
    lp = [[rng.uniform(-3, 0) for _ in range(T)] for _ in range(B)]
    lold = [[p + rng.uniform(-0.6, 0.6) for p in row] for row in lp]  # ratios inside and outside the clip range
    lref = [[p + rng.uniform(-1, 1) for p in row] for row in lp]
    adv = [rng.uniform(-2, 2) for _ in range(B)]
    mask = [[float(rng.random() < 0.7) for _ in range(T)] for _ in range(B)]
    p, old, ref, a, m = _tensors(lp, lold, lref, adv, mask)
    p.requires_grad_()
    if seed % 2:
        cl, ch, beta = 0.1, 0.4, 0.05
        loss, stats = grpo_loss(p, old, ref, a, m, clip_low=cl, clip_high=ch, beta=beta)
    else:
        cl, ch, beta = 0.20, 0.28, 1e-3  # the defaults
        loss, stats = grpo_loss(p, old, ref, a, m)
    loss.backward()
    want, pg, kl, low, high, grad = _grpo_oracle(lp, lold, lref, adv, mask, cl, ch, beta)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-9)
    assert (stats.loss, stats.pg_loss, stats.kl) == (pytest.approx(want), pytest.approx(pg), pytest.approx(kl))
    assert (stats.clip_low_frac, stats.clip_high_frac) == (pytest.approx(low), pytest.approx(high))
    assert p.grad.tolist() == [pytest.approx(row, rel=1e-9, abs=1e-12) for row in grad]


def test_grpo_without_reference_or_with_zero_beta_has_no_kl():
    p, old, ref = torch.zeros(1, 2), torch.full((1, 2), -0.1), torch.full((1, 2), -2.0)
    for r, beta in ((None, 1e-3), (ref, 0.0)):
        loss, stats = grpo_loss(p, old, r, torch.tensor([1.0]), torch.ones(1, 2), beta=beta)
        assert stats.kl == 0.0
        assert float(loss.detach()) == pytest.approx(-math.exp(0.1))  # ratio e^0.1 inside the clip range, advantage 1


def test_grpo_clip_fractions_count_strictly_outside_the_range():
    """With both clip widths 0, a ratio of exactly 1 sits on both edges: neither clipped low nor high."""
    p = torch.zeros(2, 3)
    old = torch.tensor([[0.0, 0.5, -0.5], [0.0, 0.5, -0.5]])  # ratios 1, e^-0.5, e^0.5
    adv = torch.tensor([-1.0, 1.0])
    _, stats = grpo_loss(p, old, None, adv, torch.ones(2, 3), clip_low=0.0, clip_high=0.0)
    assert stats.clip_low_frac == pytest.approx(1 / 6)  # row 0, ratio e^-0.5 < 1 with a negative advantage
    assert stats.clip_high_frac == pytest.approx(1 / 6)  # row 1, ratio e^0.5 > 1 with a positive advantage


def test_combined_loss_weights_ved_by_two_by_default():
    g, v = torch.tensor(0.25), torch.tensor(1.5)
    assert float(combined_loss(g, v)) == 0.25 + 2.0 * 1.5
    assert float(combined_loss(g, v, lambda_ved=0.5)) == 0.25 + 0.75
    assert float(combined_loss(None, v)) == 3.0 and float(combined_loss(g, None)) == 0.25
    with pytest.raises(ValueError):
        combined_loss(None, None)


def test_group_advantages_zero_a_constant_float64_group_whose_mean_misses_it():
    """0.1 three times sums to 0.30000000000000004 in float64, so its mean is not 0.1: the constant group must
    still get exact zeros, next to a group that is not constant."""
    r = torch.tensor([[0.1, 0.1, 0.1], [0.0, 0.5, 1.0]], dtype=torch.float64)
    assert float(r[0].mean()) != 0.1  # the premise: the residue exists
    adv = group_advantages(r)
    assert adv[0].tolist() == [0.0, 0.0, 0.0]
    sd = math.sqrt((0.25 + 0 + 0.25) / 3)
    assert adv[1].tolist() == pytest.approx([-0.5 / (sd + 1e-6), 0.0, 0.5 / (sd + 1e-6)])


def test_grpo_clip_fractions_ignore_tokens_with_a_zero_advantage():
    p = torch.zeros(1, 2)
    old = torch.tensor([[0.5, -0.5]])  # ratios e^-0.5 (below 0.8) and e^0.5 (above 1.28)
    _, stats = grpo_loss(p, old, None, torch.tensor([0.0]), torch.ones(1, 2))
    assert (stats.clip_low_frac, stats.clip_high_frac) == (0.0, 0.0)


def test_combined_loss_says_why_it_fails():
    with pytest.raises(ValueError, match="^no loss to combine$"):
        combined_loss(None, None)
