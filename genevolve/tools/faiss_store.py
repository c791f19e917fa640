"""A small cosine index with stable int64 ids, saved atomically with a sidecar.

``IndexIDMap2`` over ``IndexFlatIP`` lets callers add and remove entries by
their own ids (the experience bank evicts, the reference editor edits), and the
flat index is exact, which at our sizes (hundreds to a few thousand rows) costs
nothing. The JSON sidecar records which embedder made the vectors, how many
there are, and the index file's size and SHA-256, so a loader can tell a stale
index from a current one without reading it, and a damaged file (cut short,
overwritten) from a whole one. A damaged index is never current: the stores
rebuild it from their rows, and :meth:`VectorIndex.load` refuses it by name.
An older sidecar without a checksum is checked by the vector count it states.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..records.schema import atomic_write_bytes


def meta_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.meta.json")


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of the index at ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(meta_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


UNREADABLE = "FAISS cannot read it: cut short or garbled"


class IndexDamagedError(ValueError):
    """An index file that does not match its sidecar, or that FAISS cannot read."""


def damage(path: str | os.PathLike, meta: dict[str, Any]) -> str | None:
    """How the index file at ``path`` differs from what its sidecar ``meta`` says (None: it matches)."""
    import faiss

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if "bytes" in meta and len(data) != meta["bytes"]:
        return f"{len(data)} bytes, its sidecar says {meta['bytes']}"
    if "sha256" in meta:
        return None if hashlib.sha256(data).hexdigest() == meta["sha256"] else "its SHA-256 differs from its sidecar's"
    try:  # an older sidecar: the file must at least load and hold the vectors it counts
        n = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)).ntotal
    except RuntimeError:
        return UNREADABLE
    return None if n == meta.get("count") else f"{n} vectors, its sidecar says {meta.get('count')}"


def is_current(
    path: str | os.PathLike, embedder: str, dim: int, count: int, fingerprint: str | None = None
) -> bool:
    """True when the index at ``path`` exists and was built by this embedder over ``count`` rows.

    ``fingerprint`` (a hash of the embedded texts) also catches edits that keep
    the row count; it is only compared when the caller gives one. A file that does
    not match its sidecar (:func:`damage`) is not current, with a warning.
    """
    meta = read_meta(path)
    fits = (
        Path(path).exists()
        and meta is not None
        and meta.get("embedder") == embedder
        and meta.get("dim") == dim
        and meta.get("count") == count
        and (fingerprint is None or meta.get("fingerprint") == fingerprint)
    )
    if not fits:
        return False
    problem = damage(path, meta)
    if problem is not None:  # said once here, so that a rebuilt index never passes unnoticed
        warnings.warn(f"{path} is damaged ({problem}): it is rebuilt from its rows", stacklevel=2)
    return problem is None


class VectorIndex:
    """Inner-product search over L2-normalised float32 rows, keyed by int64 ids."""

    def __init__(self, dim: int, embedder: str = "", fingerprint: str = "", _index: Any = None):
        import faiss

        self.dim = int(dim)
        self.embedder = embedder
        self.fingerprint = fingerprint
        self._index = _index if _index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._lock = threading.RLock()

    def _rows(self, vectors: Any) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (N, {self.dim}), got {x.shape}")
        return x

    @staticmethod
    def _ids(ids: Any) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))

    def add(self, ids: Any, vectors: Any) -> None:
        """Add rows; an id already present is replaced (IDMap2 would otherwise keep both)."""
        i = self._ids(ids)
        if not len(i):
            return
        x = self._rows(vectors)
        if len(i) != len(x):
            raise ValueError(f"{len(i)} ids for {len(x)} vectors")
        if len(set(i.tolist())) != len(i):
            raise ValueError("duplicate ids in one add")
        with self._lock:
            if self._index.ntotal:
                self.remove(i)
            self._index.add_with_ids(x, i)

    def remove(self, ids: Any) -> int:
        """Remove these ids (absent ones are ignored); return how many rows went."""
        import faiss

        i = self._ids(ids)
        if not len(i):
            return 0
        with self._lock:
            return int(self._index.remove_ids(faiss.IDSelectorBatch(i)))

    def search(self, vectors: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids), each (N, k); slots beyond the index size hold id -1 and score -inf."""
        x = self._rows(vectors)
        if k <= 0:
            return np.zeros((len(x), 0), np.float32), np.zeros((len(x), 0), np.int64)
        with self._lock:
            scores, ids = self._index.search(x, int(k))
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)

    def reconstruct(self, ids: Any) -> np.ndarray:
        """The stored vectors of these ids, (N, dim) (the reference editor shifts rows with them)."""
        i = self._ids(ids)
        with self._lock:
            return np.stack([self._index.reconstruct(int(x)) for x in i]) if len(i) else np.zeros((0, self.dim), np.float32)

    def ids(self) -> np.ndarray:
        import faiss

        with self._lock:
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __contains__(self, id_: int) -> bool:
        return int(id_) in set(self.ids().tolist())

    def save(self, path: str | os.PathLike) -> None:
        """Write the index, then its sidecar, each atomically (a crash leaves a stale, never a torn, index)."""
        import faiss

        path = Path(path)
        with self._lock:
            data = faiss.serialize_index(self._index).tobytes()
            meta: dict[str, Any] = {"embedder": self.embedder, "dim": self.dim, "count": len(self)}
            if self.fingerprint:
                meta["fingerprint"] = self.fingerprint
            meta |= {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write_bytes(path, data)
        atomic_write_bytes(meta_path(path), (json.dumps(meta, indent=2) + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VectorIndex":
        import faiss

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no index at {path}")
        meta = read_meta(path) or {}
        problem = damage(path, meta) if meta else None
        fix = f"delete it and its sidecar {meta_path(path).name} to rebuild it from its rows"
        if problem is not None:
            raise IndexDamagedError(f"{path} is damaged ({problem}): {fix}")
        try:
            index = faiss.deserialize_index(np.frombuffer(path.read_bytes(), dtype=np.uint8))
        except RuntimeError:
            raise IndexDamagedError(f"{path} is damaged ({UNREADABLE}): {fix}") from None
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"{path} holds a {type(index).__name__}, expected IndexIDMap2")
        return cls(
            index.d,
            embedder=str(meta.get("embedder", "")),
            fingerprint=str(meta.get("fingerprint", "")),
            _index=index,
        )
