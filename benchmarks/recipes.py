"""The ranker recipe shared by the ranker, consistency and loop experiments.

A :class:`RankerRecipe` names everything that decides what the single-stage ranker earns online:
the behaviour log it learns from (policy, exploration, volume), what it predicts (the click, or
the expected reward of the env's reward mix from several heads), how position bias in the labels
is handled, its features and capacity, its training budget, and whether it is served with the
user's logged history (:class:`agents.memory.UserMemory`). :data:`CURRENT` is the recipe before
the diagnosis of ``benchmarks/ranker.py``; :data:`IMPROVED` is the recipe that diagnosis chose on
validation users (its report shows the choice per factor and seed).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from agents.memory import UserMemory
from agents.pipeline import reward_head_weights
from benchmarks.common import POLICIES, OfflineData, get_log, get_world, prepare_offline
from ranking import Ranker, RankerConfig, RankerTrainConfig, train_ranker
from ranking.train import MAX_CATALOG_NEGATIVES
from simenv.config import EnvConfig, RewardConfig, check_range
from simenv.history import EventSequences
from simenv.log import ImpressionLog
from simenv.types import Columns

__all__ = [
    "RankerRecipe",
    "CURRENT",
    "IMPROVED",
    "recipe_data",
    "ranker_config",
    "train_recipe_ranker",
    "serve",
    "head_weights",
    "subsample_requests",
    "profile_recipe",
    "recipe_ranker",
    "QUICK_SLATES_PER_EPOCH",
    "append_log",
    "self_logging_round",
]

#: Slates per epoch of every recipe under ``--quick`` (the full profile keeps the recipe's own).
QUICK_SLATES_PER_EPOCH = 40_000

POSITION_MODES = ("none", "feature", "ipw")


@dataclass(frozen=True)
class RankerRecipe:
    """Data, target, training and serving of the ranker.

    Attributes:
        policy: behaviour policy of the log (:data:`benchmarks.common.POLICIES`).
        epsilon: its uniform exploration over the whole catalog.
        episodes_per_user: logged user episodes per user of the world.
        heads: the ranker's heads (``("click",)``: click probability; adding ``"like"`` and
            ``"dislike"`` (and ``"watch"``) makes the score the expected reward of the env's
            reward mix, weights from :func:`head_weights`).
        position: position bias in the labels: ``"none"``, ``"feature"`` (a learned click-logit
            offset per slate position during training, served at the top position) or
            ``"ipw"`` (clicks weighted by the inverse of the examination probability of their
            position, estimated from the log).
        catalog_negatives: uniformly drawn released catalog items appended to each training
            slate as "not clicked" pointwise examples (:class:`ranking.RankerTrainConfig`;
            0: off): the ranker is told something about the items the log never showed.
        cross_features: the ranker's pair crosses (an ablation removes some).
        hidden: the pair network's width.
        mlp: widths of its ReLU layers.
        epochs: training epochs.
        max_slates_per_epoch: slates drawn per epoch (the same compute for every log volume).
        memory: serve with the user's logged history merged into the observation.
        own_log_rounds: rounds of self-logging before the final training (the ranker learns
            from the exposure its own agent creates): each round trains the recipe's ranker
            and a positives-only two-tower on the data so far, lets that pipeline (K = 200,
            epsilon-greedy) play ``own_log_episodes`` episodes per user, and appends the
            impressions of the training period to the training log.
        own_log_episodes: episodes per user of each self-logging round.
        own_log_epsilon: epsilon-greedy exploration of the self-logging agent.
        generator_epochs: epochs of that agent's positives-only generator.
    """

    policy: str = "popularity"
    epsilon: float = 0.05
    episodes_per_user: float = 3.0
    heads: tuple[str, ...] = ("click",)
    position: str = "none"
    catalog_negatives: int = 0
    cross_features: tuple[str, ...] = RankerConfig().cross_features
    hidden: int = 32
    mlp: tuple[int, ...] = (32,)
    epochs: int = 2
    max_slates_per_epoch: int | None = 100_000
    memory: bool = False
    own_log_rounds: int = 0
    own_log_episodes: float = 0.5
    own_log_epsilon: float = 0.1
    generator_epochs: int = 3

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if not self.episodes_per_user > 0:
            raise ValueError(f"episodes_per_user must be > 0, got {self.episodes_per_user}")
        if self.position not in POSITION_MODES:
            raise ValueError(f"position must be one of {POSITION_MODES}, got {self.position!r}")
        check_range(
            "catalog_negatives", self.catalog_negatives, 0, MAX_CATALOG_NEGATIVES, integer=True
        )
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        m = self.max_slates_per_epoch
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_slates_per_epoch must be None or an integer >= 1, got {m!r}")
        for name in ("own_log_rounds", "generator_epochs"):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int)
                or v < (0 if name == "own_log_rounds" else 1)
            ):
                raise ValueError(
                    f"{name} must be an integer >= {0 if name == 'own_log_rounds' else 1}, got {v!r}"
                )
        if not self.own_log_episodes > 0:
            raise ValueError(f"own_log_episodes must be > 0, got {self.own_log_episodes}")
        if not 0.0 <= self.own_log_epsilon <= 1.0:
            raise ValueError(f"own_log_epsilon must be in [0, 1], got {self.own_log_epsilon}")
        RankerConfig(heads=self.heads, score_weights=(1.0,) * len(self.heads))  # validates heads
        RankerConfig(cross_features=self.cross_features, hidden=self.hidden, mlp=self.mlp)

    def replace(self, **changes: Any) -> RankerRecipe:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def log_key(self) -> tuple[str, float, float]:
        """What identifies the behaviour log: (policy, epsilon, episodes per user)."""
        return (self.policy, float(self.epsilon), float(self.episodes_per_user))

    @property
    def base(self) -> RankerRecipe:
        """The recipe without self-logging (what each self-logging round trains)."""
        return self.replace(own_log_rounds=0)


#: The recipe before issue 10's diagnosis: click head, popularity log, served without memory.
CURRENT = RankerRecipe()
#: The recipe the diagnosis chose on validation users (see ``benchmarks/ranker.py``).
#: Catalog negatives joined it after a quick-profile validation run (one seed, validation
#: users: improved 20.48 -> 23.86 with 16 per slate); the full run tests it on test users.
IMPROVED = RankerRecipe(own_log_rounds=1, memory=True, catalog_negatives=16)


def head_weights(heads: tuple[str, ...], reward: RewardConfig) -> tuple[float, ...]:
    """Score weights of the heads: the env's reward mix (see :func:`agents.pipeline.reward_head_weights`)."""
    return reward_head_weights(heads, reward)


