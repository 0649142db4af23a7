"""The gymnasium vector env over the batched world: spaces, autoreset, determinism, action modes, bad input."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch

from craft.errors import CraftError
from craft.world.gym import CraftVectorEnv, GymConfig, resize_state
from craft.world.observe import Observation

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def maps(town):
    from craft.world.towns import generate_town

    return [town, generate_town(1)]


def _env(maps, **kw) -> CraftVectorEnv:
    return CraftVectorEnv(GymConfig(**kw), maps=maps)


def _straight_plan(env: CraftVectorEnv, speed: float) -> np.ndarray:
    T = env.cfg.plan_horizon
    plan = np.zeros((T, 3), np.float32)
    plan[:, 0] = speed * 0.5 * np.arange(1, T + 1)
    return np.repeat(plan[None], env.num_envs, 0)


def _finite(obs: dict) -> bool:
    return all(np.isfinite(v).all() for v in obs.values())


def test_spaces_match_observations(maps):
    env = _env(maps, num_envs=3)
    assert env.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.NEXT_STEP
    obs, info = env.reset(seed=0)
    assert set(obs) == set(Observation.__dataclass_fields__) == set(env.single_observation_space.spaces)
    assert all(v.dtype == np.float32 and v.shape[0] == 3 for v in obs.values())
    assert env.observation_space.contains(obs)
    for i in range(3):
        assert env.single_observation_space.contains({k: np.asarray(v[i]) for k, v in obs.items()})
    assert env.single_action_space.shape == (2,) and env.action_space.shape == (3, 2)
    assert np.allclose(env.single_action_space.low, [-8.0, -0.6])
    assert np.allclose(env.single_action_space.high, [3.5, 0.6])
    assert set(info["map_index"].tolist()) == {0, 1}
    assert (info["route_completion"] == 0).all() and list(info["end_reason"]) == ["running"] * 3
    traj = _env(maps, num_envs=2, action="trajectory")
    assert traj.single_action_space.shape == (6, 3) and traj.action_space.shape == (2, 6, 3)
    assert traj.observation_space.contains(traj.reset(seed=1)[0])
    env.close()
    assert env.closed
    with pytest.raises(CraftError):
        env.reset(seed=0)


def test_random_rollout_autoresets_and_stays_finite(maps):
    env = gymnasium.wrappers.vector.RecordEpisodeStatistics(_env(maps, num_envs=4, max_episode_steps=25))
    obs, _ = env.reset(seed=5)
    ended = np.zeros(4, bool)
    episodes_logged = 0
    for _ in range(300):
        obs, rew, term, trunc, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs) and _finite(obs)
        assert rew.shape == (4,) and np.isfinite(rew).all()
        assert term.dtype == bool and trunc.dtype == bool
        assert np.isfinite(info["route_completion"]).all()
        if ended.any():  # NEXT_STEP: the step after an episode ends starts a new one
            assert (info["episode_step"][ended] == 0).all() and (rew[ended] == 0).all()
            assert not (term[ended] | trunc[ended]).any()
        ended = term | trunc
        episodes_logged += int(info.get("_episode", np.zeros(4, bool)).sum())
    inner = env.unwrapped
    assert (inner._episode >= 300 // 26).all()  # every env was reset at least 11 times
    assert episodes_logged >= 4 * 11  # RecordEpisodeStatistics understood the episode ends
    assert torch.isfinite(inner.state.pos).all() and torch.isfinite(inner.state.speed).all()
    img = inner.render()
    assert img.shape == (480, 480, 3) and img.dtype == np.uint8 and img.std() > 0


def _rollout(maps, seed: int, steps: int, num_envs: int = 2):
    env = _env(maps, num_envs=num_envs, max_episode_steps=20)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(123)
    rewards, egos = [], [obs["ego"].copy()]
    for _ in range(steps):
        a = rng.uniform([-1.0, -0.1], [3.5, 0.1]).astype(np.float32)  # mostly forward, so rewards happen
        obs, r, *_ = env.step(np.repeat(a[None], num_envs, 0))
        rewards.append(r)
        egos.append(np.concatenate([obs[k].reshape(num_envs, -1) for k in sorted(obs)], 1))
    return np.array(rewards), egos


def test_same_seed_same_trajectory(maps):
    r1, o1 = _rollout(maps, 7, 50)
    r2, o2 = _rollout(maps, 7, 50)
    assert np.array_equal(r1, r2)
    assert all(np.array_equal(a, b) for a, b in zip(o1, o2))
    assert np.abs(r1).sum() > 0  # something happened
    _, o3 = _rollout(maps, 8, 0)
    assert not np.array_equal(o1[0], o3[0])


def test_episode_independent_of_batch(maps):
    """An env's episodes depend on (seed, env index, actions) only: padding never changes a world."""
    r1, o1 = _rollout(maps, 3, 45, num_envs=1)
    r3, o3 = _rollout(maps, 3, 45, num_envs=3)
    assert np.array_equal(r1[:, 0], r3[:, 0])
    for a, b in zip(o1[1:], o3[1:]):
        np.testing.assert_allclose(a[0], b[0], atol=1e-5)


