"""Where a learned policy stands: noiseless expert, raw generator, the policy, and the policy with guides.

Runs ``genevolve bench`` for each arm on the bench split over the same seeds and summarises:
protocol-valid rate, KScore (mean +- 95 % CI over seeds) overall and by track, the gap to the expert,
the gain over the raw generator and the gain from the correct decision guide. Prints and saves
``benchmarks/results/policy_headroom_<policy>.json``.

    .venv/bin/python benchmarks/policy_headroom.py [--policy tiny] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from genevolve.records.schema import atomic_write_json


def bench(args: list[str], out: Path, reuse: bool = False) -> dict:
    """``genevolve bench`` in a subprocess (its progress bars on stderr), returning its results JSON with its wall
    time in ``seconds``.

    With ``reuse``, a finished result at ``out`` written by the same arguments is read back instead of run
    again (``out`` + ``.args.json`` records them, ``$GENEVOLVE_DTYPE`` and the time), so a long measurement
    resumes arm by arm.
    """
    stamp = out.with_name(out.name + ".args.json")
    dtype = os.environ.get("GENEVOLVE_DTYPE") or None
    if reuse and out.exists() and stamp.exists():
        done = json.loads(stamp.read_text())
        if done.get("args") == args and done.get("dtype") == dtype:
            print(f"  reusing {out}", flush=True)
            return json.loads(out.read_text()) | {"seconds": done.get("seconds")}
    cmd = [sys.executable, "-m", "genevolve.cli", "bench", *args, "--out", str(out)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    atomic_write_json(stamp, {"args": args, "dtype": dtype, "seconds": seconds})
    return json.loads(out.read_text()) | {"seconds": seconds}


def bench_arms(arms: dict[str, list[str]], common: list[str], work: str | None, notes: list[str]) -> dict[str, dict]:
    """Each arm's ``genevolve bench`` (``common`` + its own arguments), its JSON kept in ``work`` and reused there
    (a temporary folder without one). An arm that fails is named in ``notes`` and the others still run."""
    import tempfile

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(work) if work else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name, extra in arms.items():
            print(f"running {name} ...", flush=True)
            slug = "".join(c if c.isalnum() else "_" for c in name)
            try:
                res[name] = bench([*common, *extra], folder / f"{slug}.json", reuse=work is not None)
            except Exception as exc:  # e.g. too few distinct experiences to shuffle: say so, keep the other arms
                notes.append(f"{name}: genevolve bench failed ({exc}); see its error above")
    return res


def policy_args(policy: str, adapter: str | None = None) -> list[str]:
    return ["--policy", policy] + (["--adapter", adapter] if adapter else [])


def arm_row(r: dict) -> dict:
    """One bench result in a line: protocol-valid rate and KScore (mean, 95 % CI over seeds, per seed), by track."""
    by = r["by"]
    k = by["overall"]["all"]["kscore"]
    return {"protocol_valid": r["protocol_valid"]["mean"], "protocol_valid_ci95": r["protocol_valid"]["ci95"],
            "kscore": k["mean"], "ci95": k["ci95"], "per_seed": k["per_seed"],
            "by_track": {t: {"kscore": row["kscore"]["mean"], "ci95": row["kscore"]["ci95"]} for t, row in by["track"].items()},
            "knowledge": by["track"].get("knowledge", {}).get("kscore", {}).get("mean"),
            "quality": by["track"].get("quality", {}).get("kscore", {}).get("mean")}


def paired_diff(a: list[float] | None, b: list[float] | None) -> dict | None:
    """``a`` minus ``b`` seed by seed: mean, 95 % CI over seeds and the differences; None when the two lists do not
    line up (one is missing, or a seed has no score in one of them)."""
    from genevolve.evaluation.bench import mean_ci

    if not a or not b or len(a) != len(b):
        return None
    d = [x - y for x, y in zip(a, b)]
    m, ci = mean_ci(d)
    return {"mean": m, "ci95": ci, "per_seed": d}


def paired_gain(arm: dict, base: dict, n_seeds: int) -> dict:
    """Arm minus base, seed by seed (same seeds, same requests): mean and 95 % CI over seeds; null when a seed
    has no score in one of them (then the per-seed lists no longer line up)."""
    d = paired_diff(arm["per_seed"], base["per_seed"]) if len(arm["per_seed"]) == n_seeds else None
    return d or {"mean": None, "ci95": None, "per_seed": None, "note": "a seed has no score: nothing to pair"}


def paired_track_gains(arm: dict, base: dict) -> dict:
    """Arm minus base by track, seed by seed, from two ``genevolve bench`` results: mean and 95 % CI over seeds."""
    out = {}
    for track, row in arm["by"]["track"].items():
        d = paired_diff(row["kscore"]["per_seed"], base["by"]["track"].get(track, {}).get("kscore", {}).get("per_seed"))
        out[track] = {"mean": d["mean"], "ci95": d["ci95"]} if d else \
            {"mean": None, "ci95": None, "note": "a seed has no score: nothing to pair"}
    return out


def pm(m, ci, sign: bool = False) -> str:
    """'0.123 ± 0.045', '0.123' for one seed (no interval), '-' for nothing; ``sign`` for a gain."""
    return "-" if m is None else (f"{m:+.3f}" if sign else f"{m:.3f}") + (f" ± {ci:.3f}" if ci is not None else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="tiny")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--split", default="bench")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    arms = {
        "expert (no noise)": ["--policy", "expert", "--noise", "none"],
        "raw generator": ["--policy", "raw"],
        a.policy: ["--policy", a.policy],
        f"{a.policy} + oracle guide": ["--policy", a.policy, "--guide", "oracle"],
    }
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(arms.items()):
            print(f"running {name} ...", flush=True)
            res[name] = bench([*extra, "--seeds", a.seeds, "--split", a.split], Path(tmp) / f"{i}.json")
    rows = {name: arm_row(r) for name, r in res.items()}
    p, g = rows[a.policy], rows[f"{a.policy} + oracle guide"]
    summary = {
        "policy": a.policy, "seeds": a.seeds, "split": a.split, "arms": rows,
        "gap_to_expert": rows["expert (no noise)"]["kscore"] - p["kscore"],
        "gain_over_raw": p["kscore"] - rows["raw generator"]["kscore"],
        "guide_gain": g["kscore"] - p["kscore"],
        "guide_gain_per_seed": [x - y for x, y in zip(g["per_seed"], p["per_seed"])],
        "full": res,
    }
    print(f"{'arm':<28}{'valid':>8}{'KScore':>10}{'±95%':>8}{'KA':>8}{'QA':>8}")
    for name, r in rows.items():
        ci = r["ci95"] or 0.0  # one seed: no interval (null)
        print(f"{name:<28}{r['protocol_valid']:>8.3f}{r['kscore']:>10.3f}{ci:>8.3f}{r['knowledge'] or 0:>8.3f}{r['quality'] or 0:>8.3f}")
    print(f"gap to expert {summary['gap_to_expert']:+.3f}; gain over raw {summary['gain_over_raw']:+.3f}; "
          f"guide gain {summary['guide_gain']:+.3f} (per seed {', '.join(f'{x:+.3f}' for x in summary['guide_gain_per_seed'])})")
    out = a.out or str(Path(__file__).parent / "results" / f"policy_headroom_{Path(a.policy).name}.json")
    atomic_write_json(out, summary)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
