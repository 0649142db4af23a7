"""Bird's-eye-view rendering: road maps and world frames as PNG stills and animated GIFs.

Everything is drawn with matplotlib's Agg canvas directly (no pyplot, no display, no global state), so
rendering is safe in headless jobs and never touches the user's backend.

A *frame* is a plain dict of numpy arrays describing one instant of one world (agent 0 is the ego)::

    pos (N, 2), yaw (N,), length (N,), width (N,), kind (N,) AgentKind ints, valid (N,) bool
    optional: siren (N,) bool, speed (N,), lights (K,) LightState ints, route (R, 2),
              candidates (G, T, 2) world frame, candidate_weights (G,), chosen (T, 2),
              time (float), text (str)

Public API
----------
- :func:`draw_map` draws (or re-frames) a :class:`~craft.world.map.RoadMap` on an axes;
- :func:`draw_agents` draws (or updates) a frame's agents, route and trajectories on that axes;
- :func:`render_png` writes a whole-town or cropped still;
- :func:`render_gif` writes an animation that follows the ego;
- :func:`new_figure` and :func:`frame_to_rgb` are the small helpers the two writers share;
- :func:`frame_of` makes a frame from a world's state (the benchmark runner's GIFs and the demo use it).

Speed comes from doing the geometry once per map: lane polygons, markings, zebra stripes and stop
lines are turned into matplotlib paths the first time a map is drawn and cached (keyed by the map
object). Each view then only picks the paths whose bounding boxes touch the visible window, so a
100 m crop of a 30 km town rasterises a few dozen lanes, not thousands. Calling :func:`draw_map` /
:func:`draw_agents` again on the same axes updates the existing artists instead of adding new ones,
which is how :func:`render_gif` reuses a single figure for every frame.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import Collection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.path import Path
from PIL import Image

from craft.errors import CraftError
from craft.world.kinds import AgentKind
from craft.world.map import LaneType, LightState, RoadMap

__all__ = [
    "COLORS",
    "AGENT_COLORS",
    "MapArtists",
    "AgentArtists",
    "draw_map",
    "draw_agents",
    "render_png",
    "render_gif",
    "new_figure",
    "frame_to_rgb",
    "frame_of",
]

# ---------------------------------------------------------------------------------------------- style
COLORS = {
    "background": "#dde3d3",  # pale sage: "not road"
    "driving": "#55595f",
    "junction": "#515459",
    "shoulder": "#73767b",
    "shoulder_hatch": "#8e9196",
    "parking": "#676b7d",
    "bike": "#4f7f68",
    "sidewalk": "#c4c4bf",
    "marking": "#f4f4f1",
    "centre_line": "#ffffff",
    "yellow_line": "#f1c24a",
    "stop_line": "#f4f4f1",
    "stop_sign": "#d62f2f",
    "trigger": "#e03131",
    "light_off": "#9a9a9a",
    "route": "#4dabf7",
    "candidate": "#845ef7",
    "chosen": "#5f3dc4",
    "siren_a": "#f03e3e",
    "siren_b": "#1c7ed6",
}

LIGHT_COLORS = {
    int(LightState.GREEN): "#2fb84f",
    int(LightState.YELLOW): "#fcc419",
    int(LightState.RED): "#f03e3e",
}

# (face, edge) per agent kind
AGENT_COLORS = {
    int(AgentKind.EGO): ("#1c6fd8", "#ffffff"),
    int(AgentKind.CAR): ("#f08c2b", "#8a4a0c"),
    int(AgentKind.TRUCK): ("#d9602a", "#7a2e0e"),
    int(AgentKind.BICYCLE): ("#20a5b8", "#0b5560"),
    int(AgentKind.EMERGENCY): ("#f8f9fa", "#c92a2a"),
    int(AgentKind.PEDESTRIAN): ("#f06595", "#8c1d48"),
    int(AgentKind.STATIC): ("#a98f6a", "#5c4a30"),
}

_KIND_LABEL = {
    int(AgentKind.EGO): "ego",
    int(AgentKind.CAR): "car",
    int(AgentKind.TRUCK): "truck",
    int(AgentKind.BICYCLE): "bicycle",
    int(AgentKind.EMERGENCY): "emergency",
    int(AgentKind.PEDESTRIAN): "pedestrian",
    int(AgentKind.STATIC): "static object",
}

_LANE_LABEL = {
    LaneType.DRIVING: "driving lane",
    LaneType.SHOULDER: "shoulder",
    LaneType.PARKING: "parking",
    LaneType.BIKE: "bike lane",
    LaneType.SIDEWALK: "sidewalk",
    LaneType.CROSSWALK: "crosswalk",
}

# Map layers: name -> (zorder, "fill" | "line", style). Line widths are given in metres and converted to
# points for every view, so markings keep their real-world width whatever the zoom.
_FILL, _LINE = "fill", "line"
_LAYERS = {
    # the junction area (outline of its connectors) fills the gaps between them: kerb-side sidewalk corners go on
    # top of it, the connector lanes themselves (same colour) on top of those
    "junction_area": (0.8, _FILL, dict(color=COLORS["junction"])),
    "sidewalk": (0.9, _FILL, dict(color=COLORS["sidewalk"])),
    "junction": (1.0, _FILL, dict(color=COLORS["junction"])),
    "driving": (1.1, _FILL, dict(color=COLORS["driving"])),
    "shoulder": (1.2, _FILL, dict(color=COLORS["shoulder"], hatch="////", hatchcolor=COLORS["shoulder_hatch"])),
    "parking": (1.2, _FILL, dict(color=COLORS["parking"])),
    "bike": (1.2, _FILL, dict(color=COLORS["bike"])),
    "trigger": (1.3, _FILL, dict(color=COLORS["trigger"], alpha=0.13)),
    "centre": (1.4, _LINE, dict(color=COLORS["centre_line"], alpha=0.16, width=0.12, min_pt=0.2)),
    "zebra": (1.5, _FILL, dict(color=COLORS["marking"], alpha=0.9)),
    "edge": (1.6, _LINE, dict(color=COLORS["marking"], alpha=0.85, width=0.15, min_pt=0.25)),
    "dash": (1.6, _LINE, dict(color=COLORS["marking"], alpha=0.85, width=0.15, min_pt=0.25, min_ppm=0.9)),
    "yellow": (1.6, _LINE, dict(color=COLORS["yellow_line"], alpha=0.95, width=0.13, min_pt=0.25)),
    "parking_ticks": (1.6, _LINE, dict(color=COLORS["marking"], alpha=0.6, width=0.1, min_pt=0.2, min_ppm=1.5)),
    "arrows": (1.7, _FILL, dict(color=COLORS["marking"], alpha=0.4, min_ppm=1.5)),
    "stop_line": (1.8, _FILL, dict(color=COLORS["stop_line"])),
}

_LANE_LAYER = {
    LaneType.DRIVING: "driving",
    LaneType.SHOULDER: "shoulder",
    LaneType.PARKING: "parking",
    LaneType.BIKE: "bike",
    LaneType.SIDEWALK: "sidewalk",
}

_VEHICLE_LANES = (int(LaneType.DRIVING), int(LaneType.SHOULDER), int(LaneType.PARKING), int(LaneType.BIKE))

# marking geometry, metres
_DASH_ON, _DASH_PERIOD = 3.0, 9.0
_YELLOW_GAP = 0.15  # half the spacing of the double centre line
_STOP_BAR = 0.45  # stop-line thickness
_ZEBRA_STRIPE, _ZEBRA_PERIOD = 0.5, 1.0
_ARROW_SPACING = 40.0
_PARKING_BAY = 6.0
_LIGHT_DIAM = 1.4
_SIGN_DIAM = 1.3
_MAP_MARGIN = 10.0

Bounds = tuple[float, float, float, float]


class _Paths(Collection):
    """A collection of arbitrary paths in data coordinates whose path list is swapped per view or frame."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._paths = []

    def set_paths(self, paths):  # defined here: not every matplotlib version implements it on Collection
        self._paths = list(paths)
        self.stale = True


