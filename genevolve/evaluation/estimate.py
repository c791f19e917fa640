"""How long a self-evolution run (``evolve``) or an ablation will take, before it starts and while it runs.

Before the start the cost of one rollout is taken from earlier runs of the same policy in the runs
folder (their logged step times), else from the size of the policy's weights with a rule measured on a
2-core CPU (the tiny policy about half a second a rollout, SmolLM2-135M about fifteen). Once steps are
logged, :func:`eta` uses the run's own step times. The figures are estimates, labelled as such
wherever they are shown.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

ESTIMATE_FILE = "estimate.json"
# Seconds per training rollout (its share of judging and the update included) = BASE + PER_BYTE * weight bytes,
# measured on 2 idle cores (logged step seconds over rollouts): tiny (14 MB) ~0.5 s, SmolLM2-135M fp32 (538 MB)
# 10-19 s (a quick evolve: 185 s and 344 s for its two steps of 18 rollouts).
BASE_S, PER_BYTE_S = 0.25, 2.6e-8
# A bench rollout costs this share of a training one, which also pays for the teacher's scoring and the
# update: measured 0.2 (tiny) to 0.4 (SmolLM2, where generation dominates).
EVAL_SHARE = 0.35


# The run commands' defaults, (quick, full): shared by the command line and the studio's estimate.
DEFAULTS = {
    "evolve": {"steps": (2, 5), "prompts": (4, 8), "rollouts": (4, 6), "eval_requests": (24, None)},
    "ablate": {"steps": (1, 4), "prompts": (4, 8), "rollouts": (4, 6), "eval_requests": (24, None), "seeds": ("0", "0,1,2")},
}


def default(command: str, name: str, quick: bool, given=None):
    """``given`` when set, else the command's default for a quick or a full run."""
    return given if given is not None else DEFAULTS[command][name][0 if quick else 1]


@dataclass
class Plan:
    """What a run will do, counted in rollouts."""

    train_rollouts: int  # over all steps (and arms, seeds), the probe's included
    eval_rollouts: int  # the before/after/teacher (or per-arm) bench comparison
    steps: int  # steps logged to metrics.jsonl over the whole run
    rollouts_per_step: int


@dataclass
class Estimate:
    seconds: float
    seconds_per_rollout: float
    basis: str  # where the per-rollout cost comes from
    plan: Plan

    def text(self) -> str:
        return f"about {minutes(self.seconds)} ({self.basis})"


def minutes(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def plan_evolve(steps: int, b: int, k: int, probe: bool, eval_requests: int, eval_seeds: int = 1, eval_samples: int = 1,
                use_ved: bool = True) -> Plan:
    per_step = b * k + (2 if probe else 0)
    evals = eval_requests * eval_seeds * eval_samples * (3 if use_ved else 2)  # before, after (and the teacher, at most)
    return Plan(steps * per_step, evals, steps, per_step)


def plan_ablate(arms: list[str], seeds: int, steps: int, b: int, k: int, probe: bool, eval_requests: int,
                eval_samples: int = 1, teacher: bool = True) -> Plan:
    trained = [a for a in arms if a != "sft"]
    per_step = b * k + (2 if probe else 0)
    evals = eval_requests * eval_samples * len(arms) * seeds + (eval_requests if teacher and "grpo+ved" in arms else 0)
    return Plan(len(trained) * seeds * steps * per_step, evals, len(trained) * seeds * steps, per_step)


def weight_bytes(policy: str) -> int | None:
    """Bytes of the policy's weights as they run (safetensors on disk; a GGUF file's tensors dequantised to
    float32, as transformers loads them), None when they cannot be found."""
    from ..policies.resolve import model_source

    try:
        folder, gguf = model_source(policy)
    except (FileNotFoundError, ValueError, OSError):
        return None
    if gguf:
        return _gguf_float32_bytes(Path(folder) / gguf)
    files = list(Path(folder).glob("*.safetensors")) + list(Path(folder).glob("*.bin"))
    size = sum(f.stat().st_size for f in files if f.exists())
    return size or None


def _gguf_float32_bytes(path: Path) -> int | None:
    """4 bytes per weight of a GGUF file (its quantised size on disk is 5 to 8 times smaller than what runs)."""
    if not path.exists():
        return None
    try:
        from gguf import GGUFReader

        return 4 * sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors) or None
    except Exception:  # noqa: an unreadable header: the file size, scaled as for 4- to 5-bit weights
        return int(path.stat().st_size * 6.4) or None


