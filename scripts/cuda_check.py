"""CUDA check: rollout and update throughput of a real-size policy in bf16 against transformers, MFU, peak memory, a render.

    python scripts/cuda_check.py --out runs/cuda_check.json   # random-0.5b on a GPU, the tiny policy on a CPU
    python scripts/cuda_check.py --policy smollm2             # SmolLM2-135M-Instruct (installed, offline)
    python scripts/cuda_check.py --policy random-1.5b --peak-tflops 989
    python scripts/cuda_check.py --quick                      # the smallest settings: checks that it all runs
    python scripts/cuda_check.py --data convs.jsonl           # update on {"student": [...], "teacher": [...]} pairs

It prints, and writes as JSON with ``--out``:

- rollout: generated tokens/s of our engine (:func:`genevolve.agent.rollout.rollout` over a LocalPolicy:
  continuous batching, each conversation's KV cache kept across turns) against transformers' continuous
  batching (the manager ``generate_batch`` drives) on the same device, prompts and sampling, single-turn and
  multi-turn, with the ratio ours/peer (``benchmarks/peers_rollout.py`` does the measuring); and our
  engine's peak memory on its own;
- update: one step of the trainer's loss (L_GRPO + 2 L_VED, the reference and teacher forwards without
  gradient, the student's forward and backward, LoRA r 16, clip, AdamW; ``benchmarks/peers_update.py``'s
  ``Ours``) on student/teacher pairs made by the sandbox expert: tokens/s, MFU (formula in the JSON) and
  peak memory;
- render: the time and peak memory of a diffusers pipeline (``--diffusers-model`` folder, else a
  random-weight pipeline built from a config).

``--policy random-<size>`` (tiny, 135m, 0.5b, 1.5b) builds a Qwen2-shaped model with random weights from a
config, directly on the device in the run's dtype, with SmolLM2's tokenizer (from the installed GGUF) and
its vocabulary: nothing is downloaded. Random weights rarely sample a stop token, so every turn runs to
its token budget on both sides.

Without a GPU it runs the same steps on the CPU in float32 with a clear notice: the figures are then
CPU figures, useful only to check that everything runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in order as substrings of the device name.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.0))
# Qwen2-shaped random models: hidden, layers, attention heads, KV heads, MLP width (embeddings tied).
RANDOM_SHAPES = {"tiny": (64, 2, 4, 2, 128), "135m": (576, 30, 9, 3, 1536), "0.5b": (896, 24, 14, 2, 4864),
                 "1.5b": (1536, 28, 12, 2, 8960)}
MFU_FORMULA = ("MFU = (6 * N * student_tokens + 2 * N * frozen_tokens) / seconds_per_step / peak_flops; N = non-embedding "
               "parameters of the base model, student_tokens = tokens of the batch's sequences (forward + backward), "
               "frozen_tokens = tokens of the forwards without gradient (reference: the student's sequences when GRPO's "
               "KL is on; teacher: the teacher's sequences when VED is on). The standard estimate: it counts a full "
               "backward although LoRA skips the base weights' gradients, and leaves out attention and the output layer.")


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """Student/teacher conversation pairs from the sandbox expert following each request's decision guide."""
    from genevolve.agent.loop import Tools, run_to_end
    from genevolve.agent.guides import oracle_guide
    from genevolve.agent.protocol import trajectory_to_messages
    from genevolve.world import World
    from genevolve.agent.expert import ExpertNoise, ExpertPolicy

    world = World()
    tools, expert = Tools.for_world(world), ExpertPolicy(world, ExpertNoise.cold_start())
    pairs = []
    for i, req in enumerate(world.split("evolve")[:n]):
        t = run_to_end(req, expert, tools, seed=seed * 1000 + i, guide=oracle_guide(world, req))
        teacher = trajectory_to_messages(t)
        t.guide = None
        pairs.append({"student": trajectory_to_messages(t), "teacher": teacher})
    return pairs


