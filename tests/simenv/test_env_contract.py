"""Gymnasium contract of the registered envs: check_env, determinism (in and across processes),
pickling mid-episode, spaces, doctests, registration."""

from __future__ import annotations

import doctest
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import simenv
from simenv import BatchedRecEnv, EnvConfig, EventType, Obs, RecEnv
from simenv.spaces import SlateSpace
from tests.simenv.helpers import assert_equal_nested, digest, mixed_action, rollout

IDS = ["simenv/RecEnv-v0", "simenv/RecEnv-small-v0"]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("env_id", IDS)
def test_check_env_passes_with_warnings_as_errors(env_id):
    env = gym.make(env_id).unwrapped
    assert isinstance(env, RecEnv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env, skip_render_check=True)


def test_registered_specs():
    big, small = gym.spec(IDS[0]), gym.spec(IDS[1])
    assert big.max_episode_steps == EnvConfig().max_steps == 200
    assert small.max_episode_steps == EnvConfig.small().max_steps == 100
    env = gym.make(IDS[1])
    assert env.unwrapped.config == EnvConfig.small()
    assert env.unwrapped.world.n_items == 500 and env.unwrapped.config.slate_size == 5
    assert gym.make(IDS[0]).unwrapped.world.n_items == 20_000


@pytest.mark.parametrize("env_id", IDS)
def test_same_seed_same_trajectory(env_id):
    a = rollout(gym.make(env_id).unwrapped, seed=7, n_steps=60)
    b = rollout(gym.make(env_id).unwrapped, seed=7, n_steps=60)
    assert sum(r[0] == "step" for r in a) == 60
    assert_equal_nested(a, b)
    # the trajectory is not trivial: clicks happened, the history filled
    assert any(r[0] == "step" and r[6]["clicked_position"] >= 0 for r in a)
    assert any(r[0] == "step" and r[2][Obs.MASK].sum() >= 3 for r in a)


@pytest.mark.parametrize("env_id", IDS)
def test_different_seed_differs(env_id):
    a = rollout(gym.make(env_id).unwrapped, seed=7, n_steps=50)
    b = rollout(gym.make(env_id).unwrapped, seed=8, n_steps=50)
    assert digest(a) != digest(b)
    # already the first observation differs (another user or another start time)
    assert digest(a[0]) != digest(b[0])


def test_reset_reseeds_the_same_episode():
    env = gym.make(IDS[1]).unwrapped
    first = rollout(env, seed=3, n_steps=55)
    again = rollout(env, seed=3, n_steps=55)  # same object, reseeded
    assert_equal_nested(first, again)


def test_determinism_across_processes():
    code = (
        "import gymnasium as gym, simenv\n"
        "from tests.simenv.helpers import digest, rollout\n"
        "env = gym.make('simenv/RecEnv-small-v0').unwrapped\n"
        "print(digest(rollout(env, seed=11, n_steps=80, action_seed=5)))\n"
    )
    env_vars = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env_vars,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    here = digest(rollout(gym.make(IDS[1]).unwrapped, seed=11, n_steps=80, action_seed=5))
    assert out.stdout.strip() == here
    other = digest(rollout(gym.make(IDS[1]).unwrapped, seed=12, n_steps=80, action_seed=5))
    assert other != here


def test_pickle_mid_episode_continues_identically():
    env = gym.make(IDS[1]).unwrapped
    env.reset(seed=21)
    rng = np.random.default_rng(0)
    for _ in range(12):
        _, _, term, trunc, _ = env.step(mixed_action(env, rng))
        assert not (term or trunc)
    clone = pickle.loads(pickle.dumps(env))
    assert clone is not env and clone.sim is not env.sim
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(40):
        a, b = mixed_action(env, rng_a), mixed_action(clone, rng_b)
        np.testing.assert_array_equal(a, b)
        out_a, out_b = env.step(a), clone.step(b)
        assert_equal_nested(out_a, out_b)
        if out_a[2] or out_a[3]:
            assert_equal_nested(env.reset(), clone.reset())


