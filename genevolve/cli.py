"""The ``genevolve`` command line. Thin: every command is a few calls into the library."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="GenEvolve Studio: self-evolving image-generation agents on an offline sandbox.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
world_app = typer.Typer(help="Build and inspect the offline sandbox world.", no_args_is_help=True)
app.add_typer(world_app, name="world")

WORLD_OPT = typer.Option(None, "--world", help="World folder (default: assets/world, or $GENEVOLVE_WORLD).")


def _policy(world, name: str, noise: str, skip_skill: list[str], p_distractor: Optional[float],
            model: str = "default", adapter: Optional[str] = None):
    from .world.expert import ExpertNoise, ExpertPolicy
    from .records import SKILLS

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
    from .policies.resolve import resolve_policy

    try:
        return resolve_policy(name, model=model, adapter=adapter)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--policy") from exc


POLICY_HELP = ("'expert' (scripted planner), 'raw' (request text straight to the generator), 'tiny' (the shipped "
               "tiny policy), 'smollm2', a model folder, or an OpenAI-compatible base URL (http://host:port/v1).")


def _params(temperature: float, top_p: float, max_new_tokens: int):
    from .policies.base import SamplingParams

    try:
        return SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _run(reqs, pol, tools, k: int, seed: int, params, guides=None, desc: str = "rollouts"):
    """Trajectories for ``reqs`` x ``k`` with the batched engine (or raw programs), with a progress bar."""
    from tqdm import tqdm

    from .evaluation import raw_trajectory
    from .rollout import rollout as run_batch

    if pol is None:
        return [raw_trajectory(r, seed * 1000 + i) for r in reqs for i in range(k)]
    bar = tqdm(total=len(reqs) * k, desc=desc, unit="traj")

    def on_turn(done: int, total: int) -> None:
        bar.update(done - bar.n)

    trajs = run_batch(reqs, pol, tools, k=k, params=params, seed=seed, guides=guides, on_turn=on_turn)
    bar.close()
    return trajs


SEARCH_OPT = typer.Option("local", help="Search backend: 'local' (the sandbox's FAISS stores) or 'serper' "
                          "(a Serper-compatible HTTP API: $SERPER_BASE_URL, $SERPER_API_KEY).")


def _tools(world, search: str):
    from .agent import Tools

    if search == "local":
        return Tools.for_world(world)
    if search == "serper":
        from .tools.serper import SerperImageSearch, SerperTextSearch

        return Tools(SerperTextSearch(), SerperImageSearch(), world.knowledge, show_urls=True)
    raise typer.BadParameter("search is 'local' or 'serper'", param_hint="--search")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*map(str, r)) for r in rows])


def _score_rows(summary: dict) -> list[list]:
    """Table rows of a bench summary: KScore (mean ± CI over seeds) and F, V, T, A by overall, track and category."""
    rows = []
    for level in ("overall", "track", "category"):
        for key, row in summary["by"][level].items():
            k = row["kscore"]
            rows.append([level, key, row["n"], _f(k["mean"]) + (f" ± {k['ci95']:.3f}" if k["ci95"] is not None else ""),
                         _f(row["F"]["mean"]), _f(row["V"]["mean"]), _f(row["T"]["mean"]), _f(row["A"]["mean"]), row["failed"],
                         row.get("missing", 0)])
    return rows


def _f(x) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


@world_app.command("build")
def world_build(
    seed: int = typer.Option(0, help="Seed for every random choice in the world."),
    out: Path = typer.Option(Path("assets/world"), help="Folder to (re)write; replaced atomically when done."),
    no_index: bool = typer.Option(False, "--no-index", help="Skip building the FAISS indexes (built lazily on first search)."),
):
    """Rebuild every sandbox asset (entities, corpus, references, skill cards, requests, ground truths, indexes)."""
    from .world.build import build_world

    counts = build_world(out, seed=seed, with_index=not no_index, log=typer.echo)
    typer.echo(json.dumps(counts))


@world_app.command("info")
def world_info(world: Optional[Path] = WORLD_OPT):
    """Print what the world holds."""
    from collections import Counter

    from .world import World

    w = World(world)
    typer.echo(f"world: {w.root}")
    typer.echo(f"entities: {len(w.data.entities)}, events: {len(w.data.events)}, references: {len(w.refs)}")
    c = Counter((r.split, r.track) for r in w.requests)
    for (split, track), n in sorted(c.items()):
        typer.echo(f"  {split:7s} {track:10s} {n}")


SAMPLING = {
    "temperature": typer.Option(0.7, min=0.0, help="Sampling temperature for learned policies (0: greedy)."),
    "top_p": typer.Option(0.95, min=0.0, max=1.0, help="Nucleus sampling mass for learned policies."),
    "max_new_tokens": typer.Option(384, min=1, help="Token budget of one assistant turn for learned policies."),
}


@app.command()
def rollout(
    request: str = typer.Option(..., "--request", "-r", help="A sandbox request id (e.g. bench-0001), its text, or any free text."),
    k: int = typer.Option(4, "-k", min=1, max=64, help="Number of trajectories to sample for the request."),
    seed: int = typer.Option(0, help="Seed: trajectory i uses seed*1000+i for the policy and the generator."),
    out: Optional[Path] = typer.Option(None, help="Run folder to write (default: runs/<new run id>)."),
    policy: str = typer.Option("expert", help=POLICY_HELP),
    noise: str = typer.Option("cold-start", help="Expert noise: 'none' (perfect), 'cold-start' (imperfect, varied) or "
                              "'blind-spots' (cold-start, plus three skills mostly skipped without a guide)."),
    skip_skill: list[str] = typer.Option([], help="Skill the expert never uses (repeatable)."),
    p_distractor: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Chance the expert takes a distractor reference."),
    guide: Optional[str] = typer.Option(None, help="Decision guide for the system prompt: 'oracle' (the request's correct guide) or a text."),
    model: str = typer.Option("default", help="Model name to ask an OpenAI-compatible server for."),
    adapter: Optional[str] = typer.Option(None, help="LoRA adapter folder to attach to a local policy."),
    temperature: float = SAMPLING["temperature"],
    top_p: float = SAMPLING["top_p"],
    max_new_tokens: int = SAMPLING["max_new_tokens"],
    search: str = SEARCH_OPT,
    world: Optional[Path] = WORLD_OPT,
):
    """Run K trajectories for one request, render and judge them, and write a run folder."""
    from .evaluation import SandboxScorer, aggregate
    from .guides import oracle_guide
    from .records import RunInfo
    from .runs import RunWriter, new_run_id, now_iso
    from .world import World

    w = World(world)
    pol = _policy(w, policy, noise, skip_skill, p_distractor, model, adapter)
    try:
        req = w.request(request)
    except KeyError as exc:
        raise typer.BadParameter(exc.args[0], param_hint="--request") from exc
    if req.parse_error:
        from .world.requests import outside_world_note

        typer.echo("note: " + outside_world_note(req.parse_error))
    guides = None
    if guide:
        guides = {req.id: oracle_guide(w, req) if guide == "oracle" and req.scene else guide}
    run_id = new_run_id("rollout")
    out = out or Path("runs") / run_id
    writer = RunWriter(out, RunInfo(id=run_id, created=now_iso(), command="rollout", policy=pol.name if pol else "raw",
                                     k=k, seed=seed, requests=[req.id],
                                     config={"noise": noise, "skip_skill": skip_skill, "guide": guide, "temperature": temperature,
                                             "top_p": top_p, "max_new_tokens": max_new_tokens}))
    writer.add_request(req, w.gt_image(req) if req.scene else None)
    tools, scorer = _tools(w, search), SandboxScorer(w)
    trajs = _run([req], pol, tools, k, seed, _params(temperature, top_p, max_new_tokens), guides, f"rollouts ({req.id})")
    pairs, rows = [], []
    for traj in trajs:
        rendered, verdict = scorer.score(req, traj, writer.images, seed=traj.seed)
        writer.add(traj, rendered, verdict)
        pairs.append((req, verdict))
        rows.append([traj.id, traj.termination, traj.n_tool_calls, _f(verdict.F), _f(verdict.V), _f(verdict.T), _f(verdict.A),
                     _f(verdict.kscore), _f(verdict.r_text), _f(verdict.reward), (verdict.failed or verdict.rationale)[:60]])
    writer.finish(aggregate(pairs))
    typer.echo(_table(rows, ["trajectory", "end", "tools", "F", "V", "T", "A", "KScore", "R_text", "reward", "rationale"]))
    typer.echo(f"run folder: {out}")


@app.command()
def bench(
    policy: str = typer.Option("expert", help=POLICY_HELP),
    split: str = typer.Option("bench", help="Sandbox split to evaluate: sft, evolve or bench."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds; each seed runs one trajectory per request."),
    noise: str = typer.Option("none", help="Expert noise: 'none', 'cold-start' or 'blind-spots'."),
    skip_skill: list[str] = typer.Option([], help="Skill the expert never uses (repeatable)."),
    p_distractor: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Chance the expert takes a distractor reference."),
    guide: Optional[str] = typer.Option(None, help="Decision guide in the system prompt: 'oracle' (each request's correct "
                                        "guide), 'bank:<folder>' (its nearest experience in that bank, if it passes --gate), "
                                        "'shuffled' (another request's oracle guide) or 'shuffled:<folder>' (another request's "
                                        "nearest experience)."),
    gate: Optional[float] = typer.Option(None, min=-1.0, max=1.0, help="With --guide bank:<folder>: cosine gate (default 0.84)."),
    leave_own_out: bool = typer.Option(False, "--leave-own-out", help="With a bank guide: never retrieve an experience "
                                       "mined from the request itself (measures transfer to other requests)."),
    guide_seed: int = typer.Option(0, help="Seed of the shuffle for --guide shuffled[:<folder>]."),
    model: str = typer.Option("default", help="Model name to ask an OpenAI-compatible server for."),
    adapter: Optional[str] = typer.Option(None, help="LoRA adapter folder to attach to a local policy."),
    temperature: float = SAMPLING["temperature"],
    top_p: float = SAMPLING["top_p"],
    max_new_tokens: int = SAMPLING["max_new_tokens"],
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N requests (smoke runs)."),
    search: str = SEARCH_OPT,
    out: Optional[Path] = typer.Option(None, help="JSON file for the results (default: runs/bench-<policy>-<checksum>-<split>.json)."),
    world: Optional[Path] = WORLD_OPT,
    data: Optional[Path] = typer.Option(None, help="Official GenEvolve-Data-Bench folder: bench its rows with --generator and the VLM --judge."),
    generator: str = typer.Option("sandbox", help="With --data: 'sandbox', 'tiny', 't2i:<model>', 'img2img:<model>', 'qwen-edit:<model>' or render-service URLs."),
    judge: Optional[str] = typer.Option(None, help="With --data: OpenAI-compatible VLM judge URL ($OPENAI_API_KEY)."),
    judge_model: str = typer.Option("gpt-4o", help="With --data: judge model name."),
    judge_api_key: Optional[str] = typer.Option(None, help="With --data: judge API key (default: $OPENAI_API_KEY)."),
    judge_cache: Optional[Path] = typer.Option(Path("runs/judge-cache"), help="With --data: judge answers cached by content hash."),
    rpm: float = typer.Option(0.0, min=0.0, help="With --data: judge requests per minute at most (0: no limit)."),
    text_policy: str = typer.Option("renormalise", help="With --data: no-text requests: 'renormalise' (F,V,A) or 'half' (T = 0.5)."),
    missing: str = typer.Option("exclude", help="With --data: failed renders/judgements 'exclude'd from means (reported) or counted as 'zero'."),
    allow_missing: bool = typer.Option(False, help="With --data: keep rows whose ground truth is missing (as missing cases)."),
    device: Optional[str] = typer.Option(None, help="With --data: torch device for diffusers generators."),
):
    """Run a policy over a split, print KScore by track and category, and save JSON (mean and 95% CI over seeds)."""
    import tempfile

    if data is not None:
        from .cli_interop import bench_official

        return bench_official(data, policy, seeds, generator, judge, judge_model, judge_api_key, text_policy, missing,
                              allow_missing, limit, out, search, model, adapter, temperature, top_p, max_new_tokens, device,
                              judge_cache, rpm, world)

    import re

    from .evaluation import SandboxScorer, aggregate, mean_ci, protocol_valid
    from .guides import request_guides
    from .records import ImageStore, atomic_write_json
    from .runs import policy_checksum
    from .world import World

    if guide is None and (gate is not None or leave_own_out):
        raise typer.BadParameter("--gate and --leave-own-out need --guide bank:<folder> (or shuffled:<folder>)", param_hint="--guide")
    w = World(world)
    pol = _policy(w, policy, noise, skip_skill, p_distractor, model, adapter)
    checksum = policy_checksum(policy, adapter, pol.name if pol else "raw", model)
    reqs = w.split(split)[:limit]
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    tools, scorer = _tools(w, search), SandboxScorer(w)
    guides, guide_info = None, None
    if guide is not None:
        try:
            guides, guide_info = request_guides(guide, w, reqs, gate, leave_own_out, guide_seed)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--guide") from exc
    params = _params(temperature, top_p, max_new_tokens)
    per_seed, valid = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        store = ImageStore(tmp)
        for seed in seed_list:
            trajs = _run(reqs, pol, tools, 1, seed, params, guides, f"bench seed {seed}")
            pairs = [(req, scorer.score(req, t, store, seed=t.seed)[1]) for req, t in zip(reqs, trajs)]
            per_seed[seed] = aggregate(pairs)
            valid[seed] = sum(protocol_valid(t) for t in trajs) / len(trajs)
    summary: dict = {"policy": pol.name if pol else "raw", "policy_sha256": checksum, "adapter": adapter, "model": model,
                     "noise": noise if policy == "expert" else None, "world": str(w.root),
                     "split": split, "seeds": seed_list, "n_requests": len(reqs), "guide": guide, "guide_info": guide_info,
                     "sampling": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens},
                     "protocol_valid": {"per_seed": valid, **dict(zip(("mean", "ci95"), mean_ci(list(valid.values()))))},
                     "by": {}}
    for level in ("overall", "track", "category", "difficulty"):
        summary["by"][level] = {}
        for key in per_seed[seed_list[0]][level]:
            row = {}
            for d in ("kscore", "F", "V", "T", "A", "r_text", "reward"):
                vals = [per_seed[s][level][key][d] for s in seed_list if per_seed[s][level][key][d] is not None]
                m, ci = mean_ci(vals)
                row[d] = {"mean": m, "ci95": ci, "per_seed": vals}
            row["n"] = per_seed[seed_list[0]][level][key]["n"]
            row["failed"] = sum(per_seed[s][level][key]["failed"] for s in seed_list)
            row["missing"] = sum(per_seed[s][level][key]["missing"] for s in seed_list)
            summary["by"][level][key] = row
    if out is None:  # named by policy and checksum, so runs of different policies never overwrite each other
        label = re.sub(r"[^A-Za-z0-9._+-]+", "-", summary["policy"]).strip("-") or "policy"
        out = Path("runs") / f"bench-{label}-{checksum[:8]}-{split}.json"
    atomic_write_json(out, summary)
    rows = _score_rows(summary)
    pv = summary["protocol_valid"]
    typer.echo(f"policy: {summary['policy']}  split: {split}  seeds: {seed_list}  guide: {guide or '-'}  "
               f"protocol-valid: {pv['mean']:.3f}")
    if guide_info and guide_info["kind"] == "bank":
        sim = guide_info["similarity"]
        typer.echo(f"retrieved: {guide_info['hits']}/{len(reqs)} requests at cosine >= {guide_info['gate']}"
                   + (" (leave-own-out)" if leave_own_out else "")
                   + (f"; nearest similarity median {sim['median']:.3f}, max {sim['max']:.3f}" if sim else ""))
    typer.echo(_table(rows, ["by", "group", "n", "KScore (95% CI over seeds)", "F", "V", "T", "A", "failed", "missing"]))
    typer.echo(f"saved: {out}")


@app.command()
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
    copy_steps: int = typer.Option(0, min=0, help="Steps of a synthetic copy task first (teaches copying from far back in the context)."),
    copy_mix: int = typer.Option(0, min=0, help="Copy-task sequences added to every later batch."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (warm-up, then cosine decay to 10%)."),
    batch_tokens: int = typer.Option(8192, min=256, help="Padded tokens per optimizer step."),
    max_len: int = typer.Option(2048, min=16, help="Conversations longer than this many tokens lose their tail."),
    warmup_steps: int = typer.Option(30, min=0, help="Steps of linear learning-rate warm-up."),
    save_every: int = typer.Option(100, min=1, help="Optimizer steps between checkpoints (a re-run resumes from the last)."),
    lora_rank: int = typer.Option(0, min=0, help="Train a LoRA adapter of this rank instead of all weights, merged "
                                  "into the saved model (0: full fine-tuning)."),
    seed: int = typer.Option(0, help="Seed for data, initialisation and batching."),
    device: Optional[str] = typer.Option(None, help="Torch device (default: cuda if available, else cpu)."),
):
    """Supervised fine-tuning with an assistant-only loss; resumes from its last checkpoint if interrupted."""
    from .training.sft import SFTConfig, train_sft

    cfg = SFTConfig(out=str(out), recipe=recipe, model=model, data=str(data) if data else None, epochs=epochs, lr=lr,
                    pretrain_epochs=pretrain_epochs, guided_fraction=guided_fraction, noise=noise, extra_requests=extra_requests, copy_steps=copy_steps, copy_mix=copy_mix,
                    batch_tokens=batch_tokens, max_len=max_len, warmup_steps=warmup_steps, save_every=save_every,
                    lora_rank=lora_rank, seed=seed, device=device)
    try:
        cfg.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        result = train_sft(cfg, log=typer.echo)
    except (ValueError, FileNotFoundError) as exc:  # bad data, an unknown model, a work folder with other settings
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result))


@app.command()
def serve(
    policy: str = typer.Option("tiny", help="'tiny', 'smollm2' or a model folder to serve."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; use 0.0.0.0 to share on a network)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    model_name: Optional[str] = typer.Option(None, help="Name clients use in 'model' (default: the policy's name)."),
    adapter: Optional[str] = typer.Option(None, help="LoRA adapter folder to load at start (served under its folder name)."),
):
    """An OpenAI-compatible chat-completions server over a local policy, with vLLM-style dynamic LoRA loading."""
    from .policies.resolve import resolve_policy
    from .serve import run_server

    if policy in ("expert", "raw") or policy.startswith(("http://", "https://")):
        raise typer.BadParameter("serve needs a local model: tiny, smollm2 or a model folder", param_hint="--policy")
    pol = resolve_policy(policy)
    adapters = ()
    if adapter:
        name = Path(adapter).name
        pol.load_adapter(adapter, name)
        adapters = (name,)
    run_server(pol, model_name or pol.name, host=host, port=port, adapters=adapters)


def _evolve_cfg(out: Path, policy: str, steps: int, b: int, k: int, lambda_ved: float, lora_rank: int, lr: float,
                delta_min: float, gate: float, seed: int, use_grpo: bool, use_ved: bool, max_new_tokens: int,
                probe_request: Optional[str] = None, probe: bool = True, micro_batch: int = 8):
    from .training.evolve import EvolveConfig

    cfg = EvolveConfig(out=str(out), policy=policy, steps=steps, prompts_per_step=b, rollouts_per_prompt=k,
                       lambda_ved=lambda_ved, lora_rank=lora_rank, lr=lr, delta_min=delta_min, gate=gate, seed=seed,
                       use_grpo=use_grpo, use_ved=use_ved, max_new_tokens=max_new_tokens, probe_request=probe_request,
                       probe=probe, micro_batch=micro_batch)
    try:
        cfg.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    return cfg


def _stop_on_sigterm():
    """SIGTERM asks the training loop to stop after its current step (checkpointed); the studio's Stop sends it."""
    import signal

    asked: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: asked.append(1))
    return lambda: bool(asked)


