"""A local transformers policy: any causal LM folder (optionally GGUF), PEFT LoRA adapters, batched sampling.

Generation keeps one :class:`TokenStream` per conversation. A stream holds the exact tokens the
model has seen and written, which of them it sampled (the assistant mask), their log-probabilities,
and the model's KV cache. When a conversation grows by a turn, only the new tokens are prefilled
(the chat template must render prefixes stably, as ChatML does; otherwise the stream is re-encoded
from scratch). Multi-turn rollouts go through :meth:`LocalPolicy.run_conversations` (continuous
batching, :mod:`genevolve.policies.continuous`). :meth:`LocalPolicy.continue_streams` writes one
turn for a set of streams in lock-step: their caches are left-padded into a buffer allocated once
for the turn, their new tokens are prefilled in one call, they decode together, and each stream's
cache is cut back out when it finishes its turn.

Device and dtype are chosen at run time: CUDA with bf16 when available, else CPU float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .base import Completion, Message, SamplingParams
from .continuous import _kv_shape


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    if dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
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


@dataclass
class TokenStream:
    """Everything one conversation has been through, token by token."""

    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # the rendered text the ids stand for (for prefix checks)
    text_without_stop: str = ""  # the same without the last turn's stop token
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (1, H, T, D), covers ids[:-pending]
    cached: int = 0  # how many of ids the cache covers
    resets: int = 0  # times the stream had to be re-encoded from scratch


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return (tokens, their log-probabilities under the raw model distribution)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if params.temperature == 0:
        tok = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(dim=-1) - sorted_p < params.top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


class LocalPolicy:
    """A ``ChatPolicy`` over a local causal LM. See the module docstring for how turns are generated."""

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

    def _adapter_context(self):
        import contextlib

        if self._adapter_off and hasattr(self.model, "disable_adapter"):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    # -- generation --------------------------------------------------------------
    def generate(self, conversations: Sequence[list[Message]], params: SamplingParams) -> list[Completion]:
        streams = [TokenStream() for _ in conversations]
        return self.continue_streams(streams, conversations, params)

    def _render(self, messages: list[Message]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _extend(self, st: TokenStream, msgs: list[Message]) -> None:
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
            st.cache, st.cached = None, 0
        st.text = text

    def run_conversations(self, n: int, next_messages, on_turn, params: SamplingParams,
                          max_batch: int = 64) -> list[TokenStream]:
        """Multi-turn generation with continuous batching (see :mod:`genevolve.policies.continuous`)."""
        from .continuous import ContinuousBatch

        return ContinuousBatch(self, n, next_messages, on_turn, params, max_batch=max_batch).run()

    @torch.no_grad()
    def continue_streams(self, streams: list[TokenStream], conversations: Sequence[list[Message]],
                         params: SamplingParams) -> list[Completion]:
        """Extend each stream to its conversation, then sample one turn for all of them together.

        One batch holds every stream on a shared time axis: the streams' caches left-padded, then
        their new tokens right-padded (one prefill call for the whole batch; padding after the new
        tokens, never before, so no query is left with nothing to attend to), then one column per
        decoding step. The attention mask hides the padding, and position ids count each stream's
        own tokens, so every stream sees exactly what it would see alone. The cache is allocated
        once per turn and written in place. A stream that finishes leaves the batch; its cache is
        cut back out of the batch (its unmasked positions) for the next turn.
        """
        if not streams:
            return []
        with self._adapter_context():
            for st, msgs in zip(streams, conversations):
                self._extend(st, msgs)
            B = len(streams)
            lengths = [len(st.ids) for st in streams]  # tokens before this turn's sampled ones
            old = [st.cached if st.cache is not None else 0 for st in streams]
            T0 = max(old)
            new = [n - c for n, c in zip(lengths, old)]
            N = max(new)
            cache = _TurnCache.for_streams(streams, T0, N + params.max_new_tokens, self.model.config, self.device,
                                           self.model.dtype)
            attn = torch.zeros(B, T0 + N + params.max_new_tokens, dtype=torch.long, device=self.device)
            x = torch.zeros(B, N, dtype=torch.long, device=self.device)
            pos = torch.zeros(B, N, dtype=torch.long, device=self.device)
            for b, st in enumerate(streams):  # [past, left-padded to T0][new tokens, right-padded to N]
                attn[b, T0 - old[b] : T0 + new[b]] = 1
                x[b, : new[b]] = torch.tensor(st.ids[old[b] :])
                pos[b] = torch.arange(old[b], old[b] + N)
            width = T0 + N  # columns of the batch so far
            last = torch.tensor(new, device=self.device)[:, None] - 1
            out = self.model(input_ids=x, position_ids=pos, attention_mask=attn[:, :width], past_key_values=cache,
                             use_cache=True, logits_to_keep=last)
            logits = out.logits[:, -1]

            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(int(params.seed) & 0x7FFFFFFFFFFFFFFF)
            out_ids: list[list[int]] = [[] for _ in range(B)]
            out_lp: list[list[float]] = [[] for _ in range(B)]
            reason = ["length"] * B
            rows = list(range(B))  # which stream each batch row holds; finished rows leave the batch
            final_cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

            def keep_cache(b: int, r: int) -> None:
                # The stream's own positions: its past plus the tokens it wrote, except the last one
                # (never fed back), which the next turn's prefill covers.
                idx = attn[r, :width].nonzero().squeeze(-1)
                final_cache[b] = cache.take(r, idx)

            for step in range(params.max_new_tokens):
                tok, lp = _sample(logits, params, gen)
                toks, lps = tok.tolist(), lp.tolist()
                done = []
                for r, b in enumerate(rows):
                    out_ids[b].append(toks[r])
                    out_lp[b].append(lps[r])
                    if toks[r] in self.stop_ids:
                        reason[b] = "stop"
                        done.append(r)
                if step == params.max_new_tokens - 1:
                    break
                if done:
                    for r in done:
                        keep_cache(rows[r], r)
                    live = [r for r in range(len(rows)) if r not in set(done)]
                    if not live:
                        break
                    idx = torch.tensor(live, device=self.device)
                    cache.select_rows(idx)
                    attn, tok = attn.index_select(0, idx), tok.index_select(0, idx)
                    rows = [rows[r] for r in live]
                attn[:, width] = 1
                width += 1
                pos = torch.tensor([[lengths[b] + len(out_ids[b]) - 1] for b in rows], device=self.device)
                out = self.model(input_ids=tok[:, None], position_ids=pos, attention_mask=attn[:, :width],
                                 past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1]
            for r, b in enumerate(rows):
                if b not in final_cache:
                    keep_cache(b, r)

            completions = []
            for b, st in enumerate(streams):
                ids = out_ids[b]
                st.cache = final_cache[b]
                st.ids += ids
                st.mask += [1] * len(ids)
                st.logprobs += out_lp[b]
                st.cached = lengths[b] + len(ids) - 1
                body = ids[:-1] if ids and ids[-1] in self.stop_ids else ids
                content = self.tokenizer.decode(body, skip_special_tokens=False)
                st.text_without_stop = st.text + content
                st.text += self.tokenizer.decode(ids, skip_special_tokens=False)
                completions.append(Completion(text=content, finish_reason=reason[b], token_ids=list(ids), logprobs=list(out_lp[b])))
            return completions


class _TurnLayer(CacheLayerMixin):
    """One layer's keys and values for a turn, in a buffer allocated once and written in place.

    ``keys``/``values`` are views of the filled part, as transformers' cache layers expose them.
    (A DynamicCache concatenates on every step, which copies the whole cache each time.)
    """

    is_sliding = False
    is_compileable = False
    is_initialized = True

    def __init__(self, kbuf: torch.Tensor, vbuf: torch.Tensor, filled: int):  # noqa: the mixin's init sets keys
        self.kbuf, self.vbuf, self.filled = kbuf, vbuf, filled
        self.dtype, self.device = kbuf.dtype, kbuf.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front

    @property
    def keys(self) -> torch.Tensor:
        return self.kbuf[:, :, : self.filled]

    @property
    def values(self) -> torch.Tensor:
        return self.vbuf[:, :, : self.filled]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.filled + n > self.kbuf.shape[-2]:
            raise RuntimeError("turn cache overflow: more tokens than allocated for this turn")
        self.kbuf[:, :, self.filled : self.filled + n] = key_states
        self.vbuf[:, :, self.filled : self.filled + n] = value_states
        self.filled += n
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.filled

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.filled + query_length, 0

    def get_max_length(self) -> int:
        return -1


class _TurnCache(Cache):
    """A transformers cache over :class:`_TurnLayer` buffers: all streams of a turn on one time axis."""

    def __init__(self, layers: list[_TurnLayer]):
        super().__init__(layers=layers)

    @classmethod
    def for_streams(cls, streams: list[TokenStream], T0: int, extra: int, config, device, dtype) -> "_TurnCache":
        """Each stream's cache right-aligned at column ``T0``, with room for ``extra`` more columns."""
        n_layers, kv, dim = _kv_shape(config)
        layers = []
        for li in range(n_layers):
            kbuf = torch.zeros(len(streams), kv, T0 + extra, dim, device=device, dtype=dtype)
            vbuf = torch.zeros_like(kbuf)
            for b, st in enumerate(streams):
                if st.cache is not None and st.cached:
                    k, v = st.cache[li]
                    kbuf[b, :, T0 - k.shape[2] : T0] = k[0]
                    vbuf[b, :, T0 - v.shape[2] : T0] = v[0]
            layers.append(_TurnLayer(kbuf, vbuf, T0))
        return cls(layers)

    def select_rows(self, idx: torch.Tensor) -> None:
        for layer in self.layers:
            layer.kbuf, layer.vbuf = layer.kbuf.index_select(0, idx), layer.vbuf.index_select(0, idx)

    def take(self, row: int, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One row's keys and values at ``positions`` (its unmasked columns), per layer, as (1, H, T, D)."""
        return [(l.kbuf[row : row + 1, :, positions], l.vbuf[row : row + 1, :, positions]) for l in self.layers]
