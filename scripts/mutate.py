"""Mutation testing of the core: the modules whose bugs would silently change results.

``make mutate`` (or ``.venv/bin/python scripts/mutate.py [--module NAME ...]``) copies the project into a
temporary folder, runs mutmut there on one module at a time with that module's own focused tests, and
prints a score per module. The checkout is never written to except ``benchmarks/results/mutation.json``
and ``mutation.md``: mutmut's ``mutants/`` folder and caches live in the temporary copy.

Score = killed / (killed + survived). A timeout or a crash of the tests counts as killed; a mutant no
selected test reaches ("no tests") counts as survived. A surviving mutant listed in
``benchmarks/mutation_equivalent.toml`` (module, mutant name, the mutated line, the reason) is
*equivalent*: no test can tell it from the original, so it is left out of the score. An entry whose
mutated line no longer matches the mutant's diff is reported as stale and the mutant counts as survived.
The raw score, with the equivalent mutants counted as survived, is reported beside it. An entry with
``kind = "gpu-only"`` names a mutant on a line that only runs on a CUDA device (the CPU suite cannot reach
it): it is left out of the score the same way and listed apart, so that a GPU run can check it.

mutmut does not mutate module-level constants (thresholds, gates, caps, id patterns): the constants that set
results are tested directly, where they act, in ``tests/test_constants.py``.

Only some functions of ``genevolve/evaluation/report.py`` are mutated (its aggregation; plotting, example
images and file writing are left out, see ``MODULES``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.toml"


@dataclass
class Module:
    path: str
    tests: list[str]
    functions: list[str] = field(default_factory=list)  # mutate only these (all when empty)
    note: str = ""
    deselect: list[str] = field(default_factory=list)  # tests of the files above not run per mutant (slow, end to end)


MODULES: dict[str, Module] = {
    "losses": Module("genevolve/training/losses.py", ["tests/test_oracle_losses.py", "tests/test_losses.py"]),
    "bank": Module("genevolve/experience/bank.py", ["tests/test_oracle_bank.py", "tests/test_experience.py",
                                                   "tests/test_transfer.py", "tests/test_bank_edits.py"]),
    "validate": Module("genevolve/experience/validate.py", ["tests/test_validate.py", "tests/test_experience.py",
                                                           "tests/test_oracle_bank.py"]),
    "mining": Module("genevolve/experience/mining.py", ["tests/test_oracle_bank.py", "tests/test_experience.py"]),
    "judge": Module("genevolve/world/judge.py", ["tests/test_oracle_judge.py", "tests/test_oracle_judge_edges.py"]),
    "scoring": Module("genevolve/evaluation/scoring.py", ["tests/test_oracle_scoring.py", "tests/test_judges.py",
                                                         "tests/test_scoring_text.py"]),
    "protocol": Module("genevolve/agent/protocol.py", ["tests/test_oracle_protocol.py", "tests/test_protocol.py",
                                                      "tests/test_protocol_records.py"]),
    "bench": Module("genevolve/evaluation/bench.py", ["tests/test_oracle_bench.py", "tests/test_evaluation_api.py"]),
    "report": Module("genevolve/evaluation/report.py", ["tests/test_oracle_report.py", "tests/test_report.py"],
                     functions=["evaluate", "_fmt", "_n_seeds", "table", "_student_vs_teacher", "identical_arms"],
                     note="aggregation only: plot_curves (plotting), write_examples (example images), write_report, "
                          "teacher_section and ablation_run_record (files and report text) and adapter_distance "
                          "(a diagnostic read from adapter files) are not mutated"),
    "sampling": Module("genevolve/policies/sampling.py", ["tests/test_oracle_sampling.py", "tests/test_sampling_nucleus.py"]),
    "update": Module("genevolve/training/update.py", ["tests/test_training_oracles.py", "tests/test_update.py"]),
    "steps": Module("genevolve/training/steps.py", ["tests/test_training_oracles.py", "tests/test_steps.py"],
                    functions=["prompts_for", "probe_seed", "judge", "record_cases", "groups_of", "mine_and_summarise",
                               "advantages", "update_targets", "update", "_mean", "_std", "metrics_row", "record_step",
                               "summary_line", "check_same_config"],
                    note="the step's arithmetic and records; setup, collect_rollouts, probe_plan and probe (they build "
                         "the student, its tools and the live probe, and are run whole by tests/test_evolve.py, whose "
                         "50 s per mutant would make the module's run take hours) are not mutated"),
    "teacher": Module("genevolve/agent/teacher.py", ["tests/test_teacher.py", "tests/test_training_oracles.py"]),
    "continuous": Module("genevolve/policies/continuous.py", ["tests/test_engine_oracles.py", "tests/test_local_policy.py",
                                                             "tests/test_serve_join.py", "tests/test_continuous.py"],
                         deselect=["tests/test_serve_join.py::test_the_benchmark_runs_end_to_end_over_http",
                                   "tests/test_serve_join.py::test_short_requests_answer_within_2_s_beside_a_700_token_generation_of_the_tiny_policy"],
                         note="every function; two end-to-end serving tests (an HTTP server, a 700-token generation) are "
                              "not run per mutant: the join tests beside them drive the same batch directly"),
    "runs": Module("genevolve/records/runs.py", ["tests/test_records.py", "tests/test_runs.py"]),
    "lean": Module("genevolve/policies/lean.py", ["tests/test_lean.py"]),
}
# Files near the core that are not mutated, and why.
NOT_MUTATED = {
    "genevolve/experience/summarise.py": "it writes an experience's text from a mined pair; the mining itself "
                                         "(mine_pairs, evidence) is in mining.py",
}
KILLED = {"killed", "timeout", "segfault"}
SURVIVED = {"survived", "no tests", "suspicious"}


def ensure_mutmut() -> None:
    """Install the ``mutate`` extra's requirements into this interpreter when mutmut is missing."""
    try:
        import mutmut  # noqa: F401
    except ImportError:
        reqs = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["optional-dependencies"]["mutate"]
        print(f"installing the mutate extra: {' '.join(reqs)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *reqs], check=True)


def project_files(folders: tuple[str, ...]) -> list[str]:
    """The files git tracks or would track (not ignored) under ``folders``, as they are in the working tree."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *folders],
                         cwd=ROOT, capture_output=True, check=True).stdout.decode("utf-8")
    return sorted({p for p in out.split("\0") if p and (ROOT / p).is_file()})


def prepare_copy(name: str, mod: Module, tmp: Path) -> None:
    """The project's code, tests and world in ``tmp``, with mutmut configured for one module."""
    for rel in project_files(("genevolve", "tests", "assets/world")):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(ROOT / rel, tmp / rel)
        except FileNotFoundError:  # removed since it was listed (another process's temporary file)
            continue
    text = (ROOT / "pyproject.toml").read_text("utf-8")
    text = re.sub(r"(?ms)^\[tool\.mutmut\].*?(?=^\[|\Z)", "", text)
    cfg = {
        "source_paths": ["genevolve"],
        "only_mutate": [mod.path],
        "also_copy": ["assets/world"],
        "pytest_add_cli_args_test_selection": mod.tests,
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-W", "ignore", *(f"--deselect={t}" for t in mod.deselect)],
        "use_git_change_detection": False,
    }
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg.items())
    (tmp / "pyproject.toml").write_text(text.rstrip() + f"\n\n[tool.mutmut]\n{body}\n", "utf-8")


