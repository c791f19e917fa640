"""The integrity campaign's cases: each one a fault as an attacker or a careless user would cause it, what it did
before it was fixed (as reproduced then), and the tests that cause it again now and check the answer.

``benchmarks/faults.py --cases`` runs every case's tests and prints the table (case, before, after, test);
``--cases`` with ``--only WORD`` runs the cases whose name holds WORD.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (case, what it did before, tests that cause it now: "file::name" or "file::name[param]" or "file -k expr")
CASES: list[tuple[str, str, list[str]]] = [
    ("rollout --out <an evolve folder>", "accepted, even while it trained; its rows landed between training steps",
     ["tests/test_run_kinds.py::test_a_rollout_into_an_evolve_folder_is_refused_by_name_and_writes_nothing"]),
    ("evolve --out <a rollout folder>", "training rows appended to the rollout's; its summary still said n=2",
     ["tests/test_run_kinds.py::test_an_evolve_into_a_rollout_folder_is_refused_and_the_rollout_is_untouched"]),
    ("sft --out <an existing run folder>", "the folder was deleted and replaced, with no warning",
     ["tests/test_run_kinds.py::test_sft_never_deletes_a_run_folder_nor_replaces_a_model_without_force_new"]),
    ("data import --out <a run folder>", "pictures written into it before any check",
     ["tests/test_run_kinds.py::test_an_import_into_a_run_folder_is_refused_before_any_picture_is_written"]),
    ("evolve again on a finished run", "the bank rolled back to its checkpoint: studio edits and additions erased",
     ["tests/test_run_kinds.py::test_running_a_finished_evolve_again_keeps_the_studio_edits_made_since",
      "tests/test_resume_exact.py::test_a_cut_short_step_is_rolled_back_its_rows_and_only_its_own_bank_writes"]),
    ("two studio sessions save one experience", "the second save silently reverted the first (lost update)",
     ["tests/test_run_kinds.py::test_a_save_over_a_newer_version_is_refused_and_names_the_slots",
      "tests/test_studio_browser_nav.py::test_two_tabs_save_one_experience_and_the_second_save_is_refused_showing_both"]),
    ("a crafted checkpoint/state.pt", "code ran on resume (torch.load with weights_only=False)",
     ["tests/test_integrity_checkpoints.py::test_a_crafted_state_pt_runs_no_code_on_resume",
      "tests/test_integrity_checkpoints.py::test_state_pt_is_loaded_with_plain_types_only"]),
    ("30 wrong passwords with a new X-Forwarded-For each", "none throttled (the header was believed from loopback)",
     ["tests/test_integrity_serving.py::test_forwarded_for_is_believed_only_from_a_named_proxy",
      "tests/test_integrity_serving.py::test_the_studio_command_names_the_trusted_proxies"]),
    ("<script> / <img onerror> in model output", "passed raw into report.html",
     ["tests/test_integrity_serving.py::test_model_output_in_report_html_is_escaped",
      "tests/test_integrity_serving.py::test_model_output_in_the_studio_views_is_escaped"]),
    ("NUL, ESC, RLO in experience slots", "saved; they reached guides that serve then refused",
     ["tests/test_run_kinds.py::test_control_characters_in_slots_and_keys_are_refused"]),
    ("a 100 MB POST /login", "500 after 17.6 s (body joined chunk by chunk)",
     ["tests/test_integrity_serving.py::test_a_huge_login_body_gets_413_before_it_is_read"]),
    ("render-service: 4 x 4000^2 PNGs, 4 at once", "~330 MB each, decodes unbounded (1.57 GB)",
     ["tests/test_integrity_serving.py::test_render_service_refuses_too_many_pixels_from_the_headers",
      "tests/test_integrity_serving.py::test_render_service_decodes_a_bounded_number_at_once",
      "tests/test_integrity_serving.py::test_the_render_client_sends_references_that_fit_and_refuses_huge_answers"]),
    ("serve: two 4-token requests beside a 753-token generation", "they waited 71 s (for the whole batch)",
     ["tests/test_serve_join.py::test_a_compatible_job_joins_at_the_next_step_and_answers_as_alone",
      "tests/test_serve_join.py::test_short_requests_answer_within_2_s_beside_a_700_token_generation_of_the_tiny_policy"]),
    ("gateway: /search behind a 64 x 100 /images batch", "waited 32 s",
     ["tests/test_integrity_serving.py::test_a_search_is_answered_while_a_big_image_batch_runs"]),
    ("--timeout 5 against a server that trickles 1 byte/s", "the request took 268 s; a 100 MB answer was read whole",
     ["tests/test_integrity_serving.py -k trickles", "tests/test_integrity_serving.py::test_a_huge_answer_is_not_read_past_the_cap"]),
    ("a corrupted state.pt, a cut-short adapter, a full disk", "116-149-line tracebacks naming neither file nor cause",
     ["tests/test_integrity_checkpoints.py -k unreadable_state_pt", "tests/test_integrity_checkpoints.py::test_a_cut_short_adapter_is_named_in_one_line",
      "tests/test_integrity_checkpoints.py::test_a_full_disk_during_save_keeps_the_previous_checkpoint"]),
    ("bench with a read-only output", "the whole evaluation ran, then failed; results lost",
     ["tests/test_integrity_checkpoints.py::test_bench_refuses_an_unwritable_output_before_any_work"]),
    ("a truncated refs.faiss with its sidecar intact", "every image_search failed while the run exited 0",
     ["tests/test_integrity_checkpoints.py -k index"]),
    ("--missing zero", "KScore, F, V, A zeroed but T still 1.000",
     ["tests/test_integrity_checkpoints.py::test_missing_zero_counts_T_as_zero_too"]),
    ("a locked folder in the studio; a checkpoint of another policy; no state.pt", "28-99-line tracebacks",
     ["tests/test_integrity_checkpoints.py -k 'held_folder or another_policy or without_state_pt or one_error_line'"]),
]


def _pytest(target: str, junit: Path) -> list[tuple[str, str]]:
    """Run one target; (test name, outcome) for each test it ran."""
    path, _, rest = target.partition(" -k ")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "-m", "",
            path.strip()] + (["-k", rest.strip().strip("'")] if rest else [])
    subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if not junit.exists():
        return [(target, "error")]
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        kids = {c.tag for c in case}
        outcome = "failed" if kids & {"failure", "error"} else "skipped" if "skipped" in kids else "passed"
        out.append((case.get("name"), outcome))
    return out or [(target, "not found")]


def run_cases(only: str | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (case, before, targets) in enumerate(CASES):
            if only and only.lower() not in case.lower():
                continue
            results = [r for i, t in enumerate(targets) for r in _pytest(t, Path(tmp) / f"{n}-{i}.xml")]
            passed = sum(o == "passed" for _, o in results)
            after = "fixed" if passed == len(results) else f"{len(results) - passed} of {len(results)} tests not passing"
            rows.append({"case": case, "before": before, "after": after, "tests": targets, "results": results})
            print(f"{case}: {after}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | before | after | test |", "| --- | --- | --- | --- |"]
    for r in rows:
        tests = "<br>".join(f"`{t.split('::')[-1]}`" for t in r["tests"])
        lines.append(f"| {r['case']} | {r['before']} | {r['after']} | {tests} |")
    return "\n".join(lines)


def save(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cases": rows, "command": "benchmarks/faults.py --cases"}, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(rows) + "\n")
