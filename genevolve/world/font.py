"""A 5x7 bitmap font for the sandbox's text band, and the judge's reader (template-matching OCR).

Text is drawn at a fixed pitch of 6 pixels, centred in the band. Reading finds the inked columns,
snaps to the pitch and matches each 5x7 cell against every glyph; a cell too far from every glyph
reads as '?'.
"""

from __future__ import annotations

import numpy as np

_GLYPHS = {
    "A": ".###.#...##...#######...##...##...#",
    "B": "####.#...#####.#...##...##...#####.",
    "C": ".#####....#....#....#....#.....####",
    "D": "####.#...##...##...##...##...#####.",
    "E": "######....####.#....#....#....#####",
    "F": "######....####.#....#....#....#....",
    "G": ".#####....#....#.####...##...#.####",
    "H": "#...##...#######...##...##...##...#",
    "I": "#####..#....#....#....#....#..#####",
    "J": "..###...#....#....#....#.#..#..##..",
    "K": "#...##..#.###..#.#..#..#.#...##...#",
    "L": "#....#....#....#....#....#....#####",
    "M": "#...###.###.#.##...##...##...##...#",
    "N": "#...###..##.#.##..###...##...##...#",
    "O": ".###.#...##...##...##...##...#.###.",
    "P": "####.#...##...#####.#....#....#....",
    "Q": ".###.#...##...##...##.#.##..#..##.#",
    "R": "####.#...##...#####.#.#..#..#.#...#",
    "S": ".#####....#.....###.....#....#####.",
    "T": "#####..#....#....#....#....#....#..",
    "U": "#...##...##...##...##...##...#.###.",
    "V": "#...##...##...##...#.#.#..#.#...#..",
    "W": "#...##...##...##.#.##.#.###.###...#",
    "X": "#...##...#.#.#...#...#.#.#...##...#",
    "Y": "#...##...#.#.#...#....#....#....#..",
    "Z": "#####....#...#...#...#...#....#####",
    "0": ".###.#...##..###.#.###..##...#.###.",
    "1": "..#...##....#....#....#....#..#####",
    "2": ".###.#...#....#..##..#...#....#####",
    "3": "####.....#....#.###.....#....#####.",
    "4": "...#...##..#.#.#..#.#####...#....#.",
    "5": "######....####.....#....#....#####.",
    "6": ".###.#....#....####.#...##...#.###.",
    "7": "#####....#...#...#...#....#....#...",
    "8": ".###.#...##...#.###.#...##...#.###.",
    "9": ".###.#...##...#.####....#....#.###.",
}
GLYPHS: dict[str, np.ndarray] = {
    ch: np.array([c == "#" for c in s], dtype=bool).reshape(7, 5) for ch, s in _GLYPHS.items()
}
GLYPHS[" "] = np.zeros((7, 5), dtype=bool)
PITCH = 6
_CHARS = list(GLYPHS)
_STACK = np.stack([GLYPHS[c] for c in _CHARS])


def text_mask(text: str, width: int, height: int) -> np.ndarray:
    """Boolean ink mask of ``text`` centred in a ``height`` x ``width`` band."""
    mask = np.zeros((height, width), dtype=bool)
    text = text[: max(0, (width - 2) // PITCH)]
    x0 = (width - len(text) * PITCH + 1) // 2
    y0 = (height - 7) // 2
    for i, ch in enumerate(text):
        glyph = GLYPHS.get(ch)
        if glyph is None:
            continue
        x = x0 + i * PITCH
        mask[y0 : y0 + 7, x : x + 5] |= glyph
    return mask


def read_text(ink: np.ndarray) -> str:
    """Read a band's ink mask back into a string ('' when there is no ink).

    Text is centred at a fixed pitch, so each candidate length L fixes where the glyph cells are;
    the reading is the L whose cells match glyphs best and leave the least ink outside them.
    """
    height, width = ink.shape
    if not ink.any():
        return ""
    y0 = (height - 7) // 2
    band = ink[y0 : y0 + 7]
    stray_rows = int(ink.sum() - band.sum())
    best, best_cost = "", None
    for n in range(1, (width - 2) // PITCH + 1):
        x0 = (width - n * PITCH + 1) // 2
        if x0 < 0:
            break
        cells = np.stack([band[:, x0 + i * PITCH : x0 + i * PITCH + 5] for i in range(n)])  # (n, 7, 5)
        dist = (cells[:, None] ^ _STACK[None]).sum(axis=(2, 3))  # (n, n_glyphs)
        pick = dist.argmin(axis=1)
        inside = sum(int(c.sum()) for c in cells)
        cost = int(dist.min(axis=1).sum()) + (int(band.sum()) - inside) + stray_rows
        if best_cost is None or cost < best_cost:
            chars = [_CHARS[j] if dist[i, j] <= 6 else "?" for i, j in enumerate(pick)]
            best, best_cost = "".join(chars).strip(), cost
    return best
