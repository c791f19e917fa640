"""Protocol parsing and program normalisation: exact errors and issues for hand-written turns (DESIGN.md section 1)."""

from __future__ import annotations

import pytest

from genevolve.agent.protocol import (
    FINAL_STEP_MESSAGE,
    GUIDE_HEADER,
    SYSTEM_PROMPT,
    images_from_observation,
    normalize_program,
    parse_turn,
    render_turn,
    system_prompt,
    trajectory_from_messages,
    trajectory_to_messages,
    unwrap_observation,
    wrap_observation,
)
from genevolve.records.schema import ImageRef, ToolCall


def _imgs(*ids):
    return [ImageRef(img_id=i) for i in ids]


@pytest.mark.parametrize("text,error", [
    ('<tool_call>{"name": "search"}</tool_call><answer>{}</answer>', "both a tool call and an answer in one turn"),
    ('<tool_call>{"name": "a"}</tool_call> <tool_call>{"name": "b"}</tool_call>', "2 tool calls in one turn (one allowed)"),
    ("<answer>{}</answer><answer>{}</answer><answer>{}</answer>", "3 answers in one turn (one allowed)"),
    ("<answer>{oops}</answer>", "answer is not valid JSON: Expecting property name enclosed in double quotes at char 1"),
    ("<answer>[1, 2]</answer>", "answer JSON is not an object"),
    ("<tool_call>{'name': 1}</tool_call>", "tool call is not valid JSON: Expecting property name enclosed in double quotes at char 1"),
    ('<tool_call>{"name": 3}</tool_call>', "tool call JSON needs a string 'name'"),
    ("<tool_call>[]</tool_call>", "tool call JSON needs a string 'name'"),
    ('<tool_call>{"name": "search", "arguments": []}</tool_call>', "tool call 'arguments' is not an object"),
    ('<tool_call>{"name": "search", "arguments": ""}</tool_call>', "tool call 'arguments' is not an object"),
    ("<think>only thinking</think>", "no <tool_call> and no <answer>"),
])
def test_strict_errors_name_the_problem(text, error):
    p = parse_turn("<think>why</think>" + text)
    assert (p.think, p.tool_call, p.answer, p.error) == ("why", None, None, error)


def test_strict_reads_one_action_with_its_think():
    p = parse_turn('<think> plan it </think>\n<tool_call>\n {"name": " search ", "arguments": null} \n</tool_call>')
    assert (p.think, p.tool_call, p.answer, p.error) == ("plan it", ToolCall(name="search", arguments={}), None, None)
    p = parse_turn('<answer> {"gen_prompt": "x"} </answer>')
    assert (p.think, p.answer, p.error) == (None, {"gen_prompt": "x"}, None)
    p = parse_turn('<tool_call>{"name": "image_search", "arguments": {"query": "q"}}</tool_call>')
    assert p.tool_call == ToolCall(name="image_search", arguments={"query": "q"})


@pytest.mark.parametrize("text,tool,answer,error", [
    ('<answer>{"gen_prompt": "a"}</answer><tool_call>{"name": "search"}</tool_call>', None, {"gen_prompt": "a"}, None),
    ('<answer>{bad}</answer><tool_call>{"name": " search ", "arguments": {"queries": ["q"]}}</tool_call>',
     ToolCall(name="search", arguments={"queries": ["q"]}), None, None),
    ("<answer>{bad}</answer>", None, None, "answer is not valid JSON: Expecting property name enclosed in double quotes at char 1"),
    ("<answer>{bad}</answer><tool_call>{bad}</tool_call>", None, None,
     "answer is not valid JSON: Expecting property name enclosed in double quotes at char 1"),
    ("<tool_call>{bad}</tool_call>", None, None,
     "tool call is not valid JSON: Expecting property name enclosed in double quotes at char 1"),
    ('<tool_call>{"name": "", "arguments": []}</tool_call>', ToolCall(name="", arguments={}), None, None),
    ('<tool_call>{"name": 5}</tool_call>', None, None, "tool call 'name' is not a string"),
    ('<tool_call>{"name": "search", "arguments": [1]}</tool_call>', None, None, "tool call 'arguments' is not an object"),
    ('<tool_call>{"name": "a"}</tool_call><tool_call>{"name": "b"}</tool_call>', ToolCall(name="a"), None, None),
    ("nothing", None, None, "no <tool_call> and no <answer>"),
])
def test_official_mode_decides_like_the_official_runtime(text, tool, answer, error):
    p = parse_turn("<think>t</think>" + text, mode="official")
    assert (p.think, p.tool_call, p.answer, p.error) == ("t", tool, answer, error)


def test_unknown_modes_are_refused():
    with pytest.raises(ValueError, match=r"^parse mode is 'strict' or 'official', not 'loose'$"):
        parse_turn("x", mode="loose")
    with pytest.raises(ValueError, match="parse mode"):
        trajectory_from_messages([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], mode="loose")


