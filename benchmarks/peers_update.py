"""Update-step throughput against a peer: our GRPO / VED update vs TRL's GRPO and SDPO loss paths.

One batch of real trajectories (``--batch`` bench requests, one rollout each, the teacher reading each
behind its request's oracle guide, random advantages) is fed to both sides: the same tokens, assistant
masks, advantages and teacher streams, the same LoRA (r 16, alpha 32, the project's target modules, the
same initial adapter weights), the same micro-batch (the trainer's default 8 sequences), torch AdamW
(lr 1e-3, betas 0.9/0.99), gradient clipping at 1.0. A timed step is everything from the rollout's
tokens to updated weights:

- ``grpo``: ours = :func:`~genevolve.training.update.accumulate_gradients` with VED off (pi_old and
  reference forwards without gradient, the student's forward, loss, backward) + clip + step;
  TRL = ``GRPOTrainer`` with beta 1e-3, clip 0.20/0.28, loss ``dapo`` (token mean over the step):
  the reference forward it makes in ``_generate_and_score_completions`` (adapter disabled) +
  ``compute_loss`` + backward + clip + step. TRL takes pi_old = the student's detached log-probs
  (one update per batch), so it makes no pi_old forward. Multi-turn trajectories go in as TRL's
  tool-calling batches do: completion = everything after the first assistant token, ``tool_mask`` = the
  assistant mask.
- ``ved``: ours with GRPO off (pi_old and teacher forwards, the student, VED, backward) + clip + step;
  TRL = ``SDPOTrainer`` (``trl.experimental.sdpo``), pure self-distillation, ``sampled_token`` reverse
  KL, live teacher (the current weights, as ours), IS clip 2: its teacher forward + student forward +
  loss + backward + clip + step. SDFT's loss functions are the same module as SDPO's.
- ``grpo+ved`` (beta 0 on both sides, since SDPO's policy term has no KL): ours L_GRPO + 2 L_VED vs
  SDPO with ``distillation_weight`` 2/3 (the same mix up to a factor 3).

Tokens/s = assistant tokens of the batch per second of a whole step; median of ``--repeats``, arms and
sides alternating. A profile of one step per side (torch.profiler) splits the time into forward,
backward, log-softmax over the vocabulary, attention and optimizer.

    .venv/bin/python benchmarks/peers_update.py [--policy tiny] [--batch 16] [--repeats 3]
    GENEVOLVE_DTYPE=bfloat16 .venv/bin/python benchmarks/peers_update.py --policy smollm2 --batch 4 --micro-batch 2 --no-profile
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from peers_rollout import machine_facts  # noqa: E402

from genevolve.agent.guides import oracle_guide  # noqa: E402
from genevolve.agent.loop import Tools  # noqa: E402
from genevolve.agent.rollout import rollout  # noqa: E402
from genevolve.agent.teacher import teacher_stream  # noqa: E402
from genevolve.policies.base import SamplingParams  # noqa: E402
from genevolve.policies.resolve import resolve_policy  # noqa: E402
from genevolve.records.schema import atomic_write_json  # noqa: E402
from genevolve.training.checkpoint import LORA_TARGETS  # noqa: E402
from genevolve.training.update import LossSettings, Scored, accumulate_gradients  # noqa: E402
from genevolve.world import World  # noqa: E402

MICRO_BATCH = LossSettings().micro_batch
LR, BETAS, GRAD_CLIP = 1e-3, (0.9, 0.99), 1.0  # the trainer's defaults (EvolveConfig)
ARMS = ("grpo", "ved", "grpo+ved")


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")


def make_batch(policy: str, batch: int, seed: int, max_new_tokens: int):
    """A policy and a batch of scored trajectories (tokens, masks, advantages, teacher streams)."""
    w = World()
    pol = resolve_policy(policy)
    reqs = w.split("evolve")[:batch]
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=max_new_tokens)
    trajs = rollout(reqs, pol, Tools.for_world(w), k=1, params=params, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    adv = torch.randn(len(trajs), generator=gen).tolist()
    scored = []
    for r, t, a in zip(reqs, trajs, adv):
        teacher_ids, offset = teacher_stream(pol.tokenizer, oracle_guide(w, r), t.system_prompt, t.token_ids)
        scored.append(Scored(t.token_ids, t.assistant_mask, 0, a, teacher_ids, offset))
    return pol, scored


def _left(rows: list[list[int]], pad_id: int):
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, n - len(r):] = 1
    return ids, mask


def _right(rows: list[list[int]], pad_id: int, fill: int = 0):
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def trl_inputs(mb: list[Scored], pad_id: int, n_items: int) -> dict:
    """TRL's batch dict for a micro-batch: prompt = tokens before the first assistant token, the rest is the completion."""
    splits = [s.mask.index(1) for s in mb]
    prompt_ids, prompt_mask = _left([s.ids[:k] for s, k in zip(mb, splits)], pad_id)
    completion_ids, completion_mask = _right([s.ids[k:] for s, k in zip(mb, splits)], pad_id)
    tool_mask, _ = _right([s.mask[k:] for s, k in zip(mb, splits)], 0)
    t_prompt, t_prompt_mask = _left([s.teacher_ids[: k + s.teacher_offset] for s, k in zip(mb, splits)], pad_id)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "tool_mask": tool_mask,
            "advantages": torch.tensor([s.advantage for s in mb]),
            "num_items_in_batch": torch.tensor(float(n_items)),
            "teacher_input_ids": torch.cat([t_prompt, completion_ids], dim=1),
            "teacher_attention_mask": torch.cat([t_prompt_mask, completion_mask], dim=1),
            "self_distillation_mask": torch.ones(len(mb))}


