"""The OpenAI-compatible server over a fake ChatPolicy: shapes, validation, adapters, and a real round trip."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Sequence

import httpx
import pytest
from fastapi.testclient import TestClient

from genevolve.policies.base import Completion, Message, SamplingParams
from genevolve.policies.openai_compat import OpenAIChatPolicy
from genevolve.serving.chat import build_app, run_server
from genevolve.serving.chat_limits import ServeLimits


class FakePolicy:
    """Echoes the last user message; token ids are the characters' code points, so decode_token is chr."""

    name = "fake"

    def __init__(self):
        self.adapters: dict[str, str] = {}
        self.active: str | None = None
        self.calls: list[tuple[str | None, list[Message], SamplingParams]] = []
        self.fail: str | None = None

    def generate(self, conversations: Sequence[list[Message]], params: SamplingParams) -> list[Completion]:
        out = []
        for messages in conversations:
            self.calls.append((self.active, messages, params))
            if self.fail:
                out.append(Completion(text="", finish_reason="error", error=self.fail))
                continue
            last = next(m["content"] for m in reversed(messages) if m["role"] == "user")
            text = f"echo: {last}"
            finish = "stop"
            if len(text) > params.max_new_tokens:
                text, finish = text[: params.max_new_tokens], "length"
            ids = [ord(ch) for ch in text]
            out.append(Completion(text, finish, ids, [-0.25] * len(ids)))
        return out

    def decode_token(self, token_id: int) -> str:
        return chr(token_id)

    def load_adapter(self, path: str, name: str) -> None:
        self.adapters[name] = path

    def set_adapter(self, name: str) -> None:
        assert name in self.adapters
        self.active = name

    def disable_adapter(self) -> None:
        self.active = None

    def unload_adapter(self, name: str) -> None:
        del self.adapters[name]
        if self.active == name:
            self.active = None


@pytest.fixture
def policy() -> FakePolicy:
    return FakePolicy()


@pytest.fixture
def client(policy) -> TestClient:
    return TestClient(build_app(policy, "student"))


def chat(client: TestClient, content: str = "a red fox", **fields) -> httpx.Response:
    body = {"model": "student", "messages": [{"role": "user", "content": content}], **fields}
    return client.post("/v1/chat/completions", json=body)


def test_health_and_models(client):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [("student", "model")]


def test_completion_shape_and_sampling_params(client, policy):
    resp = chat(client, temperature=0.2, top_p=0.8, max_tokens=64, seed=3)
    assert resp.status_code == 200
    body = resp.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == "student"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": "echo: a red fox"}
    assert choice["logprobs"] is None
    assert choice["token_ids"] == [ord(c) for c in "echo: a red fox"]
    assert body["usage"]["completion_tokens"] == len("echo: a red fox")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    _, messages, params = policy.calls[-1]
    assert messages == [{"role": "user", "content": "a red fox"}]
    assert params == SamplingParams(temperature=0.2, top_p=0.8, max_new_tokens=64, seed=3)


def test_defaults_and_length_finish(client, policy):
    body = chat(client, content="x" * 10, max_tokens=4).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "echo"
    chat(client)
    assert policy.calls[-1][2] == SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=256, seed=None)


def test_logprobs_on(client):
    choice = chat(client, content="hi", logprobs=True).json()["choices"][0]
    tokens = choice["logprobs"]["content"]
    assert [t["token"] for t in tokens] == list("echo: hi")
    assert all(t["logprob"] == -0.25 for t in tokens)


def test_logprobs_tokens_empty_without_decode_token(policy):
    class NoDecode(FakePolicy):
        decode_token = None  # type: ignore[assignment]

    body = chat(TestClient(build_app(NoDecode(), "student")), content="hi", logprobs=True).json()
    assert {t["token"] for t in body["choices"][0]["logprobs"]["content"]} == {""}


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"n": 9}, "n must be at most 8"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "content"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_validation_errors_are_400_with_a_message(client, policy, fields, needle):
    body = {"model": "student", "messages": [{"role": "user", "content": "hi"}], **fields}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and needle in error["message"]
    assert policy.calls == []


def test_unknown_model_is_404(client, policy):
    resp = chat(client, model="nope")
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert error["type"] == "not_found" and "nope" in error["message"] and "student" in error["message"]
    assert policy.calls == []


def test_empty_model_means_base(client, policy):
    resp = chat(client, model="")
    assert resp.status_code == 200 and resp.json()["model"] == "student"


