"""similarity: dot product vs cosine, fixed vs learnable temperature (the lecture's "Функции похожести").

The lecture: with a dot product ``<u, i> = cos(u, i) ||u|| ||i||`` the item norms learn
popularity, since a softmax step grows ``||p||`` by ``alpha cos(u, p) [1 - P(p | u)]`` and
popular items get the most steps; cosine removes the effect and trains more steadily, but its
scores live in [-1, 1], so a softmax over many negatives cannot be confident without a
temperature, ``f(u, i) = cos(u, i) / tau``. A fixed temperature has to be chosen well; the
alternative is a learnable one, ``tau = clip(exp(s), 0.01, 100)`` with ``s`` initialised at 0.

Measured (default recipe otherwise: ID item tower, mean-pooling user tower, sampled softmax
with mixed negatives and logQ3): recall and NDCG on held-out users, the popularity of what
is retrieved, the Spearman correlation between item-vector norms and training counts over
the warm items (:func:`retrieval.similarity.norm_popularity_correlation`, raw tower outputs
for cosine models too) and the learned temperature's trajectory.

Findings: recall comparisons are paired over the test users; the correlations have a
bootstrap interval over the warm items within a seed; seeds are combined by a t interval
over the per-seed effects. The best and worst fixed temperatures are chosen on the
validation period (mean validation recall@100), never on the test users.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from matplotlib.figure import Figure

from benchmarks.common import (
    OfflineTrainingConfig,
    chosen_variants,
    default_two_tower,
    env_config,
    evaluate_per_user,
    mixed_negatives,
    train_two_tower,
    two_tower_generator,
    world_label,
)
from benchmarks.paired import PerUser, choose_on_validation, spearman_effect
from benchmarks.registry import experiment, param
from benchmarks.runner import RunContext
from benchmarks.stats import combine_seeds
from retrieval.similarity import norm_popularity_correlation
from simenv.clock import released

DOT = "dot"
DOT_LEARNED = "dot (learnable tau)"
COS_LEARNED = "cosine (learnable tau)"


def _fixed_name(tau: float) -> str:
    return f"cosine (tau={tau:g})"


def _variants(temperatures: tuple[float, ...]) -> dict[str, dict]:
    """Variant name -> SimilarityConfig keyword arguments."""
    out: dict[str, dict] = {
        DOT: dict(kind="dot", temperature=None),
        DOT_LEARNED: dict(kind="dot", temperature=None, learnable_temperature=True),
    }
    for tau in temperatures:
        out[_fixed_name(tau)] = dict(kind="cosine", temperature=float(tau))
    out[COS_LEARNED] = dict(kind="cosine", temperature=None, learnable_temperature=True)
    return out


@dataclass(frozen=True)
class SimilarityExperimentConfig(OfflineTrainingConfig):
    """Dot vs cosine, a fixed-temperature grid vs a learnable temperature."""

    dim: int = param(64, "embedding dimension")
    temperatures: tuple[float, ...] = param(
        (0.05, 0.1, 0.2, 1.0), "fixed temperatures of the cosine grid"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {self.dim!r}")
        if not self.temperatures or any(not t > 0 for t in self.temperatures):
            raise ValueError(
                f"temperatures must be a non-empty tuple of values > 0, got {self.temperatures}"
            )
        if len(set(self.temperatures)) != len(self.temperatures):
            raise ValueError(f"temperatures must be distinct, got {self.temperatures}")
        chosen_variants(self.variants, tuple(_variants(self.temperatures)))

    @classmethod
    def quick(cls) -> SimilarityExperimentConfig:
        return replace(
            cls(),
            epochs=5,
            batch_size=512,
            variants=(DOT,) + tuple(_fixed_name(t) for t in cls().temperatures) + (COS_LEARNED,),
        )


@experiment(
    "similarity",
    "Dot product vs cosine, cosine with a fixed temperature grid vs a learnable temperature "
    "clip(exp(s), 0.01, 100): recall, norm-popularity correlation, learned temperature.",
    SimilarityExperimentConfig,
)
def run(cfg: SimilarityExperimentConfig, ctx: RunContext) -> None:
    all_variants = _variants(cfg.temperatures)
    variants = chosen_variants(cfg.variants, tuple(all_variants))
    loss = mixed_negatives()
    rows = []
    users = PerUser()
    valid: dict[str, list[float]] = {}  # variant -> validation recall@100 per seed
    rho_effects: dict[str, list] = {"dot": [], "cos_vs_dot": []}
    trajectories: dict[str, list[float]] = {}  # first seed
    scatter: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # first seed: (log1p count, norm)
    for seed in ctx.seeds:
        data = cfg.data(ctx.quick, seed)
        wl = world_label(env_config(ctx.quick), seed)
        # (N,) items of the training period
        warm = released(data.world.catalog.release_time, data.t1)
        counts = data.train_counts[warm]
        norms: dict[str, np.ndarray] = {}
        for name in ctx.progress(variants, desc=f"seed {seed}"):
            model_cfg = default_two_tower(cfg.dim, **all_variants[name])
            with ctx.timer("train") as t:
                model, res, _ = train_two_tower(
                    data, model_cfg, loss, cfg.train_config(seed, ctx.threads)
                )
            valid.setdefault(name, []).append(res.best_recall)  # the validation period only
            with ctx.timer("evaluate"):
                m, per = evaluate_per_user(two_tower_generator(model, data, name), data)
                vecs = model.all_item_vectors().numpy()[warm]  # (N_warm, d) raw tower outputs
                rho = norm_popularity_correlation(vecs, counts)
            users.add(name, seed, per)
            norms[name] = np.linalg.norm(vecs, axis=1)  # (N_warm,)
            if seed == ctx.seeds[0]:
                if res.tau_trajectory:
                    trajectories[name] = list(res.tau_trajectory)
                if name in (DOT, COS_LEARNED):
                    scatter[name] = (np.log1p(counts), norms[name])
            rows.append(
                {"world": wl, "policy": data.label, "model": name, "seed": seed,
                 "wall_s": t.seconds, "epochs": res.best_epoch,
                 "valid_recall@100": res.best_recall,
                 "tau": float(model.similarity.tau.detach()), "norm_pop_rho": rho, **m}
            )  # fmt: skip
        with ctx.timer("bootstrap"):
            if DOT in norms:
                rng = ctx.rng(seed, "rho bootstrap", DOT)
                rho_effects["dot"].append(
                    spearman_effect(counts, norms[DOT], rng, reference=RHO_BAR, unit="warm items")
                )
            if DOT in norms and COS_LEARNED in norms:
                rng = ctx.rng(seed, "rho bootstrap", COS_LEARNED)
                rho_effects["cos_vs_dot"].append(
                    spearman_effect(
                        counts, norms[COS_LEARNED], rng, control_y=norms[DOT], unit="warm items"
                    )
                )
    metrics = [
        "recall@10",
        "recall@100",
        "ndcg@10",
        "pop_bias@100",
        "coverage@100",
        "norm_pop_rho",
        "valid_recall@100",
        "tau",
        "epochs",
    ]
    agg = ctx.report.seed_table(
        "Offline metrics on held-out users (test period)",
        rows,
        metrics,
        fmt={m: ".3f" for m in metrics} | {"tau": ".4g", "epochs": ".1f", "wall_s": ".1f"},
        note="norm_pop_rho: Spearman correlation between item-vector norms (raw tower outputs) "
        "and training counts over the warm items; tau: the temperature of the kept weights.",
    )
    ctx.report.add_result("rows", rows)
    ctx.report.add_result("tau_trajectories", trajectories)
    by = {r["model"]: r for r in agg}
    fixed = [n for n in (_fixed_name(t) for t in cfg.temperatures) if n in by]
    best_fixed = choose_on_validation({n: valid[n] for n in fixed}) if fixed else None
    worst_fixed = (
        choose_on_validation({n: valid[n] for n in fixed}, higher_is_better=False)
        if fixed
        else None
    )
    ctx.report.add_result(
        "selection",
        {
            "best_fixed": best_fixed,
            "worst_fixed": worst_fixed,
            "criterion": "mean validation recall@100 over seeds",
            "valid_recall@100": {n: valid[n] for n in fixed},
        },
    )
    _findings(ctx, users, rho_effects, fixed, best_fixed, worst_fixed)
    _plots(ctx, by, best_fixed, cfg, trajectories, scatter)
    lead = (
        f"best fixed temperature (validation): {best_fixed} recall@100 "
        f"{by[best_fixed]['recall@100'].format('.3f')}"
        if best_fixed
        else ""
    )
    extra = f"dot norm-popularity rho {by[DOT]['norm_pop_rho'].mean:.2f}" if DOT in by else ""
    learned = (
        f"learnable tau: recall@100 {by[COS_LEARNED]['recall@100'].format('.3f')}, tau "
        f"{by[COS_LEARNED]['tau'].mean:.3g}"
        if COS_LEARNED in by
        else ""
    )
    ctx.report.headline("; ".join(p for p in (lead, learned, extra) if p))


#: The bar of the norm-popularity finding: Spearman's rho above 0.3 ("norms learn popularity").
RHO_BAR = 0.3


def _findings(
    ctx: RunContext,
    users: PerUser,
    rho_effects: dict[str, list],
    fixed: list[str],
    best: str | None,
    worst: str | None,
) -> None:
    recall = "recall@100 per test user"
    if rho_effects["dot"]:
        ctx.report.finding(
            f"With a dot product the item norms learn popularity: Spearman(norm, training "
            f"count) over warm items above {RHO_BAR:g}",
            combine_seeds(rho_effects["dot"]),
            metric=f"Spearman rho - {RHO_BAR:g}",
        )
    if rho_effects["cos_vs_dot"]:
        ctx.report.finding(
            "Cosine removes the effect: the raw norms of a cosine model (learnable tau) "
            "correlate with popularity at least 0.1 less than a dot model's (Spearman rho)",
            combine_seeds(rho_effects["cos_vs_dot"]),
            metric="Spearman rho (cosine) - rho (dot), same warm items",
            direction="<",
            min_effect=0.1,
        )
    one = "cosine (tau=1)"
    if users.has(one, COS_LEARNED):
        ctx.report.finding(
            "Cosine needs a temperature: without one (tau = 1) recall@100 is at least 10% "
            "below the learnable temperature's",
            users.effect(one, COS_LEARNED, "recall@100", relative=True),
            metric=recall,
            direction="<",
            min_effect=0.10,
        )
    if best and worst and best != worst:
        ctx.report.finding(
            f"A fixed temperature must be chosen well: over the grid of {len(fixed)}, the best "
            f"({best}) has a test recall@100 more than 10% above the worst ({worst}), both "
            "chosen on validation recall@100",
            users.effect(best, worst, "recall@100", relative=True, control_scale=1.1),
            metric=f"{recall}: recall(best) / (1.1 x recall(worst)) - 1",
        )
    if best and users.has(COS_LEARNED):
        ctx.report.finding(
            f"A learnable temperature needs no grid: its recall@100 is within 3% of the best "
            f"fixed temperature's (chosen on validation: {best})",
            users.effect(COS_LEARNED, best, "recall@100", relative=True, control_scale=0.97),
            metric=f"{recall}: recall(learnable) / (0.97 x recall({best})) - 1",
        )
    if users.has(DOT, COS_LEARNED):
        ctx.report.finding(
            "Cosine with a learnable temperature is at least as good as the dot product "
            "(recall@100 within 2% or above)",
            users.effect(COS_LEARNED, DOT, "recall@100", relative=True, control_scale=0.98),
            metric=f"{recall}: recall(cosine) / (0.98 x recall(dot)) - 1",
        )


def _plots(
    ctx: RunContext,
    by: dict,
    best_fixed: str | None,
    cfg: SimilarityExperimentConfig,
    trajectories: dict[str, list[float]],
    scatter: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    if trajectories:
        fig = Figure(figsize=(6.5, 3.8))
        ax = fig.add_subplot()
        for name, traj in trajectories.items():
            ax.plot(np.arange(1, len(traj) + 1), traj, label=name)
        for tau in cfg.temperatures:
            ax.axhline(tau, color="grey", lw=0.6, ls=":")
        if best_fixed:
            names = [_fixed_name(t) for t in cfg.temperatures]
            tau_best = cfg.temperatures[names.index(best_fixed)]
            ax.axhline(
                tau_best,
                color="black",
                lw=1.0,
                ls="--",
                label=f"best fixed (validation): {best_fixed}",
            )
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("temperature tau = clip(exp(s), 0.01, 100)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        ctx.report.figure(
            "tau_trajectory",
            fig,
            "Learned temperature after every training step (first seed; s starts at 0, "
            "tau = 1); dotted lines: the fixed grid.",
            data=trajectories,
        )
    taus = [t for t in cfg.temperatures if _fixed_name(t) in by]
    if taus:
        rec = [by[_fixed_name(t)]["recall@100"] for t in taus]
        fig = Figure(figsize=(5.5, 3.6))
        ax = fig.add_subplot()
        ax.errorbar(
            taus, [r.mean for r in rec], yerr=[r.std or 0.0 for r in rec], fmt="o-", label="fixed"
        )
        data = {"tau": taus, "recall@100": [r.mean for r in rec]}
        if COS_LEARNED in by:
            r = by[COS_LEARNED]
            ax.errorbar(
                [r["tau"].mean], [r["recall@100"].mean], yerr=[r["recall@100"].std or 0.0],
                fmt="*", ms=12, label="learnable (at its final tau)",
            )  # fmt: skip
            data["learnable"] = {"tau": r["tau"].mean, "recall@100": r["recall@100"].mean}
        ax.set_xscale("log")
        ax.set_xlabel("temperature tau")
        ax.set_ylabel("recall@100")
        ax.legend(fontsize=7)
        fig.tight_layout()
        ctx.report.figure(
            "recall_vs_tau",
            fig,
            "Recall@100 of cosine models against the temperature.",
            data=data,
        )
    if scatter:
        fig = Figure(figsize=(4.0 * len(scatter), 3.6))
        axes = fig.subplots(1, len(scatter), squeeze=False)[0]
        for ax, (name, (logc, norms)) in zip(axes, scatter.items(), strict=True):
            ax.scatter(logc, norms, s=3, alpha=0.4)
            ax.set_title(f"{name}: rho {by[name]['norm_pop_rho'].values[0]:.2f}", fontsize=9)
            ax.set_xlabel("log(1 + training count)")
            ax.set_ylabel("item vector norm (raw)")
        fig.tight_layout()
        ctx.report.figure(
            "norm_vs_popularity",
            fig,
            "Item-vector norm against training popularity over the warm items (first seed).",
        )
