"""Tests for craft.world.map: building (resampling, graph, conflicts, grid, validation) and the batched
queries (take, lane_pose, nearest_lane, drivable, light_states), each against an independent reference
(numpy interpolation, brute force over every segment, shapely, hand-computed values)."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
from shapely import contains_xy, points as shapely_points
from shapely.geometry import LineString
from shapely.ops import unary_union

from craft.errors import CraftError
from craft.world.map import (
    DRIVABLE,
    GRID_CELL,
    GRID_MARGIN,
    JunctionKind,
    LaneType,
    LightState,
    MapBatch,
    RawJunction,
    RawLane,
    RawLight,
    RawStop,
    RoadMap,
    VEHICLE_LANES,
    drivable,
    lane_candidates,
    lane_pose,
    lane_pose_at,
    light_states,
    nearest_lane,
    take,
)
from craft.world.towns import generate_town
from tests.handmaps import crossroads

DRIVING = int(LaneType.DRIVING)
VEHICLE = [int(t) for t in VEHICLE_LANES]


# ----------------------------------------------------------------------------- helpers
def _wrap(a):
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def _long(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.long)


def _f32(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def _raw_arc(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw polyline without repeated vertices, and the cumulative arc length at each vertex (float64)."""
    p = np.asarray(p, np.float64)
    keep = np.concatenate([[True], np.linalg.norm(np.diff(p, axis=0), axis=1) > 1e-9])
    p = p[keep]
    return p, np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])


