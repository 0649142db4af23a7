"""Batched CPU inference throughput of the policy families: decisions per second.

A decision = one world's observation -> candidate set (policy forward, top-1 pick). Observations come from a
real world (a generated town, random traffic). Policies are the committed checkpoints when present
(``checkpoints/<family>.pt``), else freshly initialised ones of the default size (same cost).

    python benchmarks/policy_bench.py [--batch 256] [--threads 1 2] [--json out/policy-bench.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from craft.policies import build_policy, families, load_policy
from craft.world.observe import observe
from craft.world.towns import generate_town
from craft.world.world import World, random_specs


def bench(family: str, obs, threads: int, repeats: int = 5) -> float:
    torch.set_num_threads(threads)
    ck = Path("checkpoints") / f"{family}.pt"
    p = load_policy(ck) if ck.exists() else build_policy(family)
    p.eval()
    with torch.inference_mode():
        p(obs).top1()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            p(obs).top1()
            best = min(best, time.perf_counter() - t)
    return obs.batch_size / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    w = World([generate_town(0)])
    st = w.reset(random_specs(w.maps, a.batch, seed=0, n_vehicles=30), seed=0)
    t = time.perf_counter()
    obs = observe(w.maps, st, w.lights(st))
    t_obs = time.perf_counter() - t
    res = {"batch": a.batch, "observe_per_s": a.batch / t_obs, "families": {}}
    print(f"observation tokens: {a.batch / t_obs:,.0f} worlds/s (batch {a.batch}, 1 thread)")
    for fam in families():
        res["families"][fam] = {}
        for th in a.threads:
            r = bench(fam, obs, th)
            res["families"][fam][f"threads_{th}"] = r
            print(f"{fam:6s} {th} thread(s): {r:10,.0f} decisions/s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
