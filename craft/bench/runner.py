"""Closed-loop evaluation: run a driver on a split's scenario routes, batched, and score them like Bench2Drive.

One batch of worlds runs all routes together (``EvalConfig.batch_size`` at a time): every step the
scenario scripts fire their triggers, the driver re-plans every ``replan_every`` steps, the shared tracker
turns the plan into controls (plus ControlLoss perturbations), and the world reports its events. When all
routes of a batch have ended the per-step logs become :class:`~craft.bench.metrics.RouteLog` s and are
scored. The GIFs of the worst routes are made by re-running just those routes (the world is
deterministic, so the replay is the same drive) with frames recorded.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from craft.bench.metrics import RouteLog, aggregate, results_json, score_route
from craft.bench.report import ability_bar_chart, per_type_table, summary_markdown
from craft.errors import CraftError
from craft.files import check_out_dir, check_replaceable, staged_folder, write_text
from craft.world.autopilot import PlanExecutor, route_plan
from craft.world.kinds import AgentKind
from craft.world.map import take
from craft.world.state import EndReason
from craft.world.world import World, WorldConfig

PROTOCOLS = ("b2d", "b2d-star")
SWITCHES = ("wrong_direction", "blocked")


@dataclass(frozen=True)
class EvalConfig:
    """How an evaluation runs."""

    protocol: str = "b2d"  # b2d, or b2d-star: a collision ends the route (the CRAFT paper's patched protocol)
    replan_every: int = 5  # simulator steps between driver re-plans (0.5 s)
    batch_size: int = 220  # routes simulated together
    max_steps: int | None = None  # tick cap in steps for every route; None: 2000 (200 s, Bench2Drive) or a route's own time_limit_s (long routes)
    seed: int = 0  # background traffic seed
    gif_worst: int = 0  # GIFs of this many lowest-DS routes
    step_files: bool = True  # write metric_info/<save_name>/metric_info.json per route (~70 kB each)
    switches: tuple[str, ...] = ("wrong_direction", "blocked")  # Bench2Drive's scenario switches in effect:
    # wrong_direction: the TwoWays scenarios switch the wrong-direction test off while they run; blocked: a
    # scenario's own timeout suspends the blocked test while it runs (see craft.scenarios.base.scenario_windows)

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise CraftError(f"unknown protocol '{self.protocol}': use one of {', '.join(PROTOCOLS)}")
        for name in ("replan_every", "batch_size", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CraftError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.gif_worst < 0:
            raise CraftError(f"EvalConfig.gif_worst must be >= 0, got {self.gif_worst}")
        bad = [x for x in self.switches if x not in SWITCHES]
        if bad:
            raise CraftError(f"EvalConfig.switches: unknown {bad}; use some of {SWITCHES}")


DEFAULT_MAX_STEPS = 2000  # Bench2Drive's 200 s tick cap at dt = 0.1 s


def progress_total(instances: list, cfg: EvalConfig, dt: float) -> int:
    """The total of a :func:`run_batch` progress bar: route-steps, the sum of the routes' step caps."""
    return int(sum(route_step_caps(instances, cfg, dt)))


def route_step_caps(instances: list, cfg: EvalConfig, dt: float) -> list[int]:
    """Per-route tick cap in steps: ``cfg.max_steps`` when set, else the route's own ``time_limit_s`` (long
    routes) or :data:`DEFAULT_MAX_STEPS`."""
    if cfg.max_steps is not None:
        return [int(cfg.max_steps)] * len(instances)
    return [DEFAULT_MAX_STEPS if getattr(inst, "time_limit_s", None) is None
            else max(1, int(round(inst.time_limit_s / dt))) for inst in instances]


class Driver(Protocol):
    """Anything that plans ego trajectories: ``plan(world, state) -> (B, T, 3)`` ego frame, 0.5 s spacing."""

    name: str

    def plan(self, world: World, state) -> torch.Tensor: ...


class LaneFollow:
    """Sanity baseline: follow the route centreline at the lane speed limit, ignoring everyone and every signal."""

    name = "lane-follow"

    def plan(self, world: World, state) -> torch.Tensor:
        limit = take(world.maps.lane_speed_limit, state.map_id, state.lane[:, 0].clamp_min(0))
        return route_plan(state, limit)


