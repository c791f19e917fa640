"""Decision guides that can be measured: bench --guide oracle / bank:<folder> / shuffled[:<folder>], the gate,
leave-own-out, and a teacher section that never repeats the student's row."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from genevolve.cli import app
from genevolve.experience.bank import ExperienceBank, guide_text
from genevolve.agent.guides import derangement, oracle_guide, oracle_slots, request_guides
from genevolve.agent.protocol import GUIDE_HEADER
from genevolve.agent.expert import ExpertNoise, ExpertPolicy

runner = CliRunner()


def _text(output: str) -> str:
    """An error as one line, without the frame typer draws around it."""
    return " ".join(output.replace("│", " ").split())


def _bank(folder, world, requests):
    """A bank holding each request's oracle guide as its experience (MiniLM keys, as the command line opens it),
    each worded a little differently so that a shuffle can always avoid a request's own words."""
    bank = ExperienceBank(folder)
    for i, r in enumerate(requests):
        parsed = world.parse(r.text)
        slots = oracle_slots(list(r.skills), bool(parsed.mentions), parsed.hops)
        bank.add(r.id, r.text, slots | {"failure_avoidance": slots["failure_avoidance"] + f" Case {i}."}, reward_gap=0.5)
    return bank


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory, world):
    folder = tmp_path_factory.mktemp("bank")
    _bank(folder, world, world.split("evolve")[:8])
    return folder


def _bench(tmp_path, monkeypatch, *args):
    """Run bench with the blind-spot expert (it follows a guide) and return its JSON and the guides it was given."""
    from genevolve.evaluation import bench as evaluation

    seen = {}
    real = evaluation.trajectories

    def spy(reqs, pol, tools, k, seed, params=None, guides=None, on_turn=None):
        seen["guides"] = guides
        return real(reqs, pol, tools, k, seed, params, guides, on_turn)

    monkeypatch.setattr(evaluation, "trajectories", spy)
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", "--policy", "expert", "--noise", "blind-spots", "--seeds", "0", "--out", str(out), *args])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text()), seen["guides"], res.output


def test_derangement_never_gives_an_item_its_own():
    for seed in range(30):
        keys = [i % 5 for i in range(17)]  # shared keys: a request must not get an equal one either
        p = derangement(len(keys), lambda i, j: keys[j] != keys[i], seed)
        assert sorted(p) == list(range(17)) and all(keys[p[i]] != keys[i] for i in range(17))
    assert derangement(6, lambda i, j: i != j, 3) == derangement(6, lambda i, j: i != j, 3)
    with pytest.raises(ValueError, match="cannot shuffle"):
        derangement(1, lambda i, j: i != j)
    with pytest.raises(ValueError, match="cannot shuffle"):
        derangement(4, lambda i, j: [0, 0, 0, 1][j] != [0, 0, 0, 1][i])  # one guide for most requests


