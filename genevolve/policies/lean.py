"""A lean forward for Llama-family decoders, writing straight into the rollout engine's row buffers.

transformers' forward is written for every model and every feature: each decode step walks module
hooks, keyword plumbing, output capture, mask preparation and a cache object per layer. For a 135M
model on a CPU that bookkeeping costs as much as the matrix products. This module runs the same
computation with none of it: the same torch operations, on the same shapes, in the same order, as
transformers' Llama forward with SDPA attention and PEFT's LoRA layers, so its logits are the same
numbers bit for bit (``tests/test_lean.py`` compares them on the tiny policy, fp32 and bf16;
``benchmarks/lean_same.py`` on SmolLM2's trajectories).

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM`` (no sliding window) and ``Qwen2ForCausalLM``
(no sliding window) with default RoPE, SiLU MLP and SDPA attention, bare or wrapped by PEFT with
vanilla LoRA adapters on their linear layers. Anything else (another architecture, RoPE scaling,
DoRA, another attention implementation, forward hooks on any module) returns ``None`` from :func:`lean_decoder` and the engine
calls the model's own forward, as it does when ``forward`` was replaced on the model object (a wrapper or a
test double). ``GENEVOLVE_LEAN=0`` turns the lean path off.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import slice_logits_to_keep

ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supported(model) -> str | None:
    """Why the lean forward cannot run ``model`` (None when it can)."""
    base = _base(model)
    cfg = base.config
    if type(base).__name__ not in ARCHITECTURES:
        return f"architecture {type(base).__name__}"
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return f"attention {getattr(cfg, '_attn_implementation', None)}"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope {rope.get('rope_type')}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}"
    if getattr(cfg, "use_sliding_window", False) or (type(base).__name__ == "MistralForCausalLM" and cfg.sliding_window):
        return "sliding-window attention"
    if getattr(base.model.rotary_emb, "attention_scaling", 1.0) != 1.0:
        return "scaled rotary embedding"
    for mod in base.modules():
        if mod._forward_hooks or mod._forward_pre_hooks:  # an instrumented module: its hooks must run
            return f"forward hooks on {type(mod).__name__}"
        if hasattr(mod, "lora_A") and (getattr(mod, "lora_variant", None) or getattr(mod, "use_dora", {}) and any(mod.use_dora.values())):
            return "a LoRA variant (DoRA or another) on a layer"
    return None


def lean_decoder(model) -> "LeanDecoder | None":
    """The lean forward for ``model``, or None where it does not apply (see the module docstring)."""
    if os.environ.get("GENEVOLVE_LEAN", "1") == "0" or supported(model) is not None:
        return None
    if any("forward" in vars(m) for m in (model, _base(model))):  # a forward replaced on the instance (a wrapper,
        return None  # an instrumented or failing stand-in) is what the caller wants run: run it
    return LeanDecoder(model)


PACK_ROWS = 16  # the row count oneDNN's packed layout is tuned for (1 to 64 rows run within a few % of their best)


@functools.lru_cache(maxsize=1)
def _onednn_bf16() -> bool:
    """Whether this CPU build packs and multiplies bf16 weights with oneDNN (asked once per process)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _packable(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.dim() == 2 and _onednn_bf16()


def _packed(cache: dict, w: torch.Tensor) -> torch.Tensor | None:
    """``w`` reordered into oneDNN's blocked layout, made once and remade when ``w`` changes in place.

    A bf16 product against the packed weight is the same numbers as ``F.linear`` (oneDNN runs both), but skips
    reordering the weight on every call: at 1 to 8 rows that reorder cost SmolLM2 a third of its decode step."""
    entry = cache.get(id(w))
    if entry is not None and entry[0]() is w and entry[1] == (w._version, w.data_ptr()):
        return entry[2]
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS)
    except RuntimeError:
        return None
    cache[id(w)] = (weakref.ref(w), (w._version, w.data_ptr()), packed)
    return packed


