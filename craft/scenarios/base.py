"""Scenario instances, the scenario registry and reusable placement helpers.

``build_scenario(type, town, rng) -> ScenarioInstance``: picks a fitting place in the town (from
``town.extras["features"]`` and the lane graph), builds the ego route (50-250 m through the lane graph),
the scenario's explicit agents (world indices 1..k, right after the ego) and its script (rules of
:mod:`craft.scenarios.script`). Every random choice comes from ``rng`` (a ``numpy.random.Generator``), so
the same town and the same rng seed give the same scenario. A builder that finds no fitting place raises
:class:`NoPlace`; :func:`build_scenario` retries (other places, other random draws) and finally raises
:class:`~craft.errors.CraftError` saying why the town cannot host the type.

Scenario types register with :func:`register`; :data:`SCENARIOS` maps a type name to ``(ability, builder)``.
The types themselves live in :mod:`craft.scenarios.library`, which the package ``craft.scenarios`` imports (this
module never imports it: the library depends on the base, not the other way).

Running scenarios::

    insts = [build_scenario(t, towns[i], rng, map_index=i) for ...]
    world = World(towns)
    state, table = start(world, insts, seed)          # reset + pinned queues + cut routes + packed rules
    for _ in range(T):
        state, table = script.apply(state, table, maps=world.maps)
        control = tracker_control + table.ego_perturbation
        state, events = world.step(state, control)

Routes: a ``WorldSpec`` route is a list of whole lanes, so the lane list covers the scenario and
:func:`start` cuts the dense route (``route_pts`` / ``route_cum`` / ``route_valid`` / ``route_length``) at
``ScenarioInstance.route_end_m``; a plain ``world.reset(spec)`` gives the uncut, longer route. Lengths are
log-normal around ~100 m (median ~103 m on the test split), within [50, 250] m, and always long enough to
cover the scenario's event plus a margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from craft.errors import CraftError
from craft.world.kinds import DEFAULT_SIZE, STATIC_SIZES, AgentKind
from craft.world.map import JunctionKind, LaneType, RoadMap
from craft.world.state import Mode
from craft.world.world import AgentSpec, WorldSpec
from craft.scenarios.script import Action, Rule, Trigger

ABILITIES = ("Overtaking", "Merging", "Emergency_Brake", "Give_Way", "Traffic_Signs")
ROUTE_MIN, ROUTE_MAX = 50.0, 250.0
ARRIVAL_REF_SPEED = 8.0  # ego speed at which a time-to-arrival trigger's firing point is placed on the route, m/s
STRAIGHT, LEFT, RIGHT = 0, 1, 2


class NoPlace(CraftError):
    """A builder found no fitting place with this draw (build_scenario retries)."""


@dataclass
class ScenarioInstance:
    """One scenario route: everything needed to reset a world and script it."""

    type: str
    ability: str
    spec: WorldSpec
    rules: list[Rule]
    town_seed: int
    route_length: float
    first_junction_progress_m: float | None  # route metres where the first junction connector starts
    emergency_index: int | None = None  # world index of the emergency vehicle, if any
    route_end_m: float | None = None  # the dense route is cut here (metres from the ego start) by start()
    queues: dict[int, list[int]] = field(default_factory=dict)  # pinned upcoming lanes of scripted agents
    abilities: tuple[str, ...] = ()  # every ability this type counts for (Traffic_Signs for starred types)
    meta: dict = field(default_factory=dict)  # placement details (lanes, junction, light, ...)
    time_limit_s: float | None = None  # the route's own tick cap (long routes); None: the runner's default (200 s)


TWO_WAYS_TYPES = ("AccidentTwoWays", "ConstructionObstacleTwoWays", "ParkedObstacleTwoWays",
                  "HazardAtSideLaneTwoWays", "VehicleOpensDoorTwoWays")
"""Types whose scenario switches Bench2Drive's wrong-direction test off while it runs (the ego must use the
opposite lane); HazardAtSideLaneTwoWays never switches it back on."""

TIMEOUT_TYPES = (
    "Accident", "AccidentTwoWays", "BlockedIntersection", "ConstructionObstacle", "ConstructionObstacleTwoWays",
    "CrossingBicycleFlow", "EnterActorFlow", "HazardAtSideLane", "HazardAtSideLaneTwoWays", "HighwayExit",
    "InterurbanActorFlow", "InterurbanAdvancedActorFlow", "InvadingTurn", "MergerIntoSlowTraffic",
    "MergerIntoSlowTrafficV2", "NonSignalizedJunctionLeftTurn", "NonSignalizedJunctionLeftTurnEnterFlow",
    "NonSignalizedJunctionRightTurn", "ParkedObstacle", "ParkedObstacleTwoWays", "ParkingExit",
    "SequentialLaneChange", "SignalizedJunctionLeftTurn", "SignalizedJunctionLeftTurnEnterFlow",
    "SignalizedJunctionRightTurn", "T_Junction", "VehicleOpensDoorTwoWays",
)
"""Types whose Bench2Drive scenario runs its own timeout (240 s), which suspends the blocked test from the
scenario's trigger until the scenario ends (the ego got past it)."""

