"""Does the premise hold: does a policy use a decision guide, and does it matter which one?

For one policy, over the same requests and seeds, these arms of ``genevolve bench``:

- no guide (bench);
- oracle guide (each bench request's correct guide: the ceiling);
- retrieved experience (``--guide bank:<--bank> --leave-own-out``: each bench request's nearest experience when it
  passes the gate, no guide otherwise);
- shuffled experience (``shuffled:<--bank>``: another request's nearest experience, every request guided;
  without a bank, ``shuffled``: another request's oracle guide). The control: a guide's *presence* must not help;
- own experience on training requests (``--split evolve --guide bank:<--bank>``, no leave-own-out: the evolve
  requests the bank was mined from, each with its nearest experience, most often its own), paired with the no-guide
  arm on the same evolve requests.

The retrieved, shuffled-experience and own arms need a bank. ``--make-bank`` builds one at ``--bank`` when that
folder holds none: the scripted expert with cold-start noise, 4 trajectories on each of the first ``--requests``
evolve requests, its best-vs-worst pairs summarised (sandbox summariser) and consolidated. The same bank then serves
every policy, so premise tables of different students compare like with like.

Reports each arm's protocol-valid rate and KScore overall and by track (mean ± 95 % CI over seeds), and its gain
over no guide on the same split, paired by seed, with its CI. Then **the gate** (fixed in advance): the premise
holds when the oracle guide gains at least +0.05 on *every* seed and the shuffled guide gains at most 0 (the mean),
so that a guide's content matters, not its presence. ``--compare-to OTHER.json`` pairs this policy's no-guide arm
with another premise result's (same requests and seeds), seed by seed: what a change of cold start cost or gave the
unguided student. Prints and saves ``benchmarks/results/premise_<policy>.json``.

    .venv/bin/python benchmarks/premise.py [--policy tiny] [--adapter A] [--bank DIR [--make-bank]] [--requests 120]
        [--seeds 0,1,2] [--arms none,oracle,shuffled,retrieved,own] [--compare-to premise_X.json]
        [--work DIR]   # resumable: finished arms in DIR are reused
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from policy_headroom import arm_row, bench_arms, paired_gain, paired_track_gains, pm, policy_args

from genevolve.records.schema import atomic_write_json

ORACLE_MIN_GAIN = 0.05  # the gate, fixed before any cold start was measured: oracle gain on every seed ...
SHUFFLED_MAX_GAIN = 0.0  # ... and the shuffled guide's mean gain at most this
SHORT = {"none": "no guide", "oracle": "oracle guide", "retrieved": "retrieved experience",
         "shuffled": "shuffled experience", "own": "own experience (training)"}
TRAIN_BASE = "no guide (training)"  # the own arm's baseline: the same evolve requests without a guide
BANK_K = 4  # trajectories per request when --make-bank mines the expert


def make_expert_bank(bank: Path, world_requests: list[str], seed: int = 0) -> dict:
    """A bank mined from the scripted expert with cold-start noise (``BANK_K`` trajectories on each request), built
    in a temporary folder next to ``bank`` and moved into place whole, so an interrupted build leaves nothing."""
    ge = [sys.executable, "-m", "genevolve.cli"]
    bank.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bank.parent, prefix=f".{bank.name}.") as tmp:
        run, tmp_bank = Path(tmp) / "run", Path(tmp) / "bank"
        subprocess.run([*ge, "rollout", *[x for r in world_requests for x in ("-r", r)], "-k", str(BANK_K),
                        "--policy", "expert", "--noise", "cold-start", "--seed", str(seed), "--out", str(run)],
                       check=True, stdout=subprocess.DEVNULL)
        done = subprocess.run([*ge, "experiences", "summarise", str(run), "--bank", str(tmp_bank),
                               "--max-pairs", str(len(world_requests))], check=True, capture_output=True, text=True)
        counts = json.loads(done.stdout.strip().splitlines()[-1])
        info = {"source": f"scripted expert, cold-start noise, {BANK_K} trajectories per request, seed {seed}",
                "requests": len(world_requests), "first": world_requests[0], "last": world_requests[-1]} | counts
        atomic_write_json(tmp_bank / "made_by.json", info)
        os.replace(tmp_bank, bank)
    return info


def gate_verdict(rows: dict) -> dict | None:
    """The premise gate: the oracle's gain on every seed ≥ ``ORACLE_MIN_GAIN`` and the shuffled guide's mean gain
    ≤ ``SHUFFLED_MAX_GAIN``. None when either arm is missing or cannot be paired."""
    o, s = rows.get("oracle guide"), rows.get("shuffled experience")
    if not o or not s:
        return None
    og, sg = o["gain_over_no_guide"], s["gain_over_no_guide"]
    if og is None or sg is None or og["per_seed"] is None or sg["mean"] is None:
        return None
    worst = min(og["per_seed"])
    return {"rule": f"oracle gain >= {ORACLE_MIN_GAIN:+.2f} on every seed and shuffled mean gain <= {SHUFFLED_MAX_GAIN:+.2f}",
            "oracle_worst_seed_gain": worst, "shuffled_mean_gain": sg["mean"],
            "passes": worst >= ORACLE_MIN_GAIN and sg["mean"] <= SHUFFLED_MAX_GAIN}


def compare_no_guide(mine: dict, other: dict, n_seeds: int) -> dict:
    """This policy's no-guide arm minus another premise result's, seed by seed (same requests and seeds), overall
    and by track."""
    if other.get("requests") != mine["requests"] or other.get("seeds") != mine["seeds"]:
        raise ValueError(f"--compare-to ran other requests or seeds ({other.get('requests')} requests, seeds "
                         f"{other.get('seeds')}) than this one ({mine['requests']}, {mine['seeds']}): nothing to pair")
    a, b = mine["arms"]["no guide"], other["arms"]["no guide"]
    return {"other_policy": other.get("policy"), "this": a["kscore"], "other": b["kscore"],
            "difference": paired_gain(a, b, n_seeds),
            "difference_by_track": paired_track_gains(mine["full"]["no guide"], other["full"]["no guide"])}


def plan_arms(bank: str | None, gate: float | None, want: list[str]) -> dict[str, list[str]]:
    """Each wanted arm's ``genevolve bench`` arguments (the own arm brings its no-guide baseline on the same evolve
    requests); without a bank, no retrieved or own arm, and the shuffled arm shuffles oracle guides."""
    g = ["--gate", repr(gate)] if gate is not None else []
    bench, train = ["--split", "bench"], ["--split", "evolve"]
    arms = {"no guide": bench, "oracle guide": [*bench, "--guide", "oracle"]}
    if bank:
        arms["retrieved experience"] = [*bench, "--guide", f"bank:{bank}", "--leave-own-out", *g]
    arms["shuffled experience"] = [*bench, "--guide", f"shuffled:{bank}" if bank else "shuffled"]
    if bank:
        arms[TRAIN_BASE] = train
        arms[SHORT["own"]] = [*train, "--guide", f"bank:{bank}", *g]
    keep = {SHORT[x] for x in want} | ({TRAIN_BASE} if "own" in want else set())
    return {k: v for k, v in arms.items() if k in keep}


def arm_rows(res: dict[str, dict], n_seeds: int, notes: list[str]) -> dict[str, dict]:
    """Each arm's row: its scores, what guided it (hits, and for the own arm how many read their own experience),
    and its gain over the no-guide arm on the same split, paired by seed."""
    rows = {name: arm_row(r) for name, r in res.items()}
    for name, row in rows.items():
        info = res[name].get("guide_info") or {}
        row["split"] = res[name].get("split")
        row["guide"] = res[name]["guide"]
        row["seconds"] = res[name].get("seconds")
        row["n_guided"] = info.get("n_guided", 0)
        row["guide_source"] = info.get("source")
        if info.get("kind") == "bank":
            row.update(gate=info["gate"], hits=info["hits"], hit_rate=info["hit_rate"], similarity=info["similarity"])
            if not info["leave_own_out"]:
                row["own_hits"] = sum(1 for x in info["per_request"] if x["hit"] and x["request"] in x["sources"])
            if not info["hits"]:
                notes.append(f"{name}: no request passes gate {info['gate']}, so this arm is the no-guide arm again")
        base = TRAIN_BASE if name == SHORT["own"] else "no guide"
        row["paired_with"] = None if name in ("no guide", TRAIN_BASE) else base
        paired = name not in ("no guide", TRAIN_BASE) and base in rows
        row["gain_over_no_guide"] = paired_gain(row, rows[base], n_seeds) if paired else None
        row["gain_by_track"] = paired_track_gains(res[name], res[base]) if paired else None
    return rows


def print_table(rows: dict, res: dict, notes: list[str]) -> None:
    """The premise table: each arm's guided count, valid rate, KScore overall and by track, and its paired gain."""
    tracks = sorted({t for r in rows.values() for t in r["by_track"]})
    print(f"{'arm':<27}{'guided':>7}{'valid':>8}{'KScore':>17}" + "".join(f"{t:>17}" for t in tracks) + f"{'gain (paired)':>19}")
    for name, r in rows.items():
        g = r["gain_over_no_guide"]
        gain = "" if g is None else pm(g["mean"], g["ci95"], sign=True)
        print(f"{name:<27}{r['n_guided']:>7}{r['protocol_valid']:>8.3f}{pm(r['kscore'], r['ci95']):>17}"
              + "".join(f"{pm(r['by_track'].get(t, {}).get('kscore'), r['by_track'].get(t, {}).get('ci95')):>17}" for t in tracks)
              + f"{gain:>19}")
    for name, r in rows.items():
        if r["gain_by_track"]:
            print(f"{name}: gain by track (paired) " + ", ".join(f"{t} {pm(g['mean'], g['ci95'], sign=True)}"
                                                             for t, g in r["gain_by_track"].items()))
    for name in ("retrieved experience", SHORT["own"]):
        if name in rows:
            r = rows[name]
            sim = r["similarity"] or {}
            print(f"{name}: {r['hits']}/{res[name]['n_requests']} requests at cosine >= {r['gate']}"
                  + (f", {r['own_hits']} of them their own experience" if r.get("own_hits") is not None else "")
                  + f" (nearest similarity median {sim.get('median')}, max {sim.get('max')})")
    for note in notes:
        print("note:", note)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny", help="tiny, smollm2 or a model folder")
    ap.add_argument("--adapter", default=None, help="LoRA adapter folder (e.g. an evolve run's checkpoint/adapter)")
    ap.add_argument("--bank", default=None, help="experience bank folder (e.g. an evolve run's bank)")
    ap.add_argument("--make-bank", action="store_true", help="build --bank from the scripted expert when it holds no bank")
    ap.add_argument("--gate", type=float, default=None, help="cosine gate of the retrieved and own arms (default: the key's)")
    ap.add_argument("--requests", type=int, default=120, help="the first N bench requests (and N evolve requests for own)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=None)
    ap.add_argument("--arms", default=None, help=f"comma-separated subset of: {', '.join(SHORT)} (default: all that can run)")
    ap.add_argument("--compare-to", default=None, help="another premise JSON (same requests and seeds): pair the no-guide arms")
    ap.add_argument("--work", default=None, help="keep each arm's bench result here and reuse it when rerun with the "
                    "same settings (a long measurement then resumes arm by arm); default: a temporary folder")
    a = ap.parse_args()
    n_seeds = len([s for s in a.seeds.split(",") if s.strip()])
    want = [x.strip() for x in (a.arms or ",".join(SHORT)).split(",") if x.strip()]
    if [x for x in want if x not in SHORT] or "none" not in want:
        ap.error(f"--arms takes a comma-separated subset of {', '.join(SHORT)} that includes none, not {a.arms!r}")
    other = None
    if a.compare_to:  # read before any work: a bad file is named now, not after an hour of rollouts
        try:
            other = json.loads(Path(a.compare_to).read_text())
            other["arms"]["no guide"], other["full"]["no guide"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            ap.error(f"--compare-to {a.compare_to}: not a premise result with a no-guide arm ({exc})")
    notes, bank_info = [], None
    if a.bank and a.make_bank and not (Path(a.bank) / "experiences.jsonl").is_file():
        from genevolve.world import World

        evolve = [r.id for r in World().split("evolve")[: a.requests]]
        print(f"mining a bank from the scripted expert on {len(evolve)} evolve requests into {a.bank} ...", flush=True)
        bank_info = make_expert_bank(Path(a.bank), evolve)
    elif a.bank and (Path(a.bank) / "made_by.json").is_file():
        bank_info = json.loads((Path(a.bank) / "made_by.json").read_text())
    has_bank = a.bank is not None and (Path(a.bank) / "experiences.jsonl").is_file()
    if not has_bank:
        notes.append((f"no experience bank at {a.bank!r}" if a.bank else "no --bank") + ": the retrieved and own arms are "
                     "skipped and the shuffled arm uses other requests' oracle guides")
    arms = plan_arms(a.bank if has_bank else None, a.gate, want)
    common = [*policy_args(a.policy, a.adapter), "--seeds", a.seeds, "--limit", str(a.requests)]
    res = bench_arms(arms, common, a.work, notes)
    if "no guide" not in res:
        print("the no-guide arm failed: nothing to compare with", file=sys.stderr)
        return 1
    rows = arm_rows(res, n_seeds, notes)
    summary = {"policy": a.policy, "adapter": a.adapter, "bank": a.bank, "bank_made_by": bank_info, "seeds": a.seeds,
               "requests": a.requests,
               "dtype": os.environ.get("GENEVOLVE_DTYPE") or "default (float32 on a CPU, bf16 on a CUDA GPU that has it)",
               "arms": rows, "gate": gate_verdict(rows), "notes": notes, "full": res}
    if other is not None:
        summary["no_guide_vs"] = compare_no_guide(summary, other, n_seeds)
    print_table(rows, res, notes)
    if summary["gate"]:
        g = summary["gate"]
        print(f"gate ({g['rule']}): {'passes' if g['passes'] else 'fails'} (oracle's worst seed "
              f"{g['oracle_worst_seed_gain']:+.3f}, shuffled {g['shuffled_mean_gain']:+.3f})")
    if other is not None:
        c = summary["no_guide_vs"]
        d = c["difference"]
        print(f"no guide vs {c['other_policy']}: {c['this']:.3f} vs {c['other']:.3f}, paired {pm(d['mean'], d['ci95'], sign=True)}; "
              + ", ".join(f"{t} {pm(g['mean'], g['ci95'], sign=True)}" for t, g in c["difference_by_track"].items()))
    out = a.out or str(Path(__file__).parent / "results" / f"premise_{Path(a.policy).name}.json")
    atomic_write_json(out, summary)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
