"""The evaluation protocol shared by every offline experiment (one protocol, numbers compare).

world -> behaviour-policy log -> time split (train / validation / test by the 80% and 90%
quantiles of impression time, never at random) -> observations rebuilt from the log ->
train -> full-catalog metrics for held-out users (items released after the training
cut-off count as cold).

Two profiles: ``quick`` (a small world, minutes on 2 cores; ``make demo`` and smoke tests)
and ``full`` (the default 20,000-item, 10,000-user world).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from benchmarks.registry import ExperimentConfig, param
from ranking import Ranker, RankerConfig, RankerTrainConfig, train_ranker
from retrieval.baselines import CandidateGenerator, Interactions
from retrieval.data import EvalSet, eval_set
from retrieval.losses import NegativeSamplerConfig, RetrievalLossConfig
from retrieval.metrics import (
    ItemSegment,
    coverage,
    cross_group_auc,
    item_segments,
    leakage_at_k,
    mean_over_users,
    ndcg_at_k,
    normalised_leakage,
    popularity_bias,
    recall_at_k,
)
from retrieval.model import TwoTowerConfig, TwoTowerGenerator, TwoTowerModel
from retrieval.similarity import SimilarityConfig
from retrieval.towers import ItemTowerConfig, UserTowerConfig
from retrieval.train import TrainConfig, TrainResult, fit_two_tower
from simenv import BatchedRecEnv, EnvConfig, World, WorldConfig, clock, collect
from simenv.history import EventSequences
from simenv.log import ImpressionLog
from simenv.policies import InGroupPolicy, LoggingPolicy, PopularityPolicy, UniformPolicy
from simenv.types import Columns

__all__ = [
    "env_config",
    "trained_ranker",
    "get_world",
    "make_policy",
    "POLICIES",
    "get_log",
    "OfflineData",
    "prepare_offline",
    "offline_data",
    "train_two_tower",
    "evaluate_generator",
    "evaluate_per_user",
    "world_label",
    "default_two_tower",
    "mixed_negatives",
    "MAIN_METRICS",
    "OfflineTrainingConfig",
    "chosen_variants",
    "with_test_rows",
    "two_tower_generator",
    "set_threads",
]

#: Metric columns every offline table shows (K = 100 unless named).
MAIN_METRICS = (
    "recall@10",
    "recall@100",
    "ndcg@10",
    "leakage@100",
    "norm_leakage@100",
    "cross_group_auc",
)


def env_config(quick: bool) -> EnvConfig:
    """The world and env of a profile: quick = 5,000 items / 3,000 users; full = the default world."""
    if quick:
        return EnvConfig(
            world=WorldConfig(
                n_items=5_000, n_users=3_000, n_groups=4, n_topics=32, latent_dim=16, n_creators=500
            )
        )
    return EnvConfig()


def world_label(cfg: EnvConfig, seed: int) -> str:
    """Short name of a world for report rows."""
    w = cfg.world
    return f"{w.n_items // 1000}k items/{w.n_users // 1000}k users/{w.n_groups}g/d{w.latent_dim}/seed{seed}"


#: Names of the built-in logging policies (:func:`make_policy`).
POLICIES = ("uniform", "popularity", "in-group", "in-group-uniform")


@functools.lru_cache(maxsize=4)
def get_world(quick: bool, seed: int) -> World:
    """The profile's world for a seed (cached within the process)."""
    cfg = env_config(quick)
    return World(cfg.world, seed=seed, user_model=cfg.user_model)


