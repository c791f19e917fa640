"""Cold-start SFT data from the scripted expert.

The mix teaches two things: how to act without help (noisy expert trajectories, no guide: skipped
skills, distractor references, loose wording, skipped searches) and how to use a decision guide
when one is in the system prompt (the same noisy expert, following the request's correct guide).
"""

from __future__ import annotations

import random
from typing import Iterator

from ..agent import Tools, run_to_end
from ..guides import oracle_guide
from ..protocol import trajectory_to_messages
from ..records import Trajectory
from ..world.expert import ExpertNoise, ExpertPolicy


def expert_trajectories(world, split: str = "sft", noisy_per_request: int = 1, guided_fraction: float = 0.5,
                        seed: int = 0, noise: ExpertNoise | None = None) -> Iterator[Trajectory]:
    """Yield noisy unguided trajectories and, for a fraction of requests, a guide-following one."""
    tools = Tools.for_world(world)
    expert = ExpertPolicy(world, noise or ExpertNoise.cold_start(), name="expert-cold-start")
    rng = random.Random(seed)
    for i, req in enumerate(world.split(split)):
        for j in range(noisy_per_request):
            yield run_to_end(req, expert, tools, seed=seed * 100_000 + i * 10 + j, traj_id=f"{req.id}-sft{j}")
        if rng.random() < guided_fraction:
            yield run_to_end(req, expert, tools, seed=seed * 100_000 + i * 10 + 9, traj_id=f"{req.id}-guided",
                             guide=oracle_guide(world, req))


def conversations(trajs) -> list[list[dict]]:
    return [trajectory_to_messages(t) for t in trajs if t.termination == "answer"]
