"""The sandbox judge at the edges of its thresholds, on images built pixel by pixel.

Every expected value here follows from the module docstring's rules by hand: a pixel exactly 60 or 61
away from its row's background, a banner window one row or one column wider than the band read, a mask
of exactly four pixels, an IoU of exactly 3/20, differences that put a score exactly on 0.5. Where an
exact float is needed (a standard deviation of exactly float32(1e-3), a correlation of exactly 0.5) the
construction is checked first with plain numpy on the test's own arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

from genevolve.world.judge import SandboxJudge, _Reading
from genevolve.world.scene import BANNER_RGB, Obj, Scene, render

JUDGE = SandboxJudge()
GREY = 205
BORDER = {c * 40 + k for c in range(3) for k in (0, 1, 2, 37, 38, 39)}
RED, BLUE = (220, 40, 40), (40, 80, 225)


def _canvas(value: float = GREY, dtype=np.uint8) -> np.ndarray:
    return np.full((140, 120, 3), value, dtype=dtype)


def _shape(cell, shape, color, count=1, material=None):
    return Obj(kind="shape", cell=cell, shape=shape, color=color, count=count, noun=shape, material=material,
               shadow=material is not None)


# ---------------------------------------------------------------------------
# Foreground, banner and ink thresholds
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rgb,found", [((225, 225, 224), 0.0), ((225, 225, 225), 0.0), ((225, 225, 226), 1.0),
                                       ((185, 185, 184), 1.0), ((226, 226, 225), 1.0)])
def test_a_pixel_is_foreground_only_more_than_60_from_its_row(rgb, found):
    """A 3 x 3 square of pixels whose RGB differs from the grey rows by 59, 60, 61 or 62 (summed)."""
    scene = Scene([_shape("center", "square", "red")])
    gt, gen = _canvas(), _canvas()
    gt[55:58, 55:58] = RED
    gen[55:58, 55:58] = rgb
    j = JUDGE.judge(gen, scene, gt)
    assert j.F == found  # found at IoU 1 when it is foreground, missing when it is background
    assert j.V == 0.0  # never red


def _band(rows: dict[int, tuple], cols: dict[int, tuple] | None = None) -> np.ndarray:
    img = _canvas()
    for y, rgb in rows.items():
        img[y, :] = rgb
    for x, rgb in (cols or {}).items():
        img[120:140, x] = rgb
    return img


OTHER = (100, 100, 100)  # far from the banner colour, and not ink (mean 100 >= 80)
# The banner is read as the median colour of rows 121-138, columns 2-117 (the band less a one-pixel rim). With as
# many banner pixels as other pixels there, the median is halfway between the two colours: no banner.
TIED_ROWS = {119: BANNER_RGB, 120: BANNER_RGB, 121: OTHER, **{y: BANNER_RGB for y in range(122, 131)},
             **{y: OTHER for y in range(131, 139)}, 139: BANNER_RGB}  # in rows 121-138: 9 banner rows, 9 other
TIED_COLS = {0: OTHER, 1: OTHER, 2: OTHER, **{x: BANNER_RGB for x in range(3, 61)}, **{x: OTHER for x in range(61, 120)}}


@pytest.mark.parametrize("img,banner", [
    (_band(TIED_ROWS), 0.0),  # one row more or less at either end, or rows 119-120 read too, would tip it
    (_band({**TIED_ROWS, 121: BANNER_RGB}), 1.0),  # 10 banner rows of 18
    (_band({}, TIED_COLS), 0.0),  # columns 2-117: 58 banner, 58 other; dropping column 2 or 117 would tip it
    (_band({}, {**TIED_COLS, 2: BANNER_RGB}), 1.0),
    (_band({y: (245, 235, 160) for y in range(120, 140)}), 0.0),  # 40 from the banner colour: not a banner
    (_band({y: (245, 235, 161) for y in range(120, 140)}), 1.0),  # 39 from it: a banner
    (_band({y: (205, 235, 200) for y in range(120, 140)}), 0.0),
])
def test_the_banner_is_the_median_of_the_band_within_40(img, banner):
    j = JUDGE.judge(img, Scene(text="HI"), render(Scene(text="HI")))
    assert j.F == banner  # no objects: F is the banner alone


@pytest.mark.parametrize("ink,banner,read", [(79, True, 1.0), (80, True, 0.0), (0, True, 1.0), (0, False, 0.0)])
def test_ink_is_darker_than_80_and_read_only_on_a_banner(ink, banner, read):
    scene = Scene(text="HI")
    gt = render(scene)
    gen = gt.copy()
    letters = (gt[120:140] == 0).all(axis=2)
    assert letters.sum() > 20
    band = gen[120:140]
    if not banner:
        band[:] = GREY
    band[letters] = ink
    j = JUDGE.judge(gen, scene, gt)
    assert j.T == read  # "HI" read back exactly, or nothing read
    assert j.F == float(banner)


# ---------------------------------------------------------------------------
# Cells with few pixels, components, and where each object is found
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n,found,coloured", [(3, 0.0, 0.0), (4, 1.0, 1.0), (5, 1.0, 1.0)])
def test_a_cell_needs_four_foreground_pixels_to_hold_an_object_and_a_colour(n, found, coloured):
    scene = Scene([_shape("center", "circle", "red")])
    img = _canvas()
    img[60, 50:50 + n] = RED
    j = JUDGE.judge(img, scene, img)
    assert (j.F, j.V) == (found, coloured)  # no skill group: V is "found in its colour"


def _blobs(*cells_px) -> np.ndarray:
    img = _canvas()
    for y, x in cells_px:
        img[40 + y, 40 + x] = RED
    return img


SQUARE_AT = lambda y, x: [(y, x), (y, x + 1), (y + 1, x), (y + 1, x + 1)]  # noqa: E731


@pytest.mark.parametrize("px,n", [
    (SQUARE_AT(10, 10) + SQUARE_AT(12, 12), 1),  # two 2 x 2 squares touching at a corner: one 8-connected blob
    (SQUARE_AT(10, 10) + SQUARE_AT(20, 20), 2),  # two blobs of exactly 4 pixels
    (SQUARE_AT(10, 10) + [(20, 20), (20, 21), (20, 22)], 1),  # a blob of 3 pixels is not counted
    ([(10, x) for x in range(10, 15)], 1),  # one blob of 5
])
def test_counting_takes_8_connected_blobs_of_four_pixels_or_more(px, n):
    scene = Scene([_shape("center", "square", "red", count=2)])
    img = _blobs(*px)
    j = JUDGE.judge(img, scene, img)
    assert j.checks["quantity_counting"] == [float(n == 2)]
    assert j.rationale == ("Everything requested is present and correct." if n == 2 else f"{n} squares instead of 2.")


def test_an_empty_cell_has_no_components():
    reading = _Reading(_canvas())
    assert [reading.components(c) for c in ("center", "top-left")] == [0, 0]
    assert reading.color_name("center") is None


def _pair(gen_objs, gt_objs):
    """Judge a scene of the ground-truth objects drawn against an image of the generated ones."""
    scene = Scene(gt_objs)
    return JUDGE.judge(render(Scene(gen_objs)), scene, render(scene))


SQ = _shape("top-left", "square", "green")


def _fg_iou(a: str, b: str) -> float:
    """IoU of two shapes' pixels as drawn in a cell (not grey = drawn)."""
    ma, mb = ((render(Scene([_shape("center", s, "red")]))[40:80, 40:80] != GREY).any(axis=2) for s in (a, b))
    return (ma & mb).sum() / (ma | mb).sum()


