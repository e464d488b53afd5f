"""Everything that needs Ray, on one real local cluster (Ray >= 2.x has no local mode any more).

One module-scoped ``ray.init(num_cpus=2)`` (5-9 s to start and stop here) serves the sharded
collection (simenv.shard) and ``python -m benchmarks ... --backend ray``.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest

from simenv import EnvConfig, PopularityPolicy
from simenv.shard import collect_sharded
from tests.benchmarks.test_backend import check_same_as_serial, run_all

ray = pytest.importorskip("ray")  # the optional extra `.[ray]`; installed in the dev venv

CFG = EnvConfig.small()
FACTORY = functools.partial(PopularityPolicy, slate_size=CFG.slate_size, epsilon=0.1)
RUN = dict(n_users=90, n_shards=5, seed=3, num_envs=8, progress=False)


@pytest.fixture(scope="module")
def ray_cluster():
    # workers import this checkout (and the test modules) through PYTHONPATH
    path = os.pathsep.join(p for p in sys.path if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield
    ray.shutdown()


def test_ray_merged_log_identical_for_1_2_3_workers(ray_cluster):
    # bitwise: each shard is the same single-threaded computation on any worker (see
    # tests/simenv/test_shard.py); the merge order is the shard order
    ref = collect_sharded(CFG, FACTORY, backend="serial", **RUN)
    for workers in (1, 2, 3):
        log = collect_sharded(CFG, FACTORY, backend="ray", workers=workers, **RUN)
        assert log.equals(ref), f"ray, workers={workers}"
    # Ray pickles with cloudpickle: a lambda factory works there
    lam = collect_sharded(
        CFG, lambda world, seed: FACTORY(world, seed=seed), backend="ray", workers=2, **RUN
    )
    assert lam.equals(ref)


def test_benchmarks_backend_ray_writes_the_serial_reports(ray_cluster, tmp_path):
    assert run_all(tmp_path / "serial") == 1  # the `raises` experiment fails in both
    assert run_all(tmp_path / "ray", "--backend", "ray", "--workers", "2") == 1
    check_same_as_serial(tmp_path / "serial", tmp_path / "ray")
