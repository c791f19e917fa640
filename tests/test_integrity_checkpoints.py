"""Integrity: a checkpoint never runs code and a broken one is named in one line; a full disk keeps the last
checkpoint; the studio shows a refusal as one line; bench checks its output before working; a damaged FAISS
index is rebuilt or refused by name; ``--missing zero`` zeroes every metric."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from genevolve.cli import app
from genevolve.records.schema import Request, Verdict
from genevolve.training import checkpoint
from genevolve.training.checkpoint import CheckpointError

runner = CliRunner()


def _args(out: Path, *extra: str) -> list[str]:
    return ["evolve", "--train-only", "--out", str(out), "--steps", "2", "-B", "1", "-K", "2", "--max-new-tokens", "16",
            "--no-probe", *extra]


def _one_line_error(res, *names: str) -> str:
    """The command failed with one ``error:`` line naming ``names``, its last line, and no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and res.output.strip().splitlines()[-1] == errors[0], res.output
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


def _state(step: int = 1) -> dict:
    return {"opt": {"state": {}, "param_groups": []}, "step": step, "rng": torch.get_rng_state(), "files": None, "bank": False}


def _checkpoint(out: Path, state_bytes: bytes | None = None, weights: bytes | None = None) -> Path:
    """A run folder holding only a checkpoint: an adapter (config and weights) and ``state.pt``."""
    ckpt = out / "checkpoint"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_config.json").write_text("{}")
    if weights is None:
        from safetensors.torch import save

        weights = save({"w": torch.zeros(256)})
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(weights)
    if state_bytes is None:
        torch.save(_state(), ckpt / "state.pt")
    else:
        (ckpt / "state.pt").write_bytes(state_bytes)
    (ckpt / "complete.json").write_text(json.dumps({"step": 1}))
    return ckpt


class WritesMarker:
    """Unpickling this runs code: it writes ``path`` (what a crafted state.pt could do with anything else)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


# -- 1. a crafted state.pt runs no code --------------------------------------------------------------------------


def test_a_crafted_state_pt_runs_no_code_on_resume(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "marker"
    ckpt = _checkpoint(out)
    torch.save(_state() | {"opt": WritesMarker(marker)}, ckpt / "state.pt")
    res = runner.invoke(app, _args(out))
    assert not marker.exists()
    line = _one_line_error(res, str(out), "checkpoint/state.pt")
    assert "safe loader refuses" in line


def test_state_pt_is_loaded_with_plain_types_only(tmp_path):
    torch.save(_state(3), tmp_path / "state.pt")
    assert checkpoint.read_state(tmp_path / "state.pt", tmp_path)["step"] == 3
    torch.save({"opt": {}, "rng": torch.get_rng_state()}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match=r"state.pt is not a trainer's state \(no step\)"):
        checkpoint.read_state(tmp_path / "state.pt", tmp_path)


# -- 2. clear errors, early --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["random bytes", "cut short", "empty"])
def test_an_unreadable_state_pt_is_named_in_one_line(tmp_path, damage):
    whole = tmp_path / "whole.pt"
    torch.save(_state(), whole)
    data = {"random bytes": random.Random(0).randbytes(3000), "cut short": whole.read_bytes()[:1000], "empty": b""}[damage]
    out = tmp_path / "run"
    _checkpoint(out, state_bytes=data)
    line = _one_line_error(runner.invoke(app, _args(out)), str(out), "checkpoint/state.pt is unreadable", "--force-new")
    assert "delete the checkpoint folder" in line


def test_a_cut_short_adapter_is_named_in_one_line(tmp_path):
    from safetensors.torch import save

    out = tmp_path / "run"
    whole = save({"w": torch.zeros(4096)})
    _checkpoint(out, weights=whole[: len(whole) // 2])
    _one_line_error(runner.invoke(app, _args(out)), str(out), "checkpoint/adapter/adapter_model.safetensors is unreadable",
                    "--force-new")


class FakeAdapterModel:
    """Writes an adapter as PEFT does (config and weights): enough for a checkpoint's save."""

    def save_pretrained(self, path):
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True)
        (Path(path) / "adapter_config.json").write_text("{}")
        save_file({"w": torch.ones(8)}, str(Path(path) / "adapter_model.safetensors"))


