"""Bird's-eye-view rendering: PNG stills and GIF animations of hand-built maps."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from craft.errors import CraftError
from craft.world.kinds import AgentKind
from craft.world.map import JunctionKind, LaneType, RawJunction, RawLane, RawLight, RawStop, RoadMap
from craft.world.render import draw_agents, draw_map, frame_to_rgb, new_figure, render_gif, render_png

W = 3.5  # lane width, m


def _rot(v, deg):
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _bezier(p0, h0, p1, h1, n=16):
    """Cubic curve from p0 (heading vector h0) to p1 (heading vector h1)."""
    k = np.linalg.norm(p1 - p0) / 3.0
    c0, c1 = p0 + h0 * k, p1 - h1 * k
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * c0 + 3 * (1 - t) * t**2 * c1 + t**3 * p1


def toy_map(arm_length: float = 60.0, r: float = 11.0) -> RoadMap:
    """A 4-way junction at the origin: lights on the east/west arms, stop signs on north/south.

    East: two lanes each way and shoulders; north: parking lanes; south: bike lanes; west: one lane each
    way. Every arm has sidewalks on both sides and a crosswalk just inside the junction; walk lanes come in
    pairs, one per direction.
    """
    arms = {  # name: (outward direction, driving lanes per direction, extra outer lane type)
        "E": (np.array([1.0, 0.0]), 2, LaneType.SHOULDER),
        "N": (np.array([0.0, 1.0]), 1, LaneType.PARKING),
        "W": (np.array([-1.0, 0.0]), 1, None),
        "S": (np.array([0.0, -1.0]), 1, LaneType.BIKE),
    }
    lanes: list[RawLane] = []
    inc: dict[str, list[int]] = {}
    out: dict[str, list[int]] = {}
    half_road: dict[str, float] = {}
    road = 0
    for name, (d, n, extra) in arms.items():
        left = _rot(d, 90)
        inc[name], out[name] = [], []
        for k in range(n):
            off = (k + 0.5) * W
            a = d * (r + arm_length) + left * off
            b = d * r + left * off
            inc[name].append(len(lanes))
            lanes.append(RawLane(np.stack([a, b]), W, 13.9, road=road))
            out[name].append(len(lanes))
            c, e = d * r - left * off, d * (r + arm_length) - left * off
            lanes.append(RawLane(np.stack([c, e]), W, 13.9, road=road + 1))
        for group in (inc[name], out[name]):
            for k, i in enumerate(group):
                lanes[i].left = group[k - 1] if k > 0 else -1
                lanes[i].right = group[k + 1] if k + 1 < len(group) else -1
        lanes[inc[name][0]].left_opposite = out[name][0]
        lanes[out[name][0]].left_opposite = inc[name][0]
        edge = n * W
        if extra is not None:
            ew = 2.5 if extra != LaneType.BIKE else 1.8
            for group, sign, direction in ((inc[name], 1, -1), (out[name], -1, 1)):
                off = sign * (edge + ew / 2)
                pts = np.stack([d * (r + arm_length) + left * off, d * r + left * off])
                if direction > 0:
                    pts = pts[::-1]
                lanes[group[-1]].right = len(lanes)
                lanes.append(RawLane(pts, ew, 8.0, type=extra, road=road + (0 if sign > 0 else 1)))
            edge += ew
        half_road[name] = edge
        for sign in (1, -1):  # sidewalks, one lane per walking direction
            off = sign * (edge + 1.0)
            a, b = d * r + left * off, d * (r + arm_length) + left * off
            lanes.append(RawLane(np.stack([a, b]), 2.0, 1.5, type=LaneType.SIDEWALK))
            lanes.append(RawLane(np.stack([b, a]), 2.0, 1.5, type=LaneType.SIDEWALK))
        c = d * (r - 2.0)  # crosswalk just inside the junction
        a, b = c + left * (edge + 1.0), c - left * (edge + 1.0)
        lanes.append(RawLane(np.stack([a, b]), 3.0, 1.5, type=LaneType.CROSSWALK, junction=0))
        lanes.append(RawLane(np.stack([b, a]), 3.0, 1.5, type=LaneType.CROSSWALK, junction=0))
        road += 2
    # connectors: straight (lane k to lane k), right turn from the outermost lane, left turn from lane 0
    order = ["E", "N", "W", "S"]
    for name in order:
        d_in = -arms[name][0]
        here = order.index(name)
        straight = order[(here + 2) % 4]
        right = order[(here + 1) % 4]  # heading -d, the arm to the right
        left_arm = order[(here + 3) % 4]
        moves = [(k, straight, min(k, len(out[straight]) - 1), 0) for k in range(len(inc[name]))]
        moves.append((len(inc[name]) - 1, right, len(out[right]) - 1, 2))
        moves.append((0, left_arm, 0, 1))
        for k, to, kk, turn in moves:
            src, dst = inc[name][k], out[to][kk]
            p0, p1 = lanes[src].points[-1], lanes[dst].points[0]
            pts = _bezier(p0, d_in, p1, arms[to][0])
            lanes[src].successors.append(len(lanes))
            lanes.append(RawLane(pts, W, 8.0, junction=0, successors=[dst], turn=turn))
    lights = [RawLight(lane=i, junction=0, phase=0) for a in ("E", "W") for i in inc[a]]
    stops = [RawStop(lane=i, junction=0) for a in ("N", "S") for i in inc[a]]
    junctions = [RawJunction(center=(0.0, 0.0), radius=r, kind=JunctionKind.SIGNAL)]
    return RoadMap.build("toy", lanes, junctions, lights, stops)


def toy_frame(m: RoadMap, t: float = 0.0, candidates: bool = True) -> dict:
    """Ego approaching the junction from the west, traffic, pedestrians, an emergency vehicle, debris."""
    pos = np.array([[-30.0 + 5 * t, -1.75], [-45.0 + 5 * t, -1.75], [25.0, 5.25], [40.0, -1.75], [-1.75, 30.0],
                    [-16.0, 9.0], [-18.5, -12.0], [1.75, -35.0], [30.0, 8.7], [60.0, 60.0]])  # fmt: skip
    yaw = np.array([0.0, 0.0, np.pi, 0.0, -np.pi / 2, 0.0, np.pi / 2, np.pi / 2, 0.0, 0.0])
    K = AgentKind
    kind = np.array([K.EGO, K.CAR, K.TRUCK, K.EMERGENCY, K.CAR, K.PEDESTRIAN, K.PEDESTRIAN, K.BICYCLE, K.STATIC, K.CAR])
    size = {0: (4.9, 2.1), 1: (4.6, 1.9), 2: (8.5, 2.5), 3: (1.8, 0.7), 4: (5.4, 2.1), 5: (0.6, 0.6), 6: (4.5, 1.9)}
    length = np.array([size[int(k)][0] for k in kind])
    width = np.array([size[int(k)][1] for k in kind])
    valid = np.ones(len(pos), bool)
    valid[-1] = False
    frame = {
        "pos": pos, "yaw": yaw, "length": length, "width": width, "kind": kind.astype(np.int64), "valid": valid,
        "siren": kind == AgentKind.EMERGENCY, "speed": np.full(len(pos), 5.0),
        "lights": np.array([2, 2, 0][: len(m.light_lane)] + [1] * max(0, len(m.light_lane) - 3)),
        "route": np.stack([np.linspace(-30 + 5 * t, -8, 10), np.full(10, -1.75)], 1).tolist()
        + [[-3.0, -3.0], [1.75, -8.0], [1.75, -40.0]],
        "time": t, "text": "toy scenario",
    }  # fmt: skip
    if candidates:
        ts = np.linspace(0, 1, 20)[:, None]
        ego = pos[0]
        cands = np.stack([ego + ts * np.array([25.0, dy]) for dy in (-4, -2, 0, 2, 4)])
        frame["candidates"] = cands
        frame["candidate_weights"] = np.array([0.05, 0.2, 0.5, 0.2, 0.05])
        frame["chosen"] = cands[2]
    return frame


def straight_road() -> RoadMap:
    """A 100 m straight two-way road, no junctions, lights or stop signs."""
    east = RawLane(np.array([[0.0, -1.75], [100.0, -1.75]]), W, 13.9, road=0, left_opposite=1)
    west = RawLane(np.array([[100.0, 1.75], [0.0, 1.75]]), W, 13.9, road=1, left_opposite=0)
    return RoadMap.build("straight", [east, west])


@pytest.fixture(scope="module")
def road_map():
    return toy_map()


def _no_temp_files(folder):
    left = [f for f in os.listdir(folder) if f.endswith(".tmp") or f.startswith(".")]
    assert not left, f"temporary files left behind: {left}"


def test_whole_map_png(road_map, tmp_path):
    path = tmp_path / "town.png"
    out = render_png(road_map, path, size=(640, 480), title="toy town")
    assert out == str(path)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (640, 480)
        rgb = np.asarray(im.convert("RGB"))
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20
    assert os.listdir(tmp_path) == ["town.png"]


def test_crop_with_frame(road_map, tmp_path):
    frame = toy_frame(road_map)
    path = tmp_path / "crop.png"
    render_png(road_map, path, frame=frame, center="ego", radius=30.0, size=400)
    with Image.open(path) as im:
        assert im.size == (400, 400)
        rgb = np.asarray(im.convert("RGB")).astype(int)
    # the ego's blue is in the picture
    blue = (np.abs(rgb - np.array([0x1C, 0x6F, 0xD8])).sum(-1) < 30).sum()
    assert blue > 50
    _no_temp_files(tmp_path)


def test_frame_without_optional_keys(road_map, tmp_path):
    full = toy_frame(road_map, candidates=False)
    frame = {k: full[k] for k in ("pos", "yaw", "length", "width", "kind", "valid")}
    render_png(road_map, tmp_path / "a.png", frame=frame, center=(0.0, 0.0), radius=40.0, size=300)
    render_png(road_map, tmp_path / "b.png", frame={"pos": np.zeros((1, 2))}, center="ego", radius=20.0, size=200)
    for name, size in (("a.png", 300), ("b.png", 200)):
        with Image.open(tmp_path / name) as im:
            assert im.size == (size, size)


def test_gif_frames(road_map, tmp_path):
    frames = [toy_frame(road_map, t=0.25 * k, candidates=k % 2 == 0) for k in range(6)]
    frames[3] = {k: frames[3][k] for k in ("pos", "yaw", "length", "width", "kind", "valid")}
    path = tmp_path / "run.gif"
    render_gif(road_map, frames, path, radius=30.0, fps=5, size=200)
    with Image.open(path) as im:
        assert im.format == "GIF"
        assert im.n_frames == 6
        assert im.size == (200, 200)
        assert im.info.get("duration") == 200
    _no_temp_files(tmp_path)
    render_gif(road_map, frames[:2], tmp_path / "fixed.gif", follow_ego=False, size=120)
    with Image.open(tmp_path / "fixed.gif") as im:
        assert im.n_frames == 2


def test_failed_write_leaves_nothing(road_map, tmp_path):
    with pytest.raises(CraftError):
        render_gif(road_map, [], tmp_path / "empty.gif")
    bad = toy_frame(road_map)
    bad["lights"] = np.zeros(1, np.int64)  # fewer than the map's lights (more is fine: batch padding)
    with pytest.raises(CraftError):
        render_png(road_map, tmp_path / "bad.png", frame=bad, center="ego", size=100)
    assert os.listdir(tmp_path) == []


def test_padded_lights_are_accepted(road_map, tmp_path):
    frame = toy_frame(road_map)
    frame["lights"] = np.full(len(road_map.light_lane) + 5, 2, np.int64)
    render_png(road_map, tmp_path / "p.png", frame=frame, center="ego", radius=20, size=100, legend=False)
    assert (tmp_path / "p.png").exists()


def test_overwrite_is_atomic(road_map, tmp_path):
    path = tmp_path / "x.png"
    render_png(road_map, path, center=(0, 0), radius=20, size=100, legend=False)
    render_png(road_map, path, center=(0, 0), radius=20, size=120, legend=False)
    with Image.open(path) as im:
        assert im.size == (120, 120)
    assert os.listdir(tmp_path) == ["x.png"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a private temp file


def test_reused_axes_and_culling(road_map):
    fig, ax = new_figure(200, 200)
    art = draw_map(ax, road_map, (55, -10, 75, 10))  # the far end of the east arm
    n_crop = len(art.collections["driving"].get_paths())
    art2 = draw_map(ax, road_map)  # whole map: same artists, more paths
    assert art2 is art
    assert len(art.collections["driving"].get_paths()) > n_crop
    draw_map(ax, road_map, (500, 500, 520, 520))  # nothing there
    assert len(art.collections["driving"].get_paths()) == 0
    a1 = draw_agents(ax, toy_frame(road_map))
    a2 = draw_agents(ax, toy_frame(road_map, t=1.0, candidates=False))
    assert a1 is a2
    img = frame_to_rgb(fig)
    assert img.shape == (200, 200, 3) and img.dtype == np.uint8


def test_crop_speed(road_map):
    fig, ax = new_figure(480, 480)
    frame = toy_frame(road_map)
    draw_map(ax, road_map, (-40, -40, 40, 40))
    draw_agents(ax, frame)
    frame_to_rgb(fig)
    t0 = time.perf_counter()
    for k in range(5):
        draw_map(ax, road_map, (-40 + k, -40, 40 + k, 40))
        draw_agents(ax, frame)
        frame_to_rgb(fig)
    assert (time.perf_counter() - t0) / 5 < 0.3


def test_map_without_junctions(tmp_path):
    m = straight_road()
    frame = {"pos": np.array([[10.0, -1.75], [30.0, 1.75]]), "yaw": np.array([0.0, np.pi]),
             "length": np.array([4.9, 4.6]), "width": np.array([2.1, 1.9]), "kind": np.array([0, 1]),
             "valid": np.array([True, True]), "lights": np.zeros(0, np.int64)}  # fmt: skip
    render_png(m, tmp_path / "road.png", frame=frame, size=(300, 100))
    frames = [dict(frame, pos=frame["pos"] + np.array([[k, 0.0], [-k, 0.0]])) for k in range(3)]
    render_gif(m, frames, tmp_path / "road.gif", radius=15.0, size=64)
    with Image.open(tmp_path / "road.png") as im:
        assert im.size == (300, 100)
    with Image.open(tmp_path / "road.gif") as im:
        assert im.n_frames == 3
    _no_temp_files(tmp_path)


def test_procedural_town_speed(tmp_path):
    towns = pytest.importorskip("craft.world.towns")
    m = towns.generate_town(0)
    t0 = time.perf_counter()
    render_png(m, tmp_path / "town.png", title="town 0")
    assert time.perf_counter() - t0 < 5.0
    fig, ax = new_figure(480, 480)
    c = m.lane_points(0)[0]
    draw_map(ax, m, (c[0] - 50, c[1] - 50, c[0] + 50, c[1] + 50))
    frame_to_rgb(fig)
    t0 = time.perf_counter()
    for k in range(3):
        draw_map(ax, m, (c[0] - 50 + k, c[1] - 50, c[0] + 50 + k, c[1] + 50))
        frame_to_rgb(fig)
    assert (time.perf_counter() - t0) / 3 < 0.3
    with Image.open(tmp_path / "town.png") as im:
        assert max(im.size) == 1600
