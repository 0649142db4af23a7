"""``craft sim-bench``: throughput of the closed-loop world, and highway-env's for comparison.

An agent-step is one agent advanced by one simulation step (dt = 0.1 s) with everything on: reactive
traffic (IDM, yielding, lights, lane changes, pedestrians), the ego driven through the shared tracker,
collisions and Bench2Drive events. highway-env's figure counts every vehicle on its road for every
simulation step its ``highway-fast-v0`` environment runs.
"""

from __future__ import annotations

import gc
import platform
import resource
import time

import numpy as np
import torch

from craft.world.autopilot import PlanExecutor, route_plan
from craft.world.towns import generate_town
from craft.world.world import World, WorldConfig, random_specs

REPLAN_EVERY = 5  # steps between ego re-plans, as a policy would


def _state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.tensors().values())


def _map_bytes(mb) -> int:
    return sum(v.numel() * v.element_size() for v in vars(mb).values() if isinstance(v, torch.Tensor))


def measure_world(world: World, worlds: int, agents: int, steps: int, seed: int = 0, repeats: int = 3) -> dict:
    """Time ``steps`` closed-loop steps of ``worlds`` worlds with ``agents`` agents each (ego included)."""
    n_ped = max(0, (agents - 1) // 4)
    n_veh = agents - 1 - n_ped
    specs = random_specs(world.maps, worlds, seed, n_vehicles=n_veh, n_pedestrians=n_ped)
    t0 = time.perf_counter()
    state = world.reset(specs, seed)
    reset_s = time.perf_counter() - t0
    driver = PlanExecutor(worlds, world.device)
    n_valid = int(state.valid.sum())

    def run(state, n):
        for k in range(n):
            if k % REPLAN_EVERY == 0:
                limit = world.maps.lane_speed_limit[state.map_id, state.lane[:, 0].clamp_min(0)]
                driver.set_plan(state, route_plan(state, limit * 0.8))
            state, _ = world.step(state, driver.control(state))
        return state

    state = run(state, 3)  # warm-up
    times = []
    for _ in range(repeats):  # best of a few timed blocks: a shared 2-core machine is noisy
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        state = run(state, steps)
        if world.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    elapsed = min(times)
    finite = all(torch.isfinite(t).all() for t in (state.pos, state.yaw, state.speed))
    return {
        "worlds": worlds,
        "agents": agents,
        "valid_agents": n_valid,
        "steps": steps,
        "seconds": elapsed,
        "seconds_all_repeats": times,
        "agent_steps_per_s_median": n_valid * steps / sorted(times)[len(times) // 2],
        "agent_steps_per_s": n_valid * steps / elapsed,
        "world_steps_per_s": worlds * steps / elapsed,
        "reset_s": reset_s,
        "state_mb": _state_bytes(state) / 2**20,
        "finite": bool(finite),
    }


def measure_highway_env(seconds: float = 5.0, seed: int = 0) -> dict:
    """Agent-steps/s of highway-env's ``highway-fast-v0`` with random actions (single process)."""
    import gymnasium as gym
    import highway_env  # noqa: F401  (registers the environments)

    env = gym.make("highway-fast-v0")
    env.reset(seed=seed)
    cfg = env.unwrapped.config
    sim_per_step = int(cfg["simulation_frequency"] // cfg["policy_frequency"])
    rng = np.random.default_rng(seed)
    agent_steps = 0
    t0 = time.perf_counter()
    while agent_steps == 0 or time.perf_counter() - t0 < seconds:  # at least one step, however short the budget
        n = len(env.unwrapped.road.vehicles)
        _, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
        agent_steps += n * sim_per_step
        if term or trunc:
            env.reset()
    elapsed = time.perf_counter() - t0
    env.close()
    return {"agent_steps_per_s": agent_steps / elapsed, "vehicles": int(cfg["vehicles_count"]) + 1,
            "simulation_steps_per_env_step": sim_per_step}


def run_sim_bench(configs: list[tuple[int, int]], steps: int = 50, device: str = "cpu", highway_env: bool = True,
                  seed: int = 0, towns: int = 4, verbose: bool = True, threads: list[int] | None = None,
                  highway_env_seconds: float = 5.0) -> dict:
    """Measure every (worlds, agents) configuration; returns the JSON-ready result.

    ``threads``: torch intra-op thread counts to try per configuration (default: 1 and all cores). Small
    batches are dispatch-bound and run best on one thread; large ones gain from more. Each configuration
    reports its best setting and keeps every measurement.
    """
    default_threads = torch.get_num_threads()
    tries = threads or sorted({1, default_threads})
    torch.manual_seed(seed)
    maps = [generate_town(seed + i) for i in range(towns)]
    world = World(maps, WorldConfig(), device=device)
    rows = []
    for w, a in configs:
        per = []
        for t in tries:
            torch.set_num_threads(t)
            gc.collect()
            r = measure_world(world, w, a, steps, seed)
            r["threads"] = t
            per.append(r)
        best = dict(max(per, key=lambda r: r["agent_steps_per_s"]))
        best["by_threads"] = {str(r["threads"]): r["agent_steps_per_s"] for r in per}
        rows.append(best)
        if verbose:
            print(f"{w:5d} worlds x {a:4d} agents: {best['agent_steps_per_s']:12,.0f} agent-steps/s "
                  f"({best['world_steps_per_s']:8,.0f} world-steps/s, {best['threads']} thread(s), "
                  f"state {best['state_mb']:.1f} MB)", flush=True)
    torch.set_num_threads(default_threads)
    out = {
        "device": str(world.device),
        "threads_tried": tries,
        "timing": "best of 3 blocks of `steps` steps after 3 warm-up steps",
        "machine": platform.processor() or platform.machine(),
        "map_mb": _map_bytes(world.maps) / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "configs": rows,
        "worlds": rows[0]["worlds"],
        "agents": rows[0]["agents"],
        "agent_steps_per_s": rows[0]["agent_steps_per_s"],
    }
    if highway_env:
        he = measure_highway_env(seconds=highway_env_seconds, seed=seed)
        out["highway_env_agent_steps_per_s"] = he["agent_steps_per_s"]
        out["highway_env"] = he
        out["ratio_vs_highway_env"] = out["agent_steps_per_s"] / he["agent_steps_per_s"]
        if verbose:
            print(f"highway-env highway-fast-v0: {he['agent_steps_per_s']:,.0f} agent-steps/s -> "
                  f"ratio {out['ratio_vs_highway_env']:.0f}x", flush=True)
    if verbose:
        print(f"peak RSS {out['peak_rss_mb']:.0f} MB, maps {out['map_mb']:.1f} MB", flush=True)
    return out
