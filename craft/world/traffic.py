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

import math
from dataclasses import dataclass

import torch

from craft.world.dynamics import wrap_angle
from craft.world.kinds import AgentKind
from craft.world.map import LaneType, LightState, MapBatch, lane_pose, take
from craft.world.state import QUEUE, Mode, WorldState


@dataclass(frozen=True)
class TrafficConfig:
    """Parameters of the reactive traffic model."""

    path_step: float = 4.0  # spacing of the path samples, m
    path_samples: int = 12  # number of path samples (covers (path_samples-1)*path_step m)
    neighbours: int = 8  # candidate leaders examined per agent
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
    is_conn = (mb.lane_junction >= 0) & mb.lane_valid
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
    length = torch.where(seq_ok, take(mb.lane_length, mid, seq.clamp_min(0)), torch.zeros_like(seq, dtype=torch.float32))
    first = (length[..., 0] - state.s).clamp_min(0.0)
    seg = torch.cat([first[..., None], length[..., 1:]], -1)
    ends = torch.cumsum(seg, -1)
    ends = torch.where(seq_ok, ends, torch.full_like(ends, float("inf")))
    n_ok = seq_ok.sum(-1)
    last_end = torch.gather(torch.cumsum(seg, -1), -1, (n_ok - 1).clamp_min(0)[..., None]).squeeze(-1)
    path_end = torch.where(seq_ok[..., -1], torch.full_like(last_end, float("inf")), last_end)

    d = torch.arange(cfg.path_samples, device=state.device, dtype=torch.float32) * cfg.path_step  # (S,)
    k = (d[None, None, :, None] >= ends[..., None, :]).sum(-1)  # (B, N, S) which path lane
    k = torch.minimum(k, (n_ok - 1).clamp_min(0)[..., None])
    before = torch.cat([torch.zeros_like(ends[..., :1]), torch.cumsum(seg, -1)[..., :-1]], -1)  # (B, N, Q)
    start = torch.gather(before, -1, k)
    lane_k = torch.gather(seq.clamp_min(0), -1, k)
    local = d[None, None, :] - start + torch.where(k == 0, state.s[..., None], torch.zeros_like(start))
    pts, heading = lane_pose(mb, mid, lane_k, local)
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


# ---------------------------------------------------------------------- leaders
def _leaders(state: WorldState, path: PathInfo, cfg: TrafficConfig):
    """Nearest entity in each agent's path corridor: gap (B, N) (inf if none), leader speed (B, N), index."""
    B, N = state.lane.shape
    pos, yaw = state.pos, state.yaw
    rel = pos[:, None, :, :] - pos[:, :, None, :]  # (B, i, j, 2)
    dist = rel.norm(dim=-1)
    fwd = torch.stack([torch.cos(yaw), torch.sin(yaw)], -1)  # (B, N, 2)
    ahead = (rel * fwd[:, :, None, :]).sum(-1) > -0.5 * state.length[:, :, None]
    eye = torch.eye(N, dtype=torch.bool, device=pos.device)[None]
    usable = state.valid[:, None, :] & ~eye & ahead
    usable &= ~((state.kind[:, None, :] == int(AgentKind.EGO)) & ~state.react_ego[:, :, None])
    on_path = (state.lane[:, None, :, None] == path.seq[:, :, None, :]).any(-1) & (state.lane[:, None, :] >= 0)
    score = torch.where(usable, dist - 30.0 * on_path.float(), torch.full_like(dist, float("inf")))
    K = min(cfg.neighbours, N)
    sc, j = torch.topk(score, K, dim=-1, largest=False)  # (B, N, K)
    cand_ok = torch.isfinite(sc)

    gj = lambda x: torch.gather(x[:, None, :].expand(-1, N, -1), 2, j)  # noqa: E731
    pj = torch.gather(pos[:, None, :, :].expand(-1, N, -1, -1), 2, j[..., None].expand(-1, -1, -1, 2))
    a = path.pts[:, :, None, :-1, :]  # (B, N, 1, S-1, 2)
    b = path.pts[:, :, None, 1:, :]
    ab = b - a
    l2 = (ab * ab).sum(-1).clamp_min(1e-6)
    u = (((pj[:, :, :, None, :] - a) * ab).sum(-1) / l2).clamp(0.0, 1.0)  # (B, N, K, S-1)
    proj = a + u[..., None] * ab
    lat = (pj[:, :, :, None, :] - proj).norm(dim=-1)
    lat_min, si = lat.min(-1)  # (B, N, K)
    arc = (si.float() + torch.gather(u, -1, si[..., None]).squeeze(-1)) * cfg.path_step
    seg_h = torch.gather(path.heading[:, :, None, :-1].expand(-1, -1, K, -1), -1, si[..., None]).squeeze(-1)
    phi = gj(yaw) - seg_h
    c, s = torch.cos(phi).abs(), torch.sin(phi).abs()
    lj, wj = gj(state.length), gj(state.width)
    perp = 0.5 * (wj * c + lj * s)
    along = 0.5 * (lj * c + wj * s)
    is_ped = gj(state.kind) == int(AgentKind.PEDESTRIAN)
    margin = cfg.corridor_margin + cfg.pedestrian_margin * is_ped.float()
    inside = lat_min < 0.5 * state.width[..., None] + perp + margin
    gap = arc - along - 0.5 * state.length[..., None]
    # the projection clamps at the path start: exclude entities that are really behind or beside us
    inside &= cand_ok & (arc > 0.05) & (arc < (cfg.path_samples - 1) * cfg.path_step - 0.1)
    gap = torch.where(inside, gap.clamp_min(0.05), torch.full_like(gap, float("inf")))
    g, k = gap.min(-1)
    v_lead = (gj(state.speed) * torch.cos(phi)).clamp_min(0.0)
    v_lead = torch.gather(v_lead, -1, k[..., None]).squeeze(-1)
    leader = torch.gather(j, -1, k[..., None]).squeeze(-1)
    return g, v_lead, torch.where(torch.isfinite(g), leader, torch.full_like(leader, -1))


