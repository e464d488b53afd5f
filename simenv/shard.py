"""Sharded collection and rollouts: many ``BatchedRecEnv`` shards, on Ray, processes or serially.

The users of a collection are partitioned into a fixed number of **shards** by id
(``user_id % n_shards``, the users' order kept inside each shard). Each shard is run by its own
:class:`BatchedRecEnv` (same world, same env config) and its own policy, built from a factory,
with seeds derived from ``(seed, shard)`` only. Workers take shards; the shard logs are merged in
shard order, request ids renumbered consecutively. Nothing a shard computes depends on which
worker ran it or how many workers there are, so **the merged log is identical for any number of
workers and for every backend**; only ``n_shards`` (a parameter of the result) changes it.

Backends:

- ``"serial"``: the shards one after another in this process;
- ``"processes"``: a ``concurrent.futures.ProcessPoolExecutor`` on this machine (``fork`` where
  the platform has it, so the workers share the parent's world copy-on-write; ``spawn``
  elsewhere, the world pickled once per worker);
- ``"ray"``: Ray tasks (``pip install -e .[ray]``). The world is put in the object store once
  and read zero-copy by every task. An already running Ray (``ray.init(...)`` or
  ``ray.init(address=...)`` for a cluster) is used as it is; otherwise a local one is started
  with ``num_cpus=workers`` and shut down afterwards. Without Ray installed, ``"ray"`` falls
  back to ``"processes"`` with a ``RuntimeWarning`` saying so.

**The policy contract.** ``policy_factory(world, seed=int)`` returns a fresh policy (anything
:func:`simenv.collect` accepts: ``act(obs) -> slates`` or ``(slates, propensities)``). It is
called once per shard, inside the worker, with the shard's derived policy seed; a policy must
draw its randomness only from that seed (no global RNG) and must not carry state between
shards. For ``"processes"`` the factory must be picklable by :mod:`pickle` (a module-level
function, a class such as ``PopularityPolicy``, or ``functools.partial`` of one:
``functools.partial(PopularityPolicy, slate_size=10, epsilon=0.05)``); Ray uses cloudpickle and
also takes lambdas and closures. A trained agent without a seed (a model-based pipeline) is
wrapped with :func:`fixed_policy`, which gives every shard its own copy.

With ``out=PATH`` each shard writes its log from its worker to a part on disk and the parts are
merged into one :mod:`simenv.logstore` store (memory-mapped columns), chunk by chunk: a log of
100M impressions is never whole in memory, neither in a worker nor in the parent.

A sharded **rollout** (online evaluation of an agent over a list of users) is
``agents.rollout.rollout_sharded``: ``collect_sharded(..., users=users)`` followed by the
per-user outcomes of the merged log.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from simenv.batched_env import BatchedRecEnv
from simenv.collect import collect
from simenv.config import EnvConfig, check_range
from simenv.log import ImpressionLog
from simenv.logstore import concat_log_stores, open_log_store, write_log_store
from simenv.rec_env import make_world
from simenv.types import Columns
from simenv.world import World

__all__ = [
    "BACKENDS",
    "Shard",
    "ShardRun",
    "plan_shards",
    "shard_seeds",
    "map_shards",
    "collect_sharded",
    "merge_shard_logs",
    "fixed_policy",
    "resolve_backend",
]

BACKENDS = ("serial", "processes", "ray")
_MAX_SHARDS = 1_000_000
_KEY_USERS = 0x5A4D0  # spawn-key tags: the user list, and each shard's env and policy seeds
_KEY_SHARD = 0x5A4D1
_SEED_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class Shard:
    """One shard of a sharded collection.

    Attributes:
        index: the shard's number in ``[0, n_shards)``; the merge order.
        n_shards: how many shards the users were partitioned into.
        users: int64 (U_s,) the shard's user ids, in the order they start episodes.
        env_seed: the shard env's reset seed, derived from ``(seed, index)``.
        policy_seed: the shard policy's seed, derived from ``(seed, index)``.
    """

    index: int
    n_shards: int
    users: np.ndarray
    env_seed: int
    policy_seed: int


def shard_seeds(seed: int, index: int) -> tuple[int, int]:
    """The env and policy seeds of shard ``index`` for a run seeded ``seed``.

    Both come from ``SeedSequence(seed, spawn_key=(tag, index, 0 or 1))``: independent of the
    number of shards, of workers and of the backend, and independent between shards.
    """
    check_range("seed", seed, 0, 2**63 - 1, integer=True)
    check_range("index", index, 0, _MAX_SHARDS, integer=True)
    out = []
    for stream in (0, 1):
        ss = np.random.SeedSequence(int(seed), spawn_key=(_KEY_SHARD, int(index), stream))
        out.append(int(ss.generate_state(1, dtype=np.uint64)[0]) & _SEED_MASK)
    return out[0], out[1]


def plan_shards(
    n_users: int,
    n_shards: int,
    seed: int,
    n_population: int,
    users: np.ndarray | None = None,
) -> list[Shard]:
    """Partition the users of a collection into ``n_shards`` shards by id.

    Args:
        n_users: number of user episodes in the whole collection.
        n_shards: number of shards (fixes the result; independent of the workers).
        seed: the run's seed (user order and the shards' seeds).
        n_population: users in the world (ids are in ``[0, n_population)``).
        users: the user ids to run, in order (default: a seeded permutation of the population,
            repeated if ``n_users > n_population``, so no user appears twice while
            ``n_users <= n_population``).

    Returns:
        ``n_shards`` shards; shard ``s`` holds the users with ``id % n_shards == s`` in their
        order in ``users`` (a shard may be empty).
    """
    check_range("n_users", n_users, 1, 1e10, integer=True)
    check_range("n_shards", n_shards, 1, _MAX_SHARDS, integer=True)
    check_range("seed", seed, 0, 2**63 - 1, integer=True)
    check_range("n_population", n_population, 1, 1e10, integer=True)
    n_users, n_shards = int(n_users), int(n_shards)
    if users is None:
        rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(_KEY_USERS,)))
        reps = -(-n_users // n_population)
        users = np.concatenate([rng.permutation(n_population) for _ in range(reps)])[:n_users]
    else:
        users = np.asarray(users)
        if users.shape != (n_users,) or not np.issubdtype(users.dtype, np.integer):
            raise ValueError(f"users must be an int array of shape ({n_users},), got {users.shape}")
        if users.min() < 0 or users.max() >= n_population:
            raise ValueError(
                f"users must be in [0, {n_population - 1}], got [{users.min()}, {users.max()}]"
            )
    users = users.astype(np.int64, copy=False)
    part = users % n_shards
    # stable sort by shard keeps each shard's users in their order in `users`
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(n_shards + 1))
    shards = []
    for s in range(n_shards):
        env_seed, policy_seed = shard_seeds(seed, s)
        shards.append(
            Shard(s, n_shards, users[order[bounds[s] : bounds[s + 1]]], env_seed, policy_seed)
        )
    return shards


def fixed_policy(policy: Any) -> Callable[..., Any]:
    """A policy factory that gives each shard its own deep copy of ``policy`` (seed ignored).

    For agents without a seed of their own (a trained pipeline). The copy keeps shards from
    sharing state, so the result still does not depend on the number of workers; a policy with
    its own random generator draws the same stream in every shard.
    """
    if not callable(getattr(policy, "act", None)):
        raise ValueError(f"policy must have an act(obs) method, got {type(policy).__name__}")
    return _FixedPolicy(policy)


class _FixedPolicy:
    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def __call__(self, world: World, seed: int) -> Any:
        return copy.deepcopy(self.policy)


# --------------------------------------------------------------------------- backends


def resolve_backend(backend: str) -> str:
    """The backend that will run: ``backend``, or ``"processes"`` if Ray is asked but missing.

    Raises:
        ValueError: for a name not in :data:`BACKENDS`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            warnings.warn(
                "backend='ray' but Ray is not installed (pip install -e .[ray]); "
                "running on local processes instead (same results)",
                RuntimeWarning,
                stacklevel=3,
            )
            return "processes"
    return backend


