"""The counterfactual world (CRAFT's dense proxy) on small hand-made scenes and a generated town."""

from __future__ import annotations

import math

import pytest
import torch

from craft.errors import CraftError
from craft.finetune.proxy import TERMS, CounterfactualWorld, ProxyConfig
from craft.world.autopilot import PlanExecutor, route_plan
from craft.world.kinds import AgentKind
from craft.world.map import (
    JunctionKind,
    LaneType,
    LightState,
    MapBatch,
    drivable,
    lane_candidates,
    pick_lane,
)
from craft.world.world import AgentSpec, World, WorldSpec, random_specs
from tests.handmaps import crossroads, straight_road

torch.set_num_threads(1)


def _straight(speed: float, lateral=None, T: int = 6) -> torch.Tensor:
    """(T, 3) ego-frame plan at constant ``speed`` with optional lateral offsets (T,)."""
    t = torch.arange(1, T + 1, dtype=torch.float32) * 0.5
    y = torch.zeros(T) if lateral is None else torch.as_tensor(lateral, dtype=torch.float32)
    return torch.stack([speed * t, y, torch.zeros(T)], -1)


STOP = torch.zeros(6, 3)  # every waypoint at the start: a stop-in-place plan


@pytest.fixture(scope="module")
def road():
    mb = MapBatch([straight_road(400.0)])
    return mb, World(mb), CounterfactualWorld(mb)


def _scene(world, agents=(), speed=10.0, s=100.0, route=(0,)):
    return world.reset([WorldSpec(map_index=0, route=list(route), ego_s=s, ego_speed=speed, n_vehicles=0,
                                  n_pedestrians=0, agents=list(agents))], seed=0)


def test_parked_car_collision_scores_below_stopping(road):
    mb, world, cw = road
    st = _scene(world, [AgentSpec(AgentKind.STATIC, pos=(118.0, 0.0), yaw=0.0)])
    traj = torch.stack([_straight(10.0), STOP])[None]
    sc = cw.score(st, traj, torch.ones(1, 2, dtype=torch.bool))
    assert sc.collided.tolist() == [[True, False]]
    assert float(sc.terms["collision"][0, 0]) < -40.0  # speed-scaled, discounted first collision
    assert float(sc.terms["collision"][0, 1]) == 0.0
    assert float(sc.returns[0, 0]) < float(sc.returns[0, 1])
    assert float(sc.advantages[0, 0]) < 0 < float(sc.advantages[0, 1])
    total = sum(sc.terms[k] for k in TERMS)
    assert torch.allclose(total, sc.returns, atol=1e-4)


def test_leaving_the_road_is_offroad(road):
    mb, world, cw = road
    st = _scene(world)
    traj = torch.stack([_straight(10.0), _straight(10.0, [2.0, 6.0, 10.0, 14.0, 18.0, 22.0])])[None]
    sc = cw.score(st, traj, torch.ones(1, 2, dtype=torch.bool))
    assert float(sc.terms["offroad"][0, 0]) == 0.0 and float(sc.terms["offroute"][0, 0]) == 0.0
    assert float(sc.terms["offroad"][0, 1]) < 0.0
    assert float(sc.terms["progress"][0, 0]) > float(sc.terms["progress"][0, 1])
    assert float(sc.returns[0, 0]) > float(sc.returns[0, 1])
    assert not sc.collided.any()


def test_red_light_flag_only_for_crossing_candidate():
    mb = MapBatch([crossroads(JunctionKind.SIGNAL)])
    world, cw = World(mb), CounterfactualWorld(mb)
    st = world.reset([WorldSpec(map_index=0, route=[0, 2, 4], ego_s=78.0, ego_speed=10.0, n_vehicles=0,
                                n_pedestrians=0)], seed=0)
    traj = torch.stack([_straight(10.0), STOP])[None]
    valid = torch.ones(1, 2, dtype=torch.bool)
    red = st.replace(light_override=torch.full_like(st.light_override, int(LightState.RED)))
    sc = cw.score(red, traj, valid)
    assert sc.terms["red_light"].tolist() == [[-40.0, 0.0]]
    green = st.replace(light_override=torch.full_like(st.light_override, int(LightState.GREEN)))
    sg = cw.score(green, traj, valid)
    assert sg.terms["red_light"].tolist() == [[0.0, 0.0]]
    # the flag costs exactly 40 (with the paper's weights 2 s of progress at 10 m/s is worth more than that)
    assert torch.allclose(sc.returns, sg.returns + torch.tensor([[-40.0, 0.0]]), atol=1e-4)


