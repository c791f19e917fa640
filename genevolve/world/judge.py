"""The sandbox judge: reads a generated image's pixels against the ground-truth image and scene.

**Reading pixels.** Columns 0-2 and 37-39 of every cell are always background, so each row's
background colour is the median of those 18 columns; a pixel is foreground when it differs from its
row's background by more than 60 (sum over RGB). For every ground-truth object the judge finds the
generated cell whose foreground best overlaps the object's ground-truth foreground (greedy, one
object per cell). The text band is read by template-matching OCR (``font.read_text``).

**Scores** (each in [0, 1]):

- F, faithfulness: share of requested objects found anywhere (an entity counts by how much it looks
  like itself), and a banner when text is requested.
- V, visual correctness: mean over *groups*, each the mean of its checks:
  knowledge (entity emblem matches the ground truth, pixel by pixel), spatial_layout (object in its
  cell), quantity_counting (connected components == count), attribute_binding (every coloured object
  has its own dominant colour: one check for the whole set, since leakage is a failure of the set),
  anatomy_body_coherence (figure mask IoU; a wrong limb count scores 0), physical_material_consistency (shading, texture and
  shadow match), aesthetic_drawing (background lighting matches), creative_drawing (background
  texture correlates with the ground truth's style).
- T, text accuracy: 1 - edit distance / length between the read text and the requested text;
  ``None`` when the request has no text.
- A, aesthetics: closeness of the two images at 10 x 10 pixel block resolution (1 - mean abs diff / 25).

KScore = 0.1 F + 0.4 V + 0.4 T + 0.1 A. With no text requested, T is left out and the remaining
weights are renormalised: (0.1 F + 0.4 V + 0.1 A) / 0.6 (``text_policy = "renormalise"``).

**R_text** (program sufficiency) reads the program instead of the image: is every requirement
stated in words the generator obeys, and is every entity bound to its official reference? It is the
share of satisfied requirements, rounded to five levels (0, 0.25, 0.5, 0.75, 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from .font import read_text
from .generator import EXACT_TEXT_RE, sentences as split_sentences
from .requests import visual_groups
from .scene import BAND, BANNER_RGB, CELL, EMBLEM_H, EMBLEM_W, GRID, Scene, cell_origin
from .vocab import (
    CELLS,
    GENERATOR_MATERIAL_PHRASES,
    NUMBER_WORDS,
    OBJECT_COLORS,
    SHADOW_PHRASE,
    generator_cell_phrase,
    generator_lighting_phrase,
    generator_style_phrase,
    limb_phrase,
)

W_F, W_V, W_T, W_A = 0.1, 0.4, 0.4, 0.1
_BORDER_COLS = np.array([c * CELL + k for c in range(3) for k in (0, 1, 2, 37, 38, 39)])
_OBJ_RGB = np.array(list(OBJECT_COLORS.values()), dtype=np.float32)
_OBJ_NAMES = list(OBJECT_COLORS)


@dataclass
class Judgement:
    F: float
    V: float
    T: float | None
    A: float
    kscore: float
    rationale: str
    checks: dict[str, list[float]] = field(default_factory=dict)


def kscore(F: float, V: float, T: float | None, A: float) -> float:
    if T is None:
        return (W_F * F + W_V * V + W_A * A) / (W_F + W_V + W_A)
    return W_F * F + W_V * V + W_T * T + W_A * A


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_accuracy(read: str, want: str) -> float:
    if not want:
        return 1.0 if not read else 0.0
    return max(0.0, 1.0 - _levenshtein(read, want) / max(len(want), len(read)))


class _Reading:
    """Everything the judge reads off one image, computed once."""

    def __init__(self, img: np.ndarray):
        self.img = img.astype(np.float32)
        grid = self.img[:GRID]
        self.bg_row = np.median(grid[:, _BORDER_COLS], axis=1)  # (120, 3)
        self.fg = np.abs(grid - self.bg_row[:, None, :]).sum(axis=2) > 60
        gray = grid.mean(axis=2)
        self.residual = gray - np.median(gray[:, _BORDER_COLS], axis=1)[:, None]
        band = self.img[BAND[0] + 1 : BAND[1] - 1, 2:-2]
        self.banner = bool(np.abs(np.median(band.reshape(-1, 3), axis=0) - np.array(BANNER_RGB)).sum() < 40)
        ink = self.img[BAND[0] : BAND[1]].mean(axis=2) < 80
        self.text = read_text(ink) if self.banner else ""

    def cell_mask(self, cell: str) -> np.ndarray:
        y, x = cell_origin(cell)
        return self.fg[y : y + CELL, x : x + CELL]

    def cell_rgb(self, cell: str) -> np.ndarray:
        y, x = cell_origin(cell)
        return self.img[y : y + CELL, x : x + CELL]

    def components(self, cell: str) -> int:
        lab, n = ndimage.label(self.cell_mask(cell), structure=np.ones((3, 3)))
        if n == 0:
            return 0
        sizes = np.bincount(lab.ravel())[1:]
        return int((sizes >= 4).sum())

    def color_name(self, cell: str) -> str | None:
        m = self.cell_mask(cell)
        if m.sum() < 4:
            return None
        med = np.median(self.cell_rgb(cell)[m], axis=0)
        return _OBJ_NAMES[int(np.abs(_OBJ_RGB - med).sum(axis=1).argmin())]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 0.0


def _label(o) -> str:
    return o.noun or o.shape or o.kind


def _locate(gen: _Reading, gt: _Reading, objs) -> dict[int, str]:
    """Each ground-truth object's cell in the generated image (greedy by mask overlap, colour and position)."""
    pairs = []
    for i, o in enumerate(objs):
        want = gt.cell_mask(o.cell)
        for c in CELLS:
            mask = gen.cell_mask(c)
            if mask.sum() < 4:
                continue
            score = _iou(mask, want) + (0.3 if gen.color_name(c) == o.color else 0.0) + (0.05 if c == o.cell else 0.0)
            pairs.append((score, i, c))
    where: dict[int, str] = {}
    used: set[str] = set()
    for score, i, c in sorted(pairs, reverse=True):
        if i in where or c in used or score < 0.15:
            continue
        where[i] = c
        used.add(c)
    return where


