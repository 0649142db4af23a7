"""Road maps: lanes as polylines, the lane graph, junctions, signals, stop signs, drivable area.

A :class:`RoadMap` is a plain data structure (numpy arrays) describing one town. It does not care how it
was made: the procedural generator (:mod:`craft.world.towns`) builds one, and an OpenDRIVE importer can
build one too. :meth:`RoadMap.build` takes raw lane polylines plus connectivity and derives everything
else (uniform ~1 m resampling, arc length, headings, conflict points between junction connectors, the
spatial grid used for lane queries), and validates the result.

A :class:`MapBatch` stacks ``M`` road maps as padded torch tensors. Worlds refer to their map by index
(``map_id (B,)``), so a thousand worlds on ten towns store ten maps. All queries are batched tensor code:

- :func:`lane_pose`: position / heading at arc length ``s`` on a lane;
- :func:`nearest_lane`: the nearest lane of a set of types to a point (spatial-grid broad phase);
- :func:`light_states`: traffic-light states at a time, from each junction's phase cycle.

Lane polylines run in the lane's direction of travel. Sidewalks and crosswalks are walkable both ways.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import torch

from craft.errors import CraftError


class LaneType(IntEnum):
    """What a lane is for."""

    DRIVING = 0
    SHOULDER = 1  # emergency lane / hard shoulder
    PARKING = 2
    BIKE = 3
    SIDEWALK = 4
    CROSSWALK = 5


class JunctionKind(IntEnum):
    """How a junction is controlled."""

    UNCONTROLLED = 0
    STOP = 1
    SIGNAL = 2


class LightState(IntEnum):
    """Traffic-light colour."""

    GREEN = 0
    YELLOW = 1
    RED = 2


VEHICLE_LANES = (LaneType.DRIVING, LaneType.PARKING, LaneType.SHOULDER, LaneType.BIKE)
WALK_LANES = (LaneType.SIDEWALK, LaneType.CROSSWALK)

POINT_SPACING = 1.0  # target spacing of resampled lane points, m
GRID_CELL = 4.0  # spatial-grid cell size for lane queries, m
GRID_MARGIN = 2.0  # extra reach of a segment beyond its half width when binning, m


@dataclass
class RawLane:
    """A lane as a generator or importer describes it, before :meth:`RoadMap.build`.

    points: (n, 2) centreline in the direction of travel, n >= 2.
    """

    points: np.ndarray
    width: float
    speed_limit: float
    type: LaneType = LaneType.DRIVING
    road: int = -1  # road id (lanes of one carriageway side share it), -1 for junction connectors
    junction: int = -1  # junction id for vehicle connector lanes (driving lanes inside a junction), else -1
    successors: list[int] = field(default_factory=list)
    left: int = -1  # same-direction neighbour on the left
    right: int = -1  # same-direction neighbour on the right
    left_opposite: int = -1  # opposite-direction neighbour across the centre line
    priority: int = 0  # junction priority of a connector (higher goes first)
    turn: int = 0  # connector manoeuvre: 0 straight, 1 left, 2 right, 3 u-turn / other


@dataclass
class RawJunction:
    """A junction: its centre, reach, control kind and signal timing."""

    center: tuple[float, float]
    radius: float
    kind: JunctionKind
    green: float = 12.0  # s of green per phase
    yellow: float = 3.0  # s of yellow
    all_red: float = 1.0  # s of all-red between phases
    n_phases: int = 2
    offset: float = 0.0  # s, phase offset of this junction's cycle


@dataclass
class RawLight:
    """A traffic light controlling the end of an incoming lane (its stop line)."""

    lane: int
    junction: int
    phase: int


@dataclass
class RawStop:
    """A stop sign at the end of an incoming lane; its trigger area is the last ``trigger_length`` m."""

    lane: int
    junction: int
    trigger_length: float = 6.0


@dataclass
class RoadMap:
    """One town as plain numpy arrays (see the module docstring). ``L`` lanes, ``P`` points in all."""

    name: str
    # points, all lanes concatenated, uniformly resampled
    points: np.ndarray  # (P, 2)
    point_heading: np.ndarray  # (P,)
    point_s: np.ndarray  # (P,) arc length from the lane start
    point_lane: np.ndarray  # (P,)
    # lanes
    lane_offset: np.ndarray  # (L,) first point index
    lane_count: np.ndarray  # (L,) number of points
    lane_length: np.ndarray  # (L,)
    lane_width: np.ndarray  # (L,)
    lane_speed_limit: np.ndarray  # (L,)
    lane_type: np.ndarray  # (L,)
    lane_road: np.ndarray  # (L,)
    lane_junction: np.ndarray  # (L,)
    lane_succ: np.ndarray  # (L, S) -1 padded
    lane_pred: np.ndarray  # (L, S) -1 padded
    lane_left: np.ndarray  # (L,)
    lane_right: np.ndarray  # (L,)
    lane_left_opposite: np.ndarray  # (L,)
    lane_priority: np.ndarray  # (L,)
    lane_turn: np.ndarray  # (L,)
    lane_light: np.ndarray  # (L,) light controlling the lane's end (incoming lanes) or its entry (connectors)
    lane_stop: np.ndarray  # (L,) stop sign at the lane's end (incoming) or entry (connectors)
    lane_conflict: np.ndarray  # (L, C) connectors whose paths cross or merge with this one, -1 padded
    lane_conflict_s: np.ndarray  # (L, C) arc length of the conflict point on this lane
    lane_conflict_other_s: np.ndarray  # (L, C) arc length of the conflict point on the other lane
    # junctions
    junction_center: np.ndarray  # (J, 2)
    junction_radius: np.ndarray  # (J,)
    junction_kind: np.ndarray  # (J,)
    junction_timing: np.ndarray  # (J, 5): green, yellow, all_red, n_phases, offset
    # lights
    light_lane: np.ndarray  # (K,)
    light_junction: np.ndarray  # (K,)
    light_phase: np.ndarray  # (K,)
    light_pos: np.ndarray  # (K, 2) stop-line centre
    light_heading: np.ndarray  # (K,)
    # stop signs
    stop_lane: np.ndarray  # (Q,)
    stop_junction: np.ndarray  # (Q,)
    stop_pos: np.ndarray  # (Q, 2) stop-line centre
    stop_heading: np.ndarray  # (Q,)
    stop_trigger: np.ndarray  # (Q, 5) trigger box: cx, cy, yaw, length, width
    # spatial grid (CSR) of segments: segment i joins point i and i+1 of the same lane
    grid_origin: np.ndarray  # (2,)
    grid_shape: tuple[int, int]
    grid_start: np.ndarray  # (cells,)
    grid_count: np.ndarray  # (cells,)
    grid_items: np.ndarray  # (I,) segment (start point) indices
    extras: dict = field(default_factory=dict)  # generator metadata (features for scenario placement)

    @property
    def num_lanes(self) -> int:
        return int(self.lane_offset.shape[0])

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        lo = self.points.min(0)
        hi = self.points.max(0)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])

    def lane_points(self, lane: int) -> np.ndarray:
        """(n, 2) resampled centreline of ``lane``."""
        o = int(self.lane_offset[lane])
        return self.points[o : o + int(self.lane_count[lane])]

    def successors(self, lane: int) -> list[int]:
        return [int(x) for x in self.lane_succ[lane] if x >= 0]

    def predecessors(self, lane: int) -> list[int]:
        return [int(x) for x in self.lane_pred[lane] if x >= 0]

    # ------------------------------------------------------------------ building
    @staticmethod
    def build(
        name: str,
        lanes: list[RawLane],
        junctions: list[RawJunction] = (),
        lights: list[RawLight] = (),
        stops: list[RawStop] = (),
        extras: dict | None = None,
    ) -> "RoadMap":
        """Resample, derive and validate a road map from raw lanes. Raises :class:`CraftError` on bad input."""
        _validate_raw(name, lanes, junctions, lights, stops)
        L = len(lanes)
        pts, heads, ss, owner, offs, counts, lengths = [], [], [], [], [], [], []
        o = 0
        for i, ln in enumerate(lanes):
            p, h, s = _resample(np.asarray(ln.points, dtype=np.float64))
            pts.append(p)
            heads.append(h)
            ss.append(s)
            owner.append(np.full(len(p), i))
            offs.append(o)
            counts.append(len(p))
            lengths.append(s[-1])
            o += len(p)
        points = np.concatenate(pts).astype(np.float32)
        point_heading = np.concatenate(heads).astype(np.float32)
        point_s = np.concatenate(ss).astype(np.float32)
        point_lane = np.concatenate(owner).astype(np.int64)

        S = max([1] + [len(ln.successors) for ln in lanes])
        succ = np.full((L, S), -1, np.int64)
        preds: list[list[int]] = [[] for _ in range(L)]
        for i, ln in enumerate(lanes):
            for k, j in enumerate(ln.successors):
                succ[i, k] = j
                preds[j].append(i)
        P = max([1] + [len(p) for p in preds])
        pred = np.full((L, P), -1, np.int64)
        for j, p in enumerate(preds):
            pred[j, : len(p)] = p

        lane_light = np.full(L, -1, np.int64)
        lane_stop = np.full(L, -1, np.int64)
        for k, lt in enumerate(lights):
            lane_light[lt.lane] = k
            for c in lanes[lt.lane].successors:
                if lanes[c].junction >= 0:
                    lane_light[c] = k
        for k, st in enumerate(stops):
            lane_stop[st.lane] = k
            for c in lanes[st.lane].successors:
                if lanes[c].junction >= 0:
                    lane_stop[c] = k

        def lane_end(i):
            e = offs[i] + counts[i] - 1
            return points[e], float(point_heading[e])

        light_pos = np.array([lane_end(lt.lane)[0] for lt in lights], np.float32).reshape(-1, 2)
        light_heading = np.array([lane_end(lt.lane)[1] for lt in lights], np.float32)
        stop_pos = np.array([lane_end(st.lane)[0] for st in stops], np.float32).reshape(-1, 2)
        stop_heading = np.array([lane_end(st.lane)[1] for st in stops], np.float32)
        trig = []
        for st in stops:
            p, h = lane_end(st.lane)
            tl = min(st.trigger_length, lengths[st.lane])
            c = p - 0.5 * tl * np.array([np.cos(h), np.sin(h)], np.float32)
            trig.append([c[0], c[1], h, tl, lanes[st.lane].width])
        stop_trigger = np.array(trig, np.float32).reshape(-1, 5)

        conflict, conflict_s, conflict_os = _conflicts(lanes, points, point_s, offs, counts)
        grid = _build_grid(points, point_lane, np.array(offs), np.array(counts), np.array([ln.width for ln in lanes]))

        return RoadMap(
            name=name,
            points=points,
            point_heading=point_heading,
            point_s=point_s,
            point_lane=point_lane,
            lane_offset=np.array(offs, np.int64),
            lane_count=np.array(counts, np.int64),
            lane_length=np.array(lengths, np.float32),
            lane_width=np.array([ln.width for ln in lanes], np.float32),
            lane_speed_limit=np.array([ln.speed_limit for ln in lanes], np.float32),
            lane_type=np.array([int(ln.type) for ln in lanes], np.int64),
            lane_road=np.array([ln.road for ln in lanes], np.int64),
            lane_junction=np.array([ln.junction for ln in lanes], np.int64),
            lane_succ=succ,
            lane_pred=pred,
            lane_left=np.array([ln.left for ln in lanes], np.int64),
            lane_right=np.array([ln.right for ln in lanes], np.int64),
            lane_left_opposite=np.array([ln.left_opposite for ln in lanes], np.int64),
            lane_priority=np.array([ln.priority for ln in lanes], np.int64),
            lane_turn=np.array([ln.turn for ln in lanes], np.int64),
            lane_light=lane_light,
            lane_stop=lane_stop,
            lane_conflict=conflict,
            lane_conflict_s=conflict_s,
            lane_conflict_other_s=conflict_os,
            junction_center=np.array([j.center for j in junctions], np.float32).reshape(-1, 2),
            junction_radius=np.array([j.radius for j in junctions], np.float32),
            junction_kind=np.array([int(j.kind) for j in junctions], np.int64),
            junction_timing=np.array(
                [[j.green, j.yellow, j.all_red, j.n_phases, j.offset] for j in junctions], np.float32
            ).reshape(-1, 5),
            light_lane=np.array([lt.lane for lt in lights], np.int64),
            light_junction=np.array([lt.junction for lt in lights], np.int64),
            light_phase=np.array([lt.phase for lt in lights], np.int64),
            light_pos=light_pos,
            light_heading=light_heading,
            stop_lane=np.array([st.lane for st in stops], np.int64),
            stop_junction=np.array([st.junction for st in stops], np.int64),
            stop_pos=stop_pos,
            stop_heading=stop_heading,
            stop_trigger=stop_trigger,
            grid_origin=grid[0],
            grid_shape=grid[1],
            grid_start=grid[2],
            grid_count=grid[3],
            grid_items=grid[4],
            extras=dict(extras or {}),
        )

    # ------------------------------------------------------------------ graph queries
    def reachable_from(self, lane: int, types=(LaneType.DRIVING,)) -> set[int]:
        """Lanes reachable from ``lane`` through successors and same-direction lane changes."""
        allowed = set(int(t) for t in types)
        seen = {lane}
        todo = [lane]
        while todo:
            i = todo.pop()
            for j in self._neighbours(i):
                if j not in seen and int(self.lane_type[j]) in allowed:
                    seen.add(j)
                    todo.append(j)
        return seen

    def _neighbours(self, i: int) -> list[int]:
        out = self.successors(i)
        for j in (self.lane_left[i], self.lane_right[i]):
            if j >= 0:
                out.append(int(j))
        return out

    def plan_route(self, start: int, goal: int, lane_change_cost: float = 30.0) -> list[int]:
        """Shortest lane sequence from ``start`` to ``goal`` (Dijkstra on the lane graph).

        Edges: successors (cost = lane length) and same-direction lane changes (``lane_change_cost`` m).
        Raises :class:`CraftError` when ``goal`` cannot be reached.
        """
        L = self.num_lanes
        for name, v in (("start", start), ("goal", goal)):
            if not 0 <= v < L:
                raise CraftError(f"route {name} lane {v} does not exist (map '{self.name}' has {L} lanes)")
        dist = {start: 0.0}
        prev: dict[int, int] = {}
        heap = [(0.0, start)]
        while heap:
            d, i = heapq.heappop(heap)
            if i == goal:
                break
            if d > dist.get(i, np.inf):
                continue
            edges = [(j, float(self.lane_length[i])) for j in self.successors(i)]
            edges += [(int(j), lane_change_cost) for j in (self.lane_left[i], self.lane_right[i]) if j >= 0]
            for j, w in edges:
                nd = d + w
                if nd < dist.get(j, np.inf):
                    dist[j] = nd
                    prev[j] = i
                    heapq.heappush(heap, (nd, j))
        if goal not in dist:
            raise CraftError(
                f"no route from lane {start} to lane {goal} on map '{self.name}': the goal is not reachable "
                "through the lane graph; pick another goal"
            )
        path = [goal]
        while path[-1] != start:
            path.append(prev[path[-1]])
        return path[::-1]


# ---------------------------------------------------------------------- build helpers
def _validate_raw(name, lanes, junctions, lights, stops) -> None:
    if not lanes:
        raise CraftError(f"map '{name}' has no lanes")
    L = len(lanes)
    for i, ln in enumerate(lanes):
        p = np.asarray(ln.points, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] < 2:
            raise CraftError(f"map '{name}' lane {i}: points must have shape (n>=2, 2), got {p.shape}")
        if not np.isfinite(p).all():
            raise CraftError(f"map '{name}' lane {i}: points contain NaN or infinite values")
        if np.linalg.norm(np.diff(p, axis=0), axis=1).sum() < 0.1:
            raise CraftError(f"map '{name}' lane {i}: lane is shorter than 0.1 m")
        if not (np.isfinite(ln.width) and ln.width > 0):
            raise CraftError(f"map '{name}' lane {i}: width must be positive, got {ln.width}")
        if not (np.isfinite(ln.speed_limit) and ln.speed_limit > 0):
            raise CraftError(f"map '{name}' lane {i}: speed limit must be positive, got {ln.speed_limit}")
        try:
            LaneType(int(ln.type))
        except ValueError:
            raise CraftError(f"map '{name}' lane {i}: unknown lane type {ln.type}") from None
        refs = list(ln.successors) + [ln.left, ln.right, ln.left_opposite]
        for j in refs:
            if j != -1 and not 0 <= j < L:
                raise CraftError(f"map '{name}' lane {i}: refers to lane {j}, which does not exist")
        if not -1 <= ln.junction < len(junctions):
            raise CraftError(f"map '{name}' lane {i}: junction {ln.junction} does not exist")
    for k, lt in enumerate(lights):
        if not 0 <= lt.lane < L or not 0 <= lt.junction < len(junctions):
            raise CraftError(f"map '{name}' light {k}: lane {lt.lane} or junction {lt.junction} does not exist")
        if not 0 <= lt.phase < junctions[lt.junction].n_phases:
            raise CraftError(f"map '{name}' light {k}: phase {lt.phase} outside its junction's cycle")
    for k, st in enumerate(stops):
        if not 0 <= st.lane < L:
            raise CraftError(f"map '{name}' stop sign {k}: lane {st.lane} does not exist")
    for k, j in enumerate(junctions):
        t = [j.green, j.yellow, j.all_red, j.radius]
        if not np.isfinite(t + list(j.center)).all() or j.green <= 0 or j.radius <= 0 or j.n_phases < 1:
            raise CraftError(f"map '{name}' junction {k}: timing / radius must be positive and finite")


def _resample(p: np.ndarray, spacing: float = POINT_SPACING):
    """Uniformly resample a polyline. Returns points (n,2), heading (n,), arc length (n,)."""
    seg = np.diff(p, axis=0)
    seglen = np.linalg.norm(seg, axis=1)
    keep = np.concatenate([[True], seglen > 1e-9])
    p = p[keep]
    seg = np.diff(p, axis=0)
    seglen = np.linalg.norm(seg, axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seglen)])
    total = cum[-1]
    n = max(2, int(np.ceil(total / spacing)) + 1)
    s = np.linspace(0.0, total, n)
    x = np.interp(s, cum, p[:, 0])
    y = np.interp(s, cum, p[:, 1])
    out = np.stack([x, y], 1)
    d = np.diff(out, axis=0)
    h = np.arctan2(d[:, 1], d[:, 0])
    h = np.concatenate([h, h[-1:]])
    return out, h, s


def _seg_intersect(a0, a1, b0, b1):
    """Intersections of every segment of A with every segment of B: returns (ta, tb, hit) arrays."""
    da = (a1 - a0)[:, None, :]
    db = (b1 - b0)[None, :, :]
    r = b0[None, :, :] - a0[:, None, :]
    den = da[..., 0] * db[..., 1] - da[..., 1] * db[..., 0]
    ok = np.abs(den) > 1e-9
    den = np.where(ok, den, 1.0)
    ta = (r[..., 0] * db[..., 1] - r[..., 1] * db[..., 0]) / den
    tb = (r[..., 0] * da[..., 1] - r[..., 1] * da[..., 0]) / den
    hit = ok & (ta >= 0) & (ta <= 1) & (tb >= 0) & (tb <= 1)
    return ta, tb, hit


def _conflicts(lanes, points, point_s, offs, counts):
    """Conflict points between connector lanes of the same junction: crossing or merging paths."""
    L = len(lanes)
    by_j: dict[int, list[int]] = {}
    for i, ln in enumerate(lanes):
        if ln.junction >= 0 and ln.type == LaneType.DRIVING:
            by_j.setdefault(ln.junction, []).append(i)
    found: list[list[tuple[int, float, float]]] = [[] for _ in range(L)]
    for conn in by_j.values():
        for ai, a in enumerate(conn):
            pa = points[offs[a] : offs[a] + counts[a]].astype(np.float64)
            sa = point_s[offs[a] : offs[a] + counts[a]]
            for b in conn[ai + 1 :]:
                pb = points[offs[b] : offs[b] + counts[b]].astype(np.float64)
                sb = point_s[offs[b] : offs[b] + counts[b]]
                same_exit = bool(set(lanes[a].successors) & set(lanes[b].successors))
                if same_exit:
                    found[a].append((b, float(sa[-1]), float(sb[-1])))
                    found[b].append((a, float(sb[-1]), float(sa[-1])))
                    continue
                ta, tb, hit = _seg_intersect(pa[:-1], pa[1:], pb[:-1], pb[1:])
                # ignore touching at the very start (shared entry point)
                if hit.any():
                    ia, ib = np.nonzero(hit)
                    s_a = sa[ia] + ta[ia, ib] * (sa[ia + 1] - sa[ia])
                    s_b = sb[ib] + tb[ia, ib] * (sb[ib + 1] - sb[ib])
                    real = (s_a >= 0.5) | (s_b >= 0.5)  # fanning out from one entry point is no conflict
                    if real.any():
                        k = int(np.argmin(np.where(real, s_a, np.inf)))
                        found[a].append((b, float(s_a[k]), float(s_b[k])))
                        found[b].append((a, float(s_b[k]), float(s_a[k])))
    C = max([1] + [len(f) for f in found])
    conflict = np.full((L, C), -1, np.int64)
    cs = np.zeros((L, C), np.float32)
    cos = np.zeros((L, C), np.float32)
    for i, f in enumerate(found):
        for k, (j, s1, s2) in enumerate(f):
            conflict[i, k] = j
            cs[i, k] = s1
            cos[i, k] = s2
    return conflict, cs, cos


def _build_grid(points, point_lane, offs, counts, widths, cell: float = GRID_CELL):
    """Bin every lane segment into the grid cells its (widened) bounding box touches (CSR layout).

    Segment i joins points i and i+1 of the same lane (lanes given by ``offs`` / ``counts``); its box is
    widened by half the lane width + ``GRID_MARGIN``. ``cell``: cell side, m. Returns (origin (2,),
    shape, start (cells,), count (cells,), items (I,) segment start indices)."""
    lo = points.min(0) - 20.0
    hi = points.max(0) + 20.0
    shape = (int(np.ceil((hi[0] - lo[0]) / cell)) + 1, int(np.ceil((hi[1] - lo[1]) / cell)) + 1)
    is_last = np.zeros(len(points), bool)
    is_last[offs + counts - 1] = True
    seg = np.nonzero(~is_last)[0]
    a = points[seg]
    b = points[seg + 1]
    reach = widths[point_lane[seg]] / 2 + GRID_MARGIN
    smin = np.minimum(a, b) - reach[:, None]
    smax = np.maximum(a, b) + reach[:, None]
    c0 = np.floor((smin - lo) / cell).astype(np.int64)
    c1 = np.floor((smax - lo) / cell).astype(np.int64)
    cells, items = [], []
    span = c1 - c0 + 1
    for dx in range(int(span[:, 0].max())):
        for dy in range(int(span[:, 1].max())):
            ok = (dx < span[:, 0]) & (dy < span[:, 1])
            cx = c0[ok, 0] + dx
            cy = c0[ok, 1] + dy
            cells.append(cx * shape[1] + cy)
            items.append(seg[ok])
    cells = np.concatenate(cells)
    items = np.concatenate(items)
    order = np.argsort(cells, kind="stable")
    cells, items = cells[order], items[order]
    n_cells = shape[0] * shape[1]
    count = np.bincount(cells, minlength=n_cells).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    return lo.astype(np.float32), shape, start, count, items.astype(np.int64)


# ---------------------------------------------------------------------- batched tensors
_LANE_FIELDS = (
    "lane_offset lane_count lane_length lane_width lane_speed_limit lane_type lane_road lane_junction "
    "lane_succ lane_pred lane_left lane_right lane_left_opposite lane_priority lane_turn lane_light "
    "lane_stop lane_conflict lane_conflict_s lane_conflict_other_s"
).split()
_POINT_FIELDS = "points point_heading point_s point_lane".split()
_FIELDS = {
    "junction": "junction_center junction_radius junction_kind junction_timing".split(),
    "light": "light_lane light_junction light_phase light_pos light_heading".split(),
    "stop": "stop_lane stop_junction stop_pos stop_heading stop_trigger".split(),
}
_FILL = {"int": -1, "float": 0.0}


def _stack(arrs: list[np.ndarray], device) -> torch.Tensor:
    """Pad a list of arrays along every axis to a common shape and stack them (-1 / 0 padding)."""
    ndim = arrs[0].ndim
    shape = [max(a.shape[d] for a in arrs) for d in range(ndim)]
    shape = [max(1, s) for s in shape]
    is_int = np.issubdtype(arrs[0].dtype, np.integer)
    out = np.full([len(arrs)] + shape, -1 if is_int else 0.0, dtype=np.int64 if is_int else np.float32)
    for m, a in enumerate(arrs):
        out[(m,) + tuple(slice(0, s) for s in a.shape)] = a
    return torch.from_numpy(out).to(device)


class MapBatch:
    """``M`` road maps stacked as padded tensors; worlds index it with ``map_id (B,)``.

    Attributes mirror :class:`RoadMap` with a leading map axis: ``points (M, P, 2)``, ``lane_length (M, L)``,
    ``lane_succ (M, L, S)``, ``light_pos (M, K, 2)``, ... plus validity masks ``lane_valid (M, L)``,
    ``light_valid (M, K)``, ``stop_valid (M, Q)``, ``junction_valid (M, J)``.
    """

    def __init__(self, maps: list[RoadMap], device: str | torch.device = "cpu"):
        if not maps:
            raise CraftError("MapBatch needs at least one map")
        self.maps = list(maps)
        self.device = torch.device(device)
        for f in _POINT_FIELDS + _LANE_FIELDS + sum(_FIELDS.values(), []):
            setattr(self, f, _stack([getattr(m, f) for m in maps], self.device))
        self.lane_valid = _stack([np.ones(m.num_lanes, np.int64) for m in maps], self.device) > 0
        self.light_valid = _stack([np.ones(len(m.light_lane), np.int64) for m in maps], self.device) > 0
        self.stop_valid = _stack([np.ones(len(m.stop_lane), np.int64) for m in maps], self.device) > 0
        self.junction_valid = _stack([np.ones(len(m.junction_kind), np.int64) for m in maps], self.device) > 0
        for m, mp in enumerate(maps):  # padded rows may hold -1 / 0 from padding; validity masks say so
            if len(mp.light_lane) == 0:
                self.light_valid[m] = False
            if len(mp.stop_lane) == 0:
                self.stop_valid[m] = False
            if len(mp.junction_kind) == 0:
                self.junction_valid[m] = False
        # spatial grid
        self.grid_origin = _stack([m.grid_origin for m in maps], self.device)  # (M, 2)
        self.grid_shape = torch.tensor([m.grid_shape for m in maps], device=self.device)  # (M, 2)
        self.grid_start = _stack([m.grid_start for m in maps], self.device).clamp_min(0)
        self.grid_count = _stack([m.grid_count for m in maps], self.device).clamp_min(0)
        self.grid_items = _stack([m.grid_items for m in maps], self.device)
        self.grid_capacity = int(max(int(m.grid_count.max()) for m in maps))
        # packed tables for the hot lane_pose gather: one index_select per lookup instead of three
        # 1-D columns: a 1-D index_select is several times faster than gathering rows of 2-3 values
        self.point_x = self.points[..., 0].contiguous()
        self.point_y = self.points[..., 1].contiguous()

    @property
    def num_maps(self) -> int:
        return len(self.maps)

    def to(self, device) -> "MapBatch":
        return MapBatch(self.maps, device)


def lane_pose(mb: MapBatch, map_id: torch.Tensor, lane: torch.Tensor, s: torch.Tensor):
    """Pose at arc length ``s`` on ``lane`` (clamped to the lane), linear interpolation.

    map_id: broadcastable to lane's shape (...), lane: (...) long, s: (...) float.
    Returns pos (..., 2), heading (...).
    """
    map_id = map_id.expand_as(lane)
    lane_c = lane.clamp_min(0)
    return lane_pose_at(mb, map_id, take(mb.lane_offset, map_id, lane_c), take(mb.lane_count, map_id, lane_c),
                        take(mb.lane_length, map_id, lane_c), s)


def lane_pose_at(mb: MapBatch, map_id, offset, count, length, s):
    """:func:`lane_pose` with the lanes' point offset, point count and length already looked up (...)."""
    sc = torch.minimum(s.clamp_min(0.0), length)
    spacing = length / (count - 1).clamp_min(1).to(s.dtype)
    f = sc / spacing.clamp_min(1e-6)
    i0 = torch.minimum(f.floor(), (count - 2).clamp_min(0).to(f.dtype))
    w = (f - i0).clamp(0.0, 1.0)
    i0 = offset + i0.long()
    x0, y0 = take(mb.point_x, map_id, i0), take(mb.point_y, map_id, i0)
    x1, y1 = take(mb.point_x, map_id, i0 + 1), take(mb.point_y, map_id, i0 + 1)
    pos = torch.stack([x0 + w * (x1 - x0), y0 + w * (y1 - y0)], -1)
    return pos, take(mb.point_heading, map_id, i0)


