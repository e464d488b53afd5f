"""Cross features and item statistics on hand-made data; no access to the hidden truth."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ranking import CrossFeatures, ItemStatistics, Ranker, RankerConfig
from ranking.features import ATTRIBUTE_FEATURES, ITEM_FEATURES, STAT_FEATURES, check_obs
from simenv import BatchedRecEnv, EnvConfig, UniformPolicy, World, collect
from simenv.history import EventSequences, impression_examples
from simenv.log import ImpressionLog
from simenv.types import Columns, EventType, ItemCatalog, Obs

CLICK, LIKE, DISLIKE = int(EventType.CLICK), int(EventType.LIKE), int(EventType.DISLIKE)


def tiny_catalog() -> ItemCatalog:
    # item:         0    1    2    3    4    5
    creator = [0, 0, 1, 2, 2, 3]
    topic = [0, 1, 1, 0, 2, 2]
    group = [0, 0, 0, 1, 1, 1]
    return ItemCatalog(
        title_tokens=np.array([[1, 2, 0], [3, 0, 0], [4, 5, 6], [1, 1, 0], [7, 0, 0], [2, 3, 4]]),
        vocab_size=8,
        categorical=np.stack([creator, topic, group], axis=1).astype(np.int64),
        categorical_names=("creator", "topic", "group"),
        categorical_cardinalities=(4, 3, 2),
        release_time=np.array([-10.0, -5.0, 0.0, 1.0, 2.5, 20.0], dtype=np.float32),
    )


def tiny_obs() -> dict[str, np.ndarray]:
    """Row 0: item1 click (3 d ago), item3 like (1 d), item1 dislike (0.5 d), item4 click (0.25 d);
    row 1: empty history. Query time 5.0 for both."""
    return {
        Obs.ITEMS: np.array([[0, 0, 1, 3, 1, 4], [0] * 6], dtype=np.int64),
        Obs.EVENTS: np.array([[0, 0, CLICK, LIKE, DISLIKE, CLICK], [0] * 6], dtype=np.int64),
        Obs.DT: np.array([[0, 0, 3.0, 1.0, 0.5, 0.25], [0] * 6], dtype=np.float32),
        Obs.MASK: np.array([[0, 0, 1, 1, 1, 1], [0] * 6], dtype=np.int8),
        Obs.CONTEXT: np.array([[5.0, 2.0, 3.0], [5.0, 0.0, 0.0]], dtype=np.float32),
        Obs.USER: np.array([7, 8]),
    }


def features(cands: np.ndarray, **kw) -> tuple[dict[str, np.ndarray], CrossFeatures]:
    kw = {
        "crosses": ("topic", "creator", "group", "item", "age"),
        "recent_events": 2,
        "short_half_life": 0.5,
        "long_half_life": 7.0,
        **kw,
    }
    cf = CrossFeatures(tiny_catalog(), **kw)
    obs = {k: torch.as_tensor(v) for k, v in tiny_obs().items()}
    tables = cf.user_tables(obs)
    out = cf.pairs(tables, torch.as_tensor(cands)).numpy()
    return {name: out[..., j] for j, name in enumerate(cf.names())}, cf


def attr_expect(count=0, likes=0, dislikes=0, dts=(), recent=0, n_events=4, r=2):
    return {
        "log_count": math.log1p(count),
        "log_likes": math.log1p(likes),
        "log_dislikes": math.log1p(dislikes),
        "log_decay_short": math.log1p(sum(2 ** (-d / 0.5) for d in dts)),
        "log_decay_long": math.log1p(sum(2 ** (-d / 7.0) for d in dts)),
        "recent_share": recent / r,
        "share": count / max(n_events, 1),
    }


def test_layout_names():
    f, cf = features(np.array([[0], [0]]))
    # attributes in catalog order, then the item block, then the age
    expect = [f"{a}.{x}" for a in ("creator", "topic", "group") for x in ATTRIBUTE_FEATURES]
    expect += [f"item.{x}" for x in ITEM_FEATURES] + ["age_log"]
    assert cf.names() == expect and cf.n_features == len(expect) == 27


def test_attribute_counts_recency_and_shares_by_hand():
    # candidates of row 0: item 2 (creator 1, topic 1, group 0), item 4 (creator 2, topic 2,
    # group 1), item 0 (creator 0, topic 0, group 0)
    f, _ = features(np.array([[2, 4, 0], [2, 4, 0]]))
    cases = {
        # topic 1 = item1 twice: click 3 d ago, dislike 0.5 d ago (the latter among the last 2)
        ("topic", 0): attr_expect(2, 0, 1, (3.0, 0.5), recent=1),
        # topic 2 = item4 click 0.25 d ago (last slot)
        ("topic", 1): attr_expect(1, 0, 0, (0.25,), recent=1),
        # topic 0 = item3 like 1 d ago (not among the last 2)
        ("topic", 2): attr_expect(1, 1, 0, (1.0,), recent=0),
        # creator 1 never engaged; creator 2 = item3 like + item4 click; creator 0 = item1 x2
        ("creator", 0): attr_expect(0),
        ("creator", 1): attr_expect(2, 1, 0, (1.0, 0.25), recent=1),
        ("creator", 2): attr_expect(2, 0, 1, (3.0, 0.5), recent=1),
        # group 0 = item1 x2; group 1 = item3 + item4
        ("group", 0): attr_expect(2, 0, 1, (3.0, 0.5), recent=1),
        ("group", 1): attr_expect(2, 1, 0, (1.0, 0.25), recent=1),
        ("group", 2): attr_expect(2, 0, 1, (3.0, 0.5), recent=1),
    }
    for (attr, k), expect in cases.items():
        for name, value in expect.items():
            assert f[f"{attr}.{name}"][0, k] == pytest.approx(value, abs=1e-6), (attr, k, name)
            # an empty history has no engagement with anything
            assert f[f"{attr}.{name}"][1, k] == 0.0


def test_item_in_history_flags_and_recency_by_hand():
    f, _ = features(np.array([[1, 4, 3, 2], [1, 4, 3, 2]]))
    # item 1: twice (click 3 d, dislike 0.5 d; the dislike is in the last 2)
    assert f["item.log_count"][0, 0] == pytest.approx(math.log(3))
    assert f["item.recent"][0, 0] == 0.5
    assert f["item.recency"][0, 0] == pytest.approx(2 ** (-0.5 / 0.5))  # the most recent one
    assert (f["item.liked"][0, 0], f["item.disliked"][0, 0]) == (0.0, 1.0)
    # item 4: once, last slot, a plain click
    assert f["item.log_count"][0, 1] == pytest.approx(math.log(2))
    assert f["item.recent"][0, 1] == 0.5
    assert f["item.recency"][0, 1] == pytest.approx(2 ** (-0.25 / 0.5))
    assert (f["item.liked"][0, 1], f["item.disliked"][0, 1]) == (0.0, 0.0)
    # item 3: liked 1 d ago, not among the last 2
    assert f["item.recent"][0, 2] == 0.0 and f["item.liked"][0, 2] == 1.0
    assert f["item.recency"][0, 2] == pytest.approx(2 ** (-1.0 / 0.5))
    # item 2: not in the history; padding slots (item id 0 with mask 0) never count
    for name in ITEM_FEATURES:
        assert f[f"item.{name}"][0, 3] == 0.0
        assert np.all(f[f"item.{name}"][1] == 0.0)
    g, _ = features(np.array([[0], [0]]))
    for name in ITEM_FEATURES:
        assert g[f"item.{name}"][0, 0] == 0.0  # item 0 only appears as padding


def test_age_at_query_time():
    f, _ = features(np.array([[0, 2, 4, 5], [0, 2, 4, 5]]))
    # query time 5: released 10, 5 and 2.5 days ago; item 5 is released only at day 20
    expect = [math.log1p(15.0), math.log1p(5.0), math.log1p(2.5), 0.0]
    np.testing.assert_allclose(f["age_log"][0], expect, rtol=1e-6)


def test_switches_drop_blocks():
    f, cf = features(np.array([[2], [2]]), crosses=("topic", "age"))
    assert cf.names() == [f"topic.{x}" for x in ATTRIBUTE_FEATURES] + ["age_log"]
    assert f["topic.log_count"][0, 0] == pytest.approx(math.log(3))
    with pytest.raises(ValueError, match="colour"):
        CrossFeatures(tiny_catalog(), ("colour",), 2, 0.5, 7.0)


def test_full_catalog_features_equal_candidate_features_bitwise():
    cf = CrossFeatures(tiny_catalog(), ("topic", "creator", "group", "item", "age"), 2, 0.5, 7.0)
    obs = {k: torch.as_tensor(v) for k, v in tiny_obs().items()}
    tables = cf.user_tables(obs)
    full = cf.catalog(tables, 0, 6).numpy()  # (2, 6, F)
    for start, stop in [(0, 3), (3, 6), (1, 5)]:
        np.testing.assert_array_equal(cf.catalog(tables, start, stop).numpy(), full[:, start:stop])
    cands = np.array([[5, 1, 1, 0], [3, 2, 4, 1]])
    pairs = cf.pairs(tables, torch.as_tensor(cands)).numpy()
    np.testing.assert_array_equal(pairs, np.take_along_axis(full, cands[:, :, None], axis=1))


def test_check_obs_errors():
    obs = tiny_obs()
    assert check_obs(obs, 6) == 2
    with pytest.raises(ValueError, match="missing key 'dt'"):
        check_obs({k: v for k, v in obs.items() if k != Obs.DT}, 6)
    with pytest.raises(ValueError, match="batched"):
        check_obs({k: v[0] for k, v in obs.items()}, 6)
    with pytest.raises(ValueError, match=r"obs\['item_ids'\] must be item ids in \[0, 5\]"):
        check_obs({**obs, Obs.ITEMS: obs[Obs.ITEMS] + 3}, 6)
    with pytest.raises(ValueError, match="context"):
        check_obs({**obs, Obs.CONTEXT: obs[Obs.CONTEXT][:, :2]}, 6)


# ---------------------------------------------------------------------------- statistics
def hand_log() -> ImpressionLog:
    # 3 requests x 2 positions over items 0..3
    items = np.array([0, 1, 0, 2, 0, 1])
    fb = np.array([CLICK, 0, LIKE, 0, DISLIKE, 0])
    watch = np.array([2.0, 0, 4.0, 0, 0.5, 0], dtype=np.float32)
    n = items.size
    cols = {
        Columns.USER: np.array([0, 0, 1, 1, 0, 0]),
        Columns.TIME: np.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]),
        Columns.SESSION: np.zeros(n, np.int32),
        "session_step": np.zeros(n, np.int32),
        Columns.REQUEST: np.array([0, 0, 1, 1, 2, 2]),
        Columns.POSITION: np.tile(np.arange(2, dtype=np.int16), 3),
        Columns.ITEM: items,
        Columns.FEEDBACK: fb.astype(np.int8),
        Columns.WATCH: watch,
        Columns.REWARD: np.zeros(n, np.float32),
        Columns.PROPENSITY: np.full(n, np.nan, np.float32),
    }
    return ImpressionLog(cols)


def test_item_statistics_counts_and_formulas():
    st = ItemStatistics.from_log(hand_log(), n_items=4, prior_strength=2.0)
    np.testing.assert_array_equal(st.impressions, [3, 2, 1, 0])
    np.testing.assert_array_equal(st.clicks, [3, 0, 0, 0])
    np.testing.assert_array_equal(st.likes, [1, 0, 0, 0])
    np.testing.assert_array_equal(st.dislikes, [1, 0, 0, 0])
    np.testing.assert_allclose(st.watch, [6.5, 0, 0, 0])
    ctr, like, dislike, watch = st.priors()
    assert (ctr, like, dislike, watch) == pytest.approx((0.5, 1 / 3, 1 / 3, 6.5 / 3))
    f = st.features()
    assert f.shape == (4, len(STAT_FEATURES)) and f.dtype == np.float32
    a = 2.0
    p = (3 + a * 0.5) / (3 + a)
    np.testing.assert_allclose(
        f[0],
        [
            math.log(4),
            math.log(4),
            math.log(p / (1 - p)),
            (1 + a / 3) / (3 + a),
            (1 + a / 3) / (3 + a),
            math.log1p((6.5 + a * 6.5 / 3) / (3 + a)),
        ],
        rtol=1e-6,
    )
    # an item never shown gets exactly the priors
    np.testing.assert_allclose(f[3], [0, 0, 0.0, 1 / 3, 1 / 3, math.log1p(6.5 / 3)], atol=1e-6)


def test_leave_one_out_equals_statistics_without_that_row():
    log = hand_log()
    st = ItemStatistics.from_log(log, 4, prior_strength=2.0)
    # leave out row 2 (item 0, a like with 4 minutes): the counts drop, the priors stay
    loo = st.features(
        np.array([0]), exclude=(np.array([1.0]), np.array([1.0]), np.array([0.0]), np.array([4.0]))
    )
    keep = np.ones(len(log), bool)
    keep[2] = False
    st2 = ItemStatistics.from_log(log.select(keep), 4, prior_strength=2.0)
    # same counts as st2 for item 0; st's priors (global rates) are kept on purpose
    a = 2.0
    ctr, like, dislike, watch = st.priors()
    p = (st2.clicks[0] + a * ctr) / (st2.impressions[0] + a)
    np.testing.assert_allclose(
        loo[0],
        [
            math.log1p(st2.impressions[0]),
            math.log1p(st2.clicks[0]),
            math.log(p / (1 - p)),
            (st2.likes[0] + a * like) / (st2.clicks[0] + a),
            (st2.dislikes[0] + a * dislike) / (st2.clicks[0] + a),
            math.log1p((st2.watch[0] + a * watch) / (st2.clicks[0] + a)),
        ],
        rtol=1e-6,
    )


def test_statistics_validation():
    with pytest.raises(ValueError, match="outside"):
        ItemStatistics.from_log(hand_log(), n_items=2)
    with pytest.raises(ValueError, match="prior_strength"):
        ItemStatistics.empty(3, prior_strength=0.0)
    with pytest.raises(ValueError, match="clicks"):
        ItemStatistics(np.zeros(3), np.zeros(2), np.zeros(3), np.zeros(3), np.zeros(3))


# ---------------------------------------------------------------------------- no leakage
def test_ranker_reads_only_the_public_catalog():
    cfg = EnvConfig.small()
    world = World(cfg.world, seed=0, user_model=cfg.user_model)
    with pytest.raises(ValueError, match="ItemCatalog"):
        Ranker(world)  # type: ignore[arg-type]
    env = BatchedRecEnv(32, cfg, world=world)
    log = collect(
        env, UniformPolicy(world, cfg.slate_size, seed=1), n_users=64, seed=0, progress=False
    )
    seq = EventSequences.from_log(log, world.n_items)
    ex = impression_examples(log, seq, cfg.history_length)
    obs = {k: v[:40] for k, v in ex.obs.items()}
    ranker = Ranker(
        world.catalog, RankerConfig(seed=1), ItemStatistics.from_log(log, world.n_items)
    )
    ranker.eval()
    cf = ranker.crosses
    feats = cf.catalog(
        cf.user_tables({k: torch.as_tensor(v) for k, v in obs.items()}), 0, world.n_items
    )
    before = ranker.score_all(obs)
    # scramble the hidden truth in place: latent vectors, preferences, groups, topics
    rng = np.random.default_rng(0)
    for arr in (world.items.latent, world.users.preference, world.item_appeal):
        arr[...] = arr[rng.permutation(arr.shape[0])]
    world.users.group[...] = rng.permutation(world.users.group)
    feats2 = cf.catalog(
        cf.user_tables({k: torch.as_tensor(v) for k, v in obs.items()}), 0, world.n_items
    )
    np.testing.assert_array_equal(feats.numpy(), feats2.numpy())
    ranker.invalidate_cache()
    np.testing.assert_array_equal(before, ranker.score_all(obs))


HIDDEN = {"latent", "preference", "item_appeal", "affinity", "best_items", "utility", "users"}


def test_ranking_package_imports_only_simenv_public_modules():
    # no world access: data types, log, history, and the shared utilities (writer, checkpoint
    # format, devices, validators)
    allowed = {
        "simenv.types",
        "simenv.log",
        "simenv.history",
        "simenv.atomic",
        "simenv.arrays",
        "simenv.checkpoint",
        "simenv.config",
        "simenv.device",
    }
    root = Path(__file__).resolve().parents[2] / "ranking"
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
                if mod.split(".")[0] in ("retrieval", "agents", "benchmarks"):
                    raise AssertionError(f"{path.name} imports {mod}")
                if mod.startswith("simenv"):
                    assert mod in allowed, f"{path.name} imports {mod}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in (
                        "retrieval",
                        "agents",
                        "benchmarks",
                        "simenv",
                    )
            if isinstance(node, ast.Attribute):
                assert node.attr not in HIDDEN, f"{path.name} reads .{node.attr}"
