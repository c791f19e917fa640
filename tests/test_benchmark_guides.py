"""The experience-transfer benchmark: gate calibration on the evolve split, paired gains, and one small run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import experience_transfer as et  # noqa: E402
from policy_headroom import paired_gain  # noqa: E402


def rows(*pairs):
    return [{"similarity": s, "same_category": same} for s, same in pairs]


def test_the_calibrated_gate_is_the_lowest_that_keeps_hits_in_category():
    r = rows((0.95, True), (0.9, True), (0.85, False), (0.8, True), (0.7, True), (0.6, False), (0.5, False), (None, None))
    # hits at 0.7: 4 of 5 in category (0.8); at 0.6: 4 of 6. The lowest gate that keeps 80 % is 0.7.
    assert et.calibrate(r, 0.8) == 0.7
    assert et.at_gate(r, 0.7) == {"gate": 0.7, "hits": 5, "hit_rate": 5 / 8, "category_agreement": 0.8}
    assert et.calibrate(r, 1.0) == 0.9
    assert et.calibrate(rows((0.9, False), (0.8, False)), 0.8) is None
    assert et.at_gate(r, 0.99)["category_agreement"] is None  # no hits: undefined, not 0
    d = et.distribution(r)
    assert d["n"] == 7 and d["max"] == 0.95 and d["median"] == 0.8
    assert et.distribution(rows((None, None))) is None


def test_paired_gain_needs_every_seed():
    g = paired_gain({"per_seed": [0.5, 0.6, 0.7]}, {"per_seed": [0.4, 0.4, 0.4]}, 3)
    assert g["per_seed"] == pytest.approx([0.1, 0.2, 0.3]) and g["mean"] == pytest.approx(0.2) and g["ci95"] > 0
    assert paired_gain({"per_seed": [0.5]}, {"per_seed": [0.4]}, 1)["ci95"] is None  # one seed: no interval
    assert paired_gain({"per_seed": [0.5]}, {"per_seed": [0.4, 0.3]}, 2)["mean"] is None


def test_experience_transfer_runs_small(tmp_path, world):
    from genevolve.experience.bank import ExperienceBank
    from genevolve.agent.guides import oracle_slots

    bank = ExperienceBank(tmp_path / "bank")
    for r in world.split("evolve")[::20]:
        parsed = world.parse(r.text)
        bank.add(r.id, r.text, oracle_slots(list(r.skills), bool(parsed.mentions), parsed.hops), reward_gap=0.5)
    out = tmp_path / "transfer.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "experience_transfer.py"), str(tmp_path / "bank"),
                    "--policy", "expert", "--gate", "0.3", "--requests", "2", "--seeds", "0", "--out", str(out)],
                   check=True, capture_output=True, cwd=tmp_path)
    data = json.loads(out.read_text())
    assert data["gate"] == 0.3 and data["leave_own_out"] is True
    for split in ("evolve", "bench"):
        per = data["retrieval"][split]["per_request"]
        assert all(x["source_request"] != x["request"] for x in per)  # never the request's own experience
        assert [g["gate"] for g in data["retrieval"][split]["grid"]] == sorted(set(et.GRID) | {0.3})
    assert data["kscore"]["hits"] >= 1 and data["kscore"]["gain"]["per_seed"] == [0.0]  # the noiseless expert needs no guide


def test_a_bench_result_is_reused_only_for_the_same_arguments_and_dtype(tmp_path, monkeypatch):
    import policy_headroom as ph

    runs = []

    def fake_run(cmd, check, stdout):
        runs.append(cmd)
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({"n": len(runs)}))

    monkeypatch.setattr(ph.subprocess, "run", fake_run)
    monkeypatch.delenv("GENEVOLVE_DTYPE", raising=False)
    out = tmp_path / "arm.json"
    first = ph.bench(["--seeds", "0"], out, reuse=True)
    assert first["n"] == 1 and first["seconds"] >= 0
    assert ph.bench(["--seeds", "0"], out, reuse=True)["n"] == 1  # reused
    assert ph.bench(["--seeds", "0,1"], out, reuse=True)["n"] == 2  # other arguments: run again
    monkeypatch.setenv("GENEVOLVE_DTYPE", "bfloat16")
    assert ph.bench(["--seeds", "0,1"], out, reuse=True)["n"] == 3  # other dtype: run again
    assert ph.bench(["--seeds", "0,1"], out, reuse=False)["n"] == 4  # no reuse asked


def test_track_gains_are_paired_by_seed():
    from policy_headroom import paired_track_gains

    def res(**tracks):
        return {"by": {"track": {t: {"kscore": {"per_seed": v}} for t, v in tracks.items()}}}

    g = paired_track_gains(res(knowledge=[0.5, 0.6, 0.7], quality=[0.2]), res(knowledge=[0.4, 0.4, 0.4], quality=[0.1, 0.1]))
    assert g["knowledge"]["mean"] == pytest.approx(0.2) and g["knowledge"]["ci95"] > 0
    assert g["quality"]["mean"] is None
