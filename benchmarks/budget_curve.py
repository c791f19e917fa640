"""Does self-evolution keep improving, level off, or collapse? The tiny student at growing training budgets.

For each training seed (``--seeds``, default 0,1) one ``genevolve evolve --train-only`` run is extended step by step
to every budget of ``--budgets`` (default 5,20,50 steps at the defaults B = 8, K = 6): the run resumes from its
checkpoint, so the 20-step point is the 5-step run trained 15 steps more. At each point the adapter and the bank
are copied aside, and measured on the first ``--requests`` bench requests (``--eval-seeds``):

- the trained student's bench KScore (no guide);
- the bank: its size, its evidence (mined pairs behind it) and how many experiences are merges;
- the retrieval hit rate: the share of bench requests whose nearest experience passes the gate (the situation key
  at its default gate; no bench request was ever mined from, so every hit is a transfer);
- the teacher-minus-student gap on those requests: the trained student with the retrieved experience as its guide,
  minus the trained student alone, paired by evaluation seed.

A run is trained in chunks of ``--chunk`` steps; one that has collapsed (its last three steps all under 10 %
protocol-valid rollouts: the student no longer answers in the protocol) is measured where it collapsed and not
trained further (its steps by then write maximal-length turns and take minutes each).

Everything is resumable: runs resume, copies and measured points are kept in ``--work`` and reused. Prints a table
and saves ``benchmarks/results/budget_curve_<policy>.json`` and a plot beside it.

    .venv/bin/python benchmarks/budget_curve.py --work /tmp/budget [--budgets 5,20,50] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from genevolve.records.schema import atomic_write_json


def collapsed(run: Path, window: int = 3, floor: float = 0.1) -> int | None:
    """The step at which a run has collapsed: its last ``window`` steps all below ``floor`` protocol-valid rollouts
    (the student no longer answers in the protocol); None while it has not."""
    from genevolve.records.live import read_metrics

    last = read_metrics(run / "metrics.jsonl")[-window:]
    if len(last) == window and all((r.get("protocol_valid") or 0) < floor for r in last):
        return last[-1].step
    return None


def train_to(work: Path, policy: str, seed: int, steps: int) -> Path:
    run = work / f"evolve-s{seed}"
    cmd = [sys.executable, "-m", "genevolve.cli", "evolve", "--out", str(run), "--policy", policy, "--seed", str(seed),
           "--steps", str(steps), "--train-only", "--no-probe"]
    print(f"  training seed {seed} to {steps} steps ...", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return run


def snapshot(run: Path, dest: Path) -> None:
    """The run's adapter, bank and metrics as they are now, copied whole (a folder that exists is complete)."""
    if dest.exists():
        return
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(run / "checkpoint" / "adapter", tmp / "adapter")
    shutil.copytree(run / "bank", tmp / "bank", ignore=shutil.ignore_patterns(".bank.lock"))
    shutil.copy2(run / "metrics.jsonl", tmp / "metrics.jsonl")
    os.replace(tmp, dest)


def measure(snap: Path, policy: str, requests: int, eval_seeds: list[int]) -> dict:
    from genevolve.agent.guides import request_guides
    from genevolve.evaluation.bench import mean_ci
    from genevolve.evaluation.report import evaluate
    from genevolve.experience.bank import ExperienceBank
    from genevolve.policies.resolve import resolve_policy
    from genevolve.world import World

    world = World()
    reqs = world.split("bench")[:requests]
    pol = resolve_policy(policy, adapter=str(snap / "adapter"))
    student = evaluate(world, pol, reqs, eval_seeds)
    bank = ExperienceBank(snap / "bank")
    guides, info = request_guides(f"bank:{snap / 'bank'}", world, reqs)
    hits = [r for r in reqs if r.id in guides]
    row = {"bench_kscore": student["summary"]["overall"]["all"]["kscore"]["mean"],
           "bench_kscore_per_seed": student["summary"]["overall"]["all"]["per_seed"],
           "bank_size": len(bank), "evidence": sum(e.evidence for e in bank.items.values()),
           "merged": sum(1 for e in bank.items.values() if e.merged_from), "gate": info["gate"],
           "hits": len(hits), "hit_rate": len(hits) / len(reqs), "teacher_minus_student": None, "ci95": None}
    metrics = [json.loads(x) for x in (snap / "metrics.jsonl").read_text().splitlines() if x.strip()]
    row["train_reward_last5"] = sum(m["reward_mean"] or 0 for m in metrics[-5:]) / max(1, len(metrics[-5:]))
    if hits:
        s = evaluate(world, pol, hits, eval_seeds)["summary"]["overall"]["all"]["per_seed"]
        t = evaluate(world, pol, hits, eval_seeds, guides=guides)["summary"]["overall"]["all"]["per_seed"]
        d = [b - a for a, b in zip(s, t) if a is not None and b is not None]
        row["teacher_minus_student"], row["ci95"] = mean_ci(d)
        row["per_seed_gap"] = d
    return row


