"""Routes from files: the leaderboard's route files on real towns (a second route source beside the splits).

Two formats are read (:func:`read_route_file`):

- **leaderboard-1.0** (Longest6, the leaderboard-1.0 training / testing / devtest routes): ``<route id town>``
  with sparse ``<waypoint x y z yaw .../>``; a route planner fills the lanes between them;
- **leaderboard-2.0 / Bench2Drive**: ``<route id town>`` with dense ``<waypoints><position x y z/>`` and
  ``<scenarios><scenario name type><trigger_point x y z yaw/> ...``.

Positions are in CARLA's frame; they go through :func:`craft.world.opendrive.carla_to_world` (the importer's
one y flip). Each route's town is ``<maps>/<town>.xodr`` (imported by :func:`craft.world.opendrive.load_opendrive`).

**Route planning** (:func:`plan_route_lanes`, our own planner over the imported lane graph): every route
point is matched to the driving lane nearest to it whose direction agrees with the route's (the matching cost
is the distance plus ``heading_weight`` (1 - cos of the heading difference) m; lanes whose direction differs
by more than 90 degrees are not candidates); points matched to junction connectors between the first and the
last are dropped (the planner picks the connector). Between consecutive points the planner runs Dijkstra over
lanes: a successor costs the length of the lane left, a change to a same-direction neighbour (only where the
markings permit it) costs ``lane_change_cost`` m. The ego starts at the first point, the route ends at the
last point's arc length.

**Scenarios.** A Bench2Drive route's scenarios are placed by our library's builders (the same type names) at
the file's trigger point: the builder may only use route lanes from ``before_trigger`` m before the trigger
to ``after_trigger`` m after it (:func:`craft.scenarios.base.build_scenario` with ``allowed``). Routes without
scenario definitions (Longest6, leaderboard-1.0) get library scenarios wherever the route's geometry allows:
walking along the route, the types are tried in a seeded order and each placed one moves the cursor past
its end plus ``gap`` m. Placed scenarios are chained onto the route like the ``long`` split's
(:mod:`craft.scenarios.long`: agents hidden until the ego comes near, removed after the scenario). Types a
real town cannot host (parking lanes, ramps) are left out; a route where no type fits drives with background
traffic only.

**Background traffic** is dense, like the leaderboard's (which spawns a vehicle at every spawn point the town
allows): ``vehicles_per_km`` vehicles per km of the town's driving lanes (within ``vehicles``), and
``pedestrians_per_km`` per km of sidewalk (within ``pedestrians``). Lights cycle per junction (see the
importer).

**Refusals.** A route whose town has no map file, or with a point further than ``max_point_dist`` m from
every lane of the right direction, or whose points the lane graph cannot connect, is refused with one line
naming the route (:func:`load_route_file` returns those lines; ``strict`` raises the first).
"""

from __future__ import annotations

import heapq
import math
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from craft.errors import CraftError
from craft.scenarios.base import NoPlace, build_scenario, implemented_types, route_segments
from craft.scenarios.long import NOT_CHAINED, LongRouteConfig, _merge, _Piece, route_points
from craft.world.map import LaneType, RoadMap
from craft.world.opendrive import carla_to_world, carla_yaw_to_world, load_opendrive

__all__ = ["FileRoute", "RouteFileConfig", "read_route_file", "match_points", "plan_route_lanes",
           "build_file_route", "load_route_file", "training_instances", "FILE_ROUTE_TYPE", "render_routes_png"]

FILE_ROUTE_TYPE = "Long"  # the metrics treat file routes like the long split's routes (no ability)


@dataclass
class FileRoute:
    """One route of a route file, positions in the world's frame. ``points (n, 2)``, ``yaws (n,)`` (NaN where
    the file gives none); ``scenarios``: ``{"type", "name", "trigger" (x, y), "yaw"}`` per scenario."""

    id: str
    town: str
    points: np.ndarray
    yaws: np.ndarray
    format: str  # "leaderboard-1.0" or "leaderboard-2.0"
    scenarios: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class RouteFileConfig:
    """How file routes are planned, given scenarios and traffic."""

    max_point_dist: float = 4.0  # a route point further than this from every lane refuses the route, m
    heading_weight: float = 4.0  # matching cost of a heading difference: w (1 - cos), m
    lane_change_cost: float = 20.0  # planner cost of a lane change, m
    before_trigger: float = 40.0  # a file scenario's builder may use route lanes from this far before its trigger, m
    after_trigger: float = 220.0  # ... to this far after it, m
    first_scenario: float = 40.0  # no library scenario starts before this many route metres, m
    gap: float = 40.0  # route metres between one placed scenario's end and the next one's start, m
    window: float = 260.0  # a placement uses route lanes up to this far beyond the cursor, m
    tries_per_type: int = 6  # build_scenario attempts per type and window
    vehicles_per_km: float = 12.0  # background vehicles per km of the town's driving lanes
    vehicles: tuple[int, int] = (40, 120)  # ... clipped to this range
    pedestrians_per_km: float = 6.0  # background pedestrians per km of sidewalk
    pedestrians: tuple[int, int] = (0, 60)  # ... clipped to this range
    scenarios: bool = True  # place scenarios (False: background traffic only)


