"""Situations: what a request needs, in action-space words with no entity names (the retrieval key's language).

An experience carries the paper's retrieval key: a ``trigger`` (the situation in which its lesson applies)
and a ``source_prompt_summary`` (its source request with every name, year and quoted text taken out).
Retrieval embeds a *new* request's situation the same way and compares it with the triggers, so that
requests with the same needs meet, whatever entities they name.

- :func:`situation_text` writes a set of needs as one canonical line; the sandbox summariser writes
  triggers with it (from what the pair's better attempt actually did) and :class:`CueDescriber` writes a
  request's situation with it.
- :class:`CueDescriber` reads a request's *text* only, through general-English cues that follow the
  official skill cards' "trigger when" conditions (quotation marks and "a sign saying" for text; number
  words for counts; above / below / corners for layout; people and animals for anatomy; lighting, style
  and material words; a capitalised name for an entity; a year or "winner of" for a fact to look up). It
  never sees a request's category, skills, scene or ground truth, and it makes the mistakes a reader of
  the text alone would make.
- :class:`LLMDescriber` asks a chat model with a versioned prompt for the same line, for requests outside
  the sandbox (pair it with the LLM summariser, whose triggers it must match).
"""

from __future__ import annotations

import re
from typing import Protocol

# The needs, in the order a situation line lists them; the last eight are the skill cards'.
NEEDS: dict[str, str] = {
    "lookup": "an entity named only through another fact: search that fact first",
    "entity": "a named entity the generator cannot know: find its official reference image",
    "spatial_layout": "several objects, each at its own place",
    "quantity_counting": "a group of objects with an exact count",
    "attribute_binding": "objects with different colours",
    "anatomy_body_coherence": "a person or an animal",
    "physical_material_consistency": "an object of a named material",
    "aesthetic_drawing": "a lighting mood",
    "creative_drawing": "a stylistic metaphor",
    "text_rendering": "text to render on the image",
}
PLAIN = "a single plain object with nothing to look up"


