"""Is the tiny policy's guide use a constructed effect? The shipped tiny policy against its control, side by side.

The control (``make tiny-control``) is the tiny policy's last stage trained exactly as ``make tiny-policy`` trains
it, from the same stage 2, but with cold-start noise instead of blind spots: no skill is skipped more often than
another unless a guide names it. Both policies then go through the same measurements:

- the premise (``benchmarks/premise.py``, same bank, requests and seeds): no guide, oracle, shuffled, retrieved,
  own, and the premise gate;
- a short SFT-vs-VED ablation (``genevolve ablate --arms sft,ved``, same settings): VED's gain over SFT-only,
  paired by seed.

This script reads those results and prints and saves the comparison (``benchmarks/results/tiny_control.json``):
each figure for both policies, and the shipped policy's gain minus the control's, paired by seed. It runs nothing.

    .venv/bin/python benchmarks/tiny_control.py --shipped-premise benchmarks/results/premise_tiny.json \\
        --control-premise benchmarks/results/premise_tiny-control.json \\
        --shipped-ablation ABLATE_TINY_DIR --control-ablation ABLATE_CONTROL_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from policy_headroom import paired_diff, pm

from genevolve.records.schema import atomic_write_json

PREMISE_ARMS = ("oracle guide", "shuffled experience", "retrieved experience", "own experience (training)")


def _diff(a: list[float] | None, b: list[float] | None) -> dict:
    """a − b seed by seed: mean and 95 % CI; null when the seeds do not line up."""
    return paired_diff(a, b) or {"mean": None, "ci95": None, "per_seed": None}


def ablation_gains(ablation: dict, arm: str = "ved") -> dict:
    """An ``ablation.json``'s SFT-only KScore and ``arm``'s gain over it, paired by seed, overall and by track."""
    sft, other = ablation["sft"], ablation[arm]
    out = {"sft": sft["overall"]["all"]["kscore"], arm: other["overall"]["all"]["kscore"],
           "gain": _diff(other["overall"]["all"]["kscore"]["per_seed"], sft["overall"]["all"]["kscore"]["per_seed"]),
           "gain_by_track": {}}
    for track, row in other.get("track", {}).items():
        out["gain_by_track"][track] = _diff(row["kscore"]["per_seed"], sft["track"][track]["kscore"]["per_seed"])
    return out


def compare(shipped: dict, control: dict, shipped_ab: dict | None, control_ab: dict | None) -> dict:
    """Every premise arm's gain for both policies and their difference (shipped − control), paired by seed; the
    premise gate of each; the unguided scores; and, with ablations, VED's gain over SFT for both."""
    if (shipped["requests"], shipped["seeds"], shipped.get("bank")) != (control["requests"], control["seeds"], control.get("bank")):
        raise ValueError("the two premise results ran other requests, seeds or banks: nothing to pair")
    rows = {"no guide": {"shipped": shipped["arms"]["no guide"]["kscore"], "control": control["arms"]["no guide"]["kscore"],
                         "shipped_minus_control": _diff(shipped["arms"]["no guide"]["per_seed"],
                                                        control["arms"]["no guide"]["per_seed"])}}
    for arm in PREMISE_ARMS:
        s, c = shipped["arms"].get(arm), control["arms"].get(arm)
        if not s or not c:
            continue
        gs, gc = s["gain_over_no_guide"], c["gain_over_no_guide"]
        rows[arm] = {"shipped": gs, "control": gc, "shipped_by_track": s.get("gain_by_track"),
                     "control_by_track": c.get("gain_by_track"),
                     "shipped_minus_control": _diff(gs and gs["per_seed"], gc and gc["per_seed"])}
    out = {"premise": rows, "gate": {"shipped": shipped.get("gate"), "control": control.get("gate")}}
    if shipped_ab and control_ab:
        s, c = ablation_gains(shipped_ab), ablation_gains(control_ab)
        out["ablation"] = {"shipped": s, "control": c,
                           "ved_gain_shipped_minus_control": _diff(s["gain"]["per_seed"], c["gain"]["per_seed"])}
    return out


def print_table(res: dict) -> None:
    print(f"{'figure':<40}{'shipped (blind spots)':>24}{'control (none)':>24}{'shipped − control':>22}")
    p = res["premise"]
    ng = p["no guide"]
    print(f"{'no guide: KScore':<40}{ng['shipped']:>24.3f}{ng['control']:>24.3f}"
          f"{pm(ng['shipped_minus_control']['mean'], ng['shipped_minus_control']['ci95'], sign=True):>22}")
    for arm in PREMISE_ARMS:
        if arm in p:
            r = p[arm]
            print(f"{arm + ': gain':<40}{pm(r['shipped']['mean'], r['shipped']['ci95'], sign=True):>24}"
                  f"{pm(r['control']['mean'], r['control']['ci95'], sign=True):>24}"
                  f"{pm(r['shipped_minus_control']['mean'], r['shipped_minus_control']['ci95'], sign=True):>22}")
    for who in ("shipped", "control"):
        g = res["gate"][who]
        if g:
            print(f"premise gate, {who}: {'passes' if g['passes'] else 'fails'} (oracle's worst seed "
                  f"{g['oracle_worst_seed_gain']:+.3f}, shuffled {g['shuffled_mean_gain']:+.3f})")
    if "ablation" in res:
        a = res["ablation"]
        s, c, d = a["shipped"], a["control"], a["ved_gain_shipped_minus_control"]
        print(f"{'ablation: SFT-only KScore':<40}{pm(s['sft']['mean'], s['sft']['ci95']):>24}{pm(c['sft']['mean'], c['sft']['ci95']):>24}")
        print(f"{'ablation: VED gain over SFT':<40}{pm(s['gain']['mean'], s['gain']['ci95'], sign=True):>24}"
              f"{pm(c['gain']['mean'], c['gain']['ci95'], sign=True):>24}{pm(d['mean'], d['ci95'], sign=True):>22}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shipped-premise", required=True)
    ap.add_argument("--control-premise", required=True)
    ap.add_argument("--shipped-ablation", default=None, help="the shipped policy's `genevolve ablate --out` folder")
    ap.add_argument("--control-ablation", default=None, help="the control's `genevolve ablate --out` folder")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tiny_control.json"))
    a = ap.parse_args()
    try:
        shipped, control = (json.loads(Path(x).read_text()) for x in (a.shipped_premise, a.control_premise))
        shipped_ab, control_ab = (json.loads((Path(x) / "ablation.json").read_text()) if x else None
                                  for x in (a.shipped_ablation, a.control_ablation))
        res = compare(shipped, control, shipped_ab, control_ab)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    res["inputs"] = vars(a) | {"shipped_policy": shipped["policy"], "control_policy": control["policy"]}
    res["note"] = ("Made by: make tiny-control (runs/tiny-control and runs/tiny-blind-spots from one stage 2); "
                   "benchmarks/premise.py --policy runs/tiny-blind-spots --bank BANK --make-bank; benchmarks/premise.py "
                   "--policy runs/tiny-control --bank BANK --compare-to benchmarks/results/premise_tiny-blind-spots.json; "
                   "genevolve ablate --policy P --arms sft,ved --seeds 0,1,2 --eval-samples 2 --out DIR for each; then "
                   "this script. Float32 on a CPU; gains paired by seed, 95 % CI with Student's t.")
    print_table(res)
    atomic_write_json(a.out, res)
    print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
