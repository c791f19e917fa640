"""The server over a real local model (a tiny random Llama): context limits, stops, streaming, n, logprobs,
batching of concurrent requests, and cancellation when a client goes away.

The random model never writes its end-of-turn token greedily (it repeats one token), so a greedy request
runs to its budget: what ends it early is the server.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from _loopback import serve_app
from genevolve.policies.local import LocalPolicy
from genevolve.serving.chat import build_app
from genevolve.serving.chat_limits import ServeLimits


@pytest.fixture(scope="module")
def local(tiny_folder) -> LocalPolicy:
    return LocalPolicy.load(tiny_folder, device="cpu", dtype="float32", name="tiny-random")


@pytest.fixture(scope="module")
def client(local) -> TestClient:
    return TestClient(build_app(local, "tiny-random"))


def ask(client, content="draw a red fox", **fields) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], **fields})


def test_models_report_the_context_length(client):
    (model,) = client.get("/v1/models").json()["data"]
    assert model["id"] == "tiny-random" and model["max_model_len"] == 4096


def test_a_prompt_over_the_context_is_400_in_vllms_words(client, local):
    resp = ask(client, content="red fox " * 3000, max_tokens=10)
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert message.startswith("This model's maximum context length is 4096 tokens. However, you requested ")
    assert "in the messages, 10 in the completion" in message


def test_a_max_tokens_past_the_context_is_400_and_an_omitted_one_is_capped(client):
    resp = ask(client, max_tokens=4096)
    assert resp.status_code == 400 and "maximum context length is 4096" in resp.json()["error"]["message"]
    small = TestClient(build_app(client.app.state.server.policy, "m", limits=ServeLimits(max_model_len=40)))
    body = ask(small, temperature=0).json()  # no max_tokens: the default, capped to what the context leaves
    usage = body["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 40
    assert body["choices"][0]["finish_reason"] == "length"


def test_a_huge_prompt_inside_the_body_cap_is_refused_quickly(client):
    start = time.monotonic()
    resp = ask(client, content="x y " * 400_000)  # 1.6 MB, far more tokens than the context
    assert resp.status_code == 400 and "maximum context length" in resp.json()["error"]["message"]
    assert time.monotonic() - start < 10


def test_stop_strings_and_stop_token_ids_end_generation(client):
    base = ask(client, temperature=1.0, seed=7, max_tokens=30).json()["choices"][0]
    text, ids = base["message"]["content"], base["token_ids"]
    stop = text[10:13]
    cut = ask(client, temperature=1.0, seed=7, max_tokens=30, stop=[stop, "never-there"]).json()["choices"][0]
    assert cut["message"]["content"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
    assert len(cut["token_ids"]) < len(ids)
    by_id = ask(client, temperature=1.0, seed=7, max_tokens=30, stop_token_ids=[ids[5]]).json()["choices"][0]
    assert by_id["token_ids"] == ids[: ids.index(ids[5]) + 1] and by_id["finish_reason"] == "stop"


def test_streamed_text_equals_the_whole_reply_and_holds_back_stops(client):
    whole = ask(client, temperature=1.0, seed=3, max_tokens=25).json()["choices"][0]["message"]["content"]
    stop = whole[12:15]
    resp = ask(client, temperature=1.0, seed=3, max_tokens=25, stream=True, stop=stop)
    lines = [line for line in resp.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == whole[: whole.find(stop)] and stop not in streamed
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_vanishing_temperature_is_greedy_not_a_crash(client):
    greedy = ask(client, temperature=0, max_tokens=5).json()["choices"][0]["token_ids"]
    resp = ask(client, temperature=2e-80, max_tokens=5)  # found by the fuzz test: logits / T overflowed
    assert resp.status_code == 200 and resp.json()["choices"][0]["token_ids"] == greedy


def test_n_choices_differ_and_logprobs_have_openai_shape(client):
    body = ask(client, temperature=1.0, seed=11, max_tokens=8, n=3, logprobs=True, top_logprobs=3).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in body["choices"]}) > 1
    for c in body["choices"]:
        content = c["logprobs"]["content"]
        assert len(content) == len(c["token_ids"])
        for item in content:
            assert set(item) == {"token", "logprob", "bytes", "top_logprobs"} and item["logprob"] <= 0
            assert len(item["top_logprobs"]) == 3
            tops = [t["logprob"] for t in item["top_logprobs"]]
            assert tops == sorted(tops, reverse=True) and item["logprob"] <= tops[0] + 1e-5
    assert body["usage"]["completion_tokens"] == 24


def test_concurrent_requests_share_a_batch_and_match_their_solo_runs(local):
    app = build_app(local, "tiny-random")
    client, engine = TestClient(app), app.state.server.engine
    prompts = [f"draw {w}" for w in ("a fox", "a flag", "two cats", "a crest")]
    solo = {p: ask(client, content=p, temperature=0.7, seed=1, max_tokens=12).json()["choices"][0]["token_ids"]
            for p in prompts}
    engine.batches.clear()
    results: dict[str, list[int]] = {}
    with engine.lock:  # hold the model so that the requests queue up
        threads = [threading.Thread(target=lambda p=p: results.__setitem__(
            p, ask(client, content=p, temperature=0.7, seed=1, max_tokens=12).json()["choices"][0]["token_ids"]))
            for p in prompts]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while engine.in_flight < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(30)
    assert engine.batches == [4]  # all four ran in one continuous batch
    assert results == solo


def _wait_idle(engine, seconds: float) -> float:
    start = time.monotonic()
    while engine.in_flight and time.monotonic() - start < seconds:
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_client_that_leaves_cancels_its_generation(local):
    app = build_app(local, "tiny-random")
    engine = app.state.server.engine
    body = {"messages": [{"role": "user", "content": "go on"}], "temperature": 0, "max_tokens": 3000}
    with serve_app(app) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            next(lines)
        assert _wait_idle(engine, 5) < 5, "a streamed generation went on after its client left"

        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.0)
        assert _wait_idle(engine, 5) < 5, "a generation went on after its client timed out"
        assert time.monotonic() - start < 8  # 3000 tokens would take far longer
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_streamed_choices_carry_their_logprobs(client):
    resp = ask(client, temperature=1.0, seed=5, max_tokens=6, n=2, stream=True, logprobs=True, top_logprobs=2)
    chunks = [json.loads(line[6:]) for line in resp.text.split("\n\n") if line.startswith("data: {")]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        entries = [e for c in mine if c["logprobs"] for e in c["logprobs"]["content"]]
        assert 1 <= len(entries) <= 6 and all(len(e["top_logprobs"]) == 2 for e in entries)
        assert mine[-1]["finish_reason"] in ("stop", "length")
