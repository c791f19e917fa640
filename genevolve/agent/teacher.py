"""The teacher's privileged context, built in one place at both levels the project needs it.

The teacher is the same policy with one difference: its system message carries the decision guide
(an experience's lesson). The student never sees it.

- Message level (:func:`system_message`): the system message an episode starts from; with a guide,
  the episode *is* the teacher writing its own trajectory (the probe, the teacher bench rows).
- Token level (:func:`teacher_stream`): the teacher re-reads the student's sampled tokens. The
  student's stream begins with its rendered system block; the teacher's stream is the guide's
  system block followed by the same tokens, so position ``i`` of the student is position
  ``i + offset`` of the teacher. The student's block is checked, never assumed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from .protocol import SYSTEM_PROMPT, system_prompt


def system_message(guide: str | None = None, base_prompt: str = SYSTEM_PROMPT) -> dict[str, Any]:
    """The first message of an episode: the student's system prompt, or the teacher's when a guide is given."""
    return {"role": "system", "content": system_prompt(guide, base_prompt)}


@lru_cache(maxsize=64)
def _encoded(tokenizer, content: str) -> tuple[int, ...]:
    """Token ids of a rendered system message (every trajectory of a step shares a handful of these)."""
    text = tokenizer.apply_chat_template([{"role": "system", "content": content}], tokenize=False)
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def system_block(tokenizer, guide: str | None, base_prompt: str = SYSTEM_PROMPT) -> list[int]:
    """Token ids of :func:`system_message` as the chat template renders it."""
    return list(_encoded(tokenizer, system_message(guide, base_prompt)["content"]))


def student_block_len(tokenizer, base_prompt: str, ids: list[int]) -> int:
    """How many leading tokens of ``ids`` encode the student's system block; ValueError when they do not."""
    block = system_block(tokenizer, None, base_prompt)
    if ids[: len(block)] != block:
        raise ValueError("the token stream does not start with the rendered system block")
    return len(block)


def teacher_stream(tokenizer, guide: str, base_prompt: str, ids: list[int]) -> tuple[list[int], int]:
    """The teacher's token stream over the student's tokens ``ids``, and the offset that aligns them
    (``teacher[i + offset] == ids[i]`` after the system block). ValueError when ``ids`` does not start
    with the student's system block (a stream re-encoded differently)."""
    n_sys = student_block_len(tokenizer, base_prompt, ids)
    prefix = system_block(tokenizer, guide, base_prompt)
    return prefix + ids[n_sys:], len(prefix) - n_sys
