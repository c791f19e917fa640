"""Rollout throughput against a peer: our continuous-batching engine vs transformers' own continuous batching.

Both sides get the same model, the same chat-templated prompt token ids (rendered and encoded the way
:class:`~genevolve.policies.local.LocalPolicy` does it; checked identical on the first turn), the same
sampling (temperature, top-p 0.95, no top-k), the same per-turn token budget and the same stop tokens.

- ``single-turn``: the first assistant turn of every request x K samples, no tools.
- ``multi-turn``: whole tool episodes through the project's own :func:`~genevolve.agent.rollout.rollout`
  (same :class:`~genevolve.agent.loop.Episode` code, same tools). Ours keeps each conversation's KV cache
  from turn to turn; the peer is asked once per turn for every conversation still running
  (``ContinuousBatchingManager.add_requests``, the call ``generate_batch`` makes) and is given the
  whole re-rendered history each time (its own prefix sharing may reuse cached blocks).

The peer's manager is built, warmed up and started outside the timed region (building it allocates
its static buffers, ~15 s on CPU); one untimed warm-up run precedes the timings of each side. The
arms alternate, median of ``--repeats``. Trajectories differ in content (different samplers), so
generated tokens/s is the fair figure; tokens and turns are reported too.

    .venv/bin/python benchmarks/peers_rollout.py [--policy tiny] [--requests 8] [-k 4] [--repeats 3]
    GENEVOLVE_DTYPE=bfloat16 .venv/bin/python benchmarks/peers_rollout.py --policy smollm2 --requests 4 -k 2 --max-new-tokens 128 --max-turns 4
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from genevolve.agent.loop import Episode, Tools
from genevolve.agent.rollout import rollout
from genevolve.policies.base import Completion, SamplingParams, TokenStream
from genevolve.policies.resolve import resolve_policy
from genevolve.records.schema import atomic_write_json
from genevolve.world import World


def source_state() -> dict:
    """The checkout's commit and whether the library had uncommitted changes when the figures were taken."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "genevolve"], cwd=root, capture_output=True, text=True)
        return {"git_commit": head or None, "library_uncommitted_changes": bool(dirty.stdout.strip())}
    except OSError:
        return {"git_commit": None, "library_uncommitted_changes": None}


def machine_facts(policy) -> dict:
    import peft
    import transformers

    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": str(policy.device),
            "dtype": str(policy.model.dtype).replace("torch.", ""), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "GENEVOLVE_DTYPE": os.environ.get("GENEVOLVE_DTYPE"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), **source_state()}


def prompt_ids(policy, messages) -> list[int]:
    """The token ids LocalPolicy feeds for ``messages`` (its render + encode path, public calls only)."""
    tok = policy.tokenizer
    text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


