"""Distill: start, stop, resume or watch a self-evolution run; its curves, pairs, probe and report update live."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..distill import (ARMS_ABLATE, ARMS_EVOLVE, LONG_RUN_S, PAIR_HEADERS, check_run_name, curves_figure, distill_args,
                      form_estimate, latest_pairs, log_lines, new_experiences, probe_request_id, read_live, report_file,
                      report_parts, status_text)
from ..html import columns_html, esc, message, token_gap_html
from ..services import TINY, Services
from ..tables import EXP_HEADERS, EXP_WIDE, column_widths, experience_rows
from . import Link, Refresh, StudioError, opt_number, pick, safe, signature


def _layout(s: Services) -> SimpleNamespace:
    """The run form, the job buttons and the live views of the watched run folder."""
    gr.Markdown(f"Self-evolution (GRPO + VED) in its own process, watched live. **Device: {s.device}.** "
                "A run started from the command line can be watched too: pick its folder below.")
    with gr.Row():
        mode = gr.Radio(["evolve", "ablate"], value="evolve", label="Run", elem_id="distill-mode")
        policy = gr.Dropdown([TINY], value=TINY, allow_custom_value=True, label="Student policy (tiny or a model folder)",
                             elem_id="distill-policy")
        quick = gr.Checkbox(True, label="--quick (under 4 minutes with the tiny student)", elem_id="distill-quick")
        name = gr.Textbox(value="", label="Run name (folder under the runs folder; blank: a new one)", elem_id="distill-name")
    with gr.Row():
        arms_e = gr.CheckboxGroup(list(ARMS_EVOLVE), value=list(ARMS_EVOLVE), label="evolve: losses", elem_id="distill-arms")
        arms_a = gr.CheckboxGroup(list(ARMS_ABLATE), value=list(ARMS_ABLATE), label="ablate: arms", visible=False,
                                  elem_id="distill-arms-ablate")
        seed_bank = gr.Dropdown(["(none)"] + s.bank_choices(), value="(none)", label="Start from a bank (evolve)",
                                elem_id="distill-seed-bank")
        probe_req = gr.Dropdown(s.request_choices("evolve"), value=None, allow_custom_value=True, filterable=True, scale=2,
                                label="Probe request for student vs teacher (blank: picked at step 1, one with an experience)",
                                elem_id="distill-probe-request")
    with gr.Row():
        steps = gr.Textbox("", placeholder="default", label="steps", elem_id="distill-steps")
        b = gr.Textbox("", placeholder="default", label="B prompts", elem_id="distill-b")
        k = gr.Textbox("", placeholder="default", label="K rollouts", elem_id="distill-k")
        rank = gr.Number(16, precision=0, label="LoRA rank")
        lam = gr.Number(2.0, label="λ_VED")
        dmin = gr.Number(0.20, label="δ_min", elem_id="distill-dmin")
        gate = gr.Number(0.90, label="gate (situation key)", elem_id="distill-gate")
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
    pairs = gr.Dataframe(headers=PAIR_HEADERS, interactive=False, wrap=True, max_height=240, label="Latest mined pairs",
                         column_widths=column_widths(PAIR_HEADERS, {"request": 120, "text": 420, "experience": 150}),
                         elem_id="distill-pairs")
    new_exps = gr.Dataframe(headers=EXP_HEADERS, interactive=False, wrap=True, max_height=240, elem_id="distill-new-exps",
                            label="New experiences (made from the latest step's pairs)",
                            column_widths=column_widths(EXP_HEADERS, EXP_WIDE))
    gr.Markdown("### Student vs teacher on a probe request")
    probe_md = gr.Markdown(elem_id="distill-probe-head")
    tokens = gr.HTML(elem_id="distill-tokens")
    probe_cols = gr.HTML(elem_id="distill-probe-columns")
    logtail = gr.Textbox(label="Log (last lines)", lines=8, max_lines=8, elem_id="distill-log")
    with gr.Accordion("Report", open=True):
        report_dl = gr.DownloadButton("Download the report (one HTML file)", visible=False, elem_id="distill-report-download")
        report_md = gr.Markdown(elem_id="distill-report")
        report_imgs = gr.Gallery(columns=3, height=300, label="Curves and examples")
    watched = gr.State(None)
    seen = gr.State(None)
    confirmed = gr.State(None)  # the settings of a long run the user was warned about
    timer = gr.Timer(2.0, active=False)

    live_outputs = [status, curves, pairs, new_exps, probe_md, tokens, probe_cols, logtail, report_md, report_imgs, report_dl, seen,
                    timer]
    return SimpleNamespace(**{k: v for k, v in locals().items() if k != "s"})


def _live_view(s: Services, ui: SimpleNamespace):
    """The handler that redraws the watched run's live views (a no-op when its files have not changed)."""
    status, curves, probe_md, tokens, probe_cols = pick(ui, 'status curves probe_md tokens probe_cols')
    logtail, seen, timer = pick(ui, 'logtail seen timer')
    pairs, new_exps, report_md, report_imgs, report_dl = pick(ui, 'pairs new_exps report_md report_imgs report_dl')

    def refresh_view(out: str | None, last):
        if not out:
            return {status: message("info", "no run watched: start one or pick a folder")}
        live = read_live(Path(out))
        job = s.jobs.status()
        ours = job.get("out") == str(live.out)
        going = live.running or (ours and job["state"] in ("running", "stopping"))
        sig = signature(live.out) + (job["state"] if ours else "",)
        state = job["state"] if ours else ("running" if live.running else "idle")
        head = (f'<div class="ge-msg {"err" if live.error else "info"}" data-points="{live.points}" data-state="{state}">'
                f'{esc(status_text(live, job if ours else None))}</div>')
        # The watched folder is polled whatever its last state: a run resumed elsewhere (a terminal, another tab)
        # shows up here. An idle folder is only re-read when its files change (the signature), every few seconds.
        poll = gr.Timer(2.0 if going else 5.0, active=True)
        if sig == last:
            return {status: head, timer: poll}
        out_: dict[Any, Any] = {status: head, seen: sig, timer: poll, curves: curves_figure(live.metrics)}
        out_[pairs] = latest_pairs(live.pairs)
        if live.probe_dir is not None:
            out_[new_exps] = experience_rows([(None, e) for e in new_experiences(live.probe_dir, live.pairs)])
        p = live.probe
        if p:
            from genevolve.records.schema import ImageStore

            from ..html import store_src

            sim = f" · similarity {p.similarity:.3f}" if p.similarity is not None else ""
            how = {"own": " (mined from this request)", "nearest": " (the nearest experience above the gate)"}.get(p.retrieval, "")
            chosen = f" _(probe request: {p.chosen})_" if p.chosen else ""
            out_[probe_md] = (f"Step {p.step} · `{p.request_id}` {p.request}{chosen}" + (
                f"\n\nTeacher's experience `{p.experience_id}`{how}{sim}; guide:\n\n```\n{p.guide}\n```" if p.guide
                else f"\n\n_{p.note}_"))
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
            out_[logtail] = log_lines(log_path.read_text("utf-8", errors="replace"))
        if live.report:
            body, imgs = report_parts(live.report)
            out_[report_md] = body
            out_[report_imgs] = [str(x) for x in imgs]
            out_[report_dl] = gr.DownloadButton(value=str(report_file(live.report)), visible=True)
        else:
            out_[report_dl] = gr.DownloadButton(visible=False)
        return out_

    return safe(status)(refresh_view)


