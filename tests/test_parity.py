"""Bench2Drive parity: a route's record does not depend on its batch; the official results layout."""

from __future__ import annotations

import json

import pytest

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


def test_route_record_does_not_depend_on_its_batch(tmp_path):
    """The same route under other --types / --routes / --batch-size (and with the row dropping of a batch of
    16) gives the same record, byte for byte (only ``index``, the position in the file, differs)."""
    runs = {"big": (["Accident", "HardBreakRoute", "ControlLoss", "PedestrianCrossing"], 4, 16),
            "alone": (["ControlLoss"], 2, 1),
            "mixed": (["HardBreakRoute", "ControlLoss"], 3, 5)}
    recs = {}
    for name, (types, routes, bs) in runs.items():
        evaluate(LaneFollow(), "test", tmp_path / name, EvalConfig(batch_size=bs, max_steps=200), routes=routes,
                 types=types)
        recs[name] = _records(tmp_path / name)
    assert len(recs["big"]) == 16
    compared = 0
    for name in ("alone", "mixed"):
        for rid, rec in recs[name].items():
            assert json.dumps(rec, sort_keys=True) == json.dumps(recs["big"][rid], sort_keys=True), (name, rid)
            compared += 1
    assert compared == 8
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
