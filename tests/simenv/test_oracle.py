"""Ground truth for oracles: the expected reward of a slate (Simulator.expected_reward) against a
Monte Carlo estimate from the simulator itself, and the greedy expected-reward build against
its definition."""

from __future__ import annotations

import numpy as np
import pytest

from simenv import EnvConfig, RewardConfig, UserModelConfig, World, WorldConfig
from simenv.clock import released
from simenv.core import Simulator
from simenv.streams import seed_key
from simenv.users import position_bias

# every term of the reward mix weighs in, each with its own weight
MIX = RewardConfig(click=1.0, like=2.0, dislike=-3.0, watch=0.2)


def _sim(n, um, seed=0, users=None):
    cfg = EnvConfig.small(user_model=um, reward=MIX)
    world = World(WorldConfig.small(), seed=0, user_model=um)
    sim = Simulator(world, cfg, n)
    sim.seed_streams(seed_key(seed))
    sim.reset_slots(np.arange(n), np.arange(n) if users is None else users)
    return world, sim


def _lived_in(n, um):
    """n slots after 15 utility-oracle steps: drifted preferences, fatigue, later clocks."""
    world, sim = _sim(n, um)
    for _ in range(15):
        sim.step(sim.best_slates()[0])
    assert sim.current_fatigue().max() > 0.5
    return world, sim


@pytest.mark.parametrize("watch_noise", [0.5, 0.0])
def test_expected_reward_matches_monte_carlo(watch_noise):
    um = UserModelConfig(watch_noise=watch_noise)
    world, src = _lived_in(6, um)
    rng = np.random.default_rng(1)
    pool = np.nonzero(released(world.items.release_time, 0.0))[0]
    slates = [
        src.best_slates()[0],
        src.best_slates(kind="expected_reward")[0],
        # random slates of the user's own group (other-group items are never clicked)
        np.stack(
            [
                rng.choice(pool[world.items.group[pool] == g], src.k, replace=False)
                for g in src.group
            ]
        ),
    ]
    exact = np.stack([src.expected_reward(s) for s in slates], axis=1)  # (6, 3)
    # Monte Carlo: every (slot, slate) pair replicated n times in a fresh simulator with the
    # source slot's state, stepped once; each copy has its own random stream
    n = 3_000
    src_row = np.repeat(np.arange(6), 3 * n)  # (6 * 3 * n,) source slot of each copy
    _, mc = _sim(src_row.size, um, seed=2, users=src.user[src_row])
    for name in ("pref", "fatigue", "fat_ref", "time", "budget"):
        getattr(mc, name)[:] = getattr(src, name)[src_row]
    shown = np.concatenate([np.repeat(s[:, None, :], n, axis=1) for s in slates], axis=1)
    res = mc.step(shown.reshape(-1, src.k))  # slot-major, then slate, then copy
    r = res.reward.astype(np.float64).reshape(6, 3, n)
    est, se = r.mean(axis=2), r.std(axis=2, ddof=1) / np.sqrt(n)
    assert se.min() > 0
    z = (est - exact) / se
    assert np.abs(z).max() < 4.5, (exact, est, z)
    assert exact.std() > 0.1  # the slates differ in value: the check has power


def test_greedy_expected_reward_build_follows_its_definition():
    world, sim = _lived_in(6, UserModelConfig())
    items, value = sim.best_slates(kind="expected_reward")
    k = sim.k
    assert items.shape == (6, k) and value.shape == (6, k)
    for b in range(6):
        assert len(set(items[b].tolist())) == k
    # the build scores the catalog with one (B, d) x (d, N) product, expected_reward the slate
    # with its own: float32 utilities differ in the last bits, exp() carries that relative
    # error (about 1e-7 x |u| <= 1e-6) into the value
    np.testing.assert_allclose(value[:, -1], sim.expected_reward(items), rtol=1e-5)
    sim.validate(items)  # released, distinct, in range
    # brute force in float64: at each position the chosen item maximises the prefix's expected
    # reward (an item of another group, never clicked, keeps it unchanged); the build scores
    # in float32, so values agree to float32 rounding (relative 1e-5 allows |u| up to ~50)
    all_items = np.arange(world.n_items)
    u = sim.true_utility(all_items).astype(np.float64)  # (B, N)
    g = sim.click_reward(all_items)  # (B, N)
    pos = position_bias(sim.um, k).astype(np.float64)
    ok = released(world.items.release_time[None, :], sim.time[:, None])
    e0 = np.exp(sim.um.no_click_utility)
    for b in range(6):
        num, den = 0.0, e0
        allowed = ok[b].copy()
        for j in range(k):
            w = np.exp(u[b] + pos[j])
            val = np.where(allowed, (num + w * g[b]) / (den + w), -np.inf)
            assert val[items[b, j]] == pytest.approx(val.max(), rel=1e-5)
            i = items[b, j]
            num, den = num + w[i] * g[b, i], den + w[i]
            allowed[i] = False
            assert value[b, j] == pytest.approx(num / den, rel=1e-5)
    # it earns more expected reward than the utility oracle here (dislikes cost 3)
    assert value[:, -1].mean() > sim.expected_reward(sim.best_slates()[0]).mean()


def test_click_reward_closed_form_edge_cases():
    # no noise and thresholds at the ends: deterministic events; like_probability halves likes
    um = UserModelConfig(watch_noise=0.0, like_threshold=1.0, dislike_threshold=0.0)
    _, sim = _sim(3, um)
    items = np.arange(10)
    np.testing.assert_allclose(sim.click_reward(items), MIX.click + MIX.watch * _watch(sim, items))
    with pytest.raises(ValueError, match="kind"):
        sim.best_slates(kind="reward")


def _watch(sim, items):
    um = sim.um
    match = sim.pref.astype(np.float64) @ sim.latent[items].T.astype(np.float64)
    mu = um.watch_sharpness * (match - um.watch_offset) + 0.5 * sim.quality[items]
    mu -= sim.current_fatigue()[:, sim.item_topic[items]]
    return 1.0 / (1.0 + np.exp(-mu)) * sim.minutes[items]
