"""Features of the ranker: item statistics from the training log and early-binding crosses.

Three kinds of input reach the ranker, and they are split by what they depend on so that the
full-catalog path stays cheap (see :class:`ranking.model.Ranker`):

- **item side** (depends on the item only; cached once per item): the item's public content
  (categorical ids and title tokens of :class:`simenv.types.ItemCatalog`) and its statistics in
  the training log (:class:`ItemStatistics`: impressions, clicks, likes, dislikes, watch time,
  log-scaled and smoothed);
- **user side** (depends on the request only; computed once per row): the visible history and
  the context;
- **pair side** (depends on user and item together; computed per pair with cheap gathers):
  the *cross features* of :class:`CrossFeatures`. For each categorical attribute of the item
  (topic, creator, group in the simulator) they say how the user engaged with that value in the
  visible history (counts of engagements, likes, dislikes, time-decayed counts at a short and a
  long half-life, repeats among the last few events, share of the history); for the item itself,
  whether and how recently it is in the history; and the item's age at the query time. These are
  the features a two-tower model cannot express: a dot product of a user vector with an item
  vector cannot count how many of the last four events share this item's topic.

Everything here reads only the observation dict, the public catalog and the training log;
never the world's hidden truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from simenv.log import ImpressionLog
from simenv.types import Columns, EventType, ItemCatalog, Obs

__all__ = [
    "f64",
    "ATTRIBUTE_FEATURES",
    "ITEM_FEATURES",
    "STAT_FEATURES",
    "ItemStatistics",
    "CrossFeatures",
    "UserTables",
    "check_obs",
    "first_occurrence",
]

# per-attribute cross features (one block per categorical attribute), in column order
ATTRIBUTE_FEATURES = (
    "log_count",  # log(1 + engagements with this value)
    "log_likes",  # log(1 + likes)
    "log_dislikes",  # log(1 + dislikes)
    "log_decay_short",  # log(1 + sum 2^(-dt / short_half_life)): fatigue proxy
    "log_decay_long",  # log(1 + sum 2^(-dt / long_half_life))
    "recent_share",  # engagements among the last R events / R: repeats, fatigue proxy
    "share",  # engagements / events in the history
)
# cross features of the item itself
ITEM_FEATURES = (
    "log_count",  # log(1 + times the item is in the history)
    "recent",  # times among the last R events / R
    "recency",  # max over its events of 2^(-dt / short_half_life) (0 if absent)
    "liked",  # 1 if one of its events is a like
    "disliked",  # 1 if one of its events is a dislike
)
# item statistics from the training log
STAT_FEATURES = (
    "log_impressions",
    "log_clicks",
    "ctr_logit",  # logit of the smoothed click rate (clicks + a p) / (impressions + a)
    "like_rate",  # smoothed likes per click
    "dislike_rate",  # smoothed dislikes per click
    "log_watch_per_click",  # log(1 + smoothed watch minutes per click)
)

_N_RAW = 6  # raw per-attribute sums: count, likes, dislikes, decay short, decay long, recent


def f64(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` evaluated in float64 and rounded once to float32.

    Vectorised and scalar (tail) float32 kernels of transcendental functions may differ in the
    last bit, so a float32 ``log1p`` of a value could depend on where the value sits in a
    tensor, hence on the batch around it. Rounding a float64 result once removes that (a
    float32 mismatch would need two float64 results one ulp apart to straddle a float32
    rounding boundary). Every transcendental function of a feature goes through here, which
    makes scores independent of batch composition and the two scoring paths bitwise equal.
    """
    return fn(x.double()).float()


