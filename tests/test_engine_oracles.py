"""The rollout engine checked from the inside: which uniform number each sampled token used, and what a model
failure in the middle of a batch leaves behind (a tiny random model, no download)."""

from __future__ import annotations

from collections import defaultdict

from genevolve.agent.loop import Tools
from genevolve.agent.rollout import rollout
from genevolve.policies.base import SamplingParams
from genevolve.records.schema import Request
from test_local_policy import FakeTools, policy  # noqa: F401  (the tiny random model, a module fixture)

REQS = [Request(id="r1", text="Draw a red circle."), Request(id="r2", text="Draw two blue squares above a star.")]
TOOLS = Tools(FakeTools(), FakeTools(), FakeTools())


def _sampled_positions(t) -> list[int]:
    return [i for i, m in enumerate(t.assistant_mask) if m]


def test_each_token_uses_the_uniform_keyed_by_its_position_in_the_stream(policy, monkeypatch):
    """Every sampled token's uniform number is keyed by (its conversation, its position in the whole stream), so no
    two tokens of a conversation share one; keyed by the position within the turn, every turn would reuse the
    same numbers (and still look random)."""
    from genevolve.policies import continuous

    used: dict[int, list[int]] = defaultdict(list)
    real = continuous.uniform

    def spy(key, position):
        used[key].append(position)
        return real(key, position)

    monkeypatch.setattr(continuous, "uniform", spy)
    trajs = rollout(REQS, policy, TOOLS, k=2, params=SamplingParams(max_new_tokens=12, seed=0), seed=3)
    assert any(len(t.turns) > 1 for t in trajs)  # multi-turn: the case where the two keyings differ
    assert sorted(sorted(p) for p in used.values()) == sorted(_sampled_positions(t) for t in trajs)
    for positions in used.values():
        assert len(set(positions)) == len(positions)  # no uniform number used twice in a conversation


def test_a_model_failure_later_in_the_batch_leaves_finished_trajectories_as_they_were(policy, monkeypatch):
    """One row at a time: r1's trajectory finishes before r2 starts; the model then fails. r1 keeps its answer
    (the same tokens as when it ran alone); only r2 is an error."""
    params = SamplingParams(max_new_tokens=12, seed=0)
    calls = {"n": 0}
    real = policy.model.forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(policy.model, "forward", counting)
    (alone,) = rollout(REQS[:1], policy, TOOLS, k=1, params=params, seed=3, max_batch=1)
    n_first = calls["n"]

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n_first + 1:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    calls["n"] = 0
    monkeypatch.setattr(policy.model, "forward", failing)
    first, second = rollout(REQS, policy, TOOLS, k=1, params=params, seed=3, max_batch=1)
    assert alone.termination != "error"
    assert first.termination == alone.termination and first.token_ids == alone.token_ids and first.errors == alone.errors
    assert second.termination == "error" and any("out of memory" in e for e in second.errors)
