"""The agent loop with fake policies and fake tools: termination, limits, errors, IMG ids, messages seen."""

from __future__ import annotations

import copy
import json

import pytest

from genevolve.agent.loop import EndStep, Tools, TurnStep, run_episode, run_to_end
from genevolve.agent.protocol import (
    FINAL_STEP_MESSAGE,
    FORMAT_ERROR_MESSAGE,
    MAX_TOOL_CALLS,
    MAX_TURNS,
    SYSTEM_PROMPT,
    render_turn,
    trajectory_from_messages,
    trajectory_to_messages,
    wrap_observation,
)
from genevolve.records.schema import ImageRef, Request, ToolCall, Trajectory, read_jsonl, write_jsonl
from genevolve.tools.base import ImageHit

REQUEST = Request(id="req-7", text="Draw the Veloria mascot holding the flag")

# ---------------------------------------------------------------------------
# fakes
# ---------------------------------------------------------------------------


class FakeTextSearch:
    def __init__(self):
        self.calls: list[tuple[list[str], int]] = []

    def search(self, queries, top_k=5):
        self.calls.append((list(queries), top_k))
        return "\n".join(f"--- search result for [{q}] ---\n1. title: fact about {q}\n--- end of search result ---"
                         for q in queries)


class FakeImageSearch:
    def __init__(self, results: dict[str, list[ImageHit]] | None = None):
        self.results = results or {}
        self.calls: list[tuple[str, int]] = []

    def image_search(self, query, top_k=5):
        self.calls.append((query, top_k))
        return list(self.results.get(query, []))[:top_k]


class FakeKnowledge:
    def __init__(self):
        self.calls: list[str] = []

    def query(self, skill_name):
        self.calls.append(skill_name)
        return f"# {skill_name}\n- be explicit"


class Boom:
    """A backend whose every method fails."""

    def search(self, queries, top_k=5):
        raise RuntimeError("search backend down")

    def image_search(self, query, top_k=5):
        raise ConnectionError("image backend down")

    def query(self, skill_name):
        raise KeyError(skill_name)


class ScriptedPolicy:
    """Returns scripted turns in order (the last one repeats); records a copy of every prompt it saw."""

    def __init__(self, *turns, name: str = "scripted"):
        self.name = name
        self.turns = list(turns)
        self.seen: list[list[dict]] = []
        self.seeds: list[int] = []

    def complete(self, messages, seed=0):
        self.seen.append(copy.deepcopy(messages))
        self.seeds.append(seed)
        out = self.turns[min(len(self.seen) - 1, len(self.turns) - 1)]
        if isinstance(out, BaseException):
            raise out
        return out(messages) if callable(out) else out


def hit(n: int, title: str | None = None) -> ImageHit:
    return ImageHit(title=title or f"image {n}", url=f"https://img.example/{n}.png",
                    local_path=f"/store/refs/r{n:04d}.png", page_url=f"https://page.example/{n}",
                    source_id=f"r{n:04d}")


def tools(images: dict[str, list[ImageHit]] | None = None, **kw) -> Tools:
    return Tools(FakeTextSearch(), FakeImageSearch(images), FakeKnowledge(), **kw)


def call(name: str, **arguments) -> str:
    return render_turn(f"calling {name}", tool_call=ToolCall(name=name, arguments=arguments))


def answer(gen_prompt: str = "The lynx from the first reference image", *img_ids: str) -> str:
    return render_turn("done", answer={"gen_prompt": gen_prompt,
                                       "reference_images": [{"img_id": i, "note": f"note {i}"} for i in img_ids]})


GARBAGE = "I would draw a nice lynx."
SEARCH = call("search", queries=["Veloria mascot"])

# ---------------------------------------------------------------------------
# episodes
# ---------------------------------------------------------------------------


