"""Pair mining, evidence, slot validation and the bank, against hand-worked cases (DESIGN.md section 1)."""

from __future__ import annotations

import pytest

from genevolve.agent.guides import SLOTS
from genevolve.experience.bank import (
    ExperienceBank,
    ExperienceError,
    Pair,
    evidence,
    guide_text,
    mine_pairs,
    validate_slots,
)
from genevolve.records.schema import ImageRef, Observation, Program, ProgramRef, ToolCall, Trajectory, Turn, Verdict
from genevolve.tools.embed import HashEmbedder

SLOTS_OK = {s: f"Do the {s.replace('_', ' ')} right." for s in SLOTS}
REQ = "Draw the Aurora Cup flag above a teal horse"


def _v(tid, reward, failed=None):
    return Verdict(trajectory_id=tid, request_id="r", reward=reward, failed=failed)


def _t(tid, calls=(), refs=(), termination="answer", request=REQ, program=True):
    """A trajectory whose turns are ``calls``: (tool, argument, observation text or None, shown image ids)."""
    turns = []
    for i, (tool, arg, text, shown) in enumerate(calls):
        args = {"queries": [arg]} if tool == "search" else {"query": arg} if tool == "image_search" else {"skill_name": arg}
        obs = None if text is None else Observation(tool=tool, text=text, images=[ImageRef(img_id=s) for s in shown])
        turns.append(Turn(index=i, raw="", tool_call=ToolCall(name=tool, arguments=args), observation=obs))
    prog = Program(gen_prompt="p", reference_images=[ProgramRef(img_id=r) for r in refs]) if program else None
    return Trajectory(id=tid, request_id="r", request_text=request, turns=turns, program=prog, termination=termination)


def test_the_gap_threshold_is_inclusive_at_its_default():
    assert 0.5 - 0.3 == 0.2  # the premise: this gap is exactly the default delta_min
    (pair,) = mine_pairs([[(_t("b"), _v("b", 0.5)), (_t("w"), _v("w", 0.3))]])
    assert (pair.best.id, pair.worst.id, pair.gap) == ("b", "w", 0.5 - 0.3)
    assert mine_pairs([[(_t("b"), _v("b", 0.5)), (_t("w"), _v("w", 0.30000000000000004))]]) == []  # just below
    assert mine_pairs([[(_t("b"), _v("b", 0.5)), (_t("w"), _v("w", 0.3))]], delta_min=0.21) == []


def test_at_most_eight_pairs_by_default_largest_gaps_first():
    gaps = [0.3, 0.9, 0.5, 0.25, 0.8, 0.6, 0.4, 0.7, 0.35, 0.45]
    groups = [[(_t(f"b{i}"), _v(f"b{i}", 1.0)), (_t(f"w{i}"), _v(f"w{i}", 1.0 - g))] for i, g in enumerate(gaps)]
    pairs = mine_pairs(groups)
    want = sorted(range(len(gaps)), key=lambda i: -gaps[i])[:8]
    assert [p.best.id for p in pairs] == [f"b{i}" for i in want]
    assert [p.request_id for p in pairs] == ["r"] * 8 and pairs[0].request_text == REQ
    assert len(mine_pairs(groups, max_pairs=3)) == 3


def test_best_ties_go_to_the_earlier_one_and_the_worst_is_the_lowest():
    group = [(_t("a"), _v("a", 0.7)), (_t("b"), _v("b", 0.9)), (_t("c"), _v("c", 0.9)), (_t("d"), _v("d", 0.1)),
             (_t("e"), _v("e", 0.4))]
    (pair,) = mine_pairs([group])
    assert (pair.best.id, pair.worst.id, pair.passed_over) == ("b", "d", 0)
    assert pair.best_verdict.reward == 0.9 and pair.worst_verdict.reward == 0.1


