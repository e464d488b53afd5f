"""Tests of the classic candidate-generation baselines (retrieval/baselines.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from retrieval import baselines as bl
from retrieval.baselines import (
    ALS,
    PAD_ID,
    CandidateGenerator,
    Interactions,
    Item2Item,
    TopPopular,
    UserHistory,
)
from simenv.types import EventType, ItemCatalog
from tests.numerics import U32, assert_top_k_of

C, LK, DL = int(EventType.CLICK), int(EventType.LIKE), int(EventType.DISLIKE)
INF = math.inf


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def make_catalog(n, creator=None, topic=None, group=None, release=None, n_creators=None):
    creator = np.arange(n) if creator is None else np.asarray(creator)
    topic = np.zeros(n, np.int64) if topic is None else np.asarray(topic)
    group = np.zeros(n, np.int64) if group is None else np.asarray(group)
    release = np.zeros(n, np.float32) if release is None else np.asarray(release, np.float32)
    cards = (
        int(n_creators or creator.max() + 1),
        int(topic.max() + 1),
        int(group.max() + 1),
    )
    return ItemCatalog(
        title_tokens=np.ones((n, 2), np.int64),
        vocab_size=2,
        categorical=np.stack([creator, topic, group], axis=1).astype(np.int64),
        categorical_names=("creator", "topic", "group"),
        categorical_cardinalities=cards,
        release_time=release,
    )


def make_obs(histories, times, users=None, length=6):
    """histories: list (one per query) of [(item, event), ...] oldest first."""
    b = len(histories)
    items = np.zeros((b, length), np.int64)
    events = np.zeros((b, length), np.int64)
    mask = np.zeros((b, length), np.int8)
    for r, hist in enumerate(histories):
        for j, (item, event) in enumerate(hist):
            pos = length - len(hist) + j  # left padding, most recent last
            items[r, pos], events[r, pos], mask[r, pos] = item, event, 1
    context = np.zeros((b, 3), np.float32)
    context[:, 0] = times
    users = np.arange(b) if users is None else np.asarray(users)
    return {
        "item_ids": items,
        "events": events,
        "dt": np.zeros((b, length), np.float32),
        "mask": mask,
        "context": context,
        "user": users.astype(np.int64),
    }


def random_world(seed=0, n_users=40, n_items=60, m=600):
    rng = np.random.default_rng(seed)
    user = rng.integers(0, n_users, m)
    item = (rng.zipf(1.6, m) - 1) % n_items
    time = rng.uniform(0, 20, m)
    session = (time // 2).astype(np.int64)
    weight = rng.choice([1.0, 2.0], m).astype(np.float32)
    inter = Interactions(
        user=user,
        item=item,
        time=time,
        session=session,
        weight=weight,
        n_users=n_users,
        n_items=n_items,
    )
    cat = make_catalog(
        n_items,
        creator=rng.integers(0, 10, n_items),
        topic=rng.integers(0, 4, n_items),
        group=rng.integers(0, 2, n_items),
        release=np.where(rng.random(n_items) < 0.2, rng.uniform(0, 25, n_items), 0.0),
    )
    return inter, cat


def random_obs(seed, n_items, n_users, b=25, length=8):
    rng = np.random.default_rng(seed)
    mask = (rng.random((b, length)) < 0.7).astype(np.int8)
    mask[0] = 0  # an empty history (new user)
    items = np.where(mask == 1, rng.integers(0, n_items, (b, length)), 0)
    events = np.where(mask == 1, rng.choice([C, LK, DL], (b, length)), 0)
    context = np.stack([rng.uniform(0, 25, b), np.zeros(b), np.zeros(b)], 1).astype(np.float32)
    users = rng.integers(0, n_users + 5, b)  # some ids beyond the fitted users
    return {
        "item_ids": items.astype(np.int64),
        "events": events.astype(np.int64),
        "dt": np.zeros((b, length), np.float32),
        "mask": mask,
        "context": context,
        "user": users.astype(np.int64),
    }


ALL_FACTORIES = {
    "top_popular": lambda: TopPopular(),
    "top_popular_window": lambda: TopPopular(window_days=5.0),
    "user_history": lambda: UserHistory(n_recent=3),
    "item2item": lambda: Item2Item(n_recent=3, decay=0.7, n_neighbors=10),
    "item2item_gap": lambda: Item2Item(similarity="cooc", session_gap_days=0.5),
    "als": lambda: ALS(factors=6, iterations=4, seed=3),
}


# ----------------------------------------------------------------------------------------
# Interactions
# ----------------------------------------------------------------------------------------


def test_interactions_defaults_and_dtypes():
    inter = Interactions(
        user=np.array([1, 0], np.int32), item=[2, 2], time=[0.5, 1.0], n_users=2, n_items=3
    )
    assert inter.user.dtype == np.int64 and inter.item.dtype == np.int64
    assert inter.time.dtype == np.float64
    np.testing.assert_array_equal(inter.session, [-1, -1])
    np.testing.assert_array_equal(inter.weight, [1.0, 1.0])
    assert inter.weight.dtype == np.float32
    assert len(inter) == 2
    np.testing.assert_array_equal(inter.item_counts(), [0, 0, 2])
    r = inter.matrix()
    np.testing.assert_array_equal(r.toarray(), [[0, 0, 1], [0, 0, 1]])


def test_interactions_matrix_sums_duplicates():
    inter = Interactions(
        user=[0, 0, 1],
        item=[1, 1, 0],
        time=[0, 1, 2],
        weight=[1.0, 2.5, 1.0],
        n_users=2,
        n_items=2,
    )
    np.testing.assert_allclose(inter.matrix().toarray(), [[0, 3.5], [1, 0]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(user=[0, 5], item=[0, 0], time=[0, 0]), r"user must lie in \[0, 2\), got 5"),
        (dict(user=[0, 1], item=[0, -1], time=[0, 0]), r"item must lie in \[0, 3\), got -1"),
        (dict(user=[0, 1], item=[0], time=[0, 0]), r"item must have the same length"),
        (dict(user=[0, 1], item=[0, 1], time=[0]), r"time must have the same length"),
        (dict(user=[0.0, 1.0], item=[0, 1], time=[0, 0]), r"user must hold integers"),
        (dict(user=[0, 1], item=[0, 1], time=[0, np.nan]), r"time must be finite"),
        (
            dict(user=[0, 1], item=[0, 1], time=[0, 0], session=[0, -2]),
            r"session must be >= -1",
        ),
        (
            dict(user=[0, 1], item=[0, 1], time=[0, 0], weight=[1.0, -1.0]),
            r"weight must be finite and > 0, got -1.0",
        ),
        (
            dict(user=[0, 1], item=[0, 1], time=[0, 0], weight=[1.0, 0.0]),
            r"weight must be finite and > 0, got 0.0",
        ),
        (dict(user=[0, 1], item=[0, 1], time=[0, 0], n_users=0), r"n_users must be an integer"),
        (dict(user=[0, 1], item=[0, 1], time=[0, 0], n_items=2.5), r"n_items must be an integer"),
        (dict(user=[[0, 1]], item=[0, 1], time=[0, 0]), r"user must be 1-D"),
    ],
)
def test_interactions_validation(kwargs, match):
    full = dict(n_users=2, n_items=3) | kwargs
    with pytest.raises(ValueError, match=match):
        Interactions(**full)


def test_fit_rejects_mismatched_catalog_and_types():
    inter = Interactions(user=[0], item=[0], time=[0.0], n_users=1, n_items=3)
    with pytest.raises(ValueError, match=r"interactions.n_items \(3\) must equal catalog.n_items"):
        TopPopular().fit(inter, make_catalog(4))
    with pytest.raises(ValueError, match="interactions must be an Interactions"):
        TopPopular().fit({"user": [0]}, make_catalog(3))
    with pytest.raises(ValueError, match="catalog must be an ItemCatalog"):
        TopPopular().fit(inter, None)


# ----------------------------------------------------------------------------------------
# top-k helper
# ----------------------------------------------------------------------------------------


def test_topk_rows_ties_by_id_and_padding():
    s = np.array(
        [
            [1.0, 3.0, 3.0, -INF, 2.0, 3.0],
            [-INF, -INF, 0.5, -INF, -INF, -INF],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    ids, vals = bl._topk_rows(s, 3)
    np.testing.assert_array_equal(ids, [[1, 2, 5], [2, -1, -1], [0, 1, 2]])
    np.testing.assert_array_equal(vals, np.array([[3, 3, 3], [0.5, -INF, -INF], [0, 0, 0]]))
    assert vals.dtype == np.float32 and ids.dtype == np.int64
    ids, vals = bl._topk_rows(s, 9)  # k > N: everything sorted, then padding
    np.testing.assert_array_equal(ids[0], [1, 2, 5, 4, 0, -1, -1, -1, -1])
    np.testing.assert_array_equal(ids[1], [2] + [-1] * 8)
    np.testing.assert_array_equal(ids[2], [0, 1, 2, 3, 4, 5, -1, -1, -1])
    assert np.isneginf(vals[0, 5:]).all()


def test_topk_rows_matches_sort_reference():
    rng = np.random.default_rng(5)
    s = rng.integers(0, 6, (40, 30)).astype(np.float64)  # many ties
    s[rng.random(s.shape) < 0.3] = -INF
    for k in (1, 4, 17, 30):
        ids, vals = bl._topk_rows(s, k)
        for r in range(s.shape[0]):
            finite = np.flatnonzero(np.isfinite(s[r]))
            ref = finite[np.lexsort((finite, -s[r, finite]))][:k]
            expect = np.full(k, -1)
            expect[: ref.size] = ref
            np.testing.assert_array_equal(ids[r], expect)
            np.testing.assert_array_equal(vals[r, : ref.size], s[r, ref].astype(np.float32))


# ----------------------------------------------------------------------------------------
# TopPopular
# ----------------------------------------------------------------------------------------


@pytest.fixture
def pop_world():
    # item:      0  0  0  1  1  2    3  3    5   (4 never clicked)
    inter = Interactions(
        user=[0, 1, 2, 0, 1, 2, 0, 1, 2],
        item=[0, 0, 0, 1, 1, 2, 3, 3, 5],
        time=[1.0, 2.0, 3.0, 8.0, 9.0, 9.5, 2.0, 2.5, 5.0],
        weight=[1, 1, 1, 1, 1, 1, 1, 1, 2.5],
        n_users=3,
        n_items=6,
    )
    cat = make_catalog(6, release=[0, 7.5, 0, 0, 0, 0])
    return inter, cat


def test_top_popular_golden(pop_world):
    model = TopPopular().fit(*pop_world)
    obs = make_obs([[], [(0, C), (5, DL)]], times=[10.0, 10.0])
    ids, scores = model.retrieve(obs, k=6, exclude_seen=False)
    # counts 0:3, 5:2.5, 1:2, 3:2 (tie: smaller id first), 2:1; item 4 has no clicks
    np.testing.assert_array_equal(ids[0], [0, 5, 1, 3, 2, -1])
    np.testing.assert_array_equal(scores[0], [3, 2.5, 2, 2, 1, -INF])
    np.testing.assert_array_equal(ids[1], ids[0])  # same list for everyone
    ids, _ = model.retrieve(obs, k=6)  # exclude_seen: the click and the dislike are seen
    np.testing.assert_array_equal(ids[1], [1, 3, 2, -1, -1, -1])


def test_top_popular_release_filter(pop_world):
    model = TopPopular().fit(*pop_world)
    obs = make_obs([[]], times=[7.0])  # item 1 released at 7.5
    ids, _ = model.retrieve(obs, k=4)
    np.testing.assert_array_equal(ids[0], [0, 5, 3, 2])
    s = model.score_all(obs)
    assert s.dtype == np.float32 and s.shape == (1, 6)
    np.testing.assert_array_equal(s[0], [3, -INF, 1, 2, -INF, 2.5])
    obs = make_obs([[]], times=[7.5])  # released exactly now: eligible
    assert model.retrieve(obs, k=3)[0][0].tolist() == [0, 5, 1]


def test_top_popular_window_golden(pop_world):
    model = TopPopular(window_days=4.0).fit(*pop_world)
    # t=10: window [6, 10) -> item 1 (8, 9), item 2 (9.5); t=9: [5, 9) -> item 5 at 5
    # (window start is inclusive) and item 1 at 8 (the click at 9 is not before t).
    obs = make_obs([[], []], times=[10.0, 9.0])
    ids, scores = model.retrieve(obs, k=4)
    np.testing.assert_array_equal(ids, [[1, 2, -1, -1], [5, 1, -1, -1]])
    np.testing.assert_array_equal(scores, [[2, 1, -INF, -INF], [2.5, 1, -INF, -INF]])


def test_top_popular_window_counts_match_brute_force():
    inter, cat = random_world(1)
    model = TopPopular(window_days=3.5).fit(inter, cat)
    now = np.array([0.0, 2.0, 3.5, 7.25, 7.25, 19.0, 30.0])
    got = model.window_counts(now)
    for r, t in enumerate(now):
        inside = (inter.time >= t - 3.5) & (inter.time < t)
        ref = np.bincount(inter.item[inside], inter.weight[inside], minlength=cat.n_items)
        np.testing.assert_allclose(got[r], ref, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------
# UserHistory
# ----------------------------------------------------------------------------------------


@pytest.fixture
def history_world():
    creator = [0, 0, 1, 1, 2, 2, 3, 0]
    topic = [0, 1, 0, 1, 0, 1, 2, 2]
    counts = [1, 5, 3, 2, 4, 0, 7, 1]  # popularity of items 0..7
    item = np.repeat(np.arange(8), counts)
    inter = Interactions(
        user=np.zeros(item.size, np.int64),
        item=item,
        time=np.arange(item.size, dtype=np.float64),
        n_users=1,
        n_items=8,
    )
    release = [0, 0, 0, 0, 0, 20.0, 0, 0]
    return inter, make_catalog(8, creator=creator, topic=topic, release=release)


def test_user_history_golden(history_world):
    model = UserHistory(n_recent=5).fit(*history_world)
    # seed: item 0 (creator 0, topic 0); the dislike of item 6 is not a seed
    obs = make_obs([[(6, DL), (0, C)]], times=[10.0])
    ids, scores = model.retrieve(obs, k=6, exclude_seen=False)
    # creator 0 tier by popularity: 1 (5), 0 (1), 7 (1); topic 0 tier: 4 (4), 2 (3)
    np.testing.assert_array_equal(ids[0], [1, 0, 7, 4, 2, -1])
    scale = 8.0  # max popularity + 1
    np.testing.assert_array_equal(
        scores[0], [2 * scale + 5, 2 * scale + 1, 2 * scale + 1, scale + 4, scale + 3, -INF]
    )
    ids, _ = model.retrieve(obs, k=6)
    np.testing.assert_array_equal(ids[0], [1, 7, 4, 2, -1, -1])


def test_user_history_n_recent_and_release(history_world):
    inter, cat = history_world
    obs = make_obs([[(3, C), (0, LK)]], times=[25.0])
    ids, _ = UserHistory(n_recent=1).fit(inter, cat).retrieve(obs, k=8, exclude_seen=False)
    np.testing.assert_array_equal(ids[0], [1, 0, 7, 4, 2, -1, -1, -1])
    two = UserHistory(n_recent=2).fit(inter, cat)
    ids, _ = two.retrieve(obs, k=8, exclude_seen=False)
    # creators {0, 1}: 1 (5), 2 (3), 3 (2), 0 (1), 7 (1); topics {0, 1}: 4 (4), 5 (0)
    np.testing.assert_array_equal(ids[0], [1, 2, 3, 0, 7, 4, 5, -1])
    early = make_obs([[(3, C), (0, LK)]], times=[10.0])  # item 5 released at 20
    ids, _ = two.retrieve(early, k=8, exclude_seen=False)
    np.testing.assert_array_equal(ids[0], [1, 2, 3, 0, 7, 4, -1, -1])


def test_user_history_empty_history_gets_nothing(history_world):
    model = UserHistory().fit(*history_world)
    ids, scores = model.retrieve(make_obs([[], [(6, DL)]], times=[1.0, 1.0]), k=3)
    assert (ids == PAD_ID).all() and np.isneginf(scores).all()


def test_user_history_unknown_tier_column(history_world):
    with pytest.raises(ValueError, match="tiers names a column 'language'"):
        UserHistory(tiers=("creator", "language")).fit(*history_world)
    with pytest.raises(ValueError, match="n_recent must be an integer >= 1, got 0"):
        UserHistory(n_recent=0)
    with pytest.raises(ValueError, match="tiers must be a non-empty tuple of distinct names"):
        UserHistory(tiers=("topic", "topic"))


# ----------------------------------------------------------------------------------------
# Item2Item
# ----------------------------------------------------------------------------------------


@pytest.fixture
def i2i_world():
    # sessions: (u0,s0) {0,1,2}; (u0,s1) {0,1}; (u1,s0) {1,3}; (u2,s0) {4}; (u1,s1) {0,1,0}
    rows = [
        (0, 0, 0),
        (0, 0, 1),
        (0, 0, 2),
        (0, 1, 0),
        (0, 1, 1),
        (1, 0, 1),
        (1, 0, 3),
        (2, 0, 4),
        (1, 1, 0),
        (1, 1, 1),
        (1, 1, 0),
        (2, -1, 2),  # unknown session: no pairs
        (2, -1, 3),
    ]
    user, session, item = (np.array(c) for c in zip(*rows, strict=True))
    inter = Interactions(
        user=user,
        item=item,
        time=np.arange(len(rows), dtype=np.float64),
        session=session,
        n_users=3,
        n_items=6,
    )
    return inter, make_catalog(6)


def test_item2item_similarity_matrix_golden(i2i_world):
    model = Item2Item().fit(*i2i_world)
    # sessions per item: 0 -> 3, 1 -> 4, 2 -> 1, 3 -> 1; co-occurrences (0,1)=3, (0,2)=1,
    # (1,2)=1, (1,3)=1
    expect = np.zeros((6, 6))
    for i, j, c in [(0, 1, 3), (0, 2, 1), (1, 2, 1), (1, 3, 1)]:
        n = [3, 4, 1, 1]
        expect[i, j] = expect[j, i] = c / math.sqrt(n[i] * n[j])
    np.testing.assert_allclose(model.similarity_matrix.toarray(), expect, rtol=1e-12)
    raw = Item2Item(similarity="cooc").fit(*i2i_world).similarity_matrix.toarray()
    np.testing.assert_array_equal(raw, _cooc())


def _cooc():
    m = np.zeros((6, 6))
    for i, j, c in [(0, 1, 3), (0, 2, 1), (1, 2, 1), (1, 3, 1)]:
        m[i, j] = m[j, i] = c
    return m


def test_item2item_huge_session_ids(i2i_world):
    inter, cat = i2i_world
    big = Interactions(
        user=inter.user,
        item=inter.item,
        time=inter.time,
        session=np.where(inter.session >= 0, inter.session * 2**61, -1),  # no packed key
        n_users=inter.n_users,
        n_items=inter.n_items,
    )
    a = Item2Item().fit(inter, cat).similarity_matrix.toarray()
    np.testing.assert_array_equal(Item2Item().fit(big, cat).similarity_matrix.toarray(), a)


def test_item2item_golden_candidates(i2i_world):
    model = Item2Item(decay=0.5).fit(*i2i_world)
    obs = make_obs([[(2, C), (0, C)], [(2, C), (0, C)]], times=[50.0, 50.0])
    ids, scores = model.retrieve(obs, k=4, exclude_seen=False)
    # scores = S[0] + 0.5 S[2]: item 1 = 3/sqrt(12) + 0.5 * 1/2, item 2 = 1/sqrt(3),
    # item 0 = 0.5/sqrt(3); items 3, 4, 5 have no link
    np.testing.assert_array_equal(ids[0], [1, 2, 0, -1])
    np.testing.assert_allclose(
        scores[0, :3], [3 / math.sqrt(12) + 0.25, 1 / math.sqrt(3), 0.5 / math.sqrt(3)], rtol=1e-6
    )
    ids, _ = model.retrieve(obs, k=4)
    np.testing.assert_array_equal(ids[0], [1, -1, -1, -1])
    raw = Item2Item(decay=0.5, similarity="cooc").fit(*i2i_world)
    ids, scores = raw.retrieve(obs, k=3, exclude_seen=False)
    np.testing.assert_array_equal(ids[0], [1, 2, 0])
    np.testing.assert_array_equal(scores[0], [3.5, 1.0, 0.5])


def test_item2item_min_cooc_and_neighbors(i2i_world):
    strict = Item2Item(min_cooc=2).fit(*i2i_world)
    obs = make_obs([[(2, C), (0, C)]], times=[50.0])
    ids, _ = strict.retrieve(obs, k=3, exclude_seen=False)
    np.testing.assert_array_equal(ids[0], [1, -1, -1])  # only the pair (0, 1) survives
    one = Item2Item(n_neighbors=1).fit(*i2i_world)
    ids, _ = one.retrieve(make_obs([[(1, C)]], times=[50.0]), k=3)
    np.testing.assert_array_equal(ids[0], [0, -1, -1])
    full = Item2Item().fit(*i2i_world)
    ids, _ = full.retrieve(make_obs([[(1, C)]], times=[50.0]), k=4)
    np.testing.assert_array_equal(ids[0], [0, 2, 3, -1])  # 2 and 3 tie at 1/2: id order


def test_item2item_session_gap():
    inter = Interactions(
        user=[0, 0, 0, 0, 1, 1],
        item=[0, 1, 1, 3, 3, 0],
        time=[0.0, 0.5, 3.0, 3.2, 0.0, 0.9],
        n_users=2,
        n_items=4,
    )
    with pytest.raises(ValueError, match="session_gap_days"):
        Item2Item().fit(inter, make_catalog(4))
    model = Item2Item(similarity="cooc", session_gap_days=1.0).fit(inter, make_catalog(4))
    expect = np.zeros((4, 4))
    expect[0, 1] = expect[1, 0] = expect[1, 3] = expect[3, 1] = expect[0, 3] = expect[3, 0] = 1
    np.testing.assert_array_equal(model.similarity_matrix.toarray(), expect)
    tight = Item2Item(similarity="cooc", session_gap_days=0.6).fit(inter, make_catalog(4))
    expect[0, 3] = expect[3, 0] = 0  # user 1's two events are 0.9 days apart
    np.testing.assert_array_equal(tight.similarity_matrix.toarray(), expect)


def test_item2item_matches_dense_reference():
    inter, cat = random_world(2)
    model = Item2Item(n_recent=4, decay=0.6, n_neighbors=1000).fit(inter, cat)
    # dense reference: binary session x item matrix, cosine of columns, zero diagonal
    keys = sorted(set(zip(inter.user.tolist(), inter.session.tolist(), strict=True)))
    index = {key: g for g, key in enumerate(keys)}
    x = np.zeros((len(keys), cat.n_items))
    for u, s, i in zip(inter.user, inter.session, inter.item, strict=True):
        x[index[(u, s)], i] = 1
    cooc = x.T @ x
    norm = np.sqrt(np.outer(np.diag(cooc), np.diag(cooc)))
    sim = np.divide(cooc, norm, out=np.zeros_like(cooc), where=norm > 0)
    np.fill_diagonal(sim, 0)
    np.testing.assert_allclose(model.similarity_matrix.toarray(), sim, rtol=1e-12, atol=0)
    obs = random_obs(3, cat.n_items, inter.n_users)
    got = model.score_all(obs)
    for r in range(obs["item_ids"].shape[0]):
        h = np.zeros(cat.n_items)
        pos = [
            j
            for j in range(obs["item_ids"].shape[1])
            if obs["mask"][r, j] and obs["events"][r, j] in (C, LK)
        ][::-1][:4]
        for rank, j in enumerate(pos):
            h[obs["item_ids"][r, j]] += 0.6**rank
        ref = h @ sim
        ref = np.where(ref > 0, ref, -INF)
        ref[cat.release_time > obs["context"][r, 0]] = -INF
        np.testing.assert_allclose(got[r], ref.astype(np.float32), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# ALS
# ----------------------------------------------------------------------------------------


def _dense_als_reference(r, y0, reg, alpha, iterations):
    """Slow textbook ALS: per row, the full dense C_u over every item."""
    p = (r > 0).astype(float)
    c = 1 + alpha * r
    y = y0.copy()
    d = y.shape[1]
    x = np.zeros((r.shape[0], d))
    for _ in range(iterations):
        for u in range(r.shape[0]):
            cu = np.diag(c[u])
            x[u] = np.linalg.solve(y.T @ cu @ y + reg * np.eye(d), y.T @ cu @ p[u])
        for i in range(r.shape[1]):
            ci = np.diag(c[:, i])
            y[i] = np.linalg.solve(x.T @ ci @ x + reg * np.eye(d), x.T @ ci @ p[:, i])
    loss = np.sum(c * (p - x @ y.T) ** 2) + reg * (np.sum(x**2) + np.sum(y**2))
    return x, y, loss


def test_als_matches_dense_reference():
    inter = Interactions(
        user=[0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 0],
        item=[0, 3, 1, 3, 5, 2, 0, 7, 4, 6, 1, 0],  # (0, 0) twice: weights add
        time=np.zeros(12),
        weight=[1, 2, 1, 1, 3, 1, 1, 1, 2, 1, 1, 0.5],
        n_users=7,  # user 6 has no interactions
        n_items=9,  # item 8 has none
    )
    cat = make_catalog(9)
    model = ALS(factors=3, regularization=0.3, alpha=2.0, iterations=3, seed=11).fit(inter, cat)
    y0 = model.initial_item_factors(9)
    x, y, loss = _dense_als_reference(inter.matrix().toarray(), y0, 0.3, 2.0, 3)
    np.testing.assert_allclose(model.user_factors, x, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.item_factors, y, rtol=1e-9, atol=1e-12)
    assert model.loss_history[-1] == pytest.approx(loss, rel=1e-10)
    assert not model.user_factors[6].any() and not model.item_factors[8].any()


def test_als_loss_formula_matches_dense():
    rng = np.random.default_rng(0)
    r = sp.random(8, 11, density=0.3, random_state=1, format="csr") * 3
    c = r.copy()
    c.data = 1 + 1.5 * c.data
    x, y = rng.normal(size=(8, 4)), rng.normal(size=(11, 4))
    dense_c = 1 + 1.5 * r.toarray()
    p = (r.toarray() > 0).astype(float)
    ref = np.sum(dense_c * (p - x @ y.T) ** 2) + 0.7 * (np.sum(x**2) + np.sum(y**2))
    assert bl.als_loss(c, x, y, 0.7) == pytest.approx(ref, rel=1e-12)


def test_als_loss_decreases_monotonically():
    inter, cat = random_world(4, n_users=50, n_items=70, m=700)
    model = ALS(factors=8, regularization=0.05, alpha=5.0, iterations=12, seed=1).fit(inter, cat)
    loss = np.array(model.loss_history)
    assert loss.shape == (12,)
    assert (np.diff(loss) <= 1e-9 * loss[:-1]).all(), loss
    assert loss[-1] < 0.9 * loss[0]


def test_als_recovers_planted_blocks():
    rng = np.random.default_rng(7)
    users, items = [], []
    for u in range(60):
        block = u // 30  # users 0-29 like items 0-39, users 30-59 like items 40-79
        picks = rng.choice(40, size=8, replace=False) + 40 * block
        users += [u] * 8
        items += picks.tolist()
    inter = Interactions(user=users, item=items, time=np.zeros(480), n_users=60, n_items=80)
    obs = make_obs([[]] * 60, times=np.zeros(60), users=np.arange(60))
    block_of_user = (np.arange(60) // 30)[:, None]
    # at the true rank (2) the whole block comes first: top-40 = the user's 40 block items
    rank2 = ALS(factors=2, regularization=0.1, alpha=10.0, iterations=10, seed=0)
    ids, _ = rank2.fit(inter, make_catalog(80)).retrieve(obs, k=40, exclude_seen=False)
    assert ((ids // 40) == block_of_user).all()
    # with spare dimensions the head of the list still stays in the block
    model = ALS(factors=4, regularization=0.1, alpha=10.0, iterations=10, seed=0)
    ids, _ = model.fit(inter, make_catalog(80)).retrieve(obs, k=10, exclude_seen=False)
    assert ((ids // 40) == block_of_user).all()
    # and within the block the user's own clicks rank high: their share of the top 8 is
    # 8 / 40 = 0.2 by chance; rank 4 gets about 0.46
    seen = np.zeros((60, 80), bool)
    seen[users, items] = True
    hits = np.take_along_axis(seen, ids[:, :8], axis=1).mean()
    assert hits > 0.4


def test_als_new_users_fall_back_to_popularity(pop_world):
    inter, cat = pop_world
    inter = Interactions(
        user=inter.user,
        item=inter.item,
        time=inter.time,
        weight=inter.weight,
        n_users=5,  # users 3 and 4 never interacted
        n_items=inter.n_items,
    )
    model = ALS(factors=2, iterations=2).fit(inter, cat)
    popular = TopPopular().fit(inter, cat)
    obs = make_obs([[], [], []], times=[10.0] * 3, users=[3, 4, 100])
    np.testing.assert_array_equal(model.retrieve(obs, k=6)[0], popular.retrieve(obs, k=6)[0])
    np.testing.assert_array_equal(model.score_all(obs), popular.score_all(obs))
    known = model.score_all(make_obs([[]], times=[10.0], users=[0]))
    assert np.isfinite(known).sum() == 6  # all released items get a factor score
    bad = make_obs([[]], times=[10.0], users=[-1])
    with pytest.raises(ValueError, match=r"obs\['user'\] must be >= 0, got -1"):
        model.retrieve(bad, k=2)
    no_user = make_obs([[]], times=[10.0])
    del no_user["user"]
    with pytest.raises(ValueError, match="obs is missing keys"):
        model.retrieve(no_user, k=2)


def test_als_item_without_interactions_scores_zero(pop_world):
    model = ALS(factors=3, iterations=3).fit(*pop_world)
    s = model.score_all(make_obs([[], []], times=[10.0, 10.0], users=[0, 1]))
    np.testing.assert_array_equal(s[:, 4], [0.0, 0.0])


def test_als_determinism():
    inter, cat = random_world(6)
    a = ALS(factors=5, iterations=3, seed=42).fit(inter, cat)
    b = ALS(factors=5, iterations=3, seed=42).fit(inter, cat)
    c = ALS(factors=5, iterations=3, seed=43).fit(inter, cat)
    np.testing.assert_array_equal(a.user_factors, b.user_factors)
    np.testing.assert_array_equal(a.item_factors, b.item_factors)
    assert not np.allclose(a.item_factors, c.item_factors)


def test_als_block_plan_covers_every_entry_once():
    inter, cat = random_world(8, n_users=30, n_items=500, m=3000)
    r = inter.matrix().T.tocsr()  # items side: heavy-tailed row lengths
    plan = bl._SolvePlan(r, factors=16, cap=16 * 64)  # tiny cap: many blocks
    assert len(plan.blocks) > 3
    seen = np.zeros(r.shape, float)
    for rows, cols, sqrt_w in plan.blocks:
        assert rows.size == 1 or rows.size * cols.shape[1] <= 64
        np.add.at(seen, (np.repeat(rows, cols.shape[1]), cols.ravel()), sqrt_w.ravel() ** 2)
    np.testing.assert_allclose(seen, r.toarray(), rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(factors=0), "factors must be an integer >= 1, got 0"),
        (dict(iterations=1.5), "iterations must be an integer >= 1, got 1.5"),
        (dict(regularization=-1.0), "regularization must be a finite number > 0, got -1.0"),
        (dict(alpha=float("nan")), "alpha must be a finite number > 0"),
        (dict(seed=-3), "seed must be an integer >= 0, got -3"),
    ],
)
def test_als_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ALS(**kwargs)


# ----------------------------------------------------------------------------------------
# contract checks over every generator
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted():
    inter, cat = random_world(0)
    return inter, cat, {name: make().fit(inter, cat) for name, make in ALL_FACTORIES.items()}


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_contract_retrieve_equals_sorted_score_all(fitted, name, exclude_seen):
    inter, cat, models = fitted
    model = models[name]
    obs = random_obs(1, cat.n_items, inter.n_users)
    k = 15
    ids, scores = model.retrieve(obs, k=k, exclude_seen=exclude_seen)
    full = model.score_all(obs, exclude_seen=exclude_seen)
    assert ids.shape == (25, k) and ids.dtype == np.int64
    assert scores.shape == (25, k) and scores.dtype == np.float32
    assert full.shape == (25, cat.n_items) and full.dtype == np.float32
    now = obs["context"][:, 0]
    for r in range(ids.shape[0]):
        real = ids[r][ids[r] != PAD_ID]
        n_real = real.size
        assert (ids[r, n_real:] == PAD_ID).all() and np.isneginf(scores[r, n_real:]).all()
        assert np.unique(real).size == n_real  # no duplicates
        assert (cat.release_time[real] <= now[r]).all()  # released only
        if exclude_seen:
            seen = obs["item_ids"][r][obs["mask"][r] == 1]
            assert not np.isin(real, seen).any()
        assert np.isneginf(full[r][cat.release_time > now[r]]).all()
        np.testing.assert_array_equal(scores[r, :n_real], full[r, real])
        assert (np.diff(scores[r, :n_real]) <= 0).all()
        finite = np.flatnonzero(np.isfinite(full[r]))
        # the best k of score_all (ids under ties are checked by the _topk_rows tests)
        assert n_real == min(k, finite.size)
        ref = np.sort(full[r, finite])[::-1][:k]
        np.testing.assert_array_equal(scores[r, :n_real], ref)


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_contract_user_ids_as_the_envs_emit_them(fitted, name):
    """obs['user'] of shape (B, 1) (what the envs and rebuilt observations carry) = (B,)."""
    inter, cat, models = fitted
    obs = random_obs(5, cat.n_items, inter.n_users, b=6)
    column = {**obs, "user": obs["user"][:, None]}  # (B, 1)
    ids, scores = models[name].retrieve(obs, k=5)
    ids_c, scores_c = models[name].retrieve(column, k=5)  # same inputs: bitwise
    np.testing.assert_array_equal(ids_c, ids)
    np.testing.assert_array_equal(scores_c, scores)


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_contract_padding_when_catalog_is_small(fitted, name):
    inter, cat, models = fitted
    obs = random_obs(2, cat.n_items, inter.n_users, b=4)
    ids, scores = models[name].retrieve(obs, k=cat.n_items + 7)
    assert ids.shape == (4, cat.n_items + 7)
    assert (ids[:, -7:] == PAD_ID).all() and np.isneginf(scores[:, -7:]).all()


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_contract_row_blocks_do_not_change_results(fitted, name, monkeypatch):
    inter, cat, models = fitted
    obs = random_obs(4, cat.n_items, inter.n_users, b=23)
    ids, scores = models[name].retrieve(obs, k=9)
    full = models[name].score_all(obs)
    monkeypatch.setattr(bl, "_BLOCK_ELEMENTS", cat.n_items * 4)  # 4 rows per block
    ids2, scores2 = models[name].retrieve(obs, k=9)
    # scores are float64 rounded once to float32; other row blocks run other matmul shapes
    # (ALS), whose float64 reordering error can move a float32 score by one ulp
    tol = 2 * U32 * float(np.abs(full[np.isfinite(full)]).max())
    np.testing.assert_allclose(scores2, scores, rtol=0, atol=tol)
    assert_top_k_of(ids2, models[name].score_all(obs, exclude_seen=True), tol=tol)
    np.testing.assert_allclose(models[name].score_all(obs), full, rtol=0, atol=tol)


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_contract_deterministic_and_order_free(fitted, name):
    inter, cat, models = fitted
    perm = np.random.default_rng(9).permutation(len(inter))
    shuffled = Interactions(
        user=inter.user[perm],
        item=inter.item[perm],
        time=inter.time[perm],
        session=inter.session[perm],
        weight=inter.weight[perm],
        n_users=inter.n_users,
        n_items=inter.n_items,
    )
    again = ALL_FACTORIES[name]().fit(shuffled, cat)
    obs = random_obs(5, cat.n_items, inter.n_users)
    a, b = models[name].retrieve(obs, k=12), again.retrieve(obs, k=12)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-9 if name == "als" else 0)


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_contract_config_round_trip(fitted, name):
    model = fitted[2][name]
    clone = type(model).from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    assert isinstance(clone, CandidateGenerator) and not clone._fitted


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda o: o.update(item_ids=o["item_ids"][:, :3]), r"obs\['events'\] must have shape"),
        (
            lambda o: o["item_ids"].__setitem__((1, -1), 60),
            r"obs\['item_ids'\] \(where mask == 1\)",
        ),
        (lambda o: o["mask"].__setitem__((1, 0), 2), r"obs\['mask'\] must hold only 0 and 1"),
        (lambda o: o.update(context=o["context"][:3]), r"obs\['context'\] must have shape"),
        (lambda o: o.pop("events"), "obs is missing keys"),
        (
            lambda o: o.update(item_ids=o["item_ids"].astype(float)),
            r"obs\['item_ids'\] must hold integers",
        ),
        (lambda o: o.update(item_ids=o["item_ids"][0]), r"obs\['item_ids'\] must be 2-D"),
    ],
)
def test_bad_observation_raises(fitted, mutate, match):
    inter, cat, models = fitted
    obs = random_obs(6, cat.n_items, inter.n_users, b=5)
    obs["mask"][1, -1] = 1
    mutate(obs)
    with pytest.raises(ValueError, match=match):
        models["top_popular"].retrieve(obs, k=3)


def test_padding_slots_may_hold_any_id(fitted):
    inter, cat, models = fitted
    obs = random_obs(6, cat.n_items, inter.n_users, b=3)
    obs["item_ids"][obs["mask"] == 0] = 10**6  # ignored: not a real event
    models["item2item"].retrieve(obs, k=3)


@pytest.mark.parametrize("k", [0, -2, 1.5, True, None])
def test_bad_k_raises(fitted, k):
    inter, cat, models = fitted
    obs = random_obs(6, cat.n_items, inter.n_users, b=2)
    with pytest.raises(ValueError, match=f"k must be an integer >= 1, got {k!r}"):
        models["als"].retrieve(obs, k=k)


def test_unfitted_raises():
    obs = make_obs([[]], times=[0.0])
    with pytest.raises(RuntimeError, match="call fit before"):
        TopPopular().retrieve(obs, k=1)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TopPopular(window_days=0), "window_days must be None or a finite number > 0"),
        (lambda: TopPopular(window_days=math.inf), "window_days must be None or a finite"),
        (lambda: Item2Item(decay=0.0), r"decay must be in \(0, 1\], got 0.0"),
        (lambda: Item2Item(decay=1.5), r"decay must be in \(0, 1\], got 1.5"),
        (lambda: Item2Item(similarity="dot"), "similarity must be 'cosine' or 'cooc', got 'dot'"),
        (lambda: Item2Item(min_cooc=0), "min_cooc must be an integer >= 1, got 0"),
        (lambda: Item2Item(n_neighbors=2.0), "n_neighbors must be an integer >= 1, got 2.0"),
        (lambda: Item2Item(session_gap_days=-1.0), "session_gap_days must be None or a finite"),
    ],
)
def test_config_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_weakness_new_items_and_new_users(fitted):
    """The lecture's weaknesses, as facts a report can show."""
    inter, cat, models = fitted
    never = np.setdiff1d(np.arange(cat.n_items), inter.item)  # items without interactions
    assert never.size > 0
    obs = random_obs(7, cat.n_items, inter.n_users)
    obs["context"][:, 0] = 100.0  # everything released
    for name in ("top_popular", "item2item"):
        ids, _ = models[name].retrieve(obs, k=cat.n_items)
        assert not np.isin(ids, never).any(), name
    empty = make_obs([[]], times=[100.0])
    for name in ("user_history", "item2item"):
        assert (models[name].retrieve(empty, k=5)[0] == PAD_ID).all(), name


def test_als_half_step_both_solvers_match_dense():
    """Rows shorter than d take the Woodbury path, the others the d x d solve: both exact."""
    rng = np.random.default_rng(12)
    d, n, m = 6, 14, 40
    lengths = np.arange(n)  # 0 .. 13 items per row: both sides of L = d
    rows = np.repeat(np.arange(n), lengths)
    cols = np.concatenate([rng.choice(m, size=k, replace=False) for k in lengths])
    r = sp.csr_matrix((rng.uniform(0.5, 3.0, rows.size), (rows, cols)), shape=(n, m))
    conf = r.copy()
    conf.data = 1 + 4.0 * conf.data
    minus = r.copy()
    minus.data = 4.0 * minus.data
    y = rng.normal(size=(m, d))
    got = bl._als_half_step(conf, bl._SolvePlan(minus, d, cap=d * 20), y, 0.25)
    dense = 1 + 4.0 * r.toarray()
    p = (r.toarray() > 0).astype(float)
    for u in range(n):
        cu = np.diag(dense[u])
        ref = np.linalg.solve(y.T @ cu @ y + 0.25 * np.eye(d), y.T @ cu @ p[u])
        np.testing.assert_allclose(got[u], ref, rtol=1e-9, atol=1e-12)