def _check_workers(workers: int | None) -> None:
    if workers is not None:
        check_range("workers", workers, 1, 100_000, integer=True)


_WORKER_STATE: dict[str, Any] = {}


def _init_worker(shared: Any) -> None:
    """Process-pool initializer: keep the shared object (the world) for every task."""
    _WORKER_STATE["shared"] = shared


def _call_with_shared(fn: Callable[[Any, Any], Any], item: Any) -> Any:
    return fn(item, _WORKER_STATE["shared"])


def map_shards(
    fn: Callable[[Any, Any], Any],
    items: Sequence[Any],
    shared: Any = None,
    backend: str = "serial",
    workers: int | None = None,
    progress: bool = False,
    desc: str = "shards",
    on_result: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """``[fn(item, shared) for item in items]`` on a backend; results in the order of ``items``.

    ``shared`` (e.g. the world) is sent to each worker once (inherited under ``fork``, put in
    Ray's object store once), not with every item.

    Args:
        fn: a module-level function ``fn(item, shared)`` (picklable by reference).
        items: the work items (picklable).
        shared: an object every call reads (not modified).
        backend: ``"serial"``, ``"processes"`` or ``"ray"`` (see the module docstring).
        workers: parallel workers (default: the CPUs of the machine, or of the Ray cluster);
            ignored by ``"serial"``.
        progress: show a tqdm bar of finished items.
        desc: the bar's label.
        on_result: called in this process as ``on_result(i, results[i])`` as each item
            finishes (in completion order).

    Returns:
        The results, ``results[i] = fn(items[i], shared)``.
    """
    backend = resolve_backend(backend)
    _check_workers(workers)
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="shard")

    def done(i: int, result: Any) -> None:
        bar.update(1)
        if on_result is not None:
            on_result(i, result)

    try:
        if backend == "serial" or not items:
            out = []
            for i, it in enumerate(items):
                out.append(fn(it, shared))
                done(i, out[-1])
            return out
        if backend == "processes":
            return _map_processes(fn, items, shared, workers, done)
        return _map_ray(fn, items, shared, workers, done)
    finally:
        bar.close()


