"""What do an evolve run's experiences teach on knowledge requests? Its mined pairs read against the ground truth.

For one evolve run folder (``trajectories.jsonl``, ``verdicts.jsonl``, ``pairs.jsonl``, ``bank/``) on the
sandbox world:

- every rollout group of a Knowledge-Anchored request: does its top-rewarded trajectory search the fact
  it needs (requests with a hop), is it grounded (:func:`genevolve.experience.bank.evidence`), did it pick the
  official reference of the right entity, and did it get there without the fact search (a lucky guess);
- every mined pair of a knowledge request: whether best and worst differ in fact search and in reference
  choice, how often the best guessed, and which search lesson the experience wrote.

Prints a table and saves ``benchmarks/results/mined_pairs_<label>.json`` (or ``--out``).

    .venv/bin/python benchmarks/mined_pairs.py RUN [--label tiny]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from genevolve.experience.bank import evidence
from genevolve.records.schema import Trajectory, Verdict, atomic_write_json, read_jsonl
from genevolve.world import World


def right_references(traj: Trajectory, request, world) -> bool:
    """Every kept reference is the official picture of an entity the request names (and there is one)."""
    rows = []
    for ref in traj.program.reference_images if traj.program else []:
        im = traj.image(ref.img_id)
        rows.append(world.refs.get(im.source_id, {}) if im else {})
    return bool(rows) and all(r.get("entity") in request.entities and r.get("variant") == "official" for r in rows)


def describe(traj: Trajectory, request, world) -> dict:
    e = evidence(traj)
    return {"fact_search": e.fact_searches > 0, "grounded": e.grounded, "guessed_names": list(e.guessed_names),
            "right_references": right_references(traj, request, world)}


def share(rows: list[dict], key) -> dict:
    n = len(rows)
    k = sum(1 for r in rows if key(r))
    return {"n": k, "of": n, "share": (k / n) if n else None}


def analyse(run: Path, world: World) -> dict:
    reqs = {r.id: r for r in world.requests}
    trajs = {t.id: t for t in read_jsonl(run / "trajectories.jsonl", Trajectory)}
    verdicts = {v.trajectory_id: v for v in read_jsonl(run / "verdicts.jsonl", Verdict)}
    exps = {}
    if (run / "bank" / "experiences.jsonl").exists():
        for line in (run / "bank" / "experiences.jsonl").read_text("utf-8").splitlines():
            if line.strip():
                e = json.loads(line)
                exps[e["id"]] = e
    hops = {}

    def hop(rid):
        if rid not in hops:
            hops[rid] = world.parse(reqs[rid].text).hops
        return hops[rid]

    # Rollout groups: a trajectory id is <request>-s<step>-k<index>.
    groups = collections.defaultdict(list)
    for t in trajs.values():
        v = verdicts.get(t.id)
        if v is not None and v.reward is not None and t.request_id in reqs and reqs[t.request_id].track == "knowledge":
            groups[t.id.rsplit("-k", 1)[0]].append((t, v))
    tops = []
    for members in groups.values():
        t, v = max(members, key=lambda tv: tv[1].reward)
        r = reqs[t.request_id]
        tops.append({"request_id": r.id, "hops": hop(r.id), "reward": v.reward, **describe(t, r, world)})
    hop_tops = [x for x in tops if x["hops"]]

    pairs = []
    rows = (run / "pairs.jsonl").read_text("utf-8").splitlines() if (run / "pairs.jsonl").exists() else []
    for row in (json.loads(line) for line in rows if line.strip()):
        r = reqs.get(row["request_id"])
        if r is None or r.track != "knowledge" or row["best"] not in trajs or row["worst"] not in trajs:
            continue
        b, w = describe(trajs[row["best"]], r, world), describe(trajs[row["worst"]], r, world)
        exp = exps.get(row.get("experience") or "", {})
        pairs.append({"request_id": r.id, "hops": hop(r.id), "gap": row["gap"], "best": b, "worst": w,
                      "passed_over": row.get("passed_over"), "search_lesson": exp.get("slots", {}).get("search_strategy"),
                      "summariser": exp.get("summariser")})
    lessons = collections.Counter(p["search_lesson"] for p in pairs if p["search_lesson"])
    return {
        "run": str(run),
        "knowledge_groups": len(tops),
        "top_trajectory": {
            "grounded": share(tops, lambda x: x["grounded"]),
            "right_references": share(tops, lambda x: x["right_references"]),
            "hop_requests": {
                "fact_search": share(hop_tops, lambda x: x["fact_search"]),
                "right_references": share(hop_tops, lambda x: x["right_references"]),
                "right_without_fact_search": share(hop_tops, lambda x: x["right_references"] and not x["fact_search"]),
            },
        },
        "mined_pairs": {
            "n": len(pairs),
            "hop_requests": sum(1 for p in pairs if p["hops"]),
            "best_guessed": share(pairs, lambda p: not p["best"]["grounded"]),
            "best_right_without_fact_search_on_hop_requests": share(
                [p for p in pairs if p["hops"]], lambda p: p["best"]["right_references"] and not p["best"]["fact_search"]),
            "differ_in_fact_search": share(pairs, lambda p: p["best"]["fact_search"] != p["worst"]["fact_search"]),
            "differ_in_reference_choice": share(pairs, lambda p: p["best"]["right_references"] != p["worst"]["right_references"]),
            "worst_guessed": share(pairs, lambda p: not p["worst"]["grounded"]),
            "guesses_passed_over": sum(p["passed_over"] or 0 for p in pairs),
            "search_lessons": dict(lessons.most_common()),
        },
        "pairs": pairs,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="an evolve run folder")
    ap.add_argument("--label", default=None, help="name in the output file (default: the run folder's name)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    run = Path(a.run)
    if not (run / "trajectories.jsonl").exists():
        ap.error(f"{run} has no trajectories.jsonl: not an evolve run folder")
    res = analyse(run, World())
    top, mp = res["top_trajectory"], res["mined_pairs"]

    def fmt(s):
        return f"{s['n']}/{s['of']}" + (f" ({s['share']:.0%})" if s["share"] is not None else "")

    print(f"knowledge rollout groups: {res['knowledge_groups']}")
    print(f"  top trajectory grounded {fmt(top['grounded'])}, right references {fmt(top['right_references'])}")
    h = top["hop_requests"]
    print(f"  hop requests: fact search {fmt(h['fact_search'])}, right references {fmt(h['right_references'])}, "
          f"right without fact search {fmt(h['right_without_fact_search'])}")
    print(f"mined knowledge pairs: {mp['n']} ({mp['hop_requests']} with a hop)")
    for k in ("best_guessed", "best_right_without_fact_search_on_hop_requests", "differ_in_fact_search",
              "differ_in_reference_choice", "worst_guessed"):
        print(f"  {k.replace('_', ' ')}: {fmt(mp[k])}")
    print(f"  guesses passed over: {mp['guesses_passed_over']}")
    for lesson, n in mp["search_lessons"].items():
        print(f"  {n} x {lesson}")
    out = Path(a.out) if a.out else Path(__file__).parent / "results" / f"mined_pairs_{a.label or run.name}.json"
    atomic_write_json(out, res)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
