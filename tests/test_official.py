"""Official GenEvolve-Data-Bench layout (bench, RL, SFT) from a local folder, the bench on it, export, and WISE."""

from __future__ import annotations

import json

import httpx
import pytest

from genevolve.judges.vlm import VLMJudge
from genevolve.official import DataError, export_sft, load_requests, load_sft, run_bench, sft_messages
from genevolve.policies.base import SamplingParams
from genevolve.records import ImageStore
from genevolve.scoring import ModelScorer
from genevolve.wise import WiseJudge, load_wise, run_wise, summarise_wise, wiscore

from _loopback import FakeVLM


@pytest.fixture(scope="module")
def official(world, tmp_path_factory):
    """A small folder in the official layout, made from sandbox bench requests and expert trajectories."""
    from genevolve.agent import Tools, run_to_end
    from genevolve.world.expert import ExpertNoise, ExpertPolicy

    root = tmp_path_factory.mktemp("genevolve-data-bench")
    (root / "bench").mkdir()
    (root / "images").mkdir()
    reqs = world.split("bench")[:4]
    rows = []
    for r in reqs:
        world.gt_image(r).save(root / "images" / f"{r.id}.png")
        rows.append({"id": r.id, "question": r.text, "gt_image": f"{r.id}.png",
                     "eval_type": "knowledge" if r.track == "knowledge" else "quality", "category": r.category,
                     "difficulty": ["easy", "medium", "hard"][min(r.difficulty, 3) - 1]})
    (root / "bench" / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    # RL prompts as Parquet with embedded pictures (the datasets Image feature)
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": [r.text for r in reqs[:2]],
                                     "gt_image": [str(root / "images" / f"{r.id}.png") for r in reqs[:2]]})
    ds = ds.cast_column("gt_image", datasets.Image())
    (root / "rl").mkdir()
    ds.to_parquet(str(root / "rl" / "train.parquet"))
    # SFT: our expert trajectories exported in the official messages + images format
    trajs = [run_to_end(r, ExpertPolicy(world, ExpertNoise()), Tools.for_world(world), seed=0) for r in reqs[:3]]
    (root / "sft").mkdir()
    counts = export_sft(trajs, root / "sft" / "train.jsonl")
    return root, reqs, trajs, counts


def test_bench_and_rl_rows_become_requests(official, tmp_path):
    root, reqs, _, _ = official
    store = ImageStore(tmp_path / "img")
    got = load_requests(root, store)
    assert [r.id for r in got.requests] == [r.id for r in reqs] and not got.missing
    assert [r.track for r in got.requests] == [r.track for r in reqs]
    assert all(r.gt_image in store and r.split == "bench" for r in got.requests)
    assert got.requests[0].difficulty in (1, 2, 3)
    rl = load_requests(root, store, kind="rl")
    assert len(rl.requests) == 2 and rl.requests[0].id == "rl-00000" and rl.requests[0].gt_image == got.requests[0].gt_image