# ---------------------------------------------------------------------------------------------- reading
def _float(el, key: str, where: str) -> float:
    try:
        v = float(el.get(key))
    except (TypeError, ValueError):
        raise CraftError(f"{where}: <{el.tag}> needs a number '{key}', got {el.get(key)!r}") from None
    if not math.isfinite(v):
        raise CraftError(f"{where}: <{el.tag}> {key}={v} is not finite")
    return v


def read_route_file(path: str | Path) -> list[FileRoute]:
    """The routes of a leaderboard-1.0 or leaderboard-2.0 / Bench2Drive route file (see the module docstring).
    A missing, malformed or empty file raises one :class:`CraftError` line."""
    path = Path(path)
    if not path.is_file():
        raise CraftError(f"route file '{path}' does not exist" if not path.exists()
                         else f"route file '{path}' is a folder, not a route file")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise CraftError(f"route file '{path}' is not readable XML ({e})") from None
    if root.tag != "routes":
        raise CraftError(f"route file '{path}': expected a <routes> root, found <{root.tag}>")
    out = []
    for r in root.findall("route"):
        rid, town = r.get("id"), r.get("town")
        where = f"route file '{path.name}' route {rid}"
        if rid is None or not town:
            raise CraftError(f"route file '{path.name}': a <route> needs 'id' and 'town' attributes")
        wps = r.findall("waypoint")
        pos = r.findall("waypoints/position")
        if wps:
            fmt, els = "leaderboard-1.0", wps
        elif pos:
            fmt, els = "leaderboard-2.0", pos
        else:
            raise CraftError(f"{where} has no <waypoint>s nor <waypoints><position>s")
        pts = carla_to_world([[_float(e, "x", where), _float(e, "y", where)] for e in els])
        yaws = np.array([carla_yaw_to_world(float(e.get("yaw"))) if e.get("yaw") is not None else np.nan
                         for e in els])
        scen = []
        for sc in r.findall("scenarios/scenario"):
            tp = sc.find("trigger_point")
            if tp is None or not sc.get("type"):
                raise CraftError(f"{where}: a <scenario> needs a 'type' and a <trigger_point>")
            scen.append({"type": sc.get("type"), "name": sc.get("name", sc.get("type")),
                         "trigger": tuple(carla_to_world([_float(tp, "x", where), _float(tp, "y", where)])),
                         "yaw": float(carla_yaw_to_world(float(tp.get("yaw", 0.0))))})
        out.append(FileRoute(str(rid), town, pts, yaws, fmt, scen))
    if not out:
        raise CraftError(f"route file '{path}' holds no <route>s")
    return out


