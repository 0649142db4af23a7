"""`craft eval`: an end-to-end evaluation writes a well-formed results file; bad input fails cleanly."""

from __future__ import annotations

import json

import pytest

from craft.bench.metrics import validate_results
from craft.cli import main


@pytest.fixture(scope="module")
def lane_follow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    rc = main(["eval", "--policy", "lane-follow", "--split", "val", "--routes", "1", "--types", "ParkedObstacle",
               "VanillaSignalizedTurnEncounterRedLight", "HardBreakRoute", "--max-steps", "400", "--gif", "1",
               "--out", str(out)])
    return rc, out


def test_eval_writes_results_summary_chart_and_gif(lane_follow_run):
    rc, out = lane_follow_run
    assert rc == 0
    obj = json.loads((out / "results.json").read_text())
    validate_results(obj)
    s = obj["summary"]
    assert s["num_routes"] == 3 and s["split"] == "val" and s["policy"] == "lane-follow"
    assert set(s["abilities"]) == {"Merging", "Overtaking", "Emergency_Brake", "Give_Way", "Traffic_Signs", "Mean"}
    assert 0.0 <= s["DS"] <= 100.0 and len(obj["records"]) == 3
    assert (out / "summary.md").read_text().startswith("# Benchmark")
    assert (out / "abilities.png").stat().st_size > 1000
    assert len(list(out.glob("worst0_*.gif"))) == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_eval_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    cases = [["--policy", "lane-follow", "--split", "nope"],
             ["--policy", str(tmp_path / "missing.pt"), "--split", "val"],
             ["--policy", "lane-follow", "--split", "val", "--protocol", "carla"],
             ["--policy", "lane-follow", "--split", "val", "--types", "NotAType"]]
    for extra in cases:
        out = tmp_path / "o"
        try:
            rc = main(["eval", *extra, "--out", str(out)])
        except SystemExit as e:
            rc = e.code
        assert rc == 2, extra
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        assert not (out / "results.json").exists()
