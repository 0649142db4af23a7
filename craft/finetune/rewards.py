"""CRAFT's rewards as pure tensor functions (method sections 3 and 4).

* :func:`dense_step_reward` -- the CaRL-like dense per-step reward used by the counterfactual proxy
  (and, through :func:`dense_reward_from_events`, by the PPO / REINFORCE++ baselines on executed
  rollouts). Shape-agnostic: every argument has the same shape ``S`` (``(B,)`` for executed rollouts,
  ``(B, G)`` inside the proxy).
* :func:`grounded_step_reward` -- the grounded, penalty-only reward of the residual correction.
* :func:`residual_advantage` -- the value-free corrective advantage ``A_gr``.
* :func:`group_normalise` -- group-normalised proxy advantages ``A_cp`` with a std floor.

Choices where the paper is silent (all fields of :class:`RewardConfig`, documented there):

* collision speed scaling: ``-40 * (1 + alpha_v * clip(v / v_ref, nu_min, nu_max))`` with
  ``alpha_v = 1.0``, ``v_ref = 10 m/s``, ``nu in [0, 1.5]``: a collision costs 40 when standing, 80 at
  36 km/h and at most 100 (15 m/s and faster);
* recovery: a deviation is "above its threshold" when its *previous* value is; its change
  ``prev - cur`` is signed (a growing deviation is penalised), clipped per deviation, weighted, summed,
  clipped, then scaled by ``0.5 + 0.5 * dp_hat``. With the paper's weights the sum can reach at most
  0.1, so the +-0.5 sum clip only binds if the weights are raised;
* the grounded residual is made **per decision**, as the paper's Eq. 46 writes it per executed transition: one
  indicator for each of off-road, emergency lane, off-route, red light, stop sign and collision, set when the
  event happens in any of the decision's executed simulator steps (a red light crossed over 5 steps counts
  once), weighted 0.5 / 0.2 / 0.5 / 2.0 / 2.0 / 5.0 (Table 6): :func:`grounded_decision_reward`;
* grounded stop / go zones (the paper names them but gives no weight) are **off by default**
  (``w_stop_zone = w_go_zone = 0``). Set them to charge, once per decision as well, moving faster than 0.1 m/s
  in the world's :attr:`StepEvents.stop_zone` (red / yellow light ahead within braking reach, or an unserved
  stop sign's trigger area) and slower than 2.0 m/s in its :attr:`StepEvents.go_zone` (which already requires
  the corridor of 12 m ahead of the ego's front to be free of other agents, see
  ``craft/world/events.py::_flags``). Charged per 0.1 s step with the weights 2.0 / 0.5 (this project's earlier
  setting) they made the residual dense shaping: about two thirds of its mass and non-zero on most
  transitions, and braking for a red light could cost more than a collision;
* ``A_min = -2.0``, ``A_max = 0.0``: every grounded term is a penalty, so ``A_gr <= 0``; one collision
  step gives ``G / 8 = -0.625``, a collision with its lead-up at most about -1.5, so the lower clip only
  trims pile-ups of several infractions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from craft.errors import CraftError
from craft.world.state import StepEvents

__all__ = [
    "DENSE_TERMS",
    "GROUNDED_TERMS",
    "RewardConfig",
    "collision_penalty",
    "dense_reward_from_events",
    "dense_step_reward",
    "grounded_decision_reward",
    "grounded_step_reward",
    "group_normalise",
    "residual_advantage",
]

DENSE_TERMS = ("progress", "recovery", "offroad", "opposite", "offroute", "emergency", "collision")
"""Keys of the per-term breakdown of :func:`dense_step_reward` (signed contributions; they sum to the reward)."""

GROUNDED_TERMS = ("offroad", "emergency", "offroute", "red_light", "stop_sign", "collision", "stop_zone", "go_zone")
"""Keys of the per-term breakdown of :func:`grounded_step_reward` / :func:`grounded_decision_reward` (signed,
<= 0; they sum to the reward)."""


@dataclass(frozen=True)
class RewardConfig:
    """Weights of CRAFT's dense proxy reward and grounded residual reward (paper values as defaults)."""

    # ---- dense proxy reward (section 3)
    progress_weight: float = 8.0
    """w_prog: weight of the normalised route progress."""
    progress_clip: float = 1.2
    """dp is clipped to [0, progress_clip] metres per step and divided by it."""
    eff_route: float = 3.0
    """Efficiency factor exp coefficient on the distance to the route, 1/m."""
    eff_center: float = 0.8
    """Efficiency factor exp coefficient on the distance to the lane centre, 1/m."""
    eff_heading: float = 2.0
    """Efficiency factor exp coefficient on the heading error, 1/rad."""
    recovery_route_threshold: float = 0.08
    """Recovery is rewarded for the route distance only while it was above this, m."""
    recovery_center_threshold: float = 0.08
    """Recovery threshold of the lane-centre distance (m); the paper uses it for the heading too (rad)."""
    recovery_w_route: float = 0.4
    """Recovery weight k of the route-distance decrease."""
    recovery_w_center: float = 0.2
    """Recovery weight k of the lane-centre-distance decrease."""
    recovery_w_heading: float = 0.4
    """Recovery weight k of the heading-error decrease."""
    recovery_delta_clip: float = 0.10
    """Each deviation change is clipped to +-this."""
    recovery_sum_clip: float = 0.5
    """The weighted sum of the changes is clipped to +-this."""
    cost_offroad: float = 1.5
    """Per-step cost off the drivable area."""
    cost_opposite: float = 0.1
    """Per-step cost on an opposite-direction lane."""
    cost_offroute: float = 1.5
    """Per-step cost farther than the off-route distance from the route."""
    cost_emergency: float = 1.0
    """Per-step cost on an emergency lane (shoulder)."""
    collision_base: float = 40.0
    """First-collision penalty at zero speed."""
    collision_alpha_v: float = 1.0
    """alpha_v: extra collision penalty per unit of clip(v / v_ref) (our choice; the paper gives none)."""
    collision_v_ref: float = 10.0
    """v_ref: reference impact speed, m/s (our choice)."""
    collision_nu_min: float = 0.0
    """nu_min: lower clip of v / v_ref (our choice)."""
    collision_nu_max: float = 1.5
    """nu_max: upper clip of v / v_ref (our choice): the penalty is at most 40 * 2.5 = 100."""
    red_light_penalty: float = 40.0
    """Trajectory-level red-light flag penalty, applied at the first index (undiscounted)."""
    stop_sign_penalty: float = 40.0
    """Trajectory-level stop-sign flag penalty, applied at the first index (undiscounted)."""
    gamma: float = 0.98
    """Discount of the proxy return over the virtual horizon."""
    group_std_floor: float = 5.0
    """Floor of the per-state return std in the group normalisation."""
    # ---- grounded residual reward (section 4)
    w_offroad: float = 0.5
    """Grounded weight of off-road steps."""
    w_emergency: float = 0.2
    """Grounded weight of emergency-lane steps."""
    w_offroute: float = 0.5
    """Grounded weight of off-route steps."""
    w_red: float = 2.0
    """Grounded weight of red-light infractions."""
    w_stop: float = 2.0
    """Grounded weight of stop-sign infractions."""
    w_collision: float = 5.0
    """Grounded weight of counted collisions."""
    w_stop_zone: float = 0.0
    """Grounded weight of moving inside a stop-required zone; 0 = off (the default; the paper gives no weight)."""
    w_go_zone: float = 0.0
    """Grounded weight of idling in a go-required zone whose path ahead is clear; 0 = off (the default)."""
    stop_zone_speed: float = 0.1
    """In a stop zone, speeds above this are penalised, m/s."""
    go_zone_speed: float = 2.0
    """In a go zone (path ahead clear), speeds below this are penalised, m/s."""
    residual_discount: float = 0.8
    """Discount of the grounded return G_t = r_t + discount * notdone_t * G_{t+1}."""
    residual_scale: float = 1.0 / 8.0
    """A_gr = clip(G_t * scale, A_min, A_max)."""
    adv_min: float = -2.0
    """A_min, lower clip of the residual advantage (our choice)."""
    adv_max: float = 0.0
    """A_max, upper clip of the residual advantage (our choice: every term is a penalty)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not math.isfinite(v):
                raise CraftError(f"RewardConfig.{f.name} must be finite, got {v}")
        for name in ("progress_clip", "collision_v_ref", "group_std_floor", "residual_scale"):
            if not getattr(self, name) > 0:
                raise CraftError(f"RewardConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("gamma", "residual_discount"):
            if not 0 <= getattr(self, name) <= 1:
                raise CraftError(f"RewardConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.collision_nu_max < self.collision_nu_min:
            raise CraftError("RewardConfig.collision_nu_max must be >= collision_nu_min")
        if self.adv_max < self.adv_min:
            raise CraftError(f"RewardConfig.adv_max ({self.adv_max}) must be >= adv_min ({self.adv_min})")


# ---------------------------------------------------------------------- dense proxy reward
def collision_penalty(speed: Tensor, cfg: RewardConfig = RewardConfig()) -> Tensor:
    """Signed first-collision reward ``-base * (1 + alpha_v * clip(v / v_ref, nu_min, nu_max))``; speed (S,) m/s."""
    nu = (speed.abs() / cfg.collision_v_ref).clamp(cfg.collision_nu_min, cfg.collision_nu_max)
    return -cfg.collision_base * (1.0 + cfg.collision_alpha_v * nu)


def dense_step_reward(
    dp: Tensor,
    route_dist: Tensor,
    center_dist: Tensor,
    heading_err: Tensor,
    prev_route_dist: Tensor,
    prev_center_dist: Tensor,
    prev_heading_err: Tensor,
    offroad: Tensor,
    opposite: Tensor,
    offroute: Tensor,
    emergency: Tensor,
    first_collision: Tensor,
    collision_speed: Tensor,
    cfg: RewardConfig = RewardConfig(),
) -> tuple[Tensor, dict[str, Tensor]]:
    """The dense per-step reward of section 3 and its per-term breakdown.

    All arguments share one shape ``S`` (``(B,)``, ``(B, G)``, ...; broadcastable is fine):
    dp: route metres gained this step; route_dist (m), center_dist (m), heading_err (rad, >= 0): the
    deviations after the step, ``prev_*`` the same before it; offroad, opposite, offroute, emergency,
    first_collision: bool flags; collision_speed: ego speed at the collision, m/s.

    reward = 8 * dp_hat * eta + recovery - (1.5 offroad + 0.1 opposite + 1.5 offroute + 1.0 emergency)
    + first_collision * collision_penalty(v), with ``dp_hat = clip(dp, 0, 1.2) / 1.2`` and
    ``eta = max(exp(-3 d_route) exp(-0.8 d_center) exp(-2 d_heading), 0)``.

    Returns ``(reward (S,), terms)`` with ``terms[k] (S,)`` for k in :data:`DENSE_TERMS`, summing to reward.
    """
    c = cfg
    dp_hat = dp.clamp(0.0, c.progress_clip) / c.progress_clip
    eta = torch.exp(-(c.eff_route * route_dist + c.eff_center * center_dist + c.eff_heading * heading_err))
    eta = eta.clamp_min(0.0)
    progress = c.progress_weight * dp_hat * eta

    def rec(prev: Tensor, cur: Tensor, threshold: float, weight: float) -> Tensor:
        delta = (prev - cur).clamp(-c.recovery_delta_clip, c.recovery_delta_clip)
        return weight * torch.where(prev > threshold, delta, torch.zeros_like(delta))

    recovery = (
        rec(prev_route_dist, route_dist, c.recovery_route_threshold, c.recovery_w_route)
        + rec(prev_center_dist, center_dist, c.recovery_center_threshold, c.recovery_w_center)
        + rec(prev_heading_err, heading_err, c.recovery_center_threshold, c.recovery_w_heading)
    )
    recovery = recovery.clamp(-c.recovery_sum_clip, c.recovery_sum_clip) * (0.5 + 0.5 * dp_hat)

    f = progress.dtype
    terms = {
        "progress": progress,
        "recovery": recovery,
        "offroad": -c.cost_offroad * offroad.to(f),
        "opposite": -c.cost_opposite * opposite.to(f),
        "offroute": -c.cost_offroute * offroute.to(f),
        "emergency": -c.cost_emergency * emergency.to(f),
        "collision": torch.where(first_collision, collision_penalty(collision_speed, c),
                                 torch.zeros_like(progress)),
    }
    reward = terms["progress"] + terms["recovery"] + terms["offroad"] + terms["opposite"] + terms["offroute"] \
        + terms["emergency"] + terms["collision"]
    return reward, terms


def _field(ev: StepEvents | Mapping[str, Tensor], name: str) -> Tensor:
    if isinstance(ev, Mapping):
        if name not in ev:
            raise CraftError(f"events mapping lacks '{name}' (give StepEvents or a dict with its field names)")
        return ev[name]
    return getattr(ev, name)


def _counted_collision(events: StepEvents | Mapping[str, Tensor]) -> Tensor:
    return _field(events, "collision_pedestrian") | _field(events, "collision_vehicle") | \
        _field(events, "collision_layout")


def dense_reward_from_events(
    prev: StepEvents | Mapping[str, Tensor] | None,
    events: StepEvents | Mapping[str, Tensor],
    cfg: RewardConfig = RewardConfig(),
    collided_before: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The dense reward of an executed closed-loop step (PPO / REINFORCE++ baselines).

    prev: the previous step's events (or any mapping with ``route_dist``, ``lane_center_dist``,
    ``heading_error``), or None at the first step (no recovery term then); events: this step's
    :class:`~craft.world.state.StepEvents` (or a mapping of its fields), all (B,).
    collided_before: (B,) bool, whether the episode already had a counted collision (only the first one
    is penalised); None means no. ``dp`` is the world's route progress of the step (Bench2Drive's passed
    route points, so it comes in ~1 m quanta; its sum over an episode is the route metres driven);
    the collision flag is the world's counted collision (pedestrian, vehicle or layout) at ``events.speed``.
    Red-light / stop-sign infractions are not part of the per-step reward; add
    ``-cfg.red_light_penalty * events.red_light`` etc. if a baseline wants them.

    Returns ``(reward (B,), terms, collided (B,) bool)`` -- ``collided`` is the updated collided_before.
    """
    route_dist = _field(events, "route_dist")
    center = _field(events, "lane_center_dist")
    heading = _field(events, "heading_error")
    if prev is None:
        p_route, p_center, p_heading = route_dist, center, heading
    else:
        p_route, p_center, p_heading = (_field(prev, "route_dist"), _field(prev, "lane_center_dist"),
                                        _field(prev, "heading_error"))
    hit = _counted_collision(events)
    before = torch.zeros_like(hit) if collided_before is None else collided_before.to(torch.bool)
    first = hit & ~before
    reward, terms = dense_step_reward(
        _field(events, "progress"), route_dist, center, heading, p_route, p_center, p_heading,
        _field(events, "offroad"), _field(events, "opposite_lane"), _field(events, "offroute"),
        _field(events, "emergency_lane"), first, _field(events, "speed"), cfg,
    )
    return reward, terms, before | hit


