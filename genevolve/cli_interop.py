"""Interop commands of the ``genevolve`` CLI: servers, real-model scoring, official data, WISE.

Registered on :data:`genevolve.cli.app` when that module is imported; thin like the rest of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .cli import POLICY_HELP, SEARCH_OPT, WORLD_OPT, _params, _policy, _f, _score_rows, _table, _tools, app

data_app = typer.Typer(help="Official GenEvolve-Data-Bench folders in, our trajectories out as SFT rows.", no_args_is_help=True)
exp_app = typer.Typer(help="Visual experiences from run folders.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(exp_app, name="experiences")

GENERATOR_HELP = ("'sandbox', 'tiny' (random-weight diffusers pipeline), 't2i:<model id or folder>', 'img2img:<model>', "
                  "'ip-adapter:<model>', 'qwen-edit:<model>', or render-service URLs (http://host:port, comma-separated).")
JUDGE_HELP = "OpenAI-compatible base URL of the VLM judge (key: $OPENAI_API_KEY or --judge-api-key)."


def open_generator(spec: str, device: Optional[str], dtype: Optional[str], steps: Optional[int] = None,
                   timeout: Optional[float] = None, world=None, ip_adapter: Optional[str] = None):
    from .generators import open_generator as _open

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
    from .judges.vlm import ProgramJudge, VLMJudge

    try:
        common = dict(api_key=api_key, cache_dir=cache, rpm=rpm)
        judge = VLMJudge(url, model, text_policy=text_policy, **common)
        pj = ProgramJudge(url, model, limiter=judge.limiter, **common) if sufficiency else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--judge") from exc
    return judge, pj


@app.command("render-service")
def render_service(
    generator: str = typer.Option("sandbox", help=GENERATOR_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8100, min=1, max=65535),
    device: Optional[str] = typer.Option(None, help="Torch device for diffusers (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: bf16 on CUDA, fp32 on CPU)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Denoising steps for diffusers generators."),
    timeout: Optional[float] = typer.Option(None, help="Seconds one render may take before it fails."),
    ip_adapter: Optional[str] = typer.Option(None, help="IP-Adapter weights (repo id or folder) for ip-adapter:<model>."),
    world: Optional[Path] = WORLD_OPT,
):
    """Serve a generator with the render-service protocol: POST /generate {prompt, image_urls} -> {success, image}."""
    from .render_server import run_render_server
    from .world import World

    gen = open_generator(generator, device, dtype, steps, timeout, World(world) if generator == "sandbox" else None, ip_adapter)
    typer.echo(f"render service: {gen.name} on http://{host}:{port}/generate")
    run_render_server(gen, host=host, port=port)


@app.command()
def gateway(
    store: Optional[Path] = typer.Option(None, help="Store folder: the sandbox world (default) or one built by `genevolve index`."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8200, min=1, max=65535),
    api_key: Optional[str] = typer.Option(None, help="Require this key as X-API-KEY."),
    world: Optional[Path] = WORLD_OPT,
):
    """Serve a store with Serper's /search and /images formats (point SERPER_BASE_URL at it)."""
    from .gateway import run_gateway
    from .world import default_world_dir

    folder = store or (world or default_world_dir())
    try:
        typer.echo(f"gateway: {folder} on http://{host}:{port} (/search, /images, /files/<id>)")
        run_gateway(folder, host=host, port=port, api_key=api_key)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--store") from exc


@app.command()
def index(
    folder: Path = typer.Argument(..., help="Folder of .txt/.md documents and pictures (captions: same-stem .txt)."),
    out: Optional[Path] = typer.Option(None, help="Store folder to write (default: <folder>.store)."),
    chunk_chars: int = typer.Option(800, min=100, help="Passage length for documents."),
):
    """Build a searchable store (corpus, pictures, FAISS indexes) from any folder, for the gateway and --search."""
    from .corpus import index_folder

    try:
        counts = index_folder(folder, out or folder.with_name(folder.name + ".store"), chunk_chars=chunk_chars, log=typer.echo)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="FOLDER") from exc
    typer.echo(json.dumps(counts))


