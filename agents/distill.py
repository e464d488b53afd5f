"""Distillation of the candidate generator toward the ranker (consistency with ranking).

The lecture: a candidate generator is a helper of the ranker, so it should retrieve what the
ranker would pick, and recall should be measured relative to the ranker (RRR@K,k). Here the
ranker is the teacher: for training queries it scores a pool (its own top items over the
whole catalog, plus uniformly drawn released items), and the generator learns from that with
one of four losses, mixed with the ordinary positives by a weight lambda:

    L = (1 - lambda) * L_true + lambda * L_distill

1. ``"softmax"``: sampled softmax with the ranker's top picks as positives (negatives and
   logQ as in retrieval; in-batch plus uniform negatives also guard against folding);
2. ``"kl"``: listwise KL(softmax(ranker / tau_r) || softmax(generator / tau_g)) over the pool;
3. ``"pairwise"``: the ranker's top-k above the rest of the pool, ``-log sigmoid(s_i - s_j)``;
4. ``"mse"``: regression of the generator's logits on the ranker's scores (the weak baseline).

Devices: the teacher scores on the ranker's device (``RankerTrainConfig.device`` or
``ranker.to(device)``; ``ranker.set_scoring(precision=...)``), and :class:`DistillObjective`
runs on the student's device inside :func:`retrieval.train.fit_two_tower`, under its
``TrainConfig.device`` and ``precision`` (bf16 autocast covers the distillation term too):
each distillation batch moves to the student's device in one place. Teacher targets stay numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from agents.pipeline import Scorer
from retrieval.losses import NegativeSamplerConfig, SampledSoftmaxLoss
from retrieval.model import TwoTowerModel
from retrieval.train import to_torch_obs
from simenv.clock import released
from simenv.device import to_device
from simenv.history import take_obs
from simenv.types import Obs

__all__ = [
    "DistillConfig",
    "TeacherTargets",
    "teacher_targets",
    "DistillObjective",
    "DISTILL_LOSSES",
]

DISTILL_LOSSES = ("softmax", "kl", "pairwise", "mse")


@dataclass(frozen=True)
class DistillConfig:
    """How the generator learns from the ranker.

    Attributes:
        loss: one of ``DISTILL_LOSSES``.
        weight: lambda in ``L = (1 - lambda) L_true + lambda L_distill``.
        teacher_k: how many of the ranker's top items count as its picks (positives of
            ``softmax``, the upper side of ``pairwise``).
        pool_size: items per query scored by the ranker (its top ``pool_size - uniform_extra``
            over the catalog plus ``uniform_extra`` random released items).
        uniform_extra: random released items added to each pool.
        teacher_temperature: tau_r of the ``kl`` loss (ranker-score units, or standard
            deviations of the query's pool scores with ``standardize_teacher``).
        standardize_teacher: divide each query's pool scores (minus their mean) by their standard
            deviation before the ``kl`` softmax, so tau_r does not depend on the ranker's score
            scale (click logits, expected rewards...).
        batch_size: queries per distillation batch.
        negatives: negatives of the ``softmax`` loss (default: in-batch + 1024 uniform, logQ3).
        max_queries: training queries given to the teacher (subsampled with the seed).
    """

    loss: str = "softmax"
    weight: float = 1.0
    teacher_k: int = 10
    pool_size: int = 200
    uniform_extra: int = 50
    teacher_temperature: float = 1.0
    standardize_teacher: bool = False
    batch_size: int = 256
    negatives: NegativeSamplerConfig = field(
        default_factory=lambda: NegativeSamplerConfig(
            in_batch=True, uniform=1024, logq="negatives_only"
        )
    )
    max_queries: int = 20_000

    def __post_init__(self) -> None:
        if self.loss not in DISTILL_LOSSES:
            raise ValueError(f"loss must be one of {DISTILL_LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {self.weight}")
        for name in ("teacher_k", "pool_size", "batch_size", "max_queries"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0 <= self.uniform_extra < self.pool_size:
            raise ValueError(
                f"uniform_extra must be in [0, pool_size={self.pool_size}), got {self.uniform_extra}"
            )
        if self.teacher_k > self.pool_size - self.uniform_extra:
            raise ValueError(
                "teacher_k must be <= pool_size - uniform_extra (the ranker's own top part)"
            )
        if not (math.isfinite(self.teacher_temperature) and self.teacher_temperature > 0):
            raise ValueError(f"teacher_temperature must be > 0, got {self.teacher_temperature}")


@dataclass(eq=False)
class TeacherTargets:
    """The ranker's view of the training queries.

    Attributes:
        obs: observations (Q, L) of the queries.
        pool: int64 (Q, P) items scored by the ranker (its top items first, then uniform ones).
        pool_scores: float32 (Q, P) the ranker's scores of the pool.
        top: int64 (Q, teacher_k) the ranker's top picks (its top-k over the whole catalog).
    """

    obs: dict[str, np.ndarray]
    pool: np.ndarray
    pool_scores: np.ndarray
    top: np.ndarray

    def __len__(self) -> int:
        return int(self.pool.shape[0])


def teacher_targets(
    ranker: Scorer,
    obs: dict[str, np.ndarray],
    release_time: np.ndarray,
    config: DistillConfig,
    rng: np.random.Generator,
    chunk: int = 256,
) -> TeacherTargets:
    """Score a pool per query with the ranker (full-catalog top items + uniform released items).

    The uniform part holds distinct released items not already among the top ones; draws
    that fail this (unreleased, a top item, a repeat) become padding (-1, score -inf).
    """
    n = obs[Obs.ITEMS].shape[0]
    if n > config.max_queries:
        keep = np.sort(rng.choice(n, size=config.max_queries, replace=False))
        obs = take_obs(obs, keep)
        n = config.max_queries
    n_top = config.pool_size - config.uniform_extra
    release = np.asarray(release_time, dtype=np.float64)
    pools, scores, tops = [], [], []
    for s in range(0, n, chunk):
        part = take_obs(obs, np.arange(s, min(n, s + chunk)))
        ids, sc = ranker.top_k(part, n_top)
        if config.uniform_extra:
            t = part[Obs.CONTEXT][:, 0].astype(np.float64)
            extra = rng.integers(release.size, size=(ids.shape[0], config.uniform_extra))
            ok = released(release[extra], t[:, None])  # simenv.clock
            ok &= ~(extra[:, :, None] == ids[:, None, :]).any(axis=2)
            # draws are with replacement: keep the first copy of an item only, so no item
            # weighs twice in the pool's softmax (kl) or pairs (pairwise)
            same = extra[:, :, None] == extra[:, None, :]  # (b, E, E)
            ok &= ~np.tril(same, k=-1).any(axis=2)  # an earlier draw holds the same item
            extra = np.where(ok, extra, -1)
            ex_sc = ranker.score(part, extra)
            ids, sc = np.concatenate([ids, extra], axis=1), np.concatenate([sc, ex_sc], axis=1)
        pools.append(ids)
        scores.append(sc.astype(np.float32))
        tops.append(ids[:, : config.teacher_k])
    return TeacherTargets(obs, np.concatenate(pools), np.concatenate(scores), np.concatenate(tops))


class DistillObjective:
    """The distillation term for :func:`retrieval.train.fit_two_tower`'s ``extra`` hook.

    Each call draws a batch of teacher queries and returns the configured loss.
    ``sample_pool``: the item ids uniform negatives of the ``softmax`` loss come from (pass the
    items released by the training end; None = the whole catalog).
    """

    def __init__(
        self,
        targets: TeacherTargets,
        config: DistillConfig,
        model: TwoTowerModel,
        frequency: np.ndarray | None = None,
        sample_pool: np.ndarray | None = None,
    ) -> None:
        self.t = targets
        self.cfg = config
        self.n_items = model.n_items
        self.softmax = SampledSoftmaxLoss(config.negatives, self.n_items, model.similarity)
        # uniform negatives only among items the model could know (released by the training end)
        self.softmax.set_sample_pool(sample_pool)
        self.frequency = frequency
        if config.loss == "softmax" and self.frequency is None:
            # Q of in-batch negatives = how often an item is a teacher pick
            top = targets.top[targets.top >= 0]
            self.frequency = np.bincount(top, minlength=self.n_items).astype(np.float64)
        self._freq_t: torch.Tensor | None = None

    def __call__(
        self, model: TwoTowerModel, rng: np.random.Generator, gen: torch.Generator
    ) -> torch.Tensor:
        """Loss on one batch of teacher queries."""
        q = len(self.t)
        rows = rng.choice(q, size=min(self.cfg.batch_size, q), replace=False)
        device = next(model.parameters()).device
        batch = {"obs": to_torch_obs(take_obs(self.t.obs, rows))}
        if self.cfg.loss == "softmax":
            top = self.t.top[rows]  # (b, k_t)
            # one teacher pick per query per step, drawn uniformly among its top-k
            pick = rng.integers(top.shape[1], size=top.shape[0])
            batch["top"] = torch.from_numpy(top)
            batch["pos"] = torch.from_numpy(top[np.arange(top.shape[0]), pick])  # (b,)
        else:
            batch["pool"] = torch.from_numpy(self.t.pool[rows])  # (b, P)
            batch["teacher"] = torch.from_numpy(self.t.pool_scores[rows])  # (b, P)
        batch = to_device(batch, device)  # the one place where the batch moves to the device
        u = model.user_vectors(batch["obs"])  # (b, d)
        if self.cfg.loss == "softmax":
            pos, top = batch["pos"], batch["top"]
            ok = pos >= 0
            u, pos, top = u[ok], pos[ok], top[ok]
            freq = self.frequency
            if isinstance(freq, np.ndarray):  # copied to the student's device once
                if self._freq_t is None or self._freq_t.device != device:
                    self._freq_t = torch.from_numpy(freq).to(device)
                freq = self._freq_t
            return self.softmax(
                u, pos, model.item_vectors(pos), encode_items=model.item_tower, generator=gen,
                frequency=freq, user_positive_ids=top,
            )  # fmt: skip
        pool = batch["pool"]  # (b, P)
        valid = pool >= 0
        iv = model.item_vectors(pool.clamp(min=0))  # (b, P, d)
        logits = model.similarity.batched(u, iv).float()  # (b, P) student logits sim / tau_g
        teacher = batch["teacher"].to(logits.dtype)
        valid &= torch.isfinite(teacher)
        if self.cfg.loss == "kl":
            neg = torch.finfo(logits.dtype).min
            t = teacher
            if self.cfg.standardize_teacher:
                vz = torch.where(valid, teacher, torch.zeros_like(teacher))
                n = valid.sum(dim=1, keepdim=True).clamp(min=1)
                mu = vz.sum(dim=1, keepdim=True) / n
                sd = (
                    (((vz - mu) * valid) ** 2)
                    .sum(dim=1, keepdim=True)
                    .div(n)
                    .sqrt()
                    .clamp(min=1e-6)
                )
                t = (teacher - mu) / sd
            t_log = torch.log_softmax(
                torch.where(valid, t / self.cfg.teacher_temperature, neg), dim=1
            )
            s_log = torch.log_softmax(torch.where(valid, logits, neg), dim=1)
            p_t = t_log.exp() * valid
            return (p_t * (t_log - s_log)).masked_fill(~valid, 0.0).sum(dim=1).mean()
        if self.cfg.loss == "pairwise":
            k = self.cfg.teacher_k
            hi, lo = logits[:, :k], logits[:, k:]  # the ranker's top-k vs the rest of the pool
            mask = valid[:, :k, None] & valid[:, None, k:]
            diff = hi[:, :, None] - lo[:, None, :]  # (b, k, P - k)
            return (F.softplus(-diff) * mask).sum() / mask.sum().clamp(min=1)
        # "mse": regression of logits on the ranker's scores
        err = (logits - teacher).masked_fill(~valid, 0.0)
        return (err**2).sum() / valid.sum().clamp(min=1)
