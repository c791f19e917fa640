"""Text <-> records for the GenEvolve turn format.

Each assistant turn is ``<think>...</think>`` followed by exactly one
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` or one ``<answer>{json}</answer>``.
Tool results come back as a user turn ``<tool_response>\\n...\\n</tool_response>``. At most 11
assistant turns and 10 tool calls; before the last turn a FINAL STEP message forces an answer;
a turn with neither a tool call nor an answer gets a format-error note and the loop goes on.

The answer is a prompt-reference program: ``{"gen_prompt": "...", "reference_images":
[{"img_id": "IMG_003", "note": "..."}]}``. :func:`normalize_program` applies the runtime's rules:
unknown ids dropped, references sorted by id and capped at two, and records what it changed.

:func:`parse_turn` has two modes: ``strict`` (the default, what training and our agent use) rejects
any turn that is not exactly one action; ``official`` takes what the official runtime takes (its
first answer, else its first tool call). docs/official-formats.md lists the differences.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

from ..records.schema import SKILLS, ImageRef, KeptMessage, Observation, Program, ProgramRef, ToolCall, Trajectory, Turn

MAX_TURNS = 11
MAX_TOOL_CALLS = 10
MAX_REFERENCES = 2
TOOL_NAMES = ("search", "image_search", "query_knowledge")
PARSE_MODES = ("strict", "official")

# Ours and the official runtime's FINAL STEP messages share this first line (the bodies differ).
FINAL_STEP_HEADER = "=== FINAL STEP: OUTPUT ANSWER NOW ==="
FINAL_STEP_MESSAGE = FINAL_STEP_HEADER + """
This is the final step: tool calls are no longer allowed and will be ignored.
Output <answer>...</answer> now, using the IMG_### ids you already have (or none), in this format:
<answer>
{"gen_prompt": "your generation prompt", "reference_images": [{"img_id": "IMG_###", "note": "..."}]}
</answer>"""

FORMAT_ERROR_MESSAGE = (
    "<tool_response>\nFormat error: must output one <tool_call>{...}</tool_call> or <answer>{...}</answer>.\n</tool_response>"
)

TOOLS_SPEC = [
    {"type": "function", "function": {"name": "search", "description": "Text search. Supply an array of queries.",
     "parameters": {"type": "object", "properties": {"queries": {"type": "array", "items": {"type": "string"}},
                    "top_k": {"type": "integer"}}, "required": ["queries"]}}},
    {"type": "function", "function": {"name": "image_search", "description": "Text-to-image search; returns images with IMG ids.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}},
                    "required": ["query"]}}},
    {"type": "function", "function": {"name": "query_knowledge", "description": "Prompt-writing guidance for one skill.",
     "parameters": {"type": "object", "properties": {"skill_name": {"type": "string", "enum": list(SKILLS)}},
                    "required": ["skill_name"]}}},
]

SYSTEM_PROMPT = """\
You ground image requests into a prompt for an image generator.
Each round write <think>...</think> and then exactly one <tool_call>{"name": ..., "arguments": {...}}</tool_call> or one <answer>{...}</answer>.
Tools: search(queries, top_k) finds facts; image_search(query, top_k) finds reference images with ids IMG_###; query_knowledge(skill_name) gives writing guidance for one skill: """ + ", ".join(SKILLS) + """.
At most 10 tool calls. Search facts and references for named entities you do not know. Query the skills the request needs and follow them.
Answer with {"gen_prompt": "...", "reference_images": [{"img_id": "IMG_###", "note": "..."}]}: 1-2 references sorted by id; in gen_prompt name them only as "the first reference image" and "the second reference image", never by id."""

GUIDE_HEADER = "Current-Task Decision Guide"

_THINK_RE = re.compile(r"<think>(.*?)</think>", re.S)
_TOOL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)
# The official runtime looks for the first {...} in each tag (so only objects count) and tries the answer first.
_OFFICIAL_TOOL_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
_OFFICIAL_ANSWER_RE = re.compile(r"<answer>\s*(\{.*?\})\s*</answer>", re.S)
_IMG_ID_RE = re.compile(r"\bIMG_\d{3,}\b")
_ORDINAL_RE = re.compile(r"\b(first|second|third|fourth)(?: reference image)\b", re.I)
_TOOL_RESPONSE_RE = re.compile(r"^<tool_response>\n?(.*?)\n?</tool_response>$", re.S)


def system_prompt(guide: str | None = None, base: str = SYSTEM_PROMPT) -> str:
    """The system prompt; the teacher's adds the decision guide (the student's never does)."""
    if not guide:
        return base
    return f"{base}\n\n## {GUIDE_HEADER}\n{guide.strip()}"


def split_guide(text: str) -> tuple[str, str | None]:
    """A system prompt made by :func:`system_prompt` back into its base and its decision guide (None without one)."""
    marker = f"\n\n## {GUIDE_HEADER}\n"
    if marker not in text:
        return text, None
    base, guide = text.split(marker, 1)
    return base, guide


@dataclass
class ParsedTurn:
    think: str | None
    tool_call: ToolCall | None
    answer: dict[str, Any] | None
    error: str | None  # why this turn is not a valid action (None when it is)


def _check_mode(mode: str) -> None:
    if mode not in PARSE_MODES:
        raise ValueError(f"parse mode is 'strict' or 'official', not {mode!r}")


def parse_turn(text: str, mode: str = "strict") -> ParsedTurn:
    """Read one assistant turn; the error says why it is not a valid action.

    ``strict``: exactly one tool call or one answer, anywhere in the text. ``official``: the
    decision the official runtime makes on the same text.
    """
    _check_mode(mode)
    think_m = _THINK_RE.search(text)
    think = think_m.group(1).strip() if think_m else None
    if mode == "official":
        return _parse_official(text, think)
    tools = _TOOL_RE.findall(text)
    answers = _ANSWER_RE.findall(text)
    if tools and answers:
        return ParsedTurn(think, None, None, "both a tool call and an answer in one turn")
    if len(tools) > 1:
        return ParsedTurn(think, None, None, f"{len(tools)} tool calls in one turn (one allowed)")
    if len(answers) > 1:
        return ParsedTurn(think, None, None, f"{len(answers)} answers in one turn (one allowed)")
    if answers:
        try:
            payload = json.loads(answers[0])
        except json.JSONDecodeError as exc:
            return ParsedTurn(think, None, None, f"answer is not valid JSON: {exc.msg} at char {exc.pos}")
        if not isinstance(payload, dict):
            return ParsedTurn(think, None, None, "answer JSON is not an object")
        return ParsedTurn(think, None, payload, None)
    if tools:
        try:
            payload = json.loads(tools[0])
        except json.JSONDecodeError as exc:
            return ParsedTurn(think, None, None, f"tool call is not valid JSON: {exc.msg} at char {exc.pos}")
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            return ParsedTurn(think, None, None, "tool call JSON needs a string 'name'")
        args = payload.get("arguments")
        if args is None:  # only a missing/null "arguments" means no arguments; [] or "" is malformed
            args = {}
        if not isinstance(args, dict):
            return ParsedTurn(think, None, None, "tool call 'arguments' is not an object")
        return ParsedTurn(think, ToolCall(name=payload["name"].strip(), arguments=args), None, None)
    return ParsedTurn(think, None, None, "no <tool_call> and no <answer>")


def _parse_official(text: str, think: str | None) -> ParsedTurn:
    error = None
    m = _OFFICIAL_ANSWER_RE.search(text)
    if m:  # only the first match is tried: when it is not JSON the turn falls through to its tool call
        try:
            return ParsedTurn(think, None, json.loads(m.group(1)), None)
        except json.JSONDecodeError as exc:
            error = f"answer is not valid JSON: {exc.msg} at char {exc.pos}"
    m = _OFFICIAL_TOOL_RE.search(text)
    if not m:
        return ParsedTurn(think, None, None, error or "no <tool_call> and no <answer>")
    try:
        payload = json.loads(m.group(1))
    except json.JSONDecodeError as exc:
        return ParsedTurn(think, None, None, error or f"tool call is not valid JSON: {exc.msg} at char {exc.pos}")
    name, args = payload.get("name") or "", payload.get("arguments") or {}  # any empty value means "none"
    if not isinstance(name, str):  # the official runtime crashes on this turn
        return ParsedTurn(think, None, None, "tool call 'name' is not a string")
    if not isinstance(args, dict):
        return ParsedTurn(think, None, None, "tool call 'arguments' is not an object")
    return ParsedTurn(think, ToolCall(name=name.strip(), arguments=args), None, None)


def render_turn(think: str, tool_call: ToolCall | None = None, answer: dict[str, Any] | None = None) -> str:
    """Write an assistant turn in the protocol's exact format."""
    if (tool_call is None) == (answer is None):
        raise ValueError("a turn has exactly one of tool_call or answer")
    head = f"<think>{think}</think>\n"
    if tool_call is not None:
        body = json.dumps({"name": tool_call.name, "arguments": tool_call.arguments}, ensure_ascii=False)
        return f"{head}<tool_call>{body}</tool_call>"
    return f"{head}<answer>{json.dumps(answer, ensure_ascii=False)}</answer>"


