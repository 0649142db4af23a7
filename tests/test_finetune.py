"""Fine-tuning: loss pieces against hand computations, every method end to end, EMA teacher, resume."""

import math
from dataclasses import replace

import pytest
import torch

from craft.cli import main
from craft.errors import CraftError
from craft.finetune.collector import CollectorConfig
from craft.finetune.losses import (clipped_surrogate, discounted_returns, gae, kl_terms, masked_log_softmax,
                                   proxy_loss)
from craft.finetune.trainer import FinetuneConfig, Trainer, finetune
from craft.policies import load_policy

torch.set_num_threads(1)


# ---------------------------------------------------------------------- pure loss pieces
def test_kl_terms_exact_and_masked():
    logits = torch.tensor([[1.0, 2.0, 0.5, 9.0]])
    tlogits = torch.tensor([[0.0, 1.0, 1.0, -9.0]])
    valid = torch.tensor([[True, True, True, False]])
    lp, lq = masked_log_softmax(logits, valid), masked_log_softmax(tlogits, valid)
    p = torch.softmax(logits[0, :3], 0)
    q = torch.softmax(tlogits[0, :3], 0)
    rev, fwd = kl_terms(lp, lq, valid)
    assert torch.isclose(rev[0], (p * (p / q).log()).sum())
    assert torch.isclose(fwd[0], (q * (q / p).log()).sum())
    assert kl_terms(lp, lp, valid)[0].abs().max() < 1e-7


def test_proxy_loss_is_the_exact_expectation():
    logits = torch.tensor([[0.3, -1.0, 2.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    loss, expected = proxy_loss(masked_log_softmax(logits, valid), adv)
    p = torch.softmax(logits.detach(), -1)
    assert torch.isclose(expected[0], (p * adv).sum())
    loss.backward()
    # d/dz of -sum p A = -p (A - sum p A)
    assert torch.allclose(logits.grad, -p * (adv - (p * adv).sum()), atol=1e-6)


def test_dual_clipped_surrogate_by_hand():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 3.0, 0.5, 1.0]))
    adv = torch.tensor([1.0, -1.0, -1.0, 0.0])
    loss, d = clipped_surrogate(new, old, adv, eps=0.2, dual_clip=2.0)
    # per transition: min(1.5, 1.2) = 1.2; min(-3, -1.2) = -3 -> dual max(-3, -2) = -2; min(-0.5, -0.8) = -0.8; 0
    assert math.isclose(float(loss), -(1.2 - 2.0 - 0.8 + 0.0) / 4, rel_tol=1e-6)
    assert math.isclose(float(d["dual_clip_frac"]), 0.25) and math.isclose(float(d["clip_frac"]), 0.75)
    loss_nodual, _ = clipped_surrogate(new, old, adv, eps=0.2, dual_clip=None)
    assert math.isclose(float(loss_nodual), -(1.2 - 3.0 - 0.8) / 4, rel_tol=1e-6)


def test_returns_and_gae_match_hand_loops():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(6, 3, generator=g)
    v = torch.randn(6, 3, generator=g)
    nd = torch.rand(6, 3, generator=g) > 0.3
    gamma, lam = 0.9, 0.8
    ret = discounted_returns(r, nd, gamma)
    adv, tgt = gae(r, v, nd, gamma, lam)
    for w in range(3):
        G, A = 0.0, 0.0
        for t in reversed(range(6)):
            G = float(r[t, w]) + gamma * float(nd[t, w]) * G
            nxt = float(v[t + 1, w]) if t < 5 else 0.0
            delta = float(r[t, w]) + gamma * float(nd[t, w]) * nxt - float(v[t, w])
            A = delta + gamma * lam * float(nd[t, w]) * A
            assert math.isclose(float(ret[t, w]), G, rel_tol=1e-5, abs_tol=1e-5)
            assert math.isclose(float(adv[t, w]), A, rel_tol=1e-5, abs_tol=1e-5)
    assert torch.allclose(tgt, adv + v)


# ---------------------------------------------------------------------- end to end on a tiny budget
TINY = FinetuneConfig(iters=2, minibatch=16, collector=CollectorConfig(
    split="val", worlds=2, buffer_size=24, routes=1, types=("HardBreakRoute", "Accident")))


