"""Pure functions from records to HTML: trajectory columns, verdicts, the best-vs-worst diff, token gaps.

Nothing here touches gradio or the models: every function takes records (and a way to turn image
hashes or paths into ``src`` values) and returns a string, so each is unit-tested without launching
the studio. Images are inlined as data URIs: sandbox images are a few kilobytes, and the page then
needs no file route into the run folders.
"""

from __future__ import annotations

import base64
import difflib
import html
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from genevolve.records.schema import ImageStore, Request, Trajectory, Verdict

FOLD_CHARS = 280  # observations longer than this are folded
FOLD_TURNS, FOLD_TURN_CHARS = 4, 6000  # a trajectory with more turns (or more HTML) than this starts folded
Src = Callable[[str | None], str | None]  # image hash -> src for <img>, None when missing

CSS = """
.ge-cols {display:grid; grid-template-columns:repeat(auto-fit, minmax(250px, 1fr)); gap:10px; align-items:start;
          padding-bottom:6px}
.ge-col {min-width:0; max-width:560px; border:1px solid #d0d4da; border-radius:8px; padding:8px; background:#fff;
         font-size:13px; color:#1f2328; overflow-wrap:anywhere}
.ge-col.ge-best {border:2px solid #1a7f37} .ge-col.ge-worst {border:2px solid #cf222e}
.ge-col.ge-focus {box-shadow:0 0 0 3px #0969da}
.ge-run h4 {margin:10px 0 6px} .ge-demo ul {margin:4px 0 0 18px} .ge-demo a {font-weight:600}
.ge-turn-diff {margin-top:8px; font-size:12px} .ge-turn-diff tr.differ td {background:#fff8c5}
.ge-turn-diff tr.first td {background:#ffebe9}
.ge-head {display:flex; justify-content:space-between; font-weight:600; margin-bottom:6px}
.ge-tag {border-radius:4px; padding:0 6px; color:#fff; font-size:11px}
.ge-tag.best {background:#1a7f37} .ge-tag.worst {background:#cf222e}
.ge-pics {display:flex; gap:6px} .ge-pics figure {margin:0; flex:1 1 0; min-width:0; max-width:160px; text-align:center;
                                                   font-size:11px; color:#57606a}
.ge-pics img {width:100%; image-rendering:pixelated; border:1px solid #d0d4da}
.ge-missing {display:flex; align-items:center; justify-content:center; aspect-ratio:1; border:1px dashed #d0d4da;
             color:#57606a; font-size:11px; padding:4px; background:#f6f8fa}
.ge-thumbs {display:flex; flex-wrap:wrap; gap:4px; margin:4px 0}
.ge-thumbs figure {margin:0; font-size:10px; text-align:center; width:64px; color:#57606a}
.ge-thumbs img {width:60px; image-rendering:pixelated; border:1px solid #d0d4da}
.ge-thumbs .chosen img {border:2px solid #0969da}
.ge-scores {display:grid; grid-template-columns:repeat(4, 1fr); gap:2px; margin:6px 0; font-size:12px}
.ge-scores b {font-weight:600}
.ge-rationale {color:#57606a; font-size:12px; margin:2px 0 6px}
.ge-program pre, .ge-turn pre {white-space:pre-wrap; word-break:break-word; background:#f6f8fa; padding:4px; margin:2px 0;
                               font-size:12px; border-radius:4px}
.ge-turn {border-top:1px dashed #d0d4da; padding:4px 0}
.ge-think {color:#57606a; font-style:italic}
.ge-call {font-family:monospace; color:#8250df}
.ge-err {color:#cf222e}
.ge-diff table {border-collapse:collapse; width:100%; font-size:13px}
.ge-diff td, .ge-diff th {border:1px solid #d0d4da; padding:4px; vertical-align:top; text-align:left}
.ge-diff tr.differ td:first-child {border-left:4px solid #bf8700}
.ge-diff del {background:#ffebe9; text-decoration:none} .ge-diff ins {background:#dafbe1; text-decoration:none}
.ge-tokens {white-space:pre-wrap; font-family:monospace; font-size:12px; line-height:1.7; border:1px solid #d0d4da;
            border-radius:6px; padding:6px; max-height:520px; overflow-y:auto; background:#fff; color:#1f2328}
.ge-tokens .tok {border-radius:2px; cursor:help} .ge-tokens .ctx {color:#8c959f}
.ge-legend {font-size:12px; color:#57606a; margin:4px 0}
.ge-legend span {padding:0 6px; border-radius:3px}
.gradio-container th .header-content span.header {word-break:normal; overflow-wrap:normal; white-space:nowrap}
.gradio-container td span.text {word-break:normal; overflow-wrap:break-word}
.ge-msg {padding:6px 10px; border-radius:6px; margin:4px 0}
.ge-msg.err {background:#ffebe9; color:#82071e} .ge-msg.ok {background:#dafbe1; color:#044f1e}
.ge-msg.info {background:#ddf4ff; color:#0a3069}
"""