SCENARIO_END_MARGIN = 15.0
"""The scenario counts as over this many route metres after its interaction point (junction types: after
the junction exit)."""

Builder = Callable[["Ctx"], None]
SCENARIOS: dict[str, tuple[str, Builder]] = {}
TRAFFIC_SIGN_EXTRA: set[str] = set()  # starred types (also counted for Traffic_Signs)


def register(name: str, ability: str, traffic_signs: bool = False):
    """Decorator: register a builder ``f(ctx)`` for scenario type ``name``."""
    if ability not in ABILITIES:
        raise ValueError(f"unknown ability {ability}")

    def deco(f):
        SCENARIOS[name] = (ability, f)
        if traffic_signs:
            TRAFFIC_SIGN_EXTRA.add(name)
        return f

    return deco


def implemented_types() -> list[str]:
    return sorted(SCENARIOS)


def town_seed_of(town: RoadMap) -> int:
    return int(town.extras.get("seed", -1))


def build_scenario(type: str, town: RoadMap, rng: np.random.Generator, map_index: int = 0,
                   attempts: int = 40, allowed: set[int] | None = None) -> ScenarioInstance:
    """Build a scenario of ``type`` on ``town``; raises CraftError if the town cannot host it.

    ``allowed``: the ego's route may only use these lanes (a fixed route, e.g. from a route file): the
    builder's choices of road lanes, junction connectors and feature lanes are restricted to them and its
    route walks prefer them; a placement whose route still leaves them counts as no place."""
    if type not in SCENARIOS:
        raise CraftError(f"unknown or not yet implemented scenario type '{type}'; implemented: "
                         f"{', '.join(sorted(SCENARIOS))}")
    if "features" not in town.extras:
        raise CraftError(f"map '{town.name}' has no feature metadata (extras['features']); scenarios need a "
                         "procedural town from craft.world.towns.generate_town")
    ability, builder = SCENARIOS[type]
    why = []
    for _ in range(attempts):
        ctx = Ctx(town, rng, type, map_index, allowed=allowed)
        try:
            builder(ctx)
            if allowed is not None and not set(ctx.route) <= allowed:
                raise NoPlace("its route leaves the given lanes")
            return ctx.finish(ability)
        except NoPlace as e:
            why.append(str(e))
    reasons = sorted(set(why))[:3]
    raise CraftError(f"town '{town.name}' cannot host scenario '{type}' (tried {attempts} placements): "
                     f"{'; '.join(reasons)}")


def restrict_features(f: dict, allowed: set[int]) -> dict:
    """Scenario features (``town.extras["features"]``) restricted to routes over the ``allowed`` lanes: lane
    lists keep the allowed lanes (walk lanes and lanes scenarios only put agents on stay), junctions keep the
    connectors the route may take."""
    keep_all = {"crosswalks", "sidewalks", "shoulders", "parking", "bike", "acceleration_lanes",
                "deceleration_lanes", "on_ramps", "off_ramps", "highway"}
    out = {}
    for k, v in f.items():
        if k == "junctions" or k in keep_all or not isinstance(v, list):
            out[k] = v
        else:
            out[k] = [x for x in v if x in allowed]
    # the list keeps its length (builders index it by junction id); :meth:`Ctx.junctions` skips the junctions
    # left without connectors
    out["junctions"] = [{**j, "connectors": {t: [c for c in cs if c in allowed] for t, cs in j["connectors"].items()}}
                        for j in f.get("junctions", [])]
    return out


