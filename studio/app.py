"""The Gradio app: :func:`build_app` wires the five views to one :class:`~studio.services.Services`.

Handlers are thin: they call the services (models, disk) and the pure view functions, and every
expected failure comes back as a message in the view's status line, never as a stack trace.
Per-user state (the open run, the watched distill folder) lives in ``gr.State``.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the studio runs offline

import functools
import hmac
import logging
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from genevolve.experience import ExperienceError
from genevolve.guides import SLOT_TITLES, SLOTS
from genevolve.records import SchemaError
from genevolve.refstore import MAX_BYTES, RefStoreError, clean_caption

from . import StudioError
from .bench import (GENERATORS, SUMMARY_HEADERS, bench_problem, common_requests, load_summary, missing_html, page_html,
                    summary_figure, summary_rows)
from .distill import (ARMS_ABLATE, ARMS_EVOLVE, PAIR_HEADERS, check_run_name, curves_figure, distill_args, latest_pairs,
                      new_experiences, probe_request_id, read_live, report_parts, status_text)
from .html import CSS, columns_html, esc, message, run_view, token_gap_html
from .services import EXPERT_NOISY, RAW, STUDIO_BANK, TINY, Services
from .tables import (EXP_HEADERS, HISTORY_HEADERS, REF_HEADERS, experience_rows, filter_experiences, form_slots,
                     gallery_items, history_rows, provenance_md, ref_rows)

log = logging.getLogger("genevolve.studio")
EXPECTED = (StudioError, RefStoreError, ExperienceError, SchemaError, KeyError, FileNotFoundError)


def _safe(status: gr.components.Component) -> Callable:
    """Turn expected errors into a red status line (and log unexpected ones) instead of a broken view."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except EXPECTED as exc:
                text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                return {status: message("err", str(text))}
            except Exception as exc:  # a bug: say so in the UI and keep the traceback in the log
                log.exception("studio handler %s failed", fn.__name__)
                return {status: message("err", f"unexpected error ({type(exc).__name__}): {exc}")}
        return inner
    return wrap


# ---------------------------------------------------------------------------
# Trajectories
# ---------------------------------------------------------------------------


def _trajectories_tab(s: Services) -> None:
    from genevolve.runs import load_run

    gr.Markdown("Run K rollouts of one request, or open a saved run: the trajectories stand side by side, best and worst marked.")
    choices = s.request_choices()
    with gr.Row():
        req = gr.Dropdown(choices, value=choices[0] if choices else None, allow_custom_value=True, filterable=True, scale=4,
                          label="Request (a bench request, or type your own)", elem_id="traj-request")
        pol = gr.Dropdown(s.policy_choices(), value=EXPERT_NOISY, allow_custom_value=True, label="Policy", elem_id="traj-policy")
        k = gr.Slider(1, 8, value=4, step=1, label="K rollouts", elem_id="traj-k")
        seed = gr.Number(0, precision=0, label="Seed", elem_id="traj-seed")
        run_btn = gr.Button("Run K rollouts", variant="primary", elem_id="traj-run")
    with gr.Row():
        saved = gr.Dropdown(s.list_runs(), value=None, label="…or open a saved run", scale=4, elem_id="traj-saved")
        refresh = gr.Button("Refresh list", size="sm")
        open_btn = gr.Button("Open", elem_id="traj-open")
    status = gr.HTML(elem_id="traj-status")
    cols = gr.HTML(elem_id="traj-columns")
    with gr.Accordion("Best vs worst: where they part ways", open=True):
        diff = gr.HTML(elem_id="traj-diff")

    def show(name: str) -> dict:
        path = s.run_path(name)
        try:
            run = load_run(path)
        except FileNotFoundError:
            raise StudioError(f"the run folder {path} no longer exists (deleted while open?)") from None
        head, html_cols, html_diff = run_view(run)
        return {status: head, cols: html_cols, diff: html_diff}

    @_safe(status)
    def run(value, policy, k_, seed_, progress=gr.Progress()):
        request = s.resolve_request(value)
        progress(0, desc=f"rolling out {int(k_)} trajectories")
        path = s.run_rollouts(request, policy, int(k_), int(seed_ or 0),
                              progress=lambda done, total: progress((done, total), desc="trajectories finished"))
        name = str(path.relative_to(s.runs_dir))
        note = message("info", s.request_note(request)) if s.request_note(request) else ""
        out = show(name)
        out[status] = note + out[status]
        out[saved] = gr.update(choices=s.list_runs(), value=name)
        return out

    @_safe(status)
    def open_run(name):
        return show(name)

    run_btn.click(run, [req, pol, k, seed], [status, cols, diff, saved])
    open_btn.click(open_run, [saved], [status, cols, diff])
    refresh.click(lambda: gr.update(choices=s.list_runs()), None, [saved])


