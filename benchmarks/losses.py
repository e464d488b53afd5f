"""losses: what to train candidate generation on (the lecture's chapter 3).

Claims measured: softmax (full or sampled) beats BCE and BPR for candidate generation; logQ
correction removes the popularity penalty that in-batch negatives impose; keeping the
positive in the denominator (L_logQ3) matters compared with the derived estimator that
leaves it out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from matplotlib.figure import Figure

from benchmarks.common import (
    default_two_tower,
    env_config,
    evaluate_generator,
    offline_data,
    train_two_tower,
    two_tower_generator,
    world_label,
)
from benchmarks.registry import ExperimentConfig, experiment, param
from benchmarks.runner import RunContext
from retrieval.losses import NegativeSamplerConfig, RetrievalLossConfig
from retrieval.train import TrainConfig

# name -> (kind, negatives); every sampled source with each logQ variant, plus the others
_SOURCES = {
    "uniform": dict(in_batch=False, uniform=1024),
    "in-batch": dict(in_batch=True),
    "mixed": dict(in_batch=True, uniform=1024),
    "queue": dict(in_batch=True, memory_queue=4096),
}
_LOGQ = ("none", "derived", "positive_and_negatives", "negatives_only")
_LOGQ_SHORT = {
    "none": "no logQ",
    "derived": "logQ derived",
    "positive_and_negatives": "logQ2",
    "negatives_only": "logQ3",
}


def _recipes(quick: bool) -> dict[str, RetrievalLossConfig]:
    out: dict[str, RetrievalLossConfig] = {}
    out["impression BCE"] = RetrievalLossConfig(kind="impression_bce")
    out["BCE (mixed neg.)"] = RetrievalLossConfig(
        kind="bce", negatives=NegativeSamplerConfig(in_batch=True, uniform=1024, logq="none")
    )
    out["BPR (mixed neg.)"] = RetrievalLossConfig(
        kind="bpr", negatives=NegativeSamplerConfig(in_batch=True, uniform=1024, logq="none")
    )
    sources = ("in-batch", "mixed") if quick else tuple(_SOURCES)
    logqs = ("none", "derived", "negatives_only") if quick else _LOGQ
    for src in sources:
        for lq in logqs:
            out[f"softmax {src}, {_LOGQ_SHORT[lq]}"] = RetrievalLossConfig(
                kind="sampled_softmax", negatives=NegativeSamplerConfig(**_SOURCES[src], logq=lq)
            )
    if quick:
        out["softmax uniform, no logQ"] = RetrievalLossConfig(
            kind="sampled_softmax",
            negatives=NegativeSamplerConfig(**_SOURCES["uniform"], logq="none"),
        )
    out["full softmax"] = RetrievalLossConfig(kind="full_softmax")
    return out


@dataclass(frozen=True)
class LossesConfig(ExperimentConfig):
    """Loss comparison for the two-tower generator (ID item tower, mean-pooling user tower, cosine, learnable temperature)."""

    policy: str = param("popularity", "behaviour policy of the log")
    epsilon: float = param(0.05, "uniform exploration of the behaviour policy")
    episodes_per_user: float = param(3.0, "user episodes logged per user of the world")
    dim: int = param(64, "embedding dimension")
    epochs: int = param(12, "maximum training epochs (early stopping on validation recall@100)")
    batch_size: int = param(1024, "training batch size")
    lr: float = param(3e-3, "learning rate")

    @classmethod
    def quick(cls) -> LossesConfig:
        return replace(cls(), epochs=5, batch_size=512)


@experiment(
    "losses",
    "Impression-aware BCE, BCE, BPR, sampled softmax (uniform / in-batch / mixed / queue, each logQ variant), full softmax.",
    LossesConfig,
)
def run(cfg: LossesConfig, ctx: RunContext) -> None:
    recipes = _recipes(ctx.quick)
    rows = []
    for seed in ctx.seeds:
        data = offline_data(ctx.quick, seed, cfg.policy, cfg.epsilon, cfg.episodes_per_user)
        wl = world_label(env_config(ctx.quick), seed)
        tcfg = TrainConfig(
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=seed,
            progress=False,
            threads=ctx.threads,
        )
        for name, loss in ctx.progress(list(recipes.items()), desc=f"seed {seed}"):
            model, res, secs = train_two_tower(data, default_two_tower(cfg.dim), loss, tcfg)
            m = evaluate_generator(two_tower_generator(model, data, name), data)
            rows.append(
                {"world": wl, "policy": data.label, "model": name, "seed": seed, "wall_s": secs,
                 "epochs": res.best_epoch, "tau": float(model.similarity.tau.detach()), **m}
            )  # fmt: skip
    metrics = [
        "recall@10",
        "recall@100",
        "ndcg@10",
        "pop_bias@100",
        "coverage@100",
        "recall@100_tail",
        "recall@100_cold",
        "norm_leakage@100",
        "cross_group_auc",
        "tau",
        "epochs",
    ]
    agg = ctx.report.seed_table(
        "Offline metrics on held-out users (test period)", rows, metrics, fmt=".3f"
    )
    ctx.report.add_result("rows", rows)
    by = {r["model"]: r for r in agg}

    def get(name: str, metric: str = "recall@100") -> float:
        return by[name][metric].mean

    softmax_names = [n for n in by if "softmax" in n]
    best_softmax = max(softmax_names, key=get)
    ctx.report.claim_compare(
        "Softmax beats BCE for candidate generation (recall@100)",
        by[best_softmax]["recall@100"],
        ">",
        by["BCE (mixed neg.)"]["recall@100"],
        measured_name=best_softmax,
        reference_name="BCE",
    )
    ctx.report.claim_compare(
        "Softmax beats BPR for candidate generation (recall@100)",
        by[best_softmax]["recall@100"],
        ">",
        by["BPR (mixed neg.)"]["recall@100"],
        measured_name=best_softmax,
        reference_name="BPR",
    )
    ctx.report.claim_compare(
        "logQ removes the popularity penalty of in-batch negatives: popular items are retrieved more (mean log popularity@100)",
        by["softmax in-batch, logQ3"]["pop_bias@100"],
        ">",
        by["softmax in-batch, no logQ"]["pop_bias@100"],
        measured_name="in-batch + logQ3",
        reference_name="in-batch, no logQ",
    )
    ctx.report.claim_compare(
        "... and recall@100 improves with it",
        by["softmax in-batch, logQ3"]["recall@100"],
        ">",
        by["softmax in-batch, no logQ"]["recall@100"],
        measured_name="in-batch + logQ3",
        reference_name="in-batch, no logQ",
    )
    ctx.report.claim_compare(
        "Keeping the positive in the denominator matters: L_logQ3 beats the derived estimator (mixed negatives, recall@100)",
        by["softmax mixed, logQ3"]["recall@100"],
        ">",
        by["softmax mixed, logQ derived"]["recall@100"],
        measured_name="logQ3",
        reference_name="derived",
    )
    # plot recall@100 vs popularity bias
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for name, r in by.items():
        ax.errorbar(r["pop_bias@100"].mean, r["recall@100"].mean, yerr=r["recall@100"].std, fmt="o")
        ax.annotate(name, (r["pop_bias@100"].mean, r["recall@100"].mean), fontsize=6)
    ax.set_xlabel("popularity bias of the top-100 (mean log(1 + train count))")
    ax.set_ylabel("recall@100")
    fig.tight_layout()
    ctx.report.figure(
        "recall_vs_popularity",
        fig,
        "Recall@100 against the popularity of what each loss retrieves.",
    )
    best = max(by, key=get)
    ctx.report.headline(
        f"best recall@100: {best} {by[best]['recall@100'].format('.3f')}; "
        f"BCE {get('BCE (mixed neg.)'):.3f}, BPR {get('BPR (mixed neg.)'):.3f}, impression BCE {get('impression BCE'):.3f}"
    )
