"""Sharded collection (simenv.shard): the merged log does not depend on workers or backend."""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest

from simenv import BatchedRecEnv, Columns, EnvConfig, ImpressionLog, PopularityPolicy, collect
from simenv.rec_env import make_world
from simenv.shard import (
    collect_sharded,
    fixed_policy,
    map_shards,
    merge_shard_logs,
    plan_shards,
    shard_seeds,
)

CFG = EnvConfig.small()
FACTORY = functools.partial(PopularityPolicy, slate_size=CFG.slate_size, epsilon=0.1)
RUN = dict(n_users=90, n_shards=5, seed=3, num_envs=8, progress=False)


@pytest.fixture(scope="module")
def serial_log() -> ImpressionLog:
    return collect_sharded(CFG, FACTORY, backend="serial", **RUN)


def test_merged_log_identical_for_1_2_3_process_workers(serial_log):
    # bitwise equality is guaranteed: every shard runs the same single-threaded numpy code on
    # the same inputs and seeds whichever worker takes it, and the merge order is fixed
    assert len(serial_log) > 0
    for workers in (1, 2, 3):
        log = collect_sharded(CFG, FACTORY, backend="processes", workers=workers, **RUN)
        assert log.equals(serial_log), f"processes, workers={workers}"


def test_shards_partition_users_by_id_and_merge_in_shard_order(serial_log):
    users = serial_log[Columns.USER]
    shard_of_row = users % RUN["n_shards"]
    assert np.all(np.diff(shard_of_row) >= 0)  # shard 0's rows, then shard 1's, ...
    plan = plan_shards(90, 5, 3, make_world(CFG, None, 0).n_users)
    all_users = np.concatenate([s.users for s in plan])
    assert np.unique(all_users).size == 90  # a permutation: nobody twice
    for s in plan:
        assert np.all(s.users % 5 == s.index)
    assert set(np.unique(users)) == set(all_users.tolist())
    req = serial_log[Columns.REQUEST]
    assert req[0] == 0 and np.all(np.diff(req) >= 0)
    assert np.array_equal(np.unique(req), np.arange(serial_log.n_requests))
    assert serial_log.meta["n_shards"] == 5 and len(serial_log.meta["env_steps"]) == 5
    assert serial_log.meta["episodes_finished"] == 90


def test_one_shard_is_plain_collect_with_the_derived_seeds():
    world = make_world(CFG, None, 0)
    log = collect_sharded(CFG, FACTORY, 40, n_shards=1, seed=7, num_envs=8, progress=False)
    (shard,) = plan_shards(40, 1, 7, world.n_users)
    env_seed, policy_seed = shard_seeds(7, 0)
    ref = collect(
        BatchedRecEnv(8, CFG, world=world),
        FACTORY(world, seed=policy_seed),
        40,
        seed=env_seed,
        users=shard.users,
        progress=False,
    )
    for c, a in ref.columns.items():
        assert np.array_equal(log[c], a, equal_nan=True), c


def test_the_seed_and_the_shard_count_change_the_log(serial_log):
    other_seed = collect_sharded(CFG, FACTORY, **{**RUN, "seed": 4})
    other_shards = collect_sharded(CFG, FACTORY, **{**RUN, "n_shards": 4})
    assert not other_seed.equals(serial_log)
    assert not other_shards.equals(serial_log)
    s0, p0 = shard_seeds(3, 0)
    s1, p1 = shard_seeds(3, 1)
    assert len({s0, p0, s1, p1}) == 4


def test_merge_renumbers_requests_and_candidates():
    def part(n_req: int, user: int) -> ImpressionLog:
        n = 2 * n_req
        cols = {c: np.zeros(n) for c in ImpressionLog.empty().columns}
        cols[Columns.USER] = np.full(n, user)
        cols[Columns.PROPENSITY] = np.full(n, np.nan)  # not recorded (0 is no probability)
        cols[Columns.REQUEST] = np.repeat(np.arange(n_req), 2)
        cand = np.arange(n_req * 3).reshape(n_req, 3)
        return ImpressionLog(cols, cand, np.arange(n_req), {})

    merged = merge_shard_logs([part(2, 0), ImpressionLog.empty(), part(3, 1)], {"x": 1})
    assert merged[Columns.REQUEST].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert merged.candidate_request.tolist() == [0, 1, 2, 3, 4]
    assert merged.candidates.shape == (5, 3) and merged.meta == {"x": 1}


def test_more_shards_than_users_leaves_empty_shards():
    log = collect_sharded(CFG, FACTORY, 3, n_shards=7, seed=0, num_envs=4, progress=False)
    assert np.unique(log[Columns.USER]).size == 3 and log.meta["episodes_finished"] == 3


def test_fixed_policy_copies_the_agent_per_shard():
    world = make_world(CFG, None, 0)
    agent = FACTORY(world, seed=0)
    factory = fixed_policy(agent)
    a, b = factory(world, seed=1), factory(world, seed=2)
    assert a is not agent and a is not b
    assert np.array_equal(a.rng.random(3), b.rng.random(3))  # same state, separate objects
    with pytest.raises(ValueError, match="act"):
        fixed_policy(object())


def _square(x: int, shared: int) -> int:
    return x * x + shared


def test_map_shards_keeps_item_order():
    assert map_shards(_square, range(7), 1, "processes", workers=3) == [x * x + 1 for x in range(7)]


def test_ray_missing_falls_back_to_processes_with_a_message(monkeypatch, serial_log):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.warns(RuntimeWarning, match="Ray is not installed.*processes"):
        log = collect_sharded(CFG, FACTORY, backend="ray", workers=2, **RUN)
    assert log.equals(serial_log)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"n_shards": 0}, "n_shards must be an integer in \\[1, 1e\\+06\\]"),
        ({"workers": 0}, "workers must be an integer in \\[1, 100000\\]"),
        ({"backend": "dask"}, "backend must be one of \\('serial', 'processes', 'ray'\\)"),
        ({"n_users": 0}, "n_users must be an integer"),
        ({"num_envs": 0}, "num_envs must be an integer"),
        ({"users": np.array([0, 1, 10**6])}, "users must be in \\[0, 299\\]"),
        ({"users": np.array([0, 1])}, "users must be an int array of shape \\(3,\\)"),
        ({"seed": -1}, "seed must be an integer"),
    ],
)
def test_bad_arguments_are_named(change, match):
    kw = dict(n_users=3, n_shards=2, seed=0, num_envs=4, progress=False)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        collect_sharded(CFG, FACTORY, **kw)


def test_unpicklable_factory_for_processes_is_a_clear_error():
    with pytest.raises(ValueError, match="policy_factory must be picklable"):
        collect_sharded(
            CFG,
            lambda world, seed: FACTORY(world, seed=seed),
            3,
            n_shards=2,
            backend="processes",
            progress=False,
        )
    with pytest.raises(ValueError, match="policy_factory must be callable"):
        collect_sharded(CFG, "popularity", 3, n_shards=2, progress=False)
    with pytest.raises(ValueError, match="config must be an EnvConfig"):
        collect_sharded(CFG.world, FACTORY, 3, n_shards=2, progress=False)
