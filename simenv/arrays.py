"""Small batched array helpers shared by the packages (row-wise, no Python loop per row)."""

from __future__ import annotations

import numpy as np

__all__ = ["check_item_ids", "first_occurrence", "unique_rows"]


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


_TORCH_INT = ("torch.int64", "torch.int32", "torch.int16", "torch.int8", "torch.uint8")


def check_item_ids(
    name: str, ids, n_items: int | None, *, padding: bool = False, ndim: int | None = None
):
    """Validate item ids: integers in ``[0, n_items)`` (``-1`` too with ``padding``).

    The one item-id check of the project's readers of ids (losses, towers, item frequency,
    index exclusions, the ranker's candidates). Works on numpy arrays (and array-likes) and on
    torch tensors (duck-typed: simenv does not import torch).

    Args:
        name: the argument's name, used in the message.
        ids: the ids, any shape.
        n_items: catalog size N (None: dtype and ``ndim`` only, no range check).
        padding: allow ``-1`` (padding) besides ``[0, N)``.
        ndim: required number of dimensions (None: any).

    Returns:
        numpy input: the ids as an int64 array (no copy when already int64); a tensor: itself.

    Raises:
        ValueError: naming ``name``, on a non-integer dtype, a wrong ``ndim`` or an id out of
            range (the message gives the allowed range and the range found).
    """
    is_tensor = hasattr(ids, "is_floating_point") and hasattr(ids, "numel")
    a = ids if is_tensor else np.asarray(ids)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    size = a.numel() if is_tensor else a.size
    integer = str(a.dtype) in _TORCH_INT if is_tensor else np.issubdtype(a.dtype, np.integer)
    if size and not integer:
        raise ValueError(f"{name} must hold integer item ids, got dtype {a.dtype}")
    if size and n_items is not None:
        lo, hi = int(a.min()), int(a.max())
        low = -1 if padding else 0
        if lo < low or hi >= n_items:
            allowed = f"[0, {n_items - 1}]" + (" or -1 (padding)" if padding else "")
            raise ValueError(f"{name} must be item ids in {allowed}, got values in [{lo}, {hi}]")
    if is_tensor:
        return a
    return a.astype(np.int64, copy=False)
