"""simenv.wrappers: every action adapter makes valid slates; gymnasium's common wrappers work.

Valid = distinct items, each released at the user's current time (the env raises otherwise,
so a full episode through the adapter is itself a check), for single and vector envs.
"""

import gymnasium as gym
import gymnasium.wrappers.vector as gv
import numpy as np
import pytest
from gymnasium.wrappers import (
    FlattenObservation,
    NormalizeReward,
    RecordEpisodeStatistics,
    TimeLimit,
)

import simenv  # noqa: F401
from simenv import BatchedRecEnv, EnvConfig, EventType, Obs, RecEnv
from simenv.wrappers import (
    AdapterAgent,
    CatalogScoreAction,
    EmbeddingAction,
    HistoryEmbeddingObservation,
    MultiDiscreteAction,
    VectorCatalogScoreAction,
    VectorEmbeddingAction,
    VectorHistoryEmbeddingObservation,
    VectorMultiDiscreteAction,
    history_embedding,
    released_items,
    repair_slates,
    top_k_released,
)

CFG = EnvConfig.small()


def _vectors(n, d=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _valid(slates, release, times):
    slates = np.atleast_2d(slates)
    s = np.sort(slates, axis=1)
    return not (s[:, 1:] == s[:, :-1]).any() and bool(
        (release[slates] <= np.asarray(times)[:, None]).all()
    )


def _single_adapters(env):
    n = env.unwrapped.world.n_items
    return {
        "multidiscrete": MultiDiscreteAction(env, seed=0),
        "scores": CatalogScoreAction(env, seed=0),
        "embedding": EmbeddingAction(env, _vectors(n), seed=0),
    }


@pytest.mark.parametrize("kind", ["multidiscrete", "scores", "embedding"])
def test_single_adapters_make_valid_slates_for_whole_episodes(kind):
    env = _single_adapters(RecEnv(CFG))[kind]
    release = env.unwrapped.world.catalog.release_time
    env.reset(seed=1)
    env.action_space.seed(1)
    ends = 0
    for _ in range(300):
        t = env.unwrapped.sim.time.copy()
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        assert _valid(info["slate"], release, t)
        if term or trunc:
            ends += 1
            env.reset()
    assert ends >= 2


@pytest.mark.parametrize("kind", ["multidiscrete", "scores", "embedding"])
def test_vector_adapters_on_native_and_sync_vector_envs(kind):
    n = CFG.world.n_items
    make = {
        "multidiscrete": lambda e: VectorMultiDiscreteAction(e, seed=0),
        "scores": lambda e: VectorCatalogScoreAction(e, seed=0),
        "embedding": lambda e: VectorEmbeddingAction(e, _vectors(n), seed=0),
    }[kind]
    native = BatchedRecEnv(16, CFG)
    sync = gym.make_vec("simenv/RecEnv-small-v0", num_envs=3, vectorization_mode="sync")
    for base in (native, sync):
        env = make(base)
        assert env.action_space.shape[0] == base.num_envs
        env.reset(seed=2)
        env.action_space.seed(2)
        release = _release(base)
        for _ in range(40):
            t = _times(base)
            _, _, term, trunc, info = env.step(env.action_space.sample())
            assert _valid(info["slate"], release, t)
        env.close()


def _release(venv):
    u = venv.unwrapped
    w = u.world if hasattr(u, "world") else u.envs[0].unwrapped.world
    return w.catalog.release_time


def _times(venv):
    u = venv.unwrapped
    if hasattr(u, "sim"):
        return u.sim.time.copy()
    return np.array([e.unwrapped.sim.time[0] for e in u.envs])


def test_repair_keeps_valid_choices_and_falls_back_to_the_next_unused_item():
    release = np.array([0.0, 0.0, 5.0, 0.0, 0.0, 0.0])  # item 2 released at t=5
    order = np.array([5, 4, 3, 2, 1, 0])  # fallback: next after i in this order
    choices = np.array([[1, 1, 2, 0], [3, 4, 5, 0], [2, 2, 2, 2]])
    slates, rep = repair_slates(choices, np.array([1.0, 1.0, 9.0]), release, order)
    # row 0: second 1 -> next after 1 in the order is 0 (free); 2 unreleased -> 1? used, 0 used,
    # cyclic -> 5; the last 0 is now taken -> 5 taken -> 4
    assert slates[0].tolist() == [1, 0, 5, 4] and rep[0].tolist() == [False, True, True, True]
    assert slates[1].tolist() == [3, 4, 5, 0] and not rep[1].any()
    # row 2 at t=9: 2 is released; repeats walk the order 1, 0, 5
    assert slates[2].tolist() == [2, 1, 0, 5]
    with pytest.raises(ValueError, match="choices must be item ids"):
        repair_slates(np.array([[6, 0, 1, 3]]), np.array([1.0]), release)
    with pytest.raises(ValueError, match="fewer than k=4"):
        repair_slates(np.array([[0, 1, 3, 4]]), np.array([1.0]), np.full(6, 3.0))


def test_top_k_released_is_the_brute_force_top_k_with_ties_to_the_lower_id():
    rng = np.random.default_rng(0)
    release = rng.uniform(-1, 2, size=300)
    scores = rng.integers(0, 20, size=(50, 300)).astype(np.float64)  # many ties
    times = rng.uniform(0, 2, size=50)
    got = top_k_released(scores, times, release, 7)
    for b in range(50):
        ok = np.nonzero(released_items(release, times[b : b + 1])[0])[0]
        ref = ok[np.lexsort((ok, -scores[b, ok]))][:7]
        assert got[b].tolist() == ref.tolist()
    with pytest.raises(ValueError, match="NaN"):
        top_k_released(np.full((1, 300), np.nan), times[:1], release, 3)


def test_embedding_action_is_exact_and_accepts_the_project_index():
    from retrieval.index import IndexConfig, ItemIndex, ReleaseCutoff

    env = RecEnv(CFG)
    n = env.world.n_items
    vec = _vectors(n, d=8, seed=3)
    release = env.world.catalog.release_time
    index = ItemIndex(IndexConfig(kind="exact"), vec)
    exact = EmbeddingAction(env, vec)
    via_index = EmbeddingAction(
        RecEnv(CFG),
        vec,
        search=lambda q, k, t: index.search(q, k, allowed=ReleaseCutoff(release, t))[0],
    )
    q = np.random.default_rng(4).uniform(-1, 1, size=(20, 8)).astype(np.float32)
    t = np.random.default_rng(5).uniform(0, 12, size=20)
    a, _ = exact._maker.slates(q, t)
    b, _ = via_index._maker.slates(q, t)
    s = q @ vec.T  # float32 scores
    ok = released_items(release, t)
    for r in range(20):
        top = np.sort(np.where(ok[r], s[r], -np.inf))[::-1][: CFG.slate_size]
        # same score multiset (float32 matmul in two libraries: tolerance, not bitwise)
        np.testing.assert_allclose(np.sort(s[r, a[r]])[::-1], top, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.sort(s[r, b[r]])[::-1], top, rtol=1e-5, atol=1e-5)
    bad = EmbeddingAction(RecEnv(CFG), vec, search=lambda q, k, t: np.zeros((q.shape[0], k), int))
    with pytest.raises(ValueError, match="repeated or unreleased"):
        bad._maker.slates(q[:1], t[:1])
    with pytest.raises(ValueError, match=r"item_vectors must have shape \(500, d\)"):
        EmbeddingAction(RecEnv(CFG), vec[:10])


def test_history_embedding_is_the_event_weighted_mean():
    vec = np.eye(4, dtype=np.float32)
    obs = {
        Obs.ITEMS: np.array([[0, 1, 2, 3], [0, 0, 0, 0]]),
        Obs.EVENTS: np.array(
            [[0, EventType.CLICK, EventType.LIKE, EventType.DISLIKE], [0, 0, 0, 0]]
        ),
        Obs.MASK: np.array([[0, 1, 1, 1], [0, 0, 0, 0]], dtype=np.int8),
    }
    h = history_embedding(obs, vec)
    np.testing.assert_allclose(h[0], np.array([0, 1, 2, -1]) / 4.0)
    np.testing.assert_allclose(h[1], 0.0)


def test_observation_adapter_single_and_vector_and_the_agent_bridge():
    vec = _vectors(CFG.world.n_items, d=5)
    env = HistoryEmbeddingObservation(EmbeddingAction(RecEnv(CFG), vec), vec)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs) and obs["history"].shape == (5,)
    for _ in range(20):
        obs, _, term, trunc, _ = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        if term or trunc:
            obs, _ = env.reset()
    venv = VectorHistoryEmbeddingObservation(VectorEmbeddingAction(BatchedRecEnv(4, CFG), vec), vec)
    vobs, _ = venv.reset(seed=0)
    assert venv.observation_space.contains(vobs) and vobs["history"].shape == (4, 5)
    # the agent bridge: a policy over the adapters acting on raw batched observations
    agent = AdapterAgent(lambda x: x["history"], env.env, env, name="echo")
    raw = BatchedRecEnv(6, CFG)
    o, _ = raw.reset(seed=1)
    for _ in range(10):
        slates = agent.act(o)
        assert _valid(slates, raw.world.catalog.release_time, raw.sim.time)
        o, *_ = raw.step(slates)
    with pytest.raises(ValueError, match="action must be one of"):
        AdapterAgent(lambda x: x, raw)


