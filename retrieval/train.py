"""Training loop of the two-tower candidate generator.

``fit_two_tower`` trains a :class:`TwoTowerModel` on a log with any loss of
``retrieval.losses`` (full softmax, sampled softmax with any negatives and logQ variant, BCE,
BPR, gBCE, impression-aware BCE): progress bar, early stopping on validation recall@K,
configurable torch threads (one thread is steadier on a shared 2-core machine), a device and
bf16 autocast (``TrainConfig.device`` / ``precision``), atomic checkpoints with their config.

Data parallel under ``torchrun`` (``torch.distributed``; :func:`retrieval.distributed.init_from_env`
sets the group up: gloo on CPUs, nccl on GPUs): each process reads its shard of the log (the
users with ``user % world == rank``), steps ``batch_size`` examples of it (a global batch of
``world x batch_size``), and the step runs through ``DistributedDataParallel``, which starts
every process from rank 0's weights and averages the gradients during backward. The item
frequency behind logQ counts every shard's positives (one all-reduce); cross-device negatives
come from the loss's ``cross_device`` option (:mod:`retrieval.distributed`). Example::

    torchrun --nproc_per_node 2 my_train.py   # my_train.py: init_from_env(), then fit_two_tower
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from retrieval.data import (
    EvalSet,
    EventSequences,
    causal_windows,
    impression_examples,
    next_item_examples,
    take_obs,
)
from retrieval.distributed import is_distributed
from retrieval.frequency import CountMinSketch, ExactItemFrequency
from retrieval.losses import RetrievalLossConfig, build_loss
from retrieval.model import TwoTowerModel
from retrieval.towers.item import IDItemTower
from simenv.checkpoint import check_weights
from simenv.checkpoint import load_checkpoint as load_checkpoint_file
from simenv.checkpoint import save_checkpoint as save_checkpoint_file
from simenv.clock import released
from simenv.device import autocast, check_device, check_precision, resolve_device, to_device
from simenv.log import ImpressionLog
from simenv.types import ItemCatalog, Obs, obs_users

__all__ = [
    "TrainConfig",
    "TrainResult",
    "fit_two_tower",
    "evaluate_recall",
    "save_checkpoint",
    "load_checkpoint",
    "LazyAdam",
]


@dataclass(frozen=True)
class TrainConfig:
    """How the generator is trained.

    Attributes:
        epochs: maximum passes over the training examples.
        batch_size: examples per step (per process under torch.distributed).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_clip: max gradient norm (None: no clipping).
        temperature_lr_scale: learning-rate multiplier of the learnable temperature's scalar
            ``s`` (one global scalar moves about ``lr`` per Adam step; a larger rate lets the
            temperature settle within a few epochs).
        history_length: L, events in each training observation.
        causal: train sequence towers (transformer, GRU) on all positions at once
            (``forward_sequence`` over windows) instead of one example per positive.
        patience: epochs without validation improvement before stopping (0: never stop early).
        eval_k: K of the validation recall@K used for early stopping.
        max_examples_per_epoch: cap on examples drawn per epoch (None: all).
        frequency: ``"exact"`` counts of the training positives or a streaming
            ``"sketch"`` (count-min, updated batch by batch) for logQ and popularity negatives.
        sketch_width: count-min width.
        sketch_depth: count-min depth.
        threads: ``torch.set_num_threads`` during training (None: leave as is).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (see :mod:`simenv.device`):
            the model is moved there and stays there; each batch moves there in one place;
            sampled negatives come from a generator on that device.
        precision: ``"fp32"`` or ``"bf16"`` (bfloat16 autocast of the towers and the loss's
            matmuls; weights and optimiser state stay float32).
        sparse_embeddings: give the ID item towers' tables sparse gradients for the run
            (``nn.Embedding.sparse``, restored afterwards), as ``ItemTowerConfig(sparse=True)``
            does for good. Every sparse table is stepped by :class:`LazyAdam` (lazy
            Adam, SparseAdam's update: only the rows in the batch move, and their moments are
            updated only then), the dense parameters by fused AdamW. Needs
            ``weight_decay == 0`` (lazy Adam has none) and a single process. It pays on large
            catalogs, where dense AdamW walks the whole table every step (``python -m
            benchmarks perf`` measures both side by side, with the test recall of each on the
            default world). Off by default: lazy Adam is a different optimiser.
        seed: seed of initial shuffles and sampled negatives.
        progress: show a tqdm bar.
        checkpoint_dir: write ``best.pt`` there (atomically) when validation improves.
    """

    epochs: int = 10
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 5.0
    temperature_lr_scale: float = 10.0
    history_length: int = 32
    causal: bool = False
    patience: int = 2
    eval_k: int = 100
    max_examples_per_epoch: int | None = None
    frequency: str = "exact"
    sketch_width: int = 4096
    sketch_depth: int = 4
    threads: int | None = None
    device: str = "cpu"
    precision: str = "fp32"
    sparse_embeddings: bool = False
    seed: int = 0
    progress: bool = True
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        check_device("device", self.device)
        check_precision("precision", self.precision)
        for name in (
            "epochs",
            "batch_size",
            "history_length",
            "eval_k",
            "sketch_width",
            "sketch_depth",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if (
            isinstance(self.patience, bool)
            or not isinstance(self.patience, int)
            or self.patience < 0
        ):
            raise ValueError(f"patience must be an integer >= 0, got {self.patience!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not (
            math.isfinite(self.grad_clip) and self.grad_clip > 0
        ):
            raise ValueError(f"grad_clip must be None or > 0, got {self.grad_clip!r}")
        if self.frequency not in ("exact", "sketch"):
            raise ValueError(f"frequency must be 'exact' or 'sketch', got {self.frequency!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be None or an integer >= 1, got {self.threads!r}")
        if not isinstance(self.sparse_embeddings, bool):
            raise ValueError(f"sparse_embeddings must be a bool, got {self.sparse_embeddings!r}")
        if self.sparse_embeddings and self.weight_decay > 0:
            raise ValueError(
                f"weight_decay must be 0 with sparse_embeddings=True (SparseAdam has no weight "
                f"decay), got {self.weight_decay!r}"
            )
        if self.max_examples_per_epoch is not None and self.max_examples_per_epoch < 1:
            raise ValueError(
                f"max_examples_per_epoch must be None or >= 1, got {self.max_examples_per_epoch}"
            )


@dataclass
class TrainResult:
    """What training did.

    Attributes:
        history: one dict per epoch: epoch, loss, valid_recall (None without validation),
            tau, examples, seconds, examples_per_s.
        best_epoch: epoch of the best validation recall (the weights kept), or the last epoch.
        best_recall: its validation recall@K (None without validation).
        tau_trajectory: temperature after every logged step (learnable temperature).
        frequency: item frequency used for logQ / popularity (counts of training positives).
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_recall: float | None = None
    tau_trajectory: list[float] = field(default_factory=list)
    frequency: Any = None

    @property
    def examples_per_s(self) -> float:
        """Mean training throughput over the epochs."""
        ex = sum(h["examples"] for h in self.history)
        s = sum(h["seconds"] for h in self.history)
        return ex / s if s > 0 else float("nan")


