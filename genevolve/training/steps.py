"""The named steps of one self-evolution step; :func:`genevolve.training.evolve.evolve` runs them in order.

collect rollouts -> judge -> mine and summarise -> retrieve (update targets) -> update -> record.
Every function takes the :class:`Run` (what stays fixed across steps) and the step's data.
"""

from __future__ import annotations

import random
import shutil
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..records.live import MetricsRow, append_metrics
from ..records.schema import atomic_write_json, finite
from ..agent.teacher import teacher_stream
from . import checkpoint
from . import probe as probes
from .parallel import Processes
from .timing import PhaseTimer
from .update import LossSettings, Scored, accumulate_gradients


@dataclass
class Run:
    """A trainer's fixed parts: the config, the student and its optimizer, the bank, the sandbox."""

    cfg: Any  # EvolveConfig
    out: Path
    procs: Processes
    log: Callable[[str], None]
    pol: Any
    opt: torch.optim.Optimizer
    params: list[torch.Tensor]
    step0: int
    bank: Any
    tools: Any
    scorer: Any
    summariser: Any
    store: Any
    prompts: list
    order: list[int]
    probe_req: Any
    sp: Any
    pad_id: int
    progress: Callable[..., None] = lambda *a, **k: None  # (step, phase, done, total) -> progress.json (main process)

    @property
    def model(self):
        return self.pol.model

    @property
    def loss(self) -> LossSettings:
        c = self.cfg
        return LossSettings(c.use_grpo, c.use_ved, c.lambda_ved, c.top_frac, c.clip_low, c.clip_high, c.beta, c.micro_batch)


@dataclass
class Mined:
    experiences: list = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    pair_rows: list = field(default_factory=list)  # PairRecord
    merged: list = field(default_factory=list)  # experiences a consolidation made (or grew) this step


@dataclass
class Targets:
    """What the update trains on: this process's share of the scored trajectories and the step's totals."""

    scored: list[Scored]
    n_scored: int
    n_tokens: int
    hits: int
    teacher_errors: list[str]


RESUME_FREE = ("out", "device", "dtype", "micro_batch", "probe", "probe_request", "steps", "report_to")  # may change on a resume


def check_same_config(out: Path, cfg) -> None:
    """A resume must train what the run trained: refuse, naming the settings, when the config differs."""
    import json

    saved_path = out / "config.json"
    if not saved_path.exists() or not ((out / "checkpoint").exists() or (out / checkpoint.START).exists()):
        return
    try:
        saved = json.loads(saved_path.read_text("utf-8"))
    except ValueError as exc:
        raise ValueError(f"{saved_path} is not valid JSON ({exc}): the run cannot be resumed; start a new one") from None
    now = asdict(cfg)
    differ = [f"{k}: {saved.get(k)!r} in the run, {now[k]!r} now" for k in now
              if k not in RESUME_FREE and k in saved and saved[k] != now[k]]
    if differ:
        raise ValueError(f"{out} was trained with other settings, so it cannot be resumed with these ("
                         + "; ".join(differ) + "). Use the run's settings, another --out, or --force-new to start it again")


def _bank(cfg, out: Path, procs: Processes):
    from ..experience.bank import ExperienceBank

    bank_dir = out / "bank"
    if not procs.main:  # a private copy: the same experiences are added on every process, written once
        bank_dir = out / ".ranks" / f"r{procs.rank}" / "bank"
        shutil.rmtree(bank_dir, ignore_errors=True)
        if (out / "bank").exists():
            shutil.copytree(out / "bank", bank_dir)
    bank = ExperienceBank(bank_dir, capacity=cfg.capacity, gate=cfg.gate, key=cfg.retrieval_key)
    if procs.main:  # the trainer's own writes, journaled so that a resume undoes exactly those
        from ..experience.journal import NAME, Journal

        bank.journal = Journal(out / NAME)
    return bank