def training_rows(work: Path, seeds: list[int]) -> dict[str, list[dict]]:
    """Each seed's training run, step by step: protocol-valid share, reward, KL to the reference, bank size."""
    from genevolve.records.live import read_metrics

    keys = ("step", "protocol_valid", "reward_mean", "kl_ref", "bank_size", "seconds")
    return {str(seed): [{k: r.get(k) for k in keys} for r in read_metrics(work / f"evolve-s{seed}" / "metrics.jsonl")]
            for seed in seeds}


def plot(points: list[dict], path: Path, training: dict[str, list[dict]] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5 if training else 4, figsize=(19 if training else 15, 3.4))
    if training:
        ax = axes[-1]
        for seed, rows in training.items():
            ax.plot([r["step"] for r in rows], [r["protocol_valid"] for r in rows], "-", label=f"seed {seed}")
        ax.set_title("protocol-valid rollouts (training)")
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax, (key, title) in zip(axes, (("bench_kscore", "bench KScore (student)"), ("bank_size", "bank size"),
                                       ("hit_rate", "bench hit rate"), ("teacher_minus_student", "teacher − student (hits)"))):
        for seed in sorted({p["seed"] for p in points}):
            xs = [p for p in points if p["seed"] == seed]
            ax.plot([p["steps"] for p in xs], [p[key] if p[key] is not None else float("nan") for p in xs], "o-",
                    label=f"seed {seed}")
        ax.set_title(title)
        ax.set_xlabel("steps")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny")
    ap.add_argument("--budgets", default="5,20,50")
    ap.add_argument("--seeds", default="0,1", help="training seeds")
    ap.add_argument("--eval-seeds", default="0,1,2")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--chunk", type=int, default=5, help="steps between checks for a collapse")
    ap.add_argument("--work", required=True, help="runs, copies and measured points (reused on a rerun)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    budgets = sorted(int(x) for x in a.budgets.split(",") if x.strip())
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    eval_seeds = [int(x) for x in a.eval_seeds.split(",") if x.strip()]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    points, t0 = [], time.time()
    for seed in seeds:
        for steps in budgets:
            done = next((p / "point.json" for p in (work / f"s{seed}-{steps}", *work.glob(f"s{seed}-*c"))
                         if (p / "point.json").exists() and (p.name == f"s{seed}-{steps}" or (
                             p.name.endswith("c") and int(p.name.split("-")[1][:-1]) <= steps))), None)
            if done is not None:
                row = json.loads(done.read_text())
                if row not in points:
                    points.append(row)
                print(f"seed {seed}, {row['steps']} steps: done earlier", flush=True)
                if row.get("collapsed"):
                    break
                continue
            run = work / f"evolve-s{seed}"
            at = collapsed(run)
            # In chunks of --chunk steps: a run that has collapsed is measured where it collapsed, not trained on.
            while at is None:
                now = len((run / "metrics.jsonl").read_text().splitlines()) if (run / "metrics.jsonl").exists() else 0
                if now >= steps:
                    break
                train_to(work, a.policy, seed, min(steps, now + a.chunk))
                at = collapsed(run)
            snap = work / (f"s{seed}-{at}c" if at is not None else f"s{seed}-{steps}")
            snapshot(run, snap)
            print(f"  measuring seed {seed} at {at or steps} steps ...", flush=True)
            row = {"seed": seed, "steps": at or steps, "collapsed": at is not None} | measure(snap, a.policy, a.requests,
                                                                                               eval_seeds)
            atomic_write_json(snap / "point.json", row)
            points.append(row)
            if at is not None:
                print(f"seed {seed} collapsed at step {at} (3 steps with under 10 % protocol-valid rollouts): no longer "
                      "trained", flush=True)
                break
    print(f"\n{'seed':>4}{'steps':>6}{'bench K':>9}{'bank':>6}{'merged':>7}{'evidence':>9}{'hit rate':>9}{'teacher-student':>17}")
    for p in points:
        gap = "-" if p["teacher_minus_student"] is None else f"{p['teacher_minus_student']:+.3f}" + (
            f" ± {p['ci95']:.3f}" if p["ci95"] is not None else "")
        print(f"{p['seed']:>4}{str(p['steps']) + ('c' if p.get('collapsed') else ''):>6}{p['bench_kscore']:>9.3f}{p['bank_size']:>6}{p['merged']:>7}{p['evidence']:>9}"
              f"{p['hit_rate']:>9.3f}{gap:>17}")
    out = Path(a.out or Path(__file__).parent / "results" / f"budget_curve_{Path(a.policy).name}.json")
    training = training_rows(work, seeds)
    atomic_write_json(out, {"policy": a.policy, "budgets": budgets, "seeds": seeds, "eval_seeds": eval_seeds,
                            "requests": a.requests, "B": 8, "K": 6, "points": points, "seconds": time.time() - t0,
                            "command": "benchmarks/budget_curve.py " + " ".join(sys.argv[1:]), "training": training})
    plot(points, out.with_suffix(".png"), training)
    print(f"saved {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
