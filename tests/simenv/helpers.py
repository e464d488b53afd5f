"""Shared helpers of the simenv tests: rollouts, trajectory digests, state snapshots, a fake RNG."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from simenv.core import Simulator


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


class FakeRng:
    """Stands in for ``numpy.random.Generator`` in ``Simulator.step``: returns given draws.

    ``uniform`` is the (B, 4) block (choice, like, return, spare); ``normal`` the watch noise;
    ``exponential`` the session-gap draws. Makes a step's randomness explicit in golden tests.
    """

    def __init__(self, uniform: np.ndarray, normal: np.ndarray, exponential: np.ndarray) -> None:
        self.uniform = np.asarray(uniform, dtype=np.float64)
        self.normal = np.asarray(normal, dtype=np.float64)
        self.exponential = np.asarray(exponential, dtype=np.float64)

    def random(self, shape: tuple[int, int]) -> np.ndarray:
        assert self.uniform.shape == tuple(shape), (self.uniform.shape, shape)
        return self.uniform.copy()

    def standard_normal(self, n: int) -> np.ndarray:
        assert self.normal.shape == (n,)
        return self.normal.copy()

    def standard_exponential(self, n: int) -> np.ndarray:
        assert self.exponential.shape == (n,)
        return self.exponential.copy()
