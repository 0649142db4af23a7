"""Wall time of fine-tuning iterations, split into collect / score (counterfactual proxy) / update.

    python benchmarks/finetune_bench.py --init checkpoints/vocab.pt [--method craft] [--iters 2]
        [--buffer 2048] [--worlds 128] [--towns 40] [--threads 1]

Start-up (generating the towns, building the scenarios) is reported separately and not counted in an
iteration. The first iteration also starts the first wave of routes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from craft.finetune.collector import CollectorConfig
from craft.finetune.trainer import FinetuneConfig, Trainer
from craft.scenarios.splits import split_town_seeds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default="checkpoints/vocab.pt")
    ap.add_argument("--method", default="craft")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--buffer", type=int, default=2048)
    ap.add_argument("--worlds", type=int, default=128)
    ap.add_argument("--towns", type=int, default=40, help="train town seeds used (the first N)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    col = CollectorConfig(worlds=a.worlds, buffer_size=a.buffer, town_seeds=tuple(split_town_seeds("train")[:a.towns]))
    cfg = FinetuneConfig(method=a.method, iters=a.iters, collector=col)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(a.init, Path(d) / "run", cfg, progress=False)
        startup = time.perf_counter() - t
        print(f"start-up {startup:.1f} s ({len(tr.collector.instances)} routes on {a.towns} towns)")
        rows = []
        for _ in range(a.iters):
            r = tr.iterate()
            rows.append({k: r[k] for k in ("iteration", "transitions", "t_collect", "t_score", "t_update", "t_total")})
            print(f"iteration {r['iteration']}: {r['transitions']} transitions, collect {r['t_collect']:.1f} s, "
                  f"score {r['t_score']:.1f} s, update {r['t_update']:.1f} s, total {r['t_total']:.1f} s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"startup_s": startup, "iterations": rows, "args": vars(a)}, indent=2))


if __name__ == "__main__":
    main()
