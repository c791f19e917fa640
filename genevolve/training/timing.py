"""Wall time of the named phases of a training step (the ``t_<phase>`` columns of ``metrics.jsonl``)."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator


class PhaseTimer:
    """Seconds per phase, in the order the phases first ran; a phase timed twice adds up."""

    def __init__(self):
        self.start = time.time()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t = time.time()
        try:
            yield
        finally:
            self.add(phase, time.time() - t)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def elapsed(self) -> float:
        return time.time() - self.start

    def columns(self) -> dict[str, float]:
        return {f"t_{k}": v for k, v in self.seconds.items()}