def _fill_collection(zorder: float, style: dict) -> _Paths:
    color = to_rgba(style["color"], style.get("alpha", 1.0))
    # faces and edges share the colour: the hairline edge hides anti-aliasing seams between touching lanes
    kw = dict(facecolors=[color], edgecolors=[color], linewidths=[0.3], zorder=zorder)
    if "hatch" in style:
        try:
            return _Paths(hatch=style["hatch"], hatchcolors=[style["hatchcolor"]], **kw)
        except (TypeError, AttributeError):  # older matplotlib has no hatchcolors: the hatch takes the edge colour
            kw["edgecolors"] = [style["hatchcolor"]]
            return _Paths(hatch=style["hatch"], **kw)
    return _Paths(**kw)


# ------------------------------------------------------------------------------------- cached geometry
@dataclass
class _Layer:
    """Prebuilt paths of one map layer plus each path's bounding box (n, 4: xmin, ymin, xmax, ymax)."""

    paths: list[Path]
    bbox: np.ndarray


@dataclass
class _MapGeometry:
    """Everything about a map that does not depend on the view or the frame."""

    layers: dict[str, _Layer]
    light_pos: np.ndarray  # (K, 2)
    sign_pos: np.ndarray  # (Q, 2) where the stop-sign octagon stands (kerb side of the stop line)
    bounds: Bounds
    lane_types: tuple[int, ...]  # lane types present, for the legend


_GEOMETRY_CACHE: dict[int, tuple[weakref.ref, _MapGeometry]] = {}


def _geometry(road_map: RoadMap) -> _MapGeometry:
    """The cached geometry of ``road_map``, built on first use."""
    key = id(road_map)
    hit = _GEOMETRY_CACHE.get(key)
    if hit is not None and hit[0]() is road_map:
        return hit[1]
    for k in [k for k, (ref, _) in _GEOMETRY_CACHE.items() if ref() is None]:
        del _GEOMETRY_CACHE[k]  # maps that were garbage collected (their id may be reused)
    geo = _build_geometry(road_map)
    _GEOMETRY_CACHE[key] = (weakref.ref(road_map), geo)
    return geo


def _closed(verts: np.ndarray) -> Path:
    """A closed polygon path from (n, 2) vertices."""
    return Path(np.vstack([verts, verts[:1]]), closed=True)


def _compound_polys(polys: np.ndarray) -> Path:
    """One path holding many closed polygons (m, k, 2): e.g. all zebra stripes of a crosswalk."""
    m, k, _ = polys.shape
    verts = np.concatenate([polys, polys[:, :1]], axis=1).reshape(-1, 2)
    codes = np.full((m, k + 1), Path.LINETO, dtype=Path.code_type)
    codes[:, 0] = Path.MOVETO
    codes[:, -1] = Path.CLOSEPOLY
    return Path(verts, codes.reshape(-1))


def _compound_segments(a: np.ndarray, b: np.ndarray) -> Path:
    """One path of disconnected straight segments a[i] -> b[i]."""
    verts = np.stack([a, b], axis=1).reshape(-1, 2)
    codes = np.tile(np.array([Path.MOVETO, Path.LINETO], dtype=Path.code_type), len(a))
    return Path(verts, codes)


def _dashed(pts: np.ndarray, s: np.ndarray, on: float = _DASH_ON, period: float = _DASH_PERIOD) -> Path | None:
    """A dashed polyline as one path: segment k is drawn when its midpoint falls in the 'on' part."""
    seg_on = (0.5 * (s[:-1] + s[1:])) % period < on
    if not seg_on.any():
        return None
    keep = np.zeros(len(pts), bool)
    keep[:-1] |= seg_on
    keep[1:] |= seg_on
    prev_on = np.concatenate([[False], seg_on])
    codes = np.where(prev_on, Path.LINETO, Path.MOVETO).astype(Path.code_type)
    return Path(pts[keep], codes[keep])


def _bbox(verts: np.ndarray) -> list[float]:
    lo = verts.min(0)
    hi = verts.max(0)
    return [lo[0], lo[1], hi[0], hi[1]]


def _hull(p: np.ndarray) -> np.ndarray:
    """Convex hull of (n, 2) points, counter-clockwise (Andrew's monotone chain)."""
    p = np.unique(np.round(p, 3), axis=0)
    if len(p) < 3:
        return p

    def half(pts):
        out: list[np.ndarray] = []
        for q in pts:
            while len(out) >= 2:
                a, b = out[-2], out[-1]
                if (b[0] - a[0]) * (q[1] - a[1]) - (b[1] - a[1]) * (q[0] - a[0]) > 0:
                    break
                out.pop()
            out.append(q)
        return out

    lower = half(p)
    upper = half(p[::-1])
    return np.array(lower[:-1] + upper[:-1])


def _densify(poly: np.ndarray, step: float) -> np.ndarray:
    """Closed polygon (n, 2) with extra points so that no edge is longer than ``step``."""
    nxt = np.roll(poly, -1, axis=0)
    k = np.maximum(1, np.ceil(np.hypot(*(nxt - poly).T) / step).astype(np.int64))
    seg = np.repeat(np.arange(len(poly)), k)
    frac = np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)
    frac = (frac / np.repeat(k, k))[:, None]
    return poly[seg] + frac * (nxt[seg] - poly[seg])


