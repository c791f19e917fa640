"""Cost of a VED training step, and where a self-evolution step spends its time.

Part 1 (same batch, same LoRA student, one run): tokens/s of
  - a plain cross-entropy step on the sampled assistant tokens (forward + backward + AdamW step);
  - a VED step: the teacher's no-grad forward over the guide-patched stream, the pi_old forward,
    then the student's forward + sampled-token VED loss + backward + step;
  - a GRPO + VED step, which adds the reference forward (adapter disabled).
The ratio VED / CE says what the privileged teacher costs in training throughput.

Part 2: a short ``evolve`` run (GRPO + VED) whose per-step timings give the share of wall time in
rollouts, rendering, judging, teacher scoring and the update. The trainer times render + judge
together; the split between them is measured here by re-rendering and re-judging the run's programs.

Prints and saves ``benchmarks/results/ved_step[_<policy>].json``.

    .venv/bin/python benchmarks/ved_step.py [--policy tiny] [--batch 16] [--repeats 5] [--steps 2 -B 4 -K 4]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from genevolve.agent.loop import Tools
from genevolve.agent.guides import oracle_guide
from genevolve.policies.base import SamplingParams
from genevolve.policies.resolve import resolve_policy
from genevolve.records.schema import atomic_write_json
from genevolve.agent.rollout import rollout
from genevolve.agent.teacher import teacher_stream
from genevolve.training.checkpoint import LORA_TARGETS
from genevolve.training.evolve import EvolveConfig, evolve
from genevolve.training.update import LossSettings, Scored, accumulate_gradients, token_logprobs
from genevolve.world import World


def _pad(xs, n, device):
    out = torch.zeros((len(xs), n), device=device)
    for i, x in enumerate(xs):
        out[i, : len(x)] = x if torch.is_tensor(x) else torch.tensor(x, dtype=torch.float32, device=device)
    return out


def step_costs(policy: str, batch: int, repeats: int, seed: int) -> dict:
    from peft import LoraConfig, get_peft_model

    w = World()
    pol = resolve_policy(policy)
    reqs = w.split("evolve")[:batch]
    trajs = rollout(reqs, pol, Tools.for_world(w), k=1, params=SamplingParams(temperature=0.7, max_new_tokens=384), seed=seed)
    tok, dev = pol.tokenizer, pol.device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs = [t.token_ids for t in trajs]
    masks = [t.assistant_mask for t in trajs]
    adv = torch.randn(len(seqs)).tolist()
    scored = []
    for r, t, a in zip(reqs, trajs, adv):  # the teacher reads each trajectory behind its request's oracle guide
        teacher_ids, offset = teacher_stream(tok, oracle_guide(w, r), t.system_prompt, t.token_ids)
        scored.append(Scored(t.token_ids, t.assistant_mask, 0, a, teacher_ids, offset))
    model = get_peft_model(pol.model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=LORA_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    n = max(len(s) for s in seqs)
    mask = _pad(masks, n, dev)
    n_tokens = int(mask.sum())

    def ce_step():
        model.train()
        logp = _pad(token_logprobs(model, seqs, dev, pad_id), n, dev)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def ved_step(with_grpo: bool):
        """The trainer's own update (:func:`accumulate_gradients`) over the whole batch in one micro-batch."""
        settings = LossSettings(use_grpo=with_grpo, use_ved=True, micro_batch=len(scored))
        model.train()
        opt.zero_grad(set_to_none=True)
        accumulate_gradients(model, scored, settings, dev, pad_id, n_tokens, len(scored))
        opt.step()

    arms = {"cross-entropy": ce_step, "ved": lambda: ved_step(False), "grpo+ved": lambda: ved_step(True)}
    times: dict[str, list[float]] = {k: [] for k in arms}
    for fn in arms.values():  # warm-up
        fn()
    for _ in range(repeats):  # interleaved, so drift hits every arm alike
        for name, fn in arms.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    total_tokens = sum(len(s) for s in seqs)
    return {
        "policy": policy, "device": str(dev), "sequences": len(seqs), "tokens": total_tokens, "assistant_tokens": n_tokens,
        "median_seconds": med,
        "tokens_per_s": {k: total_tokens / v for k, v in med.items()},
        "ratio_ved_vs_ce": med["cross-entropy"] / med["ved"],
        "ratio_grpo_ved_vs_ce": med["cross-entropy"] / med["grpo+ved"],
    }


