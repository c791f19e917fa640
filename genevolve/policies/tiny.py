"""The tiny sandbox policy: a byte-level BPE tokenizer trained on sandbox text and a small Llama.

Small enough to train and roll out on two CPU cores, big enough to learn the protocol from the
expert's trajectories. ``genevolve sft --recipe tiny`` builds both and trains the cold start; the
result ships in ``assets/policy/tiny``.
"""

from __future__ import annotations

from pathlib import Path

from ..world import DEFAULT_WORLD

TINY_DIR = DEFAULT_WORLD.parent / "policy" / "tiny"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Protocol tags as single tokens: the policy writes them every turn.
PROTOCOL_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<answer>", "</answer>",
                   "<tool_response>", "</tool_response>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts, vocab_size: int = 6000):
    """Byte-level BPE (every string encodable) with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + PROTOCOL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, additional_special_tokens=["<|im_start|>"])
    fast.add_tokens(PROTOCOL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    if len(fast) > 8192:
        raise ValueError(f"tokenizer has {len(fast)} entries; the tiny policy allows at most 8192")
    return fast


def tiny_config(vocab_size: int, layers: int = 4, hidden: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 32 * 32,
                       num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                       max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_tiny_model(tokenizer, seed: int = 0, layers: int = 4, hidden: int = 256):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(len(tokenizer), layers, hidden)
    cfg.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return LlamaForCausalLM(cfg)


def tiny_exists(path: str | Path = TINY_DIR) -> bool:
    return (Path(path) / "config.json").exists() and (Path(path) / "tokenizer.json").exists()
