"""The closed loop: a recommender that learns from its own feedback.

Rounds of (act in the env with exploration -> append the impressions to the log -> retrain
the ranker and the generator, warm-started), starting from a log of uniformly random slates.
Each round records the online outcomes and the feedback effects the lecture warns about:
popularity concentration of what is shown, and folding of the generator (other-group items
retrieved) when training has no global negatives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agents.base import RandomAgent
from agents.distill import DISTILL_LOSSES, DistillConfig, DistillObjective, teacher_targets
from agents.memory import UserMemory
from agents.pipeline import ExplorationSource, MultiStagePipeline, Source, reward_head_weights
from agents.rollout import mean_ci, rollout
from ranking import Ranker, RankerConfig, RankerTrainConfig, train_ranker
from ranking.train import MAX_CATALOG_NEGATIVES
from retrieval.losses import NegativeSamplerConfig, RetrievalLossConfig
from retrieval.metrics import leakage_at_k, mean_over_users
from retrieval.model import TwoTowerConfig, TwoTowerGenerator, TwoTowerModel
from retrieval.similarity import SimilarityConfig
from retrieval.train import TrainConfig, fit_two_tower
from simenv.batched_env import BatchedRecEnv
from simenv.clock import released
from simenv.config import check_range
from simenv.history import EventSequences, impression_examples
from simenv.log import ImpressionLog
from simenv.types import Columns

__all__ = ["LoopConfig", "closed_loop", "concentration"]

GENERATOR_TARGETS = ("positives", "distill", "both")


@dataclass(frozen=True)
class LoopConfig:
    """Options of the closed loop.

    Attributes:
        rounds: retrain-and-act rounds after the random start.
        users_per_round: user episodes played per round (and in the random start).
        quota: K, candidates from the generator.
        exploration: ``"greedy"``, ``"epsilon"`` or ``"boltzmann"`` (the pipeline's slate choice).
        epsilon: epsilon-greedy rate.
        temperature: Boltzmann temperature.
        generator_target: ``"positives"`` (logged clicks), ``"distill"`` (the ranker's picks)
            or ``"both"`` (mixed with ``distill_weight``).
        distill_weight: lambda of ``"both"``.
        uniform_negatives: uniform negatives of the generator's sampled softmax (0 = in-batch
            negatives only: the loop's own slates are the only negatives).
        ranker_epochs: ranker epochs per round.
        generator_epochs: generator epochs per round.
        teacher_queries: requests labelled by the ranker per round (distillation).
        model: the generator's two-tower config (default: ID items, mean pooling, cosine with a
            learnable temperature).
        heads: the ranker's heads; with more than the click head its score is the expected
            reward of the env's reward mix (:func:`agents.pipeline.reward_head_weights`).
        distill_loss: the distillation loss of ``"distill"`` / ``"both"`` (see
            :data:`agents.distill.DISTILL_LOSSES`).
        memory: serve the pipeline with each user's history in the loop's log
            (:class:`agents.memory.UserMemory`), the observation its models are trained on.
        explore_quota: candidates per request from an exploration source outside the models
            (0: none): items the generator would never retrieve reach the ranker, and the
            slate's epsilon-greedy exploration, when on, draws among them too.
        explore_kind: that source: ``"uniform"`` released items or ``"new"`` (the newest).
        catalog_negatives: uniformly drawn released items appended to each training slate of
            the ranker as non-clicks (``RankerTrainConfig.catalog_negatives``; 0: none).
    """

    rounds: int = 4
    users_per_round: int = 2_000
    quota: int = 200
    exploration: str = "epsilon"
    epsilon: float = 0.1
    temperature: float = 1.0
    generator_target: str = "both"
    distill_weight: float = 0.5
    uniform_negatives: int = 1024
    ranker_epochs: int = 2
    generator_epochs: int = 4
    teacher_queries: int = 10_000
    model: TwoTowerConfig | None = None
    heads: tuple[str, ...] = ("click",)
    distill_loss: str = "kl"
    memory: bool = False
    explore_quota: int = 0
    explore_kind: str = "uniform"
    catalog_negatives: int = 0

    def __post_init__(self) -> None:
        if self.generator_target not in GENERATOR_TARGETS:
            raise ValueError(
                f"generator_target must be one of {GENERATOR_TARGETS}, got {self.generator_target!r}"
            )
        if self.exploration not in ("greedy", "epsilon", "boltzmann"):
            raise ValueError(
                f"exploration must be 'greedy', 'epsilon' or 'boltzmann', got {self.exploration!r}"
            )
        for name in (
            "rounds",
            "users_per_round",
            "quota",
            "ranker_epochs",
            "generator_epochs",
            "teacher_queries",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0.0 <= self.epsilon <= 1.0 or not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError("epsilon and distill_weight must be in [0, 1]")
        check_range(
            "catalog_negatives", self.catalog_negatives, 0, MAX_CATALOG_NEGATIVES, integer=True
        )
        if self.uniform_negatives < 0:
            raise ValueError(f"uniform_negatives must be >= 0, got {self.uniform_negatives}")
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(
                f"distill_loss must be one of {DISTILL_LOSSES}, got {self.distill_loss!r}"
            )
        if not isinstance(self.explore_quota, (int, np.integer)) or self.explore_quota < 0:
            raise ValueError(f"explore_quota must be an integer >= 0, got {self.explore_quota!r}")
        if self.explore_kind not in ("uniform", "new"):
            raise ValueError(f"explore_kind must be 'uniform' or 'new', got {self.explore_kind!r}")
        RankerConfig(heads=tuple(self.heads), score_weights=(1.0,) * len(self.heads))


def concentration(log: ImpressionLog, n_items: int, top_share: float = 0.01) -> dict[str, float]:
    """Share of impressions on the top ``top_share`` of items, Gini of impressions, coverage."""
    counts = np.sort(np.bincount(log[Columns.ITEM], minlength=n_items).astype(np.float64))[::-1]
    total = max(counts.sum(), 1.0)
    top = max(1, int(round(top_share * n_items)))
    asc = counts[::-1]
    cum = np.cumsum(asc)
    gini = 1.0 - 2.0 * np.sum(cum) / (n_items * total) + 1.0 / n_items
    return {
        "top1pct_share": float(counts[:top].sum() / total),
        "gini": float(gini),
        "shown_items": float((counts > 0).mean()),
    }


def _offset_requests(log: ImpressionLog, offset: int) -> ImpressionLog:
    cols = dict(log.columns)
    cols[Columns.REQUEST] = cols[Columns.REQUEST] + offset
    creq = None if log.candidate_request is None else log.candidate_request + offset
    return ImpressionLog(cols, log.candidates, creq, dict(log.meta))


def closed_loop(
    env: BatchedRecEnv,
    cfg: LoopConfig,
    seed: int,
    threads: int | None = None,
    progress: Callable[[Any, str], Any] | None = None,
) -> list[dict[str, Any]]:
    """Run the loop; one dict of metrics per round (round 0 = the random start).

    Each round's dict holds ``reward`` (per-user array), its mean and CI, ``clicks``, the
    concentration of what was shown (``top1pct_share``, ``gini``, ``shown_items``), the
    generator's leakage@100 on the round's requests (``leakage@100``, ground-truth groups), and
    the wall times of training and acting.
    """
    world = env.world
    k = env.config.slate_size
    wrap = progress or (lambda it, desc: it)
    out: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    res = rollout(env, RandomAgent(world, k, seed=seed), cfg.users_per_round, seed=seed * 1000)
    out.append(_round_metrics(0, res, None, world, t0, 0.0, env.config.history_length))
    log = res.log
    heads = tuple(cfg.heads)
    ranker = Ranker(
        world.catalog,
        RankerConfig(
            heads=heads, score_weights=reward_head_weights(heads, env.config.reward), seed=seed
        ),
    )
    model_cfg = cfg.model or TwoTowerConfig(
        similarity=SimilarityConfig(kind="cosine", temperature=None, learnable_temperature=True)
    )
    model = TwoTowerModel.build(model_cfg, world.catalog)
    loss = RetrievalLossConfig(
        kind="sampled_softmax",
        negatives=NegativeSamplerConfig(
            in_batch=True, uniform=cfg.uniform_negatives, logq="negatives_only"
        ),
    )
    length = env.config.history_length  # L of the observations the models serve
    for r in wrap(range(1, cfg.rounds + 1), "closed loop rounds"):
        t_train = time.perf_counter()
        seq = EventSequences.from_log(log, world.n_items)
        train_ranker(
            ranker,
            log,
            seq,
            RankerTrainConfig(
                epochs=cfg.ranker_epochs,
                catalog_negatives=cfg.catalog_negatives,
                history_length=length,
                progress=False,
                seed=seed + r,
                threads=threads,
            ),
        )
        extra, weight = None, 0.0
        if cfg.generator_target != "positives":
            queries = impression_examples(log, seq, length).obs
            kl = dict(standardize_teacher=True, teacher_temperature=0.5)
            dcfg = DistillConfig(
                loss=cfg.distill_loss,
                weight=1.0 if cfg.generator_target == "distill" else cfg.distill_weight,
                max_queries=cfg.teacher_queries,
                **(kl if cfg.distill_loss == "kl" else {}),
            )
            targets = teacher_targets(
                ranker, queries, world.catalog.release_time, dcfg, np.random.default_rng([seed, r])
            )
            pool = np.nonzero(released(world.catalog.release_time, log[Columns.TIME].max()))[0]
            extra, weight = DistillObjective(targets, dcfg, model, sample_pool=pool), dcfg.weight
        fit_two_tower(
            model, loss, log, seq,
            TrainConfig(epochs=cfg.generator_epochs, batch_size=512, history_length=length, seed=seed + r, progress=False, threads=threads, patience=0),
            release_time=world.catalog.release_time, extra=extra, extra_weight=weight,
        )  # fmt: skip
        train_s = time.perf_counter() - t_train
        gen = TwoTowerGenerator(model, world.catalog)
        sources = [Source(gen, cfg.quota, "generator")]
        if cfg.explore_quota:
            explorer = ExplorationSource(
                world.catalog.release_time, cfg.explore_kind, seed=seed * 100 + r
            )
            sources.append(Source(explorer, cfg.explore_quota, "exploration"))
        pipe = MultiStagePipeline(
            sources, ranker, k, exploration=cfg.exploration, epsilon=cfg.epsilon,
            temperature=cfg.temperature, seed=seed * 100 + r, name=f"loop round {r}",
        )  # fmt: skip
        agent = UserMemory(pipe, seq, length, name=pipe.name) if cfg.memory else pipe
        t_act = time.perf_counter()
        res = rollout(env, agent, cfg.users_per_round, seed=seed * 1000 + r)
        out.append(_round_metrics(r, res, gen, world, t_act, train_s, length))
        log = ImpressionLog.concat(
            [log, _offset_requests(res.log, int(log[Columns.REQUEST].max()) + 1)]
        )
    return out


def _round_metrics(
    r: int,
    res: Any,
    gen: TwoTowerGenerator | None,
    world: Any,
    t_act: float,
    train_s: float,
    history_length: int,
) -> dict[str, Any]:
    m, h = mean_ci(res.outcomes["reward"])
    row: dict[str, Any] = {
        "round": r,
        "reward": res.outcomes["reward"],
        "reward_mean": m,
        "reward_ci": h,
        "clicks": float(res.outcomes["clicks"].mean()),
        "train_s": train_s,
        "act_s": time.perf_counter() - t_act,
        **concentration(res.log, world.n_items),
    }
    if gen is not None:
        # folding of the generator on a sample of this round's requests (groups are ground truth)
        first = res.log[Columns.POSITION] == 0
        users = res.log[Columns.USER][first][:500]
        seq = EventSequences.from_log(res.log, world.n_items)
        obs = seq.history(users, res.log[Columns.TIME][first][:500], history_length)
        ids, _ = gen.retrieve(obs, 100, exclude_seen=False)
        row["leakage@100"] = mean_over_users(
            leakage_at_k(ids, world.catalog.column("group"), world.users.group[users], 100)
        )
    else:
        row["leakage@100"] = float("nan")
    return row
