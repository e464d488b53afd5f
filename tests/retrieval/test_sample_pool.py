"""Sampled negatives restricted to a pool (items released by the training end)."""

import numpy as np
import pytest
import torch

from retrieval.losses import NegativeSamplerConfig, SampledSoftmaxLoss
from retrieval.similarity import Similarity, SimilarityConfig


def _loss(uniform=64, popularity=0, logq="negatives_only"):
    cfg = NegativeSamplerConfig(in_batch=True, uniform=uniform, popularity=popularity, logq=logq)
    return SampledSoftmaxLoss(cfg, 50, Similarity(SimilarityConfig(kind="dot")))


def test_uniform_and_popularity_negatives_stay_in_the_pool():
    torch.manual_seed(0)
    table = torch.randn(50, 4, requires_grad=True)
    loss = _loss(uniform=256, popularity=256)
    pool = np.arange(10, 30)
    loss.set_sample_pool(pool)
    seen = []

    def enc(ids):
        seen.append(ids.clone())
        return table[ids]

    pos = torch.tensor([10, 11, 12, 13])
    u = torch.randn(4, 4)
    out = loss(
        u,
        pos,
        table[pos],
        encode_items=enc,
        generator=torch.Generator().manual_seed(1),
        frequency=np.ones(50),
    )
    out.backward()
    drawn = torch.cat(seen)
    assert drawn.numel() == 512
    assert bool(((drawn >= 10) & (drawn < 30)).all())
    # items outside the pool and outside the batch get no gradient at all
    outside = torch.ones(50, dtype=torch.bool)
    outside[10:30] = False
    assert float(table.grad[outside].abs().sum()) == 0.0


def test_pool_changes_uniform_q_to_one_over_pool_size():
    # with only uniform negatives and logQ "derived", the correction is a constant that cancels;
    # with negatives_only it sets the positive's weight: log(n / |pool|) instead of log(n / N)
    torch.manual_seed(0)
    table = torch.randn(50, 4)
    pos = torch.tensor([1, 2])
    u = torch.randn(2, 4)
    full = _loss(uniform=32)
    full_cfg = NegativeSamplerConfig(in_batch=False, uniform=32, logq="negatives_only")
    a = SampledSoftmaxLoss(full_cfg, 50, Similarity(SimilarityConfig(kind="dot")))
    b = SampledSoftmaxLoss(full_cfg, 50, Similarity(SimilarityConfig(kind="dot")))
    b.set_sample_pool(np.arange(50))  # the whole catalog as a pool: identical to no pool
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    la = a(u, pos, table[pos], encode_items=lambda i: table[i], generator=g1, frequency=np.ones(50))
    lb = b(u, pos, table[pos], encode_items=lambda i: table[i], generator=g2, frequency=np.ones(50))
    assert torch.allclose(la, lb)
    assert full is not None


def test_bad_pool_rejected():
    loss = _loss()
    with pytest.raises(ValueError, match="item_ids"):
        loss.set_sample_pool(np.array([0, 50]))
    with pytest.raises(ValueError, match="at least one"):
        loss.set_sample_pool(np.array([], dtype=np.int64))
