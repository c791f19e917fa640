"""Self-evolution: GRPO + Visual Experience Distillation with a LoRA student, one readable loop.

Each step: sample B prompts -> roll out K trajectories each with the student (batched engine) ->
render and judge -> mine best-vs-worst pairs -> summarise them into experiences -> bank ->
retrieve an experience for every trajectory's request (cosine gate) -> score tokens: the student
(with gradient), the same weights before the update (pi_old), the teacher (same weights, the guide in
the system prompt, no gradient) and the reference (adapter disabled, no gradient) -> L = L_GRPO +
lambda * L_VED -> one AdamW step on the LoRA weights -> metrics JSONL -> atomic checkpoint. For live
viewers it also writes the mined pairs and a student-vs-teacher probe on one fixed request, the same
at every step (:mod:`.live`); the probe is rolled out and scored apart from the batch, so it changes
neither the batch nor the gradients.

In training the teacher never rolls out: it re-scores the student's own sampled tokens in its
privileged context (only the probe shows what the teacher would write). The student never sees the
experience. Arms switch the two terms on and off (``use_grpo``, ``use_ved``) so ablations share every
other piece of code.

Several processes (``accelerate launch`` or ``torchrun``; one per GPU) split each step's prompts: each
rolls out, renders and judges its share, the shares are gathered so that every process mines the same
pairs and keeps the same bank, each computes the loss on its own trajectories (normalised over the
whole step), and the LoRA gradients are summed before the identical optimizer step. Only the main
process writes the run folder; the others keep their copy of the bank under ``.ranks/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import time
from functools import lru_cache
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..records import atomic_write_json, finite


@dataclass
class EvolveConfig:
    out: str = "runs/evolve"  # run folder: metrics, checkpoints, bank, adapter
    policy: str = "tiny"  # the SFT student: 'tiny' or a model folder
    use_grpo: bool = True
    use_ved: bool = True
    steps: int = 6
    prompts_per_step: int = 8  # B
    rollouts_per_prompt: int = 6  # K
    split: str = "evolve"
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 384
    lr: float = 1e-3
    lora_rank: int = 16
    lora_alpha: int = 32
    lambda_ved: float = 2.0
    delta_min: float = 0.20
    max_pairs: int = 8
    gate: float = 0.84
    capacity: int = 500
    top_frac: float = 0.10
    clip_low: float = 0.20
    clip_high: float = 0.28
    beta: float = 1e-3
    micro_batch: int = 8  # sequences per forward/backward
    grad_clip: float = 1.0
    seed: int = 0
    probe: bool = True  # write probe.json each step for live viewers (costs two rollouts per step, main process only)
    probe_request: str | None = None  # sandbox request id the probe follows (default: the split's first request)
    device: str | None = None
    dtype: str | None = None

    def validate(self) -> None:
        if not (self.use_grpo or self.use_ved):
            raise ValueError("at least one of use_grpo and use_ved must be on (SFT-only needs no training)")
        for name in ("steps", "prompts_per_step", "micro_batch", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.rollouts_per_prompt < 2:
            raise ValueError("rollouts_per_prompt (K) must be >= 2: GRPO and pair mining compare within a group")
        if not 0 <= self.delta_min <= 1 or not -1 <= self.gate <= 1:
            raise ValueError("delta_min is in [0, 1] and gate in [-1, 1]")
        if self.lambda_ved < 0:
            raise ValueError("lambda_ved must be >= 0")
        if self.probe_request is not None and not self.probe_request.strip():
            raise ValueError("probe_request is a sandbox request id (or None for the split's first request)")

    @property
    def arm(self) -> str:
        return {(True, True): "grpo+ved", (True, False): "grpo", (False, True): "ved"}[(self.use_grpo, self.use_ved)]


@dataclass
class Scored:
    """One trajectory's tensors for the update."""

    ids: list[int]
    mask: list[int]
    group: int
    advantage: float = 0.0
    teacher_ids: list[int] | None = None
    teacher_offset: int = 0  # teacher_ids[i + offset] == ids[i] for positions after the system block


