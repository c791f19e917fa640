"""The distill job: one ``genevolve evolve`` or ``genevolve ablate`` subprocess at a time.

Training runs in its own process so the UI never waits on it; the studio only reads the files the
run writes (the same ones a CLI run writes, so a run started from a terminal is watched the same
way). Stop sends SIGTERM, which the CLI turns into "stop after this step" (the step is checkpointed);
Kill ends the process group at once (the last checkpoint stays). Resume starts the same command on
the same folder, which the trainer resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from genevolve.records.schema import atomic_write_json

from . import StudioError

JOB_FILE = "studio_job.json"
LOG_FILE = "studio.log"


class DistillJobs:
    def __init__(self, runs_dir: Path, world_root: Path, python: str = sys.executable):
        self.runs_dir = Path(runs_dir)
        self.world_root = Path(world_root)
        self.python = python
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._out: Path | None = None
        self._args: list[str] = []
        self._stop_asked = False

    # -- state -------------------------------------------------------------------
    def _running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def status(self) -> dict[str, Any]:
        """idle, running, stopping, finished, stopped, killed or failed; with the folder, pid and exit code."""
        with self._lock:
            if self._proc is None:
                return {"state": "idle", "out": None}
            rc = self._proc.poll()
            if rc is None:
                state = "stopping" if self._stop_asked else "running"
            elif rc == 0:
                state = "stopped" if self._stop_asked else "finished"
            elif rc < 0:
                state = "killed" if rc == -signal.SIGKILL else "stopped"
            else:
                state = "failed"
            return {"state": state, "out": str(self._out), "pid": self._proc.pid, "returncode": rc,
                    "command": "genevolve " + " ".join(self._args)} | ({"error": self._error()} if state == "failed" else {})

    def _error(self) -> str | None:
        """The failed command's reason, one line from the end of its log (a refusal, or a traceback's last line)."""
        from .distill import failure_line

        try:
            with open(self._out / LOG_FILE, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - 65536))
                return failure_line(fh.read().decode("utf-8", errors="replace"))
        except OSError:
            return None

    # -- control -----------------------------------------------------------------
    def start(self, args: list[str], out: Path, seed_bank: Path | None = None) -> str:
        """Start ``genevolve <args>`` writing to ``out``; refused, in one line, while another run is going, when
        another process holds ``out`` or when ``out`` is another kind of folder."""
        from genevolve.records.kinds import RunKindError
        from genevolve.records.live import RunLockedError, is_running, run_lock

        out = Path(out)
        with self._lock:
            if self._running():
                raise StudioError(f"a distill run is already running in {self._out} (pid {self._proc.pid}); "
                                  "stop it before starting another (one run at a time keeps the machine responsive)")
            if is_running(out):  # held by anyone, this process included
                raise StudioError(f"{out} is being trained by another process (a terminal run?); wait for it or stop it there")
            src = Path(seed_bank) / "experiences.jsonl" if seed_bank is not None else None
            if src is not None and not src.exists():
                raise StudioError(f"the bank {seed_bank} has no experiences.jsonl")
            try:
                with run_lock(out):  # nothing is written into a folder another process holds
                    self._prepare(args, out, src)
            except (RunLockedError, RunKindError) as exc:
                raise StudioError(str(exc)) from None
            log = open(out / LOG_FILE, "ab")
            try:
                proc = subprocess.Popen([self.python, "-m", "genevolve.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=self._env(), cwd=str(self.runs_dir),
                                        start_new_session=True)
            finally:
                log.close()  # the child holds its own copy
            self._proc, self._out, self._args, self._stop_asked = proc, out, list(args), False
            atomic_write_json(out / JOB_FILE, {"args": list(args), "pid": proc.pid, "started": time.time()})
            return f"started pid {proc.pid}: genevolve {' '.join(args)}"

    @staticmethod
    def _prepare(args: list[str], out: Path, src: Path | None) -> None:
        """Claim ``out`` for the command's kind (so the command finds its own kind of folder), copy the seed bank in
        and start the log; the caller holds the folder's lock."""
        from genevolve.records.kinds import claim

        claim(out, args[0], hint="pick it under 'Watch' and use Resume, or choose another name")
        if src is not None:
            from genevolve.records.schema import atomic_write_bytes

            atomic_write_bytes(out / "bank" / "experiences.jsonl", src.read_bytes())
        with open(out / LOG_FILE, "ab") as log:
            log.write(f"\n$ genevolve {' '.join(args)}\n".encode())

    def _env(self) -> dict[str, str]:
        return {**os.environ, "GENEVOLVE_WORLD": str(self.world_root), "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

    def resume(self, out: Path) -> str:
        """Start the command recorded in ``out`` again; the trainer resumes from the folder's checkpoint."""
        try:
            args = json.loads((Path(out) / JOB_FILE).read_text("utf-8"))["args"]
        except (OSError, ValueError, KeyError):
            raise StudioError(f"{out} was not started from the studio (no {JOB_FILE}); resume it with its own command") from None
        return self.start(args, Path(out))

    def stop(self) -> str:
        with self._lock:
            if not self._running():
                raise StudioError("no distill run is running")
            self._stop_asked = True
            self._proc.send_signal(signal.SIGTERM)
            return (f"stopping pid {self._proc.pid}: the current step finishes and is checkpointed "
                    "(Kill ends it now; Resume continues from the checkpoint)")

    def kill(self) -> str:
        with self._lock:
            if not self._running():
                raise StudioError("no distill run is running")
            self._stop_asked = True
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=30)
            return f"killed pid {self._proc.pid}; the last checkpoint in {self._out} is intact (Resume continues from it)"
