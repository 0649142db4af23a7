"""The proxy-fidelity oracle (craft/experiments/fidelity.py) and the state-tiling helper (craft/world/clone.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from craft.errors import CraftError
from craft.experiments.fidelity import (
    FidelityConfig,
    _near_events,
    fidelity,
    real_returns,
    state_stats,
)
from craft.finetune.proxy import CounterfactualWorld
from craft.world.clone import tile_state, tile_tracker
from craft.world.map import MapBatch
from craft.world.tracker import TrackerState
from craft.world.world import World, WorldSpec
from tests.handmaps import straight_road

torch.set_num_threads(1)

TINY = FidelityConfig(states=4, candidates=8, tail_s=0.5, towns=1, worlds=4, buffer=32, routes=1, scatter_states=2)
POLICIES = {"vocab": "checkpoints/vocab.pt", "hier": "checkpoints/hier.pt"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fid")
    return out, fidelity(POLICIES, out / "a", TINY, progress=False)


def test_tiny_run_end_to_end(tiny_run):
    out, res = tiny_run
    d = out / "a"
    assert json.loads((d / "fidelity.json").read_text()) == res
    assert (d / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (d / "fidelity.md").read_text()
    assert "| vocab |" in md and "| hier |" in md and "How to read it" in md
    assert not list(d.glob(".*tmp"))  # atomic writes left no temp files
    assert res["config"]["states"] == 4
    for label in POLICIES:
        f = res["policies"][label]
        assert f["states"] == 4 and f["candidates_per_state"] == 8
        for key in ("horizon", "with_tail"):
            s = f[key]
            ps = s["per_state"]["pearson"]
            assert len(ps) == 4
            assert all(p is None or -1.0 - 1e-9 <= p <= 1.0 + 1e-9 for p in ps)
            assert s["skipped"] == sum(p is None for p in ps)
            assert s["top1_agreement"] is None or 0.0 <= s["top1_agreement"] <= 1.0
            assert s["regret_mean"] is None or s["regret_mean"] >= 0.0
        r = f["residual"]
        assert r["transitions"] == f["transitions"] >= 32
        for k in ("time_share_near", "event_share", "nonzero_share"):
            assert 0.0 <= r[k] <= 1.0
        assert r["time_share_near"] >= r["event_share"]


def test_repeatable(tiny_run, tmp_path):
    out, _ = tiny_run
    fidelity(POLICIES, tmp_path, TINY, progress=False)
    assert (tmp_path / "fidelity.json").read_bytes() == (out / "a" / "fidelity.json").read_bytes()


def test_bad_input(tmp_path):
    with pytest.raises(CraftError, match="candidates"):
        FidelityConfig(candidates=1)
    with pytest.raises(CraftError, match="states"):
        FidelityConfig(states=0)
    with pytest.raises(CraftError, match="does not exist"):
        fidelity({"x": str(tmp_path / "missing.pt")}, tmp_path / "o", TINY, progress=False)
    with pytest.raises(CraftError, match="at least one policy"):
        fidelity({}, tmp_path / "o", TINY, progress=False)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- the real rollout against the proxy
LANE_CHANGE = [0.0, 0.2, 0.5, 0.9, 1.2, 1.4]


def _plan(speed: float, lateral=None, T: int = 6) -> torch.Tensor:
    t = torch.arange(1, T + 1, dtype=torch.float32) * 0.5
    y = torch.zeros(T) if lateral is None else torch.as_tensor(lateral, dtype=torch.float32)
    return torch.stack([speed * t, y, torch.zeros(T)], -1)


def test_real_return_equals_proxy_without_other_agents():
    """No other agents, so the decay rollout and reactive traffic coincide: for every candidate the clone's
    real return equals the proxy's, up to the world's ~1 m progress quanta (at 10 m/s within 1, as in
    tests/test_proxy.py); chunking the clone batch changes nothing."""
    mb = MapBatch([straight_road(400.0)])
    world, cw = World(mb), CounterfactualWorld(mb)
    st = world.reset([WorldSpec(map_index=0, route=[0], ego_s=s, ego_speed=10.0, n_vehicles=0, n_pedestrians=0)
                      for s in (100.0, 180.0)], seed=0)
    cands = torch.stack([_plan(10.0), _plan(10.0, LANE_CHANGE), _plan(10.0, [0.0, 0.1, 0.3, 0.5, 0.6, 0.7]),
                         _plan(10.0, [0.0, -0.1, -0.2, -0.3, -0.3, -0.3])])
    traj = torch.stack([cands, cands.flip(0)])  # (2 states, 4 candidates, 6, 3)
    trk = TrackerState.zeros(2)
    proxy = cw.score(st, traj, torch.ones(2, 4, dtype=torch.bool), trk).returns
    real_h, real_t, col = real_returns(world, None, st, traj, trk, cw.cfg, tail_steps=0)
    assert torch.equal(real_h, real_t) and not col.any()
    assert (proxy - real_h).abs().max() <= 1.0, (proxy, real_h)
    assert float(proxy[0].std()) > 1.0  # the candidates do differ
    chunked, _, _ = real_returns(world, None, st, traj, trk, cw.cfg, tail_steps=0, max_batch=4)
    assert torch.equal(chunked, real_h)


def test_tile_state_and_tracker():
    mb = MapBatch([straight_road(400.0)])
    st = World(mb).reset([WorldSpec(map_index=0, route=[0], ego_s=s, n_vehicles=0, n_pedestrians=0)
                          for s in (10.0, 50.0)], seed=0)
    t = tile_state(st, 3)
    assert t.batch_size == 6
    assert torch.equal(t.pos[:3], st.pos[[0, 0, 0]]) and torch.equal(t.pos[3:], st.pos[[1, 1, 1]])
    t.pos[0] += 1.0  # copies are independent of the source
    assert not torch.equal(t.pos[0], st.pos[0])
    tr = tile_tracker(TrackerState(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])), 2)
    assert tr.integral.tolist() == [1.0, 1.0, 2.0, 2.0] and tr.prev_valid().all()


# ---------------------------------------------------------------------- statistics
def test_state_stats_known_values():
    proxy = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    real = torch.tensor([[2.0, 4.0, 6.0, 9.0], [0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    s = state_stats(proxy, real, torch.ones(3, 4, dtype=torch.bool))
    ps = s["per_state"]
    assert ps["pearson"][0] > 0.98 and ps["spearman"][0] == pytest.approx(1.0)
    assert math.isnan(ps["pearson"][1]) and s["skipped"] == 1  # constant proxy
    assert ps["pearson"][2] == pytest.approx(-1.0)
    assert ps["cov_ok"] == [True, None, False] and s["cov_share"] == 0.5
    assert ps["top1"] == [True, None, False] and ps["regret"][2] == pytest.approx(3.0)


def test_near_events_stay_within_a_route():
    crit = torch.tensor([[0], [0], [1], [0], [0], [1]], dtype=torch.bool)
    notdone = torch.tensor([[1], [1], [1], [1], [0], [1]], dtype=torch.bool)
    near = _near_events(crit, notdone, 2)[:, 0].tolist()
    # decision 4 ends its route, so the event at 5 (a new route) does not make 4 near
    assert near == [False, True, True, False, False, True]
