"""The scripted expert planner: a policy that knows the sandbox world and writes protocol-exact turns.

It is stateless between calls: every call re-reads the conversation (request, decision guide,
earlier tool calls and their observations) and decides the next turn, so any agent loop can drive
it. Noise knobs make it imperfect in the ways that matter (they are drawn once per trajectory from
the sampling seed):

- ``skip_skills`` / ``p_skip_skill``: never query a needed skill, so its wording is not applied;
- ``blind_skills`` / ``p_blind``: skip these skills far more often than the others (a systematic
  blind spot, which a student trained on the data keeps, rather than noise it averages away);
- ``p_distractor``: pick a distractor reference (misprint, historic, fan-made, look-alike twin);
- ``p_vague``: query a skill but still write the request's loose wording;
- ``p_skip_search``: skip the fact search a multi-hop entity needs, and guess.

With a "Current-Task Decision Guide" in the system prompt the expert follows it: every skill the
guide names is queried and applied, and a guide that talks about references or search turns the
matching noise off. That is the behaviour the privileged teacher is meant to induce.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ..policies.base import TurnByTurnPolicy
from .protocol import FINAL_STEP_MESSAGE, GUIDE_HEADER, MAX_TOOL_CALLS, parse_turn, render_turn, unwrap_observation
from ..records.schema import SKILLS, ToolCall
from ..world.entities import official_title, reference_noun_and_name
from ..world.requests import ParseError, ParsedRequest, needed_skills
from ..world.vocab import (
    GENERATOR_MATERIAL_PHRASES,
    NUMBER_WORDS,
    REQUEST_CELL_PHRASES,
    REQUEST_LIGHTING_PHRASES,
    REQUEST_STYLE_PHRASES,
    SHADOW_PHRASE,
    exact_text_phrase,
    generator_cell_phrase,
    generator_lighting_phrase,
    generator_style_phrase,
    limb_phrase,
)

ORDINALS = ("first", "second")
_IMG_LINE = re.compile(r"^(IMG_\d{3,}): title: (.*)$", re.M)


@dataclass(frozen=True)
class ExpertNoise:
    skip_skills: tuple[str, ...] = ()
    p_skip_skill: float = 0.0
    p_distractor: float = 0.0
    p_vague: float = 0.0
    p_skip_search: float = 0.0
    blind_skills: tuple[str, ...] = ()
    p_blind: float = 0.0

    @classmethod
    def cold_start(cls) -> "ExpertNoise":
        """The noise used for cold-start SFT data: imperfect, so self-evolution has headroom."""
        return cls(p_skip_skill=0.35, p_distractor=0.3, p_vague=0.2, p_skip_search=0.25)

    @classmethod
    def blind_spots(cls) -> "ExpertNoise":
        """Cold-start noise plus three skills the unguided expert mostly forgets (layout, lighting, anatomy).

        A student trained on independent coin-flip skips learns to query every skill about as often as
        the data does, so a guide only fixes the few it happens to drop. Skills that are skipped 85 % of
        the time without a guide and always queried with one are a behaviour a guide really changes:
        the gap self-evolution is meant to close.
        """
        return replace(cls.cold_start(), blind_skills=("spatial_layout", "aesthetic_drawing", "anatomy_body_coherence"),
                       p_blind=0.85)

    @classmethod
    def named(cls, name: str) -> "ExpertNoise":
        presets = {"none": cls, "cold-start": cls.cold_start, "blind-spots": cls.blind_spots}
        if name not in presets:
            raise ValueError(f"unknown expert noise {name!r}; choose one of {', '.join(presets)}")
        return presets[name]()


@dataclass
class _Decisions:
    skills: list[str]  # skills to query
    applied: set[str]  # skills whose wording is used in the answer
    distractor: dict[int, bool]
    skip_search: dict[int, bool]


@dataclass
class _Context:
    request: str
    guide: str | None
    forced: bool
    history: list[tuple[ToolCall, str]] = field(default_factory=list)  # (call, observation text)


def _stable(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def read_context(messages: list[dict[str, Any]]) -> _Context:
    sys_prompt = str(messages[0].get("content", "")) if messages else ""
    guide = sys_prompt.split(f"## {GUIDE_HEADER}\n", 1)[1] if f"## {GUIDE_HEADER}\n" in sys_prompt else None
    request = str(messages[1].get("content", "")) if len(messages) > 1 else ""
    ctx = _Context(request=request, guide=guide, forced=bool(messages) and messages[-1].get("content") == FINAL_STEP_MESSAGE)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        p = parse_turn(str(m.get("content", "")))
        if p.tool_call is None:
            continue
        obs = ""
        if i + 1 < len(messages) and messages[i + 1].get("role") == "user":
            obs = unwrap_observation(str(messages[i + 1].get("content", ""))) or ""
        ctx.history.append((p.tool_call, obs))
    return ctx


class ExpertPolicy(TurnByTurnPolicy):
    """A policy (``complete(messages, seed)``, asked round by round in rollouts) that plans with full knowledge of the sandbox world."""

    def __init__(self, world, noise: ExpertNoise = ExpertNoise(), name: str = "expert"):
        self.world = world
        self.noise = noise
        self.name = name

    # -- the policy interface -------------------------------------------------
    def complete(self, messages: list[dict[str, Any]], seed: int = 0) -> str:
        ctx = read_context(messages)
        try:
            parsed = self.world.parse(ctx.request)
        except ParseError as exc:
            return render_turn(f"I cannot ground this request in the known world ({exc}); I will pass it on as it is.",
                               answer={"gen_prompt": ctx.request, "reference_images": []})
        dec = self._decide(parsed, ctx, seed)
        action = None if ctx.forced or len(ctx.history) >= MAX_TOOL_CALLS else self._next_action(parsed, ctx, dec)
        first = not any(m.get("role") == "assistant" for m in messages)
        if action is not None:
            think, call = action
            if first:  # restate the task (and what a guide asks for) where later turns can read it
                think = self._restate(ctx) + " " + think
            return render_turn(think, tool_call=call)
        think, answer = self._answer(parsed, ctx, dec, seed)
        if first:
            think = self._restate(ctx) + " " + think
        return render_turn(think, answer=answer)

    @staticmethod
    def _restate(ctx: _Context) -> str:
        text = f"Request: {ctx.request}."
        if ctx.guide:
            skills = [s for s in SKILLS if s in ctx.guide]
            text += f" The guide asks for {', '.join(skills) if skills else 'no skill'}."
        return text

    # -- decisions ---------------------------------------------------------------
    def _decide(self, parsed: ParsedRequest, ctx: _Context, seed: int) -> _Decisions:
        noise = self.noise
        guided: set[str] = set()
        if ctx.guide:
            low = ctx.guide.lower()
            guided = {s for s in SKILLS if s in low}
            noise = replace(
                noise,
                skip_skills=tuple(s for s in noise.skip_skills if s not in guided),
                p_distractor=0.0 if ("reference" in low or "official" in low) else noise.p_distractor,
                p_skip_search=0.0 if "search" in low else noise.p_skip_search,
            )
        rng = random.Random(_stable("expert", ctx.request, seed))
        skills, applied = [], set()
        for s in needed_skills(parsed.scene):
            p_skip = noise.p_blind if s in noise.blind_skills else noise.p_skip_skill
            skip = s in noise.skip_skills or (s not in guided and rng.random() < p_skip)
            if skip:
                continue
            skills.append(s)
            if s in guided or rng.random() >= noise.p_vague:
                applied.add(s)
        distractor = {i: rng.random() < noise.p_distractor for i in parsed.mentions}
        skip_search = {i: rng.random() < noise.p_skip_search for i in parsed.mentions}
        return _Decisions(skills, applied, distractor, skip_search)

    # -- tools -------------------------------------------------------------------
    def _hop_steps(self, parsed: ParsedRequest, i: int) -> list[tuple[str, str]]:
        """The searches a multi-hop mention needs, each with the name its results should reveal."""
        w = self.world.data
        m = parsed.mentions[i]
        if m.via == "event":
            ev = w.events[m.event]
            return [(f"{ev.year} {ev.trophy} winner", w.entities[ev.winner].name)]
        if m.via == "location":
            lm = w.entities[m.landmark]
            return [(f"{lm.name} location nation", w.entities[lm.nation].name)]
        if m.via == "home":
            ev = w.events[m.event]
            club = w.entities[m.club]
            return [(f"{ev.year} {ev.trophy} winner", club.name), (f"{club.name} home nation", w.entities[club.nation].name)]
        return []

    @staticmethod
    def _searches(ctx: _Context) -> dict[str, str]:
        return {" | ".join(map(str, c.arguments.get("queries", []))): o for c, o in ctx.history if c.name == "search"}

    def _pending_search(self, parsed: ParsedRequest, i: int, ctx: _Context) -> str | None:
        done = self._searches(ctx)
        for q, reveals in self._hop_steps(parsed, i):
            if q not in done:
                return q
            if not re.search(rf"\b{re.escape(reveals)}\b", done[q]):
                alt = f"who is {q}"
                if alt not in done:
                    return alt
        return None

    def _entity_name_known(self, parsed: ParsedRequest, i: int, ctx: _Context, dec: _Decisions) -> str:
        """The entity's name as the expert will use it (a guess when it skipped the search)."""
        w = self.world.data
        m = parsed.mentions[i]
        ent = w.entities[m.entity]
        if m.via != "name" and dec.skip_search[i]:
            # Guessing without evidence: the runner-up or a look-alike is as likely as the truth.
            rng = random.Random(_stable("guess", ctx.request, i))
            pool = [ent.name]
            if m.event and w.entities[w.events[m.event].runner_up].kind == ent.kind:
                pool.append(w.entities[w.events[m.event].runner_up].name)
            if ent.twin:
                pool.append(w.entities[ent.twin].name)
            return rng.choice(pool)
        return ent.name

    def _image_query(self, name: str) -> str:
        ent = self.world.data.by_name(name)
        noun = reference_noun_and_name(ent)[0] if ent else "picture"
        return f"official {noun} of {name}"

    def _next_action(self, parsed: ParsedRequest, ctx: _Context, dec: _Decisions) -> tuple[str, ToolCall] | None:
        img_queries = [str(c.arguments.get("query", "")) for c, _ in ctx.history if c.name == "image_search"]
        queried = {str(c.arguments.get("skill_name", "")) for c, _ in ctx.history if c.name == "query_knowledge"}
        for i, m in parsed.mentions.items():
            phrase = parsed.phrases.get(i, "the entity")
            if m.via != "name" and not dec.skip_search[i]:
                q = self._pending_search(parsed, i, ctx)
                if q is not None:
                    lead = "The last results did not settle it; " if q.startswith("who is") else ""
                    return (f"{lead}The request asks for {phrase}. I search for the fact I am missing.",
                            ToolCall(name="search", arguments={"queries": [q], "top_k": 3}))
            name = self._entity_name_known(parsed, i, ctx, dec)
            iq = self._image_query(name)
            if iq not in img_queries:
                lead = f"So {phrase} points to {name}. " if m.via != "name" else ""
                return (f"{lead}I need a reference image of {name}.",
                        ToolCall(name="image_search", arguments={"query": iq, "top_k": 4}))
        for s in dec.skills:
            if s not in queried:
                return (f"The request needs {s.replace('_', ' ')}; I check the {s} guidance.",
                        ToolCall(name="query_knowledge", arguments={"skill_name": s}))
        return None

    # -- answer ------------------------------------------------------------------
    def _select(self, parsed: ParsedRequest, i: int, ctx: _Context, dec: _Decisions, seed: int) -> tuple[str, str] | None:
        """(IMG id, title) picked for entity object i from its image_search results."""
        w = self.world.data
        name = self._entity_name_known(parsed, i, ctx, dec)
        iq = self._image_query(name)
        obs = next((o for c, o in ctx.history if c.name == "image_search" and c.arguments.get("query") == iq), None)
        if not obs:
            return None
        hits = _IMG_LINE.findall(obs)
        if not hits:
            return None
        named = w.by_name(name)
        want = official_title(named) if named else None
        rng = random.Random(_stable("select", ctx.request, seed, i))
        if dec.distractor[i]:
            others = [h for h in hits if h[1] != want]
            if others:
                return rng.choice(others)
        exact = [h for h in hits if h[1] == want]
        return exact[0] if exact else hits[0]

    def _answer(self, parsed: ParsedRequest, ctx: _Context, dec: _Decisions, seed: int) -> tuple[str, dict[str, Any]]:
        sc = parsed.scene
        picks = {i: self._select(parsed, i, ctx, dec, seed) for i in parsed.mentions}
        chosen = sorted({p[0] for p in picks.values() if p})
        ordinal = {img: ORDINALS[k] for k, img in enumerate(chosen[:2])}
        ap = dec.applied
        multi = len(sc.objects) >= 2
        low = ctx.request.lower()

        clauses = []
        for i, o in enumerate(sc.objects):
            if o.kind == "entity":
                p = picks.get(i)
                if p and p[0] in ordinal:
                    c = f"the {o.noun} from the {ordinal[p[0]]} reference image"
                else:
                    c = f"{parsed.phrases.get(i, 'the ' + (o.noun or 'emblem'))}"
            elif o.kind == "figure":
                c = f"a {o.color} {o.noun}"
                if "anatomy_body_coherence" in ap:
                    c += " " + limb_phrase(o.figure or "person")
            else:
                noun = o.noun if o.count == 1 else o.noun + ("es" if o.noun.endswith("s") else "s")
                color = f"{o.color} " if o.color else ""
                if o.count == 1:
                    head = "a"
                elif "quantity_counting" in ap:
                    head = f"exactly {NUMBER_WORDS[o.count]}"
                else:
                    head = NUMBER_WORDS[o.count]
                if o.material and "physical_material_consistency" in ap:
                    c = f"{head} {color}{noun} {GENERATOR_MATERIAL_PHRASES[o.material]}, {SHADOW_PHRASE}"
                else:
                    words = parsed.phrases.get(i, f"{head} {color}{noun}")
                    if o.count >= 2 and "quantity_counting" in ap and not words.lower().startswith("exactly"):
                        words = f"exactly {words}"
                    elif o.count >= 2 and "quantity_counting" not in ap and words.lower().startswith("exactly "):
                        words = words[8:]
                    c = words
            if multi:
                c += " " + (generator_cell_phrase(o.cell) if "spatial_layout" in ap else REQUEST_CELL_PHRASES[o.cell])
            clauses.append(c)

        colored = [o for o in sc.objects if o.kind in ("shape", "figure") and o.color]
        one_sentence = len(colored) >= 2 and "attribute_binding" not in ap
        if one_sentence:
            sentences = [_cap(", ".join(clauses[:-1]) + " and " + clauses[-1] if len(clauses) > 1 else clauses[0])]
        else:
            sentences = [_cap(c) for c in clauses]
        if sc.text:
            if "text_rendering" in ap:
                sentences.append(_cap(exact_text_phrase(sc.text)))
            elif f'"{sc.text.lower()}"' in low:
                sentences.append(f'A banner that says "{sc.text}"')
            else:
                sentences.append(f"With the words {sc.text} written on a banner")
        if sc.lighting:
            if "aesthetic_drawing" in ap:
                sentences.append(_cap(generator_lighting_phrase(sc.lighting)))
            else:
                sentences.append(_cap(next((p for p in REQUEST_LIGHTING_PHRASES[sc.lighting] if p in low), "nice lighting")))
        if sc.style:
            if "creative_drawing" in ap:
                sentences.append(_cap(generator_style_phrase(sc.style)))
            else:
                sentences.append(_cap(next((p for p in REQUEST_STYLE_PHRASES[sc.style] if p in low), "artistic")))
        gen_prompt = ". ".join(s.rstrip(".") for s in sentences) + "."
        refs = []
        for img in chosen[:2]:
            title = next(p[1] for p in picks.values() if p and p[0] == img)
            refs.append({"img_id": img, "note": f"{title}; copy it exactly"})
        used = [s for s in dec.skills]
        think = "I have what I need" + (f": references {', '.join(chosen[:2])}" if chosen else "")
        think += (f" and guidance from {', '.join(used)}" if used else "") + f". Writing the final prompt for: {ctx.request}"
        if ctx.forced:
            think = "Final step: answering with what I have."
        return think, {"gen_prompt": gen_prompt, "reference_images": refs}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s