def _train(cfg, world, stop) -> None:
    """Run the trainer; a stop or a locked run folder ends the command with a clear message."""
    from .training.evolve import evolve as run_evolve
    from .training.live import RunLockedError

    try:
        run_evolve(cfg, world=world, log=typer.echo, stop=stop)
    except RunLockedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if stop():
        typer.echo(f"stopped; {cfg.out} holds the last checkpoint: run the same command again to resume")
        raise typer.Exit(0)


def _bench_requests(world, quick: bool, n: Optional[int]):
    reqs = world.split("bench")
    if quick and n is None:
        n = 24
    return reqs[:: max(1, len(reqs) // n)][:n] if n else reqs


@app.command()
def evolve(
    quick: bool = typer.Option(False, "--quick", help="A few minutes: 2 steps of 4 prompts x 4 rollouts, 24 bench requests."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: runs/evolve-<time>); an existing one is resumed."),
    policy: str = typer.Option("tiny", help="The SFT student: 'tiny' or a model folder."),
    steps: Optional[int] = typer.Option(None, min=1, help="Self-evolution steps (default 5; quick 2)."),
    prompts: Optional[int] = typer.Option(None, "-B", min=1, help="Prompts per step (default 8; quick 4)."),
    rollouts: Optional[int] = typer.Option(None, "-K", min=2, help="Rollouts per prompt (default 6; quick 4)."),
    lambda_ved: float = typer.Option(2.0, min=0.0, help="Weight of the VED loss: L = L_GRPO + lambda * L_VED."),
    lora_rank: int = typer.Option(16, min=1, help="LoRA rank of the student's adapter."),
    lr: float = typer.Option(1e-3, help="Learning rate of the LoRA weights."),
    delta_min: float = typer.Option(0.20, min=0.0, max=1.0, help="Smallest best-vs-worst reward gap that makes an experience."),
    gate: float = typer.Option(0.84, min=-1.0, max=1.0, help="Cosine gate for retrieving an experience."),
    no_grpo: bool = typer.Option(False, "--no-grpo", help="Drop the GRPO term (VED only)."),
    no_ved: bool = typer.Option(False, "--no-ved", help="Drop the VED term (GRPO only)."),
    seed: int = typer.Option(0, help="Seed for prompt order, sampling and initialisation."),
    eval_seeds: str = typer.Option("0", help="Comma-separated seeds for the before/after/teacher bench comparison."),
    eval_requests: Optional[int] = typer.Option(None, min=1, help="Bench requests to compare on (default: all; quick 24)."),
    eval_samples: int = typer.Option(1, min=1, help="Trajectories per bench request and seed in the comparison (more: less sampling noise)."),
    max_new_tokens: int = typer.Option(384, min=16, help="Token budget of one assistant turn."),
    train_only: bool = typer.Option(False, "--train-only", help="Train and checkpoint; skip the bench comparison."),
    probe_request: Optional[str] = typer.Option(None, help="Sandbox request id the live student-vs-teacher view follows at every step (default: the first evolve request)."),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="Write each step's live student-vs-teacher probe (two extra rollouts a step)."),
    micro_batch: int = typer.Option(8, min=1, help="Sequences per forward/backward in the update (fewer: less memory)."),
):
    """One-click distill-and-compare: GRPO + VED from the SFT student, then before / after on the bench and the
    teacher where it retrieves an experience (training requests and bench hits).

    Under ``accelerate launch`` or ``torchrun`` the processes share the training (data-parallel); the
    main process then runs the comparison alone.
    """
    import signal
    import time as _time

    from .policies.resolve import resolve_policy
    from .records import ImageStore, atomic_write_json
    from .training.compare import evaluate, teacher_section, write_report
    from .world import World

    out = out or Path("runs") / f"evolve-{_time.strftime('%Y%m%d-%H%M%S')}"
    cfg = _evolve_cfg(out, policy, steps or (2 if quick else 5), prompts or (4 if quick else 8), rollouts or (4 if quick else 6),
                      lambda_ved, lora_rank, lr, delta_min, gate, seed, not no_grpo, not no_ved, max_new_tokens, probe_request,
                      probe, micro_batch)
    w = World()
    _check_probe_request(w, probe_request)
    t0 = _time.time()
    typer.echo(f"evolving {policy} ({cfg.arm}): {cfg.steps} steps x {cfg.prompts_per_step} prompts x {cfg.rollouts_per_prompt} rollouts -> {out}")
    _train(cfg, w, _stop_on_sigterm())
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # past training, SIGTERM ends the evaluation at once
    t_train = _time.time() - t0
    if train_only or int(os.environ.get("RANK", "0")) > 0:
        typer.echo(f"trained in {t_train:.0f} s; checkpoint: {out / 'checkpoint'}")
        return
    reqs = _bench_requests(w, quick, eval_requests)
    seeds = [int(x) for x in eval_seeds.split(",") if x.strip()]
    adapter = out / "checkpoint" / "adapter"
    before = resolve_policy(policy)
    before.name = "student (before)"
    after = resolve_policy(policy, adapter=str(adapter))
    after.name = "student (after)"
    results = {}
    for name, pol in (("student (before)", before), ("student (after)", after)):
        store = ImageStore(out / "report" / "images" / name.split()[0])
        res = evaluate(w, pol, reqs, seeds, store=store, progress=typer.echo, samples=eval_samples)
        res["store"] = store
        results[name] = res
    teacher_md, teacher = teacher_section(w, after, out / "bank", reqs, seeds, gate, eval_samples, typer.echo)
    extra = teacher_md + f"\n\nTraining took {t_train:.0f} s; total {_time.time() - t0:.0f} s."
    report = write_report(out / "report", f"Distill and compare: {policy}, {cfg.arm}", results, w,
                          {cfg.arm: [out / "metrics.jsonl"]}, extra,
                          config=cfg.__dict__ | {"eval_requests": len(reqs), "eval_seeds": seeds, "eval_samples": eval_samples})
    atomic_write_json(out / "report" / "teacher.json", teacher)
    typer.echo(open(report).read().split("## Learning curves")[0])
    typer.echo(f"report: {report}  ({_time.time() - t0:.0f} s in all)")


def _check_probe_request(w, probe_request: str | None) -> None:
    if probe_request is not None and probe_request not in {r.id for r in w.requests}:
        raise typer.BadParameter(f"{probe_request!r} is not a sandbox request id (e.g. {w.split('evolve')[0].id})",
                                 param_hint="--probe-request")


def _save_eval(eval_dir: Path, res: dict) -> None:
    """An arm-seed's evaluation (summary, trajectories, verdicts), swapped in whole: the folder exists only when done."""
    import shutil

    from .records import atomic_write_json, replace_dir, write_jsonl

    tmp = eval_dir.with_name(eval_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_jsonl(tmp / "trajectories.jsonl", [r["trajectory"] for r in res["records"]])
    write_jsonl(tmp / "verdicts.jsonl", [r["verdict"] for r in res["records"]])
    atomic_write_json(tmp / "eval.json", {"summary": res["summary"], "records": [
        {k: r[k] for k in ("seed", "sample", "request")} for r in res["records"]]})
    replace_dir(tmp, eval_dir)


def _load_eval(eval_dir: Path) -> dict:
    from .records import Trajectory, Verdict, read_jsonl

    saved = json.loads((eval_dir / "eval.json").read_text(encoding="utf-8"))
    trajs, verdicts = read_jsonl(eval_dir / "trajectories.jsonl", Trajectory), read_jsonl(eval_dir / "verdicts.jsonl", Verdict)
    if not len(trajs) == len(verdicts) == len(saved["records"]):
        raise ValueError(f"{eval_dir} is incomplete; delete it to evaluate that arm again")
    return {"summary": saved["summary"], "records": [r | {"trajectory": t, "verdict": v}
                                                      for r, t, v in zip(saved["records"], trajs, verdicts)]}


def _ablate_settings(out: Path, settings: dict) -> None:
    """Record what an ablation folder runs; a re-run with other settings would mix results, so it stops."""
    from .records import atomic_write_json

    path = out / "ablate_config.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != settings:
            diff = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(v)}" for k, v in settings.items() if old.get(k) != v)
            typer.echo(f"error: {out} holds an ablation run with other settings ({diff}). Re-run with the same settings "
                       "to resume it (arms and seeds may change), or choose another --out.", err=True)
            raise typer.Exit(2)
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, settings)


