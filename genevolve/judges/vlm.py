"""The KScore judge and the program-sufficiency judge over a multimodal chat API.

**KScore judge.** One request per case: the rubric (system message), then the request text, the
*generated* image first and the *ground-truth* image second, at temperature 0. The judge answers
with JSON: F (faithfulness), V (visual correctness), T (text accuracy), A (aesthetics), each exactly
0, 0.5 or 1, ``text_na`` (true when the request asks for no readable text) and a short rationale.
KScore = 0.1 F + 0.4 V + 0.4 T + 0.1 A.

**Requests with no text.** Two documented choices, saved with every score (``Verdict.text_policy``):

- ``renormalise`` (default): T is left out (``None``) and KScore = (0.1 F + 0.4 V + 0.1 A) / 0.6,
  so a request is scored only on what it asks for (the sandbox judge does the same);
- ``half``: T is fixed at 0.5, KScore = 0.1 F + 0.4 V + 0.2 + 0.1 A, as the paper's released
  evaluator does; use it to compare with published numbers.

Any score outside {0, 0.5, 1}, a missing key or a non-JSON answer is outside the rubric: the judge
is asked again (``answer_retries``), then the case fails with :class:`JudgeError`.

**Program-sufficiency judge (R_text).** Reads the program instead of the image: does the
gen_prompt (with its reference notes, and the reference images when given) state everything a
generator needs to satisfy the request? Five levels: 0, 0.25, 0.5, 0.75, 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from .chat import ChatJudge, JudgeError, data_uri, image_bytes

W_F, W_V, W_T, W_A = 0.1, 0.4, 0.4, 0.1
LEVELS = (0.0, 0.5, 1.0)
SUFFICIENCY_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
TEXT_POLICIES = ("renormalise", "half")

KSCORE_PROMPT_VERSION = "vlm-kscore-v1"
KSCORE_RUBRIC = """You grade an AI-generated image against the request it was made for, using a ground-truth image of what a correct answer looks like.
You are shown the request text, then Image 1 (the GENERATED image, the one you grade), then Image 2 (the GROUND-TRUTH image, a reference only).
The ground truth shows the intended identities, details and readable text; Image 1 may differ in layout, camera or style where the request allows it. Judge only what is clearly visible: a detail too small, blurred or garbled to verify counts as wrong.

Score four dimensions, each EXACTLY 0, 0.5 or 1:
- F (faithfulness): are all requested subjects, objects, counts, relations, setting and style present? 1 all of them; 0.5 one minor omission; 0 something essential is missing or wrong.
- V (visual correctness): do the requested entities look like themselves, as in the ground truth (emblems, colours, shapes, faces, landmarks, materials)? 1 no substantive difference; 0.5 recognisably the same with minor deviations; 0 a different or generic look.
- T (text accuracy): is every piece of text the request asks for present, correct and clearly readable? 1 all of it; 0.5 mostly right with small errors; 0 missing, wrong or gibberish. If the request asks for no readable text, set "text_na": true and T to 0.5.
- A (aesthetics): composition, polish and absence of artefacts, compared with the ground truth. 1 as good or better; 0.5 slightly worse; 0 clearly worse.

Answer with ONE JSON object and nothing else:
{"rationale": "<2-6 short sentences: the request's hard constraints, then what Image 1 gets right or wrong>", "F": 0|0.5|1, "V": 0|0.5|1, "T": 0|0.5|1, "A": 0|0.5|1, "text_na": true|false}"""

SUFFICIENCY_PROMPT_VERSION = "vlm-sufficiency-v1"
SUFFICIENCY_RUBRIC = """You check whether a prompt-reference program is sufficient for an image generator to satisfy a request.
The generator reads the program literally: it knows no facts beyond what the program says, and it sees only the reference images listed (called "the first reference image", "the second reference image").
Judge whether every requirement of the request (entities and their true appearance, counts, positions, attributes, text to render exactly, style, lighting, materials) is stated explicitly in the program or bound to a correct reference image.

