"""What every fine-tuning method shares: the per-iteration data and the method interface.

A method turns one iteration's data into per-transition training targets (:meth:`FineTuneMethod.advantages`)
and a minibatch's policy log-probabilities into named losses (:meth:`FineTuneMethod.loss`, torchrl-style:
the trainer sums the keys that start with ``loss_``, the rest are diagnostics). The EMA teacher and its two
KL terms are added by the trainer, identically for every method.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from craft.finetune.collector import Buffer


@dataclass
class IterationData:
    """One iteration's collected data, flattened where per transition.

    buf: the buffer ((T, W) layout, N live transitions); scores: proxy scores of all candidates of the N
    states (None when the method does not use the proxy); grounded: (T, W) grounded reward per decision;
    dense: (T, W) dense reward per decision (the proxy's reward on the executed steps, discounted within the
    decision); features: (N, D) the policy's scene summary of each state (no gradient).
    """

    buf: Buffer
    scores: object | None
    grounded: Tensor
    dense: Tensor
    features: Tensor


class FineTuneMethod:
    """Base class; subclasses set ``name`` / ``uses_proxy`` and implement ``advantages`` and ``loss``."""

    name = ""
    uses_proxy = False

    def __init__(self, cfg):
        self.cfg = cfg

    def advantages(self, data: IterationData) -> dict[str, Tensor]:
        """Per-transition tensors with N rows (minibatches index them)."""
        raise NotImplementedError

    def loss(self, logp: Tensor, mb: dict[str, Tensor]) -> dict[str, Tensor]:
        """logp: (n, G) masked log pi of the minibatch's states; mb: its rows of :meth:`advantages` plus
        ``chosen (n,)``, ``logp_old (n,)``, ``valid (n, G)``, ``features (n, D)``."""
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """Extra trained modules (a critic); their parameters join the optimiser."""
        return {}
