"""The single-stage agent and the multi-stage pipeline (candidate sources -> ranker -> slate).

The lecture's "ideal" recommender is single-stage: the ranker scores the whole catalog. At
simulator scale that is affordable, so :class:`SingleStageAgent` is the pipeline's upper
bound with the same ranker. :class:`MultiStagePipeline` is what production systems run:
one or more candidate generators with quotas, their union (deduplicated), the ranker over
the union, and a slate of k; optional exploration (epsilon-greedy or Boltzmann) with logged
Plackett-Luce propensities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from simenv.arrays import unique_rows

__all__ = [
    "Scorer",
    "Source",
    "SingleStageAgent",
    "MultiStagePipeline",
    "union_candidates",
    "explore_slates",
]


class Scorer(Protocol):
    """What the agents need from a ranker."""

    def score(self, obs: dict[str, np.ndarray], candidates: np.ndarray) -> np.ndarray:
        """Scores (B, K) of candidate ids (B, K), -inf for padding (-1)."""
        ...

    def top_k(
        self, obs: dict[str, np.ndarray], k: int, candidates: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best k ids and scores over the released catalog, or over candidates."""
        ...


@dataclass(frozen=True)
class Source:
    """A candidate source of the pipeline and how many candidates it contributes.

    Attributes:
        generator: anything with ``retrieve(obs, k, exclude_seen) -> (ids, scores)``.
        quota: candidates requested from it per query.
        name: label for reports.
    """

    generator: Any
    quota: int
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.quota, (int, np.integer)) or self.quota < 1:
            raise ValueError(f"quota must be an integer >= 1, got {self.quota!r}")
        if not hasattr(self.generator, "retrieve"):
            raise ValueError("generator must have retrieve(obs, k, exclude_seen)")


def union_candidates(lists: Sequence[np.ndarray]) -> np.ndarray:
    """Row-wise union of id lists (B, K_i), first occurrence kept in source order; -1 padding.

    Vectorised: concatenate, then :func:`simenv.arrays.unique_rows`.
    """
    cat = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists], axis=1)  # (B, sum K)
    out = unique_rows(cat)
    width = int((out >= 0).sum(axis=1).max(initial=0))
    return out[:, : max(width, 1)]


