"""perf: the speed of training and search, each measured side by side with a reference.

Every figure here is a ratio against a reference measured in the same process, alternating
with it, because the machine is shared and absolute numbers swing with the other processes.
The simulator's speed (``BatchedRecEnv`` vs ``SyncVectorEnv``, world builds) is measured by
``perf-env`` and not repeated here; large-catalog approximate search by ``ann``.

- training: examples/s of :func:`retrieval.train.fit_two_tower` (ID item tower, mean pooling
  over L = 32 history items, sampled softmax with in-batch + uniform negatives and logQ)
  against a bare hand-written torch loop doing the same arithmetic (:class:`BareLoop`), with
  dense fused AdamW, with sparse table gradients, and under bf16 autocast; scaling in batch
  and catalog; the per-operator profile of a step (``torch.profiler``);
- devices (``--device cuda``, or ``device_section="on"``): the same pair at the sizes of
  issue 11 (100k items / d64 / batch 1,024 + 4,096 uniform; 1M / d128 / 8,192 + 8,192; 10M /
  d128 / 16,384 + 16,384), fp32 and bf16, on synthetic click logs. On a GPU, this section
  alone: ``python -m benchmarks perf --device cuda --threads 4 --set sections=devices``;
- index: queries/s of the exact :class:`retrieval.index.ItemIndex` against a best-effort
  torch matmul + top-k over the same chunks and score buffer
  (:func:`benchmarks.search.torch_topk`) and faiss ``IndexFlatIP``, scaling in N; HNSW and
  IVF operating points on the item vectors of a two-tower model trained on the benchmark
  world, the fastest setting with the recall chosen on half of the users and measured on
  the other half.

Clocks: training figures are wall time (``fit_two_tower``'s own ``examples_per_s``), with
the bare loop's CPU time beside; index figures are process CPU time with one thread, which
the other processes of a shared machine disturb less. Bars are findings (HOLDS / REFUTED /
INCONCLUSIVE with an interval over the alternating repetitions).
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
from benchmarks.registry import ExperimentConfig, experiment, param
from benchmarks.runner import RunContext
from benchmarks.search import (
    OperatingPoints,
    clustered_embeddings,
    operating_points,
    torch_topk,
    verify_setting,
)
from benchmarks.stats import one_sample_effect, paired_effect, ratio_effect
from retrieval.data import next_item_examples
from retrieval.index import IndexConfig, build_index
from retrieval.metrics import recall_at_k
from retrieval.model import TwoTowerConfig, TwoTowerModel
from retrieval.similarity import SimilarityConfig
from retrieval.towers import ItemTowerConfig, UserTowerConfig
from retrieval.train import TrainConfig, fit_two_tower
from simenv import BatchedRecEnv, EnvConfig, World, WorldConfig, collect
from simenv.device import autocast, resolve_device
from simenv.history import EventSequences
from simenv.log import ImpressionLog
from simenv.policies import InGroupPolicy
from simenv.types import Columns, EventType, Obs

__all__ = ["PerfConfig", "BareLoop", "synthetic_click_log", "run"]

_TRAINED_WORLDS = ("full", "quick", "tiny")
_HISTORY = 32  # L: history items mean-pooled by the user tower (both loops)
_USER_POSITIVES = 32  # other positives of each user masked out of its negatives (both loops)
_SECTIONS = ("auto", "on", "off")
_PARTS = ("training", "devices", "index")


def _size(spec: str) -> tuple[int, int, int, int]:
    """``"N:d:B:U"`` -> (items, dim, batch, uniform negatives)."""
    parts = spec.split(":")
    if len(parts) != 4 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"device_sizes entries must be 'N:d:B:U' positive integers, got {spec!r}")
    n, d, b, u = (int(p) for p in parts)
    if b < 2:
        raise ValueError(f"device_sizes batch must be >= 2 (in-batch negatives), got {spec!r}")
    return n, d, b, u


def _precision(mode: Any) -> str:
    return "bf16" if mode == "bf16" else "fp32"


@dataclass(frozen=True)
class PerfConfig(ExperimentConfig):
    """Speed of the training loop and the index, each against a reference."""

    threads: int = param(1, "torch and faiss threads of every measurement (the bars are 1-thread)")
    sections: tuple[str, ...] = param(
        ("training", "devices", "index"),
        "sections to run (devices: see device_section); e.g. --set sections=devices on a GPU",
    )
    # training
    train_items: int = param(100_000, "catalog of the training world")
    train_episodes: int = param(10_000, "user episodes logged on the training world")
    train_max_steps: int = param(40, "env steps of the training log (cuts long episodes)")
    train_batch: int = param(1024, "training batch of the bar")
    train_uniform: int = param(4096, "uniform negatives per batch (plus the in-batch ones)")
    train_dim: int = param(64, "embedding dimension d")
    train_steps: int = param(12, "timed steps per training measurement")
    train_repeats: int = param(3, "alternating repeats of ours vs the bare loop (median)")
    train_bf16: bool = param(True, "also measure dense training under bf16 autocast")
    train_scaling_batches: tuple[int, ...] = param(
        (256, 512, 2048, 4096), "batch sizes of the training scaling curve"
    )
    train_scaling_items: tuple[int, ...] = param(
        (10_000, 100_000, 300_000), "catalog sizes of the training scaling curve (a log each)"
    )
    # devices
    device_section: str = param(
        "auto", "the device section: auto (only when --device is not cpu), on, off"
    )
    device_sizes: tuple[str, ...] = param(
        ("100000:64:1024:4096", "1000000:128:8192:8192", "10000000:128:16384:16384"),
        "N:d:B:U of the device section (items, dim, batch, uniform negatives)",
    )
    device_steps: int = param(20, "timed steps per device measurement")
    device_repeats: int = param(3, "alternating repeats of ours vs the bare loop on the device")
    device_ratio_items: int = param(1_000_000, "catalog size of the device ratio bar")
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
    target_train_examples_per_s: float = param(20_000.0, "bar: training examples/s, 1 thread")
    target_train_ratio: float = param(0.9, "bar: fit_two_tower / bare loop examples/s")
    target_device_ratio: float = param(0.8, "bar: fit_two_tower / bare loop on the device")
    target_exact_slowdown: float = param(1.2, "bar: exact index at most this x slower than torch")
    target_ann_recall: float = param(0.95, "bar: recall@k of HNSW or IVF against exact")
    target_ann_speedup: float = param(10.0, "bar: ... at this many times the exact queries/s")
    sparse_recall_tolerance: float = param(
        0.01, "bar: sparse-gradient training loses at most this much test recall@100"
    )

    def __post_init__(self) -> None:
        for name in (
            "threads",
            "train_items",
            "train_episodes",
            "train_max_steps",
            "train_batch",
            "train_dim",
            "train_steps",
            "train_repeats",
            "device_steps",
            "device_repeats",
            "device_ratio_items",
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
        if not isinstance(self.train_bf16, bool):
            raise ValueError(f"train_bf16 must be a bool, got {self.train_bf16!r}")
        if not self.sections or any(x not in _PARTS for x in self.sections):
            raise ValueError(
                f"sections must be a non-empty subset of {_PARTS}, got {self.sections!r}"
            )
        if self.device_section not in _SECTIONS:
            raise ValueError(
                f"device_section must be one of {_SECTIONS}, got {self.device_section!r}"
            )
        if not self.device_sizes:
            raise ValueError("device_sizes must hold at least one 'N:d:B:U' entry")
        for spec in self.device_sizes:
            _size(spec)
        for name in (
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
            "target_train_examples_per_s",
            "target_train_ratio",
            "target_device_ratio",
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
        """A few minutes on two busy cores with ``--threads 1``; the bars at smaller sizes."""
        return replace(
            cls(),
            train_episodes=2_500,
            train_steps=6,
            train_repeats=2,
            train_scaling_batches=(256, 2048),
            train_scaling_items=(10_000, 100_000),
            device_sizes=("100000:64:1024:4096", "1000000:128:8192:8192"),
            device_steps=10,
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


def synthetic_click_log(
    n_items: int, n_examples: int, seed: int, clicks: int = 41
) -> ImpressionLog:
    """A click-only log for throughput measurements at any catalog size (no world needed).

    ``ceil(n_examples / (clicks - 1))`` users click ``clicks`` items each, one per request
    (position 0), at increasing times; items follow a Zipf-like law (exponent 1.1) over a
    seeded random permutation of the catalog, so that popular items repeat as in a real log.
    Each user's later clicks have the earlier ones as history: ``n_examples`` next-item
    examples or more.
    """
    rng = np.random.default_rng(seed)
    n_users = -(-n_examples // (clicks - 1))
    n = n_users * clicks
    ranks = np.minimum(rng.zipf(1.1, size=n), n_items) - 1  # heavy head, long tail
    items = rng.permutation(n_items)[ranks]
    users = np.repeat(np.arange(n_users), clicks)
    step = np.tile(np.arange(clicks), n_users)
    cols = {
        Columns.USER: users,
        Columns.TIME: step * 0.01 + users * 1e-7,
        Columns.SESSION: np.zeros(n, np.int32),
        "session_step": step.astype(np.int32),
        Columns.REQUEST: np.arange(n),
        Columns.POSITION: np.zeros(n, np.int16),
        Columns.ITEM: items,
        Columns.FEEDBACK: np.full(n, int(EventType.CLICK), np.int8),
        Columns.WATCH: np.ones(n, np.float32),
        Columns.REWARD: np.ones(n, np.float32),
        Columns.PROPENSITY: np.full(n, np.nan, np.float32),
    }
    return ImpressionLog(cols)


def _id_model(n_items: int, dim: int) -> TwoTowerModel:
    """The default recipe's model on a bare catalog size (ID table, mean pooling, cosine)."""
    cfg = TwoTowerConfig(
        item=ItemTowerConfig(kind="id", dim=dim, n_items=n_items),
        user=UserTowerConfig(kind="mean"),
        similarity=SimilarityConfig(kind="cosine", temperature=None, learnable_temperature=True),
    )
    return TwoTowerModel.build(cfg, None)


