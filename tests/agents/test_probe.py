"""UtilityProbe: where served slates sit in the user's true utility, without changing the run."""

from __future__ import annotations

import numpy as np
import pytest

from agents.base import GreedyUtilityOracle, RandomAgent
from agents.probe import UtilityProbe
from agents.rollout import rollout
from simenv import BatchedRecEnv
from tests.agents.helpers import small_world


@pytest.fixture(scope="module")
def world():
    return small_world(0)


def test_the_oracle_sits_at_the_top_and_random_does_not(world):
    cfg, w = world
    env = BatchedRecEnv(16, cfg, world=w)
    oracle = UtilityProbe(GreedyUtilityOracle(env), env, exposure=np.zeros(w.n_items))
    rand = UtilityProbe(RandomAgent(w, cfg.slate_size, seed=1), env, exposure=np.ones(w.n_items))
    rollout(env, oracle, 30, seed=3)
    rollout(env, rand, 30, seed=3)
    o, r = oracle.summary(), rand.summary()
    assert o["rows"] > 30 and r["rows"] > 30 and o["unmatched"] == r["unmatched"] == 0
    assert o["oracle_overlap"] > 0.99 and o["in_group"] > 0.99
    # the oracle's k items are the top k of about reachable_items: mean percentile 1 - (k+1)/2n
    n = o["reachable_items"]  # mean per probed row
    assert o["percentile"] == pytest.approx(1 - (cfg.slate_size + 1) / (2 * n), abs=0.01)
    assert r["oracle_overlap"] < 0.1 and r["percentile"] < 0.75 and r["in_group"] < 0.6
    assert o["oracle_never_shown"] == 1.0 and o["served_never_shown"] == 1.0
    assert r["oracle_never_shown"] == 0.0 and r["served_log_impressions"] == pytest.approx(
        np.log(2)
    )


def test_probing_changes_no_outcome(world):
    cfg, w = world
    env = BatchedRecEnv(16, cfg, world=w)
    plain = rollout(env, RandomAgent(w, cfg.slate_size, seed=4), 25, seed=5)
    probe = UtilityProbe(RandomAgent(w, cfg.slate_size, seed=4), env, block=7, chunk=100)
    probed = rollout(env, probe, 25, seed=5)
    for key, v in plain.outcomes.items():
        np.testing.assert_array_equal(probed.outcomes[key], v)
    assert probe.summary()["rows"] == plain.outcomes["slates"].sum()
    assert "oracle_never_shown" not in probe.summary()


def test_bad_arguments_are_named(world):
    cfg, w = world
    env = BatchedRecEnv(4, cfg, world=w)
    agent = RandomAgent(w, cfg.slate_size)
    with pytest.raises(ValueError, match="agent must have act"):
        UtilityProbe(object(), env)
    with pytest.raises(ValueError, match="env must be a simenv.BatchedRecEnv"):
        UtilityProbe(agent, object())
    with pytest.raises(ValueError, match=r"exposure must be .* shape \(500,\)"):
        UtilityProbe(agent, env, exposure=np.zeros(3))
    with pytest.raises(ValueError, match="exposure must be finite"):
        UtilityProbe(agent, env, exposure=-np.ones(w.n_items))
    with pytest.raises(ValueError, match="block must be an integer >= 1"):
        UtilityProbe(agent, env, block=0)
