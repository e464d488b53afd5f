"""Frozen, validated configuration of the world, the user model and the environments.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the
field, the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["WorldConfig", "UserModelConfig", "RewardConfig", "EnvConfig", "check_range"]


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number within ``[low, high]``.

    Args:
        name: argument name used in the message.
        value: the value to check.
        low: lower bound (``None`` = unbounded).
        high: upper bound (``None`` = unbounded).
        integer: require an integer (``bool`` is rejected).
        low_inclusive: whether ``low`` itself is allowed.
        high_inclusive: whether ``high`` itself is allowed.
    """
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = f"{'[' if low_inclusive else '('}{lo}, {hi}{']' if high_inclusive else ')'}"
    kind = "an integer" if integer else "a number"
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, float, np.floating))
        and not hasattr(value, "__index__")
    ):
        raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}")
    if integer and not (isinstance(value, int) or hasattr(value, "__index__")):
        raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}")
    try:
        v = float(value)
    except (OverflowError, TypeError, ValueError):  # e.g. an int too large for a float
        raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}")
    if low is not None and (v < low or (not low_inclusive and v == low)):
        raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}")
    if high is not None and (v > high or (not high_inclusive and v == high)):
        raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}")


class _Config:
    """Mixin: ``replace`` and dict round trip for frozen dataclass configs."""

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (nested configs become dicts)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class WorldConfig(_Config):
    """The hidden truth's size and structure. Defaults are the project's default world.

    Attributes:
        n_items: catalog size N.
        n_users: user population size.
        n_groups: disjoint user-item groups (think languages): users never engage outside theirs.
        n_topics: topics shared by all groups; an item's latent vector lies near its topic centroid.
        latent_dim: dimension d of the true preference space (the world's "true rank" is about
            ``latent_dim`` plus one dimension per group plus one for item appeal).
        n_creators: creators; each belongs to one group and sticks to ``topics_per_creator`` topics.
        topics_per_creator: topics a creator publishes in.
        topics_per_user: topics mixed into a user's preference vector.
        topic_spread: scale of an item's deviation from its topic centroid (creator + own noise).
        user_spread: scale of a user's individual deviation from the mix of topic centroids.
        popularity_exponent: Zipf exponent s of items' base popularity ``rank ** -s``.
        new_item_fraction: share of items released after time 0 (uniformly over ``release_horizon``).
        release_horizon: days over which new items are released.
        catalog_age: days before time 0 over which the initial catalog was released.
        title_length: tokens per title.
        words_per_topic: words in each (group, topic) vocabulary.
        words_per_group: generic words of each group's language.
        noise_words: words shared by every group that carry no signal.
        title_topic_share: probability that a title token is a (group, topic) word.
        title_group_share: probability that a title token is a generic word of the item's group.
        title_sharpness: how strongly an item's deviation from its topic picks its topic words.
        mean_item_minutes: mean item length in minutes (lognormal).
        cross_group_epsilon: click-probability multiplier for items of another group; 0 means the
            user never engages outside the group (the default).
    """

    n_items: int = 20_000
    n_users: int = 10_000
    n_groups: int = 4
    n_topics: int = 64
    latent_dim: int = 16
    n_creators: int = 2_000
    topics_per_creator: int = 2
    topics_per_user: int = 3
    topic_spread: float = 0.5
    user_spread: float = 0.3
    popularity_exponent: float = 1.0
    new_item_fraction: float = 0.1
    release_horizon: float = 30.0
    catalog_age: float = 365.0
    title_length: int = 8
    words_per_topic: int = 24
    words_per_group: int = 40
    noise_words: int = 400
    title_topic_share: float = 0.5
    title_group_share: float = 0.2
    title_sharpness: float = 4.0
    mean_item_minutes: float = 5.0
    cross_group_epsilon: float = 0.0

    def __post_init__(self) -> None:
        check_range("n_items", self.n_items, 1, 50_000_000, integer=True)
        check_range("n_users", self.n_users, 1, 50_000_000, integer=True)
        check_range("n_groups", self.n_groups, 1, 1_000, integer=True)
        check_range("n_topics", self.n_topics, 1, 100_000, integer=True)
        check_range("latent_dim", self.latent_dim, 1, 1_024, integer=True)
        check_range("n_creators", self.n_creators, self.n_groups, 50_000_000, integer=True)
        check_range("topics_per_creator", self.topics_per_creator, 1, self.n_topics, integer=True)
        check_range("topics_per_user", self.topics_per_user, 1, self.n_topics, integer=True)
        check_range("topic_spread", self.topic_spread, 0, 10)
        check_range("user_spread", self.user_spread, 0, 10)
        check_range("popularity_exponent", self.popularity_exponent, 0, 5)
        check_range("new_item_fraction", self.new_item_fraction, 0, 1, high_inclusive=False)
        check_range("release_horizon", self.release_horizon, 0, 1e6, low_inclusive=False)
        check_range("catalog_age", self.catalog_age, 0, 1e6)
        check_range("title_length", self.title_length, 1, 256, integer=True)
        check_range("words_per_topic", self.words_per_topic, 1, 10_000, integer=True)
        check_range("words_per_group", self.words_per_group, 1, 100_000, integer=True)
        check_range("noise_words", self.noise_words, 1, 1_000_000, integer=True)
        check_range("title_topic_share", self.title_topic_share, 0, 1)
        check_range("title_group_share", self.title_group_share, 0, 1)
        if self.title_topic_share + self.title_group_share > 1:
            raise ValueError(
                "title_topic_share + title_group_share must be <= 1, got "
                f"{self.title_topic_share} + {self.title_group_share}"
            )
        check_range("title_sharpness", self.title_sharpness, 0, 100)
        check_range("mean_item_minutes", self.mean_item_minutes, 0, 1e4, low_inclusive=False)
        check_range("cross_group_epsilon", self.cross_group_epsilon, 0, 1)

    @property
    def vocab_size(self) -> int:
        """Token ids including padding id 0."""
        return (
            1
            + self.n_groups * self.n_topics * self.words_per_topic
            + self.n_groups * self.words_per_group
            + self.noise_words
        )

    @classmethod
    def small(cls, **changes: Any) -> WorldConfig:
        """A small world for tests and fast RL experiments (500 items, 300 users)."""
        base = dict(
            n_items=500,
            n_users=300,
            n_groups=2,
            n_topics=8,
            latent_dim=8,
            n_creators=40,
            words_per_topic=8,
            words_per_group=10,
            noise_words=50,
            release_horizon=10.0,
        )
        base.update(changes)
        return cls(**base)


