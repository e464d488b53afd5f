"""The agent protocol and the simple agents (random, popular, two oracles).

An agent is anything with ``act(obs) -> slates`` over a batch of observations (the
``BatchedRecEnv`` format). Stochastic agents also set ``last_propensities`` (B, k) and
agents with a candidate stage set ``last_candidates`` (B, K) after each call; ``collect`` and
the closed loop record both in the impression log.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from simenv.batched_env import BatchedRecEnv
from simenv.clock import released
from simenv.policies import UniformPolicy
from simenv.types import Obs
from simenv.world import World

__all__ = [
    "Agent",
    "RandomAgent",
    "PopularAgent",
    "GreedyUtilityOracle",
    "ExpectedRewardOracle",
    "OracleAgent",
    "released_mask",
]


@runtime_checkable
class Agent(Protocol):
    """``act(obs) -> slates (B, k) int64`` of distinct released items."""

    name: str

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Slates for a batch of observations."""
        ...


def released_mask(release_time: np.ndarray, obs: dict[str, np.ndarray]) -> np.ndarray:
    """Bool (B, N): items released at each query's time (:func:`simenv.clock.released`)."""
    return released(np.asarray(release_time)[None, :], np.asarray(obs[Obs.CONTEXT])[:, :1])


class RandomAgent:
    """Uniformly random released items (propensities logged)."""

    name = "random"

    def __init__(self, world: World, slate_size: int, seed: int = 0) -> None:
        self._policy = UniformPolicy(world, slate_size, seed=seed)
        self.last_propensities: np.ndarray | None = None
        self.last_candidates: np.ndarray | None = None

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Random distinct released items."""
        slates, prop = self._policy.act(obs)
        self.last_propensities = prop
        return slates


class PopularAgent:
    """The k most popular released items (by given counts, e.g. training clicks), same for everyone."""

    name = "popular"

    def __init__(self, counts: np.ndarray, release_time: np.ndarray, slate_size: int) -> None:
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 1 or counts.shape != np.shape(release_time):
            raise ValueError("counts and release_time must be (N,) arrays of one length")
        self.order = np.lexsort((np.arange(counts.size), -counts))  # most popular first
        self.release = np.asarray(release_time, dtype=np.float32)[self.order]
        self.k = int(slate_size)
        self.last_candidates = None

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The most popular items released at each query's time."""
        t = np.asarray(obs[Obs.CONTEXT])[:, 0]
        # released flags over the popularity order; take the first k released per row
        ok = released(self.release[None, : 4 * self.k], t[:, None])  # usually enough
        if (ok.sum(axis=1) >= self.k).all():
            idx = np.argsort(~ok, axis=1, kind="stable")[:, : self.k]
            return self.order[idx]
        ok = released(self.release[None, :], t[:, None])
        idx = np.argsort(~ok, axis=1, kind="stable")[:, : self.k]
        return self.order[idx]


class GreedyUtilityOracle:
    """Reads the truth: per user, the k released items of highest current click utility.

    Greedy in each user's current click utility (drifted preference, fatigue, group); it
    ignores likes, dislikes, watch time, position and what a slate does to later steps
    (fatigue, budget, returns). A reference point, not an upper bound: other agents (e.g.
    :class:`ExpectedRewardOracle`) can earn more reward.
    """

    name = "oracle-utility"

    def __init__(self, env: BatchedRecEnv) -> None:
        self.env = env
        self.last_candidates = None

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """The env's utility-oracle slates (the observation is not needed)."""
        return self.env.best_slates(kind="utility")


OracleAgent = GreedyUtilityOracle
"""Former name of :class:`GreedyUtilityOracle` (kept for old code)."""


class ExpectedRewardOracle:
    """Reads the truth: per user, a greedy build in the true expected reward of the reward mix.

    Position by position, the released item that maximises the slate's expected reward
    (click, like, dislike and watch time under the MNL with position bias, given the current
    state including fatigue; see :meth:`simenv.core.Simulator.best_slates`). Myopic (one step)
    and greedy, so also a reference point, not an upper bound.
    """

    name = "oracle-expected-reward"

    def __init__(self, env: BatchedRecEnv) -> None:
        self.env = env
        self.last_candidates = None

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """The env's expected-reward-oracle slates (the observation is not needed)."""
        return self.env.best_slates(kind="expected_reward")
