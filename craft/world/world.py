"""The batched closed-loop world: ``reset(specs, seed) -> WorldState`` and
``step(state, control) -> (WorldState, StepEvents)``.

One step (dt = 0.1 s):

1. traffic lights from each junction's cycle (and scripted overrides);
2. reactive traffic decides every background agent's controls (:mod:`craft.world.traffic`);
3. the ego's control (accel, steer) comes from outside (a tracker following a policy's trajectory);
4. every vehicle (ego included) advances with the kinematic bicycle, pedestrians with the heading +
   speed model, static objects stay;
5. lane bookkeeping (arc length, next lanes) and the ego's lane / route index are updated;
6. Bench2Drive's per-step events and CRAFT's flags are computed (:mod:`craft.world.events`).

Worlds that finished their route keep being stepped (cheap) but report no further events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from craft.errors import CraftError
from craft.world.dynamics import bicycle_step, pedestrian_step
from craft.world.events import EventConfig, update_events
from craft.world.kinds import DEFAULT_SIZE, AgentKind
from craft.world.map import DRIVABLE, LaneType, MapBatch, RoadMap, lane_candidates, light_states, pick_lane
from craft.world.state import QUEUE, Mode, StepEvents, WorldState, empty_state
from craft.world.traffic import TrafficConfig, advance_lanes, refill_queue, traffic_step

# Per-kind actuator limits: max_accel, max_brake, max_steer, max_steer_rate, max_speed.
_LIMITS = {
    AgentKind.EGO: (3.5, 8.0, 0.6, 1.2, 30.0),
    AgentKind.CAR: (3.0, 8.0, 0.6, 1.2, 30.0),
    AgentKind.TRUCK: (1.5, 6.0, 0.5, 0.8, 25.0),
    AgentKind.BICYCLE: (1.5, 4.0, 0.7, 1.5, 9.0),
    AgentKind.EMERGENCY: (4.0, 8.0, 0.6, 1.2, 35.0),
    AgentKind.PEDESTRIAN: (1.5, 3.0, 3.0, 3.0, 3.5),  # accel, -, turn rate, -, speed
    AgentKind.STATIC: (0.0, 0.0, 0.0, 0.0, 0.0),
}


@dataclass(frozen=True)
class WorldConfig:
    """Configuration of the closed-loop world."""

    dt: float = 0.1  # simulation step, s
    end_on_collision: bool = False  # b2d-star protocol: the first counted collision ends the route
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
    events: EventConfig = field(default_factory=EventConfig)
    spawn_gap: float = 10.0  # minimum distance between spawned background agents, m
    spawn_clear_ahead: float = 25.0  # no background vehicle spawns this close ahead of the ego on its lane, m
    spawn_clear_behind: float = 40.0  # no background vehicle spawns this close behind the ego (its lane and the lanes before), m
    spawn_radius: float = 250.0  # background agents concentrate within this distance of the ego start, m
    spawn_near_share: float = 3.0  # weight boost of lanes within spawn_radius (relative to their length share)


@dataclass
class AgentSpec:
    """An explicitly placed agent (scenarios script these).

    Lane-bound agents give ``lane`` and ``s``; free or static ones give ``pos`` and ``yaw``.
    ``behaviour`` overrides WorldState behaviour fields by name (e.g. ``{"v_des": 12, "ignore_lights": True}``).
    """

    kind: AgentKind
    lane: int = -1
    s: float = 0.0
    pos: tuple[float, float] | None = None
    yaw: float | None = None
    speed: float = 0.0
    mode: int = Mode.LANE
    size: tuple[float, float] | None = None  # (length, width)
    siren: bool = False
    hold: bool = False
    behaviour: dict = field(default_factory=dict)


@dataclass
class WorldSpec:
    """Everything needed to reset one world: its map, the ego route, traffic."""

    map_index: int
    route: list[int]  # ego route as a lane sequence (successors or same-direction neighbours)
    ego_s: float = 0.0  # ego start arc length on route[0]
    ego_speed: float = 0.0
    n_vehicles: int = 20  # random background vehicles
    n_pedestrians: int = 8  # random pedestrians on sidewalks
    agents: list[AgentSpec] = field(default_factory=list)


_BEHAVIOUR_FIELDS = ("v_des", "headway", "min_gap", "a_max", "b_comf", "politeness", "react_ego",
                     "ignore_lights", "ignore_stops", "ignore_priority", "ignore_vehicles", "lane_changes",
                     "speed_override")


def _flows_after_collision(state: WorldState, collided: torch.Tensor) -> WorldState:
    """Once the ego hits an agent that ignores vehicles (a scripted flow or adversary at constant velocity),
    every such agent of that world drives like traffic again (sees vehicles and the ego), as Bench2Drive's
    ``ActorFlow`` stops its constant-velocity mode when one of its vehicles collides.

    collided: (B,) agent index of this step's counted collision (-1 none).
    """
    hit = collided >= 0  # (no host sync: the few (B, N) ops cost less than asking whether any world hit)
    ign = torch.gather(state.ignore_vehicles, 1, collided.clamp_min(0)[:, None]).squeeze(1) & hit
    clear = ign[:, None] & state.ignore_vehicles
    return state.replace(ignore_vehicles=state.ignore_vehicles & ~clear, react_ego=state.react_ego | clear)


class World:
    """The batched closed-loop driving world over a :class:`MapBatch`."""

    def __init__(self, maps: MapBatch | list[RoadMap], cfg: WorldConfig = WorldConfig(), device="cpu"):
        if not isinstance(maps, MapBatch):
            maps = MapBatch(list(maps), device)
        self.maps = maps
        self.cfg = cfg
        self.device = maps.device
        lim = torch.zeros(len(AgentKind), 5)
        for k, v in _LIMITS.items():
            lim[int(k)] = torch.tensor(v)
        self._limits = lim.to(self.device)

    # ------------------------------------------------------------------ reset
    def reset(self, specs: list[WorldSpec], seed: int, row_seeds: list[int] | None = None) -> WorldState:
        """Build B worlds from specs; background traffic is drawn from ``seed`` (same seed, same worlds).

        By default world ``b`` draws from ``(seed, b)``, so it depends on its row. ``row_seeds`` (B ints)
        seeds every world from its own number instead (its layout and its random stream depend on that
        number only, not on its row or on the other worlds of the batch); ``seed`` is then unused.
        """
        if not specs:
            raise CraftError("reset needs at least one WorldSpec")
        if row_seeds is not None and len(row_seeds) != len(specs):
            raise CraftError(f"reset: {len(row_seeds)} row_seeds for {len(specs)} specs")
        keys = ([[seed, b] for b in range(len(specs))] if row_seeds is None
                else [[int(s) % (2**31 - 1)] for s in row_seeds])
        rows = [self._layout(i, spec, keys[i]) for i, spec in enumerate(specs)]
        B = len(rows)
        N = max(len(r["agents"]) for r in rows)
        K = self.maps.light_lane.shape[1]
        Q = self.maps.stop_lane.shape[1]
        R = max(len(r["route"]) for r in rows)
        P = max(len(r["route_pts"]) for r in rows)
        st = empty_state(B, N, K, Q, R, P, device="cpu")
        t = st.tensors()
        for b, r in enumerate(rows):
            t["map_id"][b] = r["map"]
            t["seed"][b] = ((seed * 1000003 + b * 7919) % (2**31 - 1) if row_seeds is None
                            else int(row_seeds[b]) % (2**31 - 1))
            for n, a in enumerate(r["agents"]):
                for k, v in a.items():
                    if k == "queue":
                        t["queue"][b, n, : len(v)] = torch.tensor(v[:QUEUE], dtype=torch.long)
                    elif k == "pos":
                        t["pos"][b, n] = torch.tensor(v, dtype=torch.float32)
                    else:
                        t[k][b, n] = v
            rl = r["route"]
            t["route_lanes"][b, : len(rl)] = torch.tensor(rl)
            rp = torch.from_numpy(r["route_pts"]).float()
            t["route_pts"][b, : len(rp)] = rp
            t["route_pts"][b, len(rp):] = rp[-1]
            cum = torch.cat([torch.zeros(1), torch.cumsum((rp[1:] - rp[:-1]).norm(dim=-1), 0)])
            t["route_cum"][b, : len(rp)] = cum
            t["route_cum"][b, len(rp):] = cum[-1]
            t["route_valid"][b, : len(rp)] = True
            t["route_length"][b] = cum[-1]
        st = WorldState(**t).to(self.device)
        st = st.replace(queue=refill_queue(self.maps, st, st.lane, st.queue, salt=0))
        return self._sync_ego(st)

    def _layout(self, b: int, spec: WorldSpec, key: list[int]) -> dict:
        """Place the ego and every agent of one world (numpy; not a hot path); ``key`` seeds its draws."""
        if not 0 <= spec.map_index < self.maps.num_maps:
            raise CraftError(f"world {b}: map_index {spec.map_index} does not exist ({self.maps.num_maps} maps)")
        m: RoadMap = self.maps.maps[spec.map_index]
        route = [int(x) for x in spec.route]
        if not route:
            raise CraftError(f"world {b}: empty route")
        for a, c in zip(route[:-1], route[1:]):
            if not (0 <= a < m.num_lanes and 0 <= c < m.num_lanes):
                raise CraftError(f"world {b}: route lane out of range on map '{m.name}'")
            if c not in m.successors(a) and c not in (int(m.lane_left[a]), int(m.lane_right[a])):
                raise CraftError(f"world {b}: route is disconnected: lane {c} does not follow lane {a}")
        if not np.isfinite(spec.ego_s) or not 0 <= spec.ego_s <= float(m.lane_length[route[0]]):
            raise CraftError(f"world {b}: ego_s {spec.ego_s} is outside lane {route[0]}")
        rng = np.random.default_rng(key)
        agents = []
        ego_pos, ego_yaw = _pose(m, route[0], spec.ego_s)
        L, W, WB = DEFAULT_SIZE[AgentKind.EGO]
        agents.append(dict(pos=ego_pos, yaw=ego_yaw, speed=float(spec.ego_speed), length=L, width=W, wheelbase=WB,
                           kind=int(AgentKind.EGO), valid=True, mode=Mode.EXTERNAL, lane=route[0], s=spec.ego_s,
                           queue=route[1:1 + QUEUE], v_des=float(m.lane_speed_limit[route[0]])))
        taken = [np.asarray(ego_pos)]
        for k, a in enumerate(spec.agents):
            agents.append(self._explicit(m, b, k, a))
            taken.append(np.asarray(agents[-1]["pos"]))
        ahead_lanes = set(route[:2])
        behind_lanes = {route[0]} | set(m.predecessors(route[0]))
        for ln in list(behind_lanes):
            behind_lanes |= set(m.predecessors(ln))
        agents += self._spawn(m, rng, spec.n_vehicles, taken, ahead_lanes, spec, vehicles=True,
                              behind_lanes=behind_lanes)
        agents += self._spawn(m, rng, spec.n_pedestrians, taken, set(), spec, vehicles=False)
        return dict(map=spec.map_index, agents=agents, route=route, route_pts=_route_polyline(m, route, spec.ego_s))

    def _explicit(self, m: RoadMap, b: int, k: int, a: AgentSpec) -> dict:
        try:
            kind = AgentKind(int(a.kind))
        except ValueError:
            raise CraftError(f"world {b} agent {k}: unknown agent kind {a.kind}") from None
        if kind == AgentKind.EGO:
            raise CraftError(f"world {b} agent {k}: the ego is placed by the route, not as an agent")
        L, W, WB = DEFAULT_SIZE[kind]
        if a.size is not None:
            L, W = a.size
            if not (np.isfinite(L) and np.isfinite(W) and L > 0 and W > 0):
                raise CraftError(f"world {b} agent {k}: size must be positive, got {a.size}")
        if a.pos is not None:
            pos = np.asarray(a.pos, dtype=np.float64)
            yaw = float(a.yaw or 0.0)
            if not np.isfinite(pos).all() or not np.isfinite(yaw):
                raise CraftError(f"world {b} agent {k}: position / yaw must be finite")
            x0, y0, x1, y1 = m.bounds
            if not (x0 - 50 <= pos[0] <= x1 + 50 and y0 - 50 <= pos[1] <= y1 + 50):
                raise CraftError(f"world {b} agent {k}: position {tuple(pos)} is off the map '{m.name}'")
            lane, s = a.lane, a.s
        else:
            if not 0 <= a.lane < m.num_lanes:
                raise CraftError(f"world {b} agent {k}: lane {a.lane} does not exist on map '{m.name}'")
            if not np.isfinite(a.s) or not 0 <= a.s <= float(m.lane_length[a.lane]):
                raise CraftError(f"world {b} agent {k}: s={a.s} is outside lane {a.lane}")
            pos, yaw = _pose(m, a.lane, a.s)
            lane, s = a.lane, a.s
        if not np.isfinite(a.speed) or a.speed < 0:
            raise CraftError(f"world {b} agent {k}: speed must be finite and >= 0")
        mode = Mode.STATIC if kind == AgentKind.STATIC else int(a.mode)
        limit = float(m.lane_speed_limit[lane]) if lane >= 0 else 10.0
        row = dict(pos=tuple(pos), yaw=yaw, speed=float(a.speed), length=L, width=W, wheelbase=WB, kind=int(kind),
                   valid=True, mode=mode, lane=lane if mode == Mode.LANE else -1, s=s, siren=bool(a.siren),
                   hold=bool(a.hold), v_des=1.4 if kind == AgentKind.PEDESTRIAN else limit)
        for f, v in a.behaviour.items():
            if f not in _BEHAVIOUR_FIELDS:
                raise CraftError(f"world {b} agent {k}: unknown behaviour field '{f}' (one of {_BEHAVIOUR_FIELDS})")
            row[f] = v
        return row

    def _spawn(self, m: RoadMap, rng, n: int, taken: list, avoid_lanes: set, spec: WorldSpec, vehicles: bool,
               behind_lanes: set = frozenset()):
        """Random background agents on lanes of the right type, at least ``spawn_gap`` apart."""
        if n <= 0:
            return []
        types = (LaneType.DRIVING,) if vehicles else (LaneType.SIDEWALK,)
        ok = np.isin(m.lane_type, [int(t) for t in types]) & (m.lane_junction < 0)
        lanes = np.nonzero(ok)[0]
        if len(lanes) == 0:
            return []
        w = m.lane_length[lanes].astype(np.float64)
        # like Bench2Drive's background traffic, most agents start around the ego
        mid = m.points[m.lane_offset[lanes] + m.lane_count[lanes] // 2]
        near = np.hypot(*(mid - np.asarray(taken[0])).T) < self.cfg.spawn_radius
        if near.any():
            w = w * np.where(near, self.cfg.spawn_near_share / max(w[near].sum() / w.sum(), 1e-9), 1.0)
        cand_l = rng.choice(lanes, size=6 * n, p=w / w.sum())
        cand_s = rng.random(6 * n) * m.lane_length[cand_l]
        pts = m.points[m.lane_offset[cand_l] + np.minimum(np.round(cand_s / np.maximum(
            m.lane_length[cand_l] / np.maximum(m.lane_count[cand_l] - 1, 1), 1e-6)).astype(int), m.lane_count[cand_l] - 1)]
        out = []
        occ = np.array(taken, dtype=np.float64).reshape(-1, 2)
        gap = self.cfg.spawn_gap if vehicles else 3.0
        ego = occ[0]
        for i in range(len(cand_l)):
            if len(out) >= n:
                break
            p = pts[i]
            if len(occ) and np.min(np.sum((occ - p) ** 2, 1)) < gap * gap:
                continue
            lane, s = int(cand_l[i]), float(cand_s[i])
            if vehicles and lane in avoid_lanes and np.hypot(*(p - ego)) < self.cfg.spawn_clear_ahead:
                continue
            if vehicles and lane in behind_lanes and np.hypot(*(p - ego)) < self.cfg.spawn_clear_behind:
                continue  # nobody starts right behind the ego at speed (an unavoidable rear-end)
            occ = np.vstack([occ, p])
            pos, yaw = _pose(m, lane, s)
            limit = float(m.lane_speed_limit[lane])
            if vehicles:
                u = rng.random()
                kind = AgentKind.CAR if u < 0.85 else (AgentKind.TRUCK if u < 0.95 else AgentKind.BICYCLE)
                L, W, WB = DEFAULT_SIZE[kind]
                v_des = limit * rng.uniform(0.8, 1.05) if kind != AgentKind.BICYCLE else rng.uniform(4.0, 6.0)
                out.append(dict(pos=pos, yaw=yaw, speed=float(v_des * rng.uniform(0.3, 0.9)), length=L, width=W,
                                wheelbase=WB, kind=int(kind), valid=True, mode=Mode.LANE, lane=lane, s=s,
                                v_des=float(v_des), headway=float(rng.uniform(1.0, 2.0)),
                                min_gap=float(rng.uniform(1.5, 3.0)), a_max=float(rng.uniform(1.5, 2.5)),
                                b_comf=float(rng.uniform(2.5, 3.5)), politeness=float(rng.uniform(0.1, 0.5)),
                                lane_changes=kind != AgentKind.BICYCLE))
            else:
                L, W, WB = DEFAULT_SIZE[AgentKind.PEDESTRIAN]
                v = float(rng.uniform(1.0, 1.6))
                out.append(dict(pos=pos, yaw=yaw, speed=v, length=L, width=W, wheelbase=WB,
                                kind=int(AgentKind.PEDESTRIAN), valid=True, mode=Mode.LANE, lane=lane, s=s, v_des=v,
                                lane_changes=False))
        return out

    # ------------------------------------------------------------------ step
    def lights(self, state: WorldState) -> torch.Tensor:
        """(B, K) light states at the current time, with scripted overrides applied."""
        t = state.step.to(torch.float32) * self.cfg.dt
        ls = light_states(self.maps, state.map_id, t)
        return torch.where(state.light_override >= 0, state.light_override, ls)

    def step(self, state: WorldState, control: torch.Tensor) -> tuple[WorldState, StepEvents]:
        """Advance every world by dt. control: (B, 2) ego (acceleration m/s^2, steering angle rad)."""
        if control.shape != (state.batch_size, 2):
            raise CraftError(f"control must have shape (B, 2) = ({state.batch_size}, 2), got {tuple(control.shape)}")
        cfg = self.cfg
        lights = self.lights(state)
        ctrl, st = traffic_step(self.maps, state, lights, cfg.traffic)
        control = torch.nan_to_num(control.to(state.pos.dtype), nan=0.0, posinf=0.0, neginf=0.0)
        ego = state.kind == int(AgentKind.EGO)
        accel = torch.where(ego, control[:, :1], ctrl.accel)
        steer = torch.where(ego, control[:, 1:], ctrl.steer)
        lim = self._limits[state.kind]  # (B, N, 5)
        pos, yaw, speed, steer_s = bicycle_step(
            st.pos, st.yaw, st.speed, st.steer, accel, steer, st.wheelbase, cfg.dt,
            lim[..., 0], lim[..., 1], lim[..., 2], lim[..., 3], lim[..., 4])
        ppos, pyaw, pspeed = pedestrian_step(st.pos, st.yaw, st.speed, ctrl.ped_yaw, ctrl.ped_speed, cfg.dt,
                                             lim[..., 0], lim[..., 2], lim[..., 4])
        ped = state.kind == int(AgentKind.PEDESTRIAN)
        moving = state.valid & (state.mode != Mode.STATIC) & ~(state.hold & ~ego)
        new_pos = torch.where((moving & ped)[..., None], ppos, torch.where(moving[..., None], pos, st.pos))
        new_yaw = torch.where(moving & ped, pyaw, torch.where(moving, yaw, st.yaw))
        new_speed = torch.where(moving & ped, pspeed, torch.where(moving, speed, torch.zeros_like(speed)))
        applied = (new_speed - st.speed) / cfg.dt
        st = st.replace(pos=new_pos, yaw=new_yaw, speed=new_speed, steer=torch.where(moving & ~ped, steer_s, st.steer),
                        accel=applied)
        st = advance_lanes(self.maps, state, st, cfg.traffic, cfg.dt)
        st, cand = self._sync_ego(st, with_candidates=True)
        st, events = update_events(self.maps, state, st, lights, cfg.events, cfg.end_on_collision, cand)
        st = _flows_after_collision(st, events.collided_agent)
        st = st.replace(step=st.step + 1)
        return st, events

    def clone(self, state: WorldState) -> WorldState:
        """Independent copy of the state (cheap)."""
        return state.clone()

    def _sync_ego(self, st: WorldState, with_candidates: bool = False):
        """Match the ego to its lane (heading-aware) and advance its route index and lane queue.
        With ``with_candidates`` also returns the ego's lane candidates for the event rules."""
        mb = self.maps
        cand = lane_candidates(mb, st.map_id, st.pos[:, 0])
        r = pick_lane(cand, DRIVABLE, st.yaw[:, 0])
        on = r["lane"] >= 0
        lane = torch.where(on & (r["dist"] <= r["width"] / 2 + 1.0), r["lane"], torch.full_like(r["lane"], -1))
        # route index: the first route lane at or after the current index that matches
        R = st.route_lanes.shape[1]
        ar = torch.arange(R, device=st.device)
        window = (ar[None, :] >= st.route_idx[:, None]) & (ar[None, :] <= st.route_idx[:, None] + 3)
        match = window & (st.route_lanes == lane[:, None]) & (lane[:, None] >= 0)
        idx = torch.where(match.any(1), match.float().argmax(1), st.route_idx)
        on_route = match.any(1)
        nxt = idx[:, None] + 1 + torch.arange(QUEUE, device=st.device)[None, :]
        q_route = torch.gather(st.route_lanes, 1, nxt.clamp(max=R - 1))
        q_route = torch.where(nxt < R, q_route, torch.full_like(q_route, -1))
        q_route = torch.where(on_route[:, None], q_route, torch.full_like(q_route, -1))
        lane_all = st.lane.clone()
        s_all = st.s.clone()
        queue = st.queue.clone()
        lane_all[:, 0] = lane
        s_all[:, 0] = torch.where(lane >= 0, r["s"], torch.zeros_like(r["s"]))
        queue[:, 0] = q_route
        # off-route ego: assume it continues straight through successors
        filled = refill_queue(mb, st, lane_all, queue, salt=3)
        queue[:, 0] = torch.where(on_route[:, None], q_route, filled[:, 0])
        st = st.replace(lane=lane_all, s=s_all, queue=queue, route_idx=idx)
        return (st, cand) if with_candidates else st


