"""Tests for the seeded procedural towns (craft.world.towns)."""

from __future__ import annotations

import json
import math
import time
from collections import Counter

import numpy as np
import pytest
import torch

from craft.world.map import JunctionKind, LaneType, MapBatch, drivable, nearest_lane
from craft.world.towns import TownConfig, generate_town

SEEDS = range(5)
DRIVING = int(LaneType.DRIVING)
WALK = (int(LaneType.SIDEWALK), int(LaneType.CROSSWALK))


def _wrap(a):
    return (a + np.pi) % (2 * np.pi) - np.pi


def _driving(m):
    return [i for i in range(m.num_lanes) if int(m.lane_type[i]) == DRIVING]


def _graph_closure(m, start, allowed, reverse=False):
    """Lanes reached from ``start`` through successors and left/right changes (or the reverse edges)."""
    edges = {i: [] for i in range(m.num_lanes)}
    for i in range(m.num_lanes):
        for j in m.successors(i) + [int(x) for x in (m.lane_left[i], m.lane_right[i]) if x >= 0]:
            if reverse:
                edges[j].append(i)
            else:
                edges[i].append(j)
    seen, todo = {start}, [start]
    while todo:
        i = todo.pop()
        for j in edges[i]:
            if j not in seen and int(m.lane_type[j]) in allowed:
                seen.add(j)
                todo.append(j)
    return seen


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_map(town):
    again = generate_town(0)
    for name in ("points", "point_heading", "lane_succ", "lane_left", "lane_right", "lane_left_opposite",
                 "lane_type", "lane_width", "lane_speed_limit", "lane_priority", "lane_turn", "lane_conflict",
                 "junction_center", "junction_kind", "junction_timing", "light_lane", "light_phase", "stop_lane"):
        np.testing.assert_array_equal(getattr(town, name), getattr(again, name), err_msg=name)
    assert json.dumps(town.extras, sort_keys=True) == json.dumps(again.extras, sort_keys=True)


def test_different_seeds_differ(towns):
    shapes = {(t.points.shape, t.num_lanes, float(t.points.sum())) for t in towns}
    assert len(shapes) == len(towns)


def test_extras_json_friendly(towns):
    for t in towns:
        text = json.dumps(t.extras)
        assert json.loads(text)["seed"] == t.extras["seed"]
        assert t.extras["config"]["lane_width"] == TownConfig().lane_width


def test_generation_is_fast():
    t0 = time.perf_counter()
    generate_town(7)
    assert time.perf_counter() - t0 < 2.0


# ---------------------------------------------------------------------------------------------- lane graph
@pytest.mark.parametrize("seed", SEEDS)
def test_driving_graph_strongly_connected(towns, seed):
    m = towns[seed]
    drv = _driving(m)
    allowed = {DRIVING}
    assert _graph_closure(m, drv[0], allowed) == set(drv)
    assert _graph_closure(m, drv[0], allowed, reverse=True) == set(drv)
    assert m.reachable_from(drv[-1]) == set(drv)
    # no driving lane is a dead end
    assert all(m.successors(i) for i in drv)


@pytest.mark.parametrize("seed", SEEDS)
def test_successors_meet_end_to_start(towns, seed):
    m = towns[seed]
    gaps = [
        float(np.linalg.norm(m.lane_points(i)[-1] - m.lane_points(j)[0]))
        for i in range(m.num_lanes)
        for j in m.successors(i)
    ]
    assert gaps and max(gaps) < 0.1


@pytest.mark.parametrize("seed", SEEDS)
def test_neighbour_links(towns, seed):
    m = towns[seed]
    for i in range(m.num_lanes):
        for side, back in ((m.lane_left, m.lane_right), (m.lane_right, m.lane_left)):
            j = int(side[i])
            if j >= 0:
                assert int(back[j]) == i
                # same direction, side by side
                pi, pj = m.lane_points(i), m.lane_points(j)
                k = len(pj) // 2
                d = np.linalg.norm(pi - pj[k], axis=1)
                near = int(d.argmin())
                hi, hj = m.point_heading[m.lane_offset[i] + near], m.point_heading[m.lane_offset[j] + k]
                assert abs(_wrap(hi - hj)) < 0.5
        o = int(m.lane_left_opposite[i])
        if o >= 0:
            assert int(m.lane_left_opposite[o]) == i
            assert int(m.lane_type[i]) == int(m.lane_type[o]) == DRIVING
            pi, po = m.lane_points(i), m.lane_points(o)
            k = len(pi) // 2
            d = np.linalg.norm(po - pi[k], axis=1)
            near = int(d.argmin())
            assert d[near] == pytest.approx(float(m.lane_width[i]), abs=0.3)
            dh = _wrap(m.point_heading[m.lane_offset[i] + k] - m.point_heading[m.lane_offset[o] + near])
            assert abs(abs(dh) - math.pi) < 0.2
            # the opposite lane lies on the left
            h = m.point_heading[m.lane_offset[i] + k]
            left = np.array([-math.sin(h), math.cos(h)])
            assert float((po[near] - pi[k]) @ left) > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_plan_route_random_pairs(towns, seed):
    m = towns[seed]
    drv = _driving(m)
    rng = np.random.default_rng(100 + seed)
    for _ in range(20):
        a, b = (int(x) for x in rng.choice(drv, 2, replace=False))
        route = m.plan_route(a, b)
        assert route[0] == a and route[-1] == b
        for x, y in zip(route[:-1], route[1:]):
            assert y in m.successors(x) or y in (int(m.lane_left[x]), int(m.lane_right[x]))


