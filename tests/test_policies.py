"""Candidate policies: shapes, masks, checkpoints, fine-tuned subsets, k-means, imitation, bad input."""

import math

import pytest
import torch

from craft.errors import CraftError
from craft.policies import build_policy, load_policy
from craft.policies.base import CandidateSet, atomic_save, read_checkpoint
from craft.policies.hier import HierConfig, arc_profile, compose, expert_path_headings
from craft.policies.vocab import VocabConfig, build_vocabulary, nearest_candidate
from craft.world.observe import observe
from craft.world.world import World, random_specs

torch.set_num_threads(1)

SMALL_VOCAB = VocabConfig(vocab_size=32)


@pytest.fixture(scope="module")
def obs(town):
    w = World([town])
    st = w.reset(random_specs(w.maps, 12, seed=3, n_vehicles=10), seed=3)
    return observe(w.maps, st, w.lights(st))


def route_expert(obs, speed=8.0):
    """Synthetic expert: drive along the observed route at ``speed`` (B, 6, 3)."""
    route = obs.route * 50.0
    seg = (route[:, 1:] - route[:, :-1]).norm(dim=-1)
    cum = torch.cat([torch.zeros_like(seg[:, :1]), seg.cumsum(1)], 1)
    s = torch.arange(1, 7, dtype=torch.float32) * 0.5 * speed
    out = []
    for b in range(route.shape[0]):
        x = torch.from_numpy(__import__("numpy").interp(s.numpy(), cum[b].numpy(), route[b, :, 0].numpy()))
        y = torch.from_numpy(__import__("numpy").interp(s.numpy(), cum[b].numpy(), route[b, :, 1].numpy()))
        p = torch.stack([x, y], -1).float()
        d = torch.diff(torch.cat([torch.zeros(1, 2), p]), dim=0)
        out.append(torch.cat([p, torch.atan2(d[:, 1], d[:, 0])[:, None]], -1))
    return torch.stack(out)


def make(family):
    torch.manual_seed(0)
    if family == "vocab":
        p = build_policy("vocab", SMALL_VOCAB)
        p.set_vocabulary(torch.randn(32, 6, 3).cumsum(1))
        return p
    return build_policy(family)


@pytest.mark.parametrize("family,G", [("vocab", 32), ("hier", 48)])
def test_forward_shapes_and_masks(obs, family, G):
    p = make(family).eval()
    cs = p(obs)
    B = obs.batch_size
    assert cs.trajectories.shape == (B, G, 6, 3)
    assert cs.valid.shape == (B, G) and cs.valid.dtype == torch.bool and cs.valid.any(1).all()
    assert cs.logits.shape == (B, G) and torch.isfinite(cs.logits).all()
    lp = cs.log_probs()
    assert torch.allclose(lp.exp().sum(1), torch.ones(B), atol=1e-5)
    assert cs.select(cs.top1()).shape == (B, 6, 3)
    # worlds are independent: a world's logits do not depend on the rest of the batch
    one = p(obs.index(torch.tensor([2])))
    assert torch.allclose(one.logits[0], cs.logits[2], atol=1e-4)


def test_candidate_set_masks_invalid():
    cs = CandidateSet(torch.zeros(2, 3, 6, 3), torch.tensor([[True, False, True], [False, False, True]]),
                      torch.tensor([[0.0, 9.0, 1.0], [5.0, 5.0, -3.0]]))
    assert cs.top1().tolist() == [2, 2]
    p = cs.log_probs().exp()
    assert p[0, 1] == 0 and p[1, :2].sum() == 0 and torch.isclose(p[1, 2], torch.tensor(1.0))
    g = torch.Generator().manual_seed(0)
    assert set(cs.sample(g).tolist()) <= {0, 2}


@pytest.mark.parametrize("family", ["vocab", "hier"])
def test_save_load_round_trip(obs, tmp_path, family):
    p = make(family).eval()
    p.save(tmp_path / "p.pt", meta={"note": "x"})
    q = load_policy(tmp_path / "p.pt")
    assert type(q) is type(p) and q.meta["note"] == "x"
    assert torch.equal(p(obs).logits, q(obs).logits)
    assert torch.equal(p(obs).trajectories, q(obs).trajectories)
    # a folder holding policy.pt loads too
    (tmp_path / "run").mkdir()
    p.save(tmp_path / "run" / "policy.pt")
    assert torch.equal(load_policy(tmp_path / "run")(obs).logits, p(obs).logits)


@pytest.mark.parametrize("family,prefix", [("vocab", "head."), ("hier", "joint.")])
def test_finetuning_touches_only_the_scoring_branch(obs, family, prefix):
    p = make(family)
    names = set(p.trainable_parameters())
    assert names and all(n.startswith(prefix) for n in names)
    before = {k: v.clone() for k, v in p.state_dict().items()}
    params = p.freeze_for_finetuning()
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(2):
        loss = -p(obs).log_probs()[:, 0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = p.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(prefix) for k in changed)


