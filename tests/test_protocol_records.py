"""Protocol: SFT record import and export, ours and the official runtime's (FINAL STEP text, unknown messages, its parse mode)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from genevolve.agent.protocol import (
    FINAL_STEP_MESSAGE,
    FORMAT_ERROR_MESSAGE,
    SYSTEM_PROMPT,
    images_from_observation,
    normalize_program,
    parse_turn,
    render_turn,
    system_prompt,
    trajectory_from_messages,
    trajectory_to_messages,
    wrap_observation,
)
from genevolve.records.schema import ImageRef, ToolCall

GOLDEN = Path(__file__).parent / "data" / "sft_record.json"


def _refs(*ids: str) -> list[ImageRef]:
    return [ImageRef(img_id=i, title=f"title {i}") for i in ids]


# ---------------------------------------------------------------------------
# SFT records
# ---------------------------------------------------------------------------


@pytest.fixture
def golden():
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def test_golden_file_shape(golden):
    assert set(golden) == {"messages", "images"}
    assert [m["role"] for m in golden["messages"]] == ["system", "user"] + ["assistant", "user"] * 3 + ["assistant"]
    assert golden["images"] == ["images/aurora_cup_0001.png"]


def test_import_golden_record(golden):
    msgs = golden["messages"]
    traj = trajectory_from_messages(msgs, traj_id="g-1", request_id="req-g")
    assert traj.id == "g-1" and traj.request_id == "req-g"
    assert traj.policy == "imported"
    assert traj.system_prompt == msgs[0]["content"]
    assert traj.guide is None
    assert traj.request_text == msgs[1]["content"]
    assert traj.termination == "answer"
    assert traj.errors == []

    assert len(traj.turns) == 4
    assert [t.index for t in traj.turns] == [0, 1, 2, 3]
    assert [t.prompt_messages for t in traj.turns] == [2, 4, 6, 8]
    assert [t.raw for t in traj.turns] == [m["content"] for m in msgs[2::2]]
    assert not any(t.forced_final for t in traj.turns)
    assert all(t.error is None and t.feedback is None for t in traj.turns)
    assert traj.turns[0].think.startswith("I do not know who won")
    assert "\n" in traj.turns[0].think

    calls = [t.tool_call for t in traj.turns]
    assert calls[0] == ToolCall(name="search", arguments={"queries": ["2031 Aurora Cup winner", "Veloria flag colours"],
                                                           "top_k": 2})
    assert calls[1] == ToolCall(name="image_search", arguments={"query": "Veloria mascot teal lynx", "top_k": 3})
    assert calls[2] == ToolCall(name="query_knowledge", arguments={"skill_name": "text_rendering"})
    assert calls[3] is None
    assert traj.n_tool_calls == 3

    obs = [t.observation for t in traj.turns]
    assert [o.tool for o in obs[:3]] == ["search", "image_search", "query_knowledge"]
    assert obs[3] is None
    for o, m in zip(obs[:3], msgs[3:8:2]):
        assert wrap_observation(o.text) == m["content"]
        assert o.error is None
    assert obs[0].text.startswith("--- search result for [2031 Aurora Cup winner] ---")
    assert obs[2].text == "# text_rendering\n- Quote the exact text in double quotes.\n" \
                          "- Say where the text sits, its colour and its letter style."
    assert obs[0].images == [] and obs[2].images == []

    # IMG ids recovered from the image_search observation
    assert [im.img_id for im in traj.images] == ["IMG_001", "IMG_002", "IMG_003"]
    assert obs[1].images == traj.images
    assert traj.images[0].title == "Veloria mascot, the teal lynx"
    assert traj.images[0].url == "https://img.example/veloria/lynx.png"
    assert traj.images[0].page_url == "https://wiki.example/veloria"
    assert traj.images[1].title == "Lynx fan art (unofficial)"
    assert traj.images[1].page_url == ""
    assert traj.images[2].url == "https://img.example/veloria/flag.png"

    prog = traj.program
    assert prog is traj.turns[3].answer
    assert prog.gen_prompt.startswith("The teal lynx mascot from the first reference image")
    assert '"AURORA 2031"' in prog.gen_prompt
    assert [(r.img_id, r.note) for r in prog.reference_images] == [("IMG_001", "the mascot"), ("IMG_003", "the flag")]
    assert prog.issues == []


def test_export_golden_record_exactly(golden):
    msgs = golden["messages"]
    original = copy.deepcopy(msgs)
    traj = trajectory_from_messages(msgs)
    assert trajectory_to_messages(traj) == original
    assert msgs == original  # import does not mutate its input


def test_golden_round_trip_survives_jsonl(golden, tmp_path):
    from genevolve.records.schema import Trajectory, read_jsonl, write_jsonl

    traj = trajectory_from_messages(golden["messages"])
    write_jsonl(tmp_path / "t.jsonl", [traj])
    back = read_jsonl(tmp_path / "t.jsonl", Trajectory)[0]
    assert back == traj
    assert trajectory_to_messages(back) == golden["messages"]


def _forced_record() -> list[dict[str, str]]:
    search = render_turn("look", tool_call=ToolCall(name="image_search", arguments={"query": "flag"}))
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Draw the Veloria flag"},
        {"role": "assistant", "content": "I think I will just describe it."},  # no action
        {"role": "user", "content": FORMAT_ERROR_MESSAGE},
        {"role": "assistant", "content": search},
        {"role": "user", "content": wrap_observation("--- image search result for [flag] ---\n"
                                                     "IMG_001: title: Veloria flag\n"
                                                     "--- end of image search result ---")},
        {"role": "assistant", "content": '<think>x</think><tool_call>{"name": "search", "arguments": {"queries": [}'
                                         "</tool_call>"},  # malformed JSON
        {"role": "user", "content": FORMAT_ERROR_MESSAGE},
        {"role": "user", "content": FINAL_STEP_MESSAGE},
        {"role": "assistant", "content": render_turn("answer now", answer={
            "gen_prompt": "The flag from the first reference image", "reference_images": [{"img_id": "IMG_001"}]})},
    ]


def test_final_step_and_format_error_round_trip():
    msgs = _forced_record()
    traj = trajectory_from_messages(msgs)
    assert trajectory_to_messages(traj) == msgs
    assert len(traj.turns) == 4
    assert [t.forced_final for t in traj.turns] == [False, False, False, True]
    assert traj.turns[0].error == "no <tool_call> and no <answer>"
    assert traj.turns[0].feedback == FORMAT_ERROR_MESSAGE
    assert traj.turns[0].observation is None
    assert traj.turns[1].observation.images[0].img_id == "IMG_001"
    assert traj.turns[1].feedback is None
    assert traj.turns[2].error.startswith("tool call is not valid JSON")
    assert traj.turns[2].feedback == FORMAT_ERROR_MESSAGE
    assert traj.turns[3].prompt_messages == 9
    assert traj.termination == "answer"
    assert [r.img_id for r in traj.program.reference_images] == ["IMG_001"]


def test_record_ending_in_a_forced_tool_call_round_trips():
    msgs = _forced_record()[:-1]
    msgs.append({"role": "assistant", "content": render_turn("more", tool_call=ToolCall(name="search"))})
    traj = trajectory_from_messages(msgs)
    assert traj.termination == "max_rounds_reached"  # as both runtimes end such a trajectory
    assert traj.program is None
    assert traj.turns[-1].forced_final and traj.turns[-1].observation is None
    assert trajectory_to_messages(traj) == msgs


def test_guide_round_trip():
    msgs = _forced_record()
    msgs[0] = {"role": "system", "content": system_prompt("Query text_rendering first.")}
    traj = trajectory_from_messages(msgs)
    assert traj.guide == "Query text_rendering first."
    assert traj.system_prompt == SYSTEM_PROMPT
    assert trajectory_to_messages(traj) == msgs


def test_tool_call_without_tool_response_is_not_an_observation():
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "req"},
        {"role": "assistant", "content": render_turn("t", tool_call=ToolCall(name="search", arguments={"queries": ["a"]}))},
        {"role": "user", "content": "Please hurry."},
        {"role": "assistant", "content": render_turn("t", answer={"gen_prompt": "x"})},
    ]
    traj = trajectory_from_messages(msgs)
    assert traj.turns[0].observation is None
    assert traj.turns[0].feedback == "Please hurry."
    assert trajectory_to_messages(traj) == msgs


def test_import_answer_with_unknown_id_is_normalised():
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "req"},
        {"role": "assistant", "content": render_turn("t", answer={
            "gen_prompt": "x", "reference_images": [{"img_id": "IMG_001"}]})},
    ]
    traj = trajectory_from_messages(msgs)
    assert traj.program.reference_images == []
    assert "dropped unknown image id IMG_001" in traj.program.issues
    assert traj.turns[0].raw == msgs[2]["content"]  # the raw text is kept as written
    assert trajectory_to_messages(traj) == msgs


@pytest.mark.parametrize("msgs, match", [
    ([], "system"),
    ([{"role": "user", "content": "req"}], "system"),
    ([{"role": "user", "content": "req"}, {"role": "assistant", "content": "x"}], "system"),
    ([{"role": "system", "content": "sys"}], "user request"),
    ([{"role": "system", "content": "sys"}, {"role": "assistant", "content": "<answer>{}</answer>"}], "user request"),
    ([{"role": "system", "content": ["parts"]}, {"role": "user", "content": "req"}], "system"),
])
def test_bad_records_raise(msgs, match):
    with pytest.raises(ValueError, match=match):
        trajectory_from_messages(msgs)


# ---------------------------------------------------------------------------
# Official runtime records: FINAL STEP text, messages we do not understand, the official parse mode
# ---------------------------------------------------------------------------

OFFICIAL = Path(__file__).parent / "data" / "official_sft_row.json"


@pytest.fixture
def official_row():
    return json.loads(OFFICIAL.read_text(encoding="utf-8"))


@pytest.mark.parametrize("mode", ["strict", "official"])
def test_official_record_exports_byte_for_byte(official_row, mode):
    """24 messages: ten tool rounds, the official FINAL STEP text, the answer. Every message comes back."""
    msgs = official_row["messages"]
    assert len(msgs) == 24 and msgs[-2]["content"].startswith("=== FINAL STEP: OUTPUT ANSWER NOW ===")
    traj = trajectory_from_messages(copy.deepcopy(msgs), mode=mode)
    back = trajectory_to_messages(traj)
    assert back == msgs
    assert json.dumps(back, ensure_ascii=False) == json.dumps(msgs, ensure_ascii=False)
    assert len(traj.turns) == 11 and [t.forced_final for t in traj.turns] == [False] * 10 + [True]
    assert traj.final_step_message == msgs[-2]["content"] and traj.kept_messages == []
    assert traj.turns[-1].prompt_messages == 23


def test_official_mode_reads_the_record_as_the_official_runtime_ran_it(official_row):
    msgs = official_row["messages"]
    official = trajectory_from_messages(msgs, mode="official")
    strict = trajectory_from_messages(msgs)
    # turn 2 holds two tool calls: the official runtime ran the first, and its image ids are known
    assert official.turns[2].tool_call.name == "image_search" and official.turns[2].error is None
    assert [im.img_id for im in official.images] == ["IMG_001", "IMG_002", "IMG_003", "IMG_004"]
    # turn 4 passes "arguments": [] which the official runtime reads as {}
    assert official.turns[4].tool_call == ToolCall(name="query_knowledge", arguments={})
    assert official.n_tool_calls == 10 and official.termination == "answer"
    assert [(r.img_id, r.note) for r in official.program.reference_images] == [("IMG_001", ""), ("IMG_004", "river view at sunrise")]
    assert "turn 2: 2 tool calls in one turn (one allowed); read as the official runtime does" in official.errors
    # the strict parser rejects both turns, so IMG_003 is never handed out
    assert strict.turns[2].error == "2 tool calls in one turn (one allowed)" and strict.turns[2].tool_call is None
    assert strict.turns[4].error == "tool call 'arguments' is not an object"
    assert strict.n_tool_calls == 8 and strict.image("IMG_003") is None


def test_official_record_ending_in_a_tool_call_it_ran(official_row):
    """After FINAL STEP the official runtime still runs a tool call, then stops: max_rounds_reached."""
    msgs = official_row["messages"][:-1] + [{"role": "assistant", "content": SEARCH},
                                            {"role": "user", "content": wrap_observation("--- search result for [a] ---")}]
    traj = trajectory_from_messages(msgs, mode="official")
    assert traj.termination == "max_rounds_reached" and traj.program is None
    assert traj.turns[-1].forced_final and traj.turns[-1].observation.text == "--- search result for [a] ---"
    assert trajectory_to_messages(traj) == msgs


def test_note_null_becomes_empty():
    prog = normalize_program({"gen_prompt": "the first reference image", "reference_images": [{"img_id": "IMG_001", "note": None}]},
                             _refs("IMG_001"))
    assert prog.reference_images[0].note == "" and prog.issues == []


def _sys_req():
    return [{"role": "system", "content": "sys"}, {"role": "user", "content": "req"}]


ANSWER = render_turn("t", answer={"gen_prompt": "x"})
SEARCH = render_turn("t", tool_call=ToolCall(name="search", arguments={"queries": ["a"]}))


@pytest.mark.parametrize("extra, at", [
    ({"role": "user", "content": "Also: make it square."}, 2),  # a user message before any assistant turn
    ({"role": "tool", "content": "x"}, 2),  # a role we do not use
    ({"role": "user", "content": "RESPONSE TOO LONG: be concise."}, 4),  # a second user message after an observation
    ({"role": "user", "content": "Please hurry."}, 6),  # a second user message after a feedback note
    ({"role": "assistant", "content": "x", "reasoning_content": "r"}, 4),  # keys we do not read
    ({"role": "user", "content": [{"type": "text", "text": "x"}]}, 4),  # content that is not text
    ({"role": "user", "content": None}, 4),
    ({"role": "user", "content": FINAL_STEP_MESSAGE}, 7),  # a FINAL STEP with no turn after it
    ({"role": "user", "content": "=== FINAL STEP: OUTPUT ANSWER NOW ===\nAnother wording."}, 7),
])
def test_messages_we_do_not_understand_are_kept(extra, at):
    msgs = _sys_req() + [{"role": "assistant", "content": SEARCH}, {"role": "user", "content": wrap_observation("found")},
                         {"role": "assistant", "content": "no action"}, {"role": "user", "content": FORMAT_ERROR_MESSAGE},
                         {"role": "assistant", "content": ANSWER}]
    msgs.insert(at, extra)
    traj = trajectory_from_messages(copy.deepcopy(msgs))
    assert trajectory_to_messages(traj) == msgs
    held = [(k.at, k.message) for k in traj.kept_messages] + [(t.prompt_messages + 1, {"role": "user", "content": t.feedback})
                                                               for t in traj.turns if t.feedback is not None]
    assert (at, extra) in held  # kept verbatim, or the note after a turn
    assert not any(t.forced_final for t in traj.turns)
    assert trajectory_to_messages(trajectory_from_messages(trajectory_to_messages(traj))) == msgs


def test_two_final_step_wordings_in_one_record_round_trip():
    other = "=== FINAL STEP: OUTPUT ANSWER NOW ===\nAnother wording."
    msgs = _sys_req() + [{"role": "user", "content": other}, {"role": "assistant", "content": "no action"},
                         {"role": "user", "content": FINAL_STEP_MESSAGE}, {"role": "assistant", "content": ANSWER}]
    traj = trajectory_from_messages(msgs)
    assert trajectory_to_messages(traj) == msgs
    assert [t.forced_final for t in traj.turns] == [True, False] and traj.final_step_message == other
    assert traj.turns[0].feedback == FINAL_STEP_MESSAGE  # not a FINAL STEP here: a note after the first turn


def test_observation_wrapped_differently_is_kept_verbatim():
    msgs = _sys_req() + [{"role": "assistant", "content": SEARCH}, {"role": "user", "content": "<tool_response>found</tool_response>"},
                         {"role": "assistant", "content": ANSWER}]
    traj = trajectory_from_messages(msgs)
    assert trajectory_to_messages(traj) == msgs


# --- parse modes -------------------------------------------------------------------------------

CALL_A = '<tool_call>{"name": "search", "arguments": {"queries": ["a"]}}</tool_call>'
CALL_B = '<tool_call>{"name": "image_search", "arguments": {"query": "b"}}</tool_call>'
ANS_X = '<answer>{"gen_prompt": "x"}</answer>'
ANS_Y = '<answer>{"gen_prompt": "y"}</answer>'


@pytest.mark.parametrize("text, strict_error, official", [
    # two tool calls: the official runtime runs the first
    (f"<think>t</think>{CALL_A}\n{CALL_B}", "2 tool calls in one turn (one allowed)", ("search", {"queries": ["a"]})),
    # a tool call next to an answer: it takes the answer, wherever the tool call stands
    (f"<think>t</think>{CALL_A}{ANS_X}", "both a tool call and an answer in one turn", {"gen_prompt": "x"}),
    (f"<think>t</think>{ANS_X}{CALL_A}", "both a tool call and an answer in one turn", {"gen_prompt": "x"}),
    # an answer quoted inside <think> is an answer to it (the first one found wins)
    (f"<think>I could say {ANS_X} but first</think>{CALL_A}", "both a tool call and an answer in one turn", {"gen_prompt": "x"}),
    (f"<think>draft {ANS_X}</think>{ANS_Y}", "2 answers in one turn (one allowed)", {"gen_prompt": "x"}),
    # an answer that is not JSON does not stop it from running the tool call
    (f"<think>t</think><answer>{{gen_prompt: x}}</answer>{CALL_A}", "both a tool call and an answer in one turn",
     ("search", {"queries": ["a"]})),
    # empty arguments of any kind are {}; a missing name is the tool ""
    ('<tool_call>{"name": "search", "arguments": []}</tool_call>', "tool call 'arguments' is not an object", ("search", {})),
    ('<tool_call>{"name": "search", "arguments": ""}</tool_call>', "tool call 'arguments' is not an object", ("search", {})),
    ('<tool_call>{"name": "search", "arguments": false}</tool_call>', "tool call 'arguments' is not an object", ("search", {})),
    ('<tool_call>{"name": " search "}</tool_call>', None, ("search", {})),
    ('<tool_call>{"arguments": {"queries": ["a"]}}</tool_call>', "tool call JSON needs a string 'name'", ("", {"queries": ["a"]})),
    ('<tool_call>{"name": null}</tool_call>', "tool call JSON needs a string 'name'", ("", {})),
])
def test_official_mode_takes_what_the_official_runtime_takes(text, strict_error, official):
    s = parse_turn(text)
    assert s.error == strict_error
    o = parse_turn(text, mode="official")
    assert o.error is None
    if isinstance(official, tuple):
        assert o.tool_call == ToolCall(name=official[0], arguments=official[1]) and o.answer is None
    else:
        assert o.answer == official and o.tool_call is None
    assert o.think == s.think


@pytest.mark.parametrize("text, error", [
    ('<tool_call>{"name": "search", "arguments": [1, 2]}</tool_call>', "tool call 'arguments' is not an object"),
    ('<tool_call>{"name": "search", "arguments": "q"}</tool_call>', "tool call 'arguments' is not an object"),
    ('<tool_call>{"name": 3}</tool_call>', "tool call 'name' is not a string"),
    ('<tool_call>["search", {}]</tool_call>', "no <tool_call> and no <answer>"),  # only {...} is looked for
    ('<answer>["gen_prompt", "x"]</answer>', "no <tool_call> and no <answer>"),
    ("<answer>{'gen_prompt': 'x'}</answer>", "answer is not valid JSON"),
    ('<tool_call>{"name": "search", "arguments": {"queries": [}}</tool_call>', "tool call is not valid JSON"),
    # only the first answer is tried: a broken draft in <think> hides the real one
    (f"<think>draft <answer>{{oops}}</answer></think>{ANS_Y}", "answer is not valid JSON"),
    ("<think>only thinking</think>", "no <tool_call> and no <answer>"),
])
def test_official_mode_rejects_what_the_official_runtime_rejects(text, error):
    p = parse_turn(text, mode="official")
    assert p.tool_call is None and p.answer is None and p.error.startswith(error)


@pytest.mark.parametrize("text", [render_turn("a", tool_call=ToolCall(name="search", arguments={"queries": ["q"], "top_k": 2})),
                                  render_turn("b", answer={"gen_prompt": "g", "reference_images": [{"img_id": "IMG_001", "note": ""}]}),
                                  render_turn("c", tool_call=ToolCall(name="query_knowledge")),
                                  '<think>\nx\n</think>\n<answer>\n{"gen_prompt": "p"}\n</answer>'])
def test_modes_agree_on_well_formed_turns(text):
    assert parse_turn(text, mode="official") == parse_turn(text) == parse_turn(text, mode="strict")


def test_unknown_parse_mode_raises():
    with pytest.raises(ValueError, match="strict.*official"):
        parse_turn("x", mode="lenient")
    with pytest.raises(ValueError, match="strict.*official"):
        trajectory_from_messages(_sys_req(), mode="lenient")


def test_images_from_observation():
    text = ("--- image search result for [q] ---\n"
            "IMG_004: title: Castrel crest\n"
            "  url: https://img.example/c.png\n"
            "  local_path: /store/c.png\n"
            "  page_url: https://wiki.example/c\n"
            "  snippet: ignored key\n"
            "IMG_012: title: \n"
            "not an image line\n"
            "--- end of image search result ---")
    out = images_from_observation(text)
    assert [im.img_id for im in out] == ["IMG_004", "IMG_012"]
    assert out[0] == ImageRef(img_id="IMG_004", title="Castrel crest", url="https://img.example/c.png",
                              local_path="/store/c.png", page_url="https://wiki.example/c")
    assert out[1].title == "" and out[1].url == ""
    assert images_from_observation("no images here") == []