# ---------------------------------------------------------------------- geometry helpers
def lane_pose(m: RoadMap, lane: int, s: float) -> tuple[np.ndarray, float]:
    """Position and heading at arc length ``s`` of ``lane`` (clamped)."""
    p = m.lane_points(lane)
    n = len(p)
    length = float(m.lane_length[lane])
    f = float(np.clip(s / max(length, 1e-6) * (n - 1), 0, n - 1 - 1e-6))
    i = int(math.floor(f))
    w = f - i
    pos = p[i] * (1 - w) + p[min(i + 1, n - 1)] * w
    return pos.astype(np.float64), float(m.point_heading[m.lane_offset[lane] + i])


def offset_pose(m: RoadMap, lane: int, s: float, lateral: float) -> tuple[tuple[float, float], float]:
    """Pose ``lateral`` metres left (negative: right) of the centre of ``lane`` at ``s``."""
    p, h = lane_pose(m, lane, s)
    q = p + lateral * np.array([-math.sin(h), math.cos(h)])
    return (float(q[0]), float(q[1])), h


def wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def route_segments(m: RoadMap, route: list[int], ego_s: float) -> list[tuple[int, float, float, float]]:
    """A lane route as (lane, s_from, s_to, route metres at s_from), mirroring the world's dense route: a
    lane change (next lane not a successor) leaves half way along the rest of the lane and joins the
    neighbour at the same arc length; the ego starts at ``ego_s`` on ``route[0]``."""
    out = []
    s_in, cum = float(ego_s), 0.0
    for i, lane in enumerate(route):
        L = float(m.lane_length[lane])
        nxt = route[i + 1] if i + 1 < len(route) else None
        if nxt is not None and nxt not in m.successors(lane):
            e = s_in + max(1.0, 0.5 * (L - s_in))
            out.append((lane, s_in, e, cum))
            cum += e - s_in
            s_in = min(e, float(m.lane_length[nxt]))
        else:
            out.append((lane, s_in, L, cum))
            cum += max(0.0, L - s_in)
            s_in = 0.0
    return out


