"""Render and judge trajectories, roll out groups, and aggregate bench scores.

Scoring one trajectory: its program goes to the generator with its reference images; the image is
stored by hash; the judge scores it against the request's ground truth (F, V, T, A, KScore) and the
program-sufficiency judge gives R_text; the reward mixes them: R = (1 - alpha) KScore + alpha R_text.
Every case gets a verdict; nothing is silently skipped. A trajectory with no program is the policy's
failure: it scores 0. A case that cannot be judged (a request outside the sandbox world has no ground
truth; the generator failed) is *missing*: its scores are ``None`` and aggregates count it apart.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from ..records.schema import ImageStore, Program, RenderedImage, Request, Trajectory, Verdict

ALPHA = 0.5
# A verdict whose ``failed`` starts with one of these was not judged: a missing case, never a 0.
MISSING_PREFIXES = ("generator failed", "judge failed", "no ground truth")
UNSCORED = dict(F=None, V=None, T=None, A=None, kscore=None, r_text=None, reward=None)


def is_missing(v: Verdict) -> bool:
    """A case that failed for reasons outside the policy: left out of means and counted as missing."""
    return v.failed is not None and v.failed.startswith(MISSING_PREFIXES)


def raw_trajectory(request: Request, seed: int = 0) -> Trajectory:
    """The "raw generator" baseline: the request text goes straight to the generator, no agent, no references."""
    return Trajectory(id=f"{request.id}-raw-s{seed}", request_id=request.id, request_text=request.text, policy="raw",
                      seed=seed, program=Program(gen_prompt=request.text), termination="answer")


def load_references(traj: Trajectory) -> tuple[list[tuple[Any, Any]], list[str]]:
    """The program's reference images as (image info, RGB image) in program order, and what could not be read."""
    from PIL import Image

    refs, problems = [], []
    for ref in traj.program.reference_images if traj.program else []:
        info = traj.image(ref.img_id)
        if info is None or not info.local_path:
            problems.append(f"reference {ref.img_id} has no image")
            continue
        try:
            with Image.open(info.local_path) as im:
                refs.append((info, im.convert("RGB")))
        except OSError as exc:
            problems.append(f"reference {ref.img_id} could not be read: {exc}")
    return refs, problems


class SandboxScorer:
    """Renders with the world's generator and judges with the world's judge."""

    def __init__(self, world, alpha: float = ALPHA):
        self.world = world
        self.alpha = alpha

    def _reference_images(self, traj: Trajectory) -> tuple[list[Any], list[dict[str, Any]], list[str]]:
        refs, problems = load_references(traj)
        return [im for _, im in refs], [self.world.refs.get(info.source_id, {}) for info, _ in refs], problems

    def score(self, request: Request, traj: Trajectory, store: ImageStore, seed: int = 0) -> tuple[RenderedImage | None, Verdict]:
        base = dict(trajectory_id=traj.id, request_id=request.id, alpha=self.alpha)
        if traj.program is None:
            return None, Verdict(**base, failed=f"no program ({traj.termination})", rationale="The trajectory gave no answer.")
        prog = traj.program
        refs, rows, problems = self._reference_images(traj)
        try:
            image = self.world.generator.generate(prog.gen_prompt, refs, seed=seed)
        except Exception as exc:  # a generator failure is recorded on this case only
            return None, Verdict(**base, **UNSCORED, failed=f"generator failed: {type(exc).__name__}: {exc}")
        h = store.put(image)
        ref_hashes = [store.put(im) for im in refs]
        rendered = RenderedImage(hash=h, width=image.width, height=image.height, generator=self.world.generator.name,
                                 prompt=prog.gen_prompt, reference_hashes=ref_hashes, seed=seed)
        if request.scene is None:  # rendered for a look, but there is nothing to compare it with
            return rendered, Verdict(**base, **UNSCORED, image=h, failed="no ground truth: the request lies outside "
                                     f"the sandbox world ({request.parse_error})")
        from ..world.scene import Scene

        scene = Scene.from_dict(request.scene)
        j = self.world.judge.judge(image, scene, self.world.gt_image(request))
        r_text, missing = self.world.judge.program_sufficiency(prog.gen_prompt, scene, rows)
        rationale = j.rationale + (f" Program misses: {'; '.join(missing)}." if missing else "")
        if problems:
            rationale += " " + " ".join(problems) + "."
        reward = (1 - self.alpha) * j.kscore + self.alpha * r_text
        return rendered, Verdict(**base, image=h, F=j.F, V=j.V, T=j.T, A=j.A, kscore=j.kscore, r_text=r_text,
                                 reward=reward, rationale=rationale)


