"""folding: impression-aware training folds disjoint user-item groups (the lecture's "Folding").

The lecture: when the logging recommender is good, slates hold no random items; users and
items split into disjoint groups (Spaniards get Spanish videos, Italians Italian ones); a
ranking loss trained on impressions only learns *local* comparisons inside a slate, so the
groups may land on top of each other in vector space ("fold"), while retrieval must compare
items across the whole catalog. Here the log comes from the in-group policy (every slate is
local to the user's group), and the models are compared on

- leakage@100: share of the top-100 from groups the user never engages with;
- normalised leakage: the same divided by what random retrieval over the released catalog
  gives (1 = no group structure at all);
- cross-group AUC: probability that a held-out positive outscores an item of another group;
- centroid similarity: cosine between the group centroids of the item vectors
  (:func:`retrieval.metrics.group_centroid_similarity`), plotted as a matrix.

Findings (each paired over the test users, combined over seeds): impression-aware BCE folds
(leakage@100 at least 10x that of sampled softmax with uniform or mixed negatives: the
per-user difference ``leak(BCE) - 10 x leak(softmax)`` is positive); in-batch negatives from
mixed-group batches remove folding (at most a tenth of impression BCE's leakage);
group-homogeneous batches with in-batch negatives bring it back, uniform negatives remove it
even there; random items in the slates (epsilon > 0, another log, so unpaired) counter it.

Group-homogeneous batches: every arm trains through the same
:func:`retrieval.train.fit_two_tower` (one AdamW state for the whole run, item frequencies
over the whole training log, the same early stopping); the group arms pass
``batch_groups`` so that every batch holds users of one group. The user's true group is
hidden, so batches are formed by an observable proxy (:func:`history_group`): the catalog
group that most of the user's training-period history belongs to. The report prints how
often the proxy equals the true group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from benchmarks.common import (
    OfflineData,
    OfflineTrainingConfig,
    chosen_variants,
    default_two_tower,
    env_config,
    evaluate_per_user,
    train_two_tower,
    two_tower_generator,
    world_label,
)
from benchmarks.paired import PerUser
from benchmarks.registry import experiment, param
from benchmarks.runner import RunContext
from retrieval.losses import NegativeSamplerConfig, RetrievalLossConfig
from retrieval.metrics import group_centroid_similarity

IMPRESSION = "impression BCE"
UNIFORM = "softmax uniform"
IN_BATCH = "softmax in-batch"
MIXED = "softmax mixed"
GROUP_IN_BATCH = "softmax in-batch (group batches)"
GROUP_UNIFORM = "softmax uniform (group batches)"
VARIANTS = (IMPRESSION, UNIFORM, IN_BATCH, MIXED, GROUP_IN_BATCH, GROUP_UNIFORM)

_UNIFORM_LOSS = RetrievalLossConfig(
    kind="sampled_softmax", negatives=NegativeSamplerConfig(in_batch=False, uniform=1024)
)  # uniform Q: logQ would only shift every negative by the same constant
_IN_BATCH_LOSS = RetrievalLossConfig(
    kind="sampled_softmax",
    negatives=NegativeSamplerConfig(in_batch=True, logq="negatives_only"),  # L_logQ3
)
_MIXED_LOSS = RetrievalLossConfig(
    kind="sampled_softmax",
    negatives=NegativeSamplerConfig(in_batch=True, uniform=1024, logq="negatives_only"),
)
LOSSES = {
    IMPRESSION: RetrievalLossConfig(kind="impression_bce"),
    UNIFORM: _UNIFORM_LOSS,
    IN_BATCH: _IN_BATCH_LOSS,
    MIXED: _MIXED_LOSS,
    GROUP_IN_BATCH: _IN_BATCH_LOSS,
    GROUP_UNIFORM: _UNIFORM_LOSS,
}
GROUPED = (GROUP_IN_BATCH, GROUP_UNIFORM)


@dataclass(frozen=True)
class FoldingConfig(OfflineTrainingConfig):
    """Folding under impression-aware training, by negatives and batch composition."""

    policy: str = param("in-group", "behaviour policy of the log (in-group makes folding possible)")
    epsilon: float = param(
        0.0, "uniform exploration of the behaviour policy (0: every slate stays in the group)"
    )
    compare_epsilon: float | None = param(
        0.05,
        "a second log with this exploration, to see random slate items counter folding "
        "(impression BCE only)",
    )
    dim: int = param(64, "embedding dimension")
    patience: int = param(2, "epochs (rounds for group batches) without validation gain")

    def __post_init__(self) -> None:
        super().__post_init__()
        c = self.compare_epsilon
        if c is not None and not (0.0 <= c <= 1.0 and c != self.epsilon):
            raise ValueError(
                f"compare_epsilon must be None or in [0, 1] and differ from epsilon="
                f"{self.epsilon}, got {c}"
            )
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {self.dim!r}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        chosen_variants(self.variants, VARIANTS)

    @classmethod
    def quick(cls) -> FoldingConfig:
        return replace(
            cls(), compare_epsilon=None, epochs=4, batch_size=512, max_examples_per_epoch=32_768
        )


def history_group(data: OfflineData) -> np.ndarray:
    """An observable proxy of each user's group: the catalog group most of their history has.

    The user's true group is hidden; the catalog's ``group`` feature of the items a user
    engaged with in the training period is public (think of a video's language). Users with
    no training event get their own label (``n_groups``): they have no training example.

    Returns:
        int64 ``(n_users,)`` the most frequent catalog group among each user's training
        events (ties: the smallest group id).
    """
    cat = data.world.catalog
    item_group = cat.categorical[:, cat.categorical_names.index("group")].astype(np.int64)
    n_groups = int(cat.categorical_cardinalities[cat.categorical_names.index("group")])
    seq = data.seq_train
    rows = np.repeat(seq.users, np.diff(seq.offsets))  # (E,) user of each event
    counts = np.bincount(
        rows * n_groups + item_group[seq.items], minlength=data.world.n_users * n_groups
    ).reshape(data.world.n_users, n_groups)  # (U, G) events per user and catalog group
    out = counts.argmax(axis=1)
    out[counts.sum(axis=1) == 0] = n_groups
    return out.astype(np.int64)


def _off_diagonal_mean(sim: np.ndarray) -> float:
    """Mean of the off-diagonal entries of a square matrix."""
    return float(sim[~np.eye(sim.shape[0], dtype=bool)].mean())


@experiment(
    "folding",
    "Folding of disjoint user-item groups on in-group logs: impression-aware BCE vs sampled "
    "softmax with uniform, in-batch (mixed-group or group-homogeneous batches) and mixed "
    "negatives; leakage@100, normalised leakage, cross-group AUC, group-centroid similarity.",
    FoldingConfig,
)
def run(cfg: FoldingConfig, ctx: RunContext) -> None:
    variants = chosen_variants(cfg.variants, VARIANTS)
    epsilons = [cfg.epsilon] + ([cfg.compare_epsilon] if cfg.compare_epsilon is not None else [])
    model_cfg = default_two_tower(cfg.dim)
    rows = []
    users = PerUser()
    proxy_agreement: dict[str, list[float]] = {}  # log label -> per seed
    centroids: dict[str, np.ndarray] = {}  # first seed, first epsilon
    for seed in ctx.seeds:
        wl = world_label(env_config(ctx.quick), seed)
        for eps in epsilons:
            data = cfg.data(ctx.quick, seed, eps)
            proxy = history_group(data)
            trained = np.unique(data.seq_train.users)
            proxy_agreement.setdefault(data.label, []).append(
                float((proxy[trained] == data.world.users.group[trained]).mean())
            )
            # the second log serves one finding (impression BCE under exploration): train only that
            arms = variants if eps == epsilons[0] else [n for n in variants if n == IMPRESSION]
            for name in ctx.progress(arms, desc=f"seed {seed}, eps {eps:g}"):
                tcfg = cfg.train_config(seed, ctx.threads, patience=cfg.patience)
                with ctx.timer("train") as t:
                    model, res, _ = train_two_tower(
                        data, model_cfg, LOSSES[name], tcfg,
                        batch_groups=proxy if name in GROUPED else None,
                    )  # fmt: skip
                with ctx.timer("evaluate"):
                    m, per = evaluate_per_user(two_tower_generator(model, data, name), data)
                    vecs = model.all_item_vectors().numpy()  # (N, d) raw tower outputs
                    groups = data.world.catalog.column("group")  # (N,) public item groups
                    sim = group_centroid_similarity(vecs, groups)  # (G, G)
                users.add(_arm(name, eps), seed, per)
                if seed == ctx.seeds[0] and eps == epsilons[0]:
                    centroids[name] = sim
                rows.append(
                    {"world": wl, "policy": data.label, "model": name, "seed": seed,
                     "wall_s": t.seconds, "epsilon": eps, "epochs": res.best_epoch,
                     "tau": float(model.similarity.tau.detach()),
                     "centroid_offdiag": _off_diagonal_mean(sim), **m}
                )  # fmt: skip
    metrics = [
        "recall@10",
        "recall@100",
        "leakage@100",
        "norm_leakage@100",
        "cross_group_auc",
        "centroid_offdiag",
        "tau",
        "epochs",
    ]
    agg = ctx.report.seed_table(
        "Folding on held-out users of in-group logs (test period)",
        rows,
        metrics,
        fmt={m: ".4f" for m in metrics} | {"epochs": ".1f", "tau": ".3f", "wall_s": ".1f"},
        note="leakage@100: share of other-group items in the top 100; norm_leakage@100: that "
        "share over random retrieval's (1 = no group structure); cross_group_auc: P(held-out "
        "positive outscores an other-group item); centroid_offdiag: mean cosine between "
        "different groups' item centroids.",
    )
    ctx.report.add_result("rows", rows)
    eps0 = epsilons[0]
    by = {(r["policy"], r["model"]): r for r in agg}
    label0 = next(r["policy"] for r in rows if r["epsilon"] == eps0)

    def cell(model: str, metric: str, label: str = label0):
        r = by.get((label, model))
        return None if r is None else r[metric]

    ctx.report.section(
        "Group-homogeneous batches",
        "The group arms batch users by the catalog group most of their training history "
        "belongs to (the true group is hidden). Share of training users whose proxy equals "
        "their true group: "
        + "; ".join(
            f"{label}: {', '.join(f'{a:.3f}' for a in agree)}"
            for label, agree in proxy_agreement.items()
        )
        + " (per seed). Every arm, grouped or not, trains with one AdamW state and the item "
        "frequencies of the whole training log.",
    )
    ctx.report.add_result("proxy_agreement", proxy_agreement)
    _findings(ctx, users, epsilons)
    _centroid_note(ctx, cell)
    _plots(ctx, centroids, agg, label0)
    parts = [
        f"{n} {cell(n, 'leakage@100').mean:.3f}"
        for n in variants
        if cell(n, "leakage@100") is not None
    ]
    ctx.report.headline(f"leakage@100 on in-group logs (eps={eps0:g}): " + "; ".join(parts))


def _arm(name: str, eps: float) -> str:
    return f"{name} @ epsilon={eps:g}"


def _findings(ctx: RunContext, users: PerUser, epsilons: list[float]) -> None:
    """The folding findings, each recorded only when the variants it compares were run."""
    eps0 = epsilons[0]

    def have(*names: str) -> bool:
        return users.has(*(_arm(n, eps0) for n in names))

    def times(a: str, b: str, factor: float, metric: str = "leakage@100"):
        """Per-user ``metric(a) - factor * metric(b)``: positive means a >= factor x b."""
        return users.effect(_arm(a, eps0), _arm(b, eps0), metric, control_scale=factor)

    leak = "leakage@100 per test user"
    for ref in (UNIFORM, MIXED):
        if have(IMPRESSION, ref):
            ctx.report.finding(
                f"Impression-aware BCE folds: its leakage@100 is at least 10x that of sampled "
                f"softmax with {ref.split()[-1]} negatives (the issue's bar)",
                times(IMPRESSION, ref, 10.0),
                metric=f"{leak}: leakage(impression BCE) - 10 x leakage({ref})",
            )
    if have(IMPRESSION, MIXED):
        ctx.report.finding(
            "Folded groups are not told apart: impression BCE's cross-group AUC is below the "
            "mixed-negative softmax's by at least 0.01",
            users.effect(_arm(IMPRESSION, eps0), _arm(MIXED, eps0), "cross_group_auc"),
            metric="cross-group AUC per test user",
            direction="<",
            min_effect=0.01,
        )
    if have(IMPRESSION, IN_BATCH):
        ctx.report.finding(
            "In-batch negatives from mixed-group batches remove folding: leakage@100 at most a "
            "tenth of impression BCE's",
            times(IN_BATCH, IMPRESSION, 0.1),
            metric=f"{leak}: leakage({IN_BATCH}) - 0.1 x leakage(impression BCE)",
            direction="<",
        )
    if have(GROUP_IN_BATCH, IN_BATCH):
        ctx.report.finding(
            "Group-homogeneous batches bring folding back: in-batch negatives leak at least 10x "
            "more than with mixed-group batches",
            times(GROUP_IN_BATCH, IN_BATCH, 10.0),
            metric=f"{leak}: leakage(group batches) - 10 x leakage(mixed-group batches)",
        )
    if have(GROUP_UNIFORM, GROUP_IN_BATCH):
        ctx.report.finding(
            "Uniform negatives remove folding even in group-homogeneous batches: leakage@100 "
            "at most a tenth of in-batch negatives' there",
            times(GROUP_UNIFORM, GROUP_IN_BATCH, 0.1),
            metric=f"{leak}: leakage({GROUP_UNIFORM}) - 0.1 x leakage({GROUP_IN_BATCH})",
            direction="<",
        )
    if len(epsilons) > 1 and users.has(*(_arm(IMPRESSION, e) for e in epsilons)):
        eps1 = epsilons[-1]
        ctx.report.finding(
            f"Random items in the slates counter folding: impression BCE trained on the "
            f"epsilon={eps1:g} log has a normalised leakage@100 at least 10% lower than on the "
            f"epsilon={eps0:g} log (different logs and test users: unpaired)",
            users.unpaired(
                _arm(IMPRESSION, eps1), _arm(IMPRESSION, eps0), "norm_leakage@100", relative=True
            ),
            metric="normalised leakage@100 per test user",
            direction="<",
            min_effect=0.10,
        )


def _centroid_note(ctx: RunContext, cell) -> None:
    """Say whether the centroid view orders the models as leakage does (computed, not assumed)."""
    names = [n for n in VARIANTS if cell(n, "leakage@100") is not None]
    if len(names) < 2:
        return
    leak = np.array([cell(n, "leakage@100").mean for n in names])
    off = np.array([cell(n, "centroid_offdiag").mean for n in names])
    rho = float(spearmanr(leak, off).statistic) if np.ptp(leak) > 0 and np.ptp(off) > 0 else 0.0
    lines = ", ".join(f"{n} {o:+.2f}" for n, o in zip(names, off, strict=True))
    ctx.report.section(
        "Reading the centroid matrix",
        f"Mean off-diagonal centroid cosine per model: {lines}. Spearman correlation between "
        f"it and leakage@100 across the models: {rho:+.2f}. Centroids summarise each group by "
        "one direction; folding is the overlap of the groups' item clouds with what each "
        "user's vector points at, so leakage and cross-group AUC are the measures the claims "
        "use, and the matrix is a picture of the geometry"
        + (
            " (here it does not order the models as leakage does)."
            if rho < 0.5
            else " (here it orders the models as leakage does)."
        ),
    )


def _plots(ctx: RunContext, centroids: dict[str, np.ndarray], agg: list, label0: str) -> None:
    shown = [n for n in (IMPRESSION, MIXED, GROUP_IN_BATCH, UNIFORM, IN_BATCH) if n in centroids][
        :3
    ]
    if shown:
        fig = Figure(figsize=(3.6 * len(shown) + 0.8, 3.6))
        axes = fig.subplots(1, len(shown), squeeze=False)[0]
        im = None
        for ax, name in zip(axes, shown, strict=True):
            sim = centroids[name]
            im = ax.imshow(sim, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
            for i in range(sim.shape[0]):
                for j in range(sim.shape[1]):
                    ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=7)
            ax.set_title(f"{name}\noff-diagonal mean {_off_diagonal_mean(sim):.2f}", fontsize=8)
            ax.set_xlabel("group")
            ax.set_ylabel("group")
            ax.set_xticks(range(sim.shape[0]))
            ax.set_yticks(range(sim.shape[0]))
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="cosine of group centroids")
        ctx.report.figure(
            "centroid_similarity",
            fig,
            "Cosine similarity between the groups' item-vector centroids (first seed, first "
            "epsilon): near 1 off the diagonal = folded groups, near or below 0 = separated.",
            data={name: centroids[name] for name in shown},
        )
    rows = [r for r in agg if r["policy"] == label0]
    fig = Figure(figsize=(7.5, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    names = [r["model"] for r in rows]
    y = np.arange(len(rows))
    for ax, metric, title in (
        (ax1, "norm_leakage@100", "normalised leakage@100 (1 = random)"),
        (ax2, "cross_group_auc", "cross-group AUC (1 = groups apart)"),
    ):
        ax.barh(y, [r[metric].mean for r in rows], xerr=[r[metric].std or 0.0 for r in rows])
        ax.set_yticks(y)
        ax.set_yticklabels(names if ax is ax1 else [], fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.set_xlim(0, 1.05)
        ax.invert_yaxis()
    fig.tight_layout()
    ctx.report.figure(
        "leakage",
        fig,
        f"Normalised leakage@100 and cross-group AUC per model ({label0}).",
        data={
            "model": names,
            "norm_leakage@100": [r["norm_leakage@100"].mean for r in rows],
            "cross_group_auc": [r["cross_group_auc"].mean for r in rows],
        },
    )
