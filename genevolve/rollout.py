"""Batched multi-turn rollouts: B requests x K samples advance together.

Every trajectory is an :class:`~genevolve.agent.Episode` (the protocol's rules live there). Each
round, the engine collects the episodes that still need a turn, asks the policy for all their turns
at once, feeds each text back to its episode (which runs the tool and appends the observation) and
drops finished episodes from the batch. With a :class:`~genevolve.policies.local.LocalPolicy` each
episode keeps a token stream, so the KV cache carries over from turn to turn and the trajectory
records exactly the tokens the policy produced (assistant mask) and their log-probabilities. Any
other policy (the scripted expert, an OpenAI-compatible server) is called one conversation at a
time with the episode's own seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, Callable, Sequence

from .agent import Episode, Tools
from .protocol import MAX_TURNS
from .policies.base import SamplingParams
from .records import Request, Trajectory


def _turn_seed(seed: int, round_index: int, chunk: int) -> int:
    h = hashlib.sha256(f"{seed}/{round_index}/{chunk}".encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFFFFFFFFFFFFFF


def rollout(requests: Sequence[Request], policy: Any, tools: Tools, k: int = 1,
            params: SamplingParams = SamplingParams(), seed: int = 0, guides: dict[str, str] | None = None,
            max_batch: int = 64, on_turn: Callable[[int, int], None] | None = None,
            max_turns: int = MAX_TURNS) -> list[Trajectory]:
    """Roll out ``k`` trajectories per request; returns them in request-major order.

    Trajectory ``i`` of a request uses seed ``seed * 1000 + i`` and id ``<request>-s<seed>-k<i>``.
    ``on_turn(finished, total)`` is called after every round (for progress bars).
    """
    episodes = [Episode(req, tools, seed=seed * 1000 + i, traj_id=f"{req.id}-s{seed}-k{i}",
                        guide=(guides or {}).get(req.id), policy_name=policy.name, max_turns=max_turns)
                for req in requests for i in range(k)]
    batched = hasattr(policy, "continue_streams")
    streams: dict[int, Any] = {}
    if batched:
        from .policies.local import TokenStream

        streams = {id(e): TokenStream() for e in episodes}
    rnd = 0
    while True:
        active = [e for e in episodes if not e.done]
        if not active:
            break
        if batched:
            for c in range(0, len(active), max_batch):
                chunk = active[c : c + max_batch]
                p = replace(params, seed=_turn_seed(seed, rnd, c))
                try:
                    comps = policy.continue_streams([streams[id(e)] for e in chunk], [e.messages for e in chunk], p)
                except Exception as exc:  # the whole chunk failed (e.g. out of memory): record, do not crash
                    for e in chunk:
                        e.fail(f"{type(exc).__name__}: {exc}")
                    continue
                for e, comp in zip(chunk, comps):
                    e.step(comp.text, finish_reason=comp.finish_reason)
        else:
            for e in active:
                try:
                    text = policy.complete(e.messages, seed=e.traj.seed)
                except Exception as exc:
                    e.fail(f"{type(exc).__name__}: {exc}")
                    continue
                e.step(text)
        rnd += 1
        if on_turn:
            on_turn(sum(e.done for e in episodes), len(episodes))
    out = []
    for e in episodes:
        if batched:
            st = streams[id(e)]
            e.traj.token_ids, e.traj.assistant_mask, e.traj.token_logprobs = list(st.ids), list(st.mask), list(st.logprobs)
            if st.resets:
                e.traj.errors.append(f"token stream re-encoded {st.resets} time(s): earlier turns' log-probabilities are 0")
        out.append(e.traj)
    return out