def mutant_prefix(mod: Module) -> str:
    return mod.path[:-3].replace("/", ".") + "."


def run_mutmut(name: str, mod: Module, tmp: Path, max_children: int) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    globs = [f"{mutant_prefix(mod)}x_{f}__mutmut_*" for f in mod.functions]
    cmd = ["nice", "-n", "19", sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children), *globs]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=tmp, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"mutmut failed on {name} (exit {proc.returncode}); run with --keep to inspect {tmp}")
    return time.time() - t0


_DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
path, names = sys.argv[1], json.loads(sys.stdin.read())
print(json.dumps({n: get_diff_for_mutant(n, path=path) for n in names}))
"""


def collect(name: str, mod: Module, tmp: Path) -> dict:
    """Every mutant's status, and the diff of each one that survived."""
    from mutmut.stats import status_by_exit_code

    meta = json.loads((tmp / "mutants" / (mod.path + ".meta")).read_text("utf-8"))
    codes = meta["exit_code_by_key"]
    if mod.functions:
        keep = tuple(f"{mutant_prefix(mod)}x_{f}__mutmut_" for f in mod.functions)
        codes = {k: v for k, v in codes.items() if k.startswith(keep)}
    status = {k: status_by_exit_code[v] for k, v in sorted(codes.items(), key=lambda kv: _order(kv[0]))}
    alive = [k for k, s in status.items() if s in SURVIVED]
    out = subprocess.run([sys.executable, "-c", _DIFFS, mod.path], cwd=tmp, input=json.dumps(alive),
                         capture_output=True, text=True, check=True)
    return {"status": status, "diffs": json.loads(out.stdout)}


