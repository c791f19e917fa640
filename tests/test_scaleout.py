"""Scale-out: a remote student that hot-loads each new LoRA adapter, and SFT in two gloo processes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from genevolve.policies.base import SamplingParams
from genevolve.serving.scaleout import AdapterHotLoader, RemoteStudent

from _loopback import run_process_group, serve_app

ROOT = Path(__file__).resolve().parents[1]


def test_sglang_and_vllm_paths():
    seen = []

    def handler(req: httpx.Request):
        seen.append((req.url.path, json.loads(req.content)))
        return httpx.Response(200, json={"ok": True})

    AdapterHotLoader("http://h:30000", "sglang", transport=httpx.MockTransport(handler)).load("a", "/tmp/a")
    AdapterHotLoader("http://h:8000/v1", "vllm", transport=httpx.MockTransport(handler)).unload("a")
    assert seen == [("/load_lora_adapter", {"lora_name": "a", "lora_path": "/tmp/a"}),
                    ("/v1/unload_lora_adapter", {"lora_name": "a"})]
    refused = AdapterHotLoader("http://h:8000", transport=httpx.MockTransport(lambda r: httpx.Response(400, text="bad rank")))
    with pytest.raises(RuntimeError, match="HTTP 400: bad rank"):
        refused.load("a", "/tmp/a")
    with pytest.raises(ValueError, match="server is one of .*not 'tgi'"):
        AdapterHotLoader("http://h", "tgi")


def test_remote_student_follows_each_update(world, tools, tmp_path):
    """The tiny policy served by `genevolve serve`; rollouts go to the newest hot-loaded adapter."""
    from peft import LoraConfig, get_peft_model

    from genevolve.policies.resolve import resolve_policy
    from genevolve.agent.rollout import rollout
    from genevolve.serving.chat import build_app
    from genevolve.serving.chat_limits import ServeLimits

    served = resolve_policy("tiny")
    trainer_side = resolve_policy("tiny").model
    lora = get_peft_model(trainer_side, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with serve_app(build_app(served, "tiny", limits=ServeLimits(adapter_root=tmp_path))) as url:
        student = RemoteStudent(url, "tiny", server="genevolve", params=SamplingParams(temperature=0.7, max_new_tokens=48),
                                backoff=0, max_retries=0)
        req = world.split("bench")[0]
        before = rollout([req], student, tools, k=1, params=student.params, max_turns=2)[0]
        assert before.turns and before.termination != "error"
        for step in (1, 2):
            lora.save_pretrained(tmp_path / "run" / "checkpoint" / "adapter")
            student.follow(tmp_path / "run")({"step": step})
        assert student.model == "student-step2" and student.loaded == ["student-step2"]
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny", "student-step2"]  # step 1 was unloaded
        after = rollout([req], student, tools, k=1, params=student.params, max_turns=2)[0]
        assert after.policy == "remote:student-step2" and after.termination != "error"


def test_sft_in_two_gloo_processes(world, tmp_path):
    """accelerate's data-parallel SFT in two CPU processes: both replicas end with the same weights."""
    import itertools

    from genevolve.training.sft_data import conversations, expert_trajectories

    data = tmp_path / "sft.jsonl"
    convs = conversations(itertools.islice(expert_trajectories(world, guided_fraction=0), 8))
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "out"
    code, err = run_process_group([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m",
                                   "genevolve.training.accelerate_sft", "--model", str(ROOT / "assets/policy/tiny"), "--data",
                                   str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "2"], env, cwd=ROOT)
    assert code == 0, err[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["backend"] == "gloo" and result["steps"] == 2
    assert result["replicas_in_sync"] and len(result["param_checksums"]) == 2
    assert (out / "config.json").exists()
