"""Data parallelism over the processes of ``accelerate launch`` / ``torchrun``; with one process every call is a no-op.

Each process takes every ``world``-th prompt of a step, rolls out, renders and judges its share; the
shares are gathered so that every process mines the same pairs and keeps the same bank; each process
computes the loss on its own trajectories (normalised over the whole step), and the LoRA gradients
are summed before the identical optimizer step.
"""

from __future__ import annotations

import os
from typing import Any

import torch


class Processes:
    """The process group this trainer runs in (``WORLD_SIZE`` and ``RANK`` from the launcher)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = None
        if self.world > 1:
            from accelerate import PartialState

            state = PartialState()  # joins the process group: gloo on CPU, nccl on CUDA
            self.device = str(state.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> list[int]:
        """The indices of ``n`` items (a step's prompts) this process works on."""
        return [i for i in range(n) if i % self.world == self.rank]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather_groups(self, mine: list[int], n: int, k: int, trajs: list, verdicts: list) -> tuple[list, list]:
        """Every process's trajectories and verdicts (``k`` per prompt of ``mine``), for all ``n`` prompts in order."""
        if self.world == 1:
            return trajs, verdicts
        got = self.gather([(i, trajs[j * k : (j + 1) * k], verdicts[j * k : (j + 1) * k]) for j, i in enumerate(mine)])
        by_prompt = {i: (ts, vs) for part in got for i, ts, vs in part}
        return ([tr for i in range(n) for tr in by_prompt[i][0]], [v for i in range(n) for v in by_prompt[i][1]])

    def sum_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Each key summed over the processes."""
        if self.world == 1:
            return stats
        parts = self.gather(stats)
        return {k: sum(p[k] for p in parts) for k in stats}

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
