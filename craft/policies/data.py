"""Expert demonstrations for imitation pre-training: ``craft collect``.

The privileged expert drives the routes of a benchmark split in closed loop through the same runner as
evaluation (:func:`craft.bench.runner.run_batch`). At every decision (every ``replan_every`` simulator steps,
0.5 s) a :class:`RecordingExpert` stores the policy-visible observation tokens and the expert's plan
``(T, 3)`` (ego frame, the candidate format) of every world whose route is still running.

Perturbations (documented choice, in the spirit of DART-style noise injection): with probability
``perturb_prob`` per world and decision, the plan that is *executed* is the expert's plan with a lateral
offset ramping linearly to ``N(0, perturb_std)`` m at the last waypoint, plus a speed factor
``U(1 - perturb_speed, 1 + perturb_speed)``; the *label* stays the clean expert plan. The next decision (0.5 s
later) is the expert's again, so the recorded states include small recoverable deviations that purely
on-expert data never shows. Set ``perturb_prob=0`` for clean data.

File layout (one ``torch.save`` dict, written atomically)::

    {"format": "craft-demos", "format_version": 1, "obs": {token name: tensor (N, ...)} (floats as float16),
     "expert": (N, T, 3) float32, "route": (N,) long (index of the route in "routes"),
     "routes": [{"type", "route_id", "town_seed"}], "obs_config": dict, "collect_config": dict,
     "by_policy": (N,) bool (optional; True where a DAgger round executed the policy's plan, not the expert's)}

The same recording loop (:func:`record_split`) makes DAgger's data (:mod:`craft.policies.dagger`): the
recorder then executes the policy's plan (mixed with the expert's by ``beta``) and still records the expert's
plan on every state visited.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from craft.checks import check_finite_fields, check_range, check_seed
from craft.errors import CraftError
from craft.files import check_out_file, load_torch
from craft.policies.base import atomic_save
from craft.world.observe import Observation, ObsConfig, observe

DATA_FORMAT = "craft-demos"
DATA_VERSION = 1


@dataclass(frozen=True)
class CollectConfig:
    split: str = "train"
    routes: int | None = None
    """Routes per scenario type (default: the split's)."""
    town_seeds: tuple[int, ...] | None = None
    """Override the split's town seeds."""
    types: tuple[str, ...] | None = None
    """Only these scenario types (default: all)."""
    routes_file: tuple[str, str] | None = None
    """(route file, maps folder): drive that file's routes on real towns instead of the split's."""
    batch_size: int = 220
    """Routes simulated together."""
    perturb_prob: float = 0.2
    """Probability that a world executes a perturbed expert plan at a decision."""
    perturb_std: float = 0.8
    """Standard deviation of the lateral offset at the last waypoint of a perturbed plan, m."""
    perturb_speed: float = 0.3
    """A perturbed plan's waypoints are scaled along the path by U(1 - this, 1 + this)."""
    seed: int = 0
    """Background traffic and perturbation seed."""
    max_steps: int = 2000
    """Simulation steps cap per route."""

    def __post_init__(self):
        check_finite_fields(self)
        n = "CollectConfig."
        for f in ("batch_size", "max_steps") + (("routes",) if self.routes is not None else ()):
            check_range(n + f, getattr(self, f), 1, integer=True)
        check_seed(n + "seed", self.seed)
        for t in self.town_seeds or ():
            check_seed(n + "town_seeds", t)
        if not 0 <= self.perturb_prob <= 1:
            raise CraftError(f"CollectConfig.perturb_prob must be in [0, 1], got {self.perturb_prob}")
        if self.perturb_std < 0 or not 0 <= self.perturb_speed < 1:
            raise CraftError("CollectConfig: perturb_std must be >= 0 and perturb_speed in [0, 1)")


class RecordingExpert:
    """Driver that asks the privileged expert, records (observation, plan) and executes a plan.

    Without ``policy`` it executes the expert's plan (perturbed as :class:`CollectConfig` says): expert
    demonstrations. With ``policy`` (a :class:`~craft.policies.base.CandidatePolicy`) it is DAgger's mixed
    driver: per world and decision, with probability ``beta`` the (perturbed) expert plan is executed, else
    the policy's top-1 candidate; either way the label recorded is the expert's clean plan on the state the
    world is in, i.e. on the states the mixture visits. ``executed (B,)`` bool per decision (True: the
    policy's plan) is kept in ``self.by_policy`` beside the records.
    """

    name = "expert"

    def __init__(self, cfg: CollectConfig, obs_cfg: ObsConfig, route_offset: int = 0, policy=None,
                 beta: float = 1.0, seed_salt: int = 0):
        from craft.experts.pdm import PrivilegedExpert

        self.expert = PrivilegedExpert()
        self.cfg = cfg
        self.obs_cfg = obs_cfg
        self.route_offset = route_offset
        self.policy = policy.eval() if policy is not None else None
        self.beta = float(beta) if policy is not None else 1.0
        if policy is not None:
            self.name = f"dagger:{policy.family}"
        self.gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + route_offset + seed_salt * 7_919)
        self.obs: list[Observation] = []
        self.plans: list[torch.Tensor] = []
        self.routes: list[torch.Tensor] = []
        self.by_policy: list[torch.Tensor] = []

    @torch.no_grad()
    def plan(self, world, state) -> torch.Tensor:
        plan = self.expert.plan(world, state)  # (B, T, 3): the label, on the state the world is in
        keep = ~state.done
        need_obs = bool(keep.any()) or self.policy is not None
        obs = observe(world.maps, state, world.lights(state), self.obs_cfg) if need_obs else None
        executed = self._perturb(plan)
        by_policy = torch.zeros(plan.shape[0], dtype=torch.bool)
        if self.policy is not None:
            dev = next(self.policy.parameters()).device
            cs = self.policy(obs.to(dev))
            own = cs.select(cs.top1()).to(plan)
            by_policy = torch.rand(plan.shape[0], generator=self.gen) >= self.beta
            executed = torch.where(by_policy.to(plan.device)[:, None, None], own, executed)
        if keep.any():
            self.obs.append(_compact(obs.index(keep)))
            self.plans.append(plan[keep].detach().cpu().float())
            self.routes.append(torch.nonzero(keep).squeeze(1).cpu() + self.route_offset)
            self.by_policy.append(by_policy[keep.cpu()])
        return executed

    def _perturb(self, plan: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = plan.shape
        if cfg.perturb_prob == 0:
            return plan
        g = self.gen
        on = torch.rand(B, generator=g) < cfg.perturb_prob
        lat = torch.randn(B, generator=g) * cfg.perturb_std * on
        fac = 1 + (torch.rand(B, generator=g) * 2 - 1) * cfg.perturb_speed * on
        out = plan.clone()
        out[..., :2] = out[..., :2] * fac.to(plan)[:, None, None]
        ramp = torch.arange(1, T + 1, dtype=plan.dtype, device=plan.device) / T
        out[..., 1] = out[..., 1] + lat.to(plan)[:, None] * ramp
        return out


def _compact(obs: Observation) -> dict[str, torch.Tensor]:
    """Observation tensors on the CPU, floats as float16 (the observation is normalised to O(1))."""
    return {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in obs.tensors().items()}


def record_split(cfg: CollectConfig, device: str = "cpu", obs_cfg: ObsConfig | None = None, policy=None,
                 beta: float = 1.0, seed_salt: int = 0, progress: bool = True, desc: str = "collect") -> dict:
    """Drive ``cfg.split``'s routes with a :class:`RecordingExpert` (the expert alone, or mixed with
    ``policy`` by ``beta``: see there) through the benchmark runner; returns the demonstrations dict of the
    module docstring's layout (plus ``"by_policy" (N,)`` bool: the policy's plan was executed there).

    ``seed_salt`` varies the mixing / perturbation draws (a DAgger round's number); same arguments, same data.
    """
    from craft.bench.runner import EvalConfig, progress_total, run_batch
    from craft.scenarios.base import town_seed_of
    from craft.scenarios.routefile import training_instances
    from craft.world.world import World

    obs_cfg = obs_cfg or ObsConfig()
    instances, towns = training_instances(cfg.split, cfg.town_seeds, cfg.routes, cfg.types, cfg.routes_file)
    world = World(towns, device=device)
    ecfg = EvalConfig(batch_size=cfg.batch_size, seed=cfg.seed, max_steps=cfg.max_steps)
    obs_parts: list[dict] = []
    plans: list[torch.Tensor] = []
    routes: list[torch.Tensor] = []
    by_policy: list[torch.Tensor] = []
    n_batches = (len(instances) + cfg.batch_size - 1) // cfg.batch_size
    for bi, i in enumerate(range(0, len(instances), cfg.batch_size)):
        batch = instances[i:i + cfg.batch_size]
        rec = RecordingExpert(cfg, obs_cfg, route_offset=i, policy=policy, beta=beta, seed_salt=seed_salt)
        label = f"{desc} {cfg.split} batch {bi + 1}/{n_batches} ({len(batch)} routes)"
        with tqdm(total=progress_total(batch, ecfg, world.cfg.dt), desc=label, unit="route-step",
                  disable=not progress) as bar:
            run_batch(world, batch, rec, ecfg, progress=bar)
        obs_parts += rec.obs
        plans += rec.plans
        routes += rec.routes
        by_policy += rec.by_policy
    if not plans:
        raise CraftError(f"no decision was recorded on the {len(instances)} {cfg.split} routes")
    obs = {k: torch.cat([o[k] for o in obs_parts]) for k in obs_parts[0]}
    return {
        "format": DATA_FORMAT, "format_version": DATA_VERSION, "obs": obs, "expert": torch.cat(plans),
        "route": torch.cat(routes), "by_policy": torch.cat(by_policy),
        "routes": [{"type": inst.type, "route_id": inst.meta.get("route_id", 0),
                    "town_seed": town_seed_of(towns[inst.spec.map_index])} for inst in instances],
        "obs_config": dataclasses.asdict(obs_cfg), "collect_config": dataclasses.asdict(cfg),
    }


def collect(cfg: CollectConfig, out: str | Path, device: str = "cpu", obs_cfg: ObsConfig | None = None) -> dict:
    """Record expert demonstrations on ``cfg.split`` into the file ``out``; returns a small summary."""
    check_out_file(out)
    t0 = time.time()
    data = record_split(cfg, device=device, obs_cfg=obs_cfg)
    atomic_save(data, out)
    return {"samples": int(data["expert"].shape[0]), "routes": len(data["routes"]), "seconds": time.time() - t0}


def load_demos(path: str | Path) -> dict:
    """Read a demonstrations file written by :func:`collect`; one-line CraftError if it is not one."""
    path = Path(path)
    if not path.exists():
        raise CraftError(f"demonstrations file '{path}' does not exist (make it with `craft collect`)")
    data = load_torch(path, "demonstrations file")  # weights_only: a crafted file cannot run code
    if not isinstance(data, dict) or data.get("format") != DATA_FORMAT:
        raise CraftError(f"'{path}' is not a CRAFT demonstrations file (make it with `craft collect`)")
    if data.get("format_version") != DATA_VERSION:
        raise CraftError(f"'{path}' has demonstrations format {data.get('format_version')}, this build reads "
                         f"{DATA_VERSION}; collect it again")
    obs, expert, route = data.get("obs"), data.get("expert"), data.get("route")
    ok = (isinstance(obs, dict) and obs and all(isinstance(v, torch.Tensor) for v in obs.values())
          and isinstance(expert, torch.Tensor) and expert.dim() == 3 and expert.shape[-1] == 3
          and isinstance(route, torch.Tensor) and route.dim() == 1 and not route.is_floating_point()
          and isinstance(data.get("obs_config"), dict) and isinstance(data.get("routes"), list))
    n = int(expert.shape[0]) if ok else -1
    if not ok or n < 1 or len(route) != n or any(v.shape[:1] != (n,) for v in obs.values()) \
            or int(route.min()) < 0 or not bool(torch.isfinite(expert).all()):
        raise CraftError(f"'{path}' is a damaged demonstrations file (missing, mismatched or non-finite "
                         "arrays); collect it again")
    return data


def demo_batch(data: dict, idx: torch.Tensor, device="cpu") -> tuple[Observation, torch.Tensor]:
    """Observation (float32) and expert plans ``(b, T, 3)`` of the samples ``idx``."""
    obs = Observation(**{k: (v[idx].float() if v.is_floating_point() else v[idx]).to(device)
                         for k, v in data["obs"].items()})
    return obs, data["expert"][idx].to(device)


__all__ = ["CollectConfig", "RecordingExpert", "record_split", "collect", "load_demos", "demo_batch"]