def _raw_pose(p: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position and segment heading at arc length ``s`` (clamped) on the raw polyline ``p``."""
    p, cum = _raw_arc(p)
    s = np.clip(s, 0.0, cum[-1])
    pos = np.stack([np.interp(s, cum, p[:, 0]), np.interp(s, cum, p[:, 1])], -1)
    k = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(p) - 2)
    d = p[k + 1] - p[k]
    return pos, np.arctan2(d[:, 1], d[:, 0])


def _pair_dist(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of point(s) ``x`` to segments ``a -> b`` (broadcast), float64."""
    ab = b - a
    u = np.clip(((x - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-18), 0.0, 1.0)
    d = x - (a + u[..., None] * ab)
    return np.sqrt((d * d).sum(-1))


def _brute_segments(m: RoadMap, q: np.ndarray, types, radius: float):
    """Brute-force reference: for each query point, every segment (its start point index) of every lane of
    ``types`` whose bounding box lies within ``radius``, with its exact float64 distance. Lanes farther
    than ``radius`` are skipped only through their bounding box, so every segment within ``radius`` is
    there. Returns a list of (segment start indices, distances)."""
    lanes = np.nonzero(np.isin(m.lane_type, [int(t) for t in types]))[0]
    lo = np.array([m.lane_points(i).min(0) for i in lanes], np.float64)
    hi = np.array([m.lane_points(i).max(0) for i in lanes], np.float64)
    P = m.points.astype(np.float64)
    out = []
    for x in np.asarray(q, np.float64):
        gap = np.maximum(np.maximum(lo - x, x - hi), 0.0)
        sel = lanes[np.hypot(gap[:, 0], gap[:, 1]) <= radius]
        seg = np.concatenate([np.arange(m.lane_offset[i], m.lane_offset[i] + m.lane_count[i] - 1) for i in sel]
                             + [np.zeros(0, np.int64)]).astype(np.int64)
        out.append((seg, _pair_dist(x, P[seg], P[seg + 1])))
    return out


def _points_near_lanes(m: RoadMap, lanes: np.ndarray, rng, n: int, reach_extra: float):
    """Random points near random lanes of ``lanes``: lateral offset within half width + ``reach_extra``."""
    li = rng.choice(lanes, n)
    idx = m.lane_offset[li] + rng.integers(0, m.lane_count[li] - 1)
    a = m.points[idx].astype(np.float64)
    b = m.points[idx + 1].astype(np.float64)
    u = rng.uniform(0, 1, n)[:, None]
    c = a + u * (b - a)
    h = np.arctan2(*(b - a)[:, ::-1].T)
    off = rng.uniform(-1, 1, n) * (m.lane_width[li] / 2 + reach_extra)
    q = c + off[:, None] * np.stack([-np.sin(h), np.cos(h)], 1)
    return q.astype(np.float32), li, h


def _line(x0, y0, x1, y1, n=2):
    return np.stack([np.linspace(x0, x1, n), np.linspace(y0, y1, n)], 1)


def _ellipse_quarter(cx, cy, rx, ry, th0, th1, n=200):
    th = np.linspace(th0, th1, n)
    return np.stack([cx + rx * np.cos(th), cy + ry * np.sin(th)], 1)


def _ellipse_length(rx, ry, th0, th1, n=200001):
    th = np.linspace(th0, th1, n)
    d = np.hypot(rx * np.sin(th), ry * np.cos(th))
    return abs(float(np.trapezoid(d, th)) if hasattr(np, "trapezoid") else float(np.trapz(d, th)))


@pytest.fixture(scope="module")
def raw_town():
    """Town 0 together with the raw lanes the generator handed to :meth:`RoadMap.build`."""
    captured = {}
    orig = RoadMap.build

    def spy(name, lanes, *args, **kwargs):
        captured["lanes"] = [np.array(ln.points, dtype=np.float64, copy=True) for ln in lanes]
        return orig(name, lanes, *args, **kwargs)

    with mock.patch.object(RoadMap, "build", staticmethod(spy)):
        m = generate_town(0)
    assert len(captured["lanes"]) == m.num_lanes
    return m, captured["lanes"]


@pytest.fixture(scope="module")
def mb_town(town):
    return MapBatch([town])


# ============================================================================ resampling
def test_resampling_hand_polylines():
    rng = np.random.default_rng(1)
    raws = [
        _line(0, 0, 10, 0, 2),  # exactly 10 m
        _line(3, -2, 3, -2.4, 2),  # 0.4 m: shorter than the spacing
        _line(0, 0, 7.3, 5.1, 5),  # collinear vertices
        np.array([[0, 0], [4, 0], [4, 0], [4, 3], [1, 7]], float),  # corners + a repeated vertex
        np.cumsum(rng.normal(0, 2, (30, 2)), 0),  # random walk
    ]
    m = RoadMap.build("resample", [RawLane(p, 3.0, 10.0) for p in raws])
    for i, raw in enumerate(raws):
        p = m.lane_points(i).astype(np.float64)
        o, n = int(m.lane_offset[i]), int(m.lane_count[i])
        s = m.point_s[o : o + n].astype(np.float64)
        h = m.point_heading[o : o + n].astype(np.float64)
        assert (m.point_lane[o : o + n] == i).all()
        rp, cum = _raw_arc(raw)
        total = cum[-1]
        # the lane length is the raw polyline length, the point count ceil(length / 1 m) + 1 (>= 2)
        assert m.lane_length[i] == pytest.approx(total, rel=1e-6, abs=1e-5)
        assert n == max(2, math.ceil(total / 1.0 - 1e-9) + 1)
        # endpoints preserved
        np.testing.assert_allclose(p[0], rp[0], atol=1e-5)
        np.testing.assert_allclose(p[-1], rp[-1], atol=1e-5)
        # uniform arc-length stations at most 1 m apart, starting at 0 and ending at the length
        ds = np.diff(s)
        assert s[0] == 0.0
        assert s[-1] == pytest.approx(total, rel=1e-6, abs=1e-5)
        np.testing.assert_allclose(ds, total / (n - 1), rtol=1e-5, atol=1e-5)
        assert ds.max() <= 1.0 + 1e-5
        # every resampled point lies on the raw polyline at its station
        ref, _ = _raw_pose(raw, s)
        np.testing.assert_allclose(p, ref, atol=1e-4)
        # heading = direction of the segment to the next point (last point repeats the last segment's)
        d = np.diff(p, axis=0)
        seg_h = np.arctan2(d[:, 1], d[:, 0])
        np.testing.assert_allclose(_wrap(h[:-1] - seg_h), 0.0, atol=1e-4)
        assert abs(_wrap(h[-1] - seg_h[-1])) < 1e-4
        if i in (0, 1, 2):  # straight lanes: chord distance is arc length exactly
            cumd = np.concatenate([[0.0], np.cumsum(np.linalg.norm(d, axis=1))])
            np.testing.assert_allclose(s, cumd, atol=1e-4)
            np.testing.assert_allclose(np.linalg.norm(d, axis=1), total / (n - 1), atol=1e-4)


def test_resampling_town_lanes_uniform(town):
    """On the (smooth, finely sampled) town lanes: ~1 m uniform spacing, point_s = cumulative distance."""
    d = np.diff(town.points.astype(np.float64), axis=0)
    dist = np.linalg.norm(d, axis=1)
    same = town.point_lane[:-1] == town.point_lane[1:]
    ds = np.diff(town.point_s.astype(np.float64))
    # stations: uniform per lane, spacing in (length / (length + 1), 1]
    spacing = town.lane_length / (town.lane_count - 1)
    np.testing.assert_allclose(ds[same], spacing[town.point_lane[:-1][same]], rtol=1e-4, atol=1e-4)
    assert (spacing <= 1.0 + 1e-5).all()
    # ceil(length / 1 m) + 1 points (float32 lengths: allow an integer length either way)
    assert (town.lane_length <= town.lane_count - 1 + 1e-4).all()
    assert (town.lane_length >= np.where(town.lane_count > 2, town.lane_count - 2 - 1e-4, 0.1)).all()
    # chord distances ~ spacing (lanes are smooth) and cumulate to point_s
    assert np.abs(dist[same] - ds[same]).max() < 0.02
    for i in range(0, town.num_lanes, 7):
        o, n = int(town.lane_offset[i]), int(town.lane_count[i])
        cum = np.concatenate([[0.0], np.cumsum(dist[o : o + n - 1])])
        # chords of tight connector curves are up to ~0.2 % shorter than the arc; walk lanes have kinks at
        # their corners, where a chord cutting the corner is up to ~1 % shorter
        rtol = 3e-3 if town.lane_type[i] in VEHICLE else 1e-2
        np.testing.assert_allclose(town.point_s[o : o + n], cum, rtol=rtol, atol=2e-3)
        assert town.point_s[o] == 0.0
    # headings equal the direction to the next point of the same lane
    seg_h = np.arctan2(d[:, 1], d[:, 0])
    assert np.abs(_wrap(town.point_heading[:-1][same] - seg_h[same])).max() < 1e-3
    # lanes are contiguous blocks in order
    assert town.lane_offset[0] == 0
    np.testing.assert_array_equal(town.lane_offset[1:], np.cumsum(town.lane_count)[:-1])
    assert town.lane_offset[-1] + town.lane_count[-1] == len(town.points)


def test_resampling_town_matches_raw_polylines(raw_town):
    m, raws = raw_town
    for i in range(0, m.num_lanes, 5):
        o, n = int(m.lane_offset[i]), int(m.lane_count[i])
        rp, cum = _raw_arc(raws[i])
        assert m.lane_length[i] == pytest.approx(cum[-1], rel=1e-5, abs=1e-4)
        np.testing.assert_allclose(m.points[o], rp[0], atol=1e-3)
        np.testing.assert_allclose(m.points[o + n - 1], rp[-1], atol=1e-3)
        ref, _ = _raw_pose(raws[i], m.point_s[o : o + n].astype(np.float64))
        np.testing.assert_allclose(m.points[o : o + n], ref, atol=2e-3)


@pytest.mark.parametrize("radius,angle", [(20.0, math.pi / 2), (6.0, math.pi), (50.0, 0.3)])
def test_circular_arc_length(radius, angle):
    th = np.linspace(-math.pi / 2, -math.pi / 2 + angle, 400)
    pts = np.stack([radius * np.cos(th), radius * (1 + np.sin(th))], 1)  # starts at origin heading +x
    m = RoadMap.build("arc", [RawLane(pts, 3.5, 10.0)])
    exact = radius * angle
    assert m.lane_length[0] == pytest.approx(exact, rel=1e-4)
    assert m.lane_count[0] == math.ceil(exact - 1e-4) + 1
    p = m.lane_points(0).astype(np.float64)
    # resampled points stay on the circle and chords subtend equal angles
    np.testing.assert_allclose(np.hypot(p[:, 0], p[:, 1] - radius), radius, atol=1e-3)
    # equal stations of at most 1 m, i.e. equal chords 2 R sin(ds / 2R)
    s = m.point_s.astype(np.float64)
    ds = exact / (len(p) - 1)
    assert ds <= 1.0
    np.testing.assert_allclose(np.diff(s), ds, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(np.diff(p, axis=0), axis=1), 2 * radius * np.sin(ds / 2 / radius),
                               atol=1e-4)
    # heading of each chord = tangent at the chord's mid angle
    mid = -math.pi / 2 + (s[:-1] + s[1:]) / 2 / radius
    np.testing.assert_allclose(_wrap(m.point_heading[:-1] - (mid + math.pi / 2)), 0.0, atol=2e-3)


# ============================================================================ graph
def test_predecessors_invert_successors(town):
    succ_pairs = {(i, j) for i in range(town.num_lanes) for j in town.successors(i)}
    pred_pairs = {(i, j) for j in range(town.num_lanes) for i in town.predecessors(j)}
    assert succ_pairs == pred_pairs
    assert len(succ_pairs) > town.num_lanes // 2


def test_lane_light_and_stop_propagate_to_connectors(town):
    for k, lane in enumerate(town.light_lane):
        assert town.lane_light[lane] == k
        for c in town.successors(int(lane)):
            if town.lane_junction[c] >= 0:
                assert town.lane_light[c] == k
    for k, lane in enumerate(town.stop_lane):
        assert town.lane_stop[lane] == k
    # light position / heading: end of the controlled lane
    ends = town.lane_offset[town.light_lane] + town.lane_count[town.light_lane] - 1
    np.testing.assert_allclose(town.light_pos, town.points[ends])
    np.testing.assert_allclose(town.light_heading, town.point_heading[ends])


# ============================================================================ take
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("rest", [(), (2,), (3, 2)])
def test_take_matches_advanced_indexing(k, rest):
    g = torch.Generator().manual_seed(10 * k + len(rest))
    M, dims = 3, (5, 4, 6)[:k]
    table = torch.randn((M, *dims, *rest), generator=g)
    Q = (7, 3)
    map_id = torch.randint(0, M, Q, generator=g)
    idx = [torch.randint(0, d, Q, generator=g) for d in dims]
    out = take(table, map_id, *idx)
    assert out.shape == (*Q, *rest)
    torch.testing.assert_close(out, table[(map_id, *idx)], rtol=0, atol=0)
    # broadcasting: map_id (7, 1) against indices (7, 3); integer tables too
    mid = map_id[:, :1]
    torch.testing.assert_close(take(table, mid, *idx), table[(mid.expand(Q), *idx)], rtol=0, atol=0)
    itab = torch.randint(-5, 5, (M, *dims, *rest), generator=g)
    torch.testing.assert_close(take(itab, map_id, *idx), itab[(map_id, *idx)], rtol=0, atol=0)


# ============================================================================ lane_pose
def test_lane_pose_matches_raw_interpolation(raw_town):
    m, raws = raw_town
    mb = MapBatch([m])
    rng = np.random.default_rng(2)
    N = 3000
    lane = rng.integers(0, m.num_lanes, N)
    length = m.lane_length[lane].astype(np.float64)
    s = rng.uniform(-0.2, 1.2, N) * length
    s[:20] = -5.0  # clamped below 0
    s[20:40] = length[20:40] + 7.0  # clamped beyond the end
    s[40:60] = length[40:60]  # exactly at the end
    s = s.astype(np.float32)
    pos, head = lane_pose(mb, torch.zeros(N, dtype=torch.long), _long(lane), torch.from_numpy(s))
    assert pos.shape == (N, 2) and head.shape == (N,)
    pos, head = pos.numpy().astype(np.float64), head.numpy().astype(np.float64)
    ref_pos = np.zeros((N, 2))
    ref_head = np.zeros(N)
    chord_head = np.zeros(N)
    for i in range(N):
        L = lane[i]
        p, h = _raw_pose(raws[L], np.array([float(s[i])]))
        ref_pos[i], ref_head[i] = p[0], h[0]
        # chord of the raw polyline across the 1 m resampling interval that contains s
        n = int(m.lane_count[L])
        sp = length[i] / (n - 1)
        k = min(int(np.clip(s[i], 0, length[i]) / sp), n - 2)
        ab, _ = _raw_pose(raws[L], np.array([k * sp, (k + 1) * sp]))
        chord_head[i] = math.atan2(ab[1, 1] - ab[0, 1], ab[1, 0] - ab[0, 0])
    # position: the chord between resampled points deviates from the raw curve by a few mm at most
    err = np.linalg.norm(pos - ref_pos, axis=1)
    assert err.max() < 0.03, err.max()  # sagitta of a 1 m chord on the tightest (~5 m radius) curves
    assert np.median(err) < 1e-3
    # heading: the resampled chord's direction
    assert np.abs(_wrap(head - chord_head)).max() < 2e-3
    # raw tangent: up to half a chord of turning on vehicle lanes (walk lanes have sharper corners)
    veh = np.isin(m.lane_type[lane], VEHICLE)
    assert np.abs(_wrap(head - ref_head))[veh].max() < 0.15
    assert np.abs(_wrap(head - ref_head)).max() < 0.4
    # clamping: s < 0 -> lane start, s > length -> lane end
    start = m.points[m.lane_offset[lane[:20]]]
    end = m.points[m.lane_offset[lane[20:60]] + m.lane_count[lane[20:60]] - 1]
    np.testing.assert_allclose(pos[:20], start, atol=1e-4)
    np.testing.assert_allclose(pos[20:60], end, atol=1e-3)
    np.testing.assert_allclose(
        _wrap(head[20:60] - m.point_heading[m.lane_offset[lane[20:60]] + m.lane_count[lane[20:60]] - 1]), 0,
        atol=1e-6)


def test_lane_pose_broadcast_map_id_and_shapes(town, mb_town):
    rng = np.random.default_rng(3)
    lane = _long(rng.integers(0, town.num_lanes, (6, 5)))
    s = _f32(rng.uniform(0, 30, (6, 5)))
    pos_full, h_full = lane_pose(mb_town, torch.zeros(6, 5, dtype=torch.long), lane, s)
    assert pos_full.shape == (6, 5, 2) and h_full.shape == (6, 5)
    for mid in (torch.tensor(0), torch.zeros(1, dtype=torch.long), torch.zeros(6, 1, dtype=torch.long)):
        pos, h = lane_pose(mb_town, mid, lane, s)
        torch.testing.assert_close(pos, pos_full, rtol=0, atol=0)
        torch.testing.assert_close(h, h_full, rtol=0, atol=0)
    flat_p, flat_h = lane_pose(mb_town, torch.zeros(30, dtype=torch.long), lane.reshape(-1), s.reshape(-1))
    torch.testing.assert_close(flat_p.reshape(6, 5, 2), pos_full)
    # lane_pose_at with looked-up offset / count / length gives the same poses
    L = lane.reshape(-1)
    z = torch.zeros(30, dtype=torch.long)
    p2, h2 = lane_pose_at(mb_town, z, mb_town.lane_offset[0, L], mb_town.lane_count[0, L],
                          mb_town.lane_length[0, L], s.reshape(-1))
    torch.testing.assert_close(p2, flat_p, rtol=0, atol=0)
    torch.testing.assert_close(h2, flat_h, rtol=0, atol=0)


def _np_lane_pose(m: RoadMap, lane: np.ndarray, s: np.ndarray):
    """lane_pose reference on a single map's resampled points (numpy interpolation, float64)."""
    pos = np.zeros((len(lane), 2))
    head = np.zeros(len(lane))
    for i, (L, si) in enumerate(zip(lane, s)):
        o, n = int(m.lane_offset[L]), int(m.lane_count[L])
        ps = m.point_s[o : o + n].astype(np.float64)
        p = m.points[o : o + n].astype(np.float64)
        sc = float(np.clip(si, 0, ps[-1]))
        pos[i] = np.interp(sc, ps, p[:, 0]), np.interp(sc, ps, p[:, 1])
        k = min(int(np.searchsorted(ps, sc, side="right")) - 1, n - 2)
        head[i] = m.point_heading[o + k]
    return pos, head


def test_lane_pose_on_batch_of_two_towns(towns):
    a, b = towns[0], towns[1]
    assert a.points.shape != b.points.shape and a.num_lanes != b.num_lanes
    mb = MapBatch([a, b])
    assert mb.points.shape[1] == max(len(a.points), len(b.points))
    assert mb.lane_valid.sum(1).tolist() == [a.num_lanes, b.num_lanes]
    rng = np.random.default_rng(4)
    N = 600
    map_id = rng.integers(0, 2, N)
    nl = np.where(map_id == 0, a.num_lanes, b.num_lanes)
    lane = (rng.uniform(0, 1, N) * nl).astype(np.int64)
    # include the last lane of each map (right before the padding)
    lane[:2], map_id[:2] = [a.num_lanes - 1, b.num_lanes - 1], [0, 1]
    length = np.where(map_id == 0, a.lane_length[np.minimum(lane, a.num_lanes - 1)],
                      b.lane_length[np.minimum(lane, b.num_lanes - 1)])
    s = (rng.uniform(-0.1, 1.1, N) * length).astype(np.float32)
    s[2:4], map_id[2:4], lane[2:4] = 1e4, [0, 1], [a.num_lanes - 1, b.num_lanes - 1]  # clamped at the end
    pos, head = lane_pose(mb, _long(map_id), _long(lane), torch.from_numpy(s))
    for k, m in enumerate((a, b)):
        sel = map_id == k
        ref_p, ref_h = _np_lane_pose(m, lane[sel], s[sel])
        np.testing.assert_allclose(pos[sel].numpy(), ref_p, atol=2e-3)
        np.testing.assert_allclose(_wrap(head[sel].numpy() - ref_h), 0, atol=1e-5)
        # identical to a batch of that map alone
        single_p, single_h = lane_pose(MapBatch([m]), torch.zeros(int(sel.sum()), dtype=torch.long),
                                       _long(lane[sel]), torch.from_numpy(s[sel]))
        torch.testing.assert_close(pos[sel], single_p, rtol=0, atol=0)
        torch.testing.assert_close(head[sel], single_h, rtol=0, atol=0)


# ============================================================================ nearest_lane
@pytest.mark.parametrize("types", [(LaneType.DRIVING,), tuple(DRIVABLE), (LaneType.SIDEWALK, LaneType.CROSSWALK)])
def test_nearest_lane_matches_brute_force(town, mb_town, types):
    rng = np.random.default_rng(5 + len(types))
    lanes = np.nonzero(np.isin(town.lane_type, [int(t) for t in types]))[0]
    N = 400
    q, _, _ = _points_near_lanes(town, lanes, rng, N, 1.0)
    # every point is within half width + 1 m of a lane of these types, so the nearest is within 3.5 m
    ref_segs = _brute_segments(town, q, types, float(town.lane_width.max()) / 2 + 1.0 + 1e-3)
    ref = np.array([d.min() for _, d in ref_segs])
    r = nearest_lane(mb_town, torch.zeros(N, dtype=torch.long), torch.from_numpy(q), types=types)
    lane = r["lane"].numpy()
    assert (lane >= 0).all()
    np.testing.assert_allclose(r["dist"].numpy(), ref, atol=1e-4)
    assert np.isin(town.lane_type[lane], [int(t) for t in types]).all()
    # the returned lane really is at that distance
    own = np.array([d[town.point_lane[sg] == ln].min() for (sg, d), ln in zip(ref_segs, lane)])
    np.testing.assert_allclose(own, ref, atol=1e-4)
    # s / lateral / width / heading describe the projection onto the returned lane
    np.testing.assert_allclose(np.abs(r["lateral"].numpy()), r["dist"].numpy(), atol=1e-6)
    np.testing.assert_allclose(r["width"].numpy(), town.lane_width[lane])
    s = r["s"].numpy()
    assert (s >= -1e-4).all() and (s <= town.lane_length[lane] + 1e-3).all()
    pos, h = lane_pose(mb_town, torch.zeros(N, dtype=torch.long), _long(lane), r["s"])
    pos, h = pos.numpy().astype(np.float64), h.numpy()
    np.testing.assert_allclose(np.linalg.norm(q - pos, axis=1), r["dist"].numpy(), atol=2e-3)
    rel = q - pos
    cross = np.cos(h) * rel[:, 1] - np.sin(h) * rel[:, 0]  # > 0: point left of the lane
    lat = r["lateral"].numpy()
    big = np.abs(lat) > 0.05
    assert (np.sign(cross[big]) == np.sign(lat[big])).all()


def test_grid_candidates_cover_reach(town, mb_town):
    """Every segment within half width + GRID_MARGIN of a point is among its grid candidates (CSR grid)."""
    rng = np.random.default_rng(6)
    q, _, _ = _points_near_lanes(town, np.arange(town.num_lanes), rng, 300, 2.0)
    ref_segs = _brute_segments(town, q, list(LaneType), float(town.lane_width.max()) / 2 + GRID_MARGIN)
    P = town.points.astype(np.float64)
    cand = lane_candidates(mb_town, torch.zeros(len(q), dtype=torch.long), torch.from_numpy(q))
    # recover the candidate segment ids through the grid tables
    items = mb_town.grid_items[0]
    cell = np.floor((q - town.grid_origin) / GRID_CELL).astype(np.int64)
    cid = cell[:, 0] * town.grid_shape[1] + cell[:, 1]
    for k in range(len(q)):
        st, ct = int(town.grid_start[cid[k]]), int(town.grid_count[cid[k]])
        got = items[st : st + ct].numpy()
        seg, d = ref_segs[k]
        reach = town.lane_width[town.point_lane[seg]] / 2 + GRID_MARGIN - 1e-3
        assert set(seg[d <= reach].tolist()) <= set(got.tolist())
        assert (town.point_lane[got] == town.point_lane[got + 1]).all()  # real segments only
        assert int(cand["ok"][k].sum()) == ct
        # candidate distances / lanes equal the brute-force ones of those segments
        cd = cand["dist"][k][cand["ok"][k]].numpy()
        np.testing.assert_allclose(cd, _pair_dist(q[k].astype(np.float64), P[got], P[got + 1]), atol=1e-4)
        np.testing.assert_array_equal(cand["lane"][k][cand["ok"][k]].numpy(), town.point_lane[got])


def test_nearest_lane_heading_resolves_crossing():
    m = crossroads()
    mb = MapBatch([m])
    q = _f32([[0.3, 0.2], [0.3, 0.2], [0.3, 0.2], [-0.25, 0.1]])
    head = _f32([0.0, math.pi / 2, math.pi, math.pi / 2])
    r0 = nearest_lane(mb, torch.zeros(4, dtype=torch.long), q)
    assert r0["lane"].tolist() == [2, 2, 2, 2]  # no heading: the closer W->E connector (y = 0)
    r = nearest_lane(mb, torch.zeros(4, dtype=torch.long), q, heading=head)
    # heading pi: driving against lane 2 costs 0.2 + 4, across lane 3 only 0.3 + 2
    assert r["lane"].tolist() == [2, 3, 3, 3]
    np.testing.assert_allclose(r["dist"].numpy(), [0.2, 0.3, 0.3, 0.25], atol=1e-6)
    np.testing.assert_allclose(r["heading_diff"].numpy(), [0, 0, math.pi / 2, 0], atol=1e-6)
    np.testing.assert_allclose(r["s"].numpy(), [8.3, 8.2, 8.2, 8.1], atol=1e-5)
    np.testing.assert_allclose(r["lateral"].numpy(), [0.2, -0.3, -0.3, 0.25], atol=1e-6)


def test_nearest_lane_heading_at_town_junction(town, mb_town):
    """Where two connectors of different direction cross, the heading picks the one driven along."""
    conn = np.nonzero((town.lane_junction >= 0) & (town.lane_type == DRIVING))[0]
    pts, heads, want = [], [], []
    for a in conn:
        for j, sa, sb in zip(town.lane_conflict[a], town.lane_conflict_s[a], town.lane_conflict_other_s[a]):
            if j < 0 or sa < 1.0 or sa > town.lane_length[a] - 1.0:
                continue
            pa, ha = lane_pose(mb_town, torch.tensor(0), torch.tensor([int(a)]), torch.tensor([float(sa)]))
            _, hb = lane_pose(mb_town, torch.tensor(0), torch.tensor([int(j)]), torch.tensor([float(sb)]))
            if abs(_wrap(float(ha) - float(hb))) > 0.8:  # a real crossing
                pts.append(pa[0].numpy())
                heads.append(float(ha))
                want.append(int(a))
    assert len(want) > 20
    q = torch.from_numpy(np.array(pts, np.float32))
    N = len(want)
    r = nearest_lane(mb_town, torch.zeros(N, dtype=torch.long), q, heading=_f32(heads))
    # brute-force heading-aware cost: dist + 2 * (1 - cos(heading difference)), minimised over segments
    # (each point lies on its own connector, cost ~0: only segments within 1 m can compete)
    P = town.points.astype(np.float64)
    best = []
    for (seg, d), h in zip(_brute_segments(town, q.numpy(), (LaneType.DRIVING,), 1.0), heads):
        ab = P[seg + 1] - P[seg]
        best.append((d + 2.0 * (1 - np.cos(h - np.arctan2(ab[:, 1], ab[:, 0])))).min())
    got = r["dist"].numpy() + 2.0 * (1 - np.cos(r["heading_diff"].numpy()))
    np.testing.assert_allclose(got, best, atol=1e-3)
    lane = r["lane"].numpy()
    # the chosen lane is aligned with the heading (the crossing connector is not)
    assert (np.abs(r["heading_diff"].numpy()) < 0.3).all()
    assert np.mean(lane == np.array(want)) > 0.8  # others: a same-direction lane overlapping there


def test_nearest_lane_far_points(towns):
    a, b = towns[0], towns[1]
    mb = MapBatch([a, b])
    x0, y0, x1, y1 = a.bounds
    q = _f32([[x0 - 500, y0 - 500], [x1 + 1e4, y1], [1e7, -1e7], [x0 - 30.0, (y0 + y1) / 2]])
    mid = torch.tensor([0, 1, 0, 0])
    r = nearest_lane(mb, mid, q)
    assert r["lane"].tolist() == [-1, -1, -1, -1]
    assert torch.isinf(r["dist"]).all()
    assert not drivable(mb, mid, q).any()
    # inside the bounding box but far from any driving lane: beyond the widened segment box (half width +
    # GRID_MARGIN, times sqrt 2 at its corners) plus a grid cell diagonal, no grid cell can list a lane
    rng = np.random.default_rng(7)
    cand = np.stack([rng.uniform(x0, x1, 1500), rng.uniform(y0, y1, 1500)], 1).astype(np.float32)
    reach = (float(a.lane_width.max()) / 2 + GRID_MARGIN + GRID_CELL) * math.sqrt(2) + 0.1
    ref = _brute_segments(a, cand, (LaneType.DRIVING,), reach)
    far = np.array([len(d) == 0 or d.min() > reach for _, d in ref])
    assert far.sum() > 100
    r = nearest_lane(mb, torch.zeros(int(far.sum()), dtype=torch.long), torch.from_numpy(cand[far]))
    assert (r["lane"] == -1).all() and torch.isinf(r["dist"]).all()
    # in a batch, each map is queried in its own grid: points near lanes of either map, asked of both maps,
    # give what a batch of that map alone gives (no leaking through padded grid / point tables)
    q0, _, _ = _points_near_lanes(a, np.nonzero(a.lane_type == DRIVING)[0], rng, 200, 0.0)
    q1, _, _ = _points_near_lanes(b, np.nonzero(b.lane_type == DRIVING)[0], rng, 200, 0.0)
    qq = torch.from_numpy(np.concatenate([q0, q1]))
    for k, m in enumerate((a, b)):
        r = nearest_lane(mb, torch.full((400,), k, dtype=torch.long), qq)
        single = nearest_lane(MapBatch([m]), torch.zeros(400, dtype=torch.long), qq)
        for key in ("lane", "dist", "s", "lateral", "width"):
            torch.testing.assert_close(r[key], single[key], rtol=0, atol=0)
        assert (r["lane"][200 * k : 200 * (k + 1)] >= 0).all()
        own = slice(200 * k, 200 * (k + 1))
        assert (r["dist"][own] <= r["width"][own] / 2 + 1e-3).all()


_REACH_BUG = (
    "nearest_lane() documents that only lanes within half width + GRID_MARGIN are found and lane -1 is "
    "returned if none is within reach, but lane_candidates() returns every segment binned in the query's 4 m "
    "grid cell and pick_lane() never checks the distance against the reach, so lanes up to ~9 m beyond their "
    "half width are returned or not depending on where the grid cell boundaries fall"
)


def test_nearest_lane_reach_is_half_width_plus_margin():
    m = RoadMap.build("reach", [RawLane(_line(0, 0, 100, 0), 3.5, 10.0)])
    mb = MapBatch([m])
    reach = 1.75 + GRID_MARGIN
    ys = np.linspace(reach + 0.01, reach + 6.0, 50)
    q = np.stack([np.full_like(ys, 50.0), ys], 1).astype(np.float32)
    r = nearest_lane(mb, torch.zeros(len(q), dtype=torch.long), torch.from_numpy(q))
    assert (r["lane"] == -1).all(), r["dist"][r["lane"] >= 0]


# ============================================================================ drivable
def _drivable_union(m: RoadMap):
    polys = [LineString(m.lane_points(i).astype(np.float64)).buffer(float(m.lane_width[i]) / 2, cap_style=2)
             for i in range(m.num_lanes) if int(m.lane_type[i]) in [int(t) for t in DRIVABLE]]
    return unary_union(polys)


def _compare_drivable(m: RoadMap, q: np.ndarray, tol: float = 0.2):
    U = _drivable_union(m)
    qq = q.astype(np.float64)
    inside = contains_xy(U, qq[:, 0], qq[:, 1])
    near_boundary = U.boundary.distance(shapely_points(qq)) <= tol
    got = drivable(MapBatch([m]), torch.zeros(len(q), dtype=torch.long), torch.from_numpy(q)).numpy()
    bad = (got != inside) & ~near_boundary
    return got, inside, bad


def _hand_drivable_map() -> RoadMap:
    """Equal-width driving / shoulder / parking lanes, a curve and a crossing; no dead ends inside the area
    sampled by the tests (the lanes run to the map edge)."""
    th = np.linspace(-math.pi / 2, 0, 60)
    curve = np.stack([60 + 20 * np.cos(th), 20 + 20 * np.sin(th)], 1)  # (60, 0) -> (80, 20)
    lanes = [
        RawLane(_line(-100, 0, 60, 0), 3.5, 10.0, successors=[1]),
        RawLane(curve, 3.5, 10.0, successors=[2]),
        RawLane(_line(80, 20, 80, 200), 3.5, 10.0),
        RawLane(_line(-100, -3.5, 200, -3.5), 3.5, 10.0, LaneType.SHOULDER),
        RawLane(_line(-100, 3.5, 200, 3.5), 3.5, 10.0, LaneType.PARKING),  # overlaps the curve
        RawLane(_line(0, -100, 0, 200), 3.5, 10.0),  # crosses the straight lanes
        RawLane(_line(-100, 30, 60, 30), 2.0, 2.0, LaneType.SIDEWALK),  # not drivable
    ]
    return RoadMap.build("drivable", lanes)


def test_drivable_matches_shapely_hand_map():
    m = _hand_drivable_map()
    rng = np.random.default_rng(8)
    q = np.stack([rng.uniform(-80, 95, 20000), rng.uniform(-80, 130, 20000)], 1).astype(np.float32)
    near, _, _ = _points_near_lanes(m, np.arange(m.num_lanes), rng, 30000, 2.0)
    near = near[(near[:, 0] > -80) & (near[:, 0] < 95) & (near[:, 1] > -80) & (near[:, 1] < 130)]
    q = np.concatenate([q, near])
    got, inside, bad = _compare_drivable(m, q)
    assert inside.sum() > 10000 and (~inside).sum() > 10000
    assert not bad.any(), q[bad][:10]
    # on the sidewalk: not drivable
    assert not drivable(MapBatch([m]), torch.zeros(1, dtype=torch.long), _f32([[-50.0, 30.0]])).any()
    # margin widens the lanes
    mb = MapBatch([m])
    edge = _f32([[-50.0, -5.25 - 0.3], [-50.0, 5.25 + 0.3]])
    assert not drivable(mb, torch.zeros(2, dtype=torch.long), edge).any()
    assert drivable(mb, torch.zeros(2, dtype=torch.long), edge, margin=0.5).all()


_DRIVABLE_BUG = (
    "drivable() tests only the lane whose centreline is nearest (pick_lane by distance) against that lane's "
    "half width; a point inside a wide lane but nearer to the centreline of a narrower neighbour (e.g. the "
    "outer 0.25 m of a 3.5 m driving lane next to a 2.5 m parking lane, 0.125 m next to a 3 m shoulder) is "
    "reported off-road"
)
_CAP_BUG = (
    "drivable() uses point-to-segment distance, so a lane counts as drivable up to half its width beyond its "
    "dead ends (round caps): points past the end of a parking lane / shoulder / start of a lane with no "
    "predecessor are reported on-road although no lane covers them"
)


def test_drivable_adjacent_lanes_of_different_width():
    lanes = [
        RawLane(_line(0, 0, 100, 0), 3.5, 10.0),  # covers y in [-1.75, 1.75]
        RawLane(_line(0, -3.0, 100, -3.0), 2.5, 5.0, LaneType.PARKING),  # covers y in [-4.25, -1.75]
    ]
    m = RoadMap.build("parking-strip", lanes)
    q = _f32([[50.0, -1.6], [50.0, -1.7], [50.0, -1.55]])  # inside the driving lane
    assert drivable(MapBatch([m]), torch.zeros(3, dtype=torch.long), q).all()


def test_drivable_not_beyond_dead_end():
    m = RoadMap.build("dead-end", [RawLane(_line(0, 0, 100, 0), 3.5, 10.0)])
    q = _f32([[100.8, 0.0], [-0.8, 0.0], [101.0, 0.5]])  # past the ends: on no lane
    assert not drivable(MapBatch([m]), torch.zeros(3, dtype=torch.long), q).any()


def test_drivable_matches_shapely_town(town):
    rng = np.random.default_rng(9)
    lanes = np.nonzero(np.isin(town.lane_type, [int(t) for t in DRIVABLE]))[0]
    q, _, _ = _points_near_lanes(town, lanes, rng, 20000, 3.0)
    _, inside, bad = _compare_drivable(town, q)
    assert inside.sum() > 5000
    # where a lane ends and its successor starts at another heading, both flat ends leave a hairline wedge;
    # the two geometries may resolve such a wedge differently: allow 1 in 5,000
    assert bad.sum() <= 4, f"{bad.sum()} disagreements, e.g. {q[bad][:5].tolist()}"


# ============================================================================ light_states
def _light_map(n_lights: int, offset: float) -> RoadMap:
    r = 8.0
    lanes = [
        RawLane(_line(-100, 0, -r, 0), 3.5, 12.0, successors=[2]),
        RawLane(_line(0, -100, 0, -r), 3.5, 12.0, successors=[3]),
        RawLane(_line(-r, 0, r, 0), 3.5, 12.0, junction=0, successors=[4]),
        RawLane(_line(0, -r, 0, r), 3.5, 12.0, junction=0, successors=[5]),
        RawLane(_line(r, 0, 100, 0), 3.5, 12.0),
        RawLane(_line(0, r, 0, 100), 3.5, 12.0),
    ]
    junctions = [RawJunction((0.0, 0.0), r, JunctionKind.SIGNAL, green=10.0, yellow=3.0, all_red=1.0,
                             n_phases=2, offset=offset)]
    lights = [RawLight(0, 0, 0), RawLight(1, 0, 1)][:n_lights]
    return RoadMap.build(f"lights{n_lights}", lanes, junctions, lights)


def _ref_light(t: float, phase: int, offset: float = 2.0) -> int:
    tau = (t + offset) % 28.0
    start = 14.0 * phase
    if start <= tau < start + 10.0:
        return int(LightState.GREEN)
    if start + 10.0 <= tau < start + 13.0:
        return int(LightState.YELLOW)
    return int(LightState.RED)


def test_light_states_cycle():
    mb = MapBatch([_light_map(2, 2.0), _light_map(1, 2.0), _light_map(0, 2.0)])
    assert mb.light_valid.tolist() == [[True, True], [True, False], [False, False]]
    times = [0.0, 5.0, 7.9, 8.0, 9.5, 10.9, 11.0, 11.5, 12.0, 13.0, 21.9, 22.0, 24.5, 25.0, 26.0, 27.9, 28.0,
             36.0, 100.25, 1000.5, -2.0, -5.0, -15.0]
    # phase 0 (hand-computed): green for (t+2) mod 28 in [0,10), yellow [10,13), red [13,28)
    phase0 = {0.0: "G", 7.9: "G", 8.0: "Y", 10.9: "Y", 11.0: "R", 21.9: "R", 26.0: "G", 36.0: "Y", -2.0: "G"}
    # phase 1: green for (t+2) mod 28 in [14,24), yellow [24,27), red otherwise
    phase1 = {0.0: "R", 11.5: "R", 12.0: "G", 21.9: "G", 22.0: "Y", 24.5: "Y", 25.0: "R", 26.0: "R",
              -5.0: "Y", -15.0: "G"}
    code = {"G": int(LightState.GREEN), "Y": int(LightState.YELLOW), "R": int(LightState.RED)}
    for t, c in phase0.items():
        assert _ref_light(t, 0) == code[c], t
    for t, c in phase1.items():
        assert _ref_light(t, 1) == code[c], t
    T = len(times)
    map_id = torch.arange(3).repeat_interleave(T)
    t = _f32(times * 3)
    st = light_states(mb, map_id, t)
    assert st.shape == (3 * T, 2) and st.dtype == torch.long
    st = st.view(3, T, 2)
    for k, tt in enumerate(times):
        assert st[0, k].tolist() == [_ref_light(tt, 0), _ref_light(tt, 1)], tt
        assert st[1, k].tolist() == [_ref_light(tt, 0), int(LightState.RED)], tt  # padded light: RED
        assert st[2, k].tolist() == [int(LightState.RED)] * 2, tt
    # at any time exactly one phase may be non-red, and never both green
    assert not ((st[0] == int(LightState.GREEN)).all(-1)).any()
    # every padded (invalid) light is RED at every time
    assert (st[~mb.light_valid[:, None, :].expand(3, T, 2)] == int(LightState.RED)).all()


def test_light_states_town(town, mb_town):
    """Every town light against the hand cycle of its junction's timing."""
    ts = np.array([0.0, 3.3, 17.0, 41.2, 77.7, 1234.5])
    st = light_states(mb_town, torch.zeros(len(ts), dtype=torch.long), _f32(ts)).numpy()
    assert st.shape == (len(ts), len(town.light_lane))
    for k in range(len(town.light_lane)):
        g, y, r, n, off = town.junction_timing[town.light_junction[k]].astype(np.float64)
        slot = g + y + r
        for i, t in enumerate(ts):
            tau = (np.float32(t) + off) % (slot * n)
            ph = int(tau // slot)
            within = tau - ph * slot
            if ph != town.light_phase[k]:
                want = LightState.RED
            else:
                want = LightState.GREEN if within < g else LightState.YELLOW if within < g + y else LightState.RED
            assert st[i, k] == int(want), (k, t)


# ============================================================================ plan_route
def _route_map() -> RoadMap:
    """Lanes 0 | 1 side by side (1 left of 0, 50 m); 0 -> 2 -> 3 -> 4 is a 50 + 200 + 50 m detour to the
    goal lane 4; 1 -> 4 directly. Lane 5 is a disconnected stub; lane 6 a sidewalk next to lane 0."""
    loop = np.array([[50, 0], [150, 0], [150, 100], [50, 100]], float)  # 300 m
    lanes = [
        RawLane(_line(0, 0, 50, 0), 3.5, 10.0, road=0, left=1, successors=[2]),
        RawLane(_line(0, 3.5, 50, 3.5), 3.5, 10.0, road=0, right=0, successors=[4]),
        RawLane(loop, 3.5, 10.0, road=1, successors=[3]),
        RawLane(_line(50, 100, 50, 50), 3.5, 10.0, road=2, successors=[4]),
        RawLane(_line(50, 3.5, 120, 3.5), 3.5, 10.0, road=3),
        RawLane(_line(-50, -50, -20, -50), 3.5, 10.0, road=4),
        RawLane(_line(0, -3.0, 50, -3.0), 2.0, 1.5, LaneType.SIDEWALK),
    ]
    return RoadMap.build("route", lanes)


def _ref_shortest(m: RoadMap, start: int, goal: int, lc: float):
    """Bellman-Ford over the lane graph (edges: successors cost = own length, left/right cost lc)."""
    L = m.num_lanes
    edges = [(i, j, float(m.lane_length[i])) for i in range(L) for j in m.successors(i)]
    edges += [(i, int(j), lc) for i in range(L) for j in (m.lane_left[i], m.lane_right[i]) if j >= 0]
    dist = np.full(L, np.inf)
    dist[start] = 0
    for _ in range(L):
        for i, j, w in edges:
            dist[j] = min(dist[j], dist[i] + w)
    return dist


def test_plan_route_shortest_with_lane_change():
    m = _route_map()
    assert m.lane_length[2] == pytest.approx(300.0)
    assert m.plan_route(0, 4) == [0, 1, 4]  # 30 (lane change) + 50 < 50 + 300 + 50
    assert m.plan_route(0, 4, lane_change_cost=500.0) == [0, 2, 3, 4]
    assert m.plan_route(0, 0) == [0]
    assert m.plan_route(2, 4) == [2, 3, 4]
    assert m.plan_route(1, 0) == [1, 0]
    for lc in (0.0, 30.0, 200.0, 500.0):
        for start in range(4):
            ref = _ref_shortest(m, start, 4, lc)
            route = m.plan_route(start, 4, lane_change_cost=lc)
            assert route[0] == start and route[-1] == 4
            cost = 0.0
            for i, j in zip(route, route[1:]):
                if j in m.successors(i):
                    cost += float(m.lane_length[i])
                else:
                    assert j in (m.lane_left[i], m.lane_right[i])
                    cost += lc
            assert cost == pytest.approx(ref[4], abs=1e-3)


def test_plan_route_errors_and_reachability():
    m = _route_map()
    with pytest.raises(CraftError, match="lane 0"):
        m.plan_route(4, 0)  # lanes only lead forward
    with pytest.raises(CraftError, match="lane 5"):
        m.plan_route(0, 5)
    for bad in (-1, m.num_lanes, 99):
        with pytest.raises(CraftError, match=f"lane {bad}"):
            m.plan_route(0, bad)
        with pytest.raises(CraftError, match=f"lane {bad}"):
            m.plan_route(bad, 0)
    assert m.reachable_from(0) == {0, 1, 2, 3, 4}
    assert m.reachable_from(3) == {3, 4}
    assert m.reachable_from(5) == {5}
    assert m.reachable_from(6, types=(LaneType.SIDEWALK,)) == {6}


def test_plan_route_town_is_shortest(town):
    rng = np.random.default_rng(11)
    drive = np.nonzero(town.lane_type == DRIVING)[0]
    start = int(rng.choice(drive))
    reach = sorted(town.reachable_from(start))
    ref = _ref_shortest(town, start, 0, 30.0)  # distances from start to every lane
    assert np.isfinite(ref[reach]).all()
    for goal in rng.choice(reach, 5, replace=False):
        route = town.plan_route(start, int(goal))
        cost = sum(float(town.lane_length[i]) if j in town.successors(i) else 30.0
                   for i, j in zip(route, route[1:]))
        assert cost == pytest.approx(ref[goal], rel=1e-5, abs=1e-3)


# ============================================================================ conflicts
def _crossing_map() -> RoadMap:
    """Single-lane 4-way crossing (lanes on the road axes), asymmetric arms: west box at x=-10, south at y=-6.

    Connectors: 4 W->E straight, 5 S->N straight, 6 W->N left turn, 7 S->E right turn. Exits: 2 east, 3 north.
    """
    lanes = [
        RawLane(_line(-100, 0, -10, 0), 3.5, 10.0, road=0, successors=[4, 6]),
        RawLane(_line(0, -100, 0, -6), 3.5, 10.0, road=1, successors=[5, 7]),
        RawLane(_line(8, 0, 100, 0), 3.5, 10.0, road=2),
        RawLane(_line(0, 8, 0, 100), 3.5, 10.0, road=3),
        RawLane(_line(-10, 0, 8, 0, 19), 3.5, 10.0, junction=0, successors=[2]),
        RawLane(_line(0, -6, 0, 8, 15), 3.5, 10.0, junction=0, successors=[3]),
        RawLane(_ellipse_quarter(-10, 8, 10, 8, -math.pi / 2, 0), 3.5, 8.0, junction=0, successors=[3], turn=1),
        RawLane(_ellipse_quarter(8, -6, 8, 6, math.pi, math.pi / 2), 3.5, 8.0, junction=0, successors=[2],
                turn=2),
    ]
    return RoadMap.build("crossing", lanes, [RawJunction((0.0, 0.0), 10.0, JunctionKind.UNCONTROLLED)])


def _conflict_dict(m: RoadMap):
    out = {}
    for i in range(m.num_lanes):
        for j, s, os in zip(m.lane_conflict[i], m.lane_conflict_s[i], m.lane_conflict_other_s[i]):
            if j >= 0:
                assert (i, int(j)) not in out
                out[(i, int(j))] = (float(s), float(os))
    return out


def test_conflicts_on_crossing():
    m = _crossing_map()
    c = _conflict_dict(m)
    len_left = _ellipse_length(10, 8, -math.pi / 2, 0)
    len_right = _ellipse_length(8, 6, math.pi, math.pi / 2)
    assert m.lane_length[6] == pytest.approx(len_left, rel=1e-3)
    assert m.lane_length[7] == pytest.approx(len_right, rel=1e-3)
    # straight connectors cross at the centre: 10 m along W->E, 6 m along S->N
    assert c[(4, 5)] == pytest.approx((10.0, 6.0), abs=1e-3)
    assert c[(5, 4)] == pytest.approx((6.0, 10.0), abs=1e-3)
    # merging into the same exit: conflict at both ends
    assert c[(6, 5)] == pytest.approx((m.lane_length[6], 14.0), abs=1e-3)
    assert c[(5, 6)] == pytest.approx((14.0, m.lane_length[6]), abs=1e-3)
    assert c[(7, 4)] == pytest.approx((m.lane_length[7], 18.0), abs=1e-3)
    # fanning out from one entry (4 / 6 from the west, 5 / 7 from the south): no conflict; 6 / 7 never meet
    assert set(c) == {(4, 5), (5, 4), (6, 5), (5, 6), (7, 4), (4, 7)}
    # non-connector lanes have none
    assert (m.lane_conflict[:4] == -1).all()
    # conflict points are the same place on both lanes
    mb = MapBatch([m])
    for (i, j), (s, os) in c.items():
        pi, _ = lane_pose(mb, torch.tensor(0), torch.tensor([i]), torch.tensor([s]))
        pj, _ = lane_pose(mb, torch.tensor(0), torch.tensor([j]), torch.tensor([os]))
        assert float((pi - pj).norm()) < 1e-3


def test_conflicts_town_symmetric(town):
    c = _conflict_dict(town)
    assert len(c) > 50
    for (i, j), (s, os) in c.items():
        assert c[(j, i)] == pytest.approx((os, s), abs=1e-5)
        assert town.lane_junction[i] == town.lane_junction[j] >= 0
        assert 0 <= s <= town.lane_length[i] + 1e-3 and 0 <= os <= town.lane_length[j] + 1e-3


# ============================================================================ validation
def _valid_lanes():
    return [
        RawLane(_line(0, 0, 50, 0), 3.5, 10.0, successors=[1]),
        RawLane(_line(50, 0, 100, 0), 3.5, 10.0),
        RawLane(_line(0, 3.5, 100, 3.5), 3.5, 10.0),
    ]


def _with(**changes):
    lanes = _valid_lanes()
    for k, v in changes.items():
        setattr(lanes[1], k, v)
    return lanes


@pytest.mark.parametrize(
    "lanes,match",
    [
        (_with(points=np.array([[50.0, 0.0], [np.nan, 0.0], [100.0, 0.0]])), "NaN"),
        (_with(points=np.array([[50.0, 0.0], [np.inf, 0.0]])), "infinite"),
        (_with(points=np.array([[50.0, 0.0], [50.0, 0.0]])), "shorter"),
        (_with(points=np.array([[50.0, 0.0], [50.03, 0.0], [50.06, 0.01]])), "shorter"),
        (_with(points=np.array([[50.0, 0.0]])), "shape"),
        (_with(width=-1.0), "width"),
        (_with(width=0.0), "width"),
        (_with(width=float("nan")), "width"),
        (_with(speed_limit=-3.0), "speed limit"),
        (_with(speed_limit=0.0), "speed limit"),
        (_with(successors=[3]), "lane 3"),
        (_with(successors=[-2]), "lane -2"),
        (_with(left=7), "lane 7"),
        (_with(type=17), "type"),
        (_with(junction=0), "junction"),
    ],
)
def test_validation_errors_name_the_lane(lanes, match):
    with pytest.raises(CraftError) as e:
        RoadMap.build("bad", lanes)
    msg = str(e.value)
    assert "lane 1" in msg and match in msg and "'bad'" in msg


def test_validation_errors_lights_junctions():
    lanes = _valid_lanes()
    lanes[1].junction = 0
    j = [RawJunction((50.0, 0.0), 10.0, JunctionKind.SIGNAL, n_phases=2)]
    RoadMap.build("ok", lanes, j, [RawLight(0, 0, 1)])  # valid
    with pytest.raises(CraftError, match=r"light 0: phase 2 outside"):
        RoadMap.build("bad", lanes, j, [RawLight(0, 0, 2)])
    with pytest.raises(CraftError, match=r"light 0: phase -1 outside"):
        RoadMap.build("bad", lanes, j, [RawLight(0, 0, -1)])
    with pytest.raises(CraftError, match=r"light 1: lane 9"):
        RoadMap.build("bad", lanes, j, [RawLight(0, 0, 0), RawLight(9, 0, 0)])
    with pytest.raises(CraftError, match=r"stop sign 0: lane 3"):
        RoadMap.build("bad", lanes, j, stops=[RawStop(3, 0)])
    bad_j = [RawJunction((50.0, 0.0), -1.0, JunctionKind.SIGNAL)]
    with pytest.raises(CraftError, match="junction 0"):
        RoadMap.build("bad", lanes, bad_j)
    with pytest.raises(CraftError, match="no lanes"):
        RoadMap.build("bad", [])
    with pytest.raises(CraftError, match="at least one map"):
        MapBatch([])
