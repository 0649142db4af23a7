"""The fine-tuning loop: ``craft finetune --method craft|grpo|ppo|reinforcepp --init CKPT --iters N --out DIR``.

One iteration (method section 6)::

    buffer  = collector.collect(policy)                      # on-policy, sampled from pi_old, >= B transitions
    scores  = proxy.score(buffer.snapshot, candidates)       # every candidate, H = 20 steps (if the method uses it)
    rewards = grounded / dense rewards of the executed steps
    targets = method.advantages(...)
    for epoch, minibatch:                                     # only the family's fine-tuned subset trains
        loss = method.loss(...) + beta_r KL(pi || teacher) + beta_f KL(teacher || pi)
        AdamW step (grad-norm clip)
    lr schedule step; teacher <- EMA(teacher, policy) on the trainable subset

Choices where the paper is silent (fields of :class:`FinetuneConfig`): 2 epochs of 512-transition minibatches
per iteration; cosine learning-rate decay from 1e-4 to 5e-6 over ``iters`` iterations (one step per
iteration); PPO: GAE lambda 0.95, value clip 0.2, SmoothL1 value loss weight 0.5, critic on the detached scene
summary with the policy's optimiser; the decision-level discount is gamma^k with gamma = 0.98 per 0.1 s step
and k = 5 steps per decision (the same time scale as the proxy).

Outputs in ``DIR``: ``policy.pt`` (policy checkpoint), ``trainer.pt`` (teacher, optimiser, scheduler, method
modules, collector state, RNG states, iteration, history), ``diagnostics.csv`` and TensorBoard logs under
``tb/``; written atomically after every iteration, so ``--resume DIR`` continues where an interrupted run
stopped and ends identical to an uninterrupted run (CPU).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from craft.errors import CraftError
from craft.finetune.collector import Collector, CollectorConfig
from craft.finetune.losses import coefficient_of_variation, kl_terms, masked_log_softmax
from craft.finetune.methods import METHODS, IterationData, make_method
from craft.finetune.proxy import CounterfactualWorld, ProxyConfig
from craft.finetune.rewards import GROUNDED_TERMS, RewardConfig, dense_reward_from_events, grounded_decision_reward
from craft.policies.base import CandidatePolicy, atomic_save, load_policy
from craft.world.tracker import TrackerState


@dataclass(frozen=True)
class FinetuneConfig:
    method: str = "craft"
    family: str | None = None
    """When set, the initial checkpoint must hold a policy of this family."""
    iters: int = 10
    seed: int = 0
    # optimisation (paper values)
    lr: float = 1e-4
    lr_end: float = 5e-6
    weight_decay: float = 1e-5
    grad_clip: float = 0.5
    epochs: int = 2
    """Passes over the buffer per iteration (paper silent)."""
    minibatch: int = 512
    """Transitions per optimiser step (paper silent)."""
    # CRAFT objective (paper values)
    w_cp: float = 1.0
    w_gr: float = 0.5
    beta_reverse: float = 0.5
    beta_forward: float = 0.1
    ema: float = 0.99
    clip_eps: float = 0.2
    dual_clip: float = 2.0
    # ablation switches
    use_proxy: bool = True
    use_residual: bool = True
    use_distill: bool = True
    # baselines (paper silent)
    gae_lambda: float = 0.95
    value_clip: float = 0.2
    value_coef: float = 0.5
    max_nonfinite: int = 3
    """Optimiser steps with a non-finite loss are skipped (and counted in the ``skipped_share`` diagnostic); this many in a
    row stop the run with an error."""
    step_gamma: float = 0.98
    """Discount per 0.1 s simulator step for the executed-rollout returns of PPO / REINFORCE++."""
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)

    def __post_init__(self):
        if isinstance(self.collector, dict):
            object.__setattr__(self, "collector", CollectorConfig(**self.collector))
        if isinstance(self.proxy, dict):
            p = dict(self.proxy)
            if isinstance(p.get("reward"), dict):
                p["reward"] = RewardConfig(**p["reward"])
            object.__setattr__(self, "proxy", ProxyConfig(**p))
        if self.method not in METHODS:
            raise CraftError(f"unknown fine-tuning method '{self.method}' (one of {', '.join(METHODS)})")
        if self.iters < 1 or self.epochs < 1 or self.minibatch < 1:
            raise CraftError("FinetuneConfig: iters, epochs and minibatch must be >= 1")
        if not 0 <= self.ema < 1:
            raise CraftError(f"FinetuneConfig.ema must be in [0, 1), got {self.ema}")

    @property
    def reward(self) -> RewardConfig:
        return self.proxy.reward

    @property
    def decision_gamma(self) -> float:
        return self.step_gamma ** self.collector.replan_every


# ---------------------------------------------------------------------- rewards of executed decisions
def decision_rewards(buf, cfg: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Grounded and dense rewards per decision (T, W) from the executed steps' events ((T, k, W) per field).

    The grounded reward is one indicator per event and decision (:func:`grounded_decision_reward`: an event in
    any executed step of the decision counts once; steps after the episode ended within the decision do not
    count). The dense reward discounts the steps within the decision by the step discount. Only the first
    counted collision of an episode is penalised in the dense reward; red-light and stop-sign infractions cost
    the proxy's flag penalties (40) at the step they happen. ``counts``: ``events/<term>`` the number of live
    decisions with that grounded event, ``grounded_mass/<term>`` its share of the total grounded penalty.
    """
    ev = buf.events
    T, k, W = ev["speed"].shape
    steps = {n: v.reshape(T * k, W) for n, v in ev.items()}
    done = ev["done"].bool()
    ended_before = (done.long().cumsum(1) - done.long()) > 0  # (T, k, W): the episode ended at an earlier step
    g, g_terms = grounded_decision_reward({n: v.transpose(0, 1) for n, v in ev.items()}, cfg.reward,
                                          step_valid=~ended_before.transpose(0, 1))
    live_step = buf.live[:, None, :].expand(T, k, W).reshape(T * k, W)
    start = torch.zeros(T * k, W, dtype=torch.bool)  # first step of an episode in this buffer
    prev_nd = torch.cat([torch.zeros(1, W, dtype=torch.bool), buf.notdone[:-1]])
    start[::k] = ~prev_nd
    dense = torch.zeros(T * k, W)
    prev = None
    collided = torch.zeros(W, dtype=torch.bool)
    for j in range(T * k):  # loop over time only
        cur = {n: v[j] for n, v in steps.items()}
        if prev is not None:
            prev = {n: torch.where(start[j], cur[n], prev[n]) for n in ("route_dist", "lane_center_dist",
                                                                        "heading_error")}
        collided = collided & ~start[j]
        r, _, collided = dense_reward_from_events(prev, cur, cfg.reward, collided_before=collided)
        # the proxy's trajectory-level red-light / stop-sign flags, on the executed steps where they happen
        r = r - cfg.reward.red_light_penalty * cur["red_light"].float() \
            - cfg.reward.stop_sign_penalty * cur["stop_infraction"].float()
        dense[j] = torch.where(live_step[j], r, torch.zeros_like(r))
        prev = cur
    disc = cfg.step_gamma ** torch.arange(k, dtype=torch.float32)
    dense = (dense.view(T, k, W) * disc[None, :, None]).sum(1)
    counts = {f"events/{n}": float((v != 0)[buf.live].float().sum()) for n, v in g_terms.items()}
    total = float(-g[buf.live].sum())
    counts.update({f"grounded_mass/{n}": float(-g_terms[n][buf.live].sum()) / total if total > 0 else 0.0
                   for n in GROUNDED_TERMS})
    return g * buf.live, dense * buf.live, counts


