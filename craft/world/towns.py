"""Seeded procedural towns: a CARLA-like urban grid beside a divided highway.

:func:`generate_town` turns a seed into a :class:`~craft.world.map.RoadMap`. The only source of randomness is
``numpy.random.default_rng(seed)``, so one seed and one :class:`TownConfig` always give the same map.

Layout scheme
-------------
Metres, x east, y north, right-hand traffic (a lane's right neighbour is further from the centre line).

**Urban grid.** ``bx x by`` blocks (3..5 x 3..4) with jittered block edges (70..140 m). Streets run along
axis-aligned grid lines; each row / column line has one cross-section (1, 2 or 3 driving lanes per
direction, 13.9 m/s or, for some one-lane streets, 8.3 m/s) so straight movements line up across
junctions; the outer ring shares one 1- or 2-lane cross-section. Interior grid nodes are 4-way junctions,
border nodes T junctions; a few interior street segments are dropped, which turns their end nodes into T
junctions too. The four outer corners are no junctions: the two border streets meeting there form one road
with a rounded corner, so there are no dead ends. Some street segments are curved (a bump or an S-bend whose
ends stay tangent to the grid line). A street side may carry a parking lane or a bike lane right of its
rightmost driving lane.

**Cross-section** of one carriageway side, from the centre line outwards: half the median (highway only),
driving lanes (innermost first), an optional parking / bike lane (or, on the highway, a hard shoulder /
acceleration / deceleration lane), the kerb, a sidewalk (urban streets only).

**Junctions.** Each arm has a *box* distance from the junction centre: the kerb half width of the
perpendicular street on that side plus ``curb_radius``. Outwards along an arm come the junction box, the
crosswalk (``crosswalk_width``), a gap of ``stop_gap`` and then the stop line, where incoming lanes end and
outgoing lanes begin. Connector lanes (``junction`` = id, ``road`` = -1; cubic Bezier curves tangent to the
lane headings) join incoming lane ends to outgoing lane starts: every lane may go straight, the rightmost
lane turns right, the leftmost turns left (on a T's stem, which has no straight movement, the lanes split
between left and right). A junction is SIGNAL (one light per incoming lane; phase 0 for the major axis,
1 for the other), STOP (all-way, or on a T possibly only the minor arm) or UNCONTROLLED (a major through
axis has right of way); priorities are given by :func:`_priority`. Every kind occurs both as a 4-way and as
a T junction in every town. Junction connector speed limits are capped by their curvature
(``turn_lateral_accel``).

**Highway.** A divided 2-3 lane highway (25 m/s) runs along x south of the grid, roughly 1-1.5 km long.
Its two ends bend north (*link* sections, ``ramp_speed``) into the west arm of grid node ``(0, 1)`` and the
east arm of node ``(bx, 1)``; these terminals are signalised 4-way junctions. Each carriageway is split into
sections at ramp points: link, main (with a hard shoulder), deceleration lane, ramp gap, acceleration lane,
main (with a hard shoulder), link; so diverges and merges are lane-graph edges (the deceleration lane is a
successor of the previous section's rightmost lane, the acceleration lane a predecessor of the next
section's rightmost lane; both taper over ``taper_length``). The westbound carriageway, whose right side
faces the grid, gets both ramps from a short two-way ramp road that leaves the south border node
``(i_r, 0)``: the off-ramp leaves the deceleration lane east of it, the on-ramp feeds the acceleration lane
west of it. The eastbound carriageway's right side faces away from the grid, and the map is planar (no
bridges), so its ramps hang off a two-way frontage road that leaves the west border node ``(0, 2)``, runs
around the western highway bend (concentric with it) and approaches the highway from the south.

**Walk network.** Every arm of a junction has a crosswalk across the road between the box and the stop
line; walk nodes sit at its two ends. Corner pieces join the crosswalk ends of neighbouring arms around the
kerb; sidewalks along both sides of every urban street join the crosswalk ends of its two junctions. Each
piece is two lanes, one per direction; a walk lane's successors are all walk lanes leaving its end node
except its own reverse, so the walking graph is connected. All walk lanes have ``road`` = -1 and
``junction`` = -1 (``junction >= 0`` marks vehicle connectors only, which is what the traffic code
relies on); a crosswalk's junction is recorded in the features instead (``junctions[k]["crosswalks"]`` and
per arm in ``junctions[k]["arm_info"][a]["crosswalk"]``).

**Features.** ``extras["features"]`` lists lane and junction ids by what scenario placement needs (see
:func:`_features`); ``extras["seed"]`` and ``extras["config"]`` record the inputs. All JSON-friendly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

from craft.world.map import JunctionKind, LaneType, RawJunction, RawLane, RawLight, RawStop, RoadMap

__all__ = ["TownConfig", "generate_town"]

STRAIGHT, LEFT, RIGHT = 0, 1, 2
TURN_NAMES = {STRAIGHT: "straight", LEFT: "left", RIGHT: "right"}
STEP = 1.0  # sampling step of generated polylines, m


@dataclass(frozen=True)
class TownConfig:
    """Parameters of :func:`generate_town` (ranges are inclusive ``(low, high)`` pairs)."""

    blocks_x: tuple[int, int] = (3, 5)
    """Range of the number of grid blocks along x."""
    blocks_y: tuple[int, int] = (3, 4)
    """Range of the number of grid blocks along y (at least 3: the highway uses border nodes 1 and 2)."""
    block_size: tuple[float, float] = (70.0, 140.0)
    """Range of block edge lengths, street centre line to street centre line, m."""
    lane_width: float = 3.5
    """Width of driving, ramp and highway lanes, m."""
    parking_width: float = 2.5
    """Width of parking lanes, m."""
    bike_width: float = 1.5
    """Width of bike lanes, m."""
    sidewalk_width: float = 2.0
    """Width of sidewalks, m."""
    crosswalk_width: float = 3.0
    """Width of crosswalks, m."""
    shoulder_width: float = 3.0
    """Width of highway hard shoulders, m."""
    curb_radius: float = 5.0
    """Radius of the rounded kerb at junction corners; sets the junction box size, m."""
    stop_gap: float = 1.0
    """Gap between a crosswalk's outer edge and the stop line, m."""
    urban_speed: float = 13.9
    """Speed limit of ordinary urban streets and of the frontage / ramp roads, m/s."""
    slow_speed: float = 8.3
    """Speed limit of slow one-lane streets, parking and bike lanes, m/s."""
    slow_street_prob: float = 0.4
    """Probability that a one-lane street line is slow."""
    street_lanes_probs: tuple[float, float, float] = (0.35, 0.4, 0.25)
    """Probabilities of 1, 2 and 3 lanes per direction for an interior street line."""
    ring_lanes_probs: tuple[float, float] = (0.6, 0.4)
    """Probabilities of 1 and 2 lanes per direction for the outer ring of streets."""
    parking_prob: float = 0.3
    """Probability that a street side has a parking lane."""
    bike_prob: float = 0.25
    """Probability that a street line has bike lanes (on sides without parking)."""
    curve_prob: float = 0.35
    """Probability that a long enough straight street segment is curved (bump or S-bend)."""
    curve_amplitude: float = 12.0
    """Largest lateral excursion of a curved street segment, m."""
    min_curve_radius: float = 25.0
    """Smallest radius of the innermost sidewalk / parking edge of curved streets, m."""
    corner_radius: tuple[float, float] = (30.0, 45.0)
    """Range of the centre-line radius of the rounded outer grid corners, m."""
    drop_arm_prob: float = 0.25
    """Probability that an interior street segment is dropped (its end nodes become T junctions)."""
    kind_probs: tuple[float, float, float] = (0.45, 0.30, 0.25)
    """Probabilities of SIGNAL, STOP and UNCONTROLLED junction control."""
    minor_stop_prob: float = 0.5
    """Probability that a STOP T junction has stop signs on its minor arm only (else on all arms)."""
    green: tuple[float, float] = (10.0, 16.0)
    """Range of the green time per signal phase, s."""
    yellow: float = 3.0
    """Yellow time, s."""
    all_red: float = 1.0
    """All-red time between phases, s."""
    stop_trigger: float = 6.0
    """Length of a stop sign's trigger area at the end of its lane, m."""
    turn_lateral_accel: float = 3.0
    """Lateral acceleration that caps junction connector speed limits: v <= sqrt(a * radius), m/s^2."""
    highway_lanes: tuple[int, int] = (2, 3)
    """Range of highway lanes per direction."""
    highway_speed: float = 25.0
    """Speed limit on the highway's main sections, m/s."""
    ramp_speed: float = 16.7
    """Speed limit on ramps and on the highway's link sections, m/s."""
    highway_length: tuple[float, float] = (1000.0, 1500.0)
    """Range of the highway's length between its two end bends, m (stretched if the ramps need room)."""
    highway_gap: tuple[float, float] = (105.0, 125.0)
    """Range of the distance from the southern border street to the highway centre line, m."""
    highway_median: float = 3.0
    """Width of the median between the highway carriageways, m."""
    accel_length: tuple[float, float] = (120.0, 200.0)
    """Range of acceleration lane lengths, m."""
    decel_length: tuple[float, float] = (80.0, 120.0)
    """Range of deceleration lane lengths, m."""
    taper_length: float = 40.0
    """Length over which acceleration / deceleration lanes merge into / split from the rightmost lane, m."""
    ramp_dx: float = 60.0
    """Along-highway extent of a ramp curve, m."""
    ramp_dy: float = 45.0
    """Across-highway extent of a ramp curve, m."""


