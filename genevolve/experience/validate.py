"""Validating experiences: five plain-text slots and a retrieval key (re-exported by :mod:`.bank`)."""

from __future__ import annotations

from typing import Any

from ..agent.guides import SLOTS
from ..records.schema import Experience, RetrievalKey

MAX_SLOT_CHARS = 400


class ExperienceError(ValueError):
    """An experience that does not fit the schema (empty or over-long slots, unknown slots)."""


class StaleEditError(ExperienceError):
    """A save made on a version that someone else has replaced since: refused, nothing written (a lost update
    otherwise). ``current`` is the experience as it is now, ``mine`` the slots the refused save would have set."""

    def __init__(self, current: Experience, base_version: int, mine: dict[str, str]):
        self.current, self.base_version, self.mine = current, base_version, mine
        differ = [s for s in SLOTS if mine.get(s) != current.slots.get(s)]
        super().__init__(f"{current.id} was saved as version {current.version} by someone else after you opened version "
                         f"{base_version}: your change was not saved. Reopen it to see theirs, then make yours again"
                         + (f" (slots where yours differ: {', '.join(differ)})" if differ else ""))


def _plain(name: str, text: str) -> str:
    """``text`` without control or format characters (NUL, ESC, a right-to-left override...), else refused: they
    would reach the guides that servers refuse."""
    import unicodedata

    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cf")), None)
    if bad is not None:
        raise ExperienceError(f"{name} contains the control character U+{ord(bad):04X}: remove it (plain text only)")
    return text


def validate_slots(slots: dict[str, Any]) -> dict[str, str]:
    if not isinstance(slots, dict):
        raise ExperienceError("slots must be an object with the five slot names")
    unknown = sorted(set(slots) - set(SLOTS))
    if unknown:
        raise ExperienceError(f"unknown slots {unknown}; slots are {', '.join(SLOTS)}")
    out = {}
    for s in SLOTS:
        v = slots.get(s, "")
        if not isinstance(v, str):
            raise ExperienceError(f"slot {s} must be text")
        v = _plain(f"slot {s}", " ".join(v.split()))
        if not v:
            raise ExperienceError(f"slot {s} is empty")
        if len(v) > MAX_SLOT_CHARS:
            raise ExperienceError(f"slot {s} has {len(v)} characters (at most {MAX_SLOT_CHARS})")
        out[s] = v
    return out


def validate_key(key: RetrievalKey | dict | None) -> RetrievalKey | None:
    """A retrieval key with its texts on one line: a non-empty trigger, both at most MAX_SLOT_CHARS."""
    if key is None:
        return None
    if isinstance(key, dict):
        try:
            key = RetrievalKey(**key)
        except ValueError as exc:
            raise ExperienceError(f"retrieval key: {str(exc).splitlines()[0]}") from None
    trigger, summary = " ".join(key.trigger.split()), " ".join(key.source_prompt_summary.split())
    if not trigger:
        raise ExperienceError("the retrieval key's trigger is empty")
    for name, v in (("trigger", trigger), ("source_prompt_summary", summary)):
        _plain(f"the retrieval key's {name}", v)
        if len(v) > MAX_SLOT_CHARS:
            raise ExperienceError(f"the retrieval key's {name} has {len(v)} characters (at most {MAX_SLOT_CHARS})")
    return RetrievalKey(trigger=trigger, source_prompt_summary=summary)