def to_torch_obs(obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Observation arrays as tensors (float for dt and context, int64 for the rest)."""
    out = {}
    for k, v in obs.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = t.float() if k in (Obs.DT, Obs.CONTEXT) else t.long()
    return out


@torch.no_grad()
def evaluate_recall(
    model: TwoTowerModel, ev: EvalSet, k: int, release_time: np.ndarray, batch: int = 1024
) -> float:
    """Mean recall@k of the model over ``ev`` (full catalog, unreleased items excluded).

    Recall = |top-k ∩ held-out positives| / min(|positives|, k), averaged over users.
    """
    if len(ev) == 0:
        return float("nan")
    was = model.training
    model.eval()
    sim = model.similarity
    device = _device_of(model)
    items = sim.prepare(model.all_item_vectors())  # (N, d)
    rel = torch.from_numpy(np.asarray(release_time, dtype=np.float64)).to(device)
    total = 0.0
    for s in range(0, len(ev), batch):
        rows = np.arange(s, min(len(ev), s + batch))
        obs = to_device(to_torch_obs(take_obs(ev.obs, rows)), device)
        u = sim.prepare(model.user_vectors(obs))
        sc = u @ items.T  # (b, N)
        now = torch.from_numpy(ev.time[rows]).to(device)
        sc.masked_fill_(rel[None, :] > now[:, None], float("-inf"))
        top = torch.topk(sc, min(k, sc.shape[1]), dim=1).indices.cpu().numpy()
        pos = ev.positives[rows]
        hit = (top[:, :, None] == pos[:, None, :]) & (pos[:, None, :] >= 0)
        n_pos = (pos >= 0).sum(axis=1)
        total += float((hit.any(axis=1).sum(axis=1) / np.minimum(n_pos, k)).sum())
    model.train(was)
    return total / len(ev)


CHECKPOINT_FORMAT = "retrieval.TwoTowerModel"


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
    catalog: ItemCatalog | None = None,
) -> Path:
    """Write the model's weights and config atomically, in the project's checkpoint format.

    One format for every model (:mod:`simenv.checkpoint`, here ``"retrieval.TwoTowerModel"``):
    read back by :func:`load_checkpoint` with ``torch.load(weights_only=True)``.

    Args:
        model: the model (its ``config``, a dataclass, is stored as plain data).
        path: the file.
        extra: plain data stored beside (epoch, metrics).
        catalog: the catalog the model was built for (its fingerprint is stored and checked
            on load), or None.
    """
    cfg = getattr(model, "config", None)
    config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None
    return save_checkpoint_file(
        path, CHECKPOINT_FORMAT, model.state_dict(), config, catalog=catalog, extra=extra
    )


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], catalog: ItemCatalog | None = None
) -> dict[str, Any]:
    """Load a checkpoint of :func:`save_checkpoint` into ``model``; returns its payload.

    The file is read with ``torch.load(weights_only=True)`` (no code runs from it); its format,
    version and (with ``catalog``) catalog are checked, and the weights are copied to the
    model's device.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable or foreign file, another version or catalog, or weights that do
            not fit ``model``.
    """
    payload = load_checkpoint_file(path, CHECKPOINT_FORMAT, catalog)
    try:  # names, dtypes, shapes and finiteness of every weight, before any is copied
        check_weights(path, model.state_dict(), payload["state_dict"])
    except ValueError as e:
        raise ValueError(f"{e} (the checkpoint does not fit this model)") from e
    model.load_state_dict(payload["state_dict"])
    return payload


def fit_two_tower(
    model: TwoTowerModel,
    loss_config: RetrievalLossConfig,
    train_log: ImpressionLog,
    sequences: EventSequences,
    config: TrainConfig | None = None,
    valid: EvalSet | None = None,
    release_time: np.ndarray | None = None,
    extra: Callable[[TwoTowerModel, np.random.Generator, torch.Generator], torch.Tensor]
    | None = None,
    extra_weight: float = 0.0,
    valid_score: Callable[[TwoTowerModel], float] | None = None,
    batch_groups: np.ndarray | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_log`` with the loss ``loss_config`` names.

    With ``extra`` (e.g. distillation toward a ranker), every step minimises
    ``(1 - extra_weight) * L_true + extra_weight * L_extra`` where ``L_extra = extra(model,
    rng, generator)`` draws its own batch; with ``extra_weight = 1`` the true loss is skipped.

    Args:
        model: the two towers and similarity (trained in place; the best validation weights
            are restored at the end).
        loss_config: which loss, which negatives, which logQ variant.
        train_log: impressions of the training period.
        sequences: engagement events of every period up to the training end (histories).
        config: training config.
        valid: held-out queries for early stopping (recall@``eval_k``).
        release_time: (N,) item release times (required with ``valid``); when given, sampled
            negatives come only from items released by the end of ``train_log`` (the catalog
            the model could have known), never from later releases.
        extra: an additional objective evaluated every step (see above).
        extra_weight: its weight lambda in ``[0, 1]``.
        valid_score: with ``valid``, the early-stopping score of the model after each epoch
            (higher is better, e.g. NDCG@10 with seen items excluded), used instead of
            recall@``eval_k`` on ``valid``; logged as ``valid_recall``.
        batch_groups: int ``(n_users,)`` a group label per user id: every batch then holds
            examples of users of one group only (group-homogeneous batches, so in-batch
            negatives come from the batch's own group, e.g. to show folding). Each epoch
            shuffles the examples within each group, cuts every group into full batches
            (a group's last partial batch is left out of that epoch) and shuffles the
            batches; the optimiser, the item frequencies and everything else are as
            without it. None: batches are cut from one permutation of all examples.

    Returns:
        A :class:`TrainResult`.
    """
    cfg = TrainConfig() if config is None else config
    if batch_groups is not None:
        batch_groups = np.asarray(batch_groups)
        if batch_groups.ndim != 1 or not np.issubdtype(batch_groups.dtype, np.integer):
            raise ValueError(
                f"batch_groups must be a 1-D integer array (a group per user id), got "
                f"{batch_groups.dtype} {batch_groups.shape}"
            )
    if valid is not None and release_time is None:
        raise ValueError("release_time is required when valid is given")
    if not 0.0 <= extra_weight <= 1.0:
        raise ValueError(f"extra_weight must be in [0, 1], got {extra_weight}")
    if extra_weight > 0 and extra is None:
        raise ValueError("extra_weight > 0 needs an extra objective")
    n_items = model.n_items
    device = resolve_device(cfg.device)
    model.to(device)
    old_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    made_sparse = []  # ID tables switched to sparse gradients for this run only
    if cfg.sparse_embeddings:
        for m in model.modules():
            if isinstance(m, IDItemTower) and not m.embedding.sparse:
                m.embedding.sparse = True
                made_sparse.append(m.embedding)
    try:
        return _fit(
            model,
            loss_config,
            train_log,
            sequences,
            cfg,
            valid,
            release_time,
            n_items,
            extra,
            extra_weight,
            valid_score,
            batch_groups,
            device,
        )
    finally:
        for emb in made_sparse:
            emb.sparse = False
        if cfg.threads is not None:
            torch.set_num_threads(old_threads)


def _fit(
    model: TwoTowerModel,
    loss_config: RetrievalLossConfig,
    train_log: ImpressionLog,
    sequences: EventSequences,
    cfg: TrainConfig,
    valid: EvalSet | None,
    release_time: np.ndarray | None,
    n_items: int,
    extra: Callable[[TwoTowerModel, np.random.Generator, torch.Generator], torch.Tensor]
    | None = None,
    extra_weight: float = 0.0,
    valid_score: Callable[[TwoTowerModel], float] | None = None,
    batch_groups: np.ndarray | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    device = torch.device("cpu") if device is None else device
    rank, world = (
        (torch.distributed.get_rank(), torch.distributed.get_world_size())
        if is_distributed()
        else (0, 1)
    )
    impression = loss_config.kind == "impression_bce"
    causal = cfg.causal and not impression
    if causal and not hasattr(model.user_tower, "forward_sequence"):
        raise ValueError("causal=True needs a sequence user tower (transformer or GRU)")
    L = cfg.history_length
    if world > 1 and len(train_log) and not causal:
        # each process reads its shard of the log: the users with user % world == rank
        mine = np.nonzero(train_log["user"] % world == rank)[0]
        train_log = train_log.select(mine)
    # ---- examples
    if impression:
        data = impression_examples(train_log, sequences, L)
        targets_for_freq = data.items[data.labels > 0]
    elif causal:
        train_end = float(train_log["time"].max()) if len(train_log) else -np.inf
        data = causal_windows(sequences, L, event_mask=sequences.times <= train_end)
        if world > 1:  # this process's shard: the windows of users with user % world == rank
            data = _subset(data, np.nonzero(data.user % world == rank)[0])
        targets_for_freq = data.targets[data.targets >= 0]
    else:
        data = next_item_examples(train_log, sequences, L)
        targets_for_freq = data.target
    n_ex = len(data)
    if world > 1:  # every process needs examples; the epoch length is the smallest shard's
        counts = torch.tensor([n_ex], dtype=torch.int64, device=_collective_device(device))
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MIN)
        n_min = int(counts.item())
        if n_min == 0:
            raise ValueError(
                f"a process has no training examples in its shard of train_log ({world} "
                "processes, users split by user % world): use fewer processes"
            )
    if n_ex == 0:
        raise ValueError("no training examples in train_log (no positives?)")
    example_group = None
    if batch_groups is not None and world > 1:
        raise ValueError(
            "batch_groups is not supported under torch.distributed (processes would step "
            "different numbers of group batches)"
        )
    if batch_groups is not None:
        ex_user = obs_users(data.obs)  # (n_ex,)
        if ex_user.size and ex_user.max() >= batch_groups.size:
            raise ValueError(
                f"batch_groups has {batch_groups.size} entries but the log has user id "
                f"{int(ex_user.max())}"
            )
        example_group = batch_groups[ex_user]  # (n_ex,) group of each example's user
    # ---- item frequency of the positives (logQ, popularity negatives)
    if cfg.frequency == "exact":
        counts_np = np.bincount(np.asarray(targets_for_freq, np.int64), minlength=n_items)
        if world > 1:  # Q of the whole log: every shard's positives
            ct = torch.from_numpy(counts_np).to(_collective_device(device))
            torch.distributed.all_reduce(ct)
            counts_np = ct.cpu().numpy()
        freq = ExactItemFrequency.from_counts(counts_np)
    else:
        freq = CountMinSketch(cfg.sketch_width, cfg.sketch_depth, seed=cfg.seed)
    user_pos = None if impression else sequences.positives_matrix(data.user, width=32)
    loss_fn = build_loss(loss_config, n_items, model.similarity)
    if release_time is not None and hasattr(loss_fn, "set_sample_pool") and len(train_log):
        train_end = float(train_log["time"].max())
        loss_fn.set_sample_pool(np.nonzero(released(np.asarray(release_time), train_end))[0])
    params = [p for p in model.parameters() if p.requires_grad]
    temp = {id(p) for p in model.similarity.parameters()}
    # Tables with sparse gradients go to SparseAdam (AdamW rejects sparse gradients).
    sparse = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad
    }
    if sparse and world > 1:
        raise ValueError("sparse embedding gradients are not supported under torch.distributed")
    if sparse and cfg.weight_decay > 0:
        raise ValueError(
            f"weight_decay must be 0 with sparse embedding tables (SparseAdam has no weight "
            f"decay), got {cfg.weight_decay!r}"
        )
    groups = [{"params": [p for p in params if id(p) not in temp and id(p) not in sparse]}]
    if temp:
        groups.append(
            {
                "params": [p for p in params if id(p) in temp],
                "lr": cfg.lr * cfg.temperature_lr_scale,
                "weight_decay": 0.0,
            }
        )
    groups = [g for g in groups if g["params"]]
    opts: list[torch.optim.Optimizer] = []
    if groups:
        # fused: one kernel per parameter for the whole update (the foreach form makes about
        # ten passes over every tensor; measured 8.7 ms against 45 ms per step for a
        # 100,000 x 64 table on one CPU thread)
        fused = all(p.dtype == torch.float32 for g in groups for p in g["params"])
        opts.append(
            torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        )
    if sparse:
        opts.append(LazyAdam([p for p in params if id(p) in sparse], lr=cfg.lr))
    step_module: nn.Module = _TrainStep(model)
    if world > 1:
        # DistributedDataParallel: starts every process from rank 0's weights and averages
        # the gradients over processes during backward (bucketed all-reduce, gloo on the CPU,
        # nccl on GPUs); cross-device negatives still travel through retrieval.distributed
        step_module = nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device.index or 0] if device.type == "cuda" else None,
            find_unused_parameters=True,  # towers may leave a parameter out of a batch
        )
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    result = TrainResult(frequency=freq)
    best_state = None
    best = -np.inf
    bad_epochs = 0
    # per process: its shard, batch_size examples per step (world x batch_size per global step)
    shard = n_min if world > 1 else n_ex
    cap = cfg.max_examples_per_epoch
    per_epoch = shard if cap is None else min(shard, max(1, cap // world))
    steps = max(1, per_epoch // cfg.batch_size)
    # one process keeps the stream it always had; processes of a group shuffle their own shards
    rng = np.random.default_rng(
        np.random.SeedSequence([cfg.seed, 7] + ([rank] if world > 1 else []))
    )
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = (
            rng.permutation(n_ex)
            if example_group is None
            else _grouped_order(rng, example_group, cfg.batch_size)
        )
        t0 = time.perf_counter()
        tot: float | torch.Tensor = 0.0
        seen = 0
        taus: list[torch.Tensor] = []
        bar = tqdm(
            range(steps), desc=f"epoch {epoch}", disable=not cfg.progress or rank != 0, leave=False
        )
        for step in bar:
            rows = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            if rows.size == 0:  # batch_groups (one process): fewer full batches than steps
                continue
            if cfg.frequency == "sketch":
                freq.update(_targets_of(data, rows, impression, causal))
            batch = None
            if extra_weight < 1.0:  # the one place where a batch moves to the device
                batch = to_device(_batch_tensors(data, rows, impression, causal, user_pos), device)

            def compute(m: TwoTowerModel, batch: dict[str, Any] | None = batch) -> torch.Tensor:
                if batch is None:
                    return extra(m, rng, gen)
                loss = _batch_loss(m, loss_fn, batch, impression, causal, gen, freq)
                if extra is not None and extra_weight > 0:
                    loss = (1.0 - extra_weight) * loss + extra_weight * extra(m, rng, gen)
                return loss

            with autocast(device, cfg.precision):
                loss = step_module(compute)  # through DDP under torch.distributed
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                if sparse:
                    _clip_grad_norm_sparse(params, cfg.grad_clip)
                else:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            for opt in opts:
                opt.step()
            # accumulated on the device: no host sync per step (a GPU keeps running ahead)
            tot = tot + loss.detach().float() * rows.size
            seen += rows.size
            if model.similarity.config.learnable_temperature:
                taus.append(model.similarity.tau.detach().float().reshape(()))
            if cfg.progress and rank == 0 and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.detach().item():.4f}")  # no float(loss): warns
        bar.close()
        if taus:
            result.tau_trajectory.extend(torch.stack(taus).cpu().tolist())
            taus.clear()
        if world > 1:  # the epoch's loss over every process's examples
            agg = torch.tensor([float(tot), float(seen)], dtype=torch.float64,
                               device=_collective_device(device))  # fmt: skip
            torch.distributed.all_reduce(agg)
            tot, seen_all = float(agg[0]), int(agg[1])
        else:
            tot, seen_all = float(tot), seen
        secs = time.perf_counter() - t0
        rec = None
        if valid is not None:
            rec = (
                float(valid_score(model))
                if valid_score is not None
                else evaluate_recall(model, valid, cfg.eval_k, release_time)
            )
        entry = {
            "epoch": epoch,
            "loss": tot / max(seen_all, 1),
            "valid_recall": rec,
            "tau": float(model.similarity.tau.detach()),
            "examples": seen_all,
            "seconds": secs,
            "examples_per_s": seen_all / secs if secs > 0 else float("nan"),
        }
        result.history.append(entry)
        if valid is None:
            result.best_epoch = epoch
            continue
        if rec is not None and rec > best:
            best, bad_epochs = rec, 0
            result.best_epoch, result.best_recall = epoch, rec
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if cfg.checkpoint_dir is not None and rank == 0:
                save_checkpoint(
                    model,
                    Path(cfg.checkpoint_dir) / "best.pt",
                    {"epoch": epoch, "valid_recall": rec},
                )
        else:
            bad_epochs += 1
            if cfg.patience and bad_epochs >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


class LazyAdam(torch.optim.Optimizer):
    """Lazy Adam for sparse gradients: ``torch.optim.SparseAdam``'s update, by row gathers.

    Only the rows present in the (coalesced) sparse gradient move, and only their moments are
    updated, with the step count of the parameter (SparseAdam's semantics)::

        m_r <- m_r + (1 - beta1) (g_r - m_r);   v_r <- beta2 v_r + (1 - beta2) g_r^2
        w_r <- w_r - lr sqrt(1 - beta2^t) / (1 - beta1^t) * m_r / (sqrt(v_r) + eps)

    SparseAdam adds sparse updates into the dense moment tables (several sparse-dense
    additions per step); this gathers the touched rows once, updates them in place and
    writes them back (``index_select`` / ``index_copy_`` / ``index_add_``): measured 19 ms
    against 36 ms per step for 38,000 looked-up rows of a 100,000 x 64 table on one CPU
    thread. The same function up to float32 rounding (tested against SparseAdam).

    Args:
        params: parameters whose gradients are sparse (dense gradients are accepted too and
            update every row).
        lr: learning rate.
        betas: ``(beta1, beta2)``.
        eps: added to ``sqrt(v)``.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if not (lr > 0 and eps > 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"need lr > 0, eps > 0, betas in [0, 1), got {lr}, {eps}, {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                g = p.grad
                if g.is_sparse:
                    g = g.coalesce()  # unique rows (a no-op after the sparse clip)
                    rows, gv = g._indices()[0], g._values()  # (R,), (R, d)
                else:
                    rows, gv = torch.arange(p.shape[0], device=p.device), g
                m = st["exp_avg"].index_select(0, rows).lerp_(gv, 1.0 - b1)  # (R, d)
                v = st["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(gv, gv, value=1 - b2)
                st["exp_avg"].index_copy_(0, rows, m)
                st["exp_avg_sq"].index_copy_(0, rows, v)
                step_size = group["lr"] * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
                p.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])), alpha=-step_size)
        return loss


class _TrainStep(nn.Module):
    """The model behind one callable, so that DistributedDataParallel sees every forward.

    ``forward(compute)`` returns ``compute(model)``: the batch's loss, with any extra
    objective, computed through the towers (DDP hooks the parameters' gradients and needs
    the forward to go through its own ``__call__``).
    """

    def __init__(self, model: TwoTowerModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, compute: Callable[[TwoTowerModel], torch.Tensor]) -> torch.Tensor:
        return compute(self.model)


def _collective_device(device: torch.device) -> torch.device:
    """Where small collective tensors live: the GPU under nccl, else the CPU (gloo)."""
    if torch.distributed.get_backend() == "nccl":
        return device if device.type == "cuda" else torch.device("cuda")
    return torch.device("cpu")


def _subset(data: Any, rows: np.ndarray) -> Any:
    """The rows ``rows`` of an examples dataclass (obs dicts and per-row arrays)."""
    n = len(data)
    kw = {}
    for f in dataclasses.fields(data):
        v = getattr(data, f.name)
        if isinstance(v, dict):
            kw[f.name] = take_obs(v, rows)
        elif isinstance(v, np.ndarray) and v.shape[:1] == (n,):
            kw[f.name] = v[rows]
    return dataclasses.replace(data, **kw)


def _grouped_order(rng: np.random.Generator, group: np.ndarray, batch: int) -> np.ndarray:
    """An epoch's example order whose consecutive runs of ``batch`` share one group.

    Examples are shuffled, sorted by group (stable: random within a group), cut into full
    batches per group (each group's remainder is dropped for this epoch), and the batches
    are shuffled.
    """
    perm = rng.permutation(group.size)
    perm = perm[np.argsort(group[perm], kind="stable")]  # grouped, random within a group
    g = group[perm]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])  # first example of each group
    sizes = np.diff(np.r_[starts, g.size])
    full = sizes // batch  # full batches per group
    if full.sum() == 0:
        return perm[:0]
    first = np.repeat(starts, full) + batch * (
        np.arange(full.sum()) - np.repeat(np.cumsum(full) - full, full)
    )  # (n_batches,) start of each full batch
    first = first[rng.permutation(first.size)]
    return perm[(first[:, None] + np.arange(batch)[None, :]).ravel()]


@torch.no_grad()
def _clip_grad_norm_sparse(params: list[nn.Parameter], max_norm: float) -> None:
    """``clip_grad_norm_`` (2-norm over all gradients) that also accepts sparse gradients.

    Sparse gradients are coalesced first (a table looked up twice holds duplicate rows, and
    the norm is that of the summed rows); torch's own function rejects sparse tensors.
    """
    sq = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            sq.append(p.grad._values().pow(2).sum())
        else:
            sq.append(p.grad.pow(2).sum())
    if not sq:
        return
    total = torch.stack(sq).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad._values().mul_(coef)
        else:
            p.grad.mul_(coef)


def _targets_of(data: Any, rows: np.ndarray, impression: bool, causal: bool) -> np.ndarray:
    if impression:
        return data.items[rows][data.labels[rows] > 0]
    if causal:
        t = data.targets[rows]
        return t[t >= 0]
    return data.target[rows]


def _batch_tensors(
    data: Any,
    rows: np.ndarray,
    impression: bool,
    causal: bool,
    user_pos: np.ndarray | None,
) -> dict[str, Any]:
    """One training batch as CPU tensors (numpy in, torch out; moved to the device by the caller)."""
    out: dict[str, Any] = {"obs": to_torch_obs(take_obs(data.obs, rows))}
    if impression:
        out["items"] = torch.from_numpy(data.items[rows])  # (R, k)
        out["labels"] = torch.from_numpy(data.labels[rows])  # (R, k)
        return out
    if causal:
        out["targets"] = torch.from_numpy(data.targets[rows])  # (W, L)
    else:
        out["target"] = torch.from_numpy(data.target[rows])  # (B,)
    if user_pos is not None:
        out["user_pos"] = torch.from_numpy(user_pos[rows])  # (B or W, P)
    return out


def _batch_loss(
    tower: TwoTowerModel,
    loss_fn: nn.Module,
    batch: dict[str, Any],
    impression: bool,
    causal: bool,
    gen: torch.Generator,
    freq: Any,
) -> torch.Tensor:
    """The loss of one batch of :func:`_batch_tensors` (already on the model's device)."""
    obs = batch["obs"]
    if impression:
        items, labels = batch["items"], batch["labels"]  # (R, k)
        u = tower.user_vectors(obs)  # (R, d)
        k = items.shape[1]
        iv = tower.item_vectors(items.reshape(-1))  # (R*k, d)
        uu = u.repeat_interleave(k, dim=0)  # (R*k, d)
        return loss_fn(uu, iv, labels.reshape(-1))
    upos = batch.get("user_pos")
    if causal:
        seq = tower.user_tower.forward_sequence(obs)  # (W, L, d)
        tgt = batch["targets"]  # (W, L)
        sel = tgt >= 0
        u = seq[sel]  # (M, d)
        pos = tgt[sel]
        if upos is not None:
            upos = upos.repeat_interleave(sel.sum(dim=1), dim=0)  # (M, P)
    else:
        u = tower.user_vectors(obs)  # (B, d)
        pos = batch["target"]
    pv = tower.item_vectors(pos)
    return loss_fn(
        u,
        pos,
        pv,
        encode_items=tower.item_tower,
        generator=gen,
        frequency=freq,
        user_positive_ids=upos,
    )
