"""Sparse embedding gradients for the ID item tower, and the SparseAdam / AdamW split.

1. Config: ``ItemTowerConfig(sparse=True)`` builds ``nn.Embedding(sparse=True)`` and round-trips;
   bad values raise.
2. A sparse and a dense model take the same plain SGD step: equal gradients (sparse densified)
   and equal weights afterwards, with and without gradient clipping.
3. ``fit_two_tower`` with sparse tables: finite losses going down like the dense run's, rows
   never looked up stay exactly at their initial value (SparseAdam touches only batch rows),
   and a table made sparse for one run (``TrainConfig.sparse_embeddings``) is restored.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

from retrieval.data import next_item_examples
from retrieval.frequency import ExactItemFrequency
from retrieval.losses import NegativeSamplerConfig, RetrievalLossConfig, build_loss
from retrieval.model import TwoTowerConfig, TwoTowerModel
from retrieval.similarity import SimilarityConfig
from retrieval.towers import ItemTowerConfig, UserTowerConfig, build_item_tower
from retrieval.train import LazyAdam, TrainConfig, _clip_grad_norm_sparse, fit_two_tower
from simenv import BatchedRecEnv, EnvConfig, World, WorldConfig, collect
from simenv.history import EventSequences
from simenv.policies import PopularityPolicy


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


N_ITEMS, DIM = 60, 8


def _model(sparse: bool, n_items: int = N_ITEMS, dim: int = DIM) -> TwoTowerModel:
    cfg = TwoTowerConfig(
        item=ItemTowerConfig(kind="id", dim=dim, n_items=n_items, seed=3, sparse=sparse),
        user=UserTowerConfig(kind="mean"),
        similarity=SimilarityConfig(kind="cosine", temperature=0.2),
    )
    return TwoTowerModel.build(cfg, None)


def _batch(g: torch.Generator, b: int = 16, length: int = 5) -> tuple[dict, torch.Tensor]:
    items = torch.randint(0, N_ITEMS, (b, length), generator=g)
    mask = (torch.rand(b, length, generator=g) < 0.8).to(torch.int8)
    mask[0] = 0  # one user without history: the learned empty vector
    return {"item_ids": items, "mask": mask}, torch.randint(0, N_ITEMS, (b,), generator=g)


# ------------------------------------------------------------------------------ config


def test_config_builds_a_sparse_table_and_round_trips():
    cfg = ItemTowerConfig(kind="id", dim=4, n_items=10, sparse=True)
    tower = build_item_tower(cfg, None)
    assert tower.embedding.sparse is True
    assert tower.get_config() == cfg
    assert ItemTowerConfig.from_dict(cfg.to_dict()) == cfg
    dense = build_item_tower(dataclasses.replace(cfg, sparse=False), None)
    assert dense.embedding.sparse is False
    # bitwise: the same seed draws the same initial table whatever the sparse flag
    torch.testing.assert_close(dense.embedding.weight, tower.embedding.weight, rtol=0, atol=0)


def test_bad_sparse_settings_raise():
    with pytest.raises(ValueError, match="sparse=True is only for kind='id'"):
        ItemTowerConfig(kind="bow", sparse=True)
    with pytest.raises(ValueError, match="sparse must be a bool"):
        ItemTowerConfig(kind="id", sparse=1)
    with pytest.raises(ValueError, match="sparse_embeddings must be a bool"):
        TrainConfig(sparse_embeddings="yes")
    with pytest.raises(ValueError, match="weight_decay must be 0"):
        TrainConfig(sparse_embeddings=True, weight_decay=0.01)


# ------------------------------------------------------------------------------ one step


@pytest.mark.parametrize("clip", [None, 0.05])
def test_sparse_and_dense_take_the_same_sgd_step(clip):
    cfg = NegativeSamplerConfig(in_batch=True, uniform=12)
    freq = ExactItemFrequency(N_ITEMS)
    freq.update(np.arange(N_ITEMS) % 7)  # skewed counts: logQ differs across items
    models, grads = {}, {}
    for sparse in (False, True):
        model = _model(sparse)
        loss_fn = build_loss(RetrievalLossConfig(negatives=cfg), N_ITEMS, model.similarity)
        g = torch.Generator().manual_seed(11)  # same batch and same uniform draws
        obs, pos = _batch(g)
        loss = loss_fn(
            model.user_vectors(obs), pos, model.item_vectors(pos),
            encode_items=model.item_tower, generator=g, frequency=freq,
        )  # fmt: skip
        loss.backward()
        params = list(model.parameters())
        table = model.item_tower.embedding.weight
        assert table.grad.is_sparse is sparse
        if clip is not None:
            if sparse:
                _clip_grad_norm_sparse(params, clip)
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
                assert norm > clip  # the clip is active in this case
        grads[sparse] = table.grad.to_dense() if sparse else table.grad.clone()
        torch.optim.SGD(params, lr=0.5).step()
        models[sparse] = model
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)
    assert grads[False].abs().sum() > 0
    for (name, a), (_, b) in zip(
        models[False].named_parameters(), models[True].named_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_clip_matches_torch_on_a_table_looked_up_twice():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    ref = torch.nn.Embedding(10, 3)
    ref.weight.data.copy_(emb.weight.data)
    extra = torch.nn.Parameter(torch.ones(2))
    extra_ref = torch.nn.Parameter(torch.ones(2))
    ids_a, ids_b = torch.tensor([1, 1, 2]), torch.tensor([1, 7])
    (emb(ids_a).sum() + 3 * emb(ids_b).sum() + (extra**2).sum()).backward()
    (ref(ids_a).sum() + 3 * ref(ids_b).sum() + (extra_ref**2).sum()).backward()
    assert not emb.weight.grad.is_coalesced()  # duplicates: the norm needs the summed rows
    _clip_grad_norm_sparse([emb.weight, extra], 1.0)
    torch.nn.utils.clip_grad_norm_([ref.weight, extra_ref], 1.0)
    torch.testing.assert_close(emb.weight.grad.to_dense(), ref.weight.grad)
    torch.testing.assert_close(extra.grad, extra_ref.grad)


# ------------------------------------------------------------------------------ training


@functools.lru_cache(maxsize=1)
def _log():
    env_cfg = EnvConfig(
        world=WorldConfig(
            n_items=400, n_users=200, n_groups=2, n_topics=8, latent_dim=8, n_creators=40
        )
    )
    world = World(env_cfg.world, seed=0, user_model=env_cfg.user_model)
    env = BatchedRecEnv(100, env_cfg, world=world)
    policy = PopularityPolicy(world, env_cfg.slate_size, 0.1, 0)
    log = collect(env, policy, n_users=200, seed=0, progress=False)
    return world, log, EventSequences.from_log(log, world.n_items)


def _fit(item_sparse: bool, sparse_embeddings: bool):
    world, log, seq = _log()
    model = _model(item_sparse, n_items=world.n_items, dim=16)
    init = model.item_tower.embedding.weight.detach().clone()
    loss = RetrievalLossConfig(negatives=NegativeSamplerConfig(in_batch=True))
    cfg = TrainConfig(
        epochs=4, batch_size=128, lr=1e-2, seed=0, progress=False, patience=0,
        sparse_embeddings=sparse_embeddings,
    )  # fmt: skip
    res = fit_two_tower(model, loss, log, seq, cfg)
    return model, init, res, (world, log, seq)


@pytest.mark.parametrize(
    "item_sparse, sparse_embeddings", [(True, False), (False, True)], ids=["config", "train"]
)
def test_sparse_training_goes_down_like_dense(item_sparse, sparse_embeddings):
    dense_model, _, dense, _ = _fit(False, False)
    model, init, res, (world, log, seq) = _fit(item_sparse, sparse_embeddings)
    losses = np.array([h["loss"] for h in res.history])
    dense_losses = np.array([h["loss"] for h in dense.history])
    assert np.isfinite(losses).all()
    # same direction and about the same size of progress as the dense run
    assert losses[-1] < losses[0] - 0.1, losses
    drop, dense_drop = losses[0] - losses[-1], dense_losses[0] - dense_losses[-1]
    assert 0.5 * dense_drop < drop < 2.0 * dense_drop, (losses, dense_losses)
    # first epoch: Adam and lazy Adam agree until a row skips a batch
    assert abs(losses[0] - dense_losses[0]) < 0.05 * dense_losses[0]
    # in-batch negatives only: rows never looked up (no positive, no history) never move
    ex = next_item_examples(log, seq, TrainConfig().history_length)
    seen = np.zeros(world.n_items, dtype=bool)
    seen[ex.target] = True
    seen[ex.obs["item_ids"][ex.obs["mask"] != 0]] = True
    assert (~seen).sum() > 0
    w = model.item_tower.embedding.weight.detach()
    torch.testing.assert_close(w[~torch.from_numpy(seen)], init[~torch.from_numpy(seen)])
    assert not torch.equal(w[torch.from_numpy(seen)], init[torch.from_numpy(seen)])
    # the run-only switch is undone; a sparse-by-config table stays sparse
    assert model.item_tower.embedding.sparse is item_sparse
    assert dense_model.item_tower.embedding.sparse is False


def test_lazy_adam_is_sparse_adam():
    """LazyAdam (row gathers) takes SparseAdam's steps: same weights up to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(300, 6, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = torch.optim.SparseAdam([a], lr=0.05), LazyAdam([b], lr=0.05)
    untouched = torch.ones(300, dtype=torch.bool)
    for _ in range(6):
        ids = torch.randint(0, 200, (90,), generator=g)  # repeats; rows >= 200 never move
        untouched[ids] = False
        w = torch.randn(90, 6, generator=g)
        for p, opt in ((a, opt_a), (b, opt_b)):
            (torch.nn.functional.embedding(ids, p, sparse=True) * w).sum().backward()
            opt.step()
            p.grad = None
    # a few Adam steps of size ~lr: float32 rounding of two operation orders, ~1e-7 relative
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    init = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b.detach()[untouched], init[untouched])  # lazy: never-seen rows stay
    st = opt_b.state[b]
    assert st["step"] == 6 and torch.equal(
        st["exp_avg"][untouched], torch.zeros_like(init[untouched])
    )
    with pytest.raises(ValueError, match="need lr > 0"):
        LazyAdam([b], lr=0.0)
