"""The live student-vs-teacher probe: one fixed request, rolled out at every step for viewers.

The student writes once on the probe request and, when an experience passes the gate for it, the
teacher (the same weights with the guide in its system prompt) writes once too. The student's tokens
are scored by the current weights (pi_old: the probe is scored before the update) and by the
teacher's context. The record is a :class:`genevolve.records.live.ProbeRecord`.

The probe costs almost nothing. Its conversations ride in the step's batch rollout as extra rows
(:func:`plan`, then :func:`finish`): each token depends only on its own conversation's messages and
seed, so the batch's trajectories are the ones it would have without them, and the probe changes
neither the batch nor the gradients. When the probe request is itself in the batch, its student is
the batch's first trajectory of that request (the same seed gives the same tokens). The teacher reads
the experience the bank holds when the step starts. Only at the first step of a run that picks its
probe request from what that step mines (:func:`auto_request`) is the teacher rolled out on its own,
after the mining (:func:`run_probe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..agent.teacher import student_block_len, teacher_stream
from ..records.schema import finite
from .update import token_logprobs


@dataclass
class ProbeResult:
    student: Any  # Trajectory
    verdict: Any  # Verdict
    logprobs: dict  # {"p": student's log-probs, "q": the teacher's on the same tokens, or None}
    experience: Any  # Experience or None
    similarity: float
    teacher: Any = None
    teacher_verdict: Any = None
    retrieval: str = ""  # "own" or "nearest" (see teacher_experience)


GIVEN = "given with --probe-request"
AUTO = "the first request of step 1 with an experience mined from it (else step 1's first request)"


def probe_request(world, request_id: str | None, split: str):
    """The request given as the probe's (checked), or None: :func:`auto_request` picks one at the first step."""
    if request_id is None:
        return None
    req = next((r for r in world.requests if r.id == request_id), None)
    if req is None:
        raise ValueError(f"probe_request {request_id!r} is not a sandbox request id (e.g. {world.split(split)[0].id})")
    return req


def earlier_request(out: Path, prompts):
    """The request an earlier probe of this run followed (a resumed run keeps it), or None."""
    from ..records.live import read_probe

    try:
        earlier = read_probe(out)
    except ValueError:
        earlier = None
    if earlier is None:
        return None
    return next((r for r in prompts if r.id == earlier.request_id), None)


def auto_request(out: Path, batch, prompts, bank):
    """The probe's request when none was given: the one an earlier probe of this run followed (a resumed
    run keeps it), else the first request of this (the first) step's batch that retrieves an experience mined
    from itself, else the first that retrieves any (so the live view has a teacher from the start), else the
    batch's first request."""
    known = earlier_request(out, prompts)
    if known is not None:
        return known
    got = {r.id: bank.retrieve(r.text)[0] for r in batch} if len(bank) else {}
    return next((r for r in batch if got.get(r.id) is not None and r.id in got[r.id].sources()),
                next((r for r in batch if got.get(r.id) is not None), batch[0]))


def teacher_experience(bank, req):
    """The experience the probe's teacher reads, its similarity to the request and how it was found: what the
    update's teacher reads for this request (``bank.retrieve``: the nearest above the gate, one rule for both),
    labelled "own" when it was mined from this very request (alone or among others merged into it), else
    "nearest"."""
    exp, sim = bank.retrieve(req.text)
    if exp is None:
        return None, sim, ""
    return exp, sim, "own" if req.id in exp.sources() else "nearest"


@dataclass
class ProbePlan:
    """The probe's share of a step's rollout: its episodes (the student's unless the batch has it, and the
    teacher's when an experience passes the gate) and what the teacher reads."""

    req: Any
    seed: int
    experience: Any = None
    similarity: float = 0.0
    retrieval: str = ""
    episodes: list = field(default_factory=list)  # Episode: the student's (when not in the batch), then the teacher's
    student_in_batch: bool = False


def plan(req, pol, tools, bank, seed: int, use_ved: bool, batch_ids: set[str] = frozenset()) -> ProbePlan:
    """The probe's extra episodes for a step whose batch holds the requests ``batch_ids``."""
    from ..agent.rollout import episodes_for
    from ..experience.bank import guide_text

    exp, sim, how = teacher_experience(bank, req) if use_ved and len(bank) else (None, 0.0, "")
    pl = ProbePlan(req, seed, exp, sim, how, student_in_batch=req.id in batch_ids)
    if not pl.student_in_batch:
        pl.episodes += episodes_for([req], pol, tools, 1, seed, suffix="-student")
    if exp is not None:
        pl.episodes += episodes_for([req], pol, tools, 1, seed, guides={req.id: guide_text(exp)}, suffix="-teacher")
    return pl


