"""What a self-evolution run writes for live viewers (the studio, a notebook), and how to read it back.

Besides ``metrics.jsonl`` (one row per step) the trainer writes, in its run folder:

- ``pairs.jsonl``: one line per mined best-vs-worst pair (step, request, rewards, gap, and the
  experience made from it or why none was), appended one whole line per write;
- ``probe.json``: the latest student-vs-teacher comparison, rewritten atomically every step: the
  student's rollout on the fixed probe request (``EvolveConfig.probe_request``) with the student's
  and the teacher's log-probability of every token after the system block, the teacher's own
  trajectory on the same request (the student's weights with the retrieved guide in the system
  prompt), both verdicts and rendered images;
- ``.lock``: held (``flock``) while a trainer works in the folder, so a second trainer refuses to
  start there and viewers can tell a live run from a finished or stopped one.

Readers tolerate a torn last line (a run killed mid-append) and a folder that disappears.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from ..records import Trajectory, Verdict, append_bytes, atomic_write_json

PROBE_VERSION = 1


class RunLockedError(RuntimeError):
    """Another process is training in this run folder."""


@contextlib.contextmanager
def run_lock(out: str | Path) -> Iterator[None]:
    """Hold ``<out>/.lock`` for the duration; raise :class:`RunLockedError` when someone else holds it."""
    import fcntl

    path = Path(out) / ".lock"
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
        yield
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


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Metrics rows by step; a step logged twice (a run resumed after a kill) keeps its last row."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in read_jsonl_rows(path):
        by_step[int(row.get("step", len(by_step) + 1))] = row
    return [by_step[s] for s in sorted(by_step)]


def append_rows(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Append rows in one write, then fsync (one whole line each)."""
    if not rows:
        return
    append_bytes(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows).encode("utf-8"))


def token_rows(tokenizer, ids: list[int], mask: list[int], logp_student: list[float],
               logp_teacher: list[float] | None, start: int) -> list[dict[str, Any]]:
    """One row per token from ``start``: its text, whether the policy sampled it, and both log-probabilities."""
    out = []
    for i in range(start, len(ids)):
        row: dict[str, Any] = {"t": tokenizer.decode([ids[i]]), "a": int(mask[i])}
        if mask[i]:
            row["p"] = round(float(logp_student[i]), 4)
            if logp_teacher is not None and i < len(logp_teacher):
                row["q"] = round(float(logp_teacher[i]), 4)
        out.append(row)
    return out


def _case(traj: Trajectory | None, verdict: Verdict | None) -> dict[str, Any] | None:
    if traj is None:
        return None
    return {"trajectory": traj.model_dump(mode="json", exclude={"token_ids", "assistant_mask", "token_logprobs"}),
            "verdict": verdict.model_dump(mode="json") if verdict is not None else None}


def probe_record(step: int, request, student: Trajectory, student_verdict: Verdict, tokens: list[dict[str, Any]],
                 experience_id: str | None = None, guide: str | None = None, similarity: float | None = None,
                 teacher: Trajectory | None = None, teacher_verdict: Verdict | None = None, note: str = "") -> dict[str, Any]:
    return {"probe_version": PROBE_VERSION, "step": step, "request_id": request.id, "request": request.text,
            "experience_id": experience_id, "guide": guide, "similarity": similarity, "tokens": tokens,
            "student": _case(student, student_verdict), "teacher": _case(teacher, teacher_verdict), "note": note}


def write_probe(out: str | Path, record: dict[str, Any]) -> None:
    atomic_write_json(Path(out) / "probe.json", record)


def read_probe(out: str | Path) -> dict[str, Any] | None:
    """The latest probe, or None when there is none yet; a probe of another version raises."""
    try:
        data = json.loads((Path(out) / "probe.json").read_text("utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    if data.get("probe_version") != PROBE_VERSION:
        raise ValueError(f"{out}/probe.json has probe_version {data.get('probe_version')}; this code reads {PROBE_VERSION}")
    return data