def _short(v) -> str:
    return f"{len(v)} requests" if isinstance(v, list) else repr(v)


@app.command()
def ablate(
    quick: bool = typer.Option(False, "--quick", help="A few minutes: 1 step of 4 prompts x 4 rollouts per arm, 1 seed, 24 requests."),
    out: Optional[Path] = typer.Option(None, help="Folder for every arm's run and the report (default: runs/ablate-<time>); "
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
    probe_request: Optional[str] = typer.Option(None, help="Sandbox request id every arm's live student-vs-teacher view follows (default: the first evolve request)."),
    teacher: bool = typer.Option(True, "--teacher/--no-teacher", help="Measure the teacher (the full method's trained "
                                 "student with its bank's experiences) where it gets a guide, at the first seed."),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="Write each step's live student-vs-teacher probe (two extra "
                               "rollouts a step, apart from training; --no-probe saves their time on a slow student)."),
    micro_batch: int = typer.Option(8, min=1, help="Sequences per forward/backward in the update (fewer: less memory; a "
                                    "49k-token vocabulary over 8 long rollouts needs tens of GB)."),
):
    """The ablation: SFT-only, +GRPO, +VED, +GRPO+VED at the same number of rollouts, several seeds, mean ± 95% CI."""
    import time as _time

    from .evaluation import mean_ci
    from .policies.base import SamplingParams
    from .policies.resolve import resolve_policy
    from .records import ImageStore, atomic_write_json, atomic_write_text
    from .runs import policy_checksum
    from .training.compare import ablation_run_record, evaluate, identical_arms, teacher_section, write_report
    from .world import World

    arm_list = [a.strip() for a in arms.split(",") if a.strip()]
    bad = [a for a in arm_list if a not in ("sft", "grpo", "ved", "grpo+ved")]
    if bad:
        raise typer.BadParameter(f"unknown arms {bad}", param_hint="--arms")
    seed_list = [int(x) for x in (seeds or ("0" if quick else "0,1,2")).split(",") if x.strip()]
    out = out or Path("runs") / f"ablate-{_time.strftime('%Y%m%d-%H%M%S')}"
    w = World()
    _check_probe_request(w, probe_request)
    reqs = _bench_requests(w, quick, eval_requests)
    n_steps, b, k = steps or (1 if quick else 4), prompts or (4 if quick else 8), rollouts or (4 if quick else 6)
    try:
        sha = policy_checksum(policy)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--policy") from exc
    _ablate_settings(out, {"policy": policy, "policy_sha256": sha, "steps": n_steps, "B": b, "K": k, "lambda_ved": lambda_ved,
                           "lora_rank": lora_rank, "lr": lr, "eval_requests": [r.id for r in reqs], "eval_samples": eval_samples,
                           "max_new_tokens": max_new_tokens, "probe_request": probe_request}
                    | ({"micro_batch": micro_batch} if micro_batch != 8 else {}))
    params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=max_new_tokens)
    stop = _stop_on_sigterm()
    t0 = _time.time()
    per_arm: dict[str, list[dict]] = {a: [] for a in arm_list}
    metrics: dict[str, list[Path]] = {a: [] for a in arm_list if a != "sft"}
    runs_made: list[dict] = []  # what each arm and seed ran: enough to tell two arms apart from the saved results
    for seed in seed_list:
        for arm in arm_list:
            store = ImageStore(out / "images" / f"{arm}-s{seed}")
            run_dir = out / f"{arm}-s{seed}"  # for sft only its eval/ folder
            adapter = None if arm == "sft" else run_dir / "checkpoint" / "adapter"
            if arm != "sft":
                metrics[arm].append(run_dir / "metrics.jsonl")
            if (run_dir / "eval" / "eval.json").exists():
                res = _load_eval(run_dir / "eval")
                typer.echo(f"[{arm} seed {seed}] done earlier, loaded")
            else:
                if arm == "sft":
                    pol = resolve_policy(policy)
                else:
                    cfg = _evolve_cfg(run_dir, policy, n_steps, b, k, lambda_ved, lora_rank, lr, 0.20, 0.84, seed,
                                      "grpo" in arm, "ved" in arm, max_new_tokens, probe_request, probe, micro_batch)
                    typer.echo(f"[{arm} seed {seed}] training -> {run_dir}")
                    _train(cfg, w, stop)
                    pol = resolve_policy(policy, adapter=str(adapter))
                pol.name = arm
                res = evaluate(w, pol, reqs, [seed], params=params, store=store, progress=typer.echo, samples=eval_samples)
                _save_eval(run_dir / "eval", res)
            res["store"] = store
            per_arm[arm].append(res)
            runs_made.append(ablation_run_record(arm, seed, policy, adapter, res["records"]))
            typer.echo(f"[{arm} seed {seed}] bench KScore {res['summary']['overall']['all']['kscore']['mean']:.3f} "
                       f"({_time.time() - t0:.0f} s so far)")
    # Mean ± 95% CI over seeds, per arm, overall and per track, for every dimension.
    results = {}
    for arm, runs in per_arm.items():
        summary = {"overall": {}, "track": {}}
        for level in ("overall", "track"):
            keys = runs[0]["summary"][level].keys()
            for key in keys:
                summary[level][key] = {}
                for d in ("kscore", "F", "V", "T", "A", "r_text", "reward"):
                    vals = [r["summary"][level][key][d]["mean"] for r in runs if r["summary"][level][key][d]["mean"] is not None]
                    vals = [v for v in vals if v == v]
                    summary[level][key][d] = dict(zip(("mean", "ci95"), mean_ci(vals))) | {"per_seed": vals}
        results[arm] = {"summary": summary, "records": runs[0]["records"], "store": runs[0]["store"]}
    sft_k = results.get("sft", {}).get("summary", {}).get("overall", {}).get("all", {}).get("kscore", {})
    lines = ["## Gains over SFT-only (overall KScore)", "",
             "The paired gain compares each arm with SFT-only seed by seed (same seed, same bench requests).", "",
             "| arm | KScore | gain over SFT | paired gain ± 95 % CI | per seed |", "| --- | --- | --- | --- | --- |"]
    for arm, r in results.items():
        k = r["summary"]["overall"]["all"]["kscore"]
        gain = f"{k['mean'] - sft_k['mean']:+.3f}" if sft_k else "-"
        paired = "-"
        if sft_k and len(sft_k["per_seed"]) == len(k["per_seed"]) and arm != "sft":
            pm, pc = mean_ci([a - b for a, b in zip(k["per_seed"], sft_k["per_seed"])])
            paired = f"{pm:+.3f}" + (f" ± {pc:.3f}" if pc is not None else " (one seed, no CI)")
        ci = f" ± {k['ci95']:.3f}" if k["ci95"] is not None else ""
        lines.append(f"| {arm} | {k['mean']:.3f}{ci} | {gain} | {paired} | " + ", ".join(f"{x:.3f}" for x in k["per_seed"]) + " |")
    same = identical_arms(runs_made)
    if same:
        lines += ["", "Arms that wrote identical evaluation trajectories at a seed (so the same scores): their weights "
                  "differed too little to flip any sampled token.", ""]
        lines += [f"- seed {d['seed']}: {d['arms'][0]} and {d['arms'][1]}; adapters {d['sha256'][0][:12]} and "
                  f"{d['sha256'][1][:12]}, relative L2 distance {d['relative_distance']}" for d in same]
    teacher_arm = next((a for a in ("grpo+ved", "ved") if a in arm_list), None)
    teacher_data = None
    if teacher and teacher_arm:
        tdir, t_seed = out / "teacher", seed_list[0]
        sha = next(r["policy_sha256"] for r in runs_made if r["arm"] == teacher_arm and r["seed"] == t_seed)
        earlier = json.loads((tdir / "teacher.json").read_text("utf-8")) if (tdir / "teacher.json").exists() else {}
        if earlier.get("adapter_sha256") == sha and (tdir / "teacher.md").exists():
            teacher_md, teacher_data = (tdir / "teacher.md").read_text("utf-8"), earlier
            typer.echo("[teacher] done earlier, loaded")
        else:
            run_dir = out / f"{teacher_arm}-s{t_seed}"
            pol = resolve_policy(policy, adapter=str(run_dir / "checkpoint" / "adapter"))
            pol.name = teacher_arm
            teacher_md, teacher_data = teacher_section(w, pol, run_dir / "bank", reqs, [t_seed], 0.84, eval_samples, typer.echo)
            teacher_md = teacher_md.replace("## Teacher\n", f"## Teacher ({teacher_arm}, seed {t_seed})\n", 1)
            teacher_data |= {"arm": teacher_arm, "seed": t_seed, "adapter_sha256": sha}
            atomic_write_json(tdir / "teacher.json", teacher_data)
            atomic_write_text(tdir / "teacher.md", teacher_md)
        lines += ["", teacher_md]
    extra = "\n".join(lines) + f"\n\nTotal time: {_time.time() - t0:.0f} s for {len(seed_list)} seed(s) x {len(arm_list)} arm(s)."
    report = write_report(out / "report", f"Ablation: {policy}", results, w, metrics, extra,
                          config={"seeds": seed_list, "arms": arm_list, "steps": n_steps, "B": b, "K": k, "lambda_ved": lambda_ved,
                                  "eval_requests": len(reqs), "eval_samples": eval_samples, "max_new_tokens": max_new_tokens})
    atomic_write_json(out / "ablation.json", {a: r["summary"] for a, r in results.items()}
                      | {"runs": runs_made, "identical_arms": same, "teacher": teacher_data, "seconds": _time.time() - t0})
    typer.echo("\n".join(lines))
    typer.echo(f"report: {report}  ({_time.time() - t0:.0f} s in all)")


