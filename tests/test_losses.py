"""Loss maths: zero when teacher equals student, masks respected, gradients checked on a small vocabulary."""

from __future__ import annotations

import pytest
import torch

from genevolve.training.losses import (
    RHO_CAP,
    VED_CLAMP,
    combined_loss,
    group_advantages,
    grpo_loss,
    select_top_tokens,
    ved_loss,
)


def test_ved_is_zero_when_teacher_equals_student():
    logp = torch.randn(3, 7).log_softmax(-1).requires_grad_()
    mask = torch.ones(3, 7)
    loss, stats = ved_loss(logp, logp.detach().clone(), logp.detach().clone(), mask, top_frac=1.0)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert torch.allclose(logp.grad, torch.zeros_like(logp.grad), atol=1e-7)


def test_masks_are_respected():
    logp = torch.randn(2, 6).requires_grad_()
    logq = torch.randn(2, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.float32)
    loss, _ = ved_loss(logp, logq, logp.detach(), mask, top_frac=1.0)
    loss.backward()
    assert torch.all(logp.grad[mask == 0] == 0) and torch.any(logp.grad[mask == 1] != 0)
    # Changing unmasked positions changes nothing.
    logq2 = logq.clone()
    logq2[mask == 0] += 5.0
    assert float(ved_loss(logp, logq2, logp.detach(), mask, top_frac=1.0)[0]) == pytest.approx(float(loss))
    adv = torch.tensor([1.0, -1.0])
    g1 = grpo_loss(logp, logp.detach() + 0.1, None, adv, mask)[0]
    lp2 = logp.detach().clone()
    lp2[mask == 0] += 3.0
    g2 = grpo_loss(lp2, logp.detach() + 0.1, None, adv, mask)[0]
    assert float(g1) == pytest.approx(float(g2))


