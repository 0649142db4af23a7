"""A gymnasium ``VectorEnv`` over the batched world, so standard RL libraries can drive the ego.

:class:`CraftVectorEnv` runs ``num_envs`` worlds as one batched :class:`~craft.world.world.World`: one
``step`` advances every world at once (no subprocesses). Observations are CRAFT's ego-frame tokens
(:func:`~craft.world.observe.observe`) as a dict of float32 numpy arrays keyed like
:meth:`Observation.tensors` (boolean masks and the navigation command are cast to float32).

Actions (``GymConfig.action``):

- ``"control"``: ``Box(2)`` = (acceleration m/s^2 in [-8, 3.5], steering angle rad in [-0.6, 0.6]), applied
  for one simulator step (0.1 s);
- ``"trajectory"``: ``Box(T, 3)`` ego-frame waypoints (x forward, y left, yaw; waypoint ``i`` at
  ``(i + 1) * 0.5`` s), executed through the shared tracker (:class:`~craft.world.autopilot.PlanExecutor`)
  for ``replan_every`` simulator steps per env step.

Actions are clipped to the action space (NaN becomes 0).

Episodes. An env is *terminated* when its world's route ends (``WorldState.done``: completed, route
deviation, blocked, route timeout, tick cap, or a collision with ``end_on_collision``) and *truncated* after
``max_episode_steps`` env steps. Autoreset follows gymnasium's default ``NEXT_STEP`` mode
(``metadata["autoreset_mode"]``): the step that ends an episode returns its last observation; the *next*
``step`` call ignores that env's action, starts a new episode and returns its first observation with
reward 0 and ``terminated = truncated = False``. (``NEXT_STEP`` is what gymnasium's own vector envs and
vector wrappers -- ``RecordEpisodeStatistics``, observation wrappers -- expect.)

New episodes. Every episode is a fresh one-world :meth:`World.reset` from a random spec
(:func:`~craft.world.world.random_specs`) whose seed is derived from ``(reset seed, env index, episode
number of that env)``; env ``i``'s episode ``e`` is on map ``(i + e) % num_maps``. An episode therefore
depends only on the reset seed, the env index and the actions: same seed and actions, same observations
and rewards. The new world is spliced into the batch at its index. Padded sizes (agents ``N``, route lanes
``R``, route points ``P``) differ between worlds, so the new world is padded to the batch's sizes with the
fill values of :func:`~craft.world.state.empty_state` (route points and their arc lengths repeat the last
point, as ``World.reset`` does); when the new world needs more room the whole batch is padded up first,
and padding that no world needs any more is cut afterwards (the batch stays as small as its largest
world). Padding never changes a world's behaviour (padded agents and route points are invalid); the tests
check that an env's rewards do not depend on ``num_envs``.

Reward (:class:`GymConfig`): a simple default so RL libraries have something to optimise -- NOT CRAFT's
reward (CRAFT trains its policies with its own objectives). Per env step it sums, over the simulator
steps of that env step: metres of route progress x ``reward_progress``, counted collisions x
``reward_collision``, red-light infractions x ``reward_red_light``, stop-sign infractions x
``reward_stop_sign``, metres driven outside the lanes x ``reward_outside_lanes``; plus ``reward_step`` once.

Infos (gymnasium's dict-of-arrays convention, each key with its ``_key`` mask, all True): per env
``route_completion`` (percent), ``progress`` / ``outside_lanes`` / ``driven`` (m this step),
``collisions`` / ``red_lights`` / ``stop_infractions`` (counts this step), ``speed`` (m/s),
``episode_step`` (env steps into the episode), ``episode_index`` (0 for the first episode after a seeded
reset), ``episode_seed``, ``map_index``, ``end_reason`` (names, ``"running"`` while running; see
:class:`~craft.world.state.EndReason`). There is no ``episode`` key: gymnasium's ``RecordEpisodeStatistics``
wrapper adds that one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

import gymnasium
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

from craft.errors import CraftError
from craft.world.autopilot import PlanExecutor
from craft.world.map import MapBatch, RoadMap
from craft.world.observe import N_COMMANDS, Observation, ObsConfig, observe
from craft.world.state import EndReason, WorldState, empty_state, resize_state
from craft.world.world import World, WorldConfig, random_specs

try:  # gymnasium >= 1.1
    from gymnasium.vector import AutoresetMode

    _NEXT_STEP: Any = AutoresetMode.NEXT_STEP
except ImportError:  # pragma: no cover - gymnasium 1.0 used the plain string
    _NEXT_STEP = "NextStep"

__all__ = ["GymConfig", "CraftVectorEnv", "resize_state"]

ACTIONS = ("control", "trajectory")
ACCEL_RANGE = (-8.0, 3.5)  # m/s^2
STEER_RANGE = (-0.6, 0.6)  # rad
WAYPOINT_RANGE = 100.0  # |x|, |y| of trajectory waypoints, m


@dataclass(frozen=True)
class GymConfig:
    """Configuration of :class:`CraftVectorEnv`. The reward weights are a simple default for RL libraries,
    not CRAFT's reward."""

    num_envs: int = 8
    """Number of worlds stepped together (the vector env's ``num_envs``)."""
    town_seeds: tuple[int, ...] = (0, 1)
    """Procedural towns (:func:`~craft.world.towns.generate_town` seeds) the episodes are spread over."""
    n_vehicles: int = 20
    """Random background vehicles per world."""
    n_pedestrians: int = 6
    """Random pedestrians per world."""
    route_min_length: float = 100.0
    """Shortest random ego route, m."""
    action: str = "control"
    """``"control"``: (accel, steer) per simulator step; ``"trajectory"``: ego-frame waypoints via the tracker."""
    plan_horizon: int = 6
    """Waypoints T of a ``"trajectory"`` action (0.5 s apart)."""
    replan_every: int = 5
    """Simulator steps (0.1 s) per env step in ``"trajectory"`` mode (``"control"`` mode: always 1)."""
    max_episode_steps: int = 2000
    """Env steps after which an episode is truncated."""
    end_on_collision: bool = False
    """The first counted collision ends the route (Bench2Drive's b2d-star protocol)."""
    reward_progress: float = 1.0
    """Reward per metre of route progress."""
    reward_collision: float = -10.0
    """Reward per counted collision (pedestrian, vehicle or layout)."""
    reward_red_light: float = -5.0
    """Reward per red-light infraction."""
    reward_stop_sign: float = -3.0
    """Reward per stop-sign infraction."""
    reward_outside_lanes: float = -0.5
    """Reward per metre driven outside the lanes or in a wrong-direction lane."""
    reward_step: float = 0.0
    """Reward added every env step."""
    obs: ObsConfig = field(default_factory=ObsConfig)
    """Observation token sizes and normalisation."""

    def __post_init__(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        for name, lo in (("num_envs", 1), ("plan_horizon", 1), ("replan_every", 1), ("max_episode_steps", 1),
                         ("n_vehicles", 0), ("n_pedestrians", 0)):
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                raise CraftError(f"GymConfig.{name} must be an integer >= {lo}, got {v!r}")
        if self.action not in ACTIONS:
            raise CraftError(f"GymConfig.action must be one of {ACTIONS}, got {self.action!r}")
        seeds = tuple(self.town_seeds) if isinstance(self.town_seeds, (list, tuple)) else None
        if not seeds or not all(is_int(s) and s >= 0 for s in seeds):
            raise CraftError(f"GymConfig.town_seeds must be a non-empty tuple of integers >= 0, "
                             f"got {self.town_seeds!r}")
        if not (isinstance(self.route_min_length, (int, float)) and math.isfinite(self.route_min_length)
                and self.route_min_length > 0):
            raise CraftError(f"GymConfig.route_min_length must be positive and finite, got {self.route_min_length!r}")
        for f in fields(self):
            if f.name.startswith("reward_"):
                v = getattr(self, f.name)
                if not (isinstance(v, (int, float)) and math.isfinite(v)):
                    raise CraftError(f"GymConfig.{f.name} must be a finite number, got {v!r}")
        if not isinstance(self.obs, ObsConfig):
            raise CraftError(f"GymConfig.obs must be an ObsConfig, got {type(self.obs).__name__}")


# ---------------------------------------------------------------------- padding
def _splice(state: WorldState, idx: torch.Tensor, fresh: WorldState) -> WorldState:
    """``state`` with worlds ``idx`` replaced by ``fresh`` (same padded sizes); untouched fields are shared."""
    out = {}
    for name, t in state.tensors().items():
        t = t.clone()
        t[idx] = getattr(fresh, name)
        out[name] = t
    return WorldState(**out)


# ---------------------------------------------------------------------- env
class CraftVectorEnv(gymnasium.vector.VectorEnv):
    """``num_envs`` CRAFT worlds as one gymnasium vector env (see the module docstring).

    ``maps`` optionally replaces the towns of ``cfg.town_seeds`` (a list of :class:`RoadMap` or a
    :class:`MapBatch`); ``device`` is where the worlds live (observations always come back as numpy).
    """

    def __init__(self, cfg: GymConfig | None = None, device: str | torch.device = "cpu",
                 maps: list[RoadMap] | MapBatch | None = None, render_mode: str | None = "rgb_array"):
        cfg = cfg if cfg is not None else GymConfig()
        if not isinstance(cfg, GymConfig):
            raise CraftError(f"CraftVectorEnv needs a GymConfig, got {type(cfg).__name__}")
        if render_mode not in (None, "rgb_array"):
            raise CraftError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.cfg = cfg
        if maps is None:
            from craft.world.towns import generate_town

            maps = [generate_town(int(s)) for s in cfg.town_seeds]
        if not isinstance(maps, MapBatch) and len(maps) == 0:
            raise CraftError("CraftVectorEnv needs at least one map")
        self.world = World(maps, WorldConfig(end_on_collision=cfg.end_on_collision), device=device)
        self.device = self.world.device
        self.num_envs = cfg.num_envs
        self.render_mode = render_mode
        self.steps_per_action = cfg.replan_every if cfg.action == "trajectory" else 1
        self.metadata = {
            "autoreset_mode": _NEXT_STEP,
            "render_modes": ["rgb_array"],
            "render_fps": 1.0 / (self.world.cfg.dt * self.steps_per_action),
        }

        self.single_observation_space = self._obs_space(cfg.obs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        if cfg.action == "control":
            self.single_action_space = spaces.Box(
                low=np.array([ACCEL_RANGE[0], STEER_RANGE[0]], np.float32),
                high=np.array([ACCEL_RANGE[1], STEER_RANGE[1]], np.float32), dtype=np.float32)
        else:
            lim = np.array([WAYPOINT_RANGE, WAYPOINT_RANGE, math.pi], np.float32)
            self.single_action_space = spaces.Box(low=np.tile(-lim, (cfg.plan_horizon, 1)),
                                                  high=np.tile(lim, (cfg.plan_horizon, 1)), dtype=np.float32)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._act_low = torch.as_tensor(self.single_action_space.low, device=self.device)
        self._act_high = torch.as_tensor(self.single_action_space.high, device=self.device)

        self.state: WorldState | None = None
        self.driver: PlanExecutor | None = None
        self._base_seed: int | None = None
        self._episode = np.zeros(self.num_envs, np.int64)  # episode number of each env (since the last seed)
        self._episode_seed = np.zeros(self.num_envs, np.int64)
        self._map_index = np.zeros(self.num_envs, np.int64)
        self._t = np.zeros(self.num_envs, np.int64)  # env steps in the current episode
        self._autoreset = np.zeros(self.num_envs, bool)
        self._world_sizes = np.ones((self.num_envs, 3), np.int64)  # each world's own (N, R, P)
        self._fig = None

    # ------------------------------------------------------------------ spaces
    @staticmethod
    def _obs_space(oc: ObsConfig) -> spaces.Dict:
        dims = Observation.feature_dims(oc)
        inf = np.float32(np.inf)

        def feat(*shape):
            return spaces.Box(-inf, inf, shape=shape, dtype=np.float32)

        def mask(n):
            return spaces.Box(0.0, 1.0, shape=(n,), dtype=np.float32)

        return spaces.Dict({
            "ego": feat(dims["ego"]),
            "command": spaces.Box(0.0, float(N_COMMANDS - 1), shape=(), dtype=np.float32),
            "agents": feat(oc.max_agents, dims["agents"]),
            "agents_mask": mask(oc.max_agents),
            "lanes": feat(oc.max_lane_chunks, dims["lanes"]),
            "lanes_mask": mask(oc.max_lane_chunks),
            "lights": feat(oc.max_lights, dims["lights"]),
            "lights_mask": mask(oc.max_lights),
            "stops": feat(oc.max_stops, dims["stops"]),
            "stops_mask": mask(oc.max_stops),
            "route": feat(oc.route_points, dims["route"]),
            "route_mask": mask(oc.route_points),
        })

    # ------------------------------------------------------------------ episodes
    def _new_worlds(self, envs: np.ndarray) -> list[WorldState]:
        """Start the next episode of each env in ``envs``: one fresh one-world state each."""
        road_maps = self.world.maps.maps
        out = []
        for i in envs.tolist():
            ep = int(self._episode[i])
            ep_seed = int(np.random.SeedSequence([self._base_seed, i, ep]).generate_state(1, np.uint32)[0] >> 1)
            mi = (i + ep) % len(road_maps)
            spec = random_specs([road_maps[mi]], 1, ep_seed, n_vehicles=self.cfg.n_vehicles,
                                n_pedestrians=self.cfg.n_pedestrians, min_length=self.cfg.route_min_length)[0]
            spec.map_index = mi
            out.append(self.world.reset([spec], ep_seed))
            self._world_sizes[i] = self._sizes(out[-1])
            self._episode_seed[i] = ep_seed
            self._map_index[i] = mi
            self._episode[i] = ep + 1
            self._t[i] = 0
        return out

    @staticmethod
    def _sizes(s: WorldState) -> np.ndarray:
        return np.array([s.num_agents, s.route_lanes.shape[1], s.route_pts.shape[1]], np.int64)

    def _start_episodes(self, envs: np.ndarray) -> None:
        """Replace the worlds of ``envs`` by new episodes, then fit the batch's padded sizes to the largest
        world (padding up first when a new world is larger than the batch, cutting unused padding after)."""
        fresh = self._new_worlds(envs)
        need = self._world_sizes.max(0)
        if self.state is None:
            self.state = WorldState.concat([resize_state(f, *need.tolist()) for f in fresh])
        else:
            big = np.maximum(need, self._sizes(self.state)).tolist()
            idx = torch.as_tensor(envs, dtype=torch.long, device=self.device)
            new = WorldState.concat([resize_state(f, *big) for f in fresh])
            self.state = resize_state(_splice(resize_state(self.state, *big), idx, new), *need.tolist())
            mask = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
            mask[idx] = True
            self.driver.tracker = self.driver.tracker.reset(mask)

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start a new episode in every env. ``seed`` (int >= 0) makes everything reproducible; ``None``
        keeps the current seed (drawn at random the first time) and moves every env to its next episode."""
        if self.closed:
            raise CraftError("the environment is closed")
        if options is not None and not isinstance(options, dict):
            raise CraftError(f"reset options must be a dict or None, got {type(options).__name__}")
        if seed is not None:
            if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
                raise CraftError(f"reset seed must be an integer >= 0, got {seed!r}")
            super().reset(seed=int(seed))
            self._base_seed = int(seed)
            self._episode[:] = 0
            self.action_space.seed(int(seed))
            self.single_action_space.seed(int(seed))
        elif self._base_seed is None:
            self._base_seed = int(np.random.SeedSequence().generate_state(1, np.uint32)[0] >> 1)
        self.state = None
        self._start_episodes(np.arange(self.num_envs))
        self.driver = PlanExecutor(self.num_envs, self.device, dt=self.world.cfg.dt)
        self._autoreset[:] = False
        zeros = np.zeros(self.num_envs)
        info = self._info(zeros, zeros, zeros, zeros, zeros, zeros)
        return self._observe(), info

    def step(self, actions):
        """Advance every env by one action (see the module docstring for autoreset, reward and infos)."""
        if self.closed:
            raise CraftError("the environment is closed")
        if self.state is None:
            raise CraftError("call reset() before step()")
        a = torch.as_tensor(np.asarray(actions, dtype=np.float32), device=self.device)
        if tuple(a.shape) != tuple(self.action_space.shape):
            raise CraftError(f"actions must have shape {self.action_space.shape}, got {tuple(a.shape)}")
        a = torch.nan_to_num(a, nan=0.0).clamp(self._act_low, self._act_high)

        cfg = self.cfg
        B = self.num_envs
        z = lambda: torch.zeros(B, device=self.device)  # noqa: E731
        progress, outside, driven, collisions, red, stops = z(), z(), z(), z(), z(), z()
        state = self.state
        if cfg.action == "trajectory":
            self.driver.set_plan(state, a)
        for _ in range(self.steps_per_action):
            control = self.driver.control(state) if cfg.action == "trajectory" else a
            state, ev = self.world.step(state, control)
            progress += ev.progress
            outside += ev.outside_lanes
            driven += ev.driven
            collisions += (ev.collision_pedestrian.float() + ev.collision_vehicle.float()
                           + ev.collision_layout.float())
            red += ev.red_light.float()
            stops += ev.stop_infraction.float()
        self.state = state
        reward = (cfg.reward_progress * progress + cfg.reward_outside_lanes * outside
                  + cfg.reward_collision * collisions + cfg.reward_red_light * red
                  + cfg.reward_stop_sign * stops + cfg.reward_step)
        to_np = lambda t: t.detach().cpu().numpy().astype(np.float64)  # noqa: E731
        reward, progress, outside, driven = to_np(reward), to_np(progress), to_np(outside), to_np(driven)
        collisions, red, stops = to_np(collisions), to_np(red), to_np(stops)
        terminated = self.state.done.cpu().numpy().copy()
        self._t += 1

        reset = self._autoreset.copy()
        if reset.any():  # NEXT_STEP autoreset: these envs start a new episode instead
            self._start_episodes(np.nonzero(reset)[0])
            for x in (reward, progress, outside, driven, collisions, red, stops):
                x[reset] = 0.0
            terminated[reset] = False
        truncated = (self._t >= cfg.max_episode_steps) & ~reset
        self._autoreset = terminated | truncated
        info = self._info(progress, outside, driven, collisions, red, stops)
        return self._observe(), reward, terminated, truncated, info

    # ------------------------------------------------------------------ helpers
    def _observe(self) -> dict[str, np.ndarray]:
        st = self.state
        obs = observe(self.world.maps, st, self.world.lights(st), self.cfg.obs)
        return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in obs.tensors().items()}

    def _info(self, progress, outside, driven, collisions, red, stops) -> dict[str, np.ndarray]:
        st = self.state
        rc = 100.0 * st.progress / st.route_length.clamp_min(1e-6)
        names = np.array([EndReason.NAMES.get(int(r), str(int(r))) for r in st.end_reason.cpu().tolist()],
                         dtype=object)
        info = {
            "route_completion": rc.detach().cpu().numpy().astype(np.float64),
            "progress": np.asarray(progress, np.float64),
            "outside_lanes": np.asarray(outside, np.float64),
            "driven": np.asarray(driven, np.float64),
            "collisions": np.asarray(collisions).astype(np.int64),
            "red_lights": np.asarray(red).astype(np.int64),
            "stop_infractions": np.asarray(stops).astype(np.int64),
            "speed": st.speed[:, 0].detach().cpu().numpy().astype(np.float64),
            "episode_step": self._t.copy(),
            "episode_index": self._episode - 1,
            "episode_seed": self._episode_seed.copy(),
            "map_index": self._map_index.copy(),
            "end_reason": names,
        }
        for k in list(info):
            info[f"_{k}"] = np.ones(self.num_envs, bool)
        return info

    def render(self, index: int = 0) -> np.ndarray | None:
        """An (H, W, 3) uint8 bird's-eye view of env ``index`` (default 0), 80 m across, centred on the ego."""
        if self.render_mode is None:
            return None
        if self.state is None:
            raise CraftError("call reset() before render()")
        if not 0 <= index < self.num_envs:
            raise CraftError(f"render index must be in [0, {self.num_envs}), got {index}")
        from craft.world.render import draw_agents, draw_map, frame_to_rgb, new_figure

        st = self.state.index(slice(index, index + 1))
        if self._fig is None:
            self._fig = new_figure(480, 480)
        fig, ax = self._fig
        c = lambda t: t[0].detach().cpu().numpy()  # noqa: E731
        pos = c(st.pos)
        frame = dict(pos=pos, yaw=c(st.yaw), length=c(st.length), width=c(st.width), kind=c(st.kind),
                     valid=c(st.valid), siren=c(st.siren), speed=c(st.speed), lights=c(self.world.lights(st)),
                     route=c(st.route_pts)[c(st.route_valid)], time=float(c(st.step)) * self.world.cfg.dt)
        r = 40.0
        draw_map(ax, self.world.maps.maps[int(c(st.map_id))], (pos[0, 0] - r, pos[0, 1] - r, pos[0, 0] + r,
                                                                 pos[0, 1] + r))
        draw_agents(ax, frame, title=f"env {index}")
        return frame_to_rgb(fig)

    def close_extras(self, **kwargs) -> None:
        self._fig = None
        self.state = None
        self.driver = None