def bench_official(data: Path, policy: str, seeds: str, generator: str, judge: Optional[str], judge_model: str,
                   judge_api_key: Optional[str], text_policy: str, missing: str, allow_missing: bool, limit: Optional[int],
                   out: Optional[Path], search: str, model: str, adapter: Optional[str], temperature: float, top_p: float,
                   max_new_tokens: int, device: Optional[str], judge_cache: Optional[Path], rpm: float, world: Optional[Path]):
    """`genevolve bench --data`: the official bench rows, any generator, the VLM judge."""
    import tempfile

    from .official import DataError, load_requests, run_bench
    from .records import ImageStore, atomic_write_json
    from .scoring import MISSING_POLICIES, ModelScorer
    from .world import World

    if not judge:
        raise typer.BadParameter("bench --data needs --judge (an OpenAI-compatible VLM URL)", param_hint="--judge")
    if missing not in MISSING_POLICIES:
        raise typer.BadParameter(f"--missing is one of {', '.join(MISSING_POLICIES)}", param_hint="--missing")
    w = World(world)
    vlm, pj = open_judges(judge, judge_model, judge_api_key, text_policy, judge_cache, rpm)
    gen = open_generator(generator, device, None, world=w)
    pol = _policy(w, policy, "none", [], None, model, adapter)
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        store = ImageStore(tmp)
        try:
            loaded = load_requests(data, store, allow_missing=allow_missing, limit=limit)
        except DataError as exc:
            raise typer.BadParameter(str(exc), param_hint="--data") from exc
        scorer = ModelScorer(gen, vlm, pj, gt_store=store)
        res = run_bench(loaded.requests, pol, _tools(w, search), scorer, store, seed_list,
                        _params(temperature, top_p, max_new_tokens), missing, progress=typer.echo)
    summary = {"policy": pol.name if pol else "raw", "data": str(data), "generator": gen.name, "judge": vlm.name,
               "text_policy": text_policy, **res["summary"]}
    out = out or Path("runs") / f"bench-official-{Path(policy).name or 'remote'}.json"
    atomic_write_json(out, summary)
    rows = _score_rows(summary)
    typer.echo(f"policy: {summary['policy']}  data: {data}  generator: {gen.name}  judge: {vlm.name}  text policy: {text_policy}")
    typer.echo(_table(rows, ["by", "group", "n", "KScore (95% CI over seeds)", "F", "V", "T", "A", "failed", "missing"]))
    for s, m in summary["missing"].items():
        if m["n"]:
            typer.echo(f"seed {s}: {m['n']}/{m['of']} missing cases ({m['policy']}d from the means): {m['reasons']}; "
                       + (f"KScore with them as 0: {m['kscore_missing_as_zero']:.3f}" if m["kscore_missing_as_zero"] is not None
                          else "nothing was judged"))
    typer.echo(f"saved: {out}")


