"""The paper's other experiments, on the run pool of :mod:`craft.experiments.core`.

- :func:`ablation` (Table 2): pre-trained, + self-distillation only, + counterfactual proxy (= GRPO), + grounded
  residual (= CRAFT), and the residual without the proxy.
- :func:`transfer`: the train-fine-tuned CRAFT policy on ``test``, on the ``long`` split and on freshly generated
  town seeds; CRAFT fine-tuned on long-style routes (built on train towns) on ``test``. Deltas vs pre-trained.
- :func:`scaling` (Fig. 4): x1 and x2 fine-tuning data per iteration for every method; a reward curve of every
  method fine-tuned on one hard scenario type.
- :func:`stability` (Fig. 5): coefficient of variation over iterations of the two KL terms and of the expected
  advantage, per method and family, from the main runs' diagnostics.

Each writes ``OUT/<name>/table.{md,json}`` (and plots) and returns its markdown.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

from craft.errors import CraftError
from craft.experiments.core import (
    METHOD_NAMES, ExperimentConfig, EvalSet, _delta_cell, budget_line, config_dict, default_eval_set, delta_interval,
    evaluate_policy, evaluate_seeds, finetune_run, fmt, markdown_table, pretrained_dir, read_diagnostics, run_names,
    run_policy, save_png, selected_policy, stats, summarise, write_json, write_text,
)

FRESH_TOWNS = tuple(range(50000, 50010))
"""Town seeds no split uses (test 10000+, val 20000+, train 30000+, long 40000+): the transfer's fresh towns."""
HARD_TYPE = "PedestrianCrossing"
"""The hard scenario type of the reward curve (pre-trained vocab: SR 0 on its test routes)."""


def _seed0(cfg: ExperimentConfig) -> ExperimentConfig:
    return replace(cfg, seeds=cfg.seeds[:1])


# ------------------------------------------------------------------------------------------- ablation
ABLATION_ROWS = {
    # label: (method, FinetuneConfig overrides, row name)
    "distill": ("craft", {"use_proxy": False, "use_residual": False}, "+ self-distillation only"),
    "grpo": ("grpo", {}, "+ counterfactual proxy (= GRPO)"),
    "craft": ("craft", {}, "+ grounded residual (= CRAFT)"),
    "residual": ("craft", {"use_proxy": False}, "grounded residual without the proxy"),
}


def ablation(cfg: ExperimentConfig, out: str | os.PathLike) -> str:
    """Table 2 on ``cfg.split``: DS, RC, IS, SR for each step of the method (first seed of ``cfg``); like the main
    table, every policy on the same routes under ``cfg.eval_seeds`` (means over them), fine-tuned checkpoints
    chosen on ``val``, and ΔDS against the pre-trained policy with its paired bootstrap interval over routes."""
    cfg = _seed0(cfg)
    used, evals = [pretrained_dir(out, cfg)], []
    pre_summ, pre_routes = evaluate_seeds(cfg.init_path, used[0], cfg, evals)
    results = {"pre-trained": {p: [s] for p, s in pre_summ.items()}}
    deltas: dict[str, dict] = {}
    for label, (method, over, name) in ABLATION_ROWS.items():
        routes: dict[str, list] = {}
        for seed in cfg.seeds:
            run = finetune_run(out, cfg, method, seed, label=label, **over)
            used.append(run)
            policy, _ = selected_policy(run)
            summ, rds = evaluate_seeds(policy, policy.parent, cfg, evals)
            for p, s in summ.items():
                results.setdefault(name, {}).setdefault(p, []).append(s)
                routes.setdefault(p, []).append(rds[p])
        deltas[name] = {p: delta_interval(r, pre_routes[p]) for p, r in routes.items()}
    cols = ("DS", "RC", "IS", "SR")
    table = summarise(results, cols)
    for p, rows in table.items():
        for name, d in deltas.items():
            rows[name]["ΔDS [95% CI]"] = d[p]
    lines = [f"# Ablation: {cfg.family} on `{cfg.split}`", "", budget_line(cfg)
             + f" Traffic seeds {list(cfg.eval_seeds)} for every policy (means over them); ΔDS against the pre-trained "
             "policy with its paired 95 % bootstrap interval over routes.", ""]
    for p, rows in table.items():
        lines += [f"## Protocol `{p}`", "", f"| policy | {' | '.join(cols)} | ΔDS [95% CI] |",
                  "|---|" + "---:|" * (len(cols) + 1)]
        for name, c in rows.items():
            d = c.get("ΔDS [95% CI]")
            cells = [fmt(c.get(k), 3 if k == "IS" else 2) for k in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_delta_cell(d) if d else '–'} |")
        lines.append("")
    md = "\n".join(lines)
    folder = Path(out) / f"ablation-{cfg.family}"
    write_text(folder / "table.md", md)
    write_json(folder / "table.json", {"config": config_dict(cfg), "table": table, "runs": run_names(used),
                                        "evals": evals})
    return md


