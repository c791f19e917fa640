"""A local transformers policy: any causal LM folder (optionally GGUF), PEFT LoRA adapters, batched sampling.

Generation keeps one :class:`TokenStream` per conversation. A stream holds the exact tokens the
model has seen and written, which of them it sampled (the assistant mask) and their
log-probabilities; the batch keeps its KV cache. When a conversation grows by a turn, only the new
tokens are prefilled (the chat template must render prefixes stably, as ChatML does; otherwise the
stream is re-encoded from scratch). Generation goes through :meth:`LocalPolicy.run_conversations`, which batches any
number of multi-turn conversations continuously (:mod:`genevolve.policies.continuous`);
:meth:`LocalPolicy.generate` is one turn for each of a list of conversations.

Device and dtype are chosen at run time: CUDA with bf16 when available, else CPU float32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from .base import Completion, Message, NextMessages, OnTurn, SamplingParams, TokenStream
from .continuous import ContinuousBatch


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """``dtype`` when given, else ``$GENEVOLVE_DTYPE`` when set, else bf16 on a CUDA GPU that has it and float32 otherwise.

    On a CPU with bf16 matrix instructions (``lscpu`` lists avx512_bf16 or amx_bf16) ``GENEVOLVE_DTYPE=bfloat16`` runs a model's matrix products
    several times faster: 8 bench rollouts of the SmolLM2 student took 54 s instead of 78 s on 2 cores
    (``benchmarks/results/cpu_dtype_smollm2.json``). float32 stays the CPU default so that saved figures keep
    reproducing: in bf16 a trajectory depends on the batch it runs in, a product rounding differently in another
    batch shape (the SmolLM2 student: 2 of 6 trajectories identical alone vs together in bf16, 6 of 6 in float32,
    ``benchmarks/results/batch_invariance_smollm2_*.json``). On a GPU the default is bf16, so GPU runs reproduce
    in distribution, not bit for bit; pass float32 for the latter.
    """
    dtype = dtype or os.environ.get("GENEVOLVE_DTYPE") or None
    if dtype:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def encode_conversation(tokenizer, messages: list[Message]) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and its assistant mask.

    The mask is 1 on every token of each assistant turn's content and on its end-of-turn token, and
    0 elsewhere (including the whitespace the template writes after the end-of-turn token). Spans are
    found by rendering growing prefixes, so any prefix-stable chat template works.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(head) or not text.startswith(upto) or not upto.startswith(head + m["content"]):
            raise ValueError("the chat template does not render conversation prefixes stably")
        spans.append((len(head), len(upto.rstrip())))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [1 if b > a and any(s <= a and b <= e for s, e in spans) else 0 for a, b in offsets]
    return ids, mask


class LocalPolicy:
    """A ``ChatPolicy`` and ``RolloutPolicy`` over a local causal LM. See the module docstring for how turns are generated."""

    needs_exclusive_device = True  # one model: its batches run one at a time

    def __init__(self, model, tokenizer, name: str = "local", device: torch.device | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = device or next(model.parameters()).device
        self._adapter_off = False
        self.stop_ids = self._stop_ids()
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer of {name} has no chat template")

    # -- loading -----------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, gguf_file: str | None = None, device: str | None = None,
             dtype: str | None = None, adapter: str | None = None, name: str | None = None) -> "LocalPolicy":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no model folder at {path}")
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        tok = AutoTokenizer.from_pretrained(path, **kw)
        if len(tok) == 0 or tok.vocab_size == 0:
            raise ValueError(f"the tokenizer loaded from {path} is empty (a hub lookup failed?)")
        dev = pick_device(device)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dev, dtype), **kw).to(dev)
        model.eval()
        pol = cls(model, tok, name=name or path.name, device=dev)
        if adapter:
            pol.load_adapter(adapter, "default")
        return pol

    def _stop_ids(self) -> set[int]:
        tok = self.tokenizer
        ids = set()
        for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i >= 0 and i != tok.unk_token_id:
                ids.add(i)
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        return ids

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- LoRA adapters -----------------------------------------------------------
    def load_adapter(self, path: str | os.PathLike, name: str = "default") -> None:
        from peft import PeftModel

        if not Path(path).exists():
            raise FileNotFoundError(f"no adapter at {path}")
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
        self.model.set_adapter(name)
        self.model.eval()
        self._adapter_off = False

    def set_adapter(self, name: str) -> None:
        self.model.set_adapter(name)
        self._adapter_off = False

    def disable_adapter(self) -> None:
        self._adapter_off = True

    def unload_adapter(self, name: str) -> None:
        self.model.delete_adapter(name)

    @property
    def adapters(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}) or {})

    def adapter_context(self):
        """The context generation runs in: with the adapters switched off after :meth:`disable_adapter`."""
        import contextlib

        if self._adapter_off and hasattr(self.model, "disable_adapter"):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    # -- generation --------------------------------------------------------------
    def generate(self, conversations: Sequence[list[Message]], params: SamplingParams) -> list[Completion]:
        """One assistant turn for each conversation, all in one batch (each sampled with ``params.seed``)."""
        comps: list[Completion | None] = [None] * len(conversations)
        if conversations:
            self.run_conversations(len(conversations), lambda i: None if comps[i] else conversations[i],
                                   comps.__setitem__, params, max_batch=len(conversations))
        return comps  # type: ignore[return-value]

    def _render(self, messages: list[Message]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def extend_stream(self, st: TokenStream, msgs: list[Message]) -> None:
        """Append the tokens the conversation gained since the stream last saw it (re-encode if it diverged)."""
        text = self._render(msgs)
        # The last turn's text as the template writes it may end with the turn's stop token or not
        # (a different stop token, or the token budget ran out): try both.
        prefix = next((p for p in (st.text, st.text_without_stop) if p and text.startswith(p)), None)
        if prefix is not None:
            delta = self._encode(text[len(prefix) :])
            st.ids += delta
            st.mask += [0] * len(delta)
            st.logprobs += [0.0] * len(delta)
        else:
            if st.text:  # a template that does not extend prefixes: re-encode everything
                st.resets += 1
            ids, mask = encode_conversation(self.tokenizer, msgs) if st.text else (self._encode(text), None)
            if mask is not None:
                gen_prompt = self._encode(text[len(self.tokenizer.apply_chat_template(msgs, tokenize=False)) :])
                ids, mask = ids + gen_prompt, mask + [0] * len(gen_prompt)
            st.ids, st.mask = ids, mask or [0] * len(ids)
            st.logprobs = [0.0] * len(ids)  # sampled log-probabilities are lost on a re-encode
        st.text = text

    def run_conversations(self, n: int, next_messages: NextMessages, on_turn: OnTurn, params: SamplingParams,
                          max_batch: int = 64, seeds: Sequence[int | None] | None = None,
                          on_progress: Callable[[], None] | None = None) -> list[TokenStream]:
        """Multi-turn generation with continuous batching (see :mod:`genevolve.policies.continuous`).

        Conversation i samples with ``seeds[i]`` (default: ``params.seed`` for all; random when that is None).
        ``on_progress()`` is called as each conversation finishes.
        """
        return ContinuousBatch(self, n, next_messages, on_turn, params, max_batch=max_batch, seeds=seeds,
                               on_progress=on_progress).run()
