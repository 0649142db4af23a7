"""The ``craft`` command line.

Every sub-command validates its arguments (numbers finite and in range) and its output paths (creatable,
writable, a folder or a file name as needed) before any work starts; bad input prints one line
``craft: error: ...`` and exits with status 2, and nothing half-written is left on disk. Every command that
writes an output holds it for its whole run (:func:`craft.files.own_output`: one owner per output folder or
file; a second run of the same ``--out`` is one line, exit 2). ``--help`` of every sub-command shows the
defaults.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from craft.checks import LR_MAX, SEED_MAX

INT_MAX = 2**31 - 1
"""Largest count / step option accepted (counts become int64 tensor indices and step caps)."""
from craft.errors import CraftError
from craft.files import check_out_dir, own_output, write_json


def _float(s: str, what: str, ok) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{s}'") from None
    if not math.isfinite(v) or not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {s}")
    return v


def _positive_float(s: str) -> float:
    return _float(s, "a finite number > 0", lambda v: v > 0)


def _learning_rate(s: str) -> float:
    return _float(s, f"a learning rate in (0, {LR_MAX:g}]", lambda v: 0 < v <= LR_MAX)


def _final_learning_rate(s: str) -> float:
    return _float(s, f"a learning rate in [0, {LR_MAX:g}]", lambda v: 0 <= v <= LR_MAX)


def _probability(s: str) -> float:
    return _float(s, "a probability in [0, 1]", lambda v: 0 <= v <= 1)


def _seed(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a seed (an integer in 0..{SEED_MAX}), got '{s}'") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected a seed (an integer in 0..{SEED_MAX}), got {v}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got '{s}'") from None
    if not 0 <= v <= INT_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{INT_MAX}, got {v}")
    return v


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{s}'") from None
    if not 0 < v <= INT_MAX:
        raise argparse.ArgumentTypeError(f"expected a positive integer (at most {INT_MAX}), got {v}")
    return v


def _device(s: str) -> str:
    import torch

    if s == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("--device cuda requested but no CUDA device is available; use --device cpu")
    if s not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device must be cpu or cuda, got '{s}'")
    return s


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to a temporary name in the same directory, then rename (see :mod:`craft.files`)."""
    write_json(path, obj)


# ---------------------------------------------------------------------- sub-commands
def cmd_sim_bench(args) -> int:
    from craft.world.simbench import run_sim_bench

    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs]
    with _own(args.json, "--json", "file"):
        result = run_sim_bench(configs, steps=args.steps, device=args.device, highway_env=not args.no_highway_env,
                               seed=args.seed, threads=args.threads, highway_env_seconds=args.highway_env_seconds)
        if args.json:
            write_json_atomic(args.json, result)
            print(f"wrote {args.json}")
    return 0


def _own(path, flag: str = "--out", kind: str = "dir"):
    """:func:`own_output` of an optional output (a no-op when ``path`` is None)."""
    from contextlib import nullcontext

    return nullcontext() if path is None else own_output(path, flag, kind)


def cmd_render(args) -> int:
    from craft.world.render import render_png

    if args.routes_file and not args.map:
        raise CraftError("--routes-file needs --map FILE.xodr (the town its routes are drawn on)")
    with own_output(args.out, kind="file"):
        if args.map:
            from craft.world.opendrive import load_opendrive
            from craft.scenarios.routefile import render_routes_png

            town = load_opendrive(args.map)
            if args.routes_file:
                n = render_routes_png(town, args.routes_file, args.out, routes=args.routes_ids)
                print(f"wrote {args.out} ({town.name}: {town.num_lanes} lanes, {len(town.junction_kind)} junctions, "
                      f"{len(town.light_lane)} lights, {len(town.stop_lane)} stop signs, {n} routes)")
                return 0
            render_png(town, args.out, title=town.name)
            print(f"wrote {args.out} ({town.num_lanes} lanes, {len(town.junction_kind)} junctions)")
            return 0
        from craft.world.towns import generate_town

        town = generate_town(args.town_seed)
        render_png(town, args.out, title=f"town seed {args.town_seed}")
    print(f"wrote {args.out} ({town.num_lanes} lanes, {len(town.junction_kind)} junctions)")
    return 0


