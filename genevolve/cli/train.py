"""Training: SFT, self-evolution with its before/after comparison, and the ablation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from ..evaluation import estimate as estimates
from .common import check_probe_request, claim_sft, evolve_cfg, holding, micro_batch_for, stop_on_sigterm, train

REPORT_TO = typer.Option("none", "--report-to", help="Also log the run's config, every step's metrics and the final "
                         "table to 'tensorboard' (<run>/tensorboard) or 'trackio' ($TRACKIO_DIR, project genevolve); "
                         "offline either way.")


def log_table(report_to: str, out: Path, title: str, headers, results_json: Path, config: dict) -> None:
    """The final table of a run (its report's results.json), to its tracker (reopened: a resumed trackio run, another
    event file)."""
    from ..training.tracking import open_tracker

    if report_to == "none":
        return
    tracker = open_tracker(report_to, out, config, warn=typer.echo)
    try:
        tracker.table(title, headers, report_rows(results_json))
    except (OSError, ValueError) as exc:
        typer.echo(f"warning: no final table for --report-to {report_to}: {exc}", err=True)
    tracker.finish()


def report_rows(results_json: Path) -> list[list]:
    """The report's KScore table (policy, track, mean, 95 % half-width) from its results.json."""
    data = json.loads(results_json.read_text("utf-8"))
    rows = []
    for policy, summary in data.items():
        for level in ("overall", "track"):
            for group, row in summary.get(level, {}).items():
                k = row.get("kscore") or {}
                rows.append([policy, group, k.get("mean"), k.get("ci95")])
    return rows

def announce_estimate(out: Path, policy: str, plan) -> None:
    """Print the expected wall time and keep it in the run folder, where the studio's ETA reads it."""
    est = estimates.estimate(policy, plan, runs_dir=out.resolve().parent)
    out.mkdir(parents=True, exist_ok=True)
    estimates.save(out, est)
    typer.echo(f"expected time: {est.text()}")


def sft(
    recipe: str = typer.Option("tiny", help="'tiny': train a tokenizer and a small Llama from scratch on the expert's "
                               "cold-start data; 'model': fine-tune the model folder given by --model."),
    out: Path = typer.Option(Path("assets/policy/tiny"), help="Final model folder (replaced atomically when training ends)."),
    model: Optional[str] = typer.Option(None, help="Base model for --recipe model: 'smollm2', 'tiny' or a model folder."),
    data: Optional[Path] = typer.Option(None, help="JSONL of SFT records with a 'messages' list (default: expert cold-start data)."),
    epochs: int = typer.Option(4, min=1, help="Passes over the data with the assistant-only loss."),
    pretrain_epochs: int = typer.Option(2, min=0, help="Tiny recipe: passes of next-token loss on every token first."),
    guided_fraction: float = typer.Option(0.5, min=0.0, max=1.0, help="Share of requests that also get a guide-following expert trajectory."),
    noise: str = typer.Option("cold-start", help="Expert data: noise of the unguided trajectories, 'cold-start' or "
                              "'blind-spots' (three skills mostly skipped unless a guide names them)."),
    extra_requests: int = typer.Option(0, min=0, help="Expert data: freshly sampled requests per category on top of the "
                                       "sft split (texts never equal to any split's; more distinct requests teach copying)."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (warm-up, then cosine decay to 10%)."),
    batch_tokens: int = typer.Option(8192, min=256, help="Padded tokens per optimizer step."),
    max_len: int = typer.Option(2048, min=16, help="Conversations longer than this many tokens lose their tail."),
    warmup_steps: int = typer.Option(30, min=0, help="Steps of linear learning-rate warm-up."),
    save_every: int = typer.Option(100, min=1, help="Optimizer steps between checkpoints (a re-run resumes from the last)."),
    lora_rank: int = typer.Option(0, min=0, help="Train a LoRA adapter of this rank instead of all weights, merged "
                                  "into the saved model (0: full fine-tuning)."),
    seed: int = typer.Option(0, help="Seed for data, initialisation and batching."),
    device: Optional[str] = typer.Option(None, help="Torch device (default: cuda if available, else cpu)."),
    report_to: str = REPORT_TO,
    force_new: bool = typer.Option(False, "--force-new", help="--out already holds a finished model: move it aside (never "
                                   "deleted) and train a new one (an interrupted run in <out>.work resumes either way)."),
):
    """Supervised fine-tuning with an assistant-only loss; resumes from its last checkpoint if interrupted."""
    from ..records.live import RunLockedError
    from ..training.sft import SFTConfig, train_sft

    cfg = SFTConfig(out=str(out), recipe=recipe, model=model, data=str(data) if data else None, epochs=epochs, lr=lr,
                    pretrain_epochs=pretrain_epochs, guided_fraction=guided_fraction, noise=noise, extra_requests=extra_requests,
                    batch_tokens=batch_tokens, max_len=max_len, warmup_steps=warmup_steps, save_every=save_every,
                    lora_rank=lora_rank, seed=seed, device=device, report_to=report_to)
    try:
        cfg.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    claim_sft(out, force_new)
    try:
        result = train_sft(cfg, log=typer.echo)
    except (ValueError, FileNotFoundError, RunLockedError) as exc:  # bad data, an unknown model, other settings, a busy folder
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result))


