"""Start the studio: ``genevolve studio`` (through the ``genevolve.apps`` entry point) or ``python -m studio``."""

from __future__ import annotations

import os
from pathlib import Path


def serve(host: str = "127.0.0.1", port: int = 7860, password: str | None = None, runs_dir: str | Path | None = None,
          data_dir: str | Path | None = None, world_dir: str | Path | None = None, echo=print,
          insecure_no_password: bool = False, demo: bool = True, forwarded_allow_ips: str | None = None) -> None:
    """Open the world, the runs folder and the data folder, and serve the studio until interrupted (a
    non-loopback ``host`` needs a password, or ``insecure_no_password``; X-Forwarded-For is believed only
    from the proxies in ``forwarded_allow_ips``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .app import check_exposure, check_proxies, launch

    check_exposure(host, password, insecure_no_password)  # before the world and the models load
    check_proxies(forwarded_allow_ips)
    from .services import Services

    services = Services.create(world_dir=world_dir, runs_dir=runs_dir, data_dir=data_dir, demo=demo)
    echo(f"GenEvolve Studio on http://{host}:{port}  (world: {services.world.root}, runs: {services.runs_dir}, "
         f"data: {services.data_dir}, device: {services.device})")
    launch(services, host=host, port=port, password=password, insecure_no_password=insecure_no_password,
           forwarded_allow_ips=forwarded_allow_ips)


if __name__ == "__main__":
    import sys

    from genevolve.cli import app

    app(["studio", *sys.argv[1:]])
