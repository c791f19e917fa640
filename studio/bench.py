"""Bench view: bench summaries (mean and 95 % interval by track, category, difficulty) as a bar chart, and the
missing cases of a bench scored by a VLM judge. The group x run table and run comparisons: :mod:`studio.compare`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from genevolve.evaluation.bench import DIMS, LEVELS

from . import StudioError

GENERATORS = ("sandbox", "tiny")  # offered in the form; any `--generator` value may be typed (t2i:<model>, a render-service URL)


def load_summary(path: Path) -> dict[str, Any]:
    """A bench summary from a studio/CLI bench run folder (``summary.json``) or a ``genevolve bench`` JSON file."""
    path = Path(path)
    f = path / "summary.json" if path.is_dir() else path
    try:
        data = json.loads(f.read_text("utf-8"))
    except FileNotFoundError:
        raise StudioError(f"{path} has no bench summary (not finished, or deleted?)") from None
    except ValueError as exc:
        raise StudioError(f"{f} is not valid JSON: {exc}") from None
    if "by" in data:
        return data
    if "overall" in data:  # a rollout run's aggregate: plain means per group
        return {"policy": "?", "by": {lvl: {k: {**{d: {"mean": row.get(d), "ci95": None} for d in DIMS}, "n": row.get("n"),
                                                 "failed": row.get("failed", 0), "missing": row.get("missing", 0)} for k, row in data[lvl].items()}
                                       for lvl in LEVELS if lvl in data}}
    raise StudioError(f"{f} is not a bench summary")


def _half_width(m: dict[str, Any] | None) -> float:
    """A bar's 95 % half-width, or 0 when there is none to draw (fewer than 3 seeds: see :mod:`studio.compare`)."""
    from .compare import MIN_N

    if not m or m.get("ci95") is None or m["ci95"] != m["ci95"]:
        return 0.0
    seeds = len([x for x in m.get("per_seed") or [] if x is not None])
    return float(m["ci95"]) if seeds >= MIN_N else 0.0


def summary_figure(summaries: dict[str, dict[str, Any]]):
    """KScore bars by track, category and difficulty; one bar colour per run, CI as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    levels = ("track", "category", "difficulty")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), dpi=90, gridspec_kw={"width_ratios": [1, 3, 1.2]})
    n = max(len(summaries), 1)
    for ax, level in zip(axes, levels):
        keys = sorted({k for s in summaries.values() for k in s["by"].get(level, {})})
        x = np.arange(len(keys))
        for i, (name, s) in enumerate(summaries.items()):
            groups = s["by"].get(level, {})
            means = [groups[k]["kscore"]["mean"] if k in groups and groups[k]["kscore"]["mean"] is not None else 0 for k in keys]
            cis = [_half_width(groups.get(k, {}).get("kscore")) for k in keys]
            # Error bars only where there is an interval (3 seeds or more), and never past 0 or 1.
            err = [[min(c, m) for c, m in zip(cis, means)], [min(c, 1 - m) for c, m in zip(cis, means)]]
            ax.bar(x + (i - (n - 1) / 2) * 0.8 / n, means, 0.8 / n, yerr=err, label=name, capsize=2)
        ax.set_xticks(x, keys, rotation=30 if level == "category" else 0, ha="right" if level == "category" else "center", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"KScore by {level}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    if summaries:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def missing_lines(summary: dict[str, Any]) -> list[str]:
    """One line per seed of a judged bench (``genevolve bench --data`` or the studio): how many cases are missing
    (render, judgement or ground truth failed), why, and the KScore under the other convention. Sandbox
    summaries have no missing cases: no lines."""
    out = []
    for seed, m in (summary.get("missing") or {}).items():
        if not m.get("n"):
            out.append(f"seed {seed}: no missing cases of {m.get('of', 0)}")
            continue
        reasons = ", ".join(f"{why} × {n}" for why, n in m.get("reasons", {}).items())
        if m.get("policy") == "zero":
            how, other, alt = "counted as 0", "without them", m.get("kscore_missing_excluded")
        else:
            how, other, alt = "left out of the means", "with them as 0", m.get("kscore_missing_as_zero")
        alt_text = "–" if alt is None or alt != alt else f"{alt:.3f}"
        out.append(f"seed {seed}: {m['n']} of {m['of']} cases missing ({how}): {reasons}; KScore {other}: {alt_text}")
    return out


def missing_html(summaries: dict[str, dict[str, Any]]) -> str:
    """The missing-case lines of every shown result that has them."""
    from .html import esc

    parts = [f"<li><b>{esc(name)}</b>: {esc(line)}</li>" for name, sm in summaries.items() for line in missing_lines(sm)]
    return f'<ul class="ge-missing">{"".join(parts)}</ul>' if parts else ""


def bench_problem(summary: dict[str, Any]) -> str | None:
    """Why a judged bench has no score at all (every case missing: a judge or generator that is down, no
    ground truths), with the first error; None when anything was scored."""
    missing = summary.get("missing") or {}
    if not missing or any(m.get("n", 0) < m.get("of", 0) for m in missing.values()):
        return None
    reasons = sorted({why for m in missing.values() for why in m.get("reasons", {})})
    first = next((err for m in missing.values() for err in (m.get("errors") or {}).values()), "")
    hint = {"judge failed": "is the judge running, and is the model name right?",
            "generator failed": "is the generator (render service) running?",
            "no ground truth": "the folder's ground-truth pictures are missing"}
    return (f"every case is missing ({', '.join(reasons)}): " + " ".join(hint.get(r, "") for r in reasons).strip()
            + (f" First error: {first}" if first else ""))
