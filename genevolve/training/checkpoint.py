"""A trainer's checkpoint: the LoRA adapter, the optimizer state, the step, the RNG state, the sizes of the
run's append-only files and a copy of the experience bank, swapped in whole.

``<out>/checkpoint/`` holds ``adapter/``, ``state.pt``, ``bank.jsonl`` and, written last, ``complete.json``.
A new checkpoint is written to ``checkpoint.tmp/`` and swapped in by renames (the previous one waits as
``checkpoint.old/`` until the new one is in place), so a kill at any moment leaves one whole checkpoint:
:func:`recover` puts it back. A folder without the adapter or without ``state.pt`` is not a checkpoint:
resuming from it is refused, never silently restarted.

A fresh run first writes ``start.json`` and ``bank.start.jsonl`` (the files and the bank it starts
from). Resuming rolls every append-only file back to the checkpoint's sizes (or the start's) and the bank
back to its copy, so a step that was cut short leaves no rows behind: the resumed run writes the same
rows an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
APPEND_FILES = ("trajectories.jsonl", "verdicts.jsonl", "pairs.jsonl", "metrics.jsonl")
COMPLETE = "complete.json"
START = "start.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that is not whole, or run files that do not match it."""


def _whole(d: Path) -> bool:
    """Adapter (config and weights) and state: ``state.pt`` is written after the adapter, so its presence means
    the adapter is complete (``complete.json`` follows it for readers that want the step)."""
    adapter = d / "adapter"
    has_weights = adapter.is_dir() and (adapter / "adapter_config.json").exists() and any(adapter.glob("adapter_model.*"))
    return bool(has_weights) and (d / "state.pt").exists()


def recover(out: Path, log: Callable[[str], None] = print) -> None:
    """Leave ``<out>/checkpoint`` whole or absent: a kill during a swap is finished; a broken one is refused."""
    ckpt, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    if ckpt.exists() and not _whole(ckpt):
        if _whole(tmp) or _whole(old):
            shutil.rmtree(ckpt)
        else:
            have = sorted(p.name for p in ckpt.iterdir())
            raise CheckpointError(f"{ckpt} is not a whole checkpoint (it holds {have or 'nothing'}; a checkpoint has adapter/, "
                                  "state.pt and complete.json): move it away to start again, or restore it")
    if not ckpt.exists():
        for cand in (tmp, old):
            if _whole(cand):
                cand.rename(ckpt)
                log(f"checkpoint: recovered the whole {cand.name} left by an interrupted save")
                break
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)


def attach_adapter(model, ckpt: Path, rank: int, alpha: int):
    """The model with a trainable LoRA adapter: the checkpoint's when there is one, else a fresh one."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if (ckpt / "adapter" / "adapter_config.json").exists():
        return PeftModel.from_pretrained(model, str(ckpt / "adapter"), is_trainable=True)
    if (ckpt / "state.pt").exists():
        raise CheckpointError(f"{ckpt} has state.pt but no adapter/: not a checkpoint to resume from")
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))


def _sizes(out: Path) -> dict[str, int]:
    return {name: (out / name).stat().st_size if (out / name).exists() else 0 for name in APPEND_FILES}


def mark_start(out: Path, bank_jsonl: Path) -> None:
    """A fresh run: remember the files and the bank it starts from (kept until the run folder is removed)."""
    from ..records.schema import atomic_write_json

    if (out / START).exists() or (out / "checkpoint").exists():
        return
    if bank_jsonl.exists():
        shutil.copy2(bank_jsonl, out / "bank.start.jsonl")
    atomic_write_json(out / START, {"files": _sizes(out), "bank": bank_jsonl.exists()})


def roll_back(out: Path, bank_jsonl: Path, log: Callable[[str], None] = print) -> None:
    """Cut every append-only file back to the checkpoint's sizes (the start's without one) and restore the bank."""
    from ..records.schema import atomic_write_bytes

    ckpt = out / "checkpoint"
    if (ckpt / "state.pt").exists():
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        files, bank_copy = state.get("files"), ckpt / "bank.jsonl"
        had_bank = state.get("bank", bank_copy.exists())
    elif (out / START).exists():
        start = json.loads((out / START).read_text("utf-8"))
        files, bank_copy, had_bank = start["files"], out / "bank.start.jsonl", start["bank"]
    else:
        return
    if files is None:
        return  # a checkpoint from before sizes were kept: nothing to compare against
    cut = []
    for name, size in files.items():
        path = out / name
        now = path.stat().st_size if path.exists() else 0
        if now < size:
            raise CheckpointError(f"{path} is shorter ({now} bytes) than at the checkpoint ({size} bytes): the run folder "
                                  "was changed by hand; restore it or start a new run")
        if now > size:
            with open(path, "r+b") as fh:
                fh.truncate(size)
                os.fsync(fh.fileno())
            cut.append(f"{name} ({now - size} bytes)")
    if had_bank and bank_copy.exists():
        if not bank_jsonl.exists() or bank_jsonl.read_bytes() != bank_copy.read_bytes():
            bank_jsonl.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(bank_jsonl, bank_copy.read_bytes())
            cut.append("the bank")
    elif not had_bank and bank_jsonl.exists():
        bank_jsonl.unlink()
        cut.append("the bank")
    if cut:
        log("rolled back to the checkpoint what a cut-short step had written: " + ", ".join(cut))


def restore(ckpt: Path, opt: torch.optim.Optimizer, device, log: Callable[[str], None]) -> int:
    """Load the optimizer and RNG state of a checkpoint; the step it holds (0 without one)."""
    if not (ckpt / "state.pt").exists():
        return 0
    state: dict[str, Any] = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    log(f"resumed from step {state['step']}")
    return state["step"]


def save(out: Path, model, opt: torch.optim.Optimizer, step: int, bank_jsonl: Path | None = None) -> None:
    """Write ``<out>/checkpoint`` for ``step`` (adapter, optimizer, step, RNG, file sizes, bank) and swap it in."""
    tmp, ckpt, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir()
    model.save_pretrained(tmp / "adapter")
    has_bank = bank_jsonl is not None and bank_jsonl.exists()
    if has_bank:
        shutil.copy2(bank_jsonl, tmp / "bank.jsonl")
    torch.save({"opt": opt.state_dict(), "step": step, "rng": torch.get_rng_state(), "files": _sizes(out), "bank": has_bank},
               tmp / "state.pt")
    (tmp / COMPLETE).write_text(json.dumps({"step": step}))
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    if old.exists():
        shutil.rmtree(old)
