"""benchmarks.recipes: the ranker recipe's validation, head weights, subsampling and the
self-logging append (training period only, request ids shifted, histories rebuilt)."""

from __future__ import annotations

import numpy as np
import pytest

from agents.base import RandomAgent
from benchmarks.common import prepare_offline
from benchmarks.recipes import (
    CURRENT,
    IMPROVED,
    RankerRecipe,
    append_log,
    head_weights,
    profile_recipe,
    ranker_config,
    subsample_requests,
)
from simenv import BatchedRecEnv, EnvConfig, World, collect
from simenv.types import Columns


@pytest.fixture(scope="module")
def small():
    cfg = EnvConfig.small()
    world = World(cfg.world, seed=0, user_model=cfg.user_model)
    env = BatchedRecEnv(64, cfg, world=world)
    log = collect(env, RandomAgent(world, cfg.slate_size, seed=0), 200, seed=1, progress=False)
    own = collect(env, RandomAgent(world, cfg.slate_size, seed=5), 100, seed=2, progress=False)
    return world, cfg, prepare_offline(world, cfg, log, 16, 100, 0, "random"), own


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"policy": "greedy"}, "policy"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"position": "top"}, "position"),
        ({"own_log_rounds": -1}, "own_log_rounds"),
        ({"own_log_epsilon": 2.0}, "own_log_epsilon"),
        ({"heads": ("like",)}, "heads"),
        ({"max_slates_per_epoch": 0}, "max_slates_per_epoch"),
        ({"catalog_negatives": -1}, "catalog_negatives"),
        ({"catalog_negatives": 2.5}, "catalog_negatives"),
    ],
)
def test_recipe_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        RankerRecipe(**kw)


def test_recipes_and_configs():
    assert CURRENT.own_log_rounds == 0 and not CURRENT.memory and CURRENT.heads == ("click",)
    assert IMPROVED.base.own_log_rounds == 0 and IMPROVED.base.memory == IMPROVED.memory
    assert profile_recipe(CURRENT, True).max_slates_per_epoch < CURRENT.max_slates_per_epoch
    assert profile_recipe(CURRENT, False) is CURRENT
    env = EnvConfig()
    rc = ranker_config(CURRENT.replace(heads=("click", "like", "dislike")), env, seed=3)
    r = env.reward
    assert rc.score_weights == (r.click, r.like, r.dislike) and rc.seed == 3
    assert head_weights(("click",), r) == (1.0,)


def test_subsample_requests_keeps_whole_slates(small):
    _, _, data, _ = small
    log = data.train
    sub = subsample_requests(log, 50, seed=0)
    req = np.unique(sub[Columns.REQUEST])
    assert req.size == 50
    for r in req[:5]:  # every row of a kept slate is kept
        assert (sub[Columns.REQUEST] == r).sum() == (log[Columns.REQUEST] == r).sum()
    assert subsample_requests(log, 10**9, seed=0) is log
    np.testing.assert_array_equal(subsample_requests(log, 50, 0)[Columns.ITEM], sub[Columns.ITEM])


def test_append_log_training_period_only(small):
    world, _, data, own = small
    out = append_log(data, own)
    before = own[Columns.TIME] < data.t1
    assert len(out.train) == len(data.train) + int(before.sum())
    assert (out.train[Columns.TIME] < data.t1).all()
    r_old = np.unique(data.train[Columns.REQUEST])
    r_new = np.setdiff1d(np.unique(out.train[Columns.REQUEST]), r_old)
    assert r_new.min() > r_old.max()  # shifted past the training log's request ids
    assert r_new.size == np.unique(own[Columns.REQUEST][before]).size
    # histories now include the appended engagements; validation and test are untouched
    assert len(out.seq_train) > len(data.seq_train)
    assert out.valid is data.valid and out.test_set is data.test_set
    pos = out.train.positives()
    np.testing.assert_array_equal(
        out.train_counts, np.bincount(pos[Columns.ITEM], minlength=world.n_items)
    )


def test_catalog_negatives_reach_the_train_config(small, monkeypatch):
    import benchmarks.recipes as recipes
    from benchmarks.ranker import variants

    _, _, data, _ = small
    seen = {}

    def fake_train(ranker, log, sequences, config, valid_log=None):
        seen["config"] = config
        return None

    monkeypatch.setattr(recipes, "train_ranker", fake_train)
    recipes.train_recipe_ranker(data, CURRENT.replace(catalog_negatives=16), seed=0)
    assert seen["config"].catalog_negatives == 16
    recipes.train_recipe_ranker(data, CURRENT, seed=0)
    assert seen["config"].catalog_negatives == 0 and CURRENT.catalog_negatives == 0
    var = {v.name: v for v in variants((1.0,))}["catalog negatives (16 per slate)"]
    assert var.recipe == CURRENT.replace(catalog_negatives=16)
    assert var.factor == "(b) exposure" and var.direction == ">"


def test_every_variant_can_be_named_on_the_command_line():
    from benchmarks.ranker import IMPROVED_NAME, RankerExperimentConfig, improved_variants, variants
    from benchmarks.registry import make_config

    every = variants((1.0, 10.0)) + improved_variants()
    assert all("," not in v.name for v in every)  # --set variants=a,b splits on commas
    names = ",".join(v.name for v in improved_variants())
    cfg = make_config(RankerExperimentConfig, quick=True, overrides={"variants": names})
    assert cfg.variants == tuple(v.name for v in improved_variants())
    assert all(v.against == IMPROVED_NAME for v in improved_variants())
    second = improved_variants()[0].recipe
    assert second == IMPROVED.replace(own_log_rounds=IMPROVED.own_log_rounds + 1)
