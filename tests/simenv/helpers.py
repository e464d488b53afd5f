"""Shared helpers of the simenv tests: rollouts, trajectory digests, state snapshots, given step draws."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from simenv.core import Simulator, StepDraws


def mixed_action(env: Any, rng: np.random.Generator) -> np.ndarray:
    """Half the time the oracle slate (clicks, history), half a random slate of initial items."""
    if rng.random() < 0.5:
        return env.best_slate()
    pool = env.action_space.sample_pool
    return pool[rng.choice(pool.size, size=env.config.slate_size, replace=False)]


def rollout(env: Any, seed: int, n_steps: int, action_seed: int = 0) -> list[tuple]:
    """``n_steps`` steps of a RecEnv from ``reset(seed=seed)``, ``reset()`` after each episode end.

    Returns one record per reset and per step: ``("reset", obs, info)`` or
    ``("step", action, obs, reward, terminated, truncated, info)``.
    """
    rng = np.random.default_rng(action_seed)
    obs, info = env.reset(seed=seed)
    out: list[tuple] = [("reset", obs, info)]
    for _ in range(n_steps):
        action = mixed_action(env, rng)
        obs, reward, terminated, truncated, info = env.step(action)
        out.append(("step", action, obs, reward, terminated, truncated, info))
        if terminated or truncated:
            obs, info = env.reset()
            out.append(("reset", obs, info))
    return out


def hash_slates(world: Any, obs: dict[str, np.ndarray], k: int, salt: Any = 0) -> np.ndarray:
    """A deterministic policy that reads only each user's own observation, with no float
    arithmetic (so it acts identically on a user whatever the batch): the k items of the
    user's group released at time 0 with the smallest hash of (item, user, session, position in
    session, last item in history, salt). ``salt`` is a scalar or one value per row."""
    from simenv.streams import mix64
    from simenv.types import Obs, obs_users

    users = obs_users(obs).astype(np.int64)
    ctx = np.asarray(obs[Obs.CONTEXT])
    state = (
        users * 1_000_003
        + ctx[:, 1].astype(np.int64) * 7_919
        + ctx[:, 2].astype(np.int64) * 104_729
        + np.asarray(obs[Obs.ITEMS])[:, -1] * 15_485_863
        + np.asarray(salt, dtype=np.int64)
    )
    h = mix64(np.arange(world.n_items, dtype=np.uint64)[None, :] ^ mix64(state)[:, None])
    ok = (world.items.group[None, :] == world.users.group[users][:, None]) & (
        world.items.release_time[None, :] <= 0
    )
    h[~ok] = np.iinfo(np.uint64).max
    return np.argsort(h, axis=1, kind="stable")[:, :k]


def _feed(h: Any, x: Any) -> None:
    if isinstance(x, dict):
        for key in sorted(x):
            h.update(repr(key).encode())
            _feed(h, x[key])
    elif isinstance(x, (tuple, list)):
        h.update(f"seq{len(x)}".encode())
        for v in x:
            _feed(h, v)
    elif isinstance(x, np.ndarray):
        h.update(f"{x.dtype.str}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    elif isinstance(x, (bool, int, float, str, np.generic)) or x is None:
        h.update(f"{type(x).__name__}:{x!r}".encode())
    else:
        raise TypeError(f"cannot digest {type(x).__name__}")


def digest(x: Any) -> str:
    """SHA-256 of a nested structure of dicts, sequences, arrays and scalars (types included)."""
    h = hashlib.sha256()
    _feed(h, x)
    return h.hexdigest()


def assert_equal_nested(a: Any, b: Any, path: str = "") -> None:
    """Exact equality of nested dicts / sequences / arrays / scalars, with types and dtypes."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_equal_nested(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal_nested(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        )
        np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def sim_state(sim: Simulator) -> dict[str, np.ndarray]:
    """Copies of every array of a Simulator's per-slot state."""
    return {k: v.copy() for k, v in vars(sim).items() if isinstance(v, np.ndarray)}


def rng_state(rng: np.random.Generator) -> Any:
    """The bit generator state (a dict), for before / after comparisons."""
    return rng.bit_generator.state


def given_draws(uniform: np.ndarray, normal: np.ndarray, exponential: np.ndarray) -> StepDraws:
    """Explicit random numbers for ``Simulator.step``: makes a step's randomness a golden input.

    ``uniform`` is a (B, 3+) block (choice, like, return); ``normal`` the watch noise;
    ``exponential`` the session-gap draws.
    """
    u = np.asarray(uniform, dtype=np.float64)
    return StepDraws(
        choice=u[:, 0].copy(),
        like=u[:, 1].copy(),
        ret=u[:, 2].copy(),
        noise=np.asarray(normal, dtype=np.float64).copy(),
        gap=np.asarray(exponential, dtype=np.float64).copy(),
    )


