"""A trainer's checkpoint: the LoRA adapter, the optimizer state, the step, the RNG state, the sizes of the
run's append-only files, swapped in whole.

``<out>/checkpoint/`` holds ``adapter/``, ``state.pt`` and, written last, ``complete.json``.
A new checkpoint is written to ``checkpoint.tmp/`` and swapped in by renames (the previous one waits as
``checkpoint.old/`` until the new one is in place), so a kill at any moment leaves one whole checkpoint:
:func:`recover` puts it back. A folder without the adapter or without ``state.pt`` is not a checkpoint:
resuming from it is refused, never silently restarted.

``state.pt`` is read with the safe loader (tensors and plain types: data never carries code). A checkpoint
that cannot be read, does not fit the run, or cannot be written (a full disk) raises :class:`CheckpointError`
with one line naming the file and what to do; a failed save leaves the previous checkpoint in place.

A fresh run first writes ``start.json`` (the sizes of the files it starts from). Resuming rolls every append-only file back to the checkpoint's
sizes (or the start's) and undoes the trainer's own bank writes after the checkpoint, from its journal
(:mod:`genevolve.experience.journal`), so a step that was cut short leaves no rows behind and the resumed run
writes the same rows an uninterrupted one does, while the bank keeps every change made by anyone else (a
studio edit after the run ended, an experience added by hand).
"""

from __future__ import annotations

import io
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


RESTART = "move the run aside with --force-new or delete the checkpoint folder to restart"
STATE_KEYS = ("opt", "step", "rng")


class CheckpointError(ValueError):
    """A checkpoint folder that is not whole, unreadable or unwritable, or run files that do not match it.

    A ValueError, so that every command reports it as one line, like its other refusals of bad data."""


def _named(out: Path, path: Path) -> str:
    """``run folder <out>: checkpoint/state.pt``: the run and the file within it."""
    return f"run folder {out}: {path.relative_to(out).as_posix()}"


