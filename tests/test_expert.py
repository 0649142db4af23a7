"""The privileged PDM-Lite-like expert (craft.experts.pdm) driving the closed-loop world."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from craft.experts import ExpertConfig, PrivilegedExpert
from craft.world.autopilot import PlanExecutor, route_plan
from craft.world.kinds import AgentKind
from craft.world.map import JunctionKind, LaneType, LightState, RawLane, RoadMap
from craft.world.world import AgentSpec, World, WorldSpec, random_specs
from tests.handmaps import crossroads, straight_road

torch.set_num_threads(1)

REPLAN = 5


def two_way(length: float = 400.0) -> RoadMap:
    """A straight two-way road along x: lane 0 eastbound (y=0), lane 1 westbound (y=3.5), a sidewalk."""
    raw = [
        RawLane(np.array([[0.0, 0.0], [length, 0.0]]), 3.5, 12.0, road=0, left_opposite=1),
        RawLane(np.array([[length, 3.5], [0.0, 3.5]]), 3.5, 12.0, road=1, left_opposite=0),
        RawLane(np.array([[0.0, -3.0], [length, -3.0]]), 2.0, 2.0, LaneType.SIDEWALK),
    ]
    return RoadMap.build("two-way", raw)


def drive(world: World, state, steps: int, planner=None, hook=None, every=REPLAN):
    """Run ``steps`` world steps, re-planning every ``every`` steps; returns the final state and the events."""
    planner = planner or PrivilegedExpert()
    drv = PlanExecutor(state.batch_size)
    events = []
    for t in range(steps):
        if hook is not None:
            state = hook(t, state)
        if t % every == 0:
            drv.set_plan(state, planner(world, state))
        state, ev = world.step(state, drv.control(state))
        events.append(ev)
    return state, events


def total(events, name):
    return torch.stack([getattr(e, name) for e in events]).float().sum(0)


@pytest.fixture(scope="module")
def towns():
    from craft.world.towns import generate_town

    return World([generate_town(0), generate_town(1)])


# ---------------------------------------------------------------------- format
def test_output_shape_frame_and_finite(towns):
    specs = random_specs(towns.maps, 6, seed=11, n_vehicles=15, n_pedestrians=4)
    st = towns.reset(specs, seed=11)
    ex = PrivilegedExpert()
    traj = ex.plan(towns, st, debug=True)
    assert traj.shape == (6, ExpertConfig().horizon, 3)
    assert torch.isfinite(traj).all()
    # ego frame: starting on the route at rest, the plan goes forward, close to the ego's axis
    assert (traj[:, -1, 0] >= -1e-3).all()
    assert (traj[:, 0, 1].abs() < 1.0).all()
    dbg = ex.last_debug
    G = dbg.score.shape[1]
    assert dbg.traj_world.shape[:2] == (6, G) and dbg.chosen.shape == (6,)
    assert ((dbg.chosen >= 0) & (dbg.chosen < G)).all()
    # a custom horizon
    t2 = PrivilegedExpert(ExpertConfig(horizon=8)).plan(towns, st)
    assert t2.shape == (6, 8, 3)


def test_batch_independence(towns):
    specs = random_specs(towns.maps, 5, seed=12, n_vehicles=20, n_pedestrians=6)
    st = towns.reset(specs, seed=12)
    for _ in range(40):  # get traffic moving
        st, _ = towns.step(st, torch.zeros(st.batch_size, 2))
    ex = PrivilegedExpert()
    full = ex.plan(towns, st)
    for b in (0, 3):
        one = ex.plan(towns, st.index(torch.tensor([b])))
        torch.testing.assert_close(one[0], full[b], atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------------- rules
def test_stops_at_red_light_and_goes_on_green():
    world = World([crossroads(JunctionKind.SIGNAL)])
    st = world.reset([WorldSpec(0, [0, 2, 4], ego_s=20.0, n_vehicles=0, n_pedestrians=0)], seed=0)
    switch = 200

    def force(t, s):
        lo = s.light_override.clone()
        lo[:, 0] = int(LightState.RED) if t < switch else int(LightState.GREEN)
        return s.replace(light_override=lo)

    st, ev = drive(world, st, switch, hook=force)
    front = st.pos[0, 0, 0] + 0.5 * st.length[0, 0]
    assert front < -8.0 and front > -14.0  # waits just before the stop line (x = -8)
    assert st.speed[0, 0] < 0.1
    assert total(ev, "red_light").item() == 0
    st, ev = drive(world, st, 150, hook=lambda t, s: force(t + switch, s))
    assert st.pos[0, 0, 0] > 10.0  # through the junction
    assert total(ev, "red_light").item() == 0
    assert total(ev, "collision_any").item() == 0


def test_full_stop_at_stop_sign_then_go():
    world = World([crossroads(JunctionKind.STOP)])
    st = world.reset([WorldSpec(0, [0, 2, 4], ego_s=20.0, n_vehicles=0, n_pedestrians=0)], seed=0)
    st, ev = drive(world, st, 300)
    assert total(ev, "stop_infraction").item() == 0
    assert min(e.speed[0].item() for e in ev[30:]) < 0.1
    assert st.pos[0, 0, 0] > 10.0


# ---------------------------------------------------------------------- overtaking
def _obstacle_world(oncoming: bool):
    agents = [AgentSpec(kind=AgentKind.STATIC, lane=0, s=80.0)]
    if oncoming:  # a column of oncoming cars in the opposite lane
        agents += [AgentSpec(kind=AgentKind.CAR, lane=1, s=float(s), speed=10.0, behaviour={"v_des": 10.0})
                   for s in (200, 225, 250, 275, 300, 325)]
    return WorldSpec(0, [0], ego_s=20.0, n_vehicles=0, n_pedestrians=0, agents=agents)


def test_two_way_overtake_waits_for_a_gap_then_passes():
    world = World([two_way()])
    st = world.reset([_obstacle_world(False), _obstacle_world(True)], seed=0)
    st, ev1 = drive(world, st, 120)
    # free opposite lane: already past the obstacle; busy: waiting behind it
    assert st.pos[0, 0, 0] > 85.0
    assert st.pos[1, 0, 0] < 80.0 - 2.25 - 2.45
    assert st.speed[1, 0] < 1.0
    st, ev2 = drive(world, st, 230)
    ev = ev1 + ev2
    assert (st.pos[:, 0, 0] > 120.0).all()  # both passed and went on
    assert (st.pos[:, 0, 1].abs() < 0.6).all()  # back in their lane
    assert (total(ev, "collision_any") == 0).all()
    assert (total(ev, "opposite_lane") > 0).all()  # the overtake used the opposite lane


def test_overtake_via_same_direction_neighbour():
    world = World([straight_road(600.0, lanes=2, speed=12.0)])
    spec = WorldSpec(0, [0], ego_s=20.0, n_vehicles=0, n_pedestrians=0,
                     agents=[AgentSpec(kind=AgentKind.STATIC, lane=0, s=90.0)])
    st = world.reset([spec], seed=0)
    st, ev = drive(world, st, 200)
    assert st.pos[0, 0, 0] > 110.0
    assert total(ev, "collision_any").item() == 0
    assert total(ev, "opposite_lane").item() == 0


# ---------------------------------------------------------------------- towns with traffic
def test_random_towns_beat_the_naive_follower(towns):
    B, steps = 10, 300
    specs = random_specs(towns.maps, B, seed=5, n_vehicles=20, n_pedestrians=6)
    st_e, ev_e = drive(towns, towns.reset(specs, seed=5), steps)
    st_r, ev_r = drive(towns, towns.reset(specs, seed=5), steps, planner=lambda w, s: route_plan(s, 8.0))

    def infractions(ev):
        return sum(total(ev, k).sum().item() for k in ("collision_vehicle", "collision_pedestrian",
                                                        "collision_layout", "red_light", "stop_infraction"))

    rc_e = ev_e[-1].route_completion.mean().item()
    rc_r = ev_r[-1].route_completion.mean().item()
    assert rc_e >= rc_r - 1.0
    assert infractions(ev_e) <= 1
    assert infractions(ev_e) < infractions(ev_r)
    assert total(ev_e, "outside_lanes").sum().item() < 5.0


def test_yields_to_priority_traffic_at_uncontrolled_junction():
    # the ego comes from the minor road (lane 1 -> connector 3), a car on the priority road (lane 0 -> 2) does
    # not react to the ego and would reach the crossing at the same time
    world = World([crossroads(JunctionKind.UNCONTROLLED)])
    car = AgentSpec(kind=AgentKind.CAR, lane=0, s=40.0, speed=10.0, behaviour={"v_des": 10.0, "react_ego": False})
    spec = WorldSpec(0, [1, 3, 5], ego_s=50.0, ego_speed=8.0, n_vehicles=0, n_pedestrians=0, agents=[car])
    st, ev = drive(world, world.reset([spec], seed=0), 100)
    assert total(ev, "collision_any").item() == 0
    assert st.pos[0, 0, 1] > 5.0  # crossed after the car
    st_r, ev_r = drive(world, world.reset([spec], seed=0), 100, planner=lambda w, s: route_plan(s, 8.0))
    assert total(ev_r, "collision_any").item() > 0  # the naive follower does not yield


def test_moves_aside_for_an_emergency_vehicle():
    # two same-direction lanes; the ego drives in the left one, an emergency vehicle with its siren comes from behind
    world = World([straight_road(800.0, lanes=2, speed=12.0)])
    ev_car = AgentSpec(kind=AgentKind.EMERGENCY, lane=1, s=10.0, speed=14.0, siren=True,
                       behaviour={"v_des": 20.0, "lane_changes": False})
    spec = WorldSpec(0, [1], ego_s=60.0, ego_speed=8.0, n_vehicles=0, n_pedestrians=0, agents=[ev_car])
    st, ev = drive(world, world.reset([spec], seed=0), 150)
    assert total(ev, "collision_any").item() == 0
    assert st.pos[0, 1, 0] > st.pos[0, 0, 0]  # the emergency vehicle is ahead now
