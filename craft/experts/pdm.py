"""A PDM-Lite-like privileged rule-based expert.

Each call of :meth:`PrivilegedExpert.plan` (batched over worlds; no Python loops over worlds, agents or
proposals) does:

1. **Paths.** The route centreline ahead of the ego, sampled every ``path_step`` m, shifted laterally (Frenet
   offset d(s) along the route normal): path 0 keeps the ego's current offset (stop profiles live there),
   then small nudges (``offsets``) and a full lane width to the left / right (a lane change into the
   same-direction neighbour, or into the opposite-direction lane ``left_opposite`` for two-way overtakes;
   which one it is follows from the lanes found under the path). Every path starts at the ego's current
   offset and slope and blends (cubic Hermite) to its target over ``ramp_min + ramp_time * v`` m (shorter
   for small shifts), so the target-0 path is the "return to the route" manoeuvre after an overtake.
2. **Stop points** along the route: red lights (and yellow when the line can be reached braking at most
   ``yellow_decel``), stop signs not yet served (the ego stops with its centre in the trigger area until
   the world's ``stop_ok`` flag is set, then goes), junction yielding (a conflicting vehicle with the right
   of way, not held by its own light / stop sign, reaching the conflict point within ``gap_time`` of the
   ego: the ego waits at the connector entry).
3. **Speed proposals** per path: IDM with several desired speeds (``speed_factors`` x speed limit, capped by
   a curvature speed limit), the leader being the nearest agent inside that path's corridor (agents
   projected once into the route frame), plus a comfortable and a hard braking profile.
4. **Forecast** of other agents over ``sim_steps * sim_dt`` s: lane-following agents move along their lane
   path (:func:`craft.world.traffic.path_info`) at their current speed (decelerating if braking), stopping
   at their red lights / stop lines; pedestrians waiting at a kerb stay; others keep heading and speed
   (scripted FREE agents, e.g. a pedestrian stepping out, at least their target ``speed_override``).
5. **Score** (PDM style): hard gates (no at-fault collision with the forecast -- rear-end hits on a ego that
   keeps its lateral offset are not at fault --, drivable area, no red-light / stop-sign / yield
   violation, no opposite-lane proposal heading into oncoming traffic or stopping there, no full lane change
   onto a shoulder / parking lane beside a driving route, no lane change across to the other side while an
   overtake is under way) times a weighted
   average of progress, time-to-collision, comfort and lane keeping, times ``opposite_factor`` for
   proposals using an opposite-direction lane while the route lane is not blocked. The best proposal wins;
   when none passes the gates, the one whose first at-fault collision is latest (braking hardest) is used.
6. **Emergency vehicles** with a siren approaching from behind: desired speeds are scaled down, right-hand
   positions are rewarded instead of lane keeping, left moves penalised.

The result is a ``(B, horizon, 3)`` ego-frame trajectory at ``waypoint_dt`` spacing (the format policies
emit), executed by :class:`craft.world.autopilot.PlanExecutor`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from craft.world.collision import boxes_overlap, candidate_collisions
from craft.world.dynamics import wrap_angle
from craft.world.kinds import AgentKind
from craft.world.map import DRIVABLE, LaneType, LightState, grid_cell, lane_pose, take
from craft.world.state import Mode, WorldState
from craft.world.tracker import world_to_ego
from craft.world.traffic import TrafficConfig, kerb_wait, light_and_stop_gaps, idm_accel, path_info

__all__ = ["ExpertConfig", "ExpertDebug", "PrivilegedExpert"]

_INF = float("inf")


@dataclass(frozen=True)
class ExpertConfig:
    """Parameters of :class:`PrivilegedExpert`."""

    horizon: int = 6
    """Number of output waypoints."""
    waypoint_dt: float = 0.5
    """Time between output waypoints, s."""
    sim_dt: float = 0.25
    """Time step of the internal proposal simulation and forecast, s."""
    sim_steps: int = 20
    """Number of internal simulation steps (sim_steps * sim_dt is the scoring horizon, s)."""
    path_step: float = 1.0
    """Spacing of path samples, m."""
    path_length: float = 110.0
    """Length of the sampled paths ahead of the ego, m."""
    check_every: int = 4
    """Drivable / direction checks use every check_every-th path sample."""
    offsets: tuple = (0.0, 0.6, -0.6, 1.2, -1.2)
    """Lateral nudges of the route centreline, m (left positive)."""
    lane_changes: bool = True
    """Also propose a full lane width to the left (same-direction or opposite lane) and to the right."""
    ramp_min: float = 8.0
    """Shortest distance over which a path blends to its lateral target, m."""
    ramp_time: float = 1.2
    """The blend distance grows with speed by this many seconds, s."""
    speed_factors: tuple = (1.0, 0.75, 0.5, 0.25)
    """Desired speeds of the IDM proposals as fractions of the speed limit."""
    comfort_brake: float = 3.0
    """Deceleration of the comfortable stop profile, m/s^2."""
    hard_brake: float = 7.0
    """Deceleration of the hard stop profile, m/s^2."""
    a_max: float = 2.0
    """IDM maximum acceleration, m/s^2."""
    b_comf: float = 3.0
    """IDM comfortable deceleration, m/s^2."""
    headway: float = 1.2
    """IDM time headway, s."""
    min_gap: float = 2.0
    """IDM jam distance (bumper to bumper, or to the ego's resting point at stop lines), m."""
    max_brake: float = 8.0
    """Hardest deceleration an IDM proposal may use, m/s^2."""
    lead_gap: float = 1.5
    """Extra distance kept behind a leader's rear, m."""
    still_gap: float = 5.5
    """Further extra distance kept behind a standing leader (room to steer around it), m."""
    lat_accel: float = 2.0
    """Lateral acceleration setting the curve speed limit, m/s^2."""
    curve_decel: float = 2.0
    """Deceleration used to slow down before curves, m/s^2."""
    corridor_margin: float = 0.35
    """Extra lateral clearance of a path corridor when looking for leaders, m."""
    pedestrian_margin: float = 0.8
    """Extra lateral clearance kept from pedestrians, m."""
    light_margin: float = 1.0
    """The ego's front stops this far before a red light's stop line, m."""
    stop_sign_back: float = 2.5
    """The ego's centre stops this far before a stop sign's line (inside its trigger area), m."""
    yellow_decel: float = 5.0
    """A yellow light is stopped for when the line can be reached braking at most this hard, m/s^2."""
    gap_time: float = 3.0
    """Junction yielding: accepted time gap to a vehicle with the right of way at the conflict point, s."""
    swept_factor: float = 1.0
    """Other agents' boxes are lengthened by this times the distance they cover in one sim step (collision
    checks at sim_dt spacing would otherwise miss fast crossing traffic)."""
    follower_cos: float = 0.7
    """A hit from behind is not the ego's fault only when the other heads within acos(this) of the ego's heading
    (a follower); a crossing vehicle reaching the ego's rear quarter is avoided by braking."""
    junction_lookahead: float = 45.0
    """Junction connectors farther ahead than this are ignored for yielding, m."""
    commit_dist: float = 2.0
    """Inside a connector beyond this the ego no longer yields, m."""
    forecast_path_samples: int = 24
    """Lane-path samples (5 m apart) used to forecast lane-following agents."""
    ttc_time: float = 1.0
    """Time-to-collision check: the ego box is stretched this many seconds ahead at its speed, s."""
    w_progress: float = 5.0
    """Weight of the progress sub-score."""
    w_ttc: float = 5.0
    """Weight of the time-to-collision sub-score."""
    w_comfort: float = 2.0
    """Weight of the comfort sub-score."""
    w_lane: float = 2.0
    """Weight of the lane-keeping (distance to the route centre) sub-score."""
    lane_scale: float = 3.5
    """Mean lateral distance from the route at which the lane-keeping sub-score reaches 0, m."""
    opposite_factor: float = 0.5
    """Score multiplier of proposals that use an opposite-direction lane (1 while the route lane is blocked)."""
    blocked_wait: float = 8.0
    """A vehicle standing this long ahead (away from stop points) blocks the lane like a static object, s."""
    progress_floor: float = 5.0
    """Progress is normalised by max(best progress, this), m."""
    comfort_accel: tuple = (-4.0, 2.4)
    """Comfortable longitudinal acceleration range, m/s^2."""
    comfort_jerk: float = 4.0
    """Comfortable longitudinal jerk bound, m/s^3."""
    comfort_lat: float = 4.0
    """Comfortable lateral acceleration bound, m/s^2."""
    emergency_radius: float = 50.0
    """Emergency vehicles with a siren within this distance behind the ego make it move aside, m."""
    emergency_speed_factor: float = 0.4
    """Desired speeds are scaled by this while an emergency vehicle approaches from behind."""
    emergency_bonus: float = 1.25
    """Score multiplier of right-hand, slow proposals while an emergency vehicle approaches."""


@dataclass
class ExpertDebug:
    """Per-proposal details of the last plan (for renderers / analysis). ``G`` proposals."""

    traj_world: torch.Tensor  # (B, G, sim_steps, 3) world-frame proposal poses at sim_dt spacing
    score: torch.Tensor  # (B, G) final score (0 where a gate failed)
    gates: torch.Tensor  # (B, G) bool, every hard gate passed
    collision_step: torch.Tensor  # (B, G) long, first at-fault collision step (sim_steps if none)
    progress: torch.Tensor  # (B, G) metres along the path at the horizon
    path_offset: torch.Tensor  # (B, G) target lateral offset of the proposal's path, m
    speed_variant: torch.Tensor  # (G,) long, speed profile: i < len(speed_factors) IDM, then comfort stop, hard stop
    chosen: torch.Tensor  # (B,) long, index of the chosen proposal
    stop_dist: torch.Tensor  # (B,) distance to the nearest stop point (light / sign / yield / route end), m


def _interp1(xs: torch.Tensor, ys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ys (..., S) given at increasing xs (..., S) at x (..., M); held past the ends."""
    S = xs.shape[-1]
    j = torch.searchsorted(xs.contiguous(), x.contiguous()).clamp(1, S - 1)
    x0, x1 = torch.gather(xs, -1, j - 1), torch.gather(xs, -1, j)
    w = ((x - x0) / (x1 - x0).clamp_min(1e-6)).clamp(0.0, 1.0)
    return torch.gather(ys, -1, j - 1) * (1 - w) + torch.gather(ys, -1, j) * w


class PrivilegedExpert:
    """Privileged rule-based planner: ``plan(world, state) -> (B, horizon, 3)`` ego-frame trajectory."""

    def __init__(self, cfg: ExpertConfig = ExpertConfig()):
        self.cfg = cfg
        self.last_debug: ExpertDebug | None = None

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def plan(self, world, state: WorldState, debug: bool = False) -> torch.Tensor:
        """Plan every world; returns ``traj (B, horizon, 3)`` in the ego frame (x forward, y left, yaw)."""
        cfg = self.cfg
        mb = world.maps
        dev = state.device
        B, N = state.batch_size, state.num_agents
        lights = world.lights(state)
        ego_p, ego_yaw, ego_v = state.pos[:, 0], state.yaw[:, 0], state.speed[:, 0]
        L0, W0 = state.length[:, 0], state.width[:, 0]
        m1 = state.map_id

        # ---------------- 1. the route centreline ahead
        s_ego, d0, i0 = self._project_on_route(state)
        S = int(cfg.path_length / cfg.path_step) + 1
        ks = torch.arange(S, device=dev, dtype=torch.float32) * cfg.path_step
        c_pts, c_tan = self._route_at(state, s_ego[:, None] + ks[None, :])  # (B, S, 2), (B, S, 2)
        c_nrm = torch.stack([-c_tan[..., 1], c_tan[..., 0]], -1)
        c_head = torch.atan2(c_tan[..., 1], c_tan[..., 0])

        # speed limit and curvature speed limit along the centreline
        lane0 = torch.where(state.lane[:, 0] >= 0, state.lane[:, 0],
                            torch.gather(state.route_lanes, 1, state.route_idx[:, None]).squeeze(1)).clamp_min(0)
        v_limit = take(mb.lane_speed_limit, m1, lane0)  # (B,)
        dh = wrap_angle(c_head[:, 4:] - c_head[:, :-4]).abs() / (4 * cfg.path_step)  # (B, S-4)
        kappa = torch.cat([dh[:, :1].expand(-1, 2), dh, dh[:, -1:].expand(-1, 2)], 1)
        kappa = torch.nn.functional.max_pool1d(kappa[:, None], 5, 1, 2)[:, 0]
        v_curve = torch.sqrt(cfg.lat_accel / kappa.clamp_min(1e-4))
        sub = slice(None, None, 2)
        vc2, ks2 = v_curve[:, sub], ks[sub]
        ahead = (ks2[None, :] - ks2[:, None])  # (S2, S2): s' - s
        reach = torch.sqrt(vc2[:, None, :] ** 2 + 2 * cfg.curve_decel * ahead.clamp_min(0)[None])
        reach = torch.where((ahead >= 0)[None], reach, torch.full_like(reach, _INF))
        v_allow = torch.minimum(reach.amin(-1), v_limit[:, None])  # (B, S2) at ks2

        # ---------------- lateral targets of the paths
        lw = take(mb.lane_width, m1, lane0)
        # path 0 keeps the current lateral offset (stop profiles live there), then the nudges, then lane changes
        targets = [d0] + [torch.full((B,), float(o), device=dev) for o in cfg.offsets]
        if cfg.lane_changes:
            targets += [lw, -lw]
        D = torch.stack(targets, 1)  # (B, Gp)
        Gp = D.shape[1]
        # cubic Hermite blend from (d0, current slope) to (D, 0) over a ramp that grows with speed and with the
        # lateral distance still to cover
        herr = wrap_angle(ego_yaw - c_head[:, 0]).clamp(-0.6, 0.6)
        m0 = torch.tan(herr)[:, None, None]
        span = ((D - d0[:, None]).abs() / 3.5).clamp(0.25, 1.0).sqrt()
        ramp = ((cfg.ramp_min + cfg.ramp_time * ego_v)[:, None] * span)[..., None]  # (B, Gp, 1)
        u = (ks[None, None, :] / ramp).clamp(0.0, 1.0)
        h00, h10, h01 = 2 * u**3 - 3 * u**2 + 1, u**3 - 2 * u**2 + u, -2 * u**3 + 3 * u**2
        d_path = h00 * d0[:, None, None] + h10 * ramp * m0 + h01 * D[..., None]  # (B, Gp, S)
        d_path = torch.where(u >= 1.0, D[..., None].expand_as(d_path), d_path)
        p_pts = c_pts[:, None] + d_path[..., None] * c_nrm[:, None]  # (B, Gp, S, 2)
        seg = p_pts[:, :, 1:] - p_pts[:, :, :-1]
        seg_len = seg.norm(dim=-1)
        p_cum = torch.cat([torch.zeros_like(seg_len[..., :1]), torch.cumsum(seg_len, -1)], -1)  # (B, Gp, S)
        p_head = torch.atan2(seg[..., 1], seg[..., 0])
        p_head = torch.cat([p_head, p_head[..., -1:]], -1)

        # ---------------- drivable area and driving direction along each path
        ce = cfg.check_every
        drv, opp, on_drive = self._lane_checks(mb, m1, c_pts[:, ::ce], c_nrm[:, ::ce], d_path[:, :, ::ce],
                                               p_head[:, :, ::ce], with_driving=True)  # (B, Gp, Sq) bool each
        q_s = p_cum[:, :, ::ce]  # arc length of the check samples

        # ---------------- 2. stop points along the route (distance of the ego centre's resting point)
        stop_s = self._stop_points(world, state, lights, s_ego, i0)  # (B,) incl. route end, lights, signs
        yield_s = self._junction_yield(world, state, lights, s_ego, i0)  # (B,)

        # ---------------- 4. forecast of the other agents
        H = cfg.sim_steps
        f_pos, f_yaw, f_valid = self._forecast(world, state, lights)  # (B, H, N, 2), (B, H, N), (B, H, N)

        # ---------------- leaders in each path corridor (current positions)
        oth = state.valid.clone()
        oth[:, 0] = False
        # agents overlapping the ego right now are ignored (we cannot undo a contact)
        now_hit = boxes_overlap(ego_p[:, None], ego_yaw[:, None], L0[:, None], W0[:, None], state.pos, state.yaw,
                                state.length, state.width) & oth
        oth &= ~now_hit
        f_valid = f_valid & oth[:, None]
        lead_s, lead_v, lead_i = self._leaders(state, oth, c_pts, c_head, ks, d_path)
        # the route lane is blocked: the centre path's leader is a static object, or a vehicle standing
        # for a while away from any stop point ahead (not a queue at a light / junction)
        li = lead_i[:, 0].clamp_min(0)
        bi = torch.arange(B, device=dev)
        l_static = (state.kind[bi, li] == int(AgentKind.STATIC)) | (state.mode[bi, li] == Mode.STATIC)
        l_stuck = (state.speed[bi, li] < 0.5) & (state.wait[bi, li] > cfg.blocked_wait)
        far_from_stop = torch.minimum(stop_s, yield_s) > lead_s[:, 0] + 25.0
        blocked = (lead_i[:, 0] >= 0) & (l_static | (l_stuck & far_from_stop)) & (lead_s[:, 0] < 40.0)

        # ---------------- 3. speed profiles (IDM variants + stop profiles), simulated
        F = len(cfg.speed_factors)
        tf = lambda x: torch.tensor(float(x), device=dev)  # noqa: E731
        a_max, b_comf, headway, min_gap = tf(cfg.a_max), tf(cfg.b_comf), tf(cfg.headway), tf(cfg.min_gap)
        fac = torch.tensor(cfg.speed_factors, device=dev, dtype=torch.float32)
        # emergency vehicle approaching from behind: slow down (and move right, see the scoring) to let it pass
        ev = self._emergency_behind(state, ego_p, ego_yaw)  # (B,)
        v_cap = torch.where(ev, cfg.emergency_speed_factor, 1.0) * v_limit
        v_des = v_cap[:, None, None] * fac[None, None, :]  # (B, 1, F)
        fixed = torch.minimum(stop_s, yield_s)[:, None, None]  # (B, 1, 1)
        ls = lead_s[..., None]
        lv = lead_v[..., None]
        s = torch.zeros(B, Gp, F + 2, device=dev)
        v = ego_v[:, None, None].expand(B, Gp, F + 2).clone()
        brake = torch.tensor([cfg.comfort_brake, cfg.hard_brake], device=dev)
        s_hist, v_hist, a_hist = [], [], []
        dt = cfg.sim_dt
        for h in range(H):
            si, vi = s[..., :F], v[..., :F]
            idx = (si / (2 * cfg.path_step)).long().clamp(0, v_allow.shape[1] - 1)
            v0 = torch.minimum(v_des, torch.gather(v_allow, 1, idx.view(B, -1)).view(B, Gp, F))
            a_lead = idm_accel(vi, v0, ls + lv * (h * dt) - si + cfg.min_gap, vi - lv, a_max, b_comf, headway,
                               min_gap)
            a_fix = idm_accel(vi, v0, fixed - si + cfg.min_gap, vi, a_max, b_comf, headway, min_gap)
            a_idm = torch.minimum(a_lead, a_fix).clamp(-cfg.max_brake, cfg.a_max)
            a_stop = -brake.expand(B, Gp, 2)
            a = torch.cat([a_idm, a_stop], -1)
            a = torch.maximum(a, -v / dt)  # do not reverse
            vn = (v + a * dt).clamp_min(0.0)
            s = s + 0.5 * (v + vn) * dt
            v = vn
            s_hist.append(s)
            v_hist.append(v)
            a_hist.append(a)
        s_t = torch.stack(s_hist, -1)  # (B, Gp, Fv, H)
        v_t = torch.stack(v_hist, -1)
        a_t = torch.stack(a_hist, -1)
        Fv = F + 2
        G = Gp * Fv

        # poses of every proposal at every simulated step
        s_flat = s_t.reshape(B, Gp, Fv * H)
        px = _interp1(p_cum, p_pts[..., 0], s_flat)
        py = _interp1(p_cum, p_pts[..., 1], s_flat)
        hx = _interp1(p_cum, torch.cos(p_head), s_flat)
        hy = _interp1(p_cum, torch.sin(p_head), s_flat)
        pyaw = torch.atan2(hy, hx)
        # a stopped proposal keeps the ego's current heading at the start
        pos_g = torch.stack([px, py], -1).view(B, G, H, 2)
        yaw_g = pyaw.view(B, G, H)
        d_at = _interp1(p_cum, d_path, s_flat).view(B, G, H)

        # ---------------- 5. scoring
        # every other box is stretched along its heading by the distance it covers in one sim step, so a fast
        # crossing vehicle cannot pass between two samples (a 16.7 m/s adversary moves 4 m per 0.25 s step)
        swept = state.length + state.speed * cfg.sim_dt * cfg.swept_factor
        hits = candidate_collisions(pos_g, yaw_g, L0, W0, f_pos, f_yaw, swept, state.width, f_valid)
        moving = (v_t.reshape(B, G, H) > 0.3)
        lat_move = (D[..., None] - d0[:, None, None]).abs().expand(B, Gp, Fv).reshape(B, G) > 0.4
        # other's position in the ego proposal frame: behind the ego = rear-ended (not at fault) unless we
        # were moving sideways into it
        static = state.kind == int(AgentKind.STATIC)

        def behind_of(hb, hg, hh, hn):
            """Whether the other of each hit is a follower: behind the proposal's ego box centre and heading the
            same way (a crossing vehicle that would hit the ego's rear quarter is not; braking avoids it)
            (sparse over hits)."""
            rel = f_pos[hb, hh, hn] - pos_g[hb, hg, hh]
            yw = yaw_g[hb, hg, hh]
            along = torch.cos(f_yaw[hb, hh, hn] - yw) > cfg.follower_cos
            return (rel[:, 0] * torch.cos(yw) + rel[:, 1] * torch.sin(yw) < -0.25 * L0[hb]) & along

        # at fault: the ego moves, and the other was not behind it at first contact (being rear-ended; the
        # forecast lets such a follower drive through the ego afterwards) unless we moved sideways
        hb, hg, hh, hn = hits.nonzero(as_tuple=True)
        pair = (hb * G + hg) * N + hn
        first = torch.full((B * G * N,), H, dtype=torch.long, device=dev)
        first.scatter_reduce_(0, pair, hh, "amin")
        at_first = hh == first[pair]
        rear = torch.zeros(B * G * N, dtype=torch.bool, device=dev)
        rear[pair[at_first]] = behind_of(hb[at_first], hg[at_first], hh[at_first], hn[at_first])
        f_h = moving[hb, hg, hh] & (~rear[pair] | lat_move[hb, hg] | static[hb, hn])
        any_fault = torch.zeros(B, G, H, dtype=torch.bool, device=dev)
        any_fault[hb[f_h], hg[f_h], hh[f_h]] = True
        col_ok = ~any_fault.any(-1)
        col_step = torch.where(col_ok, torch.full_like(col_ok, H, dtype=torch.long),
                               any_fault.to(torch.uint8).argmax(-1))

        # time-to-collision: the ego box stretched ahead by its speed * ttc_time
        ext = (v_t.reshape(B, G, H) * cfg.ttc_time)
        fwd = torch.stack([torch.cos(yaw_g), torch.sin(yaw_g)], -1)
        # candidate_collisions wants one ego length per world: use the stretch of the current speed
        stretch = (ego_v * cfg.ttc_time).clamp_min(0.5)
        pos_ttc = pos_g + fwd * (0.5 * torch.minimum(ext, stretch[:, None, None]))[..., None]
        hits_ttc = candidate_collisions(pos_ttc, yaw_g, L0 + stretch, W0, f_pos, f_yaw, state.length, state.width,
                                        f_valid)
        # only agents already ahead of the ego's front count (not those beside it that we are passing)
        rel0 = state.pos - ego_p[:, None]
        x0 = rel0[..., 0] * torch.cos(ego_yaw)[:, None] + rel0[..., 1] * torch.sin(ego_yaw)[:, None]
        ahead0 = x0 > 0.5 * L0[:, None]
        hb, hg, hh, hn = hits_ttc.nonzero(as_tuple=True)
        f_h = moving[hb, hg, hh] & (ext[hb, hg, hh] > 0.5) & ahead0[hb, hn] & ~behind_of(hb, hg, hh, hn)
        ttc_bad = torch.zeros(B, G, dtype=torch.bool, device=dev)
        ttc_bad[hb[f_h], hg[f_h]] = True
        ttc_ok = ~ttc_bad

        prog = s_t[..., -1].reshape(B, G)
        # drivable / direction along the travelled part of each path
        trav = q_s[:, :, None, :] <= s_t[..., -1:].clamp_min(3.0) + 0.5 * L0[:, None, None, None]  # (B,Gp,Fv,Sq)
        checked = trav & (q_s[:, :, None, :] > 2.0)
        drv_ok = ~(checked & ~drv[:, :, None]).any(-1)
        opp_m = (checked & opp[:, :, None]).float().sum(-1) * (cfg.check_every * cfg.path_step)
        drv_ok = drv_ok.reshape(B, G)
        opp_m = opp_m.reshape(B, G)
        # never pass a red light / unserved stop sign / yield point (IDM profiles respect them; nudged paths
        # and stop profiles do too, this gate guards the rest)
        rule_ok = prog <= fixed.view(B, 1) + 1.0 + cfg.min_gap

        comf_a = (a_t >= cfg.comfort_accel[0]) & (a_t <= cfg.comfort_accel[1])
        jerk = (a_t[..., 1:] - a_t[..., :-1]).abs() / dt
        comf = comf_a.all(-1) & (jerk <= cfg.comfort_jerk).all(-1)
        comfort = comf.reshape(B, G).float()
        lane_keep = (1.0 - d_at.abs().mean(-1) / cfg.lane_scale).clamp(0.0, 1.0)
        # an emergency vehicle approaching from behind: being to the right is what counts
        lane_keep = torch.where(ev[:, None], (-d_at.mean(-1) / cfg.lane_scale).clamp(0.0, 1.0), lane_keep)

        # an opposite-lane proposal must not head into oncoming traffic nor stop in the opposite lane
        lj = lead_i.clamp_min(0)
        lead_oncoming = (lead_i >= 0) & (torch.cos(torch.gather(state.yaw, 1, lj) - ego_yaw[:, None]) < 0) & \
            (torch.gather(state.kind, 1, lj) != int(AgentKind.STATIC))
        lead_oncoming = lead_oncoming[..., None].expand(B, Gp, Fv).reshape(B, G)
        opp_ok = (opp_m <= 0.5) | (~lead_oncoming & (v_t[..., -1].reshape(B, G) > 1.0))
        # stop profiles only on the path keeping the current offset (no steering while braking)
        variant = torch.arange(Fv, device=dev).repeat(Gp)  # (G,)
        path_of = torch.arange(Gp, device=dev).repeat_interleave(Fv)
        stop_ok = ((variant < F) | (path_of == 0))[None].expand(B, G)
        # a full lane change leaving the driving lanes (onto a shoulder / parking lane beside the route, where
        # the route lane itself is a driving lane) is no overtaking manoeuvre: it ran into the narrowing
        # shoulder beside an accident and got stuck there
        shoulder = checked & drv[:, :, None] & ~on_drive[:, :, None] & on_drive[:, 1:2, None]  # (B,Gp,Fv,Sq)
        shoulder_m = shoulder.float().sum(-1).reshape(B, G) * (cfg.check_every * cfg.path_step)
        full_lc = (D.abs() > 0.5 * lw[:, None])
        full_lc[:, 0] = False  # keeping the current offset (and the stop profiles there) is always allowed
        full_lc = full_lc[..., None].expand(B, Gp, Fv).reshape(B, G)
        side_ok = ~(full_lc & (shoulder_m > 2.0 * cfg.check_every * cfg.path_step))
        # no swerving across: once the ego has moved off the route centre to one side (an overtake under way),
        # a full lane change to the other side is not proposed while moving (it flip-flopped between the two
        # sides of an obstacle and ended up stopped right behind it, too close to steer around)
        under_way = (d0.abs() > 0.3) & (ego_v > 1.0)
        far_side = (D * d0[:, None] < 0) & (D.abs() > 0.5 * lw[:, None]) & under_way[:, None]
        side_ok &= ~far_side[..., None].expand(B, Gp, Fv).reshape(B, G)
        gates = col_ok & drv_ok & rule_ok & opp_ok & stop_ok & side_ok
        best_prog = torch.where(gates, prog, torch.zeros_like(prog)).amax(1, keepdim=True).clamp_min(cfg.progress_floor)
        progress = (prog / best_prog).clamp(0.0, 1.0)
        wsum = cfg.w_progress + cfg.w_ttc + cfg.w_comfort + cfg.w_lane
        avg = (cfg.w_progress * progress + cfg.w_ttc * ttc_ok.float() + cfg.w_comfort * comfort
               + cfg.w_lane * lane_keep) / wsum
        opp_f = torch.where(blocked, 1.0, cfg.opposite_factor)[:, None]
        mult = torch.where(opp_m > 0.5, opp_f.expand_as(avg), torch.ones_like(avg))

        # emergency vehicles approaching from behind: move right and slow down
        right = (D < -0.3)[..., None].expand(B, Gp, Fv).reshape(B, G)
        left = (D > d0[:, None] + 0.3)[..., None].expand(B, Gp, Fv).reshape(B, G)
        slow = torch.zeros(Fv, dtype=torch.bool, device=dev)
        slow[:F] = fac <= 0.5
        slow = slow[None, None, :].expand(B, Gp, Fv).reshape(B, G)
        ev_mult = torch.ones_like(avg)
        ev_mult = torch.where(right, ev_mult * cfg.emergency_bonus, ev_mult)
        ev_mult = torch.where(slow, ev_mult * cfg.emergency_bonus, ev_mult)
        ev_mult = torch.where(left, ev_mult * 0.5, ev_mult)
        mult = torch.where(ev[:, None], mult * ev_mult, mult)

        score = gates.float() * avg * mult
        # fallback: nothing passes the gates -> latest first collision, harder braking on ties
        fb = col_step.float() * 10 + (variant[None] == F + 1).float() * 5 + drv_ok.float() * 2 + rule_ok.float()
        fb = torch.where(stop_ok, fb, fb - 1e4)
        any_ok = gates.any(1)
        choice = torch.where(any_ok, score.argmax(1), fb.argmax(1))

        # ---------------- output: resample the chosen proposal at waypoint_dt
        bi = torch.arange(B, device=dev)
        gp_idx = choice // Fv
        s_ch = s_t.reshape(B, G, H)[bi, choice]  # (B, H)
        tw = torch.arange(1, cfg.horizon + 1, device=dev, dtype=torch.float32) * cfg.waypoint_dt
        th = torch.arange(1, H + 1, device=dev, dtype=torch.float32) * dt
        # beyond the simulated horizon, extrapolate with the last speed
        v_last = v_t.reshape(B, G, H)[bi, choice][:, -1]
        s_out = _interp1(th.expand(B, H), s_ch, tw.expand(B, -1).contiguous())
        s_out = s_out + v_last[:, None] * (tw[None] - th[-1]).clamp_min(0.0)
        pc, pp, ph = p_cum[bi, gp_idx], p_pts[bi, gp_idx], p_head[bi, gp_idx]
        ox = _interp1(pc, pp[..., 0], s_out)
        oy = _interp1(pc, pp[..., 1], s_out)
        oh = torch.atan2(_interp1(pc, torch.sin(ph), s_out), _interp1(pc, torch.cos(ph), s_out))
        traj_w = torch.stack([ox, oy, oh], -1)
        traj = world_to_ego(traj_w, ego_p, ego_yaw)
        # a plan that barely moves is a stop-in-place plan (keep the heading)
        still = s_out[:, -1] < 0.3
        traj = torch.where(still[:, None, None], torch.zeros_like(traj), traj)
        traj = torch.nan_to_num(traj, nan=0.0, posinf=0.0, neginf=0.0)

        if debug:
            self.last_debug = ExpertDebug(
                traj_world=torch.cat([pos_g, yaw_g[..., None]], -1), score=score, gates=gates,
                collision_step=col_step, progress=prog,
                path_offset=D[..., None].expand(B, Gp, Fv).reshape(B, G), speed_variant=variant,
                chosen=choice, stop_dist=torch.minimum(stop_s, yield_s))
        return traj

    __call__ = plan

    # ------------------------------------------------------------------ lane geometry
    def _lane_checks(self, mb, map_id: torch.Tensor, c_pts: torch.Tensor, c_nrm: torch.Tensor, d: torch.Tensor,
                     head: torch.Tensor, with_driving: bool = False):
        """Drivable / opposite-direction flags of path points ``c_pts + d * c_nrm``.

        The lane segments binned in the grid cell of each centreline point (c_pts (B, S, 2)) are gathered once
        as a flat list of (point, segment) pairs (no padding to the grid capacity), then every path's shifted
        point (d (B, Gp, S), heading (B, Gp, S)) is tested against them. Returns drivable (B, Gp, S) and
        opposite (B, Gp, S): on a drivable lane, but only on lanes running the other way (outside junctions).
        With ``with_driving`` also driving (B, Gp, S): on a DRIVING lane (not only on shoulders / parking).
        """
        B, Gp, S = d.shape
        dev = c_pts.device
        Q = B * S
        mid = map_id[:, None].expand(B, S).reshape(-1)
        pos = c_pts.reshape(-1, 2)
        start, count = grid_cell(mb, mid, pos)
        qi = torch.repeat_interleave(torch.arange(Q, device=dev), count)  # (E,)
        first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        item = start[qi] + (torch.arange(qi.shape[0], device=dev) - first)
        mq = mid[qi]
        seg = take(mb.grid_items, mq, item.clamp(max=mb.grid_items.shape[1] - 1)).clamp_min(0)
        lane = take(mb.point_lane, mq, seg)
        ltype = take(mb.lane_type, mq, lane)
        typed = torch.zeros_like(ltype, dtype=torch.bool)
        for t in DRIVABLE:
            typed |= ltype == int(t)
        is_drive = (ltype == int(LaneType.DRIVING))[typed]
        qi, mq, seg, lane = qi[typed], mq[typed], seg[typed], lane[typed]
        a = take(mb.points, mq, seg)
        ab = take(mb.points, mq, seg + 1) - a
        # segments too far from the centreline point to hold any of the shifted points
        reach = d.abs().amax() + 0.5 * take(mb.lane_width, mq, lane) + 0.3
        u0 = (((pos[qi] - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-9)).clamp(0, 1)
        r0 = pos[qi] - (a + u0[:, None] * ab)
        near = (r0 * r0).sum(-1) <= reach * reach
        qi, mq, seg, lane, a, ab = qi[near], mq[near], seg[near], lane[near], a[near], ab[near]
        is_drive = is_drive[near]
        l2 = (ab * ab).sum(-1).clamp_min(1e-9)
        half = 0.5 * take(mb.lane_width, mq, lane) + 0.3
        off = take(mb.lane_offset, mq, lane)
        is_first = seg == off
        is_last = seg + 2 == off + take(mb.lane_count, mq, lane)
        seg_head = take(mb.point_heading, mq, seg)
        junc = take(mb.lane_junction, mq, lane) >= 0
        base = pos[qi]
        nrm = c_nrm.reshape(-1, 2)[qi]
        dq = d.permute(0, 2, 1).reshape(Q, Gp)[qi]  # (E, Gp)
        hq = head.permute(0, 2, 1).reshape(Q, Gp)[qi]
        p = base[:, None] + dq[..., None] * nrm[:, None]  # (E, Gp, 2)
        u = ((p - a[:, None]) * ab[:, None]).sum(-1) / l2[:, None]
        beyond = (is_first[:, None] & (u < 0)) | (is_last[:, None] & (u > 1))
        uc = u.clamp(0, 1)
        r = p - (a[:, None] + uc[..., None] * ab[:, None])
        on = ((r * r).sum(-1) <= half[:, None] ** 2) & ~beyond  # (E, Gp)
        same = (torch.cos(seg_head[:, None] - hq) > -0.5) | junc[:, None]
        drv = torch.zeros(Q, Gp, dtype=torch.float32, device=dev)
        ok = torch.zeros(Q, Gp, dtype=torch.float32, device=dev)
        drv.index_add_(0, qi, on.float())
        ok.index_add_(0, qi, (on & same).float())
        drv = drv.view(B, S, Gp).permute(0, 2, 1) > 0
        ok = ok.view(B, S, Gp).permute(0, 2, 1) > 0
        if not with_driving:
            return drv, drv & ~ok
        dd = torch.zeros(Q, Gp, dtype=torch.float32, device=dev)
        dd.index_add_(0, qi, (on & is_drive[:, None]).float())
        return drv, drv & ~ok, dd.view(B, S, Gp).permute(0, 2, 1) > 0

    # ------------------------------------------------------------------ route geometry
    def _project_on_route(self, state: WorldState):
        """Ego arc length on the route polyline, signed lateral offset (left +), nearest point index."""
        B, P = state.route_valid.shape
        ego = state.pos[:, 0]
        ar = torch.arange(P, device=state.device)
        win = (ar[None] >= state.progress_idx[:, None] - 10) & (ar[None] <= state.progress_idx[:, None] + 120)
        d = (state.route_pts - ego[:, None]).norm(dim=-1)
        d = torch.where(state.route_valid & win, d, torch.full_like(d, _INF))
        i0 = d.argmin(1)
        nv = state.route_valid.sum(1).clamp_min(2)
        j = torch.minimum(i0, nv - 2)
        a = torch.gather(state.route_pts, 1, j[:, None, None].expand(-1, 1, 2)).squeeze(1)
        b = torch.gather(state.route_pts, 1, (j + 1)[:, None, None].expand(-1, 1, 2)).squeeze(1)
        t = b - a
        ln = t.norm(dim=-1).clamp_min(1e-6)
        t = t / ln[:, None]
        rel = ego - a
        u = (rel * t).sum(-1)
        s = torch.gather(state.route_cum, 1, j[:, None]).squeeze(1) + u
        lat = t[:, 0] * rel[:, 1] - t[:, 1] * rel[:, 0]
        return s, lat, i0

    def _route_at(self, state: WorldState, s: torch.Tensor):
        """Route points and unit tangents at arc lengths s (B, S); straight extrapolation past the end."""
        cum = state.route_cum
        P = cum.shape[1]
        nv = state.route_valid.sum(1).clamp_min(2)
        j = torch.searchsorted(cum.contiguous(), s.contiguous(), right=True)
        j = torch.minimum(j.clamp_min(1), (nv - 1)[:, None]).clamp(max=P - 1)
        c0 = torch.gather(cum, 1, j - 1)
        c1 = torch.gather(cum, 1, j)
        w = ((s - c0) / (c1 - c0).clamp_min(1e-6)).clamp_min(0.0)
        p0 = torch.gather(state.route_pts, 1, (j - 1)[..., None].expand(-1, -1, 2))
        p1 = torch.gather(state.route_pts, 1, j[..., None].expand(-1, -1, 2))
        tan = p1 - p0
        tan = tan / tan.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        past = s > torch.gather(cum, 1, (nv - 1)[:, None])
        w = torch.where(past, w, w.clamp_max(1.0))
        return p0 + w[..., None] * (p1 - p0), tan

    def _route_arc_of(self, state: WorldState, pts: torch.Tensor, i0: torch.Tensor, window: int = 130):
        """Arc length along the route of points (B, K, 2) (nearest route point within a window ahead of i0)
        and their distance to the route."""
        B, P = state.route_valid.shape
        idx = (i0[:, None] + torch.arange(-5, window, device=state.device)[None]).clamp(0, P - 1)  # (B, Wn)
        rp = torch.gather(state.route_pts, 1, idx[..., None].expand(-1, -1, 2))
        ok = torch.gather(state.route_valid, 1, idx)
        d = (pts[:, :, None, :] - rp[:, None]).norm(dim=-1)  # (B, K, Wn)
        d = torch.where(ok[:, None], d, torch.full_like(d, _INF))
        dm, k = d.min(-1)
        arc = torch.gather(torch.gather(state.route_cum, 1, idx), 1, k)
        return arc, dm

    def _upcoming_route_lanes(self, state: WorldState, n: int = 5):
        R = state.route_lanes.shape[1]
        idx = state.route_idx[:, None] + torch.arange(n, device=state.device)[None]
        lanes = torch.gather(state.route_lanes, 1, idx.clamp(max=R - 1))
        return torch.where(idx < R, lanes, torch.full_like(lanes, -1))  # (B, n)

    # ------------------------------------------------------------------ rules
    def _stop_points(self, world, state: WorldState, lights: torch.Tensor, s_ego: torch.Tensor, i0: torch.Tensor):
        """Distance ahead (from the ego centre) where the ego centre must come to rest: red / stoppable yellow
        lights on the route, unserved stop signs. (B,) (inf: none)."""
        cfg = self.cfg
        mb = world.maps
        m1 = state.map_id
        L0 = state.length[:, 0]
        v = state.speed[:, 0]
        up = self._upcoming_route_lanes(state)  # (B, 5)
        # no stop at the route end: the route completes there (the path continues straight past it, and
        # the drivable-area gate stops the ego where the road really ends)
        out = torch.full_like(s_ego, _INF)

        # lights
        ll = mb.light_lane[m1]  # (B, K)
        on_route = (ll[:, :, None] == up[:, None, :]).any(-1) & (ll >= 0) & mb.light_valid[m1]
        arc, dist = self._route_arc_of(state, mb.light_pos[m1], i0)
        line = arc - s_ego[:, None]  # distance from the ego centre to the stop line
        front_gap = line - 0.5 * L0[:, None]
        stoppable = front_gap - cfg.light_margin > v[:, None] ** 2 / (2 * cfg.yellow_decel)
        red = (lights == int(LightState.RED)) | ((lights == int(LightState.YELLOW)) & stoppable)
        # once the ego's front is over the line we go on (stopping there would block the junction)
        act = on_route & red & (dist < 4.0) & (front_gap > -0.5)
        pt = line - 0.5 * L0[:, None] - cfg.light_margin
        out = torch.minimum(out, torch.where(act, pt, torch.full_like(pt, _INF)).amin(1))

        # stop signs: stop until the world says the stop was served (stop_ok), then go
        sl = mb.stop_lane[m1]
        on_route = (sl[:, :, None] == up[:, None, :]).any(-1) & (sl >= 0) & mb.stop_valid[m1]
        arc, dist = self._route_arc_of(state, mb.stop_pos[m1], i0)
        line = arc - s_ego[:, None]
        served = state.stop_ok
        act = on_route & ~served & (dist < 4.0) & (line > 0.0)
        pt = (line - cfg.stop_sign_back).clamp_min(0.0)
        out = torch.minimum(out, torch.where(act, pt, torch.full_like(pt, _INF)).amin(1))
        return out

    def _junction_yield(self, world, state: WorldState, lights: torch.Tensor, s_ego: torch.Tensor,
                        i0: torch.Tensor) -> torch.Tensor:
        """Where to wait before the next junction connector of the route when a conflicting vehicle with the
        right of way reaches the conflict point within gap_time of the ego. (B,) (inf: go)."""
        cfg = self.cfg
        mb = world.maps
        B, N = state.lane.shape
        dev = state.device
        m1 = state.map_id
        up = self._upcoming_route_lanes(state, 4)
        is_conn = (up >= 0) & (take(mb.lane_junction, m1[:, None], up.clamp_min(0)) >= 0)
        has = is_conn.any(1)
        k = is_conn.float().argmax(1)
        conn = torch.gather(up, 1, k[:, None]).squeeze(1).clamp_min(0)  # (B,)
        inside = has & (state.lane[:, 0] == conn)
        start, _ = lane_pose(mb, m1, conn, torch.zeros(B, device=dev))
        arc, dist = self._route_arc_of(state, start[:, None], i0)
        entry = torch.where(inside, -state.s[:, 0], (arc[:, 0] - s_ego))  # ego centre to connector start
        ok = has & (entry < cfg.junction_lookahead) & ~(inside & (state.s[:, 0] > cfg.commit_dist))
        ok &= inside | (dist[:, 0] < 4.0)

        cl = take(mb.lane_conflict, m1, conn)  # (B, C)
        cs = take(mb.lane_conflict_s, m1, conn)
        cos_ = take(mb.lane_conflict_other_s, m1, conn)
        cvalid = cl >= 0
        # other vehicles' distance to their conflict point: on the connector, or approaching it via the queue
        veh = state.is_vehicle() & (torch.arange(N, device=dev)[None] > 0)  # (B, N)
        lanes = torch.cat([state.lane[..., None], state.queue], -1)  # (B, N, 4)
        llen = take(mb.lane_length, m1[:, None, None], lanes.clamp_min(0))
        llen = torch.where(lanes >= 0, llen, torch.full_like(llen, _INF))
        before = torch.cat([-state.s[..., None], (llen[..., :1] - state.s[..., None]),
                            llen[..., :1] - state.s[..., None] + llen[..., 1:2]], -1)  # (B, N, 3)
        match = lanes[:, :, None, :3] == cl[:, None, :, None]  # (B, N, C, 3)
        match &= cvalid[:, None, :, None]
        dj_all = before[:, :, None, :] + cos_[:, None, :, None]
        dj = torch.where(match, dj_all, torch.full_like(dj_all, _INF)).amin(-1)  # (B, N, C)
        on_conn = match[..., 0]
        # held by a light / stop sign before the junction
        tcfg = world.cfg.traffic
        path = path_info(mb, state, tcfg)
        g_stop, _, _ = light_and_stop_gaps(mb, state, path, lights, tcfg)
        held = (g_stop[..., None] < dj - 0.5 * state.length[..., None]) & ~on_conn & ~state.ignore_lights[..., None]
        prio_i = take(mb.lane_priority, m1, conn)
        prio_j = take(mb.lane_priority, m1[:, None], cl.clamp_min(0))  # (B, C)
        d_i = entry[:, None] + cs  # (B, C) ego centre to the conflict point
        v_i = state.speed[:, 0].clamp_min(2.0)
        t_i = d_i.clamp_min(0) / v_i[:, None]
        v_j = state.speed.clamp_min(0.5)
        t_j = dj.clamp_min(0) / v_j[..., None]
        row = (on_conn & ~inside[:, None, None]) | (prio_j[:, None] > prio_i[:, None, None]) \
            | ((prio_j[:, None] == prio_i[:, None, None]) & (t_j < t_i[:, None]))
        row |= state.ignore_priority[..., None]
        must = row & ~held & veh[..., None] & torch.isfinite(dj) & (dj > -(0.5 * state.length[..., None] + 1.0))
        must &= (d_i[:, None] > -0.5 * state.length[:, :1, None]) & (t_j < t_i[:, None] + cfg.gap_time)
        must &= dj < 60.0
        yield_ = must.any(-1).any(-1) & ok
        wait = torch.where(inside, torch.zeros_like(entry), entry - 0.5 * state.length[:, 0] - 0.5)
        # cannot stop before the entry any more: go on
        can_stop = wait > state.speed[:, 0] ** 2 / (2 * 6.0) - 0.5
        return torch.where(yield_ & can_stop, wait.clamp_min(0.0), torch.full_like(wait, _INF))

    # ------------------------------------------------------------------ others
    def _forecast(self, world, state: WorldState, lights: torch.Tensor):
        """Future poses of every agent at sim_dt .. sim_steps * sim_dt: (B, H, N, 2), (B, H, N), valid (B, H, N)."""
        cfg = self.cfg
        mb = world.maps
        B, N = state.lane.shape
        H = cfg.sim_steps
        dev = state.device
        base = world.cfg.traffic
        tcfg = TrafficConfig(**{**base.__dict__, "path_samples": cfg.forecast_path_samples})
        path = path_info(mb, state, tcfg)
        g_stop, _, _ = light_and_stop_gaps(mb, state, path, lights, tcfg)
        kerb = kerb_wait(mb, state, path, tcfg)
        t = torch.arange(1, H + 1, device=dev, dtype=torch.float32) * cfg.sim_dt  # (H,)
        v = state.speed[..., None]
        # scripted FREE agents (a pedestrian stepping out) speed up to their target: forecast them at it
        so = state.speed_override
        free_v = (state.mode == Mode.FREE) & torch.isfinite(so)
        v = torch.where(free_v, torch.maximum(state.speed, torch.nan_to_num(so, nan=0.0)), state.speed)[..., None]
        a = state.accel.clamp(-8.0, 0.0)[..., None]
        t_stop = torch.where(a < -0.1, v / (-a).clamp_min(0.1), torch.full_like(v, _INF))
        tt = torch.minimum(t[None, None], t_stop)
        dist = v * tt + 0.5 * a * tt * tt  # (B, N, H)
        lane_bound = (state.mode == Mode.LANE) & (state.lane >= 0) & ~state.hold
        cap = torch.where(torch.isfinite(g_stop), g_stop.clamp_min(0.0) + 1.0, torch.full_like(g_stop, _INF))
        cap = torch.minimum(cap, path.path_end + 0.0)
        # lane stops / path ends only bind lane-following agents (a FREE agent, e.g. a pedestrian stepping
        # out, has no lane path: its path_end is 0, which froze it in place in the forecast)
        cap = torch.where(lane_bound, cap, torch.full_like(cap, _INF))
        dist = torch.minimum(dist, cap[..., None])
        dist = torch.where(kerb[..., None] | state.hold[..., None], torch.zeros_like(dist), dist)
        # along the lane path
        Sp = path.pts.shape[2]
        f = (dist / tcfg.path_step).clamp(0.0, Sp - 1 - 1e-4)
        i0 = f.floor().long()
        w = (f - i0.float())[..., None]
        g = lambda x, i: torch.gather(x, 2, i[..., None].expand(-1, -1, -1, 2))  # noqa: E731
        p_lane = g(path.pts, i0) * (1 - w) + g(path.pts, i0 + 1) * w
        h0 = torch.gather(path.heading, 2, i0)
        h1 = torch.gather(path.heading, 2, (i0 + 1).clamp(max=Sp - 1))
        h_lane = torch.atan2((1 - w[..., 0]) * torch.sin(h0) + w[..., 0] * torch.sin(h1),
                             (1 - w[..., 0]) * torch.cos(h0) + w[..., 0] * torch.cos(h1))
        # keep the current displacement from the lane centre (lane changes), fading out over 3 s
        disp = state.pos - path.pts[:, :, 0]
        fade = (1.0 - t / 3.0).clamp_min(0.0)[None, None, :, None]
        p_lane = p_lane + disp[:, :, None] * fade
        # constant heading
        hd = torch.stack([torch.cos(state.yaw), torch.sin(state.yaw)], -1)
        p_free = state.pos[:, :, None] + dist[..., None] * hd[:, :, None]
        static = (state.mode == Mode.STATIC) | (state.kind == int(AgentKind.STATIC))
        p = torch.where(lane_bound[..., None, None], p_lane, p_free)
        yaw = torch.where(lane_bound[..., None], h_lane, state.yaw[..., None].expand(B, N, H))
        # pedestrians keep their heading on the walk path too (their lane heading may be reversed)
        p = torch.where(static[..., None, None], state.pos[:, :, None].expand(B, N, H, 2), p)
        yaw = torch.where(static[..., None], state.yaw[..., None].expand(B, N, H), yaw)
        valid = state.valid[:, None, :].expand(B, H, N)
        return p.permute(0, 2, 1, 3).contiguous(), yaw.permute(0, 2, 1).contiguous(), valid

    def _leaders(self, state: WorldState, oth: torch.Tensor, c_pts: torch.Tensor, c_head: torch.Tensor,
                 ks: torch.Tensor, d_path: torch.Tensor):
        """Nearest agent inside each path's corridor now, in the route (Frenet) frame: every agent is projected
        once onto the centreline (arc s, lateral l); a path with lateral offset d(s) holds it when
        |l - d| is below the half widths + margin, d taken where the ego's front reaches the agent's rear.
        Returns the ego centre's resting distance (B, Gp) and the leader's speed along the route (B, Gp)."""
        cfg = self.cfg
        B, S, _ = c_pts.shape
        Gp = d_path.shape[1]
        rel = state.pos[:, :, None, :] - c_pts[:, None]  # (B, N, S, 2)
        k = (rel * rel).sum(-1).argmin(-1)  # (B, N)
        hk = torch.gather(c_head, 1, k)
        r = torch.gather(rel, 2, k[..., None, None].expand(-1, -1, 1, 2)).squeeze(2)
        c, s = torch.cos(hk), torch.sin(hk)
        along = r[..., 0] * c + r[..., 1] * s
        lat = -r[..., 0] * s + r[..., 1] * c
        s_a = ks[k] + along  # (B, N)
        dh = state.yaw - hk
        cd, sd = torch.cos(dh).abs(), torch.sin(dh).abs()
        half_lat = 0.5 * (state.length * sd + state.width * cd)
        half_lon = 0.5 * (state.length * cd + state.width * sd)
        ped = state.is_pedestrian()
        margin = cfg.corridor_margin + torch.where(ped, cfg.pedestrian_margin, 0.0)
        W0 = state.width[:, :1]
        L0 = state.length[:, :1]
        # moving agents: the path's offset where the ego's front reaches their rear; standing ones: the offset
        # beside their centre (the exact box check of the collision gate decides whether we fit past them)
        standing = state.speed < 0.5
        s_meet = torch.where(standing, s_a, s_a - half_lon - 0.5 * L0).clamp(0.0, float(ks[-1]))
        step = float(ks[1] - ks[0])
        f = (s_meet / step).clamp(0, S - 1 - 1e-4)
        i0 = f.floor().long()
        w = f - i0.float()
        dg = lambda i: torch.gather(d_path, 2, i[:, None].expand(-1, Gp, -1))  # noqa: E731
        d_meet = dg(i0) * (1 - w[:, None]) + dg(i0 + 1) * w[:, None]  # (B, Gp, N)
        ok = oth & (s_a > 0.0) & (k < S - 1) & ((k > 0) | (along > -1.0))
        inside = ok[:, None] & ((lat[:, None] - d_meet).abs() < (0.5 * W0 + half_lat + margin)[:, None])
        rest = s_a - half_lon - 0.5 * L0 - cfg.lead_gap
        rest = rest - torch.where(state.speed < 0.5, cfg.still_gap, 0.0)
        v_along = (state.speed * torch.cos(dh)).clamp_min(0.0)
        rest = torch.where(inside, rest[:, None], torch.full_like(d_meet, _INF))
        lead, j = rest.min(-1)
        lv = torch.gather(v_along[:, None].expand(-1, Gp, -1), 2, j[..., None]).squeeze(-1)
        found = torch.isfinite(lead)
        lv = torch.where(found, lv, torch.zeros_like(lv))
        return lead, lv, torch.where(found, j, torch.full_like(j, -1))

    def _emergency_behind(self, state: WorldState, ego_p: torch.Tensor, ego_yaw: torch.Tensor) -> torch.Tensor:
        """(B,) bool: a siren vehicle behind the ego, heading the same way, within emergency_radius."""
        rel = state.pos - ego_p[:, None]
        c, s = torch.cos(ego_yaw)[:, None], torch.sin(ego_yaw)[:, None]
        x = rel[..., 0] * c + rel[..., 1] * s
        y = -rel[..., 0] * s + rel[..., 1] * c
        same = torch.cos(state.yaw - ego_yaw[:, None]) > 0.5
        ev = state.valid & state.siren & same & (x < 0) & (x > -self.cfg.emergency_radius) & (y.abs() < 6.0)
        return ev.any(1)
