"""perf: the speed figures of the whole stack, measured side by side in one run.

Every figure here is a ratio against a reference measured in the same process, alternating
with it, because the machine is shared and absolute numbers swing with the other processes:

- environment: ``BatchedRecEnv`` user-steps/s against ``SyncVectorEnv`` of single-user
  ``RecEnv`` on the same world (the functions of ``perf-env``), and how the step rate grows
  with the users stepped at once and with the catalog; world build time and peak memory in a
  fresh process, for growing worlds;
- training: examples/s of :func:`retrieval.train.fit_two_tower` (ID item tower, mean pooling
  over L = 32 history items, sampled softmax with in-batch + uniform negatives and logQ)
  against a bare hand-written torch loop doing the same arithmetic (:class:`BareLoop`), with
  dense AdamW and with sparse embedding gradients + SparseAdam; scaling in batch and catalog;
- index: queries/s of the exact :class:`retrieval.index.ItemIndex` against one plain torch
  matmul + top-k (:func:`retrieval.index.torch_topk`) and faiss ``IndexFlatIP``, scaling in N;
  HNSW and IVF operating points (recall@k against exact, queries/s) on the item vectors of a
  two-tower model trained on the benchmark world, with their Pareto front.

Clocks: the env and training figures are wall time (what a user waits for; the training
figure is ``fit_two_tower``'s own ``examples_per_s``); the index figures are process CPU time
with one thread (``operating_points(timer=time.process_time)``), which the other processes on
a shared machine disturb less.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import faiss
import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from benchmarks.common import (
    default_two_tower,
    evaluate_generator,
    mixed_negatives,
    offline_data,
    prepare_offline,
    train_two_tower,
    two_tower_generator,
    world_label,
)
from benchmarks.perf_env import (
    _BASELINE_SNIPPET,
    _BUILD_SNIPPET,
    _slates,
    _subprocess_json,
    _time_batched,
    _time_sync,
)
from benchmarks.registry import ExperimentConfig, experiment, param
from benchmarks.runner import RunContext
from retrieval.data import next_item_examples
from retrieval.index import (
    IndexConfig,
    OperatingPoints,
    build_index,
    clustered_embeddings,
    operating_points,
    torch_topk,
)
from retrieval.model import TwoTowerModel
from retrieval.train import TrainConfig, fit_two_tower
from simenv import BatchedRecEnv, EnvConfig, RecEnv, World, WorldConfig, collect
from simenv.history import EventSequences
from simenv.log import ImpressionLog
from simenv.policies import InGroupPolicy
from simenv.types import Obs

__all__ = ["PerfConfig", "BareLoop", "run"]

_TRAINED_WORLDS = ("full", "quick", "tiny")
_HISTORY = 32  # L: history items mean-pooled by the user tower (both loops)
_USER_POSITIVES = 32  # other positives of each user masked out of its negatives (both loops)


@dataclass(frozen=True)
class PerfConfig(ExperimentConfig):
    """Speed of the environment, the training loop and the index, each against a reference."""

    threads: int = param(1, "torch and faiss threads of every measurement (the bars are 1-thread)")
    # environment
    env_items: int = param(100_000, "catalog of the stepped world (also the training world)")
    env_batch: int = param(10_000, "users stepped at once by BatchedRecEnv")
    sync_batch: int = param(64, "RecEnv copies in the SyncVectorEnv reference")
    env_steps: int = param(50, "timed BatchedRecEnv steps per measurement")
    sync_steps: int = param(20, "timed SyncVectorEnv steps per measurement")
    env_repeats: int = param(3, "alternating repeats of the env pair (median reported)")
    env_scaling_users: tuple[int, ...] = param(
        (100, 1_000, 10_000, 30_000), "B values of the env scaling curve"
    )
    env_scaling_items: tuple[int, ...] = param(
        (10_000, 100_000, 1_000_000), "catalog sizes of the env scaling curve"
    )
    env_scaling_batch: int = param(1_000, "users stepped at once in the catalog scaling")
    build_sizes: tuple[int, ...] = param(
        (100_000, 300_000, 1_000_000), "worlds of N items and N users built in a fresh process"
    )
    # training
    train_episodes: int = param(10_000, "user episodes logged on the env world for training")
    train_max_steps: int = param(40, "env steps of the training log (cuts long episodes)")
    train_batch: int = param(1024, "training batch of the bar")
    train_uniform: int = param(4096, "uniform negatives per batch (plus the in-batch ones)")
    train_dim: int = param(64, "embedding dimension d")
    train_steps: int = param(12, "timed steps per training measurement")
    train_repeats: int = param(3, "alternating repeats of ours vs the bare loop (median)")
    train_scaling_batches: tuple[int, ...] = param(
        (256, 512, 2048, 4096), "batch sizes of the training scaling curve"
    )
    train_scaling_items: tuple[int, ...] = param(
        (10_000, 100_000, 300_000), "catalog sizes of the training scaling curve (a log each)"
    )
    # index
    index_items: int = param(1_000_000, "N of the synthetic clustered vectors (exact vs torch)")
    index_dim: int = param(64, "d of the synthetic vectors")
    index_queries: int = param(1_000, "queries of the exact-search measurements")
    index_k: int = param(100, "k of every search (recall@k)")
    index_repeats: int = param(2, "timing repeats of each search setting (the fastest counts)")
    index_scaling_items: tuple[int, ...] = param(
        (10_000, 100_000, 1_000_000), "N values of the exact-search scaling curve"
    )
    trained_world: str = param(
        "full", "world of the trained item vectors: full (default world), quick or tiny (tests)"
    )
    trained_epochs: int = param(4, "epochs of the two towers whose item vectors are indexed")
    trained_queries: int = param(2_000, "user vectors (held-out users) queried against them")
    hnsw_ef: tuple[int, ...] = param(
        (16, 32, 64, 128, 256, 512), "efSearch values of the HNSW sweep"
    )
    ivf_nprobe: tuple[int, ...] = param(
        (1, 2, 4, 8, 16, 32, 64, 128), "nprobe values of the IVF sweep (capped at nlist)"
    )
    # bars
    target_env_ratio: float = param(100.0, "bar: BatchedRecEnv / SyncVectorEnv user-steps/s")
    target_train_examples_per_s: float = param(20_000.0, "bar: training examples/s, 1 thread")
    target_train_ratio: float = param(0.9, "bar: fit_two_tower / bare loop examples/s")
    target_exact_slowdown: float = param(1.2, "bar: exact index at most this x slower than torch")
    target_ann_recall: float = param(0.95, "bar: recall@k of HNSW or IVF against exact")
    target_ann_speedup: float = param(10.0, "bar: ... at this many times the exact queries/s")
    sparse_recall_tolerance: float = param(
        0.01, "bar: sparse-gradient training loses at most this much test recall@100"
    )

    def __post_init__(self) -> None:
        for name in (
            "threads",
            "env_items",
            "env_batch",
            "sync_batch",
            "env_steps",
            "sync_steps",
            "env_repeats",
            "env_scaling_batch",
            "train_episodes",
            "train_max_steps",
            "train_batch",
            "train_dim",
            "train_steps",
            "train_repeats",
            "index_items",
            "index_dim",
            "index_queries",
            "index_k",
            "index_repeats",
            "trained_epochs",
            "trained_queries",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.train_uniform, bool) or self.train_uniform < 0:
            raise ValueError(f"train_uniform must be an integer >= 0, got {self.train_uniform!r}")
        if self.train_batch < 2:
            raise ValueError(
                f"train_batch must be >= 2 (in-batch negatives), got {self.train_batch}"
            )
        for name in (
            "env_scaling_users",
            "env_scaling_items",
            "build_sizes",
            "train_scaling_batches",
            "train_scaling_items",
            "index_scaling_items",
            "hnsw_ef",
            "ivf_nprobe",
        ):
            vals = getattr(self, name)
            if not vals or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals
            ):
                raise ValueError(f"{name} must be a non-empty tuple of integers >= 1, got {vals!r}")
        if min(self.train_scaling_batches) < 2:
            raise ValueError(
                f"train_scaling_batches must be >= 2, got {self.train_scaling_batches!r}"
            )
        if self.index_k > min(self.index_scaling_items + (self.index_items,)):
            raise ValueError(
                f"index_k={self.index_k} must be <= every index size "
                f"(index_items={self.index_items}, index_scaling_items={self.index_scaling_items})"
            )
        if self.trained_world not in _TRAINED_WORLDS:
            raise ValueError(
                f"trained_world must be one of {_TRAINED_WORLDS}, got {self.trained_world!r}"
            )
        for name in (
            "target_env_ratio",
            "target_train_examples_per_s",
            "target_train_ratio",
            "target_exact_slowdown",
            "target_ann_speedup",
        ):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not 0.0 < self.target_ann_recall <= 1.0:
            raise ValueError(f"target_ann_recall must be in (0, 1], got {self.target_ann_recall}")
        if not (math.isfinite(self.sparse_recall_tolerance) and self.sparse_recall_tolerance >= 0):
            raise ValueError(
                f"sparse_recall_tolerance must be >= 0, got {self.sparse_recall_tolerance}"
            )

    @classmethod
    def quick(cls) -> PerfConfig:
        """About 90 s on two busy cores with ``--threads 1``; the bars at smaller sizes."""
        return replace(
            cls(),
            env_steps=20,
            sync_steps=10,
            env_repeats=2,
            env_scaling_users=(100, 1_000, 10_000),
            env_scaling_items=(10_000, 100_000),
            build_sizes=(50_000, 200_000),
            train_episodes=2_500,
            train_steps=6,
            train_repeats=2,
            train_scaling_batches=(256, 2048),
            train_scaling_items=(10_000, 100_000),
            index_items=200_000,
            index_queries=256,
            index_repeats=1,
            index_scaling_items=(10_000, 200_000),
            trained_world="quick",
            trained_epochs=2,
            trained_queries=1_000,
            hnsw_ef=(16, 64, 256),
            ivf_nprobe=(1, 4, 16, 32),
        )


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch and faiss threads, then restore both settings."""
    old_torch, old_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        faiss.omp_set_num_threads(old_faiss)


