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


def figure_kinds(nb) -> list[set[str]]:
    """Per code cell, what it shows besides text: the mime types of its displayed outputs."""
    return [{m for o in c.get("outputs", []) if o.get("output_type") in ("display_data", "execute_result")
             for m in o.get("data", {}) if m != "text/plain"} for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", [p.name for p in sorted(NOTEBOOKS.glob("*.ipynb"))])
def test_stored_outputs_show_what_a_fresh_run_shows(name, executed):
    """The notebooks are shipped with their outputs (a reader sees the pictures before running anything): the same
    cells hold the same kinds of figure as a fresh run's, and nothing of a library's stderr noise is kept."""
    stored = nbformat.read(NOTEBOOKS / name, as_version=4)
    fresh, _ = executed(name)
    assert figure_kinds(stored) == figure_kinds(fresh) and any(figure_kinds(stored))
    code = [c for c in stored.cells if c.cell_type == "code"]
    assert all(c.get("outputs") for c in code if set(c.metadata.get("tags", [])) - {"parameters"}), \
        "a tagged figure cell was stored without output"
    assert not any(o.get("name") == "stderr" for c in code for o in c.get("outputs", []))
    kernel = stored.metadata["kernelspec"]  # what JupyterLab writes when its kernel starts, so opening changes nothing
    assert kernel["display_name"] == "Python 3 (ipykernel)" and stored.metadata["language_info"]["name"] == "python"
    assert "version" in stored.metadata["language_info"]


def _lab(folder: Path, data: Path):
    """JupyterLab as `make lab` starts it, in ``folder``, with its user data in ``data``; yields its base URL."""
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
    proc = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"HF_HUB_OFFLINE": "1", "GENEVOLVE_DATA": str(data)})
    base, deadline, up = f"http://127.0.0.1:{port}", time.time() + 90, False
    while time.time() < deadline and not up:
        try:
            up = httpx.get(f"{base}/api/contents", params={"token": "t"}, timeout=2).status_code == 200
        except httpx.HTTPError:
            time.sleep(0.5)
    return proc, base, up


@pytest.mark.browser
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium (`make test` installs it)")
def test_opening_and_saving_a_notebook_in_the_lab_changes_no_byte_and_asks_nothing(tmp_path):
    """`make lab` in a real browser, on a copy of notebooks/: a notebook opened, its kernel started and saved comes out
    byte for byte as shipped; no news question; the workspace and checkpoints go to the data folder, not beside the
    notebooks."""
    import shutil
    import time

    from playwright.sync_api import sync_playwright

    folder = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, folder)
    before = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    name = "01_world_and_stores.ipynb"
    proc, base, up = _lab(folder, tmp_path / "data")
    try:
        assert up, "JupyterLab did not answer"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(f"{base}/lab/tree/{name}?token=t")
            page.wait_for_selector(".jp-Notebook")
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for()  # the kernel is up: its metadata has arrived
            time.sleep(2)
            assert "news" not in page.inner_text("body").lower()
            page.locator(".jp-Notebook").click()
            page.keyboard.press("Control+s")
            deadline = time.time() + 30
            while time.time() < deadline and not list((tmp_path / "data").rglob("*checkpoint*.ipynb")):
                time.sleep(0.5)  # the save writes its checkpoint first
            time.sleep(2)
            browser.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    after = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before  # nothing rewritten, nothing added (no .ipynb_checkpoints/)
    assert list((tmp_path / "data" / "jupyter" / "checkpoints").glob("01_world_and_stores-checkpoint.ipynb"))
    assert list((tmp_path / "data" / "jupyter" / "workspaces").glob("*.jupyterlab-workspace"))


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
    import tempfile

    data = tempfile.mkdtemp()  # the lab's workspace and settings go to the data folder: a temporary one here
    proc = subprocess.Popen(cmd, cwd=NOTEBOOKS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"HF_HUB_OFFLINE": "1", "GENEVOLVE_DATA": data})
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
