"""The run browser: every run folder under the runs folder as one table row (kind, policy and adapter, K, seeds,
requests, date, status, mean KScore), filtered and sorted. Reads only small files (run.json, summary.json,
config.json, the last metrics row); never a run's trajectories."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from genevolve.records.live import is_running

HEADERS = ["run", "kind", "policy", "adapter", "K", "seeds", "requests", "date", "status", "mean KScore"]
SORTS = {"newest first": ("date", True), "oldest first": ("date", False), "mean KScore (high first)": ("mean KScore", True),
         "mean KScore (low first)": ("mean KScore", False), "name": ("run", False), "kind": ("kind", False)}


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _date(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _kscore(summary: dict[str, Any]) -> float | None:
    """The overall mean KScore of a run's summary (a rollout's plain mean, or a bench's mean over seeds)."""
    for root in (summary.get("overall"), (summary.get("by") or {}).get("overall")):
        row = (root or {}).get("all") or {}
        k = row.get("kscore")
        k = k.get("mean") if isinstance(k, dict) else k
        if isinstance(k, (int, float)) and k == k:
            return round(float(k), 3)
    return None


def _status(folder: Path, finished: bool) -> str:
    if is_running(folder) or any(is_running(p.parent) for p in folder.glob("*/.lock")):
        return "running"
    return "finished" if finished else "stopped or unfinished"


def run_row(folder: Path, runs_dir: Path) -> list[Any] | None:
    """One folder's row, or None when it is not a run folder."""
    name = str(folder.relative_to(runs_dir))
    info = _json(folder / "run.json")
    if info:  # rollout, bench, import
        summary = _json(folder / "summary.json")
        cfg = info.get("config") or {}
        seeds = cfg.get("seeds") or [info.get("seed")]
        return [name, info.get("command", "?"), info.get("policy", "?"), cfg.get("adapter") or "—", info.get("k"),
                ",".join(str(s) for s in seeds), len(info.get("requests") or []),
                _date((folder / "run.json").stat().st_mtime), _status(folder, bool(summary)), _kscore(summary)]
    cfg = _json(folder / "config.json")
    if "rollouts_per_prompt" in cfg:  # evolve (or one arm of an ablation)
        results = _json(folder / "report" / "results.json")
        after = (results.get("student (after)") or {})
        return [name, "evolve", cfg.get("policy", "?"), "LoRA (trained here)", cfg.get("rollouts_per_prompt"),
                str(cfg.get("seed", 0)), cfg.get("prompts_per_step"), _date((folder / "config.json").stat().st_mtime),
                _status(folder, bool(results)), _kscore({"by": after}) if after else None]
    ab = _json(folder / "ablate_config.json")
    if ab:
        return [name, "ablate", ab.get("policy", "?"), "LoRA per arm", ab.get("K"), "", len(ab.get("eval_requests") or []),
                _date((folder / "ablate_config.json").stat().st_mtime), _status(folder, (folder / "ablation.json").exists()),
                None]
    sft = _json(folder / "sft_config.json")
    if sft:
        return [name, "sft", sft.get("model") or sft.get("recipe", "?"), "—", None, str(sft.get("seed", 0)), None,
                _date((folder / "sft_config.json").stat().st_mtime), _status(folder, (folder / "sft_result.json").exists()),
                None]
    return None


def run_rows(runs_dir: Path) -> list[list[Any]]:
    """Every run folder under ``runs_dir`` (an ablation's arm folders are shown as part of it), newest first."""
    runs_dir = Path(runs_dir)
    folders = {p.parent for pat in ("**/run.json", "**/config.json", "**/ablate_config.json", "**/sft_config.json")
               for p in runs_dir.glob(pat)}
    ablations = {f for f in folders if (f / "ablate_config.json").exists()}
    rows = []
    for f in folders:
        if any(a in f.parents for a in ablations) or ".ranks" in f.parts:
            continue
        row = run_row(f, runs_dir)
        if row is not None:
            rows.append(row)
    return sorted(rows, key=lambda r: r[7], reverse=True)


def filter_rows(rows: list[list[Any]], text: str = "", kind: str = "", sort: str = "newest first") -> list[list[Any]]:
    """Rows whose name, policy or adapter contain ``text`` (any case), of ``kind`` (blank: any), sorted."""
    low = (text or "").strip().lower()
    out = [r for r in rows if (not low or any(low in str(r[i]).lower() for i in (0, 2, 3)))
           and (not kind or kind == "(any)" or r[1] == kind)]
    col, desc = SORTS.get(sort, SORTS["newest first"])
    i = HEADERS.index(col)
    have = [r for r in out if r[i] is not None]
    return sorted(have, key=lambda r: r[i], reverse=desc) + [r for r in out if r[i] is None]
