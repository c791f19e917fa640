"""Build and inspect the offline sandbox world."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import WORLD_OPT

def world_build(
    seed: int = typer.Option(0, help="Seed for every random choice in the world."),
    out: Path = typer.Option(Path("assets/world"), help="Folder to (re)write; replaced atomically when done."),
    no_index: bool = typer.Option(False, "--no-index", help="Skip building the FAISS indexes (built lazily on first search)."),
):
    """Rebuild every sandbox asset (entities, corpus, references, skill cards, requests, ground truths, indexes)."""
    from ..world.build import build_world

    counts = build_world(out, seed=seed, with_index=not no_index, log=typer.echo)
    typer.echo(json.dumps(counts))


def world_info(world: Optional[Path] = WORLD_OPT):
    """Print what the world holds."""
    from collections import Counter

    from ..world import World

    w = World(world)
    typer.echo(f"world: {w.root}")
    typer.echo(f"entities: {len(w.data.entities)}, events: {len(w.data.events)}, references: {len(w.refs)}")
    c = Counter((r.split, r.track) for r in w.requests)
    for (split, track), n in sorted(c.items()):
        typer.echo(f"  {split:7s} {track:10s} {n}")


def register(app: typer.Typer) -> None:
    world_app = typer.Typer(help="Build and inspect the offline sandbox world.", no_args_is_help=True)
    world_app.command("build")(world_build)
    world_app.command("info")(world_info)
    app.add_typer(world_app, name="world")