def _entity_likeness(gen: _Reading, gt: _Reading, c: str | None, o) -> float:
    if c is None:
        return 0.0
    ya, xa = cell_origin(c)
    yb, xb = cell_origin(o.cell)
    a = gen.img[ya + 7 : ya + 7 + EMBLEM_H, xa + 5 : xa + 5 + EMBLEM_W]
    b = gt.img[yb + 7 : yb + 7 + EMBLEM_H, xb + 5 : xb + 5 + EMBLEM_W]
    mad = float(np.abs(a - b).mean())
    return float(np.clip(1 - (mad - 4) / 26, 0, 1))


def _object_checks(gen: _Reading, gt: _Reading, scene: Scene, where: dict[int, str], checks: dict[str, list[float]],
                   notes: list[str]) -> None:
    """The per-object checks of every skill group the scene asks for; binding holds only when every coloured
    object keeps its own colour."""
    bound: list[bool] = []
    for i, o in enumerate(scene.objects):
        c = where.get(i)
        if c is None:
            notes.append(f"the {_label(o)} is missing")
        if "knowledge" in checks and o.kind == "entity":
            s = _entity_likeness(gen, gt, c, o)
            checks["knowledge"].append(s)
            if s < 0.5:
                notes.append(f"the {_label(o)} does not look like the real one")
        if "spatial_layout" in checks:
            ok = float(c == o.cell)
            checks["spatial_layout"].append(ok)
            if c is not None and not ok:
                notes.append(f"the {_label(o)} is at {c} instead of {o.cell}")
        if "quantity_counting" in checks and o.kind == "shape" and o.count >= 2:
            n = gen.components(c) if c else 0
            checks["quantity_counting"].append(float(n == o.count))
            if n != o.count:
                notes.append(f"{n} {_label(o)}s instead of {o.count}")
        if "attribute_binding" in checks and o.kind in ("shape", "figure") and o.color:
            got = gen.color_name(c) if c else None
            bound.append(got == o.color)
            if got and got != o.color:
                notes.append(f"the {_label(o)} is {got} instead of {o.color}")
        if "anatomy_body_coherence" in checks and o.kind == "figure":
            iou = _iou(gen.cell_mask(c), gt.cell_mask(o.cell)) if c else 0.0
            # A wrong limb count leaves IoU <= 0.935 with the true figure; the same figure gives 1.
            s = float(np.clip((iou - 0.94) / 0.05, 0, 1))
            checks["anatomy_body_coherence"].append(s)
            if s < 0.5:
                notes.append(f"the {_label(o)}'s body is malformed")
        if "physical_material_consistency" in checks and o.kind == "shape" and o.material:
            s = 0.0
            if c is not None:
                mad = float(np.abs(gen.cell_rgb(c) - gt.cell_rgb(o.cell)).mean())
                s = float(np.clip(1 - (mad - 2) / 14, 0, 1))
            checks["physical_material_consistency"].append(s)
            if s < 0.5:
                notes.append(f"the {_label(o)} does not look {o.material}-made with a shadow")
    if "attribute_binding" in checks:
        checks["attribute_binding"].append(float(bool(bound) and all(bound)))


