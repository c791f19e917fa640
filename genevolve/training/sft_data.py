"""Cold-start SFT data from the scripted expert.

The mix teaches two things: how to act without help (noisy expert trajectories, no guide: skipped
skills, distractor references, loose wording, skipped searches) and how to use a decision guide
when one is in the system prompt (the same noisy expert, following the request's correct guide).

``extra_per_category`` adds freshly sampled requests from the same world (texts never equal to any
request of any split); ``genevolve/training/sft.py`` says why.
"""

from __future__ import annotations

import random
from typing import Iterator

from ..agent.loop import Tools, run_to_end
from ..agent.guides import oracle_guide
from ..agent.protocol import trajectory_to_messages
from ..records.schema import Request, Trajectory
from ..agent.expert import ExpertNoise, ExpertPolicy


def sft_requests(world, split: str = "sft", extra_per_category: int = 0, seed: int = 0) -> list[Request]:
    """The split's requests plus ``extra_per_category`` new ones per category (split ``<split>-extra``)."""
    reqs = list(world.split(split))
    if extra_per_category:
        from ..world.build import sample_requests

        seen = {r.text for r in world.requests}
        reqs += sample_requests(world.data, random.Random(f"extra-{seed}"), f"{split}-extra", extra_per_category, seen)
    return reqs


def expert_trajectories(world, split: str = "sft", noisy_per_request: int = 1, guided_fraction: float = 0.5,
                        seed: int = 0, noise: ExpertNoise | None = None,
                        extra_per_category: int = 0) -> Iterator[Trajectory]:
    """Yield noisy unguided trajectories and, for a fraction of requests, a guide-following one."""
    tools = Tools.for_world(world)
    expert = ExpertPolicy(world, noise or ExpertNoise.cold_start(), name="expert-cold-start")
    rng = random.Random(seed)
    for i, req in enumerate(sft_requests(world, split, extra_per_category, seed)):
        for j in range(noisy_per_request):
            yield run_to_end(req, expert, tools, seed=seed * 100_000 + i * 10 + j, traj_id=f"{req.id}-sft{j}")
        if rng.random() < guided_fraction:
            yield run_to_end(req, expert, tools, seed=seed * 100_000 + i * 10 + 9, traj_id=f"{req.id}-guided",
                             guide=oracle_guide(world, req))


def conversations(trajs) -> list[list[dict]]:
    return [trajectory_to_messages(t) for t in trajs if t.termination == "answer"]
