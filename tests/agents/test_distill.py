"""Distillation of the generator toward the ranker (agents.distill).

Each loss is checked against a hand computation on a tiny pool (KL of the teacher softmax
and the student log-softmax; mean softplus over (top-k, rest) pairs; MSE; sampled softmax
with the teacher's picks as positives and its other picks masked as accidental hits);
``teacher_targets`` against the ranker it queries; and a short KL training raises the
recall relative to a fixed fake ranker of a tiny two-tower generator.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.base import RandomAgent
from agents.consistency import rrr_table
from agents.distill import DistillConfig, DistillObjective, TeacherTargets, teacher_targets
from retrieval.losses import NegativeSamplerConfig, RetrievalLossConfig
from retrieval.model import TwoTowerConfig, TwoTowerGenerator, TwoTowerModel
from retrieval.similarity import SimilarityConfig
from retrieval.towers import ItemTowerConfig, UserTowerConfig
from retrieval.train import TrainConfig, fit_two_tower, to_torch_obs
from simenv import BatchedRecEnv
from simenv.collect import collect
from simenv.history import EventSequences, impression_examples, take_obs
from simenv.types import Obs, obs_users
from tests.agents.helpers import MatrixRanker, env_obs, released, small_world, truth_scores
from tests.numerics import TEST_THREADS


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    return small_world(0)


@pytest.fixture(scope="module")
def obs(world):
    cfg, w = world
    return env_obs(w, cfg, 40, seed=1)


def _model(world_catalog, seed=0, sim=None):
    cfg = TwoTowerConfig(
        item=ItemTowerConfig(kind="id", dim=8, seed=seed),
        user=UserTowerConfig(kind="mean"),
        similarity=sim or SimilarityConfig(kind="dot", temperature=None),
    )
    return TwoTowerModel.build(cfg, world_catalog)


def _tiny_targets(obs, n_items, seed=0, pool_width=7):
    """Pools with padding and a -inf score, teacher scores random."""
    rng = np.random.default_rng(seed)
    q = obs[Obs.ITEMS].shape[0]
    pool = np.stack([rng.choice(n_items, size=pool_width, replace=False) for _ in range(q)])
    pool[1, 5] = -1
    pool[3, 6] = -1
    scores = rng.normal(size=pool.shape).astype(np.float32) * 2
    scores[pool < 0] = -np.inf
    scores[4, 6] = -np.inf  # e.g. an unreleased uniform extra: not a valid pool entry
    return TeacherTargets(obs, pool, scores, pool[:, :2].copy())


def _student_logits(model, obs, pool):
    """Dot products u . v of the raw towers (the model's similarity is a plain dot, tau = 1)."""
    with torch.no_grad():
        u = model.user_vectors(to_torch_obs(obs)).double().numpy()  # (Q, d)
        v = model.item_vectors(torch.from_numpy(np.maximum(pool, 0))).double().numpy()  # (Q, P, d)
    return np.einsum("qd,qpd->qp", u, v)


def _call(loss, targets, model, **cfg_kw):
    cfg = DistillConfig(
        loss=loss, teacher_k=2, pool_size=7, uniform_extra=3, batch_size=len(targets), **cfg_kw
    )
    obj = DistillObjective(targets, cfg, model)
    with torch.no_grad():
        return float(obj(model, np.random.default_rng(0), torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(loss="l2"), "loss must be one of"),
        (dict(weight=1.5), r"weight must be in \[0, 1\], got 1.5"),
        (dict(teacher_k=0), "teacher_k must be an integer >= 1, got 0"),
        (dict(pool_size=10, uniform_extra=10), r"uniform_extra must be in \[0, pool_size=10\)"),
        (dict(pool_size=20, uniform_extra=15, teacher_k=6), "teacher_k must be <= pool_size"),
        (dict(teacher_temperature=0.0), "teacher_temperature must be > 0, got 0.0"),
        (dict(max_queries=0), "max_queries must be an integer >= 1, got 0"),
    ],
)
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DistillConfig(**kw)


# ------------------------------------------------------------------------ losses by hand


def test_kl_equals_hand_computation(world, obs):
    _, w = world
    model = _model(w.catalog)
    t = _tiny_targets(obs, w.n_items)
    tau_r = 0.7
    got = _call("kl", t, model, teacher_temperature=tau_r)
    logits = _student_logits(model, obs, t.pool)
    per_row = []
    for q in range(len(t)):
        ok = (t.pool[q] >= 0) & np.isfinite(t.pool_scores[q])
        a = t.pool_scores[q][ok].astype(np.float64) / tau_r
        p = np.exp(a - a.max())
        p /= p.sum()  # teacher softmax
        b = logits[q][ok]
        log_s = b - b.max() - np.log(np.exp(b - b.max()).sum())  # student log-softmax
        per_row.append(np.sum(p * (np.log(p) - log_s)))
    assert got == pytest.approx(np.mean(per_row), rel=1e-5)
    assert got > 0


