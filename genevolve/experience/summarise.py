"""Summarisers: a best-vs-worst pair in, a five-slot visual experience and its retrieval key out.

- :class:`SandboxSummariser` is deterministic. Its slots say what the better (grounded) attempt did:
  the searches it ran, every skill it used, the references it kept and the wordings its program has;
  its failure-avoidance slot says what the worse one got wrong (the skills and wordings it lacked, a
  name it image-searched that nobody gave it). Its retrieval key's trigger is the situation the better
  attempt handled, in the canonical words of :mod:`.situation` (a fact looked up first, an entity's
  official picture, each skill it used); the source prompt summary is the request with its names,
  years and quoted text taken out.
- :class:`LLMSummariser` asks any chat policy (an OpenAI-compatible server or a local model) with a
  versioned prompt for the same five slots and the retrieval key as JSON, and validates the answer.

Both return a :class:`Summary` whose slots :func:`genevolve.experience.bank.validate_slots` accepts and
whose key names no entity of the request, or raise :class:`SummaryError` with the reason (the trainer
records it and goes on).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .bank import ExperienceError, Pair, evidence, validate_key, validate_slots
from .situation import entity_names, situation_text, summarise_request
from ..agent.guides import AVOID, CONSTRUCTION, SLOTS
from ..policies.base import SamplingParams
from ..records.schema import RetrievalKey


class SummaryError(ValueError):
    """A pair could not be summarised (model output not JSON, slots invalid, ...)."""


@dataclass
class Summary:
    slots: dict[str, str]
    key: RetrievalKey


def checked_key(trigger: str, summary: str, request: str) -> RetrievalKey:
    """A valid retrieval key that names none of the request's entities (else :class:`SummaryError`)."""
    try:
        key = validate_key({"trigger": trigger, "source_prompt_summary": summary})
    except ExperienceError as exc:
        raise SummaryError(str(exc)) from exc
    for field, text in (("trigger", key.trigger), ("source_prompt_summary", key.source_prompt_summary)):
        named = sorted(n for n in entity_names(request) if re.search(rf"\b{re.escape(n)}\b", text.lower()))
        if named:
            raise SummaryError(f"the retrieval key's {field} names {', '.join(named)} from the request; a key is entity-free")
    return key


_PHRASES = {
    "spatial_layout": re.compile(r"\bin the (top-left|top-right|bottom-left|bottom-right|top|bottom|left|right|center) of the image\b"),
    "quantity_counting": re.compile(r"\bexactly (two|three|four|five|six)\b"),
    "anatomy_body_coherence": re.compile(r"\bwith exactly (two arms and two legs|four legs)\b"),
    "physical_material_consistency": re.compile(r"\bmade of (polished metal|wood|clear glass)\b"),
    "aesthetic_drawing": re.compile(r"\b(golden-hour|moonlit night|soft overcast|neon) lighting\b"),
    "creative_drawing": re.compile(r"\bin (watercolor|pixel art|stained-glass mosaic|ink sketch) style\b"),
    "text_rendering": re.compile(r'\bexact text "'),
}


def _calls(traj, name):
    return [t.tool_call for t in traj.turns if t.tool_call is not None and t.tool_call.name == name and t.observation is not None]


def _skills(traj) -> list[str]:
    return [str(c.arguments.get("skill_name")) for c in _calls(traj, "query_knowledge")]


def _one_sentence_per_colour(prompt: str) -> bool:
    colours = re.compile(r"\b(red|blue|green|gold|purple|orange|teal|pink)\b")
    return all(len(colours.findall(s)) <= 1 for s in re.split(r"[.;!?]", prompt))


class SandboxSummariser:
    name = "sandbox-diff-v3"

    def __init__(self, world):
        self.world = world

    def _variants(self, traj) -> list[str]:
        out = []
        for ref in traj.program.reference_images if traj.program else []:
            info = traj.image(ref.img_id)
            row = self.world.refs.get(info.source_id, {}) if info else {}
            out.append(row.get("variant", "unknown"))
        return out

    @staticmethod
    def handled(traj) -> list[str]:
        """The skills an attempt dealt with: queried, or written in the generator's exact wording (canonical order)."""
        prompt = traj.program.gen_prompt if traj.program else ""
        done = set(_skills(traj)) | {s for s, rx in _PHRASES.items() if rx.search(prompt)}
        return [s for s in CONSTRUCTION if s in done]

    def summarise(self, pair: Pair) -> Summary:
        b, w = pair.best, pair.worst
        bp, wp = (b.program.gen_prompt if b.program else ""), (w.program.gen_prompt if w.program else "")
        # The search lesson is what the (grounded) best did: mining never hands over a best that guessed a name.
        eb, ew = evidence(b), evidence(w)
        if eb.fact_searches:
            search = "Search the fact that names the entity first, then image-search its official picture by exact name."
        elif eb.image_searches:
            search = "Image-search the entity by its exact name; no text search is needed."
        else:
            search = "No search is needed; everything is in the request."
        used = self.handled(b)
        skill = ("Query " + ", ".join(used) + ".") if used else "No skill is needed."
        bv, wv = self._variants(b), self._variants(w)
        if bv and all(v == "official" for v in bv) and any(v != "official" for v in wv):
            ref = "Pick the reference titled Official with the exact name; skip misprints, historic, fan-made and look-alike names."
        elif bv:
            ref = "Keep the reference titled Official with the exact name."
        else:
            ref = "No reference image is needed."
        cons = ("; ".join(CONSTRUCTION[s] for s in used) + ".") if used else "Describe each object plainly."
        # What the worse attempt got wrong: the skills it left out or left unworded, and a lost binding.
        missed = [s for s in used if s not in self.handled(w) or (s in _PHRASES and not _PHRASES[s].search(wp))]
        if _one_sentence_per_colour(bp) and not _one_sentence_per_colour(wp) and "attribute_binding" not in missed:
            missed.append("attribute_binding")
        missed = [s for s in CONSTRUCTION if s in missed] or used
        avoid = ("Never rely on " + ", ".join(AVOID[s] for s in missed) + ".") if missed else \
            "Do not leave the generator to guess what the request left implicit."
        if not ew.grounded and (eb.fact_searches or eb.image_searches):
            avoid = "Never image-search a name that neither the request nor a search result gave. " + avoid
        slots = {"search_strategy": search, "skill_activation": skill, "reference_selection": ref,
                 "prompt_construction": cons[0].upper() + cons[1:], "failure_avoidance": avoid}
        needs = ({"lookup"} if eb.fact_searches else set()) | ({"entity"} if eb.image_searches else set()) | set(used)
        try:
            return Summary(validate_slots(slots), checked_key(situation_text(needs), summarise_request(pair.request_text),
                                                              pair.request_text))
        except ExperienceError as exc:
            raise SummaryError(str(exc)) from exc


