"""A trainer's own changes to its bank, so that a resume undoes exactly those and nothing else.

A trainer's bank writes a journal line for every experience a change touches (``bank.journal.jsonl`` in the run
folder): the step, the experience's id, its place in the bank before the change, and its record before and after
(None: absent). The line is on disk (fsynced) before the bank itself is rewritten, so no trainer change reaches the
bank unrecorded. A resume undoes, newest first, the lines of steps after the checkpoint: what a cut-short step
added goes, what it changed or folded away comes back, at its place. Changes made by anyone else (a studio edit,
an experience added by hand, even to an experience the trainer wrote) are never in the journal and are kept; an
experience the cut-short step wrote and someone changed since is kept as they left it, and named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

NAME = "bank.journal.jsonl"


def changes(before: list[tuple[str, str]], after: list[tuple[str, str]]) -> list[dict]:
    """What one write changed: ``before`` and ``after`` are the bank's (id, record JSON) in order."""
    old, new = dict(before), dict(after)
    place = {eid: i for i, (eid, _) in enumerate(before)}
    ids = [eid for eid, _ in before] + [eid for eid, _ in after if eid not in old]
    return [{"id": eid, "place": place.get(eid), "before": old.get(eid), "after": new.get(eid)}
            for eid in ids if old.get(eid) != new.get(eid)]


class Journal:
    """Appends a write's changes for the trainer's current ``step`` (set by the trainer before each step)."""

    def __init__(self, path: str | Path, step: int = 0):
        self.path, self.step = Path(path), step

    def __call__(self, rows: list[dict]) -> None:
        text = "".join(json.dumps({"step": self.step, **r}, ensure_ascii=False) + "\n" for r in rows)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def entries(path: str | Path, after_step: int) -> list[dict]:
    """The journal's lines of steps after ``after_step``; a torn last line (a kill while it was written, so before
    the bank was) is left out."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text("utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) > after_step:
            out.append(row)
    return out


def undo(bank, rows: list[dict]) -> tuple[list[str], list[str]]:
    """Undo ``rows`` (newest first) in ``bank`` (an :class:`~.bank.ExperienceBank` without a journal). Returns the
    ids put back as they were and the ids kept because someone else changed them after the trainer did."""
    from ..records.schema import Experience

    undone, kept = [], []

    def apply(items: dict) -> dict:
        order = list(items.items())
        for row in reversed(rows):
            now = dict(order).get(row["id"])
            now_json = now.model_dump_json() if now is not None else None
            if now_json == row["before"]:
                continue  # the bank never got this change (the kill came between the journal and the bank)
            if now_json != row["after"]:
                kept.append(row["id"])
                continue
            order = [(k, v) for k, v in order if k != row["id"]]
            if row["before"] is not None:
                at = row["place"] if row["place"] is not None else len(order)
                order.insert(min(at, len(order)), (row["id"], Experience.model_validate_json(row["before"])))
            undone.append(row["id"])
        return dict(order)

    if rows:
        bank.transform(apply)
    return sorted(set(undone)), sorted(set(kept))


def forget(path: str | Path, up_to_step: int) -> None:
    """Drop the lines of steps up to ``up_to_step`` (checkpointed: never to be undone)."""
    from ..records.schema import atomic_write_text

    path = Path(path)
    if path.exists():
        rows = entries(path, up_to_step)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def roll_back(out: Path, bank_dir: Path, step: int, log: Callable[[str], None] = print) -> None:
    """Undo what the trainer's steps after ``step`` wrote into the bank at ``bank_dir``, and say what was done."""
    from .bank import ExperienceBank

    rows = entries(out / NAME, step)
    if not rows:
        return
    undone, kept = undo(ExperienceBank(bank_dir), rows) if (bank_dir / "experiences.jsonl").exists() else ([], [])
    forget(out / NAME, 10**9)  # undone (and the rest checkpointed): nothing left to undo on a later resume
    if undone:
        log(f"bank: undid what the cut-short step wrote ({len(undone)} experience(s): {', '.join(undone[:5])}"
            + (" …" if len(undone) > 5 else "") + ")")
    if kept:
        log(f"bank: kept {', '.join(kept)} as another writer left them (changed after the cut-short step wrote them)")
