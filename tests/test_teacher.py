"""The teacher's context (genevolve.agent.teacher): the guide in the system message of an episode, and the teacher's
token stream over a student's sampled tokens, aligned position by position."""

from __future__ import annotations

import pytest

from genevolve.agent.loop import run_to_end
from genevolve.agent.protocol import GUIDE_HEADER, SYSTEM_PROMPT, trajectory_from_messages, trajectory_to_messages
from genevolve.agent.teacher import student_block_len, system_block, system_message, teacher_stream

from test_agent import REQUEST, SEARCH, ScriptedPolicy, answer, tools


def test_guide_appears_in_system_prompt_and_trajectory():
    guide = "Search the mascot first, then query text_rendering."
    policy = ScriptedPolicy(SEARCH, answer())
    traj = run_to_end(REQUEST, policy, tools(), guide=guide)
    for seen in policy.seen:
        sys = seen[0]["content"]
        assert sys.startswith(SYSTEM_PROMPT)
        assert f"## {GUIDE_HEADER}\n{guide}" in sys
    assert traj.guide == guide
    assert traj.system_prompt == SYSTEM_PROMPT
    assert trajectory_to_messages(traj)[0] == policy.seen[0][0]
    again = trajectory_from_messages(trajectory_to_messages(traj))
    assert again.guide == guide


def test_no_guide_means_plain_system_prompt():
    policy = ScriptedPolicy(answer())
    traj = run_to_end(REQUEST, policy, tools())
    assert policy.seen[0][0]["content"] == SYSTEM_PROMPT
    assert GUIDE_HEADER not in policy.seen[0][0]["content"]
    assert traj.guide is None


def test_custom_base_prompt():
    policy = ScriptedPolicy(answer())
    traj = run_to_end(REQUEST, policy, tools(), base_prompt="BASE", guide="g")
    assert policy.seen[0][0]["content"] == f"BASE\n\n## {GUIDE_HEADER}\ng"
    assert traj.system_prompt == "BASE"


def test_system_message_is_the_students_or_the_teachers():
    assert system_message() == {"role": "system", "content": SYSTEM_PROMPT}
    assert system_message("  look it up  ", "B")["content"] == f"B\n\n## {GUIDE_HEADER}\nlook it up"


def test_the_teacher_reads_the_students_tokens_behind_its_own_system_block(tiny_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    student = system_block(tok, None) + tok("<|im_start|>user\nDraw a red circle<|im_end|>", add_special_tokens=False)["input_ids"]
    guide = "Query spatial_layout first."
    t_ids, offset = teacher_stream(tok, guide, SYSTEM_PROMPT, student)
    n_sys = student_block_len(tok, SYSTEM_PROMPT, student)
    assert t_ids[: len(t_ids) - len(student) + n_sys] == system_block(tok, guide)
    assert offset == len(system_block(tok, guide)) - n_sys > 0
    assert all(t_ids[i + offset] == student[i] for i in range(n_sys, len(student)))  # aligned after the block
    with pytest.raises(ValueError, match=r"^the token stream does not start with the rendered system block$"):
        teacher_stream(tok, guide, SYSTEM_PROMPT, student[1:])
