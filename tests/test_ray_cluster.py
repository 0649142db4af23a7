"""Across machines: a two-node Ray cluster on this machine (Ray's own local-cluster utility); the driver joins
it with an address, the workers land on both nodes, only the driver writes. Bad addresses: one line."""

from __future__ import annotations

import pytest
import torch

from craft.cli import main
from craft.finetune.collector import CollectorConfig
from craft.finetune.trainer import FinetuneConfig, Trainer
from craft.policies import build_policy

TINY = FinetuneConfig(iters=1, minibatch=16, collector=CollectorConfig(
    split="val", worlds=2, buffer_size=16, routes=1, types=("HardBreakRoute", "Accident")))


def test_unreachable_address_is_one_line(tmp_path, capsys):
    code = main(["finetune", "--method", "grpo", "--init", "checkpoints/vocab.pt", "--out", str(tmp_path / "r"),
                 "--workers", "2", "--address", "127.0.0.1:1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("craft: error: no Ray cluster answers at 127.0.0.1:1") and "\n" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # a two-node cluster start-up: 20-40 s on a loaded 2-core machine
def test_two_node_cluster(tmp_path):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    torch.manual_seed(0)
    init = tmp_path / "init.pt"
    build_policy("hier").save(init)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    tr = None
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        tr = Trainer(init, tmp_path / "run", TINY, progress=False, workers=2, address=cluster.address)
        nodes = {w["node"] for w in tr.collector.info}
        assert len(nodes) == 2  # one CPU per node: one worker on each
        tr.run()
        files = sorted(p.name for p in (tmp_path / "run").iterdir())
        assert files == ["diagnostics.csv", "policy.pt", "tb", "trainer.pt"]
        assert "workers/n" in (tmp_path / "run" / "diagnostics.csv").read_text()
    finally:
        if tr is not None:
            tr.close()
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
