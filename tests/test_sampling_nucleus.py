"""Top-p sampling over a large vocabulary sorts only the top candidates; the token drawn must be the one
a stable sort of the whole vocabulary gives, in every regime: a peaked row, a flat row whose nucleus
runs past the candidates, ties at the candidates' edge, u at the ends of [0, 1)."""

from __future__ import annotations

import pytest
import torch

from genevolve.policies.base import SamplingParams
from genevolve.policies.sampling import NUCLEUS_K, _sorted_nucleus, sample_tokens


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
    if kind == "bf16":  # logits as a bf16 model writes them: thousands of exact ties, at the edge and inside
        return (x * 3).bfloat16()
    if kind == "bf16 tie at the nucleus end":  # the nucleus's last value is shared with the candidates' edge
        x = (x * 3).bfloat16()
        x[:, :NUCLEUS_K + 40] = -1.0
        x[:, :3] = 4.0
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["peaked", "flat", "tied edge", "tied inside", "tied top", "bf16",
                                  "bf16 tie at the nucleus end"])
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


def test_a_peaked_row_is_sorted_over_the_candidates_only_and_matches_the_whole_sort():
    """The speed contract: when every row's nucleus closes within the candidates, only NUCLEUS_K are
    sorted, and they are the head of the whole vocabulary's stable sort, ids and values."""
    g = torch.Generator().manual_seed(11)
    v = 4 * NUCLEUS_K + 17
    probs = torch.softmax(rows("peaked", v, g), dim=-1)
    vals, idx = _sorted_nucleus(probs, 0.9)
    assert vals.shape == idx.shape == (6, NUCLEUS_K)
    want_p, want_i = probs.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(vals, want_p[:, :NUCLEUS_K]) and torch.equal(idx, want_i[:, :NUCLEUS_K])


def test_candidates_in_token_order_are_still_sorted_by_probability():
    """A row whose probabilities fall with the token id: the candidates' id order is already their
    probability order, so a sort along the wrong axis would go unnoticed in the values."""
    v = 4 * NUCLEUS_K + 17
    logits = -torch.arange(v, dtype=torch.float32)[None, :] * 0.05
    params = SamplingParams(temperature=1.0, top_p=0.5)
    for u in (0.0, 0.3, 0.7, 1 - 2**-53):
        tok, _ = sample_tokens(logits, params, [u])
        assert tok.tolist() == whole_sort(logits, params, [u]).tolist()
    assert sample_tokens(logits, params, [0.9])[0].item() > 0  # not the first candidate every time


def test_a_batch_of_many_rows_whose_nuclei_run_just_past_the_candidates():
    """400 rows, each with NUCLEUS_K tokens holding 0.9 of the mass and a long tail: the 0.95 nucleus
    needs tail tokens, in every row, whatever the batch size."""
    g = torch.Generator().manual_seed(5)
    n, v = 400, 4 * NUCLEUS_K
    head = 0.9 / NUCLEUS_K * (1 + 0.01 * torch.rand(n, NUCLEUS_K, generator=g))
    tail = 0.1 / (v - NUCLEUS_K) * (1 + 0.01 * torch.rand(n, v - NUCLEUS_K, generator=g))
    probs = torch.cat([head, tail], dim=-1)
    perm = torch.stack([torch.randperm(v, generator=g) for _ in range(n)])
    logits = torch.log(probs.gather(-1, perm))
    params = SamplingParams(temperature=1.0, top_p=0.95)
    u = [0.97 + 0.02 * x for x in torch.rand(n, generator=g).tolist()]
    tok, _ = sample_tokens(logits, params, u)
    want = [whole_sort(logits[i : i + 1], params, [u[i]]).item() for i in range(0, n, 37)] + [
        whole_sort(logits[-1:], params, [u[-1]]).item()
    ]
    assert tok[::37].tolist() + [tok[-1].item()] == want
    ranks = torch.softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1) < 0.5 / NUCLEUS_K
    assert bool(ranks.all())  # every row drew from the tail, past the candidates


