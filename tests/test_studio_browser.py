"""The studio in a real browser (part one): trajectories, the experience editor, references, a live distill and the
bench. The studio process and the browser are shared by the session (tests/studio_browser.py); the distill test
trains a one-layer random model so that steps take seconds, not minutes.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from studio_browser import CHROMIUM, _fill, _free_port, _ready

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (`make test` installs it)")]


def test_two_rollouts_stand_side_by_side_and_a_deleted_run_is_reported(studio, page):
    _fill(page, "#traj-k input[type=number]", "2")
    page.locator("#traj-run").click()
    cols = page.locator("#traj-columns .ge-col")
    cols.nth(1).wait_for()
    assert cols.count() == 2
    for i in range(2):
        assert cols.nth(i).locator(".ge-pics img").count() == 2  # rendered image next to the ground truth
    assert page.locator("#traj-status").inner_text().count("2 trajectories") == 1
    page.screenshot(path=str(studio["shots"] / "trajectories.png"), full_page=True)

    run_name = page.locator("#traj-saved input").input_value()
    shutil.rmtree(studio["runs"] / run_name)
    page.locator("#traj-open").click()
    page.locator("#traj-status").get_by_text("no longer exists").wait_for()


def test_eight_columns_fit_a_1280_px_page_and_long_trajectories_fold(studio):
    pg = studio["browser"].new_page(viewport={"width": 1280, "height": 900})
    pg.set_default_timeout(90_000)
    try:
        pg.goto(studio["url"] + "?view=trajectories")
        _ready(pg)
        _fill(pg, "#traj-k input[type=number]", "8")
        pg.locator("#traj-run").click()
        cols = pg.locator("#traj-columns .ge-col")
        cols.nth(7).wait_for()
        box = pg.evaluate("(() => {const c = document.querySelector('#traj-columns .ge-cols'); "
                          "const last = [...c.querySelectorAll('.ge-col')].pop().getBoundingClientRect(); "
                          "return {scroll: c.scrollWidth, client: c.clientWidth, right: last.right, page: innerWidth}})()")
        assert box["scroll"] <= box["client"] and box["right"] <= box["page"], box  # wrapped, nothing hidden sideways
        assert pg.locator("#traj-columns .ge-missing").count() == 0  # every picture is there
        long_ = pg.locator("#traj-columns details.ge-turns:not([open])").count()
        assert long_ == sum(int(n) > 4 for n in re.findall(r"(\d+) turns ·", pg.locator("#traj-columns").inner_text()))
        assert pg.evaluate("document.body.scrollHeight") < 8000
        pg.screenshot(path=str(studio["shots"] / "trajectories-8-at-1280.png"), full_page=True)
    finally:
        pg.close()


def test_a_run_made_in_a_terminal_appears_without_a_restart_and_is_paged_request_by_request(studio, page, world):
    from studio.services import Services

    name = "cli-made"
    subprocess.run([sys.executable, "-m", "genevolve.cli", "rollout", "-r", world.split("bench")[3].id, "-k", "2", "--policy",
                    "expert", "--out", str(studio["runs"] / name), "--world", str(studio["world"])], check=True,
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    services = Services.create(world_dir=studio["world"], runs_dir=studio["runs"], data_dir=studio["root"] / "data")
    many = services.run_bench("expert", "bench", 3, [0]).name  # three requests, one trajectory each
    page.get_by_role("tab", name="Experiences").click()
    page.get_by_role("tab", name="Trajectories").click()  # opening the tab re-reads the runs folder
    page.locator("#traj-saved input").click()
    page.locator("#traj-saved").get_by_role("option", name=name, exact=True).wait_for()
    page.locator("#traj-saved").get_by_role("option", name=many, exact=True).click()
    page.locator("#traj-open").click()
    page.locator("#traj-status").get_by_text("request 1 of 3").wait_for()
    page.locator("#traj-next").click()
    page.locator("#traj-status").get_by_text("request 2 of 3").wait_for()
    from genevolve.records.runs import load_run

    assert load_run(studio["runs"] / many).requests[1].id in page.locator("#traj-columns").inner_text()
    page.locator("#traj-next").click()
    page.locator("#traj-next").click()  # past the last request: stays on the last
    page.locator("#traj-status").get_by_text("request 3 of 3").wait_for()
    page.locator("#traj-prev").click()
    page.locator("#traj-status").get_by_text("request 2 of 3").wait_for()
    page.screenshot(path=str(studio["shots"] / "trajectories-paged.png"), full_page=True)

    # A training run and its bank written by a terminal (the files `genevolve evolve` writes) show up in the
    # Distill and Experiences lists when those tabs are opened.
    train = studio["runs"] / "terminal-evolve"
    (train / "bank").mkdir(parents=True)
    (train / "config.json").write_text(json.dumps({"policy": "tiny", "steps": 2, "prompts_per_step": 1, "rollouts_per_prompt": 2}))
    (train / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n")
    shutil.copy(studio["runs"] / "studio-bank" / "experiences.jsonl", train / "bank" / "experiences.jsonl")
    for tab, box, option in (("Distill", "#distill-watch", "terminal-evolve"), ("Experiences", "#exp-bank", "terminal-evolve/bank")):
        page.get_by_role("tab", name=tab).click()
        page.locator(f"{box} input").click()
        page.locator(box).get_by_role("option", name=option, exact=True).wait_for()
        page.keyboard.press("Escape")


def test_a_request_outside_the_sandbox_is_labelled_before_it_runs(page):
    box = page.locator("#traj-request input")
    box.fill("a watercolour of my grandmother's kitchen")
    box.press("Enter")
    note = page.locator("#traj-status").get_by_text("lies outside the sandbox world")
    note.wait_for()
    assert "real policy, generator and judge" in page.locator("#traj-status").inner_text()
    assert not page.locator("#traj-columns .ge-col").count()  # nothing has run


def test_edit_an_experience_reload_and_find_it_by_semantic_search(studio, page):
    from studio.tables import EXP_HEADERS

    exp = studio["exps"][1]
    marker = "Write every count as exactly <number> in words, zebra-check"
    page.get_by_role("tab", name="Experiences").click()
    _fill(page, "#exp-id input", exp.id)
    page.locator("#exp-open").click()
    slot = page.locator("#exp-slot-prompt_construction textarea")
    page.wait_for_function("document.querySelector('#exp-slot-search_strategy textarea').value.length > 0")
    assert slot.input_value() == exp.slots["prompt_construction"]

    # Bad input: an empty slot and an over-long one are refused with a message; nothing is saved.
    _fill(page, "#exp-slot-prompt_construction textarea", "   ")
    page.locator("#exp-save").click()
    page.locator("#exp-status").get_by_text("Prompt construction is empty").wait_for()
    _fill(page, "#exp-slot-prompt_construction textarea", "x" * 401)
    page.locator("#exp-save").click()
    page.locator("#exp-status").get_by_text("401 characters").wait_for()

    _fill(page, "#exp-slot-prompt_construction textarea", marker)
    page.locator("#exp-save").click()
    page.locator("#exp-status").get_by_text("as version 2").wait_for()
    version = EXP_HEADERS.index("version")  # the list shows the version just saved
    page.wait_for_function(f"[...document.querySelectorAll('#exp-table [role=row]')].some(r => r.textContent.includes('{exp.id}') "
                           f"&& r.querySelectorAll('[role=gridcell]')[{version}]?.textContent.trim() === '2')")
    page.locator("#exp-save").click()  # saving again with nothing changed makes no version, and says so
    page.locator("#exp-status").get_by_text("nothing changed").wait_for()

    page.reload()
    _ready(page)
    page.get_by_role("tab", name="Experiences").click()
    _fill(page, "#exp-id input", exp.id)
    page.locator("#exp-open").click()
    page.wait_for_function("document.querySelector('#exp-slot-prompt_construction textarea').value.includes('zebra-check')")

    _fill(page, "#exp-query textarea", exp.source_request)
    page.locator("#exp-search").click()
    page.locator("#exp-status").get_by_text("3 of 3 experiences").wait_for()
    page.wait_for_function(f"document.querySelector('#exp-table').innerText.includes('{exp.id}')")
    ids = re.findall(r"exp-[0-9a-f]{10}", page.locator("#exp-table").inner_text())
    assert ids and ids[0] == exp.id  # the nearest by meaning comes first
    _fill(page, "#exp-filter textarea", "zebra-check")
    page.locator("#exp-search").click()
    page.locator("#exp-status").get_by_text("1 of 3 experiences").wait_for()
    page.wait_for_function("(t => (t.match(/exp-[0-9a-f]{10}/g) || []).length === 1)(document.querySelector('#exp-table').innerText)")
    assert exp.id in page.locator("#exp-table").inner_text()
    page.screenshot(path=str(studio["shots"] / "experiences.png"), full_page=True)


def test_upload_a_reference_and_retrieve_it(studio, page, tmp_path):
    from PIL import Image

    page.get_by_role("tab", name="References").click()
    fake = tmp_path / "notes.png"
    fake.write_text("these are not pixels")
    page.locator("#refs-upload input[type=file]").set_input_files(str(fake))
    _fill(page, "#refs-caption textarea", "Official banner of the Quokka Guild")
    page.locator("#refs-add").click()
    page.locator("#refs-status").get_by_text("not a readable image").wait_for()

    huge = tmp_path / "huge.png"
    Image.new("RGB", (5000, 8), "white").save(huge)
    page.locator("#refs-upload input[type=file]").set_input_files(str(huge))
    page.locator("#refs-add").click()
    page.locator("#refs-status").get_by_text("5000x8 pixels").wait_for()

    good = tmp_path / "banner.png"
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (120, 40, 160)).save(buf, format="PNG")
    good.write_bytes(buf.getvalue())
    page.locator("#refs-upload input[type=file]").set_input_files(str(good))
    page.locator("#refs-add").click()
    page.locator("#refs-status").get_by_text("added u0001").wait_for()

    _fill(page, "#refs-query textarea", "banner of the Quokka Guild")
    page.locator("#refs-search").click()
    page.locator("#refs-gallery").get_by_text("u0001").first.wait_for()
    from genevolve.records.paths import user_references

    store = user_references(studio["world"], studio["root"] / "data")  # the studio's copy; the world is only read
    rows = [json.loads(line) for line in (store / "refs.jsonl").read_text().splitlines()]
    assert rows[-1]["id"] == "u0001" and (store / "refs" / "u0001.png").exists()
    assert not (studio["world"] / "refs" / "u0001.png").exists()
    page.screenshot(path=str(studio["shots"] / "references.png"), full_page=True)


def _resumed_in_another_tab(studio, page) -> None:
    """Resumed from another tab: the first tab, which saw "stopped", keeps polling and shows the run going again, its
    phase inside the step and its curve gaining points; then it is stopped again."""
    stopped_at = int(page.locator("#distill-status [data-points]").get_attribute("data-points"))
    other = studio["browser"].new_page(viewport={"width": 1400, "height": 1000})
    other.set_default_timeout(90_000)
    other.goto(f"{studio['url']}?view=distill&run=quick-distill")
    _ready(other)
    other.locator("#distill-resume").click()
    other.locator("#distill-msg").get_by_text("started pid").wait_for()
    page.wait_for_function("document.querySelector('#distill-status [data-state]')?.getAttribute('data-state') === 'running'",
                           timeout=60_000)
    page.wait_for_function(r"/step \d+\/12: (rollouts \d+\/\d+|judging|mining pairs|teacher scoring and update|checkpoint)/"
                           ".test(document.querySelector('#distill-status').innerText)", timeout=120_000)
    page.wait_for_function(f"+document.querySelector('#distill-status [data-points]')?.getAttribute('data-points') > {stopped_at}",
                           timeout=180_000)
    other.locator("#distill-stop").click()
    page.wait_for_function("['stopped','finished'].includes(document.querySelector('#distill-status [data-state]')"
                           "?.getAttribute('data-state'))", timeout=120_000)
    other.close()



def test_quick_distill_shows_live_curves_and_student_vs_teacher_then_stops(studio, page, world):
    probe_id = world.split("evolve")[5].id
    page.get_by_role("tab", name="Distill").click()
    page.locator("#distill-policy input").fill(str(studio["micro"]))
    page.locator("#distill-policy input").press("Enter")
    _fill(page, "#distill-name textarea", "quick-distill")
    _fill(page, "#distill-b textarea", "2")
    _fill(page, "#distill-k textarea", "2")
    _fill(page, "#distill-mnt input", "16")
    _fill(page, "#distill-gate input", "-1")  # every request retrieves from the seeded bank: a teacher from step 1
    page.locator("#distill-seed-bank input").click()
    page.get_by_role("option", name="studio-bank").click()
    page.locator("#distill-probe-request input").fill(probe_id)
    page.locator("#distill-probe-request input").press("Enter")
    _fill(page, "#distill-steps textarea", "2000")  # a long run is not started before the user hears how long it takes
    page.locator("#distill-start").click()
    page.locator("#distill-msg").get_by_text("Click Start again to run it anyway").wait_for()
    assert "This run takes about" in page.locator("#distill-msg").inner_text()
    assert not (studio["runs"] / "quick-distill").exists()
    _fill(page, "#distill-steps textarea", "12")
    page.locator("#distill-start").click()
    page.locator("#distill-msg").get_by_text("started pid").wait_for()

    page.locator("#distill-start").click()  # a second run while one is going is refused
    page.locator("#distill-msg").get_by_text("already running").wait_for()

    seen, deadline = [], time.time() + 300
    status = page.locator("#distill-status [data-points]")
    while time.time() < deadline:
        if status.count():
            seen.append(int(status.get_attribute("data-points")))
        scored = page.locator("#distill-tokens .tok[data-gap]").count()
        if len(set(seen)) >= 2 and max(seen) >= 2 and scored:
            break
        page.wait_for_timeout(500)
    assert len(set(seen)) >= 2 and max(seen) > min(seen), f"the curve never gained points: {seen}"
    assert page.locator("#distill-tokens .tok[data-gap]").count() > 0
    title = page.locator("#distill-tokens .tok[data-gap]").first.get_attribute("title")
    assert "student p=" in title and "teacher q=" in title
    assert page.locator("#distill-probe-columns .ge-col").count() == 2  # student and teacher trajectories
    assert probe_id in page.locator("#distill-probe-head").inner_text()  # the chosen probe request, at every step
    assert "ETA" in page.locator("#distill-status").inner_text()
    page.screenshot(path=str(studio["shots"] / "distill.png"), full_page=True)

    # A reload, and a second browser tab, reconnect to the running job: its curve keeps gaining points.
    page.reload()
    second = studio["browser"].new_page(viewport={"width": 1400, "height": 1000})
    second.goto(studio["url"])
    for pg in (page, second):
        _ready(pg)
        pg.get_by_role("tab", name="Distill").click()
        pg.locator("#distill-msg").get_by_text("reconnected to the running run quick-distill").wait_for()
        assert pg.locator("#distill-watch input").input_value() == "quick-distill"
        first = int(pg.locator("#distill-status [data-points]").get_attribute("data-points"))
        pg.wait_for_function(f"+document.querySelector('#distill-status [data-points]')?.getAttribute('data-points') > {first}",
                             timeout=120_000)
    page.locator("#distill-tokens .tok[data-gap]").first.wait_for()
    second.close()

    page.locator("#distill-stop").click()
    page.locator("#distill-msg").get_by_text("stopping pid").wait_for()
    page.wait_for_function("['stopped','finished'].includes(document.querySelector('#distill-status [data-state]')"
                           "?.getAttribute('data-state'))", timeout=120_000)
    out = studio["runs"] / "quick-distill"
    assert (out / "checkpoint" / "adapter").exists() and (out / "probe.json").exists()
    page.screenshot(path=str(studio["shots"] / "distill-stopped.png"), full_page=True)

    _resumed_in_another_tab(studio, page)

    shutil.rmtree(out)  # the folder disappears while it is open
    assert page.locator("#distill-watch input").input_value() == "quick-distill"
    page.locator("#distill-watch-btn").click()
    page.locator("#distill-status").get_by_text("does not exist").wait_for()


def test_a_quick_tiny_distill_shows_a_teacher_and_its_report_downloads(studio, page):
    """The default student, no seeded bank, the default gate: the probe follows a request an experience was mined
    from at step 1, so the token view has the teacher's numbers; the report then downloads as one HTML file."""
    page.get_by_role("tab", name="Distill").click()
    _fill(page, "#distill-name textarea", "quick-tiny")
    _fill(page, "#distill-steps textarea", "1")
    _fill(page, "#distill-evr textarea", "2")
    page.locator("#distill-start").click()
    page.locator("#distill-msg").get_by_text("expected about").wait_for()
    page.locator("#distill-status").get_by_text("ETA").wait_for()
    page.locator("#distill-tokens .tok[data-gap]").first.wait_for(timeout=240_000)
    head = page.locator("#distill-probe-head").inner_text()
    assert "mined from this request" in head and float(re.search(r"similarity (\d\.\d+)", head)[1]) >= 0.9  # the gate
    page.locator("#distill-report-download").wait_for(timeout=240_000)
    with page.expect_download() as dl:
        page.locator("#distill-report-download").click()
    html = Path(dl.value.path()).read_text("utf-8")
    assert html.startswith("<!DOCTYPE html>") and "data:image/png;base64," in html and "Result: held-out bench" in html
    page.screenshot(path=str(studio["shots"] / "distill-quick-tiny.png"), full_page=True)


