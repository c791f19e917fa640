"""Fictional entities, the facts that link them, and the text and reference stores built from them.

Kinds: ``nation`` (has a flag), ``club`` (a crest; based in a nation), ``landmark`` (a building; stands
in a nation) and ``product`` (a logo; made by a club). Events link them: every year's cups are won by
nations and every year's shields by clubs ("the 2031 Aurora Cup was won by Veloria"). Several names
have look-alike twins ("Veloria" / "Velorria") so that careless retrieval picks the wrong entity.

No pretrained model knows any of this: the only way to learn what an entity looks like is
``search`` (a text description) or ``image_search`` (its official picture, among hard distractors:
colour misprints, historic designs, fan redesigns and twins).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .vocab import ENTITY_COLORS, OBJECT_COLORS

KIND_NOUN = {"nation": "flag", "club": "crest", "landmark": "landmark", "product": "logo"}
LANDMARK_TYPES = {"Spire": "spire", "Tower": "tower", "Dome": "dome", "Arch": "arch", "Steps": "stepped"}
CUPS = ("Aurora Cup", "Meridian Cup", "Solstice Cup", "Harbor Cup", "Comet Cup", "Summit Cup")
SHIELDS = ("Lantern Shield", "Ember Shield", "Tidal Shield", "Granite Shield", "Falcon Shield")
YEARS = tuple(range(2026, 2036))
PRODUCT_TYPES = ("phone", "kettle", "bicycle", "camera", "sneaker", "watch", "drone", "guitar")
CLUB_SUFFIXES = ("Rovers", "United", "Athletic", "Wanderers", "FC", "Comets", "Harriers", "Albion")
LANDMARK_ADJ = ("Amber", "Silent", "Copper", "Ivory", "Hollow", "Sunken", "Scarlet", "Winding", "Northern",
                "Mirror", "Iron", "Velvet", "Ashen", "Lunar", "Coral", "Granite", "Emerald", "Hidden")

_ONSETS = ("v", "k", "t", "m", "r", "s", "d", "br", "l", "z", "th", "n", "g", "qu", "f", "p", "h", "dr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("ria", "lia", "mar", "dor", "vel", "nis", "tova", "rin", "sk", "land", "mora", "via", "tan", "zia")


@dataclass
class Entity:
    id: str
    kind: str
    name: str
    emblem: dict[str, Any]
    nation: str | None = None  # club: home nation; landmark: where it stands
    maker: str | None = None  # product: club that makes it
    twin: str | None = None  # look-alike entity id
    description: str = ""

    @property
    def noun(self) -> str:
        return KIND_NOUN[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Event:
    id: str
    trophy: str
    year: int
    winner: str  # entity id
    runner_up: str

    @property
    def title(self) -> str:
        return f"{self.year} {self.trophy}"


@dataclass
class WorldData:
    entities: dict[str, Entity] = field(default_factory=dict)
    events: dict[str, Event] = field(default_factory=dict)

    def by_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities.values() if e.kind == kind]

    def by_name(self, name: str) -> Entity | None:
        low = name.lower()
        return next((e for e in self.entities.values() if e.name.lower() == low), None)

    def event(self, year: int, trophy: str) -> Event | None:
        low = trophy.lower()
        return next((ev for ev in self.events.values() if ev.year == year and ev.trophy.lower() == low), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "entities": [e.to_dict() for e in self.entities.values()],
            "events": [ev.__dict__ for ev in self.events.values()],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorldData":
        w = cls()
        for e in d["entities"]:
            w.entities[e["id"]] = Entity(**e)
        for ev in d["events"]:
            w.events[ev["id"]] = Event(**ev)
        return w


def _name(rng: random.Random, used: set[str]) -> str:
    while True:
        n = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)).capitalize()
        if 5 <= len(n) <= 9 and n not in used:
            used.add(n)
            return n


def _twin_name(name: str, used: set[str], rng: random.Random) -> str | None:
    for _ in range(20):
        i = rng.randrange(1, len(name) - 1)
        cand = name[:i] + name[i] + name[i:] if rng.random() < 0.5 else name[:i] + rng.choice("aeiour") + name[i + 1 :]
        cand = cand.capitalize()
        if cand not in used and cand != name:
            used.add(cand)
            return cand
    return None


def _colors(rng: random.Random, n: int, palette=ENTITY_COLORS) -> list[str]:
    return rng.sample(list(palette), n)


def _flag(rng: random.Random) -> dict[str, Any]:
    layout = rng.choice(["h3", "v3", "h2", "v2", "cross", "diag"])
    n = 3 if layout in ("h3", "v3") else 2
    spec = {"kind": "flag", "layout": layout, "colors": _colors(rng, n)}
    if rng.random() < 0.6:
        spec["symbol"] = rng.choice(["star", "circle", "diamond"])
        spec["symbol_color"] = rng.choice([c for c in ENTITY_COLORS if c not in spec["colors"]])
    return spec


def _crest(rng: random.Random) -> dict[str, Any]:
    c = _colors(rng, 3)
    return {"kind": "crest", "field": "white", "colors": c[:2], "band": rng.choice(["horizontal", "vertical", "chevron", None]),
            "symbol": rng.choice(["star", "circle", "triangle", "diamond"]), "symbol_color": c[2]}


def _landmark(rng: random.Random, ltype: str) -> dict[str, Any]:
    return {"kind": "landmark", "type": ltype, "colors": _colors(rng, 2), "sky": rng.choice(["white", "gold", "teal", "pink"]),
            "tiers": rng.randint(1, 3)}


def _logo(rng: random.Random, letter: str) -> dict[str, Any]:
    c = _colors(rng, 3)
    return {"kind": "logo", "colors": c[:2], "mark": rng.choice(["ring", "bars", "triangle", "diamond", "star", "circle"]),
            "letter": letter, "letter_color": c[2]}


def describe(e: Entity) -> str:
    """A plain-text visual description (what ``search`` can reveal about an entity's look)."""
    s = e.emblem
    cols = s.get("colors", [])
    if e.kind == "nation":
        lay = {"h3": "a horizontal tricolour", "v3": "a vertical tricolour", "h2": "a horizontal bicolour",
               "v2": "a vertical bicolour", "cross": "a cross flag", "diag": "a diagonally divided flag"}[s["layout"]]
        txt = f"The flag of {e.name} is {lay} of {', '.join(cols[:-1])} and {cols[-1]}"
        if s.get("symbol"):
            txt += f", with a {s['symbol_color']} {s['symbol']} in the centre"
        return txt + "."
    if e.kind == "club":
        band = f" crossed by a {cols[1]} {s['band']} band" if s.get("band") else ""
        return f"The crest of {e.name} is a {cols[0]} shield{band}, topped by a {s['symbol_color']} {s['symbol']}."
    if e.kind == "landmark":
        return (f"{e.name} is a {cols[0]} {s['type']} building with {cols[1]} details and {s['tiers']} tiers, "
                f"usually pictured against a {s['sky']} sky.")
    return f"The logo of the {e.name} is a {cols[0]} square with a {cols[1]} {s['mark']} and a {s['letter_color']} letter {s['letter']}."


def generate_world(seed: int = 0, n_nations: int = 64, n_clubs: int = 64, n_landmarks: int = 48, n_products: int = 48) -> WorldData:
    rng = random.Random(seed)
    used: set[str] = {"Veloria"}
    w = WorldData()

    def add(e: Entity) -> Entity:
        e.description = describe(e)
        w.entities[e.id] = e
        return e

    nations = [add(Entity("nation:veloria", "nation", "Veloria", _flag(rng)))]
    for _ in range(n_nations - 1):
        name = _name(rng, used)
        nations.append(add(Entity(f"nation:{name.lower()}", "nation", name, _flag(rng))))
    # Look-alike twins for a third of the nations (including Veloria).
    for base in nations[: n_nations // 3]:
        tname = _twin_name(base.name, used, rng)
        if not tname:
            continue
        spec = dict(base.emblem)
        spec["colors"] = list(spec["colors"])
        spec["colors"][-1] = rng.choice([c for c in ENTITY_COLORS if c not in spec["colors"]])
        twin = add(Entity(f"nation:{tname.lower()}", "nation", tname, spec, twin=base.id))
        base.twin = twin.id
    nation_ids = [e.id for e in w.by_kind("nation")]

    for _ in range(n_clubs):
        city = _name(rng, used)
        name = f"{city} {rng.choice(CLUB_SUFFIXES)}"
        add(Entity(f"club:{name.lower().replace(' ', '-')}", "club", name, _crest(rng), nation=rng.choice(nation_ids)))
    club_ids = [e.id for e in w.by_kind("club")]

    combos = [(a, t) for a in LANDMARK_ADJ for t in LANDMARK_TYPES]
    rng.shuffle(combos)
    for adj, t in combos[:n_landmarks]:
        name = f"the {adj} {t}"
        add(Entity(f"landmark:{adj.lower()}-{t.lower()}", "landmark", name, _landmark(rng, LANDMARK_TYPES[t]),
                   nation=rng.choice(nation_ids)))

    makers = list(club_ids)
    rng.shuffle(makers)
    for i in range(n_products):
        brand = _name(rng, used)
        name = f"{brand} {rng.choice(PRODUCT_TYPES)}"
        add(Entity(f"product:{name.lower().replace(' ', '-')}", "product", name, _logo(rng, brand[0]),
                   maker=makers[i % len(makers)]))

    # Events: every trophy in every year has a winner and a runner-up.
    for trophy in CUPS:
        for year in YEARS:
            winner, runner = rng.sample(nation_ids, 2)
            if (trophy, year) == ("Aurora Cup", 2031):
                winner = "nation:veloria"
                runner = w.entities["nation:veloria"].twin or runner
            eid = f"event:{trophy.lower().replace(' ', '-')}-{year}"
            w.events[eid] = Event(eid, trophy, year, winner, runner)
    for trophy in SHIELDS:
        for year in YEARS:
            winner, runner = rng.sample(club_ids, 2)
            eid = f"event:{trophy.lower().replace(' ', '-')}-{year}"
            w.events[eid] = Event(eid, trophy, year, winner, runner)
    return w


# ---------------------------------------------------------------------------
# Stores: text corpus and reference images
# ---------------------------------------------------------------------------


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in s.lower()).strip("-")


def build_corpus(w: WorldData, seed: int = 0) -> list[dict[str, Any]]:
    """Text documents: profiles, event reports, facts, and distractors that mention the wrong entity."""
    rng = random.Random(seed + 1)
    docs: list[dict[str, Any]] = []

    def doc(title: str, text: str) -> None:
        docs.append({"id": f"d{len(docs) + 1:04d}", "title": title, "url": f"https://sandbox.wiki/{_slug(title)}", "text": text})

    E = w.entities
    for e in E.values():
        extra = ""
        if e.kind == "club":
            extra = f" The club is based in {E[e.nation].name}."
        elif e.kind == "landmark":
            extra = f" It stands in {E[e.nation].name}."
        elif e.kind == "product":
            extra = f" It is made by {E[e.maker].name}."
        doc(f"{e.name}", f"{e.description}{extra}")
        if e.kind in ("nation", "club"):
            doc(f"{e.name} {e.noun} redesign proposal",
                f"A fan campaign proposed a new {e.noun} for {e.name} in {rng.choice(['teal', 'purple', 'orange'])} tones; "
                "the proposal was never adopted and the official design is unchanged.")
    for ev in w.events.values():
        win, run = E[ev.winner], E[ev.runner_up]
        doc(f"{ev.title} final", f"The {ev.title} was won by {win.name}, who beat {run.name} in the final.")
        doc(f"{ev.title} preview", f"Before the {ev.title}, pundits tipped {run.name} as favourites; many fans of {run.name} "
            f"expected a title that year.")
        other = w.event(ev.year - 1, ev.trophy) or w.event(ev.year + 1, ev.trophy)
        if other:
            doc(f"{ev.trophy} history", f"The {ev.trophy} is held every year. {E[other.winner].name} won the {other.title}.")
    for e in E.values():
        if e.kind == "club":
            doc(f"{e.name} home", f"{e.name} plays its home games in {E[e.nation].name}.")
        if e.kind == "landmark":
            doc(f"Visiting {e.name}", f"Tourists who visit {E[e.nation].name} often photograph {e.name}.")
        if e.kind == "product":
            doc(f"{e.name} review", f"Reviewers praised the {e.name}; its box shows the maker's logo and a fan-made sticker.")
        if e.kind == "nation":
            twin = f" It is often confused with {E[e.twin].name}." if e.twin else ""
            doc(f"Geography of {e.name}", f"{e.name} is a small fictional nation of the sandbox.{twin}")
    for ev in w.events.values():
        doc(f"{ev.title} celebrations", f"Fans of {E[ev.winner].name} celebrated for days after the {ev.title}.")
    return docs


VARIANT_TITLES = {
    "official": "Official {noun} of {name}",
    "misprint": "{name} {noun}, colour misprint",
    "historic": "Historic {noun} of {name}, used before 2020",
    "fanart": "{name} {noun}, fan-made redesign",
}


def reference_noun_and_name(e: Entity) -> tuple[str, str]:
    """How reference captions name an entity: ("flag", "Veloria"), ("photo", "the Amber Spire")."""
    return ("photo" if e.kind == "landmark" else e.noun), e.name


def official_title(e: Entity) -> str:
    noun, name = reference_noun_and_name(e)
    return VARIANT_TITLES["official"].format(noun=noun, name=name)


def _variant(spec: dict[str, Any], variant: str, rng: random.Random) -> dict[str, Any]:
    s = {k: (list(v) if isinstance(v, list) else v) for k, v in spec.items()}
    cols = s.get("colors", [])
    if variant == "misprint" and cols:
        i = rng.randrange(len(cols))
        cols[i] = rng.choice([c for c in ENTITY_COLORS if c not in cols])
    elif variant == "historic":
        if s["kind"] == "flag":
            s["layout"] = {"h3": "v3", "v3": "h3", "h2": "v2", "v2": "h2", "cross": "diag", "diag": "cross"}[s["layout"]]
        elif s["kind"] == "crest":
            s["band"] = None if s.get("band") else "horizontal"
            s["colors"] = cols[::-1]
        elif s["kind"] == "landmark":
            s["type"] = rng.choice([t for t in LANDMARK_TYPES.values() if t != s["type"]])
        else:
            s["mark"] = rng.choice([m for m in ("ring", "bars", "triangle", "diamond") if m != s.get("mark")])
    elif variant == "fanart":
        s["colors"] = list(reversed(cols)) if len(set(cols)) > 1 else cols
        for key in ("symbol", "mark"):
            if key in s:
                s[key] = rng.choice(["star", "circle", "diamond", "triangle"])
    return s


def build_reference_specs(w: WorldData, seed: int = 0, n_generic: int = 160) -> list[dict[str, Any]]:
    """Reference rows (without pixels): every entity's official picture plus three hard distractors, and generic stock images."""
    rng = random.Random(seed + 2)
    rows: list[dict[str, Any]] = []
    for e in w.entities.values():
        noun, name = reference_noun_and_name(e)
        for variant in ("official", "misprint", "historic", "fanart"):
            spec = e.emblem if variant == "official" else _variant(e.emblem, variant, rng)
            title = VARIANT_TITLES[variant].format(noun=noun, name=name)
            rows.append({"title": title, "entity": e.id, "variant": variant, "emblem": spec})
    makers = {"flag": _flag, "crest": _crest}
    for i in range(n_generic):
        kind = rng.choice(["flag", "crest", "landmark", "logo"])
        if kind in makers:
            spec = makers[kind](rng)
        elif kind == "landmark":
            spec = _landmark(rng, rng.choice(list(LANDMARK_TYPES.values())))
        else:
            spec = _logo(rng, rng.choice("ABCDEFGHKLMNPRSTVZ"))
        col = rng.choice(list(OBJECT_COLORS))
        title = rng.choice([f"Stock photo of a {col} {kind}", f"Generic {kind} clip art", f"A {kind} seen at a market",
                            f"Unknown {kind} in {col}"])
        rows.append({"title": title, "entity": None, "variant": "generic", "emblem": spec})
    for i, r in enumerate(rows):
        r["id"] = f"r{i + 1:04d}"
        r["file"] = f"refs/{r['id']}.png"
    return rows
