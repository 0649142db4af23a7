"""Bench2Drive parity: a route's record does not depend on its batch; the official results layout."""

from __future__ import annotations

import json

import pytest
import torch

from craft.bench.runner import EvalConfig, LaneFollow, evaluate
from craft.scenarios.splits import route_identity, route_number, route_seed


def _records(out) -> dict[str, dict]:
    recs = json.loads((out / "results.json").read_text())["records"]
    return {r["route_id"]: {k: v for k, v in r.items() if k != "index"} for r in recs}


def test_route_seed_is_a_pure_function_of_identity_and_seed():
    a = route_seed(route_identity("test", "Accident", 3, 10007), 0)
    assert a == route_seed("test/Accident/3/10007", 0)  # the identity string is the whole key
    assert 0 <= a < 2**31 - 1
    others = {route_seed(route_identity("test", "Accident", 3, 10007), 1),
              route_seed(route_identity("test", "Accident", 4, 10007), 0),
              route_seed(route_identity("val", "Accident", 3, 10007), 0),
              route_seed(route_identity("test", "Accident", 3, 10008), 0)}
    assert a not in others and len(others) == 4
    assert route_number("Accident", 0) == 0 and route_number("AccidentTwoWays", 4) == 1004
    assert route_number("Long", 7) == 44007


def test_route_record_does_not_depend_on_its_batch(tmp_path, monkeypatch):
    """The same route under other --types / --routes / --batch-size and with the runner's dropping of ended
    rows gives the same record, byte for byte (only ``index``, the position in the file, differs)."""
    from craft.bench import runner
    from craft.world.autopilot import PlanExecutor

    monkeypatch.setattr(runner, "COMPACT_MIN_ROWS", 4)  # drop ended rows in batches of 4 or more
    dropped = []
    index = PlanExecutor.index
    monkeypatch.setattr(PlanExecutor, "index", lambda self, idx: dropped.append(int((~idx).sum())) or index(self, idx))
    runs = {"big": (["Accident", "HardBreakRoute", "ControlLoss"], 3, 9),
            "alone": (["ControlLoss"], 1, 1),
            "mixed": (["HardBreakRoute", "ControlLoss"], 3, 5)}
    recs = {}
    for name, (types, routes, bs) in runs.items():
        evaluate(LaneFollow(), "test", tmp_path / name, EvalConfig(protocol="b2d-star", batch_size=bs, max_steps=250), routes=routes,
                 types=types)
        recs[name] = _records(tmp_path / name)
        if name == "big":
            assert dropped, "the batch of 9 dropped no rows"
            dropped.clear()
    assert len(recs["big"]) == 9
    compared = 0
    for name in ("alone", "mixed"):
        for rid, rec in recs[name].items():
            assert json.dumps(rec, sort_keys=True) == json.dumps(recs["big"][rid], sort_keys=True), (name, rid)
            compared += 1
    assert compared == 7
    # the background traffic really differs between routes (the seed is per route, not one for all)
    assert len({r["meta"]["efficiency"] for r in recs["big"].values()}) > 4


# ---------------------------------------------------------------------- the official layout
# A route record and the top level written by hand from Bench2Drive's documented format (its leaderboard's
# statistics_manager.py: RouteRecord, GlobalRecord, Results; v0.0.4), with the values of a real route.
B2D_INFRACTIONS = ("collisions_layout", "collisions_pedestrian", "collisions_vehicle", "red_light", "stop_infraction",
                   "outside_route_lanes", "min_speed_infractions", "yield_emergency_vehicle_infractions",
                   "scenario_timeouts", "route_dev", "vehicle_blocked", "route_timeout")
