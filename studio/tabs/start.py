"""Start: what the studio is for, the loop in one figure, and the demo it makes on its first start (a K = 4 run, a
short self-evolution run with its report, and its experience bank), each one link away."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from ..demo import BANK, EVOLVE, ROLLOUT
from ..html import message
from ..services import Services
from . import Refresh

DOCS = Path(__file__).resolve().parents[2] / "docs"

INTRO = """An agent answers an image request with a **trajectory**: it searches text and reference images and reads skill
cards, then writes a prompt-reference program that a generator **renders**. A **judge** scores the picture against the
ground truth. Several trajectories of one request are compared: the difference between the best and the worst becomes
a **visual experience** (what to search, which skills, which references, how to word the prompt, what to avoid), keyed
by the situation it applies to. A **teacher** (the same weights, with the nearest experience in its system prompt)
re-reads the student's own tokens, and Visual Experience Distillation pulls the **student** towards it, next to GRPO.
The student never sees the experience: it learns to act as if it had."""

STEPS = ("request", "trajectory", "render", "judge", "experience", "teacher", "student")
NOTES = ("a text", "search, skills → program", "the generator", "KScore against the truth",
         "best vs worst, by situation", "same weights + the guide", "VED + GRPO on a LoRA")


def loop_svg() -> str:
    """The loop as one inline figure: seven boxes left to right, and the arrow from the student back to the trajectory."""
    w, h, box, gap = 128, 54, 112, 16
    parts = []
    for i, (name, note) in enumerate(zip(STEPS, NOTES)):
        x = 10 + i * w
        fill = "#ddf4ff" if name in ("experience", "teacher", "student") else "#f6f8fa"
        parts.append(f'<rect x="{x}" y="30" width="{box}" height="{h}" rx="8" fill="{fill}" stroke="#57606a"/>'
                     f'<text x="{x + box / 2}" y="52" text-anchor="middle" font-size="14" font-weight="600">{name}</text>'
                     f'<text x="{x + box / 2}" y="72" text-anchor="middle" font-size="9.5" fill="#57606a">{html.escape(note)}</text>')
        if i:
            parts.append(f'<line x1="{x - gap}" y1="57" x2="{x - 2}" y2="57" stroke="#57606a" stroke-width="1.5" marker-end="url(#a)"/>')
    last, second = 10 + 6 * w + box / 2, 10 + w + box / 2
    parts.append(f'<path d="M{last} 84 V112 H{second} V88" fill="none" stroke="#0969da" stroke-width="1.5" marker-end="url(#b)"/>'
                 f'<text x="{(last + second) / 2}" y="126" text-anchor="middle" font-size="11" fill="#0969da">'
                 "the trained student rolls out the next step's trajectories</text>")
    return ('<svg class="ge-loop" role="img" aria-label="request, trajectory, render, judge, experience, teacher, student" '
            f'viewBox="0 0 {10 + 7 * w} 134" width="100%" style="max-width:920px">'
            '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto"><path d="M0,0 L8,4 L0,8 z" '
            'fill="#57606a"/></marker><marker id="b" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
            '<path d="M0,0 L8,4 L0,8 z" fill="#0969da"/></marker></defs>' + "".join(parts) + "</svg>")


def demo_html(st: dict) -> str:
    """The demo's state as the first screen shows it: what is being made, or the three links."""
    state = st.get("state")
    if state == "ready":
        links = [(f"?view=trajectories&run={ROLLOUT}", "K = 4 trajectories of one request", "side by side, best and worst "
                  "marked, where they part ways"),
                 (f"?view=distill&run={EVOLVE}", "a short self-evolution run", "its curves, mined pairs, the student vs "
                  "teacher probe token by token, and its report"),
                 (f"?view=experiences&bank={BANK}", "the experiences it mined", "each with its trigger, evidence and the "
                  "requests that retrieve it")]
        items = "".join(f'<li><a href="{href}" data-demo="{href.split("&")[0][6:]}">{html.escape(a)}</a>: {html.escape(b)}</li>'
                        for href, a, b in links)
        return (f'<div class="ge-demo" data-state="ready"><b>The demo is ready</b> (made in {st.get("seconds", 0):.0f} s on '
                f"first start, in your runs folder):<ul>{items}</ul></div>")
    if state == "failed":
        return message("err", f"The demo could not be made: {st.get('error', '?')}. The studio works without it.")
    if state in ("making", "interrupted"):
        return (f'<div class="ge-demo" data-state="making">{message("info", "Making the demo (once, on first start): " + st.get("step", "") + ". The views work meanwhile; this box updates by itself.")}</div>')
    return message("info", "No demo in this runs folder (it is made on the studio's first start unless turned off).")


def tab(s: Services) -> list:
    gr.Markdown("## A studio for self-evolving image-generation agents\n" + INTRO)
    gr.HTML(loop_svg(), elem_id="start-loop")
    demo = gr.HTML(demo_html(s.demo.status()) if s.demo else "", elem_id="start-demo")
    gr.Markdown(f"Read more: the architecture and one request's path through the layers "
                f"([docs/architecture.md](/gradio_api/file={DOCS / 'architecture.md'})), and the project's README. The views: "
                "**Trajectories** (runs and rollouts side by side), **Experiences** (the bank, its keys and merges), "
                "**References** (the reference store), **Distill** (self-evolution, live), **Bench** (scores and "
                "comparisons). Everything here is also a command: `genevolve --help`.")
    timer = gr.Timer(3.0, active=bool(s.demo) and s.demo.status().get("state") != "ready")

    def poll():
        st = s.demo.status() if s.demo else {"state": "absent"}
        return demo_html(st), gr.Timer(active=st.get("state") in ("making", "interrupted"))

    timer.tick(poll, None, [demo, timer])
    return [Refresh(poll, [demo, timer], on_open=True)]