def _routes_file_arg(args) -> dict | None:
    """``--routes-file`` / ``--maps`` as the routes_file dict of the evaluation / collection code."""
    if getattr(args, "routes_file", None) is None:
        if getattr(args, "maps", None):
            raise CraftError("--maps is only used with --routes-file")
        return None
    from craft.data.carla import carla_data

    if not Path(args.routes_file).is_file():
        raise CraftError(f"--routes-file '{args.routes_file}' is not a file")
    maps = args.maps or str(carla_data())
    if not Path(maps).is_dir():
        raise CraftError(f"--maps '{maps}' is not a folder of <town>.xodr files")
    return {"path": args.routes_file, "maps": maps, "routes": getattr(args, "route_ids", None),
            "towns": getattr(args, "towns", None)}


def cmd_eval(args) -> int:
    from craft.bench.runner import EvalConfig, evaluate, make_driver
    from craft.scenarios.splits import SPLITS

    rf = _routes_file_arg(args)
    if rf is None and args.split not in SPLITS:
        raise CraftError(f"unknown split '{args.split}': use one of {', '.join(SPLITS)}")
    label = Path(args.routes_file).stem if rf is not None else args.split
    cfg = EvalConfig(protocol=args.protocol, gif_worst=args.gif, batch_size=args.batch_size, seed=args.seed,
                     max_steps=args.max_steps)
    with own_output(args.out):
        driver = make_driver(args.policy, device=args.device)
        summary = evaluate(driver, label, args.out, cfg, town_seeds=args.town_seeds, routes=args.routes,
                           device=args.device, types=args.types, workers=args.workers, address=args.address,
                           routes_file=rf)
    for line in summary.get("refused", []):
        print(f"refused: {line}", file=sys.stderr)
    ab = summary["abilities"]
    print(f"{driver.name} on {label} ({summary['num_routes']} routes, {args.protocol}): "
          f"DS {summary['DS']:.2f}  SR {summary['SR']:.2f}  RC {summary['RC']:.2f}  IS {summary['IS']:.3f}  "
          f"abilities mean {ab['Mean'] if ab['Mean'] is not None else float('nan'):.2f}  "
          f"({summary['wall_time_s']:.0f} s) -> {args.out}")
    return 0


def cmd_collect(args) -> int:
    from craft.policies.data import CollectConfig, collect
    from craft.scenarios.splits import SPLITS

    rf = _routes_file_arg(args)
    if rf is None and args.split not in SPLITS:
        raise CraftError(f"unknown split '{args.split}': use one of {', '.join(SPLITS)}")
    cfg = CollectConfig(split=args.split, routes=args.routes, routes_file=(rf["path"], rf["maps"]) if rf else None,
                        town_seeds=tuple(args.town_seeds) if args.town_seeds else None,
                        types=tuple(args.types) if args.types else None, batch_size=args.batch_size, perturb_prob=args.perturb, seed=args.seed)
    with own_output(args.out, kind="file"):
        info = collect(cfg, args.out, device=args.device)
    print(f"collected {info['samples']} expert decisions on {info['routes']} {args.split} routes "
          f"({info['seconds']:.0f} s) -> {args.out}")
    return 0


def cmd_pretrain(args) -> int:
    from craft.policies.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(family=args.family, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed)
    with own_output(args.out):
        m = pretrain(args.data, args.out, cfg, resume=args.resume)
    print(f"pretrained {args.family} -> {args.out}/policy.pt; held-out open loop: L2 1/2/3 s "
          f"{m['l2_1s']:.2f}/{m['l2_2s']:.2f}/{m['l2_3s']:.2f} m, accuracy {m['accuracy']:.3f} "
          f"({m['train_seconds']:.0f} s)")
    return 0