def _linear(cache: dict | None, w: torch.Tensor, b: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``F.linear(x, w, b)``, through a packed weight where that applies (``cache`` not None and a bf16 CPU weight)."""
    packed = _packed(cache, w) if cache is not None and _packable(w) else None
    if packed is None:
        return lambda x: F.linear(x, w, b)

    def linear(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != w.dtype:
            return F.linear(x, w, b)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, b, "none", [None], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    return linear


def _projection(mod: nn.Module, cache: dict | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mod(x)`` without the module machinery: a plain linear layer, or PEFT's LoRA linear as its forward computes it."""
    if type(mod) is nn.Linear:
        return _linear(cache, mod.weight, mod.bias)
    if not hasattr(mod, "lora_A") or not isinstance(getattr(mod, "base_layer", None), nn.Linear):
        return mod
    base = mod.base_layer
    w, b = base.weight, base.bias
    if mod.disable_adapters or mod.merged:
        return _linear(cache if not mod.merged else None, w, b)
    base_linear = _linear(cache, w, b)
    adapters = [(mod.lora_A[a].weight, mod.lora_B[a].weight, mod.scaling[a], mod.lora_dropout[a])
                for a in mod.active_adapters if a in mod.lora_A.keys()]
    if any(not isinstance(d, nn.Identity) and (d.training and d.p > 0) for *_, d in adapters) \
            or not getattr(mod, "cast_input_dtype_enabled", True) \
            or any(mod.lora_A[a].bias is not None or mod.lora_B[a].bias is not None
                   for a in mod.active_adapters if a in mod.lora_A.keys()):
        return mod

    def lora(x: torch.Tensor) -> torch.Tensor:
        result = base_linear(x)
        dtype = result.dtype
        for a, bw, scaling, _ in adapters:
            x = x if x.dtype == a.dtype else x.to(dtype=a.dtype)
            result = result + F.linear(F.linear(x, a), bw) * scaling
        return result.to(dtype)

    return lora


def _rms(weight: torch.Tensor, eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def norm(h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        h = h.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + eps)
        return weight * h.to(dtype)

    return norm


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanDecoder:
    """``forward(ids, kbufs, vbufs, write_cols, mask, keep)``: the model's logits at ``keep`` with each row's new
    keys and values written at ``write_cols`` of its buffers (see :mod:`genevolve.policies.continuous`)."""

    def __init__(self, model):
        base = _base(model)
        self.cfg = base.config
        self.inner = base.model
        self.lm_head = base.lm_head
        self.heads = self.cfg.num_attention_heads
        self.kv_heads = getattr(self.cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(self.cfg, "head_dim", None) or self.cfg.hidden_size // self.heads
        self.groups = self.heads // self.kv_heads
        self.scaling = self.head_dim ** -0.5
        # packed weights live with the model, so that every batch (and every engine) over it shares them
        self.packed = base.__dict__.setdefault("_genevolve_packed", {}) if os.environ.get("GENEVOLVE_PACK", "1") != "0" else None
        head = self.lm_head
        self.head = _linear(self.packed, head.weight, head.bias) if type(head) is nn.Linear else head

    def _plan(self):
        """Each layer's callables, read at call time so that adapters switched on or off are honoured."""
        plan = []
        for layer in self.inner.layers[: self.cfg.num_hidden_layers]:
            att, mlp = layer.self_attn, layer.mlp
            c = self.packed
            plan.append((_rms(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                         _projection(att.q_proj, c), _projection(att.k_proj, c), _projection(att.v_proj, c),
                         _projection(att.o_proj, c),
                         _rms(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                         _projection(mlp.gate_proj, c), _projection(mlp.up_proj, c), _projection(mlp.down_proj, c)))
        return plan

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inner.rotary_emb.inv_freq
        freqs = positions[..., None].float() * inv.to(device=hidden.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=hidden.dtype), emb.sin().to(dtype=hidden.dtype)

    @torch.inference_mode()  # no autograd bookkeeping at all (the buffers written are ordinary tensors)
    def forward(self, ids: torch.Tensor, kbufs: list[torch.Tensor], vbufs: list[torch.Tensor],
                write_cols: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | int) -> torch.Tensor:
        rows, n = ids.shape
        width = mask.shape[-1]
        h = self.inner.embed_tokens(ids)
        if mask.dtype == torch.bool:  # what SDPA turns a boolean mask into on every call, made once for all layers
            mask = torch.where(mask.logical_not(), float("-inf"), 0.0).to(h.dtype)
        cos, sin = self._rope(h, write_cols)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        row_idx = torch.arange(rows, device=ids.device)[:, None]
        heads_shape = (rows, n, -1, self.head_dim)
        for (norm1, q_proj, k_proj, v_proj, o_proj, norm2, gate, up, down), kb, vb in zip(self._plan(), kbufs, vbufs):
            res = h
            x = norm1(h)
            q = q_proj(x).view(heads_shape).transpose(1, 2)
            k = k_proj(x).view(heads_shape).transpose(1, 2)
            v = v_proj(x).view(heads_shape).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            kb[row_idx, :, write_cols] = k.transpose(1, 2)
            vb[row_idx, :, write_cols] = v.transpose(1, 2)
            keys, values = kb[:, :, :width], vb[:, :, :width]
            if self.groups > 1 and n == 1:  # transformers' pack_gqa: the key/value heads' queries side by side
                out = F.scaled_dot_product_attention(q.reshape(rows, self.kv_heads, self.groups, self.head_dim), keys,
                                                     values, attn_mask=mask, dropout_p=0.0, scale=self.scaling)
            else:
                if self.groups > 1:  # transformers' repeat_kv
                    keys = keys[:, :, None].expand(rows, self.kv_heads, self.groups, width, self.head_dim) \
                        .reshape(rows, self.heads, width, self.head_dim)
                    values = values[:, :, None].expand(rows, self.kv_heads, self.groups, width, self.head_dim) \
                        .reshape(rows, self.heads, width, self.head_dim)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0, scale=self.scaling)
            out = out.reshape(rows, -1, n, self.head_dim).transpose(1, 2).contiguous()
            out = o_proj(out.reshape(rows, n, -1).contiguous())
            h = res + out
            res = h
            x = norm2(h)
            h = res + down(F.silu(gate(x)) * up(x))
        h = self.inner.norm(h)
        return self.head(slice_logits_to_keep(h, keep))
