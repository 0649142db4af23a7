"""Tests for the frame conversions and the closed-loop plan tracker."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craft.errors import CraftError
from craft.world.dynamics import bicycle_step
from craft.world.tracker import (
    TrackerConfig,
    TrackerState,
    _plan_speed_at,
    ego_to_world,
    track,
    world_to_ego,
)

DT = 0.1
WB = 2.9
CFG = TrackerConfig()
T = 8
REPLAN_EVERY = 5


def _run(plan_fn, pos, yaw, speed, steps, wheelbase=WB, on_step=None):
    """Closed loop: re-plan every REPLAN_EVERY steps with plan_fn(pos, yaw, speed) -> ego-frame (B, T, 3)."""
    b = pos.shape[0]
    steer = torch.zeros(b)
    state = TrackerState.zeros(b)
    for k in range(steps):
        if k % REPLAN_EVERY == 0:
            plan_world = ego_to_world(plan_fn(pos, yaw, speed), pos, yaw)
            plan_pos0 = pos.clone()
            t0 = k
        since = torch.full((b,), (k - t0) * DT)
        accel, steer_cmd, state = track(plan_world, plan_pos0, since, pos, yaw, speed, wheelbase, state, CFG, DT)
        pos, yaw, speed, steer = bicycle_step(pos, yaw, speed, steer, accel, steer_cmd, wheelbase, DT)
        if on_step is not None:
            on_step(k, pos, yaw, speed)
    return pos, yaw, speed


def _times():
    return CFG.waypoint_dt * torch.arange(1, T + 1, dtype=torch.float32)


@settings(max_examples=50, deadline=None)
@given(
    x=st.floats(-100, 100), y=st.floats(-100, 100), yaw=st.floats(-4, 4),
    seed=st.integers(0, 2**16),
)
def test_frame_round_trip(x, y, yaw, seed):
    g = torch.Generator().manual_seed(seed)
    traj = torch.randn(3, T, 3, generator=g) * torch.tensor([20.0, 20.0, 1.0])
    traj[..., 2] = torch.remainder(traj[..., 2] + math.pi, 2 * math.pi) - math.pi + 1e-3
    pos = torch.tensor([[x, y]]).expand(3, 2)
    heading = torch.full((3,), yaw)
    back = world_to_ego(ego_to_world(traj, pos, heading), pos, heading)
    assert torch.allclose(back[..., :2], traj[..., :2], atol=1e-3)
    assert torch.allclose(torch.sin(back[..., 2]), torch.sin(traj[..., 2]), atol=1e-5)
    assert torch.allclose(torch.cos(back[..., 2]), torch.cos(traj[..., 2]), atol=1e-5)


def test_ego_to_world_known_values():
    traj = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.5]]])
    out = ego_to_world(traj, torch.tensor([[10.0, 5.0]]), torch.tensor([math.pi / 2]))
    expected = torch.tensor([[[10.0, 6.0, math.pi / 2], [8.0, 5.0, math.pi / 2 + 0.5]]])
    assert torch.allclose(out, expected, atol=1e-5)


def test_plan_speed_profile_interpolates_and_holds():
    # Segments of 1, 2, 3 m over 0.5 s -> 2, 4, 6 m/s at mid-times 0.25, 0.75, 1.25 s.
    xs = torch.tensor([[0.0, 1.0, 3.0, 6.0]])
    points = torch.stack((xs, torch.zeros_like(xs)), dim=-1)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.25, 5.0])
    v = _plan_speed_at(points.expand(6, -1, -1), t, 0.5)
    assert torch.allclose(v, torch.tensor([2.0, 2.0, 3.0, 5.0, 6.0, 6.0]))


def test_straight_plan_from_rest():
    def plan(pos, yaw, speed):
        # Reference line y = 0, heading +x, at 8 m/s.
        xs = pos[:, :1] + 8.0 * _times()
        world = torch.stack((xs, torch.zeros_like(xs), torch.zeros_like(xs)), dim=-1)
        return world_to_ego(world, pos, yaw)

    late_errors = []

    def record(k, pos, yaw, speed):
        if k * DT >= 6.0:
            late_errors.append(pos[:, 1].abs().max().item())

    pos, yaw, speed = _run(plan, torch.tensor([[0.0, 0.3]]), torch.tensor([0.05]), torch.zeros(1), 120,
                           on_step=record)
    assert speed.item() == pytest.approx(8.0, abs=0.2)
    assert max(late_errors) < 0.2
    assert abs(yaw.item()) < 0.02


def test_constant_curvature_left_turn():
    radius, v = 20.0, 6.0
    centre = torch.tensor([0.0, radius])

    def plan(pos, yaw, speed):
        theta = torch.atan2(pos[:, 0] - centre[0], centre[1] - pos[:, 1])
        th = theta[:, None] + v * _times() / radius
        world = torch.stack((radius * torch.sin(th), radius - radius * torch.cos(th), th), dim=-1)
        return world_to_ego(world, pos, yaw)

    errors = []
    _, _, speed = _run(
        plan, torch.zeros(1, 2), torch.zeros(1), torch.full((1,), v), 100,
        on_step=lambda k, pos, yaw, sp: errors.append(
            (torch.linalg.vector_norm(pos - centre, dim=-1) - radius).abs().max().item()),
    )
    assert max(errors) < 0.5
    assert speed.item() == pytest.approx(v, abs=0.3)


def test_stop_plan_brings_vehicle_to_rest():
    def plan(pos, yaw, speed):
        return torch.zeros(pos.shape[0], T, 3)

    pos, _, speed = _run(plan, torch.zeros(1, 2), torch.zeros(1), torch.full((1,), 10.0), 40)
    assert speed.item() < 0.1
    assert torch.isfinite(pos).all()


def test_slow_target_triggers_hard_brake_and_keeps_steering():
    # A plan creeping to the left at 0.2 m/s: below stop_speed, so brake, but still steer left.
    ys = 0.1 * torch.arange(1, T + 1, dtype=torch.float32)
    plan = torch.stack((torch.full_like(ys, 20.0), ys * 0 + 5.0, torch.zeros_like(ys)), dim=-1)
    plan[..., 0] = 20.0 + ys  # 0.1 m per 0.5 s
    accel, steer, state = track(plan[None], torch.tensor([[20.0, 5.0]]), 0.0, torch.zeros(1, 2), torch.zeros(1),
                                torch.full((1,), 5.0), WB, TrackerState.zeros(1), CFG, DT)
    assert accel.item() == pytest.approx(-CFG.stop_decel)
    assert steer.item() > 0.0
    assert state.integral.item() == 0.0


def test_batch_independence():
    b, steps = 64, 30
    g = torch.Generator().manual_seed(0)
    curv = (torch.rand(b, generator=g) - 0.5) * 0.1
    v_plan = torch.rand(b, generator=g) * 12.0
    v_plan[:4] = 0.0  # a few stop plans
    s = v_plan[:, None] * _times()
    heading = curv[:, None] * s
    # Ego-frame constant-curvature arcs (exact chord formula, curvature may be ~0).
    chord = s * torch.sinc(heading / (2 * math.pi))
    plans_ego = torch.stack((chord * torch.cos(heading / 2), chord * torch.sin(heading / 2), heading), dim=-1)
    plans_ego[..., 1] += torch.rand(b, 1, generator=g) - 0.5

    pos0 = torch.randn(b, 2, generator=g) * 10
    yaw0 = (torch.rand(b, generator=g) - 0.5) * 6
    speed0 = torch.rand(b, generator=g) * 10
    wheelbase = 2.0 + torch.rand(b, generator=g) * 2

    def run(idx):
        pos, yaw, speed = pos0[idx].clone(), yaw0[idx].clone(), speed0[idx].clone()
        n = pos.shape[0]
        steer, state = torch.zeros(n), TrackerState.zeros(n)
        plan_world, plan_pos0 = ego_to_world(plans_ego[idx], pos, yaw), pos.clone()
        for k in range(steps):
            since = torch.full((n,), k * DT)
            accel, steer_cmd, state = track(plan_world, plan_pos0, since, pos, yaw, speed, wheelbase[idx], state,
                                            CFG, DT)
            pos, yaw, speed, steer = bicycle_step(pos, yaw, speed, steer, accel, steer_cmd, wheelbase[idx], DT)
        return torch.cat((pos, yaw[:, None], speed[:, None], steer[:, None], state.integral[:, None]), dim=1)

    together = run(torch.arange(b))
    assert torch.isfinite(together).all()
    alone = torch.cat([run(torch.tensor([i])) for i in range(b)])
    assert torch.allclose(together, alone, atol=1e-4)


def test_degenerate_inputs_are_finite():
    b = 5
    plan = torch.zeros(b, T, 3)
    plan[1] = 3.0  # every waypoint at the same non-origin point
    plan[2, :, 0] = torch.arange(1, T + 1) * 4.0  # vehicle will sit exactly on a waypoint
    pos = torch.zeros(b, 2)
    pos[2] = torch.tensor([4.0, 0.0])
    pos[3] = torch.tensor([-50.0, 30.0])  # far off the path, target behind
    plan[3, :, 0] = -100.0 + torch.arange(1, T + 1) * 0.0
    accel, steer, state = track(plan, torch.zeros(b, 2), torch.zeros(b), pos, torch.zeros(b), torch.zeros(b), WB,
                                TrackerState.zeros(b), CFG, DT)
    for x in (accel, steer, state.integral, state.prev_error):
        assert torch.isfinite(x).all()
    assert accel[0].item() < 0  # stationary plan brakes
    # A one-waypoint plan works too.
    accel, steer, _ = track(plan[:, :1], torch.zeros(b, 2), 0.3, pos, torch.zeros(b), torch.ones(b), 2.5,
                            TrackerState.zeros(b), CFG, DT)
    assert torch.isfinite(accel).all() and torch.isfinite(steer).all()


def test_target_behind_steers_hard_toward_it():
    plan = torch.tensor([[[-10.0, 1.0, math.pi], [-20.0, 1.0, math.pi]]])
    _, steer, _ = track(plan, torch.tensor([[-5.0, 1.0]]), 0.0, torch.zeros(1, 2), torch.zeros(1),
                        torch.full((1,), 5.0), WB, TrackerState.zeros(1), CFG, DT)
    assert steer.item() > 0.4  # atan(2 L / d), not the near-zero value of sin(alpha) for alpha ~ pi


def test_tracker_state_clone_index_reset():
    state = TrackerState(torch.arange(4.0), torch.arange(4.0) * 2)
    c = state.clone()
    c.integral += 1
    assert torch.equal(state.integral, torch.arange(4.0))
    sub = state.index(torch.tensor([True, False, True, False]))
    assert torch.equal(sub.integral, torch.tensor([0.0, 2.0])) and sub.has_prev.all()
    sub = state.index(torch.tensor([3]))
    assert torch.equal(sub.prev_error, torch.tensor([6.0]))
    r = state.reset(torch.tensor([False, True, False, True]))
    assert torch.equal(r.integral, torch.tensor([0.0, 0.0, 2.0, 0.0]))
    assert torch.equal(r.has_prev, torch.tensor([True, False, True, False]))
    z = TrackerState.zeros(3)
    assert z.integral.shape == (3,) and not z.has_prev.any()


def test_no_derivative_kick_on_first_step():
    plan = torch.stack((4.0 * torch.arange(1, T + 1), torch.zeros(T), torch.zeros(T)), dim=-1)[None]
    accel, _, _ = track(plan, torch.zeros(1, 2), 0.0, torch.zeros(1, 2), torch.zeros(1), torch.full((1,), 8.0), WB,
                        TrackerState.zeros(1), CFG, DT)
    assert accel.item() == pytest.approx(0.0, abs=1e-5)


def test_bad_arguments():
    plan = torch.zeros(1, T, 3)
    args = (plan, torch.zeros(1, 2), 0.0, torch.zeros(1, 2), torch.zeros(1), torch.zeros(1), WB,
            TrackerState.zeros(1), CFG)
    with pytest.raises(CraftError):
        track(*args, 0.0)
    with pytest.raises(CraftError):
        track(torch.zeros(1, T, 2), *args[1:], DT)
    with pytest.raises(CraftError):
        TrackerConfig(lookahead_min=5.0, lookahead_max=2.0)
    with pytest.raises(CraftError):
        TrackerConfig(waypoint_dt=0.0)