@data_app.command("import")
def data_import(
    root: Path = typer.Argument(..., help="Local copy of the GenEvolve-Data-Bench layout (bench/, rl/, sft/)."),
    out: Path = typer.Option(..., help="Run folder to write (run.json, requests.jsonl, trajectories.jsonl, images/)."),
    sft_out: Optional[Path] = typer.Option(None, help="Also write the SFT split as {'messages'} rows for `genevolve sft --data`."),
    allow_missing: bool = typer.Option(False, help="Keep rows whose pictures are missing (recorded as missing cases)."),
):
    """Load the official bench rows, RL prompts and SFT trajectories into a run folder (turns read as the official runtime reads them)."""
    from .official import DataError, data_files, load_requests, load_sft, sft_messages
    from .records import ImageStore, Request, RunInfo, atomic_write_json, atomic_write_text, write_jsonl
    from .runs import RunWriter, new_run_id, now_iso

    out = out.resolve()  # trajectories name their pictures by path: keep it valid from any working folder
    if (out / "run.json").exists():
        raise typer.BadParameter(f"{out} already holds a run; choose another --out", param_hint="--out")
    store = ImageStore(out / "images")
    reqs, trajs, missing = [], [], []
    try:
        for kind in ("bench", "rl"):
            if data_files(root, kind):
                got = load_requests(root, store, kind, allow_missing=allow_missing)
                reqs += got.requests
                missing += got.missing
        if data_files(root, "sft"):
            got = load_sft(root, allow_missing=allow_missing, image_dir=store.root)
            trajs, missing = got.trajectories, missing + got.missing
    except DataError as exc:
        raise typer.BadParameter(str(exc), param_hint="ROOT") from exc
    if not reqs and not trajs:
        raise typer.BadParameter(f"nothing to import under {root}: no bench/, rl/ or sft/ files", param_hint="ROOT")
    # every trajectory's request is in the run, as in any other run folder
    known = {r.id for r in reqs}
    for t in trajs:
        if t.request_id not in known:
            known.add(t.request_id)
            reqs.append(Request(id=t.request_id, text=t.request_text, split="sft"))
    counts = {"requests": len(reqs), "trajectories": len(trajs), "missing_pictures": len(missing)}
    try:
        w = RunWriter(out, RunInfo(id=new_run_id("import"), created=now_iso(), command="data import", policy="imported",
                                   k=1, seed=0, requests=[r.id for r in reqs],
                                   config={"source": str(Path(root).resolve()), "allow_missing": allow_missing}))
    except FileExistsError as exc:
        raise typer.BadParameter(str(exc), param_hint="--out") from exc
    write_jsonl(w.dir / "requests.jsonl", reqs)
    write_jsonl(w.dir / "trajectories.jsonl", trajs)
    atomic_write_json(w.dir / "summary.json", {**counts, "missing": missing})
    if sft_out:
        atomic_write_text(sft_out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sft_messages(trajs)))
    typer.echo(json.dumps(counts | {"out": str(out)}))
    for m in missing[:20]:
        typer.echo(f"missing: {m}")


@data_app.command("export")
def data_export(
    run: Path = typer.Argument(..., help="A run folder (rollout, bench or data import) with trajectories.jsonl."),
    out: Path = typer.Option(..., help="JSONL of {'id', 'request_id', 'messages', 'images'} rows; pictures go to <out dir>/images."),
    min_reward: Optional[float] = typer.Option(None, help="Only trajectories whose verdict reaches this reward."),
    allow_missing: bool = typer.Option(False, help="Leave out pictures that have no local file (counted) instead of failing."),
):
    """Export our trajectories as SFT records in the official `messages` format."""
    from .official import DataError, export_sft
    from .runs import load_run

    try:
        r = load_run(run)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="RUN") from exc
    try:
        counts = export_sft(r.trajectories, out, {v.trajectory_id: v for v in r.verdicts}, min_reward, allow_missing)
    except DataError as exc:
        raise typer.BadParameter(str(exc), param_hint="RUN") from exc
    typer.echo(json.dumps(counts | {"out": str(out)}))


