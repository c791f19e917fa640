"""The sandbox's closed vocabulary: colours, cells, phrases a request uses and phrases the generator reads.

Two phrase tables matter. *Request phrases* are how people ask ("at dusk", "like an old arcade
game", "above"); *generator phrases* are the only wording the sandbox generator obeys
("golden-hour lighting", "in pixel art style", "in the top of the image"). Translating one into the
other is exactly what the skill cards teach.
"""

from __future__ import annotations

# Saturated object colours (what shapes and figures may be) and the extra ones entities use.
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 80, 225),
    "green": (30, 165, 60),
    "gold": (240, 185, 20),
    "purple": (140, 55, 205),
    "orange": (250, 120, 20),
    "teal": (15, 165, 165),
    "pink": (240, 90, 175),
}
ENTITY_COLORS: dict[str, tuple[int, int, int]] = {
    **OBJECT_COLORS,
    "white": (250, 250, 250),
    "black": (25, 25, 25),
    "crimson": (160, 15, 45),
    "navy": (20, 30, 110),
}
COLOR_NAMES = tuple(ENTITY_COLORS)

CELLS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
CELL_RC = {name: (i // 3, i % 3) for i, name in enumerate(CELLS)}

# How requests name places; the generator does not understand these.
REQUEST_CELL_PHRASES = {
    "top-left": "in the upper left corner",
    "top": "at the top",
    "top-right": "in the upper right corner",
    "left": "on the left",
    "center": "in the middle",
    "right": "on the right",
    "bottom-left": "in the lower left corner",
    "bottom": "at the bottom",
    "bottom-right": "in the lower right corner",
}
# Relations between two objects and the absolute cells they resolve to (A, B).
RELATIONS = {
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
    "to the left of": ("left", "right"),
    "to the right of": ("right", "left"),
}


def generator_cell_phrase(cell: str) -> str:
    """The only positional wording the generator obeys."""
    return f"in the {cell} of the image"


SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SHAPE_SYNONYMS = {"sphere": "circle", "ball": "circle", "cube": "square", "box": "square", "block": "square"}
PERSON_NOUNS = ("dancer", "knight", "robot", "astronaut", "runner", "gardener")
ANIMAL_NOUNS = ("horse", "dog", "deer", "goat")

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
WORD_NUMBERS = {v: k for k, v in NUMBER_WORDS.items()}
WORD_NUMBERS.update({"a": 1, "an": 1, "single": 1, "pair of": 2})

LIGHTINGS = ("golden-hour", "moonlit night", "soft overcast", "neon")
REQUEST_LIGHTING_PHRASES = {
    "golden-hour": ("at sunset", "in warm evening light", "at dusk"),
    "moonlit night": ("on a moonlit night", "after dark under the moon", "late at night"),
    "soft overcast": ("on a gloomy cloudy day", "under a gray sky", "on a dull rainy afternoon"),
    "neon": ("lit by glowing city signs", "in a cyberpunk street glow", "under club lights"),
}


def generator_lighting_phrase(lighting: str) -> str:
    return f"{lighting} lighting"


STYLES = ("watercolor", "pixel art", "stained-glass mosaic", "ink sketch")
REQUEST_STYLE_PHRASES = {
    "watercolor": ("as a dreamy painting", "like a soft daydream"),
    "pixel art": ("like an old arcade game", "in a retro video game look"),
    "stained-glass mosaic": ("like a cathedral window", "as if made of colored tiles"),
    "ink sketch": ("like a quick pen drawing in a notebook", "as an architect's hand sketch"),
}


def generator_style_phrase(style: str) -> str:
    return f"in {style} style"


MATERIALS = ("metal", "wood", "glass")
REQUEST_MATERIAL_WORDS = {"metal": ("shiny chrome", "polished steel"), "wood": ("wooden", "oak"), "glass": ("glass", "see-through")}
GENERATOR_MATERIAL_PHRASES = {"metal": "made of polished metal", "wood": "made of wood", "glass": "made of clear glass"}
SHADOW_PHRASE = "casting a soft shadow"

TEXT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "


def exact_text_phrase(text: str) -> str:
    return f'a banner at the bottom with the exact text "{text}"'


def limb_phrase(figure: str) -> str:
    return "with exactly two arms and two legs" if figure == "person" else "with exactly four legs and a tail"
