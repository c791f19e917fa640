"""Offline search backends over a store folder (the sandbox corpus and reference images).

Layout of a store::

    corpus.jsonl        {"id", "title", "url", "text"} per line
    refs.jsonl          {"id", "title", "file", "entity", "variant"} per line; file relative to the store
    refs/<id>.png
    index/corpus.faiss  embedding of title + ". " + text, row i under id i
    index/refs.faiss    embedding of title, row i under id i

Indexes are a cache: when one is missing or its sidecar says it was built by
another embedder or over other rows, it is rebuilt and saved again, so editing
the JSONL files is always enough.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .embed import Embedder, default_embedder
from .base import EMPTY_QUERIES, ImageHit, format_text_results, join_blocks
from ..records.paths import index_cache, is_shipped
from .faiss_store import VectorIndex, is_current

SNIPPET_CHARS = 300
QUERY_CACHE_SIZE = 4096


def read_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; a broken line raises ``ValueError`` naming file and line."""
    if not path.exists():
        raise FileNotFoundError(f"missing store file: {path}")
    rows = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            rows.append(row)
    return rows


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """At most ``limit`` characters, cut at a word boundary when there is one."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[: limit + 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > 0 else text[:limit]).rstrip()


def _corpus_text(row: dict[str, Any]) -> str:
    return f"{row.get('title', '')}. {row.get('text', '')}"


def ref_text(row: dict[str, Any]) -> str:
    return str(row.get("title", ""))


def texts_fingerprint(texts: list[str]) -> str:
    h = hashlib.sha1()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def build_index(texts: list[str], embedder: Embedder) -> VectorIndex:
    index = VectorIndex(embedder.dim, embedder=embedder.name, fingerprint=texts_fingerprint(texts))
    if texts:
        index.add(np.arange(len(texts), dtype=np.int64), embedder.encode(texts))
    return index


class _Store:
    """One JSONL file plus its index, loaded on first use and rebuilt when stale."""

    def __init__(
        self,
        store_dir: str | os.PathLike,
        jsonl: str,
        index_name: str,
        required: tuple[str, ...],
        text_of: Callable[[dict[str, Any]], str],
        embedder: Embedder | None,
    ):
        self.store_dir = Path(store_dir)
        self.jsonl_path = self.store_dir / jsonl
        self.index_path = self.store_dir / "index" / index_name
        self._required = required
        self._text_of = text_of
        self._embedder = embedder
        self._rows: list[dict[str, Any]] | None = None
        self._index: VectorIndex | None = None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = default_embedder()
        return self._embedder

    def reload(self) -> None:
        """Forget loaded rows and index so the next search re-reads the store (after an edit)."""
        with self._lock:
            self._rows, self._index = None, None

    def _ensure(self) -> tuple[list[dict[str, Any]], VectorIndex]:
        with self._lock:
            if self._rows is None or self._index is None:
                if not self.store_dir.is_dir():
                    raise FileNotFoundError(f"store folder not found: {self.store_dir}")
                rows = read_rows(self.jsonl_path, self._required)
                texts = [self._text_of(r) for r in rows]
                emb, fp = self.embedder, texts_fingerprint(texts)
                # A shipped store is never written: an index rebuilt for it (another embedder) goes to the data folder.
                save_to = index_cache(self.index_path) if is_shipped(self.store_dir) else self.index_path
                found = next((p for p in (self.index_path, save_to) if is_current(p, emb.name, emb.dim, len(rows), fp)), None)
                if found is not None:
                    index = VectorIndex.load(found)
                else:
                    index = build_index(texts, emb)
                    try:
                        save_to.parent.mkdir(parents=True, exist_ok=True)
                        index.save(save_to)
                    except OSError as exc:  # a read-only store still works, it just rebuilds next time
                        warnings.warn(f"could not save {save_to}: {exc}", stacklevel=3)
                self._rows, self._index = rows, index
            return self._rows, self._index

    def _embed(self, queries: list[str]) -> np.ndarray:
        """Embed in one batch, skipping queries seen recently (agents repeat themselves a lot)."""
        emb = self.embedder
        with self._lock:
            todo = [q for q in dict.fromkeys(queries) if q not in self._cache]
            if todo:
                for q, v in zip(todo, emb.encode(todo)):
                    self._cache[q] = v
            out = []
            for q in queries:
                self._cache.move_to_end(q)
                out.append(self._cache[q])
            while len(self._cache) > QUERY_CACHE_SIZE:
                self._cache.popitem(last=False)
        return np.stack(out).astype(np.float32) if out else np.zeros((0, emb.dim), np.float32)

    def nearest(self, queries: list[str], top_k: int) -> list[list[tuple[float, dict[str, Any]]]]:
        rows, index = self._ensure()
        k = min(int(top_k), len(rows))
        if not queries:
            return []
        if k <= 0:
            return [[] for _ in queries]
        scores, ids = index.search(self._embed(queries), k)
        return [
            [(float(s), rows[i]) for s, i in zip(srow, irow) if 0 <= i < len(rows)]
            for srow, irow in zip(scores, ids)
        ]


def _clean_queries(queries: list[str] | str) -> list[str]:
    if isinstance(queries, str):  # policies often pass one string where a list was asked for
        queries = [queries]
    return [str(q).strip() for q in queries if q is not None and str(q).strip()]


class LocalTextSearch:
    """``search`` over ``corpus.jsonl`` by cosine similarity."""

    def __init__(self, store_dir: str | os.PathLike, embedder: Embedder | None = None):
        self._store = _Store(store_dir, "corpus.jsonl", "corpus.faiss", ("id", "title", "text"), _corpus_text, embedder)

    def reload(self) -> None:
        self._store.reload()

    def search_records(self, query: str, top_k: int = 5) -> list[tuple[float, dict[str, Any]]]:
        found = self._store.nearest(_clean_queries([query]), top_k)
        return found[0] if found else []

    def search(self, queries: list[str], top_k: int = 5) -> str:
        if not queries:
            return EMPTY_QUERIES
        cleaned = _clean_queries(queries)
        blocks = []
        for q, hits in zip(cleaned, self._store.nearest(cleaned, top_k)):
            items = [
                {"title": r.get("title", ""), "url": r.get("url", ""), "snippet": snippet(r.get("text", ""))}
                for _, r in hits
            ]
            blocks.append(format_text_results(q, items, top_k))
        return join_blocks(blocks)


class LocalImageSearch:
    """``image_search`` over ``refs.jsonl`` by cosine similarity of titles."""

    def __init__(self, store_dir: str | os.PathLike, embedder: Embedder | None = None):
        self._store = _Store(store_dir, "refs.jsonl", "refs.faiss", ("id", "title", "file"), ref_text, embedder)

    def reload(self) -> None:
        self._store.reload()

    def _path(self, row: dict[str, Any]) -> Path:
        return (self._store.store_dir / row["file"]).resolve()

    def search_records(self, query: str, top_k: int = 5) -> list[tuple[float, dict[str, Any]]]:
        """Nearest references, each row extended with its absolute ``local_path``."""
        found = self._store.nearest(_clean_queries([query]), top_k)
        return [(s, {**r, "local_path": str(self._path(r))}) for s, r in (found[0] if found else [])]

    def image_search(self, query: str, top_k: int = 5) -> list[ImageHit]:
        hits = []
        for _, row in self.search_records(query, top_k):
            if not Path(row["local_path"]).exists():  # the agent can only use what it can open
                continue
            hits.append(
                ImageHit(
                    title=str(row["title"]),
                    url=f"sandbox://refs/{row['id']}.png",
                    local_path=row["local_path"],
                    source_id=str(row["id"]),
                )
            )
        return hits


def build_indexes(store_dir: str | os.PathLike, embedder: Embedder) -> None:
    """Embed ``corpus.jsonl`` and ``refs.jsonl`` and write both indexes with their sidecars."""
    store_dir = Path(store_dir)
    if not store_dir.is_dir():
        raise FileNotFoundError(f"store folder not found: {store_dir}")
    for jsonl, name, required, text_of in (
        ("corpus.jsonl", "corpus.faiss", ("id", "title", "text"), _corpus_text),
        ("refs.jsonl", "refs.faiss", ("id", "title", "file"), ref_text),
    ):
        rows = read_rows(store_dir / jsonl, required)
        build_index([text_of(r) for r in rows], embedder).save(store_dir / "index" / name)
