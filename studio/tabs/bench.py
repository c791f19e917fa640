"""Bench: a policy evaluated on a sandbox split or an official bench folder, results compared group by group, and
runs compared request by request (every sample, paired differences)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..services import Services
from ..bench import GENERATORS, bench_problem, load_summary, missing_html, summary_figure
from ..compare import compare_runs, headers, overall_text, pivot, request_sets, samples_html, sort_rows
from ..html import message
from ..services import RAW
from . import Link, Refresh, StudioError, pick, safe


def _layout(s: Services) -> SimpleNamespace:
    """The evaluate form, the results table and chart, and two runs side by side."""
    gr.Markdown("Evaluate a policy or a trained checkpoint on a sandbox split, or on a local GenEvolve-Bench folder scored "
                "by a VLM judge (KScore by track, category and difficulty: the mean over seeds, and its 95 % interval clipped "
                "to [0, 1] from 3 seeds on), then compare runs request by request.")
    status = gr.HTML(elem_id="bench-status")
    with gr.Row():
        pol = gr.Dropdown(s.policy_choices(), value=RAW, allow_custom_value=True, label="Policy or checkpoint", elem_id="bench-policy")
        split = gr.Dropdown(["bench", "evolve", "sft"], value="bench", label="Sandbox split")
        limit = gr.Number(24, precision=0, minimum=1, label="Requests (N spread over the split)", elem_id="bench-limit")
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
    table = gr.Dataframe(headers=["by", "group", "KScore"], interactive=False, wrap=True, max_height=360, elem_id="bench-table")
    missing_box = gr.HTML(elem_id="bench-missing")
    chart = gr.Plot(label="KScore by track, category, difficulty", elem_id="bench-chart")
    gr.Markdown("### Compare runs request by request\nEach run's mean over every sample and seed of a request, and the "
                "last run minus the first, paired by trajectory seed. Pick a request (or a row) to see every sample of "
                "every run side by side.")
    with gr.Row():
        runs_pick = gr.Dropdown(s.list_runs(), value=None, multiselect=True, label="Runs (two or more)", scale=4,
                                elem_id="bench-compare-runs")
        metric = gr.Radio(["reward", "kscore"], value="reward", label="Score", elem_id="bench-compare-metric")
        sort = gr.Dropdown(["Δ (largest first)", "Δ (smallest first)", "request"], value="Δ (largest first)", label="Sort",
                           elem_id="bench-compare-sort")
        compare_btn = gr.Button("Compare", elem_id="bench-compare")
    compare_note = gr.HTML(elem_id="bench-compare-note")
    compare_table = gr.Dataframe(headers=["request"], interactive=False, wrap=True, max_height=360, elem_id="bench-compare-table")
    with gr.Row():
        idx = gr.Dropdown([], value=None, label="Request", scale=4, elem_id="bench-idx")
        prev_btn = gr.Button("◀ Previous", elem_id="bench-prev")
        next_btn = gr.Button("Next ▶", elem_id="bench-next")
    page = gr.HTML(elem_id="bench-page")
    return SimpleNamespace(**{k: v for k, v in locals().items() if k != "s"})


def _handlers(s: Services, ui: SimpleNamespace) -> SimpleNamespace:
    status, table, missing_box, chart = pick(ui, 'status table missing_box chart')
    results, runs_pick = pick(ui, 'results runs_pick')

    def show_many(names):
        if not names:
            if not s.list_bench():
                raise StudioError("No bench results yet: Evaluate a policy above, or in a terminal `genevolve bench "
                                  f"--policy tiny --seeds 0,1,2 --out {s.runs_dir}/bench-tiny.json`.")
            raise StudioError("pick one or more results")
        summaries = {n: load_summary(s.run_path(n)) for n in names}
        heads, rows = pivot(summaries)
        problems = [f"{n}: {p}" for n, sm in summaries.items() if (p := bench_problem(sm))]
        warning = request_sets(summaries)
        shown = message("err", " · ".join(problems)) if problems else \
            message("warn", warning) if warning else message("ok", f"showing {', '.join(names)}")
        return {table: gr.update(value={"headers": heads, "data": rows}), chart: summary_figure(summaries),
                missing_box: missing_html(summaries), status: shown}

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
        out[runs_pick] = gr.update(choices=s.list_runs())
        return out

    c = _compare_handlers(s, ui)

    def open_link(params: dict[str, str]) -> dict:
        out = {}
        shown = [x for x in (params.get("results") or "").split(",") if x]
        if shown:
            out |= safe(status)(show_many)(shown) | {results: gr.update(choices=s.list_bench(), value=shown)}
        compared = [x for x in (params.get("runs") or "").split(",") if x]
        if compared:
            out |= c.compare(compared, params.get("metric") or "reward", "Δ (largest first)")
            out[runs_pick] = gr.update(choices=s.list_runs(), value=compared)
        return out

    return SimpleNamespace(show_many=show_many, evaluate=evaluate, compare=c.compare, show_request=c.show_request,
                           pick_row=c.pick_row, open_link=open_link)


def _compare_handlers(s: Services, ui: SimpleNamespace) -> SimpleNamespace:
    """Runs compared request by request: the per-request table and every sample of one request."""
    status, page, compare_note, compare_table, idx = pick(ui, 'status page compare_note compare_table idx')

    def _runs(names):
        from genevolve.records.runs import load_run

        if not names or len(names) < 2:
            raise StudioError("pick two or more runs to compare")
        try:
            return {n: load_run(s.run_path(n)) for n in names}
        except FileNotFoundError as exc:
            raise StudioError(f"{exc} (deleted while open?)") from None

    @safe(status)
    def compare(names, metric_, sort_):
        runs = _runs(names)
        c = compare_runs(runs, metric_ or "reward")
        col = {"Δ (largest first)": (len(c.names) + 2, True), "Δ (smallest first)": (len(c.names) + 2, False)}.get(sort_)
        rows = sort_rows(c.rows, *col) if col else c.rows
        note = (message("warn", c.warning) if c.warning else "") + message("info", overall_text(c, metric_ or "reward"))
        ids = [r[0] for r in rows]
        first = ids[0] if ids else None
        return {compare_table: gr.update(value={"headers": headers(c.names), "data": rows}), compare_note: note,
                idx: gr.update(choices=ids, value=first), page: samples_html(runs, first) if first else "",
                status: message("ok", f"compared {len(c.names)} runs on {len(c.requests)} requests")}

    @safe(status)
    def show_request(names, rid, step=0, choices=None):
        runs = _runs(names)
        ids = list(dict.fromkeys(t.request_id for t in next(iter(runs.values())).trajectories))
        ids = [i for i in ids if all(any(t.request_id == i for t in r.trajectories) for r in runs.values())]
        if not ids:
            raise StudioError("the runs share no request")
        i = ids.index(rid) if rid in ids else 0
        i = min(max(i + step, 0), len(ids) - 1)
        return {page: samples_html(runs, ids[i]), idx: gr.update(value=ids[i]),
                status: message("info", f"request {i + 1} of {len(ids)} in every run: {ids[i]}")}

    @safe(status)
    def pick_row(names, evt: gr.SelectData):
        rid = evt.row_value[0] if evt.row_value else None
        return show_request(names, rid)

    return SimpleNamespace(compare=compare, show_request=show_request, pick_row=pick_row)


def tab(s: Services) -> list[Refresh]:
    ui = _layout(s)
    h = _handlers(s, ui)
    status, table, missing_box, chart, page, pol, split = pick(ui, 'status table missing_box chart page pol split')
    limit, seeds, eval_btn, results, show_btn, refresh = pick(ui, 'limit seeds eval_btn results show_btn refresh')
    runs_pick, metric, sort, compare_btn, compare_note, compare_table = pick(
        ui, 'runs_pick metric sort compare_btn compare_note compare_table')
    idx, prev_btn, next_btn, data, generator = pick(ui, 'idx prev_btn next_btn data generator')
    allow_missing, judge_url, judge_model, api_key = pick(ui, 'allow_missing judge_url judge_model api_key')
    show_many, evaluate, compare, show_request, pick_row = pick(h, 'show_many evaluate compare show_request pick_row')
    eval_btn.click(evaluate, [pol, split, limit, seeds, data, generator, allow_missing, judge_url, judge_model, api_key],
                   [table, chart, missing_box, status, results, runs_pick])
    show_btn.click(safe(status)(show_many), [results], [table, chart, missing_box, status])
    compare_outputs = [compare_table, compare_note, idx, page, status]
    compare_btn.click(compare, [runs_pick, metric, sort], compare_outputs)
    sort.input(compare, [runs_pick, metric, sort], compare_outputs)
    metric.input(compare, [runs_pick, metric, sort], compare_outputs)
    compare_table.select(pick_row, [runs_pick], [page, idx, status])
    idx.input(lambda names, rid: show_request(names, rid), [runs_pick, idx], [page, idx, status])
    prev_btn.click(lambda names, rid: show_request(names, rid, -1), [runs_pick, idx], [page, idx, status])
    next_btn.click(lambda names, rid: show_request(names, rid, 1), [runs_pick, idx], [page, idx, status])
    lists = Refresh(lambda: (gr.update(choices=s.list_bench()), gr.update(choices=s.list_runs()),
                             gr.update(choices=s.policy_choices())), [results, runs_pick, pol])
    refresh.click(lists.fn, None, lists.outputs)
    return [lists, Link("bench", h.open_link, [table, chart, missing_box, status, results, runs_pick, *compare_outputs])]