LLM_PROMPT_VERSION = "llm-summary-v3"
LLM_PROMPT = """You compare two attempts at the same image request and distil what made the better one better.
Write short imperative guidance that would help on similar requests. Never name people, places, teams,
products, years or any other specific entity; never copy the request. Answer with one JSON object with
exactly these keys: "search_strategy", "skill_activation", "reference_selection", "prompt_construction",
"failure_avoidance", "trigger", "source_prompt_summary". Each of the first five is one or two sentences.
Teach how to gather evidence (which facts to look up, where the references come from), never a lucky
guess: a name an attempt searched without any source is a guess. "trigger" is the situation in which the
lesson applies, in action-space words (what must be looked up, which references, counts, layout, colours,
bodies, materials, lighting, style, text to render), one line starting with "Situation:" with one short
clause per need separated by semicolons, naming no entity. "source_prompt_summary" is the request with every name, year and quoted text replaced by
<name>, <year> and <text>.

Request: {request}

Better attempt (reward {best_reward:.2f}):
tools: {best_tools}
names searched without a source: {best_guessed}
program: {best_program}
judge: {best_rationale}

Worse attempt (reward {worst_reward:.2f}):
tools: {worst_tools}
names searched without a source: {worst_guessed}
program: {worst_program}
judge: {worst_rationale}
"""


def _tool_line(traj) -> str:
    calls = [t.tool_call for t in traj.turns if t.tool_call is not None]
    return "; ".join(f"{c.name}({json.dumps(c.arguments, ensure_ascii=False)})" for c in calls) or "none"


def parse_summary(text: str, request: str = "") -> Summary:
    """Find the JSON object in a model's answer and validate its five slots and its retrieval key."""
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        raise SummaryError("the summary has no JSON object")
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError as exc:
        raise SummaryError(f"the summary is not valid JSON: {exc.msg}") from exc
    if not isinstance(obj, dict):
        raise SummaryError("the summary JSON is not an object")
    key_fields = ("trigger", "source_prompt_summary")
    for k in key_fields:
        if not isinstance(obj.get(k, ""), str):
            raise SummaryError(f"the summary's {k} must be text")
    try:
        slots = validate_slots({k: obj.get(k, "") for k in SLOTS} | {k: v for k, v in obj.items() if k not in SLOTS + key_fields})
    except ExperienceError as exc:
        raise SummaryError(str(exc)) from exc
    return Summary(slots, checked_key(obj.get("trigger", ""), obj.get("source_prompt_summary", ""), request))


class LLMSummariser:
    """Summaries from any chat policy (``generate(conversations, params)``), e.g. an OpenAI-compatible VLM/LLM."""

    def __init__(self, policy, params: SamplingParams = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=500)):
        self.policy = policy
        self.params = params
        self.name = f"{LLM_PROMPT_VERSION}:{policy.name}"

    def prompt(self, pair: Pair) -> str:
        return LLM_PROMPT.format(
            request=pair.request_text, best_reward=pair.best_verdict.reward, worst_reward=pair.worst_verdict.reward,
            best_tools=_tool_line(pair.best), worst_tools=_tool_line(pair.worst),
            best_guessed=", ".join(evidence(pair.best).guessed_names) or "none",
            worst_guessed=", ".join(evidence(pair.worst).guessed_names) or "none",
            best_program=pair.best.program.model_dump_json(include={"gen_prompt", "reference_images"}) if pair.best.program else "none",
            worst_program=pair.worst.program.model_dump_json(include={"gen_prompt", "reference_images"}) if pair.worst.program else "none",
            best_rationale=pair.best_verdict.rationale, worst_rationale=pair.worst_verdict.rationale)

    def summarise(self, pair: Pair) -> Summary:
        out = self.policy.generate([[{"role": "user", "content": self.prompt(pair)}]], self.params)[0]
        if out.finish_reason == "error":
            raise SummaryError(f"summariser call failed: {out.error}")
        return parse_summary(out.text, pair.request_text)