HAND_RECORD = {
    "index": 0,
    "route_id": "RouteScenario_1711_rep0",
    "scenario_name": "ParkingCutIn_1",
    "weather_id": "1",
    "save_name": "RouteScenario_1711_rep0_Town12_ParkingCutIn_1_1_11_27_10_00_00",
    "town_name": "Town12",
    "status": "Completed",
    "num_infractions": 3,
    "infractions": {**{k: [] for k in B2D_INFRACTIONS},
                    "min_speed_infractions": ["Average speed is 87.35% of the surrounding traffic's one",
                                              "Average speed is 100% of the surrounding traffic's one"],
                    "outside_route_lanes": ["Agent went outside its route lanes for about 3.2 meters "
                                            "(3.07% of the completed route)"]},
    "scores": {"score_route": 100.0, "score_penalty": 0.9693, "score_composed": 96.93},
    "meta": {"route_length": 104.3, "duration_game": 20.5, "duration_system": 61.2},
}
HAND_TOP = {
    "_checkpoint": {
        "global_record": {"index": -1, "route_id": -1, "status": "Completed",
                          "infractions": {k: 0.0 for k in B2D_INFRACTIONS},
                          "scores_mean": {"score_composed": 96.93, "score_route": 100.0, "score_penalty": 0.9693},
                          "scores_std_dev": {"score_composed": 0, "score_route": 0, "score_penalty": 0},
                          "meta": {"total_length": 104.3, "duration_game": 20.5, "duration_system": 61.2,
                                   "exceptions": []}},
        "progress": [1, 1],
        "records": [HAND_RECORD],
    },
    "entry_status": "Finished",
    "eligible": True,
    "sensors": ["carla_camera"],
    "values": ["96.93", "100.0", "0.9693"] + ["0.0"] * 12,
    "labels": ["Avg. driving score", "Avg. route completion", "Avg. infraction penalty",
               "Collisions with pedestrians", "Collisions with vehicles", "Collisions with layout",
               "Red lights infractions", "Stop sign infractions", "Off-road infractions", "Route deviations",
               "Route timeouts", "Agent blocked", "Yield emergency vehicles infractions", "Scenario timeouts",
               "Min speed infractions"],
}


def _same_shape(ours, hand, where: str) -> None:
    """``ours`` has every field of ``hand`` with the same JSON type, recursively (lists: element types)."""
    if isinstance(hand, dict):
        assert isinstance(ours, dict), where
        for k, v in hand.items():
            assert k in ours, f"{where}.{k} missing"
            _same_shape(ours[k], v, f"{where}.{k}")
    elif isinstance(hand, list):
        assert isinstance(ours, list), where
        for o in ours:
            if hand:
                _same_shape(o, hand[0], f"{where}[]")
    elif isinstance(hand, bool):
        assert isinstance(ours, bool), where
    elif isinstance(hand, (int, float)):
        assert isinstance(ours, (int, float)) and not isinstance(ours, bool), where
    else:
        assert isinstance(ours, type(hand)), f"{where}: {type(ours).__name__} vs {type(hand).__name__}"


@pytest.fixture(scope="module")
def expert_run(tmp_path_factory):
    from craft.bench.runner import make_driver

    out = tmp_path_factory.mktemp("layout")
    evaluate(make_driver("expert"), "val", out / "b2d", EvalConfig(max_steps=400), routes=1,
             types=["AccidentTwoWays", "HardBreakRoute", "T_Junction"], also={"b2d-star": out / "b2d-star"})
    return out


def test_results_layout_matches_bench2drive_field_by_field(expert_run):
    import re

    obj = json.loads((expert_run / "b2d" / "results.json").read_text())
    _same_shape({k: obj[k] for k in HAND_TOP if k != "_checkpoint"}, {k: v for k, v in HAND_TOP.items()
                                                                      if k != "_checkpoint"}, "top")
    assert obj["labels"] == HAND_TOP["labels"] and len(obj["values"]) == len(HAND_TOP["values"])
    assert obj["entry_status"] == "Finished" and obj["eligible"] is True
    cp = obj["_checkpoint"]
    assert set(cp) == set(HAND_TOP["_checkpoint"])
    assert cp["progress"] == [3, 3]
    g = cp["global_record"]
    assert set(g) == set(HAND_TOP["_checkpoint"]["global_record"])
    _same_shape(g, HAND_TOP["_checkpoint"]["global_record"], "global_record")
    assert set(g["infractions"]) == set(B2D_INFRACTIONS)
    assert float(obj["values"][0]) == pytest.approx(sum(r["scores"]["score_composed"] for r in cp["records"]) / 3,
                                                    abs=1e-6)
    for r in cp["records"]:
        _same_shape(r, HAND_RECORD, "record")
        assert set(r["infractions"]) == set(B2D_INFRACTIONS)
        assert set(r["scores"]) == set(HAND_RECORD["scores"])
        assert re.fullmatch(r"RouteScenario_\d+_rep\d+", r["route_id"])  # the tools split it on "_"
        assert re.fullmatch(rf"{r['scenario_type']}_\d+", r["scenario_name"])
        assert r["save_name"] == f"{r['route_id']}_{r['town_name']}_{r['scenario_name']}_{r['weather_id']}"
        assert r["num_infractions"] == sum(len(v) for v in r["infractions"].values())
        # the leaderboard's global record reads the outside metres as the 9th word of the message
        for m in r["infractions"]["outside_route_lanes"]:
            float(m.split(" ")[8])
        for m in r["infractions"]["min_speed_infractions"]:  # the efficiency tool's pattern: a number then %
            assert re.search(r"\b\d+\.?\d*%", m)
    assert obj["records"] == cp["records"]


