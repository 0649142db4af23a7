"""Bench2Drive-parity measurements: one b2d rollout per driver on a split, scored under b2d and b2d-star.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/parity_runs.py --out out/parity/after \
        --drivers expert lane-follow checkpoints/vocab.pt checkpoints/hier.pt checkpoints/vla.pt
    # the two scenario switches off (wrong-direction exemption, blocked suspension):
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/parity_runs.py --out out/parity/no-switches \
        --switches --drivers expert checkpoints/vocab.pt
    # also score the same rollouts with the metric rules of an earlier commit (rule-by-rule attribution):
    git show 9c32c79:craft/bench/metrics.py > out/metrics_before.py
    ... parity_runs.py ... --old-metrics out/metrics_before.py

Writes ``<out>/<label>/{b2d,b2d-star}/`` (the evaluation's files) per driver and ``<out>/summary.json``:
per driver and protocol the headline figures (DS, SR, RC, IS, abilities, efficiency, comfort, comfort_si,
num_routes) and the wall time; with ``--old-metrics`` also ``old_metrics`` (the same rollout scored by the
given metrics module: the before/after of the metric rules alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

KEYS = ("DS", "SR", "RC", "IS", "efficiency", "comfort", "comfort_si", "num_routes")


def _label(driver: str) -> str:
    return Path(driver).stem if driver.endswith(".pt") else driver


def _figures(summary: dict) -> dict:
    out = {k: summary[k] for k in KEYS if k in summary}
    out["abilities"] = summary.get("abilities")
    return out


def _old_scores(path: str, logs: list) -> dict:
    """Score ``logs`` with the metrics module at ``path`` (an earlier version): {protocol: figures}."""
    spec = importlib.util.spec_from_file_location("metrics_before", path)
    old = importlib.util.module_from_spec(spec)
    sys.modules["metrics_before"] = old  # dataclasses look their module up while the class is built
    spec.loader.exec_module(old)
    names = {f.name for f in dataclasses.fields(old.RouteLog)}
    out = {}
    for proto in ("b2d", "b2d-star"):
        recs = []
        for i, lg in enumerate(logs):
            kw = {k: v for k, v in lg.__dict__.items() if k in names}
            cs = dict(kw.get("checkpoint_speeds", {}))
            cs.pop("background_speed_all", None)  # the earlier rule reads background_speed (within 50 m)
            kw["checkpoint_speeds"] = cs
            recs.append(old.score_route(old.RouteLog(**kw), proto, index=i))
        out[proto] = _figures(old.aggregate(recs, num_routes=len(logs), protocol=proto))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--drivers", nargs="+", default=["expert", "lane-follow"])
    ap.add_argument("--batch-size", type=int, default=220)
    ap.add_argument("--switches", nargs="*", default=None, help="Bench2Drive scenario switches (default: all)")
    ap.add_argument("--old-metrics", help="a metrics.py of an earlier version to score the same rollouts with")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import inspect

    from craft.bench import runner
    from craft.bench.runner import EvalConfig, evaluate, make_driver

    out = Path(args.out)
    path = out / "summary.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    # an earlier checkout (the "before" runs) has neither scenario switches nor logs_out
    has_switches = hasattr(runner, "SWITCHES")
    switches = tuple(runner.SWITCHES if args.switches is None else args.switches) if has_switches else ()
    extra = {"switches": switches} if has_switches else {}
    for d in args.drivers:
        label = _label(d)
        t0 = time.time()
        logs: list = []
        kw = {"logs_out": logs} if "logs_out" in inspect.signature(evaluate).parameters else {}
        evaluate(make_driver(d), args.split, out / label / "b2d",
                 EvalConfig(protocol="b2d", batch_size=args.batch_size, **extra),
                 also={"b2d-star": out / label / "b2d-star"}, **kw)
        row = {"wall_s": round(time.time() - t0, 1), "switches": list(switches)}
        for proto in ("b2d", "b2d-star"):
            row[proto] = _figures(json.loads((out / label / proto / "results.json").read_text())["summary"])
        if args.old_metrics and logs:
            row["old_metrics"] = _old_scores(args.old_metrics, logs)
        table[label] = row
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
        print(label, json.dumps({p: {k: row[p].get(k) for k in ("DS", "SR")} for p in ("b2d", "b2d-star")}),
              f"{row['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
