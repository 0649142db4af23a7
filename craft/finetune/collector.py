"""On-policy closed-loop collection for fine-tuning.

A :class:`Collector` keeps ``worlds`` routes of a split running in one batched :class:`~craft.world.world.World`
across calls (an asynchronous collector in the paper; here a component that takes the current policy and
returns a buffer, with no ties to the trainer). Every ``replan_every`` simulator steps each running world
asks the policy for its candidate set, **samples** a candidate from pi_old (top-1 is for evaluation), and
executes it through the shared tracker until the next decision. Routes come in *waves*: all ``worlds`` start
together; when fewer than ``min_live`` of them are still running, the rest are truncated and the next wave of
routes starts (routes cycle through the split deterministically).

The :class:`Buffer` is laid out as (decision step ``T``, world ``W``) with a ``live`` mask; a decision is a
transition when ``live``. Per decision it holds the observation, the whole candidate set, the chosen index,
log pi_old, the privileged snapshot of the world (``WorldState`` rows and the tracker memory, for the
counterfactual world) and the world's :class:`~craft.world.state.StepEvents` of the executed steps
(``(T, k, W)`` per field) from which grounded and dense rewards are computed. ``notdone[t, w]`` is False when
the route ended during the steps executed after decision ``t`` or the wave was cut there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from craft.errors import CraftError
from craft.policies.base import CandidatePolicy, CandidateSet
from craft.world.observe import Observation, observe
from craft.world.state import WorldState, resize_state

EVENT_FIELDS = ("collision_pedestrian", "collision_vehicle", "collision_layout", "collision_any", "red_light",
                "stop_infraction", "progress", "offroad", "opposite_lane", "offroute", "emergency_lane",
                "stop_zone", "go_zone", "route_dist", "lane_center_dist", "heading_error", "speed", "done")


@dataclass(frozen=True)
class CollectorConfig:
    split: str = "train"
    worlds: int = 128
    """Routes driven in parallel."""
    replan_every: int = 5
    """Simulator steps between decisions (5 x 0.1 s = 0.5 s, the waypoint spacing)."""
    buffer_size: int = 2048
    """Transitions per buffer (the paper's B)."""
    min_live: float = 0.25
    """Start the next wave when fewer than this share of the wave's routes are still running."""
    routes: int | None = None
    """Routes per scenario type (default: the split's)."""
    town_seeds: tuple[int, ...] | None = None
    """Override the split's town seeds (fewer towns: faster start-up)."""
    types: tuple[str, ...] | None = None
    """Only these scenario types."""
    seed: int = 0
    """Route order, background traffic and candidate sampling seed."""

    def __post_init__(self):
        if self.worlds < 1 or self.buffer_size < 1 or self.replan_every < 1:
            raise CraftError("CollectorConfig: worlds, buffer_size and replan_every must be >= 1")
        if not 0 <= self.min_live < 1:
            raise CraftError(f"CollectorConfig.min_live must be in [0, 1), got {self.min_live}")


@dataclass
class Buffer:
    """Transitions laid out as (T decisions, W worlds); see the module docstring.

    live, notdone: (T, W) bool; chosen: (T, W) long; logp_old: (T, W); obs: Observation of the live
    decisions only, in row-major (t, w) order (``flat`` maps (T, W) -> its rows); candidates: CandidateSet of
    the live decisions (N, G, ...); snapshot: WorldState rows (N); tracker: dict of (N,) tensors;
    events: field -> (T, k, W); route: (T, W) long index of the route driven.
    """

    live: Tensor
    notdone: Tensor
    chosen: Tensor
    logp_old: Tensor
    obs: Observation
    candidates: CandidateSet
    snapshot: WorldState
    tracker: dict[str, Tensor]
    events: dict[str, Tensor]
    route: Tensor
    info: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.live.sum())

    def flat(self, x: Tensor) -> Tensor:
        """(T, W, ...) -> (N, ...) rows of the live decisions in (t, w) order."""
        return x[self.live]