def make_policy(
    name: str, world: World, slate_size: int, epsilon: float, seed: int
) -> LoggingPolicy:
    """A built-in logging policy by name (one of :data:`POLICIES`).

    ``uniform``, ``popularity`` (``popularity ** 0.5`` over the catalog), ``in-group``
    (``popularity ** 0.5`` inside the user's group) or ``in-group-uniform`` (uniform inside the
    user's group: an exploration log without popularity exposure), each with ``epsilon``
    uniform exploration over the whole catalog.
    """
    if name == "uniform":
        return UniformPolicy(world, slate_size, epsilon, seed)
    if name == "popularity":
        return PopularityPolicy(world, slate_size, epsilon, seed)
    if name == "in-group":
        return InGroupPolicy(world, slate_size, epsilon, seed)
    if name == "in-group-uniform":
        return InGroupPolicy(world, slate_size, epsilon, seed, beta=0.0)
    raise ValueError(f"policy must be one of {POLICIES}, got {name!r}")


@functools.lru_cache(maxsize=8)
def get_log(
    quick: bool,
    seed: int,
    policy: str,
    epsilon: float,
    episodes_per_user: float,
    progress: bool = False,
) -> ImpressionLog:
    """The behaviour log of a profile (cached within the process, so experiments share it).

    ``episodes_per_user * n_users`` user episodes are collected (users run in a seeded
    order, each once per pass).
    """
    cfg = env_config(quick)
    world = get_world(quick, seed)
    env = BatchedRecEnv(min(4_096, world.n_users), cfg, world=world)
    pol = make_policy(policy, world, cfg.slate_size, epsilon, seed)
    n = max(1, int(round(episodes_per_user * world.n_users)))
    log = collect(env, pol, n_users=n, seed=seed, progress=progress)
    log.meta["epsilon"] = epsilon
    return log


@dataclass(eq=False)
class OfflineData:
    """One log split by time, with everything the offline experiments need.

    Attributes:
        world: the world (hidden truth: used only for evaluation, e.g. user groups).
        env: env config of the profile.
        log: the whole behaviour log.
        train, valid, test: the time split (train < t1 <= valid < t2 <= test).
        t1, t2: cut times (days); items released after ``t1`` are cold.
        seq_train: engagement events of the training period (training histories).
        seq_trval: events of train + validation (validation histories).
        seq_all: every event (test histories).
        valid_set, test_set: held-out queries (observation at the first held-out positive
            request, held-out positives).
        train_counts: (N,) positives per item in the training period.
        segments: (N,) item segment codes (head / torso / tail / cold).
        history_length: L.
        label: row label of the behaviour policy.
    """

    world: World
    env: EnvConfig
    log: ImpressionLog
    train: ImpressionLog
    valid: ImpressionLog
    test: ImpressionLog
    t1: float
    t2: float
    seq_train: EventSequences
    seq_trval: EventSequences
    seq_all: EventSequences
    valid_set: EvalSet
    test_set: EvalSet
    train_counts: np.ndarray
    segments: np.ndarray
    history_length: int
    label: str
    extra: dict[str, Any] = field(default_factory=dict)

    def interactions(self) -> Interactions:
        """Training positives as :class:`Interactions` (for the classic baselines)."""
        pos = self.train.positives()
        return Interactions(
            user=pos[Columns.USER],
            item=pos[Columns.ITEM],
            time=pos[Columns.TIME],
            session=pos[Columns.SESSION].astype(np.int64)
            + pos[Columns.USER].astype(np.int64) * 10_000,
            n_users=self.world.n_users,
            n_items=self.world.n_items,
        )


def prepare_offline(
    world: World,
    env: EnvConfig,
    log: ImpressionLog,
    history_length: int = 32,
    max_eval_users: int | None = 2_000,
    seed: int = 0,
    label: str = "",
    max_valid_users: int | None = None,
) -> OfflineData:
    """Split ``log`` by time and build sequences, evaluation sets, counts and segments.

    ``max_eval_users`` caps the test users (the findings' sample) and, unless
    ``max_valid_users`` is given, the validation users (early stopping and choices).
    """
    t1, t2 = log.time_quantiles(0.8, 0.9)
    train, valid, test = log.split_by_time(t1, t2)
    n = world.n_items
    seq_train = EventSequences.from_log(train, n)
    seq_trval = EventSequences.from_log(ImpressionLog.concat([train, valid]), n)
    seq_all = EventSequences.from_log(log, n)
    n_valid = max_eval_users if max_valid_users is None else max_valid_users
    vs = eval_set(valid, seq_trval, history_length, max_users=n_valid, seed=seed)
    ts = eval_set(test, seq_all, history_length, max_users=max_eval_users, seed=seed + 1)
    pos = train.positives()
    counts = np.bincount(pos[Columns.ITEM], minlength=n).astype(np.float64)
    segments = item_segments(counts, world.items.release_time, t1)
    return OfflineData(
        world, env, log, train, valid, test, t1, t2, seq_train, seq_trval, seq_all, vs, ts,
        counts, segments, history_length, label or str(log.meta.get("policy", "?")),
    )  # fmt: skip


