"""Kill and resume: ``kill -9`` a training command at random moments, run it again, and compare with a run
that was never interrupted.

For each command (``evolve --train-only`` on the tiny student with a small seeded setting, ``sft``'s tiny
recipe on a few expert rows, and ``ablate`` with two arms and its comparison) the script first runs it once uninterrupted, then ``--trials`` times: start it
in a fresh folder, kill it with SIGKILL after a random share of the uninterrupted wall time, start the
same command again and let it finish. It counts

- kills survived: the second start finished with exit 0;
- rows lost: JSONL lines that do not parse, plus rows of the uninterrupted run missing from the resumed
  one (target 0), and rows written twice (target 0);
- resumed runs equal to the uninterrupted one: every output file the same after dropping what differs
  between two identical runs (times, throughputs, creation stamps, experience ids, paths; see
  ``scripts/same_numbers.py``), adapter weights byte for byte (target: all).

    .venv/bin/python benchmarks/faults.py --trials 10
    .venv/bin/python benchmarks/faults.py --cases     # the integrity cases instead (benchmarks/fault_cases.py)

Prints a line per trial and the totals, and saves them as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from same_numbers import fingerprint  # noqa: E402  (the same normalisation as the refactoring check)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
IGNORED = ("checkpoint/state.pt", "estimate.json", "start.json", "progress.json", ".kind", ".html")  # sizes and times of
# the run itself (the live progress file holds wall-clock times, the kind mark when the folder was claimed; the HTML
# report prints times, like report.md)

COMMANDS = {
    "evolve": ["evolve", "--train-only", "--steps", "3", "-B", "2", "-K", "2", "--max-new-tokens", "96", "--no-probe",
               "--delta-min", "0.0", "--gate", "-1", "--seed", "3"],
    "sft": ["sft", "--recipe", "tiny", "--data", "{data}", "--epochs", "3", "--pretrain-epochs", "1", "--batch-tokens", "2048",
            "--save-every", "2", "--warmup-steps", "1"],
    "ablate": ["ablate", "--arms", "sft,grpo+ved", "--seeds", "0", "--steps", "2", "-B", "2", "-K", "2", "--max-new-tokens", "96",
               "--eval-requests", "2", "--no-probe", "--no-teacher"],
}


def sft_data(path: Path, n: int = 8) -> Path:
    """A few expert conversations as SFT rows (the data `genevolve sft --data` reads)."""
    from genevolve.training.sft_data import conversations, expert_trajectories
    from genevolve.world import World

    it = expert_trajectories(World(), split="bench", guided_fraction=0.5, seed=0)
    convs = conversations([next(it) for _ in range(n)])
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


def _run(args: list[str], out: Path, kill_after: float | None = None) -> tuple[int, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "genevolve.cli", *args, "--out", str(out)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, time.perf_counter() - t0


def jsonl_health(folder: Path) -> dict[str, int]:
    """Lines that do not parse, and lines that occur twice, over every JSONL file of a run folder."""
    bad = dup = 0
    for path in folder.rglob("*.jsonl"):
        seen = set()
        for line in path.read_text("utf-8").splitlines():
            try:
                json.loads(line)
            except ValueError:
                bad += 1
            if line in seen and path.name in ("trajectories.jsonl", "verdicts.jsonl", "metrics.jsonl", "pairs.jsonl"):
                dup += 1
            seen.add(line)
    return {"unparsable": bad, "duplicated": dup}


def compare(reference: dict[str, str], folder: Path) -> list[str]:
    got = {k: v for k, v in fingerprint(folder).items() if not k.endswith(IGNORED)}
    ref = {k: v for k, v in reference.items() if not k.endswith(IGNORED)}
    return sorted(k for k in ref.keys() | got.keys() if ref.get(k) != got.get(k))


def trials(command: str, n: int, rng: random.Random, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    data = sft_data(work / "sft-data.jsonl") if command == "sft" else None
    args = [a.replace("{data}", str(data)) for a in COMMANDS[command]]
    ref_dir = work / "uninterrupted" / command  # every run in a folder of the same name: it is recorded in the rows
    code, wall = _run(args, ref_dir)
    if code != 0:
        raise RuntimeError(f"the uninterrupted {command} failed: {(ref_dir.parent / f'{command}.log').read_text()[-2000:]}")
    reference = {k: v for k, v in fingerprint(ref_dir).items()}
    rows = []
    for i in range(n):
        out = work / f"trial{i}" / command
        for _attempt in range(3):  # a run that finished before its kill ran faster than the reference: aim again
            at = rng.uniform(0.15, 0.95) * wall
            first, took = _run(args, out, kill_after=at)
            if first == -signal.SIGKILL:
                break
            wall = min(wall, took)
            shutil.rmtree(out, ignore_errors=True)
        second, _ = _run(args, out)
        health = jsonl_health(out)
        differ = compare(reference, out) if second == 0 else ["(did not finish)"]
        row = {"trial": i, "killed_at_s": round(at, 1), "killed": first == -signal.SIGKILL, "resumed_exit": second,
               **health, "files_differing": differ, "equal": not differ}
        rows.append(row)
        print(f"{command} trial {i}: killed at {at:5.1f} s of {wall:.1f} s ({'killed' if row['killed'] else 'had finished'}) · "
              f"resume exit {second} · unparsable {health['unparsable']} · duplicated {health['duplicated']} · "
              f"{'equal to the uninterrupted run' if not differ else 'DIFFERS: ' + ', '.join(differ[:4])}")
    return {"command": "genevolve " + " ".join(COMMANDS[command]), "uninterrupted_wall_s": round(wall, 1), "trials": rows,
            "kills": sum(r["killed"] for r in rows), "survived": sum(r["resumed_exit"] == 0 for r in rows),
            "rows_lost": sum(r["unparsable"] for r in rows), "rows_duplicated": sum(r["duplicated"] for r in rows),
            "equal": sum(r["equal"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="default: results/faults.json (results/faults_cases.json "
                    "with --cases)")
    ap.add_argument("--cases", action="store_true", help="run the integrity cases (benchmarks/fault_cases.py) instead "
                    "of kill trials: each case's tests, and a table of case, before, after, test")
    ap.add_argument("--only", default=None, help="with --cases: the cases whose name holds this")
    a = ap.parse_args(argv)
    if a.cases:
        from fault_cases import run_cases, save, table

        rows = run_cases(a.only)
        out = a.out or Path(__file__).parent / "results" / "faults_cases.json"
        save(rows, out)
        print(table(rows) + f"\nsaved: {out} and {out.with_suffix('.md')}")
        return 0 if all(r["after"] == "fixed" for r in rows) else 1
    a.out = a.out or Path(__file__).parent / "results" / "faults.json"
    rng = random.Random(a.seed)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for command in a.commands.split(","):
            r = trials(command, a.trials, rng, Path(tmp))
            result[command] = r
            print(f"{command}: {r['kills']} kills, {r['survived']} resumed to the end, rows lost {r['rows_lost']}, "
                  f"rows written twice {r['rows_duplicated']}, {r['equal']} of {len(r['trials'])} equal to the uninterrupted run")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved: {a.out}")
    return 0 if all(r["equal"] == len(r["trials"]) and not r["rows_lost"] for r in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