def test_groups_too_small_or_all_equal_or_unjudged_give_nothing():
    assert mine_pairs([[(_t("a"), _v("a", 0.9))]]) == []
    assert mine_pairs([[(_t("a"), _v("a", 0.9)), (_t("b"), _v("b", None))]]) == []
    assert mine_pairs([[(_t("a"), _v("a", 0.5)), (_t("b"), _v("b", 0.5))]]) == []  # the best cannot be its own worst
    assert mine_pairs([]) == []


def test_a_worst_that_failed_the_protocol_or_was_flagged_gives_no_pair():
    for worst in (_t("w", termination="no_answer", program=False), _t("w", termination="max_rounds_reached"),
                  _t("w", program=False)):
        assert mine_pairs([[(_t("b"), _v("b", 0.9)), (worst, _v("w", 0.0))]]) == []
    assert mine_pairs([[(_t("b"), _v("b", 0.9)), (_t("w"), _v("w", 0.0, failed="no program (x)"))]]) == []


def test_among_equally_bad_the_worst_with_an_answer_is_preferred():
    bad_protocol = _t("p", termination="no_answer", program=False)
    answered = _t("q")
    for order in ([bad_protocol, answered], [answered, bad_protocol]):
        group = [(_t("b"), _v("b", 0.9))] + [(tr, _v(tr.id, 0.1)) for tr in order]
        assert mine_pairs([group])[0].worst.id == "q"
    flagged = _t("f")
    group = [(_t("b"), _v("b", 0.9)), (flagged, _v("f", 0.1, failed="something")), (answered, _v("q", 0.1))]
    assert mine_pairs([group])[0].worst.id == "q"


def test_mining_skips_a_guessing_best_and_counts_who_it_passed_over():
    guess = _t("g", [("image_search", "flag of Brezia", "IMG_001 Brezia", ["IMG_001"])], refs=["IMG_001"])
    guess2 = _t("g2", [("image_search", "flag of Veloria", "IMG_001 Veloria", ["IMG_001"])], refs=["IMG_001"])
    sound = _t("s", [("search", "who won the Aurora Cup", "Veloria won the Aurora Cup.", []),
                     ("image_search", "flag of Veloria", "IMG_001 Veloria", ["IMG_001"])], refs=["IMG_001"])
    group = [(guess, _v("g", 1.0)), (guess2, _v("g2", 0.95)), (sound, _v("s", 0.9)), (_t("w"), _v("w", 0.1))]
    (pair,) = mine_pairs([group])
    assert (pair.best.id, pair.passed_over) == ("s", 2)
    equal = [(guess, _v("g", 0.9)), (sound, _v("s", 0.9)), (_t("w"), _v("w", 0.1))]
    assert mine_pairs([equal])[0].passed_over == 0  # a guess with the same reward was not passed over


def test_evidence_counts_only_answered_calls_and_reads_names_after_the_first_word():
    traj = _t("x", [
        ("search", "Aurora Cup winner", "The cup went to Veloria; see Tarnis.", []),
        ("search", "unanswered", None, []),
        ("image_search", "Veloria flag Official", "IMG_001 flag", ["IMG_001"]),  # Official: a guess after word one
        ("image_search", "Brezia flag", "IMG_002", ["IMG_002"]),  # first word: never read as a name
        ("image_search", "  flag of Tarnis and Quorra Quorra", "IMG_003", ["IMG_003"]),
        ("image_search", "never answered Zed Zedland", None, []),
        ("query_knowledge", "spatial_layout", "card", []),
    ], refs=["IMG_001", "IMG_003", "IMG_009"])
    e = evidence(traj)
    assert (e.fact_searches, e.image_searches) == (1, 3)
    assert e.guessed_names == ("Official", "Quorra")  # each name once, in order
    assert e.references == ("IMG_001", "IMG_003", "IMG_009") and e.unseen_references == ("IMG_009",)
    assert not e.grounded
    assert evidence(_t("y", [("image_search", "the Aurora flag", "IMG_001", ["IMG_001"])], refs=["IMG_001"])).grounded
    assert evidence(_t("z", program=False)).references == ()


