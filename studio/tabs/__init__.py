"""The studio's five views, one module each: a view's layout, its handlers and their wiring.

Handlers are thin: they call the services (models, disk) and the pure view functions, and every
expected failure comes back as a message in the view's status line, never as a stack trace.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import gradio as gr

from genevolve.experience.bank import ExperienceError
from genevolve.records.schema import SchemaError
from genevolve.tools.refstore import RefStoreError

from .. import StudioError
from ..html import message

log = logging.getLogger("genevolve.studio")
EXPECTED = (StudioError, RefStoreError, ExperienceError, SchemaError, KeyError, FileNotFoundError)


@dataclass
class Refresh:
    """What a view re-reads from disk when the page loads and when its tab is opened: ``fn()`` returns
    one update per component of ``outputs`` (dropdown choices, mostly), so a run folder or bank made
    elsewhere (a terminal, another browser tab) shows up without a restart."""

    fn: Callable[[], Any]
    outputs: list
    on_open: bool = True  # False: only when the page loads (e.g. reconnecting to the running job)
    inputs: list | None = None  # what ``fn`` reads from the page (a list's filter), if anything


@dataclass
class Link:
    """What a view opens from the page address (``?view=<view>&…``): ``fn(params)`` returns updates for some of
    ``outputs``; ``then`` (keyword arguments of an event's ``.then``) runs after, e.g. to mark a trajectory."""

    view: str
    fn: Callable[[dict[str, str]], dict]
    outputs: list
    then: dict | None = None


def safe(status: gr.components.Component) -> Callable:
    """Turn expected errors into a red status line (and log unexpected ones) instead of a broken view."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except EXPECTED as exc:
                text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                return {status: message("err", str(text))}
            except Exception as exc:  # a bug: say so in the UI and keep the traceback in the log
                log.exception("studio handler %s failed", fn.__name__)
                return {status: message("err", f"unexpected error ({type(exc).__name__}): {exc}")}
        return inner
    return wrap


def pick(ns: SimpleNamespace, names: str) -> tuple[Any, ...]:
    """The named attributes of a view's layout (or handlers), in order."""
    return tuple(getattr(ns, n) for n in names.split())


def opt_number(text, name: str, kind=int):
    """A blank box means "the default"; anything else must be a number."""
    text = "" if text is None else str(text).strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise StudioError(f"{name} must be a number (or blank for the default)") from None


def signature(out: Path) -> tuple:
    """Sizes and modification times of what the live view reads: unchanged files need no redraw."""
    sig = []
    for pattern in ("metrics.jsonl", "*/metrics.jsonl", "probe.json", "*/probe.json", "pairs.jsonl", "report/report.md", "studio.log"):
        for p in sorted(out.glob(pattern)):
            try:
                st = p.stat()
                sig.append((str(p), st.st_size, st.st_mtime))
            except OSError:
                pass
    return tuple(sig)
