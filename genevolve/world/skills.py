"""The eight skill cards of the sandbox, written for the sandbox generator's literal language.

Each card is what ``query_knowledge(skill_name)`` returns. They are short on purpose: a small policy
reads them in its context window.
"""

from __future__ import annotations

SKILL_CARDS: dict[str, str] = {
    "spatial_layout": """\
The canvas is a 3x3 grid. Give every object its own cell with the exact phrase "in the <cell> of the image"; cells: top-left, top, top-right, left, center, right, bottom-left, bottom, bottom-right.
Turn relations into cells: A above B -> A in the top, B in the bottom. A below B -> A in the bottom, B in the top. A to the left of B -> A in the left, B in the right. A to the right of B -> A in the right, B in the left.
Turn loose places into cells: upper left corner -> top-left, upper right corner -> top-right, lower left corner -> bottom-left, lower right corner -> bottom-right, at the top -> top, at the bottom -> bottom, on the left -> left, on the right -> right, in the middle -> center.
Never rely on words like above, below or next to: the generator ignores them and places objects at random.""",
    "aesthetic_drawing": """\
Name the lighting with one exact phrase; the generator ignores mood words.
- sunset, dusk, warm evening light -> "golden-hour lighting"
- night, moonlight, after dark -> "moonlit night lighting"
- gloomy, cloudy, gray or rainy day -> "soft overcast lighting"
- city signs, club lights, cyberpunk glow -> "neon lighting"
Put the lighting phrase in its own sentence at the end of the prompt.""",
    "text_rendering": """\
Quote the requested text exactly, in capital letters, with the phrase: a banner at the bottom with the exact text "YOUR TEXT".
Copy every letter and digit; do not translate, shorten or add words. Text that is not quoted after "exact text" comes out garbled.""",
    "creative_drawing": """\
Translate a metaphor into one exact style phrase; the generator ignores metaphors.
- dreamy painting, daydream -> "in watercolor style"
- old arcade game, retro video game -> "in pixel art style"
- cathedral window, colored tiles -> "in stained-glass mosaic style"
- pen drawing in a notebook, hand sketch -> "in ink sketch style"
Put the style phrase in its own sentence at the end of the prompt.""",
    "anatomy_body_coherence": """\
Bodies come out with missing or extra limbs unless the count is stated.
For a person (dancer, knight, robot, astronaut, runner, gardener) add "with exactly two arms and two legs".
For an animal (horse, dog, deer, goat) add "with exactly four legs and a tail".
Keep the figure's colour word right before its noun.""",
    "attribute_binding": """\
Colours leak between objects described in the same sentence.
Describe each coloured object in its own sentence, with its colour word directly before its noun, e.g. "A red circle in the left of the image. A blue square in the right of the image."
Never list two coloured objects in one sentence.""",
    "physical_material_consistency": """\
Name materials with exact phrases; the generator ignores adjectives such as shiny, chrome, steel, oak or see-through.
- chrome, steel, metallic -> "made of polished metal"
- wooden, oak -> "made of wood"
- glass, see-through -> "made of clear glass"
Every solid object must also be "casting a soft shadow". Put both phrases in the object's own sentence.""",
    "quantity_counting": """\
Bare numbers drift: "three stars" may come out as two or four.
Write every count of two or more as "exactly <number>" in words, e.g. "exactly three gold stars".
Describe each counted group in its own sentence with its cell.""",
}
