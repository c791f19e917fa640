"""An OpenAI-compatible chat-completions server in front of any :class:`ChatPolicy` (``genevolve serve``).

Trained students are served in the same API as vLLM and SGLang, so any OpenAI client (including our own
:class:`~genevolve.policies.openai_compat.OpenAIChatPolicy`) can drive them. The policy answers to its
name and any aliases; as in vLLM, LoRA adapters can be loaded at run time (``POST /v1/load_lora_adapter``,
only from folders under the adapter root) and are selected per request by passing the adapter name as
``model``.

A request is read with a size cap, validated (:mod:`.chat_request`), measured against the context
(:mod:`.chat_limits`) and queued; generation runs on one worker thread, concurrent requests batched
together through the continuous-batching engine (:mod:`.chat_engine`), where a new request joins a
running batch at its next decoding step. Answers are OpenAI's shapes,
streamed as server-sent events on request (:mod:`.chat_format`). A client that goes away has its
generation cancelled; on SIGTERM the server stops accepting, gives running requests up to
``shutdown_timeout`` seconds, cancels the rest and exits 0. There is no authentication, so the server
binds to loopback unless told otherwise. docs/serving.md lists what is supported and refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from typing import Any, AsyncIterator, Iterable, Sequence

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..policies.base import ChatPolicy, SamplingParams
from .chat_engine import ChatEngine, Job
from .chat_format import ChunkWriter, completion_body, error_response, token_decoder
from .chat_limits import (ServeLimits, completion_budget, confined_adapter_path, context_length,
                          count_prompt_tokens, longest_token_chars, read_body)
from .chat_request import (ChatCompletionRequest, LoadAdapterRequest, RequestRefused, UnloadAdapterRequest,
                           parse_body, plain_messages, refuse_unsupported)

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
DISCONNECT_POLL_S = 0.2
SAMPLING_EPS = 1e-5  # a temperature below this samples greedily (logits / 1e-80 overflow to inf)


class ChatServer:
    """The state behind the app: the policy, its names, loaded adapters, the limits and the engine."""

    def __init__(self, policy: ChatPolicy, model_name: str, adapters: Iterable[str], limits: ServeLimits):
        self.policy, self.model_name, self.limits = policy, model_name, limits
        self.names = list(dict.fromkeys([model_name, *limits.aliases]))
        self.loaded: set[str] = set(adapters)
        self.engine = ChatEngine(policy, max_queue=limits.max_queue, max_batch=limits.max_batch)
        self.context = context_length(policy, limits.max_model_len)
        self.decode = token_decoder(policy)
        self.piece = longest_token_chars(policy)

    def served(self) -> list[str]:
        return [*self.names, *sorted(self.loaded - set(self.names))]

    def make_job(self, req: ChatCompletionRequest) -> Job:
        """Everything that may refuse a request, before it is queued (runs off the event loop)."""
        adapter = None if req.model in ("", *self.names) else req.model
        if adapter is not None and adapter not in self.loaded:
            raise RequestRefused(404, f"The model `{req.model}` does not exist; this server serves: "
                                      f"{', '.join(self.served())}", "not_found")
        refuse_unsupported(req)
        messages = plain_messages(req)
        prompt_tokens = count_prompt_tokens(self.policy, messages, self.context, self.piece)
        budget = completion_budget(self.context, prompt_tokens, req.requested_max_tokens,
                                   self.limits.default_max_tokens)
        temperature = 0.0 if req.temperature < SAMPLING_EPS else req.temperature  # as vLLM: near 0 is greedy
        params = SamplingParams(temperature=temperature, top_p=req.top_p, max_new_tokens=budget, seed=req.seed)
        return Job(messages, params, n=req.n, adapter=adapter, stops=req.stops,
                   stop_token_ids=set(req.stop_token_ids or ()), top_logprobs=req.top_logprobs or 0,
                   stream=req.stream, prompt_tokens=prompt_tokens)


def _listen(job: Job) -> asyncio.Queue:
    """Events from the worker thread into this request's event loop."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    job.listener = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
    return events


async def _wait(job: Job, events: asyncio.Queue, request: Request) -> bool:
    """Wait for the job; False when the client went away first (the job is cancelled then)."""
    try:
        while not job.done.is_set():
            try:
                await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return False
        return True
    finally:  # also when this task is cancelled (the client left, or shutdown ran out of time)
        if not job.done.is_set():
            job.cancel()


async def _stream(job: Job, events: asyncio.Queue, writer: ChunkWriter, include_usage: bool) -> AsyncIterator[str]:
    try:
        for line in writer.opening():
            yield line
        while True:
            event = await events.get()
            if event[0] == "done":
                break
            line = writer.delta(*event[1:])
            if line:
                yield line
        for line in writer.closing(include_usage):
            yield line
    finally:  # the client disconnected: Starlette cancels this generator
        if not job.done.is_set():
            job.cancel()


