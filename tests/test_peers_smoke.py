"""The peer benchmarks run end to end on the smallest settings and write their JSON with positive numbers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_peers_rollout_writes_both_modes(tmp_path):
    out = tmp_path / "rollout.json"
    _load("peers_rollout").main(["--requests", "1", "-k", "2", "--max-new-tokens", "8", "--max-turns", "2",
                                 "--max-context", "1024", "--repeats", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["command"] and res["machine"]["torch_threads"] > 0 and res["machine"]["dtype"]
    for mode in ("single-turn", "multi-turn"):
        r = res["modes"][mode]
        for side in ("ours", "transformers_cb"):
            assert r[side]["tokens_per_s"] > 0 and r[side]["trajectories_per_s"] > 0
            assert min(r[side]["generated_tokens"]) > 0 and min(r[side]["turns"]) >= 2
        assert r["ratio_tokens_per_s"] > 0


def test_peers_update_writes_each_arm(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "update.json"
    _load("peers_update").main(["--batch", "2", "--max-new-tokens", "8", "--repeats", "1", "--arms", "grpo,ved",
                                "--no-profile", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["command"] and res["batch"]["assistant_tokens"] > 0
    assert res["trl"]["trainable_parameters"] == res["trl"]["ours_trainable_parameters"]
    for arm in ("grpo", "ved"):
        r = res["arms"][arm]
        assert r["ours"]["tokens_per_s"] > 0 and r["trl"]["tokens_per_s"] > 0 and r["ratio_tokens_per_s"] > 0
