"""Records: JSONL round trips, schema checks, atomic writes, appends and the content-addressed image store."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from genevolve.records import schema as records
from genevolve.records.schema import (
    SCHEMA_VERSION,
    ImageRef,
    ImageStore,
    Observation,
    Program,
    ProgramRef,
    Request,
    RenderedImage,
    RunInfo,
    SchemaError,
    ToolCall,
    Trajectory,
    Turn,
    Verdict,
    append_jsonl,
    iter_jsonl,
    read_jsonl,
    write_jsonl,
)

# ---------------------------------------------------------------------------
# sample records (every field away from its default, so a lost field shows)
# ---------------------------------------------------------------------------


def _image_ref(n: int = 1) -> ImageRef:
    return ImageRef(img_id=f"IMG_{n:03d}", title=f"Veloria flag {n}", url=f"sandbox://refs/r{n:04d}.png",
                    local_path=f"/store/refs/r{n:04d}.png", page_url="https://wiki.example/veloria",
                    source_id=f"r{n:04d}")


def _program() -> Program:
    return Program(gen_prompt="The flag from the first reference image, \"ÅURORA 2031\" on a banner",
                   reference_images=[ProgramRef(img_id="IMG_001", note="flag"), ProgramRef(img_id="IMG_002")],
                   issues=["references re-sorted by id"])


def _trajectory() -> Trajectory:
    obs = Observation(tool="image_search", text="--- image search result for [flag] ---\nIMG_001: title: x",
                      images=[_image_ref(1), _image_ref(2)])
    turns = [
        Turn(index=0, raw="<think>a</think><tool_call>{}</tool_call>", think="a",
             tool_call=ToolCall(name="image_search", arguments={"query": "flag", "top_k": 3}),
             observation=obs, prompt_messages=2),
        Turn(index=1, raw="garbage", error="no <tool_call> and no <answer>",
             feedback="<tool_response>\nFormat error\n</tool_response>", prompt_messages=4),
        Turn(index=2, raw="<answer>{}</answer>", think="b", answer=_program(), forced_final=True, prompt_messages=6),
    ]
    return Trajectory(id="req-1-s3", request_id="req-1", request_text="Draw the Veloria flag", policy="expert",
                      seed=3, system_prompt="sys", guide="Search first.", turns=turns,
                      images=[_image_ref(1), _image_ref(2)], program=_program(), termination="no_answer",
                      errors=["turn 1: format error: no <tool_call> and no <answer>"])


SAMPLES = {
    "Request": Request(id="req-1", text="Draw the Veloria flag", track="knowledge", category="flags",
                       skills=["spatial_layout", "text_rendering"], difficulty=3, split="bench",
                       gt_image="ab" * 32, scene={"objects": [{"kind": "flag", "n": 2}], "bg": None},
                       entities=["veloria"], parse_error="nothing"),
    "ToolCall": ToolCall(name="search", arguments={"queries": ["a", "b"], "top_k": 2, "nested": {"x": [1, 2.5]}}),
    "ImageRef": _image_ref(7),
    "Observation": Observation(tool="image_search", text="line 1\nline 2", images=[_image_ref(1)],
                               error="RuntimeError: x"),
    "ProgramRef": ProgramRef(img_id="IMG_004", note="mascot"),
    "Program": _program(),
    "Turn": _trajectory().turns[0],
    "Trajectory": _trajectory(),
    "RenderedImage": RenderedImage(hash="cd" * 32, width=64, height=48, generator="sandbox", prompt="p",
                                   reference_hashes=["ef" * 32], seed=11),
    "Verdict": Verdict(trajectory_id="req-1-s3", request_id="req-1", image="cd" * 32, F=0.5, V=0.25, T=None,
                       A=0.75, kscore=0.3125, r_text=0.4, reward=0.35625, alpha=0.5, text_policy="zero",
                       rationale="ok", failed=None),
    "RunInfo": RunInfo(id="run-1", created="2025-01-01T00:00:00Z", command="rollout", policy="expert", k=6,
                       seed=1, requests=["req-1", "req-2"], config={"temperature": 0.7, "tags": ["a"]}),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_every_record_type(tmp_path, name):
    rec = SAMPLES[name]
    other = rec.model_copy(deep=True)
    path = tmp_path / f"{name}.jsonl"
    write_jsonl(path, [rec, other])
    back = read_jsonl(path, type(rec))
    assert back == [rec, other]
    assert all(type(b) is type(rec) for b in back)
    assert back[0].model_dump() == rec.model_dump()
    # one line per record, each a JSON object carrying the schema version
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["schema_version"] == SCHEMA_VERSION


def test_round_trip_detects_a_changed_field(tmp_path):
    # guards the round-trip test against a vacuous equality
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [SAMPLES["Trajectory"]])
    back = read_jsonl(path, Trajectory)[0]
    assert back == SAMPLES["Trajectory"]
    back.turns[0].tool_call.arguments["top_k"] = 4
    assert back != SAMPLES["Trajectory"]


def test_trajectory_helpers_survive_round_trip(tmp_path):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [SAMPLES["Trajectory"]])
    back = read_jsonl(path, Trajectory)[0]
    assert back.n_tool_calls == 1
    assert back.image("IMG_002") == _image_ref(2)
    assert back.image("IMG_009") is None
    assert back.turns[2].answer.reference_images[0].note == "flag"
    assert back.program.gen_prompt.endswith("\"ÅURORA 2031\" on a banner")


def test_write_jsonl_empty_iterable(tmp_path):
    path = tmp_path / "empty.jsonl"
    write_jsonl(path, [])
    assert path.read_text() == ""
    assert read_jsonl(path, Request) == []


def test_write_jsonl_creates_parent_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "c.jsonl"
    write_jsonl(path, [SAMPLES["Request"]])
    assert read_jsonl(path, Request) == [SAMPLES["Request"]]


# ---------------------------------------------------------------------------
# schema checks
# ---------------------------------------------------------------------------


def test_unknown_schema_version_rejected_by_model():
    with pytest.raises(ValidationError, match="schema_version 2"):
        ToolCall(name="search", schema_version=2)


def test_unknown_schema_version_rejected_by_reader(tmp_path):
    path = tmp_path / "req.jsonl"
    good = SAMPLES["Request"].model_dump()
    bad = dict(good, schema_version=SCHEMA_VERSION + 1)
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(SchemaError) as info:
        read_jsonl(path, Request)
    msg = str(info.value)
    assert f"{path}:2:" in msg
    assert "Request" in msg
    assert f"schema_version {SCHEMA_VERSION + 1}" in msg


def test_unknown_schema_version_in_nested_record_rejected(tmp_path):
    d = SAMPLES["Trajectory"].model_dump()
    d["turns"][1]["schema_version"] = 99
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(d) + "\n")
    with pytest.raises(SchemaError, match=r"t\.jsonl:1:"):
        read_jsonl(path, Trajectory)


def test_missing_schema_version_defaults_to_current():
    # old writers never omitted it, but a hand-written record without it is read as the current version
    assert ToolCall.model_validate({"name": "search"}).schema_version == SCHEMA_VERSION


def test_schema_error_is_a_value_error():
    assert issubclass(SchemaError, ValueError)


def test_extra_fields_rejected_by_model():
    with pytest.raises(ValidationError, match="bogus"):
        ToolCall.model_validate({"name": "search", "arguments": {}, "bogus": 1})
    with pytest.raises(ValidationError, match=r"tool_call\.extra\n.*Extra inputs are not permitted"):
        Turn.model_validate({"index": 0, "raw": "x", "tool_call": {"name": "s", "extra": True}})


def test_extra_fields_rejected_by_reader(tmp_path):
    path = tmp_path / "v.jsonl"
    d = SAMPLES["Verdict"].model_dump()
    d["surprise"] = "x"
    path.write_text(json.dumps(SAMPLES["Verdict"].model_dump()) + "\n" + json.dumps(d) + "\n")
    with pytest.raises(SchemaError, match=r"v\.jsonl:2: not a valid Verdict record"):
        read_jsonl(path, Verdict)


def test_wrong_type_rejected_by_reader(tmp_path):
    path = tmp_path / "r.jsonl"
    d = SAMPLES["Request"].model_dump()
    d["track"] = "sports"  # not a Track literal
    path.write_text(json.dumps(d) + "\n")
    with pytest.raises(SchemaError, match=r"r\.jsonl:1:"):
        read_jsonl(path, Request)


def test_torn_last_line_names_the_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    a, b = SAMPLES["RunInfo"], SAMPLES["RunInfo"].model_copy(update={"id": "run-2"})
    write_jsonl(path, [a, b])
    full = SAMPLES["RunInfo"].model_copy(update={"id": "run-3"}).model_dump_json()
    with path.open("a", encoding="utf-8") as fh:
        fh.write(full[: len(full) // 2])  # a crash mid-append: no closing brace, no newline
    with pytest.raises(SchemaError) as info:
        read_jsonl(path, RunInfo)
    assert f"{path}:3:" in str(info.value)
    # the good records before the torn line are still delivered by the iterator, then the error
    it = iter_jsonl(path, RunInfo)
    assert next(it) == a
    assert next(it) == b
    with pytest.raises(SchemaError, match=":3:"):
        next(it)


def test_blank_lines_are_skipped_and_line_numbers_still_count(tmp_path):
    path = tmp_path / "p.jsonl"
    rec = SAMPLES["ProgramRef"]
    path.write_text("\n" + rec.model_dump_json() + "\n   \n" + "{not json}\n")
    with pytest.raises(SchemaError, match=r"p\.jsonl:4:"):
        read_jsonl(path, ProgramRef)
    path.write_text("\n" + rec.model_dump_json() + "\n\n")
    assert read_jsonl(path, ProgramRef) == [rec]


# ---------------------------------------------------------------------------
# atomic writes and appends
# ---------------------------------------------------------------------------


def test_write_jsonl_leaves_no_temp_files(tmp_path):
    path = tmp_path / "reqs.jsonl"
    write_jsonl(path, [SAMPLES["Request"]])
    write_jsonl(path, [SAMPLES["Request"], SAMPLES["Request"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reqs.jsonl"]
    assert len(read_jsonl(path, Request)) == 2


def test_write_jsonl_keeps_old_content_when_serialisation_fails(tmp_path):
    path = tmp_path / "reqs.jsonl"
    old = [SAMPLES["Request"], SAMPLES["Request"].model_copy(update={"id": "req-2"})]
    write_jsonl(path, old)
    before = path.read_bytes()

    def records_then_crash():
        yield SAMPLES["Request"].model_copy(update={"id": "new-1"})
        raise RuntimeError("serialiser died")

    with pytest.raises(RuntimeError, match="serialiser died"):
        write_jsonl(path, records_then_crash())
    assert path.read_bytes() == before
    assert read_jsonl(path, Request) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reqs.jsonl"]


def test_write_jsonl_keeps_old_content_when_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "reqs.jsonl"
    write_jsonl(path, [SAMPLES["Request"]])
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(records.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_jsonl(path, [SAMPLES["Request"].model_copy(update={"id": "other"})])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reqs.jsonl"]  # the temp file was cleaned up


def test_append_jsonl_appends_whole_lines(tmp_path):
    path = tmp_path / "deep" / "dir" / "verdicts.jsonl"
    recs = [SAMPLES["Verdict"].model_copy(update={"trajectory_id": f"t{i}", "kscore": i / 4}) for i in range(3)]
    for r in recs:
        append_jsonl(path, r)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    assert text.count("\n") == 3
    assert [json.loads(line)["trajectory_id"] for line in text.splitlines()] == ["t0", "t1", "t2"]
    assert read_jsonl(path, Verdict) == recs


def test_append_jsonl_after_write_jsonl_keeps_existing(tmp_path):
    path = tmp_path / "reqs.jsonl"
    first = SAMPLES["Request"]
    write_jsonl(path, [first])
    second = first.model_copy(update={"id": "req-2", "text": "line one\nline two"})  # newline inside a field
    append_jsonl(path, second)
    assert path.read_text().count("\n") == 2
    assert read_jsonl(path, Request) == [first, second]


def test_atomic_write_json_round_trip(tmp_path):
    path = tmp_path / "cfg.json"
    records.atomic_write_json(path, {"a": [1, 2], "ü": "ß"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": [1, 2], "ü": "ß"}
    assert "ü" in path.read_text(encoding="utf-8")  # not \\u-escaped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json"]


# ---------------------------------------------------------------------------
# ImageStore
# ---------------------------------------------------------------------------


def _image(color=(10, 200, 30), size=(8, 6)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_image_store_put_get_contains_path(tmp_path):
    store = ImageStore(tmp_path / "images")
    im = _image()
    h = store.put(im)
    assert h == hashlib.sha256(ImageStore.encode(im)).hexdigest()
    assert len(h) == 64
    assert h in store
    p = store.path(h)
    assert p == tmp_path / "images" / h[:2] / f"{h}.png"
    assert p.is_file()
    assert hashlib.sha256(p.read_bytes()).hexdigest() == h
    back = store.get(h)
    assert back.mode == "RGB"
    assert back.size == (8, 6)
    assert np.array_equal(np.asarray(back), np.asarray(im))


def test_image_store_same_image_stored_once(tmp_path):
    store = ImageStore(tmp_path)
    h1 = store.put(_image())
    mtime = store.path(h1).stat().st_mtime_ns
    h2 = store.put(_image())  # equal pixels, a different object
    h3 = store.put(_image(color=(1, 2, 3)))
    assert h1 == h2
    assert h3 != h1
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 2
    assert store.path(h1).stat().st_mtime_ns == mtime  # not rewritten
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_image_store_put_numpy_array_matches_pil(tmp_path):
    store = ImageStore(tmp_path)
    arr = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    h = store.put(arr)
    assert h == store.put(Image.fromarray(arr))
    assert np.array_equal(np.asarray(store.get(h)), arr)


def test_image_store_put_bytes(tmp_path):
    store = ImageStore(tmp_path)
    data = ImageStore.encode(_image())
    h = store.put_bytes(data)
    assert h == hashlib.sha256(data).hexdigest()
    assert store.put_bytes(data) == h
    assert store.path(h).read_bytes() == data


@pytest.mark.parametrize("bad", ["", "abc", "../../etc/passwd", "AB" * 32, "zz" * 32, "ab/cd" * 8,
                                 "abcdef0 " * 8, "..abcdef01"])
def test_image_store_rejects_bad_hash_strings(tmp_path, bad):
    store = ImageStore(tmp_path)
    with pytest.raises(ValueError, match="not an image hash"):
        store.path(bad)
    with pytest.raises(ValueError, match="not an image hash"):
        store.get(bad)
    assert bad not in store


def test_image_store_missing_image_raises_key_error(tmp_path):
    store = ImageStore(tmp_path)
    missing = hashlib.sha256(b"never stored").hexdigest()
    assert missing not in store
    with pytest.raises(KeyError, match=missing):
        store.get(missing)
    store.put(_image())
    with pytest.raises(KeyError, match=missing):
        store.get(missing)


def test_image_store_persists_across_instances(tmp_path):
    h = ImageStore(tmp_path).put(_image(color=(5, 6, 7)))
    other = ImageStore(str(tmp_path))
    assert h in other
    assert other.get(h).getpixel((0, 0)) == (5, 6, 7)


def test_image_store_get_converts_to_rgb(tmp_path):
    store = ImageStore(tmp_path)
    rgba = Image.new("RGBA", (3, 3), (9, 8, 7, 128))
    h = store.put(rgba)
    out = store.get(h)
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (9, 8, 7)


def test_image_store_does_not_touch_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "store"
    ImageStore(root).put(_image())
    assert sorted(os.listdir(tmp_path)) == ["store"]
    assert Path(root).is_dir()


def test_mean_ci_uses_student_t_for_few_seeds():
    from genevolve.evaluation.bench import mean_ci

    m, h = mean_ci([0.30, 0.32, 0.34])
    assert m == pytest.approx(0.32) and h == pytest.approx(4.3027 * 0.02 / 3 ** 0.5, rel=1e-3)
    assert mean_ci([0.30, 0.32, 0.34], z=1.96)[1] == pytest.approx(1.96 * 0.02 / 3 ** 0.5)
    assert mean_ci([0.5]) == (0.5, None)  # one value: no interval (null, never NaN)
    assert mean_ci([]) == (None, None)


def test_json_never_holds_nan(tmp_path):
    from genevolve.records.schema import atomic_write_json

    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not JSON compliant"):
            atomic_write_json(tmp_path / "x.json", {"kscore": bad})
    assert not (tmp_path / "x.json").exists()


def test_run_folder_exists_whole_before_any_case(tmp_path):
    from genevolve.records.schema import RunInfo
    from genevolve.records.runs import RunWriter, load_run

    w = RunWriter(tmp_path / "run", RunInfo(id="r", created="now", command="rollout", policy="p", k=0, seed=0))
    for name in ("requests.jsonl", "trajectories.jsonl", "renders.jsonl", "verdicts.jsonl"):
        assert (tmp_path / "run" / name).read_text() == ""
    assert (tmp_path / "run" / "images").is_dir()
    w.finish({})
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["note"] == "no trajectories ran"
    assert load_run(tmp_path / "run").verdicts == []


def test_unjudged_cases_are_missing_not_zero():
    from genevolve.evaluation.bench import aggregate

    judged = Request(id="a", text="t", track="quality", category="c", difficulty=2)
    outside = Request(id="b", text="a cat", track=None, category=None, difficulty=None)
    pairs = [(judged, Verdict(trajectory_id="1", request_id="a", kscore=0.6, F=1, V=0.5, A=0.5, r_text=1, reward=0.8)),
             (judged, Verdict(trajectory_id="2", request_id="a", failed="no program (no_answer)")),
             (outside, Verdict(trajectory_id="3", request_id="b", failed="no ground truth: outside", F=None, V=None,
                               A=None, kscore=None, r_text=None, reward=None))]
    out = aggregate(pairs)
    assert out["overall"]["all"] == {"n": 3, "failed": 1, "missing": 1, "kscore": pytest.approx(0.3), "F": 0.5,
                                     "V": 0.25, "T": None, "A": 0.25, "r_text": 0.5, "reward": 0.4}
    assert set(out["track"]) == {"quality"} and set(out["difficulty"]) == {"2"} and set(out["category"]) == {"c"}
    alone = aggregate(pairs[2:])["overall"]["all"]
    assert alone["kscore"] is None and alone["missing"] == 1


def test_an_append_after_a_torn_line_sets_the_fragment_aside_instead_of_gluing_the_next_row(tmp_path):
    from genevolve.records.schema import append_jsonl

    path = tmp_path / "trajectories.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "turns": [{"raw": "half')  # power loss in the middle of a row
    append_jsonl(path, Request(id="bench-1", text="a red cube", track="quality", category="c", difficulty=1))
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"id": "a"} and json.loads(lines[1])["id"] == "bench-1"
    assert (tmp_path / "trajectories.jsonl.torn").read_text().startswith('{"id": "b"')  # kept, not lost


def test_two_writers_started_at_once_into_one_folder_the_second_is_refused(tmp_path):
    import threading

    from genevolve.records.runs import RunWriter

    results, barrier = [], threading.Barrier(8)

    def start(i):
        barrier.wait()
        try:
            RunWriter(tmp_path / "run", RunInfo(id=f"run-{i}", created="now", command="rollout", policy="expert", k=1, seed=i))
            results.append(("ok", i))
        except FileExistsError as exc:
            results.append(("refused", str(exc)))

    threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0] for r in results].count("ok") == 1
    assert all("already holds a run" in r[1] for r in results if r[0] == "refused")  # worded exactly in test_runs.py
    winner = next(i for kind, i in results if kind == "ok")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["seed"] == winner
    assert not list((tmp_path / "run").glob(".run.json.*"))
