"""The command line end to end: rollout run folders, bench JSON, and clear errors for bad input."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from genevolve.cli import app
from genevolve.records.schema import Trajectory, Verdict, read_jsonl
from genevolve.records.runs import load_run

runner = CliRunner()


def test_rollout_writes_a_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["rollout", "--request", "Draw the flag of the 2031 Aurora Cup champion above exactly three gold stars",
                              "-k", "3", "--seed", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "KScore" in res.output and str(out) in res.output
    run = load_run(out)
    assert len(run.trajectories) == 3 and len(run.verdicts) == 3 and len(run.renders) == 3
    assert run.info.k == 3 and run.info.seed == 1
    for v, r in zip(run.verdicts, run.renders):
        assert v.failed is None and v.image == r.hash and r.hash in run.images
    assert run.requests[0].gt_image in run.images
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["all"]["n"] == 3
    # Same seed, same trajectories: the run is reproducible.
    out2 = tmp_path / "run2"
    runner.invoke(app, ["rollout", "--request", run.requests[0].text, "-k", "3", "--seed", "1", "--out", str(out2)])
    assert [t.turns[-1].raw for t in load_run(out2).trajectories] == [t.turns[-1].raw for t in run.trajectories]


def test_rollout_keeps_every_request_it_is_given(tmp_path):
    """-r repeated: every request is rolled out K times into the one run folder (it once kept only the last)."""
    out = tmp_path / "run"
    ids = ["bench-1000", "bench-1001", "bench-1002"]
    res = runner.invoke(app, ["rollout", *[x for i in ids for x in ("-r", i)], "-k", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    run = load_run(out)
    assert [r.id for r in run.requests] == ids == run.info.requests
    assert sorted(t.request_id for t in run.trajectories) == sorted(ids * 2) and len({t.id for t in run.trajectories}) == 6
    assert json.loads((out / "summary.json").read_text())["overall"]["all"]["n"] == 6
    res = runner.invoke(app, ["rollout", "-r", "bench-1000", "-r", "bench-1000", "--out", str(tmp_path / "twice")])
    assert res.exit_code != 0 and "given twice" in " ".join(res.output.replace("│", " ").split())


def test_rollout_refuses_to_overwrite_a_run(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["rollout", "-r", "bench-1000", "-k", "1", "--out", str(out)]).exit_code == 0
    res = runner.invoke(app, ["rollout", "-r", "bench-1000", "-k", "1", "--out", str(out)])
    assert res.exit_code == 2 and "already holds a run" in res.output and "Traceback" not in res.output


def strict_json(path):
    """Standard JSON only: NaN or Infinity in a file fails the test."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_request_outside_the_sandbox_gets_no_score(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["rollout", "-r", "a watercolor of a cat reading", "-k", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "outside the sandbox world" in text and "trained only on sandbox requests" in text
    run = load_run(out)
    req = run.requests[0]
    assert req.track is None and req.difficulty is None and req.category is None and req.gt_image is None
    assert len(run.verdicts) == 2 and all(t.termination == "answer" for t in run.trajectories)
    for v in run.verdicts:  # rendered, but nothing to compare it with: null, never 0
        assert v.kscore is None and v.reward is None and v.F is None and v.failed.startswith("no ground truth") and v.image
    summary = strict_json(out / "summary.json")
    row = summary["overall"]["all"]
    assert row["n"] == 2 and row["missing"] == 2 and row["failed"] == 0 and row["kscore"] is None
    assert summary["track"] == {} and summary["difficulty"] == {}


