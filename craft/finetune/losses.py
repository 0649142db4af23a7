"""Loss pieces shared by every fine-tuning method (pure functions over candidate logits).

Shapes: ``N`` transitions (visited states), ``G`` candidates. ``valid (N, G)`` masks padded candidates.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_log_softmax(logits: Tensor, valid: Tensor) -> Tensor:
    """(N, G) log pi over the valid candidates; invalid entries get -1e9 (probability 0)."""
    return torch.log_softmax(logits.masked_fill(~valid, -1e9), dim=-1)


def kl_terms(logp: Tensor, logq: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Exact KL divergences over the candidate set, per state (N,).

    logp: policy log-probabilities, logq: teacher log-probabilities (both masked log-softmaxes).
    Returns ``(reverse KL(pi || teacher), forward KL(teacher || pi))``.
    """
    p, q = logp.exp(), logq.exp()
    d = torch.where(valid, logp - logq, torch.zeros_like(logp))
    return (p * d).sum(-1), (q * -d).sum(-1)


def proxy_loss(logp: Tensor, adv: Tensor) -> tuple[Tensor, Tensor]:
    """L_cp = -(1/N) sum_i sum_g pi(g|s_i) A_ig (the exact expectation, no ratio, no clipping).

    Returns ``(loss, expected advantage per state (N,))``; ``adv`` is 0 on invalid candidates.
    """
    expected = (logp.exp() * adv).sum(-1)
    return -expected.mean(), expected


def clipped_surrogate(logp_new: Tensor, logp_old: Tensor, adv: Tensor, eps: float = 0.2,
                      dual_clip: float | None = 2.0) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate on the chosen candidates, with the dual clip for negative advantages.

    logp_new, logp_old, adv: (N,). ``l = min(rho A, clip(rho, 1-eps, 1+eps) A)``; where ``A < 0`` and a dual
    clip ``c`` is given, ``l = max(l, c A)``. Returns ``(-mean l, diagnostics)`` with the shares of
    transitions clipped and dual-clipped and the approximate KL(old || new).
    """
    log_ratio = logp_new - logp_old
    rho = log_ratio.exp()
    l1 = rho * adv
    l2 = rho.clamp(1 - eps, 1 + eps) * adv
    l = torch.minimum(l1, l2)
    dual = torch.zeros_like(l, dtype=torch.bool)
    if dual_clip is not None:
        floor = dual_clip * adv
        dual = (adv < 0) & (l < floor)
        l = torch.where(adv < 0, torch.maximum(l, floor), l)
    with torch.no_grad():
        diag = {"clip_frac": ((rho - 1).abs() > eps).float().mean(), "dual_clip_frac": dual.float().mean(),
                "approx_kl": ((rho - 1) - log_ratio).mean()}
    return -l.mean(), diag


def discounted_returns(rewards: Tensor, notdone: Tensor, gamma: float) -> Tensor:
    """Monte-Carlo returns ``G_t = r_t + gamma * notdone_t * G_{t+1}`` over (T, W) -> (T, W)."""
    out = torch.empty_like(rewards)
    g = torch.zeros_like(rewards[0])
    nd = notdone.to(rewards.dtype)
    for t in range(rewards.shape[0] - 1, -1, -1):  # loop over time only
        g = rewards[t] + gamma * nd[t] * g
        out[t] = g
    return out


def gae(rewards: Tensor, values: Tensor, notdone: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over (T, W): returns ``(advantages, value targets)``.

    ``values`` (T, W) are the critic's values of each decision's state; the value after the last decision
    of an episode (``notdone`` False) is 0 (episodes that were cut are treated as ended).
    """
    nd = notdone.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        nxt = values[t + 1] if t + 1 < rewards.shape[0] else torch.zeros_like(values[0])
        delta = rewards[t] + gamma * nd[t] * nxt - values[t]
        last = delta + gamma * lam * nd[t] * last
        adv[t] = last
    return adv, adv + values


def coefficient_of_variation(x: Tensor) -> float:
    """std / |mean| of a series (0 for fewer than two values or a zero mean)."""
    x = x.double()
    if x.numel() < 2 or float(x.mean().abs()) < 1e-12:
        return 0.0
    return float(x.std() / x.mean().abs())


__all__ = ["masked_log_softmax", "kl_terms", "proxy_loss", "clipped_surrogate", "discounted_returns", "gae",
           "coefficient_of_variation"]
