"""Pair mining, summarisers and the experience bank."""

from __future__ import annotations

import json

import pytest

from genevolve.agent.loop import run_to_end
from genevolve.tools.embed import HashEmbedder
from genevolve.evaluation.bench import SandboxScorer
from genevolve.experience.bank import ExperienceBank, ExperienceError, evidence, mine_pairs, validate_slots
from genevolve.agent.guides import SLOTS
from genevolve.policies.base import Completion
from genevolve.records.schema import ImageStore, Trajectory, Verdict
from genevolve.experience.summarise import LLMSummariser, SandboxSummariser, SummaryError, parse_summary
from genevolve.agent.expert import ExpertNoise, ExpertPolicy

SLOTS_OK = {s: f"Do the {s.replace('_', ' ')} right." for s in SLOTS}


def v(tid, reward, failed=None):
    return Verdict(trajectory_id=tid, request_id="r", reward=reward, failed=failed)


def t(tid, termination="answer"):
    from genevolve.records.schema import Program

    return Trajectory(id=tid, request_id="r", request_text="x", termination=termination,
                      program=Program(gen_prompt="p") if termination == "answer" else None)


def test_mining_keeps_large_gaps_and_skips_protocol_failures():
    groups = [
        [(t("a1"), v("a1", 0.9)), (t("a2"), v("a2", 0.5)), (t("a3"), v("a3", 0.6))],  # gap 0.4
        [(t("b1"), v("b1", 0.7)), (t("b2"), v("b2", 0.6))],  # gap 0.1 < 0.2
        [(t("c1"), v("c1", 0.9)), (t("c2", "no_answer"), v("c2", 0.0, failed="no program"))],  # protocol failure
        [(t("d1"), v("d1", 1.0)), (t("d2"), v("d2", 0.3))],  # gap 0.7
    ]
    pairs = mine_pairs(groups)
    assert [(p.best.id, p.worst.id) for p in pairs] == [("d1", "d2"), ("a1", "a2")]
    assert mine_pairs(groups, max_pairs=1)[0].best.id == "d1"


def test_mining_leaves_out_unjudged_cases_and_the_threshold_is_inclusive():
    groups = [
        [(t("a1"), v("a1", None)), (t("a2"), v("a2", 0.5)), (t("a3"), v("a3", 0.75))],  # judged gap 0.25
        [(t("b1"), v("b1", None)), (t("b2"), v("b2", 0.6))],  # one judged case: nothing to compare
        [(t("c1"), v("c1", 0.75)), (t("c2"), v("c2", 0.5))],  # gap exactly 0.25: kept at delta_min 0.25
    ]
    pairs = mine_pairs(groups, delta_min=0.25)
    assert sorted((p.best.id, p.worst.id) for p in pairs) == [("a3", "a2"), ("c1", "c2")]


REQ = "Paint the flag of the 2035 Granite Shield winner above a teal horse"
FACT = "The 2035 Granite Shield was won by Vairia United, who play their home games in Divia."


def traced(tid, calls, refs=("IMG_001",)):
    """A trajectory whose turns are ``calls``: (tool, argument, observation text, image titles shown)."""
    from genevolve.records.schema import ImageRef, Observation, Program, ProgramRef, ToolCall, Turn

    turns, n = [], 0
    for i, (tool, arg, text, titles) in enumerate(calls):
        images = [ImageRef(img_id=f"IMG_{n + j + 1:03d}", title=title) for j, title in enumerate(titles)]
        n += len(titles)
        args = {"queries": [arg]} if tool == "search" else {"query": arg}
        turns.append(Turn(index=i, raw="", tool_call=ToolCall(name=tool, arguments=args),
                          observation=Observation(tool=tool, text=text, images=images)))
    program = Program(gen_prompt="the flag from the first reference image", reference_images=[ProgramRef(img_id=r) for r in refs])
    return Trajectory(id=tid, request_id="r", request_text=REQ, turns=turns, program=program)


def test_evidence_tells_a_searched_name_from_a_guessed_one():
    searched = traced("a", [("search", "2035 Granite Shield winner", FACT, []),
                            ("image_search", "official flag of Divia", "IMG_001: Official flag of Divia", ["Official flag of Divia"])])
    e = evidence(searched)
    assert e.grounded and e.fact_searches == 1 and e.image_searches == 1 and e.references == ("IMG_001",)
    guessed = traced("b", [("image_search", "official flag of Divia", "IMG_001: Official flag of Divia", ["Official flag of Divia"])])
    assert evidence(guessed).guessed_names == ("Divia",) and not evidence(guessed).grounded
    # A name the request gives is no guess, in any case; a query's first word is not read as a name.
    named = traced("c", [("image_search", "Granite shield teal", "IMG_001: x", ["x"]),
                         ("image_search", "Flag of the granite SHIELD", "IMG_002: y", ["y"])], refs=("IMG_002",))
    assert evidence(named).grounded
    # The name must come *before* the query: a result read afterwards does not ground it.
    late = traced("d", [("image_search", "official flag of Divia", "IMG_001: Official flag of Divia", ["Official flag of Divia"]),
                        ("search", "2035 Granite Shield winner", FACT, [])])
    assert evidence(late).guessed_names == ("Divia",)
    unseen = traced("e", [("search", "2035 Granite Shield winner", FACT, [])], refs=("IMG_004",))
    assert evidence(unseen).unseen_references == ("IMG_004",) and not evidence(unseen).grounded


