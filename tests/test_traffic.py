"""Reactive traffic: IDM against its closed form, car following, lights, stop signs, yielding, lane changes."""

from __future__ import annotations

import math

import torch

from craft.world.kinds import AgentKind
from craft.world.map import JunctionKind, LightState
from craft.world.state import Mode
from craft.world.traffic import hash_uniform, idm_accel
from craft.world.world import AgentSpec, World, WorldSpec
from tests.handmaps import crossroads, straight_road


def _run(world, state, steps, ego_control=None):
    B = state.batch_size
    ctrl = torch.zeros(B, 2) if ego_control is None else ego_control
    for _ in range(steps):
        state, _ = world.step(state, ctrl)
    return state


def test_idm_equilibrium_gap_closed_form():
    v0, T, s0, a, b, delta = 20.0, 1.5, 2.0, 2.0, 3.0, 4.0
    for v in (2.0, 8.0, 15.0, 19.0):
        s_e = (s0 + v * T) / math.sqrt(1 - (v / v0) ** delta)
        acc = idm_accel(torch.tensor(v), torch.tensor(v0), torch.tensor(s_e), torch.tensor(0.0),
                        torch.tensor(a), torch.tensor(b), torch.tensor(T), torch.tensor(s0), delta)
        assert abs(float(acc)) < 1e-4
        closer = idm_accel(torch.tensor(v), torch.tensor(v0), torch.tensor(0.8 * s_e), torch.tensor(0.0),
                           torch.tensor(a), torch.tensor(b), torch.tensor(T), torch.tensor(s0), delta)
        assert float(closer) < 0


def test_idm_free_road_accelerates_to_desired_speed():
    acc = idm_accel(torch.tensor(0.0), torch.tensor(10.0), torch.tensor(float("inf")), torch.tensor(0.0),
                    torch.tensor(2.0), torch.tensor(3.0), torch.tensor(1.5), torch.tensor(2.0))
    assert abs(float(acc) - 2.0) < 1e-6


def test_car_following_reaches_idm_equilibrium_gap():
    """A follower behind a leader held at 8 m/s settles at the IDM equilibrium gap."""
    m = straight_road(2000.0, lanes=1)
    world = World([m])
    v_lead, v0, T, s0 = 8.0, 14.0, 1.5, 2.0
    spec = WorldSpec(0, route=[0], ego_s=1.0, n_vehicles=0, n_pedestrians=0, agents=[
        AgentSpec(AgentKind.CAR, lane=0, s=100.0, speed=v_lead, behaviour={"speed_override": v_lead,
                                                                            "lane_changes": False}),
        AgentSpec(AgentKind.CAR, lane=0, s=60.0, speed=v_lead, behaviour={"v_des": v0, "headway": T, "min_gap": s0,
                                                                           "lane_changes": False}),
    ])
    state = world.reset([spec], seed=0)
    state = _run(world, state, 600)
    gap = float(state.pos[0, 1, 0] - state.pos[0, 2, 0]) - 4.6  # bumper to bumper (cars 4.6 m)
    s_e = (s0 + v_lead * T) / math.sqrt(1 - (v_lead / v0) ** 4)
    assert abs(float(state.speed[0, 2]) - v_lead) < 0.2
    assert abs(gap - s_e) < 1.0, (gap, s_e)


def test_vehicle_stops_behind_ego_and_does_not_hit_it():
    m = straight_road(1000.0, lanes=1)
    world = World([m])
    spec = WorldSpec(0, route=[0], ego_s=200.0, n_vehicles=0, n_pedestrians=0,
                     agents=[AgentSpec(AgentKind.CAR, lane=0, s=120.0, speed=12.0, behaviour={"lane_changes": False})])
    state = world.reset([spec], seed=0)
    state = _run(world, state, 300)  # ego stands still (zero control)
    gap = float(state.pos[0, 0, 0] - state.pos[0, 1, 0]) - 0.5 * (4.9 + 4.6)
    assert float(state.speed[0, 1]) < 0.2
    assert 0.5 < gap < 6.0