# ---------------------------------------------------------------------------
# Experiences
# ---------------------------------------------------------------------------


def _experiences_tab(s: Services) -> None:
    gr.Markdown("The experience bank: search it by request (FAISS over source requests), filter, open one to edit its five "
                "slots. Every change is saved through the library and is retrievable at once.")
    with gr.Row():
        bank_dd = gr.Dropdown(s.bank_choices(), value=STUDIO_BANK, label="Bank", scale=3, elem_id="exp-bank")
        refresh = gr.Button("Refresh banks", size="sm")
    with gr.Row():
        query = gr.Textbox(label="Semantic search: a request", scale=3, elem_id="exp-query")
        slot_filter = gr.Textbox(label="Slot text contains", scale=2, elem_id="exp-filter")
        min_gap = gr.Textbox("", placeholder="any", label="Min reward gap", elem_id="exp-gap")
        run_filter = gr.Dropdown(["(any)"], value="(any)", label="Source run", elem_id="exp-run")
        search_btn = gr.Button("Search", variant="primary", elem_id="exp-search")
    table = gr.Dataframe(headers=EXP_HEADERS, interactive=False, wrap=True, max_height=320, elem_id="exp-table",
                         column_widths=["12%", "8%", "36%", "6%", "10%", "5%", "6%", "17%"])
    status = gr.HTML(elem_id="exp-status")
    with gr.Row():
        exp_id = gr.Dropdown([], value=None, label="Experience", allow_custom_value=True, scale=3, elem_id="exp-id")
        open_btn = gr.Button("Open", elem_id="exp-open")
    with gr.Row():
        with gr.Column(scale=3):
            source = gr.Textbox(label="Source request (for a new experience: a request id or text)", elem_id="exp-source")
            boxes = [gr.Textbox(label=SLOT_TITLES[sl], lines=2, elem_id=f"exp-slot-{sl}") for sl in SLOTS]
            note = gr.Textbox(label="Edit note (kept in the version history)", elem_id="exp-note")
            with gr.Row():
                save_btn = gr.Button("Save", variant="primary", elem_id="exp-save")
                create_btn = gr.Button("Create new", elem_id="exp-create")
                confirm = gr.Checkbox(False, label="Yes, delete it", elem_id="exp-confirm")
                delete_btn = gr.Button("Delete", variant="stop", elem_id="exp-delete")
        with gr.Column(scale=2):
            prov = gr.Markdown(elem_id="exp-provenance")
            history = gr.Dataframe(headers=HISTORY_HEADERS, interactive=False, wrap=True, max_height=240, label="Versions")
            retrieving = gr.Dataframe(headers=["similarity", "request", "text"], interactive=False, wrap=True, max_height=240,
                                      label="Requests that retrieve it (nearest experience, above the gate)")
    with gr.Accordion("Try the guide: student vs teacher (student + this experience) on its source request", open=False):
        with gr.Row():
            try_pol = gr.Dropdown(s.policy_choices(), value=EXPERT_NOISY, label="Student policy", allow_custom_value=True)
            try_seed = gr.Number(0, precision=0, label="Seed")
            try_btn = gr.Button("Run student and teacher", elem_id="exp-try")
        try_html = gr.HTML(elem_id="exp-try-columns")

    def listing(bank_name, q, slot_text, gap, run):
        bank = s.bank(bank_name)
        hits = bank.search(q, k=len(bank)) if (q or "").strip() and len(bank) else [(None, e) for e in reversed(list(bank.items.values()))]
        hits = filter_experiences(hits, slot_text, _opt_number(gap, "the minimum gap", float), run)
        runs = ["(any)"] + sorted({e.run_id for e in bank.items.values() if e.run_id})
        return {table: experience_rows(hits), exp_id: gr.update(choices=[e.id for _, e in hits]),
                run_filter: gr.update(choices=runs), status: message("info", f"{len(hits)} of {len(bank)} experiences"
                                                                      + (f" · {len(bank.load_errors)} broken line(s) set aside" if bank.load_errors else ""))}

    def detail(bank_name, eid) -> dict:
        bank = s.bank(bank_name)
        e = bank.get((eid or "").strip())
        ret = [[round(sim, 3), r.id, r.text] for sim, r in s.retrieving_requests(bank, e.id)]
        return {**{b: e.slots[sl] for b, sl in zip(boxes, SLOTS)}, source: f"{e.source_request_id} · {e.source_request}",
                prov: provenance_md(e), history: history_rows(e), retrieving: ret}

    search = _safe(status)(listing)

    @_safe(status)
    def open_exp(bank_name, eid):
        if not (eid or "").strip():
            raise StudioError("pick an experience (search, then choose its id)")
        return {**detail(bank_name, eid), status: message("ok", f"opened {eid}")}

    @_safe(status)
    def pick_row(bank_name, evt: gr.SelectData):
        eid = evt.row_value[0] if evt.row_value else None
        return {exp_id: eid, **detail(bank_name, eid), status: message("ok", f"opened {eid}")}

    @_safe(status)
    def save(bank_name, eid, note_text, *values):
        if not (eid or "").strip():
            raise StudioError("open an experience before saving (or use Create new)")
        e = s.bank(bank_name).edit(eid.strip(), form_slots(values), note=note_text or "edited in the studio")
        return {**detail(bank_name, e.id), status: message("ok", f"saved {e.id} as version {e.version}")}

    @_safe(status)
    def create(bank_name, source_text, *values):
        slots = form_slots(values)
        text = (source_text or "").split(" · ", 1)
        req = s.resolve_request(text[0] if len(text) == 2 and text[0].split("-")[0] in ("sft", "evolve", "bench") else source_text)
        e = s.bank(bank_name).add(req.id, req.text, slots, reward_gap=0.0, run_id="studio", summariser="hand-written")
        out = listing(bank_name, "", "", "", "(any)")
        return {**out, **detail(bank_name, e.id), exp_id: gr.update(choices=out[exp_id]["choices"], value=e.id),
                status: message("ok", f"created {e.id}")}

    @_safe(status)
    def delete(bank_name, eid, yes):
        if not yes:
            raise StudioError("tick 'Yes, delete it' first: deleting cannot be undone")
        s.bank(bank_name).delete((eid or "").strip())
        out = listing(bank_name, "", "", "", "(any)")
        return {**out, exp_id: gr.update(choices=out[exp_id]["choices"], value=None), confirm: False,
                status: message("ok", f"deleted {eid}")}

    @_safe(status)
    def try_guide(bank_name, eid, policy, seed_, progress=gr.Progress()):
        progress(0, desc="student and teacher rolling out")
        req, trajs, verdicts, store = s.try_guide(s.bank(bank_name), (eid or "").strip(), policy, int(seed_ or 0))
        from .html import store_src

        return {try_html: columns_html(req, trajs, verdicts, store_src(store), titles={"student": "student",
                                                                                     "teacher": "teacher (student + guide)"},
                                       mark=False),
                status: message("ok", f"teacher reward {verdicts['teacher'].reward:.3f} vs student {verdicts['student'].reward:.3f}")}

    detail_outputs = [*boxes, source, prov, history, retrieving]
    list_outputs = [table, exp_id, run_filter, status]
    search_btn.click(search, [bank_dd, query, slot_filter, min_gap, run_filter], list_outputs)
    query.submit(search, [bank_dd, query, slot_filter, min_gap, run_filter], list_outputs)
    bank_dd.change(search, [bank_dd, query, slot_filter, min_gap, run_filter], list_outputs)
    refresh.click(lambda: gr.update(choices=s.bank_choices()), None, [bank_dd])
    open_btn.click(open_exp, [bank_dd, exp_id], detail_outputs + [status])
    table.select(pick_row, [bank_dd], detail_outputs + [exp_id, status])
    save_btn.click(save, [bank_dd, exp_id, note, *boxes], detail_outputs + [status])
    create_btn.click(create, [bank_dd, source, *boxes], detail_outputs + list_outputs)
    delete_btn.click(delete, [bank_dd, exp_id, confirm], list_outputs + [confirm])
    try_btn.click(try_guide, [bank_dd, exp_id, try_pol, try_seed], [try_html, status])


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------


