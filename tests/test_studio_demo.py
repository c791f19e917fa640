"""The first screen: the demo the studio makes on its first start (in the runs folder, never the checkout), what
the Start view says while it is made, and its links once it is ready."""

from __future__ import annotations

import json
import os
import stat
import sys
import time

import pytest

from studio.demo import BANK, EVOLVE, ROLLOUT, Demo
from studio.tabs.start import demo_html, loop_svg

FAKE = """#!{python}
import sys, pathlib, json
args = sys.argv[3:]  # -m genevolve.cli <command> ...
out = pathlib.Path(args[args.index("--out") + 1])
if "{fail}" == args[0]:
    sys.exit(3)
out.mkdir(parents=True, exist_ok=True)
if args[0] == "rollout":
    (out / "summary.json").write_text("{{}}")
else:
    (out / "report").mkdir(exist_ok=True)
    (out / "report" / "report.md").write_text("# report")
    (out / "bank").mkdir(exist_ok=True)
"""


def fake_python(tmp_path, fail: str = "") -> str:
    path = tmp_path / "fake-python"
    path.write_text(FAKE.format(python=sys.executable, fail=fail))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def wait(demo: Demo, states=("ready", "failed")) -> dict:
    deadline = time.time() + 60
    while demo.status()["state"] not in states and time.time() < deadline:
        time.sleep(0.1)
    return demo.status()


def test_the_demo_is_made_once_in_the_runs_folder_and_the_start_view_links_it(tmp_path, world):
    runs = tmp_path / "runs"
    demo = Demo(runs, world.root, python=fake_python(tmp_path))
    assert demo.status() == {"state": "absent"}
    demo.ensure()
    st = wait(demo)
    assert st["state"] == "ready" and st["rollout"] == ROLLOUT and st["evolve"] == EVOLVE and st["bank"] == BANK
    assert (runs / ROLLOUT / "summary.json").exists() and (runs / EVOLVE / "report" / "report.md").exists()
    log = (runs / "demo" / "demo.log").read_text()
    assert "rollout -r" in log and "-k 4" in log and "evolve --quick" in log  # the commands a terminal would run
    html = demo_html(st)
    for link in (f"?view=trajectories&run={ROLLOUT}", f"?view=distill&run={EVOLVE}", f"?view=experiences&bank={BANK}"):
        assert f'href="{link}"' in html
    made = (runs / "demo" / "demo.json").stat().st_mtime_ns
    Demo(runs, world.root, python="/nonexistent").ensure()  # a later start: ready, nothing made again
    assert (runs / "demo" / "demo.json").stat().st_mtime_ns == made


def test_a_failed_or_interrupted_demo_says_so_and_is_made_again(tmp_path, world):
    runs = tmp_path / "runs"
    demo = Demo(runs, world.root, python=fake_python(tmp_path, fail="evolve"))
    demo.ensure()
    st = wait(demo)
    assert st["state"] == "failed" and "exited with code 3" in st["error"] and "demo.log" in st["error"]
    assert "could not be made" in demo_html(st) and "works without it" in demo_html(st)
    (runs / "demo" / "demo.json").write_text(json.dumps({"state": "making", "step": "x"}))  # an earlier studio died
    assert Demo(runs, world.root).status()["state"] == "interrupted"
    again = Demo(runs, world.root, python=fake_python(tmp_path))
    again.ensure()
    assert wait(again)["state"] == "ready"
    assert "Making the demo" in demo_html({"state": "making", "step": "a K = 4 rollout"})


def test_the_loop_figure_names_every_step_in_order():
    svg = loop_svg()
    names = ["request", "trajectory", "render", "judge", "experience", "teacher", "student"]
    at = [svg.index(f">{n}</text>") for n in names]
    assert at == sorted(at) and "rolls out the next step" in svg


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs Debian's chromium")
def test_a_fresh_studio_opens_on_its_finished_demo(tmp_path, world):
    """The real thing, as a newcomer's `make studio` does it: a fresh data folder, the demo made on first start, then
    each of its links opens its view with the demo's content (screenshots at 1280 and 1920 px)."""
    import socket
    import subprocess
    import urllib.request

    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GENEVOLVE_DATA": str(tmp_path / "data"), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("GENEVOLVE_RUNS", None)
    proc = subprocess.Popen([sys.executable, "-m", "genevolve.cli", "studio", "--port", str(port)], env=env,
                            stdout=open(tmp_path / "studio.log", "wb"), stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(360):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        runs = tmp_path / "data" / "runs"
        demo = Demo(runs, world.root)
        deadline = time.time() + 600
        while demo.status().get("state") != "ready" and time.time() < deadline:
            assert demo.status().get("state") != "failed", demo.status()
            time.sleep(2)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
            for width in (1280, 1920):
                pg = browser.new_page(viewport={"width": width, "height": 1000})
                pg.set_default_timeout(120_000)
                pg.goto(url)
                pg.locator("#start-demo [data-state=ready]").wait_for()
                pg.screenshot(path=str(tmp_path / f"start-{width}.png"), full_page=True)
                hrefs = [a.get_attribute("href") for a in pg.locator("#start-demo a").all()]
                assert len(hrefs) == 3
                for href, ready in zip(hrefs, ("#traj-columns .ge-col", "#distill-curves", "#exp-table")):
                    pg.goto(url + href)
                    pg.locator("body[data-studio-ready]").wait_for(state="attached")
                    pg.locator(ready).first.wait_for()
                    pg.screenshot(path=str(tmp_path / f"{href.split('=')[1].split('&')[0]}-{width}.png"), full_page=True)
                pg.close()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\nfirst-screen screenshots: {tmp_path}")
