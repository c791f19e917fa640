"""The sandbox judge against hand-worked cases and a second, loop-by-loop reading of the pixels.

Scenes are drawn with :func:`render`; the "generated" image is the same scene with exactly one thing
changed, so each skill group's check can be seen to fail alone. Pixel quantities (background rows,
block means, cell differences) are recomputed here with plain loops from the module docstring's rules.
"""

from __future__ import annotations

import copy
import functools
import random

import numpy as np
import pytest

from genevolve.world.judge import SandboxJudge, kscore, text_accuracy
from genevolve.world.scene import Obj, Scene, render

JUDGE = SandboxJudge()
BORDER = [c * 40 + k for c in range(3) for k in (0, 1, 2, 37, 38, 39)]
ORIGIN = {"top-left": (0, 0), "top": (0, 40), "top-right": (0, 80), "left": (40, 0), "center": (40, 40),
          "right": (40, 80), "bottom-left": (80, 0), "bottom": (80, 40), "bottom-right": (80, 80)}


def _lev(a: str, b: str) -> int:
    @functools.lru_cache(maxsize=None)
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def _bg_rows(img: np.ndarray) -> list[list[float]]:
    return [[float(np.median([float(img[y, x, ch]) for x in BORDER])) for ch in range(3)] for y in range(120)]


def _aesthetics(gen: np.ndarray, gt: np.ndarray) -> float:
    total = 0.0
    for by in range(14):
        for bx in range(12):
            for ch in range(3):
                a = gen[by * 10:(by + 1) * 10, bx * 10:(bx + 1) * 10, ch].astype(float).mean()
                b = gt[by * 10:(by + 1) * 10, bx * 10:(bx + 1) * 10, ch].astype(float).mean()
                total += abs(a - b)
    return min(1.0, max(0.0, 1 - total / (14 * 12 * 3) / 25))


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def _shape(cell, shape, color, count=1, material=None, noun=None):
    return Obj(kind="shape", cell=cell, shape=shape, color=color, count=count, noun=noun or shape, material=material,
               shadow=material is not None)


def _figure(cell, color, figure="person", noun="dancer"):
    return Obj(kind="figure", cell=cell, color=color, figure=figure, noun=noun, arms=2 if figure == "person" else 0,
               legs=2 if figure == "person" else 4)


def _judge(gen_scene: Scene, scene: Scene):
    gen, gt = render(gen_scene), render(scene)
    return JUDGE.judge(gen, scene, gt), gen, gt


def _v_from_checks(checks: dict[str, list[float]]) -> float:
    groups = [sum(v) / len(v) for v in checks.values() if v]
    return sum(groups) / len(groups)


def test_text_accuracy_matches_a_recursive_edit_distance():
    rng = random.Random(3)
    for _ in range(200):
        a = "".join(rng.choice("AB C") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("AB C") for _ in range(rng.randint(1, 7)))
        assert text_accuracy(a, b) == pytest.approx(max(0.0, 1 - _lev(a, b) / max(len(a), len(b))))
    assert text_accuracy("GO TEEM", "GO TEAM") == pytest.approx(6 / 7)
    assert text_accuracy("SALE", "SALE 50") == pytest.approx(4 / 7)
    assert text_accuracy("", "") == 1.0 and text_accuracy("A", "") == 0.0


@pytest.mark.parametrize("F,V,T,A", [(0.3, 0.6, 0.9, 0.2), (1.0, 0.0, 0.5, 0.25), (0.7, 0.8, None, 0.4)])
def test_kscore_weights(F, V, T, A):
    want = 0.1 * F + 0.4 * V + 0.4 * T + 0.1 * A if T is not None else (0.1 * F + 0.4 * V + 0.1 * A) / 0.6
    assert kscore(F, V, T, A) == pytest.approx(want)


