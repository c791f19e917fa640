"""Reports: the sandbox evaluation of a policy, the teacher where it gets a guide, and the report folder.

``report.md`` opens with the result (each policy overall and by track, with its KScore change from the
first policy; mean ± 95 % CI only with two or more seeds), then the teacher section or the ablation's
gains, the learning curves (PNGs from the metrics JSONL), examples chosen by their largest gains and
regressions, and last the configuration, folded. Beside it: ``results.json`` and, for an evolve run,
``teacher.json`` (see :func:`teacher_section`).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable

from .bench import SandboxScorer, mean_ci
from ..records.schema import ImageStore, atomic_write_json, atomic_write_text

CURVES = (("reward_mean", "reward (mean)"), ("kscore_mean", "KScore (rollouts)"), ("ved_loss", "VED loss"),
          ("grpo_loss", "GRPO loss"), ("retrieval_hit_rate", "retrieval hit rate"))


def evaluate(world, policy, requests, seeds=(0,), guides: dict[str, str] | None = None, params=None,
             store: ImageStore | None = None, progress: Callable[[str], None] | None = None,
             samples: int = 1) -> dict[str, Any]:
    """:func:`genevolve.evaluation.bench.evaluate` on the sandbox, overall and by track: ``{"summary", "records"}``.

    ``summary[level][group]`` holds each dimension's mean ± 95 % CI over seeds and ``per_seed``: the group's
    KScore at every seed in seed order (``None`` where undefined), for gains paired by seed.
    """
    import tempfile

    from ..agent.loop import Tools
    from .bench import evaluate as run

    with tempfile.TemporaryDirectory() as tmp:
        ev = run(requests, policy, Tools.for_world(world), SandboxScorer(world), store or ImageStore(tmp), list(seeds),
                 samples=samples, params=params, guides=guides, levels=("overall", "track"), progress=progress)
    summary = ev.by
    for level, groups in summary.items():
        for key, row in groups.items():
            row["per_seed"] = [ev.per_seed[s][level].get(key, {}).get("kscore") for s in seeds]
    records = [{"seed": c.seed, "sample": c.sample, "request": c.request.id, "trajectory": c.trajectory, "verdict": c.verdict}
               for c in ev.cases]
    return {"summary": summary, "records": records}


def ablation_run_record(arm: str, seed: int, policy: str, adapter: Path | None, records: list[dict]) -> dict[str, Any]:
    """What one arm and seed of an ablation ran: run folder, weights checksum, last training metrics and a
    fingerprint of its evaluation trajectories (equal fingerprints: the same sampled turns)."""
    import hashlib

    from ..records.runs import policy_checksum

    last = {}
    if adapter is not None and (adapter.parent.parent / "metrics.jsonl").exists():
        lines = (adapter.parent.parent / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        last = json.loads(lines[-1]) if lines else {}
    h = hashlib.sha256()
    for r in records:
        for turn in r["trajectory"].turns:
            h.update(turn.raw.encode("utf-8") + b"\0")
        h.update(b"\1")
    keep = ("step", "reward_mean", "kscore_mean", "grad_norm", "logp_grad_norm_grpo", "logp_grad_norm_ved",
            "ved_loss", "grpo_loss", "retrieval_hit_rate", "bank_size")
    return {"arm": arm, "seed": seed, "run": str(adapter.parent.parent) if adapter else None,
            "adapter": str(adapter) if adapter else None, "policy_sha256": policy_checksum(policy, str(adapter) if adapter else None),
            "last_metrics": {k: last.get(k) for k in keep} if last else None, "eval_fingerprint": h.hexdigest()}


def adapter_distance(a: str | Path, b: str | Path) -> float | None:
    """||A - B|| / ||A|| over every LoRA tensor of two adapters of the same shape (None when they do not match)."""
    from safetensors.torch import load_file

    wa, wb = (load_file(str(Path(p) / "adapter_model.safetensors")) for p in (a, b))
    if set(wa) != set(wb) or any(wa[k].shape != wb[k].shape for k in wa):
        return None
    num = sum(float((wa[k].double() - wb[k].double()).pow(2).sum()) for k in wa)
    den = sum(float(wa[k].double().pow(2).sum()) for k in wa)
    return (num / den) ** 0.5 if den else None


def identical_arms(runs: list[dict]) -> list[dict]:
    """Pairs of arms that wrote the same evaluation trajectories at one seed, with how far apart their adapters are."""
    out = []
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            if a["seed"] == b["seed"] and a["eval_fingerprint"] == b["eval_fingerprint"]:
                dist = adapter_distance(a["adapter"], b["adapter"]) if a["adapter"] and b["adapter"] else None
                out.append({"seed": a["seed"], "arms": [a["arm"], b["arm"]], "sha256": [a["policy_sha256"], b["policy_sha256"]],
                            "relative_distance": None if dist is None else round(dist, 6)})
    return out


def plot_curves(metrics_files: dict[str, list[Path]], out_dir: Path) -> list[Path]:
    """One PNG per metric; each arm a line (mean over its seeds), thin lines for single seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, title in CURVES:
        fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
        for arm, files in metrics_files.items():
            runs = []
            for f in files:
                if f.exists():
                    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
                    runs.append([r.get(key, float("nan")) for r in rows])
            if not runs:
                continue
            n = min(len(r) for r in runs)
            for r in runs:
                ax.plot(range(1, len(r) + 1), r, lw=0.6, alpha=0.3)
            if n:
                ax.plot(range(1, n + 1), [statistics.fmean(r[i] for r in runs) for i in range(n)], lw=2, label=arm)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one step: a single tick, never 0.95
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"curve_{key}.png"
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    return paths


