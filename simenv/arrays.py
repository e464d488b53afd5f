"""Small batched array helpers shared by the packages (row-wise, no Python loop per row)."""

from __future__ import annotations

import numpy as np

__all__ = ["first_occurrence", "unique_rows"]


def first_occurrence(a: np.ndarray) -> np.ndarray:
    """Bool mask (B, m): True where ``a[b, j]`` is the first occurrence of its value in row b.

    A stable sort per row groups equal values with the earliest first; the flags are scattered
    back to the original positions.
    """
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)
    first_sorted = np.ones_like(s, dtype=bool)
    first_sorted[:, 1:] = s[:, 1:] != s[:, :-1]
    out = np.empty_like(first_sorted)
    np.put_along_axis(out, order, first_sorted, axis=1)
    return out


def unique_rows(a: np.ndarray) -> np.ndarray:
    """Each row's distinct ids >= 0 in first-occurrence order, then -1 padding (same shape)."""
    keep = first_occurrence(a) & (a >= 0)
    front = np.argsort(~keep, axis=1, kind="stable")  # kept ids first, original order
    return np.take_along_axis(np.where(keep, a, -1), front, axis=1)
