"""Names and small types shared by every package.

Column and field names are defined once here (RecTools' ``Columns`` idea) so that the
simulator, retrieval, ranking and the benchmarks agree on them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EventType", "Obs", "Columns", "ItemCatalog", "obs_users"]


class EventType(enum.IntEnum):
    """Feedback on one shown item; also the event type stored in a user's history.

    ``IMPRESSION`` (shown, not clicked) appears only in impression logs; a history holds
    engagement events (``CLICK``, ``LIKE``, ``DISLIKE``) and ``PAD`` for empty slots.
    A ``LIKE`` or ``DISLIKE`` is a click followed by that explicit reaction.
    """

    IMPRESSION = 0
    PAD = 0
    CLICK = 1
    LIKE = 2
    DISLIKE = 3

    @staticmethod
    def n_types() -> int:
        """Number of distinct event-type ids (embedding table size)."""
        return 4


class Obs:
    """Keys of an observation dict (single env: arrays of shape ``(L,)``; batched: ``(B, L)``).

    - ``item_ids`` int64, item ids of the last L engagement events, oldest first, most recent
      in the last slot; padding on the left (value 0, ``mask`` 0).
    - ``events``  int64, :class:`EventType` of each event (``PAD`` = 0 on padding).
    - ``dt``      float32, time since each event, in days (0 on padding).
    - ``mask``    int8, 1 for a real event, 0 for padding.
    - ``context`` float32 ``(3,)``: current time (days), session index, position in session.
    - ``user``    int64 ``(1,)`` (batched ``(B, 1)``): the user id (for user-id baselines such
      as ALS only); read it as ``(B,)`` with :func:`obs_users`.

    The key names are chosen so that RL libraries do not trip over them: an observation key
    becomes an attribute name in some of them (Stable-Baselines3's ``CombinedExtractor`` puts
    one sub-network per key in a ``torch.nn.ModuleDict``, where ``items``, ``keys``, ``values``
    or ``update`` collide with the dict's methods), and no entry is 0-d (SB3's ``check_env``
    and flattening wrappers reject scalars). The attribute ``ITEMS`` keeps its name; its key
    is ``"item_ids"`` and no entry is called ``items``.
    """

    ITEMS = "item_ids"
    EVENTS = "events"
    DT = "dt"
    MASK = "mask"
    CONTEXT = "context"
    USER = "user"
    CONTEXT_FIELDS = ("time", "session", "position")


def obs_users(obs: Mapping[str, Any]) -> np.ndarray:
    """The user ids of a batched observation as int64 ``(B,)``.

    Environments emit ``obs["user"]`` as ``(B, 1)`` (``(1,)`` for one user); observations
    rebuilt from logs do the same. A hand-built ``(B,)`` array is accepted as it is.

    Raises:
        ValueError: if ``obs["user"]`` is neither ``(B,)`` nor ``(B, 1)``.
    """
    u = np.asarray(obs[Obs.USER])
    if u.ndim == 2 and u.shape[1] == 1:
        u = u[:, 0]
    elif u.ndim != 1:
        raise ValueError(f"obs['user'] must have shape (B, 1) or (B,), got {u.shape}")
    if u.size and not np.issubdtype(u.dtype, np.integer):
        raise ValueError(f"obs['user'] must hold integer ids, got dtype {u.dtype}")
    return u.astype(np.int64, copy=False)


class Columns:
    """Column names of :class:`simenv.ImpressionLog` and of result tables."""

    USER = "user"
    TIME = "time"
    SESSION = "session"
    REQUEST = "request"
    POSITION = "position"
    ITEM = "item"
    FEEDBACK = "feedback"
    WATCH = "watch"
    REWARD = "reward"
    PROPENSITY = "propensity"
    SCORE = "score"
    RANK = "rank"
    CANDIDATE = "candidate"


@dataclass(frozen=True, eq=False)
class ItemCatalog:
    """The public side of the items: what any model may read.

    Attributes:
        title_tokens: int64 ``(N, T)`` token ids of each item's title; 0 is padding.
        vocab_size: number of token ids including the padding id 0.
        categorical: int64 ``(N, F)`` categorical ids, one column per feature.
        categorical_names: names of the F columns (``("creator", "topic", "group")`` in
            the simulator).
        categorical_cardinalities: number of distinct values of each column.
        release_time: float32 ``(N,)`` time (days) from which the item may be shown;
            ``<= 0`` means available from the start.
    """

    title_tokens: np.ndarray
    vocab_size: int
    categorical: np.ndarray
    categorical_names: tuple[str, ...]
    categorical_cardinalities: tuple[int, ...]
    release_time: np.ndarray

    def __post_init__(self) -> None:
        n = self.title_tokens.shape[0]
        if self.title_tokens.ndim != 2:
            raise ValueError(
                f"title_tokens must be 2-D (N, T), got shape {self.title_tokens.shape}"
            )
        if self.categorical.ndim != 2 or self.categorical.shape[0] != n:
            raise ValueError(
                f"categorical must have shape (N={n}, F), got {self.categorical.shape}"
            )
        if self.release_time.shape != (n,):
            raise ValueError(f"release_time must have shape ({n},), got {self.release_time.shape}")
        if (
            len(self.categorical_names) != self.categorical.shape[1]
            or len(self.categorical_cardinalities) != self.categorical.shape[1]
        ):
            raise ValueError("categorical_names and categorical_cardinalities must have F entries")

    @property
    def n_items(self) -> int:
        """Number of items N."""
        return int(self.title_tokens.shape[0])

    def column(self, name: str) -> np.ndarray:
        """One categorical column by name (e.g. ``"group"``)."""
        try:
            j = self.categorical_names.index(name)
        except ValueError:
            raise KeyError(
                f"no categorical feature {name!r}; have {self.categorical_names}"
            ) from None
        return self.categorical[:, j]
