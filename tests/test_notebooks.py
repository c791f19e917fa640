"""The notebooks run top to bottom on the CPU (nbclient, a fresh kernel each), all of them in every
``make test``; the distill-and-compare notebook with its parameters cell set to a one-step run."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SMALL = {"03_distill_and_compare.ipynb": "STEPS, B, K, N_EVAL, MAX_NEW_TOKENS = 1, 1, 2, 1, 64"}


@pytest.mark.parametrize("name", [p.name for p in sorted(NOTEBOOKS.glob("*.ipynb"))])
def test_notebook_runs(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    if name in SMALL:
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        cell.source = SMALL[name]
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert images >= 1, "every notebook shows at least one figure"


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
