"""Scoring with real models: any generator, the VLM judge, and a stated missing-case policy.

:class:`ModelScorer` has :class:`~genevolve.evaluation.bench.SandboxScorer`'s ``score(request, traj,
store, seed)``: the program goes to the generator with its reference images, the image is stored by
hash, the VLM judge compares it with the request's ground truth, and (when given) the
program-sufficiency judge gives R_text; R = (1 - alpha) KScore + alpha R_text (without a program
judge, R = KScore and alpha is recorded as 0).

**Missing-case policy.** A case fails for one of two kinds of reason, and ``Verdict.failed`` says which:

- the *policy's* failure: no program (no answer, protocol error): it scores 0 and always counts,
  because failing to answer is the policy's result;
- the *infrastructure's* failure (prefix ``generator failed`` / ``judge failed`` / ``no ground
  truth``): the render or judge call failed, or the dataset has no ground-truth image for the case.
  Those are *missing* cases: their scores are ``None``. With ``missing="exclude"`` (default) they
  are left out of every mean; with ``missing="zero"`` they count as 0 on every metric (T too, where the
  request asks for text: :func:`asks_for_text`). Either way :func:`summarise` reports how many
  there are, their ids and reasons, and the overall KScore under the other convention as well,
  so no zero is ever mixed into an average silently.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from .bench import ALPHA, MISSING_PREFIXES, UNSCORED, aggregate, is_missing, load_references
from ..records.schema import ImageStore, RenderedImage, Request, Trajectory, Verdict

MISSING_POLICIES = ("exclude", "zero")
__all__ = ["MISSING_POLICIES", "MISSING_PREFIXES", "ModelScorer", "asks_for_text", "is_missing", "summarise"]


class ModelScorer:
    def __init__(self, generator, judge, program_judge=None, gt_store: ImageStore | None = None, alpha: float = ALPHA):
        self.generator = generator
        self.judge = judge
        self.program_judge = program_judge
        self.gt_store = gt_store
        self.alpha = alpha if program_judge is not None else 0.0

    def _references(self, traj: Trajectory) -> tuple[list[tuple[str, Any]], list[str]]:
        refs, problems = load_references(traj)
        return [(info.title, im) for info, im in refs], problems

    def _gt(self, request: Request, store: ImageStore):
        for s in (self.gt_store, store):
            if s is not None and request.gt_image and request.gt_image in s:
                return s.get(request.gt_image)
        return None

    def score(self, request: Request, traj: Trajectory, store: ImageStore, seed: int = 0) -> tuple[RenderedImage | None, Verdict]:
        from ..judges import JudgeError

        base = dict(trajectory_id=traj.id, request_id=request.id, alpha=self.alpha,
                    text_policy=getattr(self.judge, "text_policy", "renormalise"))
        if traj.program is None:
            return None, Verdict(**base, failed=f"no program ({traj.termination})", rationale="The trajectory gave no answer.")
        gt = self._gt(request, store)
        if gt is None:
            return None, Verdict(**base, **UNSCORED, failed=f"no ground truth image for {request.id}"
                                 + (f" ({request.gt_image} not in the image store)" if request.gt_image else ""))
        prog = traj.program
        refs, problems = self._references(traj)
        try:
            image = self.generator.generate(prog.gen_prompt, [im for _, im in refs], seed=seed)
        except Exception as exc:  # a generator failure is recorded on this case only
            return None, Verdict(**base, **UNSCORED, failed=f"generator failed: {type(exc).__name__}: {exc}")
        h = store.put(image)
        rendered = RenderedImage(hash=h, width=image.width, height=image.height, generator=self.generator.name,
                                 prompt=prog.gen_prompt, reference_hashes=[store.put(im) for _, im in refs], seed=seed)
        try:
            j = self.judge.judge(request.text, image, gt)
        except JudgeError as exc:
            return rendered, Verdict(**base, **UNSCORED, image=h, failed=f"judge failed: {exc}")
        r_text, missing = 0.0, []
        if self.program_judge is not None:
            try:
                s = self.program_judge.judge(request.text, prog, refs)
            except JudgeError as exc:
                return rendered, Verdict(**base, **UNSCORED | dict(F=j.F, V=j.V, T=j.T, A=j.A, kscore=j.kscore), image=h,
                                         rationale=j.rationale, failed=f"judge failed: program sufficiency: {exc}")
            r_text, missing = s.r_text, s.missing
        rationale = j.rationale + (f" Program misses: {'; '.join(missing)}." if missing else "")
        notes = list(getattr(self.generator, "last_notes", []) or []) + problems
        if notes:
            rationale += " " + " ".join(notes) + "."
        reward = (1 - self.alpha) * j.kscore + self.alpha * r_text
        return rendered, Verdict(**base, image=h, F=j.F, V=j.V, T=j.T, A=j.A, kscore=j.kscore, r_text=r_text,
                                 reward=reward, rationale=rationale.strip())


def asks_for_text(request: Request, v: Verdict) -> bool:
    """Whether T is defined for a case: it was scored, the request asks for text (the text-rendering skill, or
    text in its scene), or the text policy gives every case a T ("half"). Otherwise T is not applicable."""
    return (v.T is not None or "text_rendering" in request.skills or bool((request.scene or {}).get("text"))
            or v.text_policy == "half")


def _as_zero(request: Request, v: Verdict) -> Verdict:
    """A missing case counted as 0 on every metric (T only where it applies)."""
    zero = dict(F=0.0, V=0.0, T=0.0 if asks_for_text(request, v) else None, A=0.0, kscore=0.0, r_text=0.0, reward=0.0)
    return v.model_copy(update=zero | {"failed": f"counted as 0: {v.failed}"})


def summarise(pairs: Iterable[tuple[Request, Verdict]], missing: str = "exclude") -> dict[str, Any]:
    """:func:`~genevolve.evaluation.bench.aggregate` under the missing-case policy, with the missing cases reported."""
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing is one of {', '.join(MISSING_POLICIES)}, not {missing!r}")
    pairs = list(pairs)
    gone = [(r, v) for r, v in pairs if is_missing(v)]
    kept = [(r, _as_zero(r, v) if is_missing(v) else v) for r, v in pairs] if missing == "zero" else \
        [(r, v) for r, v in pairs if not is_missing(v)]
    out = aggregate(kept) if kept else {"overall": {}, "track": {}, "category": {}, "difficulty": {}}
    judged = [v for r, v in pairs if not is_missing(v)]
    k_excl = sum(v.kscore for v in judged) / len(judged) if judged else None
    k_zero = sum(v.kscore for v in judged) / len(pairs) if pairs else None
    out["missing"] = {
        "policy": missing,
        "n": len(gone),
        "of": len(pairs),
        "ids": [v.trajectory_id for _, v in gone],
        "errors": {v.trajectory_id: v.failed for _, v in gone[:20]},
        "reasons": dict(Counter(next(p for p in MISSING_PREFIXES if v.failed.startswith(p)) for _, v in gone)),
        "kscore_missing_excluded": k_excl,
        "kscore_missing_as_zero": k_zero,
    }
    return out
