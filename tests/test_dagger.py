"""DAgger (`craft dagger`): labels on policy-visited states, aggregation, resume after a kill, the CLI."""

import contextlib
import json
from pathlib import Path

import pytest
import torch

from craft.cli import main
from craft.errors import CraftError
from craft.policies import load_policy
from craft.policies.dagger import DaggerConfig, aggregate, dagger, held_out_routes, split_by_identity
from craft.policies.data import CollectConfig, RecordingExpert, collect, load_demos

torch.set_num_threads(1)

TYPES = ("HardBreakRoute", "PedestrianCrossing")
TINY = dict(family="hier", rounds=2, routes=1, types=TYPES, max_steps=120, val_max_steps=80, steps=4,
            train_batch=16, warmup=1, beta=0.5, holdout=0.3)


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    path = tmp_path_factory.mktemp("dagger-demos") / "demos.pt"
    collect(CollectConfig(split="train", routes=1, types=TYPES, max_steps=150), path)
    return path


def test_label_is_the_experts_plan_on_the_visited_state(init_ckpt):
    """beta = 0: the policy drives; every recorded label equals the expert's plan computed afresh on the state
    the policy brought the world to, and the executed plan is the policy's top-1 candidate there."""
    from craft.bench.runner import EvalConfig, run_batch
    from craft.experts.pdm import PrivilegedExpert
    from craft.scenarios.splits import load_split
    from craft.world.observe import observe
    from craft.world.world import World

    policy = load_policy(init_ckpt)
    cfg = CollectConfig(split="train", routes=1, types=TYPES, perturb_prob=0.3, max_steps=40)
    insts, towns = load_split("train", routes=1, types=list(TYPES))
    world = World(towns)
    seen = []

    class Spy(RecordingExpert):
        def plan(self, world, state):
            snap = state.index(torch.ones(state.batch_size, dtype=torch.bool))  # a copy of the visited state
            out = super().plan(world, state)
            seen.append((snap, out.clone()))
            return out

    rec = Spy(cfg, policy.cfg.encoder.obs_config, policy=policy, beta=0.0)
    run_batch(world, insts, rec, EvalConfig(max_steps=40))
    assert len(seen) == 8 and len(rec.plans) == 8
    fresh = PrivilegedExpert()
    for (state, executed), label, by_policy in zip(seen, rec.plans, rec.by_policy):
        keep = ~state.done
        assert torch.allclose(fresh.plan(world, state)[keep].float(), label, atol=1e-5)
        assert by_policy.all()
        with torch.no_grad():
            cs = policy(observe(world.maps, state, world.lights(state), policy.cfg.encoder.obs_config))
        assert torch.allclose(executed, cs.select(cs.top1()), atol=1e-6)
        # the policy, not the expert, drove: the two plans differ (an untrained policy)
        assert not torch.allclose(executed[keep], label, atol=1e-2)


def test_aggregate_keeps_every_sample_once(demos):
    d = load_demos(demos)
    n = len(d["expert"])
    a, b = {**d}, {**d, "expert": d["expert"] + 1.0, "by_policy": torch.ones(n, dtype=torch.bool)}
    agg = aggregate([d, a, b])
    assert len(agg["expert"]) == 3 * n and len(agg["routes"]) == 3 * len(d["routes"])
    for i, part in enumerate((d, a, b)):
        sel = agg["part"] == i
        assert int(sel.sum()) == n and torch.equal(agg["expert"][sel], part["expert"])
        assert torch.equal(agg["obs"]["agents"][sel], part["obs"]["agents"])
        # route indices stay distinct per part and point at that part's route entries
        assert all(agg["routes"][r]["part"] == i for r in agg["route"][sel].unique().tolist())
    assert torch.equal(agg["by_policy"], torch.arange(3 * n) >= 2 * n)
    # held-out routes are chosen by identity: the same route is held out in every part
    ho = held_out_routes(agg["routes"], 0.5, seed=0).view(3, -1)
    assert torch.equal(ho[0], ho[1]) and torch.equal(ho[0], ho[2])
    tr, va = split_by_identity(agg, 0.5, seed=0)
    assert len(tr) + len(va) == 3 * n and not set(tr.tolist()) & set(va.tolist())


