"""Group-homogeneous batches (``fit_two_tower(batch_groups=...)``): every batch holds users of
one group, no example repeats within an epoch, only each group's last partial batch is left
out, and bad group arrays are rejected."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import retrieval.train as train_mod
from retrieval.losses import NegativeSamplerConfig, RetrievalLossConfig
from retrieval.model import TwoTowerConfig, TwoTowerModel
from retrieval.similarity import SimilarityConfig
from retrieval.towers import ItemTowerConfig, UserTowerConfig
from retrieval.train import TrainConfig, _grouped_order, fit_two_tower
from simenv import BatchedRecEnv, EnvConfig, World, WorldConfig, collect
from simenv.history import EventSequences
from simenv.policies import PopularityPolicy
from simenv.types import obs_users


def test_grouped_order_cuts_each_group_into_full_batches():
    rng = np.random.default_rng(0)
    group = rng.integers(0, 3, size=1000)
    order = _grouped_order(np.random.default_rng(1), group, 64)
    sizes = np.bincount(group, minlength=3)
    assert order.size == int((sizes // 64).sum()) * 64
    assert np.unique(order).size == order.size  # no example twice
    batches = order.reshape(-1, 64)
    assert all(np.unique(group[b]).size == 1 for b in batches)
    assert np.unique(group[batches[:, 0]]).size == 3  # batches of every group, interleaved
    again = _grouped_order(np.random.default_rng(2), group, 64)
    assert not np.array_equal(order, again)  # a new shuffle every epoch
    assert _grouped_order(np.random.default_rng(0), group, 2000).size == 0


@functools.lru_cache(maxsize=1)
def _log():
    env_cfg = EnvConfig(
        world=WorldConfig(
            n_items=200, n_users=80, n_groups=2, n_topics=8, latent_dim=8, n_creators=20
        )
    )
    world = World(env_cfg.world, seed=0, user_model=env_cfg.user_model)
    env = BatchedRecEnv(80, env_cfg, world=world)
    log = collect(env, PopularityPolicy(world, env_cfg.slate_size, 0.1, 0), 80, 0, progress=False)
    return world, log, EventSequences.from_log(log, world.n_items)


def _model(n_items: int) -> TwoTowerModel:
    cfg = TwoTowerConfig(
        item=ItemTowerConfig(kind="id", dim=8, n_items=n_items, seed=3),
        user=UserTowerConfig(kind="mean"),
        similarity=SimilarityConfig(kind="cosine", temperature=0.2),
    )
    return TwoTowerModel.build(cfg, None)


def test_fit_two_tower_trains_on_group_homogeneous_batches(monkeypatch):
    world, log, seq = _log()
    groups = world.users.group.astype(np.int64)
    seen: list[np.ndarray] = []
    real = train_mod._batch_tensors  # where each batch's rows are taken from the examples

    def spy(data, rows, *args, **kwargs):
        seen.append(groups[obs_users(data.obs)[rows]])
        return real(data, rows, *args, **kwargs)

    monkeypatch.setattr(train_mod, "_batch_tensors", spy)
    loss = RetrievalLossConfig(negatives=NegativeSamplerConfig(in_batch=True))
    cfg = TrainConfig(epochs=1, batch_size=16, seed=0, progress=False, patience=0, threads=1)
    res = fit_two_tower(_model(world.n_items), loss, log, seq, cfg, batch_groups=groups)
    assert len(seen) > 4 and all(np.unique(g).size == 1 for g in seen)
    assert {int(g[0]) for g in seen} == {0, 1}
    assert all(np.isfinite(h["loss"]) for h in res.history)
    seen.clear()
    fit_two_tower(_model(world.n_items), loss, log, seq, cfg)  # without: mixed batches
    assert any(np.unique(g).size > 1 for g in seen)
    with pytest.raises(ValueError, match="batch_groups must be a 1-D integer array"):
        fit_two_tower(_model(world.n_items), loss, log, seq, cfg, batch_groups=groups * 0.5)
    with pytest.raises(ValueError, match="batch_groups has 3 entries"):
        fit_two_tower(_model(world.n_items), loss, log, seq, cfg, batch_groups=groups[:3])