_INVALID_ISSUES = ("empty gen_prompt", "gen_prompt is missing", "dropped unknown image id", "dropped a malformed",
                   "gen_prompt names images by id", "reference_images is not a list", "dropped duplicate")


def protocol_valid(traj: Trajectory) -> bool:
    """Every turn is one well-formed action with a known tool and skill, and it ends in a clean answer."""
    if traj.termination != "answer" or traj.program is None:
        return False
    if any(t.error for t in traj.turns):
        return False
    return not any(issue.startswith(_INVALID_ISSUES) for issue in traj.program.issues)


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------

DIMS = ("kscore", "F", "V", "T", "A", "r_text", "reward")


def mean_ci(values: Sequence[float], z: float | None = None) -> tuple[float, float]:
    """Mean and half-width of a 95 % confidence interval: Student's t with n - 1 degrees of freedom
    (seeds are few: with 3, the t quantile is 4.30, not 1.96), or the normal one when ``z`` is given.

    Undefined is ``None``: no values, no mean; one value, no interval.
    """
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return m, None
    if z is None:
        from scipy.stats import t

        z = float(t.ppf(0.975, len(vals) - 1))
    return m, z * statistics.stdev(vals) / math.sqrt(len(vals))


def aggregate(pairs: Iterable[tuple[Request, Verdict]]) -> dict[str, Any]:
    """KScore (and F, V, T, A, R_text, reward) overall and by track, category and difficulty.

    ``failed`` counts the policy's failures (no program), which score 0 and count; ``missing`` counts the
    cases that could not be judged (:func:`is_missing`), which are left out of every mean. A mean over
    nothing is ``None``. A request with no track, category or difficulty is in no group at that level.
    """
    groups: dict[str, dict[str, list[Verdict]]] = {"overall": defaultdict(list), "track": defaultdict(list),
                                                  "category": defaultdict(list), "difficulty": defaultdict(list)}
    for req, v in pairs:
        groups["overall"]["all"].append(v)
        for level, key in (("track", req.track), ("category", req.category), ("difficulty", req.difficulty)):
            if key is not None:
                groups[level][str(key)].append(v)
    out: dict[str, Any] = {}
    for level, bucket in groups.items():
        out[level] = {}
        for key, vs in sorted(bucket.items()):
            judged = [v for v in vs if not is_missing(v)]
            row = {"n": len(vs), "failed": sum(v.failed is not None for v in judged), "missing": len(vs) - len(judged)}
            for d in DIMS:
                vals = [getattr(v, d) for v in judged]
                vals = [x for x in vals if x is not None]
                row[d] = statistics.fmean(vals) if vals else None
            out[level][key] = row
    return out


# ---------------------------------------------------------------------------
# One evaluation: roll out -> render -> judge -> aggregate per seed -> mean ± 95 % CI over seeds
# ---------------------------------------------------------------------------

LEVELS = ("overall", "track", "category", "difficulty")


@dataclass
class Case:
    """One rolled-out, rendered and judged trajectory of an evaluation."""

    seed: int
    sample: int
    request: Request
    trajectory: Trajectory
    rendered: RenderedImage | None
    verdict: Verdict


@dataclass
class Evaluation:
    """The cases, each seed's aggregate (:func:`aggregate`), the mean ± 95 % CI over seeds (:func:`over_seeds`)
    and the protocol-valid rate."""

    cases: list[Case]
    per_seed: dict[int, dict[str, Any]]
    by: dict[str, Any]
    protocol_valid: dict[str, Any]