def check_obs(obs: dict[str, np.ndarray], n_items: int) -> int:
    """Check a batched observation dict; return its batch size B.

    Raises:
        ValueError: a key is missing, shapes disagree, or item ids are outside ``[0, n_items)``.
    """
    for key in (Obs.ITEMS, Obs.EVENTS, Obs.DT, Obs.MASK, Obs.CONTEXT):
        if key not in obs:
            raise ValueError(
                f"obs is missing key {key!r}; needs item_ids, events, dt, mask, context"
            )
    items = np.asarray(obs[Obs.ITEMS])
    if items.ndim != 2:
        raise ValueError(
            f"obs['item_ids'] must be batched (B, L); got shape {items.shape} "
            "(add a leading batch axis to a single observation)"
        )
    b, length = items.shape
    for key in (Obs.EVENTS, Obs.DT, Obs.MASK):
        if np.shape(obs[key]) != (b, length):
            raise ValueError(
                f"obs[{key!r}] must have shape {(b, length)}, got {np.shape(obs[key])}"
            )
    if np.shape(obs[Obs.CONTEXT]) != (b, 3):
        raise ValueError(
            f"obs['context'] must have shape {(b, 3)}, got {np.shape(obs[Obs.CONTEXT])}"
        )
    mask = np.asarray(obs[Obs.MASK]) > 0
    if mask.any():
        real = items[mask]
        if real.min() < 0 or real.max() >= n_items:
            raise ValueError(
                f"obs['item_ids'] must be item ids in [0, {n_items - 1}] where mask is 1, got values "
                f"in [{real.min()}, {real.max()}]"
            )
    return b


# ---------------------------------------------------------------------------- statistics
@dataclass(frozen=True, eq=False)
class ItemStatistics:
    """Per-item counts in the training log (the ranker's popularity features).

    Attributes:
        impressions: float64 (N,) times shown.
        clicks: float64 (N,) clicks (any engagement: click, like or dislike).
        likes: float64 (N,) likes.
        dislikes: float64 (N,) dislikes.
        watch: float64 (N,) total watch minutes.
        prior_strength: ``a``, pseudo-impressions (and pseudo-clicks) of the global rates that
            smooth the per-item rates.
    """

    impressions: np.ndarray
    clicks: np.ndarray
    likes: np.ndarray
    dislikes: np.ndarray
    watch: np.ndarray
    prior_strength: float = 10.0

    def __post_init__(self) -> None:
        n = np.shape(self.impressions)
        for name in ("clicks", "likes", "dislikes", "watch"):
            if np.shape(getattr(self, name)) != n or len(n) != 1:
                raise ValueError(
                    f"{name} must have the shape of impressions {n}, got {np.shape(getattr(self, name))}"
                )
        if not (math.isfinite(self.prior_strength) and self.prior_strength > 0):
            raise ValueError(
                f"prior_strength must be a number in (0, inf), got {self.prior_strength}"
            )

    @classmethod
    def from_log(
        cls, log: ImpressionLog, n_items: int, prior_strength: float = 10.0
    ) -> ItemStatistics:
        """Counts of every item in ``log`` (rows with item ids outside ``[0, n_items)`` raise)."""
        items = log[Columns.ITEM]
        if items.size and (items.min() < 0 or items.max() >= n_items):
            raise ValueError(
                f"log has item ids in [{items.min()}, {items.max()}], outside [0, {n_items - 1}]"
            )
        fb = log[Columns.FEEDBACK]
        clicked = np.isin(fb, [int(EventType.CLICK), int(EventType.LIKE), int(EventType.DISLIKE)])

        def count(weights: np.ndarray) -> np.ndarray:
            return np.bincount(items, weights=weights.astype(np.float64), minlength=n_items)

        return cls(
            impressions=np.bincount(items, minlength=n_items).astype(np.float64),
            clicks=count(clicked),
            likes=count(fb == EventType.LIKE),
            dislikes=count(fb == EventType.DISLIKE),
            watch=count(log[Columns.WATCH]),
            prior_strength=float(prior_strength),
        )

    @classmethod
    def empty(cls, n_items: int, prior_strength: float = 10.0) -> ItemStatistics:
        """No log seen: every item gets the prior."""
        z = np.zeros(n_items, dtype=np.float64)
        return cls(z, z.copy(), z.copy(), z.copy(), z.copy(), float(prior_strength))

    @property
    def n_items(self) -> int:
        """N."""
        return int(self.impressions.shape[0])

    def priors(self) -> tuple[float, float, float, float]:
        """Global (click rate, like rate per click, dislike rate per click, watch per click).

        Without any impression (an empty log) the click rate prior is 0.05 and the per-click
        rates 0 (watch) or 0.1 (likes, dislikes): placeholders that only matter for a ranker
        trained on nothing.
        """
        imp, clk = self.impressions.sum(), self.clicks.sum()
        ctr = clk / imp if imp > 0 else 0.05
        ctr = min(max(ctr, 1e-4), 1 - 1e-4)
        like = self.likes.sum() / clk if clk > 0 else 0.1
        dislike = self.dislikes.sum() / clk if clk > 0 else 0.1
        watch = self.watch.sum() / clk if clk > 0 else 0.0
        return float(ctr), float(like), float(dislike), float(watch)

    def features(
        self,
        items: np.ndarray | None = None,
        exclude: tuple[np.ndarray, ...] | None = None,
    ) -> np.ndarray:
        """Statistics features (:data:`STAT_FEATURES`), float32 ``items.shape + (6,)``.

        Args:
            items: int item ids of any shape (default: every item, shape (N,)).
            exclude: optional ``(clicked, liked, disliked, watch_minutes)`` arrays of
                ``items``' shape: one impression with this outcome is taken out of the item's
                counts first (leave-one-out). Training uses it so that an example's own label
                never leaks into its popularity features.
        """
        items = np.arange(self.n_items) if items is None else np.asarray(items, dtype=np.int64)
        a = self.prior_strength
        p_ctr, p_like, p_dislike, p_watch = self.priors()
        imp = self.impressions[items]
        clk = self.clicks[items]
        lk = self.likes[items]
        dl = self.dislikes[items]
        wt = self.watch[items]
        if exclude is not None:
            clicked, liked, disliked, watch = (np.asarray(x, dtype=np.float64) for x in exclude)
            imp = np.maximum(imp - 1.0, 0.0)
            clk = np.maximum(clk - clicked, 0.0)
            lk = np.maximum(lk - liked, 0.0)
            dl = np.maximum(dl - disliked, 0.0)
            wt = np.maximum(wt - watch, 0.0)
        ctr = (clk + a * p_ctr) / (imp + a)  # smoothed click rate in (0, 1)
        out = np.stack(
            [
                np.log1p(imp),
                np.log1p(clk),
                np.log(ctr) - np.log1p(-ctr),
                (lk + a * p_like) / (clk + a),
                (dl + a * p_dislike) / (clk + a),
                np.log1p((wt + a * p_watch) / (clk + a)),
            ],
            axis=-1,
        )
        return out.astype(np.float32)


