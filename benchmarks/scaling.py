"""How cost grows: rollout, evolve, bench and update against their size knobs, with plots.

Five sweeps, each point the median of ``--repeats`` runs (evolve: ``--evolve-repeats``) on the same
inputs, in one run of this script:

- ``rows``: rollout tokens/s and peak memory against batch rows (1 -> 64): ``rows`` conversations of
  the bench split, full tool episodes, one batch of that many rows;
- ``length``: rollout tokens/s and peak memory against trajectory length (``--max-turns`` 1 -> 11, so
  the same 16 conversations grow longer);
- ``evolve``: ``evolve`` wall time (training only) against steps, and against B x K for one step;
- ``bench``: bench time (rollout, render, judge, aggregate; one seed) against the number of requests;
- ``update``: the update's tokens/s and peak memory against the micro-batch size, on one fixed batch.

Memory is measured in a fresh process per point (peak resident set above the process's resident set
once the model is loaded), so points do not inherit each other's peaks. Prints a table, saves
``benchmarks/results/scaling_<policy>.json`` and one PNG per sweep beside it.

    .venv/bin/python benchmarks/scaling.py [--policy tiny] [--only rows,length,evolve,bench,update]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SWEEPS = ("rows", "length", "evolve", "bench", "update")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Start the peak resident set (VmHWM) again from the current one, so a point's peak excludes the
    work that prepared it (loading, the rollout that makes an update's batch)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # not Linux: the peak then includes the preparation


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one point, in its own process ------------------------------------------------------------------
def point_rollout(policy: str, rows: int, max_turns: int, max_new_tokens: int, repeats: int) -> dict:
    import torch

    from genevolve.agent.loop import Tools
    from genevolve.agent.rollout import rollout
    from genevolve.policies.base import SamplingParams
    from genevolve.policies.resolve import resolve_policy
    from genevolve.world import World

    w = World()
    tools, pol = Tools.for_world(w), resolve_policy(policy)
    reqs = w.split("bench")[:rows]
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=max_new_tokens)
    tools.text_search.search(["warm up"], 1)
    rollout(reqs[:1], pol, tools, k=1, params=SamplingParams(max_new_tokens=8), seed=99, max_turns=1)
    base = _rss_mb()
    _reset_peak()
    secs, toks, lens = [], [], []
    for r in range(repeats):
        t = time.perf_counter()
        trajs = rollout(reqs, pol, tools, k=1, params=params, seed=r, max_batch=rows, max_turns=max_turns)
        secs.append(time.perf_counter() - t)
        toks.append(sum(sum(tr.assistant_mask) for tr in trajs))
        lens.append(statistics.fmean(len(tr.token_ids) for tr in trajs))
    i = secs.index(statistics.median(secs)) if repeats % 2 else 0
    return {"rows": rows, "max_turns": max_turns, "seconds": statistics.median(secs),
            "tokens_per_s": statistics.median([a / b for a, b in zip(toks, secs)]),
            "trajectories_per_s": statistics.median([rows / s for s in secs]), "generated_tokens": toks[i],
            "mean_trajectory_tokens": statistics.fmean(lens), "peak_mb_above_loaded": max(0.0, _peak_mb() - base),
            "threads": torch.get_num_threads()}


def point_update(policy: str, micro_batch: int, n: int, repeats: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from genevolve.agent.guides import oracle_guide
    from genevolve.agent.loop import Tools
    from genevolve.agent.rollout import rollout
    from genevolve.agent.teacher import teacher_stream
    from genevolve.policies.base import SamplingParams
    from genevolve.policies.resolve import resolve_policy
    from genevolve.training.checkpoint import LORA_TARGETS
    from genevolve.training.update import LossSettings, Scored, accumulate_gradients
    from genevolve.world import World

    w = World()
    pol = resolve_policy(policy)
    reqs = w.split("evolve")[:n]
    trajs = rollout(reqs, pol, Tools.for_world(w), k=1, params=SamplingParams(temperature=0.7, max_new_tokens=384), seed=0)
    tok, dev = pol.tokenizer, pol.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(len(trajs), generator=g).tolist()
    scored = []
    for r, t, a in zip(reqs, trajs, adv):
        tid, off = teacher_stream(tok, oracle_guide(w, r), t.system_prompt, t.token_ids)
        scored.append(Scored(t.token_ids, t.assistant_mask, 0, a, tid, off))
    model = get_peft_model(pol.model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))
    n_tok = sum(sum(s.mask) for s in scored)
    settings = LossSettings(micro_batch=micro_batch)
    base = _rss_mb()
    _reset_peak()
    secs = []
    for _ in range(repeats + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        accumulate_gradients(model, scored, settings, dev, pad, n_tok, len(scored))
        secs.append(time.perf_counter() - t)
    s = statistics.median(secs[1:])
    return {"micro_batch": micro_batch, "sequences": len(scored), "tokens": sum(len(x.ids) for x in scored),
            "assistant_tokens": n_tok, "seconds": s, "tokens_per_s": sum(len(x.ids) for x in scored) / s,
            "peak_mb_above_loaded": max(0.0, _peak_mb() - base)}


def _in_child(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--point", kind, "--point-args", json.dumps(kw)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    if out.returncode:
        raise RuntimeError(f"{kind} {kw} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- sweeps in this process -------------------------------------------------------------------------
def sweep_evolve(policy: str, repeats: int, steps_list, bk_list) -> dict:
    from genevolve.training.evolve import EvolveConfig, evolve
    from genevolve.world import World

    w = World()

    def wall(steps: int, b: int, k: int) -> float:
        out = []
        for r in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = EvolveConfig(out=str(Path(tmp) / "run"), policy=policy, steps=steps, prompts_per_step=b,
                                   rollouts_per_prompt=k, seed=r)
                t = time.perf_counter()
                evolve(cfg, world=w, log=lambda _: None)
                out.append(time.perf_counter() - t)
        return statistics.median(out)

    by_steps = [{"steps": s, "B": 4, "K": 4, "seconds": wall(s, 4, 4)} for s in steps_list]
    by_bk = [{"steps": 1, "B": b, "K": k, "BxK": b * k, "seconds": wall(1, b, k)} for b, k in bk_list]
    return {"by_steps": by_steps, "by_BxK": by_bk}


def sweep_bench(policy: str, repeats: int, sizes) -> list[dict]:
    from genevolve.agent.loop import Tools
    from genevolve.evaluation.bench import SandboxScorer, evaluate
    from genevolve.policies.resolve import resolve_policy
    from genevolve.records.schema import ImageStore
    from genevolve.world import World

    w = World()
    pol, tools, scorer = resolve_policy(policy), Tools.for_world(w), SandboxScorer(w)
    reqs = w.split("bench")
    rows = []
    for n in sizes:
        secs = []
        for r in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                evaluate(reqs[:n], pol, tools, scorer, ImageStore(Path(tmp)), seeds=[r])
                secs.append(time.perf_counter() - t)
        s = statistics.median(secs)
        rows.append({"requests": n, "seconds": s, "requests_per_s": n / s})
    return rows


def _plot(path: Path, xs, series: dict[str, list], xlabel: str, title: str, logx: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.6))
    axes = axes if len(series) > 1 else [axes]
    for ax, (name, ys) in zip(axes, series.items()):
        ax.plot(xs, ys, marker="o")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if logx:
            ax.set_xscale("log", base=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine() -> dict:
    import platform

    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "python": platform.python_version()}


def run(args) -> dict:
    res: dict = {"policy": args.policy, "repeats": args.repeats, "machine": _machine(),
                 "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:])}
    out_dir = Path(args.out).parent
    tag = Path(args.out).stem  # plots are named after the JSON
    if "rows" in args.only:
        pts = [_in_child("rollout", policy=args.policy, rows=r, max_turns=11, max_new_tokens=384, repeats=args.repeats)
               for r in args.rows]
        res["rows"] = pts
        _plot(out_dir / f"{tag}_rows.png", [p["rows"] for p in pts],
              {"generated tokens/s": [p["tokens_per_s"] for p in pts],
               "peak MB above the loaded model": [p["peak_mb_above_loaded"] for p in pts]},
              "batch rows (conversations)", f"rollout against batch rows ({args.policy})", logx=True)
    if "length" in args.only:
        pts = [_in_child("rollout", policy=args.policy, rows=16, max_turns=t, max_new_tokens=384, repeats=args.repeats)
               for t in args.turns]
        res["length"] = pts
        _plot(out_dir / f"{tag}_length.png", [p["mean_trajectory_tokens"] for p in pts],
              {"generated tokens/s": [p["tokens_per_s"] for p in pts],
               "peak MB above the loaded model": [p["peak_mb_above_loaded"] for p in pts]},
              "mean trajectory length (tokens; max turns 1 -> 11)", f"rollout against trajectory length, 16 rows ({args.policy})")
    if "evolve" in args.only:
        ev = sweep_evolve(args.policy, args.evolve_repeats, args.steps, [tuple(map(int, x.split("x"))) for x in args.bk])
        res["evolve"] = ev
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
        a.plot([r["steps"] for r in ev["by_steps"]], [r["seconds"] for r in ev["by_steps"]], marker="o")
        a.set_xlabel("steps (B 4 x K 4)")
        b.plot([r["BxK"] for r in ev["by_BxK"]], [r["seconds"] for r in ev["by_BxK"]], marker="o")
        b.set_xlabel("B x K (one step)")
        for ax in (a, b):
            ax.set_ylabel("wall seconds")
            ax.grid(alpha=0.3)
        fig.suptitle(f"evolve wall time, training only ({args.policy})")
        fig.tight_layout()
        fig.savefig(out_dir / f"{tag}_evolve.png", dpi=110)
        plt.close(fig)
    if "bench" in args.only:
        pts = sweep_bench(args.policy, args.repeats, args.bench_sizes)
        res["bench"] = pts
        _plot(out_dir / f"{tag}_bench.png", [p["requests"] for p in pts],
              {"seconds": [p["seconds"] for p in pts], "requests/s": [p["requests_per_s"] for p in pts]},
              "bench requests (one seed)", f"bench time against requests ({args.policy})")
    if "update" in args.only:
        pts = [_in_child("update", policy=args.policy, micro_batch=m, n=args.update_sequences, repeats=args.repeats)
               for m in args.micro_batches]
        res["update"] = pts
        _plot(out_dir / f"{tag}_update.png", [p["micro_batch"] for p in pts],
              {"tokens/s through the update": [p["tokens_per_s"] for p in pts],
               "peak MB above the loaded model": [p["peak_mb_above_loaded"] for p in pts]},
              "micro-batch (sequences per forward/backward)", f"GRPO+VED update against micro-batch ({args.policy})", logx=True)
    return res


def _table(res: dict) -> None:
    for key, cols in (("rows", ("rows", "tokens_per_s", "trajectories_per_s", "peak_mb_above_loaded")),
                      ("length", ("max_turns", "mean_trajectory_tokens", "tokens_per_s", "peak_mb_above_loaded")),
                      ("bench", ("requests", "seconds", "requests_per_s")),
                      ("update", ("micro_batch", "tokens_per_s", "peak_mb_above_loaded"))):
        if key in res:
            print(f"\n{key}: " + " | ".join(cols))
            for p in res[key]:
                print("  " + " | ".join(f"{p[c]:.1f}" if isinstance(p[c], float) else str(p[c]) for c in cols))
    if "evolve" in res:
        print("\nevolve: " + ", ".join(f"{r['steps']} steps {r['seconds']:.1f}s" for r in res["evolve"]["by_steps"]))
        print("        " + ", ".join(f"{r['B']}x{r['K']} {r['seconds']:.1f}s" for r in res["evolve"]["by_BxK"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny")
    ap.add_argument("--only", default=",".join(SWEEPS), help="comma-separated: " + ", ".join(SWEEPS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--evolve-repeats", type=int, default=1)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--turns", default="1,2,4,8,11")
    ap.add_argument("--steps", default="1,2,3")
    ap.add_argument("--bk", default="2x2,4x4,8x4,8x6")
    ap.add_argument("--bench-sizes", default="6,12,24,48")
    ap.add_argument("--micro-batches", default="1,2,4,8,16")
    ap.add_argument("--update-sequences", type=int, default=16)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/scaling_<policy>.json)")
    ap.add_argument("--point", help=argparse.SUPPRESS)
    ap.add_argument("--point-args", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.point:
        fn = {"rollout": point_rollout, "update": point_update}[args.point]
        print(json.dumps(fn(**json.loads(args.point_args))))
        return 0
    args.only = [s for s in args.only.split(",") if s]
    unknown = set(args.only) - set(SWEEPS)
    if unknown:
        ap.error(f"unknown sweeps {sorted(unknown)}: use {', '.join(SWEEPS)}")
    for name in ("rows", "turns", "steps", "bench_sizes", "micro_batches"):
        setattr(args, name, [int(x) for x in getattr(args, name).split(",")])
    args.bk = args.bk.split(",")
    args.out = args.out or str(RESULTS / f"scaling_{args.policy}.json")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = run(args)
    res["seconds"] = round(time.time() - t0, 1)
    _table(res)
    from genevolve.records.schema import atomic_write_json

    atomic_write_json(Path(args.out), res)
    print(f"\nsaved {args.out} and its plots ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
