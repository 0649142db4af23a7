"""Timings for craft.world.collision.

Run with ``python benchmarks/bench_collision.py [--device cuda]``.  Prints

1. ``pairwise_collisions`` (spatial hash) against ``brute_force_pairwise`` for N = 64 ... 1024 agents,
   B = 64 scenes, agents scattered uniformly over 1 km^2 -- the hash grows roughly linearly in N, the
   brute force quadratically;
2. ``candidate_collisions`` throughput in (b, g, h, n) pairs per second at B=16, G=512, H=20, N=64,
   for a typical scene (others within +-60 m of the ego) and a crowded one (others within +-12 m),
   next to a dense all-pairs SAT evaluation for reference.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from craft.world.collision import boxes_overlap, brute_force_pairwise, candidate_collisions, pairwise_collisions


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, reps: int) -> float:
    """Median wall time of ``fn()`` in seconds after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def scattered_scene(B: int, N: int, side: float, device: torch.device, gen: torch.Generator):
    """Vehicles scattered uniformly over a ``side`` x ``side`` square."""
    pos = torch.rand(B, N, 2, generator=gen) * side
    yaw = (torch.rand(B, N, generator=gen) * 2 - 1) * math.pi
    length = 3.5 + 2.0 * torch.rand(B, N, generator=gen)
    width = 1.6 + 0.6 * torch.rand(B, N, generator=gen)
    valid = torch.rand(B, N, generator=gen) < 0.95
    return [t.to(device) for t in (pos, yaw, length, width, valid)]


def candidate_scene(B: int, G: int, H: int, N: int, spread: float, device: torch.device, gen: torch.Generator):
    """G constant-curvature candidate arcs from the origin and N straight-moving others."""
    dt = 0.25
    t = torch.arange(1, H + 1, dtype=torch.float32) * dt  # (H,)
    speed = 15.0 * torch.rand(B, G, 1, generator=gen)
    curv = (torch.rand(B, G, 1, generator=gen) - 0.5) * 0.2
    arc = speed * t
    heading = curv * arc
    safe = torch.where(curv.abs() > 1e-4, curv, torch.full_like(curv, 1e-4))
    x = torch.where(curv.abs() > 1e-4, torch.sin(heading) / safe, arc)
    y = torch.where(curv.abs() > 1e-4, (1 - torch.cos(heading)) / safe, torch.zeros_like(arc))
    ego_pos, ego_yaw = torch.stack([x, y], -1), heading
    start = (torch.rand(B, 1, N, 2, generator=gen) - 0.5) * (2 * spread)
    h0 = torch.rand(B, 1, N, generator=gen) * 2 * math.pi
    v = 10.0 * torch.rand(B, 1, N, generator=gen)
    pos = start + torch.stack([torch.cos(h0), torch.sin(h0)], -1) * (v * t.view(1, H, 1)).unsqueeze(-1)
    yaw = h0.expand(B, H, N).contiguous()
    length = 3.5 + 2.0 * torch.rand(B, N, generator=gen)
    width = 1.6 + 0.6 * torch.rand(B, N, generator=gen)
    valid = torch.rand(B, H, N, generator=gen) < 0.95
    ego_len, ego_wid = torch.full((B,), 4.6), torch.full((B,), 1.9)
    args = (ego_pos, ego_yaw, ego_len, ego_wid, pos, yaw, length, width, valid)
    return [a.to(device) for a in args]


def dense_sat(ego_pos, ego_yaw, ego_len, ego_wid, pos, yaw, length, width, valid, chunk: int = 4):
    """All-pairs SAT, chunked over B (reference for the broad-phase speed-up)."""
    out = []
    for b0 in range(0, ego_pos.shape[0], chunk):
        s = slice(b0, b0 + chunk)
        hit = boxes_overlap(
            ego_pos[s, :, :, None], ego_yaw[s, ..., None], ego_len[s, None, None, None], ego_wid[s, None, None, None],
            pos[s, None], yaw[s, None], length[s, None, None], width[s, None, None],
        )
        out.append(hit & valid[s, None])
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")

    print("\npairwise_collisions vs brute_force_pairwise, B=64, agents over 1 km^2")
    print(f"{'N':>6} {'hash [ms]':>10} {'brute [ms]':>11} {'speed-up':>9} {'pairs':>6}")
    for N in (64, 128, 256, 512, 1024):
        scene = scattered_scene(64, N, 1000.0, device, gen)
        fast = pairwise_collisions(*scene)
        slow = brute_force_pairwise(*scene)
        assert all(torch.equal(a, b) for a, b in zip(fast, slow)), "hash and brute force disagree"
        t_hash = timeit(lambda: pairwise_collisions(*scene), device, args.reps)
        t_brute = timeit(lambda: brute_force_pairwise(*scene), device, max(1, args.reps // 2))
        print(f"{N:>6} {t_hash * 1e3:>10.2f} {t_brute * 1e3:>11.1f} {t_brute / t_hash:>8.1f}x {fast[0].numel():>6}")

    B, G, H, N = 16, 512, 20, 64
    n_pairs = B * G * H * N
    print(f"\ncandidate_collisions, B={B} G={G} H={H} N={N} ({n_pairs / 1e6:.1f} M pairs)")
    for label, spread in (("typical (+-60 m)", 60.0), ("crowded (+-12 m)", 12.0)):
        case = candidate_scene(B, G, H, N, spread, device, gen)
        hits = candidate_collisions(*case)
        assert torch.equal(hits, dense_sat(*case)), "candidate_collisions disagrees with dense SAT"
        t_fast = timeit(lambda: candidate_collisions(*case), device, args.reps)
        t_dense = timeit(lambda: dense_sat(*case), device, max(1, args.reps // 2))
        print(
            f"  {label:<17} {t_fast * 1e3:8.1f} ms = {n_pairs / t_fast / 1e6:7.1f} M pairs/s"
            f"   (dense all-pairs SAT: {t_dense * 1e3:7.1f} ms = {n_pairs / t_dense / 1e6:6.1f} M pairs/s;"
            f" hit rate {hits.float().mean().item():.4f})"
        )


if __name__ == "__main__":
    main()
