"""The interop commands end to end: official bench with a VLM judge, WISE, data import/export, summaries, index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from genevolve.cli import app
from genevolve.records.runs import load_run

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
    assert counts["requests"] == 2 and counts["trajectories"] >= 1 and counts["missing_pictures"] == 0  # b1 and the rollouts' request
    imported = load_run(tmp_path / "imported")
    assert {t.request_id for t in imported.trajectories} == {req.id}  # K rollouts of one request stay grouped
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


@pytest.mark.parametrize("policy", ["zero", "exclude"])
def test_an_out_of_rubric_program_level_is_missing_in_the_table_and_the_note_alike(rollout_run, tmp_path, policy):
    """The program judge answers level 0.6 (not a rubric level): the case is missing, and under either policy the
    table's KScore is the one the note gives for that policy."""
    run = load_run(rollout_run)
    root = tmp_path / "official"
    (root / "bench").mkdir(parents=True)
    req = run.requests[0]
    run.images.get(req.gt_image).save(root / "bench" / "gt.png")
    (root / "bench" / "rows.jsonl").write_text(json.dumps({"id": "b1", "question": req.text, "gt_image": "gt.png",
                                                           "eval_type": "knowledge", "category": "flags", "difficulty": 2}) + "\n")
    out = tmp_path / "bench.json"
    with serve_app(FakeVLM("level_outside").app()) as url:
        res = runner.invoke(app, ["bench", "--data", str(root), "--policy", "expert", "--seeds", "0", "--judge", url + "/v1",
                                  "--judge-model", "fake", "--missing", policy, "--out", str(out),
                                  "--judge-cache", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    summary = json.loads(out.read_text())
    m = summary["missing"]["0"] if "0" in summary["missing"] else next(iter(summary["missing"].values()))
    assert m["n"] == 1 and "program sufficiency" in next(iter(m["errors"].values()))
    table_k = summary["by"]["overall"]["all"]["kscore"]["mean"] if summary["by"]["overall"] else None
    if policy == "zero":
        assert table_k == pytest.approx(0.0) and m["kscore_missing_as_zero"] == pytest.approx(0.0)
        assert "counted as 0 in the table" in res.output and "KScore with them as 0: 0.000" in res.output
    else:
        assert table_k is None and "left out of the table's means" in res.output  # nothing left to average, and the note says why


def test_data_import_writes_a_run_folder_that_reads_like_any_other(tmp_path, world):
    """Official rows in: a whole run folder out, which export, the experience miner and the studio all read."""
    from studio.html import run_view

    root = tmp_path / "official"
    row = json.loads((Path(__file__).parent / "data" / "official_sft_row.json").read_text(encoding="utf-8"))
    (root / "sft").mkdir(parents=True)
    for i, rel in enumerate(row["images"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (60 * i, 20, 200 - 40 * i)).save(root / rel)
    (root / "sft" / "train.jsonl").write_text(json.dumps(row) + "\n")
    (root / "bench").mkdir()
    req = world.split("bench")[0]
    world.gt_image(req).save(root / "bench" / "gt.png")
    (root / "bench" / "rows.jsonl").write_text(json.dumps({"id": "b1", "question": req.text, "gt_image": "gt.png"}) + "\n")

    out = tmp_path / "imported"
    res = runner.invoke(app, ["data", "import", str(root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} >= {"run.json", "requests.jsonl", "trajectories.jsonl", "images"}
    run = load_run(out)
    assert run.info.command == "data import" and run.info.policy == "imported"
    assert [r.id for r in run.requests] == ["b1", "sft-00000"] and run.info.requests == ["b1", "sft-00000"]
    assert run.requests[1].text == row["messages"][1]["content"] and run.requests[0].gt_image in run.images
    t = run.trajectories[0]
    assert t.request_id == "sft-00000" and len(t.turns) == 11
    for im in t.images:  # every picture is in the run's content-addressed store
        assert Path(im.local_path).is_file() and Path(im.local_path).stem in run.images
    res = runner.invoke(app, ["data", "import", str(root), "--out", str(out)])
    assert res.exit_code != 0 and "already holds a run" in res.output

    res = runner.invoke(app, ["data", "export", str(out), "--out", str(tmp_path / "again" / "sft" / "train.jsonl")])
    assert res.exit_code == 0, res.output
    back = json.loads((tmp_path / "again" / "sft" / "train.jsonl").read_text())
    assert back["messages"] == row["messages"] and len(back["images"]) == 4
    res = runner.invoke(app, ["experiences", "summarise", str(out), "--bank", str(tmp_path / "bank")])
    assert res.exit_code == 0, res.output
    assert last_json(res.output)["pairs"] == 0  # nothing judged yet, so nothing to compare
    head, cols, _ = run_view(run)
    assert "1 trajectories by imported" in head and "ge-col" in cols


def test_experiences_with_sandbox_api_and_local_summarisers(rollout_run, fake_vlm, tmp_path):
    for summariser, extra in (("sandbox", []), (fake_vlm, ["--model", "fake"])):
        bank = tmp_path / f"bank-{len(extra)}"
        res = runner.invoke(app, ["experiences", "summarise", str(rollout_run), "--bank", str(bank), "--summariser", summariser,
                                  "--delta-min", "0.0", *extra])
        assert res.exit_code == 0, res.output
        counts = last_json(res.output)
        assert counts["added"] == 1 and counts["bank_size"] == 1, res.output
    with (bank / "experiences.jsonl").open("a") as fh:  # a torn line (power loss) in the bank
        fh.write('{"schema_version": 1, "id": "torn"\n')
    res = runner.invoke(app, ["experiences", "summarise", str(rollout_run), "--bank", str(bank), "--delta-min", "0.0"])
    assert res.exit_code == 0 and f"broken bank line set aside: {bank / 'experiences.jsonl'}:2:" in res.output, res.output
    assert "torn" in (bank / "experiences.rejected.jsonl").read_text()
    # a local transformers model: the tiny policy is no summariser, so its answer is rejected and recorded
    res = runner.invoke(app, ["experiences", "summarise", str(rollout_run), "--bank", str(tmp_path / "bank-tiny"),
                              "--summariser", "tiny", "--delta-min", "0.0"])
    assert res.exit_code == 0, res.output
    assert "not summarised:" in res.output and last_json(res.output)["errors"] == 1


def test_llm_summariser_on_a_local_model():
    """LLMSummariser drives a local transformers policy; a valid answer becomes slots."""
    from genevolve.policies.base import Completion
    from genevolve.experience.summarise import LLMSummariser

    class Local:
        name = "local"

        def generate(self, conversations, params):
            assert params.temperature == 0.0 and "You compare two attempts" in conversations[0][0]["content"]
            return [Completion(text=FakeVLM().answer({"messages": [{"role": "system", "content": ""},
                                                                   {"role": "user", "content": conversations[0][0]["content"]}]}))]

    from genevolve.experience.bank import Pair
    from genevolve.records.schema import Trajectory, Verdict

    t = Trajectory(id="t", request_id="r", request_text="x")
    pair = Pair("r", "x", t, t, Verdict(trajectory_id="t", request_id="r", reward=0.9), Verdict(trajectory_id="t", request_id="r"))
    summary = LLMSummariser(Local()).summarise(pair)
    assert summary.slots["prompt_construction"] == "State counts and positions explicitly."
    assert summary.key.trigger == "Situation: a group of objects with an exact count."


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
    res = runner.invoke(app, ["wise", "--data", str(tmp_path / "nothing"), "--judge", fake_vlm,
                              "--judge-cache", str(tmp_path / "c2")])
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
