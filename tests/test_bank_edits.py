"""Editing the bank (genevolve/experience/bank.py) as the studio's editor does: a stale save refused with what it
would have written, a key kept when only slots change, versions restored by number, merges that keep provenance."""

from __future__ import annotations

import pytest

from genevolve.agent.guides import SLOTS
from genevolve.experience.bank import ExperienceBank
from genevolve.experience.validate import StaleEditError
from genevolve.records.schema import RetrievalKey


def _slots(text):
    return {s: f"{text} ({s})." for s in SLOTS}


KEY = {"trigger": "a request that names an exact count", "source_prompt_summary": "draw N stars"}


def test_an_unknown_retrieval_key_is_refused_naming_the_keys(tmp_path):
    with pytest.raises(ValueError) as err:
        ExperienceBank(tmp_path / "b", key="entity")
    assert str(err.value) == "unknown retrieval key 'entity'; keys are situation, request"


def test_a_slot_edit_keeps_the_key_and_a_stale_save_is_refused_with_what_it_would_have_written(tmp_path):
    bank = ExperienceBank(tmp_path / "b")
    exp = bank.add("r1", "Draw three stars", _slots("Count"), retrieval_key=KEY)
    first = bank.edit(exp.id, {SLOTS[0]: "Search first."}, note="mine", base_version=1)
    assert first.version == 2 and first.retrieval_key == RetrievalKey(**KEY)  # a slot edit keeps the key
    with pytest.raises(StaleEditError) as err:  # an editor who opened version 1 saves after version 2 exists
        bank.edit(exp.id, {SLOTS[1]: "Name the count."}, base_version=1)
    e = err.value
    assert e.current.id == exp.id and e.current.version == 2 and e.base_version == 1
    assert e.mine[SLOTS[1]] == "Name the count." and e.mine[SLOTS[0]] == "Search first."
    assert bank.get(exp.id).version == 2 and bank.get(exp.id).slots[SLOTS[1]] == "Count (" + SLOTS[1] + ")."
    same = bank.edit(exp.id, {SLOTS[0]: "Search first."}, base_version=1)  # no change: nothing to refuse
    assert same.version == 2
    ok = bank.edit(exp.id, {SLOTS[1]: "Name the count."}, base_version=2)
    assert ok.version == 3 and ok.retrieval_key == RetrievalKey(**KEY)


def test_a_missing_version_is_named_with_the_versions_there_are(tmp_path):
    bank = ExperienceBank(tmp_path / "b")
    exp = bank.add("r1", "Draw three stars", _slots("Count"))
    bank.edit(exp.id, {SLOTS[0]: "Search first."})
    bank.edit(exp.id, {SLOTS[0]: "Search twice."})
    with pytest.raises(KeyError) as err:
        bank.restore(exp.id, 7)
    assert err.value.args[0] == f"{exp.id} has no version 7 (versions: 1, 2, 3 current)"
    back = bank.restore(exp.id, 1)
    assert back.version == 4 and back.slots == _slots("Count")


def test_a_merge_keeps_each_sources_provenance_and_its_history_keeps_the_evidence(tmp_path):
    bank = ExperienceBank(tmp_path / "b")
    a = bank.add("r1", "Draw three stars", _slots("Count"), reward_gap=0.5, retrieval_key=KEY, run_id="run-a", step=2)
    b = bank.add("r2", "Draw two moons", _slots("Count"), reward_gap=0.25, retrieval_key=KEY, run_id="run-b", step=4)
    (merged,) = bank.consolidate()
    assert merged.id == a.id and merged.evidence == 2
    (src,) = merged.merged_from
    assert (src.id, src.evidence, src.reward_gap, src.run_id, src.step) == (b.id, 1, 0.25, "run-b", 4)
    assert merged.history and merged.history[-1].evidence == 1  # the version before the merge, with its evidence


def test_a_contradicted_lesson_is_dropped_for_the_one_with_more_evidence_then_the_larger_gap(tmp_path):
    bank = ExperienceBank(tmp_path / "b")
    bank.add("r1", "Draw three stars", _slots("Count"), reward_gap=0.2, retrieval_key=KEY)
    bank.add("r2", "Draw two moons", _slots("Count") | {SLOTS[0]: "Skip the search."}, reward_gap=0.9,
             retrieval_key=KEY)
    bank.add("r3", "Draw four suns", _slots("Count"), reward_gap=0.1, retrieval_key=KEY)
    (merged,) = bank.consolidate()
    assert merged.slots[SLOTS[0]] == f"Count ({SLOTS[0]})."  # two votes beat one with a larger gap
    assert merged.note == ("consolidated 3 experiences with this trigger (evidence 3); dropped as "
                          f"contradicted by better-supported lessons: {SLOTS[0]} 'Skip the search.' (evidence 1)")
    bank2 = ExperienceBank(tmp_path / "c")
    bank2.add("r1", "Draw three stars", _slots("Count") | {SLOTS[0]: "Search once."}, reward_gap=0.2, retrieval_key=KEY)
    bank2.add("r2", "Draw two moons", _slots("Count") | {SLOTS[0]: "Search twice."}, reward_gap=0.3, retrieval_key=KEY)
    (m2,) = bank2.consolidate()
    assert m2.slots[SLOTS[0]] == "Search twice."  # one vote each: the larger summed gap
    bank3 = ExperienceBank(tmp_path / "d")
    bank3.add("r1", "Draw three stars", _slots("Count") | {SLOTS[0]: "Search once."}, reward_gap=0.3, retrieval_key=KEY)
    bank3.add("r2", "Draw two moons", _slots("Count") | {SLOTS[0]: "Search twice."}, reward_gap=0.3, retrieval_key=KEY)
    (m3,) = bank3.consolidate()
    assert m3.slots[SLOTS[0]] == "Search twice."  # a tie on both: the newest
    bank4 = ExperienceBank(tmp_path / "e")
    bank4.add("r1", "x", _slots("Count"), retrieval_key=KEY)
    bank4.add("r2", "y", _slots("Count"), retrieval_key=KEY)
    (m4,) = bank4.consolidate()
    assert m4.note == "consolidated 2 experiences with this trigger (evidence 2)"  # nothing dropped


