"""Do experiences transfer to requests they were not mined from? The transfer table, leave-own-out, paired by seed.

Given an experience bank (e.g. an evolve run's ``<run>/bank``) and a student:

1. **Retrieval**, leave-own-out (a request never retrieves an experience mined from itself, alone or merged), on
   the evolve split and on the bench, once per retrieval key (``situation``: the request's situation, read from
   its text, against the experiences' triggers; ``request``: raw request texts): for a grid of gates the hit
   rate, the share of hits whose experience comes from a request of the same category, and the share from a
   request with the same needs (the same skills, entity and fact lookup). Categories and needs are the
   sandbox's hidden labels: read here to *measure* retrieval, never by retrieval itself.
   And the share of hits whose guide *fits* the request: it names exactly the skills the request needs and the
   search it needs (a fact first, the entity's picture, or none), as the request's oracle guide does.
2. **The gate**, per key, calibrated on the evolve split only (never on the bench): the lowest gate (the most
   hits) at which at least ``--agreement`` (80 %) of the evolve split's hits retrieve a guide that fits; with
   none, the paper's 0.84, and the JSON says so.
3. **Bench arms**, ``genevolve bench`` over the same requests and seeds: no guide; the retrieved experience
   (leave-own-out, at the key's calibrated gate; requests below it get no guide), for each key; another
   request's retrieved experience for every request (``shuffled:<bank>``, the control: it must not help); the
   oracle guide (the ceiling). Each arm's KScore overall and by track (mean ± 95 % CI over seeds) and its gain
   over no guide, paired by seed.

Prints the tables and saves ``benchmarks/results/experience_transfer_<label>.json``. ``--work DIR`` keeps each
arm's result and reuses it when rerun with the same arguments: a long measurement resumes arm by arm.

    .venv/bin/python benchmarks/experience_transfer.py RUN/bank [--policy tiny --adapter RUN/checkpoint/adapter]
        [--keys situation,request] [--seeds 0,1,2] [--requests 120] [--work DIR] [--label L]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from policy_headroom import arm_row, paired_gain, paired_track_gains, pm, policy_args, bench_arms

from genevolve.records.schema import atomic_write_json

GRID = (0.5, 0.6, 0.7, 0.75, 0.8, 0.84, 0.88, 0.9, 0.92, 0.95, 0.98, 1.0)
FALLBACK_GATE = 0.84


def needs_of(world, request) -> frozenset:
    """A sandbox request's hidden needs (for measuring only): its skills, and entity / lookup when it names one."""
    parsed = world.parse(request.text)
    return frozenset(request.skills) | ({"entity"} if parsed.mentions else set()) | ({"lookup"} if parsed.hops else set())


def guide_fits(exp, world, request) -> bool:
    """Whether an experience's guide makes the request's right decisions (for measuring only): it names exactly the
    skills the request needs and the search it needs (a fact first, the entity's picture, or none)."""
    from genevolve.agent.guides import SLOTS
    from genevolve.records.schema import SKILLS

    text = " ".join(exp.slots[s] for s in SLOTS).lower()
    named = {s for s in SKILLS if s in text}
    search = exp.slots["search_strategy"].lower()
    kind = "fact" if "search the fact" in search else "image" if "image-search" in search else "none"
    parsed = world.parse(request.text)
    want = "fact" if parsed.hops else "image" if parsed.mentions else "none"
    return named == set(request.skills) and kind == want


def retrieval(bank, world, split: str) -> list[dict]:
    """Each request of a split: its nearest experience mined from other requests, the similarity, and whether that
    experience's source requests share its category and its needs (null when a source is not a sandbox request)."""
    reqs = world.split(split)
    by_id = {r.id: r for r in world.requests}
    rows = []
    for r, (e, s) in zip(reqs, bank.nearest([r.text for r in reqs], [r.id for r in reqs])):
        srcs = [by_id.get(x) for x in sorted(e.sources())] if e else []
        known = [x for x in srcs if x is not None]
        mine = needs_of(world, r)
        rows.append({"request": r.id, "category": r.category, "experience": e.id if e else None,
                     "sources": sorted(e.sources()) if e else [], "evidence": e.evidence if e else None, "similarity": s,
                     "same_category": (sum(x.category == r.category for x in known) / len(known)) if known else None,
                     "same_needs": (sum(needs_of(world, x) == mine for x in known) / len(known)) if known else None,
                     "guide_fits": guide_fits(e, world, r) if e else None})
    return rows