def _handlers(s: Services, ui: SimpleNamespace) -> SimpleNamespace:
    msg, confirmed = pick(ui, 'msg confirmed')
    watched, seen, timer = pick(ui, 'watched seen timer')
    watch, = pick(ui, 'watch')

    @safe(msg)
    def start(mode_, policy_, quick_, name_, arms_e_, arms_a_, seed_bank_, probe_, steps_, b_, k_, rank_, lam_, dmin_, gate_, seed_,
              mnt_, evr_, confirmed_):
        name_ = check_run_name(name_) if (name_ or "").strip() else f"distill-{time.strftime('%Y%m%d-%H%M%S')}"
        out = s.runs_dir / name_
        if (out / "config.json").exists() or (out / "report").exists():
            raise StudioError(f"{name_} already holds a run: pick it under 'Watch' and use Resume, or choose another name")
        arms_ = arms_e_ if mode_ == "evolve" else arms_a_
        numbers = opt_number(steps_, "steps"), opt_number(b_, "B"), opt_number(k_, "K"), opt_number(evr_, "eval requests")
        args = distill_args(mode_, out, policy_ or TINY, arms_, bool(quick_), *numbers[:3], rank_, float(lam_),
                            float(dmin_), float(gate_), int(seed_ or 0), mnt_, numbers[3],
                            probe_request_id(probe_, {r.id for r in s.world.requests}))
        est = form_estimate(s.world, s.runs_dir, mode_, policy_ or TINY, arms_, bool(quick_), *numbers)
        key = " ".join(args[:1] + args[3:])  # the settings, whatever the run's name
        if est.seconds > LONG_RUN_S and confirmed_ != key:  # say how long before it starts
            return {msg: message("info", f"This run takes {est.text()}. Click Start again to run it anyway, or make it "
                                         "smaller (fewer steps, B, K or eval requests; a smaller student)."), confirmed: key}
        bank = None if seed_bank_ in (None, "", "(none)") or mode_ != "evolve" else s.run_path(seed_bank_)
        text = s.jobs.start(args, out, seed_bank=bank)
        return {msg: message("ok", f"{text} · expected {est.text()}"), watched: str(out), seen: None,
                timer: gr.Timer(active=True), watch: gr.update(choices=s.list_runs_training(), value=name_), confirmed: None}

    @safe(msg)
    def stop():
        return {msg: message("info", s.jobs.stop())}

    @safe(msg)
    def kill():
        return {msg: message("info", s.jobs.kill())}

    @safe(msg)
    def resume(name_):
        out = s.run_path(name_)
        text = s.jobs.resume(out)
        return {msg: message("ok", text), watched: str(out), seen: None, timer: gr.Timer(active=True)}

    @safe(msg)
    def watch_run(name_):
        out = s.run_path(name_)
        if not out.is_dir():
            raise StudioError(f"there is no run folder {name_} in {s.runs_dir}")
        return {watched: str(out), seen: None, timer: gr.Timer(active=True), msg: message("info", f"watching {name_}")}

    def lists():
        return gr.update(choices=s.list_runs_training()), gr.update(choices=["(none)"] + s.bank_choices())

    def reconnect(request: gr.Request = None):
        """On page load (a reload, a second browser tab): watch the run that is training, if any (unless the page
        address names the run to watch)."""
        params = dict(request.query_params) if request is not None else {}
        if params.get("view") == "distill" and params.get("run"):
            return {}
        name = s.running_run()
        if name is None:
            return {watch: lists()[0]}
        return {watch: gr.update(choices=s.list_runs_training(), value=name), watched: str(s.runs_dir / name), seen: None,
                timer: gr.Timer(active=True), msg: message("info", f"reconnected to the running run {name}")}

    def open_link(params: dict[str, str]) -> dict:
        name = params.get("run")
        if not name:
            return {}
        out = watch_run(name)
        return out | ({watch: gr.update(choices=s.list_runs_training(), value=name)} if watched in out else {})

    return SimpleNamespace(tick=_live_view(s, ui), start=start, stop=stop, kill=kill, resume=resume, watch_run=watch_run,
                           lists=lists, reconnect=reconnect, open_link=open_link)