class Ours:
    """The project's update: the trainer's :func:`accumulate_gradients`, then clip and one AdamW step."""

    def __init__(self, base_model, scored, pad_id: int, device):
        from peft import get_peft_model

        torch.manual_seed(0)
        self.model = get_peft_model(base_model, lora_config())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, weight_decay=0.0)
        self.scored, self.pad_id, self.device = scored, pad_id, device
        self.n_tokens = sum(sum(s.mask) for s in scored)
        self.timers: dict[str, float] = {}

    def step(self, arm: str, loss: LossSettings | None = None) -> None:
        """One update; ``loss`` (when given) replaces the arm's settings."""
        loss = loss or LossSettings(use_grpo=arm != "ved", use_ved=arm != "grpo",
                                    beta=0.0 if arm == "grpo+ved" else 1e-3, micro_batch=MICRO_BATCH)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        stats = accumulate_gradients(self.model, self.scored, loss, self.device, self.pad_id, self.n_tokens,
                                     len(self.scored))
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.opt.step()
        self.timers = {"frozen forwards (accumulate_gradients teacher_seconds)": stats["teacher_seconds"],
                       "student forward + loss + backward": stats["update_seconds"],
                       "clip + optimizer": time.perf_counter() - t}


def _trl_args(cls, tmp: str, n_micro: int, **kw):
    return cls(output_dir=tmp, use_cpu=True, report_to=[], logging_strategy="no", save_strategy="no",
               per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=n_micro,
               num_generations=2, bf16=False, fp16=False, gradient_checkpointing=False, learning_rate=LR, seed=0, **kw)