def test_a_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    checkpoint.save(out, FakeAdapterModel(), opt, 1)
    before = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoint").rglob("*") if p.is_file()}

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "checkpoint.tmp" / "state.pt"))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as err:
        checkpoint.save(out, FakeAdapterModel(), opt, 2)
    message = str(err.value)
    assert "\n" not in message and str(out) in message and "state.pt" in message and "No space left on device" in message
    assert "the previous checkpoint is kept" in message and "run the same command again" in message
    after = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoint").rglob("*") if p.is_file()}
    assert after == before and not (out / "checkpoint.tmp").exists()
    assert checkpoint.read_state(out / "checkpoint" / "state.pt", out)["step"] == 1


@pytest.mark.slow
def test_a_full_disk_during_a_runs_save_ends_it_in_one_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    res = runner.invoke(app, _args(out, "--steps", "1"))
    assert res.exit_code == 0, res.output
    state = (out / "checkpoint" / "state.pt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    _one_line_error(runner.invoke(app, _args(out)), str(out), "checkpoint of step 2 could not be written",
                    "previous checkpoint is kept")
    assert (out / "checkpoint" / "state.pt").read_bytes() == state


# -- 3. earlier refusals, one line each --------------------------------------------------------------------------


def test_a_checkpoint_without_state_pt_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    ckpt = _checkpoint(out)
    (ckpt / "state.pt").unlink()
    _one_line_error(runner.invoke(app, _args(out)), str(ckpt), "is not a whole checkpoint")


def test_a_checkpoint_of_another_policy_is_refused_in_one_line(tmp_path, tiny_folder):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    ckpt = _checkpoint(out)
    other = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_folder),
                           LoraConfig(r=16, lora_alpha=32, target_modules=checkpoint.LORA_TARGETS, task_type="CAUSAL_LM"))
    for p in (ckpt / "adapter").iterdir():
        p.unlink()
    other.save_pretrained(ckpt / "adapter")  # hidden size 64; the run's --policy tiny has 256
    _one_line_error(runner.invoke(app, _args(out, "--policy", "tiny")), str(out), "checkpoint/adapter does not fit this policy",
                    "--policy")


def test_a_studio_start_on_a_held_folder_is_one_line_and_writes_nothing(tmp_path, fake_python):
    from studio import StudioError
    from studio.jobs import LOG_FILE, DistillJobs

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from genevolve.records.live import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StudioError) as err:
            DistillJobs(tmp_path, tmp_path, python=fake_python).start(["evolve", "--out", str(out)], out)
    finally:
        holder.kill()
        holder.wait()
    assert "\n" not in str(err.value) and str(out) in str(err.value) and "another process" in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == [".lock"] and not (out / LOG_FILE).exists()


def test_a_studio_job_claims_its_folder_for_the_command_it_starts(tmp_path, fake_python):
    from genevolve.records.kinds import check, recorded_kind
    from studio import StudioError
    from studio.jobs import DistillJobs

    jobs = DistillJobs(tmp_path, tmp_path, python=fake_python)
    out = tmp_path / "run"
    jobs.start(["evolve", "--out", str(out)], out)
    jobs.kill()
    assert recorded_kind(out) == "evolve"
    check(out, "evolve")  # the command the studio started accepts the folder with the studio's own files in it
    with pytest.raises(StudioError, match=r"run is an evolve run folder; `ablate` writes"):
        jobs.start(["ablate", "--out", str(out)], out)


