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
     "routes": [{"type", "route_id", "town_seed"}], "obs_config": dict, "collect_config": dict}
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
    """Driver that asks the privileged expert, records (observation, plan) and executes a perturbed plan."""

    name = "expert"

    def __init__(self, cfg: CollectConfig, obs_cfg: ObsConfig, route_offset: int = 0):
        from craft.experts.pdm import PrivilegedExpert

        self.expert = PrivilegedExpert()
        self.cfg = cfg
        self.obs_cfg = obs_cfg
        self.route_offset = route_offset
        self.gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + route_offset)
        self.obs: list[Observation] = []
        self.plans: list[torch.Tensor] = []
        self.routes: list[torch.Tensor] = []

    def plan(self, world, state) -> torch.Tensor:
        plan = self.expert.plan(world, state)  # (B, T, 3)
        keep = ~state.done
        if keep.any():
            obs = observe(world.maps, state, world.lights(state), self.obs_cfg).index(keep)
            self.obs.append(_compact(obs))
            self.plans.append(plan[keep].detach().cpu().float())
            self.routes.append(torch.nonzero(keep).squeeze(1).cpu() + self.route_offset)
        return self._perturb(plan)

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


def collect(cfg: CollectConfig, out: str | Path, device: str = "cpu", obs_cfg: ObsConfig | None = None) -> dict:
    """Record expert demonstrations on ``cfg.split`` into the file ``out``; returns a small summary."""
    from craft.bench.runner import EvalConfig, progress_total, run_batch
    from craft.scenarios.base import town_seed_of
    from craft.scenarios.routefile import training_instances
    from craft.world.world import World

    check_out_file(out)
    obs_cfg = obs_cfg or ObsConfig()
    instances, towns = training_instances(cfg.split, cfg.town_seeds, cfg.routes, cfg.types, cfg.routes_file)
    world = World(towns, device=device)
    ecfg = EvalConfig(batch_size=cfg.batch_size, seed=cfg.seed, max_steps=cfg.max_steps)
    t0 = time.time()
    obs_parts: list[dict] = []
    plans: list[torch.Tensor] = []
    routes: list[torch.Tensor] = []
    n_batches = (len(instances) + cfg.batch_size - 1) // cfg.batch_size
    for bi, i in enumerate(range(0, len(instances), cfg.batch_size)):
        batch = instances[i:i + cfg.batch_size]
        rec = RecordingExpert(cfg, obs_cfg, route_offset=i)
        desc = f"collect {cfg.split} batch {bi + 1}/{n_batches} ({len(batch)} routes)"
        with tqdm(total=progress_total(batch, ecfg, world.cfg.dt), desc=desc, unit="route-step") as bar:
            run_batch(world, batch, rec, ecfg, progress=bar)
        obs_parts += rec.obs
        plans += rec.plans
        routes += rec.routes
    obs = {k: torch.cat([o[k] for o in obs_parts]) for k in obs_parts[0]}
    data = {
        "format": DATA_FORMAT, "format_version": DATA_VERSION, "obs": obs, "expert": torch.cat(plans),
        "route": torch.cat(routes),
        "routes": [{"type": inst.type, "route_id": inst.meta.get("route_id", 0),
                    "town_seed": town_seed_of(towns[inst.spec.map_index])} for inst in instances],
        "obs_config": dataclasses.asdict(obs_cfg), "collect_config": dataclasses.asdict(cfg),
    }
    atomic_save(data, out)
    return {"samples": int(data["expert"].shape[0]), "routes": len(instances), "seconds": time.time() - t0}


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


__all__ = ["CollectConfig", "RecordingExpert", "collect", "load_demos", "demo_batch"]