def _mem(torch, device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _reset_mem(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_policy(size: str, device: str, dtype: str, seed: int = 0):
    """A LocalPolicy over a Qwen2-shaped model with random weights (``RANDOM_SHAPES[size]``) and SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from genevolve.policies.local import LocalPolicy, pick_dtype
    from genevolve.policies.resolve import smollm2_path

    if size not in RANDOM_SHAPES:
        raise ValueError(f"unknown random model size {size!r}: use one of {', '.join(RANDOM_SHAPES)}")
    folder, gguf = smollm2_path()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    hidden, layers, heads, kv_heads, mlp = RANDOM_SHAPES[size]
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=mlp, tie_word_embeddings=True,
                         max_position_embeddings=32768, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    dev = torch.device(device)
    torch.manual_seed(seed)
    with dev:  # weights are created on the device, in the run's dtype
        model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(dev, dtype))
    model.eval()
    return LocalPolicy(model, tok, name=f"random-{size}", device=dev)


def load_policy(spec: str, device: str, dtype: str):
    from genevolve.policies.resolve import resolve_policy

    if spec.startswith("random-"):
        return random_policy(spec.removeprefix("random-"), device, dtype)
    return resolve_policy(spec, device=device, dtype=dtype)


def param_counts(model) -> tuple[int, int]:
    """All parameters and the non-embedding ones (input embeddings, and the output layer when it is not tied)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    n_emb = emb.numel() + (head.weight.numel() if head is not None and head.weight is not emb else 0)
    return total, total - n_emb


def peak_tflops(device_name: str, override: float | None) -> tuple[float | None, str]:
    """The device's dense bf16 peak in TFLOP/s and where it came from (None when the name is not in the table)."""
    if override:
        return override, "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value, f"table entry {key!r}"
    return None, f"no table entry for {device_name!r} (give --peak-tflops)"


def rollout_phase(policy, args) -> dict:
    """Ours alone (peak memory of our engine), then ours against transformers' continuous batching in both modes."""
    import torch

    import peers_rollout
    from genevolve.agent.loop import Tools
    from genevolve.policies.base import SamplingParams
    from genevolve.world import World

    ns = argparse.Namespace(policy=policy.name, requests=args.requests, k=args.k, max_new_tokens=args.max_new_tokens,
                            max_turns=args.max_turns, max_context=args.max_context, temperature=0.7, top_p=0.95,
                            repeats=args.repeats, mode="both", seed=args.seed)
    world = World()
    tools = Tools.for_world(world)
    reqs = world.split("bench")[: args.requests]
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=args.max_new_tokens)
    peers_rollout.run_arm("multi-turn", policy, reqs[:1], tools, argparse.Namespace(**{**vars(ns), "k": 1}), params, 99)
    _reset_mem(torch, policy.device)
    alone = peers_rollout.run_arm("multi-turn", policy, reqs, tools, ns, params, args.seed)
    alone["tokens_per_s"] = alone["generated_tokens"] / alone["seconds"]
    alone["peak_gib"] = _mem(torch, policy.device)
    res = peers_rollout.measure(ns, policy=policy)
    res.pop("machine", None)
    return {"ours_alone_multi_turn": alone, **res, "note": peers_rollout.NOTE + " peak_gib per side: the most memory "
            "allocated during that side's runs, the model and the peer's paged cache (built before the runs) included; "
            "ours_alone_multi_turn.peak_gib is our engine with no peer resident."}


def update_rows(tok, pairs: list[dict], seed: int) -> list:
    """Scored rows (random advantages) from the pairs whose teacher stream lines up with the student's token for token."""
    import torch

    from genevolve.policies.local import encode_conversation
    from genevolve.training.update import Scored

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p in pairs:
        s_ids, s_mask = encode_conversation(tok, p["student"])
        t_ids, _ = encode_conversation(tok, p["teacher"])
        off = len(t_ids) - len(s_ids)
        n_sys = next(i for i, m in enumerate(s_mask) if m)  # tokens before the first assistant token
        if off < 0 or t_ids[n_sys + off:] != s_ids[n_sys:]:
            continue  # the guide changed the tokenisation after the system block: no aligned teacher
        rows.append(Scored(s_ids, s_mask, 0, float(torch.randn(1, generator=gen)), t_ids, off))
    if not rows:
        raise RuntimeError("no student/teacher pair lines up token for token")
    return rows


def update_phase(policy, pairs: list[dict], args, n_params: int, peak: float | None) -> dict:
    """Warm-up step + ``args.steps`` timed steps of the chosen loss on ``args.batch`` sequences: tokens/s, MFU, peak memory."""
    import torch

    from peers_update import MICRO_BATCH, Ours
    from genevolve.training.update import LossSettings

    rows = update_rows(policy.tokenizer, pairs, args.seed)
    batch = [rows[i % len(rows)] for i in range(args.batch)]
    tok, device = policy.tokenizer, policy.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    loss = LossSettings(use_grpo=args.loss != "ved", use_ved=args.loss != "grpo", micro_batch=MICRO_BATCH)
    _reset_mem(torch, device)
    ours = Ours(policy.model, batch, pad, device)
    times = []
    for step in range(args.steps + 1):
        _sync(torch, device)
        t0 = time.perf_counter()
        ours.step(args.loss, loss)
        _sync(torch, device)
        if step:  # the first step warms kernels and allocators up
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    student = sum(len(s.ids) for s in batch)
    frozen = (student if loss.use_grpo and loss.beta else 0) + (sum(len(s.teacher_ids) for s in batch) if loss.use_ved else 0)
    assistant = sum(sum(s.mask) for s in batch)
    flops = 6 * n_params * student + 2 * n_params * frozen
    return {"loss": args.loss + (f" (lambda {loss.lambda_ved}, beta {loss.beta})" if args.loss == "grpo+ved" else ""),
            "sequences": len(batch), "micro_batch": MICRO_BATCH, "aligned_pairs": len(rows), "timed_steps": len(times),
            "seconds_per_step": seconds, "seconds": times, "student_tokens": student, "frozen_tokens": frozen,
            "assistant_tokens": assistant, "tokens_per_s": student / seconds, "assistant_tokens_per_s": assistant / seconds,
            "processed_tokens_per_s": (student + frozen) / seconds, "lora_trainable_params": sum(p.numel() for p in ours.params),
            "flops_per_step": flops, "achieved_tflops": flops / seconds / 1e12, "peak_tflops": peak,
            "mfu": flops / seconds / (peak * 1e12) if peak else None, "mfu_formula": MFU_FORMULA,
            "peak_gib": _mem(torch, device), "timers_seconds": ours.timers}


def render_check(device: str, dtype: str | None, model: str | None, steps: int, side: int, n: int) -> dict:
    import torch

    from genevolve.generators.diffusers_t2i import DiffusersTextToImage
    from genevolve.generators.tiny import build_tiny_sd

    if model:
        gen = DiffusersTextToImage(model, device=device, dtype=dtype, steps=steps, width=side, height=side)
    else:
        gen = DiffusersTextToImage(pipeline=build_tiny_sd(sample_size=side // 2, width=64), device=device, dtype=dtype,
                                   steps=steps, name=f"tiny-sd-random-{side}px")
    gen.generate("warm-up", seed=0)
    dev = gen.device
    _reset_mem(torch, dev)
    t0 = time.perf_counter()
    for i in range(n):
        image = gen.generate("exactly three gold stars above a teal flag", seed=i)
    _sync(torch, dev)
    dt = (time.perf_counter() - t0) / n
    return {"generator": gen.name, "size": list(image.size), "steps": steps, "dtype": str(gen.dtype),
            "ms_per_image": dt * 1000, "peak_gib": _mem(torch, dev)}


def _gib(x: float | None) -> str:
    return "n/a (CPU)" if x is None else f"{x:.2f} GiB"


def markdown_table(fig: dict) -> str:
    """Rows for the README's ``| what | figure | command |`` performance table."""
    cmd = f"`{fig['short_command']}`"
    where = f"{fig['policy']} ({fig['non_embedding_params_m']:.3g}M non-embedding), {fig['dtype']}, {fig['device']}"
    lines = ["| what | figure | command |", "| --- | --- | --- |"]
    ro = fig["rollout"]
    s = fig["settings"]
    for mode in ("single-turn", "multi-turn"):
        r = ro["modes"][mode]
        turns = "1 turn" if mode == "single-turn" else f"up to {s['max_turns']} turns, KV cache kept"
        lines.append(f"| rollout tokens/s, {mode} ({s['requests']} x {s['k']}, {turns}), {where} | ours "
                     f"{r['ours']['tokens_per_s']:,.0f} vs transformers continuous batching "
                     f"{r['transformers_cb']['tokens_per_s']:,.0f}: {r['ratio_tokens_per_s']:.2f}x | {cmd} |")
    lines.append(f"| rollout peak memory, ours alone (multi-turn) | {_gib(ro['ours_alone_multi_turn']['peak_gib'])} | same |")
    u = fig["update"]
    mfu = f"MFU {u['mfu']:.1%} of {u['peak_tflops']:.0f} TFLOP/s" if u["mfu"] is not None else "MFU n/a (no peak for this device)"
    lines.append(f"| update tokens/s, {u['loss']}, LoRA, {u['sequences']} sequences | {u['tokens_per_s']:,.0f} tokens/s "
                 f"({u['assistant_tokens_per_s']:,.0f} assistant), {u['achieved_tflops']:.1f} TFLOP/s, {mfu}; "
                 f"peak {_gib(u['peak_gib'])} | same |")
    if "render" in fig:
        r = fig["render"]
        lines.append(f"| render, {r['generator']} {r['size'][0]}x{r['size'][1]}, {r['steps']} steps | "
                     f"{r['ms_per_image']:.0f} ms/image, peak {_gib(r['peak_gib'])} | same |")
    return "\n".join(lines)


QUICK = {"requests": 1, "k": 2, "max_new_tokens": 8, "max_turns": 2, "max_context": 1024, "repeats": 1, "steps": 1,
         "batch": 2, "pairs": 2, "renders": 1, "render_side": 64, "render_steps": 2}
CPU_CAPS = {"requests": 2, "k": 2, "max_new_tokens": 32, "max_turns": 3, "max_context": 2048, "repeats": 1, "steps": 2,
            "batch": 2, "pairs": 4, "renders": 2, "render_side": 64}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", help="tiny, smollm2, random-<size> (" + ", ".join(RANDOM_SHAPES)
                    + ") or a model folder (default: random-0.5b on a GPU, tiny on the CPU)")
    ap.add_argument("--requests", type=int, default=8, help="bench requests per rollout")
    ap.add_argument("-k", type=int, default=4, help="samples per request")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="per turn")
    ap.add_argument("--max-turns", type=int, default=4, help="assistant turns per multi-turn episode")
    ap.add_argument("--max-context", type=int, help="longest conversation the peer's cache is sized for "
                    "(default: 2048 + max-turns x (max-new-tokens + 256))")
    ap.add_argument("--repeats", type=int, default=2, help="timed rollout runs per side and mode (median)")
    ap.add_argument("--data", help="JSONL of {'student', 'teacher'} conversation pairs (default: made by the sandbox expert)")
    ap.add_argument("--pairs", type=int, default=16, help="pairs to make when --data is not given")
    ap.add_argument("--loss", choices=("grpo+ved", "grpo", "ved"), default="grpo+ved",
                    help="update loss (grpo+ved: the trainer's L_GRPO + 2 L_VED)")
    ap.add_argument("--steps", type=int, default=4, help="timed update steps, after one warm-up step")
    ap.add_argument("--batch", type=int, default=16, help="sequences per update step")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s for MFU (default: from a table)")
    ap.add_argument("--diffusers-model", help="diffusers folder or cached hub id (default: random-weight tiny pipeline)")
    ap.add_argument("--render-steps", type=int, default=4)
    ap.add_argument("--render-side", type=int, default=256)
    ap.add_argument("--renders", type=int, default=4)
    ap.add_argument("--no-render", dest="render", action="store_false", help="skip the diffusers render")
    ap.add_argument("--quick", action="store_true", help="the smallest settings: checks that everything runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="force a device (default: cuda if available)")
    ap.add_argument("--out", help="write the figures here as JSON")
    ap.add_argument("--save-data", help="write the conversation pairs here (to carry to another machine)")
    args = ap.parse_args(argv)
    if args.max_context is None:
        args.max_context = 2048 + args.max_turns * (args.max_new_tokens + 256)  # system block + turns + tool responses
    if args.quick:
        vars(args).update({k: min(v, getattr(args, k)) for k, v in QUICK.items()})
    return args


def header(args, argv: list[str] | None, cuda: bool, dtype: str, policy) -> dict:
    import torch

    import peers_rollout

    argv = sys.argv[1:] if argv is None else argv
    total, non_emb = param_counts(policy.model)
    facts = peers_rollout.machine_facts(policy)
    try:
        import diffusers
        import trl

        facts |= {"diffusers": diffusers.__version__, "trl": trl.__version__}
    except ImportError:
        pass
    return {"command": shlex.join([sys.executable, "scripts/cuda_check.py", *argv]),
            "short_command": shlex.join(["scripts/cuda_check.py", *argv]),
            "device": torch.cuda.get_device_name(policy.device) if cuda else "cpu", "dtype": dtype,
            "cuda": torch.version.cuda if cuda else None, "versions": facts, "policy": policy.name,
            "policy_params_m": total / 1e6, "non_embedding_params_m": non_emb / 1e6, "settings": vars(args)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and (args.device is None or args.device.startswith("cuda"))
    if not cuda and (args.device or "").startswith("cuda"):
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    device = (args.device or "cuda") if cuda else (args.device or "cpu")
    dtype = "bfloat16" if cuda else "float32"
    if not cuda:
        print("NOTICE: no CUDA device: running the same steps on the CPU in float32. These are CPU figures, "
              "useful only to check that everything runs; run this on a GPU machine for the real ones.", flush=True)
        vars(args).update({k: min(v, getattr(args, k)) for k, v in CPU_CAPS.items()})
    args.policy = args.policy or ("random-0.5b" if cuda else "tiny")
    if args.data:
        pairs = [json.loads(line) for line in Path(args.data).read_text("utf-8").splitlines() if line.strip()]
    else:
        pairs = make_pairs(args.pairs, args.seed)
    if args.save_data:
        Path(args.save_data).write_text("".join(json.dumps(p) + "\n" for p in pairs))
    t0 = time.perf_counter()
    policy = load_policy(args.policy, device, dtype)
    figures = header(args, argv, cuda, dtype, policy) | {"load_s": time.perf_counter() - t0}
    peak, figures["peak_tflops_source"] = peak_tflops(figures["device"], args.peak_tflops)
    figures["rollout"] = rollout_phase(policy, args)
    for mode, r in figures["rollout"]["modes"].items():
        print(f"rollout {mode}: ours {r['ours']['tokens_per_s']:.0f} tokens/s, transformers continuous batching "
              f"{r['transformers_cb']['tokens_per_s']:.0f} tokens/s: {r['ratio_tokens_per_s']:.2f}x", flush=True)
    _, n_params = param_counts(policy.model)
    figures["update"] = u = update_phase(policy, pairs, args, n_params, peak)
    print(f"update ({u['loss']}): {u['tokens_per_s']:.0f} tokens/s, {u['seconds_per_step'] * 1000:.0f} ms/step, "
          f"{u['achieved_tflops']:.2f} TFLOP/s, MFU {u['mfu'] if u['mfu'] is None else format(u['mfu'], '.1%')}", flush=True)
    del policy, u
    if cuda:
        torch.cuda.empty_cache()
    if args.render:
        figures["render"] = render_check(device, dtype if cuda else None, args.diffusers_model, args.render_steps,
                                         args.render_side, args.renders)
    figures["markdown"] = markdown_table(figures)
    print(figures["markdown"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=1))
        print(f"saved {args.out}")
    return figures


if __name__ == "__main__":
    main()
