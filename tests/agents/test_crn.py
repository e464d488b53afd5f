"""Common random numbers in online rollouts (agents.rollout over simenv's counter-based
streams): per-user outcomes of whole lifetimes depend only on what is shown to that user."""

from __future__ import annotations

import numpy as np
import pytest

from agents.rollout import OUTCOMES, rollout
from simenv import BatchedRecEnv
from simenv.types import obs_users
from tests.agents.helpers import small_world
from tests.simenv.helpers import hash_slates

# rewards (default mix: click + like - dislike), counts, sessions: sums of integers, exact;
# watch minutes: float32 sums, compared to float32 rounding of a lifetime's total
EXACT = [name for name in OUTCOMES if name != "watch_minutes"]


class HashAgent:
    """Acts on each user from that user's observation only (see ``hash_slates``); users with
    ids in ``other`` get another salt, i.e. other slates."""

    def __init__(self, world, k, other=(), salt=1):
        self.world, self.k, self.name = world, k, "hash"
        self.other, self.salt = np.asarray(other, dtype=np.int64), salt
        self.last_candidates = None

    def act(self, obs):
        users = obs_users(obs)
        salt = np.where(np.isin(users, self.other), self.salt, 0)
        return hash_slates(self.world, obs, self.k, salt)


@pytest.fixture(scope="module")
def world():
    return small_world(0)


def _assert_same(a, b, rows_a, rows_b):
    for name in EXACT:
        np.testing.assert_array_equal(a.outcomes[name][rows_a], b.outcomes[name][rows_b], name)
    np.testing.assert_allclose(
        a.outcomes["watch_minutes"][rows_a], b.outcomes["watch_minutes"][rows_b], rtol=1e-5
    )


def test_crn_agents_that_agree_on_a_user_get_identical_outcomes_for_that_user(world):
    cfg, w = world
    env = BatchedRecEnv(16, cfg, world=w)
    base = rollout(env, HashAgent(w, cfg.slate_size), 60, seed=3)
    users = base.users
    other = users[users % 2 == 1]  # the agents differ on these users only
    diff = rollout(env, HashAgent(w, cfg.slate_size, other=other), 60, seed=3)
    np.testing.assert_array_equal(diff.users, users)
    same = ~np.isin(users, other)
    assert same.sum() >= 20 and (~same).sum() >= 20
    _assert_same(base, diff, same, same)
    # the users they treat differently do see other outcomes (the check above could fail)
    changed = base.outcomes["slates"][~same] != diff.outcomes["slates"][~same]
    assert changed.mean() > 0.3
    assert base.outcomes["clicks"][same].sum() > 30  # lifetimes with real engagement


def test_crn_outcomes_do_not_depend_on_num_envs_or_user_order(world):
    cfg, w = world
    agent = HashAgent(w, cfg.slate_size)
    a = rollout(BatchedRecEnv(16, cfg, world=w), agent, 50, seed=7)
    perm = np.random.default_rng(0).permutation(a.users)
    b = rollout(BatchedRecEnv(5, cfg, world=w), agent, 50, seed=7, users=perm)
    c = rollout(BatchedRecEnv(64, cfg, world=w), agent, 50, seed=7, users=perm)  # B > users
    pos = np.argsort(perm)[np.searchsorted(perm, a.users, sorter=np.argsort(perm))]
    np.testing.assert_array_equal(b.users[pos], a.users)
    _assert_same(a, b, slice(None), pos)
    _assert_same(a, c, slice(None), pos)
    # another seed: other draws, other outcomes
    d = rollout(BatchedRecEnv(16, cfg, world=w), agent, 50, seed=8, users=a.users)
    assert (d.outcomes["slates"] != a.outcomes["slates"]).mean() > 0.3