def _order(key: str) -> tuple:
    head, _, n = key.rpartition("__mutmut_")
    return head, int(n) if n.isdigit() else 0


def added_lines(diff: str) -> list[str]:
    return [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]


def load_equivalent() -> dict[str, dict[str, dict]]:
    if not EQUIVALENT.exists():
        return {}
    data = tomllib.loads(EQUIVALENT.read_text("utf-8"))
    return {mod: {e["mutant"]: e for e in entries} for mod, entries in data.items()}


def score(name: str, mod: Module, found: dict, equivalent: dict[str, dict]) -> dict:
    status, diffs = found["status"], found["diffs"]
    counts: dict[str, int] = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    killed = sum(1 for s in status.values() if s in KILLED)
    survivors, equiv, stale = [], [], []
    for k, s in status.items():
        if s not in SURVIVED:
            continue
        short = k[len(mutant_prefix(mod)):]
        entry = equivalent.get(short)
        diff = diffs.get(k, "")
        row = {"mutant": short, "status": s, "diff": diff}
        if entry and " ".join(entry["line"].split()) in [" ".join(x.split()) for x in added_lines(diff)]:
            equiv.append(row | {"reason": entry["reason"], "kind": entry.get("kind", "equivalent")})
        else:
            if entry:
                stale.append(short)
            survivors.append(row)
    n_survived = len(survivors) + len(equiv)
    tested = killed + n_survived
    return {
        "module": mod.path, "tests": mod.tests, "functions": mod.functions or "all", "note": mod.note,
        "mutants": len(status), "killed": killed, "survived": len(survivors),
        "equivalent": sum(e["kind"] != "gpu-only" for e in equiv), "gpu_only": sum(e["kind"] == "gpu-only" for e in equiv),
        "by_status": counts,
        "score": round(killed / (killed + len(survivors)), 4) if killed + len(survivors) else None,
        "raw_score": round(killed / tested, 4) if tested else None,
        "survivors": survivors, "equivalents": equiv, "stale_equivalents": stale,
    }


