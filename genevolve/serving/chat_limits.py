"""The server's bounds, checked before any tensor exists: body size, context length, adapter folders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request

from .chat_request import RequestRefused

DEFAULT_MAX_TOKENS = 256  # a request that names no max_tokens gets this much, or what the context leaves
UNKNOWN_CONTEXT_MAX_TOKENS = 32768  # the budget cap for a policy whose context length is not known
ADAPTER_REFUSED = ("loading adapters from this path is not allowed: adapters load only from folders under "
                   "the server's --adapter-root")


@dataclass
class ServeLimits:
    """What one ``genevolve serve`` process allows (the command's options)."""

    aliases: tuple[str, ...] = ()
    max_model_len: int | None = None  # default: the model config's max_position_embeddings
    max_body_bytes: int = 2 * 1024 * 1024
    max_queue: int = 64
    max_batch: int = 16
    adapter_root: str | os.PathLike | None = None  # None: /v1/load_lora_adapter is refused (403)
    shutdown_timeout: float = 10.0
    default_max_tokens: int = DEFAULT_MAX_TOKENS


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be over ``limit`` bytes."""
    too_big = RequestRefused(413, f"the request body is larger than the server's limit of {limit} bytes "
                                  "(--max-body-mb)", "invalid_request_error")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_big
        except ValueError:
            raise RequestRefused(400, "invalid Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def context_length(policy, override: int | None) -> int | None:
    """The model's context: ``override`` when given (at most the config's), else ``max_position_embeddings``."""
    config = getattr(getattr(policy, "model", None), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    native = getattr(config, "max_position_embeddings", None)
    if override is not None:
        return min(override, native) if isinstance(native, int) else override
    return native if isinstance(native, int) else None


def count_prompt_tokens(policy, messages: list[dict[str, Any]], limit: int | None = None, piece: int = 1) -> int:
    """The prompt's length as the model will see it (template with generation prompt); 0 without a tokenizer.

    Tokenising gives Python lists only: a prompt too long for the context is refused before any tensor.
    A rendered prompt longer than ``limit`` times ``piece`` (the longest vocabulary entry,
    :func:`longest_token_chars`) times 4 (for normalisers that fold several characters into one)
    cannot fit whatever its tokens, so it is refused without tokenising it at all.
    """
    tokenizer = getattr(policy, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        return 0
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template that cannot render these messages (e.g. role order)
        raise RequestRefused(400, f"the chat template cannot render these messages: {type(exc).__name__}: {exc}") from None
    piece = 4 * piece
    if limit is not None and len(text) > limit * piece:
        raise RequestRefused(
            400, f"This model's maximum context length is {limit} tokens. However, your messages have at least "
                 f"{-(-len(text) // piece)} tokens. Please reduce the length of the messages.")
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def longest_token_chars(policy) -> int:
    """Characters the longest vocabulary entry stands for (at most: byte-level entries spell one char per
    byte); 1 for a policy without a tokenizer."""
    tokenizer = getattr(policy, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return 1
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def completion_budget(limit: int | None, prompt_tokens: int, requested: int | None, default: int) -> int:
    """The tokens a request may generate; 400 in vLLM's words when the prompt and request exceed the context.

    As vLLM: an explicit ``max_tokens`` that does not fit next to the prompt is refused, never cut; a
    request without one gets ``default`` capped to what the context leaves.
    """
    if limit is None:  # a model that does not say its context: still never an unbounded generation
        if requested is not None and requested > UNKNOWN_CONTEXT_MAX_TOKENS:
            raise RequestRefused(400, f"max_tokens must be at most {UNKNOWN_CONTEXT_MAX_TOKENS} for this model "
                                      f"(got {requested})")
        return requested or default
    wanted = requested if requested is not None else min(default, max(1, limit - prompt_tokens))
    if prompt_tokens + wanted > limit:
        raise RequestRefused(
            400, f"This model's maximum context length is {limit} tokens. However, you requested "
                 f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the messages, {wanted} in the completion). "
                 "Please reduce the length of the messages or completion.")
    return wanted


def confined_adapter_path(root: str | os.PathLike | None, path: str) -> Path:
    """``path`` resolved (symlinks followed) when it lies under ``root``; 403 otherwise, the same message
    whether or not it exists, so the endpoint never tells what the file system holds outside the root."""
    if root is None:
        raise RequestRefused(403, "loading adapters is disabled: start the server with --adapter-root to allow "
                                  "loading from folders under it", "permission_error")
    try:
        base = Path(root).resolve(strict=True)
        target = Path(path)
        resolved = (target if target.is_absolute() else base / target).resolve(strict=False)
    except (OSError, ValueError, RuntimeError):
        raise RequestRefused(403, ADAPTER_REFUSED, "permission_error") from None
    if resolved == base or not resolved.is_relative_to(base):
        raise RequestRefused(403, ADAPTER_REFUSED, "permission_error")
    if not resolved.is_dir():
        raise RequestRefused(400, f"no adapter folder {path!r} under the adapter root")
    return resolved
