"""Experiment runners on a tiny budget: well-formed, deterministic tables; finished runs are reused."""

import json
import math
from dataclasses import replace

import pytest
import torch

from craft.errors import CraftError
from craft.experiments import ExperimentConfig, main_table, run_experiment, summarise, table_markdown
from craft.experiments import tables
from craft.experiments.core import EvalSet, evaluate_policy, finetune_run
from craft.experiments.results import write_results
from craft.policies import build_policy

torch.set_num_threads(1)

TINY = dict(methods=("grpo",), seeds=(0,), iters=1, buffer=16, worlds=2, train_towns=1, split="val", routes=1,
            types=("HardBreakRoute",), protocols=("b2d",), finetune={"minibatch": 16}, eval_max_steps=150,
            eval_seeds=(0,), val_every=0, export=None)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init") / "init.pt"
    build_policy("vocab").save(path)
    return str(path)


def test_main_table_tiny(tmp_path, init):
    cfg = ExperimentConfig(family="vocab", init=init, **TINY)
    table = main_table(cfg, tmp_path)
    rows = table["b2d"]
    assert set(rows) == {"pretrained", "grpo"}
    for cols in rows.values():
        assert cols["DS"]["n"] == 1 and 0 <= cols["DS"]["mean"] <= 100 and cols["DS"]["std"] == 0.0
    md = (tmp_path / "main-vocab" / "table.md").read_text()
    assert "| GRPO |" in md and "Protocol `b2d`" in md
    # a second call finds every run finished and rewrites the same table
    first = (tmp_path / "main-vocab" / "table.json").read_text()
    main_table(cfg, tmp_path)
    assert (tmp_path / "main-vocab" / "table.json").read_text() == first
    data = json.loads(first)
    assert data["config"]["iters"] == 1 and len(data["runs"]) == 2 and len(data["evals"]) == 2


def test_noise_floor_row(tmp_path, init):
    cfg = ExperimentConfig(family="vocab", init=init, **{**TINY, "methods": (), "eval_seeds": (0, 1)})
    rows = main_table(cfg, tmp_path)["b2d"]
    row = rows["pre-trained, per traffic seed 0, 1"]
    assert row["DS"]["n"] == 2 and rows["pretrained"]["DS"]["n"] == 1
    assert "noise floor" in (tmp_path / "main-vocab" / "table.md").read_text()