def test_ground_truth_scores_one_on_every_dimension_and_check():
    scene = Scene([_shape("top-left", "star", "gold", count=3), _shape("bottom", "square", "red", material="wood"),
                   _figure("right", "blue")], text="GO TEAM", lighting="neon", style="watercolor")
    j, _, _ = _judge(scene, scene)
    assert (j.F, j.V, j.T, j.A, j.kscore) == (1.0, 1.0, 1.0, 1.0, pytest.approx(1.0))
    assert set(j.checks) == {"spatial_layout", "quantity_counting", "attribute_binding", "anatomy_body_coherence",
                             "physical_material_consistency", "aesthetic_drawing", "creative_drawing"}
    assert all(v and all(x == 1.0 for x in v) for v in j.checks.values()), j.checks
    assert j.rationale == "Everything requested is present and correct."


def test_aesthetics_is_the_block_mean_difference_and_text_the_edit_distance():
    scene = Scene([_shape("left", "circle", "red"), _shape("right", "star", "blue")], text="GO TEAM", lighting="neon")
    gen_scene = copy.deepcopy(scene)
    gen_scene.lighting, gen_scene.text = "moonlit night", "GO TEEM"  # a close lighting: a partial score
    j, gen, gt = _judge(gen_scene, scene)
    assert j.A == pytest.approx(_aesthetics(gen, gt), abs=1e-6) and j.A < 0.99
    assert j.T == pytest.approx(6 / 7)  # one substitution in seven characters
    d = float(np.mean(np.abs(np.array(_bg_rows(gen)) - np.array(_bg_rows(gt)))))
    assert j.checks["aesthetic_drawing"] == [pytest.approx(_clip01(1 - (d - 5) / 35))] and 0 < j.checks["aesthetic_drawing"][0] < 1
    assert j.V == pytest.approx(_v_from_checks(j.checks))
    assert j.kscore == pytest.approx(0.1 * j.F + 0.4 * j.V + 0.4 * j.T + 0.1 * j.A)
    assert j.rationale == 'The text reads "GO TEEM" instead of "GO TEAM".'  # a lighting within 20 is not named


def test_each_skill_group_fails_alone_when_its_aspect_is_wrong():
    base = Scene([_shape("top-left", "star", "gold", count=3), _shape("bottom", "square", "red", material="wood"),
                  _figure("right", "blue")])
    cases = {
        "spatial_layout": lambda s: setattr(s.objects[2], "cell", "left"),
        "quantity_counting": lambda s: setattr(s.objects[0], "count", 4),
        "attribute_binding": lambda s: setattr(s.objects[0], "color", "purple"),
        "anatomy_body_coherence": lambda s: setattr(s.objects[2], "arms", 3),
        "physical_material_consistency": lambda s: setattr(s.objects[1], "material", "metal"),
    }
    for group, change in cases.items():
        gen_scene = copy.deepcopy(base)
        change(gen_scene)
        j, gen, gt = _judge(gen_scene, base)
        failed = {g for g, v in j.checks.items() if min(v) < 1.0}
        assert failed == {group}, (group, j.checks)
        assert j.V == pytest.approx(_v_from_checks(j.checks)) and j.V < 1.0
        assert j.A == pytest.approx(_aesthetics(gen, gt), abs=1e-6)
    gen_scene = copy.deepcopy(base)
    gen_scene.objects[2].cell = "left"
    j, _, _ = _judge(gen_scene, base)
    assert j.checks["spatial_layout"] == [1.0, 1.0, 0.0]


def test_material_score_is_the_cell_difference_mapped_from_2_to_16():
    scene = Scene([_shape("center", "square", "red", material="wood")])
    gen_scene = copy.deepcopy(scene)
    gen_scene.objects[0].material = "glass"
    j, gen, gt = _judge(gen_scene, scene)
    mad = float(np.abs(gen[40:80, 40:80].astype(float) - gt[40:80, 40:80].astype(float)).mean())
    assert j.checks["physical_material_consistency"] == [pytest.approx(_clip01(1 - (mad - 2) / 14))]
    assert j.F == 1.0 and j.T is None
    assert j.kscore == pytest.approx((0.1 * j.F + 0.4 * j.V + 0.1 * j.A) / 0.6)