class ExpertDriver:
    """The privileged PDM-Lite-like expert."""

    name = "expert"

    def __init__(self):
        from craft.experts.pdm import PrivilegedExpert

        self.expert = PrivilegedExpert()

    def plan(self, world: World, state) -> torch.Tensor:
        return self.expert.plan(world, state)


def make_driver_from(policy: str, checkpoint: dict | None, device: str = "cpu") -> Driver:
    """A driver from ``expert`` / ``lane-follow``, or from a policy checkpoint dict (what Ray workers get,
    since a path of the driver's machine may not exist on theirs); ``policy`` is then its label."""
    if checkpoint is None:
        return make_driver(policy, device=device)
    from craft.policies.base import policy_from_checkpoint
    from craft.policies.driver import PolicyDriver

    pol = policy_from_checkpoint(checkpoint, device=device, where=policy)
    return PolicyDriver(pol, name=f"{pol.family}:{policy}")


def make_driver(policy: str, device: str = "cpu") -> Driver:
    """``expert``, ``lane-follow`` or a policy checkpoint path (a ``policy.pt`` file or a folder holding one)."""
    if policy == "expert":
        return ExpertDriver()
    if policy == "lane-follow":
        return LaneFollow()
    path = Path(policy)
    if not path.exists():
        raise CraftError(f"policy '{policy}' is neither expert, lane-follow nor an existing checkpoint path")
    from craft.policies.base import load_policy
    from craft.policies.driver import PolicyDriver

    pol = load_policy(path, device=device)
    label = path.parent.name if path.name == "policy.pt" else path.name
    return PolicyDriver(pol, name=f"{pol.family}:{label}")


# ---------------------------------------------------------------------- one batch
_STEP_FIELDS = ("collision_pedestrian", "collision_vehicle", "collision_layout", "collided_agent", "red_light",
                "stop_infraction", "speed", "accel", "yaw_rate", "background_speed", "done", "end_reason")


