"""Item frequency ``Q`` for the logQ correction: exact counts or a streaming sketch.

The lecture ("LogQ Коррекция"): the logQ coefficients can be precomputed over the whole
dataset, or counted on the fly with a count-min sketch. Three estimators share one interface
(:class:`ItemFrequency`):

- :class:`ExactItemFrequency`: a count per item (``N`` integers);
- :class:`CountMinSketch`: ``depth x width`` counters, memory independent of ``N``, never
  underestimates; with ``width = ceil(e / eps)`` and ``depth = ceil(ln(1 / delta))``,
  ``P[estimate - count > eps * total] <= delta`` for each item (Cormode & Muthukrishnan 2005);
- :class:`StreamingFrequencyEstimator`: Yi et al. 2019's step-gap estimator for a
  non-stationary stream (frequency from the exponentially averaged gap between sightings).

Every method accepts item ids as a numpy array, a list or a torch tensor. ``counts``,
``probability`` and ``log_q`` return a numpy array for numpy input and a tensor on the input's
device for tensor input (float32 for probabilities, int64 for counts), so a training loop can
call them on its id tensors directly.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from simenv.arrays import check_item_ids

__all__ = [
    "ItemFrequency",
    "ExactItemFrequency",
    "CountMinSketch",
    "StreamingFrequencyEstimator",
]

# Mersenne prime 2^31 - 1 of the hash family h(x) = ((a x + b) mod p) mod w. With a, b < p and
# x reduced mod p, a * x + b < 2^62 + 2^31 fits in uint64 without overflow.
_PRIME = (1 << 31) - 1


@runtime_checkable
class ItemFrequency(Protocol):
    """What the losses need from a frequency estimator."""

    @property
    def total(self) -> int:
        """Number of ids seen so far."""
        ...

    def update(self, item_ids: Any) -> None:
        """Count a batch of item ids (repeats count as often as they occur)."""
        ...

    def counts(self, item_ids: Any) -> Any:
        """Estimated count of each id."""
        ...

    def probability(self, item_ids: Any) -> Any:
        """Estimated probability of each id: count / total (0 before any update)."""
        ...

    def log_q(self, item_ids: Any, floor: float = 1e-9) -> Any:
        """``log(max(probability, floor))``: finite for never-seen ids."""
        ...


def _as_ids(item_ids: Any, name: str = "item_ids") -> np.ndarray:
    """Item ids as a 1-D int64 numpy array (a view where possible)."""
    if torch.is_tensor(item_ids):
        arr = item_ids.detach().cpu().numpy()
    else:
        arr = np.asarray(item_ids)
    if arr.dtype.kind not in "iu":
        if arr.size == 0:
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    return arr.reshape(-1).astype(np.int64, copy=False)


def _like(values: np.ndarray, ref: Any, shape: tuple[int, ...]) -> Any:
    """Return ``values`` reshaped to ``shape``, as a tensor on ``ref``'s device if ``ref`` is one."""
    values = values.reshape(shape)
    if torch.is_tensor(ref):
        out = torch.from_numpy(np.ascontiguousarray(values))
        if out.dtype == torch.float64:
            out = out.float()
        return out.to(ref.device)
    return values


def _shape(item_ids: Any) -> tuple[int, ...]:
    return tuple(item_ids.shape) if hasattr(item_ids, "shape") else (len(item_ids),)


def _check_floor(floor: float) -> None:
    if not (0.0 < floor <= 1.0):
        raise ValueError(f"floor must be in (0, 1], got {floor}")