@exp_app.command("summarise")
def experiences_summarise(
    run: Path = typer.Argument(..., help="A rollout run folder with K > 1 trajectories per request."),
    bank: Path = typer.Option(..., help="Experience bank folder to add to (created when missing)."),
    summariser: str = typer.Option("sandbox", help="'sandbox' (deterministic diff), an OpenAI-compatible URL, "
                                   "'tiny', 'smollm2' or a local model folder (transformers)."),
    model: str = typer.Option("default", help="Model name on an OpenAI-compatible server."),
    delta_min: float = typer.Option(0.20, min=0.0, max=1.0, help="Smallest best-vs-worst reward gap."),
    max_pairs: int = typer.Option(8, min=1, help="At most this many pairs."),
    world: Optional[Path] = WORLD_OPT,
):
    """Mine best-vs-worst pairs from a run and summarise them into visual experiences (sandbox or LLM summariser)."""
    from collections import defaultdict

    from .experience import ExperienceBank, mine_pairs
    from .runs import load_run
    from .summarise import LLMSummariser, SandboxSummariser, SummaryError

    r = load_run(run)
    groups = defaultdict(list)
    for t in r.trajectories:
        v = r.verdict(t.id)
        if v is not None:
            groups[t.request_id].append((t, v))
    if summariser == "sandbox":
        from .world import World

        summ = SandboxSummariser(World(world))
    else:
        from .policies.resolve import resolve_policy

        try:
            summ = LLMSummariser(resolve_policy(summariser, model=model))
        except (ValueError, FileNotFoundError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--summariser") from exc
    b = ExperienceBank(bank)
    added, errors = 0, []
    for pair in mine_pairs(list(groups.values()), delta_min, max_pairs):
        try:
            slots = summ.summarise(pair)
        except SummaryError as exc:
            errors.append(f"{pair.request_id}: {exc}")
            continue
        b.add(pair.request_id, pair.request_text, slots, reward_gap=pair.gap, run_id=r.info.id,
              best_trajectory=pair.best.id, worst_trajectory=pair.worst.id, summariser=summ.name)
        added += 1
    for e in errors:
        typer.echo(f"not summarised: {e}")
    typer.echo(json.dumps({"pairs": added + len(errors), "added": added, "errors": len(errors), "bank_size": len(b)}))


@app.command()
def wise(
    data: Path = typer.Option(..., help="Folder with the WISE prompt files (cultural_common_sense.json, ...)."),
    judge: str = typer.Option(..., help=JUDGE_HELP),
    judge_model: str = typer.Option("gpt-4o", help="Judge model name."),
    judge_api_key: Optional[str] = typer.Option(None, help="API key of the judge (default: $OPENAI_API_KEY)."),
    judge_cache: Optional[Path] = typer.Option(Path("runs/judge-cache"), help="Cache of judge answers by content hash."),
    rpm: float = typer.Option(0.0, min=0.0, help="At most this many judge requests per minute (0: no limit)."),
    generator: str = typer.Option("sandbox", help=GENERATOR_HELP),
    policy: str = typer.Option("raw", help=POLICY_HELP),
    model: str = typer.Option("default", help="Model name to ask an OpenAI-compatible server for."),
    limit: Optional[int] = typer.Option(None, min=1, help="First N prompts of each file (smoke runs)."),
    seed: int = typer.Option(0),
    device: Optional[str] = typer.Option(None, help="Torch device for diffusers generators."),
    search: str = SEARCH_OPT,
    out: Optional[Path] = typer.Option(None, help="JSON results (default: runs/wise-<policy>.json)."),
    world: Optional[Path] = WORLD_OPT,
):
    """WISE: generate for every prompt (raw or through a policy), judge, and report WiScore by category and overall."""
    from .records import ImageStore, atomic_write_json
    from .wise import WiseJudge, load_wise, run_wise
    from .world import World

    try:
        items = load_wise(data, limit)
        wj = WiseJudge(judge, judge_model, api_key=judge_api_key, cache_dir=judge_cache, rpm=rpm)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    w = World(world)
    gen = open_generator(generator, device, None, world=w)
    pol = _policy(w, policy, "none", [], None, model)
    out = out or Path("runs") / f"wise-{Path(policy).name or 'remote'}.json"
    res = run_wise(items, gen, wj, ImageStore(out.with_suffix("") / "images"), policy=pol,
                   tools=_tools(w, search) if pol is not None else None, seed=seed, progress=typer.echo)
    atomic_write_json(out, {"generator": gen.name, "judge": wj.name, "policy": pol.name if pol else "raw", **res["summary"],
                            "results": {str(k): v for k, v in res["results"].items()}})
    s = res["summary"]
    rows = [[c, v["n"], _f(v["wiscore"])] for c, v in s["categories"].items()]
    typer.echo(_table(rows, ["category", "n", "WiScore"]))
    typer.echo(f"overall WiScore: {_f(s['overall'])}" + (" (partial: some categories absent)" if s["partial"] else "")
               + f"; missing cases: {s['missing']['n']} (excluded)")
    typer.echo(f"saved: {out}")
