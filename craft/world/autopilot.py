"""A minimal route-following plan: constant speed along the ego's route polyline.

It produces a trajectory in the same format policies emit (ego frame, 0.5 s spacing), so it runs
through the shared tracker like any policy. It ignores other road users and signals: it is the
``lane-follow`` sanity baseline and the ego driver of ``craft sim-bench``.
"""

from __future__ import annotations

import torch

from craft.world.state import WorldState
from craft.world.tracker import world_to_ego


def route_plan(state: WorldState, speed: torch.Tensor | float, horizon: int = 6, dt: float = 0.5) -> torch.Tensor:
    """Waypoints every ``dt`` s at ``speed`` along the route ahead of the ego.

    Returns ``traj (B, horizon, 3)`` in the ego frame (x forward, y left, yaw).
    """
    B = state.batch_size
    speed = torch.as_tensor(speed, dtype=torch.float32, device=state.device).expand(B)
    ego = state.pos[:, 0]
    # arc length of the ego's projection: nearest route point
    d = (state.route_pts - ego[:, None, :]).norm(dim=-1)
    d = torch.where(state.route_valid, d, torch.full_like(d, float("inf")))
    i0 = d.argmin(1)
    s0 = torch.gather(state.route_cum, 1, i0[:, None]).squeeze(1)
    t = torch.arange(1, horizon + 1, device=state.device, dtype=torch.float32) * dt
    s = s0[:, None] + speed[:, None] * t[None, :]  # (B, T)
    s = torch.minimum(s, state.route_length[:, None])
    j = torch.searchsorted(state.route_cum.contiguous(), s.contiguous()).clamp(1, state.route_cum.shape[1] - 1)
    c0 = torch.gather(state.route_cum, 1, j - 1)
    c1 = torch.gather(state.route_cum, 1, j)
    w = ((s - c0) / (c1 - c0).clamp_min(1e-6)).clamp(0, 1)[..., None]
    p0 = torch.gather(state.route_pts, 1, (j - 1)[..., None].expand(-1, -1, 2))
    p1 = torch.gather(state.route_pts, 1, j[..., None].expand(-1, -1, 2))
    p = p0 + w * (p1 - p0)
    yaw = torch.atan2(p1[..., 1] - p0[..., 1], p1[..., 0] - p0[..., 0])
    world = torch.cat([p, yaw[..., None]], -1)
    return world_to_ego(world, ego, state.yaw[:, 0])


class PlanExecutor:
    """Executes ego-frame plans through the shared tracker, re-planning every ``replan_every`` steps.

    Holds the current plan in the world frame, its time-0 point, the time since it was made and the
    tracker's PID memory (all (B,)-batched tensors).
    """

    def __init__(self, batch: int, device="cpu", cfg=None, dt: float = 0.1):
        from craft.world.tracker import TrackerConfig, TrackerState

        self.cfg = cfg or TrackerConfig()
        self.dt = dt
        self.tracker = TrackerState.zeros(batch, device)
        self.plan_world = None
        self.plan_pos0 = None
        self.age = torch.zeros(batch, device=device)

    def set_plan(self, state: WorldState, traj_ego: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Adopt new plans ``traj_ego (B, T, 3)`` (ego frame, now) for the worlds in ``mask`` (all if None)."""
        from craft.world.tracker import ego_to_world

        world = ego_to_world(traj_ego, state.pos[:, 0], state.yaw[:, 0])
        pos0 = state.pos[:, 0].clone()
        if self.plan_world is None or mask is None:
            self.plan_world, self.plan_pos0 = world, pos0
            self.age = torch.zeros_like(self.age)
            return
        self.plan_world = torch.where(mask[:, None, None], world, self.plan_world)
        self.plan_pos0 = torch.where(mask[:, None], pos0, self.plan_pos0)
        self.age = torch.where(mask, torch.zeros_like(self.age), self.age)

    def index(self, idx: torch.Tensor) -> "PlanExecutor":
        """The executor of a subset of worlds (``idx``: (B',) long or (B,) bool), e.g. after dropping ended ones."""
        ex = PlanExecutor.__new__(PlanExecutor)
        ex.cfg, ex.dt = self.cfg, self.dt
        ex.tracker = self.tracker.index(idx)
        ex.plan_world = None if self.plan_world is None else self.plan_world[idx]
        ex.plan_pos0 = None if self.plan_pos0 is None else self.plan_pos0[idx]
        ex.age = self.age[idx]
        return ex

    def control(self, state: WorldState) -> torch.Tensor:
        """(B, 2) ego (accel, steer) for this step; advances the plan clock."""
        from craft.world.tracker import track

        accel, steer, self.tracker = track(self.plan_world, self.plan_pos0, self.age, state.pos[:, 0],
                                           state.yaw[:, 0], state.speed[:, 0], state.wheelbase[:, 0],
                                           self.tracker, self.cfg, self.dt)
        self.age = self.age + self.dt
        return torch.stack([accel, steer], -1)
