"""OpenAIChatPolicy against httpx.MockTransport: payload, headers, parsing, retries, failures as completions."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from genevolve.policies.base import AsAgentPolicy, SamplingParams
from genevolve.policies.openai_compat import OpenAIChatPolicy

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def ok_body(text: str = "hello", finish: str = "stop", logprobs: list[float] | None = None, **choice_extra) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": "t", "logprob": lp, "top_logprobs": []} for lp in logprobs]}
    choice.update(choice_extra)
    return {"id": "chatcmpl-1", "object": "chat.completion", "choices": [choice]}


class Recorder:
    """A MockTransport handler that replays scripted responses and records every request."""

    def __init__(self, *responses):
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        item = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(item, Exception):
            raise item
        if callable(item):
            return item(request)
        return item

    @property
    def payloads(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests]


def make(handler, **kwargs) -> OpenAIChatPolicy:
    kwargs.setdefault("backoff", 0)
    return OpenAIChatPolicy(
        kwargs.pop("base_url", "http://127.0.0.1:8000/v1"),
        kwargs.pop("model", "student"),
        transport=httpx.MockTransport(handler),
        **kwargs,
    )


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def test_payload_fields_and_parsed_completion():
    rec = Recorder(httpx.Response(200, json=ok_body("a cat", "length", [-0.5, -1.0], token_ids=[7, 8])))
    policy = make(rec)
    out = policy.generate([CONV], SamplingParams(temperature=0.3, top_p=0.9, max_new_tokens=32, seed=5))
    (req,) = rec.requests
    assert req.method == "POST" and str(req.url) == "http://127.0.0.1:8000/v1/chat/completions"
    assert rec.payloads[0] == {
        "model": "student",
        "messages": CONV,
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 32,
        "seed": 5,
        "n": 1,
        "logprobs": True,
    }
    assert "authorization" not in req.headers
    (c,) = out
    assert (c.text, c.finish_reason, c.token_ids, c.logprobs, c.error) == ("a cat", "length", [7, 8], [-0.5, -1.0], None)
    assert policy.name == "openai:student@http://127.0.0.1:8000/v1"


def test_seed_none_and_logprobs_disabled_are_omitted():
    rec = Recorder(httpx.Response(200, json=ok_body()))
    make(rec, logprobs=False).generate([CONV], SamplingParams(seed=None))
    assert "seed" not in rec.payloads[0] and "logprobs" not in rec.payloads[0]


def test_missing_logprobs_and_token_ids_and_odd_finish_reason():
    rec = Recorder(httpx.Response(200, json=ok_body("x", finish="tool_calls")))
    (c,) = make(rec).generate([CONV], SamplingParams())
    assert (c.text, c.finish_reason, c.token_ids, c.logprobs) == ("x", "stop", [], None)


def test_api_key_header_from_argument_and_env(monkeypatch):
    rec = Recorder(httpx.Response(200, json=ok_body()))
    make(rec, api_key="sk-arg").generate([CONV], SamplingParams())
    assert rec.requests[-1].headers["authorization"] == "Bearer sk-arg"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    make(rec).generate([CONV], SamplingParams())
    assert rec.requests[-1].headers["authorization"] == "Bearer sk-env"


@pytest.mark.parametrize(
    "given, expected",
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
        ("http://gw.local/openai/v1", "http://gw.local/openai/v1"),
    ],
)
def test_base_url_normalisation(given, expected):
    rec = Recorder(httpx.Response(200, json=ok_body()))
    policy = make(rec, base_url=given)
    policy.generate([CONV], SamplingParams())
    assert policy.base_url == expected
    assert str(rec.requests[0].url) == f"{expected}/chat/completions"


def test_connection_errors_and_5xx_are_retried_then_succeed():
    rec = Recorder(
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.Response(503, text="busy"),
        httpx.Response(200, json=ok_body("finally")),
    )
    (c,) = make(rec, max_retries=3).generate([CONV], SamplingParams())
    assert c.text == "finally" and len(rec.requests) == 4


def test_429_is_retried():
    rec = Recorder(httpx.Response(429, text="slow down"), httpx.Response(200, json=ok_body("ok")))
    (c,) = make(rec).generate([CONV], SamplingParams())
    assert c.text == "ok" and len(rec.requests) == 2


def test_backoff_is_exponential(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    rec = Recorder(httpx.Response(500))
    (c,) = make(rec, max_retries=3, backoff=0.5).generate([CONV], SamplingParams())
    assert c.finish_reason == "error" and sleeps == [0.5, 1.0, 2.0]


def test_400_is_not_retried():
    rec = Recorder(httpx.Response(400, json={"error": {"message": "bad temperature"}}))
    (c,) = make(rec).generate([CONV], SamplingParams())
    assert len(rec.requests) == 1
    assert c.finish_reason == "error" and c.text == "" and "HTTP 400" in c.error and "bad temperature" in c.error


def test_exhausted_retries_give_error_completion_naming_url():
    rec = Recorder(httpx.ConnectError("connection refused"))
    (c,) = make(rec, max_retries=2).generate([CONV], SamplingParams())
    assert len(rec.requests) == 3
    assert c.finish_reason == "error" and c.text == ""
    assert "http://127.0.0.1:8000/v1/chat/completions" in c.error
    assert "ConnectError" in c.error and "3 attempts" in c.error


def test_exhausted_5xx_names_status():
    rec = Recorder(httpx.Response(502, text="bad gateway"))
    (c,) = make(rec, max_retries=1).generate([CONV], SamplingParams())
    assert len(rec.requests) == 2 and "HTTP 502" in c.error and "/v1/chat/completions" in c.error


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>not json</html>"),
        httpx.Response(200, json={"object": "chat.completion"}),
        httpx.Response(200, json={"choices": []}),
        httpx.Response(200, json=["not", "an", "object"]),
        httpx.Response(200, json={"choices": [{"finish_reason": "stop"}]}),
    ],
)
def test_malformed_bodies_are_error_completions(response):
    (c,) = make(Recorder(response)).generate([CONV], SamplingParams())
    assert c.finish_reason == "error" and c.text == "" and c.error


def test_logprobs_rejected_falls_back_once_and_is_remembered():
    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("logprobs"):
            return httpx.Response(400, json={"error": {"message": "logprobs is not supported"}})
        return httpx.Response(200, json=ok_body("fine"))

    rec = Recorder(handler)
    policy = make(rec)
    (c,) = policy.generate([CONV], SamplingParams())
    assert c.text == "fine" and c.logprobs is None
    assert [p.get("logprobs") for p in rec.payloads] == [True, None]
    policy.generate([CONV], SamplingParams())
    assert len(rec.requests) == 3 and "logprobs" not in rec.payloads[-1]


def test_concurrency_keeps_output_order():
    in_flight = 0
    peak = 0
    guard = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        with guard:
            in_flight += 1
            peak = max(peak, in_flight)
        text = json.loads(request.content)["messages"][-1]["content"]
        time.sleep(0.05 if text.endswith("0") else 0.01)  # the first finishes last
        with guard:
            in_flight -= 1
        return httpx.Response(200, json=ok_body(f"echo {text}"))

    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(12)]
    out = make(handler, max_concurrency=4).generate(convs, SamplingParams())
    assert [c.text for c in out] == [f"echo q{i}" for i in range(12)]
    assert 1 < peak <= 4


def test_one_failure_does_not_spoil_the_batch():
    def handler(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][-1]["content"]
        return httpx.Response(400, text="no") if text == "bad" else httpx.Response(200, json=ok_body(text))

    convs = [[{"role": "user", "content": t}] for t in ("a", "bad", "c")]
    out = make(handler).generate(convs, SamplingParams())
    assert [c.finish_reason for c in out] == ["stop", "error", "stop"]
    assert [c.text for c in out] == ["a", "", "c"]


def test_as_agent_policy_raises_on_error_completion():
    agent = AsAgentPolicy(make(Recorder(httpx.Response(500))))
    with pytest.raises(RuntimeError, match="HTTP 500"):
        agent.complete(CONV, seed=1)


def test_as_agent_policy_passes_seed_and_returns_text():
    rec = Recorder(httpx.Response(200, json=ok_body("<answer>x</answer>")))
    assert AsAgentPolicy(make(rec)).complete(CONV, seed=9) == "<answer>x</answer>"
    assert rec.payloads[0]["seed"] == 9


def test_a_megabyte_completion_is_cut_and_recorded_as_too_long():
    handler = Recorder(httpx.Response(200, json=ok_body("x" * 1_000_000)))
    pol = make(handler)
    out = pol.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=64))[0]
    assert len(out.text) == 4096 and out.finish_reason == "length" and "1000000 characters cut at 4096" in out.error


def test_the_command_line_bounds_every_server_request(monkeypatch):
    """`genevolve --timeout S --retries N <command>`: a server that never answers costs at most (1 + N) x S."""
    from typer.testing import CliRunner

    from genevolve.cli import app
    from genevolve.cli.common import CLIENT, make_policy

    res = CliRunner().invoke(app, ["--timeout", "2.5", "--retries", "0", "world", "--help"])
    assert res.exit_code == 0 and CLIENT == {"timeout": 2.5, "retries": 0}
    pol = make_policy(None, "http://127.0.0.1:9/v1", "none", [], None)
    assert pol.policy.max_retries == 0 and pol.policy._http.timeout.read == 2.5
    CLIENT.update(timeout=60.0, retries=2)