@app.command()
def studio(
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default; 0.0.0.0 shares it on a network: set a password)."),
    port: int = typer.Option(7860, min=1, max=65535, help="Port to listen on."),
    password_env: str = typer.Option("GENEVOLVE_STUDIO_PASSWORD", help="Environment variable holding a password; "
                                     "when it is set, the studio asks for it (any user name)."),
    runs: Path = typer.Option(Path("runs"), help="Folder of run folders the studio opens and writes."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder for your reference uploads and edits "
                                            "(default: $GENEVOLVE_DATA, else ~/.local/share/genevolve); the shipped world is never written."),
    world: Optional[Path] = WORLD_OPT,
):
    """The Gradio studio: trajectories side by side, experience and reference editors, distill with a live
    student-vs-teacher view, and bench comparisons, on the offline sandbox."""
    from studio.app import launch
    from studio.services import Services

    password = os.environ.get(password_env) or None
    if host not in ("127.0.0.1", "localhost", "::1") and not password:
        typer.echo(f"warning: binding {host} without a password; set ${password_env} to require one", err=True)
    services = Services.create(world_dir=world, runs_dir=runs, data_dir=data_dir)
    typer.echo(f"GenEvolve Studio on http://{host}:{port}  (world: {services.world.root}, runs: {services.runs_dir}, "
               f"data: {services.data_dir}, device: {services.device})")
    launch(services, host=host, port=port, password=password)


from . import cli_interop  # noqa: E402,F401  (registers render-service, gateway, index, data, experiences, wise)

if __name__ == "__main__":
    app()