class _FrequencyBase:
    """Shared ``probability`` / ``log_q`` on top of ``_counts_np`` and ``total``."""

    _total: int

    @property
    def total(self) -> int:
        """Number of ids seen so far."""
        return self._total

    def _counts_np(self, ids: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _probability_np(self, ids: np.ndarray) -> np.ndarray:
        if self._total == 0:
            return np.zeros(ids.shape, dtype=np.float64)
        return self._counts_np(ids) / float(self._total)

    def counts(self, item_ids: Any) -> Any:
        """Estimated count of each id (same shape as ``item_ids``)."""
        ids = _as_ids(item_ids)
        return _like(self._counts_np(ids), item_ids, _shape(item_ids))

    def probability(self, item_ids: Any) -> Any:
        """Estimated probability ``count / total`` of each id; 0 before any update."""
        ids = _as_ids(item_ids)
        return _like(self._probability_np(ids), item_ids, _shape(item_ids))

    def log_q(self, item_ids: Any, floor: float = 1e-9) -> Any:
        """``log(max(probability, floor))`` of each id.

        Args:
            item_ids: ids to look up.
            floor: smallest probability used, in ``(0, 1]``; keeps the log finite for
                never-seen ids.
        """
        _check_floor(floor)
        ids = _as_ids(item_ids)
        return _like(
            np.log(np.maximum(self._probability_np(ids), floor)), item_ids, _shape(item_ids)
        )


class ExactItemFrequency(_FrequencyBase):
    """Exact count of every item id in ``[0, n_items)``.

    Args:
        n_items: catalog size.

    Example:
        >>> f = ExactItemFrequency(4)
        >>> f.update(np.array([0, 2, 2, 3]))
        >>> f.counts(np.array([2, 1])), f.probability(np.array([2]))
        (array([2, 0]), array([0.5]))
    """

    def __init__(self, n_items: int) -> None:
        if int(n_items) < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        self.n_items = int(n_items)
        self._counts = np.zeros(self.n_items, dtype=np.int64)
        self._total = 0

    def _check_range(self, ids: np.ndarray) -> None:
        check_item_ids("item_ids", ids, self.n_items)

    def update(self, item_ids: Any) -> None:
        """Count a batch of ids (``bincount``: repeats add up)."""
        ids = _as_ids(item_ids)
        self._check_range(ids)
        self._counts += np.bincount(ids, minlength=self.n_items)
        self._total += int(ids.size)

    def _counts_np(self, ids: np.ndarray) -> np.ndarray:
        self._check_range(ids)
        return self._counts[ids]

    def all_counts(self) -> np.ndarray:
        """Counts of every item, ``(N,)`` int64 (a copy)."""
        return self._counts.copy()

    def all_probabilities(self) -> np.ndarray:
        """Probability of every item, ``(N,)`` float64 (zeros before any update)."""
        if self._total == 0:
            return np.zeros(self.n_items, dtype=np.float64)
        return self._counts / float(self._total)

    @classmethod
    def from_counts(cls, counts: Any) -> ExactItemFrequency:
        """Build from precomputed counts over the whole dataset (the lecture's first option)."""
        arr = _as_ids(counts, "counts")
        if arr.size == 0 or arr.min() < 0:
            raise ValueError("counts must be a non-empty array of non-negative integers")
        out = cls(arr.size)
        out._counts = arr.copy()
        out._total = int(arr.sum())
        return out


class _HashedTable:
    """``depth`` pairwise-independent hashes ``h_j(x) = ((a_j x + b_j) mod p) mod width``."""

    def __init__(self, width: int, depth: int, seed: int) -> None:
        if int(width) < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if int(depth) < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.width = int(width)
        self.depth = int(depth)
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        self._a = rng.integers(1, _PRIME, size=(self.depth, 1), dtype=np.int64).astype(np.uint64)
        self._b = rng.integers(0, _PRIME, size=(self.depth, 1), dtype=np.int64).astype(np.uint64)
        # Row j's counters start at j * width in the flattened table.
        self._row_offset = (np.arange(self.depth, dtype=np.int64) * self.width)[:, None]

    def cells(self, ids: np.ndarray) -> np.ndarray:
        """Flat indices of each id's counter in every row, ``(depth, n)`` int64."""
        if ids.size and ids.min() < 0:
            raise ValueError(f"item_ids must be >= 0, got {ids.min()}")
        x = (ids.astype(np.uint64) % np.uint64(_PRIME))[None, :]  # (1, n)
        h = ((self._a * x + self._b) % np.uint64(_PRIME)) % np.uint64(self.width)  # (depth, n)
        return h.astype(np.int64) + self._row_offset  # (depth, n)


class CountMinSketch(_FrequencyBase):
    """Count-min sketch: ``depth`` rows of ``width`` counters; an id's count is its row minimum.

    Any id's estimate is at least its true count. Plain update adds every occurrence to the
    id's counter in each row; with ``width = ceil(e / eps)`` and ``depth = ceil(ln(1 / delta))``
    the overestimate exceeds ``eps * total`` with probability at most ``delta`` (per id, over
    the hash functions). Conservative update (Estan & Varghese 2002) raises only the counters
    that are needed to keep that guarantee, which makes estimates tighter still.

    Args:
        width: counters per row.
        depth: number of rows (independent hash functions).
        seed: seed of the hash functions.
        conservative: use the conservative update.

    Example:
        >>> s = CountMinSketch.from_error_bounds(eps=0.01, delta=0.01, seed=0)
        >>> s.width, s.depth
        (272, 5)
        >>> s.update(np.array([7, 7, 7, 1]))
        >>> s.counts(np.array([7, 1]))
        array([3, 1])
    """

    def __init__(self, width: int, depth: int, seed: int, conservative: bool = True) -> None:
        self._hash = _HashedTable(width, depth, seed)
        self.conservative = bool(conservative)
        self._table = np.zeros((self._hash.depth, self._hash.width), dtype=np.int64)
        self._total = 0

    @classmethod
    def from_error_bounds(
        cls, eps: float, delta: float, seed: int, conservative: bool = True
    ) -> CountMinSketch:
        """Size a sketch for ``P[overestimate > eps * total] <= delta``.

        ``width = ceil(e / eps)``, ``depth = ceil(ln(1 / delta))``.
        """
        if not (0.0 < eps < 1.0):
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if not (0.0 < delta < 1.0):
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        width = math.ceil(math.e / eps)
        depth = math.ceil(math.log(1.0 / delta))
        return cls(width, depth, seed, conservative=conservative)

    @property
    def width(self) -> int:
        """Counters per row."""
        return self._hash.width

    @property
    def depth(self) -> int:
        """Number of rows."""
        return self._hash.depth

    @property
    def table(self) -> np.ndarray:
        """The ``(depth, width)`` counters (read-only view)."""
        view = self._table.view()
        view.flags.writeable = False
        return view

    def update(self, item_ids: Any) -> None:
        """Count a batch of ids, vectorised over the batch and over the rows.

        Repeated ids within one batch are first aggregated (``np.unique``), so an id that
        occurs ``c`` times is processed once with weight ``c``:

        - plain update: ``np.add.at`` adds ``c`` to the id's cell in every row (``add.at``
          is unbuffered, so distinct ids that collide in a cell all add up);
        - conservative update: with ``m`` the id's current estimate (row minimum, taken
          before the batch), every one of its cells is raised to at least ``m + c`` with
          ``np.maximum.at`` (cells shared by several ids take the largest target). That is
          the smallest table in which no estimate drops below ``old estimate + c``, hence
          never below the true count. A sequential per-occurrence conservative update
          yields the same table when the batch's distinct ids share no cell, and a
          cellwise larger-or-equal one otherwise (an occurrence of ``x`` can lift a shared
          cell that ``y`` then builds on); both dominate the true counts, and both are
          cellwise at most the plain sketch. ``tests/retrieval/test_frequency.py`` checks
          these relations against a per-occurrence reference.
        """
        ids = _as_ids(item_ids)
        if ids.size == 0:
            return
        uniq, cnt = np.unique(ids, return_counts=True)  # (U,), (U,)
        cells = self._hash.cells(uniq)  # (depth, U)
        flat = self._table.reshape(-1)  # view
        if self.conservative:
            target = flat[cells].min(axis=0) + cnt  # (U,) estimate before + count
            np.maximum.at(flat, cells.reshape(-1), np.broadcast_to(target, cells.shape).ravel())
        else:
            np.add.at(flat, cells.reshape(-1), np.broadcast_to(cnt, cells.shape).ravel())
        self._total += int(ids.size)

    def _counts_np(self, ids: np.ndarray) -> np.ndarray:
        if ids.size == 0:
            return np.zeros(0, dtype=np.int64)
        return self._table.reshape(-1)[self._hash.cells(ids)].min(axis=0)  # (n,)


class StreamingFrequencyEstimator(_FrequencyBase):
    """Yi et al. 2019's streaming frequency estimate from the gap between sightings.

    Each call to :meth:`update` is one training step ``t``. For every hashed cell of an id
    seen at step ``t``: ``B <- (1 - alpha) * B + alpha * (t - A)`` and ``A <- t``, where ``A``
    holds the last step the cell was seen and ``B`` the running estimate of the gap between
    sightings (in steps). A shorter gap means a more frequent id; collisions only shorten
    gaps, so the estimate over ``depth`` hash rows is the largest ``B``. The per-step
    sighting probability is ``1 / B``; :meth:`probability` divides it by the mean batch size
    to give the probability of one draw, comparable with the other estimators (accurate for
    ids that appear at most about once per batch, which is where logQ matters most). The
    estimator follows drift: old sightings fade with ``(1 - alpha)`` per sighting.

    Repeated ids within one batch count once (they share the step). A cell's first sighting
    initialises its average with the gap from step 0.

    Args:
        width: cells per hash row.
        depth: number of hash rows.
        seed: seed of the hash functions.
        alpha: learning rate of the gap average, in ``(0, 1]``.
    """

    def __init__(self, width: int, depth: int, seed: int, alpha: float = 0.05) -> None:
        if not (0.0 < alpha <= 1.0):
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self._hash = _HashedTable(width, depth, seed)
        self.alpha = float(alpha)
        self._last = np.zeros((self._hash.depth, self._hash.width), dtype=np.float64)  # A
        self._gap = np.zeros((self._hash.depth, self._hash.width), dtype=np.float64)  # B
        self._step = 0
        self._total = 0

    @property
    def step(self) -> int:
        """Number of updates (training steps) so far."""
        return self._step

    def update(self, item_ids: Any) -> None:
        """One training step: record the ids of this batch."""
        ids = _as_ids(item_ids)
        self._step += 1
        self._total += int(ids.size)
        if ids.size == 0:
            return
        # Distinct cells: a cell hit by several ids (or by repeats) is seen once per step.
        cells = np.unique(self._hash.cells(np.unique(ids)).reshape(-1))
        last = self._last.reshape(-1)
        gap = self._gap.reshape(-1)
        t = float(self._step)
        seen_gap = t - last[cells]  # (C,) steps since the cell was last seen
        blended = (1.0 - self.alpha) * gap[cells] + self.alpha * seen_gap
        # A cell's first sighting starts its average at the gap from step 0 (no prior).
        gap[cells] = np.where(last[cells] > 0, blended, seen_gap)
        last[cells] = t

    def _gap_np(self, ids: np.ndarray) -> np.ndarray:
        if ids.size == 0:
            return np.zeros(0, dtype=np.float64)
        return self._gap.reshape(-1)[self._hash.cells(ids)].max(axis=0)  # (n,)

    def _probability_np(self, ids: np.ndarray) -> np.ndarray:
        gap = self._gap_np(ids)
        if self._step == 0:
            return np.zeros(ids.shape, dtype=np.float64)
        mean_batch = self._total / self._step
        with np.errstate(divide="ignore"):
            per_step = np.where(gap > 0, 1.0 / np.maximum(gap, 1e-300), 0.0)
        return np.minimum(per_step, 1.0) / max(mean_batch, 1.0)

    def _counts_np(self, ids: np.ndarray) -> np.ndarray:
        """Expected count so far implied by the rate estimate (rounded to integers)."""
        return np.rint(self._probability_np(ids) * self._total).astype(np.int64)
