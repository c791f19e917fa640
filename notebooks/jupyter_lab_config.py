"""JupyterLab for `make lab` (``jupyter lab --config=jupyter_lab_config.py``): local only, nothing fetched from the network."""

c = get_config()  # noqa: F821  (provided by Jupyter when it loads this file)
c.ServerApp.ip = "127.0.0.1"
c.ServerApp.open_browser = False
c.LabApp.news_url = None  # no news feed
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
c.LabApp.extension_manager = "readonly"  # no extension index lookups
