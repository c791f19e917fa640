"""The token-level update: score the sampled tokens four ways and back-propagate L = L_GRPO + lambda * L_VED.

For each micro-batch of trajectories:

- without gradient: the reference (adapter disabled; only when GRPO's KL term is on) and the teacher
  (the same weights reading the student's tokens behind the guide's system block,
  :func:`genevolve.agent.teacher.teacher_stream`);
- with gradient: the student. Its values, detached, are pi_old: the weights before the update are
  the current ones, as the step makes one optimizer step after all its micro-batches;
- every forward computes the output layer and the softmax only on the assistant tokens, the only
  ones a loss reads;
- the losses of :mod:`.losses`, weighted so that the step's loss is a mean over all its assistant
  tokens (GRPO) and over all its trajectories that have a teacher, each the mean over its selected
  tokens (VED), whatever the micro-batches; then ``backward``.

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


def _batch(seqs: list[list[int]], device, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(seqs), n), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, device=device)
        attn[i, : len(s)] = 1
    return ids, attn


def _full_logprobs(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(len(ids), 1, device=ids.device), logp], dim=1)


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: LoRA layers sit inside
    return base.get_decoder(), base.get_output_embeddings()


def _split_head_ok(model, device) -> bool:
    """Whether the model's logits are its output layer applied to its decoder's last hidden state (checked
    once per model on a few tokens: some models scale or cap logits after the head, then the full forward is used)."""
    known = getattr(model, "_genevolve_split_head", None)
    if known is not None:
        return known
    ok = False
    try:
        dec, head = _decoder_and_head(model)
        ids = torch.arange(1, 9, device=device)[None] % max(2, model.config.get_text_config().vocab_size)
        with torch.no_grad():
            full = model(input_ids=ids).logits.float()
            split = head(dec(input_ids=ids).last_hidden_state).float()
        ok = full.shape == split.shape and bool(torch.allclose(full, split, atol=1e-4, rtol=1e-4))
    except Exception:  # noqa: any failure here only means the full forward is used
        ok = False
    object.__setattr__(model, "_genevolve_split_head", ok)
    return ok


def token_logprobs(model, seqs: list[list[int]], device, pad_id: int,
                   needed: list[list[int]] | None = None) -> list[torch.Tensor]:
    """Log-probability of every token given its prefix (position 0 gets 0), one tensor per sequence.

    With ``needed`` (a 0/1 list per sequence), only the positions marked 1 are computed and the others
    are 0: the output layer and the softmax over the vocabulary then run on those positions only, which
    saves their time and the (rows, tokens, vocabulary) logits' memory. The values computed are the
    same as without ``needed``.
    """
    ids, attn = _batch(seqs, device, pad_id)
    if needed is None or not _split_head_ok(model, device):
        logp = _full_logprobs(model, ids, attn)
    else:
        want = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        for i, m in enumerate(needed):
            want[i, 1 : len(seqs[i])] = torch.tensor(m[1 : len(seqs[i])], device=device).bool()
        dec, head = _decoder_and_head(model)
        hidden = dec(input_ids=ids, attention_mask=attn).last_hidden_state
        b, t = want.nonzero(as_tuple=True)
        lp = torch.log_softmax(head(hidden[b, t - 1]).float(), dim=-1).gather(-1, ids[b, t, None]).squeeze(-1)
        logp = torch.zeros(ids.shape, device=device, dtype=lp.dtype).index_put((b, t), lp)
    return [logp[i, : len(s)] for i, s in enumerate(seqs)]


def row_logprobs(model, seqs: list[list[int]], device, pad_id: int,
                 needed: list[list[int]] | None = None) -> list[torch.Tensor]:
    """:func:`token_logprobs`, on the CPU one sequence per forward: a padded batch costs every row the
    longest row's length (attention: its square), which made a micro-batch of 8 trajectories of mixed
    lengths 3.7 times slower per token than single rows (``benchmarks/scaling.py``, update sweep). On a
    GPU the rows run together."""
    if len(seqs) == 1 or torch.device(device).type != "cpu":
        return token_logprobs(model, seqs, device, pad_id, needed)
    return [token_logprobs(model, [s], device, pad_id, None if needed is None else [needed[i]])[0]
            for i, s in enumerate(seqs)]


def _shifted(mask: list[int], offset: int) -> list[int]:
    """``mask`` moved ``offset`` positions to the right (left when negative)."""
    return [0] * offset + mask if offset >= 0 else mask[-offset:]


def _frozen_views(model, mb: list[Scored], loss: LossSettings, device, pad_id: int) -> tuple:
    """The reference (or None) and the teacher (per row, or None) of a micro-batch, without gradient, each
    on the assistant tokens only."""
    seqs, masks = [s.ids for s in mb], [s.mask for s in mb]
    with torch.no_grad():
        model.eval()
        ref = None
        if loss.use_grpo and loss.beta:
            with model.disable_adapter():
                ref = row_logprobs(model, seqs, device, pad_id, masks)
        teach: list[torch.Tensor | None] = [None] * len(mb)
        rows = [i for i, s in enumerate(mb) if s.teacher_ids is not None]
        if loss.use_ved and rows:
            shifted = [_shifted(mb[i].mask, mb[i].teacher_offset) for i in rows]  # the student's tokens in the teacher's stream
            tl = row_logprobs(model, [mb[i].teacher_ids for i in rows], device, pad_id, shifted)
            for i, lp in zip(rows, tl):
                teach[i] = lp[mb[i].teacher_offset :]  # aligned to the student's positions after the system block
    return ref, teach, rows


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
    ref, teach, tmb = _frozen_views(model, mb, loss, device, pad_id)
    stats["teacher_seconds"] += time.time() - t
    t = time.time()
    model.train()
    seqs = [s.ids for s in mb]
    cur = row_logprobs(model, seqs, device, pad_id, [s.mask for s in mb])
    # pi_old: the weights before this step's update are the current ones (one optimizer step per
    # step; the micro-batches only accumulate gradients), so it is the student's own forward, detached.
    old = [c.detach() for c in cur]
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
        # One row at a time: VED is a mean over the step's teacher rows of each row's mean over its selected
        # tokens, so rows that select more tokens do not weigh more, and the micro-batching changes nothing.
        per_row = []
        for i in tmb:
            # The teacher's stream is longer only by its system block: positions line up after it.
            L = min(len(teach[i]), len(mb[i].ids))
            logq = torch.zeros_like(logp[i : i + 1])
            vmask = torch.zeros_like(mask[i : i + 1])
            logq[0, :L] = teach[i][:L]
            vmask[0, :L] = mask[i, :L]
            term, vs = ved_loss(logp[i : i + 1], logq, logp_old[i : i + 1], vmask, loss.top_frac)
            per_row.append(term)
            stats["ved"] += vs.loss / max(n_teacher, 1)
            stats["ved_tokens"] += vs.selected
            stats["mean_gap"] += vs.mean_gap / max(n_teacher, 1)
        terms_ved = torch.stack(per_row).mean()
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
