"""The ranker's scoring contract: exact paths, padding, release times, determinism, caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ranking import HEADS, ItemStatistics, Ranker, RankerConfig, benchmark_score_all
from ranking.model import _obs_to_torch
from simenv import BatchedRecEnv, EnvConfig, UniformPolicy, World, collect
from simenv.history import EventSequences, impression_examples
from simenv.types import Obs
from tests.numerics import assert_reordered_close, network_reductions


@pytest.fixture(scope="module")
def data():
    cfg = EnvConfig.small()
    world = World(cfg.world, seed=0, user_model=cfg.user_model)
    env = BatchedRecEnv(64, cfg, world=world)
    log = collect(
        env, UniformPolicy(world, cfg.slate_size, seed=1), n_users=200, seed=0, progress=False
    )
    seq = EventSequences.from_log(log, world.n_items)
    ex = impression_examples(log, seq, cfg.history_length)
    # rows with long histories and rows with none, at various times
    order = np.argsort(-ex.obs[Obs.MASK].sum(1), kind="stable")
    rows = np.r_[order[:40], order[-8:]]
    obs = {k: v[rows] for k, v in ex.obs.items()}
    return world, log, obs, ItemStatistics.from_log(log, world.n_items)


def trained_like(ranker: Ranker, seed: int = 1) -> Ranker:
    """Perturb every weight so that biases and all blocks are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ranker.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ranker.eval()
    return ranker


CONFIGS = {
    "default": RankerConfig(),
    "all-sparse": RankerConfig(joint_key_limit=1),  # every attribute through the sparse path
    "heads": RankerConfig(
        heads=("click", "like", "dislike", "watch"), score_weights=(1.0, 1.0, -1.0, 0.1)
    ),
    "no-crosses": RankerConfig(cross_features=()),
    "age-only": RankerConfig(cross_features=("age",)),
    "no-cross-layers": RankerConfig(n_cross=0, mlp=()),
    "deep": RankerConfig(n_cross=3, mlp=(16, 8), id_dim=4, chunk_pairs=300),
}


def assert_paths_agree(ranker: Ranker, obs: dict, got: np.ndarray, want: np.ndarray) -> None:
    """Two scoring paths (or batch layouts) agree up to a reordering of float32 sums.

    ranking/model.py pads every matmul to at least _MIN_ROWS rows and _MIN_OUT columns so that
    MKL's AVX-512 kernels give bitwise equal scores here, but other kernels (MKL's AVX2 path,
    what an AMD EPYC runs; ``MKL_ENABLE_INSTRUCTIONS=AVX2`` reproduces it) block rows
    differently: equal to the float32 reordering bound of the network, with -inf (padding,
    unreleased items) at exactly the same places.
    """
    terms, depth = network_reductions(ranker, obs[Obs.ITEMS].shape[1])  # history pooling too
    assert_reordered_close(got, want, terms=terms, depth=depth)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_score_equals_score_all_gathered(data, name):
    world, _, obs, stats = data
    ranker = trained_like(Ranker(world.catalog, CONFIGS[name], stats))
    full = ranker.score_all(obs)
    b, n = full.shape
    assert full.dtype == np.float32 and (b, n) == (48, world.n_items)
    rng = np.random.default_rng(0)
    cand = rng.integers(-1, n, size=(b, 57))  # padding, duplicates, unreleased items
    cand[:, :16] = obs[Obs.ITEMS][:, :16]  # history items: the item-level crosses
    got = ranker.score(obs, cand)
    want = np.where(cand >= 0, np.take_along_axis(full, np.maximum(cand, 0), axis=1), -np.inf)
    assert_paths_agree(ranker, obs, got, want)
    # a single pair (one row, one candidate) and a single row
    one = {k: v[3:4] for k, v in obs.items()}
    assert_paths_agree(ranker, obs, ranker.score(one, cand[3:4, 5:6]), want[3:4, 5:6])
    assert_paths_agree(ranker, obs, ranker.score_all(one), full[3:4])


@pytest.mark.parametrize("name", ["default", "all-sparse", "heads"])
def test_scores_do_not_depend_on_the_batch_around_them(data, name):
    world, _, obs, stats = data
    ranker = trained_like(Ranker(world.catalog, CONFIGS[name], stats))
    full = ranker.score_all(obs)
    cand = np.random.default_rng(4).integers(-1, world.n_items, size=(48, 5))
    sc = ranker.score(obs, cand)
    for rows in (np.array([3]), np.array([0, 47]), np.arange(5, 12), np.arange(47, -1, -1)):
        sub = {k: v[rows] for k, v in obs.items()}
        assert_paths_agree(ranker, obs, ranker.score_all(sub), full[rows])
        assert_paths_agree(ranker, obs, ranker.score(sub, cand[rows]), sc[rows])