Answer with ONE JSON object and nothing else:
{"missing": ["<each requirement the program leaves unstated or wrong>"], "level": 0|0.25|0.5|0.75|1}
where level is the share of requirements the program covers, rounded to one of 0, 0.25, 0.5, 0.75, 1."""

_KEYS = {"F": ("F", "faithfulness"), "V": ("V", "visual_correctness"), "T": ("T", "text_accuracy"),
         "A": ("A", "aesthetics")}


def kscore(F: float, V: float, T: float | None, A: float) -> float:
    """Weighted KScore; ``T=None`` renormalises over F, V and A."""
    if T is None:
        return (W_F * F + W_V * V + W_A * A) / (W_F + W_V + W_A)
    return W_F * F + W_V * V + W_T * T + W_A * A


def _level(obj: dict[str, Any], names: Sequence[str], allowed: Sequence[float], label: str) -> float:
    for n in names:
        if n in obj:
            raw = obj[n]
            break
    else:
        raise JudgeError(f"the judge's answer has no {label} score")
    if isinstance(raw, bool):
        raise JudgeError(f"{label} is {raw!r}, outside the rubric {list(allowed)}")
    try:
        val = float(raw)
    except (TypeError, ValueError):
        raise JudgeError(f"{label} is {raw!r}, outside the rubric {list(allowed)}") from None
    for a in allowed:
        if abs(val - a) < 1e-6:
            return a
    raise JudgeError(f"{label} is {raw!r}, outside the rubric {list(allowed)}")


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return bool(value)


@dataclass
class KScoreJudgement:
    F: float
    V: float
    T: float | None  # None: no text asked for, under the "renormalise" policy
    A: float
    kscore: float
    text_na: bool
    text_policy: str
    rationale: str
    cached: bool = False


class VLMJudge(ChatJudge):
    """``judge(request_text, generated, ground_truth) -> KScoreJudgement`` (see the module docstring)."""

    prompt_version = KSCORE_PROMPT_VERSION

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, text_policy: str = "renormalise",
                 **kwargs: Any):
        if text_policy not in TEXT_POLICIES:
            raise ValueError(f"text_policy is one of {', '.join(TEXT_POLICIES)}, not {text_policy!r}")
        super().__init__(base_url, model, api_key, **kwargs)
        self.text_policy = text_policy

    def parse(self, text: str) -> dict[str, Any]:
        from .chat import find_json_object

        obj = find_json_object(text)
        out = {d: _level(obj, names, LEVELS, d) for d, names in _KEYS.items() if d != "T"}
        text_na = _flag(obj.get("text_na", obj.get("text_accuracy_na", False)))
        out["T"] = None if text_na else _level(obj, _KEYS["T"], LEVELS, "T")
        out["text_na"] = text_na
        out["rationale"] = str(obj.get("rationale", "")).strip()[:1200]
        return out

    def messages(self, request_text: str, generated: Any, ground_truth: Any) -> list[dict[str, Any]]:
        return [
            {"role": "system", "content": KSCORE_RUBRIC},
            {"role": "user", "content": [
                {"type": "text", "text": f"Request:\n{request_text}\n\nImage 1 is the generated image; Image 2 is the ground truth."},
                {"type": "text", "text": "Image 1 (generated):"},
                {"type": "image_url", "image_url": {"url": data_uri(generated, self.max_side)}},
                {"type": "text", "text": "Image 2 (ground truth):"},
                {"type": "image_url", "image_url": {"url": data_uri(ground_truth, self.max_side)}},
            ]},
        ]

    def judge(self, request_text: str, generated: Any, ground_truth: Any) -> KScoreJudgement:
        key = self.cache.key(self.prompt_version, self.model, request_text, image_bytes(generated), image_bytes(ground_truth))
        raw, cached = self.ask(self.messages(request_text, generated, ground_truth), key)
        T = raw["T"]
        if T is None and self.text_policy == "half":
            T = 0.5
        return KScoreJudgement(F=raw["F"], V=raw["V"], T=T, A=raw["A"], kscore=kscore(raw["F"], raw["V"], T, raw["A"]),
                               text_na=raw["text_na"], text_policy=self.text_policy, rationale=raw["rationale"],
                               cached=cached)


@dataclass
class SufficiencyJudgement:
    r_text: float
    missing: list[str]
    cached: bool = False


class ProgramJudge(ChatJudge):
    """``judge(request_text, program, references) -> SufficiencyJudgement``: R_text on five levels."""

    prompt_version = SUFFICIENCY_PROMPT_VERSION

    def parse(self, text: str) -> dict[str, Any]:
        from .chat import find_json_object

        obj = find_json_object(text)
        level = _level(obj, ("level", "r_text", "score"), SUFFICIENCY_LEVELS, "level")
        missing = obj.get("missing", [])
        if not isinstance(missing, list):
            missing = [str(missing)]
        return {"level": level, "missing": [str(m)[:200] for m in missing][:20]}

    def messages(self, request_text: str, program, references: Sequence[tuple[str, Any]] = ()) -> list[dict[str, Any]]:
        prog = {"gen_prompt": program.gen_prompt,
                "reference_images": [{"img_id": r.img_id, "note": r.note} for r in program.reference_images]}
        content: list[dict[str, Any]] = [{"type": "text", "text": f"Request:\n{request_text}\n\nProgram:\n{json.dumps(prog, ensure_ascii=False)}"}]
        ordinals = ("first", "second", "third", "fourth")
        for i, (title, image) in enumerate(references):
            content.append({"type": "text", "text": f"The {ordinals[min(i, 3)]} reference image (titled {title!r}):"})
            content.append({"type": "image_url", "image_url": {"url": data_uri(image, self.max_side)}})
        return [{"role": "system", "content": SUFFICIENCY_RUBRIC}, {"role": "user", "content": content}]

    def judge(self, request_text: str, program, references: Sequence[tuple[str, Any]] = ()) -> SufficiencyJudgement:
        key = self.cache.key(self.prompt_version, self.model, request_text, program.gen_prompt,
                             [(r.img_id, r.note) for r in program.reference_images],
                             *[image_bytes(im) for _, im in references])
        raw, cached = self.ask(self.messages(request_text, program, references), key)
        return SufficiencyJudgement(r_text=raw["level"], missing=raw["missing"], cached=cached)
