"""CRAFT's reward functions on small hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from craft.errors import CraftError
from craft.finetune.rewards import (
    DENSE_TERMS,
    GROUNDED_TERMS,
    RewardConfig,
    collision_penalty,
    dense_reward_from_events,
    dense_step_reward,
    grounded_decision_reward,
    grounded_step_reward,
    group_normalise,
    residual_advantage,
)

torch.set_num_threads(1)


def _dense(**kw):
    base = dict(dp=0.0, route_dist=0.0, center_dist=0.0, heading_err=0.0, prev_route_dist=0.0, prev_center_dist=0.0,
                prev_heading_err=0.0, offroad=False, opposite=False, offroute=False, emergency=False,
                first_collision=False, collision_speed=0.0)
    base.update(kw)
    t = {k: torch.tensor([v]) for k, v in base.items()}
    r, terms = dense_step_reward(**t)
    return float(r), {k: float(v) for k, v in terms.items()}


def test_progress_and_efficiency_factor():
    r, _ = _dense(dp=0.6)
    assert r == pytest.approx(8.0 * 0.5)
    r, _ = _dense(dp=5.0)  # clipped to 1.2 -> dp_hat = 1
    assert r == pytest.approx(8.0)
    r, _ = _dense(dp=-1.0)  # no reward for going back
    assert r == pytest.approx(0.0)
    r, t = _dense(dp=1.2, route_dist=0.05, center_dist=0.05, heading_err=0.02,
                  prev_route_dist=0.05, prev_center_dist=0.05, prev_heading_err=0.02)
    eta = math.exp(-3.0 * 0.05) * math.exp(-0.8 * 0.05) * math.exp(-2.0 * 0.02)
    assert t["progress"] == pytest.approx(8.0 * eta, rel=1e-6)
    assert t["recovery"] == 0.0  # all deviations below their thresholds
    assert r == pytest.approx(8.0 * eta, rel=1e-6)


def test_recovery_clipping_and_threshold():
    # route distance 0.5 -> 0.2: change 0.3 clipped to 0.1, weight 0.4; dp_hat = 0 -> scale 0.5
    _, t = _dense(prev_route_dist=0.5, route_dist=0.2)
    assert t["recovery"] == pytest.approx(0.4 * 0.1 * 0.5)
    # centre 0.30 -> 0.25 (weight 0.2), heading 0.3 -> 0.35 (grows: penalised, weight 0.4); dp_hat = 1
    _, t = _dense(dp=1.2, prev_center_dist=0.30, center_dist=0.25, prev_heading_err=0.3, heading_err=0.35)
    assert t["recovery"] == pytest.approx((0.2 * 0.05 - 0.4 * 0.05) * 1.0, abs=1e-6)
    # previous deviation below its threshold: no recovery term
    _, t = _dense(prev_route_dist=0.05, route_dist=0.0)
    assert t["recovery"] == 0.0
    # the sum clip binds once the weights are large
    cfg = RewardConfig(recovery_w_route=10.0, recovery_w_center=10.0)
    r, terms = dense_step_reward(*(torch.tensor([v]) for v in (0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0)),
                                 *(torch.tensor([False]) for _ in range(5)), torch.tensor([0.0]), cfg)
    assert float(terms["recovery"]) == pytest.approx(0.5 * 0.5)


def test_step_costs_and_terms_sum():
    r, t = _dense(dp=0.6, offroad=True, opposite=True, offroute=True, emergency=True)
    assert t["offroad"] == -1.5 and t["opposite"] == pytest.approx(-0.1)
    assert t["offroute"] == -1.5 and t["emergency"] == -1.0
    assert set(t) == set(DENSE_TERMS)
    assert r == pytest.approx(sum(t.values()))


def test_collision_speed_scaling():
    v = torch.tensor([0.0, 5.0, 10.0, 30.0])
    assert collision_penalty(v).tolist() == pytest.approx([-40.0, -60.0, -80.0, -100.0])
    r, t = _dense(first_collision=True, collision_speed=5.0)
    assert t["collision"] == pytest.approx(-60.0) and r == pytest.approx(-60.0)


def test_shapes_are_agnostic():
    B, G = 3, 5
    z = torch.zeros(B, G)
    f = torch.zeros(B, G, dtype=torch.bool)
    r, terms = dense_step_reward(z + 0.6, z, z, z, z, z, z, f, f, f, f, f, z)
    assert r.shape == (B, G) and all(v.shape == (B, G) for v in terms.values())
    assert torch.allclose(r, torch.full((B, G), 4.0))


def _events(**kw):
    B = 2
    base = dict(progress=torch.tensor([0.6, 0.6]), route_dist=torch.zeros(B), lane_center_dist=torch.zeros(B),
                heading_error=torch.zeros(B), offroad=torch.zeros(B, dtype=torch.bool),
                opposite_lane=torch.zeros(B, dtype=torch.bool), offroute=torch.zeros(B, dtype=torch.bool),
                emergency_lane=torch.zeros(B, dtype=torch.bool), collision_pedestrian=torch.zeros(B, dtype=torch.bool),
                collision_vehicle=torch.zeros(B, dtype=torch.bool), collision_layout=torch.zeros(B, dtype=torch.bool),
                speed=torch.tensor([10.0, 10.0]), red_light=torch.zeros(B, dtype=torch.bool),
                stop_infraction=torch.zeros(B, dtype=torch.bool), stop_zone=torch.zeros(B, dtype=torch.bool),
                go_zone=torch.zeros(B, dtype=torch.bool))
    base.update(kw)
    return base


def test_first_collision_only_from_events():
    ev = _events(collision_vehicle=torch.tensor([True, True]))
    r, terms, collided = dense_reward_from_events(None, ev, collided_before=torch.tensor([False, True]))
    assert terms["collision"].tolist() == pytest.approx([-80.0, 0.0])
    assert collided.tolist() == [True, True]
    assert r.tolist() == pytest.approx([4.0 - 80.0, 4.0])


def test_dense_from_events_matches_world_step(town):
    from craft.world.autopilot import PlanExecutor, route_plan
    from craft.world.map import MapBatch
    from craft.world.world import World, random_specs

    mb = MapBatch([town])
    world = World(mb)
    st = world.reset(random_specs(mb, 3, 0, n_vehicles=5, n_pedestrians=0), seed=0)
    ex = PlanExecutor(3)
    ex.set_plan(st, route_plan(st, 8.0))
    prev = None
    for _ in range(5):
        st, ev = world.step(st, ex.control(st))
        r, terms, _ = dense_reward_from_events(prev, ev)
        assert r.shape == (3,) and torch.isfinite(r).all()
        assert torch.allclose(r, sum(terms.values()))
        prev = ev


def test_grounded_reward_terms():
    ev = _events(offroad=torch.tensor([True, False]), collision_pedestrian=torch.tensor([True, False]),
                 stop_zone=torch.tensor([True, True]), speed=torch.tensor([5.0, 0.05]),
                 go_zone=torch.tensor([False, False]))
    assert grounded_step_reward(ev)[0].tolist() == pytest.approx([-5.5, 0.0])  # zone charges are off by default
    zones = RewardConfig(w_stop_zone=2.0, w_go_zone=0.5)
    r, t = grounded_step_reward(ev, zones)
    assert set(t) == set(GROUNDED_TERMS)
    # world 0: offroad 0.5 + collision 5 + moving in a stop zone 2; world 1: stopped in the stop zone
    assert r.tolist() == pytest.approx([-7.5, 0.0])
    ev = _events(go_zone=torch.tensor([True, True]), speed=torch.tensor([1.0, 3.0]))
    r, _ = grounded_step_reward(ev, zones)
    assert r.tolist() == pytest.approx([-0.5, 0.0])
    assert (r <= 0).all()


def test_residual_return_recursion_matches_loop():
    g = torch.Generator().manual_seed(0)
    T, B = 7, 4
    rewards = -torch.rand(T, B, generator=g) * 6.0
    notdone = torch.rand(T, B, generator=g) > 0.2
    cfg = RewardConfig()
    adv = residual_advantage(rewards, notdone, cfg)
    for b in range(B):
        G = 0.0
        for t in reversed(range(T)):
            G = float(rewards[t, b]) + 0.8 * float(notdone[t, b]) * G
            assert float(adv[t, b]) == pytest.approx(min(max(G / 8.0, cfg.adv_min), cfg.adv_max), abs=1e-5)
    assert (adv <= 0).all()
    assert (residual_advantage(torch.zeros(3, 2), torch.ones(3, 2)) == 0).all()
    with pytest.raises(CraftError):
        residual_advantage(rewards, notdone[:, :2])


def test_group_normalise():
    returns = torch.tensor([[10.0, 20.0, 30.0, 99.0], [1.0, 2.0, 3.0, 4.0], [7.0, 7.0, 7.0, 7.0],
                            [5.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True], [True, True, True, True],
                          [True, False, False, False]])
    adv, diag = group_normalise(returns, valid, std_floor=5.0)
    std0 = math.sqrt(200.0 / 3.0)  # above the floor
    assert adv[0, :3].tolist() == pytest.approx([-10 / std0, 0.0, 10 / std0], rel=1e-5)
    assert adv[0, 3] == 0.0  # invalid
    assert adv[1].tolist() == pytest.approx([-0.3, -0.1, 0.1, 0.3], rel=1e-5)  # std 1.118 < floor 5
    assert (adv[2] == 0).all()  # all-equal group
    assert (adv[3] == 0).all()  # a single valid candidate
    assert float(diag["zero_std_share"]) == pytest.approx(1 / 3)
    assert float(diag["floor_share"]) == pytest.approx(2 / 3)
    with pytest.raises(CraftError):
        group_normalise(returns, valid[:, :2])


def test_config_validation():
    with pytest.raises(CraftError, match="gamma"):
        RewardConfig(gamma=1.5)
    with pytest.raises(CraftError, match="adv_max"):
        RewardConfig(adv_min=1.0, adv_max=0.0)


def _decision_buffer(T: int = 3, k: int = 5, W: int = 2):
    """Hand-made executed-step events (T, k, W) of a buffer whose decisions are all live."""
    from types import SimpleNamespace

    ev = {n: v[0].expand(T, k, W).clone() for n, v in _events().items()}
    ev["speed"] = torch.full((T, k, W), 5.0)
    ev["done"] = torch.zeros(T, k, W, dtype=torch.bool)
    return SimpleNamespace(events=ev, live=torch.ones(T, W, dtype=torch.bool),
                           notdone=torch.tensor([[True, True], [True, True], [False, False]]))


def test_grounded_residual_is_one_indicator_per_decision():
    from craft.finetune.trainer import FinetuneConfig, decision_rewards

    buf = _decision_buffer()
    ev = buf.events
    ev["red_light"][0, :, 0] = True  # a red light during all 5 steps of decision 0: counts once
    ev["offroad"][1, 1:3, 0] = True  # decision 1: off-road twice, emergency lane once, off-route once
    ev["emergency_lane"][1, 4, 0] = True
    ev["offroute"][1, 0, 0] = True
    ev["collision_vehicle"][2, 3, 0] = True  # decision 2: a collision and a stop-sign infraction
    ev["stop_infraction"][2, 0, 0] = True
    ev["stop_zone"][:, :, 1] = True  # world 1 moves through a stop zone all the time (zones off by default)
    ev["done"][2, 2, 1] = True  # ... and its episode ends at step 2 of decision 2: later steps do not count
    ev["offroad"][2, 3:, 1] = True
    g, _, counts = decision_rewards(buf, FinetuneConfig())
    # Table 6: off-road 0.5, emergency lane 0.2, off-route 0.5, red light 2.0, stop sign 2.0, collision 5.0
    assert g[:, 0].tolist() == pytest.approx([-2.0, -1.2, -7.0])
    assert g[:, 1].tolist() == pytest.approx([0.0, 0.0, 0.0])
    assert counts["events/red_light"] == 1 and counts["events/offroad"] == 1
    assert counts["grounded_mass/collision"] == pytest.approx(5.0 / 10.2)
    assert sum(v for k, v in counts.items() if k.startswith("grounded_mass/")) == pytest.approx(1.0)
    # value-free residual: G = r + 0.8 G', A = clip(G / 8, -2, 0)
    a = residual_advantage(g, buf.notdone)
    g2 = -7.0
    g1 = -1.2 + 0.8 * g2
    g0 = -2.0 + 0.8 * g1
    assert a[:, 0].tolist() == pytest.approx([g0 / 8, g1 / 8, g2 / 8])
    # the zone charges as an option: once per decision too
    zones = FinetuneConfig(proxy={"reward": {"w_stop_zone": 2.0}})
    g, _, _ = decision_rewards(buf, zones)
    assert g[:, 1].tolist() == pytest.approx([-2.0, -2.0, -2.0])


def test_grounded_decision_reward_shapes_and_mask():
    ev = {n: torch.stack([v, v, v]) for n, v in _events(red_light=torch.tensor([True, False])).items()}  # (3, 2)
    r, t = grounded_decision_reward(ev)
    assert r.shape == (2,) and r.tolist() == pytest.approx([-2.0, 0.0])
    assert torch.allclose(r, sum(t.values()))
    r, _ = grounded_decision_reward(ev, step_valid=torch.zeros(3, 2, dtype=torch.bool))
    assert r.tolist() == [0.0, 0.0]
