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
    """The tiny policy served by `genevolve serve`; rollouts go to the newest hot-loaded adapter.

    The adapters are initialised to change the model (PEFT's default zero lora_B would make them no-ops), so the
    served turns show which weights answered: the newest adapter's, or the base model's when it is asked for."""
    import torch
    from peft import LoraConfig, get_peft_model

    from genevolve.agent.protocol import SYSTEM_PROMPT
    from genevolve.agent.rollout import rollout
    from genevolve.policies.local import LocalPolicy
    from genevolve.policies.openai_compat import OpenAIChatPolicy
    from genevolve.policies.resolve import resolve_policy
    from genevolve.serving.chat import build_app
    from genevolve.serving.chat_limits import ServeLimits

    served, plain = resolve_policy("tiny"), resolve_policy("tiny")
    lora = get_peft_model(resolve_policy("tiny").model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                   task_type="CAUSAL_LM", init_lora_weights=False))
    req = world.split("bench")[0]
    probe, greedy = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": req.text}], \
        SamplingParams(temperature=0.0, max_new_tokens=16)

    def local(model):
        """The greedy turn computed here, in this process."""
        return LocalPolicy(model.eval(), plain.tokenizer).generate([probe], greedy)[0]

    with serve_app(build_app(served, "tiny", limits=ServeLimits(adapter_root=tmp_path))) as url:
        def ask(model):
            with OpenAIChatPolicy(url, model, backoff=0, max_retries=0) as client:
                c = client.generate([probe], greedy)[0]
            assert c.error is None and c.logprobs, c
            return c

        student = RemoteStudent(url, "tiny", server="genevolve", params=SamplingParams(temperature=0.7, max_new_tokens=48),
                                backoff=0, max_retries=0)
        before = rollout([req], student, tools, k=1, params=student.params, max_turns=2)[0]
        assert before.turns and before.termination != "error"
        base = ask("tiny")
        assert (base.text, base.logprobs) == (local(plain.model).text, pytest.approx(local(plain.model).logprobs, abs=1e-4))
        answers = {}
        for step in (1, 2):
            lora.save_pretrained(tmp_path / "run" / "checkpoint" / "adapter")
            student.follow(tmp_path / "run")({"step": step})
            answers[step], want = ask(student.model), local(lora)
            assert (answers[step].text, answers[step].logprobs) == (want.text, pytest.approx(want.logprobs, abs=1e-4))
            with torch.no_grad():  # the next step's adapter: other weights
                for name, w in lora.named_parameters():
                    if "lora_B" in name:
                        w.mul_(-1.5)
        assert student.model == "student-step2" and student.loaded == ["student-step2"]
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny", "student-step2"]  # step 1 was unloaded
        # the adapters change what the model says; the base model, asked for by name, is unchanged
        for a, b in ((answers[1], base), (answers[2], base), (answers[2], answers[1])):
            assert a.logprobs != pytest.approx(b.logprobs, abs=1e-3)
        again = ask("tiny")
        assert (again.text, again.logprobs) == (base.text, pytest.approx(base.logprobs, abs=1e-5))
        back = ask(student.model)  # and the adapter is applied again after a request without it
        assert (back.text, back.logprobs) == (answers[2].text, pytest.approx(answers[2].logprobs, abs=1e-5))
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