def time_shares(policy: str, steps: int, b: int, k: int, seed: int) -> dict:
    from genevolve.evaluation.bench import SandboxScorer
    from genevolve.records.schema import read_jsonl, Trajectory
    from genevolve.world.scene import Scene

    w = World()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = EvolveConfig(out=str(Path(tmp) / "run"), policy=policy, steps=steps, prompts_per_step=b, rollouts_per_prompt=k,
                           seed=seed)
        t0 = time.time()
        evolve(cfg, world=w, log=lambda _: None)
        wall = time.time() - t0
        rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        trajs = read_jsonl(Path(cfg.out) / "trajectories.jsonl", Trajectory)
    # Split render + judge by timing each on the same programs.
    scorer, by_id = SandboxScorer(w), {r.id: r for r in w.requests}
    t_render = t_judge = 0.0
    for tr in trajs:
        req = by_id[tr.request_id]
        if tr.program is None or req.scene is None:
            continue
        refs, _, _ = scorer._reference_images(tr)
        t = time.perf_counter()
        img = w.generator.generate(tr.program.gen_prompt, refs, seed=tr.seed)
        t_render += time.perf_counter() - t
        t = time.perf_counter()
        w.judge.judge(img, Scene.from_dict(req.scene), w.gt_image(req))
        t_judge += time.perf_counter() - t
    rj = sum(r["t_render_judge"] for r in rows)
    parts = {
        "rollouts": sum(r["t_rollout"] for r in rows),
        "rendering": rj * t_render / max(t_render + t_judge, 1e-9),
        "judging": rj * t_judge / max(t_render + t_judge, 1e-9),
        "mining+summarising": sum(r.get("t_mine_summarise", 0.0) for r in rows),
        "retrieval": sum(r.get("t_retrieve", 0.0) for r in rows),
        "teacher scoring": sum(r["t_teacher_scoring"] for r in rows),
        "live probe": sum(r.get("t_probe", 0.0) for r in rows),
        "update": sum(r["t_update"] for r in rows),
    }
    step_total = sum(r["seconds"] for r in rows)
    parts["other"] = max(step_total - sum(parts.values()), 0.0)
    return {"steps": len(rows), "B": b, "K": k, "wall_s": wall, "step_seconds": step_total,
            "seconds": parts, "share": {k_: v / step_total for k_, v in parts.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default="tiny")
    ap.add_argument("--batch", type=int, default=16, help="trajectories in the timed batch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="evolve steps for the time shares (0: skip part 2)")
    ap.add_argument("-B", type=int, default=4)
    ap.add_argument("-K", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    res = {"step_costs": step_costs(args.policy, args.batch, args.repeats, args.seed)}
    c = res["step_costs"]
    print(f"batch: {c['sequences']} trajectories, {c['tokens']} tokens ({c['assistant_tokens']} sampled), device {c['device']}")
    for k, v in c["tokens_per_s"].items():
        print(f"  {k:14s} {v:9.0f} tokens/s   ({c['median_seconds'][k] * 1000:.0f} ms/step, median of {args.repeats})")
    print(f"  VED / CE throughput ratio: {c['ratio_ved_vs_ce']:.2f}   GRPO+VED / CE: {c['ratio_grpo_ved_vs_ce']:.2f}")
    if args.steps:
        res["time_shares"] = s = time_shares(args.policy, args.steps, args.B, args.K, args.seed)
        print(f"evolve {s['steps']} steps x {s['B']} prompts x {s['K']} rollouts: {s['step_seconds']:.1f} s in steps")
        for k, v in s["share"].items():
            print(f"  {k:20s} {100 * v:5.1f} %  ({s['seconds'][k]:.1f} s)")
    name = "ved_step.json" if args.policy == "tiny" else f"ved_step_{Path(args.policy).name}.json"
    out = Path(__file__).parent / "results" / name
    atomic_write_json(out, res)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
