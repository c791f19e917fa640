"""The plumbing every API judge shares: client, key check, rate limit, cache, JSON answers.

**Transport.** Requests go through :class:`~genevolve.policies.openai_compat.OpenAIChatPolicy`
(bounded retries with exponential backoff on connection errors, time-outs, 429 and 5xx), always
at temperature 0. A server that is down or answers with something that is not a chat completion
becomes :class:`JudgeError` naming the URL.

**Keys.** A judge on a non-loopback URL needs an API key (``api_key=`` or ``$OPENAI_API_KEY``);
constructing one without it raises at once, naming the variable, instead of failing every case.

**Rate limit.** ``rpm`` > 0 spaces requests at least ``60 / rpm`` seconds apart across threads.

**Cache.** Answers are cached by a SHA-256 of everything that determines them (prompt version,
model, request text, the exact image bytes): a re-run of a bench re-judges nothing it has judged.
Only answers inside the rubric are cached, as small JSON files in ``cache_dir``.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import io
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


class JudgeError(RuntimeError):
    """A case could not be judged: the server failed, or its answer is outside the rubric."""


class RateLimiter:
    """At most ``rpm`` requests per minute, shared by every thread that holds this limiter."""

    def __init__(self, rpm: float = 0.0):
        self.interval = 60.0 / rpm if rpm and rpm > 0 else 0.0
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self) -> None:
        if self.interval <= 0:
            return
        with self._lock:
            now = time.monotonic()
            if self._next > now:
                time.sleep(self._next - now)
                now = time.monotonic()
            self._next = max(now, self._next) + self.interval


class JudgeCache:
    """JSON answers by key in ``<dir>/<k[:2]>/<k>.json``; ``None`` dir disables caching."""

    def __init__(self, folder: str | os.PathLike | None):
        self.dir = Path(folder) if folder else None

    @staticmethod
    def key(*parts: Any) -> str:
        h = hashlib.sha256()
        for p in parts:
            h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, ensure_ascii=False).encode("utf-8"))
            h.update(b"\x1f")
        return h.hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        if self.dir is None:
            return None
        p = self.dir / key[:2] / f"{key}.json"
        try:
            return json.loads(p.read_text("utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.dir is None:
            return
        from ..records.schema import atomic_write_json

        atomic_write_json(self.dir / key[:2] / f"{key}.json", value)


def image_bytes(image: Any) -> bytes:
    """PNG bytes of a PIL image (what the cache key and the request are made of)."""
    if not hasattr(image, "save"):
        from PIL import Image

        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def data_uri(image: Any, max_side: int = 1024) -> str:
    """The image as a PNG data URI, scaled down so its longer side is at most ``max_side``."""
    if not hasattr(image, "save"):
        from PIL import Image

        image = Image.fromarray(image)
    image = image.convert("RGB")
    if max(image.size) > max_side:
        s = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))))
    return "data:image/png;base64," + base64.b64encode(image_bytes(image)).decode("ascii")


def find_json_object(text: str) -> dict[str, Any]:
    """The JSON object in a model's answer (code fences and prose around it are tolerated)."""
    m = re.search(r"\{.*\}", text or "", re.S)
    if not m:
        raise JudgeError(f"the judge's answer has no JSON object: {(text or '')[:160]!r}")
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError as exc:
        raise JudgeError(f"the judge's answer is not valid JSON ({exc.msg}): {m.group(0)[:160]!r}") from exc
    if not isinstance(obj, dict):
        raise JudgeError("the judge's answer is not a JSON object")
    return obj


class ChatJudge(abc.ABC):
    """Base of the API judges: ``ask(messages, key)`` returns the parsed answer, cached by ``key``."""

    prompt_version = "chat-judge-v0"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, cache_dir: str | os.PathLike | None = None,
                 rpm: float = 0.0, max_retries: int = 3, backoff: float = 1.0, timeout: float = 120.0,
                 max_tokens: int = 1024, answer_retries: int = 1, max_side: int = 1024,
                 transport: httpx.BaseTransport | None = None, limiter: RateLimiter | None = None):
        from ..policies.base import SamplingParams
        from ..policies.openai_compat import OpenAIChatPolicy

        key = api_key or os.environ.get("OPENAI_API_KEY") or None
        host = httpx.URL(base_url.strip()).host
        if not key and host not in LOOPBACK_HOSTS:
            raise ValueError(f"no API key for the judge at {base_url}: set OPENAI_API_KEY or pass --judge-api-key "
                             "(only a loopback server may be used without one)")
        self.client = OpenAIChatPolicy(base_url, model, api_key=key, timeout=timeout, max_retries=max_retries,
                                       backoff=backoff, max_concurrency=1, logprobs=False, transport=transport)
        self.model = model
        self.params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_tokens)
        self.cache = JudgeCache(cache_dir)
        self.limiter = limiter or RateLimiter(rpm)
        self.answer_retries = max(0, int(answer_retries))
        self.max_side = max_side
        self.name = f"{self.prompt_version}:{model}"
        self.calls = 0  # requests actually sent (cache hits send none)

    @abc.abstractmethod
    def parse(self, text: str) -> dict[str, Any]:
        """Validate one answer against the rubric; raise JudgeError when it does not fit."""

    def ask(self, messages: list[dict[str, Any]], key: str) -> tuple[dict[str, Any], bool]:
        """(parsed answer, came from the cache). An answer outside the rubric is asked again
        ``answer_retries`` times (a slip is not a verdict), then raises."""
        hit = self.cache.get(key)
        if hit is not None:
            return hit, True
        last = ""
        for _ in range(self.answer_retries + 1):
            self.limiter.wait()
            self.calls += 1
            out = self.client.generate([messages], self.params)[0]
            if out.finish_reason == "error":
                raise JudgeError(out.error or "the judge request failed")
            try:
                parsed = self.parse(out.text)
            except JudgeError as exc:
                last = str(exc)
                continue
            self.cache.put(key, parsed)
            return parsed, False
        raise JudgeError(last)

    def close(self) -> None:
        self.client.close()
