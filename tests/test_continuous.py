"""The continuous batch (genevolve/policies/continuous.py) from the outside: what it asks ``admit`` for, how its
rows grow and shrink, the shared system block computed once, and a model failure while computing it."""

from __future__ import annotations

import inspect

import pytest
import torch

from genevolve.agent.protocol import SYSTEM_PROMPT
from genevolve.policies import continuous
from genevolve.policies.base import ModelCallError, SamplingParams
from genevolve.policies.continuous import ContinuousBatch
from genevolve.policies.local import LocalPolicy

PARAMS = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=6, seed=3)


@pytest.fixture(scope="module")
def local(tiny_folder) -> LocalPolicy:
    return LocalPolicy.load(tiny_folder, device="cpu", dtype="float32", name="tiny-random")


def _conv(k: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"draw {k} red circles"}]


class _Driver:
    """Single-turn conversations; arrivals released to ``admit`` after given numbers of sampled tokens."""

    def __init__(self, n: int, arrivals: dict[int, list[int]] | None = None, convs: list | None = None):
        self.convs = convs if convs is not None else [_conv(k) for k in range(n)]
        self.turns: dict[int, int] = {}
        self.needed: dict[int, int] = {}  # turns a conversation takes (default 1)
        self.texts: dict[int, list[str]] = {}
        self.turn_tokens: dict[int, int] = {}
        self.arrivals = dict(arrivals or {})  # token count -> seeds arriving then
        self.pending: list[int] = []
        self.tokens = 0
        self.asked: list[tuple[int, int, int]] = []  # (free, rows not taken, queued) when admit was asked
        self.rows_seen: list[int] = []
        self.stop_at_first: set[int] = set()  # conversations whose turns end at their first token
        self.buffer_rows: list[int] = []
        self.admitted_with: list[tuple[int, int]] = []  # (conversations admitted, rows then waiting)
        self.batch: ContinuousBatch | None = None

    def next_messages(self, i):
        done = self.turns.get(i, 0)
        if done >= self.needed.get(i, 1):
            return None
        history = []
        for text in self.texts.get(i, []):
            history += [{"role": "assistant", "content": text}, {"role": "user", "content": "go on"}]
        return self.convs[i] + history

    def on_turn(self, i, completion):
        self.turns[i] = self.turns.get(i, 0) + 1
        self.texts.setdefault(i, []).append(completion.text)
        self.turn_tokens[i] = 0

    def on_token(self, i, token, logprob, logits):
        self.tokens += 1
        self.pending += self.arrivals.pop(self.tokens, [])
        self.rows_seen.append(self.batch.rows)
        self.buffer_rows.append(self.batch.bufs[0].shape[0])
        self.turn_tokens[i] = self.turn_tokens.get(i, 0) + 1
        return i in self.stop_at_first and self.turn_tokens[i] == 1

    def admit(self, free):
        b = self.batch
        self.asked.append((free, b.max_batch - b.n_decode - b.n_wait, len(b.queue)))
        take, self.pending = self.pending[:free], self.pending[free:]
        if take:
            self.admitted_with.append((len(take), b.n_wait))
        for s in take:
            self.convs.append(_conv(100 + s))
        return take

    def run(self, local, max_batch=64, admit=True):
        self.batch = ContinuousBatch(local, len(self.convs), self.next_messages, self.on_turn, PARAMS,
                                     max_batch=max_batch, on_token=self.on_token,
                                     admit=self.admit if admit else None)
        return self.batch.run()


def _alone(local, conv, seed):
    done = []
    out = ContinuousBatch(local, 1, lambda i: None if done else conv, lambda i, c: done.append(1), PARAMS,
                          seeds=[seed]).run()
    return out[0].ids


