"""Evaluation and aggregation against hand-worked numbers: protocol validity, means, Student's t intervals
over seeds, per-seed aggregates and the sandbox scorer's reward mix."""

from __future__ import annotations

import math

import pytest

import genevolve.evaluation.bench as bench
from genevolve.evaluation.bench import (
    SandboxScorer,
    aggregate,
    evaluate,
    is_missing,
    load_references,
    mean_ci,
    over_seeds,
    protocol_valid,
    raw_trajectory,
)
from genevolve.records.schema import ImageRef, ImageStore, Program, ProgramRef, Request, Trajectory, Turn, Verdict

# Student's t 97.5 % quantiles from a printed table, by degrees of freedom.
T975 = {1: 12.706204736174698, 2: 4.302652729911275, 3: 3.182446305284263}


def _sd(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _traj(issues=(), termination="answer", program=True, error=None, prompt="a red circle"):
    prog = Program(gen_prompt=prompt, issues=list(issues)) if program else None
    return Trajectory(id="t", request_id="r", request_text="x", termination=termination, program=prog,
                      turns=[Turn(index=0, raw="", error=error)])


def test_protocol_valid_rejects_every_invalid_issue_and_accepts_the_rest():
    assert protocol_valid(_traj())
    for issue in ("empty gen_prompt", "gen_prompt is missing or not a string", "dropped unknown image id IMG_009",
                  "dropped a malformed reference entry: 3", "gen_prompt names images by id instead of ordinal phrases",
                  "reference_images is not a list", "dropped duplicate image id IMG_001"):
        assert not protocol_valid(_traj([issue])), issue
        assert not protocol_valid(_traj(["references re-sorted by id", issue])), issue
    for benign in ("references re-sorted by id", "no valid reference images", "3 references capped at 2",
                   "gen_prompt mentions the second reference image but there are 1 references"):
        assert protocol_valid(_traj([benign])), benign
    assert not protocol_valid(_traj(termination="max_rounds_reached"))
    assert not protocol_valid(_traj(program=False))
    assert not protocol_valid(_traj(error="answer is not valid JSON"))


def test_is_missing_only_for_infrastructure_failures():
    v = lambda failed: Verdict(trajectory_id="t", request_id="r", failed=failed)  # noqa: E731
    assert [is_missing(v(f)) for f in (None, "no program (no_answer)", "generator failed: X", "judge failed: y",
                                        "no ground truth for r", "the generator failed")] == [False, False, True, True, True, False]


def test_mean_ci_uses_students_t_with_n_minus_one_degrees_of_freedom():
    for xs in ([1.0, 2.0, 3.0, 4.0], [0.2, 0.5, 0.8], [0.3, 0.6]):
        m, ci = mean_ci(xs)
        assert m == pytest.approx(sum(xs) / len(xs))
        assert ci == pytest.approx(T975[len(xs) - 1] * _sd(xs) / math.sqrt(len(xs)))
    m, ci = mean_ci([1.0, None, 2.0, 3.0, 4.0], z=1.96)
    assert (m, ci) == (2.5, pytest.approx(1.96 * _sd([1, 2, 3, 4]) / 2))
    assert mean_ci([]) == (None, None) and mean_ci([None]) == (None, None) and mean_ci([0.7]) == (0.7, None)


def _req(rid, track="quality", category="free", difficulty=1):
    return Request(id=rid, text=rid, track=track, category=category, difficulty=difficulty)


def _ver(tid, k, failed=None, T=0.5, r_text=0.25):
    if failed and failed.startswith(("generator", "judge", "no ground")):
        return Verdict(trajectory_id=tid, request_id=tid, failed=failed, **bench.UNSCORED)
    return Verdict(trajectory_id=tid, request_id=tid, F=k, V=k / 2, T=T, A=1 - k, kscore=k, r_text=r_text,
                   reward=0.5 * k + 0.5 * r_text, failed=failed)


def test_aggregate_by_level_with_failed_and_missing_cases():
    pairs = [(_req("a", "quality", "free", 1), _ver("a", 0.8)),
             (_req("b", "quality", "logo", 2), _ver("b", 0.0, failed="no program (no_answer)", T=None)),
             (_req("c", "knowledge", "logo", 2), _ver("c", 0.4)),
             (_req("d", "knowledge", None, None), _ver("d", None, failed="generator failed: boom")),
             (_req("e", None, "free", 1), _ver("e", 0.6, T=None))]
    out = aggregate(pairs)
    assert set(out) == {"overall", "track", "category", "difficulty"}
    allrow = out["overall"]["all"]
    assert (allrow["n"], allrow["failed"], allrow["missing"]) == (5, 1, 1)
    assert allrow["kscore"] == pytest.approx((0.8 + 0.0 + 0.4 + 0.6) / 4)
    assert allrow["T"] == pytest.approx((0.5 + 0.5) / 2)  # None left out
    assert allrow["V"] == pytest.approx((0.4 + 0.0 + 0.2 + 0.3) / 4)
    assert allrow["reward"] == pytest.approx((0.525 + 0.125 + 0.325 + 0.425) / 4)
    assert out["track"]["quality"]["kscore"] == pytest.approx(0.4) and out["track"]["quality"]["n"] == 2
    assert out["track"]["knowledge"] == {"n": 2, "failed": 0, "missing": 1, "kscore": 0.4, "F": 0.4, "V": 0.2, "T": 0.5,
                                         "A": pytest.approx(0.6), "r_text": 0.25, "reward": pytest.approx(0.325)}
    assert sorted(out["track"]) == ["knowledge", "quality"]  # e has no track
    assert sorted(out["category"]) == ["free", "logo"] and out["category"]["free"]["n"] == 2
    assert sorted(out["difficulty"]) == ["1", "2"] and out["difficulty"]["2"]["kscore"] == pytest.approx(0.2)
    only_missing = aggregate([(_req("d"), _ver("d", None, failed="judge failed: x"))])["overall"]["all"]
    assert only_missing["kscore"] is None and only_missing["missing"] == 1 and only_missing["failed"] == 0


def _agg(k, n=2, failed=0, missing=0, track=None):
    row = lambda x: {"kscore": x, "F": 1.0, "V": None, "T": 0.5, "A": 0.25, "r_text": 0.0, "reward": x,  # noqa: E731
                     "n": n, "failed": failed, "missing": missing}
    return {"overall": {"all": row(k)}, "track": {t: row(v) for t, v in (track or {}).items()}}


def test_over_seeds_is_the_mean_over_all_seeds_with_its_interval():
    per_seed = {3: _agg(0.9, n=4, failed=1, track={"q": 0.5}), 1: _agg(0.3, n=5, missing=2),
                2: _agg(0.6, n=3, failed=2, missing=1, track={"q": 0.1})}
    by = over_seeds(per_seed)
    k = by["overall"]["all"]["kscore"]
    assert k["per_seed"] == [0.9, 0.3, 0.6]  # in the order of the seeds given
    assert k["mean"] == pytest.approx(0.6) and k["ci95"] == pytest.approx(T975[2] * _sd([0.9, 0.3, 0.6]) / math.sqrt(3))
    assert by["overall"]["all"]["V"] == {"mean": None, "ci95": None, "per_seed": []}
    assert by["overall"]["all"]["T"]["ci95"] == pytest.approx(0.0)
    assert (by["overall"]["all"]["n"], by["overall"]["all"]["failed"], by["overall"]["all"]["missing"]) == (5, 3, 3)
    q = by["track"]["q"]
    assert q["kscore"]["per_seed"] == [0.5, 0.1] and q["kscore"]["mean"] == pytest.approx(0.3) and q["n"] == 4
    assert set(by) == {"overall", "track", "category", "difficulty"} and by["category"] == {}
    assert set(over_seeds(per_seed, ("overall",))) == {"overall"}
    rows = over_seeds({0: {"overall": {"all": {"kscore": 0.5}}}})["overall"]["all"]
    assert (rows["n"], rows["failed"], rows["missing"]) == (0, 0, 0)


class _Scorer:
    """KScore 0.1 * (request number + 1) + 0.01 * seed + 0.001 * sample, read off the trajectory id."""

    def __init__(self):
        self.calls = []

    def score(self, request, traj, store, seed=0):
        self.calls.append((request.id, traj.id, seed))
        n, s, i = int(request.id[1:]), seed // 1000, seed % 1000
        if n == 2 and s == 1:
            return None, Verdict(trajectory_id=traj.id, request_id=request.id, failed="judge failed: x", **bench.UNSCORED)
        k = 0.1 * (n + 1) + 0.01 * s + 0.001 * i
        return None, Verdict(trajectory_id=traj.id, request_id=request.id, F=k, V=k, T=None, A=k, kscore=k,
                             r_text=0.0, reward=k / 2)


def test_evaluate_aggregates_each_seed_and_takes_mean_and_t_interval_over_seeds(tmp_path, monkeypatch):
    reqs = [_req(f"r{n}", track="quality" if n else "knowledge") for n in range(3)]
    scorer, seen, said = _Scorer(), [], []
    ev = evaluate(reqs, None, None, scorer, ImageStore(tmp_path), [0, 1, 2], samples=2, on_case=seen.append,
                  progress=said.append)
    assert [c.trajectory.seed for c in ev.cases] == [s * 1000 + i for s in (0, 1, 2) for _ in reqs for i in (0, 1)]
    assert [(c.seed, c.sample, c.request.id) for c in ev.cases] == [(s, i, r.id) for s in (0, 1, 2) for r in reqs for i in (0, 1)]
    assert seen == ev.cases and [c[2] for c in scorer.calls] == [c.trajectory.seed for c in ev.cases]
    assert said == [f"evaluating raw seed {s} on 3 requests x 2 samples" for s in (0, 1, 2)]
    per_seed = {}
    for s in (0, 1, 2):
        ks = [0.1 * (n + 1) + 0.01 * s + 0.001 * i for n in range(3) for i in (0, 1) if not (n == 2 and s == 1)]
        per_seed[s] = sum(ks) / len(ks)
        assert ev.per_seed[s]["overall"]["all"]["kscore"] == pytest.approx(per_seed[s])
    k = ev.by["overall"]["all"]["kscore"]
    vals = [per_seed[s] for s in (0, 1, 2)]
    assert k["per_seed"] == pytest.approx(vals)
    assert k["mean"] == pytest.approx(sum(vals) / 3) and k["ci95"] == pytest.approx(T975[2] * _sd(vals) / math.sqrt(3))
    assert ev.by["overall"]["all"]["missing"] == 2 and ev.by["overall"]["all"]["n"] == 6
    assert ev.by["track"]["knowledge"]["kscore"]["per_seed"] == pytest.approx([0.1, 0.11, 0.12], abs=1e-3)
    assert ev.protocol_valid == {"per_seed": {0: 1.0, 1: 1.0, 2: 1.0}, "mean": 1.0, "ci95": 0.0}
    one = evaluate(reqs[:1], None, None, _Scorer(), ImageStore(tmp_path), [5], levels=("overall",))
    assert set(one.by) == {"overall"} and one.by["overall"]["all"]["kscore"]["ci95"] is None
    with pytest.raises(ValueError, match="samples must be >= 1"):
        evaluate(reqs, None, None, scorer, ImageStore(tmp_path), [0], samples=0)


def test_evaluate_with_a_missing_case_policy_and_protocol_validity_per_seed(tmp_path, monkeypatch):
    reqs = [_req("r0"), _req("r2")]
    valid = {0: [_traj(), _traj()], 1: [_traj(), _traj(["empty gen_prompt"])], 2: [_traj(["dropped duplicate image id X"])] * 2}

    def fake(requests, policy, tools, k, seed, params=None, guides=None, on_turn=None):
        out = [t.model_copy(update={"seed": seed * 1000, "id": f"{r.id}-{seed}"}) for t, r in zip(valid[seed], requests)]
        if on_turn:
            on_turn(len(out), len(out))
        return out

    monkeypatch.setattr(bench, "trajectories", fake)
    turns = []
    ev = evaluate(reqs, "policy", None, _Scorer(), ImageStore(tmp_path), [0, 1, 2], missing="zero",
                  on_turn=lambda s, d, t: turns.append((s, d, t)))
    assert turns == [(0, 2, 2), (1, 2, 2), (2, 2, 2)]
    assert ev.protocol_valid["per_seed"] == {0: 1.0, 1: 0.5, 2: 0.0}
    assert ev.protocol_valid["mean"] == pytest.approx(0.5) and ev.protocol_valid["ci95"] == pytest.approx(T975[2] * 0.5 / math.sqrt(3))
    assert ev.per_seed[1]["missing"]["n"] == 1  # the missing-case policy's summary
    assert ev.per_seed[1]["overall"]["all"]["kscore"] == pytest.approx((0.11 + 0.0) / 2)  # counted as zero
    excl = evaluate(reqs, "policy", None, _Scorer(), ImageStore(tmp_path), [1], missing="exclude")
    assert excl.per_seed[1]["overall"]["all"]["kscore"] == pytest.approx(0.11)


def test_raw_trajectory_sends_the_request_text():
    t = raw_trajectory(_req("r7"), seed=3)
    assert (t.id, t.request_id, t.policy, t.seed, t.termination) == ("r7-raw-s3", "r7", "raw", 3, "answer")
    assert t.program.gen_prompt == "r7" and t.program.reference_images == [] and protocol_valid(t)
    assert raw_trajectory(_req("r7")).seed == 0


def test_sandbox_scorer_mixes_kscore_and_program_sufficiency(world, tmp_path):
    req = world.request("Draw the flag of the 2031 Aurora Cup champion above exactly three gold stars")
    store = ImageStore(tmp_path)
    for alpha in (0.5, 0.25):
        scorer = SandboxScorer(world) if alpha == 0.5 else SandboxScorer(world, alpha=alpha)
        rendered, v = scorer.score(req, raw_trajectory(req, 1), store, seed=1)
        assert v.alpha == alpha and v.failed is None and v.image == rendered.hash and rendered.seed == 1
        assert v.reward == pytest.approx((1 - alpha) * v.kscore + alpha * v.r_text)
        assert v.kscore == pytest.approx(0.1 * v.F + 0.4 * v.V + 0.1 * v.A + 0.4 * v.T if v.T is not None
                                         else (0.1 * v.F + 0.4 * v.V + 0.1 * v.A) / 0.6)
        assert v.r_text < 1.0 and "Program misses: flag bound to its official reference" in v.rationale
    _, v = SandboxScorer(world).score(req, _traj(program=False, termination="no_answer"), store)
    assert (v.failed, v.kscore, v.reward) == ("no program (no_answer)", 0.0, 0.0) and not is_missing(v)
    outside = Request(id="o", text="a photo of my cat")
    rendered, v = SandboxScorer(world).score(outside, raw_trajectory(outside), store)
    assert rendered is not None and v.failed.startswith("no ground truth: the request lies outside") and v.kscore is None

    class Broken:
        name = "broken"

        def generate(self, *a, **k):
            raise RuntimeError("out of memory")

    w2 = type("W", (), {"generator": Broken(), "refs": {}})()
    assert SandboxScorer(w2).score(req, raw_trajectory(req), store) == (None, Verdict(
        trajectory_id=f"{req.id}-raw-s0", request_id=req.id, failed="generator failed: RuntimeError: out of memory", **bench.UNSCORED))


def test_load_references_reads_images_in_program_order_and_reports_problems(tmp_path):
    from PIL import Image

    Image.new("RGBA", (4, 3), (10, 20, 30, 255)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_text("not an image")
    traj = Trajectory(id="t", request_id="r", request_text="x",
                      images=[ImageRef(img_id="IMG_001", local_path=str(tmp_path / "a.png")), ImageRef(img_id="IMG_002"),
                              ImageRef(img_id="IMG_003", local_path=str(tmp_path / "bad.png"))],
                      program=Program(gen_prompt="p", reference_images=[ProgramRef(img_id=i) for i in
                                                                        ("IMG_003", "IMG_001", "IMG_002", "IMG_004")]))
    refs, problems = load_references(traj)
    assert [info.img_id for info, _ in refs] == ["IMG_001"] and refs[0][1].mode == "RGB" and refs[0][1].size == (4, 3)
    assert problems[0].startswith("reference IMG_003 could not be read: ")
    assert problems[1:] == ["reference IMG_002 has no image", "reference IMG_004 has no image"]
    assert load_references(_traj(program=False)) == ([], [])


class _World:
    """Records what the scorer hands to its generator and judges; scores are fixed numbers."""

    def __init__(self, missing=("a", "b")):
        from genevolve.world.judge import Judgement

        self.refs = {"ref-1": {"entity": "e1", "variant": "official"}}
        self.calls = {}
        world = self

        class Generator:
            name = "fake-gen"

            def generate(self, prompt, refs, seed=0):
                world.calls["generate"] = (prompt, [im.size for im in refs], seed)
                from PIL import Image

                return Image.new("RGB", (5, 7), (seed, 0, 0))

        class Judge:
            def judge(self, image, scene, gt):
                world.calls["judge"] = (image.size, gt)
                return Judgement(F=0.5, V=0.25, T=0.75, A=1.0, kscore=0.55, rationale="Judged.")

            def program_sufficiency(self, prompt, scene, rows):
                world.calls["sufficiency"] = (prompt, rows)
                return 0.25, list(missing)

        self.generator, self.judge = Generator(), Judge()

    def gt_image(self, request):
        return "GT"


def test_sandbox_scorer_hands_over_prompt_references_and_seed_and_records_all(tmp_path):
    from PIL import Image

    Image.new("RGB", (3, 2), "blue").save(tmp_path / "a.png")
    req = Request(id="r1", text="x", scene={"objects": []})
    traj = Trajectory(id="t1", request_id="r1", request_text="x",
                      images=[ImageRef(img_id="IMG_001", local_path=str(tmp_path / "a.png"), source_id="ref-1"),
                              ImageRef(img_id="IMG_002", local_path=str(tmp_path / "a.png"), source_id="other"),
                              ImageRef(img_id="IMG_003")],
                      program=Program(gen_prompt="the prompt", reference_images=[ProgramRef(img_id=i) for i in
                                                                                 ("IMG_001", "IMG_002", "IMG_003")]))
    world, store = _World(), ImageStore(tmp_path / "store")
    rendered, v = SandboxScorer(world).score(req, traj, store)
    assert world.calls["generate"] == ("the prompt", [(3, 2), (3, 2)], 0)
    assert world.calls["sufficiency"] == ("the prompt", [{"entity": "e1", "variant": "official"}, {}])
    assert world.calls["judge"] == ((5, 7), "GT")
    ref_hash = store.put(Image.open(tmp_path / "a.png").convert("RGB"))
    assert (rendered.hash, rendered.width, rendered.height, rendered.generator, rendered.prompt, rendered.seed) == \
        (v.image, 5, 7, "fake-gen", "the prompt", 0)
    assert rendered.reference_hashes == [ref_hash, ref_hash] and v.image in store
    assert (v.F, v.V, v.T, v.A, v.kscore, v.r_text, v.alpha) == (0.5, 0.25, 0.75, 1.0, 0.55, 0.25, 0.5)
    assert v.reward == pytest.approx(0.5 * 0.55 + 0.5 * 0.25) and v.failed is None
    assert v.rationale == "Judged. Program misses: a; b. reference IMG_003 has no image."
    w9 = _World(missing=())
    _, v = SandboxScorer(w9).score(req, traj.model_copy(update={"images": traj.images[:2], "program": Program(
        gen_prompt="p", reference_images=[ProgramRef(img_id="IMG_001")])}), store, seed=9)
    assert v.rationale == "Judged." and v.image is not None and w9.calls["generate"][2] == 9
    _, v = SandboxScorer(_World(missing=())).score(req, traj.model_copy(update={"program": Program(
        gen_prompt="p", reference_images=[ProgramRef(img_id="IMG_003"), ProgramRef(img_id="IMG_004")])}), store)
    assert v.rationale == "Judged. reference IMG_003 has no image reference IMG_004 has no image."
    outside = Request(id="o", text="x", parse_error="no scene")
    rendered, v = SandboxScorer(_World()).score(outside, traj, store, seed=4)
    assert v.image == rendered.hash and rendered.seed == 4
    assert v.failed == "no ground truth: the request lies outside the sandbox world (no scene)"
    _, v = SandboxScorer(_World()).score(req, _traj(program=False, termination="no_answer"), store)
    assert (v.failed, v.rationale, v.trajectory_id, v.request_id) == ("no program (no_answer)", "The trajectory gave no answer.", "t", "r1")


def test_evaluate_hands_policy_params_and_guides_to_the_rollouts_and_names_the_policy(tmp_path, monkeypatch):
    got = []

    def fake(requests, policy, tools, k, seed, params=None, guides=None, on_turn=None):
        got.append((policy, tools, k, seed, params, guides))
        return [raw_trajectory(r, seed * 1000) for r in requests]

    class Policy:
        name = "pol"

    class Scorer(_Scorer):
        def score(self, request, traj, store, seed=0):
            return "the image", super().score(request, traj, store, seed)[1]

    monkeypatch.setattr(bench, "trajectories", fake)
    said, pol = [], Policy()
    ev = evaluate([_req("r0")], pol, "tools", Scorer(), ImageStore(tmp_path), [3], params="p", guides={"r0": "g"},
                  progress=said.append)
    assert got == [(pol, "tools", 1, 3, "p", {"r0": "g"})] and said == ["evaluating pol seed 3 on 1 requests"]
    assert ev.cases[0].rendered == "the image"
    empty = evaluate([], pol, "tools", Scorer(), ImageStore(tmp_path), [0])
    assert empty.protocol_valid["per_seed"] == {0: None} and empty.protocol_valid["mean"] is None
    with pytest.raises(ValueError, match=r"^samples must be >= 1$"):
        evaluate([], pol, None, Scorer(), ImageStore(tmp_path), [0], samples=0)


def test_trajectories_default_to_the_papers_sampling_and_pass_everything_on(monkeypatch):
    import genevolve.agent.rollout as rollout_module
    from genevolve.policies.base import SamplingParams

    got = []
    monkeypatch.setattr(rollout_module, "rollout", lambda *a, **kw: got.append((a, kw)) or ["t"])
    turn = print
    assert bench.trajectories(["q"], "pol", "tools", 3, 7, None, {"q": "g"}, turn) == ["t"]
    assert got[-1] == ((["q"], "pol", "tools"), dict(k=3, params=SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=384),
                                                   seed=7, guides={"q": "g"}, on_turn=turn))
    mine = SamplingParams(temperature=0.1, top_p=0.5, max_new_tokens=9)
    bench.trajectories(["q"], "pol", "tools", 1, 0, mine)
    assert got[-1][1]["params"] is mine
    assert [t.seed for t in bench.trajectories([_req("a"), _req("b")], None, None, 2, 4)] == [4000, 4001, 4000, 4001]


def test_over_seeds_with_a_seed_that_lacks_a_level():
    per_seed = {0: {"overall": {"all": {"kscore": 0.2}}, "track": {"q": {"kscore": 0.4}}}, 1: {"overall": {"all": {"kscore": 0.6}}}}
    by = over_seeds(per_seed, ("overall", "track"))
    assert by["track"]["q"]["kscore"]["per_seed"] == [0.4] and by["overall"]["all"]["kscore"]["mean"] == pytest.approx(0.4)
