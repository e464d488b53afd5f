"""agents.ope: the simulator's truth, the target policies' probabilities, the estimators."""

import numpy as np
import pytest

from agents.base import PopularAgent
from agents.ope import (
    ClickModel,
    DeterministicTarget,
    EpsilonGreedyTarget,
    OPEData,
    PopularityTarget,
    TruthRecorder,
    UniformTarget,
    estimate,
    estimate_by_chunk,
    slate_click_probabilities,
)
from simenv import BatchedRecEnv, EnvConfig, PopularityPolicy, collect

CFG = EnvConfig.small()


def test_slate_click_probabilities_are_the_env_choice_probabilities():
    env = BatchedRecEnv(64, CFG)
    env.reset(seed=0)
    pol = PopularityPolicy(env.world, CFG.slate_size, epsilon=0.5, seed=0)
    obs = env.sim.observation()
    for _ in range(5):
        slates, _ = pol.act(obs)
        p = slate_click_probabilities(env, slates)
        obs, _, _, _, info = env.step(slates)
        active = info["_clicked_position"]
        # float32 in the env, float64 here: a float32 tolerance
        np.testing.assert_allclose(p[active], info["click_prob"][active], rtol=1e-5, atol=1e-6)


def test_target_conditionals():
    env = BatchedRecEnv(50, CFG)
    obs, _ = env.reset(seed=1)
    w = env.world
    k = CFG.slate_size
    pop = PopularAgent(w.items.popularity.astype(float), w.catalog.release_time, k)  # (a test)
    det = DeterministicTarget(pop, "popular")
    mine = det.draw(obs)
    other = mine.copy()
    other[:, 2] = mine[:, 4]
    other[:, 4] = mine[:, 2]
    assert det.conditional(obs, mine).tolist() == np.ones((50, k)).tolist()
    assert det.conditional(obs, other)[:, :2].all() and not det.conditional(obs, other)[:, 2:].any()
    uni = UniformTarget(w.catalog.release_time, k, seed=0)
    s = uni.draw(obs)
    n_rel = (w.catalog.release_time[None, :] <= obs["context"][:, :1]).sum(axis=1)
    np.testing.assert_allclose(uni.conditional(obs, s)[:, 0], 1.0 / n_rel)
    # epsilon-greedy: the best item leads w.p. 1 - eps + eps / N_released, and the draws agree
    eps = 0.3
    eg = EpsilonGreedyTarget(w.items.popularity, w.catalog.release_time, k, eps, seed=0)
    draws = np.concatenate([eg.draw(obs) for _ in range(40)])
    best = np.tile(mine[:, 0], 40)
    p_best = np.tile(eg.conditional(obs, mine)[:, 0], 40)
    np.testing.assert_allclose(p_best, 1 - eps + eps / np.tile(n_rel, 40))
    freq = (draws[:, 0] == best).mean()
    assert abs(freq - p_best.mean()) < 4 * np.sqrt(p_best.mean() * (1 - p_best.mean()) / best.size)
    assert all(len(set(r)) == k for r in draws.tolist())  # distinct


def test_popularity_target_conditionals_are_the_logging_policy_propensities():
    env = BatchedRecEnv(40, CFG)
    obs, _ = env.reset(seed=2)
    pol = PopularityPolicy(env.world, CFG.slate_size, epsilon=0.2, seed=0)
    slates, prop = pol.act(obs)
    tgt = PopularityTarget(env.world, CFG.slate_size, epsilon=0.2, seed=0)
    np.testing.assert_allclose(tgt.conditional(obs, slates), prop, rtol=1e-5)


def test_click_model_recovers_a_logistic_model():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(20_000, 3))
    a, b = np.array([-1.0, -1.5, -2.0]), np.array([1.0, 0.5, 2.0])
    y = rng.random(s.shape) < 1 / (1 + np.exp(-(a + b * s)))
    m = ClickModel(None, 3).fit(s, y)
    # the model standardises the scores first; undo it to compare the parameters
    beta = m.beta / m._sd
    alpha = m.alpha - m.beta * m._mu / m._sd
    np.testing.assert_allclose(alpha, a, atol=0.1)
    np.testing.assert_allclose(beta, b, atol=0.1)


def _synthetic(n=4000, k=3, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.uniform(0.2, 0.6, size=(n, k))
    pi = rng.uniform(0.1, 0.9, size=(n, k))
    clicks = (rng.random((n, k)) < 0.3).astype(float)
    return OPEData(
        names=["t"], user=np.arange(n), session_key=np.arange(n), clicks=clicks, behaviour=mu,
        target=pi[None], truth=np.zeros((1, n)), dm=np.full((1, n), 0.5),
        q_logged=np.full((n, k), 0.2), behaviour_truth=np.zeros(n),
    )  # fmt: skip


def test_estimators_by_hand_and_by_chunk():
    d = _synthetic()
    w = np.cumprod(d.target[0] / d.behaviour, axis=1)
    r = d.clicks.sum(axis=1)
    est = estimate(d, 0)
    np.testing.assert_allclose(est["ips"]["value"], np.mean(w[:, -1] * r))
    np.testing.assert_allclose(est["snips"]["value"], np.sum(w[:, -1] * r) / np.sum(w[:, -1]))
    np.testing.assert_allclose(est["cascade"]["value"], np.mean((w * d.clicks).sum(1)))
    np.testing.assert_allclose(est["dm"]["value"], 0.5)
    np.testing.assert_allclose(est["dr"]["value"], 0.5 + np.mean((w * (d.clicks - 0.2)).sum(1)))
    chunk = np.arange(len(d)) % 4
    by = estimate_by_chunk(d, 0, chunk, 4)
    for c in range(4):
        sub = _synthetic()
        keep = chunk == c
        for f in ("clicks", "behaviour", "q_logged"):
            setattr(sub, f, getattr(d, f)[keep])
        sub.target, sub.dm = d.target[:, keep], d.dm[:, keep]
        for name, v in estimate(sub, 0).items():
            np.testing.assert_allclose(by[name][c], v["value"], rtol=1e-12)


def test_recorded_truth_and_unbiased_estimates_on_the_simulator():
    env = BatchedRecEnv(300, CFG)
    w = env.world
    k = CFG.slate_size
    behaviour = PopularityPolicy(w, k, epsilon=0.5, seed=3)
    same = PopularityTarget(w, k, epsilon=0.2, seed=4)
    uni = UniformTarget(w.catalog.release_time, k, seed=5)
    rec = TruthRecorder(env, behaviour, [same, uni], n_draws=2)
    log = collect(env, rec, n_users=300, seed=2, progress=False)
    data = rec.data(log)
    assert len(data) == log.columns["request"].max() + 1
    # on-policy sanity: the behaviour's own truth matches its observed clicks
    assert abs(data.behaviour_truth.mean() - data.clicks.sum(1).mean()) < 4 * data.clicks.sum(
        1
    ).std() / np.sqrt(len(data))
    for t in range(2):
        est = estimate(data, t)
        truth = data.truth[t].mean()
        # slate IPS is unbiased without assumptions: within 4 standard errors of the truth
        assert abs(est["ips"]["value"] - truth) < 4 * est["ips"]["se"] + 1e-3, (t, est, truth)


def test_recorder_rejects_a_foreign_log():
    env = BatchedRecEnv(10, CFG)
    rec = TruthRecorder(env, PopularityPolicy(env.world, CFG.slate_size, 0.5, 0), [])
    other = collect(
        env, PopularityPolicy(env.world, CFG.slate_size, 0.5, 1), 10, seed=9, progress=False
    )
    with pytest.raises(ValueError, match="do not cover"):
        rec.data(other)