def evolve(
    quick: bool = typer.Option(False, "--quick", help="A few minutes: 2 steps of 4 prompts x 4 rollouts, 24 bench requests."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: evolve-<time> in the runs folder, $GENEVOLVE_RUNS "
                                       "or runs/ in the data folder); an existing one is resumed."),
    policy: str = typer.Option("tiny", help="The SFT student: 'tiny' or a model folder."),
    steps: Optional[int] = typer.Option(None, min=1, help="Self-evolution steps (default 5; quick 2)."),
    prompts: Optional[int] = typer.Option(None, "-B", min=1, help="Prompts per step (default 8; quick 4)."),
    rollouts: Optional[int] = typer.Option(None, "-K", min=2, help="Rollouts per prompt (default 6; quick 4)."),
    lambda_ved: float = typer.Option(2.0, min=0.0, help="Weight of the VED loss: L = L_GRPO + lambda * L_VED."),
    lora_rank: int = typer.Option(16, min=1, help="LoRA rank of the student's adapter."),
    lr: float = typer.Option(1e-3, help="Learning rate of the LoRA weights."),
    delta_min: float = typer.Option(0.20, min=0.0, max=1.0, help="Smallest best-vs-worst reward gap that makes an experience."),
    gate: Optional[float] = typer.Option(None, min=-1.0, max=1.0, help="Cosine gate for retrieving an experience "
                                         "(default: 0.90 with the situation key, 0.84 with the request key)."),
    retrieval_key: str = typer.Option("situation", help="What retrieval compares: 'situation' (a request's situation, "
                                      "read from its text, with the experiences' triggers) or 'request' (raw texts)."),
    consolidate: bool = typer.Option(True, "--consolidate/--no-consolidate", help="After each step's mining, merge the "
                                     "experiences that share a trigger into one general experience."),
    no_grpo: bool = typer.Option(False, "--no-grpo", help="Drop the GRPO term (VED only)."),
    no_ved: bool = typer.Option(False, "--no-ved", help="Drop the VED term (GRPO only)."),
    seed: int = typer.Option(0, help="Seed for prompt order, sampling and initialisation."),
    eval_seeds: str = typer.Option("0", help="Comma-separated seeds for the before/after/teacher bench comparison."),
    eval_requests: Optional[int] = typer.Option(None, min=1, help="Bench requests to compare on (default: all; quick 24)."),
    eval_samples: int = typer.Option(1, min=1, help="Trajectories per bench request and seed in the comparison (more: less sampling noise)."),
    max_new_tokens: int = typer.Option(384, min=16, help="Token budget of one assistant turn."),
    train_only: bool = typer.Option(False, "--train-only", help="Train and checkpoint; skip the bench comparison."),
    probe_request: Optional[str] = typer.Option(None, help="Sandbox request id the live student-vs-teacher view follows at every step (default: the first request of step 1 that an experience is mined from, so the view has a teacher early)."),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="Write each step's live student-vs-teacher probe (two extra rows in each step's rollout)."),
    micro_batch: Optional[int] = typer.Option(None, min=1, help="Sequences per forward/backward in the update (fewer: less "
                                              "memory; default 8, fewer for a large vocabulary: SmolLM2 2)."),
    force_new: bool = typer.Option(False, "--force-new", help="Start again in --out even though it holds a run with other "
                                   "settings (the earlier run is moved aside, not deleted)."),
    report_to: str = REPORT_TO,
):
    """One-click distill-and-compare: GRPO + VED from the SFT student, then before / after on the bench and the
    teacher where it retrieves an experience (training requests and bench hits).

    Under ``accelerate launch`` or ``torchrun`` the processes share the training (data-parallel); the
    main process then runs the comparison alone.
    """
    import time

    from ..world import World

    from ..records.paths import runs_dir

    out = out or runs_dir() / f"evolve-{time.strftime('%Y%m%d-%H%M%S')}"
    micro_batch = micro_batch_for(policy, micro_batch)
    cfg = evolve_cfg(out, policy, estimates.default("evolve", "steps", quick, steps), estimates.default("evolve", "prompts", quick, prompts),
                     estimates.default("evolve", "rollouts", quick, rollouts),
                     lambda_ved, lora_rank, lr, delta_min, gate, seed, not no_grpo, not no_ved, max_new_tokens, probe_request,
                     probe, micro_batch, retrieval_key, consolidate, report_to)
    w = World()
    check_probe_request(w, probe_request)
    with holding(out, force_new):
        _train_and_compare(cfg, w, quick, eval_requests, eval_seeds, eval_samples, train_only)


