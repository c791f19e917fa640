"""Experiences that transfer: retrieval keys (situation vs raw text), consolidation, leave-own-out, the one rule for
which experience a request gets, and retrieval that never reads the sandbox's hidden labels."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from genevolve.agent.guides import SLOTS, request_guides
from genevolve.cli import app
from genevolve.experience.bank import ExperienceBank, ExperienceError, default_gate
from genevolve.experience.situation import (NEEDS, CueDescriber, clauses, entity_names, request_needs, situation_text,
                                            summarise_request)
from genevolve.experience.summarise import SummaryError, checked_key, parse_summary
from genevolve.tools.embed import HashEmbedder

SLOTS_OK = {s: f"Do the {s.replace('_', ' ')} right." for s in SLOTS}
COUNT = situation_text({"quantity_counting"})
COUNT_TEXT = situation_text({"quantity_counting", "text_rendering"})


def key(trigger, summary="Draw <name> above three stars"):
    return {"trigger": trigger, "source_prompt_summary": summary}


# ---------------------------------------------------------------------------
# Situations read from text
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, needs", [
    ("Draw exactly three gold stars above a red circle", {"spatial_layout", "quantity_counting", "attribute_binding"}),
    ('Paint a knight, with a banner that says "GO TEAM"', {"anatomy_body_coherence", "text_rendering"}),
    ("Show the crest of the 2031 Falcon Shield winner, at dusk", {"entity", "lookup", "aesthetic_drawing"}),
    ("Create an image of the Iron Steps, like an old arcade game", {"entity", "creative_drawing"}),  # "Iron" is a name
    ("Draw a glass purple cube, under a gray sky", {"physical_material_consistency", "aesthetic_drawing"}),
    ("A watercolor of two cats on a shelf", {"quantity_counting", "anatomy_body_coherence", "creative_drawing"}),
    ("Draw a blue circle", set()),
])
def test_a_situation_is_read_from_the_text_alone(text, needs):
    assert request_needs(text) == needs
    line = CueDescriber().describe(text)
    assert line == situation_text(needs) and line.startswith("Situation: ")
    assert not any(n in line.lower() for n in entity_names(text))  # no name of the request reaches the key


def test_situation_lines_are_canonical_and_their_clauses_come_back():
    assert situation_text({"text_rendering", "quantity_counting"}) == situation_text(["quantity_counting", "text_rendering"])
    assert clauses(COUNT_TEXT) == [NEEDS["quantity_counting"], NEEDS["text_rendering"]]
    assert clauses("situation:  two things ; and text\n") == ["two things", "and text"]
    assert clauses("") == clauses(situation_text(set()))
    with pytest.raises(ValueError, match="unknown needs"):
        situation_text({"mood"})


def test_the_source_prompt_summary_drops_names_years_and_quoted_text():
    s = summarise_request('Paint the crest of Vairia United below the 2031 Granite Shield winner, with a banner that says "GO TEAM"')
    assert s == "Paint the crest of <name> below the <year> <name> winner, with a banner that says <text>"
    assert summarise_request("Draw a red circle") == "Draw a red circle"


def test_a_key_that_names_an_entity_of_the_request_is_refused():
    req = "Draw the flag of Divia above three stars"
    assert checked_key("Situation: a named entity", "Draw <name>", req).trigger == "Situation: a named entity"
    with pytest.raises(SummaryError, match="names divia"):
        checked_key("Situation: the flag of Divia", "x", req)
    with pytest.raises(SummaryError, match="source_prompt_summary names divia"):
        checked_key("Situation: a named entity", "Draw the flag of Divia", req)
    with pytest.raises(SummaryError, match="trigger is empty"):
        checked_key("  ", "x", req)
    answer = json.dumps(SLOTS_OK | key("Situation: the flag of Divia"))
    with pytest.raises(SummaryError, match="names divia"):
        parse_summary(answer, req)
    with pytest.raises(SummaryError, match="trigger must be text"):
        parse_summary(json.dumps(SLOTS_OK | {"trigger": 3}), req)


# ---------------------------------------------------------------------------
# Retrieval by situation
# ---------------------------------------------------------------------------


def test_the_situation_key_meets_requests_with_the_same_needs_whatever_they_name(tmp_path):
    sit, raw = ExperienceBank(tmp_path, embedder=HashEmbedder(256)), ExperienceBank(tmp_path, embedder=HashEmbedder(256), key="request")
    assert sit.gate == default_gate("situation") == 0.90 and raw.gate == default_gate("request") == 0.84
    counted = sit.add("r1", "Draw the flag of Divia above exactly three gold stars", SLOTS_OK,
                      retrieval_key=key(situation_text({"entity", "spatial_layout", "quantity_counting"})))
    sit.add("r2", "Paint the flag of Brezia at dusk", SLOTS_OK, retrieval_key=key(situation_text({"entity", "aesthetic_drawing"})))
    new = "Show the crest of Kavel Rovers below five pink squares"  # other entity, same needs as r1's experience
    exp, score = sit.retrieve(new)
    assert exp.id == counted.id and score == pytest.approx(1.0, abs=1e-5)
    raw_hit = ExperienceBank(tmp_path, embedder=HashEmbedder(256), key="request").search(new, 2)
    assert raw_hit[0][0] < 0.9  # by raw text it is far from every experience
    assert sit.key_text(counted) == counted.retrieval_key.trigger and raw.key_text(counted) == counted.source_request
    assert sit.query_text(new) == CueDescriber().describe(new) and raw.query_text(new) == new


def test_an_experience_without_a_key_is_indexed_by_its_source_requests_situation(tmp_path):
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(256))
    old = bank.add("r1", "Draw exactly three gold stars", SLOTS_OK)  # made before retrieval keys
    assert old.retrieval_key is None and bank.key_text(old) == situation_text({"quantity_counting"})
    assert bank.retrieve("Show five pink squares")[0].id == old.id


def test_a_situation_is_a_set_of_clauses_so_each_need_counts_alike(tmp_path):
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(512))
    v = bank._vector
    a, b = v(situation_text({"quantity_counting", "text_rendering"})), v(situation_text({"text_rendering", "quantity_counting"}))
    assert float(a @ b) == pytest.approx(1.0, abs=1e-6)
    one_off = float(v(situation_text({"entity", "lookup", "spatial_layout"})) @ v(situation_text({"entity", "lookup"})))
    assert 0.6 < one_off < 0.95  # one need of three differs: clearly below an exact match


# ---------------------------------------------------------------------------
# Leave-own-out and the one rule
# ---------------------------------------------------------------------------


def test_leave_own_out_never_retrieves_an_experience_the_request_is_a_source_of(tmp_path):
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(256))
    bank.add("r1", "Draw exactly three gold stars", SLOTS_OK, retrieval_key=key(COUNT))
    bank.add("r2", "Show four red squares", SLOTS_OK, retrieval_key=key(COUNT))
    other = bank.add("r3", 'Paint two blue circles, with a banner that says "HI"', SLOTS_OK, retrieval_key=key(COUNT_TEXT))
    (merged,) = bank.consolidate()  # r1 and r2 now live in one experience
    assert merged.sources() == {"r1", "r2"}
    for own in ("r1", "r2"):  # neither source retrieves the merged experience: the next one is another request's
        (e, s), = bank.nearest(["Draw exactly three gold stars"], [own])
        assert e.id == other.id and s < 1.0
    (e, s), = bank.nearest(["Draw exactly three gold stars"], ["r3"])
    assert e.id == merged.id and s == pytest.approx(1.0, abs=1e-5)
    assert bank.nearest(["Draw exactly three gold stars"], ["r9"])[0][0].id == merged.id


def test_exact_ties_go_to_more_evidence_then_to_the_newest_and_the_probe_reads_what_the_update_reads(tmp_path):
    from genevolve.records.schema import Request
    from genevolve.training.probe import teacher_experience

    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(256))
    first = bank.add("r1", "Draw exactly three gold stars", SLOTS_OK, retrieval_key=key(COUNT))
    second = bank.add("r1", "Draw exactly three gold stars", SLOTS_OK | {"search_strategy": "Search nothing."},
                      retrieval_key=key(COUNT + " "))  # the same trigger, mined again from the same request
    req = Request(id="r1", text="Draw exactly three gold stars")
    got, score = bank.retrieve(req.text)
    assert got.id == second.id  # FAISS alone would give the older row
    exp, sim, how = teacher_experience(bank, req)
    assert (exp.id, sim, how) == (got.id, score, "own")
    third = bank.add("r2", "Show four red squares", SLOTS_OK, retrieval_key=key(COUNT))
    assert bank.retrieve(req.text)[0].id == third.id
    assert teacher_experience(bank, req)[2] == "nearest"
    bank.items[first.id].evidence = 5  # more evidence beats recency
    assert bank.retrieve(req.text)[0].id == first.id


# ---------------------------------------------------------------------------
# Consolidation
# ---------------------------------------------------------------------------


def test_consolidation_merges_one_trigger_keeps_provenance_and_drops_the_contradicted_lesson(tmp_path):
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(256))
    a = bank.add("r1", "Draw exactly three gold stars", SLOTS_OK | {"skill_activation": "Query quantity_counting."},
                 reward_gap=0.5, retrieval_key=key(COUNT), run_id="run", step=1)
    b = bank.add("r2", "Show four red squares", SLOTS_OK | {"skill_activation": "Query quantity_counting."},
                 reward_gap=0.3, retrieval_key=key("  situation: A GROUP of objects with an exact count. "), step=2)
    c = bank.add("r3", "Paint five teal crosses", SLOTS_OK | {"skill_activation": "No skill is needed."},
                 reward_gap=0.9, retrieval_key=key(COUNT), step=3)
    lone = bank.add("r4", "Draw a knight", SLOTS_OK, retrieval_key=key(situation_text({"anatomy_body_coherence"})))
    (m,) = bank.consolidate()
    assert len(bank) == 2 and set(bank.items) == {m.id, lone.id} and m.id == a.id  # the oldest of the best-supported
    assert m.slots["skill_activation"] == "Query quantity_counting."  # evidence 2 beats evidence 1 (despite its 0.9 gap)
    assert "dropped" in m.note and "'No skill is needed.' (evidence 1)" in m.note and "consolidated 3" in m.note
    assert m.evidence == 3 and m.reward_gap == 0.9 and m.version == 2 and m.sources() == {"r1", "r2", "r3"}
    assert [(x.id, x.version, x.source_request_id, x.step) for x in m.merged_from] == [(b.id, 1, "r2", 2), (c.id, 1, "r3", 3)]
    assert m.merged_from[1].slots["skill_activation"] == "No skill is needed."
    assert m.history[-1].version == 1 and m.history[-1].slots == a.slots and m.step == 1
    assert list(bank.items) == [lone.id, m.id]  # the merged experience is the newest
    assert bank.locate(c.id) == (m, m.merged_from[1]) and bank.locate(a.id) == (m, None) and bank.locate("exp-x") is None

    again = ExperienceBank(tmp_path, embedder=HashEmbedder(256))  # persisted
    assert again.get(m.id).model_dump() == m.model_dump() and not again.consolidate()  # nothing left to merge

    # A later experience joins with evidence 1: the merged one (evidence 3) keeps its lessons, and its provenance grows.
    d = again.add("r5", "Draw six gold stars", SLOTS_OK | {"skill_activation": "No skill is needed."}, reward_gap=1.0,
                  retrieval_key=key(COUNT))
    (m2,) = again.consolidate()
    assert m2.id == m.id and m2.evidence == 4 and m2.version == 3
    assert m2.slots["skill_activation"] == "Query quantity_counting."
    assert [x.id for x in m2.merged_from] == [b.id, c.id, d.id] and m2.sources() == {"r1", "r2", "r3", "r5"}


def test_a_tie_in_evidence_goes_to_the_larger_summed_gap_and_an_edit_of_the_key_is_a_version(tmp_path):
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(256))
    bank.add("r1", "x", SLOTS_OK | {"reference_selection": "Keep the official one."}, reward_gap=0.3, retrieval_key=key(COUNT))
    bank.add("r2", "y", SLOTS_OK | {"reference_selection": "No reference image is needed."}, reward_gap=0.6,
             retrieval_key=key(COUNT))
    (m,) = bank.consolidate()
    assert m.slots["reference_selection"] == "No reference image is needed." and "'Keep the official one.' (evidence 1)" in m.note
    edited = bank.edit(m.id, {}, note="wider", retrieval_key=key(COUNT_TEXT, "Draw <text>"))
    assert edited.version == m.version and edited.retrieval_key.trigger == COUNT_TEXT
    assert edited.history[-1].retrieval_key.trigger == COUNT and edited.note == "wider"
    assert bank.edit(m.id, {}, retrieval_key=key(COUNT_TEXT, "Draw <text>")).version == edited.version  # no change
    with pytest.raises(ExperienceError, match="trigger is empty"):
        bank.edit(m.id, {}, retrieval_key=key(" "))


def test_the_consolidate_command(tmp_path):
    bank = ExperienceBank(tmp_path / "bank", embedder=HashEmbedder(64))
    for i in range(3):
        bank.add(f"r{i}", f"request {i}", SLOTS_OK, retrieval_key=key(COUNT))
    res = CliRunner().invoke(app, ["experiences", "consolidate", str(tmp_path / "bank")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1]) == {"before": 3, "after": 1, "merged": 1}
    res = CliRunner().invoke(app, ["experiences", "consolidate", str(tmp_path / "nothing")])
    assert res.exit_code != 0 and "holds no experience bank" in " ".join(res.output.replace("│", " ").split())


# ---------------------------------------------------------------------------
# Retrieval never reads the hidden labels
# ---------------------------------------------------------------------------


class TextOnly:
    """A request that only has an id and a text: reading anything else (category, skills, scene, ground truth) fails."""

    def __init__(self, r):
        self.__dict__.update(id=r.id, text=r.text)

    def __getattr__(self, name):
        raise AssertionError(f"retrieval read the request's hidden field {name!r}")


def test_retrieval_reads_only_the_request_text_and_id(tmp_path, world):
    bank = ExperienceBank(tmp_path / "bank")
    for r in world.split("evolve")[:12]:
        bank.add(r.id, r.text, SLOTS_OK, retrieval_key=key(CueDescriber().describe(r.text)))
    reqs = world.split("evolve")[:6] + world.split("bench")[:6]
    plain, _ = request_guides(f"bank:{tmp_path / 'bank'}", world, reqs, leave_own_out=True)
    hidden, info = request_guides(f"bank:{tmp_path / 'bank'}", world, [TextOnly(r) for r in reqs], leave_own_out=True)
    assert hidden == plain and info["key"] == "situation"
    # Scrambled labels change nothing either: the same guides, the same similarities.
    scrambled = [r.model_copy(update={"category": "flag", "skills": [], "scene": None, "gt_image": None}) for r in reqs]
    again, info2 = request_guides(f"bank:{tmp_path / 'bank'}", world, scrambled, leave_own_out=True)
    assert again == plain and info2["per_request"] == info["per_request"]
    for row in info["per_request"]:
        assert row["request"] not in row["sources"]


def test_an_llm_describer_asks_a_versioned_prompt_and_keeps_one_situation_line(tmp_path):
    from genevolve.experience.situation import LLMDescriber
    from genevolve.policies.base import Completion

    class Chat:
        name = "fake"

        def __init__(self, text, reason="stop"):
            self.text, self.reason, self.asked = text, reason, []

        def generate(self, conversations, params):
            self.asked.append(conversations[0][0]["content"])
            return [Completion(text=self.text, finish_reason=self.reason, error="down" if self.reason == "error" else None)]

    chat = Chat("\nSituation: a group of objects with an exact count; text to render on the image\nMore talk.")
    d = LLMDescriber(chat)
    assert d.name == "llm-situation-v1:fake" and "separated by semicolons" in LLMDescriber.PROMPT
    assert d.describe("Draw three stars") == "Situation: a group of objects with an exact count; text to render on the image"
    assert "Request: Draw three stars" in chat.asked[0]
    assert LLMDescriber(Chat("a lighting mood")).describe("x") == "Situation: a lighting mood"
    with pytest.raises(RuntimeError, match="describer call failed: down"):
        LLMDescriber(Chat("", "error")).describe("x")
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(256), describer=LLMDescriber(Chat("Situation: a lighting mood")))
    lit = bank.add("r1", "Paint a dog at dusk", SLOTS_OK, retrieval_key=key("Situation: a lighting mood"))
    assert bank.retrieve("anything at all") == (lit, pytest.approx(1.0, abs=1e-5))


def test_an_earlier_version_is_restored_as_a_new_one(tmp_path):
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(64))
    e = bank.add("r1", "x", SLOTS_OK, retrieval_key=key(COUNT))
    bank.edit(e.id, {"skill_activation": "Query nothing."}, note="narrowed", retrieval_key=key(COUNT_TEXT))
    back = bank.restore(e.id, 1)
    assert back.version == 3 and back.slots == SLOTS_OK and back.retrieval_key.trigger == COUNT
    assert back.note == "restored version 1" and [h.version for h in back.history] == [1, 2]
    assert bank.restore(e.id, 3).version == 3 and bank.restore(e.id, 1).version == 3  # already current: no version
    with pytest.raises(KeyError, match="no version 9"):
        bank.restore(e.id, 9)
    legacy = bank.add("r2", "y", SLOTS_OK)  # made before keys: restoring its first version takes the key away again
    bank.edit(legacy.id, {}, retrieval_key=key(COUNT))
    assert bank.restore(legacy.id, 1).retrieval_key is None
