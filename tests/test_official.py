"""Official GenEvolve-Data-Bench layout (bench, RL, SFT) from a local folder, the bench on it, export, and WISE."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from genevolve.judges.vlm import VLMJudge
from genevolve.evaluation.official import DataError, export_sft, load_requests, load_sft, run_bench, sft_messages
from genevolve.policies.base import SamplingParams
from genevolve.records.schema import ImageStore
from genevolve.evaluation.scoring import ModelScorer
from genevolve.evaluation.wise import WiseJudge, load_wise, run_wise, summarise_wise, wiscore

from _loopback import FakeVLM


@pytest.fixture(scope="module")
def official(world, tmp_path_factory):
    """A small folder in the official layout, made from sandbox bench requests and expert trajectories."""
    from genevolve.agent.loop import Tools, run_to_end
    from genevolve.agent.expert import ExpertNoise, ExpertPolicy

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
    assert counts == {"exported": 3, "skipped": 0, "missing_pictures": 0}
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
    from genevolve.agent.loop import Tools
    from genevolve.agent.expert import ExpertNoise, ExpertPolicy

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
                    lora_rank=4, batch_tokens=16384, warmup_steps=1, lr=1e-3)
    result = train_sft(cfg, log=lambda s: None, progress=False)
    assert result["conversations"] == 3 and result["steps"] == 1  # the three conversations in one batch
    # The one step's loss is the base model's (a fresh LoRA changes nothing): the mean cross-entropy of the
    # assistant tokens, computed here a conversation at a time with a plain forward pass.
    convs = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    assert result["final_loss"] == pytest.approx(_assistant_nll(TINY_DIR, convs), rel=1e-4)
    # The LoRA is merged into a plain model folder that every --policy accepts.
    assert (tmp_path / "student" / "config.json").exists() and not (tmp_path / "student" / "adapter_config.json").exists()
    from genevolve.policies.resolve import resolve_policy

    assert resolve_policy(str(tmp_path / "student")).tokenizer is not None


def _assistant_nll(model_dir, conversations) -> float:
    """Mean negative log-likelihood of the assistant's tokens, one conversation at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genevolve.policies.local import encode_conversation

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, n = 0.0, 0
    for messages in conversations:
        ids, mask = encode_conversation(tok, messages)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        for i in range(1, len(ids)):
            if mask[i]:
                total, n = total - float(logp[i - 1, ids[i]]), n + 1
    return total / n


# ---------------------------------------------------------------------------
# A record as the official runtime writes it: pictures named by their IMG id, byte-for-byte round trip
# ---------------------------------------------------------------------------

OFFICIAL_ROW = Path(__file__).parent / "data" / "official_sft_row.json"
COLOURS = {"IMG_001": (200, 30, 30), "IMG_002": (30, 160, 40), "IMG_003": (30, 40, 200), "IMG_004": (220, 200, 20)}


def official_folder(root: Path, row: dict | None = None) -> dict:
    """An official-layout folder holding one SFT row, its pictures as JPEG files named by IMG id."""
    from PIL import Image

    row = row or json.loads(OFFICIAL_ROW.read_text(encoding="utf-8"))
    (root / "sft").mkdir(parents=True)
    for rel in row["images"]:
        name = Path(rel).stem
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12), COLOURS.get(name, (90, 90, 90))).save(root / rel, quality=95)
    (root / "sft" / "train.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    return row


def pixels(path) -> bytes:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def test_official_row_binds_pictures_by_name_and_round_trips(tmp_path):
    row = official_folder(tmp_path / "data")
    assert [Path(p).stem for p in row["images"]] == ["IMG_003", "IMG_001", "IMG_004", "IMG_002"]  # not in id order
    got = load_sft(tmp_path / "data", image_dir=tmp_path / "store")
    t = got.trajectories[0]
    assert len(t.turns) == 11 and t.turns[-1].forced_final and t.n_tool_calls == 10  # read in the official mode
    for ref in t.images:  # each id has the picture its file name gives it, copied into the store
        assert pixels(ref.local_path) == pixels(tmp_path / "data" / f"images/traj_00007/{ref.img_id}.jpg"), ref.img_id
        assert Path(ref.local_path).parent.parent == tmp_path / "store"
    assert [(r.img_id, r.note) for r in t.program.reference_images] == [("IMG_001", ""), ("IMG_004", "river view at sunrise")]

    counts = export_sft(got.trajectories, tmp_path / "out" / "sft" / "train.jsonl")
    assert counts == {"exported": 1, "skipped": 0, "missing_pictures": 0}
    out = json.loads((tmp_path / "out" / "sft" / "train.jsonl").read_text(encoding="utf-8"))
    assert out["messages"] == row["messages"]  # byte for byte: the FINAL STEP text and all 24 messages
    assert json.dumps(out["messages"], ensure_ascii=False) == json.dumps(row["messages"], ensure_ascii=False)
    assert sorted(Path(p).stem for p in out["images"]) == ["IMG_001", "IMG_002", "IMG_003", "IMG_004"]

    again = load_sft(tmp_path / "out", image_dir=tmp_path / "store2").trajectories[0]
    assert sft_messages([again]) == sft_messages([t])
    assert [pixels(i.local_path) for i in again.images] == [pixels(i.local_path) for i in t.images]
    assert _by_file_name(again.model_dump()) == _by_file_name(t.model_dump())  # equal but for the store folder


def _by_file_name(d):
    """A record dump with every local path cut to its file name (a store path ends in the picture's hash)."""
    if isinstance(d, dict):
        return {k: Path(v).name if k == "local_path" else _by_file_name(v) for k, v in d.items()}
    return [_by_file_name(x) for x in d] if isinstance(d, list) else d


def _rename(row: dict, old: str, new: str) -> dict:
    row = json.loads(json.dumps(row))
    row["images"] = [p.replace(old, new) for p in row["images"]]
    return row


@pytest.mark.parametrize("change, match", [
    # two files claim one id
    (lambda r: {**r, "images": r["images"] + ["images/other/IMG_001.jpg"]}, "IMG_001 is claimed by two files"),
    # a file named for an id the record never hands out
    (lambda r: _rename(r, "IMG_002", "IMG_009"), "IMG_009.jpg.*no image_search result in this record hands out IMG_009"),
    # the tool response gives the file named IMG_003 to IMG_002
    (lambda r: {**r, "messages": [{**m, "content": m["content"].replace("/data/genevolve_images/77ab21.jpg", "images/traj_00007/IMG_003.jpg")}
                                  for m in r["messages"]]}, "IMG_003.jpg is named IMG_003 but the record gives it to IMG_002"),
    # some names carry ids and some do not
    (lambda r: _rename(r, "IMG_002", "heron"), "some picture names carry an IMG id and some do not"),
])
def test_picture_names_that_conflict_are_refused(tmp_path, change, match):
    official_folder(tmp_path, change(json.loads(OFFICIAL_ROW.read_text(encoding="utf-8"))))
    with pytest.raises(DataError, match=match):
        load_sft(tmp_path)


def test_export_of_a_picture_without_a_file_fails_clearly(tmp_path):
    official_folder(tmp_path / "data")
    t = load_sft(tmp_path / "data", image_dir=tmp_path / "store").trajectories[0]
    t.images[1].local_path = str(tmp_path / "gone.png")
    t.images[2].local_path = ""
    with pytest.raises(DataError, match=r"2 picture\(s\).*sft-00000 IMG_002.*gone.png.*sft-00000 IMG_003: no local file"):
        export_sft([t], tmp_path / "out" / "x.jsonl")
    assert not (tmp_path / "out" / "x.jsonl").exists()
