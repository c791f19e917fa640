"""Requests: sampling ground-truth scenes, writing them as natural requests, and reading requests back.

A request is written the way a person asks ("Draw the flag of the 2031 Aurora Cup champion above
three gold stars, at dusk"). :func:`parse_request` reads any text in that language (sandbox requests
and free text alike) into a ground-truth :class:`Scene` plus the *mentions* that say how each entity
was named (directly, or through an event, a landmark or a club: multi-hop facts).

Which skills a request needs follows from its scene (:func:`needed_skills`):

- spatial_layout: two or more objects (their places are given as relations or loose phrases)
- quantity_counting: a group of two or more shapes
- attribute_binding: two or more objects with distinct colours
- anatomy_body_coherence: a person or an animal
- physical_material_consistency: a shape made of a material (it must also cast a shadow)
- aesthetic_drawing: a lighting mood; creative_drawing: a stylistic metaphor
- text_rendering: text on a banner
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from .entities import CUPS, SHIELDS, YEARS, WorldData
from .scene import Obj, Scene
from .vocab import (
    ANIMAL_NOUNS,
    NUMBER_WORDS,
    OBJECT_COLORS,
    PERSON_NOUNS,
    RELATIONS,
    REQUEST_CELL_PHRASES,
    REQUEST_LIGHTING_PHRASES,
    REQUEST_MATERIAL_WORDS,
    REQUEST_STYLE_PHRASES,
    SHAPE_SYNONYMS,
    SHAPES,
    STYLES,
    LIGHTINGS,
    generator_lighting_phrase,
    generator_style_phrase,
)


class ParseError(ValueError):
    """The sandbox world cannot read this request."""


def outside_world_note(parse_error: str | None) -> str:
    """What to tell a person whose request the sandbox cannot read (CLI and studio say the same)."""
    return (f"This request lies outside the sandbox world ({parse_error}). It has no ground truth, so it gets no "
            "KScore: its scores are null and it counts as missing. The sandbox policies are trained only on sandbox "
            "requests; a request like this needs a real policy, generator and judge (see `genevolve bench --data`).")


@dataclass
class Mention:
    """How a request named an entity object: ``via`` is name, event, location or home."""

    entity: str
    via: str = "name"
    event: str | None = None  # event id (event, home)
    landmark: str | None = None  # landmark id (location)
    club: str | None = None  # club id (home)
    span: tuple[int, int] = (0, 0)


@dataclass
class ParsedRequest:
    scene: Scene
    mentions: dict[int, Mention] = field(default_factory=dict)  # object index -> mention
    phrases: dict[int, str] = field(default_factory=dict)  # object index -> the request's own words

    @property
    def hops(self) -> int:
        return sum({"name": 0, "event": 1, "location": 1, "home": 2}[m.via] for m in self.mentions.values())


# ---------------------------------------------------------------------------
# Skills a scene needs
# ---------------------------------------------------------------------------


def difficulty(skills: list[str], hops: int) -> int:
    """1 to 3: one more for two or more skills, one more for a fact to look up first."""
    return min(3, 1 + (len(skills) >= 2) + (hops >= 1))


def needed_skills(scene: Scene) -> list[str]:
    objs = scene.objects
    need = []
    if len(objs) >= 2:
        need.append("spatial_layout")
    if any(o.kind == "shape" and o.count >= 2 for o in objs):
        need.append("quantity_counting")
    colored = [o.color for o in objs if o.kind in ("shape", "figure") and o.color]
    if len(colored) >= 2 and len(set(colored)) >= 2:
        need.append("attribute_binding")
    if any(o.kind == "figure" for o in objs):
        need.append("anatomy_body_coherence")
    if any(o.kind == "shape" and o.material for o in objs):
        need.append("physical_material_consistency")
    if scene.lighting:
        need.append("aesthetic_drawing")
    if scene.style:
        need.append("creative_drawing")
    if scene.text:
        need.append("text_rendering")
    return need


def visual_groups(scene: Scene) -> list[str]:
    """The groups visual correctness V averages over: knowledge (entities) plus every needed skill but text."""
    groups = ["knowledge"] if any(o.kind == "entity" for o in scene.objects) else []
    return groups + [s for s in needed_skills(scene) if s != "text_rendering"]


# ---------------------------------------------------------------------------
# Writing requests
# ---------------------------------------------------------------------------


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def shape_phrase(o: Obj, rng: random.Random, exact: bool = False) -> str:
    noun = o.noun or o.shape or "circle"
    words = []
    if o.count == 1:
        words.append("an" if (o.material is None and (o.color or noun)[0] in "aeiou") else "a")
    else:
        if exact:
            words.append("exactly")
        words.append(NUMBER_WORDS[o.count])
    if o.material:
        words.append(rng.choice(REQUEST_MATERIAL_WORDS[o.material]))
    if o.color:
        words.append(o.color)
    words.append(noun if o.count == 1 else _plural(noun))
    if words[0] == "an" and words[1][0] not in "aeiou":
        words[0] = "a"
    return " ".join(words)


def figure_phrase(o: Obj) -> str:
    art = "an" if (o.color or "x")[0] in "aeiou" else "a"
    return f"{art} {o.color} {o.noun}"


def entity_phrase(w: WorldData, m: Mention) -> str:
    e = w.entities[m.entity]
    if m.via == "event":
        ev = w.events[m.event]
        role = "champion" if e.kind == "nation" else "winner"
        return f"the {e.noun} of the {ev.year} {ev.trophy} {role}"
    if m.via == "location":
        return f"the flag of the nation where {w.entities[m.landmark].name} stands"
    if m.via == "home":
        ev = w.events[m.event]
        return f"the flag of the home nation of the {ev.year} {ev.trophy} winner"
    if e.kind == "nation":
        return f"the flag of {e.name}"
    if e.kind == "club":
        return f"the crest of {e.name}"
    if e.kind == "product":
        return f"the logo of the {e.name}"
    return e.name


def write_request(w: WorldData, parsed: ParsedRequest, rng: random.Random) -> str:
    sc = parsed.scene
    phrases = []
    for i, o in enumerate(sc.objects):
        if o.kind == "entity":
            phrases.append(entity_phrase(w, parsed.mentions[i]))
        elif o.kind == "figure":
            phrases.append(figure_phrase(o))
        else:
            phrases.append(shape_phrase(o, rng, exact=rng.random() < 0.25))
    cells = [o.cell for o in sc.objects]
    verb = rng.choice(["Draw", "Create an image of", "Show", "Paint"])
    if len(phrases) == 1:
        body = phrases[0]
    elif len(phrases) == 2:
        rel = next((r for r, pair in RELATIONS.items() if list(pair) == cells), None)
        if rel and rng.random() < 0.8:
            body = f"{phrases[0]} {rel} {phrases[1]}"
        else:
            body = f"{phrases[0]} {REQUEST_CELL_PHRASES[cells[0]]} and {phrases[1]} {REQUEST_CELL_PHRASES[cells[1]]}"
    else:
        parts = [f"{p} {REQUEST_CELL_PHRASES[c]}" for p, c in zip(phrases, cells)]
        body = ", ".join(parts[:-1]) + " and " + parts[-1]
    text = f"{verb} {body}"
    if sc.lighting:
        text += ", " + rng.choice(REQUEST_LIGHTING_PHRASES[sc.lighting])
    if sc.style:
        text += ", " + rng.choice(REQUEST_STYLE_PHRASES[sc.style])
    if sc.text:
        if rng.random() < 0.6:
            text += f', with a banner that says "{sc.text}"'
        else:
            text += f", with the words {sc.text} written on a banner"
    return text


# ---------------------------------------------------------------------------
# Reading requests
# ---------------------------------------------------------------------------

_COLOR = "|".join(OBJECT_COLORS)
_SHAPE = "|".join(sorted(list(SHAPES) + list(SHAPE_SYNONYMS), key=len, reverse=True))
_MAT_WORDS = {w: m for m, ws in REQUEST_MATERIAL_WORDS.items() for w in ws}
_MAT = "|".join(sorted(_MAT_WORDS, key=len, reverse=True))
_COUNT = "|".join(["a pair of", "an", "a", "one", "single"] + [NUMBER_WORDS[n] for n in range(2, 7)] + [str(n) for n in range(1, 7)])
_SHAPE_RE = re.compile(
    rf"\b(?P<exact>exactly )?(?P<count>{_COUNT}) (?:(?P<mat>{_MAT}) )?(?:(?P<color>{_COLOR}) )?(?P<shape>{_SHAPE})(?:e?s)?\b",
    re.I,
)
_FIGURE_RE = re.compile(rf"\b(?:a|an|one) (?P<color>{_COLOR}) (?P<noun>{'|'.join(PERSON_NOUNS + ANIMAL_NOUNS)})\b", re.I)
_CUP = "|".join(CUPS + SHIELDS)
_ENTITY_RES = [
    ("event", re.compile(rf"\bthe (?:flag|crest) of the (?P<year>\d{{4}}) (?P<trophy>{_CUP}) (?:champions?|winners?)\b", re.I)),
    ("home", re.compile(rf"\bthe flag of the home nation of the (?P<year>\d{{4}}) (?P<trophy>{_CUP}) winners?\b", re.I)),
    ("location", re.compile(r"\bthe flag of the nation where (?P<landmark>the [A-Z][a-z]+ [A-Z][a-z]+) stands\b")),
    ("name", re.compile(r"\bthe flag of (?P<name>[A-Z][a-z]+)\b")),
    ("name", re.compile(r"\bthe crest of (?P<name>[A-Z][a-z]+ [A-Z][A-Za-z]+)\b")),
    ("name", re.compile(r"\bthe logo of the (?P<name>[A-Z][a-z]+ [a-z]+)\b")),
    ("name", re.compile(r"\b(?P<name>the [A-Z][a-z]+ (?:Spire|Tower|Dome|Arch|Steps))\b")),
]
_QUOTED_TEXT = re.compile(r'"([^"]{1,40})"')
_UNQUOTED_TEXT = re.compile(r"\bwith the words ([A-Z0-9][A-Z0-9 ]*?) (?:written )?on a banner\b")


def _count(word: str) -> int:
    word = word.lower()
    if word.isdigit():
        return int(word)
    return {"a": 1, "an": 1, "one": 1, "single": 1, "a pair of": 2}.get(word) or {v: k for k, v in NUMBER_WORDS.items()}[word]


def _resolve(w: WorldData, via: str, m: re.Match) -> Mention:
    if via in ("event", "home"):
        ev = w.event(int(m["year"]), m["trophy"])
        if ev is None:
            raise ParseError(f"no event called the {m['year']} {m['trophy']} in the sandbox world")
        if via == "event":
            want = "flag" if m.group(0).lower().startswith("the flag") else "crest"
            winner = w.entities[ev.winner]
            if winner.noun != want:
                raise ParseError(f"the {ev.title} was not won by a {'nation' if want == 'flag' else 'club'}")
            return Mention(ev.winner, "event", event=ev.id)
        club = w.entities[ev.winner]
        if club.kind != "club":
            raise ParseError(f"the {ev.title} was won by a nation, not a club")
        return Mention(club.nation, "home", event=ev.id, club=club.id)
    if via == "location":
        lm = w.by_name(m["landmark"])
        if lm is None or lm.kind != "landmark":
            raise ParseError(f"no landmark called {m['landmark']}")
        return Mention(lm.nation, "location", landmark=lm.id)
    name = m["name"]
    e = w.by_name(name)
    if e is None:
        raise ParseError(f"no entity called {name!r} in the sandbox world")
    return Mention(e.id)


def parse_request(text: str, w: WorldData) -> ParsedRequest:
    """Read a request into its ground-truth scene; raise :class:`ParseError` when the world cannot."""
    found: list[tuple[int, int, Obj, Mention | None]] = []
    taken: list[tuple[int, int]] = []

    def free(a: int, b: int) -> bool:
        return all(b <= s or a >= e for s, e in taken)

    for via, rx in _ENTITY_RES:
        for m in rx.finditer(text):
            if not free(m.start(), m.end()):
                continue
            men = _resolve(w, via, m)
            men.span = (m.start(), m.end())
            ent = w.entities[men.entity]
            found.append((m.start(), m.end(), Obj("entity", entity=ent.id, emblem=ent.emblem, noun=ent.noun), men))
            taken.append((m.start(), m.end()))
    for m in _FIGURE_RE.finditer(text):
        if free(m.start(), m.end()):
            noun = m["noun"].lower()
            person = noun in PERSON_NOUNS
            obj = Obj("figure", color=m["color"].lower(), figure="person" if person else "animal", noun=noun,
                      arms=2 if person else 0, legs=2 if person else 4)
            found.append((m.start(), m.end(), obj, None))
            taken.append((m.start(), m.end()))
    for m in _SHAPE_RE.finditer(text):
        if not free(m.start(), m.end()):
            continue
        noun = m["shape"].lower()
        count = _count(m["count"])
        if not 1 <= count <= 6:
            raise ParseError(f"the sandbox draws between one and six of a shape, not {count}")
        mat = _MAT_WORDS.get((m["mat"] or "").lower())
        obj = Obj("shape", shape=SHAPE_SYNONYMS.get(noun, noun), noun=noun, color=(m["color"] or "").lower() or None,
                  count=count, material=mat, shadow=mat is not None)
        found.append((m.start(), m.end(), obj, None))
        taken.append((m.start(), m.end()))
    if not found:
        raise ParseError("no object the sandbox world can draw (shapes, figures, flags, crests, landmarks, logos)")
    if len(found) > 3:
        raise ParseError("the sandbox draws at most three objects per request")
    found.sort(key=lambda t: t[0])
    scene = Scene(objects=[f[2] for f in found])

    # Places: a loose cell phrase right after an object, or a relation between the first two.
    n = len(found)
    for i, (s, e, obj, _) in enumerate(found):
        tail = text[e : found[i + 1][0] if i + 1 < n else len(text)].lower()
        for cell, phrase in REQUEST_CELL_PHRASES.items():
            if tail.lstrip(" ,").startswith(phrase):
                obj.cell = cell
    if n == 2 and not all(o.cell for o in scene.objects):
        between = text[found[0][1] : found[1][0]].lower().strip(" ,")
        rel = next((r for r in RELATIONS if between.startswith(r)), None)
        if rel is None:
            raise ParseError("two objects need a relation (above, below, to the left of, to the right of) or places")
        scene.objects[0].cell, scene.objects[1].cell = RELATIONS[rel]
    elif n == 1:
        scene.objects[0].cell = "center"
    if any(o.cell is None for o in scene.objects) or len({o.cell for o in scene.objects}) < n:
        raise ParseError("every object needs its own place")

    low = text.lower()
    for light in LIGHTINGS:
        if any(p in low for p in REQUEST_LIGHTING_PHRASES[light]) or generator_lighting_phrase(light) in low:
            scene.lighting = light
    for style in STYLES:
        if any(p in low for p in REQUEST_STYLE_PHRASES[style]) or generator_style_phrase(style) in low:
            scene.style = style
    q = _QUOTED_TEXT.search(text) or _UNQUOTED_TEXT.search(text)
    if q:
        t = q.group(1).upper().strip()
        if not re.fullmatch(r"[A-Z0-9 ]{1,18}", t):
            raise ParseError("banner text must be 1-18 letters, digits or spaces")
        scene.text = t
    mentions = {i: f[3] for i, f in enumerate(found) if f[3] is not None}
    phrases = {i: text[f[0] : f[1]] for i, f in enumerate(found)}
    return ParsedRequest(scene, mentions, phrases)


# ---------------------------------------------------------------------------
# Sampling the sandbox's requests
# ---------------------------------------------------------------------------

KA_TEXTS = ("CHAMPIONS", "FINAL {Y}", "GO TEAM", "WE WON {Y}", "HOME GAME", "SEASON {Y}")
QA_TEXTS = ("OPEN DAILY", "FRESH BREAD", "WELCOME HOME", "SALE 50", "HELLO WORLD", "NO PARKING", "GRAND OPENING",
            "BIG SALE", "EXIT 7", "CAFE NOIR", "LOST CAT", "ROOM 204", "STAY CALM", "BOOK CLUB", "TEA TIME")
QA_CATEGORIES = ("spatial_layout", "aesthetic_drawing", "text_rendering", "creative_drawing", "anatomy_body_coherence",
                 "attribute_binding", "physical_material_consistency", "quantity_counting")


def _entity_mention(w: WorldData, rng: random.Random, kind: str) -> Mention:
    ents = w.by_kind(kind)
    if kind == "nation":
        r = rng.random()
        if r < 0.35:
            ev = rng.choice([ev for ev in w.events.values() if w.entities[ev.winner].kind == "nation"])
            return Mention(ev.winner, "event", event=ev.id)
        if r < 0.55:
            lm = rng.choice(w.by_kind("landmark"))
            return Mention(lm.nation, "location", landmark=lm.id)
        if r < 0.7:
            ev = rng.choice([ev for ev in w.events.values() if w.entities[ev.winner].kind == "club"])
            club = w.entities[ev.winner]
            return Mention(club.nation, "home", event=ev.id, club=club.id)
    if kind == "club" and rng.random() < 0.45:
        ev = rng.choice([ev for ev in w.events.values() if w.entities[ev.winner].kind == "club"])
        return Mention(ev.winner, "event", event=ev.id)
    return Mention(rng.choice(ents).id)


def _shape(rng: random.Random, count: int | None = None, color: str | None = None, material: str | None = None) -> Obj:
    shape = rng.choice(SHAPES)
    noun = shape
    if material:
        shape = rng.choice(["circle", "square"])
        noun = rng.choice({"circle": ["sphere", "ball"], "square": ["cube", "block"]}[shape])
    return Obj("shape", shape=shape, noun=noun, color=color or rng.choice(list(OBJECT_COLORS)),
               count=count or 1, material=material, shadow=material is not None)


def _figure(rng: random.Random, color: str | None = None) -> Obj:
    if rng.random() < 0.6:
        return Obj("figure", figure="person", noun=rng.choice(PERSON_NOUNS), color=color or rng.choice(list(OBJECT_COLORS)), arms=2, legs=2)
    return Obj("figure", figure="animal", noun=rng.choice(ANIMAL_NOUNS), color=color or rng.choice(list(OBJECT_COLORS)), legs=4)


def _place(rng: random.Random, objs: list[Obj]) -> None:
    if len(objs) == 1:
        objs[0].cell = "center"
    elif len(objs) == 2:
        if rng.random() < 0.7:
            objs[0].cell, objs[1].cell = rng.choice(list(RELATIONS.values()))
        else:
            a, b = rng.sample(["top-left", "top-right", "bottom-left", "bottom-right", "top", "bottom", "left", "right"], 2)
            objs[0].cell, objs[1].cell = a, b
    else:
        row = rng.choice([("left", "center", "right"), ("top-left", "center", "bottom-right"), ("top", "center", "bottom")])
        for o, c in zip(objs, row):
            o.cell = c


def sample_scene(w: WorldData, rng: random.Random, track: str, category: str) -> ParsedRequest:
    """A random scene for a track and category, needing at most three V-groups (two when it has text)."""
    for _ in range(200):
        objs: list[Obj] = []
        mentions: dict[int, Mention] = {}
        scene = Scene()
        if track == "knowledge":
            kinds = {"flag": "nation", "crest": "club", "landmark": "landmark", "logo": "product"}
            men = _entity_mention(w, rng, kinds[category])
            ent = w.entities[men.entity]
            objs.append(Obj("entity", entity=ent.id, emblem=ent.emblem, noun=ent.noun))
            mentions[0] = men
            extra = rng.random()
            if extra < 0.35:
                objs.append(_shape(rng, count=rng.choice([1, 2, 3, 4, 5])))
            elif extra < 0.5:
                objs.append(_figure(rng))
            elif extra < 0.6:
                men2 = _entity_mention(w, rng, rng.choice(["nation", "club", "landmark", "product"]))
                if men2.entity != men.entity:
                    e2 = w.entities[men2.entity]
                    objs.append(Obj("entity", entity=e2.id, emblem=e2.emblem, noun=e2.noun))
                    mentions[1] = men2
            if rng.random() < 0.3:
                scene.text = rng.choice(KA_TEXTS).format(Y=rng.choice(YEARS))
            elif rng.random() < 0.25:
                scene.lighting = rng.choice(LIGHTINGS)
            elif rng.random() < 0.2:
                scene.style = rng.choice(STYLES)
        else:
            if category == "spatial_layout":
                objs = [rng.choice([_shape, _figure])(rng) for _ in range(rng.choice([2, 2, 3]))]
            elif category == "quantity_counting":
                objs = [_shape(rng, count=rng.randint(2, 6))]
                if rng.random() < 0.4:
                    objs.append(_shape(rng, count=rng.randint(2, 5)))
            elif category == "attribute_binding":
                c1, c2 = rng.sample(list(OBJECT_COLORS), 2)
                objs = [_shape(rng, color=c1), _shape(rng, color=c2)]
            elif category == "anatomy_body_coherence":
                objs = [_figure(rng)]
                if rng.random() < 0.3:
                    objs.append(_shape(rng, color=objs[0].color))
            elif category == "physical_material_consistency":
                objs = [_shape(rng, material=rng.choice(["metal", "wood", "glass"]))]
            else:
                objs = [rng.choice([_shape, _figure])(rng)]
            if category == "text_rendering" or (category not in ("aesthetic_drawing", "creative_drawing") and rng.random() < 0.15):
                scene.text = rng.choice(QA_TEXTS)
            if category == "aesthetic_drawing" or rng.random() < 0.1:
                scene.lighting = rng.choice(LIGHTINGS)
            if category == "creative_drawing" or rng.random() < 0.1:
                scene.style = rng.choice(STYLES)
        # Same-coloured shape groups would be ambiguous under leakage; keep colours distinct unless asked.
        scene.objects = objs
        _place(rng, objs)
        groups = visual_groups(scene)
        limit = 2 if scene.text else 3
        if 1 <= len(groups) + (1 if scene.text else 0) and len(groups) <= limit:
            if track == "quality" and category not in needed_skills(scene):
                continue
            return ParsedRequest(scene, mentions)
    raise RuntimeError("could not sample a scene within the group limits")
