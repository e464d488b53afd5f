"""Item towers: map item ids to vectors in the shared semantic space.

Lecture, "Айтемные башни": a trainable ID embedding is the most expressive tower but is
transductive (cannot encode unseen items), memorises and overfits the heavy tail, and needs a
large table. Content encoders (a bag of words over the title, an MLP over categorical
features) add inductive bias: they encode new items, share statistics between rare items
with common features, and need less memory. A hybrid combines both.

Every tower keeps the item content it needs as buffers (taken from
:class:`simenv.types.ItemCatalog` at construction), so ``forward`` takes only ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from simenv.arrays import check_item_ids
from simenv.types import ItemCatalog

from ._layers import MLP, check_positive_int, reset_parameters

__all__ = [
    "BagOfWordsItemTower",
    "FeatureItemTower",
    "HybridItemTower",
    "IDItemTower",
    "ItemTower",
    "ItemTowerConfig",
    "build_item_tower",
]

ITEM_TOWER_KINDS = ("id", "bow", "features", "hybrid")
COMBINE_MODES = ("sum", "concat")
DEFAULT_FEATURES = ("creator", "topic", "group")


@dataclass(frozen=True)
class ItemTowerConfig:
    """Configuration of an item tower (see :func:`build_item_tower`).

    Attributes:
        kind: ``"id"`` (trainable ID embedding), ``"bow"`` (mean bag of words over title
            tokens), ``"features"`` (embeddings of categorical columns + MLP) or ``"hybrid"``.
        dim: output dimension d.
        hidden: hidden widths of the MLP of a ``"features"`` tower (may be empty).
        features: categorical columns a ``"features"`` tower reads.
        feature_dim: embedding width of each categorical column.
        parts: configurations of the parts of a ``"hybrid"`` tower (only for hybrid).
        combine: how a hybrid merges its parts: ``"sum"`` (parts of equal dim) or ``"concat"``;
            the result is then projected to ``dim``.
        n_items: catalog size for an ``"id"`` tower built without a catalog.
        seed: seed of the tower's own parameter initialisation.
        sparse: ``"id"`` only: the embedding table returns sparse gradients
            (``nn.Embedding(sparse=True)``), so a step touches only the rows in the batch;
            :func:`retrieval.train.fit_two_tower` then steps the table with ``SparseAdam``.
    """

    kind: str = "id"
    dim: int = 64
    hidden: tuple[int, ...] = (128,)
    features: tuple[str, ...] = DEFAULT_FEATURES
    feature_dim: int = 16
    parts: tuple[ItemTowerConfig, ...] = ()
    combine: str = "sum"
    n_items: int | None = None
    seed: int = 0
    sparse: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ITEM_TOWER_KINDS:
            raise ValueError(f"kind must be one of {ITEM_TOWER_KINDS}, got {self.kind!r}")
        check_positive_int("dim", self.dim)
        check_positive_int("feature_dim", self.feature_dim)
        object.__setattr__(self, "hidden", tuple(self.hidden))
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "parts", tuple(self.parts))
        for h in self.hidden:
            check_positive_int("hidden[i]", h)
        if not self.features or len(set(self.features)) != len(self.features):
            raise ValueError(f"features must be non-empty and distinct, got {self.features}")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {self.combine!r}")
        if self.kind == "hybrid":
            if not self.parts:
                raise ValueError("parts must hold at least one ItemTowerConfig for kind='hybrid'")
            for p in self.parts:
                if not isinstance(p, ItemTowerConfig):
                    raise ValueError(f"parts must be ItemTowerConfig, got {type(p).__name__}")
            if self.combine == "sum" and len({p.dim for p in self.parts}) > 1:
                raise ValueError(
                    f"combine='sum' needs parts of one dim, got {[p.dim for p in self.parts]}"
                )
        elif self.parts:
            raise ValueError(f"parts is only for kind='hybrid', got kind={self.kind!r}")
        if self.n_items is not None:
            check_positive_int("n_items", self.n_items)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.sparse, bool):
            raise ValueError(f"sparse must be a bool, got {self.sparse!r}")
        if self.sparse and self.kind != "id":
            raise ValueError(f"sparse=True is only for kind='id', got kind={self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-friendly) of the config, parts included."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ItemTowerConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown ItemTowerConfig keys {sorted(unknown)}; known: {sorted(known)}"
            )
        d = dict(d)
        d["parts"] = tuple(cls.from_dict(p) for p in d.get("parts", ()))
        for key in ("hidden", "features"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


class ItemTower(nn.Module):
    """Base class: ``forward(item_ids (...)) -> (..., dim)``.

    Subclasses implement :meth:`_encode` on a flat ``(M,)`` id tensor and
    :meth:`get_config`. Ids are checked to be int64 in ``[0, n_items)``.
    """

    n_items: int
    dim: int

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Encode items.

        Args:
            item_ids: int64 tensor of any shape ``(...)`` with values in ``[0, n_items)``.

        Returns:
            float32 ``(..., dim)``.
        """
        if not isinstance(item_ids, torch.Tensor) or item_ids.dtype != torch.int64:
            raise ValueError(
                f"item_ids must be an int64 tensor, got "
                f"{getattr(item_ids, 'dtype', type(item_ids).__name__)}"
            )
        check_item_ids("item_ids", item_ids, self.n_items)
        flat = item_ids.reshape(-1)  # (M,)
        return self._encode(flat).reshape(*item_ids.shape, self.dim)  # (..., d)

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def encode_all(self, batch_size: int = 8192) -> torch.Tensor:
        """Vectors of every item, ``(n_items, dim)``, in eval mode and without grad.

        Meant for caching in the retrieval index; the module's training flag is restored.
        """
        check_positive_int("batch_size", batch_size)
        was_training = self.training
        self.eval()
        try:
            device = next(iter(self.buffers()), next(iter(self.parameters()))).device
            ids = torch.arange(self.n_items, device=device)
            out = torch.cat(
                [self(ids[s : s + batch_size]) for s in range(0, self.n_items, batch_size)]
            )
        finally:
            self.train(was_training)
        return out  # (N, d)

    def get_config(self) -> ItemTowerConfig:  # pragma: no cover - abstract
        """The :class:`ItemTowerConfig` that rebuilds this tower with :meth:`from_config`."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: ItemTowerConfig, catalog: ItemCatalog | None) -> ItemTower:
        """Build a tower from its config (same as :func:`build_item_tower`)."""
        return build_item_tower(config, catalog)

    def _init_from_seed(self, seed: int) -> None:
        reset_parameters(self, torch.Generator().manual_seed(seed))


def _check_catalog(catalog: object) -> ItemCatalog:
    if not isinstance(catalog, ItemCatalog):
        raise ValueError(
            f"catalog must be a simenv.types.ItemCatalog, got {type(catalog).__name__}"
        )
    return catalog


class IDItemTower(ItemTower):
    """Trainable ID embedding: one free vector per item (lecture: "Обучаемые эмбединги").

    Most expressive, transductive: an item never trained keeps its random init vector.
    With ``sparse=True`` the table's gradient is a sparse tensor over the rows looked up
    (see :class:`ItemTowerConfig`).
    """

    def __init__(self, n_items: int, dim: int, seed: int = 0, sparse: bool = False) -> None:
        super().__init__()
        self.n_items = check_positive_int("n_items", n_items)
        self.dim = check_positive_int("dim", dim)
        self.seed = seed
        with torch.random.fork_rng(devices=[]):  # module construction must not move the global RNG
            self.embedding = nn.Embedding(n_items, dim, sparse=bool(sparse))
        self._init_from_seed(seed)

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)  # (M, d)

    def get_config(self) -> ItemTowerConfig:
        """See :meth:`ItemTower.get_config`."""
        return ItemTowerConfig(
            kind="id",
            dim=self.dim,
            n_items=self.n_items,
            seed=self.seed,
            sparse=bool(self.embedding.sparse),
        )


class BagOfWordsItemTower(ItemTower):
    """Mean of trainable token embeddings over the title (lecture: "Мешок слов").

    Items with similar titles get similar vectors; word order is ignored. Padding token 0
    is excluded from the mean; an item whose title is all padding gets the zero vector.
    """

    title_tokens: torch.Tensor

    def __init__(self, catalog: ItemCatalog, dim: int, seed: int = 0) -> None:
        super().__init__()
        catalog = _check_catalog(catalog)
        tokens = np.asarray(catalog.title_tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= catalog.vocab_size):
            raise ValueError(
                f"catalog.title_tokens must lie in [0, vocab_size={catalog.vocab_size}), "
                f"got [{tokens.min()}, {tokens.max()}]"
            )
        self.n_items = catalog.n_items
        self.dim = check_positive_int("dim", dim)
        self.seed = seed
        self.register_buffer("title_tokens", torch.as_tensor(tokens, dtype=torch.int64))  # (N, T)
        with torch.random.fork_rng(devices=[]):
            self.bag = nn.EmbeddingBag(catalog.vocab_size, dim, mode="mean", padding_idx=0)
        self._init_from_seed(seed)

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bag(self.title_tokens[ids])  # (M, T) -> (M, d)

    def get_config(self) -> ItemTowerConfig:
        """See :meth:`ItemTower.get_config`."""
        return ItemTowerConfig(kind="bow", dim=self.dim, seed=self.seed)


class FeatureItemTower(ItemTower):
    """Content encoder over categorical features: one embedding per column, concat, MLP.

    Features repeat across items, so the tail "by feature" is strictly lighter than the tail
    "by id" (lecture: "Тяжелый хвост и контентное кодирование").
    """

    categorical: torch.Tensor

    def __init__(
        self,
        catalog: ItemCatalog,
        dim: int,
        hidden: Sequence[int] = (128,),
        features: Sequence[str] = DEFAULT_FEATURES,
        feature_dim: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        catalog = _check_catalog(catalog)
        features = tuple(features)
        if not features or len(set(features)) != len(features):
            raise ValueError(f"features must be non-empty and distinct, got {features}")
        missing = [f for f in features if f not in catalog.categorical_names]
        if missing:
            raise ValueError(
                f"features {missing} not in catalog.categorical_names={catalog.categorical_names}"
            )
        cols = [catalog.categorical_names.index(f) for f in features]
        cards = [int(catalog.categorical_cardinalities[j]) for j in cols]
        values = np.asarray(catalog.categorical)[:, cols]  # (N, F)
        for name, j, card in zip(features, range(len(cols)), cards, strict=True):
            lo, hi = values[:, j].min(), values[:, j].max()
            if lo < 0 or hi >= card:
                raise ValueError(
                    f"catalog column {name!r} must lie in [0, {card}), got [{lo}, {hi}]"
                )
        self.n_items = catalog.n_items
        self.dim = check_positive_int("dim", dim)
        self.hidden = tuple(check_positive_int("hidden[i]", h) for h in hidden)
        self.features = features
        self.feature_dim = check_positive_int("feature_dim", feature_dim)
        self.seed = seed
        self.register_buffer("categorical", torch.as_tensor(values, dtype=torch.int64))  # (N, F)
        # offsets turn F columns into ids of one shared table (one lookup instead of F)
        offsets = np.concatenate([[0], np.cumsum(cards)[:-1]])
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.int64))  # (F,)
        with torch.random.fork_rng(devices=[]):
            self.embedding = nn.Embedding(int(sum(cards)), feature_dim)
            self.mlp = MLP(len(features) * feature_dim, self.hidden, dim)
        self._init_from_seed(seed)

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding(self.categorical[ids] + self.offsets)  # (M, F, fd)
        return self.mlp(e.flatten(1))  # (M, F*fd) -> (M, d)

    def get_config(self) -> ItemTowerConfig:
        """See :meth:`ItemTower.get_config`."""
        return ItemTowerConfig(
            kind="features",
            dim=self.dim,
            hidden=self.hidden,
            features=self.features,
            feature_dim=self.feature_dim,
            seed=self.seed,
        )


class HybridItemTower(ItemTower):
    """Any combination of item towers, merged by sum or concat, then a linear projection.

    Lecture: content encoding trained on all users' data is a hybrid (content +
    collaborative) model; e.g. ID + bag of words + features, where the content parts carry
    new items and the ID part adds memorisation for the head.
    """

    def __init__(
        self, parts: Sequence[ItemTower], dim: int, combine: str = "sum", seed: int = 0
    ) -> None:
        super().__init__()
        parts = list(parts)
        if not parts or not all(isinstance(p, ItemTower) for p in parts):
            raise ValueError(f"parts must be a non-empty sequence of ItemTower, got {parts!r}")
        n_items = {p.n_items for p in parts}
        if len(n_items) != 1:
            raise ValueError(f"parts must share n_items, got {[p.n_items for p in parts]}")
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        dims = [p.dim for p in parts]
        if combine == "sum" and len(set(dims)) != 1:
            raise ValueError(f"combine='sum' needs parts of one dim, got {dims}")
        self.n_items = n_items.pop()
        self.dim = check_positive_int("dim", dim)
        self.combine = combine
        self.seed = seed
        self.parts = nn.ModuleList(parts)
        in_dim = dims[0] if combine == "sum" else sum(dims)
        with torch.random.fork_rng(devices=[]):
            self.proj = nn.Linear(in_dim, dim)
        # parts keep their own (seeded) init; only the projection is initialised here
        reset_parameters(self.proj, torch.Generator().manual_seed(seed))

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        outs = [p._encode(ids) for p in self.parts]  # each (M, d_p)
        h = torch.stack(outs).sum(0) if self.combine == "sum" else torch.cat(outs, dim=-1)
        return self.proj(h)  # (M, d)

    def get_config(self) -> ItemTowerConfig:
        """See :meth:`ItemTower.get_config`."""
        return ItemTowerConfig(
            kind="hybrid",
            dim=self.dim,
            parts=tuple(p.get_config() for p in self.parts),
            combine=self.combine,
            seed=self.seed,
        )


def build_item_tower(config: ItemTowerConfig, catalog: ItemCatalog | None) -> ItemTower:
    """Build the item tower described by ``config``.

    Args:
        config: the tower's configuration.
        catalog: item content; may be None only for an ``"id"`` tower with
            ``config.n_items`` set. When both are given, they must agree on ``n_items``.

    Returns:
        A freshly initialised tower (same config, same weights).
    """
    if not isinstance(config, ItemTowerConfig):
        raise ValueError(f"config must be an ItemTowerConfig, got {type(config).__name__}")
    if catalog is not None:
        _check_catalog(catalog)
    if config.kind == "id":
        if catalog is None and config.n_items is None:
            raise ValueError("an 'id' item tower needs a catalog or config.n_items")
        if catalog is not None and config.n_items is not None and config.n_items != catalog.n_items:
            raise ValueError(
                f"config.n_items={config.n_items} does not match catalog.n_items={catalog.n_items}"
            )
        n = catalog.n_items if catalog is not None else config.n_items
        return IDItemTower(int(n), config.dim, seed=config.seed, sparse=config.sparse)
    if catalog is None:
        raise ValueError(f"an item tower of kind={config.kind!r} needs a catalog, got None")
    if config.kind == "bow":
        return BagOfWordsItemTower(catalog, config.dim, seed=config.seed)
    if config.kind == "features":
        return FeatureItemTower(
            catalog,
            config.dim,
            hidden=config.hidden,
            features=config.features,
            feature_dim=config.feature_dim,
            seed=config.seed,
        )
    parts = [build_item_tower(p, catalog) for p in config.parts]
    return HybridItemTower(parts, config.dim, combine=config.combine, seed=config.seed)