def test_top_fraction_selects_largest_gaps_per_sequence():
    gap = torch.tensor([[0.1, 5.0, 0.2, 0.3, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0],
                        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.ones(2, 12)
    mask[0, 10] = 0  # the largest gap is masked out
    sel = select_top_tokens(gap, mask, 0.10)
    assert sel[0].tolist() == [0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # ceil(0.1 * 11) = 2 tokens
    assert sel[1, 0] == 1 and sel[1].sum() == 2  # ceil(0.1 * 12) = 2 tokens, the largest gap first
    assert select_top_tokens(gap, torch.zeros(2, 12)).sum() == 0


def test_sampled_estimator_gradient_matches_exact_reverse_kl_in_expectation():
    """Sum over the vocabulary of p_old(y) * grad(rho k3) equals grad KL(p || q) at theta = theta_old."""
    torch.manual_seed(0)
    V = 6
    theta = torch.randn(V, requires_grad=True)
    logq = torch.log_softmax(torch.randn(V), -1)
    exact_loss = (torch.softmax(theta, -1) * (torch.log_softmax(theta, -1) - logq)).sum()
    (exact,) = torch.autograd.grad(exact_loss, theta)
    p_old = torch.softmax(theta, -1).detach()
    expected = torch.zeros(V)
    for y in range(V):  # the expectation over sampled tokens, enumerated exactly
        logp_y = torch.log_softmax(theta, -1)[y].reshape(1, 1)
        loss, _ = ved_loss(logp_y, logq[y].reshape(1, 1), logp_y.detach(), torch.ones(1, 1), top_frac=1.0)
        (g,) = torch.autograd.grad(loss, theta)
        expected += p_old[y] * g
    assert torch.allclose(expected, exact, atol=1e-5)
    # The forward-KL gradient differs: the test can tell the two apart.
    fwd = torch.autograd.grad((logq.exp() * (logq - torch.log_softmax(theta, -1))).sum(), theta)[0]
    assert not torch.allclose(exact, fwd, atol=1e-3)


def test_sampled_estimator_monte_carlo_agrees_with_exact_gradient():
    torch.manual_seed(1)
    V, N = 5, 20000
    theta = torch.randn(V, requires_grad=True)
    logq = torch.log_softmax(torch.randn(V), -1)
    exact = torch.autograd.grad((torch.softmax(theta, -1) * (torch.log_softmax(theta, -1) - logq)).sum(), theta)[0]
    ys = torch.multinomial(torch.softmax(theta, -1).detach(), N, replacement=True)
    logp = torch.log_softmax(theta, -1)[ys][None]
    loss, _ = ved_loss(logp, logq[ys][None], logp.detach(), torch.ones(1, N), top_frac=1.0)
    (g,) = torch.autograd.grad(loss, theta)
    assert torch.allclose(g, exact, atol=0.03)


def test_ved_clamps_and_caps():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    logq = torch.tensor([[-50.0, 0.0]])
    loss, stats = ved_loss(logp, logq, torch.tensor([[-5.0, 0.0]]), torch.ones(1, 2), top_frac=1.0)
    ell = torch.tensor(10.0)  # clamped
    k3 = torch.exp(-ell) - 1 + ell
    assert float(loss) == pytest.approx(float(2.0 * k3 / 2), rel=1e-5)  # rho capped at 2 on the first token
    assert stats.rho_capped == pytest.approx(0.5)


def _ved_token_grad(ell: float, log_ratio: float) -> tuple[float, float]:
    """d L_VED / d log p for one selected token with gap ``ell`` and log(pi / pi_old) = ``log_ratio``; and the loss."""
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, _ = ved_loss(logp, torch.tensor([[-1.0 - ell]]), torch.tensor([[-1.0 - log_ratio]]), torch.ones(1, 1), top_frac=1.0)
    loss.backward()
    return float(logp.grad), float(loss)


@pytest.mark.parametrize("log_ratio", [-1.0, 0.0, 0.5, float(torch.log(torch.tensor(RHO_CAP))), 1.5])
def test_ved_gradient_has_the_reverse_kl_sign_and_a_bounded_size_for_every_gap(log_ratio):
    """Scan l over [-15, 15] (the clamp boundary included) at ratios below, at and above the cap.

    The reference is the sampled-token self-distillation gradient of TRL's SDPO/SDFT, written out by hand:
    loss_ref = min(rho, cap).detach() * (log p - log q).detach() * log p, so d/d log p = min(rho, cap) * l.
    """
    rho = min(float(torch.exp(torch.tensor(log_ratio))), RHO_CAP)
    ells = [x / 4 for x in range(-60, 61)] + [-VED_CLAMP - 1e-4, -VED_CLAMP + 1e-4, VED_CLAMP - 1e-4, VED_CLAMP + 1e-4]
    for ell in ells:
        grad, loss = _ved_token_grad(ell, log_ratio)
        assert abs(grad) <= RHO_CAP * VED_CLAMP + 1e-4, (ell, grad)
        if ell != 0:
            assert (grad > 0) == (ell > 0), (ell, grad)  # descent raises log p exactly when the teacher is more confident
        lp = torch.tensor(-1.0, requires_grad=True)
        ref = torch.tensor(rho) * (lp - (-1.0 - ell)).detach() * lp
        (g_ref,) = torch.autograd.grad(ref, lp)
        if abs(ell) <= VED_CLAMP:
            assert grad == pytest.approx(float(g_ref), rel=1e-4, abs=1e-5), (ell, grad, float(g_ref))
        else:  # past the clamp: the reference's gradient at the clamp
            assert grad == pytest.approx(rho * (VED_CLAMP if ell > 0 else -VED_CLAMP), rel=1e-4)
        ell_c = max(-VED_CLAMP, min(VED_CLAMP, ell))
        k3 = float(torch.exp(torch.tensor(-ell_c, dtype=torch.float64))) - 1 + ell_c
        assert loss == pytest.approx(rho * k3, rel=1e-4, abs=1e-6)  # the value is still rho * k3


def test_ved_selects_tokens_by_the_absolute_gap():
    logp = torch.zeros(1, 10, requires_grad=True)
    logq = torch.zeros(1, 10)
    logq[0, 3] = -4.0  # the teacher far less confident: a negative gap, the largest in size
    logq[0, 7] = 1.0
    loss, stats = ved_loss(logp, logq, logp.detach(), torch.ones(1, 10), top_frac=0.1)
    loss.backward()
    assert stats.selected == 1 and logp.grad[0, 3] != 0 and logp.grad[0, 7] == 0


def test_group_advantages_are_exactly_zero_for_constant_groups_on_a_fine_grid():
    for g in (2, 4, 6, 8):
        values = torch.arange(0, 1001, dtype=torch.float32) / 1000  # 0.000, 0.001, ..., 1.000 in float32
        rewards = values[:, None].expand(-1, g).contiguous()
        adv = group_advantages(rewards)
        assert adv.dtype == torch.float32
        assert torch.equal(adv, torch.zeros_like(adv)), f"G={g}: {int((adv != 0).any(1).sum())} constant groups got advantages"


def test_group_advantages_match_the_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    rewards = (torch.randint(0, 1001, (200, 6), generator=g) / 1000).float()
    r = rewards.double()
    expected = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + 1e-6)
    assert torch.allclose(group_advantages(rewards).double(), expected, atol=1e-6)


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3]])
    a = group_advantages(r)
    assert torch.allclose(a.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(a[1], torch.zeros(4))
    assert a[0, 0] > 0 > a[0, 1]


def test_grpo_clipping_and_kl():
    mask = torch.ones(2, 3)
    logp_old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = grpo_loss(logp, logp_old, logp.detach(), adv, mask)
    assert float(loss) == pytest.approx(0.0, abs=1e-7) and stats.kl == pytest.approx(0.0)  # -(1 - 1)/2
    # Ratio beyond 1 + 0.28 with positive advantage is clipped: no gradient flows.
    big = torch.full((1, 3), 0.5, requires_grad=True)
    loss, stats = grpo_loss(big, torch.zeros(1, 3), None, torch.tensor([1.0]), torch.ones(1, 3))
    loss.backward()
    assert torch.all(big.grad == 0) and stats.clip_high_frac == 1.0
    # Within the clip range the gradient is -A * ratio / n.
    small = torch.full((1, 2), 0.1, requires_grad=True)
    grpo_loss(small, torch.zeros(1, 2), None, torch.tensor([2.0]), torch.ones(1, 2))[0].backward()
    assert torch.allclose(small.grad, torch.full((1, 2), -2.0 * float(torch.exp(torch.tensor(0.1))) / 2))
    # The KL term to the reference is a k3 estimate: positive when the policy moves away.
    _, s = grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.full((1, 2), -1.0), torch.tensor([0.0]), torch.ones(1, 2))
    assert s.kl > 0


def test_combined_loss():
    a, b = torch.tensor(1.0), torch.tensor(0.5)
    assert float(combined_loss(a, b)) == pytest.approx(2.0)
    assert float(combined_loss(None, b, lambda_ved=3.0)) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="no loss to combine"):
        combined_loss(None, None)
