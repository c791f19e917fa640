"""A run folder has one kind: ``rollout``, ``bench``, ``import``, ``evolve``, ``ablate`` or ``sft``.

The kind is written into the folder (``.kind``) when a command claims it, and every other command refuses the
folder by name: a rollout never lands between an evolve run's steps, an evolve never appends training rows to a
rollout, an SFT never replaces a run folder. A folder made before kinds were written is recognised by its files
(``run.json``'s command, ``ablate_config.json``, ``sft_config.json``, an evolve ``config.json``). A folder that
holds files of no run is refused too: a command writes only into an empty folder, a new one, or its own kind.

Nothing here deletes or moves anything: ``--force-new`` (see :func:`move_aside`) moves an existing folder aside,
never removes it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

KINDS = ("rollout", "bench", "import", "evolve", "ablate", "sft")
MARK = ".kind"
COMMAND_KIND = {"rollout": "rollout", "bench": "bench", "data import": "import"}  # run.json's command -> kind
SEEDS = {"evolve": {"bank"}, "ablate": {"bank"}}  # what a user may put in first: a bank to start from
# What a command (or the studio, for the command it starts) writes before it claims its folder.
PREAMBLE = {"estimate.json", "studio.log", "studio_job.json"}


class RunKindError(ValueError):
    """A folder that holds another kind of run (or files of no run): refused, never written into."""


def recorded_kind(folder: str | os.PathLike) -> str | None:
    """The kind written into ``folder`` when it was claimed, else the kind its files show, else None."""
    folder = Path(folder)
    mark = folder / MARK
    if mark.exists():
        try:
            kind = json.loads(mark.read_text("utf-8")).get("kind")
        except (ValueError, OSError, AttributeError):
            kind = None
        if kind in KINDS:
            return kind
    return _kind_from_files(folder)


def _kind_from_files(folder: Path) -> str | None:
    if (folder / "run.json").exists():
        try:
            return COMMAND_KIND.get(json.loads((folder / "run.json").read_text("utf-8")).get("command"), "rollout")
        except (ValueError, OSError, AttributeError):
            return "rollout"
    if (folder / "ablate_config.json").exists():
        return "ablate"
    if (folder / "sft_config.json").exists() or (folder / "sft_data.jsonl").exists():
        return "sft"
    if (folder / "config.json").exists():
        try:
            cfg = json.loads((folder / "config.json").read_text("utf-8"))
        except (ValueError, OSError):
            cfg = {}
        if isinstance(cfg, dict) and "prompts_per_step" in cfg:
            return "evolve"
        if isinstance(cfg, dict) and "recipe" in cfg and "epochs" in cfg:  # an SFT's work folder
            return "sft"
    if (folder / "checkpoint").is_dir() or (folder / "start.json").exists():
        return "evolve"
    return None


def describe(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeis' else 'a'} {kind} run folder"  # "an sft": said ess-eff-tee


def check(folder: str | os.PathLike, kind: str, command: str | None = None, hint: str = "choose another --out") -> None:
    """Refuse ``folder`` for a ``kind`` run unless it is new, empty, or already of that kind (raises
    :class:`RunKindError` with one line that names what the folder holds)."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}; kinds are {', '.join(KINDS)}")
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise RunKindError(f"{folder} is a file, not a run folder: {hint}")
    have = recorded_kind(folder)
    what = f"`{command or kind}`"
    if have is not None and have != kind:
        raise RunKindError(f"{folder} is {describe(have)}; {what} writes {kind} runs, so it is refused: {hint}")
    if have is None:
        # (hidden names are a command's own: its lock, its mark and their temporary files)
        ok = PREAMBLE | SEEDS.get(kind, set())
        stray = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.name not in ok)
        if stray:
            shown = ", ".join(stray[:4]) + (f" and {len(stray) - 4} more" if len(stray) > 4 else "")
            raise RunKindError(f"{folder} holds files of no run ({shown}); {what} writes only into a new or empty "
                               f"folder or {describe(kind)}: {hint}")


def claim(folder: str | os.PathLike, kind: str, command: str | None = None, hint: str = "choose another --out") -> Path:
    """Check ``folder`` (see :func:`check`), create it, and write its kind into it (once: a claimed folder keeps
    the kind it was claimed with)."""
    from .schema import atomic_write_json

    check(folder, kind, command, hint)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARK).exists():
        atomic_write_json(folder / MARK, {"kind": kind, "command": command or kind,
                                          "claimed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return folder


def move_aside(folder: str | os.PathLike) -> Path:
    """``--force-new``: move an existing folder to ``<folder>.replaced-<time>`` (never deleted); the new path."""
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = folder.with_name(f"{folder.name}.replaced-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.replaced-{stamp}-{n}")
    folder.rename(aside)
    return aside