# ---------------------------------------------------------------------------- crosses
@dataclass(frozen=True, eq=False)
class UserTables:
    """Per-request summaries of the history from which any item's cross features follow.

    A row's history holds at most L distinct values of an attribute, so the per-value features
    are kept per history slot: ``slot_features[b, a, l]`` are the features of the value of
    attribute ``a`` at slot ``l`` (aggregated over every slot with that value), and
    ``first_keys[b, l, a]`` marks the first slot of each distinct value. An item whose value
    occurs in the history takes the features of that slot; any other item has all-zero
    features there (no engagement with that value).

    Attributes:
        slot_features: float32 (B, A, L, 7) :data:`ATTRIBUTE_FEATURES` of each slot's value
            (zeros on padding).
        first_keys: int64 (B, L, A) offset value ids where the slot holds the first occurrence
            of its value in the row, -1 elsewhere and on padding.
        items: int64 (B, L) history item ids (-1 on padding).
        item_weights: float32 (B, L, 4) per history event: recent (last R) flag, short-decay
            weight, like flag, dislike flag (0 on padding).
        time: float32 (B,) query time.
    """

    slot_features: torch.Tensor
    first_keys: torch.Tensor
    items: torch.Tensor
    item_weights: torch.Tensor
    time: torch.Tensor


def first_occurrence(keys: torch.Tensor) -> torch.Tensor:
    """Keep a key only at its first occurrence along L.

    Returns ``keys`` (B, L, ...) where the slot holds the first occurrence of its key in the
    row, else -1 (negative keys stay -1).
    """
    same = keys[:, :, None] == keys[:, None, :]  # (B, L, L, ...)
    length = keys.shape[1]
    earlier = torch.ones(length, length, dtype=torch.bool, device=keys.device).tril(-1)  # l' < l
    earlier = earlier.view(1, length, length, *([1] * (keys.dim() - 2)))
    dup = (same & earlier).any(dim=2)
    return torch.where(dup | (keys < 0), torch.full_like(keys, -1), keys)