def explore_slates(
    candidates: np.ndarray,
    scores: np.ndarray,
    k: int,
    mode: str,
    rng: np.random.Generator,
    epsilon: float = 0.0,
    temperature: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A slate of k from each row's candidates, greedy or exploring, with propensities.

    Modes:
        ``"greedy"``: the k best scores (propensity 1).
        ``"epsilon"``: position by position, with probability ``epsilon`` a uniformly random
            remaining candidate, else the best remaining; propensity of the pick at position j
            = ``(1 - eps) [it is the best remaining] + eps / n_remaining``.
        ``"boltzmann"``: Plackett-Luce sampling from ``softmax(score / temperature)`` (Gumbel
            top-k); propensity at position j = ``exp(s/T) / sum over remaining exp(s/T)``.

    Args:
        candidates: int64 (B, K), -1 padding (scores -inf there).
        scores: float (B, K).
        k: slate size (each row needs at least k real candidates).
        mode: ``"greedy"``, ``"epsilon"`` or ``"boltzmann"``.
        rng: generator of the exploration draws.
        epsilon: epsilon-greedy rate.
        temperature: Boltzmann temperature.

    Returns:
        ``(slates int64 (B, k), propensities float32 (B, k))``.
    """
    cand = np.asarray(candidates, dtype=np.int64)
    s = np.where(cand >= 0, np.asarray(scores, dtype=np.float64), -np.inf)
    b, width = cand.shape
    if (np.isfinite(s).sum(axis=1) < k).any():
        raise ValueError(f"every row needs at least k={k} scored candidates")
    rows = np.arange(b)
    if mode == "greedy":
        idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return cand[rows[:, None], idx], np.ones((b, k), np.float32)
    if mode == "boltzmann":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        logits = s / temperature
        g = -np.log(-np.log(rng.random((b, width))))
        idx = np.argsort(-(logits + g), axis=1, kind="stable")[:, :k]
        chosen_logit = np.take_along_axis(logits, idx, axis=1)  # (B, k)
        m = np.max(logits, axis=1, keepdims=True)
        w = np.exp(logits - m)  # (B, K), 0 for padding
        total = w.sum(axis=1, keepdims=True)
        w_chosen = np.exp(chosen_logit - m)
        before = np.cumsum(w_chosen, axis=1) - w_chosen
        prop = w_chosen / np.maximum(total - before, 1e-300)
        return cand[rows[:, None], idx], prop.astype(np.float32)
    if mode == "epsilon":
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        avail = np.isfinite(s)
        s_work = s.copy()
        slate = np.empty((b, k), np.int64)
        prop = np.empty((b, k), np.float64)
        for j in range(k):  # loop over slate positions (k is small); vectorised over users
            n_rem = avail.sum(axis=1)
            best = np.argmax(np.where(avail, s_work, -np.inf), axis=1)
            explore = rng.random(b) < epsilon
            # a uniformly random remaining candidate: the r-th available one
            r = np.floor(rng.random(b) * n_rem).astype(np.int64)
            rand = np.argmax(np.cumsum(avail, axis=1) > r[:, None], axis=1)
            pick = np.where(explore, rand, best)
            prop[:, j] = (1.0 - epsilon) * (pick == best) + epsilon / n_rem
            slate[:, j] = cand[rows, pick]
            avail[rows, pick] = False
        return slate, prop.astype(np.float32)
    raise ValueError(f"mode must be 'greedy', 'epsilon' or 'boltzmann', got {mode!r}")


class SingleStageAgent:
    """The ranker over the whole released catalog: the lecture's single-stage system.

    Args:
        ranker: a :class:`Scorer` (``top_k`` over the catalog).
        slate_size: k.
        exploration: ``"greedy"``, ``"epsilon"`` or ``"boltzmann"`` (the latter two explore
            among the ranker's top ``explore_pool`` items).
    """

    name = "single-stage"

    def __init__(
        self,
        ranker: Scorer,
        slate_size: int,
        exploration: str = "greedy",
        epsilon: float = 0.0,
        temperature: float = 1.0,
        explore_pool: int = 100,
        seed: int = 0,
    ) -> None:
        self.ranker = ranker
        self.k = int(slate_size)
        self.exploration = exploration
        self.epsilon = epsilon
        self.temperature = temperature
        self.explore_pool = int(explore_pool)
        self.rng = np.random.default_rng(seed)
        self.last_candidates: np.ndarray | None = None
        self.last_propensities: np.ndarray | None = None

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Top-k of the ranker over every released item (or exploration over its top pool)."""
        if self.exploration == "greedy":
            ids, _ = self.ranker.top_k(obs, self.k)
            self.last_propensities = np.ones(ids.shape, np.float32)
            return ids
        ids, sc = self.ranker.top_k(obs, self.explore_pool)
        slates, prop = explore_slates(
            ids, sc, self.k, self.exploration, self.rng, self.epsilon, self.temperature
        )
        self.last_propensities = prop
        return slates


class MultiStagePipeline:
    """Candidate sources with quotas -> union (deduplicated) -> ranker -> slate of k.

    The candidate set of every request is kept in ``last_candidates`` (B, K) (padding -1),
    so ``simenv.collect`` writes it into the impression log.

    Args:
        sources: the candidate sources and their quotas.
        ranker: a :class:`Scorer`.
        slate_size: k.
        exploration: ``"greedy"``, ``"epsilon"`` or ``"boltzmann"``.
        epsilon: epsilon-greedy rate.
        temperature: Boltzmann temperature (in ranker-score units).
        exclude_seen: ask the sources not to return items of the visible history.
        seed: seed of the exploration draws.
        name: label for reports.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        ranker: Scorer,
        slate_size: int,
        exploration: str = "greedy",
        epsilon: float = 0.0,
        temperature: float = 1.0,
        exclude_seen: bool = False,
        seed: int = 0,
        name: str = "pipeline",
    ) -> None:
        if not sources:
            raise ValueError("sources must hold at least one Source")
        if exploration not in ("greedy", "epsilon", "boltzmann"):
            raise ValueError(
                f"exploration must be 'greedy', 'epsilon' or 'boltzmann', got {exploration!r}"
            )
        self.sources = list(sources)
        self.ranker = ranker
        self.k = int(slate_size)
        self.exploration = exploration
        self.epsilon = float(epsilon)
        self.temperature = float(temperature)
        self.exclude_seen = exclude_seen
        self.rng = np.random.default_rng(seed)
        self.name = name
        self.last_candidates: np.ndarray | None = None
        self.last_propensities: np.ndarray | None = None
        self.last_scores: np.ndarray | None = None

    def candidates(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The deduplicated union of the sources' candidates (B, K), -1 padding."""
        lists = [
            src.generator.retrieve(obs, src.quota, exclude_seen=self.exclude_seen)[0]
            for src in self.sources
        ]
        return union_candidates(lists)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Retrieve, rank, pick the slate."""
        cand = self.candidates(obs)
        scores = self.ranker.score(obs, cand)  # (B, K), -inf on padding
        n_real = (cand >= 0).sum(axis=1)
        if (n_real < self.k).any():
            cand, scores = self._top_up(obs, cand, scores)
        slates, prop = explore_slates(
            cand, scores, self.k, self.exploration, self.rng, self.epsilon, self.temperature
        )
        self.last_candidates, self.last_scores, self.last_propensities = cand, scores, prop
        return slates

    def _top_up(
        self, obs: dict[str, np.ndarray], cand: np.ndarray, scores: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows with fewer than k candidates get the ranker's own best items appended."""
        extra, extra_s = self.ranker.top_k(obs, 2 * self.k)
        merged = union_candidates([cand, extra])
        return merged, self.ranker.score(obs, merged)
