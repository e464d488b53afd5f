"""The ranker: early binding of user, item and context, fast enough to score a whole catalog.

Architecture (d = ``hidden - 1`` components in the pair vector)::

    user side (once per request)             item side (once per item, cached)
    history pools + context -> MLP -> U_b     content + log statistics -> MLP -> I_n
                          |                        |
    pair side (per pair):  x0 = [U_b + I_n + P c_bn, log(1 + age_bn)]   c_bn: cross features
                           x_{l+1} = x0 * (W_l x_l + b_l) + x_l        DCN-v2 cross layers
                           h = ReLU(W h + b) ...                        MLP
                           heads = W_o h + b_o                          click (+ like, dislike,
                                                                         watch)

**Where the early binding happens.** ``x0`` is the first layer of a model over the concatenation
``[user features, item features, cross features]``: a linear layer over a concatenation is a sum
of one linear map per part, so the user part and the item part can be computed once per user and
once per item (and cached) without changing the function; the item's age at the query time joins
``x0`` as a raw dense input, as DCN-v2 takes dense features. Everything after ``x0`` is pair
level and nonlinear: each DCN-v2 cross layer multiplies ``x0`` elementwise with a linear map of
the previous layer, so every layer adds products (user x item, user x cross, item x cross, ...)
of one more degree, and the ReLU MLP on top mixes them further; the cross features ``c_bn`` (how
often, how recently, with which reactions this user engaged with this item's topic / creator /
group, whether the item itself is in the history, the item's age now; see
:mod:`ranking.features`) are functions of the pair that no per-user or per-item vector can
produce. This is what makes it a ranker and not a two-tower model: a two-tower model scores
``<U_b, I_n>``, one inner product of two separately computed vectors, which a MIPS index can
search; here the score is a nonlinear function of ``(U_b, I_n, c_bn)`` that has to be evaluated
for every pair, the "early binding" of the lecture ("Раннее связывание информации про
пользователя и айтем; нужно повторно прогонять модель для каждого айтема").

**Why DCN-v2 + MLP.** The useful interactions here are low-order and multiplicative (a user's
content mix times an item's content, recent engagement with a topic times the item's topic,
group match): DCN-v2 cross layers express bounded-degree polynomial crosses explicitly with
``d^2 + d`` parameters per layer, which a ReLU MLP of the same width learns only approximately;
the MLP adds the non-polynomial part. Both are a few small matmuls per pair, which keeps the
full-catalog path above the required throughput on one CPU thread. Bigger pair networks
(attention over the history per candidate, as in DIN) cost O(L) per pair and would not be.

**Speed.** The full-catalog path (:meth:`Ranker.score_all`) takes, per chunk of rows, U and the
per-row cross tables once: the crosses of small-cardinality attributes (topic x group) are
pre-projected into one per-row table over their joint values, so a pair's ``U_b + P c_bn`` part
for them is one row gather; the crosses of large-cardinality attributes (creator) and of the item
itself are non-zero only for items whose value occurs in the history, and are added to those
pairs only (found through a value -> items index). I comes from a cache. The pair network then
runs over blocks of ``chunk_pairs`` pairs in reused buffers, with the biases folded into the
matmuls through a constant unit (the inference vector is ``[x0, 1]``, width ``hidden``).
:func:`benchmark_score_all` measures it.

**Exactness.** :meth:`Ranker.score` (candidates) and :meth:`Ranker.score_all` (whole catalog)
perform the same float operations on the same values for a pair (transcendental functions of
pair values are computed in float64 and rounded once), and every matmul is padded to at least
``_MIN_ROWS`` rows and ``_MIN_OUT`` columns: with MKL's AVX-512 kernels they agree bitwise. Other
kernels (MKL's AVX2 path, what AMD CPUs take) block rows differently, so the promise is
agreement within the float32 reordering bound of the network (tested; 2e-7 of the score scale
seen with ``MKL_ENABLE_INSTRUCTIONS=AVX2``), with -inf at exactly the same places. That
is about CPU BLAS kernels and float32: on a GPU, or in bfloat16, both methods take
the generic path (:meth:`Ranker.set_scoring`), the pair network in its differentiable form
over large blocks of pairs, where they agree within float32 rounding (tested on the CPU with
the generic path forced).

**Devices.** ``ranker.to(device)`` moves the weights, the catalog's arrays and the cross-feature
tables; :func:`ranking.train.train_ranker` does it for its ``device`` option. Observations
arrive as numpy, move to the device in one place (``_prepare``) and scores return as numpy.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from ranking.features import (
    ATTRIBUTE_FEATURES,
    ITEM_FEATURES,
    STAT_FEATURES,
    CrossFeatures,
    ItemStatistics,
    check_obs,
    f64,
    first_occurrence,
)
from simenv.arrays import check_item_ids
from simenv.config import check_range as _check
from simenv.device import autocast, check_precision, to_device
from simenv.types import EventType, ItemCatalog, Obs

__all__ = ["HEADS", "RankerConfig", "Ranker", "benchmark_score_all"]

HEADS = ("click", "like", "dislike", "watch")
_TABLE_BUDGET = 1 << 23  # floats of per-row joint tables held at once (rows are chunked by it)
# BLAS picks other kernels (another summation order) for a single output column and for
# small matrices, so a row's result could depend on how many rows share the call: every matmul
# here gets at least _MIN_OUT output columns and _MIN_ROWS rows (zero padding), which makes
# scores independent of the batch around them and the two scoring paths bitwise equal
_MIN_OUT = 4
_MIN_ROWS = 64


@dataclass(frozen=True)
class RankerConfig:
    """Architecture and features of the ranker.

    Attributes:
        hidden: H (>= 4), width of the pair network's input in the inference layout
            ``[x0, 1]``: the pair vector ``x0`` has ``H - 1`` components, the towers' outputs
            and the projected crosses ``H - 2`` of them plus the raw age (``H - 1`` without
            the age cross). 32 keeps every per-pair vector at two AVX-512 registers.
        n_cross: number of DCN-v2 cross layers on the pair vector (0: none).
        mlp: widths (>= 4 each) of the ReLU layers after the cross layers.
        tower_hidden: width of the hidden layer of the user and the item MLP.
        cat_dim: embedding size of each categorical item attribute.
        title_dim: embedding size of the bag of title tokens (0: no title features).
        id_dim: embedding size of a trainable item-id embedding (0: none, the default: content
            and statistics generalise to new and tail items, ids do not).
        use_item_stats: item statistics from the training log (popularity, click rate, like
            and dislike rates, watch time) in the item side.
        use_context: session index and position in session in the user side.
        cross_features: enabled pair crosses: catalog attribute names (``"topic"``,
            ``"creator"``, ``"group"`` in the simulator), ``"item"`` (the item's own presence in
            the history) and ``"age"``. ``()`` switches all crosses off (an ablation).
        recent_events: R, the window of "last few events" (fatigue proxy).
        short_half_life: days, short time decay of history events (fatigue proxy).
        long_half_life: days, long time decay of history events.
        heads: predicted targets, ``"click"`` first; then any of ``"like"`` (like given
            click), ``"dislike"`` (dislike given click), ``"watch"`` (log(1 + watch minutes)
            given click; the watch *fraction* would need the item length, which the catalog
            does not publish).
        score_weights: one weight per head. With the click head alone the score is its logit;
            with more heads it is the expected value
            ``p_click * (w_click + w_like p_like + w_dislike p_dislike + w_watch minutes)``.
        stats_prior: pseudo-counts that smooth the item rates toward the global rates.
        chunk_pairs: pairs per block of the pair network (cache-sized blocks).
        joint_key_limit: the full-catalog path gathers the crosses of small-cardinality
            attributes (topic, group) from one per-row table over their joint values, as long
            as the product of their cardinalities stays within this limit; the other attributes
            (creator) are added sparsely, only to items whose value occurs in the history.
            A speed knob only: scores are the same function either way.
        seed: seed of the initial weights.
    """

    hidden: int = 32
    n_cross: int = 2
    mlp: tuple[int, ...] = (32,)
    tower_hidden: int = 64
    cat_dim: int = 8
    title_dim: int = 16
    id_dim: int = 0
    use_item_stats: bool = True
    use_context: bool = True
    cross_features: tuple[str, ...] = ("topic", "creator", "group", "item", "age")
    recent_events: int = 4
    short_half_life: float = 0.5
    long_half_life: float = 7.0
    heads: tuple[str, ...] = ("click",)
    score_weights: tuple[float, ...] = (1.0,)
    stats_prior: float = 10.0
    chunk_pairs: int = 32_768
    joint_key_limit: int = 4_096
    seed: int = 0

    def __post_init__(self) -> None:
        _check("hidden", self.hidden, 4, 4096, integer=True)
        _check("n_cross", self.n_cross, 0, 16, integer=True)
        if not isinstance(self.mlp, tuple):
            raise ValueError(f"mlp must be a tuple of widths, got {self.mlp!r}")
        for w in self.mlp:
            _check("mlp width", w, 4, 4096, integer=True)
        _check("tower_hidden", self.tower_hidden, 1, 4096, integer=True)
        _check("cat_dim", self.cat_dim, 1, 1024, integer=True)
        _check("title_dim", self.title_dim, 0, 1024, integer=True)
        _check("id_dim", self.id_dim, 0, 1024, integer=True)
        if not isinstance(self.cross_features, tuple) or len(set(self.cross_features)) != len(
            self.cross_features
        ):
            raise ValueError(
                f"cross_features must be a tuple of distinct names, got {self.cross_features!r}"
            )
        _check("recent_events", self.recent_events, 1, 4096, integer=True)
        _check("short_half_life", self.short_half_life, 1e-6, 1e6)
        _check("long_half_life", self.long_half_life, 1e-6, 1e6)
        if (
            not isinstance(self.heads, tuple)
            or not self.heads
            or self.heads[0] != "click"
            or len(set(self.heads)) != len(self.heads)
            or any(h not in HEADS for h in self.heads)
        ):
            raise ValueError(
                f"heads must be a tuple of distinct names from {HEADS} starting with 'click', "
                f"got {self.heads!r}"
            )
        if not isinstance(self.score_weights, tuple) or len(self.score_weights) != len(self.heads):
            raise ValueError(
                f"score_weights must be a tuple with one weight per head ({len(self.heads)}), "
                f"got {self.score_weights!r}"
            )
        for w in self.score_weights:
            _check("score_weights entry", w, -1e6, 1e6)
        _check("stats_prior", self.stats_prior, 1e-6, 1e9)
        _check("chunk_pairs", self.chunk_pairs, 1, 1 << 26, integer=True)
        _check("joint_key_limit", self.joint_key_limit, 1, 1 << 24, integer=True)
        _check("seed", self.seed, 0, 2**63 - 1, integer=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankerConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - names
        if extra:
            raise ValueError(f"unknown RankerConfig fields {sorted(extra)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


def _buffer(buffers: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous float32 tensor of ``shape``: a view of ``buffers[name]`` (grown as needed)."""
    numel = math.prod(shape)
    buf = buffers.get(name)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel)
        buffers[name] = buf
    return buf[:numel].view(shape)


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (M, K) with zero rows appended up to ``_MIN_ROWS`` (unchanged if M is larger).

    CPU only (the bitwise guarantee is about CPU BLAS kernels); other devices get ``x``.
    """
    m = x.shape[0]
    if m >= _MIN_ROWS or x.device.type != "cpu":
        return x
    return torch.cat([x, x.new_zeros(_MIN_ROWS - m, *x.shape[1:])], dim=0)


def _matmul(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """``x @ w_t`` (M, K) x (K, n) with row results independent of M (see ``_MIN_ROWS``)."""
    return (_pad_rows(x) @ w_t)[: x.shape[0]]


@dataclass
class _RowContext:
    """What every pair of a chunk of rows shares in the fast path (inference layout, width H).

    Attributes:
        joint: (b J, H) ``[U_b + sum over dense attributes of P_a f_a[b, v_a], 0, 1]`` for every
            joint value ``j`` of the dense (small-cardinality) attributes: topic x group.
        n_joint: J.
        sparse: per sparse source (large-cardinality attributes such as creator, then the item
            itself): ``(first-occurrence keys (b, L), delta (b L, H))``, ``delta`` the projected
            cross features of that history slot; a pair whose key occurs in the row's history
            gets the delta of that slot added, every other pair has all-zero features there.
        time: (b,) query times.
    """

    joint: torch.Tensor
    n_joint: int
    sparse: list[tuple[torch.Tensor, torch.Tensor]]
    time: torch.Tensor


def _obs_to_torch(obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {
        Obs.ITEMS: torch.as_tensor(np.asarray(obs[Obs.ITEMS], dtype=np.int64)),
        Obs.EVENTS: torch.as_tensor(np.asarray(obs[Obs.EVENTS], dtype=np.int64)),
        Obs.DT: torch.as_tensor(np.asarray(obs[Obs.DT], dtype=np.float32)),
        Obs.MASK: torch.as_tensor(np.asarray(obs[Obs.MASK], dtype=np.int8)),
        Obs.CONTEXT: torch.as_tensor(np.asarray(obs[Obs.CONTEXT], dtype=np.float32)),
    }


def _rows(obs: dict[str, torch.Tensor], sl: slice) -> dict[str, torch.Tensor]:
    return {k: v[sl] for k, v in obs.items()}


class Ranker(nn.Module):
    """Early-binding ranker over (user history + context, item content + statistics, crosses).

    See the module docstring for the architecture, where the early binding happens and why the
    full-catalog path is fast. Reads only the public :class:`simenv.types.ItemCatalog`, the
    observation dicts and the training-log statistics; never the world's hidden truth.

    Args:
        catalog: the public item content (ids, title tokens, categorical attributes, release
            times).
        config: architecture and features.
        statistics: item statistics from the training log (``train_ranker`` fits them; without
            them every item has the prior).

    Example:
        >>> from simenv import World, WorldConfig
        >>> ranker = Ranker(World(WorldConfig.small(), seed=0).catalog)
        >>> ranker.parameter_counts()["total"] > 0
        True
    """

    def __init__(
        self,
        catalog: ItemCatalog,
        config: RankerConfig | None = None,
        statistics: ItemStatistics | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(catalog, ItemCatalog):
            raise ValueError(
                f"catalog must be a simenv.types.ItemCatalog (the public item content), got "
                f"{type(catalog).__name__}"
            )
        config = RankerConfig() if config is None else config
        if not isinstance(config, RankerConfig):
            raise ValueError(f"config must be a RankerConfig, got {type(config).__name__}")
        self.config = config
        self.catalog = catalog
        self.n_items = catalog.n_items
        c = config
        self.crosses = CrossFeatures(
            catalog, c.cross_features, c.recent_events, c.short_half_life, c.long_half_life
        )
        self.n_heads = len(c.heads)
        self._dense, self._joint_key = self._joint_keys(c.joint_key_limit)
        self._use_age = self.crosses.use_age
        # the pair vector has d = hidden - 1 components (the inference layout adds a constant
        # unit, see _pair_net_fast): d_proj projected ones, then the raw age if enabled
        self.pair_dim = c.hidden - 1
        self.proj_dim = self.pair_dim - int(self._use_age)
        self._n_proj_features = self.crosses.n_features - int(self._use_age)
        with torch.random.fork_rng(devices=[]):  # construction must not move the global RNG
            self.cat_emb = nn.ModuleList(
                nn.Embedding(int(card), c.cat_dim) for card in catalog.categorical_cardinalities
            )
            self.title_emb = (
                nn.Embedding(int(catalog.vocab_size), c.title_dim, padding_idx=0)
                if c.title_dim
                else None
            )
            self.id_emb = nn.Embedding(self.n_items, c.id_dim) if c.id_dim else None
            d_content = c.cat_dim * len(self.cat_emb) + c.title_dim
            d_item = d_content + c.id_dim + (len(STAT_FEATURES) if c.use_item_stats else 0)
            d_user = 4 * d_content + 5 + (2 if c.use_context else 0)
            self.item_mlp = nn.Sequential(
                nn.Linear(d_item, c.tower_hidden),
                nn.ReLU(),
                nn.Linear(c.tower_hidden, self.proj_dim),
            )
            self.user_mlp = nn.Sequential(
                nn.Linear(d_user, c.tower_hidden),
                nn.ReLU(),
                nn.Linear(c.tower_hidden, self.proj_dim),
            )
            self.cross_proj = (
                nn.Linear(self._n_proj_features, self.proj_dim, bias=False)
                if self._n_proj_features
                else None
            )
            self.cross_layers = nn.ModuleList(
                nn.Linear(self.pair_dim, self.pair_dim) for _ in range(c.n_cross)
            )
            widths = (self.pair_dim, *c.mlp)
            self.deep = nn.ModuleList(
                nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
            )
            self.out = nn.Linear(widths[-1], self.n_heads)
        # the catalog's arrays (not saved: a checkpoint is loaded with its catalog)
        self.register_buffer(
            "title_tokens",
            torch.from_numpy(np.ascontiguousarray(catalog.title_tokens, np.int64)),
            persistent=False,
        )
        self.register_buffer(
            "categorical",
            torch.from_numpy(np.ascontiguousarray(catalog.categorical, np.int64)),
            persistent=False,
        )
        self.register_buffer(
            "release_time",
            torch.from_numpy(catalog.release_time.astype(np.float32)),
            persistent=False,
        )
        # training-log counts (impressions, clicks, likes, dislikes, watch): saved with the model
        self.register_buffer("stat_counts", torch.zeros(5, self.n_items, dtype=torch.float64))
        self._cache: tuple[Any, torch.Tensor] | None = None
        self._precision = "fp32"
        self._scoring_path = "auto"
        self.reset_parameters(c.seed)
        self.set_statistics(
            ItemStatistics.empty(self.n_items) if statistics is None else statistics
        )

    def _joint_keys(self, limit: int) -> tuple[frozenset[int], torch.Tensor]:
        """Dense attributes and each item's joint key over them.

        Dense: the smallest cardinalities first while their product stays <= ``limit``; the
        joint key is ``(...(v_1 C_2 + v_2) C_3 + ...)`` in attribute order.
        """
        cf = self.crosses
        dense: set[int] = set()
        prod = 1
        for ia in sorted(range(len(cf.attributes)), key=lambda j: cf.cardinalities[j]):
            if prod * cf.cardinalities[ia] <= limit:
                dense.add(ia)
                prod *= cf.cardinalities[ia]
        key = torch.zeros(self.n_items, dtype=torch.int64)
        for ia in sorted(dense):
            key = key * cf.cardinalities[ia] + (cf.keys[:, ia] - cf.offsets[ia])
        self._joint_size = prod
        return frozenset(dense), key

    # ------------------------------------------------------------------ device
    @property
    def device(self) -> torch.device:
        """Where the ranker lives (``ranker.to(device)`` moves it; scoring runs there)."""
        return self.release_time.device

    def _apply(self, fn: Any, recurse: bool = True) -> Ranker:
        # .to / .cuda / .cpu: the cross-feature tables and the joint keys follow the buffers
        super()._apply(fn, recurse)
        self.crosses.to(self.device)
        self._joint_key = self._joint_key.to(self.device)
        self.invalidate_cache()
        return self

    def set_scoring(self, precision: str = "fp32", path: str = "auto") -> Ranker:
        """How :meth:`score`, :meth:`score_all`, :meth:`head_outputs` and :meth:`top_k` run.

        Args:
            precision: ``"fp32"`` or ``"bf16"`` (bfloat16 autocast of the generic path's
                matmuls; the item cache stays float32).
            path: ``"fast"``, the bitwise CPU fast path (see the module docstring; CPU and
                fp32 only); ``"generic"``, the pair network in its differentiable form over
                blocks of pairs, on any device (score and score_all agree within float32
                rounding, not bitwise: measured at most 8.4e-7 of the score scale against the
                fast path, tested within 1e-5); ``"auto"`` (default): fast on the CPU in fp32,
                generic elsewhere.

        Returns:
            ``self``.
        """
        check_precision("precision", precision)
        if path not in ("auto", "fast", "generic"):
            raise ValueError(f"path must be 'auto', 'fast' or 'generic', got {path!r}")
        self._precision = precision
        self._scoring_path = path
        return self

    def _fast(self) -> bool:
        """Whether scoring takes the bitwise CPU fast path (see :meth:`set_scoring`)."""
        cpu_fp32 = self.device.type == "cpu" and self._precision == "fp32"
        if self._scoring_path == "fast" and not cpu_fp32:
            raise ValueError(
                f"the fast scoring path runs on the CPU in fp32 only; this ranker is on "
                f"{self.device} in {self._precision} (set_scoring(path='generic') or 'auto')"
            )
        return cpu_fp32 and self._scoring_path != "generic"

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self, seed: int) -> None:
        """Initialise every weight from ``torch.Generator().manual_seed(seed)``."""
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for emb in [*self.cat_emb, self.title_emb, self.id_emb]:
                if emb is not None:
                    emb.weight.normal_(0.0, 0.1, generator=g)
                    if emb.padding_idx is not None:
                        emb.weight[emb.padding_idx].zero_()
            lins = [*self.item_mlp, *self.user_mlp, *self.deep, self.out, self.cross_proj]
            for lin in lins:
                if isinstance(lin, nn.Linear):
                    bound = 1.0 / math.sqrt(lin.in_features)
                    lin.weight.uniform_(-bound, bound, generator=g)
                    if lin.bias is not None:
                        lin.bias.zero_()
            for lin in self.cross_layers:
                # W ~ N(0, 1 / fan_in), b = 0: x_1 = x0 * (W x0) + x0 starts with products of
                # the user and item parts at unit scale (learns the match faster than W ~ 0)
                lin.weight.normal_(0.0, 1.0 / math.sqrt(lin.in_features), generator=g)
                lin.bias.zero_()
        self.invalidate_cache()

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by part: embeddings, item MLP, user MLP, pair network, total."""

        def n(mods: list[nn.Module | None]) -> int:
            return sum(p.numel() for m in mods if m is not None for p in m.parameters())

        out = {
            "embeddings": n([*self.cat_emb, self.title_emb, self.id_emb]),
            "item_mlp": n([self.item_mlp]),
            "user_mlp": n([self.user_mlp]),
            "pair_network": n([self.cross_proj, *self.cross_layers, *self.deep, self.out]),
        }
        out["total"] = sum(out.values())
        return out

    # ------------------------------------------------------------------ statistics
    def set_statistics(self, statistics: ItemStatistics) -> None:
        """Use ``statistics`` (from the training log) for the item side; clears the item cache."""
        if not isinstance(statistics, ItemStatistics) or statistics.n_items != self.n_items:
            got = type(statistics).__name__
            if isinstance(statistics, ItemStatistics):
                got += f" over {statistics.n_items} items"
            raise ValueError(
                f"statistics must be an ItemStatistics over {self.n_items} items, got {got}"
            )
        counts = np.stack(
            [
                statistics.impressions,
                statistics.clicks,
                statistics.likes,
                statistics.dislikes,
                statistics.watch,
            ]
        )
        with torch.no_grad():
            self.stat_counts.copy_(torch.from_numpy(counts.astype(np.float64)))
        self.invalidate_cache()

    @property
    def statistics(self) -> ItemStatistics:
        """The item statistics in use (a copy, with the config's ``stats_prior``)."""
        c = self.stat_counts.cpu().numpy().copy()
        return ItemStatistics(c[0], c[1], c[2], c[3], c[4], self.config.stats_prior)

    # ------------------------------------------------------------------ cache
    def invalidate_cache(self) -> None:
        """Drop the cached item side (done automatically when the weights or statistics change)."""
        self._cache = None

    def train(self, mode: bool = True) -> Ranker:
        """Switch training mode; clears the item cache."""
        self.invalidate_cache()
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.invalidate_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _cache_key(self) -> tuple[tuple[int, int], ...]:
        # in-place updates (optimizer steps, copy_, load_state_dict) bump a tensor's version
        mods = [*self.cat_emb, self.title_emb, self.id_emb, self.item_mlp]
        ts = [p for m in mods if m is not None for p in m.parameters()] + [self.stat_counts]
        return tuple((id(t), t._version) for t in ts)

    def _item_cache(self) -> torch.Tensor:
        """(N, H) item side in the inference layout ``[I_n, 0 (age), 0 (constant unit)]``."""
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            dev = self.device
            with torch.no_grad(), torch.autocast(dev.type, enabled=False):  # float32 cache
                stats = torch.from_numpy(self.statistics.features()).to(dev)
                vec = self._item_side(torch.arange(self.n_items, device=dev), stats)  # (N, d_p)
                padded = torch.zeros(self.n_items, self.config.hidden, device=dev)
                padded[:, : self.proj_dim] = vec
            self._cache = (key, padded)
        return self._cache[1]

    def item_vectors(self) -> torch.Tensor:
        """I (N, d_proj): the item side of every item, computed once and cached (no grad)."""
        return self._item_cache()[:, : self.proj_dim]

    # ------------------------------------------------------------------ towers
    @staticmethod
    def _linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
        """``lin(x)`` for 2-D x with row results independent of the number of rows.

        See ``_MIN_ROWS`` and ``_MIN_OUT``: small inputs are padded with zero rows, layers with
        fewer than four outputs with zero columns.
        """
        w, b = lin.weight, lin.bias
        m, n_out = x.shape[0], w.shape[0]
        if x.device.type != "cpu":
            return lin(x)
        if n_out < _MIN_OUT:
            w = torch.cat([w, w.new_zeros(_MIN_OUT - n_out, w.shape[1])], dim=0)
            b = None if b is None else torch.cat([b, b.new_zeros(_MIN_OUT - n_out)])
        return F.linear(_pad_rows(x), w, b)[:m, :n_out]

    def _mlp(self, x: torch.Tensor, seq: nn.Sequential) -> torch.Tensor:
        shape = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])
        for mod in seq:
            h = self._linear(h, mod) if isinstance(mod, nn.Linear) else mod(h)
        return h.view(*shape, h.shape[-1])

    def content(self, items: torch.Tensor) -> torch.Tensor:
        """Content embedding of items (any shape) -> (..., d_content): attributes + title bag."""
        parts = [emb(self.categorical[items, j]) for j, emb in enumerate(self.cat_emb)]
        if self.title_emb is not None:
            tok = self.title_tokens[items]  # (..., T)
            n_tok = (tok > 0).sum(-1, keepdim=True).clamp_min(1).float()
            parts.append(self.title_emb(tok).sum(-2) / n_tok)  # mean of the bag of words
        return torch.cat(parts, dim=-1)

    def content_of(self, items: torch.Tensor) -> torch.Tensor:
        """:meth:`content` computed once per distinct item (cheaper forward and backward)."""
        uniq, inv = torch.unique(items, return_inverse=True)
        return self.content(uniq)[inv]

    def _item_side(
        self, items: torch.Tensor, stats: torch.Tensor, content: torch.Tensor | None = None
    ) -> torch.Tensor:
        """I for items (any shape) with their statistics features (..., 6) -> (..., d_proj)."""
        parts = [self.content(items) if content is None else content]
        if self.id_emb is not None:
            parts.append(self.id_emb(items))
        if self.config.use_item_stats:
            parts.append(stats)
        return self._mlp(torch.cat(parts, dim=-1), self.item_mlp)

    def _user_side(
        self, obs: dict[str, torch.Tensor], content: torch.Tensor | None = None
    ) -> torch.Tensor:
        """U (B, d_proj) from the history pools and the context.

        ``content`` optionally gives the history items' content embeddings (B, L, D).
        """
        c = self.config
        items, mask = obs[Obs.ITEMS], obs[Obs.MASK] > 0
        events, dt = obs[Obs.EVENTS], obs[Obs.DT].clamp_min(0.0)
        b, length = items.shape
        m = mask.float()
        e = content
        if e is None:
            e = self.content_of(torch.where(mask, items, torch.zeros_like(items)))  # (B, L, D)
        recent = torch.zeros_like(m)
        recent[:, length - min(c.recent_events, length) :] = 1.0
        weights = torch.stack(
            [
                m,
                recent * m,
                (events == EventType.LIKE).float() * m,
                (events == EventType.DISLIKE).float() * m,
            ],
            dim=1,
        )  # (B, 4, L): all, last R, likes, dislikes
        counts = weights.sum(-1, keepdim=True)  # (B, 4, 1)
        pools = torch.bmm(weights, e) / counts.clamp_min(1.0)  # (B, 4, D) masked means
        n_ev = counts[:, 0, 0]
        last_dt = torch.where(mask[:, -1], dt[:, -1], torch.zeros_like(dt[:, -1]))
        scalars = [
            f64(torch.log1p, n_ev),
            counts[:, 2, 0] / n_ev.clamp_min(1.0),  # like share
            counts[:, 3, 0] / n_ev.clamp_min(1.0),  # dislike share
            f64(torch.exp2, -last_dt / c.short_half_life) * mask[:, -1].float(),  # last event
            (n_ev > 0).float(),
        ]
        if c.use_context:
            ctx = obs[Obs.CONTEXT]
            scalars += [
                f64(torch.log1p, ctx[:, 1].clamp_min(0)),
                f64(torch.log1p, ctx[:, 2].clamp_min(0)),
            ]
        x = torch.cat([pools.reshape(b, -1), torch.stack(scalars, dim=1)], dim=1)
        return self._mlp(x, self.user_mlp)

    # ------------------------------------------------------------------ pair network
    def _pair_net(self, x0: torch.Tensor) -> torch.Tensor:
        """Head outputs (M, n_heads) from pair vectors x0 (M, d) (differentiable form)."""
        x = x0
        for lin in self.cross_layers:
            x = torch.addcmul(x, x0, lin(x))  # DCN-v2 cross layer: x_{l+1} = x0 * (W x_l + b) + x_l
        h = x
        for lin in self.deep:
            h = torch.relu(lin(h))
        return self.out(h)

    def pair_vectors(
        self, u: torch.Tensor, i: torch.Tensor, cross: torch.Tensor | None
    ) -> torch.Tensor:
        """Pair vectors x0 (M, d) = ``[U_b + I_n + P c_bn, log age]`` (differentiable form).

        Args:
            u: U (M, d_proj) of each pair's row.
            i: I (M, d_proj) of each pair's item.
            cross: cross features (M, F) or None.
        """
        x = u + i
        if cross is None:
            return x
        if self.cross_proj is not None:
            x = x + F.linear(cross[:, : self._n_proj_features], self.cross_proj.weight)
        if self._use_age:
            x = torch.cat([x, cross[:, -1:]], dim=1)  # the raw age joins x0 (DCN-v2 dense input)
        return x

    def _fast_weights(self) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """The pair network's layers in the inference layout (computed once per call).

        The inference pair vector carries a constant unit in its last component, so a layer
        reading it takes its bias as the weight column of that unit: ``W x + b = [W b] [x; 1]``
        (a matmul with beta = 0 and no bias copy). A cross layer's extra output row is zero,
        which keeps the unit at ``1 * 0 + 1 = 1``. Layers whose input has no unit keep their
        bias. Returns ``(kind, weight (out, in), bias or None)``.
        """
        layers: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        for j, lin in enumerate(self.cross_layers):
            w = torch.cat([lin.weight, lin.bias[:, None]], dim=1)  # (d, d + 1)
            w = torch.cat([w, w.new_zeros(1, w.shape[1])], dim=0)  # (d + 1, d + 1)
            if j == 0:
                # first layer: x_1 = x0 * (W x0 + b) + x0 = x0 * (W x0 + b + 1): one pass fewer;
                # the unit's row picks the unit itself (1 * 1 = 1)
                w[:, -1] += 1.0
                layers.append(("cross0", w.contiguous(), None))
            else:
                layers.append(("cross", w.contiguous(), None))
        with_unit = True
        for lin in [*self.deep, self.out]:
            w, b = lin.weight, lin.bias
            if with_unit:
                w, b = torch.cat([w, b[:, None]], dim=1), None
            with_unit = False
            if w.shape[0] < _MIN_OUT:  # pad the outputs: no matrix-vector kernel (see _linear)
                pad = _MIN_OUT - w.shape[0]
                w = torch.cat([w, w.new_zeros(pad, w.shape[1])])
                b = None if b is None else torch.cat([b, b.new_zeros(pad)])
            layers.append(("deep", w.contiguous(), b))
        layers[-1] = ("out", layers[-1][1], layers[-1][2])
        return layers

    def _pair_net_fast(
        self,
        x0: torch.Tensor,
        layers: list[tuple[str, torch.Tensor, torch.Tensor | None]],
        buffers: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Inference form of :meth:`_pair_net` on assembled ``x0`` (M, H) ``[x0; 1]``.

        Every step writes into ``buffers`` (fresh multi-megabyte tensors per block cost page
        faults that rival the small matmuls) and uses only matmuls with at least ``_MIN_ROWS``
        rows and ``_MIN_OUT`` output columns, adds, multiplies and ReLU: operations whose result
        for a row does not depend on the other rows with MKL's AVX-512 kernels (bitwise equal
        candidate and full-catalog paths there; within float32 reordering on other kernels).

        Returns:
            (M, n_heads) head outputs (a view into ``buffers``).
        """
        m = x0.shape[0]
        x0 = _pad_rows(x0)  # small blocks: zero rows up to _MIN_ROWS (BLAS small-matrix kernels)
        mm = x0.shape[0]
        x = x0
        for j, (kind, w, b) in enumerate(layers):
            name = f"layer{j % 2}" if kind.startswith("cross") else f"d{j}"
            y = _buffer(buffers, name, (mm, w.shape[0]))
            if b is None or kind == "out":
                torch.mm(x, w.t(), out=y)  # [W b] [x; 1]
            else:
                torch.addmm(b, x, w.t(), out=y)
            if kind == "cross0":
                x = y.mul_(x0)  # x_1 = x0 * (W x0 + b + 1)
            elif kind == "cross":
                x = y.mul_(x0).add_(x)  # DCN-v2 cross layer: x_{l+1} = x0 * (W x_l + b) + x_l
            elif kind == "deep":
                x = y.relu_()
            else:  # the output: its bias (if not folded) on the n_heads used columns only
                x = y[:m, : self.n_heads]
                return x if b is None else x + b[: self.n_heads]
        raise AssertionError("the last layer is the output layer")  # pragma: no cover

    def combine(self, heads: torch.Tensor) -> torch.Tensor:
        """One score from the head outputs (..., n_heads) -> (...).

        Click head alone: its logit. Otherwise the expected value
        ``p_click * (w_click + w_like p_like + w_dislike p_dislike + w_watch minutes)``.
        """
        if self.n_heads == 1:
            return heads[..., 0]
        # float64, rounded once: vectorised and scalar float32 sigmoid / expm1 may differ in
        # the last bit, which would make the result depend on where a pair sits in a block
        h = heads.double()
        w = self.config.score_weights
        value = torch.full_like(h[..., 0], float(w[0]))
        for j, name in enumerate(self.config.heads[1:], start=1):
            o = h[..., j]
            v = torch.expm1(o.clamp_min(0.0)) if name == "watch" else torch.sigmoid(o)
            value = value + float(w[j]) * v
        return (torch.sigmoid(h[..., 0]) * value).to(heads.dtype)

    def forward(
        self,
        obs: dict[str, torch.Tensor],
        items: torch.Tensor,
        item_stats: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Head outputs (B, K, n_heads) for valid items (B, K), differentiable (training path).

        Args:
            obs: batched observation tensors (see :mod:`simenv.types.Obs`).
            items: int64 (B, K) item ids (no padding).
            item_stats: float32 (B, K, 6) statistics features of each (row, item) (training
                passes leave-one-out ones); default: the ranker's statistics.
        """
        b, k = items.shape
        if item_stats is None:
            feats = self.statistics.features(items.cpu().numpy())
            item_stats = torch.from_numpy(feats).to(items.device)
        hist = torch.where(obs[Obs.MASK] > 0, obs[Obs.ITEMS], torch.zeros_like(obs[Obs.ITEMS]))
        both = self.content_of(torch.cat([hist, items], dim=1))  # (B, L + K, D)
        u = self._user_side(obs, both[:, : hist.shape[1]])  # (B, d_proj)
        i = self._item_side(items, item_stats, both[:, hist.shape[1] :])  # (B, K, d_proj)
        cross = None
        if self.crosses.n_features:
            with torch.no_grad():  # features, not parameters
                tables = self.crosses.user_tables(obs)
                cross = self.crosses.pairs(tables, items).reshape(b * k, -1)
        ui = u[:, None, :].expand(b, k, -1).reshape(b * k, -1)
        x0 = self.pair_vectors(ui, i.reshape(b * k, -1), cross)
        return self._pair_net(x0).view(b, k, self.n_heads)

    # ------------------------------------------------------------------ inference
    def _row_chunk(self, b: int) -> int:
        """Rows per chunk: the joint tables (J x H floats per row) stay within a budget."""
        per_row = (int(self._joint_size) + 1) * self.config.hidden
        return max(1, min(b, _TABLE_BUDGET // per_row))

    def _prepare(self, obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        check_obs(obs, self.n_items)
        return to_device(_obs_to_torch(obs), self.device)  # the one move to the device

    @torch.no_grad()
    def head_outputs(self, obs: dict[str, np.ndarray], candidates: np.ndarray) -> np.ndarray:
        """Raw head outputs (B, K, n_heads) float32 of candidates.

        NaN on padding (-1) and on items not released at the query time.
        """
        return self._candidates(obs, candidates, combine=False)

    @torch.no_grad()
    def score(self, obs: dict[str, np.ndarray], candidates: np.ndarray) -> np.ndarray:
        """Scores (B, K) float32 of candidate items (B, K) int64.

        ``-inf`` for padding (-1) and for items not released at the query time
        ``obs["context"][:, 0]``. No grad, batched, deterministic; on the CPU fast path bitwise
        equal to the same items' entries of :meth:`score_all` (on the generic path, within
        float32 rounding: see :meth:`set_scoring`).
        """
        return self._candidates(obs, candidates, combine=True)

    def _candidates(
        self, obs: dict[str, np.ndarray], candidates: np.ndarray, combine: bool
    ) -> np.ndarray:
        ot = self._prepare(obs)
        b = ot[Obs.ITEMS].shape[0]
        cand = check_item_ids("candidates", candidates, self.n_items, padding=True, ndim=2)
        if cand.shape[0] != b:
            raise ValueError(f"candidates must have shape ({b}, K), got shape {cand.shape}")
        k = cand.shape[1]
        ct = torch.from_numpy(cand).to(self.device)
        valid = ct >= 0
        safe = torch.where(valid, ct, torch.zeros_like(ct))
        width = 1 if combine else self.n_heads
        if not self._fast():
            out = self._candidates_generic(ot, safe, combine)
        else:
            out = self._candidates_fast(ot, safe, combine)
        t = ot[Obs.CONTEXT][:, 0]
        bad = ~valid | (self.release_time[safe] > t[:, None])
        out[bad] = -math.inf if combine else math.nan
        res = out.view(b, k, width).cpu().numpy()
        return res[..., 0] if combine else res

    def _candidates_fast(
        self, ot: dict[str, torch.Tensor], safe: torch.Tensor, combine: bool
    ) -> torch.Tensor:
        """(B, K, width) raw outputs of valid candidates ``safe`` (B, K): the CPU fast path."""
        b, k = safe.shape
        vec = self._item_cache()  # (N, H)
        layers = self._fast_weights()
        width = 1 if combine else self.n_heads
        out = torch.empty(b, k, width)
        buffers: dict[str, torch.Tensor] = {}
        step = self._row_chunk(b)
        for s in range(0, b, step):
            ctx = self._row_context(_rows(ot, slice(s, min(b, s + step))))
            nr = ctx.time.shape[0]
            sub = max(1, self.config.chunk_pairs // max(k, 1))
            for r0 in range(0, nr, sub):
                r1 = min(nr, r0 + sub)
                cb = safe[s + r0 : s + r1]  # (r, K)
                x0 = _buffer(buffers, "x0", ((r1 - r0) * k, vec.shape[1]))
                self._assemble_candidates(ctx, r0, r1, cb, vec, x0)
                heads = self._pair_net_fast(x0, layers, buffers)
                res = self.combine(heads)[:, None] if combine else heads
                out[s + r0 : s + r1] = res.view(r1 - r0, k, width)
        return out

    def _pair_block(
        self,
        u: torch.Tensor,
        i: torch.Tensor,
        cross: torch.Tensor | None,
        combine: bool,
    ) -> torch.Tensor:
        """Generic path: outputs (r, n, width) float32 of r rows x n items.

        Args:
            u: U (r, d_proj) of the rows.
            i: I (r, n, d_proj) or (n, d_proj) of the items (broadcast over rows).
            cross: cross features (r, n, F) or None.
            combine: one combined score (width 1) or the raw heads.
        """
        r, n = cross.shape[:2] if cross is not None else (u.shape[0], i.shape[-2])
        ui = u[:, None, :].expand(r, n, -1).reshape(r * n, -1)  # (r n, d_proj)
        ii = i.expand(r, n, -1).reshape(r * n, -1)
        x0 = self.pair_vectors(ui, ii, None if cross is None else cross.reshape(r * n, -1))
        heads = self._pair_net(x0).float()  # (r n, n_heads)
        res = self.combine(heads)[:, None] if combine else heads
        return res.view(r, n, -1)

    def _block_pairs(self) -> int:
        """Pairs per block of the generic path (larger blocks on accelerators)."""
        c = self.config.chunk_pairs
        return c if self.device.type == "cpu" else max(c, 1 << 20)

    def _candidates_generic(
        self, ot: dict[str, torch.Tensor], safe: torch.Tensor, combine: bool
    ) -> torch.Tensor:
        """(B, K, width) outputs of valid candidates ``safe`` (B, K): the generic path.

        The pair network in its differentiable form (:meth:`forward`'s functions) over blocks
        of rows, with the cached item side; runs on any device and precision.
        """
        b, k = safe.shape
        vec = self.item_vectors()  # (N, d_proj), float32
        width = 1 if combine else self.n_heads
        out = torch.empty(b, k, width, device=self.device)
        step = max(1, self._block_pairs() // max(k, 1))
        with autocast(self.device, self._precision):
            for s in range(0, b, step):
                o = _rows(ot, slice(s, min(b, s + step)))
                cand = safe[s : s + step]  # (r, K)
                u = self._user_side(o)  # (r, d_proj)
                cross = None
                if self.crosses.n_features:
                    cross = self.crosses.pairs(self.crosses.user_tables(o), cand)  # (r, K, F)
                out[s : s + step] = self._pair_block(u, vec[cand], cross, combine)
        return out

    @torch.no_grad()
    def score_all(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Scores (B, N) float32 of the whole catalog.

        ``-inf`` for items released after the query time ``obs["context"][:, 0]``. The fast
        path (see the module docstring and :func:`benchmark_score_all`).
        """
        ot = self._prepare(obs)
        if not self._fast():
            out = self._score_all_generic(ot)
        else:
            out = self._score_all_fast(ot)
        t = ot[Obs.CONTEXT][:, 0]
        out.masked_fill_(self.release_time[None, :] > t[:, None], -math.inf)
        return out.cpu().numpy()

    def _score_all_generic(self, ot: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, N) scores of the whole catalog by the generic path (any device, precision)."""
        b = ot[Obs.ITEMS].shape[0]
        n = self.n_items
        vec = self.item_vectors()  # (N, d_proj)
        out = torch.empty(b, n, device=self.device)
        pairs = self._block_pairs()
        rows = max(1, min(b, 256))
        with autocast(self.device, self._precision):
            for s in range(0, b, rows):
                o = _rows(ot, slice(s, min(b, s + rows)))
                nr = o[Obs.ITEMS].shape[0]
                u = self._user_side(o)  # (r, d_proj)
                tables = self.crosses.user_tables(o) if self.crosses.n_features else None
                hv = self.crosses.history_values(tables) if tables is not None else None
                width = max(1, pairs // nr)
                for i0 in range(0, n, width):
                    i1 = min(n, i0 + width)
                    cross = None
                    if tables is not None:
                        cross = self.crosses.catalog(tables, i0, i1, hv)  # (r, n, F)
                    out[s : s + nr, i0:i1] = self._pair_block(u, vec[i0:i1], cross, True)[..., 0]
        return out

    def _score_all_fast(self, ot: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, N) scores of the whole catalog by the bitwise CPU fast path."""
        b = ot[Obs.ITEMS].shape[0]
        n = self.n_items
        vec = self._item_cache()  # (N, H)
        layers = self._fast_weights()
        out = torch.empty(b, n)
        buffers: dict[str, torch.Tensor] = {}
        step = self._row_chunk(b)
        for s in range(0, b, step):
            ctx = self._row_context(_rows(ot, slice(s, min(b, s + step))))
            nr = ctx.time.shape[0]
            touched = self._touched_pairs(ctx)
            width = max(1, self.config.chunk_pairs // nr)
            for i0 in range(0, n, width):
                i1 = min(n, i0 + width)
                x0 = _buffer(buffers, "x0", (nr * (i1 - i0), vec.shape[1]))
                self._assemble_catalog(ctx, touched, i0, i1, vec, x0)
                heads = self._pair_net_fast(x0, layers, buffers)
                out[s : s + nr, i0:i1] = self.combine(heads).view(nr, i1 - i0)
        return out

    # ------------------------------------------------------------------ fast-path assembly
    def _row_context(self, obs: dict[str, torch.Tensor]) -> _RowContext:
        """Everything the pairs of a chunk of rows share (see :class:`_RowContext`)."""
        u = self._user_side(obs)  # (b, d_proj)
        b = u.shape[0]
        hidden = self.config.hidden
        t = obs[Obs.CONTEXT][:, 0].float()
        base = torch.zeros(b, 1, hidden)
        base[:, 0, : self.proj_dim] = u
        base[:, 0, -1] = 1.0  # the constant unit that carries the biases
        if self.cross_proj is None:
            return _RowContext(base.reshape(b, hidden), 1, [], t)
        cf = self.crosses
        tables = cf.user_tables(obs)
        w = self.cross_proj.weight  # (d_proj, F - age)
        nf = len(ATTRIBUTE_FEATURES)
        joint = base  # (b, 1, H)
        sparse: list[tuple[torch.Tensor, torch.Tensor]] = []
        length = tables.items.shape[1]

        def padded(x: torch.Tensor) -> torch.Tensor:  # (m, d_proj) -> (m, H) with zero tail
            return F.pad(x, (0, hidden - self.proj_dim))

        for ia in range(len(cf.attributes)):
            w_a = w[:, ia * nf : (ia + 1) * nf].t()  # (7, d_proj)
            if ia in self._dense:
                card = cf.cardinalities[ia]
                feats = cf.value_table(tables, ia).reshape(-1, nf)  # (b C_a, 7)
                proj = padded(_matmul(feats, w_a)).view(b, 1, card, hidden)
                # joint table over the dense attributes: index j = (...(v_1 C_2 + v_2) C_3 + ...)
                joint = (joint[:, :, None, :] + proj).reshape(b, -1, hidden)
            else:
                feats = tables.slot_features[:, ia].reshape(-1, nf)  # (b L, 7)
                sparse.append((tables.first_keys[:, :, ia], padded(_matmul(feats, w_a))))
        if cf.use_item:
            na = cf.n_attribute_features
            w_i = w[:, na : na + len(ITEM_FEATURES)].t()  # (5, d_proj)
            hv = cf.history_values(tables).reshape(b * length, -1)  # (b L, 5)
            sparse.append((first_occurrence(tables.items), padded(_matmul(hv, w_i))))
        n_joint = joint.shape[1]
        return _RowContext(joint.reshape(b * n_joint, hidden), n_joint, sparse, t)

    def _sparse_attributes(self) -> list[int]:
        return [ia for ia in range(len(self.crosses.attributes)) if ia not in self._dense]

    def _touched_pairs(self, ctx: _RowContext) -> list[tuple[torch.Tensor, ...]]:
        """Per sparse source: ``(item, row, delta row)`` of every pair it touches, by item.

        A sparse attribute touches the items whose value occurs in the row's history (found
        through the value -> items index); the item source touches the history items.
        """
        out = []
        sparse_attrs = self._sparse_attributes()
        b = ctx.time.shape[0]
        for j, (keys, _) in enumerate(ctx.sparse):
            length = keys.shape[1]
            bb, ll = (keys >= 0).nonzero(as_tuple=True)
            slot = bb * length + ll
            if j < len(sparse_attrs):  # an attribute: expand each value to its items
                ia = sparse_attrs[j]
                starts, items = self.crosses.value_items(ia)
                v = keys[bb, ll] - self.crosses.offsets[ia]
                cnt = starts[v + 1] - starts[v]
                rep = torch.repeat_interleave(torch.arange(v.numel()), cnt)
                within = torch.arange(int(cnt.sum())) - (torch.cumsum(cnt, 0) - cnt)[rep]
                item = items[starts[v][rep] + within]
                bb, slot = bb[rep], slot[rep]
            else:
                item = keys[bb, ll]
            order = torch.argsort(item * b + bb)
            out.append((item[order], bb[order], slot[order]))
        return out

    @staticmethod
    def _add_sparse(
        x0: torch.Tensor, pos: torch.Tensor, delta: torch.Tensor, rows: torch.Tensor
    ) -> None:
        if pos.numel():
            x0.index_put_((pos,), x0[pos] + delta[rows])  # one add per touched pair

    def _assemble_catalog(
        self,
        ctx: _RowContext,
        touched: list[tuple[torch.Tensor, ...]],
        i0: int,
        i1: int,
        vec: torch.Tensor,
        x0: torch.Tensor,
    ) -> None:
        """x0 (b n, H) = ``[U_b + I_n + P c_bn, log age, 1]`` for items [i0, i1), every row."""
        b = ctx.time.shape[0]
        n = i1 - i0
        hidden = x0.shape[1]
        flat = (torch.arange(b) * ctx.n_joint)[:, None] + self._joint_key[None, i0:i1]  # (b, n)
        torch.index_select(ctx.joint, 0, flat.reshape(-1), out=x0)  # U_b + dense crosses, 1
        x0.view(b, n, hidden).add_(vec[None, i0:i1])  # + I_n
        for (item, bb, slot), (_, delta) in zip(touched, ctx.sparse, strict=True):
            lo, hi = torch.searchsorted(item, torch.tensor([i0, i1])).tolist()
            self._add_sparse(x0, bb[lo:hi] * n + (item[lo:hi] - i0), delta, slot[lo:hi])
        if self._use_age:
            age = self.crosses.log_age(ctx.time[:, None], self.release_time[None, i0:i1])
            x0[:, self.proj_dim] = age.reshape(-1)

    def _assemble_candidates(
        self,
        ctx: _RowContext,
        r0: int,
        r1: int,
        cand: torch.Tensor,
        vec: torch.Tensor,
        x0: torch.Tensor,
    ) -> None:
        """x0 (r K, H) for candidates (r, K) of rows [r0, r1) of ``ctx``.

        The same values and the same sequence of float operations as
        :meth:`_assemble_catalog` (the assembly is gathers and elementwise operations: the
        same bits on every CPU; the pair network that follows is where kernels may differ).
        """
        r, k = cand.shape
        flat = (torch.arange(r0, r1) * ctx.n_joint)[:, None] + self._joint_key[cand]  # (r, K)
        torch.index_select(ctx.joint, 0, flat.reshape(-1), out=x0)
        x0.add_(torch.index_select(vec, 0, cand.reshape(-1)))  # + I_n
        sparse_attrs = self._sparse_attributes()
        for j, (keys, delta) in enumerate(ctx.sparse):
            length = keys.shape[1]
            ck = self.crosses.keys[cand, sparse_attrs[j]] if j < len(sparse_attrs) else cand
            eq = ck[:, :, None] == keys[r0:r1, None, :]  # (r, K, L): at most one hit per pair
            ri, ki, slot = eq.nonzero(as_tuple=True)
            self._add_sparse(x0, ri * k + ki, delta, (ri + r0) * length + slot)
        if self._use_age:
            age = self.crosses.log_age(ctx.time[r0:r1, None], self.release_time[cand])
            x0[:, self.proj_dim] = age.reshape(-1)

    @torch.no_grad()
    def top_k(
        self, obs: dict[str, np.ndarray], k: int, candidates: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best items per row: ``(ids int64 (B, k), scores float32 (B, k))``, best first.

        Over the whole released catalog (``candidates=None``) or over ``candidates`` (B, K)
        (-1 padding). Rows with fewer than k scorable items get id -1 and score ``-inf`` in the
        remaining slots.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if candidates is None:
            if k > self.n_items:
                raise ValueError(f"k must be in [1, {self.n_items}] (the catalog), got {k}")
            scores = torch.from_numpy(self.score_all(obs))
            val, idx = torch.topk(scores, k, dim=1)
            ids = idx
        else:
            cand = np.asarray(candidates)
            if cand.ndim != 2 or k > cand.shape[1]:
                raise ValueError(
                    f"k must be in [1, K={cand.shape[-1] if cand.ndim else 0}] for candidates of "
                    f"shape {cand.shape}, got {k}"
                )
            scores = torch.from_numpy(self.score(obs, cand))
            val, idx = torch.topk(scores, k, dim=1)
            ids = torch.gather(torch.from_numpy(cand.astype(np.int64)), 1, idx)
        ids = torch.where(torch.isinf(val) & (val < 0), torch.full_like(ids, -1), ids)
        return ids.numpy(), val.numpy()


def benchmark_score_all(
    ranker: Ranker,
    obs: dict[str, np.ndarray],
    repeats: int = 3,
    threads: int = 1,
    verbose: bool = True,
) -> dict[str, float]:
    """Time :meth:`Ranker.score_all` on ``threads`` torch threads; print and return pairs/s.

    One warm-up call (fills the item cache) precedes ``repeats`` timed calls. ``pairs_per_s``
    is ``B * N`` pairs over the median wall time of a call; ``pairs_per_cpu_s`` over the
    median process CPU time, which other processes on a shared machine do not inflate (with
    one thread the two agree on an idle machine).

    Returns:
        ``{"pairs_per_s", "pairs_per_cpu_s", "seconds_per_call", "cpu_seconds_per_call",
        "users", "items", "threads", "repeats"}``.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    was_training = ranker.training
    torch.set_num_threads(threads)
    try:
        ranker.eval()
        ranker.score_all(obs)
        wall, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            ranker.score_all(obs)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    finally:
        torch.set_num_threads(before)
        ranker.train(was_training)
    b = int(np.shape(obs[Obs.ITEMS])[0])
    pairs = b * ranker.n_items
    sec, csec = float(np.median(wall)), float(np.median(cpu))
    res = {
        "pairs_per_s": pairs / sec,
        "pairs_per_cpu_s": pairs / max(csec, 1e-9),
        "seconds_per_call": sec,
        "cpu_seconds_per_call": csec,
        "users": float(b),
        "items": float(ranker.n_items),
        "threads": float(threads),
        "repeats": float(repeats),
    }
    if verbose:
        print(
            f"score_all: {res['pairs_per_s'] / 1e6:.2f} M pairs/s wall, "
            f"{res['pairs_per_cpu_s'] / 1e6:.2f} M pairs/s CPU time "
            f"({b} users x {ranker.n_items} items in {sec * 1e3:.1f} ms, {threads} thread(s))"
        )
    return res