def situation_text(needs) -> str:
    """A set of needs as one line, in the canonical order (the same needs always give the same words)."""
    unknown = sorted(set(needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"unknown needs {unknown}; needs are {', '.join(NEEDS)}")
    parts = [NEEDS[n] for n in NEEDS if n in needs]
    return ("Situation: " + "; ".join(parts) + ".") if parts else f"Situation: {PLAIN}."


def clauses(text: str) -> list[str]:
    """A situation line's needs: the text after "Situation:", cut at semicolons and line breaks."""
    body = re.sub(r"^\s*situation\s*:\s*", "", text.strip(), flags=re.I)
    parts = [" ".join(p.strip(" .,").split()) for p in re.split(r"[;\n]", body)]
    return [p for p in parts if p] or [PLAIN]


def situation_vector(text: str, encode) -> "np.ndarray":
    """A situation as one unit vector: the mean of its clauses' embeddings (``encode``: one clause text to its unit
    vector). One embedding of the whole line would let a long shared clause drown the rest (two situations that
    differ in one need of four come out at cosine 0.98 with MiniLM); as a set of clauses each need counts alike."""
    import numpy as np

    v = np.sum([encode(c) for c in dict.fromkeys(clauses(text))], axis=0)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


class Describer(Protocol):
    name: str

    def describe(self, text: str) -> str: ...


# General-English cue lists (not the sandbox's vocabulary tables): the official skill cards' trigger words
# and their everyday neighbours.
_NUMBER = r"(?:two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|a pair of|a dozen|[2-9]|[1-9][0-9])"
_COLOURS = ("red", "blue", "green", "yellow", "gold", "golden", "purple", "violet", "orange", "teal", "pink", "black",
            "white", "brown", "gray", "grey", "silver", "crimson", "navy", "cyan", "magenta", "turquoise", "beige")
_PEOPLE = ("person", "people", "man", "woman", "men", "women", "child", "children", "kid", "boy", "girl", "baby", "dancer",
           "knight", "robot", "astronaut", "runner", "gardener", "player", "chef", "doctor", "farmer", "soldier",
           "king", "queen", "wizard", "pirate", "worker", "athlete", "musician", "figure", "student", "teacher")
_ANIMALS = ("animal", "dog", "cat", "horse", "deer", "goat", "cow", "sheep", "pig", "lion", "tiger", "bear", "wolf",
            "fox", "rabbit", "bird", "eagle", "owl", "elephant", "giraffe", "zebra", "monkey", "mouse", "duck", "camel")
_MATERIALS = ("metal", "metallic", "steel", "chrome", "iron", "copper", "bronze", "brass", "wood", "wooden", "oak",
              "pine", "glass", "see-through", "transparent", "marble", "stone", "ceramic", "porcelain", "plastic",
              "leather", "velvet", "silk", "rubber", "clay")
_LIGHTING = (r"sun(?:set|rise|light|lit)?", "dusk", "dawn", "twilight", "evening", "morning light", r"night(?:time)?",
             r"moon(?:lit|light)?", "after dark", "dark", "gloomy", "cloudy", "overcast", r"gr[ae]y sky", "rainy", "foggy",
             "misty", "stormy", "neon", r"glow(?:ing)?", "club lights", "city signs", "candle ?light", r"light(?:s|ing)?",
             r"\blit\b", "cyberpunk", "cinematic", "golden hour", "backlit")
_STYLE = (r"\blike an? (?!.*\b(?:exactly)\b)", r"\bas if\b", r"\bas an? .*\b(?:painting|sketch|drawing|mosaic|cartoon)\b",
          "painting", "painted", "sketch", "drawing", "mosaic", "watercolou?r", "pixel", "retro", "video game", "arcade",
          "cartoon", "anime", "comic", "oil paint", "cathedral window", "tiles", "daydream", "dreamy", "in the style of")
_RELATIONS = ("above", "below", "beneath", "on top of", "next to", "beside", "behind", "in front of",
              "to the left of", "to the right of", "on the left", "on the right", "at the top", "at the bottom",
              "corner", "in the middle", "in the center", "in the centre", "foreground", "background", "between")
_INDIRECT = (r"\b(?:1[89]|2[01])\d\d\b", r"\bwinners?\b", r"\bchampions?\b", r"\bwon\b", r"\bwhere\b.*\bstands?\b",
             r"\bhome (?:nation|country|town|city)\b", r"\bcapital of\b", r"\bbirthplace\b")
_TEXT = (r'"[^"]+"', r"“[^”]+”", r"\bsays?\b", r"\bsaying\b", r"\bthe words?\b", r"\bwritten\b", r"\blettering\b",
         r"\bbanner\b", r"\bsign\b", r"\blabel(?:led)?\b", r"\btitle\b", r"\bslogan\b", r"\bcaption\b")


_CAPS = r"\b(?:[A-Z0-9]*[A-Z]{3,}[A-Z0-9]*(?: [A-Z0-9]{2,})*|[A-Z]{2,}(?: [A-Z0-9]{2,})+)\b"  # a banner's words, not "FC"


def _any(patterns, text: str) -> bool:
    return any(re.search(p if p.startswith((r"\b", "(", '"', "“")) else rf"\b{p}\b", text) for p in patterns)


def _words(words) -> str:
    return r"\b(?:" + "|".join(words) + r")s?\b"


def _names(text: str) -> list[str]:
    """Capitalised words that are not a sentence's first word nor all capitals (a banner's text): names."""
    out = []
    for m in re.finditer(r"\b[A-Z][a-z][A-Za-z'-]*\b", text):
        before = text[: m.start()].rstrip()
        if before and before[-1] not in '.!?:"“' and not _inside_quotes(text, m.start()):
            out.append(m.group(0))
    return out


def _inside_quotes(text: str, pos: int) -> bool:
    return text[:pos].count('"') % 2 == 1


def request_needs(text: str) -> set[str]:
    """What a request's words ask for (see :class:`CueDescriber`)."""
    text = " ".join(text.split())
    needs = set()
    if _any(_TEXT, text.lower()) or re.search(_CAPS, text):
        needs.add("text_rendering")
    # What is to be written is not part of the scene, and names are not words of the scene's vocabulary
    # (the "Iron" of a name is no material): the cues below read what is left.
    scene = re.sub(_CAPS, " ", re.sub(r'"[^"]*"|“[^”]*”', " ", text))
    names = _names(scene)
    if names:
        needs.add("entity")
        if _any(_INDIRECT, scene.lower()):
            needs.add("lookup")
    unquoted = re.sub(r"\b[A-Z][a-z][A-Za-z'-]*\b", lambda m: m.group(0) if m.start() == 0 else "NAME", scene)
    unquoted = unquoted.lower()
    if re.search(rf"\b{_NUMBER} (?:\w+ ){{0,3}}\w+s\b", unquoted) or "exactly" in unquoted:
        needs.add("quantity_counting")
    backdrop = r" (?:\w+ )?(?:sky|skies|light|lights|glow|day|background|hour|evening)\b"  # a colour of the backdrop
    colours = re.findall(_words(_COLOURS) + rf"(?!{backdrop})", unquoted)
    if len({c.rstrip("s") for c in colours}) >= 2:
        needs.add("attribute_binding")
    if re.search(_words(_PEOPLE), unquoted) or re.search(_words(_ANIMALS), unquoted):
        needs.add("anatomy_body_coherence")
    if re.search(_words(_MATERIALS), unquoted):
        needs.add("physical_material_consistency")
    if _any(_LIGHTING, unquoted):
        needs.add("aesthetic_drawing")
    if _any(_STYLE, unquoted):
        needs.add("creative_drawing")
    objects = len(re.findall(r"\b(?:a|an|one|the)\b|" + _NUMBER, re.sub(r"\bthe (?:flag|crest|logo) of the\b", "the", unquoted)))
    if _any(_RELATIONS, unquoted) or (objects >= 2 and " and " in unquoted):
        needs.add("spatial_layout")
    return needs


class CueDescriber:
    """A request's situation from its text alone (the offline default)."""

    name = "cues-v1"

    def describe(self, text: str) -> str:
        return situation_text(request_needs(text))


class LLMDescriber:
    """A request's situation written by any chat policy, with a versioned prompt (for real requests)."""

    VERSION = "llm-situation-v1"
    PROMPT = ("Describe what this image request needs, as the situation an image-generation agent is in. Use "
              "action-space words only (what must be looked up, which references are needed, counts, layout, colours, "
              "bodies, materials, lighting, style, text to render), one short clause per need, separated by semicolons. "
              "Never name people, places, teams, products, years or any other specific entity; never copy the request. "
              "Answer with one line that starts with 'Situation:'.\n\nRequest: {request}")

    def __init__(self, policy, max_new_tokens: int = 120):
        from ..policies.base import SamplingParams

        self.policy = policy
        self.params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
        self.name = f"{self.VERSION}:{policy.name}"

    def describe(self, text: str) -> str:
        out = self.policy.generate([[{"role": "user", "content": self.PROMPT.format(request=text)}]], self.params)[0]
        if out.finish_reason == "error":
            raise RuntimeError(f"situation describer call failed: {out.error}")
        line = next((x.strip() for x in out.text.splitlines() if x.strip()), "")
        return line if line.lower().startswith("situation:") else "Situation: " + line


def summarise_request(text: str) -> str:
    """The request with its names, years and quoted text taken out: an entity-free ``source_prompt_summary``."""
    out = re.sub(r'"[^"]*"', "<text>", text)
    out = re.sub(r"\b(?:1[89]|2[01])\d\d\b", "<year>", out)
    out = re.sub(r"\b[A-Z]{2,}(?: [A-Z0-9]{2,})*\b", "<text>", out)
    for name in sorted(set(_names(out)), key=len, reverse=True):
        out = re.sub(rf"\b{re.escape(name)}\b", "<name>", out)
    out = re.sub(r"<name>(?: <name>)+", "<name>", out)
    return " ".join(out.split())


def entity_names(text: str) -> set[str]:
    """The names a request uses (capitalised words past a sentence's start): what a key must never contain."""
    return {n.lower() for n in _names(text)}
