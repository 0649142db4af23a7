"""Drive a :class:`~craft.policies.base.CandidatePolicy` in the benchmark: observe, score, pick, plan."""

from __future__ import annotations

import torch

from craft.policies.base import CandidatePolicy
from craft.world.observe import observe


class PolicyDriver:
    """The benchmark's ``Driver`` for a candidate policy: top-1 candidate (evaluation) or a sample from pi.

    ``plan(world, state) -> (B, T, 3)``: observation tokens of the state (with the policy's own
    :class:`~craft.world.observe.ObsConfig`), one policy forward, the chosen candidate's trajectory.
    """

    def __init__(self, policy: CandidatePolicy, name: str | None = None, sample: bool = False,
                 generator: torch.Generator | None = None):
        self.policy = policy.eval()
        self.name = name or policy.family
        self.sample = sample
        self.generator = generator
        self.obs_cfg = policy.cfg.encoder.obs_config

    @torch.no_grad()
    def plan(self, world, state) -> torch.Tensor:
        dev = next(self.policy.parameters()).device
        obs = observe(world.maps, state, world.lights(state), self.obs_cfg).to(dev)
        cs = self.policy(obs)
        idx = cs.sample(self.generator) if self.sample else cs.top1()
        return cs.select(idx).to(state.device)


__all__ = ["PolicyDriver"]