class Collector:
    """Keeps routes running between calls; ``collect(policy)`` returns the next :class:`Buffer`."""

    def __init__(self, cfg: CollectorConfig = CollectorConfig(), device: str = "cpu",
                 shard: tuple[int, int] = (0, 1)):
        """shard ``(i, n)``: drive only every n-th route of the seeded order starting at i, with a sampling
        stream of its own (one of n collectors feeding one learner; ``(0, 1)``: every route, as before)."""
        from craft.scenarios.splits import load_split
        from craft.world.world import World

        self.cfg = cfg
        self.device = device
        self.instances, towns = load_split(cfg.split, town_seeds=list(cfg.town_seeds) if cfg.town_seeds else None,
                                           routes=cfg.routes, types=list(cfg.types) if cfg.types else None)
        self.world = World(towns, device=device)
        g = torch.Generator().manual_seed(cfg.seed)
        self.order = torch.randperm(len(self.instances), generator=g).tolist()
        i, n = shard
        if not (0 <= i < n):
            raise CraftError(f"Collector: shard {shard} must be (i, n) with 0 <= i < n")
        if n > 1:
            self.order = self.order[i::n] or self.order[i % len(self.order)::len(self.order)]
        self.wave = 0
        self.sample_gen = torch.Generator().manual_seed(cfg.seed + 1 + (1_000_003 * (i + 1) if n > 1 else 0))
        self._state = None

    # ------------------------------------------------------------------ waves
    def _start_wave(self) -> None:
        from craft.scenarios.base import start
        from craft.world.autopilot import PlanExecutor

        n = min(self.cfg.worlds, len(self.instances))
        k0 = self.wave * n
        self.wave_routes = [self.order[(k0 + i) % len(self.order)] for i in range(n)]
        insts = [self.instances[i] for i in self.wave_routes]
        self.state, self.table = start(self.world, insts, seed=self.cfg.seed * 100_003 + self.wave)
        self.ex = PlanExecutor(n, self.state.device, dt=self.world.cfg.dt)
        self.wave += 1
        self._state = "running"

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue identically: the running wave (world state, scripts,
        plans and tracker memory), the wave counter and the sampling RNG. The maps are rebuilt from seeds."""
        d = {"wave": self.wave, "sample_gen": self.sample_gen.get_state(), "config": dataclasses.asdict(self.cfg),
             "running": self._state == "running"}
        if self._state == "running":
            d.update(state=self.state, table=self.table, wave_routes=self.wave_routes,
                     ex={k: getattr(self.ex, k) for k in ("plan_world", "plan_pos0", "age", "tracker")})
        return d

    def load_state_dict(self, d: dict) -> None:
        from craft.world.autopilot import PlanExecutor

        if "workers" in d:  # saved by craft.finetune.distributed.RayCollector
            raise CraftError(f"--resume: the run was collected with --workers {d['workers']}; resume it with the "
                             "same --workers")
        if d["config"] != dataclasses.asdict(self.cfg):
            raise CraftError("collector state was saved with a different collector configuration")
        self.wave = int(d["wave"])
        self.sample_gen.set_state(d["sample_gen"])
        self._state = None
        if d["running"]:
            self.state, self.table, self.wave_routes = d["state"], d["table"], d["wave_routes"]
            self.ex = PlanExecutor(self.state.batch_size, self.state.device, dt=self.world.cfg.dt)
            for k, v in d["ex"].items():
                setattr(self.ex, k, v)
            self._state = "running"

    # ------------------------------------------------------------------ collection
    @torch.no_grad()
    def collect(self, policy: CandidatePolicy, sample: bool = True) -> Buffer:
        """Drive ``policy`` until ``buffer_size`` transitions are stored; returns them."""
        from craft.scenarios.script import apply

        cfg = self.cfg
        policy.eval()
        obs_cfg = policy.cfg.encoder.obs_config
        rows: dict[str, list] = {k: [] for k in ("live", "notdone", "chosen", "logp", "route")}
        obs_l, cand_l, snap_l, trk_l = [], [], [], []
        ev_l: list[dict[str, Tensor]] = []
        total = 0
        waves_started = 0
        while total < cfg.buffer_size:
            if self._state != "running":
                self._start_wave()
                waves_started += 1
            st = self.state
            live = ~st.done
            W = live.shape[0]
            obs = observe(self.world.maps, st, self.world.lights(st), obs_cfg)
            cs = policy(obs)
            idx = cs.sample(self.sample_gen) if sample else cs.top1()
            logp = cs.log_probs().gather(1, idx[:, None]).squeeze(1)
            # store the live decisions of this step
            li = torch.nonzero(live).squeeze(1)
            obs_l.append(obs.index(li))
            cand_l.append(CandidateSet(cs.trajectories[li], cs.valid[li], cs.logits[li]))
            snap_l.append(st.index(li).clone())
            trk_l.append({k: getattr(self.ex.tracker, k)[li].clone() if getattr(self.ex.tracker, k) is not None
                          else torch.ones(len(li), dtype=torch.bool, device=li.device)
                          for k in ("integral", "prev_error", "has_prev")})
            self.ex.set_plan(st, cs.select(idx))
            evs = {k: [] for k in EVENT_FIELDS}
            for _ in range(cfg.replan_every):
                st, self.table = apply(st, self.table, maps=self.world.maps, dt=self.world.cfg.dt)
                control = self.ex.control(st) + self.table.ego_perturbation
                st, ev = self.world.step(st, control)
                for k in EVENT_FIELDS:
                    evs[k].append(getattr(ev, k))
            self.state = st
            ev_l.append({k: torch.stack(v) for k, v in evs.items()})  # (k, W)
            still = ~st.done
            rows["live"].append(live)
            rows["chosen"].append(idx)
            rows["logp"].append(logp)
            rows["route"].append(torch.tensor(self.wave_routes, device=live.device))
            total += int(live.sum())
            cut = bool(still.float().mean() < cfg.min_live)
            rows["notdone"].append(still & live & (not cut))
            if cut or not bool(still.any()):
                self._state = None
        # the decision that filled the buffer ends it: no bootstrapping across buffers
        notdone = torch.stack(rows["notdone"])
        notdone[-1] = False
        buf = Buffer(
            live=torch.stack(rows["live"]), notdone=notdone, chosen=torch.stack(rows["chosen"]),
            logp_old=torch.stack(rows["logp"]), obs=Observation.cat(obs_l),
            candidates=CandidateSet(torch.cat([c.trajectories for c in cand_l]),
                                    torch.cat([c.valid for c in cand_l]), torch.cat([c.logits for c in cand_l])),
            snapshot=_concat_states(snap_l), tracker={k: torch.cat([t[k] for t in trk_l]) for k in trk_l[0]},
            events={k: torch.stack([e[k] for e in ev_l]) for k in EVENT_FIELDS}, route=torch.stack(rows["route"]),
            info={"waves_started": waves_started})
        # the buffer's decisions continue the episode in the next buffer, so mark the boundary as truncated:
        # a route still running resumes in the next call with a fresh decision
        return buf


def _concat_states(states: list[WorldState]) -> WorldState:
    """Concatenate snapshots of different waves (their padded agent / route sizes may differ)."""
    N = max(s.num_agents for s in states)
    R = max(s.route_lanes.shape[1] for s in states)
    P = max(s.route_pts.shape[1] for s in states)
    return WorldState.concat([resize_state(s, N, R, P) for s in states])


__all__ = ["Collector", "CollectorConfig", "Buffer", "EVENT_FIELDS"]