def test_a_blank_user_name_gets_a_message(studio, tmp_path):
    from studio.app import BLANK_USER, LOGIN_HINT, launch
    from studio.services import Services

    services = Services.create(world_dir=studio["world"], runs_dir=tmp_path / "runs", data_dir=tmp_path / "data")
    port = _free_port()
    app = launch(services, port=port, password="s3cret", block=False)
    pg = studio["browser"].new_page()
    try:
        pg.goto(f"http://127.0.0.1:{port}/")
        pg.get_by_text(LOGIN_HINT).wait_for()
        pg.locator("input[type=password]").fill("s3cret")
        with pg.expect_response(lambda r: r.url.rstrip("/").endswith("/login")) as answer:
            pg.get_by_role("button", name="Login").click()
        assert answer.value.status == 400 and answer.value.json()["detail"] == BLANK_USER
        pg.locator("p.creds").wait_for()  # "Incorrect Credentials", under the hint that a user name is needed
        pg.screenshot(path=str(studio["shots"] / "login-blank-user.png"))
        pg.locator("input[type=text]").first.fill("me")
        pg.locator("input[type=password]").fill("s3cret")  # the failed attempt cleared both boxes
        pg.get_by_role("button", name="Login").click()
        pg.get_by_role("tab", name="Trajectories").wait_for()
    finally:
        pg.close()
        app.close()


