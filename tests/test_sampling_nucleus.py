"""Top-p sampling over a large vocabulary sorts only the top candidates; the token drawn must be the one
a stable sort of the whole vocabulary gives, in every regime: a peaked row, a flat row whose nucleus
runs past the candidates, ties at the candidates' edge, u at the ends of [0, 1)."""

from __future__ import annotations

import pytest
import torch

from genevolve.policies.base import SamplingParams
from genevolve.policies.sampling import NUCLEUS_K, sample_tokens


def whole_sort(logits: torch.Tensor, params: SamplingParams, u: list[float]) -> torch.Tensor:
    """The reference: a plain loop over each row's stable descending sort of the whole vocabulary."""
    out = []
    for row, ur in zip(logits.float(), u):
        probs = torch.softmax(row / params.temperature, dim=-1)
        order = sorted(range(len(probs)), key=lambda i: (-float(probs[i]), i))
        kept, before = [], 0.0
        p_sorted = probs[order]
        cum = p_sorted.cumsum(0)
        for j, i in enumerate(order):
            if float(cum[j] - p_sorted[j]) >= params.top_p:
                break
            kept.append(i)
        mass = p_sorted[: len(kept)].cumsum(0)
        target = ur * float(mass[-1])
        j = next((k for k in range(len(kept)) if float(mass[k]) > target), len(kept) - 1)
        out.append(kept[j])
    return torch.tensor(out)


def rows(kind: str, v: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(6, v, generator=g)
    if kind == "peaked":
        return x * 8
    if kind == "flat":  # the 0.95 nucleus needs far more than NUCLEUS_K tokens
        return x * 0.3
    if kind == "tied edge":  # the candidates' last value is shared with tokens left out
        x = x * 8
        x[:, : NUCLEUS_K + 40] = 30.0
        return x
    if kind == "tied inside":  # ties well inside the candidates: their order decides the token
        x = x * 8
        x[:, 50:60] = 30.0
        return x
    if kind == "tied top":  # a flat top wider than the candidates
        x = x * 4
        x[:, 100 : 100 + 3 * NUCLEUS_K] = 25.0
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["peaked", "flat", "tied edge", "tied inside", "tied top"])
@pytest.mark.parametrize("top_p", [0.95, 0.5])
def test_the_nucleus_shortcut_draws_the_token_a_whole_sort_draws(kind, top_p):
    g = torch.Generator().manual_seed(len(kind) * 7 + int(top_p * 100))
    v = 4 * NUCLEUS_K + 17
    logits = rows(kind, v, g)
    params = SamplingParams(temperature=0.7, top_p=top_p)
    for us in ([0.0] * 6, [1 - 2**-53] * 6, torch.rand(6, generator=g).tolist(), torch.rand(6, generator=g).tolist()):
        tok, lp = sample_tokens(logits, params, us)
        assert tok.tolist() == whole_sort(logits, params, us).tolist()
        want = torch.log_softmax(logits.float(), -1).gather(-1, tok[:, None]).squeeze(-1)
        assert torch.equal(lp, want)


def test_a_flat_row_next_to_a_peaked_one_is_sorted_whole_and_both_are_right():
    g = torch.Generator().manual_seed(3)
    v = 4 * NUCLEUS_K + 17
    logits = torch.cat([rows("peaked", v, g)[:3], rows("flat", v, g)[:3]])
    params = SamplingParams(temperature=0.7, top_p=0.95)
    u = torch.rand(6, generator=g).tolist()
    tok, _ = sample_tokens(logits, params, u)
    assert tok.tolist() == whole_sort(logits, params, u).tolist()
    flat_kept = (torch.softmax(logits[3:] / 0.7, -1).sort(-1, descending=True).values.cumsum(-1) < 0.95).sum(-1)
    assert bool((flat_kept > NUCLEUS_K).all())  # these rows really run past the candidates
