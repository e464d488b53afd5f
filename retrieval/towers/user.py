"""User towers: encode a user by the history of their events, not by a user id.

Lecture, "Пользовательские башни": users change over time, the model must react to fresh
(also negative) feedback, cold users matter and context matters, so the user vector is a
function of the event history (which also keeps the MDP state Markov). Towers here:

- :class:`MeanPoolUserTower`: YoutubeDNN average of the item vectors of the history, over
  the last n events, optionally with exponential time decay; optionally an MLP on top.
- :class:`TransformerUserTower`: SASRec-style transformer over events (item + event type +
  position + context), causal or bidirectional, pooled by the last token, a CLS token or a
  masked mean; pre-norm, RMSNorm, SwiGLU.
- :class:`GRUUserTower`: GRU4Rec-style recurrent encoder.

History layout (batched observation of ``simenv``): ``item_ids`` int64 ``(B, L)`` oldest first,
most recent last, left padding; ``events`` int64 ``(B, L)`` :class:`simenv.types.EventType`;
``dt`` float32 ``(B, L)`` days since the event; ``mask`` ``(B, L)`` 1 = real event;
``context`` float32 ``(B, 3)`` = (time in days, session index, position in session).
Numpy arrays are accepted too. A user with an empty history gets a learned "empty" vector.

Parameters are initialised from the tower's ``seed`` only (the global RNG is never read);
dropout, when enabled in training, draws from torch's global RNG because torch offers no
generator argument for it, so a training script seeds that once in ``__main__``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from simenv.arrays import check_item_ids
from simenv.types import EventType, Obs

from ._layers import MLP, RMSNorm, RotaryEmbedding, TransformerBlock, check_positive_int
from ._layers import reset_parameters as _reset_parameters
from .item import IDItemTower, ItemTower

__all__ = [
    "GRUUserTower",
    "MeanPoolUserTower",
    "TransformerUserTower",
    "UserTower",
    "UserTowerConfig",
    "build_user_tower",
    "time_bucket",
]

USER_TOWER_KINDS = ("mean", "transformer", "gru")
POSITIONAL_KINDS = ("learned", "rotary")
POOLING_KINDS = ("last", "cls", "mean")
N_TIME_BUCKETS = 24  # log2 buckets of minutes since the event: bucket 23 is ~16 years
N_CONTEXT_FEATURES = 6


def time_bucket(dt: torch.Tensor) -> torch.Tensor:
    """Logarithmic bucket of a time delta: ``floor(log2(1 + minutes))``, clipped to [0, 23].

    Args:
        dt: float ``(...)`` days since the event (negative values count as 0).

    Returns:
        int64 ``(...)`` bucket ids in ``[0, N_TIME_BUCKETS)``.
    """
    minutes = dt.clamp_min(0.0) * (24.0 * 60.0)
    return torch.log2(1.0 + minutes).floor().long().clamp_(0, N_TIME_BUCKETS - 1)


def event_gaps(dt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Time from each event to the next one, and from the most recent event to the request.

    ``dt`` holds each event's age at the request (days since it); the interval after event
    j is ``dt_j - dt_next``, where ``dt_next`` is the age of the next real event (0 after the
    most recent one, whose interval ends at the request). The intervals do not depend on
    the time the ages are measured from, except the last one: so a causal model trained on
    all positions of a window at once (``retrieval.data.causal_windows``) sees at every
    position exactly what serving shows at that position's request.

    Args:
        dt: float ``(B, L)`` ages in days (padding ignored).
        mask: bool ``(B, L)`` real events, oldest first.

    Returns:
        float ``(B, L)`` intervals in days, ``>= 0``; 0 on padding.
    """
    ages = dt.masked_fill(~mask, -math.inf)  # (B, L)
    # the next real event's age: max over later slots (ages fall towards the present)
    later = ages.flip(1).cummax(dim=1).values.flip(1)  # (B, L) inclusive suffix max
    nxt = torch.cat([later[:, 1:], later.new_full((later.shape[0], 1), -math.inf)], dim=1)
    nxt = torch.where(torch.isinf(nxt), torch.zeros_like(nxt), nxt)
    return torch.where(mask, (dt - nxt).clamp_min(0.0), torch.zeros_like(dt))


