"""The ``genevolve`` command line. Thin: every command is a few calls into the library."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="GenEvolve Studio: self-evolving image-generation agents on an offline sandbox.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
world_app = typer.Typer(help="Build and inspect the offline sandbox world.", no_args_is_help=True)
app.add_typer(world_app, name="world")

WORLD_OPT = typer.Option(None, "--world", help="World folder (default: assets/world, or $GENEVOLVE_WORLD).")


def _policy(world, name: str, noise: str, skip_skill: list[str], p_distractor: Optional[float]):
    from .world.expert import ExpertNoise, ExpertPolicy
    from .records import SKILLS

    for s in skip_skill:
        if s not in SKILLS:
            raise typer.BadParameter(f"unknown skill {s!r}; skills: {', '.join(SKILLS)}", param_hint="--skip-skill")
    if name == "expert":
        base = {"none": ExpertNoise(), "cold-start": ExpertNoise.cold_start()}.get(noise)
        if base is None:
            raise typer.BadParameter("noise is 'none' or 'cold-start'", param_hint="--noise")
        from dataclasses import replace

        base = replace(base, skip_skills=tuple(skip_skill))
        if p_distractor is not None:
            base = replace(base, p_distractor=p_distractor)
        label = "expert" if base == ExpertNoise() else f"expert[{noise}{',skip=' + '+'.join(skip_skill) if skip_skill else ''}" \
            f"{f',distractor={p_distractor}' if p_distractor is not None else ''}]"
        return ExpertPolicy(world, base, name=label)
    if name == "raw":
        return None
    raise typer.BadParameter(f"unknown policy {name!r}: use 'expert' or 'raw'", param_hint="--policy")


SEARCH_OPT = typer.Option("local", help="Search backend: 'local' (the sandbox's FAISS stores) or 'serper' "
                          "(a Serper-compatible HTTP API: $SERPER_BASE_URL, $SERPER_API_KEY).")


def _tools(world, search: str):
    from .agent import Tools

    if search == "local":
        return Tools.for_world(world)
    if search == "serper":
        from .tools.serper import SerperImageSearch, SerperTextSearch

        return Tools(SerperTextSearch(), SerperImageSearch(), world.knowledge, show_urls=True)
    raise typer.BadParameter("search is 'local' or 'serper'", param_hint="--search")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*map(str, r)) for r in rows])


def _f(x) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


@world_app.command("build")
def world_build(
    seed: int = typer.Option(0, help="Seed for every random choice in the world."),
    out: Path = typer.Option(Path("assets/world"), help="Folder to (re)write; replaced atomically when done."),
    no_index: bool = typer.Option(False, "--no-index", help="Skip building the FAISS indexes (built lazily on first search)."),
):
    """Rebuild every sandbox asset (entities, corpus, references, skill cards, requests, ground truths, indexes)."""
    from .world.build import build_world

    counts = build_world(out, seed=seed, with_index=not no_index, log=typer.echo)
    typer.echo(json.dumps(counts))


@world_app.command("info")
def world_info(world: Optional[Path] = WORLD_OPT):
    """Print what the world holds."""
    from collections import Counter

    from .world import World

    w = World(world)
    typer.echo(f"world: {w.root}")
    typer.echo(f"entities: {len(w.data.entities)}, events: {len(w.data.events)}, references: {len(w.refs)}")
    c = Counter((r.split, r.track) for r in w.requests)
    for (split, track), n in sorted(c.items()):
        typer.echo(f"  {split:7s} {track:10s} {n}")


@app.command()
def rollout(
    request: str = typer.Option(..., "--request", "-r", help="A sandbox request id (e.g. bench-0001), its text, or any free text."),
    k: int = typer.Option(4, "-k", min=1, max=64, help="Number of trajectories to sample for the request."),
    seed: int = typer.Option(0, help="Seed: trajectory i uses seed*1000+i for the policy and the generator."),
    out: Optional[Path] = typer.Option(None, help="Run folder to write (default: runs/<new run id>)."),
    policy: str = typer.Option("expert", help="'expert' (scripted planner) or 'raw' (request text straight to the generator)."),
    noise: str = typer.Option("cold-start", help="Expert noise: 'none' (perfect) or 'cold-start' (imperfect, varied)."),
    skip_skill: list[str] = typer.Option([], help="Skill the expert never uses (repeatable)."),
    p_distractor: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Chance the expert takes a distractor reference."),
    search: str = SEARCH_OPT,
    world: Optional[Path] = WORLD_OPT,
):
    """Run K trajectories for one request, render and judge them, and write a run folder."""
    from tqdm import tqdm

    from .agent import Tools, run_to_end
    from .evaluation import SandboxScorer, aggregate, raw_trajectory
    from .records import RunInfo
    from .runs import RunWriter, new_run_id, now_iso
    from .world import World

    w = World(world)
    pol = _policy(w, policy, noise, skip_skill, p_distractor)
    req = w.request(request)
    if req.parse_error:
        typer.echo(f"note: the sandbox world cannot read this request ({req.parse_error}); trajectories run, but cannot be judged.")
    run_id = new_run_id("rollout")
    out = out or Path("runs") / run_id
    writer = RunWriter(out, RunInfo(id=run_id, created=now_iso(), command="rollout", policy=pol.name if pol else "raw",
                                     k=k, seed=seed, requests=[req.id], config={"noise": noise, "skip_skill": skip_skill}))
    writer.add_request(req, w.gt_image(req) if req.scene else None)
    tools, scorer = _tools(w, search), SandboxScorer(w)
    pairs = []
    rows = []
    for i in tqdm(range(k), desc=f"rollouts ({req.id})", unit="traj"):
        s = seed * 1000 + i
        traj = raw_trajectory(req, s) if pol is None else run_to_end(req, pol, tools, seed=s, traj_id=f"{req.id}-s{seed}-k{i}")
        rendered, verdict = scorer.score(req, traj, writer.images, seed=s)
        writer.add(traj, rendered, verdict)
        pairs.append((req, verdict))
        rows.append([traj.id, traj.termination, traj.n_tool_calls, _f(verdict.F), _f(verdict.V), _f(verdict.T), _f(verdict.A),
                     _f(verdict.kscore), _f(verdict.r_text), _f(verdict.reward), (verdict.failed or verdict.rationale)[:60]])
    summary = aggregate(pairs)
    writer.finish(summary)
    typer.echo(_table(rows, ["trajectory", "end", "tools", "F", "V", "T", "A", "KScore", "R_text", "reward", "rationale"]))
    typer.echo(f"run folder: {out}")


@app.command()
def bench(
    policy: str = typer.Option("expert", help="'expert' (scripted planner) or 'raw' (request text straight to the generator)."),
    split: str = typer.Option("bench", help="Sandbox split to evaluate: sft, evolve or bench."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds; each seed runs one trajectory per request."),
    noise: str = typer.Option("none", help="Expert noise: 'none' or 'cold-start'."),
    skip_skill: list[str] = typer.Option([], help="Skill the expert never uses (repeatable)."),
    p_distractor: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Chance the expert takes a distractor reference."),
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N requests (smoke runs)."),
    search: str = SEARCH_OPT,
    out: Optional[Path] = typer.Option(None, help="JSON file for the results (default: runs/bench-<policy>-<split>.json)."),
    world: Optional[Path] = WORLD_OPT,
):
    """Run a policy over a split, print KScore by track and category, and save JSON (mean and 95% CI over seeds)."""
    import tempfile

    from tqdm import tqdm

    from .agent import Tools, run_to_end
    from .evaluation import SandboxScorer, aggregate, mean_ci, raw_trajectory
    from .records import ImageStore, atomic_write_json
    from .world import World

    w = World(world)
    pol = _policy(w, policy, noise, skip_skill, p_distractor)
    reqs = w.split(split)[:limit]
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    tools, scorer = _tools(w, search), SandboxScorer(w)
    per_seed = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ImageStore(tmp)
        for seed in seed_list:
            pairs = []
            for req in tqdm(reqs, desc=f"bench seed {seed}", unit="req"):
                traj = raw_trajectory(req, seed) if pol is None else run_to_end(req, pol, tools, seed=seed, traj_id=f"{req.id}-s{seed}")
                _, v = scorer.score(req, traj, store, seed=seed)
                pairs.append((req, v))
            per_seed[seed] = aggregate(pairs)
    summary: dict = {"policy": pol.name if pol else "raw", "split": split, "seeds": seed_list, "n_requests": len(reqs), "by": {}}
    for level in ("overall", "track", "category", "difficulty"):
        summary["by"][level] = {}
        for key in per_seed[seed_list[0]][level]:
            row = {}
            for d in ("kscore", "F", "V", "T", "A", "r_text", "reward"):
                vals = [per_seed[s][level][key][d] for s in seed_list if per_seed[s][level][key][d] is not None]
                m, ci = mean_ci(vals)
                row[d] = {"mean": m, "ci95": ci}
            row["n"] = per_seed[seed_list[0]][level][key]["n"]
            row["failed"] = sum(per_seed[s][level][key]["failed"] for s in seed_list)
            summary["by"][level][key] = row
    out = out or Path("runs") / f"bench-{policy}-{split}.json"
    atomic_write_json(out, summary)
    rows = []
    for level in ("overall", "track", "category"):
        for key, row in summary["by"][level].items():
            k = row["kscore"]
            rows.append([level, key, row["n"], f"{k['mean']:.3f} ± {0 if k['ci95'] != k['ci95'] else k['ci95']:.3f}",
                         _f(row["F"]["mean"]), _f(row["V"]["mean"]), _f(row["T"]["mean"]), _f(row["A"]["mean"]), row["failed"]])
    typer.echo(f"policy: {summary['policy']}  split: {split}  seeds: {seed_list}")
    typer.echo(_table(rows, ["by", "group", "n", "KScore (95% CI over seeds)", "F", "V", "T", "A", "failed"]))
    typer.echo(f"saved: {out}")


if __name__ == "__main__":
    app()
