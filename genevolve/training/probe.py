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


def probe_request(world, request_id: str | None, split: str):
    """The request the probe follows: ``request_id``, or the training split's first request."""
    if request_id is None:
        return world.split(split)[0]
    req = next((r for r in world.requests if r.id == request_id), None)
    if req is None:
        raise ValueError(f"probe_request {request_id!r} is not a sandbox request id (e.g. {world.split(split)[0].id})")
    return req


def run_probe(req, pol, tools, scorer, store, bank, sp, seed: int, pad_id: int, use_ved: bool) -> ProbeResult:
    """The student and (when an experience passes the gate) the teacher once on ``req``, with the student's
    tokens scored by both; no gradient."""
    from ..experience.bank import guide_text
    from ..agent.rollout import rollout

    student = rollout([req], pol, tools, k=1, params=sp, seed=seed)[0]
    student.id += "-student"
    verdict = scorer.score(req, student, store, seed=student.seed)[1]
    exp, sim = bank.retrieve(req.text) if use_ved and len(bank) else (None, 0.0)
    res = ProbeResult(student, verdict, {"p": torch.zeros(len(student.token_ids)), "q": None}, exp, sim)
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


def write(out: Path, tok, step: int, request, probe: ProbeResult, use_ved: bool) -> None:
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
    note = ("" if q is not None else "no teacher: this arm trains without VED" if not use_ved
            else "no teacher: no experience passed the retrieval gate for the probe request")
    write_probe(out, ProbeRecord(step=step, request_id=request.id, request=request.text,
                                 experience_id=exp.id if exp is not None else None,
                                 guide=guide_text(exp) if exp is not None else None,
                                 similarity=probe.similarity if exp is not None else None, tokens=tokens,
                                 student=probe_case(traj, probe.verdict), teacher=probe_case(probe.teacher, probe.teacher_verdict),
                                 note=note))
