"""WISE: world-knowledge prompts loaded from a local copy of its prompt files, scored as WiScore.

Prompt files (JSON arrays of ``{"prompt_id", "Prompt", "Explanation", "Subcategory"}``):
``cultural_common_sense.json``, ``spatio-temporal_reasoning.json``, ``natural_science.json``.
Categories follow the benchmark: cultural (the first file), time (subcategories "Longitudinal
time" and "Horizontal time") and space (the rest of the second file), biology / physics /
chemistry (prompt ids 701-800 / 801-900 / 901-1000 of the third file).

A VLM (OpenAI-compatible multimodal chat, temperature 0) scores each image for consistency,
realism and aesthetic quality, each 0, 1 or 2, given the prompt and its explanation:

    WiScore = (0.7 consistency + 0.2 realism + 0.1 aesthetic quality) / 2          (in [0, 1])
    overall = 0.4 cultural + 0.167 time + 0.133 space + 0.1 biology + 0.1 physics + 0.1 chemistry

A case that could not be generated or judged is *missing*: left out of the category means and
reported with its id and reason (never scored 0 silently). When a category has no judged case,
the overall is computed over the categories present with their weights renormalised, and marked
``partial``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..judges.chat import ChatJudge, JudgeError, data_uri, find_json_object, image_bytes
from ..records.schema import Request

FILES = ("cultural_common_sense", "spatio-temporal_reasoning", "natural_science")
WEIGHTS = {"cultural": 0.4, "time": 0.167, "space": 0.133, "biology": 0.1, "physics": 0.1, "chemistry": 0.1}
TIME_SUBCATEGORIES = ("longitudinal time", "horizontal time")


@dataclass
class WiseItem:
    prompt_id: int
    prompt: str
    explanation: str
    subcategory: str
    category: str

    def request(self) -> Request:
        return Request(id=f"wise-{self.prompt_id}", text=self.prompt, track="knowledge", category=self.category,
                       split="wise")


def category_of(file_stem: str, subcategory: str, prompt_id: int) -> str:
    if file_stem.startswith("cultural"):
        return "cultural"
    if file_stem.startswith("spatio"):
        return "time" if subcategory.strip().lower() in TIME_SUBCATEGORIES else "space"
    if 701 <= prompt_id <= 800:
        return "biology"
    if 801 <= prompt_id <= 900:
        return "physics"
    if 901 <= prompt_id <= 1000:
        return "chemistry"
    sub = subcategory.strip().lower()
    return sub if sub in WEIGHTS else "science"


def load_wise(folder: str | os.PathLike, limit_per_file: int | None = None) -> list[WiseItem]:
    """Every prompt of the prompt files found in ``folder`` (or its ``data/`` subfolder)."""
    folder = Path(folder)
    if (folder / "data").is_dir() and not any((folder / f"{f}.json").exists() for f in FILES):
        folder = folder / "data"
    found = [folder / f"{f}.json" for f in FILES if (folder / f"{f}.json").exists()]
    if not found:
        raise FileNotFoundError(f"no WISE prompt files in {folder}: expected any of {', '.join(f + '.json' for f in FILES)}")
    items: list[WiseItem] = []
    for path in found:
        try:
            rows = json.loads(path.read_text("utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON array of prompts")
        for n, row in enumerate(rows[:limit_per_file] if limit_per_file else rows):
            missing = [k for k in ("prompt_id", "Prompt") if k not in row]
            if missing:
                raise ValueError(f"{path}: entry {n} lacks {', '.join(missing)}")
            pid = int(row["prompt_id"])
            sub = str(row.get("Subcategory", ""))
            items.append(WiseItem(pid, str(row["Prompt"]), str(row.get("Explanation", "")), sub,
                                  category_of(path.stem, sub, pid)))
    return items


def wiscore(consistency: float, realism: float, aesthetic: float) -> float:
    return (0.7 * consistency + 0.2 * realism + 0.1 * aesthetic) / 2


WISE_PROMPT_VERSION = "wise-judge-v1"
WISE_RUBRIC = """You audit an AI-generated image for a world-knowledge prompt. You get the PROMPT, an EXPLANATION of what the prompt really asks for (the knowledge it requires), and the image.
Score three things, each EXACTLY 0, 1 or 2, and be strict: 2 is rare.
- consistency: does the image show what the prompt means, as the explanation spells out? 2 every element right; 1 partly right or with noticeable deviations; 0 the key element is missing or wrong.
- realism: is it physically and visually plausible? 2 photo-like and flawless; 1 minor implausibilities; 0 clearly artificial or impossible.
- aesthetic_quality: composition, colour and craft. 2 exceptional; 1 acceptable; 0 poor.
Answer with ONE JSON object and nothing else (this is the WiScore protocol):
{"consistency": 0|1|2, "realism": 0|1|2, "aesthetic_quality": 0|1|2, "rationale": "<one or two sentences>"}"""


def _score(obj: dict[str, Any], key: str) -> int:
    raw = obj.get(key)
    if isinstance(raw, bool) or raw is None:
        raise JudgeError(f"{key} is {raw!r}, outside the rubric [0, 1, 2]")
    try:
        val = float(raw)
    except (TypeError, ValueError):
        raise JudgeError(f"{key} is {raw!r}, outside the rubric [0, 1, 2]") from None
    if val not in (0.0, 1.0, 2.0):
        raise JudgeError(f"{key} is {raw!r}, outside the rubric [0, 1, 2]")
    return int(val)


class WiseJudge(ChatJudge):
    prompt_version = WISE_PROMPT_VERSION

    def parse(self, text: str) -> dict[str, Any]:
        try:
            obj = find_json_object(text)
        except JudgeError:
            # the benchmark's own answer format: "Consistency: 2" lines
            found = dict((k.lower().replace(" ", "_"), v) for k, v in
                         re.findall(r"(Consistency|Realism|Aesthetic Quality)\**\s*[:：]\s*(\d)", text or "", re.I))
            if not found:
                raise
            obj = found
        return {k: _score(obj, k) for k in ("consistency", "realism", "aesthetic_quality")} | \
            {"rationale": str(obj.get("rationale", ""))[:600]}

    def judge(self, item: WiseItem, image: Any) -> dict[str, Any]:
        messages = [{"role": "system", "content": WISE_RUBRIC},
                    {"role": "user", "content": [
                        {"type": "text", "text": f'PROMPT: "{item.prompt}"\nEXPLANATION: "{item.explanation}"'},
                        {"type": "image_url", "image_url": {"url": data_uri(image, self.max_side)}}]}]
        key = self.cache.key(self.prompt_version, self.model, item.prompt, item.explanation, image_bytes(image))
        raw, cached = self.ask(messages, key)
        return raw | {"wiscore": wiscore(raw["consistency"], raw["realism"], raw["aesthetic_quality"]), "cached": cached}


def summarise_wise(items: Sequence[WiseItem], results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per-category mean WiScore over judged cases, the weighted overall, and the missing cases."""
    by_cat: dict[str, list[float]] = {}
    missing = []
    for it in items:
        r = results.get(it.prompt_id)
        if r is None or r.get("failed"):
            missing.append({"prompt_id": it.prompt_id, "category": it.category,
                            "reason": (r or {}).get("failed", "not run")})
            continue
        by_cat.setdefault(it.category, []).append(r["wiscore"])
    cats = {c: {"wiscore": sum(v) / len(v), "n": len(v)} for c, v in sorted(by_cat.items())}
    present = {c: w for c, w in WEIGHTS.items() if c in cats}
    total_w = sum(present.values())
    overall = sum(cats[c]["wiscore"] * w for c, w in present.items()) / total_w if total_w else None
    return {"categories": cats, "overall": overall, "partial": set(present) != set(WEIGHTS),
            "weights": WEIGHTS, "n_items": len(items), "missing": {"n": len(missing), "cases": missing,
                                                                  "policy": "exclude"}}


