"""CRAFT: dense counterfactual proxy (exact expectation over all candidates) + grounded residual (dual-clipped
PPO on the executed candidate with the value-free corrective advantage). Ablation switches in the config:
``use_proxy`` and ``use_residual`` (the teacher KL terms are the trainer's, ``use_distill``)."""

from __future__ import annotations

import torch
from torch import Tensor

from craft.finetune.losses import clipped_surrogate, proxy_loss
from craft.finetune.methods.base import FineTuneMethod, IterationData
from craft.finetune.rewards import residual_advantage


class Craft(FineTuneMethod):
    name = "craft"

    @property
    def uses_proxy(self) -> bool:
        return self.cfg.use_proxy

    def advantages(self, data: IterationData) -> dict[str, Tensor]:
        buf = data.buf
        out = {}
        if self.cfg.use_proxy:
            out["adv_cp"] = data.scores.advantages
        if self.cfg.use_residual:
            a = residual_advantage(data.grounded, buf.notdone, self.cfg.reward)
            out["adv_gr"] = buf.flat(a)
        return out

    def loss(self, logp: Tensor, mb: dict[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.cfg.use_proxy:
            l_cp, expected = proxy_loss(logp, mb["adv_cp"])
            out["loss_cp"] = self.cfg.w_cp * l_cp
            out["expected_adv"] = expected.mean().detach()
        if self.cfg.use_residual:
            new = logp.gather(1, mb["chosen"][:, None]).squeeze(1)
            l_gr, diag = clipped_surrogate(new, mb["logp_old"], mb["adv_gr"], self.cfg.clip_eps, self.cfg.dual_clip)
            out["loss_gr"] = self.cfg.w_gr * l_gr
            out.update(diag)
            out["residual_nonzero"] = (mb["adv_gr"] < 0).float().mean()
        return out


class Grpo(Craft):
    """GRPO-style counterfactual fine-tuning: the proxy term alone (CRAFT without the grounded residual)."""

    name = "grpo"

    def __init__(self, cfg):
        from dataclasses import replace

        super().__init__(replace(cfg, use_residual=False, use_proxy=True))