class TRL:
    """TRL's GRPO (``GRPOTrainer``) and SDPO (``SDPOTrainer``) loss paths on their own copy of the model."""

    def __init__(self, policy: str, scored, pad_id: int, tmp: str):
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        pol = resolve_policy(policy)
        tok = pol.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if getattr(pol.model, "hf_quantizer", None) is not None:  # GGUF (smollm2): dequantized at load, a marker only
            pol.model.hf_quantizer = None
            if not isinstance(getattr(type(pol.model), "is_quantized", None), property):
                pol.model.is_quantized = False
        torch.manual_seed(0)
        from peft import get_peft_model

        self.model = get_peft_model(pol.model, lora_config())  # the same initial adapter as ours (same seed)
        data = Dataset.from_dict({"prompt": ["x"] * 8})
        reward = [lambda completions, **kw: [0.0] * len(completions)]
        n_micro = -(-len(scored) // MICRO_BATCH)
        common = dict(epsilon=0.2, epsilon_high=0.28, max_completion_length=max(len(s.ids) for s in scored))
        self.grpo = GRPOTrainer(model=self.model, reward_funcs=reward, processing_class=tok, train_dataset=data,
                                args=_trl_args(GRPOConfig, tmp, n_micro, beta=1e-3, loss_type="dapo", **common))
        self.sdpo = {w: SDPOTrainer(model=self.model, reward_funcs=reward, processing_class=tok, train_dataset=data,
                                    args=_trl_args(SDPOConfig, tmp, n_micro, teacher_model_kind="live",
                                                   distillation_mode="sampled_token", distillation_alpha=1.0,
                                                   distillation_is_clip=2.0, distillation_weight=w, beta=0.0,
                                                   loss_type="dapo", **common))
                     for w in (1.0, 2.0 / 3.0)}
        for tr in (self.grpo, *self.sdpo.values()):
            tr.current_gradient_accumulation_steps = n_micro  # set by the training loop, which is not used here
        self.gradient_checkpointing = bool(getattr(self.model.get_base_model(), "is_gradient_checkpointing", False))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, weight_decay=0.0)
        n_items = sum(sum(s.mask) for s in scored)
        self.batches = [trl_inputs(scored[c: c + MICRO_BATCH], pad_id, n_items)
                        for c in range(0, len(scored), MICRO_BATCH)]
        self.timers: dict[str, float] = {}

    def _grpo_micro(self, inputs: dict) -> torch.Tensor:
        from trl.trainer.utils import use_adapter

        tr = self.grpo
        t = time.perf_counter()
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with torch.no_grad(), use_adapter(self.model, adapter_name=None):
            ref, _, _ = tr._get_per_token_logps_and_entropies(self.model, ids, attn, inputs["completion_ids"].size(1))
        self.timers["frozen forwards (reference)"] = self.timers.get("frozen forwards (reference)", 0.0) + \
            time.perf_counter() - t
        self.model.train()
        return tr.compute_loss(self.model, {**inputs, "ref_per_token_logps": ref})

    def step(self, arm: str) -> None:
        self.timers = {}
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        for inputs in self.batches:
            t = time.perf_counter()
            if arm == "grpo":
                loss = self._grpo_micro(inputs)
            else:
                sd = {k: v for k, v in inputs.items() if k != "tool_mask"}  # SDPO has no tool mask
                loss = self.sdpo[1.0 if arm == "ved" else 2.0 / 3.0].compute_loss(self.model, sd)
            loss.backward()
            key = "student forward + loss + backward" + (" (+ teacher forward)" if arm != "grpo" else "")
            self.timers[key] = self.timers.get(key, 0.0) + time.perf_counter() - t
        if arm == "grpo":
            self.timers[key] -= self.timers["frozen forwards (reference)"]
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.opt.step()
        self.timers["clip + optimizer"] = time.perf_counter() - t


PROFILE_GROUPS = {
    "log-softmax over the vocabulary (fwd + bwd)": ("log_softmax", "logsumexp"),
    "attention (fwd + bwd)": ("scaled_dot_product", "attention"),
    "matrix products (fwd + bwd)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "optimizer": ("adamw", "_foreach", "clip_grad"),
}


