"""What an experience may hold (genevolve/experience/validate.py): five plain-text slots on one line each, a
retrieval key with a trigger, every refusal worded exactly, and the stale-edit refusal that names the slots."""

from __future__ import annotations

import re

import pytest

from genevolve.agent.guides import SLOTS
from genevolve.experience.validate import (MAX_SLOT_CHARS, ExperienceError, StaleEditError, validate_key,
                                           validate_slots)
from genevolve.records.schema import Experience, RetrievalKey


def _slots(**over):
    return {s: f"Do {s} well." for s in SLOTS} | over


def _refused(fn, arg, message):
    with pytest.raises(ExperienceError) as err:
        fn(arg)
    assert str(err.value) == message


def test_slots_are_collapsed_to_one_line_and_kept_in_slot_order():
    out = validate_slots(_slots(**{SLOTS[0]: "  Search\n\tfirst,   then   look.  "}))
    assert list(out) == list(SLOTS) and out[SLOTS[0]] == "Search first, then look."
    assert validate_slots(_slots(**{SLOTS[1]: "x" * MAX_SLOT_CHARS}))[SLOTS[1]] == "x" * MAX_SLOT_CHARS


def test_each_bad_slot_is_refused_with_its_reason():
    _refused(validate_slots, ["not", "a", "dict"], "slots must be an object with the five slot names")
    _refused(validate_slots, _slots(zeta="x", alpha="y"),
             f"unknown slots ['alpha', 'zeta']; slots are {', '.join(SLOTS)}")
    _refused(validate_slots, _slots(**{SLOTS[2]: 3}), f"slot {SLOTS[2]} must be text")
    _refused(validate_slots, _slots(**{SLOTS[3]: " \n "}), f"slot {SLOTS[3]} is empty")
    missing = _slots()
    del missing[SLOTS[4]]
    _refused(validate_slots, missing, f"slot {SLOTS[4]} is empty")
    _refused(validate_slots, _slots(**{SLOTS[0]: "x" * (MAX_SLOT_CHARS + 1)}),
             f"slot {SLOTS[0]} has {MAX_SLOT_CHARS + 1} characters (at most {MAX_SLOT_CHARS})")


@pytest.mark.parametrize("char,code", [("\x00", "0000"), ("\x1b", "001B"), ("\u202e", "202E"), ("\u200b", "200B")])
def test_control_and_format_characters_are_refused_by_code_point(char, code):
    _refused(validate_slots, _slots(**{SLOTS[1]: f"Search{char}first."}),
             f"slot {SLOTS[1]} contains the control character U+{code}: remove it (plain text only)")
    _refused(validate_key, {"trigger": f"a count{char}request"},
             f"the retrieval key's trigger contains the control character U+{code}: remove it (plain text only)")
    _refused(validate_key, {"trigger": "a count request", "source_prompt_summary": f"x{char}"},
             f"the retrieval key's source_prompt_summary contains the control character U+{code}: remove it (plain text only)")
    assert validate_slots(_slots(**{SLOTS[1]: "Ünïcödé — fine, “quoted”."}))[SLOTS[1]] == "Ünïcödé — fine, “quoted”."


def test_a_retrieval_key_is_collapsed_and_needs_a_trigger():
    assert validate_key(None) is None
    key = validate_key({"trigger": " a request  that\nnames a count ", "source_prompt_summary": "  draw  N stars "})
    assert key == RetrievalKey(trigger="a request that names a count", source_prompt_summary="draw N stars")
    assert validate_key(RetrievalKey(trigger="t")) == RetrievalKey(trigger="t", source_prompt_summary="")
    _refused(validate_key, {"trigger": "  "}, "the retrieval key's trigger is empty")
    _refused(validate_key, RetrievalKey(trigger="\n"), "the retrieval key's trigger is empty")
    with pytest.raises(ExperienceError) as err:
        validate_key({"summary": "no trigger"})
    assert re.fullmatch(r"retrieval key: \d+ validation errors? for RetrievalKey", str(err.value))
    long = "y" * (MAX_SLOT_CHARS + 1)
    _refused(validate_key, {"trigger": long},
             f"the retrieval key's trigger has {MAX_SLOT_CHARS + 1} characters (at most {MAX_SLOT_CHARS})")
    _refused(validate_key, {"trigger": "t", "source_prompt_summary": long},
             f"the retrieval key's source_prompt_summary has {MAX_SLOT_CHARS + 1} characters (at most {MAX_SLOT_CHARS})")
    assert validate_key({"trigger": "y" * MAX_SLOT_CHARS}).trigger == "y" * MAX_SLOT_CHARS


def test_a_stale_edit_names_the_versions_and_the_slots_that_differ():
    current = Experience(id="exp-1", source_request_id="r", source_request="x", slots=_slots(), version=3)
    mine = _slots(**{SLOTS[1]: "Mine.", SLOTS[3]: "Also mine."})
    err = StaleEditError(current, 2, mine)
    assert isinstance(err, ExperienceError) and (err.current, err.base_version, err.mine) == (current, 2, mine)
    assert str(err) == ("exp-1 was saved as version 3 by someone else after you opened version 2: your change was not "
                        f"saved. Reopen it to see theirs, then make yours again (slots where yours differ: {SLOTS[1]}, {SLOTS[3]})")
    assert str(StaleEditError(current, 1, _slots())).endswith("then make yours again")
