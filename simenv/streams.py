"""Counter-based random numbers: every draw is a hash of (seed, user, episode, step, draw index).

Common random numbers (CRN) for paired comparisons: a user's random draws must not depend on
what happens to other users, on how many users are stepped at once, or on the order they
start in. A sequential generator shared by all slots cannot give that (one more draw for user
A shifts every later draw of user B). Here every draw is a pure function of

    (env seed key, user id, that user's episode number, step in the episode, draw index),

computed for a whole batch at once with vectorised uint64 arithmetic: the per-episode
*stream key* ``K = H(H(seed_key ^ H(user + c_user)) ^ H(episode + c_episode))`` and the draw
``x = H(K + n * gamma)`` for draw counter ``n`` (SplitMix64, Steele, Lea & Flood 2014:
``gamma`` the golden-ratio increment, ``H`` its output mix, a bijection of 64-bit words).
Uniforms take the top 52 bits of ``x`` as the mantissa of a float in [1, 2), minus 1 (exact,
and several times faster in numpy than converting 64-bit integers to floats); normals come from two uniforms by Box-Muller;
exponentials are ``-log(1 - u)``.

The draw counter of step ``s`` of an episode (``s = 0, 1, ...``) is ``DRAWS_PER_STEP * (s + 1)
+ j``; counters ``0 .. DRAWS_PER_STEP - 1`` belong to the episode's start (its start time).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DRAWS_PER_STEP",
    "mix64",
    "seed_key",
    "stream_keys",
    "slot_keys",
    "uniforms",
    "step_uniforms",
    "to_unit",
    "normal_from_uniforms",
    "exponential_from_uniform",
    "occurrence_index",
]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64 increment (2^64 / golden ratio, odd)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S12 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(12)
_ONE_BITS = np.uint64(0x3FF0000000000000)  # exponent bits of 1.0 (float64)
_MASK64 = (1 << 64) - 1
_USER_TAG = np.uint64(0x5EED0F05E4000001)  # domain tags keep the key spaces apart
_EPISODE_TAG = np.uint64(0xE9150DE000000003)
_SLOT_TAG = np.uint64(0x51075EED00000005)

DRAWS_PER_STEP = 8
"""Counters reserved per step (the simulator uses 6: choice, like, return, 2 for the watch
noise, session gap); the rest are spare, so adding a draw later keeps the others unchanged."""
_STEP_GAMMA = np.uint64((DRAWS_PER_STEP * int(_GAMMA)) & _MASK64)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 words (a bijection; a new array).

    ``x ^= x >> 30; x *= M1; x ^= x >> 27; x *= M2; x ^= x >> 31`` (arithmetic mod 2^64).
    """
    x = np.asarray(x, dtype=np.uint64)
    y = x >> _S30
    y ^= x
    y *= _M1
    y ^= y >> _S27
    y *= _M2
    y ^= y >> _S31
    return y


def seed_key(seed: int) -> int:
    """The 64-bit key of an env seed (any non-negative int), through numpy's ``SeedSequence``."""
    return int(np.random.SeedSequence(int(seed)).generate_state(1, np.uint64)[0]) & _MASK64


def stream_keys(key: int, users: np.ndarray, episodes: np.ndarray) -> np.ndarray:
    """Stream key of each (user, episode) under the env key: uint64 (n,)."""
    users = np.asarray(users).astype(np.uint64)
    episodes = np.asarray(episodes).astype(np.uint64)
    users = np.atleast_1d(users)
    k = mix64(np.uint64(key) ^ mix64(users + _USER_TAG))
    return mix64(k ^ mix64(np.atleast_1d(episodes) + _EPISODE_TAG))


def slot_keys(key: int, slots: np.ndarray, episodes: np.ndarray) -> np.ndarray:
    """Stream key of each (slot, slot episode).

    For draws that belong to a slot, not a user: which user a slot starts when none is given.
    """
    slots = np.asarray(slots).astype(np.uint64)
    episodes = np.asarray(episodes).astype(np.uint64)
    slots = np.atleast_1d(slots)
    k = mix64(np.uint64(key) ^ mix64(slots + _SLOT_TAG))
    return mix64(k ^ mix64(np.atleast_1d(episodes) + _EPISODE_TAG))


def to_unit(x: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float64 from uint64 words: the top 52 bits as the mantissa of [1, 2), minus 1."""
    return ((x >> _S12) | _ONE_BITS).view(np.float64) - 1.0


def uniforms(keys: np.ndarray, counters: np.ndarray | int) -> np.ndarray:
    """Uniform [0, 1) float64 draws ``H(key + counter * gamma)`` (broadcast shapes).

    Args:
        keys: uint64 stream keys.
        counters: draw counters (int or array broadcastable with ``keys``).
    """
    c = np.atleast_1d(np.asarray(counters).astype(np.uint64))
    k = np.atleast_1d(np.asarray(keys, dtype=np.uint64))
    out = to_unit(mix64(k + c * _GAMMA))  # arrays wrap mod 2^64 silently (scalars would warn)
    return out.reshape(np.broadcast_shapes(np.shape(keys), np.shape(counters)))


def step_uniforms(keys: np.ndarray, steps: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` uniforms of each slot's current step: float64 (n, B), draw-major.

    Row ``j`` is draw ``j`` of step ``steps[b]`` of stream ``keys[b]``, i.e. counter
    ``DRAWS_PER_STEP * (steps[b] + 1) + j`` (see the module docstring); the same numbers as
    :func:`uniforms`, computed in place to keep the hot path cheap.
    """
    if not 0 < n <= DRAWS_PER_STEP:
        raise ValueError(f"n must be in [1, {DRAWS_PER_STEP}], got {n}")
    c = steps.astype(np.uint64)
    c += np.uint64(1)
    c *= _STEP_GAMMA  # (B,) first counter of the step, times gamma (mod 2^64)
    c += keys
    x = c[None, :] + (np.arange(n, dtype=np.uint64) * _GAMMA)[:, None]  # (n, B)
    # mix64 in place
    y = x >> _S30
    x ^= y
    x *= _M1
    np.right_shift(x, _S27, out=y)
    x ^= y
    x *= _M2
    np.right_shift(x, _S31, out=y)
    x ^= y
    x >>= _S12
    x |= _ONE_BITS
    u = x.view(np.float64)
    u -= 1.0
    return u


def normal_from_uniforms(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Standard normal draws by Box-Muller: ``sqrt(-2 log(1 - u1)) cos(2 pi u2)``, float64.

    The cosine is taken in float32 (numpy's float64 cosine is 15x slower; a normal with a
    float32 angle is still a normal to far better than the simulator's needs).
    """
    r = np.sqrt(-2.0 * np.log1p(-u1))
    return r * np.cos(np.float32(2.0 * np.pi) * u2.astype(np.float32))


def exponential_from_uniform(u: np.ndarray) -> np.ndarray:
    """Standard exponential draws ``-log(1 - u)`` (finite for u in [0, 1)), float64."""
    return -np.log1p(-u)


def occurrence_index(values: np.ndarray) -> np.ndarray:
    """For each element, how many equal elements come before it (int64, same shape, 1-D)."""
    values = np.asarray(values)
    n = values.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(values, kind="stable")
    s = values[order]
    new = np.r_[True, s[1:] != s[:-1]]
    start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n) - start
    return out