# ---------------------------------------------------------------------- trainer
class Trainer:
    """Holds policy, teacher, optimiser, method, collector and proxy; :meth:`run` trains ``cfg.iters``."""

    def __init__(self, init: str | os.PathLike, out: str | os.PathLike, cfg: FinetuneConfig = FinetuneConfig(),
                 device: str = "cpu", resume: bool = False, progress: bool = True):
        self.cfg = cfg
        self.out = Path(out)
        self.device = device
        self.progress = progress
        torch.manual_seed(cfg.seed)
        self.policy: CandidatePolicy = load_policy(init, family=cfg.family, device=device)
        self.init_path = str(init)
        self.teacher: CandidatePolicy = load_policy(init, device=device)
        self.teacher.requires_grad_(False)
        params = self.policy.freeze_for_finetuning()
        self.method = make_method(cfg.method, cfg, feature_dim=self.policy.cfg.encoder.d_model)
        for m in self.method.modules().values():
            params += list(m.parameters())
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        ratio = cfg.lr_end / cfg.lr

        def lr_at(it: int) -> float:  # cosine from lr to lr_end over the run, one step per iteration
            p = min(1.0, it / max(1, cfg.iters - 1))
            return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * p))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_at)
        self.collector = Collector(cfg.collector, device=device)
        self.proxy = CounterfactualWorld(self.collector.world.maps, cfg.proxy)
        self.mb_gen = torch.Generator().manual_seed(cfg.seed + 3)
        self.iteration = 0
        self.history: list[dict] = []
        self.nonfinite_run = 0
        if resume:
            self._load()

    # -------------------------------------------------------------- checkpoints
    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        meta = {"finetune": {"method": self.cfg.method, "iteration": self.iteration, "init": self.init_path}}
        trainable = set(self.policy.trainable_parameters())
        state = {
            "config": dataclasses.asdict(self.cfg), "iteration": self.iteration, "history": self.history,
            "teacher": {k: v for k, v in self.teacher.state_dict().items() if k in trainable},
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "method": {k: m.state_dict() for k, m in self.method.modules().items()},
            "collector": self.collector.state_dict(), "mb_gen": self.mb_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        atomic_save(state, self.out / "trainer.pt")  # trainer first: policy.pt marks a finished iteration
        self.policy.save(self.out / "policy.pt", meta={**getattr(self.policy, "meta", {}), **meta})

    def _load(self) -> None:
        path = self.out / "trainer.pt"
        if not path.exists():
            raise CraftError(f"--resume: '{self.out}' has no trainer.pt to resume from")
        st = torch.load(path, map_location="cpu", weights_only=False)
        if st["config"] != dataclasses.asdict(self.cfg):
            raise CraftError(f"--resume: '{self.out}' was started with a different configuration; use the same "
                             "arguments")
        self.policy.load_state_dict(load_policy(self.out / "policy.pt").state_dict())
        self.policy.freeze_for_finetuning()
        self.teacher.load_state_dict(st["teacher"], strict=False)
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        for k, m in self.method.modules().items():
            m.load_state_dict(st["method"][k])
        self.collector.load_state_dict(st["collector"])
        self.mb_gen.set_state(st["mb_gen"])
        torch.set_rng_state(st["torch_rng"])
        self.iteration = st["iteration"]
        self.history = st["history"]

    # -------------------------------------------------------------- one iteration
    def iterate(self) -> dict:
        cfg = self.cfg
        t0 = time.time()
        buf = self.collector.collect(self.policy)
        t1 = time.time()
        scores = None
        if self.method.uses_proxy:
            trk = TrackerState(buf.tracker["integral"], buf.tracker["prev_error"], buf.tracker["has_prev"])
            scores = self.proxy.score(buf.snapshot, buf.candidates.trajectories, buf.candidates.valid, trk)
        t2 = time.time()
        grounded, dense, counts = decision_rewards(buf, cfg)
        obs, valid = buf.obs, buf.candidates.valid
        N = buf.size
        with torch.no_grad():
            tlogits = torch.cat([self.teacher(obs.index(slice(i, i + 1024))).logits for i in range(0, N, 1024)])
            tlogq = masked_log_softmax(tlogits, valid)
            feats = torch.cat([self.policy.features(obs.index(slice(i, i + 1024))) for i in range(0, N, 1024)])
        data = IterationData(buf=buf, scores=scores, grounded=grounded, dense=dense, features=feats)
        targets = self.method.advantages(data)
        rows = {"chosen": buf.flat(buf.chosen), "logp_old": buf.flat(buf.logp_old), "valid": valid,
                "features": feats, "tlogq": tlogq, **targets}
        sums: dict[str, list] = {}
        self.policy.eval()
        for _ in range(cfg.epochs):
            perm = torch.randperm(N, generator=self.mb_gen)
            for i in range(0, N, cfg.minibatch):
                idx = perm[i:i + cfg.minibatch]
                mb = {k: v[idx] for k, v in rows.items()}
                cs = self.policy(obs.index(idx))
                logp = masked_log_softmax(cs.logits, mb["valid"])
                out = self.method.loss(logp, mb)
                rkl, fkl = kl_terms(logp, mb["tlogq"], mb["valid"])
                if cfg.use_distill:
                    out["loss_rkl"] = cfg.beta_reverse * rkl.mean()
                    out["loss_fkl"] = cfg.beta_forward * fkl.mean()
                out["kl_reverse"] = rkl.mean().detach()
                out["kl_forward"] = fkl.mean().detach()
                loss = sum(v for k, v in out.items() if k.startswith("loss_"))
                if not bool(torch.isfinite(loss)):
                    self.nonfinite_run += 1
                    sums.setdefault("skipped_share", []).append(1.0)
                    if self.nonfinite_run >= cfg.max_nonfinite:
                        raise CraftError(f"{self.nonfinite_run} optimiser steps in a row had a non-finite loss "
                                         f"(iteration {self.iteration + 1}; terms "
                                         f"{ {k: float(v.detach()) for k, v in out.items() if k.startswith('loss_')} }); "
                                         "lower the learning rate or check the rewards")
                    continue
                self.nonfinite_run = 0
                sums.setdefault("skipped_share", []).append(0.0)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]],
                                                    cfg.grad_clip)
                self.opt.step()
                out["loss"] = loss.detach()
                out["grad_norm"] = gn
                for k, v in out.items():
                    sums.setdefault(k, []).append(float(v.detach()))
        self.sched.step()
        self._ema()
        t3 = time.time()
        self.iteration += 1
        row = {"iteration": self.iteration, "transitions": N, "lr": self.opt.param_groups[0]["lr"],
               "t_collect": t1 - t0, "t_score": t2 - t1, "t_update": t3 - t2, "t_total": t3 - t0,
               **{k: sum(v) / len(v) for k, v in sums.items()}, **counts,
               "grounded_return_mean": float(grounded.sum() / max(1, N)),
               "dense_reward_mean": float(dense.sum() / max(1, N)),
               "episodes_ended": float((buf.events["done"].any(1) & buf.live).sum()), "waves": buf.info["waves_started"]}
        for k, v in targets.items():
            if k.startswith("adv") and v.numel():
                row[f"{k}_mean"], row[f"{k}_std"] = float(v.mean()), float(v.std()) if v.numel() > 1 else 0.0
        if scores is not None:
            row.update({f"proxy/{k}": float(v.sum() / valid.sum().clamp_min(1)) for k, v in scores.terms.items()})
            row.update({f"proxy/{k}": float(v) for k, v in scores.diagnostics.items()})
            row["proxy/return_mean"] = float(scores.returns.sum() / valid.sum().clamp_min(1))
        self.history.append(row)
        for key in ("kl_reverse", "kl_forward", "expected_adv"):  # the paper's stability measures
            series = torch.tensor([h[key] for h in self.history if key in h])
            if len(series):
                row[f"cv_{key}"] = coefficient_of_variation(series)
        return row

    @torch.no_grad()
    def _ema(self) -> None:
        m = self.cfg.ema
        tp = dict(self.teacher.named_parameters())
        for k, p in self.policy.trainable_parameters().items():
            tp[k].mul_(m).add_(p.detach(), alpha=1 - m)

    def run(self) -> list[dict]:
        from torch.utils.tensorboard import SummaryWriter

        self.out.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(self.out / "tb"))
        csv_path = self.out / "diagnostics.csv"
        bar = tqdm(total=self.cfg.iters, initial=self.iteration, desc=f"finetune {self.cfg.method}", unit="iter",
                   disable=not self.progress)
        try:
            while self.iteration < self.cfg.iters:
                row = self.iterate()
                self._save()
                _write_csv(csv_path, self.history)
                for k, v in row.items():
                    if k != "iteration" and isinstance(v, (int, float)):
                        writer.add_scalar(k if "/" in k else f"train/{k}", v, self.iteration)
                bar.update(1)
                bar.set_postfix(loss=f"{row.get('loss', 0):.3f}", s=f"{row['t_total']:.0f}")
        finally:
            bar.close()
            writer.close()
        return self.history


def _write_csv(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for h in history:
        keys += [k for k in h if k not in keys]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)


def finetune(init: str | os.PathLike, out: str | os.PathLike, cfg: FinetuneConfig = FinetuneConfig(),
             device: str = "cpu", resume: bool = False, progress: bool = True) -> list[dict]:
    """Fine-tune the policy checkpoint ``init`` into ``out``; returns the per-iteration diagnostics."""
    out = Path(out)
    if not resume and (out / "trainer.pt").exists():
        raise CraftError(f"'{out}' already holds a fine-tuning run: pass --resume to continue it or choose "
                         "another --out")
    return Trainer(init, out, cfg, device=device, resume=resume, progress=progress).run()


__all__ = ["FinetuneConfig", "Trainer", "finetune", "decision_rewards"]
