"""Negative sampling of the sampled losses: sources, the memory queue, Q of the mixture, masks.

Negatives come from any mixture of sources (:class:`NegativeSamplerConfig`): uniform over the
catalog, proportional to popularity^alpha, in-batch (the other rows' positives), a memory
queue of past batches' positives (Wang et al. 2021) and other processes' positives
(cross-device, through :mod:`retrieval.distributed`). One set of negative columns is shared by
all rows of a batch. In-batch-like negatives follow the unigram distribution of positives, so
the logQ correction (:mod:`retrieval.losses.softmax`) needs ``Q(d)``, the probability that one
negative draw is ``d`` under the mixture actually used (``_SampledBase._negatives``, the
balance heuristic of multiple importance sampling). Accidental hits (a negative equal to the
row's positive, or to another positive of its user) are found by sort-and-search and masked.

:class:`_SampledBase` holds all of this for :class:`~retrieval.losses.softmax.SampledSoftmaxLoss`
and :class:`~retrieval.losses.pointwise.SampledBinaryLoss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from retrieval.distributed import (
    all_gather_no_grad,
    all_gather_with_local_grad,
    gather_sizes,
    is_distributed,
    world_info,
)
from retrieval.frequency import ExactItemFrequency
from retrieval.losses._common import (
    LOGQ_SCALES,
    LOGQ_VARIANTS,
    FrequencyLike,
    _check_ids,
    _check_vecs,
)
from retrieval.similarity import Similarity

__all__ = ["NegativeSamplerConfig"]


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
        # the frequency of the last batches, as a table on the device: (source, version, it)
        self._freq_cache: tuple[Any, Any, _Frequency] | None = None

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

    def _frequency(self, frequency: FrequencyLike, device: torch.device) -> _Frequency:
        """``frequency`` as a :class:`_Frequency`, validated once and kept while it is unchanged.

        Exact counts become one probability table on the device (the logQ of a batch is then
        a gather, with no host round trip per step); a tensor is checked once per version; a
        count-min sketch (updated every batch) and functions are read per batch as given.
        """
        if isinstance(frequency, ExactItemFrequency):
            version: Any = frequency.total
        elif torch.is_tensor(frequency):
            version = frequency._version
        else:
            return _Frequency(frequency, self.n_items, device)
        c = self._freq_cache
        if c is not None and c[0] is frequency and c[1] == version and c[2].device == device:
            return c[2]
        source = frequency
        if isinstance(frequency, ExactItemFrequency):
            source = torch.as_tensor(frequency.all_probabilities(), device=device)
        freq = _Frequency(source, self.n_items, device)
        self._freq_cache = (frequency, version, freq)
        return freq

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
        freq = self._frequency(frequency, device) if frequency is not None else None

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