def cmd_dagger(args) -> int:
    import torch

    from craft.policies.dagger import DaggerConfig, dagger

    torch.set_num_threads(args.threads)
    cfg = DaggerConfig(family=args.family, rounds=args.rounds, routes=args.routes,
                       town_seeds=tuple(args.town_seeds) if args.town_seeds else None,
                       types=tuple(args.types) if args.types else None, beta=args.beta, beta_decay=args.beta_decay,
                       perturb_prob=args.perturb, batch_size=args.batch_size, steps=args.steps,
                       train_batch=args.train_batch, lr=args.lr, warm_start=not args.cold_start,
                       val_routes=args.val_routes, seed=args.seed,
                       **({"max_steps": args.max_steps, "val_max_steps": args.max_steps} if args.max_steps else {}))
    with own_output(args.out):
        rows = dagger(args.init, args.data, args.out, cfg, resume=args.resume, device=args.device)
    for r in rows:
        ol = r["openloop"]
        print(f"round {r['round']}: {r['samples_total']} samples, open loop accuracy {ol['accuracy']:.3f} L2 3 s "
              f"{ol['l2_3s']:.2f} m entropy {ol['entropy']:.2f}, val DS {r['val_DS']:.2f} SR {r['val_SR']:.2f} "
              f"({r['t_round']:.0f} s)")
    print(f"-> {args.out}/policy.pt (last round), {args.out}/best.pt (best val DS), {args.out}/rounds.png")
    return 0


def cmd_finetune(args) -> int:
    from dataclasses import replace

    from craft.finetune.collector import CollectorConfig
    from craft.finetune.trainer import FinetuneConfig, finetune

    rf = _routes_file_arg(args)
    col = CollectorConfig(split=args.split, worlds=args.worlds, buffer_size=args.buffer, seed=args.seed,
                          routes_file=(rf["path"], rf["maps"]) if rf else None,
                          routes=args.routes, town_seeds=tuple(args.town_seeds) if args.town_seeds else None,
                          types=tuple(args.types) if args.types else None)
    cfg = FinetuneConfig(method=args.method, family=args.family, iters=args.iters, seed=args.seed, collector=col)
    over = {k: v for k, v in (("lr", args.lr), ("lr_end", args.lr_end), ("epochs", args.epochs),
                              ("minibatch", args.minibatch), ("teacher_half_life", args.teacher_half_life),
                              ("val_every", args.val_every)) if v is not None}
    if args.teacher_per_step:
        over["teacher_per_step"] = True
    if over:
        cfg = replace(cfg, **over)
    if args.no_proxy or args.no_residual or args.no_distill:
        if args.method != "craft":
            raise CraftError("--no-proxy / --no-residual / --no-distill are ablations of --method craft")
        cfg = replace(cfg, use_proxy=not args.no_proxy, use_residual=not args.no_residual,
                      use_distill=not args.no_distill)
    with own_output(args.out):
        hist = finetune(args.init, args.out, cfg, device=args.device, resume=args.resume, workers=args.workers,
                        address=args.address, compile_proxy=args.compile_proxy)
    last = hist[-1] if hist and isinstance(hist[-1], dict) else {}

    def sec(k: str) -> str:
        v = last.get(k)
        return f"{v:.1f}" if isinstance(v, (int, float)) else "?"

    print(f"{args.method}: {last.get('iteration', '?')} iterations -> {args.out}/policy.pt (last iteration "
          f"{last.get('transitions', '?')} transitions, collect {sec('t_collect')} s, score {sec('t_score')} s, "
          f"update {sec('t_update')} s)")
    return 0


