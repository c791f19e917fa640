"""Per-trajectory sampling: each token is drawn from its own row's distribution at its own uniform number.

The uniform number of a token depends only on the conversation's noise key (:func:`stream_key`: its
seed and its first user message) and the token's position in its stream (:func:`uniform`), never on
the batch it was written in; :func:`sample_tokens` inverts each row's (temperature, top-p)
distribution at that number.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from .base import Message, SamplingParams

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-mixed 64-bit integer from any integer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stream_key(seed: int, messages: Sequence[Message]) -> int:
    """The sampling-noise key of one conversation: its seed and its first user message.

    Two requests that share a seed then never share their noise, while the same request with and
    without a decision guide (a system-prompt change) does: common random numbers for paired
    comparisons (teacher vs student, before vs after).
    """
    first = next((m.get("content") for m in messages if m.get("role") == "user"), "")
    digest = hashlib.sha256(str(first).encode("utf-8")).digest()
    return _mix64(_mix64(int(seed) & _M64) ^ int.from_bytes(digest[:8], "little"))


def uniform(key: int, position: int) -> float:
    """A uniform number in [0, 1) that depends only on a stream key and a token position."""
    return (_mix64(key ^ _mix64(position)) >> 11) * 2.0**-53


def sample_tokens(logits: torch.Tensor, params: SamplingParams, u: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row by inverting its (temperature, top-p) distribution at ``u[row]``.

    Each row's token is a function of that row's logits and its own uniform number, never of the other
    rows (a shared random generator would make a trajectory depend on the batch it ran in). Returns
    (tokens, their log-probabilities under the raw model distribution).
    """
    lf = logits.float()
    logp = torch.log_softmax(lf, dim=-1)
    if params.temperature == 0:
        tok = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(lf / params.temperature, dim=-1)
        sorted_p, idx = _sorted_nucleus(probs, params.top_p)
        if params.top_p < 1.0:
            sorted_p = sorted_p * (sorted_p.cumsum(dim=-1) - sorted_p < params.top_p)
        cdf = sorted_p.cumsum(dim=-1)
        target = torch.tensor(list(u), dtype=cdf.dtype, device=cdf.device)[:, None] * cdf[:, -1:]
        # u close to 1 can round to the total in float32: never step past the last token with probability > 0.
        last = (sorted_p > 0).sum(dim=-1, keepdim=True) - 1
        j = torch.minimum(torch.searchsorted(cdf, target, right=True), last)
        tok = idx.gather(-1, j).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


NUCLEUS_K = 256  # candidates taken before sorting; a row whose nucleus does not close within them tries NUCLEUS_WIDE
NUCLEUS_WIDE = 4096  # the second tier (a flat row); past it the row is sorted whole


def _head(probs: torch.Tensor, k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens of each row in stable descending order, and which rows they stand for exactly.

    They stand for the whole sort where the nucleus closes within them and either its smallest probability is
    above their edge (every token left out is then below the nucleus, and ties inside it are all among the
    candidates, in index order) or no token left out ties with the edge. bf16 logits tie often: an edge tie
    alone is no reason to sort the vocabulary."""
    vals, idx = probs.topk(k, dim=-1)
    order = idx.argsort(dim=-1)  # ties in index order, as the stable sort leaves them
    vals, idx = vals.gather(-1, order), idx.gather(-1, order)
    vals, o2 = vals.sort(dim=-1, descending=True, stable=True)
    idx = idx.gather(-1, o2)
    cum = vals.cumsum(dim=-1)
    size = (cum - vals < top_p).sum(dim=-1, keepdim=True)  # the nucleus's length within the candidates
    smallest = vals.gather(-1, (size - 1).clamp(min=0, max=k - 1))
    closes = cum[:, -1] >= top_p
    exact = closes & (smallest > vals[:, -1:]).squeeze(-1)
    if not bool(exact.all()):  # no tie at the edge at all: the candidates are exactly the head (a pass over the vocabulary)
        exact |= closes & ((probs >= vals[:, -1:]).sum(dim=-1) == k)
    return vals, idx, exact


def _sorted_nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities in the order of a stable descending sort and their token ids, as far as the
    top-p nucleus needs: the first ``NUCLEUS_K`` when every row's nucleus closes within them, else as many
    columns as the widest row needed (``NUCLEUS_WIDE`` or the whole vocabulary; shorter rows padded with
    probability 0). Sampling reads nothing past the nucleus, so the token drawn is the one a sort of the
    whole vocabulary gives; sorting a few hundred candidates instead of every token is what makes a large
    vocabulary cheap."""
    v = probs.shape[-1]
    if top_p >= 1.0 or v <= 2 * NUCLEUS_K:
        return probs.sort(dim=-1, descending=True, stable=True)
    vals, idx, exact = _head(probs, NUCLEUS_K, top_p)
    if bool(exact.all()):
        return vals, idx
    rest = (~exact).nonzero().squeeze(-1)
    if v > 2 * NUCLEUS_WIDE:
        wide_p, wide_i, wide_exact = _head(probs[rest], NUCLEUS_WIDE, top_p)
    else:
        wide_exact = torch.zeros(len(rest), dtype=torch.bool, device=probs.device)
    width = NUCLEUS_WIDE if bool(wide_exact.all()) else v
    out_p = torch.zeros(probs.shape[0], width, dtype=probs.dtype, device=probs.device)
    out_i = torch.zeros(probs.shape[0], width, dtype=idx.dtype, device=probs.device)
    out_p[exact, :NUCLEUS_K], out_i[exact, :NUCLEUS_K] = vals[exact], idx[exact]
    if bool(wide_exact.any()):
        rows = rest[wide_exact]
        out_p[rows, :NUCLEUS_WIDE], out_i[rows, :NUCLEUS_WIDE] = wide_p[wide_exact], wide_i[wide_exact]
    whole = rest[~wide_exact]
    if len(whole):
        out_p[whole], out_i[whole] = probs[whole].sort(dim=-1, descending=True, stable=True)
    return out_p, out_i
