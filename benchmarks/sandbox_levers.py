"""Do the sandbox's levers matter? Expert vs raw generator, each skill disabled, distractor references.

Prints a table and saves ``benchmarks/results/sandbox_levers.json``. Every figure is measured in
this run on the bench split over fixed seeds (mean over seeds; 95 % CI over seeds in the JSON).

    .venv/bin/python benchmarks/sandbox_levers.py [--seeds 0,1,2] [--split bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from genevolve.agent.loop import Tools, run_to_end
from genevolve.evaluation.bench import SandboxScorer, mean_ci, raw_trajectory
from genevolve.records.schema import SKILLS, ImageStore, atomic_write_json
from genevolve.world import World
from genevolve.agent.expert import ExpertNoise, ExpertPolicy


def scores(world, tools, scorer, store, reqs, policy, seeds) -> dict[str, list[float]]:
    """KScore per request id, one value per seed."""
    out: dict[str, list[float]] = {r.id: [] for r in reqs}
    for seed in seeds:
        for r in reqs:
            traj = raw_trajectory(r, seed) if policy is None else run_to_end(r, policy, tools, seed=seed)
            _, v = scorer.score(r, traj, store, seed=seed)
            out[r.id].append(v.kscore)
    return out


def seed_means(per_req: dict[str, list[float]], ids: list[str], n_seeds: int) -> list[float]:
    return [statistics.fmean(per_req[i][s] for i in ids) for s in range(n_seeds)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--split", default="bench")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sandbox_levers.json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    world = World()
    reqs = world.split(args.split)
    tools, scorer = Tools.for_world(world), SandboxScorer(world)
    t0 = time.time()
    result: dict = {"split": args.split, "seeds": seeds, "n_requests": len(reqs)}
    with tempfile.TemporaryDirectory() as tmp:
        store = ImageStore(tmp)
        clean = scores(world, tools, scorer, store, reqs, ExpertPolicy(world, ExpertNoise()), seeds)
        raw = scores(world, tools, scorer, store, reqs, None, seeds)
        ka = [r.id for r in reqs if r.track == "knowledge"]
        all_ids = [r.id for r in reqs]
        rows = []

        def report(name, per_req, ids, base=None):
            m, ci = mean_ci(seed_means(per_req, ids, len(seeds)))
            entry = {"kscore": m, "ci95": ci, "n": len(ids)}
            line = [name, len(ids), f"{m:.3f}"]
            if base is not None:
                bm, _ = mean_ci(seed_means(base, ids, len(seeds)))
                entry["expert_kscore"] = bm
                entry["loss"] = bm - m
                line += [f"{bm:.3f}", f"{bm - m:+.3f}"]
            rows.append(line)
            return entry

        result["expert_overall"] = report("expert, no noise (all)", clean, all_ids)
        result["expert_knowledge"] = report("expert, no noise (KA)", clean, ka)
        result["raw_knowledge"] = report("raw generator (KA)", raw, ka, clean)
        result["raw_overall"] = report("raw generator (all)", raw, all_ids, clean)
        result["skill_disabled"] = {}
        for s in SKILLS:
            ids = [r.id for r in reqs if s in r.skills]
            pol = ExpertPolicy(world, ExpertNoise(skip_skills=(s,)), name=f"expert-no-{s}")
            per = scores(world, tools, scorer, store, [r for r in reqs if r.id in ids], pol, seeds)
            result["skill_disabled"][s] = report(f"no {s} (needing it)", per, ids, clean)
        pol = ExpertPolicy(world, ExpertNoise(p_distractor=1.0), name="expert-distractor")
        per = scores(world, tools, scorer, store, [r for r in reqs if r.id in ka], pol, seeds)
        result["distractor_refs_knowledge"] = report("distractor refs (KA)", per, ka, clean)
    result["seconds"] = time.time() - t0
    widths = [48, 5, 8, 8, 8]
    print(f"{'setting':<48}{'n':>5}{'KScore':>8}{'expert':>8}{'loss':>8}")
    for r in rows:
        print("".join(f"{str(x):<{w}}" if i == 0 else f"{str(x):>{w}}" for i, (x, w) in enumerate(zip(r, widths))))
    print(f"({result['seconds']:.0f} s)")
    atomic_write_json(args.out, result)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
