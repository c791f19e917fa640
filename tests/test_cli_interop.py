"""The interop commands end to end: official bench with a VLM judge, WISE, data import/export, summaries, index."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from genevolve.cli import app
from genevolve.runs import load_run

from _loopback import FakeVLM, serve_app

runner = CliRunner()


def last_json(output: str) -> dict:
    """The last JSON object printed (progress bars of model loading may share the line)."""
    import re

    return json.loads(re.findall(r"\{.*\}", output)[-1])


@pytest.fixture(scope="module")
def fake_vlm():
    with serve_app(FakeVLM().app()) as url:
        yield url + "/v1"


@pytest.fixture(scope="module")
def rollout_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    res = runner.invoke(app, ["rollout", "-r", "bench-1000", "-k", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_export_import_and_bench_official(rollout_run, fake_vlm, tmp_path, world):
    root = tmp_path / "official"
    res = runner.invoke(app, ["data", "export", str(rollout_run), "--out", str(root / "sft" / "train.jsonl")])
    assert res.exit_code == 0, res.output
    assert last_json(res.output)["exported"] >= 1
    run = load_run(rollout_run)
    (root / "bench").mkdir()
    req = run.requests[0]
    run.images.get(req.gt_image).save(root / "bench" / "gt.png")
    (root / "bench" / "rows.jsonl").write_text(json.dumps({"id": "b1", "question": req.text, "gt_image": "gt.png",
                                                           "eval_type": "knowledge", "category": "flags", "difficulty": 2}) + "\n")
    res = runner.invoke(app, ["data", "import", str(root), "--out", str(tmp_path / "imported"), "--sft-out", str(tmp_path / "sft.jsonl")])
    assert res.exit_code == 0, res.output
    counts = last_json(res.output.split("missing:")[0])
    assert counts["requests"] == 1 and counts["trajectories"] >= 1 and counts["missing_pictures"] == 0
    assert json.loads((tmp_path / "sft.jsonl").read_text().splitlines()[0])["messages"][0]["role"] == "system"

    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", "--data", str(root), "--policy", "expert", "--seeds", "0", "--judge", fake_vlm,
                              "--judge-model", "fake", "--judge-cache", str(tmp_path / "cache"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(out.read_text())
    assert summary["by"]["overall"]["all"]["n"] == 1 and summary["text_policy"] == "renormalise"
    assert summary["by"]["track"]["knowledge"]["kscore"]["mean"] > 0.5
    assert "KScore" in res.output and "judge: vlm-kscore-v1:fake" in res.output
    assert any((tmp_path / "cache").rglob("*.json"))

    res = runner.invoke(app, ["bench", "--data", str(root), "--policy", "raw"])
    assert res.exit_code != 0 and "needs --judge" in res.output
    res = runner.invoke(app, ["bench", "--data", str(root), "--policy", "raw", "--judge", "https://judge.example.com/v1"],
                        env={"OPENAI_API_KEY": ""})
    assert res.exit_code != 0 and "OPENAI_API_KEY" in res.output
    (root / "bench" / "gt.png").unlink()
    res = runner.invoke(app, ["bench", "--data", str(root), "--policy", "raw", "--judge", fake_vlm])
    assert res.exit_code != 0 and "gt.png" in res.output


def test_experiences_with_sandbox_api_and_local_summarisers(rollout_run, fake_vlm, tmp_path):
    for summariser, extra in (("sandbox", []), (fake_vlm, ["--model", "fake"])):
        bank = tmp_path / f"bank-{len(extra)}"
        res = runner.invoke(app, ["experiences", "summarise", str(rollout_run), "--bank", str(bank), "--summariser", summariser,
                                  "--delta-min", "0.0", *extra])
        assert res.exit_code == 0, res.output
        counts = last_json(res.output)
        assert counts["added"] == 1 and counts["bank_size"] == 1, res.output
    # a local transformers model: the tiny policy is no summariser, so its answer is rejected and recorded
    res = runner.invoke(app, ["experiences", "summarise", str(rollout_run), "--bank", str(tmp_path / "bank-tiny"),
                              "--summariser", "tiny", "--delta-min", "0.0"])
    assert res.exit_code == 0, res.output
    assert "not summarised:" in res.output and last_json(res.output)["errors"] == 1


def test_llm_summariser_on_a_local_model():
    """LLMSummariser drives a local transformers policy; a valid answer becomes slots."""
    from genevolve.policies.base import Completion
    from genevolve.summarise import LLMSummariser

    class Local:
        name = "local"

        def generate(self, conversations, params):
            assert params.temperature == 0.0 and "You compare two attempts" in conversations[0][0]["content"]
            return [Completion(text=FakeVLM().answer({"messages": [{"role": "system", "content": ""},
                                                                   {"role": "user", "content": conversations[0][0]["content"]}]}))]

    from genevolve.experience import Pair
    from genevolve.records import Trajectory, Verdict

    t = Trajectory(id="t", request_id="r", request_text="x")
    pair = Pair("r", "x", t, t, Verdict(trajectory_id="t", request_id="r", reward=0.9), Verdict(trajectory_id="t", request_id="r"))
    slots = LLMSummariser(Local()).summarise(pair)
    assert slots["prompt_construction"] == "State counts and positions explicitly."


def test_wise_and_index(fake_vlm, tmp_path):
    data = tmp_path / "wise"
    data.mkdir()
    (data / "cultural_common_sense.json").write_text(json.dumps(
        [{"prompt_id": 1, "Prompt": "exactly two red circles", "Explanation": "", "Subcategory": "x"}]))
    out = tmp_path / "wise.json"
    res = runner.invoke(app, ["wise", "--data", str(data), "--judge", fake_vlm, "--judge-model", "fake", "--out", str(out),
                              "--judge-cache", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["categories"]["cultural"]["wiscore"] == pytest.approx(0.85)
    assert "overall WiScore: 0.850 (partial" in res.output
    res = runner.invoke(app, ["wise", "--data", str(tmp_path / "nothing"), "--judge", fake_vlm])
    assert res.exit_code != 0 and "no WISE prompt files" in res.output

    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.txt").write_text("The Vell bridge has seven arches.")
    Image.new("RGB", (8, 8)).save(src / "bridge.png")
    res = runner.invoke(app, ["index", str(src), "--out", str(tmp_path / "store")])
    assert res.exit_code == 0, res.output
    assert last_json(res.output)["images"] == 1
    res = runner.invoke(app, ["index", str(tmp_path / "missing-folder")])
    assert res.exit_code != 0 and "no folder to index" in res.output
