"""Studio speed: time to first paint, and the latency of opening a saved 8-rollout run (medians).

Starts `genevolve studio` on a free port over a temporary runs folder holding a saved 8-rollout run
(and a 2-rollout one to switch away from between measurements), then drives Debian's headless
Chromium with Playwright:

- server start: process launch until the page answers (median over --starts launches);
- first paint: navigation until first-contentful-paint, and until the app's tabs are on screen
  (median over --loads page loads of a warm server);
- open run: click "Open" until the 8 columns and their images are on screen (median over --opens);
- render only: the same run read from disk and turned into HTML in-process (the server's share).

Prints the figures and saves them as JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_studio(runs: Path, log: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "genevolve.cli", "studio", "--port", str(port), "--runs", str(runs)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url, time.perf_counter() - t0
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"studio exited: {log.read_text()[-2000:]}")
            time.sleep(0.05)


def summarise(starts, fcp, ready, opens, render, cols) -> dict:
    """The medians (and every sample), printed and returned for saving."""
    med = statistics.median
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_at_end": os.getloadavg()},
        "server_start_s": {"median": med(starts), "all": starts},
        "first_contentful_paint_s": {"median": med(fcp), "all": fcp},
        "app_ready_s": {"median": med(ready), "all": ready},
        "open_saved_8_rollout_run_s": {"median": med(opens), "all": opens},
        "render_8_rollout_run_in_process_s": {"median": med(render)},
        "html_bytes_8_rollouts": len(cols),
    }
    print(f"server start (launch -> first answer): median {med(starts):.2f} s over {len(starts)}")
    print(f"first contentful paint:                median {med(fcp) * 1000:.0f} ms over {len(fcp)} page loads")
    print(f"app ready (tabs on screen):            median {med(ready) * 1000:.0f} ms")
    print(f"open a saved 8-rollout run:            median {med(opens) * 1000:.0f} ms over {len(opens)} opens "
          f"(in-process load + render {med(render) * 1000:.0f} ms, {len(cols) / 1e3:.0f} kB of HTML)")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--loads", type=int, default=7)
    ap.add_argument("--opens", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "studio_speed.json"))
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from genevolve.records.schema import atomic_write_json
    from genevolve.records.runs import load_run
    from studio.html import run_view
    from studio.services import EXPERT_NOISY, Services

    tmp = Path(tempfile.mkdtemp(prefix="studio-speed-"))
    runs = tmp / "runs"
    services = Services.create(runs_dir=runs)
    req = services.world.split("bench")[0]
    big = services.run_rollouts(req, EXPERT_NOISY, 8, seed=0).relative_to(runs)
    small = services.run_rollouts(req, EXPERT_NOISY, 2, seed=1).relative_to(runs)

    render = []
    for _ in range(20):
        t = time.perf_counter()
        _, cols, _ = run_view(load_run(runs / big))
        render.append(time.perf_counter() - t)

    starts, proc, url = [], None, ""
    for i in range(args.starts):
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        proc, url, dt = start_studio(runs, tmp / "studio.log")
        starts.append(dt)

    fcp, ready, opens = [], [], []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            for _ in range(args.loads):
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                t = time.perf_counter()
                page.goto(url)
                page.get_by_role("tab", name="Trajectories").wait_for()
                ready.append(time.perf_counter() - t)
                fcp.append(page.evaluate("performance.getEntriesByName('first-contentful-paint')[0]?.startTime") / 1000)
                page.close()
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.get_by_role("tab", name="Trajectories").wait_for()

            def open_run(name: str, n: int) -> float:
                page.locator("#traj-saved input").click()
                page.get_by_role("option", name=str(name), exact=True).click()
                t = time.perf_counter()
                page.locator("#traj-open").click()
                page.wait_for_function(
                    f"(() => {{ const c = document.querySelectorAll('#traj-columns .ge-col'); if (c.length !== {n}) return false;"
                    " return [...document.querySelectorAll('#traj-columns img')].every(i => i.complete && i.naturalWidth > 0); })()")
                return time.perf_counter() - t

            for _ in range(args.opens):
                open_run(small, 2)
                opens.append(open_run(big, 8))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    result = summarise(starts, fcp, ready, opens, render, cols)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
