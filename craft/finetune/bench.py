"""``craft finetune-bench``: seconds per fine-tuning iteration per worker count, and the proxy's throughput.

For each worker count the same fine-tuning run (same routes, seed, method) is built from scratch -- split
loading, and for Ray workers Ray's own start-up and the actors' -- and ``iters`` iterations are timed.
Reported per count: start-up seconds, seconds per iteration and its split (collect / score / update, as the
trainer's diagnostics define them), seconds per iteration with the start-up spread over the timed iterations,
and the driver's peak RSS plus (Ray) the largest total RSS of the Ray processes (raylet, GCS, workers)
sampled after each iteration. The proxy figure is candidate-steps/s
of :class:`~craft.finetune.proxy.CounterfactualWorld` at the policy's G and the config's H on ``proxy_states``
snapshots collected on the same routes (one torch thread, best of two).
"""

from __future__ import annotations

import dataclasses
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from craft.errors import CraftError


@dataclass(frozen=True)
class BenchConfig:
    init: str = "checkpoints/vocab.pt"
    """Policy checkpoint fine-tuned."""
    method: str = "craft"
    workers: tuple[int, ...] = (1, 2)
    """Worker counts to time (1: the in-process path)."""
    iters: int = 3
    """Timed iterations per worker count."""
    worlds: int = 128
    buffer: int = 2048
    split: str = "train"
    town_seeds: tuple[int, ...] | None = None
    """Default: the split's first 20 towns."""
    routes: int | None = None
    seed: int = 0
    device: str = "cpu"
    address: str | None = None
    """Join this Ray cluster instead of starting a local Ray per worker count."""
    threads: int = 1
    """torch threads of the driver process (workers always use one)."""
    proxy_states: int = 64
    """Snapshots for the proxy figure (0: skip)."""
    compile_proxy: bool = False
    """The proxy's fast path (``CounterfactualWorld(..., compile=True)``: C kernels and ``torch.compile``), in the
    runs and in the proxy figure (whose first, compiling, call is not timed)."""

    def __post_init__(self):
        if not self.workers or min(self.workers) < 1 or self.iters < 1:
            raise CraftError("finetune-bench: --workers must list counts >= 1 and --iters must be >= 1")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _ray_rss_mb() -> float | None:
    """Resident memory of this machine's Ray processes (raylet, GCS, workers) in MB, if psutil is there."""
    try:
        import psutil
    except ImportError:
        return None
    total = 0
    for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            name = p.info["name"] or ""
            if name.startswith(("raylet", "gcs_server", "ray::")) or cmd.startswith("ray::") or \
                    "site-packages/ray/" in cmd:
                total += p.info["memory_info"].rss
        except Exception:  # gone meanwhile
            continue
    return total / 2**20


