"""Several policies' premises side by side, as the Markdown table the README and a closing note carry.

Reads the JSON that ``benchmarks/premise.py`` saved for each policy (run with the same bank, requests and
seeds) and writes one column per policy:

- the no-guide KScore, overall and by track;
- each guide arm's gain over its no-guide arm, paired by seed (mean ± 95 % CI, Student's t), overall and by
  track (knowledge / quality), with the worst seed's gain for the oracle;
- the premise gate (fixed in advance in ``premise.py``);
- where a premise ran with ``--compare-to``, its no-guide score minus the other policy's, paired by seed:
  what teaching guide reading cost (or gave) the unguided student.

It runs nothing. Prints the table; ``--out FILE.md`` also saves it (atomically).

    .venv/bin/python benchmarks/premise_table.py benchmarks/results/premise_smollm2-sft.json \\
        benchmarks/results/premise_smollm2-guided-0.3.json --out /tmp/premise.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from policy_headroom import pm

from genevolve.records.schema import atomic_write_text

ARMS = (("shuffled experience", "shuffled experience, gain"),
        ("own experience (training)", "own experience (evolve requests), gain"),
        ("retrieved experience", "retrieved, leave-own-out, gain"),
        ("oracle guide", "oracle guide, gain"))
TRACKS = ("knowledge", "quality")


def _tracks(by_track: dict | None, key: str = "mean", sign: bool = True) -> str:
    if not by_track:
        return ""
    parts = [pm(by_track[t].get(key), by_track[t].get("ci95"), sign=sign) for t in TRACKS if t in by_track]
    return " (K " + " / Q ".join(parts) + ")" if len(parts) == len(TRACKS) else ""


def column(res: dict) -> dict[str, str]:
    """One policy's cells, keyed by row label."""
    arms = res["arms"]
    ng = arms["no guide"]
    by = {t: {"mean": ng["by_track"][t]["kscore"], "ci95": ng["by_track"][t].get("ci95")} for t in ng.get("by_track", {})}
    cells = {"no guide, KScore": pm(ng["kscore"], ng.get("ci95")) + _tracks(by, sign=False)}
    for arm, label in ARMS:
        row = arms.get(arm)
        gain = row and row.get("gain_over_no_guide")
        if not gain:
            cells[label] = "-"
            continue
        cell = pm(gain["mean"], gain.get("ci95"), sign=True) + _tracks(row.get("gain_by_track"))
        if arm == "oracle guide" and gain.get("per_seed"):
            cell += "; seeds " + " / ".join(f"{g:+.3f}" for g in gain["per_seed"])
        if row.get("n_guided") is not None and arm != "shuffled experience":
            cell += f"; {row['n_guided']} guided"
        cells[label] = cell
    gate = res.get("gate") or {}
    cells["premise gate"] = "-" if not gate else ("passes" if gate.get("passes") else "fails") + \
        f" (oracle worst seed {gate['oracle_worst_seed_gain']:+.3f}, shuffled {gate['shuffled_mean_gain']:+.3f})"
    vs = res.get("no_guide_vs")
    if vs:
        d = vs["difference"]
        cells["no guide, minus the compared policy's (paired)"] = pm(d["mean"], d.get("ci95"), sign=True) + \
            _tracks(vs.get("difference_by_track")) + f" vs `{vs['other_policy']}`"
    return cells


def table(results: list[dict], names: list[str]) -> str:
    cols = [column(r) for r in results]
    labels: list[str] = []
    for c in cols:
        labels += [k for k in c if k not in labels]
    lines = ["| figure | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    lines += ["| " + lab + " | " + " | ".join(c.get(lab, "-") for c in cols) + " |" for lab in labels]
    first = results[0]
    lines.append("")
    lines.append(f"{len(first['requests']) if isinstance(first['requests'], list) else first['requests']} requests, "
                 f"seeds {first['seeds']}, {first.get('dtype')}; bank `{first.get('bank')}`.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="premise.py's JSON, one per policy")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    results = [json.loads(p.read_text()) for p in a.results]
    keys = {(json.dumps(r["requests"]), json.dumps(r["seeds"]), r.get("bank")) for r in results}
    if len(keys) > 1:
        print("warning: these premises ran other requests, seeds or banks; the columns do not compare like with like",
              file=sys.stderr)
    text = table(results, [f"`{r['policy']}`" for r in results])
    print(text)
    if a.out:
        atomic_write_text(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