def _train_and_compare(cfg, w, quick: bool, eval_requests, eval_seeds: str, eval_samples: int, train_only: bool) -> None:
    """evolve's work, inside the run folder's lock: train (or resume), then the before / after / teacher comparison."""
    import signal
    import time

    from ..evaluation.experiments import bench_requests, compare_after_training

    out = Path(cfg.out)
    t0 = time.time()
    typer.echo(f"evolving {cfg.policy} ({cfg.arm}): {cfg.steps} steps x {cfg.prompts_per_step} prompts x "
               f"{cfg.rollouts_per_prompt} rollouts -> {out}")
    n_eval = 0 if train_only else len(bench_requests(w, quick, eval_requests))
    announce_estimate(out, cfg.policy, estimates.plan_evolve(cfg.steps, cfg.prompts_per_step, cfg.rollouts_per_prompt, cfg.probe,
                                                             n_eval, len(eval_seeds.split(",")), eval_samples, cfg.use_ved))
    train(cfg, w, stop_on_sigterm())
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # past training, SIGTERM ends the evaluation at once
    t_train = time.time() - t0
    if train_only or int(os.environ.get("RANK", "0")) > 0:
        typer.echo(f"trained in {t_train:.0f} s; checkpoint: {out / 'checkpoint'}")
        return
    from ..records.live import ProgressWriter

    seeds = [int(x) for x in eval_seeds.split(",") if x.strip()]
    progress = ProgressWriter(out, cfg.steps)
    progress(cfg.steps, "comparison")
    report = compare_after_training(cfg, w, bench_requests(w, quick, eval_requests), seeds, eval_samples, t_train, typer.echo)
    progress(cfg.steps, "done")
    from dataclasses import asdict

    log_table(cfg.report_to, out, "report: bench KScore", ["policy", "group", "KScore", "ci95"],
              report.parent / "results.json", asdict(cfg))
    typer.echo(report.read_text("utf-8").split("## Learning curves")[0])
    typer.echo(f"report: {report}  ({time.time() - t0:.0f} s in all)")


