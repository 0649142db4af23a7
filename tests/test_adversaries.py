"""Scenario adversaries as Bench2Drive scripts them: the time-to-arrival trigger, flows that do not yield, and
the crossing adversary of OppositeVehicleRunningRedLight in closed loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from craft.bench.runner import make_driver
from craft.errors import CraftError
from craft.scenarios import build_scenario, start
from craft.scenarios import script as sc
from craft.scenarios.library import ADVERSARY_SPEED, FLOW_FLAGS, MIN_TRIGGER_DIST, SYNC_TIME
from craft.world.autopilot import PlanExecutor, route_plan
from craft.world.kinds import AgentKind
from craft.world.world import AgentSpec, World, WorldSpec
from tests.handmaps import straight_road

DT = 0.1


def _instances(towns, type: str, n: int) -> list:
    """``n`` instances of ``type`` on the session's towns (one per town, the first draw that fits), background
    traffic removed so that only the scenario's agents act."""
    out = []
    for k, town in enumerate(towns):
        try:
            inst = build_scenario(type, town, np.random.default_rng(7 + k), map_index=k)
        except CraftError:
            continue
        inst.spec.n_vehicles = 0
        inst.spec.n_pedestrians = 0
        out.append(inst)
        if len(out) == n:
            return out
    pytest.skip(f"only {len(out)} towns host {type}")


def _release_step(rules, agent: int) -> int:
    return next(i for i, r in enumerate(rules) if r.agent == agent and r.action.kind == sc.A_RELEASE)


# ---------------------------------------------------------------------- the trigger itself
def test_arrival_trigger_on_a_hand_made_state():
    """Fires on the first step the straight-line distance over the ego's speed drops below t, or within d;
    never for a standing ego farther than d."""
    world = World([straight_road()])
    spec = WorldSpec(map_index=0, route=[0], ego_s=10.0, n_vehicles=0, n_pedestrians=0)
    state = world.reset([spec, spec, spec], seed=0)
    x_goal = 40.0  # the point is 30 m ahead of every ego
    speeds = torch.tensor([10.0, 20.0, 0.0])
    state = state.replace(speed=state.speed.clone().index_put_((torch.arange(3), torch.zeros(3, dtype=torch.long)),
                                                               speeds))
    rule = sc.Rule(0, sc.Trigger.arrival(x_goal, 0.0, 2.2, 12.0), sc.Action.flag("siren"))
    table = sc.pack([[rule]] * 3)
    _, tb = sc.apply(state, table)
    # 30 m at 10 m/s is 3.0 s (not yet), at 20 m/s 1.5 s (fires); a standing ego 30 m away never arrives
    assert tb.fired[:, 0].tolist() == [False, True, False]
    near = state.replace(pos=state.pos.clone().index_put_((torch.tensor([2]), torch.tensor([0])),
                                                          torch.tensor([[x_goal - 11.0, 0.0]])))
    _, tb = sc.apply(near, table)
    assert bool(tb.fired[2, 0])  # within the minimum distance