def test_located_by_overlap_then_colour_then_own_cell():
    assert _fg_iou("cross", "circle") + 0.3 < 1.0 + 0.05  # a red cross scores below a blue circle in the right cell
    want = [_shape("bottom", "circle", "red"), SQ]
    # the right colour elsewhere (1 + 0.3) beats the wrong colour in the right cell (1 + 0.05)
    j = _pair([_shape("bottom", "circle", "blue"), _shape("top", "circle", "red"), SQ], want)
    assert j.checks["spatial_layout"] == [0.0, 1.0] and j.checks["attribute_binding"] == [1.0]
    assert j.rationale == "The circle is at top instead of bottom."
    # the same circle twice: the one in the right cell (+0.05) wins, whatever the cells' names
    j = _pair([_shape("bottom", "circle", "red"), _shape("top", "circle", "red"), SQ], want)
    assert j.checks["spatial_layout"] == [1.0, 1.0] and j.rationale == "Everything requested is present and correct."
    # a poor overlap in the right colour (IoU + 0.3 < 1.05) loses to the right outline in the right cell
    j = _pair([_shape("bottom", "circle", "blue"), _shape("top", "cross", "red"), SQ], want)
    assert j.checks["spatial_layout"] == [1.0, 1.0] and j.checks["attribute_binding"] == [0.0]
    assert j.rationale == "The circle is blue instead of red."


