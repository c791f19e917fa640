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