def at_gate(rows: list[dict], gate: float) -> dict:
    hits = [x for x in rows if x["similarity"] is not None and x["similarity"] >= gate - 1e-6]

    def share(field):
        judged = [x[field] for x in hits if x[field] is not None]
        return sum(judged) / len(judged) if judged else None

    return {"gate": gate, "hits": len(hits), "hit_rate": len(hits) / len(rows) if rows else None,
            "category_agreement": share("same_category"), "needs_agreement": share("same_needs"),
            "guide_fits": share("guide_fits")}


def distribution(rows: list[dict]) -> dict | None:
    sims = sorted(x["similarity"] for x in rows if x["similarity"] is not None)
    if not sims:
        return None
    q = statistics.quantiles(sims, n=20, method="inclusive") if len(sims) > 1 else [sims[0]] * 19
    return {"n": len(sims), "min": sims[0], "p25": q[4], "median": statistics.median(sims), "p75": q[14], "p90": q[17],
            "max": sims[-1], "mean": statistics.fmean(sims)}


def calibrate(rows: list[dict], agreement: float) -> float | None:
    """The lowest gate (most hits) at which at least ``agreement`` of the hits retrieve a guide that fits the request."""
    for s in sorted({x["similarity"] for x in rows if x["similarity"] is not None}):
        a = at_gate(rows, s)["guide_fits"]
        if a is not None and a >= agreement:
            return s
    return None


def describer_agreement(world, split: str) -> float:
    """How often the situation read from a request's text names exactly its hidden needs (measuring only)."""
    from genevolve.experience.situation import request_needs

    reqs = world.split(split)
    return sum(request_needs(r.text) == needs_of(world, r) for r in reqs) / len(reqs)


def print_retrieval(key: str, res: dict) -> None:
    for split in ("evolve", "bench"):
        d = res[split]["similarity"]
        print(f"[{key} key] {split}: nearest similarity (leave-own-out) median {d['median']:.3f}, p90 {d['p90']:.3f}, "
              f"max {d['max']:.3f}")
        print(f"  {'gate':>7}{'hits':>6}{'rate':>8}{'same category':>15}{'same needs':>12}{'guide fits':>12}")
        for g in res[split]["grid"]:
            c, n, f = (("-" if g[x] is None else f"{g[x]:.3f}") for x in ("category_agreement", "needs_agreement", "guide_fits"))
            print(f"  {g['gate']:>7.4f}{g['hits']:>6}{g['hit_rate']:>8.3f}{c:>15}{n:>12}{f:>12}")


def print_arms(rows: dict, n_requests: int) -> None:
    tracks = sorted({t for r in rows.values() for t in r["by_track"]})
    print(f"{'arm':<30}{'guided':>7}{'valid':>8}{'KScore':>17}" + "".join(f"{t:>17}" for t in tracks) + f"{'gain (paired)':>19}")
    for name, r in rows.items():
        g = r["gain_over_no_guide"]
        print(f"{name:<30}{r['n_guided']:>4}/{n_requests:<3}{r['protocol_valid']:>7.3f}{pm(r['kscore'], r['ci95']):>17}"
              + "".join(f"{pm(r['by_track'].get(t, {}).get('kscore'), r['by_track'].get(t, {}).get('ci95')):>17}" for t in tracks)
              + f"{'' if g is None else pm(g['mean'], g['ci95'], sign=True):>19}")
    for name, r in rows.items():
        if r["gain_by_track"]:
            print(f"{name}: gain by track (paired) " + ", ".join(
                f"{t} {pm(g['mean'], g['ci95'], sign=True)}" for t, g in r["gain_by_track"].items()))


def key_retrieval(bank, world, key: str, agreement: float, notes: list[str]) -> dict:
    """One key's retrieval on both splits, its gate calibrated on the evolve split, printed."""
    splits = {s: retrieval(bank, world, s) for s in ("evolve", "bench")}
    calibrated = calibrate(splits["evolve"], agreement)
    gate = calibrated if calibrated is not None else FALLBACK_GATE
    if calibrated is None:
        notes.append(f"{key} key: no gate keeps {agreement:.0%} of the evolve split's hits with a guide that fits: "
                     f"used {FALLBACK_GATE}")
    grid = sorted(set(GRID) | {gate})
    res = {"calibrated_gate": calibrated, "gate": gate, **{
        s: {"similarity": distribution(rows), "grid": [at_gate(rows, g) for g in grid], "at_gate": at_gate(rows, gate),
            "per_request": rows} for s, rows in splits.items()}}
    print_retrieval(key, res)
    print(f"[{key} key] calibrated gate (evolve split, >= {agreement:.0%} of hits with a guide that fits): "
          + ("none" if calibrated is None else f"{calibrated:.4f}") + f"; used {gate:.4f}\n")
    return res


