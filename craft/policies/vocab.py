"""Vocabulary scoring (SparseDriveV2-like): score a fixed vocabulary of G = 512 trajectories.

The vocabulary is built by k-means over expert future trajectories of the ``train`` split
(:func:`build_vocabulary`) and stored with the checkpoint as a buffer. Each vocabulary entry is embedded by
an MLP into a query. The scene tokens are first pooled into ``latents`` tokens (learned queries plus the ego
summary, one cross-attention); every vocabulary query, plus the ego summary, then attends to those latents
(single-head attention written so that the query and value projections are computed once per vocabulary
entry and once per latent, never per candidate and world) and the final **classification branch**
(``head``: a two-layer MLP) turns query + ego + attended latents into a logit. Only ``head`` is fine-tuned. Per decision the
candidate-dependent work is O(G * (latents + hidden) * D), which keeps batched CPU inference in the
thousands of decisions per second.

Imitation: cross-entropy to the vocabulary entry nearest the expert's trajectory (mean waypoint distance).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from craft.errors import CraftError
from craft.policies.base import CandidatePolicy, CandidateSet, register_family
from craft.policies.encoder import EncoderConfig, SceneEncoder, mlp
from craft.world.observe import Observation

TRAJ_SCALE = 30.0
"""Trajectory positions are divided by this (m) before they are embedded."""


@dataclass(frozen=True)
class VocabConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    vocab_size: int = 512
    """G, the number of vocabulary trajectories (the paper's SparseDriveV2 setting)."""
    horizon: int = 6
    """Waypoints per trajectory (0.5 s apart)."""
    latents: int = 16
    """Scene latents the vocabulary queries attend to."""
    head_hidden: int = 32
    """Hidden width of the classification branch."""

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", EncoderConfig(**self.encoder))
        if self.latents < 1:
            raise CraftError(f"VocabConfig.latents must be >= 1, got {self.latents}")
        if self.vocab_size < 2 or self.horizon < 1:
            raise CraftError(f"VocabConfig: vocab_size >= 2 and horizon >= 1 needed, got {self.vocab_size}, "
                             f"{self.horizon}")


def mean_l2(a: Tensor, b: Tensor) -> Tensor:
    """Mean waypoint distance between trajectories ``a (..., T, >=2)`` and ``b`` (broadcast), m."""
    return (a[..., :2] - b[..., :2]).norm(dim=-1).mean(-1)


def nearest_candidate(cands: Tensor, expert: Tensor, chunk: int = 4096) -> Tensor:
    """Index of the candidate nearest each expert trajectory.

    cands: (G, T, 3) shared or (B, G, T, 3) per world; expert: (B, T, 3) -> (B,) long.
    """
    if cands.dim() == 3:
        out = [mean_l2(cands[None], e[:, None]).argmin(-1) for e in expert.split(chunk)]
        return torch.cat(out)
    return mean_l2(cands, expert[:, None]).argmin(-1)


@register_family
class VocabPolicy(CandidatePolicy):
    """Scores a fixed trajectory vocabulary. forward: obs (B) -> CandidateSet (B, G=vocab_size, T, 3)."""

    family = "vocab"
    Config = VocabConfig

    def __init__(self, cfg: VocabConfig):
        super().__init__(cfg)
        d = cfg.encoder.d_model
        self.encoder = SceneEncoder(cfg.encoder)
        self.register_buffer("vocabulary", torch.zeros(cfg.vocab_size, cfg.horizon, 3))
        self.query = mlp(cfg.horizon * 3, d, d)
        self.ego_proj = nn.Linear(d, d)
        self.latent_q = nn.Parameter(torch.randn(cfg.latents, d) * 0.5)
        self.pool = nn.MultiheadAttention(d, cfg.encoder.heads, batch_first=True)
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.head = nn.Sequential(nn.Linear(d, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, 1))

    def set_vocabulary(self, vocab: Tensor) -> None:
        if tuple(vocab.shape) != tuple(self.vocabulary.shape):
            raise CraftError(f"vocabulary of shape {tuple(vocab.shape)} does not fit this policy's "
                             f"{tuple(self.vocabulary.shape)} (vocab_size, horizon, 3)")
        self.vocabulary.copy_(vocab)

    def _queries(self) -> Tensor:
        v = self.vocabulary
        x = torch.cat([v[..., :2] / TRAJ_SCALE, v[..., 2:]], -1).flatten(1)
        return self.query(x)  # (G, D)

    def forward(self, obs: Observation) -> CandidateSet:
        tokens, mask, ego = self.encoder(obs)
        B, _, d = tokens.shape
        e = self.ego_proj(ego)  # (B, D)
        lat = self.latent_q[None] + e[:, None]  # (B, M, D)
        pooled, _ = self.pool(lat, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        lat = lat + pooled
        qv = self._queries()  # (G, D)
        # q_proj(qv + e) . k = q_proj(qv) . k + (q_proj(e) - bias) . k: projections once per entry / per world
        k = self.k_proj(lat).transpose(1, 2) / d**0.5  # (B, D, M)
        qe = (self.q_proj(e) - self.q_proj.bias)[:, None]  # (B, 1, D)
        w = torch.softmax(torch.matmul(self.q_proj(qv), k) + qe @ k, -1)  # (B, G, M)
        # head(qv + e + w @ v): its first linear layer distributes over the three terms, so the per-candidate
        # work happens at the head's hidden width and no (B, G, D) tensor is built
        lin, act, out = self.head
        h = lin(qv)[None] + (e @ lin.weight.T)[:, None] + w @ (self.v_proj(lat) @ lin.weight.T)  # (B, G, H)
        logits = out(act(h)).squeeze(-1)  # (B, G)
        G = self.cfg.vocab_size
        traj = self.vocabulary[None].expand(B, G, -1, -1)
        valid = torch.ones(B, G, dtype=torch.bool, device=logits.device)
        return CandidateSet(traj, valid, logits)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {f"head.{k}": p for k, p in self.head.named_parameters()}

    def imitation_loss(self, obs: Observation, expert: Tensor) -> dict[str, Tensor]:
        cs = self(obs)
        label = nearest_candidate(self.vocabulary, expert)
        loss = nn.functional.cross_entropy(cs.logits, label)
        return {"loss_ce": loss, "acc": (cs.logits.argmax(-1) == label).float().mean()}


def build_vocabulary(trajs: Tensor, k: int = 512, iters: int = 30, seed: int = 0) -> Tensor:
    """K-means over expert trajectories ``trajs (N, T, 3)`` -> ``(k, T, 3)`` cluster centres.

    Distances use the waypoint positions (yaw follows as the cluster mean of its sine / cosine). k-means++
    seeding and Lloyd iterations are driven by ``seed`` alone (deterministic). Empty clusters are re-seeded
    at the points farthest from their centre. Centres are sorted by their final x for readability.
    """
    N, T, _ = trajs.shape
    if N < k:
        raise CraftError(f"k-means needs at least k={k} trajectories, got {N}: collect more demonstrations")
    g = torch.Generator().manual_seed(seed)
    x = trajs[..., :2].reshape(N, -1).double()
    centres = torch.empty(k, x.shape[1], dtype=x.dtype)
    centres[0] = x[torch.randint(N, (1,), generator=g)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for i in range(1, k):  # k-means++: next centre with probability ~ squared distance
        j = torch.multinomial((d2 / d2.sum()).float(), 1, generator=g)
        centres[i] = x[j]
        d2 = torch.minimum(d2, ((x - centres[i]) ** 2).sum(1))
    assign = torch.zeros(N, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(x, centres)
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None].to(x.dtype))
        if empty.any():
            far = dist.gather(1, assign[:, None]).squeeze(1).argsort(descending=True)[: int(empty.sum())]
            centres[empty] = x[far]
    assign = torch.cdist(x, centres).argmin(1)
    yaw = trajs[..., 2].double()
    cs = torch.zeros(k, T, dtype=x.dtype).index_add_(0, assign, torch.cos(yaw))
    sn = torch.zeros(k, T, dtype=x.dtype).index_add_(0, assign, torch.sin(yaw))
    pos = centres.view(k, T, 2)
    out = torch.cat([pos, torch.atan2(sn, cs)[..., None]], -1).float()
    order = out[:, -1, 0].argsort(stable=True)
    return out[order].contiguous()


__all__ = ["VocabConfig", "VocabPolicy", "build_vocabulary", "nearest_candidate", "mean_l2"]
