"""Rollout throughput against llama.cpp, the engine a CPU practitioner would pick, on the same SmolLM2 GGUF file.

Ours: the project's engine (:class:`~genevolve.policies.local.LocalPolicy`, continuous batching, each
conversation's KV cache kept from turn to turn, exact log-probabilities of every sampled token) on the GGUF's
weights as transformers loads them (dequantised to ``--dtype``). Peer: ``llama-server`` built from the PyPI sdist
of llama-cpp-python (``benchmarks/build_llamacpp.py``), running the GGUF file as it is (Q4_1 weights, its own
kernels), ``--parallel R`` slots with continuous batching and a unified KV cache.

At each row count R (concurrent sequences): the server is started with R slots and our engine runs with
``max_batch=R``; the workload is ``--per-row`` conversations per row, so rows free up and refill (continuous
batching on both sides). Same for both sides: the chat-templated prompt token ids (rendered and encoded as the
local policy does; the peer receives the ids, not text), temperature, top-p, no top-k, no min-p, no repetition
penalty, the per-turn token budget, stop at the end-of-turn token, and a per-token log-probability (the peer
is asked for ``n_probs: 1``, which returns the sampled token's log-probability).

- ``single-turn``: the first assistant turn of each conversation, no tools.
- ``multi-turn``: whole tool episodes through the project's :func:`~genevolve.agent.rollout.rollout` (the same
  episodes, tools and message building for both). The peer gets the whole re-rendered history each turn, one
  HTTP request per turn, from R client threads, and may reuse its prompt cache (``cache_prompt``).

Reported: generated tokens per second of wall time (sampled tokens including each turn's stop token) for each
side, the ratio ours/peer, medians of ``--repeats`` alternating runs, with the exact command, the settings and
the machine. Timings are meaningful only on an otherwise idle machine.

    .venv/bin/python benchmarks/build_llamacpp.py --dest ~/llamacpp
    .venv/bin/python benchmarks/peers_llamacpp.py --server ~/llamacpp/build/bin/llama-server --rows 1,8,32,64
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers_rollout import Counting, check_prompts, first_turns, machine_facts, prompt_ids, summarise  # noqa: E402

from genevolve.agent.loop import Episode, Tools  # noqa: E402
from genevolve.agent.rollout import rollout  # noqa: E402
from genevolve.policies.base import Completion, SamplingParams, TokenStream  # noqa: E402
from genevolve.policies.resolve import resolve_policy, smollm2_path  # noqa: E402
from genevolve.records.schema import atomic_write_json  # noqa: E402
from genevolve.world import World  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A ``llama-server`` process with ``slots`` parallel slots over one GGUF file."""

    def __init__(self, binary: Path, gguf: Path, slots: int, ctx_per_slot: int, threads: int, log: Path):
        self.port = _free_port()
        self.cmd = [str(binary), "-m", str(gguf), "--parallel", str(slots), "--kv-unified", "--cont-batching",
                    "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads), "--host", "127.0.0.1",
                    "--port", str(self.port), "--no-webui"]
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.close()
        raise RuntimeError(f"llama-server did not become ready in 120 s; see {log}")

    def complete(self, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class LlamaCppPolicy:
    """A rollout policy over llama-server: each conversation's turns are requests from one of ``max_batch`` client
    threads (the server batches the slots continuously); the whole history is sent each turn, as token ids."""

    needs_exclusive_device = True

    def __init__(self, server: LlamaServer, local, eot: int):
        self.server, self.local, self.eot, self.name = server, local, eot, "llama.cpp"
        self.lock = threading.Lock()

    def run_conversations(self, n, next_messages, on_turn, params, max_batch=64, seeds=None, on_progress=None):
        queue = list(range(n))[::-1]

        def worker() -> None:
            while True:
                with self.lock:
                    if not queue:
                        return
                    i = queue.pop()
                turn = 0
                while True:
                    with self.lock:
                        msgs = next_messages(i)
                        ids = prompt_ids(self.local, msgs) if msgs is not None else None
                    if ids is None:
                        break
                    seed = (seeds[i] if seeds and seeds[i] is not None else params.seed or 0) * 1000 + turn
                    out = self.server.complete({
                        "prompt": ids, "n_predict": params.max_new_tokens, "temperature": params.temperature,
                        "top_p": params.top_p, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "seed": seed,
                        "n_probs": 1, "cache_prompt": True, "return_tokens": True})
                    toks = list(out.get("tokens") or [])
                    stop = out.get("stop_type") == "eos"
                    if stop and (not toks or toks[-1] != self.eot):
                        toks.append(self.eot)  # the end-of-turn token the server sampled and did not return
                    with self.lock:
                        on_turn(i, Completion(text=out.get("content", ""), finish_reason="stop" if stop else "length",
                                              token_ids=toks))
                    turn += 1
                if on_progress:
                    with self.lock:
                        on_progress()

        with ThreadPoolExecutor(max_batch) as pool:
            for f in [pool.submit(worker) for _ in range(min(max_batch, n))]:
                f.result()
        return [TokenStream() for _ in range(n)]


class Capped:
    """A rollout policy with its batch capped at ``rows`` rows (ours) or client threads (the peer's)."""

    needs_exclusive_device = True

    def __init__(self, inner, rows: int):
        self.inner, self.rows, self.name = inner, rows, inner.name

    def run_conversations(self, n, next_messages, on_turn, params, **kw):
        kw["max_batch"] = self.rows
        return self.inner.run_conversations(n, next_messages, on_turn, params, **kw)


def run_arm(mode: str, side, reqs, tools, args, params, seed: int, rows: int) -> dict:
    pol = Counting(side)
    t0 = time.perf_counter()
    if mode == "single-turn":
        eps = [Episode(r, tools, seed=seed * 1000 + i, max_turns=args.max_turns) for r in reqs for i in range(args.k)]
        first_turns(pol, eps, params)
    else:
        rollout(reqs, pol, tools, k=args.k, params=params, seed=seed, max_turns=args.max_turns, max_batch=rows)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "generated_tokens": pol.tokens, "turns": pol.turns,
            "trajectories": len(reqs) * args.k, "peak_gib": None}