# ---------------------------------------------------------------- config ranges
# The allowed range of every config field, on the default config of its class (cross-field
# bounds are resolved against those defaults): (low, high, integer, low_inclusive, high_inclusive).
# Written from the documented meaning of each field, independently of config.py's checks.
INF = float("inf")
CONFIG_RANGES: dict[str, dict[str, tuple]] = {
    "WorldConfig": {
        "n_items": (1, 50_000_000, True, True, True),
        "n_users": (1, 50_000_000, True, True, True),
        "n_groups": (1, 1_000, True, True, True),
        "n_topics": (3, 100_000, True, True, True),  # >= topics_per_user = 3
        "latent_dim": (1, 1_024, True, True, True),
        "n_creators": (4, 50_000_000, True, True, True),  # >= n_groups = 4
        "topics_per_creator": (1, 64, True, True, True),  # <= n_topics = 64
        "topics_per_user": (1, 64, True, True, True),
        "topic_spread": (0, 10, False, True, True),
        "user_spread": (0, 10, False, True, True),
        "popularity_exponent": (0, 5, False, True, True),
        "new_item_fraction": (0, 1, False, True, False),
        "release_horizon": (0, 1e6, False, False, True),
        "catalog_age": (0, 1e6, False, True, True),
        "title_length": (1, 256, True, True, True),
        "words_per_topic": (1, 10_000, True, True, True),
        "words_per_group": (1, 100_000, True, True, True),
        "noise_words": (1, 1_000_000, True, True, True),
        "title_topic_share": (0, 0.8, False, True, True),  # + title_group_share 0.2 <= 1
        "title_group_share": (0, 0.5, False, True, True),  # + title_topic_share 0.5 <= 1
        "title_sharpness": (0, 100, False, True, True),
        "mean_item_minutes": (0, 1e4, False, False, True),
        "cross_group_epsilon": (0, 1, False, True, True),
    },
    "UserModelConfig": {
        "affinity_scale": (0, 1e3, False, True, True),
        "quality_weight": (-1e3, 1e3, False, True, True),
        "popularity_weight": (-1e3, 1e3, False, True, True),
        "no_click_utility": (-1e3, 1e3, False, True, True),
        "position_decay": (0, 1e3, False, True, True),
        "fatigue_increment": (0, 1e3, False, True, True),
        "fatigue_half_life": (0, 1e6, False, False, True),
        "drift_rate": (0, 1, False, True, True),
        "watch_sharpness": (0, 1e3, False, True, True),
        "watch_offset": (-1e3, 1e3, False, True, True),
        "watch_noise": (0, 1e3, False, True, True),
        "like_threshold": (0.25, 1, False, True, True),  # >= dislike_threshold = 0.25
        "like_probability": (0, 1, False, True, True),
        "dislike_threshold": (0, 0.7, False, True, True),  # <= like_threshold = 0.7
        "step_cost": (0, 1e3, False, False, True),
        "refill": (0, 1e3, False, True, True),
        "mean_patience": (0, 1e6, False, False, True),
        "return_slope": (0, 1e3, False, True, True),
        "return_reference": (-1e3, 1e3, False, True, True),
        "mean_session_gap": (0, 1e6, False, False, True),
        "step_minutes": (0, 1e4, False, True, True),
    },
    "RewardConfig": {
        "click": (-1e6, 1e6, False, True, True),
        "like": (-1e6, 1e6, False, True, True),
        "dislike": (-1e6, 1e6, False, True, True),
        "watch": (-1e6, 1e6, False, True, True),
    },
    "EnvConfig": {
        "slate_size": (1, 1_000, True, True, True),
        "history_length": (1, 4_096, True, True, True),
        "max_steps": (1, 10_000_000, True, True, True),
        "start_time_max": (0, 1e6, False, True, True),
    },
}


def in_range(cls_name: str, field: str, value: Any) -> bool:
    """Whether ``value`` is allowed for ``field`` of the default ``cls_name`` (see CONFIG_RANGES)."""
    low, high, integer, low_inc, high_inc = CONFIG_RANGES[cls_name][field]
    if isinstance(value, bool):
        return False
    if integer:
        if not isinstance(value, (int, np.integer)):
            return False
    elif not isinstance(
        value, (int, float, np.integer, np.floating)
    ):  # any numpy float is a number
        return False
    try:
        v = float(value)
    except OverflowError:
        return False
    if not np.isfinite(v):
        return False
    return (v > low or (low_inc and v == low)) and (v < high or (high_inc and v == high))
