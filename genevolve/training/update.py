"""The token-level update: score the sampled tokens four ways and back-propagate L = L_GRPO + lambda * L_VED.

For each micro-batch of trajectories:

- without gradient: the current weights before the update (pi_old), the reference (adapter
  disabled; only when GRPO's KL term is on) and the teacher (the same weights reading the student's
  tokens behind the guide's system block, :func:`genevolve.agent.teacher.teacher_stream`);
- with gradient: the student;
- the losses of :mod:`.losses`, weighted so that the step's loss is a mean over all its assistant
  tokens (GRPO) and over all its trajectories that have a teacher (VED), then ``backward``.

The optimizer step is the caller's (data parallelism sums the gradients first). The trainer, the
step-cost benchmark and the CUDA check all call :func:`accumulate_gradients`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .losses import combined_loss, grpo_loss, ved_loss


@dataclass
class Scored:
    """One trajectory's tensors for the update."""

    ids: list[int]
    mask: list[int]
    group: int
    advantage: float = 0.0
    teacher_ids: list[int] | None = None
    teacher_offset: int = 0  # teacher_ids[i + offset] == ids[i] for positions after the system block


@dataclass(frozen=True)
class LossSettings:
    use_grpo: bool = True
    use_ved: bool = True
    lambda_ved: float = 2.0
    top_frac: float = 0.10
    clip_low: float = 0.20
    clip_high: float = 0.28
    beta: float = 1e-3
    micro_batch: int = 8


STAT_KEYS = ("grpo", "ved", "kl", "clip_low", "clip_high", "ved_tokens", "mean_gap", "g2_grpo", "g2_ved",
             "teacher_seconds", "update_seconds")


def token_logprobs(model, seqs: list[list[int]], device, pad_id: int) -> list[torch.Tensor]:
    """Log-probability of every token given its prefix (position 0 gets 0), one tensor per sequence."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(seqs), n), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, device=device)
        attn[i, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    logp = torch.cat([torch.zeros(len(seqs), 1, device=device), logp], dim=1)
    return [logp[i, : len(s)] for i, s in enumerate(seqs)]


def _frozen_views(model, mb: list[Scored], loss: LossSettings, device, pad_id: int) -> tuple:
    """pi_old, the reference (or None) and the teacher (per row, or None) of a micro-batch, without gradient."""
    seqs = [s.ids for s in mb]
    with torch.no_grad():
        model.eval()
        old = token_logprobs(model, seqs, device, pad_id)
        ref = None
        if loss.use_grpo and loss.beta:
            with model.disable_adapter():
                ref = token_logprobs(model, seqs, device, pad_id)
        teach: list[torch.Tensor | None] = [None] * len(mb)
        rows = [i for i, s in enumerate(mb) if s.teacher_ids is not None]
        if loss.use_ved and rows:
            tl = token_logprobs(model, [mb[i].teacher_ids for i in rows], device, pad_id)
            for i, lp in zip(rows, tl):
                teach[i] = lp[mb[i].teacher_offset :]  # aligned to the student's positions after the system block
    return old, ref, teach, rows


def _padder(n: int, device):
    def pad(xs, fill=0.0):
        out = torch.full((len(xs), n), fill, device=device)
        for i, x in enumerate(xs):
            out[i, : len(x)] = x if torch.is_tensor(x) else torch.tensor(x, dtype=torch.float32, device=device)
        return out

    return pad


def _micro_batch(model, mb: list[Scored], loss: LossSettings, device, pad_id: int, n_tokens: int, n_teacher: int,
                 stats: dict[str, float]) -> None:
    """One micro-batch: frozen views, the student's forward, both losses, backward; ``stats`` accumulates."""
    t = time.time()
    old, ref, teach, tmb = _frozen_views(model, mb, loss, device, pad_id)
    stats["teacher_seconds"] += time.time() - t
    t = time.time()
    model.train()
    seqs = [s.ids for s in mb]
    cur = token_logprobs(model, seqs, device, pad_id)
    pad = _padder(max(len(x) for x in seqs), device)
    logp, logp_old = pad(cur), pad(old)
    mask = pad([s.mask for s in mb])
    weight = float(mask.sum()) / max(n_tokens, 1)  # token-level mean over the whole batch
    terms_grpo = terms_ved = None
    if loss.use_grpo:
        adv = torch.tensor([s.advantage for s in mb], device=device)
        terms_grpo, gs = grpo_loss(logp, logp_old, pad(ref) if ref is not None else None, adv, mask,
                                   loss.clip_low, loss.clip_high, loss.beta)
        for k, v in (("grpo", gs.pg_loss), ("kl", gs.kl), ("clip_low", gs.clip_low_frac), ("clip_high", gs.clip_high_frac)):
            stats[k] += v * weight
    if loss.use_ved and tmb:
        rows = [i for i in range(len(mb)) if teach[i] is not None]
        logq = torch.zeros_like(logp)
        vmask = torch.zeros_like(mask)
        for i in rows:
            # The teacher's stream is longer only by its system block: positions line up after it.
            L = min(len(teach[i]), len(mb[i].ids))
            logq[i, :L] = teach[i][:L]
            vmask[i, :L] = mask[i, :L]
        terms_ved, vs = ved_loss(logp, logq, logp_old, vmask, loss.top_frac)
        stats["ved"] += vs.loss * len(rows) / max(n_teacher, 1)
        stats["ved_tokens"] += vs.selected
        stats["mean_gap"] += vs.mean_gap * len(rows) / max(n_teacher, 1)
    if terms_grpo is None and terms_ved is None:
        return
    loss_grpo = terms_grpo * weight if terms_grpo is not None else None
    loss_ved = terms_ved * (len(tmb) / max(n_teacher, 1)) if terms_ved is not None else None
    # How hard each term pulls on the sampled tokens' log-probs (cheap: the loss functions only, not the
    # model): shows in the metrics whether one term drowns the other.
    for key, term, w in (("g2_grpo", loss_grpo, 1.0), ("g2_ved", loss_ved, loss.lambda_ved)):
        if term is not None:
            stats[key] += float((w * torch.autograd.grad(term, logp, retain_graph=True)[0]).pow(2).sum())
    combined_loss(loss_grpo, loss_ved, loss.lambda_ved).backward()
    stats["update_seconds"] += time.time() - t


def accumulate_gradients(model, scored: list[Scored], loss: LossSettings, device, pad_id: int,
                         n_tokens: int, n_teacher: int) -> dict[str, float]:
    """Back-propagate the step's loss over ``scored`` in micro-batches; the gradients are left on the weights.

    ``n_tokens`` (assistant tokens) and ``n_teacher`` (trajectories with a teacher) are the whole step's,
    across processes, so that each process's share adds up to the step's mean. Returns the loss
    statistics (each a share of the step's value, to be summed over processes) and the seconds spent
    in frozen forwards (``teacher_seconds``) and in the student's forward and backward (``update_seconds``).
    """
    stats = dict.fromkeys(STAT_KEYS, 0.0)
    stats["ved_tokens"] = 0
    for c in range(0, len(scored), loss.micro_batch):
        _micro_batch(model, scored[c : c + loss.micro_batch], loss, device, pad_id, n_tokens, n_teacher, stats)
    return stats
