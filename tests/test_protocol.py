"""Protocol: parsing and rendering turns, program normalisation, the system prompt (SFT records: test_protocol_records.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genevolve.agent.protocol import (
    FINAL_STEP_MESSAGE,
    FORMAT_ERROR_MESSAGE,
    GUIDE_HEADER,
    MAX_REFERENCES,
    SYSTEM_PROMPT,
    normalize_program,
    parse_turn,
    render_turn,
    system_prompt,
    unwrap_observation,
    wrap_observation,
)
from genevolve.records.schema import SKILLS, ImageRef, Program, ToolCall

GOLDEN = Path(__file__).parent / "data" / "sft_record.json"


def _refs(*ids: str) -> list[ImageRef]:
    return [ImageRef(img_id=i, title=f"title {i}") for i in ids]


# ---------------------------------------------------------------------------
# parse_turn
# ---------------------------------------------------------------------------


def test_parse_valid_tool_call():
    text = ('<think>I need facts.</think>\n<tool_call>{"name": "search", '
            '"arguments": {"queries": ["Veloria flag"], "top_k": 3}}</tool_call>')
    p = parse_turn(text)
    assert p.error is None
    assert p.think == "I need facts."
    assert p.answer is None
    assert p.tool_call == ToolCall(name="search", arguments={"queries": ["Veloria flag"], "top_k": 3})


def test_parse_tool_call_tolerates_whitespace_and_missing_arguments():
    p = parse_turn('<think>\n  multi\nline \n</think>\n<tool_call>\n  {"name": " query_knowledge "}\n</tool_call>\n')
    assert p.error is None
    assert p.think == "multi\nline"
    assert p.tool_call.name == "query_knowledge"
    assert p.tool_call.arguments == {}
    p = parse_turn('<tool_call>{"name": "search", "arguments": null}</tool_call>')
    assert p.error is None and p.tool_call.arguments == {}


def test_parse_valid_answer():
    payload = {"gen_prompt": "a teal lynx", "reference_images": [{"img_id": "IMG_001", "note": "lynx"}]}
    p = parse_turn(f"<think>done</think>\n<answer>\n{json.dumps(payload)}\n</answer>")
    assert p.error is None
    assert p.think == "done"
    assert p.tool_call is None
    assert p.answer == payload


def test_parse_without_think():
    p = parse_turn('<answer>{"gen_prompt": "x"}</answer>')
    assert p.think is None
    assert p.answer == {"gen_prompt": "x"}


def test_parse_both_tool_call_and_answer_is_an_error():
    p = parse_turn('<think>t</think><tool_call>{"name": "search", "arguments": {}}</tool_call>'
                   '<answer>{"gen_prompt": "x"}</answer>')
    assert p.tool_call is None and p.answer is None
    assert p.think == "t"
    assert "both a tool call and an answer" in p.error


def test_parse_two_tool_calls_is_an_error():
    call = '<tool_call>{"name": "search", "arguments": {"queries": ["a"]}}</tool_call>'
    p = parse_turn(f"<think>t</think>{call}\n{call}")
    assert p.tool_call is None and p.answer is None
    assert p.error == "2 tool calls in one turn (one allowed)"


def test_parse_two_answers_is_an_error():
    ans = '<answer>{"gen_prompt": "x"}</answer>'
    p = parse_turn(f"<think>t</think>{ans}{ans}")
    assert p.tool_call is None and p.answer is None
    assert p.error == "2 answers in one turn (one allowed)"


@pytest.mark.parametrize("text", ["", "just prose, no tags", "<think>only thinking</think>",
                                  "<tool_call>{\"name\": \"search\"}", "<answer>{}"])
def test_parse_no_action(text):
    p = parse_turn(text)
    assert p.tool_call is None and p.answer is None
    assert p.error == "no <tool_call> and no <answer>"


def test_parse_no_action_keeps_think():
    assert parse_turn("<think>hmm</think> I will draw it.").think == "hmm"


def test_parse_malformed_tool_call_json():
    p = parse_turn('<think>t</think><tool_call>{"name": "search", "arguments": {"queries": [}}</tool_call>')
    assert p.tool_call is None
    assert p.error.startswith("tool call is not valid JSON: ")
    assert "at char" in p.error


def test_parse_malformed_answer_json():
    p = parse_turn("<think>t</think><answer>{'gen_prompt': 'single quotes'}</answer>")
    assert p.answer is None
    assert p.error.startswith("answer is not valid JSON: ")


def test_parse_answer_not_an_object():
    p = parse_turn('<answer>["gen_prompt", "x"]</answer>')
    assert p.answer is None
    assert p.error == "answer JSON is not an object"


@pytest.mark.parametrize("args", ['"queries"', "[1, 2]", "[]", "3", '""', "false"])
def test_parse_non_object_arguments(args):
    p = parse_turn(f'<tool_call>{{"name": "search", "arguments": {args}}}</tool_call>')
    assert p.tool_call is None
    assert p.error == "tool call 'arguments' is not an object"


@pytest.mark.parametrize("body", ['{"arguments": {"queries": ["a"]}}', '{"name": 3, "arguments": {}}',
                                  '{"name": null}', '["search", {}]', '"search"'])
def test_parse_missing_or_bad_name(body):
    p = parse_turn(f"<tool_call>{body}</tool_call>")
    assert p.tool_call is None
    assert p.error == "tool call JSON needs a string 'name'"


# ---------------------------------------------------------------------------
# render_turn
# ---------------------------------------------------------------------------


def test_render_turn_exact_format():
    call = ToolCall(name="image_search", arguments={"query": "Veloria flag", "top_k": 2})
    assert render_turn("look", tool_call=call) == (
        '<think>look</think>\n<tool_call>{"name": "image_search", "arguments": {"query": "Veloria flag", "top_k": 2}}'
        "</tool_call>"
    )
    assert render_turn("done", answer={"gen_prompt": "ü"}) == '<think>done</think>\n<answer>{"gen_prompt": "ü"}</answer>'


@pytest.mark.parametrize("call", [
    ToolCall(name="search", arguments={"queries": ["Aurora Cup 2031 winner", "Veloria"], "top_k": 4}),
    ToolCall(name="image_search", arguments={"query": "lynx with \"quotes\" and </think> text"}),
    ToolCall(name="query_knowledge", arguments={"skill_name": "text_rendering"}),
    ToolCall(name="search", arguments={}),
])
def test_render_then_parse_tool_call(call):
    p = parse_turn(render_turn("Reasoning,\nover two lines.", tool_call=call))
    assert p.error is None
    assert p.think == "Reasoning,\nover two lines."
    assert p.tool_call == call
    assert p.answer is None


def test_render_then_parse_answer():
    answer = {"gen_prompt": "The lynx from the first reference image under \"AURORA 2031\" — bold",
              "reference_images": [{"img_id": "IMG_001", "note": "mascot"}, {"img_id": "IMG_003", "note": ""}]}
    p = parse_turn(render_turn("final", answer=answer))
    assert p.error is None
    assert p.answer == answer
    assert p.tool_call is None


def test_render_turn_needs_exactly_one_action():
    with pytest.raises(ValueError, match="exactly one of tool_call or answer"):
        render_turn("t")
    with pytest.raises(ValueError, match="exactly one of tool_call or answer"):
        render_turn("t", tool_call=ToolCall(name="search"), answer={"gen_prompt": "x"})


@pytest.mark.parametrize("text", ["plain", "", "two\nlines", "ends with newline\n", "\nstarts with newline",
                                  "  indented\n  block  "])
def test_wrap_unwrap_observation(text):
    wrapped = wrap_observation(text)
    assert wrapped.startswith("<tool_response>\n") and wrapped.endswith("\n</tool_response>")
    assert unwrap_observation(wrapped) == text


def test_unwrap_rejects_other_user_messages():
    assert unwrap_observation("Draw a cat") is None
    assert unwrap_observation(FINAL_STEP_MESSAGE) is None
    assert unwrap_observation("<tool_response>\nx\n</tool_response> trailing") is None
    assert unwrap_observation(FORMAT_ERROR_MESSAGE).startswith("Format error")


# ---------------------------------------------------------------------------
# normalize_program
# ---------------------------------------------------------------------------


def test_normalize_clean_program_has_no_issues():
    prog = normalize_program({"gen_prompt": "  The lynx from the first reference image holds the flag from the "
                                            "second reference image.  ",
                              "reference_images": [{"img_id": "IMG_001", "note": " mascot "},
                                                   {"img_id": "IMG_002", "note": "flag"}]},
                             _refs("IMG_001", "IMG_002", "IMG_003"))
    assert isinstance(prog, Program)
    assert prog.issues == []
    assert prog.gen_prompt.startswith("The lynx") and prog.gen_prompt.endswith("image.")
    assert [(r.img_id, r.note) for r in prog.reference_images] == [("IMG_001", "mascot"), ("IMG_002", "flag")]


def test_normalize_drops_unknown_ids():
    prog = normalize_program({"gen_prompt": "the first reference image",
                              "reference_images": [{"img_id": "IMG_009"}, {"img_id": "IMG_002"}]},
                             _refs("IMG_001", "IMG_002"))
    assert [r.img_id for r in prog.reference_images] == ["IMG_002"]
    assert "dropped unknown image id IMG_009" in prog.issues
    assert len(prog.issues) == 1


def test_normalize_drops_duplicates():
    prog = normalize_program({"gen_prompt": "the first reference image",
                              "reference_images": [{"img_id": "IMG_001", "note": "a"},
                                                   {"img_id": " IMG_001 ", "note": "b"}]},
                             _refs("IMG_001"))
    assert [(r.img_id, r.note) for r in prog.reference_images] == [("IMG_001", "a")]
    assert prog.issues == ["dropped duplicate image id IMG_001"]


def test_normalize_sorts_by_id():
    prog = normalize_program({"gen_prompt": "the first reference image and the second reference image",
                              "reference_images": [{"img_id": "IMG_010", "note": "ten"},
                                                   {"img_id": "IMG_002", "note": "two"}]},
                             _refs("IMG_002", "IMG_010"))
    assert [(r.img_id, r.note) for r in prog.reference_images] == [("IMG_002", "two"), ("IMG_010", "ten")]
    assert prog.issues == ["references re-sorted by id"]


def test_normalize_caps_at_two_references():
    prog = normalize_program({"gen_prompt": "the first reference image",
                              "reference_images": [{"img_id": i} for i in ("IMG_003", "IMG_001", "IMG_002")]},
                             _refs("IMG_001", "IMG_002", "IMG_003"))
    assert MAX_REFERENCES == 2
    assert [r.img_id for r in prog.reference_images] == ["IMG_001", "IMG_002"]
    assert f"3 references capped at {MAX_REFERENCES}" in prog.issues
    assert "references re-sorted by id" in prog.issues


def test_normalize_no_references_recorded():
    for payload in ({"gen_prompt": "a red cube"}, {"gen_prompt": "a red cube", "reference_images": []},
                    {"gen_prompt": "a red cube", "reference_images": None}):
        prog = normalize_program(payload, _refs("IMG_001"))
        assert prog.reference_images == []
        assert prog.issues == ["no valid reference images"]


def test_normalize_reference_images_not_a_list():
    prog = normalize_program({"gen_prompt": "x", "reference_images": {"img_id": "IMG_001"}}, _refs("IMG_001"))
    assert prog.reference_images == []
    assert "reference_images is not a list" in prog.issues


@pytest.mark.parametrize("gen_prompt", ["", "   ", None, 5])
def test_normalize_empty_or_missing_gen_prompt(gen_prompt):
    payload = {"reference_images": [{"img_id": "IMG_001"}]}
    if gen_prompt is not None:
        payload["gen_prompt"] = gen_prompt
    prog = normalize_program(payload, _refs("IMG_001"))
    assert prog.gen_prompt == ""
    assert "empty gen_prompt" in prog.issues
    assert ("gen_prompt is missing or not a string" in prog.issues) == (not isinstance(gen_prompt, str))
    assert [r.img_id for r in prog.reference_images] == ["IMG_001"]


def test_normalize_records_img_ids_in_gen_prompt():
    prog = normalize_program({"gen_prompt": "Draw the lynx from IMG_001 waving a flag",
                              "reference_images": [{"img_id": "IMG_001"}]}, _refs("IMG_001"))
    assert prog.issues == ["gen_prompt names images by id instead of ordinal phrases"]
    assert prog.gen_prompt == "Draw the lynx from IMG_001 waving a flag"  # recorded, not rewritten


def test_normalize_ordinal_beyond_references():
    prog = normalize_program({"gen_prompt": "the lynx from the first reference image and the flag from the "
                                            "Second Reference Image",
                              "reference_images": [{"img_id": "IMG_001"}]}, _refs("IMG_001", "IMG_002"))
    assert prog.issues == ["gen_prompt mentions the second reference image but there are 1 references"]
    prog = normalize_program({"gen_prompt": "in the style of the third reference image",
                              "reference_images": [{"img_id": "IMG_001"}, {"img_id": "IMG_002"}]},
                             _refs("IMG_001", "IMG_002"))
    assert prog.issues == ["gen_prompt mentions the third reference image but there are 2 references"]


def test_normalize_ordinal_counts_after_dropping():
    # the second reference was dropped as unknown, so "the second reference image" now points nowhere
    prog = normalize_program({"gen_prompt": "the first reference image beside the second reference image",
                              "reference_images": [{"img_id": "IMG_001"}, {"img_id": "IMG_004"}]},
                             _refs("IMG_001"))
    assert prog.issues == ["dropped unknown image id IMG_004",
                           "gen_prompt mentions the second reference image but there are 1 references"]


@pytest.mark.parametrize("entry", ["IMG_001", 1, None, ["IMG_001"], {"img_id": 1}, {"note": "no id"}])
def test_normalize_malformed_reference_entries(entry):
    prog = normalize_program({"gen_prompt": "the first reference image",
                              "reference_images": [entry, {"img_id": "IMG_002", "note": 7}]},
                             _refs("IMG_001", "IMG_002"))
    assert [(r.img_id, r.note) for r in prog.reference_images] == [("IMG_002", "7")]
    assert len(prog.issues) == 1
    assert prog.issues[0].startswith("dropped a malformed reference entry: ")
    assert len(prog.issues[0]) <= 120


def test_normalize_accepts_any_iterable_of_images():
    prog = normalize_program({"gen_prompt": "the first reference image", "reference_images": [{"img_id": "IMG_001"}]},
                             (im for im in _refs("IMG_001")))
    assert [r.img_id for r in prog.reference_images] == ["IMG_001"]


# ---------------------------------------------------------------------------
# system prompt
# ---------------------------------------------------------------------------


def test_system_prompt_without_guide():
    assert system_prompt() == SYSTEM_PROMPT
    assert system_prompt(None) == SYSTEM_PROMPT
    assert system_prompt("") == SYSTEM_PROMPT
    assert GUIDE_HEADER not in SYSTEM_PROMPT


def test_system_prompt_with_guide():
    out = system_prompt("  Search the flag first.\nUse two references.  ")
    assert out.startswith(SYSTEM_PROMPT)
    assert out == f"{SYSTEM_PROMPT}\n\n## {GUIDE_HEADER}\nSearch the flag first.\nUse two references."
    assert out.count(GUIDE_HEADER) == 1


def test_system_prompt_custom_base():
    assert system_prompt(None, base="BASE") == "BASE"
    assert system_prompt("g", base="BASE") == f"BASE\n\n## {GUIDE_HEADER}\ng"


def test_system_prompt_names_every_skill():
    for skill in SKILLS:
        assert skill in SYSTEM_PROMPT