def test_policy_answers_immediately():
    policy = ScriptedPolicy(answer("a red cube on a table"))
    t = tools()
    traj = run_to_end(REQUEST, policy, t, seed=4)
    assert traj.termination == "answer"
    assert len(traj.turns) == 1
    assert traj.n_tool_calls == 0
    assert traj.program.gen_prompt == "a red cube on a table"
    assert traj.program is traj.turns[0].answer
    assert traj.turns[0].think == "done"
    assert traj.turns[0].observation is None and traj.turns[0].feedback is None
    assert traj.errors == ["turn 0: no valid reference images"]
    assert traj.id == "req-7-s4" and traj.seed == 4 and traj.policy == "scripted"
    assert traj.request_id == "req-7" and traj.request_text == REQUEST.text
    assert len(policy.seen) == 1 and policy.seeds == [4]
    assert t.text_search.calls == [] and t.image_search.calls == [] and t.knowledge.calls == []


def test_traj_id_can_be_given():
    traj = run_to_end(REQUEST, ScriptedPolicy(answer()), tools(), traj_id="custom")
    assert traj.id == "custom"


def test_garbage_policy_gets_format_errors_then_final_step():
    policy = ScriptedPolicy(GARBAGE)
    traj = run_to_end(REQUEST, policy, tools())
    assert MAX_TURNS == 11
    assert traj.termination == "no_answer"
    assert traj.program is None
    assert len(traj.turns) == 11
    assert len(policy.seen) == 11
    for i, turn in enumerate(traj.turns[:-1]):
        assert turn.feedback == FORMAT_ERROR_MESSAGE
        assert turn.error == "no <tool_call> and no <answer>"
        assert not turn.forced_final
        assert turn.prompt_messages == 2 + 2 * i
    last = traj.turns[-1]
    assert last.forced_final and last.feedback is None
    assert last.prompt_messages == 2 + 2 * 10 + 1
    assert traj.errors == [f"turn {i}: format error: no <tool_call> and no <answer>" for i in range(11)]

    for k, seen in enumerate(policy.seen):
        expected = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": REQUEST.text}]
        for _ in range(k):
            expected += [{"role": "assistant", "content": GARBAGE}, {"role": "user", "content": FORMAT_ERROR_MESSAGE}]
        if k == 10:
            expected.append({"role": "user", "content": FINAL_STEP_MESSAGE})
        assert seen == expected
    assert sum(m["content"] == FINAL_STEP_MESSAGE for s in policy.seen for m in s) == 1


def test_always_tool_policy_hits_the_limits():
    policy = ScriptedPolicy(SEARCH)
    t = tools()
    steps = list(run_episode(REQUEST, policy, t))
    traj = steps[-1].trajectory
    assert MAX_TOOL_CALLS == 10
    assert len(t.text_search.calls) == 10  # the ignored 11th call never reaches the backend
    assert all(tr.tool_call is not None for tr in traj.turns)  # eleven turns wrote a tool call ...
    assert sum(1 for tr in traj.turns if tr.observation is not None) == 10  # ... ten were executed
    assert len(traj.turns) == 11
    assert traj.termination == "max_rounds_reached"
    assert traj.program is None
    last = traj.turns[-1]
    assert last.forced_final
    assert last.observation is None
    assert last.error == "tool call after FINAL STEP (ignored)"
    assert traj.errors == ["turn 10: tool call after FINAL STEP (ignored)"]
    assert not any(tr.forced_final for tr in traj.turns[:-1])

    final_prompt = policy.seen[-1]
    assert final_prompt[-1] == {"role": "user", "content": FINAL_STEP_MESSAGE}
    assert final_prompt[-2]["content"] == wrap_observation(traj.turns[9].observation.text)
    assert [m["role"] for m in final_prompt] == ["system", "user"] + ["assistant", "user"] * 10 + ["user"]
    assert len(steps) == 12 and isinstance(steps[-1], EndStep)


