"""``craft demo`` (``make demo``): the main job on the embedded default world.

Until the benchmark, policies and fine-tuning land, the demo renders a procedural town, drives a batch
of worlds in closed loop with the route-following ego through the shared tracker, prints what happened
(Bench2Drive events per world), writes a GIF of one world, and runs a small throughput benchmark.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from craft.world.autopilot import PlanExecutor, route_plan
from craft.world.render import render_gif, render_png
from craft.world.towns import generate_town
from craft.world.world import World, WorldConfig, random_specs


def frame_of(world: World, state, b: int) -> dict:
    """A renderer frame (numpy) of world ``b``."""
    lights = world.lights(state)[b]
    return {
        "pos": state.pos[b].cpu().numpy(),
        "yaw": state.yaw[b].cpu().numpy(),
        "length": state.length[b].cpu().numpy(),
        "width": state.width[b].cpu().numpy(),
        "kind": state.kind[b].cpu().numpy(),
        "valid": state.valid[b].cpu().numpy(),
        "siren": state.siren[b].cpu().numpy(),
        "speed": state.speed[b].cpu().numpy(),
        "lights": lights.cpu().numpy(),
        "route": state.route_pts[b][state.route_valid[b]].cpu().numpy(),
        "time": float(state.step[b]) * world.cfg.dt,
    }


def run_demo(out: str | Path, seed: int = 0, worlds: int = 64, steps: int = 300) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t0 = time.time()
    towns = [generate_town(seed + i) for i in range(2)]
    render_png(towns[0], out / "town.png", title=f"town seed {seed}")
    print(f"town seed {seed}: {towns[0].num_lanes} lanes, {len(towns[0].junction_kind)} junctions -> {out/'town.png'}")
    world = World(towns, WorldConfig())
    specs = random_specs(world.maps, worlds, seed, n_vehicles=30, n_pedestrians=10, min_length=150.0)
    state = world.reset(specs, seed)
    driver = PlanExecutor(worlds)
    frames = []
    totals = {"collisions": 0, "red_light": 0, "stop": 0, "outside_m": 0.0}
    for k in tqdm(range(steps), desc="closed loop", unit="step"):
        if k % 5 == 0:
            limit = world.maps.lane_speed_limit[state.map_id, state.lane[:, 0].clamp_min(0)]
            driver.set_plan(state, route_plan(state, 0.8 * limit))
        state, ev = world.step(state, driver.control(state))
        totals["collisions"] += int((ev.collision_vehicle | ev.collision_pedestrian | ev.collision_layout).sum())
        totals["red_light"] += int(ev.red_light.sum())
        totals["stop"] += int(ev.stop_infraction.sum())
        totals["outside_m"] += float(ev.outside_lanes.sum())
        if k % 2 == 0:
            frames.append(frame_of(world, state, 0))
    rc = (state.progress / state.route_length.clamp_min(1e-6) * 100).clamp(max=100)
    print(f"{worlds} worlds x {steps} steps of route-following (it ignores traffic and signals, so it collides "
          f"and runs lights on purpose):")
    print(f"  mean route completion {rc.mean():.1f} %, counted collisions {totals['collisions']}, "
          f"red lights {totals['red_light']}, stop signs {totals['stop']}, outside lanes {totals['outside_m']:.0f} m")
    render_gif(world.maps.maps[0], frames, out / "world0.gif")
    print(f"GIF of world 0 -> {out/'world0.gif'}")
    from craft.world.simbench import run_sim_bench

    run_sim_bench([(256, 64)], steps=20, highway_env=False, seed=seed, towns=2)
    print(f"demo finished in {time.time() - t0:.0f} s")
