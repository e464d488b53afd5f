"""agents.reinforce: returns over whole episodes, PL single-draw probabilities, the corrected gradient."""

import numpy as np
import pytest
import torch

from agents.reinforce import (
    ReinforceConfig,
    ReinforceData,
    ReinforceGenerator,
    SampledTwoTowerGenerator,
    plackett_luce_single_draw,
    step_returns,
)
from retrieval.model import TwoTowerConfig
from retrieval.towers import ItemTowerConfig, UserTowerConfig
from simenv import BatchedRecEnv, EnvConfig, ImpressionLog, PopularityPolicy, collect
from simenv.history import EventSequences
from simenv.types import Columns

CFG = EnvConfig.small()


def _log(rows):
    """rows: (user, session, step, request, reward) per request; slates of one item."""
    r = np.array(rows, dtype=np.float64)
    n = len(rows)
    cols = {
        Columns.USER: r[:, 0].astype(np.int64),
        Columns.TIME: np.arange(n, dtype=np.float64),
        Columns.SESSION: r[:, 1].astype(np.int32),
        "session_step": r[:, 2].astype(np.int32),
        Columns.REQUEST: r[:, 3].astype(np.int64),
        Columns.POSITION: np.zeros(n, np.int16),
        Columns.ITEM: np.zeros(n, np.int64),
        Columns.FEEDBACK: np.zeros(n, np.int8),
        Columns.WATCH: np.zeros(n, np.float32),
        Columns.REWARD: r[:, 4].astype(np.float32),
        Columns.PROPENSITY: np.ones(n, np.float32),
    }
    return ImpressionLog(cols)


def test_step_returns_over_sessions_and_episodes():
    g = 0.5
    # user 7: one episode over two sessions (the return visit counts); then a second episode.
    # user 3: interleaved with user 7 in request order (different users may interleave).
    log = _log(
        [
            (7, 0, 0, 0, 1.0), (3, 0, 0, 1, 2.0), (7, 0, 1, 2, 0.0), (7, 1, 0, 3, 4.0),
            (3, 0, 1, 4, 0.0), (7, 0, 0, 5, 8.0), (7, 0, 1, 6, 1.0),
        ]
    )  # fmt: skip
    sr = step_returns(log, g)
    assert sr["request"].tolist() == list(range(7))
    expect = {0: 1 + g * (0 + g * 4), 2: 0 + g * 4, 3: 4.0, 1: 2.0, 4: 0.0, 5: 8 + g * 1, 6: 1.0}
    np.testing.assert_allclose(sr["ret"], [expect[i] for i in range(7)])
    np.testing.assert_allclose(sr["ret_next"][[0, 2, 3, 5, 6]], [expect[2], expect[3], 0, 1, 0])
    np.testing.assert_allclose(step_returns(log, 0.0)["ret"], [1, 2, 0, 4, 0, 8, 1])
    bad = _log([(7, 0, 0, 0, 1.0), (7, 0, 0, 1, 1.0), (7, 0, 2, 2, 1.0)])
    with pytest.raises(ValueError, match="interleaves episodes of user 7"):
        step_returns(bad, 0.9)


def test_plackett_luce_single_draw_recovers_the_logging_weights():
    env = BatchedRecEnv(64, CFG)
    obs, _ = env.reset(seed=0)
    eps = 0.3
    pol = PopularityPolicy(env.world, CFG.slate_size, epsilon=eps, seed=1)
    slates, prop = pol.act(obs)
    q = plackett_luce_single_draw(prop)
    w = env.world.items.popularity.astype(float) ** 0.5
    rel = env.world.catalog.release_time[None, :] <= obs["context"][:, :1]
    expect = (1 - eps) * w[slates] / (w[None, :] * rel).sum(1, keepdims=True) + eps / rel.sum(
        1, keepdims=True
    )
    np.testing.assert_allclose(q, expect, rtol=1e-4)  # float32 propensities
    with pytest.raises(ValueError, match="propensities"):
        plackett_luce_single_draw(np.zeros((2, 3)))


