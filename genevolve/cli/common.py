"""What the command modules share: common options, policy and tool construction, tables, progress bars,
and the training call that turns a locked folder or a stop request into a clear exit."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

WORLD_OPT = typer.Option(None, "--world", help="World folder (default: assets/world, or $GENEVOLVE_WORLD).")
POLICY_HELP = ("'expert' (scripted planner), 'raw' (request text straight to the generator), 'tiny' (the shipped "
               "tiny policy), 'smollm2', a model folder, or an OpenAI-compatible base URL (http://host:port/v1).")
SAMPLING = {
    "temperature": typer.Option(0.7, min=0.0, help="Sampling temperature for learned policies (0: greedy)."),
    "top_p": typer.Option(0.95, min=0.0, max=1.0, help="Nucleus sampling mass for learned policies."),
    "max_new_tokens": typer.Option(384, min=1, help="Token budget of one assistant turn for learned policies."),
}
SEARCH_OPT = typer.Option("local", help="Search backend: 'local' (the sandbox's FAISS stores) or 'serper' "
                          "(a Serper-compatible HTTP API: $SERPER_BASE_URL, $SERPER_API_KEY).")
GENERATOR_HELP = ("'sandbox', 'tiny' (random-weight diffusers pipeline), 't2i:<model id or folder>', 'img2img:<model>', "
                  "'ip-adapter:<model>', 'qwen-edit:<model>', or render-service URLs (http://host:port, comma-separated).")
JUDGE_HELP = "OpenAI-compatible base URL of the VLM judge (key: $OPENAI_API_KEY or --judge-api-key)."


# Bounds on every request to a policy or judge server, set by `genevolve --timeout S --retries N <command>`.
CLIENT = {"timeout": 60.0, "retries": 2}


def make_policy(world, name: str, noise: str, skip_skill: list[str], p_distractor: Optional[float],
            model: str = "default", adapter: Optional[str] = None):
    from ..agent.expert import ExpertNoise, ExpertPolicy
    from ..records.schema import SKILLS

    for s in skip_skill:
        if s not in SKILLS:
            raise typer.BadParameter(f"unknown skill {s!r}; skills: {', '.join(SKILLS)}", param_hint="--skip-skill")
    if name == "expert":
        try:
            base = ExpertNoise.named(noise)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--noise") from exc
        from dataclasses import replace

        base = replace(base, skip_skills=tuple(skip_skill))
        if p_distractor is not None:
            base = replace(base, p_distractor=p_distractor)
        label = "expert" if base == ExpertNoise() else f"expert[{noise}{',skip=' + '+'.join(skip_skill) if skip_skill else ''}" \
            f"{f',distractor={p_distractor}' if p_distractor is not None else ''}]"
        return ExpertPolicy(world, base, name=label)
    if name == "raw":
        return None
    from ..policies.resolve import resolve_policy

    try:
        return resolve_policy(name, model=model, adapter=adapter, timeout=CLIENT["timeout"], retries=CLIENT["retries"])
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--policy") from exc


def sampling_params(temperature: float, top_p: float, max_new_tokens: int):
    from ..policies.base import SamplingParams

    try:
        return SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


class Bars:
    """One tqdm progress bar per seed, fed by :func:`genevolve.evaluation.bench.evaluate`'s ``on_turn``."""

    def __init__(self, desc: str):
        self.desc, self.bar, self.seed = desc, None, None

    def update(self, seed: int, done: int, total: int) -> None:
        from tqdm import tqdm

        if seed != self.seed:
            self.close()
            self.seed, self.bar = seed, tqdm(total=total, desc=f"{self.desc} {seed}", unit="traj")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Bars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_tools(world, search: str):
    from ..agent.loop import Tools

    if search == "local":
        return Tools.for_world(world)
    if search == "serper":
        from ..tools.serper import SerperImageSearch, SerperTextSearch

        return Tools(SerperTextSearch(), SerperImageSearch(), world.knowledge, show_urls=True)
    raise typer.BadParameter("search is 'local' or 'serper'", param_hint="--search")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*map(str, r)) for r in rows])


def score_rows(summary: dict) -> list[list]:
    """Table rows of a bench summary: KScore (mean ± CI over seeds) and F, V, T, A by overall, track and category."""
    rows = []
    for level in ("overall", "track", "category"):
        for key, row in summary["by"][level].items():
            k = row["kscore"]
            rows.append([level, key, row["n"], fmt(k["mean"]) + (f" ± {k['ci95']:.3f}" if k["ci95"] is not None else ""),
                         fmt(row["F"]["mean"]), fmt(row["V"]["mean"]), fmt(row["T"]["mean"]), fmt(row["A"]["mean"]), row["failed"],
                         row.get("missing", 0)])
    return rows


def fmt(x) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def open_generator(spec: str, device: Optional[str], dtype: Optional[str], steps: Optional[int] = None,
                   timeout: Optional[float] = None, world=None, ip_adapter: Optional[str] = None):
    from ..generators import open_generator as _open

    kw = {}
    if steps is not None and not spec.startswith(("http", "sandbox")):
        kw["steps"] = steps
    if timeout is not None:
        kw["timeout" if spec.startswith("http") else "timeout_s"] = timeout
    if ip_adapter:
        kw["ip_adapter"] = ip_adapter
    try:
        return _open(spec, device=device, dtype=dtype, world=world, **kw)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--generator") from exc


