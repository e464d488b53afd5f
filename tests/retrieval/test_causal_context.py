"""All-positions training sees what serving sees: each position of a causal window carries the
request context of the event it predicts, and the sequence towers read only the intervals
between events (:func:`retrieval.towers.user.event_gaps`), so a causal tower's output at
position i equals its serving output at the request of event i + 1 (rotary positions and the
GRU are relative, so the window's padding slots do not matter)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from retrieval.data import causal_windows
from retrieval.towers import ItemTowerConfig, UserTowerConfig, build_item_tower
from retrieval.towers.user import build_user_tower, event_gaps
from simenv import BatchedRecEnv, EnvConfig, World, WorldConfig, collect
from simenv.history import EventSequences
from simenv.policies import PopularityPolicy
from simenv.types import Obs


def test_event_gaps():
    dt = torch.tensor([[9.0, 7.0, 5.0, 0.5], [3.0, 3.0, 1.0, 0.0], [0.0, 0.0, 4.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    got = event_gaps(dt, mask)
    want = torch.tensor([[2.0, 2.0, 4.5, 0.5], [0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 3.0, 1.0]])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the reference time cancels except in the last interval
    shifted = event_gaps(dt + 10.0 * mask, mask)
    torch.testing.assert_close(shifted[:, :-1], got[:, :-1], rtol=0, atol=1e-6)


@functools.lru_cache(maxsize=1)
def _sequences() -> EventSequences:
    env_cfg = EnvConfig(
        world=WorldConfig(
            n_items=200, n_users=40, n_groups=2, n_topics=8, latent_dim=8, n_creators=20
        )
    )
    world = World(env_cfg.world, seed=1, user_model=env_cfg.user_model)
    env = BatchedRecEnv(40, env_cfg, world=world)
    log = collect(env, PopularityPolicy(world, env_cfg.slate_size, 0.2, 1), 80, 1, progress=False)
    return EventSequences.from_log(log, world.n_items)


@pytest.mark.parametrize(
    "config",
    [
        UserTowerConfig(
            kind="transformer",
            positional="rotary",
            causal=True,
            pooling="last",
            n_layers=2,
            n_heads=2,
        ),
        UserTowerConfig(kind="gru", n_layers=1),
    ],  # fmt: skip
    ids=["transformer-rotary", "gru"],
)
def test_causal_window_positions_match_serving(config):
    seq = _sequences()
    length = 6
    w = causal_windows(seq, length)
    assert w.obs[Obs.CONTEXT].shape == (len(w), length, 3)
    tower = build_user_tower(
        config, build_item_tower(ItemTowerConfig(kind="id", dim=16, n_items=seq.n_items), None)
    )
    with torch.no_grad():  # the request projection starts at zero: make the context matter
        tower.inputs.request.weight.normal_(generator=torch.Generator().manual_seed(0))
    tower.eval()
    rows, cols = np.nonzero(w.targets >= 0)
    ctx_t = w.obs[Obs.CONTEXT][rows, cols, 0].astype(np.float64)
    # the serving observation at each predicted event's request: the real events of the window
    # up to the position (the window's view), their ages at that request, its true context
    n_real = w.obs[Obs.MASK][rows].cumsum(axis=1)[np.arange(rows.size), cols]
    checked = 0
    with torch.no_grad():
        seq_out = tower.forward_sequence(w.obs)  # (W, L, d)
        for r, c, k, t in zip(rows, cols, n_real, ctx_t, strict=True):
            user = w.user[r : r + 1]
            obs = seq.history(
                user, np.array([t]), int(k), w.obs[Obs.CONTEXT][r : r + 1, c, 1],
                w.obs[Obs.CONTEXT][r : r + 1, c, 2],
            )  # fmt: skip
            if not np.array_equal(obs[Obs.ITEMS][0], w.obs[Obs.ITEMS][r, c - k + 1 : c + 1]):
                # several events of one request share its time: serving shows none of them in
                # the history of that request, the window shows the earlier ones
                continue
            serve = tower(obs)[0]
            torch.testing.assert_close(seq_out[r, c], serve, rtol=1e-4, atol=1e-5)
            checked += 1
            if checked == 25:
                break
            if checked == 1:  # the context is used: another position's context changes the output
                wrong = dict(obs)
                wrong[Obs.CONTEXT] = obs[Obs.CONTEXT] + np.float32([0.3, 2.0, 3.0])
                assert (tower(wrong)[0] - serve).abs().max() > 1e-3
    assert checked == 25
