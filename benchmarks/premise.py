"""Does the premise hold: does a policy use a decision guide, and does it matter which one?

For one policy, on the bench (same requests, same seeds), four arms of ``genevolve bench``:

- no guide;
- oracle guide (each request's correct guide);
- retrieved experience (``--guide bank:<--bank> --leave-own-out``: each request's nearest experience when it
  passes the gate, no guide otherwise; skipped with a note when no bank is given or it is empty);
- shuffled experience (``shuffled:<--bank>``: another request's nearest experience, every request guided;
  without a bank, ``shuffled``: another request's oracle guide).

Reports each arm's protocol-valid rate and KScore overall and by track (mean ± 95 % CI over seeds), and its
gain over no guide, paired by seed, with its CI. Prints and saves ``benchmarks/results/premise_<policy>.json``.

    .venv/bin/python benchmarks/premise.py [--policy tiny] [--adapter A] [--bank RUN/bank] [--requests 120] [--seeds 0,1,2]
        [--work DIR]   # resumable: finished arms in DIR are reused
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from policy_headroom import arm_row, bench_arms, paired_gain, paired_track_gains, pm, policy_args

from genevolve.records.schema import atomic_write_json


def print_table(rows: dict, res: dict, notes: list[str]) -> None:
    """The premise table: each arm's guided count, valid rate, KScore overall and by track, and its paired gain."""
    tracks = sorted({t for r in rows.values() for t in r["by_track"]})
    print(f"{'arm':<22}{'guided':>7}{'valid':>8}{'KScore':>17}" + "".join(f"{t:>17}" for t in tracks) + f"{'gain (paired)':>19}")
    for name, r in rows.items():
        g = r["gain_over_no_guide"]
        gain = "" if g is None else pm(g["mean"], g["ci95"], sign=True)
        print(f"{name:<22}{r['n_guided']:>7}{r['protocol_valid']:>8.3f}{pm(r['kscore'], r['ci95']):>17}"
              + "".join(f"{pm(r['by_track'].get(t, {}).get('kscore'), r['by_track'].get(t, {}).get('ci95')):>17}" for t in tracks)
              + f"{gain:>19}")
    for name, r in rows.items():
        if r["gain_by_track"]:
            print(f"{name}: gain by track (paired) " + ", ".join(f"{t} {pm(g['mean'], g['ci95'], sign=True)}"
                                                             for t, g in r["gain_by_track"].items()))
    if "retrieved experience" in rows:
        r = rows["retrieved experience"]
        sim = r["similarity"] or {}
        print(f"retrieved: {r['hits']}/{res['retrieved experience']['n_requests']} requests at cosine >= {r['gate']} (nearest similarity median "
              f"{sim.get('median')}, max {sim.get('max')})")
    for note in notes:
        print("note:", note)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny", help="tiny, smollm2 or a model folder")
    ap.add_argument("--adapter", default=None, help="LoRA adapter folder (e.g. an evolve run's checkpoint/adapter)")
    ap.add_argument("--bank", default=None, help="experience bank folder (e.g. an evolve run's bank)")
    ap.add_argument("--gate", type=float, default=None, help="cosine gate of the retrieved arm (default 0.84)")
    ap.add_argument("--requests", type=int, default=120, help="the first N bench requests")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=None)
    ap.add_argument("--arms", default=None, help="comma-separated subset of: none, oracle, retrieved, shuffled (default: all)")
    ap.add_argument("--work", default=None, help="keep each arm's bench result here and reuse it when rerun with the "
                    "same settings (a long measurement then resumes arm by arm); default: a temporary folder")
    a = ap.parse_args()
    n_seeds = len([s for s in a.seeds.split(",") if s.strip()])
    has_bank = a.bank is not None and (Path(a.bank) / "experiences.jsonl").is_file()
    notes = [] if has_bank else [f"no experience bank at {a.bank!r}: the retrieved arm is skipped and the shuffled arm "
                                 "uses other requests' oracle guides" if a.bank else
                                 "no --bank: the retrieved arm is skipped and the shuffled arm uses other requests' oracle guides"]
    gate = ["--gate", repr(a.gate)] if a.gate is not None else []
    arms = {"no guide": [], "oracle guide": ["--guide", "oracle"]}
    if has_bank:
        arms["retrieved experience"] = ["--guide", f"bank:{a.bank}", "--leave-own-out", *gate]
    arms["shuffled experience"] = ["--guide", f"shuffled:{a.bank}" if has_bank else "shuffled"]
    if a.arms:
        short = {"none": "no guide", "oracle": "oracle guide", "retrieved": "retrieved experience", "shuffled": "shuffled experience"}
        want = [x.strip() for x in a.arms.split(",") if x.strip()]
        if [x for x in want if x not in short] or "none" not in want:
            ap.error(f"--arms takes a comma-separated subset of {', '.join(short)} that includes none, not {a.arms!r}")
        arms = {k: v for k, v in arms.items() if k in {short[x] for x in want}}
    common = [*policy_args(a.policy, a.adapter), "--seeds", a.seeds, "--limit", str(a.requests), "--split", "bench"]
    res = bench_arms(arms, common, a.work, notes)
    if "no guide" not in res:
        print("the no-guide arm failed: nothing to compare with", file=sys.stderr)
        return 1
    rows = {name: arm_row(r) for name, r in res.items()}
    for name, row in rows.items():
        info = res[name].get("guide_info") or {}
        row["guide"] = res[name]["guide"]
        row["seconds"] = res[name].get("seconds")
        row["n_guided"] = info.get("n_guided", 0)
        row["guide_source"] = info.get("source")
        if info.get("kind") == "bank":
            row.update(gate=info["gate"], hits=info["hits"], hit_rate=info["hit_rate"], similarity=info["similarity"])
            if not info["hits"]:
                notes.append(f"{name}: no request passes gate {info['gate']}, so this arm is the no-guide arm again")
        row["gain_over_no_guide"] = None if name == "no guide" else paired_gain(row, rows["no guide"], n_seeds)
        row["gain_by_track"] = None if name == "no guide" else paired_track_gains(res[name], res["no guide"])
    summary = {"policy": a.policy, "adapter": a.adapter, "bank": a.bank, "seeds": a.seeds, "requests": a.requests,
               "dtype": os.environ.get("GENEVOLVE_DTYPE") or "default (float32 on a CPU, bf16 on a CUDA GPU that has it)",
               "arms": rows, "notes": notes, "full": res}
    print_table(rows, res, notes)
    out = a.out or str(Path(__file__).parent / "results" / f"premise_{Path(a.policy).name}.json")
    atomic_write_json(out, summary)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
