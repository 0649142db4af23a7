"""Drive a :class:`~craft.policies.base.CandidatePolicy` in the benchmark: observe, score, pick, plan."""

from __future__ import annotations

import torch

from craft.policies.base import CandidatePolicy, CandidateSet
from craft.world.observe import observe


MIN_ROWS = 4
"""The policy's forward runs on at least this many rows: on CPU, batches of one or two rows take other matrix
kernels whose rounding differs (about 1e-5 in the logits), so without the padding a route's drive would
depend on how many routes share its batch (and a sharded evaluation would not equal the single-process one)."""


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
        B = obs.batch_size
        if B < MIN_ROWS:  # pad with copies of the last row: see MIN_ROWS
            obs = obs.index(torch.arange(MIN_ROWS, device=dev).clamp(max=B - 1))
        cs = self.policy(obs)
        if B < MIN_ROWS:
            cs = CandidateSet(cs.trajectories[:B], cs.valid[:B], cs.logits[:B])
        idx = cs.sample(self.generator) if self.sample else cs.top1()
        return cs.select(idx).to(state.device)


__all__ = ["PolicyDriver"]
