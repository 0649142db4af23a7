"""The paper's experiments on this benchmark (``craft experiment NAME``); see docs/results.md.

Every experiment runs under one root folder: the pool of fine-tuning runs ``ROOT/runs`` (shared, resumable,
see :mod:`craft.experiments.core`) and one folder of tables and plots per experiment. ``all`` runs every
experiment for the given families and then writes ``docs/results.md``; ``report`` only writes it;
``archive`` copies the small files of the finished runs and evaluations into the committed archive
(:data:`~craft.experiments.core.ARCHIVE`), from which a new machine restores them instead of computing them.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from craft.errors import CraftError
from craft.files import write_json
from craft.experiments.core import SMALL_BUDGET, ExperimentConfig, main_table, summarise, table_markdown

NAMES = ("main", "ablation", "transfer", "scaling", "stability", "fidelity", "all", "report", "archive")
FAMILIES = ("vocab", "hier", "vla")


def run_experiment(name: str, cfg: ExperimentConfig, out: str | os.PathLike,
                   families: tuple[str, ...] | None = None, doc: str | os.PathLike = "docs/results.md") -> str:
    """Run (or continue) experiment ``name`` under the root ``out``; returns its markdown."""
    from craft.experiments import tables
    from craft.experiments.results import write_results

    if name not in NAMES:
        raise CraftError(f"unknown experiment '{name}' (one of {', '.join(NAMES)})")
    fams = tuple(families) if families else FAMILIES
    for f in fams:
        if f not in FAMILIES:
            raise CraftError(f"unknown policy family '{f}' (one of {', '.join(FAMILIES)})")
    out = Path(out)
    if name == "main":
        main_table(cfg, out)
        return (out / f"main-{cfg.family}" / "table.md").read_text()
    if name == "ablation":
        return tables.ablation(cfg, out)
    if name == "transfer":
        return tables.transfer(cfg, out)
    if name == "scaling":
        return tables.scaling(cfg, out)
    if name == "stability":
        return tables.stability(cfg, out, fams)
    if name == "fidelity":
        return fidelity_experiment(cfg, out, families=fams)
    if name == "report":
        return write_results(out, doc)
    if name == "archive":
        from craft.experiments.core import ARCHIVE, archive

        n = archive(out)
        return (f"archived {n['runs']} finished runs and {n['evaluations']} new evaluation scores into {ARCHIVE} "
                f"({n['in_progress']} runs still in progress left out"
                + (f"; {n['replaced']} runs fine-tuned again replaced their archived copy" if n["replaced"] else "")
                + ")")
    t0 = time.time()
    for f in fams:
        main_table(replace(cfg, family=f, init="" if f != cfg.family else cfg.init), out)
    for f in ("vocab", "hier"):
        if f in fams:
            tables.ablation(replace(cfg, family=f, init="" if f != cfg.family else cfg.init), out)
    tables.transfer(cfg, out)
    tables.scaling(cfg, out)
    tables.stability(cfg, out, fams)
    fidelity_experiment(cfg, out, families=fams)
    wall = time.time() - t0
    text = write_results(out, doc, all_wall_s=wall)
    write_json(out / "all.json", {"wall_s": wall})
    return text


def fidelity_experiment(cfg: ExperimentConfig, out: str | os.PathLike, fidelity_cfg=None,
                        families: tuple[str, ...] = ("vocab",)) -> str:
    """The proxy-fidelity oracle on each family's pre-trained policy and on CRAFT fine-tuned from it (the first
    seed of the family's main table, or of ``cfg``; its checkpoint chosen on ``val``); ``fidelity_cfg``: a
    :class:`~craft.experiments.fidelity.FidelityConfig` (default: its defaults)."""
    from craft.experiments.core import run_policy, write_text
    from craft.experiments.fidelity import FidelityConfig, fidelity
    from craft.experiments.tables import main_config

    out = Path(out)
    t0 = time.time()
    policies, runs = {}, []
    for fam in families:
        fcfg = main_config(out, fam) or replace(cfg, family=fam, init="" if fam != cfg.family else cfg.init)
        # the checkpoint chosen on val, as the main table evaluates it (restored from the archive: its export)
        exported = Path(fcfg.export) / f"{fam}-craft.pt" if fcfg.export else None
        run, policy = run_policy(out, fcfg, "craft", fcfg.seeds[0], stand_in=exported)
        runs.append(run.name)
        policies[f"{fam} pre-trained"] = fcfg.init_path
        policies[f"{fam} CRAFT"] = str(policy)
    folder = out / "fidelity"
    res = fidelity(policies, folder, fidelity_cfg or FidelityConfig())
    md = (folder / "fidelity.md").read_text()
    write_text(folder / "table.md", md)
    write_json(folder / "table.json", {"result": res, "wall_s": time.time() - t0, "runs": runs})
    return md


__all__ = ["FAMILIES", "NAMES", "SMALL_BUDGET", "ExperimentConfig", "main_table", "run_experiment", "summarise",
           "table_markdown"]
