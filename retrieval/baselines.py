"""Classic candidate-generation baselines behind the generator interface.

The lecture ("Генерация кандидатов") lists the classic retrieval methods and what each one
lacks; every class here implements one of them and says so in its docstring:

- :class:`TopPopular` -- most clicked items; no personalisation, bad for new items (unless
  the popularity window is short enough for them to rise).
- :class:`UserHistory` -- items close to what the user consumed last (same creator, then
  same topic); sensible only in some domains, no discovery.
- :class:`Item2Item` -- co-occurrence neighbours of the recent history; less
  personalisation and discovery, bad for new items, not contextual.
- :class:`ALS` -- user2item by implicit-feedback matrix factorisation (Hu, Koren, Volinsky
  2008); bad for new items and new users, not contextual.

All of them share :class:`CandidateGenerator`, the interface the two-tower generator uses
too: ``fit(interactions, catalog)`` then ``retrieve(obs, k)`` / ``score_all(obs)`` on a
batched observation dict (keys in :class:`simenv.types.Obs`).

Rules every generator follows (enforced once, in the base class):

- an item whose ``release_time`` is later than the query time ``obs["context"][:, 0]`` is
  never returned and scores ``-inf``;
- ``exclude_seen=True`` removes the items of the user's *visible* history (``mask == 1``,
  any event type). The observation holds only the last L events, so older consumption is
  not excluded;
- a generator proposes only items it has evidence for: an item with no evidence (never
  clicked for :class:`TopPopular`, no shared creator/topic for :class:`UserHistory`, no
  co-occurrence for :class:`Item2Item`) scores ``-inf``;
- ``retrieve`` returns ``k`` distinct ids per row ordered by score, ties broken by the
  smaller item id; when fewer than ``k`` items are eligible the row is padded with id ``-1``
  and score ``-inf`` (padding always comes last).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from simenv.clock import released
from simenv.types import EventType, ItemCatalog, Obs

__all__ = [
    "Interactions",
    "CandidateGenerator",
    "TopPopularConfig",
    "TopPopular",
    "UserHistoryConfig",
    "UserHistory",
    "Item2ItemConfig",
    "Item2Item",
    "ALSConfig",
    "ALS",
    "als_loss",
    "POSITIVE_EVENTS",
    "PAD_ID",
]

#: Event types that count as "consumed" when a history seeds candidates (a dislike is seen,
#: and excluded by ``exclude_seen``, but never used as a seed).
POSITIVE_EVENTS: tuple[int, ...] = (int(EventType.CLICK), int(EventType.LIKE))

#: Item id that pads a ``retrieve`` row with fewer than ``k`` eligible items.
PAD_ID: int = -1

# Scores of a block of queries are materialised as (rows, N); keep each block near this
# many elements so that memory stays bounded for any batch size.
_BLOCK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------


def _as_int_array(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_ids(name: str, arr: np.ndarray, upper: int) -> None:
    if arr.size == 0:
        return
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must lie in [0, {upper}), got {bad}")


@dataclass(frozen=True, eq=False)
class Interactions:
    """Positive user-item interactions (clicks, likes): what the baselines fit on.

    Rows may come in any order. Repeated (user, item) rows are allowed and add up.

    Attributes:
        user: int64 ``(M,)`` user ids in ``[0, n_users)``.
        item: int64 ``(M,)`` item ids in ``[0, n_items)``.
        time: float64 ``(M,)`` event time in days (finite).
        session: int64 ``(M,)`` session id per row, ``-1`` if unknown. Sessions are keyed
            by ``(user, session)``, so ids need only be unique within a user. ``None``
            (default) means unknown for every row.
        weight: float32 ``(M,)`` positive weight per row (e.g. a like counted more than a
            click). ``None`` (default) means 1 for every row.
        n_users: number of users (ids ``0 .. n_users - 1``), ``>= 1``.
        n_items: number of items (ids ``0 .. n_items - 1``), ``>= 1``.
    """

    user: np.ndarray
    item: np.ndarray
    time: np.ndarray
    n_users: int
    n_items: int
    session: np.ndarray | None = None
    weight: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
            object.__setattr__(self, name, int(value))
        user = _as_int_array("user", self.user)
        item = _as_int_array("item", self.item)
        m = user.shape[0]
        time = np.asarray(self.time, dtype=np.float64)
        session = (
            np.full(m, -1, dtype=np.int64)
            if self.session is None
            else _as_int_array("session", self.session)
        )
        weight = (
            np.ones(m, dtype=np.float32)
            if self.weight is None
            else np.asarray(self.weight, dtype=np.float32)
        )
        for name, arr in (("item", item), ("time", time), ("session", session), ("weight", weight)):
            if arr.shape != (m,):
                raise ValueError(
                    f"{name} must have the same length as user ({m},), got shape {arr.shape}"
                )
        _check_ids("user", user, self.n_users)
        _check_ids("item", item, self.n_items)
        if m and not np.isfinite(time).all():
            raise ValueError("time must be finite, got a NaN or infinite value")
        if m and int(session.min()) < -1:
            raise ValueError(f"session must be >= -1 (-1 = unknown), got {int(session.min())}")
        if m and not (np.isfinite(weight).all() and float(weight.min()) > 0):
            bad = weight[~(np.isfinite(weight) & (weight > 0))][0]
            raise ValueError(f"weight must be finite and > 0, got {float(bad)!r}")
        object.__setattr__(self, "user", user)
        object.__setattr__(self, "item", item)
        object.__setattr__(self, "time", time)
        object.__setattr__(self, "session", session)
        object.__setattr__(self, "weight", weight)

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def matrix(self) -> sp.csr_matrix:
        """User x item matrix of summed weights, float64 CSR ``(n_users, n_items)``."""
        r = sp.coo_matrix(
            (self.weight.astype(np.float64), (self.user, self.item)),
            shape=(self.n_users, self.n_items),
        ).tocsr()
        r.sum_duplicates()
        r.sort_indices()
        return r

    def item_counts(self) -> np.ndarray:
        """Weighted interaction count per item, float64 ``(n_items,)``."""
        return np.bincount(self.item, weights=self.weight, minlength=self.n_items).astype(
            np.float64
        )


# --------------------------------------------------------------------------------------
# Helpers shared by the generators (batched; no loop per user)
# --------------------------------------------------------------------------------------


def _topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row, best first, ties by smaller column; ``-inf`` entries become padding.

    Args:
        scores: float ``(b, N)``; ``-inf`` marks an ineligible item. No NaN.
        k: number of results per row, ``>= 1`` (may exceed N: the rest is padding).

    Returns:
        ids int64 ``(b, k)`` (``PAD_ID`` for padding) and scores float32 ``(b, k)``.
    """
    b, n = scores.shape
    kk = min(k, n)
    if kk == n:
        cols = np.broadcast_to(np.arange(n, dtype=np.int64), (b, n))  # (b, N)
    else:
        # Exactly kk columns per row: everything above the kk-th largest value, then the
        # smallest ids among the values equal to it (deterministic under ties).
        thr = np.partition(scores, n - kk, axis=1)[:, n - kk, None]  # (b, 1)
        above = scores > thr  # (b, N)
        need = kk - above.sum(axis=1, keepdims=True)  # (b, 1), >= 1
        equal = scores == thr  # (b, N)
        keep = above | (equal & (np.cumsum(equal, axis=1) <= need))  # (b, N), kk per row
        cols = np.nonzero(keep)[1].reshape(b, kk)  # ascending ids within each row
    vals = np.take_along_axis(scores, cols, axis=1)  # (b, kk)
    order = np.argsort(-vals, axis=1, kind="stable")  # stable: ties stay in id order
    ids = np.take_along_axis(cols, order, axis=1).astype(np.int64)  # (b, kk)
    vals = np.take_along_axis(vals, order, axis=1).astype(np.float32)  # (b, kk)
    ids[np.isneginf(vals)] = PAD_ID
    if kk < k:
        ids = np.concatenate([ids, np.full((b, k - kk), PAD_ID, dtype=np.int64)], axis=1)
        vals = np.concatenate([vals, np.full((b, k - kk), -np.inf, dtype=np.float32)], axis=1)
    return ids, vals


