"""dimension: the embedding size d against the world's true rank (the lecture's low-rank view).

The lecture: a two-tower model learns a low-rank factorisation ``R = V_U V_I^T`` of the
user-item relevance matrix; d is the information bottleneck, the rank of the approximation.
The simulator knows its own rank: preferences live in ``latent_dim`` dimensions, plus about
one per disjoint group and one for item appeal (``WorldConfig`` docstring). This experiment
sweeps d with the default recipe (ID item tower, mean-pooling user tower, cosine with a
learnable temperature, mixed negatives with logQ3) and plots recall@100 against d with the
true rank marked.

Findings (paired over the test users, seeds combined by a t interval over per-seed effects):
below the true rank d is the bottleneck (the smallest d's recall@100 is more than 10% below
the recall at the first d past the true rank: the ratio to 0.9 x that recall stays below 1);
past the true rank more dimensions add little (the largest d's recall@100 is at most 5% above
that d's: the ratio to 1.05 x that recall stays below 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from matplotlib.figure import Figure

from benchmarks.common import (
    OfflineTrainingConfig,
    default_two_tower,
    env_config,
    evaluate_per_user,
    mixed_negatives,
    train_two_tower,
    two_tower_generator,
    world_label,
)
from benchmarks.paired import PerUser
from benchmarks.registry import experiment, param
from benchmarks.runner import RunContext


@dataclass(frozen=True)
class DimensionConfig(OfflineTrainingConfig):
    """Embedding-dimension sweep of the default two-tower recipe."""

    dims: tuple[int, ...] = param((2, 4, 8, 16, 32, 64, 128), "embedding dimensions swept")
    similarity: str = param("cosine", "similarity: cosine (learnable temperature) or dot")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dims or any(isinstance(d, bool) or d < 1 for d in self.dims):
            raise ValueError(f"dims must be a non-empty tuple of integers >= 1, got {self.dims}")
        if len(set(self.dims)) != len(self.dims):
            raise ValueError(f"dims must be distinct, got {self.dims}")
        if self.similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity must be 'cosine' or 'dot', got {self.similarity!r}")
        if self.variants:
            raise ValueError(
                f"variants is not used by this experiment (set dims instead), got {self.variants}"
            )

    @classmethod
    def quick(cls) -> DimensionConfig:
        return replace(cls(), dims=(2, 4, 8, 16, 32, 64), epochs=5, batch_size=512)


def true_rank(latent_dim: int, n_groups: int) -> int:
    """The world's rank: latent preference dims + one per group + one for item appeal."""
    return latent_dim + n_groups + 1


@experiment(
    "dimension",
    "Embedding-dimension sweep against the simulator's true rank (latent_dim + groups + 1): "
    "recall@100 vs d with the true rank marked.",
    DimensionConfig,
)
def run(cfg: DimensionConfig, ctx: RunContext) -> None:
    dims = sorted(cfg.dims)
    sim = (
        {}
        if cfg.similarity == "cosine"
        else {"kind": "dot", "temperature": None, "learnable_temperature": False}
    )
    loss = mixed_negatives()
    rows = []
    users = PerUser()
    wcfg = env_config(ctx.quick).world
    rank = true_rank(wcfg.latent_dim, wcfg.n_groups)
    for seed in ctx.seeds:
        data = cfg.data(ctx.quick, seed)
        wl = world_label(env_config(ctx.quick), seed)
        for d in ctx.progress(dims, desc=f"seed {seed}"):
            name = f"d={d}"
            with ctx.timer("train") as t:
                model, res, _ = train_two_tower(
                    data, default_two_tower(d, **sim), loss, cfg.train_config(seed, ctx.threads)
                )
            with ctx.timer("evaluate"):
                m, per = evaluate_per_user(two_tower_generator(model, data, name), data)
            users.add(name, seed, per)
            rows.append(
                {"world": wl, "policy": data.label, "model": name, "seed": seed,
                 "wall_s": t.seconds, "d": d, "epochs": res.best_epoch,
                 "valid_recall@100": res.best_recall,
                 "tau": float(model.similarity.tau.detach()), **m}
            )  # fmt: skip
    metrics = [
        "recall@10",
        "recall@100",
        "ndcg@10",
        "valid_recall@100",
        "norm_leakage@100",
        "cross_group_auc",
        "coverage@100",
        "tau",
        "epochs",
    ]
    agg = ctx.report.seed_table(
        f"Offline metrics by embedding dimension (true rank {rank} = latent_dim "
        f"{wcfg.latent_dim} + {wcfg.n_groups} groups + 1)",
        rows,
        metrics,
        fmt={m: ".3f" for m in metrics} | {"tau": ".3g", "epochs": ".1f", "wall_s": ".1f"},
    )
    ctx.report.add_result("rows", rows)
    ctx.report.add_result(
        "true_rank", {"latent_dim": wcfg.latent_dim, "n_groups": wcfg.n_groups, "rank": rank}
    )
    by = {int(r["model"][2:]): r for r in agg}
    rec = np.array([by[d]["recall@100"].mean for d in dims])
    past = [d for d in dims if d >= rank]
    recall = "recall@100 per test user"
    if past and dims[0] < rank:
        d_at = past[0]
        ctx.report.finding(
            f"Below the true rank d is the bottleneck: recall@100 at d={dims[0]} is more than "
            f"10% below that at d={d_at}, the first d past the true rank {rank}",
            users.effect(
                f"d={dims[0]}", f"d={d_at}", "recall@100", relative=True, control_scale=0.9
            ),  # fmt: skip
            metric=f"{recall}: recall(d={dims[0]}) / (0.9 x recall(d={d_at})) - 1",
            direction="<",
        )
        if dims[-1] > d_at:
            ctx.report.finding(
                f"Past the true rank more dimensions add little: recall@100 at d={dims[-1]} is "
                f"at most 5% above that at d={d_at}",
                users.effect(
                    f"d={dims[-1]}", f"d={d_at}", "recall@100", relative=True, control_scale=1.05
                ),  # fmt: skip
                metric=f"{recall}: recall(d={dims[-1]}) / (1.05 x recall(d={d_at})) - 1",
                direction="<",
            )
    saturation = next(d for d, r in zip(dims, rec, strict=True) if r >= 0.95 * rec.max())
    ctx.report.add_result("saturation_d", saturation)
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot()
    for metric, style in (("recall@100", "o-"), ("recall@10", "s--")):
        ax.errorbar(
            dims,
            [by[d][metric].mean for d in dims],
            yerr=[by[d][metric].std or 0.0 for d in dims],
            fmt=style,
            label=metric,
        )
    ax.axvline(wcfg.latent_dim, color="grey", ls=":", label=f"latent_dim = {wcfg.latent_dim}")
    ax.axvline(rank, color="black", ls="--", label=f"true rank = {rank}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims)
    ax.set_xticklabels([str(d) for d in dims])
    ax.set_xlabel("embedding dimension d")
    ax.set_ylabel("recall on held-out users")
    ax.legend(fontsize=7)
    fig.tight_layout()
    ctx.report.figure(
        "recall_vs_dim",
        fig,
        "Recall against the embedding dimension, with the world's true rank marked.",
        data={
            "d": dims,
            "recall@100": rec.tolist(),
            "recall@10": [by[d]["recall@10"].mean for d in dims],
            "true_rank": rank,
        },
    )
    ctx.report.headline(
        f"recall@100 {rec[0]:.3f} at d={dims[0]} -> {rec.max():.3f} at best; 95% of the best "
        f"reached at d={saturation} (true rank {rank})"
    )