# ---------------------------------------------------------------------------------------------- geometry
def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _left(u: np.ndarray) -> np.ndarray:
    """``u`` rotated 90 degrees counter-clockwise (the left normal of a heading)."""
    return np.array([-u[1], u[0]])


def _wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _fillet_path(vertices, radii, step: float = STEP):
    """Dense polyline through ``vertices`` with a circular arc of ``radii[i]`` at interior vertex ``i + 1``.

    Returns ``(points (n, 2), arcs)`` where ``arcs[i] = (first, last)`` point indices of arc ``i``.
    """
    v = [np.asarray(p, dtype=np.float64) for p in vertices]
    out = [v[0][None]]
    count = 1
    arcs = []

    def line(a, b):
        nonlocal count
        d = float(np.linalg.norm(b - a))
        if d < 1e-9:
            return
        n = max(1, math.ceil(d / step))
        t = np.linspace(0.0, 1.0, n + 1)[1:, None]
        out.append(a + t * (b - a))
        count += n

    cur = v[0]
    for i in range(1, len(v) - 1):
        d1, d2 = _unit(v[i] - v[i - 1]), _unit(v[i + 1] - v[i])
        phi = math.atan2(d1[0] * d2[1] - d1[1] * d2[0], float(d1 @ d2))
        r = float(radii[i - 1])
        if abs(phi) < 1e-9 or r <= 0:
            line(cur, v[i])
            cur = v[i]
            arcs.append((count - 1, count - 1))
            continue
        t = r * math.tan(abs(phi) / 2)
        a, b = v[i] - d1 * t, v[i] + d2 * t
        if float((a - cur) @ d1) < -1e-6 or float((v[i + 1] - b) @ d2) < -1e-6:
            raise ValueError(f"fillet radius {r} does not fit at vertex {i}")
        line(cur, a)
        sgn = 1.0 if phi > 0 else -1.0
        c = a + _left(d1) * r * sgn
        a0 = math.atan2(a[1] - c[1], a[0] - c[0])
        n = max(2, math.ceil(r * abs(phi) / step))
        ang = a0 + np.linspace(0.0, phi, n + 1)[1:]
        pts = c + r * np.stack([np.cos(ang), np.sin(ang)], 1)
        pts[-1] = b
        first = count - 1
        out.append(pts)
        count += n
        arcs.append((first, count - 1))
        cur = b
    line(cur, v[-1])
    return np.concatenate(out), arcs


def _bezier(p0, p1, p2, p3, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    mt = 1.0 - t
    return mt**3 * p0 + 3 * mt**2 * t * p1 + 3 * mt * t**2 * p2 + t**3 * p3


def _join(p0, d0, p3, d3, k: float, leg: float | None = None, step: float = STEP / 2) -> np.ndarray:
    """Cubic Bezier from ``p0`` (leaving along unit ``d0``) to ``p3`` (arriving along unit ``d3``).

    When the two tangent lines meet at ``V`` ahead of ``p0`` and behind ``p3``, the handles are ``k`` times the
    distances to ``V`` (``k`` ~ 0.55 approximates a circular arc); with ``leg`` the curve only starts ``leg``
    before ``V`` and ends ``leg`` after it (straight lines before and after), so with ``k`` = 0.5523 it is a
    circular arc of radius ``leg`` for a right angle. Otherwise (parallel tangents) the handles are ``k`` times
    the chord.
    """
    p0, p3, d0, d3 = (np.asarray(x, dtype=np.float64) for x in (p0, p3, d0, d3))
    chord = float(np.linalg.norm(p3 - p0))
    h0 = h3 = k * chord
    cross = d0[0] * d3[1] - d0[1] * d3[0]
    head, tail = [], []
    if abs(cross) > 1e-3:
        a, b = np.linalg.solve(np.array([[d0[0], d3[0]], [d0[1], d3[1]]]), p3 - p0)
        if a > 0.1 and b > 0.1:
            if leg is not None and leg < min(a, b):
                q0, q3 = p0 + d0 * (a - leg), p3 - d3 * (b - leg)
                head = [np.linspace(p0, q0, max(2, math.ceil((a - leg) / step) + 1))[:-1]]
                tail = [np.linspace(q3, p3, max(2, math.ceil((b - leg) / step) + 1))[1:]]
                p0, p3, a, b = q0, q3, leg, leg
                chord = float(np.linalg.norm(p3 - p0))
            h0, h3 = k * a, k * b
    n = max(8, math.ceil((chord + 0.5 * (h0 + h3)) / step) + 1)
    pts = _bezier(p0, p0 + h0 * d0, p3 - h3 * d3, p3, n)
    pts[0], pts[-1] = p0, p3
    return np.concatenate(head + [pts] + tail)


def _max_curvature(p: np.ndarray) -> float:
    d1 = np.gradient(p, axis=0)
    d2 = np.gradient(d1, axis=0)
    num = np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])
    den = np.maximum(np.linalg.norm(d1, axis=1) ** 3, 1e-12)
    return float((num / den)[1:-1].max()) if len(p) > 2 else 0.0