def ablate(
    quick: bool = typer.Option(False, "--quick", help="A few minutes: 1 step of 4 prompts x 4 rollouts per arm, 1 seed, 24 requests."),
    out: Optional[Path] = typer.Option(None, help="Folder for every arm's run and the report (default: ablate-<time> in the runs folder); "
                                       "an existing one is resumed: finished arms and seeds are loaded, not run again."),
    policy: str = typer.Option("tiny", help="The SFT student: 'tiny' or a model folder."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds (default 0,1,2; quick 0)."),
    arms: str = typer.Option("sft,grpo,ved,grpo+ved", help="Arms to run: any of sft, grpo, ved, grpo+ved."),
    steps: Optional[int] = typer.Option(None, min=1, help="Steps per arm (default 4; quick 1)."),
    prompts: Optional[int] = typer.Option(None, "-B", min=1, help="Prompts per step (default 8; quick 4)."),
    rollouts: Optional[int] = typer.Option(None, "-K", min=2, help="Rollouts per prompt (default 6; quick 4)."),
    lambda_ved: float = typer.Option(2.0, min=0.0, help="Weight of the VED loss."),
    lora_rank: int = typer.Option(16, min=1, help="LoRA rank."),
    lr: float = typer.Option(1e-3, help="Learning rate of the LoRA weights."),
    eval_requests: Optional[int] = typer.Option(None, min=1, help="Bench requests per evaluation (default: all; quick 24)."),
    eval_samples: int = typer.Option(1, min=1, help="Trajectories per bench request and seed in the comparison (more: less sampling noise)."),
    max_new_tokens: int = typer.Option(384, min=16, help="Token budget of one assistant turn."),
    probe_request: Optional[str] = typer.Option(None, help="Sandbox request id every arm's live student-vs-teacher view follows (default: the first request of step 1 that an experience is mined from, so the view has a teacher early)."),
    teacher: bool = typer.Option(True, "--teacher/--no-teacher", help="Measure the teacher (the full method's trained "
                                 "student with its bank's experiences) where it gets a guide, at the first seed."),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="Write each step's live student-vs-teacher probe (two extra "
                               "rollouts a step, apart from training; --no-probe saves their time on a slow student)."),
    micro_batch: Optional[int] = typer.Option(None, min=1, help="Sequences per forward/backward in the update (default 8, fewer for a "
                                              "large vocabulary: SmolLM2 2; fewer: less memory; a "
                                    "49k-token vocabulary over 8 long rollouts needs tens of GB)."),
    report_to: str = REPORT_TO,
):
    """The ablation: SFT-only, +GRPO, +VED, +GRPO+VED at the same number of rollouts, several seeds, mean ± 95% CI."""
    import time

    from ..evaluation.experiments import ARMS, Ablation, SettingsMismatch, bench_requests, run_ablation
    from ..policies.base import SamplingParams
    from ..records.runs import policy_checksum
    from ..world import World

    arm_list = [a.strip() for a in arms.split(",") if a.strip()]
    bad = [a for a in arm_list if a not in ARMS]
    if bad:
        raise typer.BadParameter(f"unknown arms {bad}", param_hint="--arms")
    seed_list = [int(x) for x in estimates.default("ablate", "seeds", quick, seeds).split(",") if x.strip()]
    from ..records.paths import runs_dir

    out = out or runs_dir() / f"ablate-{time.strftime('%Y%m%d-%H%M%S')}"
    micro_batch = micro_batch_for(policy, micro_batch)
    w = World()
    check_probe_request(w, probe_request)
    reqs = bench_requests(w, quick, eval_requests)
    n_steps, b, k = (estimates.default("ablate", name, quick, given) for name, given in
                     (("steps", steps), ("prompts", prompts), ("rollouts", rollouts)))
    try:
        sha = policy_checksum(policy)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--policy") from exc
    settings = {"policy": policy, "policy_sha256": sha, "steps": n_steps, "B": b, "K": k, "lambda_ved": lambda_ved,
                "lora_rank": lora_rank, "lr": lr, "eval_requests": [r.id for r in reqs], "eval_samples": eval_samples,
                "max_new_tokens": max_new_tokens, "probe_request": probe_request} | ({"micro_batch": micro_batch} if micro_batch != 8 else {})

    def make_cfg(arm: str, seed: int, run_dir: Path):
        return evolve_cfg(run_dir, policy, n_steps, b, k, lambda_ved, lora_rank, lr, 0.20, None, seed, "grpo" in arm,
                          "ved" in arm, max_new_tokens, probe_request, probe, micro_batch, report_to=report_to)

    announce_estimate(out, policy, estimates.plan_ablate(arm_list, len(seed_list), n_steps, b, k, probe, len(reqs), eval_samples,
                                                        teacher))
    stop = stop_on_sigterm()
    ab = Ablation(out, policy, arm_list, seed_list, reqs, eval_samples,
                  SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=max_new_tokens), settings, make_cfg, teacher)
    t0 = time.time()
    try:
        with holding(out, kind="ablate"):  # the ablation folder is held until its report is written
            report, lines = run_ablation(ab, w, lambda cfg: train(cfg, w, stop), typer.echo)
    except SettingsMismatch as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo("\n".join(lines))
    typer.echo(f"report: {report}  ({time.time() - t0:.0f} s in all)")
    log_table(report_to, out, "ablation: bench KScore", ["arm", "group", "KScore", "ci95"],
              report.parent / "results.json", settings)


def report(
    run: Path = typer.Argument(..., help="An evolve or ablate run folder (or its report folder, or its report.md)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Where to write the HTML file (default: report.html beside report.md)."),
):
    """A run's report as one self-contained HTML file (every picture inlined), to download, mail or archive."""
    from ..evaluation.report_html import write_report_html

    md = run if run.suffix == ".md" else run / "report.md" if (run / "report.md").exists() else run / "report" / "report.md"
    try:
        path = write_report_html(md, html)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained)")


def register(app: typer.Typer) -> None:
    app.command()(sft)
    app.command()(evolve)
    app.command()(ablate)
    app.command()(report)