def cmd_finetune_bench(args) -> int:
    from craft.finetune.bench import BenchConfig, finetune_bench

    cfg = BenchConfig(init=args.init, method=args.method, workers=tuple(args.workers), iters=args.iters,
                      worlds=args.worlds, buffer=args.buffer, split=args.split,
                      town_seeds=tuple(args.town_seeds) if args.town_seeds else None, routes=args.routes,
                      seed=args.seed, device=args.device, address=args.address, proxy_states=args.proxy_states,
                      compile_proxy=args.compile_proxy)
    with _own(args.json, "--json", "file"):
        res = finetune_bench(cfg)
        if args.json:
            write_json_atomic(args.json, res)
    for r in res["runs"]:
        print(f"workers {r['workers']}: start-up {r['startup_s']:.1f} s, {r['s_per_iter']:.1f} s/iteration "
              f"(collect {r['collect_s']:.1f} / score {r['score_s']:.1f} / update {r['update_s']:.1f}), "
              f"{r['s_per_iter_with_startup']:.1f} s/iteration with start-up")
    if "speedup" in res:
        print(f"time of {res['speedup']['workers']} workers / 1 worker: {res['speedup']['ratio']:.2f} "
              f"({res['speedup']['ratio_with_startup']:.2f} with start-up)")
    px = res.get("proxy")
    if px:
        print(f"proxy: {px['candidate_steps_per_s'] / 1e6:.2f}M candidate-steps/s (B={px['states']}, G={px['G']}, "
              f"H={px['H']}, 1 thread{', compiled' if px.get('compiled') else ''})")
    if args.json:
        print(f"-> {args.json}")
    return 0


def cmd_experiment(args) -> int:
    import torch

    from craft.experiments import SMALL_BUDGET, ExperimentConfig, run_experiment

    torch.set_num_threads(args.threads)

    overrides = {k: v for k, v in (("lr", args.lr), ("lr_end", args.lr_end), ("epochs", args.epochs),
                                   ("minibatch", args.minibatch)) if v is not None}
    cfg = ExperimentConfig(family=args.family, init=args.init or "", seeds=tuple(range(args.seeds)),
                           iters=args.iters, buffer=args.buffer, worlds=args.worlds, split=args.split,
                           routes=args.routes, methods=tuple(args.methods), train_towns=args.train_towns,
                           protocols=tuple(args.protocols), finetune={**SMALL_BUDGET, **overrides},
                           eval_seeds=tuple(range(args.eval_seeds)), val_every=args.val_every)
    if args.name in ("report", "archive"):
        if not Path(args.out).is_dir():
            raise CraftError(f"experiment root '{args.out}' is not a folder of experiment results: nothing to "
                             "report (run an experiment there first, or pass its --out)")
    else:
        check_out_dir(args.out)  # a shared root: its runs are locked one by one (craft.experiments.core.locked)
    with _own(args.doc if args.name in ("all", "report") else None, "--doc", "file"):
        text = run_experiment(args.name, cfg, args.out, families=tuple(args.families) if args.families else None,
                              doc=args.doc)
    print(text)
    return 0


def cmd_demo(args) -> int:
    from craft.demo import run_demo, run_world_demo

    with own_output(args.out):
        if args.world_only:
            run_world_demo(args.out, seed=args.seed)
        else:
            run_demo(args.out, seed=args.seed, family=args.family, iters=args.iters)
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows every option's default (``(default: X)``) unless its text already speaks of it; flags
    and options without a default (None) show none."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d is argparse.SUPPRESS or not action.option_strings:
            return text
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else d
        return f"{text} (default: {shown})".strip()


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit status 2 and the defaults in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def _ray_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--workers", type=_positive_int, default=1, help=what)
    p.add_argument("--address", help="join an existing Ray cluster: auto (the one `ray start` made here) or "
                                     "HOST:PORT of its head; default: a local Ray when --workers > 1")


