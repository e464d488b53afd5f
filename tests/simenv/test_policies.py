"""Logging policies: valid slates, group locality, and propensities that are the sampling
probabilities (per position against empirical frequencies; per slate summing to one)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from simenv import InGroupPolicy, Obs, PopularityPolicy, UniformPolicy, World, WorldConfig

POLICIES = [
    (UniformPolicy, 0.0),
    (PopularityPolicy, 0.0),
    (PopularityPolicy, 0.3),
    (InGroupPolicy, 0.0),
    (InGroupPolicy, 0.3),
]


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig.small(), seed=0)


@pytest.fixture(scope="module")
def tiny() -> World:
    """12 items, 2 groups; 9 released at time 0 (group 1: items 2 and 7), 3 released later."""
    w = World(
        WorldConfig.small(n_items=12, n_users=6, n_creators=2, n_groups=2, new_item_fraction=0.3),
        seed=3,
    )
    assert sorted(np.nonzero(w.items.release_time > 0)[0].tolist()) == [1, 9, 10]
    assert np.nonzero(w.items.group == 1)[0].tolist() == [2, 7]
    assert w.users.group.tolist() == [1, 0, 0, 0, 1, 1]
    return w


def _obs(users, times):
    users = np.asarray(users, dtype=np.int64)
    ctx = np.zeros((users.size, 3), dtype=np.float32)
    ctx[:, 0] = times
    return {Obs.USER: users, Obs.CONTEXT: ctx}


def _q(world, policy_cls, eps, user, t, beta=0.5):
    """The mixture q_u(i) of the policies' docstring, by hand (float64, over all items)."""
    rel = world.items.release_time <= t
    if policy_cls is UniformPolicy:
        w = np.ones(world.n_items)
    else:
        w = world.items.popularity.astype(np.float64) ** beta
    allowed = rel.copy()
    if policy_cls is InGroupPolicy:
        allowed &= world.items.group == world.users.group[user]
    pi = np.where(allowed, w, 0.0) / np.where(allowed, w, 0.0).sum()
    eps = 0.0 if policy_cls is UniformPolicy else eps
    return (1 - eps) * pi + eps * rel / rel.sum()


@pytest.mark.parametrize("policy_cls,eps", POLICIES)
def test_slates_are_distinct_released_items(world, policy_cls, eps):
    policy = policy_cls(world, 5, epsilon=eps, seed=0)
    rng = np.random.default_rng(0)
    users = rng.integers(world.n_users, size=3000)
    times = rng.uniform(0.0, 12.0, size=3000)
    slates, prop = policy.act(_obs(users, times))
    assert slates.shape == prop.shape == (3000, 5) and slates.dtype == np.int64
    assert np.all(np.sort(slates, axis=1)[:, 1:] != np.sort(slates, axis=1)[:, :-1])
    assert np.all(world.items.release_time[slates] <= times[:, None].astype(np.float32))
    assert (world.items.release_time[slates] > 0).any()  # new items are shown once released
    assert np.all((prop > 0) & (prop <= 1))
    same = world.items.group[slates] == world.users.group[users][:, None]
    if policy_cls is InGroupPolicy and eps == 0:
        assert same.all()
    elif policy_cls is InGroupPolicy:
        assert 0.05 < (~same).mean() < 0.3  # epsilon share of uniform picks, about half cross
    else:
        assert (~same).mean() > 0.3


def test_same_seed_same_slates(world):
    obs = _obs(np.arange(50), np.linspace(0, 9, 50))
    a = PopularityPolicy(world, 5, epsilon=0.2, seed=4).act(obs)
    b = PopularityPolicy(world, 5, epsilon=0.2, seed=4).act(obs)
    c = PopularityPolicy(world, 5, epsilon=0.2, seed=5).act(obs)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("policy_cls,eps", POLICIES)
@pytest.mark.parametrize("t", [0.0, 5.0])
def test_position_zero_propensity_matches_frequency(tiny, policy_cls, eps, t):
    user = 1  # group 0
    n = 60_000
    slates, prop = policy_cls(tiny, 3, epsilon=eps, seed=1).act(_obs(np.full(n, user), t))
    q = _q(tiny, policy_cls, eps, user, t)
    # the logged position-0 propensity is q(item), the same for every draw of the item
    np.testing.assert_allclose(prop[:, 0], q[slates[:, 0]], rtol=1e-5)
    observed = np.bincount(slates[:, 0], minlength=tiny.n_items)
    support = q > 0
    assert np.all(observed[~support] == 0)
    _, p_value = stats.chisquare(observed[support], n * q[support])
    assert p_value > 1e-3, (observed, n * q)
    # position 1 given position 0: q(j) / (1 - q(i)), the Plackett-Luce factor
    np.testing.assert_allclose(prop[:, 1], q[slates[:, 1]] / (1 - q[slates[:, 0]]), rtol=1e-5)
    np.testing.assert_allclose(
        prop[:, 2],
        q[slates[:, 2]] / (1 - q[slates[:, 0]] - q[slates[:, 1]]),
        rtol=1e-4,
    )


