"""Item towers: shapes, exact formulas, validation, seeding and config round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval.towers import (
    BagOfWordsItemTower,
    FeatureItemTower,
    HybridItemTower,
    IDItemTower,
    ItemTower,
    ItemTowerConfig,
    build_item_tower,
)
from simenv.types import ItemCatalog
from tests.numerics import assert_reordered_close, network_reductions

N_ITEMS = 40
VOCAB = 25


def make_catalog(n: int = N_ITEMS, seed: int = 0) -> ItemCatalog:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(n, 5))
    tokens[:, 3:] *= rng.random((n, 2)) < 0.5  # some trailing padding
    tokens[0] = 0  # item 0 has an empty title
    topic = rng.integers(0, 4, n)
    cat = np.stack([rng.integers(0, 7, n), topic, topic % 2], axis=1)
    return ItemCatalog(
        title_tokens=tokens.astype(np.int64),
        vocab_size=VOCAB,
        categorical=cat.astype(np.int64),
        categorical_names=("creator", "topic", "group"),
        categorical_cardinalities=(7, 4, 2),
        release_time=np.zeros(n, np.float32),
    )


CATALOG = make_catalog()

CONFIGS = [
    ItemTowerConfig(kind="id", dim=8),
    ItemTowerConfig(kind="bow", dim=8, seed=3),
    ItemTowerConfig(kind="features", dim=8, hidden=(16, 12), feature_dim=4, seed=5),
    ItemTowerConfig(kind="features", dim=8, hidden=(), features=("topic",)),
    ItemTowerConfig(
        kind="hybrid",
        dim=6,
        parts=(ItemTowerConfig(kind="id", dim=8), ItemTowerConfig(kind="bow", dim=8, seed=1)),
        combine="sum",
        seed=2,
    ),
    ItemTowerConfig(
        kind="hybrid",
        dim=8,
        parts=(
            ItemTowerConfig(kind="bow", dim=4),
            ItemTowerConfig(kind="features", dim=6, hidden=(8,)),
        ),
        combine="concat",
    ),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.kind}-{c.combine}")
def test_shapes_dtypes_and_encode_all(config):
    tower = build_item_tower(config, CATALOG)
    assert isinstance(tower, ItemTower)
    assert tower.n_items == N_ITEMS and tower.dim == config.dim
    for shape in [(), (5,), (2, 3), (2, 0)]:
        ids = torch.randint(0, N_ITEMS, shape, generator=torch.Generator().manual_seed(0))
        out = tower(ids)
        assert out.shape == (*shape, config.dim)
        assert out.dtype == torch.float32
    tower.train()
    full = tower.encode_all(batch_size=7)
    assert tower.training  # training flag restored
    assert full.shape == (N_ITEMS, config.dim) and not full.requires_grad
    # other batch sizes run other BLAS kernels (another summation order): equal up to the
    # float32 reordering bound, not bitwise (batch 7 vs 1000 differ by 3e-8 on an AMD EPYC)
    red = _reductions(tower)
    assert_reordered_close(tower.encode_all(batch_size=1000), full, **red)
    with torch.no_grad():
        assert_reordered_close(tower(torch.arange(N_ITEMS)), full, **red)
        ids = torch.tensor([[3, 1], [39, 3]])
        assert_reordered_close(tower(ids), full[ids], **red)


def _reductions(tower: torch.nn.Module) -> dict[str, int]:
    """Reordering bound arguments: Linear layers, and the bag-of-words mean over a title."""
    terms, depth = network_reductions(tower, CATALOG.title_tokens.shape[1])
    return {"terms": terms, "depth": depth}


def test_id_tower_is_a_lookup():
    tower = IDItemTower(N_ITEMS, 8, seed=1)
    ids = torch.tensor([5, 5, 0, 39])
    # bitwise: an ID tower is a pure gather (no arithmetic), the same on every machine
    torch.testing.assert_close(tower(ids), tower.embedding.weight[ids], rtol=0, atol=0)


def test_bag_of_words_is_mean_of_non_padding_tokens():
    tower = BagOfWordsItemTower(CATALOG, 8, seed=0)
    table = tower.bag.weight.detach()
    out = tower(torch.arange(N_ITEMS)).detach()
    for i in range(N_ITEMS):  # test-side reference loop
        toks = [t for t in CATALOG.title_tokens[i] if t != 0]
        expected = table[toks].mean(0) if toks else torch.zeros(8)
        torch.testing.assert_close(out[i], expected, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(out[0]) == 0  # empty title -> zero vector, finite
    # the padding row gets no gradient; used tokens do
    tower(torch.arange(N_ITEMS)).sum().backward()
    grad = tower.bag.weight.grad
    assert torch.count_nonzero(grad[0]) == 0
    assert torch.count_nonzero(grad[int(CATALOG.title_tokens[1, 0])]) > 0


def test_feature_tower_formula_and_feature_selection():
    tower = FeatureItemTower(CATALOG, 8, hidden=(16,), features=("topic", "creator"), feature_dim=4)
    ids = torch.tensor([0, 7, 21])
    topic = torch.as_tensor(CATALOG.column("topic"))[ids]
    creator = torch.as_tensor(CATALOG.column("creator"))[ids]
    table = tower.embedding.weight
    # columns in the order requested, each with its own block of the shared table
    e = torch.cat([table[topic], table[4 + creator]], dim=-1)  # (3, 8)
    lin1, _, lin2 = tower.mlp
    expected = lin2(torch.nn.functional.gelu(lin1(e)))
    torch.testing.assert_close(tower(ids), expected, rtol=1e-6, atol=1e-6)
    # a tower on "topic" alone: same topic -> same vector; different topic -> different vector
    only_topic = FeatureItemTower(CATALOG, 8, hidden=(), features=("topic",))
    vec = only_topic.encode_all()
    topics = CATALOG.column("topic")
    same = np.flatnonzero(topics == topics[0])
    other = np.flatnonzero(topics != topics[0])
    # rows of one matmul with equal inputs: equal up to the reordering bound (a BLAS kernel
    # may treat the edge rows of a block in another order)
    assert_reordered_close(
        vec[same], vec[same[:1]].expand(len(same), -1), **_reductions(only_topic)
    )
    assert (vec[other] - vec[0]).abs().sum(-1).min() > 1e-4


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_hybrid_combines_then_projects(combine):
    parts = [IDItemTower(N_ITEMS, 8, seed=1), BagOfWordsItemTower(CATALOG, 8, seed=2)]
    tower = HybridItemTower(parts, 5, combine=combine, seed=3)
    ids = torch.tensor([[1, 2, 3]])
    a, b = parts[0](ids), parts[1](ids)
    h = a + b if combine == "sum" else torch.cat([a, b], -1)
    torch.testing.assert_close(tower(ids), tower.proj(h), rtol=1e-6, atol=1e-6)
    # parts are trained through the hybrid
    tower(ids).sum().backward()
    assert parts[0].embedding.weight.grad is not None
    assert parts[1].bag.weight.grad is not None


def test_bad_ids_raise():
    tower = IDItemTower(N_ITEMS, 4)
    with pytest.raises(
        ValueError, match=r"item_ids must be item ids in \[0, 39\], got values in \[0, 40\]"
    ):
        tower(torch.tensor([0, 40]))
    with pytest.raises(ValueError, match="item_ids must be item ids in"):
        tower(torch.tensor([-1]))
    with pytest.raises(ValueError, match="int64"):
        tower(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="int64"):
        tower(torch.tensor([1], dtype=torch.int32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "tfidf"}, "kind must be one of"),
        ({"dim": 0}, r"dim must be a positive int \(>= 1\), got 0"),
        ({"hidden": (8, -1)}, "hidden"),
        ({"features": ()}, "features must be non-empty"),
        ({"features": ("topic", "topic")}, "distinct"),
        ({"combine": "max"}, "combine must be one of"),
        ({"kind": "hybrid"}, "parts must hold at least one"),
        ({"kind": "id", "parts": (ItemTowerConfig(),)}, "parts is only for kind='hybrid'"),
        (
            {
                "kind": "hybrid",
                "parts": (ItemTowerConfig(dim=4), ItemTowerConfig(dim=8)),
                "combine": "sum",
            },
            r"combine='sum' needs parts of one dim, got \[4, 8\]",
        ),
        ({"n_items": 0}, "n_items"),
        ({"seed": -1}, "seed must be an int >= 0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ItemTowerConfig(**kwargs)


def test_build_validation():
    with pytest.raises(ValueError, match="needs a catalog"):
        build_item_tower(ItemTowerConfig(kind="bow"), None)
    with pytest.raises(ValueError, match="'id' item tower needs a catalog or config.n_items"):
        build_item_tower(ItemTowerConfig(kind="id"), None)
    with pytest.raises(ValueError, match="does not match catalog.n_items=40"):
        build_item_tower(ItemTowerConfig(kind="id", n_items=41), CATALOG)
    assert build_item_tower(ItemTowerConfig(kind="id", n_items=9), None).n_items == 9
    with pytest.raises(ValueError, match=r"features \['genre'\] not in catalog"):
        FeatureItemTower(CATALOG, 4, features=("genre",))
    with pytest.raises(ValueError, match="share n_items"):
        HybridItemTower([IDItemTower(3, 4), IDItemTower(4, 4)], 4)
    bad = make_catalog()
    object.__setattr__(bad, "title_tokens", bad.title_tokens + VOCAB)
    with pytest.raises(ValueError, match="title_tokens must lie in"):
        BagOfWordsItemTower(bad, 4)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.kind}-{c.combine}")
def test_seeded_construction_and_config_round_trip(config):
    before = torch.get_rng_state()
    a = build_item_tower(config, CATALOG)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is never touched
    b = build_item_tower(config, CATALOG)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    # different seed -> different weights
    reseeded = build_item_tower(_with_seed(config, config.seed + 10), CATALOG)
    assert not torch.equal(a.encode_all(), reseeded.encode_all())
    # get_config / from_config round trip (through JSON as well)
    cfg = a.get_config()
    assert type(a).from_config(cfg, CATALOG).get_config() == cfg
    assert ItemTowerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    rebuilt = ItemTower.from_config(cfg, CATALOG)
    assert type(rebuilt) is type(a)
    # bitwise: the same seed gives the same weights, and the same computation on the same
    # shapes in one process runs the same kernels (a rerun)
    torch.testing.assert_close(rebuilt.encode_all(), a.encode_all(), rtol=0, atol=0)


def _with_seed(config: ItemTowerConfig, seed: int) -> ItemTowerConfig:
    d = config.to_dict()
    d["seed"] = seed
    for p in d["parts"]:
        p["seed"] += seed
    return ItemTowerConfig.from_dict(d)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown ItemTowerConfig keys \['size'\]"):
        ItemTowerConfig.from_dict({"kind": "id", "size": 3})
