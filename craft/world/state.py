"""World state: a dataclass of tensors with a leading world axis ``B`` and padded entity axes.

Agents (``N`` per world, padded, ``valid`` mask) include the ego at index 0, background vehicles,
pedestrians and static objects, so every mechanism (leader search, collisions, yielding) sees the ego
like any other road user. Lane-following agents carry their lane, arc length, a short queue of
upcoming lanes and a lateral offset used for smooth lane changes.

Everything is a tensor, so :meth:`WorldState.clone` is a cheap batched copy and
:meth:`WorldState.index` selects worlds (e.g. to replicate one world G times for counterfactuals).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from craft.errors import CraftError
from craft.world.kinds import AgentKind


class Mode:
    """How an agent moves (``WorldState.mode``)."""

    LANE = 0  # follow lanes with IDM, yielding, lights, lane changes (vehicles) or walking (pedestrians)
    FREE = 1  # scripted: hold heading, track ``speed_override`` (e.g. a pedestrian stepping out)
    STATIC = 2  # never moves
    EXTERNAL = 3  # controlled from outside (the ego)


QUEUE = 3  # upcoming lanes kept per agent


@dataclass
class WorldState:
    """Batched world state. Shapes: ``B`` worlds, ``N`` agents (ego = 0), ``K`` lights, ``Q`` stop signs,
    ``R`` route lanes, ``P`` dense route points."""

    # --- time and map
    step: torch.Tensor  # (B,) long, simulation steps since reset
    map_id: torch.Tensor  # (B,) long, index into the MapBatch
    seed: torch.Tensor  # (B,) long, per-world random stream key
    # --- agents: physical state
    pos: torch.Tensor  # (B, N, 2)
    yaw: torch.Tensor  # (B, N)
    speed: torch.Tensor  # (B, N)
    steer: torch.Tensor  # (B, N) current steering angle
    accel: torch.Tensor  # (B, N) last applied acceleration
    length: torch.Tensor  # (B, N)
    width: torch.Tensor  # (B, N)
    wheelbase: torch.Tensor  # (B, N)
    kind: torch.Tensor  # (B, N) long AgentKind
    valid: torch.Tensor  # (B, N) bool
    siren: torch.Tensor  # (B, N) bool (emergency vehicles)
    mode: torch.Tensor  # (B, N) long Mode
    # --- lane following
    lane: torch.Tensor  # (B, N) long current lane (-1 none)
    s: torch.Tensor  # (B, N) arc length on the current lane
    queue: torch.Tensor  # (B, N, QUEUE) long upcoming lanes (-1: none, stop at lane end)
    offset: torch.Tensor  # (B, N) lateral offset from the lane centre, decays to 0 (lane changes)
    stopped_at: torch.Tensor  # (B, N) long: lane whose stop sign this agent has served (-1 none)
    wait: torch.Tensor  # (B, N) seconds spent waiting (stop signs, crossings)
    # --- behaviour parameters (scenarios script these)
    v_des: torch.Tensor  # (B, N) desired speed, m/s
    headway: torch.Tensor  # (B, N) IDM time headway T, s
    min_gap: torch.Tensor  # (B, N) IDM jam distance s0, m
    a_max: torch.Tensor  # (B, N) IDM maximum acceleration, m/s^2
    b_comf: torch.Tensor  # (B, N) IDM comfortable deceleration, m/s^2
    politeness: torch.Tensor  # (B, N) MOBIL politeness p
    react_ego: torch.Tensor  # (B, N) bool: treats the ego as a leader / conflicting road user
    ignore_lights: torch.Tensor  # (B, N) bool: runs red lights
    ignore_stops: torch.Tensor  # (B, N) bool: ignores stop signs
    ignore_priority: torch.Tensor  # (B, N) bool: takes priority at junctions
    ignore_vehicles: torch.Tensor  # (B, N) bool: no vehicle (the ego included) or static object is its leader
    lane_changes: torch.Tensor  # (B, N) bool: may change lanes (MOBIL)
    speed_override: torch.Tensor  # (B, N) target speed overriding IDM's free speed; NaN = none
    hold: torch.Tensor  # (B, N) bool: frozen in place until released (scripted triggers)
    # --- signals
    light_override: torch.Tensor  # (B, K) long, forced LightState or -1
    # --- ego route
    route_lanes: torch.Tensor  # (B, R) long, -1 padded
    route_idx: torch.Tensor  # (B,) long, index into route_lanes of the ego's current lane
    route_pts: torch.Tensor  # (B, P, 2) dense route polyline
    route_cum: torch.Tensor  # (B, P) arc length along the route polyline
    route_valid: torch.Tensor  # (B, P) bool
    route_length: torch.Tensor  # (B,)
    # --- ego event bookkeeping (Bench2Drive rules)
    progress: torch.Tensor  # (B,) route arc length passed, m
    progress_idx: torch.Tensor  # (B,) long, index of the last passed route point
    col_actor_time: torch.Tensor  # (B, N) time of the last counted collision with each actor (-inf none)
    col_last_pos: torch.Tensor  # (B, 2) position of the last counted collision (NaN none)
    light_done: torch.Tensor  # (B, K) bool, red-light infraction already counted for this light
    stop_inside: torch.Tensor  # (B, Q) bool, ego inside the stop sign's trigger area
    stop_ok: torch.Tensor  # (B, Q) bool, ego reached < 0.1 m/s while inside
    blocked_time: torch.Tensor  # (B,) seconds at < 0.1 m/s
    driven: torch.Tensor  # (B,) metres driven
    driven_outside: torch.Tensor  # (B,) metres driven outside route lanes / in the wrong direction
    driven_far: torch.Tensor  # (B,) metres driven more than 15 m away from the route
    progress_outside: torch.Tensor  # (B,) route metres passed while outside route lanes / in the wrong direction
    wrong_dir_exempt: torch.Tensor  # (B,) bool, a wrong-direction lane does not count now (TwoWays scenarios)
    blocked_exempt: torch.Tensor  # (B,) bool, the blocked test is suspended now (a scenario's own timeout runs)
    done: torch.Tensor  # (B,) bool, route ended
    end_reason: torch.Tensor  # (B,) long EndReason (0 while running)

    # ------------------------------------------------------------------ utilities
    @property
    def batch_size(self) -> int:
        return int(self.pos.shape[0])

    @property
    def num_agents(self) -> int:
        return int(self.pos.shape[1])

    @property
    def device(self) -> torch.device:
        return self.pos.device

    def replace(self, **kw) -> "WorldState":
        """A shallow copy with some fields replaced (state in, state out)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(kw)
        return WorldState(**d)

    def clone(self) -> "WorldState":
        """Deep copy of every tensor (cheap: one memcpy per field)."""
        return WorldState(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def index(self, idx: torch.Tensor | slice) -> "WorldState":
        """Select worlds: ``idx`` is a (B',) long/bool tensor or a slice; returns a new state of B' worlds."""
        return WorldState(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to(self, device) -> "WorldState":
        return WorldState(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @staticmethod
    def concat(states: list["WorldState"]) -> "WorldState":
        """Concatenate worlds with equal padded sizes along the world axis."""
        return WorldState(**{f.name: torch.cat([getattr(s, f.name) for s in states]) for f in fields(WorldState)})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def is_vehicle(self) -> torch.Tensor:
        """(B, N) bool: ego, cars, trucks, bicycles, emergency vehicles."""
        k = self.kind
        return self.valid & (k != int(AgentKind.PEDESTRIAN)) & (k != int(AgentKind.STATIC))

    def is_pedestrian(self) -> torch.Tensor:
        return self.valid & (self.kind == int(AgentKind.PEDESTRIAN))


class EndReason:
    """Why a route ended (``WorldState.end_reason``)."""

    RUNNING = 0
    COMPLETED = 1
    COLLISION = 2  # only under the b2d-star protocol
    ROUTE_DEVIATION = 3
    BLOCKED = 4
    ROUTE_TIMEOUT = 5
    TICK_CAP = 6

    NAMES = {0: "running", 1: "completed", 2: "collision", 3: "route_deviation", 4: "agent_blocked",
             5: "route_timeout", 6: "tick_cap"}


@dataclass
class StepEvents:
    """What happened to the ego in one step, per world; all (B,). Counted events follow Bench2Drive's
    de-duplication rules; flags are the per-step indicators CRAFT's rewards use."""

    collision_pedestrian: torch.Tensor  # bool, counted collision with a pedestrian
    collision_vehicle: torch.Tensor  # bool, counted collision with a vehicle (incl. bicycles)
    collision_layout: torch.Tensor  # bool, counted collision with a static object / layout
    collision_any: torch.Tensor  # bool, ego overlaps anything this step (before de-duplication)
    collided_agent: torch.Tensor  # long, agent index of the counted collision (-1 none)
    red_light: torch.Tensor  # bool, red-light infraction this step
    stop_infraction: torch.Tensor  # bool, stop-sign infraction this step
    progress: torch.Tensor  # float, route metres newly passed this step
    route_completion: torch.Tensor  # float, RC in percent so far
    driven: torch.Tensor  # float, metres driven this step
    outside_lanes: torch.Tensor  # float, metres driven outside route lanes / in the wrong direction
    offroad: torch.Tensor  # bool, ego centre not on a drivable lane
    opposite_lane: torch.Tensor  # bool, ego on an opposite-direction lane (outside junctions)
    offroute: torch.Tensor  # bool, ego more than ``offroute_dist`` from the route
    emergency_lane: torch.Tensor  # bool, ego on a shoulder lane
    stop_zone: torch.Tensor  # bool, ego must stop (red light / unserved stop sign ahead, within reach)
    go_zone: torch.Tensor  # bool, ego should move (no reason to stop, path clear)
    route_dist: torch.Tensor  # float, lateral distance to the route, m
    lane_center_dist: torch.Tensor  # float, distance to the matched lane centre, m
    heading_error: torch.Tensor  # float, |ego heading - route heading|, rad
    speed: torch.Tensor  # float, ego speed after the step
    accel: torch.Tensor  # float, ego longitudinal acceleration
    yaw_rate: torch.Tensor  # float, ego yaw rate
    background_speed: torch.Tensor  # float, mean speed of background vehicles within 50 m (NaN none)
    done: torch.Tensor  # bool, the route ended this step
    end_reason: torch.Tensor  # long EndReason


def empty_state(B: int, N: int, K: int, Q: int, R: int, P: int, device="cpu") -> WorldState:
    """A state of ``B`` worlds with every agent invalid and neutral bookkeeping; reset fills it in.

    Also handy in tests to build small hand-made situations.
    """
    f = dict(device=device, dtype=torch.float32)
    i = dict(device=device, dtype=torch.long)
    b = dict(device=device, dtype=torch.bool)
    zf = lambda *s: torch.zeros(*s, **f)  # noqa: E731
    return WorldState(
        step=torch.zeros(B, **i),
        map_id=torch.zeros(B, **i),
        seed=torch.zeros(B, **i),
        pos=zf(B, N, 2),
        yaw=zf(B, N),
        speed=zf(B, N),
        steer=zf(B, N),
        accel=zf(B, N),
        length=torch.full((B, N), 4.5, **f),
        width=torch.full((B, N), 1.9, **f),
        wheelbase=torch.full((B, N), 2.8, **f),
        kind=torch.full((B, N), int(AgentKind.CAR), **i),
        valid=torch.zeros(B, N, **b),
        siren=torch.zeros(B, N, **b),
        mode=torch.full((B, N), Mode.STATIC, **i),
        lane=torch.full((B, N), -1, **i),
        s=zf(B, N),
        queue=torch.full((B, N, QUEUE), -1, **i),
        offset=zf(B, N),
        stopped_at=torch.full((B, N), -1, **i),
        wait=zf(B, N),
        v_des=torch.full((B, N), 10.0, **f),
        headway=torch.full((B, N), 1.5, **f),
        min_gap=torch.full((B, N), 2.0, **f),
        a_max=torch.full((B, N), 2.0, **f),
        b_comf=torch.full((B, N), 3.0, **f),
        politeness=torch.full((B, N), 0.3, **f),
        react_ego=torch.ones(B, N, **b),
        ignore_lights=torch.zeros(B, N, **b),
        ignore_stops=torch.zeros(B, N, **b),
        ignore_priority=torch.zeros(B, N, **b),
        ignore_vehicles=torch.zeros(B, N, **b),
        lane_changes=torch.ones(B, N, **b),
        speed_override=torch.full((B, N), float("nan"), **f),
        hold=torch.zeros(B, N, **b),
        light_override=torch.full((B, max(K, 1)), -1, **i),
        route_lanes=torch.full((B, max(R, 1)), -1, **i),
        route_idx=torch.zeros(B, **i),
        route_pts=zf(B, max(P, 2), 2),
        route_cum=zf(B, max(P, 2)),
        route_valid=torch.zeros(B, max(P, 2), **b),
        route_length=zf(B),
        progress=zf(B),
        progress_idx=torch.zeros(B, **i),
        col_actor_time=torch.full((B, N), float("-inf"), **f),
        col_last_pos=torch.full((B, 2), float("nan"), **f),
        light_done=torch.zeros(B, max(K, 1), **b),
        stop_inside=torch.zeros(B, max(Q, 1), **b),
        stop_ok=torch.zeros(B, max(Q, 1), **b),
        blocked_time=zf(B),
        driven=zf(B),
        driven_outside=zf(B),
        driven_far=zf(B),
        progress_outside=zf(B),
        wrong_dir_exempt=torch.zeros(B, **b),
        blocked_exempt=torch.zeros(B, **b),
        done=torch.zeros(B, **b),
        end_reason=torch.zeros(B, **i),
    )


def resize_state(state: WorldState, N: int, R: int, P: int) -> WorldState:
    """``state`` with its padded sizes set to ``N`` agents, ``R`` route lanes and ``P`` route points.

    Growing fills new slots with :func:`~craft.world.state.empty_state`'s fill values (invalid agents, ``-1``
    lanes, invalid route points), except ``route_pts`` / ``route_cum``, which repeat their last entry as
    :meth:`World.reset` pads them (so the arc lengths stay sorted). Shrinking cuts trailing slots: the caller
    must only cut padding (each world's agents, route lanes and route points must fit). Fields whose size
    does not change are shared, not copied.
    """
    B = state.batch_size
    K = state.light_override.shape[1]
    Q = state.stop_ok.shape[1]
    p0 = state.route_pts.shape[1]
    if min(N, R, P) < 1:
        raise CraftError(f"resize_state: sizes must be >= 1, got N={N}, R={R}, P={P}")
    if (N, R, P) == (state.num_agents, state.route_lanes.shape[1], p0):
        return state
    out = empty_state(B, N, K, Q, R, P, device=state.device).tensors()
    for name, src in state.tensors().items():
        dst = out[name]
        if dst.shape == src.shape:
            out[name] = src
            continue
        keep = tuple(slice(0, min(a, b)) for a, b in zip(src.shape, dst.shape))
        dst[keep] = src[keep]
        if name in ("route_pts", "route_cum") and dst.shape[1] > p0:
            dst[:, p0:] = src[:, -1:]
    return WorldState(**out)
