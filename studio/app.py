"""The Gradio app: :func:`build_app` wires the five views (:mod:`studio.tabs`) to one :class:`~studio.services.Services`.

Per-user state (the open run, the watched distill folder) lives in ``gr.State``.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the studio runs offline

import hmac

import gradio as gr

from .html import CSS
from .services import Services
from .tabs import bench, distill, experiences, references, trajectories


def build_app(services: Services) -> gr.Blocks:
    """The whole studio over one set of services."""
    with gr.Blocks(title="GenEvolve Studio", analytics_enabled=False) as app:
        gr.Markdown(f"# GenEvolve Studio\nWorld `{services.world.root}` · runs `{services.runs_dir}` · "
                    f"your references `{services.world.refs_root}` · device {services.device}")
        with gr.Tabs():
            with gr.Tab("Trajectories", id="trajectories"):
                trajectories.tab(services)
            with gr.Tab("Experiences", id="experiences"):
                experiences.tab(services)
            with gr.Tab("References", id="references"):
                references.tab(services)
            with gr.Tab("Distill", id="distill"):
                distill.tab(services)
            with gr.Tab("Bench", id="bench"):
                bench.tab(services)
    return app


def launch(services: Services, host: str = "127.0.0.1", port: int = 7860, password: str | None = None, block: bool = True):
    """Serve the studio; with a password, every visitor must give it (any user name)."""
    app = build_app(services)
    app.queue(default_concurrency_limit=2)
    auth = (lambda _user, pw: hmac.compare_digest(pw.encode(), password.encode())) if password else None
    app.launch(server_name=host, server_port=port, auth=auth, css=CSS, prevent_thread_lock=not block, quiet=True,
               ssr_mode=False, footer_links=[], max_file_size="32mb",
               allowed_paths=[str(services.world.root), str(services.world.refs_root), str(services.runs_dir)])
    return app