# ---------------------------------------------------------------------- the build context
class Ctx:
    """What a builder fills in: the route, agents, rules; plus placement helpers."""

    def __init__(self, town: RoadMap, rng: np.random.Generator, type: str, map_index: int = 0,
                 allowed: set[int] | None = None):
        self.m = town
        self.rng = rng
        self.type = type
        self.map_index = map_index
        self.allowed = None if allowed is None else {int(x) for x in allowed}
        self.f = town.extras["features"] if allowed is None else restrict_features(town.extras["features"],
                                                                                   self.allowed)
        self.route: list[int] = []
        self.ego_s = 0.0
        self.route_end = math.inf
        self.agents: list[AgentSpec] = []
        self.rules: list[Rule] = []
        self.queues: dict[int, list[int]] = {}
        self.emergency: int | None = None
        self.meta: dict = {}
        self.n_vehicles = int(rng.integers(8, 36))
        self.n_pedestrians = int(rng.integers(4, 16))
        extra = set(self.f["acceleration_lanes"]) | set(self.f["deceleration_lanes"])
        self.extra_lanes = extra

    # -- random
    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def choice(self, seq, what: str = "candidate"):
        seq = list(seq)
        if not seq:
            raise NoPlace(f"no {what} in this town")
        return seq[int(self.rng.integers(len(seq)))]

    # -- lanes
    def is_driving(self, lane: int) -> bool:
        return lane >= 0 and int(self.m.lane_type[lane]) == int(LaneType.DRIVING)

    def road_lanes(self, min_len: float = 0.0, multi: bool | None = None, two_way: bool | None = None,
                   highway: bool = False, left_free: bool = False) -> list[int]:
        """Driving lanes outside junctions, filtered."""
        m, f = self.m, self.f
        hw = set(f["highway"])
        out = []
        for i in range(m.num_lanes):
            if not self.is_driving(i) or m.lane_junction[i] >= 0 or i in self.extra_lanes:
                continue
            if self.allowed is not None and i not in self.allowed:
                continue
            if float(m.lane_length[i]) < min_len:
                continue
            if highway != (i in hw):
                continue
            if i in set(f["on_ramps"]) | set(f["off_ramps"]):
                continue
            if two_way is not None and (m.lane_left_opposite[i] >= 0 and m.lane_left[i] < 0) != two_way:
                continue
            if multi is not None and ((m.lane_left[i] >= 0 or m.lane_right[i] >= 0) != multi):
                continue
            if left_free and not (self.is_driving(int(m.lane_left[i])) and int(m.lane_left[i]) not in self.extra_lanes):
                continue
            out.append(i)
        return out

    def preds(self, lane: int) -> list[int]:
        return [p for p in self.m.predecessors(lane) if self.is_driving(p)]

    def succs(self, lane: int) -> list[int]:
        return [p for p in self.m.successors(lane) if self.is_driving(p)]

    def back(self, lane: int, s: float, dist: float) -> tuple[list[int], float]:
        """Walk ``dist`` m backwards from ``(lane, s)``: the lanes before ``lane`` (earliest first) and the
        start arc length on the first one (on ``lane`` itself when ``s >= dist``). Never starts inside a
        junction; prefers straight connectors."""
        if s >= dist:
            return [], s - dist
        need = dist - s
        out: list[int] = []
        cur = lane
        for _ in range(12):
            ps = self.preds(cur)
            if not ps:
                raise NoPlace(f"no lane leads into lane {cur}")
            if self.allowed is not None:
                ps = [p for p in ps if p in self.allowed] or ps
            straight = [p for p in ps if self.m.lane_junction[p] < 0 or self.m.lane_turn[p] == STRAIGHT]
            p = self.choice(straight or ps)
            L = float(self.m.lane_length[p])
            out.insert(0, p)
            if L >= need and self.m.lane_junction[p] < 0:
                return out, L - need
            need -= L
            cur = p
            if need <= 0:  # a connector: start on its predecessor's end
                need = 1e-3
        raise NoPlace("backing up the route failed")

    def forward(self, lane: int, dist: float, turn: int | None = STRAIGHT) -> list[int]:
        """Lanes after ``lane`` covering ``dist`` m (junction connectors of ``turn`` preferred)."""
        out: list[int] = []
        cur = lane
        left = dist
        while left > 0:
            ss = self.succs(cur)
            if not ss:
                if out:
                    return out
                raise NoPlace(f"lane {cur} is a dead end")
            if self.allowed is not None:
                ss = [x for x in ss if x in self.allowed] or ss
            pref = [x for x in ss if self.m.lane_junction[x] < 0 or turn is None or self.m.lane_turn[x] == turn]
            nxt = self.choice(pref or ss)
            out.append(nxt)
            left -= float(self.m.lane_length[nxt])
            cur = nxt
            if len(out) > 12:
                break
        return out

    def set_route(self, before: list[int], core: list[int], ego_s: float, reach, turn_after: int | None = STRAIGHT,
                  median: float = 65.0) -> None:
        """Route lanes ``before + core + forward(...)``, the ego starting at ``ego_s`` on the first lane.

        ``reach``: route metres the route must cover (the scenario's event plus a margin), a float or
        ``(lane, s, extra)`` = progress of ``(lane, s)`` + ``extra``. The route ends at
        ``max(reach, target)`` with a random target length (log-normal, median ``median``, within
        [ROUTE_MIN, ROUTE_MAX]); the lane list covers it and :func:`start` cuts the dense route there.
        """
        self.route, self.ego_s = list(before) + list(core), float(ego_s)
        if isinstance(reach, tuple):
            lane, s_, extra = reach
            reach = self.progress_of(lane, s_) + extra
        reach = float(reach)
        if reach > ROUTE_MAX:
            raise NoPlace(f"the scenario needs a {reach:.0f} m route (> {ROUTE_MAX:.0f} m)")
        target = float(np.clip(self.rng.lognormal(math.log(median), 0.35), ROUTE_MIN + 5.0, ROUTE_MAX - 20.0))
        end = min(max(reach, target, ROUTE_MIN + 1.0), ROUTE_MAX)
        while self.lanes_length() < end:
            more = self.forward(self.route[-1], end - self.lanes_length(), turn_after)
            self.route += more
            if len(self.route) > 40:
                raise NoPlace("route does not grow")
        # drop lanes entirely beyond the end (never the core)
        keep = len(before) + len(core)
        while len(self.route) > keep and self.segments()[-1][3] >= end:
            self.route.pop()
        self.route_end = end

    def segments(self) -> list[tuple[int, float, float, float]]:
        """The route as (lane, s_from, s_to, route metres at s_from); see :func:`route_segments`."""
        return route_segments(self.m, self.route, self.ego_s)

    def lanes_length(self) -> float:
        """Length of the route's lanes from the ego start (as the world's dense route measures it)."""
        seg = self.segments()
        return seg[-1][3] + max(0.0, seg[-1][2] - seg[-1][1]) if seg else 0.0

    def route_length(self) -> float:
        return float(min(self.route_end, self.lanes_length()))

    def progress_of(self, lane: int, s: float) -> float:
        """Route metres (from the ego start) of arc length ``s`` on route lane ``lane``."""
        segs = [(a, b, cum) for ln, a, b, cum in self.segments() if ln == lane]
        if not segs:
            raise ValueError(f"lane {lane} is not on the route")
        for a, b, cum in segs:  # a lane visited twice (lane changes there and back): the piece holding s
            if a - 1e-6 <= s <= b + 1e-6:
                return cum + (s - a)
        a, b, cum = segs[0]
        return cum + (s - a)

    def on_route(self, progress: float) -> tuple[int, float]:
        """(lane, s) of the route point ``progress`` metres after the ego start."""
        for ln, a, b, cum in self.segments():
            if progress <= cum + (b - a):
                return ln, a + max(0.0, progress - cum)
        last = self.route[-1]
        return last, float(self.m.lane_length[last])

    # -- agents and rules
    def add(self, kind: AgentKind, lane: int = -1, s: float = 0.0, pos=None, yaw=None, speed: float = 0.0,
            mode: int = Mode.LANE, size=None, siren: bool = False, hold: bool = False, queue=None,
            **behaviour) -> int:
        """Add an explicit agent; returns its world index (ego = 0, first agent = 1)."""
        if lane >= 0 and pos is None:
            s = float(np.clip(s, 0.0, float(self.m.lane_length[lane])))
        self.agents.append(AgentSpec(kind=kind, lane=lane, s=float(s), pos=None if pos is None else tuple(pos),
                                     yaw=yaw, speed=float(speed), mode=mode, size=size, siren=siren, hold=hold,
                                     behaviour=dict(behaviour)))
        idx = len(self.agents)
        if queue:
            self.queues[idx] = [int(x) for x in queue]
        return idx

    def add_static(self, what: str, lane: int, s: float, lateral: float = 0.0, yaw_offset: float = 0.0) -> int:
        pos, h = offset_pose(self.m, lane, s, lateral)
        return self.add(AgentKind.STATIC, pos=pos, yaw=h + yaw_offset, mode=Mode.STATIC, size=STATIC_SIZES[what])

    def rule(self, agent: int, trigger: Trigger, action: Action, name: str = "") -> int:
        """Add a rule; returns its index (for :meth:`Trigger.after`)."""
        self.rules.append(Rule(agent, trigger, action, name))
        return len(self.rules) - 1

    def lane_path_back(self, lane: int, s: float, dist: float) -> tuple[int, float, list[int]]:
        """A lane-bound spot ``dist`` m upstream of ``(lane, s)`` and the lanes from there to ``lane``
        (its pinned queue)."""
        before, s0 = self.back(lane, s, dist)
        if not before:
            return lane, s0, []
        return before[0], s0, before[1:] + [lane]

    # -- junction helpers
    def junctions(self, kinds=None, arms=None, where=None) -> list[dict]:
        """Junction feature dicts of the given kinds / arm counts, optionally filtered by ``where(j)``."""
        out = []
        for j in self.f["junctions"]:
            if self.allowed is not None and not any(j["connectors"].values()):
                continue
            if where is not None and not where(j):
                continue
            if kinds is not None and j["kind"] not in [int(k) for k in kinds]:
                continue
            if arms is not None and j["arms"] not in arms:
                continue
            out.append(j)
        return out

    def connector(self, junction: dict, turn: int, need_stop: bool | None = None) -> tuple[int, int, int]:
        """A random connector of ``turn`` in ``junction``: (incoming lane, connector, outgoing lane)."""
        name = {STRAIGHT: "straight", LEFT: "left", RIGHT: "right"}[turn]
        cands = []
        for c in junction["connectors"][name]:
            inc = [p for p in self.m.predecessors(c)]
            out = self.m.successors(c)
            if not inc or not out:
                continue
            if need_stop is not None and (self.m.lane_stop[inc[0]] >= 0) != need_stop:
                continue
            cands.append((inc[0], c, out[0]))
        return self.choice(cands, f"{name} connector in junction {junction['id']}")

    def through_junction(self, kinds, turn: int, arms=None, need_stop: bool | None = None,
                         before=(25.0, 70.0), after=(15.0, 35.0), where=None) -> dict:
        """Route the ego through a junction of one of ``kinds`` with ``turn``. Returns placement info."""
        js = self.junctions(kinds, arms, where)
        j = self.choice(js, f"junction of kind {[JunctionKind(k).name for k in kinds]}")
        inc, conn, out = self.connector(j, turn, need_stop)
        d_before = self.u(*before)
        L_in = float(self.m.lane_length[inc])
        pre, s0 = self.back(inc, L_in, d_before)
        self.set_route(pre, [inc, conn, out], s0, reach=(out, 0.0, self.u(*after)))
        info = dict(junction=j["id"], incoming=inc, connector=conn, outgoing=out,
                    center=tuple(j["center"]), stop_progress=self.progress_of(inc, L_in))
        self.meta.update(info)
        return info

    def conflicting(self, conn: int, turns=(STRAIGHT,), same_entry: bool = False) -> list[tuple[int, int, int]]:
        """Connectors crossing / merging with ``conn`` from other arms: (incoming, connector, outgoing)."""
        m = self.m
        my_in = m.predecessors(conn)
        out = []
        for c in m.lane_conflict[conn]:
            c = int(c)
            if c < 0 or int(m.lane_turn[c]) not in turns:
                continue
            inc = m.predecessors(c)
            if not inc or (not same_entry and inc[0] in my_in):
                continue
            if set(m.predecessors(inc[0])) & set(my_in):
                continue
            succ = m.successors(c)
            if succ:
                out.append((inc[0], c, succ[0]))
        return out

    # -- where the scenario sits on the route
    def _polyline(self) -> tuple[np.ndarray, np.ndarray]:
        from craft.world.world import _route_polyline

        pts = _route_polyline(self.m, self.route, self.ego_s).astype(np.float64)
        cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        keep = cum <= self.route_length() + 1e-6
        return pts[keep], cum[keep]

    def _agent_xy(self, a: AgentSpec) -> np.ndarray:
        if a.pos is not None:
            return np.asarray(a.pos, dtype=np.float64)
        return lane_pose(self.m, a.lane, a.s)[0]

    def span(self) -> dict:
        """Where the scenario sits on the route, in route metres from the ego start: ``trigger_m`` (the first
        point where one of its rules can fire: a progress trigger's metres, the first route point within a
        proximity trigger's distance of its agent / point, 0 for a timed rule; the interaction point when
        it has no rule), ``interaction_m`` (the event: the builder's ``event_progress`` / junction entry /
        brake / first slip point, else the first route point within 6 m of one of its agents) and
        ``end_m`` (``SCENARIO_END_MARGIN`` after the interaction, or after the junction exit)."""
        from craft.scenarios.script import (A_VALID, T_ARRIVAL, T_NEAR_AGENT, T_NEAR_POINT, T_PROGRESS, T_TIME, T_TTC,
                                            trigger_point)

        pts, cum = self._polyline()
        length = self.route_length()

        def reach(xy, d: float) -> float | None:
            inside = np.nonzero(np.linalg.norm(pts - np.asarray(xy)[None], axis=1) < d)[0]
            return float(cum[inside[0]]) if len(inside) else None

        xy = {i + 1: self._agent_xy(a) for i, a in enumerate(self.agents)}
        meta = self.meta
        inter = None
        for key in ("event_progress", "stop_progress", "brake_progress", "first_slip_progress"):
            if meta.get(key) is not None:
                inter = float(meta[key])
                break
        if inter is None:
            near = [reach(p, 6.0) for p in xy.values()]
            near = [v for v in near if v is not None]
            inter = min(near) if near else 0.0
        fire = []
        for r in self.rules:
            t, p = r.trigger, r.trigger.params
            if t.kind == T_PROGRESS:
                fire.append(float(p[0]))
            elif t.kind == T_TIME and not (r.action.kind == A_VALID and r.action.params[0] == 0.0):
                fire.append(0.0)
            elif t.kind in (T_NEAR_AGENT, T_TTC) and t.agent in xy:
                v = reach(xy[t.agent], float(p[0]) if t.kind == T_NEAR_AGENT else float(p[1]))
                if v is not None:
                    fire.append(v)
            elif t.kind in (T_NEAR_POINT, T_ARRIVAL):  # arrival: where an ego at ARRIVAL_REF_SPEED fires it
                x, y, d = trigger_point(t, ARRIVAL_REF_SPEED)
                v = reach((x, y), d)
                if v is not None:
                    fire.append(v)
        trig = min(fire) if fire else inter
        trig = min(trig, inter)
        end = inter + SCENARIO_END_MARGIN
        if meta.get("outgoing") is not None:
            try:
                end = self.progress_of(int(meta["outgoing"]), 0.0) + SCENARIO_END_MARGIN
            except ValueError:
                pass
        return {"trigger_m": round(max(0.0, trig), 2), "interaction_m": round(max(0.0, min(inter, length)), 2),
                "end_m": round(min(max(end, inter), length), 2)}

    def finish(self, ability: str) -> ScenarioInstance:
        if not self.route:
            raise NoPlace("builder set no route")
        spec = WorldSpec(map_index=self.map_index, route=list(self.route), ego_s=self.ego_s, ego_speed=0.0,
                         n_vehicles=self.n_vehicles, n_pedestrians=self.n_pedestrians, agents=list(self.agents))
        fj = None
        for r, _, _, cum in self.segments():
            if cum >= self.route_length():
                break
            if self.m.lane_junction[r] >= 0:
                fj = max(0.0, cum)
                break
        if not ROUTE_MIN <= self.route_length() <= ROUTE_MAX:
            raise NoPlace(f"route length {self.route_length():.0f} m outside [{ROUTE_MIN:.0f}, {ROUTE_MAX:.0f}]")
        abil = (ability,) + (("Traffic_Signs",) if self.type in TRAFFIC_SIGN_EXTRA and ability != "Traffic_Signs"
                             else ())
        return ScenarioInstance(type=self.type, ability=ability, spec=spec, rules=list(self.rules),
                                town_seed=town_seed_of(self.m), route_length=self.route_length(),
                                first_junction_progress_m=fj, emergency_index=self.emergency,
                                queues=dict(self.queues), abilities=abil,
                                meta={**self.meta, "span": self.span()}, route_end_m=self.route_length())


