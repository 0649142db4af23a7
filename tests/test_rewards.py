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
    r, t = grounded_step_reward(ev)
    assert set(t) == set(GROUNDED_TERMS)
    # world 0: offroad 0.5 + collision 5 + moving in a stop zone 2; world 1: stopped in the stop zone
    assert r.tolist() == pytest.approx([-7.5, 0.0])
    ev = _events(go_zone=torch.tensor([True, True]), speed=torch.tensor([1.0, 3.0]))
    r, _ = grounded_step_reward(ev)
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
