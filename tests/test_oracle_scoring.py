"""The model scorer's reward mix and missing-case policy against hand-worked cases with fake models."""

from __future__ import annotations

import pytest
from PIL import Image

from genevolve.evaluation.scoring import ModelScorer, summarise
from genevolve.judges.chat import JudgeError
from genevolve.judges.vlm import KScoreJudgement, SufficiencyJudgement
from genevolve.records.schema import ImageRef, ImageStore, Program, ProgramRef, Request, Trajectory, Verdict

GT = Image.new("RGB", (8, 8), (200, 10, 10))


class Gen:
    name = "fake-gen"

    def __init__(self, fail=None, notes=()):
        self.fail, self.calls, self.last_notes = fail, [], list(notes)

    def generate(self, prompt, refs, seed=0):
        self.calls.append((prompt, len(refs), seed))
        if self.fail:
            raise TimeoutError(self.fail)
        return Image.new("RGB", (6, 4), (seed % 255, 0, 0))


class Judge:
    text_policy = "zero"

    def __init__(self, fail=None, F=0.5, V=0.25, T=0.75, A=1.0):
        self.fail, self.dims = fail, (F, V, T, A)

    def judge(self, text, image, gt):
        if self.fail:
            raise JudgeError(self.fail)
        F, V, T, A = self.dims
        return KScoreJudgement(F=F, V=V, T=T, A=A, kscore=0.1 * F + 0.4 * V + 0.4 * T + 0.1 * A, text_na=False,
                               text_policy="zero", rationale="Looks close.")


class ProgramJudge:
    def __init__(self, fail=None, r_text=0.5, missing=("exact count",)):
        self.fail, self.r_text, self.missing, self.calls = fail, r_text, list(missing), []

    def judge(self, text, program, refs):
        self.calls.append([title for title, _ in refs])
        if self.fail:
            raise JudgeError(self.fail)
        return SufficiencyJudgement(r_text=self.r_text, missing=self.missing)


def _case(store, gt=True, program=True, refs=()):
    h = store.put(GT) if gt else None
    req = Request(id="r1", text="a red square", gt_image=h)
    traj = Trajectory(id="t1", request_id="r1", request_text=req.text, termination="answer" if program else "no_answer",
                      images=[ImageRef(img_id=i, title=f"title {i}", local_path=p) for i, p in refs],
                      program=Program(gen_prompt="A red square.", reference_images=[ProgramRef(img_id=i) for i, _ in refs])
                      if program else None)
    return req, traj


KS = 0.1 * 0.5 + 0.4 * 0.25 + 0.4 * 0.75 + 0.1 * 1.0  # 0.55


def test_reward_mixes_kscore_and_r_text_with_alpha(tmp_path):
    store = ImageStore(tmp_path / "s")
    ref = tmp_path / "ref.png"
    Image.new("RGB", (3, 3), "blue").save(ref)
    pj, gen = ProgramJudge(), Gen(notes=["the generator ignored a word"])
    rendered, v = ModelScorer(gen, Judge(), pj, alpha=0.25).score(*_case(store, refs=[("IMG_001", str(ref)), ("IMG_002", "")]),
                                                                  store, seed=7)
    assert (v.F, v.V, v.T, v.A, v.kscore, v.r_text) == (0.5, 0.25, 0.75, 1.0, pytest.approx(KS), 0.5)
    assert v.reward == pytest.approx(0.75 * KS + 0.25 * 0.5) and v.alpha == 0.25 and v.text_policy == "zero"
    assert v.rationale == ("Looks close. Program misses: exact count. the generator ignored a word "
                           "reference IMG_002 has no image.")
    assert gen.calls == [("A red square.", 1, 7)] and pj.calls == [["title IMG_001"]]
    assert (rendered.seed, rendered.generator, rendered.prompt, rendered.width, rendered.height) == (7, "fake-gen", "A red square.", 6, 4)
    assert rendered.hash == v.image and v.image in store and rendered.reference_hashes == [store.put(Image.open(ref).convert("RGB"))]
    assert v.failed is None and (v.trajectory_id, v.request_id) == ("t1", "r1")
    _, v = ModelScorer(Gen(), Judge(), ProgramJudge(r_text=1.0, missing=())).score(*_case(store), store)
    assert v.alpha == 0.5 and v.reward == pytest.approx(0.5 * KS + 0.5) and v.rationale == "Looks close."


def test_without_a_program_judge_the_reward_is_the_kscore(tmp_path):
    store = ImageStore(tmp_path)
    scorer = ModelScorer(Gen(), Judge(), alpha=0.7)
    assert scorer.alpha == 0.0
    _, v = scorer.score(*_case(store), store)
    assert (v.reward, v.r_text, v.alpha) == (pytest.approx(KS), 0.0, 0.0)


def test_every_failure_kind_is_recorded_on_its_case(tmp_path):
    store = ImageStore(tmp_path)
    _, v = ModelScorer(Gen(), Judge()).score(*_case(store, program=False), store)
    assert (v.failed, v.kscore, v.reward, v.rationale) == ("no program (no_answer)", 0.0, 0.0, "The trajectory gave no answer.")
    req, traj = _case(store, gt=False)
    _, v = ModelScorer(Gen(), Judge()).score(req, traj, store)
    assert v.failed == "no ground truth image for r1" and v.kscore is None
    req2 = req.model_copy(update={"gt_image": "f" * 64})
    _, v = ModelScorer(Gen(), Judge()).score(req2, traj, store)
    assert v.failed == f"no ground truth image for r1 ({'f' * 64} not in the image store)"
    _, v = ModelScorer(Gen(fail="render took too long"), Judge()).score(*_case(store), store)
    assert v.failed == "generator failed: TimeoutError: render took too long" and v.reward is None
    rendered, v = ModelScorer(Gen(), Judge(fail="bad JSON")).score(*_case(store), store)
    assert v.failed == "judge failed: bad JSON" and v.image == rendered.hash and v.kscore is None
    _, v = ModelScorer(Gen(), Judge(), ProgramJudge(fail="timeout")).score(*_case(store), store)
    assert v.failed == "judge failed: program sufficiency: timeout"
    assert (v.F, v.V, v.T, v.A, v.kscore, v.r_text, v.reward) == (0.5, 0.25, 0.75, 1.0, pytest.approx(KS), None, None)
    assert v.rationale == "Looks close."


