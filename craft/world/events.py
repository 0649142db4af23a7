"""Per-step ego events: Bench2Drive's infractions and route-ending rules, plus CRAFT's reward flags.

:func:`update_events` is called once per world step, after every agent has moved. It reads the state
before the step (``prev``) and after it (``state``), updates the ego bookkeeping fields of ``state``
(``progress``, ``col_actor_time``, ``light_done``, ``stop_inside``, ...) and returns the step's
:class:`~craft.world.state.StepEvents`. It is a pure function: inputs are never modified.

One small function per rule, each batched over worlds (``B``) and agents / lights / stop signs:

- :func:`_collisions`: counted collisions with Bench2Drive's de-duplication (speed, same actor, same place);
- :func:`_red_lights`: the ego's rear crossing the stop line of a red light of its lane, once per light;
- :func:`_stop_signs`: leaving a stop sign's trigger area without having stopped inside it;
- :func:`_route_progress`: passed route points, route completion (RC) and the distance to the route;
- :func:`_lanes`: metres driven outside the lanes or in a wrong-direction lane;
- :func:`_termination`: completion, collision (b2d-star only), route deviation, blocked, timeout, tick cap;
- :func:`_flags`: CRAFT's per-step indicators (off-road, off-route, stop / go zones, kinematics, ...).

Bookkeeping convention: the values *before* the step are read from ``prev`` (the world step carries them
over unchanged into ``state``); the updated values are written into the returned copy of ``state``.
Worlds already done before the step (``prev.done``) report no events and keep ``prev``'s bookkeeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from craft.errors import CraftError
from craft.world.collision import boxes_overlap, ego_collisions
from craft.world.kinds import AgentKind
from craft.world.map import LaneType, LightState, MapBatch, drivable, lane_candidates, pick_lane, take
from craft.world.state import EndReason, Mode, StepEvents, WorldState

__all__ = ["EventConfig", "update_events"]

_BACKGROUND_KINDS = (AgentKind.CAR, AgentKind.TRUCK, AgentKind.BICYCLE, AgentKind.EMERGENCY)
# Float slack for thresholds reached by accumulating dt (600 x 0.1 s in float32 is not exactly 60 s).
_TIME_EPS = 1e-3


@dataclass(frozen=True)
class EventConfig:
    """Thresholds of the event rules (Bench2Drive's values as defaults) and of CRAFT's reward flags."""

    dt: float = 0.1
    """Seconds per world step."""
    collision_min_speed: float = 0.1
    """A collision counts only when the ego moves at least this fast, m/s."""
    same_actor_window: float = 5.0
    """A collision with an actor already counted within this many seconds is ignored, s."""
    same_place_radius: float = 5.0
    """A collision within this distance of the last counted collision's ego position is ignored, m."""
    red_light_radius: float = 15.0
    """Only traffic lights whose stop line is within this distance of the ego are checked, m."""
    stop_speed: float = 0.1
    """Inside a stop sign's trigger area the ego must get below this speed, m/s."""
    outside_margin: float = 0.5
    """The ego is outside the lanes beyond lane half width + this margin from the nearest lane centre, m."""
    wrong_direction_deg: float = 120.0
    """A lane whose direction differs from the ego heading by more than this is a wrong-direction lane, deg."""
    deviation_dist: float = 30.0
    """Route deviation ends the route beyond this distance from the route polyline, m."""
    far_dist: float = 15.0
    """Metres driven farther than this from the route accumulate into ``driven_far``, m."""
    far_fraction: float = 0.3
    """Route deviation also ends the route once ``driven_far`` exceeds this fraction of the route length."""
    blocked_speed: float = 0.1
    """The ego counts as blocked while slower than this, m/s."""
    blocked_time: float = 60.0
    """Being blocked this long ends the route, s."""
    route_timeout_base: float = 300.0
    """Route timeout: this many seconds plus the route length over ``route_timeout_speed``, s."""
    route_timeout_speed: float = 1.39
    """Route timeout speed (10 % of 50 km/h), m/s."""
    tick_cap: float = 200.0
    """Simulated time after which the route ends regardless, s."""
    completion_fraction: float = 0.99
    """RC is set to 100 once above this fraction of the route ...  (see ``completion_radius``)."""
    completion_radius: float = 10.0
    """... and the ego is within this distance of the last route point, m."""
    progress_window: int = 50
    """Route points after the last passed one that are examined each step."""
    progress_reach: float = 8.0
    """A route point is passed only if the ego is within this distance of it (and beyond it), m."""
    offroute_dist: float = 4.5
    """CRAFT flag ``offroute``: farther than this from the route polyline, m."""
    go_speed: float = 2.0
    """CRAFT go zone: below this speed the ego is idling (used by the reward, kept here with the zone), m/s."""
    go_clear_dist: float = 12.0
    """CRAFT go zone: length of the corridor ahead of the ego's front that must be free of agents, m."""
    go_clear_margin: float = 1.0
    """CRAFT go zone: the corridor is the ego width plus this, m."""
    stop_decel: float = 4.0
    """CRAFT stop zone: braking deceleration defining the braking distance v^2 / (2 a), m/s^2."""
    stop_margin: float = 5.0
    """CRAFT stop zone: extra distance before a red / yellow stop line added to the braking distance, m."""
    background_radius: float = 50.0
    """Background vehicles within this distance of the ego enter ``background_speed``, m."""
    lane_dist_cap: float = 5.0
    """``lane_center_dist`` reported when no driving lane is within the lane query's reach, m."""

    def __post_init__(self):
        for name in ("dt", "route_timeout_speed", "stop_decel", "progress_reach", "go_clear_dist"):
            if not getattr(self, name) > 0:
                raise CraftError(f"EventConfig.{name} must be positive, got {getattr(self, name)}")
        if self.progress_window < 1:
            raise CraftError(f"EventConfig.progress_window must be >= 1, got {self.progress_window}")
        if not 0 < self.completion_fraction <= 1:
            raise CraftError(f"EventConfig.completion_fraction must be in (0, 1], got {self.completion_fraction}")


@dataclass
class _Ego:
    """The ego's quantities shared by every rule; all (B,) or (B, 2)."""

    pos: Tensor  # (B, 2) after the step
    prev_pos: Tensor  # (B, 2) before the step
    yaw: Tensor  # (B,)
    prev_yaw: Tensor  # (B,)
    speed: Tensor  # (B,) |speed| after the step
    length: Tensor  # (B,)
    width: Tensor  # (B,)
    time: Tensor  # (B,) seconds elapsed at the end of the step: (prev.step + 1) * dt
    moved: Tensor  # (B,) metres driven during the step
    lane: dict  # nearest DRIVING lane with heading: the ego's current lane
    cand: dict  # lane_candidates around the ego, shared by every lane query of the step


def _ego_view(mb: MapBatch, prev: WorldState, state: WorldState, cfg: EventConfig, cand: dict | None = None) -> _Ego:
    pos, prev_pos = state.pos[:, 0], prev.pos[:, 0]
    yaw = state.yaw[:, 0]
    cand = cand if cand is not None else lane_candidates(mb, state.map_id, pos)
    return _Ego(
        pos=pos,
        prev_pos=prev_pos,
        yaw=yaw,
        prev_yaw=prev.yaw[:, 0],
        speed=state.speed[:, 0].abs(),
        length=state.length[:, 0],
        width=state.width[:, 0],
        time=(prev.step + 1).to(pos.dtype) * cfg.dt,
        moved=(pos - prev_pos).norm(dim=-1),
        lane=pick_lane(cand, (LaneType.DRIVING,), yaw),
        cand=cand,
    )


def _wrap(a: Tensor) -> Tensor:
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def _unit(angle: Tensor) -> Tensor:
    """(..., 2) unit vectors of headings (...)."""
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


def _cross(a: Tensor, b: Tensor) -> Tensor:
    """z of the 2-D cross product a x b: lateral offset of b left of the direction a."""
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


# ---------------------------------------------------------------------- rules
def _collisions(prev: WorldState, state: WorldState, ego: _Ego, cfg: EventConfig) -> tuple[dict, dict]:
    """Counted collisions (Bench2Drive's CollisionTest de-duplication).

    An overlap with agent n counts when the ego speed is >= ``collision_min_speed``, agent n was not
    counted within the last ``same_actor_window`` s (``col_actor_time (B, N)``) and the ego is not within
    ``same_place_radius`` of the last counted collision (``col_last_pos (B, 2)``, ego position). At most
    one per world and step: the nearest eligible overlapping agent.
    Returns (bookkeeping, events); events hold (B,) ``collision_*``, ``collided_agent``, ``counted``.
    """
    hits = ego_collisions(state.pos, state.yaw, state.length, state.width, state.valid)  # (B, N)
    since = ego.time[:, None] - prev.col_actor_time  # (B, N), +inf when never counted
    fresh = hits & (since >= cfg.same_actor_window - _TIME_EPS)
    dist = (state.pos - ego.pos[:, None]).norm(dim=-1)
    dist = torch.where(fresh, dist, torch.full_like(dist, float("inf")))
    best = dist.argmin(dim=-1)  # (B,)
    same_place = (ego.pos - prev.col_last_pos).norm(dim=-1) < cfg.same_place_radius  # NaN -> False
    counted = fresh.any(-1) & ~same_place & (ego.speed >= cfg.collision_min_speed)
    kind = state.kind.gather(1, best[:, None]).squeeze(1)
    pedestrian = counted & (kind == int(AgentKind.PEDESTRIAN))
    layout = counted & (kind == int(AgentKind.STATIC))
    vehicle = counted & ~pedestrian & ~layout  # CAR, TRUCK, BICYCLE, EMERGENCY
    n = torch.arange(state.num_agents, device=state.device)
    mark = counted[:, None] & (n[None, :] == best[:, None])  # (B, N)
    book = {
        "col_actor_time": torch.where(mark, ego.time[:, None], prev.col_actor_time),
        "col_last_pos": torch.where(counted[:, None], ego.pos, prev.col_last_pos),
    }
    events = {
        "collision_pedestrian": pedestrian,
        "collision_vehicle": vehicle,
        "collision_layout": layout,
        "collision_any": hits.any(-1),
        "collided_agent": torch.where(counted, best, torch.full_like(best, -1)),
        "counted": counted,
    }
    return book, events


def _light_frame(mb: MapBatch, state: WorldState, ego_point: Tensor) -> tuple[Tensor, Tensor]:
    """Signed distance along each light's heading (positive past the stop line) and lateral offset of a
    point (B, 2) from each light's stop-line centre. Returns two (B, K) tensors."""
    d = ego_point[:, None, :] - mb.light_pos[state.map_id]  # (B, K, 2)
    u = _unit(mb.light_heading[state.map_id])  # (B, K, 2)
    return (d * u).sum(-1), _cross(u, d)


def _red_lights(
    mb: MapBatch, prev: WorldState, state: WorldState, ego: _Ego, lights: Tensor, cfg: EventConfig
) -> tuple[dict, dict]:
    """Red-light infractions (Bench2Drive's RunningRedLightTest), once per light.

    A light k (``lights (B, K)`` RED, stop line within ``red_light_radius`` of the ego, not yet counted
    in ``light_done (B, K)``) is run when the ego's rear point (centre - length/2 along the heading)
    crosses its stop line (signed distance along the light heading goes from < 0 to >= 0) while the ego
    heads within 90 deg of the light's heading, and either the ego's current lane is the light's lane (or
    a junction connector it controls) or the rear point is within the lane's half width of the stop-line
    centre laterally. Returns (bookkeeping ``light_done``, events ``red_light (B,)``).
    """
    m = state.map_id
    rear = ego.pos - 0.5 * ego.length[:, None] * _unit(ego.yaw)
    prev_rear = ego.prev_pos - 0.5 * prev.length[:, 0, None] * _unit(ego.prev_yaw)
    along, lateral = _light_frame(mb, state, rear)
    prev_along, _ = _light_frame(mb, state, prev_rear)
    crossing = (prev_along < 0) & (along >= 0)

    light_lane = mb.light_lane[m]  # (B, K)
    half_width = 0.5 * take(mb.lane_width, m[:, None], light_lane.clamp_min(0))
    cur = ego.lane["lane"]  # (B,)
    controlled_by = torch.where(cur >= 0, take(mb.lane_light, m, cur.clamp_min(0)), torch.full_like(cur, -1))
    k = torch.arange(light_lane.shape[1], device=lights.device)
    lane_match = (cur[:, None] >= 0) & ((light_lane == cur[:, None]) | (controlled_by[:, None] == k[None, :]))
    heading_ok = torch.cos(ego.yaw[:, None] - mb.light_heading[m]) > 0
    near = (ego.pos[:, None] - mb.light_pos[m]).norm(dim=-1) <= cfg.red_light_radius
    red = mb.light_valid[m] & (lights == int(LightState.RED))
    run = red & near & ~prev.light_done & crossing & heading_ok & (lane_match | (lateral.abs() <= half_width))
    return {"light_done": prev.light_done | run}, {"red_light": run.any(-1)}


def _stop_signs(mb: MapBatch, prev: WorldState, state: WorldState, ego: _Ego, cfg: EventConfig) -> tuple[dict, dict]:
    """Stop-sign infractions (Bench2Drive's RunningStopTest).

    Inside = ego centre in the trigger box ``stop_trigger (cx, cy, yaw, length, width)`` while heading
    within 90 deg of the stop heading. While inside, speed < ``stop_speed`` sets ``stop_ok (B, Q)``.
    Leaving (inside before, not now) without ``stop_ok`` is one infraction; both flags reset on leaving.
    Returns (bookkeeping ``stop_inside``, ``stop_ok``; events ``stop_infraction (B,)``, ``inside (B, Q)``,
    ``ok (B, Q)``).
    """
    m = state.map_id
    trig = mb.stop_trigger[m]  # (B, Q, 5)
    d = ego.pos[:, None, :] - trig[..., :2]
    u = _unit(trig[..., 2])
    in_box = ((d * u).sum(-1).abs() <= 0.5 * trig[..., 3]) & (_cross(u, d).abs() <= 0.5 * trig[..., 4])
    heading_ok = torch.cos(ego.yaw[:, None] - mb.stop_heading[m]) > 0
    inside = mb.stop_valid[m] & in_box & heading_ok
    ok = prev.stop_ok | (inside & (ego.speed < cfg.stop_speed)[:, None])
    left = prev.stop_inside & ~inside
    infraction = left & ~ok
    book = {"stop_inside": inside, "stop_ok": ok & ~left}
    return book, {"stop_infraction": infraction.any(-1), "inside": inside, "ok": ok & ~left}


def _window(state: WorldState, start: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Route points ``start .. start + width`` (clamped): indices (B, W), points (B, W, 2), valid (B, W)."""
    B, P = state.route_valid.shape
    j = (start[:, None] + torch.arange(width, device=start.device)).clamp(0, P - 1)
    pts = state.route_pts.gather(1, j[..., None].expand(B, width, 2))
    return j, pts, state.route_valid.gather(1, j)


def _tangents_at(state: WorldState, j: Tensor) -> Tensor:
    """(B, W, 2) unit route direction at route indices ``j (B, W)`` (next segment; previous one at the end)."""
    B, P = state.route_valid.shape
    nxt = (j + 1).clamp(max=P - 1)
    has_next = (j + 1 < P) & state.route_valid.gather(1, nxt)
    a = torch.where(has_next, j, (j - 1).clamp_min(0))
    b = torch.where(has_next, nxt, j)
    g = lambda k: state.route_pts.gather(1, k[..., None].expand(B, k.shape[1], 2))  # noqa: E731
    t = g(b) - g(a)
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-9)


ROUTE_WINDOW_BACK = 20  # route points behind the progress point searched for the distance to the route
ROUTE_WINDOW = 160  # route points searched in all (Bench2Drive's route tests also look at a window)


def _route_distance(state: WorldState, pos: Tensor, start: Tensor) -> Tensor:
    """(B,) distance from pos (B, 2) to the route polyline near the progress point (0 without a route)."""
    j, pts, valid = _window(state, (start - ROUTE_WINDOW_BACK).clamp_min(0), ROUTE_WINDOW)
    a, ab = pts[:, :-1], pts[:, 1:] - pts[:, :-1]
    u = (((pos[:, None] - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-9)).clamp(0.0, 1.0)
    seg_d = (pos[:, None] - (a + u[..., None] * ab)).norm(dim=-1)
    seg_d = torch.where(valid[:, 1:] & valid[:, :-1], seg_d, torch.full_like(seg_d, float("inf")))
    pt_d = (pos[:, None] - pts).norm(dim=-1)
    pt_d = torch.where(valid, pt_d, torch.full_like(pt_d, float("inf")))
    d = torch.minimum(seg_d.min(-1).values, pt_d.min(-1).values)
    return torch.where(state.route_valid.any(-1), d, torch.zeros_like(d))


def _route_progress(prev: WorldState, state: WorldState, ego: _Ego, cfg: EventConfig) -> tuple[dict, dict]:
    """Route progress and completion (Bench2Drive's RouteCompletionTest).

    Among the ``progress_window`` route points after ``progress_idx (B,)``, the farthest one that the ego
    is beyond (offset along the route tangent >= 0) and within ``progress_reach`` of becomes the new
    ``progress_idx``; ``progress (B,)`` = its arc length ``route_cum``, never decreasing. RC = progress /
    route_length x 100; once RC > 99 % and the ego is within ``completion_radius`` of the last route
    point, progress = route_length (RC = 100) and ``completed`` is set.
    Returns (bookkeeping, events); events hold (B,) ``progress`` (this step's metres),
    ``route_completion``, ``completed``, ``route_dist``, ``route_heading``, ``has_route``.
    """
    pts, valid, cum = state.route_pts, state.route_valid, state.route_cum
    B, P = valid.shape
    j = prev.progress_idx[:, None] + torch.arange(1, cfg.progress_window + 1, device=pts.device)  # (B, W)
    in_range = j < P
    jc = j.clamp(max=P - 1)
    pj = pts.gather(1, jc[..., None].expand(B, jc.shape[1], 2))
    tj = _tangents_at(state, jc)
    rel = ego.pos[:, None] - pj
    passed = in_range & valid.gather(1, jc) & ((rel * tj).sum(-1) >= 0) & (rel.norm(dim=-1) < cfg.progress_reach)
    idx = torch.maximum(prev.progress_idx, torch.where(passed, jc, torch.full_like(jc, -1)).max(-1).values)
    has_route = valid.any(-1)
    length = state.route_length
    progress = torch.maximum(prev.progress, cum.gather(1, idx[:, None]).squeeze(1))

    last = (valid.long().sum(-1) - 1).clamp_min(0)
    last_pt = pts.gather(1, last[:, None, None].expand(B, 1, 2)).squeeze(1)
    rc = progress / length.clamp_min(1e-6)
    completed = (
        has_route
        & (rc > cfg.completion_fraction)
        & ((ego.pos - last_pt).norm(dim=-1) < cfg.completion_radius)
    )
    progress = torch.where(completed, torch.maximum(progress, length), progress)
    rc = torch.where(has_route, (progress / length.clamp_min(1e-6)).clamp(max=1.0) * 100.0, torch.zeros_like(rc))
    heading = _tangents_at(state, idx[:, None]).squeeze(1)
    book = {"progress": progress, "progress_idx": idx}
    events = {
        "progress": progress - prev.progress,
        "route_completion": rc,
        "completed": completed,
        "route_dist": _route_distance(state, ego.pos, idx),
        "route_heading": torch.atan2(heading[:, 1], heading[:, 0]),
        "has_route": has_route,
    }
    return book, events


def _lanes(mb: MapBatch, prev: WorldState, state: WorldState, ego: _Ego, cfg: EventConfig,
           route_step: Tensor) -> tuple[dict, dict]:
    """Metres driven outside the lanes or in a wrong-direction lane (Bench2Drive's OutsideRouteLanesTest).

    Outside: distance from the ego centre to the nearest DRIVING or PARKING lane centre > half its width
    + ``outside_margin`` (or no such lane within reach). Wrong direction: the nearest DRIVING lane (by
    distance alone) heads more than ``wrong_direction_deg`` away from the ego, unless it is a junction
    connector. Each step's distance driven (``ego.moved``) adds to ``driven (B,)`` and, when outside or
    in a wrong-direction lane after the step, to ``driven_outside (B,)``; the route metres passed in the step
    (``route_step (B,)``) add to ``progress_outside (B,)`` likewise (Bench2Drive's percentage is over route
    distance). A wrong-direction lane does not count while ``prev.wrong_dir_exempt`` (Bench2Drive's TwoWays
    scenarios switch its wrong-direction test off while they run); ``wrong_direction`` still reports it.
    Returns (bookkeeping, events ``driven``, ``outside_lanes`` (metres), ``wrong_direction (B,)`` bool).
    """
    m = state.map_id
    near = pick_lane(ego.cand, (LaneType.DRIVING, LaneType.PARKING))
    outside = near["dist"] > 0.5 * near["width"] + cfg.outside_margin
    drv = pick_lane(ego.cand, (LaneType.DRIVING,))
    in_junction = take(mb.lane_junction, m, drv["lane"].clamp_min(0)) >= 0
    opposite = _wrap(ego.yaw - drv["heading"]).abs() > math.radians(cfg.wrong_direction_deg)
    wrong = (drv["lane"] >= 0) & ~in_junction & opposite
    counts = outside | (wrong & ~prev.wrong_dir_exempt)
    bad = ego.moved * counts.to(ego.moved.dtype)
    book = {"driven": prev.driven + ego.moved, "driven_outside": prev.driven_outside + bad,
            "progress_outside": prev.progress_outside + route_step * counts.to(route_step.dtype)}
    return book, {"driven": ego.moved, "outside_lanes": bad, "wrong_direction": wrong}


def _termination(
    prev: WorldState, state: WorldState, ego: _Ego, collisions: dict, route: dict, cfg: EventConfig,
    end_on_collision: bool,
) -> tuple[dict, dict]:
    """Route-ending rules. Returns (bookkeeping ``blocked_time``, ``driven_far``; events ``ended (B,)``
    bool and ``reason (B,)`` long EndReason, RUNNING where it did not end).

    Priority within one step: COMPLETED, COLLISION (only with ``end_on_collision``), ROUTE_DEVIATION
    (> ``deviation_dist`` from the route, or ``driven_far`` > ``far_fraction`` x route length), BLOCKED
    (``blocked_time`` >= ``blocked_time``), ROUTE_TIMEOUT (elapsed > base + length / speed), TICK_CAP.
    Route deviation is evaluated only for worlds that have a route. While ``prev.blocked_exempt`` (a
    scenario's own timeout runs) the blocked clock stays at 0, so it restarts when the test resumes.
    """
    slow = (ego.speed < cfg.blocked_speed) & ~prev.blocked_exempt
    blocked = torch.where(slow, prev.blocked_time + cfg.dt, torch.zeros_like(prev.blocked_time))
    far = route["has_route"] & (route["route_dist"] > cfg.far_dist)
    driven_far = prev.driven_far + ego.moved * far.to(ego.moved.dtype)
    length = state.route_length
    deviation = route["has_route"] & (
        (route["route_dist"] > cfg.deviation_dist) | (driven_far > cfg.far_fraction * length)
    )
    rules = [  # highest priority first
        (route["completed"], EndReason.COMPLETED),
        (collisions["counted"] & end_on_collision, EndReason.COLLISION),
        (deviation, EndReason.ROUTE_DEVIATION),
        (blocked >= cfg.blocked_time - _TIME_EPS, EndReason.BLOCKED),
        (ego.time > cfg.route_timeout_base + length / cfg.route_timeout_speed, EndReason.ROUTE_TIMEOUT),
        (ego.time > cfg.tick_cap, EndReason.TICK_CAP),
    ]
    reason = torch.full_like(state.end_reason, EndReason.RUNNING)
    for cond, code in reversed(rules):
        reason = torch.where(cond, torch.full_like(reason, code), reason)
    return {"blocked_time": blocked, "driven_far": driven_far}, {"ended": reason != EndReason.RUNNING, "reason": reason}


def _flags(
    mb: MapBatch, prev: WorldState, state: WorldState, ego: _Ego, lights: Tensor, stops: dict, route: dict,
    lanes: dict, cfg: EventConfig,
) -> dict:
    """CRAFT's per-step flags and measurements, all (B,). See :class:`StepEvents` for their meaning.

    stop_zone: the ego centre is before the stop line of a RED / YELLOW light of its current lane with
    its front within braking distance v^2 / (2 ``stop_decel``) + ``stop_margin`` of it, or the ego is
    inside a stop trigger area without having stopped. go_zone: no stop zone, route not completed, and no
    valid agent overlaps the corridor of ``go_clear_dist`` ahead of the ego's front, ego width +
    ``go_clear_margin`` wide.
    """
    m = state.map_id
    fwd = _unit(ego.yaw)
    # stop zone: lights of the current lane, stop signs not yet served
    centre_along, _ = _light_frame(mb, state, ego.pos)
    front_along, _ = _light_frame(mb, state, ego.pos + 0.5 * ego.length[:, None] * fwd)
    reach = ego.speed**2 / (2 * cfg.stop_decel) + cfg.stop_margin
    own = (ego.lane["lane"][:, None] >= 0) & (mb.light_lane[m] == ego.lane["lane"][:, None])
    not_green = mb.light_valid[m] & (lights != int(LightState.GREEN))
    light_stop = own & not_green & (centre_along < 0) & (front_along >= -reach[:, None])
    stop_zone = light_stop.any(-1) | (stops["inside"] & ~stops["ok"]).any(-1)
    # go zone: corridor ahead clear of other agents
    corridor_len = torch.full_like(ego.length, cfg.go_clear_dist)
    centre = ego.pos + (0.5 * ego.length + 0.5 * cfg.go_clear_dist)[:, None] * fwd
    blocking = boxes_overlap(
        centre[:, None], ego.yaw[:, None], corridor_len[:, None], (ego.width + cfg.go_clear_margin)[:, None],
        state.pos, state.yaw, state.length, state.width,
    )
    others = state.valid.clone()
    others[:, 0] = False
    clear = ~(blocking & others).any(-1)
    go_zone = ~stop_zone & clear & ~route["completed"]
    # lanes
    on_road = drivable(mb, m, ego.pos, cand=ego.cand)
    edge = pick_lane(ego.cand, (LaneType.DRIVING, LaneType.SHOULDER))
    emergency = (edge["lane"] >= 0) & (take(mb.lane_type, m, edge["lane"].clamp_min(0)) == int(LaneType.SHOULDER))
    emergency = emergency & (edge["dist"] <= 0.5 * edge["width"])
    lane_dist = ego.lane["dist"]
    lane_dist = torch.where(torch.isfinite(lane_dist), lane_dist, torch.full_like(lane_dist, cfg.lane_dist_cap))
    # background traffic
    bg_kind = torch.zeros_like(state.valid)
    for kd in _BACKGROUND_KINDS:
        bg_kind |= state.kind == int(kd)
    near = (state.pos - ego.pos[:, None]).norm(dim=-1) <= cfg.background_radius
    # moving traffic only: parked / scripted-static vehicles and agents held by a script are not traffic
    bg = others & bg_kind & near & ~state.hold & (state.mode != Mode.STATIC)
    n_bg = bg.sum(-1)
    bg_sum = torch.where(bg, state.speed.abs(), torch.zeros_like(state.speed)).sum(-1)
    bg_speed = torch.where(n_bg > 0, bg_sum / n_bg.clamp_min(1), torch.full_like(bg_sum, float("nan")))
    return {
        "offroad": ~on_road,
        "opposite_lane": lanes["wrong_direction"],
        "offroute": route["has_route"] & (route["route_dist"] > cfg.offroute_dist),
        "emergency_lane": emergency,
        "stop_zone": stop_zone,
        "go_zone": go_zone,
        "route_dist": route["route_dist"],
        "lane_center_dist": lane_dist,
        "heading_error": _wrap(ego.yaw - route["route_heading"]).abs(),
        "speed": state.speed[:, 0],
        "accel": (state.speed[:, 0] - prev.speed[:, 0]) / cfg.dt,
        "yaw_rate": _wrap(ego.yaw - ego.prev_yaw) / cfg.dt,
        "background_speed": bg_speed,
    }


# ---------------------------------------------------------------------- composition
def _check_shapes(mb: MapBatch, prev: WorldState, state: WorldState, lights: Tensor) -> None:
    B = state.batch_size
    K = mb.light_pos.shape[1]
    Q = mb.stop_trigger.shape[1]
    if tuple(lights.shape) != (B, K):
        raise CraftError(f"update_events: lights must have shape (B, K) = {(B, K)}, got {tuple(lights.shape)}")
    if state.light_done.shape[1] != K or state.stop_inside.shape[1] != Q:
        raise CraftError(
            f"update_events: the state has {state.light_done.shape[1]} light / {state.stop_inside.shape[1]} "
            f"stop-sign slots but the map batch has {K} / {Q}; build the state with the map batch's sizes"
        )
    if prev.batch_size != B or prev.num_agents != state.num_agents:
        raise CraftError("update_events: prev and state must have the same worlds and agents")


def update_events(
    mb: MapBatch,
    prev: WorldState,
    state: WorldState,
    lights: Tensor,
    cfg: EventConfig = EventConfig(),
    end_on_collision: bool = False,
    cand: dict | None = None,
) -> tuple[WorldState, StepEvents]:
    """Apply the event rules to one world step (``cand``: the ego's :func:`lane_candidates`, if the caller
    already has them for ``state``'s ego position).

    Args:
        mb: the map batch the worlds index with ``state.map_id``.
        prev: the state before the step (its bookkeeping fields are the values before the step).
        state: the state after every agent moved. Elapsed time is ``(prev.step + 1) * dt``, so it does not
            matter whether ``state.step`` was advanced before or after this call.
        lights: ``(B, K)`` long LightState in effect during the step.
        cfg: thresholds.
        end_on_collision: b2d-star protocol: the first counted collision ends the route.

    Returns:
        ``state`` with the ego bookkeeping fields updated (a new object; inputs are not modified) and
        this step's :class:`StepEvents`, all (B,). Worlds done before the step keep ``prev``'s
        bookkeeping and report no events (False / 0 / -1; measurements such as ``speed`` are still filled).
    """
    _check_shapes(mb, prev, state, lights)
    ego = _ego_view(mb, prev, state, cfg, cand)
    col_book, col = _collisions(prev, state, ego, cfg)
    red_book, red = _red_lights(mb, prev, state, ego, lights, cfg)
    stop_book, stop = _stop_signs(mb, prev, state, ego, cfg)
    route_book, route = _route_progress(prev, state, ego, cfg)
    lane_book, lanes = _lanes(mb, prev, state, ego, cfg, route["progress"])
    term_book, term = _termination(prev, state, ego, col, route, cfg, end_on_collision)
    flags = _flags(mb, prev, state, ego, lights, stop, route, lanes, cfg)

    active = ~prev.done  # (B,)
    ended = active & term["ended"]
    book = {**col_book, **red_book, **stop_book, **route_book, **lane_book, **term_book}
    book = {k: _keep(active, v, getattr(prev, k)) for k, v in book.items()}
    book["done"] = prev.done | ended
    book["end_reason"] = torch.where(ended, term["reason"], prev.end_reason)
    new_state = state.replace(**book)

    def ev_bool(x: Tensor) -> Tensor:
        return x & active

    def ev_amount(x: Tensor) -> Tensor:
        return torch.where(active, x, torch.zeros_like(x))

    rc_prev = torch.where(
        route["has_route"], (prev.progress / state.route_length.clamp_min(1e-6)).clamp(max=1.0) * 100.0,
        torch.zeros_like(prev.progress),
    )
    events = StepEvents(
        collision_pedestrian=ev_bool(col["collision_pedestrian"]),
        collision_vehicle=ev_bool(col["collision_vehicle"]),
        collision_layout=ev_bool(col["collision_layout"]),
        collision_any=ev_bool(col["collision_any"]),
        collided_agent=torch.where(active, col["collided_agent"], torch.full_like(col["collided_agent"], -1)),
        red_light=ev_bool(red["red_light"]),
        stop_infraction=ev_bool(stop["stop_infraction"]),
        progress=ev_amount(route["progress"]),
        route_completion=torch.where(active, route["route_completion"], rc_prev),
        driven=ev_amount(lanes["driven"]),
        outside_lanes=ev_amount(lanes["outside_lanes"]),
        offroad=ev_bool(flags["offroad"]),
        opposite_lane=ev_bool(flags["opposite_lane"]),
        offroute=ev_bool(flags["offroute"]),
        emergency_lane=ev_bool(flags["emergency_lane"]),
        stop_zone=ev_bool(flags["stop_zone"]),
        go_zone=ev_bool(flags["go_zone"]),
        route_dist=flags["route_dist"],
        lane_center_dist=flags["lane_center_dist"],
        heading_error=flags["heading_error"],
        speed=flags["speed"],
        accel=flags["accel"],
        yaw_rate=flags["yaw_rate"],
        background_speed=flags["background_speed"],
        done=ended,
        end_reason=torch.where(ended, term["reason"], torch.zeros_like(term["reason"])),
    )
    return new_state, events


def _keep(active: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """new where the world is active, old otherwise; active (B,) broadcast over trailing axes."""
    mask = active.reshape(active.shape + (1,) * (new.dim() - 1))
    return torch.where(mask, new, old)