@pytest.mark.parametrize("method", ["craft", "grpo", "ppo", "reinforcepp"])
def test_every_method_trains_only_the_scoring_branch(init_ckpt, tmp_path, method):
    cfg = replace(TINY, method=method, iters=1)
    hist = finetune(init_ckpt, tmp_path / method, cfg, progress=False)
    row = hist[0]
    assert row["transitions"] >= 24 and math.isfinite(row["loss"])
    assert ("loss_cp" in row) == (method in ("craft", "grpo"))
    assert ("loss_gr" in row) == (method == "craft")
    assert ("loss_value" in row) == (method == "ppo")
    assert "loss_rkl" in row and "kl_forward" in row
    before = load_policy(init_ckpt).state_dict()
    after = load_policy(tmp_path / method / "policy.pt").state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("joint.") for k in changed)
    assert (tmp_path / method / "diagnostics.csv").read_text().startswith("iteration,")


def test_ema_teacher_and_resume_identical(init_ckpt, tmp_path):
    full = Trainer(init_ckpt, tmp_path / "full", TINY, progress=False)
    p0 = {k: v.clone() for k, v in full.policy.trainable_parameters().items()}
    full.iterate()
    p1 = full.policy.trainable_parameters()
    t1 = dict(full.teacher.named_parameters())
    for k in p0:  # teacher <- 0.99 teacher + 0.01 policy, teacher starting at the initial weights
        assert torch.allclose(t1[k], 0.99 * p0[k] + 0.01 * p1[k].detach(), atol=1e-7)
    full.iterate()
    # the same two iterations, interrupted after the first and resumed
    part = Trainer(init_ckpt, tmp_path / "part", replace(TINY, iters=1), progress=False)
    part.run()
    with pytest.raises(CraftError, match="different configuration"):
        Trainer(init_ckpt, tmp_path / "part", replace(TINY, lr=2e-4), resume=True, progress=False)
    # --iters may be raised on resume: 1 -> 2 here gives the full run's schedule (lr at iteration 1 is lr_end
    # under both), so the extended run ends identical to the 2-iteration one
    ext = Trainer(init_ckpt, tmp_path / "part", TINY, resume=True, progress=False)
    assert ext.iteration == 1
    ext.run()
    e = load_policy(tmp_path / "part" / "policy.pt").state_dict()
    assert all(torch.equal(full.policy.state_dict()[k], e[k]) for k in e)
    # resuming needs the same configuration: continue a 2-iteration run that was stopped after iteration 1
    part2 = Trainer(init_ckpt, tmp_path / "p2", TINY, progress=False)
    part2.iterate()
    part2._save()
    resumed = Trainer(init_ckpt, tmp_path / "p2", TINY, resume=True, progress=False)
    assert resumed.iteration == 1
    resumed.run()
    a = full.policy.state_dict()
    b = load_policy(tmp_path / "p2" / "policy.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_bad_input(init_ckpt, tmp_path, capsys):
    with pytest.raises(CraftError, match="unknown fine-tuning method"):
        FinetuneConfig(method="sac")
    assert main(["finetune", "--method", "ppo", "--no-proxy", "--init", str(init_ckpt), "--out",
                 str(tmp_path / "x")]) == 2
    assert "ablations of --method craft" in capsys.readouterr().err
    assert main(["finetune", "--method", "craft", "--init", str(tmp_path / "missing.pt"), "--out",
                 str(tmp_path / "y")]) == 2
    finetune(init_ckpt, tmp_path / "z", replace(TINY, iters=1), progress=False)
    with pytest.raises(CraftError, match="already holds a fine-tuning run"):
        finetune(init_ckpt, tmp_path / "z", replace(TINY, iters=1), progress=False)


def test_snapshots_of_different_waves_concatenate():
    from craft.finetune.collector import _concat_states
    from craft.world.towns import generate_town
    from craft.world.world import World, random_specs

    w = World([generate_town(3)])
    a = w.reset(random_specs(w.maps, 2, seed=0, n_vehicles=4), seed=0)
    b = w.reset(random_specs(w.maps, 3, seed=1, n_vehicles=12), seed=1)
    assert a.num_agents != b.num_agents
    s = _concat_states([a, b])
    assert s.batch_size == 5 and s.num_agents == max(a.num_agents, b.num_agents)
    assert torch.equal(s.pos[:2, :a.num_agents], a.pos) and not s.valid[:2, a.num_agents:].any()


def test_kl_terms_match_torch_distributions():
    g = torch.Generator().manual_seed(4)
    logits, tlogits = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    valid = torch.ones(5, 7, dtype=torch.bool)
    rev, fwd = kl_terms(masked_log_softmax(logits, valid), masked_log_softmax(tlogits, valid), valid)
    p, q = torch.distributions.Categorical(logits=logits), torch.distributions.Categorical(logits=tlogits)
    assert torch.allclose(rev, torch.distributions.kl_divergence(p, q), atol=1e-6)
    assert torch.allclose(fwd, torch.distributions.kl_divergence(q, p), atol=1e-6)


def test_dual_clip_bounds_the_surrogate():
    """The paper's proposition: -c A_max <= u <= (1 + eps) A_max for any ratio."""
    g = torch.Generator().manual_seed(5)
    new = torch.randn(4000, generator=g) * 3
    adv = torch.randn(4000, generator=g) * 2
    eps, c = 0.2, 2.0
    _, _ = clipped_surrogate(new, torch.zeros(4000), adv, eps, c)
    rho = new.exp()
    u = torch.minimum(rho * adv, rho.clamp(1 - eps, 1 + eps) * adv)
    u = torch.where(adv < 0, torch.maximum(u, c * adv), u)
    a_max = adv.abs().max()
    assert (u >= -c * a_max - 1e-6).all() and (u <= (1 + eps) * a_max + 1e-6).all()
    # and the library's loss is exactly minus the mean of that bounded surrogate
    loss, _ = clipped_surrogate(new, torch.zeros(4000), adv, eps, c)
    assert torch.isclose(loss, -u.mean(), atol=1e-6)


def test_nonfinite_losses_are_skipped_then_stop(init_ckpt, tmp_path):
    tr = Trainer(init_ckpt, tmp_path / "nan", replace(TINY, max_nonfinite=2), progress=False)
    before = {k: v.clone() for k, v in tr.policy.trainable_parameters().items()}
    orig = tr.method.loss
    tr.method.loss = lambda logp, mb: {k: v * float("nan") if k.startswith("loss_") else v
                                       for k, v in orig(logp, mb).items()}
    with pytest.raises(CraftError, match="non-finite loss"):
        tr.iterate()
    assert all(torch.equal(before[k], v) for k, v in tr.policy.trainable_parameters().items())


def test_family_mismatch_is_an_error(init_ckpt, tmp_path):
    with pytest.raises(CraftError, match="expected family 'vocab'"):
        Trainer(init_ckpt, tmp_path / "f", replace(TINY, family="vocab"), progress=False)


class _Rusher(torch.nn.Module):
    """The pre-trained vocabulary policy re-ranked to prefer its farthest-reaching valid candidate (it drives
    into what is ahead)."""

    def __init__(self, base):
        super().__init__()
        self.base, self.cfg = base, base.cfg

    def forward(self, obs):
        from craft.policies.base import CandidateSet

        cs = self.base(obs)
        reach = cs.trajectories[:, :, -1, 0]
        return CandidateSet(cs.trajectories, cs.valid, torch.where(cs.valid, 5.0 * reach, torch.full_like(reach, -1e9)))


def _counted(buf):
    ev = buf.events
    return (ev["collision_vehicle"] | ev["collision_pedestrian"] | ev["collision_layout"]).any(1) & buf.live


def test_collector_ends_episodes_at_the_first_collision():
    from craft.finetune.collector import Collector

    policy = _Rusher(load_policy("checkpoints/vocab.pt"))
    cfg = CollectorConfig(split="val", worlds=8, buffer_size=300, routes=2, cohorts=2, stagger=2,
                          types=("Accident", "HardBreakRoute", "ParkingCutIn", "ConstructionObstacle"))
    assert cfg.end_on_collision  # the paper's protocol is the default
    buf = Collector(cfg).collect(policy, sample=False)
    hit = _counted(buf)
    assert int(hit.sum()) >= 3
    assert not (hit & buf.notdone).any()  # every decision with a counted collision ends its episode
    free = Collector(replace(cfg, end_on_collision=False)).collect(policy, sample=False)
    assert (_counted(free) & free.notdone).any()  # plain b2d drives on after a collision


def test_collector_staggers_groups():
    from craft.finetune.collector import Collector

    cfg = CollectorConfig(split="val", worlds=6, buffer_size=30, routes=1, cohorts=3, stagger=2,
                          types=("Accident", "HardBreakRoute", "ParkingCutIn", "ConstructionObstacle",
                                 "YieldToEmergencyVehicle", "SignalizedJunctionLeftTurn"))
    col = Collector(cfg)
    buf = col.collect(load_policy("checkpoints/vocab.pt"))
    live = buf.live.int()
    # group c (columns 2c, 2c+1) starts its first wave 2c decisions after group 0
    assert live[:, 0:2].all() and not live[:2, 2:].any() and live[2:4, 2:4].all() and not live[:4, 4:].any()
    assert live[4, 4:].all()
    assert (buf.route[:2, 2:] == -1).all() and (buf.route[4:, :] >= 0).all()


def test_budget_aware_teacher_arithmetic():
    assert FinetuneConfig().teacher_momentum == 0.99  # the paper's per-iteration default
    c = FinetuneConfig(iters=6, teacher_half_life=0.5)  # half-life 3 iterations
    assert math.isclose(c.teacher_momentum ** 3, 0.5, rel_tol=1e-9)
    s = FinetuneConfig(iters=6, epochs=4, minibatch=256, teacher_half_life=0.25, teacher_per_step=True,
                       collector=CollectorConfig(buffer_size=2048))
    assert s.steps_per_iteration == 32  # 4 epochs x 8 full minibatches
    assert math.isclose(s.teacher_momentum ** 48, 0.5, rel_tol=1e-9)  # 0.25 x 192 steps
    with pytest.raises(CraftError, match="teacher_half_life"):
        FinetuneConfig(teacher_half_life=-1.0)


def test_per_step_teacher_and_no_partial_minibatch(init_ckpt, tmp_path):
    cfg = replace(TINY, iters=1, teacher_per_step=True, teacher_half_life=0.5)
    tr = Trainer(init_ckpt, tmp_path / "t", cfg, progress=False)
    p0 = {k: v.clone() for k, v in tr.policy.trainable_parameters().items()}
    row = tr.iterate()
    n = row["transitions"]
    assert 24 <= n < 32  # one full minibatch of 16 per epoch, the rest is dropped
    steps = {int(st["step"]) for st in tr.opt.state.values()}
    assert steps == {cfg.epochs * (n // cfg.minibatch)} == {2}
    m = cfg.teacher_momentum
    assert math.isclose(m, 0.5 ** (1 / (0.5 * 2)))  # half-life one of the run's two steps
    # after two per-step updates the teacher is m^2 init + the policy's path; it left the initial weights
    t = dict(tr.teacher.named_parameters())
    assert any(not torch.equal(t[k], p0[k]) for k in p0)
    assert row["teacher_momentum"] == m and 0 <= row["probe/top1_changed"] <= 1
    assert row["probe/kl_init"] > 0 and math.isfinite(row["probe/adv_gain"])
    # the KL targets follow the moving teacher: the second step differs from a per-iteration teacher's
    per_iter = Trainer(init_ckpt, tmp_path / "i", replace(cfg, teacher_per_step=False), progress=False)
    per_iter.iterate()
    a, b = tr.policy.trainable_parameters(), per_iter.policy.trainable_parameters()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    shares = {k: v for k, v in row.items() if k.startswith("gradshare/")}
    assert set(shares) == {"gradshare/cp", "gradshare/gr", "gradshare/rkl", "gradshare/fkl"}
    assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-6)


def test_grad_shares_and_probe_metrics_by_hand():
    from craft.finetune.trainer import grad_shares, probe_metrics

    w = torch.zeros(2, requires_grad=True)
    sh = grad_shares({"loss_a": 3.0 * w[0], "loss_b": 4.0 * w[1], "kl": w.sum().detach()}, [w])
    assert sh == pytest.approx({"a": 3 / 7, "b": 4 / 7})
    valid = torch.tensor([[True, True, True], [True, True, False]])
    logp0 = masked_log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 5.0]]), valid)
    logp = masked_log_softmax(torch.tensor([[0.0, 2.0, 0.0], [0.0, 1.0, 5.0]]), valid)
    returns = torch.tensor([[1.0, 4.0, 0.0], [2.0, 3.0, 0.0]])
    adv = torch.tensor([[-1.0, 1.0, 0.0], [-1.0, 1.0, 0.0]])
    m = probe_metrics(logp, logp0, logp0, valid, returns, adv)
    p, p0 = logp.exp(), logp0.exp()
    assert m["probe/top1_changed"] == 0.5  # state 0: 0 -> 1; state 1: candidate 1 stays (2 is invalid)
    assert m["probe/top1_return_gain"] == pytest.approx((4.0 - 1.0 + 0.0) / 2)
    assert m["probe/adv_gain"] == pytest.approx(float(((p - p0) * adv).sum(-1).mean()))
    assert m["probe/kl_init"] == pytest.approx(float((p[0] * (logp[0] - logp0[0])).sum() / 2), rel=1e-5)
    assert m["probe/kl_init"] == m["probe/kl_teacher"]