def profile_step(side, arm: str) -> dict:
    """One step under torch.profiler: self CPU time by op group, and forward vs backward (autograd) time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        side.step(arm)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    groups = dict.fromkeys(PROFILE_GROUPS, 0.0)
    backward = 0.0
    for e in events:
        name = e.key.lower()
        for g, keys in PROFILE_GROUPS.items():
            if any(k.lower() in name for k in keys):
                groups[g] += e.self_cpu_time_total / 1e6
                break
        if "backward" in name:
            backward += e.self_cpu_time_total / 1e6
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return {"profiled_seconds": total, "op_groups_seconds": groups, "ops_named_backward_seconds": backward,
            "top_ops": {e.key: e.self_cpu_time_total / 1e6 for e in top}, "timers_seconds": dict(side.timers)}


def measure(args) -> dict:
    torch.manual_seed(args.seed)
    pol, scored = make_batch(args.policy, args.batch, args.seed, args.max_new_tokens)
    pad_id = pol.tokenizer.pad_token_id if pol.tokenizer.pad_token_id is not None else 0
    ours = Ours(pol.model, scored, pad_id, pol.device)
    with tempfile.TemporaryDirectory() as tmp:
        trl = TRL(args.policy, scored, pad_id, tmp)
        sides = {"ours": ours, "trl": trl}
        arms = [a for a in ARMS if a in args.arms.split(",")]
        n_tokens = sum(sum(s.mask) for s in scored)
        res: dict = {"arms": {}}
        for arm in arms:
            for name, side in sides.items():
                t = time.perf_counter()
                side.step(arm)  # warm-up
                print(f"  {arm} {name} warm-up: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            times: dict[str, list[float]] = {k: [] for k in sides}
            for rep in range(args.repeats):
                for name, side in sides.items():
                    t = time.perf_counter()
                    side.step(arm)
                    times[name].append(time.perf_counter() - t)
                    print(f"  {arm} {name} repeat {rep + 1}/{args.repeats}: {times[name][-1]:.1f} s", file=sys.stderr,
                          flush=True)
            r = {name: {"median_seconds": statistics.median(v), "seconds": v,
                        "tokens_per_s": n_tokens / statistics.median(v), "timers_seconds": sides[name].timers}
                 for name, v in times.items()}
            r["peer"] = {"grpo": "trl GRPOTrainer", "ved": "trl SDPOTrainer (distillation_weight 1)",
                         "grpo+ved": "trl SDPOTrainer (distillation_weight 2/3)"}[arm]
            r["ratio_tokens_per_s"] = r["ours"]["tokens_per_s"] / r["trl"]["tokens_per_s"]
            if args.profile:
                r["profile"] = {name: profile_step(side, arm) for name, side in sides.items()}
            res["arms"][arm] = r
    res["batch"] = {"trajectories": len(scored), "tokens": sum(len(s.ids) for s in scored), "assistant_tokens": n_tokens,
                    "longest": max(len(s.ids) for s in scored), "micro_batch": MICRO_BATCH}
    res["machine"] = machine_facts(pol)
    res["trl"] = {"version": __import__("trl").__version__, "gradient_checkpointing": trl.gradient_checkpointing,
                  "trainable_parameters": sum(p.numel() for p in trl.params),
                  "ours_trainable_parameters": sum(p.numel() for p in ours.params)}
    return res


NOTE = ("Same batch, same LoRA and initial adapter, same optimizer and clipping on both sides; tokens/s = the batch's "
        "assistant tokens per second of a whole step (frozen forwards, student forward, loss, backward, clip, AdamW). "
        "TRL's GRPO skips the pi_old forward (it uses the student's detached log-probs, exact for one update per batch) "
        "and scores only the completion positions through its fused LM head (chunked log-softmax); SDPO has no tool "
        "mask, so its loss also covers tool-response tokens (the same per-position work).")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny")
    ap.add_argument("--batch", type=int, default=16, help="trajectories in the timed batch")
    ap.add_argument("--max-new-tokens", type=int, default=384, help="per turn, for the rollouts that make the batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--micro-batch", type=int, default=None,
                    help=f"sequences per forward/backward on both sides (default {MICRO_BATCH}; SmolLM2's trainer uses 2)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    globals()["MICRO_BATCH"] = args.micro_batch or LossSettings().micro_batch
    res = measure(args)
    res = {"command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["peers_update.py", *argv]),
           "settings": vars(args), "note": NOTE, **res}
    b = res["batch"]
    print(f"batch: {b['trajectories']} trajectories, {b['tokens']} tokens ({b['assistant_tokens']} assistant), "
          f"micro-batch {b['micro_batch']}, {res['machine']['device']} {res['machine']['dtype']}")
    print(f"{'arm':9s} {'side':5s} {'s/step':>8s} {'tok/s':>9s}  peer")
    for arm, r in res["arms"].items():
        for side in ("ours", "trl"):
            print(f"{arm:9s} {side:5s} {r[side]['median_seconds']:8.2f} {r[side]['tokens_per_s']:9.0f}"
                  + (f"  {r['peer']}" if side == "trl" else ""))
        print(f"{arm:9s} ours/peer: {r['ratio_tokens_per_s']:.2f}x tokens/s (target 1.0x)")
        for side, p in r.get("profile", {}).items():
            groups = ", ".join(f"{k.split(' (')[0]} {v:.2f}" for k, v in p["op_groups_seconds"].items())
            print(f"    profile {side}: {p['profiled_seconds']:.2f} s op time; {groups}")
    out = args.out or str(Path(__file__).parent / "results" / f"peers_update_{Path(args.policy).name}.json")
    atomic_write_json(out, res)
    print(f"saved {out}")
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
