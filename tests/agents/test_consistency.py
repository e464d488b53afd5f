"""Consistency with the ranker (agents.consistency): the noisy ranker, RRR tables, regret.

- NoisyRanker: the error is a fixed function of (user, item, seed) (same scores twice, other
  seeds differ), ``score`` equals ``score_all`` gathered, sigma = 0 is the base ranker;
- rrr_table against the metric functions, and 1 for a generator that returns R_k;
- pipeline_regret on cases with known answers (candidates holding the single-stage slate:
  ratios 1; candidates avoiding it: overlap 0 and the ratios of a hand computation).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from agents.consistency import NoisyRanker, pair_noise, pipeline_regret, rrr_table
from agents.pipeline import MultiStagePipeline, Source
from retrieval.metrics import rrr_at_k, weighted_rrr_at_k
from simenv.history import take_obs
from simenv.types import obs_users
from tests.agents.helpers import MatrixGenerator, MatrixRanker, env_obs, small_world, top_rows


@pytest.fixture(scope="module")
def world():
    return small_world(0)


@pytest.fixture(scope="module")
def obs(world):
    cfg, w = world
    return env_obs(w, cfg, 120, seed=6)


@pytest.fixture(scope="module")
def ranker(world):
    _, w = world
    rng = np.random.default_rng(21)
    return MatrixRanker(rng.normal(size=(w.n_users, w.n_items)), w.items.release_time)


# ------------------------------------------------------------------------ noise


def test_pair_noise_is_a_fixed_standard_normal_function():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 10**6, 200_000), rng.integers(0, 10**6, 200_000)
    z = pair_noise(users, items, 3)
    assert z.shape == (200_000,) and np.isfinite(z).all()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # elementwise: the value of a pair does not depend on the batch it is computed in
    # (bitwise: an integer hash, then scipy's scalar ndtri applied to each element alone)
    perm = rng.permutation(200_000)
    np.testing.assert_array_equal(pair_noise(users[perm], items[perm], 3), z[perm])
    np.testing.assert_array_equal(pair_noise(users[:7, None], items[None, :5], 3).shape, (7, 5))
    assert (
        pair_noise(np.array([5]), np.array([9]), 3)[0]
        == pair_noise(np.array([5, 1]), np.array([9, 2]), 3)[0]
    )
    # other seeds and swapped roles give other (uncorrelated) numbers
    other = pair_noise(users, items, 4)
    assert abs(np.corrcoef(z, other)[0, 1]) < 0.01
    assert abs(np.corrcoef(z, pair_noise(items, users, 3))[0, 1]) < 0.01


def test_noisy_ranker_fixed_error_and_consistent_paths(world, obs, ranker):
    _, w = world
    noisy = NoisyRanker(ranker, 1.5, seed=7)
    full = noisy.score_all(obs)
    np.testing.assert_array_equal(full, noisy.score_all(obs))  # the same scores twice
    np.testing.assert_array_equal(full, NoisyRanker(ranker, 1.5, seed=7).score_all(obs))
    other = NoisyRanker(ranker, 1.5, seed=8).score_all(obs)
    fin = np.isfinite(full)
    assert np.array_equal(fin, np.isfinite(ranker.score_all(obs)))
    assert (full[fin] != other[fin]).mean() > 0.99
    # the error added is sigma * pair_noise(user, item, seed)
    users = np.broadcast_to(obs_users(obs)[:, None], full.shape)
    items = np.broadcast_to(np.arange(w.n_items)[None, :], full.shape)
    expected = ranker.score_all(obs) + 1.5 * pair_noise(users, items, 7)
    np.testing.assert_allclose(full[fin], expected[fin], rtol=1e-6)
    # score == score_all gathered (bitwise: MatrixRanker gathers from one matrix and the
    # noise is elementwise; correctly rounded adds), -inf on padding and unreleased items
    cand = np.random.default_rng(1).integers(-1, w.n_items, size=(len(full), 30))
    s = noisy.score(obs, cand)
    gathered = np.take_along_axis(full, np.maximum(cand, 0), axis=1)
    np.testing.assert_array_equal(s, np.where(cand >= 0, gathered, -np.inf))
    # top_k over the catalog and over candidates
    ids, sc = noisy.top_k(obs, 12)
    np.testing.assert_array_equal((ids, sc), top_rows(full, 12))
    cid, csc = noisy.top_k(obs, 4, candidates=cand)
    ref_idx, ref_s = top_rows(s, 4)
    np.testing.assert_array_equal(csc, ref_s)
    np.testing.assert_array_equal(cid, np.take_along_axis(cand, np.maximum(ref_idx, 0), axis=1))


def test_noisy_ranker_with_sigma_zero_is_the_base_ranker(obs, ranker):
    noisy = NoisyRanker(ranker, 0.0, seed=3)
    np.testing.assert_array_equal(noisy.score_all(obs), ranker.score_all(obs))
    cand = ranker.top_k(obs, 20)[0]
    cand[:, -1] = -1
    np.testing.assert_array_equal(noisy.score(obs, cand), ranker.score(obs, cand))
    np.testing.assert_array_equal(noisy.top_k(obs, 5)[0], ranker.top_k(obs, 5)[0])


def test_noisy_ranker_rejects_negative_sigma(ranker):
    with pytest.raises(ValueError, match="sigma must be >= 0, got -0.1"):
        NoisyRanker(ranker, -0.1)


# ------------------------------------------------------------------------ RRR table


def test_rrr_table_matches_metrics(world, obs, ranker):
    _, w = world
    gen = MatrixGenerator(
        np.random.default_rng(4).normal(size=(w.n_users, w.n_items)), w.items.release_time
    )
    r_k, _ = ranker.top_k(obs, 10)
    table = rrr_table(gen, r_k, obs, ks=(20, 100))
    ids, _ = gen.retrieve(obs, 100, exclude_seen=False)
    for k in (20, 100):
        assert table[f"rrr@{k}"] == pytest.approx(rrr_at_k(ids[:, :k], r_k).mean())
        assert table[f"wrrr@{k}"] == pytest.approx(weighted_rrr_at_k(ids[:, :k], r_k).mean())
    assert 0 < table["rrr@20"] < table["rrr@100"] < 1
    # the ranker as its own generator: everything it likes is retrieved
    as_gen = MatrixGenerator(ranker.s, w.items.release_time)
    own = rrr_table(as_gen, r_k, obs, ks=(10, 50))
    assert own == {"rrr@10": 1.0, "wrrr@10": 1.0, "rrr@50": 1.0, "wrrr@50": 1.0}


# ------------------------------------------------------------------------ regret


def test_pipeline_regret_is_one_when_candidates_hold_the_single_stage_slate(world, obs, ranker):
    cfg, w = world
    noise = np.random.default_rng(0).normal(size=ranker.s.shape) * 0.01
    gen = MatrixGenerator(ranker.s + noise, w.items.release_time)  # nearly the ranker's order
    pipe = MultiStagePipeline([Source(gen, 100)], ranker, cfg.slate_size)
    g, _ = gen.retrieve(obs, 100, exclude_seen=False)
    r_k, _ = ranker.top_k(obs, cfg.slate_size)
    assert ((g[:, :, None] == r_k[:, None, :]).any(axis=1)).all()  # G_K holds R_k
    out = pipeline_regret(pipe, ranker, obs, w)
    assert out == {"score_ratio": 1.0, "affinity_ratio": 1.0, "served_in_single_stage": 1.0}


def test_pipeline_regret_hand_computation_when_candidates_miss_the_slate(world, obs, ranker):
    cfg, w = world
    k = cfg.slate_size
    obs = take_obs(obs, np.unique(obs_users(obs), return_index=True)[1])  # one row per user
    # candidates: the ranker's items ranked k+1 .. k+30 (never its top-k)
    order, _ = ranker.top_k(obs, k + 30)
    avoid = np.full(ranker.s.shape, -1e9)
    users = obs_users(obs)
    for row, u in enumerate(users):  # a fixed score matrix for the fake generator
        avoid[u, order[row, k:]] = -np.arange(30)
    gen = MatrixGenerator(avoid, w.items.release_time)
    pipe = MultiStagePipeline([Source(gen, 30)], ranker, k)
    out = pipeline_regret(pipe, ranker, obs, w)
    served, single = order[:, k : 2 * k], order[:, :k]  # greedy picks the best k of the rest
    s_served, s_single = ranker.score(obs, served), ranker.score(obs, single)
    low = np.minimum(s_served.min(1), s_single.min(1))[:, None]
    ratio = (s_served - low).sum(1) / (s_single - low).sum(1)
    aff = w.affinity(users, served).sum() / w.affinity(users, single).sum()
    assert out["served_in_single_stage"] == 0.0
    assert out["score_ratio"] == pytest.approx(ratio.mean(), rel=1e-6)
    assert out["affinity_ratio"] == pytest.approx(aff, rel=1e-6)
    assert out["score_ratio"] < 1.0
    # single_stage_slates given explicitly: the same answer
    again = pipeline_regret(pipe, ranker, obs, w, single_stage_slates=single)
    assert again == pytest.approx(out)