def test_mining_passes_over_a_lucky_guess_for_the_best_grounded_trajectory():
    lucky = traced("lucky", [("image_search", "official flag of Divia", "IMG_001: Official flag of Divia", ["Official flag of Divia"])])
    sound = traced("sound", [("search", "2035 Granite Shield winner", FACT, []),
                             ("image_search", "official flag of Divia", "IMG_001: Official flag of Divia", ["Official flag of Divia"])])
    bad = traced("bad", [("search", "2035 Granite Shield winner", FACT, []),
                         ("image_search", "flag of Vairia", "IMG_001: Vairia", ["Vairia"])])
    group = [(lucky, v("lucky", 1.0)), (sound, v("sound", 0.8)), (bad, v("bad", 0.2))]
    (pair,) = mine_pairs([group])
    assert (pair.best.id, pair.worst.id, pair.passed_over) == ("sound", "bad", 1)
    assert pair.gap == pytest.approx(0.6)
    # When no grounded trajectory beats the worst by delta_min, the group gives no pair.
    assert mine_pairs([[(lucky, v("lucky", 1.0)), (sound, v("sound", 0.3)), (bad, v("bad", 0.2))]]) == []
    assert mine_pairs([[(lucky, v("lucky", 1.0)), (bad, v("bad", 0.2))]]) == []


def test_mining_prefers_a_worst_that_gathered_evidence_differently():
    sound = traced("sound", [("search", "2035 Granite Shield winner", FACT, []),
                             ("image_search", "official flag of Divia", "IMG_001: a", ["a"])])
    same = traced("same", [("search", "2035 Granite Shield winner", FACT, []),
                           ("image_search", "official flag of Divia", "IMG_001: a", ["a"])])
    other = traced("other", [("image_search", "flag of the winner", "IMG_001: a\nIMG_002: b", ["a", "b"])], refs=("IMG_002",))
    for order in ([same, other], [other, same]):
        group = [(sound, v("sound", 0.9))] + [(tr, v(tr.id, 0.1)) for tr in order]
        assert mine_pairs([group])[0].worst.id == "other"


def test_the_sandbox_lesson_follows_the_grounded_best_and_names_the_guess():
    from genevolve.experience.bank import Pair

    sound = traced("sound", [("search", "2035 Granite Shield winner", FACT, []),
                             ("image_search", "official flag of Divia", "IMG_001: Official flag of Divia", ["Official flag of Divia"])])
    guess = traced("guess", [("image_search", "official flag of Brezia", "IMG_001: Official flag of Brezia", ["Official flag of Brezia"])])
    world = type("W", (), {"refs": {}})()
    slots = SandboxSummariser(world).summarise(Pair("r", REQ, sound, guess, v("sound", 0.9), v("guess", 0.1))).slots
    assert slots["search_strategy"].startswith("Search the fact that names the entity first")
    assert slots["failure_avoidance"].startswith("Never image-search a name that neither the request nor a search result gave.")
    plain = traced("plain", [("image_search", "flag of the Granite Shield winner", "IMG_001: x", ["x"])])
    slots = SandboxSummariser(world).summarise(Pair("r", REQ, plain, sound, v("plain", 0.9), v("sound", 0.1))).slots
    assert slots["search_strategy"] == "Image-search the entity by its exact name; no text search is needed."
    assert "Never image-search" not in slots["failure_avoidance"]


def test_slot_validation():
    assert validate_slots(SLOTS_OK)["search_strategy"].startswith("Do the")
    with pytest.raises(ExperienceError, match="empty"):
        validate_slots({**SLOTS_OK, "skill_activation": "  "})
    with pytest.raises(ExperienceError, match="characters"):
        validate_slots({**SLOTS_OK, "skill_activation": "x" * 401})
    with pytest.raises(ExperienceError, match="unknown slots"):
        validate_slots({**SLOTS_OK, "mood": "happy"})