def test_adapter_load_select_and_unload(policy, tmp_path):
    client = TestClient(build_app(policy, "student", limits=ServeLimits(adapter_root=tmp_path)))
    (tmp_path / "v1").mkdir()
    missing = client.post("/v1/load_lora_adapter", json={"lora_name": "v1", "lora_path": str(tmp_path / "none")})
    assert missing.status_code == 400 and "no adapter folder" in missing.json()["error"]["message"]

    resp = client.post("/v1/load_lora_adapter", json={"lora_name": "v1", "lora_path": "v1"})
    assert resp.status_code == 200 and resp.json() == {"status": "loaded", "lora_name": "v1"}
    assert policy.adapters == {"v1": str((tmp_path / "v1").resolve())}
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["student", "v1"]
    again = client.post("/v1/load_lora_adapter", json={"lora_name": "v1", "lora_path": str(tmp_path / "v1")})
    assert again.status_code == 400

    assert chat(client, model="v1").json()["model"] == "v1"
    assert policy.calls[-1][0] == "v1"
    chat(client, model="student")
    assert policy.calls[-1][0] is None  # base model: adapter disabled for this request
    chat(client, model="v1")
    assert policy.calls[-1][0] == "v1"

    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "v1"}).json()["status"] == "unloaded"
    assert policy.adapters == {}
    assert chat(client, model="v1").status_code == 404
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "v1"}).status_code == 404


def test_adapter_endpoints_need_policy_support(tmp_path):
    class Plain:
        name = "plain"

        def generate(self, conversations, params):
            return [Completion("x") for _ in conversations]

    client = TestClient(build_app(Plain(), "student", limits=ServeLimits(adapter_root=tmp_path)))
    resp = client.post("/v1/load_lora_adapter", json={"lora_name": "v1", "lora_path": str(tmp_path)})
    assert resp.status_code == 400 and "cannot load" in resp.json()["error"]["message"]
    assert chat(client).json()["choices"][0]["message"]["content"] == "x"
    assert "token_ids" not in chat(client).json()["choices"][0]


def test_error_completion_is_500(client, policy):
    policy.fail = "CUDA out of memory"
    resp = chat(client)
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["type"] == "server_error" and "CUDA out of memory" in error["message"]


def test_run_server_warns_off_loopback(monkeypatch, capsys, policy):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: calls.append(self.config))
    run_server(policy, "student")
    assert calls[-1].host == "127.0.0.1" and "warning" not in capsys.readouterr().err
    run_server(policy, "student", host="0.0.0.0", port=9000, limits=ServeLimits(shutdown_timeout=3))
    assert (calls[-1].host, calls[-1].port, calls[-1].timeout_graceful_shutdown) == ("0.0.0.0", 9000, 3)
    assert "warning" in capsys.readouterr().err


def test_unloading_an_adapter_fails_the_requests_waiting_for_it(policy, tmp_path):
    (tmp_path / "v1").mkdir()
    app = build_app(policy, "student", limits=ServeLimits(adapter_root=tmp_path))
    client, engine = TestClient(app), app.state.server.engine
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "v1", "lora_path": "v1"}).status_code == 200
    result = []
    with engine.lock:  # the model is busy: the request waits
        thread = threading.Thread(target=lambda: result.append(chat(client, model="v1")))
        thread.start()
        while engine.in_flight < 1:
            time.sleep(0.01)
        engine.drop_adapter("v1")
    thread.join(10)
    assert result[0].status_code == 500 and "unloaded" in result[0].json()["error"]["message"]
    assert engine.in_flight == 0 and policy.calls == []


# ---------------------------------------------------------------------------
# end to end: real uvicorn on a free loopback port, driven by OpenAIChatPolicy
# ---------------------------------------------------------------------------


