"""Demonstration collection, pre-training (with --resume), and closed-loop evaluation of a checkpoint."""

import json

import pytest
import torch

from craft.cli import main
from craft.errors import CraftError
from craft.policies import load_policy
from craft.policies.data import CollectConfig, collect, demo_batch, load_demos
from craft.policies.pretrain import PretrainConfig, pretrain, split_routes

torch.set_num_threads(1)

TYPES = ("HardBreakRoute", "PedestrianCrossing")


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    path = tmp_path_factory.mktemp("demos") / "val.pt"
    info = collect(CollectConfig(split="val", routes=1, types=TYPES, max_steps=400), path)
    assert info["routes"] == 2 and info["samples"] > 20
    return path


def test_demonstrations_layout(demos):
    d = load_demos(demos)
    n = d["expert"].shape[0]
    assert d["expert"].shape == (n, 6, 3) and d["route"].shape == (n,)
    assert {r["type"] for r in d["routes"]} == set(TYPES)
    obs, exp = demo_batch(d, torch.arange(min(n, 8)))
    assert obs.ego.dtype == torch.float32 and torch.isfinite(obs.lanes).all()
    # expert plans move forward in the ego frame (or stand)
    assert (exp[..., 0] > -1.0).all()
    tr, va = split_routes(d, 0.5, seed=0)
    assert len(set(d["route"][tr].tolist()) & set(d["route"][va].tolist())) == 0


def test_collection_is_deterministic(demos, tmp_path):
    again = tmp_path / "again.pt"
    collect(CollectConfig(split="val", routes=1, types=TYPES, max_steps=400), again)
    a, b = load_demos(demos), load_demos(again)
    assert torch.equal(a["expert"], b["expert"]) and torch.equal(a["obs"]["agents"], b["obs"]["agents"])


def test_resume_matches_uninterrupted(demos, tmp_path):
    cfg = PretrainConfig(family="hier", steps=6, batch_size=16, ckpt_every=3, log_every=1, val_fraction=0.5)
    pretrain(demos, tmp_path / "full", cfg, progress=False)
    assert torch.load(tmp_path / "full" / "state.pt", weights_only=False)["step"] == 6
    # interrupt a second run right after its step-3 checkpoint, then resume it
    import craft.policies.pretrain as P

    from contextlib import contextmanager

    part = tmp_path / "part"
    orig = P.staged_folder
    calls = {"n": 0}

    @contextmanager
    def boom(*a, **k):  # the record of step 3 moved into the folder, then the run is killed
        with orig(*a, **k) as stage:
            yield stage
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    P.staged_folder = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain(demos, part, cfg, progress=False)
    finally:
        P.staged_folder = orig
    assert torch.load(part / "state.pt", weights_only=False)["step"] == 3
    pretrain(demos, part, cfg, resume=True, progress=False)
    a = load_policy(tmp_path / "full" / "policy.pt").state_dict()
    b = load_policy(part / "policy.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CraftError, match="different configuration"):
        pretrain(demos, part, PretrainConfig(family="hier", steps=7, batch_size=16, val_fraction=0.5),
                 resume=True, progress=False)


def test_cli_pretrain_then_eval(demos, tmp_path, capsys):
    out = tmp_path / "hier"
    assert main(["pretrain", "--family", "hier", "--data", str(demos), "--steps", "4", "--batch-size", "16",
                 "--out", str(out)]) == 0
    m = json.loads((out / "openloop.json").read_text())
    assert {"l2_1s", "l2_2s", "l2_3s", "accuracy"} <= set(m) and m["l2_3s"] >= m["l2_1s"] >= 0
    assert (out / "metrics.csv").read_text().startswith("step,")
    ev = tmp_path / "ev"
    assert main(["eval", "--policy", str(out), "--split", "val", "--routes", "1", "--types", "HardBreakRoute",
                 "--max-steps", "100", "--out", str(ev)]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert res["summary"]["policy"].startswith("hier:") and res["summary"]["num_routes"] == 1
    # the vocabulary family needs at least 512 demonstrations for its k-means
    assert main(["pretrain", "--family", "vocab", "--data", str(demos), "--steps", "2", "--batch-size", "16",
                 "--out", str(tmp_path / "v")]) == 2
    assert "k-means needs at least" in capsys.readouterr().err
    assert not (tmp_path / "v" / "policy.pt").exists()


def test_bad_demonstrations(tmp_path):
    with pytest.raises(CraftError, match="does not exist"):
        load_demos(tmp_path / "none.pt")
    torch.save({"x": 1}, tmp_path / "x.pt")
    with pytest.raises(CraftError, match="not a CRAFT demonstrations file"):
        load_demos(tmp_path / "x.pt")