def test_bank_create_edit_delete_search_persist(tmp_path):
    emb = HashEmbedder(128)
    bank = ExperienceBank(tmp_path, embedder=emb)
    e1 = bank.add("r1", "Draw three gold stars above a red circle", SLOTS_OK, reward_gap=0.5, run_id="run", step=1)
    e2 = bank.add("r2", "Paint a teal horse at dusk", SLOTS_OK, reward_gap=0.3)
    assert len(bank) == 2
    hit, score = bank.retrieve("Draw three gold stars above a red circle")
    assert hit.id == e1.id and score == pytest.approx(1.0, abs=1e-5)
    miss, score = bank.retrieve("Show the logo of some phone in neon light")
    assert miss is None and score < bank.gate
    bank.edit(e1.id, {"skill_activation": "Query quantity_counting."}, note="tightened")
    assert bank.edit(e1.id, {"skill_activation": "Query quantity_counting."}, note="again").version == 2  # no change, no version
    again = ExperienceBank(tmp_path, embedder=emb)  # everything persisted, index consistent with the file
    got = again.get(e1.id)
    assert got.version == 2 and got.slots["skill_activation"] == "Query quantity_counting."
    assert got.note == "tightened" and len(got.history) == 1  # the note sits on the version it made
    assert got.history[0].slots["skill_activation"] == SLOTS_OK["skill_activation"] and got.history[0].note == ""
    assert again.search("Paint a teal horse at dusk", 1)[0][1].id == e2.id
    again.delete(e2.id)
    assert [e.id for _, e in ExperienceBank(tmp_path, embedder=emb).search("Paint a teal horse", 5)] == [e1.id]
    with pytest.raises(KeyError, match="no experience 'exp-nope'"):
        again.delete("exp-nope")


def test_bank_capacity_evicts_old_small_gaps(tmp_path):
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(64), capacity=4)
    gaps = [0.9, 0.2, 0.8, 0.7, 0.6]
    made = [bank.add(f"r{i}", f"request number {i}", SLOTS_OK, reward_gap=g) for i, g in enumerate(gaps)]
    # Among the two oldest (gaps 0.9 and 0.2) the small gap goes; the oldest, with a large gap, stays.
    assert len(bank) == 4 and made[0].id in bank.items and made[1].id not in bank.items
    bank2 = ExperienceBank(tmp_path / "b", embedder=HashEmbedder(64), capacity=4)
    for i, g in enumerate([0.5, 0.1, 0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2]):
        bank2.add(f"r{i}", f"request {i}", SLOTS_OK, reward_gap=g)
    assert len(bank2) == 4
    assert sorted(e.reward_gap for e in bank2.items.values()) == [0.2, 0.3, 0.4, 0.9]


def test_broken_bank_lines_are_reported_on_open_and_set_aside_once_by_the_next_write(tmp_path):
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(64))
    bank.add("r1", "one request", SLOTS_OK)
    with bank.jsonl.open("a") as fh:
        fh.write('{"schema_version": 1, "id": "broken"\n')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    again = ExperienceBank(tmp_path, embedder=HashEmbedder(64))
    again.search("one request")
    assert len(again) == 1 and again.load_errors and "experiences.jsonl:2" in again.load_errors[0]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # opening and searching write nothing
    again.add("r2", "another request", SLOTS_OK)
    assert "broken" in (tmp_path / "experiences.rejected.jsonl").read_text()
    assert all(json.loads(line) for line in again.jsonl.read_text().splitlines())  # the file is clean again
    assert not ExperienceBank(tmp_path, embedder=HashEmbedder(64)).load_errors  # set aside once, not reported again
    assert not ExperienceBank(tmp_path / "never-made", embedder=HashEmbedder(64)).items
    assert not (tmp_path / "never-made").exists()


def test_an_edit_and_a_concurrent_addition_from_another_process_are_both_kept(tmp_path):
    """The studio edits an experience while a trainer (another bank object, as in another process) adds one:
    each write re-reads the file under the bank's lock, so neither change is lost."""
    studio = ExperienceBank(tmp_path, embedder=HashEmbedder(64))
    exp = studio.add("r1", "one request", SLOTS_OK)
    trainer = ExperienceBank(tmp_path, embedder=HashEmbedder(64))  # loaded before the edit
    studio.edit(exp.id, {"prompt_construction": "Write exact counts, edited in the studio."}, note="by hand")
    trainer.add("r2", "another request", SLOTS_OK)  # its in-memory copy predates the edit
    final = ExperienceBank(tmp_path, embedder=HashEmbedder(64))
    assert len(final) == 2 and final.get(exp.id).version == 2
    assert final.get(exp.id).slots["prompt_construction"] == "Write exact counts, edited in the studio."
    studio.edit(exp.id, {"search_strategy": "Search the exact name."})  # and the studio keeps the trainer's addition
    assert len(ExperienceBank(tmp_path, embedder=HashEmbedder(64))) == 2
    assert [e.source_request_id for _, e in trainer.search("another request", k=2)][0] == "r2"


