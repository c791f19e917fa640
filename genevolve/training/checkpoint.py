"""A trainer's checkpoint: the LoRA adapter, the optimizer state, the step and the RNG state, swapped in whole.

``<out>/checkpoint/`` holds ``adapter/`` and ``state.pt``. A new checkpoint is written to
``checkpoint.tmp/`` and renamed into place, so a kill at any moment leaves the previous one whole.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def attach_adapter(model, ckpt: Path, rank: int, alpha: int):
    """The model with a trainable LoRA adapter: the checkpoint's when there is one, else a fresh one."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if (ckpt / "adapter" / "adapter_config.json").exists():
        return PeftModel.from_pretrained(model, str(ckpt / "adapter"), is_trainable=True)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))


def restore(ckpt: Path, opt: torch.optim.Optimizer, device, log: Callable[[str], None]) -> int:
    """Load the optimizer and RNG state of a checkpoint; the step it holds (0 without one)."""
    if not (ckpt / "state.pt").exists():
        return 0
    state: dict[str, Any] = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    log(f"resumed from step {state['step']}")
    return state["step"]


def save(out: Path, model, opt: torch.optim.Optimizer, step: int) -> None:
    """Write ``<out>/checkpoint`` for ``step`` atomically (adapter + optimizer + step + RNG)."""
    tmp, ckpt = out / "checkpoint.tmp", out / "checkpoint"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp / "adapter")
    torch.save({"opt": opt.state_dict(), "step": step, "rng": torch.get_rng_state()}, tmp / "state.pt")
    if ckpt.exists():
        shutil.rmtree(ckpt)
    tmp.rename(ckpt)