def test_evidence_short_capitalised_words_are_not_names():
    e = evidence(_t("x", [("image_search", "flag of Ab Xy", "IMG_001", ["IMG_001"])], refs=["IMG_001"]))
    assert e.guessed_names == ()  # a name has at least three letters
    e = evidence(_t("x", [("image_search", "flag of Abc", "IMG_001", ["IMG_001"])], refs=["IMG_001"]))
    assert e.guessed_names == ("Abc",)


def test_pair_gap_is_best_minus_worst():
    p = Pair("r", "t", _t("b"), _t("w"), _v("b", 0.75), _v("w", 0.25))
    assert p.gap == 0.5 and p.passed_over == 0


def test_validate_slots_normalises_spaces_and_checks_every_bound():
    out = validate_slots({**SLOTS_OK, "search_strategy": "  Search\n the   name. "})
    assert out["search_strategy"] == "Search the name." and list(out) == list(SLOTS)
    assert validate_slots({**SLOTS_OK, "search_strategy": "x" * 400})["search_strategy"] == "x" * 400
    cases = [({**SLOTS_OK, "search_strategy": "x" * 401}, "slot search_strategy has 401 characters (at most 400)"),
             ({**SLOTS_OK, "skill_activation": " \n "}, "slot skill_activation is empty"),
             ({k: v for k, v in SLOTS_OK.items() if k != "failure_avoidance"}, "slot failure_avoidance is empty"),
             ({**SLOTS_OK, "reference_selection": 3}, "slot reference_selection must be text"),
             ({**SLOTS_OK, "zeta": "x", "alpha": "y"}, "unknown slots ['alpha', 'zeta']; slots are " + ", ".join(SLOTS)),
             (["not", "a", "dict"], "slots must be an object with the five slot names")]
    for slots, msg in cases:
        with pytest.raises(ExperienceError) as err:
            validate_slots(slots)
        assert str(err.value) == msg


def test_guide_text_lists_the_slots():
    text = guide_text(type("E", (), {"slots": SLOTS_OK})())
    assert all(v in text for v in SLOTS_OK.values())


