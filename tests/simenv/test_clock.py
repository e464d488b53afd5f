"""One clock (simenv.clock): the env, the logging policies and the observation agree on what
"released at time t" means, at float32 boundaries of the float64 clock."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simenv import EnvConfig, World, WorldConfig
from simenv.clock import format_time, observed_time, released
from simenv.core import Simulator
from simenv.policies import PopularityPolicy
from simenv.streams import seed_key
from simenv.types import Obs

K = 5


@pytest.fixture(scope="module")
def setup():
    """A private small world (mutated by the tests) and a one-slot simulator on it."""
    cfg = EnvConfig.small()
    world = World(WorldConfig.small(), seed=3, user_model=cfg.user_model)
    sim = Simulator(world, cfg, 1)
    sim.seed_streams(seed_key(0))
    sim.reset_slots(np.array([0]), np.array([0]))
    item = int(np.nonzero(world.items.release_time > 0)[0][0])  # a new item, its time is ours
    # the popularity policy (beta = 1) draws it first with probability about 0.98 per draw
    world.items.popularity[item] = 50 * world.items.popularity.sum()
    others = np.nonzero(world.items.release_time <= 0)[0][: K - 1]
    return world, sim, item, others


def _ulp32(x: float) -> float:
    x32 = np.float32(x)
    return float(np.nextafter(x32, np.float32(np.inf)) - x32)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    release=st.floats(min_value=0.0625, max_value=400.0, width=32),
    eighths=st.integers(min_value=-12, max_value=12),
    jitter=st.floats(min_value=-0.49, max_value=0.49),
)
def test_env_policy_and_observation_agree_on_released(setup, release, eighths, jitter):
    world, sim, item, others = setup
    r = np.float32(release)
    # a float64 clock within a few float32 ulps of the release time, off the float32 grid
    t = float(r) + (eighths + jitter) * _ulp32(float(r)) / 8
    world.items.release_time[item] = r
    sim.time[0] = t
    obs = sim.observation()
    t_obs = obs[Obs.CONTEXT][0, 0]
    assert t_obs == np.float32(t) == observed_time(t)  # the observation carries float32(clock)
    # the definition, in each dtype a consumer may use: all agree
    rule = bool(released(r, t))
    assert rule == bool(r <= t_obs) == (float(r) <= float(t_obs)) == bool(released(r, t_obs))
    assert rule == bool(world.released(t)[item])
    # the env accepts the item exactly when the observation says it is released
    slate = np.r_[item, others][None, :]
    if rule:
        sim.validate(slate)
    else:
        with pytest.raises(ValueError, match=f"unreleased item {item}"):
            sim.validate(slate)
    # a logging policy deciding from the observation shows it exactly then, and the env takes
    # every slate the policy makes
    policy = PopularityPolicy(world, K, epsilon=0.0, seed=0, beta=1.0)
    slates, _ = policy.act(obs)
    assert (item in slates[0]) == rule
    sim.validate(slates)
    # monotone: whatever the float64 clock releases, the rule releases
    if r <= t:
        assert rule


def test_the_readme_crash_case_is_accepted_and_messages_tell_times_apart(setup):
    world, sim, item, others = setup
    # the reported case: a float64 clock just below the release time that rounds up to it
    r = np.float32(8.011)
    t = float(np.nextafter(np.float64(r), -np.inf))
    assert t < float(r) and np.float32(t) == r
    world.items.release_time[item] = r
    sim.time[0] = t
    sim.validate(np.r_[item, others][None, :])  # the old check raised here
    # one float32 step earlier the item is not released; the message shows distinct times
    t2 = float(np.nextafter(r, np.float32(-np.inf)))
    sim.time[0] = t2
    with pytest.raises(ValueError, match="unreleased") as e:
        sim.validate(np.r_[item, others][None, :])
    times = re.findall(r"\d+\.\d+", str(e.value))
    assert format_time(r) in times and format_time(np.float32(t2)) in times
    assert len(set(times)) >= 2
    assert format_time(0.1) == "0.10000000000000001"
