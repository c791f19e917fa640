"""The Gradio studio, started through the ``genevolve.apps`` entry point (the library never imports it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .common import WORLD_OPT

def studio(
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; 0.0.0.0 shares it on a network: set a password)."),
    port: int = typer.Option(7860, min=1, max=65535, help="Port to listen on."),
    password_env: str = typer.Option("GENEVOLVE_STUDIO_PASSWORD", help="Environment variable holding a password; "
                                     "when it is set, the studio asks for it (any user name)."),
    runs: Optional[Path] = typer.Option(None, help="Folder of run folders the studio opens and writes (default: "
                                        "$GENEVOLVE_RUNS, else runs/ in the data folder, where the other commands write)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder for your reference uploads and edits "
                                            "(default: $GENEVOLVE_DATA, else ~/.local/share/genevolve); the shipped world is never written."),
    world: Optional[Path] = WORLD_OPT,
    demo: bool = typer.Option(True, "--demo/--no-demo", help="Make the first screen's demo in the runs folder on first start "
                              "(a K=4 rollout, a quick self-evolution run with its report and bank; about a minute, in "
                              "the background)."),
    insecure_no_password: bool = typer.Option(False, "--insecure-no-password", rich_help_panel="Network",
                                              help="Serve a non-loopback address without a password: anyone who "
                                              "can reach it can use the studio and its runs."),
    forwarded_allow_ips: Optional[str] = typer.Option(
        None, "--forwarded-allow-ips", rich_help_panel="Network",
        help="Comma-separated addresses (or networks) of reverse proxies whose X-Forwarded-For header is believed, "
             "as uvicorn's setting of the same name. By default none: failed logins are counted per connecting "
             "address, whatever the header says."),
):
    """The Gradio studio: trajectories side by side, experience and reference editors, distill with a live
    student-vs-teacher view, and bench comparisons, on the offline sandbox."""
    from importlib.metadata import entry_points

    from ..serving.guard import is_loopback

    password = os.environ.get(password_env) or None
    if not is_loopback(host) and not password:
        if not insecure_no_password:
            typer.echo(f"error: the studio on {host} would be open to other machines without a password: set "
                       f"${password_env}, bind 127.0.0.1, or pass --insecure-no-password", err=True)
            raise typer.Exit(2)
        typer.echo(f"warning: binding {host} without a password (--insecure-no-password)", err=True)
    found = entry_points(group="genevolve.apps", name="studio")
    if not found:
        typer.echo("error: the studio is not installed (no 'genevolve.apps' entry point named 'studio'): "
                   "run `make studio`, or `pip install -e .` in the project folder", err=True)
        raise typer.Exit(2)
    serve = next(iter(found)).load()
    from ..records.paths import data_dir as default_data, runs_dir

    runs = runs or (default_data(data_dir) / "runs" if data_dir else runs_dir())
    try:
        serve(host=host, port=port, password=password, runs_dir=runs, data_dir=data_dir, world_dir=world, echo=typer.echo,
              insecure_no_password=insecure_no_password, demo=demo, forwarded_allow_ips=forwarded_allow_ips)
    except ValueError as exc:  # a setting refused before the studio starts (e.g. a proxy that is not an address)
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    app.command()(studio)