def _evict_oracle(gaps: list[float], capacity: int) -> list[int]:
    """Indices kept after adding ``gaps`` in order: over capacity, drop the smallest gap among the oldest
    max(2, n // 4) (the first such on ties)."""
    kept: list[int] = []
    for i in range(len(gaps)):
        kept.append(i)
        while len(kept) > capacity:
            oldest = kept[: max(2, len(kept) // 4)]
            kept.remove(min(oldest, key=lambda j: gaps[j]))
    return kept


@pytest.mark.parametrize("capacity,gaps", [(3, [0.5, 0.4, 0.9, 0.1, 0.3, 0.2]),
                                           (8, [0.9, 0.8, 0.1, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3, 0.2, 0.05, 0.15])])
def test_capacity_evicts_the_smallest_gap_among_the_oldest_quarter(tmp_path, capacity, gaps):
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(32), capacity=capacity, key="request")
    made = [bank.add(f"r{i}", f"request {i}", SLOTS_OK, reward_gap=g) for i, g in enumerate(gaps)]
    assert list(bank.items) == [made[i].id for i in _evict_oracle(gaps, capacity)]
    assert made[-1].reward_gap == gaps[-1] and isinstance(made[-1].reward_gap, float)


def test_retrieve_applies_the_gate_inclusively(tmp_path):
    emb = HashEmbedder(64)
    bank = ExperienceBank(tmp_path, embedder=emb, key="request")
    assert bank.retrieve("anything") == (None, 0.0) and bank.search("anything") == []
    exp = bank.add("r1", "three gold stars above a red circle", SLOTS_OK)
    score = bank.search("three gold stars above a blue circle", 1)[0][0]
    assert 0 < score < 1
    for gate, hit in ((score - 1e-6, True), (score, True), (score + 1e-6, False)):
        got, s = ExperienceBank(tmp_path, embedder=emb, gate=gate, key="request").retrieve("three gold stars above a blue circle")
        assert (got is not None and got.id == exp.id) == hit and s == pytest.approx(score)
    assert ExperienceBank(tmp_path, embedder=emb, key="request").gate == 0.84 and bank.capacity == 500


def test_search_ranks_by_cosine_and_nearest_skips_the_own_request(tmp_path):
    emb = HashEmbedder(64)
    bank = ExperienceBank(tmp_path, embedder=emb, key="request")
    texts = ["a red circle", "a red circle and a blue square", "a green horse at night"]
    exps = [bank.add(f"r{i}", t, SLOTS_OK) for i, t in enumerate(texts)]
    bank.add("r0", "a red circle", SLOTS_OK)  # the same request mined again
    hits = bank.search("a red circle", k=10)
    assert len(hits) == 4 and [s for s, _ in hits] == sorted((s for s, _ in hits), reverse=True)
    assert len(bank.search("a red circle", k=2)) == 2
    (e, s), = bank.nearest(["a red circle"], exclude_sources=["r0"])
    assert e.id == exps[1].id and s == pytest.approx(hits[2][0])
    assert bank.nearest(["a red circle", "x"])[0][0].source_request_id == "r0"
    assert bank.nearest([]) == []
    with pytest.raises(ValueError, match="one entry per text"):
        bank.nearest(["a", "b"], exclude_sources=["r0"])
    only = ExperienceBank(tmp_path / "one", embedder=emb, key="request")
    only.add("r0", "a red circle", SLOTS_OK)
    assert only.nearest(["a red circle"], exclude_sources=["r0"]) == [(None, None)]


def test_edit_makes_one_version_per_change_and_delete_removes(tmp_path):
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(32), key="request")
    exp = bank.add("r1", "one", SLOTS_OK, reward_gap=0.4, run_id="run-1", step=3)
    assert (exp.version, exp.run_id, exp.step, exp.source_request_id) == (1, "run-1", 3, "r1")
    same = bank.edit(exp.id, {"search_strategy": SLOTS_OK["search_strategy"] + "  "})
    assert same.version == 1 and not same.history
    new = bank.edit(exp.id, {"search_strategy": "Search first."}, note="n1")
    assert (new.version, new.note, new.history[0].version, new.history[0].slots) == (2, "n1", 1, SLOTS_OK)
    new = bank.edit(exp.id, {"skill_activation": "Query spatial_layout."}, note="n2")
    assert new.version == 3 and [h.note for h in new.history] == ["", "n1"]
    with pytest.raises(ExperienceError):
        bank.edit(exp.id, {"bogus": "x"})
    bank.delete(exp.id)
    assert len(bank) == 0 and len(ExperienceBank(tmp_path, embedder=HashEmbedder(32), key="request")) == 0
    with pytest.raises(KeyError):
        bank.get(exp.id)


def _gathering(tid, facts, images, refs=("IMG_001",)):
    calls = [("search", "Aurora Cup winner", "Veloria won.", [])] * facts + \
            [("image_search", "flag of the winner", "IMG_001", ["IMG_001"])] * images
    return _t(tid, calls, refs=list(refs))


def test_a_worst_that_gathered_differently_means_different_kinds_of_search():
    best = _gathering("b", 1, 1)
    many = _gathering("many", 2, 2)  # more searches of both kinds: gathered the same way as the best
    for other in (_gathering("nofacts", 0, 1), _gathering("noimages", 1, 0)):
        for order in ([many, other], [other, many]):
            group = [(best, _v("b", 0.9))] + [(tr, _v(tr.id, 0.1)) for tr in order]
            assert mine_pairs([group])[0].worst.id == other.id


