"""The agent loop: ``run_episode`` is one generator of typed steps that any policy drives.

A policy is anything with ``name`` and ``complete(messages, seed=...) -> str`` (the next assistant
turn). Errors the model causes (bad format, bad JSON, unknown tools or ids, tool failures, a policy
server that fails) are recorded on the turn and trajectory; programming errors raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol

from .protocol import (
    FINAL_STEP_MESSAGE,
    FORMAT_ERROR_MESSAGE,
    MAX_TOOL_CALLS,
    MAX_TURNS,
    SYSTEM_PROMPT,
    TOOL_NAMES,
    normalize_program,
    parse_turn,
    wrap_observation,
)
from ..records.schema import SKILLS, ImageRef, Observation, Request, ToolCall, Trajectory, Turn
from .teacher import system_message
from ..tools.base import format_image_results


class Policy(Protocol):
    name: str

    def complete(self, messages: list[dict[str, Any]], seed: int = 0) -> str: ...


class Tools:
    """The three tools behind one ``execute``; results are formatted as the official runtime does."""

    def __init__(self, text_search, image_search, knowledge, show_urls: bool = False, max_top_k: int = 10):
        self.text_search = text_search
        self.image_search = image_search
        self.knowledge = knowledge
        self.show_urls = show_urls
        self.max_top_k = max_top_k

    @classmethod
    def for_world(cls, world) -> "Tools":
        return cls(world.text_search, world.image_search, world.knowledge)

    def _top_k(self, args: dict[str, Any]) -> int:
        try:
            k = int(args.get("top_k", 5) or 5)
        except (TypeError, ValueError):
            k = 5
        return max(1, min(k, self.max_top_k))

    def execute(self, call: ToolCall, images: list[ImageRef]) -> Observation:
        """Run one tool call. New images get the next IMG_### ids and are appended to ``images``."""
        name, args = call.name, call.arguments
        if name not in TOOL_NAMES:
            return Observation(tool=name, text=f"Unknown tool: {name}. Available tools: {', '.join(TOOL_NAMES)}",
                               error=f"unknown tool {name!r}")
        try:
            if name == "search":
                queries = args.get("queries")
                if isinstance(queries, str):
                    queries = [queries]
                if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
                    return Observation(tool=name, text="[search] 'queries' must be a list of strings", error="bad arguments")
                return Observation(tool=name, text=self.text_search.search(queries, self._top_k(args)))
            if name == "image_search":
                query = args.get("query")
                if not isinstance(query, str) or not query.strip():
                    return Observation(tool=name, text="[image_search] 'query' must be a non-empty string", error="bad arguments")
                hits = self.image_search.image_search(query.strip(), self._top_k(args))
                shown = []
                for h in hits:
                    key = h.local_path or h.url
                    ref = next((im for im in images if (im.local_path or im.url) == key), None)
                    if ref is None:
                        ref = ImageRef(img_id=f"IMG_{len(images) + 1:03d}", title=h.title, url=h.url,
                                       local_path=h.local_path, page_url=h.page_url, source_id=h.source_id)
                        images.append(ref)
                    shown.append(ref)
                display = [ref if self.show_urls else {"img_id": ref.img_id, "title": ref.title} for ref in shown]
                text = format_image_results(query.strip(), display, show_paths=self.show_urls)
                return Observation(tool=name, text=text, images=shown)
            skill = args.get("skill_name")
            if not isinstance(skill, str) or skill not in SKILLS:
                text = self.knowledge.query(str(skill))
                return Observation(tool=name, text=text, error=f"unknown skill {skill!r}")
            return Observation(tool=name, text=self.knowledge.query(skill))
        except Exception as exc:  # a backend failure is the episode's problem, not the run's
            return Observation(tool=name, text=f"[tool error] {name}: {exc}", error=f"{type(exc).__name__}: {exc}")


@dataclass
class TurnStep:
    """An assistant turn was written and, for a tool call, answered (``turn.observation``)."""

    turn: Turn


@dataclass
class EndStep:
    trajectory: Trajectory