def _map_processes(
    fn: Callable[[Any, Any], Any],
    items: list[Any],
    shared: Any,
    workers: int | None,
    done: Callable[[int, Any], None],
) -> list[Any]:
    n = min(workers or os.cpu_count() or 1, len(items))
    methods = multiprocessing.get_all_start_methods()
    # fork: the workers inherit `shared` copy-on-write (no pickling, no second copy)
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    out: list[Any] = [None] * len(items)
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork in a process with threads; the workers run numpy only
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        with ProcessPoolExecutor(
            max_workers=n, mp_context=ctx, initializer=_init_worker, initargs=(shared,)
        ) as pool:
            futures = {pool.submit(_call_with_shared, fn, it): i for i, it in enumerate(items)}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    i = futures[f]
                    out[i] = f.result()
                    done(i, out[i])
    return out


def _map_ray(
    fn: Callable[[Any, Any], Any],
    items: list[Any],
    shared: Any,
    workers: int | None,
    done: Callable[[int, Any], None],
) -> list[Any]:
    import ray

    started = False
    if not ray.is_initialized():
        # a local Ray for this call; workers import this project through PYTHONPATH
        path = os.pathsep.join(p for p in sys.path if p)
        ray.init(
            num_cpus=workers or os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,  # no start-up banner between our progress lines
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
        started = True
    try:
        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1)(fn)
        shared_ref = ray.put(shared)
        out: list[Any] = [None] * len(items)
        refs: dict[Any, int] = {}
        nxt = 0
        while nxt < len(items) or refs:
            while nxt < len(items) and len(refs) < n:  # at most `workers` tasks in flight
                refs[remote.remote(items[nxt], shared_ref)] = nxt
                nxt += 1
            finished, _ = ray.wait(list(refs), num_returns=1)
            for r in finished:
                i = refs.pop(r)
                out[i] = ray.get(r)
                done(i, out[i])
        return out
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- collection


@dataclass(frozen=True)
class _CollectTask:
    shard: Shard
    config: EnvConfig
    policy_factory: Callable[..., Any]
    num_envs: int
    max_steps: int | None
    part: str | None  # write the shard's log to this log store instead of returning it