def _star_outline(center: np.ndarray, p: np.ndarray, bins: int = 120) -> np.ndarray:
    """Outline of points (n, 2) as seen from ``center``: in each angular bin, the farthest point.

    Unlike the convex hull it follows concave boundaries such as rounded kerb corners, as long as the
    shape is star-shaped about ``center`` (true of junction areas around their centre).
    """
    d = p - center
    dist = np.hypot(d[:, 0], d[:, 1])
    b = np.floor((np.arctan2(d[:, 1], d[:, 0]) + np.pi) / (2 * np.pi) * bins).astype(np.int64) % bins
    order = np.lexsort((dist, b))
    last = np.ones(len(order), bool)
    last[:-1] = b[order][1:] != b[order][:-1]
    return p[order[last]]


def _rect(center: np.ndarray, tangent: np.ndarray, half_len, half_wid) -> np.ndarray:
    """Corners (..., 4, 2) of rectangles given centres (..., 2), unit tangents (..., 2) and half sizes."""
    t = tangent * np.asarray(half_len)[..., None]
    n = np.stack([-tangent[..., 1], tangent[..., 0]], -1) * np.asarray(half_wid)[..., None]
    return np.stack([center + t + n, center - t + n, center - t - n, center + t - n], axis=-2)


class _LaneFrames:
    """Per-point unit tangents, left normals and mitre factors of every lane of a map (vectorised)."""

    def __init__(self, m: RoadMap):
        p = m.points.astype(np.float64)
        idx = np.arange(len(p))
        first = m.lane_offset[m.point_lane]
        last = first + m.lane_count[m.point_lane] - 1
        nxt = np.minimum(idx + 1, last)
        prv = np.maximum(idx - 1, first)
        t = p[nxt] - p[prv]
        t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)
        # the offset along the bisector must be longer by 1/cos(half the turn) to keep edges parallel
        d_in = p[idx] - p[prv]
        n_in = np.linalg.norm(d_in, axis=1)
        cos_half = np.where(n_in > 1e-9, (d_in * t).sum(1) / np.maximum(n_in, 1e-9), 1.0)
        self.p = p
        self.t = t
        self.n = np.stack([-t[:, 1], t[:, 0]], 1)
        self.mitre = 1.0 / np.clip(cos_half, 0.5, 1.0)
        self.m = m

    def span(self, lane: int) -> slice:
        o = int(self.m.lane_offset[lane])
        return slice(o, o + int(self.m.lane_count[lane]))

    def offset(self, lane: int, d: float) -> np.ndarray:
        """The lane's centreline shifted ``d`` metres to the left (negative: right)."""
        sl = self.span(lane)
        return self.p[sl] + self.n[sl] * (d * self.mitre[sl])[:, None]

    def sample(self, lane: int, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions and unit tangents at arc lengths ``s`` along ``lane``."""
        sl = self.span(lane)
        ss = self.m.point_s[sl].astype(np.float64)
        pts = self.p[sl]
        pos = np.stack([np.interp(s, ss, pts[:, 0]), np.interp(s, ss, pts[:, 1])], 1)
        i = np.clip(np.searchsorted(ss, s) - 1, 0, len(ss) - 2) if len(ss) > 1 else np.zeros(len(s), int)
        d = pts[np.minimum(i + 1, len(ss) - 1)] - pts[i]
        d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)
        return pos, d


def _kerb_offset(m: RoadMap, lane: int) -> float:
    """Distance from ``lane``'s centreline to the outer edge of the rightmost lane beside it."""
    off = 0.5 * float(m.lane_width[lane])
    seen = {lane}
    r = int(m.lane_right[lane])
    while r >= 0 and r not in seen:
        seen.add(r)
        off += float(m.lane_width[r])
        r = int(m.lane_right[r])
    return off


def _build_geometry(m: RoadMap) -> _MapGeometry:
    """Turn a road map into matplotlib paths, grouped by layer (see ``_LAYERS``)."""
    fr = _LaneFrames(m)
    acc: dict[str, tuple[list[Path], list[list[float]]]] = {name: ([], []) for name in _LAYERS}

    def add(layer: str, path: Path | None, verts: np.ndarray | None = None):
        if path is None or len(path.vertices) == 0:
            return
        acc[layer][0].append(path)
        acc[layer][1].append(_bbox(path.vertices if verts is None else verts))

    types = m.lane_type.astype(int)
    widths = m.lane_width.astype(np.float64)
    seen_crosswalks: set[tuple] = set()
    junction_verts: dict[int, list[np.ndarray]] = {}
    caps: list[np.ndarray] = []  # lane ends (across the lane, densified) of vehicle lanes outside junctions

    for i in range(m.num_lanes):
        lt = int(types[i])
        hw = 0.5 * float(widths[i])
        sl = fr.span(i)
        s = m.point_s[sl].astype(np.float64)
        length = float(m.lane_length[i])
        in_junction = int(m.lane_junction[i]) >= 0

        if lt == LaneType.CROSSWALK:
            # the two directions of a crosswalk overlap: stripe it once
            mid, _ = fr.sample(i, np.array([0.5 * length]))
            key = (round(mid[0, 0] * 2), round(mid[0, 1] * 2), round(length * 2))
            if key in seen_crosswalks:
                continue
            seen_crosswalks.add(key)
            n = max(1, int(length // _ZEBRA_PERIOD))
            sc = 0.5 * (length - (n - 1) * _ZEBRA_PERIOD) + _ZEBRA_PERIOD * np.arange(n)
            c, t = fr.sample(i, sc)
            stripes = _rect(c, t, 0.5 * _ZEBRA_STRIPE, 0.45 * 2 * hw)
            add("zebra", _compound_polys(stripes))
            continue

        left = fr.offset(i, hw)
        right = fr.offset(i, -hw)
        poly = np.vstack([left, right[::-1]])
        if lt in _VEHICLE_LANES:
            across = np.linspace(0.0, 1.0, 15)[:, None]
            ends = [left[0] + across * (right[0] - left[0]), left[-1] + across * (right[-1] - left[-1])]
        if in_junction and lt in _VEHICLE_LANES:
            # connectors share the junction's surface colour, so the junction reads as one area
            junction_verts.setdefault(int(m.lane_junction[i]), []).append(_densify(poly, 0.25))
            add("junction", _closed(poly), poly)
        else:
            add(_LANE_LAYER[LaneType(lt)], _closed(poly), poly)
            if lt in _VEHICLE_LANES:
                caps.extend(ends)

        if lt == LaneType.PARKING and length > 1.0:
            sb = np.arange(0.0, length + 1e-6, _PARKING_BAY)
            c, t = fr.sample(i, sb)
            nrm = np.stack([-t[:, 1], t[:, 0]], 1)
            add("parking_ticks", _compound_segments(c + nrm * hw, c - nrm * hw))
        if lt != LaneType.DRIVING:
            continue

        pts = fr.p[sl]
        add("centre", Path(pts))
        if in_junction:
            continue
        # lane boundaries: double yellow against oncoming traffic, dashed between same-direction driving
        # lanes, solid at the road edge / next to non-driving lanes. Each shared boundary is drawn once.
        opp = int(m.lane_left_opposite[i])
        lft = int(m.lane_left[i])
        rgt = int(m.lane_right[i])
        if opp >= 0:
            if not (opp < i and int(m.lane_left_opposite[opp]) == i):
                add("yellow", Path(fr.offset(i, hw - _YELLOW_GAP)))
                add("yellow", Path(fr.offset(i, hw + _YELLOW_GAP)))
        elif lft >= 0 and int(types[lft]) == LaneType.DRIVING:
            add("dash", _dashed(left, s))
        else:
            add("edge", Path(left))
        if rgt < 0 or int(types[rgt]) != LaneType.DRIVING:
            add("edge", Path(right))
        # direction arrows, the last one a few metres before the lane end (where real ones are painted)
        if length > 14.0:
            sa = np.arange(length - 8.0, 5.0, -_ARROW_SPACING)[::-1]
            c, t = fr.sample(i, sa)
            nrm = np.stack([-t[:, 1], t[:, 0]], 1)
            tri = np.stack([c + 1.3 * t, c - 1.0 * t + 0.45 * nrm, c - 1.0 * t - 0.45 * nrm], 1)
            add("arrows", _compound_polys(tri))

    # junction areas: the outline of the connectors plus the ends of the lanes meeting there (an outgoing
    # lane no connector feeds would otherwise leave a notch)
    caps_arr = np.stack(caps) if caps else np.zeros((0, 15, 2))
    cap_mid = caps_arr[:, 7]
    for j, polys in junction_verts.items():
        verts = np.concatenate(polys)
        center = m.junction_center[j].astype(np.float64) if j < len(m.junction_center) else verts.mean(0)
        reach = np.hypot(*(verts - center).T).max() + 1.0
        near = np.hypot(*(cap_mid - center).T) <= reach
        verts = np.concatenate([verts, caps_arr[near].reshape(-1, 2)])
        outline = _star_outline(center, verts)
        if len(outline) < 3:
            outline = _hull(verts)
        if len(outline) >= 3:
            add("junction_area", _closed(outline), outline)

    # stop lines (lights and stop signs), stop-sign trigger areas, where the sign itself stands
    def stop_bar(pos, heading, lane):
        t = np.array([np.cos(heading), np.sin(heading)])
        w = float(widths[lane])
        return _rect(np.asarray(pos, np.float64) - t * 0.5 * _STOP_BAR, t, 0.5 * _STOP_BAR, 0.5 * w)

    for k in range(len(m.light_lane)):
        add("stop_line", _closed(stop_bar(m.light_pos[k], m.light_heading[k], m.light_lane[k])))
    sign_pos = np.zeros((len(m.stop_lane), 2))
    for k in range(len(m.stop_lane)):
        lane = int(m.stop_lane[k])
        h = float(m.stop_heading[k])
        t = np.array([np.cos(h), np.sin(h)])
        add("stop_line", _closed(stop_bar(m.stop_pos[k], h, lane)))
        cx, cy, yaw, tl, tw = (float(v) for v in m.stop_trigger[k])
        ty = np.array([np.cos(yaw), np.sin(yaw)])
        add("trigger", _closed(_rect(np.array([cx, cy]), ty, 0.5 * tl, 0.5 * tw)))
        # the octagon stands at the kerb (right of the rightmost lane of the approach), just before the line
        sign_pos[k] = m.stop_pos[k] - t * 1.0 + np.array([t[1], -t[0]]) * (_kerb_offset(m, lane) + 0.9)

    layers = {
        name: _Layer(paths, np.asarray(boxes, np.float64).reshape(-1, 4)) for name, (paths, boxes) in acc.items()
    }
    x0, y0, x1, y1 = m.bounds
    return _MapGeometry(
        layers=layers,
        light_pos=m.light_pos.astype(np.float64).reshape(-1, 2),
        sign_pos=sign_pos,
        bounds=(x0, y0, x1, y1),
        lane_types=tuple(sorted(set(int(t) for t in types))),
    )


# ------------------------------------------------------------------------------------------ view maths
def _fit_aspect(ax, bounds: Bounds) -> Bounds:
    """Grow ``bounds`` symmetrically so that one metre is as wide as it is tall on this axes."""
    x0, y0, x1, y1 = (float(v) for v in bounds)
    if x1 - x0 < 1e-6 or y1 - y0 < 1e-6:
        raise CraftError(f"render bounds must have positive width and height, got {bounds}")
    w_px, h_px = ax.bbox.width, ax.bbox.height
    want = w_px / max(h_px, 1e-9)  # width / height in data units
    have = (x1 - x0) / (y1 - y0)
    if have < want:
        grow = 0.5 * ((y1 - y0) * want - (x1 - x0))
        x0, x1 = x0 - grow, x1 + grow
    else:
        grow = 0.5 * ((x1 - x0) / want - (y1 - y0))
        y0, y1 = y0 - grow, y1 + grow
    return x0, y0, x1, y1


def _pt_per_m(ax) -> float:
    """Typographic points per metre at the axes' current x limits."""
    x0, x1 = ax.get_xlim()
    return ax.bbox.width / max(abs(x1 - x0), 1e-9) * 72.0 / ax.figure.dpi


def _px_per_m(ax) -> float:
    x0, x1 = ax.get_xlim()
    return ax.bbox.width / max(abs(x1 - x0), 1e-9)


def _overlaps(bbox: np.ndarray, b: Bounds) -> np.ndarray:
    return (bbox[:, 0] <= b[2]) & (bbox[:, 2] >= b[0]) & (bbox[:, 1] <= b[3]) & (bbox[:, 3] >= b[1])


# ------------------------------------------------------------------------------------------ map artists
_AXES_STATE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _state(ax) -> dict:
    st = _AXES_STATE.get(ax)
    if st is None:
        st = {}
        _AXES_STATE[ax] = st
    return st


class MapArtists:
    """The artists of one map on one axes. :meth:`set_view` re-frames, :meth:`set_lights` recolours."""

    def __init__(self, ax, road_map: RoadMap):
        self.ax = ax
        self.road_map = road_map
        self.geo = _geometry(road_map)
        self.collections: dict[str, _Paths] = {}
        for name, (z, kind, style) in _LAYERS.items():
            if kind == _FILL:
                coll = _fill_collection(z, style)
            else:
                color = to_rgba(style["color"], style.get("alpha", 1.0))
                coll = _Paths(facecolors="none", edgecolors=[color], linewidths=[0.5], capstyle="butt", zorder=z)
            ax.add_collection(coll, autolim=False)
            self.collections[name] = coll
        self.lights = ax.scatter(
            self.geo.light_pos[:, 0], self.geo.light_pos[:, 1], s=9.0, marker="o",
            c=[COLORS["light_off"]] * len(self.geo.light_pos), edgecolors="#222222", linewidths=0.5, zorder=3.6,
        )  # fmt: skip
        self.signs = ax.scatter(
            self.geo.sign_pos[:, 0], self.geo.sign_pos[:, 1], s=9.0, marker="8",
            c=COLORS["stop_sign"], edgecolors="white", linewidths=0.6, zorder=3.6,
        )  # fmt: skip
        self.bounds: Bounds | None = None

    def set_view(self, bounds: Bounds | None = None) -> Bounds:
        """Show ``bounds`` (xmin, ymin, xmax, ymax; default the whole map), drawing only what is inside.

        The bounds are widened to the axes' aspect ratio; the final limits are returned.
        """
        if bounds is None:
            x0, y0, x1, y1 = self.geo.bounds
            bounds = (x0 - _MAP_MARGIN, y0 - _MAP_MARGIN, x1 + _MAP_MARGIN, y1 + _MAP_MARGIN)
        b = _fit_aspect(self.ax, bounds)
        self.ax.set_xlim(b[0], b[2])
        self.ax.set_ylim(b[1], b[3])
        self.ax.set_aspect("equal", adjustable="datalim")
        pt = _pt_per_m(self.ax)
        px = _px_per_m(self.ax)
        pad = 2.0  # m, so that wide lines just outside the window still show their edge
        cull = (b[0] - pad, b[1] - pad, b[2] + pad, b[3] + pad)
        for name, (_, kind, style) in _LAYERS.items():
            layer = self.geo.layers[name]
            coll = self.collections[name]
            visible = px >= style.get("min_ppm", 0.0)
            coll.set_visible(visible)
            if not visible:
                continue
            sel = np.nonzero(_overlaps(layer.bbox, cull))[0] if len(layer.paths) else []
            coll.set_paths([layer.paths[k] for k in sel])
            if kind == _LINE:
                coll.set_linewidth(max(style["width"] * pt, style["min_pt"]))
        self.lights.set_sizes([max(_LIGHT_DIAM * pt, 3.0) ** 2])
        self.lights.set_linewidth(min(0.8, max(0.3, 0.08 * pt)))
        self.signs.set_sizes([max(_SIGN_DIAM * pt, 3.0) ** 2])
        self.bounds = b
        return b

    def set_lights(self, states) -> None:
        """Colour the traffic lights from LightState ints (K,); ``None`` greys them out.

        Longer arrays are accepted and cut to the map's K: a :class:`~craft.world.map.MapBatch` pads every
        map's lights to the batch's largest count.
        """
        k = len(self.geo.light_pos)
        if k == 0:
            return
        if states is None:
            self.lights.set_facecolor([COLORS["light_off"]] * k)
            return
        states = np.asarray(states).reshape(-1)
        if len(states) < k:
            raise CraftError(f"frame['lights'] has {len(states)} entries but the map has {k} traffic lights")
        states = states[:k]
        self.lights.set_facecolor([LIGHT_COLORS.get(int(v), COLORS["light_off"]) for v in states])

    def remove(self) -> None:
        for c in self.collections.values():
            c.remove()
        self.lights.remove()
        self.signs.remove()


def draw_map(ax, road_map: RoadMap, bounds: Bounds | None = None, lights=None) -> MapArtists:
    """Draw ``road_map`` on ``ax`` framed to ``bounds`` (xmin, ymin, xmax, ymax; default: the whole map).

    Only lanes, markings and signs whose bounding boxes touch the window are handed to matplotlib.
    The first call on an axes creates the artists; later calls with the same map just re-frame them
    (cheap), so an animation can call this once per frame. ``lights`` optionally colours the traffic
    lights (LightState ints, one per ``road_map.light_lane``); :func:`draw_agents` does the same from
    ``frame["lights"]``. The axes is set to equal aspect with its decorations turned off.
    """
    st = _state(ax)
    art = st.get("map")
    if art is None or art.road_map is not road_map:
        if art is not None:
            art.remove()
        ax.set_axis_off()
        ax.set_facecolor(COLORS["background"])
        art = MapArtists(ax, road_map)
        st["map"] = art
    art.set_view(bounds)
    if lights is not None:
        art.set_lights(lights)
    return art


# ----------------------------------------------------------------------------------------- agent artists
def _as(frame: dict, key: str, n: int, default, dtype) -> np.ndarray:
    v = frame.get(key)
    if v is None:
        return np.full(n, default, dtype=dtype)
    v = np.asarray(v, dtype=dtype).reshape(-1)
    if len(v) != n:
        raise CraftError(f"frame['{key}'] has {len(v)} entries but frame['pos'] has {n} agents")
    return v


def _circle(n: int = 12) -> np.ndarray:
    a = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(a), np.sin(a)], 1)


_UNIT_CIRCLE = _circle(12)
_HALO_CIRCLE = _circle(24)


def _agent_polys(pos, yaw, length, width, kind) -> list[np.ndarray]:
    """Outline per agent: oriented boxes, circles for pedestrians."""
    t = np.stack([np.cos(yaw), np.sin(yaw)], 1)
    boxes = _rect(pos, t, 0.5 * length, 0.5 * width)
    out = []
    for i in range(len(pos)):
        if kind[i] == AgentKind.PEDESTRIAN:
            r = 0.5 * max(length[i], width[i], 0.8)  # a little larger than life, to stay visible
            out.append(pos[i] + r * _UNIT_CIRCLE)
        else:
            out.append(boxes[i])
    return out


@dataclass
class _Agents:
    """A frame's agent arrays, validated and with defaults filled in."""

    pos: np.ndarray  # (N, 2)
    tangent: np.ndarray  # (N, 2) unit heading vectors
    yaw: np.ndarray
    length: np.ndarray
    width: np.ndarray
    kind: np.ndarray
    valid: np.ndarray
    siren: np.ndarray

    @staticmethod
    def parse(frame: dict) -> "_Agents":
        if frame.get("pos") is None:
            raise CraftError("a render frame needs at least 'pos' (N, 2); got keys " + ", ".join(sorted(frame)))
        pos = np.asarray(frame["pos"], np.float64).reshape(-1, 2)
        n = len(pos)
        yaw = _as(frame, "yaw", n, 0.0, np.float64)
        kind = _as(frame, "kind", n, int(AgentKind.CAR), np.int64)
        if n and frame.get("kind") is None:
            kind[0] = int(AgentKind.EGO)
        return _Agents(
            pos=pos,
            tangent=np.stack([np.cos(yaw), np.sin(yaw)], 1),
            yaw=yaw,
            length=_as(frame, "length", n, 4.6, np.float64),
            width=_as(frame, "width", n, 1.9, np.float64),
            kind=kind,
            valid=_as(frame, "valid", n, True, bool) & np.isfinite(pos).all(1) & np.isfinite(yaw),
            siren=_as(frame, "siren", n, False, bool),
        )

    def colour(self, i: int, which: int) -> str:
        return AGENT_COLORS.get(int(self.kind[i]), AGENT_COLORS[int(AgentKind.CAR)])[which]


class AgentArtists:
    """Artists for a frame's agents, route and trajectories; :meth:`update` redraws them for a new frame."""

    def __init__(self, ax):
        self.ax = ax
        self.route = Line2D([], [], color=COLORS["route"], alpha=0.45, solid_capstyle="round", zorder=3.0)
        self.chosen = Line2D([], [], color=COLORS["chosen"], alpha=0.95, solid_capstyle="round", zorder=3.4)
        self.chosen_end = Line2D(
            [], [], color=COLORS["chosen"], marker="o", markeredgecolor="white", linestyle="none", zorder=3.4
        )
        for a in (self.route, self.chosen, self.chosen_end):
            ax.add_line(a)
        self.candidates = _Paths(facecolors="none", zorder=3.2, capstyle="round")
        self.halos = _Paths(linewidths=[0.0], zorder=3.5)
        self.others = _Paths(zorder=4.0, linewidths=[0.8])
        self.ego = _Paths(zorder=4.5, linewidths=[1.2])
        self.ticks = _Paths(facecolors="none", zorder=4.6, capstyle="round")
        self.sirens = _Paths(linewidths=[0.0], zorder=4.7)
        for c in (self.candidates, self.halos, self.others, self.ego, self.ticks, self.sirens):
            ax.add_collection(c, autolim=False)
        self.locator = ax.scatter([], [], s=1.0, facecolors="none", edgecolors=AGENT_COLORS[0][0], zorder=4.8)
        self.label = ax.text(
            0.012, 0.988, "", transform=ax.transAxes, ha="left", va="top", fontsize=8, family="monospace",
            zorder=10, bbox=dict(boxstyle="round,pad=0.35", facecolor="white", edgecolor="#888888", alpha=0.8),
        )  # fmt: skip
        self.title = ""
        self.calls = 0

    def update(self, frame: dict) -> None:
        """Show ``frame`` (see the module docstring for its keys)."""
        self.calls += 1
        pt = _pt_per_m(self.ax)
        ag = _Agents.parse(frame)
        tm = frame.get("time")
        # the siren colours swap every quarter second (every frame when the frame carries no time)
        phase = int(np.floor(float(tm) * 4.0)) % 2 if tm is not None else self.calls % 2
        self._boxes(ag, pt)
        self._sirens(ag, phase)
        self._paths(frame, pt)
        self._label(frame, ag)
        art = _state(self.ax).get("map")  # traffic lights live on the map artists of this axes
        if art is not None:
            art.set_lights(frame.get("lights"))

    def _boxes(self, ag: _Agents, pt: float) -> None:
        """Agent outlines (ego separately, on top) and heading ticks."""
        n = len(ag.pos)
        polys = _agent_polys(ag.pos, ag.yaw, ag.length, ag.width, ag.kind)
        others = [i for i in range(1, n) if ag.valid[i]]
        # static objects first, then vehicles, then pedestrians
        others.sort(key=lambda i: (ag.kind[i] != AgentKind.STATIC, ag.kind[i] == AgentKind.PEDESTRIAN))
        self.others.set_paths([_closed(polys[i]) for i in others])
        self.others.set_facecolor([ag.colour(i, 0) for i in others] or ["none"])
        self.others.set_edgecolor([ag.colour(i, 1) for i in others] or ["none"])
        self.others.set_linewidth(min(1.0, max(0.4, 0.12 * pt)))
        ego = [0] if n and ag.valid[0] else []
        self.ego.set_paths([_closed(polys[0])] if ego else [])
        self.ego.set_facecolor([AGENT_COLORS[0][0]])
        self.ego.set_edgecolor([AGENT_COLORS[0][1]])
        self.ego.set_linewidth(min(1.6, max(0.6, 0.2 * pt)))

        # heading ticks: centre to front for vehicles, a short nose for pedestrians
        shown = np.array(ego + others, np.int64)
        ped = ag.kind[shown] == AgentKind.PEDESTRIAN
        reach = np.where(ped, 0.9 * np.maximum(ag.length[shown], 0.3), 0.5 * ag.length[shown])
        a = ag.pos[shown] + ag.tangent[shown] * (0.05 * ag.length[shown])[:, None]
        b = ag.pos[shown] + ag.tangent[shown] * reach[:, None]
        self.ticks.set_paths([_compound_segments(a[k : k + 1], b[k : k + 1]) for k in range(len(shown))])
        self.ticks.set_edgecolor(["#ffffff" if i == 0 else ag.colour(i, 1) for i in shown] or ["none"])
        self.ticks.set_linewidth(min(2.0, max(0.5, 0.25 * pt)))

        # a ring around the ego when it is too small to see (whole-town views)
        small = bool(ego) and ag.length[0] * pt < 8.0
        self.locator.set_visible(small)
        if small:
            self.locator.set_offsets(ag.pos[:1])
            self.locator.set_sizes([18.0**2])
            self.locator.set_linewidths([1.5])

    def _sirens(self, ag: _Agents, phase: int) -> None:
        """Vehicles with the siren on: a pulsing halo and a two-colour light bar on the roof."""
        halo_paths, halo_cols, bar_paths, bar_cols = [], [], [], []
        ca, cb = (COLORS["siren_a"], COLORS["siren_b"])[:: 1 if phase else -1]
        for i in np.nonzero(ag.valid & ag.siren)[0]:
            t = ag.tangent[i]
            nrm = np.array([-t[1], t[0]])
            halo_paths.append(_closed(ag.pos[i] + max(3.0, 0.8 * ag.length[i]) * _HALO_CIRCLE))
            halo_cols.append(to_rgba(ca, 0.22))
            for side, col in ((1.0, ca), (-1.0, cb)):
                c = ag.pos[i] + nrm * side * 0.25 * ag.width[i]
                bar_paths.append(_closed(_rect(c, t, 0.22, 0.24 * ag.width[i])))
                bar_cols.append(col)
        self.halos.set_paths(halo_paths)
        self.halos.set_facecolor(halo_cols or ["none"])
        self.sirens.set_paths(bar_paths)
        self.sirens.set_facecolor(bar_cols or ["none"])

    def _paths(self, frame: dict, pt: float) -> None:
        """Route, candidate trajectories (alpha by weight, heaviest on top) and the chosen one, bold."""
        route = frame.get("route")
        r = None if route is None else np.asarray(route, np.float64).reshape(-1, 2)
        self.route.set_visible(r is not None and len(r) > 1)
        if r is not None and len(r) > 1:
            self.route.set_data(r[:, 0], r[:, 1])
            self.route.set_linewidth(max(2.0, 1.8 * pt))

        cands = frame.get("candidates")
        cands = None if cands is None else np.asarray(cands, np.float64)
        if cands is not None and cands.size:
            if cands.ndim != 3 or cands.shape[-1] != 2:
                raise CraftError(f"frame['candidates'] must be (G, T, 2), got shape {cands.shape}")
            g = len(cands)
            w = frame.get("candidate_weights")
            if w is None:
                alpha = np.full(g, 0.45)
            else:
                w = np.clip(np.nan_to_num(np.asarray(w, np.float64).reshape(-1)), 0.0, None)
                if len(w) != g:
                    raise CraftError(f"frame['candidate_weights'] has {len(w)} entries for {g} candidates")
                alpha = 0.12 + 0.78 * w / max(w.max(), 1e-12)
            order = np.argsort(alpha, kind="stable")
            self.candidates.set_paths([Path(cands[k]) for k in order])
            self.candidates.set_edgecolor([to_rgba(COLORS["candidate"], float(alpha[k])) for k in order])
            self.candidates.set_linewidth(max(0.6, 0.25 * pt))
        else:
            self.candidates.set_paths([])

        chosen = frame.get("chosen")
        c = None if chosen is None else np.asarray(chosen, np.float64).reshape(-1, 2)
        show = c is not None and len(c) > 1
        self.chosen.set_visible(show)
        self.chosen_end.set_visible(show)
        if show:
            lw = max(1.8, 0.5 * pt)
            self.chosen.set_data(c[:, 0], c[:, 1])
            self.chosen.set_linewidth(lw)
            self.chosen.set_path_effects(
                [patheffects.Stroke(linewidth=lw + 1.6, foreground="white"), patheffects.Normal()]
            )
            self.chosen_end.set_data(c[-1:, 0], c[-1:, 1])
            self.chosen_end.set_markersize(max(3.0, 1.1 * pt))

    def _label(self, frame: dict, ag: _Agents) -> None:
        """Info box: title, time, ego speed, free text."""
        lines = [self.title] if self.title else []
        if frame.get("time") is not None:
            lines.append(f"t = {float(frame['time']):6.1f} s")
        sp = frame.get("speed")
        if sp is not None and len(ag.pos) and ag.valid[0]:
            lines.append(f"ego {float(np.asarray(sp).reshape(-1)[0]):5.1f} m/s")
        if frame.get("text"):
            lines.append(str(frame["text"]))
        self.label.set_text("\n".join(lines))
        self.label.set_visible(bool(lines))


def draw_agents(ax, frame: dict, title: str | None = None) -> AgentArtists:
    """Draw a frame's agents (oriented boxes by kind, ego on top), route and trajectories on ``ax``.

    Call after :func:`draw_map` (line widths follow the current zoom). A second call on the same axes
    updates the artists in place. ``frame["lights"]`` recolours the map's traffic lights.
    ``title`` is shown in the info box with the frame's time, ego speed and text.
    """
    st = _state(ax)
    art = st.get("agents")
    if art is None:
        art = AgentArtists(ax)
        st["agents"] = art
    if title is not None:
        art.title = title
    art.update(frame)
    return art


# ------------------------------------------------------------------------------------------- figures
def new_figure(width_px: int, height_px: int, dpi: float = 100.0):
    """A figure of exactly ``width_px`` x ``height_px`` pixels with one borderless axes; returns (fig, ax)."""
    if width_px < 16 or height_px < 16:
        raise CraftError(f"image size must be at least 16x16 pixels, got {width_px}x{height_px}")
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, facecolor=COLORS["background"])
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    return fig, ax