def _references_tab(s: Services) -> None:
    gr.Markdown("The reference store the agent's image_search sees: search it by text, browse, add images with a caption, "
                "edit captions, remove. The FAISS index is updated with every change.")
    status = gr.HTML(elem_id="refs-status")
    with gr.Row():
        query = gr.Textbox(label="Search (text query → nearest captions)", scale=4, elem_id="refs-query")
        k = gr.Slider(1, 24, value=8, step=1, label="Top k")
        search_btn = gr.Button("Search", variant="primary", elem_id="refs-search")
    gallery = gr.Gallery(label="Hits (id · similarity · caption)", columns=8, height=260, elem_id="refs-gallery")
    with gr.Row():
        with gr.Column():
            upload = gr.File(label=f"Add an image (PNG, JPEG, GIF or WebP, at most {MAX_BYTES // (1024 * 1024)} MB)",
                             elem_id="refs-upload")
            caption = gr.Textbox(label="Caption (what image_search matches)", elem_id="refs-caption")
            add_btn = gr.Button("Add to the store", variant="primary", elem_id="refs-add")
        with gr.Column():
            ref_id = gr.Textbox(label="Reference id", elem_id="refs-id")
            new_caption = gr.Textbox(label="New caption", elem_id="refs-new-caption")
            with gr.Row():
                cap_btn = gr.Button("Save caption", elem_id="refs-save-caption")
                confirm = gr.Checkbox(False, label="Yes, remove it")
                rm_btn = gr.Button("Remove", variant="stop", elem_id="refs-remove")
    with gr.Row():
        filt = gr.Textbox(label="Browse: id, caption, entity or variant contains", scale=3, elem_id="refs-filter")
        page = gr.Number(1, precision=0, minimum=1, label="Page")
        browse_btn = gr.Button("Browse", elem_id="refs-browse")
    table = gr.Dataframe(headers=REF_HEADERS, interactive=False, wrap=True, max_height=360, elem_id="refs-table")

    @_safe(status)
    def search(q, k_):
        hits = s.refs.search(q, int(k_))
        if not hits:
            return {gallery: [], status: message("info", "type a query to search")}
        return {gallery: gallery_items(hits), status: message("info", f"{len(hits)} hits for {q!r}")}

    @_safe(status)
    def browse(text, page_):
        page_ = max(int(page_ or 1), 1)
        rows, total = s.refs.browse(text or "", (page_ - 1) * 50, 50)
        return {table: ref_rows(rows), status: message("info", f"page {page_} of {max(1, -(-total // 50))} ({total} references)")}

    @_safe(status)
    def add(file, cap):
        if not file:
            raise StudioError("choose an image file to upload first")
        clean_caption(cap)  # a bad caption keeps the chosen file; a bad file is cleared below
        path = Path(file if isinstance(file, str) else file.name)
        try:
            if path.stat().st_size > MAX_BYTES:
                raise RefStoreError(f"the file has {path.stat().st_size / 1e6:.1f} MB; images of at most "
                                    f"{MAX_BYTES // (1024 * 1024)} MB are accepted")
            row = s.refs.add(path.read_bytes(), cap, filename=path.name)
        except RefStoreError as exc:
            return {status: message("err", f"{path.name}: {exc}"), upload: None}
        s.references_changed()
        return {status: message("ok", f"added {row['id']}: {row['title']}"), ref_id: row["id"], upload: None,
                gallery: gallery_items(s.refs.search(row["title"], 8))}

    @_safe(status)
    def recaption(rid, cap):
        row = s.refs.set_caption((rid or "").strip(), cap)
        s.references_changed()
        return {status: message("ok", f"{row['id']} is now captioned {row['title']!r}")}

    @_safe(status)
    def remove(rid, yes):
        if not yes:
            raise StudioError("tick 'Yes, remove it' first: removing cannot be undone")
        s.refs.remove((rid or "").strip())
        s.references_changed()
        return {status: message("ok", f"removed {rid}"), confirm: False}

    search_btn.click(search, [query, k], [gallery, status])
    query.submit(search, [query, k], [gallery, status])
    browse_btn.click(browse, [filt, page], [table, status])
    add_btn.click(add, [upload, caption], [status, ref_id, upload, gallery])
    cap_btn.click(recaption, [ref_id, new_caption], [status])
    rm_btn.click(remove, [ref_id, confirm], [status, confirm])


