"""Distill view: the form as a ``genevolve evolve``/``ablate`` command, and a run folder read as live UI values.

A run folder of ``evolve`` holds ``metrics.jsonl``, ``pairs.jsonl``, ``probe.json``, ``bank/`` and,
once compared, ``report/``; one of ``ablate`` holds one such folder per arm and seed plus ``report/``.
Every reader here tolerates a run that is still writing and a folder that has disappeared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

from genevolve.records.live import (MetricsRow, PairRecord, ProbeRecord, is_running, read_jsonl_rows, read_metrics, read_pairs,
                                   read_probe, read_progress)

from . import StudioError

ARMS_EVOLVE = ("grpo", "ved")
ARMS_ABLATE = ("sft", "grpo", "ved", "grpo+ved")
CURVES = (("reward_mean", "reward (mean)"), ("ved_loss", "VED loss"), ("grpo_loss", "GRPO loss"),
          ("retrieval_hit_rate", "retrieval hit rate"))
LONG_RUN_S = 240  # a run expected to take longer is started only after the user has been told how long
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


def distill_args(mode: str, out: Path, policy: str = "tiny", arms: list[str] | tuple[str, ...] = ("grpo", "ved"),
                 quick: bool = True, steps: int | None = None, b: int | None = None, k: int | None = None,
                 lora_rank: int = 16, lambda_ved: float = 2.0, delta_min: float = 0.20, gate: float = 0.90, seed: int = 0,
                 max_new_tokens: int = 384, eval_requests: int | None = None, probe_request: str | None = None) -> list[str]:
    """The command-line arguments for the form's values, checked with messages a person can act on."""
    def positive(name, v, low=1):
        if v is not None and (int(v) != v or v < low):
            raise StudioError(f"{name} must be a whole number >= {low}")
        return None if v is None else int(v)

    steps, b, k = positive("steps", steps), positive("B", b), positive("K", k, 2)
    positive("LoRA rank", lora_rank)
    positive("max new tokens", max_new_tokens, 16)
    eval_requests = positive("eval requests", eval_requests)
    if lambda_ved < 0:
        raise StudioError("λ_VED must be >= 0")
    if not 0 <= delta_min <= 1:
        raise StudioError("δ_min is between 0 and 1")
    if not -1 <= gate <= 1:
        raise StudioError("the gate is a cosine similarity between -1 and 1")
    args = [mode, "--out", str(out), "--policy", policy, "--lora-rank", str(int(lora_rank)), "--lambda-ved", str(lambda_ved),
            "--max-new-tokens", str(int(max_new_tokens))]
    if mode == "evolve":
        bad = [a for a in arms if a not in ARMS_EVOLVE]
        if bad or not arms:
            raise StudioError("evolve trains GRPO, VED or both: tick at least one of them")
        args += ["--delta-min", str(delta_min), "--gate", str(gate), "--seed", str(int(seed))]
        args += [] if "grpo" in arms else ["--no-grpo"]
        args += [] if "ved" in arms else ["--no-ved"]
    elif mode == "ablate":
        bad = [a for a in arms if a not in ARMS_ABLATE]
        if bad or not arms:
            raise StudioError(f"ablate runs any of the arms {', '.join(ARMS_ABLATE)}: tick at least one")
        args += ["--arms", ",".join(a for a in ARMS_ABLATE if a in arms), "--seeds", str(int(seed))]
    else:
        raise StudioError("mode is evolve or ablate")
    args += ["--probe-request", probe_request] if probe_request else []
    for flag, v in (("--steps", steps), ("-B", b), ("-K", k), ("--eval-requests", eval_requests)):
        if v is not None:
            args += [flag, str(v)]
    if quick:
        args.append("--quick")
    return args


def probe_request_id(value: str | None, known: Collection[str]) -> str | None:
    """The request id of the form's probe field (an id, or a list entry "evolve-0003 · text"); blank: None,
    the trainer's default (picked at step 1: a request an experience was mined from)."""
    rid = (value or "").split(" · ", 1)[0].strip()
    if not rid:
        return None
    if rid not in known:
        raise StudioError(f"the probe request {rid!r} is not a sandbox request id: pick one from the list "
                          "(or leave it blank: the trainer picks one with an experience)")
    return rid


def check_run_name(name: str) -> str:
    name = (name or "").strip()
    if not NAME_RE.match(name):
        raise StudioError("the run name is letters, digits, '.', '_' and '-' (at most 80, no slashes)")
    return name


# ---------------------------------------------------------------------------
# Reading a run folder
# ---------------------------------------------------------------------------


@dataclass
class Live:
    out: Path
    exists: bool
    running: bool
    metrics: dict[str, list[MetricsRow]] = field(default_factory=dict)  # arm (or sub-run) -> rows
    pairs: list[PairRecord] = field(default_factory=list)
    probe: ProbeRecord | None = None
    probe_dir: Path | None = None
    report: Path | None = None
    steps_planned: int | None = None
    progress: Any = None  # Progress of the latest training folder (records.live)
    error: str | None = None

    @property
    def points(self) -> int:
        return sum(len(rows) for rows in self.metrics.values())


