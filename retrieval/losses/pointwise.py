"""Pointwise and pairwise losses: sampled BCE, gBCE, BPR and the impression-aware BCE.

The lecture compares, for candidate generation, "is this item good?" (pointwise BCE with label
1 on the positive and 0 on each negative; gBCE, its calibrated form), "which of the two is
better?" (pairwise BPR) and the softmax (:mod:`retrieval.losses.softmax`). The sampled forms
use the same negatives as the sampled softmax (:class:`SampledBinaryLoss`, negatives from
:mod:`retrieval.losses.negatives`); the impression-aware pointwise BCE is the ranker's loss on
shown items only, offered to the generator so that folding can be shown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.losses._common import FrequencyLike
from retrieval.losses.negatives import NegativeSamplerConfig, _SampledBase
from retrieval.similarity import Similarity

__all__ = [
    "SampledBinaryLoss",
    "ImpressionBCELoss",
    "bce_sampled_loss",
    "bpr_loss",
    "gbce_loss",
    "gbce_beta",
    "impression_bce_loss",
]


def _neg_mask(neg_logits: torch.Tensor, neg_mask: torch.Tensor | None) -> torch.Tensor:
    if neg_logits.ndim != 2:
        raise ValueError(f"neg_logits must be 2-D (B, n), got shape {tuple(neg_logits.shape)}")
    if neg_mask is None:
        return torch.ones(neg_logits.shape, dtype=torch.bool, device=neg_logits.device)
    if neg_mask.shape != neg_logits.shape:
        raise ValueError(
            f"neg_mask must have the shape of neg_logits {tuple(neg_logits.shape)}, "
            f"got {tuple(neg_mask.shape)}"
        )
    return neg_mask.to(torch.bool)


def _check_pos(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> None:
    if pos_logits.shape != (neg_logits.shape[0],):
        raise ValueError(
            f"pos_logits must have shape ({neg_logits.shape[0]},), got {tuple(pos_logits.shape)}"
        )


def bce_sampled_loss(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, neg_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy with sampled negatives: "is this item good?".

    Per row ``-log sigma(s_p) - sum_{valid j} log(1 - sigma(s_j))`` (the pointwise loss of the
    lecture with label 1 on the positive and 0 on each negative; with one negative this is
    SASRec's loss), averaged over rows.

    Args:
        pos_logits: ``(B,)``.
        neg_logits: ``(B, n)``.
        neg_mask: ``(B, n)`` bool, True = valid negative (default: all valid).
    """
    _check_pos(pos_logits, neg_logits)
    valid = _neg_mask(neg_logits, neg_mask)
    # -log sigma(x) = softplus(-x); -log(1 - sigma(x)) = softplus(x)
    neg = torch.where(valid, F.softplus(neg_logits), torch.zeros_like(neg_logits)).sum(1)  # (B,)
    return (F.softplus(-pos_logits) + neg).mean()


def gbce_beta(n_negatives: int, n_items: int, t: float) -> float:
    """The ``beta = alpha (t (1 - 1/alpha) + 1/alpha)`` of gBCE, ``alpha = n / (N - 1)``."""
    if n_items < 2 or n_negatives < 1:
        raise ValueError(f"need n_items >= 2 and n_negatives >= 1, got {n_items}, {n_negatives}")
    if not (0.0 <= t <= 1.0):
        raise ValueError(f"t must be in [0, 1], got {t}")
    alpha = min(n_negatives / (n_items - 1), 1.0)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def gbce_loss(
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    neg_mask: torch.Tensor | None = None,
    *,
    beta: float,
) -> torch.Tensor:
    """Generalised BCE (Petrov & Macdonald 2023): the positive's probability raised to ``beta``.

    Per row ``-beta log sigma(s_p) - sum_{valid j} log(1 - sigma(s_j))``, averaged over rows;
    ``beta = 1`` is :func:`bce_sampled_loss`. See :func:`gbce_beta`.
    """
    if not (0.0 < beta <= 1.0):
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    _check_pos(pos_logits, neg_logits)
    valid = _neg_mask(neg_logits, neg_mask)
    neg = torch.where(valid, F.softplus(neg_logits), torch.zeros_like(neg_logits)).sum(1)  # (B,)
    return (beta * F.softplus(-pos_logits) + neg).mean()


