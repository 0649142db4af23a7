"""The counterfactual world's hot kernels, as plain functions of tensors (used by :mod:`craft.finetune.proxy`).

Three kernels carry most of a chunk's time: the lane query's (segment, point) pair kernel
(:func:`lane_pairs`), one virtual step of the ego's tracker + kinematic bicycle (:func:`ego_step`) and one
step of the route tracking (:func:`route_step`); :func:`reward_sums` adds up the dense rewards. They run
eagerly by default. ``CounterfactualWorld(..., compile=True)`` (``craft finetune --compile-proxy``) runs the
ego step, the reward sums and (where the C kernels of :mod:`craft.finetune.proxy_native` are not available)
the route step through ``torch.compile`` (one graph per kernel with dynamic shapes, so the batch size and
the candidate count do not recompile), which fuses their element-wise chains into single loops; the lane
pair kernel stays eager (compiled, it ran no faster: its time is the per-pair feature copies and the
grouping around it, not the arithmetic; the C lane query replaces the whole query instead). The
compiled kernels round differently from the eager ones (fused multiply-adds, vectorised transcendental
functions), so their scores agree with the eager path to float tolerance, not bit for bit. If compilation
fails (no C++ compiler, an unsupported torch build), :class:`Kernel` prints one line to stderr and runs the
eager function from then on.

Everything here is branch-free over candidates and points; the Python-level branches (``edge is None``,
``dmask is None``, ``stat is None``) specialise a compiled graph at most twice.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from craft.finetune.rewards import RewardConfig, dense_step_reward
from craft.world.dynamics import wrap_angle
from craft.world.tracker import _EPS as _TRACK_EPS

# feature columns of the lane segment table (craft.finetune.proxy._LaneIndex)
(_AX, _AY, _DX, _DY, _IL2, _HW2, _REACH, _CH, _SH, _TLO, _THI, _JUNCTION, _SHOULDER, _EDGE_REACH, _HW) = range(15)
_NF = 15
_NPAIR = 11
"""The first _NPAIR columns are the ones the lane query reads for every (point, segment) pair."""
_FAR = 1e30
"""Added to a lane distance beyond a pick's reach: it then never wins a pick (distances are < 1e10 m)."""


def _beyond(d: Tensor, reach: Tensor) -> Tensor:
    """``d`` where ``d <= reach``, else ``d + _FAR`` (same shapes): ``torch.where(d <= reach, d, inf)`` without
    ``torch.where`` (slow on CPU). sign(d - reach) is 1 exactly when d > reach, and d + 0 is d, so the picks
    and the picked distances are the same."""
    return (d - reach).sign_().clamp_min_(0.0).mul_(_FAR).add_(d)


