"""Which retrieval key lets experiences reach *other* requests: the request text, or an entity-free template of it?

For an experience bank (e.g. an evolve run's ``<run>/bank``), every request of the evolve split and of the
bench retrieves its nearest experience mined from a *different* request (leave-own-out), once with each key:

- ``raw``: the MiniLM embedding of the request text (what the bank indexes);
- ``template``: the same embedding of an entity-free template of both texts: quoted text becomes "TEXT",
  digits "N", and runs of capitalised words after a sentence's first word "NAME".

A hit is *useful* when the experience's source request has the request's track and at least half of its
skills (Jaccard >= 0.5): its guide then names the right kind of search, references and skills. For a grid
of gates the script reports hits and the useful share, per split. Nothing is written to the bank.

    .venv/bin/python benchmarks/retrieval_keys.py RUN/bank [--out benchmarks/results/retrieval_keys_<label>.json]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from genevolve.records.schema import atomic_write_json

GRID = (0.6, 0.65, 0.7, 0.75, 0.8, 0.84, 0.9)


def template(text: str) -> str:
    text = re.sub(r'"[^"]*"', '"TEXT"', text)
    text = re.sub(r"\d+", "N", text)
    return re.sub(r"(?<!^)(?<![.!?] )\b[A-Z][a-z'-]+(?: [A-Z][a-z'-]+)*", "NAME", text)


KEYS = {"raw": lambda t: t, "template": template}


def useful(source, request) -> bool:
    a, b = set(source.skills), set(request.skills)
    return source.track == request.track and (len(a & b) / len(a | b) if a | b else 1.0) >= 0.5


def nearest_rows(emb, key, exps, reqs, by_id) -> list[dict]:
    ev = np.asarray(emb.encode([key(e["source_request"]) for e in exps]), dtype=np.float32)
    q = np.asarray(emb.encode([key(r.text) for r in reqs]), dtype=np.float32)
    sims = q @ ev.T
    rows = []
    for i, r in enumerate(reqs):
        order = [j for j in np.argsort(-sims[i]) if exps[j]["source_request_id"] != r.id]
        if not order:
            continue
        j = order[0]
        src = by_id.get(exps[j]["source_request_id"])
        rows.append({"request": r.id, "experience": exps[j]["id"], "similarity": float(sims[i, j]),
                     "useful": None if src is None else useful(src, r)})
    return rows


def grid(rows: list[dict]) -> list[dict]:
    out = []
    for g in GRID:
        hits = [x for x in rows if x["similarity"] >= g]
        judged = [x["useful"] for x in hits if x["useful"] is not None]
        out.append({"gate": g, "hits": len(hits), "hit_rate": len(hits) / len(rows) if rows else None,
                    "useful_share": sum(judged) / len(judged) if judged else None})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bank", help="experience bank folder")
    ap.add_argument("--label", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    path = Path(a.bank) / "experiences.jsonl"
    if not path.is_file():
        ap.error(f"{a.bank!r} holds no experience bank (no experiences.jsonl)")
    exps = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    if not exps:
        ap.error(f"the experience bank {a.bank!r} is empty")

    from genevolve.tools.embed import default_embedder
    from genevolve.world import World

    world, emb = World(), default_embedder()
    by_id = {r.id: r for r in world.requests}
    res = {"bank": str(a.bank), "experiences": len(exps), "keys": {}}
    print(f"{'key':<10}{'split':<8}" + "".join(f"{g:>12}" for g in GRID))
    for name, key in KEYS.items():
        res["keys"][name] = {}
        for split in ("evolve", "bench"):
            rows = nearest_rows(emb, key, exps, world.split(split), by_id)
            res["keys"][name][split] = {"grid": grid(rows), "rows": rows}
            cells = [f"{c['hits']:>4} {'-' if c['useful_share'] is None else format(c['useful_share'], '.2f'):>5}  "
                     for c in res["keys"][name][split]["grid"]]
            print(f"{name:<10}{split:<8}" + "".join(f"{c:>12}" for c in cells))
    print("(each cell: hits, useful share of the hits)")
    out = Path(a.out) if a.out else Path(__file__).parent / "results" / f"retrieval_keys_{a.label or Path(a.bank).parent.name}.json"
    atomic_write_json(out, res)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