def _fmt(m: dict) -> str:
    if m["mean"] is None or m["mean"] != m["mean"]:
        return "-"
    ci = m.get("ci95")
    return f"{m['mean']:.3f}" + (f" ± {ci:.3f}" if ci is not None and ci == ci else "")


def _n_seeds(results: dict[str, dict]) -> int:
    return max((len(r["summary"]["overall"]["all"]["kscore"].get("per_seed") or []) for r in results.values()), default=0)


def table(results: dict[str, dict], dims=("kscore", "F", "V", "T", "A")) -> str:
    """Each policy overall and by track, with its KScore change from the first policy (before, or SFT-only)."""
    names = list(results)
    base = results[names[0]]["summary"] if names else None
    head = ["policy", "track", *dims, "Δ KScore"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, res in results.items():
        s = res["summary"]
        for key, row in [("all", s["overall"]["all"])] + sorted(s["track"].items()):
            ref = base["overall"]["all"] if key == "all" else base["track"].get(key)
            k, k0 = row["kscore"]["mean"], (ref or {}).get("kscore", {}).get("mean")
            delta = "" if name == names[0] or k is None or k0 is None else f"{k - k0:+.3f}"
            lines.append(f"| {name} | {key} | " + " | ".join(_fmt(row[d]) for d in dims) + f" | {delta} |")
    n = _n_seeds(results)
    note = (f"Mean ± 95 % CI over {n} seeds." if n >= 2 else "One seed, no CI.")
    return "\n".join(lines) + f"\n\n{note} Δ KScore: change from {names[0] if names else '-'} on the same requests."


def write_examples(world, results: dict[str, dict], out_dir: Path, n: int = 6) -> str:
    """Side-by-side examples (ground truth and each policy's image): the largest KScore gains and the largest
    regressions from the first policy to the last (with one policy, its first requests)."""
    from PIL import Image

    ex_dir = out_dir / "examples"
    ex_dir.mkdir(parents=True, exist_ok=True)
    names = list(results)
    by_req: dict[str, dict[str, Any]] = {}
    for name in names:
        for rec in results[name]["records"]:
            if rec["seed"] == results[name]["records"][0]["seed"] and rec.get("sample", 0) == 0:
                by_req.setdefault(rec["request"], {})[name] = rec
    def k(rec) -> float:  # a missing case (null) counts as 0 here; it is shown as "–"
        return rec["verdict"].kscore or 0.0

    first, last = names[0], names[-1]
    both = [(rid, recs) for rid, recs in by_req.items() if first in recs and last in recs]
    by_gain = sorted(both, key=lambda kv: k(kv[1][last]) - k(kv[1][first]))
    if first == last:
        best, worst = both[:n], []
        lines = [f"The first {len(best)} requests.", ""]
    else:
        worst = [kv for kv in by_gain[: n // 2] if k(kv[1][last]) < k(kv[1][first])]
        best = [kv for kv in reversed(by_gain[len(worst):]) if k(kv[1][last]) > k(kv[1][first])][: n - len(worst)]
        lines = [f"Chosen by the KScore change from {first} to {last} on the first seed's first sample: the "
                 f"{len(best)} largest gains, then the {len(worst)} largest regressions.", ""]
        if not best and not worst:
            best = both[:n]
            lines = [f"No request's KScore changed from {first} to {last}; the first {len(best)} requests.", ""]
    for rid, recs in best + worst:
        req = world.request(rid)
        tiles = [world.gt_image(req)]
        captions = ["ground truth"]
        for name in names:
            v = recs[name]["verdict"]
            img = results[name]["store"].get(v.image) if v.image and v.image in results[name]["store"] else Image.new("RGB", (120, 140), "white")
            tiles.append(img)
            captions.append(f"{name}: {'–' if v.kscore is None else f'{v.kscore:.2f}'}")
        w = sum(t.width for t in tiles) + 8 * (len(tiles) - 1)
        canvas = Image.new("RGB", (w, tiles[0].height), "white")
        x = 0
        for t in tiles:
            canvas.paste(t, (x, 0))
            x += t.width + 8
        canvas = canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)
        canvas.save(ex_dir / f"{rid}.png")
        change = "" if first == last else f" (KScore {k(recs[last]) - k(recs[first]):+.2f})"
        lines.append(f"### {rid}{change}\n\n{req.text}\n\n![{rid}](examples/{rid}.png)\n\n" + " · ".join(captions) + "\n")
        for name in names:
            tr = recs[name]["trajectory"]
            prog = tr.program.gen_prompt if tr.program else f"(no program: {tr.termination})"
            lines.append(f"- **{name}**: {prog}")
        lines.append("")
    return "\n".join(lines)


def _same_trajectories(a: list[dict], b: list[dict]) -> bool:
    return [[t.raw for t in r["trajectory"].turns] for r in a] == [[t.raw for t in r["trajectory"].turns] for r in b]


def _student_vs_teacher(world, student, requests, guides, seeds, samples, progress) -> tuple[list[str], dict]:
    """Student and teacher on the same requests: a table with the paired gain, or a sentence when the
    guide changed no sampled token (then a teacher row would only repeat the student's)."""
    res = {"student (after)": evaluate(world, student, requests, seeds, progress=progress, samples=samples)}
    teacher = evaluate(world, student, requests, seeds, guides=guides, progress=progress, samples=samples)
    summaries = {"student (after)": res["student (after)"]["summary"], "teacher": teacher["summary"]}
    if _same_trajectories(res["student (after)"]["records"], teacher["records"]):
        return (["With the guide the teacher wrote exactly the student's trajectories here (the guide changed no "
                 "sampled token), so it scores the same: no separate teacher row."], summaries | {"identical": True})
    if teacher["summary"] == summaries["student (after)"]:
        k = teacher["summary"]["overall"]["all"]["kscore"]["mean"]
        return ([f"The teacher's trajectories differ from the student's but score exactly the same (KScore "
                 f"{'-' if k is None else f'{k:.3f}'}): no separate teacher row."], summaries | {"identical": False, "gain": 0.0})
    res["teacher"] = teacher
    a, t = (r["summary"]["overall"]["all"]["per_seed"] for r in (res["student (after)"], teacher))
    gains = [y - x for x, y in zip(a, t) if x is not None and y is not None]
    m, ci = mean_ci(gains)
    gain = "-" if m is None else f"{m:+.3f}" + (f" ± {ci:.3f}" if ci is not None else " (one seed, no CI)")
    return [table(res), "", f"Teacher minus student, paired by seed: {gain}."], summaries | {"identical": False, "gain": m, "gain_ci95": ci}


def teacher_section(world, student, bank_dir: Path, bench_requests, seeds, gate: float, samples: int = 1,
                    progress: Callable[[str], None] | None = None, key: str = "situation") -> tuple[str, dict]:
    """The teacher (the trained student with its nearest experience as the decision guide), measured only
    where it gets a guide, next to the student on the same requests: (a) the training requests experiences
    were mined from that retrieve one past the gate (their own, or another whose trigger is nearer), (b) the
    bench requests whose nearest experience passes the gate (never mined from: every one is a transfer).
    Where no request gets one, a sentence says so instead of a row that would copy the student's."""
    from ..experience.bank import ExperienceBank, guide_text
    from ..agent.guides import request_guides

    md = ["## Teacher", "", f"The teacher is the trained student with the nearest bank experience (cosine >= {gate}, "
          f"{key} key) in its system prompt; it is only measured on requests that retrieve one, next to the student on "
          "the same requests.", ""]
    bank = ExperienceBank(bank_dir, key=key)
    if not len(bank):
        return "\n".join(md + ["The experience bank is empty: there is no teacher to measure."]), {"gate": gate, "bank_size": 0}
    sources = set().union(*(e.sources() for e in bank.items.values()))
    train = [r for r in world.requests if r.id in sources]
    near = bank.nearest([r.text for r in train])
    hit = [(r, e) for r, (e, s) in zip(train, near) if e is not None and s >= gate]
    n_own = sum(r.id in e.sources() for r, e in hit)
    data: dict[str, Any] = {"gate": gate, "key": key, "bank_size": len(bank),
                            "train": {"n": len(hit), "own": n_own, "requests": [r.id for r, _ in hit]}}
    md += [f"### Training requests that retrieve an experience (n = {len(hit)}, {n_own} of them one mined from "
           "themselves)", ""]
    if hit:
        lines, data["train"]["result"] = _student_vs_teacher(world, student, [r for r, _ in hit],
                                                              {r.id: guide_text(e) for r, e in hit}, seeds, samples, progress)
        md += lines
    else:
        md += ["No training request retrieves an experience at this gate."]
    guides, info = request_guides(f"bank:{bank_dir}", world, bench_requests, gate, key=key)
    sim = info["similarity"]
    data["bench"] = {k: info[k] for k in ("hits", "hit_rate", "similarity", "per_request")} | {"n": len(bench_requests)}
    md += ["", f"### Bench requests that retrieve an experience ({info['hits']} of {len(bench_requests)})", "",
           f"Nearest-experience similarity over all {len(bench_requests)} bench requests: median {sim['median']:.3f}, "
           f"max {sim['max']:.3f}.", ""]
    hits = [r for r in bench_requests if r.id in guides]
    if hits:
        md += ["Retrieved: " + ", ".join(f"{x['request']} <- {x['experience']} (from {x['source_request']}, cosine "
                                         f"{x['similarity']:.3f})" for x in info["per_request"] if x["hit"]) + ".", ""]
        lines, data["bench"]["result"] = _student_vs_teacher(world, student, hits, guides, seeds, samples, progress)
        md += lines
    else:
        md += ["No bench request passes the gate, so on the bench the teacher is the student: no teacher row."]
    return "\n".join(md), data


def write_report(out_dir: Path, title: str, results: dict[str, dict], world, metrics_files: dict[str, list[Path]],
                 extra_md: str = "", config: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(metrics_files, out_dir)
    md = [f"# {title}", "", "## Result: held-out bench", "", table(results), ""]
    if extra_md:
        md += [extra_md, ""]
    md += ["## Learning curves", ""] + [f"![{p.stem}]({p.name})" for p in curves] + [""]
    md += ["## Examples", "", write_examples(world, results, out_dir), ""]
    if config:
        md += ["## Configuration", "", "<details><summary>every setting of this run</summary>", "", "```json",
               json.dumps(config, indent=2), "```", "", "</details>"]
    atomic_write_text(out_dir / "report.md", "\n".join(md) + "\n")
    atomic_write_json(out_dir / "results.json", {k: v["summary"] for k, v in results.items()})
    from .report_html import write_report_html

    write_report_html(out_dir / "report.md")  # the same report as one self-contained file
    return out_dir / "report.md"
