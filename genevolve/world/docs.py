"""The world's rules, written into ``assets/world/README.md`` by ``genevolve world build``."""

WORLD_README = """\
# The GenEvolve sandbox world

A small, fully synthetic world in which every lever of GenEvolve matters and can be measured from
pixels in milliseconds. Everything here is rebuilt from a seed by `genevolve world build`.

## Knowledge (only the tools reveal it)
- Entities of four kinds: nations (flags), clubs (crests; based in a nation), landmarks (buildings;
  stand in a nation), products (logos; made by a club). Some nations have look-alike twins
  (Veloria / Velorria) whose flags differ in one colour.
- Events: every year 2026-2035, six cups are won by nations and five shields by clubs
  ("The 2031 Aurora Cup was won by Veloria"). Requests may name an entity directly or through one
  or two hops: the champion of a cup, the nation where a landmark stands, the home nation of a
  shield winner.
- `search` reads `corpus.jsonl`: profiles with visual descriptions, event reports, and distractors
  (previews that name the runner-up, fan redesign proposals, neighbouring years).
- `image_search` reads `refs.jsonl`: each entity's official picture ("Official flag of X") plus
  three hard distractors (colour misprint, historic design, fan-made redesign) and generic stock
  images. Only the official picture matches the ground truth.

## The generator (genevolve/world/generator.py)
Reads prompts literally and fails like real generators unless the prompt is explicit:
bare numbers drift by one; colours leak between objects in one sentence; objects without
"in the <cell> of the image" land in random cells; only `the exact text "..."` is spelled right;
figures get wrong limb counts unless "with exactly two arms and two legs" / "with exactly four
legs"; lighting, style and material are obeyed only in their exact phrases; an entity is drawn
from a reference bound by "the first/second reference image", and is generic otherwise.

## The skill cards (skills/*.md)
Each card teaches the exact wording that avoids one failure. A request needs a skill when its scene
has what the skill is about (two objects: spatial_layout; a counted group: quantity_counting; two
colours: attribute_binding; a figure: anatomy_body_coherence; a material: physical_material_consistency;
a mood: aesthetic_drawing; a metaphor: creative_drawing; text: text_rendering).

## The judge (genevolve/world/judge.py)
Reads pixels against the ground-truth image: F (requested objects present), V (mean over the
request's groups: knowledge plus each needed visual skill), T (OCR of the banner vs the requested
text), A (block-level closeness). KScore = 0.1F + 0.4V + 0.4T + 0.1A; with no text requested T is
left out and the weights renormalised. R_text scores the program's explicitness in five levels;
the reward is (1 - a) KScore + a R_text with a = 0.5.

## Requests (requests.jsonl)
Two tracks: Knowledge-Anchored (categories flag, crest, landmark, logo: at least one entity) and
Quality-Anchored (one category per skill). Splits: sft, evolve, bench. Each request stores its
ground-truth scene, its ground-truth image hash, the skills it needs and a difficulty (1-3: one
more for a second skill, one more for a hop). Every request reads back to its scene
(genevolve/world/requests.py: parse_request), so free-text requests in the same language work too.
"""