TRACEBACK_LOG = """$ genevolve evolve --out runs/x
expected time: about 11 s
Traceback (most recent call last):
  File "/x/genevolve/training/checkpoint.py", line 99, in restore
    state = torch.load(path)
            ^^^^^^^^^^^^^^^^
KeyError: 'opt'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/x/genevolve/cli/train.py", line 170, in evolve
    train(cfg, w, stop_on_sigterm())
RuntimeError: Error(s) in loading state_dict for PeftModelForCausalLM:
\tsize mismatch for base_model.model.lm_head.weight: copying a param with shape [1, 2]
"""


def test_the_studio_shows_a_traceback_as_its_one_error_line(tmp_path):
    from studio.distill import failure_line, log_lines

    assert log_lines(TRACEBACK_LOG) == ("$ genevolve evolve --out runs/x\nexpected time: about 11 s\n"
                                        "RuntimeError: Error(s) in loading state_dict for PeftModelForCausalLM:")
    assert failure_line(TRACEBACK_LOG) == "RuntimeError: Error(s) in loading state_dict for PeftModelForCausalLM:"
    assert failure_line(TRACEBACK_LOG + "error: run folder x: checkpoint/state.pt is unreadable\n") == \
        "error: run folder x: checkpoint/state.pt is unreadable"


def test_a_failed_studio_job_says_why_in_its_status(tmp_path):
    import time

    from studio.distill import Live, status_text
    from studio.jobs import DistillJobs

    failing = tmp_path / "failpy"
    failing.write_text("#!/bin/sh\necho 'error: run folder x: checkpoint/state.pt is unreadable (empty)'\nexit 2\n")
    failing.chmod(0o755)
    jobs = DistillJobs(tmp_path, tmp_path, python=str(failing))
    out = tmp_path / "run"
    jobs.start(["evolve", "--out", str(out)], out)
    for _ in range(100):
        if jobs.status()["state"] != "running":
            break
        time.sleep(0.05)
    job = jobs.status()
    assert job["state"] == "failed" and job["error"] == "error: run folder x: checkpoint/state.pt is unreadable (empty)"
    assert status_text(Live(out, True, False), job).endswith(job["error"])


@pytest.fixture
def fake_python(tmp_path):
    p = tmp_path / "fakepy"
    p.write_text("#!/bin/sh\nexec sleep 30\n")
    p.chmod(0o755)
    return str(p)


# -- 4. bench checks its output before working -------------------------------------------------------------------


def test_bench_refuses_an_unwritable_output_before_any_work(tmp_path, monkeypatch):
    import tempfile

    import genevolve.cli.bench as cli_bench

    folder = tmp_path / "results"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anyway: the file system's refusal is simulated
        real = tempfile.mkstemp

        def refused(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refused)
    ran = []
    monkeypatch.setattr(cli_bench, "_sandbox_bench", lambda *a, **k: ran.append(1) or {})
    try:
        res = runner.invoke(app, ["bench", "--policy", "expert", "--limit", "1", "--seeds", "0", "--out", str(folder / "r.json")])
    finally:
        folder.chmod(0o755)
    assert not ran
    _one_line_error(res, str(folder / "r.json"), "Permission denied", "--out")


# -- 5. a damaged FAISS index ------------------------------------------------------------------------------------