def background_vehicles(state, n_explicit: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the background traffic vehicles of every world (Bench2Drive's ``role_name ==
    'background'``): valid cars, trucks, bicycles and emergency vehicles after the ego and the scenario's
    ``n_explicit (B,)`` explicit agents, wherever they are and whatever their speed; parked (STATIC) ones,
    which Bench2Drive places as map meshes rather than vehicles, are left out."""
    from craft.world.state import Mode

    n = torch.arange(state.num_agents, device=state.device)[None]
    veh = torch.zeros_like(state.valid)
    for k in (AgentKind.CAR, AgentKind.TRUCK, AgentKind.BICYCLE, AgentKind.EMERGENCY):
        veh |= state.kind == int(k)
    return state.valid & veh & (n > n_explicit[:, None]) & (state.mode != Mode.STATIC)


def mean_background_speed(state, n_explicit: torch.Tensor) -> torch.Tensor:
    """(B,) mean speed of :func:`background_vehicles` (NaN where a world has none), m/s."""
    bg = background_vehicles(state, n_explicit)
    n = bg.sum(-1)
    tot = torch.where(bg, state.speed.abs(), torch.zeros_like(state.speed)).sum(-1)
    return torch.where(n > 0, tot / n.clamp_min(1), torch.full_like(tot, float("nan")))


COMPACT_MIN_ROWS = 16
"""run_batch drops the rows of ended routes once half of a batch of at least this many rows has ended."""


def run_batch(world: World, instances: list, driver: Driver, cfg: EvalConfig, frames_for: set[int] = frozenset(),
              progress: tqdm | None = None):
    """Drive ``instances`` (ScenarioInstance) in one batch. Returns (route logs, frames by batch index).

    ``progress``: a bar whose total is :func:`progress_total` of the batch (route-steps: every route's step
    cap); each step advances it by the routes still driving, and a route that ends advances it by the steps of
    its cap it will not drive, so the bar reaches its end when the batch does and its ETA counts what is left."""
    from craft.world.render import frame_of
    from craft.scenarios.base import apply_windows, scenario_windows, start
    from craft.scenarios.script import apply

    state, table = start(world, instances, cfg.seed, per_route_seed=all("split" in i.meta for i in instances))
    win = scenario_windows(instances, device=state.device)
    if "wrong_direction" not in cfg.switches:
        win.wrong_dir_end_m.zero_()  # (B, M)
    if "blocked" not in cfg.switches:
        win.blocked_end_m.zero_()
    n_explicit = torch.tensor([len(i.spec.agents) for i in instances], device=state.device)
    B = state.batch_size
    caps = torch.tensor(route_step_caps(instances, cfg, world.cfg.dt), device=state.device)
    own_caps = bool((caps != caps[0]).any()) or any(getattr(i, "time_limit_s", None) is not None for i in instances)
    ex = PlanExecutor(B, state.device, dt=world.cfg.dt)
    rec = {k: [] for k in _STEP_FIELDS}
    rec.update(pos=[], progress=[], driven=[], outside=[], outside_route=[], bg_all=[], yaw=[])
    frames: dict[int, list] = {b: [] for b in frames_for}
    ended_at = torch.full((B,), -1, dtype=torch.long)
    caps_all = caps.cpu().clone()  # every route's cap (caps itself loses the rows of ended routes)
    rows = torch.arange(B)  # batch row -> route index; rows of ended routes are dropped once half have ended
    final = state  # every route's state at the step its route ended (end-of-route checks read it)
    for t in range(int(caps.max())):
        state, table = apply(state, table, maps=world.maps, dt=world.cfg.dt)
        state = apply_windows(state, win)
        if t % cfg.replan_every == 0:
            ex.set_plan(state, driver.plan(world, state))
        control = ex.control(state) + table.ego_perturbation
        state, ev = world.step(state, control)
        if own_caps:  # per-route tick caps (the world's own cap is set to the longest)
            over = (t + 1 >= caps) & ~state.done
            if bool(over.any()):
                reason = torch.where(over, torch.full_like(state.end_reason, EndReason.TICK_CAP), state.end_reason)
                state = state.replace(done=state.done | over, end_reason=reason)
                ev.done = ev.done | over
                ev.end_reason = torch.where(over, reason, ev.end_reason)
        for k in _STEP_FIELDS:
            rec[k].append(_full(getattr(ev, k), rows, B))
        rec["pos"].append(_full(state.pos[:, 0], rows, B))
        rec["progress"].append(_full(state.progress, rows, B))
        rec["driven"].append(_full(state.driven, rows, B))
        rec["outside"].append(_full(state.driven_outside, rows, B))
        rec["outside_route"].append(_full(state.progress_outside, rows, B))
        rec["bg_all"].append(_full(mean_background_speed(state, n_explicit), rows, B))
        rec["yaw"].append(_full(state.yaw[:, 0], rows, B))
        for b in frames_for:
            if ended_at[b] < 0 and t % 2 == 0:
                frames[b].append(frame_of(world, state, b))
        newly_rows = ev.done.cpu() & (ended_at[rows] < 0)  # batch rows whose route ended at this step
        if bool(newly_rows.any()):  # keep each route's state as it was when it ended (the world steps on)
            final = _put_rows(final, rows[newly_rows], state.index(newly_rows.to(state.step.device)))
        newly = torch.zeros(B, dtype=torch.bool)
        newly[rows[newly_rows]] = True
        if progress is not None:  # route-steps: one per route still driving, the rest of an ended route's cap
            live = int((ended_at < 0).sum())
            progress.update(live + int((caps_all[newly] - t - 1).clamp_min(0).sum()))
            if newly.any():
                progress.set_postfix(routes_done=f"{int((ended_at >= 0).sum()) + int(newly.sum())}/{B}")
        ended_at[newly] = t
        if bool(state.done.all()):
            break
        if not frames_for and len(rows) >= COMPACT_MIN_ROWS and int((~state.done).sum()) <= len(rows) // 2:
            # most routes of the batch have ended: drop their rows. Every world is independent (its random
            # numbers are keyed by its own seed and step), so the remaining routes drive exactly as before.
            keep = ~state.done
            state, table, ex, caps = state.index(keep), table.index(keep), ex.index(keep), caps[keep]
            win, n_explicit = win.index(keep), n_explicit[keep]
            rows = rows[keep.cpu()]
    running = ended_at[rows] < 0  # routes still running when the loop stopped: their last state
    state = _put_rows(final, rows[running], state.index(running.to(state.step.device)))
    steps = len(rec["speed"])
    R = {k: torch.stack(v) for k, v in rec.items()}  # (T, B, ...)
    final_reason = state.end_reason.cpu()
    logs = []
    for b, inst in enumerate(instances):
        n = int(ended_at[b]) + 1 if ended_at[b] >= 0 else steps
        logs.append(_route_log(b, inst, R, n, world, state, final_reason))
    return logs, frames


def _full(x: torch.Tensor, rows: torch.Tensor, B: int) -> torch.Tensor:
    """A per-step record of the batch rows ``rows`` as a (B, ...) CPU tensor (dropped rows: zeros)."""
    x = x.detach().cpu()
    if len(rows) == B:
        return x
    out = torch.zeros((B, *x.shape[1:]), dtype=x.dtype)
    out[rows] = x
    return out


def _put_rows(full, rows: torch.Tensor, part):
    """``full`` (a WorldState of all routes) with the routes ``rows`` replaced by ``part``'s rows."""
    from dataclasses import fields

    if len(rows) == 0:
        return full
    idx = rows.to(full.step.device)
    return full.replace(**{f.name: getattr(full, f.name).index_copy(0, idx, getattr(part, f.name))
                           for f in fields(full)})


def b2d_route_id(inst, b: int = 0) -> str:
    """Bench2Drive's ``RouteScenario_<number>_rep0`` for a split route (number:
    :func:`craft.scenarios.splits.route_number`, the same whatever routes are evaluated with it); other
    instances: ``RouteScenario_<batch row>_rep0``."""
    from craft.scenarios.splits import route_number

    k = inst.meta.get("route_id")
    if inst.meta.get("file_route") and isinstance(k, int):  # a route file's own route id
        return f"RouteScenario_{k}_rep0"
    num = route_number(inst.type, k) if "split" in inst.meta and isinstance(k, int) else b
    return f"RouteScenario_{num}_rep0"


def _route_log(b: int, inst, R: dict, n: int, world: World, state, final_reason) -> RouteLog:
    dt = world.cfg.dt
    col = {"collisions_pedestrian": "collision_pedestrian", "collisions_vehicle": "collision_vehicle",
           "collisions_layout": "collision_layout"}
    infractions: dict[str, list[dict]] = {}
    pos = R["pos"][:n, b].numpy()
    prog = R["progress"][:n, b].numpy()
    for key, field in col.items():
        steps = torch.nonzero(R[field][:n, b]).flatten().tolist()
        out = []
        for i in steps:
            other = int(R["collided_agent"][i, b])
            kind = AgentKind(int(state.kind[b, other])).name if other >= 0 else "UNKNOWN"
            out.append({"t": (i + 1) * dt, "x": float(pos[i, 0]), "y": float(pos[i, 1]), "other_kind": kind,
                        "other_id": other, "progress_m": float(prog[i]), "driven_m": float(R["driven"][i, b]),
                        "outside_lanes_m": float(R["outside"][i, b]),
                        "outside_route_m": float(R["outside_route"][i, b])})
        infractions[key] = out
    for key, field in (("red_light", "red_light"), ("stop_infraction", "stop_infraction")):
        infractions[key] = [{"t": (i + 1) * dt, "x": float(pos[i, 0]), "y": float(pos[i, 1]),
                             "progress_m": float(prog[i])}
                            for i in torch.nonzero(R[field][:n, b]).flatten().tolist()]
    reason = EndReason.NAMES[int(final_reason[b])]
    yield_failed = False
    if inst.emergency_index is not None:
        e = inst.emergency_index
        ego, ev_pos, ev_yaw = state.pos[b, 0], state.pos[b, e], state.yaw[b, e]
        ahead = (ego - ev_pos) @ torch.stack([torch.cos(ev_yaw), torch.sin(ev_yaw)])
        yield_failed = bool(ahead > 0)
    speed = R["speed"][:n, b].numpy()
    extra = {}
    if "chain" in inst.meta:
        extra["scenarios"] = chain_breakdown(inst.meta["chain"], infractions, prog, R["outside"][:n, b].numpy(),
                                             completed=reason == "completed")
    return RouteLog(
        route_id=b2d_route_id(inst, b),
        scenario_type=inst.type,
        town_seed=int(inst.town_seed),
        route_length_m=float(state.route_length[b]),
        progress_m=float(state.progress[b]),
        completed=reason == "completed",
        end_reason=reason,
        infractions=infractions,
        driven_m=float(state.driven[b]),
        outside_lanes_m=float(state.driven_outside[b]),
        outside_route_m=float(state.progress_outside[b]),
        yield_emergency_failed=yield_failed,
        first_junction_progress_m=inst.first_junction_progress_m,
        kinematics={"speed": speed, "accel_lon": R["accel"][:n, b].numpy(),
                    "accel_lat": speed * R["yaw_rate"][:n, b].numpy(), "yaw_rate": R["yaw_rate"][:n, b].numpy()},
        checkpoint_speeds={"ego_speed": speed, "background_speed": R["background_speed"][:n, b].numpy(),
                           "background_speed_all": R["bg_all"][:n, b].numpy(), "progress_m": prog},
        pose={"x": pos[:, 0], "y": pos[:, 1], "yaw": R["yaw"][:n, b].numpy()},
        duration_s=n * dt,
        extra_meta=extra,
        town_name=inst.meta.get("town"),
    )


CHAIN_MARGIN_M = 20.0  # route metres before / after a chained scenario that still count as its part


def chain_breakdown(chain: list[dict], infractions: dict[str, list[dict]], progress, outside, completed: bool,
                    margin: float = CHAIN_MARGIN_M) -> list[dict]:
    """Where a long route went wrong: per chained scenario (``chain``: dicts with ``type``, ``start_m``,
    ``end_m``), the collision / red-light / stop events, the metres driven outside the route lanes and
    whether the route ended there, counted over ``[start_m - margin, end_m + margin)``; a last entry
    ``type == "between scenarios"`` collects the rest. ``progress`` / ``outside`` are the per-step route
    progress and cumulative outside-lanes metres ``(T,)``."""
    rows = [dict(c, events=0, outside_m=0.0, ended_here=False) for c in chain]
    rest = dict(type="between scenarios", events=0, outside_m=0.0, ended_here=False)

    def row_of(p: float) -> dict:
        for r in rows:
            if r["start_m"] - margin <= p < r["end_m"] + margin:
                return r
        return rest

    for key in ("collisions_pedestrian", "collisions_vehicle", "collisions_layout", "red_light", "stop_infraction"):
        for e in infractions.get(key, []):
            row_of(float(e["progress_m"]))["events"] += 1
    progress, outside = np.asarray(progress, dtype=np.float64), np.asarray(outside, dtype=np.float64)
    if len(outside):
        inc = np.diff(outside, prepend=0.0)
        for i in np.nonzero(inc > 1e-6)[0]:
            row_of(float(progress[i]))["outside_m"] += float(inc[i])
    if not completed and len(progress):
        row_of(float(progress[-1]))["ended_here"] = True
    for r in rows + [rest]:
        r["outside_m"] = round(r["outside_m"], 2)
    return rows + [rest]


# ---------------------------------------------------------------------- sharded evaluation (Ray)
def _eval_shard(spec: dict, batches: list[int]) -> list:
    """A Ray task: the batches ``batches`` of the evaluation described by ``spec`` (see
    :func:`evaluate_sharded`); returns their route logs in route order."""
    torch.set_num_threads(1)
    instances, world = eval_world(spec["split"], spec["town_seeds"], spec["routes"], spec["types"], spec["cfg"],
                                  spec["device"])
    driver = make_driver_from(spec["policy"], spec["checkpoint"], device=spec["device"])
    return route_logs(world, instances, driver, spec["cfg"], batches=batches, progress=False)


def evaluate_sharded(policy: str, checkpoint: dict | None, split: str, town_seeds: list[int], routes, types,
                     cfg, device: str, num_routes: int, workers: int, address: str | None = None) -> list:
    """Route logs of every route of an evaluation, in route order, computed by Ray tasks.

    The evaluation's batches (``cfg.batch_size`` consecutive routes each, as in one process) are dealt
    round-robin to ``min(workers, batches)`` tasks; a batch runs exactly as it does in one process, so the
    logs are the same (bit for bit). policy: ``expert``, ``lane-follow`` or a label; checkpoint: the policy
    checkpoint dict (None for the built-in drivers); the rest as :func:`craft.bench.runner.evaluate`."""
    import ray

    from craft.raytools import gpu_options, init_ray, ray_get

    nb = len(eval_batches(num_routes, cfg))
    if nb < workers:
        import sys

        print(f"craft: note: {num_routes} routes in batches of {cfg.batch_size} make {nb} batch(es) for {workers} "
              f"workers; --batch-size {math.ceil(num_routes / workers)} would use them all", file=sys.stderr)
    started = init_ray(address, workers)
    try:
        spec = {"policy": policy, "checkpoint": checkpoint, "split": split, "town_seeds": town_seeds,
                "routes": routes, "types": types, "cfg": cfg, "device": device}
        ref = ray.put(spec)
        task = ray.remote(num_cpus=1, max_retries=3, **gpu_options(device, workers))(_eval_shard)
        shards = [list(range(i, nb, workers)) for i in range(min(workers, nb))]
        parts = ray_get([task.remote(ref, s) for s in shards], "evaluation")
    finally:
        if started:
            ray.shutdown()
    per_batch: dict[int, list] = {}
    size = cfg.batch_size
    for s, part in zip(shards, parts):
        pos = 0
        for k in s:
            n = min(num_routes, (k + 1) * size) - k * size
            per_batch[k] = part[pos:pos + n]
            pos += n
    return [log for k in range(nb) for log in per_batch[k]]



# ---------------------------------------------------------------------- whole split
def eval_world(split: str, town_seeds: list[int], routes: int | None, types: list[str] | None, cfg: EvalConfig,
               device: str = "cpu") -> tuple[list, World]:
    """The split's scenario instances (with their ``route_id``) and the world they run in."""
    from craft.scenarios.splits import load_split

    instances, towns = load_split(split, town_seeds=list(town_seeds), routes=routes, types=types)
    wcfg = WorldConfig(end_on_collision=cfg.protocol == "b2d-star")
    limits = [inst.time_limit_s for inst in instances if inst.time_limit_s is not None]
    if limits:  # routes with their own (longer) tick cap: the runner enforces each, the world the longest
        wcfg = replace(wcfg, events=replace(wcfg.events, tick_cap=max(wcfg.events.tick_cap, max(limits))))
    world = World(towns, wcfg, device=device)
    return instances, world


def file_world(routes_file: dict, cfg: EvalConfig, device: str = "cpu") -> tuple[list, World, list[str]]:
    """The runnable routes of a route file (``routes_file``: ``path``, ``maps`` and optionally ``routes`` /
    ``towns``, see :func:`craft.scenarios.routefile.load_route_file`), their world, and one line per refused
    route."""
    from craft.scenarios.routefile import load_route_file

    instances, towns, refused = load_route_file(routes_file["path"], routes_file["maps"],
                                                routes=routes_file.get("routes"), towns=routes_file.get("towns"))
    if not instances:
        raise CraftError(f"no route of '{routes_file['path']}' can run here: " + (refused[0] if refused else "none"))
    wcfg = WorldConfig(end_on_collision=cfg.protocol == "b2d-star")
    limits = [inst.time_limit_s for inst in instances if inst.time_limit_s is not None]
    if limits:
        wcfg = replace(wcfg, events=replace(wcfg.events, tick_cap=max(wcfg.events.tick_cap, max(limits))))
    return instances, World(towns, wcfg, device=device), refused


def eval_batches(num_routes: int, cfg: EvalConfig) -> list[range]:
    """The evaluation's batches: consecutive runs of ``cfg.batch_size`` routes (route indices)."""
    return [range(i, min(num_routes, i + cfg.batch_size)) for i in range(0, num_routes, cfg.batch_size)]


def route_logs(world: World, instances: list, driver: Driver, cfg: EvalConfig, batches: list[int] | None = None,
               progress: bool = False, name: str = "") -> list[RouteLog]:
    """Route logs of the evaluation's batches ``batches`` (indices into :func:`eval_batches`; default all), in
    order. A batch always holds the same routes in the same rows, so it drives the same wherever it runs."""
    all_batches = eval_batches(len(instances), cfg)
    logs: list[RouteLog] = []
    for k in range(len(all_batches)) if batches is None else batches:
        rows = all_batches[k]
        batch = [instances[j] for j in rows]
        desc = f"eval {name} routes {rows.start + 1}-{rows.stop}/{len(instances)}"
        with tqdm(total=progress_total(batch, cfg, world.cfg.dt), desc=desc, unit="route-step",
                  disable=not progress) as bar:
            batch_logs, _ = run_batch(world, batch, driver, cfg, progress=bar)
        logs += batch_logs
    return logs


def evaluate(driver: Driver, split: str, out: str | os.PathLike, cfg: EvalConfig = EvalConfig(),
             town_seeds: list[int] | None = None, routes: int | None = None, device: str = "cpu",
             types: list[str] | None = None, also: dict[str, str | os.PathLike] | None = None,
             workers: int = 1, address: str | None = None, logs_out: list | None = None,
             routes_file: dict | None = None) -> dict:
    """Evaluate ``driver`` on ``split``; writes results.json, summary.md, abilities.png and GIFs into ``out``.

    ``also`` maps further protocols to folders: the same rollout is scored under each of them too (only from a
    ``b2d`` rollout, where b2d-star is the log cut at its first collision — the world is deterministic, so this
    equals a second rollout that ends there). Returns the summary of ``cfg.protocol``. Nothing is written
    until every route has run; each folder is written as a staging folder beside it that then replaces it as a
    whole (a failure leaves the folders untouched; an older evaluation's files, e.g. its GIFs, do not stay
    beside the new ones). A folder that holds other files than an evaluation's is refused before any work. ``logs_out``: a list that receives the routes'
    :class:`RouteLog` s (to score them again under other rules). ``workers > 1`` or an ``address``: the routes run on
    Ray workers (:func:`evaluate_sharded`) with the same records; the driver must be
    ``expert``, ``lane-follow`` or a top-1 :class:`~craft.policies.driver.PolicyDriver`.

    ``routes_file``: drive the routes of a leaderboard route file on real towns instead of ``split``
    (``{"path", "maps", "routes"?, "towns"?}``, see :func:`file_world`); ``split`` is then only the label.
    Routes that cannot run are listed in ``refused.txt`` and in the summary's ``refused``.
    """
    also = dict(also or {})
    for proto in also:
        if proto not in PROTOCOLS:
            raise CraftError(f"unknown protocol '{proto}': use one of {', '.join(PROTOCOLS)}")
        if cfg.protocol != "b2d" and proto != cfg.protocol:
            raise CraftError(f"only a b2d rollout can be re-scored under '{proto}' (this one is {cfg.protocol})")
    from craft.scenarios.splits import split_town_seeds

    for folder in (out, *also.values()):
        check_out_dir(folder)
        check_replaceable(folder, is_eval_output, "an evaluation")
    t0 = time.time()
    refused: list[str] = []
    if routes_file is not None:
        if workers > 1 or address is not None:
            raise CraftError("--routes-file evaluations run in one process (leave --workers / --address out)")
        seeds = []
        instances, world, refused = file_world(routes_file, cfg, device)
        logs = route_logs(world, instances, driver, cfg, progress=True, name=f"{driver.name} on {split}")
    elif workers > 1 or address is not None:  # routes dealt to Ray tasks; the same records (tested)
        seeds = list(town_seeds) if town_seeds else split_town_seeds(split)
        if getattr(driver, "sample", False) or not (hasattr(driver, "policy") or driver.name in ("expert",
                                                                                             "lane-follow")):
            raise CraftError(f"--workers: driver '{driver.name}' cannot be sent to Ray workers (expert, lane-follow "
                             "or a policy checkpoint evaluated top-1)")
        ck = driver.policy.checkpoint() if hasattr(driver, "policy") else None
        label = driver.name.split(":", 1)[1] if ck is not None else driver.name
        instances, world = eval_world(split, seeds, routes, types, cfg, device)  # the count; GIFs
        n = len(instances)
        logs = evaluate_sharded(label, ck, split, seeds, routes, types, cfg, device, n, workers, address)
    else:
        seeds = list(town_seeds) if town_seeds else split_town_seeds(split)
        instances, world = eval_world(split, seeds, routes, types, cfg, device)
        logs = route_logs(world, instances, driver, cfg, progress=True, name=f"{driver.name} on {split}")
    wall = time.time() - t0
    if logs_out is not None:
        logs_out.extend(logs)
    with ExitStack() as stack:  # every folder staged; committed (results.json last) only if all succeed
        for proto, folder in also.items():
            if proto != cfg.protocol:
                _score_and_write(logs, proto, stack.enter_context(staged_folder(folder, replace=True)), split, seeds,
                                 driver.name, wall, world, instances, cfg.step_files)
        stage = stack.enter_context(staged_folder(out, replace=True))
        summary, records = _score_and_write(logs, cfg.protocol, stage, split, seeds, driver.name, wall, world,
                                            instances, cfg.step_files, refused)
        if cfg.gif_worst:
            _worst_gifs(world, instances, records, driver, cfg, stage)
    return summary


EVAL_OUTPUTS = ("results.json", "routes.xml", "summary.md", "abilities.png", "metric_info", "scores.json",
                "refused.txt")
"""What an evaluation folder holds (besides its ``worst<k>_<type>.gif``); ``scores.json``: the experiments'
compact copy of the scores."""


def is_eval_output(name: str) -> bool:
    """Whether ``name`` is an entry an evaluation folder holds (:data:`EVAL_OUTPUTS`, the worst routes' GIFs)."""
    return name in EVAL_OUTPUTS or (name.startswith("worst") and name.endswith(".gif"))


def _score_and_write(logs: list[RouteLog], protocol: str, out: Path, split: str, seeds: list[int], name: str,
                     wall: float, world: World, instances: list, step_files: bool = True,
                     refused: list[str] = ()) -> tuple[dict, list[dict]]:
    """Score ``logs`` under ``protocol``; write into ``out``: routes.xml (Bench2Drive's routes file of these
    routes), metric_info/<save_name>/metric_info.json per route (the per-step file of Bench2Drive's comfort
    tool: ``efficiency_smoothness_benchmark.py -f results.json -m metric_info``; only with ``step_files``),
    summary.md, abilities.png and, last, results.json."""
    from craft.bench.b2d_files import metric_info, routes_xml
    from craft.bench.metrics import protocol_log

    records = [score_route(log, protocol, index=i) for i, log in enumerate(logs)]
    summary = aggregate(records, num_routes=len(logs), protocol=protocol, split=split, town_seeds=seeds,
                        policy=name)
    summary["wall_time_s"] = wall
    out.mkdir(parents=True, exist_ok=True)
    if refused:
        summary["refused"] = list(refused)
        write_text(out / "refused.txt", "".join(f"{line}\n" for line in refused))
    write_text(out / "routes.xml", routes_xml(world, instances, records))
    for log, rec in zip(logs, records) if step_files else ():
        folder = out / "metric_info" / rec["save_name"]
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "metric_info.json",
                   json.dumps(metric_info(protocol_log(log, protocol)), separators=(",", ":")))
    per_type = per_type_table(records)
    write_text(out / "summary.md", summary_markdown(summary, per_type))
    ability_bar_chart(summary, str(out / "abilities.png"))
    write_text(out / "results.json", json.dumps(results_json(summary, records), indent=2))  # moved in last
    return summary, records


def _worst_gifs(world, instances, records, driver, cfg, out: Path) -> None:
    from craft.world.render import render_gif

    order = np.argsort([r["scores"]["score_composed"] for r in records])[: cfg.gif_worst]
    chosen = [instances[i] for i in order]
    _, frames = run_batch(world, chosen, driver, cfg, frames_for=set(range(len(chosen))))
    for k, i in enumerate(order):
        inst = instances[i]
        path = out / f"worst{k}_{inst.type}.gif"
        render_gif(world.maps.maps[inst.spec.map_index], frames[k], str(path),
                   title=f"{inst.type} DS {records[i]['scores']['score_composed']:.1f}")