def test_an_object_whose_best_cell_is_taken_goes_to_its_next_best():
    want = [_shape("bottom", "circle", "red"), _shape("top", "circle", "red")]
    j = _pair([_shape("bottom", "circle", "red"), _shape("right", "circle", "blue")], want)
    # (circle 1, bottom) = 1.3 ranks above (circle 1, right) = 1.0 but bottom is taken by circle 0 (1.35)
    assert j.F == 1.0 and j.checks["spatial_layout"] == [1.0, 0.0]
    assert j.rationale == "The circle is at right instead of top."


def test_a_match_of_exactly_0_15_is_kept():
    scene = Scene([_shape("center", "square", "red")])
    gt, gen = _canvas(), _canvas()
    gt[60, 50:60] = RED  # cell columns 10-19
    gen[20, 57:70] = BLUE  # another cell, columns 17-29: 3 shared of 20 in all, in the wrong colour
    j = JUDGE.judge(gen, scene, gt)
    assert (j.F, j.V) == (1.0, 0.0)  # IoU 3/20 = 0.15 (+0 colour, +0 cell) is not below 0.15: found
    gen[20, 57] = GREY  # 2 shared of 20
    assert JUDGE.judge(gen, scene, gt).F == 0.0


# ---------------------------------------------------------------------------
# Scores of exactly 0.5 and the notes beside them
# ---------------------------------------------------------------------------


def _shifted(img: np.ndarray, ys: slice, xs: slice, by: int) -> np.ndarray:
    """``img`` with every value in the region moved by exactly ``by`` (up, or down where up would pass 255)."""
    out = img.astype(np.int16)
    region = out[ys, xs]
    out[ys, xs] = np.where(region + by <= 255, region + by, region - by)
    return out.astype(np.uint8)


FLAG = Obj(kind="entity", cell="center", entity="nation:x", noun="flag",
           emblem={"kind": "flag", "colors": ["red", "white", "blue"], "layout": "h3"})


@pytest.mark.parametrize("by,likeness,note", [(17, 0.5, False), (18, 1 - 14 / 26, True)])
def test_an_entity_half_like_itself_is_not_yet_unlike(by, likeness, note):
    scene = Scene([FLAG])
    gt = render(scene)
    gen = _shifted(gt, slice(47, 73), slice(45, 75), by)  # the 26 x 30 emblem: mean difference `by`
    j = JUDGE.judge(gen, scene, gt)
    assert j.checks["knowledge"] == [pytest.approx(likeness)]  # 1 - (by - 4) / 26
    assert j.F == pytest.approx(likeness)
    assert j.rationale == ("The flag does not look like the real one." if note else
                           "Everything requested is present and correct.")


@pytest.mark.parametrize("by,score,note", [(9, 0.5, False), (10, 1 - 8 / 14, True)])
def test_a_material_half_right_is_not_yet_wrong(by, score, note):
    scene = Scene([_shape("center", "square", "red", material="wood")])
    gt = render(scene)
    gen = _shifted(gt, slice(40, 80), slice(40, 80), by)  # the whole cell: mean difference `by`
    j = JUDGE.judge(gen, scene, gt)
    assert j.checks["physical_material_consistency"] == [pytest.approx(score)]  # 1 - (by - 2) / 14
    assert j.rationale == ("The square does not look wood-made with a shadow." if note else
                           "Everything requested is present and correct.")


@pytest.mark.parametrize("by,note", [(19, False), (20, False), (21, True), (22, True)])
def test_lighting_is_named_only_beyond_20(by, note):
    scene = Scene(lighting="soft overcast")  # background at most 182: no value passes 255
    gt = render(scene)
    gen = (gt.astype(np.int16) + by).astype(np.uint8)  # every row's background `by` brighter on each channel
    j = JUDGE.judge(gen, scene, gt)
    assert j.checks["aesthetic_drawing"] == [pytest.approx(1 - (by - 5) / 35)]
    assert j.rationale == ("The lighting is not soft overcast." if note else "Everything requested is present and correct.")


# Style: the residual (grey minus its row's border median) of the pixels that are background in both images.
# Float images on a black ground let the residual be set exactly; borders stay 0 so every row's median is 0.
INTERIOR = [(y, x) for y in range(120) for x in range(120) if x not in BORDER]


def _checker(d: float) -> np.ndarray:
    """A float image whose grid is +d / -d in a checkerboard (the border columns too, nine of each per row)."""
    img = np.zeros((140, 120, 3), dtype=np.float32)
    y, x = np.mgrid[0:120, 0:120]
    img[:120] = np.where((x + y) % 2 == 0, np.float32(d), np.float32(-d))[:, :, None]
    return img