def test_admit_is_asked_only_for_rows_no_conversation_holds_or_waits_for(local):
    d = _Driver(5, arrivals={2: [7], 9: [8, 9, 10, 11]})
    streams = d.run(local, max_batch=3)
    assert d.asked and all(free > 0 for free, _, _ in d.asked)
    assert all(queued == 0 and free == open_rows for free, open_rows, queued in d.asked)
    assert sorted(d.turns) == list(range(len(d.convs))) == list(range(10))  # 5 + 5 admitted, each once
    assert all(n == 1 for n in d.turns.values())
    assert max(d.rows_seen) <= 3
    for i in (5, 9):  # admitted conversations answer as they would alone
        seed = {5: 7, 9: 11}[i]
        assert streams[i].ids == _alone(local, d.convs[i], seed)


def test_admitted_conversations_get_rows_at_once_up_to_max_batch(local):
    d = _Driver(1, arrivals={2: [1, 2, 3]})
    d.run(local, max_batch=3)
    grew = d.rows_seen[d.rows_seen.index(3)] if 3 in d.rows_seen else None
    assert grew == 3 and max(d.rows_seen) == 3  # two joined at once (3 rows); the third waited for a free row
    assert sorted(d.turns) == [0, 1, 2, 3]


def test_idle_rows_are_dropped_when_nothing_is_queued(local):
    d = _Driver(4)
    d.stop_at_first = {0, 1, 2}
    d.run(local, admit=False)
    assert d.rows_seen[0] == 4 and d.rows_seen[-1] == 1  # three finished: the last one decodes alone


def test_a_shared_system_block_is_computed_once_and_changes_nothing(local, monkeypatch):
    calls = []
    real = ContinuousBatch._prefix_kv
    monkeypatch.setattr(ContinuousBatch, "_prefix_kv", lambda self, block: calls.append(len(block)) or real(self, block))
    shared = [s.ids for s in _Driver(3).run(local, admit=False)]
    assert len(calls) == 1 and calls[0] >= continuous.MIN_SHARED_PREFIX
    monkeypatch.setattr(continuous, "MIN_SHARED_PREFIX", 10**9)
    calls.clear()
    alone = [s.ids for s in _Driver(3).run(local, admit=False)]
    assert calls == [] and alone == shared


def test_a_model_failure_while_computing_the_shared_block_is_a_model_call_error(local, monkeypatch):
    """Two rows share the system block: the first model call computes it, and its failure is reported as a
    ModelCallError that names the exception and carries the streams written so far."""
    calls = []

    def failing(*a, **kw):
        calls.append(kw["input_ids"].shape)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(local.model, "forward", failing)
    d = _Driver(2)
    with pytest.raises(ModelCallError) as err:
        d.run(local, admit=False)
    assert calls[0][0] == 1  # one row: the shared block
    assert str(err.value) == "RuntimeError: out of memory"
    assert err.value.streams is d.batch.streams and len(err.value.streams) == 2


# --- shapes, buffers and the cache keyword ---------------------------------------------------------------------


def test_kv_shape_reads_the_decoder_config_with_its_defaults():
    from types import SimpleNamespace

    plain = SimpleNamespace(num_hidden_layers=3, num_attention_heads=4, hidden_size=100)
    assert continuous._kv_shape(plain) == (3, 4, 4, 25)  # no kv heads: every head; no head_dim: hidden // heads
    odd = SimpleNamespace(num_hidden_layers=2, num_attention_heads=3, hidden_size=100, num_key_value_heads=None)
    assert continuous._kv_shape(odd) == (2, 3, 3, 33)
    given = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, num_key_value_heads=2, head_dim=32)
    assert continuous._kv_shape(given) == (2, 4, 2, 32)

    class Composite:  # a multimodal config: the decoder's sizes are inside
        asked = []

        def get_text_config(self, **kw):
            self.asked.append(kw)
            return given

    assert continuous._kv_shape(Composite()) == (2, 4, 2, 32) and Composite.asked == [{"decoder": True}]


