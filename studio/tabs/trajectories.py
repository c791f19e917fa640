"""Trajectories: the run browser, K rollouts of one request side by side (best and worst marked), a run paged
request by request, its cases filtered and sorted, its largest best-worst gaps, and any two trajectories diffed
turn by turn. The URL names the run, the request and the trajectory (``?view=trajectories&run=…&request=…&traj=…``),
so a reload or a shared link opens the same place; ←/→ page the requests, j/k walk the trajectories."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..compare import CASE_HEADERS, GAP_HEADERS, SORTS, case_rows, largest_gaps
from ..html import diff_html, message, run_requests, run_view
from ..runs import HEADERS as RUN_HEADERS
from ..runs import SORTS as RUN_SORTS
from ..runs import filter_rows, run_rows
from ..services import EXPERT_NOISY, Services
from ..tables import column_widths
from . import Link, Refresh, StudioError, pick, safe

# After a run's page is drawn: the URL names it, and the trajectory the link named (or j/k picked) is marked.
SYNC_URL = """(nav) => {
  const [run, req] = Array.isArray(nav) ? nav : [null, null];
  const u = new URL(window.location);
  if (run) { u.searchParams.set('view', 'trajectories'); u.searchParams.set('run', run); }
  if ((req || null) !== u.searchParams.get('request')) u.searchParams.delete('traj');  // another request's trajectory
  if (req) u.searchParams.set('request', req); else u.searchParams.delete('request');
  history.replaceState(null, '', u);
  setTimeout(() => {  // once the columns are drawn: mark what the address names now, then play any queued key
    if (!window.geMarkTrajectory) return;
    window.geMarkTrajectory(new URL(window.location).searchParams.get('traj'));
    if (window.geNavBusy) window.geNavNext();
  }, 50);
  return nav;
}"""


def _layout(s: Services) -> SimpleNamespace:
    """The run browser, the rollout form, a run's page and its accordions (diffs, cases)."""
    gr.Markdown("Every run folder in the runs folder, a click away; K rollouts of one request side by side, best and worst "
                "marked (ties all marked, a small gap said so). A run over several requests is paged request by request "
                "(←/→; j/k walk its trajectories). The address bar names the run, request and trajectory: reload it or "
                "share it to come back here.")
    with gr.Accordion("Runs", open=True):
        with gr.Row():
            run_filter = gr.Textbox(label="Filter (name, policy, adapter)", scale=3, elem_id="runs-filter")
            run_kind = gr.Dropdown(["(any)", "rollout", "bench", "evolve", "ablate", "sft", "data import"], value="(any)",
                                   label="Kind", elem_id="runs-kind")
            run_sort = gr.Dropdown(list(RUN_SORTS), value="newest first", label="Sort", elem_id="runs-sort")
            relist = gr.Button("Refresh", size="sm", elem_id="runs-refresh")
        runs_table = gr.Dataframe(headers=RUN_HEADERS, interactive=False, wrap=True, max_height=260, elem_id="runs-table",
                                  column_widths=column_widths(RUN_HEADERS, {"run": 240, "policy": 170, "adapter": 150}))
        runs_note = gr.HTML(elem_id="runs-note")
    choices = s.request_choices()
    with gr.Row():
        req = gr.Dropdown(choices, value=choices[0] if choices else None, allow_custom_value=True, filterable=True, scale=4,
                          label="Request (a bench request, or type your own)", elem_id="traj-request")
        pol = gr.Dropdown(s.policy_choices(), value=EXPERT_NOISY, allow_custom_value=True, label="Policy", elem_id="traj-policy")
        k = gr.Slider(1, 8, value=4, step=1, label="K rollouts", elem_id="traj-k")
        seed = gr.Number(0, precision=0, label="Seed", elem_id="traj-seed")
        run_btn = gr.Button("Run K rollouts", variant="primary", elem_id="traj-run")
    with gr.Row():
        saved = gr.Dropdown(s.list_runs(), value=None, allow_custom_value=True, filterable=True, scale=4,
                            label="…or open a saved run (pick it above, or type its name)", elem_id="traj-saved")
        open_btn = gr.Button("Open", elem_id="traj-open")
    with gr.Row():
        page_req = gr.Dropdown([], value=None, label="Request in this run", scale=4, elem_id="traj-page-request")
        prev_btn = gr.Button("◀ Previous request (←)", elem_id="traj-prev")
        next_btn = gr.Button("Next request (→) ▶", elem_id="traj-next")
    status = gr.HTML(elem_id="traj-status")
    cols = gr.HTML(elem_id="traj-columns")
    with gr.Accordion("Best vs worst: where they part ways", open=True):
        diff = gr.HTML(elem_id="traj-diff")
    with gr.Accordion("Diff any two trajectories, turn by turn", open=False):
        with gr.Row():
            diff_a = gr.Dropdown([], label="Trajectory A", scale=2, elem_id="traj-diff-a")
            diff_b = gr.Dropdown([], label="Trajectory B", scale=2, elem_id="traj-diff-b")
            diff_btn = gr.Button("Diff", elem_id="traj-diff-btn")
        any_diff = gr.HTML(elem_id="traj-any-diff")
    with gr.Accordion("This run's cases: filter and sort, and its largest best–worst gaps", open=False):
        with gr.Row():
            f_cat = gr.Textbox(label="Category contains", elem_id="cases-category")
            f_term = gr.Dropdown(["", "answer", "max_rounds_reached", "no_answer", "error"], value="", label="Termination",
                                 elem_id="cases-termination")
            f_fail = gr.Textbox(label="Failure reason contains", elem_id="cases-failure")
            f_sort = gr.Dropdown([""] + list(SORTS), value="reward (low first)", label="Sort", elem_id="cases-sort")
            cases_btn = gr.Button("Show cases", elem_id="cases-show")
        cases = gr.Dataframe(headers=CASE_HEADERS, interactive=False, wrap=True, max_height=300, elem_id="cases-table")
        gaps = gr.Dataframe(headers=GAP_HEADERS, interactive=False, wrap=True, max_height=240, elem_id="cases-gaps",
                            label="Largest best–worst gaps (the pairs an experience would come from)")
    # What the URL should say, [run, request]: a component in the page (a gr.State lives on the server, and the page
    # script that writes the address would not see it).
    nav = gr.JSON([None, None], visible="hidden", elem_id="traj-nav")
    return SimpleNamespace(**{k: v for k, v in locals().items() if k != "s"})