@pytest.mark.parametrize("env_id", ["simenv/RecEnv-small-v0", "simenv/RecEnv-v0"])
def test_gymnasium_common_wrappers_work(env_id):
    env = NormalizeReward(
        FlattenObservation(RecordEpisodeStatistics(TimeLimit(gym.make(env_id).unwrapped, 20)))
    )
    obs, _ = env.reset(seed=0)
    env.action_space.seed(0)
    episodes = []
    for _ in range(45):
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs) and np.isfinite(r)
        if term or trunc:
            episodes.append(info["episode"])
            obs, _ = env.reset()
    assert episodes and all(e["l"] <= 20 for e in episodes)
    cfg = EnvConfig.small() if "small" in env_id else EnvConfig()
    for venv in (
        BatchedRecEnv(8, cfg, max_episode_steps=20),
        gym.make_vec(env_id, num_envs=3, vectorization_mode="sync", max_episode_steps=20),
    ):
        v = gv.NormalizeReward(gv.FlattenObservation(gv.RecordEpisodeStatistics(venv)))
        obs, _ = v.reset(seed=0)
        v.action_space.seed(0)
        n_episodes = 0
        for _ in range(45):
            obs, r, term, trunc, info = v.step(v.action_space.sample())
            assert v.observation_space.contains(obs) and np.isfinite(r).all()
            n_episodes += int(info.get("_episode", np.zeros(1, bool)).sum())
        assert n_episodes >= venv.num_envs
        v.close()