class Episode:
    """One trajectory as a state machine: read :attr:`messages`, feed the policy's text to :meth:`step`.

    Both drivers use it: :func:`run_episode` (one policy call at a time) and the batched rollout
    engine (many episodes advanced together), so the protocol's rules live in one place.
    """

    def __init__(self, request: Request, tools: Tools, *, seed: int = 0, traj_id: str | None = None,
                 guide: str | None = None, base_prompt: str = SYSTEM_PROMPT, policy_name: str = "",
                 max_turns: int = MAX_TURNS, max_tool_calls: int = MAX_TOOL_CALLS):
        self.tools = tools
        self.max_turns = max_turns
        self.max_tool_calls = max_tool_calls
        self.traj = Trajectory(id=traj_id or f"{request.id}-s{seed}", request_id=request.id, request_text=request.text,
                               policy=policy_name, seed=seed, system_prompt=base_prompt, guide=guide,
                               termination="max_rounds_reached")
        self.messages: list[dict[str, Any]] = [
            system_message(guide, base_prompt),
            {"role": "user", "content": request.text},
        ]
        self.tool_calls = 0
        self.done = False
        self._forced = False
        self._prepare()

    def _prepare(self) -> None:
        """Before each assistant turn: end when out of turns; add FINAL STEP on the last one."""
        index = len(self.traj.turns)
        if index >= self.max_turns:
            self.done = True
            return
        self._forced = index == self.max_turns - 1 or self.tool_calls >= self.max_tool_calls
        if self._forced:
            self.messages.append({"role": "user", "content": FINAL_STEP_MESSAGE})

    def fail(self, reason: str) -> None:
        """The policy could not produce a turn (e.g. its server failed): end with termination ``error``."""
        self.traj.errors.append(f"turn {len(self.traj.turns)}: policy failed: {reason}")
        self.traj.termination = "error"
        self.done = True

    def step(self, text: str, **turn_fields: Any) -> Turn:
        """Consume one assistant turn; run its tool; return the recorded turn."""
        if self.done:
            raise RuntimeError("episode already finished")
        if not isinstance(text, str):
            raise TypeError(f"policy returned {type(text).__name__}, not str")
        index = len(self.traj.turns)
        n_seen = len(self.messages)
        self.messages.append({"role": "assistant", "content": text})
        parsed = parse_turn(text)
        turn = Turn(index=index, raw=text, think=parsed.think, tool_call=parsed.tool_call, error=parsed.error,
                    forced_final=self._forced, prompt_messages=n_seen, **turn_fields)
        traj = self.traj
        traj.turns.append(turn)
        if parsed.answer is not None:
            turn.answer = normalize_program(parsed.answer, traj.images)
            traj.program = turn.answer
            traj.errors.extend(f"turn {index}: {issue}" for issue in turn.answer.issues if issue != "references re-sorted by id")
            traj.termination = "answer"
            self.done = True
        elif parsed.tool_call is not None and not self._forced:
            obs = self.tools.execute(parsed.tool_call, traj.images)
            self.tool_calls += 1
            turn.observation = obs
            if obs.error:
                turn.error = obs.error
                traj.errors.append(f"turn {index}: {obs.error}")
            self.messages.append({"role": "user", "content": wrap_observation(obs.text)})
        elif parsed.tool_call is not None:  # a tool call after FINAL STEP is ignored and ends the episode
            turn.error = "tool call after FINAL STEP (ignored)"
            traj.errors.append(f"turn {index}: {turn.error}")
            traj.termination = "max_rounds_reached"
            self.done = True
        else:
            traj.errors.append(f"turn {index}: format error: {parsed.error}")
            if self._forced:
                traj.termination = "no_answer"
                self.done = True
            else:
                turn.feedback = FORMAT_ERROR_MESSAGE
                self.messages.append({"role": "user", "content": FORMAT_ERROR_MESSAGE})
        if not self.done:
            self._prepare()
        return turn


def run_episode(request: Request, policy: Policy, tools: Tools, *, seed: int = 0, traj_id: str | None = None,
                guide: str | None = None, base_prompt: str = SYSTEM_PROMPT,
                max_turns: int = MAX_TURNS, max_tool_calls: int = MAX_TOOL_CALLS) -> Iterator[TurnStep | EndStep]:
    """Drive one trajectory, yielding a :class:`TurnStep` per assistant turn and an :class:`EndStep` last."""
    ep = Episode(request, tools, seed=seed, traj_id=traj_id, guide=guide, base_prompt=base_prompt,
                 policy_name=policy.name, max_turns=max_turns, max_tool_calls=max_tool_calls)
    while not ep.done:
        try:
            text = policy.complete(ep.messages, seed=seed)
        except Exception as exc:  # a failing model server ends this trajectory, not the run
            ep.fail(f"{type(exc).__name__}: {exc}")
            break
        yield TurnStep(ep.step(text))
    yield EndStep(ep.traj)


def run_to_end(request: Request, policy: Policy, tools: Tools, **kwargs) -> Trajectory:
    """Consume :func:`run_episode` and return the finished trajectory."""
    for step in run_episode(request, policy, tools, **kwargs):
        if isinstance(step, EndStep):
            return step.trajectory
    raise RuntimeError("run_episode ended without an EndStep")
