"""A report folder as one self-contained HTML file: the Markdown rendered, every image inlined.

``report.md`` names its curves and example pictures by relative paths; the HTML carries them as data
URIs, so the single file can be mailed, attached or opened anywhere without the folder. Only files
inside the report folder are inlined; a missing picture is replaced by a note saying so. Raw HTML in the
Markdown is kept only for the report's own ``<details>`` folds; any other (a model's prompt holding
``<script>``) is escaped, so opening a report never runs what a model wrote.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}
STYLE = """
body {font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
      color: #1f2328; line-height: 1.5}
table {border-collapse: collapse; margin: 0.5em 0} th, td {border: 1px solid #d0d4da; padding: 3px 8px; text-align: left}
th {background: #f6f8fa; white-space: nowrap}
img {max-width: 100%; border: 1px solid #d0d4da; margin: 4px 4px 4px 0; vertical-align: top}
pre {background: #f6f8fa; padding: 8px; overflow-x: auto; border-radius: 6px} code {font-size: 90%}
.missing {color: #82071e; background: #ffebe9; padding: 2px 6px; border-radius: 4px}
"""
OWN_TAGS = re.compile(r"</?(details|summary)>", re.I)  # the report's folds: bare tags, no attributes


def _inline(tag: str, root: Path) -> str:
    """One ``<img>`` tag with its picture as a data URI (or a note where the picture is not in the folder)."""
    m = re.search(r'src="([^"]*)"', tag)
    if m is None:
        return tag
    src = html.unescape(m.group(1))
    if src.startswith(("data:", "http://", "https://")):
        return tag
    path = (root / src).resolve()
    mime = MIME.get(path.suffix.lower())
    if mime is None or not path.is_relative_to(root.resolve()) or not path.is_file():
        return f'<span class="missing">[picture {html.escape(src)} not found in the report folder]</span>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return tag[: m.start(1)] + f"data:{mime};base64,{data}" + tag[m.end(1):]


def _raw_html(renderer, tokens, idx, options, env) -> str:
    """Raw HTML met in the Markdown: a block that is only the report's own bare tags around plain text is kept;
    anything else (a model's ``<script>``, an ``onerror=`` attribute, any tag inside a line) is shown as text."""
    token = tokens[idx]
    if token.type == "html_inline":
        return html.escape(token.content)
    return token.content if "<" not in OWN_TAGS.sub("", token.content) else f"<pre>{html.escape(token.content)}</pre>\n"


def report_html(report_md: str | Path) -> str:
    """The report's Markdown as a standalone HTML document with its pictures inlined. Model output (prompts,
    answers) reaches the Markdown as written, so raw HTML other than the report's own folds is escaped."""
    from markdown_it import MarkdownIt

    report_md = Path(report_md)
    text = report_md.read_text("utf-8")
    md = MarkdownIt("commonmark", {"html": True}).enable("table")
    for kind in ("html_block", "html_inline"):
        md.add_render_rule(kind, _raw_html)
    body = md.render(text)
    body = re.sub(r"<img\s[^>]*>", lambda m: _inline(m.group(0), report_md.parent), body)
    title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), "GenEvolve report")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n{body}</body></html>\n")


def write_report_html(report_md: str | Path, out: str | Path | None = None) -> Path:
    """Write :func:`report_html` (atomically) to ``out``, by default ``report.html`` beside ``report.md``."""
    from ..records.schema import atomic_write_text

    report_md = Path(report_md)
    if not report_md.is_file():
        raise FileNotFoundError(f"{report_md} does not exist: the run has no report yet (it is written after the comparison)")
    out = Path(out) if out is not None else report_md.with_suffix(".html")
    atomic_write_text(out, report_html(report_md))
    return out