# ---------------------------------------------------------------------------------------------- content
def test_town_content_over_seeds(towns):
    lanes_per_dir = Counter()
    for m in towns:
        f = m.extras["features"]
        for key in ("two_way_single_lane", "multi_lane", "highway", "on_ramps", "off_ramps", "acceleration_lanes",
                    "deceleration_lanes", "shoulders", "parking", "sidewalks", "crosswalks", "curves", "junctions"):
            assert f[key], f"town {m.name} has no {key}"
        types = Counter(int(t) for t in m.lane_type)
        for t in LaneType:
            if t != LaneType.BIKE:
                assert types[int(t)] > 0, (m.name, t)
        kinds = {(j["kind"], j["arms"]) for j in f["junctions"]}
        for k in JunctionKind:
            for arms in (3, 4):
                assert (int(k), arms) in kinds, (m.name, k, arms)
        # lanes per direction of urban streets (driving lanes sharing a road id)
        roads = Counter(int(r) for i, r in enumerate(m.lane_road) if int(m.lane_type[i]) == DRIVING and r >= 0)
        lanes_per_dir.update(set(roads.values()))
        # typed feature lists hold lanes of the right type
        for key, t in (("shoulders", LaneType.SHOULDER), ("parking", LaneType.PARKING), ("bike", LaneType.BIKE),
                       ("sidewalks", LaneType.SIDEWALK), ("crosswalks", LaneType.CROSSWALK),
                       ("highway", LaneType.DRIVING), ("on_ramps", LaneType.DRIVING)):
            assert all(int(m.lane_type[i]) == int(t) for i in f[key]), key
        assert max(m.lane_speed_limit[f["highway"]]) == pytest.approx(25.0)
    assert {1, 2, 3} <= set(lanes_per_dir)
    assert any(m.extras["features"]["bike"] for m in towns)


@pytest.mark.parametrize("seed", SEEDS)
def test_highway_ramps(towns, seed):
    m = towns[seed]
    f = m.extras["features"]
    highway = set(f["highway"])
    # one on- and one off-ramp per direction
    assert len(f["on_ramps"]) >= 2 and len(f["off_ramps"]) >= 2
    for acc in f["acceleration_lanes"]:
        assert 120.0 - 1 <= m.lane_length[acc] <= 200.0 + 1
        rightmost = int(m.lane_left[acc])
        assert rightmost in highway and int(m.lane_right[rightmost]) == acc
        assert any(p in f["on_ramps"] for p in m.predecessors(acc))
        (nxt,) = m.successors(acc)
        assert nxt in highway and nxt in m.successors(rightmost)  # merges into the next rightmost lane
        assert m.lane_left_opposite[acc] == -1
    for dec in f["deceleration_lanes"]:
        rightmost = int(m.lane_left[dec])
        assert rightmost in highway
        assert any(s in f["off_ramps"] for s in m.successors(dec))
        (prev,) = m.predecessors(dec)
        assert prev in highway  # splits off the previous rightmost lane
    # divided highway: no opposite links
    assert all(m.lane_left_opposite[i] == -1 for i in highway)
    for sh in f["shoulders"]:
        assert int(m.lane_left[sh]) in highway and int(m.lane_right[int(m.lane_left[sh])]) == sh
    for p in f["parking"]:
        drv = int(m.lane_left[p])
        assert int(m.lane_type[drv]) == DRIVING and int(m.lane_right[drv]) == p
    # ramps are reachable from the city and lead back into it
    city = [i for i in _driving(m) if int(m.lane_junction[i]) >= 0]
    assert set(f["on_ramps"]) <= m.reachable_from(city[0])
    for r in f["off_ramps"]:
        assert city[0] in m.reachable_from(r)