def test_triggers_are_grouped_without_case_or_spacing(tmp_path):
    bank = ExperienceBank(tmp_path / "b")
    bank.add("r1", "x", _slots("Count"), retrieval_key={"trigger": "A request  that names an EXACT count"})
    bank.add("r2", "y", _slots("Count"), retrieval_key={"trigger": "a request that names an exact count"})
    bank.add("r3", "z", _slots("Count"), retrieval_key={"trigger": "a request that names exact counts"})
    merged = bank.consolidate()
    assert len(merged) == 1 and merged[0].evidence == 2 and len(bank) == 2


def test_two_banks_on_one_folder_read_each_others_writes_before_consolidating_or_restoring(tmp_path):
    mine, theirs = ExperienceBank(tmp_path / "b"), ExperienceBank(tmp_path / "b")
    e = theirs.add("r1", "x", _slots("Count"), retrieval_key=KEY)
    theirs.add("r2", "y", _slots("Count"), retrieval_key=KEY)
    assert len(mine.consolidate()) == 1 and len(mine) == 1  # it saw both before merging
    theirs2 = ExperienceBank(tmp_path / "b")
    theirs2.edit(e.id, {SLOTS[0]: "Search first."})  # version 3, made elsewhere
    back = mine.restore(e.id, 2)
    assert back.version == 4 and back.slots == _slots("Count")


def test_votes_tie_on_evidence_then_go_to_the_larger_summed_gap(tmp_path):
    bank = ExperienceBank(tmp_path / "b")
    a, b = _slots("Count") | {SLOTS[0]: "Search once."}, _slots("Count") | {SLOTS[0]: "Search twice."}
    for slots, gap in ((a, 0.3), (b, 0.01), (a, 0.1), (b, 0.35)):  # a: 0.4 in all, b: 0.36; the last b is the newest
        bank.add("r", "x", slots, reward_gap=gap, retrieval_key=KEY)
    (m,) = bank.consolidate()
    assert m.slots[SLOTS[0]] == "Search once."


def test_every_dropped_lesson_is_named_and_a_merged_sources_evidence_is_kept(tmp_path):
    bank = ExperienceBank(tmp_path / "b")
    keep = bank.add("r1", "x", _slots("Count"), retrieval_key=KEY, evidence=3)
    other = bank.add("r2", "y", _slots("Count") | {SLOTS[0]: "Skip it.", SLOTS[1]: "Guess."}, retrieval_key=KEY,
                     evidence=2)
    (m,) = bank.consolidate()
    assert m.id == keep.id and m.evidence == 5 and m.history[-1].evidence == 3
    assert [(s.id, s.evidence) for s in m.merged_from] == [(other.id, 2)]
    assert m.note == (f"consolidated 2 experiences with this trigger (evidence 5); dropped as contradicted by "
                      f"better-supported lessons: {SLOTS[0]} 'Skip it.' (evidence 2); {SLOTS[1]} 'Guess.' (evidence 2)")


def test_the_index_embeds_triggers_as_situations_or_source_requests_as_text(tmp_path):
    from genevolve.experience.situation import situation_vector
    import numpy as np

    sit, raw = ExperienceBank(tmp_path / "s"), ExperienceBank(tmp_path / "r", key="request")
    exp = sit.add("r1", "Draw the Veloria flag above three gold stars", _slots("Count"),
                  retrieval_key={"trigger": "names an exact count; names an entity to look up; places objects"})
    t = exp.retrieval_key.trigger
    assert sit.key_text(exp) == t and raw.key_text(exp) == exp.source_request
    bare = exp.model_copy(update={"retrieval_key": None})
    assert sit.key_text(bare) == sit.describer.describe(exp.source_request)
    assert np.allclose(sit._vector(t), situation_vector(t, sit._embed))
    assert np.allclose(raw._vector(t), raw._embed(t)) and not np.allclose(sit._vector(t), raw._vector(t))


def test_ranked_lists_every_experience_for_each_text_and_transform_replaces_them(tmp_path):
    bank = ExperienceBank(tmp_path / "b", gate=-1.0)
    a = bank.add("r1", "x", _slots("Count"), retrieval_key=KEY)
    b = bank.add("r2", "y", _slots("Look"), retrieval_key={"trigger": "a request that names a place"})
    ranked = bank.ranked(["Draw three gold stars", "Draw the harbour of Veloria"])
    assert [len(r) for r in ranked] == [2, 2] and {e.id for _, e in ranked[0]} == {a.id, b.id}
    assert all(r[0][0] >= r[1][0] for r in ranked)
    bank.transform(lambda items: {k: v for k, v in items.items() if k != a.id})
    assert list(bank.items) == [b.id] and list(ExperienceBank(tmp_path / "b").items) == [b.id]