def _best_seconds(fn: Callable[[], Any], repeats: int, clock: Callable[[], float]) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (one untimed warm-up call first)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return max(best, 1e-9)


def _env_world(n_items: int, seed: int) -> tuple[EnvConfig, World]:
    env_cfg = EnvConfig(world=WorldConfig(n_items=n_items))
    return env_cfg, World(env_cfg.world, seed=seed, user_model=env_cfg.user_model)


def _log_on(
    world: World, env_cfg: EnvConfig, episodes: int, seed: int, max_steps: int | None = None
) -> ImpressionLog:
    """An in-group popularity log (epsilon 0.05) of ``episodes`` user episodes on ``world``.

    All episodes run at once (up to 10,000 env slots); ``max_steps`` cuts them after that
    many steps (more users, shorter episodes: the long tails of a few users dominate the
    logging time otherwise).
    """
    env = BatchedRecEnv(min(10_000, world.n_users, episodes), env_cfg, world=world)
    policy = InGroupPolicy(world, env_cfg.slate_size, 0.05, seed)
    return collect(env, policy, n_users=episodes, seed=seed, max_steps=max_steps, progress=False)


def _loglog_figure(
    series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str
) -> Figure:
    fig = Figure(figsize=(5, 3.4))
    ax = fig.add_subplot()
    for label, (x, y) in series.items():
        ax.plot(x, y, "o-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the bare loop


class BareLoop:
    """The reference training loop: the arithmetic of one ``fit_two_tower`` step, by hand.

    Same model and loss as ``fit_two_tower`` with the default recipe (ID item table shared by
    a mean-pooling user tower, cosine similarity with the learnable temperature
    ``tau = clip(exp(s), 0.01, 100)``, sampled softmax over in-batch + ``uniform`` negatives
    with the logQ correction L_logQ3, accidental hits masked, gradient clipping, AdamW with
    the temperature at ``lr * temperature_lr_scale``; with ``sparse`` the table has sparse
    gradients stepped by SparseAdam), written as plain tensor operations on tensors prepared
    once: no configs, no validation, no framework code.

    Args:
        items: int64 ``(n, L)`` history items of the examples.
        mask: ``(n, L)`` 1 for a real event.
        target: int64 ``(n,)`` the positive of each example.
        user_pos: int64 ``(n, P)`` other positives of each example's user, -1 padding.
        n_items: catalog size N.
        dim: embedding dimension d.
        batch: examples per step B.
        uniform: uniform negatives per step U.
        sparse: sparse gradients for the table (SparseAdam) instead of dense AdamW.
        seed: seed of the initialisation, the shuffles and the uniform draws.
        train: the :class:`TrainConfig` whose lr, clip and temperature rate are used.
    """

    def __init__(
        self,
        items: np.ndarray,
        mask: np.ndarray,
        target: np.ndarray,
        user_pos: np.ndarray,
        n_items: int,
        dim: int,
        batch: int,
        uniform: int,
        sparse: bool,
        seed: int,
        train: TrainConfig,
    ) -> None:
        self.items = torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64))  # (n, L)
        self.mask = torch.from_numpy(np.asarray(mask) != 0)  # (n, L)
        self.target = torch.from_numpy(np.ascontiguousarray(target, dtype=np.int64))  # (n,)
        self.user_pos = torch.from_numpy(np.ascontiguousarray(user_pos, dtype=np.int64))
        self.n_items, self.batch, self.uniform, self.sparse = n_items, batch, uniform, sparse
        self.clip = train.grad_clip
        p = torch.bincount(self.target, minlength=n_items).double()
        p = p / p.sum()  # (N,) frequency of the positives
        n_unigram, n_draws = batch - 1, batch - 1 + uniform
        # logQ of the mixture of in-batch (unigram p) and uniform draws, as the expected
        # count log(n Q(d)) that fit_two_tower's default logq_scale subtracts.
        q = torch.clamp((n_unigram * p + uniform / n_items) / n_draws, min=1e-9)
        self.log_q = (torch.log(q) + math.log(n_draws)).float()  # (N,)
        self.gen = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(n_items, dim, generator=self.gen) * dim**-0.5)
        self.empty = nn.Parameter(torch.zeros(dim))
        self.log_tau = nn.Parameter(torch.zeros(()))
        tau_group = {"params": [self.log_tau], "lr": train.lr * train.temperature_lr_scale}
        dense = [self.empty] if sparse else [self.table, self.empty]
        self.opts: list[torch.optim.Optimizer] = [
            torch.optim.AdamW([{"params": dense}, tau_group], lr=train.lr, weight_decay=0.0)
        ]
        if sparse:
            self.opts.append(torch.optim.SparseAdam([self.table], lr=train.lr))
        self._neg_inf = torch.tensor(torch.finfo(torch.float32).min)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table, sparse=self.sparse)

    def step(self, rows: torch.Tensor) -> float:
        """One optimisation step on examples ``rows``; returns the loss."""
        items, mask = self.items[rows], self.mask[rows]  # (B, L)
        pos, upos = self.target[rows], self.user_pos[rows]  # (B,), (B, P)
        b = pos.shape[0]
        x = self._lookup(torch.where(mask, items, 0)) * mask.unsqueeze(-1)  # (B, L, d)
        w = mask.float()
        w = w / w.sum(1, keepdim=True).clamp_min(1e-30)  # (B, L) mean-pooling weights
        u = torch.bmm(w.unsqueeze(1), x).squeeze(1)  # (B, d)
        u = torch.where(mask.any(1, keepdim=True), u, self.empty.expand_as(u))
        tau = torch.clamp(torch.exp(self.log_tau), 0.01, 100.0)  # tau = clip(exp(s), 0.01, 100)
        q = F.normalize(u, dim=-1) / tau  # (B, d)
        uni = torch.randint(self.n_items, (self.uniform,), generator=self.gen)
        ids = torch.cat([pos, uni])  # (M,) in-batch positives, then uniform draws
        keys = F.normalize(self._lookup(ids), dim=-1)  # (M, d)
        pos_logit = (q * keys[:b]).sum(-1)  # (B,) f(u, p)
        logits = torch.addmm(-self.log_q[ids][None, :], q, keys.T)  # (B, M) f(u, d) - log nQ(d)
        # accidental hits: a negative equal to the row's positive or to another positive of
        # its user is masked (sorted negatives, binary search, every duplicate)
        sorted_ids, order = torch.sort(ids)
        hit_rows = torch.cat([torch.arange(b), torch.arange(b).repeat_interleave(upos.shape[1])])
        targets = torch.cat([pos, upos.reshape(-1)])
        keep = targets >= 0
        hit_rows, targets = hit_rows[keep], targets[keep]
        lo = torch.searchsorted(sorted_ids, targets)
        cnt = torch.searchsorted(sorted_ids, targets, right=True) - lo
        r = torch.repeat_interleave(hit_rows, cnt)
        first = torch.repeat_interleave(lo - (torch.cumsum(cnt, 0) - cnt), cnt)
        c = order[first + torch.arange(r.shape[0])]
        logits = logits.index_put((r, c), self._neg_inf)
        # L_logQ3: -log e^{f(p)} / (e^{f(p)} + sum_j e^{f(d_j) - log Q(d_j)})
        all_logits = torch.cat([pos_logit[:, None], logits], 1)  # (B, 1 + M)
        loss = (torch.logsumexp(all_logits, 1) - pos_logit).mean()
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            params = [self.table, self.empty, self.log_tau]
            if self.sparse:
                self.table.grad = self.table.grad.coalesce()
                sq = self.table.grad._values().pow(2).sum()
                sq = sq + self.empty.grad.pow(2).sum() + self.log_tau.grad.pow(2)
                coef = torch.clamp(self.clip / (sq.sqrt() + 1e-6), max=1.0)
                self.table.grad._values().mul_(coef)
                self.empty.grad.mul_(coef)
                self.log_tau.grad.mul_(coef)
            else:
                torch.nn.utils.clip_grad_norm_(params, self.clip)
        for opt in self.opts:
            opt.step()
        return float(loss.detach())

    def examples_per_s(self, steps: int) -> tuple[float, float]:
        """Run ``steps`` steps on a fresh shuffle; returns (wall, CPU-time) examples per second."""
        n = self.target.shape[0]
        order = torch.randperm(n, generator=self.gen)
        steps = max(1, min(steps, n // self.batch))
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(steps):
            self.step(order[s * self.batch : (s + 1) * self.batch])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return steps * self.batch / wall, steps * self.batch / max(cpu, 1e-9)


# --------------------------------------------------------------------------- sections


class _Later:
    """Report calls recorded now and replayed later (summary first, sections after).

    The sections run first, but their summary table belongs at the top of the report.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))

        return record

    def replay(self, report: Any) -> None:
        """Make the recorded calls on ``report``, in order."""
        calls, self.calls = self.calls, []
        for name, args, kwargs in calls:
            getattr(report, name)(*args, **kwargs)


def _env_section(cfg: PerfConfig, ctx: RunContext, rep: Any, seed: int) -> dict[str, Any]:
    """BatchedRecEnv vs SyncVectorEnv, scaling in users and items, world builds."""
    with ctx.timer("env world") as tw:
        env_cfg, world = _env_world(cfg.env_items, seed)
    rng = ctx.rng(seed, "perf", "slates")
    k = env_cfg.slate_size
    batched = BatchedRecEnv(cfg.env_batch, env_cfg, world=world)
    batched.reset(seed=seed)
    sync = gym.vector.SyncVectorEnv(
        [lambda: RecEnv(env_cfg, world=world) for _ in range(cfg.sync_batch)]
    )
    sync.reset(seed=seed)
    slates_b = _slates(world, cfg.env_batch, k, 8, rng)
    slates_s = _slates(world, cfg.sync_batch, k, 8, rng)
    fast, slow = [], []
    with ctx.timer("env pair"):
        for _ in ctx.progress(range(cfg.env_repeats), desc="env: batched vs sync"):
            fast.append(_time_batched(batched, slates_b, cfg.env_steps))
            slow.append(_time_sync(sync, slates_s, cfg.sync_steps))
    sync.close()
    fast_m, slow_m = float(np.median(fast)), float(np.median(slow))
    rep.section(
        "Environment",
        f"World: {cfg.env_items:,} items, {env_cfg.world.n_users:,} users, slate {k}, full "
        f"dynamics; built in {tw.seconds:.2f} s. Random distinct released slates drawn before "
        f"timing (policy cost excluded). BatchedRecEnv (B={cfg.env_batch:,}) and SyncVectorEnv "
        f"of RecEnv (B={cfg.sync_batch}) alternate {cfg.env_repeats} times; medians, wall time.",
    )
    rep.table(
        "Env throughput (user-steps per second, wall)",
        [
            {
                "env": f"BatchedRecEnv (B={cfg.env_batch:,})",
                "user_steps_per_s": fast_m,
                "runs": ", ".join(f"{x:,.0f}" for x in fast),
            },
            {
                "env": f"SyncVectorEnv of RecEnv (B={cfg.sync_batch})",
                "user_steps_per_s": slow_m,
                "runs": ", ".join(f"{x:,.0f}" for x in slow),
            },
        ],
        fmt={"user_steps_per_s": ",.0f"},
    )

    users_rows = []
    with ctx.timer("env scaling"):
        for b in ctx.progress(cfg.env_scaling_users, desc="env: scaling in users"):
            env = BatchedRecEnv(b, env_cfg, world=world)
            env.reset(seed=seed)
            steps = max(5, min(cfg.env_steps * cfg.env_batch // b, 1_000))
            rate = _time_batched(env, _slates(world, b, k, 4, rng), steps)
            users_rows.append({"users_B": b, "user_steps_per_s": rate})
        items_rows = []
        for n in ctx.progress(cfg.env_scaling_items, desc="env: scaling in items"):
            if n == cfg.env_items:
                env_n, w_n, build_s = env_cfg, world, tw.seconds
            else:
                t0 = time.perf_counter()
                env_n, w_n = _env_world(n, seed)
                build_s = time.perf_counter() - t0
            b = min(cfg.env_scaling_batch, w_n.n_users)
            env = BatchedRecEnv(b, env_n, world=w_n)
            env.reset(seed=seed)
            steps = max(5, min(cfg.env_steps * cfg.env_batch // b, 1_000))
            rate = _time_batched(env, _slates(w_n, b, k, 4, rng), steps)
            items_rows.append(
                {"items": n, "users_B": b, "user_steps_per_s": rate, "world_build_s": build_s}
            )
            del env, w_n
    rep.table(
        "Env scaling in users stepped at once (same world)",
        users_rows,
        fmt={"user_steps_per_s": ",.0f", "users_B": ",d"},
    )
    rep.table(
        "Env scaling in catalog size",
        items_rows,
        fmt={"user_steps_per_s": ",.0f", "items": ",d", "users_B": ",d", "world_build_s": ".2f"},
        note=f"Worlds of {env_cfg.world.n_users:,} users; build time in this process (wall).",
    )
    rep.figure(
        "env_scaling",
        _loglog_figure(
            {
                "in users B (N fixed)": (
                    [r["users_B"] for r in users_rows],
                    [r["user_steps_per_s"] for r in users_rows],
                ),
                f"in items N (B={cfg.env_scaling_batch:,})": (
                    [r["items"] for r in items_rows],
                    [r["user_steps_per_s"] for r in items_rows],
                ),
            },
            "users stepped at once (B) or catalog size (N)",
            "user-steps / s",
        ),
        "BatchedRecEnv user-steps per second against B and against N (log-log).",
        data={"users": users_rows, "items": items_rows},
    )

    build_rows = []
    with ctx.timer("world builds"):
        base = _subprocess_json(_BASELINE_SNIPPET)["peak_bytes"] / 2**30
        for n in ctx.progress(cfg.build_sizes, desc="env: world builds"):
            out = _subprocess_json(_BUILD_SNIPPET.format(items=n, users=n))
            build_rows.append(
                {
                    "items": n,
                    "users": n,
                    "seconds": out["seconds"],
                    "peak_GiB": out["peak_bytes"] / 2**30,
                    "over_imports_GiB": out["peak_bytes"] / 2**30 - base,
                }
            )
    rep.table(
        "World build (fresh process)",
        build_rows,
        fmt={
            "items": ",d",
            "users": ",d",
            "seconds": ".2f",
            "peak_GiB": ".2f",
            "over_imports_GiB": ".2f",
        },
        note=f"Peak resident memory (VmHWM) of the whole process; interpreter and imports alone "
        f"peak at {base:.2f} GiB.",
    )
    rep.figure(
        "world_build",
        _loglog_figure(
            {
                "seconds": ([r["items"] for r in build_rows], [r["seconds"] for r in build_rows]),
                "peak GiB": ([r["items"] for r in build_rows], [r["peak_GiB"] for r in build_rows]),
            },
            "items = users",
            "seconds / GiB",
        ),
        "World build time and peak memory against its size (log-log).",
        data={"builds": build_rows},
    )
    rep.add_result(
        "env",
        {
            "batched_user_steps_per_s": fast,
            "sync_user_steps_per_s": slow,
            "ratio": fast_m / slow_m,
            "scaling_users": users_rows,
            "scaling_items": items_rows,
            "builds": build_rows,
            "imports_peak_GiB": base,
        },
    )
    return {
        "world": world,
        "env_cfg": env_cfg,
        "ratio": fast_m / slow_m,
        "fast": fast_m,
        "slow": slow_m,
    }


def _ours(
    model: TwoTowerModel,
    log: ImpressionLog,
    seq: EventSequences,
    cfg: PerfConfig,
    batch: int,
    steps: int,
    sparse: bool,
    seed: int,
) -> float:
    """``fit_two_tower``'s own examples/s over ``steps`` steps (one epoch, wall time)."""
    tc = TrainConfig(
        epochs=1,
        batch_size=batch,
        max_examples_per_epoch=steps * batch,
        patience=0,
        threads=cfg.threads,
        progress=False,
        seed=seed,
        sparse_embeddings=sparse,
        history_length=_HISTORY,
    )
    res = fit_two_tower(model, mixed_negatives(uniform=cfg.train_uniform), log, seq, tc)
    return float(res.history[0]["examples_per_s"])


def _train_section(
    cfg: PerfConfig, ctx: RunContext, rep: Any, seed: int, world: World, env_cfg: EnvConfig
) -> dict[str, Any]:
    """fit_two_tower vs the bare loop (dense and sparse), scaling in batch and items."""
    with ctx.timer("training log"):
        log = _log_on(world, env_cfg, cfg.train_episodes, seed, cfg.train_max_steps)
    seq = EventSequences.from_log(log, world.n_items)
    ex = next_item_examples(log, seq, _HISTORY)
    user_pos = seq.positives_matrix(ex.user, width=_USER_POSITIVES)
    n_ex = len(ex)
    fill = float(np.mean(ex.obs[Obs.MASK] != 0))
    steps = max(1, min(cfg.train_steps, n_ex // cfg.train_batch))
    pairs = {}  # our model and the bare loop on the same examples, per table-gradient mode
    for sp in (False, True):
        model = TwoTowerModel.build(default_two_tower(dim=cfg.train_dim), world.catalog)
        bare = BareLoop(
            ex.obs[Obs.ITEMS],
            ex.obs[Obs.MASK],
            ex.target,
            user_pos,
            world.n_items,
            cfg.train_dim,
            cfg.train_batch,
            cfg.train_uniform,
            sp,
            seed,
            TrainConfig(),
        )
        pairs[sp] = (model, bare)
    runs: dict[bool, dict[str, list[float]]] = {
        sp: {"ours": [], "bare": [], "bare_cpu": []} for sp in (False, True)
    }
    with ctx.timer("training pair"), _threads(cfg.threads):
        for _ in ctx.progress(range(cfg.train_repeats), desc="training: ours vs bare"):
            for sp in (False, True):  # alternate: ours, bare, ours, bare, ...
                model, bare = pairs[sp]
                runs[sp]["ours"].append(
                    _ours(model, log, seq, cfg, cfg.train_batch, steps, sp, seed)
                )
                wall, cpu = bare.examples_per_s(steps)
                runs[sp]["bare"].append(wall)
                runs[sp]["bare_cpu"].append(cpu)
    pair_rows, summary = [], {}
    for sp in (False, True):
        r = runs[sp]
        ratios = [a / b for a, b in zip(r["ours"], r["bare"], strict=True)]
        name = "sparse (SparseAdam)" if sp else "dense (AdamW)"
        summary[sp] = {
            "ours": float(np.median(r["ours"])),
            "bare": float(np.median(r["bare"])),
            "bare_cpu": float(np.median(r["bare_cpu"])),
            "ratio": float(np.median(ratios)),
            "ratios": ratios,
            "runs": r,
        }
        pair_rows.append(
            {
                "table gradients": name,
                "fit_two_tower ex/s": summary[sp]["ours"],
                "bare loop ex/s": summary[sp]["bare"],
                "ratio ours/bare": summary[sp]["ratio"],
                "ratios per repeat": ", ".join(f"{x:.2f}" for x in ratios),
                "bare ex/CPU-s": summary[sp]["bare_cpu"],
            }
        )
    rep.section(
        "Training",
        f"{len(log):,} impressions logged on the env world ({world.n_items:,} items) by an "
        f"in-group popularity policy ({cfg.train_episodes:,} users, at most "
        f"{cfg.train_max_steps} steps each) give {n_ex:,} next-item examples, "
        f"{fill:.0%} of their history slots filled. Model: ID item tower d="
        f"{cfg.train_dim}, mean pooling over L={_HISTORY} history items (the same table), "
        f"cosine with learnable temperature; loss: sampled softmax with in-batch + "
        f"{cfg.train_uniform:,} uniform negatives, logQ3, accidental hits (the positive and "
        f"{_USER_POSITIVES} other positives of the user) masked; AdamW (or SparseAdam for the "
        f"table), gradient clip 5. Batch {cfg.train_batch}, {steps} timed steps per "
        f"measurement, {cfg.threads} thread(s); fit_two_tower's examples/s (wall) and the bare "
        f"loop's alternate {cfg.train_repeats} times; medians; the ratio is the median of the "
        f"per-repeat ratios. The bare loop is `benchmarks.perf.BareLoop`.",
    )
    rep.table(
        "Training throughput: fit_two_tower against a bare torch loop",
        pair_rows,
        fmt={
            "fit_two_tower ex/s": ",.0f",
            "bare loop ex/s": ",.0f",
            "ratio ours/bare": ".2f",
            "bare ex/CPU-s": ",.0f",
        },
        note="ex/s: examples per second of wall time; ex/CPU-s: per second of process CPU time "
        "(what the other processes of a busy machine do not inflate).",
    )

    # scaling in batch: same examples, ours dense and sparse
    batch_rows = [  # the measurements above
        {"batch": cfg.train_batch, "steps": steps, "dense ex/s": summary[False]["ours"],
         "sparse ex/s": summary[True]["ours"]}
    ]  # fmt: skip
    with ctx.timer("training scaling"), _threads(cfg.threads):
        for b in ctx.progress(cfg.train_scaling_batches, desc="training: scaling in batch"):
            if b == cfg.train_batch:
                continue
            st = max(1, min(cfg.train_steps * cfg.train_batch // b, n_ex // b))
            row: dict[str, Any] = {"batch": b, "steps": st}
            for sp in (False, True):
                model = pairs[sp][0]
                key = "sparse ex/s" if sp else "dense ex/s"
                row[key] = _ours(model, log, seq, cfg, b, st, sp, seed)
            batch_rows.append(row)
        batch_rows.sort(key=lambda r: r["batch"])
        # scaling in items: a log on a world of each size
        item_rows = []
        for n in ctx.progress(cfg.train_scaling_items, desc="training: scaling in items"):
            if n == world.n_items:  # the measurements above
                dense_m, sparse_m = summary[False]["ours"], summary[True]["ours"]
                item_rows.append(
                    {
                        "items": n,
                        "examples": n_ex,
                        "steps": steps,
                        "dense ex/s": dense_m,
                        "sparse ex/s": sparse_m,
                        "sparse/dense": sparse_m / dense_m,
                    }
                )
                continue
            env_n, w_n = _env_world(n, seed)
            lg = _log_on(w_n, env_n, cfg.train_episodes, seed, cfg.train_max_steps)
            sq = EventSequences.from_log(lg, w_n.n_items)
            ne = len(next_item_examples(lg, sq, _HISTORY))
            st = max(1, min(cfg.train_steps, ne // cfg.train_batch))
            row = {"items": n, "examples": ne, "steps": st}
            for sp in (False, True):
                model = TwoTowerModel.build(default_two_tower(dim=cfg.train_dim), w_n.catalog)
                key = "sparse ex/s" if sp else "dense ex/s"
                row[key] = _ours(model, lg, sq, cfg, cfg.train_batch, st, sp, seed)
            row["sparse/dense"] = row["sparse ex/s"] / row["dense ex/s"]
            item_rows.append(row)
    rep.table(
        f"Training scaling in batch size ({world.n_items:,} items)",
        batch_rows,
        fmt={"dense ex/s": ",.0f", "sparse ex/s": ",.0f"},
        note="fit_two_tower's examples/s (wall), one measurement each; the row of the bar's "
        "batch repeats the medians above.",
    )
    rep.table(
        f"Training scaling in catalog size (batch {cfg.train_batch})",
        item_rows,
        fmt={
            "items": ",d",
            "examples": ",d",
            "dense ex/s": ",.0f",
            "sparse ex/s": ",.0f",
            "sparse/dense": ".2f",
        },
        note="A fresh model and an in-group log per world, one measurement each; the row of "
        "the env world repeats the medians above.",
    )
    rep.figure(
        "training_scaling",
        _loglog_figure(
            {
                "dense, in batch": (
                    [r["batch"] for r in batch_rows],
                    [r["dense ex/s"] for r in batch_rows],
                ),
                "sparse, in batch": (
                    [r["batch"] for r in batch_rows],
                    [r["sparse ex/s"] for r in batch_rows],
                ),
            },
            "batch size",
            "examples / s",
        ),
        f"fit_two_tower examples per second against the batch size ({world.n_items:,} items).",
        data={"batch": batch_rows, "items": item_rows},
    )
    with ctx.timer("training profile"), _threads(cfg.threads):
        prof_rows = _step_profile(pairs, log, seq, cfg, steps, seed)
    rep.table(
        f"Where a training step's time goes (batch {cfg.train_batch}, {world.n_items:,} items)",
        prof_rows,
        fmt={"dense ms/step": ".1f", "sparse ms/step": ".1f"},
        note="torch.profiler over one fit_two_tower epoch of the same steps per mode: the "
        "operators with the most self CPU time (the profiler adds its own overhead); "
        "optimizer rows are inclusive (everything inside the step).",
    )
    rep.add_result(
        "training",
        {
            "examples": n_ex,
            "history_fill": fill,
            "steps": steps,
            "dense": summary[False],
            "sparse": summary[True],
            "scaling_batch": batch_rows,
            "scaling_items": item_rows,
            "profile": prof_rows,
        },
    )
    return {"dense": summary[False], "sparse": summary[True], "n_items": world.n_items}


def _step_profile(
    pairs: dict[bool, tuple[TwoTowerModel, BareLoop]],
    log: ImpressionLog,
    seq: EventSequences,
    cfg: PerfConfig,
    steps: int,
    seed: int,
    top: int = 8,
) -> list[dict[str, Any]]:
    """Self CPU milliseconds per step of the costliest torch operators, dense and sparse."""
    from torch.profiler import ProfilerActivity, profile

    per_mode: dict[bool, dict[str, float]] = {}
    for sp in (False, True):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _ours(pairs[sp][0], log, seq, cfg, cfg.train_batch, steps, sp, seed)
        ops = {}
        for ev in prof.key_averages():
            if ev.key.startswith("Optimizer.step#"):
                ops[ev.key] = ev.cpu_time_total / 1e3 / steps  # inclusive
            elif not ev.key.startswith(("Optimizer.", "autograd::", "ProfilerStep")):
                ops[ev.key] = ev.self_cpu_time_total / 1e3 / steps
        per_mode[sp] = ops
    names: list[str] = []
    for sp in (False, True):
        ranked = sorted(per_mode[sp].items(), key=lambda kv: -kv[1])
        names += [k for k, _ in ranked[:top] if k not in names]
    names += [k for k in per_mode[True] if k.startswith("Optimizer.step#") and k not in names]
    names += [k for k in per_mode[False] if k.startswith("Optimizer.step#") and k not in names]
    rows = [
        {
            "operator": k,
            "dense ms/step": per_mode[False].get(k, 0.0),
            "sparse ms/step": per_mode[True].get(k, 0.0),
        }
        for k in names
    ]
    rows.sort(key=lambda r: -max(r["dense ms/step"], r["sparse ms/step"]))
    return rows


def _trained_data(cfg: PerfConfig, seed: int) -> Any:
    """The offline data whose trained item vectors are indexed."""
    if cfg.trained_world == "full":
        return offline_data(False, seed)
    if cfg.trained_world == "quick":
        return offline_data(True, seed)
    env_cfg = EnvConfig(
        world=WorldConfig(
            n_items=1_000, n_users=400, n_groups=2, n_topics=8, latent_dim=8, n_creators=50
        )
    )
    world = World(env_cfg.world, seed=seed, user_model=env_cfg.user_model)
    log = _log_on(world, env_cfg, 2 * world.n_users, seed)
    return prepare_offline(world, env_cfg, log, _HISTORY, 300, seed, "in-group(eps=0.05)")


def _index_section(cfg: PerfConfig, ctx: RunContext, rep: Any, seed: int) -> dict[str, Any]:
    """Exact vs torch vs faiss flat, scaling in N, HNSW/IVF on trained item vectors."""
    k = cfg.index_k
    clock = time.process_time if cfg.threads == 1 else time.perf_counter
    clock_name = "CPU time" if cfg.threads == 1 else "wall time"
    sizes = sorted(set(cfg.index_scaling_items) | {cfg.index_items})
    with ctx.timer("index vectors"):
        items, queries = clustered_embeddings(
            max(sizes), cfg.index_queries, cfg.index_dim, seed=ctx.seed_int(seed, "perf", "ivec")
        )
    scale_rows = []
    with ctx.timer("index exact"), _threads(cfg.threads):
        for n in ctx.progress(sizes, desc="index: exact vs torch"):
            x = items[:n]
            index = build_index(x, IndexConfig(kind="exact"))
            flat = faiss.IndexFlatIP(cfg.index_dim)
            flat.add(x)
            reps = cfg.index_repeats
            t_ours = _best_seconds(functools.partial(index.search, queries, k), reps, clock)
            t_torch = _best_seconds(functools.partial(torch_topk, x, queries, k), reps, clock)
            t_flat = _best_seconds(functools.partial(flat.search, queries, k), reps, clock)
            nq = len(queries)
            scale_rows.append(
                {
                    "items": n,
                    "exact index q/s": nq / t_ours,
                    "torch matmul+topk q/s": nq / t_torch,
                    "faiss IndexFlatIP q/s": nq / t_flat,
                    "exact / torch": t_torch / t_ours,
                }
            )
    big = next(r for r in scale_rows if r["items"] == cfg.index_items)
    rep.section(
        "Index",
        f"Exact search: {cfg.index_queries:,} queries, top-{k}, over synthetic clustered vectors "
        f"(`clustered_embeddings`, d={cfg.index_dim}; a prefix of N of them per row); best of "
        f"{cfg.index_repeats} after a warm-up, {clock_name}, {cfg.threads} thread(s).",
    )
    rep.table(
        "Exact search: ItemIndex against torch matmul+topk and faiss IndexFlatIP",
        scale_rows,
        fmt={
            "items": ",d",
            "exact index q/s": ",.0f",
            "torch matmul+topk q/s": ",.0f",
            "faiss IndexFlatIP q/s": ",.0f",
            "exact / torch": ".2f",
        },
        note="exact / torch > 1 means the index is faster than one plain matmul + topk.",
    )
    rep.figure(
        "index_scaling",
        _loglog_figure(
            {
                name: ([r["items"] for r in scale_rows], [r[name] for r in scale_rows])
                for name in ("exact index q/s", "torch matmul+topk q/s", "faiss IndexFlatIP q/s")
            },
            "items N",
            "queries / s",
        ),
        f"Exact top-{k} queries per second against the catalog size (log-log).",
        data={"rows": scale_rows},
    )

    # trained item vectors: dense (default) and sparse training, then HNSW / IVF sweeps
    with ctx.timer("trained data"):
        data = _trained_data(cfg, seed)
    quality_rows, gens = [], {}
    with ctx.timer("trained models"), _threads(cfg.threads):
        for sp in ctx.progress((False, True), desc="index: train two towers"):
            tc = TrainConfig(
                epochs=cfg.trained_epochs,
                patience=0,
                threads=cfg.threads,
                progress=False,
                seed=seed,
                sparse_embeddings=sp,
            )
            model, res, wall = train_two_tower(data, default_two_tower(), mixed_negatives(), tc)
            gens[sp] = two_tower_generator(model, data)
            ev = evaluate_generator(gens[sp], data)
            quality_rows.append(
                {
                    "world": world_label(data.env, seed),
                    "policy": data.label,
                    "model": "ID d=64, mean, cosine, mixed 1024 + logQ3, "
                    + ("sparse table (SparseAdam)" if sp else "dense (AdamW)"),
                    "epochs": len(res.history),
                    "recall@100": ev["recall@100"],
                    "recall@10": ev["recall@10"],
                    "train ex/s": res.examples_per_s,
                    "wall_s": wall,
                }
            )
    rep.table(
        "Dense vs sparse table gradients: quality and speed on the benchmark world",
        quality_rows,
        fmt={"recall@100": ".4f", "recall@10": ".4f", "train ex/s": ",.0f", "wall_s": ".1f"},
        note=f"Test recall over the whole catalog after {cfg.trained_epochs} epochs (best "
        "validation epoch kept), one seed.",
    )
    gen = gens[False]
    vecs = gen.item_vectors.numpy()  # (N, d) cached, similarity-prepared item vectors
    n_q = min(cfg.trained_queries, len(data.test_set))
    obs = {key: v[:n_q] for key, v in data.test_set.obs.items()}
    qv = gen.user_vectors(obs).numpy()  # (n_q, d)
    ann: dict[str, OperatingPoints] = {}
    build_s: dict[str, float] = {}
    with ctx.timer("index ann"), _threads(cfg.threads):
        for kind in ctx.progress(("hnsw", "ivf"), desc="index: HNSW / IVF sweeps"):
            t0 = time.perf_counter()
            index = build_index(vecs, IndexConfig(kind=kind, seed=seed))
            build_s[kind] = time.perf_counter() - t0
            values = (
                cfg.hnsw_ef if kind == "hnsw" else [v for v in cfg.ivf_nprobe if v <= index.nlist]
            )
            ann[kind] = operating_points(
                index, qv, k, values=values, repeats=cfg.index_repeats, timer=clock
            )
    exact_qps = float(np.median([ops.exact_qps for ops in ann.values()]))
    op_rows = []
    for kind, ops in ann.items():
        front = set(ops.pareto)
        for p in ops.all:
            op_rows.append(
                {
                    "index": kind,
                    "param": f"{p.param}={p.value}",
                    f"recall@{k}": p.recall,
                    "q/s": p.qps,
                    "x exact": p.qps / ops.exact_qps,
                    "pareto": "yes" if p in front else "",
                }
            )
    rep.table(
        f"HNSW and IVF on trained item vectors ({vecs.shape[0]:,} x {vecs.shape[1]}, "
        f"{n_q:,} held-out users)",
        op_rows,
        fmt={f"recall@{k}": ".4f", "q/s": ",.0f", "x exact": ".2f"},
        note=f"Exact search: {exact_qps:,.0f} q/s ({clock_name}). Builds: "
        + ", ".join(f"{kk} {v:.2f} s" for kk, v in build_s.items())
        + ". `x exact` divides by the exact q/s measured in the same sweep.",
    )
    fig = Figure(figsize=(5, 3.4))
    ax = fig.add_subplot()
    for kind, ops in ann.items():
        ax.plot([p.recall for p in ops.all], [p.qps for p in ops.all], "o:", alpha=0.5)
        ax.plot([p.recall for p in ops.pareto], [p.qps for p in ops.pareto], "o-", label=kind)
    ax.axhline(exact_qps, color="gray", ls="--", label="exact")
    ax.axhline(cfg.target_ann_speedup * exact_qps, color="red", ls=":", label="bar speed")
    ax.axvline(cfg.target_ann_recall, color="red", ls=":")
    ax.set_yscale("log")
    ax.set_xlabel(f"recall@{k} against exact")
    ax.set_ylabel("queries / s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    rep.figure(
        "ann_operating_points",
        fig,
        "Recall against queries per second; solid: Pareto front; red: the bar.",
        data={"points": op_rows, "exact_qps": exact_qps},
    )
    best = None
    for kind, ops in ann.items():
        p = ops.fastest_with_recall(cfg.target_ann_recall)
        if p is not None and (best is None or p.qps / ops.exact_qps > best[1]):
            best = (kind, p.qps / ops.exact_qps, p)
    rep.add_result(
        "index",
        {
            "exact_scaling": scale_rows,
            "trained_items": int(vecs.shape[0]),
            "trained_queries": n_q,
            "operating_points": op_rows,
            "exact_qps": exact_qps,
            "build_s": build_s,
            "quality": quality_rows,
        },
    )
    return {
        "big": big,
        "best": best,
        "quality": quality_rows,
        "n_trained": vecs.shape[0],
        "exact_qps": exact_qps,
    }


# --------------------------------------------------------------------------- the experiment


@experiment(
    "perf",
    "Speed side by side in one run: env user-steps/s (batched vs SyncVectorEnv), world build "
    "time and memory, training examples/s (vs a bare torch loop, dense and sparse gradients), "
    "index queries/s and recall (exact vs HNSW vs IVF vs torch matmul+topk), each with how it "
    "grows with users, items and batch.",
    PerfConfig,
)
def run(cfg: PerfConfig, ctx: RunContext) -> None:
    """Measure everything, then state the bars as claims (see the module docstring)."""
    seed = ctx.seeds[0]
    load0 = os.getloadavg()
    rep = ctx.report
    rep.section(
        "Setup",
        f"Seed {seed} (only the first seed runs: the figures are ratios measured side by side, "
        f"not averages over seeds); {cfg.threads} torch/faiss thread(s) for every measurement; "
        f"{os.cpu_count()} CPUs; load average at start {load0[0]:.2f} (1 min). Ratios compare "
        f"measurements taken in this process, alternating where stated.",
    )
    later = _Later()  # the sections' tables and figures go after the side-by-side table
    try:
        env = _env_section(cfg, ctx, later, seed)
        train = _train_section(cfg, ctx, later, seed, env["world"], env["env_cfg"])
        del env["world"]
        idx = _index_section(cfg, ctx, later, seed)
    except BaseException:
        later.replay(rep)  # keep what was measured before the failure
        raise
    load1 = os.getloadavg()

    dense, sparse = train["dense"], train["sparse"]
    big = idx["big"]
    best = idx["best"]
    q_dense, q_sparse = idx["quality"][0]["recall@100"], idx["quality"][1]["recall@100"]
    rows = [
        {
            "figure": "env user-steps/s",
            "measured": f"BatchedRecEnv B={cfg.env_batch:,}",
            "reference": f"SyncVectorEnv B={cfg.sync_batch}",
            "ratio": env["ratio"],
        },
        {
            "figure": "training ex/s (dense)",
            "measured": "fit_two_tower",
            "reference": "bare torch loop",
            "ratio": dense["ratio"],
        },
        {
            "figure": "training ex/s (sparse)",
            "measured": "fit_two_tower",
            "reference": "bare torch loop",
            "ratio": sparse["ratio"],
        },
        {
            "figure": "training ex/s",
            "measured": "sparse table (SparseAdam)",
            "reference": "dense (AdamW)",
            "ratio": sparse["ours"] / dense["ours"],
        },
        {
            "figure": f"exact top-{cfg.index_k} q/s, N={cfg.index_items:,}",
            "measured": "ItemIndex exact",
            "reference": "torch matmul+topk",
            "ratio": big["exact / torch"],
        },
        {
            "figure": f"exact top-{cfg.index_k} q/s, N={cfg.index_items:,}",
            "measured": "faiss IndexFlatIP",
            "reference": "torch matmul+topk",
            "ratio": big["faiss IndexFlatIP q/s"] / big["torch matmul+topk q/s"],
        },
        {
            "figure": f"ANN q/s at recall@{cfg.index_k} >= {cfg.target_ann_recall:g}",
            "measured": "best of HNSW / IVF" if best is None else best[0].upper(),
            "reference": "exact",
            "ratio": float("nan") if best is None else best[1],
        },
    ]
    rep.table(
        "Side by side (ratios measured in this run)",
        rows,
        fmt={"ratio": ".2f"},
        note=f"Load average (1 min) {load0[0]:.2f} at start, {load1[0]:.2f} at the end, on "
        f"{os.cpu_count()} CPUs. An empty ANN ratio means no setting reached the recall.",
    )

    # claims: the bars of the issues, pass or fail as measured
    rep.claim_compare(
        f"BatchedRecEnv is at least {cfg.target_env_ratio:g}x SyncVectorEnv of RecEnv",
        env["ratio"],
        ">=",
        cfg.target_env_ratio,
        measured_name="ratio",
        reference_name="bar",
        spec=".1f",
    )
    rep.claim_compare(
        f"Training at batch {cfg.train_batch} with in-batch + {cfg.train_uniform:,} uniform "
        f"negatives on {train['n_items']:,} items reaches {cfg.target_train_examples_per_s:,.0f} "
        f"examples/s with {cfg.threads} thread(s) (sparse table gradients, the faster path)",
        sparse["ours"],
        ">=",
        cfg.target_train_examples_per_s,
        measured_name="fit_two_tower ex/s (median, wall)",
        reference_name="bar",
        spec=",.0f",
    )
    rep.claim_compare(
        f"fit_two_tower runs at least {cfg.target_train_ratio:g}x a bare torch loop doing the "
        "same arithmetic (sparse table gradients)",
        sparse["ratio"],
        ">=",
        cfg.target_train_ratio,
        measured_name="ratio",
        reference_name="bar",
        spec=".2f",
    )
    rep.claim_compare(
        "... and with dense AdamW (the default)",
        dense["ratio"],
        ">=",
        cfg.target_train_ratio,
        measured_name="ratio",
        reference_name="bar",
        spec=".2f",
    )
    rep.claim_compare(
        f"Sparse table gradients lose at most {cfg.sparse_recall_tolerance:g} test recall@100 "
        f"against dense AdamW on the benchmark world ({idx['quality'][0]['world']})",
        q_sparse,
        ">=",
        q_dense - cfg.sparse_recall_tolerance,
        measured_name="sparse recall@100",
        reference_name="dense - tolerance",
        spec=".4f",
    )
    rep.claim_compare(
        f"Exact index search is within {cfg.target_exact_slowdown:g}x of a plain torch "
        f"matmul+topk on {cfg.index_items:,} x {cfg.index_dim} vectors",
        big["exact / torch"],
        ">=",
        1.0 / cfg.target_exact_slowdown,
        measured_name="exact q/s / torch q/s",
        reference_name="1 / bar",
        spec=".3f",
    )
    rep.claim(
        f"HNSW or IVF reaches recall@{cfg.index_k} >= {cfg.target_ann_recall:g} against exact "
        f"at >= {cfg.target_ann_speedup:g}x the exact queries/s on the trained item vectors "
        f"({idx['n_trained']:,} items)",
        best is not None and best[1] >= cfg.target_ann_speedup,
        "no setting reached the recall"
        if best is None
        else f"fastest setting with the recall: {best[0]} {best[2].param}={best[2].value}, "
        f"recall {best[2].recall:.4f}, {best[1]:.2f}x exact ({idx['exact_qps']:,.0f} q/s)",
    )
    rep.add_result("load_average", {"start": list(load0), "end": list(load1)})
    later.replay(rep)
    ann = (
        "none"
        if best is None
        else f"{best[0]} {best[1]:.1f}x exact at recall>={cfg.target_ann_recall:g}"
    )
    rep.headline(
        f"env {env['ratio']:.0f}x SyncVectorEnv; training {sparse['ours']:,.0f} ex/s sparse "
        f"({sparse['ratio']:.2f}x bare), {dense['ours']:,.0f} dense ({dense['ratio']:.2f}x bare); "
        f"exact index {big['exact / torch']:.2f}x torch at N={cfg.index_items:,}; ANN: {ann}"
    )
