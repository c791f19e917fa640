"""The VLM judge, the program-sufficiency judge and the model scorer against a fake multimodal server."""

from __future__ import annotations


import httpx
import pytest
from PIL import Image

from genevolve.judges import JudgeError
from genevolve.judges.chat import RateLimiter
from genevolve.judges.vlm import ProgramJudge, VLMJudge, kscore
from genevolve.records.schema import ImageStore, Program, ProgramRef, Request, Trajectory
from genevolve.evaluation.scoring import ModelScorer, is_missing, summarise

from _loopback import FakeVLM

RED, BLUE = Image.new("RGB", (24, 24), (200, 30, 30)), Image.new("RGB", (24, 24), (30, 30, 200))


def judge(fake, tmp_path=None, **kw):
    return VLMJudge("http://127.0.0.1:9/v1", "fake-vlm", transport=httpx.MockTransport(fake), backoff=0,
                    cache_dir=tmp_path, **kw)


def test_rubric_order_and_text_policies(tmp_path):
    fake = FakeVLM()
    j = judge(fake, tmp_path / "cache")
    out = j.judge("a red square", RED, RED)
    assert (out.F, out.V, out.T, out.A, out.text_na) == (1, 1, None, 1, True)
    assert out.kscore == pytest.approx(1.0) and out.text_policy == "renormalise"
    body = fake.requests[-1]
    assert body["temperature"] == 0 and "logprobs" not in body
    parts = body["messages"][1]["content"]
    labels = [p["text"] for p in parts if p["type"] == "text"]
    assert labels[1].startswith("Image 1 (generated)") and labels[2].startswith("Image 2 (ground truth)")
    kinds = [p["type"] for p in parts]
    assert kinds.index("image_url") < len(kinds) - 1  # generated first, ground truth last

    # RED against BLUE: the fake grades F 1, V 0, A 0 (mean difference 113 of 255), text not applicable.
    half = judge(fake, tmp_path / "cache", text_policy="half").judge("a red square", RED, BLUE)
    assert (half.F, half.V, half.T, half.A) == (1, 0, 0.5, 0)
    assert half.kscore == pytest.approx(0.1 * 1 + 0.4 * 0 + 0.4 * 0.5 + 0.1 * 0)  # = 0.3
    renorm = judge(fake).judge("a red square", RED, BLUE)
    assert (renorm.F, renorm.V, renorm.T, renorm.A) == (1, 0, None, 0)
    assert renorm.kscore == pytest.approx(0.1 / 0.6)  # T left out: (0.1 F + 0.4 V + 0.1 A) / 0.6
    texty = judge(fake).judge('a banner with the exact text "HI"', RED, RED)
    assert texty.T == 1 and not texty.text_na and texty.kscore == pytest.approx(1.0)
    with pytest.raises(ValueError, match="text_policy"):
        judge(fake, text_policy="zero")


def test_kscore_weights_by_hand():
    assert kscore(1, 1, 1, 1) == pytest.approx(1.0)
    assert [kscore(*one_hot) for one_hot in ((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1))] == \
        pytest.approx([0.1, 0.4, 0.4, 0.1])
    assert kscore(0, 1, None, 0) == pytest.approx(0.4 / 0.6) and kscore(1, 0, None, 1) == pytest.approx(0.2 / 0.6)


def test_cache_by_content_hash(tmp_path):
    fake = FakeVLM()
    j = judge(fake, tmp_path)
    j.judge("a red square", RED, BLUE)
    again = judge(fake, tmp_path).judge("a red square", RED.copy(), BLUE.copy())
    assert again.cached and len(fake.requests) == 1
    judge(fake, tmp_path).judge("a red square", BLUE, RED)  # different bytes in a different order: asked anew
    assert len(fake.requests) == 2


@pytest.mark.parametrize("mode, needle", [("outside", "V is 0.7, outside the rubric"), ("missing_key", "no V score"),
                                          ("prose", "no JSON object"), ("not_json", "not JSON"), ("down", "HTTP 503")])
def test_faults_raise_judge_errors(mode, needle, tmp_path):
    fake = FakeVLM(mode)
    j = judge(fake, tmp_path, max_retries=1, answer_retries=1)
    with pytest.raises(JudgeError, match=needle):
        j.judge("a red square", RED, BLUE)
    assert not any(tmp_path.rglob("*.json"))  # nothing outside the rubric is cached
    if mode == "outside":
        assert len(fake.requests) == 2  # asked once more before giving up


def test_missing_api_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        VLMJudge("https://api.example.com/v1", "gpt")
    VLMJudge("http://localhost:8000/v1", "local")  # loopback needs no key


def test_server_down_on_loopback_is_a_judge_error():
    from _loopback import free_port_url

    j = VLMJudge(free_port_url() + "/v1", "m", max_retries=1, backoff=0, timeout=2)
    with pytest.raises(JudgeError, match="failed"):
        j.judge("x", RED, RED)


def test_rate_limiter_spaces_requests():
    import time

    lim = RateLimiter(rpm=1200)  # 50 ms apart
    t0 = time.monotonic()
    for _ in range(4):
        lim.wait()
    assert time.monotonic() - t0 >= 0.14


def test_program_judge_levels():
    fake = FakeVLM()
    pj = ProgramJudge("http://127.0.0.1:9/v1", "fake-vlm", transport=httpx.MockTransport(fake), backoff=0)
    long = Program(gen_prompt="the flag from the first reference image above exactly three gold stars",
                   reference_images=[ProgramRef(img_id="IMG_001", note="flag")])
    assert pj.judge("req", long, [("Official flag", RED)]).r_text == 1
    assert pj.judge("req", Program(gen_prompt="a flag")).r_text == 0.25
    assert sum(p["type"] == "image_url" for p in fake.requests[0]["messages"][1]["content"]) == 1