# ------------------------------------------------------------------------------------------- transfer
def transfer(cfg: ExperimentConfig, out: str | os.PathLike, fresh_towns: tuple[int, ...] = FRESH_TOWNS,
             fresh_routes: int = 2, long_routes: int | None = 18, long_train_routes: int | None = None) -> str:
    """ΔDS, ΔRC, ΔIS, ΔSR of CRAFT against the pre-trained policy across train/evaluation distributions.

    ``long_routes``: the first N routes of the ``long`` split (18 of its 36 by default: a long route costs up
    to ~10x a Bench2Drive route to drive); ``fresh_routes``: routes per type on ``fresh_towns``."""
    cfg = _seed0(cfg)
    sets = {
        "test": default_eval_set(cfg),
        "long": EvalSet(name="long", split="long", routes=long_routes, seed=cfg.eval_seed,
                        max_steps=cfg.eval_max_steps),
        "fresh": EvalSet(name="fresh", split="test", routes=fresh_routes, types=cfg.types,
                         town_seeds=tuple(fresh_towns), seed=cfg.eval_seed, max_steps=cfg.eval_max_steps),
    }
    pre = pretrained_dir(out, cfg)
    used, evals = [pre], []
    base = {k: evaluate_policy(cfg.init_path, pre, es, (cfg.protocols[0],), ledger=evals)[cfg.protocols[0]] for k, es in sets.items()}
    cases = [("train", "test"), ("train", "long"), ("train", "fresh"), ("long", "test")]
    rows: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    for src, dst in cases:
        deltas: dict[str, list[float]] = {}
        # every evaluation this source's run serves, so that a run fine-tuned again serves all its rows
        need = tuple((sets[d], (cfg.protocols[0],)) for s_, d in cases if s_ == src)
        for seed in cfg.seeds:
            if src == "train":
                run, policy = run_policy(out, cfg, "craft", seed, need)
            else:  # long-style routes built on the same train towns
                run, policy = run_policy(out, cfg, "craft", seed, need, label="craft-long",
                                         collector={"split": "long", "routes": long_train_routes})
            used.append(run)
            s = evaluate_policy(policy, policy.parent, sets[dst], (cfg.protocols[0],), ledger=evals)[cfg.protocols[0]]
            for c in ("DS", "RC", "IS", "SR"):
                deltas.setdefault(f"Δ{c}", []).append(float(s[c]) - float(base[dst][c]))
                deltas.setdefault(c, []).append(float(s[c]))
        name = f"{'train' if src == 'train' else 'long-style (train towns)'} → {_SET_NAMES[dst]}"
        rows[name] = {"pre-trained DS": stats([float(base[dst]["DS"])]),
                      **{k: stats(v) for k, v in deltas.items()}}
        raw[name] = {"pretrained": base[dst], "deltas": deltas}
    cols = ("pre-trained DS", "DS", "ΔDS", "ΔRC", "ΔIS", "ΔSR")
    md = "\n".join([f"# Transfer: CRAFT ({cfg.family}), protocol `{cfg.protocols[0]}`", "", budget_line(cfg),
                    f" `long`: its first {long_routes or 36} routes. Fresh towns: seeds "
                    f"{fresh_towns[0]}–{fresh_towns[-1]}, "
                    f"{fresh_routes} routes per type. Long-style fine-tuning: CRAFT on `long`-split routes built on "
                    f"the same train towns.", "",
                    *markdown_table(rows, cols, head="fine-tuned on → evaluated on"), ""])
    folder = Path(out) / f"transfer-{cfg.family}"
    write_text(folder / "table.md", md)
    write_json(folder / "table.json", {"config": config_dict(cfg), "rows": rows, "raw": raw,
                                        "runs": run_names(used), "evals": evals})
    return md