def _recent_positive(
    items: np.ndarray, events: np.ndarray, mask: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The last ``n`` positive (click/like) history items of each row.

    Returns:
        rows int64 ``(S,)``, item ids int64 ``(S,)`` and recency rank int64 ``(S,)`` of the
        S selected events (rank 0 = most recent positive of that row).
    """
    positive = (mask == 1) & np.isin(events, POSITIVE_EVENTS)  # (B, L)
    # Rank from the right: 1 for the most recent positive, 2 for the one before, ...
    from_right = np.cumsum(positive[:, ::-1], axis=1)[:, ::-1]  # (B, L)
    chosen = positive & (from_right <= n)  # (B, L)
    rows, cols = np.nonzero(chosen)
    return rows.astype(np.int64), items[rows, cols], (from_right[rows, cols] - 1).astype(np.int64)


# --------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------


class CandidateGenerator(abc.ABC):
    """Base class of every candidate generator (baselines here, two towers elsewhere).

    Subclasses implement ``_fit`` (learn from :class:`Interactions`) and ``_score`` (raw
    scores of a block of queries, ``-inf`` where the model has no evidence). This class
    validates the input, applies the release-time and seen-item rules and does the top-k.

    Attributes set by :meth:`fit`:
        n_items: catalog size N.
        release_time: float64 ``(N,)`` release time of every item.
        popularity: float64 ``(N,)`` weighted interaction count of every item in the
            fitted data (all generators use it, at least as a fallback or tie-breaker).
    """

    #: Short name used in reports.
    name: ClassVar[str] = "generator"
    #: Whether ``obs["user"]`` is read (user-id models such as ALS).
    uses_user_id: ClassVar[bool] = False

    config: Any

    def __init__(self) -> None:
        self.n_items: int = 0
        self.release_time: np.ndarray | None = None
        self.popularity: np.ndarray | None = None
        self._fitted = False

    # ---- config ----------------------------------------------------------------------

    def get_config(self) -> Any:
        """The frozen config dataclass this generator was built from."""
        return self.config

    @classmethod
    def from_config(cls, config: Any) -> CandidateGenerator:
        """Build an unfitted generator from its config dataclass."""
        return cls(**dataclasses.asdict(config))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # ---- fit -------------------------------------------------------------------------

    def fit(self, interactions: Interactions, catalog: ItemCatalog) -> CandidateGenerator:
        """Learn from positive interactions; returns ``self``.

        Args:
            interactions: positive events (clicks, likes) of the training period.
            catalog: the public item catalog; ``catalog.n_items`` must equal
                ``interactions.n_items``.

        Raises:
            ValueError: if the arguments have the wrong type or disagree on the item count.
        """
        if not isinstance(interactions, Interactions):
            raise ValueError(
                f"interactions must be an Interactions, got {type(interactions).__name__}"
            )
        if not isinstance(catalog, ItemCatalog):
            raise ValueError(f"catalog must be an ItemCatalog, got {type(catalog).__name__}")
        if catalog.n_items != interactions.n_items:
            raise ValueError(
                f"interactions.n_items ({interactions.n_items}) must equal "
                f"catalog.n_items ({catalog.n_items})"
            )
        self.n_items = catalog.n_items
        self.release_time = np.asarray(catalog.release_time, dtype=np.float64)
        self.popularity = interactions.item_counts()
        self._fit(interactions, catalog)
        self._fitted = True
        return self

    @abc.abstractmethod
    def _fit(self, interactions: Interactions, catalog: ItemCatalog) -> None:
        """Model-specific training (input already validated)."""

    # ---- scoring ---------------------------------------------------------------------

    @abc.abstractmethod
    def _score(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Raw scores of a block of validated queries, float ``(b, N)``; ``-inf`` = no evidence."""

    def score_all(self, obs: dict[str, np.ndarray], exclude_seen: bool = False) -> np.ndarray:
        """Scores of the whole catalog for every query (for AUC-type metrics).

        Args:
            obs: batched observation dict (see :class:`simenv.types.Obs`).
            exclude_seen: also give ``-inf`` to the items of the visible history.

        Returns:
            float32 ``(B, N)``; ``-inf`` for items not released at the query time, items the
            model has no evidence for, and (with ``exclude_seen``) seen items.
        """
        obs = self._check_obs(obs)
        b = obs[Obs.ITEMS].shape[0]
        out = np.empty((b, self.n_items), dtype=np.float32)
        for lo, hi in self._row_blocks(b):
            out[lo:hi] = self._eligible_scores(_slice_obs(obs, lo, hi), exclude_seen)
        return out

    def retrieve(
        self, obs: dict[str, np.ndarray], k: int, exclude_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k candidates of each query.

        Args:
            obs: batched observation dict (see :class:`simenv.types.Obs`).
            k: candidates per query, ``>= 1``.
            exclude_seen: drop the items of the visible history (``mask == 1``).

        Returns:
            ids int64 ``(B, k)`` and scores float32 ``(B, k)``, best first, distinct within
            a row, ties broken by the smaller id; rows with fewer than ``k`` eligible items
            end with ``PAD_ID`` (-1) / ``-inf``.

        Raises:
            ValueError: on a bad ``k`` or a malformed observation.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        k = int(k)
        obs = self._check_obs(obs)
        b = obs[Obs.ITEMS].shape[0]
        ids = np.empty((b, k), dtype=np.int64)
        scores = np.empty((b, k), dtype=np.float32)
        for lo, hi in self._row_blocks(b):
            block = self._eligible_scores(_slice_obs(obs, lo, hi), exclude_seen)  # (b', N)
            ids[lo:hi], scores[lo:hi] = _topk_rows(block, k)
        return ids, scores

    def _eligible_scores(self, obs: dict[str, np.ndarray], exclude_seen: bool) -> np.ndarray:
        scores = np.array(self._score(obs), dtype=np.float64)  # (b, N), own copy
        now = obs[Obs.CONTEXT][:, 0].astype(np.float64)  # (b,)
        scores[~released(self.release_time[None, :], now[:, None])] = -np.inf  # not released yet
        if exclude_seen:
            rows, cols = np.nonzero(obs[Obs.MASK] == 1)
            scores[rows, obs[Obs.ITEMS][rows, cols]] = -np.inf
        return scores

    def _row_blocks(self, b: int) -> list[tuple[int, int]]:
        step = max(1, _BLOCK_ELEMENTS // max(1, self.n_items))
        return [(lo, min(b, lo + step)) for lo in range(0, b, step)]

    def _check_obs(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__}: call fit before retrieve/score_all")
        if not isinstance(obs, dict):
            raise ValueError(f"obs must be a dict of arrays, got {type(obs).__name__}")
        keys = [Obs.ITEMS, Obs.EVENTS, Obs.MASK, Obs.CONTEXT]
        if self.uses_user_id:
            keys.append(Obs.USER)
        missing = [key for key in keys if key not in obs]
        if missing:
            raise ValueError(f"obs is missing keys {missing}; needs {keys}")
        items = np.asarray(obs[Obs.ITEMS])
        if items.ndim != 2:
            raise ValueError(f"obs['item_ids'] must be 2-D (B, L), got shape {items.shape}")
        b = items.shape[0]
        out: dict[str, np.ndarray] = {}
        for key in (Obs.ITEMS, Obs.EVENTS, Obs.MASK):
            arr = np.asarray(obs[key])
            if arr.shape != items.shape:
                raise ValueError(f"obs[{key!r}] must have shape {items.shape}, got {arr.shape}")
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"obs[{key!r}] must hold integers, got dtype {arr.dtype}")
            out[key] = arr.astype(np.int64, copy=False)
        if out[Obs.MASK].size and not np.isin(out[Obs.MASK], (0, 1)).all():
            raise ValueError("obs['mask'] must hold only 0 and 1")
        real = out[Obs.ITEMS][out[Obs.MASK] == 1]
        _check_ids("obs['item_ids'] (where mask == 1)", real, self.n_items)
        context = np.asarray(obs[Obs.CONTEXT], dtype=np.float64)
        if context.ndim != 2 or context.shape[0] != b or context.shape[1] < 1:
            raise ValueError(f"obs['context'] must have shape ({b}, 3), got {context.shape}")
        if not np.isfinite(context[:, 0]).all():
            raise ValueError("obs['context'][:, 0] (query time) must be finite")
        out[Obs.CONTEXT] = context
        if self.uses_user_id:
            user = np.asarray(obs[Obs.USER])
            if user.shape == (b, 1):  # as the envs emit it
                user = user[:, 0]
            if user.shape != (b,):
                raise ValueError(
                    f"obs['user'] must have shape ({b}, 1) or ({b},), got {user.shape}"
                )
            user = _as_int_array("obs['user']", user)
            if user.size and int(user.min()) < 0:
                raise ValueError(f"obs['user'] must be >= 0, got {int(user.min())}")
            out[Obs.USER] = user
        return out


def _slice_obs(obs: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
    return {key: value[lo:hi] for key, value in obs.items()}


def _popularity_scores(popularity: np.ndarray) -> np.ndarray:
    """Popularity as a score: the count itself, ``-inf`` for never-clicked items."""
    return np.where(popularity > 0, popularity, -np.inf)


# --------------------------------------------------------------------------------------
# Top popular
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopPopularConfig:
    """Config of :class:`TopPopular`.

    Attributes:
        window_days: count only the interactions in ``[t - window_days, t)`` before the
            query time ``t`` (new items can rise, stale hits fade). ``None``: count every
            fitted interaction, whatever the query time.
    """

    window_days: float | None = None

    def __post_init__(self) -> None:
        w = self.window_days
        if w is not None and not (isinstance(w, int | float) and math.isfinite(w) and w > 0):
            raise ValueError(f"window_days must be None or a finite number > 0, got {w!r}")


class TopPopular(CandidateGenerator):
    """The most clicked items: the same list for everyone.

    Score = weighted interaction count of the item (over the window before the query time
    when ``window_days`` is set); never-clicked items are not proposed.

    Known weaknesses (lecture: "нет персонализации, плох для новых айтемов"): no
    personalisation at all (folds every group together: a user is offered the other
    groups' hits), no context; without a window a new item needs as many clicks as the
    old hits to get in, which the generator itself never lets it collect.
    """

    name = "top_popular"

    def __init__(self, window_days: float | None = None) -> None:
        super().__init__()
        self.config = TopPopularConfig(window_days=window_days)
        self._times: np.ndarray | None = None  # (M,) sorted event times
        self._items: np.ndarray | None = None  # (M,) item of each, same order
        self._weights: np.ndarray | None = None  # (M,)

    def _fit(self, interactions: Interactions, catalog: ItemCatalog) -> None:
        order = np.argsort(interactions.time, kind="stable")
        self._times = interactions.time[order]
        self._items = interactions.item[order]
        self._weights = interactions.weight[order].astype(np.float64)

    def _score(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        b = obs[Obs.ITEMS].shape[0]
        if self.config.window_days is None:
            return np.broadcast_to(_popularity_scores(self.popularity), (b, self.n_items))
        return _popularity_scores(self.window_counts(obs[Obs.CONTEXT][:, 0]))

    def window_counts(self, now: np.ndarray) -> np.ndarray:
        """Weighted counts per item over ``[t - window_days, t)`` for each query time t.

        Args:
            now: float ``(b,)`` query times in days.

        Returns:
            float64 ``(b, N)``.
        """
        now = np.asarray(now, dtype=np.float64)
        w = float(self.config.window_days)
        # C(p) = per-item count of events with time < p, at every needed point p; the
        # window count is C(t) - C(t - w). Events before the earliest point add the same
        # to both terms, so only events in [min point, max point) are read.
        points, inverse = np.unique(np.concatenate([now, now - w]), return_inverse=True)
        lo = np.searchsorted(self._times, points[0], side="left")
        hi = np.searchsorted(self._times, points[-1], side="left")
        times, items, weights = self._times[lo:hi], self._items[lo:hi], self._weights[lo:hi]
        n, p = self.n_items, points.shape[0]
        # An event at time s belongs to C(p_j) for every j >= (number of points <= s).
        bucket = np.searchsorted(points, times, side="right")  # (m,)
        per_bucket = np.bincount(bucket * n + items, weights=weights, minlength=(p + 1) * n)
        cum = np.cumsum(per_bucket.reshape(p + 1, n), axis=0)  # (P+1, N): row j = C(p_j)
        b = now.shape[0]
        return cum[inverse[:b]] - cum[inverse[b:]]  # (b, N)


# --------------------------------------------------------------------------------------
# User history
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserHistoryConfig:
    """Config of :class:`UserHistory`.

    Attributes:
        n_recent: how many of the most recent positive history events seed the candidates.
        tiers: catalog categorical columns in priority order; an item sharing the value of
            an earlier column with a seed ranks above one sharing only a later column.
    """

    n_recent: int = 5
    tiers: tuple[str, ...] = ("creator", "topic")

    def __post_init__(self) -> None:
        if isinstance(self.n_recent, bool) or not isinstance(self.n_recent, int):
            raise ValueError(f"n_recent must be an integer >= 1, got {self.n_recent!r}")
        if self.n_recent < 1:
            raise ValueError(f"n_recent must be an integer >= 1, got {self.n_recent!r}")
        tiers = tuple(self.tiers)
        distinct = len(set(tiers)) == len(tiers)
        if not tiers or not distinct or not all(isinstance(t, str) for t in tiers):
            raise ValueError(f"tiers must be a non-empty tuple of distinct names, got {tiers!r}")
        if len(tiers) > 100:
            raise ValueError(f"tiers must name at most 100 columns, got {len(tiers)}")
        object.__setattr__(self, "tiers", tiers)


class UserHistory(CandidateGenerator):
    """More of what the user consumed last: same creator first, then same topic.

    Seeds are the last ``n_recent`` positive (click/like) events of the visible history.
    An item matching a seed's creator gets tier 2, otherwise one matching a seed's topic
    gets tier 1 (with the default ``tiers``); within a tier items are ordered by
    popularity, then id. Score = tier * (max popularity + 1) + popularity. Items matching
    no seed are not proposed.

    Known weaknesses (lecture: "имеет смысл не на всех доменах, нет discovery"): no
    discovery beyond the creators/topics already consumed; a new user (empty history)
    gets nothing; sensible only where consuming more of the same is wanted. Its strength:
    a creator's new items are offered at once (tier does not need clicks).
    """

    name = "user_history"

    def __init__(self, n_recent: int = 5, tiers: tuple[str, ...] = ("creator", "topic")) -> None:
        super().__init__()
        self.config = UserHistoryConfig(n_recent=n_recent, tiers=tuple(tiers))
        self._columns: list[np.ndarray] = []  # per tier: int64 (N,) value of each item
        self._cardinalities: list[int] = []

    def _fit(self, interactions: Interactions, catalog: ItemCatalog) -> None:
        self._columns, self._cardinalities = [], []
        for name in self.config.tiers:
            if name not in catalog.categorical_names:
                raise ValueError(
                    f"tiers names a column {name!r} that the catalog lacks; "
                    f"catalog has {catalog.categorical_names}"
                )
            col = catalog.column(name).astype(np.int64)
            card = int(catalog.categorical_cardinalities[catalog.categorical_names.index(name)])
            _check_ids(f"catalog column {name!r}", col, card)
            self._columns.append(col)
            self._cardinalities.append(card)
        self._scale = float(self.popularity.max(initial=0.0)) + 1.0

    def _score(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        b = obs[Obs.ITEMS].shape[0]
        rows, seeds, _ = _recent_positive(
            obs[Obs.ITEMS], obs[Obs.EVENTS], obs[Obs.MASK], self.config.n_recent
        )
        n_tiers = len(self._columns)
        tier = np.zeros((b, self.n_items), dtype=np.int8)  # (b, N): best tier matched
        for j, (col, card) in enumerate(zip(self._columns, self._cardinalities, strict=True)):
            has_value = np.zeros((b, card), dtype=bool)  # (b, card): values among the seeds
            has_value[rows, col[seeds]] = True
            matched = has_value[:, col]  # (b, N)
            np.maximum(tier, matched * np.int8(n_tiers - j), out=tier)
        return np.where(tier > 0, tier * self._scale + self.popularity[None, :], -np.inf)


# --------------------------------------------------------------------------------------
# Item2item
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item2ItemConfig:
    """Config of :class:`Item2Item`.

    Attributes:
        n_recent: how many of the most recent positive history events seed the candidates.
        decay: weight of the r-th most recent seed is ``decay ** r`` (r = 0 most recent),
            in ``(0, 1]``.
        min_cooc: drop item pairs that co-occur in fewer than this many sessions.
        similarity: ``"cosine"`` (co-occurrence / sqrt(sessions_i * sessions_j), which
            discounts pairs that co-occur only because both are popular) or ``"cooc"``
            (raw co-occurrence counts).
        n_neighbors: neighbours kept per item (the top M by similarity, ties by id).
        session_gap_days: ``None`` groups events by the ``(user, session)`` of the
            interactions (rows with session -1 form no pairs); a number instead cuts each
            user's positives into sessions wherever two consecutive ones are more than this
            many days apart (the session column is then ignored).
    """

    n_recent: int = 5
    decay: float = 0.8
    min_cooc: int = 1
    similarity: Literal["cosine", "cooc"] = "cosine"
    n_neighbors: int = 100
    session_gap_days: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_recent", "min_cooc", "n_neighbors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.decay, int | float) and 0 < self.decay <= 1):
            raise ValueError(f"decay must be in (0, 1], got {self.decay!r}")
        if self.similarity not in ("cosine", "cooc"):
            raise ValueError(f"similarity must be 'cosine' or 'cooc', got {self.similarity!r}")
        g = self.session_gap_days
        if g is not None and not (isinstance(g, int | float) and math.isfinite(g) and g > 0):
            raise ValueError(f"session_gap_days must be None or a finite number > 0, got {g!r}")


class Item2Item(CandidateGenerator):
    """Items that co-occur in sessions with the user's recent positives.

    Fit: a binary session x item matrix X (scipy.sparse); co-occurrence C = X^T X with the
    diagonal removed and pairs below ``min_cooc`` dropped; cosine normalisation
    ``S_ij = C_ij / sqrt(C_ii C_jj)`` (C_ii = sessions holding item i); the top
    ``n_neighbors`` entries of every row kept. Retrieve: scores = H S, where H ``(B, N)``
    puts weight ``decay ** r`` on the r-th most recent positive history item (one sparse
    product for the whole batch). Items with no co-occurrence are not proposed.

    Known weaknesses (lecture: "меньше персонализации и discovery, может быть плох для новых
    айтемов; не контекстуален"): a new item has no co-occurrences, so it is never
    retrieved until other generators get it clicked; a new user (empty history) gets
    nothing; not contextual (time, session position are ignored); candidates stay near the
    recent history.
    """

    name = "item2item"

    def __init__(
        self,
        n_recent: int = 5,
        decay: float = 0.8,
        min_cooc: int = 1,
        similarity: Literal["cosine", "cooc"] = "cosine",
        n_neighbors: int = 100,
        session_gap_days: float | None = None,
    ) -> None:
        super().__init__()
        self.config = Item2ItemConfig(
            n_recent=n_recent,
            decay=decay,
            min_cooc=min_cooc,
            similarity=similarity,
            n_neighbors=n_neighbors,
            session_gap_days=session_gap_days,
        )
        self.similarity_matrix: sp.csr_matrix | None = None  # (N, N) neighbour rows

    def _sessions(self, interactions: Interactions) -> tuple[np.ndarray, np.ndarray]:
        """Session index and item of every row that belongs to a session."""
        gap = self.config.session_gap_days
        if gap is None:
            known = interactions.session >= 0
            if len(interactions) and not known.any():
                raise ValueError(
                    "interactions.session is -1 (unknown) on every row; "
                    "pass session_gap_days to cut sessions by time"
                )
            user, session = interactions.user[known], interactions.session[known]
            if user.size == 0:
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            span = int(session.max()) + 1
            if interactions.n_users * span < 2**62:  # one int64 key per (user, session)
                _, group = np.unique(user * span + session, return_inverse=True)
            else:
                _, group = np.unique(np.stack([user, session], 1), axis=0, return_inverse=True)
            return group.reshape(-1).astype(np.int64), interactions.item[known]
        order = np.lexsort((interactions.time, interactions.user))
        user, time = interactions.user[order], interactions.time[order]
        new = np.ones(len(order), dtype=bool)
        new[1:] = (user[1:] != user[:-1]) | (time[1:] - time[:-1] > gap)
        return np.cumsum(new) - 1, interactions.item[order]

    def _fit(self, interactions: Interactions, catalog: ItemCatalog) -> None:
        n = self.n_items
        group, item = self._sessions(interactions)
        n_groups = int(group.max()) + 1 if group.size else 0
        x = sp.csr_matrix(
            (np.ones(group.size), (group, item)), shape=(n_groups, n), dtype=np.float64
        )
        x.sum_duplicates()
        x.data[:] = 1.0  # binary: an item counts once per session
        cooc = (x.T @ x).tocsr()  # (N, N) C_ij = sessions holding both i and j
        sessions_per_item = cooc.diagonal().copy()  # (N,) C_ii
        cooc.setdiag(0)
        cooc.data[cooc.data < self.config.min_cooc] = 0
        cooc.eliminate_zeros()
        cooc = cooc.tocoo()
        rows, cols, vals = cooc.row.astype(np.int64), cooc.col.astype(np.int64), cooc.data
        if self.config.similarity == "cosine":
            # cosine between the item columns of X: C_ij / sqrt(C_ii C_jj)
            vals = vals / np.sqrt(sessions_per_item[rows] * sessions_per_item[cols])
        # Keep the n_neighbors best entries of each row (ties by smaller column id).
        order = np.lexsort((cols, -vals, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
        starts = np.searchsorted(rows, rows, side="left")  # first entry of each one's row
        keep = (np.arange(rows.size) - starts) < self.config.n_neighbors
        self.similarity_matrix = sp.csr_matrix(
            (vals[keep], (rows[keep], cols[keep])), shape=(n, n), dtype=np.float64
        )

    def _score(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        b = obs[Obs.ITEMS].shape[0]
        rows, seeds, rank = _recent_positive(
            obs[Obs.ITEMS], obs[Obs.EVENTS], obs[Obs.MASK], self.config.n_recent
        )
        weights = float(self.config.decay) ** rank  # (S,) decay^r, r = 0 most recent
        h = sp.csr_matrix((weights, (rows, seeds)), shape=(b, self.n_items))  # (b, N)
        product = (h @ self.similarity_matrix).tocoo()  # (b, N) sparse
        out = np.full((b, self.n_items), -np.inf)  # (b, N)
        out[product.row, product.col] = product.data
        return out


# --------------------------------------------------------------------------------------
# ALS
# --------------------------------------------------------------------------------------
#
# Own implementation rather than the `implicit` package. `implicit` is well kept and fast,
# but it is a compiled extension with its own thread pool (and CUDA builds), an extra
# dependency for one baseline. The algorithm is short: each half step is an exact batched
# least-squares solve, checked in the tests against a dense reference solve. Measured on
# this project's 2-core machine, one BLAS thread, 10,000 users x 20,000 items x 465,000
# distinct pairs, d = 64, 15 iterations: 25 s of CPU time (about 1.1-1.6 s per iteration,
# half of it the d x d solves of the heavy rows), 40-55 s wall while other jobs shared the
# machine. Fast enough for a baseline that is fitted once per experiment.


@dataclass(frozen=True)
class ALSConfig:
    """Config of :class:`ALS`.

    Attributes:
        factors: latent dimension d.
        regularization: L2 weight lambda on both factor matrices, ``> 0``.
        alpha: confidence slope: ``c_ui = 1 + alpha * r_ui`` (r_ui = summed weights).
        iterations: alternating rounds (each solves users, then items).
        seed: seed of the ``numpy.random.Generator`` that draws the initial item factors.
        progress: show a tqdm bar over iterations.
    """

    factors: int = 64
    regularization: float = 0.1
    alpha: float = 10.0
    iterations: int = 15
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("factors", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("regularization", "alpha"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")


class _SolvePlan:
    """Padded gather indices for the batched normal equations of one side (users or items).

    Rows (users, or items) are sorted by their number of interactions and cut into blocks
    of similar length, so that padding each block to its longest row wastes little and
    a block's ``(b, L, d)`` tensor stays under a memory cap.
    """

    def __init__(self, conf_minus_one: sp.csr_matrix, factors: int, cap: int = 1 << 21) -> None:
        counts = np.diff(conf_minus_one.indptr)  # (n,)
        order = np.argsort(counts, kind="stable")
        order = order[counts[order] > 0]  # rows without interactions solve to 0
        sorted_counts = counts[order]
        self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        limit = max(1, cap // factors)  # max b * L per block
        start, n = 0, order.size
        while start < n:
            # largest end with (end - start) * longest row <= limit (at least one row)
            lo, hi = start + 1, min(n, start + 4096)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if (mid - start) * int(sorted_counts[mid - 1]) <= limit:
                    lo = mid
                else:
                    hi = mid - 1
            rows = order[start:lo]
            length = int(sorted_counts[lo - 1])
            offsets = np.arange(length)[None, :]  # (1, L)
            valid = offsets < counts[rows][:, None]  # (b, L)
            pos = np.where(valid, conf_minus_one.indptr[rows][:, None] + offsets, 0)  # (b, L)
            cols = np.where(valid, conf_minus_one.indices[pos], 0)  # (b, L)
            sqrt_w = np.where(valid, np.sqrt(conf_minus_one.data[pos]), 0.0)  # (b, L)
            self.blocks.append((rows, cols, sqrt_w))
            start = lo


def _als_half_step(
    confidence: sp.csr_matrix,
    plan: _SolvePlan,
    fixed: np.ndarray,
    regularization: float,
) -> np.ndarray:
    """Exact least-squares update of one side given the other (Hu, Koren, Volinsky 2008).

    For each row u: ``x_u = (Y^T C_u Y + lambda I)^{-1} Y^T C_u p_u`` with
    ``Y^T C_u Y = Y^T Y + Y^T (C_u - I) Y``: the shared ``G = Y^T Y + lambda I`` is computed
    once and only the row's own L items add ``Z^T Z``, ``Z = sqrt(C_u - I) Y_u`` ``(L, d)``,
    so the cost is O(nnz d^2 + n d^3). Rows shorter than d (the long tail) use the
    Woodbury identity instead, ``(G + Z^T Z)^{-1} = G^{-1} - G^{-1} Z^T (I + Z G^{-1}
    Z^T)^{-1} Z G^{-1}``, an L x L solve in place of a d x d one; both are exact.

    Args:
        confidence: CSR ``(n, m)`` holding ``c_ui = 1 + alpha r_ui`` on the observed pairs.
        plan: the padded blocks built from the same pattern with ``c_ui - 1``.
        fixed: float64 ``(m, d)`` factors of the other side.
        regularization: lambda.

    Returns:
        float64 ``(n, d)``; rows without interactions are 0 (their right side is 0).
    """
    d = fixed.shape[1]
    gram = fixed.T @ fixed + regularization * np.eye(d)  # (d, d) G = Y^T Y + lambda I
    gram_inv = np.linalg.inv(gram)  # (d, d), for the Woodbury rows
    gram_inv = 0.5 * (gram_inv + gram_inv.T)
    rhs = confidence @ fixed  # (n, d) Y^T C_u p_u = sum_i c_ui y_i (p_ui = 1 on observed)
    out = np.zeros((confidence.shape[0], d))
    for rows, cols, sqrt_w in plan.blocks:
        z = fixed[cols] * sqrt_w[..., None]  # (b, L, d) Z = sqrt(c_ui - 1) y_i; 0 on padding
        r = rhs[rows]  # (b, d)
        length = cols.shape[1]
        if length >= d:
            a = gram + np.matmul(z.transpose(0, 2, 1), z)  # (b, d, d) G + Y^T (C_u - I) Y
            out[rows] = np.linalg.solve(a, r[..., None])[..., 0]  # (b, d)
        else:
            w = z @ gram_inv  # (b, L, d) Z G^{-1}
            k = np.matmul(w, z.transpose(0, 2, 1))  # (b, L, L) Z G^{-1} Z^T
            k[:, np.arange(length), np.arange(length)] += 1.0  # I + Z G^{-1} Z^T
            inner = np.linalg.solve(k, np.matmul(w, r[..., None]))  # (b, L, 1)
            out[rows] = r @ gram_inv - np.matmul(w.transpose(0, 2, 1), inner)[..., 0]  # (b, d)
    return out


class ALS(CandidateGenerator):
    """User2item by implicit-feedback alternating least squares (Hu, Koren, Volinsky 2008).

    Minimises ``sum_{u,i} c_ui (p_ui - x_u . y_i)^2 + lambda (sum |x_u|^2 + sum |y_i|^2)``
    over all user-item pairs, with preference ``p_ui = 1`` if the user interacted with the
    item and confidence ``c_ui = 1 + alpha r_ui`` (r_ui = summed interaction weights;
    ``c = 1`` on the unobserved pairs). Initial item factors ~ N(0, 0.01^2) from
    ``seed``; each iteration solves all users exactly, then all items. ``loss_history``
    holds the objective after every iteration (it cannot increase: each half step is an
    exact minimisation).

    Score = ``x_u . y_i`` for the query's user id ``obs["user"]``.

    Fallback: a user with no training interactions, or an id ``>= n_users`` (a user the
    model never saw), has no factors; that row gets the :class:`TopPopular` scores (the
    fitted counts, ``-inf`` for never-clicked items).

    Known weaknesses (lecture: "плох для новых айтемов и пользователей; не контекстуален"):
    an item without training interactions has zero factors (score 0: it never rises above
    the items the user likes); a new user gets the non-personal popular list; the user
    vector is fixed at fit time, so new clicks in the history change nothing until refit;
    no context.
    """

    name = "als"
    uses_user_id = True

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.1,
        alpha: float = 10.0,
        iterations: int = 15,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.config = ALSConfig(
            factors=factors,
            regularization=regularization,
            alpha=alpha,
            iterations=iterations,
            seed=seed,
            progress=progress,
        )
        self.user_factors: np.ndarray | None = None  # (n_users, d)
        self.item_factors: np.ndarray | None = None  # (N, d)
        self.loss_history: list[float] = []
        self._known_user: np.ndarray | None = None  # bool (n_users,)

    def initial_item_factors(self, n_items: int) -> np.ndarray:
        """The starting item factors: float64 ``(n_items, d)`` ~ N(0, 0.01^2) from ``seed``."""
        rng = np.random.default_rng(self.config.seed)
        return rng.normal(0.0, 0.01, size=(n_items, self.config.factors))

    def _fit(self, interactions: Interactions, catalog: ItemCatalog) -> None:
        cfg = self.config
        r = interactions.matrix()  # (U, N) r_ui, summed weights
        conf_u = r.copy()
        conf_u.data = 1.0 + cfg.alpha * r.data  # c_ui = 1 + alpha r_ui
        conf_i = conf_u.T.tocsr()
        conf_i.sort_indices()
        minus_u, minus_i = conf_u.copy(), conf_i.copy()
        minus_u.data -= 1.0  # c_ui - 1
        minus_i.data -= 1.0
        plan_u = _SolvePlan(minus_u, cfg.factors)
        plan_i = _SolvePlan(minus_i, cfg.factors)
        y = self.initial_item_factors(self.n_items)  # (N, d)
        x = np.zeros((interactions.n_users, cfg.factors))  # (U, d)
        self.loss_history = []
        for _ in tqdm(range(cfg.iterations), desc="ALS", disable=not cfg.progress):
            x = _als_half_step(conf_u, plan_u, y, cfg.regularization)
            y = _als_half_step(conf_i, plan_i, x, cfg.regularization)
            self.loss_history.append(als_loss(conf_u, x, y, cfg.regularization))
        self.user_factors, self.item_factors = x, y
        self._known_user = np.diff(r.indptr) > 0

    def _score(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        user = obs[Obs.USER]  # (b,)
        known = np.zeros(user.shape, dtype=bool)
        inside = user < self._known_user.shape[0]
        known[inside] = self._known_user[user[inside]]
        out = np.empty((user.shape[0], self.n_items))  # (b, N)
        out[known] = self.user_factors[user[known]] @ self.item_factors.T  # (b_known, N)
        out[~known] = _popularity_scores(self.popularity)[None, :]  # new users: popularity
        return out


def als_loss(
    confidence: sp.csr_matrix, x: np.ndarray, y: np.ndarray, regularization: float
) -> float:
    """The implicit-ALS objective, exactly, without forming the dense U x N matrix.

    ``sum_{u,i} c_ui (p_ui - s_ui)^2 = sum_all s_ui^2 + sum_observed [c_ui (1 - s_ui)^2 - s_ui^2]``
    with ``s = X Y^T`` and ``sum_all s_ui^2 = <X^T X, Y^T Y>``; plus
    ``lambda (|X|^2 + |Y|^2)``.

    Args:
        confidence: CSR ``(U, N)`` with ``c_ui`` on the observed pairs.
        x: float ``(U, d)`` user factors.
        y: float ``(N, d)`` item factors.
        regularization: lambda.
    """
    coo = confidence.tocoo()
    s = np.einsum("md,md->m", x[coo.row], y[coo.col])  # (nnz,) s_ui on observed pairs
    total = float(np.sum((x.T @ x) * (y.T @ y)))  # sum over all pairs of s_ui^2
    total += float(np.sum(coo.data * (1.0 - s) ** 2 - s**2))
    return total + regularization * float(np.sum(x * x) + np.sum(y * y))
