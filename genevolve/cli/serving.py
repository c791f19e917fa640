"""Servers: the policy as an OpenAI-compatible endpoint, a generator as a render service, a store as a search gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import GENERATOR_HELP, WORLD_OPT, open_generator

def serve(
    policy: str = typer.Option("tiny", help="'tiny', 'smollm2' or a model folder to serve."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; use 0.0.0.0 to share on a network)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    model_name: Optional[str] = typer.Option(None, help="Name clients use in 'model' (default: the policy's name)."),
    alias: list[str] = typer.Option([], "--alias", help="Another name the policy answers to (repeatable); all are listed at /v1/models."),
    adapter: Optional[str] = typer.Option(None, help="LoRA adapter folder to load at start (served under its folder name)."),
    adapter_root: Optional[Path] = typer.Option(None, help="Folder /v1/load_lora_adapter may load adapters from (default: none, loading refused with 403)."),
    max_model_len: Optional[int] = typer.Option(None, min=1, help="Context length in tokens (default and upper bound: the model's max_position_embeddings)."),
    max_body_mb: float = typer.Option(2.0, min=0.001, help="Largest request body in MB; larger ones get 413."),
    max_queue: int = typer.Option(64, min=1, help="Requests admitted at once (running or waiting); beyond it 429."),
    max_batch: int = typer.Option(16, min=1, help="Choices generated together in one continuous batch."),
    shutdown_timeout: float = typer.Option(10.0, min=0, help="Seconds running requests get to finish after SIGTERM before they are cancelled."),
):
    """An OpenAI-compatible chat-completions server over a local policy, with vLLM-style dynamic LoRA loading.

    What it accepts and refuses is in docs/serving.md.
    """
    from ..policies.resolve import resolve_policy
    from ..serving.chat import run_server
    from ..serving.chat_limits import ServeLimits

    if policy in ("expert", "raw") or policy.startswith(("http://", "https://")):
        raise typer.BadParameter("serve needs a local model: tiny, smollm2 or a model folder", param_hint="--policy")
    if adapter_root is not None and not adapter_root.is_dir():
        raise typer.BadParameter(f"no folder at {adapter_root}", param_hint="--adapter-root")
    pol = resolve_policy(policy)
    adapters = ()
    if adapter:
        name = Path(adapter).name
        pol.load_adapter(adapter, name)
        adapters = (name,)
    limits = ServeLimits(aliases=tuple(alias), max_model_len=max_model_len, max_body_bytes=int(max_body_mb * 2**20),
                         max_queue=max_queue, max_batch=max_batch, adapter_root=adapter_root,
                         shutdown_timeout=shutdown_timeout)
    typer.echo(f"serving {model_name or pol.name} on http://{host}:{port}/v1", err=True)
    run_server(pol, model_name or pol.name, host=host, port=port, adapters=adapters, limits=limits)


def render_service(
    generator: str = typer.Option("sandbox", help=GENERATOR_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8100, min=1, max=65535),
    device: Optional[str] = typer.Option(None, help="Torch device for diffusers (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: bf16 on CUDA, fp32 on CPU)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Denoising steps for diffusers generators."),
    timeout: Optional[float] = typer.Option(None, help="Seconds one render may take before it fails."),
    ip_adapter: Optional[str] = typer.Option(None, help="IP-Adapter weights (repo id or folder) for ip-adapter:<model>."),
    world: Optional[Path] = WORLD_OPT,
):
    """Serve a generator with the render-service protocol: POST /generate {prompt, image_urls} -> {success, image}."""
    from ..serving.render import run_render_server
    from ..world import World

    gen = open_generator(generator, device, dtype, steps, timeout, World(world) if generator == "sandbox" else None, ip_adapter)
    typer.echo(f"render service: {gen.name} on http://{host}:{port}/generate")
    run_render_server(gen, host=host, port=port)


def gateway(
    store: Optional[Path] = typer.Option(None, help="Store folder: the sandbox world (default) or one built by `genevolve index`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8200, min=1, max=65535),
    api_key: Optional[str] = typer.Option(None, help="Require this key as X-API-KEY."),
    world: Optional[Path] = WORLD_OPT,
):
    """Serve a store with Serper's /search and /images formats (point SERPER_BASE_URL at it)."""
    from ..serving.gateway import run_gateway
    from ..world import default_world_dir

    folder = store or (world or default_world_dir())
    try:
        typer.echo(f"gateway: {folder} on http://{host}:{port} (/search, /images, /files/<id>)")
        run_gateway(folder, host=host, port=port, api_key=api_key)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--store") from exc


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command("render-service")(render_service)
    app.command()(gateway)
