"""The two oracles (agents.base): names, the backwards-compatible alias, valid slates that are
the env's ground-truth slates, and whole-lifetime rollouts on the same users."""

from __future__ import annotations

import numpy as np

from agents.base import ExpectedRewardOracle, GreedyUtilityOracle, OracleAgent, RandomAgent
from agents.rollout import rollout
from simenv import BatchedRecEnv
from tests.agents.helpers import small_world


def test_oracles_act_with_the_envs_truth_and_keep_their_names():
    cfg, w = small_world(0)
    env = BatchedRecEnv(12, cfg, world=w)
    obs, _ = env.reset(seed=0)
    assert OracleAgent is GreedyUtilityOracle
    util, er = GreedyUtilityOracle(env), ExpectedRewardOracle(env)
    assert (util.name, er.name) == ("oracle-utility", "oracle-expected-reward")
    for _ in range(5):
        a, b = util.act(obs), er.act(obs)
        np.testing.assert_array_equal(a, env.best_slates(kind="utility"))
        np.testing.assert_array_equal(b, env.best_slates(kind="expected_reward"))
        env.sim.validate(b)
        # greedy in the expected reward: at least the utility oracle's expected reward on average
        assert env.expected_reward(b).mean() >= env.expected_reward(a).mean()
        obs, *_ = env.step(b)


def test_oracles_in_rollouts_on_the_same_users():
    cfg, w = small_world(0)
    env = BatchedRecEnv(16, cfg, world=w)
    res = {
        a.name: rollout(env, a, 40, seed=2)
        for a in (GreedyUtilityOracle(env), ExpectedRewardOracle(env), RandomAgent(w, 5, seed=0))
    }
    users = res["random"].users
    for r in res.values():
        np.testing.assert_array_equal(r.users, users)
    rand = res["random"].outcomes["reward"].mean()
    for name in ("oracle-utility", "oracle-expected-reward"):  # a sanity check, not a finding
        assert res[name].outcomes["reward"].mean() > 2 * rand