def ranker_config(recipe: RankerRecipe, env: EnvConfig, seed: int) -> RankerConfig:
    """The :class:`RankerConfig` of a recipe (weights of the heads from the env's reward mix)."""
    return RankerConfig(
        hidden=recipe.hidden,
        mlp=recipe.mlp,
        cross_features=recipe.cross_features,
        heads=recipe.heads,
        score_weights=head_weights(recipe.heads, env.reward),
        seed=seed,
    )


def recipe_data(quick: bool, seed: int, recipe: RankerRecipe, cache: bool = True) -> OfflineData:
    """The recipe's behaviour log of the profile's world, split by time (cached by default).

    ``cache=False`` builds it afresh and keeps nothing in memory after the caller drops it (the
    diagnosis's one-off logs, e.g. ten episodes per user).
    """
    from benchmarks.common import env_config, offline_data

    if recipe.own_log_rounds:
        return (
            _self_logged(quick, seed, recipe, None)
            if cache
            else _self_logged.__wrapped__(quick, seed, recipe, None)
        )
    if cache:
        return offline_data(quick, seed, recipe.policy, recipe.epsilon, recipe.episodes_per_user)
    log = get_log.__wrapped__(
        quick, seed, recipe.policy, recipe.epsilon, recipe.episodes_per_user, False
    )
    label = f"{recipe.policy}(eps={recipe.epsilon:g}, {recipe.episodes_per_user:g} ep/user)"
    return prepare_offline(
        get_world(quick, seed), env_config(quick), log, 32, 1_000 if quick else 2_000, seed, label
    )