def test_the_cache_keyword_follows_the_base_models_forward(local):
    from peft import LoraConfig, get_peft_model

    from genevolve.training.checkpoint import LORA_TARGETS

    base = type(local.model)
    want = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    assert continuous._cache_keyword(local.model) == want

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    assert continuous._cache_keyword(Old()) == "past_key_values" and continuous._cache_keyword(New()) == "cache"

    class Wrapper(torch.nn.Module):  # a PEFT model: its forward takes **kwargs and passes them on
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_base_model(self):
            return self.inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    assert continuous._cache_keyword(Wrapper(New())) == "cache" and continuous._cache_keyword(Wrapper(Old())) == "past_key_values"
    import copy

    peft = get_peft_model(copy.deepcopy(local.model), LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS,
                                                                 task_type="CAUSAL_LM"))
    assert continuous._cache_keyword(peft) == want


def test_a_batch_has_one_key_and_one_value_buffer_per_layer_in_the_models_dtype(tiny_folder):
    pol = LocalPolicy.load(tiny_folder, device="cpu", dtype="bfloat16", name="tiny-bf16")
    d = _Driver(3)
    d.run(pol, admit=False)
    b = d.batch
    layers = pol.model.config.num_hidden_layers
    assert len(b.bufs) == 2 * layers and all(x.dtype == torch.bfloat16 for x in b.bufs)
    assert b.prefix_kv and all(kv.dtype == torch.bfloat16 for kvs in b.prefix_kv.values() for kv in kvs)
    assert all(x.shape[0] == b.rows and x.shape[2] == b.capacity for x in b.bufs)


def test_the_default_batch_holds_at_most_64_rows(local):
    b = ContinuousBatch(local, 70, lambda i: None, lambda i, c: None, PARAMS)
    assert b.rows == 64 and b.max_batch == 64 and len(b.queue) == 70


@pytest.mark.parametrize("need", [100, 513, 768, 1000, 2049])
def test_capacity_grows_to_a_multiple_of_256_with_256_to_511_spare_and_keeps_what_the_buffers_held(local, need):
    b = ContinuousBatch(local, 2, lambda i: None, lambda i, c: None, PARAMS)
    b._ensure_capacity(3)
    for x in b.bufs:
        x[:, :, :3] = 1.5
    before = b.capacity
    b._ensure_capacity(need)
    cap = b.capacity
    if need <= before:
        assert cap == before
    else:
        assert cap % 256 == 0 and need + 256 <= cap < need + 512, cap
    assert all(x.shape[2] == cap and bool((x[:, :, :3] == 1.5).all()) and bool((x[:, :, 3:] == 0).all()) for x in b.bufs)


# --- what the callbacks see ------------------------------------------------------------------------------------


def test_on_token_sees_the_sampled_tokens_logprob_and_its_rows_logits(local):
    seen = []
    done = [False]
    conv = _conv(1)
    (st,) = ContinuousBatch(local, 1, lambda i: None if done[0] else conv, lambda i, c: done.__setitem__(0, True),
                            PARAMS, on_token=lambda i, t, lp, logits: seen.append((i, t, lp, logits.clone())) or False).run()
    sampled = [(t, lp) for t, m, lp in zip(st.ids, st.mask, st.logprobs) if m]
    assert [(t, lp) for _, t, lp, _ in seen] == sampled and len(seen) == PARAMS.max_new_tokens
    assert all(i == 0 and lg.dim() == 1 and lg.shape[0] >= len(local.tokenizer) for i, _, _, lg in seen)
    for _, t, lp, lg in seen:  # top-p 0.95 leaves the sampled token's own log-probability unchanged
        assert abs(float(torch.log_softmax(lg.float(), -1)[t]) - lp) < 1e-4
    assert set(st.mask) == {0, 1} and sum(st.mask) == PARAMS.max_new_tokens


