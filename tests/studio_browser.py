"""The studio in a real browser, shared by the browser test modules: one `genevolve studio` process for the whole
session, on a free port, over a copy of the sandbox world (the reference editor writes into it) and a fresh runs
folder with a small experience bank; Playwright drives Debian's headless Chromium against it. Each test saves a
screenshot of its view under the session's temporary output folder (printed at the end)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def studio(tmp_path_factory, world):
    from genevolve.experience.bank import ExperienceBank
    from genevolve.agent.guides import oracle_slots
    from genevolve.policies.tiny import build_tiny_model, train_tokenizer
    from genevolve.agent.protocol import SYSTEM_PROMPT

    root = tmp_path_factory.mktemp("studio-browser")
    shutil.copytree(world.root, root / "world")
    runs = root / "runs"
    bank = ExperienceBank(runs / "studio-bank")
    exps = []
    for r in world.split("evolve")[:3]:
        slots = oracle_slots(list(r.skills), r.track == "knowledge", 0)
        exps.append(bank.add(r.id, r.text, slots, reward_gap=0.4, run_id="seed-run"))
    tok = train_tokenizer([SYSTEM_PROMPT] + [r.text for r in world.split("evolve")] * 3, vocab_size=500)
    build_tiny_model(tok, seed=0, layers=1, hidden=64).save_pretrained(root / "micro")
    tok.save_pretrained(root / "micro")
    shots = root / "screenshots"
    shots.mkdir()

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "GRADIO_ANALYTICS_ENABLED": "False",
           "GENEVOLVE_DATA": str(root / "data")}  # reference edits land here, not in the user's data folder
    env.pop("GENEVOLVE_STUDIO_PASSWORD", None)
    log = open(root / "studio.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "genevolve.cli", "studio", "--port", str(port), "--runs", str(runs),
                             "--world", str(root / "world"), "--no-demo"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                raise RuntimeError(f"studio did not start: {(root / 'studio.log').read_text()[-3000:]}")
            time.sleep(0.5)

    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
    try:
        yield {"url": url, "root": root, "runs": runs, "world": root / "world", "exps": exps, "micro": root / "micro",
               "shots": shots, "browser": browser}
    finally:
        browser.close()
        pw.stop()
        for job in runs.glob("**/studio_job.json"):  # a distill run this module started and left running
            try:
                os.killpg(json.loads(job.read_text())["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError, ValueError, KeyError):
                pass
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        print(f"\nstudio screenshots: {shots}")


@pytest.fixture
def page(studio):
    pg = studio["browser"].new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(90_000)
    pg.goto(studio["url"] + "?view=trajectories")  # the studio opens on Start; the address opens another view
    pg.locator("body[data-studio-ready]").wait_for(state="attached")  # what the address names is open
    pg.locator("#traj-k").wait_for()
    yield pg
    pg.close()


def _fill(page, selector: str, value: str) -> None:
    box = page.locator(selector)
    box.fill(value)
    box.press("Tab")  # gradio commits a box's value on change/blur




def _ready(pg) -> None:
    """Wait until the page has opened what its address names (after that, only the user moves between views)."""
    pg.locator("body[data-studio-ready]").wait_for(state="attached")