def request_context_features(context: torch.Tensor) -> torch.Tensor:
    """Features of the request context ``(..., 3)`` = (time days, session, position).

    Returns:
        ``(..., 6)``: daily and weekly phase of the time (sin, cos), log1p(session index),
        log1p(position in session).
    """
    t, session, position = context.unbind(-1)  # (B,) each
    day, week = 2 * math.pi * t, 2 * math.pi * t / 7.0
    return torch.stack(
        [
            day.sin(),
            day.cos(),
            week.sin(),
            week.cos(),
            torch.log1p(session.clamp_min(0.0)),
            torch.log1p(position.clamp_min(0.0)),
        ],
        dim=-1,
    )  # (B, 6)


@dataclass(frozen=True)
class UserTowerConfig:
    """Configuration of a user tower (see :func:`build_user_tower`).

    Attributes:
        kind: ``"mean"`` (YoutubeDNN average pooling), ``"transformer"`` (SASRec-style) or
            ``"gru"`` (GRU4Rec-style).
        dim: output dimension (and model width); None means the item tower's dim. It must
            equal the item tower's dim: user and item vectors meet in a dot product.
        share_item_tower: encode history items with the item tower itself (shared weights);
            False gives the user tower a fresh :class:`IDItemTower` of its own.
        last_n: mean pooling only over the last n events (None: all).
        time_decay_half_life: mean pooling weights ``0.5 ** (dt / half_life)`` (days; None:
            no decay).
        mlp_hidden: hidden widths of an MLP on top of the mean (empty: no MLP).
        n_layers: transformer blocks / GRU layers.
        n_heads: attention heads (transformer).
        max_len: longest history the transformer accepts (learned position table size).
        positional: ``"learned"`` absolute position embeddings or ``"rotary"`` (in attention).
        causal: causal (SASRec, decoder) or bidirectional (BERT4Rec, encoder) attention.
        pooling: ``"last"`` token, ``"cls"`` token or masked ``"mean"`` (transformer).
        use_event_type: add an event-type embedding to each event (transformer, GRU).
        use_context: add an embedding of the interval after each event (to the next event,
            or to the request for the most recent one) to each event, and a projection of
            the request context to the output (transformer, GRU).
        dropout: dropout rate (transformer, GRU).
        ffn_hidden: SwiGLU hidden width (None: 8/3 * dim rounded up to a multiple of 8).
        seed: seed of the tower's own parameter initialisation.
    """

    kind: str = "transformer"
    dim: int | None = None
    share_item_tower: bool = True
    last_n: int | None = None
    time_decay_half_life: float | None = None
    mlp_hidden: tuple[int, ...] = ()
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 50
    positional: str = "learned"
    causal: bool = True
    pooling: str = "last"
    use_event_type: bool = True
    use_context: bool = True
    dropout: float = 0.0
    ffn_hidden: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in USER_TOWER_KINDS:
            raise ValueError(f"kind must be one of {USER_TOWER_KINDS}, got {self.kind!r}")
        if self.dim is not None:
            check_positive_int("dim", self.dim)
        if self.last_n is not None:
            check_positive_int("last_n", self.last_n)
        _check_half_life(self.time_decay_half_life)
        object.__setattr__(self, "mlp_hidden", tuple(self.mlp_hidden))
        for h in self.mlp_hidden:
            check_positive_int("mlp_hidden[i]", h)
        check_positive_int("n_layers", self.n_layers)
        check_positive_int("n_heads", self.n_heads)
        check_positive_int("max_len", self.max_len)
        if self.positional not in POSITIONAL_KINDS:
            raise ValueError(
                f"positional must be one of {POSITIONAL_KINDS}, got {self.positional!r}"
            )
        if self.pooling not in POOLING_KINDS:
            raise ValueError(f"pooling must be one of {POOLING_KINDS}, got {self.pooling!r}")
        _check_dropout(self.dropout)
        if self.ffn_hidden is not None:
            check_positive_int("ffn_hidden", self.ffn_hidden)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.kind == "transformer" and self.dim is not None:
            _check_heads(self.dim, self.n_heads, self.positional)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-friendly) of the config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UserTowerConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown UserTowerConfig keys {sorted(unknown)}; known: {sorted(known)}"
            )
        d = dict(d)
        if "mlp_hidden" in d:
            d["mlp_hidden"] = tuple(d["mlp_hidden"])
        return cls(**d)


def _check_half_life(half_life: float | None) -> None:
    if half_life is not None and not (
        isinstance(half_life, (int, float)) and math.isfinite(half_life) and half_life > 0
    ):
        raise ValueError(
            f"time_decay_half_life must be a finite number > 0 or None, got {half_life!r}"
        )


