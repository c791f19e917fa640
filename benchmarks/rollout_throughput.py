"""Rollout throughput: the batched multi-turn engine vs each trajectory alone with plain ``generate``.

Same policy, same requests, same sampling settings, one run each. The baseline drives the agent loop
one trajectory at a time and calls ``model.generate`` on the whole conversation every turn (no
batching, no cache reuse across turns). Prints and saves ``benchmarks/results/rollout_throughput.json``.

    .venv/bin/python benchmarks/rollout_throughput.py [--policy tiny] [--requests 8] [-k 4]
    .venv/bin/python benchmarks/rollout_throughput.py --policy smollm2 --requests 2 -k 2 --max-new-tokens 64 --max-turns 3
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import sys
import time
from pathlib import Path

import torch

from genevolve.agent.loop import Tools, run_to_end
from genevolve.policies.base import SamplingParams, TurnByTurnPolicy
from genevolve.policies.resolve import resolve_policy
from genevolve.records.schema import atomic_write_json
from genevolve.agent.rollout import rollout
from genevolve.world import World


class PlainGenerate(TurnByTurnPolicy):
    """One conversation at a time through ``model.generate`` (the baseline)."""

    def __init__(self, policy, params: SamplingParams):
        self.p, self.params, self.name = policy, params, policy.name + "-plain"
        self.generated = 0

    @torch.no_grad()
    def complete(self, messages, seed=0):
        tok, model = self.p.tokenizer, self.p.model
        ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.p.device)
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=self.params.temperature > 0,
                             temperature=self.params.temperature or None, top_p=self.params.top_p,
                             max_new_tokens=self.params.max_new_tokens, eos_token_id=sorted(self.p.stop_ids),
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else sorted(self.p.stop_ids)[0])
        new = out[0, ids.shape[1]:].tolist()
        self.generated += len(new)
        if new and new[-1] in self.p.stop_ids:
            new = new[:-1]
        return tok.decode(new, skip_special_tokens=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--max-turns", type=int, default=11)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    world = World()
    tools = Tools.for_world(world)
    reqs = world.split("bench")[: args.requests]
    policy = resolve_policy(args.policy)
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=args.max_new_tokens)
    tools.text_search.search(["warm up"], 1)  # load the embedder outside the timings
    n = len(reqs) * args.k

    t0 = time.perf_counter()
    trajs = rollout(reqs, policy, tools, k=args.k, params=params, seed=0, max_turns=args.max_turns)
    batched_s = time.perf_counter() - t0
    batched_tokens = sum(sum(t.assistant_mask) for t in trajs)

    plain = PlainGenerate(policy, params)
    t0 = time.perf_counter()
    for r in reqs:
        for i in range(args.k):
            run_to_end(r, plain, tools, seed=i, max_turns=args.max_turns)
    plain_s = time.perf_counter() - t0

    result = {
        "policy": args.policy, "trajectories": n, "requests": len(reqs), "k": args.k, "max_new_tokens": args.max_new_tokens,
        "max_turns": args.max_turns, "threads": torch.get_num_threads(), "device": str(policy.device),
        "batched": {"seconds": batched_s, "trajectories_per_s": n / batched_s, "generated_tokens": batched_tokens,
                    "tokens_per_s": batched_tokens / batched_s},
        "plain_generate": {"seconds": plain_s, "trajectories_per_s": n / plain_s, "generated_tokens": plain.generated,
                           "tokens_per_s": plain.generated / plain_s},
    }
    result["speedup_trajectories_per_s"] = result["batched"]["trajectories_per_s"] / result["plain_generate"]["trajectories_per_s"]
    for k in ("batched", "plain_generate"):
        r = result[k]
        print(f"{k:15s} {r['seconds']:8.1f} s  {r['trajectories_per_s']:7.3f} traj/s  {r['tokens_per_s']:8.1f} generated tok/s")
    print(f"speed-up (trajectories/s): {result['speedup_trajectories_per_s']:.2f}x  ({args.policy}, {n} trajectories)")
    out = args.out or str(Path(__file__).parent / "results" / f"rollout_throughput_{Path(args.policy).name}.json")
    atomic_write_json(out, result)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
