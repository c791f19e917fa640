"""Decision guides: a visual experience's five slots rendered for the teacher's system prompt.

A guide is short, imperative and entity-free: it says what to do for *this kind* of request, not
what the answer is. :func:`format_guide` writes the slots in the fixed order the policy is trained
on; :func:`oracle_guide` writes the correct guide for a sandbox request from its ground truth (used
to build guide-conditioned cold-start data and to measure whether a policy can use a guide at all).
"""

from __future__ import annotations

import sys

SLOTS = ("search_strategy", "skill_activation", "reference_selection", "prompt_construction", "failure_avoidance")
SLOT_TITLES = {
    "search_strategy": "Search strategy",
    "skill_activation": "Skill activation",
    "reference_selection": "Reference selection",
    "prompt_construction": "Prompt construction",
    "failure_avoidance": "Failure avoidance",
}

CONSTRUCTION = {
    "spatial_layout": 'place every object "in the <cell> of the image"',
    "quantity_counting": 'write counts as "exactly <number>"',
    "attribute_binding": "give each coloured object its own sentence",
    "anatomy_body_coherence": "state the exact limb count of every figure",
    "physical_material_consistency": 'name the material with "made of ..." and add "casting a soft shadow"',
    "aesthetic_drawing": "name the lighting with its exact phrase",
    "creative_drawing": "turn the metaphor into its exact style phrase",
    "text_rendering": 'quote the text after "the exact text"',
}
AVOID = {
    "spatial_layout": "relation words alone",
    "quantity_counting": "bare numbers",
    "attribute_binding": "two colours in one sentence",
    "anatomy_body_coherence": "figures without limb counts",
    "physical_material_consistency": "adjectives like shiny or wooden",
    "aesthetic_drawing": "mood words for lighting",
    "creative_drawing": "metaphors for style",
    "text_rendering": "unquoted or paraphrased text",
}


def format_guide(slots: dict[str, str]) -> str:
    """The guide text, one line per non-empty slot, in the canonical order."""
    missing = [s for s in slots if s not in SLOTS]
    if missing:
        raise ValueError(f"unknown guide slots: {missing}; slots are {', '.join(SLOTS)}")
    return "\n".join(f"- {SLOT_TITLES[s]}: {slots[s].strip()}" for s in SLOTS if slots.get(s, "").strip())


def oracle_slots(skills: list[str], knowledge: bool, hops: int) -> dict[str, str]:
    """The correct five slots for a request with these needs."""
    if hops:
        search = "Search the fact that names the entity first, then image-search its official picture by exact name."
    elif knowledge:
        search = "Image-search the entity by its exact name; no text search is needed."
    else:
        search = "No search is needed; everything is in the request."
    skill = ("Query " + ", ".join(skills) + ".") if skills else "No skill is needed."
    ref = ("Pick the reference titled Official with the exact name; skip misprints, historic, fan-made and look-alike names."
           if knowledge else "No reference image is needed.")
    cons = ("; ".join(CONSTRUCTION[s] for s in skills) + ".") if skills else "Describe the object plainly."
    cons = cons[0].upper() + cons[1:]
    avoid = ("Never rely on " + ", ".join(AVOID[s] for s in skills) + ".") if skills else "Do not add objects."
    return {"search_strategy": search, "skill_activation": skill, "reference_selection": ref,
            "prompt_construction": cons, "failure_avoidance": avoid}


def oracle_guide(world, request) -> str:
    """The correct decision guide for a sandbox request (from its ground truth)."""
    parsed = world.parse(request.text)
    return format_guide(oracle_slots(list(request.skills), bool(parsed.mentions), parsed.hops))


def derangement(n: int, allowed, seed: int = 0) -> list[int]:
    """A seeded permutation ``p`` of ``range(n)`` with ``allowed(i, p[i])`` for every ``i``.

    A random shuffle, then every position that breaks the rule swaps with one where both sides keep
    it, so each swap fixes one position and breaks none. Raises ValueError when no swap is left.
    """
    import random

    rng = random.Random(seed)
    p = list(range(n))
    rng.shuffle(p)
    for i in range(n):
        if allowed(i, p[i]):
            continue
        others = list(range(n))
        rng.shuffle(others)
        j = next((j for j in others if allowed(i, p[j]) and allowed(j, p[i])), None)
        if j is None:
            raise ValueError(f"cannot shuffle {n} guides so that every request gets one that is not its own "
                             "(too few requests, or one guide is shared by most of them)")
        p[i], p[j] = p[j], p[i]
    return p


GUIDE_KINDS = "'oracle', 'bank:<folder>', 'shuffled' or 'shuffled:<folder>'"


def _similarity_summary(sims: list[float]) -> dict | None:
    import statistics

    if not sims:
        return None
    stats = {"min": min(sims), "median": statistics.median(sims), "mean": statistics.fmean(sims), "max": max(sims)}
    return {"n": len(sims)} | {k: round(v, 4) for k, v in stats.items()}


