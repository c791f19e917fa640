"""Run folders: what a rollout or bench writes, and how to read it back.

Layout::

    run.json            RunInfo (written first, atomically)
    requests.jsonl      the requests of the run
    trajectories.jsonl  one Trajectory per line
    renders.jsonl       one RenderedImage per line
    verdicts.jsonl      one Verdict per line
    images/             content-addressed PNGs (renders, references used, ground truths)
    summary.json        aggregate scores (written last, atomically)

Lines are appended one whole line per write and fsynced, so a crash leaves every finished case
intact; ``summary.json`` only exists once the run has finished.
"""

from __future__ import annotations

import datetime as _dt
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import (
    ImageStore,
    RenderedImage,
    Request,
    RunInfo,
    Trajectory,
    Verdict,
    append_jsonl,
    atomic_write_json,
    read_jsonl,
)


def new_run_id(prefix: str = "run") -> str:
    return f"{prefix}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class RunWriter:
    def __init__(self, out: str | Path, info: RunInfo):
        self.dir = Path(out)
        if (self.dir / "run.json").exists():
            raise FileExistsError(f"{self.dir} already holds a run; choose another --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.images = ImageStore(self.dir / "images")
        self.info = info
        atomic_write_json(self.dir / "run.json", info.model_dump())

    def add_request(self, request: Request, gt_image=None) -> None:
        if gt_image is not None:
            self.images.put(gt_image)
        append_jsonl(self.dir / "requests.jsonl", request)

    def add(self, traj: Trajectory, rendered: RenderedImage | None, verdict: Verdict) -> None:
        append_jsonl(self.dir / "trajectories.jsonl", traj)
        if rendered is not None:
            append_jsonl(self.dir / "renders.jsonl", rendered)
        append_jsonl(self.dir / "verdicts.jsonl", verdict)

    def finish(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.dir / "summary.json", summary)


@dataclass
class Run:
    dir: Path
    info: RunInfo
    requests: list[Request] = field(default_factory=list)
    trajectories: list[Trajectory] = field(default_factory=list)
    renders: list[RenderedImage] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def images(self) -> ImageStore:
        return ImageStore(self.dir / "images")

    def verdict(self, traj_id: str) -> Verdict | None:
        return next((v for v in self.verdicts if v.trajectory_id == traj_id), None)


def load_run(path: str | Path) -> Run:
    """Read a run folder; a missing or unreadable folder raises with the path in the message."""
    d = Path(path)
    if not (d / "run.json").exists():
        raise FileNotFoundError(f"{d} is not a run folder (no run.json)")
    info = RunInfo.model_validate_json((d / "run.json").read_text("utf-8"))

    def rows(name, model):
        p = d / name
        return read_jsonl(p, model) if p.exists() else []

    return Run(d, info, rows("requests.jsonl", Request), rows("trajectories.jsonl", Trajectory),
               rows("renders.jsonl", RenderedImage), rows("verdicts.jsonl", Verdict))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
