"""The ranker learns from logged impressions: AUC, top-k affinity, and what the crosses buy.

One small world with strong fatigue (a case built for the early-binding crosses: a user who just
clicked a topic is much less likely to click it again soon, which the recent-topic crosses see
directly), logs from a uniform and a popularity behaviour policy on disjoint users, a time
split, and two rankers trained with the same budget: with and without the cross features.
"""

from __future__ import annotations

import numpy as np
import pytest

from ranking import (
    Ranker,
    RankerConfig,
    RankerTrainConfig,
    evaluate_ranker,
    roc_auc,
    slate_data,
    train_ranker,
)
from simenv import (
    BatchedRecEnv,
    EnvConfig,
    ImpressionLog,
    PopularityPolicy,
    UniformPolicy,
    UserModelConfig,
    World,
    WorldConfig,
    collect,
)
from simenv.history import EventSequences
from simenv.types import obs_users

N_USERS = 400
L = 16


@pytest.fixture(scope="module")
def setup():
    um = UserModelConfig(fatigue_increment=2.0)
    cfg = EnvConfig.small(world=WorldConfig.small(n_users=N_USERS), user_model=um)
    world = World(cfg.world, seed=3, user_model=um)
    half = N_USERS // 2
    logs = []
    for j, policy in enumerate(
        [
            UniformPolicy(world, cfg.slate_size, seed=1),
            PopularityPolicy(world, cfg.slate_size, epsilon=0.3, seed=2),
        ]
    ):
        env = BatchedRecEnv(100, cfg, world=world)
        users = np.arange(j * half, (j + 1) * half)
        lg = collect(env, policy, n_users=half, seed=10 + j, users=users, progress=False)
        if logs:  # distinct request ids
            lg.columns["request"] += logs[-1].columns["request"].max() + 1
        logs.append(lg)
    log = ImpressionLog.concat(logs)
    train, valid, test = log.split_by_time(*log.time_quantiles(0.7, 0.85))
    seq = EventSequences.from_log(log, world.n_items)
    tc = RankerTrainConfig(epochs=4, batch_size=256, history_length=L, progress=False, patience=0)
    rankers = {}
    for name, crosses in [("cross", RankerConfig().cross_features), ("plain", ())]:
        r = Ranker(world.catalog, RankerConfig(cross_features=crosses, seed=0))
        train_ranker(r, train, seq, tc, valid)
        rankers[name] = r
    return world, slate_data(test, seq, L), rankers


def test_auc_well_above_chance_and_popularity(setup):
    _, test, rankers = setup
    res = evaluate_ranker(rankers["cross"], test)
    pop = roc_auc(test.clicked, rankers["cross"].statistics.clicks[test.items])
    assert res["click_rate"] > 0.02  # the test slates do have clicks
    assert res["auc"] > 0.78, res
    assert res["auc"] > pop + 0.15, (res["auc"], pop)
    assert res["logloss"] < 0.2, res


def test_top_k_has_much_higher_true_affinity_than_random(setup):
    world, test, rankers = setup
    rows = np.arange(0, len(test), max(1, len(test) // 200))[:200]
    obs = {k: v[rows] for k, v in test.obs.items()}
    users, t = obs_users(obs), obs["context"][:, 0]
    ids, scores = rankers["cross"].top_k(obs, 5)
    assert np.all(ids >= 0) and np.all(np.isfinite(scores))
    assert np.all(world.items.release_time[ids] <= t[:, None])  # only released items
    top = world.affinity(users, ids).mean()  # the truth, for evaluation only
    rng = np.random.default_rng(0)
    rand = world.affinity(users, rng.integers(0, world.n_items, size=(rows.size, 5))).mean()
    best = world.affinity(users, world.best_items(users, 5, time=t)[0]).mean()
    assert top > 3.0 * rand, (top, rand)
    assert top > 0.5 * best, (top, best)


def test_cross_features_matter_on_the_fatigue_world(setup):
    _, test, rankers = setup
    with_x = evaluate_ranker(rankers["cross"], test)["auc"]
    without = evaluate_ranker(rankers["plain"], test)["auc"]
    assert with_x > without + 0.05, (with_x, without)
