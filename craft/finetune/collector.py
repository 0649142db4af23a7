"""On-policy closed-loop collection for fine-tuning.

A :class:`Collector` keeps ``worlds`` routes of a split running in one batched :class:`~craft.world.world.World`
across calls (an asynchronous collector in the paper; here a component that takes the current policy and
returns a buffer, with no ties to the trainer). Every ``replan_every`` simulator steps each running world
asks the policy for its candidate set, **samples** a candidate from pi_old (top-1 is for evaluation), and
executes it through the shared tracker until the next decision. As in the paper's patched protocol
(``b2d-star``), the first counted collision ends an episode (``end_on_collision``). Routes come in *waves*
within ``cohorts`` groups of worlds: a group's routes start together; when fewer than ``min_live`` of them are
still running, the rest are truncated and the group's next wave starts (routes cycle through the split in a
seeded order). The groups' first waves start ``stagger`` decisions apart, so every buffer holds route
beginnings and scenario parts alike instead of alternating between them.

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
    routes_file: tuple[str, str] | None = None
    """(route file, maps folder): drive that file's routes on real towns instead of the split's."""
    seed: int = 0
    """Route order, background traffic and candidate sampling seed."""
    end_on_collision: bool = True
    """The first counted collision ends the episode (the b2d-star protocol the paper trains and reports under)."""
    cohorts: int = 4
    """The worlds run in this many groups with their own route waves, started ``stagger`` decisions apart, so
    consecutive buffers mix route beginnings and scenario parts alike (1: one wave of all worlds)."""
    stagger: int = 12
    """Decisions between the first-wave starts of consecutive groups (a route lasts about 60 decisions)."""

    def __post_init__(self):
        if self.worlds < 1 or self.buffer_size < 1 or self.replan_every < 1 or self.cohorts < 1:
            raise CraftError("CollectorConfig: worlds, buffer_size, replan_every and cohorts must be >= 1")
        if self.stagger < 0:
            raise CraftError(f"CollectorConfig.stagger must be >= 0, got {self.stagger}")
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
    """Keeps routes running between calls; ``collect(policy)`` returns the next :class:`Buffer`.

    The ``worlds`` are split into ``cohorts`` groups of consecutive columns; each group runs its own waves of
    routes (its own batched world state, scripts and tracker memory) and group ``c`` starts its first wave
    ``c * stagger`` decisions after group 0. One policy call scores the observations of every running group.
    """

    def __init__(self, cfg: CollectorConfig = CollectorConfig(), device: str = "cpu",
                 shard: tuple[int, int] = (0, 1)):
        """shard ``(i, n)``: drive only every n-th route of the seeded order starting at i, with a sampling
        stream of its own (one of n collectors feeding one learner; ``(0, 1)``: every route, as before)."""
        from craft.scenarios.routefile import training_instances
        from craft.world.world import World, WorldConfig

        self.cfg = cfg
        self.device = device
        self.instances, towns = training_instances(cfg.split, cfg.town_seeds, cfg.routes, cfg.types, cfg.routes_file)
        self.world = World(towns, WorldConfig(end_on_collision=cfg.end_on_collision), device=device)
        g = torch.Generator().manual_seed(cfg.seed)
        self.order = torch.randperm(len(self.instances), generator=g).tolist()
        i, n_sh = shard
        if not (0 <= i < n_sh):
            raise CraftError(f"Collector: shard {shard} must be (i, n) with 0 <= i < n")
        if n_sh > 1:
            self.order = self.order[i::n_sh] or self.order[i % len(self.order)::len(self.order)]
        self.wave = 0  # waves started so far (all groups)
        self.next_route = 0  # position in ``order`` of the next route to start
        self.sample_gen = torch.Generator().manual_seed(cfg.seed + 1 + (1_000_003 * (i + 1) if n_sh > 1 else 0))
        n = min(cfg.worlds, len(self.instances))
        k = min(cfg.cohorts, n)
        self.sizes = [n // k + (1 if c < n % k else 0) for c in range(k)]
        self.groups = [{"running": False, "wait": c * cfg.stagger} for c in range(k)]

    @property
    def width(self) -> int:
        """W: worlds (columns of a buffer)."""
        return sum(self.sizes)

    # ------------------------------------------------------------------ waves
    def _start_wave(self, c: int) -> None:
        from craft.scenarios.base import start
        from craft.world.autopilot import PlanExecutor

        n = self.sizes[c]
        routes = [self.order[(self.next_route + i) % len(self.order)] for i in range(n)]
        self.next_route = (self.next_route + n) % len(self.order)
        state, table = start(self.world, [self.instances[i] for i in routes],
                             seed=self.cfg.seed * 100_003 + self.wave)
        self.groups[c] = {"running": True, "wait": 0, "state": state, "table": table, "routes": routes,
                          "ex": PlanExecutor(n, state.device, dt=self.world.cfg.dt)}
        self.wave += 1

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue identically: every group's running wave (world state,
        scripts, plans and tracker memory) or its remaining start delay, the wave and route counters and the
        sampling RNG. The maps are rebuilt from seeds."""
        groups = []
        for g in self.groups:
            d = {"running": g["running"], "wait": g["wait"]}
            if g["running"]:
                d.update(state=g["state"], table=g["table"], routes=g["routes"],
                         ex={k: getattr(g["ex"], k) for k in ("plan_world", "plan_pos0", "age", "tracker")})
            groups.append(d)
        return {"wave": self.wave, "next_route": self.next_route, "sample_gen": self.sample_gen.get_state(),
                "config": dataclasses.asdict(self.cfg), "groups": groups}

    def load_state_dict(self, d: dict) -> None:
        from craft.world.autopilot import PlanExecutor

        if "workers" in d:  # saved by craft.finetune.distributed.RayCollector
            raise CraftError(f"--resume: the run was collected with --workers {d['workers']}; resume it with the "
                             "same --workers")
        if d["config"] != dataclasses.asdict(self.cfg) or "groups" not in d:
            raise CraftError("collector state was saved with a different collector configuration")
        self.wave, self.next_route = int(d["wave"]), int(d["next_route"])
        self.sample_gen.set_state(d["sample_gen"])
        self.groups = []
        for c, gd in enumerate(d["groups"]):
            g = {"running": bool(gd["running"]), "wait": int(gd["wait"])}
            if g["running"]:
                g.update(state=gd["state"], table=gd["table"], routes=gd["routes"],
                         ex=PlanExecutor(self.sizes[c], gd["state"].device, dt=self.world.cfg.dt))
                for k, v in gd["ex"].items():
                    setattr(g["ex"], k, v)
            self.groups.append(g)

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
        dev = self.world.device
        while total < cfg.buffer_size:
            for c, g in enumerate(self.groups):
                if not g["running"] and g["wait"] <= 0:
                    self._start_wave(c)
                    waves_started += 1
            run = [c for c, g in enumerate(self.groups) if g["running"]]
            obs_run = [observe(self.world.maps, self.groups[c]["state"],
                               self.world.lights(self.groups[c]["state"]), obs_cfg) for c in run]
            cs_all = policy(Observation.cat(obs_run))
            idx_all = cs_all.sample(self.sample_gen) if sample else cs_all.top1()
            logp_all = cs_all.log_probs().gather(1, idx_all[:, None]).squeeze(1)
            live_l, nd_l, idx_l, logp_l, route_l, evs_l = [], [], [], [], [], []
            off = 0
            for c, g in enumerate(self.groups):
                n = self.sizes[c]
                if not g["running"]:  # not started yet: no transitions in these columns
                    g["wait"] -= 1
                    live_l.append(torch.zeros(n, dtype=torch.bool, device=dev))
                    nd_l.append(torch.zeros(n, dtype=torch.bool, device=dev))
                    idx_l.append(torch.zeros(n, dtype=torch.long, device=dev))
                    logp_l.append(torch.zeros(n, device=dev))
                    route_l.append(torch.full((n,), -1, dtype=torch.long, device=dev))
                    evs_l.append(None)
                    continue
                rs = slice(off, off + n)
                off += n
                st, ex = g["state"], g["ex"]
                cs = CandidateSet(cs_all.trajectories[rs], cs_all.valid[rs], cs_all.logits[rs])
                idx = idx_all[rs]
                live = ~st.done
                # store the live decisions of this group
                li = torch.nonzero(live).squeeze(1)
                obs_l.append(obs_run[run.index(c)].index(li))
                cand_l.append(CandidateSet(cs.trajectories[li], cs.valid[li], cs.logits[li]))
                snap_l.append(st.index(li).clone())
                trk_l.append({k: getattr(ex.tracker, k)[li].clone() if getattr(ex.tracker, k) is not None
                              else torch.ones(len(li), dtype=torch.bool, device=li.device)
                              for k in ("integral", "prev_error", "has_prev")})
                ex.set_plan(st, cs.select(idx))
                evs = {k: [] for k in EVENT_FIELDS}
                table = g["table"]
                for _ in range(cfg.replan_every):
                    st, table = apply(st, table, maps=self.world.maps, dt=self.world.cfg.dt)
                    control = ex.control(st) + table.ego_perturbation
                    st, ev = self.world.step(st, control)
                    for k in EVENT_FIELDS:
                        evs[k].append(getattr(ev, k))
                g["state"], g["table"] = st, table
                evs_l.append({k: torch.stack(v) for k, v in evs.items()})  # (k, n)
                still = ~st.done
                cut = bool(still.float().mean() < cfg.min_live)
                live_l.append(live)
                nd_l.append(still & live & (not cut))
                idx_l.append(idx)
                logp_l.append(logp_all[rs])
                route_l.append(torch.tensor(g["routes"], device=dev))
                total += int(live.sum())
                if cut or not bool(still.any()):
                    g["running"] = False
            ref = next(e for e in evs_l if e is not None)
            ev_l.append({k: torch.cat([e[k] if e is not None else
                                       torch.zeros((cfg.replan_every, self.sizes[c]), dtype=ref[k].dtype, device=dev)
                                       for c, e in enumerate(evs_l)], 1) for k in EVENT_FIELDS})  # (k, W)
            rows["live"].append(torch.cat(live_l))
            rows["notdone"].append(torch.cat(nd_l))
            rows["chosen"].append(torch.cat(idx_l))
            rows["logp"].append(torch.cat(logp_l))
            rows["route"].append(torch.cat(route_l))
        # the decision that filled the buffer ends it: no bootstrapping across buffers (a route still running
        # resumes in the next call with a fresh decision)
        notdone = torch.stack(rows["notdone"])
        notdone[-1] = False
        return Buffer(
            live=torch.stack(rows["live"]), notdone=notdone, chosen=torch.stack(rows["chosen"]),
            logp_old=torch.stack(rows["logp"]), obs=Observation.cat(obs_l),
            candidates=CandidateSet(torch.cat([c.trajectories for c in cand_l]),
                                    torch.cat([c.valid for c in cand_l]), torch.cat([c.logits for c in cand_l])),
            snapshot=_concat_states(snap_l), tracker={k: torch.cat([t[k] for t in trk_l]) for k in trk_l[0]},
            events={k: torch.stack([e[k] for e in ev_l]) for k in EVENT_FIELDS}, route=torch.stack(rows["route"]),
            info={"waves_started": waves_started})


def _concat_states(states: list[WorldState]) -> WorldState:
    """Concatenate snapshots of different waves (their padded agent / route sizes may differ)."""
    N = max(s.num_agents for s in states)
    R = max(s.route_lanes.shape[1] for s in states)
    P = max(s.route_pts.shape[1] for s in states)
    return WorldState.concat([resize_state(s, N, R, P) for s in states])


__all__ = ["Collector", "CollectorConfig", "Buffer", "EVENT_FIELDS"]
