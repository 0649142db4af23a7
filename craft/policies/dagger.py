"""Closed-loop imitation with the privileged expert (DAgger): ``craft dagger``.

Starting from a pre-trained policy (``--init``) and its expert demonstrations (``--data``), every round

1. **drives** the ``train`` routes in closed loop with the current policy, mixed with the expert: per world
   and decision the expert's plan is executed with probability ``beta_k = beta * beta_decay ** (k - 1)``
   (round ``k`` = 1, 2, ...), the policy's top-1 candidate otherwise (Ross et al., 2011);
2. **labels** every decision visited with the expert's clean plan computed on that very state (the expert is
   privileged and stateless: it can label any state at no extra simulation), recorded by the same loop as
   ``craft collect`` (:func:`craft.policies.data.record_split`) in the same format;
3. **aggregates** the round's data with the demonstrations and every earlier round's data (each sample once);
4. **retrains** the policy on the aggregate with the pre-training loop
   (:func:`craft.policies.pretrain.train_policy`), warm-started from the previous round (or from ``--init``);
5. **measures** open-loop metrics on the held-out routes and closed-loop DS / SR on a ``val`` subset.

Routes are held out *by identity* (type, route number, town seed; a deterministic ``holdout`` share): a
held-out route's samples, from the demonstrations and from every round, are never trained on, so the
open-loop figures of all rounds are measured on the same routes. Round 0 is the initial policy (measured,
not trained). Train on ``train`` routes only; choose the round on ``val`` (``best.pt``), never on ``test``.

Folder layout (every file written atomically; a round is complete when its ``round.json`` exists)::

    OUT/config.json              the run's configuration, data and init (checked by --resume)
    OUT/round-0000/policy.pt     the initial policy;  val/{b2d,b2d-star}/results.json;  round.json
    OUT/round-000K/data.pt       the round's new samples (demonstrations format, with "by_policy")
    OUT/round-000K/train/        the round's training run (state.pt, policy.pt, metrics.csv, openloop.json)
    OUT/round-000K/val/...       closed-loop val subset evaluation of the round's policy
    OUT/round-000K/round.json    the round's figures (written last)
    OUT/rounds.csv, rounds.json, rounds.png   all completed rounds (rebuilt after each round)
    OUT/policy.pt                the last round's policy;  OUT/best.pt: the round with the best val DS

Resume (``--resume``) after a kill at any point: completed rounds are read back; an unfinished round reuses
its ``data.pt`` if it was written (else collects it again: the same data, the collection is deterministic),
continues its training run from its ``state.pt`` (bit-identical, see :mod:`craft.policies.pretrain`) and
re-runs its evaluation if its results are missing. ``--rounds`` may be raised on resume.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from craft.checks import LR_MAX, check_finite_fields, check_range, check_seed
from craft.errors import CraftError
from craft.files import check_out_dir, load_torch, read_json, save_png, write_bytes, write_json, write_text
from craft.policies.base import atomic_save, policy_from_checkpoint, read_checkpoint
from craft.policies.data import DATA_FORMAT, DATA_VERSION, CollectConfig, load_demos, record_split
from craft.policies.pretrain import PretrainConfig, open_loop_metrics, train_policy

RUN_FORMAT = "craft-dagger"


@dataclass(frozen=True)
class DaggerConfig:
    """A DAgger run (see the module docstring); every field is a ``craft dagger`` option."""

    family: str = "vocab"
    """Policy family; ``--init`` must hold a policy of it."""
    rounds: int = 3
    """DAgger rounds (each: drive, label, aggregate, retrain, measure)."""
    routes: int | None = 4
    """``train`` routes per scenario type driven per round (None: the split's 20; 4 x 44 = 176 routes)."""
    town_seeds: tuple[int, ...] | None = None
    """Drive on these train town seeds instead of the split's."""
    types: tuple[str, ...] | None = None
    """Only these scenario types (driving and the val subset); default all."""
    beta: float = 0.0
    """Probability that a world executes the expert's plan at a decision in round 1. Default 0 (the policy
    drives alone): the demonstrations already are the expert's round, and in the vocab pilot two pure-policy
    rounds beat a first round of expert data (docs/policies.md, "DAgger")."""
    beta_decay: float = 0.5
    """beta of round k = beta * beta_decay ** (k - 1)."""
    perturb_prob: float = 0.0
    """DART-style noise on the expert's executed plans (see :class:`CollectConfig`); 0: none."""
    batch_size: int = 220
    """Routes simulated together."""
    max_steps: int = 2000
    """Simulation steps cap per route while collecting."""
    steps: int = 1000
    """Optimizer steps of each round's retraining."""
    train_batch: int = 256
    """Samples per optimizer step."""
    lr: float = 5e-4
    """Peak learning rate of each round (warm-up, then cosine decay to 5 %; see PretrainConfig)."""
    warmup: int = 50
    """Linear warm-up steps of each round."""
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    warm_start: bool = True
    """Round k starts from round k - 1's policy (False: from ``--init`` every round)."""
    holdout: float = 0.05
    """Share of routes (by identity) held out of training for the open-loop metrics."""
    val_routes: int = 1
    """Routes per scenario type of the closed-loop ``val`` subset (1: 44 routes)."""
    val_seed: int = 0
    """Traffic seed of the val evaluation."""
    val_max_steps: int | None = None
    """Step cap of the val evaluation (None: the benchmark's)."""
    seed: int = 0
    """Traffic seed of the driven routes (round k drives with ``seed + k``) and the training seed."""

    def __post_init__(self):
        check_finite_fields(self)
        n = "DaggerConfig."
        for f in ("rounds", "batch_size", "max_steps", "steps", "train_batch", "val_routes"):
            check_range(n + f, getattr(self, f), 1, integer=True)
        for f in ("routes", "val_max_steps"):
            if getattr(self, f) is not None:
                check_range(n + f, getattr(self, f), 1, integer=True)
        check_range(n + "warmup", self.warmup, 0, integer=True)
        check_range(n + "beta", self.beta, 0, 1)
        check_range(n + "beta_decay", self.beta_decay, 0, 1)
        check_range(n + "perturb_prob", self.perturb_prob, 0, 1)
        check_range(n + "lr", self.lr, 0, LR_MAX, lo_open=True)
        check_range(n + "weight_decay", self.weight_decay, 0)
        check_range(n + "grad_clip", self.grad_clip, 0, lo_open=True)
        check_range(n + "holdout", self.holdout, 0, 1, lo_open=True, hi_open=True)
        for f in ("seed", "val_seed"):
            check_seed(n + f, getattr(self, f))
        for t in self.town_seeds or ():
            check_seed(n + "town_seeds", t)

    def beta_of(self, k: int) -> float:
        """The expert's share of round ``k`` (>= 1)."""
        return self.beta * self.beta_decay ** (k - 1)

    def collect_config(self, k: int) -> CollectConfig:
        return CollectConfig(split="train", routes=self.routes, town_seeds=self.town_seeds, types=self.types,
                             batch_size=self.batch_size, perturb_prob=self.perturb_prob, seed=self.seed + k,
                             max_steps=self.max_steps)

    def pretrain_config(self, k: int) -> PretrainConfig:
        return PretrainConfig(family=self.family, steps=self.steps, batch_size=self.train_batch, lr=self.lr,
                              warmup=min(self.warmup, self.steps), weight_decay=self.weight_decay,
                              grad_clip=self.grad_clip, seed=self.seed + k, val_fraction=self.holdout,
                              ckpt_every=max(1, min(250, self.steps // 2)), log_every=max(1, min(25, self.steps)))


# ---------------------------------------------------------------------- data
def aggregate(parts: list[dict]) -> dict:
    """One demonstrations dict holding every sample of ``parts`` once, in order.

    Route indices are offset so that each part's routes stay distinct entries of ``routes`` (each entry
    gains ``"part"``: its part's index); ``"part" (N,)`` long says which part a sample came from. The
    parts must share their observation settings and tokens.
    """
    if not parts:
        raise CraftError("nothing to aggregate")
    keys = set(parts[0]["obs"])
    for i, p in enumerate(parts[1:], 1):
        if p["obs_config"] != parts[0]["obs_config"] or set(p["obs"]) != keys:
            raise CraftError(f"DAgger data part {i} was recorded with other observation settings than the "
                             "demonstrations; use demonstrations made for this policy")
    offs, routes, n_routes = [], [], 0
    for i, p in enumerate(parts):
        offs.append(n_routes)
        routes += [dict(r, part=i) for r in p["routes"]]
        n_routes += len(p["routes"])
    return {
        "format": DATA_FORMAT, "format_version": DATA_VERSION,
        "obs": {k: torch.cat([p["obs"][k] for p in parts]) for k in parts[0]["obs"]},
        "expert": torch.cat([p["expert"] for p in parts]),
        "route": torch.cat([p["route"] + o for p, o in zip(parts, offs)]),
        "part": torch.cat([torch.full((len(p["expert"]),), i, dtype=torch.long) for i, p in enumerate(parts)]),
        "by_policy": torch.cat([p.get("by_policy", torch.zeros(len(p["expert"]), dtype=torch.bool))
                                for p in parts]),
        "routes": routes, "obs_config": parts[0]["obs_config"],
    }


def held_out_routes(routes: list[dict], share: float, seed: int) -> torch.Tensor:
    """(R,) bool: the routes held out, decided by each route's identity (type, route number, town seed)
    hashed with ``seed``, so a route is held out in the demonstrations and in every round alike."""
    out = []
    for r in routes:
        key = f"{r.get('type')}|{r.get('route_id')}|{r.get('town_seed')}|{seed}".encode()
        out.append((zlib.crc32(key) % 100_000) < share * 100_000)
    return torch.tensor(out, dtype=torch.bool)


def split_by_identity(data: dict, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample indices (train, held out) of an aggregate by :func:`held_out_routes`."""
    v = held_out_routes(data["routes"], share, seed)[data["route"]]
    return torch.nonzero(~v).squeeze(1), torch.nonzero(v).squeeze(1)


# ---------------------------------------------------------------------- evaluation
def val_eval(policy_path: Path, folder: Path, cfg: DaggerConfig, device: str = "cpu") -> dict:
    """Closed-loop ``val`` subset evaluation of the checkpoint ``policy_path`` (b2d, re-scored b2d-star) into
    ``folder/{b2d,b2d-star}`` (skipped when both results exist); returns DS / SR of both protocols."""
    from craft.bench.metrics import load_results
    from craft.bench.runner import EvalConfig, evaluate, make_driver

    files = {p: folder / p / "results.json" for p in ("b2d-star", "b2d")}
    if not all(f.exists() for f in files.values()):
        with torch.random.fork_rng():
            evaluate(make_driver(str(policy_path), device=device), "val", folder / "b2d",
                     EvalConfig(protocol="b2d", seed=cfg.val_seed, max_steps=cfg.val_max_steps,
                                step_files=False),
                     routes=cfg.val_routes, types=list(cfg.types) if cfg.types else None, device=device,
                     also={"b2d-star": folder / "b2d-star"})
    out = {}
    for proto, f in files.items():
        summ = load_results(f)["summary"]
        suffix = "" if proto == "b2d-star" else "_b2d"
        out[f"val_DS{suffix}"], out[f"val_SR{suffix}"] = float(summ["DS"]), float(summ["SR"])
    return out


# ---------------------------------------------------------------------- the run
def _round_dir(out: Path, k: int) -> Path:
    return out / f"round-{k:04d}"


def _check_run(out: Path, cfg: DaggerConfig, ident: dict, resume: bool) -> None:
    """A new run needs a fresh --out; --resume needs the same configuration (only ``rounds`` may change)."""
    cpath = out / "config.json"
    if not resume:
        if cpath.exists() or any(out.glob("round-*")):
            raise CraftError(f"'{out}' already holds a DAgger run; pass --resume to continue it or choose a new "
                             "--out")
        return
    if not cpath.exists():
        raise CraftError(f"--resume: '{out}' has no config.json of a DAgger run to resume")
    saved = read_json(cpath, "DAgger run configuration (config.json)")
    if not isinstance(saved, dict) or saved.get("format") != RUN_FORMAT or not isinstance(saved.get("config"), dict):
        raise CraftError(f"'{cpath}' is not a DAgger run configuration; start a new --out")
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    diff = sorted(k for k in set(saved["config"]) | set(now)
                  if k != "rounds" and saved["config"].get(k) != now.get(k))
    diff += [k for k in ident if saved.get(k) != ident[k]]
    if diff:
        raise CraftError(f"--resume: '{out}' was run with different settings ({', '.join(diff)} differ); use "
                         "the same arguments (only --rounds may change)")


def _load_round_data(path: Path) -> dict:
    data = load_demos(path)
    if "by_policy" not in data:
        raise CraftError(f"'{path}' is not a DAgger round's data (no by_policy); delete it to collect it again")
    return data


def dagger(init: str | os.PathLike, data_path: str | os.PathLike, out: str | os.PathLike,
           cfg: DaggerConfig = DaggerConfig(), resume: bool = False, device: str = "cpu",
           progress: bool = True) -> list[dict]:
    """Run (or resume) ``cfg.rounds`` DAgger rounds from the checkpoint ``init`` and the demonstrations
    ``data_path`` into the folder ``out``; returns the rows of rounds 0..rounds (see :func:`round_row`)."""
    out = check_out_dir(out)
    init_ck = read_checkpoint(init)
    if init_ck["family"] != cfg.family:
        raise CraftError(f"--init '{init}' holds a '{init_ck['family']}' policy, not --family {cfg.family}")
    init_policy = policy_from_checkpoint(init_ck, family=cfg.family, where=str(init))
    demos = load_demos(data_path)
    obs_cfg = init_policy.cfg.encoder.obs_config
    if demos["obs_config"] != dataclasses.asdict(obs_cfg):
        raise CraftError(f"'{data_path}' was recorded with other observation settings than the policy in "
                         f"'{init}' was trained with; collect demonstrations for it")
    ident = {"init": str(init), "data": str(data_path), "data_samples": int(demos["expert"].shape[0])}
    _check_run(out, cfg, ident, resume)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"format": RUN_FORMAT, "config": dataclasses.asdict(cfg), **ident})

    parts = [demos]
    rows: list[dict] = []
    bar = tqdm(total=cfg.rounds + 1, desc=f"dagger {cfg.family}", unit="round", disable=not progress)
    try:
        for k in range(cfg.rounds + 1):
            folder = _round_dir(out, k)
            done = folder / "round.json"
            if done.exists():
                row = read_json(done, f"DAgger round {k} record (round.json)")
                if k > 0:
                    parts.append(_load_round_data(folder / "data.pt"))
            else:
                row = _run_round(k, folder, cfg, init_ck, parts, out, device, progress)
                write_json(done, row)  # last: the round is complete
            rows.append(row)
            _write_summary(out, rows)
            bar.update(1)
            bar.set_postfix(samples=row["samples_total"], val_DS=f"{row['val_DS']:.1f}")
    finally:
        bar.close()
    write_bytes(out / "policy.pt", (_round_dir(out, cfg.rounds) / "policy.pt").read_bytes())
    best = max(rows, key=lambda r: (r["val_DS"], -r["round"]))
    write_bytes(out / "best.pt", (_round_dir(out, best["round"]) / "policy.pt").read_bytes())
    write_json(out / "best.json", {"round": best["round"], "val_DS": best["val_DS"], "val_SR": best["val_SR"],
                                   "chosen_on": "val subset, b2d-star DS"})
    return rows


def _run_round(k: int, folder: Path, cfg: DaggerConfig, init_ck: dict, parts: list[dict], out: Path,
               device: str, progress: bool) -> dict:
    """Collect (k >= 1), train, evaluate round ``k``; ``parts`` gains the round's data. Returns its row."""
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    times = {"t_collect": 0.0, "t_train": 0.0}
    row: dict = {"round": k, "beta": cfg.beta_of(k) if k else 1.0}
    policy_path = folder / "policy.pt"
    if k == 0:
        if not policy_path.exists():
            atomic_save(init_ck, policy_path)
        row.update(samples_new=0, samples_by_policy=0)
    else:
        prev = policy_from_checkpoint(read_checkpoint(_round_dir(out, k - 1) / "policy.pt"), family=cfg.family,
                                      device=device)
        data_file = folder / "data.pt"
        if data_file.exists():
            new = _load_round_data(data_file)
        else:
            t = time.time()
            new = record_split(cfg.collect_config(k), device=device, obs_cfg=prev.cfg.encoder.obs_config,
                               policy=prev, beta=cfg.beta_of(k), seed_salt=k, progress=progress,
                               desc=f"dagger round {k}")
            atomic_save(new, data_file)
            times["t_collect"] = time.time() - t
        # the previous policy on the states it visited itself, before it learns them
        row["visited"] = open_loop_metrics(prev.cpu(), new, torch.arange(len(new["expert"])))
        parts.append(new)
        agg = aggregate(parts)
        tr, ho = split_by_identity(agg, cfg.holdout, cfg.seed)
        start = init_ck if not cfg.warm_start else read_checkpoint(_round_dir(out, k - 1) / "policy.pt")
        t = time.time()
        train_policy(agg, folder / "train", cfg.pretrain_config(k), tr, ho,
                     resume=(folder / "train" / "state.pt").exists(), init=start, progress=progress,
                     data_name=f"dagger round {k}: demonstrations + rounds 1-{k}", desc=f"dagger round {k}")
        times["t_train"] = time.time() - t
        atomic_save(load_torch(folder / "train" / "policy.pt", "round policy"), policy_path)
        row.update(samples_new=int(len(new["expert"])), samples_by_policy=int(new["by_policy"].sum()))
    if k == 0:
        agg = aggregate(parts)
        tr, ho = split_by_identity(agg, cfg.holdout, cfg.seed)
    policy = policy_from_checkpoint(read_checkpoint(policy_path), family=cfg.family)
    demo_ho = ho[agg["part"][ho] == 0]
    row["samples_total"] = int(len(agg["expert"]))
    row["samples_train"] = int(len(tr))
    row["openloop"] = open_loop_metrics(policy, agg, demo_ho)  # demonstrations' held-out routes (fixed)
    dag_ho = ho[agg["part"][ho] > 0]
    if len(dag_ho):  # the rounds' held-out routes: states policies visited
        row["openloop_visited"] = open_loop_metrics(policy, agg, dag_ho)
    t = time.time()
    row.update(val_eval(policy_path, folder / "val", cfg, device=device))
    times["t_val"] = time.time() - t
    row.update(times, t_round=time.time() - t0)
    return row


# ---------------------------------------------------------------------- summary
COLUMNS = ("round", "beta", "samples_new", "samples_by_policy", "samples_total", "accuracy", "l2_1s", "l2_2s",
           "l2_3s", "entropy", "top1_prob", "visited_accuracy", "visited_l2_3s", "val_DS", "val_SR", "val_DS_b2d",
           "val_SR_b2d", "t_collect", "t_train", "t_val", "t_round")


def _flat(row: dict) -> dict:
    ol, vis = row.get("openloop", {}), row.get("visited", {})
    f = {c: row.get(c, math.nan) for c in COLUMNS}
    for c in ("accuracy", "l2_1s", "l2_2s", "l2_3s", "entropy", "top1_prob"):
        f[c] = ol.get(c, math.nan)
    f["visited_accuracy"], f["visited_l2_3s"] = vis.get("accuracy", math.nan), vis.get("l2_3s", math.nan)
    return f


def _write_summary(out: Path, rows: list[dict]) -> None:
    """rounds.json, rounds.csv and rounds.png of the rounds so far (each written atomically)."""
    write_json(out / "rounds.json", rows)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        f = _flat(r)
        w.writerow([f[c] if not isinstance(f[c], float) else f"{f[c]:.6g}" for c in COLUMNS])
    write_text(out / "rounds.csv", buf.getvalue())
    rounds_plot(rows, out / "rounds.png")


def rounds_plot(rows: list[dict], path: Path) -> None:
    """Per round: data size, open-loop accuracy / L2 at 3 s, val DS / SR (b2d-star), wall time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fl = [_flat(r) for r in rows]
    ks = [f["round"] for f in fl]
    fig, ax = plt.subplots(1, 4, figsize=(14, 3.2))
    ax[0].plot(ks, [f["samples_total"] for f in fl], marker="o")
    ax[0].set_title("samples (aggregate)")
    ax[1].plot(ks, [f["accuracy"] for f in fl], marker="o", label="accuracy (demo held-out)")
    ax[1].plot(ks, [f["visited_accuracy"] for f in fl], marker="x", ls=":",
               label="accuracy (states it drove to, before)")
    a2 = ax[1].twinx()
    a2.plot(ks, [f["l2_3s"] for f in fl], marker="s", color="C3", label="L2 at 3 s (m)")
    a2.set_ylabel("L2 at 3 s (m)", color="C3")
    a2.ticklabel_format(axis="y", useOffset=False)
    ax[1].set_title("open loop")
    ax[1].legend(fontsize=7, loc="lower left")
    ax[2].plot(ks, [f["val_DS"] for f in fl], marker="o", label="DS")
    ax[2].plot(ks, [f["val_SR"] for f in fl], marker="s", label="SR")
    ax[2].set_title("val subset (b2d-star)")
    ax[2].legend(fontsize=7)
    ax[3].bar(ks, [f["t_round"] for f in fl])
    ax[3].set_title("wall time per round (s)")
    for a in ax:
        a.set_xlabel("round (0: --init)")
        a.set_xticks(ks)
    fig.tight_layout()
    save_png(fig, path)


__all__ = ["DaggerConfig", "dagger", "aggregate", "held_out_routes", "split_by_identity", "val_eval",
           "rounds_plot"]
