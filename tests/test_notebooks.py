"""The notebooks run top to bottom on the CPU (nbclient, a fresh kernel each), all of them in every
``make test``; the distill-and-compare notebook with its parameters cell set to a one-step run.

Beyond running, the tests check what the notebooks show. A figure cell carries a tag (``trajectory-images``,
``learning-curves``, ``token-gap-html``, ``token-gap-figure``, ``probe-images``, ``bench-images``) and must
display its output; the figures it draws are kept in variables named ``*_fig``, which a cell appended for the
test (never saved) describes: how many panels hold a picture, what the panels without one say, titles, ticks.
The notebooks themselves assert what they show (counts, rewards in [0, 1], one curve point per step, the bars'
heights), so a notebook whose library computes something wrong fails here with its cell's AssertionError."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SMALL = {"03_distill_and_compare.ipynb": "STEPS, B, K, N_EVAL, MAX_NEW_TOKENS = 1, 1, 2, 1, 64"}

# Run in the notebook's kernel after its last cell: every matplotlib figure held in a ``*_fig`` variable, described.
DESCRIBE = """
import json as _json
from matplotlib.figure import Figure as _Figure

def _describe(fig):
    return {"axes": [{"picture": bool(ax.images), "title": ax.get_title(), "texts": [t.get_text() for t in ax.texts],
                      "visible": ax.axison or bool(ax.texts), "xticks": [float(v) for v in ax.get_xticks()]}
                     for ax in fig.axes],
            "suptitle": fig._suptitle.get_text() if fig._suptitle else ""}

print("FIGURES " + _json.dumps({k: _describe(v) for k, v in dict(globals()).items()
                                if k.endswith("_fig") and isinstance(v, _Figure)}))
"""


def execute(name: str, cwd: Path) -> tuple[nbformat.NotebookNode, dict]:
    """The executed notebook (without the appended cell) and the description of its ``*_fig`` figures."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    if name in SMALL:
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        cell.source = SMALL[name]
    nb.cells.append(nbformat.v4.new_code_cell(DESCRIBE))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    described = nb.cells.pop()
    text = "".join(o.get("text", "") for o in described.outputs if o.get("output_type") == "stream")
    line = next(line for line in text.splitlines() if line.startswith("FIGURES "))
    return nb, json.loads(line.removeprefix("FIGURES "))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Each notebook executed once for all the tests of this module."""
    done: dict[str, tuple] = {}

    def get(name: str):
        if name not in done:
            done[name] = execute(name, tmp_path_factory.mktemp(name.split("_")[0]))
        return done[name]

    return get


def outputs(nb, tag: str) -> list[dict]:
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r}"
    return cells[0].get("outputs", [])


def shows_figure(nb, tag: str) -> str:
    """The figure the tagged cell displays, as its text form (``<Figure size ... with N Axes>``)."""
    figs = [o["data"] for o in outputs(nb, tag) if "image/png" in o.get("data", {})]
    assert len(figs) == 1, f"the {tag!r} cell shows one figure"
    return figs[0].get("text/plain", "")


def says_why_when_blank(fig: dict) -> None:
    """Every visible panel without a picture carries a text saying why."""
    for ax in fig["axes"]:
        if ax["visible"] and not ax["picture"]:
            assert any(t.strip() for t in ax["texts"]), f"a blank panel says nothing: {ax['title']!r}"


@pytest.mark.parametrize("name", [p.name for p in sorted(NOTEBOOKS.glob("*.ipynb"))])
def test_notebook_runs(name, executed):
    nb, _ = executed(name)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert images >= 1, "every notebook shows at least one figure"


def test_trajectories_notebook_shows_the_k_images_with_rewards_and_the_ground_truth(executed):
    nb, figs = executed("02_runs_trajectories_experiences.ipynb")
    assert "Axes" in shows_figure(nb, "trajectory-images")
    fig = figs["traj_fig"]
    pictures = [ax for ax in fig["axes"] if ax["picture"]]
    assert len(pictures) >= 2, "several images side by side in one figure"
    titles = [ax["title"] for ax in fig["axes"]]
    assert "ground truth" in titles
    assert sum("reward" in t for t in titles) == 4, "each of the K = 4 renders titled with its reward"
    assert sum("BEST" in t for t in titles) == 1 and sum("WORST" in t for t in titles) == 1
    says_why_when_blank(fig)


def test_distill_notebook_shows_curves_token_gap_and_pictures(executed):
    nb, figs = executed("03_distill_and_compare.ipynb")
    assert "with 4 Axes" in shows_figure(nb, "learning-curves")
    curves = figs["curves_fig"]
    assert {"VED loss", "GRPO loss", "retrieval hit rate"} <= {ax["title"] for ax in curves["axes"]}
    assert any("reward" in ax["title"] for ax in curves["axes"])
    for ax in curves["axes"]:
        assert ax["xticks"] and all(v.is_integer() for v in ax["xticks"]), f"steps are whole numbers: {ax['xticks']}"

    html = [o["data"]["text/html"] for o in outputs(nb, "token-gap-html") if "text/html" in o.get("data", {})]
    assert len(html) == 1 and 'class="ge-tokens"' in html[0], "the studio's token view of the probe"
    assert 'class="tok"' in html[0], "the student's sampled tokens are in it"

    shows_figure(nb, "token-gap-figure")
    gap = figs["gap_fig"]
    titles = " ".join(ax["title"] for ax in gap["axes"])
    teacher = 'data-gap="' in html[0]  # a token the teacher scored
    assert ("log q − log p" in titles) if teacher else ("no experience passed the gate" in titles)

    for tag, name in (("probe-images", "probe_fig"), ("bench-images", "bench_fig")):
        shows_figure(nb, tag)
        fig = figs[name]
        assert any(ax["picture"] for ax in fig["axes"]), f"{name} shows at least the ground truth"
        says_why_when_blank(fig)
    bench_titles = [ax["title"] for ax in figs["bench_fig"]["axes"]]
    assert any(t.startswith("before") for t in bench_titles) and any(t.startswith("after") for t in bench_titles)


def test_jupyterlab_serves_the_notebooks_offline():
    """What `make lab` starts (JupyterLab in notebooks/ with notebooks/jupyter_lab_config.py): the notebooks
    listed, no news feed, no extension index lookups."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jupyter = Path(sys.executable).with_name("jupyter")
    cmd = [str(jupyter), "lab", "--config=jupyter_lab_config.py", f"--ServerApp.port={port}",
           "--IdentityProvider.token=t", "--allow-root"]
    proc = subprocess.Popen(cmd, cwd=NOTEBOOKS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"HF_HUB_OFFLINE": "1"})
    try:
        base, deadline, listed = f"http://127.0.0.1:{port}", time.time() + 90, None
        while time.time() < deadline and listed is None:
            try:
                listed = httpx.get(f"{base}/api/contents", params={"token": "t"}, timeout=2).json()
            except (httpx.HTTPError, ValueError):
                time.sleep(0.5)
        assert listed is not None, "JupyterLab did not answer"
        assert {c["name"] for c in listed["content"]} >= {p.name for p in NOTEBOOKS.glob("*.ipynb")}
        assert httpx.get(f"{base}/lab/api/news", params={"token": "t"}, timeout=5).json() == {"news": []}
        assert httpx.get(f"{base}/lab", params={"token": "t"}, timeout=5).status_code == 200
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "Extension Manager is 'readonly'" in out
