"""Standard RL clients on the registered envs: observation keys, shapes, vectorization modes.

Stable-Baselines3 is the most used RL library; its ``check_env`` and its dict-observation
feature extractor are the clients that broke on the old observation (a key ``items`` that
collides with ``torch.nn.ModuleDict.items``, a 0-d ``user`` entry), and gymnasium's generic
batching of ``SlateSpace`` sampled unreleased items in the ``sync`` / ``async`` modes.
"""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector.utils import batch_differing_spaces, batch_space
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.torch_layers import CombinedExtractor

import simenv  # noqa: F401  (registers the ids)
from simenv import BatchedRecEnv, EnvConfig, Obs, RecEnv
from simenv.spaces import SlateSpace
from simenv.types import obs_users

ENV_IDS = ["simenv/RecEnv-small-v0", "simenv/RecEnv-v0"]


def _leaf_spaces(space):
    if isinstance(space, gym.spaces.Dict):
        for sub in space.spaces.values():
            yield from _leaf_spaces(sub)
    else:
        yield space


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sb3_check_env_passes_without_warnings(env_id):
    env = gym.make(env_id).unwrapped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb3_check_env(env, warn=True, skip_render_check=True)


def test_observation_keys_are_safe_attribute_names_and_no_entry_is_0d():
    env = RecEnv(EnvConfig.small())
    venv = BatchedRecEnv(3, EnvConfig.small())
    keys = set(env.observation_space.spaces)
    assert "items" not in keys and Obs.ITEMS in keys
    # SB3's CombinedExtractor (and any ModuleDict keyed by observation key) must accept them
    bad = [k for k in keys if hasattr(torch.nn.ModuleDict(), k)]
    assert not bad, f"observation keys collide with ModuleDict attributes: {bad}"
    CombinedExtractor(env.observation_space)
    assert all(s.shape != () for s in _leaf_spaces(env.observation_space))
    assert all(len(s.shape) >= 2 for s in _leaf_spaces(venv.observation_space))
    obs, info = env.reset(seed=3)
    assert obs[Obs.USER].shape == (1,) and int(obs[Obs.USER][0]) == info["user"]
    vobs, vinfo = venv.reset(seed=3)
    assert vobs[Obs.USER].shape == (3, 1)
    assert obs_users(vobs).tolist() == vinfo["user"].tolist()
    assert venv.observation_space.contains(vobs) and env.observation_space.contains(obs)


def test_obs_users_reads_batched_and_plain_ids_and_rejects_other_shapes():
    assert obs_users({Obs.USER: np.array([[4], [7]])}).tolist() == [4, 7]
    assert obs_users({Obs.USER: np.array([4, 7])}).tolist() == [4, 7]
    with pytest.raises(ValueError, match=r"obs\['user'\] must have shape"):
        obs_users({Obs.USER: np.zeros((2, 2), np.int64)})
    with pytest.raises(ValueError, match="integer"):
        obs_users({Obs.USER: np.array([[0.5]])})


def _released_distinct(slates, release_time, times):
    s = np.sort(slates, axis=1)
    distinct = not (s[:, 1:] == s[:, :-1]).any()
    return distinct and bool((release_time[slates] <= times[:, None]).all())


def test_make_vec_sync_samples_valid_slates_on_the_default_env():
    envs = gym.make_vec("simenv/RecEnv-v0", num_envs=64, vectorization_mode="sync")
    try:
        assert isinstance(envs.action_space, SlateSpace) and envs.action_space.shape == (64, 10)
        envs.action_space.seed(0)
        release = envs.envs[0].unwrapped.world.catalog.release_time
        obs, _ = envs.reset(seed=0)
        assert obs[Obs.USER].shape == (64, 1)
        for _ in range(5):
            a = envs.action_space.sample()
            assert envs.action_space.contains(a)
            assert _released_distinct(a, release, obs[Obs.CONTEXT][:, 0])
            obs, *_ = envs.step(a)
    finally:
        envs.close()


def test_make_vec_async_samples_valid_slates():
    envs = gym.make_vec("simenv/RecEnv-small-v0", num_envs=2, vectorization_mode="async")
    try:
        assert isinstance(envs.action_space, SlateSpace)
        envs.reset(seed=1)
        envs.action_space.seed(1)
        for _ in range(20):
            envs.step(envs.action_space.sample())
    finally:
        envs.close()


def test_batch_space_keeps_the_pool_and_rejects_mismatches():
    pool = np.array([3, 5, 8, 13, 21, 34])
    single = SlateSpace(40, 3, sample_pool=pool, seed=0)
    batched = batch_space(single, 50)
    assert isinstance(batched, SlateSpace) and batched.shape == (50, 3)
    a = batched.sample()
    assert np.isin(a, pool).all() and batched.contains(a)
    with pytest.raises(ValueError, match="already batched"):
        batch_space(batched, 2)
    other = SlateSpace(40, 3, sample_pool=np.array([5, 8, 13, 99 % 40]), seed=0)
    both = batch_differing_spaces([single, other])
    assert both.shape == (2, 3) and set(both.sample_pool.tolist()) == {5, 8, 13}
    with pytest.raises(ValueError, match="equal n_items and k"):
        batch_differing_spaces([single, SlateSpace(41, 3)])