def test_an_unfinished_worst_with_a_program_is_still_passed_over_for_an_answer():
    best = _gathering("b", 1, 1)
    unfinished = _gathering("u", 0, 0).model_copy(update={"termination": "max_rounds_reached"})
    answered = _gathering("a", 1, 1)
    for order in ([unfinished, answered], [answered, unfinished]):
        group = [(best, _v("b", 0.9))] + [(tr, _v(tr.id, 0.1)) for tr in order]
        assert mine_pairs([group])[0].worst.id == "a"


def test_skipped_groups_do_not_stop_the_mining_of_later_groups():
    guess = _t("g", [("image_search", "flag of Brezia", "IMG_001", ["IMG_001"])], refs=["IMG_001"])
    later = [(_t("b"), _v("b", 0.9)), (_t("w"), _v("w", 0.1))]
    for first in ([(_t("x"), _v("x", 0.9))],  # too small
                  [(guess, _v("g", 0.9)), (guess, _v("g", 0.1))],  # nothing grounded
                  [(guess, _v("g", 0.9)), (_t("s"), _v("s", 0.1))]):  # the grounded best is the only lowest
        assert [p.best.id for p in mine_pairs([first, later])] == ["b"]


def test_with_no_threshold_the_best_is_never_its_own_worst():
    guess = _t("g", [("image_search", "flag of Brezia", "IMG_001", ["IMG_001"])], refs=["IMG_001"])
    assert mine_pairs([[(guess, _v("g", 0.9)), (_t("s"), _v("s", 0.5))]], delta_min=0.0) == []
    (pair,) = mine_pairs([[(_t("s"), _v("s", 0.5)), (_t("t"), _v("t", 0.5))]], delta_min=0.0)
    assert (pair.best.id, pair.worst.id, pair.gap) == ("s", "t", 0.0)


def test_evidence_counts_every_fact_search_and_a_name_right_after_a_bracket():
    e = evidence(_t("x", [("search", "a", "x", []), ("search", "b", "y", []), ("search", "c", "z", []),
                          ("image_search", "(Veloria flag)", "IMG_001", ["IMG_001"])], refs=["IMG_001"]))
    assert e.fact_searches == 3 and e.guessed_names == ("Veloria",)


def test_the_bank_uses_its_embedder_and_stamps_new_experiences(tmp_path):
    import re

    emb = HashEmbedder(32)
    bank = ExperienceBank(tmp_path, embedder=emb, key="request")
    assert bank.embedder is emb and bank.load_errors == []
    exp = bank.add("r1", "one", SLOTS_OK)
    assert re.fullmatch(r"exp-[0-9a-f]{10}", exp.id) and exp.reward_gap == 0.0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", exp.created)  # UTC, to the second
    same = bank.edit(exp.id, {"search_strategy": "Search first."})
    assert same.note == ""


def test_the_index_file_is_written_by_changes_only_and_names_its_embedder(tmp_path):
    from genevolve.tools.faiss_store import VectorIndex

    emb = HashEmbedder(32)
    bank = ExperienceBank(tmp_path, embedder=emb, key="request")
    bank.add("r1", "one", SLOTS_OK)
    bank.add("r2", "two", SLOTS_OK)
    index = VectorIndex.load(tmp_path / "experiences.faiss")
    assert len(index) == 2 and index.embedder == "hash-32"
    (tmp_path / "experiences.faiss").unlink()
    assert ExperienceBank(tmp_path, embedder=emb, key="request").search("one", 1)[0][1].source_request_id == "r1"
    assert not (tmp_path / "experiences.faiss").exists()  # a reader writes nothing


def test_a_reader_sees_what_another_bank_object_wrote_since(tmp_path):
    emb = HashEmbedder(32)
    writer, reader = ExperienceBank(tmp_path, embedder=emb, key="request"), ExperienceBank(tmp_path, embedder=emb, key="request")
    writer.add("r1", "three gold stars", SLOTS_OK)
    assert [e.source_request_id for _, e in reader.search("three gold stars", 5)] == ["r1"]
    writer.add("r2", "a teal horse at dusk", SLOTS_OK)
    assert reader.search("a teal horse at dusk", 1)[0][1].source_request_id == "r2"
    assert reader.nearest(["a teal horse at dusk"])[0][0].source_request_id == "r2"


