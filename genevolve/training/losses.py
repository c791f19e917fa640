"""Losses as pure tensor functions: GRPO and Visual Experience Distillation (VED).

Shapes: B sequences, T tokens; P prompts x G rollouts for rewards. ``mask_BT`` is 1 on the
assistant tokens a loss may touch. All log-probabilities are natural logs of the sampled tokens.

VED (DESIGN.md section 1). On each sampled student token: l = log p_student - log q_teacher,
clamped to [-10, 10]; k3(l) = exp(-l) - 1 + l, a sampled-token estimate of KL(student || teacher);
rho = min(p_theta / p_theta_old, 2). L_VED = mean over selected tokens of rho * k3(l), where the
selected tokens are, per sequence, the top 10 % of its masked tokens by |log q - log p|.

The gradient is not left to autograd on rho * k3(clamp(l)). Inside the clamp and below the cap that
derivative is rho * l * grad log p, which is the reverse-KL gradient (its expectation under the
sampling policy at theta = theta_old is grad KL(p_theta || q); tested by exact enumeration). Outside
them it goes wrong: past the clamp l is a constant, so only d rho / d log p = rho survives and the
token gets rho * k3(-10) ~ 2e4 with the wrong sign (pushed down when the teacher wants it up), and at
the cap the derivative rho * (1 - exp(-l)) reaches 2e4 too. So the loss is written with the value
rho * k3(l_c) and the gradient min(rho, cap) * l_c * grad log p (rho and l_c detached, l_c the clamped
gap): the sampled-token self-distillation gradient of TRL's SDPO/SDFT, whose sign is always that of
the reverse-KL gradient and whose size is at most cap * clamp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VED_CLAMP = 10.0
RHO_CAP = 2.0
TOP_FRAC = 0.10


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def group_advantages(rewards_PG: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: (r - group mean) / (group std + eps); a group with equal rewards gets exact zeros.

    Computed in float64: in float32 the mean of equal values can miss them by one ulp, and that
    residue divided by (0 + eps) became an advantage of about +-0.1.
    """
    r = rewards_PG.double()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    adv = (r - mean) / (std + eps)
    constant = (r == r[:, :1]).all(dim=1, keepdim=True)
    return adv.masked_fill(constant, 0.0).to(rewards_PG.dtype)


def select_top_tokens(gap_BT: torch.Tensor, mask_BT: torch.Tensor, frac: float = TOP_FRAC) -> torch.Tensor:
    """Per sequence, the ceil(frac * n) masked tokens with the largest gap (at least one if any is masked)."""
    sel = torch.zeros_like(mask_BT)
    n_BT = mask_BT.sum(dim=1)
    score = gap_BT.masked_fill(mask_BT <= 0, float("-inf"))
    for b in range(gap_BT.shape[0]):
        n = int(n_BT[b])
        if n == 0:
            continue
        k = max(1, int(torch.ceil(torch.tensor(frac * n)).item()))
        idx = torch.topk(score[b], k).indices
        sel[b, idx] = 1.0
    return sel


@dataclass
class VEDStats:
    loss: float
    selected: int
    mean_gap: float
    rho_capped: float  # share of selected tokens whose ratio hit the cap


def ved_loss(logp_BT: torch.Tensor, logq_BT: torch.Tensor, logp_old_BT: torch.Tensor, mask_BT: torch.Tensor,
             top_frac: float = TOP_FRAC, clamp: float = VED_CLAMP, rho_cap: float = RHO_CAP) -> tuple[torch.Tensor, VEDStats]:
    """The sampled-token VED loss (the paper's SDL). ``logq_BT`` (teacher) carries no gradient."""
    logq_BT = logq_BT.detach()
    ell = (logp_BT.detach() - logq_BT).clamp(-clamp, clamp)
    k3 = torch.exp(-ell) - 1.0 + ell
    rho = torch.exp(logp_BT.detach() - logp_old_BT.detach()).clamp(max=rho_cap)
    # Value rho * k3(l_c); gradient rho * l_c * grad log p (see the module docstring).
    per_token = rho * k3 + rho * ell * (logp_BT - logp_BT.detach())
    sel = select_top_tokens((logq_BT - logp_BT).detach().abs(), mask_BT, top_frac)
    loss = masked_mean(per_token, sel)
    n = int(sel.sum())
    stats = VEDStats(float(loss.detach()), n, float(masked_mean((logq_BT - logp_BT).detach().abs(), sel)),
                     float(masked_mean((rho >= rho_cap).float(), sel)) if n else 0.0)
    return loss, stats


@dataclass
class GRPOStats:
    loss: float
    pg_loss: float
    kl: float
    clip_low_frac: float
    clip_high_frac: float


def grpo_loss(logp_BT: torch.Tensor, logp_old_BT: torch.Tensor, logp_ref_BT: torch.Tensor | None, adv_B: torch.Tensor,
              mask_BT: torch.Tensor, clip_low: float = 0.20, clip_high: float = 0.28, beta: float = 1e-3
              ) -> tuple[torch.Tensor, GRPOStats]:
    """Clipped policy gradient with clip-higher, plus beta * k3 KL to the reference policy; token-level mean."""
    ratio = torch.exp(logp_BT - logp_old_BT.detach())
    adv = adv_B.detach()[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    pg = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(pg)
    if logp_ref_BT is not None and beta:
        d = logp_ref_BT.detach() - logp_BT
        kl = torch.exp(d) - d - 1.0
    loss = masked_mean(pg + beta * kl, mask_BT)
    with torch.no_grad():
        low = ((ratio < 1 - clip_low) & (adv < 0)).float()
        high = ((ratio > 1 + clip_high) & (adv > 0)).float()
        stats = GRPOStats(float(loss), float(masked_mean(pg, mask_BT)), float(masked_mean(kl, mask_BT)),
                          float(masked_mean(low, mask_BT)), float(masked_mean(high, mask_BT)))
    return loss, stats


def combined_loss(grpo: torch.Tensor | None, ved: torch.Tensor | None, lambda_ved: float = 2.0) -> torch.Tensor:
    """L = L_GRPO + lambda_VED * L_VED (either may be absent, as in the ablation arms)."""
    parts = []
    if grpo is not None:
        parts.append(grpo)
    if ved is not None:
        parts.append(lambda_ved * ved)
    if not parts:
        raise ValueError("no loss to combine")
    return sum(parts)