def esc(text: Any) -> str:
    return html.escape("" if text is None else str(text))


def message(kind: str, text: str) -> str:
    """A status line: kind is 'ok', 'err' or 'info'."""
    return f'<div class="ge-msg {kind}">{esc(text)}</div>'


@lru_cache(maxsize=4096)
def _file_uri(path: str, mtime: float) -> str:
    data = Path(path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def file_src(path: str | os.PathLike | None) -> str | None:
    """A data URI for an image file (cached by path and modification time), None when it cannot be read."""
    if not path:
        return None
    try:
        return _file_uri(str(path), os.stat(path).st_mtime)
    except OSError:
        return None


def store_src(store: ImageStore) -> Src:
    def src(digest: str | None) -> str | None:
        if not digest:
            return None
        try:
            return file_src(store.path(digest))
        except ValueError:
            return None

    return src


def _img(src: str | None, alt: str, cls: str = "", why: str = "image file not found") -> str:
    """An ``<img>``, or a box saying why there is no picture."""
    if src is None:
        return f'<div class="ge-missing" data-missing="{esc(why)}" title="{esc(alt)}">{esc(why)}</div>'
    return f'<img src="{esc(src)}" alt="{esc(alt)}" class="{esc(cls)}">'


def rendered_missing(traj: Trajectory, verdict: Verdict | None) -> str:
    """Why a trajectory has no rendered picture to show."""
    if traj.program is None:
        return f"no program, nothing rendered ({traj.termination})"
    if verdict is None:
        return "not judged yet"
    if verdict.failed:
        return f"render failed: {verdict.failed}"
    if not verdict.image:
        return "render failed: no image recorded"
    return "rendered image missing from the run folder"


def gt_missing(gt: str | None) -> str:
    return "no ground truth for this request" if not gt else "ground-truth image missing from the image store"


def _num(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:.3f}"


def verdict_html(v: Verdict | None) -> str:
    if v is None:
        return '<div class="ge-err">no verdict</div>'
    if v.failed:
        return f'<div class="ge-err">not judged: {esc(v.failed)}</div>'
    cells = [("F", v.F), ("V", v.V), ("T", v.T), ("A", v.A), ("KScore", v.kscore), ("R_text", v.r_text), ("reward", v.reward)]
    scores = "".join(f"<div>{k} <b>{_num(x)}</b></div>" for k, x in cells)
    return f'<div class="ge-scores">{scores}</div><div class="ge-rationale">{esc(v.rationale)}</div>'


SMALL_GAP = 0.20  # a best-vs-worst gap below the miner's delta_min is flagged as small


@dataclass(frozen=True)
class Marks:
    """Which trajectories of a group are best and which worst: every one tied at the top or bottom reward (none when
    fewer than two are scored or all tie), the gap between them, and whether it is below :data:`SMALL_GAP`."""

    best: tuple[str, ...] = ()
    worst: tuple[str, ...] = ()
    gap: float | None = None

    @property
    def small(self) -> bool:
        return self.gap is not None and self.gap < SMALL_GAP

    def of(self, tid: str) -> str | None:
        return "best" if tid in self.best else "worst" if tid in self.worst else None

    def label(self, mark: str) -> str:
        """The badge: BEST / WORST, with how many share it and a small gap said so."""
        n = len(self.best if mark == "best" else self.worst)
        text = mark.upper() + (f" (tied, {n})" if n > 1 else "")
        return text + (f" · small gap {self.gap:.3f}" if self.small else "")


def best_and_worst(trajs: Sequence[Trajectory], verdicts: dict[str, Verdict]) -> Marks:
    """The best- and worst-reward trajectories of a group, ties included (see :class:`Marks`)."""
    scored = [(verdicts[t.id].reward if t.id in verdicts else 0.0, t.id) for t in trajs]
    scored = [s for s in scored if s[0] is not None]  # an unjudged case (null reward) is neither best nor worst
    if len(scored) < 2:
        return Marks()
    hi, lo = max(r for r, _ in scored), min(r for r, _ in scored)
    if hi == lo:
        return Marks()
    return Marks(tuple(t for r, t in scored if r == hi), tuple(t for r, t in scored if r == lo), hi - lo)


def _args(tc) -> str:
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in tc.arguments.items())