def test_an_edit_compares_with_the_latest_slots_on_disk(tmp_path):
    emb = HashEmbedder(32)
    a = ExperienceBank(tmp_path, embedder=emb, key="request")
    exp = a.add("r1", "one", SLOTS_OK)
    b = ExperienceBank(tmp_path, embedder=emb, key="request")
    b.edit(exp.id, {"search_strategy": "Search twice."})
    back = a.edit(exp.id, {"search_strategy": SLOTS_OK["search_strategy"]}, note="undo")  # equal to a's stale copy
    assert back.version == 3 and back.note == "undo"
    assert ExperienceBank(tmp_path, embedder=emb, key="request").get(exp.id).slots["search_strategy"] == SLOTS_OK["search_strategy"]


def test_loading_skips_blank_lines_sets_broken_ones_aside_and_keeps_reading(tmp_path):
    emb = HashEmbedder(32)
    bank = ExperienceBank(tmp_path, embedder=emb, key="request")
    first, second = bank.add("r1", "one", SLOTS_OK), bank.add("r2", "two", SLOTS_OK)
    lines = bank.jsonl.read_text("utf-8").splitlines()
    bank.jsonl.write_text(lines[0] + "\n\n{broken\n" + lines[1] + "\n", "utf-8")
    again = ExperienceBank(tmp_path, embedder=emb, key="request")
    assert list(again.items) == [first.id, second.id]
    assert again.load_errors == [f"{again.jsonl}:3: 1 validation error for Experience"]
    again.add("r3", "three", SLOTS_OK)
    assert (tmp_path / "experiences.rejected.jsonl").read_text("utf-8") == "{broken\n"


def test_search_returns_five_by_default_and_nearest_can_return_the_first_experience(tmp_path):
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(32), key="request")
    made = [bank.add(f"r{i}", f"request number {i} with words", SLOTS_OK) for i in range(7)]
    assert len(bank.search("request number 3 with words")) == 5
    (e, s), = bank.nearest([made[0].source_request])
    assert e.id == made[0].id and s == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="^exclude_sources needs one entry per text$"):
        bank.nearest(["a"], exclude_sources=[])


def test_the_oldest_quarter_grows_with_the_bank(tmp_path):
    gaps = [0.9, 0.8, 0.1, 0.2] + [0.5] * 9  # capacity 12: the 13th addition weighs the 3 oldest (13 // 4)
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(16), capacity=12, key="request")
    made = [bank.add(f"r{i}", f"request {i}", SLOTS_OK, reward_gap=g) for i, g in enumerate(gaps)]
    assert made[2].id not in bank.items and made[3].id in bank.items and len(bank) == 12
    assert list(bank.items) == [made[i].id for i in _evict_oracle(gaps, 12)]


def test_ids_differ_for_different_slots_added_in_the_same_second_at_capacity(tmp_path):
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(16), capacity=2, key="request")
    ids = [bank.add("r1", "one", {**SLOTS_OK, "search_strategy": f"Search {i}."}).id for i in range(4)]
    assert len(set(ids)) == 4


def test_an_embedder_without_a_name_leaves_the_index_unnamed(tmp_path):
    from genevolve.tools.faiss_store import VectorIndex

    class Nameless:
        dim = 16

        def encode(self, texts):
            return HashEmbedder(16).encode(texts)

    bank = ExperienceBank(tmp_path, embedder=Nameless(), key="request")
    bank.add("r1", "one", SLOTS_OK)
    assert VectorIndex.load(tmp_path / "experiences.faiss").embedder == ""
    assert bank.search("one", 1)[0][1].source_request_id == "r1"
