"""Softmax losses: the full softmax over the catalog and the fused sampled softmax with logQ.

The lecture ("На что учить генерацию кандидатов") moves from ``P(engagement | user, item)``
to ``P(item | user, engagement)``: an extreme classification over the catalog,

    L_softmax(u, p) = -log e^{f(u,p)} / sum_{d in D} e^{f(u,d)},

which this module computes exactly (:func:`full_softmax_loss`, chunked over the catalog) or
estimates with sampled negatives (:class:`SampledSoftmaxLoss`, negatives from
:mod:`retrieval.losses.negatives`):

    L_sampled(u, p) = -log e^{f(u,p)} / (e^{f(u,p)} + sum_i e^{f(u,d_i)}),   d_i ~ Q(d).

In-batch-like negatives follow the unigram distribution of positives, so the model would
learn to punish popular items; the logQ correction subtracts ``log Q(d)`` from each
negative's logit. The lecture's variants, by ``NegativeSamplerConfig.logq``:

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

Masked logits are set to the dtype's most negative finite value rather than ``-inf``: a row
whose negatives are all masked then still has finite values and gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from retrieval.losses._common import (
    LOGQ_VARIANTS,
    FrequencyLike,
    ItemSource,
    _check_ids,
    _check_vecs,
    _mask_value,
    _matmul_dtype,
    _reduce,
)
from retrieval.losses.negatives import _accidental_hits, _SampledBase
from retrieval.similarity import Similarity

__all__ = [
    "full_softmax_loss",
    "sampled_softmax_loss",
    "SampledSoftmaxLoss",
    "FullSoftmaxLoss",
]


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

    The buffer is kept for the backward, which scales the small factors instead of it.
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
            # the bias rides in the product as one more coordinate, [q, 1] . [k_j, b_j]:
            # addmm would first copy the broadcast bias into the (B, M) output, a full pass
            qa = torch.cat([q, q.new_ones(q.shape[0], 1)], dim=1)  # (B, d + 1)
            ka = torch.cat([keys, neg_bias[:, None].to(keys.dtype)], dim=1)  # (M, d + 1)
            e = qa @ ka.T  # (B, M) f(u, d_j) - log Q(d_j)
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
        return loss  # (B,)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        q, keys, e, z, e_pos, has = ctx.saved_tensors
        mm_dtype, q_dtype, keys_dtype, pos_dtype = ctx.dtypes
        g = g.to(z.dtype)
        coef = g / z  # (B,)
        if has is not None:
            coef = torch.where(has, coef, torch.zeros_like(coef))
        # dL/dx = coef_b exp(x - m) (B, M); the row scale coef is applied to the (B, d) factor
        # and result instead of the (B, M) matrix, one pass over it fewer:
        # grad_q = diag(coef) E K,  grad_keys = E^T diag(coef) Q
        if e.dtype != mm_dtype:  # bf16 autocast: the backward products in bf16 too
            e = e.to(mm_dtype)
            q, keys = q.to(mm_dtype), keys.to(mm_dtype)
        c = coef[:, None].to(e.dtype)  # (B, 1)
        grad_q = ((e @ keys) * c).to(q_dtype) if ctx.needs_input_grad[0] else None  # (B, d)
        grad_keys = (e.T @ (q * c)).to(keys_dtype) if ctx.needs_input_grad[1] else None  # (M, d)
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