def test_killed_round_resumes_to_the_same_data_and_weights(demos, init_ckpt, tmp_path):
    import craft.policies.dagger as D
    import craft.policies.pretrain as P

    cfg = DaggerConfig(**{**TINY, "rounds": 1})
    rows = dagger(init_ckpt, demos, tmp_path / "full", cfg, progress=False)
    assert [r["round"] for r in rows] == [0, 1]
    full_data = load_demos(tmp_path / "full" / "round-0001" / "data.pt")
    assert full_data["by_policy"].any() and not full_data["by_policy"].all()  # beta 0.5 mixes both

    # kill 1: right after the round's data is written; kill 2 (on resume): after the first training record
    part = tmp_path / "part"
    orig_d = D.atomic_save

    def kill_after(name, orig):
        def f(obj, path):
            orig(obj, path)
            if str(path).endswith(name):
                raise KeyboardInterrupt
        return f

    D.atomic_save = kill_after("data.pt", orig_d)
    try:
        with pytest.raises(KeyboardInterrupt):
            dagger(init_ckpt, demos, part, cfg, progress=False)
    finally:
        D.atomic_save = orig_d
    assert (part / "round-0001" / "data.pt").exists() and not (part / "round-0001" / "round.json").exists()
    with pytest.raises(CraftError, match="already holds a DAgger run"):
        dagger(init_ckpt, demos, part, cfg, progress=False)
    orig_s = P.staged_folder

    @contextlib.contextmanager
    def staged_then_kill(out, **kw):  # the first training record moved in whole, then the kill
        with orig_s(out, **kw) as stage:
            yield stage
        if (Path(out) / "state.pt").exists():
            raise KeyboardInterrupt

    P.staged_folder = staged_then_kill
    try:
        with pytest.raises(KeyboardInterrupt):
            dagger(init_ckpt, demos, part, cfg, resume=True, progress=False)
    finally:
        P.staged_folder = orig_s
    assert torch.load(part / "round-0001" / "train" / "state.pt", weights_only=False)["step"] < cfg.steps
    rows2 = dagger(init_ckpt, demos, part, cfg, resume=True, progress=False)
    a = load_demos(tmp_path / "full" / "round-0001" / "data.pt")
    b = load_demos(part / "round-0001" / "data.pt")
    assert torch.equal(a["expert"], b["expert"]) and torch.equal(a["obs"]["lanes"], b["obs"]["lanes"])
    wa = load_policy(tmp_path / "full" / "policy.pt").state_dict()
    wb = load_policy(part / "policy.pt").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert rows2[1]["samples_total"] == rows[1]["samples_total"]
    # a resumed run must keep its settings (only the number of rounds may change)
    with pytest.raises(CraftError, match="different settings"):
        dagger(init_ckpt, demos, part, DaggerConfig(**{**TINY, "rounds": 1, "lr": 1e-4}), resume=True,
               progress=False)


def test_cli_dagger_end_to_end(demos, init_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["dagger", "--family", "hier", "--init", str(init_ckpt), "--data", str(demos), "--rounds", "2",
               "--routes", "1", "--types", *TYPES, "--beta", "0.5", "--steps", "3", "--train-batch", "16", "--max-steps", "80",
               "--out", str(out)])
    assert rc == 0
    p = load_policy(out / "policy.pt", family="hier")
    assert p.meta["step"] == 3 and load_policy(out / "best.pt", family="hier") is not None
    rows = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    n_demo = len(load_demos(demos)["expert"])
    new = [len(load_demos(out / f"round-000{k}" / "data.pt")["expert"]) for k in (1, 2)]
    # every round's data is aggregated with all earlier data, each sample once
    assert rows[1]["samples_total"] == n_demo + new[0] and rows[2]["samples_total"] == n_demo + sum(new)
    meta = p.meta
    assert meta["samples_train"] + meta["samples_val"] == rows[2]["samples_total"]
    assert rows[1]["beta"] == 0.5 and rows[2]["beta"] == 0.25
    assert (out / "rounds.png").stat().st_size > 0 and len((out / "rounds.csv").read_text().splitlines()) == 4
    assert "round 2:" in capsys.readouterr().out
    # bad input: one line, exit 2, nothing written
    rc = main(["dagger", "--family", "vocab", "--init", str(init_ckpt), "--data", str(demos), "--out",
               str(tmp_path / "bad")])
    assert rc == 2 and "holds a 'hier' policy" in capsys.readouterr().err and not (tmp_path / "bad").exists()