def test_style_score_is_the_background_residual_correlation():
    scene = Scene([_shape("center", "circle", "teal")], style="watercolor")
    for other, lo, hi in (("pixel art", 0.0, 0.99), ("watercolor", 1.0, 1.0)):
        gen_scene = copy.deepcopy(scene)
        gen_scene.style = other
        j, gen, gt = _judge(gen_scene, scene)
        res = []
        for img in (gen, gt):
            g = img[:120].astype(np.float64).mean(axis=2)
            res.append(g - np.array([np.median(g[y, BORDER]) for y in range(120)])[:, None])
        fg = [np.abs(img[:120].astype(np.float64) - np.array(_bg_rows(img))[:, None, :]).sum(axis=2) > 60 for img in (gen, gt)]
        bg = ~fg[0] & ~fg[1]
        corr = float(np.corrcoef(res[0][bg], res[1][bg])[0, 1])
        (s,) = j.checks["creative_drawing"]
        assert s == pytest.approx(_clip01((corr - 0.2) / 0.6), abs=1e-6) and lo <= s <= hi


def test_found_share_counts_missing_objects_and_the_banner():
    scene = Scene([_shape("left", "circle", "red"), _shape("right", "star", "blue"), _shape("top", "square", "gold")],
                  text="HI")
    gen_scene = copy.deepcopy(scene)
    del gen_scene.objects[1]
    gen_scene.text = None
    j, _, _ = _judge(gen_scene, scene)
    assert j.F == pytest.approx(2 / 4)  # two of three objects, no banner
    assert j.T == 0.0 and j.checks["spatial_layout"] == [1.0, 0.0, 1.0]
    assert j.checks["attribute_binding"] == [0.0]
    assert j.rationale == ('The star is missing; the text reads "" instead of "HI".')


def test_without_skill_groups_v_is_the_objects_in_their_colour():
    scene = Scene([_shape("center", "circle", "red")])
    j, _, _ = _judge(scene, scene)
    assert j.checks == {} and j.V == 1.0
    gen_scene = copy.deepcopy(scene)
    gen_scene.objects[0].color = "blue"
    j, _, _ = _judge(gen_scene, scene)
    assert j.V == 0.0 and j.F == 1.0
    j, _, _ = _judge(Scene(), scene)
    assert (j.F, j.V) == (0.0, 0.0) and j.rationale == "The circle is missing."
    j, _, _ = _judge(Scene(), Scene())
    assert (j.F, j.V, j.T) == (1.0, 1.0, None)


def test_blank_image_misses_everything():
    scene = Scene([_shape("top-left", "star", "gold", count=3), _figure("right", "blue")], lighting="moonlit night")
    j, gen, gt = _judge(Scene(), scene)
    assert j.F == 0.0 and j.checks["spatial_layout"] == [0.0, 0.0] and j.checks["quantity_counting"] == [0.0]
    assert j.checks["anatomy_body_coherence"] == [0.0] and j.checks["attribute_binding"] == [0.0]
    assert j.A == pytest.approx(_aesthetics(gen, gt), abs=1e-6)
    assert j.rationale == ("The star is missing; 0 stars instead of 3; the dancer is missing; the dancer's body is "
                           "malformed; the lighting is not moonlit night.")


def test_an_entity_is_found_only_as_much_as_it_looks_like_itself(world):
    r = world.request("Draw the flag of the 2031 Aurora Cup champion above exactly three gold stars")
    scene = Scene.from_dict(r.scene)
    other = next(q for q in world.requests if q.scene and any(o["kind"] == "entity" and o["entity"] != scene.objects[0].entity
                                                                  for o in q.scene["objects"]))
    gen_scene = copy.deepcopy(scene)
    gen_scene.objects[0].emblem = next(o for o in other.scene["objects"] if o["kind"] == "entity")["emblem"]
    j, gen, gt = _judge(gen_scene, scene)
    y, x = ORIGIN[scene.objects[0].cell]
    a = gen[y + 7:y + 33, x + 5:x + 35].astype(float)
    b = gt[y + 7:y + 33, x + 5:x + 35].astype(float)
    like = _clip01(1 - (float(np.abs(a - b).mean()) - 4) / 26)
    assert j.checks["knowledge"] == [pytest.approx(like)] and like < 0.5
    assert j.F == pytest.approx((like + 1.0) / 2)  # the entity counts by its likeness, the stars fully
    assert j.V == pytest.approx(_v_from_checks(j.checks))
    assert "does not look like the real one" in j.rationale
    j, _, _ = _judge(scene, scene)
    assert j.checks["knowledge"] == [1.0] and j.F == 1.0


