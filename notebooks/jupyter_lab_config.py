"""JupyterLab for `make lab` (``jupyter lab --config=jupyter_lab_config.py``): local only, nothing fetched from the
network, and nothing written into the checkout. The notebooks are stored as JupyterLab saves them (see
``scripts/notebook_outputs.py``), so opening one changes no file; the workspace, user settings and checkpoints
live in the user's data folder (``$GENEVOLVE_DATA``, by default ``~/.local/share/genevolve``), never here."""

import os
from pathlib import Path

c = get_config()  # noqa: F821  (provided by Jupyter when it loads this file)
here = Path(__file__).resolve().parent
data = Path(os.environ.get("GENEVOLVE_DATA") or Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
            / "genevolve").expanduser() / "jupyter"
c.ServerApp.ip = "127.0.0.1"
c.ServerApp.open_browser = False
c.LabApp.news_url = None  # no news feed
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
c.LabApp.extension_manager = "readonly"  # no extension index lookups
c.LabApp.app_settings_dir = str(here / "lab-settings")  # overrides.json: never ask about news, never check for updates
c.LabApp.user_settings_dir = str(data / "user-settings")
c.LabApp.workspaces_dir = str(data / "workspaces")  # a restored workspace reopens notebooks here, not in the checkout
c.FileCheckpoints.checkpoint_dir = str(data / "checkpoints")  # no .ipynb_checkpoints/ beside the notebooks
