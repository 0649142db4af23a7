"""Real-town figures for docs/real-maps.md: import time (no cache, then cached) and map size per shipped town, and world
throughput on Town04 against a procedural town in one run. Usage: python benchmarks/real_maps.py [OUT.json]"""
import json, time, os, tempfile
import numpy as np, torch
torch.set_num_threads(1)
from craft.data.carla import carla_data, TOWNS
from craft.world.opendrive import load_opendrive
from craft.world.map import LaneType
from craft.world.towns import generate_town
from craft.world.world import World, WorldSpec
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()
rows = {}
for t in TOWNS:
    f = carla_data() / f"{t}.xodr"
    t0 = time.perf_counter(); m = load_opendrive(f); t_imp = time.perf_counter() - t0
    t0 = time.perf_counter(); load_opendrive(f); t_cache = time.perf_counter() - t0
    drive = m.lane_type == int(LaneType.DRIVING)
    cache = sum(p.stat().st_size for p in (__import__("pathlib").Path(os.environ["XDG_CACHE_HOME"]) / "craft" / "maps").glob(f"{t}_*.npz"))
    rows[t] = dict(import_s=round(t_imp, 2), cached_s=round(t_cache, 3), xodr_mb=round(f.stat().st_size / 1e6, 2),
                   lanes=int(m.num_lanes), driving_km=round(float(m.lane_length[drive & (m.lane_junction < 0)].sum()) / 1000, 1),
                   connectors=int((drive & (m.lane_junction >= 0)).sum()), junctions=len(m.junction_kind),
                   signal_junctions=int((m.junction_kind == 2).sum()), lights=len(m.light_lane), stops=len(m.stop_lane),
                   sidewalk_lanes=int((m.lane_type == int(LaneType.SIDEWALK)).sum()),
                   crosswalk_lanes=int((m.lane_type == int(LaneType.CROSSWALK)).sum()), points=len(m.points),
                   cache_mb=round(cache / 1e6, 2))
    print(t, rows[t], flush=True)

def throughput(m, B=32, veh=48, ped=16, steps=40):
    world = World([m])
    drive = np.nonzero((m.lane_type == 0) & (m.lane_junction < 0) & (m.lane_length > 60))[0]
    rng = np.random.default_rng(0)
    specs = []
    for b in range(B):
        lane = int(drive[rng.integers(len(drive))])
        specs.append(WorldSpec(0, [lane] + [int(x) for x in m.successors(lane)[:1]], 5.0, 0.0, veh, ped))
    st = world.reset(specs, 0)
    ctl = torch.zeros(B, 2)
    for _ in range(5):
        st, _ = world.step(st, ctl)
    t0 = time.perf_counter()
    for _ in range(steps):
        st, _ = world.step(st, ctl)
    dt = time.perf_counter() - t0
    n = int(st.valid.sum())
    return dict(worlds=B, agents=n, steps=steps, agent_steps_per_s=round(n * steps / dt))
town04 = load_opendrive(carla_data() / "Town04.xodr")
proc = generate_town(0)
tp = {"Town04": throughput(town04), "procedural town seed 0": throughput(proc)}
print(tp)
import sys
json.dump({"towns": rows, "throughput": tp}, open(sys.argv[1] if len(sys.argv) > 1 else "real_maps.json", "w"), indent=1)