def test_fewer_tool_calls_allowed_forces_the_answer_earlier():
    policy = ScriptedPolicy(SEARCH, SEARCH, answer())
    traj = run_to_end(REQUEST, policy, tools(), max_tool_calls=2)
    assert len(traj.turns) == 3
    assert [t.forced_final for t in traj.turns] == [False, False, True]
    assert policy.seen[2][-1]["content"] == FINAL_STEP_MESSAGE
    assert traj.termination == "answer"


def test_forced_turn_with_garbage_ends_with_no_answer():
    policy = ScriptedPolicy(SEARCH, GARBAGE)
    traj = run_to_end(REQUEST, policy, tools(), max_turns=2)
    assert traj.termination == "no_answer"
    assert traj.turns[1].forced_final
    assert traj.turns[1].feedback is None


def test_malformed_tool_call_json_is_recorded_and_loop_continues():
    bad = '<think>t</think><tool_call>{"name": "search", "arguments": {"queries": ["a"]</tool_call>'
    policy = ScriptedPolicy(bad, answer())
    t = tools()
    traj = run_to_end(REQUEST, policy, t)
    assert len(traj.turns) == 2
    first = traj.turns[0]
    assert first.tool_call is None
    assert first.error.startswith("tool call is not valid JSON")
    assert first.feedback == FORMAT_ERROR_MESSAGE
    assert traj.errors[0].startswith("turn 0: format error: tool call is not valid JSON")
    assert t.text_search.calls == []
    assert policy.seen[1][-2:] == [{"role": "assistant", "content": bad},
                                   {"role": "user", "content": FORMAT_ERROR_MESSAGE}]
    assert traj.termination == "answer"


def test_unknown_tool_name():
    policy = ScriptedPolicy(call("draw_image", prompt="x"), answer())
    traj = run_to_end(REQUEST, policy, tools())
    turn = traj.turns[0]
    assert turn.tool_call.name == "draw_image"
    assert turn.observation.text == "Unknown tool: draw_image. Available tools: search, image_search, query_knowledge"
    assert turn.observation.error == "unknown tool 'draw_image'"
    assert turn.error == "unknown tool 'draw_image'"
    assert "turn 0: unknown tool 'draw_image'" in traj.errors
    assert policy.seen[1][-1]["content"] == wrap_observation(turn.observation.text)
    assert traj.termination == "answer" and len(traj.turns) == 2


@pytest.mark.parametrize("tool_call, error, text_start", [
    (ToolCall(name="search", arguments={}), "bad arguments", "[search] 'queries' must be a list of strings"),
    (ToolCall(name="search", arguments={"queries": 5}), "bad arguments", "[search]"),
    (ToolCall(name="search", arguments={"queries": ["a", 3]}), "bad arguments", "[search]"),
    (ToolCall(name="image_search", arguments={"query": "   "}), "bad arguments",
     "[image_search] 'query' must be a non-empty string"),
    (ToolCall(name="image_search", arguments={"query": ["flag"]}), "bad arguments", "[image_search]"),
    (ToolCall(name="image_search", arguments={}), "bad arguments", "[image_search]"),
])
def test_bad_tool_arguments(tool_call, error, text_start):
    t = tools()
    images: list[ImageRef] = []
    obs = t.execute(tool_call, images)
    assert obs.tool == tool_call.name
    assert obs.error == error
    assert obs.text.startswith(text_start)
    assert images == []
    assert t.text_search.calls == [] and t.image_search.calls == []


def test_unknown_skill_is_an_error_but_still_answered():
    t = tools()
    obs = t.execute(ToolCall(name="query_knowledge", arguments={"skill_name": "juggling"}), [])
    assert obs.error == "unknown skill 'juggling'"
    assert obs.text == "# juggling\n- be explicit"
    obs = t.execute(ToolCall(name="query_knowledge", arguments={}), [])
    assert obs.error == "unknown skill None"
    obs = t.execute(ToolCall(name="query_knowledge", arguments={"skill_name": "quantity_counting"}), [])
    assert obs.error is None and obs.text == "# quantity_counting\n- be explicit"
    assert t.knowledge.calls == ["juggling", "None", "quantity_counting"]


