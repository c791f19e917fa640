"""Data in and out: a folder indexed as a searchable store, official data folders, experiences from run folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import WORLD_OPT

def index(
    folder: Path = typer.Argument(..., help="Folder of .txt/.md documents and pictures (captions: same-stem .txt)."),
    out: Optional[Path] = typer.Option(None, help="Store folder to write (default: <folder>.store)."),
    chunk_chars: int = typer.Option(800, min=100, help="Passage length for documents."),
):
    """Build a searchable store (corpus, pictures, FAISS indexes) from any folder, for the gateway and --search."""
    from ..tools.corpus import index_folder

    try:
        counts = index_folder(folder, out or folder.with_name(folder.name + ".store"), chunk_chars=chunk_chars, log=typer.echo)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="FOLDER") from exc
    typer.echo(json.dumps(counts))


def data_import(
    root: Path = typer.Argument(..., help="Local copy of the GenEvolve-Data-Bench layout (bench/, rl/, sft/)."),
    out: Path = typer.Option(..., help="Run folder to write (run.json, requests.jsonl, trajectories.jsonl, images/)."),
    sft_out: Optional[Path] = typer.Option(None, help="Also write the SFT split as {'messages'} rows for `genevolve sft --data`."),
    allow_missing: bool = typer.Option(False, help="Keep rows whose pictures are missing (recorded as missing cases)."),
):
    """Load the official bench rows, RL prompts and SFT trajectories into a run folder (turns read as the official runtime reads them)."""
    from ..evaluation.official import DataError, data_files, load_requests, load_sft, sft_messages
    from ..records.schema import ImageStore, Request, RunInfo, atomic_write_json, atomic_write_text, write_jsonl
    from ..records.runs import RunWriter, new_run_id, now_iso

    out = out.resolve()  # trajectories name their pictures by path: keep it valid from any working folder
    if (out / "run.json").exists():
        raise typer.BadParameter(f"{out} already holds a run; choose another --out", param_hint="--out")
    from ..records.kinds import RunKindError, claim

    try:
        claim(out, "import", "data import")  # before any picture is written into another kind of run folder
    except RunKindError as exc:
        raise typer.BadParameter(str(exc), param_hint="--out") from None
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
    except (FileExistsError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--out") from exc
    write_jsonl(w.dir / "requests.jsonl", reqs)
    write_jsonl(w.dir / "trajectories.jsonl", trajs)
    atomic_write_json(w.dir / "summary.json", {**counts, "missing": missing})
    if sft_out:
        atomic_write_text(sft_out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sft_messages(trajs)))
    typer.echo(json.dumps(counts | {"out": str(out)}))
    for m in missing[:20]:
        typer.echo(f"missing: {m}")


def data_export(
    run: Path = typer.Argument(..., help="A run folder (rollout, bench or data import) with trajectories.jsonl."),
    out: Path = typer.Option(..., help="JSONL of {'id', 'request_id', 'messages', 'images'} rows; pictures go to <out dir>/images."),
    min_reward: Optional[float] = typer.Option(None, help="Only trajectories whose verdict reaches this reward."),
    allow_missing: bool = typer.Option(False, help="Leave out pictures that have no local file (counted) instead of failing."),
):
    """Export our trajectories as SFT records in the official `messages` format."""
    from ..evaluation.official import DataError, export_sft
    from ..records.runs import load_run

    try:
        r = load_run(run)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="RUN") from exc
    try:
        counts = export_sft(r.trajectories, out, {v.trajectory_id: v for v in r.verdicts}, min_reward, allow_missing)
    except DataError as exc:
        raise typer.BadParameter(str(exc), param_hint="RUN") from exc
    typer.echo(json.dumps(counts | {"out": str(out)}))


def experiences_summarise(
    run: Path = typer.Argument(..., help="A rollout run folder with K > 1 trajectories per request."),
    bank: Path = typer.Option(..., help="Experience bank folder to add to (created when missing)."),
    summariser: str = typer.Option("sandbox", help="'sandbox' (deterministic diff), an OpenAI-compatible URL, "
                                   "'tiny', 'smollm2' or a local model folder (transformers)."),
    model: str = typer.Option("default", help="Model name on an OpenAI-compatible server."),
    delta_min: float = typer.Option(0.20, min=0.0, max=1.0, help="Smallest best-vs-worst reward gap."),
    max_pairs: int = typer.Option(8, min=1, help="At most this many pairs."),
    consolidate: bool = typer.Option(True, "--consolidate/--no-consolidate",
                                     help="Then merge the experiences that share a trigger (see `experiences consolidate`)."),
    world: Optional[Path] = WORLD_OPT,
):
    """Mine best-vs-worst pairs from a run and summarise them into visual experiences (sandbox or LLM summariser)."""
    from collections import defaultdict

    from ..experience.bank import ExperienceBank, mine_pairs
    from ..records.runs import load_run
    from ..experience.summarise import LLMSummariser, SandboxSummariser, SummaryError

    r = load_run(run)
    groups = defaultdict(list)
    for t in r.trajectories:
        v = r.verdict(t.id)
        if v is not None:
            groups[t.request_id].append((t, v))
    if summariser == "sandbox":
        from ..world import World

        summ = SandboxSummariser(World(world))
    else:
        from ..policies.resolve import resolve_policy

        try:
            summ = LLMSummariser(resolve_policy(summariser, model=model))
        except (ValueError, FileNotFoundError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--summariser") from exc
    b = ExperienceBank(bank)
    for line in b.load_errors:  # named by file and line; the next write sets them aside
        typer.echo(f"warning: broken bank line set aside: {line}", err=True)
    added, errors = 0, []
    for pair in mine_pairs(list(groups.values()), delta_min, max_pairs):
        try:
            summary = summ.summarise(pair)
        except SummaryError as exc:
            errors.append(f"{pair.request_id}: {exc}")
            continue
        b.add(pair.request_id, pair.request_text, summary.slots, reward_gap=pair.gap, retrieval_key=summary.key,
              run_id=r.info.id, best_trajectory=pair.best.id, worst_trajectory=pair.worst.id, summariser=summ.name)
        added += 1
    for e in errors:
        typer.echo(f"not summarised: {e}")
    merged = b.consolidate() if consolidate else []
    typer.echo(json.dumps({"pairs": added + len(errors), "added": added, "errors": len(errors), "merged": len(merged),
                           "bank_size": len(b)}))


def experiences_consolidate(
    bank: Path = typer.Argument(..., help="Experience bank folder."),
):
    """Merge every group of experiences that share a trigger into one general experience (a new version that keeps
    the group's provenance and evidence; lessons contradicted by better-supported ones are dropped and named)."""
    from ..experience.bank import ExperienceBank

    if not (bank / "experiences.jsonl").is_file():
        raise typer.BadParameter(f"{bank} holds no experience bank (no experiences.jsonl)", param_hint="BANK")
    b = ExperienceBank(bank)
    for line in b.load_errors:
        typer.echo(f"warning: broken bank line set aside: {line}", err=True)
    before = len(b)
    merged = b.consolidate()
    for e in merged:
        typer.echo(f"{e.id} v{e.version}: evidence {e.evidence}, from {len(e.sources())} request(s); {e.note}")
    typer.echo(json.dumps({"before": before, "after": len(b), "merged": len(merged)}))


def register(app: typer.Typer) -> None:
    app.command()(index)
    data_app = typer.Typer(help="Official GenEvolve-Data-Bench folders in, our trajectories out as SFT rows.", no_args_is_help=True)
    data_app.command("import")(data_import)
    data_app.command("export")(data_export)
    app.add_typer(data_app, name="data")
    exp_app = typer.Typer(help="Visual experiences from run folders.", no_args_is_help=True)
    exp_app.command("summarise")(experiences_summarise)
    exp_app.command("consolidate")(experiences_consolidate)
    app.add_typer(exp_app, name="experiences")