def test_missing_pictures_name_the_files(official, tmp_path):
    root, reqs, _, _ = official
    broken = tmp_path / "broken"
    (broken / "bench").mkdir(parents=True)
    lines = (root / "bench" / "test.jsonl").read_text().splitlines()
    (broken / "bench" / "b.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"4 bench ground-truth picture\(s\) missing.*{reqs[0].id}.png"):
        load_requests(broken, ImageStore(tmp_path / "i"))
    kept = load_requests(broken, ImageStore(tmp_path / "i"), allow_missing=True)
    assert len(kept.requests) == 4 and all(r.gt_image is None for r in kept.requests) and len(kept.missing) == 4
    with pytest.raises(DataError, match="no sft files"):
        load_sft(broken)
    with pytest.raises(DataError, match="no dataset"):
        load_requests(tmp_path / "nowhere", ImageStore(tmp_path / "i"))


def test_sft_round_trip_and_training_rows(official, tmp_path):
    root, _, trajs, counts = official
    assert counts == {"exported": 3, "skipped": 0}
    got = load_sft(root)
    assert len(got.trajectories) == 3 and not got.missing
    for mine, theirs in zip(trajs, got.trajectories):
        assert [t.raw for t in theirs.turns] == [t.raw for t in mine.turns]
        assert theirs.program.gen_prompt == mine.program.gen_prompt
        used = [theirs.image(r.img_id) for r in theirs.program.reference_images]
        assert all(u is not None and u.local_path.endswith(".png") for u in used)
    rows = sft_messages(got.trajectories)
    assert rows[0]["messages"][0]["role"] == "system" and rows[0]["messages"][-1]["role"] == "assistant"
    # a missing picture is named, or recorded on the trajectory when allowed
    (root / "images").joinpath("gone.png")
    line = json.loads((root / "sft" / "train.jsonl").read_text().splitlines()[0])
    line["images"] = ["images/gone.png"]
    d = tmp_path / "sft-broken"
    (d / "sft").mkdir(parents=True)
    (d / "sft" / "x.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError, match="gone.png"):
        load_sft(d)
    t = load_sft(d, allow_missing=True).trajectories[0]
    assert "IMG_001: picture missing from the dataset" in t.errors


def test_bench_on_official_rows_with_the_vlm_judge(official, world, tmp_path):
    from genevolve.agent import Tools
    from genevolve.world.expert import ExpertNoise, ExpertPolicy

    root, _, _, _ = official
    store = ImageStore(tmp_path / "img")
    reqs = load_requests(root, store).requests
    judge = VLMJudge("http://127.0.0.1:9/v1", "fake", transport=httpx.MockTransport(FakeVLM()), backoff=0)
    scorer = ModelScorer(world.generator, judge, gt_store=store)
    params = SamplingParams(temperature=0.0)
    raw = run_bench(reqs, None, None, scorer, store, [0], params)["summary"]
    expert = run_bench(reqs, ExpertPolicy(world, ExpertNoise()), Tools.for_world(world), scorer, store, [0], params)
    exp = expert["summary"]
    assert exp["by"]["overall"]["all"]["n"] == 4 and exp["missing"][0]["n"] == 0
    assert exp["by"]["overall"]["all"]["kscore"]["mean"] > raw["by"]["overall"]["all"]["kscore"]["mean"]
    assert all(c["verdict"].text_policy == "renormalise" for c in expert["cases"])
    # the judge goes down half-way: those cases are missing, reported, and left out of the mean
    down = ModelScorer(world.generator, VLMJudge("http://127.0.0.1:9/v1", "fake", backoff=0, max_retries=0,
                                                  transport=httpx.MockTransport(FakeVLM("down"))), gt_store=store)
    res = run_bench(reqs, None, None, down, store, [0], params)["summary"]
    assert res["missing"][0]["n"] == 4 and res["missing"][0]["reasons"] == {"judge failed": 4}
    assert res["by"]["overall"] == {}


def test_wise_loading_scoring_and_missing(world, tmp_path):
    data = tmp_path / "WISE" / "data"
    data.mkdir(parents=True)
    (data / "cultural_common_sense.json").write_text(json.dumps(
        [{"prompt_id": i, "Prompt": f"exactly {n} red circles", "Explanation": "a count", "Subcategory": "Festival"}
         for i, n in ((1, "two"), (2, "three"))]))
    (data / "spatio-temporal_reasoning.json").write_text(json.dumps(
        [{"prompt_id": 401, "Prompt": "a blue square", "Explanation": "", "Subcategory": "Longitudinal time"},
         {"prompt_id": 600, "Prompt": "a green triangle", "Explanation": "", "Subcategory": "Geographical Understanding"}]))
    (data / "natural_science.json").write_text(json.dumps(
        [{"prompt_id": 850, "Prompt": "a gold star", "Explanation": "", "Subcategory": "Mechanics"}]))
    items = load_wise(tmp_path / "WISE")
    assert [i.category for i in items] == ["cultural", "cultural", "time", "space", "physics"]
    assert wiscore(2, 2, 2) == pytest.approx(1.0) and wiscore(2, 1, 1) == pytest.approx(0.85)
    fake = FakeVLM()
    judge = WiseJudge("http://127.0.0.1:9/v1", "fake", transport=httpx.MockTransport(fake), backoff=0)
    out = run_wise(items, world.generator, judge, ImageStore(tmp_path / "img"))
    s = out["summary"]
    assert s["categories"]["cultural"] == {"wiscore": pytest.approx(0.85), "n": 2}
    assert s["overall"] == pytest.approx(0.85) and s["partial"]  # no biology or chemistry prompts
    assert "EXPLANATION" in fake.requests[0]["messages"][1]["content"][0]["text"]
    assert judge.parse("Consistency: 2\nRealism: 0\nAesthetic Quality: 1")["realism"] == 0
    results = dict(out["results"])
    results[401] = {"failed": "judge failed: HTTP 503"}
    s2 = summarise_wise(items, results)
    assert s2["missing"]["n"] == 1 and "time" not in s2["categories"]
    with pytest.raises(FileNotFoundError, match="cultural_common_sense.json"):
        load_wise(tmp_path)


def test_sft_trains_on_official_trajectories(official, tmp_path):
    """The official SFT split, imported, is what `genevolve sft --data` trains on (one epoch, LoRA, tiny base)."""
    from genevolve.policies.tiny import TINY_DIR
    from genevolve.training.sft import SFTConfig, train_sft

    root, _, _, _ = official
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_messages(load_sft(root).trajectories)))
    cfg = SFTConfig(out=str(tmp_path / "student"), recipe="model", model=str(TINY_DIR), data=str(data), epochs=1,
                    lora_rank=4, batch_tokens=4096, warmup_steps=1, lr=1e-3)
    result = train_sft(cfg, log=lambda s: None, progress=False)
    assert result["conversations"] == 3 and result["steps"] >= 1 and result["final_loss"] == result["final_loss"]
    assert (tmp_path / "student" / "adapter_config.json").exists()