@dataclass(frozen=True)
class RewardConfig(_Config):
    """Reward of one step: a weighted sum of the feedback on the slate (``RecEnv`` equation 4).

    Attributes:
        click: c_click, reward of a click (any click, liked or disliked too): ``c_click * click``.
        like: c_like, added for a like: ``c_like * like``.
        dislike: c_dislike, added for a skip / dislike: ``c_dislike * dislike``.
        watch: c_watch, reward per minute watched: ``c_watch * minutes``.
    """

    click: float = 1.0
    like: float = 1.0
    dislike: float = -1.0
    watch: float = 0.0

    def __post_init__(self) -> None:
        for name in ("click", "like", "dislike", "watch"):
            check_range(name, getattr(self, name), -1e6, 1e6)


@dataclass(frozen=True)
class UserModelConfig(_Config):
    """Parameters of the user response and dynamics (the equations are in ``RecEnv``'s docstring).

    Each help names the field's symbol (if the equations use one) and quotes the equation it
    enters, verbatim from ``RecEnv``'s docstring (a test checks that they agree).

    Attributes:
        affinity_scale: alpha, weight of the match in the click utility: ``alpha <p, z_i>``.
        quality_weight: beta_q, weight of item quality in the click utility: ``beta_q q_i``.
        popularity_weight: beta_pop, weight of centred log base popularity (general appeal):
            ``beta_pop (log pop_i - mean)``.
        no_click_utility: u_0, utility of not clicking anything:
            ``P(j) = e^{u_j} / (e^{u_0} + sum_l e^{u_l})``.
        position_decay: eta, position bias of slate position j (0 at the top):
            ``- eta log(1 + j)``.
        fatigue_increment: added to the fatigue of a topic each time the user consumes it:
            ``F[topic_i] += fatigue_increment``.
        fatigue_half_life: half_life, days for fatigue to halve: ``F <- F 2^{-dt / half_life}``.
        drift_rate: rho, interest drift toward a consumed item, scaled by its watch fraction,
            then renormalised: ``p <- (p + rho w (z_i - p)) / |p + rho w (z_i - p)|``.
        watch_sharpness: kappa, slope of the watch fraction's logit in the match:
            ``kappa (<p, z_i> - offset)``.
        watch_offset: offset, the match at which that term of the logit is zero:
            ``kappa (<p, z_i> - offset)``.
        watch_noise: sigma, standard deviation of the noise in the watch fraction's logit:
            ``sigma * N(0, 1)``.
        like_threshold: watch fraction at or above which a like may follow:
            ``w >= like_threshold``.
        like_probability: probability of a like then: ``like_probability``.
        dislike_threshold: watch fraction below which the click counts as a skip / dislike:
            ``w < dislike_threshold``.
        step_cost: session budget spent by every slate:
            ``b <- min(patience, b + refill * s - step_cost)``.
        refill: budget gained per unit of satisfaction ``s = w + 0.5 like - 0.5 dislike``:
            ``b <- min(patience, b + refill * s - step_cost)``.
        mean_patience: sets the users' patience (initial and refilled session budget), drawn
            with the world: ``patience = 1 + Gamma(4, mean_patience / 4)``, mean
            ``mean_patience + 1``.
        return_slope: slope of the return probability's logit in the session's mean
            satisfaction: ``sigmoid(return_slope (mean s in session - return_reference))``.
        return_reference: the mean session satisfaction at which the return probability is
            half its maximum ``(0.5 + 0.5 activity)``:
            ``(0.5 + 0.5 activity) * sigmoid(return_slope (mean s in session - return_reference))``.
        mean_session_gap: mean days between sessions of a user of activity 1; the gap is
            exponential with mean ``mean_session_gap / activity`` days.
        step_minutes: minutes a slate takes to look at; time advances by
            ``step_minutes + minutes`` (minutes watched).
    """

    affinity_scale: float = 5.0
    quality_weight: float = 0.3
    popularity_weight: float = 0.3
    no_click_utility: float = 2.5
    position_decay: float = 0.5
    fatigue_increment: float = 0.5
    fatigue_half_life: float = 0.5
    drift_rate: float = 0.05
    watch_sharpness: float = 4.0
    watch_offset: float = 0.4
    watch_noise: float = 0.5
    like_threshold: float = 0.7
    like_probability: float = 0.5
    dislike_threshold: float = 0.25
    step_cost: float = 1.0
    refill: float = 1.6
    mean_patience: float = 10.0
    return_slope: float = 6.0
    return_reference: float = 0.15
    mean_session_gap: float = 1.0
    step_minutes: float = 1.0

    def __post_init__(self) -> None:
        check_range("affinity_scale", self.affinity_scale, 0, 1e3)
        check_range("quality_weight", self.quality_weight, -1e3, 1e3)
        check_range("popularity_weight", self.popularity_weight, -1e3, 1e3)
        check_range("no_click_utility", self.no_click_utility, -1e3, 1e3)
        check_range("position_decay", self.position_decay, 0, 1e3)
        check_range("fatigue_increment", self.fatigue_increment, 0, 1e3)
        check_range("fatigue_half_life", self.fatigue_half_life, 0, 1e6, low_inclusive=False)
        check_range("drift_rate", self.drift_rate, 0, 1)
        check_range("watch_sharpness", self.watch_sharpness, 0, 1e3)
        check_range("watch_offset", self.watch_offset, -1e3, 1e3)
        check_range("watch_noise", self.watch_noise, 0, 1e3)
        check_range("like_threshold", self.like_threshold, 0, 1)
        check_range("like_probability", self.like_probability, 0, 1)
        check_range("dislike_threshold", self.dislike_threshold, 0, 1)
        if self.dislike_threshold > self.like_threshold:
            raise ValueError(
                f"dislike_threshold ({self.dislike_threshold}) must be <= like_threshold "
                f"({self.like_threshold})"
            )
        check_range("step_cost", self.step_cost, 0, 1e3, low_inclusive=False)
        check_range("refill", self.refill, 0, 1e3)
        check_range("mean_patience", self.mean_patience, 0, 1e6, low_inclusive=False)
        check_range("return_slope", self.return_slope, 0, 1e3)
        check_range("return_reference", self.return_reference, -1e3, 1e3)
        check_range("mean_session_gap", self.mean_session_gap, 0, 1e6, low_inclusive=False)
        check_range("step_minutes", self.step_minutes, 0, 1e4)