def test_pairwise_equals_mean_softplus_over_topk_rest_pairs(world, obs):
    _, w = world
    model = _model(w.catalog)
    t = _tiny_targets(obs, w.n_items)
    got = _call("pairwise", t, model)
    logits = _student_logits(model, obs, t.pool)
    terms = []
    for q in range(len(t)):
        ok = (t.pool[q] >= 0) & np.isfinite(t.pool_scores[q])
        for i in range(2):  # the teacher's top-2 ...
            for j in range(2, t.pool.shape[1]):  # ... above the rest of the pool
                if ok[i] and ok[j]:
                    terms.append(np.log1p(np.exp(-(logits[q, i] - logits[q, j]))))
    assert len(terms) == len(t) * 2 * 5 - 2 * 3  # three invalid entries, each in 2 pairs
    assert got == pytest.approx(np.mean(terms), rel=1e-5)


def test_mse_equals_formula(world, obs):
    _, w = world
    model = _model(w.catalog)
    t = _tiny_targets(obs, w.n_items)
    got = _call("mse", t, model)
    logits = _student_logits(model, obs, t.pool)
    ok = (t.pool >= 0) & np.isfinite(t.pool_scores)
    expected = np.sum((logits[ok] - t.pool_scores[ok]) ** 2) / ok.sum()
    assert got == pytest.approx(expected, rel=1e-5)


def test_softmax_uses_teacher_picks_as_positives_and_masks_the_other_picks(world, obs):
    _, w = world
    model = _model(w.catalog)
    rng = np.random.default_rng(3)
    q = len(obs[Obs.ITEMS])
    top = np.stack([rng.choice(w.n_items, size=3, replace=False) for _ in range(q)])
    top[:6] = top[0]  # six queries share their picks: in-batch negatives among them are hits
    top[7, 2] = -1
    pool = np.concatenate([top, rng.integers(w.n_items, size=(q, 2))], axis=1)
    t = TeacherTargets(obs, pool, np.zeros(pool.shape, np.float32), top)
    neg = NegativeSamplerConfig(in_batch=True, uniform=0, logq="none")
    cfg = DistillConfig(
        loss="softmax", teacher_k=3, pool_size=5, uniform_extra=2, batch_size=q, negatives=neg
    )
    obj = DistillObjective(t, cfg, model)
    with torch.no_grad():
        got = float(obj(model, np.random.default_rng(5), torch.Generator().manual_seed(0)))
    # replay the objective's draws: the batch's rows, then one pick per row among its top
    rng2 = np.random.default_rng(5)
    rows = rng2.choice(q, size=q, replace=False)
    pick = rng2.integers(3, size=q)
    pos = top[rows, pick]
    keep = pos >= 0
    rows, pos = rows[keep], pos[keep]
    with torch.no_grad():
        u = model.user_vectors(to_torch_obs(take_obs(obs, rows))).double().numpy()
        v = model.item_vectors(torch.from_numpy(pos)).double().numpy()
    s = u @ v.T  # (b, b): row i against every row's positive
    losses = []
    for i in range(len(rows)):
        negatives = [j for j in range(len(rows)) if pos[j] not in set(top[rows[i]].tolist())]
        terms = np.concatenate([[s[i, i]], s[i, negatives]])
        losses.append(-s[i, i] + np.log(np.exp(terms - terms.max()).sum()) + terms.max())
    assert got == pytest.approx(np.mean(losses), rel=1e-5)
    # queries whose picks all coincide: every in-batch negative is an accidental hit
    same = TeacherTargets(
        take_obs(obs, np.arange(6)), pool[:6], np.zeros((6, 5), np.float32), top[:6]
    )
    cfg6 = DistillConfig(
        loss="softmax", teacher_k=3, pool_size=5, uniform_extra=2, batch_size=6, negatives=neg
    )
    with torch.no_grad():
        zero = DistillObjective(same, cfg6, model)(
            model, np.random.default_rng(0), torch.Generator().manual_seed(0)
        )
    assert float(zero) == pytest.approx(0.0, abs=1e-6)


def test_losses_have_gradients(world, obs):
    _, w = world
    model = _model(w.catalog)
    t = _tiny_targets(obs, w.n_items)
    for loss in ("kl", "pairwise", "mse"):
        model.zero_grad()
        cfg = DistillConfig(loss=loss, teacher_k=2, pool_size=7, uniform_extra=3, batch_size=8)
        val = DistillObjective(t, cfg, model)(
            model, np.random.default_rng(0), torch.Generator().manual_seed(0)
        )
        assert torch.isfinite(val)
        val.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads)