# ---------------------------------------------------------------------------------------------- planning
def match_points(m: RoadMap, points: np.ndarray, yaws: np.ndarray, cfg: RouteFileConfig = RouteFileConfig(),
                 where: str = "route") -> list[tuple[int, float, float]]:
    """Each point's driving lane: ``(lane, s, distance)``. ``points (n, 2)``, ``yaws (n,)`` world frame (NaN:
    the heading from the neighbouring points). Raises one CraftError line for a point too far from lanes."""
    drive = (m.lane_type[m.point_lane] == int(LaneType.DRIVING))
    P = m.points.astype(np.float64)
    heads = np.array(yaws, dtype=np.float64)
    n = len(points)
    for k in range(n):  # headings from the route itself where the file has none
        if not np.isfinite(heads[k]):
            a, b = points[max(0, k - 1)], points[min(n - 1, k + 1)]
            heads[k] = math.atan2(b[1] - a[1], b[0] - a[0]) if np.linalg.norm(b - a) > 1e-6 else 0.0
    out = []
    for k in range(n):
        d = np.hypot(P[:, 0] - points[k, 0], P[:, 1] - points[k, 1])
        dh = np.cos(m.point_heading.astype(np.float64) - heads[k])
        ok = drive & (dh > 0.0) & (d <= cfg.max_point_dist + 2.0)
        if not ok.any():
            dmin = float(np.min(np.where(drive, d, np.inf)))
            raise CraftError(f"{where}: point {k} at ({points[k, 0]:.1f}, {-points[k, 1]:.1f}) (CARLA frame) is "
                             f"{dmin:.1f} m from the nearest lane of its direction (more than "
                             f"{cfg.max_point_dist:g} m): the route does not fit this map")
        cost = np.where(ok, d + cfg.heading_weight * (1.0 - dh), np.inf)
        i = int(np.argmin(cost))
        lane = int(m.point_lane[i])
        # project onto the lane's segment for the arc length and the true distance
        o, c = int(m.lane_offset[lane]), int(m.lane_count[lane])
        j = min(max(i, o), o + c - 2)
        a, b = P[j], P[j + 1]
        ab = b - a
        u = float(np.clip(np.dot(points[k] - a, ab) / max(np.dot(ab, ab), 1e-9), 0.0, 1.0))
        s = float(m.point_s[j]) + u * float(np.linalg.norm(ab))
        dist = float(np.linalg.norm(points[k] - (a + u * ab)))
        if i > o and u == 0.0:  # the point projects before this segment: try the previous one
            a2 = P[j - 1]
            ab2 = a - a2
            u2 = float(np.clip(np.dot(points[k] - a2, ab2) / max(np.dot(ab2, ab2), 1e-9), 0.0, 1.0))
            d2 = float(np.linalg.norm(points[k] - (a2 + u2 * ab2)))
            if d2 < dist:
                s, dist = float(m.point_s[j - 1]) + u2 * float(np.linalg.norm(ab2)), d2
        if dist > cfg.max_point_dist:
            raise CraftError(f"{where}: point {k} at ({points[k, 0]:.1f}, {-points[k, 1]:.1f}) (CARLA frame) is "
                             f"{dist:.1f} m from the nearest lane of its direction (more than "
                             f"{cfg.max_point_dist:g} m): the route does not fit this map")
        out.append((lane, min(s, float(m.lane_length[lane])), dist))
    return out


def _shortest(m: RoadMap, a: int, b: int, change_cost: float, leave_first: bool) -> list[int] | None:
    """Lanes from ``a`` to ``b`` (both included), Dijkstra over successors (cost: the lane left) and permitted
    lane changes (``change_cost``); ``leave_first``: ``a`` must be left before ``b`` counts (a == b loops)."""
    dist = {a: 0.0}
    prev: dict[int, int] = {}
    heap = [(0.0, a, 0)]
    goal_key = None
    done = set()
    while heap:
        d, i, left = heapq.heappop(heap)
        key = (i, left)
        if key in done:
            continue
        done.add(key)
        if i == b and (left or not leave_first):
            goal_key = key
            break
        edges = [(int(j), float(m.lane_length[i])) for j in m.successors(i)
                 if int(m.lane_type[j]) == int(LaneType.DRIVING)]
        edges += [(int(j), change_cost) for j in (m.lane_left[i], m.lane_right[i]) if j >= 0]
        for j, w in edges:
            nk = (j, 1)
            nd = d + w
            if nd < dist.get(nk, math.inf):
                dist[nk] = nd
                prev[nk] = key
                heapq.heappush(heap, (nd, j, 1))
    if goal_key is None:
        return None
    path = [goal_key]
    while path[-1] != (a, 0):
        path.append(prev[path[-1]])
    return [k[0] for k in path[::-1]]


