"""The ``genevolve`` command line: one small module per group of commands, registered here explicitly.

Every command module parses its options and calls the library; nothing registers itself on import.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer

from . import bench
from . import data
from . import rollout
from . import serving
from . import studio
from . import train
from . import wise
from . import world

app = typer.Typer(help="GenEvolve Studio: self-evolving image-generation agents on an offline sandbox.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)

@app.callback()
def _client_bounds(
    timeout: float = typer.Option(60.0, "--timeout", min=1.0, help="Seconds one request to a policy or judge server may "
                                  "take before it is retried (or recorded as failed)."),
    retries: int = typer.Option(2, "--retries", min=0, max=10, help="Retries of a failed request to a policy or judge server."),
):
    """GenEvolve Studio: self-evolving image-generation agents on an offline sandbox."""
    from .common import CLIENT

    CLIENT.update(timeout=timeout, retries=retries)


for _module in (world, rollout, bench, train, serving, studio, data, wise):
    _module.register(app)

__all__ = ["app"]