def setup(cfg, world, procs: Processes, log: Callable[[str], None]) -> Run:
    """Seed, load the student with its adapter (resumed from the checkpoint when there is one), open the bank."""
    from ..agent.loop import Tools
    from ..evaluation.bench import SandboxScorer
    from ..policies.base import SamplingParams
    from ..policies.resolve import resolve_policy
    from ..records.schema import ImageStore
    from ..experience.summarise import SandboxSummariser

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if procs.main:
        check_same_config(out, cfg)
        checkpoint.recover(out, log)
        checkpoint.roll_back(out, out / "bank" / "experiences.jsonl", log)  # a cut-short step leaves nothing behind
        checkpoint.mark_start(out)
        atomic_write_json(out / "config.json", asdict(cfg))
    procs.barrier()  # the other processes copy the bank once it is rolled back
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if world is None:
        from ..world import World

        world = World()
    pol = resolve_policy(cfg.policy, device=cfg.device or procs.device, dtype=cfg.dtype)
    pol.model = checkpoint.attach_adapter(pol.model, out / "checkpoint", cfg.lora_rank, cfg.lora_alpha)
    params = [p for p in pol.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step0 = checkpoint.restore(out / "checkpoint", opt, pol.device, log)
    bank = _bank(cfg, out, procs)
    for line in bank.load_errors:  # named by file and line; the first write sets them aside
        log(f"bank: broken line set aside: {line}")
    prompts = world.split(cfg.split)
    probe_req = probes.probe_request(world, cfg.probe_request, cfg.split)  # checked on every process: a bad id stops all
    if probe_req is None and cfg.probe:
        probe_req = probes.earlier_request(out, prompts)  # a resumed run follows the request it followed
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    tok = pol.tokenizer
    run = Run(cfg, out, procs, log, pol, opt, params, step0, bank, Tools.for_world(world), SandboxScorer(world),
              SandboxSummariser(world), ImageStore(out / "images"), prompts, order, probe_req,
              SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens),
              tok.pad_token_id if tok.pad_token_id is not None else 0)
    if procs.main:
        from ..records.live import ProgressWriter

        run.progress = ProgressWriter(out, cfg.steps)
    return run


def prompts_for(run: Run, step: int) -> list:
    """The step's B prompts: the split in a seeded order, wrapping around."""
    b, order = run.cfg.prompts_per_step, run.order
    return [run.prompts[order[(step * b + i) % len(order)]] for i in range(b)]


def probe_seed(run: Run, step: int) -> int:
    return run.cfg.seed * 100_000 + step


def collect_rollouts(run: Run, requests: list, step: int, probe_plan=None) -> tuple[list, list]:
    """K trajectories per request with the student (adapter on, no guide), and in the same batch the
    probe's episodes when ``probe_plan`` has any; returns (the batch's, the probe's)."""
    from ..agent.rollout import episodes_for, run_episodes

    run.model.eval()
    extra = list(probe_plan.episodes) if probe_plan is not None else []
    eps = episodes_for(requests, run.pol, run.tools, k=run.cfg.rollouts_per_prompt, seed=probe_seed(run, step))
    if not eps and not extra:
        return [], []
    total = len(eps) + len(extra)
    run.progress(step + 1, "rollouts", 0, total)
    trajs = run_episodes(eps + extra, run.pol, run.sp, on_turn=lambda done, n: run.progress(step + 1, "rollouts", done, n))
    return trajs[: len(eps)], trajs[len(eps) :]