def failure_reason(exc: BaseException) -> str:
    """Why a load or a write failed, in one line of a few words (the safe loader's refusal names what it would not load)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    refused = next((line for line in lines if "Unsupported global" in line), None)
    if refused is not None:
        what = refused.split("Unsupported global:", 1)[1].split(" was not", 1)[0].strip()
        return f"it asks to load {what}, which the safe loader refuses: data never carries code"
    other = next((line.split("error:", 1)[-1].strip() for line in lines if "Unsupported" in line), None)
    if other is not None:
        return f"not a PyTorch state file: {other}"
    if not lines:
        return f"{type(exc).__name__}: empty or cut short"
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]  # a heading, then the cause
    return f"{type(exc).__name__}: {text.split('. ', 1)[0][:240]}"


def read_state(path: Path, out: Path, map_location: Any = "cpu", keys: tuple[str, ...] = STATE_KEYS,
               hint: str = RESTART) -> dict[str, Any]:
    """A trainer's ``state.pt`` through the safe loader (tensors and plain types only); one that cannot be read,
    or lacks ``keys``, raises :class:`CheckpointError` naming it."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # whatever the bytes are, the file cannot be used: say which and why
        raise CheckpointError(f"{_named(out, path)} is unreadable ({failure_reason(exc)}): {hint}") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{_named(out, path)} is not a trainer's state (no {', '.join(missing)}): {hint}")
    return state


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Serialise in memory, then write and sync: a full disk raises ``OSError`` here, never a half-checked file."""
    buf = io.BytesIO()
    torch.save(state, buf)
    with open(path, "wb") as fh:
        fh.write(buf.getbuffer())
        fh.flush()
        os.fsync(fh.fileno())


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
        _check_weights(ckpt)
        try:
            return PeftModel.from_pretrained(model, str(ckpt / "adapter"), is_trainable=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:  # e.g. shapes of another base model
            raise CheckpointError(f"{_named(ckpt.parent, ckpt / 'adapter')} does not fit this policy ({failure_reason(exc)}): "
                                  f"it was trained from another policy or damaged; resume with the run's --policy, or {RESTART}") from None
    if (ckpt / "state.pt").exists():
        raise CheckpointError(f"{ckpt} has state.pt but no adapter/: not a checkpoint to resume from; {RESTART}")
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))


def _check_weights(ckpt: Path) -> None:
    """A safetensors adapter file that is cut short or garbled is refused by name, before the model loads it."""
    from safetensors import SafetensorError, safe_open

    for path in (ckpt / "adapter").glob("*.safetensors"):
        try:
            with safe_open(str(path), "pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{_named(ckpt.parent, path)} is unreadable ({failure_reason(exc)}): {RESTART}") from None


def _sizes(out: Path) -> dict[str, int]:
    return {name: (out / name).stat().st_size if (out / name).exists() else 0 for name in APPEND_FILES}


def mark_start(out: Path) -> None:
    """A fresh run: remember the sizes of the files it starts from (kept until the run folder is removed)."""
    from ..records.schema import atomic_write_json

    if (out / START).exists() or (out / "checkpoint").exists():
        return
    atomic_write_json(out / START, {"files": _sizes(out)})


def _start_sizes(out: Path) -> dict[str, int]:
    """The file sizes ``start.json`` recorded; a damaged one is refused by name."""
    try:
        return {str(k): int(v) for k, v in json.loads((out / START).read_text("utf-8"))["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{_named(out, out / START)} is unreadable ({type(exc).__name__}: {exc}): "
                              "move the run aside with --force-new to start again") from None


def roll_back(out: Path, bank_jsonl: Path, log: Callable[[str], None] = print) -> None:
    """Cut every append-only file back to the checkpoint's sizes (the start's without one), and undo what the
    cut-short step wrote into the bank (only that: later changes by others are kept, see :mod:`..experience.journal`)."""
    from ..experience.journal import roll_back as undo_bank_writes

    ckpt = out / "checkpoint"
    if (ckpt / "state.pt").exists():
        state = read_state(ckpt / "state.pt", out)
        files, step = state.get("files"), state.get("step", 0)
    elif (out / START).exists():
        files, step = _start_sizes(out), 0
    else:
        return
    undo_bank_writes(out, bank_jsonl.parent, step, log)
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
    if cut:
        log("rolled back to the checkpoint what a cut-short step had written: " + ", ".join(cut))


def restore(ckpt: Path, opt: torch.optim.Optimizer, device, log: Callable[[str], None]) -> int:
    """Load the optimizer and RNG state of a checkpoint; the step it holds (0 without one)."""
    if not (ckpt / "state.pt").exists():
        return 0
    state = read_state(ckpt / "state.pt", ckpt.parent, device)
    try:
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
        step = int(state["step"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
        raise CheckpointError(f"{_named(ckpt.parent, ckpt / 'state.pt')} does not fit this run ({failure_reason(exc)}): "
                              f"it was saved by another policy or settings; {RESTART}") from None
    log(f"resumed from step {step}")
    return step


def save(out: Path, model, opt: torch.optim.Optimizer, step: int) -> None:
    """Write ``<out>/checkpoint`` for ``step`` (adapter, optimizer, step, RNG, file sizes) and swap it in."""
    tmp, ckpt, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    try:
        _write(tmp, out, model, opt, step)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _disk_error(exc):
            raise
        kept = "the previous checkpoint is kept" if _whole(ckpt) else "there is no earlier checkpoint to keep"
        raise CheckpointError(f"run folder {out}: the checkpoint of step {step} could not be written ({failure_reason(exc)}); "
                              f"{kept}: free space and run the same command again to resume") from None
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    if old.exists():
        shutil.rmtree(old)


def _disk_error(exc: BaseException) -> bool:
    """A write the disk refused (full, read-only, gone), as Python or safetensors reports it."""
    from safetensors import SafetensorError

    return isinstance(exc, OSError) or (isinstance(exc, SafetensorError) and "IoError" in str(exc))


def _write(tmp: Path, out: Path, model, opt: torch.optim.Optimizer, step: int) -> None:
    """The new checkpoint's files in ``tmp``: adapter, state, and ``complete.json`` last."""
    tmp.mkdir()
    model.save_pretrained(tmp / "adapter")
    write_state(tmp / "state.pt", {"opt": opt.state_dict(), "step": step, "rng": torch.get_rng_state(),
                                   "files": _sizes(out)})
    (tmp / COMPLETE).write_text(json.dumps({"step": step}))
