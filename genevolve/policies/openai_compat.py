"""A :class:`ChatPolicy` over any OpenAI-compatible chat-completions server (vLLM, SGLang, ``genevolve.serving.chat``).

Server trouble never raises out of :meth:`OpenAIChatPolicy.generate`: a rollout of many episodes must
survive one flaky request, so a failed conversation becomes ``Completion(finish_reason="error")`` with a
reason naming the URL, and :class:`AsAgentPolicy` turns that into an ``error`` termination of that
episode only. Transient failures (connection errors, time-outs, 429, 5xx) are retried a bounded number
of times with exponential backoff; other 4xx are the caller's mistake and fail at once.

``timeout`` bounds each attempt as a whole, from connecting to the last byte: a server that trickles its
answer is hung up on when the time is up (each request has its own connection, so the client can close
it). An answer longer than any completion of ``max_tokens`` could need is not read past that size.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import httpx

from .base import Completion, Message, SamplingParams


def _normalise_base_url(base_url: str) -> str:
    """``http://host:8000`` -> ``http://host:8000/v1``; a URL that already has a path is kept as given."""
    base = base_url.strip().rstrip("/")
    if httpx.URL(base).path in ("", "/"):
        base += "/v1"
    return base


def _is_retryable_status(code: int) -> bool:
    return code == 429 or code >= 500


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def response_cap(params: SamplingParams) -> int:
    """Bytes of answer read at most: 1 MiB, or 1 KiB a token for a longer ``max_new_tokens`` (text, token ids
    and log-probabilities together take a few hundred bytes a token)."""
    return max(1 << 20, 1024 * params.max_new_tokens)


class TooLong(Exception):
    """The server's answer went past the size cap; the rest was not read."""


@dataclass
class Reply:
    """A whole answer, read within the deadline and the size cap."""

    status_code: int
    content: bytes

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


