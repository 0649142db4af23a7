"""What every experiment shares: its configuration, a pool of fine-tuning runs, evaluations, and tables.

One mechanism runs everything: an experiment asks :func:`finetune_run` for a fine-tuned policy and
:func:`evaluate_policy` for its closed-loop metrics. Runs live in ``ROOT/runs/<family>-<label>-s<seed>-<digest>``
where the digest hashes the initial checkpoint's bytes, the whole :class:`FinetuneConfig` and the benchmark's
version (:data:`craft.bench.BENCHMARK_VERSION`: results of another version are never reused); a finished run
is reused by every experiment that asks for the same thing (``ablation`` reuses ``main``'s GRPO and CRAFT
runs, ``scaling`` its x1 runs, ``stability`` its diagnostics), and an interrupted one resumes. Evaluations live
inside the run they evaluate (``eval-<set>/<protocol>/results.json``); one ``b2d`` rollout is scored under both
protocols. Tables are regenerated from those results files deterministically.

Results survive a new machine through the **archive** (:data:`ARCHIVE`, ``docs/results/pool``, committed):
``craft experiment archive`` copies the small files of every finished run and evaluation there (config,
diagnostics, a ``done.json`` marker, and per evaluation and protocol a ``scores.json`` with the summary and
the per-route DS). A pool folder missing from ``ROOT/runs`` is restored from the archive before anything
is computed, so a finished run is not trained again and a scored evaluation not driven again; the tables
read ``scores.json`` where the full ``results.json`` is absent.
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
from craft.files import read_json, save_png, write_bytes, write_json, write_text  # noqa: F401  (re-exported)

ABILITIES = ("Merging", "Overtaking", "Emergency_Brake", "Give_Way", "Traffic_Signs", "Mean")
COLUMNS = ("DS", "SR", "RC", "IS") + ABILITIES
ARCHIVE = Path(__file__).resolve().parents[2] / "docs" / "results" / "pool"
"""The committed archive of finished pool folders (``craft experiment archive``); see the module docstring."""
SCORES = "scores.json"
"""Per evaluation and protocol: ``{"summary": ..., "routes": {route_id: DS}}``, next to (or instead of)
``results.json``."""
METHOD_NAMES = {"pretrained": "pre-trained", "reinforcepp": "REINFORCE++", "ppo": "PPO", "grpo": "GRPO",
                "craft": "CRAFT"}

SMALL_BUDGET = {"lr": 1e-3, "lr_end": 5e-5, "epochs": 4, "minibatch": 256}
"""FinetuneConfig overrides of the experiments (every method alike): with ~100x fewer transitions than the
paper, its learning rate 1e-4 barely moves the policy in the iterations a CPU affords (docs/results.md). The
teacher stays the paper's (m = 0.99 per iteration): on `val` the budget-aware per-step teacher moved the policy
much further but did not score higher (docs/finetune.md, "The teacher at a small budget")."""


@dataclass(frozen=True)
class ExperimentConfig:
    """The budget and evaluation of an experiment; the same for every method it compares."""

    family: str = "vocab"
    init: str = ""
    """Pre-trained checkpoint (default: checkpoints/<family>.pt)."""
    methods: tuple[str, ...] = ("reinforcepp", "ppo", "grpo", "craft")
    seeds: tuple[int, ...] = (0, 1, 2)
    iters: int = 8
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
    eval_seeds: tuple[int, ...] = (0, 1, 2)
    """Background-traffic seeds of the main table: every policy is evaluated on the same routes under each of
    them and its per-route DS averaged over them; the pre-trained policy's spread over them is the evaluation's
    own noise floor. The other experiments use the first."""
    eval_max_steps: int | None = None
    """Tick cap of every evaluated route (default: Bench2Drive's 200 s, long routes their own; for tests)."""
    val_every: int = 2
    """Closed-loop evaluation of every run on the ``val`` subset every this many iterations (and after the last):
    the learning curves, and the checkpoint evaluated on ``split`` is the best of these on ``val`` (b2d-star);
    0: the last iteration's policy."""
    val_routes: int = 1
    """Routes per scenario type of the ``val`` subset (restricted to ``types`` when set)."""
    export: str | None = "checkpoints/finetuned"
    """Main table: copy each method's seed-0 selected checkpoint to ``EXPORT/<family>-<method>.pt`` (None: no)."""
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
        from craft.checks import check_finite_fields, check_range, check_seed

        check_finite_fields(self)
        for s in self.seeds + tuple(self.eval_seeds):
            check_seed("ExperimentConfig seeds", s)
        for f in ("routes", "eval_max_steps"):
            if getattr(self, f) is not None:
                check_range(f"ExperimentConfig.{f}", getattr(self, f), 1, integer=True)
        # the fine-tuning overrides fail now (naming the field), not after the first evaluation
        from craft.finetune.trainer import FinetuneConfig

        for over in [self.finetune] + list(self.extra.values()):
            try:
                FinetuneConfig(**over)
            except TypeError as e:
                raise CraftError(f"ExperimentConfig: unknown fine-tuning setting ({e})") from None
        if not self.eval_seeds:
            raise CraftError("ExperimentConfig.eval_seeds needs at least one traffic seed")
        check_range("ExperimentConfig.val_every", self.val_every, 0, integer=True)
        check_range("ExperimentConfig.val_routes", self.val_routes, 1, integer=True)

    @property
    def eval_seed(self) -> int:
        """The traffic seed of the experiments that evaluate under one seed (the first of ``eval_seeds``)."""
        return self.eval_seeds[0]

    @property
    def init_path(self) -> str:
        return self.init or f"checkpoints/{self.family}.pt"


# ---------------------------------------------------------------------------------------------- runs
def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _file_digest(path: str) -> str:
    from craft.policies.base import checkpoint_file

    try:  # checkpoints/<family>.pt is found relative to the package, wherever the command runs
        p = checkpoint_file(path)
    except CraftError:
        raise CraftError(f"pre-trained checkpoint '{path}' not found (make it with `craft pretrain`, or pass --init)"
                         ) from None
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
    fc = FinetuneConfig(method=method, family=cfg.family, iters=cfg.iters, seed=seed, collector=col,
                        val_every=cfg.val_every, val_routes=cfg.val_routes, val_types=cfg.types,
                        val_max_steps=cfg.eval_max_steps)
    fc = replace(fc, **cfg.finetune)
    fc = replace(fc, **cfg.extra.get(label or method, {}))
    return replace(fc, **overrides)


def run_dir(root: str | os.PathLike, cfg: ExperimentConfig, label: str, fc) -> Path:
    """The pool folder of a fine-tuning run (created with its ``config.json``)."""
    from craft.bench import BENCHMARK_VERSION

    key = {"init": _file_digest(cfg.init_path), "finetune": asdict(fc), "benchmark": BENCHMARK_VERSION}
    d = restored(Path(root) / "runs" / f"{cfg.family}-{label}-s{fc.seed}-{_digest(key)}")
    if not (d / "config.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        write_text(d / "config.json", json.dumps({"label": label, "init": cfg.init_path, **key}, indent=2,
                                                  default=str))
    return d


