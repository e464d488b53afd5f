"""The user model, broken into named parts (RecSim's user / choice / response split).

Each part is a pure, batched function over ``B`` users; :class:`simenv.core.Simulator` wires
them in order. The equations are repeated in :class:`simenv.RecEnv`'s docstring.

1. :func:`slate_utilities`  - what each shown item is worth to the user right now.
2. :func:`choose`           - multinomial logit over the slate plus a no-click option.
3. :func:`respond`          - watch fraction, like / dislike, watch minutes of the chosen item.
4. :func:`step_reward`      - the reward mix.
5. transitions (drift, fatigue, budget, sessions) live in the simulator's step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simenv.config import RewardConfig, UserModelConfig
from simenv.types import EventType

__all__ = ["slate_utilities", "choose", "respond", "step_reward", "Response", "position_bias"]


def position_bias(config: UserModelConfig, k: int) -> np.ndarray:
    """Examination term of each slate position: ``-eta * log(1 + j)``, float32 (k,)."""
    return (-config.position_decay * np.log1p(np.arange(k))).astype(np.float32)


def slate_utilities(
    static: np.ndarray,
    fatigue: np.ndarray,
    same_group: np.ndarray,
    pos_bias: np.ndarray,
    cross_group_log_eps: float,
) -> np.ndarray:
    """Click utility of each shown item (position-major arrays: row j = slate position j).

    ``u_jb = alpha * <p_b, z_jb> + appeal_jb - fatigue_b[topic_jb] + pos_j``;
    other-group items get ``-inf`` (or ``log(epsilon)`` added).

    Args:
        static: float32 (k, B) ``alpha * <p_b, z_i> + appeal_i``.
        fatigue: float32 (k, B) the user's fatigue on each item's topic.
        same_group: bool (k, B) item in the user's group.
        pos_bias: float32 (k,) examination term per position.
        cross_group_log_eps: ``log(epsilon)`` or ``-inf``.

    Returns:
        float32 (k, B) utilities (a new array).
    """
    u = static - fatigue
    u += pos_bias[:, None]
    if cross_group_log_eps == -np.inf:
        u[~same_group] = -np.inf
    else:
        u[~same_group] += np.float32(cross_group_log_eps)
    return u


def choose(
    utilities: np.ndarray, no_click_utility: float, uniform: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logit over the slate plus a no-click option.

    ``P(j) = exp(u_j) / (exp(u_0) + sum_l exp(u_l))``, ``P(none) = exp(u_0) / (...)``.
    One uniform number per user picks the outcome by inverse CDF: the first position whose
    cumulative weight exceeds ``uniform * total`` (strictly, so a zero-probability item is never
    chosen), or no click when none does.

    Args:
        utilities: float32 (k, B), position-major; ``-inf`` = never clicked.
        no_click_utility: u_0.
        uniform: float (B,) in [0, 1).

    Returns:
        ``(chosen int64 (B,) with -1 for no click, probabilities float32 (k, B))``.
    """
    k = utilities.shape[0]
    m = np.maximum(utilities.max(axis=0), np.float32(no_click_utility))  # (B,) stabiliser
    e = np.exp(utilities - m)  # (k, B); exp(-inf) = 0
    cdf = np.cumsum(e, axis=0)  # (k, B)
    total = cdf[-1] + np.exp(no_click_utility - m)  # (B,)
    chosen = (cdf <= uniform * total).sum(axis=0)
    chosen[chosen == k] = -1
    e /= total
    return chosen.astype(np.int64), e.astype(np.float32, copy=False)


@dataclass(frozen=True)
class Response:
    """Feedback on the chosen items of a batch (rows without a click have zeros).

    Attributes:
        clicked: bool (B,).
        watch_fraction: float32 (B,) in (0, 1).
        watch_minutes: float32 (B,).
        event: int64 (B,) EventType of the click (IMPRESSION where no click).
    """

    clicked: np.ndarray
    watch_fraction: np.ndarray
    watch_minutes: np.ndarray
    event: np.ndarray


def respond(
    clicked: np.ndarray,
    match: np.ndarray,
    quality: np.ndarray,
    fatigue: np.ndarray,
    minutes: np.ndarray,
    noise: np.ndarray,
    uniform_like: np.ndarray,
    config: UserModelConfig,
) -> Response:
    """Watch fraction, like / dislike and watch time of the chosen item.

    ``w = sigmoid(kappa * (<p, z> - offset) + 0.5 * quality - fatigue + sigma * noise)``;
    ``DISLIKE`` if ``w < dislike_threshold``; ``LIKE`` with probability ``like_probability`` if
    ``w >= like_threshold``; otherwise ``CLICK``. Watch minutes = ``w * item minutes``.

    All arguments are (B,) arrays for the chosen item of each row (any value where not clicked).
    """
    logit = config.watch_sharpness * (match - config.watch_offset) + 0.5 * quality - fatigue
    logit = logit + config.watch_noise * noise
    w = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    w = np.where(clicked, w, np.float32(0.0))
    event = np.full(clicked.shape, int(EventType.CLICK), dtype=np.int64)
    event[w < config.dislike_threshold] = int(EventType.DISLIKE)
    event[(w >= config.like_threshold) & (uniform_like < config.like_probability)] = int(
        EventType.LIKE
    )
    event[~clicked] = int(EventType.IMPRESSION)
    return Response(
        clicked=clicked,
        watch_fraction=w,
        watch_minutes=(w * minutes).astype(np.float32),
        event=event,
    )


def step_reward(response: Response, config: RewardConfig) -> np.ndarray:
    """``click * clicks + like * likes + dislike * dislikes + watch * minutes``, float32 (B,)."""
    r = config.click * response.clicked.astype(np.float32)
    if config.like:
        r += config.like * (response.event == EventType.LIKE)
    if config.dislike:
        r += config.dislike * (response.event == EventType.DISLIKE)
    if config.watch:
        r += config.watch * response.watch_minutes
    return r.astype(np.float32)
