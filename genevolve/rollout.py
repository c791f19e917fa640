"""Batched multi-turn rollouts: B requests x K samples advance together.

Every trajectory is an :class:`~genevolve.agent.Episode` (the protocol's rules live there). With a
:class:`~genevolve.policies.local.LocalPolicy` the episodes share one batch with continuous
batching (:mod:`genevolve.policies.continuous`): an episode whose turn ends runs its tool and
rejoins while the others keep writing, its KV cache stays in place from turn to turn, and the
trajectory records exactly the tokens the policy produced (assistant mask) and their
log-probabilities. Any other policy (the scripted expert, an OpenAI-compatible server) is called
one conversation at a time with the episode's own seed, round by round.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .agent import Episode, Tools
from .protocol import MAX_TURNS
from .policies.base import SamplingParams
from .records import Request, Trajectory


def rollout(requests: Sequence[Request], policy: Any, tools: Tools, k: int = 1,
            params: SamplingParams = SamplingParams(), seed: int = 0, guides: dict[str, str] | None = None,
            max_batch: int = 64, on_turn: Callable[[int, int], None] | None = None,
            max_turns: int = MAX_TURNS) -> list[Trajectory]:
    """Roll out ``k`` trajectories per request; returns them in request-major order.

    Trajectory ``i`` of a request uses seed ``seed * 1000 + i`` and id ``<request>-s<seed>-k<i>``; its
    tokens depend only on the weights, its own messages and that seed, never on the rest of the batch.
    ``on_turn(finished, total)`` is called as trajectories finish (for progress bars). ``max_batch``
    caps the rows of a local policy's batch; more trajectories wait for a free row.
    """
    episodes = [Episode(req, tools, seed=seed * 1000 + i, traj_id=f"{req.id}-s{seed}-k{i}",
                        guide=(guides or {}).get(req.id), policy_name=policy.name, max_turns=max_turns)
                for req in requests for i in range(k)]
    batched = hasattr(policy, "run_conversations")
    streams: list[Any] = []
    if batched:
        from .policies.continuous import ModelCallError

        def next_messages(i: int):
            return None if episodes[i].done else episodes[i].messages

        def turn_done(i: int, comp) -> None:
            episodes[i].step(comp.text, finish_reason=comp.finish_reason)
            if episodes[i].done and on_turn:
                on_turn(sum(e.done for e in episodes), len(episodes))

        try:
            streams = policy.run_conversations(len(episodes), next_messages, turn_done, params, max_batch=max_batch,
                                               seeds=[e.traj.seed for e in episodes])
        except ModelCallError as exc:  # the model failed mid-batch (e.g. out of memory): record, do not crash
            streams = exc.streams
            for e in episodes:
                if not e.done:
                    e.fail(str(exc))
    else:
        while True:
            active = [e for e in episodes if not e.done]
            if not active:
                break
            for e in active:
                try:
                    text = policy.complete(e.messages, seed=e.traj.seed)
                except Exception as exc:
                    e.fail(f"{type(exc).__name__}: {exc}")
                    continue
                e.step(text)
            if on_turn:
                on_turn(sum(e.done for e in episodes), len(episodes))
    out = []
    for i, e in enumerate(episodes):
        if batched:
            st = streams[i]
            e.traj.token_ids, e.traj.assistant_mask, e.traj.token_logprobs = list(st.ids), list(st.mask), list(st.logprobs)
            if st.resets:
                e.traj.errors.append(f"token stream re-encoded {st.resets} time(s): earlier turns' log-probabilities are 0")
        out.append(e.traj)
    return out
