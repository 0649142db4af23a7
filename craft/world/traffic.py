"""Reactive traffic: how background agents decide their controls each step.

Vehicles in ``Mode.LANE`` follow their lane path (current lane + a short queue of upcoming lanes):

1. **Path samples.** The path ahead is sampled every ``path_step`` metres (``(B, N, S, 2)``).
2. **Leader.** The ``neighbours`` nearest entities ahead (vehicles, pedestrians, static objects and the
   ego alike) are projected onto the sampled path; the nearest one whose footprint reaches into the
   corridor (own half width + its perpendicular half extent + margin) is the IDM leader, with its speed
   projected on the path. Crossing pedestrians or vehicles therefore stop the agent.
3. **Stop points** act as standing leaders: the end of the path, red (and stoppable yellow) lights at the
   end of an incoming lane, stop lines until served (speed < ``stop_serve_speed`` at the line), and
   junction yielding: conflicting connector pairs with priority / arrival-order rules and gap acceptance
   (``gap_time``), the ego included both as someone to yield to and as someone who must be yielded to.
4. **IDM** gives the acceleration (the minimum over the leader and all stop points).
5. **MOBIL** lane changes on multi-lane roads, evaluated every ``mobil_every`` steps per agent
   (staggered), incentive + politeness + safety criterion; a change re-anchors the agent on the target lane
   with a lateral offset that decays at ``offset_rate`` (a smooth manoeuvre).
6. **Pure pursuit** towards the path point ``Ld`` ahead (shifted by the decaying lateral offset).

Pedestrians walk their walk-lane path and wait at the kerb before a crosswalk until no vehicle would
reach it within ``ped_cross_ttc`` seconds. ``Mode.FREE`` agents hold their heading at ``speed_override``.

Random choices (successor lanes at forks) come from a counter-based hash of (world seed, step, agent),
so a cloned world replays identically. All of it is batched tensor code; no loops over agents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from craft.world.kinds import AgentKind
from craft.world.map import LaneType, LightState, MapBatch, lane_pose, lane_pose_at, take
from craft.world.state import QUEUE, Mode, WorldState


@dataclass(frozen=True)
class TrafficConfig:
    """Parameters of the reactive traffic model."""

    path_step: float = 5.0  # spacing of the path samples, m
    path_samples: int = 12  # number of path samples (covers (path_samples-1)*path_step m)
    leader_time: float = 3.0  # leaders are searched within leader_time * speed + leader_reach_min, s
    leader_reach_min: float = 25.0  # m
    corridor_margin: float = 0.4  # extra lateral clearance of the path corridor, m
    pedestrian_margin: float = 1.0  # extra clearance kept from pedestrians, m
    idm_delta: float = 4.0  # IDM free-road exponent
    max_brake: float = 8.0  # hardest braking IDM may ask for, m/s^2
    speed_limit_factor: float = 1.0  # free speed = min(v_des, factor * lane speed limit)
    stop_margin: float = 1.0  # distance kept before stop lines, m
    stop_serve_speed: float = 0.3  # speed counting as stopped at a stop sign, m/s
    stop_serve_dist: float = 4.0  # distance to the line within which a stop counts, m
    junction_lookahead: float = 40.0  # connectors further ahead are ignored, m
    gap_time: float = 3.0  # accepted time gap to a priority road user at a conflict point, s
    commit_dist: float = 2.0  # inside a connector beyond this, an agent never yields, m
    lookahead_min: float = 4.0  # pure-pursuit lookahead, m
    lookahead_gain: float = 0.5  # s
    lookahead_max: float = 15.0  # m
    offset_rate: float = 1.0  # lateral speed of a lane change, m/s
    mobil_every: int = 10  # steps between lane-change evaluations of one agent
    mobil_threshold: float = 0.3  # acceleration gain needed to change lanes, m/s^2
    mobil_safe_brake: float = 3.0  # the new follower may not need to brake harder, m/s^2
    mobil_keep_right: float = 0.1  # bias towards the right lane, m/s^2
    lane_change_clearance: float = 25.0  # no lane change this close to a junction / path end, m
    ped_lookahead: float = 1.5  # pedestrian heading lookahead, m
    ped_cross_ttc: float = 5.0  # a pedestrian crosses only if no vehicle arrives sooner, s
    ped_cross_radius: float = 35.0  # vehicles considered for a crossing decision, m
    ped_cross_near: float = 6.0  # any moving vehicle closer than this blocks a crossing, m


# ---------------------------------------------------------------------- random numbers
_M32 = 0xFFFFFFFF


def hash_uniform(seed: torch.Tensor, step: torch.Tensor, idx: torch.Tensor, salt: int) -> torch.Tensor:
    """Counter-based uniform random numbers in [0, 1): a pure function of (seed, step, idx, salt).

    seed, step: (B,) long; idx: (B, N) or (N,) long. Returns (B, N) float32.
    """
    x = (seed[:, None] * 0x9E3779B1 + step[:, None] * 0x85EBCA77 + idx * 0xC2B2AE3D + salt * 0x27D4EB2F) & _M32
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    return (x & 0xFFFFFF).to(torch.float32) / float(1 << 24)


# ---------------------------------------------------------------------- per-map caches
def _connector_tables(mb: MapBatch):
    """Dense conflict tables over junction connectors, cached on the MapBatch.

    Returns conn_index (M, L) long (-1 for non-connectors), conflict (M, C, C) bool,
    conflict_s (M, C, C) float (arc length of the conflict point on the row connector).
    """
    cache = getattr(mb, "_traffic_cache", None)
    if cache is not None:
        return cache
    M, L = mb.lane_junction.shape
    is_conn = (mb.lane_junction >= 0) & mb.lane_valid & (mb.lane_type == int(LaneType.DRIVING))
    counts = is_conn.sum(1)
    C = max(1, int(counts.max()))
    conn_index = torch.full((M, L), -1, dtype=torch.long, device=mb.device)
    conn_index[is_conn] = torch.cat([torch.arange(int(c), device=mb.device) for c in counts])
    conflict = torch.zeros(M, C, C, dtype=torch.bool, device=mb.device)
    conflict_s = torch.zeros(M, C, C, device=mb.device)
    lc = mb.lane_conflict  # (M, L, K)
    m_idx, l_idx, k_idx = torch.nonzero(lc >= 0, as_tuple=True)
    other = lc[m_idx, l_idx, k_idx]
    ci = conn_index[m_idx, l_idx]
    cj = conn_index[m_idx, other]
    ok = (ci >= 0) & (cj >= 0)
    conflict[m_idx[ok], ci[ok], cj[ok]] = True
    conflict_s[m_idx[ok], ci[ok], cj[ok]] = take(mb.lane_conflict_s, m_idx[ok], l_idx[ok], k_idx[ok])
    mb._traffic_cache = (conn_index, conflict, conflict_s)
    return mb._traffic_cache


# ---------------------------------------------------------------------- path geometry
@dataclass
class PathInfo:
    """The lane path ahead of every agent. ``S`` samples, ``Q = QUEUE + 1`` lanes."""

    seq: torch.Tensor  # (B, N, Q) lanes: current then queue (-1 padded)
    ends: torch.Tensor  # (B, N, Q) distance from the agent to the end of each path lane
    path_end: torch.Tensor  # (B, N) distance to the end of the known path (inf if it continues)
    pts: torch.Tensor  # (B, N, S, 2) path samples
    heading: torch.Tensor  # (B, N, S)


def path_info(mb: MapBatch, state: WorldState, cfg: TrafficConfig) -> PathInfo:
    """Sample every agent's lane path ahead (agents without a lane get a degenerate path)."""
    B, N = state.lane.shape
    mid = state.map_id[:, None, None]
    seq = torch.cat([state.lane[..., None], state.queue], -1)  # (B, N, Q)
    seq_ok = seq >= 0
    # a lane after a missing one is missing too
    seq_ok = torch.cumprod(seq_ok.long(), -1).bool()
    seq_c = seq.clamp_min(0)
    lane_len = take(mb.lane_length, mid, seq_c)
    length = torch.where(seq_ok, lane_len, torch.zeros_like(lane_len))
    first = (length[..., 0] - state.s).clamp_min(0.0)
    seg = torch.cat([first[..., None], length[..., 1:]], -1)
    ends = torch.cumsum(seg, -1)
    ends = torch.where(seq_ok, ends, torch.full_like(ends, float("inf")))
    n_ok = seq_ok.sum(-1)
    last_end = torch.gather(torch.cumsum(seg, -1), -1, (n_ok - 1).clamp_min(0)[..., None]).squeeze(-1)
    path_end = torch.where(seq_ok[..., -1], torch.full_like(last_end, float("inf")), last_end)

    d = torch.arange(cfg.path_samples, device=state.device, dtype=torch.float32) * cfg.path_step  # (S,)
    k = torch.searchsorted(ends, d.expand(B, N, -1).contiguous(), right=True)  # (B, N, S) which path lane
    k = torch.minimum(k, (n_ok - 1).clamp_min(0)[..., None])
    before = torch.cat([torch.zeros_like(ends[..., :1]), torch.cumsum(seg, -1)[..., :-1]], -1)  # (B, N, Q)
    start = torch.gather(before, -1, k)
    local = d[None, None, :] - start + torch.where(k == 0, state.s[..., None], torch.zeros_like(start))
    per = lambda x: torch.gather(x, -1, k)  # noqa: E731  (lane-level values -> samples)
    pts, heading = lane_pose_at(mb, mid, per(take(mb.lane_offset, mid, seq_c)), per(take(mb.lane_count, mid, seq_c)),
                                per(lane_len), local)
    return PathInfo(seq=torch.where(seq_ok, seq, torch.full_like(seq, -1)), ends=ends, path_end=path_end,
                    pts=pts, heading=heading)