def run_arms(a, keys: list[str], summary: dict) -> int:
    """The bench arms (no guide, retrieved per key, shuffled, oracle), their rows and paired gains into ``summary``;
    1 when the no-guide arm failed (nothing to compare with)."""
    n_seeds = len([s for s in a.seeds.split(",") if s.strip()])
    common = [*policy_args(a.policy, a.adapter), "--seeds", a.seeds, "--limit", str(a.requests), "--split", "bench"]
    arms = {"no guide": []}
    for key in keys:
        arms[f"retrieved ({key} key)"] = ["--guide", f"bank:{a.bank}", "--leave-own-out", "--retrieval-key", key,
                                         "--gate", repr(summary["keys"][key]["gate"])]
    arms[f"shuffled ({keys[0]} key)"] = ["--guide", f"shuffled:{a.bank}", "--retrieval-key", keys[0]]
    arms["oracle guide"] = ["--guide", "oracle"]
    res = bench_arms(arms, common, a.work, summary["notes"])
    if "no guide" not in res:
        print("the no-guide arm failed: nothing to compare with", file=sys.stderr)
        return 1
    rows = {}
    for name, r in res.items():
        row = arm_row(r)
        info = r.get("guide_info") or {}
        row |= {"guide": r["guide"], "seconds": r.get("seconds"), "n_guided": info.get("n_guided", 0),
                "gate": info.get("gate"), "key": info.get("key")}
        row["gain_over_no_guide"] = None if name == "no guide" else paired_gain(row, arm_row(res["no guide"]), n_seeds)
        row["gain_by_track"] = None if name == "no guide" else paired_track_gains(r, res["no guide"])
        rows[name] = row
    summary["arms"], summary["full"] = rows, res
    print()
    print_arms(rows, res["no guide"]["n_requests"])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bank", help="experience bank folder (e.g. an evolve run's bank)")
    ap.add_argument("--policy", default="tiny", help="tiny, smollm2 or a model folder")
    ap.add_argument("--adapter", default=None, help="LoRA adapter folder (e.g. the run's checkpoint/adapter)")
    ap.add_argument("--keys", default="situation,request", help="retrieval keys to compare: situation, request")
    ap.add_argument("--agreement", type=float, default=0.8, help="least share of hits whose guide fits, for the calibrated gate")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--requests", type=int, default=120, help="the first N bench requests for the KScore arms")
    ap.add_argument("--no-arms", action="store_true", help="retrieval only: no bench runs")
    ap.add_argument("--work", default=None, help="keep each arm's bench result here and reuse it when rerun with the same "
                    "arguments (default: a temporary folder)")
    ap.add_argument("--label", default=None, help="results file suffix (default: the policy's folder name)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    keys = [k.strip() for k in a.keys.split(",") if k.strip()]
    if not keys or set(keys) - {"situation", "request"}:
        ap.error(f"--keys is a comma-separated subset of situation, request, not {a.keys!r}")
    if not (Path(a.bank) / "experiences.jsonl").is_file():
        ap.error(f"{a.bank!r} holds no experience bank (no experiences.jsonl)")

    from genevolve.experience.bank import ExperienceBank
    from genevolve.world import World

    world = World()
    summary: dict = {"bank": a.bank, "policy": a.policy, "adapter": a.adapter, "leave_own_out": True, "agreement": a.agreement,
                     "world": str(world.root), "seeds": a.seeds, "requests": a.requests, "keys": {}, "notes": [],
                     "describer_agreement": {s: describer_agreement(world, s) for s in ("evolve", "bench")}}
    for key in keys:
        bank = ExperienceBank(a.bank, key=key)
        if not len(bank):
            ap.error(f"the experience bank {a.bank!r} is empty")
        summary["bank_size"] = len(bank)
        summary["keys"][key] = key_retrieval(bank, world, key, a.agreement, summary["notes"])
    print("situation read from the text = hidden needs: " + ", ".join(
        f"{s} {v:.3f}" for s, v in summary["describer_agreement"].items()))

    if not a.no_arms and run_arms(a, keys, summary):
        return 1
    out = a.out or str(Path(__file__).parent / "results" / f"experience_transfer_{a.label or Path(a.policy).name}.json")
    atomic_write_json(out, summary)
    for note in summary["notes"]:
        print("note:", note)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
