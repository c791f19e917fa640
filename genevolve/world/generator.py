"""The sandbox generator: a seeded, reference-conditioned renderer that reads prompts literally.

It understands a small language and fails the way real generators fail when a prompt is not
explicit. Each rule below names the wording that avoids the failure (the skill cards teach it):

- **Count drift**: a bare number ("three stars") is drawn one off (90 % of the time);
  "exactly three" is drawn exactly. A plural with no number gets 2-5 copies.
- **Attribute leakage**: when one sentence describes two or more coloured objects, every one of
  them takes the first colour (90 %). One sentence per object keeps colours bound.
- **Placement**: objects are placed only by "in the <cell> of the image" (cells: top-left, top,
  top-right, left, center, right, bottom-left, bottom, bottom-right); otherwise they land in random
  free cells. Relations such as "above" are not understood. A lone object goes to the center.
- **Text**: only ``the exact text "..."`` is spelled right; other quoted text is garbled (half the
  letters); unquoted text on a banner comes out as random letters.
- **Anatomy**: people get a wrong number of arms or legs, animals a wrong number of legs (90 %),
  unless the prompt says "with exactly two arms and two legs" / "with exactly four legs".
- **Lighting, style, material**: only "<golden-hour | moonlit night | soft overcast | neon> lighting",
  "in <watercolor | pixel art | stained-glass mosaic | ink sketch> style", "made of polished metal |
  made of wood | made of clear glass" and "casting a soft shadow" are obeyed; other words are ignored.
- **Entities**: a flag, crest, landmark or logo bound to a reference ("from the first reference
  image") is copied from that reference. Without one it is drawn generic, in the colours the prompt
  names (grey when it names none): the generator cannot know a fictional entity.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any, Sequence

import numpy as np

from .scene import Obj, Scene, reference_to_emblem, render
from .vocab import (
    ANIMAL_NOUNS,
    CELLS,
    ENTITY_COLORS,
    GENERATOR_MATERIAL_PHRASES,
    LIGHTINGS,
    NUMBER_WORDS,
    PERSON_NOUNS,
    SHADOW_PHRASE,
    SHAPE_SYNONYMS,
    SHAPES,
    STYLES,
    generator_lighting_phrase,
    generator_style_phrase,
)

FAIL_P = 0.9
GARBLE_P = 0.5
ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, **{v: k for k, v in NUMBER_WORDS.items() if k > 1}}
_SHAPE_NOUNS = sorted(list(SHAPES) + list(SHAPE_SYNONYMS), key=len, reverse=True)
_FIG_NOUNS = list(PERSON_NOUNS) + list(ANIMAL_NOUNS) + ["person", "figure", "animal", "creature"]
_ENTITY_NOUNS = {"flag": "flag", "crest": "crest", "shield": "crest", "logo": "logo", "landmark": "landmark",
                 "building": "landmark", "tower": "landmark", "spire": "landmark", "dome": "landmark", "arch": "landmark",
                 "monument": "landmark", "emblem": "flag"}
_NOUN_RE = re.compile(
    r"\b(?:(?P<exact>exactly)\s+)?(?:(?P<count>" + "|".join(list(_COUNT_WORDS) + [str(i) for i in range(1, 10)])
    + r")\s+)?(?P<adj>(?:(?!(?:exactly|a|an|one|single|two|three|four|five|six|\d)\b)[a-z-]+\s+){0,3}?)(?P<noun>" + "|".join(_SHAPE_NOUNS + _FIG_NOUNS + list(_ENTITY_NOUNS))
    + r")(?P<plural>e?s)?\b",
    re.I,
)
_CELL_RE = re.compile(r"\bin the (" + "|".join(sorted(CELLS, key=len, reverse=True)) + r") of the (?:image|canvas)\b", re.I)
_REF_RE = re.compile(r"\b(first|second|1st|2nd) reference image\b", re.I)
_COLOR_RE = re.compile(r"\b(" + "|".join(ENTITY_COLORS) + r")\b", re.I)
EXACT_TEXT_RE = re.compile(r'\bexact text\s*"([^"]*)"', re.I)
_QUOTED_RE = re.compile(r'"([^"]{1,40})"')
_BANNER_RE = re.compile(r"\b(banner|sign|text|words|lettering|caption)\b", re.I)


def _stable_seed(*parts: Any) -> int:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little")


def sentences(prompt: str) -> list[str]:
    # Quoted text never holds sentence punctuation in the sandbox alphabet, so a plain split is safe.
    return [s for s in re.split(r"(?<=[.;!?])\s+|\n+", prompt) if s.strip()]


class SandboxGenerator:
    """Renders a prompt-reference program. ``generate`` returns a PIL image; ``interpret`` the scene it drew."""

    name = "sandbox"

    def interpret(self, prompt: str, references: Sequence[Any] = (), seed: int = 0) -> Scene:
        ref_arrays = [np.asarray(r.convert("RGB") if hasattr(r, "convert") else r) for r in references]
        rng = random.Random(_stable_seed(prompt, seed, *[hashlib.sha1(a.tobytes()).hexdigest() for a in ref_arrays]))
        scene = Scene()
        low = prompt.lower()
        for light in LIGHTINGS:
            if generator_lighting_phrase(light) in low:
                scene.lighting = light
        for style in STYLES:
            if generator_style_phrase(style) in low:
                scene.style = style
        scene.text = self._text(prompt, rng)

        objects: list[Obj] = []
        for sentence in sentences(prompt):
            found = [m for m in _NOUN_RE.finditer(sentence)]
            sent_objs = []
            for i, m in enumerate(found):
                scope = sentence[m.start() : found[i + 1].start() if i + 1 < len(found) else len(sentence)]
                head = sentence[found[i - 1].end() if i else 0 : m.start()]
                obj = self._object(m, scope, head, ref_arrays, rng)
                if obj is not None:
                    sent_objs.append(obj)
            colored = [o for o in sent_objs if o.kind in ("shape", "figure") and o.color]
            if len(colored) >= 2 and rng.random() < FAIL_P:
                for o in colored[1:]:
                    o.color = colored[0].color
            objects.extend(sent_objs)
        objects = objects[:6]
        # Objects without an explicit cell land in random free cells; a lone one goes to the center.
        used = {o.cell for o in objects if o.cell}
        for o in objects:
            if o.cell is None:
                if len(objects) == 1:
                    o.cell = "center"
                else:
                    free = [c for c in CELLS if c not in used] or list(CELLS)
                    o.cell = rng.choice(free)
                used.add(o.cell)
        scene.objects = objects
        return scene

    def generate(self, prompt: str, references: Sequence[Any] = (), seed: int = 0):
        from PIL import Image

        return Image.fromarray(render(self.interpret(prompt, references, seed)))

    # -- pieces -------------------------------------------------------------

    @staticmethod
    def _text(prompt: str, rng: random.Random) -> str | None:
        m = EXACT_TEXT_RE.search(prompt)
        if m:
            return re.sub(r"[^A-Z0-9 ]", "", m.group(1).upper())[:18] or None
        q = _QUOTED_RE.search(prompt)
        if q:
            t = re.sub(r"[^A-Z0-9 ]", "", q.group(1).upper())[:18]
            return "".join(rng.choice(ALPHA) if ch != " " and rng.random() < GARBLE_P else ch for ch in t) or None
        if _BANNER_RE.search(prompt):
            return "".join(rng.choice(ALPHA) for _ in range(rng.randint(5, 10)))
        return None

    def _object(self, m: re.Match, scope: str, head: str, refs: list[np.ndarray], rng: random.Random) -> Obj | None:
        noun = m["noun"].lower()
        adj = (m["adj"] or "").lower()
        scope_low = scope.lower()
        cell_m = _CELL_RE.search(scope)
        cell = cell_m.group(1).lower() if cell_m else None
        colors = _COLOR_RE.findall(adj)
        color = colors[0].lower() if colors else None

        if noun in _ENTITY_NOUNS:
            kind = _ENTITY_NOUNS[noun]
            ref_m = _REF_RE.search(scope) or _REF_RE.search(head)
            if ref_m:
                idx = 0 if ref_m.group(1).lower() in ("first", "1st") else 1
                if idx < len(refs):
                    return Obj("entity", cell=cell, noun=noun, pixels=reference_to_emblem(refs[idx]))
            cols = [c.lower() for c in _COLOR_RE.findall(scope)][:3] or ["white", "black", "white"]
            if kind == "flag":
                layout = ("v" if "vertical" in scope_low else "h") + ("3" if len(cols) >= 3 else "2")
                spec = {"kind": "flag", "layout": layout, "colors": (cols * 2)[: int(layout[1])]}
            elif kind == "crest":
                spec = {"kind": "crest", "field": "white", "colors": (cols * 2)[:2]}
            elif kind == "landmark":
                spec = {"kind": "landmark", "type": "tower", "colors": (cols * 2)[:2], "sky": "white", "tiers": 1}
            else:
                spec = {"kind": "logo", "colors": (cols * 2)[:2], "mark": "circle"}
            return Obj("entity", cell=cell, noun=noun, emblem=spec)

        if noun in _FIG_NOUNS:
            person = noun not in ANIMAL_NOUNS and noun not in ("animal", "creature")
            exact = ("exactly two arms and two legs" in scope_low) if person else ("exactly four legs" in scope_low)
            arms, legs = (2, 2) if person else (0, 4)
            if not exact and rng.random() < FAIL_P:
                if person:
                    if rng.random() < 0.5:
                        arms = rng.choice([1, 3])
                    else:
                        legs = rng.choice([1, 3])
                else:
                    legs = rng.choice([3, 5])
            return Obj("figure", cell=cell, noun=noun, color=color or "black", figure="person" if person else "animal",
                       arms=arms, legs=legs)

        shape = SHAPE_SYNONYMS.get(noun, noun)
        count_word = (m["count"] or "").lower()
        if count_word:
            count = int(count_word) if count_word.isdigit() else _COUNT_WORDS[count_word]
            if count >= 2 and not m["exact"] and rng.random() < FAIL_P:
                count += rng.choice([-1, 1])
        elif m["plural"]:
            count = rng.randint(2, 5)
        else:
            count = 1
        material = next((mat for mat, phrase in GENERATOR_MATERIAL_PHRASES.items() if phrase in scope_low), None)
        return Obj("shape", cell=cell, noun=noun, shape=shape, color=color or "black", count=max(1, min(count, 6)),
                   material=material, shadow=SHADOW_PHRASE in scope_low)
