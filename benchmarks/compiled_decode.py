"""Would a compiled decode step bring SmolLM2 to half its roofline? The lean eager step against torch.compile.

The lean forward (:mod:`genevolve.policies.lean`) runs a SmolLM2 bf16 decode step at about a fifth of this
machine's bound; its products take about half the step and some 40 small eager operations per layer the rest.
This benchmark compiles the whole decode step with TorchInductor (``torch.compile``, dynamic shapes, weights
frozen into the graph so that Inductor packs and fuses them) and times it against the eager lean step, in one
run, with the same prompts and sampling (``benchmarks/roofline.py``'s decode workload):

- the compile time (the first decode call, inside the warm-up run);
- decode tokens/s at each row count: the median of ``--repeats`` runs after the warm-up, prefill excluded;
- each as a fraction of the bound that ``benchmarks/roofline.py`` saved for this policy and dtype.

Compiling with frozen weights is a measurement, not an engine: a frozen graph does not see a LoRA adapter's
weights change between updates, and bf16 numbers change (fused norms reduce in another order). Nothing here is
used by the project. Saves ``benchmarks/results/compiled_decode_<policy>_<dtype>.json`` (or ``--out``).

    .venv/bin/python benchmarks/compiled_decode.py [--rows 8,32] [--dtype bfloat16]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import roofline
from genevolve.policies import continuous, lean
from genevolve.records.schema import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


class CompiledDecoder(lean.LeanDecoder):
    """The lean forward, its one-token steps compiled whole (prefill stays eager)."""

    compiled: dict = {}  # one compiled callable per model, shared by every batch over it

    def __init__(self, model):
        super().__init__(model)
        self.packed = None  # Inductor packs frozen weights itself
        head = self.lm_head
        self.head = lean._linear(None, head.weight, head.bias) if type(head) is torch.nn.Linear else head
        key = id(model)
        if key not in self.compiled:
            self.compiled[key] = torch.compile(lean.LeanDecoder.forward.__wrapped__, dynamic=True)
        self._step = self.compiled[key]

    def forward(self, ids, kbufs, vbufs, write_cols, mask, keep):
        if ids.shape[1] != 1:
            return super().forward(ids, kbufs, vbufs, write_cols, mask, keep)
        with torch.no_grad():
            return self._step(self, ids, kbufs, vbufs, write_cols, mask, keep)


def _shown(path: Path) -> str:
    """``path`` relative to the checkout where it lies inside it (results stay readable on another machine)."""
    try:
        return str(path.resolve().relative_to(RESULTS.parent.parent))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16", choices=list(roofline.DTYPES))
    ap.add_argument("--rows", default="8,32")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bounds", type=Path, help="roofline.py's JSON for this policy and dtype (default: its saved one)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    rows = [int(x) for x in a.rows.split(",")]
    bounds_path = a.bounds or RESULTS / f"roofline_{Path(a.policy).name}_{a.dtype}.json"
    bounds = {b["rows"]: b for b in json.loads(bounds_path.read_text())["decode_bounds"]} if bounds_path.exists() else {}
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    result = {"policy": a.policy, "dtype": a.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "bounds_from": _shown(bounds_path) if bounds else None, "rows": [],
              "command": "benchmarks/compiled_decode.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    real = continuous.lean_decoder
    for r in rows:
        row = {"rows": r, "bound_tokens_per_s": bounds.get(r, {}).get("tokens_per_s")}
        for name, make in (("eager", real), ("compiled", lambda m: CompiledDecoder(m) if lean.supported(m) is None else None)):
            continuous.lean_decoder = make
            try:
                got = roofline.achieved_decode(a.policy, a.dtype, r, a.new_tokens, a.repeats)
            finally:
                continuous.lean_decoder = real
            if row["bound_tokens_per_s"]:
                got["fraction_of_bound"] = got["tokens_per_s"] / row["bound_tokens_per_s"]
            row[name] = got
            print(f"{r:>3} rows {name:>9}: {got['tokens_per_s']:7.1f} tok/s (runs {', '.join(f'{x:.0f}' for x in got['repeats'])}), "
                  f"warm-up {got['warmup_seconds']:.0f} s"
                  + (f", {100 * got['fraction_of_bound']:.0f} % of the bound" if "fraction_of_bound" in got else ""), flush=True)
        row["speedup"] = row["compiled"]["tokens_per_s"] / row["eager"]["tokens_per_s"]
        result["rows"].append(row)
    result["median_speedup"] = statistics.median(r["speedup"] for r in result["rows"])
    out = a.out or RESULTS / f"compiled_decode_{Path(a.policy).name}_{a.dtype}.json"
    atomic_write_json(out, result)
    ratios = ", ".join(f"{r['rows']} rows {r['speedup']:.2f}x" for r in result["rows"])
    print(f"compiled / eager: {ratios}; saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