# ---------------------------------------------------------------------- stop points
def _light_and_stop_gaps(mb: MapBatch, state: WorldState, path: PathInfo, lights, cfg: TrafficConfig):
    """Distance to the nearest stop point from lights and stop signs on the path (inf if none).

    Also returns the updated ``stopped_at`` (stop signs served)."""
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
    # must-stop flag used by junction yielding: the agent is held before its connector
    held = stop_here.any(-1)
    return gap - 0.5 * state.length, stopped_at, held


def _junction_gaps(mb: MapBatch, state: WorldState, path: PathInfo, held: torch.Tensor, cfg: TrafficConfig):
    """Yielding at junctions: distance to the point where each agent must wait (inf if free to go)."""
    B, N, Qn = path.seq.shape
    conn_index, conflict, conflict_s = _connector_tables(mb)
    mid = state.map_id[:, None, None]
    seq = path.seq.clamp_min(0)
    is_conn = (path.seq >= 0) & (take(mb.lane_junction, mid, seq) >= 0)
    # the first connector on the path, among the first three lanes
    is_conn[..., 3:] = False
    has = is_conn.any(-1)
    k = is_conn.float().argmax(-1)  # first True
    c_lane = torch.gather(path.seq, -1, k[..., None]).squeeze(-1)
    inside = has & (k == 0)
    before = torch.cat([torch.zeros_like(path.ends[..., :1]), path.ends[..., :-1]], -1)
    entry = torch.where(inside, torch.zeros_like(state.s), torch.gather(before, -1, k[..., None]).squeeze(-1))
    has &= entry < cfg.junction_lookahead
    m2 = state.map_id[:, None]
    ci = torch.where(has, conn_index[m2, c_lane.clamp_min(0)], torch.full_like(c_lane, -1))
    ok = ci >= 0
    cic = ci.clamp_min(0)
    M = conflict.shape[0]
    # pair tables (B, i, j)
    mm = state.map_id[:, None, None]
    cf = conflict[mm, cic[:, :, None], cic[:, None, :]] & ok[:, :, None] & ok[:, None, :]
    s_ij = conflict_s[mm, cic[:, :, None], cic[:, None, :]]  # conflict point on i's connector
    s_ji = conflict_s[mm, cic[:, None, :], cic[:, :, None]]  # on j's connector
    prog = torch.where(inside, state.s, torch.zeros_like(state.s))
    d_i = entry[:, :, None] + s_ij - prog[:, :, None]
    d_j = entry[:, None, :] + s_ji - prog[:, None, :]
    v = state.speed
    t_i = d_i.clamp_min(0) / v[:, :, None].clamp_min(2.0)
    t_j = d_j.clamp_min(0) / v[:, None, :].clamp_min(0.5)
    prio = torch.where(ok, take(mb.lane_priority, m2, c_lane.clamp_min(0)), torch.zeros_like(c_lane))
    p_i, p_j = prio[:, :, None], prio[:, None, :]
    in_i, in_j = inside[:, :, None], inside[:, None, :]
    idx = torch.arange(N, device=state.device)
    earlier = (t_j < t_i) | ((t_j == t_i) & (idx[None, None, :] < idx[None, :, None]))
    row = (p_j > p_i) | ((p_j == p_i) & ((in_j & ~in_i) | ((in_j == in_i) & earlier)))
    row |= state.ignore_priority[:, None, :]
    row &= ~held[:, None, :] | in_j
    vehicle = state.is_vehicle()
    other_ok = vehicle[:, None, :] & ~((state.kind[:, None, :] == int(AgentKind.EGO)) & ~state.react_ego[:, :, None])
    not_passed_j = d_j > -(0.5 * state.length[:, None, :] + 1.0)
    not_passed_i = d_i > -0.5 * state.length[:, :, None]
    must = cf & row & other_ok & not_passed_j & not_passed_i & (t_j < t_i + cfg.gap_time) & (d_j < 60.0)
    eye = torch.eye(N, dtype=torch.bool, device=state.device)[None]
    must &= ~eye
    yield_ = must.any(-1)
    can_stop = entry > v * v / (2.0 * cfg.max_brake)
    committed = (inside & (state.s > cfg.commit_dist)) | (~inside & ~can_stop)
    yield_ &= ~committed & ~state.ignore_priority & ok
    # wait at the entry (before) or before the first conflict point (inside)
    d_conf = torch.where(must, d_i, torch.full_like(d_i, float("inf"))).min(-1).values
    wait_at = torch.where(inside, d_conf - 2.0, entry - cfg.stop_margin)
    gap = torch.where(yield_, wait_at - 0.5 * state.length, torch.full_like(wait_at, float("inf")))
    del M
    return gap