def test_training_form_matches_inference_form(data):
    world, log, obs, stats = data
    for cfg in (CONFIGS["default"], CONFIGS["all-sparse"], CONFIGS["heads"], CONFIGS["age-only"]):
        ranker = trained_like(Ranker(world.catalog, cfg, stats))
        items = np.random.default_rng(1).integers(0, world.n_items, size=(48, 9))
        items[:, 0] = obs[Obs.ITEMS][:, -1]
        with torch.no_grad():
            train_form = ranker(_obs_to_torch(obs), torch.from_numpy(items)).numpy()
        infer = ranker.head_outputs(obs, items)
        released = world.items.release_time[items] <= obs[Obs.CONTEXT][:, :1]
        assert np.isnan(infer[~released]).all()
        np.testing.assert_allclose(infer[released], train_form[released], rtol=1e-5, atol=1e-5)


def test_padding_and_unreleased_items_are_minus_inf(data):
    world, _, obs, stats = data
    ranker = trained_like(Ranker(world.catalog, RankerConfig(), stats))
    full = ranker.score_all(obs)
    t = obs[Obs.CONTEXT][:, 0]
    unreleased = world.catalog.release_time[None, :] > t[:, None]
    assert unreleased.any() and (~unreleased).any()
    assert np.all(full[unreleased] == -np.inf)
    assert np.all(np.isfinite(full[~unreleased]))
    cand = np.full((obs[Obs.ITEMS].shape[0], 4), -1)
    cand[:, 0] = np.argmax(unreleased, axis=1)  # an unreleased item (or item 0 if none)
    s = ranker.score(obs, cand)
    assert np.all(s[:, 1:] == -np.inf)
    np.testing.assert_array_equal(s[:, 0] == -np.inf, unreleased.any(axis=1))


def test_determinism_and_seeds(data):
    world, _, obs, stats = data
    state = torch.random.get_rng_state()
    a = Ranker(world.catalog, RankerConfig(seed=5), stats).eval()
    b = Ranker(world.catalog, RankerConfig(seed=5), stats).eval()
    c = Ranker(world.catalog, RankerConfig(seed=6), stats).eval()
    assert torch.equal(torch.random.get_rng_state(), state)  # no global RNG use
    sa = a.score_all(obs)
    # bitwise: same seed, same weights, same batch: a rerun of the same kernels
    np.testing.assert_array_equal(sa, a.score_all(obs))
    np.testing.assert_array_equal(sa, b.score_all(obs))
    assert not np.array_equal(sa, c.score_all(obs))


def test_top_k_over_catalog_and_candidates(data):
    world, _, obs, stats = data
    ranker = trained_like(Ranker(world.catalog, RankerConfig(), stats))
    full = ranker.score_all(obs)
    ids, scores = ranker.top_k(obs, 7)
    assert ids.shape == scores.shape == (48, 7) and ids.dtype == np.int64
    # bitwise: top_k runs score_all / score on the same batch (a rerun), then sorts
    np.testing.assert_array_equal(scores, -np.sort(-full, axis=1)[:, :7])
    np.testing.assert_array_equal(np.take_along_axis(full, ids, axis=1), scores)
    assert np.all(world.catalog.release_time[ids] <= obs[Obs.CONTEXT][:, :1])
    cand = np.random.default_rng(2).integers(0, world.n_items, size=(48, 30))
    cand[0, 2:] = -1  # row 0 has only 2 candidates
    cids, cs = ranker.top_k(obs, 5, candidates=cand)
    sc = ranker.score(obs, cand)
    np.testing.assert_array_equal(cs, -np.sort(-sc, axis=1)[:, :5])
    finite = np.isfinite(cs)
    for r in range(48):
        for j in range(5):
            if finite[r, j]:
                assert cids[r, j] in cand[r] and sc[r, list(cand[r]).index(cids[r, j])] == cs[r, j]
            else:
                assert cids[r, j] == -1
    assert np.all(cids[0, 2:] == -1)
    with pytest.raises(ValueError, match="k must be"):
        ranker.top_k(obs, 31, candidates=cand)
    with pytest.raises(ValueError, match="k must be"):
        ranker.top_k(obs, 0)


