"""Loss maths: zero when teacher equals student, masks respected, gradients checked on a small vocabulary."""

from __future__ import annotations

import pytest
import torch

from genevolve.training.losses import (
    combined_loss,
    forward_kl_full,
    group_advantages,
    grpo_loss,
    jsd_full,
    reverse_kl_full,
    select_top_tokens,
    ved_loss,
)


def rand_logp(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g), dim=-1)


def test_ved_is_zero_when_teacher_equals_student():
    logp = torch.randn(3, 7).log_softmax(-1).requires_grad_()
    mask = torch.ones(3, 7)
    loss, stats = ved_loss(logp, logp.detach().clone(), logp.detach().clone(), mask, top_frac=1.0)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert torch.allclose(logp.grad, torch.zeros_like(logp.grad), atol=1e-7)


def test_full_vocab_divergences_are_zero_for_equal_distributions_and_positive_otherwise():
    p, q = rand_logp(2, 4, 6, seed=1), rand_logp(2, 4, 6, seed=2)
    mask = torch.ones(2, 4)
    for fn in (reverse_kl_full, forward_kl_full, jsd_full):
        assert float(fn(p, p, mask)) == pytest.approx(0.0, abs=1e-6)
        assert float(fn(p, q, mask)) > 0.01
    # Reverse and forward KL differ in general; JSD is bounded by log 2.
    assert float(reverse_kl_full(p, q, mask)) != pytest.approx(float(forward_kl_full(p, q, mask)), abs=1e-4)
    assert float(jsd_full(p, q, mask)) <= torch.log(torch.tensor(2.0)) + 1e-6


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
    p, q = rand_logp(2, 6, 5, seed=3), rand_logp(2, 6, 5, seed=4)
    q2 = q.clone()
    q2[mask == 0] = p[mask == 0]
    assert float(reverse_kl_full(p, q, mask)) == pytest.approx(float(reverse_kl_full(p, q2, mask)))
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
    # Detaching the ratio would follow the forward-KL gradient instead: the test can tell the two apart.
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
    with pytest.raises(ValueError):
        combined_loss(None, None)
