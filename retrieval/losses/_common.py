"""What the loss modules share: constants, argument checks, the mask value, reductions."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from retrieval.frequency import ItemFrequency
from simenv.arrays import check_item_ids

LOGQ_VARIANTS = ("none", "derived", "positive_and_negatives", "negatives_only")
LOGQ_SCALES = ("expected_count", "probability")

# Item vectors: a table (N, d), or a function ids -> (n, d) (an item tower).
ItemSource = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
# Frequency of positives: an estimator, an (N,) array of counts or probabilities, or a
# function ids -> log-probability.
FrequencyLike = ItemFrequency | torch.Tensor | np.ndarray | Callable[[torch.Tensor], torch.Tensor]


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in: the autocast dtype when autocast is on, else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _mask_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    if reduction == "none":
        return rows
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_ids(name: str, ids: torch.Tensor, n_items: int | None, ndim: int = 1) -> None:
    """Integer ids of ``ndim`` dims, in ``[0, n_items)`` unless ``n_items`` is None."""
    check_item_ids(name, ids, n_items, ndim=ndim)


def _check_vecs(name: str, x: torch.Tensor, rows: int | None = None, d: int | None = None) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(x.shape)}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(x.shape)}")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name} must have d={d} columns, got shape {tuple(x.shape)}")
