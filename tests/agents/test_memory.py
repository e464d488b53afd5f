"""agents.memory: serving with the user's logged history.

- merge_histories: golden rows (ordered by age, padding in front, the last L kept);
- UserMemory at the start of an episode (empty history) gives the agent exactly the
  observation a training request of that user at that time is rebuilt with
  (EventSequences.history): no train/serve skew; later, the episode's own events join, newest
  last;
- rollout with ``active_only`` records the same rows as without it (common random numbers:
  a user's draws do not depend on the other slots).
"""

from __future__ import annotations

import numpy as np
import pytest

from agents.base import GreedyUtilityOracle, RandomAgent
from agents.memory import UserMemory, merge_histories
from simenv import BatchedRecEnv, collect
from simenv.history import EventSequences
from simenv.types import Columns, Obs
from tests.agents.helpers import small_world


class _Recorder:
    """An agent that records what it was shown and plays random slates."""

    name = "recorder"

    def __init__(self, world, k):
        self.inner = RandomAgent(world, k, seed=0)
        self.seen = []

    def act(self, obs):
        self.seen.append({key: np.array(v) for key, v in obs.items()})
        return self.inner.act(obs)


def _obs(items, dts, length):
    b = len(items)
    out = {
        Obs.ITEMS: np.zeros((b, length), np.int64),
        Obs.EVENTS: np.zeros((b, length), np.int64),
        Obs.DT: np.zeros((b, length), np.float32),
        Obs.MASK: np.zeros((b, length), np.int8),
        Obs.CONTEXT: np.zeros((b, 3), np.float32),
        Obs.USER: np.arange(b, dtype=np.int64)[:, None],
    }
    for r, (its, ds) in enumerate(zip(items, dts, strict=True)):
        n = len(its)
        if n:
            out[Obs.ITEMS][r, -n:] = its
            out[Obs.EVENTS][r, -n:] = 1
            out[Obs.DT][r, -n:] = ds
            out[Obs.MASK][r, -n:] = 1
    return out


def test_merge_histories_golden():
    logged = _obs([[7, 8, 9], [], [4]], [[5.0, 3.0, 1.0], [], [2.0]], 4)
    episode = _obs([[1, 2], [3], []], [[2.0, 0.5], [0.1], []], 4)
    episode[Obs.CONTEXT][:] = [[9.0, 1, 2], [8.0, 0, 0], [7.0, 0, 1]]
    out = merge_histories(logged, episode, 4)
    # row 0: ages 5 (7), 3 (8), 2 (1), 1 (9), 0.5 (2): the oldest (7) drops out
    assert out[Obs.ITEMS][0].tolist() == [8, 1, 9, 2]
    assert out[Obs.DT][0].tolist() == [3.0, 2.0, 1.0, 0.5]
    assert out[Obs.ITEMS][1].tolist() == [0, 0, 0, 3] and out[Obs.MASK][1].tolist() == [0, 0, 0, 1]
    assert out[Obs.ITEMS][2].tolist() == [0, 0, 0, 4] and out[Obs.DT][2].tolist() == [0, 0, 0, 2.0]
    np.testing.assert_array_equal(out[Obs.CONTEXT], episode[Obs.CONTEXT])  # context: the episode's
    np.testing.assert_array_equal(out[Obs.USER], episode[Obs.USER])