def _observation(turn, ref_src: Callable[[Any], str | None]) -> str:
    obs = turn.observation
    if obs is None:
        return ""
    thumbs = ""
    if obs.images:
        thumbs = '<div class="ge-thumbs">' + "".join(
            f'<figure>{_img(ref_src(im), im.title)}<figcaption>{esc(im.img_id)}</figcaption></figure>' for im in obs.images) + "</div>"
    text = obs.text
    if len(text) > FOLD_CHARS:
        body = f"<details><summary>observation ({len(text)} characters)</summary><pre>{esc(text)}</pre></details>"
    else:
        body = f"<pre>{esc(text)}</pre>"
    err = f'<div class="ge-err">{esc(obs.error)}</div>' if obs.error else ""
    return thumbs + body + err


def trajectory_column(traj: Trajectory, verdict: Verdict | None, src: Src, gt: str | None = None, mark: str | None = None,
                      title: str | None = None, ref_src: Callable[[Any], str | None] | None = None,
                      badge: str | None = None) -> str:
    """One trajectory as a column: header, rendered image next to ground truth, verdict, program, turns."""
    ref_src = ref_src or (lambda im: file_src(im.local_path))
    tag = f'<span class="ge-tag {mark}">{esc(badge or mark.upper())}</span>' if mark else ""
    head = f'<div class="ge-head"><span>{esc(title or traj.id)}</span>{tag}</div>'
    pics = (f'<div class="ge-pics"><figure>{_img(src(verdict.image if verdict else None), "rendered", why=rendered_missing(traj, verdict))}'
            f'<figcaption>rendered</figcaption></figure><figure>{_img(src(gt), "ground truth", why=gt_missing(gt))}'
            f'<figcaption>ground truth</figcaption></figure></div>')
    prog = traj.program
    if prog is not None:
        chosen = {r.img_id: r.note for r in prog.reference_images}
        refs = "".join(f'<figure class="chosen">{_img(ref_src(traj.image(i)) if traj.image(i) else None, i, why="reference file not found" if traj.image(i) else "not a retrieved image")}'
                       f'<figcaption>{esc(i)}</figcaption></figure>' for i in chosen)
        notes = "".join(f"<div>{esc(i)}: {esc(n)}</div>" for i, n in chosen.items())
        program = (f'<div class="ge-program"><b>Program</b><pre>{esc(prog.gen_prompt)}</pre>'
                   f'<div class="ge-thumbs">{refs}</div>{notes}'
                   + ("".join(f'<div class="ge-err">{esc(x)}</div>' for x in prog.issues)) + "</div>")
    else:
        program = f'<div class="ge-err">no program ({esc(traj.termination)})</div>'
    turns = []
    for t in traj.turns:
        parts = [f"<div><b>turn {t.index + 1}</b>{' · FINAL STEP' if t.forced_final else ''}</div>"]
        if t.think:
            parts.append(f'<div class="ge-think">{esc(t.think)}</div>')
        if t.tool_call:
            parts.append(f'<div class="ge-call">{esc(t.tool_call.name)}({esc(_args(t.tool_call))})</div>')
        if t.answer is not None:
            parts.append('<div class="ge-call">answer</div>')
        if t.tool_call is None and t.answer is None:
            raw = esc(t.raw)
            parts.append(f"<details><summary>raw output ({len(t.raw)} characters)</summary><pre>{raw}</pre></details>"
                         if len(t.raw) > FOLD_CHARS else f"<pre>{raw}</pre>")
        parts.append(_observation(t, ref_src))
        if t.error and not (t.observation and t.observation.error):
            parts.append(f'<div class="ge-err">{esc(t.error)}</div>')
        turns.append('<div class="ge-turn">' + "".join(parts) + "</div>")
    summary = f"{len(traj.turns)} turns · {traj.n_tool_calls} tool calls · {esc(traj.termination)}"
    cls = f"ge-col ge-{mark}" if mark else "ge-col"
    body = "".join(turns)
    fold = len(traj.turns) > FOLD_TURNS or len(body) > FOLD_TURN_CHARS  # a long trajectory starts folded
    return (f'<div class="{cls}" data-traj="{esc(traj.id)}">{head}{pics}{verdict_html(verdict)}{program}'
            f'<details{"" if fold else " open"} class="ge-turns"><summary>{summary}'
            f'{" (click to unfold)" if fold else ""}</summary>{body}</details></div>')


