"""What a self-evolution run writes for live viewers (the studio, a notebook), as typed, versioned records.

Besides its checkpoint and bank, a training run folder holds:

- ``metrics.jsonl``: one :class:`MetricsRow` per step (the step's losses, rewards, retrieval, timings);
- ``pairs.jsonl``: one :class:`PairRecord` per mined best-vs-worst pair (step, request, rewards, gap, and
  the experience made from it or why none was), appended one whole line per write;
- ``probe.json``: the latest :class:`ProbeRecord`, rewritten atomically every step: the student's rollout
  on the fixed probe request with the student's and the teacher's log-probability of every token after
  the system block, the teacher's own trajectory on the same request, both verdicts;
- ``progress.json``: where the run is inside its current step (:class:`Progress`: the phase and, for rollouts
  and judging, how many of how many), rewritten atomically as it moves, so a viewer's status and ETA move
  within a step and not only when a step ends;
- ``.lock``: held (``flock``) while a trainer works in the folder, so a second trainer refuses to start
  there and viewers can tell a live run from a finished or stopped one.

Rows carry ``v`` (their format's version); rows written before versions existed read as version 1.
Readers tolerate a torn last line (a run killed mid-append) and a folder that disappears. Steps count
from 1 everywhere: metrics, pairs, probe and the experiences' ``step`` (the step that mined them).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, field_serializer

from .schema import Trajectory, Verdict, append_bytes, atomic_write_json

METRICS_VERSION = 1
PAIRS_VERSION = 1
PROBE_VERSION = 1
PROGRESS_VERSION = 1
PHASES = ("loading", "rollouts", "judging", "mining", "update", "checkpoint", "comparison", "done")


class MetricsRow(BaseModel):
    """One training step. The named fields are what viewers rely on; the trainer adds timings (``t_<phase>``)
    and diagnostics as further fields."""

    model_config = ConfigDict(extra="allow")
    v: int = METRICS_VERSION
    step: int
    arm: str = ""
    reward_mean: float | None = None
    kscore_mean: float | None = None
    grpo_loss: float = 0.0
    ved_loss: float = 0.0
    retrieval_hit_rate: float = 0.0
    bank_size: int = 0
    seconds: float = 0.0

    def get(self, key: str, default: Any = None) -> Any:
        """A field by name, named or extra (a curve asks for columns by name)."""
        return getattr(self, key, default)


class PairRecord(BaseModel):
    v: int = PAIRS_VERSION
    step: int
    request_id: str
    request: str
    best: str
    worst: str
    best_reward: float | None
    worst_reward: float | None
    gap: float
    passed_over: int = 0
    experience: str | None = None
    error: str | None = None


class TokenRow(BaseModel):
    """One token of the probe: its text, whether the policy sampled it (``a``), and the student's (``p``) and
    teacher's (``q``) log-probability of a sampled token."""

    t: str
    a: int
    p: float | None = None
    q: float | None = None


class ProbeCase(BaseModel):
    trajectory: Trajectory
    verdict: Verdict | None = None


class ProbeRecord(BaseModel):
    probe_version: int = PROBE_VERSION
    step: int
    request_id: str
    request: str
    experience_id: str | None = None
    guide: str | None = None
    similarity: float | None = None
    tokens: list[TokenRow]
    student: ProbeCase | None = None
    teacher: ProbeCase | None = None
    note: str = ""
    chosen: str = ""  # how the probe request was chosen (given, or picked by the trainer)
    retrieval: str = ""  # how the teacher's experience was found: "own" (mined from this request) or "nearest"

    @field_serializer("tokens")
    def _tokens(self, tokens: list[TokenRow]) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in tokens]


class Progress(BaseModel):
    """Where a run is: ``step`` (from 1) of ``steps``, in ``phase`` (one of :data:`PHASES`), ``done`` of ``total`` items
    where the phase counts them (rollouts, judged trajectories), since ``step_started`` (Unix time)."""

    v: int = PROGRESS_VERSION
    step: int
    steps: int
    phase: str
    done: int = 0
    total: int = 0
    step_started: float = 0.0
    updated: float = 0.0


class ProgressWriter:
    """Writes ``progress.json`` on every phase change and, within a phase, at most every ``every`` seconds."""

    def __init__(self, out: str | Path, steps: int, every: float = 0.5, clock=None):
        import time

        self.path, self.steps, self.every, self.clock = Path(out) / "progress.json", steps, every, clock or time.time
        self._last: tuple[int, str] | None = None
        self._written = 0.0
        self._started = self.clock()

    def __call__(self, step: int, phase: str, done: int = 0, total: int = 0) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}")
        now = self.clock()
        if (step, phase) != self._last:
            if self._last is None or step != self._last[0]:
                self._started = now
        elif now - self._written < self.every and done < total:
            return
        self._last, self._written = (step, phase), now
        atomic_write_json(self.path, Progress(step=step, steps=self.steps, phase=phase, done=done, total=total,
                                              step_started=self._started, updated=now).model_dump())


