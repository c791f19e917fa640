"""K trajectories for one request, rendered and judged, as a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import POLICY_HELP, SAMPLING, SEARCH_OPT, WORLD_OPT, Bars, fmt, make_policy, make_tools, sampling_params, table

def rollout(
    request: list[str] = typer.Option(..., "--request", "-r", help="A sandbox request id (e.g. bench-0001), its text, or any "
                                      "free text; repeat it for several requests in one run folder."),
    k: int = typer.Option(4, "-k", min=1, max=64, help="Number of trajectories to sample for each request."),
    seed: int = typer.Option(0, help="Seed: trajectory i uses seed*1000+i for the policy and the generator."),
    out: Optional[Path] = typer.Option(None, help="Run folder to write (default: a new run id in the runs folder: $GENEVOLVE_RUNS, else runs/ in the data folder)."),
    policy: str = typer.Option("expert", help=POLICY_HELP),
    noise: str = typer.Option("cold-start", help="Expert noise: 'none' (perfect), 'cold-start' (imperfect, varied) or "
                              "'blind-spots' (cold-start, plus three skills mostly skipped without a guide)."),
    skip_skill: list[str] = typer.Option([], help="Skill the expert never uses (repeatable)."),
    p_distractor: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Chance the expert takes a distractor reference."),
    guide: Optional[str] = typer.Option(None, help="Decision guide for the system prompt: 'oracle' (the request's correct guide) or a text."),
    model: str = typer.Option("default", help="Model name to ask an OpenAI-compatible server for."),
    adapter: Optional[str] = typer.Option(None, help="LoRA adapter folder to attach to a local policy."),
    temperature: float = SAMPLING["temperature"],
    top_p: float = SAMPLING["top_p"],
    max_new_tokens: int = SAMPLING["max_new_tokens"],
    search: str = SEARCH_OPT,
    world: Optional[Path] = WORLD_OPT,
):
    """Run K trajectories for each request, render and judge them, and write a run folder."""
    from ..evaluation.bench import SandboxScorer, evaluate
    from ..agent.guides import oracle_guide
    from ..records.schema import RunInfo
    from ..records.runs import RunWriter, new_run_id, now_iso
    from ..world import World

    w = World(world)
    pol = make_policy(w, policy, noise, skip_skill, p_distractor, model, adapter)
    reqs = []
    for one in request:
        try:
            req = w.request(one)
        except KeyError as exc:
            raise typer.BadParameter(exc.args[0], param_hint="--request") from exc
        if req.parse_error:
            from ..world.requests import outside_world_note

            typer.echo(f"note ({req.id}): " + outside_world_note(req.parse_error))
        if req.id in {r.id for r in reqs}:
            raise typer.BadParameter(f"{one!r} is given twice: each request once (-k sets how many trajectories)",
                                     param_hint="--request")
        reqs.append(req)
    guides = None
    if guide:
        guides = {r.id: oracle_guide(w, r) if guide == "oracle" and r.scene else guide for r in reqs}
    run_id = new_run_id("rollout")
    from ..records.paths import runs_dir

    out = out or runs_dir() / run_id
    try:
        writer = RunWriter(out, RunInfo(id=run_id, created=now_iso(), command="rollout", policy=pol.name if pol else "raw",
                                         k=k, seed=seed, requests=[r.id for r in reqs],
                                         config={"noise": noise, "skip_skill": skip_skill, "guide": guide,
                                                 "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}))
    except (FileExistsError, ValueError) as exc:  # a run there already, or another kind of run folder: refused
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for req in reqs:
        writer.add_request(req, w.gt_image(req) if req.scene else None)
    tools, scorer = make_tools(w, search), SandboxScorer(w)
    label = reqs[0].id if len(reqs) == 1 else f"{len(reqs)} requests"
    with Bars(f"rollouts ({label}) seed") as bars:
        ev = evaluate(reqs, pol, tools, scorer, writer.images, [seed], samples=k,
                      params=sampling_params(temperature, top_p, max_new_tokens), guides=guides, on_turn=bars.update,
                      on_case=lambda c: writer.add(c.trajectory, c.rendered, c.verdict))
    rows = [[c.trajectory.id, c.trajectory.termination, c.trajectory.n_tool_calls, *(fmt(getattr(c.verdict, d)) for d in
             ("F", "V", "T", "A", "kscore", "r_text", "reward")), (c.verdict.failed or c.verdict.rationale)[:60]]
            for c in ev.cases]
    writer.finish(ev.per_seed[seed])
    typer.echo(table(rows, ["trajectory", "end", "tools", "F", "V", "T", "A", "KScore", "R_text", "reward", "rationale"]))
    typer.echo(f"run folder: {out}")


def register(app: typer.Typer) -> None:
    app.command()(rollout)
