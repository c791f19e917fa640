"""What ``genevolve serve`` accepts: the chat-completions request, its messages, and what is refused.

Everything here runs before the model sees the request: the body's size is capped while it is read,
the JSON is validated into :class:`ChatCompletionRequest`, and the messages are turned into the plain
``{"role", "content"}`` list the chat template renders (:func:`plain_messages`). A refusal raises
:class:`RequestRefused`, which the app answers with OpenAI's error body.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 8  # choices per request
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
ALLOWED_CONTROLS = {"\n", "\t", "\r"}


class RequestRefused(Exception):
    """A request the server answers with ``status`` and OpenAI's error body instead of a completion."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name": kept and passed on to the policy

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None  # a string, or OpenAI content parts
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's request we honour; other fields clients commonly send are ignored."""

    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(0.7, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI clients send this instead
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int = Field(1, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=256)
    tools: list[Any] | None = None
    tool_choice: Any = None

    @field_validator("n")
    @classmethod
    def _bounded_n(cls, n: int) -> int:
        if n > MAX_N:
            raise ValueError(f"n must be at most {MAX_N} (got {n})")
        return n

    @field_validator("top_logprobs")
    @classmethod
    def _bounded_top(cls, k: int | None) -> int | None:
        if k is not None and k > MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be at most {MAX_TOP_LOGPROBS} (got {k})")
        return k

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else list(stop)
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
        return [s for s in stops if s]

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class LoadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=200)


def validation_message(exc: ValidationError) -> str:
    """One readable line from pydantic's errors, as OpenAI and vLLM answer malformed requests (400, not 422)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = str(err.get("msg", "invalid"))
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid request: " + "; ".join(parts[:10])


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """The body as ``model``; malformed JSON or fields raise :class:`RequestRefused` (400)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RequestRefused(400, f"invalid request: the body is not JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise RequestRefused(400, "invalid request: the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestRefused(400, validation_message(exc)) from None
    except RecursionError:
        raise RequestRefused(400, "invalid request: the body is nested too deeply") from None


_BAD_CHAR = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def check_text(text: str, where: str) -> str:
    """``text`` unchanged, or 400 when it holds a surrogate or a control character other than \\n \\t \\r."""
    bad = _BAD_CHAR.search(text)
    if bad:
        ch = bad.group()
        name = "a lone surrogate" if "\ud800" <= ch <= "\udfff" else f"the control character {unicodedata.name(ch, '')}".rstrip()
        raise RequestRefused(400, f"invalid request: {where} contains {name} (U+{ord(ch):04X}) at offset {bad.start()}")
    return text


def _content_text(m: ChatMessage, k: int) -> str:
    """A message's content as one string: text parts joined by newlines; images and other parts refused."""
    where = f"messages.{k}.content"
    if m.content is None:
        if m.role == "assistant" and m.tool_calls:
            return ""
        raise RequestRefused(400, f"invalid request: {where}: content is required")
    if isinstance(m.content, str):
        return check_text(m.content, where)
    texts = []
    for j, part in enumerate(m.content):
        kind = part.get("type")
        if kind in ("image_url", "input_image", "image"):
            raise RequestRefused(400, f"{where}.{j}: this model is text-only; image content is not supported")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RequestRefused(400, f"invalid request: {where}.{j}: only text content parts are supported")
        texts.append(check_text(part["text"], f"{where}.{j}.text"))
    return "\n".join(texts)


def _tool_calls_text(calls: list[dict[str, Any]]) -> str:
    """An assistant's earlier tool calls in the project's turn format, ``<tool_call>{json}</tool_call>``."""
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call.get("function"), dict) else call
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        body = json.dumps({"name": fn.get("name", ""), "arguments": args}, ensure_ascii=False)
        out.append(f"<tool_call>{check_text(body, 'tool_calls')}</tool_call>")
    return "\n".join(out)


def plain_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages the chat template renders.

    A ``tool`` message becomes a user turn ``<tool_response>…</tool_response>`` (the format the
    policies are trained on; its ``tool_call_id`` is accepted and dropped). An assistant message's
    ``tool_calls`` are appended to its content as ``<tool_call>{json}</tool_call>``. Other extra
    fields (e.g. ``name``) are kept.
    """
    out = []
    for k, m in enumerate(req.messages):
        text = _content_text(m, k)
        extra = {key: v for key, v in (m.model_extra or {}).items() if isinstance(v, str)}
        if m.role == "tool":
            out.append({"role": "user", "content": f"<tool_response>{text}</tool_response>"})
            continue
        if m.role == "assistant" and m.tool_calls:
            text = "\n".join(t for t in (text, _tool_calls_text(m.tool_calls)) if t)
        out.append({**extra, "role": m.role, "content": text})
    return out


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    """Fields we parse but cannot honour: tool calling, and top_logprobs without logprobs."""
    if req.tools or (req.tool_choice is not None and req.tool_choice != "none"):
        raise RequestRefused(400, "tool calling is not supported by this server: send the request without "
                                  "'tools' and 'tool_choice' (tool results may still be sent as 'tool' messages)")
    if req.top_logprobs and not req.logprobs:
        raise RequestRefused(400, "invalid request: top_logprobs needs logprobs=true")
    for s in req.stops:
        check_text(s, "stop")
    if any(t < 0 for t in req.stop_token_ids or ()):
        raise RequestRefused(400, "invalid request: stop_token_ids must be non-negative token ids")