def _routes_file_args(p: argparse.ArgumentParser, ids: bool = True) -> None:
    p.add_argument("--routes-file", help="drive the routes of this leaderboard route file (leaderboard-1.0 or "
                                         "Bench2Drive format) on real towns instead of --split")
    p.add_argument("--maps", help="with --routes-file: folder of <town>.xodr maps named by the routes' town "
                                  "(default: the towns shipped with craft)")
    if ids:
        p.add_argument("--route-ids", nargs="+", help="with --routes-file: only these route ids")
        p.add_argument("--towns", nargs="+", help="with --routes-file: only the routes in these towns")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="craft", description="Closed-loop reinforcement fine-tuning of driving policies.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("sim-bench", help="measure the world's throughput (agent-steps/s) against highway-env")
    b.add_argument("--configs", nargs="+", default=["256x64", "1024x64", "256x128"],
                   help="WORLDSxAGENTS configurations (default: 256x64 1024x64 256x128)")
    b.add_argument("--steps", type=_positive_int, default=50, help="timed steps per configuration")
    b.add_argument("--device", type=_device, default="cpu", help="cpu or cuda")
    b.add_argument("--seed", type=_seed, default=0)
    b.add_argument("--threads", type=_positive_int, nargs="+", default=None,
                   help="torch thread counts to try per configuration (default: 1 and all cores; best reported)")
    b.add_argument("--no-highway-env", action="store_true", help="skip the highway-env comparison")
    b.add_argument("--highway-env-seconds", type=_positive_float, default=5.0, help="how long to time highway-env")
    b.add_argument("--json", help="write the figures to this JSON file")
    b.set_defaults(func=cmd_sim_bench)

    r = sub.add_parser("render", help="draw a procedural town, or a real one (--map) with its routes, as a PNG")
    r.add_argument("--town-seed", type=_seed, default=0)
    r.add_argument("--map", help="draw this OpenDRIVE town (.xodr) instead of a procedural one")
    r.add_argument("--routes-file", help="with --map: draw the routes of this route file that lie in the town")
    r.add_argument("--routes", dest="routes_ids", nargs="+", help="with --routes-file: only these route ids")
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_render)

    e = sub.add_parser("eval", help="closed-loop evaluation on a benchmark split (Bench2Drive metrics)")
    e.add_argument("--policy", required=True, help="expert, lane-follow, or a checkpoint path")
    e.add_argument("--split", default="test", help="test, val, train or long")
    e.add_argument("--routes", type=_positive_int, help="routes per scenario type (default: the split's; --split long: "
                                                              "long routes in all, default 36)")
    e.add_argument("--town-seeds", type=_seed, nargs="+", help="evaluate on these town seeds instead")
    e.add_argument("--types", nargs="+", help="only these scenario types")
    e.add_argument("--protocol", choices=["b2d", "b2d-star"], default="b2d-star",
                   help="b2d-star: a collision ends the route (the paper's protocol, primary everywhere); b2d: "
                        "Bench2Drive's rules")
    e.add_argument("--device", type=_device, default="cpu", help="cpu or cuda")
    e.add_argument("--gif", type=_nonneg_int, default=0, metavar="K", help="GIFs of the K lowest-DS routes")
    e.add_argument("--batch-size", type=_positive_int, default=220, help="routes simulated together")
    e.add_argument("--seed", type=_seed, default=0, help="background traffic seed")
    _routes_file_args(e)
    e.add_argument("--max-steps", type=_positive_int, default=None,
                   help="simulation steps cap per route (default: 2000 = 200 s; long routes: their own cap, "
                        "which grows with their length)")
    _ray_args(e, "the evaluation's batches (--batch-size routes each) dealt to N Ray workers; the records equal "
                 "a one-process run with the same --batch-size (use --batch-size <= routes / N)")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("collect", help="record expert demonstrations on a split for imitation pre-training")
    c.add_argument("--split", default="train", help="test, val, train or long")
    c.add_argument("--routes", type=_positive_int, help="routes per scenario type (default: the split's)")
    c.add_argument("--town-seeds", type=_seed, nargs="+", help="collect on these town seeds instead")
    c.add_argument("--types", nargs="+", help="only these scenario types")
    _routes_file_args(c, ids=False)
    c.add_argument("--perturb", type=_probability, default=0.2,
                   help="probability per decision of executing a perturbed expert plan (label stays clean)")
    c.add_argument("--batch-size", type=_positive_int, default=220, help="routes simulated together")
    c.add_argument("--seed", type=_seed, default=0)
    c.add_argument("--device", type=_device, default="cpu", help="cpu or cuda")
    c.add_argument("--out", required=True, help="demonstrations file to write (e.g. out/data/train.pt)")
    c.set_defaults(func=cmd_collect)

    t = sub.add_parser("pretrain", help="open-loop imitation pre-training of a policy family")
    t.add_argument("--family", required=True, choices=["vocab", "hier", "vla"])
    t.add_argument("--data", required=True, help="demonstrations file from `craft collect`")
    t.add_argument("--steps", type=_positive_int, default=3000, help="optimiser steps")
    t.add_argument("--batch-size", type=_positive_int, default=256, help="demonstrations per step")
    t.add_argument("--lr", type=_learning_rate, default=1e-3, help="learning rate")
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    t.add_argument("--out", required=True, help="output folder (policy.pt, state.pt, metrics.csv, tb/)")
    t.set_defaults(func=cmd_pretrain)

    g = sub.add_parser("dagger", help="closed-loop imitation: the policy drives train routes, the expert labels the "
                                      "states it visits, the data is aggregated and the policy retrained (DAgger)")
    g.add_argument("--family", required=True, choices=["vocab", "hier", "vla"])
    g.add_argument("--init", required=True, help="pre-trained policy checkpoint (file or folder) of --family")
    g.add_argument("--data", required=True, help="its expert demonstrations (from `craft collect`), aggregated with "
                                                 "every round's data")
    g.add_argument("--rounds", type=_positive_int, default=3, help="DAgger rounds")
    g.add_argument("--routes", type=_positive_int, default=4,
                   help="train routes per scenario type driven per round")
    g.add_argument("--town-seeds", type=_seed, nargs="+", help="drive on these train town seeds instead")
    g.add_argument("--types", nargs="+", help="only these scenario types (driving and the val subset)")
    g.add_argument("--beta", type=_probability, default=0.0,
                   help="probability of executing the expert's plan per decision in round 1 (0: the policy drives "
                        "alone)")
    g.add_argument("--beta-decay", type=_probability, default=0.5,
                   help="beta of round k = beta * decay^(k-1)")
    g.add_argument("--perturb", type=_probability, default=0.0,
                   help="probability of perturbing an executed expert plan")
    g.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps per round")
    g.add_argument("--train-batch", type=_positive_int, default=256, help="samples per optimizer step")
    g.add_argument("--lr", type=_learning_rate, default=5e-4, help="peak learning rate per round")
    g.add_argument("--cold-start", action="store_true", help="retrain every round from --init, not the last round")
    g.add_argument("--val-routes", type=_positive_int, default=1,
                   help="val routes per scenario type of the closed-loop val subset")
    g.add_argument("--batch-size", type=_positive_int, default=220, help="routes simulated together")
    g.add_argument("--max-steps", type=_positive_int, default=None,
                   help="simulation steps cap per route, driving and val (default: 2000 = 200 s)")
    g.add_argument("--seed", type=_seed, default=0)
    g.add_argument("--threads", type=_positive_int, default=1, help="torch threads")
    g.add_argument("--device", type=_device, default="cpu", help="torch device")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    g.add_argument("--out", required=True, help="output folder (round-NNNN/, rounds.csv/png, policy.pt, best.pt)")
    g.set_defaults(func=cmd_dagger)

    f = sub.add_parser("finetune", help="closed-loop RL fine-tuning of a pre-trained policy (CRAFT or a baseline)")
    f.add_argument("--method", required=True, choices=["craft", "grpo", "ppo", "reinforcepp"])
    f.add_argument("--init", required=True, help="pre-trained policy checkpoint (file or folder)")
    f.add_argument("--family", choices=["vocab", "hier", "vla"], help="require the checkpoint to be of this family")
    f.add_argument("--iters", type=_positive_int, default=10, help="fine-tuning iterations")
    f.add_argument("--split", default="train", help="split whose routes are driven (default train)")
    f.add_argument("--routes", type=_positive_int, help="routes per scenario type")
    f.add_argument("--town-seeds", type=_seed, nargs="+", help="drive on these town seeds instead")
    f.add_argument("--types", nargs="+", help="only these scenario types")
    _routes_file_args(f, ids=False)
    f.add_argument("--worlds", type=_positive_int, default=128, help="routes driven in parallel")
    f.add_argument("--buffer", type=_positive_int, default=2048, help="transitions per iteration")
    f.add_argument("--lr", type=_learning_rate, help="learning rate (default: the paper's 1e-4)")
    f.add_argument("--lr-end", type=_final_learning_rate, help="final learning rate of the cosine decay (default 5e-6)")
    f.add_argument("--epochs", type=_positive_int, help="passes over each buffer (default 2)")
    f.add_argument("--minibatch", type=_positive_int, help="transitions per optimiser step (default 512)")
    f.add_argument("--no-proxy", action="store_true", help="ablation: CRAFT without the counterfactual proxy")
    f.add_argument("--no-residual", action="store_true", help="ablation: CRAFT without the grounded residual")
    f.add_argument("--no-distill", action="store_true", help="ablation: no teacher KL terms")
    f.add_argument("--teacher-half-life", type=_positive_float,
                   help="budget-aware teacher: EMA half-life as a share of the run (default: m = 0.99 per iteration)")
    f.add_argument("--teacher-per-step", action="store_true", help="update the EMA teacher after every optimiser step")
    f.add_argument("--val-every", type=_nonneg_int, help="closed-loop evaluation on a val subset every N iterations (0: off)")
    f.add_argument("--seed", type=_seed, default=0)
    f.add_argument("--device", type=_device, default="cpu", help="cpu or cuda")
    f.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    _ray_args(f, "collect and score on N Ray workers (1: in this process)")
    f.add_argument("--compile-proxy", action="store_true",
                   help="the proxy's fast path: C kernels for the lane query and route tracking (needs a C compiler) "
                        "and torch.compile of the ego step and reward sums (tens of seconds of compiling per process); "
                        "scores equal within float tolerance")
    f.add_argument("--out", required=True)
    f.set_defaults(func=cmd_finetune)

    fb = sub.add_parser("finetune-bench", help="seconds per fine-tuning iteration per worker count, and the proxy's "
                                               "candidate-steps/s")
    fb.add_argument("--init", default="checkpoints/vocab.pt", help="policy checkpoint (default checkpoints/vocab.pt)")
    fb.add_argument("--method", default="craft", choices=["craft", "grpo", "ppo", "reinforcepp"], help="fine-tuning method")
    fb.add_argument("--workers", type=_positive_int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    fb.add_argument("--iters", type=_positive_int, default=3, help="timed iterations per worker count (default 3)")
    fb.add_argument("--worlds", type=_positive_int, default=128, help="routes driven in parallel")
    fb.add_argument("--buffer", type=_positive_int, default=2048, help="transitions per iteration")
    fb.add_argument("--split", default="train", help="split whose routes are driven")
    fb.add_argument("--town-seeds", type=_seed, nargs="+", help="drive on these town seeds (default: 20 train towns)")
    fb.add_argument("--routes", type=_positive_int, help="routes per scenario type")
    fb.add_argument("--proxy-states", type=int, default=64,
                    help="snapshots for the proxy throughput figure at G = 512, H = 20 (0: skip)")
    fb.add_argument("--compile-proxy", action="store_true",
                    help="the proxy's fast path (C kernels + torch.compile; see finetune --compile-proxy), in the runs "
                         "and the proxy figure")
    fb.add_argument("--seed", type=_seed, default=0)
    fb.add_argument("--device", type=_device, default="cpu", help="cpu or cuda")
    fb.add_argument("--address", help="join this Ray cluster (auto or HOST:PORT) instead of a local Ray")
    fb.add_argument("--json", help="write the figures to this JSON file")
    fb.set_defaults(func=cmd_finetune_bench)

    x = sub.add_parser("experiment", help="the paper's experiments on this benchmark (resumable)")
    x.add_argument("name", choices=["main", "ablation", "transfer", "scaling", "stability", "fidelity", "all",
                                    "report", "archive"],
                   help="an experiment; all: every one, then docs/results.md; report: only docs/results.md; "
                        "archive: copy the finished runs' small files into docs/results/pool (committed; a new "
                        "machine restores them from there instead of computing them)")
    x.add_argument("--family", default="vocab", choices=["vocab", "hier", "vla"], help="policy family")
    x.add_argument("--init", help="pre-trained checkpoint (default checkpoints/<family>.pt)")
    x.add_argument("--families", nargs="+", choices=["vocab", "hier", "vla"],
                   help="all / stability: the families to run (default: all three)")
    x.add_argument("--seeds", type=_positive_int, default=3, help="fine-tuning seeds 0..N-1 (main; default 3)")
    x.add_argument("--iters", type=_positive_int, default=8, help="fine-tuning iterations per run (default 8)")
    x.add_argument("--buffer", type=_positive_int, default=2048, help="transitions per iteration (default 2048)")
    x.add_argument("--worlds", type=_positive_int, default=128, help="routes driven in parallel (default 128)")
    x.add_argument("--train-towns", type=_positive_int, default=20, help="train town seeds driven (default 20)")
    x.add_argument("--methods", nargs="+", default=["reinforcepp", "ppo", "grpo", "craft"],
                   choices=["reinforcepp", "ppo", "grpo", "craft"], help="fine-tuning methods compared")
    x.add_argument("--lr", type=_learning_rate, help="fine-tuning learning rate (default 1e-3, see docs/results.md)")
    x.add_argument("--lr-end", type=_final_learning_rate, help="final learning rate (default 5e-5)")
    x.add_argument("--epochs", type=_positive_int, help="passes over each buffer (default 4)")
    x.add_argument("--minibatch", type=_positive_int, help="transitions per optimiser step (default 256)")
    x.add_argument("--split", default="test", help="evaluation split (default test)")
    x.add_argument("--routes", type=_positive_int, help="evaluation routes per scenario type")
    x.add_argument("--protocols", nargs="+", default=["b2d-star", "b2d"], choices=["b2d", "b2d-star"],
                   help="evaluation protocols, the primary first")
    x.add_argument("--eval-seeds", type=_positive_int, default=3,
                   help="traffic seeds 0..N-1 every policy of the main table is evaluated under (default 3)")
    x.add_argument("--val-every", type=_nonneg_int, default=2,
                   help="closed-loop val-subset evaluation every N iterations; the test checkpoint is chosen on "
                        "it (0: off, the last iteration; default 2)")
    x.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads of this process (default 1: experiments run side by side, one per core, "
                        "and a run repeats exactly only under the thread count it was made with)")
    x.add_argument("--doc", default="docs/results.md", help="all / report: the results document to write")
    x.add_argument("--out", default="out/experiments",
                   help="experiment root: runs pool under OUT/runs, tables under OUT/<experiment> (default "
                        "out/experiments)")
    x.set_defaults(func=cmd_experiment)

    d = sub.add_parser("demo", help="the quick start: evaluate the committed pre-trained policy on 44 val routes, "
                                    "fine-tune it with CRAFT for a few iterations, print before / after "
                                    "(--world-only: just drive random worlds)")
    d.add_argument("--out", default="out/demo", help="output folder (the fine-tuned policy: OUT/finetune/policy.pt)")
    d.add_argument("--seed", type=_seed, default=0, help="traffic and fine-tuning seed")
    d.add_argument("--family", default="vocab", choices=["vocab", "hier", "vla"], help="policy family")
    d.add_argument("--iters", type=_positive_int, default=4, help="CRAFT fine-tuning iterations")
    d.add_argument("--world-only", action="store_true", help="only drive random worlds and write a GIF")
    d.set_defaults(func=cmd_demo)
    return p


def _one_line(msg: str) -> str:
    return " ".join(msg.split()) or "bad input"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "configs"):
        for c in args.configs:
            parts = c.split("x")
            if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
                parser.error(f"--configs entries must look like 256x64 (WORLDSxAGENTS), got '{c}'")
    if getattr(args, "types", None):  # a repeated scenario type runs once
        args.types = list(dict.fromkeys(args.types))
    try:
        return int(args.func(args) or 0)
    except CraftError as e:
        print(f"craft: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except Exception as e:  # the file system refused (disk full, permissions, ...): one line, not a traceback
        from craft.files import is_write_failure, write_error

        if not is_write_failure(e):
            raise
        print(f"craft: error: {_one_line(str(write_error(getattr(e, 'filename', None) or '?', e, untouched=False)))}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("craft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
