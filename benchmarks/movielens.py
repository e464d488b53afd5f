"""movielens: sequential retrieval on real data (MovieLens-100K), loss against loss.

The question: does the published relationship between losses for SASRec hold with this
project's transformer user tower? Klenitskiy & Vasilev (2023) report on MovieLens-1M
NDCG@10 = 0.1821 for SASRec trained with cross-entropy over the whole catalog against
0.1341 with the original SASRec loss (binary cross-entropy with one negative per target).

Protocol (the standard one of sequential recommendation): leave-one-out by time per user
(the last interaction is the test target, the one before it the validation target, the rest
is training), the query is the user's history before the target, the ranking covers the full
catalog with the user's earlier movies removed (no sampled metrics), HR@10 and NDCG@10,
mean ± std over seeds; findings are paired over the test users (every variant ranks for the
same users), seeds combined by a t interval over the per-seed effects. Every variant gets the same budget: the same epochs over every
training interaction as a target, the same early stopping (validation NDCG@10 on the same
protocol, seen movies excluded, with the same patience), the same model size and learning
rate.

Variants (``--set variants=sasrec-ce,mean-ce`` runs a subset):

- ``sasrec-ce``: the transformer user tower (causal, last-token pooling, ID item tower, dot
  product) trained on all positions at once with the full softmax (cross-entropy);
- ``sasrec-sampled``: the same with a sampled softmax over in-batch + uniform negatives and
  the logQ correction (L_logQ3);
- ``sasrec-bce1``: binary cross-entropy with one uniformly drawn negative per target
  position (SASRec's original loss);
- ``sasrec-bpr1``: BPR with one negative per target position;
- ``mean-ce``: mean pooling of the history (YoutubeDNN) with the full softmax, trained on one
  example per training interaction (its history before it), with batches holding about as
  many targets as the transformer's.

The data is never shipped (its licence forbids redistribution): by default the copy in the
``recbole`` wheel is downloaded once with pip into ``.cache/movielens``; without network
the experiment stops with a message that says how to provide the files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from benchmarks.common import chosen_variants
from benchmarks.paired import PerUser
from benchmarks.registry import ExperimentConfig, experiment, param
from benchmarks.runner import RunContext
from retrieval.data import CausalWindows, causal_windows, next_item_examples, take_obs
from retrieval.datasets import (
    InteractionDataset,
    LeaveOneOut,
    full_catalog_top_k,
    leave_one_out,
    load_movielens_100k,
    next_item_metrics,
)
from retrieval.losses import (
    NegativeSamplerConfig,
    RetrievalLossConfig,
    bce_sampled_loss,
    bpr_loss,
)
from retrieval.metrics import hit_rate_at_k, mean_over_users, ndcg_at_k
from retrieval.model import TwoTowerConfig, TwoTowerModel
from retrieval.similarity import SimilarityConfig
from retrieval.towers import ItemTowerConfig, UserTowerConfig
from retrieval.train import TrainConfig, fit_two_tower, to_torch_obs
from simenv.log import ImpressionLog
from simenv.types import Columns, ItemCatalog

VARIANTS: dict[str, str] = {
    "sasrec-ce": "SASRec + cross-entropy (full softmax)",
    "sasrec-sampled": "SASRec + sampled softmax (in-batch + uniform, logQ)",
    "sasrec-bce1": "SASRec + BCE, 1 negative per target",
    "sasrec-bpr1": "SASRec + BPR, 1 negative per target",
    "mean-ce": "mean pooling + cross-entropy (full softmax)",
}
#: Klenitskiy & Vasilev 2023, MovieLens-1M, NDCG@10 (full ranking).
PUBLISHED_ML1M = {"sasrec-ce": 0.1821, "sasrec-bce1": 0.1341}


@dataclass(frozen=True)
class MovieLensConfig(ExperimentConfig):
    """Losses and user towers for next-item retrieval on MovieLens-100K (leave-one-out)."""

    data_path: str = param(
        "",
        "MovieLens-100K: a folder with u.data + u.item or ml-100k.inter + ml-100k.item, a "
        "file, or a zip; empty: the copy in the recbole wheel (pip download into the cache)",
    )
    cache_dir: str = param(
        "",
        "folder of the downloaded wheel (empty: $SIMENV_CACHE_DIR/movielens or .cache/movielens)",
    )
    check_size: bool = param(
        True, "require the complete MovieLens-100K (off: a subset or your own file, same format)"
    )
    download_timeout_s: float = param(120.0, "give up the pip download after this many seconds")
    like_threshold: float | None = param(
        4.0, "ratings >= this are LIKE events, lower ones CLICK (none: all CLICK); all are targets"
    )
    max_users: int | None = param(
        None, "train and evaluate on a fixed seeded subset of this many users (none: all 943)"
    )
    history_length: int = param(50, "L: events per training window and per query")
    dim: int = param(64, "embedding dimension of items and users")
    n_layers: int = param(2, "transformer blocks")
    n_heads: int = param(1, "attention heads")
    dropout: float = param(0.2, "dropout of the transformer, in [0, 1)")
    event_types: bool = param(
        True, "the transformer reads each event's type (LIKE for a rating >= 4, else CLICK)"
    )
    epochs: int = param(60, "maximum epochs (passes over every training interaction)")
    patience: int = param(
        10, "epochs without a better validation NDCG@k before stopping (0: never)"
    )
    batch_size: int = param(
        32, "windows of L events per step (the mean-pooling tower gets batch_size * L examples)"
    )
    lr: float = param(2e-3, "learning rate (AdamW)")
    uniform_negatives: int = param(256, "uniform negatives per batch of the sampled softmax")
    k: int = param(10, "cut-off of HR@k and NDCG@k")
    variants: tuple[str, ...] = param(
        (), f"run only these variants (empty: all): {', '.join(VARIANTS)}"
    )

    def __post_init__(self) -> None:
        for name in ("history_length", "dim", "n_layers", "n_heads", "epochs", "batch_size", "k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("patience", "uniform_negatives"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.max_users is not None and (
            isinstance(self.max_users, bool)
            or not isinstance(self.max_users, int)
            or self.max_users < 2
        ):
            raise ValueError(f"max_users must be None or an integer >= 2, got {self.max_users!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.download_timeout_s > 0:
            raise ValueError(f"download_timeout_s must be > 0, got {self.download_timeout_s}")
        if self.like_threshold is not None and not np.isfinite(self.like_threshold):
            raise ValueError(f"like_threshold must be finite or None, got {self.like_threshold}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        chosen_variants(self.variants, list(VARIANTS))  # names must exist
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be distinct, got {self.variants}")

    @classmethod
    def quick(cls) -> MovieLensConfig:
        return replace(cls(), max_users=400, epochs=6, patience=0, n_layers=1)


# --------------------------------------------------------------------------- data


def _subset_users(ds: InteractionDataset, max_users: int | None) -> ImpressionLog:
    """The log of a fixed seeded subset of users (the same for every seed), or all of it."""
    if max_users is None or max_users >= ds.n_users:
        return ds.log
    keep = np.random.default_rng(np.random.SeedSequence([20230, 100])).choice(
        ds.n_users, size=max_users, replace=False
    )
    return ds.log.select(np.isin(ds.log[Columns.USER], keep))


# --------------------------------------------------------------------------- models, losses


def _model_config(cfg: MovieLensConfig, variant: str, seed: int) -> TwoTowerConfig:
    if variant.startswith("mean"):
        user = UserTowerConfig(kind="mean", seed=seed)
    else:
        user = UserTowerConfig(
            kind="transformer",
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            max_len=cfg.history_length,
            causal=True,
            pooling="last",
            use_event_type=cfg.event_types,
            use_context=False,  # SASRec has no time features; windows share one "now"
            dropout=cfg.dropout,
            seed=seed,
        )
    return TwoTowerConfig(
        item=ItemTowerConfig(kind="id", dim=cfg.dim, seed=seed),
        user=user,
        similarity=SimilarityConfig(kind="dot", temperature=1.0),
    )


def _loss_config(cfg: MovieLensConfig, variant: str) -> RetrievalLossConfig:
    if variant == "sasrec-sampled":
        return RetrievalLossConfig(
            kind="sampled_softmax",
            negatives=NegativeSamplerConfig(
                in_batch=True, uniform=cfg.uniform_negatives, logq="negatives_only"
            ),
        )
    return RetrievalLossConfig(kind="full_softmax")  # also the (unused) base of bce1 / bpr1


class OneNegativeObjective:
    """SASRec's original training objective: one uniformly drawn negative per target position.

    The library's sampled losses share one set of negatives across the rows of a batch; SASRec
    draws a negative for every (sequence, position) target, so each step pushes down as many
    items as it has targets. This objective runs inside :func:`retrieval.train.fit_two_tower`
    through its ``extra`` hook with ``extra_weight=1`` (the trainer then skips its own loss):
    it walks the same causal windows in its own seeded permutation, ``batch_size`` windows per
    step, so an epoch of the trainer is one pass over the windows.

    Per target ``t`` with user state ``u`` and negative ``n ~ U(catalog)``:
    ``bce``: ``-log sigma(f(u,t)) - log(1 - sigma(f(u,n)))`` (the lecture's pointwise loss);
    ``bpr``: ``-log sigma(f(u,t) - f(u,n))``. A negative equal to the target or to one of the
    user's last 32 training positives is masked (SASRec draws negatives outside the history).

    Args:
        windows: the training windows (``causal_windows`` of the training events).
        user_positives: int64 ``(W, P)`` recent positives of each window's user (-1 padding).
        kind: ``"bce"`` or ``"bpr"``.
        batch_size: windows per step.
        n_items: catalog size.
    """

    def __init__(
        self,
        windows: CausalWindows,
        user_positives: np.ndarray,
        kind: str,
        batch_size: int,
        n_items: int,
    ) -> None:
        if kind not in ("bce", "bpr"):
            raise ValueError(f"kind must be 'bce' or 'bpr', got {kind!r}")
        if user_positives.shape[0] != len(windows):
            raise ValueError(
                f"user_positives has {user_positives.shape[0]} rows, windows {len(windows)}"
            )
        self.windows, self.user_positives = windows, user_positives
        self.kind, self.batch_size, self.n_items = kind, int(batch_size), int(n_items)
        self._order = np.zeros(0, dtype=np.int64)
        self._at = 0

    def _rows(self, rng: np.random.Generator) -> np.ndarray:
        if self._at + self.batch_size > self._order.size:
            self._order = rng.permutation(len(self.windows))
            self._at = 0
        rows = self._order[self._at : self._at + self.batch_size]
        self._at += self.batch_size
        return rows

    def __call__(
        self, model: TwoTowerModel, rng: np.random.Generator, gen: torch.Generator
    ) -> torch.Tensor:
        """The loss of the next batch of windows."""
        rows = self._rows(rng)
        obs = to_torch_obs(take_obs(self.windows.obs, rows))
        seq = model.user_tower.forward_sequence(obs)  # (W, L, d)
        tgt = torch.from_numpy(self.windows.targets[rows])  # (W, L), -1 = no target
        sel = tgt >= 0
        u = seq[sel]  # (M, d) user state before each target
        pos = tgt[sel]  # (M,)
        neg = torch.randint(self.n_items, pos.shape, generator=gen)  # (M,) one per target
        sim = model.similarity
        q = sim.query(u)  # (M, d)
        pos_logit = (q * sim.prepare(model.item_vectors(pos))).sum(-1)  # (M,) f(u, t)
        neg_logit = (q * sim.prepare(model.item_vectors(neg))).sum(-1, keepdim=True)  # (M, 1)
        recent = torch.from_numpy(self.user_positives[rows]).repeat_interleave(
            sel.sum(dim=1), dim=0
        )  # (M, P)
        valid = ((neg != pos) & ~(recent == neg[:, None]).any(dim=1))[:, None]  # (M, 1)
        if self.kind == "bce":
            return bce_sampled_loss(pos_logit, neg_logit, valid)
        return bpr_loss(pos_logit, neg_logit, valid)


# --------------------------------------------------------------------------- one run


def _valid_ndcg(model: TwoTowerModel, loo: LeaveOneOut, k: int) -> float:
    """Early-stopping score: validation NDCG@k on the test protocol (seen movies excluded).

    The trainer's default score (recall@k without excluding seen items) would punish a
    model for ranking the user's own movies, which the protocol never counts.
    """
    return next_item_metrics(model, loo.valid_set, loo.valid_seen, k)[f"ndcg@{k}"]


def _train_and_evaluate(
    cfg: MovieLensConfig,
    variant: str,
    seed: int,
    loo: LeaveOneOut,
    catalog: ItemCatalog,
    n_targets: int,
    windows: CausalWindows,
    ctx: RunContext,
) -> tuple[dict[str, Any], list[float | None], dict[str, np.ndarray]]:
    causal = variant.startswith("sasrec")
    batch = cfg.batch_size if causal else cfg.batch_size * cfg.history_length
    tcfg = TrainConfig(
        epochs=cfg.epochs,
        batch_size=batch,
        lr=cfg.lr,
        history_length=cfg.history_length,
        causal=causal,
        patience=cfg.patience,
        eval_k=cfg.k,
        seed=seed,
        progress=False,
        threads=ctx.threads,
    )
    extra = None
    one_negative = {"sasrec-bce1": "bce", "sasrec-bpr1": "bpr"}
    if variant in one_negative:
        extra = OneNegativeObjective(
            windows,
            loo.seq_train.positives_matrix(windows.user, width=32),
            one_negative[variant],
            cfg.batch_size,
            catalog.n_items,
        )
    # dropout draws from torch's global RNG (torch has no generator for it): seed it for
    # this run only, and restore the caller's state afterwards
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed_int(seed, "dropout", variant))
        model = TwoTowerModel.build(_model_config(cfg, variant, seed), catalog)
        t0 = time.perf_counter()
        res = fit_two_tower(
            model, _loss_config(cfg, variant), loo.train, loo.seq_train, tcfg,
            valid=loo.valid_set, release_time=catalog.release_time,
            extra=extra, extra_weight=1.0 if extra is not None else 0.0,
            valid_score=lambda m: _valid_ndcg(m, loo, cfg.k),
        )  # fmt: skip
        wall = time.perf_counter() - t0
    top = full_catalog_top_k(model, loo.test_set, cfg.k, loo.test_seen)  # (B, k)
    per_user = {
        f"hr@{cfg.k}": hit_rate_at_k(top, loo.test_set.positives, cfg.k),
        f"ndcg@{cfg.k}": ndcg_at_k(top, loo.test_set.positives, cfg.k),
    }  # the same users, in the same order, for every variant
    test = {m: mean_over_users(v) for m, v in per_user.items()}
    valid = next_item_metrics(model, loo.valid_set, loo.valid_seen, cfg.k)
    secs = [h["seconds"] for h in res.history]
    epochs_run = len(res.history)
    row = {
        "world": "MovieLens-100K",
        "policy": "leave-one-out",
        "model": variant,
        "seed": seed,
        "wall_s": wall,
        f"hr@{cfg.k}": test[f"hr@{cfg.k}"],
        f"ndcg@{cfg.k}": test[f"ndcg@{cfg.k}"],
        f"valid_ndcg@{cfg.k}": valid[f"ndcg@{cfg.k}"],
        "best_epoch": res.best_epoch,
        "epochs_run": epochs_run,
        "s_per_epoch": float(np.mean(secs)),
        "targets_per_s": n_targets * epochs_run / max(sum(secs), 1e-9),
        "steps_per_epoch": res.history[0]["examples"] // batch if res.history else 0,
    }
    curve = [h["valid_recall"] for h in res.history]
    return row, curve, per_user


# --------------------------------------------------------------------------- the experiment


@experiment(
    "movielens",
    "Real data: MovieLens-100K, leave-one-out, full-catalog HR@10 / NDCG@10. SASRec-style "
    "transformer with cross-entropy, sampled softmax (in-batch + uniform, logQ), BCE with one "
    "negative (SASRec's loss) and BPR, and mean pooling, on the same budget; training time "
    "per epoch and examples/s.",
    MovieLensConfig,
)
def run(cfg: MovieLensConfig, ctx: RunContext) -> None:
    variants = chosen_variants(cfg.variants, list(VARIANTS))
    with ctx.timer("load"):
        ds = load_movielens_100k(
            cfg.data_path or None,
            cache_dir=cfg.cache_dir or None,
            like_threshold=cfg.like_threshold,
            check_size=cfg.check_size,
            timeout_s=cfg.download_timeout_s,
        )
        log = _subset_users(ds, cfg.max_users)
        loo = leave_one_out(log, ds.n_items, cfg.history_length)
        windows = causal_windows(loo.seq_train, cfg.history_length)
        n_targets = int((windows.targets >= 0).sum())
        n_examples = len(next_item_examples(loo.train, loo.seq_train, 1))
    summary = ds.summary()
    ctx.log(
        f"{summary['interactions']:,} ratings, {ds.n_users} users, {ds.n_items} items from "
        f"{ds.source}; {len(loo.test_set)} evaluated users, {n_targets:,} training targets"
    )
    like_rule = (
        "no threshold" if cfg.like_threshold is None else f"rating >= {cfg.like_threshold:g}"
    )
    ctx.report.section(
        "Data",
        f"MovieLens-100K from `{ds.source}` ({summary['interactions']:,} ratings, "
        f"{ds.n_users} users, {ds.n_items} movies; {summary['like_share']:.0%} of the ratings are "
        f"LIKE events ({like_rule}), the rest CLICK; every "
        "rating is a target). Users in this run: "
        f"{len(loo.test_set)} (all evaluated); training interactions: {len(loo.train):,} "
        f"({n_targets:,} next-item targets in {len(windows):,} windows of L={cfg.history_length}"
        f" for the transformer, {n_examples:,} examples for mean pooling). The data is read "
        "from the user's copy and never redistributed (GroupLens licence).",
    )
    rows: list[dict[str, Any]] = []
    users = PerUser()
    curves: dict[str, list[float | None]] = {}
    jobs = [(seed, v) for seed in ctx.seeds for v in variants]
    for seed, variant in ctx.progress(jobs, desc="train"):
        row, curve, per_user = _train_and_evaluate(
            cfg,
            variant,
            seed,
            loo,
            ds.catalog,
            n_targets if variant.startswith("sasrec") else n_examples,
            windows,
            ctx,
        )
        rows.append(row)
        users.add(variant, seed, per_user)
        if seed == ctx.seeds[0]:
            curves[variant] = curve
        ctx.log(
            f"seed {seed} {variant}: HR@{cfg.k} {row[f'hr@{cfg.k}']:.4f} NDCG@{cfg.k} "
            f"{row[f'ndcg@{cfg.k}']:.4f}, {row['epochs_run']} epochs, "
            f"{row['s_per_epoch']:.1f} s/epoch"
        )
    k = cfg.k
    metrics = [
        f"hr@{k}", f"ndcg@{k}", f"valid_ndcg@{k}", "best_epoch", "epochs_run",
        "s_per_epoch", "targets_per_s", "steps_per_epoch",
    ]  # fmt: skip
    fmt = {
        f"hr@{k}": ".4f",
        f"ndcg@{k}": ".4f",
        f"valid_ndcg@{k}": ".4f",
        "best_epoch": ".1f",
        "epochs_run": ".1f",
        "s_per_epoch": ".2f",
        "targets_per_s": ".0f",
        "steps_per_epoch": ".0f",
    }
    agg = ctx.report.seed_table(
        f"Test HR@{k} and NDCG@{k} (full catalog, seen movies excluded), training cost",
        rows,
        metrics,
        fmt=fmt,
        note=(
            "targets_per_s: next-item targets trained per second (every training interaction "
            "is one target per epoch); s_per_epoch: wall seconds of one epoch's training steps "
            "(validation not included) with "
            f"--threads {ctx.threads if ctx.threads is not None else 'default'}."
        ),
    )
    ctx.report.add_result("rows", rows)
    ctx.report.add_result("variants", {v: VARIANTS[v] for v in variants})
    ctx.report.add_result("data", summary)
    by = {r["model"]: r for r in agg}
    ref_rows = []
    for v in variants:
        ref_rows.append(
            {
                "model": v,
                "description": VARIANTS[v],
                f"ndcg@{k} here (ML-100K)": by[v][f"ndcg@{k}"],
                "NDCG@10 published (ML-1M)": PUBLISHED_ML1M.get(v),
            }
        )
    ctx.report.table(
        "Against the published numbers (Klenitskiy & Vasilev 2023, MovieLens-1M)",
        ref_rows,
        fmt=".4f",
        note="Different data (ML-100K here, ML-1M there) and budget: compare orderings, not values.",
    )
    _findings(ctx, users, k)
    if curves:
        fig = Figure(figsize=(6.4, 4.0))
        ax = fig.add_subplot()
        for v, c in curves.items():
            y = [np.nan if x is None else x for x in c]
            ax.plot(np.arange(1, len(y) + 1), y, marker="o", ms=3, label=v)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation NDCG@{k} (seen movies excluded)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        ctx.report.figure(
            "valid_curves",
            fig,
            f"Validation NDCG@{k} per epoch (seed {ctx.seeds[0]}), the early-stopping score: "
            "how fast each loss learns.",
            data={"curves": curves},
        )
    parts = [f"{v} {by[v][f'ndcg@{k}'].format('.4f')}" for v in variants]
    ctx.report.headline(f"NDCG@{k} on ML-100K: " + ", ".join(parts))


def _findings(ctx: RunContext, users: PerUser, k: int) -> None:
    m = f"ndcg@{k}"

    def compare(text: str, a: str, b: str) -> None:
        if users.has(a, b):
            ctx.report.finding(
                f"{text} by at least 2% (relative)",
                users.effect(a, b, m, relative=True),
                metric=f"NDCG@{k} per test user (full catalog, seen movies excluded)",
                min_effect=0.02,
            )

    compare(
        f"Cross-entropy beats BCE with one negative (NDCG@{k}), the ordering Klenitskiy & "
        "Vasilev report for SASRec on MovieLens-1M (0.1821 vs 0.1341),",
        "sasrec-ce",
        "sasrec-bce1",
    )
    compare(
        f"Sampled softmax (in-batch + uniform, logQ) beats BCE with one negative (NDCG@{k})",
        "sasrec-sampled",
        "sasrec-bce1",
    )
    compare(f"Cross-entropy beats BPR with one negative (NDCG@{k})", "sasrec-ce", "sasrec-bpr1")
    compare(
        f"The transformer beats mean pooling with the same loss and budget (NDCG@{k})",
        "sasrec-ce",
        "mean-ce",
    )
