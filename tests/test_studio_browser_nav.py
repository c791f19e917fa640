"""The studio in a real browser (part two): addresses and keys, the run browser, experience keys, merges and
versions, and every view at 1280 and 1920 px. The studio process and the browser are shared by the session
(tests/studio_browser.py); this part runs after part one, whose edits some of its tests read.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from studio_browser import CHROMIUM, _fill, _ready

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (`make test` installs it)")]


def test_consolidate_a_bank_and_see_the_key_the_merge_and_who_retrieves_it(studio, page, world):
    """Two experiences with one trigger: Consolidate merges them; the merged one shows its retrieval key, the merged
    experience as provenance, a version, and the sandbox requests nearest to it with what each one gets."""
    from genevolve.experience.bank import ExperienceBank
    from genevolve.experience.situation import CueDescriber
    from genevolve.agent.guides import oracle_slots

    reqs = [r for r in world.split("evolve") if set(r.skills) == {"quantity_counting"} and r.track == "quality"][:2]
    trigger = CueDescriber().describe(reqs[0].text)
    bank = ExperienceBank(studio["runs"] / "transfer-bank")
    for r in reqs:
        bank.add(r.id, r.text, oracle_slots(["quantity_counting"], False, 0), reward_gap=0.5,
                 retrieval_key={"trigger": trigger, "source_prompt_summary": r.text})
    page.get_by_role("tab", name="Experiences").click()
    page.locator("#exp-bank input").click()
    page.locator("#exp-bank").get_by_role("option", name="transfer-bank", exact=True).click()
    page.locator("#exp-status").get_by_text("2 of 2 experiences").wait_for()
    page.locator("#exp-consolidate").click()
    page.locator("#exp-status").get_by_text("merged 2 experiences into 1").wait_for()
    (merged,) = ExperienceBank(studio["runs"] / "transfer-bank").items.values()
    _fill(page, "#exp-id input", merged.id)
    page.locator("#exp-open").click()
    page.wait_for_function("document.querySelector('#exp-trigger textarea').value.length > 0")
    assert page.locator("#exp-trigger textarea").input_value() == trigger
    prov = page.locator("#exp-provenance").inner_text()
    assert "evidence 2" in prov and "merged from 1 experience(s), 2 source request(s)" in prov
    assert [r.id for r in reqs if r.id in prov] == [r.id for r in reqs]
    page.wait_for_function("document.querySelector('#exp-retrieving').innerText.includes('this experience (mined from it)')")
    table = page.locator("#exp-retrieving").inner_text()
    assert "this experience" in table and "below the gate 0.90" in table  # and why the farther ones get nothing
    assert float(re.findall(r"^(1(?:\.0+)?|0\.\d+)$", table, re.M)[0]) == pytest.approx(1.0)  # the nearest first
    assert "consolidated 2 experiences" in page.locator("#exp-history").inner_text()
    page.screenshot(path=str(studio["shots"] / "experiences-merged.png"), full_page=True)



def test_two_tabs_save_one_experience_and_the_second_save_is_refused_showing_both(studio, page):
    """Optimistic concurrency: each tab saves on the version it opened; the later save over a newer version is
    refused with both versions shown, and the first save survives (it was once silently reverted)."""
    from genevolve.agent.guides import SLOTS
    from genevolve.experience.bank import ExperienceBank

    e = ExperienceBank(studio["runs"] / "stale-bank").add("evolve-0001", "two editors",
                                                          {s: "Query spatial_layout and place each object." for s in SLOTS})
    pages = [page, studio["browser"].new_page(viewport={"width": 1280, "height": 1000})]
    for pg in pages:
        pg.set_default_timeout(90_000)
        pg.goto(f"{studio['url']}?view=experiences&bank=stale-bank&exp={e.id}")
        _ready(pg)
        pg.wait_for_function("document.querySelector('#exp-slot-search_strategy textarea').value.length > 0")
    _fill(pages[0], "#exp-slot-search_strategy textarea", "Search the fact first, tab one.")
    pages[0].locator("#exp-save").click()
    pages[0].locator("#exp-status").get_by_text("as version 2").wait_for()
    _fill(pages[1], "#exp-slot-failure_avoidance textarea", "Never skip the count, tab two.")
    pages[1].locator("#exp-save").click()
    pages[1].locator("#exp-status").get_by_text("by someone else").wait_for()
    assert "tab one" in (pages[1].locator("#exp-version-diff").text_content() or "")
    now = ExperienceBank(studio["runs"] / "stale-bank").get(e.id)
    assert now.version == 2 and "tab one" in now.slots["search_strategy"] and "tab two" not in now.slots["failure_avoidance"]
    pages[1].close()


def test_a_link_names_the_run_request_and_trajectory_and_keys_move_through_them(studio, page, world):
    """A shared address opens the run, the request and the trajectory it names; ←/→ page the requests and j/k walk
    the trajectories, each move written into the address, so a reload comes back to the same place."""
    name = "linked"
    ids = [r.id for r in world.split("bench")[5:8]]
    subprocess.run([sys.executable, "-m", "genevolve.cli", "rollout", *[x for i in ids for x in ("-r", i)], "-k", "2",
                    "--policy", "expert", "--out", str(studio["runs"] / name), "--world", str(studio["world"])], check=True,
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    from genevolve.records.runs import load_run

    trajs = [t.id for t in load_run(studio["runs"] / name).trajectories if t.request_id == ids[1]]
    page.goto(f"{studio['url']}?view=trajectories&run={name}&request={ids[1]}&traj={trajs[1]}")
    _ready(page)
    page.locator("#traj-status").get_by_text("request 2 of 3").wait_for()
    page.wait_for_function(f"document.querySelector('#traj-columns .ge-col.ge-focus')?.dataset.traj === '{trajs[1]}'")
    page.locator("body").click(position={"x": 5, "y": 5})  # keys go to the page, not a text box
    page.keyboard.press("ArrowRight")
    page.locator("#traj-status").get_by_text("request 3 of 3").wait_for()
    page.wait_for_function(f"new URL(location).searchParams.get('request') === '{ids[2]}'")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    page.locator("#traj-status").get_by_text("request 1 of 3").wait_for()
    first = [t.id for t in load_run(studio["runs"] / name).trajectories if t.request_id == ids[0]]
    page.keyboard.press("j")
    page.keyboard.press("j")
    page.wait_for_function(f"new URL(location).searchParams.get('traj') === '{first[1]}'")
    assert page.locator("#traj-columns .ge-col.ge-focus").get_attribute("data-traj") == first[1]
    page.keyboard.press("k")
    page.wait_for_function(f"new URL(location).searchParams.get('traj') === '{first[0]}'")
    page.reload()
    _ready(page)
    page.locator("#traj-status").get_by_text("request 1 of 3").wait_for()
    page.wait_for_function(f"document.querySelector('#traj-columns .ge-col.ge-focus')?.dataset.traj === '{first[0]}'")
    page.screenshot(path=str(studio["shots"] / "trajectories-linked.png"), full_page=True)


def test_the_run_browser_lists_filters_sorts_and_opens_a_run(studio, page):
    page.locator("#runs-refresh").click()
    page.wait_for_function("document.querySelector('#runs-table').innerText.includes('linked')")
    _fill(page, "#runs-filter textarea", "linked")
    page.keyboard.press("Enter")
    page.wait_for_function("(t => t.includes('linked') && !t.includes('cli-made'))(document.querySelector('#runs-table').innerText)")
    table = page.locator("#runs-table").inner_text()
    assert "rollout" in table and "finished" in table and "expert" in table  # kind, status, policy
    # A run made elsewhere (a terminal) while the page is open is listed when the window comes back into focus,
    # under the filter that is typed.
    import shutil

    shutil.copytree(studio["runs"] / "linked", studio["runs"] / "linked-again")
    page.evaluate("window.geRelistAt = 0; window.dispatchEvent(new Event('focus'))")
    page.wait_for_function("(t => t.includes('linked-again') && !t.includes('cli-made'))"
                           "(document.querySelector('#runs-table').innerText)")
    # (the table also keeps a hidden copy of its cells for sizing: the one a user sees is clicked)
    page.locator("#runs-table").get_by_text("linked", exact=True).filter(visible=True).first.click()
    page.locator("#traj-status").get_by_text("request 1 of 3").wait_for()
    page.wait_for_function("new URL(location).searchParams.get('run') === 'linked'")
    # Cases filtered and sorted, and the largest best-worst gaps; any two trajectories diffed turn by turn.
    page.get_by_text("This run's cases").click()
    page.locator("#cases-show").click()
    page.locator("#traj-status").get_by_text("of 6 trajectories match").wait_for()
    assert page.locator("#cases-gaps").inner_text().count("bench-") >= 1
    page.get_by_text("Diff any two trajectories, turn by turn").click()
    page.locator("#traj-diff-btn").click()
    page.locator("#traj-any-diff .ge-turn-diff").wait_for()
    page.screenshot(path=str(studio["shots"] / "runs-browser.png"), full_page=True)


def test_an_experience_version_is_diffed_restored_and_two_are_compared(studio, page):
    exp = studio["exps"][1]  # edited to version 2 by the editing test above
    page.goto(f"{studio['url']}?view=experiences&bank=studio-bank&exp={exp.id}")
    _ready(page)
    page.wait_for_function("document.querySelector('#exp-slot-search_strategy textarea').value.length > 0")
    if "zebra-check" not in page.locator("#exp-slot-prompt_construction textarea").input_value():
        pytest.skip("needs the edit made by test_edit_an_experience_reload_and_find_it_by_semantic_search")
    page.locator("#exp-version-diff-btn").click()
    diff = page.locator("#exp-version-diff")
    diff.get_by_text("fields differ").wait_for()
    assert "zebra-check" in diff.inner_text() and diff.locator("tr.differ").count() >= 1
    page.locator("#exp-restore").click()
    page.locator("#exp-status").get_by_text("restored version 1").wait_for()
    assert "zebra-check" not in page.locator("#exp-slot-prompt_construction textarea").input_value()
    page.get_by_text("Compare two experiences side by side").click()
    for box, e in (("#exp-cmp-a", studio["exps"][0]), ("#exp-cmp-b", studio["exps"][2])):
        _fill(page, f"{box} input", e.id)
    page.locator("#exp-cmp-btn").click()
    page.locator("#exp-cmp").get_by_text("fields differ").wait_for()
    page.screenshot(path=str(studio["shots"] / "experiences-versions.png"), full_page=True)


@pytest.mark.parametrize("width", [1280, 1920])
def test_every_view_fits_the_page_and_is_saved_as_a_screenshot(studio, width):
    pg = studio["browser"].new_page(viewport={"width": width, "height": 1000})
    pg.set_default_timeout(90_000)
    try:
        for view, ready in (("start", "#start-loop"), ("trajectories", "#runs-table"), ("experiences", "#exp-table"),
                            ("references", "#refs-query"), ("distill", "#distill-start"), ("bench", "#bench-eval")):
            pg.goto(f"{studio['url']}?view={view}")
            _ready(pg)
            pg.locator(ready).wait_for()
            wide = pg.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert wide <= 0, f"{view} overflows a {width} px page by {wide} px"
            pg.screenshot(path=str(studio["shots"] / f"view-{view}-{width}.png"), full_page=True)
    finally:
        pg.close()
