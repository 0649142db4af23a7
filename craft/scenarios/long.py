"""Long routes (the ``long`` split, Longest6-like): 500-1500 m drives chaining several scenarios.

:func:`build_long_route` chains scenario instances of different types (built by their own builders with
:func:`~craft.scenarios.base.build_scenario`) end to end through the lane graph of one town:

1. a target length (uniform in ``[min_length + 100, max_length - 100]`` m) and a target number of scenarios
   (``min_scenarios`` .. ``max_scenarios``) are drawn; the candidate types are shuffled;
2. the first scenario is placed anywhere the town allows (except a start less than ``start_clear`` m before
   a junction: the builders may start the ego right at a stop line); the ego starts at its start, so it runs
   exactly as it does on its own;
3. each further scenario is built (up to ``build_tries`` placements per type) and joined to the end of the
   chain by the shortest lane path (successors only, at most ``max_link`` m) from the last lane of the
   chain to the first lane of its route. A placement is kept only if the joined route visits no lane twice,
   stays within ``max_length``, its route does not begin with a lane change (the world's dense route would
   move that lane change: the scenario was built for an ego starting there), no proximity trigger of it
   could fire before its agents appear, and none of its agents appears within ``reveal_clear`` m of the ego;
   types whose placements never fit are skipped (deterministically, by the draw order);
4. below ``min_length`` after the last scenario the route drives on through the lane graph.

Background traffic: 16-35 vehicles and 6-15 pedestrians (the world spawns most of them within 250 m of the
ego start; with 30-60 vehicles the first few hundred metres gridlocked junctions in 3 of 36 routes).

Scripts of a chained scenario ``k`` (starting ``P_k`` route metres after the ego start) are shifted onto the
long route: agent indices by the agents before it, chained-rule indices by the rules before it, progress
triggers by ``P_k``; a time trigger ``t > 0`` becomes "``t`` s after the ego passes ``P_k``" (a gate rule
with no action); ``t = 0`` set-up rules stay. Its agents are hidden (``valid`` False, so nothing sees them
and they do not move) until the ego is ``reveal`` m before ``P_k``, which keeps held cars from queueing
background traffic for minutes; every scenario's agents are removed and its forced lights go back to their
cycle ``cleanup`` m after its end (CARLA's scenario runner also removes a finished scenario's actors).

Not chained: ``YieldToEmergencyVehicle`` (pass / fail is judged at the end of the route, which on a long
route is no longer the end of the scenario). ``ParkingExit``, ``SequentialLaneChange`` and ``HighwayExit``
begin with a lane change, so they can only open a long route.

The instance has ``type == LONG_TYPE`` ("Long"): Bench2Drive's abilities (success per scenario type) are
not defined for it, so the metrics give long routes no ability. ``meta["types"]`` lists the chained types in
route order, ``meta["chain"]`` per chained scenario its ``type``, ``ability``, ``start_m`` / ``end_m`` (route
metres), ``link_m`` (metres driven from the previous scenario's end), ``rules`` / ``agents`` (``[first, end)``
indices of its own rules in ``rules`` and of its agents in the world). Its ``time_limit_s`` (the runner's per-route tick cap)
grows with its length: ``time_base + length / time_speed``.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from craft.errors import CraftError
from craft.scenarios.base import ScenarioInstance, build_scenario, lane_pose, route_segments, town_seed_of
from craft.scenarios.script import (A_LIGHT, A_NONE, A_VALID, T_AFTER, T_NEAR_AGENT, T_PROGRESS, T_TIME, T_TTC,
                                    Action, Rule, Trigger, trigger_point)
from craft.world.map import LaneType, RoadMap
from craft.world.world import WorldSpec

LONG_TYPE = "Long"
NOT_CHAINED = ("YieldToEmergencyVehicle",)


@dataclass(frozen=True)
class LongRouteConfig:
    """How long routes are built."""

    min_length: float = 500.0  # shortest long route, m
    max_length: float = 1500.0  # longest long route, m
    min_scenarios: int = 3  # fewer chained scenarios than this: the placement fails (the split retries)
    max_scenarios: int = 6  # most chained scenarios
    max_link: float = 350.0  # longest lane path joining two scenarios, m
    build_tries: int = 4  # placements tried per scenario type
    build_attempts: int = 12  # build_scenario attempts per placement
    reveal: float = 40.0  # a chained scenario's agents appear this many route metres before its start, m
    reveal_clear: float = 20.0  # no agent may appear closer than this to the ego, m
    trigger_margin: float = 5.0  # proximity triggers must be out of reach (d + this) before the reveal, m
    arrival_speed: float = 15.0  # time-to-arrival triggers are out of reach for an ego this fast, m/s
    cleanup: float = 30.0  # a scenario's agents disappear this many route metres after its end, m
    vehicles: tuple[int, int] = (16, 36)  # background vehicles, [lo, hi) (the world spawns most near the start)
    pedestrians: tuple[int, int] = (6, 16)  # background pedestrians, [lo, hi)
    start_clear: float = 12.0  # the route may not start closer than this before a junction, m
    time_base: float = 100.0  # tick cap of a long route: this many seconds ...
    time_speed: float = 3.0  # ... plus its length over this speed, m/s

    def __post_init__(self):
        if not 0 < self.min_length < self.max_length:
            raise CraftError(f"LongRouteConfig: need 0 < min_length < max_length, got {self.min_length}, "
                             f"{self.max_length}")
        if not 1 <= self.min_scenarios <= self.max_scenarios:
            raise CraftError(f"LongRouteConfig: need 1 <= min_scenarios <= max_scenarios, got {self.min_scenarios}, "
                             f"{self.max_scenarios}")
        for name in ("max_link", "time_speed", "time_base"):
            if not getattr(self, name) > 0:
                raise CraftError(f"LongRouteConfig.{name} must be positive, got {getattr(self, name)}")


# ---------------------------------------------------------------------- lane-graph helpers
def _driving(m: RoadMap, lane: int) -> bool:
    return lane >= 0 and int(m.lane_type[lane]) == int(LaneType.DRIVING)


def link_path(m: RoadMap, src: int, dst: int, forbidden: set[int], max_len: float) -> list[int] | None:
    """Shortest lane path strictly between ``src`` and ``dst`` (``dst`` a successor of its last lane, or of
    ``src`` for an empty path), over driving lanes not in ``forbidden``, of at most ``max_len`` m of
    intermediate lanes; None if there is none."""
    if dst in m.successors(src):
        return []
    best = {src: 0.0}
    prev: dict[int, int] = {}
    heap = [(0.0, src)]
    while heap:
        d, u = heapq.heappop(heap)
        if d > best.get(u, math.inf):
            continue
        for v in m.successors(u):
            v = int(v)
            if v == dst:
                if u == src:
                    return []
                path = [u]
                while path[-1] in prev and prev[path[-1]] != src:
                    path.append(prev[path[-1]])
                return path[::-1]
            if v in forbidden or v == src or not _driving(m, v):
                continue
            nd = d + float(m.lane_length[v])
            if nd <= max_len and nd < best.get(v, math.inf):
                best[v] = nd
                prev[v] = u
                heapq.heappush(heap, (nd, v))
    return None


def route_points(m: RoadMap, route: list[int], ego_s: float, upto: float = math.inf) -> tuple[np.ndarray, np.ndarray]:
    """Route polyline points ``(P, 2)`` (the lanes' ~1 m points) and their route metres ``(P,)`` up to ``upto``."""
    pts, prog = [], []
    for lane, a, b, cum in route_segments(m, route, ego_s):
        if cum > upto:
            break
        p = m.lane_points(lane)
        s = np.linspace(0.0, float(m.lane_length[lane]), len(p))
        keep = (s >= a - 1e-6) & (s <= b + 1e-6)
        pts.append(p[keep])
        prog.append(cum + s[keep] - a)
    if not pts:
        return np.zeros((0, 2)), np.zeros(0)
    P, G = np.concatenate(pts), np.concatenate(prog)
    k = G <= upto
    return P[k], G[k]


def _agent_xy(m: RoadMap, a) -> np.ndarray:
    if a.pos is not None:
        return np.asarray(a.pos, dtype=np.float64)
    return lane_pose(m, a.lane, a.s)[0]


# ---------------------------------------------------------------------- chaining scripts
def shift_rules(rules: list[Rule], agent_off: int, rule_off: int, start_m: float, gate: int | None) -> list[Rule]:
    """One scenario's rules moved onto a long route: agents (not the ego, not light indices) + ``agent_off``,
    chained rule indices + ``rule_off``, progress triggers + ``start_m``, time triggers ``t > 0`` chained to
    rule ``gate`` (which fires when the ego passes ``start_m``; None keeps them as they are)."""
    out = []
    for r in rules:
        t, act = r.trigger, r.action
        agent = r.agent if act.kind == A_LIGHT or r.agent <= 0 else r.agent + agent_off
        if t.kind in (T_NEAR_AGENT, T_TTC) and t.agent > 0:
            t = Trigger(t.kind, t.agent + agent_off, t.params)
        elif t.kind == T_AFTER:
            t = Trigger(T_AFTER, t.agent + rule_off, t.params)
        elif t.kind == T_PROGRESS:
            t = Trigger.progress(float(t.params[0]) + start_m)
        elif t.kind == T_TIME and gate is not None and float(t.params[0]) > 0:
            t = Trigger.after(gate, float(t.params[0]))
        out.append(Rule(agent, t, act, r.name))
    return out


@dataclass
class _Piece:
    inst: ScenarioInstance
    start_m: float  # route metres of its start on the long route
    link_m: float  # metres of lanes driven between the previous scenario's end and this start


def _chain_route(pieces: list[ScenarioInstance], links: list[list[int]]) -> list[int]:
    route = list(pieces[0].spec.route)
    for inst, link in zip(pieces[1:], links):
        route += list(link) + list(inst.spec.route)
    return route


def _try_append(m: RoadMap, cfg: LongRouteConfig, route: list[int], ego_s: float, end_m: float,
                inst: ScenarioInstance) -> tuple[list[int], float, str | None]:
    """Join ``inst`` to a chain (``route`` from ``ego_s``, ending ``end_m`` route metres after the start).
    Returns (link lanes, start metres of ``inst``, None) or (.., .., why not)."""
    r = inst.spec.route
    if len(r) > 1 and r[1] not in m.successors(r[0]):
        return [], 0.0, "its route begins with a lane change"
    used = set(route)
    if used & set(r):
        return [], 0.0, "it revisits lanes of the route"
    link = link_path(m, route[-1], r[0], used | set(r), cfg.max_link)
    if link is None:
        return [], 0.0, f"no lane path of <= {cfg.max_link:.0f} m to it"
    full = route + link + list(r)
    segs = route_segments(m, full, ego_s)
    start = segs[len(route) + len(link)][3] + inst.spec.ego_s
    if start + inst.route_length > cfg.max_length:
        return [], 0.0, "the route would be too long"
    if start - end_m > cfg.max_link + 60.0:
        return [], 0.0, "too far from the end of the route"
    reveal_at = max(0.0, start - cfg.reveal)
    pts, _ = route_points(m, full, ego_s, upto=reveal_at)
    if len(pts):
        for rule in inst.rules:  # proximity triggers must not be reachable before the agents appear
            point = trigger_point(rule.trigger, cfg.arrival_speed)  # a fast ego fires an arrival trigger far out
            if point is not None:
                x, y, d = point
                if np.min(np.hypot(pts[:, 0] - x, pts[:, 1] - y)) <= d + cfg.trigger_margin:
                    return [], 0.0, "a trigger point lies next to the earlier route"
        ego_at = pts[-1]
        for a in inst.spec.agents:
            if np.hypot(*(_agent_xy(m, a) - ego_at)) < cfg.reveal_clear:
                return [], 0.0, "an agent would appear next to the ego"
    return link, start, None


def _merge(m: RoadMap, cfg: LongRouteConfig, pieces: list[_Piece], route: list[int], ego_s: float,
           end_m: float, map_index: int, rng: np.random.Generator, hide_first: bool = False,
           traffic: tuple[int, int] | None = None) -> ScenarioInstance:
    """The long route's instance from its placed scenarios. ``hide_first``: the first scenario's agents are
    hidden until the ego comes near too (a route that does not start at its first scenario); ``traffic``:
    (vehicles, pedestrians) instead of a draw from ``cfg``."""
    agents, rules, queues = [], [], {}
    spans = []  # (first, end) indices of each scenario's own rules and agents on the long route
    for k, pc in enumerate(pieces):
        inst = pc.inst
        a_off, n_a = len(agents), len(inst.spec.agents)
        gate = None
        if k > 0 or hide_first:
            gate = len(rules)
            rules.append(Rule(-1, Trigger.progress(pc.start_m), Action(A_NONE), f"{inst.type}: ego arrives"))
        spans.append(([len(rules), len(rules) + len(inst.rules)], [a_off + 1, a_off + 1 + n_a]))
        rules += shift_rules(inst.rules, a_off, len(rules), pc.start_m, gate)
        # agents the scenario itself keeps hidden from the start (a door, a flow's pooled vehicles) stay its own
        own_valid = {r.agent + a_off for r in inst.rules if r.action.kind == A_VALID and r.action.params[0] == 0.0
                     and r.trigger.kind == T_TIME and float(r.trigger.params[0]) == 0.0}
        mine = [a_off + 1 + i for i in range(n_a)]
        if k > 0 or hide_first:  # hidden until the ego comes near
            for a in mine:
                if a not in own_valid:
                    rules.append(Rule(a, Trigger.time(0.0), Action.valid(False), f"{inst.type}: hidden"))
                    rules.append(Rule(a, Trigger.progress(max(0.0, pc.start_m - cfg.reveal)), Action.valid(True),
                                      f"{inst.type}: appears"))
        if k < len(pieces) - 1:  # removed after the scenario, its lights back to their cycle
            gone = pc.start_m + inst.route_length + cfg.cleanup
            for a in mine:
                rules.append(Rule(a, Trigger.progress(gone), Action.valid(False), f"{inst.type}: removed"))
            for li in sorted({r.agent for r in inst.rules if r.action.kind == A_LIGHT}):
                rules.append(Rule(li, Trigger.progress(gone), Action.light(-1), f"{inst.type}: light released"))
        agents += list(inst.spec.agents)
        queues.update({a + a_off: list(q) for a, q in inst.queues.items()})
    first_junction = None
    for lane, a, b, cum in route_segments(m, route, ego_s):
        if cum >= end_m:
            break
        if m.lane_junction[lane] >= 0:
            first_junction = max(0.0, cum)
            break
    n_veh = int(rng.integers(*cfg.vehicles))
    n_ped = int(rng.integers(*cfg.pedestrians))
    if traffic is not None:
        n_veh, n_ped = int(traffic[0]), int(traffic[1])
    spec = WorldSpec(map_index=map_index, route=list(route), ego_s=float(ego_s), ego_speed=0.0, n_vehicles=n_veh,
                     n_pedestrians=n_ped, agents=agents)
    chain = [dict(type=pc.inst.type, ability=pc.inst.ability, start_m=round(pc.start_m, 2),
                  end_m=round(pc.start_m + pc.inst.route_length, 2), link_m=round(pc.link_m, 2), rules=r, agents=a,
                  span=pc.inst.meta.get("span"))
             for pc, (r, a) in zip(pieces, spans)]
    return ScenarioInstance(type=LONG_TYPE, ability=LONG_TYPE, spec=spec, rules=rules, town_seed=town_seed_of(m),
                            route_length=float(end_m), first_junction_progress_m=first_junction,
                            emergency_index=None, route_end_m=float(end_m), queues=queues, abilities=(),
                            meta=dict(types=[pc.inst.type for pc in pieces], chain=chain),
                            time_limit_s=cfg.time_base + float(end_m) / cfg.time_speed)


def build_long_route(town: RoadMap, rng: np.random.Generator, types: list[str], map_index: int = 0,
                     cfg: LongRouteConfig = LongRouteConfig()) -> ScenarioInstance:
    """One long route on ``town`` chaining scenarios of ``types`` (see the module docstring).

    Raises :class:`CraftError` (one line, saying why) when this draw cannot make a long route of
    ``cfg.min_length``-``cfg.max_length`` m with at least ``cfg.min_scenarios`` scenarios.
    """
    m = town
    cands = [t for t in types if t not in NOT_CHAINED]
    if not cands:
        raise CraftError(f"no chainable scenario types among {types} (not chained: {list(NOT_CHAINED)})")
    target_len = float(rng.uniform(cfg.min_length + 100.0, cfg.max_length - 100.0))
    target_n = int(rng.integers(cfg.min_scenarios, cfg.max_scenarios + 1))
    order = [cands[i] for i in rng.permutation(len(cands))]
    pieces: list[_Piece] = []
    route: list[int] = []
    ego_s, end_m = 0.0, 0.0
    why: dict[str, str] = {}
    for t in order:
        if len(pieces) >= target_n or (end_m >= target_len and len(pieces) >= cfg.min_scenarios):
            break
        for _ in range(cfg.build_tries):
            try:
                inst = build_scenario(t, m, rng, map_index=map_index, attempts=cfg.build_attempts)
            except CraftError as e:
                why[t] = str(e)
                break
            if not pieces:
                r0 = inst.spec.route[0]
                nxt = inst.spec.route[1] if len(inst.spec.route) > 1 else -1
                if (nxt >= 0 and m.lane_junction[nxt] >= 0
                        and float(m.lane_length[r0]) - inst.spec.ego_s < cfg.start_clear):
                    why[t] = "it starts right at a junction's stop line"  # from standstill onto a red light
                    continue
                route, ego_s = list(inst.spec.route), float(inst.spec.ego_s)
                pieces.append(_Piece(inst, 0.0, 0.0))
                end_m = inst.route_length
                break
            link, start, bad = _try_append(m, cfg, route, ego_s, end_m, inst)
            if bad is None:
                pieces.append(_Piece(inst, start, start - end_m))
                route = route + link + list(inst.spec.route)
                end_m = start + inst.route_length
                break
            why[t] = bad
    if len(pieces) < cfg.min_scenarios:
        reasons = "; ".join(f"{t}: {w}" for t, w in list(why.items())[:3])
        raise CraftError(f"town '{m.name}' fits only {len(pieces)} chained scenarios (need "
                         f"{cfg.min_scenarios}) on a route of <= {cfg.max_length:.0f} m ({reasons})")
    if end_m < cfg.min_length:  # drive on through the lane graph
        goal = float(rng.uniform(cfg.min_length, cfg.min_length + 100.0))
        segs = route_segments(m, route, ego_s)
        have = segs[-1][3] + segs[-1][2] - segs[-1][1]
        used = set(route)
        while have < goal:
            nxt = [int(x) for x in m.successors(route[-1]) if _driving(m, int(x)) and int(x) not in used]
            straight = [x for x in nxt if m.lane_junction[x] < 0 or int(m.lane_turn[x]) == 0]
            if not nxt:
                raise CraftError(f"town '{m.name}': the long route ends at a dead end after {have:.0f} m "
                                 f"(< {cfg.min_length:.0f} m)")
            pick = straight or nxt
            lane = pick[int(rng.integers(len(pick)))]
            route.append(lane)
            used.add(lane)
            have += float(m.lane_length[lane])
        end_m = goal
    else:  # drop lanes entirely beyond the end
        while len(route) > 1 and route_segments(m, route, ego_s)[-1][3] >= end_m:
            route.pop()
    return _merge(m, cfg, pieces, route, ego_s, end_m, map_index, rng)


__all__ = ["LONG_TYPE", "NOT_CHAINED", "LongRouteConfig", "build_long_route", "link_path", "route_points",
           "shift_rules"]
