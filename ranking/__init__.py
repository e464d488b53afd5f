"""ranking: the ranker of the multi-stage recommender (early binding of user, item, context).

- :class:`Ranker` / :class:`RankerConfig`: user side + item side (cached) + pair-level cross
  features, DCN-v2 cross layers and an MLP; ``score`` (candidates), ``score_all`` (the whole
  catalog, fast), ``top_k``.
- :func:`train_ranker` / :class:`RankerTrainConfig`: impression-aware pointwise BCE, optional
  pairwise loss and extra heads, early stopping, atomic checkpoints
  (:func:`save_ranker`, :func:`load_ranker`).
- :class:`ItemStatistics`: item counts from the training log (saved with the ranker);
  :class:`CrossFeatures`: the early-binding crosses.
- :func:`benchmark_score_all`: pairs per second of the full-catalog path.

Imports only :mod:`simenv` (its data types and the log), never ``retrieval``, ``agents`` or
``benchmarks``.
"""

from ranking.features import CrossFeatures, ItemStatistics
from ranking.model import HEADS, Ranker, RankerConfig, benchmark_score_all
from ranking.train import (
    RankerTrainConfig,
    SlateData,
    TrainHistory,
    evaluate_ranker,
    load_ranker,
    log_loss,
    pairwise_logistic,
    pointwise_bce,
    roc_auc,
    save_ranker,
    slate_data,
    train_ranker,
)

__all__ = [
    "HEADS",
    "CrossFeatures",
    "ItemStatistics",
    "Ranker",
    "RankerConfig",
    "RankerTrainConfig",
    "SlateData",
    "TrainHistory",
    "benchmark_score_all",
    "evaluate_ranker",
    "load_ranker",
    "log_loss",
    "pairwise_logistic",
    "pointwise_bce",
    "roc_auc",
    "save_ranker",
    "slate_data",
    "train_ranker",
]