def test_memory_serves_the_training_observation_then_adds_the_episode():
    cfg, world = small_world(0)
    env = BatchedRecEnv(64, cfg, world=world)
    log = collect(
        env, RandomAgent(world, cfg.slate_size, seed=1), n_users=300, seed=3, progress=False
    )
    seq = EventSequences.from_log(log, world.n_items)
    length = cfg.history_length
    rec = _Recorder(world, cfg.slate_size)
    agent = UserMemory(rec, seq, length)
    users = np.arange(40)
    env2 = BatchedRecEnv(40, cfg, world=world)
    obs, _ = env2.reset(seed=9, options={"user_ids": users})
    assert obs[Obs.MASK].sum() == 0  # episodes start empty
    raw = []
    for _ in range(5):
        raw.append({key: np.array(v) for key, v in obs.items()})
        obs, *_ = env2.step(agent.act(obs))
    # the first request: exactly the training-time observation of that user at that time
    first = rec.seen[0]
    t0 = first[Obs.CONTEXT][:, 0].astype(np.float64)
    want = seq.history(users, t0, length)
    for key in (Obs.ITEMS, Obs.EVENTS, Obs.MASK):
        np.testing.assert_array_equal(first[key], want[key])
    np.testing.assert_allclose(first[Obs.DT], want[Obs.DT], rtol=1e-6)
    assert first[Obs.MASK].sum() > 0  # the log gave users a history
    # later requests: the last L of (logged events before t) + (the episode's events), by age
    served, ep = rec.seen[-1], raw[-1]
    t = ep[Obs.CONTEXT][:, 0].astype(np.float64)
    logged = seq.history(users, t, length)
    assert ep[Obs.MASK].sum() > 0  # some users clicked during the episode
    for r in range(users.size):
        ages = np.r_[logged[Obs.DT][r][logged[Obs.MASK][r] > 0], ep[Obs.DT][r][ep[Obs.MASK][r] > 0]]
        items = np.r_[
            logged[Obs.ITEMS][r][logged[Obs.MASK][r] > 0], ep[Obs.ITEMS][r][ep[Obs.MASK][r] > 0]
        ]
        order = np.argsort(-ages, kind="stable")[-length:]
        real = served[Obs.MASK][r] > 0
        assert real.sum() == min(length, ages.size)
        np.testing.assert_array_equal(served[Obs.ITEMS][r][real], items[order])
        np.testing.assert_array_equal(served[Obs.DT][r][real], ages[order].astype(np.float32))


def test_memory_bad_input():
    cfg, world = small_world(0)
    seq = EventSequences.from_log(
        collect(
            BatchedRecEnv(8, cfg, world=world),
            RandomAgent(world, cfg.slate_size),
            8,
            seed=0,
            progress=False,
        ),
        world.n_items,
    )
    with pytest.raises(ValueError, match="history_length"):
        UserMemory(RandomAgent(world, cfg.slate_size), seq, 0)
    with pytest.raises(ValueError, match="sequences"):
        UserMemory(RandomAgent(world, cfg.slate_size), None, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="act"):
        UserMemory(object(), seq, 8)


class _Deterministic:
    """Released items by quality, shifted by the history length (no randomness of its own)."""

    name = "fixed"

    def __init__(self, world, k):
        self.world, self.k = world, k
        self.order = np.argsort(-world.items.quality, kind="stable")
        self.last_candidates = None

    def act(self, obs):
        t = obs[Obs.CONTEXT][:, :1]
        rel = self.world.items.release_time[self.order][None, :] <= t  # (B, N) by quality
        ranked = np.argsort(~rel, axis=1, kind="stable")  # released first, best first
        shift = obs[Obs.MASK].sum(axis=1) % 3
        idx = np.take_along_axis(ranked, np.arange(self.k)[None, :] + shift[:, None], axis=1)
        return self.order[idx]


def test_collect_active_only_records_the_same_rows():
    cfg, world = small_world(0)
    users = np.arange(30)
    a = collect(
        BatchedRecEnv(30, cfg, world=world),
        _Deterministic(world, cfg.slate_size),
        30,
        seed=4,
        users=users,
        progress=False,
    )
    b = collect(
        BatchedRecEnv(30, cfg, world=world), _Deterministic(world, cfg.slate_size), 30, seed=4, users=users,
        progress=False, active_only=True,
    )  # fmt: skip
    assert len(a) == len(b) > 0
    for col in (Columns.USER, Columns.ITEM, Columns.FEEDBACK, Columns.REWARD, Columns.TIME):
        np.testing.assert_array_equal(a[col], b[col])  # same draws per user: bitwise equal rows


def test_collect_active_only_with_an_agent_that_answers_for_every_slot():
    cfg, world = small_world(0)
    users = np.arange(20)
    env_a, env_b = BatchedRecEnv(20, cfg, world=world), BatchedRecEnv(20, cfg, world=world)
    a = collect(env_a, GreedyUtilityOracle(env_a), 20, seed=2, users=users, progress=False)
    b = collect(
        env_b, GreedyUtilityOracle(env_b), 20, seed=2, users=users, progress=False, active_only=True
    )
    for col in (Columns.USER, Columns.ITEM, Columns.REWARD):
        np.testing.assert_array_equal(a[col], b[col])
