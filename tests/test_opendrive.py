"""The OpenDRIVE importer on a hand-written town (values computed by hand) and on a real CARLA town."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("carla")

from craft.data.carla import carla_data  # noqa: E402
from craft.errors import CraftError  # noqa: E402
from craft.world.map import JunctionKind, LaneType  # noqa: E402
from craft.world.opendrive import carla_to_world, load_opendrive  # noqa: E402

SMALL = Path(__file__).parent / "data" / "small.xodr"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    import os

    os.environ.setdefault("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    return load_opendrive(SMALL, cache=False)


def _lane_at(m, start, end, tol=0.3):
    """The lane whose first / last points are ``start`` / ``end`` (world frame)."""
    for i in range(m.num_lanes):
        p = m.lane_points(i)
        if np.linalg.norm(p[0] - start) < tol and np.linalg.norm(p[-1] - end) < tol:
            return i
    raise AssertionError(f"no lane from {start} to {end}")


def test_lanes_widths_directions_and_y_flip(small):
    m = small
    drive = m.lane_type == int(LaneType.DRIVING)
    # road 1: 2 lanes, road 2: 3, road 3: 1, connectors: road 10 (2) + road 11 (1)
    assert int(drive.sum()) == 9
    # OpenDRIVE's right lane of an eastbound road lies at y = -w/2 (CARLA reports +1.75: the flip)
    east1 = _lane_at(m, (0.0, -1.75), (100.0, -1.75))
    west1 = _lane_at(m, (100.0, 1.75), (0.0, 1.75))
    assert np.allclose(carla_to_world([[3.0, 1.75]]), [[3.0, -1.75]])
    assert abs(float(m.point_heading[m.lane_offset[east1]])) < 1e-3  # heading east
    assert abs(abs(float(m.point_heading[m.lane_offset[west1]])) - math.pi) < 1e-3  # heading west
    assert m.lane_width[east1] == pytest.approx(3.5)
    south3 = _lane_at(m, (118.5, -20.0), (118.5, -100.0))  # 3.0 m lane: centre 1.5 m right of the reference
    assert m.lane_width[south3] == pytest.approx(3.0)
    # lane changes: road 2's two eastbound lanes share a broken line; road 1 has one lane per direction
    in2 = _lane_at(m, (120.0, -1.75), (220.0, -1.75))
    out2 = _lane_at(m, (120.0, -5.25), (220.0, -5.25))
    assert m.lane_right[in2] == out2 and m.lane_left[out2] == in2
    assert m.lane_left[east1] == -1 and m.lane_right[east1] == -1
    assert m.lane_left_opposite[east1] == west1 and m.lane_left_opposite[west1] == east1
    # speed limits: 30 mph, 50 km/h, none (the default, 25 mph)
    assert m.lane_speed_limit[east1] == pytest.approx(30 * 0.44704, rel=1e-5)
    assert m.lane_speed_limit[in2] == pytest.approx(50 / 3.6, rel=1e-5)
    assert m.lane_speed_limit[south3] == pytest.approx(25 * 0.44704, rel=1e-5)
    # the sidewalk 3.5 + 1 m right of road 1's reference line, both directions
    walk = np.nonzero(m.lane_type == int(LaneType.SIDEWALK))[0]
    assert len(walk) == 2
    assert np.allclose(m.lane_points(int(walk[0]))[:, 1], -4.5, atol=1e-3)


def test_junction_connectors_and_light(small):
    m = small
    assert len(m.junction_kind) == 1 and m.junction_kind[0] == int(JunctionKind.SIGNAL)
    east1 = _lane_at(m, (0.0, -1.75), (100.0, -1.75))
    conns = sorted(m.successors(east1))
    assert len(conns) == 2 and all(m.lane_junction[c] == 0 for c in conns)
    straight = _lane_at(m, (100.0, -1.75), (120.0, -1.75))
    right = [c for c in conns if c != straight][0]
    assert m.lane_turn[straight] == 0 and m.lane_turn[right] == 2  # straight, right
    south3 = _lane_at(m, (118.5, -20.0), (118.5, -100.0))
    assert m.successors(right) == [south3]
    # the right turn's inner lane has radius 20 - 1.75 m: its speed is capped at sqrt(3 * 18.25)
    assert m.lane_speed_limit[right] == pytest.approx(math.sqrt(3.0 * 18.25), rel=0.03)
    assert m.lane_length[right] == pytest.approx(18.25 * math.pi / 2, rel=0.02)
    # one light, on road 1's eastbound lane (validity -1); its arm is the junction's only phase
    assert list(m.light_lane) == [east1]
    assert int(m.junction_timing[0, 3]) == 1
    assert m.lane_light[straight] == 0 and m.lane_light[right] == 0
    np.testing.assert_allclose(m.light_pos[0], [100.0, -1.75], atol=0.05)
    f = m.extras["features"]["junctions"][0]
    assert sorted(f["connectors"]["right"]) == [right] and straight in f["connectors"]["straight"]
    arm1 = next(a for a in f["arm_info"] if east1 in a["incoming"])
    np.testing.assert_allclose(arm1["direction"], [-1.0, 0.0], atol=1e-6)  # road 1 approaches from the west
    assert arm1["phase"] == 0


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = load_opendrive(SMALL)
    files = list((tmp_path / "craft" / "maps").glob("small_*.npz"))
    assert len(files) == 1
    b = load_opendrive(SMALL)
    for k, v in vars(a).items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, getattr(b, k))
    assert a.extras == b.extras and a.grid_shape == b.grid_shape


def test_unreadable_files_one_line(tmp_path):
    bad = tmp_path / "bad.xodr"
    bad.write_text("<OpenDRIVE><road")
    for path, what in ((bad, "not well-formed"), (tmp_path / "none.xodr", "does not exist"), (tmp_path, "folder")):
        with pytest.raises(CraftError, match=what) as e:
            load_opendrive(path, cache=False)
        assert "\n" not in str(e.value)
    other = tmp_path / "other.xodr"
    other.write_text("<html><body/></html>")
    with pytest.raises(CraftError, match="not OpenDRIVE"):
        load_opendrive(other, cache=False)


def test_real_town_imports():
    m = load_opendrive(carla_data() / "Town01.xodr", cache=False)
    assert m.name == "Town01"
    # Town01: 12 T junctions, all signalised, a light on every incoming lane (3 per junction)
    assert len(m.junction_kind) == 12 and (m.junction_kind == int(JunctionKind.SIGNAL)).all()
    assert len(m.light_lane) == 36
    assert (m.lane_type == int(LaneType.SIDEWALK)).sum() > 0
    # every driving lane outside junctions has a successor (the town has no dead ends)
    drive = np.nonzero((m.lane_type == int(LaneType.DRIVING)))[0]
    assert all(m.successors(int(i)) for i in drive)
