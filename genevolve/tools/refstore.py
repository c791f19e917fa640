"""The reference store as an editable collection: browse, search, add, re-caption and remove images.

The store is the folder :class:`~genevolve.tools.local.LocalImageSearch` searches (``refs.jsonl``,
``refs/<id>.png``, ``index/refs.faiss``). Every change rewrites ``refs.jsonl`` atomically and updates
the FAISS index in place (row i keeps id i, as the search backend expects) together with its sidecar
fingerprint of the captions, so rows and index agree. A crash between the two writes leaves an index
whose fingerprint no longer matches the rows, which the search backend rebuilds on its next load.

Uploads are checked before anything is written: the bytes must decode as a PNG, JPEG, GIF or WebP
image of at most :data:`MAX_BYTES` bytes, :data:`MAX_SIDE` pixels a side and :data:`MAX_PIXELS` in
area. The image is re-encoded as PNG under a new id (``u0001``, ``u0002``, ...); the uploaded file
name is never used as a path, only kept (sanitised) as metadata.
"""

from __future__ import annotations

import io
import json
import re
import threading
import warnings
from pathlib import Path
from typing import Any

from ..records.schema import atomic_write_bytes, atomic_write_text
from .faiss_store import VectorIndex, is_current
from .local import LocalImageSearch, build_index, texts_fingerprint, ref_text, read_rows

MAX_BYTES = 8 * 1024 * 1024
MAX_SIDE = 4096
MAX_PIXELS = 16_000_000
MAX_CAPTION = 200
FORMATS = ("PNG", "JPEG", "GIF", "WEBP")
REQUIRED = ("id", "title", "file")


class RefStoreError(ValueError):
    """A change the store refuses (not an image, too large, empty caption, unknown id, ...)."""


def clean_caption(text: Any) -> str:
    """One line of at most MAX_CAPTION characters; whitespace collapsed, control characters dropped."""
    if not isinstance(text, str):
        raise RefStoreError("the caption must be text")
    text = " ".join("".join(c for c in text if c.isprintable() or c.isspace()).split())
    if not text:
        raise RefStoreError("the caption is empty: describe the image in a few words (it is what search matches)")
    if len(text) > MAX_CAPTION:
        raise RefStoreError(f"the caption has {len(text)} characters (at most {MAX_CAPTION})")
    return text