def _hang_up(sockets: list[socket.socket]) -> None:
    """Shut the connection down: a read blocked on it returns at once (closing alone would not wake it)."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _remember_socket(sockets: list[socket.socket]):
    """An httpx ``trace`` hook that keeps the socket of each connection the request opens."""

    def trace(event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete" and info.get("return_value") is not None:
            sock = info["return_value"].get_extra_info("socket")
            if sock is not None:
                sockets.append(sock)
    return trace


class OpenAIChatPolicy:
    """``POST {base_url}/chat/completions`` per conversation, ``max_concurrency`` requests in flight.

    ``max_retries`` is the number of retries after the first attempt, so a request is tried at most
    ``1 + max_retries`` times, sleeping ``backoff * 2**k`` before retry ``k`` (0-based).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        logprobs: bool = True,
        transport: httpx.BaseTransport | None = None,
    ):
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.base_url = _normalise_base_url(base_url)
        self.model = model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
        self.max_retries = max(0, int(max_retries))
        self.backoff = float(backoff)
        self.max_concurrency = int(max_concurrency)
        # Flipped off for good once the server says it does not support logprobs (e.g. some proxies).
        self.logprobs = bool(logprobs)
        self.name = f"openai:{model}@{self.base_url}"
        self._url = f"{self.base_url}/chat/completions"
        self.timeout = float(timeout)
        # No kept-alive connections: each request opens its own, which the deadline can hang up on.
        self._http = httpx.Client(transport=transport, timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OpenAIChatPolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API -----------------------------------------------------------------------------

    def generate(self, conversations: Sequence[list[Message]], params: SamplingParams) -> list[Completion]:
        """One completion per conversation, in input order; failures are error completions, not raises."""
        if len(conversations) <= 1 or self.max_concurrency == 1:
            return [self._complete(c, params) for c in conversations]
        workers = min(self.max_concurrency, len(conversations))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-policy") as pool:
            return list(pool.map(lambda c: self._complete(c, params), conversations))

    # -- one request ----------------------------------------------------------------------------

    def _payload(self, messages: list[Message], params: SamplingParams, logprobs: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
            "n": 1,
        }
        if params.seed is not None:
            payload["seed"] = params.seed
        if logprobs:
            payload["logprobs"] = True
        return payload

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _send(self, payload: dict[str, Any], cap: int) -> Reply:
        """One POST, its answer read whole within ``self.timeout`` seconds from the start and ``cap`` bytes;
        httpx errors as httpx raises them (running out of time as :class:`httpx.ReadTimeout`), or TooLong."""
        sockets: list[socket.socket] = []
        deadline = time.monotonic() + self.timeout
        timer = threading.Timer(self.timeout, _hang_up, (sockets,))
        timer.daemon = True
        timer.start()
        try:
            with self._http.stream("POST", self._url, json=payload, headers=self._headers(),
                                   extensions={"trace": _remember_socket(sockets)}) as resp:
                chunks, size = [], 0
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise TooLong(f"the answer is over {cap} bytes (more than max_tokens can need); not read further")
                    if time.monotonic() > deadline:  # a transport that the hang-up cannot reach
                        raise httpx.ReadTimeout("out of time")
                    chunks.append(chunk)
                return Reply(resp.status_code, b"".join(chunks))
        except httpx.TransportError:
            if time.monotonic() < deadline:
                raise
            raise httpx.ReadTimeout(f"no complete answer within {self.timeout:g} s") from None
        finally:
            timer.cancel()

    def _post(self, payload: dict[str, Any], cap: int) -> tuple[Reply | None, str]:
        """The bounded retry loop: ``(reply, "")`` for a final answer (2xx or non-retryable
        4xx), ``(None, reason)`` when every attempt failed transiently or the request itself failed."""
        reason = ""
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            if attempt and self.backoff > 0:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self._send(payload, cap)
            except httpx.TransportError as exc:  # connect errors, time-outs, dropped connections
                reason = _describe(exc)
                continue
            except (httpx.HTTPError, TooLong) as exc:  # e.g. too many redirects: retrying will not help
                return None, _describe(exc)
            if _is_retryable_status(resp.status_code):
                body = resp.text.strip()[:200]
                reason = f"HTTP {resp.status_code}" + (f": {body}" if body else "")
                continue
            return resp, ""
        return None, f"{reason} after {attempts} attempts"

    def _complete(self, messages: list[Message], params: SamplingParams) -> Completion:
        use_logprobs, cap = self.logprobs, response_cap(params)
        resp, reason = self._post(self._payload(messages, params, use_logprobs), cap)
        if (
            resp is not None
            and use_logprobs
            and resp.status_code == 400
            and "logprobs" in resp.text.lower()
        ):
            self.logprobs = False
            resp, reason = self._post(self._payload(messages, params, False), cap)
        if resp is None:
            return self._error(reason)
        if not resp.is_success:
            body = resp.text.strip()[:300]
            return self._error(f"HTTP {resp.status_code}" + (f": {body}" if body else ""))
        return cap_length(self._parse(resp), params)

    def _error(self, reason: str) -> Completion:
        return Completion(text="", finish_reason="error", error=f"POST {self._url} failed: {reason}")

    def _parse(self, resp: Reply) -> Completion:
        try:
            data = resp.json()
        except ValueError:
            return self._error(f"response is not JSON: {resp.text.strip()[:200]!r}")
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return self._error(f"response has no choices: {resp.text.strip()[:200]!r}")
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            return self._error("response choice has no message")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            return self._error(f"message content is {type(content).__name__}, expected a string")
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Completion(
            text=content or "",
            finish_reason=finish,
            token_ids=_token_ids(choice),
            logprobs=_logprobs(choice),
        )


def cap_length(completion: Completion, params: SamplingParams) -> Completion:
    """A completion longer than any ``max_new_tokens`` answer could be (32 characters a token) is cut there and
    recorded as too long, so a misbehaving server cannot fill the run files."""
    limit = max(4096, 32 * params.max_new_tokens)
    if len(completion.text) <= limit:
        return completion
    note = f"completion of {len(completion.text)} characters cut at {limit} (more than max_tokens={params.max_new_tokens} allows)"
    return Completion(text=completion.text[:limit], finish_reason="length", error=note,
                      token_ids=completion.token_ids[: params.max_new_tokens], logprobs=(completion.logprobs or [])[: params.max_new_tokens] or None)


def _logprobs(choice: dict[str, Any]) -> list[float] | None:
    """``choices[0].logprobs.content[*].logprob``; None when absent or not in that shape."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return None
    try:
        return [float(entry["logprob"]) for entry in content]
    except (TypeError, KeyError, ValueError):
        return None


def _token_ids(choice: dict[str, Any]) -> list[int]:
    """vLLM (``return_token_ids``) and ``genevolve.serving.chat`` put the sampled ids in ``choices[0].token_ids``."""
    ids = choice.get("token_ids")
    if not isinstance(ids, list):
        return []
    try:
        return [int(i) for i in ids]
    except (TypeError, ValueError):
        return []
