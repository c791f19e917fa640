"""Studio services and the distill job manager: rollouts to run folders, banks, references, one job at a time."""

from __future__ import annotations

import json
import stat
import time

import pytest

from genevolve.agent.guides import SLOTS
from genevolve.records.runs import load_run
from studio import StudioError
from studio.html import run_view
from studio.jobs import DistillJobs
from studio.services import EXPERT, EXPERT_NOISY, RAW, Services


@pytest.fixture(scope="module")
def services(tmp_path_factory, world):
    root = tmp_path_factory.mktemp("studio")
    return Services.create(world_dir=world.root, runs_dir=root / "runs", data_dir=root / "data")


def test_rollouts_become_a_run_folder_with_k_columns(services):
    req = services.resolve_request(services.request_choices()[0])
    assert req.id.startswith("bench-")
    path = services.run_rollouts(req, EXPERT_NOISY, 3, seed=1)
    run = load_run(path)
    assert len(run.trajectories) == 3 and run.info.command == "rollout"
    head, cols, diff = run_view(run)
    assert 'data-columns="3"' in cols and cols.count("data:image/png;base64,") >= 6  # renders and ground truths
    assert str(path.relative_to(services.runs_dir)) in services.list_runs()
    free = services.resolve_request("Draw three gold stars in the top of the image")
    assert free.id.startswith("adhoc-") and services.run_rollouts(free, RAW, 1, 0).exists()
    assert services.request_note(free) == ""
    outside = services.resolve_request("a watercolor of a cat reading")
    note = services.request_note(outside)
    assert "outside the sandbox world" in note and "trained only on sandbox requests" in note
    run = load_run(services.run_rollouts(outside, EXPERT_NOISY, 2, 0))
    assert run.verdicts[0].kscore is None and json.loads((run.dir / "summary.json").read_text())["overall"]["all"]["missing"] == 2
    head, cols, diff = run_view(run)  # unscored cases have no best and worst
    assert 'data-columns="2"' in cols


def test_paths_outside_the_runs_folder_are_refused(services):
    for bad in ("../world", "/etc", "studio-bank/../../world"):
        with pytest.raises(StudioError, match="not inside"):
            services.run_path(bad)
    with pytest.raises(StudioError, match="pick a bench request"):
        services.resolve_request("  ")
    with pytest.raises(StudioError, match="no sandbox request with id"):
        services.resolve_request("bench-0001")
    with pytest.raises(StudioError, match="cannot load policy"):
        services.policy("/no/such/model")


def test_bank_edit_is_persisted_and_retrievable(services):
    bank = services.bank("studio-bank")
    req = services.world.split("evolve")[0]
    e = bank.add(req.id, req.text, {s: "Query spatial_layout first." for s in SLOTS}, reward_gap=0.3, run_id="studio")
    bank.edit(e.id, {"prompt_construction": "Write exactly three stars, each in its own sentence."})
    reopened = services.bank("studio-bank")
    assert reopened.get(e.id).version == 2
    hits = reopened.search(req.text, 3)
    assert hits[0][1].id == e.id and "exactly three" in hits[0][1].slots["prompt_construction"]
    retrieving = services.retrieving_requests(reopened, e.id)
    assert retrieving and retrieving[0][1].id == req.id and retrieving[0][0] == pytest.approx(1.0, abs=1e-4)
    req2, trajs, verdicts, store = services.try_guide(reopened, e.id, EXPERT_NOISY, seed=0)
    assert [t.id for t in trajs] == ["student", "teacher"] and trajs[1].guide and not trajs[0].guide
    assert set(verdicts) == {"student", "teacher"} and req2.id == req.id
    with pytest.raises(StudioError, match="raw generator"):
        services.try_guide(reopened, e.id, RAW, 0)


def test_uploaded_reference_is_found_by_the_agents_image_search(services):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (30, 20), "purple").save(buf, format="PNG")
    row = services.refs.add(buf.getvalue(), "Official banner of the Zorblat Guild", filename="banner.png")
    services.references_changed()
    hits = services.world.image_search.image_search("Official banner of the Zorblat Guild", 3)
    assert hits[0].source_id == row["id"]
    assert services.world.refs[row["id"]]["variant"] == "upload"  # the scorer sees the new row too


def test_bench_run_has_a_summary_by_track_category_difficulty(services):
    path = services.run_bench(RAW, "bench", 4, [0, 1])
    from studio.bench import load_summary
    from studio.compare import pivot

    s = load_summary(path)
    assert s["by"]["overall"]["all"]["n"] == 4 and len(s["by"]["overall"]["all"]["kscore"]["per_seed"]) == 2
    assert pivot({"x": s})[1] and str(path.relative_to(services.runs_dir)) in services.list_bench()
    assert len(load_run(path).trajectories) == 8
    run = load_run(path)  # spread over the split, not its first 4 (the split is sorted by track: those are all knowledge)
    assert {r.track for r in run.requests} == {"knowledge", "quality"}