def _open_bank(folder: str, key: str = "situation", describer=None):
    from pathlib import Path

    from ..experience.bank import ExperienceBank

    if not (Path(folder) / "experiences.jsonl").is_file():
        raise ValueError(f"{folder!r} holds no experience bank (no experiences.jsonl)")
    bank = ExperienceBank(folder, key=key, describer=describer)
    for line in bank.load_errors:
        print(f"warning: broken bank line skipped: {line}", file=sys.stderr)
    if not len(bank):
        raise ValueError(f"the experience bank {folder!r} is empty")
    return bank


def request_guides(spec: str, world, requests, gate: float | None = None, leave_own_out: bool = False,
                   seed: int = 0, key: str = "situation", describer=None) -> tuple[dict[str, str], dict]:
    """Decision guides for ``requests`` from a ``--guide`` value, and a JSON-ready account of what was given.

    - ``oracle``: each request's correct guide.
    - ``bank:<folder>``: each request's nearest experience in that bank if its cosine similarity reaches
      ``gate`` (default: the key's, 0.90 for situations, 0.84 for raw texts); requests below it get no guide.
    - ``shuffled``: the oracle guide of another request, never one equal to the request's own.
    - ``shuffled:<folder>``: the nearest bank experience of another request (no gate: every request gets
      one), never one mined from the request itself nor one worded as the experience it would retrieve.

    ``leave_own_out`` (bank kinds only) never retrieves an experience mined from the request itself (alone or
    merged with others), so what is measured is transfer to other requests. ``key`` is what retrieval compares:
    the request's situation (read from its text by ``describer``, by default the offline cue reader) with the
    experiences' triggers, or raw request texts. Retrieval reads each request's text and id only. Shuffles are
    seeded derangements.
    """
    from ..experience.bank import default_gate, guide_text

    kind, _, folder = spec.partition(":")
    if kind not in ("oracle", "bank", "shuffled") or (kind == "oracle" and folder) or (kind == "bank" and not folder):
        raise ValueError(f"unknown guide {spec!r}; the guide is {GUIDE_KINDS}")
    if not folder and (leave_own_out or gate is not None):
        raise ValueError("a gate and leave-own-out apply to experiences from a bank: 'bank:<folder>' or 'shuffled:<folder>'")
    if kind == "shuffled" and folder and gate is not None:
        raise ValueError("'shuffled:<folder>' gives every request another request's experience, with no gate")
    if kind == "oracle":
        return {r.id: oracle_guide(world, r) for r in requests}, {"kind": "oracle", "n_guided": len(requests)}
    if kind == "shuffled" and not folder:
        texts = [oracle_guide(world, r) for r in requests]
        p = derangement(len(requests), lambda i, j: texts[j] != texts[i], seed)
        return ({r.id: texts[p[i]] for i, r in enumerate(requests)},
                {"kind": "shuffled", "source": "oracle guides of other requests", "seed": seed, "n_guided": len(requests),
                 "per_request": [{"request": r.id, "guide_of": requests[p[i]].id} for i, r in enumerate(requests)]})
    bank = _open_bank(folder, key, describer)
    near = bank.nearest([r.text for r in requests], [r.id for r in requests] if leave_own_out else None)
    base = {"bank": folder, "bank_size": len(bank), "leave_own_out": leave_own_out, "key": key,
            "describer": bank.describer.name if key == "situation" else None}
    if kind == "bank":
        gate = default_gate(key) if gate is None else gate
        per = [{"request": r.id, "experience": e.id if e else None, "source_request": e.source_request_id if e else None,
                "sources": sorted(e.sources()) if e else [], "evidence": e.evidence if e else None,
                "similarity": None if s is None else round(s, 4), "hit": s is not None and s >= gate} for r, (e, s) in zip(requests, near)]
        hits = sum(x["hit"] for x in per)
        guides = {r.id: guide_text(e) for r, (e, s), x in zip(requests, near, per) if x["hit"]}
        return guides, {"kind": "bank", **base, "gate": gate, "n_guided": hits, "hits": hits,
                        "hit_rate": hits / len(requests) if requests else None,
                        "similarity": _similarity_summary([s for _, s in near if s is not None]), "per_request": per}

    texts = [guide_text(e) if e else None for e, _ in near]

    def allowed(i: int, j: int) -> bool:  # another request's experience, and not the same words as the own one
        return texts[j] is not None and texts[j] != texts[i] and requests[i].id not in near[j][0].sources()

    p = derangement(len(requests), allowed, seed)
    per = [{"request": r.id, "guide_of": requests[p[i]].id, "experience": near[p[i]][0].id,
            "source_request": near[p[i]][0].source_request_id} for i, r in enumerate(requests)]
    return ({r.id: texts[p[i]] for i, r in enumerate(requests)},
            {"kind": "shuffled", "source": "nearest bank experience of another request", **base, "gate": None, "seed": seed,
             "n_guided": len(requests), "per_request": per})