def _end_dir(p: np.ndarray) -> np.ndarray:
    return _unit(p[-1] - p[-2])


def _start_dir(p: np.ndarray) -> np.ndarray:
    return _unit(p[1] - p[0])


class _Centreline:
    """A dense road reference line: arc length, unit tangents and left normals at its samples."""

    def __init__(self, points: np.ndarray):
        self.p = np.asarray(points, dtype=np.float64)
        self.s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(self.p, axis=0), axis=1))])
        t = np.gradient(self.p, axis=0)
        self.t = t / np.linalg.norm(t, axis=1, keepdims=True)
        self.n = np.stack([-self.t[:, 1], self.t[:, 0]], 1)

    @property
    def length(self) -> float:
        return float(self.s[-1])

    def reversed(self) -> "_Centreline":
        return _Centreline(self.p[::-1].copy())

    def _interp(self, arr: np.ndarray, s: np.ndarray) -> np.ndarray:
        return np.stack([np.interp(s, self.s, arr[:, 0]), np.interp(s, self.s, arr[:, 1])], 1)

    def track(self, s0: float, s1: float, offset) -> np.ndarray:
        """Points at lateral ``offset`` (left positive; a float or a function of arc length) for s in [s0, s1].

        The end points are interpolated exactly at ``s0`` and ``s1``, so tracks cut at the same station meet.
        """
        inner = (self.s > s0 + 1e-3) & (self.s < s1 - 1e-3)
        ss = np.concatenate([[s0], self.s[inner], [s1]])
        pts = self._interp(self.p, ss)
        nrm = self._interp(self.n, ss)
        nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
        off = offset(ss) if callable(offset) else np.full(len(ss), float(offset))
        return pts + nrm * off[:, None]

    def turning(self, s0: float, s1: float) -> float:
        """Total absolute heading change between stations s0 and s1, rad."""
        m = (self.s >= s0) & (self.s <= s1)
        h = np.unwrap(np.arctan2(self.t[m, 1], self.t[m, 0]))
        return float(np.abs(np.diff(h)).sum()) if len(h) > 1 else 0.0


# ---------------------------------------------------------------------------------------------- layout model
@dataclass(eq=False)
class _Node:
    """A grid node that becomes a junction (>= 3 arms)."""

    key: tuple
    pos: np.ndarray
    arms: list = field(default_factory=list)
    jid: int = -1
    kind: JunctionKind = JunctionKind.UNCONTROLLED
    terminal: bool = False  # highway terminal: always signalised
    major: np.ndarray | None = None  # unit vector along the major (through) axis
    minor_stop: bool = False  # STOP junction with stop signs on the minor arm only


@dataclass(eq=False)
class _Road:
    """A two-way road between two junction arms (or an arm and a free end)."""

    kind: str  # 'street', 'corner', 'highway', 'frontage', 'ramp'
    n_fwd: int
    n_bwd: int
    speed: float
    curb_fwd: float  # kerb offset of the forward side from the centre line, m
    curb_bwd: float
    side_fwd: str = ""  # '' | 'parking' | 'bike' (next to the rightmost lane)
    side_bwd: str = ""
    sidewalks: bool = False
    median: float = 0.0
    via: list = field(default_factory=list)  # interior vertices of the centre line
    radii: list = field(default_factory=list)  # fillet radius per interior vertex
    wiggle: tuple | None = None  # (shape 'bump' | 's', sign) for curved straight streets
    start: "_Arm | None" = None
    end: "_Arm | None" = None
    start_point: np.ndarray | None = None  # used when there is no start / end arm
    end_point: np.ndarray | None = None
    cl: _Centreline | None = None
    arcs: list = field(default_factory=list)
    fwd: list = field(default_factory=list)  # per section: dict of lane ids
    bwd: list = field(default_factory=list)

    def curb(self, forward: bool) -> float:
        return self.curb_fwd if forward else self.curb_bwd


@dataclass(eq=False)
class _Arm:
    """One road end at a junction; ``u`` points away from the junction centre."""

    node: _Node
    road: _Road
    at_start: bool
    u: np.ndarray
    box: float = 0.0
    incoming: list = field(default_factory=list)  # lane ids, innermost (leftmost) first
    outgoing: list = field(default_factory=list)
    walk_left: int = -1  # walk node ids at the crosswalk ends (left / right looking outwards)
    walk_right: int = -1

    @property
    def curb_right(self) -> float:
        return self.road.curb(self.at_start)

    @property
    def curb_left(self) -> float:
        return self.road.curb(not self.at_start)


def _attach(road: _Road, node: _Node, at_start: bool, u) -> _Arm:
    arm = _Arm(node, road, at_start, _unit(u))
    node.arms.append(arm)
    if at_start:
        road.start = arm
    else:
        road.end = arm
    return arm


def _new_road(cfg: TownConfig, kind, n_fwd, n_bwd, speed, side_fwd="", side_bwd="", median=0.0, **kw) -> _Road:
    side_w = {"": 0.0, "parking": cfg.parking_width, "bike": cfg.bike_width}
    base = median / 2
    return _Road(
        kind, n_fwd, n_bwd, speed,
        curb_fwd=base + n_fwd * cfg.lane_width + side_w[side_fwd],
        curb_bwd=base + n_bwd * cfg.lane_width + side_w[side_bwd],
        side_fwd=side_fwd, side_bwd=side_bwd, median=median, **kw,
    )


@dataclass
class _Grid:
    """The urban grid: street line coordinates, junction nodes by (i, j), and all roads."""

    xs: np.ndarray
    ys: np.ndarray
    nodes: dict
    roads: list


@dataclass
class _Highway:
    """The highway road, its two ramp roads and where the ramps sit (x positions and lane lengths)."""

    road: _Road
    frontage: _Road
    ramp_road: _Road
    n: int
    x_w: float
    r_bottom: float
    x_f: float  # x of the frontage road's approach (eastbound ramps)
    x_r: float  # x of the ramp road (westbound ramps)
    acc_e: float
    dec_e: float
    acc_w: float
    dec_w: float