def test_stop_sign_flag():
    mb = MapBatch([crossroads(JunctionKind.STOP)])
    world, cw = World(mb), CounterfactualWorld(mb)
    st = world.reset([WorldSpec(map_index=0, route=[0, 2, 4], ego_s=78.0, ego_speed=10.0, n_vehicles=0,
                                n_pedestrians=0)], seed=0)
    sc = cw.score(st, torch.stack([_straight(10.0), STOP])[None], torch.ones(1, 2, dtype=torch.bool))
    assert sc.terms["stop_sign"].tolist() == [[-40.0, 0.0]]


def test_ego_follows_candidate_like_closed_loop_world(road):
    mb, world, cw = road
    st = _scene(world, speed=8.0)
    traj = torch.stack([_straight(10.0, [0.0, 0.3, 0.8, 1.4, 2.0, 2.5]), _straight(4.0)])  # (G, T, 3)
    pos, yaw, speed = cw.ego_rollout(st, traj[None])
    for g in range(traj.shape[0]):
        s = st.clone()
        ex = PlanExecutor(1)
        ex.set_plan(s, traj[g][None])
        for h in range(cw.cfg.horizon):
            s, _ = world.step(s, ex.control(s))
            assert torch.allclose(s.pos[0, 0], pos[0, g, h], atol=1e-4)
            assert abs(float(s.yaw[0, 0] - yaw[0, g, h])) < 1e-5
            assert abs(float(s.speed[0, 0] - speed[0, g, h])) < 1e-5


def _town_batch(town, B=3, G=24, seed=0):
    mb = MapBatch([town])
    world = World(mb)
    st = world.reset(random_specs(mb, B, seed, n_vehicles=30, n_pedestrians=8), seed=seed)
    ex = PlanExecutor(B)
    for k in range(10):
        if k % 5 == 0:
            ex.set_plan(st, route_plan(st, 8.0))
        st, _ = world.step(st, ex.control(st))
    g = torch.Generator().manual_seed(seed)
    speeds = torch.rand(B, G, generator=g) * 14.0
    rep = st.index(torch.arange(B).repeat_interleave(G))
    traj = route_plan(rep, speeds.reshape(-1)).view(B, G, 6, 3)
    traj[..., 1] += (torch.rand(B, G, 1, generator=g) * 2 - 1) * 3.0 * torch.linspace(0.2, 1.0, 6)
    valid = torch.rand(B, G, generator=g) > 0.15
    return mb, st, traj, valid


def test_permutation_equivariance_and_chunking(town):
    mb, st, traj, valid = _town_batch(town)
    cw = CounterfactualWorld(mb)
    sc = cw.score(st, traj, valid)
    assert sc.returns.shape == valid.shape and torch.isfinite(sc.returns).all()
    assert (sc.returns[~valid] == 0).all() and (sc.advantages[~valid] == 0).all()
    perm = torch.randperm(traj.shape[1], generator=torch.Generator().manual_seed(1))
    sp = cw.score(st, traj[:, perm], valid[:, perm])
    assert torch.allclose(sp.returns, sc.returns[:, perm], atol=1e-5)
    assert torch.allclose(sp.advantages, sc.advantages[:, perm], atol=1e-5)
    assert torch.equal(sp.collided, sc.collided[:, perm])
    for k in TERMS:
        assert torch.allclose(sp.terms[k], sc.terms[k][:, perm], atol=1e-5)
    sc1 = CounterfactualWorld(mb, ProxyConfig(chunk_states=1)).score(st, traj, valid)
    assert torch.allclose(sc1.returns, sc.returns, atol=1e-5)
    assert torch.equal(sc1.collided, sc.collided)
    # a state scored alone gets the same scores as inside the batch
    one = cw.score(st.index(slice(1, 2)), traj[1:2], valid[1:2])
    assert torch.allclose(one.returns, sc.returns[1:2], atol=1e-5)