def test_routes_xml_and_per_step_files(expert_run):
    import xml.etree.ElementTree as ET

    from craft.bench.metrics import RouteLog, comfort

    for proto in ("b2d", "b2d-star"):
        obj = json.loads((expert_run / proto / "results.json").read_text())
        routes = ET.parse(expert_run / proto / "routes.xml").getroot().findall("route")
        assert len(routes) == 3
        for route, rec in zip(routes, obj["_checkpoint"]["records"]):
            assert route.get("id") == rec["route_id"].split("_")[1] and route.get("town") == rec["town_name"]
            (sc,) = route.find("scenarios").findall("scenario")
            assert sc.get("type") == rec["scenario_type"] and sc.get("name") == rec["scenario_name"]
            tp = sc.find("trigger_point")
            assert {"x", "y", "z", "yaw"} <= set(tp.attrib)
            pts = [(float(p.get("x")), float(p.get("y"))) for p in route.find("waypoints").findall("position")]
            gaps = [((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5 for a, b in zip(pts, pts[1:])]
            assert max(gaps) <= 2.15 and sum(gaps) == pytest.approx(rec["meta"]["route_length"], rel=0.02)
            # the per-step file, where the comfort tool looks for it, re-gives the record's comfort
            steps = json.loads((expert_run / proto / "metric_info" / rec["save_name"] / "metric_info.json")
                               .read_text())
            assert list(steps)[:3] == ["0", "1", "2"]
            assert len(steps) == round(rec["meta"]["duration_game"] / 0.1)
            one = steps["0"]
            assert set(one) == {"acceleration", "angular_velocity", "forward_vector", "right_vector", "location",
                                "rotation"} and all(len(v) == 3 for v in one.values())
            acc = [s["acceleration"] for s in steps.values()]
            fwd = [s["forward_vector"] for s in steps.values()]
            rgt = [s["right_vector"] for s in steps.values()]
            lon = [a[0] * f[0] + a[1] * f[1] for a, f in zip(acc, fwd)]
            lat = [a[0] * q[0] + a[1] * q[1] for a, q in zip(acc, rgt)]
            yaw_rate_rad = [s["angular_velocity"][2] * 3.141592653589793 / 180 for s in steps.values()]
            log = RouteLog(route_id=rec["route_id"], scenario_type=rec["scenario_type"], town_seed=0,
                           route_length_m=1.0, progress_m=0.0, completed=False, end_reason="running",
                           kinematics={"accel_lon": lon, "accel_lat": lat, "yaw_rate": yaw_rate_rad})
            assert comfort(log) == pytest.approx(rec["meta"]["comfort"])


def test_other_layout_is_one_clear_line(tmp_path, expert_run):
    from craft.bench.metrics import load_results
    from craft.errors import CraftError

    obj = json.loads((expert_run / "b2d" / "results.json").read_text())
    old = dict(obj)
    for k in ("entry_status", "eligible", "sensors", "values", "labels"):  # a file of the earlier layout
        old.pop(k)
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(CraftError, match="missing 'entry_status'") as e:
        load_results(tmp_path / "old.json")
    assert "\n" not in str(e.value) and "old.json" in str(e.value)
    rec_old = json.loads(json.dumps(obj))
    for r in rec_old["records"]:
        del r["save_name"]
    (tmp_path / "rec.json").write_text(json.dumps(rec_old))
    with pytest.raises(CraftError, match="missing 'save_name'"):
        load_results(tmp_path / "rec.json")
    (tmp_path / "b2d.json").write_text(json.dumps({k: v for k, v in obj.items() if k not in ("summary", "records")}))
    with pytest.raises(CraftError, match="missing 'summary'"):
        load_results(tmp_path / "b2d.json")


# ---------------------------------------------------------------------- rules where Bench2Drive's code decides
def test_wrong_direction_exempt_while_a_two_ways_scenario_runs():
    """Driving eastbound on the westbound lane (the TwoWays overtaking manoeuvre): counted as outside route
    lanes (route metres) unless the scenario switched the wrong-direction test off; off-road still counts."""
    import math

    from tests.test_events import go, make_state, MAIN_ROUTE

    s = make_state([(0, MAIN_ROUTE)] * 3)
    s.pos[:, 0, 0] = 20.0
    s.pos[:, 0, 1] = torch.tensor([3.5, 3.5, 7.5])  # wrong lane / wrong lane exempt / sidewalk exempt
    s.progress[:] = 20.0
    s.progress_idx[:] = 20
    s = s.replace(wrong_dir_exempt=torch.tensor([False, True, True]))
    for k in range(1, 11):
        s, _ = go(s, 20.0 + k, s.pos[:, 0, 1], 0.0, 10.0)
    assert torch.allclose(s.driven_outside, torch.tensor([10.0, 0.0, 10.0]))
    # route metres: the 3.5 m offset keeps the ego within reach of the route points it passes
    assert float(s.progress_outside[0]) == pytest.approx(float(s.progress[0] - 20.0), abs=1.01)
    assert float(s.progress_outside[1]) == 0.0 and float(s.progress_outside[0]) > 8.0
    assert math.isfinite(float(s.progress_outside[2]))


def test_blocked_test_suspended_while_a_scenario_timeout_runs():
    from tests.test_events import go, make_state, MAIN_ROUTE

    from craft.world.state import EndReason

    s = make_state([(0, MAIN_ROUTE)] * 2).replace(blocked_exempt=torch.tensor([True, False]))
    for _ in range(700):
        s, ev = go(s, 0.0, 0.0, v=0.0)
    assert not bool(s.done[0]) and float(s.blocked_time[0]) == 0.0
    assert bool(s.done[1]) and int(s.end_reason[1]) == EndReason.BLOCKED
    # once the scenario is over the clock starts from zero: 60 s more
    s = s.index(torch.tensor([0])).replace(blocked_exempt=torch.tensor([False]))
    for k in range(1, 700):
        s, ev = go(s, 0.0, 0.0, v=0.0)
        if bool(ev.done[0]):
            break
    assert k == 600


def test_scenario_windows_follow_bench2drive_switches():
    import math

    from craft.scenarios.base import ACTIVATION_M, apply_windows, scenario_windows
    from craft.scenarios.splits import split_specs

    insts = {i.type: i for i in split_specs("val", routes=1, types=["AccidentTwoWays", "HazardAtSideLaneTwoWays",
                                                                      "HardBreakRoute", "T_Junction"])}
    order = ["AccidentTwoWays", "HazardAtSideLaneTwoWays", "HardBreakRoute", "T_Junction"]
    w = scenario_windows([insts[t] for t in order])
    end = [insts[t].meta["span"]["end_m"] for t in order]
    wd, bl = w.wrong_dir_end_m[:, 0].tolist(), w.blocked_end_m[:, 0].tolist()
    assert wd[0] == pytest.approx(end[0]) and math.isinf(wd[1])
    assert wd[2:] == [0.0, 0.0]  # not TwoWays types
    assert bl[2] == 0.0  # HardBreakRoute has no scenario timeout in Bench2Drive
    assert bl[3] == pytest.approx(end[3])  # T_Junction has one
    for i, t in enumerate(order):
        sp = insts[t].meta["span"]
        assert 0.0 <= sp["trigger_m"] <= sp["interaction_m"] <= sp["end_m"] <= insts[t].route_length + 1e-6
        assert float(w.start_m[i, 0]) == pytest.approx(min(ACTIVATION_M, sp["interaction_m"]))

    class _S:  # the two fields apply_windows reads and writes
        def __init__(self, p):
            self.progress = torch.tensor(p)

        def replace(self, **kw):
            return kw

    at = [0.0, float(w.start_m[1, 0]) + 1.0, 5000.0, float(w.start_m[3, 0]) + 1.0]
    got = apply_windows(_S(at), w)
    assert got["wrong_dir_exempt"].tolist() == [False, True, False, False]
    # both TwoWays types run a scenario timeout too; HardBreakRoute does not; nothing before the start
    assert got["blocked_exempt"].tolist() == [False, at[1] < end[1], False, at[3] < end[3]]


def _log(**kw):
    from craft.bench.metrics import RouteLog

    base = dict(route_id="RouteScenario_5_rep0", scenario_type="Accident", town_seed=0, route_length_m=100.0,
                progress_m=100.0, completed=True, end_reason="completed", driven_m=100.0)
    base.update(kw)
    return RouteLog(**base)


def test_efficiency_counts_fully_passed_checkpoints_and_every_background_vehicle():
    import numpy as np

    from craft.bench.metrics import efficiency, score_route

    # 12 steps, progress 0.5 .. 6.0 m of a 100 m route (checkpoints of 5 m): the first checkpoint closes at
    # the step whose progress exceeds 5 m (5.5 m, step 10) with the samples of steps 0-9; the background
    # existed only in steps 0-4: ego 0+1+2+3+4 = 10 over background 5 x 10 = 50 -> 20 %. 6 % of the route
    # is not > 95 %, so the open second checkpoint is not recorded.
    prog = 0.5 * (np.arange(12) + 1)
    bg = np.where(np.arange(12) < 5, 10.0, np.nan)
    lg = _log(progress_m=6.0, completed=False, end_reason="agent_blocked",
              checkpoint_speeds={"ego_speed": np.arange(12.0), "background_speed_all": bg, "progress_m": prog})
    assert efficiency(lg) == pytest.approx(20.0)
    assert score_route(lg)["infractions"]["min_speed_infractions"] == [
        "Average speed is 20.0% of the surrounding traffic's one"]
    # no background vehicle at all: the checkpoint's value is the integer 100
    lg2 = _log(progress_m=6.0, completed=False, end_reason="agent_blocked",
               checkpoint_speeds={"ego_speed": np.arange(12.0), "background_speed_all": np.full(12, np.nan),
                                  "progress_m": prog})
    assert score_route(lg2)["infractions"]["min_speed_infractions"] == [
        "Average speed is 100% of the surrounding traffic's one"]
    # beyond 95 %: the last, partly passed checkpoint is recorded too. 96 steps of 1 m + one 4 m jump (the
    # completion rule): checkpoints close at 6, 12, ..., 96 m (16 of them: each needs > 5 m past the last
    # close), then the open one at the end -> 17 values, all 50 (ego 5 m/s, background 10 m/s)
    prog3 = np.append(np.arange(1.0, 97.0), 100.0)
    lg3 = _log(checkpoint_speeds={"ego_speed": np.full(97, 5.0), "background_speed_all": np.full(97, 10.0),
                                  "progress_m": prog3})
    msgs = score_route(lg3)["infractions"]["min_speed_infractions"]
    assert len(msgs) == 17 and efficiency(lg3) == pytest.approx(50.0)


def test_comfort_bench2drive_units_and_the_si_variant():
    """A steady gentle turn: 0.05 rad/s (2.86 deg/s), no acceleration. In rad/s it is comfortable; Bench2Drive
    checks its deg/s yaw rate against the 0.95 bound and its smoothed yaw rate against the 1.93 yaw
    acceleration bound, so every chunk fails. Straight driving passes both."""
    import numpy as np

    from craft.bench.metrics import comfort, comfort_si

    n = 60
    turn = {"accel_lon": np.zeros(n), "accel_lat": np.full(n, 0.4), "yaw_rate": np.full(n, 0.05)}
    assert comfort_si(_log(kinematics=turn)) == 1.0
    assert comfort(_log(kinematics=turn)) == 0.0
    straight = {"accel_lon": np.zeros(n), "accel_lat": np.zeros(n), "yaw_rate": np.zeros(n)}
    assert comfort(_log(kinematics=straight)) == comfort_si(_log(kinematics=straight)) == 1.0
    # 0.01 rad/s = 0.57 deg/s is inside Bench2Drive's bounds too; the 3rd of 3 chunks turns harder
    yaw = np.full(n, 0.01)
    yaw[40:] = 0.05
    assert comfort(_log(kinematics={**straight, "yaw_rate": yaw})) == pytest.approx(2 / 3)


def test_outside_lanes_percentage_over_route_distance():
    from craft.bench.metrics import score_route

    # 10 route metres of 50 passed outside (20 %), whatever the metres driven (200)
    r = score_route(_log(progress_m=50.0, completed=False, end_reason="agent_blocked", driven_m=200.0,
                         outside_lanes_m=30.0, outside_route_m=10.0))
    assert r["scores"]["score_penalty"] == pytest.approx(0.8)
    assert r["infractions"]["outside_route_lanes"] == [
        "Agent went outside its route lanes for about 10.0 meters (20.0% of the completed route)"]


def test_tick_cap_reported_as_bench2drive_does():
    from craft.bench.metrics import score_route

    r = score_route(_log(progress_m=40.0, completed=False, end_reason="tick_cap"))
    assert r["status"] == "Failed - TickRuntime"
    assert r["infractions"]["route_timeout"] == [] and r["num_infractions"] == 0
    assert r["scores"]["score_penalty"] == 1.0 and r["scores"]["score_composed"] == 40.0
    r = score_route(_log(progress_m=40.0, completed=False, end_reason="route_timeout"))
    assert r["status"] == "Failed - Agent timed out" and r["infractions"]["route_timeout"] == ["Route timeout."]


@pytest.mark.slow
def test_scenario_placement_within_bench2drive_ranges():
    """The test split's straight-road events (the types Bench2Drive places with a distance parameter) sit
    where Bench2Drive's 220 routes put them: interaction median in 49-62 m from the start (its 10-90 %
    range), route after it median in 49-85 m; all routes 50-250 m."""
    import numpy as np

    from craft.scenarios.splits import split_specs

    types = ["Accident", "AccidentTwoWays", "ConstructionObstacle", "ConstructionObstacleTwoWays",
             "DynamicObjectCrossing", "HazardAtSideLane", "HazardAtSideLaneTwoWays", "ParkedObstacle",
             "ParkedObstacleTwoWays", "ParkingCrossingPedestrian", "StaticCutIn", "VehicleOpensDoorTwoWays"]
    insts = split_specs("test", types=types)
    inter = np.array([i.meta["span"]["interaction_m"] for i in insts])
    after = np.array([i.route_length for i in insts]) - inter
    assert 49.0 <= np.median(inter) <= 62.0
    assert 49.0 <= np.median(after) <= 85.0
    assert all(50.0 <= i.route_length <= 250.0 for i in insts)


def test_long_route_windows_per_chained_scenario():
    from craft.scenarios.base import TWO_WAYS_TYPES, TIMEOUT_TYPES, apply_windows, scenario_windows
    from craft.scenarios.splits import split_specs

    (inst,) = split_specs("long", routes=1)
    chain = inst.meta["chain"]
    w = scenario_windows([inst])
    assert w.start_m.shape == (1, len(chain))
    for j, c in enumerate(chain):
        sp = c["span"]
        assert float(w.start_m[0, j]) == pytest.approx(c["start_m"] + min(8.0, sp["interaction_m"]), abs=1e-3)
        assert (float(w.blocked_end_m[0, j]) > 0) == (c["type"] in TIMEOUT_TYPES)
        assert (float(w.wrong_dir_end_m[0, j]) > 0) == (c["type"] in TWO_WAYS_TYPES)

    class _S:
        def __init__(self, p):
            self.progress = torch.tensor(p)

        def replace(self, **kw):
            return kw

    for j, c in enumerate(chain):  # half way through each chained scenario's window
        mid = 0.5 * (float(w.start_m[0, j]) + c["start_m"] + c["span"]["end_m"])
        got = apply_windows(_S([mid]), w)
        if c["type"] in TIMEOUT_TYPES:
            assert bool(got["blocked_exempt"][0])
        if c["type"] in TWO_WAYS_TYPES:
            assert bool(got["wrong_dir_exempt"][0])
    before_all = apply_windows(_S([0.0]), w)  # the route start lies before every chained scenario
    assert not bool(before_all["blocked_exempt"][0]) and not bool(before_all["wrong_dir_exempt"][0])


def test_experiment_report_refuses_another_layout_in_one_line(tmp_path, capsys, expert_run):
    from craft.cli import main

    root = tmp_path / "exp"
    (root / "main-vocab").mkdir(parents=True)
    (root / "main-vocab" / "table.json").write_text(json.dumps({"runs": [], "evals": ["r1/eval-x"]}))
    (root / "main-vocab" / "table.md").write_text("# t\n")
    obj = json.loads((expert_run / "b2d" / "results.json").read_text())
    for r in obj["records"]:  # a record of the earlier layout: no Bench2Drive naming fields
        for k in ("save_name", "town_name", "weather_id"):
            r.pop(k)
    ev = root / "runs" / "r1" / "eval-x" / "b2d"
    ev.mkdir(parents=True)
    (ev / "results.json").write_text(json.dumps(obj))
    doc = tmp_path / "results.md"
    rc = main(["experiment", "report", "--out", str(root), "--doc", str(doc)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "is missing 'weather_id'" in err and "results.json" in err
    assert not doc.exists()
