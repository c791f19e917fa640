"""Run folders: what a rollout or bench writes, and how to read it back.

Layout::

    run.json            RunInfo (written first, atomically)
    requests.jsonl      the requests of the run
    trajectories.jsonl  one Trajectory per line
    renders.jsonl       one RenderedImage per line
    verdicts.jsonl      one Verdict per line
    images/             content-addressed PNGs (renders, references used, ground truths)
    summary.json        aggregate scores (written last, atomically)

Every file and ``images/`` exist from the start (empty until a case lands), so a run in which no
trajectory answers is still a whole folder; its summary then says why. Lines are appended one whole
line per write and fsynced, so a crash leaves every finished case intact; ``summary.json`` only exists
once the run has finished.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import (
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
        from .kinds import COMMAND_KIND, claim

        self.dir = Path(out)
        if (self.dir / "run.json").exists():
            raise FileExistsError(f"{self.dir} already holds a run; choose another --out")
        claim(self.dir, COMMAND_KIND.get(info.command, "rollout"), info.command)  # not another kind's folder
        self._claim(info)  # atomic: of two writers started at once into one folder, the second is refused
        self.images = ImageStore(self.dir / "images")
        self.images.root.mkdir(exist_ok=True)
        self.info = info
        self.cases = self.answered = 0
        for name in ("requests.jsonl", "trajectories.jsonl", "renders.jsonl", "verdicts.jsonl"):
            (self.dir / name).touch()

    def _claim(self, info: RunInfo) -> None:
        """Write run.json only if no other writer has: a hard link either creates it whole or fails."""
        tmp = self.dir / f".run.json.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.write_text(info.model_dump_json(indent=2), "utf-8")
        try:
            os.link(tmp, self.dir / "run.json")
        except FileExistsError:
            raise FileExistsError(f"{self.dir} already holds a run (another writer started there just now); "
                                  "choose another --out") from None
        finally:
            tmp.unlink()

    def add_request(self, request: Request, gt_image=None) -> None:
        if gt_image is not None:
            self.images.put(gt_image)
        append_jsonl(self.dir / "requests.jsonl", request)

    def add(self, traj: Trajectory, rendered: RenderedImage | None, verdict: Verdict) -> None:
        append_jsonl(self.dir / "trajectories.jsonl", traj)
        if rendered is not None:
            append_jsonl(self.dir / "renders.jsonl", rendered)
        append_jsonl(self.dir / "verdicts.jsonl", verdict)
        self.cases += 1
        self.answered += traj.program is not None

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.answered:
            summary = {**summary, "note": "no trajectory produced an answer" if self.cases else "no trajectories ran"}
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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def policy_checksum(policy: str, adapter: str | None = None, label: str | None = None, model: str = "default") -> str:
    """sha256 naming what a ``--policy`` ran: the weight files of a local model and of its adapter, the scripted
    policy's label (its name and noise knobs), or a remote server's URL and model name (its weights are out of sight)."""
    h = hashlib.sha256()
    if policy in ("expert", "raw"):
        h.update((label or policy).encode("utf-8"))
        return h.hexdigest()
    if policy.startswith(("http://", "https://")):
        h.update(f"{policy}|{model}".encode("utf-8"))
        return h.hexdigest()
    if policy == "tiny":
        from ..policies.tiny import TINY_DIR as folder
    elif policy == "smollm2":
        from ..policies.resolve import smollm2_path

        folder = smollm2_path()[0]
    else:
        folder = Path(policy)
    for d in [Path(folder)] + ([Path(adapter)] if adapter else []):
        files = sorted(p for p in d.iterdir() if p.suffix in WEIGHT_SUFFIXES) if d.is_dir() else []
        if not files:
            raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {d}")
        for p in files:
            h.update(p.name.encode("utf-8") + b"\0")
            with p.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