def test_seeded_runs_repeat(tmp_path, init):
    cfg = ExperimentConfig(family="vocab", init=init, **TINY)
    a = finetune_run(tmp_path / "a", cfg, "grpo", 0)
    b = finetune_run(tmp_path / "b", cfg, "grpo", 0)
    assert a.name == b.name  # the pool key depends on the config and the checkpoint only
    pa = torch.load(a / "policy.pt", weights_only=False)["state_dict"]
    pb = torch.load(b / "policy.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    other = finetune_run(tmp_path / "a", cfg, "grpo", 1)
    assert other.name != a.name


def test_one_rollout_scores_both_protocols(tmp_path, init):
    """b2d-star from the b2d rollout (cut at the first collision) equals a b2d-star rollout."""
    from craft.bench.runner import EvalConfig, evaluate, make_driver

    es = EvalSet(name="val", split="val", routes=1, types=("ParkingCutIn", "HardBreakRoute", "Accident"))
    both = evaluate_policy(init, tmp_path / "pol", es)
    star = evaluate(make_driver(init), "val", tmp_path / "star", EvalConfig(protocol="b2d-star"), routes=1,
                    types=list(es.types))
    for k in ("DS", "RC", "IS", "SR"):
        assert both["b2d-star"][k] == pytest.approx(star[k], abs=1e-6), k


def test_ablation_transfer_scaling_stability_tiny(tmp_path, init):
    cfg = ExperimentConfig(family="vocab", init=init, **{**TINY, "methods": ("grpo", "craft")})
    md = tables.ablation(cfg, tmp_path)
    rows = json.loads((tmp_path / "ablation-vocab" / "table.json").read_text())["table"]["b2d"]
    assert list(rows) == ["pre-trained", "+ self-distillation only", "+ counterfactual proxy (= GRPO)",
                          "+ grounded residual (= CRAFT)", "grounded residual without the proxy"]
    assert "| DS | RC | IS | SR | ΔDS [95% CI] |" in md
    crow = rows["+ grounded residual (= CRAFT)"]["ΔDS [95% CI]"]
    assert crow["ci"][0] <= crow["mean"] + 1e-9 <= crow["ci"][1] + 2e-9
    md = tables.transfer(replace(cfg, train_towns=2), tmp_path, fresh_towns=(50000,), fresh_routes=1, long_routes=1,
                         long_train_routes=1)
    t = json.loads((tmp_path / "transfer-vocab" / "table.json").read_text())["rows"]
    assert len(t) == 4 and all(math.isfinite(r["ΔDS"]["mean"]) for r in t.values())
    md = tables.scaling(cfg, tmp_path, hard_type="HardBreakRoute", curve_iters=2, curve_buffer=8)
    s = json.loads((tmp_path / "scaling-vocab" / "table.json").read_text())
    assert set(s["rows"]) == {"grpo", "craft"} and len(s["curves"]["craft"][0]) == 2
    assert (tmp_path / "scaling-vocab" / "scaling.png").stat().st_size > 0
    main_table(cfg, tmp_path)  # stability takes the main table's runs (its seeds), not its own cfg's
    md = tables.stability(replace(cfg, seeds=(0, 1)), tmp_path, families=("vocab",))
    assert "vocab / CRAFT" in md and (tmp_path / "stability" / "stability.png").exists()
    assert not list((tmp_path / "runs").glob("*-s1-*"))
    # docs/results.md from these files is deterministic
    a = write_results(tmp_path, tmp_path / "docs" / "results.md", discussion=None)
    b = write_results(tmp_path, tmp_path / "docs" / "results2.md", discussion=None)
    assert a == b and "## Ablation (Table 2) — `vocab`" in a and "Not run yet." in a  # main / fidelity not run here
    assert (tmp_path / "docs" / "results" / "stability-stability.png").exists()


def test_fidelity_experiment_and_report(tmp_path, init):
    from craft.experiments import fidelity_experiment
    from craft.experiments.fidelity import FidelityConfig

    cfg = ExperimentConfig(family="vocab", init=init, **TINY)
    fc = FidelityConfig(states=2, candidates=4, tail_s=0.5, towns=1, worlds=2, buffer=16, routes=1,
                        scatter_states=1)
    md = fidelity_experiment(cfg, tmp_path, fc)
    data = json.loads((tmp_path / "fidelity" / "table.json").read_text())
    assert set(data["result"]["policies"]) == {"vocab pre-trained", "vocab CRAFT"} and data["wall_s"] > 0
    assert "| vocab pre-trained |" in md
    doc = run_experiment("report", cfg, tmp_path, doc=tmp_path / "results.md")
    assert "## Proxy fidelity (oracle)" in doc and "| vocab CRAFT |" in doc
    assert (tmp_path / "results" / "fidelity-fidelity.png").exists()


def test_cv_and_bad_input():
    assert tables.cv([1.0, 1.0, 1.0]) == 0.0
    assert tables.cv([1.0, 3.0]) == pytest.approx(0.5)
    assert math.isnan(tables.cv([2.0]))
    with pytest.raises(CraftError, match="family"):
        ExperimentConfig(family="nope")
    with pytest.raises(CraftError, match="not found"):
        main_table(ExperimentConfig(init="missing.pt", **TINY), "unused")
    with pytest.raises(CraftError, match="unknown experiment"):
        run_experiment("nope", ExperimentConfig(**TINY), "unused")


def test_summary_mean_and_std_over_seeds():
    ab = {k: None for k in ("Merging", "Overtaking", "Emergency_Brake", "Give_Way", "Traffic_Signs", "Mean")}
    s = [{"DS": 50.0, "SR": 10.0, "RC": 80.0, "IS": 0.5, "abilities": {**ab, "Merging": 20.0}},
         {"DS": 70.0, "SR": 30.0, "RC": 90.0, "IS": 0.7, "abilities": {**ab, "Merging": 40.0}}]
    t = summarise({"craft": {"b2d": s}})
    ds = t["b2d"]["craft"]["DS"]
    assert ds["mean"] == 60.0 and abs(ds["std"] - 14.1421356) < 1e-6 and ds["n"] == 2
    assert t["b2d"]["craft"]["Give_Way"] is None
    md = table_markdown(t, ExperimentConfig())
    assert "60.00 ± 14.14" in md and "–" in md


def test_dropping_ended_routes_changes_nothing(tmp_path, monkeypatch):
    """The runner drops ended routes' rows from the batch; every route's log is the same as without it."""
    from craft.bench import runner
    from craft.bench.runner import EvalConfig, evaluate, make_driver

    types = ["HardBreakRoute", "ParkingCutIn", "Accident", "ControlLoss", "StaticCutIn", "YieldToEmergencyVehicle",
             "PedestrianCrossing", "SignalizedJunctionLeftTurn", "OppositeVehicleRunningRedLight"]
    cfg = EvalConfig(max_steps=700)
    monkeypatch.setattr(runner, "COMPACT_MIN_ROWS", 4)
    from craft.world.autopilot import PlanExecutor

    dropped = []
    index = PlanExecutor.index
    monkeypatch.setattr(PlanExecutor, "index", lambda self, idx: dropped.append(int((~idx).sum())) or index(self, idx))
    a = evaluate(make_driver("expert"), "val", tmp_path / "a", cfg, types=types)
    monkeypatch.setattr(runner, "COMPACT_MIN_ROWS", 10_000)
    b = evaluate(make_driver("expert"), "val", tmp_path / "b", cfg, types=types)
    ra = json.loads((tmp_path / "a" / "results.json").read_text())["_checkpoint"]["records"]
    rb = json.loads((tmp_path / "b" / "results.json").read_text())["_checkpoint"]["records"]
    assert dropped and sum(dropped) >= 9  # ended routes' rows were dropped mid-run
    assert len(ra) == 18 and ra == rb and a["DS"] == b["DS"]


def test_paired_bootstrap_on_a_tiny_table():
    from craft.experiments.core import paired_bootstrap

    # per-route DS of two policies on 4 routes: the differences are 1, 2, 3, 4
    a = {"r0": 50.0, "r1": 60.0, "r2": 70.0, "r3": 80.0}
    b = {"r0": 49.0, "r1": 58.0, "r2": 67.0, "r3": 76.0}
    d = [a[k] - b[k] for k in a]
    ci = paired_bootstrap(d, reps=4000, seed=0)
    assert ci["mean"] == 2.5 and ci["routes"] == 4
    assert 1.0 <= ci["lo"] < 2.5 < ci["hi"] <= 4.0  # resampled means of 4 values from {1, 2, 3, 4}
    assert ci["lo"] <= 1.75 and ci["hi"] >= 3.25  # the 2.5 / 97.5 % quantiles of that distribution
    assert paired_bootstrap(d, reps=4000, seed=0) == ci  # seeded
    same = paired_bootstrap([3.0] * 5)
    assert same["lo"] == same["hi"] == 3.0
    with pytest.raises(CraftError):
        paired_bootstrap([])


def test_main_table_with_val_selection_intervals_and_main_json(tmp_path, init):
    cfg = ExperimentConfig(family="vocab", init=init, **{**TINY, "methods": ("grpo", "craft"), "iters": 2,
                                                         "val_every": 1, "eval_seeds": (0, 1),
                                                         "protocols": ("b2d-star", "b2d"),
                                                         "export": str(tmp_path / "export")})
    table = main_table(cfg, tmp_path)
    assert list(table) == ["b2d-star", "b2d"]  # the paper's protocol first
    data = json.loads((tmp_path / "main-vocab" / "table.json").read_text())
    m = data["main"]
    for meth in ("grpo", "craft"):
        for p in ("b2d-star", "b2d"):
            d = m["methods"][meth][p]["dDS"]
            assert d["ci"][0] <= d["mean"] + 1e-9 and d["mean"] <= d["ci"][1] + 1e-9
            assert d["mean"] == pytest.approx(m["methods"][meth][p]["DS"]["mean"]
                                              - m["methods"]["pretrained"][p]["DS"]["mean"], abs=1e-6)
    assert set(m["craft-grpo"]) == {"b2d-star", "b2d"}
    assert all(it in (1, 2) for its in data["selected_iterations"].values() for it in its)
    run = next((tmp_path / "runs").glob("vocab-craft-s0-*"))
    diag = (run / "diagnostics.csv").read_text().splitlines()
    assert "val/DS" in diag[0] and "probe/kl_init" in diag[0] and len(diag) == 3
    for it in (1, 2):
        assert (run / "val" / f"it-{it:04d}" / "b2d-star" / "results.json").exists()
    assert (tmp_path / "export" / "vocab-craft.pt").exists() and (tmp_path / "export" / "vocab-grpo.pt").exists()
    assert (tmp_path / "main-vocab" / "curves.png").stat().st_size > 0
    assert (tmp_path / "main-vocab" / "probe.png").stat().st_size > 0
    md = (tmp_path / "main-vocab" / "table.md").read_text()
    assert "CRAFT − GRPO" in md and md.index("Protocol `b2d-star`") < md.index("Protocol `b2d`")
    write_results(tmp_path, tmp_path / "docs" / "results.md", discussion=None)
    mj = json.loads((tmp_path / "docs" / "results" / "main.json").read_text())
    fam = mj["families"]["vocab"]
    assert set(fam["methods"]) == {"pretrained", "grpo", "craft"}
    assert set(fam["methods"]["craft"]["b2d-star"]) == {"DS", "SR", "dDS"}


def test_archive_restores_finished_runs_without_computing(tmp_path, init, monkeypatch):
    """A main table archived with `craft experiment archive` is rebuilt on a new root (a new machine) from the
    archive alone: no fine-tuning, no evaluation, the same table; a run in progress is not archived."""
    from craft.experiments import core

    monkeypatch.setattr(core, "ARCHIVE", tmp_path / "archive")
    cfg = ExperimentConfig(family="vocab", init=init, **{**TINY, "iters": 2, "val_every": 1,
                                                         "export": str(tmp_path / "export")})
    first = main_table(cfg, tmp_path / "a")
    partial = finetune_run(tmp_path / "a", replace(cfg, iters=3), "grpo", 1, iters=1)  # stopped early
    (partial / "config.json").write_text((partial / "config.json").read_text().replace('"iters": 1', '"iters": 3'))
    counts = run_experiment("archive", cfg, tmp_path / "a")
    assert "archived 1 finished runs" in counts and "1 runs still in progress" in counts
    assert not (tmp_path / "archive" / "runs" / partial.name).exists()
    assert not list((tmp_path / "archive").rglob("*.pt")) and not list((tmp_path / "archive").rglob("results.json"))

    def refuse(*a, **k):
        raise AssertionError("computed again")

    monkeypatch.setattr(core, "_run_eval", refuse)
    monkeypatch.setattr("craft.finetune.trainer.finetune", refuse)
    again = main_table(cfg, tmp_path / "b")
    assert again == first
    run = next((tmp_path / "b" / "runs").glob("vocab-grpo-s0-*"))
    assert core.finished_iterations(run) == 2 and not (run / "trainer.pt").exists()
    from craft.experiments.core import selected_policy

    policy, it = selected_policy(run)
    assert it in (1, 2) and not policy.exists()
    with pytest.raises(CraftError, match="restored from the archive"):  # an evaluation that was never archived
        evaluate_policy(policy, policy.parent, EvalSet(name="other", split="val", routes=1, seed=5), ("b2d",))
    # an archived run whose needed evaluations are archived is not fine-tuned again for its checkpoint
    from craft.experiments.core import default_eval_set, run_policy

    assert run_policy(tmp_path / "b", cfg, "grpo", 0, ((default_eval_set(cfg), cfg.protocols),)) == (run, policy)

    # a missing export: the archived seed-0 runs are fine-tuned again for their checkpoints; the same seed gives
    # the same run, so the archived evaluations stay (no evaluation is computed)
    import torch

    exported = {p.name: torch.load(p, weights_only=False) for p in sorted((tmp_path / "export").glob("*.pt"))}
    for p in (tmp_path / "export").glob("*.pt"):
        p.unlink()
    monkeypatch.undo()
    monkeypatch.setattr(core, "ARCHIVE", tmp_path / "archive")
    monkeypatch.setattr(core, "_run_eval", refuse)
    assert main_table(cfg, tmp_path / "c") == first
    for name, before in exported.items():
        after = torch.load(tmp_path / "export" / name, weights_only=False)
        sd_a, sd_b = before.get("state_dict", before), after.get("state_dict", after)
        assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a), name
    assert not list((tmp_path / "c" / "runs").glob("*.retrain"))
    # a run fine-tuned again that differs from its archived copy replaces that copy as a whole on the next archive
    run_c = next((tmp_path / "c" / "runs").glob("vocab-grpo-s0-*"))
    (run_c / "diagnostics.csv").write_text((run_c / "diagnostics.csv").read_text() + "\n")
    stale = tmp_path / "archive" / "runs" / run_c.name / "stale.json"
    stale.write_text("{}")
    assert "1 runs fine-tuned again replaced" in run_experiment("archive", cfg, tmp_path / "c")
    assert (tmp_path / "archive" / "runs" / run_c.name / "diagnostics.csv").read_bytes() == \
        (run_c / "diagnostics.csv").read_bytes() and not stale.exists()
