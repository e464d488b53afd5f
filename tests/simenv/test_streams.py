"""Counter-based random streams (simenv.streams) and the common-random-numbers promise of the
envs: a user's draws depend only on (seed, user, the user's episode, step, draw index)."""

from __future__ import annotations

import numpy as np
from scipy import stats

from simenv import BatchedRecEnv, EnvConfig, RecEnv
from simenv.streams import (
    DRAWS_PER_STEP,
    exponential_from_uniform,
    mix64,
    normal_from_uniforms,
    occurrence_index,
    seed_key,
    step_uniforms,
    stream_keys,
    uniforms,
)
from simenv.types import Obs
from tests.simenv.helpers import assert_equal_nested, hash_slates


def test_mix64_is_splitmix64():
    # SplitMix64 seeded with 0 outputs mix64(n * gamma) for n = 1, 2, 3 (reference values of
    # Vigna's splitmix64.c)
    gamma = 0x9E3779B97F4A7C15
    n = np.array([(i * gamma) % 2**64 for i in (1, 2, 3)], dtype=np.uint64)
    assert [int(x) for x in mix64(n)] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
        0x06C45D188009454F,
    ]


def test_step_uniforms_equal_the_counter_definition_and_are_uniform():
    keys = stream_keys(seed_key(3), np.arange(4_000), np.zeros(4_000))
    steps = np.arange(4_000) % 37
    u = step_uniforms(keys, steps, 6)  # (6, B)
    for j in range(6):
        np.testing.assert_array_equal(u[j], uniforms(keys, DRAWS_PER_STEP * (steps + 1) + j))
    assert u.min() >= 0.0 and u.max() < 1.0
    # each draw index, and all of them together, pass a Kolmogorov-Smirnov test
    for row in (*u, u.ravel()):
        assert stats.kstest(row, "uniform").pvalue > 1e-3
    # draws of one slot are not correlated with each other or with the next step's
    nxt = step_uniforms(keys, steps + 1, 6)
    corr = np.corrcoef(np.vstack([u, nxt]))
    assert np.abs(corr - np.eye(12)).max() < 0.06  # 4 sigma at n = 4,000 is about 0.063


def test_normal_and_exponential_transforms():
    keys = stream_keys(seed_key(5), np.arange(20_000), np.ones(20_000))
    u = step_uniforms(keys, np.zeros(20_000, dtype=np.int64), 3)
    assert stats.kstest(normal_from_uniforms(u[0], u[1]), "norm").pvalue > 1e-3
    assert stats.kstest(exponential_from_uniform(u[2]), "expon").pvalue > 1e-3
    assert np.isfinite(exponential_from_uniform(np.array([0.0, 1.0 - 2**-52]))).all()
    assert np.isfinite(normal_from_uniforms(np.array([0.0]), np.array([0.5]))).all()


def test_keys_differ_by_seed_user_and_episode():
    k = stream_keys(seed_key(0), np.array([1, 1, 2, 1]), np.array([0, 1, 0, 0]))
    assert len({int(x) for x in k[:3]}) == 3 and k[0] == k[3]
    assert stream_keys(seed_key(1), [1], [0])[0] != k[0]


def test_occurrence_index():
    v = np.array([5, 3, 5, 5, 3, 9])
    assert occurrence_index(v).tolist() == [0, 0, 1, 2, 1, 0]
    assert occurrence_index(np.zeros(0, dtype=np.int64)).tolist() == []


# ---------------------------------------------------------------- the envs keep the promise
def _trajectory(env, users, seed, steps):
    """Per user: the (reward, clicked position, event) of each of its first ``steps`` steps."""
    obs, _ = env.reset(seed=seed, options={"user_ids": users})
    out = {int(u): [] for u in users}
    live = np.ones(len(users), dtype=bool)
    for _ in range(steps):
        obs_next, rew, term, trunc, info = env.step(
            hash_slates(env.world, obs, env.config.slate_size)
        )
        for i in np.nonzero(live)[0]:
            out[int(users[i])].append(
                (float(rew[i]), int(info["clicked_position"][i]), int(info["event"][i]))
            )
        live &= ~(term | trunc)
        obs = obs_next
    return out


def test_a_users_outcomes_do_not_depend_on_batch_or_order():
    cfg = EnvConfig.small()
    users = np.array([11, 42, 7, 99, 250, 3])
    a = _trajectory(BatchedRecEnv(6, cfg), users, seed=4, steps=40)
    b = _trajectory(BatchedRecEnv(6, cfg), users[::-1].copy(), seed=4, steps=40)
    assert a == b  # rewards are sums of small integers under the default mix: exact
    # one user alone in a RecEnv meets the same draws
    env = RecEnv(cfg)
    obs, info = env.reset(seed=4, options={"user_id": 7})
    assert info["user"] == 7
    single = []
    for _ in range(40):
        batch_obs = {k: v[None, ...] for k, v in obs.items()}
        obs, rew, term, trunc, info = env.step(
            hash_slates(env.world, batch_obs, env.config.slate_size)[0]
        )
        single.append((float(rew), info["clicked_position"], info["event"]))
        if term or trunc:
            break
    assert single == a[7][: len(single)] and len(single) == len(a[7])
    assert sum(c >= 0 for _, c, _ in a[7]) >= 3  # the user did click


def test_reset_seed_keys_draws_and_restarts_episode_counts():
    cfg = EnvConfig.small()
    env = BatchedRecEnv(2, cfg)
    obs, _ = env.reset(seed=9, options={"user_ids": np.array([5, 5])})
    t0 = obs[Obs.CONTEXT][:, 0].copy()
    assert t0[0] != t0[1]  # the user's episodes 0 and 1: different start-time draws
    obs2, _ = env.reset(seed=9, options={"user_ids": np.array([5, 8])})
    assert obs2[Obs.CONTEXT][0, 0] == t0[0]  # episode 0 of user 5 again
    obs3, _ = env.reset(options={"user_ids": np.array([5, 5])})  # no seed: counts go on
    assert obs3[Obs.CONTEXT][0, 0] == t0[1]  # episode 1 of user 5
    assert obs3[Obs.CONTEXT][1, 0] not in t0  # episode 2
    # users drawn by slots are a function of (seed, slot, slot episode)
    x = BatchedRecEnv(3, cfg)
    y = BatchedRecEnv(3, cfg)
    assert_equal_nested(x.reset(seed=2), y.reset(seed=2))
