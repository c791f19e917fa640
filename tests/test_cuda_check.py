"""The CUDA check runs end to end on the CPU with a tiny random model and writes every figure it promises."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cuda_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("cuda_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cuda_check_quick_on_cpu_writes_its_figures(tmp_path, capsys):
    out = tmp_path / "cuda_check.json"
    mod = _load()
    mod.main(["--quick", "--policy", "random-tiny", "--device", "cpu", "--no-render", "-k", "1", "--batch", "1",
              "--pairs", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "NOTICE: no CUDA device" in printed and "| what | figure | command |" in printed
    fig = json.loads(out.read_text())
    assert fig["device"] == "cpu" and fig["dtype"] == "float32" and fig["policy"] == "random-tiny"
    assert fig["command"].endswith(f"--out {out}") and fig["versions"]["torch"] and fig["versions"]["transformers"]
    assert 0 < fig["non_embedding_params_m"] < fig["policy_params_m"]
    ro = fig["rollout"]
    assert ro["ours_alone_multi_turn"]["tokens_per_s"] > 0
    for mode in ("single-turn", "multi-turn"):
        r = ro["modes"][mode]
        for side in ("ours", "transformers_cb"):
            assert r[side]["tokens_per_s"] > 0 and min(r[side]["generated_tokens"]) > 0
        assert r["ratio_tokens_per_s"] > 0
    u = fig["update"]
    assert u["tokens_per_s"] > 0 and u["assistant_tokens_per_s"] > 0 and u["seconds_per_step"] > 0
    assert u["student_tokens"] > 0 and u["frozen_tokens"] > u["student_tokens"]  # reference + teacher forwards
    assert u["flops_per_step"] == 6 * round(fig["non_embedding_params_m"] * 1e6) * u["student_tokens"] + \
        2 * round(fig["non_embedding_params_m"] * 1e6) * u["frozen_tokens"]
    assert u["mfu"] is None and "6 * N" in u["mfu_formula"] and "cpu" in fig["peak_tflops_source"]
    assert u["peak_gib"] is None and ro["ours_alone_multi_turn"]["peak_gib"] is None  # no GPU memory on a CPU
    assert "render" not in fig  # --no-render (the render keeps the test under its time budget)
    assert fig["markdown"].count("\n") >= 5 and "x |" in fig["markdown"]


def test_peak_table_and_mfu_override():
    mod = _load()
    assert mod.peak_tflops("NVIDIA H100 80GB HBM3", None)[0] == 989.0
    assert mod.peak_tflops("NVIDIA H100 PCIe", None)[0] == 756.0
    assert mod.peak_tflops("NVIDIA H200", None)[0] == 989.0
    assert mod.peak_tflops("NVIDIA A100-SXM4-80GB", None)[0] == 312.0
    assert mod.peak_tflops("NVIDIA L40S", None)[0] == 362.0 and mod.peak_tflops("NVIDIA L4", None)[0] == 121.0
    assert mod.peak_tflops("NVIDIA GeForce RTX 4090", None)[0] == 165.0
    assert mod.peak_tflops("Some Future GPU", None)[0] is None
    assert mod.peak_tflops("Some Future GPU", 500.0) == (500.0, "--peak-tflops")
