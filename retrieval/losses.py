"""Losses of the candidate generator: full softmax, sampled softmax with logQ, BCE, BPR.

The lecture ("На что учить генерацию кандидатов") moves from ``P(engagement | user, item)``
to ``P(item | user, engagement)``: an extreme classification over the catalog,

    L_softmax(u, p) = -log e^{f(u,p)} / sum_{d in D} e^{f(u,d)},

which this module computes exactly (:func:`full_softmax_loss`, chunked over the catalog) or
estimates with sampled negatives (:class:`SampledSoftmaxLoss`):

    L_sampled(u, p) = -log e^{f(u,p)} / (e^{f(u,p)} + sum_i e^{f(u,d_i)}),   d_i ~ Q(d).

Negatives come from any mixture of sources (:class:`NegativeSamplerConfig`): uniform over the
catalog, proportional to popularity^alpha, in-batch (the other rows' positives), a memory
queue of past batches' positives (Wang et al. 2021) and other processes' positives
(cross-device). In-batch-like negatives follow the unigram distribution of positives, so the
model would learn to punish popular items; the logQ correction subtracts ``log Q(d)`` from
each negative's logit. The lecture's variants, by ``NegativeSamplerConfig.logq``:

- ``"none"``: no correction;
- ``"derived"``: the estimator of the derivation (importance sampling for the expectation
  and for the normaliser), positive NOT in the denominator:
  ``-log e^{f(p)} / sum_i e^{f(d_i) - log Q(d_i)}``;
- ``"positive_and_negatives"`` (L_logQ2): positive in the denominator, corrected like the
  negatives: ``-log e^{f(p) - log Q(p)} / (e^{f(p) - log Q(p)} + sum_i e^{f(d_i) - log Q(d_i)})``;
- ``"negatives_only"`` (L_logQ3, the default, "very important for quality" in the lecture):
  positive in the denominator, not corrected:
  ``-log e^{f(p)} / (e^{f(p)} + sum_i e^{f(d_i) - log Q(d_i)})``.

``Q(d)`` is the probability that one negative draw is ``d`` under the mixture of sources
actually used (see ``_SampledBase._negatives``). By default (``logq_scale="expected_count"``)
the correction is ``log(n Q(d))``, the expected number of copies of ``d`` among a row's ``n``
negatives, as in Yi et al. 2019 (per-batch sampling probability) and TensorFlow's sampled
softmax; the lecture writes ``log Q(d)`` (``logq_scale="probability"``). The constant
``log n`` between them cancels in ``"derived"`` and ``"positive_and_negatives"``. In
``"negatives_only"`` it decides how much the positive weighs: ``sum_i e^{f(d_i)} / (n Q(d_i))``
estimates ``sum_{d != p} e^{f(d)}`` without bias (accidental hits of ``p`` masked), so with
the expected count the denominator ``e^{f(p)} + ...`` estimates the full normaliser and
L_logQ3 converges to the full softmax as ``n`` grows (the test suite checks this), while with
the plain probability the positive counts ``1/n`` of what it should.

Also here: sampled BCE, BPR and gBCE (same negatives), and the impression-aware pointwise BCE
of the ranker, offered to the generator so that folding can be shown. :class:`RetrievalLossConfig`
and :func:`build_loss` switch between them by config.

Masked logits are set to the dtype's most negative finite value rather than ``-inf``: a row
whose negatives are all masked then still has finite values and gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from retrieval.distributed import (
    all_gather_no_grad,
    all_gather_with_local_grad,
    gather_sizes,
    is_distributed,
    world_info,
)
from retrieval.frequency import ItemFrequency
from retrieval.similarity import Similarity

__all__ = [
    "LOGQ_VARIANTS",
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

LOGQ_VARIANTS = ("none", "derived", "positive_and_negatives", "negatives_only")
LOGQ_SCALES = ("expected_count", "probability")
LOSS_KINDS = ("full_softmax", "sampled_softmax", "bce", "bpr", "gbce", "impression_bce")

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
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if ids.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(ids.shape)}")
    if n_items is not None and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= n_items:
            raise ValueError(f"{name} must be in [0, {n_items}), got values in [{lo}, {hi}]")


def _check_vecs(name: str, x: torch.Tensor, rows: int | None = None, d: int | None = None) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(x.shape)}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(x.shape)}")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name} must have d={d} columns, got shape {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------
# Accidental hits
# --------------------------------------------------------------------------------------------


def _accidental_hits(
    neg_ids: torch.Tensor, pos_ids: torch.Tensor, user_positive_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` where negative column ``cols`` is a positive of row ``rows``.

    Sort-and-search instead of a dense ``(B, M)`` comparison: ``O((M + B P) log M + hits)``.

    Args:
        neg_ids: ``(M,)`` ids of the negative columns (shared by all rows).
        pos_ids: ``(B,)`` each row's positive.
        user_positive_ids: optional ``(B, P)`` other positives of each row, ``-1`` = padding.
    """
    b = pos_ids.shape[0]
    rows = torch.arange(b, device=pos_ids.device)
    targets = pos_ids
    if user_positive_ids is not None:
        valid = user_positive_ids >= 0  # (B, P)
        extra_rows = valid.nonzero(as_tuple=True)[0]
        rows = torch.cat([rows, extra_rows])
        targets = torch.cat([pos_ids, user_positive_ids[valid]])
    sorted_ids, order = torch.sort(neg_ids)  # (M,)
    lo = torch.searchsorted(sorted_ids, targets)  # (T,)
    hi = torch.searchsorted(sorted_ids, targets, right=True)  # (T,)
    cnt = hi - lo  # (T,) matches of each target
    hit_rows = torch.repeat_interleave(rows, cnt)  # (H,)
    first = torch.repeat_interleave(lo - (torch.cumsum(cnt, 0) - cnt), cnt)  # (H,)
    cols = order[first + torch.arange(hit_rows.shape[0], device=neg_ids.device)]  # (H,)
    return hit_rows, cols


