"""The sandbox world: its rules hold, its levers matter, and it rebuilds from its seed."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from genevolve.agent.loop import run_to_end
from genevolve.evaluation.bench import SandboxScorer, raw_trajectory
from genevolve.records.schema import SKILLS, ImageStore
from genevolve.agent.expert import ExpertNoise, ExpertPolicy
from genevolve.world.font import read_text, text_mask
from genevolve.world.generator import SandboxGenerator
from genevolve.world.judge import SandboxJudge, kscore, text_accuracy
from genevolve.world.requests import ParseError, parse_request
from genevolve.world.scene import Scene, emblem_to_reference, render, render_emblem

GEN = SandboxGenerator()


def interpret(prompt, refs=(), seeds=range(20)):
    return [GEN.interpret(prompt, refs, seed=s) for s in seeds]


# ---------------------------------------------------------------------------
# Assets
# ---------------------------------------------------------------------------


def test_world_has_what_the_sandbox_promises(world):
    kinds = Counter(e.kind for e in world.data.entities.values())
    assert len(world.data.entities) >= 200 and len(kinds) >= 4
    assert sum(1 for _ in open(world.root / "corpus.jsonl")) >= 1000
    assert len(world.refs) >= 1000
    assert sum(r["variant"] != "official" for r in world.refs.values()) >= 500
    assert sorted(p.stem for p in (world.root / "skills").glob("*.md")) == sorted(SKILLS)
    splits = Counter((r.split, r.track) for r in world.requests)
    for split in ("sft", "evolve", "bench"):
        assert splits[(split, "knowledge")] > 0 and splits[(split, "quality")] > 0
    covered = {s for r in world.split("bench") for s in r.skills}
    assert covered == set(SKILLS)
    # Multi-hop facts exist: requests that name entities through events and landmarks.
    hops = [world.parse(r.text).hops for r in world.split("bench") if r.track == "knowledge"]
    assert max(hops) >= 2 and sum(h >= 1 for h in hops) >= 10


def test_world_build_reproduces_shipped_assets(tmp_path, world):
    from genevolve.world.build import build_world

    counts = build_world(tmp_path / "w", seed=0, with_index=False, log=lambda _: None)
    assert counts["requests"] == len(world.requests)
    for name in ("world.json", "corpus.jsonl", "refs.jsonl", "requests.jsonl"):
        assert (tmp_path / "w" / name).read_bytes() == (world.root / name).read_bytes(), name
    other = build_world(tmp_path / "w1", seed=1, with_index=False, log=lambda _: None)
    assert other["requests"] == counts["requests"]
    assert (tmp_path / "w1" / "requests.jsonl").read_bytes() != (world.root / "requests.jsonl").read_bytes()


def test_every_request_reads_back_to_its_scene(world):
    for r in world.requests:
        assert world.parse(r.text).scene.to_dict() == r.scene, r.text


def test_ground_truth_images_match_scenes(world):
    for r in world.split("bench")[:20]:
        assert np.array_equal(np.asarray(world.images.get(r.gt_image)), render(Scene.from_dict(r.scene)))


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


def test_issue_example_request_is_multi_hop(world):
    p = world.parse("Draw the flag of the 2031 Aurora Cup champion above exactly three gold stars")
    flag, stars = p.scene.objects
    assert flag.entity == "nation:veloria" and flag.cell == "top"
    assert (stars.shape, stars.color, stars.count, stars.cell) == ("star", "gold", 3, "bottom")
    assert p.mentions[0].via == "event" and p.hops == 1


@pytest.mark.parametrize("text, why", [
    ("Draw a friendly dragon", "no object"),
    ("Draw the flag of Nowhereland", "no entity"),
    ("Draw the flag of the 1999 Aurora Cup champion", "no event"),
    ("Draw a red circle and a blue square", "relation"),
])
def test_unreadable_requests_raise(world, text, why):
    with pytest.raises(ParseError, match=why):
        parse_request(text, world.data)


def test_free_text_request_gets_ground_truth(world):
    r = world.request("Paint a teal horse on the left and two red squares on the right, at dusk")
    assert r.split == "adhoc" and r.scene is not None and r.track == "quality" and r.difficulty == 2
    assert set(r.skills) >= {"spatial_layout", "anatomy_body_coherence", "quantity_counting", "aesthetic_drawing"}
    # The ground truth is named by hash and rendered on demand: the shipped world is never written to.
    assert r.gt_image == ImageStore.digest(world.gt_image(r))
    bad = world.request("Draw a friendly dragon")
    assert bad.scene is None and "no object" in bad.parse_error
    assert (bad.track, bad.category, bad.difficulty, bad.skills, bad.gt_image) == (None, None, None, [], None)


# ---------------------------------------------------------------------------
# Generator: each failure mode, and the wording that avoids it
# ---------------------------------------------------------------------------


def test_count_drift_unless_exact():
    bare = [s.objects[0].count for s in interpret("Three gold stars.")]
    exact = [s.objects[0].count for s in interpret("Exactly three gold stars.")]
    assert all(c == 3 for c in exact)
    assert sum(c != 3 for c in bare) >= 14 and set(bare) <= {2, 3, 4}


def test_attribute_leakage_within_a_sentence():
    joined = interpret("A red circle in the left of the image and a blue square in the right of the image.")
    split = interpret("A red circle in the left of the image. A blue square in the right of the image.")
    assert sum(s.objects[1].color == "red" for s in joined) >= 14
    assert all([o.color for o in s.objects] == ["red", "blue"] for s in split)


def test_placement_needs_cell_phrases():
    loose = interpret("A red circle above a blue square.")
    placed = interpret("A red circle in the top of the image. A blue square in the bottom of the image.")
    assert all([o.cell for o in s.objects] == ["top", "bottom"] for s in placed)
    assert sum([o.cell for o in s.objects] == ["top", "bottom"] for s in loose) <= 3
    assert interpret("A red circle.")[0].objects[0].cell == "center"


def test_text_exact_quoted_and_unquoted():
    assert all(s.text == "GO TEAM" for s in interpret('A banner at the bottom with the exact text "GO TEAM".'))
    quoted = [s.text for s in interpret('A banner that says "GRAND OPENING".')]
    assert sum(t != "GRAND OPENING" for t in quoted) >= 18 and all(len(t) == 13 for t in quoted)
    unquoted = [s.text for s in interpret("With the words GO TEAM written on a banner.")]
    assert all(t and t != "GO TEAM" for t in unquoted)
    assert interpret("A red circle.")[0].text is None


def test_anatomy_needs_limb_counts():
    loose = interpret("A purple dancer.")
    exact = interpret("A purple dancer with exactly two arms and two legs.")
    assert all((s.objects[0].arms, s.objects[0].legs) == (2, 2) for s in exact)
    assert sum((s.objects[0].arms, s.objects[0].legs) != (2, 2) for s in loose) >= 14
    assert all(s.objects[0].legs == 4 for s in interpret("A teal horse with exactly four legs and a tail."))


def test_lighting_style_material_only_in_exact_phrases():
    s = interpret("A gold sphere made of polished metal, casting a soft shadow. Golden-hour lighting. In watercolor style.", seeds=[0])[0]
    assert (s.lighting, s.style, s.objects[0].material, s.objects[0].shadow) == ("golden-hour", "watercolor", "metal", True)
    s = interpret("A shiny chrome gold sphere at dusk, like a dreamy painting.", seeds=[0])[0]
    assert (s.lighting, s.style, s.objects[0].material, s.objects[0].shadow) == (None, None, None, False)


def test_entities_come_from_references_or_generic(world):
    emblem = render_emblem(world.data.entities["nation:veloria"].emblem)
    ref = Image.fromarray(emblem_to_reference(emblem))
    with_ref = GEN.interpret("The flag from the first reference image.", [ref])
    assert np.array_equal(with_ref.objects[0].pixels, emblem)
    generic = GEN.interpret("The flag of Veloria.", [])
    assert generic.objects[0].pixels is None and generic.objects[0].emblem["colors"] != world.data.entities["nation:veloria"].emblem["colors"]
    # Asking for a second reference that does not exist falls back to a generic emblem.
    assert GEN.interpret("The flag from the second reference image.", [ref]).objects[0].pixels is None


def test_generator_is_seeded():
    a = np.asarray(GEN.generate("Three gold stars. A red circle above a blue square.", seed=7))
    b = np.asarray(GEN.generate("Three gold stars. A red circle above a blue square.", seed=7))
    assert np.array_equal(a, b)


# ---------------------------------------------------------------------------
# Judge
# ---------------------------------------------------------------------------


def test_ocr_reads_every_glyph():
    rng = random.Random(0)
    for _ in range(50):
        t = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ") for _ in range(rng.randint(1, 18))).strip() or "A"
        t = " ".join(t.split())
        assert read_text(text_mask(t, 120, 20)) == t


def test_judge_scores_ground_truth_as_perfect(world):
    judge = SandboxJudge()
    for r in world.split("bench")[:30]:
        gt = world.gt_image(r)
        j = judge.judge(gt, Scene.from_dict(r.scene), gt)
        assert j.kscore == pytest.approx(1.0), (r.text, j.rationale)


def test_judge_reads_failures(world):
    r = world.request("Draw the flag of the 2031 Aurora Cup champion above exactly three gold stars, with a banner that says \"GO TEAM\"")
    scene, gt = Scene.from_dict(r.scene), world.gt_image(r)
    judge = SandboxJudge()
    wrong = Scene.from_dict(r.scene)
    wrong.objects[1].count = 4
    wrong.text = "GO TEEM"
    j = judge.judge(Image.fromarray(render(wrong)), scene, gt)
    assert j.checks["quantity_counting"] == [0.0] and j.checks["knowledge"] == [1.0]
    assert j.T == pytest.approx(6 / 7) and "GO TEEM" in j.rationale  # one substitution in seven characters
    moved = Scene.from_dict(r.scene)
    moved.objects[0].cell = "top-left"
    j2 = judge.judge(Image.fromarray(render(moved)), scene, gt)
    assert j2.checks["spatial_layout"] == [0.0, 1.0]
    blank = judge.judge(Image.fromarray(render(Scene())), scene, gt)
    assert blank.F == 0.0 and blank.kscore < 0.2


def test_text_accuracy_is_one_minus_the_edit_distance_over_the_longer_text():
    # worked by hand: (read, wanted, edits, longer length)
    assert text_accuracy("GO TEAM", "GO TEAM") == 1.0
    assert text_accuracy("GO TEEM", "GO TEAM") == pytest.approx(1 - 1 / 7)  # one substitution
    assert text_accuracy("GO", "GO TEAM") == pytest.approx(1 - 5 / 7)  # five characters missing
    assert text_accuracy("GO TEAM!!", "GO TEAM") == pytest.approx(1 - 2 / 9)  # two extra, over the longer (9)
    assert text_accuracy("OG TAEM", "GO TEAM") == pytest.approx(1 - 4 / 7)  # two swaps are four substitutions
    assert text_accuracy("XYZ", "AB") == 0.0 and text_accuracy("", "HI") == 0.0
    assert text_accuracy("", "") == 1.0 and text_accuracy("HI", "") == 0.0  # no text wanted: any text is wrong


def test_kscore_weights_and_text_renormalisation():
    assert kscore(1, 1, 1, 1) == pytest.approx(1.0)
    assert kscore(1, 0, 0, 0) == pytest.approx(0.1)
    assert kscore(0, 1, None, 0) == pytest.approx(0.4 / 0.6)


def test_program_sufficiency_levels(world, tools):
    r = world.request("Draw the flag of the 2031 Aurora Cup champion above exactly three gold stars")
    scene = Scene.from_dict(r.scene)
    official = next(x for x in world.refs.values() if x["entity"] == "nation:veloria" and x["variant"] == "official")
    misprint = next(x for x in world.refs.values() if x["entity"] == "nation:veloria" and x["variant"] == "misprint")
    good = "The flag from the first reference image in the top of the image. Exactly three gold stars in the bottom of the image."
    judge = SandboxJudge()
    assert judge.program_sufficiency(good, scene, [official]) == (1.0, [])
    score, missing = judge.program_sufficiency(good, scene, [misprint])
    assert score == 0.75 and any("official" in m for m in missing)
    assert judge.program_sufficiency("The flag above three gold stars.", scene, [])[0] == 0.0
    assert judge.program_sufficiency("", scene, [official]) == (0.0, ["empty gen_prompt"])


# ---------------------------------------------------------------------------
# The expert and the levers (a small slice; benchmarks/sandbox_levers.py measures the full bench)
# ---------------------------------------------------------------------------


def _mean_kscore(world, tools, reqs, policy, store, seed=0):
    sc = SandboxScorer(world)
    vals = []
    for r in reqs:
        t = raw_trajectory(r, seed) if policy is None else run_to_end(r, policy, tools, seed=seed)
        vals.append(sc.score(r, t, store, seed=seed)[1].kscore)
    return float(np.mean(vals))


def test_expert_beats_raw_and_tools_matter(world, tools, tmp_path):
    ka = [r for r in world.split("bench") if r.track == "knowledge"][:12]
    store = ImageStore(tmp_path / "images")
    expert = _mean_kscore(world, tools, ka, ExpertPolicy(world), store)
    raw = _mean_kscore(world, tools, ka, None, store)
    distract = _mean_kscore(world, tools, ka, ExpertPolicy(world, ExpertNoise(p_distractor=1.0)), store)
    assert expert >= 0.9 and raw <= 0.4 and expert - distract >= 0.2


def test_skipping_a_skill_costs(world, tools, tmp_path):
    reqs = [r for r in world.split("bench") if "quantity_counting" in r.skills][:8]
    store = ImageStore(tmp_path / "images")
    full = _mean_kscore(world, tools, reqs, ExpertPolicy(world), store)
    skip = _mean_kscore(world, tools, reqs, ExpertPolicy(world, ExpertNoise(skip_skills=("quantity_counting",))), store)
    assert full - skip >= 0.15


def test_expert_follows_a_decision_guide(world, tools):
    r = next(r for r in world.split("bench") if "quantity_counting" in r.skills)
    lazy = ExpertPolicy(world, ExpertNoise(p_skip_skill=1.0))
    plain = run_to_end(r, lazy, tools)
    guided = run_to_end(r, lazy, tools, guide="Skill activation: query quantity_counting and write exact counts.")
    called = lambda t: {tt.tool_call.arguments.get("skill_name") for tt in t.turns if tt.tool_call}
    assert "quantity_counting" not in called(plain) and "quantity_counting" in called(guided)
    assert "exactly" in guided.program.gen_prompt.lower()


def test_blind_spot_noise_skips_its_skills_unless_guided(world, tools):
    from genevolve.agent.guides import oracle_guide

    noise = ExpertNoise.blind_spots()
    assert noise.blind_skills and ExpertNoise.named("blind-spots") == noise
    with pytest.raises(ValueError, match="unknown expert noise"):
        ExpertNoise.named("loud")
    pol = ExpertPolicy(world, noise)
    called = lambda t: {tt.tool_call.arguments.get("skill_name") for tt in t.turns if tt.tool_call}
    counts = {"blind": [0, 0], "other": [0, 0], "guided blind": [0, 0]}
    for i, r in enumerate(world.split("evolve")[:60]):
        plain, guided = run_to_end(r, pol, tools, seed=i), run_to_end(r, pol, tools, seed=i, guide=oracle_guide(world, r))
        for s in r.skills:
            key = "blind" if s in noise.blind_skills else "other"
            counts[key][0] += s in called(plain)
            counts[key][1] += 1
            if key == "blind":
                counts["guided blind"][0] += s in called(guided)
                counts["guided blind"][1] += 1
    rate = {k: a / b for k, (a, b) in counts.items()}
    assert counts["blind"][1] >= 20 and rate["blind"] <= 0.3 and rate["other"] >= 0.5, rate
    assert rate["guided blind"] == 1.0


def test_expert_writes_protocol_valid_trajectories(world, tools):
    noisy = ExpertPolicy(world, ExpertNoise.cold_start())
    for r in world.split("evolve")[:30]:
        t = run_to_end(r, noisy, tools, seed=3)
        assert t.termination == "answer" and all(turn.error is None for turn in t.turns), t.errors
        assert t.program.gen_prompt and not [i for i in t.program.issues if i != "no valid reference images"]
        if r.track == "knowledge":
            assert t.program.reference_images
