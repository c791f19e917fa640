"""A policy over a sandbox split, or over official bench rows with any generator and a VLM judge."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (POLICY_HELP, SAMPLING, SEARCH_OPT, WORLD_OPT, Bars, make_policy, make_tools, open_generator,
                     open_judges, sampling_params, score_rows, table)

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
    gate: Optional[float] = typer.Option(None, min=-1.0, max=1.0, help="With --guide bank:<folder>: cosine gate (default: "
                                         "0.90 with the situation key, 0.84 with the request key)."),
    leave_own_out: bool = typer.Option(False, "--leave-own-out", help="With a bank guide: never retrieve an experience "
                                       "mined from the request itself (measures transfer to other requests)."),
    guide_seed: int = typer.Option(0, help="Seed of the shuffle for --guide shuffled[:<folder>]."),
    retrieval_key: str = typer.Option("situation", help="With a bank guide: what retrieval compares, 'situation' (the "
                                      "request's situation, read from its text, with the experiences' triggers) or "
                                      "'request' (raw request texts)."),
    describer: str = typer.Option("cues", help="With the situation key: who reads a request's situation, 'cues' (offline, "
                                  "from its words) or a chat model (an OpenAI-compatible URL, 'smollm2' or a model folder; "
                                  "--model names it on a server) asked with a versioned prompt, to match an LLM summariser's "
                                  "triggers."),
    model: str = typer.Option("default", help="Model name to ask an OpenAI-compatible server for."),
    adapter: Optional[str] = typer.Option(None, help="LoRA adapter folder to attach to a local policy."),
    temperature: float = SAMPLING["temperature"],
    top_p: float = SAMPLING["top_p"],
    max_new_tokens: int = SAMPLING["max_new_tokens"],
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N requests (smoke runs)."),
    search: str = SEARCH_OPT,
    out: Optional[Path] = typer.Option(None, help="JSON file for the results (default: bench-<policy>-<checksum>-<split>.json in the runs folder)."),
    world: Optional[Path] = WORLD_OPT,
    data: Optional[Path] = typer.Option(None, help="Official GenEvolve-Data-Bench folder: bench its rows with --generator and the VLM --judge."),
    generator: str = typer.Option("sandbox", help="With --data: 'sandbox', 'tiny', 't2i:<model>', 'img2img:<model>', 'qwen-edit:<model>' or render-service URLs."),
    judge: Optional[str] = typer.Option(None, help="With --data: OpenAI-compatible VLM judge URL ($OPENAI_API_KEY)."),
    judge_model: str = typer.Option("gpt-4o", help="With --data: judge model name."),
    judge_api_key: Optional[str] = typer.Option(None, help="With --data: judge API key (default: $OPENAI_API_KEY)."),
    judge_cache: Optional[Path] = typer.Option(None, help="With --data: judge answers cached by content hash (default: "
                                               "judge-cache/ in the runs folder)."),
    rpm: float = typer.Option(0.0, min=0.0, help="With --data: judge requests per minute at most (0: no limit)."),
    text_policy: str = typer.Option("renormalise", help="With --data: no-text requests: 'renormalise' (F,V,A) or 'half' (T = 0.5)."),
    missing: str = typer.Option("exclude", help="With --data: failed renders/judgements 'exclude'd from means (reported) or counted as 'zero'."),
    allow_missing: bool = typer.Option(False, help="With --data: keep rows whose ground truth is missing (as missing cases)."),
    device: Optional[str] = typer.Option(None, help="With --data: torch device for diffusers generators."),
):
    """Run a policy over a split, print KScore by track and category, and save JSON (mean and 95% CI over seeds)."""
    if data is not None:
        return bench_official(data, policy, seeds, generator, judge, judge_model, judge_api_key, text_policy, missing,
                              allow_missing, limit, out, search, model, adapter, temperature, top_p, max_new_tokens, device,
                              judge_cache, rpm, world)

    from ..records.runs import policy_checksum
    from ..records.schema import atomic_write_json
    from ..world import World

    if out is not None:
        check_writable(out)  # before any work: the results are never lost to an unwritable folder
    w = World(world)
    pol = make_policy(w, policy, noise, skip_skill, p_distractor, model, adapter)
    checksum = policy_checksum(policy, adapter, pol.name if pol else "raw", model)
    if out is None:
        out = _default_out(pol.name if pol else "raw", checksum, split)
        check_writable(out)
    reqs = w.split(split)[:limit]
    guides, guide_info = _guides(w, reqs, guide, gate, leave_own_out, guide_seed, retrieval_key, describer, model)
    summary = _sandbox_bench(w, pol, reqs, seeds, search, sampling_params(temperature, top_p, max_new_tokens), guides) | {
        "adapter": adapter, "model": model, "noise": noise if policy == "expert" else None, "split": split,
        "guide": guide, "guide_info": guide_info, "policy_sha256": checksum}
    atomic_write_json(out, summary)
    _print_summary(summary, len(reqs), leave_own_out)
    typer.echo(f"saved: {out}")


def check_writable(out: Path) -> None:
    """Refuse, in one line, a results file that could not be written: a probe file is created beside it (by the
    same call an atomic write uses) and removed, so the answer is the file system's, whoever runs it."""
    import os
    import tempfile

    try:
        if out.is_dir():
            raise IsADirectoryError(f"{out} is a folder; --out names the results file")
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        typer.echo(f"error: cannot write the results to {out} ({exc.strerror or exc}): make {out.parent} writable or "
                   "choose another --out (nothing was evaluated)", err=True)
        raise typer.Exit(2) from None