@pytest.mark.parametrize("policy_cls,eps", POLICIES)
def test_slate_probabilities_sum_to_one_and_match_frequencies(tiny, policy_cls, eps):
    user, t, n = 1, 0.0, 60_000
    slates, prop = policy_cls(tiny, 2, epsilon=eps, seed=2).act(_obs(np.full(n, user), t))
    q = _q(tiny, policy_cls, eps, user, t)
    support = np.nonzero(q > 0)[0]
    every = list(itertools.permutations(support.tolist(), 2))
    expected = {s: q[s[0]] * q[s[1]] / (1 - q[s[0]]) for s in every}
    assert sum(expected.values()) == pytest.approx(1.0, abs=1e-12)
    # the logged per-slate product: one value per distinct slate, all slates seen, sum 1
    logged: dict[tuple, float] = {}
    for s, p in zip(map(tuple, slates.tolist()), prop.prod(axis=1).tolist(), strict=True):
        logged.setdefault(s, p)
    assert set(logged) == set(every)
    assert sum(logged.values()) == pytest.approx(1.0, abs=1e-5)
    for s in every:
        assert logged[s] == pytest.approx(expected[s], rel=1e-5)
    counts = {s: 0 for s in every}
    for s in map(tuple, slates.tolist()):
        counts[s] += 1
    obs = np.array([counts[s] for s in every])
    exp = np.array([expected[s] for s in every]) * n
    _, p_value = stats.chisquare(obs, exp)
    assert p_value > 1e-3


def test_in_group_policy_follows_the_user_group_and_release(tiny):
    policy = InGroupPolicy(tiny, 2, seed=0)
    # group 1 has exactly two items: every slate is a permutation of them
    slates, prop = policy.act(_obs(np.zeros(200, np.int64), 0.0))
    assert {tuple(sorted(s)) for s in slates.tolist()} == {(2, 7)}
    np.testing.assert_allclose(prop[:, 1], 1.0)  # the last remaining item is certain
    # a slate of three cannot be filled from two in-group items without exploration
    with pytest.raises(ValueError, match="fewer than slate_size=3"):
        InGroupPolicy(tiny, 3, seed=0).act(_obs([0], 0.0))
    slates, _ = InGroupPolicy(tiny, 3, epsilon=0.5, seed=0).act(_obs(np.zeros(100, np.int64), 0.0))
    assert np.all(tiny.items.release_time[slates] <= 0)


def test_too_few_released_items_raise(tiny):
    with pytest.raises(ValueError, match="fewer than slate_size=10"):
        UniformPolicy(tiny, 10, seed=0).act(_obs([1], 0.0))
    slates, _ = UniformPolicy(tiny, 10, seed=0).act(_obs([1], 9.0))  # 11 released by then
    assert np.all(tiny.items.release_time[slates] <= 9.0)


@pytest.mark.parametrize("policy_cls", [PopularityPolicy, InGroupPolicy])
@pytest.mark.parametrize("eps", [0.3, 0.7])
def test_epsilon_mixture_is_exact_when_many_items_are_unreleased(policy_cls, eps):
    # half the items unreleased, and a larger share of the popular weight released than of the
    # items: drawing from all items and rejecting the unreleased ones would reweight the two
    # parts of the mixture (0.72 vs 0.5 acceptance) and the propensities would be wrong
    w = World(
        WorldConfig.small(
            n_items=12,
            n_users=6,
            n_creators=2,
            n_groups=2,
            new_item_fraction=0.5,
            popularity_exponent=2.0,
        ),
        seed=8,
    )
    rel = w.items.release_time <= 0
    weight = w.items.popularity.astype(np.float64) ** 0.5
    assert rel.mean() == 0.5 and weight[rel].sum() / weight.sum() > 0.7
    user, n = 0, 80_000
    slates, prop = policy_cls(w, 2, epsilon=eps, seed=3).act(_obs(np.full(n, user), 0.0))
    q = _q(w, policy_cls, eps, user, 0.0)
    np.testing.assert_allclose(prop[:, 0], q[slates[:, 0]], rtol=1e-5)
    observed = np.bincount(slates[:, 0], minlength=w.n_items)
    assert np.all(observed[q == 0] == 0)
    _, p_value = stats.chisquare(observed[q > 0], n * q[q > 0])
    assert p_value > 1e-3, (observed, n * q)