_SET_NAMES = {"test": "`test`", "long": "`long`", "fresh": "fresh towns"}


# -------------------------------------------------------------------------------------------- scaling
def scaling(cfg: ExperimentConfig, out: str | os.PathLike, hard_type: str = HARD_TYPE, curve_iters: int = 8,
            curve_buffer: int = 512) -> str:
    """Fig. 4a: DS with x1 = ``cfg.buffer // 2`` and x2 = ``cfg.buffer`` transitions per iteration (x2 is the
    main table's budget, so only the x1 runs are new), every method; Fig. 4b: per-iteration reward of every
    method fine-tuned on ``hard_type`` only (``curve_iters`` iterations of ``curve_buffer`` transitions)."""
    cfg = _seed0(cfg)
    es = default_eval_set(cfg)
    used, evals = [pretrained_dir(out, cfg)], []
    pre = evaluate_policy(cfg.init_path, used[0], es, (cfg.protocols[0],), ledger=evals)[cfg.protocols[0]]
    rows: dict[str, dict] = {}
    for m in cfg.methods:
        vals: dict[str, list[float]] = {}
        for seed in cfg.seeds:
            for mult in (1, 2):
                c = replace(cfg, buffer=cfg.buffer * mult // 2)
                run, policy = run_policy(out, c, m, seed, ((es, (cfg.protocols[0],)),))
                used.append(run)
                s = evaluate_policy(policy, policy.parent, es, (cfg.protocols[0],), ledger=evals)[cfg.protocols[0]]
                vals.setdefault(f"DS x{mult}", []).append(float(s["DS"]))
                vals.setdefault(f"SR x{mult}", []).append(float(s["SR"]))
        vals["ΔDS (x2 - x1)"] = [b - a for a, b in zip(vals["DS x1"], vals["DS x2"])]
        rows[m] = {k: stats(v) for k, v in vals.items()}
    # reward curve on one hard type
    ccfg = replace(cfg, buffer=curve_buffer, iters=curve_iters, worlds=min(cfg.worlds, 64))
    hard_es = EvalSet(name=f"type-{hard_type}", split=cfg.split, types=(hard_type,), seed=cfg.eval_seed,
                      max_steps=cfg.eval_max_steps)
    pre_hard = evaluate_policy(cfg.init_path, pretrained_dir(out, cfg), hard_es, (cfg.protocols[0],), ledger=evals)[cfg.protocols[0]]
    curves: dict[str, list[dict]] = {}
    hard: dict[str, dict] = {"pretrained": {"DS": stats([float(pre_hard["DS"])]),
                                            "SR": stats([float(pre_hard["SR"])])}}
    for m in cfg.methods:
        ds, sr = [], []
        for seed in cfg.seeds:
            run, policy = run_policy(out, ccfg, m, seed, ((hard_es, (cfg.protocols[0],)),), label=f"{m}-{hard_type}",
                                     collector={"types": (hard_type,)})
            used.append(run)
            curves.setdefault(m, []).append([{k: r.get(k, math.nan) for k in
                                              ("iteration", "grounded_return_mean", "dense_reward_mean")}
                                             for r in read_diagnostics(run)])
            s = evaluate_policy(policy, policy.parent, hard_es, (cfg.protocols[0],), ledger=evals)[cfg.protocols[0]]
            ds.append(float(s["DS"]))
            sr.append(float(s["SR"]))
        hard[m] = {"DS": stats(ds), "SR": stats(sr)}
    folder = Path(out) / f"scaling-{cfg.family}"
    _scaling_plot(rows, float(pre["DS"]), curves, hard_type, folder / "scaling.png", cfg.protocols[0])
    md = "\n".join([
        f"# Scaling: {cfg.family} on `{cfg.split}`, protocol `{cfg.protocols[0]}`", "", budget_line(cfg),
        f" x1 = {cfg.buffer // 2}, x2 = {cfg.buffer} transitions per iteration (the same {cfg.iters} iterations;"
        f" x2 runs are the main table's). Pre-trained DS "
        f"{float(pre['DS']):.2f}.", "",
        *markdown_table(rows, ("DS x1", "DS x2", "ΔDS (x2 - x1)", "SR x1", "SR x2"), head="method"), "",
        f"## Reward curve on `{hard_type}`", "",
        f"Every method fine-tuned on the train routes of `{hard_type}` only: {ccfg.iters} iterations of "
        f">= {ccfg.buffer} transitions; curve = mean grounded return per transition; then evaluated on the "
        f"`{cfg.split}` routes of that type.", "",
        *markdown_table(hard, ("DS", "SR"), head="method"), "",
        "![scaling](scaling.png)", ""])
    write_text(folder / "table.md", md)
    write_json(folder / "table.json", {"config": config_dict(cfg), "rows": rows, "hard_type": hard_type,
                                        "hard": hard, "curves": curves, "runs": run_names(used), "evals": evals})
    return md


def _scaling_plot(rows: dict, pre_ds: float, curves: dict, hard_type: str, path: Path,
                  protocol: str = "b2d-star") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m, r in rows.items():
        a.plot([1, 2], [r["DS x1"]["mean"], r["DS x2"]["mean"]], marker="o", label=METHOD_NAMES.get(m, m))
    a.axhline(pre_ds, color="grey", ls="--", lw=1, label="pre-trained")
    a.set_xticks([1, 2], ["x1", "x2"])
    a.set_xlabel("fine-tuning transitions per iteration")
    a.set_ylabel(f"DS (test, {protocol})")
    a.set_title("data scaling")
    a.legend(fontsize=8)
    for m, runs in curves.items():
        for k, run in enumerate(runs):
            b.plot([r["iteration"] for r in run], [r["grounded_return_mean"] for r in run], marker=".",
                   label=METHOD_NAMES.get(m, m) if k == 0 else None)
    b.set_xlabel("iteration")
    b.set_ylabel("mean grounded return per transition")
    b.set_title(f"fine-tuning on {hard_type}")
    b.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)




