"""Gymnasium spaces of the environments: the slate action space and the observation space."""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import batch_differing_spaces, batch_space

from simenv.types import EventType, Obs

__all__ = ["SlateSpace", "observation_space"]


class SlateSpace(spaces.MultiDiscrete):
    """A slate of ``k`` distinct item ids, or a batch ``(B, k)`` of them.

    A :class:`gymnasium.spaces.MultiDiscrete` (so RL libraries see a familiar space) whose
    ``contains`` also requires distinct items in each slate and whose ``sample`` draws distinct
    items from ``sample_pool`` (by default the items released at time 0, valid at any time).
    Release times are checked by the environment, which knows each user's clock.

    Args:
        n_items: catalog size N.
        k: slate size.
        batch: ``None`` for a single slate ``(k,)``, else B for ``(B, k)``.
        sample_pool: int64 item ids that ``sample`` draws from.
        seed: seed of the space's own generator.
    """

    def __init__(
        self,
        n_items: int,
        k: int,
        batch: int | None = None,
        sample_pool: np.ndarray | None = None,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        shape = (k,) if batch is None else (batch, k)
        super().__init__(np.full(shape, n_items, dtype=np.int64), dtype=np.int64, seed=seed)
        self.n_items = int(n_items)
        self.k = int(k)
        self.batch = batch
        pool = (
            np.arange(n_items, dtype=np.int64)
            if sample_pool is None
            else np.asarray(sample_pool, dtype=np.int64)
        )
        if pool.size < k:
            raise ValueError(f"sample_pool must hold at least k={k} items, got {pool.size}")
        self.sample_pool = pool

    def sample(self, mask: Any = None, probability: Any = None) -> np.ndarray:
        """Distinct items from ``sample_pool`` (masks fall back to MultiDiscrete sampling)."""
        if mask is not None or probability is not None:
            return super().sample(mask=mask, probability=probability)
        rows = 1 if self.batch is None else self.batch
        # k distinct positions per row: argsort of uniform keys over a random window of the pool
        # (exact uniform sampling without replacement when the pool is small; for big pools
        # rejection of duplicates is cheap because collisions are rare)
        pool = self.sample_pool
        if pool.size <= 4 * self.k:
            keys = self.np_random.random((rows, pool.size))
            idx = np.argsort(keys, axis=1)[:, : self.k]
        else:
            idx = self.np_random.integers(pool.size, size=(rows, self.k))
            for _ in range(100):
                s = np.sort(idx, axis=1)
                dup_rows = np.nonzero((s[:, 1:] == s[:, :-1]).any(axis=1))[0]
                if dup_rows.size == 0:
                    break
                idx[dup_rows] = self.np_random.integers(pool.size, size=(dup_rows.size, self.k))
        out = pool[idx]
        return out[0] if self.batch is None else out

    def contains(self, x: Any) -> bool:
        """MultiDiscrete membership plus distinct items within each slate."""
        if not super().contains(x):
            return False
        a = np.asarray(x).reshape(-1, self.k)
        s = np.sort(a, axis=1)
        return not bool((s[:, 1:] == s[:, :-1]).any())

    def __repr__(self) -> str:
        shape = (self.k,) if self.batch is None else (self.batch, self.k)
        return f"SlateSpace(n_items={self.n_items}, shape={shape})"

    def __eq__(self, other: Any) -> bool:
        return (
            isinstance(other, SlateSpace)
            and other.n_items == self.n_items
            and other.k == self.k
            and other.batch == self.batch
        )


@batch_space.register(SlateSpace)
def _batch_slate_space(space: SlateSpace, n: int = 1) -> SlateSpace:
    """B slates of the same catalog: ``SlateSpace(batch=n)`` keeping the sample pool.

    Gymnasium's generic ``MultiDiscrete`` batching returns a ``Box`` whose ``sample`` draws
    unreleased items and repeats; every vectorization mode (``sync``, ``async``) batches the
    single action space through this function, so registering it makes their
    ``action_space.sample()`` valid slates.
    """
    if space.batch is not None:
        raise ValueError(f"cannot batch an already batched SlateSpace (batch={space.batch})")
    return SlateSpace(
        space.n_items,
        space.k,
        batch=int(n),
        sample_pool=space.sample_pool,
        seed=deepcopy(space.np_random),
    )


@batch_differing_spaces.register(SlateSpace)
def _batch_differing_slate_spaces(spaces_: Sequence[SlateSpace]) -> SlateSpace:
    """Slates of envs with the same catalog and k; samples from the items all pools share."""
    first = spaces_[0]
    if any(s.batch is not None or s.n_items != first.n_items or s.k != first.k for s in spaces_):
        raise ValueError(
            "SlateSpaces batch together only with equal n_items and k and no batch dimension; "
            f"got {[repr(s) for s in spaces_]}"
        )
    pool = first.sample_pool
    for s in spaces_[1:]:
        pool = np.intersect1d(pool, s.sample_pool)
    return SlateSpace(
        first.n_items,
        first.k,
        batch=len(spaces_),
        sample_pool=pool,
        seed=deepcopy(first.np_random),
    )


def observation_space(n_items: int, n_users: int, history_length: int) -> spaces.Dict:
    """The single-user observation space (see :class:`simenv.types.Obs` for the fields)."""
    L = history_length
    big = np.float32(1e7)  # finite bounds (days); gymnasium warns on infinite ones
    return spaces.Dict(
        {
            Obs.ITEMS: spaces.Box(0, n_items - 1, shape=(L,), dtype=np.int64),
            Obs.EVENTS: spaces.Box(0, EventType.n_types() - 1, shape=(L,), dtype=np.int64),
            Obs.DT: spaces.Box(0.0, big, shape=(L,), dtype=np.float32),
            Obs.MASK: spaces.MultiBinary(L),
            Obs.CONTEXT: spaces.Box(0.0, big, shape=(3,), dtype=np.float32),
            Obs.USER: spaces.Box(0, n_users - 1, shape=(1,), dtype=np.int64),
        }
    )
