"""Batched multi-turn rollouts: B requests x K samples advance together.

Every trajectory is an :class:`~genevolve.agent.loop.Episode` (the protocol's rules live there); the
policy drives them all through one call, :meth:`~genevolve.policies.base.RolloutPolicy.run_conversations`.
A :class:`~genevolve.policies.local.LocalPolicy` runs the episodes in one batch with continuous
batching (:mod:`genevolve.policies.continuous`): an episode whose turn ends runs its tool and
rejoins while the others keep writing, its KV cache stays in place from turn to turn, and the
trajectory records exactly the tokens the policy produced (assistant mask) and their
log-probabilities. A policy that writes one turn at a time (the scripted expert, an
OpenAI-compatible server) is asked one conversation at a time with the episode's own seed, round
by round (:class:`~genevolve.policies.base.TurnByTurnPolicy`); its trajectories hold no tokens.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .loop import Episode, Tools
from .protocol import MAX_TURNS
from ..policies.base import Completion, ModelCallError, RolloutPolicy, SamplingParams
from ..records.schema import Request, Trajectory


def episodes_for(requests: Sequence[Request], policy: RolloutPolicy, tools: Tools, k: int = 1, seed: int = 0,
                 guides: dict[str, str] | None = None, max_turns: int = MAX_TURNS, suffix: str = "") -> list[Episode]:
    """The episodes :func:`rollout` runs: ``k`` per request, request-major; trajectory ``i`` of a request
    has seed ``seed * 1000 + i`` and id ``<request>-s<seed>-k<i><suffix>``."""
    return [Episode(req, tools, seed=seed * 1000 + i, traj_id=f"{req.id}-s{seed}-k{i}{suffix}",
                    guide=(guides or {}).get(req.id), policy_name=policy.name, max_turns=max_turns)
            for req in requests for i in range(k)]


def rollout(requests: Sequence[Request], policy: RolloutPolicy, tools: Tools, k: int = 1,
            params: SamplingParams = SamplingParams(), seed: int = 0, guides: dict[str, str] | None = None,
            max_batch: int = 64, on_turn: Callable[[int, int], None] | None = None,
            max_turns: int = MAX_TURNS) -> list[Trajectory]:
    """Roll out ``k`` trajectories per request; returns them in request-major order.

    Trajectory ``i`` of a request uses seed ``seed * 1000 + i`` and id ``<request>-s<seed>-k<i>``; its
    tokens depend only on the weights, its own messages and that seed, never on the rest of the batch.
    ``on_turn(finished, total)`` reports progress (for progress bars): as trajectories finish, or
    after each round of a turn-by-turn policy. ``max_batch`` caps the rows of a local policy's batch;
    more trajectories wait for a free row. A turn the policy could not write ends its trajectory with
    termination ``error``.
    """
    eps = episodes_for(requests, policy, tools, k, seed, guides, max_turns)
    return run_episodes(eps, policy, params, max_batch=max_batch, on_turn=on_turn)


def run_episodes(episodes: Sequence[Episode], policy: RolloutPolicy, params: SamplingParams = SamplingParams(),
                 max_batch: int = 64, on_turn: Callable[[int, int], None] | None = None) -> list[Trajectory]:
    """Run ``episodes`` together (one batch for a local policy) to their ends; their trajectories, in order.
    Episodes of different requests, seeds and guides may share the batch (see :func:`rollout`)."""

    def next_messages(i: int):
        return None if episodes[i].done else episodes[i].messages

    def turn_done(i: int, comp: Completion) -> None:
        if comp.finish_reason == "error":
            episodes[i].fail(comp.error or "policy failed")
        else:
            turn = episodes[i].step(comp.text, finish_reason=comp.finish_reason)
            if comp.error:  # a turn that came back, with a note (e.g. cut for being too long)
                episodes[i].traj.errors.append(f"turn {turn.index}: {comp.error}")

    def progress() -> None:
        on_turn(sum(e.done for e in episodes), len(episodes))

    try:
        streams = policy.run_conversations(len(episodes), next_messages, turn_done, params, max_batch=max_batch,
                                           seeds=[e.traj.seed for e in episodes], on_progress=progress if on_turn else None)
    except ModelCallError as exc:  # the model failed mid-batch (e.g. out of memory): record, do not crash
        streams = exc.streams
        for e in episodes:
            if not e.done:
                e.fail(str(exc))
    out = []
    for e, st in zip(episodes, streams):
        e.traj.token_ids, e.traj.assistant_mask, e.traj.token_logprobs = list(st.ids), list(st.mask), list(st.logprobs)
        if st.resets:
            e.traj.errors.append(f"token stream re-encoded {st.resets} time(s): earlier turns' log-probabilities are 0")
        out.append(e.traj)
    return out
