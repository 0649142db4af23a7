"""Batched motion models for the agents of the driving world.

Two models are provided, both pure functions on torch tensors of any leading
batch shape ``(...)``:

* :func:`bicycle_step` -- a kinematic bicycle for cars, trucks and cyclists.
  The state is the reference point ``pos`` (the rear axle: it always moves
  along the heading), the heading ``yaw``, the scalar ``speed`` (never
  negative: there is no reverse gear) and the front-wheel angle ``steer``.
  The steering angle is an actuator with a rate limit; the commanded
  acceleration is clipped to the vehicle's braking / acceleration capability.
  Over one step the vehicle travels the distance covered at the *average* of
  the old and new speed, along a circular arc of curvature
  ``tan(steer) / wheelbase``. The arc is integrated in closed form (chord of
  length ``s * sinc(dyaw / 2)`` in the direction ``yaw + dyaw / 2``), so a run
  at constant speed and steering lies exactly on the analytic circle of radius
  ``wheelbase / tan(steer)``, and the straight-line limit needs no special case.

* :func:`pedestrian_step` -- a point that turns toward a commanded heading with
  a bounded turn rate and changes speed toward a commanded speed with a bounded
  acceleration.

Angles are radians, counter-clockwise; yaw outputs are wrapped to (-pi, pi].
Limit arguments may be Python floats or tensors broadcastable to the batch
shape, so agents with different capabilities can be stepped together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from craft.errors import CraftError

# Steering angles are kept strictly inside (-pi/2, pi/2) so tan() stays finite.
_STEER_ABS_CAP = 1.5
# Wheelbases below this (metres) are treated as this, to keep the curvature finite.
_MIN_WHEELBASE = 1e-3

__all__ = ["VehicleLimits", "bicycle_step", "pedestrian_step", "wrap_angle"]


@dataclass(frozen=True)
class VehicleLimits:
    """Actuation limits of a vehicle (defaults: an ordinary passenger car)."""

    max_accel: float = 3.5
    """Largest forward acceleration, m/s^2."""
    max_brake: float = 8.0
    """Largest braking deceleration as a positive number, m/s^2."""
    max_steer: float = 0.6
    """Largest front-wheel angle either way, rad."""
    max_steer_rate: float = 1.2
    """Largest rate of change of the front-wheel angle, rad/s."""
    max_speed: float = 30.0
    """Top speed, m/s."""

    def __post_init__(self) -> None:
        for name in ("max_accel", "max_brake", "max_steer_rate", "max_speed"):
            if not getattr(self, name) > 0:
                raise CraftError(f"VehicleLimits.{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.max_steer < _STEER_ABS_CAP:
            raise CraftError(f"VehicleLimits.max_steer must be in (0, {_STEER_ABS_CAP}) rad, got {self.max_steer}")


def wrap_angle(a: Tensor) -> Tensor:
    """Wrap angles to (-pi, pi].

    a: (...) radians, any real values.
    Returns (...) with the same dtype/device.
    """
    two_pi = 2.0 * math.pi
    wrapped = a - two_pi * torch.ceil((a - math.pi) / two_pi)
    # Rounding can leave a value at (or a hair below) -pi; fold it to the top end.
    return torch.where(wrapped <= -math.pi, wrapped + two_pi, wrapped)


def _check_dt(dt: float) -> None:
    if not isinstance(dt, (int, float)) or not dt > 0 or not math.isfinite(dt):
        raise CraftError(f"dt must be a positive finite number of seconds, got {dt!r}")


def _as(x: float | Tensor, like: Tensor) -> Tensor:
    """A float or tensor as a tensor on ``like``'s device and dtype."""
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def _advance_on_arc(pos: Tensor, yaw: Tensor, dist: Tensor, dyaw: Tensor) -> Tensor:
    """Move ``pos`` along a circular arc of length ``dist`` that turns by ``dyaw``.

    pos: (..., 2); yaw, dist, dyaw: (...). The chord of the arc has length
    ``dist * sin(dyaw/2) / (dyaw/2)`` and points along ``yaw + dyaw/2``;
    ``torch.sinc`` gives the straight-line limit exactly at ``dyaw == 0``.
    """
    chord = dist * torch.sinc(dyaw / (2.0 * math.pi))
    mid_yaw = yaw + 0.5 * dyaw
    step = torch.stack((chord * torch.cos(mid_yaw), chord * torch.sin(mid_yaw)), dim=-1)
    return pos + step