# ------------------------------------------------------------------------------------------ stability
STABILITY_TERMS = {"kl_reverse": "KL(π‖teacher)", "kl_forward": "KL(teacher‖π)", "expected_adv": "E[A]"}


def expected_advantage(row: dict) -> float:
    """The per-iteration expected advantage of a diagnostics row: ``expected_adv`` (CRAFT / GRPO: the exact
    expectation over the candidate set) or, for PPO / REINFORCE++, minus the surrogate loss (the clipped
    expected advantage of the sampled candidates)."""
    v = row.get("expected_adv", math.nan)
    if v is None or math.isnan(v):
        v = -row.get("loss_pg", math.nan)
    return v


def cv(series: list[float]) -> float:
    """Coefficient of variation std / |mean| (population std) over iterations; NaN for < 2 finite values."""
    xs = [x for x in series if x is not None and math.isfinite(x)]
    if len(xs) < 2:
        return math.nan
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    return std / abs(mean) if mean != 0 else math.inf


def stability(cfg: ExperimentConfig, out: str | os.PathLike,
              families: tuple[str, ...] = ("vocab", "hier", "vla")) -> str:
    """Fig. 5: CV over iterations of KL_rev, KL_fwd and E[A] per method and family (mean ± std over seeds).

    A family's runs are those of its main table when ``OUT/main-<family>/table.json`` exists (its seeds and
    budget), else ``cfg``'s with that family (run if missing)."""
    rows: dict[str, dict] = {}
    used, seeds_of = [], {}
    for fam in families:
        fcfg = main_config(out, fam) or replace(cfg, family=fam, init="" if fam != cfg.family else cfg.init)
        seeds_of[fam] = list(fcfg.seeds)
        for m in fcfg.methods:
            per: dict[str, list[float]] = {}
            for seed in fcfg.seeds:
                run = finetune_run(out, fcfg, m, seed)
                used.append(run)
                diag = read_diagnostics(run)
                if not diag:
                    continue
                per.setdefault("CV KL_rev", []).append(cv([r.get("kl_reverse", math.nan) for r in diag]))
                per.setdefault("CV KL_fwd", []).append(cv([r.get("kl_forward", math.nan) for r in diag]))
                per.setdefault("CV E[A]", []).append(cv([expected_advantage(r) for r in diag]))
            rows[f"{fam} / {METHOD_NAMES[m]}"] = {k: stats([x for x in v if math.isfinite(x)]) for k, v in per.items()}
    folder = Path(out) / "stability"
    _stability_plot(rows, families, cfg.methods, folder / "stability.png")
    md = "\n".join([
        "# Stability: coefficient of variation over fine-tuning iterations", "",
        "The main tables' runs (" + "; ".join(f"{f}: seeds {v}" for f, v in seeds_of.items()) + "), "
        f"{cfg.iters} iterations each; mean ± std over seeds.", "",
        "CV = std / |mean| of the per-iteration value (lower is steadier). E[A]: CRAFT / GRPO's exact expected "
        "advantage over the candidate set; PPO / REINFORCE++'s clipped surrogate of the sampled candidate.", "",
        *markdown_table(rows, ("CV KL_rev", "CV KL_fwd", "CV E[A]"), digits=3, head="family / method"), "",
        "![stability](stability.png)", ""])
    write_text(folder / "table.md", md)
    write_json(folder / "table.json", {"config": config_dict(cfg), "families": list(families), "rows": rows,
                                                        "runs": run_names(used)})
    return md