def wrap_observation(text: str) -> str:
    return f"<tool_response>\n{text}\n</tool_response>"


def unwrap_observation(content: str) -> str | None:
    m = _TOOL_RESPONSE_RE.match(content.strip())
    return m.group(1) if m else None


def normalize_program(payload: dict[str, Any], images: Iterable[ImageRef]) -> Program:
    """Apply the runtime's answer rules and record every change or problem on the program."""
    known = {im.img_id for im in images}
    issues: list[str] = []
    gen_prompt = payload.get("gen_prompt")
    if not isinstance(gen_prompt, str):
        issues.append("gen_prompt is missing or not a string")
        gen_prompt = ""
    gen_prompt = gen_prompt.strip()
    if not gen_prompt:
        issues.append("empty gen_prompt")
    raw = payload.get("reference_images") or []
    if not isinstance(raw, list):
        issues.append("reference_images is not a list")
        raw = []
    refs: list[ProgramRef] = []
    for r in raw:
        if not isinstance(r, dict) or not isinstance(r.get("img_id"), str):
            issues.append(f"dropped a malformed reference entry: {r!r}"[:120])
            continue
        img_id = r["img_id"].strip()
        if img_id not in known:
            issues.append(f"dropped unknown image id {img_id}")
            continue
        if any(x.img_id == img_id for x in refs):
            issues.append(f"dropped duplicate image id {img_id}")
            continue
        note = r.get("note")
        refs.append(ProgramRef(img_id=img_id, note="" if note is None else str(note).strip()))
    if [x.img_id for x in refs] != sorted(x.img_id for x in refs):
        issues.append("references re-sorted by id")
    refs.sort(key=lambda x: x.img_id)
    if len(refs) > MAX_REFERENCES:
        issues.append(f"{len(refs)} references capped at {MAX_REFERENCES}")
        refs = refs[:MAX_REFERENCES]
    if not refs:
        issues.append("no valid reference images")
    if _IMG_ID_RE.search(gen_prompt):
        issues.append("gen_prompt names images by id instead of ordinal phrases")
    ordinals = {"first": 1, "second": 2, "third": 3, "fourth": 4}
    for m in _ORDINAL_RE.finditer(gen_prompt):
        if ordinals[m.group(1).lower()] > len(refs):
            issues.append(f"gen_prompt mentions the {m.group(1).lower()} reference image but there are {len(refs)} references")
            break
    return Program(gen_prompt=gen_prompt, reference_images=refs, issues=issues)


