"""The continuous batch (genevolve/policies/continuous.py) from the outside: what it asks ``admit`` for, how its
rows grow and shrink, the shared system block computed once, and a model failure while computing it."""

from __future__ import annotations

import pytest

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

    def __init__(self, n: int, arrivals: dict[int, list[int]] | None = None):
        self.convs = [_conv(k) for k in range(n)]
        self.turns: dict[int, int] = {}
        self.arrivals = dict(arrivals or {})  # token count -> seeds arriving then
        self.pending: list[int] = []
        self.tokens = 0
        self.asked: list[tuple[int, int, int]] = []  # (free, rows not taken, queued) when admit was asked
        self.rows_seen: list[int] = []
        self.stop_at_first: set[int] = set()  # conversations whose turn ends at their first token
        self.batch: ContinuousBatch | None = None

    def next_messages(self, i):
        return None if self.turns.get(i) else self.convs[i]

    def on_turn(self, i, completion):
        self.turns[i] = self.turns.get(i, 0) + 1

    def on_token(self, i, token, logprob, logits):
        self.tokens += 1
        self.pending += self.arrivals.pop(self.tokens, [])
        self.rows_seen.append(self.batch.rows)
        return i in self.stop_at_first

    def admit(self, free):
        b = self.batch
        self.asked.append((free, b.max_batch - b.n_decode - b.n_wait, len(b.queue)))
        take, self.pending = self.pending[:free], self.pending[free:]
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
