"""Throughput of the counterfactual world (craft.finetune.proxy).

Run with ``python benchmarks/proxy_bench.py [--batches 64 256] [--threads 1 2] [--groups 512] [--reference]
[--compile] [--baseline REV]``: ``--reference`` also times the unoptimised path, ``--compile`` the compiled
kernels (``CounterfactualWorld(compile=True)``; the compiling call is untimed and its seconds printed),
``--baseline REV`` the proxy module of git revision REV (``craft/finetune/proxy.py`` as committed there,
the rest of the package as checked out: a before / after comparison in one process); every path
alternates with the default one, so that all see the same machine load.

Builds realistic snapshots: worlds on a few generated towns with ~30 background vehicles and
pedestrians, stepped a few seconds with the lane-follow driver (``route_plan`` through the shared
tracker), then random-ish candidate sets: G perturbations of the route plan (speed scale 0..1.6,
lateral offsets up to +-4 m, a few stop-in-place plans), T = 6 waypoints of 0.5 s. Prints
candidate-steps/s = B * G * H / seconds (best of ``--reps``), the peak RSS of the process and the
1-minute load average (other processes on the machine slow the numbers down; compare runs at similar
load, or the process CPU time, also printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_snapshots(batch: int, seed: int = 0, towns: int = 3, warm_steps: int = 30, n_vehicles: int = 30):
    """``batch`` snapshots on ``towns`` generated towns; returns (MapBatch, WorldState)."""
    from craft.world.autopilot import PlanExecutor, route_plan
    from craft.world.map import MapBatch
    from craft.world.towns import generate_town
    from craft.world.world import World, random_specs

    mb = MapBatch([generate_town(s) for s in range(towns)])
    world = World(mb)
    state = world.reset(random_specs(mb, batch, seed, n_vehicles=n_vehicles, n_pedestrians=8), seed=seed)
    ex = PlanExecutor(batch)
    v = torch.linspace(4.0, 12.0, batch)
    for k in range(warm_steps):
        if k % 5 == 0:
            ex.set_plan(state, route_plan(state, v))
        state, _ = world.step(state, ex.control(state))
    return mb, state


def candidate_set(state, G: int, seed: int = 0, T: int = 6) -> torch.Tensor:
    """(B, G, T, 3) perturbations of the route plan: speed scales, lateral offsets, stop plans."""
    from craft.world.autopilot import route_plan

    g = torch.Generator().manual_seed(seed)
    B = state.batch_size
    base_v = state.speed[:, 0].clamp_min(3.0)
    scale = torch.rand(B, G, generator=g) * 1.6
    scale[:, :8] = 0.0  # a few stop plans
    out = []
    for b0 in range(0, G, 64):  # route_plan is batched over worlds; 8 speed groups per call
        n = min(64, G - b0)
        v = (base_v[:, None] * scale[:, b0:b0 + n]).reshape(-1)
        st = state.index(torch.arange(B).repeat_interleave(n))
        out.append(route_plan(st, v, horizon=T).view(B, n, T, 3))
    traj = torch.cat(out, 1)
    lat = (torch.rand(B, G, 1, generator=g) * 2 - 1) * 4.0
    ramp = torch.linspace(0.2, 1.0, T)[None, None, :]
    traj[..., 1] = traj[..., 1] + lat * ramp
    return traj


def load_baseline(rev: str):
    """The module ``craft/finetune/proxy.py`` of git revision ``rev`` (imports resolve in the checked-out tree)."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:craft/finetune/proxy.py"], cwd=root, capture_output=True,
                         text=True)
    if src.returncode != 0:
        sys.exit(f"proxy_bench: --baseline {rev}: {src.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "proxy_baseline.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("proxy_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--groups", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=None, help="ProxyConfig.chunk_states (default: config default)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="print a torch profiler table for the first setting")
    ap.add_argument("--reference", action="store_true",
                    help="also time the unoptimised path (CounterfactualWorld(reference=True)), alternating with the "
                         "default one in the same process")
    ap.add_argument("--compile", action="store_true",
                    help="also time CounterfactualWorld(compile=True) (torch.compile of the ego and route steps)")
    ap.add_argument("--baseline", metavar="REV",
                    help="also time craft/finetune/proxy.py of this git revision (e.g. main), alternating")
    args = ap.parse_args()

    from craft.finetune.proxy import CounterfactualWorld, ProxyConfig

    torch.set_num_threads(1)
    mb, state_all = build_snapshots(max(args.batches))
    cfg = ProxyConfig() if args.chunk is None else ProxyConfig(chunk_states=args.chunk)
    worlds = [("", CounterfactualWorld(mb, cfg))]
    if args.reference:
        worlds.append(("reference ", CounterfactualWorld(mb, cfg, reference=True)))
    if args.baseline:
        base = load_baseline(args.baseline)
        worlds.insert(0, (f"baseline {args.baseline} ", base.CounterfactualWorld(mb, base.ProxyConfig(
            chunk_states=cfg.chunk_states))))
    traj_all = candidate_set(state_all, args.groups)
    if args.compile:
        cw = CounterfactualWorld(mb, cfg, compile=True)
        n = min(state_all.batch_size, cfg.chunk_states)
        t0 = time.perf_counter()
        cw.score(state_all.index(slice(0, n)), traj_all[:n], torch.ones(n, args.groups, dtype=torch.bool))
        print(f"compiled: first call (compiling) {time.perf_counter() - t0:.1f} s")
        worlds.append(("compiled ", cw))
    print(f"snapshots: {state_all.batch_size} states, {state_all.num_agents} agent slots, G={args.groups}, "
          f"H={cfg.horizon}, chunk={cfg.chunk_states}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for B in args.batches:
            st = state_all.index(slice(0, B))
            traj = traj_all[:B]
            valid = torch.ones(B, args.groups, dtype=torch.bool)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    worlds[0][1].score(st, traj, valid)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
                args.profile = False
            best = {name: float("inf") for name, _ in worlds}
            best_cpu = dict(best)
            for _ in range(args.reps):  # the paths alternate, so that both see the same machine load
                for name, cw in worlds:
                    t0, c0 = time.perf_counter(), time.process_time()
                    sc = cw.score(st, traj, valid)
                    best[name] = min(best[name], time.perf_counter() - t0)
                    best_cpu[name] = min(best_cpu[name], time.process_time() - c0)
            if args.baseline or args.compile or args.reference:
                ref = [n for n, _ in worlds if n.startswith("baseline")] or [worlds[0][0]]
                ret = {n: cw.score(st, traj, valid).returns for n, cw in worlds}
                for n in ret:
                    print(f"  max |return - {ref[0].strip() or 'default'}| of {n.strip() or 'default'}: "
                          f"{float((ret[n] - ret[ref[0]]).abs().max()):.2e}")
            for name, _ in worlds:
                rate = B * args.groups * cfg.horizon / best[name]
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(f"{name or 'default '}threads={threads} B={B:4d} G={args.groups} H={cfg.horizon}: "
                      f"{best[name]:7.3f} s  "
                      f"{rate / 1e6:6.2f} M candidate-steps/s  (cpu {best_cpu[name]:6.3f} s)  peak RSS {rss:7.0f} MB  "
                      f"load {os.getloadavg()[0]:.2f}  "
                      f"collided {float(sc.collided.float().mean()):.3f}  "
                      f"offroad {float((sc.terms['offroad'] < 0).float().mean()):.3f}")


if __name__ == "__main__":
    main()
