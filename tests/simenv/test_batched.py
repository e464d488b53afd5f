"""BatchedRecEnv: B=1 equivalence with RecEnv, next-step autoreset, independent users, infos."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from simenv import BatchedRecEnv, EnvConfig, Obs, RecEnv
from simenv.spaces import SlateSpace
from simenv.types import obs_users
from tests.simenv.helpers import assert_equal_nested, sim_state

SMALL = "simenv/RecEnv-small-v0"


def _single(x):
    """Row 0 of a batched observation, shaped like RecEnv's (0-d arrays for scalars)."""
    return {k: v[0, ...] for k, v in x.items()}


@pytest.mark.parametrize("max_steps", [None, 12])
def test_b1_follows_recenv_across_episodes(max_steps):
    # bitwise: RecEnv runs the same Simulator with B = 1, so both run the same computation on
    # the same shapes
    kwargs = {} if max_steps is None else {"max_episode_steps": max_steps}
    venv = gym.make_vec(SMALL, num_envs=1, vectorization_mode="vector_entry_point", **kwargs)
    cfg = EnvConfig.small() if max_steps is None else EnvConfig.small(max_steps=max_steps)
    env = RecEnv(cfg)
    seed = 5
    obs, info = env.reset(seed=seed)
    vobs, vinfo = venv.reset(seed=seed)
    assert_equal_nested(obs, _single(vobs))
    assert info == {"user": int(vinfo["user"][0]), "group": int(vinfo["group"][0])}
    rng = np.random.default_rng(0)
    ends = {"terminated": 0, "truncated": 0}
    steps = 0
    while ends["terminated"] + ends["truncated"] < 6:
        action = env.best_slate() if rng.random() < 0.6 else env.action_space.sample()
        obs, reward, term, trunc, info = env.step(action)
        vobs, vrew, vterm, vtrunc, vinfo = venv.step(action[None, :])
        steps += 1
        assert_equal_nested(obs, _single(vobs))
        assert reward == float(vrew[0]) and term == bool(vterm[0]) and trunc == bool(vtrunc[0])
        for key, value in info.items():
            v = vinfo[key][0]
            assert np.array_equal(value, v), key
            assert vinfo["_" + key][0]
        if term or trunc:
            ends["terminated" if term else "truncated"] += 1
            obs, info = env.reset()
            # the batched env resets at its next step; the action there is ignored
            bad = np.full((1, env.config.slate_size), -1, dtype=np.int64)
            vobs, vrew, vterm, vtrunc, vinfo = venv.step(bad)
            assert_equal_nested(obs, _single(vobs))
            assert vrew[0] == 0.0 and not vterm[0] and not vtrunc[0]
            assert vinfo["user"][0] == info["user"]
    assert steps > 30
    if max_steps is None:
        assert ends["terminated"] >= 3
    else:
        assert ends["truncated"] >= 3


def test_make_vec_returns_batched_env_with_spec_horizon():
    for env_id in ("simenv/RecEnv-v0", SMALL):
        venv = gym.make_vec(env_id, num_envs=3, vectorization_mode="vector_entry_point")
        assert type(venv) is BatchedRecEnv
        assert venv.num_envs == 3
        assert venv.config.max_steps == gym.spec(env_id).max_episode_steps
    venv = gym.make_vec(
        SMALL, num_envs=2, vectorization_mode="vector_entry_point", max_episode_steps=7
    )
    assert venv.config.max_steps == 7
    assert venv.single_action_space == SlateSpace(500, 5)
    assert venv.action_space.shape == (2, 5)
    assert venv.observation_space[Obs.ITEMS].shape == (2, 16)
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP


def _run_until_an_end(venv, max_steps=500):
    """Step with oracle slates until some slot ends; returns that step's outputs."""
    for _ in range(max_steps):
        out = venv.step(venv.best_slates())
        if (out[2] | out[3]).any():
            return out
    raise AssertionError("no episode ended")


