"""REINFORCE++ baseline: no critic; Monte-Carlo returns of the dense reward on the executed rollout,
normalised over the batch, with PPO's clipped ratio on the chosen candidate."""

from __future__ import annotations

from torch import Tensor

from craft.finetune.losses import clipped_surrogate, discounted_returns
from craft.finetune.methods.base import FineTuneMethod, IterationData


class ReinforcePP(FineTuneMethod):
    name = "reinforcepp"

    def advantages(self, data: IterationData) -> dict[str, Tensor]:
        buf = data.buf
        g = buf.flat(discounted_returns(data.dense, buf.notdone, self.cfg.decision_gamma))
        return {"adv": (g - g.mean()) / (g.std() + 1e-8)}

    def loss(self, logp: Tensor, mb: dict[str, Tensor]) -> dict[str, Tensor]:
        new = logp.gather(1, mb["chosen"][:, None]).squeeze(1)
        l_pi, diag = clipped_surrogate(new, mb["logp_old"], mb["adv"], self.cfg.clip_eps, dual_clip=None)
        return {"loss_pg": l_pi, **diag}
