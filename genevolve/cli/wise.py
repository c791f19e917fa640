"""WISE: WiScore of a generator, raw or through a policy, with a VLM judge."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import GENERATOR_HELP, JUDGE_HELP, POLICY_HELP, SEARCH_OPT, WORLD_OPT, fmt, make_policy, make_tools, open_generator, table

def wise(
    data: Path = typer.Option(..., help="Folder with the WISE prompt files (cultural_common_sense.json, ...)."),
    judge: str = typer.Option(..., help=JUDGE_HELP),
    judge_model: str = typer.Option("gpt-4o", help="Judge model name."),
    judge_api_key: Optional[str] = typer.Option(None, help="API key of the judge (default: $OPENAI_API_KEY)."),
    judge_cache: Optional[Path] = typer.Option(None, help="Cache of judge answers by content hash (default: judge-cache/ "
                                               "in the runs folder)."),
    rpm: float = typer.Option(0.0, min=0.0, help="At most this many judge requests per minute (0: no limit)."),
    generator: str = typer.Option("sandbox", help=GENERATOR_HELP),
    policy: str = typer.Option("raw", help=POLICY_HELP),
    model: str = typer.Option("default", help="Model name to ask an OpenAI-compatible server for."),
    limit: Optional[int] = typer.Option(None, min=1, help="First N prompts of each file (smoke runs)."),
    seed: int = typer.Option(0),
    device: Optional[str] = typer.Option(None, help="Torch device for diffusers generators."),
    search: str = SEARCH_OPT,
    out: Optional[Path] = typer.Option(None, help="JSON results (default: wise-<policy>.json in the runs folder)."),
    world: Optional[Path] = WORLD_OPT,
):
    """WISE: generate for every prompt (raw or through a policy), judge, and report WiScore by category and overall."""
    from ..records.paths import runs_dir
    from ..records.schema import ImageStore, atomic_write_json
    from ..evaluation.wise import WiseJudge, load_wise, run_wise
    from ..world import World

    judge_cache = judge_cache or runs_dir() / "judge-cache"
    try:
        items = load_wise(data, limit)
        wj = WiseJudge(judge, judge_model, api_key=judge_api_key, cache_dir=judge_cache, rpm=rpm)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    w = World(world)
    gen = open_generator(generator, device, None, world=w)
    pol = make_policy(w, policy, "none", [], None, model)
    out = out or runs_dir() / f"wise-{Path(policy).name or 'remote'}.json"
    res = run_wise(items, gen, wj, ImageStore(out.with_suffix("") / "images"), policy=pol,
                   tools=make_tools(w, search) if pol is not None else None, seed=seed, progress=typer.echo)
    atomic_write_json(out, {"generator": gen.name, "judge": wj.name, "policy": pol.name if pol else "raw", **res["summary"],
                            "results": {str(k): v for k, v in res["results"].items()}})
    s = res["summary"]
    rows = [[c, v["n"], fmt(v["wiscore"])] for c, v in s["categories"].items()]
    typer.echo(table(rows, ["category", "n", "WiScore"]))
    typer.echo(f"overall WiScore: {fmt(s['overall'])}" + (" (partial: some categories absent)" if s["partial"] else "")
               + f"; missing cases: {s['missing']['n']} (excluded)")
    typer.echo(f"saved: {out}")


def register(app: typer.Typer) -> None:
    app.command()(wise)
