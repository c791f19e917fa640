"""Visual experiences: validating them and the experience bank (mining best-vs-worst pairs lives in
:mod:`.mining` and is re-exported here).

**Bank.** Experiences persist as JSONL (``experiences.jsonl``) with a FAISS index of the MiniLM
embeddings of their retrieval keys (``experiences.faiss``). With the default ``key="situation"`` an
experience is indexed by its ``trigger`` (the situation its lesson applies to, entity-free) and a
request by its own situation, read from its text by a describer (:mod:`.situation`), so requests with
the same needs meet; ``key="request"`` indexes the raw text of the source request instead (names
included: an experience then mostly meets requests about the same entities). Retrieval returns the
nearest experience when its cosine similarity reaches the gate (0.90 for situations, the paper's 0.84 for
raw texts: :func:`default_gate`); among experiences at exactly the same similarity, the one with
more evidence wins, then the newest (one rule for the trainer's
teacher, the live probe and the bench). Capacity 500: when full, the bank evicts among its oldest
quarter (at least the two oldest) the experience with the least evidence, then the smallest reward
gap (FIFO + reward-gap eviction).

**Consolidation** (:meth:`ExperienceBank.consolidate`) merges every group of experiences that share a
trigger into one general experience: each slot takes the wording with the most evidence behind it
(ties: the larger summed reward gap, then the newest), so a lesson that contradicts a better-supported
one is dropped and named in the version note; the merged experience keeps the group's evidence and
the folded experiences as provenance (``merged_from``) and is recorded as a new version of the group's
best-supported experience (ties: the oldest, whose id earlier records already name);
:meth:`ExperienceBank.locate` finds a folded experience inside the one that holds it.

Opening a bank only reads. Every create, edit and delete is a
read-modify-write under the bank's file lock (``.bank.lock``): it re-reads the JSONL if another
process (a trainer, the studio) changed it, applies the change and rewrites the JSONL and the index
atomically, so two writers wait for each other and neither loses the other's change. A broken JSONL
line is reported with its file and line number on load and set aside in ``experiences.rejected.jsonl``
by the next write, never silently dropped.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..agent.guides import SLOTS, format_guide
from ..records.schema import Experience, ExperienceVersion, MergedSource, RetrievalKey, atomic_write_text
from .validate import MAX_SLOT_CHARS, ExperienceError, StaleEditError, validate_key, validate_slots  # noqa: F401
from .mining import DELTA_MIN, MAX_PAIRS, Evidence, Pair, evidence, mine_pairs  # noqa: F401  (the bank's public API)

GATE = 0.84  # the paper's gate, for raw request texts
SITUATION_GATE = 0.90  # for situations (see default_gate)
CAPACITY = 500
KEYS = ("situation", "request")  # what retrieval compares: situations (triggers), or raw request texts


def default_gate(key: str) -> float:
    """The retrieval gate of a key. Raw request texts keep the paper's 0.84. Situations are sets of need clauses
    whose cosines sit on another scale (two situations that differ in one need meet at 0.88-0.93): 0.90 is the
    gate calibrated on the evolve split (``benchmarks/experience_transfer.py``: the lowest gate at which 80 % of
    the hits retrieve a guide that makes the request's right decisions), never on the bench."""
    return SITUATION_GATE if key == "situation" else GATE


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def guide_text(exp: Experience) -> str:
    """The experience as the teacher's "Current-Task Decision Guide"."""
    return format_guide(exp.slots)


# ---------------------------------------------------------------------------
# The bank
# ---------------------------------------------------------------------------


class ExperienceBank:
    """Experiences on disk (JSONL + FAISS) behind create / edit / delete / search / retrieve."""

    def __init__(self, root: str | Path, embedder=None, capacity: int = CAPACITY, gate: float | None = None,
                 key: str = "situation", describer=None):
        if key not in KEYS:
            raise ValueError(f"unknown retrieval key {key!r}; keys are {', '.join(KEYS)}")
        self.root = Path(root)
        self.capacity = capacity
        self.gate = default_gate(key) if gate is None else gate
        self.key = key
        self._embedder = embedder
        self._describer = describer
        self._lock = threading.RLock()
        self.items: dict[str, Experience] = {}
        self.load_errors: list[str] = []  # "<file>:<line>: <why>" of each broken line
        self._vecs: dict[str, np.ndarray] = {}
        self.journal = None  # a trainer's :class:`~.journal.Journal`: each change recorded before it is saved
        self._load()

    @property
    def jsonl(self) -> Path:
        return self.root / "experiences.jsonl"

    @property
    def embedder(self):
        if self._embedder is None:
            from ..tools.embed import default_embedder

            self._embedder = default_embedder()
        return self._embedder

    @property
    def describer(self):
        if self._describer is None:
            from .situation import CueDescriber

            self._describer = CueDescriber()
        return self._describer

    def key_text(self, exp: Experience) -> str:
        """What the index embeds for an experience: its trigger (an experience without a key: the situation of
        its source request, read as a new request's would be) or, with ``key="request"``, its source request."""
        if self.key == "request":
            return exp.source_request
        return exp.retrieval_key.trigger if exp.retrieval_key else self.describer.describe(exp.source_request)

    def query_text(self, text: str) -> str:
        """What a request is compared by: its situation (read from its text alone) or its raw text."""
        return self.describer.describe(text) if self.key == "situation" else text

    def _embed(self, text: str) -> np.ndarray:
        """One text's unit vector, cached: encoded alone, a vector never depends on which others were encoded with
        it, so a reloaded bank searches the same."""
        if text not in self._vecs:
            if len(self._vecs) > 10_000:
                self._vecs.clear()
            self._vecs[text] = self.embedder.encode([text])[0]
        return self._vecs[text]

    def _vector(self, key_text: str) -> np.ndarray:
        """A key text's vector: a situation as the mean of its clauses' vectors (:func:`.situation.situation_vector`),
        a raw request as one embedding."""
        if self.key == "situation":
            from .situation import situation_vector

            return situation_vector(key_text, self._embed)
        return self._embed(key_text)

    # -- persistence ------------------------------------------------------------
    def _file_sig(self) -> tuple | None:
        try:
            st = self.jsonl.stat()
            return st.st_size, st.st_mtime_ns
        except OSError:
            return None

    def _load(self) -> None:
        """Read the JSONL (never write it): good lines become items, broken ones are reported and kept aside."""
        self.items, self.load_errors, self._rejected = {}, [], []
        self._sig = self._file_sig()
        if self._sig is None:
            return
        for n, line in enumerate(self.jsonl.read_text("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                exp = Experience.model_validate_json(line)
                exp.slots = validate_slots(exp.slots)
            except ValueError as exc:
                self.load_errors.append(f"{self.jsonl}:{n}: {str(exc).splitlines()[0]}")
                self._rejected.append(line)
                continue
            self.items[exp.id] = exp
        if hasattr(self, "_index") and list(self.items) != self._index_ids:
            del self._index  # rebuilt (in memory) on the next search

    @contextlib.contextmanager
    def _writing(self):
        """A change: under the bank's file lock, on the file's latest contents, saved atomically at the end."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.root / ".bank.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second writer (another process) waits here
            if self._file_sig() != self._sig:
                self._load()  # someone else wrote since we read: change their version, not ours
            before = self._records() if self.journal is not None else None
            yield
            if self.journal is not None:
                from .journal import changes

                rows = changes(before, self._records())
                if rows:
                    self.journal(rows)  # on disk before the bank is: a resume can undo exactly this
            self._save()

    def _records(self) -> list[tuple[str, str]]:
        return [(eid, e.model_dump_json()) for eid, e in self.items.items()]

    def transform(self, fn) -> None:
        """Replace the experiences by ``fn(items)`` (an ordered ``{id: Experience}``), under the lock, on the
        latest contents (how a resume undoes its own cut-short step: :mod:`.journal`)."""
        with self._writing():
            self.items = dict(fn(dict(self.items)))

    def _save(self) -> None:
        if self._rejected:  # broken lines leave the bank once, kept beside it
            with (self.root / "experiences.rejected.jsonl").open("a", encoding="utf-8") as fh:
                fh.writelines(r + "\n" for r in self._rejected)
            self._rejected = []
        atomic_write_text(self.jsonl, "".join(e.model_dump_json() + "\n" for e in self.items.values()))
        self._sig = self._file_sig()
        self._rebuild_index(save=True)

    def _rebuild_index(self, save: bool = False) -> None:
        from ..tools.faiss_store import VectorIndex

        ids = list(self.items)
        texts = [self.key_text(self.items[i]) for i in ids]
        index = VectorIndex(self.embedder.dim, getattr(self.embedder, "name", ""))
        if ids:
            index.add(np.arange(len(ids), dtype=np.int64), np.stack([self._vector(t) for t in texts]))
        if save:
            index.save(self.root / "experiences.faiss")
        self._index, self._index_ids = index, ids

    def _ensure_index(self):
        if self._file_sig() != self._sig:
            self._load()  # another process changed the bank: search its current contents
        if not hasattr(self, "_index"):
            self._rebuild_index()  # in memory: a reader writes nothing
        return self._index, self._index_ids

    # -- changes ---------------------------------------------------------------
    def add(self, source_request_id: str, source_request: str, slots: dict[str, Any], reward_gap: float = 0.0,
            retrieval_key: RetrievalKey | dict | None = None, **provenance: Any) -> Experience:
        clean, key = validate_slots(slots), validate_key(retrieval_key)
        with self._writing():
            eid = "exp-" + hashlib.sha1(f"{source_request_id}|{_now()}|{len(self.items)}|{json.dumps(clean)}".encode()).hexdigest()[:10]
            exp = Experience(id=eid, source_request_id=source_request_id, source_request=source_request, slots=clean,
                             retrieval_key=key, reward_gap=float(reward_gap), created=_now(), **provenance)
            self.items[eid] = exp
            self._evict()
        return exp

    def _evict(self) -> None:
        while len(self.items) > self.capacity:
            oldest = list(self.items.values())[: max(2, len(self.items) // 4)]  # insertion order is age order
            victim = min(oldest, key=lambda e: (e.evidence, e.reward_gap))
            del self.items[victim.id]

    def _new_version(self, exp: Experience, note: str) -> None:
        """Put the experience's current state in its history: the caller then changes it."""
        exp.history.append(ExperienceVersion(version=exp.version, slots=dict(exp.slots), saved=_now(), note=exp.note,
                                             retrieval_key=exp.retrieval_key, evidence=exp.evidence))
        exp.version, exp.note = exp.version + 1, note

    def edit(self, exp_id: str, slots: dict[str, Any], note: str = "", retrieval_key: RetrievalKey | dict | None = None,
             base_version: int | None = None) -> Experience:
        """A new version with these slots (and this retrieval key, when given) and ``note``; the old one goes to
        the history with its own note. A change that leaves everything as it is makes no version. With
        ``base_version`` (the version the editor opened), a save over a newer version is refused
        (:class:`StaleEditError`): optimistic concurrency, so two editors never silently undo each other."""
        def changed(exp) -> tuple[dict, RetrievalKey | None] | None:
            clean = validate_slots({**exp.slots, **slots})
            key = validate_key(retrieval_key) if retrieval_key is not None else exp.retrieval_key
            return None if (clean == exp.slots and key == exp.retrieval_key) else (clean, key)

        with self._lock:
            if self._file_sig() != self._sig:
                self._load()
            if changed(self.get(exp_id)) is None:
                return self.get(exp_id)  # nothing changed: no version, no write
        with self._writing():
            exp = self.get(exp_id)  # the latest version on disk (another writer may have edited it meanwhile)
            new = changed(exp)
            if new is not None and base_version is not None and exp.version != base_version:
                raise StaleEditError(exp, base_version, new[0])
            if new is not None:
                self._new_version(exp, note)
                exp.slots, exp.retrieval_key = new
        return exp

    def restore(self, exp_id: str, version: int, note: str = "") -> Experience:
        """A new version whose slots and retrieval key are those of an earlier ``version`` (the current one goes to
        the history, as with any edit); restoring what is already current changes nothing."""
        def earlier(exp):
            old = next((h for h in exp.history if h.version == version), None)
            if old is None and version != exp.version:
                raise KeyError(f"{exp_id} has no version {version} (versions: "
                               f"{', '.join(str(h.version) for h in exp.history)}, {exp.version} current)")
            same = old is None or (dict(old.slots) == exp.slots and old.retrieval_key == exp.retrieval_key)
            return None if same else old

        with self._lock:
            if self._file_sig() != self._sig:
                self._load()
            if earlier(self.get(exp_id)) is None:
                return self.get(exp_id)
        with self._writing():
            exp = self.get(exp_id)
            old = earlier(exp)
            if old is not None:
                self._new_version(exp, note or f"restored version {version}")
                exp.slots, exp.retrieval_key = dict(old.slots), old.retrieval_key
        return exp

    def consolidate(self, min_group: int = 2) -> list[Experience]:
        """Merge every group of at least ``min_group`` experiences that share a trigger (compared with case and
        spacing ignored) into one general experience; returns the merged experiences (none: nothing changed).

        Per slot the wording with the most evidence wins (ties: the larger summed reward gap, then the newest);
        the others are dropped as contradicted and named in the note. The group's best-supported experience
        (ties: the oldest) carries the result as a new version, with the summed evidence, the largest reward
        gap, and every folded experience in ``merged_from``; the folded ones leave the bank."""
        def groups() -> list[list[Experience]]:
            by_trigger: dict[str, list[Experience]] = {}
            for e in self.items.values():
                if e.retrieval_key is not None:
                    by_trigger.setdefault(" ".join(e.retrieval_key.trigger.lower().split()), []).append(e)
            return [g for g in by_trigger.values() if len(g) >= max(2, min_group)]

        with self._lock:
            if self._file_sig() != self._sig:
                self._load()
            if not groups():
                return []
        merged = []
        with self._writing():
            for group in groups():
                merged.append(self._merge(group))
        return merged

    def _merge(self, group: list[Experience]) -> Experience:
        age = {e.id: i for i, e in enumerate(self.items.values())}
        keep = max(group, key=lambda e: (e.evidence, -age[e.id]))  # ties: the oldest, so that its id stays put
        slots, dropped = {}, []
        for s in SLOTS:
            votes: dict[str, list[float]] = {}
            for e in group:
                v = votes.setdefault(e.slots[s], [0, 0.0, 0])
                v[0] += e.evidence
                v[1] += e.reward_gap
                v[2] = max(v[2], age[e.id])
            ranked = sorted(votes.items(), key=lambda kv: kv[1], reverse=True)
            slots[s] = ranked[0][0]
            dropped += [f"{s} {text!r} (evidence {int(v[0])})" for text, v in ranked[1:]]
        folded = [e for e in group if e is not keep]
        note = (f"consolidated {len(group)} experiences with this trigger (evidence {sum(e.evidence for e in group)})"
                + (f"; dropped as contradicted by better-supported lessons: {'; '.join(dropped)}" if dropped else ""))
        self._new_version(keep, note)
        keep.slots = slots
        keep.merged_from = keep.merged_from + [
            m for e in folded for m in [MergedSource(id=e.id, version=e.version, source_request_id=e.source_request_id,
                                                     source_request=e.source_request, slots=dict(e.slots),
                                                     evidence=e.evidence, reward_gap=e.reward_gap, run_id=e.run_id,
                                                     step=e.step)] + e.merged_from]
        keep.evidence = sum(e.evidence for e in group)
        keep.reward_gap = max(e.reward_gap for e in group)
        for e in folded:
            del self.items[e.id]
        self.items[keep.id] = self.items.pop(keep.id)  # the merged experience is the newest
        return keep

    def delete(self, exp_id: str) -> None:
        with self._writing():
            self.get(exp_id)
            del self.items[exp_id]

    def locate(self, exp_id: str) -> tuple[Experience, MergedSource | None] | None:
        """An experience by id, or the experience a consolidation folded it into with its provenance record
        (a pair's record names the experience it made, which may since have been merged); None when gone."""
        if exp_id in self.items:
            return self.items[exp_id], None
        return next(((e, m) for e in self.items.values() for m in e.merged_from if m.id == exp_id), None)

    def get(self, exp_id: str) -> Experience:
        if exp_id not in self.items:
            raise KeyError(f"no experience {exp_id!r} in {self.root}")
        return self.items[exp_id]

    def __len__(self) -> int:
        return len(self.items)

    # -- queries ---------------------------------------------------------------
    def _ranked(self, texts: Sequence[str]) -> list[list[tuple[float, Experience]]]:
        """Every experience for each request text, nearest first; exact ties: more evidence, then newer, first."""
        index, ids = self._ensure_index()
        if not ids or not texts:
            return [[] for _ in texts]
        scores, rows = index.search(np.stack([self._vector(self.query_text(t)) for t in texts]), len(ids))
        out = []
        for score_row, id_row in zip(scores, rows):
            hits = [(float(s), int(r)) for s, r in zip(score_row, id_row) if r >= 0]
            hits.sort(key=lambda h: (-h[0], -self.items[ids[h[1]]].evidence, -h[1]))
            out.append([(s, self.items[ids[r]]) for s, r in hits])
        return out

    def ranked(self, texts: Sequence[str]) -> list[list[tuple[float, Experience]]]:
        """Every experience for each request text, nearest first (the order :meth:`retrieve` takes the first of)."""
        with self._lock:
            return self._ranked(list(texts))

    def search(self, text: str, k: int = 5) -> list[tuple[float, Experience]]:
        """The ``k`` nearest experiences to a request text, by cosine similarity of the retrieval keys."""
        with self._lock:
            return self._ranked([text])[0][:k]

    def retrieve(self, text: str) -> tuple[Experience | None, float]:
        """The nearest experience if its similarity reaches the gate, and the similarity."""
        hits = self.search(text, 1)
        if not hits:
            return None, 0.0
        score, exp = hits[0]
        return (exp if score >= self.gate else None), score

    def nearest(self, texts: Sequence[str], exclude_sources: Sequence[str | None] | None = None
                ) -> list[tuple[Experience | None, float | None]]:
        """For each text its nearest experience and the cosine similarity, with no gate: callers apply
        their own, so hit rates can be measured at any gate. ``exclude_sources[i]`` leaves out every
        experience mined from that request (leave-own-out: transfer to *other* requests). ``(None, None)``
        when nothing is left to retrieve."""
        exclude_sources = list(exclude_sources) if exclude_sources is not None else [None] * len(texts)
        if len(exclude_sources) != len(texts):
            raise ValueError("exclude_sources needs one entry per text")
        with self._lock:
            # Every experience, ranked: a request may have been mined at several steps or merged into several
            # experiences, and all of them must be skipped before another request's experience is reached.
            out = []
            for ranked, own in zip(self._ranked(list(texts)), exclude_sources):
                hit = next(((s, e) for s, e in ranked if own is None or own not in e.sources()), None)
                out.append((hit[1], hit[0]) if hit else (None, None))
            return out