# ---------------------------------------------------------------------------
# Distill
# ---------------------------------------------------------------------------


def _distill_tab(s: Services) -> None:
    gr.Markdown(f"Self-evolution (GRPO + VED) in its own process, watched live. **Device: {s.device}.** "
                "A run started from the command line can be watched too: pick its folder below.")
    with gr.Row():
        mode = gr.Radio(["evolve", "ablate"], value="evolve", label="Run", elem_id="distill-mode")
        policy = gr.Dropdown([TINY], value=TINY, allow_custom_value=True, label="Student policy (tiny or a model folder)",
                             elem_id="distill-policy")
        quick = gr.Checkbox(True, label="--quick (a few minutes)", elem_id="distill-quick")
        name = gr.Textbox(value="", label="Run name (folder under the runs folder; blank: a new one)", elem_id="distill-name")
    with gr.Row():
        arms_e = gr.CheckboxGroup(list(ARMS_EVOLVE), value=list(ARMS_EVOLVE), label="evolve: losses", elem_id="distill-arms")
        arms_a = gr.CheckboxGroup(list(ARMS_ABLATE), value=list(ARMS_ABLATE), label="ablate: arms")
        seed_bank = gr.Dropdown(["(none)"] + s.bank_choices(), value="(none)", label="Start from a bank (evolve)",
                                elem_id="distill-seed-bank")
        probe_req = gr.Dropdown(s.request_choices("evolve"), value=None, allow_custom_value=True, filterable=True, scale=2,
                                label="Probe request for student vs teacher (blank: the first evolve request)",
                                elem_id="distill-probe-request")
    with gr.Row():
        steps = gr.Textbox("", placeholder="default", label="steps", elem_id="distill-steps")
        b = gr.Textbox("", placeholder="default", label="B prompts", elem_id="distill-b")
        k = gr.Textbox("", placeholder="default", label="K rollouts", elem_id="distill-k")
        rank = gr.Number(16, precision=0, label="LoRA rank")
        lam = gr.Number(2.0, label="λ_VED")
        dmin = gr.Number(0.20, label="δ_min")
        gate = gr.Number(0.84, label="gate", elem_id="distill-gate")
        seed = gr.Number(0, precision=0, label="seed")
        mnt = gr.Number(384, precision=0, label="max new tokens", elem_id="distill-mnt")
        evr = gr.Textbox("", placeholder="default", label="eval requests", elem_id="distill-evr")
    with gr.Row():
        start_btn = gr.Button("Start", variant="primary", elem_id="distill-start")
        stop_btn = gr.Button("Stop", elem_id="distill-stop")
        kill_btn = gr.Button("Kill", variant="stop", elem_id="distill-kill")
        resume_btn = gr.Button("Resume", elem_id="distill-resume")
        watch = gr.Dropdown(s.list_runs_training(), value=None, label="Watch a run folder", scale=3, elem_id="distill-watch")
        watch_btn = gr.Button("Watch", elem_id="distill-watch-btn")
    msg = gr.HTML(elem_id="distill-msg")
    status = gr.HTML(elem_id="distill-status")
    curves = gr.Plot(label="Learning curves", elem_id="distill-curves")
    with gr.Row():
        pairs = gr.Dataframe(headers=PAIR_HEADERS, interactive=False, wrap=True, max_height=240, label="Latest mined pairs")
        new_exps = gr.Dataframe(headers=EXP_HEADERS, interactive=False, wrap=True, max_height=240, label="New experiences")
    gr.Markdown("### Student vs teacher on a probe request")
    probe_md = gr.Markdown(elem_id="distill-probe-head")
    tokens = gr.HTML(elem_id="distill-tokens")
    probe_cols = gr.HTML(elem_id="distill-probe-columns")
    logtail = gr.Textbox(label="Log (last lines)", lines=8, max_lines=8, elem_id="distill-log")
    with gr.Accordion("Report", open=True):
        report_md = gr.Markdown(elem_id="distill-report")
        report_imgs = gr.Gallery(columns=3, height=300, label="Curves and examples")
    watched = gr.State(None)
    seen = gr.State(None)
    timer = gr.Timer(2.0, active=False)

    live_outputs = [status, curves, pairs, new_exps, probe_md, tokens, probe_cols, logtail, report_md, report_imgs, seen, timer]

    def refresh_view(out: str | None, last):
        if not out:
            return {status: message("info", "no run watched: start one or pick a folder")}
        live = read_live(Path(out))
        job = s.jobs.status()
        ours = job.get("out") == str(live.out)
        going = live.running or (ours and job["state"] in ("running", "stopping"))
        sig = _signature(live.out) + (job["state"] if ours else "",)
        state = job["state"] if ours else ("running" if live.running else "idle")
        head = (f'<div class="ge-msg {"err" if live.error else "info"}" data-points="{live.points}" data-state="{state}">'
                f'{esc(status_text(live, job if ours else None))}</div>')
        if sig == last:
            return {status: head, timer: gr.Timer(active=going)}
        out_: dict[Any, Any] = {status: head, seen: sig, timer: gr.Timer(active=going), curves: curves_figure(live.metrics)}
        out_[pairs] = latest_pairs(live.pairs)
        if live.probe_dir is not None:
            out_[new_exps] = experience_rows([(None, e) for e in new_experiences(live.probe_dir, live.pairs)])
        p = live.probe
        if p:
            from genevolve.records import ImageStore

            from .html import store_src

            sim = f" · similarity {p.similarity:.3f}" if p.similarity is not None else ""
            out_[probe_md] = (f"Step {p.step} · `{p.request_id}` {p.request}" + (f"\n\nExperience `{p.experience_id}`{sim}; "
                              f"guide:\n\n```\n{p.guide}\n```" if p.guide else f"\n\n_{p.note}_"))
            out_[tokens] = token_gap_html([t.model_dump(exclude_none=True) for t in p.tokens])
            trajs, verdicts = [], {}
            for who, case in (("student", p.student), ("teacher", p.teacher)):
                if case:
                    trajs.append(case.trajectory.model_copy(update={"id": who}))
                    if case.verdict:
                        verdicts[who] = case.verdict
            req = s.world.request(p.request_id) if p.request_id else None
            src_run, src_world = store_src(ImageStore(live.probe_dir / "images")), store_src(s.world.images)
            out_[probe_cols] = columns_html(req, trajs, verdicts, lambda h: src_run(h) or src_world(h),
                                            titles={"student": "student (latest rollout)", "teacher": "teacher (student + guide)"},
                                            mark=False)
        log_path = live.out / "studio.log"
        if log_path.exists():
            out_[logtail] = "\n".join(log_path.read_text("utf-8", errors="replace").splitlines()[-8:])
        if live.report:
            body, imgs = report_parts(live.report)
            out_[report_md] = body
            out_[report_imgs] = [str(x) for x in imgs]
        return out_

    tick = _safe(status)(refresh_view)

    @_safe(msg)
    def start(mode_, policy_, quick_, name_, arms_e_, arms_a_, seed_bank_, probe_, steps_, b_, k_, rank_, lam_, dmin_, gate_, seed_,
              mnt_, evr_):
        name_ = check_run_name(name_) if (name_ or "").strip() else f"distill-{time.strftime('%Y%m%d-%H%M%S')}"
        out = s.runs_dir / name_
        if (out / "config.json").exists() or (out / "report").exists():
            raise StudioError(f"{name_} already holds a run: pick it under 'Watch' and use Resume, or choose another name")
        args = distill_args(mode_, out, policy_ or TINY, arms_e_ if mode_ == "evolve" else arms_a_, bool(quick_),
                            _opt_number(steps_, "steps"), _opt_number(b_, "B"), _opt_number(k_, "K"), rank_, float(lam_),
                            float(dmin_), float(gate_), int(seed_ or 0), mnt_, _opt_number(evr_, "eval requests"),
                            probe_request_id(probe_, {r.id for r in s.world.requests}))
        bank = None if seed_bank_ in (None, "", "(none)") or mode_ != "evolve" else s.run_path(seed_bank_)
        text = s.jobs.start(args, out, seed_bank=bank)
        return {msg: message("ok", text), watched: str(out), seen: None, timer: gr.Timer(active=True),
                watch: gr.update(choices=s.list_runs_training(), value=name_)}

    @_safe(msg)
    def stop():
        return {msg: message("info", s.jobs.stop())}

    @_safe(msg)
    def kill():
        return {msg: message("info", s.jobs.kill())}

    @_safe(msg)
    def resume(name_):
        out = s.run_path(name_)
        text = s.jobs.resume(out)
        return {msg: message("ok", text), watched: str(out), seen: None, timer: gr.Timer(active=True)}

    @_safe(msg)
    def watch_run(name_):
        out = s.run_path(name_)
        return {watched: str(out), seen: None, timer: gr.Timer(active=True), msg: message("info", f"watching {name_}")}

    start_btn.click(start, [mode, policy, quick, name, arms_e, arms_a, seed_bank, probe_req, steps, b, k, rank, lam, dmin, gate, seed,
                            mnt, evr],
                    [msg, watched, seen, timer, watch])
    stop_btn.click(stop, None, [msg])
    kill_btn.click(kill, None, [msg])
    resume_btn.click(resume, [watch], [msg, watched, seen, timer])
    watch_btn.click(watch_run, [watch], [watched, seen, timer, msg])
    timer.tick(tick, [watched, seen], live_outputs)