@dataclass(frozen=True)
class _ShardResult:
    log: ImpressionLog | None  # None when written to the task's part
    meta: dict[str, Any]
    rows: int
    seconds: float


def _collect_shard(task: _CollectTask, world: World) -> _ShardResult:
    """Run one shard: its own env and policy, seeds from the shard (runs inside a worker)."""
    t0 = time.perf_counter()
    shard = task.shard
    if shard.users.size == 0:
        log = ImpressionLog.empty()
    else:
        env = BatchedRecEnv(min(task.num_envs, shard.users.size), task.config, world=world)
        policy = task.policy_factory(world, seed=shard.policy_seed)
        log = collect(
            env,
            policy,
            n_users=int(shard.users.size),
            seed=shard.env_seed,
            users=shard.users,
            max_steps=task.max_steps,
            progress=False,
        )
    if task.part is not None:
        write_log_store(log, task.part, overwrite=True)
        return _ShardResult(None, log.meta, len(log), time.perf_counter() - t0)
    return _ShardResult(log, log.meta, len(log), time.perf_counter() - t0)


@dataclass(frozen=True)
class ShardRun:
    """How a sharded collection ran (not part of the log: it does not change the result).

    Attributes:
        backend: the backend that ran (after any fallback).
        workers: the workers asked for (``None``: the default).
        n_shards: shards.
        seconds: wall time of the shards (without the merge).
        merge_seconds: wall time of the merge.
        shard_seconds: (n_shards,) wall time of each shard inside its worker.
        shard_rows: (n_shards,) rows of each shard.
    """

    backend: str
    workers: int | None
    n_shards: int
    seconds: float
    merge_seconds: float
    shard_seconds: tuple[float, ...]
    shard_rows: tuple[int, ...]