FLAG = Obj(kind="entity", cell="top", entity="nation:veloria", noun="flag")
STARS = _shape("bottom", "star", "gold", count=3, noun="stars")
OFFICIAL = {"entity": "nation:veloria", "variant": "official"}


@pytest.mark.parametrize("prompt,refs,want", [
    ("The flag from the first reference image in the top of the image. Exactly three gold stars in the bottom of "
     "the image.", [OFFICIAL], (1.0, [])),
    # the entity bound to a misprint: 3 of 4 requirements
    ("The flag from the first reference image in the top of the image. Exactly three gold stars in the bottom of "
     "the image.", [{"entity": "nation:veloria", "variant": "misprint"}], (0.75, ["flag bound to its official reference"])),
    # the official reference second, named as the second: bound
    ("The flag from the second reference image in the top of the image. Exactly three gold stars in the bottom of "
     "the image.", [{}, OFFICIAL], (1.0, [])),
    # named as the first while it is the second: not bound; no positions: 1 of 4 -> 0.25
    ("The flag from the first reference image. Exactly three gold stars.", [{}, OFFICIAL],
     (0.25, ["flag bound to its official reference", "flag placed in the top of the image",
             "stars placed in the bottom of the image"])),
    ("Three gold stars and a flag.", [], (0.0, ["flag bound to its official reference", "flag placed in the top of the image",
                                                "stars placed in the bottom of the image", "exactly three stars"])),
    ("   ", [OFFICIAL], (0.0, ["empty gen_prompt"])),
])
def test_program_sufficiency_entities_positions_and_counts(prompt, refs, want):
    assert JUDGE.program_sufficiency(prompt, Scene([FLAG, STARS]), refs) == want


def test_program_sufficiency_only_the_first_two_references_count():
    scene = Scene([FLAG])
    assert JUDGE.program_sufficiency("The flag from the third reference image.", scene, [{}, {}, OFFICIAL]) == \
        (0.0, ["flag bound to its official reference"])
    assert JUDGE.program_sufficiency("A flag.", Scene([_shape("center", "circle", "red")]), []) == (1.0, [])


def test_program_sufficiency_figures_materials_colours_lighting_style_text():
    scene = Scene([_figure("left", "blue"), _shape("right", "square", "red", material="wood")], text="GO TEAM",
                  lighting="neon", style="ink sketch")
    full = ('A blue dancer with exactly two arms and two legs in the left of the image. '
            'A red square made of wood, casting a soft shadow, in the right of the image. '
            'Neon lighting, in ink sketch style, with a banner with the exact text "go team".')
    assert JUDGE.program_sufficiency(full, scene, []) == (1.0, [])
    # 9 requirements: positions 2, limbs, material, two colour sentences, lighting, style, text
    half = ('A blue dancer and a red square made of wood in the left of the image. '
            'Neon lighting with the exact text "GO TEAMS".')
    score, missing = JUDGE.program_sufficiency(half, scene, [])
    assert missing == ["limbs of the dancer", "square placed in the right of the image", "square material and shadow",
                       "blue dancer in its own sentence", "red square in its own sentence", "in ink sketch style",
                       'exact text "GO TEAM"']
    assert score == round(4 * 2 / 9) / 4 == 0.25
    animal = Scene([_figure("center", "teal", figure="animal", noun="goat")])
    assert JUDGE.program_sufficiency("A teal goat with exactly four legs and a tail.", animal, []) == (1.0, [])
    assert JUDGE.program_sufficiency("A teal goat with exactly two arms and two legs.", animal, []) == (0.0, ["limbs of the goat"])