def _opt_number(text, name: str, kind=int):
    """A blank box means "the default"; anything else must be a number."""
    text = "" if text is None else str(text).strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise StudioError(f"{name} must be a number (or blank for the default)") from None


def _signature(out: Path) -> tuple:
    """Sizes and modification times of what the live view reads: unchanged files need no redraw."""
    sig = []
    for pattern in ("metrics.jsonl", "*/metrics.jsonl", "probe.json", "*/probe.json", "pairs.jsonl", "report/report.md", "studio.log"):
        for p in sorted(out.glob(pattern)):
            try:
                st = p.stat()
                sig.append((str(p), st.st_size, st.st_mtime))
            except OSError:
                pass
    return tuple(sig)


# ---------------------------------------------------------------------------
# Bench
# ---------------------------------------------------------------------------


def _bench_tab(s: Services) -> None:
    gr.Markdown("Evaluate a policy or a trained checkpoint on a sandbox split, or on a local GenEvolve-Bench folder scored "
                "by a VLM judge (KScore by track, category and difficulty, mean ± 95 % CI over seeds), then compare two runs "
                "request by request.")
    status = gr.HTML(elem_id="bench-status")
    with gr.Row():
        pol = gr.Dropdown(s.policy_choices(), value=RAW, allow_custom_value=True, label="Policy or checkpoint", elem_id="bench-policy")
        split = gr.Dropdown(["bench", "evolve", "sft"], value="bench", label="Sandbox split")
        limit = gr.Number(24, precision=0, minimum=1, label="Requests (first N)", elem_id="bench-limit")
        seeds = gr.Textbox("0", label="Seeds (comma-separated)", elem_id="bench-seeds")
        eval_btn = gr.Button("Evaluate", variant="primary", elem_id="bench-eval")
    with gr.Accordion("A local GenEvolve-Bench folder (used instead of the sandbox split when given)", open=False):
        with gr.Row():
            data = gr.Textbox("", label="Data folder (holds bench/)", placeholder="/data/GenEvolve-Data-Bench", scale=3,
                              elem_id="bench-data")
            generator = gr.Dropdown(list(GENERATORS), value="sandbox", allow_custom_value=True, elem_id="bench-generator",
                                    label="Generator (or t2i:<model>, img2img:<model>, a render-service URL)")
            allow_missing = gr.Checkbox(False, label="keep cases whose picture is missing (counted as missing)",
                                        elem_id="bench-allow-missing")
        with gr.Row():
            judge_url = gr.Textbox("", label="VLM judge URL (OpenAI-compatible)", placeholder="http://127.0.0.1:8000/v1", scale=2,
                                   elem_id="bench-judge-url")
            judge_model = gr.Textbox("", label="Judge model", elem_id="bench-judge-model")
            api_key = gr.Textbox("", type="password", label="API key (blank: $OPENAI_API_KEY; none for a loopback judge)",
                                 elem_id="bench-api-key")
    with gr.Row():
        results = gr.Dropdown(s.list_bench(), value=None, multiselect=True, label="Results to show (one or more)", scale=4,
                              elem_id="bench-results")
        show_btn = gr.Button("Show", elem_id="bench-show")
        refresh = gr.Button("Refresh lists", size="sm")
    table = gr.Dataframe(headers=["run"] + SUMMARY_HEADERS, interactive=False, wrap=True, max_height=360, elem_id="bench-table")
    missing_box = gr.HTML(elem_id="bench-missing")
    chart = gr.Plot(label="KScore by track, category, difficulty", elem_id="bench-chart")
    gr.Markdown("### Two runs side by side")
    with gr.Row():
        run_a = gr.Dropdown(s.list_runs(), label="Run A", elem_id="bench-run-a")
        run_b = gr.Dropdown(s.list_runs(), label="Run B", elem_id="bench-run-b")
        idx = gr.Number(1, precision=0, minimum=1, label="Request #", elem_id="bench-idx")
        prev_btn = gr.Button("◀ Previous")
        next_btn = gr.Button("Next ▶", elem_id="bench-next")
    page = gr.HTML(elem_id="bench-page")

    def show_many(names):
        if not names:
            raise StudioError("pick one or more results")
        summaries = {n: load_summary(s.run_path(n)) for n in names}
        rows = [[n] + r for n, sm in summaries.items() for r in summary_rows(sm)]
        problems = [f"{n}: {p}" for n, sm in summaries.items() if (p := bench_problem(sm))]
        shown = message("err", " · ".join(problems)) if problems else message("ok", f"showing {', '.join(names)}")
        return {table: rows, chart: summary_figure(summaries), missing_box: missing_html(summaries), status: shown}

    @_safe(status)
    def evaluate(policy, split_, limit_, seeds_, data_, generator_, allow_missing_, judge_url_, judge_model_, api_key_,
                 progress=gr.Progress()):
        try:
            seed_list = [int(x) for x in (seeds_ or "").split(",") if x.strip()]
        except ValueError:
            raise StudioError("seeds are whole numbers separated by commas, e.g. 0,1,2") from None
        limit_ = int(limit_) if limit_ else None
        if (data_ or "").strip():
            path = s.run_bench_official(data_, policy, generator_, judge_url_, judge_model_, api_key_, limit_, seed_list,
                                        bool(allow_missing_), progress=lambda text: progress(0, desc=text))
        else:
            path = s.run_bench(policy, split_, limit_, seed_list, progress=lambda text: progress(0, desc=text))
        name = str(path.relative_to(s.runs_dir))
        out = show_many([name])
        out[results] = gr.update(choices=s.list_bench(), value=[name])
        out[run_a] = out[run_b] = gr.update(choices=s.list_runs())
        return out

    @_safe(status)
    def compare(a, b_, i):
        from genevolve.runs import load_run

        if not a or not b_:
            raise StudioError("pick two runs")
        try:
            ra, rb = load_run(s.run_path(a)), load_run(s.run_path(b_))
        except FileNotFoundError as exc:
            raise StudioError(f"{exc} (deleted while open?)") from None
        ids = common_requests(ra, rb)
        if not ids:
            raise StudioError("the two runs share no request")
        i = min(max(int(i or 1), 1), len(ids))
        return {page: page_html(ra, rb, ids[i - 1], a, b_), idx: i,
                status: message("info", f"request {i} of {len(ids)} in both runs: {ids[i - 1]}")}

    eval_btn.click(evaluate, [pol, split, limit, seeds, data, generator, allow_missing, judge_url, judge_model, api_key],
                   [table, chart, missing_box, status, results, run_a, run_b])
    show_btn.click(_safe(status)(show_many), [results], [table, chart, missing_box, status])
    refresh.click(lambda: (gr.update(choices=s.list_bench()), gr.update(choices=s.list_runs()), gr.update(choices=s.list_runs())),
                  None, [results, run_a, run_b])
    for trigger, delta in ((idx.submit, 0), (prev_btn.click, -1), (next_btn.click, 1), (run_a.change, 0), (run_b.change, 0)):
        trigger(lambda a, b_, i, d=delta: compare(a, b_, (int(i or 1)) + d), [run_a, run_b, idx], [page, idx, status])