def _tiny_model(n_items, dim=8, seed=0):
    torch.manual_seed(seed)  # test-local: model init draws from torch's generator
    cfg = TwoTowerConfig(
        item=ItemTowerConfig(kind="id", dim=dim), user=UserTowerConfig(kind="mean")
    )
    from retrieval.model import TwoTowerModel as M
    from simenv import World

    world = World(CFG.world, seed=0)
    return M.build(cfg, world.catalog), world


def test_reinforce_moves_probability_toward_high_return_items_with_the_top_k_weights():
    model, world = _tiny_model(CFG.world.n_items)
    n, k = 4000, 2
    released = np.nonzero(world.catalog.release_time <= 0)[0]
    good, bad = released[:20], released[20:40]
    rng = np.random.default_rng(0)
    items = np.stack([rng.choice(good, n), rng.choice(bad, n)], axis=1)
    obs = {
        "item_ids": np.zeros((n, 4), np.int64), "events": np.zeros((n, 4), np.int64),
        "dt": np.zeros((n, 4), np.float32), "mask": np.zeros((n, 4), np.int8),
        "context": np.zeros((n, 3), np.float32), "user": np.zeros((n, 1), np.int64),
    }  # fmt: skip
    g = np.stack([np.ones(n), np.zeros(n)], axis=1).astype(np.float32)
    data = ReinforceData(obs, items, g, g, np.full((n, k), 1.0 / released.size))
    agent = ReinforceGenerator(model, world.catalog)
    t_obs = {key: torch.as_tensor(v) for key, v in obs.items()}
    t_obs["dt"], t_obs["context"] = t_obs["dt"].float(), t_obs["context"].float()
    before = agent.policy_log_probs({key: v[:1] for key, v in t_obs.items()})[0].exp()
    hist = agent.fit(
        data, ReinforceConfig(epochs=2, batch_size=200, top_k=10, lr=3e-3, behaviour="logged")
    )
    after = agent.policy_log_probs({key: v[:1] for key, v in t_obs.items()})[0].exp()
    gain = (after[good].sum() / before[good].sum()).item()
    loss = (after[bad].sum() / before[bad].sum()).item()
    assert gain > 1.5 and loss < 0.9 and gain / loss > 2.0, (gain, loss)
    assert hist["lambda_k"][0] > 0 and len(hist["policy_loss"]) == 2
    # the learned behaviour head moves toward the logged items (40 of the released catalog)
    b = agent.behaviour_log_probs({key: v[:1] for key, v in t_obs.items()})[0].exp()
    assert b[np.r_[good, bad]].sum().item() > 1.5 * 40 / released.size


def test_reinforce_data_from_a_log_and_the_sampled_generator():
    env = BatchedRecEnv(50, CFG)
    log = collect(
        env, PopularityPolicy(env.world, CFG.slate_size, 0.2, 0), 50, seed=1, progress=False
    )
    seq = EventSequences.from_log(log, env.world.n_items)
    data = ReinforceData.from_log(log, seq, 16, gamma=0.8)
    assert data.items.shape == (len(data), CFG.slate_size)
    assert np.isfinite(data.behaviour).all() and (data.behaviour > 0).all()
    sr = step_returns(log, 0.8)
    # G = r(a) + gamma R_{t+1}: summed over the slate minus gamma-discounted parts = r_t
    req_sorted = np.argsort(sr["request"])
    total = data.returns.sum(1) - CFG.slate_size * 0.8 * sr["ret_next"][req_sorted]
    np.testing.assert_allclose(total, sr["reward"][req_sorted], rtol=1e-5, atol=1e-5)
    model, world = _tiny_model(CFG.world.n_items)
    gen = SampledTwoTowerGenerator(model, env.world.catalog, seed=0)
    ids, sc = gen.retrieve(data.obs, 30, exclude_seen=False)
    assert (ids >= 0).all() and all(len(set(r)) == 30 for r in ids.tolist())
    rel = env.world.catalog.release_time[ids] <= data.obs["context"][:, :1]
    assert rel.all()
