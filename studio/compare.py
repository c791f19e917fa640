"""Comparing runs: per-request means over every sample and seed, paired differences with intervals that stay
inside the metric's range, a group x run pivot of bench summaries, and a run's cases filtered and sorted.

Pure functions from run records (:class:`genevolve.records.runs.Run`) and bench summaries to rows and HTML;
nothing here loads a model or writes a file.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from . import StudioError

MIN_N = 3  # fewer values than this: no interval, "n too small"
METRICS = ("reward", "kscore")


def bootstrap_ci(values: Sequence[float], seed: int = 0, draws: int = 2000) -> tuple[float, float] | None:
    """A 95 % percentile-bootstrap interval of the mean: it never leaves the range the values live in (a
    difference of two [0, 1] scores stays in [-1, 1], a score in [0, 1]). None below :data:`MIN_N` values."""
    vals = [v for v in values if v is not None]
    if len(vals) < MIN_N:
        return None
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(vals, k=len(vals))) for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def interval_text(mean: float | None, ci95: float | None, n: int, low: float = 0.0, high: float = 1.0) -> str:
    """A mean with its Student-t half-width as it may be shown for a metric bounded to [low, high]: the interval
    clipped to the range, or "n too small" with fewer than :data:`MIN_N` values (two seeds give a t quantile of
    12.7: "± 2.151" on a [0, 1] score says nothing)."""
    if mean is None or mean != mean:
        return "–"
    if n < MIN_N or ci95 is None or ci95 != ci95:
        return f"{mean:.3f} (n={n}: too small for an interval)" if n > 1 else f"{mean:.3f}"
    return f"{mean:.3f} [{max(low, mean - ci95):.3f}, {min(high, mean + ci95):.3f}]"


# ---------------------------------------------------------------------------
# Runs compared request by request
# ---------------------------------------------------------------------------


def scores(run, metric: str = "reward") -> dict[str, dict[int, float | None]]:
    """Each request's scores in a run, keyed by trajectory seed (the pairing key: the same seed, the same draw)."""
    if metric not in METRICS:
        raise StudioError(f"compare by {' or '.join(METRICS)}, not {metric!r}")
    out: dict[str, dict[int, float | None]] = {}
    for t in run.trajectories:
        v = run.verdict(t.id)
        out.setdefault(t.request_id, {})[t.seed] = getattr(v, metric) if v is not None else None
    return out


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


@dataclass
class Comparison:
    names: list[str]
    requests: list[str]  # compared: in every run
    only: dict[str, list[str]]  # run -> requests no other run has
    rows: list[list[Any]]  # request, category, one mean per run, Δ (last - first), its interval, pairs
    overall: dict[str, Any] = field(default_factory=dict)

    @property
    def warning(self) -> str:
        if not any(self.only.values()):
            return ""
        left = "; ".join(f"{n}: {len(ids)} left out" for n, ids in self.only.items() if ids)
        return (f"the runs cover different requests: compared on the {len(self.requests)} they share ({left}). "
                "Means over different request sets would not be comparable.")


def headers(names: Sequence[str]) -> list[str]:
    return ["request", "category", *[f"{n} (mean)" for n in names], "Δ", "Δ interval", "pairs"]