def _default_out(policy_name: str, checksum: str, split: str) -> Path:
    """Named by policy and checksum, so runs of different policies never overwrite each other."""
    import re

    from ..records.paths import runs_dir

    label = re.sub(r"[^A-Za-z0-9._+-]+", "-", policy_name).strip("-") or "policy"
    return runs_dir() / f"bench-{label}-{checksum[:8]}-{split}.json"


def _guides(w, reqs, guide, gate, leave_own_out: bool, guide_seed: int, retrieval_key: str, describer: str, model: str):
    """``--guide`` and its options as each request's guide and an account of what was given (None, None: no guide)."""
    if retrieval_key not in ("situation", "request"):
        raise typer.BadParameter(f"--retrieval-key is 'situation' or 'request', not {retrieval_key!r}", param_hint="--retrieval-key")
    if guide is None:
        if gate is not None or leave_own_out:
            raise typer.BadParameter("--gate and --leave-own-out need --guide bank:<folder> (or shuffled:<folder>)",
                                     param_hint="--guide")
        return None, None
    from ..agent.guides import request_guides

    try:
        return request_guides(guide, w, reqs, gate, leave_own_out, guide_seed, retrieval_key, _describer(describer, model))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--guide") from exc


def _sandbox_bench(w, pol, reqs, seeds: str, search: str, params, guides) -> dict:
    """The evaluation of ``genevolve bench`` on a sandbox split: its results, ready to be saved."""
    import tempfile

    from ..evaluation.bench import SandboxScorer, evaluate
    from ..records.schema import ImageStore

    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp, Bars("bench seed") as bars:
        ev = evaluate(reqs, pol, make_tools(w, search), SandboxScorer(w), ImageStore(tmp), seed_list, params=params,
                      guides=guides, on_turn=bars.update)
    return {"policy": pol.name if pol else "raw", "world": str(w.root), "seeds": seed_list, "n_requests": len(reqs),
            "sampling": {"temperature": params.temperature, "top_p": params.top_p, "max_new_tokens": params.max_new_tokens},
            "protocol_valid": ev.protocol_valid, "by": ev.by}


def _describer(spec: str, model: str):
    """``--describer``: None (the offline cue reader) or an LLM describer over a resolved chat policy."""
    if spec == "cues":
        return None
    from ..experience.situation import LLMDescriber
    from ..policies.resolve import resolve_policy

    try:
        return LLMDescriber(resolve_policy(spec, model=model))
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--describer") from exc