def _scene_checks(gen: _Reading, gt: _Reading, scene: Scene, checks: dict[str, list[float]], notes: list[str]) -> None:
    """The whole-image checks: lighting (aesthetic drawing) and style (creative drawing)."""
    if "aesthetic_drawing" in checks:
        d = float(np.abs(gen.bg_row - gt.bg_row).mean())
        checks["aesthetic_drawing"].append(float(np.clip(1 - (d - 5) / 35, 0, 1)))
        if d > 20:
            notes.append(f"the lighting is not {scene.lighting}")
    if "creative_drawing" in checks:
        bg = ~gen.fg & ~gt.fg
        a, b = gen.residual[bg], gt.residual[bg]
        corr = 0.0
        if a.std() > 1e-3 and b.std() > 1e-3:
            corr = float(np.corrcoef(a, b)[0, 1])
        checks["creative_drawing"].append(float(np.clip((corr - 0.2) / 0.6, 0, 1)))
        if corr < 0.5:
            notes.append(f"the image is not in {scene.style} style")


def _dimensions(gen: _Reading, gt: _Reading, scene: Scene, where: dict[int, str], checks: dict[str, list[float]],
                notes: list[str]) -> tuple[float, float, float | None, float]:
    """F (requested content present; an entity drawn generically is not the entity asked for), V (the skill
    groups' checks), T (the banner's text) and A (overall likeness at low resolution)."""
    objs = scene.objects
    know = iter(checks.get("knowledge", []))
    found = [float(i in where) * (next(know) if o.kind == "entity" and "knowledge" in checks else 1.0)
             for i, o in enumerate(objs)]
    if scene.text:
        found.append(float(gen.banner))
    F = float(np.mean(found)) if found else 1.0
    groups = [float(np.mean(v)) for v in checks.values() if v]
    if groups:
        V = float(np.mean(groups))
    else:  # nothing skill-specific asked: the objects themselves, in the right colour
        V = float(np.mean([float(i in where and (o.kind == "entity" or gen.color_name(where[i]) == o.color))
                           for i, o in enumerate(objs)])) if objs else 1.0
    T = None
    if scene.text:
        T = text_accuracy(gen.text, scene.text)
        if T < 1:
            notes.append(f'the text reads "{gen.text}" instead of "{scene.text}"')
    small_a = gen.img.reshape(14, 10, 12, 10, 3).mean(axis=(1, 3))
    small_b = gt.img.reshape(14, 10, 12, 10, 3).mean(axis=(1, 3))
    A = float(np.clip(1 - np.abs(small_a - small_b).mean() / 25, 0, 1))
    return F, V, T, A