def test_bench_a_policy_and_page_two_runs_side_by_side(studio, page):
    def made(before: set) -> str:
        return next(p.parent.name for p in studio["runs"].glob("bench-*/summary.json") if p.parent.name not in before)

    page.get_by_role("tab", name="Bench").click()
    _fill(page, "#bench-limit input", "4")
    _fill(page, "#bench-seeds textarea", "0,1")
    before = {p.parent.name for p in studio["runs"].glob("bench-*/summary.json")}
    page.locator("#bench-eval").click()
    page.locator("#bench-status").get_by_text("showing bench-raw").wait_for()
    page.wait_for_function("document.querySelector('#bench-table').innerText.includes('knowledge')")
    assert page.locator("#bench-chart img, #bench-chart svg, #bench-chart canvas").count() > 0
    first = made(before)
    page.locator("#bench-policy input").click()
    page.locator("#bench-policy").get_by_role("option", name="expert", exact=True).click()
    before.add(first)
    page.locator("#bench-eval").click()
    page.locator("#bench-status").get_by_text("showing bench-expert").wait_for()
    second = made(before)
    for name in (first, second):
        box = page.locator("#bench-compare-runs input")
        box.fill(name)  # typed: the list narrows to it
        page.locator("#bench-compare-runs").get_by_role("option", name=name, exact=True).wait_for()
        box.press("Enter")
    page.keyboard.press("Escape")
    page.locator("#bench-compare").click()
    page.locator("#bench-status").get_by_text("compared 2 runs on 4 requests").wait_for()
    assert "Δ (" in page.locator("#bench-compare-note").inner_text()
    # Every sample of both runs (2 seeds each), each run under its own mean; nothing crowned across the runs.
    page.wait_for_function("document.querySelectorAll('#bench-page .ge-col').length === 4")
    assert page.locator("#bench-page .ge-run h4").count() == 2
    page.locator("#bench-next").click()
    page.locator("#bench-status").get_by_text("request 2 of 4").wait_for()
    page.screenshot(path=str(studio["shots"] / "bench.png"), full_page=True)


