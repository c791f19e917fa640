"""The method's two experiments as library calls, for the CLI, the studio's jobs and notebooks.

- :func:`compare_after_training`: a trained run's student before and after on the bench, and the
  teacher where it gets a guide; writes ``<run>/report/``.
- :func:`run_ablation`: SFT-only, +GRPO, +VED and +GRPO+VED at the same budget over several seeds,
  mean ± 95 % CI over seeds and gains paired by seed; resumable: every arm and seed's evaluation is
  saved whole when it finishes and loaded, not run again, by a later call on the same folder.

Training itself is the caller's ``train(cfg)`` (the CLI's handles a locked folder and a stop request).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ARMS = ("sft", "grpo", "ved", "grpo+ved")


class SettingsMismatch(ValueError):
    """An ablation folder holds results made with other settings."""


def gate_of(cfg) -> float:
    """A training config's retrieval gate (its key's default when it names none)."""
    from ..experience.bank import default_gate

    return default_gate(cfg.retrieval_key) if cfg.gate is None else cfg.gate


def bench_requests(world, quick: bool, n: int | None) -> list:
    """The bench requests of a comparison: all of them, ``n`` spread evenly, or 24 for a quick run."""
    from .estimate import default

    reqs = world.split("bench")
    n = default("evolve", "eval_requests", quick, n)
    return reqs[:: max(1, len(reqs) // n)][:n] if n else reqs


def compare_after_training(cfg, world, requests: list, seeds: list[int], samples: int, seconds_training: float,
                           log: Callable[[str], None]) -> Path:
    """Bench the student before and after the run ``cfg.out`` trained, and the teacher where it gets a guide;
    write the report folder and return ``report.md``."""
    from ..policies.resolve import resolve_policy
    from ..records.schema import ImageStore, atomic_write_json
    from .report import evaluate, teacher_section, write_report

    t0, out = time.time(), Path(cfg.out)
    before = resolve_policy(cfg.policy)
    after = resolve_policy(cfg.policy, adapter=str(out / "checkpoint" / "adapter"))
    results = {}
    for name, pol in (("student (before)", before), ("student (after)", after)):
        pol.name = name
        store = ImageStore(out / "report" / "images" / name.split()[0])
        results[name] = evaluate(world, pol, requests, seeds, store=store, progress=log, samples=samples) | {"store": store}
    teacher_md, teacher = teacher_section(world, after, out / "bank", requests, seeds, gate_of(cfg), samples, log,
                                          key=cfg.retrieval_key)
    extra = teacher_md + f"\n\nTraining took {seconds_training:.0f} s; total {seconds_training + time.time() - t0:.0f} s."
    report = write_report(out / "report", f"Distill and compare: {cfg.policy}, {cfg.arm}", results, world,
                          {cfg.arm: [out / "metrics.jsonl"]}, extra,
                          config=cfg.__dict__ | {"eval_requests": len(requests), "eval_seeds": seeds, "eval_samples": samples})
    atomic_write_json(out / "report" / "teacher.json", teacher)
    return report


# ---------------------------------------------------------------------------
# The ablation
# ---------------------------------------------------------------------------


@dataclass
class Ablation:
    """What an ablation runs. ``settings`` is recorded in ``ablate_config.json``; ``make_cfg(arm, seed, out)``
    gives a trained arm's :class:`~genevolve.training.evolve.EvolveConfig`."""

    out: Path
    policy: str
    arms: list[str]
    seeds: list[int]
    requests: list
    samples: int
    params: Any  # SamplingParams of the evaluations
    settings: dict[str, Any]
    make_cfg: Callable[[str, int, Path], Any]
    teacher: bool = True


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Record what an ablation folder runs; a folder that ran other settings raises :class:`SettingsMismatch`
    (resuming would mix results)."""
    from ..records.schema import atomic_write_json

    path = out / "ablate_config.json"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, settings)
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    if old != settings:
        diff = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(v)}" for k, v in settings.items() if old.get(k) != v)
        raise SettingsMismatch(f"{out} holds an ablation run with other settings ({diff}). Re-run with the same settings "
                               "to resume it (arms and seeds may change), or choose another --out.")


def _short(v) -> str:
    return f"{len(v)} requests" if isinstance(v, list) else repr(v)


def save_eval(eval_dir: Path, res: dict) -> None:
    """An arm-seed's evaluation (summary, trajectories, verdicts), swapped in whole: the folder exists only when done."""
    from ..records.schema import atomic_write_json, replace_dir, write_jsonl

    tmp = eval_dir.with_name(eval_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_jsonl(tmp / "trajectories.jsonl", [r["trajectory"] for r in res["records"]])
    write_jsonl(tmp / "verdicts.jsonl", [r["verdict"] for r in res["records"]])
    atomic_write_json(tmp / "eval.json", {"summary": res["summary"], "records": [
        {k: r[k] for k in ("seed", "sample", "request")} for r in res["records"]]})
    replace_dir(tmp, eval_dir)


def load_eval(eval_dir: Path) -> dict:
    from ..records.schema import Trajectory, Verdict, read_jsonl

    saved = json.loads((eval_dir / "eval.json").read_text(encoding="utf-8"))
    trajs, verdicts = read_jsonl(eval_dir / "trajectories.jsonl", Trajectory), read_jsonl(eval_dir / "verdicts.jsonl", Verdict)
    if not len(trajs) == len(verdicts) == len(saved["records"]):
        raise ValueError(f"{eval_dir} is incomplete; delete it to evaluate that arm again")
    return {"summary": saved["summary"], "records": [r | {"trajectory": t, "verdict": v}
                                                      for r, t, v in zip(saved["records"], trajs, verdicts)]}


def seed_aggregate(summary: dict) -> dict:
    """One arm-seed's evaluation summary (one seed) as that seed's aggregate: each dimension's value, and its counts.
    An undefined value (None or NaN) stays undefined."""
    from .bench import DIMS

    def value(x):
        m = x["mean"] if isinstance(x, dict) else x
        return m if m is not None and m == m else None

    return {level: {key: {d: value(row[d]) for d in DIMS} | {c: row.get(c, 0) for c in ("n", "failed", "missing")}
                    for key, row in groups.items()} for level, groups in summary.items()}


def _arm_seed(ab: Ablation, world, arm: str, seed: int, train: Callable[[Any], None], log) -> tuple[dict, dict]:
    """One arm at one seed: trained (unless SFT-only) and evaluated, or loaded when done earlier."""
    from ..policies.resolve import resolve_policy
    from ..records.schema import ImageStore
    from .report import ablation_run_record, evaluate

    store = ImageStore(ab.out / "images" / f"{arm}-s{seed}")
    run_dir = ab.out / f"{arm}-s{seed}"  # for sft only its eval/ folder
    adapter = None if arm == "sft" else run_dir / "checkpoint" / "adapter"
    if (run_dir / "eval" / "eval.json").exists():
        res = load_eval(run_dir / "eval")
        log(f"[{arm} seed {seed}] done earlier, loaded")
    else:
        if arm != "sft":
            log(f"[{arm} seed {seed}] training -> {run_dir}")
            train(ab.make_cfg(arm, seed, run_dir))
        pol = resolve_policy(ab.policy, adapter=str(adapter) if adapter else None)
        pol.name = arm
        res = evaluate(world, pol, ab.requests, [seed], params=ab.params, store=store, progress=log, samples=ab.samples)
        save_eval(run_dir / "eval", res)
    res["store"] = store
    return res, ablation_run_record(arm, seed, ab.policy, adapter, res["records"])


def gains_lines(results: dict[str, dict]) -> list[str]:
    """The report's table of overall KScore per arm with its gain over SFT-only, paired by seed."""
    from .bench import mean_ci

    sft_k = results.get("sft", {}).get("summary", {}).get("overall", {}).get("all", {}).get("kscore", {})
    lines = ["## Gains over SFT-only (overall KScore)", "",
             "The paired gain compares each arm with SFT-only seed by seed (same seed, same bench requests).", "",
             "| arm | KScore | gain over SFT | paired gain ± 95 % CI | per seed |", "| --- | --- | --- | --- | --- |"]
    for arm, r in results.items():
        k = r["summary"]["overall"]["all"]["kscore"]
        gain = f"{k['mean'] - sft_k['mean']:+.3f}" if sft_k else "-"
        paired = "-"
        if sft_k and len(sft_k["per_seed"]) == len(k["per_seed"]) and arm != "sft":
            pm, pc = mean_ci([a - b for a, b in zip(k["per_seed"], sft_k["per_seed"])])
            paired = f"{pm:+.3f}" + (f" ± {pc:.3f}" if pc is not None else " (one seed, no CI)")
        ci = f" ± {k['ci95']:.3f}" if k["ci95"] is not None else ""
        lines.append(f"| {arm} | {k['mean']:.3f}{ci} | {gain} | {paired} | " + ", ".join(f"{x:.3f}" for x in k["per_seed"]) + " |")
    return lines


def identical_lines(same: list[dict]) -> list[str]:
    if not same:
        return []
    return (["", "Arms that wrote identical evaluation trajectories at a seed (so the same scores): their weights "
             "differed too little to flip any sampled token.", ""]
            + [f"- seed {d['seed']}: {d['arms'][0]} and {d['arms'][1]}; adapters {d['sha256'][0][:12]} and "
               f"{d['sha256'][1][:12]}, relative L2 distance {d['relative_distance']}" for d in same])


def ablation_teacher(ab: Ablation, world, runs_made: list[dict], log) -> tuple[str, dict | None]:
    """The teacher of the full method's trained student at the first seed (cached in ``<out>/teacher/``)."""
    from ..policies.resolve import resolve_policy
    from ..records.schema import atomic_write_json, atomic_write_text
    from .report import teacher_section

    arm = next((a for a in ("grpo+ved", "ved") if a in ab.arms), None)
    if not (ab.teacher and arm):
        return "", None
    tdir, seed = ab.out / "teacher", ab.seeds[0]
    sha = next(r["policy_sha256"] for r in runs_made if r["arm"] == arm and r["seed"] == seed)
    earlier = json.loads((tdir / "teacher.json").read_text("utf-8")) if (tdir / "teacher.json").exists() else {}
    if earlier.get("adapter_sha256") == sha and (tdir / "teacher.md").exists():
        log("[teacher] done earlier, loaded")
        return (tdir / "teacher.md").read_text("utf-8"), earlier
    run_dir = ab.out / f"{arm}-s{seed}"
    pol = resolve_policy(ab.policy, adapter=str(run_dir / "checkpoint" / "adapter"))
    pol.name = arm
    cfg = ab.make_cfg(arm, seed, run_dir)
    md, data = teacher_section(world, pol, run_dir / "bank", ab.requests, [seed], gate_of(cfg), ab.samples, log,
                               key=cfg.retrieval_key)
    md = md.replace("## Teacher\n", f"## Teacher ({arm}, seed {seed})\n", 1)
    data |= {"arm": arm, "seed": seed, "adapter_sha256": sha}
    atomic_write_json(tdir / "teacher.json", data)
    atomic_write_text(tdir / "teacher.md", md)
    return md, data


def run_ablation(ab: Ablation, world, train: Callable[[Any], None], log: Callable[[str], None]) -> tuple[Path, list[str]]:
    """Every arm at every seed, then the report and ``ablation.json``; returns the report and the gains table."""
    from .bench import over_seeds
    from ..records.schema import atomic_write_json
    from .report import identical_arms, write_report

    check_settings(ab.out, ab.settings)
    t0 = time.time()
    per_arm: dict[str, list[dict]] = {a: [] for a in ab.arms}
    runs_made: list[dict] = []  # what each arm and seed ran: enough to tell two arms apart from the saved results
    for seed in ab.seeds:
        for arm in ab.arms:
            res, made = _arm_seed(ab, world, arm, seed, train, log)
            per_arm[arm].append(res)
            runs_made.append(made)
            log(f"[{arm} seed {seed}] bench KScore {res['summary']['overall']['all']['kscore']['mean']:.3f} "
                f"({time.time() - t0:.0f} s so far)")
    results = {}
    for arm, runs in per_arm.items():  # mean ± 95 % CI over seeds, overall and per track, for every dimension
        per_seed = {i: seed_aggregate(r["summary"]) for i, r in enumerate(runs)}
        results[arm] = {"summary": over_seeds(per_seed, ("overall", "track")), "records": runs[0]["records"],
                        "store": runs[0]["store"]}
    same = identical_arms(runs_made)
    lines = gains_lines(results) + identical_lines(same)
    teacher_md, teacher_data = ablation_teacher(ab, world, runs_made, log)
    lines += ["", teacher_md] if teacher_md else []
    metrics = {a: [ab.out / f"{a}-s{s}" / "metrics.jsonl" for s in ab.seeds] for a in ab.arms if a != "sft"}
    extra = "\n".join(lines) + f"\n\nTotal time: {time.time() - t0:.0f} s for {len(ab.seeds)} seed(s) x {len(ab.arms)} arm(s)."
    s = ab.settings
    report = write_report(ab.out / "report", f"Ablation: {ab.policy}", results, world, metrics, extra,
                          config={"seeds": ab.seeds, "arms": ab.arms, "steps": s["steps"], "B": s["B"], "K": s["K"],
                                  "lambda_ved": s["lambda_ved"], "eval_requests": len(ab.requests),
                                  "eval_samples": ab.samples, "max_new_tokens": s["max_new_tokens"]})
    atomic_write_json(ab.out / "ablation.json", {a: r["summary"] for a, r in results.items()}
                      | {"runs": runs_made, "identical_arms": same, "teacher": teacher_data, "seconds": time.time() - t0})
    return report, lines
