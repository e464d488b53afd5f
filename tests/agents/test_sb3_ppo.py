"""Stable-Baselines3 PPO (MultiInputPolicy) learns on simenv/RecEnv-small-v0 through the adapters.

The adapters that suit PPO here: :class:`simenv.wrappers.EmbeddingAction` (an 8-d query in a
PureSVD item space built from a uniformly random log) and
:class:`simenv.wrappers.HistoryEmbeddingObservation` (the history pooled in that space), with
SB3's ``VecNormalize`` for observations and rewards. Settings, tuned the way an RL user
would (on seeds 1-2, not the tested seed 0): 8 envs x ``n_steps=64``, ``batch_size=128``,
``learning_rate=1e-3``, ``gamma=0.9``, ``log_std_init=-0.5``, ``ent_coef=0``, 8,192 env steps.
Measured (reward per user over all 300 users; uniformly random slates 7.9, popular 9.6):
seeds 0-4 reach 17.0, 14.8, 12.7, 12.0 and 8.5 - PPO at this budget is not reliable on every
seed; the ``rl`` benchmark runs the multi-seed comparison with twice the steps. This test pins
seed 0 (deterministic on one machine) and compares the trained policy, paired over all users
with the same per-user streams, with the untrained policy, the uniform random agent and the
popular agent, through the verdict API.
"""

import numpy as np
import pytest
import torch

from agents.base import PopularAgent, RandomAgent
from agents.rollout import rollout
from benchmarks.stats import paired_effect, verdict
from simenv import BatchedRecEnv, EnvConfig, RecEnv, UniformPolicy, collect
from simenv.types import Columns
from simenv.wrappers import (
    AdapterAgent,
    EmbeddingAction,
    HistoryEmbeddingObservation,
    log_item_embeddings,
)

sb3 = pytest.importorskip("stable_baselines3")  # the rl extra; make test installs it


def test_ppo_multi_input_policy_beats_random_and_popular_on_the_small_env():
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    torch.set_num_threads(1)
    cfg = EnvConfig.small()
    env = BatchedRecEnv(300, cfg)
    world = env.world
    log = collect(env, UniformPolicy(world, cfg.slate_size, seed=0), n_users=300, seed=10)
    vec = log_item_embeddings(log, world.n_users, world.n_items, dim=8, seed=0)
    clicks = np.bincount(log[Columns.ITEM][log[Columns.FEEDBACK] > 0], minlength=world.n_items)

    def make():
        return HistoryEmbeddingObservation(EmbeddingAction(RecEnv(cfg, world=world), vec), vec)

    venv = VecNormalize(DummyVecEnv([make] * 8), norm_obs=True, norm_reward=True, gamma=0.9)
    venv.seed(0)
    model = PPO(
        "MultiInputPolicy", venv, n_steps=64, batch_size=128, learning_rate=1e-3, gamma=0.9,
        gae_lambda=0.95, ent_coef=0.0, n_epochs=10, seed=0, verbose=0,
        policy_kwargs=dict(net_arch=[64, 64], log_std_init=-0.5),
    )  # fmt: skip
    probe = make()

    def evaluate():
        venv.training = False
        agent = AdapterAgent(
            lambda x: model.predict(venv.normalize_obs(x), deterministic=True)[0],
            probe.env, probe, name="ppo",
        )  # fmt: skip
        out = rollout(env, agent, 300, seed=7).outcomes["reward"]
        venv.training = True
        return out

    before = evaluate()
    model.learn(8192)
    ppo = evaluate()
    rand = rollout(env, RandomAgent(world, cfg.slate_size, seed=0), 300, seed=7).outcomes["reward"]
    pop = rollout(
        env, PopularAgent(clicks, world.catalog.release_time, cfg.slate_size), 300, seed=7
    ).outcomes["reward"]
    for control, name in ((before, "untrained"), (rand, "random"), (pop, "popular")):
        eff = paired_effect(ppo, control)
        assert verdict(eff, ">", 0.0) == "HOLDS", (name, eff.format(), ppo.mean(), control.mean())