def measure(args) -> dict:
    world = World()
    tools = Tools.for_world(world)
    tools.text_search.search(["warm up"], 1)  # load the embedder outside the timings
    folder, gguf = smollm2_path()
    local = resolve_policy("smollm2", dtype=args.dtype)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    bench = world.split("bench")
    check_prompts(local, [Episode(r, tools) for r in bench[:2]])
    eot = local.tokenizer.convert_tokens_to_ids("<|im_end|>")
    log = Path(args.log).expanduser() if args.log else Path(os.devnull)
    result = {"rows": {}}
    for rows in [int(x) for x in args.rows.split(",")]:
        n = max(1, rows * args.per_row // args.k)
        reqs = (bench * (1 + n // len(bench)))[:n]
        server = LlamaServer(Path(args.server), folder / gguf, rows, args.ctx_per_slot, args.threads, log)
        try:
            sides = {"ours": Capped(local, rows), "llama_cpp": Capped(LlamaCppPolicy(server, local, eot), rows)}
            res_rows = {}
            for mode in [m for m in ("single-turn", "multi-turn") if args.mode in (m, "both")]:
                for side in sides.values():  # untimed warm-up
                    run_arm(mode, side, reqs[: max(1, min(len(reqs), rows))], tools,
                            argparse.Namespace(**{**vars(args), "k": 1}), params, 99, rows)
                runs = {name: [] for name in sides}
                for _ in range(args.repeats):
                    for name, side in sides.items():
                        runs[name].append(run_arm(mode, side, reqs, tools, args, params, args.seed, rows))
                res = {name: summarise(r) for name, r in runs.items()}
                res["ratio_tokens_per_s"] = res["ours"]["tokens_per_s"] / res["llama_cpp"]["tokens_per_s"]
                res_rows[mode] = res
                print(f"{rows:>4} rows {mode:12s} ours {res['ours']['tokens_per_s']:8.1f} tok/s   llama.cpp "
                      f"{res['llama_cpp']['tokens_per_s']:8.1f} tok/s   ours/peer {res['ratio_tokens_per_s']:.2f}", flush=True)
            result["rows"][str(rows)] = res_rows
            result.setdefault("server_commands", {})[str(rows)] = server.cmd
        finally:
            server.close()
    result["machine"] = machine_facts(local)
    result["gguf"] = str(gguf)
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", required=True, help="the llama-server binary (benchmarks/build_llamacpp.py builds one)")
    ap.add_argument("--rows", default="1,8,32,64", help="concurrent sequences: our max_batch, the server's --parallel")
    ap.add_argument("--per-row", type=int, default=2, help="conversations per row (rows refill as conversations end)")
    ap.add_argument("-k", type=int, default=2, help="trajectories per request")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--ctx-per-slot", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", choices=("single-turn", "multi-turn", "both"), default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default=None, help="append the server's log here (default: discarded)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = measure(args)
    res = {"command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["peers_llamacpp.py", *argv]),
           "settings": vars(args), **res}
    out = Path(args.out) if args.out else RESULTS / f"peers_llamacpp_smollm2_{args.dtype}.json"
    atomic_write_json(out, res)
    print(f"saved {out}")
    return res


if __name__ == "__main__":
    main()
