"""The bound this machine puts on SmolLM2, and how close the project's decode and update come to it.

Measured here, in one run (on an idle machine: nothing else heavy may run while it times):

- memory bandwidth: a large tensor copy (read + write) and a large reduction (read), best of ``--repeats``;
- matmul throughput in float32 and bfloat16 (AMX where the CPU has it): a large square product (the peak),
  and the shapes of a SmolLM2 decode step at each row count (rows x hidden -> the projections' widths);
- the bound of one decode step at R rows: the larger of (weight bytes + the rows' KV bytes) / bandwidth and
  FLOPs / matmul peak, as tokens per second (R tokens per step);
- the bound of one update token: its FLOPs over the bfloat16 peak. The student's forward and backward cost
  4 x parameters per token (the base weights are frozen: the backward computes activation gradients only, not
  weight gradients; the LoRA's own are negligible), each frozen forward (the reference, the teacher) 2 x;
- with ``--achieved``: the project's own decode steps (the rollout engine, :class:`ContinuousBatch`, each
  ``_decode`` call timed, prefill excluded) at each row count, and one GRPO+VED update
  (:func:`accumulate_gradients`) on SmolLM2, each as a fraction of its bound.

Prints a table and saves ``benchmarks/results/roofline_<policy>_<dtype>.{json,png}`` (or ``--out``).

    .venv/bin/python benchmarks/roofline.py --achieved                       # SmolLM2, bfloat16
    .venv/bin/python benchmarks/roofline.py --dtype float32 --rows 1,8 --achieved
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import functools
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bandwidth(mb: int, repeats: int) -> dict:
    """Bytes per second of a copy (counted as read + write) and of a sum (read), on float32 tensors of ``mb`` MB."""
    n = mb * (1 << 20) // 4
    a, b = torch.rand(n), torch.empty(n)
    t_copy = _best(lambda: b.copy_(a), repeats)
    t_read = _best(lambda: float(a.sum()), repeats)
    return {"bytes": n * 4, "copy_GBps": 2 * n * 4 / t_copy / 1e9, "read_GBps": n * 4 / t_read / 1e9}


def matmul_flops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int, packed: bool = False) -> float:
    """FLOP/s of an (m, k) x (k, n) product; ``packed``: against a weight packed once in oneDNN's layout, as the
    engine's lean forward runs bf16 (:mod:`genevolve.policies.lean`)."""
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    reps = max(1, int(2e8 // (2 * m * k * n)))  # small products repeated so that one timing is ~0.2 GFLOP
    if packed:
        from genevolve.policies.lean import PACK_ROWS

        pw = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
        t = _best(lambda: [torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [None], "") for _ in range(reps)], repeats)
    else:
        t = _best(lambda: [torch.nn.functional.linear(x, w) for _ in range(reps)], repeats)
    return 2 * m * k * n * reps / t


def shape_time(shape: dict, rows: int, rates: list[dict]) -> float:
    """Seconds of one decode step's products at the throughput measured for each of its shapes (weights in cache)."""
    per = {(d["k"], d["n"]): d["flops_per_s"] for d in rates if d["m"] == rows}
    # projections: q, k and v (two of this shape), o, gate and up (two), down, the output layer (once per step)
    times = [shape["layers"], 2 * shape["layers"], shape["layers"], 2 * shape["layers"], shape["layers"], 1]
    t = 0.0
    for (k, n), c in zip(shape["projections"], times):
        t += c * 2 * rows * k * n / per[(k, n)]
    return t


def smollm2_shape(policy: str) -> dict:
    """Layer sizes of the policy's config (no weights loaded)."""
    from transformers import AutoConfig

    from genevolve.policies.resolve import model_source

    folder, gguf = model_source(policy)
    cfg = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    h, inter, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    per_layer = h * heads * dim + 2 * h * kv * dim + heads * dim * h + 3 * h * inter
    embed = vocab * h
    head = 0 if getattr(cfg, "tie_word_embeddings", False) else vocab * h
    return {"hidden": h, "intermediate": inter, "layers": layers, "heads": heads, "kv_heads": kv, "head_dim": dim,
            "vocab": vocab, "tied_head": head == 0, "params": layers * per_layer + embed + head,
            # a decode step multiplies by every layer's weights and the output layer (the embedding when tied)
            "matmul_params": layers * per_layer + vocab * h,
            "projections": [(h, heads * dim), (h, kv * dim), (heads * dim, h), (h, inter), (inter, h), (h, vocab)]}


def decode_bound(shape: dict, rows: int, context: int, bytes_per: int, bw: float, peak: float) -> dict:
    """One decode step at ``rows`` rows of ``context`` tokens each: time by memory and by compute, tokens/s bound."""
    weights = shape["matmul_params"] * bytes_per
    kv = rows * context * shape["layers"] * 2 * shape["kv_heads"] * shape["head_dim"] * bytes_per
    flops = rows * (2 * shape["matmul_params"] + shape["layers"] * 4 * shape["heads"] * shape["head_dim"] * context)
    t_mem, t_comp = (weights + kv) / bw, flops / peak
    return {"rows": rows, "context": context, "bytes": weights + kv, "flops": flops, "t_memory": t_mem,
            "t_compute": t_comp, "bound": "memory" if t_mem >= t_comp else "compute",
            "tokens_per_s": rows / max(t_mem, t_comp)}


@functools.lru_cache(maxsize=None)
def _policy(policy: str, dtype: str):
    """The policy, loaded once for every timing of a run."""
    from genevolve.policies.resolve import resolve_policy

    return resolve_policy(policy, device="cpu", dtype=dtype)


def achieved_decode(policy: str, dtype: str, rows: int, new_tokens: int, repeats: int = 3, lean: bool = True) -> dict:
    """Tokens/s of the engine's decode steps (prefill excluded) with ``rows`` single-turn conversations: the median
    of ``repeats`` runs (after one warm-up run), through the lean forward or (``lean=False``) transformers' own."""
    old = os.environ.get("GENEVOLVE_LEAN")
    os.environ["GENEVOLVE_LEAN"] = "1" if lean else "0"
    try:
        t = time.perf_counter()
        _decode_run(policy, dtype, rows, new_tokens)  # the warm-up (where a compiled step compiles)
        warm = time.perf_counter() - t
        runs = [_decode_run(policy, dtype, rows, new_tokens) for _ in range(repeats)]
    finally:
        if old is None:
            os.environ.pop("GENEVOLVE_LEAN", None)
        else:
            os.environ["GENEVOLVE_LEAN"] = old
    runs.sort(key=lambda r: r["tokens_per_s"])
    med = dict(runs[len(runs) // 2])
    med.update(engine="lean" if lean else "transformers", repeats=[r["tokens_per_s"] for r in runs], warmup_seconds=warm)
    return med


def _decode_run(policy: str, dtype: str, rows: int, new_tokens: int) -> dict:
    from genevolve.agent.protocol import SYSTEM_PROMPT
    from genevolve.policies.base import SamplingParams
    from genevolve.policies.continuous import ContinuousBatch
    pol = _policy(policy, dtype)
    steps: list[tuple[int, float]] = []
    real = ContinuousBatch._decode

    def timed(self):
        t, n = time.perf_counter(), self.n_decode
        real(self)
        steps.append((n, time.perf_counter() - t))

    convs = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"Draw {k + 2} red circles."}]
             for k in range(rows)]
    done = [False] * rows
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=new_tokens, seed=0)
    ContinuousBatch._decode = timed
    try:
        ContinuousBatch(pol, rows, lambda i: None if done[i] else convs[i], lambda i, c: done.__setitem__(i, True),
                        params, max_batch=rows).run()
    finally:
        ContinuousBatch._decode = real
    full = [(n, t) for n, t in steps[2:] if n == rows] or steps  # steps with every row decoding, after a warm-up
    toks, secs = sum(n for n, _ in full), sum(t for _, t in full)
    return {"rows": rows, "steps": len(full), "tokens_per_s": toks / secs, "step_ms": 1000 * secs / len(full)}



