"""Bench2Drive metrics on hand-built route logs with hand-computed scores."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from craft.bench import metrics as M
from craft.bench.metrics import RouteLog, aggregate, comfort, efficiency, results_json, savgol, score_route
from craft.bench.report import ability_bar_chart, per_type_table, summary_markdown
from craft.errors import CraftError


def ev(t=1.0, x=0.0, y=0.0, **kw):
    return {"t": t, "x": x, "y": y, **kw}


def log(**kw) -> RouteLog:
    """A completed 100 m route with no infraction unless overridden."""
    base = dict(route_id="RouteScenario_0_rep0", scenario_type="Accident", town_seed=0, route_length_m=100.0,
                progress_m=100.0, completed=True, end_reason="completed", driven_m=100.0)
    base.update(kw)
    return RouteLog(**base)


# ---------------------------------------------------------------------- tables
def test_tables():
    assert len(M.SCENARIO_TYPES) == 44 and len(set(M.SCENARIO_TYPES)) == 44
    assert {len(v) for v in M.ABILITIES.values()} == {16, 9, 12, 2, 19}
    assert set().union(*M.ABILITIES.values()) == set(M.SCENARIO_TYPES)
    starred = set(M.ABILITIES["Traffic_Signs"]) - {"T_Junction", "VanillaNonSignalizedTurn",
                                                   "VanillaSignalizedTurnEncounterGreenLight",
                                                   "VanillaSignalizedTurnEncounterRedLight",
                                                   "VanillaNonSignalizedTurnEncounterStopsign"}
    assert starred <= set(M.ABILITIES["Merging"]) | set(M.ABILITIES["Emergency_Brake"]) and len(starred) == 14
    assert M.PENALTY["collisions_layout"] == 0.65 and "min_speed_infractions" not in M.PENALTY


# ---------------------------------------------------------------------- per route
def test_multiplicative_penalties():
    r = score_route(log(infractions={"collisions_vehicle": [ev(other_kind="CAR")], "red_light": [ev(t=2.0)]}))
    assert r["scores"]["score_penalty"] == pytest.approx(0.42)
    assert r["scores"]["score_composed"] == pytest.approx(42.0)
    assert r["status"] == "Completed" and not r["meta"]["success"]
    assert "type=CAR" in r["infractions"]["collisions_vehicle"][0]
    r = score_route(log(infractions={"collisions_pedestrian": [ev(), ev(t=9.0)]}))
    assert r["scores"]["score_penalty"] == pytest.approx(0.25)
    r = score_route(log(infractions={"collisions_layout": [ev()], "stop_infraction": [ev()]},
                        scenario_timeout=True, yield_emergency_failed=True))
    assert r["scores"]["score_penalty"] == pytest.approx(0.65 * 0.8 * 0.7 * 0.7)
    assert len(r["infractions"]["scenario_timeouts"]) == 1


def test_outside_lanes_factor():
    r = score_route(log(driven_m=200.0, outside_lanes_m=20.0))
    assert r["scores"]["score_penalty"] == pytest.approx(0.9)
    assert r["infractions"]["outside_route_lanes"][0].split(" ")[8] == "20.0"  # the leaderboard parses this
    r = score_route(log(driven_m=200.0, outside_lanes_m=20.0, infractions={"red_light": [ev()]}))
    assert r["scores"]["score_penalty"] == pytest.approx(0.63)


def test_rc_rule_and_rounding():
    assert score_route(log(progress_m=99.5, completed=True))["scores"]["score_route"] == 100.0
    r = score_route(log(progress_m=99.5, completed=False, end_reason="route_timeout"))
    assert r["scores"]["score_route"] == 99.5 and r["status"] == "Failed - Agent timed out"
    assert r["infractions"]["route_timeout"] == ["Route timeout."]
    r = score_route(log(route_length_m=300.0, progress_m=100.0, completed=False, end_reason="agent_blocked"))
    assert r["scores"]["score_route"] == 33.33 and r["status"] == "Failed - Agent got blocked"
    assert r["scores"]["score_composed"] == pytest.approx(33.33)
    r = score_route(log(progress_m=99.996, completed=False, end_reason="route_deviation"))
    assert r["scores"]["score_route"] == 99.99 and r["status"] == "Failed - Agent deviated from the route"
    assert not r["meta"]["success"] and r["infractions"]["route_dev"]


def test_success_rule():
    ms = {"min_speed_infractions": []}
    ok = score_route(log(infractions=ms, checkpoint_speeds=_speeds(100.0, 5.0, 10.0)))
    assert ok["infractions"]["min_speed_infractions"] and ok["status"] == "Completed"
    assert ok["meta"]["success"] and M.is_success(ok)
    perfect = score_route(log())
    assert perfect["status"] == "Perfect" and perfect["meta"]["success"]
    for bad in ({"infractions": {"stop_infraction": [ev()]}}, {"outside_lanes_m": 0.5},
                {"scenario_timeout": True}, {"progress_m": 80.0, "completed": False, "end_reason": "tick_cap"}):
        assert not score_route(log(**bad))["meta"]["success"], bad


def test_bad_logs_raise():
    with pytest.raises(CraftError, match="end_reason"):
        score_route(log(end_reason="exploded"))
    with pytest.raises(CraftError, match="unknown infraction key"):
        score_route(log(infractions={"collision": [ev()]}))
    with pytest.raises(CraftError, match="protocol"):
        score_route(log(), protocol="carla")


# ---------------------------------------------------------------------- protocols
def test_b2d_vs_b2d_star():
    n = 200  # 20 s at 10 Hz, progress linear to 100 m; collision at step 80 (t = 8.1 s, 40 % progress)
    prog = np.linspace(0.5, 100.0, n)
    cs = {"ego_speed": np.full(n, 5.0), "background_speed": np.full(n, np.nan), "progress_m": prog}
    infr = {"collisions_vehicle": [ev(t=8.1, other_kind="CAR", progress_m=40.0)], "red_light": [ev(t=15.0)]}
    lg = log(infractions=infr, checkpoint_speeds=cs)
    b2d = score_route(lg, "b2d")
    assert b2d["scores"]["score_route"] == 100.0
    assert b2d["scores"]["score_composed"] == pytest.approx(100 * 0.6 * 0.7)
    star = score_route(lg, "b2d-star")
    assert star["scores"]["score_route"] == 40.0
    assert star["scores"]["score_penalty"] == pytest.approx(0.6)  # the later red light never happened
    assert star["scores"]["score_composed"] == pytest.approx(24.0)
    assert star["status"] == "Failed - Agent collided against an object" and not star["meta"]["success"]
    assert star["meta"]["duration_game"] == pytest.approx(8.1)
    # without progress_m in the event, the per-step progress at the event's step is used
    infr2 = {"collisions_vehicle": [ev(t=8.1, other_kind="CAR")]}
    star2 = score_route(log(infractions=infr2, checkpoint_speeds=cs), "b2d-star")
    assert star2["scores"]["score_route"] == pytest.approx(round(prog[80], 2))
    with pytest.raises(CraftError, match="progress_m"):
        score_route(log(infractions=infr2), "b2d-star")
    # a log the world already cut is scored as is
    cut = log(progress_m=40.0, completed=False, end_reason="collision", infractions=infr2)
    assert score_route(cut, "b2d-star")["scores"]["score_composed"] == pytest.approx(24.0)


# ---------------------------------------------------------------------- efficiency and comfort
def _speeds(length, ego, bg, frac=1.0, n=200):
    return {"ego_speed": np.full(n, ego), "background_speed": np.full(n, bg),
            "progress_m": np.linspace(0.0, frac * length * (1 - 1e-9), n)}


def test_efficiency():
    assert efficiency(log(checkpoint_speeds=_speeds(100.0, 5.0, 10.0))) == pytest.approx(50.0)
    assert efficiency(log(checkpoint_speeds=_speeds(100.0, 5.0, np.nan))) == pytest.approx(100.0)
    assert efficiency(log()) is None
    # half the route with background, half without: checkpoints 0-9 at 50, 10-19 at 100
    cs = _speeds(100.0, 5.0, 10.0)
    cs["background_speed"][100:] = np.nan
    assert efficiency(log(checkpoint_speeds=cs)) == pytest.approx(75.0)
    # only the first 5 of 20 checkpoints reached: mean over those
    lg = log(progress_m=25.0, completed=False, end_reason="agent_blocked",
             checkpoint_speeds=_speeds(100.0, 20.0, 10.0, frac=0.25))
    assert efficiency(lg) == pytest.approx(200.0)
    # Bench2Drive records only fully passed checkpoints (25 m passes 4 of 5 m; the 5th would need > 25 m)
    assert len(score_route(lg)["infractions"]["min_speed_infractions"]) == 4


def test_savgol_reproduces_polynomials():
    t = np.arange(25) * 0.1
    y = 2.0 - 1.5 * t + 4.0 * t**2
    np.testing.assert_allclose(savgol(y, 7, 2), y, atol=1e-10)
    np.testing.assert_allclose(savgol(y, 7, 2, deriv=1, delta=0.1), -1.5 + 8.0 * t, atol=1e-9)
    np.testing.assert_allclose(savgol(y, 7, 2, deriv=2, delta=0.1), np.full_like(t, 8.0), atol=1e-7)
    # a noisy sample is smoothed: the centre weight of the 7/2 filter is 7/21
    spike = np.zeros(15)
    spike[7] = 1.0
    assert savgol(spike)[7] == pytest.approx(7 / 21)
    with pytest.raises(CraftError):
        savgol(np.zeros(5), 7, 2)


def test_savgol_matches_scipy_if_available():
    signal = pytest.importorskip("scipy.signal")
    y = np.random.default_rng(0).normal(size=40)
    for deriv in (0, 1):
        np.testing.assert_allclose(savgol(y, 7, 2, deriv=deriv, delta=0.1),
                                   signal.savgol_filter(y, 7, 2, deriv=deriv, delta=0.1), atol=1e-10)


def test_comfort():
    n = 100  # 10 s: 5 chunks
    smooth = {"accel_lon": np.zeros(n), "accel_lat": np.zeros(n), "yaw_rate": np.zeros(n), "speed": np.full(n, 8.0)}
    assert comfort(log(kinematics=smooth)) == 1.0
    jerky = {k: v.copy() for k, v in smooth.items()}
    jerky["accel_lon"][25:35] = 2.0  # a 2 m/s^2 step in and out inside chunk 1: jerk ~ 20 m/s^3
    assert comfort(log(kinematics=jerky)) == pytest.approx(0.8)
    weaving = {k: v.copy() for k, v in smooth.items()}
    weaving["yaw_rate"] = 0.5 * np.sin(np.arange(n) * 0.1 * 2 * math.pi)  # 1 Hz: yaw accel ~ 3.1 rad/s^2
    assert comfort(log(kinematics=weaving)) < 0.5
    # a short route is one chunk; an incomplete last chunk is ignored
    assert comfort(log(kinematics={k: v[:12] for k, v in smooth.items()})) == 1.0
    bumpy_tail = {k: v[:50].copy() for k, v in smooth.items()}
    bumpy_tail["accel_lon"][45] = 5.0
    assert comfort(log(kinematics=bumpy_tail)) == 1.0
    assert comfort(log()) is None


# ---------------------------------------------------------------------- aggregate
def _rec(scenario, rc_progress=100.0, completed=True, route_id="r", **kw):
    return score_route(log(route_id=route_id, scenario_type=scenario, progress_m=rc_progress, completed=completed,
                           end_reason="completed" if completed else kw.pop("end_reason", "route_timeout"), **kw))


def test_aggregate_ds_sr_over_num_routes():
    recs = [_rec("Accident", route_id="RouteScenario_1_rep0"),
            _rec("HighwayExit", route_id="RouteScenario_2_rep0", infractions={"collisions_vehicle": [ev(other_kind="CAR")]}),
            _rec("InvadingTurn", 50.0, completed=False, route_id="RouteScenario_3_rep0"),
            M.crashed_record("d", "ControlLoss", 0, 100.0)]
    s = aggregate(recs, num_routes=5, protocol="b2d", split="dev", town_seeds=[0, 1], policy="rule")
    assert s["DS"] == pytest.approx((100 + 60 + 50 + 0 + 0) / 5)
    assert s["SR"] == pytest.approx(100 * 1 / 5)
    assert s["RC"] == pytest.approx((100 + 100 + 50) / 3)
    assert s["IS"] == pytest.approx((1 + 0.6 + 1) / 3)
    assert set(s) == set(M.SUMMARY_KEYS)
    assert s["abilities"]["Overtaking"] == 100.0 and s["abilities"]["Merging"] == 0.0
    assert s["abilities"]["Give_Way"] == 0.0 and s["abilities"]["Emergency_Brake"] == 0.0  # crashed = failed
    assert s["abilities"]["Traffic_Signs"] is None
    assert s["abilities"]["Mean"] == pytest.approx(25.0)
    with pytest.raises(CraftError, match="num_routes"):
        aggregate(recs, num_routes=3)


def test_abilities_traffic_signs_partial_credit():
    failed_past = _rec("T_Junction", 60.0, completed=False, first_junction_progress_m=40.0,
                       infractions={"collisions_vehicle": [ev()]}, route_id="1")
    failed_short = _rec("T_Junction", 45.0, completed=False, first_junction_progress_m=40.0, route_id="2")
    red = _rec("T_Junction", 60.0, completed=False, first_junction_progress_m=40.0,
               infractions={"red_light": [ev()]}, route_id="3")
    ok = _rec("VanillaNonSignalizedTurn", first_junction_progress_m=40.0, route_id="4")
    starred = _rec("PedestrianCrossing", 60.0, completed=False, first_junction_progress_m=40.0, route_id="5")
    s = aggregate([failed_past, failed_short, red, ok, starred], num_routes=5)
    ab = s["abilities"]
    assert ab["Traffic_Signs"] == pytest.approx(100 * 3 / 5)  # failed_past, ok, starred
    assert ab["Emergency_Brake"] == 0.0  # the starred route gets no partial credit outside Traffic_Signs
    assert ab["Mean"] == pytest.approx((60.0 + 0.0) / 2)
    exact = _rec("T_Junction", 48.0, completed=False, first_junction_progress_m=40.0, route_id="6")
    assert aggregate([exact], 1)["abilities"]["Traffic_Signs"] == 100.0  # exactly junction + 8 m counts


def test_infractions_per_km():
    a = _rec("Accident", route_id="RouteScenario_1_rep0", infractions={"collisions_vehicle": [ev(), ev(t=9.0)], "red_light": [ev()]},
             driven_m=100.0, outside_lanes_m=10.0)
    b = _rec("Accident", 50.0, completed=False, route_id="RouteScenario_2_rep0", route_length_m=200.0, end_reason="agent_blocked")
    s = aggregate([a, b], num_routes=2)
    km = (100 * 1.0 + 200 * 0.25) / 1000  # route km completed, as the leaderboard's global record
    assert s["infractions_per_km"]["collisions_vehicle"] == pytest.approx(round(2 / km, 3))
    assert s["infractions_per_km"]["red_light"] == pytest.approx(round(1 / km, 3))
    assert s["infractions_per_km"]["vehicle_blocked"] == pytest.approx(round(1 / km, 3))
    assert s["infractions_per_km"]["collisions_pedestrian"] == 0.0
    assert s["infractions_per_km"]["outside_route_lanes"] == pytest.approx(0.01)  # km outside, not divided


def test_efficiency_comfort_aggregate():
    n = 100
    kin = {"accel_lon": np.zeros(n), "accel_lat": np.zeros(n), "yaw_rate": np.zeros(n)}
    a = score_route(log(route_id="RouteScenario_1_rep0", checkpoint_speeds=_speeds(100.0, 5.0, 10.0), kinematics=kin))
    b = score_route(log(route_id="RouteScenario_2_rep0", checkpoint_speeds=_speeds(100.0, 5.0, np.nan)))
    s = aggregate([a, b], num_routes=2)
    assert s["efficiency"] == pytest.approx(75.0)
    assert s["comfort"] == pytest.approx(100.0)


# ---------------------------------------------------------------------- results file and reports
def test_results_json_roundtrip_and_validation(tmp_path):
    recs = [_rec("Accident", route_id="RouteScenario_1_rep0", infractions={"red_light": [ev()]}),
            M.crashed_record("RouteScenario_2_rep0", "HighwayExit", 3)]
    s = aggregate(recs, num_routes=2, protocol="b2d-star", split="smoke", town_seeds=[3], policy="expert")
    out = results_json(s, recs)
    assert [r["index"] for r in out["records"]] == [0, 1]
    assert out["_checkpoint"]["records"][1]["status"] == "Failed - Simulation crashed"
    loaded = json.loads(json.dumps(out))
    M.validate_results(loaded)
    assert aggregate(loaded["records"], 2, "b2d-star")["DS"] == pytest.approx(s["DS"])
    broken = json.loads(json.dumps(out))
    del broken["records"][1]["scores"]["score_penalty"]
    with pytest.raises(CraftError, match="score_penalty"):
        M.validate_results(broken)
    broken = json.loads(json.dumps(out))
    del broken["summary"]["SR"]
    with pytest.raises(CraftError, match="'SR'"):
        M.validate_results(broken)
    broken = json.loads(json.dumps(out))
    broken["records"][0]["infractions"]["red_light"] = "oops"
    with pytest.raises(CraftError, match="red_light"):
        M.validate_results(broken)


def test_reports(tmp_path):
    recs = [_rec("Accident", route_id="RouteScenario_1_rep0"), _rec("Accident", 50.0, completed=False, route_id="RouteScenario_2_rep0"),
            _rec("T_Junction", route_id="RouteScenario_3_rep0")]
    s = aggregate(recs, num_routes=3, split="dev", town_seeds=[0], policy="rule")
    table = per_type_table(recs)
    assert table["Accident"] == {"routes": 2, "success": 1, "DS": pytest.approx(75.0)}
    md = summary_markdown(s, table)
    assert "| Accident | 2 | 1 | 50.0 | 75.00 |" in md and "Traffic_Signs" in md and "collisions_vehicle" in md
    path = tmp_path / "abilities.png"
    assert ability_bar_chart(s, str(path)) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")] == []
