"""What the gateway and the render service share at their front door: a body-size cap and an API key
(both small pure-ASGI middlewares, so they act before any route reads or parses anything), a JSON
reader that refuses NaN, Infinity and absurd nesting, and a check that a text is clean Unicode.

A refused request is answered only after its body has been read (and dropped, up to a bound): a
server that answers and closes while the client is still sending makes the client see a reset
connection instead of the answer.
"""

from __future__ import annotations

import hmac
import json
import math
import unicodedata
from typing import Any, Callable

Answer = Callable[[int, str], Any]  # (status, message) -> an ASGI response
DRAIN_MIN = 16 * 1024 * 1024  # a refused body is read and dropped up to max(4 x the cap, this), then the server hangs up


async def _drain(receive, limit: int) -> None:
    seen, more = 0, True
    while more and seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        more = message.get("more_body", False)


def replay_body(receive, body: bytes):
    """An ASGI ``receive`` that hands the app ``body`` (already read) once, then defers to the real one."""
    sent = False

    async def again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return again


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with 413 before the app sees it (by Content-Length when the
    client sends one, else by counting); a body under the cap is read whole and handed on."""

    def __init__(self, app, max_bytes: int, answer: Answer):
        self.app, self.max_bytes, self.answer = app, int(max_bytes), answer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"the request body is over {self.max_bytes} bytes (the server's limit)"
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await _drain(receive, max(4 * self.max_bytes, DRAIN_MIN))
            return await self.answer(413, too_big)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    await _drain(receive, max(4 * self.max_bytes, DRAIN_MIN))
                return await self.answer(413, too_big)(scope, receive, send)
        return await self.app(scope, replay_body(receive, b"".join(chunks)), send)


class ApiKey:
    """Every HTTP request must carry ``X-API-KEY: <key>``, or be let through by ``signed(scope)``."""

    def __init__(self, app, key: str, answer: Answer, max_bytes: int, signed: Callable[[dict], bool] = lambda s: False):
        self.app, self.key, self.answer, self.max_bytes, self.signed = app, key.encode(), answer, max_bytes, signed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-api-key", b"")
        if hmac.compare_digest(given, self.key) or self.signed(scope):
            return await self.app(scope, receive, send)
        await _drain(receive, max(4 * self.max_bytes, DRAIN_MIN))
        return await self.answer(403, "Unauthorized: send the server's key as X-API-KEY")(scope, receive, send)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number in JSON")


def read_json(body: bytes) -> tuple[Any, str | None]:
    """(value, None) for a JSON body, or (None, why) for a body that is not JSON we accept."""
    if not body.strip():
        return None, "the body is empty; send a JSON object"
    try:
        return json.loads(body, parse_float=_finite, parse_constant=_no_constant), None
    except RecursionError:
        return None, "the JSON is nested too deeply"
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, NaN/Infinity, over-long integers
        return None, f"the body is not valid JSON: {safe(str(exc))[:200]}"


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be used (lone surrogates, control characters), or None when it is clean."""
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cs":
            return "is not valid Unicode (it holds a lone surrogate)"
        if cat == "Cc" and ch not in "\t\n\r":
            return f"holds a control character (U+{ord(ch):04X})"
    return None


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def safe(text: str) -> str:
    """A message that can always be encoded as UTF-8 JSON."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def sign(key: str, path: str) -> str:
    """The signature that opens one path without the key (the gateway's image URLs)."""
    return hmac.new(key.encode(), path.encode(), "sha256").hexdigest()[:32]


def check_signature(key: str, path: str, given: str) -> bool:
    return hmac.compare_digest(sign(key, path), given)



def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server on this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # another host name, or "" (every address)
        return False


def serve_until_stopped(app, host: str, port: int, log_level: str = "warning", grace: float = 10.0) -> None:
    """Run ``app`` with uvicorn until interrupted or sent SIGTERM, then stop accepting, give the requests in
    flight up to ``grace`` seconds, and return (exit 0: uvicorn re-raises the signal it stopped on, which the
    handler installed here turns into a no-op)."""
    import contextlib
    import signal

    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace)
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: uvicorn installs no handlers either
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
