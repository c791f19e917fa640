"""The live student-vs-teacher probe: one fixed request, rolled out at every step for viewers.

The student writes once on the probe request and, when an experience passes the gate for it, the
teacher (the same weights with the guide in its system prompt) writes once too. The student's tokens
are scored by the current weights (pi_old: the probe runs before the update) and by the teacher's
context. Nothing is shared with the training batch: the probe changes neither the batch nor the
gradients. The record is a :class:`genevolve.records.live.ProbeRecord`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..agent.teacher import student_block_len, teacher_stream
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


def auto_request(out: Path, batch, prompts, bank):
    """The probe's request when none was given: the one an earlier probe of this run followed (a resumed
    run keeps it), else the first request of this (the first) step's batch that an experience was just
    mined from, so the live view has a teacher from the start, else the batch's first request."""
    from ..records.live import read_probe

    try:
        earlier = read_probe(out)
    except ValueError:
        earlier = None
    if earlier is not None:
        known = next((r for r in prompts if r.id == earlier.request_id), None)
        if known is not None:
            return known
    mined = {e.source_request_id for e in bank.items.values()}
    return next((r for r in batch if r.id in mined), batch[0])


def teacher_experience(bank, req):
    """The experience the probe's teacher reads, its similarity to the request and how it was found: the
    newest one mined from this very request ("own"), else the nearest one above the gate ("nearest")."""
    own = [e for e in bank.items.values() if e.source_request_id == req.id]
    if own:
        exp = max(own, key=lambda e: (e.step, e.created or ""))
        hits = [s for s, e in bank.search(req.text, k=len(bank)) if e.id == exp.id]
        return exp, (hits[0] if hits else 1.0), "own"
    exp, sim = bank.retrieve(req.text)
    return exp, sim, "nearest" if exp is not None else ""


def run_probe(req, pol, tools, scorer, store, bank, sp, seed: int, pad_id: int, use_ved: bool) -> ProbeResult:
    """The student and (when an experience passes the gate) the teacher once on ``req``, with the student's
    tokens scored by both; no gradient."""
    from ..experience.bank import guide_text
    from ..agent.rollout import rollout

    student = rollout([req], pol, tools, k=1, params=sp, seed=seed)[0]
    student.id += "-student"
    verdict = scorer.score(req, student, store, seed=student.seed)[1]
    exp, sim, how = teacher_experience(bank, req) if use_ved and len(bank) else (None, 0.0, "")
    res = ProbeResult(student, verdict, {"p": torch.zeros(len(student.token_ids)), "q": None}, exp, sim, retrieval=how)
    if exp is not None:
        teacher = rollout([req], pol, tools, k=1, params=sp, seed=seed, guides={req.id: guide_text(exp)})[0]
        teacher.id += "-teacher"
        res.teacher, res.teacher_verdict = teacher, scorer.score(req, teacher, store, seed=teacher.seed)[1]
    ids = student.token_ids
    if ids:
        with torch.no_grad():
            res.logprobs["p"] = token_logprobs(pol.model, [ids], pol.device, pad_id)[0].cpu()
            if exp is not None:
                try:
                    t_ids, offset = teacher_stream(pol.tokenizer, guide_text(exp), student.system_prompt, ids)
                except ValueError:  # a stream re-encoded differently: shown without the teacher's numbers
                    return res
                q = token_logprobs(pol.model, [t_ids], pol.device, pad_id)[0]
                res.logprobs["q"] = q[offset:].cpu()  # aligned to the student's positions
    return res


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