def test_lane_terms_match_world_queries(town):
    """With lane merging off, the proxy's lane index reproduces the world's lane queries."""
    mb = MapBatch([town])
    cw = CounterfactualWorld(mb, ProxyConfig(lane_simplify_tol=0.0))
    g = torch.Generator().manual_seed(0)
    lanes = (torch.from_numpy(town.lane_type) == int(LaneType.DRIVING)).nonzero().squeeze(1)
    pt = torch.from_numpy(town.points)[torch.isin(torch.from_numpy(town.point_lane), lanes)]
    p = pt[torch.randint(len(pt), (3000,), generator=g)] + torch.randn(3000, 2, generator=g) * 3.0
    yaw = torch.rand(3000, generator=g) * 2 * math.pi - math.pi
    mid = torch.zeros(3000, dtype=torch.long)
    r = cw.lanes.query(mid, p, yaw, cw.cfg.events)
    cand = lane_candidates(mb, mid, p)
    assert torch.equal(r["offroad"], ~drivable(mb, mid, p, cand=cand))
    ego_lane = pick_lane(cand, (LaneType.DRIVING,), yaw)
    dist = torch.where(torch.isfinite(ego_lane["dist"]), ego_lane["dist"], torch.full_like(p[:, 0], 5.0))
    same = r["lane"] == ego_lane["lane"]
    assert same.float().mean() > 0.995  # the rest are exact ties of overlapping connectors
    assert torch.allclose(r["center_dist"][same], dist[same], atol=1e-4)