def test_item_cache_follows_weights_and_statistics(data):
    world, log, obs, stats = data
    ranker = trained_like(Ranker(world.catalog, RankerConfig(), stats))
    s0 = ranker.score_all(obs)
    with torch.no_grad():
        ranker.item_mlp[2].bias.add_(0.5)  # an in-place update, as an optimizer step does
    fresh = Ranker(world.catalog, RankerConfig(), stats).eval()
    fresh.load_state_dict(ranker.state_dict())
    s1 = ranker.score_all(obs)
    assert not np.array_equal(s0, s1)
    # bitwise: the same weights on the same batch (a rerun) give the same scores
    np.testing.assert_array_equal(s1, fresh.score_all(obs))
    ranker.set_statistics(ItemStatistics.empty(world.n_items))
    s2 = ranker.score_all(obs)
    assert not np.array_equal(s1, s2)
    fresh.set_statistics(ItemStatistics.empty(world.n_items))
    np.testing.assert_array_equal(s2, fresh.score_all(obs))


def test_bad_input_raises_value_error_naming_the_argument(data):
    world, _, obs, stats = data
    ranker = Ranker(world.catalog).eval()
    b = obs[Obs.ITEMS].shape[0]
    with pytest.raises(ValueError, match=r"candidates must be item ids in \[0, 499\] or -1"):
        ranker.score(obs, np.full((b, 3), world.n_items))
    with pytest.raises(ValueError, match=r"candidates must have shape \(\d+, K\)"):
        ranker.score(obs, np.zeros((b + 1, 3), np.int64))
    with pytest.raises(ValueError, match="candidates must hold integer item ids"):
        ranker.score(obs, np.zeros((b, 3), np.float32))
    with pytest.raises(ValueError, match="missing key"):
        ranker.score_all({k: v for k, v in obs.items() if k != Obs.MASK})
    with pytest.raises(ValueError, match="statistics must be an ItemStatistics over 500 items"):
        ranker.set_statistics(ItemStatistics.empty(7))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"hidden": 3}, "hidden"),
        ({"mlp": (2,)}, "mlp width"),
        ({"mlp": [8]}, "mlp must be a tuple"),
        ({"heads": ("like",)}, "heads"),
        ({"heads": ("click", "clicks")}, "heads"),
        ({"heads": ("click", "like")}, "score_weights"),
        ({"cross_features": ["topic"]}, "cross_features"),
        ({"recent_events": 0}, "recent_events"),
        ({"short_half_life": 0.0}, "short_half_life"),
        ({"chunk_pairs": 0}, "chunk_pairs"),
        ({"seed": -1}, "seed"),
        ({"n_cross": 1.5}, "n_cross"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        RankerConfig(**kw)


def test_config_round_trip_and_unknown_cross(data):
    world = data[0]
    cfg = RankerConfig(heads=("click", "watch"), score_weights=(1.0, 0.2), mlp=(16, 8))
    assert RankerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown RankerConfig fields"):
        RankerConfig.from_dict({**cfg.to_dict(), "width": 3})
    with pytest.raises(ValueError, match="'language'"):
        Ranker(world.catalog, RankerConfig(cross_features=("language",)))
    assert HEADS[0] == "click"


def test_multi_head_score_is_the_expected_value(data):
    world, _, obs, stats = data
    cfg = RankerConfig(
        heads=("click", "like", "dislike", "watch"), score_weights=(1.0, 2.0, -1.0, 0.5)
    )
    ranker = trained_like(Ranker(world.catalog, cfg, stats))
    cand = np.random.default_rng(3).integers(0, world.n_items, size=(48, 6))
    h = ranker.head_outputs(obs, cand).astype(np.float64)
    s = ranker.score(obs, cand)
    sig = 1 / (1 + np.exp(-h))
    want = sig[..., 0] * (
        1.0 + 2.0 * sig[..., 1] - 1.0 * sig[..., 2] + 0.5 * np.expm1(np.maximum(h[..., 3], 0))
    )
    ok = np.isfinite(s)
    np.testing.assert_allclose(s[ok], want[ok], rtol=1e-5, atol=1e-6)
    # the click head alone: the score is its logit
    single = trained_like(Ranker(world.catalog, RankerConfig(), stats))
    logit = single.head_outputs(obs, cand)[..., 0]
    # bitwise: score and head_outputs share one path on the same batch (score of one head is
    # its logit)
    np.testing.assert_array_equal(
        single.score(obs, cand), np.where(np.isnan(logit), -np.inf, logit)
    )


def test_parameter_counts_and_benchmark(data, capsys):
    world, _, obs, stats = data
    ranker = Ranker(world.catalog, RankerConfig(), stats)
    counts = ranker.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in ranker.parameters())
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    before = torch.get_num_threads()
    res = benchmark_score_all(ranker, obs, repeats=2)
    assert torch.get_num_threads() == before
    assert res["users"] == 48 and res["items"] == world.n_items and res["threads"] == 1
    assert res["pairs_per_s"] > 0 and res["pairs_per_cpu_s"] > 0
    assert "M pairs/s" in capsys.readouterr().out
    with pytest.raises(ValueError, match="repeats"):
        benchmark_score_all(ranker, obs, repeats=0)