# ---------------------------------------------------------------------- helpers
def _pose(m: RoadMap, lane: int, s: float):
    p = m.lane_points(lane)
    n = len(p)
    length = float(m.lane_length[lane])
    f = np.clip(s / max(length, 1e-6) * (n - 1), 0, n - 1 - 1e-6)
    i = int(np.floor(f))
    w = f - i
    pos = p[i] * (1 - w) + p[min(i + 1, n - 1)] * w
    yaw = float(m.point_heading[m.lane_offset[lane] + i])
    return (float(pos[0]), float(pos[1])), yaw


def _route_polyline(m: RoadMap, route: list[int], s0: float) -> np.ndarray:
    """Dense polyline of the ego route: along each lane, switching to a neighbour lane half way along."""
    out = []
    s_in = s0
    for i, lane in enumerate(route):
        p = m.lane_points(lane)
        spacing = float(m.lane_length[lane]) / max(len(p) - 1, 1)
        a = int(np.floor(s_in / spacing))
        nxt = route[i + 1] if i + 1 < len(route) else None
        if nxt is not None and nxt not in m.successors(lane):  # lane change: leave half way
            e = a + max(1, (len(p) - a) // 2)
            out.append(p[a:e])
            s_in = e * spacing
        else:
            out.append(p[a:] if not out else p[a:][(1 if np.allclose(p[a], out[-1][-1]) else 0):])
            s_in = 0.0
    pts = np.concatenate(out).astype(np.float32)
    keep = np.concatenate([[True], np.linalg.norm(np.diff(pts, axis=0), axis=1) > 1e-3])
    return pts[keep]


def random_route(m: RoadMap, rng: np.random.Generator, min_length: float = 100.0) -> list[int]:
    """A random drive through the lane graph from a random driving lane (outside junctions) of >= min_length m."""
    lanes = np.nonzero((m.lane_type == int(LaneType.DRIVING)) & (m.lane_junction < 0))[0]
    if len(lanes) == 0:
        raise CraftError(f"map '{m.name}' has no driving lanes to start a route on")
    route = [int(rng.choice(lanes))]
    total = float(m.lane_length[route[-1]])
    while total < min_length:
        succ = m.successors(route[-1])
        if not succ:
            break
        route.append(int(rng.choice(succ)))
        total += float(m.lane_length[route[-1]])
    return route


def random_specs(maps: MapBatch | list[RoadMap], batch: int, seed: int, n_vehicles: int = 20,
                 n_pedestrians: int = 8, min_length: float = 100.0) -> list[WorldSpec]:
    """``batch`` world specs with random routes spread over the maps (for benchmarks, demos, tests)."""
    road_maps = maps.maps if isinstance(maps, MapBatch) else list(maps)
    rng = np.random.default_rng(seed)
    specs = []
    for b in range(batch):
        mi = b % len(road_maps)
        specs.append(WorldSpec(map_index=mi, route=random_route(road_maps[mi], rng, min_length),
                               n_vehicles=n_vehicles, n_pedestrians=n_pedestrians))
    return specs
