"""losses: what to train candidate generation on (the lecture's chapter 3).

Findings: softmax (full or sampled; the best variant chosen on the validation period) beats
BCE and BPR for candidate generation; logQ correction removes the popularity penalty that
in-batch negatives impose; keeping the positive in the denominator (L_logQ3) matters compared
with the derived estimator that leaves it out. Each is a paired comparison over the test
users (the same users score both recipes), combined over seeds by a t interval over the
per-seed effects, with a minimum effect of +2% relative.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from matplotlib.figure import Figure

from benchmarks.common import (
    default_two_tower,
    env_config,
    evaluate_per_user,
    offline_data,
    train_two_tower,
    two_tower_generator,
    world_label,
)
from benchmarks.paired import PerUser, choose_on_validation
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
    # every logQ variant where Q is not uniform (in-batch, mixed); uniform negatives once (a
    # uniform Q shifts every negative's logit by one constant); the memory queue with L_logQ3
    pairs = [(src, lq) for src in ("in-batch", "mixed") for lq in _LOGQ]
    if quick:
        pairs = [(src, lq) for src, lq in pairs if lq != "positive_and_negatives"]
    pairs.append(("uniform", "none"))
    if not quick:
        pairs.append(("queue", "negatives_only"))
    for src, lq in pairs:
        out[f"softmax {src} ({_LOGQ_SHORT[lq]})"] = RetrievalLossConfig(
            kind="sampled_softmax", negatives=NegativeSamplerConfig(**_SOURCES[src], logq=lq)
        )
    out["full softmax"] = RetrievalLossConfig(kind="full_softmax")
    return out


@dataclass(frozen=True)
class LossesConfig(ExperimentConfig):
    """Loss comparison for the two-tower generator (ID item tower, mean-pooling user tower, cosine, learnable temperature)."""

    policy: str = param("popularity", "behaviour policy of the log")
    epsilon: float = param(0.05, "uniform exploration of the behaviour policy")
    episodes_per_user: float = param(
        3.0, "user episodes logged per user of the world (the full profile logs 1.5)"
    )
    valid_users: int = param(
        1000, "validation users (early stopping, the choice of the best softmax); test: 2,000"
    )
    dim: int = param(64, "embedding dimension")
    epochs: int = param(12, "maximum training epochs (early stopping on validation recall@100)")
    batch_size: int = param(1024, "training batch size")
    lr: float = param(3e-3, "learning rate")
    variants: tuple[str, ...] = param(
        (), "run only these recipes (names as in the results table; empty: the profile's set)"
    )

    def __post_init__(self) -> None:
        if isinstance(self.valid_users, bool) or not isinstance(self.valid_users, int):
            raise ValueError(f"valid_users must be an integer >= 1, got {self.valid_users!r}")
        if self.valid_users < 1:
            raise ValueError(f"valid_users must be an integer >= 1, got {self.valid_users!r}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be distinct, got {self.variants}")
        known = set(_recipes(True)) | set(_recipes(False))
        unknown = [v for v in self.variants if v not in known]
        if unknown:
            raise ValueError(f"variants {unknown} are not available; choose among {sorted(known)}")

    @classmethod
    def full(cls) -> LossesConfig:
        """The published profile: 1.5 logged episodes per user (see OfflineTrainingConfig)."""
        return replace(cls(), episodes_per_user=1.5)

    @classmethod
    def quick(cls) -> LossesConfig:
        return replace(cls(), epochs=5, batch_size=512)


#: Minimum effect of interest of a "beats" finding on recall@100 or popularity: +2% relative.
MIN_GAIN = 0.02


@experiment(
    "losses",
    "Impression-aware BCE, BCE, BPR, sampled softmax (uniform / in-batch / mixed / queue, each logQ variant), full softmax.",
    LossesConfig,
)
def run(cfg: LossesConfig, ctx: RunContext) -> None:
    recipes = _recipes(ctx.quick)
    if cfg.variants:
        recipes = {n: r for n, r in recipes.items() if n in cfg.variants}
        missing = [v for v in cfg.variants if v not in recipes]
        if missing:
            raise ValueError(
                f"variants {missing} are not in the {'quick' if ctx.quick else 'full'} "
                f"profile's set: {list(_recipes(ctx.quick))}"
            )
    rows = []
    users = PerUser()
    valid: dict[str, list[float]] = {}  # recipe -> validation recall@100 per seed
    for seed in ctx.seeds:
        data = offline_data(
            ctx.quick, seed, cfg.policy, cfg.epsilon, cfg.episodes_per_user, cfg.valid_users
        )
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
            valid.setdefault(name, []).append(res.best_recall)  # the validation period only
            m, per = evaluate_per_user(two_tower_generator(model, data, name), data)
            users.add(name, seed, per)
            rows.append(
                {"world": wl, "policy": data.label, "model": name, "seed": seed, "wall_s": secs,
                 "epochs": res.best_epoch, "valid_recall@100": res.best_recall,
                 "tau": float(model.similarity.tau.detach()), **m}
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
        "valid_recall@100",
        "tau",
        "epochs",
    ]
    agg = ctx.report.seed_table(
        "Offline metrics on held-out users (test period)",
        rows,
        metrics,
        fmt=".3f",
        note="valid_recall@100: recall@100 of the kept epoch on the validation period (what "
        "early stopping and the choice of the best softmax see).",
    )
    ctx.report.add_result("rows", rows)
    by = {r["model"]: r for r in agg}
    softmax = [n for n in by if "softmax" in n]
    best_softmax = choose_on_validation({n: valid[n] for n in softmax}) if softmax else None
    ctx.report.add_result(
        "selection",
        {
            "best_softmax": best_softmax,
            "criterion": "mean validation recall@100 over seeds",
            "valid_recall@100": {n: valid[n] for n in softmax},
        },
    )
    _findings(ctx, users, best_softmax, len(softmax))
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
    parts = [
        f"{n} {by[n]['recall@100'].mean:.3f}"
        for n in ("BCE (mixed neg.)", "BPR (mixed neg.)", "impression BCE")
        if n in by
    ]
    lead = (
        f"softmax chosen on validation: {best_softmax} recall@100 "
        f"{by[best_softmax]['recall@100'].format('.3f')}"
        if best_softmax
        else "no softmax variant run"
    )
    ctx.report.headline(lead + ("; " + ", ".join(parts) if parts else ""))


def _findings(ctx: RunContext, users: PerUser, best_softmax: str | None, n_softmax: int) -> None:
    """The loss findings, each recorded when the recipes it compares were run."""
    gain = f"by at least {100 * MIN_GAIN:g}% (relative)"
    for ref, short in (("BCE (mixed neg.)", "BCE"), ("BPR (mixed neg.)", "BPR")):
        if best_softmax and users.has(ref):
            ctx.report.finding(
                f"Softmax beats {short} for candidate generation: the best of {n_softmax} softmax "
                f"variants, chosen on validation recall@100 ({best_softmax}), has a higher test "
                f"recall@100 than {ref} {gain} (best-of-{n_softmax} against one {short} variant)",
                users.effect(best_softmax, ref, "recall@100", relative=True),
                metric="recall@100 per test user",
                min_effect=MIN_GAIN,
            )
    lq, no = "softmax in-batch (logQ3)", "softmax in-batch (no logQ)"
    if users.has(lq, no):
        ctx.report.finding(
            "logQ removes the popularity penalty of in-batch negatives: with L_logQ3 the "
            f"top-100 holds more popular items (mean log(1 + train count)) {gain}",
            users.effect(lq, no, "pop_bias@100", relative=True),
            metric="popularity bias of the top-100 per test user",
            min_effect=MIN_GAIN,
        )
        ctx.report.finding(
            f"... and recall@100 of in-batch negatives improves with L_logQ3 {gain}",
            users.effect(lq, no, "recall@100", relative=True),
            metric="recall@100 per test user",
            min_effect=MIN_GAIN,
        )
    l3, derived = "softmax mixed (logQ3)", "softmax mixed (logQ derived)"
    if users.has(l3, derived):
        ctx.report.finding(
            "Keeping the positive in the denominator matters: with mixed negatives L_logQ3 "
            f"beats the derived estimator (positive left out) on recall@100 {gain}",
            users.effect(l3, derived, "recall@100", relative=True),
            metric="recall@100 per test user",
            min_effect=MIN_GAIN,
        )