def test_vehicle_ignoring_ego_drives_into_it():
    m = straight_road(1000.0, lanes=1)
    world = World([m])
    spec = WorldSpec(0, route=[0], ego_s=200.0, n_vehicles=0, n_pedestrians=0,
                     agents=[AgentSpec(AgentKind.CAR, lane=0, s=120.0, speed=12.0,
                                       behaviour={"lane_changes": False, "react_ego": False})])
    state = world.reset([spec], seed=0)
    hit = False
    for _ in range(200):
        state, ev = world.step(state, torch.zeros(1, 2))
        hit |= bool(ev.collision_any[0])
    assert hit


def _cross_state(kind, light_state=None, agents=()):
    m = crossroads(kind)
    world = World([m])
    spec = WorldSpec(0, route=[4], ego_s=80.0, n_vehicles=0, n_pedestrians=0, agents=list(agents))
    state = world.reset([spec], seed=0)
    if light_state is not None:
        state = state.replace(light_override=torch.tensor([[light_state, LightState.GREEN]]))
    return world, state


def test_red_light_stops_vehicle_before_line_and_green_releases_it():
    world, state = _cross_state(JunctionKind.SIGNAL, LightState.RED,
                                [AgentSpec(AgentKind.CAR, lane=0, s=40.0, speed=10.0)])
    state = _run(world, state, 200)
    x = float(state.pos[0, 1, 0])
    assert float(state.speed[0, 1]) < 0.1
    assert -8.0 - 8.0 < x < -8.0  # before the stop line at x = -8 (front within the lane end)
    state = state.replace(light_override=torch.tensor([[LightState.GREEN, LightState.RED]]))
    state = _run(world, state, 150)
    assert float(state.pos[0, 1, 0]) > 10.0


def test_red_light_runner_ignores_light():
    world, state = _cross_state(JunctionKind.SIGNAL, LightState.RED,
                                [AgentSpec(AgentKind.CAR, lane=0, s=40.0, speed=10.0, behaviour={"ignore_lights": True})])
    state = _run(world, state, 100)
    assert float(state.pos[0, 1, 0]) > 0.0


def test_stop_sign_full_stop_then_proceed():
    world, state = _cross_state(JunctionKind.STOP, None, [AgentSpec(AgentKind.CAR, lane=0, s=40.0, speed=10.0)])
    min_speed_near_line = 99.0
    for _ in range(300):
        state, _ = world.step(state, torch.zeros(1, 2))
        x = float(state.pos[0, 1, 0])
        if -16.0 < x < -8.0:
            min_speed_near_line = min(min_speed_near_line, float(state.speed[0, 1]))
    assert min_speed_near_line < 0.3
    assert float(state.pos[0, 1, 0]) > 10.0  # went through afterwards


def test_minor_road_yields_to_major_road_vehicle():
    """Uncontrolled crossing: the south (minor) vehicle waits for the west (major) one."""
    agents = [AgentSpec(AgentKind.CAR, lane=0, s=70.0, speed=10.0, behaviour={"v_des": 10.0}),  # major
              AgentSpec(AgentKind.CAR, lane=1, s=75.0, speed=10.0, behaviour={"v_des": 10.0})]  # minor
    world, state = _cross_state(JunctionKind.UNCONTROLLED, None, agents)
    major_first = None
    collided = False
    for _ in range(200):
        state, _ = world.step(state, torch.zeros(1, 2))
        from craft.world.collision import boxes_overlap

        collided |= bool(boxes_overlap(state.pos[0, 1], state.yaw[0, 1], state.length[0, 1], state.width[0, 1],
                                       state.pos[0, 2], state.yaw[0, 2], state.length[0, 2], state.width[0, 2]))
        if major_first is None and float(state.pos[0, 1, 0]) > 3.0:
            major_first = float(state.pos[0, 2, 1]) < -3.0
    assert not collided
    assert major_first, "the minor-road vehicle should still be waiting when the major one crosses"