def _print_summary(summary: dict, n_requests: int, leave_own_out: bool) -> None:
    """The bench's headline (policy, protocol-valid rate, retrieval) and its table by overall, track and category."""
    pv, info = summary["protocol_valid"], summary["guide_info"]
    typer.echo(f"policy: {summary['policy']}  split: {summary['split']}  seeds: {summary['seeds']}  "
               f"guide: {summary['guide'] or '-'}  protocol-valid: {pv['mean']:.3f}")
    if info and info["kind"] == "bank":
        sim = info["similarity"]
        typer.echo(f"retrieved ({info['key']} key): {info['hits']}/{n_requests} requests at cosine >= {info['gate']}"
                   + (" (leave-own-out)" if leave_own_out else "")
                   + (f"; nearest similarity median {sim['median']:.3f}, max {sim['max']:.3f}" if sim else ""))
    typer.echo(table(score_rows(summary), ["by", "group", "n", "KScore (95% CI over seeds)", "F", "V", "T", "A", "failed", "missing"]))



def bench_official(data: Path, policy: str, seeds: str, generator: str, judge: Optional[str], judge_model: str,
                   judge_api_key: Optional[str], text_policy: str, missing: str, allow_missing: bool, limit: Optional[int],
                   out: Optional[Path], search: str, model: str, adapter: Optional[str], temperature: float, top_p: float,
                   max_new_tokens: int, device: Optional[str], judge_cache: Optional[Path], rpm: float, world: Optional[Path]):
    """`genevolve bench --data`: the official bench rows, any generator, the VLM judge."""
    import tempfile

    from ..evaluation.official import DataError, load_requests, run_bench
    from ..records.schema import ImageStore, atomic_write_json
    from ..evaluation.scoring import MISSING_POLICIES, ModelScorer
    from ..world import World

    if not judge:
        raise typer.BadParameter("bench --data needs --judge (an OpenAI-compatible VLM URL)", param_hint="--judge")
    if missing not in MISSING_POLICIES:
        raise typer.BadParameter(f"--missing is one of {', '.join(MISSING_POLICIES)}", param_hint="--missing")
    from ..records.paths import runs_dir

    out = out or runs_dir() / f"bench-official-{Path(policy).name or 'remote'}.json"
    check_writable(out)
    w = World(world)

    vlm, pj = open_judges(judge, judge_model, judge_api_key, text_policy, judge_cache or runs_dir() / "judge-cache", rpm)
    gen = open_generator(generator, device, None, world=w)
    pol = make_policy(w, policy, "none", [], None, model, adapter)
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        store = ImageStore(tmp)
        try:
            loaded = load_requests(data, store, allow_missing=allow_missing, limit=limit)
        except DataError as exc:
            raise typer.BadParameter(str(exc), param_hint="--data") from exc
        scorer = ModelScorer(gen, vlm, pj, gt_store=store)
        res = run_bench(loaded.requests, pol, make_tools(w, search), scorer, store, seed_list,
                        sampling_params(temperature, top_p, max_new_tokens), missing, progress=typer.echo)
    summary = {"policy": pol.name if pol else "raw", "data": str(data), "generator": gen.name, "judge": vlm.name,
               "text_policy": text_policy, **res["summary"]}
    atomic_write_json(out, summary)
    rows = score_rows(summary)
    typer.echo(f"policy: {summary['policy']}  data: {data}  generator: {gen.name}  judge: {vlm.name}  text policy: {text_policy}")
    typer.echo(table(rows, ["by", "group", "n", "KScore (95% CI over seeds)", "F", "V", "T", "A", "failed", "missing"]))
    for s, m in summary["missing"].items():
        if m["n"]:
            how = "counted as 0 in the table" if m["policy"] == "zero" else "left out of the table's means"
            typer.echo(f"seed {s}: {m['n']}/{m['of']} missing cases ({how}): {m['reasons']}; "
                       + (f"KScore with them as 0: {m['kscore_missing_as_zero']:.3f}" if m["kscore_missing_as_zero"] is not None
                          else "nothing was judged"))
    typer.echo(f"saved: {out}")


def register(app: typer.Typer) -> None:
    app.command()(bench)