def plan_route_lanes(m: RoadMap, matches: list[tuple[int, float, float]], cfg: RouteFileConfig = RouteFileConfig(),
                     where: str = "route") -> tuple[list[int], float, float]:
    """The lane route through matched points: ``(lanes, ego_s, end_m)`` (the ego starts at ``ego_s`` on
    ``lanes[0]``, the route ends ``end_m`` metres later, at the last point). Junction matches between the first
    and last points are dropped."""
    keep = [mt for k, mt in enumerate(matches)
            if k in (0, len(matches) - 1) or m.lane_junction[mt[0]] < 0]
    lanes = [keep[0][0]]
    s_cur = keep[0][1]
    for k, (lane, s, _) in enumerate(keep[1:], start=1):
        last = lanes[-1]
        if lane == last and s >= s_cur - 0.5:
            s_cur = max(s_cur, s)
            continue
        path = _shortest(m, last, lane, cfg.lane_change_cost, leave_first=lane == last)
        if path is None:
            raise CraftError(f"{where}: no lane path from point {k - 1} to point {k} (lane {last} to lane {lane}); "
                             "the route does not fit this map's lane graph")
        lanes += path[1:]
        s_cur = s
    ego_s = float(keep[0][1])
    segs = route_segments(m, lanes, ego_s)
    lane, s_from, s_to, cum = segs[-1]
    end_m = cum + max(0.0, min(keep[-1][1], s_to) - s_from)
    if end_m < 5.0:
        raise CraftError(f"{where}: the route is only {end_m:.1f} m long")
    return lanes, ego_s, float(end_m)


# ---------------------------------------------------------------------------------------------- scenarios
def _lanes_between(m: RoadMap, lanes: list[int], ego_s: float, lo: float, hi: float) -> set[int]:
    """Route lanes that overlap route metres ``[lo, hi]``."""
    out = set()
    for lane, a, b, cum in route_segments(m, lanes, ego_s):
        if cum <= hi and cum + (b - a) >= lo:
            out.add(int(lane))
    return out


def _start_on_route(m: RoadMap, lanes: list[int], ego_s: float, inst) -> float | None:
    """Route metres where ``inst``'s route starts on ``lanes``, if its lanes run consecutively along them."""
    r = list(inst.spec.route)
    segs = route_segments(m, lanes, ego_s)
    for i in range(len(lanes) - len(r) + 1):
        if lanes[i : i + len(r)] == r:
            lane, a, b, cum = segs[i]
            start = cum + float(inst.spec.ego_s) - a
            if start >= 0.0:
                return start
    return None


def _progress_of_point(pts: np.ndarray, cum: np.ndarray, xy) -> float:
    d = np.hypot(pts[:, 0] - xy[0], pts[:, 1] - xy[1])
    return float(cum[int(np.argmin(d))])


def _place(m, lanes, ego_s, end_m, t, rng, lo, hi, cfg: RouteFileConfig, map_index: int):
    """One placement of type ``t`` on the route lanes between route metres lo and hi, or None."""
    allowed = _lanes_between(m, lanes, ego_s, lo, hi)
    for _ in range(cfg.tries_per_type):
        try:
            inst = build_scenario(t, m, rng, map_index=map_index, attempts=4, allowed=allowed)
        except CraftError:
            return None
        start = _start_on_route(m, lanes, ego_s, inst)
        if start is None or start < lo - 1e-6 or start + inst.route_length > end_m:
            continue
        return inst, start
    return None


def place_scenarios(m: RoadMap, route: FileRoute, lanes: list[int], ego_s: float, end_m: float,
                    rng: np.random.Generator, cfg: RouteFileConfig, map_index: int = 0) -> tuple[list, list[str]]:
    """Scenario pieces along a planned file route and notes on the ones left out (see the module docstring)."""
    have = set(implemented_types())
    pieces, notes = [], []
    if not cfg.scenarios:
        return pieces, notes
    if route.scenarios:
        pts, cum = route_points(m, lanes, ego_s, upto=end_m)
        last_end = 0.0
        for sc in route.scenarios:
            t = sc["type"]
            if t not in have or t in NOT_CHAINED:
                notes.append(f"{sc['name']}: type {t} not placed (no builder / not chained)")
                continue
            p = _progress_of_point(pts, cum, sc["trigger"])
            lo = max(last_end, p - cfg.before_trigger)
            got = _place(m, lanes, ego_s, end_m, t, rng, lo, p + cfg.after_trigger, cfg, map_index)
            if got is None:
                notes.append(f"{sc['name']}: {t} has no place near its trigger on this town")
                continue
            inst, start = got
            pieces.append(_Piece(inst, start, start - last_end))
            last_end = start + inst.route_length
        return pieces, notes
    order = [t for t in implemented_types() if t not in NOT_CHAINED]
    order = [order[i] for i in rng.permutation(len(order))]
    cursor, last_end = cfg.first_scenario, 0.0
    while cursor < end_m - 60.0 and order:
        placed = None
        for t in list(order):
            got = _place(m, lanes, ego_s, end_m, t, rng, cursor, cursor + cfg.window, cfg, map_index)
            if got is not None and (placed is None or got[1] < placed[1][1]):
                placed = (t, got)
                if got[1] < cursor + 60.0:
                    break
        if placed is None:
            break
        t, (inst, start) = placed
        order.remove(t)
        pieces.append(_Piece(inst, start, start - last_end))
        last_end = start + inst.route_length
        cursor = last_end + cfg.gap
    return pieces, notes


