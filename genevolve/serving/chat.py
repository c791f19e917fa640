"""An OpenAI-compatible chat-completions server in front of any :class:`ChatPolicy`.

Trained students are served in the same API as vLLM and SGLang, so any OpenAI client (including our own
:class:`~genevolve.policies.openai_compat.OpenAIChatPolicy`) can drive them. As in vLLM, LoRA adapters can
be loaded at run time (``POST /v1/load_lora_adapter``) and are selected per request by passing the
adapter name as ``model``.

One model, one GPU: generation runs under a lock, one request at a time, and switching adapters happens
under the same lock so a request never sees another request's adapter. There is no authentication, so
the server binds to loopback unless told otherwise.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Sequence, Any, Iterable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..policies.base import ChatPolicy, Completion, SamplingParams

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name": kept and passed on to the policy

    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]  # a string, or OpenAI content parts (text, image_url)


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's request we honour; other fields clients commonly send are ignored."""

    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI clients send this instead
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    stream: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n must be 1 (got {n}): send one request per sample")
        return n

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, stream: bool) -> bool:
        if stream:
            raise ValueError("streaming is not supported: send stream=false")
        return stream


class LoadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)


def _error(status: int, message: str, kind: str) -> JSONResponse:
    """OpenAI's error body, which OpenAI clients know how to surface."""
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def _count_prompt_tokens(policy: ChatPolicy, messages: list[dict[str, Any]]) -> int:
    """Through the policy's chat template when it exposes a tokenizer; 0 when it cannot be counted."""
    tokenizer = getattr(policy, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        return 0
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception:  # usage is informational; a template quirk must not fail the request
        return 0
    if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return len(ids) if hasattr(ids, "__len__") else 0


def _logprobs_block(policy: ChatPolicy, completion: Completion) -> dict[str, Any] | None:
    if completion.logprobs is None:
        return None
    decode = getattr(policy, "decode_token", None)
    ids = completion.token_ids
    content = []
    for i, lp in enumerate(completion.logprobs):
        token = decode(ids[i]) if decode is not None and i < len(ids) else ""
        content.append({"token": token, "logprob": lp, "bytes": None, "top_logprobs": []})
    return {"content": content}


def _chat_completion(policy: ChatPolicy, model_name: str, loaded: set[str], lock: threading.Lock,
                     req: ChatCompletionRequest) -> Any:
    """One chat completion: the base model or a loaded adapter, one generation at a time, in OpenAI's format."""
    adapter = None if req.model in ("", model_name) else req.model
    if adapter is not None and adapter not in loaded:
        known = ", ".join([model_name, *sorted(loaded)])
        return _error(404, f"model {req.model!r} not found; available: {known}", "not_found")
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    params = SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        max_new_tokens=req.max_completion_tokens or req.max_tokens,
        seed=req.seed,
    )
    with lock:
        try:
            if adapter is not None:
                policy.set_adapter(adapter)
            elif loaded and hasattr(policy, "disable_adapter"):
                policy.disable_adapter()
            completion = policy.generate([messages], params)[0]
        except Exception as exc:  # reported to the client; the server keeps serving
            completion = Completion(text="", finish_reason="error", error=f"{type(exc).__name__}: {exc}")
    if completion.finish_reason == "error":
        return _error(500, f"generation failed: {completion.error or 'unknown error'}", "server_error")
    prompt_tokens = _count_prompt_tokens(policy, messages)
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": completion.text},
        "finish_reason": completion.finish_reason,
        "logprobs": _logprobs_block(policy, completion) if req.logprobs else None,
    }
    if completion.token_ids:
        choice["token_ids"] = list(completion.token_ids)
    completion_tokens = len(completion.token_ids)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.model or model_name,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def build_app(policy: ChatPolicy, model_name: str, adapters: Iterable[str] = ()) -> FastAPI:
    """The app; ``adapters`` names LoRA adapters already loaded on ``policy`` before serving."""
    app = FastAPI(title=f"genevolve serve: {model_name}")
    lock = threading.Lock()
    loaded: set[str] = set(adapters)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI and vLLM answer malformed requests with 400 and one readable message, not 422.
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
        return _error(400, "invalid request: " + "; ".join(parts), "invalid_request_error")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        names = [model_name, *sorted(loaded)]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "genevolve"} for n in names]}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatCompletionRequest) -> Any:
        return _chat_completion(policy, model_name, loaded, lock, req)

    @app.post("/v1/load_lora_adapter")
    def load_lora_adapter(req: LoadAdapterRequest) -> Any:
        if not hasattr(policy, "load_adapter"):
            return _error(400, f"policy {policy.name!r} cannot load LoRA adapters", "invalid_request_error")
        if req.lora_name == model_name or req.lora_name in loaded:
            return _error(400, f"adapter name {req.lora_name!r} is already in use", "invalid_request_error")
        if not Path(req.lora_path).exists():
            return _error(400, f"adapter path does not exist: {req.lora_path}", "invalid_request_error")
        with lock:
            try:
                policy.load_adapter(req.lora_path, req.lora_name)
            except Exception as exc:  # a bad adapter folder is the caller's input, not a server crash
                return _error(
                    400, f"loading {req.lora_path} failed: {type(exc).__name__}: {exc}", "invalid_request_error"
                )
            loaded.add(req.lora_name)
        return {"status": "loaded", "lora_name": req.lora_name}

    @app.post("/v1/unload_lora_adapter")
    def unload_lora_adapter(req: UnloadAdapterRequest) -> Any:
        if req.lora_name not in loaded:
            return _error(404, f"adapter {req.lora_name!r} is not loaded", "not_found")
        if not hasattr(policy, "unload_adapter"):
            return _error(400, f"policy {policy.name!r} cannot unload LoRA adapters", "invalid_request_error")
        with lock:
            policy.unload_adapter(req.lora_name)
            loaded.discard(req.lora_name)
        return {"status": "unloaded", "lora_name": req.lora_name}

    return app


def run_server(
    policy: ChatPolicy,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    adapters: Sequence[str] = (),
) -> None:
    """Serve until interrupted. Loopback by default: the API has no authentication."""
    import uvicorn

    if host not in LOOPBACK_HOSTS:
        print(
            f"warning: serving {model_name!r} on {host}:{port}, reachable from other machines "
            "with no authentication; anyone who can connect can generate and load adapters",
            file=sys.stderr,
        )
    uvicorn.run(build_app(policy, model_name, adapters=adapters), host=host, port=port, log_level=log_level)