def safe_name(filename: Any) -> str:
    """The last path component of an uploaded name with only [A-Za-z0-9._-] kept (metadata only, never a path)."""
    base = re.split(r"[\\/]", str(filename or ""))[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")
    return base[:80] or "upload"


def check_image(data: bytes):
    """Decode upload bytes into an RGB PIL image, or raise :class:`RefStoreError` saying what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise RefStoreError("the upload is empty")
    if len(data) > MAX_BYTES:
        raise RefStoreError(f"the file has {len(data) / 1e6:.1f} MB; images of at most {MAX_BYTES // (1024 * 1024)} MB are accepted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            if fmt not in FORMATS:
                raise RefStoreError(f"{fmt or 'this'} files are not accepted; upload a {', '.join(FORMATS)} image")
            w, h = im.size
            if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
                raise RefStoreError(f"the image is {w}x{h} pixels; at most {MAX_SIDE} a side and {MAX_PIXELS // 1_000_000} megapixels")
            im.load()
    except RefStoreError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise RefStoreError(f"not a readable image ({type(exc).__name__}); upload a {', '.join(FORMATS)} file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise RefStoreError(f"the image could not be decoded: {exc}") from exc
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        back = Image.new("RGB", im.size, "white")
        back.paste(im, mask=im.getchannel("A"))
        return back
    return im.convert("RGB")


class ReferenceStore:
    """Rows of ``refs.jsonl`` and their images, with searches and edits that keep the index consistent."""

    def __init__(self, root: str | Path, embedder=None):
        self.root = Path(root)
        self._embedder = embedder
        self._lock = threading.RLock()
        self.search_backend = LocalImageSearch(self.root, embedder)

    @property
    def jsonl(self) -> Path:
        return self.root / "refs.jsonl"

    @property
    def index_path(self) -> Path:
        return self.root / "index" / "refs.faiss"

    @property
    def embedder(self):
        if self._embedder is None:
            from .embed import default_embedder

            self._embedder = default_embedder()
        return self._embedder

    # -- reading -------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        return read_rows(self.jsonl, REQUIRED)

    def get(self, ref_id: str) -> dict[str, Any]:
        for row in self.rows():
            if row["id"] == ref_id:
                return row
        raise RefStoreError(f"no reference {ref_id!r} in {self.root}")

    def path(self, row: dict[str, Any]) -> Path:
        """The image file of a row, refusing files outside the store (a hand-edited row could point anywhere)."""
        p = (self.root / row["file"]).resolve()
        if self.root.resolve() not in p.parents:
            raise RefStoreError(f"reference {row['id']} points outside the store: {row['file']}")
        return p

    def search(self, query: str, k: int = 8) -> list[tuple[float, dict[str, Any]]]:
        """Nearest references to a text query by caption embedding (the agent's image_search ranking)."""
        if not str(query).strip():
            return []
        with self._lock:
            return self.search_backend.search_records(query, k)

    def browse(self, text: str = "", offset: int = 0, limit: int = 50) -> tuple[list[dict[str, Any]], int]:
        """Rows whose id, caption, entity or variant contains ``text`` (case-insensitive), a page of them and the total."""
        low = text.strip().lower()
        rows = [r for r in self.rows() if not low or any(low in str(r.get(f, "")).lower() for f in ("id", "title", "entity", "variant"))]
        return rows[offset : offset + limit], len(rows)

    # -- changes -------------------------------------------------------------
    def add(self, data: bytes, caption: str, filename: str = "") -> dict[str, Any]:
        """Validate and store an uploaded image with its caption; returns the new row."""
        from ..records.schema import ImageStore

        caption = clean_caption(caption)
        image = check_image(data)
        with self._lock:
            rows = self.rows()
            n = 1 + max([int(r["id"][1:]) for r in rows if re.fullmatch(r"u\d+", str(r["id"]))] or [0])
            rid = f"u{n:04d}"
            row = {"id": rid, "title": caption, "file": f"refs/{rid}.png", "entity": "", "variant": "upload",
                   "source_name": safe_name(filename)}
            atomic_write_bytes(self.root / row["file"], ImageStore.encode(image))
            self._commit(rows, rows + [row], ("add", len(rows), caption))
            return row

    def set_caption(self, ref_id: str, caption: str) -> dict[str, Any]:
        caption = clean_caption(caption)
        with self._lock:
            rows = self.rows()
            i = self._position(rows, ref_id)
            new = [dict(r) for r in rows]
            new[i]["title"] = caption
            self._commit(rows, new, ("caption", i, caption))
            return new[i]

    def remove(self, ref_id: str) -> None:
        with self._lock:
            rows = self.rows()
            i = self._position(rows, ref_id)
            path = self.path(rows[i])
            self._commit(rows, rows[:i] + rows[i + 1 :], ("remove", i, ""))
            path.unlink(missing_ok=True)  # after the rows stop naming it: a crash leaves an orphan file, never a dangling row

    @staticmethod
    def _position(rows: list[dict[str, Any]], ref_id: str) -> int:
        for i, r in enumerate(rows):
            if r["id"] == ref_id:
                return i
        raise RefStoreError(f"no reference {ref_id!r}")

    def _commit(self, before: list[dict[str, Any]], after: list[dict[str, Any]], change: tuple[str, int, str]) -> None:
        """Write the rows, then the index updated in place (rebuilt whole when it was stale anyway)."""
        emb = self.embedder
        old_texts = [ref_text(r) for r in before]
        new_texts = [ref_text(r) for r in after]
        kind, i, caption = change
        if is_current(self.index_path, emb.name, emb.dim, len(before), texts_fingerprint(old_texts)):
            index = VectorIndex.load(self.index_path)
            n = len(before)
            if kind in ("add", "caption"):
                index.add([i], emb.encode([caption]))
            else:  # remove row i: rows after it move up one id
                moved = index.reconstruct(range(i + 1, n))
                index.remove(range(i, n))
                index.add(range(i, n - 1), moved)
            index.fingerprint = texts_fingerprint(new_texts)
        else:
            index = build_index(new_texts, emb)
        atomic_write_text(self.jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in after))
        index.save(self.index_path)
        self.search_backend.reload()
