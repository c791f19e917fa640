"""The first screen's demo: made once, on the studio's first start, into the runs folder (never the checkout).

Three things a newcomer can open at once: a K = 4 rollout of one request by the tiny policy (Trajectories), a short
self-evolution run with its report (Distill), and that run's experience bank (Experiences). They are made in the
background by the same commands a terminal would run (``genevolve rollout``, ``genevolve evolve --quick``), so the
studio answers while they run; ``demo/demo.json`` says how far they got, and a folder that holds a finished demo
is never made again (delete ``demo/`` to make it afresh).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from genevolve.records.schema import atomic_write_json

FOLDER = "demo"
REQUEST = "Draw the flag of the 2031 Aurora Cup champion above exactly three gold stars"
ROLLOUT, EVOLVE = f"{FOLDER}/rollout-k4", f"{FOLDER}/evolve-quick"
BANK = f"{EVOLVE}/bank"
STEPS = (("rollout", "a K = 4 rollout of one request by the tiny policy (a few seconds)",
          ["rollout", "-r", REQUEST, "-k", "4", "--policy", "tiny", "--out", "{runs}/" + ROLLOUT]),
         ("evolve", "a short self-evolution run and its report (about a minute on two cores)",
          ["evolve", "--quick", "--eval-requests", "6", "--out", "{runs}/" + EVOLVE]))


class Demo:
    def __init__(self, runs_dir: Path, world_root: Path, python: str = sys.executable):
        self.runs_dir, self.world_root, self.python = Path(runs_dir), Path(world_root), python
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def state_file(self) -> Path:
        return self.runs_dir / FOLDER / "demo.json"

    def status(self) -> dict[str, Any]:
        """``state``: absent, making, ready or failed; ``step``: what is being made; ``error``: why it failed."""
        try:
            st = json.loads(self.state_file.read_text("utf-8"))
        except (OSError, ValueError):
            return {"state": "absent"}
        if st.get("state") == "making" and not (self._thread and self._thread.is_alive()):
            st = {**st, "state": "interrupted"}  # made by an earlier studio that stopped half-way: make it again
        return st

    def ensure(self) -> None:
        """Start making the demo in the background, unless it is ready or being made."""
        with self._lock:
            if self.status()["state"] in ("ready", "making"):
                return
            self._write({"state": "making", "step": STEPS[0][1], "started": time.time()})
            self._thread = threading.Thread(target=self._make, name="studio-demo", daemon=True)
            self._thread.start()

    def _write(self, st: dict[str, Any]) -> None:
        atomic_write_json(self.state_file, st)

    def _make(self) -> None:
        env = {**os.environ, "GENEVOLVE_WORLD": str(self.world_root), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        log = self.runs_dir / FOLDER / "demo.log"
        started = time.time()
        for name, what, args in STEPS:
            out = self.runs_dir / args[-1].replace("{runs}/", "")
            done = (out / "summary.json").exists() if name == "rollout" else (out / "report" / "report.md").exists()
            if done:
                continue
            self._write({"state": "making", "step": what, "started": started})
            if name == "rollout" and out.exists():  # a half-written K = 4 run from an interrupted start: made again
                import shutil

                shutil.rmtree(out)
            cmd = [self.python, "-m", "genevolve.cli", *[a.replace("{runs}", str(self.runs_dir)) for a in args]]
            with open(log, "ab") as fh:
                fh.write(f"\n$ genevolve {' '.join(cmd[3:])}\n".encode())
                fh.flush()
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=str(self.runs_dir)).returncode
            if rc != 0:
                self._write({"state": "failed", "step": what, "error": f"`genevolve {' '.join(args[:2])}` exited with "
                                                                          f"code {rc}; see {log}", "started": started})
                return
        self._write({"state": "ready", "seconds": round(time.time() - started, 1), "rollout": ROLLOUT, "evolve": EVOLVE,
                     "bank": BANK})