def finetune_run(root: str | os.PathLike, cfg: ExperimentConfig, method: str, seed: int, label: str | None = None,
                 collector: dict | None = None, checkpoint: bool = False, **overrides) -> Path:
    """Fine-tune (or reuse / resume) one run of the pool; returns its folder (``policy.pt`` inside).

    A run restored from the archive keeps no checkpoints; with ``checkpoint`` it is fine-tuned again (see
    :func:`_retrain`) so that its selected checkpoint exists, e.g. for an export."""
    from craft.finetune.trainer import finetune, saved_iteration

    label = label or method
    fc = finetune_config(cfg, method, seed, label, collector, **overrides)
    d = run_dir(root, cfg, label, fc)
    state = d / "trainer.pt"
    with locked(d):  # two experiments started side by side wait for each other's run instead of repeating it
        if state.exists():
            if saved_iteration(d) < fc.iters:
                finetune(cfg.init_path, d, fc, resume=True)
        elif finished_iterations(d) >= fc.iters:  # restored from the archive: diagnostics and scores only
            if not checkpoint:
                return d
            _retrain(d, cfg, fc)
        else:
            finetune(cfg.init_path, d, fc)
        write_json(d / "done.json", {"iterations": saved_iteration(d)})
    return d


def _retrain(run: Path, cfg: ExperimentConfig, fc) -> None:
    """Fine-tune an archived ``run`` again beside it for its checkpoints. When the new run's per-iteration
    ``val`` scores equal the archived ones (the same seed gives the same run), its checkpoints join the archived
    folder and the archived evaluations stay; otherwise the new run replaces the folder (its evaluations are
    computed again)."""
    import shutil

    from craft.finetune.trainer import finetune

    tmp = run.with_name(run.name + ".retrain")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_bytes(tmp / "config.json", (run / "config.json").read_bytes())
    finetune(cfg.init_path, tmp, fc)

    def vals(folder: Path) -> list:
        return [(int(r["iteration"]), r.get("val/DS")) for r in read_diagnostics(folder)
                if math.isfinite(r.get("val/DS", math.nan))]

    if vals(tmp) == vals(run):
        for f in sorted(tmp.rglob("*.pt")):
            dst = run / f.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dst)
        shutil.rmtree(tmp)
    else:
        print(f"note: '{run.name}' fine-tuned again differs from its archived run; its evaluations are redone",
              flush=True)
        old = run.with_name(run.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        run.rename(old)
        tmp.rename(run)
        shutil.rmtree(old)


def finished_iterations(run: Path) -> int:
    """Iterations of a finished run by its ``done.json`` marker (0 when there is none)."""
    f = Path(run) / "done.json"
    if not f.exists():
        return 0
    d = read_json(f, "run marker")
    n = d.get("iterations") if isinstance(d, dict) else None
    if isinstance(n, bool) or not isinstance(n, int):
        raise CraftError(f"'{f}' is not a run marker (no integer 'iterations'); delete it")
    return n


def restored(folder: Path) -> Path:
    """``folder`` (a pool folder under ``ROOT/runs``), first copied from :data:`ARCHIVE` when it is absent here
    and archived there."""
    import shutil

    src = ARCHIVE / "runs" / folder.name
    if not folder.exists() and src.is_dir() and src.resolve() != folder.resolve():
        tmp = folder.with_name(folder.name + ".restoring")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        tmp.rename(folder)  # whole or not at all
    return folder


@contextmanager
def locked(folder: Path):
    """The run folder's lock (:class:`craft.files.OutputLock`, the one every command takes on its output), held
    while the block runs; it blocks until another process holding it releases it (experiments started side by
    side share the pool: one computes a run while the others wait for it)."""
    from craft.files import LOCK_NAME, OutputLock

    folder.mkdir(parents=True, exist_ok=True)
    with OutputLock(folder / LOCK_NAME, str(folder), wait=True):
        yield


def archive(root: str | os.PathLike, to: str | os.PathLike | None = None) -> dict:
    """Copy the small files of every finished pool folder of ``root/runs`` into ``to/runs`` (the same names):
    a fine-tuning run's ``config.json``, ``diagnostics.csv`` and ``done.json`` (runs still in progress are
    left out), and per evaluation (``eval-*/<protocol>`` anywhere inside) its ``scores.json``. ``to``: default
    :data:`ARCHIVE`. Existing files are kept (a pool folder's content never changes once written), except that
    an archived run whose diagnostics differ from the pool's (fine-tuned again by :func:`_retrain`) is replaced
    as a whole. Returns counts."""
    import shutil

    from craft.finetune.trainer import saved_iteration

    runs, dst_root = Path(root) / "runs", Path(ARCHIVE if to is None else to) / "runs"
    if not runs.is_dir():
        raise CraftError(f"'{runs}' is not a run pool: nothing to archive (pass the --out of an experiment)")
    counts = {"runs": 0, "in_progress": 0, "evaluations": 0, "replaced": 0}
    for d in sorted(runs.iterdir()):
        if not d.is_dir() or d.name.endswith(".restoring"):
            continue
        dst = dst_root / d.name
        if (d / "config.json").exists():  # a fine-tuning run
            iters = int(read_json(d / "config.json", "run config")["finetune"]["iters"])
            done = max(finished_iterations(d), saved_iteration(d) or 0)
            if done < iters:
                counts["in_progress"] += 1
                continue
            old, new = dst / "diagnostics.csv", d / "diagnostics.csv"
            if old.exists() and new.exists() and old.read_bytes() != new.read_bytes():
                shutil.rmtree(dst)  # fine-tuned again and different (_retrain): the archived copy is stale
                counts["replaced"] += 1
            for name in ("config.json", "diagnostics.csv"):
                if (d / name).exists() and not (dst / name).exists():
                    write_bytes(dst / name, (d / name).read_bytes())
            if not (dst / "done.json").exists():
                write_json(dst / "done.json", {"iterations": done})
            counts["runs"] += 1
        for f in sorted(d.rglob("*")):
            if f.is_dir() and f.parent.name.startswith("eval-") and eval_done(f):
                target = dst / f.relative_to(d) / SCORES
                if not target.exists():
                    write_json(target, eval_scores(f))
                    counts["evaluations"] += 1
    return counts


def pretrained_dir(root: str | os.PathLike, cfg: ExperimentConfig) -> Path:
    """The pool folder holding the pre-trained checkpoint's evaluations."""
    from craft.bench import BENCHMARK_VERSION

    d = restored(Path(root) / "runs" / f"{cfg.family}-pretrained-{_file_digest(cfg.init_path)}-b{BENCHMARK_VERSION}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_wall_s(run: Path) -> float:
    """Seconds of fine-tuning a pool run took (sum of its iterations' ``t_total`` and periodic ``val`` evaluations'
    ``t_val``)."""
    total = 0.0
    for r in read_diagnostics(run):
        t_val = r.get("t_val", math.nan)
        for key, v in (("t_total", r["t_total"]), ("t_val", t_val)):
            if key == "t_total" or math.isfinite(v):  # t_val: only the iterations that validated have one
                if not math.isfinite(v) or v < 0:
                    raise CraftError(f"'{Path(run) / 'diagnostics.csv'}': iteration {r.get('iteration', '?')} has "
                                     f"{key} = {v}, not a finite number of seconds >= 0; delete the run to have "
                                     "it made again")
        total += r["t_total"] + (t_val if math.isfinite(t_val) else 0.0)
    return float(total)


def run_names(runs: list[Path]) -> list[str]:
    """Pool folder names of the runs an experiment used, in first-use order (for its compute time)."""
    return list(dict.fromkeys(Path(r).name for r in runs))


def read_diagnostics(run: Path) -> list[dict]:
    """A run's ``diagnostics.csv`` as a list of dicts of floats (empty cells: NaN)."""
    import csv

    path = Path(run) / "diagnostics.csv"
    if not path.exists():
        return []
    try:
        with open(path, newline="") as f:
            rows = [{k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()}
                    for row in csv.DictReader(f)]
    except (ValueError, TypeError, UnicodeDecodeError, csv.Error) as e:
        raise CraftError(f"'{path}' is not a readable diagnostics file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else 'malformed'}); delete the run folder to "
                         "have it run again") from None
    if rows and any(None in r or "t_total" not in r for r in rows):
        raise CraftError(f"'{path}' is not a complete diagnostics file (rows without a t_total column or with "
                         "extra cells); delete the run folder to have it run again")
    return rows


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
    parts = Path(folder).parts
    rel = "/".join(parts[len(parts) - parts[::-1].index("runs"):] if "runs" in parts else parts[-1:])
    if ledger is not None and f"{rel}/{base.name}" not in ledger:
        ledger.append(f"{rel}/{base.name}")
    with locked(Path(folder)):
        if not all(eval_done(base / p) for p in protocols):
            if str(policy).endswith(".pt") and not Path(policy).exists():
                raise CraftError(f"'{policy}' is missing: its run was restored from the archive (scores, no "
                                 f"checkpoints) and this evaluation ({base.name}) was never archived; delete the run "
                                 "folder in the pool to have it fine-tuned again")
            _run_eval(policy, base, es, protocols)
    return {p: eval_scores(base / p)["summary"] for p in protocols}


def eval_done(folder: Path) -> bool:
    """Whether the evaluation folder ``<run>/eval-<set>/<protocol>`` holds its results (full or compact)."""
    return (folder / "results.json").exists() or (folder / SCORES).exists()


def eval_scores(folder: Path) -> dict:
    """``{"summary": ..., "routes": {route_id: DS}}`` of an evaluation folder: its ``scores.json``, else read
    from its ``results.json``. One CraftError line if neither is readable."""
    f = Path(folder) / SCORES
    if f.exists():
        d = read_json(f, "evaluation scores")
        if not (isinstance(d, dict) and isinstance(d.get("summary"), dict) and isinstance(d.get("routes"), dict)):
            raise CraftError(f"'{f}' is not a scores file (needs 'summary' and 'routes'); delete it to have it "
                             "made again from results.json or the evaluation run again")
        check_scores(d, f)
        return d
    from craft.bench.metrics import load_results

    res = load_results(Path(folder) / "results.json")
    return {"summary": res["summary"],
            "routes": {r["route_id"]: float(r["scores"]["score_composed"]) for r in res["records"]}}


def check_scores(d: dict, path: Path) -> None:
    """The figures of a scores file that a report prints: DS and SR in [0, 100], the wall time finite and >= 0,
    every route's DS finite, as many routes as ``num_routes``; one CraftError line naming ``path`` otherwise."""
    s, routes = d["summary"], d["routes"]

    def bad(what: str) -> CraftError:
        return CraftError(f"'{path}': {what}; delete it to have it made again (or the evaluation run again)")

    for key in ("DS", "SR"):
        v = s.get(key)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 100):
            raise bad(f"summary.{key} must be a finite number in [0, 100], got {v!r}")
    w = s.get("wall_time_s", 0.0)
    if not (isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0):
        raise bad(f"summary.wall_time_s must be a finite number of seconds >= 0, got {w!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in routes.values()):
        raise bad("a route's DS is not a finite number")
    n = s.get("num_routes", len(routes))
    if n != len(routes) or not routes:
        raise bad(f"summary.num_routes is {n!r} but it holds {len(routes)} routes (one per route, at least one)")


def write_scores(folder: Path) -> None:
    """Write the compact ``scores.json`` of an evaluation folder from its ``results.json`` (if absent)."""
    if not (Path(folder) / SCORES).exists():
        write_json(Path(folder) / SCORES, eval_scores(folder))


def read_summary(path: Path) -> dict:
    """The ``summary`` of an evaluation's ``results.json``; one CraftError line naming the missing field if it
    is damaged or of another layout."""
    from craft.bench.metrics import load_results

    return load_results(path)["summary"]


def _run_eval(policy, base: Path, es: EvalSet, protocols: tuple[str, ...]) -> None:
    """One b2d rollout of ``policy`` on ``es``, scored under every protocol into ``base/<protocol>``."""
    from craft.bench.runner import EvalConfig, evaluate, make_driver

    ecfg = EvalConfig(protocol="b2d", seed=es.seed, max_steps=es.max_steps, step_files=False)
    evaluate(make_driver(str(policy)), es.split, base / "b2d", ecfg,
             town_seeds=list(es.town_seeds) if es.town_seeds else None, routes=es.routes,
             types=list(es.types) if es.types else None, also={p: base / p for p in protocols if p != "b2d"})
    for p in {"b2d", *protocols}:
        write_scores(base / p)


def eval_wall_s(folder: Path) -> float:
    """Seconds the evaluation in ``folder`` (``<run>/eval-<set>``) took: its one rollout."""
    f = Path(folder) / "b2d"
    if not eval_done(f):
        return 0.0
    wall = eval_scores(f)["summary"].get("wall_time_s", 0.0)
    if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not math.isfinite(wall) or wall < 0:
        raise CraftError(f"evaluation results '{f}' have a wall_time_s that is not a finite number of seconds >= 0 "
                         f"({wall!r}); delete the file to have it evaluated again")
    return float(wall)


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
            f"fine-tuning seeds {list(cfg.seeds)}; mean ± std over seeds"
            + (f"; overrides for every method: `{cfg.finetune}`" if cfg.finetune else "") + ".")


def table_markdown(table: dict, cfg: ExperimentConfig, main: dict | None = None, chosen: dict | None = None) -> str:
    seeds = ", ".join(str(x) for x in cfg.eval_seeds)
    lines = [f"# Main table: {cfg.family} on `{cfg.split}`", "", budget_line(cfg)
             + f" Every policy is evaluated on the same routes under traffic seeds {seeds} and its metrics are the "
             "means over them" + (" (the last row lists the pre-trained policy per traffic seed: its ± is the "
                                  "evaluation's noise floor)" if len(cfg.eval_seeds) > 1 else "") + "."
             + (f" Fine-tuned checkpoints chosen on the `val` subset ({cfg.val_routes} route(s) per type, every "
                f"{cfg.val_every} iterations, b2d-star DS); iterations chosen: "
                + "; ".join(f"{METHOD_NAMES.get(m, m)} {v}" for m, v in (chosen or {}).items()) + "."
                if cfg.val_every else ""), ""]
    for proto, rows in table.items():
        lines += [f"## Protocol `{proto}`", ""] + markdown_table(rows, COLUMNS) + [""]
    if main and main.get("methods"):
        lines += ["## ΔDS against the pre-trained policy", "",
                  "Mean ± std over fine-tuning seeds; [95 % interval] of the paired bootstrap over routes (per-route "
                  "DS averaged over traffic and fine-tuning seeds, 2,000 resamples).", "",
                  "| method | " + " | ".join(f"ΔDS {p}" for p in table) + " |", "|---|" + "---:|" * len(table)]
        for m, e in main["methods"].items():
            if m == "pretrained":
                continue
            lines.append(f"| {METHOD_NAMES.get(m, m)} | " + " | ".join(_delta_cell(e[p]["dDS"]) for p in table) + " |")
        if main.get("craft-grpo"):
            lines.append("| CRAFT − GRPO | " + " | ".join(_delta_cell(main["craft-grpo"][p]) for p in table) + " |")
        lines.append("")
    if cfg.val_every and cfg.methods:
        lines += ["![learning curves](curves.png)", ""]
    if cfg.methods:
        lines += ["![probe diagnostics](probe.png)", ""]
    return "\n".join(lines)


def _delta_cell(d: dict) -> str:
    return fmt(d, sign=True) + f" [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"


def config_dict(cfg: ExperimentConfig) -> dict:
    return asdict(cfg)


# atomic writers (temp name, then rename; the usual file mode; no temp file left on failure): craft.files

# ------------------------------------------------------------------------------------------------ main
def route_scores(folder: str | os.PathLike, es: EvalSet, protocol: str) -> dict[str, float]:
    """Per-route DS of an evaluation made by :func:`evaluate_policy`: ``{route_id: DS}``."""
    return eval_scores(Path(folder) / f"eval-{es.key()}" / protocol)["routes"]


def mean_summary(summaries: list[dict]) -> dict:
    """The mean of several evaluation summaries (e.g. one per traffic seed) over :data:`COLUMNS`."""
    out: dict = {"abilities": {}}
    for c in COLUMNS:
        vals = [(s["abilities"][c] if c in ABILITIES else s[c]) for s in summaries]
        vals = [float(v) for v in vals if v is not None]
        v = sum(vals) / len(vals) if vals else None
        if c in ABILITIES:
            out["abilities"][c] = v
        else:
            out[c] = v
    return out


def paired_bootstrap(diffs: list[float], reps: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of paired per-route differences and its percentile bootstrap interval over routes (resampling
    routes with replacement, ``reps`` times, seeded): ``{"mean", "lo", "hi", "routes"}``."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        raise CraftError("paired_bootstrap needs at least one route")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(reps, d.size))].mean(1)
    a = (1 - level) / 2
    return {"mean": float(d.mean()), "lo": float(np.quantile(means, a)), "hi": float(np.quantile(means, 1 - a)),
            "routes": int(d.size)}


def selected_policy(run: Path) -> tuple[Path, int | None]:
    """The checkpoint of a run chosen on ``val`` only: the periodic ``val`` evaluation with the highest
    b2d-star DS (ties: the later iteration), else the final ``policy.pt``. Returns ``(path, iteration)``."""
    best = None
    for r in read_diagnostics(run):
        v = r.get("val/DS", math.nan)
        if v is not None and math.isfinite(v) and (best is None or v >= best[0]):
            best = (v, int(r["iteration"]))
    if best is None:
        return Path(run) / "policy.pt", None
    path = Path(run) / "val" / f"it-{best[1]:04d}" / "policy.pt"
    archived = not (Path(run) / "trainer.pt").exists() and finished_iterations(run) > 0  # scores, no checkpoints
    return (path, best[1]) if path.exists() or archived else (Path(run) / "policy.pt", None)


def run_policy(root: str | os.PathLike, cfg: ExperimentConfig, method: str, seed: int,
               needs: tuple[tuple[EvalSet, tuple[str, ...]], ...] = (), stand_in: Path | None = None,
               **kw) -> tuple[Path, Path]:
    """``(run, checkpoint chosen on val)`` of one pool run (:func:`finetune_run` with ``kw``). A run restored
    from the archive is fine-tuned again for its checkpoint only when an evaluation of ``needs``
    (``(eval set, protocols)`` pairs) was never archived; with no ``needs``, whenever the checkpoint is missing
    and ``stand_in`` (that checkpoint's committed copy, e.g. a main table's export) does not exist either; the
    returned checkpoint is then ``stand_in``."""
    run = finetune_run(root, cfg, method, seed, **kw)
    policy, _ = selected_policy(run)
    if not policy.exists() and not needs and stand_in is not None and Path(stand_in).exists():
        return run, Path(stand_in)
    if not policy.exists() and not (needs and all(eval_done(policy.parent / f"eval-{es.key()}" / p)
                                                  for es, protos in needs for p in protos)):
        run = finetune_run(root, cfg, method, seed, checkpoint=True, **kw)
        policy, _ = selected_policy(run)
    return run, policy


def evaluate_seeds(policy, folder, cfg: ExperimentConfig, ledger: list | None = None) -> tuple[dict, dict]:
    """``policy`` on ``cfg``'s evaluation routes under every traffic seed of ``cfg.eval_seeds``:
    ``({protocol: traffic-seed mean summary}, {protocol: {route_id: DS averaged over the traffic seeds}})``."""
    sets = [replace(default_eval_set(cfg), seed=s) for s in cfg.eval_seeds]
    protos = tuple(cfg.protocols)
    per = [evaluate_policy(policy, folder, e, protos, ledger) for e in sets]
    summ = {p: mean_summary([x[p] for x in per]) for p in protos}
    routes = {}
    for p in protos:
        rs = [route_scores(folder, e, p) for e in sets]
        routes[p] = {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}
    return summ, routes


def delta_interval(method_routes: list[dict], base_routes: dict) -> dict:
    """ΔDS of a policy against a base: mean / std / n over fine-tuning seeds (``method_routes``: one per seed,
    ``{route_id: DS}``) and the paired 95 % bootstrap interval over routes (``ci``) of the seed-averaged
    per-route difference."""
    per_seed = [sum(r[k] - base_routes[k] for k in base_routes) / len(base_routes) for r in method_routes]
    avg = {k: sum(r[k] for r in method_routes) / len(method_routes) for k in base_routes}
    return {**stats(per_seed), "ci": _ci(paired_bootstrap([avg[k] - base_routes[k] for k in base_routes]))}


def val_eval_set(cfg: ExperimentConfig, fc=None) -> EvalSet:
    """The ``val`` subset of the periodic evaluations (for the pre-trained policy's point of the curves)."""
    return EvalSet(name="valsub", split="val", routes=cfg.val_routes, types=cfg.types, seed=0,
                   max_steps=cfg.eval_max_steps)


def main_table(cfg: ExperimentConfig, out: str | os.PathLike) -> dict:
    """The paper's Table 1: pre-trained and every method, evaluated on ``cfg.split`` under every protocol.

    Every policy runs on the same routes under each traffic seed of ``cfg.eval_seeds``; a policy's metrics are
    the means over those seeds, then mean ± std over fine-tuning seeds. A fine-tuned run contributes the
    checkpoint chosen on ``val`` (:func:`selected_policy`). Per method and protocol: ΔDS against the
    pre-trained policy (mean ± std over fine-tuning seeds) with the paired 95 % bootstrap interval over routes
    (of the per-route DS averaged over traffic and fine-tuning seeds), and CRAFT − GRPO alike. Writes
    ``out/main-<family>/table.{md,json}``, the learning curves ``curves.png`` and probe diagnostics
    ``probe.png``; copies each method's seed-0 checkpoint to ``cfg.export``. Returns the table.
    """
    _file_digest(cfg.init_path)
    es = default_eval_set(cfg)
    sets = [replace(es, seed=s) for s in cfg.eval_seeds]
    used, evals = [pretrained_dir(out, cfg)], []
    protos = tuple(cfg.protocols)

    def evaluate_all(policy, folder) -> tuple[dict, dict]:
        return evaluate_seeds(policy, folder, cfg, evals)

    results: dict[str, dict[str, list[dict]]] = {}
    route_ds: dict[str, dict[str, list[dict]]] = {}
    pre_summ, pre_routes = evaluate_all(cfg.init_path, used[0])
    for p in protos:
        results.setdefault("pretrained", {})[p] = [pre_summ[p]]
        route_ds.setdefault("pretrained", {})[p] = [pre_routes[p]]
    runs: dict[str, list[Path]] = {}
    chosen: dict[str, list] = {}
    for seed in cfg.seeds:
        for m in cfg.methods:
            export = bool(cfg.export) and seed == cfg.seeds[0] and not (Path(cfg.export) / f"{cfg.family}-{m}.pt").exists()
            run = finetune_run(out, cfg, m, seed, checkpoint=export)
            used.append(run)
            runs.setdefault(m, []).append(run)
            policy, it = selected_policy(run)
            chosen.setdefault(m, []).append(it)
            summ, routes = evaluate_all(policy, policy.parent)
            for p in protos:
                results.setdefault(m, {}).setdefault(p, []).append(summ[p])
                route_ds.setdefault(m, {}).setdefault(p, []).append(routes[p])
    if len(cfg.eval_seeds) > 1:  # the evaluation's own noise: the pre-trained policy under each traffic seed
        row = f"pre-trained, per traffic seed {', '.join(str(x) for x in cfg.eval_seeds)}"
        results[row] = {p: [evaluate_policy(cfg.init_path, used[0], e, protos, evals)[p] for e in sets]
                        for p in protos}
    table = summarise(results)
    main = main_block(cfg, results, route_ds)
    folder = Path(out) / f"main-{cfg.family}"
    curves = {m: [read_diagnostics(r) for r in rs] for m, rs in runs.items()}
    pre_val = None
    if cfg.val_every:
        pre_val = evaluate_policy(cfg.init_path, used[0], val_eval_set(cfg), protos, evals)
        pre_val = {p: float(v["DS"]) for p, v in pre_val.items()}
    if curves and cfg.val_every:
        learning_curve_plot(curves, pre_val, folder / "curves.png", f"{cfg.family}: val subset")
    if curves:
        probe_plot(curves, folder / "probe.png", cfg.family)
    if cfg.export:
        for m, rs in runs.items():
            src, _ = selected_policy(rs[0])
            dst = Path(cfg.export) / f"{cfg.family}-{m}.pt"
            if src.exists():
                write_bytes(dst, src.read_bytes())
            elif not dst.exists():  # an archived run keeps no checkpoint; its export is committed
                raise CraftError(f"'{src}' is missing and '{dst}' does not exist: delete the run folder "
                                 f"'{rs[0]}' and its archived copy under '{ARCHIVE}' to have it fine-tuned again")
    write_json(folder / "table.json", {"config": config_dict(cfg), "table": table, "main": main,
                                        "selected_iterations": chosen, "pretrained_val": pre_val,
                                        "runs": run_names(used), "evals": evals})
    write_text(folder / "table.md", table_markdown(table, cfg, main, chosen))
    return table


def main_block(cfg: ExperimentConfig, results: dict, route_ds: dict) -> dict:
    """Per method and protocol: DS, SR (mean / std / n over fine-tuning seeds) and ΔDS vs pre-trained (mean / std
    over seeds, paired 95 % bootstrap interval over routes); ``craft-grpo``: CRAFT − GRPO alike."""
    out: dict = {"methods": {}, "craft-grpo": {}}
    protos = list(results.get("pretrained", {}))
    for m in ["pretrained", *cfg.methods]:
        if m not in results:
            continue
        entry = {}
        for p in protos:
            e = {c: stats([float(s[c]) for s in results[m][p] if s[c] is not None]) for c in ("DS", "SR")}
            if m != "pretrained":
                e["dDS"] = delta_interval(route_ds[m][p], route_ds["pretrained"][p][0])
            entry[p] = e
        out["methods"][m] = entry
    if "craft" in results and "grpo" in results:
        for p in protos:
            c = {k: sum(r[k] for r in route_ds["craft"][p]) / len(route_ds["craft"][p]) for k in route_ds["craft"][p][0]}
            g = {k: sum(r[k] for r in route_ds["grpo"][p]) / len(route_ds["grpo"][p]) for k in c}
            per_seed = [sum(a[k] - b[k] for k in c) / len(c) for a, b in zip(route_ds["craft"][p], route_ds["grpo"][p])]
            out["craft-grpo"][p] = {**stats(per_seed), "ci": _ci(paired_bootstrap([c[k] - g[k] for k in c]))}
    return out


def _ci(b: dict) -> list[float]:
    return [b["lo"], b["hi"]]


def learning_curve_plot(curves: dict[str, list[list[dict]]], pre_val: dict | None, path: Path, title: str) -> None:
    """Closed-loop ``val`` DS (b2d-star, and b2d dashed) over iterations, per method (mean over seeds); the
    pre-trained policy at iteration 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for j, (m, runs) in enumerate(curves.items()):
        for key, ls in (("val/DS", "-"), ("val/DS_b2d", ":")):
            pts = _per_iteration(runs, key)
            if pre_val:
                pts[0] = [pre_val.get("b2d-star" if key == "val/DS" else "b2d", math.nan)]
            its = sorted(pts)
            if its:
                ax.plot(its, [sum(pts[i]) / len(pts[i]) for i in its], ls, marker="o", color=f"C{j}",
                        label=f"{METHOD_NAMES.get(m, m)} ({'b2d-star' if key == 'val/DS' else 'b2d'})")
    ax.set_xlabel("iteration (0: pre-trained)")
    ax.set_ylabel("DS on the val subset")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, not on, the curves
    fig.tight_layout()
    save_png(fig, path)


def _per_iteration(runs: list[list[dict]], key: str) -> dict[int, list[float]]:
    """The finite values of diagnostics column ``key`` by iteration, over the runs (seeds)."""
    pts: dict[int, list[float]] = {}
    for rows in runs:
        for r in rows:
            v = r.get(key, math.nan)
            if v is not None and math.isfinite(v):
                pts.setdefault(int(r["iteration"]), []).append(v)
    return pts


def probe_plot(curves: dict[str, list[list[dict]]], path: Path, title: str) -> None:
    """KL(π‖init), KL(π‖teacher) and the top-1 change rate on the probe states per iteration (mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("probe/kl_init", "KL(π‖init)"), ("probe/kl_teacher", "KL(π‖teacher)"),
            ("probe/top1_changed", "top-1 changed (share of probe states)"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (key, name) in zip(axes, keys):
        for j, (m, runs) in enumerate(curves.items()):
            pts = _per_iteration(runs, key)
            its = sorted(pts)
            if its:
                ax.plot(its, [sum(pts[i]) / len(pts[i]) for i in its], marker=".", color=f"C{j}",
                        label=METHOD_NAMES.get(m, m))
        ax.set_xlabel("iteration")
        ax.set_title(name)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: probe states", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


__all__ = ["ARCHIVE", "archive", "ExperimentConfig", "EvalSet", "SMALL_BUDGET", "evaluate_policy", "finetune_run", "main_table",
           "paired_bootstrap", "selected_policy", "route_scores", "mean_summary", "main_block",
           "summarise", "table_markdown", "markdown_table", "read_diagnostics", "read_summary", "save_png",
           "write_bytes", "write_json", "write_text"]
