"""The two-tower model and its serving wrapper (a :class:`CandidateGenerator`).

Model (towers + similarity), training task (``retrieval.train``), serving wrapper
(:class:`TwoTowerGenerator`, cached item vectors) and index factory (``retrieval.index``) are
separate pieces, as in TorchRec's retrieval example.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval.baselines import CandidateGenerator, Interactions
from retrieval.similarity import Similarity, SimilarityConfig
from retrieval.towers import ItemTowerConfig, UserTowerConfig, build_item_tower, build_user_tower
from simenv.types import ItemCatalog, Obs

__all__ = ["TwoTowerConfig", "TwoTowerModel", "TwoTowerGenerator"]


@dataclass(frozen=True)
class TwoTowerConfig:
    """Item tower, user tower and similarity of a two-tower model.

    Attributes:
        item: item tower (ID, bag of words, features or hybrid).
        user: user tower (mean pooling, transformer or GRU); its ``dim`` must match the item's.
        similarity: dot or cosine, temperature fixed or learnable.
    """

    item: ItemTowerConfig = field(default_factory=ItemTowerConfig)
    user: UserTowerConfig = field(default_factory=lambda: UserTowerConfig(kind="mean"))
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)

    def __post_init__(self) -> None:
        for name, cls in (
            ("item", ItemTowerConfig),
            ("user", UserTowerConfig),
            ("similarity", SimilarityConfig),
        ):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(
                    f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return dataclasses.asdict(self)


class TwoTowerModel(nn.Module):
    """User tower and item tower meeting in a similarity: ``f(u, i) = sim(user(u), item(i)) / tau``.

    Args:
        user_tower: maps an observation dict to ``(B, d)``.
        item_tower: maps item ids to ``(..., d)``.
        similarity: :class:`retrieval.similarity.Similarity`.
        config: the config it was built from (kept for checkpoints), optional.
    """

    def __init__(
        self,
        user_tower: nn.Module,
        item_tower: nn.Module,
        similarity: Similarity,
        config: TwoTowerConfig | None = None,
    ) -> None:
        super().__init__()
        self.user_tower = user_tower
        self.item_tower = item_tower
        self.similarity = similarity
        self.config = config

    @classmethod
    def build(cls, config: TwoTowerConfig, catalog: ItemCatalog) -> TwoTowerModel:
        """Towers and similarity from a config and the public catalog."""
        item = build_item_tower(config.item, catalog)
        user = build_user_tower(config.user, item)
        return cls(user, item, Similarity(config.similarity), config)

    @property
    def n_items(self) -> int:
        """Catalog size."""
        return int(self.item_tower.n_items)

    def user_vectors(self, obs: dict[str, Any]) -> torch.Tensor:
        """Raw user-tower outputs ``(B, d)``."""
        return self.user_tower(obs)

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Raw item-tower outputs ``(..., d)``."""
        return self.item_tower(ids)

    @torch.no_grad()
    def all_item_vectors(self, batch_size: int = 8192) -> torch.Tensor:
        """Every item's vector ``(N, d)`` (for caching / the index)."""
        return self.item_tower.encode_all(batch_size=batch_size)

    @torch.no_grad()
    def scores(self, obs: dict[str, Any], item_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the whole catalog ``(B, N)`` (no release or seen filtering)."""
        was = self.training
        self.eval()
        items = self.all_item_vectors() if item_vectors is None else item_vectors
        out = self.similarity(self.user_vectors(obs), items)
        self.train(was)
        return out


class TwoTowerGenerator(CandidateGenerator):
    """Serving wrapper: cached item vectors + full-catalog scoring behind the generator interface.

    ``retrieve(obs, k)`` and ``score_all(obs)`` follow :class:`CandidateGenerator`'s rules
    (never unreleased items, optional seen-item exclusion, -1 padding). Call :meth:`refresh`
    after training (or when new items are released) to re-encode the catalog.

    Args:
        model: a trained :class:`TwoTowerModel`.
        catalog: the public catalog (release times).
        popularity: optional (N,) training counts (reports and tie-breaks).
        name: report name.
    """

    name = "two-tower"

    def __init__(
        self,
        model: TwoTowerModel,
        catalog: ItemCatalog,
        popularity: np.ndarray | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        if name is not None:
            self.name = name
        self.n_items = catalog.n_items
        self.release_time = np.asarray(catalog.release_time, dtype=np.float64)
        self.popularity = (
            np.zeros(catalog.n_items)
            if popularity is None
            else np.asarray(popularity, dtype=np.float64)
        )
        self._item_vecs: torch.Tensor | None = None
        self.refresh()

    def refresh(self) -> None:
        """Re-encode every item with the current item tower (cache for serving)."""
        self.model.eval()
        with torch.no_grad():
            self._item_vecs = self.model.similarity.prepare(self.model.all_item_vectors())
        self._fitted = True

    @property
    def item_vectors(self) -> torch.Tensor:
        """Cached, similarity-prepared item vectors ``(N, d)`` (l2-normalised for cosine)."""
        assert self._item_vecs is not None
        return self._item_vecs

    def user_vectors(self, obs: dict[str, np.ndarray]) -> torch.Tensor:
        """Similarity-prepared user vectors divided by the temperature ``(B, d)``."""
        self.model.eval()
        with torch.no_grad():
            u = self.model.similarity.prepare(self.model.user_vectors(obs))
            return u / self.model.similarity.tau

    def fit(self, interactions: Interactions, catalog: ItemCatalog) -> TwoTowerGenerator:
        """Two towers are trained with :func:`retrieval.train.fit_two_tower`, not here."""
        raise NotImplementedError(
            "train the model with retrieval.train.fit_two_tower, then wrap it"
        )

    def _fit(self, interactions: Interactions, catalog: ItemCatalog) -> None:  # pragma: no cover
        raise NotImplementedError

    def _score(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        u = self.user_vectors({k: v for k, v in obs.items()})
        return (u @ self.item_vectors.T).cpu().numpy()  # results back from the model's device

    def _check_obs(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = super()._check_obs(obs)
        # the towers also read dt (and the user id is harmless): pass them through
        for key in (Obs.DT, Obs.USER):
            if key in obs and key not in checked:
                checked[key] = np.asarray(obs[key])
        return checked