@pytest.fixture
def live_server(policy):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port, and we hold it: no race with other tests
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(policy, "student", adapters=("v2",)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "server did not shut down"


def test_end_to_end_with_openai_policy(live_server, policy):
    with OpenAIChatPolicy(live_server, "student", backoff=0, max_retries=1) as remote:
        convs = [[{"role": "system", "content": "s"}, {"role": "user", "content": f"prompt {i}"}] for i in range(5)]
        out = remote.generate(convs, SamplingParams(temperature=0.0, max_new_tokens=64, seed=1))
        assert [c.text for c in out] == [f"echo: prompt {i}" for i in range(5)]
        assert all(c.finish_reason == "stop" and c.error is None for c in out)
        assert out[0].token_ids == [ord(ch) for ch in "echo: prompt 0"]
        assert out[0].logprobs == [-0.25] * len(out[0].token_ids)
        assert policy.calls[-1][2] == SamplingParams(temperature=0.0, top_p=0.95, max_new_tokens=64, seed=1)

        policy.fail = "boom"
        (bad,) = remote.generate([convs[0]], SamplingParams())
        assert bad.finish_reason == "error" and "HTTP 500" in bad.error and live_server in bad.error
        policy.fail = None

    policy.adapters["v2"] = "preloaded"  # loaded before serving (the live server was built with adapters=("v2",))
    with OpenAIChatPolicy(f"{live_server}/v1", "v2", backoff=0) as remote:
        (c,) = remote.generate([convs[0]], SamplingParams())
        assert c.text == "echo: prompt 0" and policy.calls[-1][0] == "v2"


# ---------------------------------------------------------------------------
# names, limits, message forms and refusals (the fake policy: no model needed)
# ---------------------------------------------------------------------------


def test_aliases_are_served_and_listed_and_unknown_names_404_with_the_list(policy):
    client = TestClient(build_app(policy, "student", limits=ServeLimits(aliases=("gpt-4o-mini", "default"))))
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["student", "gpt-4o-mini", "default"]
    for name in ("student", "gpt-4o-mini", "default"):
        resp = chat(client, model=name)
        assert resp.status_code == 200 and resp.json()["model"] == name
        assert policy.calls[-1][0] is None  # an alias is the base model, not an adapter
    resp = chat(client, model="gpt-5")
    assert resp.status_code == 404
    message = resp.json()["error"]["message"]
    assert "gpt-5" in message and all(n in message for n in ("student", "gpt-4o-mini", "default"))


def test_body_over_the_cap_is_413_before_it_is_read(policy):
    client = TestClient(build_app(policy, "student"))
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (50 * 2**20) + b'"}]}'
    start = time.monotonic()
    resp = client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "limit" in resp.json()["error"]["message"]
    assert time.monotonic() - start < 5 and policy.calls == []

    small = TestClient(build_app(policy, "student", limits=ServeLimits(max_body_bytes=1000)))
    chunks = iter([b'{"messages": [{"role": "user", "content": "', b"a" * 800, b"a" * 800, b'"}]}'])
    resp = small.post("/v1/chat/completions", content=chunks)  # chunked: no Content-Length to trust
    assert resp.status_code == 413 and policy.calls == []


@pytest.mark.parametrize("fields", [{"tools": [{"type": "function", "function": {"name": "f"}}]},
                                    {"tool_choice": "auto"}])
def test_tool_calling_is_refused_with_a_clear_400(client, policy, fields):
    resp = chat(client, **fields)
    assert resp.status_code == 400 and "tool calling is not supported" in resp.json()["error"]["message"]
    assert policy.calls == []


def test_tool_messages_become_tool_response_user_turns(client, policy):
    messages = [
        {"role": "user", "content": "draw the flag"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "search", "arguments": "{\"queries\": [\"flag\"]}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "the flag is red"},
    ]
    resp = client.post("/v1/chat/completions", json={"model": "student", "messages": messages})
    assert resp.status_code == 200
    sent = policy.calls[-1][1]
    assert sent[1] == {"role": "assistant",
                       "content": '<tool_call>{"name": "search", "arguments": {"queries": ["flag"]}}</tool_call>'}
    assert sent[2] == {"role": "user", "content": "<tool_response>the flag is red</tool_response>"}
    assert resp.json()["choices"][0]["message"]["content"] == "echo: <tool_response>the flag is red</tool_response>"


def test_text_parts_are_joined_and_images_are_refused(client, policy):
    parts = [{"type": "text", "text": "a red"}, {"type": "text", "text": "fox"}]
    assert chat(client, content=parts).json()["choices"][0]["message"]["content"] == "echo: a red\nfox"
    image = [{"type": "text", "text": "this"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]
    resp = chat(client, content=image)
    assert resp.status_code == 400 and "text-only" in resp.json()["error"]["message"]


@pytest.mark.parametrize("text", ["bad \x00 byte", "bell \x07", "esc \x1b[31m", "lone \ud800 surrogate", "c1 \x85"])
def test_control_and_surrogate_characters_are_400(client, policy, text):
    body = json.dumps({"model": "student", "messages": [{"role": "user", "content": text}]})  # \ud800 as an escape
    resp = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "U+" in resp.json()["error"]["message"]
    assert chat(client, content="tab\tnew\nline\r ok").status_code == 200


def test_stop_strings_and_ids_cut_a_finished_reply(client, policy):
    choice = chat(client, content="a red fox", stop=["fox", "red"]).json()["choices"][0]
    assert choice["message"]["content"] == "echo: a " and choice["finish_reason"] == "stop"
    choice = chat(client, content="a red fox", stop="fox").json()["choices"][0]
    assert choice["message"]["content"] == "echo: a red "
    choice = chat(client, content="a red fox", stop_token_ids=[ord("x")]).json()["choices"][0]
    assert choice["message"]["content"] == "echo: a red fo" and choice["finish_reason"] == "stop"


def test_max_tokens_is_bounded_even_without_a_known_context(client, policy):
    resp = chat(client, max_tokens=10**9)
    assert resp.status_code == 400 and "at most 32768" in resp.json()["error"]["message"]
    assert policy.calls == []


def test_n_choices_and_their_bound(client, policy):
    body = chat(client, n=3).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert chat(client, n=8).status_code == 200
    assert chat(client, n=9).status_code == 400


def test_streaming_sends_openai_chunks_and_done(client):
    resp = chat(client, content="hi", stream=True, stream_options={"include_usage": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in resp.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "echo: hi"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len("echo: hi")


@pytest.mark.parametrize("fields, needle", [({"top_logprobs": 21, "logprobs": True}, "at most 20"),
                                            ({"top_logprobs": 2}, "needs logprobs")])
def test_top_logprobs_bounds(client, fields, needle):
    resp = chat(client, **fields)
    assert resp.status_code == 400 and needle in resp.json()["error"]["message"]


def test_adapter_loading_is_disabled_without_a_root(client, policy, tmp_path):
    resp = client.post("/v1/load_lora_adapter", json={"lora_name": "v1", "lora_path": str(tmp_path)})
    assert resp.status_code == 403 and "--adapter-root" in resp.json()["error"]["message"]
    assert policy.adapters == {}


def test_adapter_paths_outside_the_root_are_403_alike(policy, tmp_path):
    root, outside = tmp_path / "adapters", tmp_path / "secret"
    (root / "ok").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    client = TestClient(build_app(policy, "student", limits=ServeLimits(adapter_root=root)))
    messages = set()
    for path in ["/etc", "/etc/passwd", "/no/such/dir", "../secret", "../../../../etc", "escape", str(root / "escape"),
                 "ok/../../secret", str(outside), str(tmp_path / "missing"), str(root), ".", "a\x00b"]:
        resp = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert resp.status_code == 403, path
        messages.add(resp.json()["error"]["message"])
    assert len(messages) == 1 and policy.adapters == {}
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "ok"}).status_code == 200


def test_a_full_queue_answers_429(policy):
    gate = threading.Event()
    slow = FakePolicy()
    original = slow.generate
    slow.generate = lambda convs, params: (gate.wait(10), original(convs, params))[1]
    app = build_app(slow, "student", limits=ServeLimits(max_queue=2))
    client, engine = TestClient(app), app.state.server.engine
    results = []
    threads = [threading.Thread(target=lambda: results.append(chat(client).status_code)) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while engine.in_flight < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    resp = chat(client)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert "busy" in resp.json()["error"]["message"]
    gate.set()
    for t in threads:
        t.join(10)
    assert results == [200, 200] and engine.in_flight == 0
    assert chat(client).status_code == 200


def test_incremental_text_equals_a_whole_decode_with_context_sensitive_tokenizers():
    from genevolve.serving.chat_engine import Job

    vocab = {1: "▁a", 2: "▁red", 3: "▁fox", 4: "es", 5: "\xe2", 6: "\x82\xac"}  # 5 + 6: the bytes of "€"

    def decode(ids):  # like SentencePiece: a word's space is dropped at the start of a text
        raw = "".join(vocab[i] for i in ids).encode("latin-1").decode("utf-8", "replace")
        return raw.replace("▁", " ").lstrip(" ")

    vocab = {k: v.encode("utf-8").decode("latin-1") if "▁" in v else v for k, v in vocab.items()}
    choice = Job([{"role": "user", "content": "x"}], SamplingParams(max_new_tokens=10)).choices[0]
    for token in (1, 2, 3, 4, 5, 6):
        assert choice.add(token, -0.1, [], decode, set()) is False
    assert choice.text == decode([1, 2, 3, 4, 5, 6]) == "a red foxes€"