def _along_path(path: PathInfo, dist: torch.Tensor, step: float):
    """Interpolate path samples at arc distances ``dist (B, N)``: returns pos (B, N, 2), heading (B, N)."""
    S = path.pts.shape[2]
    f = (dist / step).clamp(0.0, S - 1 - 1e-4)
    i0 = f.floor().long()
    w = (f - i0.float())[..., None]
    p0 = torch.gather(path.pts, 2, i0[..., None, None].expand(-1, -1, 1, 2)).squeeze(2)
    p1 = torch.gather(path.pts, 2, (i0 + 1)[..., None, None].expand(-1, -1, 1, 2)).squeeze(2)
    h = torch.gather(path.heading, 2, i0[..., None]).squeeze(2)
    return p0 + w * (p1 - p0), h


# ---------------------------------------------------------------------- IDM
def idm_accel(v, v0, gap, dv, a_max, b_comf, headway, min_gap, delta: float = 4.0):
    """Intelligent Driver Model acceleration (all tensors broadcast).

    v: own speed, v0: desired speed, gap: bumper-to-bumper distance to the leader (inf: free road),
    dv: v - v_leader. Returns a = a_max * (1 - (v/v0)^delta - (s*/gap)^2),
    s* = s0 + v T + v dv / (2 sqrt(a_max b_comf)).
    """
    v0 = v0.clamp_min(0.1)
    s_star = min_gap + (v * headway + v * dv / (2.0 * torch.sqrt(a_max * b_comf))).clamp_min(0.0)
    free = 1.0 - (v / v0).clamp_max(3.0) ** delta
    inter = (s_star / gap.clamp_min(0.1)) ** 2
    inter = torch.where(torch.isfinite(gap), inter, torch.zeros_like(inter))
    return a_max * (free - inter.clamp_max(1e4))