class _SampledSoftmaxFn(torch.autograd.Function):
    """Scores, masking, softmax cross-entropy and its gradient in one pass over ``(B, M)``.

    Autograd through ``addmm -> index_put -> logsumexp -> logaddexp`` makes about ten passes
    over the ``(B, M)`` score matrix and allocates several copies of it. Here the forward
    writes the scores once, turns them in place into ``exp(x - m)`` (``m`` the row maximum,
    positive included), and keeps that buffer; the backward scales it in place into
    ``dL/dx = exp(x - m) / Z`` and multiplies it back into the two factors. Five elementwise
    passes in all, one ``(B, M)`` buffer.

    Per row, with ``t`` the positive's term (``f(u, p)``, or ``f(u, p) - log Q(p)`` for
    L_logQ2) and ``x_j`` the corrected, masked negatives:

    - positive in the denominator: ``L = log(e^t + sum_j e^{x_j}) - t``;
    - ``derived``: ``L = log(sum_j e^{x_j}) - t`` (positive NOT in the denominator), and 0 for
      a row without any valid negative.

    The buffer is reused by the backward, so the graph can be backpropagated once only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q: torch.Tensor,
        keys: torch.Tensor,
        neg_bias: torch.Tensor | None,
        pos_term: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        derived: bool,
    ) -> torch.Tensor:
        # Under bf16 autocast the product runs in bf16 and everything after it in float32
        # (the softmax sums need float32); the backward repeats the product's dtype.
        mm_dtype = _matmul_dtype(q)
        if mm_dtype in (torch.bfloat16, torch.float16):
            e = (q.to(mm_dtype) @ keys.to(mm_dtype).T).float()  # (B, M) f(u, d_j)
            if neg_bias is not None:
                e.add_(neg_bias[None, :].float())  # - log Q(d_j)
            pos_term = pos_term.float()
        elif neg_bias is not None:
            e = torch.addmm(neg_bias[None, :], q, keys.T)  # (B, M) f(u, d_j) - log Q(d_j)
        else:
            e = q @ keys.T  # (B, M) f(u, d_j)
        ctx.dtypes = (mm_dtype, q.dtype, keys.dtype, pos_term.dtype)
        mask = _mask_value(e.dtype)
        if rows.numel():
            e.index_put_((rows, cols), e.new_tensor(mask))  # accidental hits
        m = e.amax(dim=1)  # (B,)
        if not derived:
            m = torch.maximum(m, pos_term)
        e.sub_(m[:, None]).exp_()  # (B, M) exp(x - m); masked cells underflow to 0
        s = e.sum(dim=1)  # (B,)
        if derived:
            # -log e^{f(p)} / sum_j e^{f(d_j) - log Q(d_j)}. A row whose negatives are all
            # masked (m at the mask value) carries no information: loss and gradient 0.
            has = m > 0.5 * mask
            z = torch.where(has, s, torch.ones_like(s))
            loss = torch.where(has, m + torch.log(z) - pos_term, torch.zeros_like(s))
            e_pos = None
        else:
            # -log e^t / (e^t + sum_j e^{x_j}); logQ3 and "none": t = f(u, p), logQ2: corrected.
            has = None
            e_pos = torch.exp(pos_term - m)  # (B,)
            z = s + e_pos
            loss = m + torch.log(z) - pos_term
        ctx.save_for_backward(q, keys, e, z, e_pos, has)
        ctx.derived = derived
        ctx.consumed = False
        return loss  # (B,)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        if ctx.consumed:
            raise RuntimeError(
                "the sampled softmax reuses its score buffer in backward: backpropagate its "
                "graph once (retain_graph=True with a second backward is not supported)"
            )
        ctx.consumed = True
        q, keys, e, z, e_pos, has = ctx.saved_tensors
        mm_dtype, q_dtype, keys_dtype, pos_dtype = ctx.dtypes
        g = g.to(z.dtype)
        coef = g / z  # (B,)
        if has is not None:
            coef = torch.where(has, coef, torch.zeros_like(coef))
        grad = e.mul_(coef[:, None])  # (B, M) dL/dx = g exp(x - m) / Z, in place
        if grad.dtype != mm_dtype:  # bf16 autocast: the backward products in bf16 too
            grad = grad.to(mm_dtype)
            q, keys = q.to(mm_dtype), keys.to(mm_dtype)
        grad_q = (grad @ keys).to(q_dtype) if ctx.needs_input_grad[0] else None  # (B, d)
        grad_keys = (grad.T @ q).to(keys_dtype) if ctx.needs_input_grad[1] else None  # (M, d)
        grad_pos = None
        if ctx.needs_input_grad[3]:
            if ctx.derived:
                grad_pos = torch.where(has, -g, torch.zeros_like(g))
            else:
                grad_pos = g * (e_pos / z - 1.0)  # d/dt [log(e^t + S) - t]
            grad_pos = grad_pos.to(pos_dtype)
        return grad_q, grad_keys, None, grad_pos, None, None, None


def _sampled_softmax_rows(
    q: torch.Tensor,
    keys: torch.Tensor,
    neg_log_q: torch.Tensor | None,
    pos_logit: torch.Tensor,
    pos_log_q: torch.Tensor | None,
    rows: torch.Tensor,
    cols: torch.Tensor,
    logq: str,
) -> torch.Tensor:
    """Per-row sampled softmax loss ``(B,)`` of one of the lecture's logQ variants.

    Args:
        q: ``(B, d)`` prepared user vectors divided by ``tau``.
        keys: ``(M, d)`` prepared negative item vectors.
        neg_log_q: ``(M,)`` ``log Q(d_j)`` (None for ``"none"``).
        pos_logit: ``(B,)`` ``f(u, p)``.
        pos_log_q: ``(B,)`` ``log Q(p)`` (for ``"positive_and_negatives"``).
        rows: ``(H,)`` row of each masked cell (accidental hits).
        cols: ``(H,)`` column of each masked cell.
        logq: one of :data:`LOGQ_VARIANTS`.
    """
    if logq == "positive_and_negatives":
        # L_logQ2: the positive is corrected like the negatives.
        pos_term = pos_logit - pos_log_q
    else:
        # L_logQ3 ("negatives_only"), "none" and "derived": no correction on the positive.
        pos_term = pos_logit
    bias = None if (logq == "none" or neg_log_q is None) else -neg_log_q.detach()
    return _SampledSoftmaxFn.apply(q, keys, bias, pos_term, rows, cols, logq == "derived")


# --------------------------------------------------------------------------------------------
# Full softmax
# --------------------------------------------------------------------------------------------


def _item_source(
    items: ItemSource, n_items: int | None, device: torch.device
) -> tuple[int, Callable[[int, int], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """``(N, by_range(start, end), by_ids(ids))`` for a table or an encoder function."""
    if torch.is_tensor(items):
        table = items
        _check_vecs("items", table)
        if n_items is not None and n_items != table.shape[0]:
            raise ValueError(
                f"n_items={n_items} disagrees with items of shape {tuple(table.shape)}"
            )
        return table.shape[0], (lambda s, e: table[s:e]), (lambda ids: table[ids])
    if not callable(items):
        raise ValueError(f"items must be an (N, d) tensor or a callable, got {type(items)}")
    if n_items is None or n_items < 1:
        raise ValueError(f"n_items must be >= 1 when items is a callable, got {n_items}")
    fn = items

    def by_range(s: int, e: int) -> torch.Tensor:
        return fn(torch.arange(s, e, device=device))

    return int(n_items), by_range, fn


def _exclusion_hits(
    exclude: torch.Tensor, positives: torch.Tensor, start: int, end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of excluded ids inside catalog chunk ``[start, end)``."""
    sel = (exclude >= start) & (exclude < end) & (exclude != positives[:, None])  # (B, E)
    rows, j = sel.nonzero(as_tuple=True)
    return rows, exclude[rows, j] - start