def test_two_processes_writing_one_bank_lose_nothing(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from genevolve.experience.bank import ExperienceBank; from genevolve.tools.embed import HashEmbedder; "
            "from genevolve.agent.guides import SLOTS; b = ExperienceBank(sys.argv[1], embedder=HashEmbedder(64)); "
            "[b.add(f'{sys.argv[2]}-{i}', f'request {sys.argv[2]} {i}', {s: 'Do it exactly.' for s in SLOTS}) for i in range(15)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), w]) for w in ("a", "b")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    ids = {e.source_request_id for e in ExperienceBank(tmp_path, embedder=HashEmbedder(64)).items.values()}
    assert ids == {f"{w}-{i}" for w in "ab" for i in range(15)}


def test_sandbox_summariser_reads_real_differences(world, tools, tmp_path):
    req = next(r for r in world.split("bench") if r.track == "knowledge" and "quantity_counting" in r.skills)
    good = run_to_end(req, ExpertPolicy(world), tools, seed=0)
    bad = run_to_end(req, ExpertPolicy(world, ExpertNoise(skip_skills=("quantity_counting",), p_distractor=1.0)), tools, seed=0)
    sc, store = SandboxScorer(world), ImageStore(tmp_path / "images")
    gv, bv = sc.score(req, good, store)[1], sc.score(req, bad, store)[1]
    pairs = mine_pairs([[(good, gv), (bad, bv)]])
    assert pairs and pairs[0].best.id == good.id
    summary = SandboxSummariser(world).summarise(pairs[0])
    slots = summary.slots
    assert "quantity_counting" in slots["skill_activation"]
    assert "Official" in slots["reference_selection"]
    assert "exactly" in slots["prompt_construction"]
    assert "a group of objects with an exact count" in summary.key.trigger  # the situation the best handled
    assert "find its official reference image" in summary.key.trigger
    for entity in req.entities:  # entity-free, the retrieval key included
        name = world.data.entities[entity].name
        assert all(name not in s for s in [*slots.values(), summary.key.trigger, summary.key.source_prompt_summary])


class FakeChat:
    name = "fake"

    def __init__(self, text):
        self.text = text

    def generate(self, conversations, params):
        return [Completion(text=self.text)]


def test_llm_summariser_validates_json():
    pair = type("P", (), {"request_text": "Draw the flag of Divia above three stars"})()
    good = json.dumps(SLOTS_OK | {"trigger": "Situation: a group of objects with an exact count.",
                                  "source_prompt_summary": "Draw <name> above three stars"})
    assert parse_summary(f"Here you go:\n{good}\nThanks").slots == validate_slots(SLOTS_OK)
    with pytest.raises(SummaryError, match="no JSON"):
        parse_summary("I cannot help with that")
    with pytest.raises(SummaryError, match="not valid JSON"):
        parse_summary('{"search_strategy": "x",}')
    with pytest.raises(SummaryError, match="empty"):
        parse_summary(json.dumps({**SLOTS_OK, "failure_avoidance": ""}))
    s = LLMSummariser(FakeChat("oops"))
    s.prompt = lambda p: "prompt"
    with pytest.raises(SummaryError, match="the summary has no JSON object"):
        s.summarise(pair)
    s2 = LLMSummariser(FakeChat(good))
    s2.prompt = lambda p: "prompt"
    assert s2.summarise(pair).slots["skill_activation"] == SLOTS_OK["skill_activation"]


def test_nearest_has_no_gate_and_leaves_the_own_request_out(tmp_path):
    bank = ExperienceBank(tmp_path, embedder=HashEmbedder(128), key="request")
    own1 = bank.add("r1", "Draw three gold stars above a red circle", SLOTS_OK, reward_gap=0.5)
    own2 = bank.add("r1", "Draw three gold stars above a red circle", SLOTS_OK, reward_gap=0.4)  # mined again later
    other = bank.add("r2", "Draw four gold stars below a blue square", SLOTS_OK)
    text = "Draw three gold stars above a red circle"
    (e, s), = bank.nearest([text])
    assert e.id in {own1.id, own2.id} and s == pytest.approx(1.0, abs=1e-5)
    (e, s), (e2, s2) = bank.nearest([text, "Paint a teal horse at dusk"], ["r1", None])
    assert e.id == other.id and s < 1.0  # both of r1's experiences are skipped, whatever the gate
    assert e2 is not None and s2 < bank.gate  # no gate: the nearest is returned with its similarity
    assert bank.nearest([text], ["r1"])[0][1] == pytest.approx(bank.search(text, 3)[2][0], abs=1e-6)
    assert ExperienceBank(tmp_path / "empty", embedder=HashEmbedder(128), key="request").nearest([text]) == [(None, None)]
    with pytest.raises(ValueError, match="one entry per text"):
        bank.nearest([text], [])
