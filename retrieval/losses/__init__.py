"""Losses of the candidate generator: full softmax, sampled softmax with logQ, BCE, BPR.

One package, split by concept:

- :mod:`retrieval.losses.negatives`: where the negatives of a sampled loss come from
  (uniform, popularity, in-batch, memory queue, cross-device), ``Q(d)`` of their mixture and
  the accidental-hit masks (:class:`NegativeSamplerConfig`);
- :mod:`retrieval.losses.softmax`: the full softmax over the catalog and the fused sampled
  softmax with the lecture's logQ variants (:class:`SampledSoftmaxLoss`);
- :mod:`retrieval.losses.pointwise`: sampled BCE, gBCE, BPR and the impression-aware BCE.

:class:`RetrievalLossConfig` and :func:`build_loss` (here) switch between them by config;
every public name is importable from ``retrieval.losses``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from retrieval.losses._common import LOGQ_SCALES, LOGQ_VARIANTS, FrequencyLike, ItemSource
from retrieval.losses.negatives import NegativeSamplerConfig
from retrieval.losses.pointwise import (
    ImpressionBCELoss,
    SampledBinaryLoss,
    bce_sampled_loss,
    bpr_loss,
    gbce_beta,
    gbce_loss,
    impression_bce_loss,
)
from retrieval.losses.softmax import (
    FullSoftmaxLoss,
    SampledSoftmaxLoss,
    full_softmax_loss,
    sampled_softmax_loss,
)
from retrieval.similarity import Similarity

__all__ = [
    "LOGQ_VARIANTS",
    "LOGQ_SCALES",
    "LOSS_KINDS",
    "FrequencyLike",
    "ItemSource",
    "NegativeSamplerConfig",
    "RetrievalLossConfig",
    "full_softmax_loss",
    "sampled_softmax_loss",
    "SampledSoftmaxLoss",
    "SampledBinaryLoss",
    "FullSoftmaxLoss",
    "ImpressionBCELoss",
    "bce_sampled_loss",
    "bpr_loss",
    "gbce_loss",
    "gbce_beta",
    "impression_bce_loss",
    "build_loss",
]

LOSS_KINDS = ("full_softmax", "sampled_softmax", "bce", "bpr", "gbce", "impression_bce")


@dataclass(frozen=True)
class RetrievalLossConfig:
    """Which loss trains the candidate generator.

    Attributes:
        kind: ``"full_softmax"``, ``"sampled_softmax"``, ``"bce"``, ``"bpr"``, ``"gbce"`` or
            ``"impression_bce"``.
        negatives: negative sources (and logQ variant) of the sampled losses; BCE, BPR and
            gBCE need ``logq="none"``.
        chunk_size: catalog chunk of the full softmax.
        gbce_t: calibration ``t`` of gBCE.
    """

    kind: Literal["full_softmax", "sampled_softmax", "bce", "bpr", "gbce", "impression_bce"] = (
        "sampled_softmax"
    )
    negatives: NegativeSamplerConfig = field(default_factory=NegativeSamplerConfig)
    chunk_size: int = 8192
    gbce_t: float = 0.75

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {LOSS_KINDS}, got {self.kind!r}")
        if not isinstance(self.negatives, NegativeSamplerConfig):
            raise ValueError(
                f"negatives must be a NegativeSamplerConfig, got {type(self.negatives)}"
            )
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not (0.0 <= self.gbce_t <= 1.0):
            raise ValueError(f"gbce_t must be in [0, 1], got {self.gbce_t}")
        if self.kind in ("bce", "bpr", "gbce") and self.negatives.logq != "none":
            raise ValueError(
                f"kind={self.kind!r} takes no logQ correction: set negatives.logq='none', "
                f"got {self.negatives.logq!r}"
            )


def build_loss(config: RetrievalLossConfig, n_items: int, similarity: Similarity) -> nn.Module:
    """The loss module a :class:`RetrievalLossConfig` names.

    ``full_softmax``, ``sampled_softmax``, ``bce``, ``bpr`` and ``gbce`` share the call
    ``loss(user_vecs, pos_ids, pos_vecs, encode_items, generator, frequency, user_positive_ids)``;
    ``impression_bce`` is called ``loss(user_vecs, item_vecs, labels, weights)`` on impressions.
    """
    if config.kind == "full_softmax":
        return FullSoftmaxLoss(n_items, similarity, config.chunk_size)
    if config.kind == "sampled_softmax":
        return SampledSoftmaxLoss(config.negatives, n_items, similarity)
    if config.kind in ("bce", "bpr", "gbce"):
        return SampledBinaryLoss(config.negatives, n_items, similarity, config.kind, config.gbce_t)
    return ImpressionBCELoss(similarity)