def _min0(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x.min(0)`` of a NaN-free ``x (K, Q)``: the minima ``(Q,)`` and the first index reaching them ``(Q,)``
    long. Reductions with indices are slow on CPU; this takes two plain minima instead: the values, then
    the smallest ``k + K * sign(x_k - min)`` (``sign`` is 0 exactly at the minimum, 1 elsewhere). Inside a
    compiled kernel it is ``x.min(0)`` itself: one fused pass, where the two minima would be two (each
    recomputing ``x``)."""
    if torch.compiler.is_compiling():
        m, i = x.min(0)
        return m, i
    m = x.amin(0)
    K = x.shape[0]
    key = (x - m).sign_().mul_(K).add_(torch.arange(K, dtype=x.dtype, device=x.device)[:, None])
    return m, key.amin(0).long()


# ---------------------------------------------------------------------- the lane query's pair kernel
def lane_pairs(f: Tensor, inv: Tensor, useg: Tensor, px: Tensor, py: Tensor, cy: Tensor, sy: Tensor,
               cols: dict[str, Tensor], edge: Tensor | None, cos_wrong: float, cap: float) -> dict[str, Tensor]:
    """The lane rules at ``Q'`` points against the ``K`` segments listed in each point's cell.

    uf: (_NPAIR, K, U) pair features of the U distinct cells (segment-major); inv: (Q',) long, each point's
    cell in ``0..U-1``; useg: (K * U,) long, the segment rows (``k * U + cell``); px, py, cy, sy: (Q',)
    position and cos / sin of the heading; cols: 1-D per-segment columns ``lane``, ``ch``, ``sh``,
    ``junction``, ``shoulder``, ``hw``; edge: (K, U) reach of the driving-or-shoulder pick, or None when
    no cell holds a shoulder segment. Returns (Q',) ``offroad``, ``opposite``, ``center_dist``, ``lane``,
    ``emergency``. The pairs are laid out ``(K, Q')`` so every op runs along the points; eagerly, the
    features are copied to the points first (one contiguous ``(K, Q')`` block per feature), compiled they
    are read in place.
    """
    U = useg.shape[0] // f.shape[1]
    dx, dy = f[_DX], f[_DY]
    rx = px[None] - f[_AX]
    ry = py[None] - f[_AY]
    t = rx * dx
    t.addcmul_(ry, dy).mul_(f[_IL2])
    u = t.clamp(0.0, 1.0)
    ex = rx.addcmul_(u, dx, value=-1.0)  # rx - u dx
    ey = ry.addcmul_(u, dy, value=-1.0)
    d2 = ex.mul_(ex).addcmul_(ey, ey)
    # on a lane: TLO < t < THI and d2 <= HW2, as arithmetic (bool ops and any() are slow on CPU):
    # x - y > 0 exactly when x > y (IEEE floats), so sign(min(t - TLO, THI - t)) - 1 is 0 exactly when
    # t is strictly inside, and sign(HW2 - d2) >= 0 exactly when d2 <= HW2
    inr = torch.minimum(t - f[_TLO], f[_THI] - t).sign_().sub_(1.0)
    on_road = torch.minimum(inr, (f[_HW2] - d2).sign_()).amax(0) >= 0
    d = d2.sqrt_()
    cand = _beyond(d, f[_REACH])  # driving lanes within pick reach (others + _FAR)
    dmin, near = _min0(cand)
    found = dmin < 0.5 * _FAR
    seg_near = useg.index_select(0, near * U + inv)
    cos_near = cy * cols["ch"].index_select(0, seg_near) + sy * cols["sh"].index_select(0, seg_near)
    opposite = found & (cos_near < cos_wrong) & ~(cols["junction"].index_select(0, seg_near) > 0)
    cosd = cy[None] * f[_CH]
    cosd.addcmul_(sy[None], f[_SH])  # cos(yaw - lane heading)
    best = _min0(cand.add_(cosd, alpha=-2.0))[1]  # + 2 (1 - cos): pick_lane's heading cost
    seg_best = useg.index_select(0, best * U + inv)
    center = torch.where(found, d.gather(0, best[None]).squeeze(0), torch.full_like(cy, cap))
    lane = torch.where(found, cols["lane"].index_select(0, seg_best), torch.full_like(seg_best, -1))
    r = {"offroad": ~on_road, "opposite": opposite, "center_dist": center, "lane": lane}
    if edge is not None:
        emin, e = _min0(_beyond(d, edge))
        seg_e = useg.index_select(0, e * U + inv)
        r["emergency"] = (emin < 0.5 * _FAR) & (cols["shoulder"].index_select(0, seg_e) > 0) & \
            (emin <= cols["hw"].index_select(0, seg_e))
    else:  # no shoulder segment in these cells
        r["emergency"] = torch.zeros_like(found)
    return r


# ---------------------------------------------------------------------- one step of the ego
@dataclass(frozen=True)
class EgoConsts:
    """The scalars of :func:`ego_step`: the tracker's gains and bounds (``TrackerConfig``) and the EGO
    limits of the bicycle as the float32 values the world computes with."""

    dt: float
    stop_speed: float
    integral_band: float
    integral_limit: float
    kp: float
    ki: float
    kd: float
    stop_decel: float
    lookahead_min: float
    lookahead_gain: float
    lookahead_max: float
    max_delta: float
    max_steer: float
    max_brake: float
    max_accel: float
    max_speed: float


def ego_step(px: Tensor, py: Tensor, yaw: Tensor, speed: Tensor, steer: Tensor, integral: Tensor,
             prev_error: Tensor, target: Tensor, dmask: Tensor | None, plan: dict[str, Tensor],
             stat: dict[str, Tensor] | None, c: EgoConsts) -> tuple[Tensor, ...]:
    """One virtual step of ``Q`` egos: the tracker (``track_prepared``: PID on the plan's speed, pure pursuit
    on the plan's polyline), then the kinematic bicycle (``bicycle_step``), the same operations in the
    same order as those functions.

    px, py, yaw, speed, steer, integral, prev_error: (Q,) state; target: (Q,) the plan's speed ahead in
    time; dmask: (Q,) bool, where the PID's derivative is used (None: everywhere); plan: the prepared plan,
    segment-major (``ax, ay, sx, sy, l2c`` (S, Q), ``cum`` (S + 1, Q), ``tab`` (6, S * Q): cum, length,
    ax, sx, ay, sy; and (Q,) ``col``, ``total``, ``end_x``, ``end_y``, ``dir_x``, ``dir_y``, ``stationary``,
    ``two_wb``, ``wb_bike``); stat: the stop-in-place plans (``idx`` (Qs,) long, ``two_wb``, ``final_yaw``
    (Qs,)) or None. Returns the new px, py, yaw, speed, steer, integral, prev_error.
    """
    dt = c.dt
    Q = px.shape[0]
    S = plan["ax"].shape[0]
    ax, ay, sx, sy, l2c, cum, tab, col = (plan[k] for k in ("ax", "ay", "sx", "sy", "l2c", "cum", "tab", "col"))
    # ---- the tracker (track_prepared): PID on the plan's speed ahead in time
    stopping = plan["stationary"] | (target < c.stop_speed)
    error = target - speed
    integrate = error.abs() <= c.integral_band
    integral = torch.where(integrate, integral + error * dt, integral).clamp_(-c.integral_limit, c.integral_limit)
    derivative = (error - prev_error) / dt
    if dmask is not None:
        derivative = torch.where(dmask, derivative, torch.zeros_like(derivative))
    pid = (c.kp * error).add_(c.ki * integral).add_(c.kd * derivative)
    accel_cmd = torch.where(stopping, -c.stop_decel, pid)
    integral = torch.where(stopping, 0.0, integral)
    # pure pursuit: the lookahead point on the plan's polyline
    ld = (c.lookahead_min + c.lookahead_gain * speed).clamp_(c.lookahead_min, c.lookahead_max)
    pxc, pyc = px[None], py[None]
    rx, ry = pxc - ax, pyc - ay
    u = (rx * sx).add_(ry * sy).div_(l2c).clamp_(0.0, 1.0)
    fx = pxc - (ax + u * sx)
    fy = pyc - (ay + u * sy)
    k = _min0(fx.mul_(fx).add_(fy.mul_(fy)))[1]  # (Q,) the nearest segment (first minimum)
    kr = k * Q + col
    ck, lk = tab[0].index_select(0, kr), tab[1].index_select(0, kr)
    s_target = (ck + u.view(-1).index_select(0, kr) * lk).add_(ld)
    # searchsorted(cum, s) - 1 on the sorted arc lengths: the count of cum < s (sign(s - cum) = 1), - 1
    j = ((s_target - cum).sign_().clamp_min_(0.0).sum(0).long() - 1).clamp_(0, S - 1)
    tj = tab.index_select(1, j * Q + col)  # (6, Q): cum, len, ax, sx, ay, sy at j
    j_frac = ((s_target - tj[0]) / tj[1].clamp_min(_TRACK_EPS)).clamp_(0.0, 1.0)
    total = plan["total"]
    over = (s_target - total).clamp_min_(0.0)
    past = s_target > total
    goal_x = torch.where(past, plan["end_x"] + over * plan["dir_x"], tj[2] + j_frac * tj[3])
    goal_y = torch.where(past, plan["end_y"] + over * plan["dir_y"], tj[4] + j_frac * tj[5])
    cs, sn = torch.cos(yaw), torch.sin(yaw)
    dx, dy = goal_x.sub_(px), goal_y.sub_(py)
    gx = (cs * dx).add_(sn * dy)
    gy = (-sn).mul_(dx).add_(cs * dy)
    dist = (gx * gx).add_(gy * gy).sqrt_().clamp_min_(_TRACK_EPS)
    sin_alpha = torch.where(gx < 0, torch.where(gy >= 0, 1.0, -1.0), gy / dist)
    steer_cmd = torch.atan_((plan["two_wb"] * sin_alpha).div_(dist))
    if stat is not None:  # a stop-in-place plan turns toward its final yaw (computed for those plans only)
        idx = stat["idx"]
        y_s, ld_s = yaw.index_select(0, idx), ld.index_select(0, idx)
        align = torch.atan_((stat["two_wb"] * torch.sin(wrap_angle(stat["final_yaw"] - y_s))).div_(ld_s))
        steer_cmd = steer_cmd.index_copy(0, idx, align)
    accel_cmd = torch.nan_to_num_(accel_cmd, nan=0.0, posinf=0.0, neginf=0.0)
    steer_cmd = torch.nan_to_num_(steer_cmd, nan=0.0, posinf=0.0, neginf=0.0)
    # ---- the bicycle (bicycle_step with the EGO limits)
    new_steer = (steer + (steer_cmd - steer).clamp_(-c.max_delta, c.max_delta)).clamp_(-c.max_steer, c.max_steer)
    accel = accel_cmd.clamp_(-c.max_brake, c.max_accel)
    new_speed = (speed + accel.mul_(dt)).clamp_(0.0, c.max_speed)
    dist = (0.5 * (speed + new_speed)).mul_(dt)
    dyaw = (dist * torch.tan(new_steer)).div_(plan["wb_bike"])
    chord = dist.mul_(torch.sinc(dyaw / (2.0 * math.pi)))
    mid = yaw + 0.5 * dyaw
    px = px + chord * torch.cos(mid)
    py = py + chord.mul_(torch.sin(mid))
    yaw = wrap_angle(yaw + dyaw)
    return px, py, yaw, new_speed, new_steer, integral, error


# ---------------------------------------------------------------------- one step of the route tracking
def route_step(winT: Tensor, base: Tensor, colq: Tensor, out: tuple[Tensor, Tensor, Tensor, Tensor], j: Tensor,
               pos: Tensor, back: int, nseg: int) -> tuple[Tensor, ...]:
    """Project ``pos (Q, 2)`` onto the route window of each candidate: segments ``j - back .. j + A - 1 - back``.

    winT: (5 * A, Bc * nseg) window-major segment table (start x / y, vector x / y, 1 / length^2 of each
    window slot); base: (Q,) long, ``state * nseg``; colq: (Q,) ``arange(Q)``; out: the (Bc * nseg,)
    columns arc length at the start, length, direction cos / sin; j: (Q,) long, the previous projection's
    segment. Returns ``j_new``, ``dist``, ``s`` (arc length), ``cos``, ``sin``, each (Q,).
    """
    Q = pos.shape[0]
    A = winT.shape[0] // 5
    f = winT.index_select(1, base + j).view(5, A, Q)
    rx = pos[:, 0][None] - f[0]
    ry = pos[:, 1][None] - f[1]
    u = (rx * f[2]).add_(ry * f[3]).mul_(f[4]).clamp_(0.0, 1.0)  # as in _Route.project (same rounding)
    ex, ey = rx.sub_(u * f[2]), ry.sub_(u * f[3])
    d2 = ex.mul_(ex).add_(ey.mul_(ey))
    d2min, k = _min0(d2)
    j_new = (j + k - back).clamp_(0, nseg - 1)
    r = base + j_new
    cum, length, cos, sin = (x.index_select(0, r) for x in out)
    return j_new, d2min.sqrt_(), cum + u.view(-1).index_select(0, k * Q + colq) * length, cos, sin


# ---------------------------------------------------------------------- the dense rewards and their sums
DENSE_NAMES = ("progress", "recovery", "offroad", "opposite", "offroute", "emergency")
"""The per-step terms :func:`reward_sums` returns (the collision, red-light and stop-sign terms are per
candidate, computed by the caller)."""


def reward_sums(hr: Tensor, rdist: Tensor, s_now: Tensor, rc: Tensor, rs: Tensor, cy: Tensor, sy: Tensor,
                center: Tensor, offroad: Tensor, opposite: Tensor, emergency: Tensor, rd0: Tensor, s0: Tensor,
                head0: Tensor, center0: Tensor, w: Tensor, offroute_dist: float, rcfg: RewardConfig
                ) -> dict[str, Tensor]:
    """The dense reward terms of ``H`` steps of ``Q`` candidates and their weighted sums over the steps.

    hr: (Q,) bool, the state has a route; rdist, s_now, rc, rs: (H, Q) route distance, arc length and
    direction of the route projection after each step; cy, sy: (H, Q) cos / sin of the ego's heading;
    center, offroad, opposite, emergency: (H, Q) lane terms; rd0, s0, head0, center0: (Q,) the route
    distance (0 without a route), arc length, heading error (0 without a route) and lane-centre distance
    at the snapshot (the first step's "previous" deviations); w: (H, Q) step weights (discount, 0 after a
    counted collision). Returns ``{name: (Q,)}`` for :data:`DENSE_NAMES`
    (:func:`craft.finetune.rewards.dense_step_reward` per step, times ``w``, summed).
    """
    zero = torch.zeros((), dtype=rdist.dtype, device=rdist.device)
    rdist = torch.where(hr, rdist, zero)
    head = torch.where(hr, torch.atan2(sy * rc - cy * rs, cy * rc + sy * rs).abs(), zero)
    dp = torch.where(hr, torch.diff(s_now, dim=0, prepend=s0[None]), zero)
    offroute = hr & (rdist > offroute_dist)
    p_route = torch.cat([rd0[None], rdist[:-1]])
    p_center = torch.cat([center0[None], center[:-1]])
    p_head = torch.cat([head0[None], head[:-1]])
    no_col = torch.zeros((), dtype=torch.bool, device=rdist.device)
    _, terms = dense_step_reward(dp, rdist, center, head, p_route, p_center, p_head, offroad, opposite, offroute,
                                 emergency, no_col, zero, rcfg)
    return {k: (terms[k] * w).sum(0) for k in DENSE_NAMES}


# ---------------------------------------------------------------------- red lights over a whole trajectory
def red_light_runs(pos: Tensor, cy: Tensor, sy: Tensor, half: Tensor, rear0: Tensor, cur: Tensor, ctrl: Tensor,
                   lights: dict[str, Tensor], radius: float) -> Tensor:
    """The world's red-light rule (``events._red_lights``) at every step of ``Qs`` candidates.

    pos: (H, Qs, 2), cy, sy: (H, Qs) the ego after each step; half: (Qs,) half its length; rear0: (Qs, 2) its
    rear point at the snapshot; cur: (H, Qs) long its lane (-1: none), ctrl: (H, Qs) the light controlling
    that lane (-1: none); lights: the checked red lights, each (Qs, n): ``heading``, ``pos`` (Qs, n, 2),
    ``lane``, ``k`` (light index), ``ok``, ``half_width``. A light is run at step h when the ego's rear point
    crosses its stop line (along the light's heading, from behind to at-or-past) while the ego heads its
    way, is within ``radius`` of it and is on its lane (or the lane it controls, or laterally within the
    lane's half width). Returns (H, Qs) bool.
    """
    lux, luy = torch.cos(lights["heading"]), torch.sin(lights["heading"])
    lpx, lpy = lights["pos"][..., 0], lights["pos"][..., 1]
    rx = torch.cat([rear0[:, 0][None], pos[..., 0] - half * cy])  # (H + 1, Qs)
    ry = torch.cat([rear0[:, 1][None], pos[..., 1] - half * sy])
    relx = rx[..., None] - lpx  # (H + 1, Qs, n)
    rely = ry[..., None] - lpy
    along_all = relx * lux + rely * luy
    along, prev_along = along_all[1:], along_all[:-1]
    lateral = lux * rely[1:] - luy * relx[1:]
    match = (cur[..., None] >= 0) & ((lights["lane"] == cur[..., None]) | (ctrl[..., None] == lights["k"]))
    heading_ok = (cy[..., None] * lux + sy[..., None] * luy) > 0
    nx = pos[..., 0:1] - lpx
    ny = pos[..., 1:2] - lpy
    near = torch.sqrt(nx * nx + ny * ny) <= radius
    run = lights["ok"] & (prev_along < 0) & (along >= 0) & heading_ok & near & \
        (match | (lateral.abs() <= lights["half_width"]))
    return run.any(-1)


def _stop_violations(inside: Tensor, slow: Tensor, inside0: Tensor, served0: Tensor) -> Tensor:
    """Stop-sign violations of whole trajectories at once (the per-step rule of ``events._stop_signs``).

    inside, slow: (H, ...) bool, in the trigger area (heading-aware) after each step, and in it below the
    stop speed; inside0, served0: (...) bool, the snapshot's ``stop_inside`` / ``stop_ok``. The
    sequential rule: ``served |= slow``; leaving the area (inside before, not now) without ``served`` is
    a violation; leaving clears ``served``. Equivalently an exit at step h is fine iff a slow step
    happened since the previous exit, or, before the first exit, the snapshot was already served.
    Returns (H, ...) bool, the violation steps.
    """
    was_inside = torch.cat([inside0[None], inside[:-1]])
    left = was_inside & ~inside
    n_slow = slow.to(torch.int32).cumsum(0)  # slow steps so far
    left_i = left.to(torch.int32)
    base = torch.where(left, n_slow, torch.zeros_like(n_slow)).cummax(0).values  # n_slow at the last exit
    base_prev = torch.cat([torch.zeros_like(base[:1]), base[:-1]])  # ... strictly before this step
    first_exit = (left_i.cumsum(0) - left_i) == 0
    served = (served0 & first_exit) | (n_slow > base_prev)
    return left & ~served



def stop_sign_violations(pos: Tensor, cy: Tensor, sy: Tensor, speed: Tensor, trig: Tensor, bux: Tensor, buy: Tensor,
                         hc: Tensor, hs: Tensor, ok: Tensor, inside0: Tensor, served0: Tensor, stop_speed: float
                         ) -> Tensor:
    """The world's stop-sign rule (``events._stop_signs``) over whole trajectories of ``Qs`` candidates:
    leaving a sign's trigger area without having stopped in it.

    pos: (H, Qs, 2), cy, sy, speed: (H, Qs) the ego after each step; per candidate and checked sign (Qs, n):
    trig (Qs, n, 5) the trigger box (x, y, yaw, length, width), bux, buy the cos / sin of its yaw, hc, hs of
    the sign's heading, ok the sign in use, inside0 / served0 the snapshot's ``stop_inside`` / ``stop_ok``.
    Only candidates in a trigger area at some step (or at the snapshot) are worked on. Returns (H, Qs) bool.
    """
    relx = pos[..., 0:1] - trig[..., 0]  # (H, Qs, n)
    rely = pos[..., 1:2] - trig[..., 1]
    in_box = ((relx * bux + rely * buy).abs() <= 0.5 * trig[..., 3]) & \
        ((bux * rely - buy * relx).abs() <= 0.5 * trig[..., 4])
    inside = ok & in_box & ((cy[..., None] * hc + sy[..., None] * hs) > 0)  # heading-aware, (H, Qs, n)
    act = (inside.any(0) | inside0).any(-1).nonzero().squeeze(1)  # only these can leave an area
    inside = inside.index_select(1, act)
    slow = inside & (speed.index_select(1, act).abs() < stop_speed)[..., None]
    viol = _stop_violations(inside, slow, inside0.index_select(0, act), served0.index_select(0, act))
    out = torch.zeros(speed.shape, dtype=torch.bool, device=speed.device)
    return out.index_copy_(1, act, viol.any(-1))


# ---------------------------------------------------------------------- eager or compiled
class Kernel:
    """A kernel function run eagerly, or through ``torch.compile(dynamic=True, fullgraph=True)`` when
    ``compile``; if compiling or running the compiled graph raises, one line goes to stderr and the eager
    function is used from then on (the kernels do not modify their inputs, so a failed call is simply
    repeated eagerly)."""

    def __init__(self, fn: Callable, compile: bool = False):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True) if compile else None

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
                msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
                print(f"craft: torch.compile of the proxy kernel {self.fn.__name__} failed ({type(e).__name__}: "
                      f"{msg}); running it eagerly", file=sys.stderr)
                self.compiled = None
        return self.fn(*args, **kwargs)


@dataclass
class Kernels:
    """The hot kernels of one :class:`~craft.finetune.proxy.CounterfactualWorld`."""

    lane_pairs: Kernel
    ego_step: Kernel
    route_step: Kernel
    reward_sums: Kernel

    @classmethod
    def make(cls, compile: bool = False) -> "Kernels":
        # the lane kernel stays eager: compiled, it ran no faster (its time is the per-pair feature reads and
        # the per-point grouping around it, not the arithmetic chain)
        return cls(Kernel(lane_pairs, False), Kernel(ego_step, compile), Kernel(route_step, compile),
                   Kernel(reward_sums, compile))