def columns_html(request: Request | None, trajs: Sequence[Trajectory], verdicts: dict[str, Verdict], src: Src,
                 titles: dict[str, str] | None = None, mark: bool = True) -> str:
    """K trajectories side by side, best and worst marked."""
    if not trajs:
        return message("info", "no trajectories")
    marks = best_and_worst(trajs, verdicts) if mark else Marks()
    gt = request.gt_image if request is not None else None
    cols = [trajectory_column(t, verdicts.get(t.id), src, gt, marks.of(t.id), (titles or {}).get(t.id),
                              badge=marks.label(marks.of(t.id)) if marks.of(t.id) else None) for t in trajs]
    head = f"<p><b>{esc(request.id)}</b>: {esc(request.text)}</p>" if request is not None else ""
    return head + f'<div class="ge-cols" data-columns="{len(cols)}">' + "".join(cols) + "</div>"


# ---------------------------------------------------------------------------
# Best-vs-worst diff
# ---------------------------------------------------------------------------


def decisions(traj: Trajectory) -> dict[str, list[str]]:
    """What a trajectory decided, aspect by aspect (the levers an experience talks about)."""
    calls = [t.tool_call for t in traj.turns if t.tool_call is not None and t.observation is not None]
    out = {
        "tools": [c.name for c in calls],
        "queries": [q for c in calls if c.name == "search" for q in (c.arguments.get("queries") or [])]
        + [str(c.arguments.get("query")) for c in calls if c.name == "image_search"],
        "skills": [str(c.arguments.get("skill_name")) for c in calls if c.name == "query_knowledge"],
        "references": [],
        "prompt": [traj.program.gen_prompt] if traj.program else [],
    }
    if traj.program:
        for r in traj.program.reference_images:
            im = traj.image(r.img_id)
            out["references"].append(f"{r.img_id}: {im.title if im else '?'}")
    return out


def first_divergence(a: Trajectory, b: Trajectory) -> int | None:
    """Index of the first turn where the two trajectories take different actions (None when they never do)."""
    def action(t):
        if t.tool_call is not None:
            return (t.tool_call.name, json.dumps(t.tool_call.arguments, sort_keys=True))
        return ("answer", t.answer.gen_prompt if t.answer else t.raw)

    for i, (x, y) in enumerate(zip(a.turns, b.turns)):
        if action(x) != action(y):
            return i
    return None if len(a.turns) == len(b.turns) else min(len(a.turns), len(b.turns))