def full_softmax_loss(
    user_vecs: torch.Tensor,
    positives: torch.Tensor,
    items: ItemSource,
    similarity: Similarity,
    *,
    n_items: int | None = None,
    chunk_size: int = 8192,
    exclude: torch.Tensor | None = None,
    pos_vecs: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Exact softmax cross-entropy over the whole catalog, in bounded memory.

    ``L_softmax(u, p) = -log e^{f(u,p)} / sum_{d in D} e^{f(u,d)}``. When the catalog is
    larger than ``chunk_size``, a first pass without autograd computes the log-normaliser with
    a running logsumexp over chunks; a second pass adds, chunk by chunk under activation
    checkpointing, a surrogate ``sum_d P(d|u).detach() * f(u, d)`` whose value is cancelled
    and whose gradient is the exact ``E_{d ~ P(d|u)} grad f(u, d)`` of the derivation. Memory
    stays at ``O(B x chunk_size)`` in forward and backward; item vectors of each chunk are
    recomputed in backward.

    Args:
        user_vecs: ``(B, d)`` user vectors.
        positives: ``(B,)`` positive item ids.
        items: ``(N, d)`` item table, or a function ids ``(n,)`` -> vectors ``(n, d)``.
        similarity: the score function (dot/cosine, temperature).
        n_items: catalog size; required when ``items`` is a function.
        chunk_size: catalog items per chunk.
        exclude: optional ``(B, E)`` ids left out of each row's denominator (e.g. the user's
            other positives), ``-1`` = padding; the row's own positive is never excluded.
        pos_vecs: optional ``(B, d)`` positive vectors already computed (else looked up).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per row).

    Returns:
        The loss (scalar, or ``(B,)`` for ``reduction="none"``).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_vecs("user_vecs", user_vecs)
    b = user_vecs.shape[0]
    n, by_range, by_ids = _item_source(items, n_items, user_vecs.device)
    _check_ids("positives", positives, n)
    if positives.shape[0] != b:
        raise ValueError(f"positives must have shape ({b},), got {tuple(positives.shape)}")
    if exclude is not None:
        _check_ids("exclude", exclude, None, ndim=2)
        if exclude.shape[0] != b:
            raise ValueError(f"exclude must have {b} rows, got shape {tuple(exclude.shape)}")

    q = similarity.query(user_vecs)  # (B, d) prepared and divided by tau
    pv = similarity.prepare(by_ids(positives) if pos_vecs is None else pos_vecs)  # (B, d)
    _check_vecs("pos_vecs", pv, b, q.shape[1])
    pos_logit = (q * pv).sum(-1)  # (B,) f(u, p)
    mask = _mask_value(q.dtype)

    def chunk_logits(qq: torch.Tensor, s: int, e: int) -> torch.Tensor:
        logits = qq @ similarity.prepare(by_range(s, e)).T  # (B, e - s)
        if exclude is not None:
            r, c = _exclusion_hits(exclude, positives, s, e)
            # In place on the product's output: mm's backward needs only its inputs.
            logits.index_put_((r, c), logits.new_tensor(mask))
        return logits

    if n <= chunk_size:
        lse = torch.logsumexp(chunk_logits(q, 0, n), dim=1)  # (B,)
        return _reduce(lse - pos_logit, reduction)

    # Pass 1: log sum_d e^{f(u,d)} with a running logsumexp, no graph kept.
    with torch.no_grad():
        lse = torch.full((b,), float("-inf"), dtype=q.dtype, device=q.device)
        for s in range(0, n, chunk_size):
            lse = torch.logaddexp(
                lse, torch.logsumexp(chunk_logits(q, s, min(s + chunk_size, n)), 1)
            )

    rows = lse - pos_logit  # (B,) exact value; gradient -grad f(u, p) so far
    if torch.is_grad_enabled():
        # Pass 2: + E_{d ~ P(d|u)} grad f(u, d), chunk by chunk (values cancel).
        def surrogate(qq: torch.Tensor, s: int, e: int) -> torch.Tensor:
            logits = chunk_logits(qq, s, e)  # (B, chunk)
            p = torch.exp(logits.detach() - lse[:, None])  # (B, chunk) P(d|u), no grad
            return (p * logits).sum(1)  # (B,)

        extra = None
        for s in range(0, n, chunk_size):
            part = checkpoint(surrogate, q, s, min(s + chunk_size, n), use_reentrant=False)
            extra = part if extra is None else extra + part
        rows = rows + (extra - extra.detach())
    return _reduce(rows, reduction)


