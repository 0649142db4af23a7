"""The trajectory tracker shared by the ego, the expert and the counterfactual world.

Policies emit plans as ``traj (B, T, 3)`` in the ego frame at planning time:
waypoint ``i`` is ``(x, y, yaw)`` at ``(i + 1) * waypoint_dt`` seconds after the
plan was made. The plan's time-0 point is the ego position when it planned
(``plan_pos0``). Between re-plans the vehicle keeps executing the same plan, so
the tracker works on the plan in the world frame plus the time elapsed since
planning.

Each step :func:`track` turns the plan into actuator commands for
:func:`craft.world.dynamics.bicycle_step`:

* **Longitudinal** -- the plan's speed profile is the length of each segment of
  the polyline ``plan_pos0 -> waypoint_1 -> ... -> waypoint_T`` divided by
  ``waypoint_dt``, placed at the segment's mid-time. It is read (linear
  interpolation, held flat past either end) at ``time_since_plan +
  speed_lookahead`` and a PID on ``target - speed`` gives the acceleration
  command (the integral only accumulates small errors, and is bounded). When the target is below ``stop_speed`` the tracker brakes hard
  (``-stop_decel``) instead and clears the PID integral.
* **Lateral** -- pure pursuit. The vehicle position is projected onto the
  nearest point of the path polyline (all segments at once), the target is the
  point ``Ld`` further along the path (continuing straight past the last
  waypoint), with ``Ld = clamp(lookahead_min + lookahead_gain * speed,
  lookahead_min, lookahead_max)``. The steering angle is
  ``atan(2 * wheelbase * sin(alpha) / d)`` with ``alpha`` the bearing of the
  target in the vehicle frame and ``d`` its distance (the curvature of the
  circle through the target, which is exact on a circular path). A target
  behind the vehicle asks for the tightest turn toward its side.
* **Stationary plans** (every waypoint within ``stationary_radius`` of
  ``plan_pos0``) -- brake, and steer the heading toward the plan's final yaw.

Everything is batched over ``B`` with fixed-size tensor operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from craft.errors import CraftError
from craft.world.dynamics import wrap_angle

__all__ = ["TrackerConfig", "TrackerState", "PlanGeometry", "ego_to_world", "world_to_ego", "prepare_plan", "track",
           "track_prepared"]

_EPS = 1e-6


def ego_to_world(traj_ego: Tensor, pos: Tensor, yaw: Tensor) -> Tensor:
    """Express ego-frame poses in the world frame.

    traj_ego: (..., T, 3) poses (x forward, y left, yaw) relative to the ego;
    pos: (..., 2) ego world position; yaw: (...) ego world heading.
    Returns (..., T, 3) world poses, yaw wrapped to (-pi, pi].
    """
    c = torch.cos(yaw)[..., None]
    s = torch.sin(yaw)[..., None]
    x, y = traj_ego[..., 0], traj_ego[..., 1]
    wx = pos[..., None, 0] + c * x - s * y
    wy = pos[..., None, 1] + s * x + c * y
    wyaw = wrap_angle(traj_ego[..., 2] + yaw[..., None])
    return torch.stack((wx, wy, wyaw), dim=-1)


def world_to_ego(traj_world: Tensor, pos: Tensor, yaw: Tensor) -> Tensor:
    """Express world-frame poses in the ego frame (inverse of :func:`ego_to_world`).

    traj_world: (..., T, 3) world poses; pos: (..., 2) ego world position;
    yaw: (...) ego world heading. Returns (..., T, 3) ego-frame poses.
    """
    c = torch.cos(yaw)[..., None]
    s = torch.sin(yaw)[..., None]
    dx = traj_world[..., 0] - pos[..., None, 0]
    dy = traj_world[..., 1] - pos[..., None, 1]
    ex = c * dx + s * dy
    ey = -s * dx + c * dy
    eyaw = wrap_angle(traj_world[..., 2] - yaw[..., None])
    return torch.stack((ex, ey, eyaw), dim=-1)


@dataclass(frozen=True)
class TrackerConfig:
    """Gains and geometry of the plan tracker."""

    waypoint_dt: float = 0.5
    """Time between consecutive plan waypoints, s (waypoint i is at (i+1)*waypoint_dt)."""
    lookahead_min: float = 3.0
    """Smallest pure-pursuit lookahead distance, m."""
    lookahead_gain: float = 0.8
    """Lookahead growth with speed, s (Ld = lookahead_min + lookahead_gain * speed)."""
    lookahead_max: float = 12.0
    """Largest pure-pursuit lookahead distance, m."""
    kp: float = 1.5
    """Proportional speed gain, (m/s^2) per (m/s)."""
    ki: float = 0.2
    """Integral speed gain, (m/s^2) per (m/s * s)."""
    kd: float = 0.05
    """Derivative speed gain, (m/s^2) per (m/s^2)."""
    integral_limit: float = 2.0
    """Bound on the magnitude of the speed-error integral, m/s * s (anti-windup)."""
    integral_band: float = 1.0
    """Speed errors larger than this, m/s, are not integrated (no wind-up during big speed changes)."""
    speed_lookahead: float = 1.0
    """How far ahead of the current plan time the target speed is read, s."""
    stop_speed: float = 0.3
    """Target speeds below this, m/s, mean 'stop': brake hard instead of using the PID."""
    stop_decel: float = 6.0
    """Deceleration commanded when stopping, m/s^2 (positive)."""
    stationary_radius: float = 0.5
    """A plan whose waypoints all lie within this distance of its start, m, is a stop-in-place plan."""

    def __post_init__(self) -> None:
        positive = ("waypoint_dt", "lookahead_min", "lookahead_max", "stop_decel")
        for name in positive:
            if not getattr(self, name) > 0:
                raise CraftError(f"TrackerConfig.{name} must be positive, got {getattr(self, name)}")
        non_negative = ("lookahead_gain", "kp", "ki", "kd", "integral_limit", "integral_band", "speed_lookahead",
                        "stop_speed", "stationary_radius")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise CraftError(f"TrackerConfig.{name} must be non-negative, got {getattr(self, name)}")
        if self.lookahead_max < self.lookahead_min:
            raise CraftError(
                f"TrackerConfig.lookahead_max ({self.lookahead_max}) must be >= lookahead_min ({self.lookahead_min})"
            )


@dataclass
class TrackerState:
    """Per-vehicle memory of the speed PID.

    integral: (B,) accumulated speed error, m/s * s.
    prev_error: (B,) speed error at the previous step, m/s.
    has_prev: (B,) bool, whether ``prev_error`` holds a real previous error (no
        derivative kick on the first step); ``None`` means all True.
    """

    integral: Tensor
    prev_error: Tensor
    has_prev: Tensor | None = None

    @staticmethod
    def zeros(batch: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> TrackerState:
        """A fresh state for ``batch`` vehicles (no history)."""
        z = torch.zeros(batch, device=device, dtype=dtype)
        return TrackerState(z, z.clone(), torch.zeros(batch, device=device, dtype=torch.bool))

    def prev_valid(self) -> Tensor:
        """(B,) bool: whether ``prev_error`` holds a real previous error."""
        if self.has_prev is None:
            return torch.ones_like(self.prev_error, dtype=torch.bool)
        return self.has_prev

    def clone(self) -> TrackerState:
        """An independent copy."""
        return TrackerState(self.integral.clone(), self.prev_error.clone(), self.prev_valid().clone())

    def index(self, idx: Tensor | slice | int) -> TrackerState:
        """The state of a subset of vehicles (boolean mask or index tensor over B)."""
        return TrackerState(self.integral[idx], self.prev_error[idx], self.prev_valid()[idx])

    def reset(self, mask: Tensor) -> TrackerState:
        """A copy with the vehicles selected by the (B,) bool ``mask`` returned to a fresh state."""
        zero = torch.zeros_like(self.integral)
        return TrackerState(
            torch.where(mask, zero, self.integral),
            torch.where(mask, zero, self.prev_error),
            self.prev_valid() & ~mask,
        )


def _plan_speed_at(points: Tensor, t: Tensor, waypoint_dt: float) -> Tensor:
    """Speed of the plan at time ``t`` after planning.

    points: (B, T+1, 2) the plan polyline starting at the time-0 point;
    t: (B,) seconds. Segment k's average speed sits at time (k + 0.5) * waypoint_dt;
    the profile is linear in between and held flat beyond both ends.
    """
    seg_speed = torch.linalg.vector_norm(points[:, 1:] - points[:, :-1], dim=-1) / waypoint_dt  # (B, T)
    return _plan_speed_from(seg_speed, t, waypoint_dt)


@dataclass
class PlanGeometry:
    """Quantities of a plan that do not change while it is executed (see :func:`prepare_plan`).

    points: (B, T+1, 2) plan polyline from the time-0 point; final_yaw: (B,); seg_speed: (B, T) average
    speed of each segment; stationary: (B,) bool stop-in-place plan; a, seg: (B, T, 2) segment starts
    and vectors; seg_len2, seg_len: (B, T); cum: (B, T+1) arc length at the points; total: (B,);
    direction: (B, 2) unit direction in which the path continues past its end; ax, ay, sx, sy: (B, T)
    contiguous x / y components of ``a`` and ``seg`` (the per-step projection avoids size-2 reductions).
    """

    points: Tensor
    final_yaw: Tensor
    seg_speed: Tensor
    stationary: Tensor
    a: Tensor
    seg: Tensor
    seg_len2: Tensor
    seg_len: Tensor
    cum: Tensor
    total: Tensor
    direction: Tensor
    ax: Tensor
    ay: Tensor
    sx: Tensor
    sy: Tensor
    seg_len2c: Tensor


def prepare_plan(plan_world: Tensor, plan_pos0: Tensor, cfg: TrackerConfig) -> PlanGeometry:
    """Precompute the fixed geometry of plans ``plan_world (B, T, 3)`` starting at ``plan_pos0 (B, 2)``.

    :func:`track` calls this every step; callers that execute one plan for many steps (the
    counterfactual world) call it once and use :func:`track_prepared` (same results).
    """
    if plan_world.ndim != 3 or plan_world.shape[-1] != 3 or plan_world.shape[1] < 1:
        raise CraftError(f"plan_world must have shape (B, T, 3) with T >= 1, got {tuple(plan_world.shape)}")
    points = torch.cat((plan_pos0[:, None, :], plan_world[..., :2]), dim=1)  # (B, T+1, 2)
    final_yaw = plan_world[:, -1, 2]
    seg_speed = torch.linalg.vector_norm(points[:, 1:] - points[:, :-1], dim=-1) / cfg.waypoint_dt  # (B, T)
    spread = torch.linalg.vector_norm(plan_world[..., :2] - plan_pos0[:, None, :], dim=-1).amax(dim=1)
    stationary = spread <= cfg.stationary_radius

    a = points[:, :-1]  # (B, T, 2)
    seg = points[:, 1:] - a  # (B, T, 2)
    seg_len2 = (seg * seg).sum(-1)  # (B, T)
    seg_len = torch.sqrt(seg_len2)
    n_seg = seg.shape[1]
    cum = torch.cat((torch.zeros_like(seg_len[:, :1]), torch.cumsum(seg_len, dim=1)), dim=1)  # (B, T+1)
    # Beyond the end: straight on along the last segment that has a length.
    idx = torch.arange(n_seg, device=points.device)
    has_len = seg_len > _EPS
    last = torch.where(has_len, idx, torch.full_like(idx, -1)).amax(dim=1, keepdim=True)  # (B, 1)
    last_seg = seg.gather(1, last.clamp_min(0)[..., None].expand(-1, -1, 2)).squeeze(1)
    last_dir = last_seg / seg_len.gather(1, last.clamp_min(0)).clamp_min(_EPS)
    fallback = torch.stack((torch.cos(final_yaw), torch.sin(final_yaw)), dim=-1)
    direction = torch.where((last >= 0), last_dir, fallback)
    return PlanGeometry(points, final_yaw, seg_speed, stationary, a, seg, seg_len2, seg_len, cum.contiguous(),
                        cum[:, -1], direction, a[..., 0].contiguous(), a[..., 1].contiguous(),
                        seg[..., 0].contiguous(), seg[..., 1].contiguous(), seg_len2.clamp_min(_EPS))


def _plan_speed_from(seg_speed: Tensor, t: Tensor, waypoint_dt: float) -> Tensor:
    """Speed of the plan at time ``t (B,)`` from its segment speeds ``seg_speed (B, T)`` (see below)."""
    n_seg = seg_speed.shape[1]
    if n_seg == 1:
        return seg_speed[:, 0]
    u = (t / waypoint_dt - 0.5).clamp(0.0, float(n_seg - 1))
    i0 = torch.floor(u).clamp(max=n_seg - 2).long()
    frac = u - i0.to(u.dtype)
    v0 = seg_speed.gather(1, i0[:, None]).squeeze(1)
    v1 = seg_speed.gather(1, (i0 + 1)[:, None]).squeeze(1)
    return v0 + frac * (v1 - v0)


def _plan_speed_scalar(seg_speed: Tensor, t: float, cfg: TrackerConfig, dtype: torch.dtype) -> Tensor:
    """:func:`_plan_speed_from` at ``t + cfg.speed_lookahead`` for one time ``t`` shared by the batch (the
    interpolation position is computed once, with the same ``dtype`` rounding as the batched path)."""
    n_seg = seg_speed.shape[1]
    if n_seg == 1:
        return seg_speed[:, 0]
    tt = torch.tensor(t, dtype=dtype) + cfg.speed_lookahead
    u = (tt / cfg.waypoint_dt - 0.5).clamp(0.0, float(n_seg - 1))
    i0 = min(int(torch.floor(u)), n_seg - 2)
    frac = float(u - i0)
    v0 = seg_speed[:, i0]
    return v0 + frac * (seg_speed[:, i0 + 1] - v0)


def _lookahead_xy(geom: PlanGeometry, pos: Tensor, ld: Tensor) -> tuple[Tensor, Tensor]:
    """x and y (each (B,)) of the point ``ld (B,)`` metres along the prepared path beyond the projection
    of ``pos (B, 2)``."""
    seg_len, cum = geom.seg_len, geom.cum
    n_seg = seg_len.shape[1]
    # Nearest point on every segment, then the nearest segment (x / y kept apart: no size-2 reductions).
    px, py = pos[:, 0:1], pos[:, 1:2]
    rx, ry = px - geom.ax, py - geom.ay
    u = ((rx * geom.sx + ry * geom.sy) / geom.seg_len2c).clamp(0.0, 1.0)
    fx = px - (geom.ax + u * geom.sx)
    fy = py - (geom.ay + u * geom.sy)
    dist2 = fx * fx + fy * fy
    k = dist2.min(dim=1, keepdim=True).indices  # (B, 1), the first minimum (as argmin; faster on CPU)

    s_proj = cum.gather(1, k).squeeze(1) + u.gather(1, k).squeeze(1) * seg_len.gather(1, k).squeeze(1)
    s_target = s_proj + ld
    total = geom.total

    # Point at arc length s_target inside the path.
    j = (torch.searchsorted(cum, s_target[:, None].contiguous()) - 1).clamp(0, n_seg - 1)  # (B, 1)
    j_len = seg_len.gather(1, j).squeeze(1)
    j_frac = ((s_target - cum.gather(1, j).squeeze(1)) / j_len.clamp_min(_EPS)).clamp(0.0, 1.0)
    in_x = geom.ax.gather(1, j).squeeze(1) + j_frac * geom.sx.gather(1, j).squeeze(1)
    in_y = geom.ay.gather(1, j).squeeze(1) + j_frac * geom.sy.gather(1, j).squeeze(1)

    over = (s_target - total).clamp_min(0.0)
    end = geom.points[:, -1]
    past = s_target > total
    return (torch.where(past, end[:, 0] + over * geom.direction[:, 0], in_x),
            torch.where(past, end[:, 1] + over * geom.direction[:, 1], in_y))


def _lookahead_from(geom: PlanGeometry, pos: Tensor, ld: Tensor) -> Tensor:
    """The point ``ld (B,)`` metres along the prepared path beyond the projection of ``pos (B, 2)``. (B, 2)."""
    return torch.stack(_lookahead_xy(geom, pos, ld), dim=-1)


def _lookahead_point(points: Tensor, pos: Tensor, ld: Tensor, fallback_yaw: Tensor) -> Tensor:
    """The point ``ld`` metres along the path beyond the projection of ``pos``.

    points: (B, T+1, 2) path polyline; pos: (B, 2); ld: (B,);
    fallback_yaw: (B,) direction to extend a path that has no length at all.
    Returns (B, 2). Past the end the path continues straight along its last
    non-degenerate segment.
    """
    plan = torch.cat((points[:, 1:], fallback_yaw[:, None, None].expand(-1, points.shape[1] - 1, 1)), dim=-1)
    geom = prepare_plan(plan, points[:, 0], TrackerConfig())
    return _lookahead_from(geom, pos, ld)


def track(
    plan_world: Tensor,
    plan_pos0: Tensor,
    time_since_plan: Tensor | float,
    pos: Tensor,
    yaw: Tensor,
    speed: Tensor,
    wheelbase: Tensor | float,
    state: TrackerState,
    cfg: TrackerConfig,
    dt: float,
) -> tuple[Tensor, Tensor, TrackerState]:
    """Actuator commands that follow a plan for one step.

    plan_world: (B, T, 3) plan waypoints (x, y, yaw) in the world frame;
    plan_pos0: (B, 2) the plan's time-0 point (ego position when it planned);
    time_since_plan: (B,) or float, seconds since the plan was made;
    pos: (B, 2), yaw: (B,), speed: (B,) current vehicle state;
    wheelbase: (B,) or float, m; state: the PID memory from the previous step;
    cfg: tracker gains; dt: step length, s.

    Returns ``(accel_cmd (B,), steer_cmd (B,), new_state)``. The commands are
    unclipped requests; :func:`craft.world.dynamics.bicycle_step` applies the
    vehicle's limits.
    """
    if not isinstance(dt, (int, float)) or not dt > 0 or not math.isfinite(dt):
        raise CraftError(f"dt must be a positive finite number of seconds, got {dt!r}")
    geom = prepare_plan(plan_world, plan_pos0, cfg)
    return track_prepared(geom, time_since_plan, pos, yaw, speed, wheelbase, state, cfg, dt)


def track_prepared(
    geom: PlanGeometry,
    time_since_plan: Tensor | float,
    pos: Tensor,
    yaw: Tensor,
    speed: Tensor,
    wheelbase: Tensor | float,
    state: TrackerState,
    cfg: TrackerConfig,
    dt: float,
) -> tuple[Tensor, Tensor, TrackerState]:
    """:func:`track` on a plan prepared once with :func:`prepare_plan` (identical results)."""
    dtype, device = speed.dtype, speed.device
    wheelbase = torch.as_tensor(wheelbase, dtype=dtype, device=device).expand_as(speed).clamp_min(1e-3)
    final_yaw = geom.final_yaw

    # ---- longitudinal: PID on the plan's speed a little ahead in time ----
    if isinstance(time_since_plan, (int, float)):  # one time for all: interpolate at a scalar position
        target = _plan_speed_scalar(geom.seg_speed, time_since_plan + 0.0, cfg, dtype)
    else:
        t = torch.as_tensor(time_since_plan, dtype=dtype, device=device).expand_as(speed)
        target = _plan_speed_from(geom.seg_speed, t + cfg.speed_lookahead, cfg.waypoint_dt)
    stationary = geom.stationary
    stopping = stationary | (target < cfg.stop_speed)

    error = target - speed
    integrate = error.abs() <= cfg.integral_band
    integral = torch.where(integrate, state.integral + error * dt, state.integral)
    integral = integral.clamp(-cfg.integral_limit, cfg.integral_limit)
    derivative = torch.where(state.prev_valid(), (error - state.prev_error) / dt, 0.0)
    pid = cfg.kp * error + cfg.ki * integral + cfg.kd * derivative
    accel_cmd = torch.where(stopping, -cfg.stop_decel, pid)
    integral = torch.where(stopping, 0.0, integral)

    # ---- lateral: pure pursuit on the path polyline ----
    ld = (cfg.lookahead_min + cfg.lookahead_gain * speed).clamp(cfg.lookahead_min, cfg.lookahead_max)
    goal_x, goal_y = _lookahead_xy(geom, pos, ld)
    c, s = torch.cos(yaw), torch.sin(yaw)
    dx, dy = goal_x - pos[:, 0], goal_y - pos[:, 1]
    gx, gy = c * dx + s * dy, -s * dx + c * dy
    dist = torch.sqrt(gx * gx + gy * gy).clamp_min(_EPS)
    sin_alpha = gy / dist
    # A target behind the vehicle asks for the tightest turn toward its side.
    behind = torch.where(gy >= 0, 1.0, -1.0).to(gy.dtype)  # (scalar operands: no filled temporaries)
    sin_alpha = torch.where(gx < 0, behind, sin_alpha)
    pursuit = torch.atan(2.0 * wheelbase * sin_alpha / dist)

    # Stationary plan: turn the heading toward the plan's final yaw.
    heading_err = wrap_angle(final_yaw - yaw)
    align = torch.atan(2.0 * wheelbase * torch.sin(heading_err) / ld)
    steer_cmd = torch.where(stationary, align, pursuit)

    new_state = TrackerState(integral, error, torch.ones_like(stopping))
    return accel_cmd, steer_cmd, new_state