def test_bad_arguments_in_an_episode_are_recorded():
    policy = ScriptedPolicy(call("search", queries=7), answer())
    traj = run_to_end(REQUEST, policy, tools())
    assert traj.turns[0].error == "bad arguments"
    assert traj.errors[0] == "turn 0: bad arguments"
    assert traj.termination == "answer"


def test_search_accepts_a_single_string_and_clamps_top_k():
    t = tools()
    obs = t.execute(ToolCall(name="search", arguments={"queries": "Veloria", "top_k": 50}), [])
    assert obs.error is None
    assert obs.text.startswith("--- search result for [Veloria] ---")
    t.execute(ToolCall(name="search", arguments={"queries": ["a", "b"], "top_k": -3}), [])
    t.execute(ToolCall(name="search", arguments={"queries": ["c"], "top_k": "many"}), [])
    t.execute(ToolCall(name="search", arguments={"queries": ["d"], "top_k": "3"}), [])
    t.execute(ToolCall(name="search", arguments={"queries": ["e"]}), [])
    assert t.text_search.calls == [(["Veloria"], 10), (["a", "b"], 1), (["c"], 5), (["d"], 3), (["e"], 5)]


def test_max_top_k_is_configurable():
    t = tools(max_top_k=3)
    t.execute(ToolCall(name="image_search", arguments={"query": "q", "top_k": 8}), [])
    assert t.image_search.calls == [("q", 3)]


@pytest.mark.parametrize("tool_call, text, error", [
    (ToolCall(name="search", arguments={"queries": ["a"]}), "[tool error] search: search backend down",
     "RuntimeError: search backend down"),
    (ToolCall(name="image_search", arguments={"query": "a"}), "[tool error] image_search: image backend down",
     "ConnectionError: image backend down"),
    (ToolCall(name="query_knowledge", arguments={"skill_name": "spatial_layout"}),
     "[tool error] query_knowledge: 'spatial_layout'", "KeyError: 'spatial_layout'"),
])
def test_backend_failure_becomes_an_observation(tool_call, text, error):
    b = Boom()
    images: list[ImageRef] = []
    obs = Tools(b, b, b).execute(tool_call, images)
    assert obs.tool == tool_call.name
    assert obs.text == text
    assert obs.error == error
    assert obs.images == [] and images == []


def test_backend_failure_in_an_episode_does_not_stop_the_run():
    b = Boom()
    policy = ScriptedPolicy(SEARCH, call("query_knowledge", skill_name="text_rendering"), answer())
    traj = run_to_end(REQUEST, policy, Tools(b, FakeImageSearch(), FakeKnowledge()))
    assert traj.termination == "answer"
    assert len(traj.turns) == 3
    t0 = traj.turns[0]
    assert t0.observation.text == "[tool error] search: search backend down"
    assert t0.error == "RuntimeError: search backend down"
    assert traj.errors[0] == "turn 0: RuntimeError: search backend down"
    assert policy.seen[1][-1]["content"] == wrap_observation("[tool error] search: search backend down")
    assert traj.turns[1].observation.error is None  # the next tool still works


def test_image_ids_in_order_and_stable_for_repeated_hits():
    results = {"lynx": [hit(1, "lynx A"), hit(2, "lynx B")], "flag": [hit(2, "lynx B"), hit(3, "flag C")]}
    policy = ScriptedPolicy(call("image_search", query="lynx"), call("image_search", query=" flag ", top_k=2),
                            answer("the first reference image", "IMG_002"))
    traj = run_to_end(REQUEST, policy, tools(results))
    assert [im.img_id for im in traj.images] == ["IMG_001", "IMG_002", "IMG_003"]
    assert [im.title for im in traj.images] == ["lynx A", "lynx B", "flag C"]
    third = traj.images[2]
    assert (third.url, third.local_path, third.page_url, third.source_id) == (
        "https://img.example/3.png", "/store/refs/r0003.png", "https://page.example/3", "r0003")
    obs1, obs2 = traj.turns[0].observation, traj.turns[1].observation
    assert [im.img_id for im in obs1.images] == ["IMG_001", "IMG_002"]
    assert [im.img_id for im in obs2.images] == ["IMG_002", "IMG_003"]
    assert obs2.text == ("--- image search result for [flag] ---\n"
                         "IMG_002: title: lynx B\n"
                         "IMG_003: title: flag C\n"
                         "--- end of image search result ---")
    assert "/store" not in obs1.text and "https://" not in obs1.text  # urls hidden by default
    assert [(r.img_id, r.note) for r in traj.program.reference_images] == [("IMG_002", "note IMG_002")]
    assert traj.errors == []


