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
from simenv.types import Obs

__all__ = [
    "Scorer",
    "Source",
    "SingleStageAgent",
    "MultiStagePipeline",
    "union_candidates",
    "explore_slates",
    "ExplorationSource",
    "reward_head_weights",
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


def reward_head_weights(heads: tuple[str, ...], reward: Any) -> tuple[float, ...]:
    """Score weights that make a multi-head ranker's score the expected reward of the env's mix.

    ``reward`` is a :class:`simenv.config.RewardConfig` (click, like, dislike, watch weights):
    with heads (click, like, dislike[, watch]) the ranker's score ``p_click (w_click + w_like
    p_like + w_dislike p_dislike + w_watch minutes)`` is then the expected step reward of
    showing the item. With the click head alone the weight is 1 (the score is the click logit).
    """
    if tuple(heads) == ("click",):
        return (1.0,)
    table = {
        "click": reward.click,
        "like": reward.like,
        "dislike": reward.dislike,
        "watch": reward.watch,
    }
    unknown = [h for h in heads if h not in table]
    if unknown:
        raise ValueError(f"heads must be among {tuple(table)}, got {unknown}")
    return tuple(float(table[h]) for h in heads)


class ExplorationSource:
    """A candidate source outside what the models know: uniform released items or the newest.

    The lecture's closed loop learns only from what it showed; a generator trained on that log
    retrieves the same concentrated set round after round, and exploring among its candidates
    only reshuffles them. This source adds candidates from the whole released catalog.

    Args:
        release_time: (N,) item release times.
        kind: ``"uniform"`` (uniformly random released items, a fresh draw per request) or
            ``"new"`` (a uniform draw among the ``new_pool`` most recently released items).
        new_pool: how many of the newest released items ``"new"`` draws from.
        seed: seed of the draws.
        name: label for reports.
    """

    def __init__(
        self,
        release_time: np.ndarray,
        kind: str = "uniform",
        new_pool: int = 500,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        if kind not in ("uniform", "new"):
            raise ValueError(f"kind must be 'uniform' or 'new', got {kind!r}")
        if (
            isinstance(new_pool, bool)
            or not isinstance(new_pool, (int, np.integer))
            or new_pool < 1
        ):
            raise ValueError(f"new_pool must be an integer >= 1, got {new_pool!r}")
        rt = np.asarray(release_time, dtype=np.float32)
        if rt.ndim != 1 or rt.size == 0:
            raise ValueError(f"release_time must be a non-empty (N,) array, got shape {rt.shape}")
        self.order = np.argsort(rt, kind="stable")  # items by release time
        self.sorted_release = rt[self.order]
        self.kind = kind
        self.new_pool = int(new_pool)
        self.rng = np.random.default_rng(seed)
        self.name = name or f"exploration ({kind})"

    def retrieve(
        self, obs: dict[str, np.ndarray], k: int, exclude_seen: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """``k`` distinct released items per row (``-1`` padding if fewer are released), score 0.

        ``exclude_seen`` is accepted for the source protocol; exploration ignores the history.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        t = np.asarray(obs[Obs.CONTEXT])[:, 0]
        # the items released by t are a prefix of the release order (simenv.clock's rule)
        n_rel = np.searchsorted(self.sorted_release, np.asarray(t, np.float32), side="right")
        lo = np.maximum(n_rel - self.new_pool, 0) if self.kind == "new" else np.zeros_like(n_rel)
        width = n_rel - lo  # (B,) how many items a row draws from
        m = max(4 * int(k), 64)  # draws with replacement; repeats are dropped below
        pos = lo[:, None] + np.floor(self.rng.random((t.shape[0], m)) * width[:, None]).astype(
            np.int64
        )  # (B, m) positions in the release order, in [lo, n_rel)
        ids = np.where(width[:, None] > 0, self.order[np.minimum(pos, self.order.size - 1)], -1)
        ids = unique_rows(ids)[:, : int(k)]  # distinct, first draws first, -1 padding
        if ids.shape[1] < k:
            ids = np.pad(ids, ((0, 0), (0, int(k) - ids.shape[1])), constant_values=-1)
        return ids.astype(np.int64), np.zeros(ids.shape, np.float32)


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

    Source attribution: after each call ``last_source_hits`` (S, B, k) says which sources
    retrieved each served item; every call also counts, for each source, how many of the served
    items it retrieved (an item several sources retrieved counts for each of them) and how many it
    alone retrieved; :meth:`source_shares` turns the counts into shares of the served items
    and :meth:`reset_source_counts` starts over (the lecture: a source the ranker does not
    agree with contributes little to what is served).

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
        names = [src.name or f"source {i}" for i, src in enumerate(self.sources)]
        if len(set(names)) != len(names):
            raise ValueError(f"sources must have distinct names, got {names}")
        self.source_names = names
        self.last_source_hits: np.ndarray | None = None  # (S, B, k) bool after each call
        self.reset_source_counts()

    def reset_source_counts(self) -> None:
        """Zero the served-item counts behind :meth:`source_shares`."""
        self._served = 0
        self._hits = np.zeros(len(self.sources), np.int64)  # served items the source retrieved
        self._alone = np.zeros(len(self.sources), np.int64)  # ... that no other source did
        self._offered = np.zeros(len(self.sources), np.int64)  # real candidates it returned

    def source_shares(self) -> dict[str, dict[str, float]]:
        """Each source's part in what was served since the last reset.

        Returns:
            name -> ``served`` (share of the served items it retrieved), ``exclusive`` (share
            of the served items only it retrieved), ``candidates`` (real candidates it
            returned per request).
        """
        n = max(self._served, 1)
        req = max(self._served // max(self.k, 1), 1)
        return {
            name: {
                "served": float(self._hits[i] / n),
                "exclusive": float(self._alone[i] / n),
                "candidates": float(self._offered[i] / req),
            }
            for i, name in enumerate(self.source_names)
        }

    def _retrieve_lists(self, obs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [
            np.asarray(
                src.generator.retrieve(obs, src.quota, exclude_seen=self.exclude_seen)[0],
                dtype=np.int64,
            )
            for src in self.sources
        ]

    def candidates(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The deduplicated union of the sources' candidates (B, K), -1 padding."""
        return union_candidates(self._retrieve_lists(obs))

    def _count_sources(self, lists: list[np.ndarray], slates: np.ndarray) -> None:
        hit = np.stack(
            [(slates[:, :, None] == ids[:, None, :]).any(axis=2) for ids in lists]
        )  # (S, B, k): served item j of row b is in source s's list
        self.last_source_hits = hit
        self._served += int(slates.size)
        self._hits += hit.sum(axis=(1, 2))
        self._alone += (hit & (hit.sum(axis=0, keepdims=True) == 1)).sum(axis=(1, 2))
        self._offered += np.array([int((ids >= 0).sum()) for ids in lists], np.int64)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Retrieve, rank, pick the slate."""
        lists = self._retrieve_lists(obs)
        cand = union_candidates(lists)
        scores = self.ranker.score(obs, cand)  # (B, K), -inf on padding
        n_real = (cand >= 0).sum(axis=1)
        if (n_real < self.k).any():
            cand, scores = self._top_up(obs, cand, scores)
        slates, prop = explore_slates(
            cand, scores, self.k, self.exploration, self.rng, self.epsilon, self.temperature
        )
        self.last_candidates, self.last_scores, self.last_propensities = cand, scores, prop
        self._count_sources(lists, slates)
        return slates

    def _top_up(
        self, obs: dict[str, np.ndarray], cand: np.ndarray, scores: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows with fewer than k candidates get the ranker's own best items appended."""
        extra, extra_s = self.ranker.top_k(obs, 2 * self.k)
        merged = union_candidates([cand, extra])
        return merged, self.ranker.score(obs, merged)