# ---------------------------------------------------------------------- lane changes (MOBIL)
def _mobil(mb: MapBatch, state: WorldState, path: PathInfo, a_cur: torch.Tensor, v0: torch.Tensor, cfg: TrafficConfig):
    """Lane-change decisions: returns target lane (B, N) (-1: stay)."""
    B, N = state.lane.shape
    m2 = state.map_id[:, None]
    lane = state.lane.clamp_min(0)
    idx = torch.arange(N, device=state.device)
    due = ((state.step[:, None] + idx[None, :]) % cfg.mobil_every) == 0
    base = (
        due & (state.mode == Mode.LANE) & state.lane_changes & state.is_vehicle()
        & (state.kind != int(AgentKind.EGO)) & (state.lane >= 0) & (state.offset.abs() < 0.3)
        & (take(mb.lane_junction, m2, lane) < 0) & ~state.hold
    )
    room = (path.ends[..., 0] > cfg.lane_change_clearance)
    base &= room
    if not bool(base.any()):
        return torch.full_like(state.lane, -1)
    lane_ends = (take(mb.lane_succ, m2, lane) < 0).all(-1)  # no successor: must leave this lane
    best_gain = torch.full_like(state.s, -float("inf"))
    target = torch.full_like(state.lane, -1)
    same_lane_j = state.lane[:, None, :]
    ds = state.s[:, None, :] - state.s[:, :, None]  # s_j - s_i (B, i, j), meaningful on parallel lanes
    len_ij = 0.5 * (state.length[:, :, None] + state.length[:, None, :])
    obstacle = state.valid[:, None, :] & (idx[None, None, :] != idx[None, :, None])
    for side, bias in ((mb.lane_left, -cfg.mobil_keep_right), (mb.lane_right, cfg.mobil_keep_right)):
        tl = side[m2, lane]
        tl_ok = base & (tl >= 0)
        tl_ok &= take(mb.lane_type, m2, tl.clamp_min(0)) == int(LaneType.DRIVING)
        if not bool(tl_ok.any()):
            continue
        on_t = (same_lane_j == tl[:, :, None]) & obstacle
        ahead = on_t & (ds > 0)
        behind = on_t & (ds <= 0)
        gap_a = torch.where(ahead, ds - len_ij, torch.full_like(ds, float("inf")))
        g_lead, j_lead = gap_a.min(-1)
        gap_b = torch.where(behind, -ds - len_ij, torch.full_like(ds, float("inf")))
        g_fol, j_fol = gap_b.min(-1)
        v_lead = torch.gather(state.speed, 1, j_lead)
        v_fol = torch.gather(state.speed, 1, j_fol)
        has_fol = torch.isfinite(g_fol)
        p = lambda x: torch.gather(x, 1, j_fol)  # noqa: E731
        v0_fol = torch.gather(v0, 1, j_fol)
        a_new = idm_accel(state.speed, v0, g_lead, state.speed - v_lead, state.a_max, state.b_comf,
                          state.headway, state.min_gap, cfg.idm_delta)
        a_fol_new = idm_accel(v_fol, v0_fol, g_fol, v_fol - state.speed, p(state.a_max), p(state.b_comf),
                              p(state.headway), p(state.min_gap), cfg.idm_delta)
        gap_fl = g_lead + g_fol + state.length
        a_fol_old = idm_accel(v_fol, v0_fol, gap_fl, v_fol - v_lead, p(state.a_max), p(state.b_comf),
                              p(state.headway), p(state.min_gap), cfg.idm_delta)
        safe = (g_lead > 1.0) & (~has_fol | ((g_fol > 1.0) & (a_fol_new > -cfg.mobil_safe_brake)))
        gain = a_new - a_cur + state.politeness * torch.where(has_fol, a_fol_new - a_fol_old, torch.zeros_like(a_new))
        gain = gain + bias + 5.0 * lane_ends.float()
        want = tl_ok & safe & (gain > cfg.mobil_threshold) & (gain > best_gain)
        target = torch.where(want, tl, target)
        best_gain = torch.where(want, gain, best_gain)
    return target


