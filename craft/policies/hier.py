"""Hierarchical planning (HiP-AD-like): 6 path modes x 8 speed modes = 48 joint path-speed candidates.

Path queries and speed queries (learned embeddings plus the scene's ego summary) attend to the scene tokens.
A path head regresses each path as ``P`` headings of fixed 4 m steps (a polyline parameterised by arc
length, starting at the ego); a speed head regresses each speed profile as the distances travelled at the
``T`` waypoint times (cumulative softplus, so monotone). Joint candidate ``(i, j)`` places waypoint ``t`` of
speed profile ``j`` at its arc length along path ``i`` (:func:`compose`). The **joint classification branch**
(``joint``: an MLP over the concatenated path and speed features) scores the 48 combinations and is the only
part fine-tuned.

Imitation: winner-takes-all L1 regression of the nearest path mode to the expert's path and of the nearest
speed mode to the expert's distance profile, plus cross-entropy of the joint logits to the combination whose
composed trajectory is nearest the expert's (mean waypoint distance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from craft.errors import CraftError
from craft.policies.base import CandidatePolicy, CandidateSet, register_family
from craft.policies.encoder import EncoderConfig, SceneEncoder, mlp
from craft.policies.vocab import mean_l2
from craft.world.observe import Observation


@dataclass(frozen=True)
class HierConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    path_modes: int = 6
    speed_modes: int = 8
    horizon: int = 6
    """Waypoints per trajectory (0.5 s apart)."""
    path_points: int = 16
    """Path steps (each ``path_step`` m long)."""
    path_step: float = 4.0
    """Arc length of one path step, m (16 x 4 m = 64 m, beyond it the last heading is extended)."""
    speed_scale: float = 5.0
    """Distance increments are regressed in units of this many metres per 0.5 s."""

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            object.__setattr__(self, "encoder", EncoderConfig(**self.encoder))
        for name in ("path_modes", "speed_modes", "horizon", "path_points"):
            if getattr(self, name) < 1:
                raise CraftError(f"HierConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.path_step > 0:
            raise CraftError(f"HierConfig.path_step must be > 0, got {self.path_step}")


def path_points(headings: Tensor, step: float) -> Tensor:
    """Polyline vertices of paths given as segment headings ``(..., P)`` -> ``(..., P + 1, 2)`` from the origin."""
    seg = torch.stack([torch.cos(headings), torch.sin(headings)], -1) * step
    pts = torch.cumsum(seg, -2)
    return torch.cat([torch.zeros_like(pts[..., :1, :]), pts], -2)


def compose(headings: Tensor, dist: Tensor, step: float) -> Tensor:
    """Joint trajectories from paths ``headings (B, Pm, P)`` and distance profiles ``dist (B, Sm, T)``.

    Returns ``(B, Pm, Sm, T, 3)``: waypoint at arc length ``dist`` along the path (beyond its end the last
    segment is extended), yaw = the heading of the segment it lies on.
    """
    B, Pm, P = headings.shape
    Sm, T = dist.shape[1], dist.shape[2]
    pts = path_points(headings, step)  # (B, Pm, P+1, 2)
    s = dist[:, None].expand(B, Pm, Sm, T) / step  # in segments
    k = s.floor().clamp(0, P - 1)
    frac = s - k  # > 1 beyond the end: extrapolates along the last segment
    ki = k.long()
    flat = lambda t: t.reshape(B, Pm, Sm * T)  # noqa: E731
    h = torch.gather(headings, 2, flat(ki)).view(B, Pm, Sm, T)
    p0 = torch.gather(pts, 2, flat(ki)[..., None].expand(-1, -1, -1, 2)).view(B, Pm, Sm, T, 2)
    xy = p0 + frac[..., None] * step * torch.stack([torch.cos(h), torch.sin(h)], -1)
    return torch.cat([xy, h[..., None]], -1)


def arc_profile(traj: Tensor) -> Tensor:
    """Cumulative distance along ``traj (B, T, >=2)`` from the origin at each waypoint -> (B, T)."""
    p = torch.cat([torch.zeros_like(traj[:, :1, :2]), traj[..., :2]], 1)
    return (p[:, 1:] - p[:, :-1]).norm(dim=-1).cumsum(1)


def expert_path_headings(traj: Tensor, route: Tensor, route_mask: Tensor, P: int, step: float,
                         min_length: float = 1.0) -> Tensor:
    """Path targets: headings of ``P`` steps of ``step`` m along the expert's trajectory ``(B, T, 3)``.

    The polyline origin -> waypoints is resampled at arc lengths ``step * (k + 0.5)``; beyond its end the last
    waypoint's yaw continues. When the expert barely moves (shorter than ``min_length`` m) the route ahead
    (``route (B, Nr, 2)`` in metres, ego frame) gives the path instead. Returns ``(B, P)`` headings.
    """
    B, T, _ = traj.shape
    pts = torch.cat([torch.zeros_like(traj[:, :1, :2]), traj[..., :2]], 1)  # (B, T+1, 2)
    segv = pts[:, 1:] - pts[:, :-1]
    seglen = segv.norm(dim=-1)
    seghead = torch.where(seglen > 1e-3, torch.atan2(segv[..., 1], segv[..., 0]), traj[..., 2])
    cum = seglen.cumsum(1)  # (B, T) arc length at each segment end
    s = (torch.arange(P, device=traj.device, dtype=traj.dtype) + 0.5) * step
    idx = torch.searchsorted(cum.contiguous(), s[None].expand(B, P).contiguous())  # segment holding s
    beyond = idx >= T
    h = torch.gather(seghead, 1, idx.clamp(max=T - 1))
    h = torch.where(beyond, traj[:, -1:, 2].expand(B, P), h)
    # route fallback for a standing expert
    rv = route[:, 1:] - route[:, :-1]
    rok = route_mask[:, 1:] & route_mask[:, :-1] & (rv.norm(dim=-1) > 1e-3)
    rh = torch.atan2(rv[..., 1], rv[..., 0])
    n = rh.shape[1]
    ri = torch.arange(P, device=traj.device).clamp(max=n - 1)
    rh = rh[:, ri]
    rok_p = rok[:, ri]
    # extend the last valid route heading where the route ends
    last = torch.where(rok, torch.arange(n, device=traj.device)[None].expand(B, n), torch.zeros_like(rok, dtype=torch.long)).amax(1)
    rh = torch.where(rok_p, rh, torch.gather(torch.atan2(rv[..., 1], rv[..., 0]), 1, last[:, None]).expand(B, P))
    has_route = rok.any(1)
    standing = cum[:, -1] < min_length
    use_route = standing & has_route
    h = torch.where(use_route[:, None], rh, h)
    h = torch.where((standing & ~has_route)[:, None], torch.zeros_like(h), h)
    return h


@register_family
class HierPolicy(CandidatePolicy):
    """Joint path-speed modes. forward: obs (B) -> CandidateSet (B, G=path_modes*speed_modes, T, 3)."""

    family = "hier"
    Config = HierConfig

    def __init__(self, cfg: HierConfig):
        super().__init__(cfg)
        d = cfg.encoder.d_model
        self.encoder = SceneEncoder(cfg.encoder)
        self.path_q = nn.Parameter(torch.randn(cfg.path_modes, d) * 0.5)
        self.speed_q = nn.Parameter(torch.randn(cfg.speed_modes, d) * 0.5)
        self.ego_proj = nn.Linear(d, d)
        self.attn = nn.MultiheadAttention(d, cfg.encoder.heads, batch_first=True)
        self.path_head = mlp(d, d, cfg.path_points)
        self.speed_head = mlp(d, d, cfg.horizon)
        self.joint = nn.Sequential(nn.LayerNorm(2 * d), nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))

    def _modes(self, obs: Observation):
        tokens, mask, ego = self.encoder(obs)
        B = tokens.shape[0]
        Pm, Sm = self.cfg.path_modes, self.cfg.speed_modes
        q = torch.cat([self.path_q, self.speed_q], 0)[None] + self.ego_proj(ego)[:, None]  # (B, Pm+Sm, D)
        a, _ = self.attn(q, tokens, tokens, key_padding_mask=~mask, need_weights=False)
        f = q + a
        fp, fs = f[:, :Pm], f[:, Pm:]
        headings = math.pi * torch.tanh(self.path_head(fp) / 2)  # (B, Pm, P) in (-pi, pi)
        inc = nn.functional.softplus(self.speed_head(fs)) * self.cfg.speed_scale
        dist = inc.cumsum(-1)  # (B, Sm, T)
        joint_f = torch.cat([fp[:, :, None].expand(B, Pm, Sm, -1), fs[:, None].expand(B, Pm, Sm, -1)], -1)
        logits = self.joint(joint_f).squeeze(-1).reshape(B, Pm * Sm)
        return headings, dist, logits

    def forward(self, obs: Observation) -> CandidateSet:
        headings, dist, logits = self._modes(obs)
        B = logits.shape[0]
        traj = compose(headings, dist, self.cfg.path_step).reshape(B, -1, self.cfg.horizon, 3)
        valid = torch.ones_like(logits, dtype=torch.bool)
        return CandidateSet(traj, valid, logits)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {f"joint.{k}": p for k, p in self.joint.named_parameters()}

    def imitation_loss(self, obs: Observation, expert: Tensor) -> dict[str, Tensor]:
        cfg = self.cfg
        headings, dist, logits = self._modes(obs)
        route = obs.route * obs_pos_scale(self)
        target_h = expert_path_headings(expert, route, obs.route_mask, cfg.path_points, cfg.path_step)
        target_pts = path_points(target_h, cfg.path_step)[:, None]  # (B, 1, P+1, 2)
        pts = path_points(headings, cfg.path_step)  # (B, Pm, P+1, 2)
        path_err = (pts - target_pts).abs().sum(-1).mean(-1)  # (B, Pm)
        target_d = arc_profile(expert)[:, None]  # (B, 1, T)
        speed_err = (dist - target_d).abs().mean(-1)  # (B, Sm)
        loss_path = path_err.min(1).values.mean() / cfg.path_step
        loss_speed = speed_err.min(1).values.mean() / cfg.speed_scale
        with torch.no_grad():
            traj = compose(headings, dist, cfg.path_step).reshape(expert.shape[0], -1, cfg.horizon, 3)
            label = mean_l2(traj, expert[:, None]).argmin(-1)
        loss_ce = nn.functional.cross_entropy(logits, label)
        return {"loss_path": loss_path, "loss_speed": loss_speed, "loss_ce": loss_ce,
                "acc": (logits.argmax(-1) == label).float().mean()}


def obs_pos_scale(policy: CandidatePolicy) -> float:
    return policy.cfg.encoder.obs_config.pos_scale


__all__ = ["HierConfig", "HierPolicy", "compose", "path_points", "arc_profile", "expert_path_headings"]