def compare_runs(runs: dict[str, Any], metric: str = "reward") -> Comparison:
    """Two or more runs over the same requests: per request, each run's mean over its samples and seeds, and the
    last run minus the first, paired by trajectory seed (an interval when at least 3 pairs). Requests that not
    every run has are left out and named (:attr:`Comparison.warning`); no shared request raises."""
    if len(runs) < 2:
        raise StudioError("pick two or more runs to compare")
    names = list(runs)
    per = {n: scores(r, metric) for n, r in runs.items()}
    order = list(dict.fromkeys(t.request_id for t in runs[names[0]].trajectories))
    shared = [rid for rid in order if all(rid in per[n] for n in names)]
    if not shared:
        raise StudioError("the runs share no request: nothing to compare")
    only = {n: [rid for rid in per[n] if rid not in shared] for n in names}
    cats = {r.id: r.category or "—" for run in runs.values() for r in run.requests}
    rows, deltas = [], []
    first, last = names[0], names[-1]
    for rid in shared:
        means = [_mean(per[n][rid].values()) for n in names]
        pairs = [per[last][rid][s] - per[first][rid][s] for s in per[first][rid]
                 if s in per[last][rid] and per[first][rid][s] is not None and per[last][rid][s] is not None]
        d = None if means[0] is None or means[-1] is None else means[-1] - means[0]
        ci = bootstrap_ci(pairs)
        rows.append([rid, cats.get(rid, "—"), *[None if m is None else round(m, 3) for m in means],
                     None if d is None else round(d, 3),
                     f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else f"n={len(pairs)}: too small", len(pairs)])
        if d is not None:
            deltas.append(d)
    ci = bootstrap_ci(deltas)
    overall = {"n": len(deltas), "delta": _mean(deltas), "ci": ci,
               "means": {n: _mean(_mean(per[n][rid].values()) for rid in shared) for n in names}}
    return Comparison(names, shared, only, rows, overall)


def overall_text(c: Comparison, metric: str = "reward") -> str:
    o = c.overall
    means = " · ".join(f"{n}: {'–' if m is None else f'{m:.3f}'}" for n, m in o["means"].items())
    if o["delta"] is None:
        return f"mean {metric} over {len(c.requests)} shared requests: {means}"
    ci = f"95 % bootstrap interval over requests [{o['ci'][0]:+.3f}, {o['ci'][1]:+.3f}]" if o["ci"] else \
        f"n={o['n']}: too few requests for an interval"
    return (f"mean {metric} over {len(c.requests)} shared requests: {means} · Δ ({c.names[-1]} − {c.names[0]}) "
            f"{o['delta']:+.3f}, {ci}")


def sort_rows(rows: list[list[Any]], column: int, descending: bool = True) -> list[list[Any]]:
    """Rows sorted by one column, blanks last."""
    have = [r for r in rows if r[column] is not None]
    return sorted(have, key=lambda r: r[column], reverse=descending) + [r for r in rows if r[column] is None]


def samples_html(runs: dict[str, Any], request_id: str) -> str:
    """Every sample of every run for one request, side by side: each run's columns under its name and mean, best
    and worst marked within a run only (never one run's single sample crowned against another's)."""
    from .html import best_and_worst, esc, message, store_src, trajectory_column

    blocks, req = [], None
    for name, run in runs.items():
        trajs = [t for t in run.trajectories if t.request_id == request_id]
        if not trajs:
            blocks.append(f'<div class="ge-run"><h4>{esc(name)}</h4>{message("info", "no trajectory for this request")}</div>')
            continue
        req = req or next((r for r in run.requests if r.id == request_id), None)
        verdicts = {t.id: run.verdict(t.id) for t in trajs if run.verdict(t.id) is not None}
        rewards = [v.reward for v in verdicts.values() if v.reward is not None]
        mean = f"mean reward {statistics.fmean(rewards):.3f} over {len(rewards)} sample(s)" if rewards else "not judged"
        marks = best_and_worst(trajs, verdicts)
        src = store_src(run.images)
        gt = req.gt_image if req is not None else None
        cols = [trajectory_column(t, verdicts.get(t.id), src, gt, marks.of(t.id), f"{name} · {t.id}",
                                  badge=marks.label(marks.of(t.id)) if marks.of(t.id) else None) for t in trajs]
        blocks.append(f'<div class="ge-run" data-run="{esc(name)}"><h4>{esc(name)} · {mean}</h4>'
                      f'<div class="ge-cols" data-columns="{len(cols)}">{"".join(cols)}</div></div>')
    head = f"<p><b>{esc(request_id)}</b>: {esc(req.text)}</p>" if req is not None else f"<p><b>{esc(request_id)}</b></p>"
    return head + "".join(blocks)


# ---------------------------------------------------------------------------
# Bench summaries: a group x run pivot
# ---------------------------------------------------------------------------