def achieved_update(policy: str, dtype: str, rows: int, length: int, repeats: int = 3) -> dict:
    """One GRPO+VED update (reference and teacher on every row) on ``rows`` sequences of ``length`` tokens."""
    from genevolve.training.checkpoint import attach_adapter
    from genevolve.training.update import LossSettings, Scored, accumulate_gradients

    model = attach_adapter(_policy(policy, dtype).model, Path(os.devnull) / "no-checkpoint", rank=16, alpha=32)  # a fresh LoRA
    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    scored = []
    for r in range(rows):
        ids = torch.randint(10, vocab, (length,), generator=g).tolist()
        mask = [0] * (length // 3) + [1] * (length - length // 3)
        scored.append(Scored(ids, mask, r, 1.0 if r % 2 else -1.0, teacher_ids=ids[:8] + ids, teacher_offset=8))
    n_tokens = sum(sum(s.mask) for s in scored)
    loss = LossSettings(beta=1e-3, micro_batch=rows)
    model.zero_grad()
    accumulate_gradients(model, scored[:1], loss, "cpu", 0, n_tokens, rows)  # warm-up
    times = []
    for _ in range(repeats):
        model.zero_grad()
        t = time.perf_counter()
        accumulate_gradients(model, scored, loss, "cpu", 0, n_tokens, rows)
        times.append(time.perf_counter() - t)
    secs = sorted(times)[len(times) // 2]
    params = sum(p.numel() for p in model.parameters())
    tokens = rows * length
    flops = tokens * 4 * params + tokens * 2 * params + rows * (length + 8) * 2 * params  # student, reference, teacher
    return {"rows": rows, "length": length, "seconds": secs, "repeats": times, "tokens_per_s": tokens / secs,
            "flops": flops, "flops_per_s": flops / secs}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [b["rows"] for b in result["decode_bounds"]]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    ax[0].plot(rows, [b["tokens_per_s"] for b in result["decode_bounds"]], "o-", label="bound (bandwidth, peak)")
    ax[0].plot(rows, [b["tokens_per_s_at_shapes"] for b in result["decode_bounds"]], "o--",
               label="bound (bandwidth, products at their shapes)")
    for key, label in (("decode_achieved", "engine, lean forward"), ("decode_transformers", "engine, transformers' forward")):
        if result.get(key):
            ax[0].plot([a["rows"] for a in result[key]], [a["tokens_per_s"] for a in result[key]], "s-", label=label)
    ax[0].set_xscale("log", base=2)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("rows")
    ax[0].set_ylabel("tokens/s")
    ax[0].set_title(f"decode, {result['dtype']}")
    ax[0].legend(fontsize=7)
    ax[0].grid(alpha=0.3)
    mm = result["matmul"][result["dtype"]]["decode_shapes"]
    for shape in sorted({(m["k"], m["n"]) for m in mm}):
        pts = [m for m in mm if (m["k"], m["n"]) == shape]
        ax[1].plot([m["m"] for m in pts], [m["flops_per_s"] / 1e9 for m in pts], "o-", color=f"C{len(ax[1].lines)}",
                   label=f"{shape[0]}x{shape[1]}")
    packed = result["matmul"][result["dtype"]].get("decode_shapes_packed") or []
    for i, shape in enumerate(sorted({(m["k"], m["n"]) for m in packed})):
        pts = [m for m in packed if (m["k"], m["n"]) == shape]
        ax[1].plot([m["m"] for m in pts], [m["flops_per_s"] / 1e9 for m in pts], "^:", color=f"C{i}",
                   label="packed" if i == 0 else None)
    ax[1].axhline(result["matmul"][result["dtype"]]["peak_flops_per_s"] / 1e9, color="k", ls="--", label="peak")
    ax[1].set_xscale("log", base=2)
    ax[1].set_xlabel("rows (m)")
    ax[1].set_ylabel("GFLOP/s")
    ax[1].set_title("matmul at decode shapes (dotted: packed weights)")
    ax[1].legend(fontsize=7)
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--rows", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=512, help="tokens each row holds during decode (its KV reads)")
    ap.add_argument("--bandwidth-mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--achieved", action="store_true", help="also time the engine's decode and one update")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens per row in the achieved decode runs")
    ap.add_argument("--decode-repeats", type=int, default=3, help="timed decode runs per row count (the median is kept)")
    ap.add_argument("--compare", action="store_true", help="also time decode through transformers' own forward")
    ap.add_argument("--update-only", action="store_true", help="with --achieved: time the update, not decode")
    ap.add_argument("--update-rows", type=int, default=4)
    ap.add_argument("--update-length", type=int, default=256)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    rows = [int(x) for x in a.rows.split(",")]
    shape = smollm2_shape(a.policy)
    print(f"{a.policy}: {shape['params'] / 1e6:.1f} M parameters ({shape['matmul_params'] / 1e6:.1f} M multiplied per "
          f"token), threads {torch.get_num_threads()}", flush=True)
    bw = bandwidth(a.bandwidth_mb, a.repeats)
    print(f"bandwidth: copy {bw['copy_GBps']:.1f} GB/s, read {bw['read_GBps']:.1f} GB/s", flush=True)
    mm = {}
    for name, dt in DTYPES.items():
        peak = max(matmul_flops(s, s, s, dt, a.repeats) for s in (1024, 2048))
        dec = [{"m": r, "k": k, "n": n, "flops_per_s": matmul_flops(r, k, n, dt, a.repeats)}
               for r in rows for k, n in shape["projections"]]
        mm[name] = {"peak_flops_per_s": peak, "decode_shapes": dec}
        print(f"matmul {name}: peak {peak / 1e9:.0f} GFLOP/s; at decode shapes "
              + ", ".join(f"{r} rows {max(d['flops_per_s'] for d in dec if d['m'] == r) / 1e9:.0f}" for r in rows), flush=True)
        if dt == torch.bfloat16 and torch.backends.mkldnn.is_available():
            mm[name]["decode_shapes_packed"] = [{"m": r, "k": k, "n": n, "flops_per_s": matmul_flops(r, k, n, dt, a.repeats, True)}
                                                for r in rows for k, n in shape["projections"]]
            print("  packed weights: " + ", ".join(
                f"{r} rows {max(d['flops_per_s'] for d in mm[name]['decode_shapes_packed'] if d['m'] == r) / 1e9:.0f}"
                for r in rows), flush=True)
    bytes_per = 2 if a.dtype == "bfloat16" else 4
    bw_best = max(bw["copy_GBps"], bw["read_GBps"]) * 1e9
    peak = mm[a.dtype]["peak_flops_per_s"]
    bounds = [decode_bound(shape, r, a.context, bytes_per, bw_best, peak) for r in rows]
    for b in bounds:  # the second bound: each product at the throughput its own shape reaches (the better kernel)
        sets = [mm[a.dtype]["decode_shapes"]] + ([mm[a.dtype]["decode_shapes_packed"]] if "decode_shapes_packed" in mm[a.dtype] else [])
        b["t_compute_at_shapes"] = min(shape_time(shape, b["rows"], rates) for rates in sets)
        b["tokens_per_s_at_shapes"] = b["rows"] / max(b["t_memory"], b["t_compute_at_shapes"])
    update_params = shape["params"]
    update_bound = {"flops_per_token": 8 * update_params, "tokens_per_s": peak / (8 * update_params)}
    result = {"policy": a.policy, "dtype": a.dtype, "machine": {"cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__}, "shape": shape, "bandwidth": bw,
              "matmul": mm, "decode_bounds": bounds, "update_bound": update_bound,
              "command": "benchmarks/roofline.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if a.achieved:
        result["decode_achieved"], result["decode_transformers"] = [], []
        for b in bounds if not a.update_only else []:
            for lean, key in ((True, "decode_achieved"), (False, "decode_transformers")) if a.compare else ((True, "decode_achieved"),):
                got = achieved_decode(a.policy, a.dtype, b["rows"], a.new_tokens, a.decode_repeats, lean)
                got["fraction_of_bound"] = got["tokens_per_s"] / b["tokens_per_s"]
                got["fraction_of_bound_at_shapes"] = got["tokens_per_s"] / b["tokens_per_s_at_shapes"]
                result[key].append(got)
                print(f"  decode {b['rows']:>3} rows ({got['engine']}): {got['tokens_per_s']:8.1f} tok/s of "
                      f"{b['tokens_per_s']:8.1f} ({b['bound']}-bound): {100 * got['fraction_of_bound']:.0f} %; of "
                      f"{b['tokens_per_s_at_shapes']:.0f} at its shapes: {100 * got['fraction_of_bound_at_shapes']:.0f} %", flush=True)
        up = achieved_update(a.policy, a.dtype, a.update_rows, a.update_length, a.decode_repeats)
        up["fraction_of_peak"] = up["flops_per_s"] / peak
        result["update_achieved"] = up
        print(f"  update: {up['tokens_per_s']:.1f} tok/s, {up['flops_per_s'] / 1e9:.0f} GFLOP/s = "
              f"{100 * up['fraction_of_peak']:.1f} % of the {a.dtype} peak", flush=True)
    print(f"\n{'rows':>5}{'bound tok/s':>13}{'by':>9}{'at shapes':>11}{'achieved':>10}{'fraction':>10}{'at shapes':>11}")
    for i, b in enumerate(bounds):
        got = (result.get("decode_achieved") or [None] * len(bounds))[i]
        print(f"{b['rows']:>5}{b['tokens_per_s']:>13.0f}{b['bound']:>9}{b['tokens_per_s_at_shapes']:>11.0f}"
              + (f"{got['tokens_per_s']:>10.1f}{100 * got['fraction_of_bound']:>9.0f}%"
                 f"{100 * got['fraction_of_bound_at_shapes']:>10.0f}%" if got else ""))
    out = a.out or RESULTS / f"roofline_{Path(a.policy).name}_{a.dtype}.json"
    from genevolve.records.schema import atomic_write_json

    atomic_write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"saved {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
