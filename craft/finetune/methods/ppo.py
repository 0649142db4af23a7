"""PPO baseline: a critic on the policy's scene features, GAE over the dense reward of the executed rollout,
clipped surrogate on the chosen candidate (no dual clip) and a clipped SmoothL1 value loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from craft.finetune.losses import clipped_surrogate, gae
from craft.finetune.methods.base import FineTuneMethod, IterationData


class Ppo(FineTuneMethod):
    name = "ppo"

    def __init__(self, cfg, feature_dim: int):
        super().__init__(cfg)
        g = torch.Generator().manual_seed(cfg.seed + 17)
        self.critic = nn.Sequential(nn.Linear(feature_dim, 64), nn.Tanh(), nn.Linear(64, 1))
        with torch.no_grad():
            for p in self.critic.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p.shape[-1])) ** 0.5)

    def modules(self) -> dict[str, nn.Module]:
        return {"critic": self.critic}

    def advantages(self, data: IterationData) -> dict[str, Tensor]:
        buf = data.buf
        T, W = buf.live.shape
        with torch.no_grad():
            v = torch.zeros(T, W, device=buf.live.device)
            v[buf.live] = self.critic(data.features).squeeze(-1)
        gamma = self.cfg.decision_gamma
        adv, ret = gae(data.dense, v, buf.notdone, gamma, self.cfg.gae_lambda)
        a = buf.flat(adv)
        a = (a - a.mean()) / (a.std() + 1e-8)
        return {"adv": a, "value_target": buf.flat(ret), "value_old": buf.flat(v)}

    def loss(self, logp: Tensor, mb: dict[str, Tensor]) -> dict[str, Tensor]:
        new = logp.gather(1, mb["chosen"][:, None]).squeeze(1)
        l_pi, diag = clipped_surrogate(new, mb["logp_old"], mb["adv"], self.cfg.clip_eps, dual_clip=None)
        v = self.critic(mb["features"]).squeeze(-1)
        vc = mb["value_old"] + (v - mb["value_old"]).clamp(-self.cfg.value_clip, self.cfg.value_clip)
        f = nn.functional.smooth_l1_loss
        l_v = torch.maximum(f(v, mb["value_target"], reduction="none"), f(vc, mb["value_target"], reduction="none"))
        return {"loss_pg": l_pi, "loss_value": self.cfg.value_coef * l_v.mean(), **diag}