def test_show_urls_displays_locations():
    images: list[ImageRef] = []
    obs = tools({"q": [hit(5)]}, show_urls=True).execute(ToolCall(name="image_search", arguments={"query": "q"}), images)
    assert obs.text == ("--- image search result for [q] ---\n"
                        "IMG_001: title: image 5\n"
                        "  url: https://img.example/5.png\n"
                        "  local_path: /store/refs/r0005.png\n"
                        "  page_url: https://page.example/5\n"
                        "--- end of image search result ---")
    assert images == obs.images


def test_execute_continues_numbering_from_existing_images():
    images = [ImageRef(img_id="IMG_001", url="https://img.example/1.png", local_path="/store/refs/r0001.png"),
              ImageRef(img_id="IMG_002", url="u2", local_path="/elsewhere.png")]
    obs = tools({"q": [hit(7), hit(1)]}).execute(ToolCall(name="image_search", arguments={"query": "q"}), images)
    assert [im.img_id for im in obs.images] == ["IMG_003", "IMG_001"]
    assert [im.img_id for im in images] == ["IMG_001", "IMG_002", "IMG_003"]


def test_answer_with_unknown_img_id_is_dropped_and_recorded():
    policy = ScriptedPolicy(call("image_search", query="lynx"),
                            answer("The lynx from the first reference image", "IMG_001", "IMG_007"))
    traj = run_to_end(REQUEST, policy, tools({"lynx": [hit(1)]}))
    assert traj.termination == "answer"
    assert [r.img_id for r in traj.program.reference_images] == ["IMG_001"]
    assert traj.errors == ["turn 1: dropped unknown image id IMG_007"]
    assert traj.program.issues == ["dropped unknown image id IMG_007"]


def test_answer_with_three_references_is_capped_at_two():
    policy = ScriptedPolicy(call("image_search", query="all"),
                            answer("the first reference image and the second reference image",
                                   "IMG_003", "IMG_002", "IMG_001"))
    traj = run_to_end(REQUEST, policy, tools({"all": [hit(1), hit(2), hit(3)]}))
    assert [r.img_id for r in traj.program.reference_images] == ["IMG_001", "IMG_002"]
    assert "3 references capped at 2" in traj.program.issues
    assert "references re-sorted by id" in traj.program.issues
    # re-sorting is normal housekeeping, not an error of the model
    assert traj.errors == ["turn 1: 3 references capped at 2"]


def test_policy_that_raises_ends_with_error():
    policy = ScriptedPolicy(SEARCH, RuntimeError("server down"))
    steps = list(run_episode(REQUEST, policy, tools()))
    assert [type(s) for s in steps] == [TurnStep, EndStep]
    traj = steps[-1].trajectory
    assert traj.termination == "error"
    assert len(traj.turns) == 1
    assert traj.errors == ["turn 1: policy failed: RuntimeError: server down"]
    assert traj.program is None


def test_policy_that_returns_a_non_string_is_a_programming_error():
    policy = ScriptedPolicy(lambda messages: None)
    with pytest.raises(TypeError, match="returned NoneType"):
        run_to_end(REQUEST, policy, tools())