# --------------------------------------------------------------------------------------------
# Sampled softmax: configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NegativeSamplerConfig:
    """Where the negatives of a sampled loss come from, and how they are corrected.

    Attributes:
        uniform: number of negatives drawn uniformly from the catalog per batch (one set
            shared by all rows).
        popularity: number of negatives drawn proportionally to ``frequency^alpha`` per
            batch (shared by all rows).
        popularity_alpha: exponent ``alpha`` of the popularity proposal (0 = uniform,
            1 = unigram, 0.75 as in word2vec).
        in_batch: use the other rows' positives as negatives.
        memory_queue: size of a FIFO queue of past batches' positive item vectors and ids
            used as extra negatives (cross-batch negatives, Wang et al. 2021); 0 = off.
            Vectors are stored detached (no gradient reaches past batches).
        cross_device: extend the in-batch negatives with the positives of all processes of
            the ``torch.distributed`` group (requires ``in_batch``; without a process group it
            is plain in-batch).
        logq: logQ variant, one of :data:`LOGQ_VARIANTS` (see the module docstring).
        logq_floor: smallest probability used in ``log Q`` and in the popularity proposal,
            in ``(0, 1)``; keeps everything finite for never-seen items.
        logq_scale: ``"expected_count"`` (default) subtracts ``log(n Q(d))``, the expected
            number of copies of ``d`` among a row's ``n`` negatives; ``"probability"``
            subtracts ``log Q(d)`` literally as written in the lecture. The two differ by the
            constant ``log n``, which cancels in ``"derived"`` and ``"positive_and_negatives"``;
            in ``"negatives_only"`` (L_logQ3) it sets the positive's weight, and only
            ``"expected_count"`` makes L_logQ3 consistent (see the module docstring).
        mask_accidental_hits: mask negatives equal to the row's positive (and to the
            ``user_positive_ids`` given to ``forward``). When False, only the row's own
            positive in the in-batch block is masked. Note: ``"derived"`` keeps the positive
            out of the denominator, so it converges to the full softmax only when the
            positive may also be drawn as a negative (``False``); L_logQ3 with the default
            ``logq_scale`` converges with masking on.
    """

    uniform: int = 0
    popularity: int = 0
    popularity_alpha: float = 1.0
    in_batch: bool = True
    memory_queue: int = 0
    cross_device: bool = False
    logq: Literal["none", "derived", "positive_and_negatives", "negatives_only"] = "negatives_only"
    logq_floor: float = 1e-9
    logq_scale: Literal["expected_count", "probability"] = "expected_count"
    mask_accidental_hits: bool = True

    def __post_init__(self) -> None:
        for name in ("uniform", "popularity", "memory_queue"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not (math.isfinite(self.popularity_alpha) and self.popularity_alpha >= 0):
            raise ValueError(
                f"popularity_alpha must be finite and >= 0, got {self.popularity_alpha}"
            )
        if self.logq not in LOGQ_VARIANTS:
            raise ValueError(f"logq must be one of {LOGQ_VARIANTS}, got {self.logq!r}")
        if self.logq_scale not in LOGQ_SCALES:
            raise ValueError(f"logq_scale must be one of {LOGQ_SCALES}, got {self.logq_scale!r}")
        if not (0.0 < self.logq_floor < 1.0):
            raise ValueError(f"logq_floor must be in (0, 1), got {self.logq_floor}")
        if self.cross_device and not self.in_batch:
            raise ValueError("cross_device=True extends in-batch negatives: set in_batch=True")
        if not (self.in_batch or self.uniform or self.popularity or self.memory_queue):
            raise ValueError(
                "no negative source: set in_batch=True or uniform, popularity or memory_queue > 0"
            )

    @property
    def needs_frequency(self) -> bool:
        """Whether ``forward`` needs the positives' frequency (for sampling or for Q)."""
        unigram = self.in_batch or self.memory_queue > 0 or self.popularity > 0
        return self.popularity > 0 or (self.logq != "none" and unigram)

    @property
    def needs_encoder(self) -> bool:
        """Whether ``forward`` needs ``encode_items`` and a generator (sampled ids)."""
        return self.uniform > 0 or self.popularity > 0


class _Frequency:
    """The positives' frequency ``p`` behind any of the accepted forms."""

    def __init__(self, freq: FrequencyLike, n_items: int, device: torch.device) -> None:
        self.n_items = n_items
        self.device = device
        self._table: torch.Tensor | None = None
        self._fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._est: Any = None
        if isinstance(freq, np.ndarray) or torch.is_tensor(freq):
            t = torch.as_tensor(freq, device=device).to(torch.float64)
            if t.shape != (n_items,):
                raise ValueError(
                    f"frequency array must have shape ({n_items},), got {tuple(t.shape)}"
                )
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError("frequency array must be finite and >= 0")
            total = t.sum()
            self._table = t / total if float(total) > 0 else t  # counts or probabilities
        elif hasattr(freq, "probability"):
            self._est = freq
        elif callable(freq):
            self._fn = freq
        else:
            raise ValueError(
                "frequency must be an ItemFrequency, an (N,) array or a log-probability "
                f"function, got {type(freq)}"
            )

    def prob(self, ids: torch.Tensor) -> torch.Tensor:
        """``p(ids)`` as float64 on ``ids``' device."""
        if self._table is not None:
            return self._table[ids]
        if self._est is not None:
            return torch.as_tensor(
                self._est.probability(ids), dtype=torch.float64, device=ids.device
            )
        return torch.exp(self._fn(ids).to(torch.float64))

    def all(self) -> torch.Tensor:
        """``p`` over the whole catalog, ``(N,)`` float64."""
        if self._table is not None:
            return self._table
        if self._est is not None and hasattr(self._est, "all_probabilities"):
            return torch.as_tensor(self._est.all_probabilities(), device=self.device)
        return self.prob(torch.arange(self.n_items, device=self.device))


@dataclass
class _Negatives:
    """What the shared negative columns are, for one batch."""

    keys: torch.Tensor  # (M, d) prepared item vectors
    ids: torch.Tensor  # (M,)
    log_q: torch.Tensor | None  # (M,) log Q(d) under the mixture, or None
    pos_log_q: torch.Tensor | None  # (B,) log Q(p), or None
    self_cols: torch.Tensor | None  # (B,) column of each row's own positive in the block
    per_row: int  # negatives per row before masking
    gathered: tuple[
        torch.Tensor, torch.Tensor
    ]  # this batch's positives (all processes'), for the queue


class _SampledBase(nn.Module):
    """Negative sampling, memory queue, Q of the mixture and masking, shared by the losses."""

    def __init__(self, config: NegativeSamplerConfig, n_items: int, similarity: Similarity) -> None:
        super().__init__()
        if int(n_items) < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        if not isinstance(config, NegativeSamplerConfig):
            raise ValueError(f"config must be a NegativeSamplerConfig, got {type(config)}")
        self.config = config
        self.n_items = int(n_items)
        self.similarity = similarity
        self._queue_vecs: torch.Tensor | None = None
        self._queue_ids: torch.Tensor | None = None
        self._queue_ptr = 0
        self._queue_fill = 0
        self._pool: torch.Tensor | None = None  # item ids uniform/popularity draws come from
        self._in_pool: torch.Tensor | None = None  # (N,) bool

    def set_sample_pool(self, item_ids: torch.Tensor | np.ndarray | None) -> None:
        """Restrict uniform and popularity negatives to these items (None: the whole catalog).

        A generator trained at time t must not use items released later as negatives: they
        were not in the catalog then, and training them as negatives would push every new item
        away from every user before it is ever seen. ``Q`` of the uniform source becomes
        ``1 / |pool|`` on the pool and 0 elsewhere; the popularity proposal is renormalised
        over the pool.
        """
        if item_ids is None:
            self._pool = self._in_pool = None
            return
        ids = torch.as_tensor(np.asarray(item_ids), dtype=torch.int64).unique()
        _check_ids("item_ids", ids, self.n_items)
        if ids.numel() == 0:
            raise ValueError("item_ids must hold at least one item")
        self._pool = ids
        self._in_pool = torch.zeros(self.n_items, dtype=torch.bool)
        self._in_pool[ids] = True

    # ---- memory queue -------------------------------------------------------------------

    def reset_queue(self) -> None:
        """Empty the memory queue."""
        self._queue_vecs = self._queue_ids = None
        self._queue_ptr = self._queue_fill = 0

    def queue_contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory queue's vectors ``(F, d)`` and ids ``(F,)``, oldest first."""
        if self._queue_vecs is None or self._queue_fill == 0:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
        cap = self.config.memory_queue
        if self._queue_fill < cap:
            return self._queue_vecs[: self._queue_fill], self._queue_ids[: self._queue_fill]
        order = (self._queue_ptr + torch.arange(cap, device=self._queue_ids.device)) % cap
        return self._queue_vecs[order], self._queue_ids[order]

    @torch.no_grad()
    def _enqueue(self, vecs: torch.Tensor, ids: torch.Tensor) -> None:
        cap = self.config.memory_queue
        vecs = vecs.detach()
        if (
            self._queue_vecs is None
            or self._queue_vecs.shape[1] != vecs.shape[1]
            or self._queue_vecs.dtype != vecs.dtype
            or self._queue_vecs.device != vecs.device
        ):
            self._queue_vecs = vecs.new_zeros((cap, vecs.shape[1]))
            self._queue_ids = torch.zeros(cap, dtype=torch.int64, device=vecs.device)
            self._queue_ptr = self._queue_fill = 0
        if vecs.shape[0] > cap:  # only the newest `cap` survive anyway
            vecs, ids = vecs[-cap:], ids[-cap:]
        k = vecs.shape[0]
        slots = (self._queue_ptr + torch.arange(k, device=vecs.device)) % cap  # (k,)
        self._queue_vecs[slots] = vecs
        self._queue_ids[slots] = ids.to(torch.int64)
        self._queue_ptr = (self._queue_ptr + k) % cap
        self._queue_fill = min(self._queue_fill + k, cap)

    # ---- negatives ------------------------------------------------------------------------

    def _negatives(
        self,
        pos_keys: torch.Tensor,
        pos_ids: torch.Tensor,
        encode_items: Callable[[torch.Tensor], torch.Tensor] | None,
        generator: torch.Generator | None,
        frequency: FrequencyLike | None,
        need_log_q: bool,
    ) -> _Negatives:
        cfg = self.config
        sim = self.similarity
        device = pos_keys.device
        b = pos_keys.shape[0]
        if cfg.needs_encoder and (encode_items is None or generator is None):
            raise ValueError(
                "encode_items and generator are required with uniform or popularity negatives"
            )
        if cfg.needs_frequency and frequency is None:
            raise ValueError(
                f"frequency is required with logq={cfg.logq!r}, in_batch={cfg.in_batch}, "
                f"memory_queue={cfg.memory_queue}, popularity={cfg.popularity}"
            )
        freq = _Frequency(frequency, self.n_items, device) if frequency is not None else None

        keys: list[torch.Tensor] = []
        ids: list[torch.Tensor] = []
        self_cols = None
        gathered = (pos_keys, pos_ids)  # what the memory queue stores after this batch
        n_unigram = 0  # negatives per row that follow the positives' distribution p

        # 1. In-batch (and cross-device) negatives: all rows' positives; own one masked later.
        if cfg.in_batch:
            if cfg.cross_device and is_distributed():
                rank, _ = world_info()
                sizes = gather_sizes(b, device)
                ib_keys = all_gather_with_local_grad(pos_keys, sizes)  # (sum sizes, d)
                ib_ids = all_gather_no_grad(pos_ids, sizes)  # (sum sizes,)
                start = sum(sizes[:rank])
            else:
                ib_keys, ib_ids, start = pos_keys, pos_ids, 0
            keys.append(ib_keys)
            ids.append(ib_ids)
            self_cols = start + torch.arange(b, device=device)  # (B,)
            n_unigram += ib_ids.shape[0] - 1
            gathered = (ib_keys, ib_ids)

        # 2. Memory queue: past batches' positives (detached), also distributed like p.
        n_queue = self._queue_fill if cfg.memory_queue else 0
        if n_queue:
            qv, qi = self._queue_vecs[:n_queue], self._queue_ids[:n_queue]  # order irrelevant
            if qv.shape[1] != pos_keys.shape[1]:
                raise ValueError(
                    f"memory queue holds d={qv.shape[1]} vectors, batch has d={pos_keys.shape[1]}"
                )
            keys.append(qv.to(pos_keys.dtype))
            ids.append(qi)
            n_unigram += n_queue

        # 3. Shared sampled negatives: uniform and popularity^alpha, encoded once.
        p_all = None
        pop_q = None
        sampled = []
        n_pool = self.n_items if self._pool is None else int(self._pool.numel())
        if cfg.uniform:
            draw = torch.randint(
                n_pool, (cfg.uniform,), generator=generator, device=generator.device
            )
            sampled.append(draw if self._pool is None else self._pool.to(draw.device)[draw])
        if cfg.popularity:
            p_all = freq.all()  # (N,)
            w = torch.clamp(p_all, min=cfg.logq_floor) ** cfg.popularity_alpha  # (N,)
            if self._in_pool is not None:
                w = w * self._in_pool.to(w.device, w.dtype)
            pop_q = w / w.sum()  # (N,) proposal q_pop(d)
            draw = torch.multinomial(
                pop_q.to(generator.device, torch.float64),
                cfg.popularity,
                replacement=True,
                generator=generator,
            )
            sampled.append(draw)
        if sampled:
            s_ids = torch.cat(sampled).to(device)  # (n_u + n_p,)
            s_vecs = encode_items(s_ids)  # (n_u + n_p, d)
            _check_vecs("encode_items(ids)", s_vecs, s_ids.shape[0], pos_keys.shape[1])
            keys.append(sim.prepare(s_vecs).to(pos_keys.dtype))
            ids.append(s_ids)

        all_keys = keys[0] if len(keys) == 1 else torch.cat(keys, 0)  # (M, d)
        all_ids = ids[0] if len(ids) == 1 else torch.cat(ids, 0)  # (M,)
        per_row = n_unigram + cfg.uniform + cfg.popularity

        log_q = pos_log_q = None
        if need_log_q:
            # Q of the mixture actually used. Row-wise the negatives are a stratified sample:
            # n_s draws from each source s with its own distribution q_s (in-batch, queue and
            # cross-device: the positives' frequency p; uniform: 1/N; popularity: q_pop). We
            # weight every negative by 1 / Q(d) with Q(d) = sum_s n_s q_s(d) / sum_s n_s, the
            # probability that one draw of the pooled sample is d: the "balance heuristic" of
            # multiple importance sampling (Veach & Guibas 1995), under which
            # sum_i e^{f(d_i)} / Q(d_i) / n estimates sum_d e^{f(d)} without bias whatever
            # the mix, and which reduces to the single-source logQ when only one is used.
            n_draws = max(per_row, 1)
            shift = math.log(n_draws) if cfg.logq_scale == "expected_count" else 0.0

            def mix(id_: torch.Tensor) -> torch.Tensor:
                count = torch.zeros(id_.shape[0], dtype=torch.float64, device=device)
                if n_unigram:
                    pd = p_all[id_] if p_all is not None else freq.prob(id_)
                    count = count + n_unigram * pd
                if cfg.uniform:
                    if self._in_pool is None:
                        count = count + cfg.uniform / self.n_items
                    else:
                        count = count + cfg.uniform / n_pool * self._in_pool.to(device)[id_]
                if cfg.popularity:
                    count = count + cfg.popularity * pop_q[id_]
                q = torch.clamp(count / n_draws, min=cfg.logq_floor)  # Q(d) of the mixture
                # log Q(d), or log(n Q(d)) = log of the expected count with "expected_count".
                return (torch.log(q) + shift).to(pos_keys.dtype)

            log_q = mix(all_ids)  # (M,)
            if cfg.logq == "positive_and_negatives":
                pos_log_q = mix(pos_ids)  # (B,)
        return _Negatives(all_keys, all_ids, log_q, pos_log_q, self_cols, per_row, gathered)

    def _scores(
        self,
        user_vecs: torch.Tensor,
        pos_ids: torch.Tensor,
        pos_vecs: torch.Tensor,
        encode_items: Callable[[torch.Tensor], torch.Tensor] | None,
        generator: torch.Generator | None,
        frequency: FrequencyLike | None,
        user_positive_ids: torch.Tensor | None,
        apply_log_q: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, _Negatives, tuple[torch.Tensor, torch.Tensor]]:
        """Query ``(B, d)``, positive logits ``(B,)``, the negatives, and the masked cells."""
        _check_vecs("user_vecs", user_vecs)
        b, d = user_vecs.shape
        _check_vecs("pos_vecs", pos_vecs, b, d)
        _check_ids("pos_ids", pos_ids, self.n_items)
        if pos_ids.shape[0] != b:
            raise ValueError(f"pos_ids must have shape ({b},), got {tuple(pos_ids.shape)}")
        if user_positive_ids is not None:
            _check_ids("user_positive_ids", user_positive_ids, None, ndim=2)
            if user_positive_ids.shape[0] != b:
                raise ValueError(
                    f"user_positive_ids must have {b} rows, got {tuple(user_positive_ids.shape)}"
                )
        pos_ids = pos_ids.to(torch.int64)
        sim = self.similarity
        q = sim.query(user_vecs)  # (B, d) prepared, divided by tau
        p = sim.prepare(pos_vecs)  # (B, d)
        pos_logit = (q * p).sum(-1)  # (B,) f(u, p)
        neg = self._negatives(
            p,
            pos_ids,
            encode_items,
            generator,
            frequency,
            apply_log_q and self.config.logq != "none",
        )
        if self.config.mask_accidental_hits:
            rows, cols = _accidental_hits(neg.ids, pos_ids, user_positive_ids)
        elif neg.self_cols is not None:
            rows, cols = torch.arange(b, device=q.device), neg.self_cols
        else:
            rows = cols = torch.zeros(0, dtype=torch.int64, device=q.device)
        return q, pos_logit, neg, (rows, cols)

    def _after(self, neg: _Negatives) -> None:
        if self.config.memory_queue and self.training:
            self._enqueue(*neg.gathered)

    def extra_repr(self) -> str:
        """Config summary for ``print(module)``."""
        return f"n_items={self.n_items}, {self.config}"


class SampledSoftmaxLoss(_SampledBase):
    """Sampled softmax with any mixture of negatives and the lecture's logQ variants.

    Cost per batch: one ``(B, d) x (d, M)`` product against ``M`` shared negative columns
    (in-batch positives, the memory queue, uniform and popularity samples encoded once), one
    logsumexp, and a sparse accidental-hit mask. The logQ correction rides along the product
    as ``addmm``'s bias.

    The memory queue is updated at the end of ``forward`` in training mode (``.train()``),
    with this batch's positive vectors (all processes' ones with ``cross_device``).

    Args:
        config: negative sources and logQ variant.
        n_items: catalog size ``N``.
        similarity: the score function (dot/cosine, temperature).
    """

    def forward(
        self,
        user_vecs: torch.Tensor,
        pos_ids: torch.Tensor,
        pos_vecs: torch.Tensor,
        encode_items: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        frequency: FrequencyLike | None = None,
        user_positive_ids: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Loss of a batch of (user, positive) pairs.

        Args:
            user_vecs: ``(B, d)`` user-tower outputs.
            pos_ids: ``(B,)`` positive item ids.
            pos_vecs: ``(B, d)`` item-tower outputs of the positives.
            encode_items: item tower, ids ``(n,)`` -> ``(n, d)``; needed for uniform or
                popularity negatives.
            generator: ``torch.Generator`` of the sampled negatives.
            frequency: the positives' frequency ``p`` (an :class:`ItemFrequency`, an ``(N,)``
                array of counts or probabilities, or a function ids -> log p); needed for
                logQ with in-batch, queue or popularity negatives, and for popularity sampling.
            user_positive_ids: optional ``(B, P)`` other positives of each row's user,
                ``-1`` = padding, masked out of the negatives.
            reduction: ``"mean"``, ``"sum"`` or ``"none"``.

        Returns:
            The loss.
        """
        q, pos_logit, neg, (rows, cols) = self._scores(
            user_vecs, pos_ids, pos_vecs, encode_items, generator, frequency,
            user_positive_ids, apply_log_q=True,
        )  # fmt: skip
        loss = _sampled_softmax_rows(
            q, neg.keys, neg.log_q, pos_logit, neg.pos_log_q, rows, cols, self.config.logq
        )  # (B,)
        self._after(neg)
        return _reduce(loss, reduction)


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


def sampled_softmax_loss(
    user_vecs: torch.Tensor,
    pos_vecs: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_vecs: torch.Tensor,
    neg_ids: torch.Tensor,
    similarity: Similarity,
    *,
    neg_log_q: torch.Tensor | None = None,
    pos_log_q: torch.Tensor | None = None,
    logq: str = "negatives_only",
    mask_accidental_hits: bool = True,
    user_positive_ids: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sampled softmax against explicit negatives shared by all rows (e.g. mined elsewhere).

    Args:
        user_vecs: ``(B, d)``.
        pos_vecs: ``(B, d)`` positives' item vectors.
        pos_ids: ``(B,)`` positives' ids.
        neg_vecs: ``(M, d)`` negatives' item vectors.
        neg_ids: ``(M,)`` negatives' ids (for accidental-hit masking).
        similarity: the score function.
        neg_log_q: ``(M,)`` ``log Q(d)`` of the negatives; required unless ``logq="none"``.
        pos_log_q: ``(B,)`` ``log Q(p)``; required for ``"positive_and_negatives"``.
        logq: one of :data:`LOGQ_VARIANTS`.
        mask_accidental_hits: mask negatives equal to the row's positive(s).
        user_positive_ids: optional ``(B, P)`` more ids to mask per row, ``-1`` = padding.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    if logq not in LOGQ_VARIANTS:
        raise ValueError(f"logq must be one of {LOGQ_VARIANTS}, got {logq!r}")
    _check_vecs("user_vecs", user_vecs)
    b, d = user_vecs.shape
    _check_vecs("pos_vecs", pos_vecs, b, d)
    _check_vecs("neg_vecs", neg_vecs, None, d)
    _check_ids("pos_ids", pos_ids, None)
    _check_ids("neg_ids", neg_ids, None)
    if neg_ids.shape[0] != neg_vecs.shape[0]:
        raise ValueError(
            f"neg_ids must have shape ({neg_vecs.shape[0]},), got {tuple(neg_ids.shape)}"
        )
    if logq != "none" and (neg_log_q is None or neg_log_q.shape != neg_ids.shape):
        raise ValueError(
            f"neg_log_q of shape {tuple(neg_ids.shape)} is required with logq={logq!r}"
        )
    if logq == "positive_and_negatives" and (pos_log_q is None or pos_log_q.shape != (b,)):
        raise ValueError(f"pos_log_q of shape ({b},) is required with logq={logq!r}")
    q = similarity.query(user_vecs)  # (B, d)
    pos_logit = (q * similarity.prepare(pos_vecs)).sum(-1)  # (B,)
    keys = similarity.prepare(neg_vecs)  # (M, d)
    if mask_accidental_hits:
        rows, cols = _accidental_hits(
            neg_ids.to(torch.int64), pos_ids.to(torch.int64), user_positive_ids
        )
    else:
        rows = cols = torch.zeros(0, dtype=torch.int64, device=q.device)
    loss = _sampled_softmax_rows(
        q,
        keys,
        None if neg_log_q is None else neg_log_q.to(q.dtype),
        pos_logit,
        None if pos_log_q is None else pos_log_q.to(q.dtype),
        rows,
        cols,
        logq,
    )
    return _reduce(loss, reduction)


# --------------------------------------------------------------------------------------------
# Binary losses
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Modules with one calling convention, and the dispatcher
# --------------------------------------------------------------------------------------------


class FullSoftmaxLoss(nn.Module):
    """:func:`full_softmax_loss` with the calling convention of :class:`SampledSoftmaxLoss`.

    ``encode_items`` encodes the whole catalog chunk by chunk; ``user_positive_ids`` are left
    out of each row's denominator. ``generator`` and ``frequency`` are ignored.
    """

    def __init__(self, n_items: int, similarity: Similarity, chunk_size: int = 8192) -> None:
        super().__init__()
        if int(n_items) < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.n_items = int(n_items)
        self.similarity = similarity
        self.chunk_size = int(chunk_size)

    def forward(
        self,
        user_vecs: torch.Tensor,
        pos_ids: torch.Tensor,
        pos_vecs: torch.Tensor,
        encode_items: ItemSource | None = None,
        generator: torch.Generator | None = None,
        frequency: FrequencyLike | None = None,
        user_positive_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exact softmax loss of a batch (see :func:`full_softmax_loss`)."""
        if encode_items is None:
            raise ValueError("encode_items (an item tower or an (N, d) table) is required")
        return full_softmax_loss(
            user_vecs, pos_ids, encode_items, self.similarity,
            n_items=self.n_items, chunk_size=self.chunk_size,
            exclude=user_positive_ids, pos_vecs=pos_vecs,
        )  # fmt: skip


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