def bicycle_step(
    pos: Tensor,
    yaw: Tensor,
    speed: Tensor,
    steer: Tensor,
    accel_cmd: Tensor,
    steer_cmd: Tensor,
    wheelbase: float | Tensor,
    dt: float,
    max_accel: float | Tensor = 3.5,
    max_brake: float | Tensor = 8.0,
    max_steer: float | Tensor = 0.6,
    max_steer_rate: float | Tensor = 1.2,
    max_speed: float | Tensor = 30.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Advance a kinematic bicycle by one step of ``dt`` seconds.

    pos: (..., 2) rear-axle position, m; yaw: (...) heading, rad;
    speed: (...) m/s (>= 0); steer: (...) current front-wheel angle, rad;
    accel_cmd: (...) commanded acceleration, m/s^2 (negative = brake);
    steer_cmd: (...) commanded front-wheel angle, rad;
    wheelbase and the limits: floats or tensors broadcastable to (...).

    Returns ``(pos (..., 2), yaw (...), speed (...), steer (...))`` after the step,
    with yaw wrapped to (-pi, pi].
    """
    _check_dt(dt)
    wheelbase = _as(wheelbase, speed).clamp_min(_MIN_WHEELBASE)
    max_accel = _as(max_accel, speed).clamp_min(0.0)
    max_brake = _as(max_brake, speed).clamp_min(0.0)
    max_steer = _as(max_steer, speed).clamp(0.0, _STEER_ABS_CAP)
    max_steer_rate = _as(max_steer_rate, speed).clamp_min(0.0)
    max_speed = _as(max_speed, speed).clamp_min(0.0)

    # Steering actuator: rate-limited move toward the command, then range-limited.
    max_delta = max_steer_rate * dt
    steer_delta = torch.clamp(steer_cmd - steer, -max_delta, max_delta)
    new_steer = torch.clamp(steer + steer_delta, -max_steer, max_steer)

    # Longitudinal: clipped acceleration, speed kept in [0, max_speed].
    accel = torch.clamp(accel_cmd, -max_brake, max_accel)
    new_speed = torch.clamp(speed + accel * dt, torch.zeros_like(max_speed), max_speed)

    # Travel along the arc of the new steering angle at the step's average speed.
    dist = 0.5 * (speed + new_speed) * dt
    dyaw = dist * torch.tan(new_steer) / wheelbase
    new_pos = _advance_on_arc(pos, yaw, dist, dyaw)
    new_yaw = wrap_angle(yaw + dyaw)
    return new_pos, new_yaw, new_speed, new_steer


def pedestrian_step(
    pos: Tensor,
    yaw: Tensor,
    speed: Tensor,
    yaw_cmd: Tensor,
    speed_cmd: Tensor,
    dt: float,
    max_accel: float | Tensor = 1.5,
    max_turn_rate: float | Tensor = 3.0,
    max_speed: float | Tensor = 3.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Advance a pedestrian (a steerable point) by one step of ``dt`` seconds.

    pos: (..., 2) m; yaw: (...) rad; speed: (...) m/s (>= 0);
    yaw_cmd: (...) desired heading, rad; speed_cmd: (...) desired speed, m/s;
    limits: floats or tensors broadcastable to (...).

    The heading turns toward ``yaw_cmd`` the short way round by at most
    ``max_turn_rate * dt``; the speed moves toward ``speed_cmd`` (clipped to
    [0, max_speed]) by at most ``max_accel * dt``. The point moves at the average
    speed along the arc swept by the heading during the step.

    Returns ``(pos (..., 2), yaw (...), speed (...))``, yaw wrapped to (-pi, pi].
    """
    _check_dt(dt)
    max_accel = _as(max_accel, speed).clamp_min(0.0)
    max_turn_rate = _as(max_turn_rate, speed).clamp_min(0.0)
    max_speed = _as(max_speed, speed).clamp_min(0.0)
    zero = torch.zeros_like(max_speed)

    max_dyaw = max_turn_rate * dt
    dyaw = torch.clamp(wrap_angle(yaw_cmd - yaw), -max_dyaw, max_dyaw)

    target = torch.clamp(speed_cmd, zero, max_speed)
    max_dv = max_accel * dt
    new_speed = torch.clamp(speed + torch.clamp(target - speed, -max_dv, max_dv), zero, max_speed)

    dist = 0.5 * (speed + new_speed) * dt
    new_pos = _advance_on_arc(pos, yaw, dist, dyaw)
    return new_pos, wrap_angle(yaw + dyaw), new_speed