def run_wise(items: Sequence[WiseItem], generator, judge: WiseJudge, store, policy=None, tools=None, params=None,
             seed: int = 0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate (raw prompt, or a policy's program) and judge every item; per-case results and the summary."""
    from .bench import load_references, trajectories

    trajs = trajectories([it.request() for it in items], policy, tools, 1, seed, params)
    results: dict[int, dict[str, Any]] = {}
    for n, (it, t) in enumerate(zip(items, trajs)):
        if progress and n % 10 == 0:
            progress(f"WISE {n}/{len(items)}")
        if t.program is None:
            results[it.prompt_id] = {"failed": f"no program ({t.termination})", "wiscore": 0.0}
            continue
        refs = [im for _, im in load_references(t)[0]]
        try:
            image = generator.generate(t.program.gen_prompt, refs, seed=t.seed)
        except Exception as exc:
            results[it.prompt_id] = {"failed": f"generator failed: {type(exc).__name__}: {exc}"}
            continue
        h = store.put(image)
        try:
            results[it.prompt_id] = judge.judge(it, image) | {"image": h, "gen_prompt": t.program.gen_prompt}
        except JudgeError as exc:
            results[it.prompt_id] = {"failed": f"judge failed: {exc}", "image": h}
    # A policy that gave no program scored 0 (its own failure); infrastructure failures are missing.
    for r in results.values():
        if r.get("failed", "").startswith("no program"):
            r.update(consistency=0, realism=0, aesthetic_quality=0, wiscore=0.0)
            r["policy_failure"] = r.pop("failed")
    return {"summary": summarise_wise(items, results), "results": results}
