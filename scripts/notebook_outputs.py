"""Run the notebooks top to bottom and store them with their outputs, as JupyterLab would save them.

A reader then sees the pictures before running anything, and opening a notebook in ``make lab`` changes nothing:
the stored metadata (kernelspec, language_info) is what JupyterLab writes once a kernel has started. Each notebook
runs in a fresh kernel in a temporary working folder (nothing else is written), offline. Run it after editing a
notebook (``make notebooks``); ``tests/test_notebooks.py`` checks that a fresh run shows the same figures.

    .venv/bin/python scripts/notebook_outputs.py [NAME.ipynb ...]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def lab_metadata(nb: nbformat.NotebookNode) -> None:
    """The metadata JupyterLab saves: the kernel's spec with its display name, and the kernel's language_info."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    nb.metadata["kernelspec"] = {"display_name": spec.display_name, "language": spec.language, "name": "python3"}
    keep = ("codemirror_mode", "file_extension", "mimetype", "name", "nbconvert_exporter", "pygments_lexer", "version")
    nb.metadata["language_info"] = {k: v for k, v in nb.metadata.get("language_info", {}).items() if k in keep}


def run(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timings change on every run
        if cell.cell_type == "code":  # progress bars and library warnings are noise for a reader: stdout and pictures stay
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    lab_metadata(nb)
    nbformat.write(nb, path)  # nbformat's writer is what JupyterLab's server uses: the same bytes on save
    size = path.stat().st_size
    print(f"{path.name}: {sum(len(c.get('outputs', [])) for c in nb.cells if c.cell_type == 'code')} outputs, {size / 1e3:.0f} kB")


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = sys.argv[1:] or sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    for name in names:
        run(NOTEBOOKS / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