def open_judges(url: str, model: str, api_key: Optional[str], text_policy: str, cache: Optional[Path], rpm: float,
                sufficiency: bool = True):
    from ..judges.vlm import ProgramJudge, VLMJudge

    try:
        common = dict(api_key=api_key, cache_dir=cache, rpm=rpm, timeout=CLIENT["timeout"], max_retries=CLIENT["retries"])
        judge = VLMJudge(url, model, text_policy=text_policy, **common)
        pj = ProgramJudge(url, model, limiter=judge.limiter, **common) if sufficiency else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--judge") from exc
    return judge, pj


def micro_batch_for(policy: str, given: Optional[int]) -> int:
    """The update's sequences per forward/backward: as given, else 8 for a small vocabulary and fewer for a large
    one, whose full-vocabulary logits would not fit in memory (SmolLM2's 49k tokens: 2)."""
    if given is not None:
        return given
    import json

    from ..policies.resolve import model_source

    try:
        folder, gguf = model_source(policy)
        vocab = json.loads((Path(folder) / "config.json").read_text("utf-8"))["vocab_size"] if gguf is None else 49152
    except (OSError, ValueError, KeyError):
        return 2
    return max(1, min(8, 8 * 16384 // int(vocab)))


def evolve_cfg(out: Path, policy: str, steps: int, b: int, k: int, lambda_ved: float, lora_rank: int, lr: float,
                delta_min: float, gate: float, seed: int, use_grpo: bool, use_ved: bool, max_new_tokens: int,
                probe_request: Optional[str] = None, probe: bool = True, micro_batch: int = 8,
                retrieval_key: str = "situation", consolidate: bool = True, report_to: str = "none"):
    from ..training.evolve import EvolveConfig

    cfg = EvolveConfig(out=str(out), policy=policy, steps=steps, prompts_per_step=b, rollouts_per_prompt=k,
                       lambda_ved=lambda_ved, lora_rank=lora_rank, lr=lr, delta_min=delta_min, gate=gate, seed=seed,
                       use_grpo=use_grpo, use_ved=use_ved, max_new_tokens=max_new_tokens, probe_request=probe_request,
                       probe=probe, micro_batch=micro_batch, retrieval_key=retrieval_key, consolidate=consolidate,
                       report_to=report_to)
    try:
        cfg.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    return cfg


def stop_on_sigterm():
    """SIGTERM asks the training loop to stop after its current step (checkpointed); the studio's Stop sends it."""
    import signal

    asked: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: asked.append(1))
    return lambda: bool(asked)


def train(cfg, world, stop) -> None:
    """Run the trainer; a stop or a locked run folder ends the command with a clear message."""
    from ..training.checkpoint import CheckpointError
    from ..training.evolve import evolve as run_evolve
    from ..records.live import RunLockedError

    try:
        run_evolve(cfg, world=world, log=typer.echo, stop=stop)
    except (RunLockedError, CheckpointError, ValueError) as exc:  # one line: a locked folder, a broken checkpoint, other settings
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if stop():
        typer.echo(f"stopped; {cfg.out} holds the last checkpoint: run the same command again to resume")
        raise typer.Exit(0)


@contextlib.contextmanager
def holding(out: Path, force_new: bool = False, kind: str = "evolve"):
    """The run folder claimed for a ``kind`` run (another kind of run folder is refused by name) and locked for
    the whole command, training and evaluation; with ``force_new`` an existing folder is first moved aside (to
    ``<out>.replaced-<time>``), never deleted."""
    import os

    from ..records.kinds import RunKindError, check, claim, move_aside
    from ..records.live import RunLockedError, run_lock

    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun / accelerate the main process holds the folder
        yield
        return
    if force_new and out.exists() and any(out.iterdir()):
        from ..records.live import is_running

        if is_running(out):
            typer.echo(f"error: {out} is in use by another process; stop it before replacing it", err=True)
            raise typer.Exit(2)
        typer.echo(f"--force-new: the earlier folder is kept in {move_aside(out)}")
    hint = "choose another --out, or --force-new to move it aside and start there"
    try:
        check(out, kind, hint=hint)  # before the lock file is made in a folder that is not ours
        with run_lock(out):
            claim(out, kind, hint=hint)
            yield
    except (RunLockedError, RunKindError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def check_probe_request(w, probe_request: str | None) -> None:
    if probe_request is not None and probe_request not in {r.id for r in w.requests}:
        raise typer.BadParameter(f"{probe_request!r} is not a sandbox request id (e.g. {w.split('evolve')[0].id})",
                                 param_hint="--probe-request")


def claim_sft(out: Path, force_new: bool) -> None:
    """An SFT writes its model into ``out`` and its checkpoints into ``<out>.work``: each must be new, empty or an
    SFT's own. A finished model is never replaced without ``force_new``, which moves it aside; an interrupted run
    in the work folder is resumed either way."""
    from ..records.kinds import RunKindError, check, claim, move_aside
    from ..records.live import is_running

    work = out.with_name(out.name + ".work")
    hint = "choose another --out"
    try:
        for folder in (out, work):
            check(folder, "sft", "sft", hint)
        if force_new:
            if out.exists() and any(out.iterdir()):
                if is_running(work):
                    raise RunKindError(f"{work} is in use by another process; stop it before replacing {out}")
                typer.echo(f"--force-new: the earlier model is kept in {move_aside(out)}")
        elif out.exists() and any(out.iterdir()):
            raise RunKindError(f"{out} already holds a finished SFT model: --force-new moves it aside and trains a new "
                               f"one, or {hint} (to fine-tune it, --recipe model --model {out})")
        claim(work, "sft", "sft", hint)
    except RunKindError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