def bpr_loss(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, neg_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """BPR: "which of the two is better?".

    Per row the mean over its valid negatives of ``-log sigma(s_p - s_j)``; then the mean over
    rows that have at least one valid negative (0 if none has).

    Args:
        pos_logits: ``(B,)``.
        neg_logits: ``(B, n)``.
        neg_mask: ``(B, n)`` bool, True = valid negative (default: all valid).
    """
    _check_pos(pos_logits, neg_logits)
    valid = _neg_mask(neg_logits, neg_mask)
    # -log sigma(s_p - s_j) = softplus(s_j - s_p)
    pair = F.softplus(neg_logits - pos_logits[:, None])  # (B, n)
    pair = torch.where(valid, pair, torch.zeros_like(pair))
    n_valid = valid.sum(1)  # (B,)
    has = n_valid > 0
    per_row = pair.sum(1) / n_valid.clamp(min=1)  # (B,)
    n_rows = has.sum()
    return torch.where(has, per_row, torch.zeros_like(per_row)).sum() / n_rows.clamp(min=1)


def impression_bce_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Impression-aware pointwise BCE on shown items only (the ranking loss that folds).

    ``-y log sigma(x) - (1 - y) log(1 - sigma(x))``, averaged over impressions; with
    ``weights``, the weighted mean ``sum w l / sum w``.

    Args:
        logits: ``(M,)`` scores of shown (user, item) pairs.
        labels: ``(M,)`` labels in ``[0, 1]`` (1 = engaged).
        weights: optional ``(M,)`` non-negative weights (e.g. inverse propensities).
    """
    if logits.ndim != 1:
        raise ValueError(f"logits must be 1-D (M,), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape:
        raise ValueError(f"labels must have shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
    y = labels.to(logits.dtype)
    if y.numel() and (float(y.min()) < 0 or float(y.max()) > 1):
        raise ValueError(
            f"labels must be in [0, 1], got range [{float(y.min())}, {float(y.max())}]"
        )
    per = F.softplus(logits) - y * logits  # (M,) = -y log s(x) - (1 - y) log(1 - s(x))
    if weights is None:
        return per.mean()
    if weights.shape != logits.shape:
        raise ValueError(
            f"weights must have shape {tuple(logits.shape)}, got {tuple(weights.shape)}"
        )
    w = weights.to(logits.dtype)
    if w.numel() and float(w.min()) < 0:
        raise ValueError(f"weights must be >= 0, got min {float(w.min())}")
    return (w * per).sum() / w.sum().clamp(min=torch.finfo(w.dtype).tiny)


class SampledBinaryLoss(_SampledBase):
    """Sampled BCE, BPR or gBCE with the same negatives as :class:`SampledSoftmaxLoss`.

    The logQ correction does not apply to these losses: ``config.logq`` must be ``"none"``.

    Args:
        config: negative sources (``logq="none"``).
        n_items: catalog size ``N``.
        similarity: the score function.
        kind: ``"bce"``, ``"bpr"`` or ``"gbce"``.
        gbce_t: calibration parameter ``t`` of gBCE (Petrov & Macdonald 2023).
    """

    def __init__(
        self,
        config: NegativeSamplerConfig,
        n_items: int,
        similarity: Similarity,
        kind: Literal["bce", "bpr", "gbce"] = "bce",
        gbce_t: float = 0.75,
    ) -> None:
        super().__init__(config, n_items, similarity)
        if kind not in ("bce", "bpr", "gbce"):
            raise ValueError(f"kind must be 'bce', 'bpr' or 'gbce', got {kind!r}")
        if config.logq != "none":
            raise ValueError(
                f"logq must be 'none' for {kind} (no logQ for binary losses), got {config.logq!r}"
            )
        if not (0.0 <= gbce_t <= 1.0):
            raise ValueError(f"gbce_t must be in [0, 1], got {gbce_t}")
        self.kind = kind
        self.gbce_t = float(gbce_t)

    def forward(
        self,
        user_vecs: torch.Tensor,
        pos_ids: torch.Tensor,
        pos_vecs: torch.Tensor,
        encode_items: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        frequency: FrequencyLike | None = None,
        user_positive_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of a batch; arguments as in :meth:`SampledSoftmaxLoss.forward`."""
        q, pos_logit, neg, (rows, cols) = self._scores(
            user_vecs, pos_ids, pos_vecs, encode_items, generator, frequency,
            user_positive_ids, apply_log_q=False,
        )  # fmt: skip
        logits = q @ neg.keys.T  # (B, M)
        valid = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        if rows.numel():
            valid[rows, cols] = False
        self._after(neg)
        if self.kind == "bce":
            return bce_sampled_loss(pos_logit, logits, valid)
        if self.kind == "bpr":
            return bpr_loss(pos_logit, logits, valid)
        beta = gbce_beta(neg.per_row, self.n_items, self.gbce_t)
        return gbce_loss(pos_logit, logits, valid, beta=beta)


class ImpressionBCELoss(nn.Module):
    """Pointwise BCE of ``similarity(user, item)`` on impressions (shown items only)."""

    def __init__(self, similarity: Similarity) -> None:
        super().__init__()
        self.similarity = similarity

    def forward(
        self,
        user_vecs: torch.Tensor,
        item_vecs: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss over ``M`` impressions: ``user_vecs``, ``item_vecs`` ``(M, d)``, ``labels`` ``(M,)``."""
        return impression_bce_loss(self.similarity.paired(user_vecs, item_vecs), labels, weights)