def test_bank_guides_respect_the_gate_and_record_each_request(tmp_path, monkeypatch, world, bank_dir):
    data, guides, output = _bench(tmp_path, monkeypatch, "--split", "evolve", "--limit", "8", "--guide", f"bank:{bank_dir}",
                                  "--retrieval-key", "request")
    info = data["guide_info"]
    assert data["guide"] == f"bank:{bank_dir}" and info["kind"] == "bank" and info["gate"] == 0.84
    assert info["hits"] == 8 and info["hit_rate"] == 1.0 and "retrieved (request key): 8/8" in output
    for row in info["per_request"]:  # without leave-own-out each request finds its own experience
        assert row["source_request"] == row["request"] and row["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert guides.keys() == {r["request"] for r in info["per_request"]}

    data, guides, _ = _bench(tmp_path, monkeypatch, "--split", "evolve", "--limit", "8", "--guide", f"bank:{bank_dir}",
                             "--leave-own-out", "--gate", "0.6", "--retrieval-key", "request")
    info = data["guide_info"]
    assert info["leave_own_out"] is True and info["gate"] == 0.6
    assert all(r["source_request"] != r["request"] for r in info["per_request"])
    hit_ids = {r["request"] for r in info["per_request"] if r["similarity"] >= 0.6}
    assert {r["request"] for r in info["per_request"] if r["hit"]} == hit_ids == set(guides or {})
    assert info["hits"] == len(hit_ids) and info["hit_rate"] == len(hit_ids) / 8
    assert info["similarity"]["max"] < 0.999  # the request's own experience (similarity 1) was never retrieved
    assert json.dumps(data, allow_nan=False)


def test_a_gate_nothing_passes_gives_no_guide(tmp_path, monkeypatch, bank_dir):
    data, guides, output = _bench(tmp_path, monkeypatch, "--limit", "3", "--guide", f"bank:{bank_dir}", "--gate", "0.999",
                                  "--retrieval-key", "request")
    assert data["guide_info"]["hits"] == 0 and data["guide_info"]["hit_rate"] == 0.0 and not guides
    assert "retrieved (request key): 0/3" in output


def test_shuffled_guides_come_from_other_requests(tmp_path, monkeypatch, world, bank_dir):
    data, guides, _ = _bench(tmp_path, monkeypatch, "--split", "evolve", "--limit", "8", "--guide", f"shuffled:{bank_dir}",
                             "--guide-seed", "3", "--retrieval-key", "request")
    info = data["guide_info"]
    assert info["kind"] == "shuffled" and info["gate"] is None and info["seed"] == 3 and len(guides) == 8
    for row in info["per_request"]:
        assert row["guide_of"] != row["request"] and row["source_request"] != row["request"]
    bank = ExperienceBank(bank_dir, key="request")
    for r in world.split("evolve")[:8]:  # never the guide the request would retrieve itself
        own, _ = bank.retrieve(r.text)
        assert own.source_request_id == r.id and guides[r.id] != guide_text(own)

    reqs = world.split("bench")[:12]
    guides, info = request_guides("shuffled", world, reqs, seed=1)
    assert info["source"].startswith("oracle") and len(guides) == 12
    for r, row in zip(reqs, info["per_request"]):
        assert row["guide_of"] != r.id and guides[r.id] == oracle_guide(world, world.request(row["guide_of"]))
        assert guides[r.id] != oracle_guide(world, r)


def test_oracle_guides_still_work(tmp_path, monkeypatch, world):
    data, guides, _ = _bench(tmp_path, monkeypatch, "--limit", "2", "--guide", "oracle")
    assert data["guide_info"] == {"kind": "oracle", "n_guided": 2}
    assert guides == {r.id: oracle_guide(world, r) for r in world.split("bench")[:2]}


@pytest.mark.parametrize("args, message", [
    (["--guide", "nope"], "unknown guide"),
    (["--guide", "oracle:x"], "unknown guide"),
    (["--guide", "bank:"], "unknown guide"),
    (["--gate", "0.5"], "need --guide bank"),
    (["--leave-own-out"], "need --guide bank"),
    (["--guide", "oracle", "--gate", "0.5"], "bank"),
    (["--guide", "shuffled", "--limit", "1"], "cannot shuffle"),
])
def test_bad_guide_values_get_clear_errors(tmp_path, args, message):
    res = runner.invoke(app, ["bench", "--policy", "raw", "--seeds", "0", "--limit", "2", *args, "--out", str(tmp_path / "x.json")])
    assert res.exit_code != 0 and message in _text(res.output), res.output
    assert not (tmp_path / "x.json").exists()


def test_a_missing_or_empty_bank_is_refused(tmp_path):
    for folder, message in ((tmp_path / "none", "holds no experience bank"), (tmp_path / "empty", "is empty")):
        if folder.name == "empty":
            ExperienceBank(folder).add("r", "text", oracle_slots([], False, 0))
            bank = ExperienceBank(folder)
            bank.delete(next(iter(bank.items)))
        res = runner.invoke(app, ["bench", "--policy", "raw", "--limit", "2", "--guide", f"bank:{folder}", "--out", str(tmp_path / "x.json")])
        assert res.exit_code != 0 and message in _text(res.output), res.output


class GuideDeafExpert(ExpertPolicy):
    """An expert that never reads the decision guide: its teacher writes the student's trajectories."""

    def complete(self, messages, seed=0):
        system = dict(messages[0], content=messages[0]["content"].split(f"\n\n## {GUIDE_HEADER}\n")[0])
        return super().complete([system, *messages[1:]], seed=seed)


def _rows(md: str) -> list[str]:
    """Table rows without the policy name: two equal ones would be a row copied under another name."""
    return [re.sub(r"^\| [^|]+ \|", "|", line) for line in md.splitlines() if line.startswith("| ") and "---" not in line
            and not line.startswith("| policy")]


def test_teacher_section_measures_only_where_a_guide_is_given(tmp_path, world):
    from genevolve.evaluation.report import teacher_section

    train = world.split("evolve")[:3]
    _bank(tmp_path / "bank", world, train)
    bench = world.split("bench")[::60][:2]
    student = ExpertPolicy(world, ExpertNoise.named("blind-spots"))
    md, data = teacher_section(world, student, tmp_path / "bank", bench, [0], gate=0.999)
    assert data["train"]["n"] == 3 and data["train"]["requests"] == [r.id for r in train]
    assert data["bench"]["hits"] == 0 and "No bench request passes the gate" in md and len(data["bench"]["per_request"]) == 2
    assert "result" not in data["bench"] and data["bench"]["similarity"]["max"] < 0.999
    rows = _rows(md)
    assert len(rows) == len(set(rows))
    json.dumps(data, allow_nan=False)

    md, data = teacher_section(world, student, tmp_path / "bank", bench, [0], gate=-1.0)  # every bench request hits
    assert data["bench"]["hits"] == 2 and "teacher" in data["bench"]["result"]
    rows = _rows(md)
    assert len(rows) == len(set(rows))

    deaf = GuideDeafExpert(world, ExpertNoise.named("blind-spots"))
    md, data = teacher_section(world, deaf, tmp_path / "bank", bench, [0], gate=-1.0)
    assert data["train"]["result"]["identical"] is True and data["bench"]["result"]["identical"] is True
    assert "| teacher |" not in md and md.count("no separate teacher row") == 2

    md, data = teacher_section(world, student, tmp_path / "nothing", bench, [0], gate=0.84)
    assert "bank is empty" in md and data["bank_size"] == 0


def test_evolve_report_has_no_teacher_row_that_copies_the_student(tmp_path, world, monkeypatch):
    """The evolve command's comparison, with training skipped and the blind-spot expert (it follows a guide) as
    the student: the bank holds an experience of one training request and no bench request passes a 0.99 gate,
    so the bench part says so in words; the teacher rows are measured on the training request alone."""
    from genevolve.agent.guides import SLOTS
    from genevolve.policies import resolve

    import genevolve.cli.train as train_cmd

    monkeypatch.setattr(train_cmd, "train", lambda cfg, w, stop: None)
    monkeypatch.setattr(resolve, "resolve_policy", lambda *a, **k: ExpertPolicy(world, ExpertNoise.named("blind-spots")))
    out = tmp_path / "run"
    first = world.split("evolve")[0]
    ExperienceBank(out / "bank").add(first.id, first.text, {s: "Query quantity_counting and write exact counts." for s in SLOTS})
    res = runner.invoke(app, ["evolve", "--out", str(out), "--eval-requests", "3", "--eval-seeds", "0,1", "--gate", "0.99",
                              "--retrieval-key", "request"])
    assert res.exit_code == 0, res.output
    report = (out / "report" / "report.md").read_text()
    teacher = json.loads((out / "report" / "teacher.json").read_text())
    assert teacher["train"] == {"n": 1, "own": 1, "requests": [first.id], "result": teacher["train"]["result"]}
    assert teacher["bench"]["hits"] == 0 and len(teacher["bench"]["per_request"]) == 3
    assert "No bench request passes the gate" in report and "(n = 1, 1 of them one mined from themselves)" in report
    main, section = report.split("## Learning curves")[0].split("## Teacher")
    assert "| teacher |" not in main
    assert set(json.loads((out / "report" / "results.json").read_text())) == {"student (before)", "student (after)"}
    rows = _rows(section)  # the teacher's rows never repeat the student's on the same requests
    assert len(rows) == len(set(rows))
    assert ("| teacher |" in section) != ("no separate teacher row" in section)