@functools.lru_cache(maxsize=8)
def offline_data(
    quick: bool,
    seed: int,
    policy: str = "popularity",
    epsilon: float = 0.05,
    episodes_per_user: float = 3.0,
    valid_users: int | None = None,
) -> OfflineData:
    """The standard offline data of a profile (cached within the process).

    Test users: 2,000 (full) or 1,000 (quick); validation users: as many, or ``valid_users``.
    """
    world = get_world(quick, seed)
    log = get_log(quick, seed, policy, epsilon, episodes_per_user)
    label = f"{policy}(eps={epsilon:g}, {episodes_per_user:g} ep/user)"
    return prepare_offline(
        world, env_config(quick), log, 32, 2_000 if not quick else 1_000, seed, label,
        max_valid_users=valid_users,
    )  # fmt: skip


def trained_ranker(data: OfflineData, seed: int, epochs: int, threads: int | None) -> Ranker:
    """A default-config ranker trained on ``data.train`` (early stopping on ``data.valid``)."""
    ranker = Ranker(data.world.catalog, RankerConfig(seed=seed))
    cfg = RankerTrainConfig(epochs=epochs, progress=False, seed=seed, threads=threads)
    train_ranker(ranker, data.train, data.seq_trval, cfg, valid_log=data.valid)
    return ranker


def mixed_negatives(uniform: int = 1024, logq: str = "negatives_only") -> RetrievalLossConfig:
    """Sampled softmax with mixed negatives (in-batch + uniform) and logQ (the default recipe)."""
    return RetrievalLossConfig(
        kind="sampled_softmax",
        negatives=NegativeSamplerConfig(in_batch=True, uniform=uniform, logq=logq),
    )


def default_two_tower(
    dim: int = 64, item_kind: str = "id", user_kind: str = "mean", **sim: Any
) -> TwoTowerConfig:
    """The default recipe's model: ID item tower, mean-pooling user tower, cosine with learnable temperature."""
    simc = SimilarityConfig(
        **(sim or {"kind": "cosine", "temperature": None, "learnable_temperature": True})
    )
    return TwoTowerConfig(
        item=ItemTowerConfig(kind=item_kind, dim=dim),
        user=UserTowerConfig(kind=user_kind),
        similarity=simc,
    )


def train_two_tower(
    data: OfflineData,
    model_cfg: TwoTowerConfig,
    loss_cfg: RetrievalLossConfig,
    train_cfg: TrainConfig,
    batch_groups: np.ndarray | None = None,
) -> tuple[TwoTowerModel, TrainResult, float]:
    """Build and train a two-tower model on ``data.train`` with early stopping on ``data.valid_set``.

    ``batch_groups`` (a group per user id) makes every batch group-homogeneous (see
    :func:`retrieval.train.fit_two_tower`).
    """
    model = TwoTowerModel.build(model_cfg, data.world.catalog)
    t0 = time.perf_counter()
    res = fit_two_tower(
        model, loss_cfg, data.train, data.seq_train, train_cfg, valid=data.valid_set,
        release_time=data.world.catalog.release_time, batch_groups=batch_groups,
    )  # fmt: skip
    return model, res, time.perf_counter() - t0


