"""When T (text rendering) applies to a case, and what a missing case counts as under missing="zero"
(genevolve/evaluation/scoring.py)."""

from __future__ import annotations

from genevolve.evaluation.scoring import _as_zero, asks_for_text, summarise
from genevolve.records.schema import Request, Verdict


def _req(skills=(), scene=None):
    return Request(id="r", text="t", track="quality", category="c", difficulty=1, skills=list(skills), scene=scene)


def test_t_applies_when_scored_asked_for_by_skill_or_scene_or_given_to_every_case():
    plain = Verdict(trajectory_id="t", request_id="r")
    assert asks_for_text(_req(), plain) is False
    assert asks_for_text(_req(), Verdict(trajectory_id="t", request_id="r", T=0.5)) is True
    assert asks_for_text(_req(skills=["text_rendering"]), plain) is True
    assert asks_for_text(_req(skills=["spatial_layout"]), plain) is False
    assert asks_for_text(_req(scene={"text": "OPEN"}), plain) is True
    assert asks_for_text(_req(scene={"text": ""}), plain) is False
    assert asks_for_text(_req(scene={"objects": []}), plain) is False
    assert asks_for_text(_req(), Verdict(trajectory_id="t", request_id="r", text_policy="half")) is True
    assert asks_for_text(_req(), Verdict(trajectory_id="t", request_id="r", text_policy="renormalise")) is False


def test_a_missing_case_counts_as_zero_with_t_only_where_it_applies():
    gone = Verdict(trajectory_id="t", request_id="r", failed="render service down", F=None, V=None, A=None,
                   kscore=None, reward=None)
    z = _as_zero(_req(skills=["text_rendering"]), gone)
    assert (z.F, z.V, z.T, z.A, z.kscore, z.r_text, z.reward) == (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert z.failed == "counted as 0: render service down"
    assert _as_zero(_req(), gone).T is None


def test_summarising_nothing_gives_empty_groups():
    assert summarise([], missing="zero")["overall"] == {} and summarise([])["track"] == {}
