"""Decision guides: a visual experience's five slots rendered for the teacher's system prompt.

A guide is short, imperative and entity-free: it says what to do for *this kind* of request, not
what the answer is. :func:`format_guide` writes the slots in the fixed order the policy is trained
on; :func:`oracle_guide` writes the correct guide for a sandbox request from its ground truth (used
to build guide-conditioned cold-start data and to measure whether a policy can use a guide at all).
"""

from __future__ import annotations

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
