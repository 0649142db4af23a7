"""Tests for craft.world.observe (ego-frame observation tokens, navigation command)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from craft.errors import CraftError
from craft.world.kinds import AgentKind
from craft.world.map import (
    JunctionKind,
    LaneType,
    LightState,
    MapBatch,
    RawJunction,
    RawLane,
    RawLight,
    RawStop,
    RoadMap,
)
from craft.world.observe import Command, Observation, ObsConfig, chunk_table, navigation_command, observe
from craft.world.state import empty_state

# ----------------------------------------------------------------------------- a hand-built map
#
#   lane 1 (0,3.5)->(100,3.5) ---- 8 straight ---- 9 (120,3.5)->(220,3.5)
#   lane 0 (0,0)  ->(100,0)   ---- 2 straight ---- 5 (120,0)->(220,0)   [stop sign at the end of 5]
#                               \-- 3 left  -> 6 north (112,10)->(112,110)
#                               \-- 4 right -> 7 south (108,-10)->(108,-110)
#   lane 10 sidewalk (0,-4)->(100,-4);  lights on lanes 0 and 1 (junction 0)


def _line(a, b, n=2):
    return np.linspace(np.asarray(a, float), np.asarray(b, float), n)


def build_map() -> RoadMap:
    D = LaneType.DRIVING
    lanes = [
        RawLane(_line((0, 0), (100, 0)), 3.5, 13.9, D, road=0, successors=[2, 3, 4], left=1),  # 0
        RawLane(_line((0, 3.5), (100, 3.5)), 3.5, 13.9, D, road=0, successors=[8], right=0),  # 1
        RawLane(_line((100, 0), (120, 0)), 3.5, 10.0, D, junction=0, successors=[5], turn=0),  # 2
        RawLane(np.array([(100, 0), (106, 0.5), (110, 4), (112, 10)], float), 3.5, 8.0, D, junction=0,
                successors=[6], turn=1),  # 3
        RawLane(np.array([(100, 0), (105, -1), (107.5, -5), (108, -10)], float), 3.5, 8.0, D, junction=0,
                successors=[7], turn=2),  # 4
        RawLane(_line((120, 0), (220, 0)), 3.5, 16.0, D, road=1, left=9),  # 5
        RawLane(_line((112, 10), (112, 110)), 3.5, 11.0, D, road=2),  # 6
        RawLane(_line((108, -10), (108, -110)), 3.5, 12.0, D, road=3),  # 7
        RawLane(_line((100, 3.5), (120, 3.5)), 3.5, 10.0, D, junction=0, successors=[9], turn=0),  # 8
        RawLane(_line((120, 3.5), (220, 3.5)), 3.5, 16.0, D, road=1, right=5),  # 9
        RawLane(_line((0, -4), (100, -4)), 2.0, 1.5, LaneType.SIDEWALK, road=4),  # 10
    ]
    junctions = [RawJunction(center=(110, 0), radius=15, kind=JunctionKind.SIGNAL)]
    lights = [RawLight(lane=0, junction=0, phase=0), RawLight(lane=1, junction=0, phase=0)]
    stops = [RawStop(lane=5, junction=0)]
    return RoadMap.build("test", lanes, junctions, lights, stops)


@pytest.fixture(scope="module")
def mb() -> MapBatch:
    return MapBatch([build_map()])


def make_state(mb: MapBatch, worlds: list[dict], N: int = 8):
    """Worlds: dict(route=[lanes], ego=(x, y), yaw=..., speed=..., agents=[dict(pos, yaw, speed, kind, ...)])."""
    m = mb.maps[0]
    B = len(worlds)
    R = max(len(w["route"]) for w in worlds)
    polys = []
    for w in worlds:
        pts = np.concatenate([m.lane_points(ln) for ln in w["route"]])
        keep = np.concatenate([[True], np.linalg.norm(np.diff(pts, axis=0), axis=1) > 1e-3])
        polys.append(pts[keep])
    P = max(len(p) for p in polys)
    st = empty_state(B, N, mb.light_lane.shape[1], mb.stop_lane.shape[1], R, P)
    for b, w in enumerate(worlds):
        st.route_lanes[b, : len(w["route"])] = torch.tensor(w["route"])
        st.route_idx[b] = w.get("route_idx", 0)
        p = torch.from_numpy(polys[b]).float()
        st.route_pts[b, : len(p)] = p
        st.route_pts[b, len(p):] = p[-1]
        cum = torch.cat([torch.zeros(1), (p[1:] - p[:-1]).norm(dim=-1).cumsum(0)])
        st.route_cum[b, : len(p)] = cum
        st.route_cum[b, len(p):] = cum[-1]
        st.route_valid[b, : len(p)] = True
        st.route_length[b] = cum[-1]
        ego = torch.tensor(w["ego"], dtype=torch.float32)
        i = int((p - ego).norm(dim=-1).argmin())
        st.progress[b] = cum[i]
        st.progress_idx[b] = i
        st.pos[b, 0] = ego
        st.yaw[b, 0] = w.get("yaw", 0.0)
        st.speed[b, 0] = w.get("speed", 5.0)
        st.kind[b, 0] = int(AgentKind.EGO)
        st.valid[b, 0] = True
        for n, a in enumerate(w.get("agents", []), start=1):
            st.pos[b, n] = torch.tensor(a["pos"], dtype=torch.float32)
            st.yaw[b, n] = a.get("yaw", 0.0)
            st.speed[b, n] = a.get("speed", 0.0)
            st.kind[b, n] = int(a.get("kind", AgentKind.CAR))
            st.siren[b, n] = a.get("siren", False)
            st.valid[b, n] = a.get("valid", True)
    return st


def green_lights(B: int, K: int = 2) -> torch.Tensor:
    return torch.full((B, K), int(LightState.GREEN), dtype=torch.long)


def all_finite(obs: Observation) -> bool:
    return all(torch.isfinite(v.float()).all() for v in obs.tensors().values())


def feat(name: str, kind: str, cfg: ObsConfig | None = None) -> int:
    return Observation.feature_names(cfg)[kind].index(name)


def random_worlds(rng: np.random.Generator, B: int, N: int = 8) -> list[dict]:
    routes = [[0, 2, 5], [0, 3, 6], [0, 4, 7], [0, 1, 8, 9], [1, 8, 9]]
    out = []
    for _ in range(B):
        r = routes[rng.integers(len(routes))]
        x = float(rng.uniform(0, 95))
        ego = (x, 0.0 if r[0] == 0 else 3.5)
        agents = []
        for _ in range(int(rng.integers(0, N))):
            agents.append(dict(pos=(float(rng.uniform(-20, 240)), float(rng.uniform(-60, 60))),
                               yaw=float(rng.uniform(-3, 3)), speed=float(rng.uniform(0, 15)),
                               kind=int(rng.integers(1, 7)), valid=bool(rng.random() < 0.9)))
        out.append(dict(route=r, ego=ego, yaw=float(rng.uniform(-0.2, 0.2)), agents=agents))
    return out


# ----------------------------------------------------------------------------- shapes, masks, finiteness
@pytest.mark.parametrize("B", [1, 3, 17])
def test_shapes_masks_finite(mb, B):
    cfg = ObsConfig()
    st = make_state(mb, random_worlds(np.random.default_rng(B), B), N=8)
    obs = observe(mb, st, green_lights(B), cfg)
    dims = Observation.feature_dims(cfg)
    assert obs.batch_size == B
    assert obs.ego.shape == (B, dims["ego"])
    assert obs.command.shape == (B,) and obs.command.dtype == torch.long
    assert obs.agents.shape == (B, cfg.max_agents, dims["agents"]) and obs.agents_mask.shape == (B, cfg.max_agents)
    assert obs.lanes.shape == (B, cfg.max_lane_chunks, dims["lanes"])
    assert obs.lights.shape == (B, cfg.max_lights, dims["lights"])
    assert obs.stops.shape == (B, cfg.max_stops, dims["stops"])
    assert obs.route.shape == (B, cfg.route_points, 2) and obs.route_mask.shape == (B, cfg.route_points)
    assert dims["lanes"] == 2 * cfg.chunk_points + 2 + 6 + 5
    for tok, mask in [(obs.agents, obs.agents_mask), (obs.lanes, obs.lanes_mask), (obs.lights, obs.lights_mask),
                      (obs.stops, obs.stops_mask), (obs.route, obs.route_mask)]:
        assert mask.dtype == torch.bool
        assert (tok[~mask] == 0).all()  # zeros where masked
    assert all_finite(obs)
    # the ego's one-hots are one-hot
    names = Observation.feature_names(cfg)["ego"]
    cmd = obs.ego[:, names.index("cmd_follow"): names.index("cmd_follow") + 6]
    assert torch.equal(cmd.argmax(1), obs.command) and (cmd.sum(1) == 1).all()
    light = obs.ego[:, names.index("light_none"): names.index("light_none") + 4]
    assert (light.sum(1) == 1).all()


def test_observation_utilities(mb):
    st = make_state(mb, random_worlds(np.random.default_rng(0), 5))
    obs = observe(mb, st, green_lights(5))
    sub = obs.index(torch.tensor([4, 1]))
    assert sub.batch_size == 2 and torch.equal(sub.agents[0], obs.agents[4])
    both = Observation.cat([obs.index(slice(0, 2)), obs.index(slice(2, 5))])
    for k, v in obs.tensors().items():
        assert torch.equal(v, getattr(both, k)), k
    assert obs.to("cpu").ego.device.type == "cpu"
    with pytest.raises(CraftError):
        Observation.cat([])
    with pytest.raises(CraftError):
        ObsConfig(radius=-1.0)
    with pytest.raises(CraftError):
        ObsConfig(chunk_points=1)


def test_few_agents_and_single_agent_worlds(mb):
    st = make_state(mb, [dict(route=[0, 2, 5], ego=(50, 0))], N=1)  # the ego alone, N=1 < max_agents
    obs = observe(mb, st, green_lights(1))
    assert not obs.agents_mask.any() and (obs.agents == 0).all() and all_finite(obs)


# ----------------------------------------------------------------------------- agents
def test_ego_frame_transform(mb):
    # ego facing +y (yaw pi/2); an agent 10 m straight ahead, heading the same way at 5 m/s
    # another 4 m to the ego's left (-x in the world), heading +x (towards the ego's right)
    w = dict(route=[6], ego=(112, 30), yaw=math.pi / 2,
             agents=[dict(pos=(112, 40), yaw=math.pi / 2, speed=5.0, kind=AgentKind.TRUCK, siren=False),
                     dict(pos=(108, 30), yaw=0.0, speed=3.0, kind=AgentKind.EMERGENCY, siren=True)])
    cfg = ObsConfig()
    obs = observe(mb, make_state(mb, [w]), green_lights(1), cfg)
    a = obs.agents[0] * 1.0
    n = Observation.feature_names(cfg)["agents"]
    assert obs.agents_mask[0, :2].all() and not obs.agents_mask[0, 2:].any()
    # nearest first: the left agent (4 m) before the one ahead (10 m)
    left, ahead = a[0], a[1]
    torch.testing.assert_close(ahead[n.index("x")] * cfg.pos_scale, torch.tensor(10.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(ahead[n.index("y")] * cfg.pos_scale, torch.tensor(0.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(ahead[n.index("cos")], torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(ahead[n.index("vx")] * cfg.speed_scale, torch.tensor(5.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(ahead[n.index("vy")] * cfg.speed_scale, torch.tensor(0.0), atol=1e-4, rtol=0)
    assert ahead[n.index("kind_truck")] == 1 and ahead[n.index("siren")] == 0
    assert ahead[n.index("kind_car")] == 0
    torch.testing.assert_close(left[n.index("x")] * cfg.pos_scale, torch.tensor(0.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(left[n.index("y")] * cfg.pos_scale, torch.tensor(4.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(left[n.index("sin")], torch.tensor(-1.0), atol=1e-5, rtol=0)  # facing the ego's right
    torch.testing.assert_close(left[n.index("vy")] * cfg.speed_scale, torch.tensor(-3.0), atol=1e-4, rtol=0)
    assert left[n.index("kind_emergency")] == 1 and left[n.index("siren")] == 1


def test_agents_radius_validity_and_order(mb):
    rng = np.random.default_rng(3)
    dists = rng.permutation(np.array([5.0, 70.0, 12.0, 59.0, 30.0, 61.0, 2.0, 45.0]))
    agents = [dict(pos=(50 + d * math.cos(i), d * math.sin(i))) for i, d in enumerate(dists)]
    agents.append(dict(pos=(51, 0), valid=False))  # invalid: never observed
    cfg = ObsConfig()
    obs = observe(mb, make_state(mb, [dict(route=[0, 2, 5], ego=(50, 0), agents=agents)], N=12), green_lights(1), cfg)
    m = obs.agents_mask[0]
    xy = obs.agents[0, :, :2] * cfg.pos_scale
    d = xy.norm(dim=-1)
    expect = np.sort(dists[dists <= cfg.radius])
    assert int(m.sum()) == len(expect)
    np.testing.assert_allclose(d[m].numpy(), expect, atol=1e-3)  # nearest first, beyond the radius left out


def test_max_agents_keeps_the_nearest(mb):
    cfg = ObsConfig(max_agents=3)
    agents = [dict(pos=(50 + d, 2.0)) for d in (9.0, 1.0, 7.0, 3.0, 5.0)]
    obs = observe(mb, make_state(mb, [dict(route=[0, 2, 5], ego=(50, 0), agents=agents)]), green_lights(1), cfg)
    np.testing.assert_allclose(obs.agents[0, :, 0].numpy() * cfg.pos_scale, [1.0, 3.0, 5.0], atol=1e-4)


# ----------------------------------------------------------------------------- lanes
def test_chunk_table_covers_every_lane(mb):
    cfg = ObsConfig()
    tab = chunk_table(mb, cfg)
    assert chunk_table(mb, cfg) is tab  # cached
    m = mb.maps[0]
    lane = tab["lane"][0][tab["valid"][0]].numpy()
    assert set(lane.tolist()) == set(range(m.num_lanes))
    for ln in range(m.num_lanes):
        sel = tab["lane"][0] == ln
        s0, s1 = tab["s0"][0][sel].numpy(), tab["s1"][0][sel].numpy()
        assert s0[0] == 0 and abs(s1[-1] - m.lane_length[ln]) < 1e-3 and np.allclose(s0[1:], s1[:-1])
        assert (s1 - s0 <= cfg.chunk_length + 1e-4).all()
    pts = tab["points"][0][tab["valid"][0]]
    assert pts.shape[1] == cfg.chunk_points


def test_lane_chunks_cover_the_ego_road_with_route_flag(mb):
    cfg = ObsConfig()
    obs = observe(mb, make_state(mb, [dict(route=[0, 2, 5], ego=(40, 0))]), green_lights(1), cfg)
    n = Observation.feature_names(cfg)["lanes"]
    tok = obs.lanes[0][obs.lanes_mask[0]]
    assert int(obs.lanes_mask[0].sum()) >= 30  # three lanes, ~12 chunks each within 60 m
    P = cfg.chunk_points
    pts = tok[:, : 2 * P].reshape(-1, P, 2) * cfg.pos_scale
    # chunks lying on the ego's lane (y = 0 in the ego frame, heading along x) cover x in [-20, 20]
    on_ego_lane = (pts[..., 1].abs() < 1e-3).all(1) & (tok[:, n.index("cos")] > 0.999)
    xs = pts[on_ego_lane][..., 0]
    assert xs.min() <= -20 and xs.max() >= 20
    assert (tok[on_ego_lane, n.index("on_route")] == 1).all()
    assert (tok[on_ego_lane, n.index("type_driving")] == 1).all()
    assert (tok[on_ego_lane, n.index("has_light")] == 1).all()  # lane 0 ends at a light
    torch.testing.assert_close(tok[on_ego_lane, n.index("speed_limit")] * cfg.speed_scale,
                               torch.full((int(on_ego_lane.sum()),), 13.9), atol=1e-4, rtol=0)
    # the left neighbour (lane 1, y = 3.5) is not on the route; the sidewalk (y = -4) is one-hot sidewalk
    left = (pts[..., 1] - 3.5).abs().lt(1e-3).all(1)
    assert left.any() and (tok[left, n.index("on_route")] == 0).all()
    walk = (pts[..., 1] + 4).abs().lt(1e-3).all(1)
    assert walk.any() and (tok[walk, n.index("type_sidewalk")] == 1).all()
    # nearest first
    mid = pts[:, P // 2]
    d = mid.norm(dim=-1)
    assert (d[1:] >= d[:-1] - 0.6).all()  # ordered by chunk midpoint (the middle point for odd P)


def test_lane_chunk_grid_matches_brute_force(mb):
    """The grid broad phase selects exactly the nearest chunks a search over all chunks would."""
    cfg = ObsConfig(max_lane_chunks=24, radius=40.0)
    tab = chunk_table(mb, cfg)
    rng = np.random.default_rng(11)
    B = 64
    worlds = [dict(route=[0, 2, 5], ego=(float(rng.uniform(-60, 280)), float(rng.uniform(-150, 150))),
                   yaw=float(rng.uniform(-3, 3))) for _ in range(B)]
    worlds[0]["ego"] = (1e4, 1e4)  # far off the map: no chunk
    st = make_state(mb, worlds)
    obs = observe(mb, st, green_lights(B), cfg)
    mids = tab["mid"][0][tab["valid"][0]]
    P = cfg.chunk_points
    for b in range(B):
        d = (mids - st.pos[b, 0]).norm(dim=-1)
        expect = d[d <= cfg.radius].sort().values[: cfg.max_lane_chunks]
        pts = obs.lanes[b, :, : 2 * P].reshape(-1, P, 2) * cfg.pos_scale
        got = pts[obs.lanes_mask[b], P // 2].norm(dim=-1)  # the middle point of an odd P is the chunk midpoint
        torch.testing.assert_close(got, expect, atol=2e-3, rtol=0)
    assert not obs.lanes_mask[0].any()


def test_lane_chunks_in_junction_flagged(mb):
    cfg = ObsConfig()
    obs = observe(mb, make_state(mb, [dict(route=[0, 3, 6], ego=(95, 0))]), green_lights(1), cfg)
    n = Observation.feature_names(cfg)["lanes"]
    tok = obs.lanes[0][obs.lanes_mask[0]]
    junc = tok[:, n.index("junction")] == 1
    assert junc.any()
    assert (tok[junc & (tok[:, n.index("on_route")] == 1)].shape[0]) >= 1  # the left connector (lane 3)


# ----------------------------------------------------------------------------- command
@pytest.mark.parametrize(
    "route,ego,expect",
    [
        ([0, 1, 8, 9], (10, 0), Command.CHANGE_LEFT),
        ([1, 0, 2, 5], (10, 3.5), Command.CHANGE_RIGHT),
        ([0, 3, 6], (70, 0), Command.LEFT),
        ([0, 2, 5], (70, 0), Command.STRAIGHT),
        ([0, 4, 7], (70, 0), Command.RIGHT),
        ([0, 2, 5], (10, 0), Command.FOLLOW),  # junction 90 m away
        ([0, 4, 7], (55, 0), Command.FOLLOW),  # 45 m away: not yet
        ([6], (112, 30), Command.FOLLOW),
    ],
)
def test_navigation_command(mb, route, ego, expect):
    st = make_state(mb, [dict(route=route, ego=ego)])
    assert int(navigation_command(mb, st)[0]) == int(expect)
    assert int(observe(mb, st, green_lights(1)).command[0]) == int(expect)


def test_command_inside_junction_and_after(mb):
    worlds = [
        dict(route=[0, 3, 6], ego=(106, 0.5), route_idx=1),  # on the left connector
        dict(route=[0, 3, 6], ego=(112, 20), yaw=math.pi / 2, route_idx=2),  # past the junction
        dict(route=[0, 4, 7], ego=(30, 0)),  # 70 m before
    ]
    cmd = navigation_command(mb, make_state(mb, worlds))
    assert cmd.tolist() == [int(Command.LEFT), int(Command.FOLLOW), int(Command.FOLLOW)]


# ----------------------------------------------------------------------------- lights, stops, ego context
def test_light_state_follows_lights_tensor(mb):
    cfg = ObsConfig()
    worlds = [dict(route=[0, 2, 5], ego=(80, 0))] * 3
    st = make_state(mb, worlds)
    # world b: light 0 (lane 0, on the route) in state b; light 1 (lane 1) always red
    lights = torch.tensor([[0, 2], [1, 2], [2, 2]])
    obs = observe(mb, st, lights, cfg)
    n = Observation.feature_names(cfg)["lights"]
    ne = Observation.feature_names(cfg)["ego"]
    assert obs.lights_mask[:, :2].all() and not obs.lights_mask[:, 2:].any()
    for b in range(3):
        tok = obs.lights[b, 0]  # nearest: the light on the ego's lane, 20 m ahead
        torch.testing.assert_close(tok[:2] * cfg.pos_scale, torch.tensor([20.0, 0.0]), atol=1e-3, rtol=0)
        onehot = tok[n.index("green"): n.index("green") + 3]
        assert onehot.tolist() == [1.0 if i == b else 0.0 for i in range(3)]
        assert tok[n.index("on_route")] == 1 and tok[n.index("cos")] > 0.999
        other = obs.lights[b, 1]
        assert other[n.index("red")] == 1 and other[n.index("on_route")] == 0
        # the ego's next light on the route and its stop-line distance
        eg = obs.ego[b]
        assert eg[ne.index("light_green") + b] == 1 and eg[ne.index("light_none")] == 0
        torch.testing.assert_close(eg[ne.index("stop_line_dist")] * cfg.pos_scale, torch.tensor(20.0),
                                   atol=0.2, rtol=0)


def test_no_light_far_away(mb):
    cfg = ObsConfig()
    obs = observe(mb, make_state(mb, [dict(route=[0, 2, 5], ego=(5, 0))]), green_lights(1), cfg)
    ne = Observation.feature_names(cfg)["ego"]
    assert not obs.lights_mask.any()
    assert obs.ego[0, ne.index("light_none")] == 1
    torch.testing.assert_close(obs.ego[0, ne.index("stop_line_dist")], torch.tensor(cfg.stop_clip / cfg.pos_scale))


def test_stop_sign_tokens_and_at_stop_flag(mb):
    cfg = ObsConfig()
    worlds = [dict(route=[5], ego=(170, 0)), dict(route=[5], ego=(217, 0)), dict(route=[6], ego=(112, 100),
                                                                            yaw=math.pi / 2)]
    obs = observe(mb, make_state(mb, worlds), green_lights(3), cfg)
    n = Observation.feature_names(cfg)["stops"]
    ne = Observation.feature_names(cfg)["ego"]
    assert obs.stops_mask[0, 0] and not obs.stops_mask[0, 1:].any()
    torch.testing.assert_close(obs.stops[0, 0, :2] * cfg.pos_scale, torch.tensor([50.0, 0.0]), atol=1e-3, rtol=0)
    assert obs.stops[0, 0, n.index("on_route")] == 1
    torch.testing.assert_close(obs.ego[0, ne.index("stop_line_dist")] * cfg.pos_scale, torch.tensor(50.0),
                               atol=0.2, rtol=0)
    assert obs.ego[0, ne.index("at_stop_sign")] == 0 and obs.ego[1, ne.index("at_stop_sign")] == 1
    assert not obs.stops_mask[2].any() and obs.ego[2, ne.index("at_stop_sign")] == 0


def test_ego_scalars(mb):
    cfg = ObsConfig()
    st = make_state(mb, [dict(route=[5], ego=(150, 0), speed=7.5)])
    st.accel[0, 0] = -2.5
    st.steer[0, 0] = 0.1
    obs = observe(mb, st, green_lights(1), cfg)
    ne = Observation.feature_names(cfg)["ego"]
    e = obs.ego[0]
    torch.testing.assert_close(e[ne.index("speed")], torch.tensor(0.5))
    torch.testing.assert_close(e[ne.index("accel")], torch.tensor(-0.5))
    torch.testing.assert_close(e[ne.index("steer")], torch.tensor(0.1))
    torch.testing.assert_close(e[ne.index("speed_limit")] * cfg.speed_scale, torch.tensor(16.0))


# ----------------------------------------------------------------------------- route
def test_route_points_ego_frame(mb):
    cfg = ObsConfig()
    obs = observe(mb, make_state(mb, [dict(route=[0, 2, 5], ego=(50, 0)), dict(route=[5], ego=(200, 0))]),
                  green_lights(2), cfg)
    r = obs.route[0] * cfg.pos_scale
    assert obs.route_mask[0].all()
    np.testing.assert_allclose(r[:, 0].numpy(), np.arange(cfg.route_points) * cfg.route_spacing, atol=1e-3)
    np.testing.assert_allclose(r[:, 1].numpy(), 0.0, atol=1e-3)
    # 20 m left to the route's end: points up to 20 m ahead, then masked
    assert obs.route_mask[1].tolist() == [True] * 6 + [False] * (cfg.route_points - 6)
    assert (obs.route[1][~obs.route_mask[1]] == 0).all()


# ----------------------------------------------------------------------------- batch independence
def test_batch_independence(mb):
    worlds = random_worlds(np.random.default_rng(7), 9)
    st = make_state(mb, worlds, N=8)
    lights = torch.randint(0, 3, (9, 2), generator=torch.Generator().manual_seed(0))
    full = observe(mb, st, lights)
    for b in (0, 4, 8):
        single = observe(mb, st.index(torch.tensor([b])), lights[b: b + 1])
        for k, v in full.tensors().items():
            torch.testing.assert_close(v[b: b + 1], getattr(single, k), atol=1e-6, rtol=0, msg=k)
    # permuting the batch permutes the observation
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    pobs = observe(mb, st.index(perm), lights[perm])
    for k, v in full.tensors().items():
        torch.testing.assert_close(v[perm], getattr(pobs, k), atol=1e-6, rtol=0, msg=k)


def test_two_maps(mb):
    """Worlds on different maps of one MapBatch see their own map."""
    m0 = build_map()
    lanes = [RawLane(_line((0, 0), (300, 0)), 3.5, 20.0)]
    m1 = RoadMap.build("straight", lanes)
    mb2 = MapBatch([m0, m1])
    st = make_state(mb, [dict(route=[0, 2, 5], ego=(80, 0)), dict(route=[0], ego=(80, 0))])
    st.map_id[1] = 1
    obs = observe(mb2, st, green_lights(2))
    assert obs.lights_mask[0].any() and not obs.lights_mask[1].any()
    assert obs.lanes_mask[0].sum() > obs.lanes_mask[1].sum()
    assert all_finite(obs)