def markdown(results: dict[str, dict], seconds: dict[str, float] | None = None) -> str:
    """The report; with ``seconds`` (printed, never saved, so that a re-run leaves the files as they were) a time column."""
    lines = ["# Mutation testing of the core", "",
             "`make mutate` (scripts/mutate.py, mutmut 3.8.1). Score = killed / (killed + survived), timeouts counted "
             "as killed and mutants no test reaches as survived; equivalent mutants (benchmarks/mutation_equivalent.toml) "
             "are left out of the score and counted as survived in the raw score; so are GPU-only mutants, on lines "
             "that only run on a CUDA device.", "",
             "mutmut does not mutate module-level constants (gates, thresholds, caps, id patterns): the constants that "
             "set results are tested directly, where they act, in `tests/test_constants.py`.", "",
             "| module | file | mutants | killed | survived | equivalent | GPU-only | score | raw score |"
             + (" seconds |" if seconds else ""),
             "| --- " * (10 if seconds else 9) + "|"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    for name, r in results.items():
        lines.append(f"| {name} | `{r['module']}` | {r['mutants']} | {r['killed']} | {r['survived']} | {r['equivalent']} "
                     f"| {r.get('gpu_only', 0)} "
                     f"| {pct(r['score'])} | {pct(r['raw_score'])} |" + (f" {seconds[name]:.0f} |" if seconds else ""))
    lines += [""] + [f"Not mutated: `{path}`: {why}." for path, why in NOT_MUTATED.items()]
    for name, r in results.items():
        lines += ["", f"## {name}: `{r['module']}`", "", "Tests: " + ", ".join(f"`{t}`" for t in r["tests"]) + "."]
        if r["note"]:
            lines += ["", f"Mutated: {r['note']}."]
        groups = (("Surviving mutants", r["survivors"]),
                  ("Equivalent mutants", [e for e in r["equivalents"] if e.get("kind") != "gpu-only"]),
                  ("GPU-only mutants (lines the CPU suite cannot reach)",
                   [e for e in r["equivalents"] if e.get("kind") == "gpu-only"]))
        for title, rows in groups:
            lines += ["", f"### {title} ({len(rows)})"]
            for row in rows:
                why = f" — {row['reason']}" if row.get("reason") else ""
                lines += ["", f"`{row['mutant']}` ({row['status']}){why}", "", "```diff", row["diff"], "```"]
        if r["stale_equivalents"]:
            lines += ["", "Stale entries in the equivalence file (the mutant changed): " + ", ".join(r["stale_equivalents"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", action="append", choices=list(MODULES), help="run only this module (repeatable)")
    ap.add_argument("--max-children", type=int, default=1, help="mutmut workers (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies (their paths are printed)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for mutation.json and mutation.md")
    args = ap.parse_args(argv)
    ensure_mutmut()
    names = args.module or list(MODULES)
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "mutation.json"
    results = json.loads(out_json.read_text("utf-8")) if out_json.exists() else {}
    equivalent = load_equivalent()
    t_all, seconds = time.time(), {}
    for i, name in enumerate(names, 1):
        mod = MODULES[name]
        print(f"\n=== [{i}/{len(names)}] {name}: {mod.path} (tests: {' '.join(mod.tests)})", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"genevolve-mutate-{name}-"))
        try:
            prepare_copy(name, mod, tmp)
            seconds[name] = run_mutmut(name, mod, tmp, args.max_children)
            results[name] = score(name, mod, collect(name, mod, tmp), equivalent.get(name, {}))
        finally:
            if args.keep:
                print(f"kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        r = results[name]
        print(f"=== {name}: {r['killed']} killed, {r['survived']} survived, {r['equivalent']} equivalent, "
              f"{r['gpu_only']} GPU-only of "
              f"{r['mutants']} mutants: score {100 * (r['score'] or 0):.1f} % ({seconds[name]:.0f} s)", flush=True)
        results = {k: results[k] for k in MODULES if k in results}
        out_json.write_text(json.dumps(results, indent=1) + "\n", "utf-8")
        (args.out / "mutation.md").write_text(markdown(results), "utf-8")
    print("\n" + markdown({k: results[k] for k in names}, seconds).split("\n\n## ")[0].split("\n\n", 2)[-1])
    print(f"\n{len(names)} module(s) in {time.time() - t_all:.0f} s; results in {out_json} and {args.out / 'mutation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