def _ours(
    model: TwoTowerModel,
    log: ImpressionLog,
    seq: EventSequences,
    cfg: PerfConfig,
    batch: int,
    steps: int,
    sparse: bool,
    seed: int,
    precision: str = "fp32",
    device: str = "cpu",
    uniform: int | None = None,
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
        precision=precision,
        device=device,
    )
    u = cfg.train_uniform if uniform is None else uniform
    res = fit_two_tower(model, mixed_negatives(uniform=u), log, seq, tc)
    return float(res.history[0]["examples_per_s"])


def _device_section(cfg: PerfConfig, ctx: RunContext, rep: Any, seed: int) -> dict[str, Any]:
    """fit_two_tower against the bare loop on ``ctx.device`` at the sizes of issue 11."""
    device = ctx.device
    dev = resolve_device(device)
    rows, runs = [], {}
    for spec in ctx.progress(cfg.device_sizes, desc=f"device {dev}: sizes"):
        n, d, b, u = _size(spec)
        log = synthetic_click_log(n, b * (cfg.device_steps + 1), ctx.seed_int(seed, "dev", n))
        seq = EventSequences.from_log(log, n)
        ex = next_item_examples(log, seq, _HISTORY)
        user_pos = seq.positives_matrix(ex.user, width=_USER_POSITIVES)
        steps = max(1, min(cfg.device_steps, len(ex) // b))
        for precision in ("fp32", "bf16"):
            model = _id_model(n, d)
            bare = BareLoop(
                ex.obs[Obs.ITEMS], ex.obs[Obs.MASK], ex.target, user_pos, n, d, b, u, False,
                seed, TrainConfig(), device=device, precision=precision,
            )  # fmt: skip
            ours_r, bare_r = [], []
            with _threads(cfg.threads):
                # warm-up of both (CUDA context, kernels, allocator), then alternate
                _ours(model, log, seq, cfg, b, 1, False, seed, precision, device, u)
                bare.examples_per_s(1)
                for _ in range(cfg.device_repeats):
                    ours_r.append(
                        _ours(model, log, seq, cfg, b, steps, False, seed, precision, device, u)
                    )
                    bare_r.append(bare.examples_per_s(steps)[0])
            runs[(n, precision)] = (ours_r, bare_r)
            rows.append(
                {
                    "items": n, "d": d, "batch": b, "uniform": u, "precision": precision,
                    "fit_two_tower ex/s": float(np.median(ours_r)),
                    "bare loop ex/s": float(np.median(bare_r)),
                    "ratio ours/bare": float(np.median(np.array(ours_r) / np.array(bare_r))),
                }
            )  # fmt: skip
            del model, bare
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    rep.section(
        "Devices",
        f"Device {dev} ({name}). Synthetic click logs (Zipf items over the catalog, 40 clicks "
        f"per user, L={_HISTORY}); model: ID table d, mean pooling, cosine with learnable "
        f"temperature; loss: sampled softmax, in-batch + U uniform negatives, logQ3, accidental "
        f"hits masked; fused AdamW, dense table. {cfg.device_steps} timed steps per "
        f"measurement after a warm-up, fit_two_tower and the bare loop alternating "
        f"{cfg.device_repeats} times (wall time, one host sync at the end of each run).",
    )
    rep.table(
        "fit_two_tower against a bare torch loop on the device",
        rows,
        fmt={"items": ",d", "fit_two_tower ex/s": ",.0f", "bare loop ex/s": ",.0f",
             "ratio ours/bare": ".2f"},
    )  # fmt: skip
    rep.add_result("device", {"device": str(dev), "name": name, "rows": rows})
    return {"runs": runs, "rows": rows, "device": str(dev)}


# --------------------------------------------------------------------------- the bare loop


class BareLoop:
    """The reference training loop: the arithmetic of one ``fit_two_tower`` step, by hand.

    Same model and loss as ``fit_two_tower`` with the default recipe (ID item table shared by
    a mean-pooling user tower, cosine similarity with the learnable temperature
    ``tau = clip(exp(s), 0.01, 100)``, sampled softmax over in-batch + ``uniform`` negatives
    with the logQ correction L_logQ3, accidental hits masked, gradient clipping, AdamW with
    the temperature at ``lr * temperature_lr_scale``; with ``sparse`` the table has sparse
    gradients stepped by ``torch.optim.SparseAdam``), written as plain tensor operations on
    tensors prepared once, on one device: no configs, no validation, no framework code. Best
    effort: fused AdamW, the logQ of every item computed once, one host sync per timed run.

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
        device: torch device of every tensor.
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the forward, as ``TrainConfig``).
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
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        dev = self.device = resolve_device(device)
        self.precision = precision
        self.items = torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64)).to(dev)
        self.mask = torch.from_numpy(np.asarray(mask) != 0).to(dev)  # (n, L)
        self.target = torch.from_numpy(np.ascontiguousarray(target, dtype=np.int64)).to(dev)
        self.user_pos = torch.from_numpy(np.ascontiguousarray(user_pos, dtype=np.int64)).to(dev)
        self.n_items, self.batch, self.uniform, self.sparse = n_items, batch, uniform, sparse
        self.clip = train.grad_clip
        p = torch.bincount(self.target, minlength=n_items).double()
        p = p / p.sum()  # (N,) frequency of the positives
        n_unigram, n_draws = batch - 1, batch - 1 + uniform
        # logQ of the mixture of in-batch (unigram p) and uniform draws, as the expected
        # count log(n Q(d)) that fit_two_tower's default logq_scale subtracts.
        q = torch.clamp((n_unigram * p + uniform / n_items) / n_draws, min=1e-9)
        self.log_q = (torch.log(q) + math.log(n_draws)).float()  # (N,)
        self.log_q = self.log_q.to(dev)
        self.gen = torch.Generator(device=dev).manual_seed(seed)
        self.table = nn.Parameter(
            torch.randn(n_items, dim, generator=self.gen, device=dev) * dim**-0.5
        )
        self.empty = nn.Parameter(torch.zeros(dim, device=dev))
        self.log_tau = nn.Parameter(torch.zeros((), device=dev))
        tau_group = {"params": [self.log_tau], "lr": train.lr * train.temperature_lr_scale}
        dense = [self.empty] if sparse else [self.table, self.empty]
        self.opts: list[torch.optim.Optimizer] = [
            torch.optim.AdamW(
                [{"params": dense}, tau_group], lr=train.lr, weight_decay=0.0, fused=True
            )
        ]
        if sparse:
            self.opts.append(torch.optim.SparseAdam([self.table], lr=train.lr))
        self._neg_inf = torch.tensor(torch.finfo(torch.float32).min, device=dev)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table, sparse=self.sparse)

    def step(self, rows: torch.Tensor) -> float:
        """One optimisation step on examples ``rows``; returns the loss."""
        return float(self._step(rows.to(self.device)))

    def _step(self, rows: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            loss = self._loss(rows)
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
        return loss.detach()

    def _loss(self, rows: torch.Tensor) -> torch.Tensor:
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
        uni = torch.randint(self.n_items, (self.uniform,), generator=self.gen, device=self.device)
        ids = torch.cat([pos, uni])  # (M,) in-batch positives, then uniform draws
        keys = F.normalize(self._lookup(ids), dim=-1)  # (M, d)
        pos_logit = (q * keys[:b]).sum(-1)  # (B,) f(u, p)
        logits = torch.addmm(-self.log_q[ids][None, :], q, keys.T).float()  # (B, M) f - log nQ
        # accidental hits: a negative equal to the row's positive or to another positive of
        # its user is masked (sorted negatives, binary search, every duplicate)
        sorted_ids, order = torch.sort(ids)
        ar = torch.arange(b, device=self.device)
        hit_rows = torch.cat([ar, ar.repeat_interleave(upos.shape[1])])
        targets = torch.cat([pos, upos.reshape(-1)])
        keep = targets >= 0
        hit_rows, targets = hit_rows[keep], targets[keep]
        lo = torch.searchsorted(sorted_ids, targets)
        cnt = torch.searchsorted(sorted_ids, targets, right=True) - lo
        r = torch.repeat_interleave(hit_rows, cnt)
        first = torch.repeat_interleave(lo - (torch.cumsum(cnt, 0) - cnt), cnt)
        c = order[first + torch.arange(r.shape[0], device=self.device)]
        logits = logits.index_put((r, c), self._neg_inf)
        # L_logQ3: -log e^{f(p)} / (e^{f(p)} + sum_j e^{f(d_j) - log Q(d_j)})
        all_logits = torch.cat([pos_logit[:, None].float(), logits], 1)  # (B, 1 + M)
        return (torch.logsumexp(all_logits, 1) - pos_logit.float()).mean()

    def examples_per_s(self, steps: int) -> tuple[float, float]:
        """Run ``steps`` steps on a fresh shuffle; returns (wall, CPU-time) examples per second."""
        n = self.target.shape[0]
        order = torch.randperm(n, generator=self.gen, device=self.device)
        steps = max(1, min(steps, n // self.batch))
        t0, c0 = time.perf_counter(), time.process_time()
        total = torch.zeros((), device=self.device)
        for s in range(steps):
            total += self._step(order[s * self.batch : (s + 1) * self.batch])
        float(total)  # one host sync: the device has finished every step
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
    # our model and the bare loop on the same examples, per mode: dense AdamW (False), sparse
    # table gradients (True) and, with train_bf16, dense under bf16 autocast ("bf16")
    modes: list[Any] = [False, True] + (["bf16"] if cfg.train_bf16 else [])
    pairs = {}
    for mode in modes:
        sp = mode is True
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
            precision=_precision(mode),
        )
        pairs[mode] = (model, bare)
    runs: dict[Any, dict[str, list[float]]] = {
        mode: {"ours": [], "bare": [], "bare_cpu": []} for mode in modes
    }
    with ctx.timer("training pair"), _threads(cfg.threads):
        for _ in ctx.progress(range(cfg.train_repeats), desc="training: ours vs bare"):
            for mode in modes:  # alternate: ours, bare, ours, bare, ...
                model, bare = pairs[mode]
                runs[mode]["ours"].append(
                    _ours(model, log, seq, cfg, cfg.train_batch, steps, mode is True, seed,
                          precision=_precision(mode))
                )  # fmt: skip
                wall, cpu = bare.examples_per_s(steps)
                runs[mode]["bare"].append(wall)
                runs[mode]["bare_cpu"].append(cpu)
    pair_rows, summary = [], {}
    names = {False: "dense (AdamW)", True: "sparse (lazy Adam / SparseAdam)", "bf16": "dense, bf16"}
    for mode in modes:
        r = runs[mode]
        ratios = [a / b for a, b in zip(r["ours"], r["bare"], strict=True)]
        name = names[mode]
        sp = mode
        summary[mode] = {
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
        f"{_USER_POSITIVES} other positives of the user) masked; fused AdamW (sparse: the "
        f"table by lazy Adam in fit_two_tower, by torch.optim.SparseAdam in the bare loop), "
        f"gradient clip 5; bf16: autocast of the forward, weights in float32. Batch {cfg.train_batch}, {steps} timed steps per "
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
            "bf16": summary.get("bf16"),
            "scaling_batch": batch_rows,
            "scaling_items": item_rows,
            "profile": prof_rows,
        },
    )
    return {
        "dense": summary[False],
        "sparse": summary[True],
        "bf16": summary.get("bf16"),
        "n_items": world.n_items,
    }


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
    # the bar: index and baseline alternate at N = index_items (side-by-side ratio)
    x = items[: cfg.index_items]
    index = build_index(x, IndexConfig(kind="exact"))
    exact_runs: dict[str, list[float]] = {"index": [], "torch": []}
    with ctx.timer("index exact pair"), _threads(cfg.threads):
        for _ in range(max(3, cfg.index_repeats)):
            for name, fn in (
                ("index", functools.partial(index.search, queries, k)),
                ("torch", functools.partial(torch_topk, x, queries, k)),
            ):
                t0 = clock()
                fn()
                exact_runs[name].append(len(queries) / max(clock() - t0, 1e-12))
    del index, x
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
    quality_rows, gens, per_user = [], {}, {}
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
            ids, _ = gens[sp].retrieve(data.test_set.obs, 100, exclude_seen=False)
            per_user[sp] = recall_at_k(ids, data.test_set.positives, 100)  # (U,)
            quality_rows.append(
                {
                    "world": world_label(data.env, seed),
                    "policy": data.label,
                    "model": "ID d=64, mean, cosine, mixed 1024 + logQ3, "
                    + ("sparse table (lazy Adam)" if sp else "dense (AdamW)"),
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
    qv_all = gen.user_vectors(obs).numpy()  # (n_q, d)
    # choose settings on the first half of the users, report on the held-out second half
    qv, qv_test = qv_all[: n_q // 2], qv_all[n_q // 2 :]
    ann: dict[str, OperatingPoints] = {}
    built: dict[str, Any] = {}
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
            built[kind] = index
    exact_qps = float(np.median([ops.exact_qps for ops in ann.values()]))
    op_rows = []
    for kind, ops in ann.items():
        front = set(ops.pareto)
        for p in ops.all:
            op_rows.append(
                {
                    "index": kind,
                    "param": p.label,
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
    verified = None
    if best is not None:  # the chosen setting, measured on the held-out users
        with ctx.timer("index ann verify"), _threads(cfg.threads):
            verified = verify_setting(
                built[best[0]], build_index(vecs), qv_test, k, dict(best[2].settings),
                max(3, cfg.index_repeats), clock,
            )  # fmt: skip
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
        "exact_runs": exact_runs,
        "best": best,
        "verified": verified,
        "per_user": per_user,
        "quality": quality_rows,
        "n_trained": vecs.shape[0],
        "exact_qps": exact_qps,
    }


def _device_findings(cfg: PerfConfig, rep: Any, dev: dict[str, Any]) -> None:
    """The device bar: fit_two_tower / bare loop at ``device_ratio_items``, fp32 and bf16."""
    for (n, precision), (ours_r, bare_r) in dev["runs"].items():
        if n != cfg.device_ratio_items:
            continue
        rep.finding(
            f"On {dev['device']}, fit_two_tower runs at least {cfg.target_device_ratio:g}x "
            f"the bare loop at {n:,} items ({precision})",
            ratio_effect(ours_r, bare_r, bar=cfg.target_device_ratio, unit="alternating runs"),
            metric="examples/s ratio fit_two_tower / bare loop",
            direction=">",
        )


# --------------------------------------------------------------------------- the experiment


@experiment(
    "perf",
    "Speed side by side in one run: training examples/s (fit_two_tower vs a bare torch loop; "
    "dense, sparse and bf16; on the --device at the sizes of issue 11), index queries/s and "
    "recall (exact vs torch matmul+topk vs HNSW vs IVF), each with how it grows with items "
    "and batch. The simulator's speed is perf-env's; large-catalog ANN is ann's.",
    PerfConfig,
)
def run(cfg: PerfConfig, ctx: RunContext) -> None:
    """Measure everything, then state the bars as findings (see the module docstring)."""
    seed = ctx.seeds[0]
    load0 = os.getloadavg()
    rep = ctx.report
    run_device = "devices" in cfg.sections and (
        cfg.device_section == "on" or (cfg.device_section == "auto" and ctx.device != "cpu")
    )
    rep.section(
        "Setup",
        f"Seed {seed} (only the first seed runs: the figures are ratios measured side by side, "
        f"not averages over seeds); {cfg.threads} torch/faiss thread(s) for every measurement; "
        f"{os.cpu_count()} CPUs; device {ctx.device}; load average at start {load0[0]:.2f} "
        f"(1 min). Ratios compare measurements taken in this process, alternating where stated.",
    )
    later = _Later()  # the sections' tables and figures go after the side-by-side table
    dev = train = idx = None
    try:
        if "training" in cfg.sections:
            with ctx.timer("training world"):
                env_cfg = EnvConfig(world=WorldConfig(n_items=cfg.train_items))
                world = World(env_cfg.world, seed=seed, user_model=env_cfg.user_model)
            train = _train_section(cfg, ctx, later, seed, world, env_cfg)
            del world
        if run_device:
            dev = _device_section(cfg, ctx, later, seed)
        if "index" in cfg.sections:
            idx = _index_section(cfg, ctx, later, seed)
    except BaseException:
        later.replay(rep)  # keep what was measured before the failure
        raise
    load1 = os.getloadavg()
    rows: list[dict[str, Any]] = []
    if train is not None:
        rows += _training_rows(train)
    if idx is not None:
        rows += _index_rows(cfg, idx)
    if dev is not None:
        rows += [
            {"figure": f"{dev['device']} ex/s, {r['items']:,} items ({r['precision']})",
             "measured": "fit_two_tower", "reference": "bare torch loop",
             "ratio": r["ratio ours/bare"]}
            for r in dev["rows"]
        ]  # fmt: skip
    rep.table(
        "Side by side (ratios measured in this run)",
        rows,
        fmt={"ratio": ".2f"},
        note=f"Load average (1 min) {load0[0]:.2f} at start, {load1[0]:.2f} at the end, on "
        f"{os.cpu_count()} CPUs. An empty ANN ratio means no setting reached the recall.",
    )
    # findings: the bars of the issues, each from its repetitions, for the sections that ran
    if train is not None:
        _training_findings(cfg, rep, train)
    if dev is not None:
        _device_findings(cfg, rep, dev)
    if idx is not None:
        _index_findings(cfg, rep, idx)
    rep.add_result("load_average", {"start": list(load0), "end": list(load1)})
    later.replay(rep)
    parts = []
    if train is not None:
        dense, sparse, bf16 = train["dense"], train["sparse"], train["bf16"]
        bf = "" if bf16 is None else f", {bf16['ours']:,.0f} bf16"
        parts.append(
            f"training {dense['ours']:,.0f} ex/s dense ({dense['ratio']:.2f}x bare), "
            f"{sparse['ours']:,.0f} sparse ({sparse['ratio']:.2f}x bare){bf}"
        )
    if dev is not None:
        parts.append(
            f"{dev['device']}: "
            + ", ".join(
                f"{r['items']:,} {r['precision']} {r['ratio ours/bare']:.2f}x bare"
                for r in dev["rows"]
            )
        )
    if idx is not None:
        best = idx["best"]
        ann = (
            "none"
            if best is None
            else f"{best[0]} {best[1]:.1f}x exact at recall>={cfg.target_ann_recall:g}"
        )
        parts.append(
            f"exact index {idx['big']['exact / torch']:.2f}x torch at N={cfg.index_items:,}; "
            f"ANN: {ann}"
        )
    rep.headline("; ".join(parts))


def _training_rows(train: dict[str, Any]) -> list[dict[str, Any]]:
    dense, sparse, bf16 = train["dense"], train["sparse"], train["bf16"]
    rows = [
        {"figure": "training ex/s (dense)", "measured": "fit_two_tower",
         "reference": "bare torch loop", "ratio": dense["ratio"]},
        {"figure": "training ex/s (sparse)", "measured": "fit_two_tower",
         "reference": "bare torch loop", "ratio": sparse["ratio"]},
        {"figure": "training ex/s", "measured": "sparse table (lazy Adam)",
         "reference": "dense (fused AdamW)", "ratio": sparse["ours"] / dense["ours"]},
    ]  # fmt: skip
    if bf16 is not None:
        rows += [
            {"figure": "training ex/s (dense, bf16)", "measured": "fit_two_tower",
             "reference": "bare torch loop (bf16)", "ratio": bf16["ratio"]},
            {"figure": "training ex/s", "measured": "bf16 autocast",
             "reference": "fp32", "ratio": bf16["ours"] / dense["ours"]},
        ]  # fmt: skip
    return rows


def _index_rows(cfg: PerfConfig, idx: dict[str, Any]) -> list[dict[str, Any]]:
    big, best = idx["big"], idx["best"]
    return [
        {"figure": f"exact top-{cfg.index_k} q/s, N={cfg.index_items:,}",
         "measured": "ItemIndex exact", "reference": "torch matmul+topk (same chunks)",
         "ratio": big["exact / torch"]},
        {"figure": f"exact top-{cfg.index_k} q/s, N={cfg.index_items:,}",
         "measured": "faiss IndexFlatIP", "reference": "torch matmul+topk (same chunks)",
         "ratio": big["faiss IndexFlatIP q/s"] / big["torch matmul+topk q/s"]},
        {"figure": f"ANN q/s at recall@{cfg.index_k} >= {cfg.target_ann_recall:g}",
         "measured": "best of HNSW / IVF" if best is None else best[0].upper(),
         "reference": "exact", "ratio": float("nan") if best is None else best[1]},
    ]  # fmt: skip


def _training_findings(cfg: PerfConfig, rep: Any, train: dict[str, Any]) -> None:
    dense, sparse, bf16 = train["dense"], train["sparse"], train["bf16"]
    fastest = max((dense, sparse), key=lambda m: m["ours"])
    which = "sparse table gradients" if fastest is sparse else "dense fused AdamW"
    rep.finding(
        f"Training at batch {cfg.train_batch} with in-batch + {cfg.train_uniform:,} uniform "
        f"negatives on {train['n_items']:,} items reaches {cfg.target_train_examples_per_s:,.0f} "
        f"examples/s with {cfg.threads} thread(s) in fp32 (the faster table mode: {which})",
        one_sample_effect(
            fastest["runs"]["ours"], cfg.target_train_examples_per_s, unit="repetitions"
        ),
        metric="fit_two_tower examples/s (wall)",
        direction=">",
    )
    if bf16 is not None:
        rep.finding(
            f"... and under bf16 autocast (dense, {cfg.threads} thread(s))",
            one_sample_effect(
                bf16["runs"]["ours"], cfg.target_train_examples_per_s, unit="repetitions"
            ),
            metric="fit_two_tower examples/s (wall)",
            direction=">",
        )
    for name, m in (("dense fused AdamW, the default", dense), ("sparse table gradients", sparse)):
        rep.finding(
            f"fit_two_tower runs at least {cfg.target_train_ratio:g}x a bare torch loop doing "
            f"the same arithmetic ({name})",
            ratio_effect(
                m["runs"]["ours"], m["runs"]["bare"], bar=cfg.target_train_ratio,
                unit="alternating runs",
            ),
            metric="examples/s ratio fit_two_tower / bare loop",
            direction=">",
        )  # fmt: skip


def _index_findings(cfg: PerfConfig, rep: Any, idx: dict[str, Any]) -> None:
    best = idx["best"]
    pu = idx["per_user"]
    rep.finding(
        f"Sparse table gradients lose at most {cfg.sparse_recall_tolerance:g} test recall@100 "
        f"against dense AdamW on the benchmark world ({idx['quality'][0]['world']})",
        paired_effect(pu[True] + cfg.sparse_recall_tolerance, pu[False]),
        metric=f"recall@100 per user, sparse + {cfg.sparse_recall_tolerance:g} - dense",
        direction=">",
        note="one seed, paired over the held-out users",
    )
    er = idx["exact_runs"]
    rep.finding(
        f"Exact index search is within {cfg.target_exact_slowdown:g}x of a best-effort torch "
        f"matmul+topk (same chunks, reused score buffer) on {cfg.index_items:,} x "
        f"{cfg.index_dim} vectors",
        ratio_effect(er["index"], er["torch"], bar=1.0 / cfg.target_exact_slowdown,
                     unit="alternating runs"),
        metric="queries/s ratio index / torch",
        direction=">",
    )  # fmt: skip
    if idx["verified"] is None:
        rep.sanity(
            f"HNSW or IVF reaches recall@{cfg.index_k} >= {cfg.target_ann_recall:g} on the "
            f"trained item vectors ({idx['n_trained']:,} items) at some swept setting",
            passed=False,
            evidence="no setting of the sweep reached the recall",
        )
        return
    recall, t_ann, t_ex = idx["verified"]
    note = f"chosen on half of the users: {best[0]} {best[2].label}; measured on the other half"
    rep.finding(
        f"The chosen HNSW / IVF setting keeps recall@{cfg.index_k} >= "
        f"{cfg.target_ann_recall:g} on held-out users (trained item vectors, "
        f"{idx['n_trained']:,} items)",
        one_sample_effect(recall, cfg.target_ann_recall, unit="users"),
        metric=f"recall@{cfg.index_k} against exact",
        direction=">",
        note=note,
    )
    rep.finding(
        f"... at >= {cfg.target_ann_speedup:g}x the exact queries/s",
        ratio_effect(t_ann, t_ex, bar=cfg.target_ann_speedup, unit="alternating runs"),
        metric="queries/s ratio approximate / exact",
        direction=">",
        note=note,
    )