def _check_dropout(dropout: float) -> None:
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")


def _check_heads(dim: int, n_heads: int, positional: str) -> None:
    if dim % n_heads:
        raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
    if positional == "rotary" and (dim // n_heads) % 2:
        raise ValueError(
            f"rotary needs an even head dimension, got dim // n_heads = {dim // n_heads}"
        )


def _derived_seed(seed: int, stream: int) -> int:
    """An independent seed for a sub-component, from the tower seed and a stream id."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


class UserTower(nn.Module):
    """Base class: ``forward(history) -> (B, dim)``; the history layout is in the module doc.

    Attributes:
        item_encoder: the item tower that encodes history items (shared or own).
        dim: output dimension.
        share_item_tower: recorded for :meth:`get_config` (set by :func:`build_user_tower`;
            a tower built directly reports True).
    """

    item_encoder: ItemTower
    dim: int
    share_item_tower: bool = True
    _needs: tuple[str, ...] = (Obs.ITEMS, Obs.MASK)

    def _init_own(self, seed: int) -> None:
        """Seeded init of this tower's own parameters; the item encoder is left untouched."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, child in self.named_children():
                if name != "item_encoder":
                    _reset_parameters(child, g)
            for p in self.parameters(recurse=False):  # tokens and tables owned directly
                p.normal_(0.0, self.dim**-0.5, generator=g)

    def _history(
        self, history: Mapping[str, Any], per_position_context: bool = False
    ) -> dict[str, torch.Tensor]:
        """Check and convert a history dict; returns tensors on the tower's device.

        ``per_position_context`` also accepts a context of shape ``(B, L, 3)``.
        """
        if not isinstance(history, Mapping):
            raise ValueError(f"history must be a dict of arrays, got {type(history).__name__}")
        missing = [k for k in self._needs if k not in history]
        if missing:
            raise ValueError(f"history lacks keys {missing}; this tower needs {list(self._needs)}")
        device = self.empty.device
        items = torch.as_tensor(history[Obs.ITEMS], device=device)
        if items.ndim != 2 or items.dtype != torch.int64:
            raise ValueError(
                f"history['item_ids'] must be int64 of shape (B, L), got {items.dtype} {tuple(items.shape)}"
            )
        out = {Obs.ITEMS: items}
        mask = torch.as_tensor(history[Obs.MASK], device=device)
        if mask.shape != items.shape:
            raise ValueError(
                f"history['mask'] must have shape {tuple(items.shape)}, got {tuple(mask.shape)}"
            )
        out[Obs.MASK] = mask != 0
        if Obs.EVENTS in self._needs:
            events = torch.as_tensor(history[Obs.EVENTS], device=device)
            if events.shape != items.shape or events.dtype != torch.int64:
                raise ValueError(
                    f"history['events'] must be int64 of shape {tuple(items.shape)}, "
                    f"got {events.dtype} {tuple(events.shape)}"
                )
            if events.numel() and (events.min() < 0 or events.max() >= EventType.n_types()):
                raise ValueError(
                    f"history['events'] must lie in [0, {EventType.n_types()}), "
                    f"got [{int(events.min())}, {int(events.max())}]"
                )
            out[Obs.EVENTS] = events
        if Obs.DT in self._needs:
            dt = torch.as_tensor(history[Obs.DT], device=device, dtype=torch.float32)
            if dt.shape != items.shape:
                raise ValueError(
                    f"history['dt'] must have shape {tuple(items.shape)}, got {tuple(dt.shape)}"
                )
            if not bool(torch.isfinite(dt).all()):
                raise ValueError("history['dt'] must be finite")
            out[Obs.DT] = dt
        if Obs.CONTEXT in self._needs:
            ctx = torch.as_tensor(history[Obs.CONTEXT], device=device, dtype=torch.float32)
            shapes = [(items.shape[0], 3)]
            if per_position_context:
                shapes.append((*items.shape, 3))
            if tuple(ctx.shape) not in shapes:
                want = " or ".join(str(s_) for s_ in shapes)
                raise ValueError(
                    f"history['context'] must have shape {want}, got {tuple(ctx.shape)}"
                )
            out[Obs.CONTEXT] = ctx
        return out

    def _item_vectors(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Item vectors of the history, zero on padding (padded ids never reach the encoder)."""
        ids = torch.where(mask, items, torch.zeros_like(items))  # (B, L)
        return self.item_encoder(ids) * mask.unsqueeze(-1)  # (B, L, d_item)

    def _empty_fill(self, pooled: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace the vectors of users with no real event by the learned empty vector."""
        has_events = mask.any(dim=1, keepdim=True)  # (B, 1)
        return torch.where(has_events, pooled, self.empty.expand_as(pooled))  # (B, d)

    def get_config(self) -> UserTowerConfig:  # pragma: no cover - abstract
        """The :class:`UserTowerConfig` that rebuilds this tower with :meth:`from_config`."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: UserTowerConfig, item_tower: ItemTower) -> UserTower:
        """Build a tower from its config (same as :func:`build_user_tower`)."""
        return build_user_tower(config, item_tower)


class MeanPoolUserTower(UserTower):
    """YoutubeDNN user model: the (weighted) average of the history's item vectors.

    Lecture: ``<u, i_target> = sum_k <i_k, i_target>`` up to normalisation, an item2item
    model; optionally only the last n events and time decay. Order is ignored.

    Weights: ``w_t = mask_t * [t among the last n real events] * 0.5 ** (dt_t / half_life)``,
    normalised to sum to 1 (computed in log space, so huge dt cannot underflow to 0/0).
    """

    empty: nn.Parameter

    def __init__(
        self,
        item_encoder: ItemTower,
        last_n: int | None = None,
        time_decay_half_life: float | None = None,
        mlp_hidden: Sequence[int] = (),
        dim: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(item_encoder, ItemTower):
            raise ValueError(
                f"item_encoder must be an ItemTower, got {type(item_encoder).__name__}"
            )
        if last_n is not None:
            check_positive_int("last_n", last_n)
        _check_half_life(time_decay_half_life)
        self.item_encoder = item_encoder
        self.last_n = last_n
        self.time_decay_half_life = time_decay_half_life
        self.mlp_hidden = tuple(check_positive_int("mlp_hidden[i]", h) for h in mlp_hidden)
        self.dim = check_positive_int("dim", dim) if dim is not None else item_encoder.dim
        self.seed = seed
        self._needs = (Obs.ITEMS, Obs.MASK) + ((Obs.DT,) if time_decay_half_life else ())
        with torch.random.fork_rng(devices=[]):
            if self.mlp_hidden:
                self.head: nn.Module = MLP(item_encoder.dim, self.mlp_hidden, self.dim)
            elif self.dim != item_encoder.dim:
                self.head = nn.Linear(item_encoder.dim, self.dim)
            else:
                self.head = nn.Identity()
            self.empty = nn.Parameter(torch.zeros(self.dim))
        self._init_own(seed)

    def pooling_weights(self, history: Mapping[str, Any]) -> torch.Tensor:
        """Normalised pooling weights ``(B, L)``; all zero for an empty history."""
        h = self._history(history)
        return self._weights(h)

    def _weights(self, h: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = h[Obs.MASK]  # (B, L) bool
        keep = mask
        if self.last_n is not None:
            # rank of each real event counted from the most recent: 1 = last
            from_end = mask.flip(1).long().cumsum(1).flip(1)  # (B, L)
            keep = keep & (from_end <= self.last_n)
        if self.time_decay_half_life is not None:
            # time decay: w = 0.5 ** (dt / half_life), i.e. log w = -ln2 * dt / half_life;
            # dt is taken relative to the row's most recent kept event before scaling, which
            # leaves the normalised weights unchanged and keeps float32 exact for huge dt
            dt = h[Obs.DT].masked_fill(~keep, math.inf)  # (B, L)
            newest = dt.amin(dim=1, keepdim=True)  # (B, 1), inf for an empty row
            newest = torch.where(torch.isfinite(newest), newest, torch.zeros_like(newest))
            logw = -math.log(2.0) * (dt - newest) / self.time_decay_half_life  # (B, L), <= 0
            w = torch.exp(logw)  # (B, L), 0 where not kept (dt = inf)
        else:
            w = keep.to(torch.float32)  # (B, L)
        return w / w.sum(dim=1, keepdim=True).clamp_min(1e-30)

    def forward(self, history: Mapping[str, Any]) -> torch.Tensor:
        """Encode users: ``(B, dim)``."""
        h = self._history(history)
        w = self._weights(h)  # (B, L), 0 on padding
        enc = self.item_encoder
        if isinstance(enc, IDItemTower):
            # An ID table: gather and weighted sum in one kernel (embedding_bag), without the
            # (B, L, d) tensor of history vectors and its gradient (half the time of the
            # gather + mask + bmm path on one CPU thread). Same sum: padding has weight 0.
            ids = torch.where(h[Obs.MASK], h[Obs.ITEMS], torch.zeros_like(h[Obs.ITEMS]))
            check_item_ids("history['item_ids']", ids, enc.n_items)
            emb = enc.embedding
            pooled = nn.functional.embedding_bag(
                ids, emb.weight, mode="sum", per_sample_weights=w, sparse=emb.sparse
            )  # (B, d_item)
        else:
            x = self._item_vectors(h[Obs.ITEMS], h[Obs.MASK])  # (B, L, d_item)
            pooled = torch.bmm(w.unsqueeze(1), x).squeeze(1)  # (B, d_item)
        return self._empty_fill(self.head(pooled), h[Obs.MASK])  # (B, d)

    def get_config(self) -> UserTowerConfig:
        """See :meth:`UserTower.get_config`."""
        return UserTowerConfig(
            kind="mean",
            dim=self.dim,
            share_item_tower=self.share_item_tower,
            last_n=self.last_n,
            time_decay_half_life=self.time_decay_half_life,
            mlp_hidden=self.mlp_hidden,
            seed=self.seed,
        )


class _EventInput(nn.Module):
    """Input embedding of events: item vector (+ event type) (+ interval after the event).

    It also holds the projection of the request context, which the towers add to their
    output at the querying position (never to the input tokens: in all-positions training
    every position has its own request, and a token must not carry another one's).
    """

    def __init__(self, item_dim: int, dim: int, use_event_type: bool, use_context: bool) -> None:
        super().__init__()
        self.item_proj = nn.Linear(item_dim, dim, bias=False) if item_dim != dim else nn.Identity()
        self.event = nn.Embedding(EventType.n_types(), dim) if use_event_type else None
        self.dt = nn.Embedding(N_TIME_BUCKETS, dim) if use_context else None
        self.request = nn.Linear(N_CONTEXT_FEATURES, dim) if use_context else None

    def zero_request(self) -> None:
        """Start the request-context projection at zero: no effect until trained."""
        if self.request is not None:
            with torch.no_grad():
                self.request.weight.zero_()
                self.request.bias.zero_()

    def forward(self, item_vecs: torch.Tensor, h: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.item_proj(item_vecs)  # (B, L, d)
        if self.event is not None:
            x = x + self.event(h[Obs.EVENTS])  # event type: PAD on padding
        if self.dt is not None:
            gaps = event_gaps(h[Obs.DT], h[Obs.MASK])  # (B, L) interval after each event
            x = x + self.dt(time_bucket(gaps))
        return x

    def request_vector(self, h: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``(B, d)`` for a context ``(B, 3)``; ``(B, L, d)`` for one per position."""
        if self.request is None:
            return None
        return self.request(request_context_features(h[Obs.CONTEXT]))


def _with_request(
    out: torch.Tensor, inputs: _EventInput, h: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``out`` ``(B, d)`` or ``(B, L, d)`` plus the request-context projection (if any)."""
    request = inputs.request_vector(h)  # (B, d) or (B, L, d)
    if request is None:
        return out
    if out.ndim == 3 and request.ndim == 2:
        request = request.unsqueeze(1)  # (B, 1, d): one request for every position
    return out + request


class TransformerUserTower(UserTower):
    """SASRec-style transformer over the event history.

    Each event's input is the sum of: the item vector (from ``item_encoder``, shared with the
    item tower or not), an event-type embedding, a learned position embedding (unless rotary
    is used inside attention) and an embedding of ``log2`` buckets of the interval after the
    event (:func:`event_gaps`: to the next event, or to the request for the most recent
    one; TiSASRec-style relative intervals). A projection of the request context (time of
    day/week, session index, position in session; zero at init) is added to the output at
    the querying position, so that in all-positions training (:meth:`forward_sequence` with
    one context per position) each position sees its own request and nothing of another's,
    as at serving. Positions are counted from the end: the most recent slot is
    ``max_len - 1`` whatever L is, so a history means the same at any padding length.

    Blocks are pre-norm with RMSNorm, multi-head attention through
    :func:`torch.nn.functional.scaled_dot_product_attention` with a causal or bidirectional
    mask plus a padding mask, and a SwiGLU feed-forward; a final RMSNorm follows. Every
    query may always attend to itself, so an all-padding row never gives NaN.

    Pooling: ``"last"`` takes the most recent real event's output, ``"cls"`` a learned CLS
    token appended after the history (so under a causal mask it still sees every event),
    ``"mean"`` the masked mean of the outputs. :meth:`forward_sequence` returns every
    position's output for next-item training (position t predicts the item at t + 1).
    """

    empty: nn.Parameter

    def __init__(
        self,
        item_encoder: ItemTower,
        dim: int,
        n_layers: int = 2,
        n_heads: int = 2,
        max_len: int = 50,
        positional: str = "learned",
        causal: bool = True,
        pooling: str = "last",
        use_event_type: bool = True,
        use_context: bool = True,
        dropout: float = 0.0,
        ffn_hidden: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(item_encoder, ItemTower):
            raise ValueError(
                f"item_encoder must be an ItemTower, got {type(item_encoder).__name__}"
            )
        check_positive_int("dim", dim)
        check_positive_int("n_layers", n_layers)
        check_positive_int("n_heads", n_heads)
        check_positive_int("max_len", max_len)
        if positional not in POSITIONAL_KINDS:
            raise ValueError(f"positional must be one of {POSITIONAL_KINDS}, got {positional!r}")
        if pooling not in POOLING_KINDS:
            raise ValueError(f"pooling must be one of {POOLING_KINDS}, got {pooling!r}")
        _check_dropout(dropout)
        _check_heads(dim, n_heads, positional)
        if ffn_hidden is None:
            ffn_hidden = -(-8 * dim // 3 // 8) * 8  # SwiGLU width 8/3 d, multiple of 8
        check_positive_int("ffn_hidden", ffn_hidden)
        self.item_encoder = item_encoder
        self.dim, self.n_layers, self.n_heads, self.max_len = dim, n_layers, n_heads, max_len
        self.positional, self.causal, self.pooling = positional, bool(causal), pooling
        self.use_event_type, self.use_context = bool(use_event_type), bool(use_context)
        self.dropout, self.ffn_hidden, self.seed = float(dropout), ffn_hidden, seed
        needs = [Obs.ITEMS, Obs.MASK]
        needs += [Obs.EVENTS] if use_event_type else []
        needs += [Obs.DT, Obs.CONTEXT] if use_context else []
        self._needs = tuple(needs)
        n_pos = max_len + 1  # one more slot for the CLS token
        with torch.random.fork_rng(devices=[]):
            self.inputs = _EventInput(item_encoder.dim, dim, use_event_type, use_context)
            self.position = nn.Embedding(n_pos, dim) if positional == "learned" else None
            self.rotary = RotaryEmbedding(dim // n_heads, n_pos) if positional == "rotary" else None
            self.input_dropout = nn.Dropout(dropout)
            self.blocks = nn.ModuleList(
                TransformerBlock(dim, n_heads, ffn_hidden, dropout) for _ in range(n_layers)
            )
            self.final_norm = RMSNorm(dim)
            self.empty = nn.Parameter(torch.zeros(dim))
            self.cls = nn.Parameter(torch.zeros(dim)) if pooling == "cls" else None
        self._init_own(seed)
        self.inputs.zero_request()

    def _run(
        self, h: dict[str, torch.Tensor], query_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Transformer outputs ``(B, S, d)`` (S = L, or L + 1 with CLS last).

        With ``query_index`` ``(B,)`` the last block computes only that position of each
        row and the result is ``(B, 1, d)``.
        """
        items, mask = h[Obs.ITEMS], h[Obs.MASK]
        b, seq = items.shape
        if seq > self.max_len:
            raise ValueError(f"history length L={seq} exceeds max_len={self.max_len}")
        x = self.inputs(self._item_vectors(items, mask), h)  # (B, L, d)
        key_real = mask
        if self.cls is not None:
            x = torch.cat([x, self.cls.expand(b, 1, -1)], dim=1)  # (B, L+1, d)
            key_real = torch.cat([mask, mask.new_ones(b, 1)], dim=1)  # (B, L+1)
        s = x.shape[1]
        # right-aligned positions: the most recent event is max_len - 1, CLS is max_len
        positions = torch.arange(self.max_len - seq, self.max_len - seq + s, device=x.device)
        if self.position is not None:
            x = x + self.position(positions)  # (S, d) broadcast
        x = self.input_dropout(x)
        eye = torch.eye(s, dtype=torch.bool, device=x.device)
        allowed = key_real.unsqueeze(1).expand(b, s, s)  # (B, S, S): keys that are real
        if self.causal:
            allowed = allowed & torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        allowed = (allowed | eye).unsqueeze(1)  # (B, 1, S, S); self always visible: no NaN
        for i, block in enumerate(self.blocks):
            last_block = i == len(self.blocks) - 1
            x = block(x, allowed, self.rotary, positions, query_index if last_block else None)
        return self.final_norm(x)

    def forward_sequence(self, history: Mapping[str, Any]) -> torch.Tensor:
        """Output at every history position, ``(B, L, dim)``; zero on padded positions.

        With ``causal=True`` position t depends only on events ``<= t`` (and its request
        context): train next-item prediction with position t predicting the item at t + 1.
        The context may be one per row ``(B, 3)`` or one per position ``(B, L, 3)`` (the
        request of the event each position predicts).
        """
        h = self._history(history, per_position_context=True)
        mask = h[Obs.MASK]
        out = _with_request(self._run(h)[:, : mask.shape[1]], self.inputs, h)  # (B, L, d)
        return out * mask.unsqueeze(-1)

    def forward(self, history: Mapping[str, Any]) -> torch.Tensor:
        """Encode users: ``(B, dim)``."""
        h = self._history(history)
        mask = h[Obs.MASK]
        b, seq = mask.shape
        if self.pooling == "mean":
            out = self._run(h)[:, :seq]  # (B, L, d)
            m = mask.unsqueeze(-1).to(out.dtype)  # (B, L, 1)
            pooled = (out * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, d)
        else:
            if self.pooling == "cls":
                query = torch.full((b,), seq, dtype=torch.int64, device=mask.device)
            else:  # most recent real event (the last slot under left padding)
                query = seq - 1 - mask.flip(1).long().argmax(dim=1)  # (B,)
            pooled = self._run(h, query_index=query).squeeze(1)  # (B, d)
        return self._empty_fill(_with_request(pooled, self.inputs, h), mask)

    def get_config(self) -> UserTowerConfig:
        """See :meth:`UserTower.get_config`."""
        return UserTowerConfig(
            kind="transformer",
            dim=self.dim,
            share_item_tower=self.share_item_tower,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            max_len=self.max_len,
            positional=self.positional,
            causal=self.causal,
            pooling=self.pooling,
            use_event_type=self.use_event_type,
            use_context=self.use_context,
            dropout=self.dropout,
            ffn_hidden=self.ffn_hidden,
            seed=self.seed,
        )


class GRUUserTower(UserTower):
    """GRU4Rec-style recurrent user tower.

    Inputs as in :class:`TransformerUserTower` (item + event type + interval bucket, no
    position: the recurrence sees the order; the request context is added to the output at
    the querying position). Real events are packed
    (``pack_padded_sequence``), so the number of padding slots never changes the result;
    the user vector is a linear map of the last hidden state.
    """

    empty: nn.Parameter

    def __init__(
        self,
        item_encoder: ItemTower,
        dim: int,
        n_layers: int = 1,
        use_event_type: bool = True,
        use_context: bool = True,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(item_encoder, ItemTower):
            raise ValueError(
                f"item_encoder must be an ItemTower, got {type(item_encoder).__name__}"
            )
        check_positive_int("dim", dim)
        check_positive_int("n_layers", n_layers)
        _check_dropout(dropout)
        self.item_encoder = item_encoder
        self.dim, self.n_layers, self.dropout, self.seed = dim, n_layers, float(dropout), seed
        self.use_event_type, self.use_context = bool(use_event_type), bool(use_context)
        needs = [Obs.ITEMS, Obs.MASK]
        needs += [Obs.EVENTS] if use_event_type else []
        needs += [Obs.DT, Obs.CONTEXT] if use_context else []
        self._needs = tuple(needs)
        with torch.random.fork_rng(devices=[]):
            self.inputs = _EventInput(item_encoder.dim, dim, use_event_type, use_context)
            self.gru = nn.GRU(
                dim,
                dim,
                num_layers=n_layers,
                batch_first=True,
                dropout=dropout if n_layers > 1 else 0.0,
            )
            self.out = nn.Linear(dim, dim)
            self.empty = nn.Parameter(torch.zeros(dim))
        self._init_own(seed)
        self.inputs.zero_request()

    def _run(self, h: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items, mask = h[Obs.ITEMS], h[Obs.MASK]
        seq = items.shape[1]
        x = self.inputs(self._item_vectors(items, mask), h)  # (B, L, d)
        # move real events to the front, in order (stable sort), so they can be packed
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # (B, L)
        x = x.gather(1, order.unsqueeze(-1).expand_as(x))  # (B, L, d), real events first
        lengths = mask.sum(1).clamp_min(1).cpu()  # an empty row runs one (ignored) step
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        out_packed, last = self.gru(packed)  # last: (n_layers, B, d)
        out, _ = nn.utils.rnn.pad_packed_sequence(out_packed, batch_first=True, total_length=seq)
        seq_out = torch.zeros_like(out).scatter_(1, order.unsqueeze(-1).expand_as(out), out)
        return seq_out, last[-1], mask

    def forward_sequence(self, history: Mapping[str, Any]) -> torch.Tensor:
        """Output at every history position, ``(B, L, dim)``; zero on padded positions.

        The context may be one per row ``(B, 3)`` or one per position ``(B, L, 3)``.
        """
        h = self._history(history, per_position_context=True)
        seq_out, _, mask = self._run(h)
        out = _with_request(self.out(seq_out), self.inputs, h)  # (B, L, d)
        return out * mask.unsqueeze(-1)

    def forward(self, history: Mapping[str, Any]) -> torch.Tensor:
        """Encode users: ``(B, dim)``."""
        h = self._history(history)
        _, last, mask = self._run(h)
        return self._empty_fill(_with_request(self.out(last), self.inputs, h), mask)  # (B, d)

    def get_config(self) -> UserTowerConfig:
        """See :meth:`UserTower.get_config`."""
        return UserTowerConfig(
            kind="gru",
            dim=self.dim,
            share_item_tower=self.share_item_tower,
            n_layers=self.n_layers,
            use_event_type=self.use_event_type,
            use_context=self.use_context,
            dropout=self.dropout,
            seed=self.seed,
        )


def build_user_tower(config: UserTowerConfig, item_tower: ItemTower) -> UserTower:
    """Build the user tower described by ``config`` against ``item_tower``.

    Args:
        config: the tower's configuration.
        item_tower: the item tower of the two-tower model. Its ``dim`` is the user vector's
            dim; with ``config.share_item_tower`` it also encodes the history items,
            otherwise a fresh :class:`IDItemTower` of the same size does.

    Returns:
        A freshly initialised user tower (same config and item tower, same weights).
    """
    if not isinstance(config, UserTowerConfig):
        raise ValueError(f"config must be a UserTowerConfig, got {type(config).__name__}")
    if not isinstance(item_tower, ItemTower):
        raise ValueError(f"item_tower must be an ItemTower, got {type(item_tower).__name__}")
    if config.dim is not None and config.dim != item_tower.dim:
        raise ValueError(
            f"config.dim={config.dim} must equal item_tower.dim={item_tower.dim} "
            "(user and item vectors meet in a dot product)"
        )
    dim = item_tower.dim
    if config.share_item_tower:
        encoder = item_tower
    else:
        encoder = IDItemTower(item_tower.n_items, dim, seed=_derived_seed(config.seed, 1))
    tower: UserTower
    if config.kind == "mean":
        tower = MeanPoolUserTower(
            encoder,
            last_n=config.last_n,
            time_decay_half_life=config.time_decay_half_life,
            mlp_hidden=config.mlp_hidden,
            dim=dim,
            seed=config.seed,
        )
    elif config.kind == "transformer":
        tower = TransformerUserTower(
            encoder,
            dim,
            n_layers=config.n_layers,
            n_heads=config.n_heads,
            max_len=config.max_len,
            positional=config.positional,
            causal=config.causal,
            pooling=config.pooling,
            use_event_type=config.use_event_type,
            use_context=config.use_context,
            dropout=config.dropout,
            ffn_hidden=config.ffn_hidden,
            seed=config.seed,
        )
    else:
        tower = GRUUserTower(
            encoder,
            dim,
            n_layers=config.n_layers,
            use_event_type=config.use_event_type,
            use_context=config.use_context,
            dropout=config.dropout,
            seed=config.seed,
        )
    tower.share_item_tower = config.share_item_tower
    return tower
