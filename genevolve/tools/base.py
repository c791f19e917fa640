"""Tool protocols and the exact text the policy sees for tool results.

The formatters reproduce the official GenEvolve runtime byte for byte: the
released SFT data was written with that text, so a policy trained on it reads
our observations as it read theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable


@dataclass
class ImageHit:
    """One image found by an image backend, before the agent gives it an ``IMG_###`` id."""

    title: str
    url: str
    local_path: str
    page_url: str = ""
    source_id: str = ""


@runtime_checkable
class TextSearch(Protocol):
    def search(self, queries: list[str], top_k: int = 5) -> str: ...


@runtime_checkable
class ImageSearch(Protocol):
    def image_search(self, query: str, top_k: int = 5) -> list[ImageHit]: ...


@runtime_checkable
class Knowledge(Protocol):
    def query(self, skill_name: str) -> str: ...


EMPTY_QUERIES = "[search] empty queries"
NO_RESULTS = "[search] no results"


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def format_text_results(query: str, items: list[dict], top_k: int) -> str:
    """One ``--- search result for [q] ---`` block; items may name their url ``link`` or ``url``."""
    lines = [f"--- search result for [{query}] ---"]
    for i, item in enumerate(items[: max(int(top_k), 0)], start=1):
        lines.append(f"{i}. title: {_text(item.get('title'))}")
        url = _text(item.get("link") or item.get("url"))
        if url:
            lines.append(f"  url: {url}")
        snippet = _text(item.get("snippet"))
        if snippet:
            lines.append(f"  snippet: {snippet}")
    lines.append("--- end of search result ---")
    return "\n".join(lines)


def _field(ref: Any, name: str) -> str:
    value = ref.get(name, "") if isinstance(ref, Mapping) else getattr(ref, name, "")
    return "" if value is None else str(value)


def format_image_results(query: str, refs: list, show_paths: bool = True) -> str:
    """The ``IMG_###`` block; ``show_paths=False`` hides local paths the policy cannot use anyway."""
    lines = [f"--- image search result for [{query}] ---"]
    for ref in refs:
        lines.append(f"{_field(ref, 'img_id')}: title: {_field(ref, 'title') or 'image'}")
        for name in ("url", "local_path", "page_url"):
            if name == "local_path" and not show_paths:
                continue
            value = _field(ref, name)
            if value:
                lines.append(f"  {name}: {value}")
    lines.append("--- end of image search result ---")
    return "\n".join(lines)


def join_blocks(blocks: list[str]) -> str:
    """Join per-query blocks the way every ``search`` backend must, including the empty case."""
    return "\n".join(blocks) if blocks else NO_RESULTS
