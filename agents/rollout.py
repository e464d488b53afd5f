"""Online evaluation: an agent acts in ``BatchedRecEnv`` for whole user lifetimes.

Every user of a seeded list plays one episode (sessions until churn or the horizon); the
per-user outcomes (reward, clicks, likes, watch time, slates seen, sessions, whether the user
came back) come from the impression log the run records, so the log can also feed the closed
loop. Means come with 95% confidence intervals over users; experiments add the spread over
seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from simenv.batched_env import BatchedRecEnv
from simenv.collect import collect
from simenv.config import EnvConfig
from simenv.log import ImpressionLog
from simenv.shard import collect_sharded
from simenv.types import Columns, EventType

__all__ = ["RolloutResult", "rollout", "rollout_sharded", "per_user_outcomes", "mean_ci"]

OUTCOMES = ("reward", "clicks", "likes", "watch_minutes", "slates", "sessions", "returned")


def mean_ci(x: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its t confidence interval."""
    x = np.asarray(x, dtype=np.float64)
    if x.size < 2:
        return float(x.mean()) if x.size else float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return float(x.mean()), float(half)


def per_user_outcomes(log: ImpressionLog, users: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user totals of a rollout log, aligned with ``users`` (0 for users without rows)."""
    users = np.asarray(users, dtype=np.int64)
    u = log[Columns.USER]
    idx = np.searchsorted(np.sort(users), u)
    order = np.argsort(users)
    pos = order[np.minimum(idx, users.size - 1)]
    n = users.size
    fb = log[Columns.FEEDBACK]
    clicked = np.isin(fb, [int(EventType.CLICK), int(EventType.LIKE), int(EventType.DISLIKE)])

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(pos, weights=values, minlength=n)

    first_pos = log[Columns.POSITION] == 0  # one row per slate
    sessions = np.zeros(n)
    np.maximum.at(sessions, pos, log[Columns.SESSION].astype(np.float64) + 1)
    return {
        "reward": total(log[Columns.REWARD].astype(np.float64)),
        "clicks": total(clicked.astype(np.float64)),
        "likes": total((fb == EventType.LIKE).astype(np.float64)),
        "watch_minutes": total(log[Columns.WATCH].astype(np.float64)),
        "slates": total(first_pos.astype(np.float64)),
        "sessions": sessions,
        "returned": (sessions > 1).astype(np.float64),
    }


@dataclass(eq=False)
class RolloutResult:
    """Per-user outcomes of one online run, and its log.

    Attributes:
        agent: the agent's name.
        users: int64 (U,) the users that played.
        outcomes: name -> (U,) per-user values (see ``OUTCOMES``).
        log: the impressions (with the agent's candidate sets and propensities).
        seconds: wall time of the run.
    """

    agent: str
    users: np.ndarray
    outcomes: dict[str, np.ndarray]
    log: ImpressionLog
    seconds: float

    def summary(self) -> dict[str, float]:
        """Means over users, with 95% CI half-widths as ``<name>_ci``."""
        out: dict[str, float] = {}
        for k, v in self.outcomes.items():
            m, h = mean_ci(v)
            out[k], out[f"{k}_ci"] = m, h
        return out


def rollout(
    env: BatchedRecEnv,
    agent: Any,
    n_users: int,
    seed: int,
    progress: bool = False,
    users: np.ndarray | None = None,
) -> RolloutResult:
    """Run ``agent`` for ``n_users`` whole user episodes in ``env`` from ``seed``.

    The users are a seeded sample of the world's population without repetition (the same
    users for every agent evaluated with the same seed), unless ``users`` is given.
    """
    import time

    if users is None:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x0E7A1]))
        users = rng.choice(env.world.n_users, size=min(n_users, env.world.n_users), replace=False)
    t0 = time.perf_counter()
    log = collect(
        env, agent, n_users=len(users), seed=seed, users=users, progress=progress, active_only=True
    )
    secs = time.perf_counter() - t0
    return RolloutResult(
        getattr(agent, "name", type(agent).__name__),
        np.asarray(users),
        per_user_outcomes(log, users),
        log,
        secs,
    )


def rollout_sharded(
    config: EnvConfig,
    agent_factory: Any,
    users: np.ndarray,
    *,
    n_shards: int,
    seed: int,
    world: Any = None,
    world_seed: int = 0,
    num_envs: int = 1024,
    backend: str = "serial",
    workers: int | None = None,
    progress: bool = False,
) -> RolloutResult:
    """:func:`rollout` over many users in shards, serially, on local processes or on Ray.

    The users are partitioned by id into ``n_shards`` shards, each played in its own
    ``BatchedRecEnv`` by its own agent from ``agent_factory(world, seed=...)`` (see
    :mod:`simenv.shard` for the contract; wrap a trained agent with
    :func:`simenv.shard.fixed_policy`). The outcomes depend on ``n_shards`` and ``seed``, never
    on ``backend`` or ``workers``; two agents evaluated with the same users, shards and seed
    meet the same shard envs, so their comparison stays paired per user.

    Args:
        config: the env config.
        agent_factory: ``factory(world, seed=int) -> agent``.
        users: int (U,) the users, each playing one episode.
        n_shards: shards (fixes the result).
        seed: the run's seed (shard env and agent seeds derive from it).
        world: a prebuilt world (default: built from ``config.world`` and ``world_seed``).
        world_seed: seed of the world when it is built here.
        num_envs: env slots per shard.
        backend: ``"serial"``, ``"processes"`` or ``"ray"``.
        workers: parallel workers (default: all CPUs).
        progress: a progress bar of finished shards.

    Returns:
        A :class:`RolloutResult` whose outcomes are aligned with ``users``.
    """
    import time

    users = np.asarray(users, dtype=np.int64)
    t0 = time.perf_counter()
    log = collect_sharded(
        config,
        agent_factory,
        users.size,
        n_shards=n_shards,
        seed=seed,
        world=world,
        world_seed=world_seed,
        num_envs=num_envs,
        users=users,
        backend=backend,
        workers=workers,
        progress=progress,
    )
    secs = time.perf_counter() - t0
    name = str(log.meta.get("policy") or getattr(agent_factory, "__name__", "agent"))
    return RolloutResult(name, users, per_user_outcomes(log, users), log, secs)
