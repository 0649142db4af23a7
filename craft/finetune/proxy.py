"""The dense counterfactual proxy of CRAFT (method section 3): score every candidate of every stored state.

:class:`CounterfactualWorld` takes a batch of ``B`` stored world states (``WorldState`` snapshots) and
``G`` candidate trajectories per state (ego frame, 0.5 s waypoints, the format policies emit) and
simulates each candidate for ``H`` virtual steps of ``dt``:

* **ego** -- the closed-loop world's own tracker (:func:`craft.world.tracker.prepare_plan` /
  :func:`~craft.world.tracker.track_prepared`, i.e. :func:`~craft.world.tracker.track`) and kinematic
  bicycle (:func:`craft.world.dynamics.bicycle_step`, the world's EGO limits), from the snapshot's ego
  state. The tracker's PID memory comes from the ``tracker`` argument of :meth:`CounterfactualWorld.score`
  (e.g. the collector's ``PlanExecutor.tracker`` at the time of the snapshot); a ``WorldState`` does not
  carry it, so without that argument the PID starts from zero with no derivative history (what the
  world's :class:`~craft.world.autopilot.PlanExecutor` does after its first plan).
* **other agents** -- the *decay rollout*, the one place where the proxy differs from the closed-loop
  world (which uses reactive traffic): each vehicle keeps its last applied acceleration and its
  steering angle for a hold window (``hold_time``; ``hold_time_junction`` on junction connector lanes),
  then releases the throttle and brakes with a deceleration ramping linearly up to ``brake_decel`` over
  ``brake_ramp`` (``brake_ramp_junction`` on connectors), through the same kinematic bicycle and
  per-kind limits as the world. Pedestrians walk straight on at their speed for the hold window, then
  slow down with ``ped_decel`` ramping in the same way. Static objects, parked cars and script-held
  agents stay put. Nobody reacts to the ego, so the rollout is computed once per state ``(B, H, N)`` and
  shared by the G candidates.
* **collisions** -- oriented boxes, :func:`craft.world.collision.candidate_collision_pairs` (bounding-box
  and circle broad phases, then SAT). Only a collision while the ego moves at least
  ``EventConfig.collision_min_speed`` counts (the world's rule); only the first one is penalised, and by
  default (``stop_after_collision``) the candidate earns no reward after it (the b2d-star protocol ends a
  route at a collision). An overlap that already exists at the snapshot is not a new collision for any
  candidate while it lasts (the world's de-duplication does not re-count it either); a contact after a
  separation, or with another agent, is.
* **map terms** -- off-road, opposite lane, emergency lane and the lane-centre distance use the world's
  lane geometry and rules (``craft/world/events.py``: :func:`~craft.world.map.drivable`,
  :func:`~craft.world.map.pick_lane` with and without heading): the candidate/lane segment distance,
  half-width tests, heading-aware lane pick and the 120 deg wrong-direction rule are the same. For
  speed the proxy indexes only the drivable lanes (driving, parking, shoulder -- the only types those
  rules look at) in its own spatial grid, and merges collinear runs of the ~1 m lane points into longer
  segments (Douglas-Peucker, tolerance ``lane_simplify_tol`` = 2 cm, so distances differ from the
  world's by at most that). Route distance, heading error and progress come from projecting the ego
  onto the snapshot's route polyline; the projection is tracked step to step inside a sliding window
  of route segments (``route_search_back`` / ``route_search_ahead``), so progress is continuous (the
  world's ``StepEvents.progress`` counts passed route points in ~1 m quanta).
* **red lights / stop signs** -- trajectory flags with the world's rules (``events.py``
  ``_red_lights`` / ``_stop_signs``), light states of the snapshot held fixed: the ego's rear crossing
  the stop line of a red light of its lane within ``red_light_radius``, leaving a stop sign's trigger
  area without having been slower than ``stop_speed`` inside it (starting from the snapshot's
  ``stop_inside`` / ``stop_ok``). Only the ``light_slots`` / ``stop_slots`` nearest reachable lights and
  stop signs of each state are checked.

The return of candidate g of state i is ``R = sum_t gamma^t r_t - 40 I_red - 40 I_stop`` with the dense
reward of :func:`craft.finetune.rewards.dense_step_reward`; advantages are group-normalised
(:func:`craft.finetune.rewards.group_normalise`).

No Python loop runs over candidates or agents: the loops are over the ``H`` steps and over chunks of
``chunk_states`` states (which bound memory). Only the tracker and the bicycle feed back into the ego's
motion, so the ``H``-step loop runs just them; everything else is computed afterwards on the whole
time-major trajectory ``(H, B * G)``: one lane query on all ``H * B * G`` points, light / stop-sign
flags (the stop-sign state machine in closed form, :func:`_stop_violations`), the dense rewards with
the previous step's deviations taken from the shifted series, the first counted collision per
candidate and the mask of the steps after it. The route projection keeps its step-to-step search
window in a small loop of its own (a few ops per step on ``B * G`` windows).

Speed: the H-step ego loop is the tracker and the bicycle written out for this use
(:func:`craft.finetune.proxy_kernels.ego_step`, driven by :meth:`CounterfactualWorld._ego_loop_fused`:
the same operations in the same order as ``track_prepared`` + ``bicycle_step``, so the same rounding, with
the plan tables laid out segment-major ``(T, Q)`` so that every per-step op runs along the candidates,
and plain minima instead of indexed reductions, :func:`_min0`; a stop-in-place plan's heading alignment
is computed for those plans only); the route tracking is laid out window-major the same way
(:func:`~craft.finetune.proxy_kernels.route_step`), and the lane query's pair kernel segment-major
(:func:`~craft.finetune.proxy_kernels.lane_pairs`, on-road and reach tests as arithmetic), called on the
candidate layout ``(H, B, G)`` with one map id per state (no per-point map gathers), reusing the
caller's cos / sin of the headings, with the rare crowded cells padded into larger calls. The stop-sign
rule runs only on candidates that enter a trigger area. On CPU, PyTorch's reductions with indices,
``torch.where``, bool ops and ops broadcasting along a short last axis are several times slower than
plain element-wise ops, which is what these layouts avoid. ``CounterfactualWorld(..., compile=True)``
(opt-in; scores within float tolerance of the default path, not bit for bit) runs the lane query, the
route tracking and the red-light / stop-sign rules as C loops (:mod:`craft.finetune.proxy_native`: no
tensor temporaries, the lane pairs vectorised by the C compiler) and the ego step and the reward sums
through ``torch.compile`` (:mod:`craft.finetune.proxy_kernels`). ``CounterfactualWorld(...,
reference=True)`` runs the previous, unoptimised path (the world's functions called step by step, the
point-major lane kernel); the two give the same scores (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from craft.errors import CraftError
from craft.finetune import proxy_native
from craft.finetune.proxy_kernels import (
    _AX,
    _AY,
    _CH,
    _DX,
    _DY,
    _EDGE_REACH,
    _HW,
    _HW2,
    _IL2,
    _JUNCTION,
    _NF,
    _NPAIR,
    _REACH,
    _SH,
    _SHOULDER,
    _THI,
    _TLO,
    EgoConsts,
    Kernels,
    _min0,
    lane_pairs,
    _stop_violations,
    red_light_runs,
    route_step,
    stop_sign_violations,
)
from craft.finetune.rewards import (
    RewardConfig,
    collision_penalty,
    group_normalise,
)
from craft.world.collision import candidate_collision_pairs, ego_collisions
from craft.world.dynamics import _MIN_WHEELBASE, _STEER_ABS_CAP, bicycle_step, pedestrian_step
from craft.world.events import EventConfig
from craft.world.kinds import AgentKind
from craft.world.map import (
    GRID_MARGIN,
    LaneType,
    LightState,
    MapBatch,
    light_states,
    take,
)
from craft.world.state import Mode, WorldState
from craft.world.tracker import (
    TrackerConfig,
    TrackerState,
    _plan_speed_scalar,
    ego_to_world,
    prepare_plan,
    track_prepared,
)
from craft.world.world import _LIMITS

__all__ = ["TERMS", "CandidateScores", "CounterfactualWorld", "ProxyConfig"]

TERMS = ("progress", "recovery", "offroad", "opposite", "offroute", "emergency", "collision", "red_light",
         "stop_sign")
"""Keys of :attr:`CandidateScores.terms`: discounted per-term sums; they add up to the return."""


@dataclass(frozen=True)
class ProxyConfig:
    """The counterfactual world's settings (paper values where it gives them, else documented choices)."""

    horizon: int = 20
    """H, virtual steps per candidate."""
    dt: float = 0.1
    """Seconds per virtual step."""
    hold_time: float = 1.0
    """Decay rollout: seconds other vehicles keep their current action (our choice)."""
    hold_time_junction: float = 0.5
    """Decay rollout: the hold window on junction connector lanes, s (our choice)."""
    brake_ramp: float = 1.0
    """Decay rollout: seconds for the brake to ramp from 0 to ``brake_decel`` after the hold (our choice)."""
    brake_ramp_junction: float = 0.5
    """Decay rollout: the brake ramp on junction connector lanes, s (our choice)."""
    brake_decel: float = 3.0
    """Decay rollout: final braking deceleration of vehicles, m/s^2 (our choice; IDM's comfortable value)."""
    ped_decel: float = 1.0
    """Decay rollout: final deceleration of pedestrians, m/s^2 (our choice)."""
    hold_accel: bool = True
    """Decay rollout: keep the last applied acceleration during the hold (the paper's "current action");
    False keeps the current speed instead."""
    stop_after_collision: bool = True
    """No reward after a candidate's first counted collision (the route would end, b2d-star)."""
    chunk_states: int = 32
    """States scored at once; bounds memory (about 80 MB above the inputs per 32 states at G=512, H=20)."""
    lane_simplify_tol: float = 0.02
    """Tolerance of merging collinear lane points into longer segments for the proxy's lane index, m."""
    lane_grid_cell: float = 2.0
    """Cell size of the proxy's lane index, m."""
    route_window: int = 200
    """Route points (from 20 before the snapshot's progress point) the proxy projects onto."""
    route_search_back: int = 1
    """Route segments behind the previous projection searched each step."""
    route_search_ahead: int = 6
    """Route segments ahead of the previous projection searched each step (route points are ~1 m apart
    and never closer than ~0.5 m; the ego travels at most 3 m per step)."""
    light_slots: int = 4
    """Nearest reachable red lights checked per state."""
    stop_slots: int = 2
    """Nearest reachable stop signs checked per state."""
    events: EventConfig = field(default_factory=EventConfig)
    """Thresholds shared with the closed-loop world's event rules (off-route distance, wrong-direction
    angle, red-light radius, stop speed, collision minimum speed, lane-distance cap)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Weights of the dense reward, gamma and the group-normalisation std floor."""

    def __post_init__(self) -> None:
        if not (isinstance(self.horizon, int) and self.horizon >= 1):
            raise CraftError(f"ProxyConfig.horizon must be an integer >= 1, got {self.horizon!r}")
        for name in ("dt", "brake_ramp", "brake_ramp_junction", "lane_grid_cell"):
            if not getattr(self, name) > 0:
                raise CraftError(f"ProxyConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("hold_time", "hold_time_junction", "brake_decel", "ped_decel", "lane_simplify_tol"):
            if not getattr(self, name) >= 0:
                raise CraftError(f"ProxyConfig.{name} must be non-negative, got {getattr(self, name)}")
        for name in ("chunk_states", "route_window", "route_search_ahead", "light_slots", "stop_slots"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise CraftError(f"ProxyConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.route_search_back, int) and self.route_search_back >= 0):
            raise CraftError(f"ProxyConfig.route_search_back must be an integer >= 0, got {self.route_search_back!r}")


@dataclass
class CandidateScores:
    """Scores of ``G`` candidates for ``B`` states (invalid candidates: 0 / False everywhere).

    returns: (B, G) proxy return R; advantages: (B, G) group-normalised; terms: name -> (B, G)
    discounted per-term sums (:data:`TERMS`, they add up to ``returns``); collided: (B, G) bool, a counted
    collision within the horizon; diagnostics: 0-d tensors (``zero_std_share``, ``floor_share``, ...).
    """

    returns: Tensor
    advantages: Tensor
    terms: dict[str, Tensor]
    collided: Tensor
    diagnostics: dict[str, Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------- the proxy's lane index
def _simplify(p: np.ndarray, tol: float) -> np.ndarray:
    """Indices of the points of polyline ``p (n, 2)`` kept by Douglas-Peucker with tolerance ``tol``."""
    n = len(p)
    keep = np.zeros(n, bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        i, j = stack.pop()
        if j <= i + 1:
            continue
        a, ab = p[i], p[j] - p[i]
        q = p[i + 1 : j] - a
        l2 = float(ab @ ab)
        t = np.clip(q @ ab / l2, 0.0, 1.0) if l2 > 1e-12 else np.zeros(len(q))
        d = np.linalg.norm(q - t[:, None] * ab, axis=1)
        k = int(np.argmax(d))
        if d[k] > tol:
            m = i + 1 + k
            keep[m] = True
            stack += [(i, m), (m, j)]
    return np.nonzero(keep)[0]


_PIECE = 1 << 16
"""(point, segment) pairs the lane query processes at once (keeps its temporaries in cache)."""
_MIN_GROUP = 4096
"""Fewest points the default lane kernel is called on: smaller count groups are padded into the next one."""


def _bin_segments(a: np.ndarray, b: np.ndarray, reach: np.ndarray, cell: float):
    """CSR spatial grid of segments ``a -> b`` ((S, 2) each): a segment is listed in every cell whose
    centre lies within ``reach + half the cell diagonal`` of it (every cell its capsule of radius
    ``reach`` touches). Returns (origin (2,), shape (2,), start (cells,), count (cells,), items (I,))."""
    pts = np.concatenate([a, b])
    lo = pts.min(0) - 20.0
    hi = pts.max(0) + 20.0
    shape = (int(np.ceil((hi[0] - lo[0]) / cell)) + 1, int(np.ceil((hi[1] - lo[1]) / cell)) + 1)
    c0 = np.floor((np.minimum(a, b) - reach[:, None] - lo) / cell).astype(np.int64)
    c1 = np.floor((np.maximum(a, b) + reach[:, None] - lo) / cell).astype(np.int64)
    span = c1 - c0 + 1
    rad = reach + 0.5 * math.sqrt(2.0) * cell
    ab = b - a
    l2 = np.maximum((ab * ab).sum(1), 1e-12)
    cells, items = [], []
    for dx in range(int(span[:, 0].max())):
        for dy in range(int(span[:, 1].max())):
            ok = (dx < span[:, 0]) & (dy < span[:, 1])
            i = np.nonzero(ok)[0]
            cx, cy = c0[i, 0] + dx, c0[i, 1] + dy
            centre = lo + (np.stack([cx, cy], 1) + 0.5) * cell
            t = np.clip(((centre - a[i]) * ab[i]).sum(1) / l2[i], 0.0, 1.0)
            dist = np.linalg.norm(centre - (a[i] + t[:, None] * ab[i]), axis=1)
            near = dist <= rad[i] + 1e-3
            cells.append(cx[near] * shape[1] + cy[near])
            items.append(i[near])
    cells = np.concatenate(cells)
    items = np.concatenate(items)
    order = np.argsort(cells, kind="stable")
    cells, items = cells[order], items[order]
    count = np.bincount(cells, minlength=shape[0] * shape[1]).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    return lo.astype(np.float32), shape, start, count, items.astype(np.int64)


class _LaneIndex:
    """Drivable lane segments of every map of a :class:`MapBatch` in one table, with a spatial grid per map.

    ``feat (S + 1, 15)`` float32 columns: segment start, vector, 1 / length^2, (half width)^2, reach of
    a driving-lane pick (half width + ``GRID_MARGIN``; -1 for other lane types), heading cos / sin, the
    projection parameter bounds beyond which the point is past the lane's first / last point (0 / 1 at
    the lane's ends, -inf / +inf elsewhere), junction connector, shoulder, reach of the driving-or-shoulder
    pick, half width. The last row is a dummy far from everything (padding). ``lane (S + 1,)``: lane index
    on its map. Grid: ``origin (M, 2)``, ``shape (M, 2)``, ``cell_offset (M,)`` into ``start / count
    (cells,)``; ``items (I,)`` rows of the table. Segments are lane-point runs merged by Douglas-Peucker
    (``tol``), split to at most ``max_len`` metres.
    """

    def __init__(self, mb: MapBatch, cell: float, tol: float, max_len: float = 8.0):
        feats, lanes, starts, counts, items, origins, shapes, offs = [], [], [], [], [], [], [], []
        seg_base = cell_base = item_base = 0
        for m in mb.maps:
            types = m.lane_type
            sel = np.nonzero(np.isin(types, [int(LaneType.DRIVING), int(LaneType.PARKING),
                                             int(LaneType.SHOULDER)]))[0]
            A, Bp, own, first, last = [], [], [], [], []
            for ln in sel:
                p = m.lane_points(int(ln)).astype(np.float64)
                p = p[_simplify(p, tol)] if tol > 0 else p
                # split long segments so that the grid binning stays tight
                q = [p[0]]
                for x0, x1 in zip(p[:-1], p[1:]):
                    n = max(1, int(np.ceil(np.linalg.norm(x1 - x0) / max_len)))
                    for k in range(1, n + 1):
                        q.append(x0 + (x1 - x0) * (k / n))
                q = np.array(q)
                A.append(q[:-1])
                Bp.append(q[1:])
                own.append(np.full(len(q) - 1, ln))
                f0 = np.zeros(len(q) - 1, bool)
                f0[0] = True
                f1 = np.zeros(len(q) - 1, bool)
                f1[-1] = True
                first.append(f0)
                last.append(f1)
            if not A:  # a map without drivable lanes: one far-away dummy segment
                A, Bp, own = [np.array([[1e9, 1e9]])], [np.array([[1e9 + 1, 1e9]])], [np.array([-1])]
                first, last = [np.array([True])], [np.array([True])]
            a, b = np.concatenate(A), np.concatenate(Bp)
            own = np.concatenate(own)
            first, last = np.concatenate(first), np.concatenate(last)
            ln_ = np.maximum(own, 0)
            hw = 0.5 * m.lane_width[ln_].astype(np.float64)
            origin, shape, gstart, gcount, gitems = _bin_segments(a, b, hw + GRID_MARGIN, cell)
            d = b - a
            l2 = (d * d).sum(1)
            head = np.arctan2(d[:, 1], d[:, 0])
            lt = types[ln_]
            driving = lt == int(LaneType.DRIVING)
            shoulder = lt == int(LaneType.SHOULDER)
            reach = np.where(driving, hw + GRID_MARGIN, -1.0)
            edge = np.where(driving | shoulder, hw + GRID_MARGIN, -1.0)
            f = np.stack([a[:, 0], a[:, 1], d[:, 0], d[:, 1], 1.0 / np.maximum(l2, 1e-9), hw * hw, reach,
                          np.cos(head), np.sin(head), np.where(first, 0.0, -np.inf), np.where(last, 1.0, np.inf),
                          m.lane_junction[ln_] >= 0, shoulder, edge, hw], 1).astype(np.float32)
            feats.append(f)
            lanes.append(own)
            starts.append(gstart + item_base)
            counts.append(gcount)
            items.append(gitems + seg_base)
            item_base += len(gitems)
            origins.append(origin)
            shapes.append(shape)
            offs.append(cell_base)
            seg_base += len(a)
            cell_base += len(gstart)
        dummy = np.zeros((1, _NF), np.float32)
        dummy[0, _AX:_AY + 1] = 1e9  # the padding row is far from everything
        dummy[0, _IL2] = 1.0
        dummy[0, _REACH] = dummy[0, _EDGE_REACH] = -1.0
        dummy[0, _TLO], dummy[0, _THI] = np.inf, -np.inf
        feat = np.concatenate(feats + [dummy])
        dev = mb.device
        self.feat = torch.from_numpy(feat).to(dev)
        self.featT = self.feat.t().contiguous()  # (F, S + 1)
        self.cols = list(self.featT.unbind(0))  # 1-D feature columns (they gather fastest)
        self.pair_cols = {"ch": self.cols[_CH], "sh": self.cols[_SH], "junction": self.cols[_JUNCTION],
                          "shoulder": self.cols[_SHOULDER], "hw": self.cols[_HW]}
        self.lane = torch.from_numpy(np.concatenate(lanes + [np.array([-1])]).astype(np.int64)).to(dev)
        self.pair_cols["lane"] = self.lane
        self.start = torch.from_numpy(np.concatenate(starts).astype(np.int64)).to(dev)
        self.count = torch.from_numpy(np.concatenate(counts).astype(np.int64)).to(dev)
        self.items = torch.from_numpy(np.concatenate(items + [np.array([seg_base])]).astype(np.int64)).to(dev)
        self.origin = torch.from_numpy(np.stack(origins).astype(np.float32)).to(dev)
        self.shape = torch.tensor(shapes, dtype=torch.long, device=dev)
        self.cell_offset = torch.tensor(offs, dtype=torch.long, device=dev)
        self.cell = float(cell)
        self.has_shoulder = bool((feat[:-1, _SHOULDER] > 0).any())
        # cells whose list holds a shoulder segment (elsewhere the emergency-lane rule is False)
        cell_of_item = np.repeat(np.arange(len(self.count)), self.count.cpu().numpy())
        shoulder_items = feat[self.items[:-1].cpu().numpy(), _SHOULDER] > 0
        self.cell_shoulder = torch.from_numpy(
            np.bincount(cell_of_item[shoulder_items], minlength=len(self.count)) > 0).to(dev)
        self.pad = self.items.shape[0] - 1  # items[pad] is the dummy row
        self._key32 = (int(self.count.max()) + 1) * self.start.shape[0] < 2**31  # (count, cell) sort keys fit int32

    def query(self, map_id: Tensor, pos: Tensor, yaw: Tensor, cfg: EventConfig, reference: bool = False,
              cos_sin: tuple[Tensor, Tensor] | None = None, pair_kernel: Callable | None = None) -> dict[str, Tensor]:
        """The world's lane rules at points ``pos (..., 2)`` heading ``yaw (...)`` on maps ``map_id``.

        map_id: long, broadcastable to ``pos``'s leading shape ``(...)``: ``(Q,)`` for points ``(Q, 2)``, or
        ``(1, B, 1)`` for the points ``(H, B, G, 2)`` of G candidates of B states (the map is then never
        gathered per point). Returns, each of the leading shape ``(...)``, ``offroad`` (not on a driving /
        parking / shoulder lane: :func:`drivable`),
        ``opposite`` (nearest driving lane by distance is not a connector and heads > wrong_direction_deg
        away), ``emergency`` (nearest driving-or-shoulder lane is a shoulder and we are within its half
        width), ``center_dist`` (distance to the heading-aware driving lane pick, ``lane_dist_cap`` if
        none) and ``lane`` (that lane, -1 if none).

        cos_sin: ``(cos(yaw), sin(yaw))`` when the caller has them already (same values); pair_kernel: the
        (segment, point) kernel of the default path (:func:`~craft.finetune.proxy_kernels.lane_pairs`, eager
        when None, or a compiled :class:`~craft.finetune.proxy_kernels.Kernel`).

        Points are sorted by the number of segments in their cell and processed in groups of equal
        count, in pieces of at most ``_PIECE`` (point, segment) pairs so that the temporaries stay in
        cache; points in empty cells keep the defaults (off-road, no lane). Groups of fewer than
        ``_MIN_GROUP`` points (the rare crowded cells) are merged into the next count's group, their
        cells' lists padded with the dummy segment (it never wins a pick nor puts a point on the road),
        so that the kernel runs a few large calls instead of one small call per count (the reference
        kernel keeps one group per count, unpadded).
        """
        lead = pos.shape[:-1]
        dev = pos.device
        c = ((pos - self.origin[map_id]) / self.cell).floor_().long()  # (..., 2)
        shape = self.shape[map_id]
        cx, cy_ = c[..., 0], c[..., 1]
        inside = ((cx >= 0) & (cy_ >= 0) & (cx < shape[..., 0]) & (cy_ < shape[..., 1])).reshape(-1)
        cid = self.cell_offset[map_id] + cx.clamp(min=0) * shape[..., 1] + cy_.clamp(min=0)
        cid = cid.reshape(-1).clamp_(0, self.start.shape[0] - 1)
        pos, yaw = pos.reshape(-1, 2), yaw.reshape(-1)
        if cos_sin is not None:
            cos_sin = (cos_sin[0].reshape(-1), cos_sin[1].reshape(-1))
        Q = pos.shape[0]
        count = torch.where(inside, self.count.index_select(0, cid), torch.zeros((), dtype=torch.long, device=dev))
        out = {
            "offroad": torch.ones(Q, dtype=torch.bool, device=dev),
            "opposite": torch.zeros(Q, dtype=torch.bool, device=dev),
            "emergency": torch.zeros(Q, dtype=torch.bool, device=dev),
            "center_dist": torch.full((Q,), float(cfg.lane_dist_cap), device=dev),
            "lane": torch.full((Q,), -1, dtype=torch.long, device=dev),
        }
        if Q == 0:
            return {k: v.view(lead) for k, v in out.items()}
        # sorted by count, then by cell: neighbours in a group share their segments (cache-friendly gathers)
        key = count * self.start.shape[0] + cid
        order = torch.argsort(key.int() if self._key32 else key)  # int32 keys sort about twice as fast
        sc = count.index_select(0, order)
        kmax = int(sc[-1])
        cuts = torch.searchsorted(sc, torch.arange(kmax + 1, device=dev), right=True).tolist()
        if cuts[0] == Q:  # every point in an empty cell
            return {k: v.view(lead) for k, v in out.items()}
        rest = order[cuts[0]:]  # points with at least one segment, in (count, cell) order
        cs = cid.index_select(0, rest)
        ps = pos.index_select(0, rest)
        if cos_sin is None:
            ys = yaw.index_select(0, rest)
            cos_y, sin_y = torch.cos(ys), torch.sin(ys)
        else:
            cos_y, sin_y = cos_sin[0].index_select(0, rest), cos_sin[1].index_select(0, rest)
        buf = {k: torch.empty_like(v[:rest.shape[0]]) for k, v in out.items()}  # every entry is written below
        cos_wrong = math.cos(math.radians(cfg.wrong_direction_deg))
        base = cuts[0]
        if reference:
            kernel = self._dense
        else:
            pk = pair_kernel or lane_pairs
            kernel = lambda *a: self._dense_kmajor(*a, kernel=pk)
        min_group = 1 if reference else _MIN_GROUP
        lo = 0
        for K in range(1, kmax + 1):  # points whose cell holds K segments (fewer: padded, default path)
            hi = cuts[K] - base
            if hi - lo < min_group and K < kmax:
                continue  # too few points yet: merged into the next count's group
            step = max(1, _PIECE // K)
            for a in range(lo, hi, step):
                sl = slice(a, min(hi, a + step))
                r = kernel(ps[sl], cos_y[sl], sin_y[sl], cs[sl], K, cos_wrong, cfg.lane_dist_cap)
                for name, v in r.items():
                    buf[name][sl] = v
            lo = hi
        for name, v in buf.items():
            out[name].index_copy_(0, rest, v)
        return {k: v.view(lead) for k, v in out.items()}

    def _dense_kmajor(self, pos: Tensor, cy: Tensor, sy: Tensor, cid: Tensor, K: int, cos_wrong: float,
                      cap: float, kernel: Callable = lane_pairs) -> dict[str, Tensor]:
        """:meth:`_dense` with the (segment, point) pairs laid out segment-major ``(K, Q')``, so the pair ops run
        along the points instead of along a short K axis; the reach tests as arithmetic
        (:func:`~craft.finetune.proxy_kernels._beyond`) and
        the picks by :func:`_min0` (:func:`~craft.finetune.proxy_kernels.lane_pairs`). Cells holding fewer than
        K segments are padded with the dummy segment. The picked segments and every returned value are
        :meth:`_dense`'s."""
        dev = pos.device
        ucell, inv = torch.unique_consecutive(cid, return_inverse=True)
        U = ucell.shape[0]
        k = torch.arange(K, device=dev)[:, None]
        item = self.start.index_select(0, ucell)[None, :] + k  # (K, U); beyond a cell's count: the dummy
        item = torch.where(k < self.count.index_select(0, ucell)[None, :], item, torch.full_like(item, self.pad))
        useg = self.items.index_select(0, item.view(-1))  # (K * U,)
        # the pair features copied to the points: one contiguous (K, Q') block per feature
        f = self.featT[:_NPAIR].index_select(1, useg).view(_NPAIR * K, U).index_select(1, inv).view(_NPAIR, K, -1)
        edge = None
        if self.has_shoulder and bool(self.cell_shoulder.index_select(0, ucell).any()):
            edge = self.featT[_EDGE_REACH].index_select(0, useg).view(K, U).index_select(1, inv)
        return kernel(f, inv, useg, pos[:, 0], pos[:, 1], cy, sy, self.pair_cols, edge, cos_wrong, cap)

    def _dense(self, pos: Tensor, cy: Tensor, sy: Tensor, cid: Tensor, K: int, cos_wrong: float,
               cap: float) -> dict[str, Tensor]:
        """:meth:`query` for points sorted by cell whose cells hold exactly K segments; all inputs (Q',).

        The segment features are gathered once per distinct cell (``(U, F, K)``), then copied to the
        points as contiguous rows."""
        Qb = pos.shape[0]
        dev = pos.device
        ucell, inv = torch.unique_consecutive(cid, return_inverse=True)
        U = ucell.shape[0]
        useg = self.items.index_select(0, (self.start.index_select(0, ucell)[:, None]
                                           + torch.arange(K, device=dev)).view(-1))  # (U * K,)
        ufeat = self.featT[:_NPAIR].index_select(1, useg).view(_NPAIR, U, K)  # (F', U, K)
        f = ufeat.index_select(1, inv)  # (F', Qb, K): one contiguous block per feature
        g = lambda i: f[i]
        dx, dy = g(_DX), g(_DY)
        rx = pos[:, 0:1] - g(_AX)
        ry = pos[:, 1:2] - g(_AY)
        t = rx * dx
        t.addcmul_(ry, dy).mul_(g(_IL2))
        u = t.clamp(0.0, 1.0)
        ex = rx.addcmul_(u, dx, value=-1.0)  # rx - u dx
        ey = ry.addcmul_(u, dy, value=-1.0)
        d2 = ex.mul_(ex).addcmul_(ey, ey)
        on_road = ((t > g(_TLO)) & (t < g(_THI)) & (d2 <= g(_HW2))).any(-1)
        d = d2.sqrt_()
        inf = torch.full((), float("inf"), device=dev)
        cand = torch.where(d <= g(_REACH), d, inf)  # driving lanes within pick reach
        dmin, near = cand.min(-1)
        found = torch.isfinite(dmin)
        useg = useg.view(U, K)
        row = inv * K  # the point's cell's first entry in useg
        seg_near = useg.view(-1).index_select(0, row + near)
        col = self.cols
        cos_near = cy * col[_CH].index_select(0, seg_near) + sy * col[_SH].index_select(0, seg_near)
        opposite = found & (cos_near < cos_wrong) & ~(col[_JUNCTION].index_select(0, seg_near) > 0)
        cosd = cy[:, None] * g(_CH)
        cosd.addcmul_(sy[:, None], g(_SH))  # cos(yaw - lane heading)
        best = cand.add(cosd, alpha=-2.0).min(-1, keepdim=True).indices  # + 2 (1 - cos): pick_lane's heading cost
        # (min's indices: the first minimum, as argmin, and faster than argmin on CPU)
        center = torch.where(found, d.gather(1, best).squeeze(1), torch.full_like(cy, cap))
        lane = torch.where(found, self.lane.index_select(0, useg.view(-1).index_select(0, row + best.squeeze(1))),
                           torch.full((), -1, dtype=torch.long, device=dev))
        r = {"offroad": ~on_road, "opposite": opposite, "center_dist": center, "lane": lane}
        if self.has_shoulder and bool(self.cell_shoulder.index_select(0, ucell).any()):
            edge = self.featT[_EDGE_REACH].index_select(0, useg.view(-1)).view(U, K).index_select(0, inv)
            ce = torch.where(d <= edge, d, inf)
            emin, e = ce.min(-1)
            seg_e = useg.view(-1).index_select(0, row + e)
            r["emergency"] = torch.isfinite(emin) & (col[_SHOULDER].index_select(0, seg_e) > 0) & \
                (emin <= col[_HW].index_select(0, seg_e))
        else:  # no shoulder segment in these cells
            r["emergency"] = torch.zeros(Qb, dtype=torch.bool, device=dev)
        return r


# ---------------------------------------------------------------------- the route
class _Route:
    """A window of each state's route polyline as a flat segment table, for step-to-step projection.

    Built per chunk of ``Bc`` states. ``win (5, Bc * (W-1))``: start x/y, vector x/y, 1 / length^2 (what
    the search reads); ``out``: arc length at the start, length, unit direction x/y (read for the chosen
    segment only). Unusable segments (past the route's end, zero length) are moved far away (1e9 m), so
    they never win a projection while a usable one is in the window (the step-to-step window always holds
    the previous projection's segment, usable whenever the state has a route; without one every route
    term is zeroed). ``has_route (Bc,)``.
    """

    def __init__(self, state: WorldState, window: int):
        Bc, P = state.route_valid.shape
        start = (state.progress_idx - 20).clamp_min(0)
        W = max(2, min(window, P))
        j = (start[:, None] + torch.arange(W, device=start.device)).clamp(max=P - 1)  # (Bc, W)
        pts = state.route_pts.gather(1, j[..., None].expand(Bc, W, 2))
        cum = state.route_cum.gather(1, j)
        valid = state.route_valid.gather(1, j) & (torch.arange(W, device=j.device) < P - start[:, None])
        a, ab = pts[:, :-1], pts[:, 1:] - pts[:, :-1]
        l2 = (ab * ab).sum(-1)
        ok = valid[:, 1:] & valid[:, :-1] & (l2 > 1e-12)
        length = l2.sqrt().clamp_min(1e-9)
        far = torch.full((), 1e9, dtype=a.dtype, device=a.device)
        N = Bc * (W - 1)
        self.win = torch.stack([torch.where(ok, a[..., 0], far), torch.where(ok, a[..., 1], far), ab[..., 0],
                                ab[..., 1], 1.0 / l2.clamp_min(1e-12)], 0).reshape(5, N).contiguous()
        self.out = [x.reshape(N).contiguous() for x in (cum[:, :-1], length, ab[..., 0] / length, ab[..., 1] / length)]
        self.nseg = W - 1
        self.has_route = ok.any(-1)
        self.Bc = Bc

    def project(self, b: Tensor, j: Tensor, pos: Tensor, back: int, ahead: int) -> tuple[Tensor, ...]:
        """Project ``pos (Q, 2)`` of states ``b (Q,)`` onto route segments ``j - back .. j + ahead``.

        j: (Q,) long segment index of the previous projection. Returns ``j_new (Q,)``, ``dist (Q,)``,
        ``s (Q,)`` arc length of the projection, ``cos (Q,)``, ``sin (Q,)`` of the segment's direction.
        """
        off = torch.arange(-back, ahead + 1, device=pos.device)
        jj = (j[:, None] + off).clamp_(0, self.nseg - 1)  # (Q, A)
        row = (b * self.nseg)[:, None] + jj
        f = self.win.index_select(1, row.view(-1)).view(5, jj.shape[0], jj.shape[1])  # contiguous (Q, A) blocks
        rx = pos[:, 0:1] - f[0]
        ry = pos[:, 1:2] - f[1]
        # unfused, in this order: the rounding decides between the two segments of a vertex the point is
        # nearest to (an exact tie of distance, different heading), keep it as it always was
        u = ((rx * f[2] + ry * f[3]) * f[4]).clamp_(0.0, 1.0)
        ex, ey = rx - u * f[2], ry - u * f[3]
        d2 = ex * ex + ey * ey
        d2min, k = d2.min(-1, keepdim=True)
        r = row.gather(1, k).squeeze(1)  # the chosen segment's column
        cum, length, cos, sin = (x.index_select(0, r) for x in self.out)
        s = cum + u.gather(1, k).squeeze(1) * length
        return jj.gather(1, k).squeeze(1), d2min.squeeze(1).sqrt_(), s, cos, sin

    def tracker(self, b: Tensor, back: int, ahead: int, reference: bool = False, kernel: Callable = route_step):
        """:meth:`project` for repeated calls with the same states ``b (Q,)`` and window: the windows of
        every (state, segment) are laid out once as contiguous rows ``(5, Bc * nseg, A)``, so each step
        gathers one block per candidate (:func:`~craft.finetune.proxy_kernels.route_step`, or ``kernel``, its
        compiled form). Returns ``step(j, pos) -> (j_new, dist, s, cos, sin)``."""
        n = self.nseg
        off = torch.arange(-back, ahead + 1, device=b.device)
        jj = (torch.arange(n, device=b.device)[:, None] + off).clamp_(0, n - 1)  # (nseg, A)
        rows = (torch.arange(self.Bc, device=b.device)[:, None, None] * n + jj).view(-1)
        A = off.shape[0]
        win = self.win.index_select(1, rows).view(5, self.Bc * n, A)
        base = b * n

        if reference:
            def step(j: Tensor, pos: Tensor) -> tuple[Tensor, ...]:
                f = win.index_select(1, base + j)  # (5, Q, A)
                rx = pos[:, 0:1] - f[0]
                ry = pos[:, 1:2] - f[1]
                u = ((rx * f[2] + ry * f[3]) * f[4]).clamp_(0.0, 1.0)  # as in project (same rounding)
                ex, ey = rx - u * f[2], ry - u * f[3]
                d2 = ex * ex + ey * ey
                d2min, k = d2.min(-1, keepdim=True)
                j_new = (j + k.squeeze(1) - back).clamp_(0, n - 1)
                r = base + j_new
                cum, length, cos, sin = (x.index_select(0, r) for x in self.out)
                return j_new, d2min.squeeze(1).sqrt_(), cum + u.gather(1, k).squeeze(1) * length, cos, sin

            return step
        # window-major (5 * A, Bc * nseg): each step gathers (5 * A, Q) and the (A, Q) ops run along Q
        winT = win.permute(0, 2, 1).reshape(5 * A, self.Bc * n)
        Q = b.shape[0]
        colq = torch.arange(Q, device=b.device)

        out = tuple(self.out)

        def step_t(j: Tensor, pos: Tensor) -> tuple[Tensor, ...]:
            return kernel(winT, base, colq, out, j, pos, back, n)

        return step_t


# ---------------------------------------------------------------------- stop signs over a whole trajectory
# ---------------------------------------------------------------------- the counterfactual world
def _ongoing_contacts(cb: Tensor, cg: Tensor, ch: Tensor, cn: Tensor, overlap0: Tensor, G: int, H: int) -> Tensor:
    """Which colliding ``(b, g, h, n)`` pairs (each ``(P,)``) continue an overlap present at the snapshot.

    overlap0: (B, N) bool, the ego overlaps agent n at the snapshot. A pair is ongoing when the snapshot
    overlaps n and candidate g overlaps n at every step 0..h (no separation in between); a contact after a
    separation, or with another agent, is new. Returns (P,) bool."""
    cand = overlap0[cb, cn]
    if not bool(cand.any()):
        return cand
    idx = cand.nonzero().squeeze(1)
    N = overlap0.shape[1]
    key = (cb.index_select(0, idx) * G + cg.index_select(0, idx)) * N + cn.index_select(0, idx)
    h = ch.index_select(0, idx)
    order = torch.argsort(key * H + h)  # the pairs are unique, so within a key the steps are distinct
    ks, hs = key[order], h[order]
    at = torch.arange(len(ks), device=ks.device)
    first = torch.ones_like(ks, dtype=torch.bool)
    first[1:] = ks[1:] != ks[:-1]
    rank = at - torch.cummax(torch.where(first, at, torch.zeros_like(at)), 0).values
    out = torch.zeros_like(cand)
    out[idx[order]] = rank == hs  # the (rank + 1)-th step of the contact is step h: steps 0..h all overlap
    return out


class CounterfactualWorld:
    """Scores candidate trajectories of stored states with the decay-rollout forward model.

    maps: the :class:`MapBatch` the snapshots index with ``map_id``; cfg: :class:`ProxyConfig`;
    tracker_cfg: the closed-loop tracker's :class:`TrackerConfig` (default config if None); reference:
    run the unoptimised path (the world's ``track_prepared`` / ``bicycle_step`` per step, candidate-major
    route windows, point-major lane kernel) that the default path is tested against; same scores, slower.
    compile: the fast path: on CPU the lane query, the route tracking and the red-light / stop-sign rules
    as C loops
    (:mod:`craft.finetune.proxy_native`, built once per machine with the system C compiler, under a second),
    and the ego step and the reward sums through ``torch.compile`` (:mod:`craft.finetune.proxy_kernels`;
    tens of seconds per process, once, on the first :meth:`score`); scores equal to the default path
    within float tolerance, not bit for bit; each part falls back to the tensor code, with one stderr
    line, if it cannot be built. A run setting, not a hyper-parameter: it is not
    part of :class:`ProxyConfig` (a run resumes with or without it).
    """

    def __init__(self, maps: MapBatch, cfg: ProxyConfig = ProxyConfig(), tracker_cfg: TrackerConfig | None = None,
                 reference: bool = False, compile: bool = False):
        if not isinstance(maps, MapBatch):
            raise CraftError("CounterfactualWorld needs a MapBatch (the one the snapshots' map_id index)")
        self.maps = maps
        self.cfg = cfg
        self.tracker_cfg = tracker_cfg or TrackerConfig()
        self.reference = bool(reference)
        self.compile = bool(compile) and not self.reference
        self.kernels = Kernels.make(self.compile)
        self.device = maps.device
        # the lane query and the route tracking as C loops (CPU only; None: the tensor code)
        self.native = proxy_native.load() if self.compile and self.device.type == "cpu" else None
        self.lanes = _LaneIndex(maps, cfg.lane_grid_cell, cfg.lane_simplify_tol)
        lim = torch.zeros(len(AgentKind), 5)
        for k, v in _LIMITS.items():
            lim[int(k)] = torch.tensor(v)
        self._limits = lim.to(self.device)
        self._ego_limits = tuple(float(x) for x in _LIMITS[AgentKind.EGO])

    # ------------------------------------------------------------------ public
    def score(self, snapshot: WorldState, trajectories: Tensor, valid: Tensor,
              tracker: TrackerState | None = None) -> CandidateScores:
        """Simulate and score every candidate.

        snapshot: ``B`` stored states; trajectories: (B, G, T, 3) ego-frame candidates (x forward, y left,
        yaw; waypoint i at (i + 1) * waypoint_dt); valid: (B, G) bool; tracker: the ego's tracker memory
        at the snapshot, (B,)-batched (None: PID from zero).
        Returns :class:`CandidateScores`, all (B, G).
        """
        self._check(snapshot, trajectories, valid, tracker)
        B, G = valid.shape
        valid = valid.to(torch.bool)
        traj = torch.nan_to_num(trajectories.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
        parts = []
        # the others' decay rollout is small ((B, H, N)) and shared by the candidates: once for all states
        others = self.decay_rollout(snapshot) if B else None
        for b0 in range(0, B, self.cfg.chunk_states):  # chunks bound memory
            sl = slice(b0, min(B, b0 + self.cfg.chunk_states))
            tr = tracker.index(sl) if tracker is not None else None
            parts.append(self._score_chunk(snapshot.index(sl), traj[sl], tr, tuple(x[sl] for x in others)))
        terms = {k: torch.cat([p[0][k] for p in parts]) if parts else torch.zeros(B, G, device=valid.device)
                 for k in TERMS}
        collided = torch.cat([p[1] for p in parts]) if parts else torch.zeros(B, G, dtype=torch.bool,
                                                                             device=valid.device)
        zero = torch.zeros((), device=valid.device)
        terms = {k: torch.where(valid, v, zero) for k, v in terms.items()}
        returns = torch.zeros(B, G, device=valid.device)
        for v in terms.values():
            returns = returns + v
        adv, diag = group_normalise(returns, valid, self.cfg.reward.group_std_floor)
        diag["collided_share"] = (collided & valid).sum() / valid.sum().clamp_min(1)
        return CandidateScores(returns=returns, advantages=adv, terms=terms, collided=collided & valid,
                               diagnostics=diag)

    # ------------------------------------------------------------------ checks
    def _check(self, snapshot: WorldState, traj: Tensor, valid: Tensor, tracker: TrackerState | None) -> None:
        if not isinstance(snapshot, WorldState):
            raise CraftError("CounterfactualWorld.score: snapshot must be a WorldState")
        B = snapshot.batch_size
        if traj.dim() != 4 or traj.shape[0] != B or traj.shape[-1] != 3 or traj.shape[2] < 1:
            raise CraftError(f"CounterfactualWorld.score: trajectories must have shape (B={B}, G, T, 3), "
                             f"got {tuple(traj.shape)}")
        if tuple(valid.shape) != tuple(traj.shape[:2]):
            raise CraftError(f"CounterfactualWorld.score: valid must have shape (B, G) = {tuple(traj.shape[:2])}, "
                             f"got {tuple(valid.shape)}")
        if tracker is not None and tuple(tracker.integral.shape) != (B,):
            raise CraftError(f"CounterfactualWorld.score: tracker memory must be (B,) = ({B},), "
                             f"got {tuple(tracker.integral.shape)}")
        if B and int(snapshot.map_id.max()) >= self.maps.num_maps:
            raise CraftError(f"CounterfactualWorld.score: snapshot map_id {int(snapshot.map_id.max())} is not in "
                             f"the map batch ({self.maps.num_maps} maps)")
        K = self.maps.light_pos.shape[1]
        Q = self.maps.stop_trigger.shape[1]
        if snapshot.light_done.shape[1] != K or snapshot.stop_inside.shape[1] != Q:
            raise CraftError("CounterfactualWorld.score: the snapshot's light / stop-sign slots do not match the "
                             "map batch; score with the MapBatch the snapshots were made on")

    # ------------------------------------------------------------------ decay rollout of the others
    def decay_rollout(self, st: WorldState) -> tuple[Tensor, Tensor, Tensor]:
        """Other agents' futures under the decay rollout: ``pos (B, H, N, 2)``, ``yaw (B, H, N)`` after each
        step, and ``valid (B, N)`` (the ego, agent 0, is excluded)."""
        cfg = self.cfg
        mb = self.maps
        H, dt = cfg.horizon, cfg.dt
        valid = st.valid.clone()
        valid[:, 0] = False
        moving = valid & (st.mode != Mode.STATIC) & ~st.hold
        ped = st.kind == int(AgentKind.PEDESTRIAN)
        lane = st.lane
        conn = (lane >= 0) & (take(mb.lane_junction, st.map_id[:, None], lane.clamp_min(0)) >= 0)
        hold = torch.where(conn, torch.full_like(st.speed, cfg.hold_time_junction),
                           torch.full_like(st.speed, cfg.hold_time))
        ramp = torch.where(conn, torch.full_like(st.speed, cfg.brake_ramp_junction),
                           torch.full_like(st.speed, cfg.brake_ramp))
        lim = self._limits[st.kind]  # (B, N, 5)
        a_hold = st.accel if cfg.hold_accel else torch.zeros_like(st.accel)
        a_hold = torch.nan_to_num(a_hold)
        pos, yaw, speed, steer = st.pos, st.yaw, st.speed, st.steer
        ped_v0 = st.speed
        out_pos, out_yaw = [], []
        for h in range(H):  # loop over time only
            t = h * dt
            after = t >= hold - 1e-6
            frac = ((t - hold + dt) / ramp).clamp(0.0, 1.0)
            accel = torch.where(after, torch.minimum(a_hold.clamp(max=0.0), -cfg.brake_decel * frac), a_hold)
            npos, nyaw, nspeed, nsteer = bicycle_step(pos, yaw, speed, steer, accel, steer, st.wheelbase, dt,
                                                      lim[..., 0], lim[..., 1], lim[..., 2], lim[..., 3], lim[..., 4])
            ped_cmd = torch.where(after, torch.zeros_like(speed), ped_v0)
            ped_acc = torch.where(after, (cfg.ped_decel * frac).clamp_min(1e-6), lim[..., 0])
            ppos, pyaw, pspeed = pedestrian_step(pos, yaw, speed, yaw, ped_cmd, dt, ped_acc, lim[..., 2],
                                                 torch.maximum(lim[..., 4], speed))
            pos = torch.where((moving & ped)[..., None], ppos, torch.where(moving[..., None], npos, pos))
            yaw = torch.where(moving & ped, pyaw, torch.where(moving, nyaw, yaw))
            speed = torch.where(moving & ped, pspeed, torch.where(moving, nspeed, speed))
            steer = torch.where(moving & ~ped, nsteer, steer)
            out_pos.append(pos)
            out_yaw.append(yaw)
        return torch.stack(out_pos, 1), torch.stack(out_yaw, 1), valid

    # ------------------------------------------------------------------ the ego
    def _ego_init(self, st: WorldState, traj: Tensor, tracker: TrackerState | None) -> dict:
        """Flattened (Q = B * G) ego state at the snapshot, the prepared plans and the tracker memory."""
        B, G = traj.shape[:2]
        Q = B * G
        bq = torch.arange(B, device=traj.device).repeat_interleave(G)
        pos0, yaw0 = st.pos[:, 0], st.yaw[:, 0]
        plan = ego_to_world(traj, pos0[:, None].expand(B, G, 2), yaw0[:, None].expand(B, G))
        pos = pos0[bq]
        if tracker is None:
            ts = TrackerState.zeros(Q, traj.device)
        else:
            ts = TrackerState(tracker.integral[bq], tracker.prev_error[bq], tracker.prev_valid()[bq])
        geom = prepare_plan(plan.reshape(Q, traj.shape[2], 3), pos, self.tracker_cfg)
        return {"pos": pos, "yaw": yaw0[bq], "speed": st.speed[bq, 0], "steer": st.steer[bq, 0],
                "wheelbase": st.wheelbase[bq, 0], "geom": geom, "tracker": ts}

    def _ego_step(self, ego: dict, h: int) -> tuple[Tensor, Tensor, Tensor]:
        """Virtual step h of the ego: the world's tracker, then its bicycle (as ``World.step`` does with a
        :class:`~craft.world.autopilot.PlanExecutor`); updates ``ego`` in place, returns pos, yaw, speed."""
        dt = self.cfg.dt
        accel, steer_cmd, ego["tracker"] = track_prepared(ego["geom"], h * dt, ego["pos"], ego["yaw"], ego["speed"],
                                                          ego["wheelbase"], ego["tracker"], self.tracker_cfg, dt)
        accel = torch.nan_to_num(accel, nan=0.0, posinf=0.0, neginf=0.0)
        steer_cmd = torch.nan_to_num(steer_cmd, nan=0.0, posinf=0.0, neginf=0.0)
        ego["pos"], ego["yaw"], ego["speed"], ego["steer"] = bicycle_step(
            ego["pos"], ego["yaw"], ego["speed"], ego["steer"], accel, steer_cmd, ego["wheelbase"], dt,
            *self._ego_limits)
        return ego["pos"], ego["yaw"], ego["speed"]

    def _ego_loop(self, ego: dict) -> tuple[Tensor, Tensor, Tensor]:
        """All H virtual steps of the ego, time-major: ``pos (H, Q, 2)``, ``yaw (H, Q)``, ``speed (H, Q)``."""
        H = self.cfg.horizon
        Q = ego["speed"].shape[0]
        P = ego["pos"].new_empty(H, Q, 2)
        Y = ego["yaw"].new_empty(H, Q)
        V = ego["speed"].new_empty(H, Q)
        for h in range(H):  # loop over time only: the tracker and the bicycle, nothing else
            p, y, v = self._ego_step(ego, h)
            P[h], Y[h], V[h] = p, y, v
        return P, Y, V

    def _ego_loop_fused(self, ego: dict) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_ego_loop` with the tracker and the bicycle written out for this use (same operations in
        the same order, so the same rounding): limits as scalars, the wheelbase clamped once, x / y kept
        apart, one gather of a stacked segment table for the lookahead point, the plan's target speed
        interpolated once per step, the nearest segment by :func:`_min0`, the arc-length search as a count
        of ``sign(s - cum) = 1`` (``searchsorted``'s result on sorted arc lengths). Returns ``pos (H, Q, 2)``, ``yaw (H, Q)``, ``speed (H, Q)``."""
        H, dt = self.cfg.horizon, self.cfg.dt
        tc = self.tracker_cfg
        g = ego["geom"]
        Q = ego["speed"].shape[0]
        dev, dtype = ego["speed"].device, ego["speed"].dtype
        f32 = lambda x: float(torch.tensor(x, dtype=dtype))  # a limit as the float32 the world computes with
        max_accel, max_brake, max_steer, max_steer_rate, max_speed = self._ego_limits
        max_accel, max_brake, max_speed = f32(max(max_accel, 0.0)), f32(max(max_brake, 0.0)), f32(max(max_speed, 0.0))
        max_steer = f32(min(max(max_steer, 0.0), _STEER_ABS_CAP))
        max_delta = float(torch.tensor(max(max_steer_rate, 0.0), dtype=dtype) * dt)
        c = EgoConsts(dt=dt, stop_speed=tc.stop_speed, integral_band=tc.integral_band,
                      integral_limit=tc.integral_limit, kp=tc.kp, ki=tc.ki, kd=tc.kd, stop_decel=tc.stop_decel,
                      lookahead_min=tc.lookahead_min, lookahead_gain=tc.lookahead_gain,
                      lookahead_max=tc.lookahead_max, max_delta=max_delta, max_steer=max_steer, max_brake=max_brake,
                      max_accel=max_accel, max_speed=max_speed)
        wb_track = ego["wheelbase"].clamp_min(1e-3)  # the tracker's clamp, then the bicycle's
        S = g.seg_len.shape[1]
        # segment-major (S, Q) copies: the per-step (segment, candidate) ops then run along Q (vectorised)
        plan = {k: x.t().contiguous() for k, x in (("ax", g.ax), ("ay", g.ay), ("sx", g.sx), ("sy", g.sy),
                                                   ("l2c", g.seg_len2c), ("cum", g.cum))}  # cum: (S + 1, Q)
        plan["tab"] = torch.stack([plan["cum"][:S], g.seg_len.t(), plan["ax"], plan["sx"], plan["ay"], plan["sy"]],
                                  0).view(6, S * Q)  # rows: one gather
        plan.update(col=torch.arange(Q, device=dev), total=g.total, end_x=g.points[:, -1, 0].contiguous(),
                    end_y=g.points[:, -1, 1].contiguous(), dir_x=g.direction[:, 0].contiguous(),
                    dir_y=g.direction[:, 1].contiguous(), stationary=g.stationary, two_wb=2.0 * wb_track,
                    wb_bike=wb_track.clamp_min(_MIN_WHEELBASE))
        stat_idx = g.stationary.nonzero().squeeze(1)  # the stop-in-place plans (usually few)
        stat = None
        if stat_idx.shape[0] > 0:
            stat = {"idx": stat_idx, "two_wb": plan["two_wb"].index_select(0, stat_idx),
                    "final_yaw": g.final_yaw.index_select(0, stat_idx)}
        seg_speed = g.seg_speed.t().contiguous().t()  # (Q, T) with contiguous columns (read one per step)
        ts = ego["tracker"]
        integral, prev_error, prev_valid = ts.integral, ts.prev_error, ts.prev_valid()
        first_valid = bool(prev_valid.all())
        px, py = ego["pos"][:, 0].contiguous(), ego["pos"][:, 1].contiguous()
        yaw, speed, steer = ego["yaw"], ego["speed"], ego["steer"]
        P = ego["pos"].new_empty(H, Q, 2)
        Y = yaw.new_empty(H, Q)
        V = speed.new_empty(H, Q)
        step = self.kernels.ego_step
        for h in range(H):
            target = _plan_speed_scalar(seg_speed, h * dt + 0.0, tc, dtype)  # the plan's speed ahead in time
            dmask = prev_valid if not (h > 0 or first_valid) else None  # no derivative without history
            px, py, yaw, speed, steer, integral, prev_error = step(px, py, yaw, speed, steer, integral, prev_error,
                                                                   target, dmask, plan, stat, c)
            P[h, :, 0], P[h, :, 1] = px, py
            Y[h], V[h] = yaw, speed
        return P, Y, V

    def ego_rollout(self, snapshot: WorldState, trajectories: Tensor,
                    tracker: TrackerState | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The ego following each candidate for H steps (no scoring): ``pos (B, G, H, 2)``, ``yaw (B, G, H)``,
        ``speed (B, G, H)`` after each step. trajectories: (B, G, T, 3) ego frame."""
        self._check(snapshot, trajectories, torch.ones(trajectories.shape[:2], dtype=torch.bool), tracker)
        B, G = trajectories.shape[:2]
        ego = self._ego_init(snapshot, trajectories.to(torch.float32), tracker)
        P, Y, V = (self._ego_loop if self.reference else self._ego_loop_fused)(ego)
        H = self.cfg.horizon
        return (P.view(H, B, G, 2).permute(1, 2, 0, 3).contiguous(), Y.view(H, B, G).permute(1, 2, 0).contiguous(),
                V.view(H, B, G).permute(1, 2, 0).contiguous())

    # ------------------------------------------------------------------ one chunk
    def _lights_now(self, st: WorldState) -> Tensor:
        """(Bc, K) light states of the snapshots (the world's :meth:`World.lights`), held over the horizon."""
        ls = light_states(self.maps, st.map_id, st.step.to(torch.float32) * self.cfg.events.dt)
        return torch.where(st.light_override >= 0, st.light_override, ls)

    def _select_lights(self, st: WorldState, reach: Tensor) -> dict[str, Tensor] | None:
        """The ``light_slots`` nearest red, not yet run lights within ``reach (Bc,)`` of each ego; None if none."""
        mb, m = self.maps, st.map_id
        lp = mb.light_pos[m]  # (Bc, K, 2)
        d = (lp - st.pos[:, 0:1]).norm(dim=-1)
        ok = mb.light_valid[m] & (self._lights_now(st) == int(LightState.RED)) & ~st.light_done & \
            (d <= reach[:, None])
        if not bool(ok.any()):
            return None
        n = min(self.cfg.light_slots, ok.shape[1])
        dist, k = torch.where(ok, d, torch.full_like(d, float("inf"))).topk(n, dim=1, largest=False)
        lane = mb.light_lane[m].gather(1, k)
        return {
            "k": k, "ok": torch.isfinite(dist), "pos": lp.gather(1, k[..., None].expand(-1, -1, 2)),
            "heading": mb.light_heading[m].gather(1, k), "lane": lane,
            "half_width": 0.5 * take(mb.lane_width, m[:, None], lane.clamp_min(0)),
        }

    def _select_stops(self, st: WorldState, reach: Tensor) -> dict[str, Tensor] | None:
        """The ``stop_slots`` nearest stop signs within ``reach (Bc,)`` (trigger centre), with the
        snapshot's ``stop_inside`` / ``stop_ok``; None if none."""
        mb, m = self.maps, st.map_id
        trig = mb.stop_trigger[m]  # (Bc, Q, 5)
        d = (trig[..., :2] - st.pos[:, 0:1]).norm(dim=-1)
        ok = mb.stop_valid[m] & (d <= reach[:, None] + trig[..., 3])
        if not bool(ok.any()):
            return None
        n = min(self.cfg.stop_slots, ok.shape[1])
        dist, k = torch.where(ok, d, torch.full_like(d, float("inf"))).topk(n, dim=1, largest=False)
        return {
            "ok": torch.isfinite(dist), "trig": trig.gather(1, k[..., None].expand(-1, -1, 5)),
            "heading": mb.stop_heading[m].gather(1, k), "inside": st.stop_inside.gather(1, k),
            "served": st.stop_ok.gather(1, k),
        }

    def _score_chunk(self, st: WorldState, traj: Tensor, tracker: TrackerState | None,
                     others: tuple[Tensor, Tensor, Tensor]):
        """Score one chunk: st has Bc states, traj (Bc, G, T, 3), others: their :meth:`decay_rollout`.
        Returns (terms dict of (Bc, G), collided).

        Only the tracker and the bicycle feed back into the ego's motion, so the H-step loop runs them
        alone; the map, light and stop-sign terms are computed afterwards on all ``H * Q`` points at
        once, the route projection keeps its step-to-step search window in a cheap loop of its own, and
        the first collision masks the later steps. Everything per step is time-major ``(H, Q)``."""
        cfg, ecfg, rcfg = self.cfg, self.cfg.events, self.cfg.reward
        mb = self.maps
        Bc, G = traj.shape[:2]
        H, dt = cfg.horizon, cfg.dt
        dev = traj.device
        Q = Bc * G
        bq = torch.arange(Bc, device=dev).repeat_interleave(G)  # (Q,) state of each candidate
        zero = torch.zeros((), device=dev)

        o_pos, o_yaw, o_valid = others  # the decay rollout of the other agents

        # ---- the ego: tracker + bicycle, the only per-step loop over the full candidate set
        e_pos0, e_yaw0 = st.pos[:, 0], st.yaw[:, 0]
        ego_loop = self._ego_loop if self.reference else self._ego_loop_fused
        pos, yaw, speed = ego_loop(self._ego_init(st, traj, tracker))  # (H, Q, 2), (H, Q), (H, Q)
        cy, sy = torch.cos(yaw), torch.sin(yaw)
        lim = self._ego_limits

        # ---- route: the projection before the first step (whole window), then tracked step to step
        route = _Route(st, cfg.route_window)
        b0 = torch.arange(Bc, device=dev)
        j0, rd0, s0, rc0, rs0 = route.project(b0, torch.zeros(Bc, dtype=torch.long, device=dev), e_pos0, 0,
                                              route.nseg - 1)
        has_route = route.has_route
        if self.native is not None:  # the same tracking as one C loop per candidate
            rdist, s_now, rc, rs = proxy_native.route_track(self.native, route, pos, bq, j0.index_select(0, bq),
                                                            cfg.route_search_back, cfg.route_search_ahead)
        else:
            rdist, s_now, rc, rs = (pos.new_empty(H, Q) for _ in range(4))
            j = j0.index_select(0, bq)
            step = route.tracker(bq, cfg.route_search_back, cfg.route_search_ahead, self.reference,
                                 self.kernels.route_step)
            for h in range(H):  # the projection window follows the previous step's segment
                j, rdist[h], s_now[h], rc[h], rs[h] = step(j, pos[h])
        hr = has_route.index_select(0, bq)  # (Q,)

        # ---- lane terms: one query on the snapshots' egos, one on all H * Q points
        if self.native is not None:  # the same rules as one C loop per point (no sort, no pair copies)
            cos_wrong = math.cos(math.radians(ecfg.wrong_direction_deg))
            lane0 = proxy_native.lane_query(self.native, self.lanes, st.map_id, 1, e_pos0, torch.cos(e_yaw0),
                                            torch.sin(e_yaw0), cos_wrong, ecfg.lane_dist_cap)
            lane = proxy_native.lane_query(self.native, self.lanes, st.map_id, G, pos.view(H * Q, 2), cy.view(-1),
                                           sy.view(-1), cos_wrong, ecfg.lane_dist_cap)
        else:
            lane0 = self.lanes.query(st.map_id, e_pos0, e_yaw0, ecfg, self.reference,
                                     pair_kernel=self.kernels.lane_pairs)
            lane = self.lanes.query(st.map_id.view(1, Bc, 1), pos.view(H, Bc, G, 2), yaw.view(H, Bc, G), ecfg,
                                    self.reference, cos_sin=(cy, sy), pair_kernel=self.kernels.lane_pairs)
        lane = {k: v.view(H, Q) for k, v in lane.items()}
        head0 = torch.atan2(torch.sin(e_yaw0) * rc0 - torch.cos(e_yaw0) * rs0,
                            torch.cos(e_yaw0) * rc0 + torch.sin(e_yaw0) * rs0).abs()

        # ---- lights and stop signs within reach of the horizon, from the whole trajectory
        t_h = H * dt
        reach = st.speed[:, 0] * t_h + 0.5 * lim[0] * t_h * t_h + st.length[:, 0] + ecfg.red_light_radius
        lights = self._select_lights(st, reach)
        stops = self._select_stops(st, reach)
        red = stp = None
        ar_g = torch.arange(G, device=dev)

        def rows(ok: Tensor) -> tuple[Tensor, Tensor, int]:
            """Candidates (columns of Q) of the states with a checked slot, their state, and the slots used."""
            sel = ok.any(1).nonzero().squeeze(1)
            return (sel[:, None] * G + ar_g).view(-1), sel.repeat_interleave(G), int(ok.sum(1).max())

        if lights is not None:
            # the rear point crosses a red stop line of the ego's lane (events._red_lights); only the
            # candidates of states with a red light in reach, only the slots in use (they come first)
            qs, bs, n = rows(lights["ok"])
            L = {k: v[:, :n].index_select(0, bs) for k, v in lights.items()}  # (Qs, n[, 2])
            p_s, cy_s, sy_s = pos.index_select(1, qs), cy.index_select(1, qs), sy.index_select(1, qs)
            half = 0.5 * st.length[:, 0].index_select(0, bs)
            e_rear = e_pos0 - 0.5 * st.length[:, 0:1] * torch.stack([torch.cos(e_yaw0), torch.sin(e_yaw0)], -1)
            cur = lane["lane"].index_select(1, qs)
            ctrl = torch.where(cur >= 0, take(mb.lane_light, st.map_id.index_select(0, bs)[None], cur.clamp_min(0)),
                               torch.full_like(cur, -1))
            rule = red_light_runs if self.native is None else partial(proxy_native.red_light_runs, self.native)
            run = rule(p_s, cy_s, sy_s, half, e_rear.index_select(0, bs), cur, ctrl, L, ecfg.red_light_radius)
            red = torch.zeros(H, Q, dtype=torch.bool, device=dev).index_copy_(1, qs, run)
        if stops is not None:
            # leaving the trigger area without having stopped in it (events._stop_signs)
            qs, bs, n = rows(stops["ok"])
            S = {k: v[:, :n].index_select(0, bs) for k, v in stops.items()}  # (Qs, n[, 5])
            p_s, cy_s, sy_s = pos.index_select(1, qs), cy.index_select(1, qs), sy.index_select(1, qs)
            trig = S["trig"]
            sux, suy = torch.cos(trig[..., 2]), torch.sin(trig[..., 2])
            rule = stop_sign_violations if self.native is None else partial(proxy_native.stop_violations, self.native)
            viol = rule(p_s, cy_s, sy_s, speed.index_select(1, qs), trig, sux, suy, torch.cos(S["heading"]),
                        torch.sin(S["heading"]), S["ok"], S["inside"] & S["ok"], S["served"], ecfg.stop_speed)
            stp = torch.zeros(H, Q, dtype=torch.bool, device=dev).index_copy_(1, qs, viol)

        # ---- collisions against the decay rollout, first counted one per candidate
        ep = pos.view(H, Bc, G, 2).permute(1, 2, 0, 3)  # (Bc, G, H, 2) views of the time-major tensors
        ey = yaw.view(H, Bc, G).permute(1, 2, 0)
        ev = speed.view(H, Bc, G).permute(1, 2, 0)
        cb, cg, ch, cn = candidate_collision_pairs(ep, ey, st.length[:, 0], st.width[:, 0], o_pos, o_yaw,
                                                   st.length, st.width, o_valid[:, None].expand(Bc, H, -1))
        # an overlap the snapshot already has is no new collision while it lasts (the world's de-duplication)
        overlap0 = ego_collisions(st.pos, st.yaw, st.length, st.width, st.valid) & o_valid  # (Bc, N)
        counted = (ev[cb, cg, ch] >= ecfg.collision_min_speed) & ~_ongoing_contacts(cb, cg, ch, cn, overlap0, G, H)
        first = torch.full((Q,), H, dtype=torch.long, device=dev)
        if cb.numel():
            first.scatter_reduce_(0, (cb * G + cg)[counted], ch[counted], reduce="amin")
        collided = first < H
        hidx = torch.arange(H, device=dev)
        disc = rcfg.gamma ** hidx.to(pos.dtype)
        if cfg.stop_after_collision:  # no reward after the first counted collision
            alive = hidx[:, None] <= first  # (H, Q)
            w = torch.where(alive, disc[:, None], zero)
        else:
            alive = None
            w = disc[:, None]
        # the dense rewards of every step and their discounted sums (one fused kernel when compiled)
        sums = self.kernels.reward_sums(hr, rdist, s_now, rc, rs, cy, sy, lane["center_dist"], lane["offroad"],
                                        lane["opposite"], lane["emergency"], torch.where(has_route, rd0, zero)
                                        .index_select(0, bq), s0.index_select(0, bq),
                                        torch.where(has_route, head0, zero).index_select(0, bq),
                                        lane0["center_dist"].index_select(0, bq), w, ecfg.offroute_dist, rcfg)
        out = {k: v.view(Bc, G) for k, v in sums.items()}
        fc = first.clamp(max=H - 1)
        v_hit = speed.gather(0, fc[None]).squeeze(0)
        out["collision"] = torch.where(collided, collision_penalty(v_hit, rcfg) * disc.index_select(0, fc),
                                       zero).view(Bc, G)
        for name, flag, pen in (("red_light", red, rcfg.red_light_penalty), ("stop_sign", stp, rcfg.stop_sign_penalty)):
            if flag is None:
                out[name] = torch.zeros(Bc, G, device=dev)
            else:
                hit = (flag & alive).any(0) if alive is not None else flag.any(0)
                out[name] = -pen * hit.to(pos.dtype).view(Bc, G)
        return out, collided.view(Bc, G)