def grid_cell(mb: MapBatch, map_id: torch.Tensor, pos: torch.Tensor):
    """The spatial-grid cell of each query point: (start, count) of its segment list in ``grid_items``.

    map_id: (Q,), pos: (Q, 2). Points outside the grid get count 0."""
    cell = ((pos - mb.grid_origin[map_id]) / GRID_CELL).floor().long()
    shape = mb.grid_shape[map_id]
    inside = (cell >= 0).all(-1) & (cell < shape).all(-1)
    cid = (cell[:, 0].clamp(min=0) * shape[:, 1] + cell[:, 1].clamp(min=0)).clamp(max=mb.grid_start.shape[1] - 1)
    start = take(mb.grid_start, map_id, cid)
    count = torch.where(inside, take(mb.grid_count, map_id, cid), torch.zeros_like(cid))
    return start, count


def lane_candidates(mb: MapBatch, map_id: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every lane segment binned in the grid cell of each query point, with its geometry.

    map_id: (Q,), pos: (Q, 2). Returns (Q, K) tensors: ``ok`` (slot used), ``lane``, ``type``, ``dist``
    (to the segment), ``lateral`` (signed, left positive), ``heading`` (segment), ``s`` (arc length of the
    projection), ``beyond`` (the projection falls past the lane's first or last point). Several
    :func:`pick_lane` queries can share one call.
    """
    start, count = grid_cell(mb, map_id, pos)
    K = max(1, mb.grid_capacity)
    k = torch.arange(K, device=pos.device)
    ok = k[None, :] < count[:, None]  # (Q, K)
    idx = (start[:, None] + k[None, :]).clamp(max=mb.grid_items.shape[1] - 1)
    mid = map_id[:, None].expand(-1, K)
    seg = take(mb.grid_items, mid, idx).clamp_min(0)  # (Q, K) first point of the segment
    lane = take(mb.point_lane, mid, seg)
    a = take(mb.points, mid, seg)
    b = take(mb.points, mid, seg + 1)
    ab = b - a
    l2 = (ab * ab).sum(-1).clamp_min(1e-9)
    u = (((pos[:, None, :] - a) * ab).sum(-1) / l2).clamp(0.0, 1.0)
    d = pos[:, None, :] - (a + u.unsqueeze(-1) * ab)
    dist = torch.sqrt((d * d).sum(-1))
    cross = ab[..., 0] * d[..., 1] - ab[..., 1] * d[..., 0]
    # projections past a lane's very first or last point (the distance would round the lane's end)
    first = seg == take(mb.lane_offset, mid, lane)
    last = seg + 2 == take(mb.lane_offset, mid, lane) + take(mb.lane_count, mid, lane)
    beyond = (first & (u <= 0.0)) | (last & (u >= 1.0))
    return {
        "ok": ok,
        "lane": lane,
        "type": take(mb.lane_type, mid, lane),
        "width": take(mb.lane_width, mid, lane),
        "dist": dist,
        "lateral": torch.sign(cross) * dist,
        "heading": take(mb.point_heading, mid, seg),
        "s": take(mb.point_s, mid, seg) + u * l2.sqrt(),
        "beyond": beyond,
    }


def pick_lane(cand: dict, types: tuple = (LaneType.DRIVING,), heading: torch.Tensor | None = None,
              heading_weight: float = 2.0) -> dict[str, torch.Tensor]:
    """The best candidate of the given lane types (see :func:`nearest_lane` for the result layout)."""
    ok = torch.zeros_like(cand["ok"])
    for t in types:
        ok |= cand["type"] == int(t)
    ok &= cand["ok"] & (cand["dist"] <= cand["width"] / 2 + GRID_MARGIN)
    cost = cand["dist"]
    if heading is not None:
        cost = cost + heading_weight * (1 - torch.cos(_wrap(heading[:, None] - cand["heading"])))
    cost = torch.where(ok, cost, torch.full_like(cost, float("inf")))
    best = cost.argmin(-1, keepdim=True)
    found = torch.gather(ok, 1, best).squeeze(1)
    g = lambda x: torch.gather(x, 1, best).squeeze(1)  # noqa: E731
    head_b = g(cand["heading"])
    return {
        "lane": torch.where(found, g(cand["lane"]), torch.full_like(best.squeeze(1), -1)),
        "s": g(cand["s"]),
        "lateral": g(cand["lateral"]),
        "dist": torch.where(found, g(cand["dist"]), torch.full_like(head_b, float("inf"))),
        "heading": head_b,
        "heading_diff": _wrap(heading - head_b) if heading is not None else torch.zeros_like(head_b),
        "width": g(cand["width"]),
    }


def nearest_lane(
    mb: MapBatch,
    map_id: torch.Tensor,
    pos: torch.Tensor,
    heading: torch.Tensor | None = None,
    types: tuple = (LaneType.DRIVING,),
    heading_weight: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Nearest lane of the given types to each query point, via the spatial grid.

    map_id: (Q,), pos: (Q, 2), heading: (Q,) optional — when given, the match cost adds
    ``heading_weight * (1 - cos(heading difference))`` metres so that overlapping lanes in a junction
    resolve to the one the agent drives along. Only lanes within half width + ``GRID_MARGIN`` are found.
    Returns dict with ``lane (Q,)`` (-1 if none within reach), ``s (Q,)`` arc length, ``lateral (Q,)``
    signed offset (left positive), ``dist (Q,)`` |lateral| (inf if none), ``heading_diff (Q,)`` wrapped,
    ``width (Q,)``.
    """
    return pick_lane(lane_candidates(mb, map_id, pos), types, heading, heading_weight)


def light_states(mb: MapBatch, map_id: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Light colours at time ``t`` from each junction's phase cycle.

    map_id: (B,), t: (B,) seconds. Returns (B, K) long of :class:`LightState` (RED for padded lights).
    Cycle per junction: phase after phase, each ``green`` + ``yellow`` + ``all_red`` seconds long.
    """
    j = mb.light_junction[map_id].clamp_min(0)  # (B, K)
    timing = take(mb.junction_timing, map_id[:, None].expand_as(j), j)  # (B, K, 5)
    g, y, r, n, off = timing.unbind(-1)
    slot = (g + y + r).clamp_min(1e-3)
    cycle = slot * n.clamp_min(1)
    tau = torch.remainder(t[:, None] + off, cycle)
    active = (tau / slot).floor()
    within = tau - active * slot
    mine = active == mb.light_phase[map_id].to(tau.dtype)
    state = torch.full_like(j, int(LightState.RED))
    state = torch.where(mine & (within < g + y), torch.full_like(j, int(LightState.YELLOW)), state)
    state = torch.where(mine & (within < g), torch.full_like(j, int(LightState.GREEN)), state)
    return torch.where(mb.light_valid[map_id], state, torch.full_like(state, int(LightState.RED)))


def _wrap(a: torch.Tensor) -> torch.Tensor:
    return torch.remainder(a + torch.pi, 2 * torch.pi) - torch.pi


DRIVABLE = (LaneType.DRIVING, LaneType.PARKING, LaneType.SHOULDER)


def drivable(mb: MapBatch, map_id: torch.Tensor, pos: torch.Tensor, margin: float = 0.0,
             cand: dict | None = None) -> torch.Tensor:
    """Whether each point lies on a driving, parking or shoulder lane (within half width + margin). (Q,) bool.
    ``cand``: precomputed :func:`lane_candidates` of the same points."""
    c = cand if cand is not None else lane_candidates(mb, map_id, pos)
    on = c["ok"] & ~c["beyond"] & (c["dist"] <= c["width"] / 2 + margin)
    typed = torch.zeros_like(on)
    for t in DRIVABLE:
        typed |= c["type"] == int(t)
    return (on & typed).any(-1)


def take(table: torch.Tensor, map_id: torch.Tensor, *idx: torch.Tensor) -> torch.Tensor:
    """``table[map_id, *idx]`` for per-map tables, as one flat ``index_select`` (much faster than advanced
    indexing on CPU). table: (M, D1, ..., Dk, *rest); map_id and idx broadcast to a common shape (...).
    Indices must be in range (clamp -1 padding first). Returns (..., *rest)."""
    k = len(idx)
    dims = table.shape[1 : 1 + k]
    rest = table.shape[1 + k :]
    lin = map_id
    for d, i in zip(dims, idx):
        lin = lin * d + i
    flat = table.reshape(-1, *rest)
    return flat.index_select(0, lin.reshape(-1)).view(*lin.shape, *rest)
