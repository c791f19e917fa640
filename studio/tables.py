"""Experiences and references as table rows, forms and short texts (pure functions, no gradio)."""

from __future__ import annotations

from typing import Any, Sequence

from genevolve.experience.bank import ExperienceError, validate_slots
from genevolve.agent.guides import SLOT_TITLES, SLOTS
from genevolve.records.schema import Experience

from . import StudioError

EXP_HEADERS = ["id", "similarity", "trigger", "evidence", "source request", "gap", "run", "step", "version"]
EXP_WIDE = {"id": 150, "trigger": 340, "source request": 300, "run": 110}


def column_widths(headers: Sequence[str], wide: dict[str, int] | None = None) -> list[str]:
    """Pixel widths for a table's columns: every header fits on one line (never wrapped letter by letter),
    and the columns named in ``wide`` (free text) get the width given there."""
    wide = wide or {}
    return [f"{max(wide.get(h, 0), 9 * len(h) + 44, 72)}px" for h in headers]


def broken_note(load_errors: Sequence[str], show: int = 3) -> str:
    """The bank's broken lines, by file and line (they are skipped, and set aside by the next change)."""
    if not load_errors:
        return ""
    more = f" and {len(load_errors) - show} more" if len(load_errors) > show else ""
    return (f" · {len(load_errors)} broken line(s) skipped (set aside by the next change): "
            + "; ".join(load_errors[:show]) + more)


def _short(text: str, n: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def trigger_of(e: Experience) -> str:
    """An experience's trigger without its "Situation:" label, or a dash for one made before retrieval keys."""
    if e.retrieval_key is None:
        return "— (no key: its source request's situation is used)"
    t = e.retrieval_key.trigger
    return t.split(":", 1)[1].strip() if t.lower().startswith("situation:") else t


def experience_rows(hits: Sequence[tuple[float | None, Experience]]) -> list[list[Any]]:
    return [[e.id, "" if s is None else round(s, 3), _short(trigger_of(e), 120), e.evidence, _short(e.source_request),
             round(e.reward_gap, 3), e.run_id or "—", e.step, e.version] for s, e in hits]


def filter_experiences(hits: Sequence[tuple[float | None, Experience]], slot_text: str = "", min_gap: float | None = None,
                       run: str = "") -> list[tuple[float | None, Experience]]:
    """Keep experiences whose slots contain ``slot_text``, whose gap reaches ``min_gap`` and whose source run matches."""
    low = (slot_text or "").strip().lower()
    out = []
    for s, e in hits:
        if low and not any(low in v.lower() for v in e.slots.values()):
            continue
        if min_gap is not None and e.reward_gap < min_gap:
            continue
        if run and run != "(any)" and e.run_id != run:
            continue
        out.append((s, e))
    return out


def form_slots(values: Sequence[str]) -> dict[str, str]:
    """The five form boxes as validated slots; the message names the slot and the limit."""
    if len(values) != len(SLOTS):
        raise StudioError(f"expected {len(SLOTS)} slot values")
    try:
        return validate_slots(dict(zip(SLOTS, [v if isinstance(v, str) else "" for v in values])))
    except ExperienceError as exc:
        msg = str(exc)
        for s in SLOTS:
            msg = msg.replace(f"slot {s} ", f"{SLOT_TITLES[s]} ")
        raise StudioError(msg) from None


def _md(text: str) -> str:
    """Model or user text made inert in Markdown: no HTML, no links, no emphasis."""
    import html

    return html.escape(" ".join(str(text).split())).replace("*", "&#42;").replace("_", "&#95;").replace("[", "&#91;") \
        .replace("`", "&#96;")


def provenance_md(e: Experience) -> str:
    lines = [f"**{e.id}** · version {e.version} · created {e.created or '?'} · evidence {e.evidence} "
             f"(mined pair{'s' if e.evidence != 1 else ''} behind it)",
             f"- trigger: {_md(trigger_of(e))}",
             f"- source prompt summary: {_md(e.retrieval_key.source_prompt_summary) if e.retrieval_key else '—'}",
             f"- source request: `{e.source_request_id}` {_md(e.source_request)}",
             f"- reward gap {e.reward_gap:.3f} · run `{e.run_id or '—'}` step {e.step} · summariser `{e.summariser or '—'}`"]
    if e.best_trajectory or e.worst_trajectory:
        lines.append(f"- best `{e.best_trajectory or '—'}` vs worst `{e.worst_trajectory or '—'}`")
    if e.merged_from:
        lines.append(f"- merged from {len(e.merged_from)} experience(s), {len(e.sources())} source request(s):")
        lines += [f"  - `{m.id}` v{m.version} · `{m.source_request_id}` {_md(m.source_request)} · evidence {m.evidence} · "
                  f"gap {m.reward_gap:.3f} · run `{m.run_id or '—'}` step {m.step}" for m in e.merged_from]
    return "\n".join(lines)


HISTORY_HEADERS = ["version", "replaced", "note", "evidence", "trigger"] + [SLOT_TITLES[s] for s in SLOTS]


def history_rows(e: Experience) -> list[list[Any]]:
    def trig(k) -> str:
        return _short(k.trigger, 80) if k is not None else "—"

    rows = [[h.version, h.saved, h.note, h.evidence, trig(h.retrieval_key)] + [_short(h.slots.get(s, ""), 80) for s in SLOTS]
            for h in reversed(e.history)]
    return [[e.version, "(current)", e.note, e.evidence, trig(e.retrieval_key)] + [_short(e.slots[s], 80) for s in SLOTS]] + rows


RETRIEVAL_HEADERS = ["similarity", "request", "text", "gets"]


def retrieval_rows(rows: Sequence[tuple[float, Any, str]]) -> list[list[Any]]:
    """(similarity, request, what it gets) as table rows."""
    return [[round(s, 3), r.id, _short(r.text, 120), why] for s, r, why in rows]


REF_HEADERS = ["id", "caption", "entity", "variant"]


def ref_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[r["id"], r.get("title", ""), r.get("entity", ""), r.get("variant", "")] for r in rows]