def evaluate_generator(
    gen: CandidateGenerator,
    data: OfflineData,
    ks: tuple[int, ...] = (10, 100),
    auc_users: int = 500,
    on: str = "test",
) -> dict[str, float]:
    """Full-catalog offline metrics of a generator on the held-out users (means over users).

    The means of :func:`evaluate_per_user` (NaN users skipped), plus coverage@Kmax.
    """
    return evaluate_per_user(gen, data, ks, auc_users, on)[0]


def evaluate_per_user(
    gen: CandidateGenerator,
    data: OfflineData,
    ks: tuple[int, ...] = (10, 100),
    auc_users: int = 500,
    on: str = "test",
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Full-catalog offline metrics of a generator: means and per-evaluation-user values.

    recall@K and NDCG@K against the held-out positives (seen items are not excluded: users
    re-consume), leakage@K (share of other-group items) and its normalised form (random
    retrieval over the released catalog = 1), cross-group AUC on the first ``auc_users``
    users, popularity bias (mean log(1 + train count)), recall@Kmax by item segment
    (``recall@Kmax_head`` ...: each user's positives restricted to the segment), and coverage
    (a catalog-level number, means only).

    Args:
        gen: the generator.
        data: the offline data.
        ks: cut-offs; the largest is used for leakage, popularity and segments.
        auc_users: users (the first of the evaluation set) scored over the whole catalog for
            the cross-group AUC (0: no AUC).
        on: ``"test"`` (the test period's users) or ``"valid"`` (the validation period's: the
            only data a choice between variants may use).

    Returns:
        ``(means, per_user)``: ``means[m]`` is the mean over the users where ``m`` is defined;
        ``per_user[m]`` is float64 ``(B,)`` (``(min(auc_users, B),)`` for the AUC), NaN where
        the metric is undefined for a user (no positive in a segment, no retrieved item).
        Users are in the evaluation set's order, so two generators' arrays pair up.
    """
    if on not in ("test", "valid"):
        raise ValueError(f"on must be 'test' or 'valid', got {on!r}")
    ev = data.test_set if on == "test" else data.valid_set
    kmax = max(ks)
    ids, _ = gen.retrieve(ev.obs, kmax, exclude_seen=False)
    ug = data.world.users.group[ev.user]
    ig = data.world.items.group
    released = clock.released(data.world.items.release_time[None, :], ev.time[:, None])
    per: dict[str, np.ndarray] = {}
    for k in ks:
        per[f"recall@{k}"] = recall_at_k(ids, ev.positives, k)
        per[f"ndcg@{k}"] = ndcg_at_k(ids, ev.positives, k)
    per[f"leakage@{kmax}"] = leakage_at_k(ids, ig, ug, kmax)
    per[f"norm_leakage@{kmax}"] = normalised_leakage(ids, ig, ug, kmax, eligible=released)
    if auc_users > 0:
        sub = np.arange(min(auc_users, len(ev)))
        scores = gen.score_all({k: v[sub] for k, v in ev.obs.items()})
        finite = np.isfinite(scores)
        per["cross_group_auc"] = cross_group_auc(
            np.where(finite, scores, np.float32(-1e30)),
            ig,
            ug[sub],
            ev.positives[sub],
            eligible=released[sub],
        )
    per[f"pop_bias@{kmax}"] = popularity_bias(ids, data.train_counts, kmax)
    pos = ev.positives
    seg_of_pos = data.segments[np.where(pos >= 0, pos, 0)]  # (B, P) segment of each positive
    for s in ItemSegment:
        in_seg = np.where((pos >= 0) & (seg_of_pos == s), pos, -1)  # (B, P)
        per[f"recall@{kmax}_{s.name.lower()}"] = recall_at_k(ids, in_seg, kmax)
    out = {m: mean_over_users(v) for m, v in per.items()}
    out[f"coverage@{kmax}"] = coverage(ids, data.world.n_items, kmax)
    return out, per


def two_tower_generator(
    model: TwoTowerModel, data: OfflineData, name: str = "two-tower"
) -> TwoTowerGenerator:
    """Serving wrapper over ``model`` with the training counts as popularity."""
    return TwoTowerGenerator(model, data.world.catalog, data.train_counts, name=name)


def set_threads(n: int | None) -> None:
    """Torch threads for a run (one is steadier on a shared 2-core machine)."""
    if n is not None:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------- shared config


_C = TypeVar("_C", bound="OfflineTrainingConfig")


@dataclass(frozen=True)
class OfflineTrainingConfig(ExperimentConfig):
    """Fields shared by the offline two-tower experiments: which log, what training budget.

    A subclass adds its own fields (and may redeclare one of these to change its default);
    it calls ``super().__post_init__()`` from its own ``__post_init__``.
    """

    policy: str = param(
        "popularity", "behaviour policy of the log: uniform, popularity or in-group"
    )
    epsilon: float = param(0.05, "uniform exploration of the behaviour policy, in [0, 1]")
    episodes_per_user: float = param(
        3.0, "user episodes logged per user of the world (> 0; the full profile logs 1.5)"
    )
    valid_users: int = param(
        1000, "validation users (early stopping, choices between variants); test users: 2,000"
    )
    epochs: int = param(12, "maximum training epochs (early stopping on validation recall@100)")
    batch_size: int = param(1024, "training batch size")
    lr: float = param(3e-3, "learning rate (AdamW)")
    max_examples_per_epoch: int | None = param(
        None, "cap on the training examples drawn per epoch (none: every example)"
    )
    variants: tuple[str, ...] = param(
        (), "run only these variants (names as in the results table; empty: the profile's set)"
    )

    def __post_init__(self) -> None:
        if self.policy not in ("uniform", "popularity", "in-group"):
            raise ValueError(
                f"policy must be 'uniform', 'popularity' or 'in-group', got {self.policy!r}"
            )
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1], got {self.epsilon}")
        if not self.episodes_per_user > 0:
            raise ValueError(f"episodes_per_user must be > 0, got {self.episodes_per_user}")
        for name in ("epochs", "batch_size", "valid_users"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        m = self.max_examples_per_epoch
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_examples_per_epoch must be None or an integer >= 1, got {m!r}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be distinct, got {self.variants}")

    @classmethod
    def full(cls: type[_C]) -> _C:
        """The published profile: the default world with 1.5 logged episodes per user.

        Half the quick profile's log per user keeps ``make reports`` within its budget (the
        training epochs scale with the log; the 2,000 test users stay).
        """
        return dataclasses.replace(cls(), episodes_per_user=1.5)

    def data(self, quick: bool, seed: int, epsilon: float | None = None) -> OfflineData:
        """The offline data this config asks for (``epsilon`` overrides the config's)."""
        eps = self.epsilon if epsilon is None else epsilon
        return offline_data(quick, seed, self.policy, eps, self.episodes_per_user, self.valid_users)

    def train_config(self, seed: int, threads: int | None, **overrides: Any) -> TrainConfig:
        """The :class:`TrainConfig` of one training run (``overrides`` replace its fields)."""
        kw: dict[str, Any] = dict(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            max_examples_per_epoch=self.max_examples_per_epoch,
            seed=seed,
            progress=False,
            threads=threads,
        )
        kw.update(overrides)
        return TrainConfig(**kw)


def chosen_variants(
    requested: tuple[str, ...], available: list[str] | tuple[str, ...]
) -> list[str]:
    """The variants to run: ``requested`` (in the order of ``available``) or all of ``available``.

    Raises:
        ValueError: naming the requested variants that are not available, and the choices.
    """
    unknown = [v for v in requested if v not in available]
    if unknown:
        raise ValueError(f"variants {unknown} are not available; choose among {list(available)}")
    return [v for v in available if not requested or v in requested]


def with_test_rows(data: OfflineData, rows: np.ndarray) -> OfflineData:
    """A view of ``data`` whose test set holds only some of its queries (e.g. new users)."""
    return dataclasses.replace(data, test_set=data.test_set.subset(np.asarray(rows)))
