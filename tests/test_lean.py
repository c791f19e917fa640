"""The lean forward (genevolve/policies/lean.py) computes the numbers transformers' forward computes, bit for bit:
same tokens and log-probabilities for whole multi-turn batches, bare, with a LoRA adapter, with it switched off,
in float32 and bfloat16; where it does not apply the engine runs the model's own forward."""

from __future__ import annotations

import pytest
import torch

from genevolve.agent.protocol import SYSTEM_PROMPT
from genevolve.policies import lean
from genevolve.policies.base import ModelCallError, SamplingParams
from genevolve.policies.continuous import ContinuousBatch
from genevolve.policies.local import LocalPolicy

PARAMS = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=12, seed=5)


def _run(policy, monkeypatch, use_lean: bool, n: int = 5, turns: int = 2):
    monkeypatch.setenv("GENEVOLVE_LEAN", "1" if use_lean else "0")
    convs = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"draw {k} red circles"}]
             for k in range(n)]
    done = [0] * n

    def on_turn(i, c):
        done[i] += 1
        convs[i] = convs[i] + [{"role": "assistant", "content": c.text}, {"role": "user", "content": "observation: ok"}]

    streams = policy.run_conversations(n, lambda i: None if done[i] >= turns else convs[i], on_turn, PARAMS, max_batch=3)
    return [(s.ids, s.mask, s.logprobs) for s in streams]


def _policy(folder, dtype):
    return LocalPolicy.load(folder, device="cpu", dtype=dtype, name="tiny-random")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_streams_as_transformers(tiny_folder, monkeypatch, dtype):
    policy = _policy(tiny_folder, dtype)
    assert lean.lean_decoder(policy.model) is not None
    ref = _run(policy, monkeypatch, False)
    assert _run(policy, monkeypatch, True) == ref
    assert sum(sum(m) for _, m, _ in ref) > 20  # something was sampled


def test_same_streams_with_lora_on_and_off(tiny_folder, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from genevolve.training.checkpoint import LORA_TARGETS

    policy = _policy(tiny_folder, "float32")
    torch.manual_seed(0)
    policy.model = get_peft_model(policy.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:  # a fresh adapter is a no-op (B = 0): make it change the numbers
            p.data.normal_(0, 0.5)
    policy.model.eval()
    assert lean.lean_decoder(policy.model) is not None  # the adapter's layers run through the lean path
    with_adapter = _run(policy, monkeypatch, False)
    assert _run(policy, monkeypatch, True) == with_adapter
    policy.disable_adapter()
    without = _run(policy, monkeypatch, False)
    assert _run(policy, monkeypatch, True) == without
    assert without != with_adapter  # the adapter mattered, and switching it off was honoured


def test_unsupported_models_use_their_own_forward(tiny_folder, monkeypatch):
    policy = _policy(tiny_folder, "float32")
    policy.model.config._attn_implementation = "eager"
    assert "attention" in lean.supported(policy.model)
    assert lean.lean_decoder(policy.model) is None
    policy.model.config._attn_implementation = "sdpa"
    monkeypatch.setenv("GENEVOLVE_LEAN", "0")
    assert lean.lean_decoder(policy.model) is None
    monkeypatch.delenv("GENEVOLVE_LEAN")
    monkeypatch.setattr(policy.model, "forward", policy.model.forward)  # a forward replaced on the instance is run
    assert lean.lean_decoder(policy.model) is None
    monkeypatch.undo()
    assert lean.lean_decoder(policy.model) is not None
    handle = policy.model.lm_head.register_forward_hook(lambda m, a, out: out)  # hooks must run: no lean path
    assert "hooks" in lean.supported(policy.model) and lean.lean_decoder(policy.model) is None
    handle.remove()


def test_a_failing_lean_forward_is_a_model_call_error(tiny_folder, monkeypatch):
    policy = _policy(tiny_folder, "float32")

    def failing(self, *a, **k):
        raise RuntimeError("kernel fault")

    monkeypatch.setattr(lean.LeanDecoder, "forward", failing)
    with pytest.raises(ModelCallError, match="kernel fault"):
        _run(policy, monkeypatch, True)
    assert isinstance(ContinuousBatch(policy, 1, lambda i: None, lambda i, c: None, PARAMS).lean, lean.LeanDecoder)


@pytest.mark.parametrize("arch", ["Qwen2", "Mistral"])
def test_other_supported_architectures_match_too(tiny_folder, tmp_path, monkeypatch, arch):
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    cfg = getattr(transformers, f"{arch}Config")(vocab_size=len(tok), hidden_size=64, intermediate_size=160,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=2048, tie_word_embeddings=True,
                                                 **({"sliding_window": None} if arch == "Mistral" else {}))
    torch.manual_seed(1)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg)
    if arch == "Qwen2":
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):  # Qwen2's q/k/v projections carry biases: make them matter
                p.data.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    policy = _policy(tmp_path, "float32")
    assert lean.supported(policy.model) is None
    assert _run(policy, monkeypatch, True) == _run(policy, monkeypatch, False)
