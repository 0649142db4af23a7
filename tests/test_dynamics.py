"""Tests for the kinematic bicycle and pedestrian motion models."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craft.errors import CraftError
from craft.world.dynamics import VehicleLimits, bicycle_step, pedestrian_step, wrap_angle

DT = 0.1
WB = 2.9


def _zeros(n):
    return torch.zeros(n), torch.zeros(n), torch.zeros(n, 2)


def test_wrap_angle_range_and_values():
    a = torch.tensor([0.0, math.pi, -math.pi, 3 * math.pi, -3 * math.pi, 7.0, -7.0, 1e4])
    w = wrap_angle(a)
    assert torch.all(w > -math.pi) and torch.all(w <= math.pi + 1e-6)
    # Same angle modulo 2 pi.
    assert torch.allclose(torch.sin(w), torch.sin(a), atol=1e-4)
    assert torch.allclose(torch.cos(w), torch.cos(a), atol=1e-4)
    assert w[1] == pytest.approx(math.pi) and w[2] == pytest.approx(math.pi)


def test_bicycle_follows_analytic_circle():
    steers = torch.tensor([0.05, 0.2, -0.3, 0.55])
    n = steers.numel()
    v0 = torch.tensor([5.0, 8.0, 3.0, 2.0])
    yaw0 = torch.tensor([0.0, 1.0, -2.0, 3.0])
    pos0 = torch.tensor([[0.0, 0.0], [10.0, -5.0], [-3.0, 4.0], [1.0, 1.0]])
    pos, yaw, speed, steer = pos0.clone(), yaw0.clone(), v0.clone(), steers.clone()
    zero = torch.zeros(n)
    for _ in range(200):
        pos, yaw, speed, steer = bicycle_step(pos, yaw, speed, steer, zero, steers, WB, DT)

    t = 200 * DT
    radius = WB / torch.tan(steers)  # signed: positive turns left
    omega = v0 / radius
    heading = yaw0 + omega * t
    centre = pos0 + radius[:, None] * torch.stack((-torch.sin(yaw0), torch.cos(yaw0)), dim=-1)
    expected = centre + radius[:, None] * torch.stack((torch.sin(heading), -torch.cos(heading)), dim=-1)
    assert torch.allclose(pos, expected, atol=1e-3)
    assert torch.allclose(torch.sin(yaw), torch.sin(heading), atol=1e-4)
    assert torch.allclose(torch.cos(yaw), torch.cos(heading), atol=1e-4)
    assert torch.allclose(speed, v0)


def test_bicycle_straight_line_at_zero_steer():
    yaw0 = torch.tensor([0.0, 0.7, -2.5])
    pos, yaw, speed, steer = torch.zeros(3, 2), yaw0.clone(), torch.full((3,), 7.0), torch.zeros(3)
    for _ in range(50):
        pos, yaw, speed, steer = bicycle_step(pos, yaw, speed, steer, torch.zeros(3), torch.zeros(3), WB, DT)
    expected = 7.0 * 5.0 * torch.stack((torch.cos(yaw0), torch.sin(yaw0)), dim=-1)
    assert torch.allclose(pos, expected, atol=1e-4)
    assert torch.allclose(yaw, yaw0)


def test_bicycle_distance_uses_average_speed():
    pos, yaw, speed, steer = bicycle_step(
        torch.zeros(1, 2), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.tensor([2.0]), torch.zeros(1), WB, 1.0
    )
    assert speed.item() == pytest.approx(2.0)
    assert pos[0, 0].item() == pytest.approx(1.0)  # 0.5 * (0 + 2) * 1 s


def test_bicycle_speed_clamps():
    lim = VehicleLimits()
    # No reverse: braking at standstill stays at zero and does not move.
    pos, yaw, speed, _ = bicycle_step(
        torch.zeros(1, 2), torch.zeros(1), torch.tensor([0.3]), torch.zeros(1), torch.tensor([-8.0]), torch.zeros(1),
        WB, DT,
    )
    assert speed.item() == 0.0
    assert pos[0, 0].item() >= 0.0
    # Top speed.
    speed = torch.tensor([29.9])
    for _ in range(20):
        _, _, speed, _ = bicycle_step(
            torch.zeros(1, 2), torch.zeros(1), speed, torch.zeros(1), torch.tensor([100.0]), torch.zeros(1),
            WB, DT, max_speed=lim.max_speed,
        )
    assert speed.item() == pytest.approx(lim.max_speed)


def test_bicycle_accel_limits():
    speed0 = torch.tensor([10.0, 10.0])
    cmd = torch.tensor([50.0, -50.0])
    _, _, speed, _ = bicycle_step(
        torch.zeros(2, 2), torch.zeros(2), speed0, torch.zeros(2), cmd, torch.zeros(2), WB, DT,
        max_accel=3.5, max_brake=8.0,
    )
    assert torch.allclose(speed, torch.tensor([10.35, 9.2]))


def test_bicycle_steer_rate_and_range_limits():
    steer = torch.zeros(2)
    cmd = torch.tensor([1.0, -1.0])
    history = []
    for _ in range(10):
        _, _, _, steer = bicycle_step(
            torch.zeros(2, 2), torch.zeros(2), torch.full((2,), 5.0), steer, torch.zeros(2), cmd, WB, DT,
            max_steer=0.6, max_steer_rate=1.2,
        )
        history.append(steer)
    history = torch.stack(history)
    steps = torch.diff(torch.cat((torch.zeros(1, 2), history)), dim=0)
    assert torch.all(steps.abs() <= 1.2 * DT + 1e-6)
    assert history[0, 0].item() == pytest.approx(0.12)
    assert torch.allclose(history[-1], torch.tensor([0.6, -0.6]))


def test_bicycle_mixed_limits_broadcast():
    n = 3
    max_accel = torch.tensor([1.0, 2.0, 3.0])
    max_steer = torch.tensor([0.2, 0.4, 0.6])
    max_speed = torch.tensor([5.0, 20.0, 30.0])
    wheelbase = torch.tensor([1.0, 2.9, 6.0])
    pos, yaw, speed, steer = torch.zeros(n, 2), torch.zeros(n), torch.full((n,), 4.95), torch.zeros(n)
    pos, yaw, speed, steer = bicycle_step(
        pos, yaw, speed, steer, torch.full((n,), 10.0), torch.full((n,), 1.0), wheelbase, DT,
        max_accel=max_accel, max_brake=8.0, max_steer=max_steer, max_steer_rate=10.0, max_speed=max_speed,
    )
    assert torch.allclose(speed, torch.tensor([5.0, 5.15, 5.25]))
    assert torch.allclose(steer, max_steer)
    # Each row matches stepping that vehicle alone.
    for i in range(n):
        p1, y1, s1, st1 = bicycle_step(
            torch.zeros(1, 2), torch.zeros(1), torch.tensor([4.95]), torch.zeros(1), torch.tensor([10.0]),
            torch.tensor([1.0]), float(wheelbase[i]), DT, max_accel=float(max_accel[i]), max_brake=8.0,
            max_steer=float(max_steer[i]), max_steer_rate=10.0, max_speed=float(max_speed[i]),
        )
        assert torch.allclose(p1[0], pos[i], atol=1e-6) and torch.allclose(y1[0], yaw[i], atol=1e-6)


def test_bicycle_bad_dt():
    args = (torch.zeros(1, 2), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), WB)
    with pytest.raises(CraftError):
        bicycle_step(*args, 0.0)
    with pytest.raises(CraftError):
        bicycle_step(*args, -0.1)


def test_vehicle_limits_validation():
    VehicleLimits(max_steer=0.3)
    with pytest.raises(CraftError):
        VehicleLimits(max_brake=-1.0)
    with pytest.raises(CraftError):
        VehicleLimits(max_steer=2.0)


@settings(max_examples=60, deadline=None)
@given(
    speed=st.floats(0.0, 40.0),
    steer=st.floats(-0.6, 0.6),
    accel_cmd=st.floats(-1e9, 1e9),
    steer_cmd=st.floats(-1e9, 1e9),
    yaw=st.floats(-10.0, 10.0),
)
def test_bicycle_finite_for_extreme_inputs(speed, steer, accel_cmd, steer_cmd, yaw):
    t = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
    pos, y, v, s = bicycle_step(torch.zeros(1, 2), t(yaw), t(speed), t(steer), t(accel_cmd), t(steer_cmd), WB, DT)
    for x in (pos, y, v, s):
        assert torch.isfinite(x).all()
    assert 0.0 <= v.item() <= 30.0
    assert -math.pi < y.item() <= math.pi + 1e-6


def test_bicycle_zero_everything_and_infinite_commands():
    pos, yaw, speed, steer = bicycle_step(
        torch.zeros(2, 2), torch.zeros(2), torch.zeros(2), torch.zeros(2),
        torch.tensor([float("inf"), float("-inf")]), torch.tensor([float("inf"), float("-inf")]), 0.0, DT,
    )
    for x in (pos, yaw, speed, steer):
        assert torch.isfinite(x).all()


def test_pedestrian_turn_rate_and_accel_limits():
    pos, yaw, speed = torch.zeros(2, 2), torch.tensor([0.0, 3.0]), torch.zeros(2)
    # Second target is across the +-pi seam: the short way round is counter-clockwise.
    yaw_cmd = torch.tensor([2.0, -3.0])
    speed_cmd = torch.tensor([10.0, 1.0])
    yaws, speeds = [], []
    for _ in range(10):
        pos, yaw, speed = pedestrian_step(pos, yaw, speed, yaw_cmd, speed_cmd, DT,
                                          max_accel=1.5, max_turn_rate=2.0, max_speed=2.5)
        yaws.append(yaw)
        speeds.append(speed)
    yaws, speeds = torch.stack(yaws), torch.stack(speeds)
    assert yaws[0, 0].item() == pytest.approx(0.2)
    assert yaws[-1, 0].item() == pytest.approx(2.0)
    # Crossed the seam: 3.0 + 0.2 wraps to about -3.083, then settles at -3.0.
    assert yaws[0, 1].item() == pytest.approx(3.2 - 2 * math.pi, abs=1e-5)
    assert yaws[-1, 1].item() == pytest.approx(-3.0, abs=1e-5)
    dyaw = wrap_angle(torch.diff(yaws, dim=0))
    assert torch.all(dyaw.abs() <= 2.0 * DT + 1e-5)
    dv = torch.diff(torch.cat((torch.zeros(1, 2), speeds)), dim=0)
    assert torch.all(dv.abs() <= 1.5 * DT + 1e-5)
    assert speeds[-1, 0].item() == pytest.approx(1.5)
    assert speeds[-1, 1].item() == pytest.approx(1.0)


def test_pedestrian_moves_along_heading_and_respects_max_speed():
    pos, yaw, speed = torch.zeros(1, 2), torch.tensor([math.pi / 2]), torch.tensor([1.0])
    pos, yaw, speed = pedestrian_step(pos, yaw, speed, yaw, torch.tensor([100.0]), 1.0,
                                      max_accel=5.0, max_turn_rate=1.0, max_speed=2.0)
    assert speed.item() == pytest.approx(2.0)
    assert pos[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert pos[0, 1].item() == pytest.approx(1.5)
    with pytest.raises(CraftError):
        pedestrian_step(pos, yaw, speed, yaw, speed, 0.0)