def start(world, instances: list[ScenarioInstance], seed: int, per_route_seed: bool = False):
    """Reset ``world`` with the instances' specs, pin the scripted agents' queues and pack the scripts.

    ``per_route_seed``: seed every world from its route's own identity and ``seed``
    (:func:`craft.scenarios.seeding.instance_seed`; the instances must come from a split), so a route's
    drive does not depend on the other routes of the batch. Otherwise world ``b`` draws from ``(seed, b)``.

    Returns ``(state, table)``; then per step: ``state, table = script.apply(state, table, maps=world.maps)``
    before ``world.step`` (adding ``table.ego_perturbation`` to the ego control).
    """
    from craft.scenarios.script import pack, set_queues

    row_seeds = None
    if per_route_seed:
        from craft.scenarios.seeding import instance_seed

        row_seeds = [instance_seed(inst, seed) for inst in instances]
    state = world.reset([inst.spec for inst in instances], seed, row_seeds=row_seeds)
    state = set_queues(state, [inst.queues for inst in instances])
    ends = [inst.route_end_m if inst.route_end_m is not None else math.inf for inst in instances]
    state = cut_routes(state, torch.tensor(ends, dtype=torch.float32, device=state.device))
    return state, pack([inst.rules for inst in instances], device=state.device)


ACTIVATION_M = 8.0
"""Route metres after which a scenario counts as started (Bench2Drive's routes reach their trigger point a
median 8 m after the start); a scenario whose interaction is closer starts there."""