# ---------------------------------------------------------------------- queue maintenance
def refill_queue(mb: MapBatch, state: WorldState, lane: torch.Tensor, queue: torch.Tensor, salt: int):
    """Fill -1 slots of ``queue (B, N, QUEUE)`` with random successors, lane by lane."""
    m2 = state.map_id[:, None]
    idx = torch.arange(lane.shape[1], device=lane.device)[None, :].expand_as(lane)
    prev = lane
    out = []
    for q in range(QUEUE):
        cur = queue[..., q]
        succ = take(mb.lane_succ, m2, prev.clamp_min(0))  # (B, N, S)
        n = (succ >= 0).sum(-1)
        u = hash_uniform(state.seed, state.step, idx * 8 + q, salt)
        pick = (u * n.float()).floor().long().clamp(max=(n - 1).clamp_min(0))
        choice = torch.gather(succ, -1, pick[..., None]).squeeze(-1)
        choice = torch.where((prev >= 0) & (n > 0), choice, torch.full_like(choice, -1))
        cur = torch.where(cur >= 0, cur, choice)
        out.append(cur)
        prev = cur
    return torch.stack(out, -1)


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
    v0 = torch.where(state.lane >= 0, v0, state.v_des)
    override = torch.isfinite(state.speed_override)
    v0 = torch.where(override, state.speed_override, v0)

    g_lead, v_lead, _ = _leaders(state, path, cfg)
    g_stop, stopped_at, held = _light_and_stop_gaps(mb, state, path, lights, cfg)
    g_junc = _junction_gaps(mb, state, path, held, cfg)
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
    ped_speed = torch.where(_kerb_wait(mb, state, path, cfg), torch.zeros_like(ped_speed), ped_speed)
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


def _kerb_wait(mb: MapBatch, state: WorldState, path: PathInfo, cfg: TrafficConfig) -> torch.Tensor:
    """(B, N) bool: pedestrian at the kerb before a crosswalk that a vehicle would reach too soon."""
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
    veh = state.is_vehicle()
    rel = mid_pt[:, :, None, :] - state.pos[:, None, :, :]  # (B, ped, veh, 2)
    dist = rel.norm(dim=-1)
    vel = state.speed[..., None] * torch.stack([torch.cos(state.yaw), torch.sin(state.yaw)], -1)
    closing = (rel * vel[:, None, :, :]).sum(-1) / dist.clamp_min(0.1)
    ttc = dist / closing.clamp_min(0.1)
    danger = veh[:, None, :] & (dist < cfg.ped_cross_radius) & (
        ((closing > 0.5) & (ttc < cfg.ped_cross_ttc)) | ((dist < cfg.ped_cross_near) & (state.speed[:, None, :] > 0.5))
    )
    return at_kerb & danger.any(-1)


def advance_lanes(mb: MapBatch, prev: WorldState, state: WorldState, cfg: TrafficConfig, dt: float) -> WorldState:
    """After the dynamics moved the agents: advance arc length along the lane path, hop to the next lane,
    refill the queue, decay lane-change offsets. Only lane-following non-ego agents are touched."""
    m2 = state.map_id[:, None]
    follow = (state.mode == Mode.LANE) & (state.lane >= 0) & state.valid & (state.kind != int(AgentKind.EGO))
    lane = state.lane.clamp_min(0)
    _, h = lane_pose(mb, m2, lane, state.s)
    dp = state.pos - prev.pos
    ds = (dp[..., 0] * torch.cos(h) + dp[..., 1] * torch.sin(h)).clamp_min(0.0)
    s = state.s + torch.where(follow, ds, torch.zeros_like(ds))
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


def wrap(a):
    return wrap_angle(a)


__all__ = ["TrafficConfig", "TrafficControls", "traffic_step", "advance_lanes", "idm_accel", "hash_uniform",
           "path_info", "refill_queue", "math"]
