"""Shared pieces of the agents tests: fake rankers and generators with known scores, and
observations from a small world.

The fakes follow the protocols the agents use (``Scorer``: ``score``, ``score_all``,
``top_k``; generators: ``retrieve``) and apply the release rule (never an item released after
the query time), so that every expected answer can be computed by brute force.
"""

from __future__ import annotations

import numpy as np

from agents.base import RandomAgent
from simenv import BatchedRecEnv, EnvConfig, World
from simenv.types import Obs, obs_users


def small_world(seed: int = 0) -> tuple[EnvConfig, World]:
    """The small test world (500 items, 300 users, slate 5, L = 16)."""
    cfg = EnvConfig.small()
    return cfg, World(cfg.world, seed=seed, user_model=cfg.user_model)


def env_obs(
    world: World, cfg: EnvConfig, n: int, seed: int, steps: int = 6
) -> dict[str, np.ndarray]:
    """Observations of ``n`` distinct users after ``steps`` random slates (histories, varied times)."""
    env = BatchedRecEnv(n, cfg, world=world)
    users = np.random.default_rng(seed).choice(world.n_users, size=n, replace=False)
    obs, _ = env.reset(seed=seed, options={"user_ids": users})
    agent = RandomAgent(world, cfg.slate_size, seed=seed)
    for _ in range(steps):
        obs, *_ = env.step(agent.act(obs))
    return obs


def released(release_time: np.ndarray, obs: dict[str, np.ndarray]) -> np.ndarray:
    """Bool (B, N): items released at each query's time."""
    return np.asarray(release_time)[None, :] <= np.asarray(obs[Obs.CONTEXT])[:, :1]


def top_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k columns of each row, best first (stable), -1 where the score is -inf."""
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    sc = np.take_along_axis(scores, idx, axis=1)
    return np.where(np.isfinite(sc), idx, -1), sc


class MatrixRanker:
    """A ranker whose score of (user, item) is a fixed matrix entry; -inf when unreleased.

    Args:
        scores: float (U, N), one row per user id.
        release_time: (N,) item release times.
    """

    name = "matrix-ranker"

    def __init__(self, scores: np.ndarray, release_time: np.ndarray) -> None:
        self.s = np.asarray(scores, dtype=np.float32)
        self.release_time = np.asarray(release_time, dtype=np.float64)
        self.n_items = self.s.shape[1]

    def score_all(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """(B, N) scores, -inf for items not released at the query time."""
        s = self.s[obs_users(obs)]
        return np.where(released(self.release_time, obs), s, -np.inf).astype(np.float32)

    def score(self, obs: dict[str, np.ndarray], candidates: np.ndarray) -> np.ndarray:
        """(B, K) scores of candidate ids, -inf for padding (-1) and unreleased items."""
        c = np.asarray(candidates, dtype=np.int64)
        s = np.take_along_axis(self.score_all(obs), np.maximum(c, 0), axis=1)
        return np.where(c >= 0, s, -np.inf).astype(np.float32)

    def top_k(
        self, obs: dict[str, np.ndarray], k: int, candidates: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best k over the released catalog (or over the candidates), -1 padding."""
        if candidates is None:
            return top_rows(self.score_all(obs), k)
        c = np.asarray(candidates, dtype=np.int64)
        idx, sc = top_rows(self.score(obs, c), k)
        return np.where(idx >= 0, np.take_along_axis(c, np.maximum(idx, 0), axis=1), -1), sc


class MatrixGenerator:
    """A candidate generator scoring (user, item) by a fixed matrix; released items only.

    ``retrieve(obs, k, exclude_seen)`` returns the top-k released items of the user's row
    (without the visible history when ``exclude_seen``), -1 padding. Every call is recorded in
    ``calls`` as ``(k, exclude_seen)``.
    """

    name = "matrix-generator"

    def __init__(self, scores: np.ndarray, release_time: np.ndarray) -> None:
        self.s = np.asarray(scores, dtype=np.float32)
        self.release_time = np.asarray(release_time, dtype=np.float64)
        self.calls: list[tuple[int, bool]] = []

    def score_all(self, obs: dict[str, np.ndarray], exclude_seen: bool = False) -> np.ndarray:
        """(B, N) scores with the release (and seen) rule applied."""
        s = np.where(released(self.release_time, obs), self.s[obs_users(obs)], -np.inf)
        if exclude_seen:
            rows, cols = np.nonzero(np.asarray(obs[Obs.MASK]) == 1)
            s[rows, np.asarray(obs[Obs.ITEMS])[rows, cols]] = -np.inf
        return s.astype(np.float32)

    def retrieve(
        self, obs: dict[str, np.ndarray], k: int, exclude_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids and scores, best first, -1 / -inf padding."""
        self.calls.append((int(k), bool(exclude_seen)))
        return top_rows(self.score_all(obs, exclude_seen), k)


def truth_scores(world: World) -> np.ndarray:
    """(U, N) true utility of every (user, item) pair with the base preferences.

    Other-group items (utility -inf in the world) get a finite score 5 below the lowest
    in-group one, so a teacher built on it ranks them last but still scores them.
    """
    users = np.arange(world.n_users)
    items = np.broadcast_to(np.arange(world.n_items), (world.n_users, world.n_items))
    u = world.utility(users, items).astype(np.float64)
    low = u[np.isfinite(u)].min() - 5.0
    return np.where(np.isfinite(u), u, low).astype(np.float32)
