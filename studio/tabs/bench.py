"""Bench: a policy evaluated on a sandbox split or an official bench folder, results compared, two runs paged side by side."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..services import Services
from ..bench import (GENERATORS, SUMMARY_HEADERS, bench_problem, common_requests, load_summary, missing_html, page_html,
                     summary_figure, summary_rows)
from ..html import message
from ..tables import column_widths
from ..services import RAW
from . import Refresh, StudioError, pick, safe


def _layout(s: Services) -> SimpleNamespace:
    """The evaluate form, the results table and chart, and two runs side by side."""
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
    table = gr.Dataframe(headers=["run"] + SUMMARY_HEADERS, interactive=False, wrap=True, max_height=360, elem_id="bench-table",
                         column_widths=column_widths(["run"] + SUMMARY_HEADERS, {"run": 220, "group": 160}))
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
    return SimpleNamespace(**{k: v for k, v in locals().items() if k != "s"})


def _handlers(s: Services, ui: SimpleNamespace) -> SimpleNamespace:
    status, table, missing_box, chart, page = pick(ui, 'status table missing_box chart page')
    results, = pick(ui, 'results')
    run_a, run_b, idx = pick(ui, 'run_a run_b idx')

    def show_many(names):
        if not names:
            raise StudioError("pick one or more results")
        summaries = {n: load_summary(s.run_path(n)) for n in names}
        rows = [[n] + r for n, sm in summaries.items() for r in summary_rows(sm)]
        problems = [f"{n}: {p}" for n, sm in summaries.items() if (p := bench_problem(sm))]
        shown = message("err", " · ".join(problems)) if problems else message("ok", f"showing {', '.join(names)}")
        return {table: rows, chart: summary_figure(summaries), missing_box: missing_html(summaries), status: shown}

    @safe(status)
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

    @safe(status)
    def compare(a, b_, i):
        from genevolve.records.runs import load_run

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

    return SimpleNamespace(show_many=show_many, evaluate=evaluate, compare=compare)


def tab(s: Services) -> list[Refresh]:
    ui = _layout(s)
    h = _handlers(s, ui)
    status, table, missing_box, chart, page, pol, split = pick(ui, 'status table missing_box chart page pol split')
    limit, seeds, eval_btn, results, show_btn, refresh = pick(ui, 'limit seeds eval_btn results show_btn refresh')
    run_a, run_b, idx, prev_btn, next_btn, data, generator = pick(ui, 'run_a run_b idx prev_btn next_btn data generator')
    allow_missing, judge_url, judge_model, api_key = pick(ui, 'allow_missing judge_url judge_model api_key')
    show_many, evaluate, compare = pick(h, 'show_many evaluate compare')
    eval_btn.click(evaluate, [pol, split, limit, seeds, data, generator, allow_missing, judge_url, judge_model, api_key],
                   [table, chart, missing_box, status, results, run_a, run_b])
    show_btn.click(safe(status)(show_many), [results], [table, chart, missing_box, status])
    lists = Refresh(lambda: (gr.update(choices=s.list_bench()), gr.update(choices=s.list_runs()), gr.update(choices=s.list_runs()),
                             gr.update(choices=s.policy_choices())), [results, run_a, run_b, pol])
    refresh.click(lists.fn, None, lists.outputs)
    for trigger, delta in ((idx.submit, 0), (prev_btn.click, -1), (next_btn.click, 1), (run_a.change, 0), (run_b.change, 0)):
        trigger(lambda a, b_, i, d=delta: compare(a, b_, (int(i or 1)) + d), [run_a, run_b, idx], [page, idx, status])
    return [lists]
