"""OpenAI's response shapes: errors, the chat completion, stream chunks and log-probability blocks."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable

from fastapi.responses import JSONResponse

from .chat_engine import Choice, Job


def error_response(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body, which OpenAI clients know how to surface."""
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "code": status}})


def token_decoder(policy) -> Callable[[int], str]:
    decode = getattr(policy, "decode_token", None)
    return decode if callable(decode) else (lambda _id: "")


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}


def logprob_entries(choice: Choice, positions: list[int], decode: Callable[[int], str]) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` items for the given token positions of a choice."""
    out = []
    for k in positions:
        item = _entry(decode(choice.ids[k]), choice.logprobs[k] if k < len(choice.logprobs) else 0.0)
        top = choice.top[k] if k < len(choice.top) else []
        item["top_logprobs"] = [_entry(decode(t), lp) for t, lp in top[: choice.job.top_logprobs]]
        out.append(item)
    return out


def usage(job: Job) -> dict[str, int]:
    completion = sum(len(c.ids) for c in job.choices)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion}


def completion_body(job: Job, model: str, want_logprobs: bool, decode: Callable[[int], str]) -> dict[str, Any]:
    choices = []
    for c in job.choices:
        ids = c.content_ids()
        choice: dict[str, Any] = {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": c.finish_reason,
            "logprobs": {"content": logprob_entries(c, list(range(len(ids))), decode)} if want_logprobs else None,
        }
        if c.ids:
            choice["token_ids"] = list(c.ids)
        choices.append(choice)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(job)}


class ChunkWriter:
    """Server-sent events of one streamed completion: ``data: {chat.completion.chunk}`` lines, then ``data: [DONE]``."""

    def __init__(self, job: Job, model: str, want_logprobs: bool, decode: Callable[[int], str]):
        self.job, self.model, self.want_logprobs, self.decode = job, model, want_logprobs, decode
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _line(self, choices: list[dict[str, Any]], **extra) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def opening(self) -> list[str]:
        return [self._line([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for c in self.job.choices]

    def delta(self, index: int, text: str, positions: list[int]) -> str | None:
        choice = self.job.choices[index]
        logprobs = {"content": logprob_entries(choice, positions, self.decode)} if self.want_logprobs else None
        if not text and not (logprobs and logprobs["content"]):
            return None
        return self._line([{"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": None}])

    def closing(self, include_usage: bool) -> list[str]:
        if self.job.error:
            err = {"message": f"generation failed: {self.job.error}", "type": "server_error", "code": 500}
            return [f"data: {json.dumps({'error': err})}\n\n", "data: [DONE]\n\n"]
        lines = [self._line([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}])
                 for c in self.job.choices]
        if include_usage:
            lines.append(self._line([], usage=usage(self.job)))
        return lines + ["data: [DONE]\n\n"]
