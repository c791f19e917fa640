"""Bench view: a bench summary (mean and 95 % CI by track, category, difficulty) as a table and
bar chart, the missing cases of a bench scored by a VLM judge, and two runs paged through request by request."""

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


def _cell(m: dict[str, Any] | None) -> str:
    if not m or m.get("mean") is None or m["mean"] != m["mean"]:
        return "–"
    ci = m.get("ci95")
    return f"{m['mean']:.3f}" + (f" ± {ci:.3f}" if ci is not None and ci == ci else "")


SUMMARY_HEADERS = ["by", "group", "n", "KScore", "F", "V", "T", "A", "reward", "failed", "missing"]


def summary_rows(summary: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for level in LEVELS:
        for key, row in summary["by"].get(level, {}).items():
            rows.append([level, key, row.get("n"), _cell(row["kscore"]), _cell(row["F"]), _cell(row["V"]), _cell(row["T"]),
                         _cell(row["A"]), _cell(row["reward"]), row.get("failed", 0), row.get("missing", 0)])
    return rows


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
            cis = [groups[k]["kscore"].get("ci95") or 0 if k in groups else 0 for k in keys]
            cis = [0 if c != c else c for c in cis]
            ax.bar(x + (i - (n - 1) / 2) * 0.8 / n, means, 0.8 / n, yerr=cis, label=name, capsize=2)
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


def common_requests(run_a, run_b) -> list[str]:
    """Request ids that both runs answered, in run A's order."""
    have_b = {t.request_id for t in run_b.trajectories}
    seen, out = set(), []
    for t in run_a.trajectories:
        if t.request_id in have_b and t.request_id not in seen:
            seen.add(t.request_id)
            out.append(t.request_id)
    return out


def page_html(run_a, run_b, request_id: str, name_a: str, name_b: str) -> str:
    """One request, the first trajectory of each run side by side."""
    from .html import columns_html, message, store_src

    ta = next((t for t in run_a.trajectories if t.request_id == request_id), None)
    tb = next((t for t in run_b.trajectories if t.request_id == request_id), None)
    if ta is None or tb is None:
        return message("err", f"{request_id} is not in both runs")
    req = next((r for r in run_a.requests if r.id == request_id), None)
    va, vb = run_a.verdict(ta.id), run_b.verdict(tb.id)
    src_a, src_b = store_src(run_a.images), store_src(run_b.images)

    def src(h):
        return src_a(h) or src_b(h)

    # The two runs may name trajectories alike: key them apart for the columns.
    ta2, tb2 = ta.model_copy(update={"id": "A"}), tb.model_copy(update={"id": "B"})
    verdicts = {k: v.model_copy(update={"trajectory_id": k}) for k, v in (("A", va), ("B", vb)) if v is not None}
    return columns_html(req, [ta2, tb2], verdicts, src, titles={"A": f"A · {name_a}", "B": f"B · {name_b}"})
