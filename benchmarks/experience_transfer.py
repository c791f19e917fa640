"""Do experiences transfer to other requests? Leave-own-out retrieval from a bank, and what it is worth on the bench.

Given an experience bank (e.g. an evolve run's ``<run>/bank``):

1. Retrieval, leave-own-out (a request never retrieves an experience mined from itself), on the evolve split
   and on the bench: the distribution of each request's nearest similarity, and for a grid of gates the hit
   rate and the share of hits whose experience was mined from a request of the same category.
2. A chosen gate: ``--gate calibrated`` (default) is the lowest gate, so the most hits, at which at least
   ``--agreement`` (80 %) of the evolve split's hits share the request's category. It is set on the evolve
   split only, never on the bench; when no gate qualifies the paper's 0.84 is used and the JSON says so.
3. At that gate, bench KScore with the retrieved guides minus without, paired by seed (mean ± 95 % CI over
   seeds), from two ``genevolve bench`` runs (``--seeds``, ``--requests`` keep it small). When no bench
   request passes the gate the two runs would be the same policy on the same prompts: they are not run.

Prints and saves ``benchmarks/results/experience_transfer_<policy>.json`` (or ``--out``).

    .venv/bin/python benchmarks/experience_transfer.py RUN/bank [--policy tiny --adapter RUN/checkpoint/adapter]
        [--gate calibrated|0.84] [--seeds 0,1,2] [--requests 120]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from policy_headroom import arm_row, bench, paired_gain, pm, policy_args

from genevolve.records.schema import atomic_write_json

GRID = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.84, 0.85, 0.9, 0.95)
FALLBACK_GATE = 0.84


def retrieval(bank, world, split: str) -> list[dict]:
    """Each request of a split: its nearest experience from another request, the similarity, and whether
    that experience's source request has the same category (null when the source is not a sandbox request)."""
    reqs = world.split(split)
    by_id = {r.id: r for r in world.requests}
    rows = []
    for r, (e, s) in zip(reqs, bank.nearest([r.text for r in reqs], [r.id for r in reqs])):
        src = by_id.get(e.source_request_id) if e else None
        rows.append({"request": r.id, "category": r.category, "experience": e.id if e else None,
                     "source_request": e.source_request_id if e else None, "similarity": s,
                     "same_category": None if src is None else src.category == r.category})
    return rows


def at_gate(rows: list[dict], gate: float) -> dict:
    hits = [x for x in rows if x["similarity"] is not None and x["similarity"] >= gate]
    judged = [x["same_category"] for x in hits if x["same_category"] is not None]
    return {"gate": gate, "hits": len(hits), "hit_rate": len(hits) / len(rows) if rows else None,
            "category_agreement": sum(judged) / len(judged) if judged else None}


def distribution(rows: list[dict]) -> dict | None:
    sims = sorted(x["similarity"] for x in rows if x["similarity"] is not None)
    if not sims:
        return None
    q = statistics.quantiles(sims, n=20, method="inclusive") if len(sims) > 1 else [sims[0]] * 19
    return {"n": len(sims), "min": sims[0], "p25": q[4], "median": statistics.median(sims), "p75": q[14], "p90": q[17],
            "max": sims[-1], "mean": statistics.fmean(sims)}