# ---------------------------------------------------------------------- sparse pairs
def _pairs(mask: torch.Tensor):
    """(B, N, N) bool -> flat row index b*N+i, flat column index b*N+j, batch b, for every True entry."""
    B, N, _ = mask.shape
    b, i, j = mask.nonzero(as_tuple=True)
    return b * N + i, b * N + j, b


def _row_pairs(rows: torch.Tensor, cols: torch.Tensor):
    """Pairs (i, j) for the few rows ``rows (B, N)`` against every column j of the same world with
    ``cols (B, N)`` (j != i): flat row index, flat column index. Cost follows the number of rows."""
    B, N = rows.shape
    r = rows.reshape(-1).nonzero().squeeze(1)  # (R,)
    b = r // N
    j = b[:, None] * N + torch.arange(N, device=rows.device)[None, :]  # (R, N)
    j = j.reshape(-1)
    ri = r.repeat_interleave(N)
    keep = cols.reshape(-1).index_select(0, j) & (j != ri)
    return ri[keep], j[keep]


def _scatter_min(n: int, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """Per-row minimum of ``val`` grouped by flat row ``idx``; rows without entries get +inf. (n,)"""
    out = torch.full((n,), float("inf"), dtype=val.dtype, device=val.device)
    return out.scatter_reduce(0, idx, val, reduce="amin", include_self=True)


def _argmin_rows(n: int, idx: torch.Tensor, val: torch.Tensor, payload: torch.Tensor) -> tuple:
    """Per-row minimum of ``val`` and the largest ``payload`` among the entries attaining it (-1 if none)."""
    best = _scatter_min(n, idx, val)
    win = (val == best[idx]) & torch.isfinite(val)
    pick = torch.full((n,), -1, dtype=payload.dtype, device=val.device)
    pick = pick.scatter_reduce(0, idx[win], payload[win], reduce="amax", include_self=True)
    return best, pick


def _close_pairs(state: WorldState, rows: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
    """(B, N, N) bool: valid j (j != i) within ``reach (B, N)`` of agent i, for the agents i in ``rows (B, N)``."""
    N = state.num_agents
    near = torch.cdist(state.pos, state.pos) < reach[:, :, None]
    eye = torch.eye(N, dtype=torch.bool, device=state.device)[None]
    return near & rows[:, :, None] & state.valid[:, None, :] & ~eye


# ---------------------------------------------------------------------- leaders
def _leaders(state: WorldState, path: PathInfo, cfg: TrafficConfig):
    """Nearest entity in each lane-following vehicle's path corridor.

    Candidate pairs (i, j) are the valid entities within the path's reach and not behind i (a sparse pair
    list, so the cost follows local density); each j is projected on i's sampled path (nearest sample,
    refined on its two adjacent segments). Returns gap (B, N) (inf if none), leader speed along the path
    (B, N), leader index (B, N) (-1 if none).
    """
    B, N = state.lane.shape
    S = path.pts.shape[2]
    follows = (state.mode == Mode.LANE) & (state.lane >= 0) & state.is_vehicle() & (state.kind != int(AgentKind.EGO))
    # look as far as the IDM can care about: a few seconds of travel, at most the sampled path
    reach = (cfg.leader_time * state.speed + cfg.leader_reach_min).clamp(max=(S - 1) * cfg.path_step)
    cand = _close_pairs(state, follows, reach + 5.0)
    ignore_ego = (state.kind == int(AgentKind.EGO))[:, None, :] & ~state.react_ego[:, :, None]
    # an agent that ignores vehicles (a flow at constant velocity) still sees pedestrians
    ignore_veh = state.ignore_vehicles[:, :, None] & (state.kind != int(AgentKind.PEDESTRIAN))[:, None, :]
    ri, rj, _ = _pairs(cand & ~ignore_ego & ~ignore_veh)
    flat = lambda x: x.reshape(B * N, *x.shape[2:])  # noqa: E731
    # drop pairs behind the agent before the path projection
    rel = flat(state.pos).index_select(0, rj) - flat(state.pos).index_select(0, ri)
    yi = flat(state.yaw).index_select(0, ri)
    ahead = rel[:, 0] * torch.cos(yi) + rel[:, 1] * torch.sin(yi) > -0.5 * flat(state.length).index_select(0, ri)
    ri, rj = ri[ahead], rj[ahead]
    pts = flat(path.pts).index_select(0, ri)  # (P, S, 2)
    heads = flat(path.heading).index_select(0, ri)  # (P, S)
    pj = flat(state.pos).index_select(0, rj)  # (P, 2)
    d2 = ((pts - pj[:, None, :]) ** 2).sum(-1)
    k0 = (d2.argmin(-1) - 1).clamp(0, S - 3)  # first of three samples -> two segments
    tri = torch.gather(pts, 1, (k0[:, None] + torch.arange(3, device=pts.device))[..., None].expand(-1, -1, 2))
    a, b = tri[:, :2], tri[:, 1:]
    ab = b - a
    l2 = (ab * ab).sum(-1).clamp_min(1e-6)
    u = (((pj[:, None, :] - a) * ab).sum(-1) / l2).clamp(0.0, 1.0)  # (P, 2)
    diff = pj[:, None, :] - (a + u[..., None] * ab)
    lat2 = (diff * diff).sum(-1)
    which = lat2.argmin(-1)
    lat = torch.gather(lat2, 1, which[:, None]).squeeze(1).sqrt()
    side = ab[:, :, 0] * diff[:, :, 1] - ab[:, :, 1] * diff[:, :, 0]  # > 0: j left of the path
    lat = torch.where(torch.gather(side, 1, which[:, None]).squeeze(1) >= 0, lat, -lat)  # signed
    seg = k0 + which
    arc = (seg.to(pj.dtype) + torch.gather(u, 1, which[:, None]).squeeze(1)) * cfg.path_step
    phi = flat(state.yaw).index_select(0, rj) - torch.gather(heads, 1, seg[:, None]).squeeze(1)
    c, s = torch.cos(phi).abs(), torch.sin(phi).abs()
    lj, wj = flat(state.length).index_select(0, rj), flat(state.width).index_select(0, rj)
    perp = 0.5 * (wj * c + lj * s)
    along = 0.5 * (lj * c + wj * s)
    kind_j = flat(state.kind).index_select(0, rj)
    margin = cfg.corridor_margin + cfg.pedestrian_margin * (kind_j == int(AgentKind.PEDESTRIAN)).to(pj.dtype)
    # the corridor sweeps from the agent's current lateral offset (mid lane change) to the lane centre
    half = 0.5 * flat(state.width).index_select(0, ri) + perp + margin
    off = flat(state.offset).index_select(0, ri)
    inside = (lat < off.clamp_min(0.0) + half) & (lat > off.clamp_max(0.0) - half)
    inside &= (arc > 0.05) & (arc < (S - 1) * cfg.path_step - 0.1)
    gap = (arc - along - 0.5 * flat(state.length).index_select(0, ri)).clamp_min(0.05)
    gap = torch.where(inside, gap, torch.full_like(gap, float("inf")))
    v_along = (flat(state.speed).index_select(0, rj) * torch.cos(phi)).clamp_min(0.0)
    best, leader = _argmin_rows(B * N, ri, gap, rj)
    v_lead = torch.zeros(B * N, device=pj.device)
    has = leader >= 0
    v_lead[has] = _scatter_min(B * N, ri[gap == best[ri]], v_along[gap == best[ri]])[has]
    leader = torch.where(has, leader % N, leader)
    return best.view(B, N), v_lead.view(B, N), leader.view(B, N)


# ---------------------------------------------------------------------- stop points
def light_and_stop_gaps(mb: MapBatch, state: WorldState, path: PathInfo, lights, cfg: TrafficConfig):
    """Distance to the nearest stop point from lights and stop signs on the path (inf if none).

    Also returns the updated ``stopped_at`` (stop signs served) and ``stop_here (B, N, Q)``: which path
    lanes end at a stop point now."""
    B, N, Qn = path.seq.shape
    mid = state.map_id[:, None, None]
    seq = path.seq.clamp_min(0)
    incoming = (path.seq >= 0) & (take(mb.lane_junction, mid, seq) < 0)
    lt = take(mb.lane_light, mid, seq)  # (B, N, Q)
    lstate = torch.gather(lights, 1, lt.clamp_min(0).view(B, -1)).view(B, N, Qn)
    dist_line = path.ends - cfg.stop_margin
    v = state.speed[..., None]
    stoppable = dist_line > v * v / (2.0 * state.b_comf[..., None]) 
    red = (lstate == int(LightState.RED)) | ((lstate == int(LightState.YELLOW)) & stoppable)
    light_stop = incoming & (lt >= 0) & red & ~state.ignore_lights[..., None]
    st = take(mb.lane_stop, mid, seq)
    served = state.stopped_at[..., None] == path.seq
    sign_stop = incoming & (st >= 0) & ~served & ~state.ignore_stops[..., None]
    stop_here = light_stop | sign_stop
    gap = torch.where(stop_here, dist_line, torch.full_like(dist_line, float("inf"))).min(-1).values
    # serving a stop sign: nearly stopped close to the end of the current lane, which has a stop sign
    cur_sign = sign_stop[..., 0]
    now_served = cur_sign & (state.speed < cfg.stop_serve_speed) & (path.ends[..., 0] < cfg.stop_serve_dist + 0.5 * state.length)
    stopped_at = torch.where(now_served, state.lane, state.stopped_at)
    return gap - 0.5 * state.length, stopped_at, stop_here


def _junction_gaps(mb: MapBatch, state: WorldState, path: PathInfo, stop_here: torch.Tensor, cfg: TrafficConfig):
    """Yielding at junctions: distance to the point where each agent must wait (inf if free to go).

    Every vehicle (the ego included) with a connector among its next lanes takes part; pairs whose
    connectors conflict are listed sparsely. Agent i yields to j when j has the right of way (j already
    inside the junction and i not; else higher connector priority; else arriving first), j is not
    itself held by a light / stop sign, neither has passed the conflict point, and j would reach it
    within ``gap_time`` of i. Anyone already inside the junction has the right of way over those outside. Agents that can no longer stop, or are committed inside, do not yield.
    """
    B, N, Qn = path.seq.shape
    conn_index, conflict, conflict_s = _connector_tables(mb)
    C = conflict.shape[1]
    m2 = state.map_id[:, None]
    seq = path.seq.clamp_min(0)
    is_conn = (path.seq >= 0) & (take(mb.lane_junction, state.map_id[:, None, None], seq) >= 0)
    is_conn[..., 3:] = False
    k = is_conn.float().argmax(-1)  # first connector on the path
    c_lane = torch.gather(path.seq, -1, k[..., None]).squeeze(-1).clamp_min(0)
    inside = is_conn.any(-1) & (k == 0)
    before = torch.cat([torch.zeros_like(path.ends[..., :1]), path.ends[..., :-1]], -1)
    entry = torch.where(inside, torch.zeros_like(state.s), torch.gather(before, -1, k[..., None]).squeeze(-1))
    ok = is_conn.any(-1) & (entry < cfg.junction_lookahead) & state.is_vehicle()
    # held: must stop (red light, unserved stop sign) before reaching that connector
    held = (stop_here & (torch.arange(Qn, device=state.device) < k[..., None])).any(-1)
    ci = take(conn_index, m2, c_lane)
    ok &= ci >= 0
    decider = ok & (state.mode == Mode.LANE) & (state.kind != int(AgentKind.EGO)) & ~state.ignore_priority
    jid = take(mb.lane_junction, m2, c_lane)
    ri, rj = _row_pairs(decider, ok)
    flat = lambda x: x.reshape(-1)  # noqa: E731
    keep = flat(jid)[ri] == flat(jid)[rj]  # only road users of the same junction can conflict
    keep &= flat(state.react_ego)[ri] | (flat(state.kind)[rj] != int(AgentKind.EGO))
    ri, rj = ri[keep], rj[keep]
    rb = ri // N
    m = state.map_id[rb]
    ci_i, ci_j = flat(ci)[ri], flat(ci)[rj]
    lin = (m * C + ci_i) * C + ci_j
    cf = conflict.view(-1)[lin]
    ri, rj, m, ci_i, ci_j, lin = ri[cf], rj[cf], m[cf], ci_i[cf], ci_j[cf], lin[cf]
    s_ij = conflict_s.view(-1)[lin]
    s_ji = conflict_s.view(-1)[(m * C + ci_j) * C + ci_i]
    prog = flat(torch.where(inside, state.s, torch.zeros_like(state.s)))
    ent = flat(entry)
    d_i = ent[ri] + s_ij - prog[ri]
    d_j = ent[rj] + s_ji - prog[rj]
    v = flat(state.speed)
    t_i = d_i.clamp_min(0) / v[ri].clamp_min(2.0)
    t_j = d_j.clamp_min(0) / v[rj].clamp_min(0.5)
    prio = flat(take(mb.lane_priority, m2, c_lane))
    p_i, p_j = prio[ri], prio[rj]
    ins = flat(inside)
    in_i, in_j = ins[ri], ins[rj]
    earlier = (t_j < t_i) | ((t_j == t_i) & (rj < ri))
    # whoever is already inside the junction goes first; otherwise priority, then arrival order
    row = (in_j & ~in_i) | ((in_j == in_i) & ((p_j > p_i) | ((p_j == p_i) & earlier)))
    row |= flat(state.ignore_priority)[rj]
    row &= ~flat(held)[rj] | in_j
    length = flat(state.length)
    must = row & (d_j > -(0.5 * length[rj] + 1.0)) & (d_i > -0.5 * length[ri])
    must &= (t_j < t_i + cfg.gap_time) & (d_j < 60.0)
    d_conf = _scatter_min(B * N, ri[must], d_i[must]).view(B, N)
    yield_ = torch.isfinite(d_conf)
    can_stop = entry > state.speed * state.speed / (2.0 * cfg.max_brake)
    committed = (inside & (state.s > cfg.commit_dist)) | (~inside & ~can_stop)
    yield_ &= ~committed
    wait_at = torch.where(inside, d_conf - 2.0, entry - cfg.stop_margin)
    return torch.where(yield_, wait_at - 0.5 * state.length, torch.full_like(wait_at, float("inf")))


# ---------------------------------------------------------------------- lane changes (MOBIL)
def _mobil(mb: MapBatch, state: WorldState, path: PathInfo, a_cur: torch.Tensor, v0: torch.Tensor, cfg: TrafficConfig):
    """Lane-change decisions (MOBIL): returns the target lane (B, N), -1 to stay.

    Evaluated for 1/``mobil_every`` of the agents each step (staggered by index). On the target lane the
    new leader and follower are the nearest agents ahead / behind along the agent's heading; incentive a_new - a_cur + p (follower's change) + keep-right bias
    must exceed the threshold, and the new follower must not need to brake harder than ``mobil_safe_brake``.
    """
    B, N = state.lane.shape
    m2 = state.map_id[:, None]
    lane = state.lane.clamp_min(0)
    idx = torch.arange(N, device=state.device)
    due = ((state.step[:, None] + idx[None, :]) % cfg.mobil_every) == 0
    base = (
        due & (state.mode == Mode.LANE) & state.lane_changes & state.is_vehicle()
        & (state.kind != int(AgentKind.EGO)) & (state.lane >= 0) & (state.offset.abs() < 0.3)
        & (take(mb.lane_junction, m2, lane) < 0) & ~state.hold & (path.ends[..., 0] > cfg.lane_change_clearance)
    )
    target = torch.full_like(state.lane, -1)
    if not bool(base.any()):
        return target
    lane_ends = (take(mb.lane_succ, m2, lane) < 0).all(-1)  # no successor: must leave this lane
    best_gain = torch.full_like(state.s, -float("inf"))
    flat = lambda x: x.reshape(-1)  # noqa: E731
    for side, bias in ((mb.lane_left, -cfg.mobil_keep_right), (mb.lane_right, cfg.mobil_keep_right)):
        tl = take(side, m2, lane)
        tl_ok = base & (tl >= 0) & (take(mb.lane_type, m2, tl.clamp_min(0)) == int(LaneType.DRIVING))
        if not bool(tl_ok.any()):
            continue
        ri, rj = _row_pairs(tl_ok, state.valid)
        on_t = flat(state.lane)[rj] == flat(tl)[ri]
        ri, rj = ri[on_t], rj[on_t]
        length = flat(state.length)
        # longitudinal distance along i's heading (robust where neighbouring lanes' arc lengths differ)
        px, py, yi = flat(state.pos[..., 0]), flat(state.pos[..., 1]), flat(state.yaw)[ri]
        ds = (px[rj] - px[ri]) * torch.cos(yi) + (py[rj] - py[ri]) * torch.sin(yi)
        half = 0.5 * (length[ri] + length[rj])
        inf = torch.full_like(ds, float("inf"))
        g_lead, j_lead = _argmin_rows(B * N, ri, torch.where(ds > 0, ds - half, inf), rj)
        g_fol, j_fol = _argmin_rows(B * N, ri, torch.where(ds <= 0, -ds - half, inf), rj)
        g_lead, g_fol = g_lead.view(B, N), g_fol.view(B, N)
        pick = lambda x, j: torch.where(j >= 0, flat(x)[j.clamp_min(0)], torch.zeros_like(flat(x)[:1]).expand_as(j)).view(B, N)  # noqa: E731
        v_lead = pick(state.speed, j_lead)
        has_fol = (j_fol >= 0).view(B, N)
        v_fol = pick(state.speed, j_fol)
        fp = {f: pick(getattr(state, f), j_fol) for f in ("a_max", "b_comf", "headway", "min_gap")}
        fp = {f: torch.where(has_fol, x, getattr(state, f)) for f, x in fp.items()}
        v0_fol = torch.where(has_fol, pick(v0, j_fol), v0)
        a_new = idm_accel(state.speed, v0, g_lead, state.speed - v_lead, state.a_max, state.b_comf,
                          state.headway, state.min_gap, cfg.idm_delta)
        a_fol_new = idm_accel(v_fol, v0_fol, g_fol, v_fol - state.speed, fp["a_max"], fp["b_comf"],
                              fp["headway"], fp["min_gap"], cfg.idm_delta)
        a_fol_old = idm_accel(v_fol, v0_fol, g_lead + g_fol + state.length, v_fol - v_lead, fp["a_max"],
                              fp["b_comf"], fp["headway"], fp["min_gap"], cfg.idm_delta)
        safe = (g_lead > 1.0) & (a_new > -cfg.mobil_safe_brake)
        safe &= ~has_fol | ((g_fol > 1.0) & (a_fol_new > -cfg.mobil_safe_brake))
        gain = a_new - a_cur + state.politeness * torch.where(has_fol, a_fol_new - a_fol_old, torch.zeros_like(a_new))
        gain = gain + bias + 5.0 * lane_ends.to(gain.dtype)
        want = tl_ok & safe & (gain > cfg.mobil_threshold) & (gain > best_gain)
        target = torch.where(want, tl, target)
        best_gain = torch.where(want, gain, best_gain)
    return target


# ---------------------------------------------------------------------- queue maintenance
def refill_queue(mb: MapBatch, state: WorldState, lane: torch.Tensor, queue: torch.Tensor, salt: int):
    """Fill -1 slots of ``queue (B, N, QUEUE)`` with random successors, lane by lane.

    Only agents with an empty slot behind a lane that has successors are touched (gathered sparsely)."""
    B, N = lane.shape
    seq = torch.cat([lane[..., None], queue], -1)
    last = torch.gather(seq, -1, ((seq >= 0).long().cumprod(-1).sum(-1) - 1).clamp_min(0)[..., None]).squeeze(-1)
    need = (queue[..., -1] < 0) & (lane >= 0)
    need &= take(mb.lane_succ, state.map_id[:, None], last.clamp_min(0))[..., 0] >= 0
    rows = need.reshape(-1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return queue
    b = rows // N
    q = queue.reshape(-1, QUEUE)[rows].clone()
    prev = lane.reshape(-1)[rows]
    for k in range(QUEUE):
        succ = take(mb.lane_succ, state.map_id[b], prev.clamp_min(0))  # (R, S)
        n = (succ >= 0).sum(-1)
        u = hash_uniform(state.seed[b], state.step[b], ((rows % N) * 8 + k)[:, None], salt).squeeze(1)
        pick = (u * n.to(u.dtype)).floor().long().clamp(max=(n - 1).clamp_min(0))
        choice = torch.gather(succ, -1, pick[:, None]).squeeze(-1)
        choice = torch.where((prev >= 0) & (n > 0), choice, torch.full_like(choice, -1))
        q[:, k] = torch.where(q[:, k] >= 0, q[:, k], choice)
        prev = q[:, k]
    out = queue.reshape(-1, QUEUE).clone()
    out[rows] = q
    return out.view(B, N, QUEUE)


def _replan_after_change(mb, state, target, path_lane, path_s, queue):
    """Re-anchor agents that change lane onto ``target`` at the same arc length, lateral offset kept."""
    change = target >= 0
    if not bool(change.any()):
        return path_lane, path_s, queue, state.offset
    m2 = state.map_id[:, None]
    tl = target.clamp_min(0)
    s_new = torch.minimum(path_s, take(mb.lane_length, m2, tl) - 0.1).clamp_min(0)
    p_new, h_new = lane_pose(mb, m2, tl, s_new)
    d = state.pos - p_new
    lateral = -torch.sin(h_new) * d[..., 0] + torch.cos(h_new) * d[..., 1]
    lane = torch.where(change, target, path_lane)
    s = torch.where(change, s_new, path_s)
    offset = torch.where(change, lateral, state.offset)
    queue = torch.where(change[..., None], torch.full_like(queue, -1), queue)
    return lane, s, queue, offset


# ---------------------------------------------------------------------- main entry
@dataclass
class TrafficControls:
    """Controls chosen by the traffic model for every agent (the ego's entries are ignored)."""

    accel: torch.Tensor  # (B, N) m/s^2 (vehicles)
    steer: torch.Tensor  # (B, N) rad (vehicles)
    ped_yaw: torch.Tensor  # (B, N) target heading (pedestrians)
    ped_speed: torch.Tensor  # (B, N) target speed (pedestrians, FREE agents)


def traffic_step(mb: MapBatch, state: WorldState, lights: torch.Tensor, cfg: TrafficConfig):
    """Decide every background agent's controls; returns (controls, state with lane bookkeeping updated).

    lights: (B, K) long LightState. The returned state may re-anchor agents that start a lane change and
    records served stop signs; positions are not changed here (dynamics integrate the controls).
    """
    path = path_info(mb, state, cfg)
    m2 = state.map_id[:, None]
    lane = state.lane.clamp_min(0)
    limit = take(mb.lane_speed_limit, m2, lane)
    v0 = torch.minimum(state.v_des, cfg.speed_limit_factor * limit)
    v0 = torch.where((state.lane >= 0) & ~state.siren, v0, state.v_des)  # sirens may exceed the limit
    override = torch.isfinite(state.speed_override)
    v0 = torch.where(override, state.speed_override, v0)

    g_lead, v_lead, _ = _leaders(state, path, cfg)
    g_stop, stopped_at, stop_here = light_and_stop_gaps(mb, state, path, lights, cfg)
    g_junc = _junction_gaps(mb, state, path, stop_here, cfg)
    g_end = path.path_end - 0.5 * state.length - cfg.stop_margin
    g_fixed = torch.minimum(torch.minimum(g_stop, g_junc), g_end)

    idm = lambda gap, dv: idm_accel(state.speed, v0, gap, dv, state.a_max, state.b_comf,  # noqa: E731
                                    state.headway, state.min_gap, cfg.idm_delta)
    a = torch.minimum(idm(g_lead, state.speed - v_lead), idm(g_fixed, state.speed))
    a = a.clamp(-cfg.max_brake, None)

    # lane changes
    target = _mobil(mb, state, path, a, v0, cfg)
    new_lane, new_s, new_queue, new_offset = _replan_after_change(mb, state, target, state.lane, state.s, state.queue)
    new_queue = refill_queue(mb, state, new_lane, new_queue, salt=1)

    # steering: pure pursuit to the lookahead point, shifted by the decaying lateral offset
    ld = (cfg.lookahead_min + cfg.lookahead_gain * state.speed).clamp(cfg.lookahead_min, cfg.lookahead_max)
    tgt, th = _along_path(path, ld, cfg.path_step)
    # offset of the target: what remains of the lane-change offset when we get there
    remain = (new_offset.abs() - cfg.offset_rate * ld / state.speed.clamp_min(1.0)).clamp_min(0.0)
    off_t = torch.sign(new_offset) * remain
    changed = target >= 0
    if bool(changed.any()):
        # the path samples still describe the old lane; aim at the target lane instead
        tp, tth = lane_pose(mb, m2, new_lane.clamp_min(0), new_s + ld)
        tgt = torch.where(changed[..., None], tp, tgt)
        th = torch.where(changed, tth, th)
    normal = torch.stack([-torch.sin(th), torch.cos(th)], -1)
    tgt = tgt + off_t[..., None] * normal
    d = tgt - state.pos
    c, s = torch.cos(state.yaw), torch.sin(state.yaw)
    lx = c * d[..., 0] + s * d[..., 1]
    ly = -s * d[..., 0] + c * d[..., 1]
    dist = torch.sqrt(lx * lx + ly * ly).clamp_min(0.5)
    steer = torch.atan(2.0 * state.wheelbase * (ly / dist) / dist)

    # pedestrians
    ped = state.is_pedestrian()
    pl, _ = _along_path(path, torch.full_like(state.s, cfg.ped_lookahead), cfg.path_step)
    ped_yaw = torch.atan2(pl[..., 1] - state.pos[..., 1], pl[..., 0] - state.pos[..., 0])
    ped_speed = torch.where(override, state.speed_override, state.v_des)
    ped_speed = torch.where(kerb_wait(mb, state, path, cfg), torch.zeros_like(ped_speed), ped_speed)
    lane_bound = (state.mode == Mode.LANE) & (state.lane >= 0)
    ped_speed = torch.where(lane_bound, torch.minimum(ped_speed, (g_end + 0.5 * state.length).clamp_min(0.0)),
                            ped_speed)

    # FREE agents hold heading; hold freezes
    free = state.mode == Mode.FREE
    a = torch.where(free & ~ped, (v0 - state.speed).clamp(-cfg.max_brake, 3.0), a)
    steer = torch.where(free, torch.zeros_like(steer), steer)
    ped_yaw = torch.where(free | (state.lane < 0), state.yaw, ped_yaw)
    a = torch.where(state.hold, torch.full_like(a, -cfg.max_brake), a)
    ped_speed = torch.where(state.hold, torch.zeros_like(ped_speed), ped_speed)

    wait = torch.where(state.speed < 0.1, state.wait + 0.1, torch.zeros_like(state.wait))
    new_state = state.replace(lane=new_lane, s=new_s, queue=new_queue, offset=new_offset,
                              stopped_at=stopped_at, wait=wait)
    return TrafficControls(accel=a, steer=steer, ped_yaw=ped_yaw, ped_speed=ped_speed), new_state


def kerb_wait(mb: MapBatch, state: WorldState, path: PathInfo, cfg: TrafficConfig) -> torch.Tensor:
    """(B, N) bool: pedestrian at the kerb before a crosswalk that a vehicle would reach too soon."""
    B, N = state.lane.shape
    m2 = state.map_id[:, None]
    nxt = state.queue[..., 0]
    cur_t = take(mb.lane_type, m2, state.lane.clamp_min(0))
    nxt_t = take(mb.lane_type, m2, nxt.clamp_min(0))
    at_kerb = (
        state.is_pedestrian() & (state.mode == Mode.LANE) & (nxt >= 0)
        & (nxt_t == int(LaneType.CROSSWALK)) & (cur_t != int(LaneType.CROSSWALK)) & (path.ends[..., 0] < 1.5)
    )
    if not bool(at_kerb.any()):
        return at_kerb
    mid_pt, _ = lane_pose(mb, m2, nxt.clamp_min(0), 0.5 * take(mb.lane_length, m2, nxt.clamp_min(0)))  # (B, N, 2)
    ri, rj = _row_pairs(at_kerb, state.is_vehicle())
    rel = mid_pt.reshape(-1, 2)[ri] - state.pos.reshape(-1, 2)[rj]
    dist = rel.norm(dim=-1)
    yaw_j, v_j = state.yaw.reshape(-1)[rj], state.speed.reshape(-1)[rj]
    closing = v_j * (rel[:, 0] * torch.cos(yaw_j) + rel[:, 1] * torch.sin(yaw_j)) / dist.clamp_min(0.1)
    ttc = dist / closing.clamp_min(0.1)
    danger = (dist < cfg.ped_cross_radius) & (
        ((closing > 0.5) & (ttc < cfg.ped_cross_ttc)) | ((dist < cfg.ped_cross_near) & (v_j > 0.5)))
    out = torch.zeros(B * N, dtype=torch.bool, device=state.device)
    out[ri[danger]] = True
    return at_kerb & out.view(B, N)


def advance_lanes(mb: MapBatch, prev: WorldState, state: WorldState, cfg: TrafficConfig, dt: float) -> WorldState:
    """After the dynamics moved the agents: advance arc length along the lane path, hop to the next lane,
    refill the queue, decay lane-change offsets. Only lane-following non-ego agents are touched."""
    m2 = state.map_id[:, None]
    follow = (state.mode == Mode.LANE) & (state.lane >= 0) & state.valid & (state.kind != int(AgentKind.EGO))
    lane = state.lane.clamp_min(0)
    # project the new position onto the lane tangent at the old arc length: self-correcting, so the arc
    # length never drifts away from the position (integrating travelled distance would)
    p_s, h = lane_pose(mb, m2, lane, state.s)
    dp = state.pos - p_s
    ds = dp[..., 0] * torch.cos(h) + dp[..., 1] * torch.sin(h)
    s = (state.s + torch.where(follow, ds, torch.zeros_like(ds))).clamp_min(0.0)
    cur, queue = state.lane, state.queue
    for _ in range(2):
        length = take(mb.lane_length, m2, cur.clamp_min(0))
        hop = follow & (s > length) & (queue[..., 0] >= 0)
        s = torch.where(hop, s - length, s)
        cur = torch.where(hop, queue[..., 0], cur)
        shifted = torch.cat([queue[..., 1:], torch.full_like(queue[..., :1], -1)], -1)
        queue = torch.where(hop[..., None], shifted, queue)
    queue = refill_queue(mb, state, cur, queue, salt=2)
    s = torch.minimum(s, take(mb.lane_length, m2, cur.clamp_min(0)))
    off = state.offset
    off = torch.sign(off) * (off.abs() - cfg.offset_rate * dt).clamp_min(0.0)
    stopped_at = torch.where(state.stopped_at == cur, state.stopped_at,
                             torch.where(state.stopped_at == prev.lane, state.stopped_at, torch.full_like(cur, -1)))
    return state.replace(lane=torch.where(follow, cur, state.lane), s=torch.where(follow, s, state.s),
                         queue=torch.where(follow[..., None], queue, state.queue),
                         offset=torch.where(follow, off, state.offset), stopped_at=stopped_at)


__all__ = ["TrafficConfig", "TrafficControls", "traffic_step", "advance_lanes", "idm_accel", "hash_uniform",
           "path_info", "refill_queue", "light_and_stop_gaps", "kerb_wait"]