def test_style_correlates_only_pixels_that_are_background_in_both():
    gt = _checker(1.0)
    gen = gt.copy()
    gen[50:70, 50:70] = 100.0  # foreground in the generated image only: left out of the correlation
    j = JUDGE.judge(gen, Scene(style="watercolor"), gt)
    assert j.checks["creative_drawing"] == [pytest.approx(1.0)]  # the rest is the same texture: correlation 1


def _std_at_threshold() -> np.float32:
    """A d for which a +d / -d checkerboard of the 14,400 grid pixels has a float32 std of exactly float32(1e-3)
    (with numpy 2.4 on x86-64, one float32 step below 1e-3), found among the float32 values next to 1e-3."""
    for step in sorted(range(-64, 65), key=abs):
        d = (np.float32(1e-3).view(np.int32) + np.int32(step)).view(np.float32)
        grid = _checker(d)[:120]
        if (grid.mean(axis=2) == grid[:, :, 0]).all() and grid[:, :, 0].ravel().std() == np.float32(1e-3):
            return d  # the grey of (d, d, d) is d, and so is the residual (every row's border median is 0)
    pytest.skip("no float32 d near 1e-3 gives a std of exactly float32(1e-3) with this numpy")


@pytest.mark.parametrize("gen_d,gt_d,score", [
    (1.0, 1.0, 1.0),  # a texture of std 1 is a texture: the same one, correlation 1
    ("at", 3.0, 0.0), (3.0, "at", 0.0),  # a std of exactly 1e-3 (either image) is no texture: correlation 0
    ("above", 3.0, 1.0),
])
def test_a_texture_needs_a_std_above_1e_3(gen_d, gt_d, score):
    at = _std_at_threshold()
    pick = {"at": at, "above": np.nextafter(at, np.float32(1))}
    gen, gt = _checker(pick.get(gen_d, gen_d)), _checker(pick.get(gt_d, gt_d))
    j = JUDGE.judge(gen, Scene(style="watercolor"), gt)
    assert j.checks["creative_drawing"] == [pytest.approx(score)]


def test_a_style_correlation_of_exactly_0_5_is_not_named():
    """Residuals a (generated) and b = a + y (ground truth) on N = 8193 background pixels, both of mean 0:
    sum a^2 = 2048, sum ab = 2048, sum b^2 = 2048 + 4 * 1536 = 8192, so with N - 1 = 8192 the covariances are
    0.25, 0.25 and 1 exactly and the correlation 0.25 / (0.5 * 1) = 0.5."""
    gen, gt = _canvas(0.0, np.float32), _canvas(0.0, np.float32)
    fg, a, y = INTERIOR[:6207], INTERIOR[6207:6207 + 2048], INTERIOR[6207 + 2048:6207 + 2048 + 1536]
    for img in (gen, gt):
        img[tuple(np.array(fg).T)] = 100.0  # foreground in both: 14,400 - 6,207 = 8,193 background pixels
        img[tuple(np.array(a).T)] = np.tile([1.0, -1.0], 1024)[:, None]
    gt[tuple(np.array(y).T)] = np.tile([2.0, -2.0], 768)[:, None]
    bg = np.ones((120, 120), bool)
    bg[tuple(np.array(fg).T)] = False
    assert np.corrcoef(gen[:120, :, 0][bg], gt[:120, :, 0][bg])[0, 1] == 0.5
    j = JUDGE.judge(gen, Scene(style="watercolor"), gt)
    assert j.checks["creative_drawing"] == [pytest.approx(0.5)]  # (0.5 - 0.2) / 0.6
    assert j.rationale == "Everything requested is present and correct."
    gt[tuple(np.array(y[:2]).T)] = [[3.0], [-3.0]]  # a little less correlated
    assert JUDGE.judge(gen, Scene(style="watercolor"), gt).rationale == "The image is not in watercolor style."


def test_program_sufficiency_asks_colour_sentences_only_of_coloured_shapes_and_figures():
    scene = Scene([_shape("left", "circle", "red"), Obj(kind="shape", cell="right", shape="star", noun="star"),
                   Obj(kind="entity", cell="top", entity="nation:x", noun="flag", color="blue")])
    prompt = ("A red circle in the left of the image. A star in the right of the image. The flag from the first "
              "reference image in the top of the image.")
    official = {"entity": "nation:x", "variant": "official"}
    assert JUDGE.program_sufficiency(prompt, scene, [official]) == (1.0, [])  # one coloured shape: nothing to keep apart