def gallery_items(hits: Sequence[tuple[float, dict[str, Any]]]) -> list[tuple[str, str]]:
    """(image path, caption) pairs for a gallery: id, similarity and caption."""
    return [(str(r["local_path"]), f"{r['id']} · {s:.2f} · {r.get('title', '')}") for s, r in hits]


def _fields(slots: dict[str, str], key, evidence: int) -> list[tuple[str, str]]:
    return ([(SLOT_TITLES[s], slots.get(s, "")) for s in SLOTS]
            + [("Trigger", key.trigger if key is not None else "—"),
               ("Source prompt summary", key.source_prompt_summary if key is not None else "—"),
               ("Evidence", str(evidence))])


def _side_by_side(title_a: str, title_b: str, a: list[tuple[str, str]], b: list[tuple[str, str]]) -> str:
    """Two records field by field, words that differ marked (green: only in the left one, red: only in the right)."""
    from .html import word_diff, esc

    rows = []
    for (name, x), (_, y) in zip(a, b):
        if x == y:
            rows.append(f'<tr class="same"><td>{esc(name)}</td><td>{esc(x)}</td><td>{esc(y)}</td></tr>')
        else:
            dx, dy = word_diff(x, y)
            rows.append(f'<tr class="differ"><td>{esc(name)}</td><td>{dx}</td><td>{dy}</td></tr>')
    changed = sum(1 for (_, x), (_, y) in zip(a, b) if x != y)
    return (f'<div class="ge-diff"><p>{changed} of {len(a)} fields differ.</p><table><tr><th>field</th>'
            f'<th>{esc(title_a)}</th><th>{esc(title_b)}</th></tr>{"".join(rows)}</table></div>')


def version_diff_html(e: Experience, version: int) -> str:
    """An earlier version of an experience next to the current one, slot by slot (and its key and evidence)."""
    old = next((h for h in e.history if h.version == version), None)
    if old is None:
        raise StudioError(f"{e.id} has no earlier version {version} (the current one is {e.version})")
    return _side_by_side(f"version {version} ({old.note or 'no note'})", f"version {e.version}, current",
                         _fields(old.slots, old.retrieval_key, old.evidence), _fields(e.slots, e.retrieval_key, e.evidence))


def compare_experiences_html(a: Experience, b: Experience) -> str:
    """Two experiences side by side, slot by slot."""
    return _side_by_side(f"{a.id} (from {a.source_request_id})", f"{b.id} (from {b.source_request_id})",
                         _fields(a.slots, a.retrieval_key, a.evidence), _fields(b.slots, b.retrieval_key, b.evidence))


def conflict_html(current: Experience, mine: dict[str, str]) -> str:
    """A refused save: the version someone else saved next to the slots the user tried to save."""
    return _side_by_side(f"version {current.version}, saved by someone else ({current.note or 'no note'})",
                         "yours, not saved", _fields(current.slots, current.retrieval_key, current.evidence),
                         _fields(mine, current.retrieval_key, current.evidence))