# ---------------------------------------------------------------------- grounded residual
def _grounded_flags(events: StepEvents | Mapping[str, Tensor], cfg: RewardConfig) -> dict[str, Tensor]:
    """The grounded events as bool flags of the shape of ``events`` (one per :data:`GROUNDED_TERMS` key)."""
    speed = _field(events, "speed").abs()
    return {
        "offroad": _field(events, "offroad"),
        "emergency": _field(events, "emergency_lane"),
        "offroute": _field(events, "offroute"),
        "red_light": _field(events, "red_light"),
        "stop_sign": _field(events, "stop_infraction"),
        "collision": _counted_collision(events),
        "stop_zone": _field(events, "stop_zone") & (speed > cfg.stop_zone_speed),
        "go_zone": _field(events, "go_zone") & (speed < cfg.go_zone_speed),
    }


def _grounded_weights(cfg: RewardConfig) -> dict[str, float]:
    return {"offroad": cfg.w_offroad, "emergency": cfg.w_emergency, "offroute": cfg.w_offroute,
            "red_light": cfg.w_red, "stop_sign": cfg.w_stop, "collision": cfg.w_collision,
            "stop_zone": cfg.w_stop_zone, "go_zone": cfg.w_go_zone}


def _weighted(flags: dict[str, Tensor], cfg: RewardConfig, dtype) -> tuple[Tensor, dict[str, Tensor]]:
    w = _grounded_weights(cfg)
    terms = {k: -w[k] * flags[k].to(dtype) for k in GROUNDED_TERMS}
    reward = torch.zeros_like(terms["offroad"])
    for v in terms.values():
        reward = reward + v
    return reward, terms


