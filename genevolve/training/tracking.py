"""Tracking where researchers already look: ``--report-to trackio|tensorboard|none``, as TRL's trainers take it.

A run's config goes there when it opens, every step's metrics (its rewards, losses, retrieval, timings and the
live probe's teacher-student gap) as scalars, and the final report's table as a table. Both work offline:

- ``tensorboard`` writes event files to ``<run>/tensorboard/`` (``tensorboard --logdir <run>/tensorboard``);
- ``trackio`` (local-first, on Gradio and datasets) writes to its own folder, ``$TRACKIO_DIR`` (by default
  ``~/.cache/huggingface/trackio``), under project ``genevolve`` with the run folder's name as the run's name; a
  resumed run goes on logging into the same trackio run (``trackio show --project genevolve``).

A tracker that fails (a full disk, a broken install) says so once and the run goes on without it: tracking never
costs a training run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

REPORT_TO = ("none", "tensorboard", "trackio")
PROJECT = "genevolve"


def check(report_to: str) -> str:
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to is one of {', '.join(REPORT_TO)}, not {report_to!r}")
    return report_to


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite values of a metrics row (booleans, text and nulls left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k not in ("v", "step")}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    return "\n".join(["| " + " | ".join(map(str, headers)) + " |", "|" + " --- |" * len(headers)]
                     + ["| " + " | ".join("" if x is None else str(x) for x in r) + " |" for r in rows])


def run_name(out: str | Path) -> str:
    """A run's name in a tracker: its folder's name, with the ablation's for an arm of one (grpo-s0 of which)."""
    out = Path(out)
    return f"{out.parent.name}/{out.name}" if (out.parent / "ablate_config.json").exists() else out.name


class Tracker:
    """The no-op tracker (``none``); the others override these three."""

    name = "none"

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def table(self, name: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        pass

    def finish(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, out: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, metrics, step):
        for k, v in scalars(metrics).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def table(self, name, headers, rows):
        self.writer.add_text(name, markdown_table(headers, rows))
        self.writer.flush()

    def finish(self):
        self.writer.close()


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, out: Path, config: dict[str, Any]):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=PROJECT, name=run_name(out), config=config, resume="allow",
                                auto_log_cpu=False, auto_log_gpu=False)

    def log(self, metrics, step):
        self.trackio.log(scalars(metrics), step=step)

    def table(self, name, headers, rows):
        self.trackio.log({name: self.trackio.Table(columns=list(headers), data=[list(r) for r in rows])})

    def finish(self):
        self.trackio.finish()


class Guarded(Tracker):
    """A tracker whose failures are reported once (``warn``) and then ignored: the run goes on."""

    def __init__(self, inner: Tracker, warn: Callable[[str], None]):
        self.inner, self.warn, self.name, self.broken = inner, warn, inner.name, False

    def _call(self, what: str, *args) -> None:
        if self.broken:
            return
        try:
            getattr(self.inner, what)(*args)
        except Exception as exc:  # tracking must never end a training run
            self.broken = True
            self.warn(f"warning: --report-to {self.name} failed ({type(exc).__name__}: {exc}); the run goes on without it")

    def log(self, metrics, step):
        self._call("log", metrics, step)

    def table(self, name, headers, rows):
        self._call("table", name, headers, rows)

    def finish(self):
        self._call("finish")


def open_tracker(report_to: str, out: str | Path, config: dict[str, Any],
                 warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Tracker:
    """The tracker named by ``report_to`` for the run in ``out``, with its config logged."""
    kind = check(report_to)
    if kind == "none":
        return Tracker()
    try:
        inner = TensorBoardTracker(Path(out), config) if kind == "tensorboard" else TrackioTracker(Path(out), config)
    except Exception as exc:
        warn(f"warning: --report-to {kind} could not start ({type(exc).__name__}: {exc}); the run goes on without it")
        return Tracker()
    return Guarded(inner, warn)