@dataclass(frozen=True)
class EnvConfig(_Config):
    """What an environment needs besides the world.

    Attributes:
        world: the world config (used when no ``World`` instance is given).
        user_model: user response and dynamics.
        reward: reward weights.
        slate_size: k, items per slate.
        history_length: L, events kept in the observation.
        max_steps: horizon in slates per episode; the episode is truncated there.
        start_time_max: a new user's first session starts uniformly in ``[0, start_time_max]`` days.
        info_level: ``"basic"`` (user, group, slate affinities and click probabilities) or
            ``"full"`` (also the best achievable affinity over the released in-group catalog,
            a full-catalog pass per step).
    """

    world: WorldConfig = field(default_factory=WorldConfig)
    user_model: UserModelConfig = field(default_factory=UserModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    slate_size: int = 10
    history_length: int = 32
    max_steps: int = 200
    start_time_max: float = 7.0
    info_level: str = "basic"

    def __post_init__(self) -> None:
        for name, cls in (
            ("world", WorldConfig),
            ("user_model", UserModelConfig),
            ("reward", RewardConfig),
        ):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        check_range("slate_size", self.slate_size, 1, min(self.world.n_items, 1_000), integer=True)
        check_range("history_length", self.history_length, 1, 4_096, integer=True)
        check_range("max_steps", self.max_steps, 1, 10_000_000, integer=True)
        check_range("start_time_max", self.start_time_max, 0, 1e6)
        if self.info_level not in ("basic", "full"):
            raise ValueError(f"info_level must be 'basic' or 'full', got {self.info_level!r}")

    @classmethod
    def small(cls, **changes: Any) -> EnvConfig:
        """Small catalog for tests and quick RL training (see ``WorldConfig.small``)."""
        base: dict[str, Any] = dict(
            world=WorldConfig.small(), slate_size=5, history_length=16, max_steps=100
        )
        base.update(changes)
        return cls(**base)