def grounded_step_reward(
    events: StepEvents | Mapping[str, Tensor], cfg: RewardConfig = RewardConfig()
) -> tuple[Tensor, dict[str, Tensor]]:
    """The grounded penalties of one simulator step (every term is a penalty, so reward <= 0).

    r = -(0.5 offroad + 0.2 emergency_lane + 0.5 offroute + 2.0 red_light + 2.0 stop_infraction
    + 5.0 collision + w_stop_zone [stop_zone & speed > 0.1] + w_go_zone [go_zone & speed < 2.0]).

    events: :class:`StepEvents` or a mapping with its field names, all (B,). The residual of the fine-tuning
    loop is per decision (:func:`grounded_decision_reward`); this per-step form is kept for analyses.
    Returns ``(reward (B,), terms)`` with ``terms[k] (B,)`` for k in :data:`GROUNDED_TERMS`.
    """
    return _weighted(_grounded_flags(events, cfg), cfg, _field(events, "speed").dtype)


def grounded_decision_reward(
    events: Mapping[str, Tensor], cfg: RewardConfig = RewardConfig(), step_valid: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The grounded reward of one decision (the paper's Eq. 46 on an executed transition): reward <= 0.

    events: a mapping with :class:`StepEvents` field names, each ``(k, *S)`` for the ``k`` simulator steps the
    decision executed; step_valid: optional ``(k, *S)`` bool, the steps that count (e.g. not after the episode
    ended). Each event is one indicator per decision -- set when it happens in any counted step -- so a red
    light crossed during 5 steps costs 2.0 once:
    r = -(0.5 I_offroad + 0.2 I_emergency + 0.5 I_offroute + 2.0 I_red + 2.0 I_stop + 5.0 I_collision
    [+ w_stop_zone I_stop_zone + w_go_zone I_go_zone, off by default]).

    Returns ``(reward (*S), terms)`` with ``terms[k] (*S)`` for k in :data:`GROUNDED_TERMS`.
    """
    flags = _grounded_flags(events, cfg)
    if step_valid is not None:
        flags = {k: v & step_valid for k, v in flags.items()}
    return _weighted({k: v.any(0) for k, v in flags.items()}, cfg, _field(events, "speed").dtype)


def residual_advantage(rewards: Tensor, notdone: Tensor, cfg: RewardConfig = RewardConfig()) -> Tensor:
    """Value-free corrective advantage ``A_gr`` of section 4.

    rewards: (T, B) grounded rewards of consecutive executed decision steps; notdone: (T, B) bool/float,
    0 where the episode ended at step t (the return then does not look past it).
    ``G_t = r_t + discount * notdone_t * G_{t+1}`` (G_T = 0), ``A_t = clip(G_t * scale, A_min, A_max)``.
    Returns (T, B).
    """
    if rewards.dim() != 2 or tuple(notdone.shape) != tuple(rewards.shape):
        raise CraftError(f"residual_advantage: rewards and notdone must both be (T, B), got "
                         f"{tuple(rewards.shape)} and {tuple(notdone.shape)}")
    nd = notdone.to(rewards.dtype)
    out = torch.empty_like(rewards)
    g = torch.zeros_like(rewards[0]) if rewards.shape[0] else None
    for t in range(rewards.shape[0] - 1, -1, -1):  # loop over time only
        g = rewards[t] + cfg.residual_discount * nd[t] * g
        out[t] = g
    return (out * cfg.residual_scale).clamp(cfg.adv_min, cfg.adv_max)


# ---------------------------------------------------------------------- group normalisation
def group_normalise(
    returns: Tensor, valid: Tensor, std_floor: float = 5.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Group-normalised advantages over the valid candidates of each state.

    returns: (B, G); valid: (B, G) bool. ``A = (R - mean) / max(std, std_floor)`` with the mean and
    (population) std over the valid candidates of the row; invalid candidates get 0 (rows with fewer
    than two valid candidates are all 0).

    Returns ``(advantages (B, G), diagnostics)``: ``zero_std_share`` (share of rows with >= 2 valid
    candidates whose returns are all equal, i.e. no learning signal), ``floor_share`` (share of such rows
    whose std was raised to the floor), ``groups`` (number of such rows); 0-d tensors.
    """
    if returns.dim() != 2 or tuple(valid.shape) != tuple(returns.shape):
        raise CraftError(f"group_normalise: returns and valid must both be (B, G), got "
                         f"{tuple(returns.shape)} and {tuple(valid.shape)}")
    if not std_floor > 0:
        raise CraftError(f"group_normalise: std_floor must be positive, got {std_floor}")
    v = valid.to(torch.bool)
    vf = v.to(returns.dtype)
    r = torch.where(v, returns, torch.zeros_like(returns))
    n = vf.sum(-1, keepdim=True)
    mean = r.sum(-1, keepdim=True) / n.clamp_min(1.0)
    dev = torch.where(v, r - mean, torch.zeros_like(r))
    std = torch.sqrt((dev * dev).sum(-1, keepdim=True) / n.clamp_min(1.0))
    row_ok = n >= 2
    groups = row_ok.squeeze(-1)
    zero_std = groups & (std.squeeze(-1) <= 1e-6 * (1.0 + mean.abs().squeeze(-1)))
    use = v & row_ok & ~zero_std[:, None]  # all-equal rows: exactly 0, not rounding noise / floor
    adv = torch.where(use, dev / std.clamp_min(std_floor), torch.zeros_like(dev))
    n_groups = groups.sum()
    denom = n_groups.clamp_min(1).to(returns.dtype)
    floored = groups & (std.squeeze(-1) < std_floor)
    diag = {
        "zero_std_share": zero_std.sum().to(returns.dtype) / denom,
        "floor_share": floored.sum().to(returns.dtype) / denom,
        "groups": n_groups,
    }
    return adv, diag
