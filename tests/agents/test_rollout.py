"""Online rollouts (agents.rollout): per-user outcomes recomputed from the log by brute force,
determinism, the same users for every agent evaluated with one seed, and the confidence
intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from agents.base import OracleAgent, PopularAgent, RandomAgent
from agents.rollout import OUTCOMES, mean_ci, per_user_outcomes, rollout
from simenv import BatchedRecEnv
from simenv.types import Columns, EventType
from tests.agents.helpers import small_world


@pytest.fixture(scope="module")
def world():
    return small_world(0)


@pytest.fixture(scope="module")
def env(world):
    cfg, w = world
    return BatchedRecEnv(16, cfg, world=w)


def _brute_force(log, users):
    out = {name: np.zeros(len(users)) for name in OUTCOMES}
    for j, u in enumerate(users):
        rows = log[Columns.USER] == u
        fb = log[Columns.FEEDBACK][rows]
        out["reward"][j] = log[Columns.REWARD][rows].astype(np.float64).sum()
        out["clicks"][j] = np.isin(fb, [EventType.CLICK, EventType.LIKE, EventType.DISLIKE]).sum()
        out["likes"][j] = (fb == EventType.LIKE).sum()
        out["watch_minutes"][j] = log[Columns.WATCH][rows].astype(np.float64).sum()
        out["slates"][j] = len(np.unique(log[Columns.REQUEST][rows]))
        out["sessions"][j] = log[Columns.SESSION][rows].max() + 1 if rows.any() else 0
        out["returned"][j] = float(out["sessions"][j] > 1)
    return out


def test_outcomes_equal_totals_recomputed_from_the_log(world, env):
    cfg, w = world
    res = rollout(env, RandomAgent(w, cfg.slate_size, seed=3), 40, seed=5)
    assert res.agent == "random" and res.users.shape == (40,) and res.seconds > 0
    assert len(np.unique(res.users)) == 40
    # every user played exactly one whole episode, and nobody else did
    assert set(np.unique(res.log[Columns.USER])) == set(res.users.tolist())
    ref = _brute_force(res.log, res.users)
    assert set(res.outcomes) == set(OUTCOMES)
    for name in OUTCOMES:
        np.testing.assert_allclose(res.outcomes[name], ref[name], rtol=1e-9, err_msg=name)
    assert (res.outcomes["slates"] >= 1).all() and res.outcomes["reward"].sum() > 0
    assert res.outcomes["returned"].sum() > 0 and res.outcomes["likes"].sum() > 0
    # the log's rows are whole slates of k
    assert len(res.log) == cfg.slate_size * res.outcomes["slates"].sum()
    summary = res.summary()
    for name in OUTCOMES:
        m, h = mean_ci(res.outcomes[name])
        assert summary[name] == m and (summary[f"{name}_ci"] == h or math.isnan(h))


def test_per_user_outcomes_zero_for_users_without_rows(world, env):
    cfg, w = world
    res = rollout(env, RandomAgent(w, cfg.slate_size, seed=0), 10, seed=1)
    absent = np.setdiff1d(np.arange(w.n_users), res.users)[:3]
    users = np.concatenate([absent[:1], res.users[::-1], absent[1:]])
    out = per_user_outcomes(res.log, users)
    for name in OUTCOMES:
        assert out[name][0] == 0 and (out[name][-2:] == 0).all()
        np.testing.assert_array_equal(out[name][1:-2], res.outcomes[name][::-1])


def test_same_seed_same_numbers_and_same_users_for_every_agent(world, env):
    cfg, w = world
    a = rollout(env, RandomAgent(w, cfg.slate_size, seed=2), 30, seed=8)
    b = rollout(env, RandomAgent(w, cfg.slate_size, seed=2), 30, seed=8)
    assert a.log.equals(b.log)
    for name in OUTCOMES:
        np.testing.assert_array_equal(a.outcomes[name], b.outcomes[name])
    counts = np.bincount(np.arange(w.n_items) % 7, minlength=w.n_items).astype(float)
    pop = rollout(env, PopularAgent(counts, w.items.release_time, cfg.slate_size), 30, seed=8)
    oracle = rollout(env, OracleAgent(env), 30, seed=8)
    np.testing.assert_array_equal(pop.users, a.users)
    np.testing.assert_array_equal(oracle.users, a.users)
    assert set(np.unique(oracle.log[Columns.USER])) == set(a.users.tolist())
    # another seed: other users
    c = rollout(env, RandomAgent(w, cfg.slate_size, seed=2), 30, seed=9)
    assert not np.array_equal(np.sort(c.users), np.sort(a.users))
    # the oracle (reads the truth) earns more than random slates on the same users
    assert oracle.outcomes["reward"].mean() > a.outcomes["reward"].mean()
    # explicit users are used as given
    chosen = np.array([4, 17, 250])
    d = rollout(env, RandomAgent(w, cfg.slate_size), 99, seed=0, users=chosen)
    np.testing.assert_array_equal(d.users, chosen)
    assert set(np.unique(d.log[Columns.USER])) == {4, 17, 250}


def test_mean_ci_is_the_t_interval():
    x = np.array([1.0, 4.0, 2.5, 7.0, 0.5])
    m, h = mean_ci(x)
    assert m == pytest.approx(3.0)
    assert h == pytest.approx(stats.t.ppf(0.975, 4) * x.std(ddof=1) / math.sqrt(5))
    m90, h90 = mean_ci(x, level=0.9)
    assert m90 == m and h90 == pytest.approx(stats.t.ppf(0.95, 4) * x.std(ddof=1) / math.sqrt(5))
    one = mean_ci(np.array([2.0]))
    assert one[0] == 2.0 and math.isnan(one[1])
    assert all(math.isnan(v) for v in mean_ci(np.array([])))


def test_sharded_rollout_is_the_same_for_any_number_of_workers(world):
    import functools

    from agents.rollout import rollout_sharded
    from simenv.shard import fixed_policy

    cfg, w = world
    users = np.random.default_rng(1).choice(w.n_users, size=60, replace=False)
    factory = functools.partial(RandomAgent, slate_size=cfg.slate_size)
    kw = dict(n_shards=4, seed=2, world=w, num_envs=8)
    ref = rollout_sharded(cfg, factory, users, **kw)
    par = rollout_sharded(cfg, factory, users, backend="processes", workers=2, **kw)
    # bitwise: the same shards run the same single-threaded code on any worker
    assert par.log.equals(ref.log)
    for name in OUTCOMES:
        assert np.array_equal(par.outcomes[name], ref.outcomes[name]), name
    assert np.array_equal(ref.users, users) and ref.outcomes["slates"].min() >= 1
    assert ref.agent == "random"
    # an agent without a seed of its own (here popularity counts) goes through fixed_policy
    counts = np.bincount(ref.log[Columns.ITEM], minlength=w.n_items)
    pop = PopularAgent(counts, w.catalog.release_time, cfg.slate_size)
    res = rollout_sharded(cfg, fixed_policy(pop), users, **kw)
    assert res.outcomes["slates"].min() >= 1 and res.agent == pop.name
