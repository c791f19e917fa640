"""Self-evolution: GRPO + Visual Experience Distillation with a LoRA student, one readable loop.

Each step: sample B prompts -> roll out K trajectories each with the student (batched engine) ->
render and judge -> mine best-vs-worst pairs -> summarise them into experiences -> bank (merging the
experiences that share a trigger) -> retrieve an experience for every trajectory's request (cosine gate
between the request's situation and the experiences' triggers) -> score tokens: the student
(with gradient), the same weights before the update (pi_old), the teacher (same weights, the guide in
the system prompt, no gradient) and the reference (adapter disabled, no gradient) -> L = L_GRPO +
lambda * L_VED -> one AdamW step on the LoRA weights -> metrics JSONL -> atomic checkpoint. For live
viewers it also writes the mined pairs and a student-vs-teacher probe on one fixed request, the same
at every step (:mod:`genevolve.records.live`); the probe's conversations ride in the batch rollout as
extra rows and are scored apart, so it changes neither the batch nor the gradients (:mod:`.probe`).

In training the teacher never rolls out: it re-scores the student's own sampled tokens in its
privileged context (only the probe shows what the teacher would write). The student never sees the
experience. Arms switch the two terms on and off (``use_grpo``, ``use_ved``) so ablations share every
other piece of code.

Several processes (``accelerate launch`` or ``torchrun``; one per GPU) split each step's prompts: each
rolls out, renders and judges its share, the shares are gathered so that every process mines the same
pairs and keeps the same bank, each computes the loss on its own trajectories (normalised over the
whole step), and the LoRA gradients are summed before the identical optimizer step. Only the main
process writes the run folder; the others keep their copy of the bank under ``.ranks/``.

Where things live: the steps in :mod:`.steps`, the token-level update in :mod:`.update`, the
teacher's context in :mod:`genevolve.agent.teacher`, data parallelism in :mod:`.parallel`, checkpoints in
:mod:`.checkpoint`, the probe in :mod:`.probe`, phase timing in :mod:`.timing`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..records.live import MetricsRow
from . import steps
from .parallel import Processes
from .timing import PhaseTimer


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
    gate: float | None = None  # cosine gate of retrieval; None: the key's (0.90 for situations, 0.84 for raw texts)
    retrieval_key: str = "situation"  # what retrieval compares: 'situation' (triggers) or 'request' (raw texts)
    consolidate: bool = True  # merge the experiences that share a trigger after each step's mining
    capacity: int = 500
    top_frac: float = 0.10
    clip_low: float = 0.20
    clip_high: float = 0.28
    beta: float = 1e-3
    micro_batch: int = 8  # sequences per forward/backward
    grad_clip: float = 1.0
    seed: int = 0
    probe: bool = True  # write probe.json each step for live viewers (two extra rows in the batch rollout; main process only)
    probe_request: str | None = None  # sandbox request id the probe follows (default: picked at step 1, see probe.auto_request)
    device: str | None = None
    dtype: str | None = None
    report_to: str = "none"  # also log metrics to 'tensorboard' or 'trackio' (see .tracking)

    def validate(self) -> None:
        from .tracking import check

        check(self.report_to)
        if not (self.use_grpo or self.use_ved):
            raise ValueError("at least one of use_grpo and use_ved must be on (SFT-only needs no training)")
        for name in ("steps", "prompts_per_step", "micro_batch", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.rollouts_per_prompt < 2:
            raise ValueError("rollouts_per_prompt (K) must be >= 2: GRPO and pair mining compare within a group")
        if not 0 <= self.delta_min <= 1 or not (self.gate is None or -1 <= self.gate <= 1):
            raise ValueError("delta_min is in [0, 1] and gate in [-1, 1]")
        if self.retrieval_key not in ("situation", "request"):
            raise ValueError(f"retrieval_key is 'situation' or 'request', not {self.retrieval_key!r}")
        if self.lambda_ved < 0:
            raise ValueError("lambda_ved must be >= 0")
        if self.probe_request is not None and not self.probe_request.strip():
            raise ValueError("probe_request is a sandbox request id (or None: picked at the first step)")

    @property
    def arm(self) -> str:
        return {(True, True): "grpo+ved", (True, False): "grpo", (False, True): "ved"}[(self.use_grpo, self.use_ved)]


def evolve(cfg: EvolveConfig, world=None, log: Callable[[str], None] = print,
           on_step: Callable[[MetricsRow], None] | None = None, stop: Callable[[], bool] | None = None) -> MetricsRow | None:
    """Run self-evolution; resumes from ``<out>/checkpoint`` when present. Returns the last metrics row
    (None when no step ran).

    The run folder is locked while training: a second trainer there raises ``RunLockedError``.
    ``stop()`` is asked before every step; a stopped run resumes from its last checkpoint.
    """
    from ..records.live import run_lock

    cfg.validate()
    procs = Processes()
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with run_lock(cfg.out) if procs.main else contextlib.nullcontext():
        return _loop(cfg, world, log if procs.main else (lambda _: None), on_step, stop, procs)


def _loop(cfg: EvolveConfig, world, log: Callable[[str], None], on_step: Callable[[MetricsRow], None] | None,
          stop: Callable[[], bool] | None, procs: Processes) -> MetricsRow | None:
    """The algorithm, one step per iteration; each line is a named step of :mod:`.steps`."""
    from dataclasses import asdict

    from .tracking import Tracker, open_tracker

    run = steps.setup(cfg, world, procs, log)
    tracker = open_tracker(cfg.report_to, cfg.out, asdict(cfg), warn=log) if procs.main else Tracker()
    try:
        return _steps(cfg, run, procs, log, on_step, stop, tracker)
    finally:
        tracker.finish()


def _steps(cfg: EvolveConfig, run, procs: Processes, log, on_step, stop, tracker) -> MetricsRow | None:
    K, row = cfg.rollouts_per_prompt, None
    for step in range(run.step0, cfg.steps):
        if any(procs.gather(bool(stop and stop()))):  # every process stops at the same step
            log("stop requested")
            break
        timer = PhaseTimer()
        if run.bank.journal is not None:
            run.bank.journal.step = step + 1  # the bank writes of this step, undone if it is cut short
        batch = steps.prompts_for(run, step)
        mine = procs.share(len(batch))  # this process's prompts
        plan = steps.probe_plan(run, step, batch)  # the live probe's episodes ride in the batch
        with timer("rollout"):
            trajs, probe_trajs = steps.collect_rollouts(run, [batch[i] for i in mine], step, plan)
        with timer("render_judge"):
            verdicts = steps.judge(run, [batch[i] for i in mine], trajs, step)
        trajs, verdicts = procs.gather_groups(mine, len(batch), K, trajs, verdicts)  # the whole step, everywhere
        steps.record_cases(run, trajs, verdicts)
        groups = steps.groups_of(trajs, verdicts, len(batch), K)
        run.progress(step + 1, "mining")
        with timer("mine_summarise"):
            mined = steps.mine_and_summarise(run, groups, step)
        run.progress(step + 1, "update")  # the teacher's scoring, the probe and the update
        with timer("retrieve"):
            targets = steps.update_targets(run, batch, groups)
        with timer("probe"):
            probe = steps.probe(run, step, batch, trajs, verdicts, plan, probe_trajs)
        stats = steps.update(run, targets, timer)
        row = steps.metrics_row(run, step, trajs, verdicts, mined, targets, stats, timer, probe)
        if procs.main:
            steps.record_step(run, step, row, probe)
            tracker.log(row.model_dump(), step + 1)
        procs.barrier()  # the other processes wait for the main one's checkpoint
        if procs.main:
            log(steps.summary_line(cfg, row))
            if on_step:
                on_step(row)
    return row