class _Processes:
    """Data parallelism over the processes of ``accelerate launch`` / ``torchrun``; one process: no-ops."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = None
        if self.world > 1:
            from accelerate import PartialState

            state = PartialState()  # joins the process group: gloo on CPU, nccl on CUDA
            self.device = str(state.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _token_logprobs(model, seqs: list[list[int]], device, pad_id: int) -> list[torch.Tensor]:
    """Log-probability of every token given its prefix (position 0 gets 0), one tensor per sequence."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(seqs), n), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, device=device)
        attn[i, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    logp = torch.cat([torch.zeros(len(seqs), 1, device=device), logp], dim=1)
    return [logp[i, : len(s)] for i, s in enumerate(seqs)]


@lru_cache(maxsize=64)
def _encoded_system_block(tokenizer, content: str) -> tuple[int, ...]:
    """Token ids of a rendered system message (every trajectory of a step shares a handful of these)."""
    text = tokenizer.apply_chat_template([{"role": "system", "content": content}], tokenize=False)
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _system_block_len(tokenizer, base_prompt: str, ids: list[int]) -> int:
    """How many leading tokens of ``ids`` encode the student's system block (checked, not assumed)."""
    from ..protocol import system_prompt

    sys_ids = list(_encoded_system_block(tokenizer, system_prompt(None, base_prompt)))
    if ids[: len(sys_ids)] != sys_ids:
        raise ValueError("the token stream does not start with the rendered system block")
    return len(sys_ids)


def _teacher_prefix(tokenizer, guide: str, base_prompt: str) -> list[int]:
    """The teacher's system block: the same base prompt with the decision guide added."""
    from ..protocol import system_prompt

    return list(_encoded_system_block(tokenizer, system_prompt(guide, base_prompt)))


def _mean(xs: list[float | None]) -> float | None:
    """Mean of the defined values; None when there is none (a step whose cases all went unjudged)."""
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _std(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else None


def evolve(cfg: EvolveConfig, world=None, log: Callable[[str], None] = print,
           on_step: Callable[[dict], None] | None = None, stop: Callable[[], bool] | None = None) -> dict:
    """Run self-evolution; resumes from ``<out>/checkpoint`` when present. Returns the last metrics row.

    The run folder is locked while training: a second trainer there raises ``RunLockedError``.
    ``stop()`` is asked before every step; a stopped run resumes from its last checkpoint.
    """
    from .live import run_lock

    cfg.validate()
    procs = _Processes()
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with run_lock(cfg.out) if procs.main else contextlib.nullcontext():
        return _evolve(cfg, world, log if procs.main else (lambda _: None), on_step, stop, procs)


def _write_probe(out: Path, tok, step: int, request, traj, verdict, lp: dict, exp, sim: float, teacher, teacher_verdict,
                 use_ved: bool) -> None:
    """The live student-vs-teacher view of one trajectory (see :mod:`.live`)."""
    from ..experience import guide_text
    from .live import probe_record, token_rows, write_probe

    try:
        start = _system_block_len(tok, traj.system_prompt, traj.token_ids)
    except ValueError:
        start = 0
    q = lp["q"].tolist() if lp.get("q") is not None else None
    tokens = token_rows(tok, traj.token_ids, traj.assistant_mask, lp["p"].tolist(), q, start)
    note = ("" if q is not None else "no teacher: this arm trains without VED" if not use_ved
            else "no teacher: no experience passed the retrieval gate for the probe request")
    write_probe(out, probe_record(step, request, traj, verdict, tokens, exp.id if exp is not None else None,
                                  guide_text(exp) if exp is not None else None, sim if exp is not None else None,
                                  teacher, teacher_verdict, note))


def _probe_request(world, cfg: EvolveConfig):
    """The request the probe follows: ``cfg.probe_request`` or the training split's first request."""
    if cfg.probe_request is None:
        return world.split(cfg.split)[0]
    req = next((r for r in world.requests if r.id == cfg.probe_request), None)
    if req is None:
        raise ValueError(f"probe_request {cfg.probe_request!r} is not a sandbox request id "
                         f"(e.g. {world.split(cfg.split)[0].id})")
    return req


def _probe(req, pol, tools, scorer, store, bank, sp, seed: int, pad_id: int, use_ved: bool) -> tuple:
    """The student once on the probe request and, when an experience passes the gate for it, the teacher
    once (the guide in its system prompt); the student's tokens scored by the current weights (pi_old:
    called before the update) and by the teacher's context. No gradient, nothing shared with the batch.

    Returns (student, verdict, logprobs {"p", "q"}, experience or None, similarity, teacher, teacher verdict).
    """
    from ..experience import guide_text
    from ..rollout import rollout

    student = rollout([req], pol, tools, k=1, params=sp, seed=seed)[0]
    student.id += "-student"
    verdict = scorer.score(req, student, store, seed=student.seed)[1]
    exp, sim = bank.retrieve(req.text) if use_ved and len(bank) else (None, 0.0)
    teacher = teacher_verdict = None
    if exp is not None:
        teacher = rollout([req], pol, tools, k=1, params=sp, seed=seed, guides={req.id: guide_text(exp)})[0]
        teacher.id += "-teacher"
        teacher_verdict = scorer.score(req, teacher, store, seed=teacher.seed)[1]
    ids, tok = student.token_ids, pol.tokenizer
    lp: dict = {"p": torch.zeros(len(ids)), "q": None}
    if ids:
        with torch.no_grad():
            lp["p"] = _token_logprobs(pol.model, [ids], pol.device, pad_id)[0].cpu()
            if exp is not None:
                try:
                    n_sys = _system_block_len(tok, student.system_prompt, ids)
                except ValueError:  # a stream re-encoded differently: shown without the teacher's numbers
                    n_sys = None
                if n_sys is not None:
                    prefix = _teacher_prefix(tok, guide_text(exp), student.system_prompt)
                    q = _token_logprobs(pol.model, [prefix + ids[n_sys:]], pol.device, pad_id)[0]
                    lp["q"] = q[len(prefix) - n_sys :].cpu()  # aligned to the student's positions
    return student, verdict, lp, exp, sim, teacher, teacher_verdict


def _evolve(cfg: EvolveConfig, world, log: Callable[[str], None], on_step: Callable[[dict], None] | None,
            stop: Callable[[], bool] | None, procs: _Processes) -> dict:
    from peft import LoraConfig, PeftModel, get_peft_model

    from ..agent import Tools
    from ..evaluation import SandboxScorer
    from ..experience import ExperienceBank, guide_text, mine_pairs
    from ..guides import format_guide
    from ..policies.base import SamplingParams
    from ..policies.local import LocalPolicy
    from ..policies.resolve import resolve_policy
    from ..records import ImageStore, append_jsonl
    from ..rollout import rollout
    from ..summarise import SandboxSummariser, SummaryError
    from .live import append_rows
    from .losses import combined_loss, group_advantages, grpo_loss, ved_loss

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if procs.main:
        atomic_write_json(out / "config.json", asdict(cfg))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if world is None:
        from ..world import World

        world = World()
    pol: LocalPolicy = resolve_policy(cfg.policy, device=cfg.device or procs.device, dtype=cfg.dtype)
    model = pol.model
    ckpt = out / "checkpoint"
    if (ckpt / "adapter" / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(model, str(ckpt / "adapter"), is_trainable=True)
    else:
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                                 task_type="CAUSAL_LM"))
    pol.model = model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step0 = 0
    if (ckpt / "state.pt").exists():
        state = torch.load(ckpt / "state.pt", map_location=pol.device, weights_only=False)
        opt.load_state_dict(state["opt"])
        step0 = state["step"]
        torch.set_rng_state(state["rng"])
        log(f"resumed from step {step0}")
    bank_dir = out / "bank"
    if not procs.main:  # a private copy: the same experiences are added on every process, written once
        bank_dir = out / ".ranks" / f"r{procs.rank}" / "bank"
        shutil.rmtree(bank_dir, ignore_errors=True)
        if (out / "bank").exists():
            shutil.copytree(out / "bank", bank_dir)
    bank = ExperienceBank(bank_dir, capacity=cfg.capacity, gate=cfg.gate)
    if bank.load_errors:
        log(f"bank: set aside {len(bank.load_errors)} broken line(s)")
    tools, scorer = Tools.for_world(world), SandboxScorer(world)
    summariser = SandboxSummariser(world)
    store = ImageStore(out / "images")
    prompts = world.split(cfg.split)
    probe_req = _probe_request(world, cfg)  # checked on every process, so a bad id stops them all
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    tok = pol.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    sp = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    metrics_path = out / "metrics.jsonl"
    row: dict = {}

    for step in range(step0, cfg.steps):
        if any(procs.gather(bool(stop and stop()))):  # every process stops at the same step
            log("stop requested")
            break
        t_step = time.time()
        times: dict[str, float] = {}
        batch = [prompts[order[(step * cfg.prompts_per_step + i) % len(order)]] for i in range(cfg.prompts_per_step)]

        K = cfg.rollouts_per_prompt
        mine = [i for i in range(len(batch)) if i % procs.world == procs.rank]  # this process's prompts

        # 1. Rollouts with the student (adapter on, no guide).
        t = time.time()
        model.eval()
        trajs = rollout([batch[i] for i in mine], pol, tools, k=K, params=sp, seed=cfg.seed * 100_000 + step) if mine else []
        times["rollout"] = time.time() - t

        # 2. Render and judge (the scorer does both; the split is measured by the benchmark script).
        t = time.time()
        verdicts = [scorer.score(batch[mine[n // K]], tr, store, seed=tr.seed)[1] for n, tr in enumerate(trajs)]
        times["render_judge"] = time.time() - t
        if procs.world > 1:  # every process sees the whole step, in prompt order
            got = procs.gather([(i, trajs[j * K : (j + 1) * K], verdicts[j * K : (j + 1) * K]) for j, i in enumerate(mine)])
            by_prompt = {i: (ts, vs) for part in got for i, ts, vs in part}
            trajs = [tr for i in range(len(batch)) for tr in by_prompt[i][0]]
            verdicts = [v for i in range(len(batch)) for v in by_prompt[i][1]]
        if procs.main:
            with (out / "trajectories.jsonl").open("a", encoding="utf-8") as fh:
                for tr in trajs:
                    fh.write(tr.model_dump_json(exclude={"token_ids", "assistant_mask", "token_logprobs"}) + "\n")
            for v in verdicts:
                append_jsonl(out / "verdicts.jsonl", v)
        groups = [list(zip(trajs[i * K : (i + 1) * K], verdicts[i * K : (i + 1) * K])) for i in range(len(batch))]

        # 3. Mine pairs, summarise, bank.
        t = time.time()
        new_exps, summary_errors, pair_rows = [], [], []
        if cfg.use_ved:
            for pair in mine_pairs(groups, cfg.delta_min, cfg.max_pairs):
                pair_row = {"step": step + 1, "request_id": pair.request_id, "request": pair.request_text, "best": pair.best.id,
                            "worst": pair.worst.id, "best_reward": pair.best_verdict.reward,
                            "worst_reward": pair.worst_verdict.reward, "gap": pair.gap, "passed_over": pair.passed_over,
                            "experience": None}
                pair_rows.append(pair_row)
                try:
                    slots = summariser.summarise(pair)
                except SummaryError as exc:
                    summary_errors.append(str(exc))
                    pair_row["error"] = str(exc)
                    continue
                exp = bank.add(pair.request_id, pair.request_text, slots, reward_gap=pair.gap, run_id=out.name, step=step,
                               best_trajectory=pair.best.id, worst_trajectory=pair.worst.id, summariser=summariser.name)
                new_exps.append(exp)
                pair_row["experience"] = exp.id
        if procs.main:
            append_rows(out / "pairs.jsonl", pair_rows)
        times["mine_summarise"] = time.time() - t

        # 4. Advantages and retrieval.
        # A case that could not be judged (reward None) gets its group's mean of the judged ones: advantage 0.
        judged = [[v.reward for _, v in g if v.reward is not None] for g in groups]
        rewards_PG = torch.tensor([[v.reward if v.reward is not None else (sum(j) / len(j) if j else 0.0) for _, v in g]
                                   for g, j in zip(groups, judged)], dtype=torch.float32)
        adv_PG = group_advantages(rewards_PG)
        n_unjudged = sum(v.reward is None for v in verdicts)
        scored: list[Scored] = []
        hits = 0
        teacher_errors: list[str] = []
        t = time.time()
        for gi, g in enumerate(groups):
            exp, _ = bank.retrieve(batch[gi].text) if cfg.use_ved and len(bank) else (None, 0.0)
            for j, (tr, _) in enumerate(g):
                if not tr.token_ids or not any(tr.assistant_mask):
                    continue
                s = Scored(tr.token_ids, tr.assistant_mask, gi, float(adv_PG[gi, j]))
                if exp is not None:
                    try:
                        n_sys = _system_block_len(tok, tr.system_prompt, tr.token_ids)
                    except ValueError as exc:  # a stream that was re-encoded differently: no teacher for it
                        teacher_errors.append(f"{tr.id}: {exc}")
                    else:
                        hits += 1
                        t_prefix = _teacher_prefix(tok, guide_text(exp), tr.system_prompt)
                        s.teacher_ids = t_prefix + tr.token_ids[n_sys:]
                        s.teacher_offset = len(t_prefix) - n_sys
                scored.append(s)
        n_scored, n_tokens = len(scored), sum(sum(s.mask) for s in scored)  # the whole step's, for normalising
        scored = [s for s in scored if s.group % procs.world == procs.rank]  # this process's share of the update
        times["retrieve"] = time.time() - t

        # 4b. Probe for live viewers: the student and the teacher on the fixed probe request, with this step's
        # weights before the update (main process only; apart from the batch).
        t = time.time()
        probe = (_probe(probe_req, pol, tools, scorer, store, bank, sp, cfg.seed * 100_000 + step, pad_id, cfg.use_ved)
                 if cfg.probe and procs.main else None)
        times["probe"] = time.time() - t

        # 5. Score tokens and update: student (grad), pi_old / teacher / reference (no grad).
        model.train()
        opt.zero_grad(set_to_none=True)
        agg = {"grpo": 0.0, "ved": 0.0, "kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "ved_tokens": 0, "mean_gap": 0.0,
               "g2_grpo": 0.0, "g2_ved": 0.0}
        t_teacher = t_update = 0.0
        for c in range(0, len(scored), cfg.micro_batch):
            mb = scored[c : c + cfg.micro_batch]
            seqs = [s.ids for s in mb]
            t = time.time()
            with torch.no_grad():
                model.eval()
                old = _token_logprobs(model, seqs, pol.device, pad_id)
                ref = None
                if cfg.use_grpo and cfg.beta:
                    with model.disable_adapter():
                        ref = _token_logprobs(model, seqs, pol.device, pad_id)
                teach = [None] * len(mb)
                tmb = [i for i, s in enumerate(mb) if s.teacher_ids is not None]
                if cfg.use_ved and tmb:
                    tl = _token_logprobs(model, [mb[i].teacher_ids for i in tmb], pol.device, pad_id)
                    for i, lp in zip(tmb, tl):
                        teach[i] = lp[mb[i].teacher_offset :]  # aligned to the student's positions after the system block
            t_teacher += time.time() - t
            t = time.time()
            model.train()
            cur = _token_logprobs(model, seqs, pol.device, pad_id)
            n = max(len(x) for x in seqs)

            def pad(xs, fill=0.0):
                out = torch.full((len(xs), n), fill, device=pol.device)
                for i, x in enumerate(xs):
                    out[i, : len(x)] = x if torch.is_tensor(x) else torch.tensor(x, dtype=torch.float32, device=pol.device)
                return out

            logp, logp_old = pad(cur), pad(old)
            mask = pad([s.mask for s in mb])
            weight = float(mask.sum()) / max(n_tokens, 1)  # token-level mean over the whole batch
            terms_grpo = terms_ved = None
            if cfg.use_grpo:
                adv = torch.tensor([s.advantage for s in mb], device=pol.device)
                terms_grpo, gs = grpo_loss(logp, logp_old, pad(ref) if ref is not None else None, adv, mask,
                                           cfg.clip_low, cfg.clip_high, cfg.beta)
                for k_, v_ in (("grpo", gs.pg_loss), ("kl", gs.kl), ("clip_low", gs.clip_low_frac), ("clip_high", gs.clip_high_frac)):
                    agg[k_] += v_ * weight
            if cfg.use_ved and tmb:
                rows = [i for i in range(len(mb)) if teach[i] is not None]
                logq = torch.zeros_like(logp)
                vmask = torch.zeros_like(mask)
                for i in rows:
                    # The teacher's stream is longer only by its system block: positions line up after it.
                    L = min(len(teach[i]), len(mb[i].ids))
                    logq[i, :L] = teach[i][:L]
                    vmask[i, :L] = mask[i, :L]
                terms_ved, vs = ved_loss(logp, logq, logp_old, vmask, cfg.top_frac)
                agg["ved"] += vs.loss * len(rows) / max(hits, 1)
                agg["ved_tokens"] += vs.selected
                agg["mean_gap"] += vs.mean_gap * len(rows) / max(hits, 1)
            if terms_grpo is None and terms_ved is None:
                continue
            loss_grpo = terms_grpo * weight if terms_grpo is not None else None
            loss_ved = terms_ved * (len(tmb) / max(hits, 1)) if terms_ved is not None else None
            # How hard each term pulls on the sampled tokens' log-probs (cheap: the loss functions only, not the
            # model): shows in the metrics whether one term drowns the other.
            for key, term, w in (("g2_grpo", loss_grpo, 1.0), ("g2_ved", loss_ved, cfg.lambda_ved)):
                if term is not None:
                    agg[key] += float((w * torch.autograd.grad(term, logp, retain_graph=True)[0]).pow(2).sum())
            loss = combined_loss(loss_grpo, loss_ved, cfg.lambda_ved)
            loss.backward()
            t_update += time.time() - t
        t = time.time()
        procs.sum_grads(params)  # each process's loss is already normalised over the whole step
        if procs.world > 1:
            agg = {k_: sum(a[k_] for a in procs.gather(agg)) for k_ in agg}
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) if params else 0.0
        opt.step()
        t_update += time.time() - t
        times["teacher_scoring"] = t_teacher
        times["update"] = t_update
        model.eval()

        gen_tokens = sum(sum(tr.assistant_mask) for tr in trajs)
        if procs.world > 1:  # the replicas must agree after the summed-gradient step
            with torch.no_grad():
                replicas = procs.gather(float(sum(p.double().sum() for p in params)))
        row = {
            "step": step + 1, "arm": cfg.arm, "reward_mean": _mean([v.reward for v in verdicts]),
            "reward_std": _std([v.reward for v in verdicts]), "kscore_mean": _mean([v.kscore for v in verdicts]),
            "unjudged": n_unjudged,
            "protocol_valid": sum(1 for tr in trajs if tr.termination == "answer" and not any(t_.error for t_ in tr.turns)) / len(trajs),
            "grpo_loss": agg["grpo"], "ved_loss": agg["ved"], "kl_ref": agg["kl"], "clip_low_frac": agg["clip_low"],
            "clip_high_frac": agg["clip_high"], "ved_tokens": agg["ved_tokens"], "teacher_student_gap": agg["mean_gap"],
            "retrieval_hit_rate": hits / max(n_scored, 1), "bank_size": len(bank), "new_experiences": len(new_exps),
            "summary_errors": len(summary_errors), "guesses_passed_over": sum(r["passed_over"] for r in pair_rows), "teacher_errors": len(teacher_errors), "grad_norm": finite(gnorm),
            "logp_grad_norm_grpo": agg["g2_grpo"] ** 0.5, "logp_grad_norm_ved": agg["g2_ved"] ** 0.5,
            "tokens_per_s": (gen_tokens + n_tokens) / max(time.time() - t_step, 1e-9),
            "seconds": time.time() - t_step, **{f"t_{k_}": v_ for k_, v_ in times.items()},
        }
        if procs.world > 1:
            row["processes"], row["replica_checksums"] = procs.world, replicas
        if not procs.main:
            procs.barrier()  # wait for the main process's checkpoint
            continue
        with metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, allow_nan=False) + "\n")
        if probe is not None:
            student, verdict, lp, exp, sim, teacher, teacher_verdict = probe
            _write_probe(out, tok, step + 1, probe_req, student, verdict, lp, exp, sim, teacher, teacher_verdict, cfg.use_ved)
        # Atomic checkpoint: adapter + optimizer + step, then swapped in.
        tmp = out / "checkpoint.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        model.save_pretrained(tmp / "adapter")
        torch.save({"opt": opt.state_dict(), "step": step + 1, "rng": torch.get_rng_state()}, tmp / "state.pt")
        if ckpt.exists():
            shutil.rmtree(ckpt)
        tmp.rename(ckpt)
        procs.barrier()
        r_, k_ = (f"{x:.3f}" if x is not None else "-" for x in (row["reward_mean"], row["kscore_mean"]))
        log(f"step {step + 1}/{cfg.steps} [{cfg.arm}] reward {r_} kscore {k_} "
            f"ved {row['ved_loss']:.4f} grpo {row['grpo_loss']:+.4f} hit {row['retrieval_hit_rate']:.2f} "
            f"bank {row['bank_size']} ({row['seconds']:.0f}s)")
        if on_step:
            on_step(row)
    return row