def _traffic(m: RoadMap, cfg: RouteFileConfig) -> tuple[int, int]:
    drive = (m.lane_type == int(LaneType.DRIVING)) & (m.lane_junction < 0)
    walk = m.lane_type == int(LaneType.SIDEWALK)
    km_drive = float(m.lane_length[drive].sum()) / 1000.0
    km_walk = float(m.lane_length[walk].sum()) / 2000.0  # each sidewalk is two opposite lanes
    v = int(np.clip(round(cfg.vehicles_per_km * km_drive), *cfg.vehicles))
    p = int(np.clip(round(cfg.pedestrians_per_km * km_walk), *cfg.pedestrians)) if km_walk > 0 else 0
    return v, p


def build_file_route(m: RoadMap, route: FileRoute, file_name: str, map_index: int = 0,
                     cfg: RouteFileConfig = RouteFileConfig(), long_cfg: LongRouteConfig = LongRouteConfig()):
    """The scenario instance of one file route on its town ``m`` (raises one CraftError line naming it).
    ``file_name``: the route file's name (``longest6.xml``); its stem labels the routes (``meta["split"]``)."""
    where = f"route {route.id} ({route.town}) of {file_name}"
    file_name = Path(file_name).stem
    matches = match_points(m, route.points, route.yaws, cfg, where)
    lanes, ego_s, end_m = plan_route_lanes(m, matches, cfg, where)
    rng = np.random.default_rng([zlib.crc32(file_name.encode()), zlib.crc32(route.id.encode())])
    pieces, notes = place_scenarios(m, route, lanes, ego_s, end_m, rng, cfg, map_index)
    inst = _merge(m, long_cfg, pieces, lanes, ego_s, end_m, map_index, rng, hide_first=True,
                  traffic=_traffic(m, cfg))
    inst.meta.update(split=file_name, route_id=int(route.id) if route.id.isdigit() else zlib.crc32(route.id.encode()) % 1000,
                     route_name=route.id, town=route.town, file_route=True, format=route.format, notes=notes,
                     max_point_dist_m=round(max(d for _, _, d in matches), 2))
    return inst


def load_route_file(path: str | Path, maps: str | Path, cfg: RouteFileConfig = RouteFileConfig(),
                    strict: bool = False, routes: list[str] | None = None, towns: list[str] | None = None):
    """Every runnable route of a route file: ``(instances, road maps, refused)``; ``refused`` holds one line per
    route that cannot run (no map file for its town, a point off the lanes, ...). ``strict``: raise the first.
    ``routes`` / ``towns``: only these route ids / towns. Instances index the returned maps (``spec.map_index``)."""
    path, maps = Path(path), Path(maps)
    if not maps.is_dir():
        raise CraftError(f"--maps '{maps}' is not a folder of <town>.xodr files")
    all_routes = read_route_file(path)
    if routes:
        ids = {str(r) for r in routes}
        unknown = ids - {r.id for r in all_routes}
        if unknown:
            raise CraftError(f"route file '{path.name}' has no routes {sorted(unknown)}")
        all_routes = [r for r in all_routes if r.id in ids]
    if towns:
        all_routes = [r for r in all_routes if r.town in set(towns)]
        if not all_routes:
            raise CraftError(f"route file '{path.name}' has no routes in {list(towns)}")
    town_maps: dict[str, RoadMap] = {}
    index: dict[str, int] = {}
    instances, refused = [], []
    for r in all_routes:
        try:
            if r.town not in town_maps:
                f = maps / f"{r.town}.xodr"
                if not f.is_file():
                    raise CraftError(f"route {r.id} ({r.town}) of {path.name}: no map file {r.town}.xodr in '{maps}'")
                town_maps[r.town] = load_opendrive(f)
            m = town_maps[r.town]
            if r.town not in index:
                index[r.town] = len(index)
            inst = build_file_route(m, r, path.name, map_index=index[r.town], cfg=cfg)
            instances.append(inst)
        except CraftError as e:
            if strict:
                raise
            refused.append(str(e))
    used = sorted(index, key=index.get)
    return instances, [town_maps[t] for t in used], refused


