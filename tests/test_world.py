"""The world API: reset / step / clone, determinism, bad input, and invariants under random controls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from craft.errors import CraftError
from craft.world.autopilot import PlanExecutor, route_plan
from craft.world.kinds import AgentKind
from craft.world.map import RawLane, RoadMap
from craft.world.world import AgentSpec, World, WorldSpec, random_specs


@pytest.fixture(scope="module")
def world():
    from craft.world.towns import generate_town

    return World([generate_town(0), generate_town(1)])


def _drive(world, state, steps, speed=8.0):
    driver = PlanExecutor(state.batch_size)
    for k in range(steps):
        if k % 5 == 0:
            driver.set_plan(state, route_plan(state, speed))
        state, ev = world.step(state, driver.control(state))
    return state


def _same(a, b):
    """Bitwise equal, NaN equal to NaN (unset overrides are NaN)."""
    if a.is_floating_point():
        return torch.equal(torch.nan_to_num(a, nan=1234.5), torch.nan_to_num(b, nan=1234.5))
    return torch.equal(a, b)


def test_reset_shapes_and_ego(world):
    specs = random_specs(world.maps, 6, seed=1, n_vehicles=12, n_pedestrians=4)
    s = world.reset(specs, seed=1)
    assert s.pos.shape == (6, 17, 2)
    assert bool((s.kind[:, 0] == int(AgentKind.EGO)).all())
    assert bool(s.valid[:, 0].all())
    assert int(s.valid.sum()) > 6 * 10
    assert bool(torch.isfinite(s.pos).all())


def test_determinism_500_steps(world):
    specs = random_specs(world.maps, 4, seed=3, n_vehicles=20, n_pedestrians=6)
    a = _drive(world, world.reset(specs, seed=3), 500)
    b = _drive(world, world.reset(specs, seed=3), 500)
    for name, t in a.tensors().items():
        assert _same(t, b.tensors()[name]), name
    c = world.reset(specs, seed=4)
    assert not torch.equal(c.pos, world.reset(specs, seed=3).pos)


def test_clone_is_independent_and_replays(world):
    specs = random_specs(world.maps, 3, seed=5, n_vehicles=20, n_pedestrians=6)
    s0 = _drive(world, world.reset(specs, seed=5), 20)
    twin = world.clone(s0)
    ctrl = torch.tensor([[1.0, 0.0]] * 3)
    a, _ = world.step(s0, ctrl)
    b, _ = world.step(twin, ctrl)
    assert torch.equal(a.pos, b.pos)
    twin.pos += 100.0  # mutating the clone leaves the original alone
    assert not torch.equal(twin.pos, s0.pos)
    c, _ = world.step(s0, ctrl)
    assert torch.equal(a.pos, c.pos)


def test_batch_independence(world):
    """A world evolves the same alone or inside a batch."""
    specs = random_specs(world.maps, 4, seed=9, n_vehicles=15, n_pedestrians=4)
    full = _drive(world, world.reset(specs, seed=9), 60)
    sub = full  # index world 2 of a fresh batch and drive it alone
    alone = world.reset(specs, seed=9).index(torch.tensor([2]))
    alone = _drive(world, alone, 60)
    n = alone.pos.shape[1]
    assert torch.allclose(full.pos[2, :n], alone.pos[0], atol=1e-4)
    del sub


def test_traffic_moves_and_respects_lanes(world):
    specs = random_specs(world.maps, 8, seed=2, n_vehicles=25, n_pedestrians=8)
    s0 = world.reset(specs, seed=2)
    s = _drive(world, s0, 200)
    veh = s.is_vehicle() & (s.kind != int(AgentKind.EGO))
    moved = (s.pos - s0.pos).norm(dim=-1)
    assert float(moved[veh].mean()) > 30.0  # background traffic flows
    # background vehicles stay near their lane centre
    from craft.world.map import lane_pose

    p, _ = lane_pose(world.maps, s.map_id[:, None], s.lane.clamp_min(0), s.s)
    off = (p - s.pos).norm(dim=-1)[veh & (s.lane >= 0) & (s.offset.abs() < 0.01)]
    assert float(off.median()) < 0.5


def test_bad_specs_raise_project_error(world):
    m = world.maps.maps[0]
    lane = int(np.nonzero(m.lane_junction < 0)[0][0])
    with pytest.raises(CraftError, match="map_index"):
        world.reset([WorldSpec(7, route=[lane])], 0)
    with pytest.raises(CraftError, match="disconnected"):
        far = [x for x in range(m.num_lanes) if x not in m.successors(lane) and x != lane][5]
        world.reset([WorldSpec(0, route=[lane, far])], 0)
    with pytest.raises(CraftError, match="kind"):
        world.reset([WorldSpec(0, route=[lane], agents=[AgentSpec(kind=42, lane=lane)])], 0)
    with pytest.raises(CraftError, match="off the map"):
        world.reset([WorldSpec(0, route=[lane], agents=[AgentSpec(AgentKind.STATIC, pos=(1e6, 0.0))])], 0)
    with pytest.raises(CraftError, match="finite"):
        world.reset([WorldSpec(0, route=[lane], agents=[AgentSpec(AgentKind.STATIC, pos=(float("nan"), 0.0))])], 0)
    with pytest.raises(CraftError, match="behaviour"):
        world.reset([WorldSpec(0, route=[lane], agents=[AgentSpec(AgentKind.CAR, lane=lane, behaviour={"x": 1})])], 0)
    with pytest.raises(CraftError, match="shape"):
        st_ = world.reset([WorldSpec(0, route=[lane])], 0)
        world.step(st_, torch.zeros(3))


def test_bad_maps_raise_project_error():
    good = np.array([[0.0, 0.0], [10.0, 0.0]])
    with pytest.raises(CraftError, match="NaN"):
        RoadMap.build("m", [RawLane(np.array([[0.0, 0.0], [np.nan, 0.0]]), 3.5, 10.0)])
    with pytest.raises(CraftError, match="width"):
        RoadMap.build("m", [RawLane(good, -1.0, 10.0)])
    with pytest.raises(CraftError, match="does not exist"):
        RoadMap.build("m", [RawLane(good, 3.5, 10.0, successors=[3])])
    with pytest.raises(CraftError, match="lane type"):
        RoadMap.build("m", [RawLane(good, 3.5, 10.0, type=17)])
    m = RoadMap.build("m", [RawLane(good, 3.5, 10.0), RawLane(good + 20, 3.5, 10.0)])
    with pytest.raises(CraftError, match="no route"):
        m.plan_route(0, 1)


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), accel_scale=st.floats(0.0, 20.0), steer_scale=st.floats(0.0, 2.0))
def test_random_controls_keep_state_finite_and_bounded(world, seed, accel_scale, steer_scale):
    """Thousands of random worlds (16 examples x 128 worlds) with random ego controls: finite state, speeds
    within limits, no teleporting, invalid agents untouched."""
    B = 128
    specs = random_specs(world.maps, B, seed=seed, n_vehicles=20, n_pedestrians=6)
    s = world.reset(specs, seed=seed)
    g = torch.Generator().manual_seed(seed)
    pad_pos = s.pos[~s.valid].clone()
    for _ in range(30):
        ctrl = torch.stack([(torch.rand(B, generator=g) * 2 - 1) * accel_scale,
                            (torch.rand(B, generator=g) * 2 - 1) * steer_scale], -1)
        if seed % 3 == 0:
            ctrl[0] = float("nan")  # garbage in must not poison the state
        prev = s
        s, ev = world.step(s, ctrl)
        for name in ("pos", "yaw", "speed", "steer", "s", "offset", "accel"):
            assert bool(torch.isfinite(getattr(s, name)).all()), name
        assert float(s.speed.min()) >= 0.0
        assert float(s.speed.max()) <= 35.0 + 1e-3
        jump = (s.pos - prev.pos).norm(dim=-1)
        assert float(jump.max()) <= 35.0 * 0.1 + 1e-3  # no teleporting
        assert bool((s.yaw.abs() <= math.pi + 1e-5).all())
        assert torch.equal(s.pos[~s.valid], pad_pos)
        for f in ("progress", "route_completion", "driven", "outside_lanes"):
            assert bool(torch.isfinite(getattr(ev, f)).all()), f


def test_no_background_vehicle_spawns_right_behind_or_ahead_of_the_ego(world):
    specs = random_specs(world.maps, 32, seed=11, n_vehicles=40, n_pedestrians=0)
    s = world.reset(specs, seed=11)
    rel = s.pos - s.pos[:, :1]
    fwd = torch.stack([torch.cos(s.yaw[:, 0]), torch.sin(s.yaw[:, 0])], -1)[:, None, :]
    along = (rel * fwd).sum(-1)
    lateral = (rel[..., 0] * fwd[..., 1] - rel[..., 1] * fwd[..., 0]).abs()
    same_lane = (s.lane == s.lane[:, :1]) & s.valid & (torch.arange(s.num_agents) > 0)
    behind = same_lane & (along < 0) & (along > -world.cfg.spawn_clear_behind + 1.0) & (lateral < 1.0)
    ahead = same_lane & (along > 0) & (along < world.cfg.spawn_clear_ahead - 1.0) & (lateral < 1.0)
    assert not bool(behind.any()) and not bool(ahead.any())
