"""What every experiment shares: its configuration, a pool of fine-tuning runs, evaluations, and tables.

One mechanism runs everything: an experiment asks :func:`finetune_run` for a fine-tuned policy and
:func:`evaluate_policy` for its closed-loop metrics. Runs live in ``ROOT/runs/<family>-<label>-s<seed>-<digest>``
where the digest hashes the initial checkpoint's bytes and the whole :class:`FinetuneConfig`; a finished run
is reused by every experiment that asks for the same thing (``ablation`` reuses ``main``'s GRPO and CRAFT
runs, ``scaling`` its x1 runs, ``stability`` its diagnostics), and an interrupted one resumes. Evaluations live
inside the run they evaluate (``eval-<set>/<protocol>/results.json``); one ``b2d`` rollout is scored under both
protocols. Tables are regenerated from those results files deterministically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from craft.errors import CraftError

ABILITIES = ("Merging", "Overtaking", "Emergency_Brake", "Give_Way", "Traffic_Signs", "Mean")
COLUMNS = ("DS", "SR", "RC", "IS") + ABILITIES
METHOD_NAMES = {"pretrained": "pre-trained", "reinforcepp": "REINFORCE++", "ppo": "PPO", "grpo": "GRPO",
                "craft": "CRAFT"}

SMALL_BUDGET = {"lr": 1e-3, "lr_end": 5e-5, "epochs": 4, "minibatch": 256}
"""FinetuneConfig overrides of the experiments (every method alike): with ~100x fewer transitions than the
paper, its learning rate 1e-4 barely moves the policy in the iterations a CPU affords (docs/results.md)."""


@dataclass(frozen=True)
class ExperimentConfig:
    """The budget and evaluation of an experiment; the same for every method it compares."""

    family: str = "vocab"
    init: str = ""
    """Pre-trained checkpoint (default: checkpoints/<family>.pt)."""
    methods: tuple[str, ...] = ("reinforcepp", "ppo", "grpo", "craft")
    seeds: tuple[int, ...] = (0, 1, 2)
    iters: int = 6
    """Fine-tuning iterations per run (the same budget for every method)."""
    buffer: int = 2048
    """Transitions per iteration (the paper's B)."""
    worlds: int = 128
    train_towns: int = 20
    """Number of train-split town seeds the collectors drive on (the first N; fewer = faster start-up)."""
    split: str = "test"
    routes: int | None = None
    """Evaluation routes per scenario type (default: the split's)."""
    types: tuple[str, ...] | None = None
    """Evaluate on these scenario types only (default: all)."""
    protocols: tuple[str, ...] = ("b2d-star", "b2d")
    """Evaluation protocols, the primary first: ``b2d-star`` (a collision ends the route), the paper's protocol."""
    eval_seed: int = 0
    """Background-traffic seed of every evaluation: the spread over ``seeds`` is the fine-tuning's alone."""
    noise_seeds: tuple[int, ...] = (1, 2)
    """Further evaluation traffic seeds for the pre-trained policy alone (main table): the spread of its DS over
    ``(eval_seed,) + noise_seeds`` is the evaluation's own noise floor, the yardstick for the methods' gaps."""
    eval_max_steps: int | None = None
    """Tick cap of every evaluated route (default: Bench2Drive's 200 s, long routes their own; for tests)."""
    finetune: dict = field(default_factory=lambda: dict(SMALL_BUDGET))
    """FinetuneConfig overrides for every method."""
    extra: dict = field(default_factory=dict)
    """Extra FinetuneConfig fields by run label (e.g. ablation switches)."""

    def __post_init__(self):
        if self.family not in ("vocab", "hier", "vla"):
            raise CraftError(f"unknown policy family '{self.family}' (vocab, hier or vla)")
        if not self.seeds:
            raise CraftError("an experiment needs at least one seed")
        if self.iters < 1 or self.buffer < 1 or self.worlds < 1 or self.train_towns < 1:
            raise CraftError("ExperimentConfig: iters, buffer, worlds and train_towns must be >= 1")

    @property
    def init_path(self) -> str:
        return self.init or f"checkpoints/{self.family}.pt"


# ---------------------------------------------------------------------------------------------- runs
def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _file_digest(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise CraftError(f"pre-trained checkpoint '{path}' not found (make it with `craft pretrain`, or pass --init)")
    return hashlib.sha1(p.read_bytes()).hexdigest()[:10]


def finetune_config(cfg: ExperimentConfig, method: str, seed: int, label: str | None = None,
                    collector: dict | None = None, **overrides):
    """The FinetuneConfig of one run: ``cfg``'s budget, ``cfg.finetune``, ``cfg.extra[label]``, then
    ``overrides``; ``collector`` overrides CollectorConfig fields (e.g. a split or scenario types)."""
    from craft.finetune.collector import CollectorConfig
    from craft.finetune.trainer import FinetuneConfig
    from craft.scenarios.splits import split_town_seeds

    col = CollectorConfig(worlds=cfg.worlds, buffer_size=cfg.buffer, seed=seed,
                          town_seeds=tuple(split_town_seeds("train")[:cfg.train_towns]))
    if collector:
        col = replace(col, **collector)
    fc = FinetuneConfig(method=method, family=cfg.family, iters=cfg.iters, seed=seed, collector=col)
    fc = replace(fc, **cfg.finetune)
    fc = replace(fc, **cfg.extra.get(label or method, {}))
    return replace(fc, **overrides)


def run_dir(root: str | os.PathLike, cfg: ExperimentConfig, label: str, fc) -> Path:
    """The pool folder of a fine-tuning run (created with its ``config.json``)."""
    key = {"init": _file_digest(cfg.init_path), "finetune": asdict(fc)}
    d = Path(root) / "runs" / f"{cfg.family}-{label}-s{fc.seed}-{_digest(key)}"
    if not (d / "config.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        write_text(d / "config.json", json.dumps({"label": label, "init": cfg.init_path, **key}, indent=2,
                                                  default=str))
    return d


def finetune_run(root: str | os.PathLike, cfg: ExperimentConfig, method: str, seed: int, label: str | None = None,
                 collector: dict | None = None, **overrides) -> Path:
    """Fine-tune (or reuse / resume) one run of the pool; returns its folder (``policy.pt`` inside)."""
    import torch

    from craft.finetune.trainer import finetune

    label = label or method
    fc = finetune_config(cfg, method, seed, label, collector, **overrides)
    d = run_dir(root, cfg, label, fc)
    state = d / "trainer.pt"
    with locked(d):  # two experiments started side by side wait for each other's run instead of repeating it
        if state.exists():
            if torch.load(state, map_location="cpu", weights_only=False)["iteration"] < fc.iters:
                finetune(cfg.init_path, d, fc, resume=True)
        else:
            finetune(cfg.init_path, d, fc)
    return d


@contextmanager
def locked(folder: Path):
    """An exclusive advisory lock on ``folder/.lock`` (blocks until other processes release it)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pretrained_dir(root: str | os.PathLike, cfg: ExperimentConfig) -> Path:
    """The pool folder holding the pre-trained checkpoint's evaluations."""
    d = Path(root) / "runs" / f"{cfg.family}-pretrained-{_file_digest(cfg.init_path)}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_wall_s(run: Path) -> float:
    """Seconds of fine-tuning a pool run took (sum of its iterations' ``t_total``)."""
    return float(sum(r["t_total"] for r in read_diagnostics(run)))


def run_names(runs: list[Path]) -> list[str]:
    """Pool folder names of the runs an experiment used, in first-use order (for its compute time)."""
    return list(dict.fromkeys(Path(r).name for r in runs))


def read_diagnostics(run: Path) -> list[dict]:
    """A run's ``diagnostics.csv`` as a list of dicts of floats (empty cells: NaN)."""
    import csv

    path = Path(run) / "diagnostics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()}
                for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------- evaluations
@dataclass(frozen=True)
class EvalSet:
    """Where a policy is evaluated: a split, optionally restricted or on other town seeds."""

    name: str
    split: str = "test"
    routes: int | None = None
    types: tuple[str, ...] | None = None
    town_seeds: tuple[int, ...] | None = None
    seed: int = 0
    max_steps: int | None = None

    def key(self) -> str:
        extra = {k: v for k, v in asdict(self).items() if k not in ("name", "split") and v not in (None, 0)}
        return f"{self.name}" + (f"-{_digest(extra)}" if extra else "")


def default_eval_set(cfg: ExperimentConfig) -> EvalSet:
    return EvalSet(name=cfg.split, split=cfg.split, routes=cfg.routes, types=cfg.types, seed=cfg.eval_seed,
                   max_steps=cfg.eval_max_steps)


def evaluate_policy(policy: str | os.PathLike, folder: str | os.PathLike, es: EvalSet,
                    protocols: tuple[str, ...] = ("b2d-star", "b2d"), ledger: list | None = None) -> dict[str, dict]:
    """Closed-loop metrics of ``policy`` on ``es`` under each protocol: ``{protocol: summary}``.

    Results live in ``folder/eval-<set>/<protocol>/results.json`` and are reused; one b2d rollout gives every
    protocol (b2d-star is its log cut at the first collision). ``ledger`` collects ``<run>/eval-<set>`` ids
    (an experiment's list of the evaluations it used, for its compute time).
    """
    base = Path(folder) / f"eval-{es.key()}"
    if ledger is not None and f"{Path(folder).name}/{base.name}" not in ledger:
        ledger.append(f"{Path(folder).name}/{base.name}")
    files = {p: base / p / "results.json" for p in protocols}
    with locked(Path(folder)):
        if not all(f.exists() for f in files.values()):
            _run_eval(policy, base, es, protocols)
    return {p: json.loads(f.read_text())["summary"] for p, f in files.items()}


def _run_eval(policy, base: Path, es: EvalSet, protocols: tuple[str, ...]) -> None:
    """One b2d rollout of ``policy`` on ``es``, scored under every protocol into ``base/<protocol>``."""
    from craft.bench.runner import EvalConfig, evaluate, make_driver

    ecfg = EvalConfig(protocol="b2d", seed=es.seed, max_steps=es.max_steps)
    evaluate(make_driver(str(policy)), es.split, base / "b2d", ecfg,
             town_seeds=list(es.town_seeds) if es.town_seeds else None, routes=es.routes,
             types=list(es.types) if es.types else None, also={p: base / p for p in protocols if p != "b2d"})


def eval_wall_s(folder: Path) -> float:
    """Seconds the evaluation in ``folder`` (``<run>/eval-<set>``) took: its one rollout."""
    f = Path(folder) / "b2d" / "results.json"
    return float(json.loads(f.read_text())["summary"].get("wall_time_s", 0.0)) if f.exists() else 0.0


# ---------------------------------------------------------------------------------------------- tables
def summarise(results: dict[str, dict[str, list[dict]]], columns: tuple[str, ...] = COLUMNS) -> dict:
    """mean / std / n over seeds of every column, per row and protocol: ``{protocol: {row: {col: stats}}}``."""
    table: dict = {}
    for row, by_proto in results.items():
        for proto, summaries in by_proto.items():
            cols = {}
            for c in columns:
                vals = [(s["abilities"][c] if c in ABILITIES else s[c]) for s in summaries]
                cols[c] = stats([float(v) for v in vals if v is not None])
            table.setdefault(proto, {})[row] = cols
    return table


def stats(vals: list[float]) -> dict | None:
    """mean, sample std (0 for one value) and n of a list; None when empty."""
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals)}