def calibrate(rows: list[dict], agreement: float) -> float | None:
    """The lowest gate (most hits) at which at least ``agreement`` of the hits share the request's category."""
    for s in sorted({x["similarity"] for x in rows if x["similarity"] is not None}):
        a = at_gate(rows, s)["category_agreement"]
        if a is not None and a >= agreement:
            return s
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bank", help="experience bank folder (e.g. an evolve run's bank)")
    ap.add_argument("--policy", default="tiny", help="tiny, smollm2 or a model folder")
    ap.add_argument("--adapter", default=None, help="LoRA adapter folder (e.g. the run's checkpoint/adapter)")
    ap.add_argument("--gate", default="calibrated", help="'calibrated' (on the evolve split) or a cosine gate")
    ap.add_argument("--agreement", type=float, default=0.8, help="least share of same-category hits for the calibrated gate")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--requests", type=int, default=120, help="the first N bench requests for the KScore runs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not (Path(a.bank) / "experiences.jsonl").is_file():
        ap.error(f"{a.bank!r} holds no experience bank (no experiences.jsonl)")
    if a.gate != "calibrated":
        try:
            float(a.gate)
        except ValueError:
            ap.error(f"--gate is 'calibrated' or a number in [-1, 1], not {a.gate!r}")

    from genevolve.experience.bank import ExperienceBank
    from genevolve.world import World

    world, bank = World(), ExperienceBank(a.bank)
    if not len(bank):
        ap.error(f"the experience bank {a.bank!r} is empty")
    splits = {s: retrieval(bank, world, s) for s in ("evolve", "bench")}
    calibrated = calibrate(splits["evolve"], a.agreement)
    notes = []
    if a.gate == "calibrated":
        gate = calibrated if calibrated is not None else FALLBACK_GATE
        if calibrated is None:
            notes.append(f"no gate keeps {a.agreement:.0%} of the evolve split's hits in the request's category: "
                         f"used {FALLBACK_GATE}")
    else:
        gate = float(a.gate)
    grid = sorted(set(GRID) | {gate})
    summary = {"bank": a.bank, "bank_size": len(bank), "policy": a.policy, "adapter": a.adapter, "leave_own_out": True,
               "agreement": a.agreement, "calibrated_gate": calibrated, "gate": gate, "gate_from": a.gate,
               "retrieval": {s: {"similarity": distribution(rows), "grid": [at_gate(rows, g) for g in grid], "per_request": rows}
                             for s, rows in splits.items()},
               "notes": notes}
    for s in ("evolve", "bench"):
        d = summary["retrieval"][s]["similarity"]
        print(f"{s}: nearest similarity (leave-own-out) median {d['median']:.3f}, p90 {d['p90']:.3f}, max {d['max']:.3f}")
        print(f"  {'gate':>6}{'hits':>6}{'rate':>8}{'same category':>15}")
        for g in summary["retrieval"][s]["grid"]:
            agree = "-" if g["category_agreement"] is None else f"{g['category_agreement']:.3f}"
            print(f"  {g['gate']:>6.4f}{g['hits']:>6}{g['hit_rate']:>8.3f}{agree:>15}")
    print(f"calibrated gate (evolve split, >= {a.agreement:.0%} same category): "
          + ("none" if calibrated is None else f"{calibrated:.4f}") + f"; chosen gate {gate:.4f}")

    n_seeds = len([s for s in a.seeds.split(",") if s.strip()])
    bench_hits = at_gate(splits["bench"][: a.requests], gate)["hits"]
    if bench_hits == 0:
        summary["kscore"] = None
        notes.append(f"no bench request among the first {a.requests} passes gate {gate:.4f}: with and without retrieved "
                     "guides would be the same runs, so the gain is 0 by construction and was not measured")
    else:
        common = [*policy_args(a.policy, a.adapter), "--seeds", a.seeds, "--limit", str(a.requests), "--split", "bench"]
        with tempfile.TemporaryDirectory() as tmp:
            print("running bench without guides ...", flush=True)
            base = bench(common, Path(tmp) / "base.json")
            print(f"running bench with retrieved guides (gate {gate:.4f}, {bench_hits} hits) ...", flush=True)
            guided = bench([*common, "--guide", f"bank:{a.bank}", "--leave-own-out", "--gate", repr(gate)], Path(tmp) / "guided.json")
        b, g = arm_row(base), arm_row(guided)
        gain = paired_gain(g, b, n_seeds)
        summary["kscore"] = {"no guide": b, "retrieved": g, "gain": gain, "hits": guided["guide_info"]["hits"],
                             "n_requests": guided["n_requests"], "seeds": a.seeds, "full": {"no guide": base, "retrieved": guided}}
        print(f"bench KScore: no guide {pm(b['kscore'], b['ci95'])}, retrieved {pm(g['kscore'], g['ci95'])} "
              f"({guided['guide_info']['hits']}/{guided['n_requests']} guided); gain {pm(gain['mean'], gain['ci95'], sign=True)} (paired by seed)")
    for note in notes:
        print("note:", note)
    out = a.out or str(Path(__file__).parent / "results" / f"experience_transfer_{Path(a.policy).name}.json")
    atomic_write_json(out, summary)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
