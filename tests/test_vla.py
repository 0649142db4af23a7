"""Tests for craft.policies.vla (vision-language-action family: LM decision expert + LoRA, action expert)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("tokenizers")

from craft.errors import CraftError
from craft.policies.base import build_policy, load_policy
from craft.policies.vla import (COMMAND_WORDS, VLAConfig, VLAPolicy, build_tokenizer, polyline_at, route_polyline,
                                save_tiny_lm, vocabulary)
from craft.world.observe import Command, ObsConfig, Observation

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def obs(town):
    from craft.world.observe import observe
    from craft.world.world import World, random_specs

    w = World([town])
    st = w.reset(random_specs(w.maps, 12, seed=0), seed=0)
    return observe(w.maps, st, w.lights(st))


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return VLAPolicy(VLAConfig()).eval()


def synthetic_obs(speed: list[float], limit: float = 10.0, command: int | list[int] = int(Command.FOLLOW),
                  route_y: float = 0.0) -> Observation:
    """Empty scenes (no agents / lanes / lights) with a straight route along +x (offset ``route_y`` m)."""
    oc = ObsConfig()
    B = len(speed)
    dims = Observation.feature_dims(oc)
    names = Observation.feature_names(oc)["ego"]
    ego = torch.zeros(B, dims["ego"])
    ego[:, names.index("speed")] = torch.tensor(speed) / oc.speed_scale
    ego[:, names.index("speed_limit")] = limit / oc.speed_scale
    cmd = torch.as_tensor(command, dtype=torch.long).expand(B).clone()
    ego[:, names.index("cmd_follow") + cmd] = 1.0
    route = torch.zeros(B, oc.route_points, 2)
    route[..., 0] = torch.arange(oc.route_points) * oc.route_spacing / oc.pos_scale
    route[..., 1] = route_y / oc.pos_scale

    def empty(n, k):
        return torch.zeros(B, n, dims[k]), torch.zeros(B, n, dtype=torch.bool)

    agents, am = empty(oc.max_agents, "agents")
    lanes, lm = empty(oc.max_lane_chunks, "lanes")
    lights, km = empty(oc.max_lights, "lights")
    stops, sm = empty(oc.max_stops, "stops")
    return Observation(ego=ego, command=cmd, agents=agents, agents_mask=am,
                       lanes=lanes, lanes_mask=lm, lights=lights, lights_mask=km, stops=stops, stops_mask=sm,
                       route=route, route_mask=torch.ones(B, oc.route_points, dtype=torch.bool))


def route_expert(obs: Observation, speed: torch.Tensor, offset: torch.Tensor | float = 0.0, T: int = 6) -> torch.Tensor:
    """Expert-like trajectories (B, T, 3): along the observed route at ``speed (B,)`` m/s, ``offset`` m left of it."""
    oc = ObsConfig()
    pts, cum = route_polyline(obs.route * oc.pos_scale, obs.route_mask, oc.route_spacing)
    t = torch.arange(1, T + 1) * 0.5
    xy, tang = polyline_at(pts, cum, speed[:, None] * t[None])
    normal = torch.stack([-tang[..., 1], tang[..., 0]], -1)
    off = torch.as_tensor(offset, dtype=torch.float32)
    off = off[:, None, None] if off.dim() else off
    xy = xy + off * normal
    yaw = torch.atan2(tang[..., 1], tang[..., 0])
    return torch.cat([xy, yaw[..., None]], -1)


# ----------------------------------------------------------------------------- forward
def test_forward_shapes(policy, obs):
    with torch.no_grad():
        cs = policy(obs)
    B = obs.batch_size
    assert cs.trajectories.shape == (B, 21, 6, 3)
    assert cs.valid.shape == (B, 21) and cs.valid.all()
    assert cs.logits.shape == (B, 21) and torch.isfinite(cs.logits).all()
    assert torch.isfinite(cs.trajectories).all()
    # logits are the joint log-probabilities of the two decision words
    assert torch.allclose(cs.logits.exp().sum(-1), torch.ones(B), atol=1e-5)
    assert cs.top1().shape == (B,)


def test_decision_logits_match_full_sequence_scoring(policy, obs):
    """The cached continuation equals scoring every '<speed> <path>' text with a full forward pass."""
    o = obs.index(slice(0, 4))
    with torch.no_grad():
        tokens, mask, ego = policy.encoder(o)
        fast = policy.decision_logits(o, tokens, mask, ego)
        lm = policy._causal_lm()
        emb = lm.get_input_embeddings()
        x = torch.cat([policy.scene_prefix(tokens, mask, ego), emb(policy.prompt_ids[o.command])], 1)
        Np = policy.path_ids.numel()
        for i, si in enumerate(policy.speed_ids):
            for j, pj in enumerate(policy.path_ids):
                xx = torch.cat([x, emb(torch.stack([si, pj]))[None].expand(4, -1, -1)], 1)
                out = lm(inputs_embeds=xx).logits
                ref = (torch.log_softmax(out[:, -3, policy.speed_ids], -1)[:, i]
                       + torch.log_softmax(out[:, -2, policy.path_ids], -1)[:, j])
                assert torch.allclose(fast[:, i * Np + j], ref, atol=1e-5)


def test_untrained_trajectories_follow_the_prior():
    """Fresh action expert: follow-path candidates stay on a straight route; stop stays behind faster ones."""
    torch.manual_seed(0)
    pol = VLAPolicy(VLAConfig()).eval()
    o = synthetic_obs([8.0], limit=10.0)
    with torch.no_grad():
        traj = pol(o).trajectories.view(7, 3, 6, 3)
    follow = traj[:, 1]
    assert follow[..., 1].abs().max() < 1e-4 and follow[..., 2].abs().max() < 1e-4
    ends = follow[:, -1, 0]
    assert (ends[1:] >= ends[:-1]).all()  # faster decisions travel farther
    assert ends[0] == pytest.approx(8.0**2 / (2 * 4.0), abs=1e-3)  # stop: decelerate at 4 m/s^2
    assert ends[-2] == pytest.approx(8.0 * 1 + 0.5 * 2.0 * 1 + 10.0 * 2, abs=1e-3)  # cruise: reach 10 m/s in 1 s
    assert (traj[:, 0, -1, 1] > 1.0).all() and (traj[:, 2, -1, 1] < -1.0).all()  # left / right shift


# ----------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip(policy, obs, tmp_path):
    path = tmp_path / "vla.pt"
    policy.save(path, meta={"note": "test"})
    loaded = load_policy(path, family="vla")
    assert isinstance(loaded, VLAPolicy) and loaded.meta == {"note": "test"}
    with torch.no_grad():
        a, b = policy(obs), loaded(obs)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.trajectories, b.trajectories)
    assert set(loaded.trainable_parameters()) == set(policy.trainable_parameters())


def test_round_trip_after_finetuning_keeps_the_adapter(obs, tmp_path):
    torch.manual_seed(1)
    pol = VLAPolicy(VLAConfig())
    opt = torch.optim.Adam(pol.freeze_for_finetuning(), lr=1e-2)
    for _ in range(3):
        loss = -(pol(obs).log_probs()[:, 0]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pol.eval().save(tmp_path / "ft.pt")
    loaded = load_policy(tmp_path / "ft.pt")
    # same requires_grad flags as the original: torch's matmul folds 3-d inputs differently when a weight
    # requires grad, which moves results by an ulp
    loaded.freeze_for_finetuning()
    with torch.no_grad():
        assert torch.equal(pol(obs).logits, loaded(obs).logits)


def test_vocab_checkpoint_as_vla_is_an_error(tmp_path):
    from craft.policies.vocab import VocabConfig

    build_policy("vocab", VocabConfig(vocab_size=8)).save(tmp_path / "vocab.pt")
    with pytest.raises(CraftError, match="expected family 'vla'") as e:
        load_policy(tmp_path / "vocab.pt", family="vla")
    assert "\n" not in str(e.value)


def test_mismatched_vocabulary_is_an_error(policy, tmp_path):
    ck = policy.checkpoint()
    ck["state_dict"] = dict(ck["state_dict"])
    ck["state_dict"]["speed_ids"] = ck["state_dict"]["speed_ids"].flip(0)
    from craft.policies.base import atomic_save

    atomic_save(ck, tmp_path / "bad.pt")
    with pytest.raises(CraftError, match="vocabulary") as e:
        load_policy(tmp_path / "bad.pt")
    assert "\n" not in str(e.value)
    # weights of a model with another decision vocabulary (more speed words) do not fit either
    other = VLAPolicy(VLAConfig(speed_words=("stop", "slow", "fast"), speed_ratios=(0.0, 0.4, 1.0)))
    ck = policy.checkpoint()
    ck["state_dict"] = other.state_dict()
    atomic_save(ck, tmp_path / "bad2.pt")
    with pytest.raises(CraftError) as e:
        load_policy(tmp_path / "bad2.pt")
    assert "\n" not in str(e.value)


def test_config_errors():
    with pytest.raises(CraftError, match="lm_arch"):
        VLAConfig(lm_arch="gpt9")
    with pytest.raises(CraftError, match="speed_ratios"):
        VLAConfig(speed_ratios=(0.0, 1.0))
    with pytest.raises(CraftError, match="distinct"):
        VLAConfig(path_words=("left", "stop", "right"))
    with pytest.raises(CraftError, match="command"):
        VLAConfig(prompt="decide :")
    cfg = VLAConfig(speed_words=["stop", "go"], speed_ratios=[0, 1], encoder={"d_model": 32})  # from YAML-like input
    assert cfg.speed_words == ("stop", "go") and cfg.encoder.d_model == 32


# ----------------------------------------------------------------------------- LoRA
def test_lora_changes_only_the_adapter(obs):
    torch.manual_seed(2)
    pol = VLAPolicy(VLAConfig())
    train = pol.trainable_parameters()
    assert train and all("lora_" in k for k in train)
    assert sum(p.numel() for p in train.values()) < 0.1 * sum(p.numel() for p in pol.parameters())
    before = {k: v.detach().clone() for k, v in pol.state_dict().items()}
    params = pol.freeze_for_finetuning()
    opt = torch.optim.Adam(params, lr=1e-2)
    adv = torch.randn(obs.batch_size, 21, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        loss = -(pol(obs).log_probs().exp() * adv).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = pol.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)
    teacher = copy.deepcopy(pol)  # an EMA teacher is a copy of the policy
    with torch.no_grad():
        assert torch.equal(teacher(obs).logits, pol(obs).logits)


def test_lora_starts_as_identity_and_stays_frozen_in_pretraining(obs):
    torch.manual_seed(3)
    pol = VLAPolicy(VLAConfig())
    assert all(not p.requires_grad for p in pol.trainable_parameters().values())
    assert all(torch.count_nonzero(p) == 0 for k, p in pol.trainable_parameters().items() if "lora_B" in k)
    with torch.no_grad():
        a = pol(obs).logits
        with pol.lm.disable_adapter():
            b = pol(obs).logits
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- imitation
def test_imitation_lowers_the_loss():
    torch.manual_seed(4)
    pol = VLAPolicy(VLAConfig())
    B = 16
    g = torch.Generator().manual_seed(0)
    # the expert keeps its speed and shifts left on a change-left command: labels follow from the observation
    speed = torch.rand(B, generator=g) * 12
    cmd = torch.arange(B) % len(Command)
    o = synthetic_obs(speed.tolist(), limit=12.0, command=cmd.tolist())
    offset = torch.where(cmd == int(Command.CHANGE_LEFT), torch.full((B,), 3.0), torch.zeros(B))
    expert = route_expert(o, speed, offset)
    opt = torch.optim.Adam([p for p in pol.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(30):
        out = pol.imitation_loss(o, expert)
        loss = sum(v for k, v in out.items() if k.startswith("loss_"))
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = pol.imitation_loss(o, expert)
    assert float((last["loss_ce"] + last["loss_traj"]).detach()) < 0.7 * first
    assert {"loss_ce", "loss_traj", "acc"} <= set(last)
    assert all(torch.count_nonzero(p) == 0 for k, p in pol.trainable_parameters().items() if "lora_B" in k)


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_is_offline_and_deterministic():
    cfg = VLAConfig()
    words = vocabulary(cfg)
    assert words[:2] == ["[PAD]", "[UNK]"] and len(set(words)) == len(words)
    assert set(COMMAND_WORDS) | set(cfg.speed_words) | set(cfg.path_words) <= set(words)
    a, b = build_tokenizer(cfg), build_tokenizer(cfg)
    assert a.get_vocab() == b.get_vocab() == {w: i for i, w in enumerate(words)}
    text = cfg.prompt.format(command="change_left") + " cruise follow"
    ids = a.encode(text).ids
    assert ids == b.encode(text).ids and 1 not in ids  # no unknown words
    assert a.decode(ids) == text
    assert a.encode("banana").ids == [1]


def test_prompt_carries_the_command(policy):
    tok = build_tokenizer(policy.cfg)
    for c in Command:
        row = policy.prompt_ids[int(c)][policy.prompt_mask[int(c)]].tolist()
        assert tok.decode(row) == policy.cfg.prompt.format(command=c.name.lower())


# ----------------------------------------------------------------------------- labels
def test_labels_from_hand_built_expert_trajectories(policy):
    cfg = policy.cfg
    S = {w: i for i, w in enumerate(cfg.speed_words)}
    P = {w: i for i, w in enumerate(cfg.path_words)}
    o = synthetic_obs([0.0, 10.0, 10.0, 5.0, 10.0, 10.0, 10.0, 3.0], limit=10.0)
    speed = torch.tensor([0.0, 10.0, 10.0, 5.0, 10.0, 10.0, 10.0, 1.0])
    offset = torch.tensor([0.0, 0.0, 0.6, 0.0, 3.5, -3.5, 1.6, 0.0])
    expert = route_expert(o, speed, offset)
    ls, lp = policy.decision_labels(o, expert)
    assert ls.tolist() == [S[w] for w in ("stop", "cruise", "cruise", "medium", "cruise", "cruise", "cruise", "crawl")]
    assert lp.tolist() == [P[w] for w in ("follow", "follow", "follow", "follow", "left", "right", "left", "follow")]
    # a route that bends: following it is "follow", driving straight on while it turns left is "right"
    o2 = synthetic_obs([8.0, 8.0], limit=8.0)
    ang = torch.arange(16) * 4.0 / 30.0  # a 30 m radius left turn
    o2.route = torch.stack([30 * torch.sin(ang), 30 * (1 - torch.cos(ang))], -1)[None].expand(2, -1, -1) / 50.0
    bend = route_expert(o2, torch.tensor([8.0, 8.0]))
    straight = torch.stack([torch.arange(1, 7) * 4.0, torch.zeros(6), torch.zeros(6)], -1)
    ls2, lp2 = policy.decision_labels(o2, torch.stack([bend[0], straight]))
    assert lp2.tolist() == [P["follow"], P["right"]] and ls2.tolist() == [S["cruise"], S["cruise"]]


def test_prior_matches_a_constant_speed_route_expert():
    """Untrained: the labelled decision (cruise, follow) of a constant-speed route expert is its prior, near it."""
    torch.manual_seed(5)
    pol = VLAPolicy(VLAConfig())
    o = synthetic_obs([10.0] * 4, limit=10.0)
    expert = route_expert(o, torch.full((4,), 10.0))
    err0 = float(pol.imitation_loss(o, expert)["traj_l1"])
    assert err0 < 1.0  # the prior alone (cruise, follow) is already close: constant speed on the route


# ----------------------------------------------------------------------------- lm_path
def test_lm_path_missing_is_an_error():
    with pytest.raises(CraftError, match="lm_path") as e:
        VLAPolicy(VLAConfig(lm_path="/nonexistent/model/dir"))
    assert "\n" not in str(e.value)


def test_lm_path_directory_loads(tmp_path, obs):
    cfg = VLAConfig()
    save_tiny_lm(cfg, tmp_path / "lm")
    torch.manual_seed(6)
    a = VLAPolicy(cfg).eval()
    torch.manual_seed(6)
    b = VLAPolicy(VLAConfig(lm_path=str(tmp_path / "lm"))).eval()
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.speed_ids, b.speed_ids)
    with torch.no_grad():
        assert torch.allclose(a(obs).logits, b(obs).logits, atol=1e-6)
    b.save(tmp_path / "b.pt")
    c = load_policy(tmp_path / "b.pt")
    with torch.no_grad():
        assert torch.equal(b(obs).logits, c(obs).logits)


def test_missing_route_falls_back_to_straight_ahead(policy):
    o = synthetic_obs([5.0, 5.0, 0.0], limit=10.0)
    o.route_mask[0] = False  # no route at all
    o.route_mask[1, 1:] = False  # one point
    with torch.no_grad():
        cs = policy(o)
    assert torch.isfinite(cs.trajectories).all() and torch.isfinite(cs.logits).all()
    follow = cs.trajectories.view(3, 7, 3, 6, 3)[:2, :, 1]
    assert follow[..., 1].abs().max() < 1e-4 and (follow[..., -1, 0] >= 0).all()
    ls, lp = policy.decision_labels(o, route_expert(o, torch.tensor([5.0, 5.0, 0.0])))
    assert lp.tolist() == [1, 1, 1] and ls.tolist()[2] == 0


def test_registered_family():
    from craft.policies.base import families

    assert "vla" in families()
    assert isinstance(build_policy("vla"), VLAPolicy)