def test_bench_a_local_official_folder_with_a_fake_judge(studio, page, world):
    from _loopback import FakeVLM, free_port_url, serve_app

    data = studio["root"] / "GenEvolve-Bench"
    (data / "bench").mkdir(parents=True)
    rows = []
    for r in world.split("bench")[:2]:
        world.gt_image(r).save(data / f"{r.id}.png")
        rows.append({"id": r.id, "question": r.text, "gt_image": f"{r.id}.png", "category": r.category,
                     "eval_type": "knowledge" if r.track == "knowledge" else "quality", "difficulty": "easy"})
    (data / "bench" / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    page.get_by_role("tab", name="Bench").click()
    page.get_by_text("A local GenEvolve-Bench folder (used instead").click()  # open the accordion
    _fill(page, "#bench-seeds textarea", "0")
    _fill(page, "#bench-data textarea", str(studio["root"] / "nowhere"))
    page.locator("#bench-eval").click()
    page.locator("#bench-status").get_by_text("does not exist").wait_for()
    _fill(page, "#bench-data textarea", str(data))
    _fill(page, "#bench-judge-model textarea", "fake-vlm")
    _fill(page, "#bench-judge-url textarea", free_port_url() + "/v1")
    page.locator("#bench-eval").click()
    page.locator("#bench-status").get_by_text("does not answer").wait_for()
    with serve_app(FakeVLM().app()) as url:
        _fill(page, "#bench-judge-url textarea", url + "/v1")
        page.locator("#bench-eval").click()
        page.locator("#bench-status").get_by_text("showing bench-GenEvolve-Bench").wait_for()
    assert "no missing cases of 2" in page.locator("#bench-missing").inner_text()
    page.wait_for_function("document.querySelector('#bench-table').innerText.includes('difficulty')")
    assert page.locator("#bench-chart img, #bench-chart svg, #bench-chart canvas").count() > 0
    page.screenshot(path=str(studio["shots"] / "bench-official.png"), full_page=True)