def trajectories(requests: Sequence[Request], policy, tools, k: int, seed: int, params=None,
                 guides: dict[str, str] | None = None, on_turn: Callable[[int, int], None] | None = None) -> list[Trajectory]:
    """``k`` trajectories per request (request-major; trajectory ``i`` of a request uses seed ``seed * 1000 + i``);
    ``policy`` None is the raw-generator baseline."""
    if policy is None:
        return [raw_trajectory(r, seed * 1000 + i) for r in requests for i in range(k)]
    from ..policies.base import SamplingParams
    from ..agent.rollout import rollout

    params = params or SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=384)
    return rollout(requests, policy, tools, k=k, params=params, seed=seed, guides=guides, on_turn=on_turn)


def over_seeds(per_seed: dict[int, dict[str, Any]], levels: Sequence[str] = LEVELS) -> dict[str, Any]:
    """Mean ± 95 % CI over seeds of per-seed aggregates: level -> group -> dim -> {mean, ci95, per_seed}, with the
    group's size (``n``, the largest over seeds) and its failed and missing cases summed over seeds. A seed where a
    dimension is undefined (``None``) is left out of that dimension's list."""
    seeds = list(per_seed)
    out: dict[str, Any] = {}
    for level in levels:
        out[level] = {}
        for key in sorted({k for s in seeds for k in per_seed[s].get(level, {})}):
            rows = [per_seed[s][level][key] for s in seeds if key in per_seed[s].get(level, {})]
            group: dict[str, Any] = {}
            for d in DIMS:
                vals = [r[d] for r in rows if r.get(d) is not None]
                m, ci = mean_ci(vals)
                group[d] = {"mean": m, "ci95": ci, "per_seed": vals}
            group["n"] = max(r.get("n", 0) for r in rows)
            group["failed"] = sum(r.get("failed", 0) for r in rows)
            group["missing"] = sum(r.get("missing", 0) for r in rows)
            out[level][key] = group
    return out


def evaluate(requests: Sequence[Request], policy, tools, scorer, store: ImageStore, seeds: Sequence[int], *,
             samples: int = 1, params=None, guides: dict[str, str] | None = None, missing: str | None = None,
             levels: Sequence[str] = LEVELS, on_case: Callable[[Case], None] | None = None,
             progress: Callable[[str], None] | None = None,
             on_turn: Callable[[int, int, int], None] | None = None) -> Evaluation:
    """Roll out ``samples`` trajectories per request and seed, render and judge each (``scorer.score``), aggregate
    each seed and take the mean ± 95 % CI over seeds.

    A seed's figures average over all its samples. ``missing`` None aggregates every verdict
    (:func:`aggregate`, missing cases counted apart); "exclude" or "zero" applies that missing-case policy
    (:func:`genevolve.evaluation.scoring.summarise`). ``on_case`` sees each case as it is judged (a run-folder writer);
    ``on_turn(seed, finished, total)`` follows the rollouts (progress bars).
    """
    if samples < 1:
        raise ValueError("samples must be >= 1")
    cases, per_seed, valid = [], {}, {}
    for seed in seeds:
        if progress:
            progress(f"evaluating {getattr(policy, 'name', 'raw')} seed {seed} on {len(requests)} requests"
                     + (f" x {samples} samples" if samples > 1 else ""))
        turn = (lambda done, total, _s=seed: on_turn(_s, done, total)) if on_turn else None
        trajs = trajectories(requests, policy, tools, samples, seed, params, guides, turn)
        pairs = []
        for i, tr in enumerate(trajs):  # request-major: sample i % samples of request i // samples
            req = requests[i // samples]
            rendered, v = scorer.score(req, tr, store, seed=tr.seed)
            case = Case(seed, i % samples, req, tr, rendered, v)
            cases.append(case)
            pairs.append((req, v))
            if on_case:
                on_case(case)
        if missing is None:
            per_seed[seed] = aggregate(pairs)
        else:
            from .scoring import summarise

            per_seed[seed] = summarise(pairs, missing)
        valid[seed] = sum(protocol_valid(t) for t in trajs) / len(trajs) if trajs else None
    m, ci = mean_ci(list(valid.values()))
    return Evaluation(cases, per_seed, over_seeds(per_seed, levels), {"per_seed": valid, "mean": m, "ci95": ci})