class CrossFeatures:
    """Pair-level (user x item) cross features, batched, exact in both scoring paths.

    Column layout (:meth:`names`): for each enabled attribute (in catalog order) the
    :data:`ATTRIBUTE_FEATURES` block; then the :data:`ITEM_FEATURES` block if ``"item"`` is
    enabled; then ``age_log`` (``log(1 + max(t - release, 0))``) if ``"age"`` is enabled.

    Per-user work is O(L^2) per attribute (each slot aggregates the slots with the same value);
    per-pair work is a comparison of the item's value with the L first-occurrence keys and a
    copy of the matching slot's features. Every value is a copy of one per-slot number, an
    integer-valued sum, a maximum or an elementwise function of the pair alone, so the
    full-catalog form (:meth:`catalog`) and the candidate form (:meth:`pairs`) agree bitwise.

    Args:
        catalog: the public item content.
        crosses: enabled crosses: categorical attribute names of the catalog, ``"item"``,
            ``"age"``.
        recent_events: R, the "last few events" window.
        short_half_life: days, half-life of the short time decay (fatigue proxy).
        long_half_life: days, half-life of the long time decay.
    """

    def __init__(
        self,
        catalog: ItemCatalog,
        crosses: tuple[str, ...],
        recent_events: int,
        short_half_life: float,
        long_half_life: float,
    ) -> None:
        names = catalog.categorical_names
        for c in crosses:
            if c not in names and c not in ("item", "age"):
                raise ValueError(
                    f"cross_features entry {c!r} is not a catalog attribute {names} nor "
                    "'item' or 'age'"
                )
        self.attributes = tuple(n for n in names if n in crosses)
        self.use_item = "item" in crosses
        self.use_age = "age" in crosses
        self.recent_events = int(recent_events)
        self.short_half_life = float(short_half_life)
        self.long_half_life = float(long_half_life)
        cols = [names.index(a) for a in self.attributes]
        cards = [int(catalog.categorical_cardinalities[j]) for j in cols]
        values = catalog.categorical[:, cols].astype(np.int64)  # (N, A)
        if values.size and (values.min() < 0 or np.any(values >= np.asarray(cards)[None, :])):
            raise ValueError("catalog categorical ids must lie in [0, cardinality)")
        offsets = np.r_[0, np.cumsum(cards)].astype(np.int64)
        self.n_values = int(offsets[-1])  # C: the attributes' value ranges laid end to end
        keys = values + offsets[:-1][None, :]  # (N, A) offset value ids
        self.keys = torch.from_numpy(np.ascontiguousarray(keys))
        self.cardinalities = tuple(cards)
        self.offsets = tuple(int(o) for o in offsets[:-1])
        self.release = torch.from_numpy(catalog.release_time.astype(np.float32))  # (N,)
        self.n_items = catalog.n_items
        self._csr: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def to(self, device: torch.device) -> CrossFeatures:
        """Move the item tables to ``device`` (in place; :class:`ranking.model.Ranker` calls it)."""
        self.keys = self.keys.to(device)
        self.release = self.release.to(device)
        self._csr = {j: (a.to(device), b.to(device)) for j, (a, b) in self._csr.items()}
        return self

    # ------------------------------------------------------------------ layout
    @property
    def n_features(self) -> int:
        """F, the number of cross-feature columns."""
        return (
            len(self.attributes) * len(ATTRIBUTE_FEATURES)
            + (len(ITEM_FEATURES) if self.use_item else 0)
            + int(self.use_age)
        )

    @property
    def n_attribute_features(self) -> int:
        """Columns of the attribute blocks (the leading columns)."""
        return len(self.attributes) * len(ATTRIBUTE_FEATURES)

    def names(self) -> list[str]:
        """Column names, e.g. ``topic.log_count``, ``item.recency``, ``age_log``."""
        out = [f"{a}.{f}" for a in self.attributes for f in ATTRIBUTE_FEATURES]
        if self.use_item:
            out += [f"item.{f}" for f in ITEM_FEATURES]
        if self.use_age:
            out.append("age_log")
        return out

    # ------------------------------------------------------------------ user side
    def user_tables(self, obs: dict[str, torch.Tensor]) -> UserTables:
        """Per-slot features of each row's history (see :class:`UserTables`)."""
        items = obs[Obs.ITEMS]  # (B, L)
        mask = obs[Obs.MASK] > 0  # (B, L)
        events = obs[Obs.EVENTS]
        dt = obs[Obs.DT].float().clamp_min(0.0)
        b, length = items.shape
        m = mask.float()
        recent = torch.zeros_like(m)
        r = min(self.recent_events, length)
        recent[:, length - r :] = 1.0
        recent *= m  # last R slots that hold real events
        short = f64(torch.exp2, -dt / self.short_half_life) * m  # 2^(-dt / h_short)
        like = (events == EventType.LIKE).float() * m
        dislike = (events == EventType.DISLIKE).float() * m
        hist = torch.where(mask, items, torch.full_like(items, -1))
        item_weights = torch.stack([recent, short, like, dislike], dim=-1)  # (B, L, 4)
        a = len(self.attributes)
        safe = torch.where(mask, items, torch.zeros_like(items))
        k = self.keys[safe].permute(0, 2, 1)  # (B, A, L)
        k = torch.where(mask[:, None, :], k, torch.full_like(k, -1))
        feats = torch.zeros(b, a, length, len(ATTRIBUTE_FEATURES), device=items.device)
        first = k
        if a:
            same = k[:, :, :, None] == k[:, :, None, :]  # (B, A, L, L')
            earlier = torch.ones(length, length, dtype=torch.bool, device=items.device).tril(-1)
            first = torch.where((same & earlier).any(dim=-1) | (k < 0), torch.full_like(k, -1), k)
            long = f64(torch.exp2, -dt / self.long_half_life) * m
            raw_w = torch.stack([m, like, dislike, short, long, recent], dim=-1)  # (B, L, 6)
            # each slot sums the events of every slot with its value: (B, A, L, 6)
            raw = torch.matmul(same.float(), raw_w[:, None]) * m[:, None, :, None]
            n_events = m.sum(dim=1).clamp_min(1.0)  # (B,)
            feats[..., :5] = f64(torch.log1p, raw[..., :5])  # counts, likes, dislikes, decays
            feats[..., 5] = raw[..., 5] / float(max(r, 1))
            feats[..., 6] = raw[..., 0] / n_events[:, None, None]
        return UserTables(
            feats,
            first.permute(0, 2, 1).contiguous(),
            hist,
            item_weights,
            obs[Obs.CONTEXT][:, 0].float(),
        )

    def value_table(self, tables: UserTables, j: int) -> torch.Tensor:
        """Features (B, C_j, 7) of every value of attribute ``j``.

        The per-slot features written at their values (exact copies); zeros for the values
        that are not in the history.
        """
        b, length = tables.items.shape
        out = torch.zeros(
            b, self.cardinalities[j], len(ATTRIBUTE_FEATURES), device=tables.items.device
        )
        keys = tables.first_keys[:, :, j]  # (B, L)
        bb, ll = (keys >= 0).nonzero(as_tuple=True)
        out[bb, keys[bb, ll] - self.offsets[j]] = tables.slot_features[bb, j, ll]
        return out

    def value_items(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Items of each value of attribute ``j`` (CSR): ``(starts (C_j + 1,), items)``.

        ``items[starts[v]:starts[v + 1]]`` are the item ids whose attribute ``j`` is ``v``
        (offset id ``self.offsets[j] + v``), in increasing order.
        """
        if j not in self._csr:
            v = (self.keys[:, j] - self.offsets[j]).cpu().numpy()
            order = np.argsort(v, kind="stable")
            starts = np.searchsorted(v[order], np.arange(self.cardinalities[j] + 1))
            dev = self.keys.device
            self._csr[j] = (
                torch.from_numpy(starts.astype(np.int64)).to(dev),
                torch.from_numpy(order).to(dev),
            )
        return self._csr[j]

    def log_age(self, time: torch.Tensor, release: torch.Tensor) -> torch.Tensor:
        """``log(1 + max(time - release, 0))`` (broadcast), float32 via float64 (:func:`f64`)."""
        age = time.double() - release.double()
        return torch.log1p(age.clamp_min_(0.0)).float()

    # ------------------------------------------------------------------ pair side
    def match(
        self, tables: UserTables, j: int, cand: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pairs (B, K) whose attribute ``j`` value occurs in the row's history.

        Returns:
            ``(row, column, slot)`` index vectors: candidate ``cand[row, column]`` has the value
            first seen at history slot ``slot`` of its row.
        """
        ck = self.keys[cand, j]  # (B, K)
        eq = ck[:, :, None] == tables.first_keys[:, None, :, j]  # (B, K, L): at most one hit
        return eq.nonzero(as_tuple=True)

    def _item_block(self, tables: UserTables, cand: torch.Tensor, out: torch.Tensor) -> None:
        """Item-level features of candidates (B, K) into ``out`` (B, K, 5), by comparison."""
        eq = (cand[:, :, None] == tables.items[:, None, :]).float()  # (B, K, L)
        w = tables.item_weights  # (B, L, 4)
        out[..., 0] = f64(torch.log1p, eq.sum(dim=2))  # integer-valued sum: exact in any order
        out[..., 1] = (eq * w[:, None, :, 0]).sum(dim=2) / float(max(self.recent_events, 1))
        out[..., 2] = (eq * w[:, None, :, 1]).amax(dim=2)  # a maximum: exact in any order
        out[..., 3] = (eq * w[:, None, :, 2]).amax(dim=2)
        out[..., 4] = (eq * w[:, None, :, 3]).amax(dim=2)

    def history_values(self, tables: UserTables) -> torch.Tensor | None:
        """Item-level features (B, L, 5) of each row's own history items.

        Only history items have non-zero item-level features; these are the values any path
        uses for them (computed with the comparison of :meth:`pairs`).
        """
        if not self.use_item:
            return None
        out = torch.empty(*tables.items.shape, len(ITEM_FEATURES), device=tables.items.device)
        self._item_block(tables, tables.items.clamp_min(0), out)
        return out

    def pairs(self, tables: UserTables, cand: torch.Tensor) -> torch.Tensor:
        """Cross features (B, K, F) of candidates ``cand`` (B, K) (valid ids only)."""
        b, k = cand.shape
        out = torch.zeros(b, k, self.n_features, device=cand.device)
        nf = len(ATTRIBUTE_FEATURES)
        for j in range(len(self.attributes)):
            r, c, slot = self.match(tables, j, cand)
            out[r, c, j * nf : (j + 1) * nf] = tables.slot_features[r, j, slot]
        na = self.n_attribute_features
        if self.use_item:
            self._item_block(tables, cand, out[..., na : na + len(ITEM_FEATURES)])
        if self.use_age:
            out[..., -1] = self.log_age(tables.time[:, None], self.release[cand])
        return out

    def catalog(
        self,
        tables: UserTables,
        start: int,
        stop: int,
        history_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross features (B, n, F) of every item in ``[start, stop)`` for every row.

        The reference full-catalog form of :meth:`pairs`, through per-value tables (the
        ranker's fast path assembles the same values block by block, see
        :class:`ranking.model.Ranker`). ``history_values``: :meth:`history_values` of
        ``tables`` (computed here if omitted).
        """
        b = tables.items.shape[0]
        n = stop - start
        out = torch.empty(b, n, self.n_features, device=tables.items.device)
        nf = len(ATTRIBUTE_FEATURES)
        for j in range(len(self.attributes)):
            table = self.value_table(tables, j)  # (B, C_j, 7)
            v = self.keys[start:stop, j] - self.offsets[j]  # (n,)
            out[..., j * nf : (j + 1) * nf] = table[:, v]
        na = self.n_attribute_features
        if self.use_item:
            blk = out[..., na : na + len(ITEM_FEATURES)]
            blk.zero_()
            hist = tables.items  # (B, L)
            inside = (hist >= start) & (hist < stop)
            if inside.any():
                vals = self.history_values(tables) if history_values is None else history_values
                r, col = inside.nonzero(as_tuple=True)
                blk[r, hist[r, col] - start] = vals[r, col]
        if self.use_age:
            out[..., -1] = self.log_age(tables.time[:, None], self.release[None, start:stop])
        return out