def read_progress(out: str | Path) -> Progress | None:
    """The run's progress, or None when it wrote none (an older run, or not started) or it is unreadable."""
    try:
        data = json.loads((Path(out) / "progress.json").read_text("utf-8"))
        return Progress.model_validate(data) if data.get("v") == PROGRESS_VERSION else None
    except (OSError, ValueError):
        return None


class RunLockedError(RuntimeError):
    """Another process is training in this run folder."""


_HELD: dict[str, int] = {}  # run folders this process holds, with their nesting depth


@contextlib.contextmanager
def run_lock(out: str | Path) -> Iterator[None]:
    """Hold ``<out>/.lock`` for the duration; raise :class:`RunLockedError` when someone else holds it.

    Re-entrant within a process (a command holds its run folder from training through evaluation while
    the trainer takes it again). The lock dies with its process, so a crashed run never leaves a stale one."""
    import fcntl

    path = Path(out) / ".lock"
    key = str(path.resolve())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "?"
            raise RunLockedError(f"{out} is being trained by another process (pid {holder}); "
                                 "wait for it to finish or stop it before starting or resuming there") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        _HELD[key] = 1
        try:
            yield
        finally:
            _HELD.pop(key, None)
    finally:
        os.close(fd)  # closing releases the lock, also when the process dies


def is_running(out: str | Path) -> bool:
    """True while some process holds the run folder's lock."""
    import fcntl

    path = Path(out) / ".lock"
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def read_jsonl_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file of objects; a missing file is empty and a torn last line is skipped."""
    try:
        text = Path(path).read_text("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return []
    rows = []
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if n == len(lines) - 1:
                break  # being written, or cut by a kill: the next read sees it whole
            raise ValueError(f"{path}:{n + 1}: not JSON") from None
    return rows


def _check_version(path: str | Path, row: dict[str, Any], version: int) -> None:
    if row.get("v", 1) != version:
        raise ValueError(f"{path} holds rows of version {row.get('v')}; this code reads version {version}")


def read_metrics(path: str | Path) -> list[MetricsRow]:
    """Metrics rows by step; a step logged twice (a run resumed after a kill) keeps its last row."""
    by_step: dict[int, MetricsRow] = {}
    for row in read_jsonl_rows(path):
        _check_version(path, row, METRICS_VERSION)
        rec = MetricsRow.model_validate(row | {"step": int(row.get("step", len(by_step) + 1))})
        by_step[rec.step] = rec
    return [by_step[s] for s in sorted(by_step)]


def read_pairs(path: str | Path) -> list[PairRecord]:
    out = []
    for row in read_jsonl_rows(path):
        _check_version(path, row, PAIRS_VERSION)
        out.append(PairRecord.model_validate(row))
    return out


def _append(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Append rows in one write, then fsync (one whole line each)."""
    if rows:
        append_bytes(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows).encode("utf-8"))


def append_metrics(path: str | Path, row: MetricsRow) -> None:
    _append(path, [row.model_dump()])


def append_pairs(path: str | Path, rows: list[PairRecord]) -> None:
    _append(path, [r.model_dump(exclude={"error"} if r.error is None else set()) for r in rows])


def token_rows(tokenizer, ids: list[int], mask: list[int], logp_student: list[float],
               logp_teacher: list[float] | None, start: int) -> list[TokenRow]:
    """One row per token from ``start``: its text, whether the policy sampled it, and both log-probabilities."""
    out = []
    for i in range(start, len(ids)):
        row = TokenRow(t=tokenizer.decode([ids[i]]), a=int(mask[i]))
        if mask[i]:
            row.p = round(float(logp_student[i]), 4)
            if logp_teacher is not None and i < len(logp_teacher):
                row.q = round(float(logp_teacher[i]), 4)
        out.append(row)
    return out


def probe_case(traj: Trajectory | None, verdict: Verdict | None) -> ProbeCase | None:
    if traj is None:
        return None
    return ProbeCase(trajectory=traj.model_copy(update={"token_ids": [], "assistant_mask": [], "token_logprobs": []}),
                     verdict=verdict)


def write_probe(out: str | Path, record: ProbeRecord) -> None:
    data = record.model_dump(mode="json")
    for who in ("student", "teacher"):  # the trajectories without their token tensors, as the run's other files
        if data.get(who):
            for k in ("token_ids", "assistant_mask", "token_logprobs"):
                data[who]["trajectory"].pop(k, None)
    atomic_write_json(Path(out) / "probe.json", data)


def read_probe(out: str | Path) -> ProbeRecord | None:
    """The latest probe, or None when there is none yet; a probe of another version raises."""
    try:
        data = json.loads((Path(out) / "probe.json").read_text("utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    if data.get("probe_version") != PROBE_VERSION:
        raise ValueError(f"{out}/probe.json has probe_version {data.get('probe_version')}; this code reads {PROBE_VERSION}")
    return ProbeRecord.model_validate(data)