def history(runs_dir: Path, policy: str) -> list[float]:
    """Seconds per rollout of the logged steps of earlier runs of ``policy`` under ``runs_dir``."""
    out = []
    for cfg_path in Path(runs_dir).glob("**/config.json"):
        try:
            cfg = json.loads(cfg_path.read_text("utf-8"))
            if cfg.get("policy") != policy or "rollouts_per_prompt" not in cfg:
                continue
            per_step = cfg["prompts_per_step"] * cfg["rollouts_per_prompt"] + (2 if cfg.get("probe", True) else 0)
            for line in (cfg_path.parent / "metrics.jsonl").read_text("utf-8").splitlines():
                row = json.loads(line)
                if row.get("seconds"):
                    out.append(float(row["seconds"]) / per_step)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def estimate(policy: str, plan: Plan, runs_dir: Path | None = None) -> Estimate:
    """The run's expected wall time from its plan and the policy's cost per rollout."""
    past = history(runs_dir, policy) if runs_dir is not None else []
    if past:
        per, basis = statistics.median(past), f"from {len(past)} logged steps of earlier runs of this policy"
    else:
        size = weight_bytes(policy)
        if size is None:
            per, basis = BASE_S + PER_BYTE_S * 5e8, "policy weights not found: assumed the size of SmolLM2-135M"
        else:
            per, basis = BASE_S + PER_BYTE_S * size, f"from the policy's {size / 1e6:.0f} MB of weights on a 2-core CPU"
    seconds = per * (plan.train_rollouts + EVAL_SHARE * plan.eval_rollouts) + 10  # + loading the model and the world
    return Estimate(seconds, per, basis, plan)


def save(out: Path, est: Estimate) -> None:
    from ..records.schema import atomic_write_json

    atomic_write_json(Path(out) / ESTIMATE_FILE, asdict(est))


def load(out: Path) -> Estimate | None:
    try:
        raw = json.loads((Path(out) / ESTIMATE_FILE).read_text("utf-8"))
        return Estimate(raw["seconds"], raw["seconds_per_rollout"], raw["basis"], Plan(**raw["plan"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def eta(est: Estimate | None, step_seconds: list[float], elapsed: float | None = None,
        since_last_step: float = 0.0) -> float | None:
    """Seconds left: the logged steps' mean time for the steps still to come plus the comparison at the same
    per-rollout cost, less the time spent since the last logged step; before any step is logged, the
    estimate less the time already spent."""
    if est is None:
        return None
    plan = est.plan
    if not step_seconds:
        return None if elapsed is None else max(est.seconds - elapsed, 0.0)
    mean = statistics.fmean(step_seconds)
    per = mean / max(plan.rollouts_per_step, 1)
    left = max(plan.steps - len(step_seconds), 0)
    return max(left * mean + EVAL_SHARE * per * plan.eval_rollouts - since_last_step, 0.0)


# Where a step's time goes, as a share of the step at the start of each phase (the tiny student on 2 cores: rollouts
# about 55 %, judging 5 %, the teacher's scoring and the update the rest): a step's progress from its phase.
PHASE_SPAN = {"loading": (0.0, 0.0), "rollouts": (0.0, 0.55), "judging": (0.55, 0.60), "mining": (0.60, 0.62),
              "update": (0.62, 0.98), "checkpoint": (0.98, 1.0)}


@dataclass
class Eta:
    seconds: float  # left
    behind: float | None  # seconds behind the start's estimate at this point, when more than a quarter late


def step_fraction(phase: str, done: int, total: int, in_step: float, step_seconds: float) -> float:
    """How much of the current step is done: counted where the phase counts (rollouts, judged trajectories), else
    the time spent in the step against a step's expected time, kept inside the phase's span."""
    lo, hi = PHASE_SPAN.get(phase, (0.0, 1.0))
    if total > 0:
        return lo + (hi - lo) * min(done / total, 1.0)
    return min(max(in_step / step_seconds if step_seconds > 0 else lo, lo), hi)


def eta_progress(est: Estimate | None, step_seconds: list[float], phase: str | None, done: int = 0, total: int = 0,
                 in_step: float = 0.0, in_phase: float = 0.0, elapsed: float | None = None) -> Eta | None:
    """Seconds left, moved by the progress inside the current step (``phase``, ``done`` of ``total``, ``in_step``
    seconds since the step began): the steps still to come at the run's own mean step time (before any step is
    logged: the current step's pace once a tenth of it is done, else the start's estimate), the current step's rest,
    then the comparison at the same per-rollout cost, less the time already spent in it. ``behind``: how far the run
    is behind the start's estimate (``elapsed`` since it began), when by more than a quarter."""
    if est is None:
        return None
    plan = est.plan
    per_est = est.seconds_per_rollout * plan.rollouts_per_step
    if phase in (None, "done"):
        left = eta(est, step_seconds, elapsed)
        return None if left is None else Eta(left, None)
    if phase == "comparison":
        per = statistics.fmean(step_seconds) / max(plan.rollouts_per_step, 1) if step_seconds else est.seconds_per_rollout
        return Eta(max(EVAL_SHARE * per * plan.eval_rollouts - in_phase, 0.0), None)
    frac = step_fraction(phase, done, total, in_step, statistics.fmean(step_seconds) if step_seconds else per_est)
    if step_seconds:
        per_step = statistics.fmean(step_seconds)
    elif frac >= 0.1 and in_step > 0:
        per_step = in_step / frac
    else:
        per_step = per_est
    steps_left = max(plan.steps - len(step_seconds) - frac, 0.0)
    left = steps_left * per_step + EVAL_SHARE * per_step / max(plan.rollouts_per_step, 1) * plan.eval_rollouts
    behind = None
    if elapsed is not None:
        expected = 10 + (len(step_seconds) + frac) * per_est  # where the start's estimate expected the run to be
        late = elapsed - expected
        behind = late if late > 0.25 * expected and late > 20 else None
    return Eta(left, behind)