def test_the_ground_truth_comes_from_the_scorers_store_first(tmp_path):
    own, other = ImageStore(tmp_path / "own"), ImageStore(tmp_path / "other")
    req, traj = _case(own)
    seen = []

    class Spy(Judge):
        def judge(self, text, image, gt):
            seen.append(gt.getpixel((0, 0)))
            return super().judge(text, image, gt)

    _, v = ModelScorer(Gen(), Spy(), gt_store=own).score(req, traj, other)
    assert v.failed is None and seen == [(200, 10, 10)]
    _, v = ModelScorer(Gen(), Spy()).score(req, traj, other)
    assert v.failed.startswith("no ground truth")


def _pair(rid, k, failed=None, track="quality"):
    req = Request(id=rid, text=rid, track=track)
    if failed and not failed.startswith("no program"):
        return req, Verdict(trajectory_id=rid, request_id=rid, failed=failed, F=None, V=None, T=None, A=None,
                            kscore=None, r_text=None, reward=None)
    return req, Verdict(trajectory_id=rid, request_id=rid, F=k, V=k, T=None, A=k, kscore=k, r_text=k, reward=k, failed=failed)


def test_summarise_reports_the_missing_cases_under_both_conventions():
    pairs = [_pair("a", 0.8), _pair("b", 0.4), _pair("c", 0.0, failed="no program (no_answer)"),
             _pair("d", None, failed="generator failed: X"), _pair("e", None, failed="judge failed: y", track="knowledge"),
             _pair("f", None, failed="no ground truth image for f")]
    excl = summarise(pairs)
    assert excl["overall"]["all"]["kscore"] == pytest.approx((0.8 + 0.4 + 0.0) / 3)
    assert excl["overall"]["all"]["n"] == 3 and "knowledge" not in excl["track"]
    m = excl["missing"]
    assert (m["policy"], m["n"], m["of"], m["ids"]) == ("exclude", 3, 6, ["d", "e", "f"])
    assert m["errors"] == {"d": "generator failed: X", "e": "judge failed: y", "f": "no ground truth image for f"}
    assert m["reasons"] == {"generator failed": 1, "judge failed": 1, "no ground truth": 1}
    assert m["kscore_missing_excluded"] == pytest.approx(1.2 / 3) and m["kscore_missing_as_zero"] == pytest.approx(1.2 / 6)
    zero = summarise(pairs, missing="zero")
    row = zero["overall"]["all"]
    assert row["kscore"] == pytest.approx(1.2 / 6) and row["reward"] == pytest.approx(1.2 / 6) and row["n"] == 6
    assert row["F"] == pytest.approx(1.2 / 6) and row["V"] == pytest.approx(1.2 / 6) and row["A"] == pytest.approx(1.2 / 6)
    assert row["r_text"] == pytest.approx(1.2 / 6) and row["T"] is None
    assert (row["failed"], row["missing"]) == (4, 0)
    assert zero["track"]["knowledge"]["kscore"] == 0.0 and zero["missing"]["policy"] == "zero"
    with pytest.raises(ValueError, match=r"^missing is one of exclude, zero, not 'drop'$"):
        summarise(pairs, missing="drop")
    empty = summarise([])
    assert empty["overall"] == {} and empty["track"] == {} and empty["missing"]["kscore_missing_as_zero"] is None
    assert empty["missing"]["kscore_missing_excluded"] is None and empty["missing"]["of"] == 0
    only = summarise([_pair("d", None, failed="generator failed: X")])
    assert only["overall"] == {} and only["missing"]["kscore_missing_as_zero"] == 0.0
    assert only["category"] == {} and only["difficulty"] == {}


def test_summarise_lists_at_most_twenty_errors():
    pairs = [_pair(f"m{i:02d}", None, failed=f"judge failed: {i}") for i in range(25)]
    m = summarise(pairs)["missing"]
    assert len(m["ids"]) == 25 and list(m["errors"]) == [f"m{i:02d}" for i in range(20)]


def test_the_judges_see_the_request_text_and_defaults_hold(tmp_path):
    store = ImageStore(tmp_path)
    texts = []

    class Plain:  # no text_policy attribute
        def judge(self, text, image, gt):
            texts.append(("kscore", text))
            return Judge().judge(text, image, gt)

    class PJ(ProgramJudge):
        def judge(self, text, program, refs):
            texts.append(("program", text))
            return super().judge(text, program, refs)

    gen = Gen()
    rendered, v = ModelScorer(gen, Plain(), PJ(missing=("a", "b"))).score(*_case(store), store)
    assert texts == [("kscore", "a red square"), ("program", "a red square")]
    assert v.text_policy == "renormalise" and rendered.seed == 0 and gen.calls[0][2] == 0
    assert v.rationale == "Looks close. Program misses: a; b."
    rendered, v = ModelScorer(Gen(), Judge(), PJ(fail="down")).score(*_case(store), store)
    assert v.image == rendered.hash and v.image is not None
