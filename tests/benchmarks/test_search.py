"""The search benchmarks' tools: the torch baseline, synthetic vectors, operating points."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from benchmarks.search import (
    OperatingPoint,
    clustered_embeddings,
    operating_points,
    pareto_front,
    torch_topk,
)
from retrieval.index import IndexConfig, build_index


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data():
    return clustered_embeddings(3000, 40, 16, n_clusters=24, seed=1)


def test_torch_topk_is_exact_and_pads_when_k_exceeds_n():
    rng = np.random.default_rng(1)
    items = rng.standard_normal((7, 4)).astype(np.float32)
    queries = rng.standard_normal((3, 4)).astype(np.float32)
    ids, scores = torch_topk(items, queries, 10, chunk=3)  # ragged chunks: 3, 3, 1
    ref = queries.astype(np.float64) @ items.astype(np.float64).T  # (3, 7)
    order = np.argsort(-ref, axis=1)
    np.testing.assert_array_equal(ids[:, :7], order)  # random data: no near-ties
    np.testing.assert_allclose(scores[:, :7], np.take_along_axis(ref, order, 1), atol=1e-5)
    assert (ids[:, 7:] == -1).all() and np.isneginf(scores[:, 7:]).all()
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    with pytest.raises(ValueError, match="chunk must be"):
        torch_topk(items, queries, 3, chunk=0)
    with pytest.raises(ValueError, match="queries must have 4 columns"):
        torch_topk(items, queries[:, :2], 3)


def test_pareto_front_by_hand():
    def pt(v, recall, qps):
        return OperatingPoint((("nprobe", v),), recall, qps)

    pts = [
        pt(1, 0.50, 1000.0),
        pt(2, 0.70, 800.0),
        pt(3, 0.65, 700.0),  # dominated by value 2
        pt(4, 0.90, 800.0),  # dominates value 2 (same speed)
        pt(8, 0.99, 300.0),
    ]
    assert [p.settings[0][1] for p in pareto_front(pts)] == [1, 4, 8]
    assert pts[0].label == "nprobe=1"


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_operating_points(data, kind):
    items, queries = data
    cfg = IndexConfig(kind=kind, threads=1, hnsw_m=16, ef_construction=80, ef_search=64)
    index = build_index(items, cfg)
    before = dataclasses.replace(index.config)
    values = {
        "ivf": (1, 2, 8, 76),
        "hnsw": (16, 64, 256),
        "ivfpq": ({"nprobe": 2, "refine_factor": 1}, {"nprobe": 76, "refine_factor": 16}),
    }[kind]
    ops = operating_points(index, queries, 20, values=values, repeats=1)
    assert len(ops.all) == len(values)
    assert ops.all[0].label == (
        "nprobe=2, refine_factor=1"
        if kind == "ivfpq"
        else f"{'ef_search' if kind == 'hnsw' else 'nprobe'}={values[0]}"
    )
    assert index.config == before  # the knobs are restored
    for p in ops.pareto:  # nobody dominates a front point
        assert not any(
            (o.recall >= p.recall and o.qps >= p.qps) and (o.recall > p.recall or o.qps > p.qps)
            for o in ops.all
        )
    assert ops.all[-1].recall >= ops.all[0].recall  # more search work, no worse recall
    assert ops.exact_qps > 0
    best = ops.fastest_with_recall(0.0)
    assert best is not None and best.qps == max(p.qps for p in ops.pareto)
    assert ops.fastest_with_recall(1.01) is None
    if kind == "ivf":
        assert ops.all[-1].recall == 1.0  # nprobe = nlist is exhaustive
    with pytest.raises(ValueError, match="approximate index"):
        operating_points(build_index(items), queries, 10)
    with pytest.raises(ValueError, match="values must be"):
        operating_points(index, queries, 10, values=[{"bogus": 3}])


def test_clustered_embeddings_are_seeded():
    i1, q1 = clustered_embeddings(100, 10, 8, n_clusters=5, seed=3)
    i2, q2 = clustered_embeddings(100, 10, 8, n_clusters=5, seed=3)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(q1, q2)
    assert i1.dtype == q1.dtype == np.float32 and i1.shape == (100, 8) and q1.shape == (10, 8)
    assert not np.array_equal(i1, clustered_embeddings(100, 10, 8, n_clusters=5, seed=4)[0])
