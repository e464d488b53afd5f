"""The two-agent environment and its single-agent views (agents.multiagent).

Phase order (generator, then ranker), shared rewards equal to the user's, errors for the
wrong agent and bad actions (ValueError naming the argument, state unchanged), gymnasium's
``check_env`` for RankerEnv and GeneratorEnv, and a RankerEnv episode equal to driving the
two-agent env by hand.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from agents.multiagent import GeneratorEnv, RankerEnv, TwoAgentRecEnv
from simenv import RecEnv
from tests.agents.helpers import MatrixGenerator, MatrixRanker, small_world

K = 20


@pytest.fixture(scope="module")
def world():
    return small_world(0)


@pytest.fixture(scope="module")
def fakes(world):
    _, w = world
    rng = np.random.default_rng(0)
    gen = MatrixGenerator(rng.normal(size=(w.n_users, w.n_items)), w.items.release_time)
    ranker = MatrixRanker(rng.normal(size=(w.n_users, w.n_items)), w.items.release_time)
    return gen, ranker


def _batch(obs):
    return {k: np.asarray(v)[None, ...] for k, v in obs.items()}


def _assert_obs_equal(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_phase_order_and_shared_rewards(world, fakes):
    cfg, w = world
    gen, _ = fakes
    two = TwoAgentRecEnv(RecEnv(cfg, world=w), K)
    ref = RecEnv(cfg, world=w)  # the same user, driven directly
    obs, infos = two.reset(seed=4)
    ref_obs, ref_info = ref.reset(seed=4)
    assert list(obs) == ["generator"] and two.agent_selection == "generator"
    _assert_obs_equal(obs["generator"], ref_obs)
    assert infos["generator"]["user"] == ref_info["user"]
    rng = np.random.default_rng(1)
    slates = 0
    for _ in range(30):
        cand = gen.retrieve(_batch(obs["generator"]), K, exclude_seen=False)[0][0]
        out, rew, term, trunc, info = two.step({"generator": cand})
        assert list(out) == ["ranker"] and two.agent_selection == "ranker"
        np.testing.assert_array_equal(out["ranker"]["candidates"], cand)
        _assert_obs_equal(out["ranker"]["user"], obs["generator"])
        assert rew == {"generator": 0.0, "ranker": 0.0}
        assert not any(term.values()) and not any(trunc.values()) and info == {}
        pos = rng.choice(K, size=cfg.slate_size, replace=False)
        obs, rew, term, trunc, info = two.step({"ranker": pos})
        ref_obs, ref_r, ref_term, ref_trunc, ref_info = ref.step(cand[pos])
        slates += 1
        assert list(obs) == ["generator"] and two.agent_selection == "generator"
        _assert_obs_equal(obs["generator"], ref_obs)
        assert rew == {"generator": ref_r, "ranker": ref_r}  # one shared reward
        assert term == {"generator": ref_term, "ranker": ref_term}
        assert trunc == {"generator": ref_trunc, "ranker": ref_trunc}
        np.testing.assert_array_equal(info["ranker"]["affinity"], ref_info["affinity"])
        if ref_term or ref_trunc:
            break
    assert slates > 1


def test_wrong_agent_and_bad_actions_raise_and_change_nothing(world):
    cfg, w = world
    env = RecEnv(cfg, world=w)
    two = TwoAgentRecEnv(env, K)
    with pytest.raises(RuntimeError, match="Call reset before using step method"):
        two.step({"generator": np.arange(K)})
    obs, _ = two.reset(seed=0)
    t = float(env.sim.time[0])
    pool = np.nonzero(w.items.release_time <= t)[0]
    late = np.nonzero(w.items.release_time > t)[0]
    good = pool[:K].astype(np.int64)
    with pytest.raises(ValueError, match="actions must hold exactly the acting agent 'generator'"):
        two.step({"ranker": np.arange(cfg.slate_size)})
    with pytest.raises(ValueError, match="actions must hold exactly the acting agent"):
        two.step({"generator": good, "ranker": np.arange(cfg.slate_size)})
    bad_sets = [
        (good[:-1], rf"generator's action must be {K} integer item ids"),
        (good.astype(np.float64), rf"generator's action must be {K} integer item ids"),
        (np.r_[good[:-1], w.n_items], r"generator action item ids must be in \[0, 499\]"),
        (np.r_[good[:-1], -2], r"generator action item ids must be in \[0, 499\]"),
        (np.r_[good[:-1], good[0]], "generator action must hold distinct item ids"),
        (np.r_[good[:-1], late[0]], f"unreleased item {late[0]}"),
    ]
    for cand, msg in bad_sets:
        with pytest.raises(ValueError, match=msg):
            two.step({"generator": cand})
        assert two.agent_selection == "generator" and float(env.sim.time[0]) == t
    out, *_ = two.step({"generator": good})
    assert two.agent_selection == "ranker"
    with pytest.raises(ValueError, match="actions must hold exactly the acting agent 'ranker'"):
        two.step({"generator": good})
    k = cfg.slate_size
    bad_pos = [
        (np.arange(k - 1), f"ranker's action must be {k} integer positions"),
        (np.arange(k) + 0.0, f"ranker's action must be {k} integer positions"),
        (np.r_[np.arange(k - 1), K], rf"{k} distinct values in \[0, {K - 1}\]"),
        (np.r_[np.arange(k - 1), -1], rf"{k} distinct values in \[0, {K - 1}\]"),
        (np.r_[np.arange(k - 1), 0], rf"{k} distinct values in \[0, {K - 1}\]"),
    ]
    for pos, msg in bad_pos:
        with pytest.raises(ValueError, match=msg):
            two.step({"ranker": pos})
        assert two.agent_selection == "ranker" and float(env.sim.time[0]) == t
    two.step({"ranker": np.arange(k)})
    assert two.agent_selection == "generator" and float(env.sim.time[0]) > t


def test_n_candidates_range(world):
    cfg, w = world
    with pytest.raises(ValueError, match=r"n_candidates must be an integer in \[5, 500\], got 4"):
        TwoAgentRecEnv(RecEnv(cfg, world=w), 4)
    with pytest.raises(ValueError, match=r"n_candidates must be an integer in \[5, 500\], got 501"):
        TwoAgentRecEnv(RecEnv(cfg, world=w), 501)
    with pytest.raises(ValueError, match="n_candidates must be an integer"):
        TwoAgentRecEnv(RecEnv(cfg, world=w), 10.0)


@pytest.mark.parametrize("which", ["ranker", "generator"])
def test_single_agent_views_pass_check_env(world, fakes, which):
    cfg, w = world
    gen, ranker = fakes
    env = (
        RankerEnv(RecEnv(cfg, world=w), gen, K)
        if which == "ranker"
        else GeneratorEnv(RecEnv(cfg, world=w), ranker, K)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env, skip_render_check=True)


def test_ranker_env_episode_equals_two_agent_env_by_hand(world, fakes):
    cfg, w = world
    gen, _ = fakes
    renv = RankerEnv(RecEnv(cfg, world=w), gen, K)
    two = TwoAgentRecEnv(RecEnv(cfg, world=w), K)
    obs, info = renv.reset(seed=9)
    renv.action_space.seed(3)
    hand, hand_info = two.reset(seed=9)
    assert info["user"] == hand_info["generator"]["user"]
    rng = np.random.default_rng(2)
    n, total = 0, 0.0
    done = False
    while not done:
        cand = gen.retrieve(_batch(hand["generator"]), K, exclude_seen=False)[0][0]
        view, *_ = two.step({"generator": cand})
        _assert_obs_equal(obs, {**hand["generator"], "candidates": view["ranker"]["candidates"]})
        assert renv.observation_space.contains(obs)
        pos = renv.action_space.sample() if n % 2 else rng.choice(K, cfg.slate_size, replace=False)
        obs, r, term, trunc, info = renv.step(pos)
        hand, rew, hterm, htrunc, hinfo = two.step({"ranker": np.asarray(pos)})
        assert r == rew["ranker"] and term == hterm["ranker"] and trunc == htrunc["ranker"]
        np.testing.assert_array_equal(info["affinity"], hinfo["ranker"]["affinity"])
        n, total, done = n + 1, total + r, term or trunc
    _assert_obs_equal({k: v for k, v in obs.items() if k != "candidates"}, hand["generator"])
    assert n >= 5 and total > 0


def test_generator_env_reward_is_that_of_the_ranker_slate(world, fakes):
    cfg, w = world
    _, ranker = fakes
    genv = GeneratorEnv(RecEnv(cfg, world=w), ranker, K)
    ref = RecEnv(cfg, world=w)
    obs, _ = genv.reset(seed=5)
    ref.reset(seed=5)
    for _ in range(15):
        cand = genv.action_space.sample()
        # the frozen ranker's best k of the proposed set, best first
        s = ranker.score(_batch(obs), cand[None, :])[0]
        slate = cand[np.argsort(-s, kind="stable")[: cfg.slate_size]]
        obs, r, term, trunc, _ = genv.step(cand)
        ref_obs, ref_r, ref_term, ref_trunc, _ = ref.step(slate)
        _assert_obs_equal(obs, ref_obs)
        assert (r, term, trunc) == (ref_r, ref_term, ref_trunc)
        if term or trunc:
            break


def test_ranker_env_needs_k_candidates(world):
    cfg, w = world

    class Short:
        def retrieve(self, obs, k, exclude_seen=True):
            ids = np.arange(k, dtype=np.int64)[None, :]
            ids[0, -1] = -1
            return ids, np.zeros(ids.shape, np.float32)

    env = RankerEnv(RecEnv(cfg, world=w), Short(), K)
    with pytest.raises(RuntimeError, match=f"fewer than K={K} candidates"):
        env.reset(seed=0)


def test_pettingzoo_adapter_without_pettingzoo_names_the_extra(monkeypatch):
    # pettingzoo hidden (a None entry in sys.modules makes its import fail) and the adapter
    # module imported afresh: the error names the extra to install
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "pettingzoo", None)
    monkeypatch.delitem(sys.modules, "agents.pettingzoo_env", raising=False)
    with pytest.raises(ImportError, match=r"needs pettingzoo.*pip install -e \.\[rl\]"):
        importlib.import_module("agents.pettingzoo_env")
    import agents.multiagent  # noqa: F401  (the project itself works without it)
