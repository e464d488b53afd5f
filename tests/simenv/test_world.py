"""The hidden truth: config validation, determinism, catalog content, popularity, topics,
affinity across groups, the best-items oracle."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from simenv import (
    BatchedRecEnv,
    EnvConfig,
    PopularityPolicy,
    RewardConfig,
    UniformPolicy,
    UserModelConfig,
    World,
    WorldConfig,
    collect,
)
from simenv.rec_env import _cached_world
from tests.numerics import U32, assert_top_k_of, reorder_tolerance
from tests.simenv.helpers import CONFIG_RANGES, in_range

CLASSES = {
    "WorldConfig": WorldConfig,
    "UserModelConfig": UserModelConfig,
    "RewardConfig": RewardConfig,
    "EnvConfig": EnvConfig,
}


@pytest.fixture(scope="module")
def default_world() -> World:
    return _cached_world(WorldConfig(), 0, UserModelConfig())


@pytest.fixture(scope="module")
def small_world() -> World:
    return World(WorldConfig.small(), seed=0)


# ---------------------------------------------------------------- config validation
def test_every_default_config_validates():
    for cfg in (
        WorldConfig(),
        WorldConfig.small(),
        UserModelConfig(),
        RewardConfig(),
        EnvConfig(),
        EnvConfig.small(),
        EnvConfig(info_level="full"),
    ):
        assert dataclasses.replace(cfg) == cfg
    assert EnvConfig().to_dict()["world"] == WorldConfig().to_dict()
    assert EnvConfig.small().world == WorldConfig.small()


def test_range_table_covers_every_numeric_field():
    for name, cls in CLASSES.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        numeric = fields - {"world", "user_model", "reward", "info_level"}
        assert set(CONFIG_RANGES[name]) == numeric, name
        # and the table agrees with the defaults
        for field in numeric:
            assert in_range(name, field, getattr(cls(), field)), (name, field)


def _bad_values(name, field):
    low, high, integer, low_inc, high_inc = CONFIG_RANGES[name][field]
    span = max(1.0, abs(high - low))
    bad = [
        math.nan,
        math.inf,
        -math.inf,
        "1",
        None,
        True,
        [1],
        low if not low_inc else (low - 1 if integer else low - 1e-3 * span),
        high if not high_inc else (high + 1 if integer else high + 1e-3 * span),
    ]
    if integer:
        bad += [float(low) + 0.5, float(max(low, 1))]  # floats, even integral ones
    return bad


CASES = [
    (name, field, value)
    for name in CLASSES
    for field in CONFIG_RANGES[name]
    for value in _bad_values(name, field)
]


@pytest.mark.parametrize("name,field,value", CASES, ids=[f"{c[0]}.{c[1]}={c[2]!r}" for c in CASES])
def test_every_field_rejects_out_of_range_values(name, field, value):
    assert not in_range(name, field, value)
    with pytest.raises(ValueError) as err:
        CLASSES[name](**{field: value})
    # the message names the field (or, for a cross-field bound, the field it is bound by)
    related = {
        "n_topics": ("n_topics", "topics_per_user", "topics_per_creator"),
        "title_topic_share": ("title_topic_share",),
        "title_group_share": ("title_group_share",),
        "like_threshold": ("like_threshold", "dislike_threshold"),
        "dislike_threshold": ("dislike_threshold", "like_threshold"),
        "n_creators": ("n_creators",),
    }.get(field, (field,))
    assert any(r in str(err.value) for r in related), str(err.value)


def test_cross_field_constraints():
    with pytest.raises(ValueError, match="title_topic_share \\+ title_group_share"):
        WorldConfig(title_topic_share=0.7, title_group_share=0.4)
    with pytest.raises(ValueError, match="n_creators"):
        WorldConfig(n_groups=10, n_creators=5)
    with pytest.raises(ValueError, match="topics_per_creator"):
        WorldConfig(n_topics=1, topics_per_user=1)  # topics_per_creator = 2 > 1
    with pytest.raises(ValueError, match="topics_per_user"):
        WorldConfig(n_topics=2)  # topics_per_user = 3 > 2
    with pytest.raises(ValueError, match="dislike_threshold"):
        UserModelConfig(dislike_threshold=0.8, like_threshold=0.6)
    with pytest.raises(ValueError, match="slate_size"):
        EnvConfig(world=WorldConfig.small(n_items=20), slate_size=21)
    with pytest.raises(ValueError, match="info_level"):
        EnvConfig(info_level="all")
    for field, value in (("world", UserModelConfig()), ("user_model", {}), ("reward", None)):
        with pytest.raises(ValueError, match=field):
            EnvConfig(**{field: value})


def test_config_replace_validates_again():
    with pytest.raises(ValueError, match="n_items"):
        WorldConfig.small().replace(n_items=0)
    assert WorldConfig.small(n_items=40).n_items == 40


# ---------------------------------------------------------------- determinism and streams
def _all_arrays(w: World) -> dict[str, np.ndarray]:
    out = {f"items.{k}": v for k, v in vars(w.items).items()}
    out.update({f"users.{k}": v for k, v in vars(w.users).items()})
    out.update(
        topic_centroids=w.topic_centroids,
        title_tokens=w.catalog.title_tokens,
        categorical=w.catalog.categorical,
        item_appeal=w.item_appeal,
    )
    return out


def test_world_is_a_function_of_config_and_seed():
    cfg = WorldConfig.small()
    a, b, c = World(cfg, seed=3), World(cfg, seed=3), World(cfg, seed=4)
    for key, value in _all_arrays(a).items():
        np.testing.assert_array_equal(value, _all_arrays(b)[key], err_msg=key)
    differs = [k for k, v in _all_arrays(a).items() if not np.array_equal(v, _all_arrays(c)[k])]
    assert "items.latent" in differs and "users.preference" in differs and "title_tokens" in differs


def test_items_do_not_depend_on_the_user_population():
    a = World(WorldConfig.small(), seed=1)
    b = World(WorldConfig.small(n_users=57), seed=1)
    for key, value in _all_arrays(a).items():
        if not key.startswith("users."):
            np.testing.assert_array_equal(value, _all_arrays(b)[key], err_msg=key)
    assert b.users.preference.shape == (57, 8)


# ---------------------------------------------------------------- catalog and truth
def test_catalog_matches_the_truth(small_world):
    w, c = small_world, small_world.config
    cat = w.catalog
    assert cat.categorical_names == ("creator", "topic", "group")
    assert cat.categorical_cardinalities == (c.n_creators, c.n_topics, c.n_groups)
    np.testing.assert_array_equal(cat.column("creator"), w.items.creator)
    np.testing.assert_array_equal(cat.column("topic"), w.items.topic)
    np.testing.assert_array_equal(cat.column("group"), w.items.group)
    np.testing.assert_array_equal(cat.release_time, w.items.release_time)
    assert cat.title_tokens.shape == (c.n_items, c.title_length)
    assert cat.title_tokens.dtype == np.int64 and cat.categorical.dtype == np.int64
    assert cat.vocab_size == c.vocab_size == 1 + 2 * 8 * 8 + 2 * 10 + 50
    assert cat.title_tokens.min() >= 1 and cat.title_tokens.max() < cat.vocab_size
    # a creator publishes in one group
    for g in range(c.n_groups):
        creators = np.unique(w.items.creator[w.items.group == g])
        assert not np.isin(creators, w.items.creator[w.items.group != g]).any()
    np.testing.assert_allclose(np.linalg.norm(w.items.latent, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(w.users.preference, axis=1), 1.0, rtol=1e-5)
    assert np.all(w.users.patience >= 1.0)
    assert np.all((w.users.activity >= 0.3) & (w.users.activity <= 1.0))
    with pytest.raises(KeyError, match="no categorical feature"):
        cat.column("colour")


def test_title_vocabulary_layout():
    c = WorldConfig.small(n_items=3000)
    w = World(c, seed=0)
    tok = w.catalog.title_tokens
    W = c.words_per_topic
    n_topic_words = c.n_groups * c.n_topics * W
    group_base = 1 + n_topic_words
    noise_base = group_base + c.n_groups * c.words_per_group
    is_topic = tok < group_base
    is_group = (tok >= group_base) & (tok < noise_base)
    # topic words come from the item's own (group, topic) block, group words from its group's
    block = (tok - 1) // W
    own_block = (w.items.group * c.n_topics + w.items.topic)[:, None]
    assert np.all(block[is_topic] == np.broadcast_to(own_block, tok.shape)[is_topic])
    gword = (tok - group_base) // c.words_per_group
    assert np.all(gword[is_group] == np.broadcast_to(w.items.group[:, None], tok.shape)[is_group])
    # token kinds in the configured shares (binomial tolerance over 24,000 tokens)
    n = tok.size
    for share, observed in (
        (c.title_topic_share, is_topic.mean()),
        (c.title_group_share, is_group.mean()),
    ):
        assert abs(observed - share) < 5 * math.sqrt(share * (1 - share) / n)


def test_release_times(default_world):
    w, c = default_world, default_world.config
    rel = w.items.release_time
    new = rel > 0
    assert abs(new.mean() - c.new_item_fraction) < 5 * math.sqrt(0.09 / c.n_items)
    assert rel[new].max() <= c.release_horizon + 1e-3 and rel[new].min() >= 1e-3
    assert rel[~new].min() >= -c.catalog_age
    np.testing.assert_array_equal(w.released(0.0), ~new)
    np.testing.assert_array_equal(w.released(5.0), rel <= 5.0)
    assert w.released(5.0).sum() > w.released(0.0).sum()


# ---------------------------------------------------------------- popularity
def test_base_popularity_is_zipf_and_heavy_tailed(default_world):
    w = default_world
    pop = np.sort(w.items.popularity)[::-1]
    ranks = np.arange(1, w.n_items + 1, dtype=np.float64)
    np.testing.assert_allclose(pop, ranks**-w.config.popularity_exponent, rtol=1e-6)
    top = w.n_items // 100
    share = pop[:top].sum() / pop.sum()
    # Zipf s=1 over 20,000 items: H(200) / H(20000) = 0.56; uniform would be 0.01
    assert (
        share == pytest.approx((1 / ranks[:top]).sum() / (1 / ranks).sum(), rel=1e-5)
        and share > 0.5
    )
    flat = World(WorldConfig.small(popularity_exponent=0.0), seed=0)
    assert np.all(flat.items.popularity == 1.0)


def test_clicks_under_the_popularity_policy_are_heavy_tailed():
    cfg = EnvConfig.small()
    env = BatchedRecEnv(100, cfg)
    w = env.world
    shares = {}
    for policy in (
        PopularityPolicy(w, cfg.slate_size, seed=0),
        UniformPolicy(w, cfg.slate_size, seed=0),
    ):
        log = collect(env, policy, n_users=300, seed=0, progress=False)
        clicks = np.sort(np.bincount(log.positives().item, minlength=w.n_items))[::-1]
        assert clicks.sum() > 1000
        shares[policy.name] = clicks[: w.n_items // 100].sum() / clicks.sum()  # top 1% of items
    assert shares["popularity"] > 0.08, shares
    assert shares["popularity"] > 2 * shares["uniform"], shares


# ---------------------------------------------------------------- content carries the latent signal
def _bag_of_words(w: World) -> np.ndarray:
    n, t = w.catalog.title_tokens.shape
    x = np.zeros((n, w.catalog.vocab_size))
    np.add.at(x, (np.repeat(np.arange(n), t), w.catalog.title_tokens.ravel()), 1.0)
    return x


def _ridge(x_train, y_train, lam=1.0):
    d = x_train.shape[1]
    return np.linalg.solve(x_train.T @ x_train + lam * np.eye(d), x_train.T @ y_train)


def test_linear_probe_on_titles_recovers_topics():
    w = World(WorldConfig.small(n_items=4000), seed=0)
    x, topic = _bag_of_words(w), w.items.topic
    n_topics = w.config.n_topics
    perm = np.random.default_rng(0).permutation(w.n_items)
    train, test = perm[:3000], perm[3000:]
    onehot = np.eye(n_topics)[topic]
    coef = _ridge(x[train], onehot[train])  # one-vs-rest least squares
    acc = np.mean(np.argmax(x[test] @ coef, axis=1) == topic[test])
    assert acc > 0.9 and 1 / n_topics == 0.125  # chance level is 1/8
    # control: the same probe on shuffled labels is at chance level on the held-out split
    shuffled = np.random.default_rng(1).permutation(topic)
    coef = _ridge(x[train], np.eye(n_topics)[shuffled][train])
    assert np.mean(np.argmax(x[test] @ coef, axis=1) == shuffled[test]) < 0.25
    # within a topic the words follow the item's deviation from the centroid: a probe predicts
    # the residual z - c_topic on held-out items (R^2 > 0; no signal would give <= 0)
    resid = w.items.latent - w.topic_centroids[topic]
    pred = x[test] @ _ridge(x[train], resid[train])
    r2 = 1 - ((pred - resid[test]) ** 2).sum() / ((resid[test] - resid[train].mean(0)) ** 2).sum()
    assert r2 > 0.08


def test_items_cluster_around_their_topic_centroids(default_world):
    w = default_world
    cos = w.items.latent @ w.topic_centroids.T  # (N, n_topics)
    own = cos[np.arange(w.n_items), w.items.topic]
    assert np.mean(np.argmax(cos, axis=1) == w.items.topic) > 0.98
    other = cos.copy()
    other[np.arange(w.n_items), w.items.topic] = -np.inf
    assert own.mean() > 0.8 and own.mean() > other.max(axis=1).mean() + 0.25
    # users lean to the topics mixed into their preference
    ucos = w.users.preference @ w.topic_centroids.T  # (U, n_topics)
    best = np.argmax(ucos, axis=1)
    assert np.mean((w.users.topics == best[:, None]).any(axis=1)) > 0.9


# ---------------------------------------------------------------- affinity and the oracle
def test_affinity_is_exactly_zero_across_groups(small_world):
    w = small_world
    users = np.arange(w.n_users)
    items = np.arange(w.n_items)
    aff = w.affinity(users, items)  # (U, N)
    same = w.users.group[:, None] == w.items.group[None, :]
    assert np.all(aff[~same] == 0.0) and np.all(aff[same] > 0.0)
    util = w.utility(users, items)
    assert np.all(util[~same] == -np.inf)
    expect = 1 / (1 + np.exp(w.user_model.no_click_utility - util[same].astype(np.float64)))
    np.testing.assert_allclose(aff[same], expect, rtol=1e-5)
    # static utility = alpha <p, z> + quality_weight q + popularity_weight (log pop - mean)
    um = w.user_model
    logp = np.log(w.items.popularity.astype(np.float64))
    manual = (
        um.affinity_scale * (w.users.preference @ w.items.latent.T)
        + um.quality_weight * w.items.quality
        + um.popularity_weight * (logp - logp.mean())
    )
    np.testing.assert_allclose(util[same], manual[same], rtol=1e-4, atol=1e-4)
    # per-user item lists (B, K) give the same numbers as the shared list
    lists = np.stack([items[:7], items[7:14]])
    # einsum over (B, K, d) vs a BLAS matmul: other summation orders (float32 bound)
    np.testing.assert_allclose(
        w.affinity(users[:2], lists), aff[:2][[[0], [1]], lists], rtol=0, atol=_affinity_tol(w)
    )


def _utility_tol(w: World) -> float:
    """Largest difference of alpha <p, z> + appeal between two summation orders (float32).

    The dot product of d terms is bounded by ``max |p| max |z|`` (Cauchy-Schwarz); the sum with
    the appeal and the cast to float32 round once more (one ulp of the largest utility).
    """
    um = w.user_model
    p = float(np.linalg.norm(w.users.preference, axis=1).max())
    z = float(np.linalg.norm(w.items.latent, axis=1).max())
    dot = reorder_tolerance(w.config.latent_dim, 1, p * z)
    largest = abs(um.affinity_scale) * p * z + float(np.abs(w.item_appeal).max())
    return abs(um.affinity_scale) * dot + 2 * U32 * largest


def _affinity_tol(w: World) -> float:
    """The utility bound through the sigmoid (slope <= 1/4), plus its float32 rounding."""
    return _utility_tol(w) / 4 + 4 * U32


def test_affinity_with_cross_group_epsilon():
    w = World(WorldConfig.small(cross_group_epsilon=0.2), seed=0)
    users, items = np.arange(20), np.arange(w.n_items)
    same = w.users.group[users][:, None] == w.items.group[None, :]
    static = w.user_model.affinity_scale * (w.users.preference[users] @ w.items.latent.T)
    static = static + w.item_appeal  # alpha <p, z> + appeal, no group term
    util = w.utility(users, items)
    np.testing.assert_allclose(util[same], static[same], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(util[~same], static[~same] + math.log(0.2), rtol=1e-5, atol=1e-5)
    aff = w.affinity(users, items)
    assert np.all(aff[~same] > 0)
    np.testing.assert_allclose(
        aff, 1 / (1 + np.exp(w.user_model.no_click_utility - util.astype(np.float64))), rtol=1e-5
    )


@pytest.mark.parametrize("chunk", [65_536, 37])
def test_best_items_equals_brute_force(small_world, chunk):
    w = small_world
    users = np.arange(0, w.n_users, 7)
    aff = w.affinity(users, np.arange(w.n_items)).astype(np.float64)
    # blocks of `chunk` items run other matmul shapes than the reference (one block of the
    # whole catalog): scores agree to the float32 bound, so two items closer than that may
    # swap places; every returned item must be a top-k item up to that bound
    tol = _affinity_tol(w)
    for k in (1, 10, 60):
        items, top = w.best_items(users, k, chunk=chunk)
        assert_top_k_of(items, aff, tol=tol)
        order = np.argsort(-aff, axis=1, kind="stable")[:, :k]
        np.testing.assert_allclose(
            top, np.take_along_axis(aff, order, axis=1), rtol=0, atol=2 * tol
        )
    # only items released by each user's time; and with drifted preferences
    times = np.linspace(0.0, 10.0, users.size)
    pref = w.users.preference[users][::-1].copy()
    items, _ = w.best_items(users, 10, time=times, preference=pref, chunk=chunk)
    aff = w.affinity(users, np.arange(w.n_items), preference=pref).astype(np.float64)
    aff[w.items.release_time[None, :] > times[:, None]] = -1.0
    assert_top_k_of(items, aff, tol=tol)
    assert np.all(w.items.release_time[items] <= times[:, None])