def test_next_step_autoreset_semantics():
    cfg = EnvConfig.small()
    venv = BatchedRecEnv(8, cfg)
    twin = BatchedRecEnv(8, cfg)
    venv.reset(seed=3)
    twin.reset(seed=3)
    obs, rew, term, trunc, info = _run_until_an_end(venv)
    out_twin = _run_until_an_end(twin)
    assert_equal_nested((obs, rew, term, trunc, info), out_twin)
    done = term | trunc
    assert 0 < done.sum() < 8
    old_users = info["user"].copy()
    # the ended slots' actions are ignored even when invalid (-7 repeated: out of range and
    # duplicated); the twin gets valid ones there and must see exactly the same step
    slates = venv.best_slates()
    bad = slates.copy()
    bad[done] = -7
    obs, rew, term, trunc, info = venv.step(bad)
    o2, r2, t2, tr2, i2 = twin.step(slates)
    assert_equal_nested((obs, rew, term, trunc, info), (o2, r2, t2, tr2, i2))
    assert np.all(rew[done] == 0) and not term[done].any() and not trunc[done].any()
    # a new episode: empty history, session 0, position 0, the new user's state
    assert np.all(obs[Obs.MASK][done] == 0) and np.all(obs[Obs.ITEMS][done] == 0)
    assert np.all(obs[Obs.CONTEXT][done][:, 1:] == 0)
    sim = venv.sim
    assert np.all(sim.steps[done] == 0) and np.all(sim.position[done] == 0)
    np.testing.assert_array_equal(sim.pref[done], venv.world.users.preference[sim.user[done]])
    np.testing.assert_array_equal(sim.budget[done], venv.world.users.patience[sim.user[done]])
    assert np.all(sim.fatigue[done] == 0)
    assert np.all(obs_users(obs)[done] == info["user"][done])
    assert (info["user"][done] != old_users[done]).any()
    # masks: user/group always valid; step results invalid on the reset slots only
    for key in ("user", "group"):
        assert info["_" + key].all()
    for key in ("affinity", "click_prob", "clicked_position", "event", "watch_minutes", "session"):
        np.testing.assert_array_equal(info["_" + key], ~done)
    # slots that did not end went on: their step counter grew by one
    assert np.all(sim.steps[~done] >= 2)


def test_users_finish_independently():
    venv = BatchedRecEnv(6, EnvConfig.small())
    venv.reset(seed=1)
    end_steps: list[list[int]] = [[] for _ in range(6)]
    length = np.zeros(6, dtype=int)
    rng = np.random.default_rng(2)
    resetting = np.zeros(6, dtype=bool)
    for t in range(250):
        actions = venv.best_slates() if rng.random() < 0.5 else venv.action_space.sample()
        _, rew, term, trunc, info = venv.step(actions)
        assert np.all(rew[resetting] == 0)
        length[~resetting] += 1
        assert np.all(venv.sim.steps == np.where(resetting, 0, length))
        done = term | trunc
        for i in np.nonzero(done)[0]:
            end_steps[i].append(t)
        length[done] = 0
        resetting = done
    # every slot ended some episodes, at different times
    assert all(len(s) >= 2 for s in end_steps)
    assert len({tuple(s) for s in end_steps}) == 6


def test_reset_options_and_queue():
    venv = BatchedRecEnv(3, EnvConfig.small())
    obs, info = venv.reset(seed=0, options={"user_ids": np.array([4, 9, 4])})
    assert obs_users(obs).tolist() == [4, 9, 4] and info["user"].tolist() == [4, 9, 4]
    venv.queue_users(np.array([100, 101]))
    users_seen = set()
    for _ in range(400):
        _, _, term, trunc, info = venv.step(venv.action_space.sample())
        users_seen.update(info["user"].tolist())
        if {100, 101} <= users_seen:
            break
    assert {100, 101} <= users_seen
    assert venv._queue.size == 0


def test_batched_step_state_only_changes_by_one_step():
    venv = BatchedRecEnv(4, EnvConfig.small())
    venv.reset(seed=0)
    before = sim_state(venv.sim)
    venv.step(venv.best_slates())
    after = sim_state(venv.sim)
    assert np.all(after["steps"] == before["steps"] + 1)
    assert np.all(after["time"] > before["time"])