def test_trajectory_mode_drives_forward(maps):
    env = _env(maps, num_envs=2, action="trajectory")
    _, info = env.reset(seed=0)
    rc = [info["route_completion"]]
    plan = _straight_plan(env, 6.0)
    for _ in range(8):
        _, r, term, trunc, info = env.step(plan)
        rc.append(info["route_completion"])
        assert not (term | trunc).any()
    rc = np.array(rc)
    assert (np.diff(rc, axis=0) >= 0).all() and (rc[-1] > rc[0] + 1.0).all()
    assert (info["speed"] > 4.0).all()
    assert env.state.step.tolist() == [8 * env.cfg.replan_every] * 2  # 5 simulator steps per env step


def test_termination_then_autoreset(maps):
    env = _env(maps, num_envs=2)
    env.reset(seed=2)
    env.step(np.zeros((2, 2), np.float32))
    env.state = env.state.replace(done=torch.tensor([True, False]))  # env 0's route has ended
    _, r, term, trunc, info = env.step(np.zeros((2, 2), np.float32))
    assert term.tolist() == [True, False] and not trunc.any()
    _, r, term, trunc, info = env.step(np.zeros((2, 2), np.float32))
    assert info["episode_index"].tolist() == [1, 0] and info["episode_step"].tolist() == [0, 3]
    assert not term.any() and r[0] == 0.0 and not bool(env.state.done[0])
    assert env.observation_space.contains(env._observe())


def test_resize_state_roundtrip(maps):
    env = _env(maps, num_envs=2)
    env.reset(seed=4)
    s = env.state
    N, R, P = s.num_agents, s.route_lanes.shape[1], s.route_pts.shape[1]
    big = resize_state(s, N + 3, R + 2, P + 10)
    assert not big.valid[:, N:].any() and (big.route_lanes[:, R:] == -1).all() and not big.route_valid[:, P:].any()
    assert (big.route_cum.diff(dim=1) >= 0).all()
    back = resize_state(big, N, R, P)
    for name, t in s.tensors().items():
        u = back.tensors()[name]
        assert torch.equal(torch.nan_to_num(t, nan=-7.0), torch.nan_to_num(u, nan=-7.0)), name


@pytest.mark.parametrize("kw", [dict(num_envs=0), dict(action="teleport"), dict(town_seeds=()),
                                dict(max_episode_steps=0), dict(replan_every=0), dict(reward_collision=float("nan")),
                                dict(num_envs=2.5)])
def test_bad_config_raises(kw):
    with pytest.raises(CraftError):
        GymConfig(**kw)


def test_bad_calls_raise(maps):
    env = _env(maps, num_envs=2)
    with pytest.raises(CraftError):
        env.step(np.zeros((2, 2), np.float32))  # before reset
    env.reset(seed=0)
    with pytest.raises(CraftError):
        env.step(np.zeros((3, 2), np.float32))
    with pytest.raises(CraftError):
        env.reset(seed=-1)
