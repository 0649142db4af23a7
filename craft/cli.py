"""The ``craft`` command line.

Every sub-command validates its arguments; bad input prints one line ``craft: error: ...`` and exits
with status 2, and nothing half-written is left on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from craft.errors import CraftError


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{s}'") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _device(s: str) -> str:
    import torch

    if s == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("--device cuda requested but no CUDA device is available; use --device cpu")
    if s not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device must be cpu or cuda, got '{s}'")
    return s


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON to a temporary name in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- sub-commands
def cmd_sim_bench(args) -> int:
    from craft.world.simbench import run_sim_bench

    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs]
    result = run_sim_bench(configs, steps=args.steps, device=args.device, highway_env=not args.no_highway_env,
                           seed=args.seed, threads=args.threads, highway_env_seconds=args.highway_env_seconds)
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return 0


def cmd_render(args) -> int:
    from craft.world.render import render_png
    from craft.world.towns import generate_town

    town = generate_town(args.town_seed)
    render_png(town, args.out, title=f"town seed {args.town_seed}")
    print(f"wrote {args.out} ({town.num_lanes} lanes, {len(town.junction_kind)} junctions)")
    return 0


def cmd_eval(args) -> int:
    from craft.bench.runner import EvalConfig, evaluate, make_driver
    from craft.scenarios.splits import SPLITS

    if args.split not in SPLITS:
        raise CraftError(f"unknown split '{args.split}': use one of {', '.join(SPLITS)}")
    cfg = EvalConfig(protocol=args.protocol, gif_worst=args.gif, batch_size=args.batch_size, seed=args.seed,
                     max_steps=args.max_steps)
    driver = make_driver(args.policy)
    summary = evaluate(driver, args.split, args.out, cfg, town_seeds=args.town_seeds, routes=args.routes,
                       device=args.device, types=args.types)
    ab = summary["abilities"]
    print(f"{driver.name} on {args.split} ({summary['num_routes']} routes, {args.protocol}): "
          f"DS {summary['DS']:.2f}  SR {summary['SR']:.2f}  RC {summary['RC']:.2f}  IS {summary['IS']:.3f}  "
          f"abilities mean {ab['Mean'] if ab['Mean'] is not None else float('nan'):.2f}  "
          f"({summary['wall_time_s']:.0f} s) -> {args.out}")
    return 0


def cmd_demo(args) -> int:
    from craft.demo import run_demo

    run_demo(args.out, seed=args.seed)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="craft", description="Closed-loop reinforcement fine-tuning of driving policies.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("sim-bench", help="measure the world's throughput (agent-steps/s) against highway-env")
    b.add_argument("--configs", nargs="+", default=["256x64", "1024x64", "256x128"],
                   help="WORLDSxAGENTS configurations (default: 256x64 1024x64 256x128)")
    b.add_argument("--steps", type=_positive_int, default=50, help="timed steps per configuration")
    b.add_argument("--device", type=_device, default="cpu")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=_positive_int, nargs="+", default=None,
                   help="torch thread counts to try per configuration (default: 1 and all cores; best reported)")
    b.add_argument("--no-highway-env", action="store_true", help="skip the highway-env comparison")
    b.add_argument("--highway-env-seconds", type=float, default=5.0, help="how long to time highway-env")
    b.add_argument("--json", help="write the figures to this JSON file")
    b.set_defaults(func=cmd_sim_bench)

    r = sub.add_parser("render", help="draw a procedural town as a PNG")
    r.add_argument("--town-seed", type=int, default=0)
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_render)

    e = sub.add_parser("eval", help="closed-loop evaluation on a benchmark split (Bench2Drive metrics)")
    e.add_argument("--policy", required=True, help="expert, lane-follow, or a checkpoint path")
    e.add_argument("--split", default="test", help="test, val, train or long")
    e.add_argument("--routes", type=_positive_int, help="routes per scenario type (default: the split's)")
    e.add_argument("--town-seeds", type=int, nargs="+", help="evaluate on these town seeds instead")
    e.add_argument("--types", nargs="+", help="only these scenario types")
    e.add_argument("--protocol", choices=["b2d", "b2d-star"], default="b2d")
    e.add_argument("--device", type=_device, default="cpu")
    e.add_argument("--gif", type=int, default=0, metavar="K", help="GIFs of the K lowest-DS routes")
    e.add_argument("--batch-size", type=_positive_int, default=220, help="routes simulated together")
    e.add_argument("--seed", type=int, default=0, help="background traffic seed")
    e.add_argument("--max-steps", type=_positive_int, default=2000, help="simulation steps cap (200 s)")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="the quick start: render a town, drive worlds in closed loop, write a GIF")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "configs"):
        for c in args.configs:
            parts = c.split("x")
            if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
                parser.error(f"--configs entries must look like 256x64 (WORLDSxAGENTS), got '{c}'")
    try:
        return int(args.func(args) or 0)
    except CraftError as e:
        print(f"craft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("craft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