def _runs_of(out: Path) -> list[Path]:
    """The training folders of a run: itself (evolve) or its arm folders (ablate)."""
    if (out / "config.json").exists() or (out / "metrics.jsonl").exists():
        return [out]
    return sorted(p.parent for p in out.glob("*/config.json"))


def read_live(out: Path) -> Live:
    out = Path(out)
    if not out.is_dir():
        return Live(out, False, False, error=f"the run folder {out} does not exist (deleted while open?)")
    runs = _runs_of(out)
    live = Live(out, True, any(is_running(r) for r in runs))
    for r in runs:
        label = r.name if r != out else "run"
        live.metrics[label] = read_metrics(r / "metrics.jsonl")
    latest = max(runs, key=lambda r: (r / "metrics.jsonl").stat().st_mtime if (r / "metrics.jsonl").exists() else 0, default=None)
    if latest is not None:
        try:
            live.probe = read_probe(latest)
            live.probe_dir = latest
        except ValueError as exc:
            live.error = str(exc)
        try:
            live.pairs = read_pairs(latest / "pairs.jsonl")
        except ValueError as exc:
            live.error = str(exc)
        try:
            import json

            live.steps_planned = json.loads((latest / "config.json").read_text("utf-8")).get("steps")
        except (OSError, ValueError):
            pass
        live.progress = read_progress(latest)
    if (out / "report" / "report.md").exists():
        live.report = out / "report" / "report.md"
    return live


def latest_pairs(pairs: list[PairRecord]) -> list[list[Any]]:
    """Table rows of the latest step's mined pairs."""
    if not pairs:
        return []
    last = max(p.step for p in pairs)
    return [[p.step, p.request_id, p.request, _round(p.best_reward), _round(p.worst_reward), round(p.gap, 3),
             p.experience or f"(not summarised: {p.error or '?'})"] for p in pairs if p.step == last]


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


PAIR_HEADERS = ["step", "request", "text", "best R", "worst R", "gap", "experience"]


def new_experiences(run: Path, pairs: list[PairRecord]):
    """The experiences made at the latest step, read from the bank's JSONL (never through a bank object,
    which could rewrite a file the trainer owns)."""
    from genevolve.records.schema import Experience

    if not pairs:
        return []
    last = max(p.step for p in pairs)
    ids = {p.experience for p in pairs if p.step == last and p.experience}
    out = []
    for row in read_jsonl_rows(Path(run) / "bank" / "experiences.jsonl"):
        if row.get("id") in ids:
            try:
                out.append(Experience.model_validate(row))
            except ValueError:
                continue
    return out


def form_estimate(world, runs_dir: Path, mode: str, policy: str, arms, quick: bool, steps: int | None, b: int | None,
                  k: int | None, eval_requests: int | None):
    """The expected wall time of the form's run (see :mod:`genevolve.evaluation.estimate`)."""
    from genevolve.evaluation.experiments import bench_requests
    from genevolve.evaluation import estimate as est

    n_eval = len(bench_requests(world, quick, eval_requests))
    steps, b, k = (est.default(mode, name, quick, given) for name, given in (("steps", steps), ("prompts", b), ("rollouts", k)))
    if mode == "evolve":
        plan = est.plan_evolve(steps, b, k, True, n_eval, use_ved="ved" in arms)
    else:
        plan = est.plan_ablate(list(arms), 1, steps, b, k, True, n_eval)
    return est.estimate(policy, plan, runs_dir)


def eta_text(live: Live, now: float | None = None) -> str:
    """"ETA …" for a running run: from its logged step times and its progress inside the current step (before the
    first step from that step's own pace, or the start's estimate), and how far it is behind the estimate."""
    import time

    from genevolve.evaluation import estimate as est

    plan = est.load(live.out)
    if plan is None:
        return ""
    now = time.time() if now is None else now
    seconds = [r.seconds for rows in live.metrics.values() for r in rows if r.get("seconds")]
    try:
        elapsed = now - (live.out / est.ESTIMATE_FILE).stat().st_mtime
    except OSError:
        elapsed = None
    p = live.progress
    if p is None:
        logs = [*live.out.glob("metrics.jsonl"), *live.out.glob("*/metrics.jsonl")]
        last = max((x.stat().st_mtime for x in logs if x.exists()), default=None)
        left = est.eta(plan, seconds, elapsed, now - last if last else 0.0)
        return "" if left is None else f"ETA {est.minutes(left)}" + ("" if seconds else " (estimated before the first step)")
    e = est.eta_progress(plan, seconds, p.phase, p.done, p.total, now - p.step_started, now - p.updated
                         if p.phase == "comparison" else 0.0, elapsed)
    if e is None:
        return ""
    text = f"ETA {est.minutes(e.seconds)}"
    if e.behind is not None:
        text += f" (behind the start's estimate by {est.minutes(e.behind)})"
    return text