def test_program_sufficiency_colour_sentences_need_two_distinct_colours():
    same = Scene([_shape("left", "circle", "red"), _shape("right", "star", "red")])
    prompt = "A red circle in the left of the image and a red star in the right of the image."
    assert JUDGE.program_sufficiency(prompt, same, []) == (1.0, [])
    two = Scene([_shape("left", "circle", "red"), _shape("right", "star", "blue")])
    prompt = "A red circle in the left of the image. A blue star in the right of the image; a bluer sky."
    assert JUDGE.program_sufficiency(prompt, two, []) == (1.0, [])
    # the material needs its shadow too
    wood = Scene([_shape("center", "square", "red", material="wood")])
    assert JUDGE.program_sufficiency("A red square made of wood.", wood, []) == (0.0, ["square material and shadow"])
    assert JUDGE.program_sufficiency("A red square, casting a soft shadow.", wood, [])[0] == 0.0


def _style_oracle(gen, gt):
    res = []
    for img in (gen, gt):
        g = img[:120].astype(np.float64).mean(axis=2)
        res.append(g - np.array([np.median(g[y, BORDER]) for y in range(120)])[:, None])
    fg = [np.abs(img[:120].astype(np.float64) - np.array(_bg_rows(img))[:, None, :]).sum(axis=2) > 60 for img in (gen, gt)]
    bg = ~fg[0] & ~fg[1]
    a, b = res[0][bg], res[1][bg]
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 1e-3 and b.std() > 1e-3 else 0.0
    return _clip01((corr - 0.2) / 0.6)


def test_a_half_right_style_scores_between_zero_and_one_and_no_style_scores_zero():
    scene = Scene([_shape("center", "circle", "teal")], style="watercolor")
    gt = render(scene)
    other = render(Scene([_shape("center", "circle", "teal")], style="pixel art"))
    gen = (gt * 0.5 + other * 0.5).round().astype(np.uint8)  # half the right texture, half another
    (s,) = JUDGE.judge(gen, scene, gt).checks["creative_drawing"]
    assert s == pytest.approx(_style_oracle(gen, gt), abs=1e-6) and 0.05 < s < 0.95
    plain = render(Scene([_shape("center", "circle", "teal")]))  # no texture at all: no correlation
    assert JUDGE.judge(plain, scene, gt).checks["creative_drawing"] == [0.0]


def test_partial_likeness_and_material_from_shifted_pixels(world):
    r = world.request("Draw the flag of the 2031 Aurora Cup champion above exactly three gold stars")
    scene = Scene.from_dict(r.scene)
    scene.objects[1].material = "wood"
    gt = render(scene)
    gen = gt.astype(np.int16)
    y, x = ORIGIN[scene.objects[0].cell]
    gen[y + 7:y + 33, x + 5:x + 35] += 12  # the emblem 12 levels brighter
    y2, x2 = ORIGIN[scene.objects[1].cell]
    gen[y2:y2 + 40, x2:x2 + 40] -= 6  # the stars' cell 6 levels darker
    gen = gen.clip(0, 255).astype(np.uint8)
    j = JUDGE.judge(gen, scene, gt)
    mad = float(np.abs(gen[y + 7:y + 33, x + 5:x + 35].astype(float) - gt[y + 7:y + 33, x + 5:x + 35]).mean())
    assert j.checks["knowledge"] == [pytest.approx(_clip01(1 - (mad - 4) / 26))] and 0.5 < j.checks["knowledge"][0] < 1
    mad2 = float(np.abs(gen[y2:y2 + 40, x2:x2 + 40].astype(float) - gt[y2:y2 + 40, x2:x2 + 40]).mean())
    (m,) = j.checks["physical_material_consistency"]
    assert m == pytest.approx(_clip01(1 - (mad2 - 2) / 14)) and 0.5 < m < 1
    assert j.F == pytest.approx((j.checks["knowledge"][0] + 1) / 2)


