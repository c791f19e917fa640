"""The report: the result first (deltas from the first policy, a CI only with two or more seeds), examples
chosen by their largest gains and regressions, the configuration last."""

from __future__ import annotations

from genevolve.evaluation.bench import aggregate, over_seeds
from genevolve.evaluation.report import table, write_examples
from genevolve.records.schema import ImageStore, Trajectory, Verdict


def _result(world, kscores: dict[str, float], seeds=(0,)):
    reqs = {r.id: r for r in world.split("bench")}
    records, per_seed = [], {}
    for s in seeds:
        pairs = []
        for rid, k in kscores.items():
            v = Verdict(trajectory_id=f"{rid}-{s}", request_id=rid, F=1.0, V=k, T=None, A=k, kscore=k, r_text=k, reward=k)
            t = Trajectory(id=v.trajectory_id, request_id=rid, request_text=reqs[rid].text, termination="answer")
            records.append({"seed": s, "sample": 0, "request": rid, "trajectory": t, "verdict": v})
            pairs.append((reqs[rid], v))
        per_seed[s] = aggregate(pairs)
    return {"summary": over_seeds(per_seed, ("overall", "track")), "records": records}


def test_table_shows_the_change_from_the_first_policy_and_a_ci_only_with_seeds(world):
    ids = [r.id for r in world.split("bench")[:4]]
    before = _result(world, dict(zip(ids, (0.2, 0.4, 0.6, 0.8))))
    after = _result(world, dict(zip(ids, (0.5, 0.4, 0.6, 0.5))))
    md = table({"before": before, "after": after})
    row = next(line for line in md.splitlines() if line.startswith("| after | all |"))
    assert row.endswith("| +0.000 |") and "±" not in row and "One seed, no CI." in md
    two = table({"a": _result(world, {ids[0]: 0.2}, seeds=(0, 1))})
    assert "Mean ± 95 % CI over 2 seeds." in two


def test_examples_are_the_largest_gains_then_the_largest_regressions(world, tmp_path):
    ids = [r.id for r in world.split("bench")[:6]]
    before = _result(world, dict(zip(ids, (0.5, 0.5, 0.5, 0.5, 0.5, 0.5))))
    after = _result(world, dict(zip(ids, (0.9, 0.6, 0.5, 0.4, 0.1, 0.5))))
    for r in (before, after):
        r["store"] = ImageStore(tmp_path / "images")
    md = write_examples(world, {"before": before, "after": after}, tmp_path, n=4)
    heads = [line for line in md.splitlines() if line.startswith("### ")]
    assert heads == [f"### {ids[0]} (KScore +0.40)", f"### {ids[1]} (KScore +0.10)",
                     f"### {ids[4]} (KScore -0.40)", f"### {ids[3]} (KScore -0.10)"]
    assert "the 2 largest gains, then the 2 largest regressions" in md


def test_the_report_as_one_self_contained_html_file(tmp_path):
    import base64
    import io

    from PIL import Image

    from genevolve.evaluation.report_html import write_report_html

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 30)).save(buf, format="PNG")
    (tmp_path / "curve.png").write_bytes(buf.getvalue())
    (tmp_path.parent / "secret.png").write_bytes(buf.getvalue())
    (tmp_path / "report.md").write_text("# Distill and compare\n\n| policy | KScore |\n| --- | --- |\n| after | 0.6 |\n\n"
                                        "![curve](curve.png) ![gone](gone.png) ![outside](../secret.png)\n\n"
                                        "<details><summary>every setting</summary>\n\n```json\n{}\n```\n\n</details>\n")
    html = write_report_html(tmp_path / "report.md").read_text()
    assert (tmp_path / "report.html").exists() and html.startswith("<!DOCTYPE html>")
    assert "<title>Distill and compare</title>" in html and "<table>" in html and "<details>" in html
    assert "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode() in html  # inlined, no file needed
    assert 'src="curve.png"' not in html and "picture gone.png not found" in html
    assert "picture ../secret.png not found in the report folder" in html  # nothing outside the folder is read
    import pytest

    with pytest.raises(FileNotFoundError, match="no report yet"):
        write_report_html(tmp_path / "missing" / "report.md")


def test_the_cli_writes_the_html_report(tmp_path):
    from typer.testing import CliRunner

    from genevolve.cli import app

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("# R\n\nok\n")
    res = CliRunner().invoke(app, ["report", str(tmp_path), "--html", str(tmp_path / "out.html")])
    assert res.exit_code == 0 and "self-contained" in res.output and "<p>ok</p>" in (tmp_path / "out.html").read_text()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no report yet" in res.output
