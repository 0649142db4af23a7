"""Experiment runner on a tiny budget: a well-formed, deterministic table; finished runs are skipped."""

import json

import torch

from craft.experiments import ExperimentConfig, main_table, summarise, table_markdown
from craft.policies import build_policy

torch.set_num_threads(1)


def test_main_table_tiny(tmp_path):
    torch.manual_seed(0)
    init = tmp_path / "init.pt"
    build_policy("hier").save(init)
    cfg = ExperimentConfig(family="hier", init=str(init), methods=("grpo",), seeds=(0,), iters=1, buffer=16,
                           worlds=2, train_towns=1, split="val", routes=1, types=("HardBreakRoute",),
                           protocols=("b2d",))
    table = main_table(cfg, tmp_path / "exp")
    rows = table["b2d"]
    assert set(rows) == {"pretrained", "grpo"}
    for cols in rows.values():
        assert cols["DS"]["n"] == 1 and 0 <= cols["DS"]["mean"] <= 100 and cols["DS"]["std"] == 0.0
    md = (tmp_path / "exp" / "table.md").read_text()
    assert "| grpo |" in md and "Protocol `b2d`" in md
    # a second call finds every run finished and rewrites the same table
    first = (tmp_path / "exp" / "table.json").read_text()
    main_table(cfg, tmp_path / "exp")
    assert (tmp_path / "exp" / "table.json").read_text() == first
    assert json.loads(first)["config"]["iters"] == 1


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
