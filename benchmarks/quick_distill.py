"""Quick distill: the wall time of the studio's one-click run with its default form, against the 4-minute target.

For each mode (evolve, ablate) it builds the exact command the Distill view's Start button runs with its
defaults (the tiny student, --quick; :func:`studio.distill.distill_args`), runs it in a fresh runs folder
as the studio does (its own process), and records:

- the wall time, start to report, and whether it is within the target (240 s on 2 idle cores);
- the time until the first step is logged (from then on the studio shows an ETA from the run's own steps;
  before it, the start's estimate);
- the estimate written at the start (``estimate.json``) and its ratio to the measured time;
- for evolve, whether the live probe had a teacher (the student-vs-teacher token view) and from which step.

Run it on an idle machine: ``python benchmarks/quick_distill.py``. Prints the figures and saves them as JSON
under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGET_S = 240.0


def run_once(mode: str, runs: Path, policy: str = "tiny") -> dict:
    from genevolve.records.live import read_probe
    from studio.distill import distill_args

    out = runs / f"quick-{mode}"
    args = distill_args(mode, out, policy, ("grpo", "ved") if mode == "evolve" else ("sft", "grpo", "ved", "grpo+ved"), quick=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    log = open(runs / f"{mode}.log", "wb")
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "genevolve.cli", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=runs)
    first_step, teacher_step = None, None
    while proc.poll() is None:
        if first_step is None and any(p.stat().st_size for p in out.glob("**/metrics.jsonl")):
            first_step = time.perf_counter() - t0
        if mode == "evolve" and teacher_step is None:
            try:
                probe = read_probe(out)
                if probe is not None and probe.teacher is not None and any(t.q is not None for t in probe.tokens):
                    teacher_step = probe.step
            except ValueError:
                pass
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed: {(runs / f'{mode}.log').read_text()[-2000:]}")
    est = json.loads((out / "estimate.json").read_text())
    row = {"mode": mode, "command": "genevolve " + " ".join(a if a != str(out) else "<run>" for a in args),
           "wall_s": round(wall, 1), "within_target": wall <= TARGET_S, "first_step_logged_s": round(first_step or 0, 1),
           "estimate_s": round(est["seconds"], 1), "estimate_basis": est["basis"], "estimate_over_measured": round(est["seconds"] / wall, 2),
           "load_average_at_start": round(load_before, 2), "policy": policy,
           "peak_rss_gb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}
    if mode == "evolve":
        probe = read_probe(out)
        row |= {"probe_teacher_from_step": teacher_step, "probe_request": probe.request_id, "probe_retrieval": probe.retrieval,
                "probe_similarity": probe.similarity, "report_html": (out / "report" / "report.html").exists()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="evolve,ablate")
    ap.add_argument("--policy", default="tiny", help="The student (the studio's default: tiny); e.g. a SmolLM2 folder.")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/quick_distill[_<policy>].json")
    a = ap.parse_args()
    name = "" if a.policy == "tiny" else "_" + Path(a.policy).name
    a.out = a.out or Path(__file__).parent / "results" / f"quick_distill{name}.json"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes.split(","):
            row = run_once(mode, Path(tmp), a.policy)
            rows.append(row)
            extra = (f" · probe teacher from step {row['probe_teacher_from_step']} ({row['probe_retrieval']}, similarity "
                     f"{row['probe_similarity']:.3f})" if mode == "evolve" else "")
            print(f"{mode:7s} quick: {row['wall_s']:6.1f} s (target {TARGET_S:.0f} s: {'met' if row['within_target'] else 'MISSED'}) · "
                  f"first step logged at {row['first_step_logged_s']:.1f} s · estimated {row['estimate_s']:.0f} s "
                  f"({row['estimate_over_measured']:.2f}x){extra}")
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_at_end": os.getloadavg()},
              "target_s": TARGET_S, "runs": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved: {a.out}")


if __name__ == "__main__":
    main()