def test_render_writes_the_exact_format():
    assert render_turn("t", ToolCall(name="search", arguments={"queries": ["é"]})) == \
        '<think>t</think>\n<tool_call>{"name": "search", "arguments": {"queries": ["é"]}}</tool_call>'
    assert render_turn("t", answer={"gen_prompt": "ü"}) == '<think>t</think>\n<answer>{"gen_prompt": "ü"}</answer>'
    with pytest.raises(ValueError, match="^a turn has exactly one of tool_call or answer$"):
        render_turn("t")
    assert wrap_observation("x") == "<tool_response>\nx\n</tool_response>"
    assert unwrap_observation("  <tool_response>\nx\ny\n</tool_response> ") == "x\ny"
    assert unwrap_observation("<tool_response>x</tool_response>") == "x" and unwrap_observation("x") is None


def test_system_prompt_appends_the_guide_under_its_header():
    assert system_prompt() == SYSTEM_PROMPT and system_prompt("") == SYSTEM_PROMPT
    assert system_prompt("  Do X.\n", base="B") == f"B\n\n## {GUIDE_HEADER}\nDo X."


def test_normalize_records_every_change_in_order():
    payload = {"gen_prompt": "  The lynx from IMG_002 and the third reference image  ",
               "reference_images": [{"img_id": " IMG_003 ", "note": None}, {"img_id": "IMG_009"}, "junk",
                                    {"img_id": "IMG_001", "note": " left "}, {"img_id": "IMG_003"},
                                    {"img_id": "IMG_002", "note": 7}]}
    prog = normalize_program(payload, _imgs("IMG_001", "IMG_002", "IMG_003"))
    assert prog.gen_prompt == "The lynx from IMG_002 and the third reference image"
    assert [(r.img_id, r.note) for r in prog.reference_images] == [("IMG_001", "left"), ("IMG_002", "7")]
    assert prog.issues == ["dropped unknown image id IMG_009", "dropped a malformed reference entry: 'junk'",
                           "dropped duplicate image id IMG_003", "references re-sorted by id",
                           "3 references capped at 2", "gen_prompt names images by id instead of ordinal phrases",
                           "gen_prompt mentions the third reference image but there are 2 references"]


@pytest.mark.parametrize("payload,issues", [
    ({"gen_prompt": 3}, ["gen_prompt is missing or not a string", "empty gen_prompt", "no valid reference images"]),
    ({"gen_prompt": "  ", "reference_images": "IMG_001"}, ["empty gen_prompt", "reference_images is not a list",
                                                          "no valid reference images"]),
    ({"gen_prompt": "the First Reference Image", "reference_images": None},
     ["no valid reference images", "gen_prompt mentions the first reference image but there are 0 references"]),
    ({"gen_prompt": "the second reference image, the fourth reference image", "reference_images": [{"img_id": "IMG_001"}]},
     ["gen_prompt mentions the second reference image but there are 1 references"]),
    ({"gen_prompt": "the second reference image", "reference_images": [{"img_id": "IMG_002"}, {"img_id": "IMG_001"}]},
     ["references re-sorted by id"]),
    ({"gen_prompt": "IMG_12 is not an id; IMG_0012 is", "reference_images": [{"img_id": "IMG_001"}]},
     ["gen_prompt names images by id instead of ordinal phrases"]),
    ({"gen_prompt": "x", "reference_images": [{"img_id": 5}, {"note": "n"}]},
     ["dropped a malformed reference entry: {'img_id': 5}", "dropped a malformed reference entry: {'note': 'n'}",
      "no valid reference images"]),
])
def test_normalize_issues(payload, issues):
    assert normalize_program(payload, _imgs("IMG_001", "IMG_002")).issues == issues


def test_a_malformed_entry_is_quoted_in_at_most_120_characters():
    prog = normalize_program({"gen_prompt": "x", "reference_images": ["y" * 300]}, [])
    assert prog.issues[0] == ("dropped a malformed reference entry: '" + "y" * 300)[:120]


def test_images_from_observation_reads_ids_titles_and_known_fields():
    text = ("IMG_001: title: Official flag\n  url: http://a\n  local_path: /x.png\n  page_url: http://p\n"
            "  caption: ignored\n  notakey\nIMG_0002: title: Fan art: mascot\n  url: u2\nother line\n  url: after")
    imgs = images_from_observation(text)
    assert [(i.img_id, i.title, i.url, i.local_path, i.page_url) for i in imgs] == [
        ("IMG_001", "Official flag", "http://a", "/x.png", "http://p"), ("IMG_0002", "Fan art: mascot", "after", "", "")]
    assert images_from_observation("  url: x\nIMG_01: title: short id") == []


