"""Retrieval metrics: golden values by hand, brute-force references, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval.metrics import (
    ItemSegment,
    coverage,
    cross_group_auc,
    group_centroid_similarity,
    hit_rate_at_k,
    item_segments,
    leakage_at_k,
    mean_over_users,
    ndcg_at_k,
    normalised_leakage,
    popularity_bias,
    recall_at_k,
    recall_by_segment,
    rrr_at_k,
    rrr_curve,
    weighted_rrr_at_k,
)

L3 = 1 / math.log2(3)  # DCG discount of position 1 (0-based)
L4 = 1 / math.log2(4)  # position 2
L5 = 1 / math.log2(5)  # position 3


def arr(x):
    return np.asarray(x, dtype=np.int64)


# --------------------------------------------------------------------- golden values
def test_recall_by_hand():
    retrieved = arr([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8], [5, -1, -1, -1], [1, 2, 3, 4]])
    positives = arr(
        [[3, 9, -1, -1, -1], [1, 2, 3, 5, 6], [-1, -1, -1, -1, -1], [-1, 5, -1, -1, -1]]
        + [[3, 3, -1, -1, -1]]
    )
    # user 0: top-2 {1,2} misses {3,9}; top-3 finds 3 -> 1 / min(2, 3)
    np.testing.assert_array_equal(recall_at_k(retrieved, positives, 2)[[0]], [0.0])
    r3 = recall_at_k(retrieved, positives, 3)
    # user 1: 5 positives, top-3 finds 1,2,3 -> 3 / min(5, 3) = 1 (capped); 3/5 plain
    # user 2: no positive -> NaN; user 3: padding never matches, 5 found -> 1
    # user 4: the repeated positive counts once -> 1 / 1
    np.testing.assert_allclose(r3, [0.5, 1.0, np.nan, 1.0, 1.0])
    np.testing.assert_allclose(
        recall_at_k(retrieved, positives, 3, capped=False), [0.5, 0.6, np.nan, 1.0, 1.0]
    )
    assert mean_over_users(r3) == pytest.approx((0.5 + 1 + 1 + 1) / 4)


def test_ndcg_by_hand():
    retrieved = arr([[10, 20, 30, 40], [10, 99, 98, 97], [1, 2, 3, 4]])
    positives = arr([[20, 40, -1], [10, 20, 30], [-1, -1, -1]])
    # user 0: hits at positions 1 and 3; ideal: 2 hits at the top
    # user 1: hit at position 0; 3 positives but k=4 -> ideal has min(3, 4) = 3 hits
    np.testing.assert_allclose(
        ndcg_at_k(retrieved, positives, 4),
        [(L3 + L5) / (1 + L3), 1 / (1 + L3 + L4), np.nan],
    )
    # k=2: user 0 keeps the hit at position 1; ideal over min(2, 2) = 2 positions
    np.testing.assert_allclose(
        ndcg_at_k(retrieved, positives, 2), [L3 / (1 + L3), 1 / (1 + L3), np.nan]
    )


def test_hit_rate_by_hand():
    retrieved = arr([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    positives = arr([[3, -1], [9, 10], [-1, -1]])
    np.testing.assert_array_equal(hit_rate_at_k(retrieved, positives, 2), [0.0, 0.0, np.nan])
    np.testing.assert_array_equal(hit_rate_at_k(retrieved, positives, 3), [1.0, 0.0, np.nan])


def test_rrr_by_hand():
    gen = arr([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
    ranker = arr([[3, 7], [7, 3], [7, -1], [-1, -1]])
    np.testing.assert_allclose(rrr_at_k(gen, ranker), [0.5, 0.5, 0.0, np.nan])
    # weighted: R's first item weighs 1, its second 1/log2(3)
    np.testing.assert_allclose(
        weighted_rrr_at_k(gen, ranker), [1 / (1 + L3), L3 / (1 + L3), 0.0, np.nan]
    )
    np.testing.assert_allclose(rrr_at_k(arr([[9, 7]]), arr([[7, -1]])), [1.0])


def test_rrr_curve_by_hand():
    gen = arr([[3, 9, 7, 1]])
    ranker = arr([[7, 3]])
    curve = rrr_curve(gen, ranker, Ks=(1, 2, 3, 4))
    assert list(curve) == [1, 2, 3, 4]
    np.testing.assert_allclose([curve[K][0] for K in (1, 2, 3, 4)], [0.5, 0.5, 1.0, 1.0])
    w = rrr_curve(gen, ranker, Ks=(1, 3), weighted=True)
    np.testing.assert_allclose([w[1][0], w[3][0]], [L3 / (1 + L3), 1.0])
    # the curve agrees with rrr_at_k on the truncated list
    np.testing.assert_allclose(curve[2], rrr_at_k(gen[:, :2], ranker))


def test_leakage_by_hand():
    item_group = arr([0, 0, 1, 1, 2])
    retrieved = arr([[0, 2, 4, -1], [2, 3, 0, 1], [-1, -1, -1, -1]])
    user_group = arr([0, 1, 2])
    # user 0: groups 0, 1, 2 among 3 real items -> 2/3 other; user 1: 0, 0 in top 4 -> 2/4
    np.testing.assert_allclose(
        leakage_at_k(retrieved, item_group, user_group, 4), [2 / 3, 0.5, np.nan]
    )
    np.testing.assert_allclose(
        leakage_at_k(retrieved, item_group, user_group, 1), [0.0, 0.0, np.nan]
    )
    # random retrieval leaks 3/5 for group 0 and for group 1 (outside shares of the catalog)
    np.testing.assert_allclose(
        normalised_leakage(retrieved, item_group, user_group, 4),
        [(2 / 3) / (3 / 5), 0.5 / (3 / 5), np.nan],
    )
    # over an eligible subset {0, 1, 2}: group 0 has 1 of 3 outside, group 1 has 2 of 3
    eligible = np.array([True, True, True, False, False])
    np.testing.assert_allclose(
        normalised_leakage(retrieved, item_group, user_group, 4, eligible=eligible),
        [(2 / 3) / (1 / 3), 0.5 / (2 / 3), np.nan],
    )
    # per-user eligibility; a user whose eligible items are all in-group -> NaN
    per_user = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=bool)
    np.testing.assert_allclose(
        normalised_leakage(retrieved, item_group, user_group, 4, eligible=per_user),
        [(2 / 3) / (3 / 5), np.nan, np.nan],
    )


def test_cross_group_auc_by_hand():
    item_group = arr([0, 0, 0, 1, 1])
    scores = np.array([[5.0, 3.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 1.0, 1.0]])
    positives = arr([[0], [-1]])
    # user 0 (group 0): A = {1: 3.0, 2: 1.0} (0 is a positive), O = {3: 2.0, 4: 1.0}
    # pairs: 3>2, 3>1, 1<2, 1=1 (half) -> 2.5 / 4
    # user 1 (group 1): A = {3, 4} at 1.0, O = {0, 1, 2} at 0.0 -> separated
    auc = cross_group_auc(scores, item_group, arr([0, 1]), positives)
    np.testing.assert_allclose(auc, [2.5 / 4, 1.0])
    # constant scores: fully folded
    flat = cross_group_auc(np.zeros((1, 5)), item_group, arr([0]), arr([[-1]]))
    np.testing.assert_allclose(flat, [0.5])
    # eligibility drops item 1: A = {2: 1.0}, O = {3: 2.0, 4: 1.0} -> 0.5 / 2
    eligible = np.array([True, False, True, True, True])
    np.testing.assert_allclose(
        cross_group_auc(scores[:1], item_group, arr([0]), positives[:1], eligible=eligible),
        [0.25],
    )
    # no other-group item -> undefined
    only = cross_group_auc(scores[:1, :3], item_group[:3], arr([0]), positives[:1])
    assert np.isnan(only).all()


def test_group_centroid_similarity_by_hand():
    vectors = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    groups = arr([0, 0, 1, 1, 2])
    s = group_centroid_similarity(vectors, groups)
    h = 1 / math.sqrt(2)
    np.testing.assert_allclose(s, [[1, 0, h], [0, 1, h], [h, h, 1]], atol=1e-12)
    # without normalisation the long vector [3, 0] pulls group 0's centroid toward x
    v2 = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    raw = group_centroid_similarity(v2, arr([0, 0, 1, 1]), normalise=False)
    unit = group_centroid_similarity(v2, arr([0, 0, 1, 1]))
    c0, c1 = np.array([1.5, 0.5]), np.array([0.5, 0.5])
    expect = c0 @ c1 / np.linalg.norm(c0) / np.linalg.norm(c1)
    assert raw[0, 1] == pytest.approx(expect)
    assert unit[0, 1] == pytest.approx(1.0)  # both unit centroids point along [1, 1]
    with pytest.raises(ValueError, match="empty groups"):
        group_centroid_similarity(vectors, groups, n_groups=4)


def test_coverage_and_popularity_by_hand():
    retrieved = arr([[0, 1, -1], [1, 2, 3]])
    assert coverage(retrieved, 10) == pytest.approx(0.4)
    assert coverage(retrieved, 10, k=1) == pytest.approx(0.2)
    pop = np.array([0, 1, 3, 7])
    r = arr([[0, 1], [2, 3], [-1, -1]])
    # log(1 + count): 0, ln 2, ln 4, ln 8
    np.testing.assert_allclose(
        popularity_bias(r, pop), [math.log(2) / 2, 2.5 * math.log(2), np.nan]
    )
    np.testing.assert_allclose(popularity_bias(r, pop, k=1), [0.0, 2 * math.log(2), np.nan])


def test_item_segments_by_hand():
    counts = np.array([50, 0, 10, 10, 3, 7, 1, 0, 20, 5, 2, 100])
    release = np.array([0.0] * 7 + [5.0] + [0.0] * 3 + [5.0])
    seg = item_segments(counts, release, cutoff=1.0)
    # warm by count: 0(50) 8(20) 2(10) 3(10) 5(7) 9(5) 4(3) 10(2) 6(1) 1(0); n_warm = 10
    # head = first ceil(2) = {0, 8}; tail = last floor(5) = {9, 4, 10, 6, 1}; cold {7, 11}
    H, M, T, C = ItemSegment.HEAD, ItemSegment.TORSO, ItemSegment.TAIL, ItemSegment.COLD
    np.testing.assert_array_equal(seg, [H, T, M, M, T, M, T, C, H, T, T, C])
    # a tie at the head boundary is split by item id: 2 before 3
    seg3 = item_segments(counts, release, cutoff=1.0, head_share=0.3, tail_share=0.5)
    assert seg3[2] == H and seg3[3] == M
    # released exactly at the cut-off is warm
    assert item_segments(counts, release, cutoff=5.0)[7] == T
    # zero-count items are TAIL even where the order would make them HEAD or TORSO
    z = item_segments(np.array([5, 0, 0, 0]), np.zeros(4), 0.0, head_share=0.5, tail_share=0.25)
    np.testing.assert_array_equal(z, [H, T, T, T])


def test_recall_by_segment_by_hand():
    segments = np.array([0, 0, 2, 3, 1, 1], dtype=np.int8)  # items 0,1 head; 2 tail; 3 cold
    retrieved = arr([[0, 2, 5], [3, 4, 1]])
    positives = arr([[0, 1, 3], [3, -1, -1]])
    out = recall_by_segment(retrieved, positives, segments, k=2)
    # head: user 0 has {0, 1}, finds 0 in top-2 -> 0.5; user 1 has none
    # cold: user 0 has {3}, not in its top-2 -> 0; user 1 has {3}, found -> 1
    assert out["head"] == pytest.approx(0.5)
    assert out["cold"] == pytest.approx(0.5)
    assert math.isnan(out["torso"]) and math.isnan(out["tail"])
    assert list(out) == ["head", "torso", "tail", "cold"]


# --------------------------------------------------------------------- validation
def test_validation_errors():
    r = arr([[1, 2, 3]])
    p = arr([[1]])
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        recall_at_k(r, p, 4)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(r, p, 0)
    with pytest.raises(ValueError, match="batch sizes differ"):
        recall_at_k(r, arr([[1], [2]]), 1)
    with pytest.raises(ValueError, match="must not repeat"):
        recall_at_k(arr([[1, 1, 2]]), p, 2)
    with pytest.raises(ValueError, match="integer ids"):
        recall_at_k(r.astype(float), p, 2)
    with pytest.raises(ValueError, match=">= -1"):
        ndcg_at_k(arr([[1, -2, 3]]), p, 2)
    with pytest.raises(ValueError, match="n_items=5"):
        leakage_at_k(arr([[7]]), arr([0, 0, 0, 0, 0]), arr([0]), 1)
    with pytest.raises(ValueError, match="user_group must have shape"):
        leakage_at_k(arr([[1]]), arr([0, 0]), arr([0, 1]), 1)
    with pytest.raises(ValueError, match="eligible must be a bool mask"):
        normalised_leakage(arr([[1]]), arr([0, 0]), arr([0]), 1, eligible=np.ones(3, bool))
    with pytest.raises(ValueError, match="finite"):
        cross_group_auc(np.array([[np.nan, 1.0]]), arr([0, 1]), arr([0]), arr([[-1]]))
    with pytest.raises(ValueError, match=r"tail_share must be in \[0, 1 - head_share"):
        item_segments(np.ones(3), np.zeros(3), 0.0, head_share=0.6, tail_share=0.5)
    with pytest.raises(ValueError, match="ItemSegment codes"):
        recall_by_segment(r, p, np.array([0, 1, 2, 7]), 1)
    with pytest.raises(ValueError, match=r"generator_ranked"):
        rrr_curve(arr([[1, 2]]), arr([[1]]), Ks=(3,))


# --------------------------------------------------------------------- references
def test_cross_group_auc_matches_brute_force():
    rng = np.random.default_rng(7)
    b, n = 12, 40
    scores = rng.integers(0, 5, size=(b, n)).astype(np.float32)  # many ties on purpose
    item_group = rng.integers(0, 3, size=n)
    user_group = rng.integers(0, 3, size=b)
    positives = rng.integers(-1, n, size=(b, 4))
    eligible = rng.random((b, n)) < 0.8
    for elig in (None, eligible):
        got = cross_group_auc(scores, item_group, user_group, positives, eligible=elig)
        for u in range(b):
            ok = np.ones(n, bool) if elig is None else elig[u]
            pos = set(positives[u][positives[u] >= 0].tolist())
            a = [i for i in range(n) if ok[i] and item_group[i] == user_group[u] and i not in pos]
            o = [i for i in range(n) if ok[i] and item_group[i] != user_group[u]]
            if not a or not o:
                assert np.isnan(got[u])
                continue
            wins = sum(
                1.0 if scores[u, i] > scores[u, j] else 0.5 if scores[u, i] == scores[u, j] else 0.0
                for i in a
                for j in o
            )
            assert got[u] == pytest.approx(wins / (len(a) * len(o)), abs=1e-12)


def test_cross_group_auc_row_blocks(monkeypatch):
    """Row blocking (memory bound) gives the same numbers as one block."""
    import retrieval.metrics as m

    rng = np.random.default_rng(3)
    scores = rng.standard_normal((9, 30))
    args = (scores, rng.integers(0, 2, 30), rng.integers(0, 2, 9), rng.integers(-1, 30, (9, 3)))
    whole = cross_group_auc(*args)
    monkeypatch.setattr(m, "_AUC_BLOCK", 60)  # two rows per block
    # bitwise: each row's AUC comes from its own ranks (sums of halves, exact in float64);
    # blocks only group rows, no sum runs across rows
    np.testing.assert_array_equal(cross_group_auc(*args), whole)


def _reference_recall_ndcg(retrieved, positives, k):
    rec, ndcg = [], []
    for r, p in zip(retrieved, positives, strict=True):
        ps = set(p[p >= 0].tolist())
        if not ps:
            rec.append(np.nan)
            ndcg.append(np.nan)
            continue
        top = r[:k].tolist()
        hits = [1.0 if x in ps else 0.0 for x in top]
        rec.append(sum(hits) / min(len(ps), k))
        dcg = sum(h / math.log2(j + 2) for j, h in enumerate(hits))
        idcg = sum(1 / math.log2(j + 2) for j in range(min(len(ps), k)))
        ndcg.append(dcg / idcg)
    return np.array(rec), np.array(ndcg)


@st.composite
def ranked_batch(draw):
    n_items = draw(st.integers(1, 30))
    b = draw(st.integers(1, 6))
    width = draw(st.integers(1, 8))
    p_width = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    retrieved = np.full((b, width), -1, dtype=np.int64)
    for u in range(b):
        m = int(rng.integers(0, min(width, n_items) + 1))
        retrieved[u, :m] = rng.permutation(n_items)[:m]
    positives = rng.integers(-1, n_items, size=(b, p_width))
    k = draw(st.integers(1, width))
    return retrieved, positives, k


@settings(max_examples=150, deadline=None)
@given(ranked_batch())
def test_recall_ndcg_hit_properties(batch):
    retrieved, positives, k = batch
    rec = recall_at_k(retrieved, positives, k)
    nd = ndcg_at_k(retrieved, positives, k)
    hit = hit_rate_at_k(retrieved, positives, k)
    plain = recall_at_k(retrieved, positives, k, capped=False)
    ref_rec, ref_ndcg = _reference_recall_ndcg(retrieved, positives, k)
    np.testing.assert_allclose(rec, ref_rec, atol=1e-12)
    np.testing.assert_allclose(nd, ref_ndcg, atol=1e-12)
    undefined = (positives < 0).all(axis=1)
    for v in (rec, nd, hit, plain):
        np.testing.assert_array_equal(np.isnan(v), undefined)
        d = v[~undefined]
        assert ((d >= 0) & (d <= 1 + 1e-12)).all()
    assert (plain[~undefined] <= rec[~undefined] + 1e-12).all()
    np.testing.assert_array_equal(hit[~undefined] == 1, rec[~undefined] > 0)
    # order of the positives does not matter
    shuffled = positives[:, ::-1]
    np.testing.assert_array_equal(recall_at_k(retrieved, shuffled, k), rec)


@settings(max_examples=100, deadline=None)
@given(ranked_batch(), st.integers(0, 2**32 - 1))
def test_rrr_properties(batch, seed):
    retrieved, _, _ = batch
    rng = np.random.default_rng(seed)
    has = (retrieved >= 0).any(axis=1)
    # identical lists -> 1 (plain and weighted); empty ranker row -> NaN
    for f in (rrr_at_k, weighted_rrr_at_k):
        same = f(retrieved, retrieved)
        np.testing.assert_array_equal(np.isnan(same), ~has)
        np.testing.assert_allclose(same[has], 1.0)
    # the curve never decreases in K and ends at rrr_at_k of the full list
    width = retrieved.shape[1]
    ranker = retrieved[:, rng.permutation(width)]
    curve = rrr_curve(retrieved, ranker, Ks=tuple(range(1, width + 1)))
    stacked = np.stack([curve[K] for K in range(1, width + 1)])
    stacked = np.where(np.isnan(stacked), 0, stacked)
    assert (np.diff(stacked, axis=0) >= -1e-12).all()
    np.testing.assert_allclose(curve[width], rrr_at_k(retrieved, ranker))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_leakage_and_auc_properties(seed):
    rng = np.random.default_rng(seed)
    n, b, g = int(rng.integers(2, 40)), int(rng.integers(1, 6)), int(rng.integers(1, 4))
    item_group = rng.integers(0, g, n)
    user_group = rng.integers(0, g, b)
    k = int(rng.integers(1, n + 1))
    retrieved = np.stack([rng.permutation(n)[:k] for _ in range(b)])
    leak = leakage_at_k(retrieved, item_group, user_group, k)
    assert ((leak >= 0) & (leak <= 1)).all()
    if k == n:  # retrieving everything leaks exactly the catalog share: normalised = 1
        norm = normalised_leakage(retrieved, item_group, user_group, k)
        outside = (item_group[None, :] != user_group[:, None]).mean(axis=1)
        np.testing.assert_allclose(norm[outside > 0], 1.0)
        assert np.isnan(norm[outside == 0]).all()
    # scores that rank every in-group item first separate the groups: AUC = 1
    same = item_group[None, :] == user_group[:, None]
    scores = same + 0.1 * rng.random((b, n))
    auc = cross_group_auc(scores, item_group, user_group, np.full((b, 1), -1))
    defined = same.any(axis=1) & (~same).any(axis=1)
    np.testing.assert_allclose(auc[defined], 1.0)
    assert np.isnan(auc[~defined]).all()
    # and the reversed scores give 0
    rev = cross_group_auc(-scores, item_group, user_group, np.full((b, 1), -1))
    np.testing.assert_allclose(rev[defined], 0.0)


def test_mean_over_users():
    assert mean_over_users(np.array([0.5, np.nan, 1.0])) == pytest.approx(0.75)
    assert math.isnan(mean_over_users(np.array([np.nan, np.nan])))