@dataclass
class ScenarioWindows:
    """Per-world route-metre windows of Bench2Drive's two scenario switches (:func:`scenario_windows`).
    All (B, M) float route metres, M = most scenarios of a world (long routes chain several); an empty
    window has ``end <= start``."""

    start_m: torch.Tensor  # the scenario starts once the ego's route progress reaches this
    wrong_dir_end_m: torch.Tensor  # the wrong-direction test is off until the progress reaches this
    blocked_end_m: torch.Tensor  # the blocked test is suspended until the progress reaches this

    def index(self, keep: torch.Tensor) -> "ScenarioWindows":
        return ScenarioWindows(self.start_m[keep], self.wrong_dir_end_m[keep], self.blocked_end_m[keep])


def _window(scenario_type: str, span: dict, offset: float = 0.0) -> tuple[float, float, float]:
    start = offset + min(ACTIVATION_M, float(span["interaction_m"]))
    end = offset + float(span["end_m"])
    wrong = (math.inf if scenario_type == "HazardAtSideLaneTwoWays" else end) if scenario_type in TWO_WAYS_TYPES \
        else 0.0
    return start, wrong, end if scenario_type in TIMEOUT_TYPES else 0.0


def scenario_windows(instances: list[ScenarioInstance], device="cpu") -> ScenarioWindows:
    """From ``min(ACTIVATION_M, interaction_m)`` until the ego passed the scenario's ``end_m``
    (``meta["span"]``, see :meth:`Ctx.span`): the wrong-direction test is off for :data:`TWO_WAYS_TYPES`
    (HazardAtSideLaneTwoWays: until the route ends; Bench2Drive never switches it back on) and the blocked
    test is suspended for :data:`TIMEOUT_TYPES` (Bench2Drive's 240 s scenario timeout never expires within
    its 200 s tick cap, so no scenario-timeout penalty follows). A long route gets one window per chained
    scenario (``meta["chain"]``, shifted by its ``start_m``); instances without spans get none."""
    rows = []
    for inst in instances:
        if inst.meta.get("span") is not None:
            rows.append([_window(inst.type, inst.meta["span"])])
        else:
            rows.append([_window(c["type"], c["span"], float(c["start_m"])) for c in inst.meta.get("chain", [])
                         if c.get("span") is not None])
    M = max(1, max(len(r) for r in rows))
    t = torch.zeros(len(rows), M, 3, dtype=torch.float32)
    for b, r in enumerate(rows):
        if r:
            t[b, : len(r)] = torch.tensor(r, dtype=torch.float32)
    t = t.to(device)
    return ScenarioWindows(t[..., 0], t[..., 1], t[..., 2])