@pytest.mark.parametrize("seed", SEEDS)
def test_walk_network(towns, seed):
    m = towns[seed]
    walk = [i for i in range(m.num_lanes) if int(m.lane_type[i]) in WALK]
    assert _graph_closure(m, walk[0], set(WALK)) == set(walk)
    # walk lanes come in opposite pairs
    ends = Counter((tuple(np.round(m.lane_points(i)[0], 1)), tuple(np.round(m.lane_points(i)[-1], 1))) for i in walk)
    for (a, b), n in ends.items():
        assert ends[(b, a)] == n
    # every arm of every junction has a crosswalk
    for j in m.extras["features"]["junctions"]:
        for arm in j["arm_info"]:
            cw = arm["crosswalk"]
            assert len(cw) == 2 and all(int(m.lane_type[c]) == int(LaneType.CROSSWALK) for c in cw)
            assert set(cw) <= set(j["crosswalks"])
            assert all(int(m.lane_junction[c]) == -1 and int(m.lane_road[c]) == -1 for c in cw)
        # the crosswalk crosses its arm near the junction
        c = np.array(j["center"])
        for x in j["crosswalks"]:
            assert np.linalg.norm(m.lane_points(x).mean(0) - c) < j["radius"]


# ---------------------------------------------------------------------------------------------- junctions
@pytest.mark.parametrize("seed", SEEDS)
def test_lights_and_stops(towns, seed):
    m = towns[seed]
    f = m.extras["features"]
    kind = m.junction_kind
    for k, lane in enumerate(m.light_lane):
        j = int(m.light_junction[k])
        assert kind[j] == int(JunctionKind.SIGNAL)
        conns = m.successors(int(lane))
        assert conns and all(int(m.lane_junction[c]) == j for c in conns)
    for k, lane in enumerate(m.stop_lane):
        j = int(m.stop_junction[k])
        assert kind[j] == int(JunctionKind.STOP)
        assert all(int(m.lane_junction[c]) == j for c in m.successors(int(lane)))
    lit, stopped = set(m.light_lane.tolist()), set(m.stop_lane.tolist())
    for jf in f["junctions"]:
        if jf["kind"] == int(JunctionKind.SIGNAL):
            assert set(jf["incoming"]) <= lit
            phases = {a["phase"] for a in jf["arm_info"]}
            assert phases == {0, 1}
            g, y, r, n, off = m.junction_timing[jf["id"]]
            assert 10.0 <= g <= 16.0 and y == 3.0 and r == 1.0 and n == 2
        elif jf["kind"] == int(JunctionKind.STOP):
            assert set(jf["incoming"]) & stopped
            if not jf["minor_stop"]:
                assert set(jf["incoming"]) <= stopped
        else:
            assert not set(jf["incoming"]) & (lit | stopped)


@pytest.mark.parametrize("seed", SEEDS)
def test_connectors(towns, seed):
    m = towns[seed]
    f = m.extras["features"]
    conflict = {i: set(int(x) for x in m.lane_conflict[i] if x >= 0) for i in range(m.num_lanes)}
    for jf in f["junctions"]:
        j = jf["id"]
        for name, turn in (("straight", 0), ("left", 1), ("right", 2)):
            for c in jf["connectors"][name]:
                assert int(m.lane_turn[c]) == turn and int(m.lane_junction[c]) == j and int(m.lane_road[c]) == -1
                assert len(m.successors(c)) == 1 and len(m.predecessors(c)) == 1
        conns = sum(jf["connectors"].values(), [])
        # every incoming lane has a movement, every outgoing lane is fed
        assert {m.predecessors(c)[0] for c in conns} == set(jf["incoming"])
        # priorities follow the control kind
        prio = {c: int(m.lane_priority[c]) for c in conns}
        if jf["kind"] == int(JunctionKind.SIGNAL):
            assert all(prio[c] == (1 if m.lane_turn[c] == 1 else 2) for c in conns)
        elif jf["kind"] == int(JunctionKind.STOP) and not jf["minor_stop"]:
            assert set(prio.values()) == {1}
        else:
            assert set(prio.values()) == {0, 1, 2}
        # straight movements of crossing axes conflict
        straight = jf["connectors"]["straight"]
        for a in straight:
            da = m.lane_points(a)[-1] - m.lane_points(a)[0]
            for b in straight:
                db = m.lane_points(b)[-1] - m.lane_points(b)[0]
                cos = float(da @ db) / (np.linalg.norm(da) * np.linalg.norm(db))
                if abs(cos) < 0.3:
                    assert b in conflict[a] and a in conflict[b]
        # left turns conflict with oncoming straight traffic
        for a in jf["connectors"]["left"]:
            assert conflict[a] & set(straight)