def subsample_requests(log: ImpressionLog, n_requests: int, seed: int) -> ImpressionLog:
    """At most ``n_requests`` whole slates of ``log``, drawn without replacement (seeded)."""
    req = log[Columns.REQUEST]
    uniq = np.unique(req)
    if uniq.size <= n_requests:
        return log
    keep = np.random.default_rng(np.random.SeedSequence([seed, 0x5AB5])).choice(
        uniq, size=n_requests, replace=False
    )
    return log.select(np.isin(req, keep))


def train_recipe_ranker(
    data: OfflineData,
    recipe: RankerRecipe,
    seed: int,
    threads: int | None = None,
    train_log: ImpressionLog | None = None,
    sequences: EventSequences | None = None,
) -> tuple[Ranker, Any]:
    """Train the recipe's ranker on ``data.train`` (or ``train_log``); validation: ``data.valid``.

    ``sequences``: the events observations are rebuilt from (default ``data.seq_trval``).

    A log with more slates than the recipe's budget (``epochs * max_slates_per_epoch``) is
    subsampled to that many whole slates first: the same as drawing them without replacement,
    without building observations for slates that would never be drawn.

    Returns:
        ``(ranker, training history)``.
    """
    log = data.train if train_log is None else train_log
    if recipe.max_slates_per_epoch is not None:
        log = subsample_requests(log, recipe.epochs * recipe.max_slates_per_epoch, seed)
    ranker = Ranker(data.world.catalog, ranker_config(recipe, data.env, seed))
    hist = train_ranker(
        ranker,
        log,
        data.seq_trval if sequences is None else sequences,
        RankerTrainConfig(
            epochs=recipe.epochs,
            max_slates_per_epoch=recipe.max_slates_per_epoch,
            history_length=data.history_length,
            position_debias=recipe.position,
            catalog_negatives=recipe.catalog_negatives,
            patience=0,
            progress=False,
            seed=seed,
            threads=threads,
        ),
        valid_log=data.valid,
    )
    return ranker, hist


def serve(agent: Any, recipe: RankerRecipe, data: OfflineData, name: str | None = None) -> Any:
    """The agent as the recipe serves it: wrapped in :class:`UserMemory` if ``recipe.memory``."""
    if not recipe.memory:
        return agent
    return UserMemory(agent, data.seq_trval, data.history_length, name=name)


def profile_recipe(recipe: RankerRecipe, quick: bool) -> RankerRecipe:
    """The recipe as a profile runs it: ``--quick`` draws fewer slates per epoch."""
    if not quick:
        return recipe
    m = recipe.max_slates_per_epoch
    return recipe.replace(
        max_slates_per_epoch=QUICK_SLATES_PER_EPOCH if m is None else min(m, QUICK_SLATES_PER_EPOCH)
    )


@functools.lru_cache(maxsize=6)
def recipe_ranker(
    quick: bool, seed: int, recipe: RankerRecipe, threads: int | None = None
) -> tuple[Ranker, Any, float]:
    """The recipe's ranker on the profile's log of ``seed``, trained once per process.

    The ranker, consistency and loop experiments ask for the same rankers; within one process
    (``python -m benchmarks all``) each is trained once. Training is deterministic given the
    arguments, so a cached ranker is the one a fresh call would train.

    Returns:
        ``(ranker, training history, training seconds)``.
    """
    data = recipe_data(quick, seed, recipe)
    t0 = time.perf_counter()
    ranker, hist = train_recipe_ranker(data, recipe, seed, threads)
    return ranker, hist, time.perf_counter() - t0