# ---------------------------------------------------------------------------
# Official SFT records (``messages`` lists) <-> trajectories
# ---------------------------------------------------------------------------

_IMAGE_LINE_RE = re.compile(r"^(IMG_\d{3,}): title: (.*)$")


def images_from_observation(text: str) -> list[ImageRef]:
    """Recover the IMG ids an image_search observation handed out (for imported records)."""
    out: list[ImageRef] = []
    cur: ImageRef | None = None
    for line in text.splitlines():
        m = _IMAGE_LINE_RE.match(line)
        if m:
            cur = ImageRef(img_id=m.group(1), title=m.group(2))
            out.append(cur)
        elif cur is not None and line.startswith("  ") and ": " in line:
            key, _, val = line.strip().partition(": ")
            if key in ("url", "local_path", "page_url"):
                setattr(cur, key, val)
    return out


def _plain(msg: Any, role: str | None = None) -> bool:
    """A message this importer can rebuild exactly from the trajectory: only a role and text content."""
    return (isinstance(msg, dict) and list(msg) == ["role", "content"] and isinstance(msg["content"], str)
            and (msg["role"] == role if role else msg["role"] in ("user", "assistant")))


def trajectory_from_messages(messages: list[dict[str, Any]], traj_id: str = "imported", request_id: str = "imported",
                             mode: str = "strict") -> Trajectory:
    """Import an SFT record's ``messages`` (system, user request, then assistant/user turns).

    Assistant turns are read with :func:`parse_turn` in ``mode`` (``official`` for the official
    runtime's records; a turn it accepts that strict mode would not is noted in ``errors``). What
    no field holds (unknown roles, extra keys, non-text content, a second user note) is kept
    verbatim, so :func:`trajectory_to_messages` gives back exactly ``messages``.
    """
    _check_mode(mode)
    if not messages or not _plain(messages[0], "system"):
        raise ValueError("an SFT record starts with a system message (role and text content)")
    if len(messages) < 2 or not _plain(messages[1], "user"):
        raise ValueError("an SFT record's second message is the user request (role and text content)")
    sys_prompt, guide = split_guide(messages[0]["content"])
    traj = Trajectory(id=traj_id, request_id=request_id, request_text=messages[1]["content"],
                      system_prompt=sys_prompt, guide=guide, policy="imported")
    forced_at = None
    for i, msg in enumerate(messages[2:], 2):
        nxt = messages[i + 1] if i + 1 < len(messages) else None
        last = traj.turns[-1] if traj.turns else None
        if not _plain(msg):
            traj.kept_messages.append(KeptMessage(at=i, message=msg))
        elif msg["role"] == "assistant":
            _import_turn(traj, msg["content"], i, forced_at == i - 1, mode)
        elif _is_final_step(traj, msg["content"]) and _plain(nxt, "assistant"):
            forced_at = i
            if msg["content"] != FINAL_STEP_MESSAGE:
                traj.final_step_message = msg["content"]
        elif last is not None and last.prompt_messages == i - 1 and last.tool_call is not None and last.observation is None \
                and wrap_observation(unwrap_observation(msg["content"]) or "") == msg["content"]:
            text = unwrap_observation(msg["content"])
            imgs = images_from_observation(text) if last.tool_call.name == "image_search" else []
            traj.images.extend(im for im in imgs if traj.image(im.img_id) is None)
            last.observation = Observation(tool=last.tool_call.name, text=text, images=imgs)
        elif last is not None and last.observation is None and last.feedback is None and last.prompt_messages == i - 1:
            last.feedback = msg["content"]
        else:
            traj.kept_messages.append(KeptMessage(at=i, message=msg))
    # a record that stops on a tool call ran out of turns: both runtimes call that max_rounds_reached
    traj.termination = "answer" if traj.program is not None else \
        "max_rounds_reached" if traj.turns and traj.turns[-1].tool_call is not None else "no_answer"
    return traj