def word_diff(a: str, b: str) -> tuple[str, str]:
    wa, wb = a.split(), b.split()
    out_a, out_b = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=wa, b=wb, autojunk=False).get_opcodes():
        sa, sb = esc(" ".join(wa[i1:i2])), esc(" ".join(wb[j1:j2]))
        if op == "equal":
            out_a.append(sa)
            out_b.append(sb)
        else:
            if sa:
                out_a.append(f"<ins>{sa}</ins>")
            if sb:
                out_b.append(f"<del>{sb}</del>")
    return " ".join(out_a), " ".join(out_b)


def diff_rows(best: Trajectory, worst: Trajectory) -> list[dict[str, Any]]:
    """Aspect by aspect: what the best and the worst trajectory did, and whether it differs."""
    a, b = decisions(best), decisions(worst)
    return [{"aspect": k, "best": a[k], "worst": b[k], "same": a[k] == b[k]} for k in a]


def diff_html(best: Trajectory, worst: Trajectory, best_v: Verdict | None = None, worst_v: Verdict | None = None,
              labels: tuple[str, str] = ("best", "worst"), turns: bool = False) -> str:
    """Two trajectories aspect by aspect (tools, queries, skills, references, prompt), where they part ways, and with
    ``turns`` every turn side by side; ``labels`` name the two (best and worst, or any two picked)."""
    rows = diff_rows(best, worst)
    div = first_divergence(best, worst)
    where = "they take the same actions" if div is None else f"they part ways at turn {div + 1}"
    a, b = (esc(x) for x in labels)
    gap = (f" · reward {a} − {b} {best_v.reward - worst_v.reward:+.3f}"
           if best_v and worst_v and best_v.reward is not None and worst_v.reward is not None else "")
    body = []
    for r in rows:
        if r["aspect"] == "prompt":
            x, y = word_diff(" ".join(r["best"]), " ".join(r["worst"]))
        else:
            x, y = esc(" → ".join(r["best"]) or "—"), esc(" → ".join(r["worst"]) or "—")
        body.append(f'<tr class="{"same" if r["same"] else "differ"}"><td>{esc(r["aspect"])}</td><td>{x}</td><td>{y}</td></tr>')
    out = (f'<div class="ge-diff"><p><b>{a.capitalize()} {esc(best.id)}</b> vs <b>{b} {esc(worst.id)}</b>: {where}{gap}.</p>'
           f'<table><tr><th>aspect</th><th>{a}</th><th>{b}</th></tr>{"".join(body)}</table>')
    if turns:
        out += turns_table(best, worst, labels, div)
    return out + "</div>"


def _turn_text(t) -> str:
    if t is None:
        return "—"
    if t.tool_call is not None:
        obs = f" → {t.observation.text[:160]}" if t.observation is not None and t.observation.text else ""
        return f"{t.tool_call.name}({_args(t.tool_call)}){obs}"
    if t.answer is not None:
        return f"answer: {t.answer.gen_prompt}"
    return f"(no action) {t.raw[:160]}"


def turns_table(a: Trajectory, b: Trajectory, labels: tuple[str, str] = ("A", "B"), div: int | None = None) -> str:
    """Every turn of two trajectories side by side: the action (and the start of its observation); the turn where they
    part ways is marked."""
    n = max(len(a.turns), len(b.turns))
    rows = []
    for i in range(n):
        x = a.turns[i] if i < len(a.turns) else None
        y = b.turns[i] if i < len(b.turns) else None
        same = x is not None and y is not None and _turn_text(x) == _turn_text(y)
        cls = "same" if same else "differ" + (" first" if i == div else "")
        rows.append(f'<tr class="{cls}"><td>{i + 1}{" ◀ part ways" if i == div else ""}</td>'
                    f'<td>{esc(_turn_text(x))}</td><td>{esc(_turn_text(y))}</td></tr>')
    return (f'<table class="ge-turn-diff"><tr><th>turn</th><th>{esc(labels[0])}</th><th>{esc(labels[1])}</th></tr>'
            + "".join(rows) + "</table>")


# ---------------------------------------------------------------------------
# Student vs teacher, token by token
# ---------------------------------------------------------------------------