def test_observations_in_space_and_history_format():
    env = gym.make(IDS[1]).unwrapped
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert obs[Obs.MASK].sum() == 0 and obs[Obs.ITEMS].sum() == 0
    assert (
        set(info) == {"user", "group"}
        and info["user"] == int(obs[Obs.USER][0])
        and obs[Obs.USER].shape == (1,)
    )
    rng = np.random.default_rng(0)
    clicks: list[tuple[int, int]] = []
    L = env.config.history_length
    for _ in range(80):
        action = mixed_action(env, rng)
        obs, reward, term, trunc, info = env.step(action)
        assert env.observation_space.contains(obs), obs
        assert isinstance(reward, float) and isinstance(term, bool) and isinstance(trunc, bool)
        assert info["click_prob"].shape == info["affinity"].shape == (env.config.slate_size,)
        j = info["clicked_position"]
        if j >= 0:
            clicks.append((int(action[j]), info["event"]))
        # the history: the last min(L, clicks) engagement events, newest last, left padding
        n = min(L, len(clicks))
        mask = obs[Obs.MASK]
        assert mask.tolist() == [0] * (L - n) + [1] * n
        assert obs[Obs.ITEMS][L - n :].tolist() == [c[0] for c in clicks[len(clicks) - n :]]
        assert obs[Obs.EVENTS][L - n :].tolist() == [c[1] for c in clicks[len(clicks) - n :]]
        assert np.all(obs[Obs.ITEMS][: L - n] == 0) and np.all(obs[Obs.EVENTS][: L - n] == 0)
        assert np.all(obs[Obs.DT][: L - n] == 0)
        assert np.all(np.diff(obs[Obs.DT][L - n :]) <= 0)  # older events are further in the past
        assert np.all(obs[Obs.DT] >= 0)
        assert set(obs[Obs.EVENTS][L - n :].tolist()) <= {
            EventType.CLICK,
            EventType.LIKE,
            EventType.DISLIKE,
        }
        if term or trunc:
            break
    assert len(clicks) >= 3


def test_doctests_of_the_env_and_world():
    for module in (simenv.rec_env, simenv.world):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_render_ansi():
    env = RecEnv(EnvConfig.small(), render_mode="ansi")
    env.reset(seed=0, options={"user_id": 17})
    text = env.render()
    assert text.startswith("user=17 ") and "session=0 pos=0" in text
    assert RecEnv(EnvConfig.small()).render() is None


def test_slate_space():
    space = SlateSpace(50, 4, sample_pool=np.arange(10, 30), seed=0)
    for _ in range(50):
        s = space.sample()
        assert s.shape == (4,) and np.unique(s).size == 4 and space.contains(s)
        assert np.all((s >= 10) & (s < 30))
    assert not space.contains(np.array([1, 2, 2, 3]))
    assert not space.contains(np.array([1, 2, 3, 50]))
    assert not space.contains(np.array([1, 2, 3]))
    batch = SlateSpace(50, 4, batch=6, seed=1)
    b = batch.sample()
    assert b.shape == (6, 4) and batch.contains(b)
    assert all(np.unique(r).size == 4 for r in b)
    b[2, 1] = b[2, 0]
    assert not batch.contains(b)
    big = SlateSpace(100_000, 10, seed=2).sample()  # the rejection path for large pools
    assert np.unique(big).size == 10
    with pytest.raises(ValueError, match="sample_pool"):
        SlateSpace(50, 4, sample_pool=np.arange(3))


def test_info_level_full_reports_the_best_current_utility():
    env = RecEnv(EnvConfig.small(info_level="full"))
    venv = BatchedRecEnv(3, EnvConfig.small(info_level="full"))
    env.reset(seed=0)
    venv.reset(seed=0)
    items = np.arange(env.world.n_items)
    for _ in range(5):
        _, _, _, _, info = env.step(env.best_slate())
        util = env.sim.true_utility(items)[0]
        util[env.world.items.release_time > env.sim.time[0]] = -np.inf
        assert info["best_utility"] == pytest.approx(float(util.max()), rel=1e-6)
        _, _, _, _, vinfo = venv.step(venv.best_slates())
        vutil = venv.sim.true_utility(items)
        vutil[venv.world.items.release_time[None, :] > venv.sim.time[:, None]] = -np.inf
        np.testing.assert_allclose(vinfo["best_utility"], vutil.max(axis=1), rtol=1e-6)
        assert vinfo["_best_utility"].all()