def _bench_folder(root, world, pictures: bool = True):
    """Two sandbox bench requests in the official GenEvolve-Data-Bench layout (with or without their pictures)."""
    (root / "bench").mkdir(parents=True)
    (root / "images").mkdir()
    rows = []
    for r in world.split("bench")[:2]:
        if pictures:
            world.gt_image(r).save(root / "images" / f"{r.id}.png")
        rows.append({"id": r.id, "question": r.text, "gt_image": f"{r.id}.png", "category": r.category,
                     "eval_type": "knowledge" if r.track == "knowledge" else "quality", "difficulty": "medium"})
    (root / "bench" / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    return root


def test_bench_on_a_local_official_folder_with_a_vlm_judge(services, world, tmp_path, monkeypatch):
    from _loopback import FakeVLM, free_port_url, serve_app
    from studio.bench import bench_problem, load_summary, missing_lines
    from studio.compare import pivot

    root = _bench_folder(tmp_path / "GenEvolve-Bench", world)
    with serve_app(FakeVLM().app()) as url:
        path = services.run_bench_official(str(root), EXPERT, "sandbox", url + "/v1", "fake-vlm", None, None, [0, 1])
        s = load_summary(path)
        assert s["by"]["overall"]["all"]["n"] == 2 and len(s["by"]["overall"]["all"]["kscore"]["per_seed"]) == 2
        assert s["by"]["overall"]["all"]["kscore"]["mean"] > 0 and s["judge"].endswith("fake-vlm")
        assert {r[0] for r in pivot({"x": s})[1]} == {"overall", "track", "category", "difficulty"}
        assert missing_lines(s) == ["seed 0: no missing cases of 2", "seed 1: no missing cases of 2"]
        assert str(path.relative_to(services.runs_dir)) in services.list_bench()
        run = load_run(path)
        assert len(run.trajectories) == 4 and all(r.gt_image in run.images for r in run.requests)

        bare = _bench_folder(tmp_path / "no-pictures", world, pictures=False)
        with pytest.raises(StudioError, match=r"2 bench ground-truth picture\(s\) missing.*tick 'keep cases"):
            services.run_bench_official(str(bare), RAW, "sandbox", url + "/v1", "fake-vlm", None, None, [0])
        kept = load_summary(services.run_bench_official(str(bare), RAW, "sandbox", url + "/v1", "fake-vlm", None, None, [0],
                                                        allow_missing=True))
        assert kept["missing"]["0"]["reasons"] == {"no ground truth": 2} and len(kept["missing_pictures"]) == 2
        assert "ground-truth pictures are missing" in bench_problem(kept)
        with pytest.raises(StudioError, match="cannot open the generator"):
            services.run_bench_official(str(root), RAW, "t2i:", url + "/v1", "fake-vlm", None, None, [0])
    with pytest.raises(StudioError, match="does not exist"):
        services.run_bench_official(str(tmp_path / "nowhere"), RAW, "sandbox", url + "/v1", "fake-vlm", None, None, [0])
    with pytest.raises(StudioError, match="judge at .* does not answer"):  # the server above is gone
        services.run_bench_official(str(root), RAW, "sandbox", free_port_url() + "/v1", "fake-vlm", None, None, [0])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(StudioError, match="OPENAI_API_KEY"):
        services.run_bench_official(str(root), RAW, "sandbox", "https://api.example.com/v1", "vlm", None, None, [0])


@pytest.fixture
def fake_python(tmp_path):
    """Stands in for the interpreter: sleeps like a long training run, exits on SIGTERM."""
    p = tmp_path / "fakepy"
    p.write_text("#!/bin/sh\nexec sleep 30\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return str(p)


def test_one_distill_job_at_a_time_stop_kill_resume(tmp_path, fake_python):
    jobs = DistillJobs(tmp_path, tmp_path, python=fake_python)
    assert jobs.status()["state"] == "idle"
    jobs.start(["evolve", "--out", str(tmp_path / "a")], tmp_path / "a")
    assert jobs.status()["state"] == "running"
    with pytest.raises(StudioError, match="already running"):
        jobs.start(["evolve", "--out", str(tmp_path / "b")], tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert "stopping" in jobs.stop()
    for _ in range(50):
        if jobs.status()["state"] != "stopping":
            break
        time.sleep(0.1)
    assert jobs.status()["state"] == "stopped"
    with pytest.raises(StudioError, match="no distill run"):
        jobs.stop()
    jobs.resume(tmp_path / "a")
    assert jobs.status()["command"].startswith("genevolve evolve --out")
    assert "killed" in jobs.kill() and jobs.status()["state"] == "killed"
    with pytest.raises(StudioError, match="not started from the studio"):
        jobs.resume(tmp_path)


def test_a_folder_locked_by_another_trainer_is_refused(tmp_path, fake_python):
    from genevolve.records.live import run_lock

    jobs = DistillJobs(tmp_path, tmp_path, python=fake_python)
    (tmp_path / "bank").mkdir()
    with run_lock(tmp_path / "run"):
        with pytest.raises(StudioError, match="another process"):
            jobs.start(["evolve"], tmp_path / "run")
    with pytest.raises(StudioError, match="no experiences.jsonl"):
        jobs.start(["evolve"], tmp_path / "run2", seed_bank=tmp_path / "bank")
    assert jobs.status()["state"] == "idle" and not (tmp_path / "run2").exists()


def test_the_app_builds_without_launching(services):
    from studio.app import build_app

    app = build_app(services)
    assert app.title == "GenEvolve Studio"


def test_studio_command_defaults_to_loopback():
    from typer.testing import CliRunner

    from genevolve.cli import app

    res = CliRunner().invoke(app, ["studio", "--help"], env={"COLUMNS": "200"})  # no default cut short by the width
    assert res.exit_code == 0
    assert "127.0.0.1" in res.output and "7860" in res.output and "GENEVOLVE_STUDIO_PASSWORD" in res.output