def tab(s: Services) -> list[Refresh]:
    ui = _layout(s)
    h = _handlers(s, ui)
    msg, = pick(ui, 'msg')
    watched, seen, timer, live_outputs, mode = pick(ui, 'watched seen timer live_outputs mode')
    policy, quick, name, arms_e, arms_a, seed_bank = pick(ui, 'policy quick name arms_e arms_a seed_bank')
    probe_req, steps, b, k, rank, lam, dmin, gate, seed = pick(ui, 'probe_req steps b k rank lam dmin gate seed')
    mnt, evr, start_btn, stop_btn, kill_btn, resume_btn = pick(ui, 'mnt evr start_btn stop_btn kill_btn resume_btn')
    watch, watch_btn = pick(ui, 'watch watch_btn')
    tick, start, stop, kill, resume, watch_run = pick(h, 'tick start stop kill resume watch_run')
    confirmed, = pick(ui, 'confirmed')
    # The form shows only the fields of the chosen mode: an ablation trains every arm from the SFT student with the
    # default mining and gate, so its losses, bank, δ_min and gate fields go away.
    mode.change(lambda m: [gr.update(visible=m == "evolve")] * 4 + [gr.update(visible=m == "ablate")], [mode],
                [arms_e, seed_bank, dmin, gate, arms_a])
    start_btn.click(start, [mode, policy, quick, name, arms_e, arms_a, seed_bank, probe_req, steps, b, k, rank, lam, dmin, gate, seed,
                            mnt, evr, confirmed],
                    [msg, watched, seen, timer, watch, confirmed])
    stop_btn.click(stop, None, [msg])
    kill_btn.click(kill, None, [msg])
    resume_btn.click(resume, [watch], [msg, watched, seen, timer])
    watch_btn.click(watch_run, [watch], [watched, seen, timer, msg])
    timer.tick(tick, [watched, seen], live_outputs)
    return [Refresh(h.lists, [watch, seed_bank]), Refresh(h.reconnect, [watch, watched, seen, timer, msg], on_open=False),
            Link("distill", h.open_link, [watched, seen, timer, msg, watch])]
