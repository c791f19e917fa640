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
    logp = torch.log_softmax(logits.float(), dim=-1)
    if params.temperature == 0:
        tok = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        sorted_p, idx = probs.sort(dim=-1, descending=True, stable=True)
        if params.top_p < 1.0:
            sorted_p = sorted_p * (sorted_p.cumsum(dim=-1) - sorted_p < params.top_p)
        cdf = sorted_p.cumsum(dim=-1)
        target = torch.tensor(list(u), dtype=cdf.dtype, device=cdf.device)[:, None] * cdf[:, -1:]
        # u close to 1 can round to the total in float32: never step past the last token with probability > 0.
        last = (sorted_p > 0).sum(dim=-1, keepdim=True) - 1
        j = torch.minimum(torch.searchsorted(cdf, target, right=True), last)
        tok = idx.gather(-1, j).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
