"""Per-step ego events (craft.world.events) on small hand-built maps and hand-made states."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
import torch

from craft.errors import CraftError
from craft.world.events import EventConfig, update_events
from craft.world.kinds import AgentKind
from craft.world.map import (
    JunctionKind,
    LaneType,
    LightState,
    MapBatch,
    RawJunction,
    RawLane,
    RawLight,
    RawStop,
    RoadMap,
)
from craft.world.state import EndReason, Mode, StepEvents, WorldState, empty_state

W = 3.5  # lane width, m
CFG = EventConfig()
G, Y, R = int(LightState.GREEN), int(LightState.YELLOW), int(LightState.RED)
EGO_L, EGO_W = 4.9, 2.1
N = 4  # agents per world


def _lane(a, b, **kw):
    return RawLane(np.array([a, b], dtype=np.float64), kw.pop("width", W), 13.9, **kw)


def town() -> RoadMap:
    """An east-west two-way road through a signalised junction at x in [100, 120], plus a second road
    (y = 50) ending at a stop sign.

    lane 0: eastbound (0,0)->(100,0), light 0 at its end;  1: connector -> 2: eastbound (120,0)->(220,0)
    lane 3: westbound (220,3.5)->(120,3.5), light 2;        4: connector -> 5: westbound ->(0,3.5)
    lane 6: eastbound right of lane 0 at y=-3.5, light 1;   7: connector -> 8
    lane 9: shoulder at y=-6.5 (x 0..100);                  10: sidewalk at y=7.5
    lane 11: eastbound (0,50)->(60,50) with a stop sign;    12: connector -> 13: (80,50)->(150,50)
    """
    S = LaneType
    lanes = [
        _lane((0, 0), (100, 0), road=0, successors=[1], right=6, left_opposite=5),
        _lane((100, 0), (120, 0), junction=0, successors=[2]),
        _lane((120, 0), (220, 0), road=1, left_opposite=3),
        _lane((220, 3.5), (120, 3.5), road=2, successors=[4], left_opposite=2),
        _lane((120, 3.5), (100, 3.5), junction=0, successors=[5]),
        _lane((100, 3.5), (0, 3.5), road=3, left_opposite=0),
        _lane((0, -3.5), (100, -3.5), road=0, successors=[7], left=0),
        _lane((100, -3.5), (120, -3.5), junction=0, successors=[8]),
        _lane((120, -3.5), (220, -3.5), road=1),
        _lane((0, -6.5), (100, -6.5), width=2.5, type=S.SHOULDER, road=0),
        _lane((0, 7.5), (100, 7.5), width=2.0, type=S.SIDEWALK),
        _lane((0, 50), (60, 50), road=4, successors=[12]),
        _lane((60, 50), (80, 50), junction=1, successors=[13]),
        _lane((80, 50), (150, 50), road=5),
    ]
    junctions = [
        RawJunction((110.0, 0.0), 15.0, JunctionKind.SIGNAL),
        RawJunction((70.0, 50.0), 12.0, JunctionKind.STOP),
    ]
    lights = [RawLight(0, 0, 0), RawLight(6, 0, 0), RawLight(3, 0, 1)]
    stops = [RawStop(11, 1)]
    return RoadMap.build("events-town", lanes, junctions, lights, stops)


def plain_road() -> RoadMap:
    """One 80 m eastbound lane, nothing else (no lights, no stop signs)."""
    return RoadMap.build("plain", [_lane((0, 0), (80, 0), road=0)])


MAP = town()
MB = MapBatch([MAP, plain_road()])
K = MB.light_pos.shape[1]
Q = MB.stop_trigger.shape[1]
MAIN_ROUTE = [0, 1, 2]
STOP_ROUTE = [11, 12, 13]


def _route_points(m: RoadMap, lanes: list[int]) -> np.ndarray:
    pts = [m.lane_points(lanes[0])]
    for ln in lanes[1:]:
        pts.append(m.lane_points(ln)[1:])
    return np.concatenate(pts)


def make_state(worlds: list[tuple[int, list[int]]]) -> WorldState:
    """Worlds given as (map_id, route lanes); the ego is valid, at the route start, at rest."""
    maps = [MAP, plain_road()]
    routes = [_route_points(maps[m], lanes) for m, lanes in worlds]
    B, P = len(worlds), max(len(r) for r in routes)
    s = empty_state(B, N, K, Q, 3, P)
    s.valid[:, 0] = True
    s.kind[:, 0] = int(AgentKind.EGO)
    s.length[:, 0] = EGO_L
    s.width[:, 0] = EGO_W
    for b, ((m, lanes), r) in enumerate(zip(worlds, routes)):
        s.map_id[b] = m
        s.route_lanes[b, : len(lanes)] = torch.tensor(lanes)
        s.route_pts[b, : len(r)] = torch.from_numpy(r).float()
        cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(r, axis=0), axis=1))])
        s.route_cum[b, : len(r)] = torch.from_numpy(cum).float()
        s.route_valid[b, : len(r)] = True
        s.route_length[b] = float(cum[-1])
        s.pos[b, 0] = torch.from_numpy(r[0]).float()
        s.yaw[b, 0] = math.atan2(r[1, 1] - r[0, 1], r[1, 0] - r[0, 0])
    return s


def put(s: WorldState, b: int, n: int, x: float, y: float, yaw: float = 0.0, v: float = 0.0,
        kind: AgentKind | None = None) -> WorldState:
    """Place agent n of world b (in place on a state we own; tests build states this way)."""
    s.pos[b, n] = torch.tensor([x, y])
    s.yaw[b, n] = yaw
    s.speed[b, n] = v
    if n > 0:
        s.valid[b, n] = True
        if kind is not None:
            s.kind[b, n] = int(kind)
            s.mode[b, n] = 2
    return s


def moved(prev: WorldState, x, y, yaw=None, v=None) -> WorldState:
    """The state after one step in which the ego of every world went to (x, y) (scalars or (B,))."""
    B = prev.batch_size
    t = lambda a: torch.as_tensor(a, dtype=torch.float32).expand(B)  # noqa: E731
    pos = prev.pos.clone()
    pos[:, 0, 0], pos[:, 0, 1] = t(x), t(y)
    yw, sp = prev.yaw.clone(), prev.speed.clone()
    if yaw is not None:
        yw[:, 0] = t(yaw)
    if v is not None:
        sp[:, 0] = t(v)
    return prev.replace(pos=pos, yaw=yw, speed=sp, step=prev.step + 1)


def lights_of(B: int, *states: int) -> torch.Tensor:
    out = torch.full((B, K), G, dtype=torch.long)
    out[:, : len(states)] = torch.tensor(states)
    return out


def go(prev, x, y, yaw=None, v=None, lights=None, cfg=CFG, star=False, steps=1):
    """One step to (x, y) (``steps`` > 1: time jumps as if steps - 1 uneventful steps came first)."""
    prev = prev.replace(step=prev.step + (steps - 1))
    st = moved(prev, x, y, yaw, v)
    if lights is None:
        lights = lights_of(prev.batch_size)
    return update_events(MB, prev, st, lights, cfg, star)


def drive(s, xs, y, yaw=0.0, v=10.0, lights=None, cfg=CFG, star=False):
    """Drive the ego through xs (list), returning the final state and the list of events."""
    evs = []
    for x in xs:
        s, ev = go(s, x, y, yaw, v, lights, cfg, star)
        evs.append(ev)
    return s, evs


def count(evs, name, b=0):
    return sum(int(getattr(e, name)[b]) for e in evs)


# ---------------------------------------------------------------------- collisions
def test_collision_counted_and_classified():
    kinds = [AgentKind.PEDESTRIAN, AgentKind.CAR, AgentKind.TRUCK, AgentKind.BICYCLE, AgentKind.EMERGENCY,
             AgentKind.STATIC]
    s = make_state([(0, MAIN_ROUTE)] * len(kinds))
    for b, kd in enumerate(kinds):
        put(s, b, 0, 50, 0, v=5.0)
        put(s, b, 1, 53, 0, kind=kd)
    s2, ev = go(s, 50.5, 0.0, v=5.0)
    assert ev.collision_any.all()
    assert ev.collided_agent.tolist() == [1] * 6
    assert ev.collision_pedestrian.tolist() == [True, False, False, False, False, False]
    assert ev.collision_vehicle.tolist() == [False, True, True, True, True, False]
    assert ev.collision_layout.tolist() == [False, False, False, False, False, True]
    assert torch.allclose(s2.col_actor_time[:, 1], torch.full((6,), 0.1))
    assert torch.isinf(s2.col_actor_time[:, 2:]).all()
    assert torch.allclose(s2.col_last_pos, torch.tensor([50.5, 0.0]).expand(6, 2))


def test_collision_not_counted_below_min_speed():
    s = make_state([(0, MAIN_ROUTE)])
    put(s, 0, 1, 53, 0, kind=AgentKind.CAR)
    _, ev = go(s, 50.0, 0.0, v=0.05)
    assert ev.collision_any.item() and ev.collided_agent.item() == -1
    assert not (ev.collision_vehicle | ev.collision_pedestrian | ev.collision_layout).any()


def test_same_actor_ignored_for_five_seconds():
    s = make_state([(0, MAIN_ROUTE)])
    put(s, 0, 1, 53, 0, kind=AgentKind.CAR)
    s, ev = go(s, 50.0, 0.0, v=5.0)  # t = 0.1 s: counted
    assert ev.collision_vehicle.item()
    s.pos[0, 1, 0] = 63.0
    s, ev = go(s, 60.0, 0.0, v=5.0, steps=20)  # t = 2.1 s, 10 m away: same actor, ignored
    assert ev.collision_any.item() and not ev.collision_vehicle.item()
    s.pos[0, 1, 0] = 73.0
    s, ev = go(s, 70.0, 0.0, v=5.0, steps=40)  # t = 6.1 s: counted again
    assert ev.collision_vehicle.item() and ev.collided_agent.item() == 1


def test_other_actor_near_last_collision_ignored():
    s = make_state([(0, MAIN_ROUTE)])
    put(s, 0, 1, 53, 0, kind=AgentKind.CAR)
    s, ev = go(s, 50.0, 0.0, v=5.0)
    assert ev.collision_vehicle.item()
    s.valid[0, 1] = False
    put(s, 0, 2, 55, 0.5, kind=AgentKind.PEDESTRIAN)
    s, ev = go(s, 53.0, 0.0, v=5.0)  # 3 m from the last counted collision
    assert ev.collision_any.item() and not ev.collision_pedestrian.item()
    s.pos[0, 2] = torch.tensor([58.0, 0.5])
    s, ev = go(s, 56.0, 0.0, v=5.0)  # 6 m away: counted
    assert ev.collision_pedestrian.item() and ev.collided_agent.item() == 2


def test_one_collision_per_step_nearest_actor():
    s = make_state([(0, MAIN_ROUTE)])
    put(s, 0, 1, 53.5, 0, kind=AgentKind.CAR)
    put(s, 0, 2, 51.5, 0.5, kind=AgentKind.PEDESTRIAN)
    s2, ev = go(s, 50.0, 0.0, v=5.0)
    assert ev.collided_agent.item() == 2 and ev.collision_pedestrian.item() and not ev.collision_vehicle.item()
    assert torch.isinf(s2.col_actor_time[0, 1]) and s2.col_actor_time[0, 2] > 0


def test_b2d_star_ends_on_first_collision_b2d_does_not():
    s = make_state([(0, MAIN_ROUTE)])
    put(s, 0, 1, 53, 0, kind=AgentKind.CAR)
    s_star, ev_star = go(s, 50.0, 0.0, v=5.0, star=True)
    s_b2d, ev_b2d = go(s, 50.0, 0.0, v=5.0, star=False)
    assert ev_star.done.item() and ev_star.end_reason.item() == EndReason.COLLISION
    assert s_star.done.item() and s_star.end_reason.item() == EndReason.COLLISION
    assert not ev_b2d.done.item() and not s_b2d.done.item() and ev_b2d.collision_vehicle.item()
    # an uncounted overlap (too slow) does not end the route either
    _, ev = go(s, 50.0, 0.0, v=0.0, star=True)
    assert not ev.done.item()


# ---------------------------------------------------------------------- red lights
def test_red_light_rear_crossing_counts_once():
    s = make_state([(0, MAIN_ROUTE)])
    put(s, 0, 0, 80, 0, v=10.0)
    xs = list(np.arange(81.0, 116.0))
    s, evs = drive(s, xs, 0.0, lights=lights_of(1, R, G, G))
    hits = [x for x, e in zip(xs, evs) if e.red_light.item()]
    assert hits == [103.0]  # the rear (x - 2.45) passes the stop line at x = 100 between 102 and 103
    assert s.light_done[0].tolist() == [True, False, False]
    # back up and cross again: not counted twice
    s, evs = drive(s, [95.0] + list(np.arange(96.0, 110.0)), 0.0, lights=lights_of(1, R, G, G))
    assert count(evs, "red_light") == 0


def test_red_light_not_counted_on_green_or_yellow():
    for state in (G, Y):
        s = make_state([(0, MAIN_ROUTE)])
        put(s, 0, 0, 80, 0, v=10.0)
        s, evs = drive(s, np.arange(81.0, 116.0), 0.0, lights=lights_of(1, state, state, state))
        assert count(evs, "red_light") == 0 and not s.light_done.any()


def test_red_light_of_another_lane_not_counted():
    s = make_state([(0, MAIN_ROUTE)])
    put(s, 0, 0, 80, -3.5, v=10.0)  # ego on lane 6, whose light (1) is green; lane 0's light (0) is red
    _, evs = drive(s, np.arange(81.0, 116.0), -3.5, lights=lights_of(1, R, G, G))
    assert count(evs, "red_light") == 0
    _, evs = drive(s, np.arange(81.0, 116.0), -3.5, lights=lights_of(1, G, R, G))
    assert count(evs, "red_light") == 1


def test_red_light_wrong_heading_not_counted():
    s = make_state([(0, MAIN_ROUTE)])
    put(s, 0, 0, 80, 0, yaw=math.pi, v=10.0)  # driving backwards (heading west) across lane 0's stop line
    _, evs = drive(s, np.arange(81.0, 116.0), 0.0, yaw=math.pi, lights=lights_of(1, R, R, R))
    assert count(evs, "red_light") == 0


# ---------------------------------------------------------------------- stop signs
def test_stop_sign_pass_without_stopping_is_one_infraction():
    s = make_state([(0, STOP_ROUTE)])
    put(s, 0, 0, 40, 50, v=10.0)
    xs = list(np.arange(41.0, 75.0))
    s, evs = drive(s, xs, 50.0)
    hits = [x for x, e in zip(xs, evs) if e.stop_infraction.item()]
    assert hits == [61.0]  # trigger box covers x in [54, 60]
    assert not s.stop_inside.any() and not s.stop_ok.any()
    inside = [x for x, e in zip(xs, evs) if e.stop_zone.item()]
    assert inside == list(np.arange(54.0, 61.0))


def test_stop_sign_stop_then_go_is_clean():
    s = make_state([(0, STOP_ROUTE)])
    put(s, 0, 0, 40, 50, v=10.0)
    s, evs = drive(s, np.arange(41.0, 58.0), 50.0)
    s, ev = go(s, 58.0, 50.0, v=0.0)
    assert s.stop_ok[0, 0] and s.stop_inside[0, 0] and not ev.stop_zone.item()
    s, evs2 = drive(s, np.arange(59.0, 75.0), 50.0)
    assert count(evs + [ev] + evs2, "stop_infraction") == 0
    assert not s.stop_inside.any() and not s.stop_ok.any()


def test_stop_sign_wrong_heading_ignored():
    s = make_state([(0, STOP_ROUTE)])
    put(s, 0, 0, 70, 50, yaw=math.pi, v=10.0)
    _, evs = drive(s, np.arange(69.0, 40.0, -1.0), 50.0, yaw=math.pi)
    assert count(evs, "stop_infraction") == 0


# ---------------------------------------------------------------------- outside lanes / wrong direction
def test_outside_lanes_metres():
    s = make_state([(0, MAIN_ROUTE)] * 4)
    ys = torch.tensor([0.0, 7.5, -6.5, 1.5])  # in lane / on the sidewalk / on the shoulder / lane 0 + 1.5 m
    s.pos[:, 0, 0] = 20.0
    s.pos[:, 0, 1] = ys
    s, evs = drive(s, np.arange(21.0, 31.0), ys)
    out = [count(evs, "outside_lanes", b) for b in range(4)]
    assert torch.allclose(s.driven, torch.full((4,), 10.0))
    assert torch.allclose(s.driven_outside, torch.tensor([0.0, 10.0, 10.0, 0.0]))
    assert [bool(evs[-1].offroad[b]) for b in range(4)] == [False, True, False, False]
    assert [bool(evs[-1].emergency_lane[b]) for b in range(4)] == [False, False, True, False]
    assert out == [0, 10, 10, 0]


def test_wrong_direction_lane_counts_except_in_junctions():
    s = make_state([(0, MAIN_ROUTE)] * 3)
    # world 0: eastbound on the westbound lane 5; world 1: westbound on lane 5; world 2: eastbound through
    # the junction on the westbound connector 4 (not evaluated there)
    x0 = torch.tensor([20.0, 30.0, 104.0])
    yaw = torch.tensor([0.0, math.pi, 0.0])
    dx = torch.tensor([1.0, -1.0, 1.0])
    s.pos[:, 0, 0], s.pos[:, 0, 1], s.yaw[:, 0] = x0, 3.5, yaw
    evs = []
    for k in range(1, 11):
        s, ev = go(s, x0 + k * dx, 3.5, yaw, 10.0)
        evs.append(ev)
    assert torch.allclose(s.driven_outside, torch.tensor([10.0, 0.0, 0.0]))
    assert [count(evs, "opposite_lane", b) for b in range(3)] == [10, 0, 0]


# ---------------------------------------------------------------------- route progress and completion
def test_route_progress_is_monotone_and_completes():
    s = make_state([(0, MAIN_ROUTE)])
    length = float(s.route_length[0])
    assert length == pytest.approx(220.0, abs=1e-3)
    xs = list(np.arange(1.0, 51.0)) + list(np.arange(49.0, 29.0, -1.0)) + list(np.arange(31.0, 219.0))
    rc, prog = [], []
    for x in xs:
        s, ev = go(s, x, 0.0, v=10.0)
        rc.append(float(ev.route_completion[0]))
        prog.append(float(s.progress[0]))
        if ev.done.item():
            break
    assert all(b >= a for a, b in zip(rc, rc[1:]))
    assert rc[49] == pytest.approx(50.0 / length * 100, abs=0.5)  # at x = 50
    assert rc[69] == rc[49]  # backed up to x = 30: no progress lost or gained
    assert s.done.item() and s.end_reason.item() == EndReason.COMPLETED
    assert rc[-1] == 100.0 and float(s.progress[0]) == pytest.approx(length)
    assert float(s.pos[0, 0, 0]) > 0.99 * length  # completes only once past 99 %


def test_completion_needs_both_99_percent_and_10_m():
    s = make_state([(0, MAIN_ROUTE)] * 2)
    s.progress_idx[:] = 215
    s.progress[:] = 215.0
    # world 0: within 10 m of the end but RC = 97.7 %; world 1: RC > 99 % but 12 m from the last point
    s.progress_idx[1] = 219
    s.progress[1] = 219.0
    s2, ev = go(s, torch.tensor([215.5, 219.0]), torch.tensor([0.0, -12.0]), v=5.0)
    assert not ev.done.any()
    assert ev.route_completion[0] < 99.0 and 99.0 < ev.route_completion[1] < 100.0
    s3, ev = go(s2, torch.tensor([216.0, 219.0]), torch.tensor([0.0, -9.9]), v=5.0)
    assert ev.done.tolist() == [False, True] and ev.route_completion[1] == 100.0
    assert s3.end_reason.tolist() == [EndReason.RUNNING, EndReason.COMPLETED]
    assert not ev.go_zone[1]


def test_completion_wins_over_collision_in_the_same_step():
    s = make_state([(0, MAIN_ROUTE)])
    s.progress_idx[:] = 218
    s.progress[:] = 218.0
    put(s, 0, 0, 218, 0, v=5.0)
    put(s, 0, 1, 222, 0, kind=AgentKind.CAR)
    s2, ev = go(s, 219.0, 0.0, v=5.0, star=True)
    assert ev.collision_vehicle.item() and ev.end_reason.item() == EndReason.COMPLETED


# ---------------------------------------------------------------------- route-ending rules
def test_route_deviation_by_distance():
    s = make_state([(0, MAIN_ROUTE)] * 2)
    s2, ev = go(s, 50.0, torch.tensor([-29.0, -31.0]), v=5.0)
    assert ev.done.tolist() == [False, True]
    assert s2.end_reason.tolist() == [EndReason.RUNNING, EndReason.ROUTE_DEVIATION]
    assert ev.offroute.tolist() == [True, True]
    assert ev.route_dist.tolist() == pytest.approx([29.0, 31.0])


def test_route_deviation_by_far_driving():
    s = make_state([(0, MAIN_ROUTE)])
    put(s, 0, 0, 0, -16, v=10.0)
    ended = None
    for k in range(1, 100):
        s, ev = go(s, float(k), -16.0, v=10.0)
        if ev.done.item():
            ended = k
            break
    # 30 % of 220 m = 66 m driven while more than 15 m from the route
    assert ended == 67 and s.end_reason.item() == EndReason.ROUTE_DEVIATION


def test_agent_blocked_after_60_s():
    s = make_state([(0, MAIN_ROUTE)])
    ended = None
    for k in range(1, 700):
        s, ev = go(s, 0.0, 0.0, v=0.0)
        if ev.done.item():
            ended = k
            break
    assert ended == 600 and s.end_reason.item() == EndReason.BLOCKED
    # moving resets the timer
    s = make_state([(0, MAIN_ROUTE)])
    s.blocked_time[:] = 59.0
    s2, ev = go(s, 1.0, 0.0, v=1.0)
    assert s2.blocked_time.item() == 0.0 and not ev.done.item()


def test_route_timeout_and_tick_cap():
    s = make_state([(0, MAIN_ROUTE)] * 2)
    s.step[:] = torch.tensor([1998, 2000])  # elapsed after the step: 199.9 s, 200.1 s
    _, ev = go(s, 0.0, 0.0, v=1.0)
    assert ev.done.tolist() == [False, True] and ev.end_reason.tolist() == [0, EndReason.TICK_CAP]
    cfg = EventConfig(tick_cap=1e9)
    limit = 300.0 + 220.0 / 1.39  # 458.27 s
    s.step[:] = torch.tensor([int(limit / 0.1) - 2, int(limit / 0.1) + 1])
    _, ev = go(s, 0.0, 0.0, v=1.0, cfg=cfg)
    assert ev.done.tolist() == [False, True] and ev.end_reason.tolist() == [0, EndReason.ROUTE_TIMEOUT]


# ---------------------------------------------------------------------- flags
def test_stop_and_go_zones():
    s = make_state([(0, MAIN_ROUTE)] * 5)
    xs = torch.tensor([90.0, 70.0, 90.0, 90.0, 90.0])
    s.pos[:, 0, 0] = xs - 1.0
    put(s, 3, 1, 98.0, 0.0, kind=AgentKind.CAR)  # a car 8 m ahead in the corridor
    put(s, 4, 1, 98.0, 3.5, kind=AgentKind.CAR)  # a car in the next lane: not in the corridor
    lights = torch.full((5, K), G)
    lights[:2, 0] = R
    lights[2, 0] = Y
    _, ev = go(s, xs, 0.0, v=10.0, lights=lights)
    # braking distance at 10 m/s: 100 / 8 + 5 = 17.5 m before the stop line (front at x + 2.45)
    assert ev.stop_zone.tolist() == [True, False, True, False, False]
    assert ev.go_zone.tolist() == [False, True, False, False, True]


def test_kinematics_background_and_distances():
    s = make_state([(0, MAIN_ROUTE)] * 2)
    put(s, 0, 0, 20.0, 0.0, yaw=0.0, v=5.0)
    put(s, 1, 0, 20.0, 0.0, yaw=0.0, v=5.0)
    put(s, 0, 1, 40.0, -3.5, v=6.0, kind=AgentKind.CAR)
    put(s, 0, 2, 30.0, 7.5, v=1.0, kind=AgentKind.PEDESTRIAN)
    put(s, 0, 3, 90.0, 0.0, v=20.0, kind=AgentKind.TRUCK)  # 70 m away: not background
    s.mode[0, 1:4] = Mode.LANE  # moving traffic
    s.mode[1, 1:] = Mode.LANE
    put(s, 1, 1, 35.0, 3.5, v=0.0, kind=AgentKind.EMERGENCY)  # parked (STATIC mode): not traffic
    s.mode[1, 1] = Mode.STATIC
    _, ev = go(s, 20.5, 0.4, yaw=0.05, v=6.0)
    assert ev.speed.tolist() == pytest.approx([6.0, 6.0])
    assert ev.accel.tolist() == pytest.approx([10.0, 10.0], rel=1e-4)
    assert ev.yaw_rate.tolist() == pytest.approx([0.5, 0.5], rel=1e-4)
    assert ev.background_speed[0].item() == pytest.approx(6.0)
    assert math.isnan(ev.background_speed[1].item())
    assert ev.route_dist.tolist() == pytest.approx([0.4, 0.4], abs=1e-5)
    assert ev.lane_center_dist.tolist() == pytest.approx([0.4, 0.4], abs=1e-5)
    assert ev.heading_error.tolist() == pytest.approx([0.05, 0.05], abs=1e-5)
    assert ev.driven.tolist() == pytest.approx([math.hypot(0.5, 0.4)] * 2)
    # yaw rate wraps around +-pi
    s.yaw[:, 0] = math.pi - 0.01
    _, ev = go(s, 20.0, 0.0, yaw=-math.pi + 0.01, v=5.0)
    assert ev.yaw_rate.tolist() == pytest.approx([0.2, 0.2], abs=1e-3)


def test_offroad_far_from_any_lane_is_finite():
    s = make_state([(0, MAIN_ROUTE)])
    _, ev = go(s, 50.0, -20.0, v=5.0)
    assert ev.offroad.item() and ev.offroute.item() and not ev.emergency_lane.item()
    assert ev.lane_center_dist.item() == CFG.lane_dist_cap
    assert ev.outside_lanes.item() > 0


# ---------------------------------------------------------------------- bookkeeping semantics
def test_done_worlds_stay_frozen():
    s = make_state([(0, MAIN_ROUTE)])
    put(s, 0, 0, 101.5, 0, v=10.0)
    put(s, 0, 1, 106.0, 0, kind=AgentKind.CAR)
    s.done[:] = True
    s.end_reason[:] = EndReason.BLOCKED
    s.blocked_time[:] = 3.0
    s2, ev = go(s, 103.0, 0.0, v=10.0, lights=lights_of(1, R, R, R), star=True)
    for f in fields(StepEvents):
        v = getattr(ev, f.name)
        if v.dtype == torch.bool:
            assert not v.any(), f.name
    assert ev.collided_agent.item() == -1 and ev.progress.item() == 0 and ev.driven.item() == 0
    assert ev.end_reason.item() == EndReason.RUNNING
    for name in ("progress", "progress_idx", "col_actor_time", "col_last_pos", "light_done", "stop_inside",
                 "stop_ok", "blocked_time", "driven", "driven_outside", "driven_far", "done", "end_reason"):
        assert torch.equal(getattr(s2, name), getattr(s, name)) or (
            getattr(s2, name).isnan().all() and getattr(s, name).isnan().all()
        ), name
    assert torch.equal(s2.pos, moved(s, 103.0, 0.0).pos)  # the physical state is the input's


def test_inputs_not_modified():
    s = make_state([(0, MAIN_ROUTE)])
    put(s, 0, 0, 101.5, 0, v=10.0)
    put(s, 0, 1, 106.0, 0, kind=AgentKind.CAR)
    st = moved(s, 103.0, 0.0, v=10.0)
    lights = lights_of(1, R, R, R)
    before = [t.clone() for t in s.tensors().values()] + [t.clone() for t in st.tensors().values()]
    update_events(MB, s, st, lights, CFG, True)
    after = list(s.tensors().values()) + list(st.tensors().values())
    for a, b in zip(before, after):
        assert torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))


def _scenario_batch():
    """Six worlds on two maps, each with its own trajectory: (state, xs (T, B), ys (T, B), v (T, B))."""
    worlds = [(0, MAIN_ROUTE), (0, MAIN_ROUTE), (0, STOP_ROUTE), (0, MAIN_ROUTE), (1, [0]), (0, MAIN_ROUTE)]
    s = make_state(worlds)
    T = 40
    k = torch.arange(1, T + 1, dtype=torch.float32)[:, None]
    x0 = torch.tensor([80.0, 40.0, 40.0, 10.0, 10.0, 0.0])
    y = torch.tensor([0.0, 0.0, 50.0, 7.5, 0.0, -25.0])
    dx = torch.tensor([1.0, 0.5, 1.0, 1.0, 2.0, 0.3])
    xs = x0 + k * dx
    ys = y.expand(T, 6).clone()
    ys[20:, 5] = -31.0  # world 5 deviates
    vs = (dx * 10).expand(T, 6).clone()
    vs[10:20, 4] = 0.0
    s.pos[:, 0, 0], s.pos[:, 0, 1] = x0, y
    put(s, 1, 1, 50.0, 0.0, kind=AgentKind.CAR)  # world 1 runs into a parked car
    put(s, 1, 2, 52.0, 2.0, kind=AgentKind.PEDESTRIAN, v=1.0)
    put(s, 3, 1, 30.0, 0.0, kind=AgentKind.TRUCK, v=8.0)
    s.col_last_pos[3] = torch.tensor([5.0, 5.0])
    return s, xs, ys, vs


def _run(s, xs, ys, vs, lights, star):
    out = []
    for t in range(xs.shape[0]):
        s, ev = go(s, xs[t], ys[t], None, vs[t], lights, CFG, star)
        out.append(ev)
    return s, out


@pytest.mark.parametrize("star", [False, True])
def test_batch_equals_each_world_alone(star):
    s, xs, ys, vs = _scenario_batch()
    lights = lights_of(6, R, G, G)
    sb, evb = _run(s, xs, ys, vs, lights, star)
    assert sum(int(e.red_light[0]) for e in evb) == 1
    assert sum(int(e.collision_vehicle[1]) for e in evb) == 1
    assert sum(int(e.stop_infraction[2]) for e in evb) == 1
    assert sb.end_reason[5] == EndReason.ROUTE_DEVIATION
    for b in range(6):
        idx = torch.tensor([b])
        s1, ev1 = _run(s.index(idx), xs[:, b : b + 1], ys[:, b : b + 1], vs[:, b : b + 1], lights[idx], star)
        for name, t in s1.tensors().items():
            assert t.shape == getattr(sb, name)[idx].shape, (b, name)
            assert torch.allclose(t.float().nan_to_num(-7.0), getattr(sb, name)[idx].float().nan_to_num(-7.0),
                                  atol=1e-5), (b, name)
        for e1, eb in zip(ev1, evb):
            for f in fields(StepEvents):
                a, c = getattr(e1, f.name), getattr(eb, f.name)[idx]
                assert a.shape == c.shape == (1,), (b, f.name)
                assert torch.allclose(a.float().nan_to_num(-7.0), c.float().nan_to_num(-7.0), atol=1e-5), (b, f.name)


def test_bookkeeping_keeps_shapes_and_dtypes():
    s, xs, ys, vs = _scenario_batch()
    st, ev = go(s, xs[0], ys[0], None, vs[0], lights_of(6, R, G, G))
    for name, t in s.tensors().items():
        out = getattr(st, name)
        assert out.shape == t.shape and out.dtype == t.dtype, name
    for f in fields(StepEvents):
        assert getattr(ev, f.name).shape == (6,), f.name


def test_shape_errors():
    s = make_state([(0, MAIN_ROUTE)])
    with pytest.raises(CraftError, match="lights"):
        update_events(MB, s, moved(s, 1.0, 0.0), torch.zeros(1, K + 1, dtype=torch.long), CFG, False)
    bad = s.replace(light_done=torch.zeros(1, K + 2, dtype=torch.bool))
    with pytest.raises(CraftError, match="light"):
        update_events(MB, bad, moved(bad, 1.0, 0.0), lights_of(1), CFG, False)


def test_config_defaults_match_bench2drive():
    c = EventConfig()
    assert (c.dt, c.collision_min_speed, c.same_actor_window, c.same_place_radius) == (0.1, 0.1, 5.0, 5.0)
    assert (c.red_light_radius, c.stop_speed, c.outside_margin, c.wrong_direction_deg) == (15.0, 0.1, 0.5, 120.0)
    assert (c.deviation_dist, c.far_dist, c.far_fraction, c.blocked_speed, c.blocked_time) == (30, 15, 0.3, 0.1, 60)
    assert (c.route_timeout_base, c.route_timeout_speed, c.tick_cap) == (300.0, 1.39, 200.0)
    assert (c.completion_fraction, c.completion_radius) == (0.99, 10.0)
    with pytest.raises(Exception):
        c.dt = 0.05  # frozen
    with pytest.raises(CraftError, match="dt"):
        EventConfig(dt=0.0)
    with pytest.raises(CraftError, match="progress_window"):
        EventConfig(progress_window=0)