def fmt(v: dict | None, digits: int = 2, sign: bool = False) -> str:
    if v is None:
        return "–"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f.format(v["mean"]) + (f" ± {v['std']:.{digits}f}" if v["n"] > 1 else "")


def markdown_table(rows: dict[str, dict], columns: tuple[str, ...], digits: int = 2, sign: bool = False,
                   head: str = "policy") -> list[str]:
    """Markdown lines of a ``{row: {col: stats}}`` table (IS with 3 digits)."""
    lines = [f"| {head} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row, cols in rows.items():
        cells = [fmt(cols.get(c), 3 if c.endswith("IS") else digits, sign) for c in columns]
        lines.append(f"| {METHOD_NAMES.get(row, row)} | " + " | ".join(cells) + " |")
    return lines


def budget_line(cfg: ExperimentConfig) -> str:
    return (f"Pre-trained checkpoint `{cfg.init_path}`; {cfg.iters} fine-tuning iterations of >= {cfg.buffer} "
            f"transitions per run ({cfg.worlds} parallel routes on the first {cfg.train_towns} train towns); "
            f"fine-tuning seeds {list(cfg.seeds)}; evaluation traffic seed {cfg.eval_seed}; mean ± std over seeds"
            + (f"; overrides for every method: `{cfg.finetune}`" if cfg.finetune else "") + ".")


def table_markdown(table: dict, cfg: ExperimentConfig) -> str:
    lines = [f"# Main table: {cfg.family} on `{cfg.split}`", "", budget_line(cfg)
             + (" The last row evaluates the pre-trained policy under other background-traffic seeds: its ± is the "
                "evaluation's noise floor." if cfg.noise_seeds else ""), ""]
    for proto, rows in table.items():
        lines += [f"## Protocol `{proto}`", ""] + markdown_table(rows, COLUMNS) + [""]
    return "\n".join(lines)


def config_dict(cfg: ExperimentConfig) -> dict:
    return asdict(cfg)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically (temp name, then rename; no half-written file on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically (see :func:`write_bytes`)."""
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str))


# ------------------------------------------------------------------------------------------------ main
def main_table(cfg: ExperimentConfig, out: str | os.PathLike) -> dict:
    """The paper's Table 1: pre-trained and every method, evaluated on ``cfg.split`` under both protocols.

    Writes ``out/main-<family>/table.{md,json}``; runs go to the pool ``out/runs``. Returns the table.
    """
    _file_digest(cfg.init_path)
    es = default_eval_set(cfg)
    results: dict[str, dict[str, list[dict]]] = {}
    used, evals = [pretrained_dir(out, cfg)], []
    for proto, s in evaluate_policy(cfg.init_path, used[0], es, cfg.protocols, evals).items():
        results.setdefault("pretrained", {})[proto] = [s]
    for seed in cfg.seeds:
        for m in cfg.methods:
            run = finetune_run(out, cfg, m, seed)
            used.append(run)
            for proto, s in evaluate_policy(run / "policy.pt", run, es, cfg.protocols, evals).items():
                results.setdefault(m, {}).setdefault(proto, []).append(s)
    if cfg.noise_seeds:
        row = f"pre-trained, traffic seeds {', '.join(str(x) for x in (cfg.eval_seed,) + tuple(cfg.noise_seeds))}"
        results[row] = {p: list(v) for p, v in results["pretrained"].items()}
        for ns in cfg.noise_seeds:
            for proto, s in evaluate_policy(cfg.init_path, used[0], replace(es, seed=ns), cfg.protocols,
                                            evals).items():
                results[row][proto].append(s)
    table = summarise(results)
    folder = Path(out) / f"main-{cfg.family}"
    write_json(folder / "table.json", {"config": config_dict(cfg), "table": table, "runs": run_names(used),
                                        "evals": evals})
    write_text(folder / "table.md", table_markdown(table, cfg))
    return table


__all__ = ["ExperimentConfig", "EvalSet", "SMALL_BUDGET", "evaluate_policy", "finetune_run", "main_table",
           "summarise", "table_markdown", "markdown_table", "read_diagnostics", "write_json", "write_text"]