def append_log(data: OfflineData, own: ImpressionLog) -> OfflineData:
    """``data`` with ``own``'s impressions of the training period appended to the training log.

    Rows at or after the training cut ``t1`` are dropped (the validation and test periods stay
    unseen); request ids are shifted past the training log's; the event sequences of the
    training and validation periods are rebuilt from the merged log; validation and test sets
    are unchanged.
    """
    own = own.select(own[Columns.TIME] < data.t1)
    cols = dict(own.columns)
    cols[Columns.REQUEST] = cols[Columns.REQUEST] + int(data.train[Columns.REQUEST].max()) + 1
    merged = ImpressionLog.concat([data.train, ImpressionLog(cols, meta=dict(own.meta))])
    n = data.world.n_items
    pos = merged.positives()
    return dataclasses.replace(
        data,
        train=merged,
        seq_train=EventSequences.from_log(merged, n),
        seq_trval=EventSequences.from_log(ImpressionLog.concat([merged, data.valid]), n),
        train_counts=np.bincount(pos[Columns.ITEM], minlength=n).astype(np.float64),
        label=f"{data.label} + own log",
    )


def self_logging_round(
    data: OfflineData, recipe: RankerRecipe, ranker: Ranker, seed: int, threads: int | None
) -> ImpressionLog:
    """One round of self-logging: the recipe's pipeline plays and its impressions come back.

    The agent is what a closed loop would serve: a positives-only two-tower (the default
    recipe) trained on ``data``, K = 200 candidates, ``ranker`` over them, epsilon-greedy
    slates, served as the recipe serves (memory or not).
    """
    from agents.pipeline import MultiStagePipeline, Source
    from benchmarks.common import default_two_tower, mixed_negatives, two_tower_generator
    from retrieval.model import TwoTowerModel
    from retrieval.train import TrainConfig, fit_two_tower
    from simenv import BatchedRecEnv, collect

    world = data.world
    model = TwoTowerModel.build(default_two_tower(64), world.catalog)
    fit_two_tower(
        model, mixed_negatives(), data.train, data.seq_train,
        TrainConfig(epochs=recipe.generator_epochs, batch_size=1024, seed=seed, progress=False, threads=threads),
        valid=data.valid_set, release_time=world.catalog.release_time,
    )  # fmt: skip
    pipe = MultiStagePipeline(
        [Source(two_tower_generator(model, data), 200, "two-tower")], ranker, data.env.slate_size,
        exploration="epsilon", epsilon=recipe.own_log_epsilon, seed=seed, name="self-logging agent",
    )  # fmt: skip
    env = BatchedRecEnv(min(4096, world.n_users), data.env, world=world)
    n = max(1, int(round(recipe.own_log_episodes * world.n_users)))
    return collect(
        env, serve(pipe, recipe, data), n_users=n, seed=seed, progress=False, active_only=True
    )


@functools.lru_cache(maxsize=3)
def _self_logged(quick: bool, seed: int, recipe: RankerRecipe, threads: int | None) -> OfflineData:
    """The recipe's data after its self-logging rounds (cached: the rounds train models)."""
    if recipe.own_log_rounds > 1:  # the rounds before the last are the shorter recipe's (cached)
        first = recipe.own_log_rounds - 1
        data = _self_logged(quick, seed, recipe.replace(own_log_rounds=first), threads)
    else:
        first, data = 0, recipe_data(quick, seed, recipe.base)
    for r in range(first, recipe.own_log_rounds):
        ranker, _ = train_recipe_ranker(data, recipe.base, seed + r, threads)
        own = self_logging_round(
            data,
            recipe,
            ranker,
            int(np.random.SeedSequence([seed, r, 0x5E1F]).generate_state(1)[0]),
            threads,
        )
        data = append_log(data, own)
    return data
