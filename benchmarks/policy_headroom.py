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
import subprocess
import sys
import tempfile
from pathlib import Path

from genevolve.records import atomic_write_json


def bench(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "genevolve.cli", "bench", *args, "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


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
    rows = {}
    for name, r in res.items():
        by = r["by"]
        rows[name] = {"protocol_valid": r["protocol_valid"]["mean"], "kscore": by["overall"]["all"]["kscore"]["mean"],
                      "ci95": by["overall"]["all"]["kscore"]["ci95"],
                      "per_seed": by["overall"]["all"]["kscore"]["per_seed"],
                      "knowledge": by["track"].get("knowledge", {}).get("kscore", {}).get("mean"),
                      "quality": by["track"].get("quality", {}).get("kscore", {}).get("mean")}
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
