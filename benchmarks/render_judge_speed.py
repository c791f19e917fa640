"""Render and judge latency of the sandbox, on one core (median and p90 per image).

Uses the expert's programs for the bench split (so the generator reads real prompts with
references), pinned to one thread. Prints and saves ``benchmarks/results/render_judge_speed.json``.

    .venv/bin/python benchmarks/render_judge_speed.py [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

import argparse
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

from genevolve.agent.loop import Tools, run_to_end
from genevolve.records.schema import atomic_write_json
from genevolve.world import World
from genevolve.agent.expert import ExpertNoise, ExpertPolicy
from genevolve.world.scene import Scene


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "render_judge_speed.json"))
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    world = World()
    tools = Tools.for_world(world)
    expert = ExpertPolicy(world, ExpertNoise.cold_start())
    cases = []
    for r in world.split("bench"):
        t = run_to_end(r, expert, tools, seed=0)
        refs = []
        for ref in t.program.reference_images:
            with Image.open(t.image(ref.img_id).local_path) as im:
                refs.append(im.convert("RGB"))
        cases.append((r, t.program.gen_prompt, refs, Scene.from_dict(r.scene), world.gt_image(r)))
    gen, judge = world.generator, world.judge
    render_ms, judge_ms = [], []
    for rep in range(args.repeats):
        for r, prompt, refs, scene, gt in cases:
            t0 = time.perf_counter()
            img = gen.generate(prompt, refs, seed=rep)
            t1 = time.perf_counter()
            judge.judge(img, scene, gt)
            t2 = time.perf_counter()
            render_ms.append(1000 * (t1 - t0))
            judge_ms.append(1000 * (t2 - t1))

    def stats(xs):
        xs = sorted(xs)
        return {"median_ms": statistics.median(xs), "p90_ms": xs[int(0.9 * (len(xs) - 1))], "n": len(xs)}

    result = {"render": stats(render_ms), "judge": stats(judge_ms), "cores": 1, "target_ms": 30}
    for k in ("render", "judge"):
        print(f"{k:7s} median {result[k]['median_ms']:6.2f} ms   p90 {result[k]['p90_ms']:6.2f} ms   (n={result[k]['n']}, one core)")
    atomic_write_json(args.out, result)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