def gap_colour(gap: float) -> str:
    """Green where the teacher likes the sampled token more than the student, red where less; stronger with |gap|."""
    a = min(abs(gap) / 4.0, 1.0) * 0.85
    return f"rgba(26,127,55,{a:.2f})" if gap > 0 else f"rgba(207,34,46,{a:.2f})"


def token_gap_html(tokens: list[dict[str, Any]], fold_chars: int = 400) -> str:
    """The student's trajectory, each sampled token coloured by log q_teacher - log p_student (hover: both)."""
    import math

    if not tokens:
        return message("info", "no tokens yet")
    parts: list[str] = []
    ctx: list[str] = []
    gaps = []

    def flush():
        if not ctx:
            return
        text = "".join(ctx)
        if len(text) > fold_chars:
            parts.append(f'<details class="ctx"><summary>context ({len(text)} characters)</summary>'
                         f'<span class="ctx">{esc(text)}</span></details>')
        else:
            parts.append(f'<span class="ctx">{esc(text)}</span>')
        ctx.clear()

    for t in tokens:
        if not t.get("a"):
            ctx.append(t["t"])
            continue
        flush()
        p = t.get("p")
        q = t.get("q")
        if p is None:
            parts.append(f'<span class="tok">{esc(t["t"])}</span>')
            continue
        if q is None:
            tip = f"student p={math.exp(p):.3f} (log {p:.2f}); no teacher"
            parts.append(f'<span class="tok" title="{esc(tip)}">{esc(t["t"])}</span>')
            continue
        gap = q - p
        gaps.append(gap)
        tip = f"student p={math.exp(p):.3f} (log {p:.2f}) · teacher q={math.exp(q):.3f} (log {q:.2f}) · log q − log p = {gap:+.2f}"
        parts.append(f'<span class="tok" data-gap="{gap:.3f}" style="background:{gap_colour(gap)}" title="{esc(tip)}">{esc(t["t"])}</span>')
    flush()
    stats = (f"{len(gaps)} sampled tokens scored by the teacher · mean |log q − log p| {sum(map(abs, gaps)) / len(gaps):.3f}"
             if gaps else "no teacher scores for this trajectory")
    legend = (f'<div class="ge-legend"><span style="background:{gap_colour(3)}">teacher prefers</span> '
              f'<span style="background:{gap_colour(-3)}">teacher disagrees</span> · hover a token for both probabilities · {stats}</div>')
    return legend + f'<div class="ge-tokens" data-scored="{len(gaps)}">' + "".join(parts) + "</div>"


def run_requests(run) -> list[str]:
    """The run's request ids in the order their trajectories were written."""
    return list(dict.fromkeys(t.request_id for t in run.trajectories))


def run_view(run, request_id: str | None = None) -> tuple[str, str, str]:
    """A run folder as (summary line, K columns, best-vs-worst diff) for one of its requests (the first by default)."""
    if not run.trajectories:
        return message("info", f"{run.dir.name}: no trajectories yet"), "", ""
    ids = run_requests(run)
    rid = request_id if request_id in ids else ids[0]
    trajs = [t for t in run.trajectories if t.request_id == rid]
    req = next((r for r in run.requests if r.id == rid), None)
    verdicts = {v.trajectory_id: v for v in run.verdicts if v.request_id == rid}
    marks = best_and_worst(trajs, verdicts)
    where = f" · request {ids.index(rid) + 1} of {len(ids)}" if len(ids) > 1 else ""
    small = (f" · best and worst differ by only {marks.gap:.3f} (below {SMALL_GAP:.2f}, the gap that makes an experience)"
             if marks.small else "")
    head = message("ok", f"{run.dir.name}: {len(trajs)} trajectories by {run.info.policy}{where}{small}")
    diff = ""
    if marks.best and marks.worst:
        by_id = {t.id: t for t in trajs}
        best, worst = marks.best[0], marks.worst[0]
        diff = diff_html(by_id[best], by_id[worst], verdicts.get(best), verdicts.get(worst))
    elif len(trajs) > 1:
        diff = message("info", "all trajectories have the same reward: no best and worst to compare")
    return head, columns_html(req, trajs, verdicts, store_src(run.images)), diff