def test_run_episode_yields_turn_steps_then_an_end_step():
    policy = ScriptedPolicy(SEARCH, GARBAGE, call("query_knowledge", skill_name="text_rendering"), answer())
    gen = run_episode(REQUEST, policy, tools())
    first = next(gen)
    assert isinstance(first, TurnStep)
    assert first.turn.index == 0
    assert first.turn.observation is not None  # a tool call's step arrives already answered
    assert len(policy.seen) == 1  # lazy: the next turn is not requested before the consumer asks
    rest = list(gen)
    steps = [first] + rest
    assert [type(s) for s in steps] == [TurnStep] * 4 + [EndStep]
    traj = steps[-1].trajectory
    assert [s.turn for s in steps[:-1]] == traj.turns
    assert all(s.turn is t for s, t in zip(steps[:-1], traj.turns))
    assert [s.turn.index for s in steps[:-1]] == [0, 1, 2, 3]
    assert traj.turns[1].feedback == FORMAT_ERROR_MESSAGE


def test_messages_seen_alternate_and_match_the_export():
    turns = [call("image_search", query="lynx"), GARBAGE, SEARCH, answer("the first reference image", "IMG_001")]
    policy = ScriptedPolicy(*turns)
    traj = run_to_end(REQUEST, policy, tools({"lynx": [hit(1)]}))
    assert len(policy.seen) == 4
    for k, seen in enumerate(policy.seen):
        assert seen[0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert seen[1] == {"role": "user", "content": REQUEST.text}
        assert [m["role"] for m in seen[2:]] == ["assistant", "user"] * k
        assert [m["content"] for m in seen[2::2]] == turns[:k]
        assert traj.turns[k].prompt_messages == len(seen)
    last = policy.seen[-1]
    assert last[3]["content"] == wrap_observation(traj.turns[0].observation.text)
    assert last[5]["content"] == FORMAT_ERROR_MESSAGE
    assert last[7]["content"] == wrap_observation(traj.turns[2].observation.text)
    # the exported conversation is exactly what the policy saw plus its last turn
    exported = trajectory_to_messages(traj)
    assert exported == last + [{"role": "assistant", "content": turns[-1]}]
    # and importing it gives back the same turns and images
    again = trajectory_from_messages(exported)
    assert [t.raw for t in again.turns] == [t.raw for t in traj.turns]
    assert [im.img_id for im in again.images] == ["IMG_001"]
    assert again.program.reference_images == traj.program.reference_images


def test_forced_turn_export_matches_what_the_policy_saw():
    policy = ScriptedPolicy(GARBAGE, SEARCH, answer())
    traj = run_to_end(REQUEST, policy, tools(), max_turns=3)
    assert policy.seen[2][-1] == {"role": "user", "content": FINAL_STEP_MESSAGE}
    assert policy.seen[2][-2]["content"].startswith("<tool_response>\n--- search result for [Veloria mascot]")
    assert trajectory_to_messages(traj) == policy.seen[2] + [{"role": "assistant", "content": answer()}]
    assert traj.turns[2].forced_final and traj.termination == "answer"


def test_trajectory_from_an_episode_round_trips_through_jsonl(tmp_path):
    policy = ScriptedPolicy(call("image_search", query="lynx"), GARBAGE, answer("the first reference image", "IMG_001"))
    traj = run_to_end(REQUEST, policy, tools({"lynx": [hit(1)]}), seed=2)
    write_jsonl(tmp_path / "t.jsonl", [traj])
    back = read_jsonl(tmp_path / "t.jsonl", Trajectory)
    assert back == [traj]
    assert json.loads((tmp_path / "t.jsonl").read_text())["turns"][0]["observation"]["images"][0]["img_id"] == "IMG_001"


def test_episodes_are_deterministic():
    def run():
        policy = ScriptedPolicy(call("image_search", query="lynx"), SEARCH, answer("x", "IMG_001"))
        return run_to_end(REQUEST, policy, tools({"lynx": [hit(1), hit(2)]}), seed=9)

    assert run() == run()