def frame_to_rgb(fig) -> np.ndarray:
    """Rasterise ``fig`` with Agg and return its pixels as an (H, W, 3) uint8 array."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _atomic_write(path: str | os.PathLike, write) -> str:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then move it into place."""
    from craft.files import atomic_write

    atomic_write(path, write)
    return os.fspath(path)


def _marker(marker: str, face: str, edge: str, label: str, size: float = 7.0) -> Line2D:
    return Line2D([], [], marker=marker, linestyle="none", markerfacecolor=face, markeredgecolor=edge,
                  markersize=size, label=label)  # fmt: skip


def _legend(ax, road_map: RoadMap, frame: dict | None) -> None:
    """A small legend of the lane types, signals and agent kinds present (lower right)."""
    h = []
    for lt in _geometry(road_map).lane_types:
        lt = LaneType(lt)
        if lt == LaneType.CROSSWALK:
            h.append(Patch(facecolor=COLORS["driving"], edgecolor=COLORS["marking"], hatch="||||", label="crosswalk"))
        else:
            style = _LAYERS[_LANE_LAYER[lt]][2]
            edge = style.get("hatchcolor", "none")
            h.append(Patch(facecolor=style["color"], hatch=style.get("hatch"), edgecolor=edge, label=_LANE_LABEL[lt]))
    if len(road_map.light_lane):
        for st in (LightState.GREEN, LightState.YELLOW, LightState.RED):
            h.append(_marker("o", LIGHT_COLORS[int(st)], "#222222", f"light {st.name.lower()}", 6.0))
    if len(road_map.stop_lane):
        h.append(_marker("8", COLORS["stop_sign"], "white", "stop sign"))
    if frame is not None:
        ag = _Agents.parse(frame)
        present = sorted({int(k) for k in ag.kind[ag.valid]} | {int(AgentKind.EGO)})
        for k in present:
            face, edge = AGENT_COLORS.get(k, AGENT_COLORS[int(AgentKind.CAR)])
            marker = "o" if k == AgentKind.PEDESTRIAN else "s"
            h.append(_marker(marker, face, "#333333" if k == AgentKind.EGO else edge, _KIND_LABEL.get(k, str(k))))
        if frame.get("route") is not None:
            h.append(Line2D([], [], color=COLORS["route"], alpha=0.6, linewidth=4, label="route"))
        if frame.get("candidates") is not None:
            h.append(Line2D([], [], color=COLORS["candidate"], alpha=0.7, linewidth=1, label="candidates"))
        if frame.get("chosen") is not None:
            h.append(Line2D([], [], color=COLORS["chosen"], linewidth=2.5, label="chosen"))
    ax.legend(handles=h, loc="lower right", fontsize=6.5, framealpha=0.85, ncol=min(3, -(-len(h) // 8)),
              handlelength=1.6, borderpad=0.5, labelspacing=0.3, facecolor="white", edgecolor="#888888")  # fmt: skip


def _crop(center, radius: float) -> Bounds:
    cx, cy = (float(v) for v in np.asarray(center, np.float64).reshape(2))
    return cx - radius, cy - radius, cx + radius, cy + radius


def _ego_pos(frame: dict | None):
    if frame is None or frame.get("pos") is None or len(np.asarray(frame["pos"])) == 0:
        raise CraftError("center='ego' / follow_ego needs a frame with at least one agent in frame['pos']")
    return np.asarray(frame["pos"], np.float64).reshape(-1, 2)[0]


def frame_of(world, state, b: int) -> dict:
    """The frame (numpy) of world ``b`` of a batched ``state`` of ``world`` (a :class:`~craft.world.world.World`)."""
    lights = world.lights(state)[b]
    return {
        "pos": state.pos[b].cpu().numpy(),
        "yaw": state.yaw[b].cpu().numpy(),
        "length": state.length[b].cpu().numpy(),
        "width": state.width[b].cpu().numpy(),
        "kind": state.kind[b].cpu().numpy(),
        "valid": state.valid[b].cpu().numpy(),
        "siren": state.siren[b].cpu().numpy(),
        "speed": state.speed[b].cpu().numpy(),
        "lights": lights.cpu().numpy(),
        "route": state.route_pts[b][state.route_valid[b]].cpu().numpy(),
        "time": float(state.step[b]) * world.cfg.dt,
    }


def render_png(
    road_map: RoadMap,
    path: str | os.PathLike,
    frame: dict | None = None,
    center=None,
    radius: float | None = None,
    title: str | None = None,
    dpi: float = 100.0,
    size: tuple[int, int] | int | None = None,
    legend: bool = True,
) -> str:
    """Render a bird's-eye-view PNG of ``road_map`` (and ``frame``, if given) to ``path`` atomically.

    center: None for the whole town, an (x, y) point, or ``"ego"`` (agent 0 of ``frame``) for a square
    crop of half-size ``radius`` metres (default 50). size: (width, height) pixels or one int for a
    square; default 800x800 for crops and 1600 px on the long side for the whole town.
    Returns the path written.
    """
    if center is None:
        bounds = None
        x0, y0, x1, y1 = _geometry(road_map).bounds
        aspect = (x1 - x0 + 2 * _MAP_MARGIN) / (y1 - y0 + 2 * _MAP_MARGIN)
        default = (1600, max(16, round(1600 / aspect))) if aspect >= 1 else (max(16, round(1600 * aspect)), 1600)
    else:
        c = _ego_pos(frame) if isinstance(center, str) and center == "ego" else center
        bounds = _crop(c, 50.0 if radius is None else float(radius))
        default = (800, 800)
    if size is None:
        size = default
    elif isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    w, h = int(size[0]), int(size[1])
    fig, ax = new_figure(w, h, dpi)
    draw_map(ax, road_map, bounds)
    if frame is not None:
        draw_agents(ax, frame, title=title)
    elif title:
        ax.text(0.012, 0.988, title, transform=ax.transAxes, ha="left", va="top", fontsize=9, zorder=10,
                bbox=dict(boxstyle="round,pad=0.35", facecolor="white", edgecolor="#888888", alpha=0.8))  # fmt: skip
    if legend:
        _legend(ax, road_map, frame)
    rgb = frame_to_rgb(fig)
    return _atomic_write(path, lambda f: Image.fromarray(rgb).save(f, format="PNG", optimize=False))


def render_gif(
    road_map: RoadMap,
    frames: list[dict],
    path: str | os.PathLike,
    follow_ego: bool = True,
    radius: float = 40.0,
    fps: float = 10,
    size: int = 480,
    dpi: float = 100.0,
    title: str | None = None,
    legend: bool = False,
) -> str:
    """Render ``frames`` as an animated GIF (looping) at ``path``, written atomically.

    follow_ego: each image is a square crop of half-size ``radius`` m centred on the ego; otherwise one
    fixed view covering every ego position (padded by ``radius``). One figure is reused for all frames.
    Returns the path written.
    """
    frames = list(frames)
    if not frames:
        raise CraftError("render_gif needs at least one frame")
    if not fps or fps <= 0:
        raise CraftError(f"fps must be positive, got {fps}")
    fig, ax = new_figure(int(size), int(size), dpi)
    fixed = None
    if not follow_ego:
        egos = np.stack([_ego_pos(f) for f in frames])
        lo, hi = egos.min(0) - radius, egos.max(0) + radius
        fixed = (lo[0], lo[1], hi[0], hi[1])
    images = []
    for k, frame in enumerate(frames):
        bounds = _crop(_ego_pos(frame), radius) if follow_ego else fixed
        draw_map(ax, road_map, bounds)
        draw_agents(ax, frame, title=title)
        if legend and k == 0:
            _legend(ax, road_map, frame)
        images.append(Image.fromarray(frame_to_rgb(fig)).quantize(colors=255, method=Image.Quantize.MEDIANCUT))
    duration = max(20, int(round(1000.0 / fps)))

    def write(f):
        images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)

    return _atomic_write(path, write)