def test_minor_road_vehicle_yields_to_ego_on_major_road():
    """Agents react to the ego: the minor-road vehicle waits while the ego crosses on the major road."""
    m = crossroads(JunctionKind.UNCONTROLLED)
    world = World([m])
    spec = WorldSpec(0, route=[0, 2, 4], ego_s=70.0, ego_speed=10.0, n_vehicles=0, n_pedestrians=0,
                     agents=[AgentSpec(AgentKind.CAR, lane=1, s=75.0, speed=10.0, behaviour={"v_des": 10.0})])
    state = world.reset([spec], seed=0)
    # the ego keeps 10 m/s straight along +x
    ctrl = torch.zeros(1, 2)
    crossed_first = None
    for _ in range(100):
        state, ev = world.step(state, ctrl)
        assert not bool(ev.collision_any[0])
        if crossed_first is None and float(state.pos[0, 0, 0]) > 3.0:
            crossed_first = float(state.pos[0, 1, 1]) < -3.0
    assert crossed_first


def test_lane_change_overtakes_slow_leader():
    m = straight_road(2000.0, lanes=2)
    world = World([m])
    spec = WorldSpec(0, route=[0], ego_s=1.0, n_vehicles=0, n_pedestrians=0, agents=[
        AgentSpec(AgentKind.TRUCK, lane=0, s=200.0, speed=5.0, behaviour={"speed_override": 5.0, "lane_changes": False}),
        AgentSpec(AgentKind.CAR, lane=0, s=150.0, speed=15.0, behaviour={"v_des": 18.0}),
    ])
    state = world.reset([spec], seed=0)
    state = _run(world, state, 400)
    assert float(state.pos[0, 2, 0]) > float(state.pos[0, 1, 0])  # the car passed the truck
    assert float(state.speed[0, 2]) > 12.0


def test_pedestrian_waits_for_vehicle_before_crosswalk_free_mode_walks():
    m = straight_road(200.0, lanes=1)
    world = World([m])
    spec = WorldSpec(0, route=[0], ego_s=1.0, n_vehicles=0, n_pedestrians=0, agents=[
        AgentSpec(AgentKind.PEDESTRIAN, pos=(50.0, -4.0), yaw=math.pi / 2, speed=1.4, mode=Mode.FREE,
                  behaviour={"speed_override": 1.4})])
    state = world.reset([spec], seed=0)
    state = _run(world, state, 30)
    assert abs(float(state.pos[0, 1, 1]) - (-4.0 + 1.4 * 3.0)) < 0.4  # walked straight north ~ 4.2 m
    assert abs(float(state.pos[0, 1, 0]) - 50.0) < 1e-3


def test_hash_uniform_is_deterministic_and_uniform():
    seed = torch.arange(4)
    step = torch.full((4,), 7)
    idx = torch.arange(1000)[None].expand(4, -1)
    u1 = hash_uniform(seed, step, idx, 3)
    u2 = hash_uniform(seed, step, idx, 3)
    assert torch.equal(u1, u2)
    assert 0.0 <= float(u1.min()) and float(u1.max()) < 1.0
    assert abs(float(u1.mean()) - 0.5) < 0.03
    assert not torch.equal(u1, hash_uniform(seed, step, idx, 4))


def test_background_traffic_rarely_collides():
    """Reactive traffic in generated towns: vehicles avoid each other (rear-ends, junction conflicts,
    lane changes). Distinct colliding vehicle pairs per vehicle-km stay low."""
    from craft.world.collision import pairwise_collisions
    from craft.world.towns import generate_town
    from craft.world.world import random_specs

    world = World([generate_town(0), generate_town(1)])
    B = 24
    state = world.reset(random_specs(world.maps, B, seed=5, n_vehicles=40, n_pedestrians=8), seed=5)
    pairs, km = set(), 0.0
    ctrl = torch.zeros(B, 2)
    for _ in range(300):
        prev = state
        state, _ = world.step(state, ctrl)
        veh = state.is_vehicle() & (state.kind != int(AgentKind.EGO))
        km += float(((state.pos - prev.pos).norm(dim=-1) * veh).sum()) / 1000
        i, j, b = pairwise_collisions(state.pos, state.yaw, state.length, state.width, veh)
        pairs |= set(zip(b.tolist(), i.tolist(), j.tolist()))
    assert km > 100
    assert len(pairs) / km < 0.03, (len(pairs), km)