def _handlers(s: Services, ui: SimpleNamespace) -> SimpleNamespace:
    from genevolve.records.runs import load_run

    runs_table, runs_note, req, pol, saved, page_req = pick(ui, 'runs_table runs_note req pol saved page_req')
    status, cols, diff, diff_a, diff_b, any_diff = pick(ui, 'status cols diff diff_a diff_b any_diff')
    nav, = pick(ui, 'nav')

    def listing(text="", kind="(any)", sort="newest first"):
        rows = run_rows(s.runs_dir)
        shown = filter_rows(rows, text, kind, sort)
        note = "" if rows else message("info", "No runs yet: run K rollouts above, or in a terminal "
                                               "`genevolve rollout -r bench-1000 -k 4` (the studio's runs folder is "
                                               f"{s.runs_dir}).")
        return {runs_table: shown, runs_note: note if rows or not shown else "",
                saved: gr.update(choices=s.list_runs() + [r[0] for r in rows if r[1] in ("evolve", "ablate", "sft")])}

    def show(name: str, request_id: str | None = None, step: int = 0) -> dict:
        """The run's page for ``request_id`` moved by ``step`` requests (the first request by default)."""
        if not (name or "").strip():
            raise StudioError("pick a saved run first")
        path = s.run_path(name)
        if not (path / "run.json").exists() and path.is_dir():
            raise StudioError(f"{name} is a training run, not a rollout: watch it in the Distill view "
                              f"(?view=distill&run={name})")
        try:
            run = load_run(path)
        except FileNotFoundError:
            raise StudioError(f"the run folder {path} no longer exists (deleted while open?)") from None
        ids = run_requests(run)
        i = ids.index(request_id) if request_id in ids else 0
        i = min(max(i + step, 0), max(len(ids) - 1, 0))
        rid = ids[i] if ids else None
        head, html_cols, html_diff = run_view(run, rid)
        texts = {r.id: r.text for r in run.requests}
        tids = [t.id for t in run.trajectories if t.request_id == rid]
        return {status: head, cols: html_cols, diff: html_diff, saved: gr.update(value=name),
                page_req: gr.update(choices=[(f"{j + 1}. {x} · {texts.get(x, '')}"[:140], x) for j, x in enumerate(ids)],
                                    value=rid),
                diff_a: gr.update(choices=tids, value=tids[0] if tids else None),
                diff_b: gr.update(choices=tids, value=tids[-1] if tids else None), any_diff: "", nav: [name, rid]}

    @safe(status)
    def run(value, policy, k_, seed_, progress=gr.Progress()):
        request = s.resolve_request(value)
        progress(0, desc=f"rolling out {int(k_)} trajectories")
        path = s.run_rollouts(request, policy, int(k_), int(seed_ or 0),
                              progress=lambda done, total: progress((done, total), desc="trajectories finished"))
        name = str(path.relative_to(s.runs_dir))
        note = message("info", s.request_note(request)) if s.request_note(request) else ""
        out = {**listing(), **show(name)}
        out[status] = note + out[status]
        out[saved] = gr.update(choices=s.list_runs(), value=name)
        return out

    @safe(status)
    def label(value):
        """Before anything runs: say whether the sandbox can read (and judge) the chosen or typed request."""
        if not (value or "").strip():
            return {status: ""}
        note = s.request_note(s.resolve_request(value))
        return {status: message("info", note) if note else ""}

    @safe(status)
    def pick_run(evt: gr.SelectData):
        name = evt.row_value[0] if evt.row_value else None
        return show(name)

    return SimpleNamespace(listing=listing, show=show, run=run, label=label, pick_run=pick_run)