def phase_text(p) -> str:
    """"step 1/2: rollouts 31/48" from a run's progress record."""
    if p is None:
        return ""
    if p.phase == "comparison":
        return "training done: comparing before / after on the bench"
    if p.phase == "done":
        return "done"
    count = f" {p.done}/{p.total}" if p.total else ""
    label = {"update": "teacher scoring and update", "mining": "mining pairs", "loading": "loading"}.get(p.phase, p.phase)
    return f"step {p.step}/{p.steps}: {label}{count}"


def status_text(live: Live, job: dict[str, Any] | None = None) -> str:
    if not live.exists:
        return live.error or "no run"
    state = "running" if live.running else "not running"
    if job and job.get("out") == str(live.out):
        state = job["state"]
    steps = max((len(r) for r in live.metrics.values()), default=0)
    last = next((rows[-1] for rows in live.metrics.values() if rows), None)
    parts = [f"{live.out.name}: {state}", f"steps logged {steps}" + (f"/{live.steps_planned}" if live.steps_planned else "")]
    if state == "failed" and job and job.get("error"):
        parts.append(job["error"])
    if state in ("running", "stopping") and (phase := phase_text(live.progress)):
        parts.append(phase)
    if last:
        reward = "-" if last.reward_mean is None else format(last.reward_mean, ".3f")
        parts.append(f"reward {reward} · VED {last.ved_loss:.4f} · GRPO {last.grpo_loss:+.4f} · "
                     f"hit rate {last.retrieval_hit_rate:.2f} · bank {last.bank_size}")
    if state in ("running", "stopping") and not live.report and (eta := eta_text(live)):
        parts.append(eta)
    if live.report:
        parts.append("report ready")
    if live.error:
        parts.append(live.error)
    return " · ".join(parts)


_NOISE = re.compile(r"Loading weights|Warning|warnings\.warn|^\s*$|it/s\]|s/it\]|^\s*\^|^\s*(File|Traceback)")
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def log_lines(text: str, n: int = 8) -> str:
    """The run's own progress lines of a log (step lines, the estimate, the comparison), without library warnings
    and progress bars; a line a progress bar rewrote with carriage returns counts as its last state, and a
    traceback its one line naming the error (the log file keeps the rest)."""
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join([line for line in _without_tracebacks(lines) if not _NOISE.search(line)][-n:])


def _without_tracebacks(lines: list[str]) -> list[str]:
    """Each traceback reduced to its exception line (``ValueError: ...``), its indented body and chaining dropped."""
    out, inside, exc_at = [], False, None
    for line in lines:
        if line.startswith(_CHAINED) and exc_at is not None:
            del out[exc_at:]  # the exception another was raised from: only the last one is the run's error
        if line.startswith(("Traceback (most recent call last)", *_CHAINED)):
            inside, exc_at = True, None
        elif (inside and not line.strip()) or ((inside or exc_at is not None) and line[:1].isspace()):
            continue  # a frame, or the indented rest of the exception's message
        else:
            if inside:
                exc_at = len(out)
            elif line.strip():
                exc_at = None
            inside = False
            out.append(line)
    return out


def failure_line(text: str) -> str | None:
    """Why a run's command failed, in one line: its ``error: ...`` refusal, else the exception a traceback ends in."""
    lines = [line for line in _without_tracebacks(text.splitlines()) if line.strip()]
    refusal = next((line for line in reversed(lines) if line.startswith("error:")), None)
    if refusal is not None:
        return refusal
    return next((line for line in reversed(lines) if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line)), None)


def curves_figure(metrics: dict[str, list[MetricsRow]]):
    """Four small panels (reward, VED loss, GRPO loss, retrieval hit rate), one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 4, figsize=(13, 2.6), dpi=90)
    for ax, (key, title) in zip(axes, CURVES):
        for label, rows in metrics.items():
            xs = [r.step for r in rows if r.get(key) is not None]
            ys = [r.get(key) for r in rows if r.get(key) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", lw=1.5, label=label)
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one step: a single tick, never 0.95
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    if len(metrics) > 1 and any(metrics.values()):
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def report_parts(report: Path) -> tuple[str, list[Path]]:
    """The report's text without its image lines (shown as a gallery instead) and the images it names."""
    text = report.read_text("utf-8")
    images = [report.parent / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)]
    body = re.sub(r"!\[[^\]]*\]\([^)]+\)\n?", "", text)
    return body, [p for p in images if p.exists()]


def report_file(report: Path) -> Path:
    """The report as one self-contained HTML file, written beside it when missing or older than report.md."""
    from genevolve.evaluation.report_html import write_report_html

    html = report.with_suffix(".html")
    if not html.exists() or html.stat().st_mtime < report.stat().st_mtime:
        write_report_html(report, html)
    return html