# ---------------------------------------------------------------------------
# the scorer and the missing-case policy
# ---------------------------------------------------------------------------


class Gen:
    name = "fixed"

    def __init__(self, image=RED, fail=None):
        self.image, self.fail, self.refs = image, fail, []

    def generate(self, prompt, references=(), seed=0):
        self.refs.append(len(references))
        if self.fail:
            raise TimeoutError(self.fail)
        return self.image


def _case(store, i, program=True, gt=RED, ref_path=None):
    gt_hash = store.put(gt) if gt is not None else None
    req = Request(id=f"r{i}", text="a red square", category="c", gt_image=gt_hash)
    traj = Trajectory(id=f"t{i}", request_id=req.id, request_text=req.text,
                      program=Program(gen_prompt="a red square filling the whole image, flat colour",
                                      reference_images=[ProgramRef(img_id="IMG_001")] if ref_path else []) if program else None,
                      termination="answer" if program else "no_answer")
    if ref_path:
        from genevolve.records.schema import ImageRef

        traj.images.append(ImageRef(img_id="IMG_001", title="ref", local_path=str(ref_path)))
    return req, traj


def test_scorer_records_every_failure_kind(tmp_path):
    store = ImageStore(tmp_path / "images")
    RED.save(tmp_path / "ref.png")
    fake = FakeVLM()
    pj = ProgramJudge("http://127.0.0.1:9/v1", "fake", transport=httpx.MockTransport(fake), backoff=0)
    gen = Gen()
    scorer = ModelScorer(gen, judge(fake), pj, alpha=0.5)
    rendered, v = scorer.score(*_case(store, 0, ref_path=tmp_path / "ref.png"), store)
    assert v.failed is None and v.kscore == pytest.approx(1) and v.r_text == 1 and v.reward == pytest.approx(1)
    assert gen.refs == [1] and rendered.hash in store and v.text_policy == "renormalise"

    _, v = scorer.score(*_case(store, 1, program=False), store)
    assert v.failed.startswith("no program") and not is_missing(v)
    _, v = scorer.score(*_case(store, 2, gt=None), store)
    assert v.failed.startswith("no ground truth") and is_missing(v)
    _, v = ModelScorer(Gen(fail="render took too long"), judge(fake)).score(*_case(store, 3), store)
    assert v.failed == "generator failed: TimeoutError: render took too long" and is_missing(v)
    _, v = ModelScorer(gen, judge(FakeVLM("outside"), answer_retries=0)).score(*_case(store, 4), store)
    assert v.failed.startswith("judge failed: V is 0.7") and is_missing(v) and v.image in store
    # a wrong picture (BLUE for RED): KScore (0.1 F) / 0.6 = 1/6, R_text 1 (a 50-character prompt)
    _, v = ModelScorer(Gen(BLUE), judge(fake), pj, alpha=0.5).score(*_case(store, 5), store)
    assert v.kscore == pytest.approx(1 / 6) and v.r_text == 1 and v.reward == pytest.approx(0.5 * 1 / 6 + 0.5 * 1)
    no_pj = ModelScorer(Gen(BLUE), judge(fake))
    _, v = no_pj.score(*_case(store, 6), store)
    assert v.alpha == 0 and v.kscore == pytest.approx(1 / 6) and v.reward == pytest.approx(1 / 6)


def test_missing_policy_is_stated_and_reported(tmp_path):
    from genevolve.records.schema import Verdict

    req = Request(id="r", text="t", category="c")
    good = Verdict(trajectory_id="a", request_id="r", kscore=0.8, F=1, V=1, A=1)
    nothing = Verdict(trajectory_id="b", request_id="r", failed="no program (no_answer)")
    down = Verdict(trajectory_id="c", request_id="r", failed="judge failed: HTTP 503")
    pairs = [(req, good), (req, nothing), (req, down)]
    excl = summarise(pairs)
    assert excl["overall"]["all"]["n"] == 2 and excl["overall"]["all"]["kscore"] == pytest.approx(0.4)
    assert excl["missing"] == {"policy": "exclude", "n": 1, "of": 3, "ids": ["c"], "errors": {"c": "judge failed: HTTP 503"}, "reasons": {"judge failed": 1},
                               "kscore_missing_excluded": pytest.approx(0.4), "kscore_missing_as_zero": pytest.approx(0.8 / 3)}
    zero = summarise(pairs, missing="zero")
    assert zero["overall"]["all"]["n"] == 3 and zero["overall"]["all"]["kscore"] == pytest.approx(0.8 / 3)
    assert zero["missing"]["n"] == 1
    with pytest.raises(ValueError, match="missing is one of .*not 'drop'"):
        summarise(pairs, missing="drop")
    assert summarise([])["missing"]["kscore_missing_excluded"] is None
    assert summarise([(req, down)])["missing"]["kscore_missing_excluded"] is None
    _, v = ModelScorer(Gen(fail="down"), None).score(*_case(ImageStore(tmp_path), 0), ImageStore(tmp_path))
    assert v.kscore is None and v.reward is None  # a missing case has no score, not 0


def test_wise_overall_is_null_when_nothing_was_judged():
    from genevolve.evaluation.wise import WiseItem, summarise_wise

    items = [WiseItem(prompt_id=1, prompt="p", explanation="e", subcategory="s", category="cultural")]
    assert summarise_wise(items, {})["overall"] is None