def apply_windows(state, win: ScenarioWindows):
    """``state`` with ``wrong_dir_exempt`` / ``blocked_exempt`` set from the ego's route progress (call once
    per step before ``world.step``): inside any of the world's windows."""
    p = state.progress[:, None]
    started = p >= win.start_m
    return state.replace(wrong_dir_exempt=(started & (p < win.wrong_dir_end_m)).any(-1),
                         blocked_exempt=(started & (p < win.blocked_end_m)).any(-1))


def cut_routes(state, end_m: torch.Tensor):
    """End every world's dense route ``end_m (B,)`` metres after its start (inf: keep): the points beyond
    become invalid copies of the cut point, ``route_length`` becomes the cut length. (The world's
    ``WorldSpec`` routes are whole lanes; this gives Bench2Drive-like short routes.)"""
    cum, pts, valid = state.route_cum, state.route_pts, state.route_valid
    end = torch.minimum(end_m, state.route_length)
    P = cum.shape[1]
    j = torch.searchsorted(cum.contiguous(), end[:, None].contiguous()).clamp(1, P - 1)  # first index >= end
    c0, c1 = cum.gather(1, j - 1), cum.gather(1, j)
    w = ((end[:, None] - c0) / (c1 - c0).clamp_min(1e-6)).clamp(0, 1)
    p0 = pts.gather(1, (j - 1)[..., None].expand(-1, 1, 2))
    p1 = pts.gather(1, j[..., None].expand(-1, 1, 2))
    cut_pt = p0 + w[..., None] * (p1 - p0)  # (B, 1, 2)
    ar = torch.arange(P, device=cum.device)[None]
    beyond = ar >= j
    at = ar == j
    new_pts = torch.where(beyond[..., None], cut_pt.expand_as(pts), pts)
    new_cum = torch.where(beyond, end[:, None].expand_as(cum), cum)
    new_valid = valid & (~beyond | at)
    return state.replace(route_pts=new_pts, route_cum=new_cum, route_valid=new_valid, route_length=end)


def vehicle_size(kind: AgentKind) -> tuple[float, float]:
    L, W, _ = DEFAULT_SIZE[kind]
    return L, W


__all__ = ["ScenarioInstance", "SCENARIOS", "build_scenario", "register", "implemented_types", "Ctx", "NoPlace",
           "ABILITIES", "lane_pose", "offset_pose", "start", "route_segments"]