def _add_chat_route(app: FastAPI, server: ChatServer) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            raw = await read_body(request, server.limits.max_body_bytes)
            req = parse_body(raw, ChatCompletionRequest)
            job = await run_in_threadpool(server.make_job, req)
            events = _listen(job)
            server.engine.submit(job)
        except RequestRefused as r:
            return error_response(r.status, r.message, r.kind, r.headers)
        model = req.model or server.model_name
        want_logprobs = req.logprobs
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            writer = ChunkWriter(job, model, want_logprobs, server.decode)
            return StreamingResponse(_stream(job, events, writer, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        if not await _wait(job, events, request):
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        if job.error:
            return error_response(500, f"generation failed: {job.error}", "server_error")
        return completion_body(job, model, want_logprobs, server.decode)


def _add_adapter_routes(app: FastAPI, server: ChatServer) -> None:
    policy = server.policy

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Any:
        try:
            req = parse_body(await read_body(request, server.limits.max_body_bytes), LoadAdapterRequest)
            if not hasattr(policy, "load_adapter"):
                raise RequestRefused(400, f"policy {policy.name!r} cannot load LoRA adapters")
            path = confined_adapter_path(server.limits.adapter_root, req.lora_path)
            if req.lora_name in server.names or req.lora_name in server.loaded:
                raise RequestRefused(400, f"adapter name {req.lora_name!r} is already in use")
            await run_in_threadpool(_load, server, str(path), req.lora_name)
        except RequestRefused as r:
            return error_response(r.status, r.message, r.kind, r.headers)
        return {"status": "loaded", "lora_name": req.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Any:
        try:
            req = parse_body(await read_body(request, server.limits.max_body_bytes), UnloadAdapterRequest)
            if req.lora_name not in server.loaded:
                raise RequestRefused(404, f"adapter {req.lora_name!r} is not loaded", "not_found")
            if not hasattr(policy, "unload_adapter"):
                raise RequestRefused(400, f"policy {policy.name!r} cannot unload LoRA adapters")
            await run_in_threadpool(_unload, server, req.lora_name)
        except RequestRefused as r:
            return error_response(r.status, r.message, r.kind, r.headers)
        return {"status": "unloaded", "lora_name": req.lora_name}


def _load(server: ChatServer, path: str, name: str) -> None:
    with server.engine.exclusive():
        try:
            server.policy.load_adapter(path, name)
        except Exception as exc:  # a bad adapter folder is the caller's input, not a server crash
            raise RequestRefused(400, f"loading adapter {name!r} failed: {type(exc).__name__}") from None
        server.loaded.add(name)


def _unload(server: ChatServer, name: str) -> None:
    with server.engine.exclusive():
        server.engine.drop_adapter(name)
        server.policy.unload_adapter(name)
        server.loaded.discard(name)


def build_app(policy: ChatPolicy, model_name: str, adapters: Iterable[str] = (),
              limits: ServeLimits | None = None) -> FastAPI:
    """The app; ``adapters`` names LoRA adapters already loaded on ``policy`` before serving."""
    server = ChatServer(policy, model_name, adapters, limits or ServeLimits())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await run_in_threadpool(server.engine.stop, 2.0)  # uvicorn's graceful period has already run

    app = FastAPI(title=f"genevolve serve: {model_name}", lifespan=lifespan)
    app.state.server = server

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": n, "object": "model", "owned_by": "genevolve", "root": model_name,
             "max_model_len": server.context} for n in server.served()]}

    _add_chat_route(app, server)
    _add_adapter_routes(app, server)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    return app


def run_server(
    policy: ChatPolicy,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    adapters: Sequence[str] = (),
    limits: ServeLimits | None = None,
) -> None:
    """Serve until interrupted or sent SIGTERM. Loopback by default: the API has no authentication."""
    import uvicorn

    limits = limits or ServeLimits()
    if host not in LOOPBACK_HOSTS:
        print(
            f"warning: serving {model_name!r} on {host}:{port}, reachable from other machines "
            "with no authentication; anyone who can connect can generate and load adapters",
            file=sys.stderr,
        )
    app = build_app(policy, model_name, adapters=adapters, limits=limits)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=limits.shutdown_timeout)
    # uvicorn re-raises the signal it shut down on; with this handler in place that is a no-op, so a
    # SIGTERM ends in a clean exit 0 once the graceful period has run.
    previous = None
    with contextlib.suppress(ValueError):  # not in the main thread: uvicorn installs no handlers either
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        graceful_server(config, app.state.server.engine, limits.shutdown_timeout).run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def graceful_server(config, engine: ChatEngine, grace: float):
    """A uvicorn server that, once told to stop, cancels the generations still running shortly before
    ``grace`` seconds are up, so that their responses end properly (streams with their last chunk and
    ``[DONE]``) before uvicorn closes what is left."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                timer = threading.Timer(max(0.0, grace - 0.5), engine.cancel_all)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    return GracefulServer(config)