def _is_final_step(traj: Trajectory, content: str) -> bool:
    """Ours, or another runtime's wording of it (kept for export); one wording per trajectory."""
    seen = traj.final_step_message or (FINAL_STEP_MESSAGE if any(t.forced_final for t in traj.turns) else None)
    return content.startswith(FINAL_STEP_HEADER) and seen in (None, content)


def _import_turn(traj: Trajectory, text: str, i: int, forced: bool, mode: str) -> None:
    p = parse_turn(text, mode)
    turn = Turn(index=len(traj.turns), raw=text, think=p.think, tool_call=p.tool_call, error=p.error,
                forced_final=forced, prompt_messages=i)
    if mode != "strict" and p.error is None and (strict := parse_turn(text).error):
        traj.errors.append(f"turn {turn.index}: {strict}; read as the {mode} runtime does")
    if p.answer is not None:
        turn.answer = normalize_program(p.answer, traj.images)
        traj.program = turn.answer
    traj.turns.append(turn)


def trajectory_to_messages(traj: Trajectory) -> list[dict[str, Any]]:
    """Export a trajectory as the official ``messages`` list (the exact conversation the policy saw)."""
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system_prompt(traj.guide, traj.system_prompt or SYSTEM_PROMPT)},
                                  {"role": "user", "content": traj.request_text}]
    for t in traj.turns:
        if t.forced_final:
            msgs.append({"role": "user", "content": traj.final_step_message or FINAL_STEP_MESSAGE})
        msgs.append({"role": "assistant", "content": t.raw})
        if t.observation is not None:
            msgs.append({"role": "user", "content": wrap_observation(t.observation.text)})
        if t.feedback is not None:
            msgs.append({"role": "user", "content": t.feedback})
    for k in sorted(traj.kept_messages, key=lambda k: k.at):  # back where they were, in order
        msgs.insert(k.at, json.loads(json.dumps(k.message)))
    return msgs
