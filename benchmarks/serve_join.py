"""Does a short request wait for a long generation? ``genevolve serve`` with requests joining a running batch.

The server (:func:`genevolve.serving.chat.build_app` over ``--policy``, default the shipped tiny policy)
runs in this process under uvicorn on a free loopback port. One long streamed generation is sent
(``--long-tokens``, default 700; greedy on a prompt the tiny policy answers by repeating itself, so it
runs to its budget); once it has streamed ``--head`` tokens, ``--short`` requests (default 2) of
``--short-tokens`` tokens each (default 4), with the same sampling, are sent at once. They share the
long one's temperature and top-p, so each joins the running batch at the next decoding step instead of
waiting for it to end. Target: each short request answers within 2 s on 2 idle cores.

Prints and saves (``--out``, default benchmarks/results/serve_join_<policy>.json) each short request's
latency and how many tokens the long one had streamed when it answered, next to the long one's
duration, with the machine's cores and load average (timings taken on a busy machine mean little).

    .venv/bin/python benchmarks/serve_join.py [--policy tiny] [--long-tokens 700] [--short 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 2.0
LONG_PROMPT = "go on"  # the tiny policy repeats itself greedily here: the generation runs to its budget
SHORT_PROMPTS = ["draw a red fox", "draw a flag with three stars", "draw two cats", "draw a crest"]


@contextlib.contextmanager
def serve_in_thread(app):
    """Run ``app`` with uvicorn on 127.0.0.1:<free port> in a thread; yield its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def body(content: str, max_tokens: int, stream: bool) -> dict:
    out = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0, "seed": 0}
    if stream:
        out |= {"stream": True, "stream_options": {"include_usage": True}, "logprobs": True}  # a logprob per token
    return out


async def long_generation(client: httpx.AsyncClient, tokens: int, head: int, started: asyncio.Event,
                          streamed: list[int]) -> dict:
    """Stream the long request; ``streamed[0]`` counts its tokens so far; ``started`` is set after ``head`` of them."""
    t0 = time.perf_counter()
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body(LONG_PROMPT, tokens, True)) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                streamed[0] += len((choice.get("logprobs") or {}).get("content") or [])
            if streamed[0] >= head:
                started.set()
    started.set()
    return {"max_tokens": tokens, "completion_tokens": (usage or {}).get("completion_tokens"),
            "seconds": round(time.perf_counter() - t0, 3)}


async def short_request(client: httpx.AsyncClient, i: int, tokens: int, streamed: list[int]) -> dict:
    t0 = time.perf_counter()
    resp = await client.post("/v1/chat/completions", json=body(SHORT_PROMPTS[i % len(SHORT_PROMPTS)], tokens, False))
    resp.raise_for_status()
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "completion_tokens": resp.json()["usage"]["completion_tokens"],
            "long_tokens_streamed_at_answer": streamed[0], "within_target": seconds <= TARGET_S}


async def scenario(url: str, long_tokens: int, head: int, shorts: int, short_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await short_request(client, 0, short_tokens, [0])  # warm-up: first-call costs out of the numbers
        started, streamed = asyncio.Event(), [0]
        long_task = asyncio.create_task(long_generation(client, long_tokens, head, started, streamed))
        await started.wait()
        short = await asyncio.gather(*(short_request(client, i, short_tokens, streamed) for i in range(shorts)))
        return {"long": await long_task, "short": list(short)}


def run(policy: str = "tiny", long_tokens: int = 700, head: int = 8, shorts: int = 2, short_tokens: int = 4,
        max_batch: int = 16) -> dict:
    """The whole measurement; the policy is loaded here, the server serves it in this process."""
    import torch

    from genevolve.policies.resolve import resolve_policy
    from genevolve.serving.chat import build_app
    from genevolve.serving.chat_limits import ServeLimits

    app = build_app(resolve_policy(policy), "student", limits=ServeLimits(max_batch=max_batch))
    with serve_in_thread(app) as url:
        res = asyncio.run(scenario(url, long_tokens, head, shorts, short_tokens))
    res["batches"] = list(app.state.server.engine.batches)  # jobs per batch run (the warm-up is the first)
    res["all_within_target"] = all(s["within_target"] for s in res["short"])
    res["setup"] = {"policy": policy, "long_tokens": long_tokens, "head": head, "shorts": shorts,
                    "short_tokens": short_tokens, "max_batch": max_batch, "target_s": TARGET_S,
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average": os.getloadavg(), "machine": platform.platform(),
                    "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    return res


def main() -> int:
    from genevolve.records.schema import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny", help="tiny, smollm2 or a model folder")
    ap.add_argument("--long-tokens", type=int, default=700)
    ap.add_argument("--head", type=int, default=8, help="tokens the long request streams before the short ones")
    ap.add_argument("--short", type=int, default=2, help="short requests, sent together")
    ap.add_argument("--short-tokens", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--out", default=str(RESULTS / "serve_join_{policy}.json"))
    a = ap.parse_args()
    res = run(a.policy, a.long_tokens, a.head, a.short, a.short_tokens, a.max_batch)
    long = res["long"]
    print(f"long: {long['completion_tokens']} tokens in {long['seconds']:.2f} s")
    for i, s in enumerate(res["short"]):
        print(f"short {i}: {s['completion_tokens']} tokens in {s['seconds']:.3f} s (target {TARGET_S} s), "
              f"the long one at {s['long_tokens_streamed_at_answer']} tokens")
    print(f"load average {res['setup']['load_average']} on {res['setup']['cpu_count']} cores")
    out = Path(a.out.format(policy=Path(a.policy).name))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, res)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