def finetune_bench(cfg: BenchConfig) -> dict:
    from craft.finetune.collector import CollectorConfig
    from craft.finetune.trainer import FinetuneConfig, Trainer
    from craft.scenarios.splits import split_town_seeds

    torch.set_num_threads(cfg.threads)
    towns = cfg.town_seeds or tuple(split_town_seeds(cfg.split)[:20])
    col = CollectorConfig(split=cfg.split, worlds=cfg.worlds, buffer_size=cfg.buffer, town_seeds=tuple(towns),
                          routes=cfg.routes, seed=cfg.seed)
    fcfg = FinetuneConfig(method=cfg.method, iters=cfg.iters + 1, seed=cfg.seed, collector=col)
    runs, proxy = [], None
    for w in cfg.workers:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            tr = Trainer(cfg.init, Path(d) / "run", fcfg, device=cfg.device, progress=False, workers=w,
                         address=cfg.address, compile_proxy=cfg.compile_proxy)
            startup = time.perf_counter() - t0
            rows, ray_rss = [], None
            try:
                for _ in range(cfg.iters):
                    r = tr.iterate()
                    if w > 1 or cfg.address is not None:  # the Ray processes' memory, at its largest
                        now = _ray_rss_mb()
                        ray_rss = now if ray_rss is None or (now or 0) > ray_rss else ray_rss
                    rows.append({k: v for k, v in r.items() if k in ("iteration", "transitions", "t_collect", "t_score",
                                                                  "t_update", "t_total") or k.startswith("workers/")})
                if w == 1 and cfg.address is None and cfg.proxy_states > 0 and proxy is None:
                    proxy = _proxy_figure(tr, cfg.proxy_states)
            finally:
                t1 = time.perf_counter()
                tr.close()
                shutdown = time.perf_counter() - t1
        it = sum(r["t_total"] for r in rows)
        mean = lambda k: sum(r[k] for r in rows) / len(rows)
        runs.append({"workers": w, "startup_s": startup, "shutdown_s": shutdown, "s_per_iter": it / len(rows),
                     "collect_s": mean("t_collect"), "score_s": mean("t_score"), "update_s": mean("t_update"),
                     "s_per_iter_with_startup": (it + startup + shutdown) / len(rows),
                     "transitions_per_iter": mean("transitions"), "driver_peak_rss_mb": _rss_mb(),
                     "ray_rss_mb_max": ray_rss, "iterations": rows})
    res = {"config": dataclasses.asdict(cfg), "runs": runs, "torch_threads_driver": cfg.threads,
           "cpu_count": __import__("os").cpu_count(), "loadavg_1min": __import__("os").getloadavg()[0]}
    one = [r for r in runs if r["workers"] == 1]
    more = [r for r in runs if r["workers"] > 1]
    if one and more:
        m = more[-1]
        res["speedup"] = {"workers": m["workers"], "ratio": m["s_per_iter"] / one[0]["s_per_iter"],
                          "ratio_with_startup": m["s_per_iter_with_startup"] / one[0]["s_per_iter_with_startup"]}
    if proxy is None and cfg.proxy_states > 0:
        proxy = _proxy_figure(None, cfg.proxy_states, fcfg, cfg.device, cfg.init, cfg.compile_proxy)
    if proxy is not None:
        res["proxy"] = proxy
    return res


def _proxy_figure(tr, states: int, fcfg=None, device: str = "cpu", init: str | None = None,
                  compile_proxy: bool = False) -> dict:
    """Candidate-steps/s of the proxy on ``states`` snapshots of one collected buffer (1 thread, best of 2;
    a compiled proxy is called once before, untimed, so that compiling is not counted)."""
    from craft.finetune.collector import Collector
    from craft.finetune.proxy import CounterfactualWorld
    from craft.policies.base import load_policy
    from craft.world.tracker import TrackerState

    if tr is not None:
        collector, proxy, policy = tr.collector, tr.proxy, tr.policy
    else:
        collector = Collector(dataclasses.replace(fcfg.collector, buffer_size=states), device=device)
        proxy = CounterfactualWorld(collector.world.maps, fcfg.proxy, compile=compile_proxy)
        policy = load_policy(init, device=device)
    buf = collector.collect(policy)
    n = min(states, buf.size)
    sl = slice(0, n)
    trk = TrackerState(buf.tracker["integral"][sl], buf.tracker["prev_error"][sl], buf.tracker["has_prev"][sl])
    snap, traj, valid = buf.snapshot.index(sl), buf.candidates.trajectories[sl], buf.candidates.valid[sl]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = float("inf")
    try:
        if proxy.compile:
            proxy.score(snap, traj, valid, trk)
        for _ in range(2):
            t = time.perf_counter()
            proxy.score(snap, traj, valid, trk)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    G, H = traj.shape[1], proxy.cfg.horizon
    return {"states": n, "G": G, "H": H, "seconds": best, "candidate_steps_per_s": n * G * H / best,
            "compiled": proxy.compile}


__all__ = ["BenchConfig", "finetune_bench"]