class HFContinuousBatching:
    """A rollout policy over transformers' continuous batching: one batch of requests per turn, full history each time.

    ``run_conversations`` has the signature of :class:`~genevolve.policies.base.RolloutPolicy`, so the
    project's rollout code (episodes, tools, message building) drives it exactly as it drives ours.
    """

    needs_exclusive_device = True

    def __init__(self, policy, params: SamplingParams, max_context: int, n_requests: int):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.p, self.name = policy, policy.name + "-hf-cb"
        tok = policy.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else sorted(policy.stop_ids)[0]
        self.gc = GenerationConfig(do_sample=params.temperature > 0, temperature=params.temperature or None,
                                   top_p=params.top_p, top_k=None, max_new_tokens=params.max_new_tokens,
                                   eos_token_id=sorted(policy.stop_ids), pad_token_id=pad)
        # Sized for the workload (the default sizes its buffers from free memory: slow to build on CPU).
        blocks = n_requests * (-(-(max_context + params.max_new_tokens) // 256)) + 8
        self.cb_config = ContinuousBatchingConfig(num_blocks=blocks)
        self.manager = policy.model.init_continuous_batching(generation_config=self.gc,
                                                             continuous_batching_config=self.cb_config)
        self.manager.warmup()

    def start(self) -> None:
        self.manager.start()

    def stop(self) -> None:
        self.manager.stop(block=True, keep_for_next_session=True)

    def close(self) -> None:
        self.manager.stop(block=True)
        self.manager.destroy()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> list[tuple[list[int], bool]]:
        """One turn for each prompt: (sampled token ids including the stop token, ended on a stop token)."""
        ids = self.manager.add_requests(prompts, max_new_tokens=self.gc.max_new_tokens)
        out: dict[str, list[int]] = {}
        while len(out) < len(ids):
            r = self.manager.get_result(timeout=60)
            if r is None:
                raise RuntimeError("transformers continuous batching returned no result within 60 s")
            if r.error:
                raise RuntimeError(f"transformers continuous batching: {r.error}")
            out[r.request_id] = list(r.generated_tokens)
        return [(out[i], bool(out[i]) and out[i][-1] in self.p.stop_ids) for i in ids]

    def run_conversations(self, n, next_messages, on_turn, params, max_batch=64, seeds=None, on_progress=None):
        tok = self.p.tokenizer
        while True:
            active = [(i, m) for i in range(n) if (m := next_messages(i)) is not None]
            if not active:
                return [TokenStream() for _ in range(n)]
            for (i, _), (toks, stop) in zip(active, self.generate([prompt_ids(self.p, m) for _, m in active])):
                body = toks[:-1] if stop else toks
                on_turn(i, Completion(text=tok.decode(body, skip_special_tokens=False),
                                      finish_reason="stop" if stop else "length", token_ids=toks))
            if on_progress:
                on_progress()


class Counting:
    """Wraps a rollout policy and counts the tokens and turns it writes (the same count for both sides)."""

    def __init__(self, inner):
        self.inner, self.name, self.needs_exclusive_device = inner, inner.name, True
        self.tokens = self.turns = 0

    def run_conversations(self, n, next_messages, on_turn, params, **kw):
        def counted(i, comp):
            self.tokens += len(comp.token_ids)
            self.turns += 1
            on_turn(i, comp)

        return self.inner.run_conversations(n, next_messages, counted, params, **kw)


def first_turns(policy, episodes, params) -> None:
    """Single-turn mode: each episode's first assistant turn, one call for all, no tools."""
    asked = [False] * len(episodes)

    def next_messages(i):
        if asked[i]:
            return None
        asked[i] = True
        return episodes[i].messages

    policy.run_conversations(len(episodes), next_messages, lambda i, c: None, params,
                             seeds=[e.traj.seed for e in episodes])


def check_prompts(policy, episodes) -> None:
    """The peer's first-turn prompts are byte-identical to the tokens our engine prefilled."""
    for e in episodes[:2]:
        st = TokenStream()
        policy.extend_stream(st, e.messages)
        if st.ids != prompt_ids(policy, e.messages):
            raise AssertionError("the peer's prompt ids differ from the ones our engine feeds")


def _on_cuda(side) -> bool:
    device = getattr(getattr(side, "p", side), "device", None)
    return isinstance(device, torch.device) and device.type == "cuda"


def run_arm(mode, side, reqs, tools, args, params, seed) -> dict:
    """One timed run of one side in one mode: seconds, tokens, turns, trajectories, and on a GPU the peak
    memory allocated during the run (what was resident when it started included)."""
    pol = Counting(side)
    peer = isinstance(side, HFContinuousBatching)
    cuda = _on_cuda(side)
    if peer:
        side.start()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if mode == "single-turn":
        eps = [Episode(r, tools, seed=seed * 1000 + i, max_turns=args.max_turns) for r in reqs for i in range(args.k)]
        first_turns(pol, eps, params)
    else:
        rollout(reqs, pol, tools, k=args.k, params=params, seed=seed, max_turns=args.max_turns)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    if peer:
        side.stop()
    return {"seconds": seconds, "generated_tokens": pol.tokens, "turns": pol.turns,
            "trajectories": len(reqs) * args.k, "peak_gib": peak}


def summarise(runs: list[dict]) -> dict:
    med = statistics.median(r["seconds"] for r in runs)
    tps = statistics.median(r["generated_tokens"] / r["seconds"] for r in runs)
    trs = statistics.median(r["trajectories"] / r["seconds"] for r in runs)
    return {"median_seconds": med, "tokens_per_s": tps, "trajectories_per_s": trs,
            "generated_tokens": [r["generated_tokens"] for r in runs], "turns": [r["turns"] for r in runs],
            "seconds": [r["seconds"] for r in runs],
            "peak_gib": max((r["peak_gib"] for r in runs if r.get("peak_gib") is not None), default=None)}


def measure(args, policy=None) -> dict:
    """Both sides in each mode of ``args.mode``; ``policy`` (a loaded LocalPolicy) replaces ``args.policy`` when given."""
    world = World()
    tools = Tools.for_world(world)
    reqs = world.split("bench")[: args.requests]
    policy = policy if policy is not None else resolve_policy(args.policy)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    tools.text_search.search(["warm up"], 1)  # load the embedder outside the timings
    eps = [Episode(r, tools) for r in reqs]
    check_prompts(policy, eps)
    peer = HFContinuousBatching(policy, params, args.max_context, len(reqs) * args.k)
    sides = {"ours": policy, "transformers_cb": peer}
    modes = [m for m in ("single-turn", "multi-turn") if args.mode in (m, "both")]
    result = {"modes": {}}
    try:
        for mode in modes:
            for side in sides.values():  # untimed warm-up, one request
                run_arm(mode, side, reqs[:1], tools, argparse.Namespace(**{**vars(args), "k": 1}), params, 99)
            runs = {name: [] for name in sides}
            for rep in range(args.repeats):  # alternating, so drift hits both sides alike
                for name, side in sides.items():
                    runs[name].append(run_arm(mode, side, reqs, tools, args, params, args.seed))
            res = {name: summarise(r) for name, r in runs.items()}
            res["ratio_tokens_per_s"] = res["ours"]["tokens_per_s"] / res["transformers_cb"]["tokens_per_s"]
            res["ratio_trajectories_per_s"] = (res["ours"]["trajectories_per_s"]
                                               / res["transformers_cb"]["trajectories_per_s"])
            res["target_ratio_tokens_per_s"] = 1.0 if mode == "single-turn" else 1.5
            result["modes"][mode] = res
    finally:
        peer.close()
    result["machine"] = machine_facts(policy)
    result["peer_config"] = {"num_blocks": peer.cb_config.num_blocks, "page_size": peer.cb_config.page_size,
                             "attn_implementation": policy.model.config._attn_implementation}
    return result


NOTE = ("Both sides sample with their own samplers, so trajectories differ in content and length: generated tokens/s "
        "(sampled tokens including each turn's stop token, per second of wall time) is the fair figure; "
        "trajectories/s also depends on how long each side's episodes ran (see turns and generated_tokens). "
        "Tool calls and message building run inside the timed region on both sides (the same code).")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--max-turns", type=int, default=11)
    ap.add_argument("--max-context", type=int, default=8192, help="longest conversation the peer's cache is sized for")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", choices=("single-turn", "multi-turn", "both"), default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = measure(args)
    res = {"command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["peers_rollout.py", *argv]),
           "settings": vars(args), "note": NOTE, **res}
    print(f"{'mode':12s} {'side':16s} {'s (median)':>10s} {'tok/s':>9s} {'traj/s':>8s}  tokens / turns per run")
    for mode, r in res["modes"].items():
        for side in ("ours", "transformers_cb"):
            s = r[side]
            print(f"{mode:12s} {side:16s} {s['median_seconds']:10.2f} {s['tokens_per_s']:9.1f} "
                  f"{s['trajectories_per_s']:8.3f}  {s['generated_tokens']} / {s['turns']}")
        print(f"{mode:12s} ours/peer: {r['ratio_tokens_per_s']:.2f}x tokens/s, {r['ratio_trajectories_per_s']:.2f}x "
              f"trajectories/s (target {r['target_ratio_tokens_per_s']:.1f}x tokens/s)")
    out = args.out or str(Path(__file__).parent / "results" / f"peers_rollout_{Path(args.policy).name}.json")
    atomic_write_json(out, res)
    print(f"saved {out}")
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