# ---------------------------------------------------------------------- OppositeVehicleRunningRedLight
@pytest.mark.parametrize("speed", [6.0, 9.0, 12.0])
def test_adversary_starts_at_sync_time_and_meets_the_ego(towns, speed):
    """An ego holding ``speed`` releases the adversary when its time to arrival at the collision point falls to
    2.2 s; the adversary (16.7 m/s) then reaches that point within half a second of the ego."""
    inst = _instances(towns, "OppositeVehicleRunningRedLight", 1)[0]
    inst.spec.ego_speed = speed
    world = World(towns)
    state, table = start(world, [inst], seed=0)
    ex = PlanExecutor(1, dt=DT)
    adv = inst.meta["crossing"][0]
    cp = torch.tensor(inst.meta["collision_point"])
    rel = _release_step(inst.rules, adv)
    tta_prev, released_at, tta_at_release = math.inf, None, None
    d_ego, d_adv = [], []
    for k in range(300):
        state, table = sc.apply(state, table, maps=world.maps, dt=DT)
        if released_at is None and bool(table.fired[0, rel]):
            released_at = k
            tta_at_release = float((state.pos[0, 0] - cp).norm()) / float(state.speed[0, 0])
            assert tta_prev >= SYNC_TIME  # not a step too late
        tta_prev = float((state.pos[0, 0] - cp).norm()) / max(float(state.speed[0, 0]), 1e-3)
        if k % 5 == 0:
            ex.set_plan(state, route_plan(state, speed))
        state, _ = world.step(state, ex.control(state))
        d_ego.append(float((state.pos[0, 0] - cp).norm()))
        d_adv.append(float((state.pos[0, adv] - cp).norm()))
    assert released_at is not None
    assert SYNC_TIME - 0.1 * (1 + speed / 6.0) <= tta_at_release < SYNC_TIME  # first step below 2.2 s
    assert tta_at_release * speed > MIN_TRIGGER_DIST  # the time rule fired, not the distance fallback
    reach = 2.5  # "at the point": within half a car length
    t_ego = next(k for k, d in enumerate(d_ego) if d < reach) * DT
    t_adv = next(k for k, d in enumerate(d_adv) if d < reach) * DT
    assert abs(t_adv - t_ego) < 0.5, (t_ego, t_adv)
    assert float(state.speed[0, adv]) == pytest.approx(ADVERSARY_SPEED) or t_adv <= t_ego + 0.5


def test_blind_ego_is_hit_in_red_light_runner_while_the_expert_is_not(towns):
    """Closed loop, 3 placements: the route follower (blind to everyone) collides with the adversary; the
    privileged expert brakes for it."""
    insts = _instances(towns, "OppositeVehicleRunningRedLight", 3)
    for name in ("lane-follow", "expert"):
        world = World(towns)
        state, table = start(world, insts, seed=0)
        driver = make_driver(name)
        ex = PlanExecutor(len(insts), dt=DT)
        adv = torch.tensor([i.meta["crossing"][0] for i in insts])
        hit = torch.zeros(len(insts), dtype=torch.bool)
        for k in range(250):
            state, table = sc.apply(state, table, maps=world.maps, dt=DT)
            if k % 5 == 0:
                ex.set_plan(state, driver.plan(world, state))
            state, ev = world.step(state, ex.control(state))
            hit |= ev.collided_agent == adv
        if name == "lane-follow":
            assert hit.all(), hit
        else:
            assert not hit.any(), hit


# ---------------------------------------------------------------------- flows
def test_flow_vehicle_does_not_brake_for_an_ego_in_its_path():
    """A flow vehicle (Bench2Drive's ActorFlow: constant velocity, ignoring vehicles) drives into a slow ego at
    its speed; the same car as ordinary traffic brakes and follows it."""
    world = World([straight_road()])
    v = 10.0

    def car(**flags):
        return AgentSpec(kind=AgentKind.CAR, lane=0, s=60.0, speed=v, behaviour=dict(speed_override=v, v_des=v,
                                                                                      **flags))

    ego = dict(map_index=0, route=[0], ego_s=100.0, ego_speed=2.0, n_vehicles=0, n_pedestrians=0)
    specs = [WorldSpec(**ego, agents=[car(**FLOW_FLAGS)]), WorldSpec(**ego, agents=[car(lane_changes=False)])]
    state = world.reset(specs, seed=0)
    hit = torch.zeros(2, dtype=torch.bool)
    min_speed = torch.full((2,), math.inf)
    for _ in range(80):  # 8 s; the car starts 40 m behind the ego and closes in at 8 m/s
        state, ev = world.step(state, torch.zeros(2, 2))
        was_hit = hit.clone()
        hit |= ev.collided_agent == 1
        min_speed = torch.where(was_hit, min_speed, torch.minimum(min_speed, state.speed[:, 1]))
    assert bool(hit[0]) and not bool(hit[1])
    assert float(min_speed[0]) == pytest.approx(v, abs=0.05)  # never braked before the impact
    assert float(state.speed[1, 1]) < 3.0  # ordinary traffic slowed down behind the ego
    # after hitting the ego the flow drives like traffic again (Bench2Drive stops the constant velocity)
    assert not bool(state.ignore_vehicles[0, 1]) and bool(state.react_ego[0, 1])
