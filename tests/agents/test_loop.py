"""The closed loop (agents.loop): concentration golden values, config validation, and a tiny
loop (2 rounds, few users, 1 epoch) that returns one documented row per round, the same
numbers for the same seed, and trains on the env's history length."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import agents.loop as loop_mod
from agents.loop import LoopConfig, closed_loop, concentration
from simenv import BatchedRecEnv
from simenv.log import ImpressionLog
from simenv.types import Columns
from tests.agents.helpers import small_world
from tests.numerics import TEST_THREADS

ROW_KEYS = {
    "round", "reward", "reward_mean", "reward_ci", "clicks", "train_s", "act_s",
    "top1pct_share", "gini", "shown_items", "leakage@100",
}  # fmt: skip
TINY = dict(
    rounds=2, users_per_round=24, quota=30, ranker_epochs=1, generator_epochs=1,
    teacher_queries=200,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)


def _log_of_items(items: np.ndarray) -> ImpressionLog:
    n = len(items)
    cols = {
        Columns.USER: np.zeros(n, np.int64),
        Columns.TIME: np.arange(n, dtype=np.float64),
        Columns.SESSION: np.zeros(n, np.int32),
        "session_step": np.zeros(n, np.int32),
        Columns.REQUEST: np.arange(n, dtype=np.int64),
        Columns.POSITION: np.zeros(n, np.int16),
        Columns.ITEM: np.asarray(items, np.int64),
        Columns.FEEDBACK: np.zeros(n, np.int8),
        Columns.WATCH: np.zeros(n, np.float32),
        Columns.REWARD: np.zeros(n, np.float32),
        Columns.PROPENSITY: np.ones(n, np.float32),
    }
    return ImpressionLog(cols)


# ------------------------------------------------------------------------ concentration


def test_concentration_golden_values():
    equal = concentration(_log_of_items(np.repeat(np.arange(200), 3)), 200)
    assert equal == pytest.approx({"top1pct_share": 0.01, "gini": 0.0, "shown_items": 1.0})
    one = concentration(_log_of_items(np.full(50, 7)), 200)
    assert one["top1pct_share"] == 1.0 and one["shown_items"] == 1 / 200
    assert one["gini"] == pytest.approx(1 - 1 / 200)  # the maximum for n items
    # a hand case: counts 6, 3, 1, 0 over 4 items; top share 25% = the largest count
    items = np.r_[np.full(6, 2), np.full(3, 0), [1]]
    c = concentration(_log_of_items(items), 4, top_share=0.25)
    x = np.sort([6.0, 3.0, 1.0, 0.0])  # Gini = sum_i sum_j |x_i - x_j| / (2 n^2 mean)
    gini = np.abs(x[:, None] - x[None, :]).sum() / (2 * 4 * 4 * x.mean())
    assert c == pytest.approx({"top1pct_share": 0.6, "gini": gini, "shown_items": 0.75})


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(generator_target="ranker"), "generator_target must be one of"),
        (dict(exploration="ucb"), "exploration must be"),
        (dict(rounds=0), "rounds must be an integer >= 1, got 0"),
        (dict(users_per_round=2.5), "users_per_round must be an integer >= 1, got 2.5"),
        (dict(epsilon=1.2), r"epsilon and distill_weight must be in \[0, 1\]"),
        (dict(uniform_negatives=-1), "uniform_negatives must be >= 0, got -1"),
    ],
)
def test_loop_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LoopConfig(**kw)


# ------------------------------------------------------------------------ the loop


@pytest.fixture(scope="module")
def env():
    cfg, w = small_world(0)
    return BatchedRecEnv(24, cfg, world=w)


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in ("train_s", "act_s")} for r in rows]


def test_tiny_loop_rows_determinism_and_history_length(env, monkeypatch):
    seen = {"ranker": [], "generator": []}
    real_ranker, real_fit = loop_mod.train_ranker, loop_mod.fit_two_tower

    def spy_ranker(ranker, log, seq, config, *a, **kw):
        seen["ranker"].append(config.history_length)
        return real_ranker(ranker, log, seq, config, *a, **kw)

    def spy_fit(model, loss, log, seq, config, *a, **kw):
        seen["generator"].append(config.history_length)
        return real_fit(model, loss, log, seq, config, *a, **kw)

    monkeypatch.setattr(loop_mod, "train_ranker", spy_ranker)
    monkeypatch.setattr(loop_mod, "fit_two_tower", spy_fit)
    cfg = LoopConfig(**TINY)
    labels = []
    rows = closed_loop(env, cfg, seed=3, threads=1, progress=lambda it, d: labels.append(d) or it)
    assert labels == ["closed loop rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["reward"].shape == (TINY["users_per_round"],)
        assert r["reward_mean"] == pytest.approx(r["reward"].mean())
        assert r["reward_ci"] > 0 and r["clicks"] >= 0 and r["act_s"] > 0
        assert 0 < r["top1pct_share"] <= 1 and 0 <= r["gini"] <= 1 and 0 < r["shown_items"] <= 1
    assert rows[0]["train_s"] == 0.0 and math.isnan(rows[0]["leakage@100"])
    for r in rows[1:]:
        assert r["train_s"] > 0 and 0 <= r["leakage@100"] <= 1
    # random slates (round 0) spread impressions more evenly than the trained pipeline
    assert rows[0]["gini"] < rows[2]["gini"]
    # the models train on observations as long as the env's (L = 16 in the small world)
    length = env.config.history_length
    assert seen == {"ranker": [length] * 2, "generator": [length] * 2}
    # same seed, same numbers
    again = closed_loop(env, cfg, seed=3, threads=1)
    a, b = _comparable(rows), _comparable(again)
    for ra, rb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ra.pop("reward"), rb.pop("reward"))
        assert ra == pytest.approx(rb, nan_ok=True)


def test_tiny_loop_greedy_positives_only(env):
    cfg = LoopConfig(
        **{**TINY, "rounds": 1}, exploration="greedy", generator_target="positives",
        uniform_negatives=0,
    )  # fmt: skip
    rows = closed_loop(env, cfg, seed=0, threads=1)
    assert [r["round"] for r in rows] == [0, 1] and set(rows[1]) == ROW_KEYS
    assert np.isfinite(rows[1]["reward_mean"]) and 0 <= rows[1]["leakage@100"] <= 1
