"""Malformed bodies never crash the server: any bytes, any JSON, any near-valid request gets a 2xx or a 4xx."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genevolve.policies.base import Completion
from genevolve.serving.chat import build_app
from genevolve.serving.chat_limits import ServeLimits
from test_serve import FakePolicy

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
valid_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]),
     "content": st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=30)},
    optional={"tool_call_id": st.text(max_size=5), "name": st.text(max_size=5)},
)
valid_fields = st.fixed_dictionaries(
    {"messages": st.lists(valid_message, min_size=1, max_size=3)},
    optional={"model": st.sampled_from(["student", "", "other"]), "n": st.integers(1, 9),
              "max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
              "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
              "stop_token_ids": st.lists(st.integers(0, 600), max_size=3), "logprobs": st.booleans(),
              "top_logprobs": st.integers(0, 21) | st.none(), "stream": st.booleans(), "seed": st.integers(-5, 2**40),
              "stream_options": st.just({"include_usage": True})},
)
FIELDS = ["messages", "model", "n", "max_tokens", "temperature", "top_p", "stop", "stop_token_ids", "logprobs",
          "top_logprobs", "stream", "seed", "tools", "tool_choice", "stream_options", "max_completion_tokens"]
# A valid request with up to two fields replaced by anything (or one message's fields by anything).
mutation = st.tuples(st.sampled_from(FIELDS), json_values) | st.tuples(st.just("message"), st.dictionaries(
    st.sampled_from(["role", "content", "tool_calls", "tool_call_id"]), json_values, max_size=3))


@st.composite
def near_valid(draw):
    body = draw(valid_fields)
    for key, value in draw(st.lists(mutation, max_size=2)):
        if key == "message":
            if isinstance(body["messages"], list) and body["messages"] and isinstance(body["messages"][0], dict):
                body["messages"][0].update(value)
        else:
            body[key] = value
    return body


class AnyMessages(FakePolicy):
    """Answers any conversation (the echo policy needs a user message): failures seen are the server's."""

    def generate(self, conversations, params):
        return [Completion(f"ok {len(m)}", "stop", [1, 2], [-0.5, -0.5]) for m in conversations]


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(build_app(AnyMessages(), "student", limits=ServeLimits(max_body_bytes=20_000)),
                      raise_server_exceptions=True)


def _ok(resp) -> None:
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        assert isinstance(resp.json()["error"]["message"], str)


@FUZZ
@given(body=st.binary(max_size=300))
def test_any_bytes(client, body):
    _ok(client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}))


@FUZZ
@given(body=json_values)
def test_any_json(client, body):
    for path in ("/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        _ok(client.post(path, content=json.dumps(body), headers={"content-type": "application/json"}))


@settings(FUZZ, max_examples=300)
@given(body=near_valid())
def test_near_valid_requests(client, body):
    _ok(client.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"}))


def test_deep_nesting_is_400(client):
    """JSON nested past the parser's depth is a 400 that says so (under the body cap, which would answer 413 first)."""
    body = '{"messages": ' + "[" * 5000 + "]" * 5000 + "}"
    assert len(body) < 20_000
    resp = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not JSON" in resp.json()["error"]["message"], resp.text


@pytest.fixture(scope="module")
def local_client(tiny_folder) -> TestClient:
    from genevolve.policies.local import LocalPolicy

    policy = LocalPolicy.load(tiny_folder, device="cpu", dtype="float32")
    return TestClient(build_app(policy, "student", limits=ServeLimits(max_body_bytes=20_000)))


@settings(FUZZ, max_examples=60)
@given(body=near_valid())
def test_near_valid_requests_through_the_model(local_client, body):
    if isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 4)  # the server's paths, not long generations
    else:
        body["max_tokens"] = 4
    resp = local_client.post("/v1/chat/completions", content=json.dumps(body),
                             headers={"content-type": "application/json"})
    _ok(resp)
