"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def town():
    """The procedural town of seed 0 (built once per test session; treat it as read-only)."""
    from craft.world.towns import generate_town

    return generate_town(0)


@pytest.fixture(scope="session")
def towns(town):
    """Procedural towns of seeds 0..4 (``towns[0]`` is ``town``; read-only)."""
    from craft.world.towns import generate_town

    return [town] + [generate_town(s) for s in range(1, 5)]


@pytest.fixture(scope="session")
def init_ckpt(tmp_path_factory):
    """A seeded, untrained hierarchical policy checkpoint (the fine-tuning tests' starting point)."""
    import torch

    from craft.policies.base import build_policy

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init") / "policy.pt"
    build_policy("hier").save(path)
    return path