def test_pil_images_in_any_mode_are_read_as_rgb():
    from PIL import Image

    scene = Scene([_shape("left", "circle", "red"), _shape("right", "star", "blue")], lighting="neon")
    gen_scene = copy.deepcopy(scene)
    gen_scene.objects[1].cell = "top"
    want = _judge(gen_scene, scene)[0]
    got = JUDGE.judge(Image.fromarray(render(gen_scene)).convert("RGBA"), scene, Image.fromarray(render(scene)).convert("RGBA"))
    assert (got.F, got.V, got.T, got.A, got.checks, got.rationale) == (want.F, want.V, want.T, want.A, want.checks, want.rationale)


def test_missing_entity_and_material_objects_score_zero_and_every_entity_is_counted_once(world):
    r = world.request("Draw the flag of the 2031 Aurora Cup champion above exactly three gold stars")
    scene = Scene.from_dict(r.scene)
    scene.objects[1].material = "wood"
    scene.objects.append(_shape("bottom-right", "circle", "red"))
    j, _, _ = _judge(Scene(), scene)
    assert j.checks["knowledge"] == [0.0] and j.checks["physical_material_consistency"] == [0.0] and j.F == 0.0
    j, _, _ = _judge(scene, scene)
    assert j.F == 1.0 and j.checks["knowledge"] == [1.0] and j.checks["quantity_counting"] == [1.0]
    assert j.rationale == "Everything requested is present and correct."


def test_counts_binding_and_labels_per_object():
    scene = Scene([_shape("left", "circle", "red", count=2), _shape("right", "star", "gold"), _figure("top", "blue")],
                  lighting="moonlit night")
    j, _, _ = _judge(scene, scene)
    assert j.checks["quantity_counting"] == [1.0] and j.checks["attribute_binding"] == [1.0]
    gen_scene = copy.deepcopy(scene)
    gen_scene.objects[2].color = "orange"  # only the figure's colour is wrong
    j, _, _ = _judge(gen_scene, scene)
    assert j.checks["attribute_binding"] == [0.0] and j.rationale == "The dancer is orange instead of blue."
    j, _, _ = _judge(Scene(), scene)
    assert j.checks["aesthetic_drawing"] == [0.0] and j.checks["quantity_counting"] == [0.0]
    bare = Scene([Obj(kind="shape", cell="center", shape="circle", color="red")])  # no noun: named by its shape
    assert _judge(Scene(), bare)[0].rationale == "The circle is missing."
    wrong = copy.deepcopy(bare)
    wrong.objects[0].color = "blue"
    assert _judge(wrong, bare)[0].rationale == "Everything requested is present and correct."  # no binding group asked


def test_levenshtein_of_an_empty_text():
    from genevolve.world.judge import _levenshtein

    assert (_levenshtein("", "ab"), _levenshtein("ab", ""), _levenshtein("kitten", "sitting")) == (2, 2, 3)


def test_program_sufficiency_small_counts_default_figures_same_colours_and_lighting():
    pair = Scene([_shape("center", "circle", "red", count=2)])
    assert JUDGE.program_sufficiency("Two red circles.", pair, []) == (0.0, ["exactly two circle"])
    odd = Scene([Obj(kind="figure", cell="center", color="red", noun="robot")])  # no figure kind given: a person
    assert JUDGE.program_sufficiency("A red robot with exactly two arms and two legs.", odd, []) == (1.0, [])
    same = Scene([_shape("left", "circle", "red"), _shape("right", "star", "red")])
    assert JUDGE.program_sufficiency("A circle in the left of the image, a star in the right of the image.", same, []) == (1.0, [])
    lit = Scene([_shape("center", "circle", "red")], lighting="neon")
    assert JUDGE.program_sufficiency("A red circle.", lit, []) == (0.0, ["neon lighting"])