def test_a_model_failure_in_a_decode_step_names_the_exception(local, monkeypatch):
    real = local.model.forward
    calls = []

    def fails_later(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("bad shape")
        return real(*a, **kw)

    monkeypatch.setattr(local.model, "forward", fails_later)
    d = _Driver(1)
    with pytest.raises(ModelCallError) as err:
        d.run(local, admit=False)
    assert str(err.value) == "ValueError: bad shape" and err.value.streams is d.batch.streams


# --- rows: admission with waiting and idle rows, dropping, buffers ---------------------------------------------


def test_admission_counts_waiting_rows_and_fills_idle_ones(local):
    """Eight rows decode; conversation 0 ends at its first token (its row goes idle). One conversation is admitted
    and waits (one waiting row is under the join fraction of the decoding rows), then two more arrive while it
    waits: the batch grows for them at once (no admitted conversation is left queued), and every conversation
    answers once."""
    d = _Driver(8, arrivals={22: [1], 29: [2, 3]})
    d.stop_at_first = {0}
    d.run(local, max_batch=12)
    assert any(waiting for _, waiting in d.admitted_with)  # an admission found a row waiting for its prefill
    assert all(queued == 0 and free == open_rows for free, open_rows, queued in d.asked)
    assert d.buffer_rows == d.rows_seen and max(d.rows_seen) <= 12
    assert sorted(d.turns) == list(range(11)) and all(n == 1 for n in d.turns.values())


def test_rows_waiting_for_their_next_turn_survive_the_drop_of_idle_rows(local):
    """Four conversations end at their first token, conversation 4 ends its first turn there too and waits for its
    second, conversation 5 decodes: the idle rows are dropped, the waiting one is kept."""
    d = _Driver(6)
    d.stop_at_first = {0, 1, 2, 3, 4}
    d.needed = {4: 2}
    streams = d.run(local, admit=False)
    assert d.turns == {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 1}
    assert d.rows_seen[:7] == [6] * 6 + [2] and d.buffer_rows == d.rows_seen  # 6 first tokens, then the 2 kept rows
    assert sum(streams[4].mask) == 2  # one token in each of its two turns


# --- the shared system block --------------------------------------------------------------------------------


def test_each_system_block_is_shared_only_by_rows_that_start_with_it(local, monkeypatch):
    """Conversation 0 has its own system prompt, conversations 1 and 2 share another; all three ask the same
    thing. Only the shared block is computed, once, and every row's answer is what it is without sharing."""
    calls = []
    real = ContinuousBatch._prefix_kv
    monkeypatch.setattr(ContinuousBatch, "_prefix_kv", lambda self, block: calls.append(block) or real(self, block))
    other = "You are a painter's assistant. Think step by step, search for references, then answer with a program."
    convs = [[{"role": "system", "content": other}, {"role": "user", "content": "draw a red fox"}]] + [
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "draw a red fox"}] for _ in range(2)]
    shared = [s.ids for s in _Driver(3, convs=convs).run(local, admit=False)]
    assert len(calls) == 1
    text = local.tokenizer.apply_chat_template([convs[1][0]], tokenize=False)
    assert calls[0] == tuple(local.tokenizer(text, add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(continuous, "MIN_SHARED_PREFIX", 10**9)
    assert [s.ids for s in _Driver(3, convs=convs).run(local, admit=False)] == shared


def test_a_block_exactly_min_shared_prefix_long_is_shared(local, monkeypatch):
    text = local.tokenizer.apply_chat_template([_conv(0)[0]], tokenize=False)
    n = len(local.tokenizer(text, add_special_tokens=False)["input_ids"])
    calls = []
    real = ContinuousBatch._prefix_kv
    monkeypatch.setattr(ContinuousBatch, "_prefix_kv", lambda self, block: calls.append(len(block)) or real(self, block))
    monkeypatch.setattr(continuous, "MIN_SHARED_PREFIX", n)
    _Driver(2).run(local, admit=False)
    monkeypatch.setattr(continuous, "MIN_SHARED_PREFIX", n + 1)
    _Driver(2).run(local, admit=False)
    assert calls == [n]


# --- prefill in as few calls as the bound allows ------------------------------------------------------------


def test_prefill_calls_hold_as_many_rows_as_prefill_scores_allows(local, monkeypatch):
    """Each prefill call's attention scores (rows x new tokens x width x heads) stay within PREFILL_SCORES unless
    it is one row, and the next row would not have fitted: as few calls as the bound allows. The bound is set to
    exactly the two longest rows' scores, so that every two neighbours fit together (the longest exactly at the
    bound) and no three do."""
    monkeypatch.setattr(continuous, "MIN_SHARED_PREFIX", 10**9)  # every row prefilled from its first token
    calls = []
    real = ContinuousBatch._forward

    def forward(self, lo, hi, x, keep):
        if keep is not None:  # a prefill call
            calls.append((lo, hi, [len(self.streams[self.slot[r]].ids) - self.lengths[r] for r in range(lo, hi)],
                          [self.lengths[r] for r in range(lo, hi)]))
        return real(self, lo, hi, x, keep)

    monkeypatch.setattr(ContinuousBatch, "_forward", forward)
    convs = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "draw " + "a red fox " * k}]
             for k in range(1, 7)]
    heads = local.model.config.num_attention_heads

    def scores(news, lengths):
        return len(news) * max(news) * max(a + b for a, b in zip(lengths, news)) * heads

    monkeypatch.setattr(continuous, "PREFILL_SCORES", 2**40)
    unbounded = [s.ids for s in _Driver(6, convs=convs).run(local, admit=False)]
    assert calls[0][:2] == (0, 6)  # unbounded: one call
    bound = scores(calls[0][2][4:], calls[0][3][4:])
    monkeypatch.setattr(continuous, "PREFILL_SCORES", bound)
    calls.clear()
    assert [s.ids for s in _Driver(6, convs=convs).run(local, admit=False)] == unbounded
    first = calls[: next(i for i, c in enumerate(calls) if c[1] == 6) + 1]  # the first prefill, of all six rows
    assert [c[:2] for c in first] == [(0, 2), (2, 4), (4, 6)]
    for c in first:
        assert len(c[2]) == 1 or scores(c[2], c[3]) <= bound
    for x, y in zip(first, first[1:]):  # the first row of the next call did not fit in this one
        assert scores(x[2] + y[2][:1], x[3] + y[3][:1]) > bound