def test_top_p_one_keeps_a_tail_the_candidates_leave_out():
    """At top-p 1.0 nothing is cut, however small: a tail of 1e-30 probabilities behind a head whose
    float32 sum is already 1.0. u just below 1 rounds to 1.0 in float32, and the rule is then the last
    token with a probability above 0: the tail's smallest, id v - 1 (the float64 loop above cannot
    see this rounding, so the expected id is written out)."""
    v = 4 * NUCLEUS_K
    probs = torch.cat([torch.tensor([1.0]), 1e-30 * torch.arange(v - 1, 0, -1, dtype=torch.float32)])
    logits = torch.log(probs)[None, :]
    params = SamplingParams(temperature=1.0, top_p=1.0)
    tok, _ = sample_tokens(logits, params, [1 - 2**-53])
    assert tok.item() == v - 1
    vals, _ = _sorted_nucleus(torch.softmax(logits, -1), 1.0)
    assert vals.shape[-1] == v


def test_bf16_ties_at_the_edge_do_not_force_a_whole_sort():
    """The speed contract for bf16 logits: ties at the candidates' edge are common there, and when the nucleus
    closes above the edge the candidates are the head of the whole stable sort, ids and values."""
    g = torch.Generator().manual_seed(12)
    v = 64 * NUCLEUS_K
    x = torch.randn(8, v, generator=g) * 2
    x[:, :5] += 16  # a few likely tokens over a bf16-quantised tail
    probs = torch.softmax(x.bfloat16().float() / 0.7, dim=-1)
    edge_ties = (probs >= probs.topk(NUCLEUS_K, dim=-1).values[:, -1:]).sum(-1) > NUCLEUS_K
    assert bool(edge_ties.all())  # every row has a tie at the edge
    vals, idx = _sorted_nucleus(probs, 0.9)
    assert vals.shape == (8, NUCLEUS_K)
    want_p, want_i = probs.sort(dim=-1, descending=True, stable=True)
    kept = (want_p.cumsum(-1) - want_p < 0.9).sum(-1)
    assert bool((kept < NUCLEUS_K).all())
    for r in range(8):
        assert torch.equal(idx[r, : kept[r]], want_i[r, : kept[r]]) and torch.equal(vals[r, : kept[r]], want_p[r, : kept[r]])


@pytest.mark.parametrize("kind", ["wide", "wide bf16", "wider than wide", "one of each"])
def test_the_wide_tier_draws_the_token_a_whole_sort_draws(kind):
    """Rows whose nucleus runs past NUCLEUS_K but closes within NUCLEUS_WIDE take the second tier; rows flatter
    than that are sorted whole; a batch may mix all three."""
    from genevolve.policies.sampling import NUCLEUS_WIDE

    g = torch.Generator().manual_seed(len(kind))
    v = 4 * NUCLEUS_WIDE + 33
    wide = kind in ("wide", "wide bf16")
    x = torch.randn(4, v, generator=g) * (0.5 if kind != "wider than wide" else 0.1)
    if wide:
        x[:, 7 : 7 + NUCLEUS_WIDE // 2] += 4.0  # about 2,000 likely tokens
    if kind == "wide bf16":
        x = x.bfloat16()
    if kind == "one of each":
        x[0] *= 16  # peaked
        x[2:] *= 0.2  # flat
        x[1, 7 : 7 + NUCLEUS_WIDE // 2] += 4.0  # wide; rows 2 and 3 flat
    params = SamplingParams(temperature=0.7, top_p=0.95)
    probs = torch.softmax(x.float() / 0.7, -1)
    kept = (probs.sort(-1, descending=True).values.cumsum(-1) - probs.sort(-1, descending=True).values < 0.95).sum(-1)
    if wide:
        assert bool(((kept > NUCLEUS_K) & (kept < NUCLEUS_WIDE)).all())
        assert _sorted_nucleus(probs, 0.95)[0].shape[-1] == NUCLEUS_WIDE  # the whole vocabulary was not sorted
    if kind == "wider than wide":
        assert bool((kept > NUCLEUS_WIDE).all())
    for us in ([0.0] * 4, [1 - 2**-53] * 4, torch.rand(4, generator=g).tolist()):
        tok, _ = sample_tokens(x, params, us)
        assert tok.tolist() == whole_sort(x, params, us).tolist()
