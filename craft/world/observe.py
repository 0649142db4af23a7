"""Ego-frame, object-level observation tokens: what policies see (they never see world internals).

:func:`observe` turns a batched :class:`~craft.world.state.WorldState` into an :class:`Observation`: a fixed
number of tokens per world for each kind of object, expressed in the ego frame (origin at the ego's
``pos``, x forward along its yaw, y to the left), normalised, with a validity mask per token and zeros in
masked slots. Every value is finite.

Token sets (feature layouts: :meth:`Observation.feature_names`):

- ``ego (B, Fe)``: the ego's own state and navigation context (command, speed limit, next stop line and
  next light on the route, inside a stop-sign trigger area);
- ``agents (B, Na, Fa)``: the nearest other agents within ``radius``;
- ``lanes (B, Nl, Fl)``: the nearest lane chunks (pieces of ~``chunk_length`` m of every lane, each
  summarised by ``chunk_points`` points); the chunk table and a coarse grid over the chunk midpoints (the
  broad phase: each world only ranks the chunks listed for its cell) are built once per :class:`MapBatch`
  and cached on it (:func:`chunk_table`);
- ``lights (B, Nk, Fk)`` / ``stops (B, Ns, Fs)``: the nearest traffic lights / stop signs (stop-line centres);
- ``route (B, Nr, 2)``: the route polyline ahead of the ego, from ``progress``, every ``route_spacing`` m.

Route-relative quantities (command, distance to the next stop line, next light) walk along ``route_lanes``
from ``route_idx``. The distance from the ego to the end of each route lane ahead is the rest of the current
route lane (the ego projected onto it) plus the lengths of the following lanes; a same-direction lane change
in the route adds nothing (neighbouring lanes are taken to end together, e.g. at a junction's stop line).

Everything is batched tensor code; the only Python loop runs over the maps when the chunk table is built.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum

import numpy as np
import torch
from torch import Tensor

from craft.errors import CraftError
from craft.world.kinds import AgentKind
from craft.world.map import LaneType, LightState, MapBatch, lane_pose, take
from craft.world.state import WorldState

__all__ = ["CHUNK_CELL", "Command", "ObsConfig", "Observation", "observe", "navigation_command", "chunk_table"]


class Command(IntEnum):
    """Navigation command (CARLA's RoadOption without VOID)."""

    FOLLOW = 0
    LEFT = 1
    RIGHT = 2
    STRAIGHT = 3
    CHANGE_LEFT = 4
    CHANGE_RIGHT = 5


N_COMMANDS = len(Command)
_TOKEN_KINDS = (AgentKind.CAR, AgentKind.TRUCK, AgentKind.BICYCLE, AgentKind.EMERGENCY, AgentKind.PEDESTRIAN,
                AgentKind.STATIC)
# lane_turn (0 straight, 1 left, 2 right, 3 u-turn / other) -> command; a u-turn is announced as LEFT
_TURN_TO_COMMAND = (Command.STRAIGHT, Command.LEFT, Command.RIGHT, Command.LEFT)


@dataclass(frozen=True)
class ObsConfig:
    """Sizes, reach and normalisation of the observation tokens."""

    radius: float = 60.0
    """Agents, lane chunks (midpoint), lights and stop lines farther than this from the ego are left out, m."""
    max_agents: int = 32
    """Agent tokens per world (the nearest other agents)."""
    max_lane_chunks: int = 64
    """Lane-chunk tokens per world (the nearest chunks)."""
    chunk_points: int = 5
    """Points summarising one lane chunk (evenly spaced along it, both ends included)."""
    chunk_length: float = 10.0
    """Longest lane chunk, m (each lane is cut into ceil(length / chunk_length) equal pieces)."""
    max_lights: int = 4
    """Traffic-light tokens per world (the nearest stop lines with a light)."""
    max_stops: int = 4
    """Stop-sign tokens per world (the nearest stop lines with a stop sign)."""
    route_points: int = 16
    """Route points per world, the first at the ego's route progress."""
    route_spacing: float = 4.0
    """Arc-length spacing of the route points, m (16 x 4 m: the next 60 m of route)."""
    pos_scale: float = 50.0
    """Positions and distances are divided by this, m."""
    speed_scale: float = 15.0
    """Speeds, velocities and speed limits are divided by this, m/s."""
    size_scale: float = 5.0
    """Agent lengths and widths are divided by this, m."""
    accel_scale: float = 5.0
    """The ego's last acceleration is divided by this, m/s^2."""
    stop_clip: float = 60.0
    """Reach of the ego's next-stop-line distance (clipped to this; also its value when none) and next light, m."""
    command_lookahead: float = 40.0
    """A lane change or junction turn on the route is announced this far ahead of it, m."""
    route_lane_horizon: int = 8
    """Route lanes examined ahead of the current one (command, next stop line, next light)."""

    def __post_init__(self) -> None:
        for name in ("radius", "chunk_length", "route_spacing", "pos_scale", "speed_scale", "size_scale",
                     "accel_scale", "stop_clip", "command_lookahead"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise CraftError(f"ObsConfig.{name} must be positive and finite, got {v}")
        for name in ("max_agents", "max_lane_chunks", "max_lights", "max_stops", "route_points"):
            if not getattr(self, name) >= 1:
                raise CraftError(f"ObsConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.chunk_points < 2:
            raise CraftError(f"ObsConfig.chunk_points must be >= 2, got {self.chunk_points}")
        if self.route_lane_horizon < 2:
            raise CraftError(f"ObsConfig.route_lane_horizon must be >= 2, got {self.route_lane_horizon}")


@dataclass
class Observation:
    """Observation tokens of ``B`` worlds (see the module docstring; layouts: :meth:`feature_names`).

    ego: (B, Fe) float; command: (B,) long :class:`Command` (also one-hot inside ``ego``);
    agents: (B, Na, Fa), agents_mask: (B, Na) bool; lanes: (B, Nl, Fl), lanes_mask: (B, Nl);
    lights: (B, Nk, Fk), lights_mask: (B, Nk); stops: (B, Ns, Fs), stops_mask: (B, Ns);
    route: (B, Nr, 2), route_mask: (B, Nr). Tokens are sorted nearest first; masked slots are zero.
    """

    ego: Tensor
    command: Tensor
    agents: Tensor
    agents_mask: Tensor
    lanes: Tensor
    lanes_mask: Tensor
    lights: Tensor
    lights_mask: Tensor
    stops: Tensor
    stops_mask: Tensor
    route: Tensor
    route_mask: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.ego.shape[0])

    @property
    def device(self) -> torch.device:
        return self.ego.device

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def index(self, idx: Tensor | slice) -> "Observation":
        """Select worlds: ``idx`` is a (B',) long/bool tensor or a slice."""
        return Observation(**{k: v[idx] for k, v in self.tensors().items()})

    def to(self, device) -> "Observation":
        return Observation(**{k: v.to(device) for k, v in self.tensors().items()})

    @staticmethod
    def cat(obs: list["Observation"]) -> "Observation":
        """Concatenate observations (made with the same :class:`ObsConfig`) along the world axis."""
        if not obs:
            raise CraftError("Observation.cat needs at least one observation")
        return Observation(**{f.name: torch.cat([getattr(o, f.name) for o in obs]) for f in fields(Observation)})

    @classmethod
    def feature_names(cls, cfg: ObsConfig | None = None) -> dict[str, list[str]]:
        """Name of every feature of every token kind, in order (``lanes`` depends on ``cfg.chunk_points``)."""
        cfg = cfg or ObsConfig()
        kinds = [k.name.lower() for k in _TOKEN_KINDS]
        return {
            "ego": ["speed", "accel", "steer", "length", "width"]
            + [f"cmd_{c.name.lower()}" for c in Command]
            + ["speed_limit", "stop_line_dist", "light_none", "light_green", "light_yellow", "light_red",
               "at_stop_sign"],
            "agents": ["x", "y", "cos", "sin", "vx", "vy", "length", "width"] + [f"kind_{k}" for k in kinds]
            + ["siren"],
            "lanes": [f"{a}{i}" for i in range(cfg.chunk_points) for a in ("x", "y")] + ["cos", "sin"]
            + [f"type_{t.name.lower()}" for t in LaneType]
            + ["on_route", "speed_limit", "junction", "has_light", "has_stop"],
            "lights": ["x", "y", "cos", "sin", "green", "yellow", "red", "on_route"],
            "stops": ["x", "y", "cos", "sin", "on_route"],
            "route": ["x", "y"],
        }

    @classmethod
    def feature_dims(cls, cfg: ObsConfig | None = None) -> dict[str, int]:
        """Feature size of every token kind: ``{"ego": Fe, "agents": Fa, "lanes": Fl, ...}``."""
        return {k: len(v) for k, v in cls.feature_names(cfg).items()}


# ---------------------------------------------------------------------- helpers
def _to_ego(p: Tensor, origin: Tensor, c: Tensor, s: Tensor) -> Tensor:
    """World points ``p (B, ..., 2)`` in the ego frame given origin (B, 2) and cos / sin of the ego yaw (B,)."""
    shape = (p.shape[0],) + (1,) * (p.dim() - 2)
    d = p - origin.view(*shape, 2)
    c = c.view(shape)
    s = s.view(shape)
    return torch.stack((c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]), -1)


def _nearest(d2: Tensor, ok: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices (B, k) of the ``k`` smallest ``d2`` among ``ok`` entries, nearest first, and their mask.

    When fewer than ``k`` candidates exist the result is padded with index 0 and mask False.
    """
    B, C = d2.shape
    d2 = torch.where(ok, d2, torch.full_like(d2, float("inf")))
    kk = min(k, C)
    val, idx = torch.topk(d2, kk, dim=1, largest=False, sorted=True)
    mask = torch.isfinite(val)
    if kk < k:
        idx = torch.cat([idx, idx.new_zeros(B, k - kk)], 1)
        mask = torch.cat([mask, mask.new_zeros(B, k - kk)], 1)
    return torch.where(mask, idx, torch.zeros_like(idx)), mask


def _one_hot(x: Tensor, n: int, dtype=torch.float32) -> Tensor:
    return (x.unsqueeze(-1) == torch.arange(n, device=x.device)).to(dtype)


def _masked(feat: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.unsqueeze(-1), feat, torch.zeros_like(feat))


def _in_set(x: Tensor, table: Tensor, table_ok: Tensor) -> Tensor:
    """Whether each ``x (B, n)`` appears among the ``table (B, R)`` entries flagged by ``table_ok (B, R)``."""
    return ((x.unsqueeze(-1) == table.unsqueeze(1)) & table_ok.unsqueeze(1)).any(-1)


def _project_on_lane(mb: MapBatch, map_id: Tensor, lane: Tensor, pos: Tensor, n: int = 17, levels: int = 4):
    """Arc length (B,) of the point of ``lane`` (B,) nearest to ``pos`` (B, 2): coarse-to-fine sampling
    (``n`` samples per level, each level zooming onto the best sample's neighbourhood) then a projection
    onto the final segment."""
    length = take(mb.lane_length, map_id, lane)
    lo = torch.zeros_like(length)
    hi = length
    t = torch.linspace(0.0, 1.0, n, device=pos.device)
    mid = map_id[:, None].expand(-1, n)
    ln = lane[:, None].expand(-1, n)
    for _ in range(levels):
        s = lo[:, None] + (hi - lo)[:, None] * t
        p, _ = lane_pose(mb, mid, ln, s)
        i = ((p - pos[:, None]) ** 2).sum(-1).argmin(1, keepdim=True)
        best = s.gather(1, i).squeeze(1)
        step = (hi - lo) / (n - 1)
        lo = (best - step).clamp_min(0.0)
        hi = torch.minimum(best + step, length)
    a, _ = lane_pose(mb, map_id, lane, lo)
    b, _ = lane_pose(mb, map_id, lane, hi)
    ab = b - a
    u = (((pos - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-9)).clamp(0.0, 1.0)
    return lo + u * (hi - lo)


@dataclass
class _RouteAhead:
    """Route lanes from ``route_idx`` on (``H`` of them) and distances from the ego along the route."""

    lanes: Tensor  # (B, H) long, -1 past the route's end
    valid: Tensor  # (B, H) bool
    end: Tensor  # (B, H) distance from the ego to the end of each lane, m
    start: Tensor  # (B, H) distance to its start (end - length; <= 0 for the current lane), m
    change_left: Tensor  # (B, H - 1) bool, lane k+1 is the left same-direction neighbour of lane k
    change_right: Tensor  # (B, H - 1) bool


def _route_ahead(mb: MapBatch, state: WorldState, H: int) -> _RouteAhead:
    map_id = state.map_id
    R = state.route_lanes.shape[1]
    ridx = state.route_idx.clamp(0, R - 1)
    k = torch.arange(H, device=map_id.device)
    at = ridx[:, None] + k
    lanes = state.route_lanes.gather(1, at.clamp(max=R - 1))
    valid = (at < R) & (lanes >= 0) & (lanes < mb.lane_valid.shape[1])
    valid = valid & (state.route_idx >= 0)[:, None] & (state.route_idx < R)[:, None]
    valid = valid.long().cumprod(1) > 0  # a prefix
    mid = map_id[:, None].expand_as(lanes)
    lc = torch.where(valid, lanes, torch.zeros_like(lanes))
    valid = valid & take(mb.lane_valid, mid, lc)
    valid = valid.long().cumprod(1) > 0
    lanes = torch.where(valid, lanes, torch.full_like(lanes, -1))
    lc = lanes.clamp_min(0)
    length = take(mb.lane_length, mid, lc)
    s0 = _project_on_lane(mb, map_id, lc[:, 0], state.pos[:, 0])
    nxt = lanes[:, 1:]
    change_left = valid[:, 1:] & (take(mb.lane_left, mid[:, :-1], lc[:, :-1]) == nxt)
    change_right = valid[:, 1:] & (take(mb.lane_right, mid[:, :-1], lc[:, :-1]) == nxt) & ~change_left
    inc = torch.where(change_left | change_right, torch.zeros_like(length[:, 1:]), length[:, 1:])
    end = (length[:, :1] - s0[:, None]) + torch.cat([torch.zeros_like(inc[:, :1]), inc.cumsum(1)], 1)
    return _RouteAhead(lanes, valid, end, end - length, change_left, change_right)


def _command(mb: MapBatch, map_id: Tensor, ra: _RouteAhead, lookahead: float) -> Tensor:
    inf = torch.full_like(ra.end, float("inf"))
    change = ra.change_left | ra.change_right
    lc_trig = torch.where(change, ra.start[:, 1:], inf[:, 1:])  # announced when the target lane is near
    lc_d, lc_i = lc_trig.min(1, keepdim=True)
    lc_left = ra.change_left.gather(1, lc_i).squeeze(1)
    lc_d = lc_d.squeeze(1)
    mid = map_id[:, None].expand_as(ra.lanes)
    lc = ra.lanes.clamp_min(0)
    junction = ra.valid & (take(mb.lane_junction, mid, lc) >= 0)
    jn_trig = torch.where(junction, ra.start, inf)
    jn_d, jn_i = jn_trig.min(1, keepdim=True)
    turn = take(mb.lane_turn, map_id, lc.gather(1, jn_i).squeeze(1)).clamp(0, len(_TURN_TO_COMMAND) - 1)
    jn_d = jn_d.squeeze(1)
    table = torch.tensor([int(c) for c in _TURN_TO_COMMAND], device=map_id.device)
    cmd = torch.full_like(map_id, int(Command.FOLLOW))
    cmd = torch.where(jn_d <= lookahead, table[turn], cmd)
    lc_cmd = torch.where(lc_left, torch.full_like(cmd, int(Command.CHANGE_LEFT)),
                         torch.full_like(cmd, int(Command.CHANGE_RIGHT)))
    return torch.where((lc_d <= lookahead) & (lc_d <= jn_d), lc_cmd, cmd)


def navigation_command(mb: MapBatch, state: WorldState, lookahead: float = 40.0, horizon: int = 8) -> Tensor:
    """(B,) long :class:`Command` from the route lanes ahead of ``route_idx`` (``horizon`` lanes examined).

    The nearest of these events within ``lookahead`` m wins (a lane change on a tie): a same-direction lane
    change in the route (``CHANGE_LEFT`` / ``CHANGE_RIGHT``, from where the target lane begins: at once when
    the ego's lane and its neighbour run side by side) and a junction connector (``LEFT`` / ``RIGHT`` /
    ``STRAIGHT`` from its ``lane_turn``, announced until the ego leaves the connector; a u-turn reads
    ``LEFT``). Otherwise ``FOLLOW``.
    """
    if horizon < 2:
        raise CraftError(f"navigation_command: horizon must be >= 2, got {horizon}")
    return _command(mb, state.map_id, _route_ahead(mb, state, horizon), lookahead)


# ---------------------------------------------------------------------- lane chunks
_CACHE_ATTR = "_craft_obs_chunks"
CHUNK_CELL = 20.0  # cell size of the chunk broad-phase grid, m


def _chunk_grid(mid: np.ndarray, radius: float, cell: float):
    """Per grid cell, every chunk whose midpoint may lie within ``radius`` of a point of the cell.

    Returns origin (2,), shape (nx, ny), items (nx * ny, Kc) int32 chunk indices (-1 padded).
    """
    lo = mid.min(0) - radius - cell
    hi = mid.max(0) + radius + cell
    nx, ny = (np.ceil((hi - lo) / cell).astype(np.int64) + 1).tolist()
    reach2 = (radius + cell * np.sqrt(0.5) + 1e-3) ** 2
    cy = lo[1] + (np.arange(ny) + 0.5) * cell
    counts, cols = [], []
    for i in range(nx):  # one row of cells at a time keeps memory at ny x C
        cx = lo[0] + (i + 0.5) * cell
        near = np.nonzero(np.abs(mid[:, 0] - cx) <= np.sqrt(reach2))[0]
        d2 = (mid[near, 0] - cx) ** 2 + (mid[near, 1][None, :] - cy[:, None]) ** 2
        ok = d2 <= reach2
        counts.append(ok.sum(1))
        cols.append(near[np.nonzero(ok)[1]])
    counts = np.concatenate(counts)
    cols = np.concatenate(cols)
    kc = max(1, int(counts.max()))
    items = np.full((nx * ny, kc), -1, np.int32)
    cell_of = np.repeat(np.arange(nx * ny), counts)
    slot = np.arange(len(cols)) - np.repeat(np.cumsum(counts) - counts, counts)
    items[cell_of, slot] = cols
    return lo.astype(np.float32), (nx, ny), items


def chunk_table(mb: MapBatch, cfg: ObsConfig) -> dict[str, Tensor]:
    """Lane chunks of every map, built once per MapBatch (and chunk geometry / radius) and cached on it.

    Every lane is cut into ``ceil(length / chunk_length)`` equal pieces. Returns ``lane (M, C)`` long (-1 pad),
    ``valid (M, C)``, ``s0 / s1 (M, C)`` arc-length span, ``points (M, C, chunk_points, 2)`` world positions
    evenly spaced over the span, ``mid (M, C, 2)`` and ``heading (M, C)`` at the span's middle, and a broad-phase
    grid: ``grid_origin (M, 2)``, ``grid_shape (M, 2)``, ``grid_items (M, cells, Kc)`` int32 (the chunks whose
    midpoint may lie within ``radius`` of a point of each :data:`CHUNK_CELL` m cell, -1 padded).
    """
    key = (int(cfg.chunk_points), float(cfg.chunk_length), float(cfg.radius))
    cache = mb.__dict__.setdefault(_CACHE_ATTR, {})
    if key in cache:
        return cache[key]
    lanes, s0s, s1s = [], [], []
    for m in mb.maps:
        length = m.lane_length.astype(np.float64)
        n = np.maximum(1, np.ceil(length / cfg.chunk_length - 1e-6)).astype(np.int64)
        lane = np.repeat(np.arange(m.num_lanes), n)
        j = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        step = length[lane] / n[lane]
        lanes.append(lane)
        s0s.append(j * step)
        s1s.append((j + 1) * step)
    M = len(mb.maps)
    C = max(len(x) for x in lanes)
    lane = np.full((M, C), -1, np.int64)
    s0 = np.zeros((M, C), np.float32)
    s1 = np.zeros((M, C), np.float32)
    for i in range(M):
        c = len(lanes[i])
        lane[i, :c], s0[i, :c], s1[i, :c] = lanes[i], s0s[i], s1s[i]
    dev = mb.device
    lane_t = torch.from_numpy(lane).to(dev)
    s0_t = torch.from_numpy(s0).to(dev)
    s1_t = torch.from_numpy(s1).to(dev)
    valid = lane_t >= 0
    lc = lane_t.clamp_min(0)
    P = cfg.chunk_points
    mids = torch.arange(M, device=dev)
    s = s0_t[..., None] + (s1_t - s0_t)[..., None] * torch.linspace(0.0, 1.0, P, device=dev)
    pts, _ = lane_pose(mb, mids[:, None, None], lc[..., None].expand(-1, -1, P), s)
    mid, head = lane_pose(mb, mids[:, None], lc, 0.5 * (s0_t + s1_t))
    z = torch.zeros((), device=dev)
    mid = torch.where(valid[..., None], mid, z)
    grids = [_chunk_grid(mid[i, : len(lanes[i])].cpu().numpy().astype(np.float64), cfg.radius, CHUNK_CELL)
             for i in range(M)]
    cells = max(g[2].shape[0] for g in grids)
    kc = max(g[2].shape[1] for g in grids)
    items = np.full((M, cells, kc), -1, np.int32)
    for i, g in enumerate(grids):
        items[i, : g[2].shape[0], : g[2].shape[1]] = g[2]
    table = {
        "lane": lane_t,
        "valid": valid,
        "s0": s0_t,
        "s1": s1_t,
        "points": torch.where(valid[..., None, None], pts, z),
        "mid": mid,
        "heading": torch.where(valid, head, z),
        "grid_origin": torch.from_numpy(np.stack([g[0] for g in grids])).to(dev),
        "grid_shape": torch.tensor([g[1] for g in grids], dtype=torch.long, device=dev),
        "grid_items": torch.from_numpy(items).to(dev),
    }
    cache[key] = table
    return table


# ---------------------------------------------------------------------- observe
def observe(mb: MapBatch, state: WorldState, lights: Tensor, cfg: ObsConfig | None = None) -> Observation:
    """Observation tokens of every world (see :class:`Observation`).

    lights: (B, K) long :class:`LightState` of each light of the world's map: the states in force (overrides
    already applied). Worlds are independent: a world's tokens depend on that world (and its map) only.
    """
    cfg = cfg or ObsConfig()
    dev = state.pos.device
    map_id = state.map_id
    f32 = torch.float32
    origin = state.pos[:, 0]
    eyaw = state.yaw[:, 0]
    c, s = torch.cos(eyaw), torch.sin(eyaw)
    r2 = cfg.radius**2
    R = state.route_lanes.shape[1]
    ridx = state.route_idx.clamp(0, R - 1)
    route_ahead_ok = (state.route_lanes >= 0) & (torch.arange(R, device=dev)[None, :] >= ridx[:, None])
    route_all_ok = state.route_lanes >= 0

    # ---------------- route lanes ahead: command, next stop line, next light
    ra = _route_ahead(mb, state, cfg.route_lane_horizon)
    command = _command(mb, map_id, ra, cfg.command_lookahead)
    mid_h = map_id[:, None].expand_as(ra.lanes)
    lh = ra.lanes.clamp_min(0)
    incoming = ra.valid & (take(mb.lane_junction, mid_h, lh) < 0)  # stop lines sit at the end of incoming lanes
    lane_light = take(mb.lane_light, mid_h, lh)
    has_light = incoming & (lane_light >= 0)
    has_stop = incoming & (take(mb.lane_stop, mid_h, lh) >= 0)
    inf = torch.full_like(ra.end, float("inf"))
    stop_d = torch.where(has_light | has_stop, ra.end.clamp_min(0.0), inf).min(1).values
    stop_feat = stop_d.clamp(max=cfg.stop_clip) / cfg.pos_scale
    light_d, light_i = torch.where(has_light, ra.end.clamp_min(0.0), inf).min(1, keepdim=True)
    light_k = lane_light.gather(1, light_i).squeeze(1).clamp_min(0)
    K = lights.shape[1]
    light_state = lights.gather(1, light_k.clamp(max=K - 1)[:, None]).squeeze(1)
    light_found = (light_d.squeeze(1) <= cfg.stop_clip) & (light_state >= 0) & (light_state <= int(LightState.RED))
    light_cls = torch.where(light_found, light_state + 1, torch.zeros_like(light_state))

    # ---------------- at a stop sign: inside a stop sign's trigger box
    trig = mb.stop_trigger[map_id]  # (B, Q, 5)
    d = origin[:, None] - trig[..., :2]
    tc, ts = torch.cos(trig[..., 2]), torch.sin(trig[..., 2])
    lx = tc * d[..., 0] + ts * d[..., 1]
    ly = -ts * d[..., 0] + tc * d[..., 1]
    inside = (lx.abs() <= trig[..., 3] / 2) & (ly.abs() <= trig[..., 4] / 2) & mb.stop_valid[map_id]
    at_stop = inside.any(1)

    cur_lane = torch.where(state.lane[:, 0] >= 0, state.lane[:, 0], ra.lanes[:, 0])
    limit = torch.where(cur_lane >= 0, take(mb.lane_speed_limit, map_id, cur_lane.clamp_min(0)), torch.zeros_like(eyaw))
    ego = torch.cat(
        [
            torch.stack([state.speed[:, 0] / cfg.speed_scale, state.accel[:, 0] / cfg.accel_scale, state.steer[:, 0],
                         state.length[:, 0] / cfg.size_scale, state.width[:, 0] / cfg.size_scale], -1),
            _one_hot(command, N_COMMANDS),
            (limit / cfg.speed_scale)[:, None],
            stop_feat[:, None],
            _one_hot(light_cls, 4),
            at_stop.to(f32)[:, None],
        ],
        -1,
    )

    # ---------------- agents
    N = state.num_agents
    rel = _to_ego(state.pos, origin, c, s)  # (B, N, 2)
    d2 = (rel * rel).sum(-1)
    not_ego = torch.arange(N, device=dev)[None, :] > 0
    ok = state.valid & not_ego & (d2 <= r2)
    ai, amask = _nearest(d2, ok, cfg.max_agents)
    g = lambda x: x.gather(1, ai)  # noqa: E731
    axy = rel.gather(1, ai[..., None].expand(-1, -1, 2))
    dyaw = g(state.yaw) - eyaw[:, None]
    spd = g(state.speed)
    kind = g(state.kind)
    agents = torch.cat(
        [
            axy / cfg.pos_scale,
            torch.stack([torch.cos(dyaw), torch.sin(dyaw), spd * torch.cos(dyaw) / cfg.speed_scale,
                         spd * torch.sin(dyaw) / cfg.speed_scale, g(state.length) / cfg.size_scale,
                         g(state.width) / cfg.size_scale], -1),
            (kind[..., None] == torch.tensor([int(k) for k in _TOKEN_KINDS], device=dev)).to(f32),
            g(state.siren).to(f32)[..., None],
        ],
        -1,
    )
    agents = _masked(agents, amask)

    # ---------------- lane chunks
    tab = chunk_table(mb, cfg)
    gshape = tab["grid_shape"][map_id]  # (B, 2)
    cell = ((origin - tab["grid_origin"][map_id]) / CHUNK_CELL).floor()
    inside = torch.isfinite(cell).all(-1) & (cell >= 0).all(-1) & (cell < gshape).all(-1)
    cell = torch.nan_to_num(cell).long()
    cid = cell[:, 0].clamp(0) * gshape[:, 1] + cell[:, 1].clamp(0)
    cid = cid.clamp(max=tab["grid_items"].shape[1] - 1)
    cand = tab["grid_items"][map_id, cid].long()  # (B, Kc) candidate chunks near the ego
    cand_ok = (cand >= 0) & inside[:, None]
    cand = cand.clamp_min(0)
    mcol = map_id[:, None].expand_as(cand)
    dm = tab["mid"][mcol, cand] - origin[:, None]
    d2 = (dm * dm).sum(-1)
    ci, lmask = _nearest(d2, cand_ok & tab["valid"][mcol, cand] & (d2 <= r2), cfg.max_lane_chunks)
    li = cand.gather(1, ci)  # (B, Nl) chunk indices
    mcol = map_id[:, None].expand_as(li)
    lane = tab["lane"][mcol, li].clamp_min(0)
    pts = _to_ego(tab["points"][mcol, li], origin, c, s)  # (B, Nl, P, 2)
    lyaw = tab["heading"][mcol, li] - eyaw[:, None]
    on_route = _in_set(lane, state.route_lanes, route_all_ok)
    lanes = torch.cat(
        [
            (pts / cfg.pos_scale).flatten(2),
            torch.stack([torch.cos(lyaw), torch.sin(lyaw)], -1),
            _one_hot(take(mb.lane_type, mcol, lane), len(LaneType)),
            torch.stack([on_route.to(f32), take(mb.lane_speed_limit, mcol, lane) / cfg.speed_scale,
                         (take(mb.lane_junction, mcol, lane) >= 0).to(f32), (take(mb.lane_light, mcol, lane) >= 0).to(f32),
                         (take(mb.lane_stop, mcol, lane) >= 0).to(f32)], -1),
        ],
        -1,
    )
    lanes = _masked(lanes, lmask)

    # ---------------- traffic lights
    lxy = _to_ego(mb.light_pos[map_id], origin, c, s)  # (B, K, 2)
    d2 = (lxy * lxy).sum(-1)
    ki, kmask = _nearest(d2, mb.light_valid[map_id] & (d2 <= r2), cfg.max_lights)
    mcol = map_id[:, None].expand_as(ki)
    kxy = lxy.gather(1, ki[..., None].expand(-1, -1, 2))
    kyaw = take(mb.light_heading, mcol, ki) - eyaw[:, None]
    kstate = lights.gather(1, ki.clamp(max=K - 1))
    klane = take(mb.light_lane, mcol, ki)
    lights_tok = torch.cat(
        [
            kxy / cfg.pos_scale,
            torch.stack([torch.cos(kyaw), torch.sin(kyaw)], -1),
            _one_hot(kstate, 3),
            _in_set(klane, state.route_lanes, route_ahead_ok).to(f32)[..., None],
        ],
        -1,
    )
    lights_tok = _masked(lights_tok, kmask)

    # ---------------- stop signs
    qxy = _to_ego(mb.stop_pos[map_id], origin, c, s)
    d2 = (qxy * qxy).sum(-1)
    qi, qmask = _nearest(d2, mb.stop_valid[map_id] & (d2 <= r2), cfg.max_stops)
    mcol = map_id[:, None].expand_as(qi)
    sxy = qxy.gather(1, qi[..., None].expand(-1, -1, 2))
    syaw = take(mb.stop_heading, mcol, qi) - eyaw[:, None]
    stops = torch.cat(
        [
            sxy / cfg.pos_scale,
            torch.stack([torch.cos(syaw), torch.sin(syaw)], -1),
            _in_set(take(mb.stop_lane, mcol, qi), state.route_lanes, route_ahead_ok).to(f32)[..., None],
        ],
        -1,
    )
    stops = _masked(stops, qmask)

    # ---------------- route polyline ahead
    rv = state.route_valid
    big = torch.full_like(state.route_cum, 1e9)
    cum = torch.where(rv, state.route_cum, big).cummax(1).values.contiguous()
    last = torch.where(rv, state.route_cum, torch.full_like(big, -1e9)).max(1).values  # (B,)
    Pn = cum.shape[1]
    q = state.progress[:, None] + cfg.route_spacing * torch.arange(cfg.route_points, device=dev, dtype=f32)
    rmask = rv.any(1, keepdim=True) & (q <= last[:, None] + 1e-3)
    i0 = (torch.searchsorted(cum, q.contiguous(), right=True) - 1).clamp(0, max(Pn - 2, 0))
    i1 = (i0 + 1).clamp(max=Pn - 1)
    c0, c1 = cum.gather(1, i0), cum.gather(1, i1)
    w = ((q - c0) / (c1 - c0).clamp_min(1e-6)).clamp(0.0, 1.0)
    p0 = state.route_pts.gather(1, i0[..., None].expand(-1, -1, 2))
    p1 = state.route_pts.gather(1, i1[..., None].expand(-1, -1, 2))
    p1 = torch.where(rv.gather(1, i1)[..., None], p1, p0)  # never read padding
    route = _to_ego(p0 + w[..., None] * (p1 - p0), origin, c, s) / cfg.pos_scale
    route = _masked(route, rmask)

    return Observation(
        ego=ego,
        command=command,
        agents=agents,
        agents_mask=amask,
        lanes=lanes,
        lanes_mask=lmask,
        lights=lights_tok,
        lights_mask=kmask,
        stops=stops,
        stops_mask=qmask,
        route=route,
        route_mask=rmask,
    )