def test_kmeans_deterministic_and_recovers_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 6, 3, generator=g) * 20
    pts = (centres[:, None] + 0.1 * torch.randn(4, 50, 6, 3, generator=g)).reshape(200, 6, 3)
    a = build_vocabulary(pts, k=4, seed=5)
    b = build_vocabulary(pts, k=4, seed=5)
    assert torch.equal(a, b)
    # every true centre is matched by a cluster centre within the noise
    d = (a[None, :, :, :2] - centres[:, None, :, :2]).norm(dim=-1).mean(-1)  # (4, 4)
    assert (d.min(1).values < 0.2).all()
    with pytest.raises(CraftError, match="at least k=8"):
        build_vocabulary(pts[:5], k=8)


def test_nearest_candidate_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(10, 6, 3, generator=g)
    e = torch.randn(7, 6, 3, generator=g)
    brute = torch.stack([torch.stack([(v[j, :, :2] - e[i, :, :2]).norm(dim=-1).mean() for j in range(10)]).argmin()
                         for i in range(7)])
    assert torch.equal(nearest_candidate(v, e), brute)


def test_compose_straight_and_turn():
    # path straight ahead, speed 2 m per 0.5 s: waypoints on the x axis
    h = torch.zeros(1, 1, 16)
    d = torch.arange(1, 7, dtype=torch.float32).view(1, 1, 6) * 2
    t = compose(h, d, 4.0)
    assert torch.allclose(t[0, 0, 0, :, 0], d[0, 0]) and torch.allclose(t[0, 0, 0, :, 1:], torch.zeros(6, 2))
    # first step straight, then 90 deg left: 6 m along -> (4, 2)
    h = torch.zeros(1, 1, 16)
    h[..., 1:] = math.pi / 2
    t = compose(h, torch.tensor([[[6.0]]]), 4.0)
    assert torch.allclose(t[0, 0, 0, 0], torch.tensor([4.0, 2.0, math.pi / 2]), atol=1e-5)
    # beyond the end of the path the last heading continues
    t = compose(torch.zeros(1, 1, 2), torch.tensor([[[11.0]]]), 4.0)
    assert torch.allclose(t[0, 0, 0, 0, :2], torch.tensor([11.0, 0.0]))


def test_expert_path_targets():
    straight = torch.stack([torch.arange(1, 7) * 3.0, torch.zeros(6), torch.zeros(6)], -1)[None]
    assert torch.allclose(arc_profile(straight), torch.arange(1, 7)[None] * 3.0)
    route = torch.stack([torch.zeros(16), torch.arange(16) * 4.0], -1)[None]  # route going left (+y)
    mask = torch.ones(1, 16, dtype=torch.bool)
    h = expert_path_headings(straight, route, mask, 16, 4.0)
    assert torch.allclose(h, torch.zeros(1, 16))
    standing = torch.zeros(1, 6, 3)
    h = expert_path_headings(standing, route, mask, 16, 4.0)
    assert torch.allclose(h, torch.full((1, 16), math.pi / 2))


@pytest.mark.parametrize("family", ["vocab", "hier"])
def test_short_imitation_lowers_the_loss(obs, family):
    torch.manual_seed(0)
    p = make(family).train()
    expert = route_expert(obs)
    if family == "vocab":
        p.set_vocabulary(torch.cat([expert[:8], torch.randn(24, 6, 3).cumsum(1) * 3]))
    opt = torch.optim.Adam(p.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        out = p.imitation_loss(obs, expert)
        loss = sum(v for k, v in out.items() if k.startswith("loss_"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_bad_checkpoints(tmp_path, obs):
    with pytest.raises(CraftError, match="does not exist"):
        load_policy(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(CraftError, match="not a readable CRAFT policy checkpoint"):
        load_policy(tmp_path / "junk.pt")
    atomic_save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(CraftError, match="not a CRAFT policy checkpoint"):
        load_policy(tmp_path / "other.pt")
    p = make("hier")
    ck = p.checkpoint()
    atomic_save({**ck, "format_version": 99}, tmp_path / "v99.pt")
    with pytest.raises(CraftError, match="format version 99"):
        load_policy(tmp_path / "v99.pt")
    p.save(tmp_path / "hier.pt")
    with pytest.raises(CraftError, match="expected family 'vocab'"):
        load_policy(tmp_path / "hier.pt", family="vocab")
    assert read_checkpoint(tmp_path / "hier.pt")["family"] == "hier"
    # a vocabulary that does not match the configured size
    v = make("vocab")
    ck = v.checkpoint()
    ck["state_dict"]["vocabulary"] = torch.zeros(16, 6, 3)
    atomic_save(ck, tmp_path / "badvocab.pt")
    with pytest.raises(CraftError, match="mismatched vocabulary"):
        load_policy(tmp_path / "badvocab.pt")
    with pytest.raises(CraftError, match="does not fit"):
        v.set_vocabulary(torch.zeros(8, 6, 3))
    with pytest.raises(CraftError, match="unknown policy family"):
        build_policy("nope")
    assert not list(tmp_path.glob(".*.tmp"))


def test_hier_config_round_trips_nested_encoder():
    cfg = HierConfig(encoder={"d_model": 32, "heads": 4})
    assert cfg.encoder.d_model == 32
    with pytest.raises(CraftError):
        HierConfig(encoder={"d_model": 30, "heads": 4})