# --- a stream re-encoded from scratch -------------------------------------------------------------------------


def test_a_conversation_whose_history_changes_is_re_encoded_and_read_from_scratch(local):
    """The second turn's messages do not extend the first's (the caller rewrote the request): the stream is
    re-encoded, its row's cache is dropped, and the second turn's log-probabilities are the model's own over the
    new stream."""
    turns = []
    first = _conv(3)
    rewritten = [first[0], {"role": "user", "content": "draw seven blue squares instead"}]

    def next_messages(i):
        if len(turns) == 2:
            return None
        return first if not turns else rewritten + [{"role": "assistant", "content": turns[0]},
                                                   {"role": "user", "content": "go on"}]

    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=5, seed=2)
    (st,) = ContinuousBatch(local, 1, next_messages, lambda i, c: turns.append(c.text), params).run()
    assert st.resets == 1
    with torch.no_grad():
        logp = torch.log_softmax(local.model(input_ids=torch.tensor([st.ids])).logits[0].float(), -1)
    last = [p for p, m in enumerate(st.mask) if m][-5:]  # the second turn's sampled tokens
    want = [float(logp[p - 1, st.ids[p]]) for p in last]
    assert [st.logprobs[p] for p in last] == pytest.approx(want, abs=1e-4)


def test_a_next_turn_prefills_only_the_tokens_the_conversation_gained(local, monkeypatch):
    """Between turns a row keeps its cache: the second turn's prefill runs the observation and the new prompt only."""
    shapes = []
    real = ContinuousBatch._forward

    def forward(self, lo, hi, x, keep):
        if keep is not None:
            shapes.append((x.shape[1], len(self.streams[self.slot[lo]].ids), self.lengths[lo]))
        return real(self, lo, hi, x, keep)

    monkeypatch.setattr(ContinuousBatch, "_forward", forward)
    d = _Driver(1)
    d.needed = {0: 2}
    (st,) = d.run(local, admit=False)
    assert len(shapes) == 2 and shapes[0][2] == 0 and shapes[0][0] == shapes[0][1]  # the first turn: everything
    new, total, held = shapes[1]
    assert held > 0 and new == total - held < total // 2  # the second: only what was added