def pivot(summaries: dict[str, dict[str, Any]], metric: str = "kscore") -> tuple[list[str], list[list[Any]]]:
    """KScore by group (overall, track, category, difficulty) with one column per result and Δ (last − first);
    each cell a mean with an interval clipped to [0, 1], or "n too small" (see :func:`interval_text`)."""
    from genevolve.evaluation.bench import LEVELS

    names = list(summaries)
    heads = ["by", "group", *names] + (["Δ"] if len(names) > 1 else [])
    rows = []
    for level in LEVELS:
        keys = list(dict.fromkeys(k for s in summaries.values() for k in s["by"].get(level, {})))
        for key in keys:
            cells, means = [], []
            for n in names:
                row = summaries[n]["by"].get(level, {}).get(key)
                m = row[metric] if row else None
                k = len([x for x in (m or {}).get("per_seed") or [] if x is not None]) or len(summaries[n].get("seeds") or [0])
                cells.append("–" if not m else interval_text(m.get("mean"), m.get("ci95"), k))
                means.append(m.get("mean") if m else None)
            delta = [] if len(names) < 2 else [
                "–" if means[0] is None or means[-1] is None else f"{means[-1] - means[0]:+.3f}"]
            rows.append([level, key, *cells, *delta])
    return heads, rows


def request_sets(summaries: dict[str, dict[str, Any]]) -> str:
    """A warning when bench results cover different requests (their number or split differ), else ''."""
    seen = {n: (s.get("split"), s.get("n_requests") or s.get("by", {}).get("overall", {}).get("all", {}).get("n"))
            for n, s in summaries.items()}
    if len(set(seen.values())) <= 1:
        return ""
    return ("these results cover different requests (" + "; ".join(f"{n}: {k[1]} of {k[0] or '?'}" for n, k in seen.items())
            + "): their means are not comparable group by group")


# ---------------------------------------------------------------------------
# One run's cases, filtered and sorted
# ---------------------------------------------------------------------------

CASE_HEADERS = ["trajectory", "request", "category", "reward", "KScore", "termination", "failure", "tool calls"]
SORTS = {"reward (high first)": (3, True), "reward (low first)": (3, False), "KScore (high first)": (4, True),
         "KScore (low first)": (4, False), "tool calls": (7, True)}


def case_rows(run, category: str = "", termination: str = "", failure: str = "", sort: str = "") -> list[list[Any]]:
    """A run's trajectories as rows, filtered by category, termination and failure reason (substrings; blank: any)."""
    cats = {r.id: r.category or "—" for r in run.requests}
    rows = []
    for t in run.trajectories:
        v = run.verdict(t.id)
        why = (v.failed or "") if v is not None else "not judged"
        row = [t.id, t.request_id, cats.get(t.request_id, "—"), None if v is None or v.reward is None else round(v.reward, 3),
               None if v is None or v.kscore is None else round(v.kscore, 3), t.termination, why or "—", t.n_tool_calls]
        if category and category.lower() not in row[2].lower():
            continue
        if termination and termination.lower() not in t.termination.lower():
            continue
        if failure and failure.lower() not in row[6].lower():
            continue
        rows.append(row)
    if sort:
        if sort not in SORTS:
            raise StudioError(f"sort by one of: {', '.join(SORTS)}")
        rows = sort_rows(rows, *SORTS[sort])
    return rows


GAP_HEADERS = ["request", "category", "best", "worst", "gap", "samples"]


def largest_gaps(run, n: int = 10) -> list[list[Any]]:
    """The requests whose best and worst rewards lie furthest apart (the pairs an experience would come from)."""
    per = scores(run)
    cats = {r.id: r.category or "—" for r in run.requests}
    rows = []
    for rid, by_seed in per.items():
        vals = [v for v in by_seed.values() if v is not None]
        if len(vals) >= 2:
            rows.append([rid, cats.get(rid, "—"), round(max(vals), 3), round(min(vals), 3), round(max(vals) - min(vals), 3), len(vals)])
    return sort_rows(rows, 4)[:n]