def test_connector_speed_and_smoothness(town):
    for c in town.extras["features"]["connectors"]:
        h = town.point_heading[town.lane_offset[c]: town.lane_offset[c] + town.lane_count[c]]
        assert np.abs(_wrap(np.diff(h))).max() < 0.35  # no kinks between 1 m samples
        if town.lane_turn[c] != 0:
            assert town.lane_speed_limit[c] < 13.9


# ---------------------------------------------------------------------------------------------- queries
def _far_points(m, cell, reach):
    """Cell centres of a raster over the map whose (2 reach + 1)^2 neighbourhood holds no lane point."""
    lo = m.points.min(0) - 60.0
    idx = np.floor((m.points - lo) / cell).astype(int)
    shape = idx.max(0) + 14
    occ = np.zeros(shape, np.int64)
    occ[idx[:, 0], idx[:, 1]] = 1
    sat = np.pad(occ.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    a0, a1 = np.clip(i - reach, 0, shape[0]), np.clip(i + reach + 1, 0, shape[0])
    b0, b1 = np.clip(j - reach, 0, shape[1]), np.clip(j + reach + 1, 0, shape[1])
    busy = sat[a1, b1] - sat[a0, b1] - sat[a1, b0] + sat[a0, b0]
    free = np.argwhere(busy == 0)
    return (lo + (free + 0.5) * cell).astype(np.float32)


def test_drivable_and_nearest_lane(towns):
    mb = MapBatch(towns[:2])
    for mid, m in enumerate(towns[:2]):
        drv = np.array(_driving(m) + list(m.extras["features"]["parking"]))
        pts = np.concatenate([m.lane_points(i)[::5] for i in drv]).astype(np.float32)
        pts = pts[np.random.default_rng(mid).permutation(len(pts))[:3000]]
        ids = torch.full((len(pts),), mid, dtype=torch.long)
        assert bool(drivable(mb, ids, torch.from_numpy(pts)).all())
        # far points: cells of a 5 m raster with no lane point within 7 cells (>= 30 m + margin from any lane)
        far = _far_points(m, cell=5.0, reach=7)
        far = far[np.random.default_rng(mid).permutation(len(far))[:1000]]
        assert len(far) > 50
        ids = torch.full((len(far),), mid, dtype=torch.long)
        assert not bool(drivable(mb, ids, torch.from_numpy(far)).any())
        # nearest_lane on a lane centre finds that lane (or one overlapping it in a junction)
        f = m.extras["features"]
        lanes = np.array(f["highway"][:5] + f["two_way_single_lane"][:5])
        mids = np.array([m.lane_points(i)[len(m.lane_points(i)) // 2] for i in lanes], np.float32)
        heads = np.array([m.point_heading[m.lane_offset[i] + m.lane_count[i] // 2] for i in lanes], np.float32)
        r = nearest_lane(mb, torch.full((len(lanes),), mid), torch.from_numpy(mids), torch.from_numpy(heads))
        assert r["lane"].tolist() == lanes.tolist()


@pytest.mark.parametrize("seed", SEEDS)
def test_no_overlaps_outside_junctions(towns, seed):
    """Lane areas only overlap for connectors of one junction, crosswalks over roads, and linked lanes."""
    shapely = pytest.importorskip("shapely")
    from shapely.geometry import LineString

    m = towns[seed]
    L = m.num_lanes
    polys = [LineString(m.lane_points(i)).buffer(max(float(m.lane_width[i]) / 2 - 0.1, 0.05), cap_style=2)
             for i in range(L)]
    rel = [set() for _ in range(L)]
    for i in range(L):
        for j in m.successors(i) + m.predecessors(i) + [int(m.lane_left[i]), int(m.lane_right[i])]:
            if j >= 0:
                rel[i].add(j)
                rel[j].add(i)
    for i in range(L):  # lanes fanning out of / into one lane
        for k in m.successors(i) + m.predecessors(i):
            rel[i].update(m.predecessors(k) + m.successors(k))
    tree = shapely.STRtree(polys)
    bad = []
    for i in range(L):
        for j in tree.query(polys[i], predicate="intersects"):
            j = int(j)
            if j <= i or j in rel[i]:
                continue
            ti, tj = int(m.lane_type[i]), int(m.lane_type[j])
            ji, jj = int(m.lane_junction[i]), int(m.lane_junction[j])
            if ti == tj == DRIVING and ji == jj >= 0:
                continue
            if int(LaneType.CROSSWALK) in (ti, tj) or (ti in WALK and tj in WALK):
                continue
            bad.append((i, j))
    assert not bad
