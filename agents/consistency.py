"""Consistency of the candidate generator with the ranker.

RRR curves, pipeline regret, and an imperfect ranker for the lambda sweep.

- :func:`rrr_table`: recall relative to the ranker ``RRR@K,k = |G_K ∩ R_k| / k`` for several K,
  plain and rank-weighted (a DCG over the ranker's top-k), where ``R_k`` is the ranker's top-k
  over the whole released catalog.
- :func:`pipeline_regret`: ranker score and true affinity of the slate the pipeline serves,
  divided by those of the single-stage slate (the ranker over the whole catalog).
- :class:`NoisyRanker`: the ranker plus a fixed pseudo-random error per (user, item) pair: a
  consistently wrong teacher, to show that imitating an imperfect ranker blindly is not optimal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import ndtri

from agents.pipeline import MultiStagePipeline, Scorer
from retrieval.metrics import mean_over_users, rrr_at_k, weighted_rrr_at_k
from simenv.types import obs_users
from simenv.world import World

__all__ = ["NoisyRanker", "rrr_table", "pipeline_regret", "pair_noise", "score_scale"]


def pair_noise(users: np.ndarray, items: np.ndarray, seed: int) -> np.ndarray:
    """Standard-normal noise that is a fixed function of (user, item, seed) (splitmix64 hash)."""
    u = np.asarray(users, dtype=np.uint64)
    i = np.asarray(items, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = u * np.uint64(0x9E3779B97F4A7C15) ^ (
            i + np.uint64(seed) * np.uint64(0xD1B54A32D192ED03)
        )
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    unif = ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    return ndtri(unif)


class NoisyRanker:
    """A ranker whose scores carry a fixed error ``sigma * noise(user, item)``.

    The error is the same every time the pair is scored (a consistently wrong model, not
    random jitter), so teacher targets and serving see the same mistakes.

    Args:
        ranker: the underlying ranker (``score``, ``score_all``).
        sigma: noise scale in ranker-score units (see :func:`score_scale` to set it relative to
            the spread of the ranker's scores).
        seed: seed of the noise.
    """

    def __init__(self, ranker: Any, sigma: float, seed: int = 0) -> None:
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.ranker = ranker
        self.sigma = float(sigma)
        self.seed = int(seed)

    def score(self, obs: dict[str, np.ndarray], candidates: np.ndarray) -> np.ndarray:
        """Scores (B, K) with the fixed error added; -inf on padding."""
        s = np.asarray(self.ranker.score(obs, candidates), dtype=np.float32)
        users = obs_users(obs)[:, None]
        noise = pair_noise(
            np.broadcast_to(users, candidates.shape), np.maximum(candidates, 0), self.seed
        )
        return np.where(candidates >= 0, s + self.sigma * noise, -np.inf).astype(np.float32)

    def score_all(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Whole-catalog scores with the fixed error (B, N)."""
        s = np.asarray(self.ranker.score_all(obs), dtype=np.float32)
        users = obs_users(obs)[:, None]
        items = np.arange(s.shape[1])[None, :]
        return (
            s
            + self.sigma
            * pair_noise(
                np.broadcast_to(users, s.shape), np.broadcast_to(items, s.shape), self.seed
            )
        ).astype(np.float32)

    def top_k(
        self, obs: dict[str, np.ndarray], k: int, candidates: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best k of the noisy scores over the released catalog or the candidates."""
        if candidates is None:
            s = self.score_all(obs)
            ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
        else:
            s = self.score(obs, candidates)
            idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
            ids = np.take_along_axis(np.asarray(candidates, dtype=np.int64), idx, axis=1)
            s = np.take_along_axis(s, idx, axis=1)
            return np.where(np.isfinite(s), ids, -1), s
        sc = np.take_along_axis(s, ids, axis=1)
        return np.where(np.isfinite(sc), ids, -1), sc


def score_scale(ranker: Any, obs: dict[str, np.ndarray]) -> float:
    """Standard deviation of the ranker's scores over the released catalog for these queries."""
    s = np.asarray(ranker.score_all(obs), dtype=np.float64)
    return float(np.std(s[np.isfinite(s)]))


def rrr_table(
    generator: Any,
    ranker_topk: np.ndarray,
    obs: dict[str, np.ndarray],
    ks: Sequence[int] = (50, 100, 200, 500),
) -> dict[str, float]:
    """Mean RRR@K,k and rank-weighted RRR@K,k for each K (``k`` = ranker_topk's width)."""
    kmax = max(ks)
    ids, _ = generator.retrieve(obs, kmax, exclude_seen=False)
    out: dict[str, float] = {}
    for k in ks:
        out[f"rrr@{k}"] = mean_over_users(rrr_at_k(ids[:, :k], ranker_topk))
        out[f"wrrr@{k}"] = mean_over_users(weighted_rrr_at_k(ids[:, :k], ranker_topk))
    return out


def pipeline_regret(
    pipeline: MultiStagePipeline,
    ranker: Scorer,
    obs: dict[str, np.ndarray],
    world: World,
    single_stage_slates: np.ndarray | None = None,
) -> dict[str, float]:
    """Served slate vs the single-stage slate (the ranker's top-k over the whole catalog).

    Returns ``score_ratio``, the mean over users of
    ``sum ranker score (served) / sum ranker score (single)`` (scores shifted to be positive by
    the row minimum of both slates); ``affinity_ratio``, the total true affinity of the served
    slates over that of the single-stage slates, summed over all users (``World.affinity`` with
    the users' base preferences: ground truth, evaluation only; a ratio of totals because a
    user's single-stage slate can have zero affinity); and ``served_in_single_stage``, the mean
    share of the single-stage slate the pipeline serves (``|served ∩ single| / k``).
    """
    k = pipeline.k
    served = pipeline.act(obs)
    if single_stage_slates is None:
        single_stage_slates, _ = ranker.top_k(obs, k)
    s_served = ranker.score(obs, served)
    s_single = ranker.score(obs, single_stage_slates)
    low = np.minimum(s_served.min(axis=1), s_single.min(axis=1))[:, None]
    score_ratio = (s_served - low).sum(axis=1) / np.maximum((s_single - low).sum(axis=1), 1e-12)
    users = obs_users(obs)
    a_served = world.affinity(users, served).sum(axis=1)
    a_single = world.affinity(users, single_stage_slates).sum(axis=1)
    overlap = (served[:, :, None] == single_stage_slates[:, None, :]).any(axis=2).sum(axis=1) / k
    return {
        "score_ratio": float(np.mean(score_ratio)),
        "affinity_ratio": float(np.sum(a_served) / max(np.sum(a_single), 1e-12)),
        "served_in_single_stage": float(np.mean(overlap)),
    }
