"""Experiences: the bank searched, filtered and edited slot by slot, with a student-vs-teacher try of a guide."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..services import Services
from genevolve.agent.guides import SLOT_TITLES, SLOTS

from ..html import columns_html, message
from ..services import EXPERT_NOISY, STUDIO_BANK
from ..tables import (EXP_HEADERS, EXP_WIDE, HISTORY_HEADERS, RETRIEVAL_HEADERS, broken_note, column_widths,
                      compare_experiences_html, conflict_html, experience_rows, filter_experiences, form_slots, history_rows, provenance_md,
                      retrieval_rows, version_diff_html)
from . import Link, Refresh, StudioError, opt_number, pick, safe


def _layout(s: Services) -> SimpleNamespace:
    """The bank picker, search and filters, the table, the slot editor and the try-the-guide panel."""
    gr.Markdown("The experience bank: search it by request (FAISS: a request's situation, read from its text, against each "
                "experience's trigger), filter, open one to edit its five slots and its retrieval key. **Consolidate** merges "
                "the experiences that share a trigger into one general experience (a new version, with the merged ones as "
                "its provenance). Every change is saved through the library and is retrievable at once.")
    with gr.Row():
        bank_dd = gr.Dropdown(s.bank_choices(), value=STUDIO_BANK, label="Bank", scale=3, elem_id="exp-bank")
        refresh = gr.Button("Refresh banks", size="sm")
    with gr.Row():
        query = gr.Textbox(label="Semantic search: a request", scale=3, elem_id="exp-query")
        slot_filter = gr.Textbox(label="Slot text contains", scale=2, elem_id="exp-filter")
        min_gap = gr.Textbox("", placeholder="any", label="Min reward gap", elem_id="exp-gap")
        run_filter = gr.Dropdown(["(any)"], value="(any)", label="Source run", elem_id="exp-run")
        search_btn = gr.Button("Search", variant="primary", elem_id="exp-search")
        consolidate_btn = gr.Button("Consolidate", elem_id="exp-consolidate")
    table = gr.Dataframe(headers=EXP_HEADERS, interactive=False, wrap=True, max_height=320, elem_id="exp-table",
                         column_widths=column_widths(EXP_HEADERS, EXP_WIDE))
    status = gr.HTML(elem_id="exp-status")
    with gr.Row():
        exp_id = gr.Dropdown([], value=None, label="Experience", allow_custom_value=True, scale=3, elem_id="exp-id")
        # The version the form was opened on: a save over a newer one (another tab, another user) is refused.
        opened = gr.Number(None, precision=0, visible="hidden", elem_id="exp-opened-version")
        open_btn = gr.Button("Open", elem_id="exp-open")
    with gr.Row():
        with gr.Column(scale=3):
            source = gr.Textbox(label="Source request (for a new experience: a request id or text)", elem_id="exp-source")
            boxes = [gr.Textbox(label=SLOT_TITLES[sl], lines=2, elem_id=f"exp-slot-{sl}") for sl in SLOTS]
            with gr.Row():
                trigger = gr.Textbox(label="Retrieval key: trigger (the situation it applies to, no entity names)", lines=2,
                                     scale=3, elem_id="exp-trigger")
                summary = gr.Textbox(label="Retrieval key: source prompt summary", lines=2, scale=2, elem_id="exp-summary")
            note = gr.Textbox(label="Edit note (kept in the version history)", elem_id="exp-note")
            with gr.Row():
                save_btn = gr.Button("Save", variant="primary", elem_id="exp-save")
                create_btn = gr.Button("Create new", elem_id="exp-create")
                confirm = gr.Checkbox(False, label="Yes, delete it", elem_id="exp-confirm")
                delete_btn = gr.Button("Delete", variant="stop", elem_id="exp-delete")
        with gr.Column(scale=2):
            prov = gr.Markdown(elem_id="exp-provenance")
            history = gr.Dataframe(headers=HISTORY_HEADERS, interactive=False, wrap=True, max_height=240,
                                   label="Versions (click one: its differences from the current version)",
                                   column_widths=column_widths(HISTORY_HEADERS, {h: 220 for h in HISTORY_HEADERS[2:]}),
                                   elem_id="exp-history")
            with gr.Row():
                version = gr.Dropdown([], value=None, label="Earlier version", elem_id="exp-version")
                version_diff_btn = gr.Button("Diff with current", elem_id="exp-version-diff-btn")
                restore_btn = gr.Button("Restore it", elem_id="exp-restore")
            version_diff = gr.HTML(elem_id="exp-version-diff")
            retrieving = gr.Dataframe(headers=RETRIEVAL_HEADERS, interactive=False, wrap=True, max_height=280,
                                      column_widths=column_widths(RETRIEVAL_HEADERS, {"request": 110, "text": 260, "gets": 220}),
                                      label="Sandbox requests nearest to it, and what each gets: this experience, a nearer "
                                            "one, or nothing (below the gate)", elem_id="exp-retrieving")
    with gr.Accordion("Compare two experiences side by side", open=False):
        with gr.Row():
            cmp_a = gr.Dropdown([], value=None, allow_custom_value=True, label="Experience A", elem_id="exp-cmp-a")
            cmp_b = gr.Dropdown([], value=None, allow_custom_value=True, label="Experience B", elem_id="exp-cmp-b")
            cmp_btn = gr.Button("Compare", elem_id="exp-cmp-btn")
        cmp_html = gr.HTML(elem_id="exp-cmp")
    with gr.Accordion("Try the guide: student vs teacher (student + this experience) on its source request", open=False):
        with gr.Row():
            try_pol = gr.Dropdown(s.policy_choices(), value=EXPERT_NOISY, label="Student policy", allow_custom_value=True)
            try_seed = gr.Number(0, precision=0, label="Seed")
            try_btn = gr.Button("Run student and teacher", elem_id="exp-try")
        try_html = gr.HTML(elem_id="exp-try-columns")
    return SimpleNamespace(**{k: v for k, v in locals().items() if k != "s"})


def _handlers(s: Services, ui: SimpleNamespace) -> SimpleNamespace:
    table, status = pick(ui, 'table status')
    run_filter, exp_id = pick(ui, 'run_filter exp_id')
    try_html, source, boxes, prov, history, retrieving = pick(ui, 'try_html source boxes prov history retrieving')
    confirm, trigger, summary = pick(ui, 'confirm trigger summary')
    version, version_diff, cmp_a, cmp_b, cmp_html, bank_dd = pick(ui, 'version version_diff cmp_a cmp_b cmp_html bank_dd')
    opened, = pick(ui, 'opened')

    def listing(bank_name, q, slot_text, gap, run):
        bank = s.bank(bank_name)
        hits = bank.search(q, k=len(bank)) if (q or "").strip() and len(bank) else [(None, e) for e in reversed(list(bank.items.values()))]
        hits = filter_experiences(hits, slot_text, opt_number(gap, "the minimum gap", float), run)
        runs = ["(any)"] + sorted({e.run_id for e in bank.items.values() if e.run_id})
        ids = [e.id for _, e in hits]
        text = (f"{len(hits)} of {len(bank)} experiences" if len(bank) else
                f"The bank {bank_name or STUDIO_BANK} is empty: run a distill (the Distill view), or mine a rollout run in a "
                "terminal with `genevolve experiences summarise RUN --bank BANK`, or write one here (Create new).")
        return {table: experience_rows(hits), exp_id: gr.update(choices=ids), cmp_a: gr.update(choices=ids),
                cmp_b: gr.update(choices=ids), run_filter: gr.update(choices=runs),
                status: message("info", text + broken_note(bank.load_errors))}

    def detail(bank_name, eid) -> dict:
        bank = s.bank(bank_name)
        e = bank.get((eid or "").strip())
        key = e.retrieval_key
        earlier = [h.version for h in reversed(e.history)]
        return {**{b: e.slots[sl] for b, sl in zip(boxes, SLOTS)}, source: f"{e.source_request_id} · {e.source_request}",
                trigger: key.trigger if key else "", summary: key.source_prompt_summary if key else "",
                prov: provenance_md(e), history: history_rows(e), retrieving: retrieval_rows(s.retrieval_of(bank, e.id)),
                version: gr.update(choices=earlier, value=earlier[0] if earlier else None), version_diff: "",
                opened: e.version}

    search = safe(status)(listing)

    @safe(status)
    def open_exp(bank_name, eid):
        if not (eid or "").strip():
            raise StudioError("pick an experience (search, then choose its id)")
        return {**detail(bank_name, eid), status: message("ok", f"opened {eid}")}

    @safe(status)
    def pick_row(bank_name, evt: gr.SelectData):
        eid = evt.row_value[0] if evt.row_value else None
        return {exp_id: eid, **detail(bank_name, eid), status: message("ok", f"opened {eid}")}

    @safe(status)
    def compare(bank_name, a, b):
        if not (a or "").strip() or not (b or "").strip():
            raise StudioError("pick two experiences to compare")
        bank = s.bank(bank_name)
        return {cmp_html: compare_experiences_html(bank.get(a.strip()), bank.get(b.strip()))}

    def open_link(params: dict[str, str]) -> dict:
        name = params.get("bank") or STUDIO_BANK
        out = safe(status)(listing)(name, "", "", "", "(any)")
        out[bank_dd] = gr.update(choices=s.bank_choices(), value=name)
        if params.get("exp"):
            out |= safe(status)(open_exp)(name, params["exp"])
            out[exp_id] = gr.update(value=params["exp"])
        return out

    @safe(status)
    def try_guide(bank_name, eid, policy, seed_, progress=gr.Progress()):
        progress(0, desc="student and teacher rolling out")
        req, trajs, verdicts, store = s.try_guide(s.bank(bank_name), (eid or "").strip(), policy, int(seed_ or 0))
        from ..html import store_src

        return {try_html: columns_html(req, trajs, verdicts, store_src(store), titles={"student": "student",
                                                                                     "teacher": "teacher (student + guide)"},
                                       mark=False),
                status: message("ok", f"teacher reward {verdicts['teacher'].reward:.3f} vs student {verdicts['student'].reward:.3f}")}

    return SimpleNamespace(listing=listing, detail=detail, search=search, open_exp=open_exp, pick_row=pick_row,
                           try_guide=try_guide, compare=compare, open_link=open_link)


def _edit_handlers(s: Services, ui: SimpleNamespace, h: SimpleNamespace) -> SimpleNamespace:
    """Saving, creating, restoring, consolidating and deleting: each a new state of the bank, shown at once."""
    status, exp_id, confirm, version_diff = pick(ui, 'status exp_id confirm version_diff')
    listing, detail = h.listing, h.detail

    def form_key(trigger_text, summary_text):
        from genevolve.experience.bank import ExperienceError, validate_key

        if not (trigger_text or "").strip():
            if (summary_text or "").strip():
                raise StudioError("a retrieval key needs its trigger: write the situation it applies to")
            return None
        try:
            return validate_key({"trigger": trigger_text, "source_prompt_summary": summary_text or ""})
        except ExperienceError as exc:
            raise StudioError(str(exc)) from None

    @safe(status)
    def save(bank_name, q, slot_text, gap, run, eid, note_text, trigger_text, summary_text, base, *values):
        from genevolve.experience.bank import StaleEditError

        if not (eid or "").strip():
            raise StudioError("open an experience before saving (or use Create new)")
        before = s.bank(bank_name).get(eid.strip()).version
        try:
            e = s.bank(bank_name).edit(eid.strip(), form_slots(values), note=note_text or "edited in the studio",
                                       retrieval_key=form_key(trigger_text, summary_text),
                                       base_version=int(base) if base not in (None, "") else None)
        except StaleEditError as exc:  # the form keeps the user's text; theirs is shown beside it
            return {status: message("error", str(exc)), version_diff: conflict_html(exc.current, exc.mine)}
        if e.version == before:
            return {**detail(bank_name, e.id), status: message("info", f"nothing changed in {e.id}: no new version saved")}
        listed = listing(bank_name, q, slot_text, gap, run)  # the list shows the version just saved
        del listed[exp_id], listed[status]
        return {**listed, **detail(bank_name, e.id), status: message("ok", f"saved {e.id} as version {e.version}")}

    @safe(status)
    def create(bank_name, source_text, trigger_text, summary_text, *values):
        slots = form_slots(values)
        text = (source_text or "").split(" · ", 1)
        req = s.resolve_request(text[0] if len(text) == 2 and text[0].split("-")[0] in ("sft", "evolve", "bench") else source_text)
        e = s.bank(bank_name).add(req.id, req.text, slots, reward_gap=0.0, run_id="studio", summariser="hand-written",
                                  retrieval_key=form_key(trigger_text, summary_text))
        out = listing(bank_name, "", "", "", "(any)")
        return {**out, **detail(bank_name, e.id), exp_id: gr.update(choices=out[exp_id]["choices"], value=e.id),
                status: message("ok", f"created {e.id}")}

    @safe(status)
    def consolidate(bank_name, q, slot_text, gap, run):
        bank = s.bank(bank_name)
        before = len(bank)
        merged = bank.consolidate()
        out = listing(bank_name, q, slot_text, gap, run)
        if not merged:
            return {**out, status: message("info", "no two experiences share a trigger: nothing to merge")}
        return {**out, status: message("ok", f"merged {before - len(bank) + len(merged)} experiences into {len(merged)}: "
                                             + ", ".join(f"{e.id} (evidence {e.evidence})" for e in merged))}

    @safe(status)
    def delete(bank_name, eid, yes):
        if not yes:
            raise StudioError("tick 'Yes, delete it' first: deleting cannot be undone")
        s.bank(bank_name).delete((eid or "").strip())
        out = listing(bank_name, "", "", "", "(any)")
        return {**out, exp_id: gr.update(choices=out[exp_id]["choices"], value=None), confirm: False,
                status: message("ok", f"deleted {eid}")}

    return SimpleNamespace(save=save, create=create, delete=delete, consolidate=consolidate)


def _version_handlers(s: Services, ui: SimpleNamespace, h: SimpleNamespace) -> SimpleNamespace:
    """An earlier version diffed slot by slot with the current one, and restored as a new version."""
    status, exp_id, version, version_diff = pick(ui, 'status exp_id version version_diff')
    listing, detail = h.listing, h.detail

    @safe(status)
    def diff_version(bank_name, eid, v):
        if not (eid or "").strip() or v in (None, ""):
            raise StudioError("open an experience with an earlier version, and pick the version")
        return {version_diff: version_diff_html(s.bank(bank_name).get(eid.strip()), int(v))}

    @safe(status)
    def pick_version(bank_name, eid, evt: gr.SelectData):
        v = evt.row_value[0] if evt.row_value else None
        e = s.bank(bank_name).get((eid or "").strip())
        if v is None or int(v) == e.version:
            return {version_diff: message("info", "that is the current version: pick an earlier one")}
        return {version: gr.update(value=int(v)), version_diff: version_diff_html(e, int(v))}

    @safe(status)
    def restore(bank_name, q, slot_text, gap, run, eid, v):
        if not (eid or "").strip() or v in (None, ""):
            raise StudioError("open an experience and pick the version to restore")
        e = s.bank(bank_name).restore(eid.strip(), int(v))
        listed = listing(bank_name, q, slot_text, gap, run)
        del listed[exp_id], listed[status]
        return {**listed, **detail(bank_name, e.id), status: message("ok", f"restored version {v} of {e.id} as version {e.version}")}

    return SimpleNamespace(diff_version=diff_version, pick_version=pick_version, restore=restore)


def tab(s: Services) -> list[Refresh]:
    ui = _layout(s)
    h = _handlers(s, ui)
    h.__dict__.update(vars(_edit_handlers(s, ui, h)) | vars(_version_handlers(s, ui, h)))
    table, status, bank_dd, refresh, query, slot_filter = pick(ui, 'table status bank_dd refresh query slot_filter')
    min_gap, run_filter, search_btn, exp_id, open_btn = pick(ui, 'min_gap run_filter search_btn exp_id open_btn')
    try_html, source, boxes, note, prov, history, retrieving = pick(ui, 'try_html source boxes note prov history retrieving')
    try_pol, try_seed, try_btn, save_btn, create_btn = pick(ui, 'try_pol try_seed try_btn save_btn create_btn')
    confirm, delete_btn, trigger, summary, consolidate_btn = pick(ui, 'confirm delete_btn trigger summary consolidate_btn')
    version, version_diff, cmp_a, cmp_b, cmp_html = pick(ui, 'version version_diff cmp_a cmp_b cmp_html')
    search, open_exp, pick_row, save = pick(h, 'search open_exp pick_row save')
    create, delete, try_guide, consolidate = pick(h, 'create delete try_guide consolidate')
    opened, = pick(ui, 'opened')
    detail_outputs = [*boxes, source, trigger, summary, prov, history, retrieving, version, version_diff, opened]
    list_outputs = [table, exp_id, cmp_a, cmp_b, run_filter, status]
    search_btn.click(search, [bank_dd, query, slot_filter, min_gap, run_filter], list_outputs)
    query.submit(search, [bank_dd, query, slot_filter, min_gap, run_filter], list_outputs)
    bank_dd.change(search, [bank_dd, query, slot_filter, min_gap, run_filter], list_outputs)
    refresh.click(lambda: gr.update(choices=s.bank_choices()), None, [bank_dd])
    open_btn.click(open_exp, [bank_dd, exp_id], detail_outputs + [status])
    table.select(pick_row, [bank_dd], detail_outputs + [exp_id, status])
    save_btn.click(save, [bank_dd, query, slot_filter, min_gap, run_filter, exp_id, note, trigger, summary, opened, *boxes],
                   detail_outputs + [table, cmp_a, cmp_b, run_filter, status])
    create_btn.click(create, [bank_dd, source, trigger, summary, *boxes], detail_outputs + list_outputs)
    consolidate_btn.click(consolidate, [bank_dd, query, slot_filter, min_gap, run_filter], list_outputs)
    version_diff_btn, restore_btn, cmp_btn = pick(ui, 'version_diff_btn restore_btn cmp_btn')
    version_diff_btn.click(h.diff_version, [bank_dd, exp_id, version], [version_diff, status])
    history.select(h.pick_version, [bank_dd, exp_id], [version, version_diff, status])
    restore_btn.click(h.restore, [bank_dd, query, slot_filter, min_gap, run_filter, exp_id, version],
                      detail_outputs + [table, cmp_a, cmp_b, run_filter, status])
    cmp_btn.click(h.compare, [bank_dd, cmp_a, cmp_b], [cmp_html, status])
    delete_btn.click(delete, [bank_dd, exp_id, confirm], list_outputs + [confirm])
    try_btn.click(try_guide, [bank_dd, exp_id, try_pol, try_seed], [try_html, status])
    return [Refresh(lambda: (gr.update(choices=s.bank_choices()), gr.update(choices=s.policy_choices())), [bank_dd, try_pol]),
            Link("experiences", h.open_link, list(dict.fromkeys([bank_dd, *list_outputs, *detail_outputs, exp_id])))]