def test_a_final_step_then_an_answer_round_trips_and_ends_as_an_answer():
    msgs = [{"role": "system", "content": system_prompt("Guide.")}, {"role": "user", "content": "Draw a cat"},
            {"role": "assistant", "content": '<think>a</think><tool_call>{"name": "image_search", "arguments": {"query": "cat"}}</tool_call>'},
            {"role": "user", "content": "<tool_response>\nIMG_001: title: Cat\n</tool_response>"},
            {"role": "user", "content": "=== FINAL STEP: OUTPUT ANSWER NOW ===\nanswer now"},
            {"role": "assistant", "content": '<think>b</think><answer>{"gen_prompt": "the first reference image", '
                                             '"reference_images": [{"img_id": "IMG_001"}]}</answer>'}]
    traj = trajectory_from_messages(msgs)
    assert traj.guide == "Guide." and traj.termination == "answer" and traj.turns[1].forced_final
    assert traj.final_step_message == "=== FINAL STEP: OUTPUT ANSWER NOW ===\nanswer now"
    assert [i.img_id for i in traj.images] == ["IMG_001"] and traj.program.issues == []
    assert trajectory_to_messages(traj) == msgs
    stop = trajectory_from_messages(msgs[:3])
    assert stop.termination == "max_rounds_reached" and stop.program is None
    assert trajectory_from_messages(msgs[:2]).termination == "no_answer"


def test_import_defaults_errors_and_a_repeated_guide_header():
    from genevolve.records.schema import KeptMessage

    sys_msg = {"role": "system", "content": system_prompt("Guide one.\n\n## " + GUIDE_HEADER + "\nGuide two.")}
    traj = trajectory_from_messages([sys_msg, {"role": "user", "content": "u"}])
    assert (traj.id, traj.request_id, traj.policy) == ("imported", "imported", "imported")
    assert traj.system_prompt == SYSTEM_PROMPT and traj.guide == "Guide one.\n\n## " + GUIDE_HEADER + "\nGuide two."
    with pytest.raises(ValueError, match=r"^an SFT record starts with a system message \(role and text content\)$"):
        trajectory_from_messages([{"role": "user", "content": "u"}])
    with pytest.raises(ValueError, match=r"^an SFT record's second message is the user request \(role and text content\)$"):
        trajectory_from_messages([sys_msg])
    traj.kept_messages = [KeptMessage(at=3, message={"role": "tool", "content": "b"}),
                          KeptMessage(at=2, message={"role": "tool", "content": "a"})]
    assert [m["content"] for m in trajectory_to_messages(traj)[2:]] == ["a", "b"]


def test_import_reads_observations_by_tool_and_keeps_a_final_step_with_no_answer_after_it():
    call = '<think>a</think><tool_call>{"name": "search", "arguments": {"queries": ["q"]}}</tool_call>'
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": call},
            {"role": "user", "content": "<tool_response>\nIMG_001: title: not an image result\n</tool_response>"},
            {"role": "assistant", "content": call}, {"role": "user", "content": "<tool_response>\n\n</tool_response>"},
            {"role": "user", "content": "=== FINAL STEP: OUTPUT ANSWER NOW ===\nnow"}, {"role": "user", "content": "x"}]
    traj = trajectory_from_messages(msgs)
    assert traj.images == [] and traj.turns[0].observation.images == []
    assert traj.turns[1].observation is not None and traj.turns[1].observation.text == ""
    assert not any(t.forced_final for t in traj.turns) and trajectory_to_messages(traj) == msgs


def test_a_fourth_reference_image_is_beyond_two_and_urls_keep_their_colons():
    prog = normalize_program({"gen_prompt": "the fourth reference image", "reference_images": [{"img_id": "IMG_001"}]},
                             _imgs("IMG_001"))
    assert prog.issues == ["gen_prompt mentions the fourth reference image but there are 1 references"]
    (img,) = images_from_observation("IMG_001: title: t\n  url: http://h:80/a: b")
    assert img.url == "http://h:80/a: b"


def test_after_our_final_step_another_wording_is_feedback_not_a_second_final_step():
    other = "=== FINAL STEP: OUTPUT ANSWER NOW ===\nanswer now"
    answer = '<think>b</think><answer>{"gen_prompt": "a cat"}</answer>'
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Draw a cat"},
            {"role": "user", "content": FINAL_STEP_MESSAGE}, {"role": "assistant", "content": "<think>a</think>"},
            {"role": "user", "content": other}, {"role": "assistant", "content": answer}]
    traj = trajectory_from_messages(msgs)
    # one wording per trajectory: ours was seen first, so the other one is the first turn's feedback
    assert [t.forced_final for t in traj.turns] == [True, False] and traj.final_step_message is None
    assert traj.turns[0].feedback == other and traj.kept_messages == []
    assert trajectory_to_messages(traj) == msgs