def test_a_run_folder_is_complete_when_no_trajectory_answers(tmp_path, monkeypatch):
    from genevolve.evaluation import bench as evaluation

    def no_answers(reqs, pol, tools, k, seed, params=None, guides=None, on_turn=None):
        return [Trajectory(id=f"{r.id}-{i}", request_id=r.id, request_text=r.text, termination="max_rounds_reached")
                for r in reqs for i in range(k)]

    monkeypatch.setattr(evaluation, "trajectories", no_answers)
    out = tmp_path / "run"
    res = runner.invoke(app, ["rollout", "-r", "bench-1000", "-k", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "renders.jsonl").read_text() == "" and (out / "images").is_dir()
    assert len(read_jsonl(out / "verdicts.jsonl", Verdict)) == 2
    summary = strict_json(out / "summary.json")
    assert summary["note"] == "no trajectory produced an answer"
    assert summary["overall"]["all"]["failed"] == 2 and summary["overall"]["all"]["kscore"] == 0.0


def test_bench_saves_json_by_track_and_category(tmp_path):
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", "--policy", "raw", "--seeds", "0,1", "--limit", "6", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["policy"] == "raw" and data["seeds"] == [0, 1] and data["n_requests"] == 6
    assert set(data["by"]) == {"overall", "track", "category", "difficulty"}
    k = data["by"]["overall"]["all"]["kscore"]
    assert 0.0 <= k["mean"] <= 1.0 and k["ci95"] >= 0.0


def test_bench_with_one_seed_writes_null_not_nan(tmp_path):
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", "--policy", "raw", "--seeds", "0", "--limit", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = strict_json(out)
    assert data["by"]["overall"]["all"]["kscore"]["ci95"] is None  # one seed: no interval
    assert data["protocol_valid"]["ci95"] is None


def test_bench_records_what_it_ran_under_a_name_of_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "..")  # wherever a command starts, its default output goes to the runs folder
    monkeypatch.setenv("GENEVOLVE_RUNS", str(tmp_path / "runs"))
    names = []
    for noise in ("none", "cold-start"):
        res = runner.invoke(app, ["bench", "--policy", "expert", "--noise", noise, "--seeds", "0", "--limit", "2"])
        assert res.exit_code == 0, res.output
        names += [p.name for p in (tmp_path / "runs").glob("*.json") if p.name not in names]
    assert len(names) == 2, names  # two policies, two files
    for name in names:
        data = strict_json(tmp_path / "runs" / name)
        assert data["policy_sha256"][:8] in name and data["policy"].split("[")[0] in name
        assert data["adapter"] is None and data["world"].endswith("world")
    from genevolve.records.runs import policy_checksum

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"lora weights")
    tiny = policy_checksum("tiny")
    assert len(tiny) == 64 and tiny != policy_checksum("tiny", str(adapter))
    assert policy_checksum("expert", label="expert") != policy_checksum("expert", label="expert[cold-start]")


def test_bad_options_give_clear_errors(tmp_path):
    res = runner.invoke(app, ["bench", "--skip-skill", "juggling", "--limit", "1", "--out", str(tmp_path / "x.json")])
    assert res.exit_code != 0 and "unknown skill" in res.output
    res = runner.invoke(app, ["rollout", "-r", "bench-1000", "--policy", "oracle", "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "unknown policy" in res.output
    res = runner.invoke(app, ["bench", "--split", "nope", "--out", str(tmp_path / "y.json")])
    assert res.exit_code != 0 and "no requests in split" in str(res.exception)


def test_help_explains_every_option():
    for cmd in (["rollout"], ["bench"], ["world", "build"]):
        res = runner.invoke(app, cmd + ["--help"])
        assert res.exit_code == 0
    text = runner.invoke(app, ["rollout", "--help"]).output
    for opt in ("--request", "-k", "--seed", "--out", "--policy", "--noise"):
        assert opt in text


def test_rollout_against_a_serper_compatible_server(tmp_path, monkeypatch, world):
    """The HTTP search backend end to end, against a Serper-format server on loopback."""
    import base64
    import io
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    ref = next(r for r in world.refs.values() if r["entity"] == "nation:veloria" and r["variant"] == "official")
    buf = io.BytesIO()
    world.ref_image(ref["id"]).save(buf, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            if self.path == "/search":
                payload = {"organic": [{"title": "2031 Aurora Cup final", "link": "http://x/1",
                                        "snippet": "The 2031 Aurora Cup was won by Veloria."}]}
            else:
                payload = {"images": [{"title": "Official flag of Veloria", "imageUrl": data_uri, "link": "http://x/2"}]}
            out = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("SERPER_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.delenv("SERPER_API_KEY", raising=False)
        monkeypatch.setenv("IMAGE_DOWNLOAD_DIR", str(tmp_path / "dl"))
        out = tmp_path / "run"
        res = runner.invoke(app, ["rollout", "-r", "Draw the flag of the 2031 Aurora Cup champion", "-k", "1",
                                  "--noise", "none", "--search", "serper", "--out", str(out)])
        assert res.exit_code == 0, res.output
    finally:
        server.shutdown()
    assert [p for p, _ in seen] == ["/search", "/images"]
    assert seen[0][1] == {"q": "2031 Aurora Cup winner", "num": 3}
    run = load_run(out)
    traj = run.trajectories[0]
    assert traj.program.reference_images[0].img_id == "IMG_001"
    v = run.verdicts[0]
    assert v.failed is None and v.V == 1.0  # the downloaded reference is the official flag
