"""Run folders (genevolve/records/runs.py) read back exactly as written: ids, the writer's files and counters,
the summary's note, ``load_run`` and the policy checksum computed by hand."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re

import pytest
from PIL import Image

from genevolve.records.runs import RunWriter, WEIGHT_SUFFIXES, load_run, new_run_id, now_iso, policy_checksum
from genevolve.records.schema import ImageStore, Program, RenderedImage, Request, RunInfo, Trajectory, Verdict


def _info(command="rollout", seed=0):
    return RunInfo(id="r-1", created="2026-01-01T00:00:00+00:00", command=command, policy="expert", k=2, seed=seed,
                   requests=["a"], config={"temperature": 0.7})


def _traj(tid, answered=True):
    return Trajectory(id=tid, request_id="a", request_text="a red cube", policy="expert", seed=1,
                      program=Program(gen_prompt="a red cube") if answered else None,
                      termination="answer" if answered else "no_answer")


def _verdict(tid, reward=0.5):
    return Verdict(trajectory_id=tid, request_id="a", kscore=reward, reward=reward)


def test_run_ids_name_the_prefix_the_local_second_and_a_random_suffix():
    before = dt.datetime.now().replace(microsecond=0)
    rid = new_run_id()
    after = dt.datetime.now()
    m = re.fullmatch(r"run-(\d{8}-\d{6})-([0-9a-f]{4})", rid)
    assert m, rid
    assert before <= dt.datetime.strptime(m.group(1), "%Y%m%d-%H%M%S") <= after
    assert re.fullmatch(r"bench-\d{8}-\d{6}-[0-9a-f]{4}", new_run_id("bench"))
    assert len({new_run_id() for _ in range(20)}) > 1  # the suffix is random


def test_now_iso_is_utc_to_the_second():
    s = now_iso()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", s), s
    assert abs((dt.datetime.fromisoformat(s) - dt.datetime.now(dt.timezone.utc)).total_seconds()) < 5


def test_the_writer_claims_the_folder_writes_run_json_first_and_every_file_empty(tmp_path):
    w = RunWriter(tmp_path / "run", _info())
    d = tmp_path / "run"
    assert (d / "run.json").read_text("utf-8") == _info().model_dump_json(indent=2)  # indented for people
    mark = json.loads((d / ".kind").read_text())
    assert (mark["kind"], mark["command"]) == ("rollout", "rollout")
    assert sorted(p.name for p in d.iterdir()) == [".kind", "images", "renders.jsonl", "requests.jsonl", "run.json",
                                                   "trajectories.jsonl", "verdicts.jsonl"]
    assert w.dir == d and w.info == _info() and (w.cases, w.answered) == (0, 0) and w.images.root == d / "images"
    RunWriter(tmp_path / "bench", _info("bench"))
    mark = json.loads((tmp_path / "bench" / ".kind").read_text())
    assert (mark["kind"], mark["command"]) == ("bench", "bench")
    RunWriter(tmp_path / "other", _info("replay"))  # a command of no known kind writes a rollout folder
    mark = json.loads((tmp_path / "other" / ".kind").read_text())
    assert (mark["kind"], mark["command"]) == ("rollout", "replay")
    with pytest.raises(FileExistsError, match=r"already holds a run; choose another --out"):
        RunWriter(d, _info(seed=1))
    assert RunInfo.model_validate_json((d / "run.json").read_text()).seed == 0  # the first writer's, untouched
    with pytest.raises(FileExistsError) as err:  # a writer that passed the first check as another claimed the folder
        w._claim(_info(seed=2))
    assert str(err.value) == f"{d} already holds a run (another writer started there just now); choose another --out"
    assert not list(d.glob(".run.json.*")) and RunInfo.model_validate_json((d / "run.json").read_text()).seed == 0


def test_cases_append_in_order_and_load_back_whole(tmp_path):
    w = RunWriter(tmp_path / "run", _info())
    gt = Image.new("RGB", (4, 3), (200, 10, 10))
    w.add_request(Request(id="a", text="a red cube"), gt_image=gt)
    w.add_request(Request(id="b", text="a blue cube"))
    assert [p.name for p in (tmp_path / "run" / "images").rglob("*.png")] == [f"{ImageStore.digest(gt)}.png"]
    render = RenderedImage(hash="ab" * 32, width=4, height=3, generator="sandbox", prompt="a red cube", seed=1)
    w.add(_traj("t1"), render, _verdict("t1", 0.75))
    w.add(_traj("t2", answered=False), None, _verdict("t2", 0.0))
    w.add(_traj("t3"), None, _verdict("t3", 0.25))
    assert (w.cases, w.answered) == (3, 2)
    w.finish({"kscore": 0.5})
    run = load_run(tmp_path / "run")
    assert run.dir == tmp_path / "run" and run.info == _info()
    assert [r.id for r in run.requests] == ["a", "b"]
    assert [t.id for t in run.trajectories] == ["t1", "t2", "t3"] and run.trajectories[0] == _traj("t1")
    assert run.renders == [render]
    assert [v.trajectory_id for v in run.verdicts] == ["t1", "t2", "t3"]
    assert run.verdict("t3") == _verdict("t3", 0.25) and run.verdict("t9") is None
    assert run.images.root == tmp_path / "run" / "images"
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"kscore": 0.5}  # no note: some answered


def test_the_verdict_of_a_trajectory_is_its_first(tmp_path):
    w = RunWriter(tmp_path / "run", _info())
    w.add(_traj("t1"), None, _verdict("t1", 0.75))
    w.add(_traj("t2"), None, _verdict("t2", 0.5))
    w.add(_traj("t1"), None, _verdict("t1", 0.1))
    assert load_run(tmp_path / "run").verdict("t1").reward == 0.75


def test_a_summary_says_why_it_has_no_answer(tmp_path):
    w = RunWriter(tmp_path / "none", _info())
    w.add(_traj("t1", answered=False), None, _verdict("t1", 0.0))
    w.finish({"kscore": None})
    assert json.loads((tmp_path / "none" / "summary.json").read_text()) == {
        "kscore": None, "note": "no trajectory produced an answer"}
    RunWriter(tmp_path / "empty", _info()).finish({"kscore": None})
    assert json.loads((tmp_path / "empty" / "summary.json").read_text())["note"] == "no trajectories ran"


def test_load_run_names_a_folder_that_is_not_a_run_and_reads_missing_files_as_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'x'} is not a run folder (no run.json)")):
        load_run(tmp_path / "x")
    RunWriter(tmp_path / "run", _info())
    for name in ("requests.jsonl", "trajectories.jsonl", "renders.jsonl", "verdicts.jsonl"):
        (tmp_path / "run" / name).unlink()
    run = load_run(str(tmp_path / "run"))
    assert (run.requests, run.trajectories, run.renders, run.verdicts) == ([], [], [], [])


def _by_hand(*folders) -> str:
    h = hashlib.sha256()
    for d in folders:
        for p in sorted(q for q in d.iterdir() if q.suffix in WEIGHT_SUFFIXES):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_the_policy_checksum_of_a_local_model_hashes_its_weight_files_names_and_bytes(tmp_path):
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    model.mkdir(), adapter.mkdir()
    (model / "b.safetensors").write_bytes(b"\x01" * 10 + b"\x02" * (3 << 20))  # more than one read block
    (model / "a.bin").write_bytes(b"weights")
    (model / "config.json").write_text("{}")  # not a weight file: not hashed
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    assert policy_checksum(str(model)) == _by_hand(model)
    assert policy_checksum(str(model), str(adapter)) == _by_hand(model, adapter) != policy_checksum(str(model))
    before = policy_checksum(str(model))
    (model / "config.json").write_text('{"x": 1}')
    assert policy_checksum(str(model)) == before
    (model / "b.safetensors").write_bytes(b"\x01" * 10 + b"\x02" * (3 << 20) + b"\x03")  # a byte past the first block
    assert policy_checksum(str(model)) != before
    with pytest.raises(FileNotFoundError, match=re.escape(f"no weight files (.safetensors, .bin, .gguf, .pt, .pth) in {tmp_path / 'nothing'}")):
        policy_checksum(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="no weight files"):
        policy_checksum(str(model), str(tmp_path / "config-only"))


def test_the_policy_checksum_of_scripted_and_remote_policies_names_their_label_or_server():
    sha = lambda s: hashlib.sha256(s.encode()).hexdigest()  # noqa: E731
    assert policy_checksum("expert") == sha("expert") and policy_checksum("raw") == sha("raw")
    assert policy_checksum("expert", label="expert(noise=0.3)") == sha("expert(noise=0.3)")
    assert policy_checksum("raw", label="raw(x)") == sha("raw(x)")
    assert policy_checksum("http://h:1/v1") == sha("http://h:1/v1|default")
    assert policy_checksum("https://h/v1", model="m") == sha("https://h/v1|m")


def test_the_named_local_policies_hash_their_installed_folders(tmp_path, monkeypatch):
    from genevolve.policies import resolve, tiny

    for name in ("tiny", "smol"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(name.encode() * 3)
    monkeypatch.setattr(tiny, "TINY_DIR", tmp_path / "tiny")
    monkeypatch.setattr(resolve, "smollm2_path", lambda: (tmp_path / "smol", "model.gguf"))
    assert policy_checksum("tiny") == _by_hand(tmp_path / "tiny")
    assert policy_checksum("smollm2") == _by_hand(tmp_path / "smol") != policy_checksum("tiny")
