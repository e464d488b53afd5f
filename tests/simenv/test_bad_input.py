"""Bad input: random bad actions and configs raise only ValueError naming the argument, and a
rejected action changes nothing (state, RNG, the next step vs an untouched twin)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simenv import (
    BatchedRecEnv,
    EnvConfig,
    ImpressionLog,
    InGroupPolicy,
    PopularityPolicy,
    RecEnv,
    RewardConfig,
    UniformPolicy,
    UserModelConfig,
    World,
    WorldConfig,
    collect,
)
from simenv.core import Simulator
from tests.simenv.helpers import CONFIG_RANGES, assert_equal_nested, in_range, sim_state

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
K, N = 5, 500  # slate size and catalog of the small env


KINDS = ["shape", "float", "low", "high", "duplicate", "unreleased", "bool", "object", "ragged"]

# what a bad action is made of; drawn the same way whatever the env's state, so that hypothesis
# sees a state-independent strategy (the env state only decides how the draws are mapped to items)
BAD_ACTION = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(KINDS),
        "seed": st.integers(0, 2**32 - 1),
        "row": st.integers(0, 1_000),
        "col": st.integers(0, K - 1),
        "offset": st.integers(1, K - 1),
        "low": st.integers(-(2**63), -1),
        "high": st.integers(N, 2**63 - 1),
        "pick": st.integers(0, 10**6),
        "dims": st.lists(st.integers(0, 7), max_size=3),
        "float": st.sampled_from([np.float16, np.float32, np.float64]),
    }
)


def _make_bad_action(d, env, batch=None):
    """Turn the draws ``d`` into an invalid action for ``env`` (a row of acting slots is bad)."""
    sim = env.sim
    shape = (K,) if batch is None else (batch, K)
    rng = np.random.default_rng(d["seed"])
    rel = env.world.items.release_time
    released = np.nonzero(rel <= sim.time.min())[0]
    a = np.stack([rng.choice(released, K, replace=False) for _ in range(batch or 1)])
    acting = np.nonzero(~np.atleast_1d(env._needs_reset))[0]  # RecEnv: one acting slot
    r, c = int(acting[d["row"] % acting.size]), d["col"]
    kind = d["kind"]
    if kind == "shape":
        dims = tuple(d["dims"])
        return np.zeros(dims if dims != shape else (*dims, 1), dtype=np.int64)
    if kind == "float":
        a = a.astype(d["float"])
    elif kind == "low":
        a[r, c] = d["low"]
    elif kind == "high":
        a[r, c] = d["high"]
    elif kind == "duplicate":
        a[r, c] = a[r, (c + d["offset"]) % K]
    elif kind == "unreleased":
        unreleased = np.nonzero(rel > sim.time[r])[0]
        # (late in a long run everything may be released: then an out-of-range id instead)
        item = unreleased[d["pick"] % unreleased.size] if unreleased.size else N
        a[r][a[r] == item] = -1  # (then also out of range: still invalid)
        a[r, c] = item
    elif kind == "bool":
        a = a.astype(bool)
    elif kind == "object":
        a = a.astype(object)
    elif kind == "ragged":
        lst = a.tolist()
        lst[r] = lst[r][:-1]
        return lst[0] + [[1, 2]] if batch is None else lst
    return a[0] if batch is None else a


def _pair(seed=0, n=None):
    if n is None:
        a, b = RecEnv(EnvConfig.small()), RecEnv(EnvConfig.small())
    else:
        a, b = BatchedRecEnv(n, EnvConfig.small()), BatchedRecEnv(n, EnvConfig.small())
    a.reset(seed=seed)
    b.reset(seed=seed)
    return a, b


def test_random_bad_actions_change_nothing_recenv():
    env, twin = _pair(seed=2)
    kinds = set()

    @SETTINGS
    @given(d=BAD_ACTION)
    def check(d):
        action = _make_bad_action(d, env)
        kinds.add(d["kind"])
        before = sim_state(env.sim)
        rng_before = env.np_random.bit_generator.state
        with pytest.raises(ValueError, match="action"):
            env.step(action)
        assert_equal_nested(sim_state(env.sim), before)
        assert env.np_random.bit_generator.state == rng_before
        # the next step is the one the untouched twin takes
        good = env.best_slate()
        out, out_twin = env.step(good), twin.step(good)
        assert_equal_nested(out, out_twin)
        if out[2] or out[3]:
            assert_equal_nested(env.reset(), twin.reset())

    check()
    assert kinds == set(KINDS)


def test_random_bad_actions_change_nothing_batched():
    env, twin = _pair(seed=3, n=4)

    @SETTINGS
    @given(d=BAD_ACTION)
    def check(d):
        if env._needs_reset.all():  # no slot acts: every action would be ignored; step on
            good = env.best_slates()
            assert_equal_nested(env.step(good), twin.step(good))
        resetting = env._needs_reset.copy()
        action = _make_bad_action(d, env, batch=4)
        before = sim_state(env.sim)
        rng_before = env.np_random.bit_generator.state
        with pytest.raises(ValueError, match="actions"):
            env.step(action)
        assert_equal_nested(sim_state(env.sim), before)
        assert env.np_random.bit_generator.state == rng_before
        np.testing.assert_array_equal(env._needs_reset, resetting)
        good = env.best_slates()
        assert_equal_nested(env.step(good), twin.step(good))

    check()


def test_step_before_reset_raises_a_clear_error():
    env = RecEnv(EnvConfig.small())
    with pytest.raises(RuntimeError, match="Call reset before using step method"):
        env.step(np.arange(K))
    venv = BatchedRecEnv(2, EnvConfig.small())
    with pytest.raises(RuntimeError, match="Call reset before using step method"):
        venv.step(np.tile(np.arange(K), (2, 1)))
    wrapped = gym.make("simenv/RecEnv-small-v0")
    with pytest.raises(gym.error.ResetNeeded, match="reset"):
        wrapped.step(np.arange(K))
    # and after the episode ended
    env.reset(seed=0)
    pool = env.action_space.sample_pool
    cross = pool[env.world.items.group[pool] != env.sim.group[0]][:K]
    while True:
        _, _, term, trunc, _ = env.step(cross)
        if term or trunc:
            break
    with pytest.raises(RuntimeError, match="Call reset"):
        env.step(cross)


@SETTINGS
@given(
    data=st.data(),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(10**25), 10**25),
        st.integers(10**300, 10**400),
        st.text(max_size=3),
        st.none(),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
        st.sampled_from([np.float32(0.5), np.int64(3), np.float64(0.1), np.int32(-2)]),
        st.floats(-2.0, 2.0),
        st.integers(-3, 70),
    ),
)
def test_random_configs_raise_only_value_error(data, value):
    name = data.draw(st.sampled_from(sorted(CONFIG_RANGES)))
    field = data.draw(st.sampled_from(sorted(CONFIG_RANGES[name])))
    cls = {
        "WorldConfig": WorldConfig,
        "UserModelConfig": UserModelConfig,
        "RewardConfig": RewardConfig,
        "EnvConfig": EnvConfig,
    }[name]
    ok = in_range(name, field, value)
    try:
        cfg = cls(**{field: value})
    except ValueError as e:
        assert not ok, f"{name}.{field}={value!r} is allowed but raised {e}"
        assert field in str(e) or (field == "n_topics" and "topics_per_" in str(e)), str(e)
    else:
        assert ok, f"{name}.{field}={value!r} should be rejected"
        assert getattr(cfg, field) == value


def test_bad_constructor_and_reset_arguments():
    small = EnvConfig.small()
    world = World(WorldConfig.small(), seed=0)
    cases = [
        (lambda: World("small"), "config"),
        (lambda: World(WorldConfig.small(), seed=-1), "seed"),
        (lambda: World(WorldConfig.small(), seed=1.5), "seed"),
        (lambda: RecEnv("small"), "config"),
        (lambda: RecEnv(small, render_mode="human"), "render_mode"),
        (lambda: RecEnv(small, world="world"), "world"),
        (
            lambda: RecEnv(EnvConfig.small(user_model=UserModelConfig(refill=2.0)), world=world),
            "user_model",
        ),
        (lambda: BatchedRecEnv(0, small), "num_envs"),
        (lambda: BatchedRecEnv(2, small, max_episode_steps=0), "max_episode_steps"),
        (lambda: BatchedRecEnv(2, small, render_mode="human"), "render_mode"),
        (lambda: BatchedRecEnv(2, "small"), "config"),
        (
            lambda: Simulator(world, EnvConfig.small(user_model=UserModelConfig(refill=2.0)), 2),
            "user_model",
        ),
        (lambda: Simulator(world, EnvConfig.small(slate_size=480), 1), "slate_size"),
        (lambda: world.utility(np.array([300]), np.arange(3)), "users"),
        (lambda: world.utility(np.array([0.5]), np.arange(3)), "users"),
        (lambda: world.affinity(np.array([0]), np.array([500])), "items"),
        (lambda: world.best_items(np.array([0]), 0), "k"),
        (lambda: world.best_items(np.array([0]), 501), "k"),
        (lambda: UniformPolicy(world, 0), "slate_size"),
        (lambda: PopularityPolicy(world, 5, epsilon=1.5), "epsilon"),
        (lambda: PopularityPolicy(world, 5, beta=-1.0), "beta"),
        (lambda: InGroupPolicy(world, 5, seed=-3), "seed"),
    ]
    for make, name in cases:
        with pytest.raises(ValueError, match=name):
            make()
    env = RecEnv(small)
    for user in (-1, 300, 1.5, True, "3", None):
        with pytest.raises(ValueError, match="user_id"):
            env.reset(seed=0, options={"user_id": user})
    venv = BatchedRecEnv(2, small)
    for users in (np.array([1]), np.array([1.0, 2.0]), np.array([0, 300]), np.array([-1, 0])):
        with pytest.raises(ValueError, match="user_ids"):
            venv.reset(seed=0, options={"user_ids": users})
    for users in (np.array([[1]]), np.array([0.5]), np.array([300])):
        with pytest.raises(ValueError, match="user_ids"):
            venv.queue_users(users)
    venv.reset(seed=0)
    with pytest.raises(ValueError, match="env"):
        collect(env, UniformPolicy(world, 5), n_users=3, progress=False)
    with pytest.raises(ValueError, match="n_users"):
        collect(venv, UniformPolicy(world, 5), n_users=0, progress=False)
    with pytest.raises(ValueError, match="users"):
        collect(venv, UniformPolicy(world, 5), n_users=3, users=np.arange(4), progress=False)


def test_bad_log_columns():
    log = ImpressionLog.empty()
    cols = dict(log.columns)
    with pytest.raises(ValueError, match="missing"):
        ImpressionLog({k: v for k, v in cols.items() if k != "item"})
    with pytest.raises(ValueError, match="unknown"):
        ImpressionLog({**cols, "colour": np.zeros(0)})
    with pytest.raises(ValueError, match="'time' has 1 rows"):
        ImpressionLog({**cols, "time": np.zeros(1)})
    with pytest.raises(ValueError, match="1-D"):
        ImpressionLog({**cols, "user": np.zeros((0, 2))})
    with pytest.raises(ValueError, match="together"):
        ImpressionLog(cols, candidates=np.zeros((0, 3)))
    with pytest.raises(ValueError, match="candidates must be"):
        ImpressionLog(cols, candidates=np.zeros(3), candidate_request=np.zeros(3))
