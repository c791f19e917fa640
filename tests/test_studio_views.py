"""The studio's pure functions: records in, UI values out (no server, no browser)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from genevolve.agent.guides import SLOTS
from genevolve.records.schema import (Experience, ImageRef, Observation, Program, ProgramRef, Request, ToolCall, Trajectory, Turn,
                               Verdict)
from studio import StudioError
from studio.bench import bench_problem, load_summary, missing_html, missing_lines, summary_figure
from studio.compare import pivot
from studio.distill import (curves_figure, distill_args, latest_pairs, new_experiences, probe_request_id, read_live,
                            report_parts, status_text)
from studio.html import (FOLD_CHARS, best_and_worst, columns_html, diff_rows, first_divergence, gap_colour, token_gap_html,
                         trajectory_column, verdict_html)
from studio.tables import experience_rows, filter_experiences, form_slots, history_rows


def traj(tid, queries=("flag of Veloria",), skills=("spatial_layout",), prompt="A flag in the top of the image.", obs_text="ok"):
    turns = []
    images = [ImageRef(img_id="IMG_001", title="Official flag of Veloria", local_path="/nonexistent.png")]
    for i, q in enumerate(queries):
        turns.append(Turn(index=len(turns), raw="", think=f"look {q}", tool_call=ToolCall(name="image_search", arguments={"query": q}),
                          observation=Observation(tool="image_search", text=obs_text, images=images)))
    for s in skills:
        turns.append(Turn(index=len(turns), raw="", think="skill", tool_call=ToolCall(name="query_knowledge", arguments={"skill_name": s}),
                          observation=Observation(tool="query_knowledge", text="card")))
    program = Program(gen_prompt=prompt, reference_images=[ProgramRef(img_id="IMG_001", note="copy it")])
    turns.append(Turn(index=len(turns), raw="<answer>", answer=program))
    return Trajectory(id=tid, request_id="bench-1", request_text="Draw the flag of Veloria at the top", turns=turns,
                      images=images, program=program)


def verdict(tid, reward, **kw):
    return Verdict(trajectory_id=tid, request_id="bench-1", reward=reward, kscore=reward, F=1, V=reward, A=0.5, **kw)


REQ = Request(id="bench-1", text="Draw the flag of Veloria at the top", track="knowledge", category="flag", difficulty=2)


def no_src(_):
    return None


def test_columns_mark_best_and_worst_and_fold_long_observations():
    a, b = traj("a", obs_text="x" * (FOLD_CHARS + 1)), traj("b")
    html = columns_html(REQ, [a, b], {"a": verdict("a", 0.9), "b": verdict("b", 0.2)}, no_src)
    assert 'data-columns="2"' in html and html.count('class="ge-col ') == 2
    assert 'ge-col ge-best" data-traj="a"' in html and 'ge-col ge-worst" data-traj="b"' in html
    assert f"observation ({FOLD_CHARS + 1} characters)" in html  # long observation folded
    assert "IMG_001" in html and 'data-missing="reference file not found"' in html  # the slot says why it is empty
    marks = best_and_worst([a, b], {"a": verdict("a", 0.5), "b": verdict("b", 0.5)})
    assert (marks.best, marks.worst, marks.gap) == ((), (), None)  # all tied: nothing is marked


def test_every_trajectory_tied_at_the_top_is_best_and_a_small_gap_says_so():
    trajs = [traj(x) for x in "abcd"]
    v = {"a": verdict("a", 1.0), "b": verdict("b", 1.0), "c": verdict("c", 1.0), "d": verdict("d", 0.912)}
    marks = best_and_worst(trajs, v)
    assert marks.best == ("a", "b", "c") and marks.worst == ("d",) and marks.gap == pytest.approx(0.088) and marks.small
    html = columns_html(REQ, trajs, v, no_src)
    assert html.count("ge-col ge-best") == 3 and html.count("BEST (tied, 3) · small gap 0.088") == 3
    assert "WORST · small gap 0.088" in html
    wide = best_and_worst(trajs[:2] + trajs[3:], {**v, "b": verdict("b", 0.1)})
    assert wide.best == ("a",) and wide.worst == ("b",) and not wide.small
    assert "small gap" not in columns_html(REQ, trajs[:2], {"a": verdict("a", 1.0), "b": verdict("b", 0.1)}, no_src)


def test_column_escapes_model_text():
    t = traj("a", prompt='<script>alert("x")</script>')
    html = trajectory_column(t, verdict("a", 0.4), no_src)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_verdict_shows_scores_or_why_it_was_not_judged():
    assert "KScore <b>0.700</b>" in verdict_html(verdict("a", 0.7))
    assert "T <b>–</b>" in verdict_html(verdict("a", 0.7))
    assert "not judged: no program" in verdict_html(Verdict(trajectory_id="a", request_id="r", failed="no program (no_answer)"))


def test_diff_finds_where_best_and_worst_part_ways():
    best = traj("best", queries=("fact", "flag of Veloria"), skills=("spatial_layout", "quantity_counting"),
                prompt="A flag in the top of the image. Exactly three stars.")
    worst = traj("worst", queries=("fact", "flag"), skills=("spatial_layout",), prompt="A flag. Three stars.")
    rows = {r["aspect"]: r for r in diff_rows(best, worst)}
    assert rows["tools"]["same"] is False and rows["references"]["same"] is True
    assert rows["skills"]["best"] == ["spatial_layout", "quantity_counting"]
    assert first_divergence(best, worst) == 1
    assert first_divergence(best, best) is None


def test_token_gap_view_colours_by_teacher_minus_student_and_hovers_both():
    tokens = [{"t": "<|im_start|>user\nDraw", "a": 0}, {"t": "<think>", "a": 1, "p": math.log(0.5), "q": math.log(0.9)},
              {"t": "bad", "a": 1, "p": math.log(0.8), "q": math.log(0.1)}, {"t": "x" * 500, "a": 0},
              {"t": "late", "a": 1, "p": -1.0}]
    html = token_gap_html(tokens)
    assert 'data-scored="2"' in html
    assert "student p=0.500" in html and "teacher q=0.900" in html
    assert gap_colour(math.log(0.9) - math.log(0.5)).startswith("rgba(26,127,55") and gap_colour(-2).startswith("rgba(207,34,46")
    assert "context (500 characters)" in html  # long observations fold
    assert "no teacher" in html
    assert "no tokens yet" in token_gap_html([])


def test_distill_args_follow_the_cli_and_refuse_bad_values(tmp_path):
    args = distill_args("evolve", tmp_path / "r", arms=["ved"], steps=2, b=2, k=2, gate=-1.0, max_new_tokens=64)
    assert args[:3] == ["evolve", "--out", str(tmp_path / "r")] and "--no-grpo" in args and "--no-ved" not in args
    assert args[args.index("-K") + 1] == "2" and "--quick" in args
    a = distill_args("ablate", tmp_path / "a", arms=["grpo+ved", "sft"], quick=False)
    assert a[a.index("--arms") + 1] == "sft,grpo+ved" and "--quick" not in a
    for kw, msg in (({"arms": []}, "at least one"), ({"k": 1}, "K must be"), ({"gate": 2.0}, "gate"),
                    ({"steps": 0}, "steps must be"), ({"delta_min": -0.1}, "δ_min")):
        with pytest.raises(StudioError, match=msg):
            distill_args("evolve", tmp_path / "r", **kw)


def test_the_probe_request_goes_to_evolve_as_an_id():
    known = {"evolve-0003", "bench-0960"}
    assert probe_request_id("evolve-0003 · Draw the flag", known) == "evolve-0003"
    assert probe_request_id(" bench-0960 ", known) == "bench-0960" and probe_request_id("", known) is None
    assert probe_request_id(None, known) is None
    with pytest.raises(StudioError, match="not a sandbox request id"):
        probe_request_id("Draw anything", known)
    args = distill_args("evolve", Path("r"), probe_request="evolve-0003")
    assert args[args.index("--probe-request") + 1] == "evolve-0003"
    assert "--probe-request" not in distill_args("evolve", Path("r"))
    args = distill_args("ablate", Path("r"), arms=["sft", "ved"], probe_request="evolve-0003")
    assert args[0] == "ablate" and args[args.index("--probe-request") + 1] == "evolve-0003"


def _curves(fig) -> dict[str, dict[str, tuple[list, list]]]:
    """What a curves figure shows: panel title -> line label -> (steps, values)."""
    return {ax.get_title(): {ln.get_label(): ([float(x) for x in ln.get_xdata()], [float(y) for y in ln.get_ydata()])
                             for ln in ax.get_lines()} for ax in fig.axes}


def _bars(fig) -> dict[str, dict[str, list[tuple[str, float, float]]]]:
    """What a bar figure shows: panel title -> run -> [(x label, bar height, error-bar half-height)]."""
    out = {}
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_xticklabels()]
        out[ax.get_title()] = {}
        for bars in ax.containers:
            if not hasattr(bars, "patches"):
                continue
            segments = bars.errorbar.lines[2][0].get_segments() if bars.errorbar else []
            halves = [abs(float(seg[1][1] - seg[0][1])) / 2 for seg in segments] or [0.0] * len(bars.patches)
            out[ax.get_title()][bars.get_label()] = [(lab, b.get_height(), h) for lab, b, h in zip(labels, bars.patches, halves)]
    return out


def _write_run(out: Path, steps: int = 2):
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"steps": 3}))
    rows = [{"step": s, "reward_mean": 0.1 * s, "ved_loss": 0.5 / s, "grpo_loss": -0.1, "retrieval_hit_rate": 0.5, "bank_size": s}
            for s in range(1, steps + 1)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "rew')  # torn last line
    (out / "pairs.jsonl").write_text(json.dumps({"step": 2, "request_id": "evolve-1", "request": "x", "best": "a", "worst": "b",
                                                 "best_reward": 0.9, "worst_reward": 0.3, "gap": 0.6, "experience": "exp-1"}) + "\n")
    exp = Experience(id="exp-1", source_request_id="evolve-1", source_request="x", slots={s: "Do it." for s in SLOTS})
    (out / "bank").mkdir()
    (out / "bank" / "experiences.jsonl").write_text(exp.model_dump_json() + "\n")


def test_read_live_tolerates_a_run_in_progress_and_a_deleted_folder(tmp_path):
    out = tmp_path / "run"
    _write_run(out)
    live = read_live(out)
    assert live.exists and not live.running and live.points == 2 and live.steps_planned == 3 and live.probe is None
    assert latest_pairs(live.pairs)[0][-1] == "exp-1"
    assert [e.id for e in new_experiences(out, live.pairs)] == ["exp-1"]
    assert "steps logged 2/3" in status_text(live) and "reward 0.200" in status_text(live)
    assert "ETA" not in status_text(live)  # not running: no ETA
    from genevolve.evaluation import estimate as est

    est.save(out, est.Estimate(60.0, 1.0, "test", est.plan_evolve(3, 2, 2, False, 5)))
    job = {"state": "running", "out": str(out)}
    assert "ETA" in status_text(read_live(out), job)  # from the logged steps (no seconds here: 0 s each)
    # the two logged steps of _write_run (the torn third line is not drawn), one line per panel
    assert _curves(curves_figure(live.metrics)) == {
        "reward (mean)": {"run": ([1, 2], pytest.approx([0.1, 0.2]))}, "VED loss": {"run": ([1, 2], pytest.approx([0.5, 0.25]))},
        "GRPO loss": {"run": ([1, 2], pytest.approx([-0.1, -0.1]))}, "retrieval hit rate": {"run": ([1, 2], pytest.approx([0.5, 0.5]))}}
    import shutil

    shutil.rmtree(out)
    gone = read_live(out)
    assert not gone.exists and "does not exist" in status_text(gone)


def test_status_names_the_phase_inside_a_step_and_the_log_keeps_the_runs_own_lines(tmp_path):
    """The quick distill once said "0/2 steps" while step-1 pairs were on screen, and its log showed only weight
    loading bars and a FutureWarning."""
    import time

    from genevolve.evaluation import estimate as est
    from genevolve.records.live import ProgressWriter
    from studio.distill import eta_text, log_lines

    out = tmp_path / "run"
    _write_run(out, steps=0)
    est.save(out, est.Estimate(60.0, 1.0, "test", est.plan_evolve(2, 4, 4, True, 24)))
    ProgressWriter(out, 2)(1, "rollouts", 31, 48)
    job = {"state": "running", "out": str(out)}
    text = status_text(read_live(out), job)
    assert "step 1/2: rollouts 31/48" in text and "estimated before the first step" not in text and "ETA" in text
    ProgressWriter(out, 2)(1, "update")
    assert "step 1/2: teacher scoring and update" in status_text(read_live(out), job)
    late = read_live(out)
    assert "behind the start's estimate" in eta_text(late, now=time.time() + 600)
    ProgressWriter(out, 2)(2, "comparison")
    assert "comparing before / after on the bench" in status_text(read_live(out), job)
    log = ("Loading weights:   0%|          | 0/103 [00:00<?, ?it/s]\rLoading weights: 100%|##| 103/103 [00:00<00:00, 1it/s]\n"
           "/x/modeling_utils.py:3314: FutureWarning: `is_gradient_checkpointing` is deprecated\n  warnings.warn(\n"
           "expected time: about 1 min\nstep 1/2 [grpo+ved] reward 0.4 kscore 0.5\n")
    assert log_lines(log) == "expected time: about 1 min\nstep 1/2 [grpo+ved] reward 0.4 kscore 0.5"


def test_read_live_of_an_ablation_has_one_curve_per_arm(tmp_path):
    _write_run(tmp_path / "abl" / "grpo-s0")
    _write_run(tmp_path / "abl" / "ved-s0", steps=1)
    (tmp_path / "abl" / "report").mkdir()
    (tmp_path / "abl" / "report" / "report.md").write_text("# R\n\n| a |\n\n![curve](curve_x.png)\n")
    (tmp_path / "abl" / "report" / "curve_x.png").write_bytes(b"png")
    live = read_live(tmp_path / "abl")
    assert set(live.metrics) == {"grpo-s0", "ved-s0"} and live.points == 3 and live.report is not None
    fig = curves_figure(live.metrics)
    assert _curves(fig)["VED loss"] == {"grpo-s0": ([1, 2], pytest.approx([0.5, 0.25])), "ved-s0": ([1], pytest.approx([0.5]))}
    assert all(set(panel) == {"grpo-s0", "ved-s0"} for panel in _curves(fig).values())
    assert sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts()) == ["grpo-s0", "ved-s0"]
    body, images = report_parts(live.report)
    assert "![" not in body and "| a |" in body and [p.name for p in images] == ["curve_x.png"]


def bench_summary(reqs, verdicts_by_seed):
    from genevolve.evaluation.bench import aggregate, over_seeds

    return over_seeds({s: aggregate(zip(reqs, vs)) for s, vs in verdicts_by_seed.items()})


def test_bench_summary_table_chart_and_both_file_shapes(tmp_path):
    reqs = [REQ, REQ.model_copy(update={"id": "bench-2", "track": "quality", "category": "scene", "difficulty": 1})]
    by = bench_summary(reqs, {0: [verdict("a", 0.8), verdict("b", 0.4)], 1: [verdict("a", 0.6), verdict("b", 0.2)]})
    assert by["overall"]["all"]["kscore"]["mean"] == pytest.approx(0.5) and by["track"]["knowledge"]["n"] == 1
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"policy": "raw", "by": by}))
    summary = load_summary(tmp_path / "run")
    heads, rows = pivot({"raw": summary})
    assert heads == ["by", "group", "raw"] and rows[0] == ["overall", "all", "0.500 (n=2: too small for an interval)"]
    assert {r[0] for r in rows} == {"overall", "track", "category", "difficulty"}
    # Two seeds: the t interval (12.706 × sd 0.1414 / √2 = ± 1.27) is drawn nowhere, neither in the table nor as bars.
    assert "1.27" not in json.dumps(rows)
    assert _bars(summary_figure({"raw": summary})) == {
        "KScore by track": {"raw": [("knowledge", pytest.approx(0.7), 0), ("quality", pytest.approx(0.3), 0)]},
        "KScore by category": {"raw": [("flag", pytest.approx(0.7), 0), ("scene", pytest.approx(0.3), 0)]},
        "KScore by difficulty": {"raw": [("1", pytest.approx(0.3), 0), ("2", pytest.approx(0.7), 0)]}}
    three = bench_summary(reqs, {0: [verdict("a", 0.9), verdict("b", 0.4)], 1: [verdict("a", 1.0), verdict("b", 0.2)],
                                 2: [verdict("a", 0.95), verdict("b", 0.3)]})
    heads, rows = pivot({"raw": {"by": three}, "other": {"by": by}})
    ka = next(r for r in rows if r[1] == "knowledge")
    assert heads[-1] == "Δ" and ka[2].startswith("0.950 [") and ka[2].endswith(", 1.000]")  # clipped at 1
    assert ka[4] == f"{0.7 - 0.95:+.3f}"
    ax = summary_figure({"raw": {"by": three}}).axes[0]
    bars = next(c for c in ax.containers if hasattr(c, "patches"))
    lo, hi = bars.errorbar.lines[2][0].get_segments()[0][:, 1]
    half = 4.303 * 0.05 / 3 ** 0.5  # t(0.975, 2 df) x sd / sqrt(3) of 0.9, 1.0, 0.95
    assert lo == pytest.approx(0.95 - half, abs=1e-3) and hi == pytest.approx(1.0)  # the upper error stops at 1
    (tmp_path / "agg.json").write_text(json.dumps({"overall": {"all": {"n": 1, "failed": 0, "kscore": 0.3, "F": 1, "V": 0.2,
                                                                       "T": None, "A": 0.4, "r_text": 0, "reward": 0.3}}}))
    assert pivot({"x": load_summary(tmp_path / "agg.json")})[1][0][2] == "0.300"
    # A case that could not be judged is counted as missing and left out of the mean, never scored 0.
    unjudged = Verdict(trajectory_id="c", request_id="bench-2", F=None, V=None, A=None, kscore=None, r_text=None, reward=None,
                       failed="no ground truth")
    by = bench_summary(reqs, {0: [verdict("a", 0.8), unjudged]})
    assert by["overall"]["all"]["kscore"]["mean"] == pytest.approx(0.8) and by["overall"]["all"]["missing"] == 1
    with pytest.raises(StudioError, match="no bench summary"):
        load_summary(tmp_path / "missing")


def test_missing_cases_are_counted_and_a_dead_judge_is_named(tmp_path):
    from genevolve.evaluation.scoring import summarise

    reqs = [REQ, REQ.model_copy(update={"id": "bench-2", "track": "quality", "category": "scene"})]
    down = verdict("b", 0.0).model_copy(update={"failed": "judge failed: HTTP 503 overloaded"})
    # the shape `genevolve bench --data` and the studio save (seed keys become strings in JSON)
    part = {"by": {"overall": {}}, "missing": {"0": summarise(zip(reqs, [verdict("a", 0.8), down]))["missing"]}}
    (tmp_path / "s.json").write_text(json.dumps(part))
    one = load_summary(tmp_path / "s.json")
    line = missing_lines(one)[0]
    assert line.startswith("seed 0: 1 of 2 cases missing (left out of the means): judge failed × 1")
    assert line.endswith("KScore with them as 0: 0.400") and bench_problem(one) is None
    html = missing_html({"<run>": one, "sandbox": {"by": {}}})
    assert "&lt;run&gt;" in html and html.count("<li>") == 1  # a sandbox result has no missing cases to show
    none = {"missing": {"0": summarise(zip(reqs, [verdict("a", 0.8), verdict("b", 0.2)]))["missing"]}}
    assert missing_lines(none) == ["seed 0: no missing cases of 2"] and bench_problem(none) is None
    dead = {"missing": {"0": summarise(zip(reqs, [down, down.model_copy(update={"trajectory_id": "c"})]))["missing"]}}
    problem = bench_problem(dead)
    assert problem.startswith("every case is missing (judge failed): is the judge running")
    assert "First error: judge failed: HTTP 503 overloaded" in problem
    assert bench_problem({"by": {}}) is None


def test_experience_form_validation_and_tables():
    ok = ["Search first."] * 5
    assert form_slots(ok)["failure_avoidance"] == "Search first."
    with pytest.raises(StudioError, match="Skill activation is empty"):
        form_slots(["a", " ", "c", "d", "e"])
    with pytest.raises(StudioError, match="Prompt construction has 401 characters"):
        form_slots(["a", "b", "c", "x" * 401, "e"])
    e = Experience(id="exp-1", source_request_id="r", source_request="Draw a red circle", slots=dict(zip(SLOTS, ok)),
                   reward_gap=0.3, run_id="run-a")
    e2 = e.model_copy(update={"id": "exp-2", "reward_gap": 0.1, "run_id": "run-b",
                              "slots": {**e.slots, "prompt_construction": "Write exactly three."}})
    hits = [(0.9, e), (None, e2)]
    assert [x.id for _, x in filter_experiences(hits, slot_text="EXACTLY")] == ["exp-2"]
    assert [x.id for _, x in filter_experiences(hits, min_gap=0.2)] == ["exp-1"]
    assert [x.id for _, x in filter_experiences(hits, run="run-b")] == ["exp-2"]
    assert experience_rows(hits)[0][:2] == ["exp-1", 0.9] and experience_rows(hits)[1][1] == ""
    assert history_rows(e)[0][:2] == [1, "(current)"]


def test_a_missing_picture_says_why():
    a = traj("a")
    html = trajectory_column(a, verdict("a", 0.5, image="f" * 64), no_src, gt=None)
    assert 'data-missing="no ground truth for this request"' in html
    assert 'data-missing="rendered image missing from the run folder"' in html
    html = trajectory_column(a, Verdict(trajectory_id="a", request_id="bench-1", failed="renderer crashed"), no_src, gt="e" * 64)
    assert 'data-missing="render failed: renderer crashed"' in html
    assert 'data-missing="ground-truth image missing from the image store"' in html
    assert "[missing image]" not in html
    no_prog = a.model_copy(update={"program": None, "termination": "max_turns"})
    assert "no program, nothing rendered (max_turns)" in trajectory_column(no_prog, None, no_src)
    assert 'data-missing="not judged yet"' in trajectory_column(a, None, no_src)


def test_a_long_trajectory_starts_with_its_turns_folded():
    from studio.html import FOLD_TURNS

    short, long_ = traj("a", skills=["s"] * (FOLD_TURNS - 2)), traj("b", skills=["s"] * (FOLD_TURNS + 2))
    assert len(short.turns) <= FOLD_TURNS < len(long_.turns)
    assert '<details open class="ge-turns">' in trajectory_column(short, None, no_src)
    folded = trajectory_column(long_, None, no_src)
    assert '<details class="ge-turns">' in folded and "click to unfold" in folded


def test_curves_have_whole_step_ticks_even_for_one_step():
    from genevolve.records.live import MetricsRow

    row = MetricsRow.model_validate({"step": 1, "reward_mean": 0.5, "ved_loss": 0.4, "grpo_loss": -0.1, "retrieval_hit_rate": 0.7})
    fig = curves_figure({"run": [row]})
    fig.canvas.draw()
    for ax in fig.axes:
        shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert shown and all(float(t).is_integer() for t in shown), shown


def test_broken_bank_lines_are_named_by_file_and_line():
    from studio.tables import broken_note

    assert broken_note([]) == ""
    note = broken_note([f"/b/experiences.jsonl:{n}: bad" for n in (2, 5, 7, 9)])
    assert "4 broken line(s)" in note and "/b/experiences.jsonl:2: bad" in note and "and 1 more" in note