@pytest.fixture
def refs_store(tmp_path):
    from genevolve.tools.embed import HashEmbedder
    from genevolve.tools.local import LocalImageSearch

    root = tmp_path / "store"
    (root / "refs").mkdir(parents=True)
    rows = []
    for i, title in enumerate(["Flag of Veloria", "Mascot of Ostrel Rovers, a red fox", "Twin peaks of Mount Kessar"], 1):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(root / "refs" / f"r{i}.png")
        rows.append({"id": f"r{i}", "title": title, "file": f"refs/r{i}.png"})
    (root / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert LocalImageSearch(root, HashEmbedder(64)).image_search("red fox mascot", 1)[0].source_id == "r2"
    return root


@pytest.mark.parametrize("sidecar", ["with checksum", "older, count only"])
def test_a_cut_short_index_is_rebuilt_from_its_rows(refs_store, sidecar):
    from genevolve.tools.embed import HashEmbedder
    from genevolve.tools.faiss_store import meta_path, read_meta
    from genevolve.tools.local import LocalImageSearch

    index = refs_store / "index" / "refs.faiss"
    whole = index.read_bytes()
    index.write_bytes(whole[: len(whole) // 2])
    if sidecar != "with checksum":
        meta = {k: v for k, v in read_meta(index).items() if k not in ("bytes", "sha256")}
        meta_path(index).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"refs.faiss is damaged .*: it is rebuilt from its rows"):
        hits = LocalImageSearch(refs_store, HashEmbedder(64)).image_search("red fox mascot", 1)
    assert [h.source_id for h in hits] == ["r2"]
    assert index.read_bytes() == whole and read_meta(index)["bytes"] == len(whole)


def test_a_damaged_index_is_refused_by_name_when_loaded(refs_store):
    from genevolve.tools.faiss_store import IndexDamagedError, VectorIndex

    index = refs_store / "index" / "refs.faiss"
    data = bytearray(index.read_bytes())
    data[-5] ^= 0xFF  # same size, other bytes
    index.write_bytes(bytes(data))
    with pytest.raises(IndexDamagedError) as err:
        VectorIndex.load(index)
    assert "\n" not in str(err.value) and str(index) in str(err.value) and "SHA-256" in str(err.value)
    assert "rebuild it from its rows" in str(err.value)


def test_the_reference_editor_rebuilds_a_damaged_index(refs_store):
    from genevolve.tools.embed import HashEmbedder
    from genevolve.tools.faiss_store import VectorIndex
    from genevolve.tools.refstore import ReferenceStore

    index = refs_store / "index" / "refs.faiss"
    index.write_bytes(index.read_bytes()[:40])
    store = ReferenceStore(refs_store, embedder=HashEmbedder(64))
    with pytest.warns(UserWarning, match="damaged"):
        store.set_caption("r1", "Official flag of Veloria")
    assert len(VectorIndex.load(index)) == 3 and store.search("official flag", 1)[0][1]["id"] == "r1"


# -- 6. --missing zero zeroes every metric -----------------------------------------------------------------------


def _case(rid: str, T: float | None, failed: str | None = None, skills=("text_rendering",)):
    req = Request(id=rid, text=rid, skills=list(skills))
    if failed:
        return req, Verdict(trajectory_id=rid, request_id=rid, F=None, V=None, T=None, A=None, kscore=None, r_text=None,
                            reward=None, failed=failed)
    return req, Verdict(trajectory_id=rid, request_id=rid, F=1.0, V=1.0, T=T, A=1.0, kscore=1.0, r_text=1.0, reward=1.0)


def test_missing_zero_counts_T_as_zero_too():
    from genevolve.evaluation.scoring import summarise

    pairs = [_case("a", 1.0), _case("b", None, "generator failed: X"), _case("c", None, "judge failed: Y"),
             _case("d", None, skills=()), _case("e", None, "no ground truth image for e", skills=())]
    row = summarise(pairs, missing="zero")["overall"]["all"]
    assert row["kscore"] == row["F"] == row["V"] == row["A"] == pytest.approx(2 / 5)
    assert row["T"] == pytest.approx(1 / 3)  # a, b and c ask for text; d and e do not, so T is not theirs
    assert summarise(pairs)["overall"]["all"]["T"] == 1.0  # excluded: the judged text request alone
    sufficiency = Verdict(trajectory_id="f", request_id="f", F=1.0, V=1.0, T=1.0, A=1.0, kscore=1.0, r_text=None, reward=None,
                          failed="judge failed: program sufficiency: down")
    row = summarise([_case("a", 1.0), (Request(id="f", text="f"), sufficiency)], missing="zero")["overall"]["all"]
    assert row["T"] == pytest.approx(0.5) and row["F"] == pytest.approx(0.5)
    assert np.isfinite(row["kscore"])
