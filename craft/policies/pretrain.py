"""Open-loop imitation pre-training: ``craft pretrain --family vocab|hier|vla --data DATA --out CKPT``.

Trains a freshly built policy of the family on expert demonstrations (:mod:`craft.policies.data`) with the
family's :meth:`~craft.policies.base.CandidatePolicy.imitation_loss` (cross-entropy to the nearest candidate or
decision, regression for candidate generators). The ``vocab`` family first builds its 512-trajectory
vocabulary by k-means over the training demonstrations' expert trajectories.

Demonstrations are split by route: a deterministic ``val_fraction`` of the routes is held out for the
open-loop metrics (top-1 L2 to the expert at 1 / 2 / 3 s and candidate classification accuracy).

The output folder holds ``state.pt`` (the one resume record: the policy checkpoint, optimizer, scheduler,
step, RNG states), ``policy.pt`` (the policy checkpoint, exported from the record), ``metrics.csv``,
``openloop.json`` (written last) and TensorBoard logs under ``tb/``. Every ``ckpt_every`` steps and at the end
the record, ``policy.pt``, ``metrics.csv`` (every row logged up to the record) and a TensorBoard event file of
the rows since the previous record are written into a staging folder beside the output and moved in together
(the record first), so a write that fails leaves the folder at its previous record, or untouched before the
first. ``--resume`` reads the record alone (so the pair cannot mix steps), is refused if the demonstrations
file differs from the one the run started with (SHA-256 in the record), rewrites ``policy.pt`` from it, keeps
the ``metrics.csv`` rows up to it (no duplicates) and may raise ``--steps``.
"""

from __future__ import annotations

import csv
import hashlib
import dataclasses
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from craft.checks import LR_MAX, check_finite_fields, check_range, check_seed
from craft.errors import CraftError
from craft.files import check_out_dir, load_torch, staged_folder, write_json, write_text
from craft.policies.base import (CandidatePolicy, atomic_save, build_policy, check_finite_weights, load_policy,
                                 policy_from_checkpoint)
from craft.policies.data import demo_batch, load_demos


@dataclass(frozen=True)
class PretrainConfig:
    family: str = "vocab"
    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 256
    lr: float = 1e-3
    """Peak learning rate (linear warm-up over ``warmup`` steps, then cosine decay to ``lr * 0.05``)."""
    warmup: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0
    val_fraction: float = 0.05
    """Share of the demonstration routes held out for open-loop metrics."""
    ckpt_every: int = 500
    log_every: int = 25
    kmeans_iters: int = 30
    """Lloyd iterations of the vocabulary k-means (vocab family)."""

    def __post_init__(self):
        check_finite_fields(self)
        n = "PretrainConfig."
        for f in ("steps", "batch_size", "ckpt_every", "log_every", "kmeans_iters"):
            check_range(n + f, getattr(self, f), 1, integer=True)
        check_range(n + "warmup", self.warmup, 0, integer=True)
        check_range(n + "lr", self.lr, 0, LR_MAX, lo_open=True)
        check_range(n + "weight_decay", self.weight_decay, 0)
        check_range(n + "grad_clip", self.grad_clip, 0, lo_open=True)
        check_seed(n + "seed", self.seed)
        check_range(n + "val_fraction", self.val_fraction, 0, 1, lo_open=True, hi_open=True)