def main_config(out: str | os.PathLike, family: str) -> ExperimentConfig | None:
    """The ExperimentConfig a family's main table was made with (None if it has not been made)."""
    path = Path(out) / f"main-{family}" / "table.json"
    if not path.exists():
        return None
    from craft.files import read_json

    d = read_json(path, "experiment table")
    d = d.get("config") if isinstance(d, dict) else None
    if not isinstance(d, dict):
        raise CraftError(f"experiment table '{path}' has no config; delete it and run the main experiment again")
    try:
        return ExperimentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()
                                   if k in ExperimentConfig.__dataclass_fields__})
    except (TypeError, ValueError) as e:
        raise CraftError(f"experiment table '{path}' has a config this build cannot use ({type(e).__name__}); "
                         "delete it and run the main experiment again") from None


def _stability_plot(rows: dict, families: tuple[str, ...], methods: tuple[str, ...], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    terms = ("CV KL_rev", "CV KL_fwd", "CV E[A]")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    x = np.arange(len(families))
    w = 0.8 / max(1, len(methods))
    for ax, term in zip(axes, terms):
        for j, m in enumerate(methods):
            vals, errs = [], []
            for fam in families:
                v = rows.get(f"{fam} / {METHOD_NAMES[m]}", {}).get(term)
                vals.append(v["mean"] if v else np.nan)
                errs.append(v["std"] if v else 0.0)
            ax.bar(x + (j - (len(methods) - 1) / 2) * w, vals, w, yerr=errs, label=METHOD_NAMES[m], capsize=2)
        ax.set_xticks(x, families)
        ax.set_title(term)
    axes[0].set_ylabel("coefficient of variation")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


__all__ = ["ABLATION_ROWS", "FRESH_TOWNS", "HARD_TYPE", "ablation", "cv", "expected_advantage", "scaling",
           "stability", "transfer"]