def _from_batch(req, batch, trajs: list, verdicts: list, k: int):
    """The batch's first trajectory of ``req`` and its verdict, renamed as the probe's student."""
    n = next(i for i, r in enumerate(batch) if r.id == req.id) * k
    student = trajs[n].model_copy(update={"id": trajs[n].id + "-student"})
    return student, verdicts[n].model_copy(update={"trajectory_id": student.id})


def finish(pl: ProbePlan, probe_trajs: list, batch, trajs: list, verdicts: list, k: int, pol, scorer, store,
           pad_id: int) -> ProbeResult:
    """The probe's result from its rolled-out episodes (``probe_trajs``, in :attr:`ProbePlan.episodes` order)
    and, when the student is in the batch, the batch's trajectories and verdicts; scored, no gradient."""
    probe_trajs = list(probe_trajs)
    if pl.student_in_batch:
        student, verdict = _from_batch(pl.req, batch, trajs, verdicts, k)
    else:
        student = probe_trajs.pop(0)
        verdict = scorer.score(pl.req, student, store, seed=student.seed)[1]
    res = ProbeResult(student, verdict, {"p": torch.zeros(len(student.token_ids)), "q": None}, pl.experience,
                      pl.similarity, retrieval=pl.retrieval)
    if pl.experience is not None:
        res.teacher = probe_trajs.pop(0)
        res.teacher_verdict = scorer.score(pl.req, res.teacher, store, seed=res.teacher.seed)[1]
    _score_tokens(res, pol, pad_id)
    return res


def run_probe(req, pol, tools, scorer, store, bank, sp, seed: int, pad_id: int, use_ved: bool,
              batch=(), trajs=(), verdicts=(), k: int = 1) -> ProbeResult:
    """The probe rolled out on its own (its student taken from the batch when ``batch`` holds ``req``)."""
    from ..agent.rollout import run_episodes

    pl = plan(req, pol, tools, bank, seed, use_ved, {r.id for r in batch})
    return finish(pl, run_episodes(pl.episodes, pol, sp) if pl.episodes else [], batch, list(trajs), list(verdicts),
                  k, pol, scorer, store, pad_id)


def _score_tokens(res: ProbeResult, pol, pad_id: int) -> None:
    """The student's tokens under the current weights (p) and under the teacher's context (q)."""
    from ..experience.bank import guide_text

    ids = res.student.token_ids
    if not ids:
        return
    with torch.no_grad():
        res.logprobs["p"] = token_logprobs(pol.model, [ids], pol.device, pad_id)[0].cpu()
        if res.experience is not None:
            try:
                t_ids, offset = teacher_stream(pol.tokenizer, guide_text(res.experience), res.student.system_prompt, ids)
            except ValueError:  # a stream re-encoded differently: shown without the teacher's numbers
                return
            q = token_logprobs(pol.model, [t_ids], pol.device, pad_id)[0]
            res.logprobs["q"] = q[offset:].cpu()  # aligned to the student's positions


def mean_gap(res: ProbeResult) -> float | None:
    """The probe's mean |log q - log p| over the student's sampled tokens the teacher scored (None without a teacher)."""
    q = res.logprobs.get("q")
    if q is None or not res.student.token_ids:
        return None
    mask = torch.tensor(res.student.assistant_mask[: len(q)], dtype=torch.bool)
    gaps = (q[: len(mask)] - res.logprobs["p"][: len(mask)]).abs()[mask]
    return finite(float(gaps.mean())) if gaps.numel() else None


def write(out: Path, tok, step: int, request, probe: ProbeResult, use_ved: bool, chosen: str = "") -> None:
    """Write the probe record of ``step`` (see :mod:`genevolve.records.live`)."""
    from ..experience.bank import guide_text
    from ..records.live import ProbeRecord, probe_case, token_rows, write_probe

    traj, exp = probe.student, probe.experience
    try:
        start = student_block_len(tok, traj.system_prompt, traj.token_ids)
    except ValueError:
        start = 0
    lp = probe.logprobs
    q = lp["q"].tolist() if lp.get("q") is not None else None
    tokens = token_rows(tok, traj.token_ids, traj.assistant_mask, lp["p"].tolist(), q, start)
    if q is not None:
        note = ""
    elif not use_ved:
        note = "no teacher: this arm trains without VED"
    elif exp is None:
        nearest = f" (the nearest is at similarity {probe.similarity:.3f})" if probe.similarity else ""
        note = f"no teacher: no experience passed the retrieval gate for the probe request{nearest}"
    else:
        note = "no teacher scores: the teacher's token stream did not line up with the student's"
    write_probe(out, ProbeRecord(step=step, request_id=request.id, request=request.text,
                                 experience_id=exp.id if exp is not None else None,
                                 guide=guide_text(exp) if exp is not None else None,
                                 similarity=probe.similarity if exp is not None else None, tokens=tokens,
                                 student=probe_case(traj, probe.verdict), teacher=probe_case(probe.teacher, probe.teacher_verdict),
                                 note=note, chosen=chosen, retrieval=probe.retrieval))
