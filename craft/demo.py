"""``craft demo`` (``make demo``): the quick start on the embedded default.

1. loads the committed pre-trained vocabulary-scoring policy (``checkpoints/vocab.pt``);
2. evaluates it closed loop on one route of every scenario type of the ``val`` split (44 routes), scored under
   ``b2d-star`` (a collision ends the route, the paper's protocol) and ``b2d``, and again under two more
   traffic seeds: the spread of those three is the evaluation's own noise on these routes;
3. fine-tunes it with CRAFT for a few iterations on ``train`` towns (the experiments' short-run settings), evaluating
   it on the same routes every ``iters // 2`` iterations (the learning curve, ``learning_curve.png``);
4. prints the before / after table (DS, SR, RC, IS, abilities; after = the last iteration, traffic seed ``seed``),
   then both policies' DS under all three traffic seeds and the mean gain against the evaluation's noise, and
   writes GIFs of
   one route before and after (the route whose driving score changed most), plus the usual evaluation outputs.

``craft demo --world-only`` instead drives random traffic worlds with the route-following ego and writes a GIF
(no policies involved).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from craft.files import check_out_dir, write_text
from craft.world.autopilot import PlanExecutor, route_plan
from craft.world.render import frame_of, render_gif, render_png
from craft.world.towns import generate_town
from craft.world.world import World, WorldConfig, random_specs


def run_world_demo(out: str | Path, seed: int = 0, worlds: int = 64, steps: int = 300) -> None:
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


def run_demo(out: str | Path, seed: int = 0, family: str = "vocab", iters: int = 4, buffer: int = 1024,
             worlds: int = 64, train_towns: int = 10, checkpoint: str | None = None) -> dict:
    """The quick start (see the module docstring); returns {"before": summary, "after": summary}."""
    from craft.bench.runner import EvalConfig, evaluate, make_driver, run_batch
    from craft.errors import CraftError
    from craft.finetune.collector import CollectorConfig
    from craft.experiments.core import SMALL_BUDGET
    from craft.finetune.trainer import FinetuneConfig, finetune
    from craft.scenarios.splits import load_split, split_town_seeds

    out = check_out_dir(out)
    t0 = time.time()
    from craft.policies.base import checkpoint_file, committed_checkpoint

    try:  # the committed checkpoint is found relative to the package, wherever the demo runs
        ckpt = checkpoint_file(checkpoint or committed_checkpoint(family))
    except CraftError:
        raise CraftError(f"pre-trained checkpoint '{checkpoint or committed_checkpoint(family)}' not found (the "
                         f"committed ones are checkpoints/<family>.pt of the repository); restore it with `git "
                         f"checkout checkpoints/`, or make it with `craft collect` + `craft pretrain --family "
                         f"{family}` (see README)") from None
    out.mkdir(parents=True, exist_ok=True)
    town = generate_town(split_town_seeds("val")[0])
    render_png(town, out / "town.png", title="a val town")
    ecfg = EvalConfig(seed=seed)
    print(f"[1/3] evaluating the pre-trained {family} policy on 44 val routes (one per scenario type)")
    if not (out / "eval-before" / "b2d-star" / "results.json").exists():
        evaluate(make_driver(str(ckpt)), "val", out / "eval-before" / "b2d", ecfg, routes=1,
                 also={"b2d-star": out / "eval-before" / "b2d-star"})
    noise_seeds = (seed + 1, seed + 2)  # the evaluation's own noise: the same routes under other traffic seeds
    for k in noise_seeds:
        folder = out / f"eval-before-traffic{k}"
        if not (folder / "b2d-star" / "results.json").exists():
            evaluate(make_driver(str(ckpt)), "val", folder / "b2d", replace(ecfg, seed=k), routes=1,
                     also={"b2d-star": folder / "b2d-star"})
    print(f"[2/3] fine-tuning with CRAFT: {iters} iterations of {buffer} transitions, evaluated on the same routes "
          f"every {max(1, iters // 2)} iterations")
    col = CollectorConfig(worlds=worlds, buffer_size=buffer, seed=seed,
                          town_seeds=tuple(split_town_seeds("train")[:train_towns]))
    ft = out / "finetune"
    cfg = FinetuneConfig(method="craft", iters=iters, seed=seed, collector=col, val_every=max(1, iters // 2),
                         val_routes=1, val_seed=seed, **SMALL_BUDGET)
    hist = finetune(ckpt, ft, cfg, resume=(ft / "trainer.pt").exists())
    from craft.bench.metrics import load_results

    def summary(folder: Path, proto: str) -> dict:
        return load_results(folder / proto / "results.json")["summary"]

    last = ft / "val" / f"it-{iters:04d}"
    print("[3/3] before / after on the same routes (after: the policy of the last iteration)")
    rows = [(f"{name} ({proto})", summary(folder, proto)) for proto in ("b2d-star", "b2d")
            for name, folder in (("pre-trained", out / "eval-before"), ("CRAFT", last))]
    before, after = rows[0][1], rows[1][1]
    cols = ["DS", "SR", "RC", "IS"]
    abl = ["Merging", "Overtaking", "Emergency_Brake", "Give_Way", "Traffic_Signs", "Mean"]
    lines = ["| policy | " + " | ".join(cols + abl) + " |", "|---|" + "---|" * (len(cols) + len(abl))]
    for name, s in rows:
        vals = [f"{s[c]:.2f}" for c in cols] + [("–" if s["abilities"][a] is None else f"{s['abilities'][a]:.1f}")
                                                for a in abl]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    # the evaluation's noise: both policies also run the same routes under two more traffic seeds
    for k in noise_seeds:
        folder = ft / "val" / f"it-{iters:04d}-traffic{k}"
        if not (folder / "b2d-star" / "results.json").exists():
            evaluate(make_driver(str(last / "policy.pt")), "val", folder / "b2d", replace(ecfg, seed=k), routes=1,
                     also={"b2d-star": folder / "b2d-star"})
    noise = {}
    for proto in ("b2d-star", "b2d"):
        pre_ds = [float(summary(f, proto)["DS"]) for f in
                  [out / "eval-before"] + [out / f"eval-before-traffic{k}" for k in noise_seeds]]
        post_ds = [float(summary(f, proto)["DS"]) for f in
                   [last] + [ft / "val" / f"it-{iters:04d}-traffic{k}" for k in noise_seeds]]
        noise[proto] = float(torch.tensor(pre_ds).std())
        gain = sum(post_ds) / 3 - sum(pre_ds) / 3
        lines.append(f"\n{proto}, traffic seeds {seed}, {', '.join(map(str, noise_seeds))}: pre-trained DS "
                     f"{' / '.join(f'{d:.2f}' for d in pre_ds)}, CRAFT {' / '.join(f'{d:.2f}' for d in post_ds)}; "
                     f"mean gain {gain:+.2f} DS against the evaluation's noise (std of the pre-trained DS over the "
                     f"seeds) {noise[proto]:.2f}: {abs(gain) / max(noise[proto], 1e-9):.1f}x")
    table = "\n".join(lines)
    print(table)
    from craft.experiments.core import learning_curve_plot, probe_plot

    pre = {p: float(summary(out / "eval-before", p)["DS"]) for p in ("b2d-star", "b2d")}
    learning_curve_plot({"craft": [hist]}, pre, out / "learning_curve.png", f"CRAFT on {family}: the 44 demo routes")
    probe_plot({"craft": [hist]}, out / "probe.png", f"CRAFT on {family}")
    print(f"learning curve -> {out / 'learning_curve.png'}, probe diagnostics -> {out / 'probe.png'}")
    # one route before and after: the largest driving-score change
    rb = load_results(out / "eval-before" / "b2d-star" / "results.json")["records"]
    ra = load_results(last / "b2d-star" / "results.json")["records"]
    delta = [a["scores"]["score_composed"] - b["scores"]["score_composed"] for a, b in zip(ra, rb)]
    i = max(range(len(delta)), key=lambda k: (abs(delta[k]), delta[k]))
    inst_all, towns = load_split("val", routes=1)
    world = World(towns)
    for name, pol, rec in (("before", str(ckpt), rb[i]), ("after", str(last / "policy.pt"), ra[i])):
        inst = inst_all[i]
        _, frames = run_batch(world, [inst], make_driver(pol), ecfg, frames_for={0})
        path = out / f"route_{name}.gif"
        render_gif(world.maps.maps[inst.spec.map_index], frames[0], path,
                   title=f"{inst.type} {name}: DS {rec['scores']['score_composed']:.1f}")
        print(f"GIF of {inst.type} {name} fine-tuning -> {path}")
    write_text(out / "before_after.md", table + "\n")  # last: the demo's result
    print(f"demo finished in {time.time() - t0:.0f} s; outputs under {out}")
    return {"before": before, "after": after, "noise_std": noise}
