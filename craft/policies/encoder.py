"""The shared scene encoder: a small transformer over the world's observation tokens.

Every token kind (ego, the nearest agents, the nearest lane chunks, lights, stop signs) gets its own two-layer
MLP embedding into ``d_model`` plus a learned kind embedding; the route ahead (all its points, masked ones
zero) becomes one token. The tokens of a world are concatenated (ego first, always valid) and run through
``layers`` pre-norm transformer encoder layers with the observation's masks as key padding. Output:
``tokens (B, S, D)``, ``mask (B, S)`` (True = valid) and the ego token ``(B, D)`` as the pooled scene summary.
Sized to train on a CPU in minutes and to run thousands of decisions per second (defaults: D = 64, 2 layers,
S = 1 + 16 + 32 + 4 + 4 + 1 = 58 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from craft.errors import CraftError
from craft.world.observe import Observation, ObsConfig

TOKEN_KINDS = ("ego", "agents", "lanes", "lights", "stops", "route")


@dataclass(frozen=True)
class EncoderConfig:
    d_model: int = 64
    """Token width."""
    layers: int = 2
    """Transformer encoder layers."""
    heads: int = 4
    """Attention heads."""
    ff: int = 128
    """Feed-forward width."""
    dropout: float = 0.0
    """Dropout inside the transformer (0: deterministic training)."""
    max_agents: int = 16
    """Agent tokens used (the nearest; the observation may carry more)."""
    max_lanes: int = 32
    """Lane-chunk tokens used (the nearest)."""
    obs: dict = field(default_factory=dict)
    """Non-default :class:`ObsConfig` fields the policy was trained with (its normalisation and token counts)."""

    def __post_init__(self):
        if self.d_model % self.heads:
            raise CraftError(f"EncoderConfig: d_model {self.d_model} must be divisible by heads {self.heads}")
        for name in ("d_model", "layers", "heads", "ff"):
            if getattr(self, name) < 1:
                raise CraftError(f"EncoderConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def obs_config(self) -> ObsConfig:
        return ObsConfig(**self.obs)


def mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))


class SceneEncoder(nn.Module):
    """Observation -> (tokens (B, S, D), mask (B, S) bool, ego (B, D))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        oc = cfg.obs_config
        dims = Observation.feature_dims(oc)
        dims["route"] = 3 * oc.route_points  # x, y, valid of every route point in one token
        d = cfg.d_model
        self.embed = nn.ModuleDict({k: mlp(dims[k], d, d) for k in TOKEN_KINDS})
        self.kind = nn.Parameter(torch.zeros(len(TOKEN_KINDS), d))
        nn.init.normal_(self.kind, std=0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, cfg.ff, cfg.dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, obs: Observation) -> tuple[Tensor, Tensor, Tensor]:
        B = obs.batch_size
        parts, masks = [], []
        for i, k in enumerate(TOKEN_KINDS):
            x = getattr(obs, k).float()
            if k in ("ego", "route"):
                if k == "route":
                    x = torch.cat([x, obs.route_mask.float()[..., None]], -1).flatten(1)
                x = x[:, None]
                m = torch.ones(B, 1, dtype=torch.bool, device=x.device)
            else:
                m = getattr(obs, f"{k}_mask")
                n = {"agents": self.cfg.max_agents, "lanes": self.cfg.max_lanes}.get(k)
                if n is not None:  # tokens are sorted nearest first
                    x, m = x[:, :n], m[:, :n]
            parts.append(self.embed[k](x) + self.kind[i])
            masks.append(m)
        tokens = torch.cat(parts, 1)
        mask = torch.cat(masks, 1)
        out = self.norm(self.layers(tokens, src_key_padding_mask=~mask))
        return out, mask, out[:, 0]


__all__ = ["EncoderConfig", "SceneEncoder", "TOKEN_KINDS", "mlp"]
