"""Ray workers: merged buffers against the in-process rewards, shards of the route order, repeatable
2-worker fine-tuning with an exact resume, a worker killed mid-iteration, sharded evaluation identical to
the single-process one (same --batch-size). One local Ray instance for the module (shut down at its end)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace

import pytest
import torch

from craft.finetune.collector import Collector, CollectorConfig
from craft.finetune.trainer import FinetuneConfig, Trainer, decision_rewards
from craft.policies import load_policy

torch.set_num_threads(1)

TINY = FinetuneConfig(iters=2, minibatch=16, collector=CollectorConfig(
    split="val", worlds=2, buffer_size=24, routes=1, types=("HardBreakRoute", "Accident")))


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


# ---------------------------------------------------------------------- no Ray needed
def test_collector_shards_partition_the_route_order():
    cfg = CollectorConfig(split="val", worlds=2, buffer_size=8, routes=1, types=("HardBreakRoute", "Accident",
                                                                               "ParkingCutIn"))
    full = Collector(cfg).order
    shards = [Collector(cfg, shard=(i, 2)) for i in range(2)]
    assert shards[0].order == full[0::2] and shards[1].order == full[1::2]
    assert sorted(shards[0].order + shards[1].order) == sorted(full)
    # each shard samples with its own stream; (0, 1) keeps the single-process stream
    a, b = (s.sample_gen.get_state() for s in shards)
    assert not torch.equal(a, b)
    assert torch.equal(Collector(cfg, shard=(0, 1)).sample_gen.get_state(), Collector(cfg).sample_gen.get_state())


def test_merged_buffer_keeps_each_workers_rewards(init_ckpt):
    """Stacking two workers' buffers along T (W padded) gives every worker's rewards unchanged, and the
    rows of observations / candidates stay in the merged (t, w) order."""
    from craft.finetune.distributed import merge_buffers

    pol = load_policy(init_ckpt)
    cfg = replace(TINY.collector, buffer_size=10)
    a = Collector(replace(cfg, worlds=2), shard=(0, 2)).collect(pol)
    b = Collector(replace(cfg, worlds=1), shard=(1, 2)).collect(pol)
    m = merge_buffers([a, b])
    Ta, Tb = a.live.shape[0], b.live.shape[0]
    assert m.live.shape == (Ta + Tb, 2) and not m.live[Ta:, 1].any()
    assert m.size == a.size + b.size
    ga, da, _ = decision_rewards(a, TINY)
    gb, db, _ = decision_rewards(b, TINY)
    gm, dm, _ = decision_rewards(m, TINY)
    assert torch.equal(gm[:Ta], ga) and torch.equal(dm[:Ta], da)
    assert torch.equal(gm[Ta:, :1], gb) and torch.equal(dm[Ta:, :1], db)
    assert (gm[Ta:, 1] == 0).all()
    # the chosen index of every row matches its own candidate set's row
    assert torch.equal(m.flat(m.chosen), torch.cat([a.flat(a.chosen), b.flat(b.chosen)]))
    assert torch.equal(m.candidates.logits, torch.cat([a.candidates.logits, b.candidates.logits]))
    assert not m.notdone[Ta - 1].any()  # no return looks from one worker into the next


# ---------------------------------------------------------------------- Ray
def _weights(tr):
    return {k: v.detach().clone() for k, v in tr.policy.state_dict().items()}


@pytest.mark.slow  # three drivers, six actors: about 40 s on a loaded 2-core machine
def test_two_workers_repeatable_and_resume_identical(init_ckpt, tmp_path, ray_local):
    """A 2-worker run of two iterations equals (exactly) one stopped after its first iteration and resumed
    by a new driver from its checkpoint; diagnostics count the workers."""
    full = Trainer(init_ckpt, tmp_path / "full", TINY, progress=False, workers=2)
    try:
        r1 = full.iterate()
        full.iterate()
    finally:
        full.close()
    assert r1["workers/n"] == 2 and r1["workers/restarts"] == 0 and r1["transitions"] >= 24
    assert r1["t_collect"] > 0 and r1["t_score"] > 0
    part = Trainer(init_ckpt, tmp_path / "part", TINY, progress=False, workers=2)
    try:
        part.iterate()
        part._save()  # the driver is "killed" here: only its checkpoint survives
    finally:
        part.close()
    with pytest.raises(Exception, match="--workers 2"):
        Trainer(init_ckpt, tmp_path / "part", TINY, progress=False, resume=True)  # in-process resume: refused
    resumed = Trainer(init_ckpt, tmp_path / "part", TINY, progress=False, resume=True, workers=2)
    assert resumed.iteration == 1
    resumed.run()  # closes its workers
    a = _weights(full)
    b = load_policy(tmp_path / "part" / "policy.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "part" / "diagnostics.csv").read_text().count("\n") == 3  # header + 2


def test_worker_killed_mid_iteration_is_restarted(init_ckpt, tmp_path, ray_local):
    tr = Trainer(init_ckpt, tmp_path / "run", replace(TINY, iters=3), progress=False, workers=2)
    try:
        tr.iterate()
        victim = tr.collector.info[1]["pid"]
        killed = []

        def kill(col):  # right after the iteration's work went out: SIGKILL worker 1's process
            if not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        tr.collector.fault_hook = kill
        row = tr.iterate()
        assert killed and row["workers/lost"] == 1 and row["workers/restarts"] == 1
        assert 0 < row["transitions"] < 24 + 12  # worker 0's share only (>= 12), worker 1's partial data dropped
        assert tr.collector.info[1]["pid"] != victim  # a new process
        tr.collector.fault_hook = None
        row = tr.iterate()  # the restarted worker is back, from its state of the last completed iteration
        assert row["workers/lost"] == 0 and row["workers/restarts"] == 1 and row["transitions"] >= 24
    finally:
        tr.close()


def test_sharded_evaluation_equals_single_process(init_ckpt, tmp_path, ray_local):
    from craft.bench.runner import EvalConfig, evaluate, make_driver
    from craft.scenarios.splits import split_town_seeds

    cfg = EvalConfig(max_steps=80, batch_size=3)
    types = ["HardBreakRoute", "Accident", "ParkingCutIn", "StaticCutIn"]
    towns = split_town_seeds("val")[:2]
    one = evaluate(make_driver(str(init_ckpt)), "val", tmp_path / "one", cfg, types=types, routes=2, town_seeds=towns)
    two = evaluate(make_driver(str(init_ckpt)), "val", tmp_path / "two", cfg, types=types, routes=2, town_seeds=towns,
                   workers=2)
    ra = json.loads((tmp_path / "one" / "results.json").read_text())
    rb = json.loads((tmp_path / "two" / "results.json").read_text())
    recs = ra["_checkpoint"]["records"]
    assert len(recs) == 8 and recs == rb["_checkpoint"]["records"]
    assert {k: v for k, v in one.items() if k != "wall_time_s"} == {k: v for k, v in two.items() if k != "wall_time_s"}
    strip = lambda t: "\n".join(ln for ln in t.splitlines() if "wall" not in ln.lower())
    assert strip((tmp_path / "one" / "summary.md").read_text()) == strip((tmp_path / "two" / "summary.md").read_text())
