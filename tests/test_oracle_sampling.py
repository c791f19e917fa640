"""Per-trajectory sampling against splitmix64's published outputs and a float64 inverse-CDF sampler."""

from __future__ import annotations

import hashlib
import math
import random

import pytest
import torch

from genevolve.policies.base import SamplingParams
from genevolve.policies.sampling import sample_tokens, stream_key, uniform

M64 = (1 << 64) - 1
# The first three outputs of splitmix64 seeded with 0 (Vigna's reference implementation).
SPLITMIX0 = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def _splitmix(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


def _mix(x: int) -> int:
    return _splitmix(x & M64)[1]


def test_the_reference_mixer_reproduces_splitmix64():
    state, out = 0, []
    for _ in range(3):
        state, z = _splitmix(state)
        out.append(z)
    assert out == SPLITMIX0


def test_stream_key_is_the_seed_mixed_with_the_first_user_message():
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Draw a red circle"},
            {"role": "user", "content": "later"}]
    for seed in (0, 7, -1, 2**70 + 3):
        digest = int.from_bytes(hashlib.sha256(b"Draw a red circle").digest()[:8], "little")
        assert stream_key(seed, msgs) == _mix(_mix(seed & M64) ^ digest)
    assert stream_key(0, [{"role": "system", "content": "x"}]) == _mix(_mix(0) ^ int.from_bytes(hashlib.sha256(b"").digest()[:8], "little"))
    # the system prompt (a guide) does not change the key; the request does
    assert stream_key(3, msgs) == stream_key(3, [{"role": "system", "content": "other"}] + msgs[1:])
    assert stream_key(3, msgs) != stream_key(3, [msgs[0], {"role": "user", "content": "Draw a blue circle"}])


def test_uniform_is_the_top_53_bits_of_the_mixed_key_and_position():
    for key, pos in ((0, 0), (12345, 1), (M64, 77), (2**63, 2**40)):
        want = (_mix(key ^ _mix(pos)) >> 11) / 2.0**53
        assert uniform(key, pos) == want and 0.0 <= want < 1.0
    assert uniform(1, 2) != uniform(1, 3) and uniform(1, 2) != uniform(2, 2)


def _oracle(logits: list[float], temperature: float, top_p: float, u: float) -> tuple[int, float] | None:
    """The token by inverting the (temperature, top-p) distribution at u in float64; None when u sits so close to
    a boundary that float32 rounding could decide it."""
    lse = max(logits) + math.log(sum(math.exp(x - max(logits)) for x in logits))
    logp = [x - lse for x in logits]
    if temperature == 0:
        tok = max(range(len(logits)), key=lambda i: (logits[i], -i))
        return tok, logp[tok]
    z = [x / temperature for x in logits]
    w = [math.exp(x - max(z)) for x in z]
    p = [x / sum(w) for x in w]
    order = sorted(range(len(p)), key=lambda i: -p[i])  # stable: ties keep index order
    kept, before = [], 0.0
    for i in order:
        if top_p < 1.0 and abs(before - top_p) < 1e-5:
            return None
        if top_p >= 1.0 or before < top_p:
            kept.append(i)
        before += p[i]
    total = sum(p[i] for i in kept)
    target, acc = u * total, 0.0
    for i in kept:
        acc += p[i]
        if abs(acc - target) < 1e-5:
            return None
        if acc > target:
            return i, logp[i]
    return kept[-1], logp[kept[-1]]


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.95), (1.0, 1.0), (0.3, 0.5), (1.5, 0.8), (0.0, 0.95)])
def test_sample_tokens_inverts_each_rows_distribution_at_its_own_number(temperature, top_p):
    rng = random.Random(int(temperature * 10 + top_p * 100))
    params = SamplingParams(temperature=temperature, top_p=top_p)
    checked = 0
    for _ in range(30):
        rows = [[rng.gauss(0, 2) for _ in range(7)] for _ in range(4)]
        us = [rng.random() for _ in rows]
        tok, lp = sample_tokens(torch.tensor(rows), params, us)
        assert tok.dtype == torch.int64 and tok.shape == (4,)
        for r, row in enumerate(rows):
            want = _oracle(row, temperature, top_p, us[r])
            if want is None:
                continue
            checked += 1
            assert int(tok[r]) == want[0]
            assert float(lp[r]) == pytest.approx(want[1], abs=1e-5)
    assert checked > 100


def test_sample_tokens_at_the_ends_of_the_unit_interval():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = SamplingParams(temperature=1.0, top_p=1.0)
    assert int(sample_tokens(logits, p, [0.0])[0][0]) == 0  # u = 0: the most likely token
    assert int(sample_tokens(logits, p, [1.0 - 2**-53])[0][0]) == 3  # u near 1: the last token, never past it
    cut = SamplingParams(temperature=1.0, top_p=0.5)  # p = .64, .24, .09, .03: only the first token is kept
    assert int(sample_tokens(logits, cut, [0.999])[0][0]) == 0
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert int(sample_tokens(tied, SamplingParams(temperature=0.0), [0.5])[0][0]) == 1
    assert int(sample_tokens(tied, p, [0.0])[0][0]) == 1  # equal probabilities keep their index order


def test_ties_keep_index_order_even_among_thousands():
    """A stable sort: with 5000 equal logits u = 0 takes token 0 (an unstable sort starts elsewhere)."""
    tok, lp = sample_tokens(torch.zeros(1, 5000), SamplingParams(temperature=1.0, top_p=1.0), [0.0])
    assert int(tok[0]) == 0 and tok.shape == (1,) and lp.shape == (1,)
    assert float(lp[0]) == pytest.approx(-math.log(5000))


def test_a_token_exactly_on_a_cdf_step_or_the_top_p_edge():
    # p = 0.5, 0.5: u = 0.5 lands exactly on the first step, which belongs to the second token (right side)
    assert int(sample_tokens(torch.zeros(1, 2), SamplingParams(temperature=1.0, top_p=1.0), [0.5])[0][0]) == 1
    # p = 0.5, 0.25, 0.25 and top_p = 0.5: the second token has exactly 0.5 before it, so it is cut
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    assert int(sample_tokens(logits, SamplingParams(temperature=1.0, top_p=0.5), [0.99])[0][0]) == 0
    assert int(sample_tokens(logits, SamplingParams(temperature=1.0, top_p=0.51), [0.99])[0][0]) == 1


def test_u_rounding_to_one_stays_on_the_last_kept_token_of_its_own_row():
    top = 1.0 - 2**-53  # 1.0 in float32: the target is the whole mass
    cut = SamplingParams(temperature=1.0, top_p=0.5)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    tok, lp = sample_tokens(logits, cut, [top, top])
    assert tok.tolist() == [0, 1]  # row 0 keeps one token; row 1 (0.25 each) keeps two
    assert lp.tolist() == pytest.approx([2.0 - math.log(sum(math.exp(x) for x in (2, 1, 0, -1))), -math.log(4)])
    # with top_p = 1 nothing is cut, even a token whose mass before it rounds to 1
    full = sample_tokens(torch.tensor([[0.0, -100.0]]), SamplingParams(temperature=1.0, top_p=1.0), [top])[0]
    assert full.tolist() == [1]
