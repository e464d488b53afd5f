"""Training of the ranker on impressions: pointwise BCE, optional pairwise loss and extra heads.

The lecture's ranking losses ("Напоминание: лоссы ранжирования"):

- impression-aware: learn from what was shown (every shown item of a slate is an example);
- pointwise: ``-y log sigmoid(x) - (1 - y) log(1 - sigmoid(x))`` per shown item, ``y`` the click;
- pairwise: ``-log sigmoid(x_1 - x_2)`` for every pair of shown items of one slate with
  ``y_1 > y_2`` (clicked above shown-and-not-clicked).

A logging policy shows a small part of the catalog, while the single-stage agent scores all of
it (exposure bias: the ranker has never been told anything about the never-shown items, and its
argmax over the catalog lands on spuriously high scores among them). ``catalog_negatives``
appends uniformly drawn released catalog items to every training slate as pointwise "not
clicked" examples (:class:`RankerTrainConfig`).

:func:`train_ranker` fits the item statistics on the training log, trains with AdamW (progress
bar, early stopping on validation AUC or log loss, atomic checkpoints with the config,
``threads`` option) and leaves the ranker with its best validation weights. Popularity features
of a training example leave out the example's own impression (leave-one-out), so a label never
leaks into its own features.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch.nn import functional as F  # noqa: N812
from tqdm.auto import tqdm

from ranking.features import ItemStatistics
from ranking.model import Ranker, RankerConfig, _obs_to_torch
from simenv.checkpoint import (
    catalog_fingerprint,
    check_weights,
    load_checkpoint,
    payload_digest,
    save_checkpoint,
)
from simenv.config import check_range as _check
from simenv.device import autocast, check_device, check_precision, resolve_device, to_device
from simenv.history import EventSequences, impression_examples, take_obs
from simenv.log import ImpressionLog
from simenv.types import Columns, EventType, ItemCatalog, Obs

#: The most catalog negatives a training slate may get (``RankerTrainConfig``).
MAX_CATALOG_NEGATIVES = 100_000

__all__ = [
    "MAX_CATALOG_NEGATIVES",
    "RankerTrainConfig",
    "TrainHistory",
    "SlateData",
    "slate_data",
    "pointwise_bce",
    "pairwise_logistic",
    "roc_auc",
    "log_loss",
    "evaluate_ranker",
    "examination_estimate",
    "POSITION_DEBIAS",
    "train_ranker",
    "save_ranker",
    "load_ranker",
    "catalog_fingerprint",
]

CHECKPOINT_FORMAT = "ranking.Ranker"
POSITION_DEBIAS = ("none", "feature", "ipw")


@dataclass(frozen=True)
class RankerTrainConfig:
    """How the ranker is trained.

    Attributes:
        epochs: maximum passes over the training slates.
        batch_size: slates (requests) per step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_clip: max gradient norm (None: no clipping).
        history_length: L, events in each training observation (the env's history length).
        pointwise_weight: weight of the pointwise click BCE.
        pairwise_weight: weight of the in-slate pairwise loss ``-log sigmoid(s_pos - s_neg)``
            (0: off).
        head_weight: weight of the extra heads' losses (like, dislike: BCE on clicked items;
            watch: squared error of ``log(1 + minutes)`` on clicked items).
        leave_one_out: popularity features of a training example without its own impression.
        position_debias: how the position bias of the labels is handled (clicks at the top of a
            slate are inflated by the examination effect, whatever the item):
            ``"none"``; ``"feature"``: the slate position is a training-time feature, a learned
            click-logit offset per position (0 at the top), and the ranker is served at the
            top position (the offsets are dropped; YouTube's shallow position tower in its
            additive form); ``"ipw"``: clicks weighted by the inverse of their position's
            examination probability, estimated from the training log as the click rate at
            that position over the click rate at the top (clipped to [0.05, 1]; weights
            normalised to mean 1 over the examples).
        catalog_negatives: extra "not clicked" items appended to each training slate, drawn
            uniformly at random (with replacement) from the items released by the slate's
            request time (its observation's ``context[:, 0]``; the rule of serving:
            ``release_time <= t``), a fresh draw per slate and epoch (0: off). Their labels
            are all 0 (click, like, dislike, watch); their statistics features are the served
            ones (no leave-one-out: they were not shown). They enter only the pointwise click
            BCE: not the in-slate pairwise loss (they were never examined, so "clicked above
            not clicked under the same examination" does not hold for them), and not the
            extra heads' losses (those are conditional on a click). Under
            ``position_debias="feature"`` they take the top position's offset (0): the ranker
            is served at the top, and a sampled item is a stand-in for "what the agent would
            show first" (their logit is pushed down by itself, with no position to blame);
            under ``"ipw"`` their weight is 1 (a non-click). A draw that equals an item shown
            in the same slate gets weight 0 (its label is the shown one's). The draws come
            from a generator seeded by ``seed`` (and the process's rank), separate from the
            shuffles', so the slates' order is the same with and without negatives.
        catalog_negative_weight: weight of each sampled item's BCE term. The pointwise term is
            ``(sum_shown w l + catalog_negative_weight * sum_sampled l) / sum_shown w`` (``w``:
            1, or the inverse examination weights): the shown items' part is exactly the term
            without negatives, and each sampled item counts as ``catalog_negative_weight``
            shown non-clicks.
        early_stopping: ``"auc"`` (maximise validation AUC of clicks) or ``"logloss"``.
        patience: epochs without validation improvement before stopping (0: never stop early).
        restore_best: end with the weights of the best validation epoch.
        max_slates_per_epoch: cap on slates drawn per epoch (None: all).
        eval_batch_size: slates per scoring call during validation.
        threads: ``torch.set_num_threads`` during training (None: leave as is).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (see :mod:`simenv.device`):
            the ranker is moved there and stays there (its scoring runs there too; results
            come back as numpy).
        precision: ``"fp32"`` or ``"bf16"`` (bfloat16 autocast of the training forward;
            weights and optimiser state stay float32).
        seed: seed of the shuffles.
        progress: show a tqdm bar.
        checkpoint_dir: write ``ranker.pt`` there (atomically) whenever validation improves
            (every epoch without validation data).
    """

    epochs: int = 10
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    grad_clip: float | None = 5.0
    history_length: int = 32
    pointwise_weight: float = 1.0
    pairwise_weight: float = 0.0
    head_weight: float = 1.0
    leave_one_out: bool = True
    position_debias: str = "none"
    catalog_negatives: int = 0
    catalog_negative_weight: float = 1.0
    early_stopping: str = "auc"
    patience: int = 2
    restore_best: bool = True
    max_slates_per_epoch: int | None = None
    eval_batch_size: int = 2048
    threads: int | None = None
    device: str = "cpu"
    precision: str = "fp32"
    seed: int = 0
    progress: bool = True
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        check_device("device", self.device)
        check_precision("precision", self.precision)
        _check("epochs", self.epochs, 1, 1_000_000, integer=True)
        _check("batch_size", self.batch_size, 1, 10_000_000, integer=True)
        _check("lr", self.lr, 1e-12, 10.0)
        _check("weight_decay", self.weight_decay, 0.0, 10.0)
        if self.grad_clip is not None:
            _check("grad_clip", self.grad_clip, 1e-12, 1e12)
        _check("history_length", self.history_length, 1, 4096, integer=True)
        _check("pointwise_weight", self.pointwise_weight, 0.0, 1e6)
        _check("pairwise_weight", self.pairwise_weight, 0.0, 1e6)
        _check("head_weight", self.head_weight, 0.0, 1e6)
        if self.pointwise_weight == 0 and self.pairwise_weight == 0:
            raise ValueError("pointwise_weight and pairwise_weight cannot both be 0")
        if self.position_debias not in POSITION_DEBIAS:
            raise ValueError(
                f"position_debias must be one of {POSITION_DEBIAS}, got {self.position_debias!r}"
            )
        _check("catalog_negatives", self.catalog_negatives, 0, MAX_CATALOG_NEGATIVES, integer=True)
        _check("catalog_negative_weight", self.catalog_negative_weight, 0.0, 1e6)
        if self.early_stopping not in ("auc", "logloss"):
            raise ValueError(
                f"early_stopping must be 'auc' or 'logloss', got {self.early_stopping!r}"
            )
        _check("patience", self.patience, 0, 1_000_000, integer=True)
        if self.max_slates_per_epoch is not None:
            _check("max_slates_per_epoch", self.max_slates_per_epoch, 1, 1e12, integer=True)
        _check("eval_batch_size", self.eval_batch_size, 1, 10_000_000, integer=True)
        if self.threads is not None:
            _check("threads", self.threads, 1, 4096, integer=True)
        _check("seed", self.seed, 0, 2**63 - 1, integer=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return dataclasses.asdict(self)


@dataclass
class TrainHistory:
    """What happened during :func:`train_ranker`.

    Attributes:
        train_loss: mean training loss of each epoch.
        valid_auc: validation AUC of clicks after each epoch (empty without validation data).
        valid_logloss: validation log loss of clicks after each epoch.
        best_epoch: epoch (0-based) whose weights the ranker ends with (-1: the last one).
        best_metric: its early-stopping metric (NaN without validation data).
        stopped_early: whether patience ran out before ``epochs``.
        seconds: wall time of the training.
        slates_per_s: training throughput.
        n_train_slates: training slates (requests) available.
        n_valid_slates: validation slates.
        position_offsets: the learned click-logit offset of each slate position
            (``position_debias="feature"``; position 0 is the reference, 0).
        examination: the estimated examination probability of each position
            (``position_debias="ipw"``; 1 at the top).
    """

    train_loss: list[float] = field(default_factory=list)
    valid_auc: list[float] = field(default_factory=list)
    valid_logloss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    best_metric: float = math.nan
    stopped_early: bool = False
    seconds: float = 0.0
    slates_per_s: float = 0.0
    n_train_slates: int = 0
    n_valid_slates: int = 0
    position_offsets: list[float] = field(default_factory=list)
    examination: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- data
@dataclass(frozen=True, eq=False)
class SlateData:
    """Shown slates of a log with the observation at each request and every feedback.

    Attributes:
        obs: observation dict (R, L) of each request (history strictly before it).
        items: int64 (R, k) shown items, by slate position.
        clicked: float32 (R, k) 1 for any engagement (click, like, dislike).
        liked: float32 (R, k).
        disliked: float32 (R, k).
        watch: float32 (R, k) watch minutes.
    """

    obs: dict[str, np.ndarray]
    items: np.ndarray
    clicked: np.ndarray
    liked: np.ndarray
    disliked: np.ndarray
    watch: np.ndarray

    def __len__(self) -> int:
        return int(self.items.shape[0])


def slate_data(log: ImpressionLog, sequences: EventSequences, history_length: int) -> SlateData:
    """One example per request of ``log`` (slates of one size), as :class:`SlateData`."""
    ex = impression_examples(log, sequences, history_length)
    c = log.columns
    # the same row order as impression_examples: by request, then position
    order = np.lexsort((c[Columns.POSITION], c[Columns.REQUEST]))
    shape = ex.items.shape
    fb = c[Columns.FEEDBACK][order].reshape(shape)
    items = c[Columns.ITEM][order].reshape(shape)
    if not np.array_equal(items, ex.items):  # pragma: no cover - guards the alignment
        raise RuntimeError("feedback rows do not line up with impression_examples")
    return SlateData(
        obs=ex.obs,
        items=ex.items,
        clicked=ex.labels.astype(np.float32),
        liked=(fb == EventType.LIKE).astype(np.float32),
        disliked=(fb == EventType.DISLIKE).astype(np.float32),
        watch=c[Columns.WATCH][order].reshape(shape).astype(np.float32),
    )


# ---------------------------------------------------------------------------- losses
def pointwise_bce(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean pointwise cross-entropy ``-y log sigmoid(x) - (1 - y) log(1 - sigmoid(x))``.

    Args:
        logits: any shape.
        labels: same shape, in [0, 1].
        mask: optional same-shape 0/1 weights (mean over the masked-in entries).
    """
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    if mask is None:
        return loss.mean()
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


def pairwise_logistic(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean ``-log sigmoid(s_i - s_j)`` over pairs of one slate with ``y_i > y_j``.

    Args:
        scores: (B, k) scores of the shown items.
        labels: (B, k) labels (clicks).

    Returns:
        The mean over all such pairs of the batch (0 if there is none).
    """
    diff = scores[:, :, None] - scores[:, None, :]  # (B, k, k): s_i - s_j
    pair = (labels[:, :, None] > labels[:, None, :]).float()  # y_i > y_j
    loss = F.softplus(-diff)  # -log sigmoid(s_i - s_j)
    return (loss * pair).sum() / pair.sum().clamp_min(1.0)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN without both classes."""
    y = np.asarray(labels).reshape(-1) > 0
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks of ties
    # Mann-Whitney U of the positives / (n_pos n_neg)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of logits (numerically stable)."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    if y.size == 0:
        return math.nan
    # -y log s(x) - (1-y) log(1-s(x)) = softplus(x) - y x
    return float(np.mean(np.logaddexp(0.0, x) - y * x))


# ---------------------------------------------------------------------------- evaluation
def evaluate_ranker(ranker: Ranker, data: SlateData, batch_size: int = 2048) -> dict[str, float]:
    """Validation figures of the click head on shown slates: AUC, log loss, click rate.

    ``auc_score`` is the AUC of the combined score (equal to ``auc`` with the click head alone).
    """
    was_training = ranker.training
    ranker.eval()
    heads, scores = [], []
    for s in range(0, len(data), batch_size):
        rows = np.arange(s, min(len(data), s + batch_size))
        obs = take_obs(data.obs, rows)
        h = ranker.head_outputs(obs, data.items[rows])  # (b, k, n_heads)
        heads.append(h[..., 0])
        scores.append(ranker.combine(torch.from_numpy(h)).numpy())
    if was_training:
        ranker.train()
    logit = np.concatenate(heads) if heads else np.zeros((0,))
    score = np.concatenate(scores) if scores else np.zeros((0,))
    y = data.clicked
    return {
        "auc": roc_auc(y, logit),
        "auc_score": roc_auc(y, score),
        "logloss": log_loss(y, logit),
        "click_rate": float(y.mean()) if y.size else math.nan,
        "n": float(y.size),
    }


# ---------------------------------------------------------------------------- training
def examination_estimate(data: SlateData) -> np.ndarray:
    """Examination probability of each slate position: click rate there over the top's.

    Float64 (k,), 1 at the top, clipped to [0.05, 1]. Under a behaviour policy that orders
    items independently of their appeal this is the position effect alone; a policy that puts
    its favourites first inflates the top's click rate as well (the estimate then overcorrects).
    """
    ctr = data.clicked.mean(axis=0).astype(np.float64)  # (k,)
    if ctr.size == 0 or ctr[0] <= 0:
        return np.ones(ctr.size)
    return np.clip(ctr / ctr[0], 0.05, 1.0)


class _CatalogNegatives:
    """Uniform draws of released catalog items for each training slate (``catalog_negatives``).

    Args:
        release_time: float32 (N,) the catalog's release times.
        n: items drawn per slate.
        rng: the generator of the draws (seeded by the caller).
    """

    def __init__(self, release_time: np.ndarray, n: int, rng: np.random.Generator) -> None:
        rt = np.asarray(release_time, dtype=np.float32)
        self.order = np.argsort(rt, kind="stable")  # items by release time
        self.sorted_release = rt[self.order]
        self.n = int(n)
        self.rng = rng

    def draw(self, times: np.ndarray) -> np.ndarray:
        """int64 (B, n): uniform with replacement over the items released by each time.

        The items released by ``t`` (``release_time <= t``, as served) are a prefix of the
        release order; a row before every release (no shown slate can be) draws from all.
        """
        t = np.asarray(times, dtype=np.float32)
        n_rel = np.searchsorted(self.sorted_release, t, side="right")  # (B,)
        n_rel = np.where(n_rel > 0, n_rel, self.order.size)
        u = self.rng.random((t.size, self.n))  # (B, n) in [0, 1)
        pos = np.minimum((u * n_rel[:, None]).astype(np.int64), n_rel[:, None] - 1)
        return self.order[pos]


def _negative_rng(config: RankerTrainConfig, rank: int, world: int) -> np.random.Generator:
    """The generator of the catalog negatives: from ``config.seed``, apart from the shuffles'."""
    return np.random.default_rng(
        np.random.SeedSequence([config.seed, 0x4E45] + ([rank] if world > 1 else []))
    )


def _batch_tensors(
    stats: ItemStatistics,
    data: SlateData,
    rows: np.ndarray,
    config: RankerTrainConfig,
    negatives: _CatalogNegatives | None = None,
) -> dict[str, Any]:
    """The tensors of one training batch, on the CPU (numpy in, torch out).

    With ``negatives`` (a sampler of ``config.catalog_negatives`` items per slate), the sampled
    items follow the k shown ones in ``items`` (b, k + m), with zero labels and statistics
    features without leave-one-out; ``n_shown`` is k and ``negative_mask`` (b, m) is 0 where a
    draw equals an item shown in the same slate, 1 elsewhere.
    """
    items = data.items[rows]
    clicked, liked = data.clicked[rows], data.liked[rows]
    disliked, watch = data.disliked[rows], data.watch[rows]
    exclude = (clicked, liked, disliked, watch) if config.leave_one_out else None
    obs = take_obs(data.obs, rows)
    item_stats = stats.features(items, exclude=exclude)
    out: dict[str, Any] = {"n_shown": int(items.shape[1])}
    if negatives is not None and negatives.n > 0:
        neg = negatives.draw(obs[Obs.CONTEXT][:, 0])  # (b, m) released by the request time
        mask = ~(neg[:, :, None] == items[:, None, :]).any(axis=2)
        zeros = np.zeros(neg.shape, np.float32)
        items = np.concatenate([items, neg], axis=1)
        item_stats = np.concatenate([item_stats, stats.features(neg)], axis=1)
        clicked, liked, disliked, watch = (
            np.concatenate([x, zeros], axis=1) for x in (clicked, liked, disliked, watch)
        )
        out["negative_mask"] = torch.from_numpy(mask.astype(np.float32))
    out.update(
        {
            "obs": _obs_to_torch(obs),
            "items": torch.from_numpy(items),  # (b, k [+ m])
            "item_stats": torch.from_numpy(item_stats),
            "clicked": torch.from_numpy(clicked),  # (b, k [+ m])
            "liked": torch.from_numpy(liked),
            "disliked": torch.from_numpy(disliked),
            "watch": torch.from_numpy(watch),
        }
    )
    return out


def _batch_loss(
    ranker: Ranker,
    batch: dict[str, Any],
    config: RankerTrainConfig,
    forward: torch.nn.Module | None = None,
    position_offsets: torch.Tensor | None = None,
    click_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of one batch (tensors already on the ranker's device).

    ``forward``: the module whose call runs the ranker (its DistributedDataParallel wrapper
    under torch.distributed; the ranker itself otherwise). ``position_offsets`` (k,): added to
    the click logit of each position (position-as-a-feature training); ``click_weights`` (k,):
    weight of a click at each position (inverse examination). Sampled catalog negatives (the
    batch's items after the first ``n_shown``) enter the pointwise term only (see
    :class:`RankerTrainConfig`).
    """
    fwd = ranker if forward is None else forward
    out = fwd(batch["obs"], batch["items"], batch["item_stats"])  # (b, k [+ m], n_heads)
    out = out.float()  # bf16 autocast: the losses in float32
    k = int(batch.get("n_shown", out.shape[1]))
    neg_logit = out[:, k:, 0] if "negative_mask" in batch else None  # (b, m) sampled items
    out = out[:, :k]  # the shown items: everything below is the loss without negatives
    y = batch["clicked"][:, :k]
    click_logit = out[..., 0]
    if position_offsets is not None:
        click_logit = click_logit + position_offsets[None, :]  # (b, k): logit + offset of j
    loss = out.new_zeros(())
    if config.pointwise_weight:
        w = None
        if click_weights is not None:  # clicks weighted by 1 / examination, others by 1
            w = torch.where(y > 0, click_weights[None, :].expand_as(y), torch.ones_like(y))
        if neg_logit is None:
            loss = loss + config.pointwise_weight * pointwise_bce(click_logit, y, w)
        else:  # sampled items: label 0, the top's offset (none), catalog_negative_weight each
            shown = F.binary_cross_entropy_with_logits(click_logit, y, reduction="none")
            sampled = F.softplus(neg_logit) * batch["negative_mask"]  # BCE of label 0
            denom = float(max(y.numel(), 1)) if w is None else w.sum().clamp_min(1.0)
            num = (shown if w is None else shown * w).sum()
            num = num + config.catalog_negative_weight * sampled.sum()
            loss = loss + config.pointwise_weight * num / denom
    if config.pairwise_weight:  # shown items only
        loss = loss + config.pairwise_weight * pairwise_logistic(click_logit, y)
    if config.head_weight and ranker.n_heads > 1:  # given a click: shown items only
        for j, name in enumerate(ranker.config.heads[1:], start=1):
            o = out[..., j]
            if name == "like":
                extra = pointwise_bce(o, batch["liked"][:, :k], y)  # like given click
            elif name == "dislike":
                extra = pointwise_bce(o, batch["disliked"][:, :k], y)
            else:  # watch: log(1 + minutes) given click, squared error
                target = torch.log1p(batch["watch"][:, :k])
                extra = ((o - target) ** 2 * y).sum() / y.sum().clamp_min(1.0)
            loss = loss + config.head_weight * extra
    return loss


def _better(metric: str, new: float, best: float) -> bool:
    if math.isnan(new):
        return False
    if math.isnan(best):
        return True
    return new > best if metric == "auc" else new < best


def train_ranker(
    ranker: Ranker,
    train_log: ImpressionLog,
    sequences: EventSequences,
    config: RankerTrainConfig | None = None,
    valid_log: ImpressionLog | None = None,
) -> TrainHistory:
    """Train ``ranker`` in place on the impressions of ``train_log``.

    Args:
        ranker: the ranker (its item statistics are replaced by those of ``train_log``).
        train_log: training impressions (slates of one size).
        sequences: every user's engagement events (build it from the whole log, training and
            validation: an observation only ever holds the events strictly before its
            request, so later events do not leak into earlier examples).
        config: training options.
        valid_log: validation impressions (later in time than ``train_log``) for early
            stopping; None trains for ``config.epochs`` epochs.

    Returns:
        The :class:`TrainHistory`.
    """
    config = RankerTrainConfig() if config is None else config
    if not isinstance(ranker, Ranker):
        raise ValueError(f"ranker must be a Ranker, got {type(ranker).__name__}")
    if not isinstance(config, RankerTrainConfig):
        raise ValueError(f"config must be a RankerTrainConfig, got {type(config).__name__}")
    if len(train_log) == 0:
        raise ValueError("train_log has no rows")
    device = resolve_device(config.device)
    before_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        ranker.to(device)
        return _train(ranker, train_log, sequences, config, valid_log, device)
    finally:
        torch.set_num_threads(before_threads)


def _train(
    ranker: Ranker,
    train_log: ImpressionLog,
    sequences: EventSequences,
    config: RankerTrainConfig,
    valid_log: ImpressionLog | None,
    device: torch.device,
) -> TrainHistory:
    t_start = time.perf_counter()
    rank, world = _world()
    if world > 1:  # each process reads its shard of the log: users with user % world == rank
        train_log = train_log.select(np.nonzero(train_log[Columns.USER] % world == rank)[0])
    local = ItemStatistics.from_log(train_log, ranker.n_items, ranker.config.stats_prior)
    ranker.set_statistics(_all_reduce_statistics(local, device) if world > 1 else local)
    stats = ranker.statistics  # a host copy (of the whole log's counts), read by every batch
    train = slate_data(train_log, sequences, config.history_length)
    valid = (
        slate_data(valid_log, sequences, config.history_length)
        if valid_log is not None and len(valid_log)
        else None
    )
    hist = TrainHistory(n_train_slates=len(train), n_valid_slates=len(valid) if valid else 0)
    rng = np.random.default_rng(
        np.random.SeedSequence([config.seed, 0x5A4C] + ([rank] if world > 1 else []))
    )
    groups: list[dict[str, Any]] = [{"params": list(ranker.parameters())}]
    k = int(train.items.shape[1])
    offsets = click_weights = free = None
    if config.position_debias == "feature":
        # offsets of positions 1..k-1, on the ranker's device
        free = torch.zeros(max(k - 1, 0), device=device, requires_grad=True)
        # a handful of scalars with a strong signal: 10x the learning rate, no decay
        groups.append({"params": [free], "weight_decay": 0.0, "lr": 10.0 * config.lr})
    elif config.position_debias == "ipw":
        exam = examination_estimate(train)
        inv = 1.0 / exam
        # normalise so that the weights average 1 over the training examples
        mean_w = float(np.mean(np.where(train.clicked > 0, inv[None, :], 1.0)))
        click_weights = torch.from_numpy((inv / mean_w).astype(np.float32)).to(device)
        hist.examination = [float(x) for x in exam]
    negatives = None
    if config.catalog_negatives:
        negatives = _CatalogNegatives(
            ranker.catalog.release_time,
            config.catalog_negatives,
            _negative_rng(config, rank, world),
        )
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    forward: torch.nn.Module = ranker
    if world > 1:
        # DistributedDataParallel: rank 0's weights everywhere, gradients averaged in backward
        # (the statistics buffers are already equal: no buffer broadcast per step)
        forward = torch.nn.parallel.DistributedDataParallel(
            ranker,
            device_ids=[device.index or 0] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=True,
        )
    metric = config.early_stopping
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs = 0
    n_per_epoch = len(train)
    if world > 1:  # the same number of steps on every process: the smallest shard's
        n = torch.tensor([n_per_epoch], dtype=torch.int64, device=_collective_device(device))
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        n_per_epoch = int(n.item())
        if n_per_epoch == 0:
            raise ValueError(f"a process has no training slates in its shard ({world} processes)")
    if config.max_slates_per_epoch is not None:
        n_per_epoch = min(n_per_epoch, config.max_slates_per_epoch)
    n_batches = -(-n_per_epoch // config.batch_size)
    slates_seen = 0
    bar = tqdm(
        total=config.epochs * n_batches,
        desc="train ranker",
        disable=not config.progress or rank != 0,
    )
    for epoch in range(config.epochs):
        ranker.train()
        perm = rng.permutation(len(train))[:n_per_epoch]
        total, count = 0.0, 0
        for s in range(0, n_per_epoch, config.batch_size):
            rows = perm[s : s + config.batch_size]
            # the one place where a batch moves to the device
            batch = to_device(_batch_tensors(stats, train, rows, config, negatives), device)
            if free is not None:
                offsets = torch.cat([free.new_zeros(1), free])  # (k,): 0 at the top
            with autocast(device, config.precision):
                loss = _batch_loss(ranker, batch, config, forward, offsets, click_weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(ranker.parameters(), config.grad_clip)
            opt.step()
            total += loss.detach() * rows.size  # on the device: no sync per step
            count += rows.size
            slates_seen += rows.size
            bar.update(1)
        if world > 1:  # the epoch's loss over every process's slates
            agg = torch.tensor([float(total), float(count)], dtype=torch.float64,
                               device=_collective_device(device))  # fmt: skip
            torch.distributed.all_reduce(agg)
            total, count = float(agg[0]), int(agg[1])
        hist.train_loss.append(float(total) / max(count, 1))
        ranker.eval()
        improved = True
        if valid is not None:
            res = evaluate_ranker(ranker, valid, config.eval_batch_size)
            hist.valid_auc.append(res["auc"])
            hist.valid_logloss.append(res["logloss"])
            value = res["auc"] if metric == "auc" else res["logloss"]
            improved = _better(metric, value, hist.best_metric)
            bar.set_postfix(
                loss=f"{hist.train_loss[-1]:.4f}",
                auc=f"{res['auc']:.4f}",
                ll=f"{res['logloss']:.4f}",
            )
            if improved:
                hist.best_metric = value
        else:
            bar.set_postfix(loss=f"{hist.train_loss[-1]:.4f}")
        if improved:
            hist.best_epoch = epoch
            bad_epochs = 0
            if config.restore_best:
                best_state = copy.deepcopy(ranker.state_dict())
            if config.checkpoint_dir is not None and rank == 0:
                save_ranker(
                    ranker,
                    Path(config.checkpoint_dir) / "ranker.pt",
                    extra={
                        "epoch": epoch,
                        "train_config": config.to_dict(),
                        "history": hist.to_dict(),
                    },
                )
        else:
            bad_epochs += 1
            if config.patience and bad_epochs >= config.patience:
                hist.stopped_early = epoch + 1 < config.epochs
                break
    bar.close()
    if free is not None:
        hist.position_offsets = [0.0] + [float(x) for x in free.detach().cpu()]
    if config.restore_best and best_state is not None:
        ranker.load_state_dict(best_state)
    ranker.eval()
    hist.seconds = time.perf_counter() - t_start
    hist.slates_per_s = slates_seen / max(hist.seconds, 1e-9)
    return hist


def _world() -> tuple[int, int]:
    """``(rank, world size)`` of the torch.distributed group; ``(0, 1)`` without one."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _collective_device(device: torch.device) -> torch.device:
    """Where small collective tensors live: the GPU under nccl, else the CPU (gloo)."""
    if torch.distributed.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda")
    return torch.device("cpu")


def _all_reduce_statistics(local: ItemStatistics, device: torch.device) -> ItemStatistics:
    """The statistics of the whole log from every process's shard (one all-reduce of counts)."""
    counts = np.stack([local.impressions, local.clicks, local.likes, local.dislikes, local.watch])
    t = torch.from_numpy(counts.astype(np.float64)).to(_collective_device(device))
    torch.distributed.all_reduce(t)
    c = t.cpu().numpy()
    return ItemStatistics(c[0], c[1], c[2], c[3], c[4], local.prior_strength)


# ---------------------------------------------------------------------------- checkpoints
def save_ranker(
    ranker: Ranker, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write the ranker (weights, statistics, config, catalog fingerprint) atomically.

    The project's one checkpoint format (:mod:`simenv.checkpoint`, format ``"ranking.Ranker"``):
    the file appears complete or not at all, and :func:`load_ranker` reads it with
    ``torch.load(weights_only=True)``.
    """
    return save_checkpoint(
        path,
        CHECKPOINT_FORMAT,
        ranker.state_dict(),
        ranker.config.to_dict(),
        catalog=ranker.catalog,
        extra=extra,
    )


def load_ranker(
    path: str | os.PathLike[str], catalog: ItemCatalog, device: str = "cpu"
) -> tuple[Ranker, dict[str, Any]]:
    """Read a checkpoint of :func:`save_ranker` for ``catalog``; returns ``(ranker, extra)``.

    Loads with ``weights_only=True`` (no code runs from the file) and checks everything
    before use (:func:`simenv.checkpoint.load_checkpoint`): the format and version, the
    SHA-256 of config, weights and extra saved with them (``torch.load`` itself does not
    notice a damaged byte inside a tensor), the catalog fingerprint; then every weight's name,
    dtype, shape and finiteness against the config (:func:`simenv.checkpoint.check_weights`).

    Args:
        path: the file.
        catalog: the catalog the ranker was saved for.
        device: where the loaded ranker lives (see :mod:`simenv.device`).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a ranker checkpoint, another format version, damaged or truncated,
            or saved for another catalog.
    """
    check_device("device", device)
    payload = load_checkpoint(path, CHECKPOINT_FORMAT, catalog)
    try:
        ranker = _ranker_from_payload(path, payload, catalog)
    except ValueError:
        raise
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:  # a field of another type
        raise ValueError(f"{path} is a damaged ranker checkpoint: {type(e).__name__}: {e}") from e
    ranker.to(resolve_device(device))
    return ranker, payload["extra"]


def _ranker_from_payload(
    path: str | os.PathLike[str], payload: dict[str, Any], catalog: ItemCatalog
) -> Ranker:
    """Build the ranker of a checked payload (see :func:`load_ranker`)."""
    for key in ("config", "catalog"):  # a ranker checkpoint always has both
        if not isinstance(payload[key], dict):
            raise ValueError(f"{path}: field {key!r} is missing or not a dict")
    ranker = Ranker(catalog, RankerConfig.from_dict(payload["config"]))
    check_weights(path, ranker.state_dict(), payload["state_dict"])
    ranker.load_state_dict(payload["state_dict"])
    ranker.eval()
    return ranker


# the digest of the one checkpoint format (kept importable here for the ranker's fuzz tests)
_payload_digest = payload_digest
