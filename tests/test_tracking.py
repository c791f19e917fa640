"""--report-to: a run's config, every step's metrics (the probe's teacher-student gap among them) and its final table
reach TensorBoard or trackio, offline; a tracker that breaks never stops the run."""

from __future__ import annotations

import json
import sqlite3

import pytest

from genevolve.training.evolve import EvolveConfig, evolve
from genevolve.training.tracking import Guarded, Tracker, open_tracker, run_name, scalars


def _cfg(out, folder, **kw):
    return EvolveConfig(out=str(out), policy=str(folder), steps=2, prompts_per_step=2, rollouts_per_prompt=2,
                        max_new_tokens=12, micro_batch=4, lora_rank=4, lr=1e-2, gate=-1.0, **kw)


def test_scalars_keep_finite_numbers_only():
    assert scalars({"v": 1, "step": 3, "reward_mean": 0.5, "ved": None, "arm": "grpo+ved", "ok": True, "x": float("nan"),
                    "n": 4}) == {"reward_mean": 0.5, "n": 4.0}


def _a_pair_each_step(monkeypatch):
    """A random model never answers, so nothing is mined: make each step's first group a pair (the probe then has a
    teacher, and its gap a value)."""
    import genevolve.experience.bank
    from genevolve.experience.bank import Pair

    monkeypatch.setattr(genevolve.experience.bank, "mine_pairs", lambda groups, *a: [
        Pair(groups[0][0][0].request_id, groups[0][0][0].request_text, groups[0][0][0], groups[0][1][0], groups[0][0][1],
             groups[0][1][1])])


def test_evolve_logs_every_step_and_the_config_to_tensorboard(tmp_path, tiny_folder, world, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _a_pair_each_step(monkeypatch)
    out = tmp_path / "run"
    evolve(_cfg(out, tiny_folder, report_to="tensorboard"), world=world, log=lambda _: None)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reward_mean", "ved_loss", "grpo_loss", "retrieval_hit_rate", "bank_size", "probe_gap"} <= tags
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, e.value) for e in acc.Scalars("ved_loss")] == [(r["step"], pytest.approx(r["ved_loss"])) for r in rows]
    assert [e.value for e in acc.Scalars("probe_gap")] == [pytest.approx(r["probe_gap"]) for r in rows if r.get("probe_gap")]
    assert "config" in acc.Tags()["tensors"] or "config/text_summary" in acc.Tags()["tensors"]


def test_evolve_and_its_final_table_reach_trackio_offline(tmp_path, tiny_folder, world, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    import importlib

    import trackio.utils

    importlib.reload(trackio.utils)  # it reads TRACKIO_DIR when imported
    import trackio.sqlite_storage

    importlib.reload(trackio.sqlite_storage)
    from dataclasses import asdict

    from genevolve.cli.train import log_table

    out = tmp_path / "runs" / "run"
    cfg = _cfg(out, tiny_folder, report_to="trackio")
    evolve(cfg, world=world, log=lambda _: None)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"student (after)": {"overall": {"all": {"kscore": {"mean": 0.5, "ci95": None}}}}}))
    log_table("trackio", out, "report: bench KScore", ["policy", "group", "KScore", "ci95"], results,
              asdict(cfg))  # as `genevolve evolve` does after its comparison
    db = sqlite3.connect(tmp_path / "trackio" / "genevolve.db")
    logged = [(step, json.loads(m)) for name, step, m in db.execute("select run_name, step, metrics from metrics")
              if name == "run"]
    steps = [s for s, m in logged if "reward_mean" in m]
    assert steps == [1, 2] and all("ved_loss" in m and "bank_size" in m for s, m in logged if s in (1, 2))
    assert any("report: bench KScore" in m for _, m in logged)  # the table, logged after the run
    configs = [json.loads(c) for (c,) in db.execute("select config from configs where run_name = 'run'")]
    assert any(c.get("report_to") == "trackio" and c.get("steps") == 2 for c in configs), configs


def test_a_broken_tracker_warns_once_and_the_run_goes_on(tmp_path):
    class Broken(Tracker):
        name = "tensorboard"

        def log(self, metrics, step):
            raise OSError("disk full")

    said = []
    t = Guarded(Broken(), said.append)
    t.log({"a": 1.0}, 1)
    t.log({"a": 2.0}, 2)
    t.finish()
    assert len(said) == 1 and "disk full" in said[0] and "goes on without it" in said[0]
    with pytest.raises(ValueError, match="--report-to is one of"):
        open_tracker("wandb", tmp_path, {})
    assert type(open_tracker("none", tmp_path, {})) is Tracker
    (tmp_path / "abl").mkdir()
    (tmp_path / "abl" / "ablate_config.json").write_text("{}")
    assert run_name(tmp_path / "abl" / "grpo-s0") == "abl/grpo-s0" and run_name(tmp_path / "x") == "x"


def test_the_commands_take_report_to(tmp_path):
    from typer.testing import CliRunner

    from genevolve.cli import app

    for cmd in (["evolve"], ["ablate"], ["sft"]):
        res = CliRunner().invoke(app, [*cmd, "--help"])
        assert "--report-to" in res.output
    res = CliRunner().invoke(app, ["evolve", "--report-to", "wandb", "--out", str(tmp_path / "x"), "--steps", "1"])
    assert res.exit_code != 0 and "--report-to is one of" in " ".join(res.output.replace("│", " ").split())
