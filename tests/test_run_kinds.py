"""A run folder belongs to one kind of run; nothing is deleted or replaced that a command did not create; a resume
undoes only its own writes; two editors of one experience never silently undo each other; slots are plain text."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from genevolve.agent.guides import SLOTS
from genevolve.cli import app
from genevolve.experience.bank import ExperienceBank, ExperienceError, StaleEditError
from genevolve.records import kinds

runner = CliRunner()
SLOT_TEXT = {s: "Query spatial_layout and place each object." for s in SLOTS}
EVOLVE = ["evolve", "--train-only", "--steps", "1", "-B", "1", "-K", "2", "--max-new-tokens", "16", "--no-probe",
          "--delta-min", "0.0", "--gate", "-1", "--seed", "3"]


def _one_line(res) -> str:
    text = " ".join(res.output.replace("│", " ").split())
    assert "Traceback" not in res.output, res.output
    return text


@pytest.fixture(scope="module")
def evolved(tmp_path_factory):
    out = tmp_path_factory.mktemp("kinds") / "evolve"
    res = runner.invoke(app, [*EVOLVE, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def rolled(tmp_path_factory):
    out = tmp_path_factory.mktemp("kinds") / "rollout"
    res = runner.invoke(app, ["rollout", "-r", "bench-1000", "-k", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_command_records_its_kind_and_old_folders_are_recognised(evolved, rolled, tmp_path):
    assert kinds.recorded_kind(evolved) == "evolve" and kinds.recorded_kind(rolled) == "rollout"
    assert json.loads((rolled / kinds.MARK).read_text())["kind"] == "rollout"
    legacy = tmp_path / "legacy"
    shutil.copytree(evolved, legacy)
    (legacy / kinds.MARK).unlink()  # a folder made before kinds were written: known by its files
    assert kinds.recorded_kind(legacy) == "evolve"


def test_a_rollout_into_an_evolve_folder_is_refused_by_name_and_writes_nothing(evolved):
    before = _files(evolved)
    res = runner.invoke(app, ["rollout", "-r", "bench-1000", "-k", "1", "--out", str(evolved)])
    assert res.exit_code == 2 and "is an evolve run folder" in _one_line(res) and "`rollout`" in _one_line(res)
    assert _files(evolved) == before


def test_an_evolve_into_a_rollout_folder_is_refused_and_the_rollout_is_untouched(rolled):
    before = _files(rolled)
    res = runner.invoke(app, [*EVOLVE, "--out", str(rolled)])
    assert res.exit_code == 2 and "is a rollout run folder" in _one_line(res)
    assert _files(rolled) == before


def test_a_folder_of_other_files_is_refused(tmp_path):
    stuff = tmp_path / "my-notes"
    stuff.mkdir()
    (stuff / "thesis.tex").write_text("\\section{}")
    res = runner.invoke(app, ["rollout", "-r", "bench-1000", "-k", "1", "--out", str(stuff)])
    assert res.exit_code == 2 and "holds files of no run (thesis.tex)" in _one_line(res)
    assert sorted(p.name for p in stuff.iterdir()) == ["thesis.tex"]


def test_sft_never_deletes_a_run_folder_nor_replaces_a_model_without_force_new(evolved, tmp_path):
    before = _files(evolved)
    res = runner.invoke(app, ["sft", "--out", str(evolved), "--epochs", "1"])
    assert res.exit_code == 2 and "is an evolve run folder" in _one_line(res) and _files(evolved) == before
    model = tmp_path / "model"
    model.mkdir()
    (model / "sft_config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    res = runner.invoke(app, ["sft", "--out", str(model), "--epochs", "1"])
    assert res.exit_code == 2 and "already holds a finished SFT model: --force-new moves it aside" in _one_line(res)
    assert (model / "model.safetensors").read_bytes() == b"weights"
    from genevolve.cli.common import claim_sft

    claim_sft(model, force_new=True)  # what --force-new does before training: moved aside, never deleted
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("model.replaced-")]
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == b"weights" and not model.exists()
    assert kinds.recorded_kind(tmp_path / "model.work") == "sft"


def test_an_import_into_a_run_folder_is_refused_before_any_picture_is_written(evolved, tmp_path):
    before = _files(evolved)
    (tmp_path / "data" / "bench").mkdir(parents=True)
    res = runner.invoke(app, ["data", "import", str(tmp_path / "data"), "--out", str(evolved)])
    assert res.exit_code == 2 and "is an evolve run folder" in _one_line(res)
    assert _files(evolved) == before


def test_running_a_finished_evolve_again_keeps_the_studio_edits_made_since(evolved, tmp_path):
    """The README's promise: a studio edit and a trainer's addition are both kept. Re-running the finished run's
    command once rolled the bank back to its checkpoint copy, erasing edits and additions made after the run."""
    out = tmp_path / "again"
    shutil.copytree(evolved, out)
    bank = ExperienceBank(out / "bank")
    added = bank.add("evolve-0001", "added in the studio", SLOT_TEXT, run_id="studio")
    edited = next(e for e in bank.items.values() if e.id != added.id) if len(bank) > 1 else added
    bank.edit(edited.id, {"failure_avoidance": "Edited in the studio after the run ended."})
    after_edits = (out / "bank" / "experiences.jsonl").read_bytes()
    res = runner.invoke(app, [*EVOLVE, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "bank" / "experiences.jsonl").read_bytes() == after_edits


def test_a_save_over_a_newer_version_is_refused_and_names_the_slots(tmp_path):
    bank_a, bank_b = ExperienceBank(tmp_path / "bank"), None
    e = bank_a.add("evolve-0001", "a request", SLOT_TEXT)
    bank_b = ExperienceBank(tmp_path / "bank")  # a second studio session, same version 1 open
    bank_a.edit(e.id, {"search_strategy": "Search the fact first."}, base_version=1)
    with pytest.raises(StaleEditError) as err:
        bank_b.edit(e.id, {"failure_avoidance": "Never skip the count."}, base_version=1)
    assert "saved as version 2 by someone else after you opened version 1" in str(err.value)
    assert "slots where yours differ: failure_avoidance" in str(err.value) and err.value.current.version == 2
    now = ExperienceBank(tmp_path / "bank").get(e.id)
    assert now.version == 2 and now.slots["search_strategy"] == "Search the fact first."  # the first save survives
    again = bank_b.edit(e.id, {"failure_avoidance": "Never skip the count."}, base_version=2)  # on the latest: saved
    assert again.version == 3 and again.slots["search_strategy"] == "Search the fact first."


def test_the_studio_save_keeps_the_other_sessions_change_and_shows_both(tmp_path):
    from studio.tables import conflict_html

    bank = ExperienceBank(tmp_path / "bank")
    e = bank.add("evolve-0001", "a request", SLOT_TEXT)
    bank.edit(e.id, {"search_strategy": "Search the fact first."})
    mine = {**SLOT_TEXT, "failure_avoidance": "Never skip the count."}
    html = conflict_html(bank.get(e.id), mine)
    assert "Search the fact first." in html and "Never skip the count." in html and "not saved" in html


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\u202e", "\u200b"])
def test_control_characters_in_slots_and_keys_are_refused(tmp_path, char):
    bank = ExperienceBank(tmp_path / "bank")
    with pytest.raises(ExperienceError, match=f"control character U\\+{ord(char):04X}"):
        bank.add("evolve-0001", "a request", {**SLOT_TEXT, "search_strategy": f"Search{char} first."})
    with pytest.raises(ExperienceError, match="control character"):
        bank.add("evolve-0001", "a request", SLOT_TEXT, retrieval_key={"trigger": f"Situation: text{char}."})
    assert len(ExperienceBank(tmp_path / "bank")) == 0


def test_every_integrity_case_names_tests_that_exist():
    """`benchmarks/faults.py --cases` runs each case's tests: a renamed or deleted test must not turn a case into
    one that silently runs nothing."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from fault_cases import CASES
    finally:
        sys.path.remove(str(root / "benchmarks"))
    for case, _, targets in CASES:
        for t in targets:
            path, _, name = t.partition("::")
            path = path.split(" -k ")[0].strip()
            text = (root / path).read_text()
            if name:
                assert f"def {name.split('[')[0]}(" in text, (case, t)