# ---------------------------------------------------------------------------


def build_app(services: Services) -> gr.Blocks:
    """The whole studio over one set of services."""
    with gr.Blocks(title="GenEvolve Studio", analytics_enabled=False) as app:
        gr.Markdown(f"# GenEvolve Studio\nWorld `{services.world.root}` · runs `{services.runs_dir}` · "
                    f"your references `{services.world.refs_root}` · device {services.device}")
        with gr.Tabs():
            with gr.Tab("Trajectories", id="trajectories"):
                _trajectories_tab(services)
            with gr.Tab("Experiences", id="experiences"):
                _experiences_tab(services)
            with gr.Tab("References", id="references"):
                _references_tab(services)
            with gr.Tab("Distill", id="distill"):
                _distill_tab(services)
            with gr.Tab("Bench", id="bench"):
                _bench_tab(services)
    return app


def launch(services: Services, host: str = "127.0.0.1", port: int = 7860, password: str | None = None, block: bool = True):
    """Serve the studio; with a password, every visitor must give it (any user name)."""
    app = build_app(services)
    app.queue(default_concurrency_limit=2)
    auth = (lambda _user, pw: hmac.compare_digest(pw.encode(), password.encode())) if password else None
    app.launch(server_name=host, server_port=port, auth=auth, css=CSS, prevent_thread_lock=not block, quiet=True,
               ssr_mode=False, footer_links=[], max_file_size="32mb",
               allowed_paths=[str(services.world.root), str(services.world.refs_root), str(services.runs_dir)])
    return app