class _Town:
    """Accumulates raw lanes, junctions, signals and feature tags while a town is built."""

    def __init__(self, cfg: TownConfig):
        self.cfg = cfg
        self.lanes: list[RawLane] = []
        self.junctions: list[RawJunction] = []
        self.lights: list[RawLight] = []
        self.stops: list[RawStop] = []
        self.tags: dict[str, list[int]] = defaultdict(list)
        self.junction_info: list[dict] = []
        self._road = 0

    def new_road(self) -> int:
        self._road += 1
        return self._road - 1

    def add(self, points, width, speed, type=LaneType.DRIVING, road=-1, junction=-1, **kw) -> int:
        self.lanes.append(RawLane(np.asarray(points, dtype=np.float64), float(width), float(speed), type,
                                  road, junction, **kw))
        return len(self.lanes) - 1

    def pair(self, left: int, right: int) -> None:
        """Make ``right`` the right neighbour of ``left`` and ``left`` the left neighbour of ``right``."""
        self.lanes[left].right = right
        self.lanes[right].left = left

    def end(self, lane: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.lanes[lane].points
        return p[-1], _end_dir(p)

    def start(self, lane: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.lanes[lane].points
        return p[0], _start_dir(p)


# ---------------------------------------------------------------------------------------------- grid layout
def _grid_layout(cfg: TownConfig, rng: np.random.Generator) -> _Grid:
    """Block sizes, street cross-sections, dropped arms, rounded corners and curved segments."""
    bx = int(rng.integers(cfg.blocks_x[0], cfg.blocks_x[1] + 1))
    by = int(rng.integers(max(3, cfg.blocks_y[0]), max(3, cfg.blocks_y[1]) + 1))
    xs = np.concatenate([[0.0], np.cumsum(rng.uniform(*cfg.block_size, size=bx))])
    ys = np.concatenate([[0.0], np.cumsum(rng.uniform(*cfg.block_size, size=by))])
    corners = {(0, 0), (bx, 0), (0, by), (bx, by)}
    nodes = {
        (i, j): _Node((i, j), np.array([xs[i], ys[j]]))
        for i in range(bx + 1)
        for j in range(by + 1)
        if (i, j) not in corners
    }

    # street lines: ('row', j) / ('col', i) -> lanes per direction, speed, bike flag
    ring_n = 1 + int(rng.choice(2, p=cfg.ring_lanes_probs))
    lines = {}
    interior = [("row", j) for j in range(1, by)] + [("col", i) for i in range(1, bx)]
    for key in [("row", j) for j in range(by + 1)] + [("col", i) for i in range(bx + 1)]:
        ring = key in (("row", 0), ("row", by), ("col", 0), ("col", bx))
        n = ring_n if ring else 1 + int(rng.choice(3, p=cfg.street_lanes_probs))
        bike, slow = bool(rng.random() < cfg.bike_prob), bool(rng.random() < cfg.slow_street_prob)
        lines[key] = {"n": n, "bike": bike, "slow": slow}
    if all(lines[k]["n"] == 1 for k in interior):  # at least one multi-lane avenue
        lines[interior[int(rng.integers(len(interior)))]]["n"] = 2 + int(rng.integers(2))
    if ring_n > 1 and all(lines[k]["n"] > 1 for k in interior):  # at least one two-way single-lane street
        lines[interior[int(rng.integers(len(interior)))]]["n"] = 1
    for key in (("row", 0), ("row", by), ("col", 0), ("col", bx)):  # the ring shares one cross-section
        lines[key].update(lines[("row", 0)])
    for spec in lines.values():
        spec["speed"] = cfg.slow_speed if spec["n"] == 1 and spec["slow"] else cfg.urban_speed

    # segments between neighbouring nodes (corner nodes are skipped: corner roads join their neighbours)
    segs = []
    for j in range(by + 1):
        for i in range(bx):
            a, b = (i, j), (i + 1, j)
            if a not in corners and b not in corners:
                segs.append((a, b, ("row", j)))
    for i in range(bx + 1):
        for j in range(by):
            a, b = (i, j), (i, j + 1)
            if a not in corners and b not in corners:
                segs.append((a, b, ("col", i)))

    # drop some interior segments (each interior node loses at most one arm)
    def is_inner(k):
        return 1 <= k[0] <= bx - 1 and 1 <= k[1] <= by - 1

    order = rng.permutation(len(segs))
    lost, dropped = set(), set()
    for idx in order:
        a, b, _ = segs[idx]
        if is_inner(a) and is_inner(b) and a not in lost and b not in lost and rng.random() < cfg.drop_arm_prob:
            lost.update((a, b))
            dropped.add(int(idx))
    segs = [s for k, s in enumerate(segs) if k not in dropped]

    def sides(length):
        out = []
        for _ in range(2):
            r = rng.random()
            out.append("parking" if (r < cfg.parking_prob and length >= 80.0) else "")
        return out

    roads = []
    centre = np.array([xs[-1] / 2, ys[-1] / 2])
    for a, b, line in segs:
        spec = lines[line]
        pa, pb = nodes[a].pos, nodes[b].pos
        length = float(np.linalg.norm(pb - pa))
        sf, sb = sides(length)
        sf = sf or ("bike" if spec["bike"] else "")
        sb = sb or ("bike" if spec["bike"] else "")
        wiggle = None
        if rng.random() < cfg.curve_prob and length >= 80.0:
            shape = "bump" if rng.random() < 0.6 else "s"
            sign = 1.0 if rng.random() < 0.5 else -1.0
            on_border = line in (("row", 0), ("row", by), ("col", 0), ("col", bx))
            if on_border and shape == "bump":  # bulge outwards, away from the blocks
                mid = (pa + pb) / 2
                sign = 1.0 if float(_left(_unit(pb - pa)) @ (mid - centre)) > 0 else -1.0
            wiggle = (shape, sign)
        road = _new_road(cfg, "street", spec["n"], spec["n"], spec["speed"], sf, sb, sidewalks=True, wiggle=wiggle)
        _attach(road, nodes[a], True, pb - pa)
        _attach(road, nodes[b], False, pa - pb)
        roads.append(road)

    # rounded outer corners: one road from the node before the corner to the node after it
    ring = lines[("row", 0)]
    for a, c, b in (
        ((1, 0), (0, 0), (0, 1)),
        ((bx, 1), (bx, 0), (bx - 1, 0)),
        ((bx - 1, by), (bx, by), (bx, by - 1)),
        ((0, by - 1), (0, by), (1, by)),
    ):
        cp = np.array([xs[c[0]], ys[c[1]]])
        pa, pb = nodes[a].pos, nodes[b].pos
        sf, sb = sides(999.0)
        sf = sf or ("bike" if ring["bike"] else "")
        sb = sb or ("bike" if ring["bike"] else "")
        road = _new_road(cfg, "corner", ring["n"], ring["n"], ring["speed"], sf, sb, sidewalks=True, via=[cp],
                         radii=[float(rng.uniform(*cfg.corner_radius))])
        _attach(road, nodes[a], True, cp - pa)
        _attach(road, nodes[b], False, cp - pb)
        roads.append(road)
    return _Grid(xs, ys, nodes, roads)


# ---------------------------------------------------------------------------------------------- highway layout
def _highway_layout(cfg: TownConfig, rng: np.random.Generator, grid: _Grid) -> _Highway:
    """Place the highway, its end links, the frontage road and the ramp road; attach them to grid nodes."""
    xs, ys, nodes = grid.xs, grid.ys, grid.nodes
    bx = len(xs) - 1
    w = cfg.lane_width
    n = int(rng.integers(cfg.highway_lanes[0], cfg.highway_lanes[1] + 1))
    m = cfg.highway_median
    y_extra = m / 2 + (n + 0.5) * w  # centre offset of acceleration / deceleration lanes
    y_h = ys[0] - float(rng.uniform(*cfg.highway_gap))
    r_bottom, r_top = 80.0, 60.0
    acc_e, acc_w = rng.uniform(*cfg.accel_length, size=2)
    dec_e, dec_w = rng.uniform(*cfg.decel_length, size=2)
    dx, dy = cfg.ramp_dx, cfg.ramp_dy
    plain = 80.0 + 30.0  # shoulder section + link margin
    i_r = bx // 2 if bx > 2 else 1
    x_r = float(xs[i_r])
    length = float(rng.uniform(*cfg.highway_length))
    xc = xs[-1] / 2
    x_w = min(xc - length / 2, xs[0] - 250.0, x_r - w / 2 - dx - acc_w - plain - r_bottom)
    x_e = max(xc + length / 2, xs[-1] + 250.0, x_r + w / 2 + dx + dec_w + plain + r_bottom)
    x_f = x_w + r_bottom + plain + dec_e + dx + w / 2 + float(rng.uniform(0.0, 60.0))
    x_e = max(x_e, x_f + w / 2 + dx + acc_e + plain + r_bottom)

    hw = _new_road(cfg, "highway", n, n, cfg.highway_speed, median=m,
                   via=[(x_w, ys[1]), (x_w, y_h), (x_e, y_h), (x_e, ys[1])],
                   radii=[r_top, r_bottom, r_bottom, r_top])
    west, east = nodes[(0, 1)], nodes[(bx, 1)]
    _attach(hw, west, True, (-1.0, 0.0))
    _attach(hw, east, False, (1.0, 0.0))
    west.terminal = east.terminal = True

    # frontage road for the eastbound ramps: around the west bend, concentric with it
    r_turn = 40.0
    y_end_e = y_h - y_extra - dy
    d_f = y_h - (y_end_e - r_turn - 15.0)  # offset of the frontage from the highway centre line
    fr = _new_road(cfg, "frontage", 1, 1, cfg.urban_speed,
                   via=[(x_w - d_f, ys[2]), (x_w - d_f, y_h - d_f), (x_f, y_h - d_f)],
                   radii=[40.0, r_bottom + d_f, r_turn], end_point=np.array([x_f, y_end_e]))
    _attach(fr, nodes[(0, 2)], True, (-1.0, 0.0))

    # ramp road for the westbound ramps, straight down from a south border node
    rr = _new_road(cfg, "ramp", 1, 1, cfg.urban_speed, end_point=np.array([x_r, y_h + y_extra + dy]))
    _attach(rr, nodes[(i_r, 0)], True, (0.0, -1.0))
    grid.roads += [hw, fr, rr]
    return _Highway(hw, fr, rr, n, x_w, r_bottom, x_f, x_r, acc_e, dec_e, acc_w, dec_w)


# ---------------------------------------------------------------------------------------------- control
def _assign_control(cfg: TownConfig, rng: np.random.Generator, nodes: list[_Node]) -> None:
    """Junction ids, kinds (every kind as a 4-way and a T), major axes and stop arrangement."""
    for j, nd in enumerate(nodes):
        nd.jid = j
        nd.arms.sort(key=lambda a: math.atan2(a.u[1], a.u[0]))
    kinds: dict[int, JunctionKind] = {nd.jid: JunctionKind.SIGNAL for nd in nodes if nd.terminal}
    for k in (JunctionKind.SIGNAL, JunctionKind.STOP, JunctionKind.UNCONTROLLED):
        for arms in (3, 4):
            if any(kinds.get(nd.jid) == k and len(nd.arms) == arms for nd in nodes):
                continue
            free = [nd.jid for nd in nodes if nd.jid not in kinds and len(nd.arms) == arms]
            if free:
                kinds[free[int(rng.integers(len(free)))]] = k
    order = (JunctionKind.SIGNAL, JunctionKind.STOP, JunctionKind.UNCONTROLLED)
    for nd in nodes:
        if nd.jid not in kinds:
            kinds[nd.jid] = order[int(rng.choice(3, p=cfg.kind_probs))]
        nd.kind = kinds[nd.jid]
        # major axis: a T's through road; on a 4-way a random one of the two axes
        if len(nd.arms) == 3:
            pairs = [(a, b) for a in nd.arms for b in nd.arms if a is not b]
            nd.major = min(pairs, key=lambda ab: float(ab[0].u @ ab[1].u))[0].u  # the two opposite arms
        else:
            nd.major = nd.arms[int(rng.integers(len(nd.arms)))].u
        nd.minor_stop = bool(nd.kind == JunctionKind.STOP and len(nd.arms) == 3 and rng.random() < cfg.minor_stop_prob)


def _on_major(nd: _Node, arm: _Arm) -> bool:
    return abs(float(arm.u @ nd.major)) > 0.7


def _priority(nd: _Node, arm: _Arm, turn: int) -> int:
    """Right-of-way rank of a connector (higher goes first).

    SIGNAL: straight / right 2, left 1 (left turns yield to oncoming traffic). UNCONTROLLED and minor-stop
    T junctions: major-axis straight / right 2, major left 1, minor arms 0. All-way STOP: every movement 1.
    """
    if nd.kind == JunctionKind.SIGNAL:
        return 1 if turn == LEFT else 2
    if nd.kind == JunctionKind.STOP and not nd.minor_stop:
        return 1
    if not _on_major(nd, arm):
        return 0
    return 1 if turn == LEFT else 2


def _junction_boxes(cfg: TownConfig, nodes: list[_Node]) -> None:
    """Box distance of every arm: kerb of the perpendicular street on each side plus the kerb radius."""
    for nd in nodes:
        k = len(nd.arms)
        for i, a in enumerate(nd.arms):
            nxt, prv = nd.arms[(i + 1) % k], nd.arms[(i - 1) % k]
            need = 0.0
            if abs(float(a.u @ nxt.u)) < 0.5:
                need = max(need, nxt.curb_right)
            if abs(float(a.u @ prv.u)) < 0.5:
                need = max(need, prv.curb_left)
            a.box = need + cfg.curb_radius


def _reach(cfg: TownConfig, arm: _Arm) -> float:
    """Distance from the junction centre to the arm's stop line."""
    return arm.box + cfg.crosswalk_width + cfg.stop_gap


# ---------------------------------------------------------------------------------------------- roads
_S_SHAPE = np.linspace(0.0, 1.0, 2001)
_SHAPES = {
    "bump": np.sin(np.pi * _S_SHAPE) ** 2,
    "s": (np.sin(2 * np.pi * _S_SHAPE) - 0.5 * np.sin(4 * np.pi * _S_SHAPE)) / 1.299038105676658,
}
_WIGGLE_END = 0.1
_SHAPE_F2 = {k: float(np.abs(np.gradient(np.gradient(v, _S_SHAPE), _S_SHAPE)).max()) for k, v in _SHAPES.items()}


def _centrelines(cfg: TownConfig, roads: list[_Road]) -> None:
    """Centre line of every road, from stop line to stop line (or free end), wiggled or filleted."""
    for r in roads:
        p0 = r.start.node.pos + r.start.u * _reach(cfg, r.start) if r.start else r.start_point
        p1 = r.end.node.pos + r.end.u * _reach(cfg, r.end) if r.end else r.end_point
        pts = None
        if r.wiggle is not None:
            shape, sign = r.wiggle
            length = float(np.linalg.norm(p1 - p0))
            r_req = cfg.min_curve_radius + max(r.curb_fwd, r.curb_bwd) + cfg.sidewalk_width
            span = (1.0 - 2 * _WIGGLE_END) * length  # the first and last 10 % stay straight
            amp = min(cfg.curve_amplitude, 0.12 * length, span**2 / (r_req * _SHAPE_F2[shape]))
            if amp >= 3.0:
                t = np.linspace(0.0, 1.0, math.ceil(length / STEP) + 1)
                f = np.interp((t - _WIGGLE_END) / (1.0 - 2 * _WIGGLE_END), _S_SHAPE, _SHAPES[shape])
                u = _unit(p1 - p0)
                pts = p0 + t[:, None] * (p1 - p0) + (sign * amp * f)[:, None] * _left(u)
            else:
                r.wiggle = None
        if pts is None:
            pts, r.arcs = _fillet_path([p0] + [np.asarray(v, float) for v in r.via] + [p1], r.radii)
        r.cl = _Centreline(pts)


@dataclass
class _Section:
    """A stretch [s0, s1] of one carriageway side with a fixed lane layout."""

    s0: float
    s1: float
    speed: float
    side: str = ""  # '' | 'parking' | 'bike'
    shoulder: bool = False
    extra: str = ""  # '' | 'decel' | 'accel'
    tag: str = ""  # feature tag of the driving lanes ('highway', 'link', ...)


def _carriageway(town: _Town, cl: _Centreline, n: int, median: float, sections: list[_Section]) -> list[dict]:
    """Lanes of one side of a road (``cl`` in its direction of travel, lanes on its right)."""
    cfg = town.cfg
    w = cfg.lane_width
    edge = median / 2 + n * w
    out: list[dict] = []
    prev = None
    for sec in sections:
        road = town.new_road()
        drive = [
            town.add(cl.track(sec.s0, sec.s1, -(median / 2 + (k + 0.5) * w)), w, sec.speed, road=road)
            for k in range(n)
        ]
        for k in range(1, n):
            town.pair(drive[k - 1], drive[k])
        info = {"drive": drive, "extra": -1, "shoulder": -1, "side": -1, "sec": sec}
        outer = drive[-1]
        if sec.extra:
            full, merged = -(edge + w / 2), -(edge - w / 2)
            taper = min(cfg.taper_length, (sec.s1 - sec.s0) / 2)
            if sec.extra == "decel":
                off = lambda s, s0=sec.s0: merged + (full - merged) * _smoothstep((s - s0) / taper)  # noqa: E731
            else:
                off = lambda s, s1=sec.s1: merged + (full - merged) * _smoothstep((s1 - s) / taper)  # noqa: E731
            x = town.add(cl.track(sec.s0, sec.s1, off), w, sec.speed, road=road)
            town.pair(outer, x)
            info["extra"] = x
        if sec.shoulder:
            sw = cfg.shoulder_width
            x = town.add(cl.track(sec.s0, sec.s1, -(edge + sw / 2)), sw, sec.speed, LaneType.SHOULDER, road=road)
            town.pair(outer, x)
            info["shoulder"] = x
        if sec.side == "parking" and sec.s1 - sec.s0 > 30.0:
            pw, inset = cfg.parking_width, 8.0
            x = town.add(cl.track(sec.s0 + inset, sec.s1 - inset, -(edge + pw / 2)), pw, cfg.slow_speed,
                         LaneType.PARKING, road=road)
            town.pair(outer, x)
            info["side"] = x
        elif sec.side == "bike":
            bw = cfg.bike_width
            x = town.add(cl.track(sec.s0, sec.s1, -(edge + bw / 2)), bw, cfg.slow_speed, LaneType.BIKE, road=road)
            town.pair(outer, x)
            info["side"] = x
        if prev is not None:
            for k in range(n):
                town.lanes[prev["drive"][k]].successors.append(drive[k])
            if prev["sec"].extra == "accel":
                town.lanes[prev["extra"]].successors.append(drive[-1])
            if sec.extra == "decel":
                town.lanes[prev["drive"][-1]].successors.append(info["extra"])
            if prev["shoulder"] >= 0 and info["shoulder"] >= 0:
                town.lanes[prev["shoulder"]].successors.append(info["shoulder"])
        out.append(info)
        prev = info
    return out


def _build_road(town: _Town, r: _Road, fwd_sections=None, bwd_sections=None) -> None:
    """Lanes of both sides of a road; links the arms' incoming / outgoing lanes and ``left_opposite``."""
    L = r.cl.length
    fwd_sections = fwd_sections or [_Section(0.0, L, r.speed, side=r.side_fwd, tag=r.kind)]
    bwd_sections = bwd_sections or [_Section(0.0, L, r.speed, side=r.side_bwd, tag=r.kind)]
    rcl = r.cl.reversed()
    r.fwd = _carriageway(town, r.cl, r.n_fwd, r.median, fwd_sections)
    r.bwd = _carriageway(town, rcl, r.n_bwd, r.median, bwd_sections)
    if r.median == 0 and len(r.fwd) == 1 and len(r.bwd) == 1:
        a, b = r.fwd[0]["drive"][0], r.bwd[0]["drive"][0]
        town.lanes[a].left_opposite = b
        town.lanes[b].left_opposite = a
    if r.start is not None:
        r.start.outgoing = list(r.fwd[0]["drive"])
        r.start.incoming = list(r.bwd[-1]["drive"])
    if r.end is not None:
        r.end.incoming = list(r.fwd[-1]["drive"])
        r.end.outgoing = list(r.bwd[0]["drive"])
    # feature tags
    two_way_single = r.median == 0 and r.n_fwd == 1 and r.n_bwd == 1
    for cl, secs in ((r.cl, r.fwd), (rcl, r.bwd)):
        for info in secs:
            sec = info["sec"]
            drive = info["drive"]
            if two_way_single:
                town.tags["two_way_single_lane"] += drive
            if len(drive) > 1:
                town.tags["multi_lane"] += drive
            if sec.tag in ("highway",):
                town.tags["highway"] += drive
            if sec.tag == "link":
                town.tags["highway_links"] += drive
            if sec.tag in ("frontage", "ramp"):
                town.tags["ramp_roads"] += drive
            if sec.extra == "accel":
                town.tags["acceleration_lanes"].append(info["extra"])
            if sec.extra == "decel":
                town.tags["deceleration_lanes"].append(info["extra"])
            if info["shoulder"] >= 0:
                town.tags["shoulders"].append(info["shoulder"])
            if info["side"] >= 0:
                town.tags["parking" if sec.side == "parking" else "bike"].append(info["side"])
            if cl.turning(sec.s0, sec.s1) > 0.2:
                town.tags["curves"] += drive


def _highway_sections(cfg: TownConfig, hw: _Highway) -> tuple[list[_Section], list[_Section]]:
    """Sections of both carriageways, cut at the ramp points (stations along each side's travel direction)."""
    cl = hw.road.cl
    S = cl.length
    w = cfg.lane_width
    bl_end = float(cl.s[hw.road.arcs[1][1]])  # end of the south-west bend
    br_start = float(cl.s[hw.road.arcs[2][0]])  # start of the south-east bend

    def s_of(x):  # forward station of a point on the main straight
        return bl_end + (x - (hw.x_w + hw.r_bottom))

    def sections(stations, speeds_tags):
        return [_Section(a, b, *st) for a, b, st in zip(stations[:-1], stations[1:], speeds_tags)]

    link = (cfg.ramp_speed, "", False, "", "link")
    main = (cfg.highway_speed, "", True, "", "highway")
    gap = (cfg.highway_speed, "", False, "", "highway")
    dec = (cfg.highway_speed, "", False, "decel", "highway")
    acc = (cfg.highway_speed, "", False, "accel", "highway")
    layout = [link, main, dec, gap, acc, main, link]
    x_d1 = hw.x_f - w / 2 - cfg.ramp_dx
    x_a0 = hw.x_f + w / 2 + cfg.ramp_dx
    fwd = [0.0, bl_end + 30.0, s_of(x_d1 - hw.dec_e), s_of(x_d1), s_of(x_a0), s_of(x_a0) + hw.acc_e,
           br_start - 30.0, S]
    x_d1 = hw.x_r + w / 2 + cfg.ramp_dx
    x_a0 = hw.x_r - w / 2 - cfg.ramp_dx
    bwd = [0.0, S - br_start + 30.0, S - s_of(x_d1 + hw.dec_w), S - s_of(x_d1), S - s_of(x_a0),
           S - s_of(x_a0) + hw.acc_w, S - bl_end - 30.0, S]
    for st in (fwd, bwd):
        if np.any(np.diff(st) < 20.0):
            raise AssertionError(f"highway sections out of order: {np.round(st, 1)}")
    return sections(fwd, layout), sections(bwd, layout)


def _build_ramps(town: _Town, hw: _Highway) -> None:
    """On- and off-ramp curves between the highway's acceleration / deceleration lanes and the ramp roads."""
    cfg = town.cfg
    eb, wb = hw.road.fwd, hw.road.bwd
    pairs = [
        # (from lane, to lane, tag)
        (hw.frontage.fwd[0]["drive"][0], eb[4]["extra"], "on_ramps"),
        (eb[2]["extra"], hw.frontage.bwd[0]["drive"][0], "off_ramps"),
        (hw.ramp_road.fwd[0]["drive"][0], wb[4]["extra"], "on_ramps"),
        (wb[2]["extra"], hw.ramp_road.bwd[0]["drive"][0], "off_ramps"),
    ]
    for a, b, tag in pairs:
        p0, d0 = town.end(a)
        p3, d3 = town.start(b)
        pts = _join(p0, d0, p3, d3, 0.55, step=STEP)
        x = town.add(pts, cfg.lane_width, cfg.ramp_speed, road=town.new_road(), successors=[b])
        town.lanes[a].successors.append(x)
        town.tags[tag].append(x)
        town.tags["curves"].append(x)


# ---------------------------------------------------------------------------------------------- junctions
def _build_junction(town: _Town, rng: np.random.Generator, nd: _Node) -> None:
    """Connectors, signals / stop signs and the RawJunction of one node."""
    cfg = town.cfg
    j = nd.jid
    conns = {STRAIGHT: [], LEFT: [], RIGHT: []}
    for a in nd.arms:
        moves = {}
        back = math.atan2(-a.u[1], -a.u[0])
        for b in nd.arms:
            if b is a:
                continue
            ang = _wrap(math.atan2(b.u[1], b.u[0]) - back)
            if abs(ang) < math.pi / 4:
                moves[STRAIGHT] = b
            elif math.pi / 4 <= ang < 3 * math.pi / 4:
                moves[LEFT] = b
            elif -3 * math.pi / 4 < ang <= -math.pi / 4:
                moves[RIGHT] = b
        n_in = len(a.incoming)
        for i, lane in enumerate(a.incoming):
            targets = []
            if STRAIGHT in moves:
                out = moves[STRAIGHT].outgoing
                targets.append((STRAIGHT, out[min(i, len(out) - 1)]))
            if LEFT in moves and (i == 0 or (STRAIGHT not in moves and i < n_in / 2)):
                out = moves[LEFT].outgoing
                targets.append((LEFT, out[min(i, len(out) - 1)]))
            if RIGHT in moves and (i == n_in - 1 or (STRAIGHT not in moves and i >= n_in / 2)):
                out = moves[RIGHT].outgoing
                targets.append((RIGHT, out[max(0, len(out) - n_in + i)]))
            for turn, target in targets:
                p0, d0 = town.end(lane)
                p3, d3 = town.start(target)
                if turn == RIGHT:  # circular arc concentric with the kerb, half a lane inside it
                    pts = _join(p0, d0, p3, d3, 0.5523, leg=cfg.curb_radius + cfg.lane_width / 2)
                else:
                    pts = _join(p0, d0, p3, d3, 0.55 if turn == LEFT else 0.45)
                speed = min(town.lanes[lane].speed_limit, town.lanes[target].speed_limit)
                kappa = _max_curvature(pts)
                if kappa > 1e-4:
                    speed = min(speed, max(3.0, math.sqrt(cfg.turn_lateral_accel / kappa)))
                c = town.add(pts, town.lanes[lane].width, speed, junction=j, successors=[target], turn=turn,
                             priority=_priority(nd, a, turn))
                town.lanes[lane].successors.append(c)
                conns[turn].append(c)
    # control
    arm_info = []
    flip = int(rng.integers(2))
    if nd.kind == JunctionKind.SIGNAL:
        green = float(rng.uniform(*cfg.green))
        cycle = 2 * (green + cfg.yellow + cfg.all_red)
        offset = float(rng.uniform(0.0, cycle))
    else:
        green, offset = float(np.mean(cfg.green)), 0.0
    for a in nd.arms:
        major = _on_major(nd, a)
        phase = -1
        if nd.kind == JunctionKind.SIGNAL:
            phase = (0 if major else 1) ^ flip
            for lane in a.incoming:
                town.lights.append(RawLight(lane, j, phase))
        stop = nd.kind == JunctionKind.STOP and not (nd.minor_stop and major)
        if stop:
            for lane in a.incoming:
                town.stops.append(RawStop(lane, j, cfg.stop_trigger))
        arm_info.append({
            "direction": [float(a.u[0]), float(a.u[1])],
            "road_kind": a.road.kind,
            "incoming": list(a.incoming),
            "outgoing": list(a.outgoing),
            "major": bool(major),
            "phase": int(phase),
            "stop": bool(stop),
            "crosswalk": [],
        })
    radius = max(_reach(cfg, a) for a in nd.arms)
    town.junctions.append(RawJunction((float(nd.pos[0]), float(nd.pos[1])), float(radius), nd.kind, green=green,
                                      yellow=cfg.yellow, all_red=cfg.all_red, n_phases=2, offset=offset))
    town.junction_info.append({
        "id": j,
        "kind": int(nd.kind),
        "kind_name": nd.kind.name,
        "arms": len(nd.arms),
        "center": [float(nd.pos[0]), float(nd.pos[1])],
        "radius": float(radius),
        "terminal": bool(nd.terminal),
        "minor_stop": bool(nd.minor_stop),
        "incoming": [x for a in nd.arms for x in a.incoming],
        "outgoing": [x for a in nd.arms for x in a.outgoing],
        "connectors": {TURN_NAMES[t]: v for t, v in conns.items()},
        "arm_info": arm_info,
        "crosswalks": [],
    })


# ---------------------------------------------------------------------------------------------- walk network
def _build_walks(town: _Town, nodes: list[_Node], roads: list[_Road]) -> None:
    """Crosswalks, corner pieces and sidewalks, each as a pair of opposite lanes, joined at walk nodes."""
    cfg = town.cfg
    sw, cw = cfg.sidewalk_width, cfg.crosswalk_width
    pos: list[np.ndarray] = []
    pieces = []  # (node_a, node_b, points, type, (junction id, arm index) of a crosswalk or None)

    def node(p):
        pos.append(np.asarray(p, dtype=np.float64))
        return len(pos) - 1

    for nd in nodes:
        for k, a in enumerate(nd.arms):
            mid = nd.pos + a.u * (a.box + cw / 2)
            a.walk_left = node(mid + _left(a.u) * (a.curb_left + sw / 2))
            a.walk_right = node(mid - _left(a.u) * (a.curb_right + sw / 2))
            pts = np.stack([pos[a.walk_right], pos[a.walk_left]])
            pieces.append((a.walk_right, a.walk_left, pts, LaneType.CROSSWALK, (nd.jid, k)))
        for k, a in enumerate(nd.arms):
            b = nd.arms[(k + 1) % len(nd.arms)]
            pts = _join(pos[a.walk_left], -a.u, pos[b.walk_right], b.u, 0.55 if abs(float(a.u @ b.u)) < 0.5 else 1 / 3)
            pieces.append((a.walk_left, b.walk_right, pts, LaneType.SIDEWALK, None))
    for r in roads:
        if not r.sidewalks:
            continue
        L = r.cl.length
        right = r.cl.track(0.0, L, -(r.curb_fwd + sw / 2))
        left = r.cl.track(0.0, L, r.curb_bwd + sw / 2)
        s0, s1 = r.start, r.end
        pieces.append((s0.walk_right, s1.walk_left,
                       np.concatenate([pos[s0.walk_right][None], right, pos[s1.walk_left][None]]),
                       LaneType.SIDEWALK, None))
        pieces.append((s0.walk_left, s1.walk_right,
                       np.concatenate([pos[s0.walk_left][None], left, pos[s1.walk_right][None]]),
                       LaneType.SIDEWALK, None))

    leaving = defaultdict(list)
    made = []  # (lane id, reverse lane id, end node)
    for na, nb, pts, typ, arm_key in pieces:
        width = cw if typ == LaneType.CROSSWALK else sw
        f = town.add(pts, width, 1.5, typ)
        b = town.add(pts[::-1].copy(), width, 1.5, typ)
        leaving[na].append(f)
        leaving[nb].append(b)
        made += [(f, b, nb), (b, f, na)]
        tag = "crosswalks" if typ == LaneType.CROSSWALK else "sidewalks"
        town.tags[tag] += [f, b]
        if arm_key is not None:
            info = town.junction_info[arm_key[0]]
            info["arm_info"][arm_key[1]]["crosswalk"] = [f, b]
            info["crosswalks"] += [f, b]
    for lane, rev, end in made:
        town.lanes[lane].successors = [x for x in leaving[end] if x != rev]


# ---------------------------------------------------------------------------------------------- features
def _features(town: _Town) -> dict:
    """Lane / junction ids by what scenario placement needs (JSON-friendly)."""
    t = town.tags
    lanes = town.lanes
    driving = [i for i, ln in enumerate(lanes) if ln.type == LaneType.DRIVING and ln.junction < 0]
    extra = set(t["acceleration_lanes"]) | set(t["deceleration_lanes"])
    def is_lane(nb):
        return nb >= 0 and lanes[nb].type == LaneType.DRIVING and nb not in extra

    multi = sorted(i for i in driving if i not in extra and (is_lane(lanes[i].left) or is_lane(lanes[i].right)))
    keys = ["two_way_single_lane", "highway", "highway_links", "ramp_roads", "on_ramps", "off_ramps",
            "acceleration_lanes", "deceleration_lanes", "shoulders", "parking", "bike", "crosswalks",
            "sidewalks", "curves"]
    out = {k: sorted({int(x) for x in t[k]}) for k in keys}
    out["multi_lane"] = [int(x) for x in multi]
    out["junctions"] = town.junction_info
    out["connectors"] = sorted(i for i, ln in enumerate(lanes) if ln.junction >= 0 and ln.type == LaneType.DRIVING)
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


# ---------------------------------------------------------------------------------------------- entry point
def generate_town(seed: int, cfg: TownConfig = TownConfig()) -> RoadMap:
    """A procedural town (see the module docstring) from ``seed``; deterministic in (seed, cfg)."""
    rng = np.random.default_rng(seed)
    town = _Town(cfg)
    grid = _grid_layout(cfg, rng)
    hw = _highway_layout(cfg, rng, grid)
    nodes = [nd for nd in grid.nodes.values() if len(nd.arms) >= 3]
    stray = [nd.key for nd in grid.nodes.values() if 0 < len(nd.arms) < 3]
    if stray:
        raise AssertionError(f"grid nodes with fewer than 3 arms: {stray}")
    _assign_control(cfg, rng, nodes)
    _junction_boxes(cfg, nodes)
    _centrelines(cfg, grid.roads)
    fwd_secs, bwd_secs = _highway_sections(cfg, hw)
    for r in grid.roads:
        if r is hw.road:
            _build_road(town, r, fwd_secs, bwd_secs)
        else:
            _build_road(town, r)
    _build_ramps(town, hw)
    for nd in nodes:
        _build_junction(town, rng, nd)
    _build_walks(town, nodes, grid.roads)
    extras = {
        "seed": int(seed),
        "config": _jsonable(asdict(cfg)),
        "features": _jsonable(_features(town)),
        "grid": {"xs": [float(x) for x in grid.xs], "ys": [float(y) for y in grid.ys]},
    }
    return RoadMap.build(f"town{seed}", town.lanes, town.junctions, town.lights, town.stops, extras)