# ------------------------------------------------------------------------ teacher targets


def test_teacher_targets_pool_top_then_uniform_released(world):
    cfg, w = world
    o = env_obs(w, cfg, 300, seed=4, steps=1)
    rng = np.random.default_rng(0)
    ranker = MatrixRanker(rng.normal(size=(w.n_users, w.n_items)), w.items.release_time)
    dcfg = DistillConfig(pool_size=40, uniform_extra=25, teacher_k=5)
    t = teacher_targets(ranker, o, w.items.release_time, dcfg, np.random.default_rng(1), chunk=64)
    assert len(t) == 300 and t.pool.shape == (300, 40) and t.pool_scores.dtype == np.float32
    top15, top_s = ranker.top_k(o, 15)
    np.testing.assert_array_equal(t.pool[:, :15], top15)
    np.testing.assert_array_equal(t.pool_scores[:, :15], top_s)
    np.testing.assert_array_equal(t.top, top15[:, :5])
    extra = t.pool[:, 15:]
    ok = released(w.items.release_time, o)
    real = extra >= 0
    assert real.mean() > 0.75  # only unreleased or repeated draws are dropped
    rows = np.nonzero(real)[0]
    assert ok[rows, extra[real]].all()
    assert not (extra[:, :, None] == top15[:, None, :]).any(axis=2)[real].any()
    # no item twice in a pool (uniform draws that repeat an earlier draw are dropped)
    srt = np.sort(t.pool, axis=1)
    assert not ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()
    # the scores are the ranker's, finite exactly on the real entries
    np.testing.assert_array_equal(t.pool_scores, ranker.score(o, t.pool))
    assert np.array_equal(np.isfinite(t.pool_scores), t.pool >= 0)
    # the uniform part spreads over the released catalog (not the ranker's favourites)
    assert len(np.unique(extra[real])) > 0.8 * ok.any(axis=0).sum()
    # same rng seed, same targets
    t2 = teacher_targets(ranker, o, w.items.release_time, dcfg, np.random.default_rng(1), chunk=64)
    np.testing.assert_array_equal(t2.pool, t.pool)


def test_teacher_targets_subsamples_max_queries(world, obs):
    _, w = world
    ranker = MatrixRanker(
        np.random.default_rng(0).normal(size=(w.n_users, w.n_items)), w.items.release_time
    )
    dcfg = DistillConfig(pool_size=12, uniform_extra=2, teacher_k=3, max_queries=15)
    t = teacher_targets(ranker, obs, w.items.release_time, dcfg, np.random.default_rng(2))
    assert len(t) == 15 and t.obs[Obs.ITEMS].shape[0] == 15
    users = obs_users(t.obs)
    assert np.isin(users, obs_users(obs)).all() and len(np.unique(users)) == 15
    np.testing.assert_array_equal(t.pool[:, :10], ranker.top_k(t.obs, 10)[0])


# ------------------------------------------------------------------------ learning


def test_kl_distillation_raises_recall_relative_to_the_ranker(world):
    """A short KL training moves a tiny generator toward a fixed fake ranker (truth scores)."""
    cfg, w = world
    env = BatchedRecEnv(64, cfg, world=w)
    log = collect(env, RandomAgent(w, cfg.slate_size, seed=0), n_users=100, seed=0, progress=False)
    seq = EventSequences.from_log(log, w.n_items)
    queries = impression_examples(log, seq, cfg.history_length).obs
    ranker = MatrixRanker(truth_scores(w), w.items.release_time)
    ev = env_obs(w, cfg, 200, seed=5, steps=10)
    r_top, _ = ranker.top_k(ev, 10)
    model = _model(w.catalog, sim=SimilarityConfig(kind="cosine", temperature=0.1))
    gen = TwoTowerGenerator(model, w.catalog)
    before = rrr_table(gen, r_top, ev, ks=(50,))["rrr@50"]
    dcfg = DistillConfig(loss="kl", pool_size=100, uniform_extra=50, batch_size=128)
    targets = teacher_targets(ranker, queries, w.items.release_time, dcfg, np.random.default_rng(0))
    fit_two_tower(
        model,
        RetrievalLossConfig(kind="sampled_softmax", negatives=NegativeSamplerConfig(in_batch=True)),
        log, seq,
        TrainConfig(epochs=6, lr=0.03, batch_size=128, history_length=cfg.history_length,
                    max_examples_per_epoch=128 * 40, patience=0, progress=False, seed=0),
        extra=DistillObjective(targets, dcfg, model), extra_weight=1.0,
    )  # fmt: skip
    gen.refresh()
    after = rrr_table(gen, r_top, ev, ks=(50,))["rrr@50"]
    assert before < 0.25
    assert after > before + 0.2, (before, after)