def training_instances(split: str, town_seeds, routes, types, routes_file: tuple[str, str] | None = None):
    """``(instances, towns)`` for collection and fine-tuning: the split's (``load_split``) or, with
    ``routes_file = (route file, maps folder)``, that file's runnable routes on its real towns (refused routes
    are left out; none runnable is one CraftError line)."""
    if routes_file is None:
        from craft.scenarios.splits import load_split

        return load_split(split, town_seeds=list(town_seeds) if town_seeds else None, routes=routes,
                          types=list(types) if types else None)
    instances, towns, refused = load_route_file(routes_file[0], routes_file[1])
    if not instances:
        raise CraftError(f"no route of '{routes_file[0]}' can run here: " + (refused[0] if refused else "none"))
    return instances, towns


# ---------------------------------------------------------------------- pictures
ROUTE_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b")


def render_routes_png(road_map: RoadMap, routes_file: str | Path, path: str | Path,
                      routes: list[str] | None = None, size: int = 1600) -> int:
    """The whole town with the routes of ``routes_file`` that lie in it (planned through its lane graph, a
    circle at each start, a square at each end), its lights (coloured as at t = 0) and stop signs. Routes
    that do not fit the map are left out. Returns the number of routes drawn."""
    from PIL import Image

    from craft.world.map import LightState
    from craft.world.render import _MAP_MARGIN, _atomic_write, _geometry, draw_map, frame_to_rgb, new_figure

    mine = [r for r in read_route_file(routes_file) if r.town == road_map.name and (not routes or r.id in routes)]
    x0, y0, x1, y1 = _geometry(road_map).bounds
    aspect = (x1 - x0 + 2 * _MAP_MARGIN) / (y1 - y0 + 2 * _MAP_MARGIN)
    w, h = (size, max(16, round(size / aspect))) if aspect >= 1 else (max(16, round(size * aspect)), size)
    fig, ax = new_figure(w, h)
    timing = road_map.junction_timing
    lights = []
    for k in range(len(road_map.light_lane)):  # the cycle at t = 0 (see craft.world.map.light_states)
        g, y, r, n, off = (float(v) for v in timing[road_map.light_junction[k]])
        slot = max(g + y + r, 1e-3)
        tau = off % (slot * max(n, 1))
        active, within = int(tau // slot), tau - int(tau // slot) * slot
        mine_ph = active == int(road_map.light_phase[k])
        lights.append(int(LightState.GREEN) if mine_ph and within < g else
                      int(LightState.YELLOW) if mine_ph and within < g + y else int(LightState.RED))
    draw_map(ax, road_map, None, lights=np.array(lights, dtype=np.int64))
    drawn = []
    for i, r in enumerate(mine):
        try:
            lanes, ego_s, end_m = plan_route_lanes(road_map, match_points(road_map, r.points, r.yaws))
        except CraftError:
            continue
        pts, _ = route_points(road_map, lanes, ego_s, upto=end_m)
        c = ROUTE_COLORS[len(drawn) % len(ROUTE_COLORS)]
        ax.plot(pts[:, 0], pts[:, 1], color=c, linewidth=2.2, alpha=0.8, zorder=6)
        ax.plot(*pts[0], marker="o", color=c, markersize=7, markeredgecolor="black", zorder=7)
        ax.plot(*pts[-1], marker="s", color=c, markersize=6, markeredgecolor="black", zorder=7)
        drawn.append(Line2D([], [], color=c, linewidth=2.2, label=f"route {r.id} ({end_m / 1000:.2f} km)"))
    title = f"{road_map.name}: {len(drawn)} route{'s' if len(drawn) != 1 else ''} of {os.path.basename(str(routes_file))}"
    ax.text(0.012, 0.988, title, transform=ax.transAxes, ha="left", va="top", fontsize=9, zorder=10,
            bbox=dict(boxstyle="round,pad=0.35", facecolor="white", edgecolor="#888888", alpha=0.8))  # fmt: skip
    if drawn:
        ax.legend(handles=drawn, loc="upper right", fontsize=7, framealpha=0.85, facecolor="white",
                  edgecolor="#888888")
    rgb = frame_to_rgb(fig)
    _atomic_write(path, lambda f: Image.fromarray(rgb).save(f, format="PNG", optimize=False))
    return len(drawn)
