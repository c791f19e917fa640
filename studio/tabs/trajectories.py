"""Trajectories: K rollouts of one request, or a saved run, side by side with best and worst marked."""

from __future__ import annotations

import gradio as gr

from ..services import Services
from ..html import message, run_view
from ..services import EXPERT_NOISY
from . import StudioError, safe


def tab(s: Services) -> None:
    from genevolve.records.runs import load_run

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
    def open_run(name):
        return show(name)

    @safe(status)
    def label(value):
        """Before anything runs: say whether the sandbox can read (and judge) the chosen or typed request."""
        if not (value or "").strip():
            return {status: ""}
        note = s.request_note(s.resolve_request(value))
        return {status: message("info", note) if note else ""}

    req.change(label, [req], [status])
    run_btn.click(run, [req, pol, k, seed], [status, cols, diff, saved])
    open_btn.click(open_run, [saved], [status, cols, diff])
    refresh.click(lambda: gr.update(choices=s.list_runs()), None, [saved])