def judge(run: Run, requests: list, trajs: list, step: int = 0) -> list:
    """Render and judge each trajectory (the scorer does both)."""
    k, out = run.cfg.rollouts_per_prompt, []
    for n, tr in enumerate(trajs):
        run.progress(step + 1, "judging", n, len(trajs))
        out.append(run.scorer.score(requests[n // k], tr, run.store, seed=tr.seed)[1])
    return out


def record_cases(run: Run, trajs: list, verdicts: list) -> None:
    """Append the step's trajectories (without token tensors) and verdicts to the run folder."""
    from ..records.schema import append_jsonl

    if not run.procs.main:
        return
    with (run.out / "trajectories.jsonl").open("a", encoding="utf-8") as fh:
        for tr in trajs:
            fh.write(tr.model_dump_json(exclude={"token_ids", "assistant_mask", "token_logprobs"}) + "\n")
    for v in verdicts:
        append_jsonl(run.out / "verdicts.jsonl", v)


def groups_of(trajs: list, verdicts: list, n: int, k: int) -> list[list[tuple]]:
    """(trajectory, verdict) pairs, one group of ``k`` for each of the ``n`` prompts."""
    return [list(zip(trajs[i * k : (i + 1) * k], verdicts[i * k : (i + 1) * k])) for i in range(n)]


def mine_and_summarise(run: Run, groups: list, step: int) -> Mined:
    """Best-vs-worst pairs -> experiences in the bank (VED arms only); one logged row per pair."""
    from ..experience.bank import mine_pairs
    from ..records.live import PairRecord, append_pairs
    from ..experience.summarise import SummaryError

    cfg, mined = run.cfg, Mined()
    if cfg.use_ved:
        for pair in mine_pairs(groups, cfg.delta_min, cfg.max_pairs):
            row = PairRecord(step=step + 1, request_id=pair.request_id, request=pair.request_text, best=pair.best.id,
                             worst=pair.worst.id, best_reward=pair.best_verdict.reward,
                             worst_reward=pair.worst_verdict.reward, gap=pair.gap, passed_over=pair.passed_over)
            mined.pair_rows.append(row)
            try:
                summary = run.summariser.summarise(pair)
            except SummaryError as exc:
                mined.errors.append(str(exc))
                row.error = str(exc)
                continue
            exp = run.bank.add(pair.request_id, pair.request_text, summary.slots, reward_gap=pair.gap,
                               retrieval_key=summary.key, run_id=run.out.name, step=step + 1,
                               best_trajectory=pair.best.id, worst_trajectory=pair.worst.id,
                               summariser=run.summariser.name)
            mined.experiences.append(exp)
            row.experience = exp.id
        if cfg.consolidate and mined.experiences:
            mined.merged = run.bank.consolidate()
            into = {m.id: e.id for e in mined.merged for m in e.merged_from}
            for row in mined.pair_rows:  # a pair's experience may now live inside a merged one
                if row.experience in into:
                    row.experience = into[row.experience]
    if run.procs.main:
        append_pairs(run.out / "pairs.jsonl", mined.pair_rows)
    return mined


def advantages(groups: list) -> torch.Tensor:
    """Group-relative advantages [prompts, K]; an unjudged case gets its group's mean reward: advantage 0."""
    from .losses import group_advantages

    judged = [[v.reward for _, v in g if v.reward is not None] for g in groups]
    rewards_PG = torch.tensor([[v.reward if v.reward is not None else (sum(j) / len(j) if j else 0.0) for _, v in g]
                               for g, j in zip(groups, judged)], dtype=torch.float32)
    return group_advantages(rewards_PG)


def update_targets(run: Run, batch: list, groups: list) -> Targets:
    """Every trajectory with tokens, its advantage and, when its request retrieves an experience, the
    teacher's stream over its tokens; then this process's share."""
    from ..experience.bank import guide_text

    cfg, tok, adv_PG = run.cfg, run.pol.tokenizer, advantages(groups)
    scored, hits, errors = [], 0, []
    for gi, g in enumerate(groups):
        exp, _ = run.bank.retrieve(batch[gi].text) if cfg.use_ved and len(run.bank) else (None, 0.0)
        for j, (tr, _) in enumerate(g):
            if not tr.token_ids or not any(tr.assistant_mask):
                continue
            s = Scored(tr.token_ids, tr.assistant_mask, gi, float(adv_PG[gi, j]))
            if exp is not None:
                try:
                    s.teacher_ids, s.teacher_offset = teacher_stream(tok, guide_text(exp), tr.system_prompt, tr.token_ids)
                    hits += 1
                except ValueError as exc:  # a stream that was re-encoded differently: no teacher for it
                    errors.append(f"{tr.id}: {exc}")
            scored.append(s)
    n_tokens = sum(sum(s.mask) for s in scored)  # the whole step's, for normalising
    mine = [s for s in scored if s.group % run.procs.world == run.procs.rank]
    return Targets(mine, len(scored), n_tokens, hits, errors)


def probe_plan(run: Run, step: int, batch: list):
    """The probe's episodes for this step's batch rollout (main process, once its request is known), or None."""
    if not (run.cfg.probe and run.procs.main) or run.probe_req is None:
        return None
    return probes.plan(run.probe_req, run.pol, run.tools, run.bank, probe_seed(run, step), run.cfg.use_ved,
                       {r.id for r in batch})


def probe(run: Run, step: int, batch: list, trajs: list, verdicts: list, plan, probe_trajs: list):
    """The live probe with this step's weights before the update (main process only), or None: finished
    from its share of the batch rollout, or, when its request is picked from this (the first) step's
    batch and what it mined, rolled out now (:mod:`.probe`)."""
    if not (run.cfg.probe and run.procs.main):
        return None
    k = run.cfg.rollouts_per_prompt
    if plan is not None:
        return probes.finish(plan, probe_trajs, batch, trajs, verdicts, k, run.pol, run.scorer, run.store, run.pad_id)
    run.probe_req = probes.auto_request(run.out, batch, run.prompts, run.bank)
    return probes.run_probe(run.probe_req, run.pol, run.tools, run.scorer, run.store, run.bank, run.sp,
                            probe_seed(run, step), run.pad_id, run.cfg.use_ved, batch, trajs, verdicts, k)


def update(run: Run, targets: Targets, timer: PhaseTimer) -> dict[str, Any]:
    """Back-propagate the step's loss, sum gradients over processes, clip, one AdamW step."""
    import time

    run.model.train()
    run.opt.zero_grad(set_to_none=True)
    stats = accumulate_gradients(run.model, targets.scored, run.loss, run.pol.device, run.pad_id,
                                 targets.n_tokens, targets.hits)
    t = time.time()
    run.procs.sum_grads(run.params)  # each process's loss is already normalised over the whole step
    times = {k: stats.pop(k) for k in ("teacher_seconds", "update_seconds")}
    stats = run.procs.sum_stats(stats)
    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip)) if run.params else 0.0
    run.opt.step()
    timer.add("teacher_scoring", times["teacher_seconds"])
    timer.add("update", times["update_seconds"] + time.time() - t)
    run.model.eval()
    if run.procs.world > 1:  # the replicas must agree after the summed-gradient step
        with torch.no_grad():
            stats["replicas"] = run.procs.gather(float(sum(p.double().sum() for p in run.params)))
    return stats


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _std(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else None


def metrics_row(run: Run, step: int, trajs: list, verdicts: list, mined: Mined, targets: Targets,
                stats: dict[str, Any], timer: PhaseTimer, probe_result=None) -> MetricsRow:
    """The step's row of ``metrics.jsonl``."""
    rewards = [v.reward for v in verdicts]
    gen_tokens = sum(sum(tr.assistant_mask) for tr in trajs)
    valid = sum(1 for tr in trajs if tr.termination == "answer" and not any(t.error for t in tr.turns))
    row = {
        "step": step + 1, "arm": run.cfg.arm, "reward_mean": _mean(rewards), "reward_std": _std(rewards),
        "kscore_mean": _mean([v.kscore for v in verdicts]), "unjudged": sum(r is None for r in rewards),
        "protocol_valid": valid / len(trajs),
        "grpo_loss": stats["grpo"], "ved_loss": stats["ved"], "kl_ref": stats["kl"], "clip_low_frac": stats["clip_low"],
        "clip_high_frac": stats["clip_high"], "ved_tokens": stats["ved_tokens"], "teacher_student_gap": stats["mean_gap"],
        "retrieval_hit_rate": targets.hits / max(targets.n_scored, 1), "bank_size": len(run.bank),
        "new_experiences": len(mined.experiences), "experiences_merged": len(mined.merged),
        "summary_errors": len(mined.errors),
        "guesses_passed_over": sum(r.passed_over for r in mined.pair_rows), "teacher_errors": len(targets.teacher_errors),
        "grad_norm": finite(stats["grad_norm"]),
        "logp_grad_norm_grpo": stats["g2_grpo"] ** 0.5, "logp_grad_norm_ved": stats["g2_ved"] ** 0.5,
        "tokens_per_s": (gen_tokens + targets.n_tokens) / max(timer.elapsed(), 1e-9),
        "seconds": timer.elapsed(), **timer.columns(),
    }
    if probe_result is not None:  # the live probe's mean |log q - log p| over the student's sampled tokens
        row["probe_gap"] = probes.mean_gap(probe_result)
    if run.procs.world > 1:
        row["processes"], row["replica_checksums"] = run.procs.world, stats["replicas"]
    return MetricsRow(**row)


def record_step(run: Run, step: int, row: MetricsRow, probe_result) -> None:
    """Main process: the metrics row, the probe record, then the atomic checkpoint."""
    run.progress(step + 1, "checkpoint")
    append_metrics(run.out / "metrics.jsonl", row)
    if probe_result is not None:
        probes.write(run.out, run.pol.tokenizer, step + 1, run.probe_req, probe_result, run.cfg.use_ved,
                     probes.GIVEN if run.cfg.probe_request else probes.AUTO)
    checkpoint.save(run.out, run.model, run.opt, step + 1)
    from ..experience import journal

    journal.forget(run.out / journal.NAME, step + 1)  # checkpointed: never to be undone


def summary_line(cfg, row: MetricsRow) -> str:
    r, k = (f"{x:.3f}" if x is not None else "-" for x in (row.reward_mean, row.kscore_mean))
    return (f"step {row.step}/{cfg.steps} [{cfg.arm}] reward {r} kscore {k} ved {row.ved_loss:.4f} "
            f"grpo {row.grpo_loss:+.4f} hit {row.retrieval_hit_rate:.2f} bank {row.bank_size} ({row.seconds:.0f}s)")
