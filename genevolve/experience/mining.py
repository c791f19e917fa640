"""Mining best-vs-worst pairs from groups of rollouts.

Per group of K rollouts of one request, the best and worst trajectories by reward form a
pair when their reward gap is at least ``delta_min`` (0.20) and the worst one is not a pure protocol
failure (it reached an answer that could be judged); at most ``max_pairs`` (8) per step, largest
gaps first. The best must be *grounded* (:func:`evidence`): every name it image-searched came from
the request or from a tool result it had read, and every reference it kept was shown to it. A
trajectory that scores best with a name it made up guessed right; a lesson drawn from it would teach
guessing, so the best grounded trajectory stands in for it (or the group gives no pair). Among
equally bad worst candidates, the one that gathered its evidence differently from the best is taken,
so that the lesson is about the search and the references where the group shows a difference there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from ..records.schema import Trajectory, Verdict

DELTA_MIN = 0.20
MAX_PAIRS = 8


_NAME = re.compile(r"[A-Z][A-Za-z'-]{2,}")
_WORD = re.compile(r"[A-Za-z0-9'-]+")


@dataclass(frozen=True)
class Evidence:
    """Where a trajectory's choices came from, read from its own turns (no ground truth needed).

    ``guessed_names``: capitalised words it image-searched (after a query's first word) that neither the
    request nor any tool result it had read before that call contains: names from its own memory.
    ``unseen_references``: reference ids it kept that no tool ever showed it.
    """

    fact_searches: int
    image_searches: int
    guessed_names: tuple[str, ...]
    unseen_references: tuple[str, ...]
    references: tuple[str, ...]

    @property
    def grounded(self) -> bool:
        return not self.guessed_names and not self.unseen_references


def evidence(traj: Trajectory) -> Evidence:
    """How a trajectory gathered what it used: fact and image searches, guessed names, unseen references."""
    seen = {w.lower() for w in _WORD.findall(traj.request_text)}
    shown: set[str] = set()
    facts = images = 0
    guessed: list[str] = []
    for turn in traj.turns:
        call = turn.tool_call
        if call is not None and turn.observation is not None:
            if call.name == "search":
                facts += 1
            elif call.name == "image_search":
                images += 1
                query = str(call.arguments.get("query", ""))
                for m in _NAME.finditer(query):
                    if m.start() > 0 and query[: m.start()].strip() and m.group(0).lower() not in seen:
                        guessed.append(m.group(0))
        if turn.observation is not None:
            seen |= {w.lower() for w in _WORD.findall(turn.observation.text)}
            shown |= {im.img_id for im in turn.observation.images}
    refs = tuple(r.img_id for r in traj.program.reference_images) if traj.program else ()
    return Evidence(facts, images, tuple(dict.fromkeys(guessed)), tuple(r for r in refs if r not in shown), refs)


@dataclass
class Pair:
    request_id: str
    request_text: str
    best: Trajectory
    worst: Trajectory
    best_verdict: Verdict
    worst_verdict: Verdict
    passed_over: int = 0  # trajectories that scored above ``best`` but guessed (not grounded)

    @property
    def gap(self) -> float:
        return self.best_verdict.reward - self.worst_verdict.reward


def _gathered(e: Evidence) -> tuple:
    return (e.fact_searches > 0, e.image_searches > 0, e.references)


def mine_pairs(groups: Sequence[Sequence[tuple[Trajectory, Verdict]]], delta_min: float = DELTA_MIN,
               max_pairs: int = MAX_PAIRS) -> list[Pair]:
    """Best-vs-worst pairs from groups of rollouts (one group per request), largest gaps first.

    Cases that could not be judged (reward ``None``) take no part: their rank is unknown. The best is
    the highest-rewarded *grounded* trajectory (see the module docstring); ties go to the earlier one.
    """
    pairs = []
    for group in groups:
        group = [tv for tv in group if tv[1].reward is not None]
        if len(group) < 2:
            continue
        ev = {id(t): evidence(t) for t, _ in group}
        by_reward = sorted(group, key=lambda tv: -tv[1].reward)  # stable: ties keep their order
        grounded = [tv for tv in by_reward if ev[id(tv[0])].grounded]
        if not grounded:
            continue
        b, bv = grounded[0]
        passed_over = sum(1 for _, v in by_reward if v.reward > bv.reward)
        low = min(v.reward for _, v in group)
        candidates = [tv for tv in group if tv[1].reward == low and tv[0] is not b]
        if not candidates:
            continue
        # Among equally bad ones, prefer an answer that gathered its evidence differently from the best.
        candidates.sort(key=lambda tv: (tv[0].termination != "answer" or tv[0].program is None or bool(tv[1].failed),
                                        _gathered(ev[id(tv[0])]) == _gathered(ev[id(b)])))
        w, wv = candidates[0]
        if bv.reward - wv.reward < delta_min:
            continue
        if w.termination != "answer" or w.program is None or wv.failed:
            continue  # a pure protocol failure says nothing about visual decisions
        pairs.append(Pair(b.request_id, b.request_text, b, w, bv, wv, passed_over))
    pairs.sort(key=lambda p: p.gap, reverse=True)
    return pairs[:max_pairs]