def collect_sharded(
    config: EnvConfig,
    policy_factory: Callable[..., Any],
    n_users: int,
    *,
    n_shards: int,
    seed: int = 0,
    world: World | None = None,
    world_seed: int = 0,
    num_envs: int = 1024,
    users: np.ndarray | None = None,
    max_steps: int | None = None,
    backend: str = "serial",
    workers: int | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    out: str | os.PathLike[str] | None = None,
    run_info: list[ShardRun] | None = None,
) -> ImpressionLog:
    """Collect ``n_users`` user episodes in ``n_shards`` shards and merge the logs in shard order.

    Shard ``s`` runs the users with ``id % n_shards == s`` in a ``BatchedRecEnv`` of
    ``min(num_envs, its users)`` slots reset with its derived env seed, acting with
    ``policy_factory(world, seed=its policy seed)`` (see the module docstring for the contract).
    The result depends on ``(config, world, policy_factory, n_users, users, n_shards, seed,
    num_envs, max_steps)`` only: the same for any ``backend`` and number of ``workers``.

    Args:
        config: the env config (the world is built from ``config.world`` unless given).
        policy_factory: ``factory(world, seed=int) -> policy``.
        n_users: user episodes to record in all.
        n_shards: number of shards (each its own env and policy stream).
        seed: the run's seed (user order, shard seeds).
        world: a prebuilt world (default: ``World(config.world, world_seed)``, built once here).
        world_seed: seed of the world when it is built here.
        num_envs: env slots per shard (users stepped at once).
        users: the user ids to run, in order (see :func:`plan_shards`).
        max_steps: cap on env steps per shard (cuts episodes).
        backend: ``"serial"``, ``"processes"`` or ``"ray"``.
        workers: parallel workers (default: all CPUs); does not change the result.
        progress: a progress bar of finished shards.
        meta: extra entries for the merged log's ``meta``.
        out: write the merged log to this log store (:mod:`simenv.logstore`; replaced if it
            exists) and return it memory-mapped: each shard writes its own part from its worker
            and the parts are merged on disk chunk by chunk, so the log is never whole in
            memory. The folder must be reachable from every worker (always, on one machine).
        run_info: if given, a :class:`ShardRun` describing the run is appended to it.

    Returns:
        The merged :class:`ImpressionLog`: shard 0's rows, then shard 1's, ...; request ids
        renumbered ``0..R-1`` in that order; ``meta`` records the seed, shards, policy, world.
    """
    if not isinstance(config, EnvConfig):
        raise ValueError(f"config must be an EnvConfig, got {type(config).__name__}")
    if not callable(policy_factory):
        raise ValueError(
            "policy_factory must be callable as factory(world, seed=int) -> policy, got "
            f"{type(policy_factory).__name__}"
        )
    check_range("n_users", n_users, 1, 1e10, integer=True)
    check_range("n_shards", n_shards, 1, _MAX_SHARDS, integer=True)
    check_range("num_envs", num_envs, 1, 100_000_000, integer=True)
    if max_steps is not None:
        check_range("max_steps", max_steps, 1, 1e12, integer=True)
    _check_workers(workers)
    ran = resolve_backend(backend)
    if ran == "processes":
        try:
            pickle.dumps(policy_factory)
        except Exception as e:  # pickle raises several types (PicklingError, AttributeError)
            raise ValueError(
                "policy_factory must be picklable for backend='processes' (a module-level "
                "function, a class, or functools.partial of one; lambdas and closures only "
                f"work serially or on Ray): {type(e).__name__}: {e}"
            ) from e
    world = make_world(config, world, world_seed)
    shards = plan_shards(n_users, n_shards, seed, world.n_users, users)
    parts_dir = None
    if out is not None:
        out = Path(out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        parts_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.parts.", dir=out.parent))
    try:
        tasks = [
            _CollectTask(
                s,
                config,
                policy_factory,
                int(num_envs),
                max_steps,
                None if parts_dir is None else str(parts_dir / f"shard-{s.index:06d}"),
            )
            for s in shards
        ]
        t0 = time.perf_counter()
        results = map_shards(
            _collect_shard, tasks, world, ran, workers, progress, desc=f"collect {n_shards} shards"
        )
        seconds = time.perf_counter() - t0
        policy_name = next((r.meta.get("policy") for r in results if r.meta), None)
        info = {
            "seed": int(seed),
            "policy": policy_name,
            "n_users": int(n_users),
            "n_shards": int(n_shards),
            "num_envs": int(num_envs),
            "episodes_finished": int(sum(r.meta.get("episodes_finished", 0) for r in results)),
            "env_steps": [int(r.meta.get("env_steps", 0)) for r in results],
            "world": world.config.to_dict(),
            "world_seed": int(world.seed),
            "slate_size": int(config.slate_size),
        }
        info.update(meta or {})
        t1 = time.perf_counter()
        if out is None:
            merged = merge_shard_logs([r.log for r in results], info)
        else:
            concat_log_stores([t.part for t in tasks], out, info, overwrite=True)
            merged = open_log_store(out)
        merge_seconds = time.perf_counter() - t1
    finally:
        if parts_dir is not None:
            shutil.rmtree(parts_dir, ignore_errors=True)
    if run_info is not None:
        run_info.append(
            ShardRun(
                ran,
                workers,
                int(n_shards),
                seconds,
                merge_seconds,
                tuple(r.seconds for r in results),
                tuple(r.rows for r in results),
            )
        )
    return merged


def merge_shard_logs(logs: Sequence[ImpressionLog], meta: dict[str, Any]) -> ImpressionLog:
    """Concatenate shard logs in the given order, renumbering request ids consecutively.

    Each shard numbers its slates ``0..R_s-1``; in the merged log shard ``s``'s requests are
    offset by the slates of the shards before it (candidate sets follow their requests).

    Args:
        logs: the shard logs, in shard order.
        meta: the merged log's meta.

    Returns:
        One log, rows in shard order.
    """
    shifted = []
    offset = 0
    for lg in logs:
        req = lg.columns[Columns.REQUEST]
        n_req = int(req.max()) + 1 if req.size else 0
        cols = dict(lg.columns)
        cols[Columns.REQUEST] = req + offset
        creq = None if lg.candidate_request is None else lg.candidate_request + offset
        shifted.append(ImpressionLog(cols, lg.candidates, creq, {}))
        offset += n_req
    merged = ImpressionLog.concat(shifted, meta=dict(meta))
    return merged
