"""Does the lean forward give SmolLM2's trajectories exactly as transformers' forward does?

Rolls out ``--requests`` bench requests (whole tool episodes, one batch) twice through the project's engine,
once with the lean forward and once with ``GENEVOLVE_LEAN=0``, in the given dtype, and compares every
trajectory's token ids and sampled log-probabilities with ``==``. Prints and saves the share identical and
the first difference of any that is not.

    .venv/bin/python benchmarks/lean_same.py --dtype float32
    .venv/bin/python benchmarks/lean_same.py --dtype bfloat16
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import sys
from pathlib import Path

from genevolve.agent.loop import Tools
from genevolve.agent.rollout import rollout
from genevolve.policies.base import SamplingParams
from genevolve.policies.resolve import resolve_policy
from genevolve.records.schema import atomic_write_json
from genevolve.world import World


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    world = World()
    reqs, tools = world.split("bench")[: a.requests], Tools.for_world(world)
    pol = resolve_policy(a.policy, dtype=a.dtype)
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=a.max_new_tokens)
    runs = {}
    for lean in ("1", "0"):
        os.environ["GENEVOLVE_LEAN"] = lean
        runs[lean] = rollout(reqs, pol, tools, k=1, params=params, seed=0, max_turns=a.max_turns)
    os.environ.pop("GENEVOLVE_LEAN")
    diffs = []
    for x, y in zip(runs["1"], runs["0"]):
        if x.token_ids != y.token_ids or x.token_logprobs != y.token_logprobs:
            at = next((i for i, (p, q) in enumerate(zip(x.token_ids, y.token_ids)) if p != q), None)
            diffs.append({"trajectory": x.id, "first_token_difference": at})
    n = len(runs["1"])
    res = {"policy": a.policy, "dtype": a.dtype, "trajectories": n, "identical": (n - len(diffs)) / n,
           "tokens": sum(len(t.token_ids) for t in runs["1"]), "differences": diffs,
           "command": "benchmarks/lean_same.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"{a.policy} {a.dtype}: {n - len(diffs)} of {n} trajectories identical (tokens and log-probabilities), "
          f"{res['tokens']} tokens")
    out = a.out or Path(__file__).parent / "results" / f"lean_same_{Path(a.policy).name}_{a.dtype}.json"
    atomic_write_json(out, res)
    print(f"saved {out}")
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