def split_routes(data: dict, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample indices (train, val), holding out whole routes (deterministic given ``seed``)."""
    n_routes = int(data["route"].max()) + 1
    g = torch.Generator().manual_seed(seed + 7919)
    perm = torch.randperm(n_routes, generator=g)
    n_val = max(1, int(round(n_routes * val_fraction)))
    is_val = torch.zeros(n_routes, dtype=torch.bool)
    is_val[perm[:n_val]] = True
    v = is_val[data["route"]]
    return torch.nonzero(~v).squeeze(1), torch.nonzero(v).squeeze(1)


def _lr_lambda(cfg: PretrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))
    return f


@torch.no_grad()
def open_loop_metrics(policy: CandidatePolicy, data: dict, idx: torch.Tensor, batch: int = 512) -> dict:
    """Top-1 L2 to the expert at 1 / 2 / 3 s (waypoints 2, 4, 6), mean over ``idx``; accuracy = top-1 is the
    candidate nearest the expert (mean waypoint distance); ``oracle_l2_3s``: the best candidate's L2 at 3 s;
    ``entropy`` (nats) and ``top1_prob``: the scorer's distribution over the valid candidates (how peaked)."""
    from craft.policies.vocab import mean_l2

    policy.eval()
    if len(idx) == 0:  # nothing held out: no figures
        return {k: math.nan for k in ("l2_1s", "l2_2s", "l2_3s", "accuracy", "oracle_l2_3s", "entropy",
                                      "top1_prob")} | {"samples": 0}
    sums = torch.zeros(7, dtype=torch.float64)
    for part in idx.split(batch):
        obs, expert = demo_batch(data, part)
        cs = policy(obs)
        top = cs.select(cs.top1())
        d = (top[..., :2] - expert[..., :2]).norm(dim=-1)  # (b, T)
        dist_all = mean_l2(cs.trajectories, expert[:, None]).masked_fill(~cs.valid, float("inf"))
        best = dist_all.argmin(-1)
        end_all = (cs.trajectories[..., -1, :2] - expert[:, None, -1, :2]).norm(dim=-1)
        oracle = end_all.gather(1, best[:, None]).squeeze(1)
        lp = cs.log_probs()
        p = lp.exp()
        ent = -(p * lp).masked_fill(~cs.valid, 0.0).sum(-1)
        sums += torch.stack([d[:, 1].sum(), d[:, 3].sum(), d[:, 5].sum(), (cs.top1() == best).float().sum(),
                             oracle.sum(), ent.sum(), p.amax(-1).sum()]).double()
    n = max(1, len(idx))
    m = (sums / n).tolist()
    return {"l2_1s": m[0], "l2_2s": m[1], "l2_3s": m[2], "accuracy": m[3], "oracle_l2_3s": m[4], "entropy": m[5],
            "top1_prob": m[6], "samples": int(len(idx))}


def pretrain(data_path: str | os.PathLike, out: str | os.PathLike, cfg: PretrainConfig = PretrainConfig(),
             resume: bool = False, policy_cfg=None, progress: bool = True) -> dict:
    """Pre-train a ``cfg.family`` policy on the demonstrations at ``data_path`` into the folder ``out``.

    Returns the held-out open-loop metrics. ``resume`` continues an interrupted run in ``out`` (same data).
    """
    out = check_out_dir(out)
    data = load_demos(data_path)
    data_sha256 = hashlib.sha256(Path(data_path).read_bytes()).hexdigest()
    train_idx, val_idx = split_routes(data, cfg.val_fraction, cfg.seed)
    return train_policy(data, out, cfg, train_idx, val_idx, resume=resume, policy_cfg=policy_cfg,
                        progress=progress, data_name=str(data_path), data_sha256=data_sha256)


def train_policy(data: dict, out: str | os.PathLike, cfg: PretrainConfig, train_idx: torch.Tensor,
                 val_idx: torch.Tensor, resume: bool = False, policy_cfg=None, init: dict | None = None,
                 progress: bool = True, data_name: str = "", desc: str = "pretrain",
                 data_sha256: str | None = None) -> dict:
    """The imitation training loop of :func:`pretrain` on the samples ``train_idx`` of ``data`` (a
    demonstrations dict), open-loop metrics on ``val_idx``; writes the folder ``out`` as :func:`pretrain` does.
    ``data_sha256``: the demonstrations file's hash, recorded and checked on resume (None: not checked).

    init: a policy checkpoint dict to start from (warm start: its weights and, for ``vocab``, its vocabulary
    are kept); None builds a fresh policy (``policy_cfg``) and, for ``vocab``, its k-means vocabulary.
    """
    from torch.utils.tensorboard import SummaryWriter

    out = Path(out)
    if len(train_idx) < cfg.batch_size:
        raise CraftError(f"only {len(train_idx)} training samples in '{data_name}', fewer than the batch size "
                         f"{cfg.batch_size}: collect more demonstrations or lower --batch-size")
    state_path, policy_path = out / "state.pt", out / "policy.pt"
    torch.manual_seed(cfg.seed)
    if resume:
        if not state_path.exists():
            raise CraftError(f"--resume: '{out}' has no state.pt to resume from")
        st = load_torch(state_path, "pre-training state (state.pt)")
        if not isinstance(st, dict) or any(k not in st for k in ("config", "optimizer", "scheduler", "generator",
                                                                   "torch_rng", "step")) \
                or not isinstance(st["config"], dict) or not isinstance(st["step"], int):
            raise CraftError(f"'{state_path}' is not a complete pre-training state; start a new --out")
        saved, now = dict(st["config"]), dataclasses.asdict(cfg)
        if {k: v for k, v in saved.items() if k != "steps"} != {k: v for k, v in now.items() if k != "steps"}:
            diff = sorted(k for k in set(saved) | set(now) if k != "steps" and saved.get(k) != now.get(k))
            raise CraftError(f"--resume: '{out}' was trained with a different configuration ({', '.join(diff)} "
                             "differ); use the same arguments (only --steps may change)")
        if st["step"] > cfg.steps:
            raise CraftError(f"--resume: '{out}' has already done {st['step']} steps, more than --steps "
                             f"{cfg.steps}; pass --steps {st['step']} or more")
        if data_sha256 is not None and st.get("data_sha256") not in (None, data_sha256):
            raise CraftError(f"--resume: '{out}' was trained on other demonstrations than '{data_name}' (SHA-256 "
                             f"{str(st['data_sha256'])[:12]}..., this file {data_sha256[:12]}...); pass the --data "
                             "it was started with")
        if "policy" in st:  # the record holds its policy: policy.pt cannot be of another step
            policy = policy_from_checkpoint(st["policy"], family=cfg.family, where=f"{state_path} (its policy)")
        else:  # an older record: policy.pt beside it must be of the same step
            policy = load_policy(policy_path, family=cfg.family)
            if (getattr(policy, "meta", {}) or {}).get("step") != st["step"]:
                raise CraftError(f"--resume: '{policy_path}' is at step {policy.meta.get('step')} but state.pt at "
                                 f"{st['step']}: the pair is inconsistent; start a new --out")
        policy.train()
    elif init is not None:
        policy = policy_from_checkpoint(init, family=cfg.family, where=f"{desc}: the initial policy")
        policy.train()
    else:
        policy = build_policy(cfg.family, policy_cfg)
        if cfg.family == "vocab":
            from craft.policies.vocab import build_vocabulary

            policy.set_vocabulary(build_vocabulary(data["expert"][train_idx], policy.cfg.vocab_size,
                                                   iters=cfg.kmeans_iters, seed=cfg.seed))
        policy.train()
    trained = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if resume:
        try:
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            gen.set_state(st["generator"])
            torch.set_rng_state(st["torch_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CraftError(f"--resume: '{state_path}' does not fit this run ({type(e).__name__}); start a new "
                             "--out") from None
        step = st["step"]
        if "policy" in st:
            atomic_save(st["policy"], policy_path)
    csv_path = out / "metrics.csv"
    # every row logged up to the last record (rows logged after it are logged again on resume: no duplicates);
    # rewritten whole with each record, as are the TensorBoard scalars logged since the previous record
    rows_csv = _read_csv(csv_path, step) if resume and csv_path.exists() else []
    pending_tb: list[tuple[str, float, int]] = []

    meta = {"data": data_name, "obs_config": data["obs_config"], "samples_train": int(len(train_idx)), "samples_val": int(len(val_idx)),
            "pretrain_config": dataclasses.asdict(cfg)}

    def save(step: int, result: dict | None = None) -> None:
        ck = policy.checkpoint(meta={**meta, "step": step})
        check_finite_weights(ck["state_dict"], f"step {step}: refusing to save the policy")
        with staged_folder(out, first=("state.pt",), last=("openloop.json",)) as stage:
            atomic_save({"config": dataclasses.asdict(cfg), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "generator": gen.get_state(),
                         "torch_rng": torch.get_rng_state(), "step": step, "policy": ck,
                         "data_sha256": data_sha256}, stage / state_path.name)  # the record
            atomic_save(ck, stage / policy_path.name)
            buf = io.StringIO(newline="")
            csv.writer(buf).writerows(rows_csv)
            write_text(stage / csv_path.name, buf.getvalue())
            writer = SummaryWriter(str(stage / "tb"))
            for tag, v, at in pending_tb:
                writer.add_scalar(tag, v, at)
            writer.close()
            if result is not None:
                write_json(stage / "openloop.json", result)  # last: the run's result
        pending_tb.clear()

    t0 = time.time()
    keys = None
    bar = tqdm(total=cfg.steps, initial=step, desc=f"{desc} {cfg.family}", unit="step", disable=not progress)
    try:
        while step < cfg.steps:
            pick = train_idx[torch.randint(len(train_idx), (cfg.batch_size,), generator=gen)]
            obs, expert = demo_batch(data, pick)
            out_d = policy.imitation_loss(obs, expert)
            loss = sum(v for k, v in out_d.items() if k.startswith("loss_"))
            if not bool(torch.isfinite(loss)):
                raise CraftError(f"pre-training diverged: non-finite loss at step {step + 1} (lower --lr); the "
                                 f"last record in '{out}' is intact")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            opt.step()
            if not all(bool(torch.isfinite(p).all()) for p in trained):
                raise CraftError(f"pre-training diverged: non-finite weights after step {step + 1} (lower --lr); "
                                 f"the last record in '{out}' is intact")
            sched.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                row = {"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0],
                       **{k: v.item() for k, v in out_d.items()}}
                if keys is None:
                    keys = list(row)
                    if not rows_csv:
                        rows_csv.append(keys)
                rows_csv.append([row[k] for k in keys])
                pending_tb.extend((f"pretrain/{k}", v, step) for k, v in row.items() if k != "step")
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row.get('acc', 0.0):.2f}")
            if step % cfg.ckpt_every == 0 and step < cfg.steps:
                save(step)
    finally:
        bar.close()
    policy.eval()
    metrics = open_loop_metrics(policy, data, val_idx)
    metrics["train_seconds"] = time.time() - t0
    pending_tb.extend((f"openloop/{k}", v, step) for k, v in metrics.items())
    meta["openloop"] = metrics
    save(step, result=metrics)
    return metrics


def _read_csv(path: Path, step: int) -> list[list[str]]:
    """The header and the rows of ``metrics.csv`` up to ``step``."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CraftError(f"'{path}' is not a readable pre-training metrics file ({type(e).__name__}); move it "
                         "away to resume") from None
    if not rows:  # a record written before the first logged row
        return []
    if not rows[0] or rows[0][0] != "step":
        raise CraftError(f"'{path}' is not a pre-training metrics file; move it away to resume")
    keep = [rows[0]]
    for r in rows[1:]:
        try:
            if r and int(float(r[0])) <= step:
                keep.append(r)
        except ValueError:
            break
    return keep


__all__ = ["PretrainConfig", "pretrain", "train_policy", "open_loop_metrics", "split_routes"]
