"""Towers of the two-tower candidate generator: item towers and user towers."""

from .item import (
    BagOfWordsItemTower,
    FeatureItemTower,
    HybridItemTower,
    IDItemTower,
    ItemTower,
    ItemTowerConfig,
    build_item_tower,
)
from .user import (
    GRUUserTower,
    MeanPoolUserTower,
    TransformerUserTower,
    UserTower,
    UserTowerConfig,
    build_user_tower,
    time_bucket,
)

__all__ = [
    "BagOfWordsItemTower",
    "FeatureItemTower",
    "GRUUserTower",
    "HybridItemTower",
    "IDItemTower",
    "ItemTower",
    "ItemTowerConfig",
    "MeanPoolUserTower",
    "TransformerUserTower",
    "UserTower",
    "UserTowerConfig",
    "build_item_tower",
    "build_user_tower",
    "time_bucket",
]
