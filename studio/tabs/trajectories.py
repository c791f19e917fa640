"""Trajectories: K rollouts of one request, or a saved run, side by side with best and worst marked; a run
with several requests is paged request by request."""

from __future__ import annotations

import gradio as gr

from ..html import message, run_requests, run_view
from ..services import EXPERT_NOISY, Services
from . import Refresh, StudioError, safe


def tab(s: Services) -> list[Refresh]:
    from genevolve.records.runs import load_run

    gr.Markdown("Run K rollouts of one request, or open a saved run: the trajectories stand side by side, best and worst "
                "marked. A run over several requests is paged request by request.")
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
        open_btn = gr.Button("Open", elem_id="traj-open")
    with gr.Row():
        page_req = gr.Dropdown([], value=None, label="Request in this run", scale=4, elem_id="traj-page-request")
        prev_btn = gr.Button("◀ Previous request", elem_id="traj-prev")
        next_btn = gr.Button("Next request ▶", elem_id="traj-next")
    status = gr.HTML(elem_id="traj-status")
    cols = gr.HTML(elem_id="traj-columns")
    with gr.Accordion("Best vs worst: where they part ways", open=True):
        diff = gr.HTML(elem_id="traj-diff")

    def show(name: str, request_id: str | None = None, step: int = 0) -> dict:
        """The run's page for ``request_id`` moved by ``step`` requests (the first request by default)."""
        if not (name or "").strip():
            raise StudioError("pick a saved run first")
        path = s.run_path(name)
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
        return {status: head, cols: html_cols, diff: html_diff,
                page_req: gr.update(choices=[(f"{j + 1}. {x} · {texts.get(x, '')}"[:140], x) for j, x in enumerate(ids)],
                                    value=rid)}

    @safe(status)
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

    @safe(status)
    def label(value):
        """Before anything runs: say whether the sandbox can read (and judge) the chosen or typed request."""
        if not (value or "").strip():
            return {status: ""}
        note = s.request_note(s.resolve_request(value))
        return {status: message("info", note) if note else ""}

    page_outputs = [status, cols, diff, page_req]
    req.change(label, [req], [status])
    run_btn.click(run, [req, pol, k, seed], page_outputs + [saved])
    open_btn.click(safe(status)(show), [saved], page_outputs)
    page_req.input(safe(status)(show), [saved, page_req], page_outputs)
    prev_btn.click(safe(status)(lambda name, rid: show(name, rid, -1)), [saved, page_req], page_outputs)
    next_btn.click(safe(status)(lambda name, rid: show(name, rid, 1)), [saved, page_req], page_outputs)
    return [Refresh(lambda: (gr.update(choices=s.list_runs()), gr.update(choices=s.policy_choices())), [saved, pol])]