class SandboxJudge:
    """Scores an image against a request's ground truth; see the module docstring for the rubric."""

    name = "sandbox-judge"

    def judge(self, image: Any, scene: Scene, gt_image: Any) -> Judgement:
        gen = _Reading(np.asarray(image.convert("RGB") if hasattr(image, "convert") else image))
        gt = _Reading(np.asarray(gt_image.convert("RGB") if hasattr(gt_image, "convert") else gt_image))
        notes: list[str] = []
        where = _locate(gen, gt, scene.objects)
        checks: dict[str, list[float]] = {g: [] for g in visual_groups(scene)}
        _object_checks(gen, gt, scene, where, checks, notes)
        _scene_checks(gen, gt, scene, checks, notes)
        F, V, T, A = _dimensions(gen, gt, scene, where, checks, notes)
        k = kscore(F, V, T, A)
        rationale = "; ".join(notes) if notes else "everything requested is present and correct"
        return Judgement(F, V, T, A, k, rationale[0].upper() + rationale[1:] + ".", {g: v for g, v in checks.items()})

    # ------------------------------------------------------------------
    # Program sufficiency
    # ------------------------------------------------------------------

    def program_sufficiency(self, gen_prompt: str, scene: Scene, references: Sequence[dict[str, Any]]) -> tuple[float, list[str]]:
        """Share of requirements the program states explicitly, rounded to 0 / .25 / .5 / .75 / 1.

        ``references`` are the program's references in order, each a dict with at least ``entity``
        and ``variant`` (the sandbox reference row), or empty dicts for unknown images.
        """
        low = gen_prompt.lower()
        sentences = [s.lower() for s in split_sentences(gen_prompt)]
        items: list[float] = []
        missing: list[str] = []

        def need(ok: bool, what: str) -> None:
            items.append(float(ok))
            if not ok:
                missing.append(what)

        ordinals = ["first", "second"]
        for o in scene.objects:
            if o.kind == "entity":
                bound = False
                for k, ref in enumerate(references[:2]):
                    if ref.get("entity") == o.entity and ref.get("variant") == "official" and f"{ordinals[k]} reference image" in low:
                        bound = True
                need(bound, f"{o.noun} bound to its official reference")
            if len(scene.objects) >= 2:
                need(generator_cell_phrase(o.cell) in low, f"{o.noun or o.shape} placed {generator_cell_phrase(o.cell)}")
            if o.kind == "shape" and o.count >= 2:
                need(f"exactly {NUMBER_WORDS[o.count]} " in low, f"exactly {NUMBER_WORDS[o.count]} {o.noun}")
            if o.kind == "figure":
                need(limb_phrase(o.figure or "person") in low, f"limbs of the {o.noun}")
            if o.kind == "shape" and o.material:
                need(GENERATOR_MATERIAL_PHRASES[o.material] in low and SHADOW_PHRASE in low, f"{o.noun} material and shadow")
        colored = [o for o in scene.objects if o.kind in ("shape", "figure") and o.color]
        if len(colored) >= 2 and len({o.color for o in colored}) >= 2:
            for o in colored:
                own = [s for s in sentences if re.search(rf"\b{o.color}\b", s)]
                alone = any(sum(bool(re.search(rf"\b{c.color}\b", s)) for c in colored if c.color != o.color) == 0 for s in own)
                need(bool(own) and alone, f"{o.color} {o.noun} in its own sentence")
        if scene.lighting:
            need(generator_lighting_phrase(scene.lighting) in low, generator_lighting_phrase(scene.lighting))
        if scene.style:
            need(generator_style_phrase(scene.style) in low, generator_style_phrase(scene.style))
        if scene.text:
            m = EXACT_TEXT_RE.search(gen_prompt)
            need(bool(m) and m.group(1).upper() == scene.text, f'exact text "{scene.text}"')
        if not gen_prompt.strip():
            return 0.0, ["empty gen_prompt"]
        if not items:
            return 1.0, []
        return round(4 * float(np.mean(items))) / 4, missing
