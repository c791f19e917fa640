"""CUDA check: a few VED steps with a real small policy in bf16, and a diffusers render, with figures.

    python scripts/cuda_check.py                       # tiny policy; data made by the sandbox expert
    python scripts/cuda_check.py --policy smollm2 --steps 5 --batch 8
    python scripts/cuda_check.py --data convs.jsonl    # {"student": [...], "teacher": [...]} conversation pairs

It prints, and writes as JSON with ``--out``: the device, decoding tokens/s of the policy (batched
first turns), VED training tokens/s (student forward + backward, pi_old and teacher forwards, LoRA
update), peak GPU memory of each phase, and the render time and peak memory of a diffusers
pipeline (``--diffusers-model`` folder, else a random-weight pipeline built from a config).

Without a GPU it runs the same steps on the CPU in float32 with a clear notice: the figures are
then CPU figures, useful only to check that everything runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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


def _mem(torch, device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ved_steps(policy, pairs, steps: int, batch: int, lora_rank: int, lr: float, log) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from genevolve.policies.local import encode_conversation
    from genevolve.training.update import LossSettings, Scored, accumulate_gradients

    tok, device = policy.tokenizer, policy.device
    rows = []
    for p in pairs:
        s_ids, s_mask = encode_conversation(tok, p["student"])
        t_ids, _ = encode_conversation(tok, p["teacher"])
        off = len(t_ids) - len(s_ids)
        n_sys = next(i for i, m in enumerate(s_mask) if m)  # tokens before the first assistant token
        if off < 0 or t_ids[n_sys + off:] != s_ids[n_sys:]:
            continue  # the guide changed the tokenisation after the system block: no aligned teacher
        rows.append((s_ids, s_mask, t_ids, off))
    if not rows:
        raise RuntimeError("no student/teacher pair lines up token for token")
    model = get_peft_model(policy.model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                    target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    settings = LossSettings(use_grpo=False, use_ved=True, micro_batch=batch)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens, losses = [], 0, []
    for step in range(steps):
        mb = [Scored(s, m, 0, 0.0, t, off) for s, m, t, off in (rows[(step * batch + i) % len(rows)] for i in range(batch))]
        _sync(torch, device)
        t0 = time.perf_counter()
        model.train()
        opt.zero_grad(set_to_none=True)
        stats = accumulate_gradients(model, mb, settings, device, pad, sum(sum(s.mask) for s in mb), len(mb))
        opt.step()
        _sync(torch, device)
        dt = time.perf_counter() - t0
        n_tok = sum(len(s.ids) + len(s.teacher_ids) for s in mb) + sum(len(s.ids) for s in mb)  # old + teacher + student
        if step:  # the first step warms kernels and allocators up
            times.append(dt)
            tokens += n_tok
        losses.append(stats["ved"])
        log(f"VED step {step + 1}/{steps}: loss {stats['ved']:.4f}, {int(stats['ved_tokens'])} tokens selected, "
            f"|log q - log p| {stats['mean_gap']:.3f}, {dt * 1000:.0f} ms, longest {max(len(s.ids) for s in mb)} tokens")
    return {"ved_steps": steps, "ved_batch": batch, "ved_tokens_per_s": tokens / sum(times) if times else float("nan"),
            "ved_ms_per_step": 1000 * sum(times) / len(times) if times else float("nan"),
            "ved_peak_gib": _mem(torch, device), "ved_losses": losses, "aligned_pairs": len(rows)}


def decode_speed(policy, pairs, batch: int, max_new_tokens: int) -> dict:
    import torch

    from genevolve.policies.base import SamplingParams

    convs = [p["student"][:2] for p in pairs][:batch]
    convs = (convs * batch)[:batch]
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=max_new_tokens, seed=0)
    policy.generate(convs[:1], SamplingParams(temperature=0.7, max_new_tokens=8, seed=0))  # warm-up
    if policy.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(torch, policy.device)
    t0 = time.perf_counter()
    out = policy.generate(convs, params)
    _sync(torch, policy.device)
    dt = time.perf_counter() - t0
    n = sum(len(c.token_ids) for c in out)
    return {"decode_batch": len(convs), "decode_tokens": n, "decode_tokens_per_s": n / dt, "decode_peak_gib": _mem(torch, policy.device)}


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
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(torch, dev)
    t0 = time.perf_counter()
    for i in range(n):
        image = gen.generate("exactly three gold stars above a teal flag", seed=i)
    _sync(torch, dev)
    dt = (time.perf_counter() - t0) / n
    return {"render_generator": gen.name, "render_size": list(image.size), "render_steps": steps, "render_dtype": str(gen.dtype),
            "render_ms_per_image": dt * 1000, "render_peak_gib": _mem(torch, dev)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="tiny", help="tiny, smollm2 or a model folder")
    ap.add_argument("--data", help="JSONL of {'student', 'teacher'} conversation pairs (default: made by the sandbox expert)")
    ap.add_argument("--pairs", type=int, default=16, help="pairs to make when --data is not given")
    ap.add_argument("--steps", type=int, default=4, help="VED steps")
    ap.add_argument("--batch", type=int, default=8, help="sequences per VED step and per decoding batch")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--diffusers-model", help="diffusers folder or cached hub id (default: random-weight tiny pipeline)")
    ap.add_argument("--render-steps", type=int, default=4)
    ap.add_argument("--render-side", type=int, default=256)
    ap.add_argument("--renders", type=int, default=4)
    ap.add_argument("--device", help="force a device (default: cuda if available)")
    ap.add_argument("--out", help="write the figures here as JSON")
    ap.add_argument("--save-data", help="write the conversation pairs here (to carry to another machine)")
    args = ap.parse_args(argv)

    import torch

    from genevolve.policies.resolve import resolve_policy

    cuda = torch.cuda.is_available() and args.device in (None, "cuda")
    device = "cuda" if cuda else (args.device or "cpu")
    dtype = "bfloat16" if cuda else "float32"
    if not cuda:
        print("NOTICE: no CUDA device: running the same steps on the CPU in float32. These are CPU figures, "
              "useful only to check that everything runs; run this on a GPU machine for the real ones.", flush=True)
        args.steps, args.batch, args.max_new_tokens = min(args.steps, 3), min(args.batch, 2), min(args.max_new_tokens, 32)
        args.render_side, args.renders, args.pairs = min(args.render_side, 64), min(args.renders, 2), min(args.pairs, 4)
    figures: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                     "policy": args.policy, "dtype": dtype}
    if args.data:
        pairs = [json.loads(line) for line in Path(args.data).read_text("utf-8").splitlines() if line.strip()]
    else:
        pairs = make_pairs(args.pairs)
    if args.save_data:
        Path(args.save_data).write_text("".join(json.dumps(p) + "\n" for p in pairs))
    t0 = time.perf_counter()
    policy = resolve_policy(args.policy, device=device, dtype=dtype)
    figures["policy_params_m"] = sum(p.numel() for p in policy.model.parameters()) / 1e6
    figures["load_s"] = time.perf_counter() - t0
    figures |= decode_speed(policy, pairs, args.batch, args.max_new_tokens)
    print(f"decode: {figures['decode_tokens_per_s']:.0f} tokens/s (batch {figures['decode_batch']}), "
          f"peak {figures['decode_peak_gib']:.2f} GiB", flush=True)
    figures |= ved_steps(policy, pairs, args.steps, args.batch, args.lora_rank, args.lr, lambda s: print(s, flush=True))
    print(f"VED: {figures['ved_tokens_per_s']:.0f} tokens/s, {figures['ved_ms_per_step']:.0f} ms/step, "
          f"peak {figures['ved_peak_gib']:.2f} GiB", flush=True)
    del policy
    if cuda:
        torch.cuda.empty_cache()
    figures |= render_check(device, dtype if cuda else None, args.diffusers_model, args.render_steps, args.render_side, args.renders)
    print(f"render ({figures['render_generator']}, {figures['render_size'][0]}x{figures['render_size'][1]}, "
          f"{figures['render_steps']} steps, {figures['render_dtype']}): {figures['render_ms_per_image']:.0f} ms/image, "
          f"peak {figures['render_peak_gib']:.2f} GiB", flush=True)
    print(json.dumps({k: v for k, v in figures.items() if k != "ved_losses"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
