"""Routes from files: parsing both formats, our route planner on a small lane graph, one-line refusals, and
the expert driving a real-town route."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("carla")

from craft.errors import CraftError  # noqa: E402
from craft.scenarios.routefile import (RouteFileConfig, load_route_file, match_points, plan_route_lanes,  # noqa: E402
                                       read_route_file)
from craft.world.opendrive import load_opendrive  # noqa: E402

SMALL = Path(__file__).parent / "data" / "small.xodr"

LB1 = """<routes>
  <route id="3" town="small">
    <waypoint x="5.0" y="1.75" z="0" yaw="0.0"/>
    <waypoint x="118.5" y="60.0" z="0" yaw="90.0"/>
  </route>
</routes>"""

LB2 = """<routes>
  <route id="7" town="small">
    <weathers/>
    <waypoints><position x="5.0" y="1.75" z="0"/><position x="60.0" y="1.75" z="0"/>
      <position x="150.0" y="5.25" z="0"/><position x="200.0" y="5.25" z="0"/></waypoints>
    <scenarios><scenario name="HardBreakRoute_1" type="HardBreakRoute">
      <trigger_point x="60.0" y="1.75" z="0" yaw="0"/></scenario></scenarios>
  </route>
</routes>"""


@pytest.fixture(scope="module")
def small():
    return load_opendrive(SMALL, cache=False)


def _lane(m, start):
    return next(i for i in range(m.num_lanes) if np.linalg.norm(m.lane_points(i)[0] - start) < 0.3
                and m.lane_type[i] == 0)


def test_both_formats_parsed(tmp_path):
    (tmp_path / "a.xml").write_text(LB1)
    (tmp_path / "b.xml").write_text(LB2)
    (r1,) = read_route_file(tmp_path / "a.xml")
    assert r1.format == "leaderboard-1.0" and r1.id == "3" and r1.town == "small"
    np.testing.assert_allclose(r1.points, [[5.0, -1.75], [118.5, -60.0]])  # CARLA's y flipped
    np.testing.assert_allclose(r1.yaws, [0.0, -np.pi / 2], atol=1e-9)  # CARLA yaw 90 = south in our frame
    (r2,) = read_route_file(tmp_path / "b.xml")
    assert r2.format == "leaderboard-2.0" and len(r2.points) == 4 and np.isnan(r2.yaws).all()
    assert r2.scenarios == [{"type": "HardBreakRoute", "name": "HardBreakRoute_1", "trigger": (60.0, -1.75),
                             "yaw": 0.0}]


def test_planner_on_small_lane_graph(small, tmp_path):
    m = small
    (tmp_path / "a.xml").write_text(LB1)
    (r,) = read_route_file(tmp_path / "a.xml")
    matches = match_points(m, r.points, r.yaws)
    east1, south3 = _lane(m, (0.0, -1.75)), _lane(m, (118.5, -20.0))
    assert [mt[0] for mt in matches] == [east1, south3]
    assert matches[0][1] == pytest.approx(5.0, abs=1e-3) and matches[1][1] == pytest.approx(40.0, abs=1e-3)
    lanes, ego_s, end_m = plan_route_lanes(m, matches)
    right = next(c for c in m.successors(east1) if m.lane_turn[c] == 2)
    assert lanes == [east1, right, south3]
    assert end_m == pytest.approx(95.0 + float(m.lane_length[right]) + 40.0, abs=0.5)
    # a lane change: road 2's outer lane (-2) is reached from its inner lane (-1) over the broken line
    (tmp_path / "b.xml").write_text(LB2)
    (r2,) = read_route_file(tmp_path / "b.xml")
    lanes2, _, _ = plan_route_lanes(m, match_points(m, r2.points, r2.yaws))
    in2, out2 = _lane(m, (120.0, -1.75)), _lane(m, (120.0, -5.25))
    straight = next(c for c in m.successors(east1) if m.lane_turn[c] == 0)
    assert lanes2 == [east1, straight, in2, out2]


def test_refusals_are_one_line(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    shutil.copy(SMALL, maps / "small.xodr")
    far = LB1.replace('x="118.5" y="60.0"', 'x="60.0" y="40.0"')
    routes = far.replace("</routes>", '<route id="4" town="Town99"><waypoint x="0" y="0" z="0"/>'
                                      '<waypoint x="9" y="0" z="0"/></route></routes>')
    (tmp_path / "r.xml").write_text(routes)
    insts, towns, refused = load_route_file(tmp_path / "r.xml", maps)
    assert insts == [] and len(refused) == 2
    assert refused[0].startswith("route 3 (small) of r.xml: point 1") and "from the nearest lane" in refused[0]
    assert refused[1] == f"route 4 (Town99) of r.xml: no map file Town99.xodr in '{maps}'"
    assert all("\n" not in x for x in refused)
    with pytest.raises(CraftError, match="route 3"):
        load_route_file(tmp_path / "r.xml", maps, strict=True)
    (tmp_path / "bad.xml").write_text("<routes><route id='1' town='x'></route>")
    with pytest.raises(CraftError, match="not readable XML"):
        read_route_file(tmp_path / "bad.xml")


def test_bench2drive_scenario_placed_at_trigger(tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    shutil.copy(SMALL, maps / "small.xodr")
    (tmp_path / "b.xml").write_text(LB2)
    insts, towns, refused = load_route_file(tmp_path / "b.xml", maps, cfg=RouteFileConfig(tries_per_type=12))
    assert refused == [] and len(insts) == 1
    inst = insts[0]
    assert inst.meta["route_name"] == "7" and inst.meta["town"] == "small"
    if inst.meta["types"]:  # the small town may not fit it; if it does, it sits near the trigger (55 m)
        assert inst.meta["types"] == ["HardBreakRoute"]
        assert 55.0 - 40.0 - 1e-6 <= inst.meta["chain"][0]["start_m"] <= 55.0 + 220.0
    else:
        assert inst.meta["notes"] and "HardBreakRoute" in inst.meta["notes"][0]


def test_expert_drives_a_longest6_route():
    import torch

    from craft.bench.runner import EvalConfig, ExpertDriver, file_world, run_batch
    from craft.data.carla import carla_data, route_file

    torch.set_num_threads(1)
    cfg = EvalConfig(max_steps=40)
    insts, world, refused = file_world({"path": route_file("longest6"), "maps": carla_data(), "routes": ["0"]}, cfg)
    assert refused == [] and len(insts) == 1 and insts[0].meta["town"] == "Town01"
    assert 1000.0 < insts[0].route_length < 1300.0  # Longest6 route 0: ~1.19 km through the lane graph
    logs, _ = run_batch(world, insts, ExpertDriver(), cfg)
    log = logs[0]
    assert log.route_id == "RouteScenario_0_rep0"
    assert 5.0 < log.progress_m < 80.0  # it drove off within 4 s
    assert not log.infractions["collisions_vehicle"] and not log.infractions["collisions_layout"]
