"""Scenes and the one renderer that draws them (ground truth and generator share it).

Canvas: 120 x 140 pixels. The top 120 rows are a 3 x 3 grid of 40-pixel cells (``CELLS``); the
bottom 20 rows are a text band where a banner carries text when a scene has any. Every object lives
in one cell: a group of ``count`` shapes, a stick figure, or an entity emblem (30 x 26 pixels,
black outline) pasted in the cell's middle. Lighting paints the background gradient; style adds a
faint, deterministic background texture; material changes how a shape is shaded; a shadow is a
dark ellipse under each shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from .font import text_mask
from .vocab import CELL_RC, ENTITY_COLORS

W, H = 120, 140
GRID = 120
CELL = 40
BAND = (120, 140)
EMBLEM_W, EMBLEM_H = 30, 26
BANNER_RGB = (245, 235, 200)
SHADOW_RGB = np.array([70, 70, 70], dtype=np.float32)

LIGHTING_GRADIENTS: dict[str | None, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    None: ((205, 205, 205), (205, 205, 205)),
    "golden-hour": ((250, 205, 130), (225, 140, 95)),
    "moonlit night": ((35, 45, 85), (70, 80, 120)),
    "soft overcast": ((172, 176, 182), (140, 146, 152)),
    "neon": ((70, 25, 100), (25, 95, 115)),
}


@dataclass
class Obj:
    """One thing in a scene. ``kind`` is "shape", "figure" or "entity"."""

    kind: str
    cell: str | None = None
    shape: str | None = None
    color: str | None = None
    count: int = 1
    figure: str | None = None  # "person" or "animal"
    noun: str | None = None  # the word a request used ("dancer", "horse", "sphere")
    arms: int = 0
    legs: int = 0
    material: str | None = None
    shadow: bool = False
    entity: str | None = None  # entity id
    emblem: dict[str, Any] | None = None  # emblem spec the renderer draws (entity or generic)
    pixels: Any = None  # an emblem given as pixels (a pasted reference), never serialised


@dataclass
class Scene:
    objects: list[Obj] = field(default_factory=list)
    text: str | None = None
    lighting: str | None = None
    style: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for o in d["objects"]:
            o.pop("pixels", None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        return cls(
            objects=[Obj(**{k: v for k, v in o.items() if k != "pixels"}) for o in d.get("objects", [])],
            text=d.get("text"),
            lighting=d.get("lighting"),
            style=d.get("style"),
        )


def cell_origin(cell: str) -> tuple[int, int]:
    r, c = CELL_RC[cell]
    return r * CELL, c * CELL  # (y, x)


# ---------------------------------------------------------------------------
# Background
# ---------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _background(lighting: str | None, style: str | None) -> np.ndarray:
    top, bottom = (np.array(c, dtype=np.float32) for c in LIGHTING_GRADIENTS.get(lighting, LIGHTING_GRADIENTS[None]))
    t = np.linspace(0.0, 1.0, H, dtype=np.float32)[:, None, None]
    img = np.broadcast_to(top * (1 - t) + bottom * t, (H, W, 3)).copy()
    img += style_texture(style)[:, :, None]
    img.flags.writeable = False
    return img


@lru_cache(maxsize=8)
def style_texture(style: str | None) -> np.ndarray:
    """A faint texture (amplitude <= 12) that identifies each style; zero for no style."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    if style == "watercolor":
        tex = 9.0 * np.sin(x / 6.0 + 0.8 * np.sin(y / 9.0)) * np.cos(y / 7.0)
    elif style == "pixel art":
        tex = 7.0 * ((((x // 4) + (y // 4)) % 2) * 2 - 1)
    elif style == "stained-glass mosaic":
        tex = np.where((x % 10 == 0) | (y % 10 == 0), -12.0, 3.0)
    elif style == "ink sketch":
        tex = np.where((x + y) % 7 == 0, -12.0, 2.0)
    else:
        tex = np.zeros((H, W), dtype=np.float32)
    tex = tex.astype(np.float32)
    tex.flags.writeable = False
    return tex


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------


@lru_cache(maxsize=256)
def shape_mask(shape: str, size: int) -> np.ndarray:
    s = size
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    cx = cy = s / 2
    u, v = (x - cx) / (s / 2), (y - cy) / (s / 2)
    if shape == "circle":
        m = u * u + v * v <= 1.0
    elif shape == "square":
        m = (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    elif shape == "triangle":
        m = (v <= 0.9) & (v >= -0.9) & (np.abs(u) <= (v + 0.9) / 1.8 * 0.95)
    elif shape == "diamond":
        m = np.abs(u) + np.abs(v) <= 1.0
    elif shape == "cross":
        m = ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    elif shape == "star":
        ang = np.arctan2(v, u) + np.pi / 2
        r = np.sqrt(u * u + v * v)
        k = np.cos(2.5 * ang) ** 2  # five points
        m = r <= 0.45 + 0.55 * k
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m = np.ascontiguousarray(m)
    m.flags.writeable = False
    return m


@lru_cache(maxsize=64)
def figure_mask(figure: str, arms: int, legs: int) -> np.ndarray:
    """A 34 x 34 stick figure with the given limb counts."""
    from PIL import Image, ImageDraw

    im = Image.new("1", (34, 34), 0)
    d = ImageDraw.Draw(im)
    if figure == "person":
        d.ellipse((13, 1, 21, 9), fill=1)
        d.line((17, 9, 17, 21), fill=1, width=3)
        arm_ends = [(7, 17), (27, 17), (27, 4), (7, 4)]
        for end in arm_ends[: max(0, arms)]:
            d.line((17, 12, *end), fill=1, width=2)
        leg_ends = [(10, 33), (24, 33), (17, 33), (4, 30)]
        for end in leg_ends[: max(0, legs)]:
            d.line((17, 21, *end), fill=1, width=2)
    else:
        d.ellipse((6, 11, 27, 20), fill=1)
        d.ellipse((25, 5, 32, 12), fill=1)
        d.line((7, 14, 2, 8), fill=1, width=2)
        leg_x = [9, 14, 20, 25, 17, 30]
        for x in leg_x[: max(0, legs)]:
            d.line((x, 19, x, 32), fill=1, width=2)
    m = np.array(im, dtype=bool)
    m.flags.writeable = False
    return m


# ---------------------------------------------------------------------------
# Emblems (entities)
# ---------------------------------------------------------------------------


def _rgb(name: str) -> np.ndarray:
    return np.array(ENTITY_COLORS.get(name, (128, 128, 128)), dtype=np.float32)


def _stamp_symbol(img: np.ndarray, spec: dict[str, Any], size: int, top: int, left: int) -> None:
    """The emblem's optional symbol (a shape of ``size`` pixels) in its colour, at (top, left)."""
    sym = spec.get("symbol")
    if sym:
        img[top : top + size, left : left + size][shape_mask(sym, size)] = _rgb(spec.get("symbol_color", "white"))


def _flag(img: np.ndarray, spec: dict[str, Any], cols: list[np.ndarray], y: np.ndarray, x: np.ndarray) -> None:
    h, w = EMBLEM_H, EMBLEM_W
    layout = spec.get("layout", "h3")
    n = len(cols)
    if layout.startswith("h"):
        idx = np.minimum((y * n) // h, n - 1)
    elif layout.startswith("v"):
        idx = np.minimum((x * n) // w, n - 1)
    elif layout == "cross":
        idx = (((np.abs(x - 10) <= 2) | (np.abs(y - 13) <= 2))).astype(int)
    else:  # diagonal
        idx = (x * h > y * w).astype(int)
    idx = np.minimum(idx, n - 1)
    img[:] = np.stack(cols)[idx]
    _stamp_symbol(img, spec, 10, 8, 10)


def _crest(img: np.ndarray, spec: dict[str, Any], cols: list[np.ndarray], y: np.ndarray, x: np.ndarray) -> None:
    img[:] = _rgb(spec.get("field", "white"))
    shield = (x >= 3) & (x <= 26) & ((y <= 14) | (np.abs(x - 14.5) <= (25 - y) * 1.1))
    img[shield] = cols[0]
    band = spec.get("band")
    if band == "horizontal":
        img[shield & (np.abs(y - 9) <= 2)] = cols[1]
    elif band == "vertical":
        img[shield & (np.abs(x - 14.5) <= 3)] = cols[1]
    elif band == "chevron":
        img[shield & (np.abs(y - (20 - np.abs(x - 14.5) * 0.8)) <= 2)] = cols[1]
    _stamp_symbol(img, spec, 8, 3, 11)


def _landmark(img: np.ndarray, spec: dict[str, Any], cols: list[np.ndarray], y: np.ndarray, x: np.ndarray) -> None:
    img[:] = _rgb(spec.get("sky", "white"))
    body, accent = cols[0], cols[1]
    t = spec.get("type", "tower")
    tiers = int(spec.get("tiers", 2))
    if t == "tower":
        img[4:26, 11:19] = body
        for k in range(tiers):
            img[7 + 6 * k : 10 + 6 * k, 13:17] = accent
    elif t == "spire":
        m = (np.abs(x - 14.5) <= (y - 1) * 0.35) & (y >= 2)
        img[m] = body
        img[26 - 3 * tiers : 26, 6:24] = accent
    elif t == "dome":
        m = ((x - 14.5) ** 2 + (y - 14) ** 2 <= 81) & (y <= 14)
        img[m] = accent
        img[14:26, 5:25] = body
        for k in range(tiers):
            img[17:24, 7 + 6 * k : 10 + 6 * k] = accent
    elif t == "arch":
        img[6:26, 4:26] = body
        m = ((x - 14.5) ** 2 + (y - 16) ** 2 <= 36) | ((np.abs(x - 14.5) <= 6) & (y >= 16))
        img[m] = _rgb(spec.get("sky", "white"))
        img[6 : 6 + 2 * tiers, 4:26] = accent
    else:  # stepped
        for k in range(3):
            img[26 - 7 * (k + 1) : 26 - 7 * k, 3 + 4 * k : 27 - 4 * k] = body if k % 2 == 0 else accent


def _logo(img: np.ndarray, spec: dict[str, Any], cols: list[np.ndarray], y: np.ndarray, x: np.ndarray) -> None:
    img[:] = cols[0]
    mark = spec.get("mark", "ring")
    fg = cols[1]
    if mark == "ring":
        r = np.sqrt((x - 14.5) ** 2 + (y - 12.5) ** 2)
        img[(r <= 9) & (r >= 5)] = fg
    elif mark == "bars":
        img[5:21, 8:12] = fg
        img[5:21, 17:21] = fg
    elif mark in ("triangle", "diamond", "star", "circle"):
        m = shape_mask(mark, 18)
        img[4:22, 6:24][m] = fg
    letter = spec.get("letter")
    if letter:
        from .font import GLYPHS

        g = GLYPHS.get(letter)
        if g is not None:
            img[18:25, 22:27][g] = _rgb(spec.get("letter_color", "white"))


_EMBLEMS = {"flag": _flag, "crest": _crest, "landmark": _landmark, "logo": _logo}


def render_emblem(spec: dict[str, Any]) -> np.ndarray:
    """Draw an entity emblem (flag, crest, landmark, logo) as a 26 x 30 float RGB array."""
    h, w = EMBLEM_H, EMBLEM_W
    img = np.zeros((h, w, 3), dtype=np.float32)
    kind = spec["kind"]
    if kind not in _EMBLEMS:
        raise ValueError(f"unknown emblem kind {kind!r}")
    cols = [_rgb(c) for c in spec.get("colors", ["white"])]
    y, x = np.mgrid[0:h, 0:w]
    _EMBLEMS[kind](img, spec, cols, y, x)
    img[0, :] = img[-1, :] = 0
    img[:, 0] = img[:, -1] = 0
    return img


def emblem_to_reference(emblem: np.ndarray, scale: int = 2, margin: int = 4) -> np.ndarray:
    """A reference picture of an emblem: scaled up on a white card (what image_search returns)."""
    big = np.repeat(np.repeat(emblem, scale, axis=0), scale, axis=1)
    h, w = big.shape[:2]
    card = np.full((h + 2 * margin, w + 2 * margin, 3), 255, dtype=np.uint8)
    card[margin : margin + h, margin : margin + w] = np.clip(big, 0, 255).astype(np.uint8)
    return card


def reference_to_emblem(ref: np.ndarray) -> np.ndarray:
    """What the generator copies from a reference image: its content, cropped and fitted to emblem size."""
    from PIL import Image

    arr = np.asarray(ref, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    arr = arr[:, :, :3]
    ink = (arr < 245).any(axis=2)
    if ink.any():
        ys, xs = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
        arr = arr[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
    im = Image.fromarray(arr).resize((EMBLEM_W, EMBLEM_H), Image.NEAREST)
    return np.asarray(im, dtype=np.float32)


# ---------------------------------------------------------------------------
# Objects
# ---------------------------------------------------------------------------


def group_layout(count: int) -> tuple[int, list[tuple[int, int]]]:
    """Item size and top-left offsets (inside a cell) for ``count`` copies of a shape."""
    count = max(1, min(int(count), 6))
    if count == 1:
        return 24, [(5, 8)]
    size, gap = 10, 2
    rows = [count] if count <= 3 else [(count + 1) // 2, count // 2]
    offsets = []
    row_h = size + 4
    y = (CELL - len(rows) * row_h) // 2
    for k in rows:
        x = (CELL - (k * size + (k - 1) * gap)) // 2
        for i in range(k):
            offsets.append((y, x + i * (size + gap)))
        y += row_h
    return size, offsets


def _paint_shape(img: np.ndarray, y: int, x: int, size: int, shape: str, color: np.ndarray, material: str | None, shadow: bool):
    m = shape_mask(shape, size)
    region = img[y : y + size, x : x + size]
    if shadow:
        sh_h = max(2, size // 4)
        sy = y + size - sh_h // 2
        yy, xx = np.mgrid[0:sh_h, 0:size]
        ell = ((xx - size / 2 + 0.5) / (size / 2)) ** 2 + ((yy - sh_h / 2 + 0.5) / (sh_h / 2)) ** 2 <= 1.0
        sreg = img[sy : sy + sh_h, x : x + size]
        ell = ell[: sreg.shape[0], : sreg.shape[1]]
        sreg[ell] = SHADOW_RGB
    if material == "metal":
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        shade = 0.55 + 0.6 * (1.0 - (xx + yy) / (2 * size))
        paint = np.clip(color[None, None, :] * shade[:, :, None], 0, 255)
        hl = ((xx - size * 0.3) ** 2 + (yy - size * 0.3) ** 2) <= (size * 0.12) ** 2
        paint[hl] = 250.0
        region[m] = paint[m]
    elif material == "wood":
        yy = np.mgrid[0:size, 0:size][0]
        paint = np.where((yy % 3 == 0)[:, :, None], color * 0.6, color)
        region[m] = paint[m]
    elif material == "glass":
        region[m] = 0.45 * color + 0.55 * region[m]
        edge = m & ~np.pad(m, 1)[2:, 1:-1] | m & ~np.pad(m, 1)[:-2, 1:-1] | m & ~np.pad(m, 1)[1:-1, 2:] | m & ~np.pad(m, 1)[1:-1, :-2]
        region[edge] = 250.0
    else:
        region[m] = color


def _paint_object(img: np.ndarray, obj: Obj, cell: str) -> None:
    cy, cx = cell_origin(cell)
    if obj.kind == "shape":
        color = _rgb(obj.color or "black")
        size, offsets = group_layout(obj.count)
        for dy, dx in offsets:
            _paint_shape(img, cy + dy, cx + dx, size, obj.shape or "circle", color, obj.material, obj.shadow)
    elif obj.kind == "figure":
        m = figure_mask(obj.figure or "person", obj.arms, obj.legs)
        img[cy + 3 : cy + 37, cx + 3 : cx + 37][m] = _rgb(obj.color or "black")
    elif obj.kind == "entity":
        pix = obj.pixels if obj.pixels is not None else render_emblem(obj.emblem or {"kind": "flag", "colors": ["white"]})
        img[cy + 7 : cy + 7 + EMBLEM_H, cx + 5 : cx + 5 + EMBLEM_W] = pix
    else:
        raise ValueError(f"unknown object kind {obj.kind!r}")


def render(scene: Scene, cells: list[str] | None = None) -> np.ndarray:
    """Draw a scene to a 140 x 120 uint8 RGB array. ``cells`` overrides each object's cell."""
    img = _background(scene.lighting, scene.style).copy()
    for i, obj in enumerate(scene.objects):
        cell = (cells[i] if cells else None) or obj.cell or "center"
        _paint_object(img, obj, cell)
    if scene.text:
        img[BAND[0] + 1 : BAND[1] - 1, 2 : W - 2] = BANNER_RGB
        ink = text_mask(scene.text, W, BAND[1] - BAND[0])
        band = img[BAND[0] : BAND[1]]
        band[ink] = 0.0
    return np.clip(img, 0, 255).astype(np.uint8)