def test_bad_shapes_raise(road):
    mb, world, cw = road
    st = _scene(world)
    with pytest.raises(CraftError, match="trajectories"):
        cw.score(st, torch.zeros(2, 3, 6, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(CraftError, match="valid"):
        cw.score(st, torch.zeros(1, 3, 6, 3), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(CraftError, match="horizon"):
        ProxyConfig(horizon=0)


def test_stop_sign_rule_matches_sequential_reference():
    """The whole-trajectory stop-sign rule equals the world's step-by-step state machine."""
    from craft.finetune.proxy import _stop_violations

    g = torch.Generator().manual_seed(0)
    H, N = 12, 4000
    inside = torch.rand(H, N, generator=g) < 0.5
    slow = inside & (torch.rand(H, N, generator=g) < 0.3)
    inside0 = torch.rand(N, generator=g) < 0.5
    served0 = torch.rand(N, generator=g) < 0.5
    ok, was = served0.clone(), inside0.clone()
    ref = []
    for h in range(H):  # events._stop_signs, one step at a time
        ok = ok | slow[h]
        left = was & ~inside[h]
        ref.append(left & ~ok)
        ok = ok & ~left
        was = inside[h]
    assert torch.equal(_stop_violations(inside, slow, inside0, served0), torch.stack(ref))


def test_emergency_lane_matches_world_rule(town):
    """The proxy's emergency-lane flag is the world's rule (nearest driving-or-shoulder lane is a shoulder
    and the point is within its half width), also around the shoulders of the town."""
    mb = MapBatch([town])
    cw = CounterfactualWorld(mb, ProxyConfig(lane_simplify_tol=0.0))
    g = torch.Generator().manual_seed(0)
    lanes = (torch.from_numpy(town.lane_type) == int(LaneType.SHOULDER)).nonzero().squeeze(1)
    assert lanes.numel() > 0
    pt = torch.from_numpy(town.points)[torch.isin(torch.from_numpy(town.point_lane), lanes)]
    p = pt[torch.randint(len(pt), (3000,), generator=g)] + torch.randn(3000, 2, generator=g) * 2.0
    yaw = torch.rand(3000, generator=g) * 2 * math.pi - math.pi
    mid = torch.zeros(3000, dtype=torch.long)
    r = cw.lanes.query(mid, p, yaw, cw.cfg.events)
    cand = lane_candidates(mb, mid, p)
    edge = pick_lane(cand, (LaneType.DRIVING, LaneType.SHOULDER))
    lane_type = torch.from_numpy(town.lane_type)[edge["lane"].clamp_min(0)]
    is_sh = (edge["lane"] >= 0) & (lane_type == int(LaneType.SHOULDER))
    world = is_sh & (edge["dist"] <= 0.5 * edge["width"])
    assert world.any() and (~world).any()
    assert (r["emergency"] == world).float().mean() > 0.995  # the rest: exact ties / boundary rounding


def test_scores_match_stepwise_terms_on_a_straight_road(road):
    """Horizon-wide terms: stop_after_collision masks the steps after the first collision only."""
    mb, world, cw = road
    st = _scene(world, [AgentSpec(AgentKind.STATIC, pos=(118.0, 0.0), yaw=0.0)])
    traj = torch.stack([_straight(10.0), _straight(2.0), STOP])[None]
    valid = torch.ones(1, 3, dtype=torch.bool)
    a = cw.score(st, traj, valid)
    b = CounterfactualWorld(mb, ProxyConfig(stop_after_collision=False)).score(st, traj, valid)
    assert a.collided.tolist() == [[True, False, False]]
    assert torch.equal(a.collided, b.collided)
    # the collided candidate earns less progress when its later steps are masked; the others are unchanged
    assert float(a.terms["progress"][0, 0]) < float(b.terms["progress"][0, 0])
    for k in TERMS:
        assert torch.allclose(a.terms[k][0, 1:], b.terms[k][0, 1:], atol=1e-6)
    assert float(a.terms["collision"][0, 0]) == float(b.terms["collision"][0, 0])


def test_decay_rollout_holds_then_brakes_as_specified(road):
    """A car at 10 m/s with no acceleration: 1.0 s of constant speed, then the brake ramps linearly to 3 m/s²
    over 1.0 s; the per-step displacement follows the speeds of that schedule (hand-computed)."""
    mb, world, cw = road
    st = _scene(world, [AgentSpec(AgentKind.CAR, lane=0, s=200.0, speed=10.0)])
    st = st.replace(accel=torch.zeros_like(st.accel))
    k = int(torch.nonzero(st.valid[0, 1:])[0]) + 1
    pos, _, valid = cw.decay_rollout(st)
    assert valid[0, k] and not valid[0, 0]
    x = torch.cat([st.pos[0, k, :1], pos[0, :, k, 0]])
    step = torch.diff(x)  # (H,) metres per 0.1 s step
    dt, v = 0.1, 10.0
    for h in range(20):
        t = h * dt
        a = 0.0 if t < 1.0 - 1e-6 else -3.0 * min(1.0, (t - 1.0 + dt) / 1.0)
        v_next = v + a * dt
        # the step's displacement lies between the speeds at its two ends (exactly v dt while holding)
        assert min(v, v_next) * dt - 1e-4 <= float(step[h]) <= max(v, v_next) * dt + 1e-4, (h, float(step[h]))
        v = v_next
    assert abs(v - (10.0 - 0.03 * 55)) < 1e-6  # 8.35 m/s at the end of the horizon
    assert torch.allclose(step[:10], torch.full((10,), 1.0), atol=1e-4)


LANE_CHANGE = [0.0, 0.2, 0.5, 0.9, 1.2, 1.4]


@pytest.mark.parametrize("speed,lateral,tol", [(10.0, None, 1.0), (10.0, LANE_CHANGE, 1.0),
                                               (6.0, LANE_CHANGE, 8.0 / 1.2 + 1.0)])
def test_return_matches_closed_loop_world_in_a_frozen_world(road, speed, lateral, tol):
    """No other agents (so decay rollout and reactive traffic coincide): the proxy's return of a candidate equals
    the discounted dense reward of the same candidate executed by the closed-loop world, up to the world's
    progress being counted in ~1 m route-point quanta: at 10 m/s (1 m per step) the returns agree within 1; at
    6 m/s the world's quantised progress may miss one metre inside the horizon (worth 8 / 1.2)."""
    from craft.finetune.rewards import dense_reward_from_events

    mb, world, cw = road
    st = _scene(world, speed=speed)
    plan = _straight(speed, lateral)
    proxy = cw.score(st, plan[None, None], torch.ones(1, 1, dtype=torch.bool))
    ex = PlanExecutor(1, dt=world.cfg.dt)
    ex.set_plan(st, plan[None])
    s, prev, ret, collided = world.clone(st), None, 0.0, None
    for h in range(cw.cfg.horizon):
        s, ev = world.step(s, ex.control(s))
        r, _, collided = dense_reward_from_events(prev, ev, cw.cfg.reward, collided_before=collided)
        ret += cw.cfg.reward.gamma ** h * float(r[0])
        prev = ev
    assert abs(float(proxy.returns[0, 0]) - ret) <= tol, (float(proxy.returns[0, 0]), ret)


def test_overlap_at_the_snapshot_is_not_a_new_collision(road):
    from craft.world.collision import ego_collisions

    mb, world, cw = road
    # a parked car beside the ego's front half already overlaps it; another one stands 18 m ahead
    st = _scene(world, [AgentSpec(AgentKind.STATIC, pos=(101.5, 1.6), yaw=0.0),
                        AgentSpec(AgentKind.STATIC, pos=(118.0, 0.0), yaw=0.0)])
    assert ego_collisions(st.pos, st.yaw, st.length, st.width, st.valid)[0].tolist()[1:3] == [True, False]
    traj = torch.stack([STOP, _straight(10.0)])[None]
    sc = cw.score(st, traj, torch.ones(1, 2, dtype=torch.bool))
    # braking through the existing overlap is not charged; driving on into the car ahead is a new contact
    assert sc.collided.tolist() == [[False, True]]
    assert float(sc.terms["collision"][0, 0]) == 0.0 and float(sc.terms["collision"][0, 1]) < -40.0


def test_ongoing_contacts_rule_by_hand():
    from craft.finetune.proxy import _ongoing_contacts

    # state 0, candidates 0 / 1, agents 0..2; the snapshot overlaps agent 1 only
    overlap0 = torch.tensor([[False, True, False]])
    pairs = [(0, 0, 0, 1), (0, 0, 1, 1), (0, 0, 2, 1),  # candidate 0 stays on agent 1: ongoing
             (0, 1, 0, 1), (0, 1, 2, 1), (0, 1, 3, 1),  # candidate 1 separates at step 1: step 2 on is new
             (0, 1, 1, 2)]  # another agent: new
    cb, cg, ch, cn = (torch.tensor(c) for c in zip(*pairs))
    perm = torch.tensor([6, 2, 4, 0, 5, 1, 3])  # any order of the pairs
    out = _ongoing_contacts(cb[perm], cg[perm], ch[perm], cn[perm], overlap0, G=2, H=5)
    expect = torch.tensor([True, True, True, True, False, False, False])[perm]
    assert out.tolist() == expect.tolist()


def test_optimised_path_matches_the_reference_path(town):
    """The fused ego loop and the route tracking of the default path give the returns of the unoptimised
    reference path (the world's track_prepared / bicycle_step per step, candidate-major route windows),
    with and without tracker memory at the snapshot, on a town batch with stop plans and lane changes."""
    from craft.world.tracker import TrackerState

    mb, st, traj, valid = _town_batch(town, B=4, G=32, seed=3)
    traj[:, :3] = 0.0  # stop-in-place plans (the tracker's heading alignment)
    g = torch.Generator().manual_seed(5)
    memory = TrackerState(torch.randn(4, generator=g) * 0.5, torch.randn(4, generator=g),
                          torch.tensor([True, False, True, True]))
    fast, ref = CounterfactualWorld(mb), CounterfactualWorld(mb, reference=True)
    assert not fast.reference and ref.reference
    for tr in (None, memory):
        a, b = fast.score(st, traj, valid, tr), ref.score(st, traj, valid, tr)
        assert torch.allclose(a.returns, b.returns, atol=1e-5, rtol=0)
        assert torch.allclose(a.advantages, b.advantages, atol=1e-5, rtol=0)
        assert torch.equal(a.collided, b.collided)
        for k in TERMS:
            assert torch.allclose(a.terms[k], b.terms[k], atol=1e-5, rtol=0), k
        pa, pb = fast.ego_rollout(st, traj, tr), ref.ego_rollout(st, traj, tr)
        for x, y in zip(pa, pb):
            assert torch.allclose(x, y, atol=1e-5, rtol=0)
    # the scores are not trivially equal: the candidates differ and some leave the road or stop
    assert float(a.returns[valid].std()) > 0.1
    # the lane query's two kernels on points all over the town, on and off the road, at any heading
    x0, y0, x1, y1 = town.bounds
    pts = torch.rand(20000, 2, generator=g) * torch.tensor([x1 - x0, y1 - y0]) + torch.tensor([x0, y0])
    yaws = (torch.rand(20000, generator=g) * 2 - 1) * math.pi
    m = torch.zeros(20000, dtype=torch.long)
    qa = fast.lanes.query(m, pts, yaws, fast.cfg.events)
    qb = ref.lanes.query(m, pts, yaws, ref.cfg.events, reference=True)
    for k in qa:
        assert torch.equal(qa[k], qb[k]), k
    assert 0.05 < float(qa["offroad"].float().mean()) < 0.95 and bool(qa["opposite"].any())


def test_min0_is_min_with_the_first_index():
    """The proxy's plain-minima reduction gives torch.min's values and the first index of a tie."""
    from craft.finetune.proxy import _min0

    x = torch.tensor([[3.0, 1.0, 2.0, 0.5],
                      [1.0, 1.0, 2.0, -4.0],
                      [1.0, 0.0, 2.0, 7.0]])  # (K = 3, Q = 4): column 0 ties rows 1, 2; column 2 ties all
    m, k = _min0(x)
    assert m.tolist() == [1.0, 0.0, 2.0, -4.0]
    assert k.tolist() == [1, 2, 0, 1] and k.dtype == torch.long
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (7, 1000), generator=g).float() * 0.25  # many ties
    m, k = _min0(y)
    ref = y.min(0)
    assert torch.equal(m, ref.values) and torch.equal(k, ref.indices)


def test_lane_query_on_candidate_layout_matches_flat_reference_query(town, monkeypatch):
    """The default lane query on time-major candidate points ``(H, B, G)`` with per-state map ids ``(1, B, 1)``
    (crowded cells padded into larger kernel calls, or not at all) returns exactly what the reference kernel
    returns on the same points flattened with per-point map ids, on two maps at once."""
    import craft.finetune.proxy as proxy_mod

    mb = MapBatch([straight_road(400.0), town])
    cw = CounterfactualWorld(mb)
    g = torch.Generator().manual_seed(7)
    H, B, G = 5, 4, 300
    map_b = torch.tensor([1, 0, 1, 1])
    x0, y0, x1, y1 = town.bounds
    lo = torch.tensor([[0.0, -8.0], [x0, y0]])[map_b]  # (B, 2): the road's strip, the whole town
    hi = torch.tensor([[400.0, 8.0], [x1, y1]])[map_b]
    centre = lo + torch.rand(B, 2, generator=g) * (hi - lo)
    pos = centre[None, :, None] + torch.randn(H, B, G, 2, generator=g) * 12.0  # on and off the road
    yaw = (torch.rand(H, B, G, generator=g) * 2 - 1) * math.pi
    flat_map = map_b[None, :, None].expand(H, B, G).reshape(-1)
    ref = cw.lanes.query(flat_map, pos.reshape(-1, 2), yaw.reshape(-1), cw.cfg.events, reference=True)
    for min_group in (1, proxy_mod._MIN_GROUP, 10**9):  # no padding, the default, everything padded
        monkeypatch.setattr(proxy_mod, "_MIN_GROUP", min_group)
        out = cw.lanes.query(map_b.view(1, B, 1), pos, yaw, cw.cfg.events, cos_sin=(torch.cos(yaw), torch.sin(yaw)))
        for k in ref:
            assert out[k].shape == (H, B, G), k
            assert torch.equal(out[k].reshape(-1), ref[k]), (k, min_group)
    assert 0.05 < float(ref["offroad"].float().mean()) < 0.95 and bool((ref["lane"] >= 0).any())


def test_kernel_falls_back_to_eager_with_one_line(capsys):
    """A compiled kernel that fails runs its eager function, says so once on stderr, and stays eager."""
    from craft.finetune.proxy_kernels import Kernel

    def double(x):
        return 2 * x

    k = Kernel(double)
    assert k.compiled is None and torch.equal(k(torch.ones(2)), 2 * torch.ones(2))

    def broken(*a, **kw):
        raise RuntimeError("no C++ compiler\nmore detail")

    k.compiled = broken
    assert torch.equal(k(torch.ones(3)), 2 * torch.ones(3))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "double" in err[0] and "no C++ compiler" in err[0] and "eagerly" in err[0]
    assert k.compiled is None
    assert torch.equal(k(torch.ones(1)), 2 * torch.ones(1)) and capsys.readouterr().err == ""


@pytest.mark.slow
def test_compiled_kernels_match_eager(town):
    """CounterfactualWorld(compile=True) (torch.compile of the ego and route steps) scores like the eager path
    within float tolerance, with and without tracker memory and with stop-in-place plans."""
    from craft.world.tracker import TrackerState

    mb, st, traj, valid = _town_batch(town, B=4, G=64, seed=3)
    traj[:, :3] = 0.0
    g = torch.Generator().manual_seed(5)
    memory = TrackerState(torch.randn(4, generator=g) * 0.5, torch.randn(4, generator=g),
                          torch.tensor([True, False, True, True]))
    eager, comp = CounterfactualWorld(mb), CounterfactualWorld(mb, compile=True)
    assert comp.compile and not eager.compile
    for tr in (None, memory):
        a, b = eager.score(st, traj, valid, tr), comp.score(st, traj, valid, tr)
        assert torch.allclose(a.returns, b.returns, atol=2e-3, rtol=2e-3)
        assert float((a.collided != b.collided).float().mean()) <= 0.01
        for x, y in zip(eager.ego_rollout(st, traj, tr), comp.ego_rollout(st, traj, tr)):
            assert torch.allclose(x, y, atol=2e-3, rtol=0)
    assert comp.kernels.ego_step.compiled is not None  # it did compile (no silent fallback)


@pytest.fixture
def lib():
    """The native kernels' library (built once per machine); the test is skipped where no C compiler exists."""
    import craft.finetune.proxy_native as native

    built = native.load()
    if built is None:
        pytest.skip("no C compiler: the native kernels fall back to the tensor code")
    return built


def test_native_kernels_match_the_tensor_code(town, lib):
    """The C lane query and route tracking (used by CounterfactualWorld(compile=True) on CPU) give the tensor
    code's results: identical flags and lanes, distances within float rounding, on varied states."""
    import craft.finetune.proxy_native as native
    from craft.finetune.proxy import _Route

    cw = CounterfactualWorld(MapBatch([straight_road(400.0), town]))
    g = torch.Generator().manual_seed(11)
    H, B, G = 4, 3, 500
    map_b = torch.tensor([1, 0, 1])
    x0, y0, x1, y1 = town.bounds
    lo = torch.tensor([[0.0, -8.0], [x0, y0]])[map_b]
    hi = torch.tensor([[400.0, 8.0], [x1, y1]])[map_b]
    pos = (lo + torch.rand(B, 2, generator=g) * (hi - lo))[None, :, None] + torch.randn(H, B, G, 2, generator=g) * 15.0
    yaw = (torch.rand(H, B, G, generator=g) * 2 - 1) * math.pi
    ref = cw.lanes.query(map_b.view(1, B, 1), pos, yaw, cw.cfg.events)
    cos_wrong = math.cos(math.radians(cw.cfg.events.wrong_direction_deg))
    out = native.lane_query(lib, cw.lanes, map_b, G, pos.reshape(-1, 2), torch.cos(yaw).reshape(-1),
                            torch.sin(yaw).reshape(-1), cos_wrong, cw.cfg.events.lane_dist_cap)
    for k in ("offroad", "opposite", "emergency", "lane"):
        assert torch.equal(out[k], ref[k].reshape(-1)), k
    assert torch.allclose(out["center_dist"], ref["center_dist"].reshape(-1), atol=1e-5, rtol=0)
    assert 0.05 < float(out["offroad"].float().mean()) < 0.95 and bool(out["opposite"].any())
    # route tracking over a horizon, from the snapshots of a town batch
    mb, st, traj, valid = _town_batch(town, B=3, G=40, seed=4)
    cw = CounterfactualWorld(mb)
    pos_h, _, _ = cw.ego_rollout(st, traj)  # (B, G, H, 2)
    Hh = pos_h.shape[2]
    pos_t = pos_h.permute(2, 0, 1, 3).reshape(Hh, -1, 2).contiguous()  # (H, Q, 2) time-major
    route = _Route(st, cw.cfg.route_window)
    j0 = route.project(torch.arange(3), torch.zeros(3, dtype=torch.long), st.pos[:, 0], 0, route.nseg - 1)[0]
    bq = torch.arange(3).repeat_interleave(40)
    back, ahead = cw.cfg.route_search_back, cw.cfg.route_search_ahead
    step = route.tracker(bq, back, ahead)
    j = j0.index_select(0, bq)
    want = [torch.empty(Hh, 120) for _ in range(4)]
    for h in range(Hh):
        j, *r = step(j, pos_t[h])
        for w, x in zip(want, r):
            w[h] = x
    got = native.route_track(lib, route, pos_t, bq, j0.index_select(0, bq), back, ahead)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, atol=1e-5, rtol=0)


def test_native_red_light_rule_matches_the_tensor_rule(lib):
    """The C red-light rule gives the tensor rule's flags, on random crossings of random stop lines."""
    import craft.finetune.proxy_native as native
    from craft.finetune.proxy_kernels import red_light_runs

    g = torch.Generator().manual_seed(2)
    H, Qs, n = 8, 300, 3
    yaw = (torch.rand(Qs, generator=g) * 2 - 1) * 0.4
    speed = torch.rand(Qs, generator=g) * 12.0
    t = torch.arange(1, H + 1, dtype=torch.float32)[:, None] * 0.1
    x0 = torch.rand(Qs, generator=g) * 10.0 - 5.0
    pos = torch.stack([x0 + speed * t * torch.cos(yaw), speed * t * torch.sin(yaw)], -1)  # (H, Qs, 2)
    yaw_h = yaw.expand(H, Qs)
    lights = {"heading": (torch.rand(Qs, n, generator=g) * 2 - 1) * 0.5,
              "pos": torch.stack([torch.rand(Qs, n, generator=g) * 8.0, torch.randn(Qs, n, generator=g)], -1),
              "lane": torch.randint(0, 4, (Qs, n), generator=g), "k": torch.randint(0, 6, (Qs, n), generator=g),
              "ok": torch.rand(Qs, n, generator=g) > 0.2, "half_width": torch.full((Qs, n), 1.75)}
    cur = torch.randint(-1, 4, (H, Qs), generator=g)
    ctrl = torch.randint(-1, 6, (H, Qs), generator=g)
    half = torch.full((Qs,), 2.4)
    rear0 = torch.stack([x0 - 2.4 * torch.cos(yaw), -2.4 * torch.sin(yaw)], -1)
    args = (pos, torch.cos(yaw_h), torch.sin(yaw_h), half, rear0, cur, ctrl, lights, 15.0)
    want = red_light_runs(*args)
    got = native.red_light_runs(lib, *args)
    assert torch.equal(got, want)
    assert 10 < int(want.sum()) < want.numel() // 2  # the rule is exercised both ways


def test_native_stop_sign_rule_matches_the_tensor_rule(lib):
    """The C stop-sign rule gives the tensor rule's violations (trigger boxes + _stop_violations), on random
    trajectories through random trigger boxes, some slow inside, some with the snapshot inside / served."""
    import craft.finetune.proxy_native as native
    from craft.finetune.proxy import _stop_violations

    g = torch.Generator().manual_seed(3)
    H, Qs, n = 20, 400, 2
    yaw = (torch.rand(Qs, generator=g) * 2 - 1) * 0.3
    v0 = torch.rand(Qs, generator=g) * 8.0
    acc = -torch.rand(Qs, generator=g) * 4.0
    t = torch.arange(1, H + 1, dtype=torch.float32)[:, None] * 0.1
    speed = (v0 + acc * t).clamp_min(0.0)  # (H, Qs), some stop
    s = torch.cumsum(speed * 0.1, 0)
    pos = torch.stack([s * torch.cos(yaw), s * torch.sin(yaw)], -1)
    cy, sy = torch.cos(yaw).expand(H, Qs), torch.sin(yaw).expand(H, Qs)
    trig = torch.stack([torch.rand(Qs, n, generator=g) * 6.0 - 1.0, torch.randn(Qs, n, generator=g) * 0.5,
                        torch.randn(Qs, n, generator=g) * 0.2, torch.full((Qs, n), 4.0), torch.full((Qs, n), 3.0)], -1)
    heading = torch.randn(Qs, n, generator=g) * 0.3 + (torch.rand(Qs, n, generator=g) < 0.1) * math.pi
    ok = torch.rand(Qs, n, generator=g) > 0.1
    inside0 = (torch.rand(Qs, n, generator=g) < 0.3) & ok
    served0 = torch.rand(Qs, n, generator=g) < 0.5
    bux, buy = torch.cos(trig[..., 2]), torch.sin(trig[..., 2])
    relx = pos[..., 0:1] - trig[..., 0]
    rely = pos[..., 1:2] - trig[..., 1]
    in_box = ((relx * bux + rely * buy).abs() <= 0.5 * trig[..., 3]) & \
        ((bux * rely - buy * relx).abs() <= 0.5 * trig[..., 4])
    inside = ok & in_box & ((cy[..., None] * torch.cos(heading) + sy[..., None] * torch.sin(heading)) > 0)
    slow = inside & (speed.abs() < 0.1)[..., None]
    want = _stop_violations(inside, slow, inside0, served0).any(-1)
    got = native.stop_violations(lib, pos, cy, sy, speed, trig, bux, buy, torch.cos(heading), torch.sin(heading), ok,
                                 inside0, served0, 0.1)
    assert torch.equal(got, want)
    assert 5 < int(want.sum()) and bool(slow.any())  # violations and stops both happen
