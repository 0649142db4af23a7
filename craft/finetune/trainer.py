"""The fine-tuning loop: ``craft finetune --method craft|grpo|ppo|reinforcepp --init CKPT --iters N --out DIR``.

One iteration (method section 6)::

    buffer  = collector.collect(policy)                      # on-policy, sampled from pi_old, >= B transitions
    scores  = proxy.score(buffer.snapshot, candidates)       # every candidate, H = 20 steps (if the method uses it)
    rewards = grounded (one indicator per decision and event) / dense rewards of the executed steps
    targets = method.advantages(...)
    for epoch, full minibatch:                                # only the family's fine-tuned subset trains
        loss = method.loss(...) + beta_r KL(pi || teacher) + beta_f KL(teacher || pi)
        AdamW step (grad-norm clip) [teacher <- EMA per step with ``teacher_per_step``]
    lr schedule step; teacher <- EMA(teacher, policy) on the trainable subset (per iteration by default)
    probe-set diagnostics; every ``val_every`` iterations a closed-loop ``val`` evaluation

Choices where the paper is silent (fields of :class:`FinetuneConfig`): 2 epochs of 512-transition minibatches
per iteration; cosine learning-rate decay from 1e-4 to 5e-6 over ``iters`` iterations (one step per
iteration); PPO: GAE lambda 0.95, value clip 0.2, SmoothL1 value loss weight 0.5, critic on the detached scene
summary with the policy's optimiser; the decision-level discount is gamma^k with gamma = 0.98 per 0.1 s step
and k = 5 steps per decision (the same time scale as the proxy).

Outputs in ``DIR``: ``trainer.pt`` (the run's one resume record: policy checkpoint, teacher, optimiser,
scheduler, method modules, collector state, RNG states, iteration, history), ``policy.pt`` (the policy
checkpoint, an export of the record), ``probe.pt`` (the probe set, also in the record), ``diagnostics.csv``,
TensorBoard logs under ``tb/`` (one event file per iteration) and the periodic validations under ``val/``.
Every iteration's files are written into a staging folder beside ``DIR`` and moved in together (the record
first), so a write that fails (disk full, file-size limit) leaves ``DIR`` as it was after the previous
iteration, and ``--resume DIR`` reads one file and cannot mix iterations: a ``policy.pt`` left behind by a
crash between the moves is rewritten from the record, one that is ahead of it or from another run is refused.
The record also holds the SHA-256 of the ``--init`` file and the worker count: ``--resume`` with another
init, configuration or ``--workers`` is refused before anything starts. A resumed run ends identical to an
uninterrupted run (CPU); ``--iters`` may be raised on resume (the cosine schedule then runs to the new end from
the iteration reached). Nothing is written into ``DIR`` before the first iteration has finished.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from craft.checks import LR_MAX, check_finite_fields, check_range, check_seed
from craft.errors import CraftError
from craft.files import check_out_dir, load_torch, staged_folder, write_text
from craft.finetune.collector import Collector, CollectorConfig
from craft.finetune.losses import coefficient_of_variation, kl_terms, masked_log_softmax
from craft.finetune.methods import METHODS, IterationData, make_method
from craft.finetune.proxy import CounterfactualWorld, ProxyConfig
from craft.finetune.rewards import GROUNDED_TERMS, RewardConfig, dense_reward_from_events, grounded_decision_reward
from craft.policies.base import (CandidatePolicy, atomic_save, check_finite_weights, load_policy,
                                 policy_from_checkpoint, read_checkpoint)
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
    """Teacher EMA momentum m per update (the paper's 0.99 per iteration, meant for runs of hundreds of
    iterations); ignored when ``teacher_half_life`` is set."""
    teacher_half_life: float = 0.0
    """Budget-aware teacher: when > 0, the teacher's EMA half-life as a share of the run (of its ``iters``
    iterations, or of its optimiser steps with ``teacher_per_step``): m = 0.5 ** (1 / (share * updates))."""
    teacher_per_step: bool = False
    """Update the EMA teacher after every optimiser step instead of once per iteration."""
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
    probe_states: int = 256
    """Visited states of the first buffer kept as a fixed probe set (scored once by the proxy) on which every
    iteration logs KL to the initial policy and to the teacher, the proxy-advantage and top-1-return gains and
    the share of changed top-1 picks (``probe/*`` diagnostics); 0 = off."""
    val_every: int = 0
    """Closed-loop evaluation of the policy on a ``val`` subset every this many iterations and after the last
    one (``val/*`` diagnostics; the policy of each is kept under ``val/it-NNNN/``); 0 = off."""
    val_routes: int = 1
    """Routes per scenario type of the periodic ``val`` evaluation."""
    val_types: tuple[str, ...] | None = None
    """Scenario types of the periodic ``val`` evaluation (default: all)."""
    val_seed: int = 0
    """Background-traffic seed of the periodic ``val`` evaluation."""
    val_max_steps: int | None = None
    """Tick cap of the periodic ``val`` evaluation's routes (default: Bench2Drive's)."""
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
        self._validate()

    def _validate(self) -> None:
        """Every number finite and in range (collector, proxy and reward fields included); one line naming
        the field otherwise."""
        check_finite_fields(self)
        n = "FinetuneConfig."
        for f in ("iters", "epochs", "minibatch", "max_nonfinite"):
            check_range(n + f, getattr(self, f), 1, integer=True)
        check_seed(n + "seed", self.seed)
        check_range(n + "lr", self.lr, 0, LR_MAX, lo_open=True)
        check_range(n + "lr_end", self.lr_end, 0, LR_MAX)
        for f in ("weight_decay", "w_cp", "w_gr", "beta_reverse", "beta_forward", "value_coef"):
            check_range(n + f, getattr(self, f), 0)
        check_range(n + "grad_clip", self.grad_clip, 0, lo_open=True)
        check_range(n + "ema", self.ema, 0, 1, hi_open=True)
        check_range(n + "clip_eps", self.clip_eps, 0, 1, lo_open=True, hi_open=True)
        check_range(n + "dual_clip", self.dual_clip, 1, lo_open=True)
        check_range(n + "gae_lambda", self.gae_lambda, 0, 1)
        check_range(n + "value_clip", self.value_clip, 0, lo_open=True)
        check_range(n + "step_gamma", self.step_gamma, 0, 1, lo_open=True)
        c, n = self.collector, "CollectorConfig."
        for f in ("worlds", "buffer_size", "replan_every"):
            check_range(n + f, getattr(c, f), 1, integer=True)
        if c.routes is not None:
            check_range(n + "routes", c.routes, 1, integer=True)
        check_seed(n + "seed", c.seed)
        for s in c.town_seeds or ():
            check_seed(n + "town_seeds", s)
        p, n = self.proxy, "ProxyConfig."
        check_range(n + "horizon", p.horizon, 1, integer=True)
        check_range(n + "dt", p.dt, 0, lo_open=True)
        check_range(n + "chunk_states", p.chunk_states, 1, integer=True)
        check_range("RewardConfig.gamma", p.reward.gamma, 0, 1, lo_open=True)
        check_range(n + "teacher_half_life", self.teacher_half_life, 0)
        check_range(n + "probe_states", self.probe_states, 0, integer=True)
        check_range(n + "val_every", self.val_every, 0, integer=True)
        check_range(n + "val_routes", self.val_routes, 1, integer=True)
        check_seed(n + "val_seed", self.val_seed)
        if self.val_max_steps is not None:
            check_range(n + "val_max_steps", self.val_max_steps, 1, integer=True)
        if isinstance(self.val_types, list):
            object.__setattr__(self, "val_types", tuple(self.val_types))

    @property
    def reward(self) -> RewardConfig:
        return self.proxy.reward

    @property
    def steps_per_iteration(self) -> int:
        """Optimiser steps of an iteration of exactly ``buffer_size`` transitions (full minibatches only)."""
        return self.epochs * max(1, self.collector.buffer_size // self.minibatch)

    @property
    def teacher_momentum(self) -> float:
        """The EMA momentum m of one teacher update (per iteration, or per optimiser step with
        ``teacher_per_step``): ``ema``, or from ``teacher_half_life`` as a share of the run's updates."""
        if self.teacher_half_life <= 0:
            return self.ema
        updates = self.iters * (self.steps_per_iteration if self.teacher_per_step else 1)
        return 0.5 ** (1.0 / (self.teacher_half_life * updates))

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
    dev = buf.live.device
    start = torch.zeros(T * k, W, dtype=torch.bool, device=dev)  # first step of an episode in this buffer
    prev_nd = torch.cat([torch.zeros(1, W, dtype=torch.bool, device=dev), buf.notdone[:-1]])
    start[::k] = ~prev_nd
    dense = torch.zeros(T * k, W, device=dev)
    prev = None
    collided = torch.zeros(W, dtype=torch.bool, device=dev)
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
    disc = cfg.step_gamma ** torch.arange(k, dtype=torch.float32, device=dev)
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
                 device: str = "cpu", resume: bool = False, progress: bool = True, workers: int = 1,
                 address: str | None = None, compile_proxy: bool = False):
        """workers > 1 (or an ``address``): collection and proxy scoring on Ray actors
        (:mod:`craft.finetune.distributed`); 1: in this process. compile_proxy: the counterfactual world's
        kernels through ``torch.compile`` (``CounterfactualWorld(..., compile=True)``), in every worker."""
        self.cfg = cfg
        self.out = Path(out)
        self.device = device
        self.progress = progress
        torch.manual_seed(cfg.seed)
        self.policy: CandidatePolicy = load_policy(init, family=cfg.family, device=device)
        self.init_path = str(init)
        self.init_sha256 = init_digest(init)
        record = self._check_record(workers if address is None else None) if resume else None
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
        if workers > 1 or address is not None:  # the collector is a set of Ray actors (same interface)
            from craft.finetune.distributed import RayCollector

            self.collector = RayCollector(self.policy, cfg, workers, device=device, address=address,
                                          compile_proxy=compile_proxy)
            self.proxy = None
        else:
            self.collector = Collector(cfg.collector, device=device)
            self.proxy = CounterfactualWorld(self.collector.world.maps, cfg.proxy, compile=compile_proxy)
        self.learner_threads = min(workers, os.cpu_count() or 1) if address is None else 1
        """Torch threads of the update (at least the process's own): the local Ray workers' cores are idle
        while the driver learns."""
        self.mb_gen = torch.Generator().manual_seed(cfg.seed + 3)
        self.iteration = 0
        self.history: list[dict] = []
        self.nonfinite_run = 0
        self.probe: dict | None = None
        if resume:
            try:
                self._load(record)
                if self.probe is None and (self.out / "probe.pt").exists():  # a record of an older version
                    self.probe = {k: v.to(device) if isinstance(v, torch.Tensor) else
                                  {kk: vv.to(device) for kk, vv in v.items()}
                                  for k, v in load_torch(self.out / "probe.pt", "probe set (probe.pt)").items()}
            except BaseException:
                self.close()  # no Ray workers left behind
                raise

    # -------------------------------------------------------------- checkpoints
    def _save(self, row: dict | None = None, stage: Path | None = None) -> None:
        """Write this iteration's record ``trainer.pt`` (everything, the policy included), the exports
        ``policy.pt``, ``probe.pt`` and ``diagnostics.csv`` (derived from the record, so rewritten on resume) and
        the TensorBoard event file of ``row`` (default: the last diagnostics row) into the staging folder
        ``stage`` (default: one of its own), moved into ``out`` together, the record first."""
        from torch.utils.tensorboard import SummaryWriter

        if stage is None:
            with staged_folder(self.out, first=("trainer.pt",), last=("policy.pt",)) as stage:
                return self._save(row, stage)
        row = row if row is not None else (self.history[-1] if self.history else {})

        meta = {"finetune": {"method": self.cfg.method, "iteration": self.iteration, "init": self.init_path}}
        policy_ck = self.policy.checkpoint(meta={**getattr(self.policy, "meta", {}), **meta})
        check_finite_weights(policy_ck["state_dict"], f"iteration {self.iteration}: refusing to save the policy")
        trainable = set(self.policy.trainable_parameters())
        state = {
            "format": STATE_FORMAT, "format_version": STATE_VERSION,
            "config": dataclasses.asdict(self.cfg), "iteration": self.iteration, "history": self.history,
            "policy": policy_ck,
            "teacher": {k: v for k, v in self.teacher.state_dict().items() if k in trainable},
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "method": {k: m.state_dict() for k, m in self.method.modules().items()},
            "collector": self.collector.state_dict(), "mb_gen": self.mb_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "init": {"path": self.init_path, "sha256": self.init_sha256}, "probe": self.probe,
        }
        atomic_save(state, stage / "trainer.pt")  # the record first: it alone is read on resume
        self._export(policy_ck, stage)
        writer = SummaryWriter(str(stage / "tb"))
        for k, v in row.items():
            if k != "iteration" and isinstance(v, (int, float)):
                writer.add_scalar(k if "/" in k else f"train/{k}", v, self.iteration)
        writer.close()

    def _export(self, policy_ck: dict, folder: Path) -> None:
        atomic_save(policy_ck, folder / "policy.pt")
        if self.probe is not None:
            atomic_save(self.probe, folder / "probe.pt")
        _write_csv(folder / "diagnostics.csv", self.history)

    def _check_record(self, workers: int | None) -> dict:
        """The record of the run in ``out``, checked against this one before anything starts: configuration
        (only ``iters`` may change, and not below what was done), the ``--init`` file by content, and the
        worker count (``workers``; None: a Ray cluster, checked when it joins)."""
        path = self.out / "trainer.pt"
        if not path.exists():
            raise CraftError(f"--resume: '{self.out}' has no trainer.pt to resume from")
        st = read_state(path)
        saved = dict(st["config"])
        now = dataclasses.asdict(self.cfg)
        if {k: v for k, v in saved.items() if k != "iters"} != {k: v for k, v in now.items() if k != "iters"}:
            diff = sorted(k for k in set(saved) | set(now) if k != "iters" and saved.get(k) != now.get(k))
            raise CraftError(f"--resume: '{self.out}' was started with a different configuration "
                             f"({', '.join(diff)} differ); use the same arguments (only --iters may change)")
        if st["iteration"] > self.cfg.iters:
            raise CraftError(f"--resume: '{self.out}' has already done {st['iteration']} iterations, more than "
                             f"--iters {self.cfg.iters}; pass --iters {st['iteration']} or more")
        rec_init = st.get("init") if isinstance(st.get("init"), dict) else {}
        if rec_init.get("sha256") not in (None, self.init_sha256):
            raise CraftError(f"--resume: '{self.out}' was started from another --init ('{rec_init.get('path')}', "
                             f"SHA-256 {str(rec_init.get('sha256'))[:12]}...; '{self.init_path}' has "
                             f"{self.init_sha256[:12]}...); pass the --init it was started from")
        if rec_init.get("path"):
            self.init_path = str(rec_init["path"])  # the run's own init, kept in the exports' meta
        col = st.get("collector")
        done_with = col.get("workers", 1) if isinstance(col, dict) else 1
        if workers is not None and done_with != workers:
            raise CraftError(f"--resume: '{self.out}' was collected with --workers {done_with}; resume it with "
                             f"--workers {done_with} (got {workers})")
        return st

    def _load(self, st: dict) -> None:
        path = self.out / "trainer.pt"
        saved = dict(st["config"])
        where = f"{path} (its policy)"
        try:
            if "policy" in st:
                ck = st["policy"]
                self.policy.load_state_dict(policy_from_checkpoint(ck, family=self.policy.family,
                                                                   where=where).state_dict())
                self._check_pair(ck, st["iteration"])
            else:  # a record of an older version: its policy is policy.pt, which must be of the same iteration
                ck = read_checkpoint(self.out / "policy.pt")
                self._check_pair(ck, st["iteration"], legacy=True)
                self.policy.load_state_dict(policy_from_checkpoint(ck, family=self.policy.family,
                                                                   where=str(self.out / "policy.pt")).state_dict())
            self.policy.freeze_for_finetuning()
            self.teacher.load_state_dict(st["teacher"], strict=False)
            self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
            for k, m in self.method.modules().items():
                m.load_state_dict(st["method"][k])
            self.collector.load_state_dict(st["collector"])
            self.mb_gen.set_state(st["mb_gen"])
            torch.set_rng_state(st["torch_rng"])
            if isinstance(st.get("probe"), dict):
                self.probe = {k: v.to(self.device) if isinstance(v, torch.Tensor) else
                              {kk: vv.to(self.device) for kk, vv in v.items()} for k, v in st["probe"].items()}
        except CraftError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            raise CraftError(f"--resume: '{path}' does not fit this run ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else 'bad contents'}); start a new --out"
                             ) from None
        self.iteration = int(st["iteration"])
        self.history = list(st["history"])
        if saved.get("iters") != self.cfg.iters:  # --iters raised: the cosine schedule ends at the new last one
            for g, base, lam in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
                g["lr"] = base * lam(self.iteration)
            self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        if "policy" in st:
            with staged_folder(self.out, last=()) as stage:  # policy.pt / diagnostics.csv of exactly this record
                self._export(st["policy"], stage)

    def _check_pair(self, record_ck: dict, iteration: int, legacy: bool = False) -> None:
        """Refuse a ``policy.pt`` that cannot belong with the record of ``iteration``; one that is behind the
        record (a crash between the writes) is fine: it is rewritten from the record."""
        path = self.out / "policy.pt"
        if legacy:
            it = (record_ck.get("meta") or {}).get("finetune", {}).get("iteration")
            if it != iteration:
                raise CraftError(f"--resume: '{path}' is at iteration {it} but trainer.pt at {iteration}: the pair "
                                 "is inconsistent (an interrupted write of an older version); start a new --out")
            return
        if not path.exists():
            return
        try:
            ck = read_checkpoint(path)
        except CraftError as e:
            raise CraftError(f"--resume: {e}; delete it to have it rewritten from trainer.pt") from None
        it = (ck.get("meta") or {}).get("finetune", {}).get("iteration")
        if not isinstance(it, int):
            raise CraftError(f"--resume: '{path}' is not a checkpoint of this fine-tuning run (no iteration in "
                             "its meta); delete it to have it rewritten from trainer.pt")
        if it > iteration:
            raise CraftError(f"--resume: '{path}' is at iteration {it}, ahead of trainer.pt at iteration "
                             f"{iteration}: the files are from different runs or iterations; start a new --out")
        if it == iteration:
            a, b = ck["state_dict"], record_ck["state_dict"]
            if set(a) != set(b) or not all(torch.equal(a[k], b[k]) for k in a):
                raise CraftError(f"--resume: '{path}' and trainer.pt are both at iteration {iteration} but hold "
                                 "different weights (files from different runs); start a new --out")

    # -------------------------------------------------------------- one iteration
    def iterate(self) -> dict:
        t0 = time.time()
        buf, scores, t_split = self.collect_and_score()
        threads = torch.get_num_threads()
        if self.learner_threads > threads:  # the local Ray workers wait meanwhile: their cores do the update
            torch.set_num_threads(self.learner_threads)
        try:
            return self._learn(buf, scores, t_split, t0)
        finally:
            torch.set_num_threads(threads)

    def _learn(self, buf, scores, t_split: dict, t0: float) -> dict:
        """Rewards, advantages and the policy update of one iteration's buffer; the diagnostics row."""
        cfg = self.cfg
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
        if self.probe is None and cfg.probe_states > 0 and (scores is not None or buf.snapshot is not None):
            self._make_probe(buf, scores)  # (Ray workers score PPO / REINFORCE++ buffers nowhere: no probe)
        sums: dict[str, list] = {}
        self.policy.eval()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        mb_size = min(cfg.minibatch, N)
        first = True
        for _ in range(cfg.epochs):
            perm = torch.randperm(N, generator=self.mb_gen)
            for i in range(0, N - mb_size + 1, mb_size):  # full minibatches only: a partial last one is dropped
                idx = perm[i:i + mb_size]
                mb = {k: v[idx] for k, v in rows.items()}
                ob = obs.index(idx)
                if cfg.teacher_per_step:  # the teacher moved since the iteration began: its current targets
                    with torch.no_grad():
                        mb["tlogq"] = masked_log_softmax(self.teacher(ob).logits, mb["valid"])
                cs = self.policy(ob)
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
                if first:  # the gradient-norm share of each loss term, on the iteration's first minibatch
                    for k, v in grad_shares(out, params).items():
                        sums[f"gradshare/{k}"] = [v]
                    first = False
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                self.opt.step()
                if cfg.teacher_per_step:
                    self._ema()
                out["loss"] = loss.detach()
                out["grad_norm"] = gn
                for k, v in out.items():
                    sums.setdefault(k, []).append(float(v.detach()))
        self.sched.step()
        if not cfg.teacher_per_step:
            self._ema()
        probe_row = self._probe_row() if self.probe is not None else {}
        t3 = time.time()
        self.iteration += 1
        row = {"iteration": self.iteration, "transitions": N, "lr": self.opt.param_groups[0]["lr"],
               **t_split, "t_update": t3 - t2, "t_total": t3 - t0,
               **{k: sum(v) / len(v) for k, v in sums.items()}, **counts,
               "grounded_return_mean": float(grounded.sum() / max(1, N)),
               "dense_reward_mean": float(dense.sum() / max(1, N)),
               "episodes_ended": float((buf.events["done"].any(1) & buf.live).sum()), "waves": buf.info["waves_started"],
               "teacher_momentum": cfg.teacher_momentum, **probe_row}
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

    def collect_and_score(self):
        """The next on-policy buffer and, when the method uses the proxy, its counterfactual scores.

        Returns ``(buffer, scores or None, timings)``; timings hold ``t_collect`` and ``t_score`` (seconds)
        and, with Ray workers, their ``workers/*`` diagnostics (:class:`~craft.finetune.distributed.RayCollector`
        collects and scores on every worker at once)."""
        if self.proxy is None:
            return self.collector.collect_and_score(self.policy, self.method.uses_proxy)
        t0 = time.time()
        buf = self.collector.collect(self.policy)
        t1 = time.time()
        scores = None
        if self.method.uses_proxy:
            trk = TrackerState(buf.tracker["integral"], buf.tracker["prev_error"], buf.tracker["has_prev"])
            scores = self.proxy.score(buf.snapshot, buf.candidates.trajectories, buf.candidates.valid, trk)
        return buf, scores, {"t_collect": t1 - t0, "t_score": time.time() - t1}

    def close(self) -> None:
        """Stop the Ray workers, if any (and the local Ray instance this trainer started)."""
        if hasattr(self.collector, "close"):
            self.collector.close()

    # -------------------------------------------------------------- probe set
    def _make_probe(self, buf, scores) -> None:
        """Keep ``probe_states`` states of the first buffer (seeded draw), scored once by the proxy, with the
        initial policy's log-probabilities; saved to ``probe.pt`` (a resumed run reads it back)."""
        cfg = self.cfg
        N = buf.size
        g = torch.Generator().manual_seed(cfg.seed + 7)
        idx = torch.randperm(N, generator=g)[:min(cfg.probe_states, N)].sort().values
        traj, valid = buf.candidates.trajectories[idx], buf.candidates.valid[idx]
        if scores is None:
            trk = TrackerState(*(buf.tracker[k][idx] for k in ("integral", "prev_error", "has_prev")))
            scores = self.proxy.score(buf.snapshot.index(idx), traj, valid, trk)
            ret, adv = scores.returns, scores.advantages
        else:
            ret, adv = scores.returns[idx], scores.advantages[idx]
        obs = buf.obs.index(idx)
        with torch.no_grad():
            logp0 = masked_log_softmax(self.policy(obs).logits, valid)
        self.probe = {"obs": {f.name: getattr(obs, f.name) for f in dataclasses.fields(obs)}, "valid": valid,
                      "returns": ret, "adv": adv, "logp0": logp0}  # saved with the iteration's record

    @torch.no_grad()
    def _probe_row(self) -> dict:
        """The probe diagnostics of the current policy (after the iteration's update and teacher update)."""
        from craft.world.observe import Observation

        p = self.probe
        obs, valid = Observation(**p["obs"]), p["valid"]
        logp = masked_log_softmax(self.policy(obs).logits, valid)
        logq = masked_log_softmax(self.teacher(obs).logits, valid)
        return probe_metrics(logp, p["logp0"], logq, valid, p["returns"], p["adv"])

    # -------------------------------------------------------------- periodic closed-loop validation
    def _validate(self, stage: Path) -> dict:
        """Closed-loop evaluation of the current policy on the ``val`` subset (one b2d rollout scored under both
        protocols); its policy and results stay under ``val/it-NNNN/`` (written into the iteration's staging
        folder ``stage`` unless ``out`` holds them already). ``val/DS``, ``val/SR`` are b2d-star."""
        import json

        from craft.bench.metrics import load_results
        from craft.bench.runner import EvalConfig, evaluate, make_driver

        cfg = self.cfg
        t0 = time.time()
        folder = self.out / "val" / f"it-{self.iteration:04d}"
        files = {p: folder / p / "results.json" for p in ("b2d-star", "b2d")}
        if not all(f.exists() for f in files.values()):
            folder = stage / "val" / f"it-{self.iteration:04d}"
            files = {p: folder / p / "results.json" for p in ("b2d-star", "b2d")}
            self.policy.save(folder / "policy.pt", meta={**getattr(self.policy, "meta", {}),
                                                         "finetune": {"method": cfg.method,
                                                                      "iteration": self.iteration}})
            with torch.random.fork_rng():
                evaluate(make_driver(str(folder / "policy.pt")), "val", folder / "b2d",
                         EvalConfig(protocol="b2d", seed=cfg.val_seed, max_steps=cfg.val_max_steps),
                         routes=cfg.val_routes, types=list(cfg.val_types) if cfg.val_types else None,
                         also={"b2d-star": folder / "b2d-star"})
        out = {}
        for proto, f in files.items():
            summ = load_results(f)["summary"]
            suffix = "" if proto == "b2d-star" else "_b2d"
            out[f"val/DS{suffix}"], out[f"val/SR{suffix}"] = float(summ["DS"]), float(summ["SR"])
        out["t_val"] = time.time() - t0
        return out

    @torch.no_grad()
    def _ema(self) -> None:
        m = self.cfg.teacher_momentum
        tp = dict(self.teacher.named_parameters())
        for k, p in self.policy.trainable_parameters().items():
            tp[k].mul_(m).add_(p.detach(), alpha=1 - m)

    def run(self) -> list[dict]:
        """Train to ``cfg.iters``; each iteration's files reach ``out`` together (see the module docstring), so
        a run that fails in its first iteration leaves ``out`` untouched."""
        bar = tqdm(total=self.cfg.iters, initial=self.iteration, desc=f"finetune {self.cfg.method}", unit="iter",
                   disable=not self.progress)
        try:
            while self.iteration < self.cfg.iters:
                row = self.iterate()
                with staged_folder(self.out, first=("trainer.pt",), last=("policy.pt",)) as stage:
                    if self.cfg.val_every and (self.iteration % self.cfg.val_every == 0
                                               or self.iteration == self.cfg.iters):
                        row.update(self._validate(stage))
                    self._save(row, stage)
                bar.update(1)
                bar.set_postfix(loss=f"{row.get('loss', 0):.3f}", s=f"{row['t_total']:.0f}")
        finally:
            bar.close()
            self.close()
        return self.history


def grad_shares(out: dict, params: list) -> dict[str, float]:
    """Share of each ``loss_*`` term of ``out`` in the sum of the terms' gradient norms over ``params``."""
    norms = {}
    for k, v in out.items():
        if not k.startswith("loss_") or not v.requires_grad:
            continue
        gs = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
        norms[k[5:]] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs if g is not None)
                                        + torch.zeros((), dtype=torch.float64)))
    total = sum(norms.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in norms.items()}


def probe_metrics(logp: torch.Tensor, logp0: torch.Tensor, logq: torch.Tensor, valid: torch.Tensor,
                  returns: torch.Tensor, adv: torch.Tensor) -> dict[str, float]:
    """Learning diagnostics on the fixed probe states (all (n, G); masked log-probabilities).

    ``probe/kl_init`` KL(pi || initial policy) and ``probe/kl_teacher`` KL(pi || teacher), means over states;
    ``probe/adv_gain``: E_pi[A] - E_init[A] of the proxy's group-normalised advantage;
    ``probe/top1_return_gain``: mean proxy return of pi's top-1 candidate minus the initial top-1's;
    ``probe/top1_changed``: share of states whose top-1 candidate changed."""
    kl_init = kl_terms(logp, logp0, valid)[0].mean()
    kl_teacher = kl_terms(logp, logq, valid)[0].mean()
    gain = ((logp.exp() - logp0.exp()) * adv).sum(-1).mean()
    t1, t0 = logp.argmax(-1), logp0.argmax(-1)
    r1, r0 = returns.gather(1, t1[:, None]).squeeze(1), returns.gather(1, t0[:, None]).squeeze(1)
    return {"probe/kl_init": float(kl_init), "probe/kl_teacher": float(kl_teacher), "probe/adv_gain": float(gain),
            "probe/top1_return_gain": float((r1 - r0).mean()), "probe/top1_changed": float((t1 != t0).float().mean())}


def _write_csv(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for h in history:
        keys += [k for k in h if k not in keys]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    write_text(path, buf.getvalue())


STATE_FORMAT = "craft-finetune-state"
STATE_VERSION = 2
"""2: the record holds the policy checkpoint (1, unversioned: policy.pt beside it was the policy)."""


def _state_classes() -> list[type]:
    """Project data classes a ``trainer.pt`` may hold (the collector's running wave); plain tensors otherwise."""
    from craft.scenarios.script import ScriptTable
    from craft.world.state import WorldState

    return [WorldState, ScriptTable, TrackerState]


def read_state(path: str | os.PathLike) -> dict:
    """A fine-tuning record ``trainer.pt`` read safely (weights_only, the project's state classes allowed) and
    checked for its keys; one-line CraftError otherwise."""
    st = load_torch(path, "fine-tuning state (trainer.pt)", allow=_state_classes())
    need = ("config", "iteration", "history", "teacher", "optimizer", "scheduler", "method", "collector",
            "mb_gen", "torch_rng")
    if not isinstance(st, dict) or any(k not in st for k in need):
        raise CraftError(f"'{path}' is not a complete fine-tuning state (trainer.pt); start a new --out")
    if st.get("format_version", 1) not in (1, STATE_VERSION) or not isinstance(st["config"], dict) \
            or not isinstance(st["iteration"], int) or st["iteration"] < 0 or not isinstance(st["history"], list) \
            or not all(isinstance(h, dict) for h in st["history"]):
        raise CraftError(f"'{path}' is not a fine-tuning state this build reads (version "
                         f"{st.get('format_version', 1)}); start a new --out")
    return st


def init_digest(init: str | os.PathLike) -> str:
    """SHA-256 of the policy checkpoint file ``init`` (a folder: its ``policy.pt``), as a fine-tuning record
    keeps it."""
    import hashlib

    from craft.policies.base import checkpoint_file

    return hashlib.sha256(checkpoint_file(init).read_bytes()).hexdigest()


def saved_iteration(out: str | os.PathLike) -> int | None:
    """Iterations done by the run in ``out`` (None: no run there)."""
    path = Path(out) / "trainer.pt"
    return int(read_state(path)["iteration"]) if path.exists() else None


def finetune(init: str | os.PathLike, out: str | os.PathLike, cfg: FinetuneConfig = FinetuneConfig(),
             device: str = "cpu", resume: bool = False, progress: bool = True, workers: int = 1,
             address: str | None = None, compile_proxy: bool = False) -> list[dict]:
    """Fine-tune the policy checkpoint ``init`` into ``out``; returns the per-iteration diagnostics.
    ``workers`` / ``address``: Ray collection; ``compile_proxy``: compiled proxy kernels (see :class:`Trainer`)."""
    out = check_out_dir(out)
    if not resume and (out / "trainer.pt").exists():
        raise CraftError(f"'{out}' already holds a fine-tuning run: pass --resume to continue it or choose "
                         "another --out")
    return Trainer(init, out, cfg, device=device, resume=resume, progress=progress, workers=workers,
                   address=address, compile_proxy=compile_proxy).run()


__all__ = ["FinetuneConfig", "Trainer", "finetune", "decision_rewards", "grad_shares", "probe_metrics",
           "read_state", "saved_iteration"]
