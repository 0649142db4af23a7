"""Experiment runners that tie pre-trained checkpoints, fine-tuning and evaluation together.

``main_table``: the paper's Table 1 on our benchmark — the pre-trained policy and every fine-tuning method
under the same iteration budget, evaluated closed loop on a split, mean +- std over seeds, for one or both
protocols. Every run lives in its own folder under ``out/runs/`` and is skipped when its results already
exist, so an interrupted experiment continues where it stopped. The table is regenerated from the results
files (``table.md``, ``table.json``) deterministically.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from craft.errors import CraftError

ABILITIES = ("Merging", "Overtaking", "Emergency_Brake", "Give_Way", "Traffic_Signs", "Mean")
COLUMNS = ("DS", "SR", "RC", "IS") + ABILITIES


@dataclass(frozen=True)
class ExperimentConfig:
    family: str = "vocab"
    init: str = ""
    """Pre-trained checkpoint (default: checkpoints/<family>.pt)."""
    methods: tuple[str, ...] = ("reinforcepp", "ppo", "grpo", "craft")
    seeds: tuple[int, ...] = (0,)
    iters: int = 8
    """Fine-tuning iterations per run (the same budget for every method)."""
    buffer: int = 2048
    worlds: int = 128
    train_towns: int = 40
    """Number of train-split town seeds the collectors drive on (the first N; fewer = faster start-up)."""
    split: str = "test"
    routes: int | None = None
    """Evaluation routes per scenario type (default: the split's)."""
    types: tuple[str, ...] | None = None
    """Evaluate on these scenario types only (default: all)."""
    protocols: tuple[str, ...] = ("b2d", "b2d-star")
    finetune: dict = field(default_factory=dict)
    """FinetuneConfig overrides for every method (e.g. a learning rate adapted to a small budget)."""
    extra: dict = field(default_factory=dict)
    """Extra FinetuneConfig fields (ablation switches) by method label, e.g. {"craft-noproxy": {...}}."""

    @property
    def init_path(self) -> str:
        return self.init or f"checkpoints/{self.family}.pt"


def _eval(policy: str, out: Path, split: str, protocol: str, seed: int, routes: int | None,
          types: tuple[str, ...] | None = None) -> dict:
    from craft.bench.runner import EvalConfig, evaluate, make_driver

    res = out / "results.json"
    if res.exists():
        return json.loads(res.read_text())["summary"]
    return evaluate(make_driver(policy), split, out, EvalConfig(protocol=protocol, seed=seed), routes=routes,
                    types=list(types) if types else None)


def _finetune(cfg: ExperimentConfig, method: str, seed: int, out: Path) -> Path:
    from dataclasses import replace

    from craft.finetune.collector import CollectorConfig
    from craft.finetune.trainer import FinetuneConfig, finetune
    from craft.scenarios.splits import split_town_seeds

    base = method.split("-")[0]
    col = CollectorConfig(worlds=cfg.worlds, buffer_size=cfg.buffer, seed=seed,
                          town_seeds=tuple(split_town_seeds("train")[:cfg.train_towns]))
    fc = FinetuneConfig(method=base, iters=cfg.iters, seed=seed, collector=col)
    if cfg.finetune:
        fc = replace(fc, **cfg.finetune)
    if method in cfg.extra:
        fc = replace(fc, **cfg.extra[method])
    policy = out / "policy.pt"
    trainer_state = out / "trainer.pt"
    if policy.exists() and trainer_state.exists():
        import torch

        if torch.load(trainer_state, map_location="cpu", weights_only=False)["iteration"] >= cfg.iters:
            return policy
        finetune(cfg.init_path, out, fc, resume=True)
        return policy
    finetune(cfg.init_path, out, fc)
    return policy


def main_table(cfg: ExperimentConfig, out: str | os.PathLike) -> dict:
    """Run (or continue) the experiment and write ``table.md`` / ``table.json`` into ``out``."""
    if not Path(cfg.init_path).exists():
        raise CraftError(f"pre-trained checkpoint '{cfg.init_path}' not found (make it with `craft pretrain`)")
    out = Path(out)
    runs = out / "runs"
    results: dict[str, dict[str, list[dict]]] = {}
    for seed in cfg.seeds:
        for proto in cfg.protocols:
            s = _eval(cfg.init_path, runs / f"pretrained-s{seed}" / f"eval-{proto}", cfg.split, proto, seed,
                      cfg.routes, cfg.types)
            results.setdefault("pretrained", {}).setdefault(proto, []).append(s)
        for m in cfg.methods:
            pol = _finetune(cfg, m, seed, runs / f"{m}-s{seed}")
            for proto in cfg.protocols:
                s = _eval(str(pol), runs / f"{m}-s{seed}" / f"eval-{proto}", cfg.split, proto, seed, cfg.routes,
                          cfg.types)
                results.setdefault(m, {}).setdefault(proto, []).append(s)
    table = summarise(results)
    _write(out / "table.json", json.dumps({"config": _cfg_dict(cfg), "table": table}, indent=2))
    _write(out / "table.md", table_markdown(table, cfg))
    return table


def summarise(results: dict[str, dict[str, list[dict]]]) -> dict:
    """mean / std / n over seeds of every column, per row and protocol."""
    table: dict = {}
    for row, by_proto in results.items():
        for proto, summaries in by_proto.items():
            cols = {}
            for c in COLUMNS:
                vals = [(s["abilities"][c] if c in ABILITIES else s[c]) for s in summaries]
                vals = [float(v) for v in vals if v is not None]
                if not vals:
                    cols[c] = None
                    continue
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
                cols[c] = {"mean": mean, "std": std, "n": len(vals)}
            table.setdefault(proto, {})[row] = cols
    return table


def table_markdown(table: dict, cfg: ExperimentConfig) -> str:
    lines = [f"# Main table: {cfg.family} on `{cfg.split}`", "",
             f"Pre-trained checkpoint `{cfg.init_path}`; {cfg.iters} fine-tuning iterations of >= {cfg.buffer} "
             f"transitions per method ({cfg.worlds} parallel routes on the first {cfg.train_towns} train towns); "
             f"seeds {list(cfg.seeds)}; mean ± std over seeds."
             + (f" Fine-tuning overrides for every method: `{cfg.finetune}`." if cfg.finetune else ""), ""]
    for proto, rows in table.items():
        lines += [f"## Protocol `{proto}`", "", "| policy | " + " | ".join(COLUMNS) + " |",
                  "|---|" + "---|" * len(COLUMNS)]
        for row, cols in rows.items():
            cells = []
            for c in COLUMNS:
                v = cols[c]
                cells.append("–" if v is None else (f"{v['mean']:.2f} ± {v['std']:.2f}" if v["n"] > 1
                                                     else f"{v['mean']:.2f}"))
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cfg_dict(cfg: ExperimentConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = ["ExperimentConfig", "main_table", "summarise", "table_markdown"]