def _run_handlers(s: Services, ui: SimpleNamespace, show) -> SimpleNamespace:
    """A run's two trajectories diffed, and its cases filtered, sorted and opened."""
    from genevolve.records.runs import load_run

    status, any_diff, cases, gaps = pick(ui, 'status any_diff cases gaps')

    @safe(status)
    def any_two(name, a, b):
        if not a or not b:
            raise StudioError("pick two trajectories of this request")
        run_ = load_run(s.run_path(name))
        by = {t.id: t for t in run_.trajectories}
        if a not in by or b not in by:
            raise StudioError("those trajectories are not in this run (reopen it)")
        return {any_diff: diff_html(by[a], by[b], run_.verdict(a), run_.verdict(b), labels=("A", "B"), turns=True)}

    @safe(status)
    def show_cases(name, cat, term, fail, sort):
        if not (name or "").strip():
            raise StudioError("open a run first")
        run_ = load_run(s.run_path(name))
        rows = case_rows(run_, cat, term, fail, sort)
        return {cases: rows, gaps: largest_gaps(run_),
                status: message("info", f"{len(rows)} of {len(run_.trajectories)} trajectories match")}

    @safe(status)
    def pick_case(name, evt: gr.SelectData):
        rid = evt.row_value[1] if evt.row_value else None
        return show(name, rid)

    return SimpleNamespace(any_two=any_two, show_cases=show_cases, pick_case=pick_case)


def tab(s: Services) -> list:
    ui = _layout(s)
    h = _handlers(s, ui)
    h.__dict__.update(vars(_run_handlers(s, ui, h.show)))
    runs_table, runs_note, req, pol, k, seed, run_btn = pick(ui, 'runs_table runs_note req pol k seed run_btn')
    saved, open_btn, page_req, prev_btn, next_btn = pick(ui, 'saved open_btn page_req prev_btn next_btn')
    status, cols, diff, diff_a, diff_b, diff_btn, any_diff = pick(ui, 'status cols diff diff_a diff_b diff_btn any_diff')
    run_filter, run_kind, run_sort, relist = pick(ui, 'run_filter run_kind run_sort relist')
    f_cat, f_term, f_fail, f_sort, cases_btn, cases, gaps, nav = pick(ui, 'f_cat f_term f_fail f_sort cases_btn cases gaps nav')
    listing, show, run, label, pick_run = h.listing, h.show, h.run, h.label, h.pick_run
    any_two, show_cases, pick_case = h.any_two, h.show_cases, h.pick_case
    page_outputs = [status, cols, diff, page_req, saved, diff_a, diff_b, any_diff, nav]
    list_outputs = [runs_table, runs_note, saved]
    sync = {"fn": None, "inputs": [nav], "outputs": [nav], "js": SYNC_URL}
    req.change(label, [req], [status])
    run_btn.click(run, [req, pol, k, seed], page_outputs + list_outputs).then(**sync)
    open_btn.click(safe(status)(show), [saved], page_outputs).then(**sync)
    page_req.input(safe(status)(show), [saved, page_req], page_outputs).then(**sync)
    prev_btn.click(safe(status)(lambda name, rid: show(name, rid, -1)), [saved, page_req], page_outputs).then(**sync)
    next_btn.click(safe(status)(lambda name, rid: show(name, rid, 1)), [saved, page_req], page_outputs).then(**sync)
    runs_table.select(pick_run, None, page_outputs).then(**sync)
    for trigger in (relist.click, run_filter.submit, run_kind.input, run_sort.input):
        trigger(safe(runs_note)(listing), [run_filter, run_kind, run_sort], list_outputs)
    diff_btn.click(any_two, [saved, diff_a, diff_b], [any_diff, status])
    cases_btn.click(show_cases, [saved, f_cat, f_term, f_fail, f_sort], [cases, gaps, status])
    cases.select(pick_case, [saved], page_outputs).then(**sync)
    gaps.select(pick_case, [saved], page_outputs).then(**sync)

    def open_link(params: dict[str, str]) -> dict:
        if not params.get("run"):
            return {}
        return safe(status)(show)(params["run"], params.get("request"))

    def relist(text="", kind="(any)", sort="newest first"):
        return tuple(listing(text, kind, sort).values()) + (gr.update(choices=s.policy_choices()),)

    return [Refresh(relist, list_outputs + [pol], inputs=[run_filter, run_kind, run_sort]),
            Link("trajectories", open_link, page_outputs, then=sync)]
