"""user-towers: history encoders on next-item prediction (the lecture's "Пользовательские башни").

The lecture encodes a user by the history of their events rather than by a user id. The
simplest tower averages the history's item vectors (YoutubeDNN), optionally with time decay
or over the last n events; it ignores order. The most expressive one is a transformer over
events (item, event type, position, context), causal (SASRec, a decoder trained to predict
the next item at every position at once) or bidirectional (BERT4Rec-like encoder), pooled by
the last token, a CLS token or a mean; GRU4Rec is the recurrent alternative.

Every tower here shares the ID item tower and the loss (sampled softmax with mixed negatives
and logQ3, cosine with a learnable temperature). Sequence towers marked "all positions" are
trained with ``TrainConfig(causal=True)``: windows of L events with a next-item target at
every position, ``causal_batch_size`` windows per step; the others get one example per
positive (the history before it). Metrics: next-item hit rate (the first held-out positive in
the top K), recall against all held-out positives, and NDCG@10.
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
    evaluate_generator,
    mixed_negatives,
    offline_data,
    train_two_tower,
    two_tower_generator,
    world_label,
)
from benchmarks.registry import experiment, param
from benchmarks.runner import RunContext
from retrieval.metrics import hit_rate_at_k, mean_over_users
from retrieval.model import TwoTowerConfig
from retrieval.towers import UserTowerConfig

MEAN = "mean"
MEAN_DECAY = "mean (time decay)"
MEAN_LAST = "mean (last n)"
SAS = "transformer causal last-token (all positions)"
SAS_PER = "transformer causal last-token (per positive)"
BERT_CLS = "transformer bidirectional CLS"
BERT_MEAN = "transformer bidirectional mean-pool"
GRU = "GRU (all positions)"
VARIANTS = (MEAN, MEAN_DECAY, MEAN_LAST, SAS, SAS_PER, BERT_CLS, BERT_MEAN, GRU)
ALL_POSITIONS = (SAS, GRU)
TRANSFORMERS = (SAS, SAS_PER, BERT_CLS, BERT_MEAN)


@dataclass(frozen=True)
class UserTowersConfig(OfflineTrainingConfig):
    """Mean pooling (plain, time decay, last n) vs transformers vs GRU on next-item prediction."""

    dim: int = param(64, "embedding dimension (user and item towers)")
    half_life_days: float = param(1.0, "time-decay half-life of the decayed mean, days")
    last_n: int = param(10, "events averaged by the last-n mean")
    n_layers: int = param(2, "transformer blocks / GRU layers")
    n_heads: int = param(2, "transformer attention heads")
    causal_batch_size: int = param(
        64, "windows per step for all-positions training (each holds up to L targets)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dim", "last_n", "n_layers", "n_heads", "causal_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if not self.half_life_days > 0:
            raise ValueError(f"half_life_days must be > 0, got {self.half_life_days}")
        chosen_variants(self.variants, VARIANTS)

    @classmethod
    def quick(cls) -> UserTowersConfig:
        return replace(
            cls(),
            dim=32,
            epochs=5,
            batch_size=512,
            variants=(MEAN, MEAN_DECAY, SAS, BERT_CLS, GRU),
        )

    def user_tower(self, name: str) -> UserTowerConfig:
        """The user tower of a variant."""
        seq = dict(n_layers=self.n_layers, n_heads=self.n_heads)
        return {
            MEAN: UserTowerConfig(kind="mean"),
            MEAN_DECAY: UserTowerConfig(kind="mean", time_decay_half_life=self.half_life_days),
            MEAN_LAST: UserTowerConfig(kind="mean", last_n=self.last_n),
            SAS: UserTowerConfig(kind="transformer", causal=True, pooling="last", **seq),
            SAS_PER: UserTowerConfig(kind="transformer", causal=True, pooling="last", **seq),
            BERT_CLS: UserTowerConfig(kind="transformer", causal=False, pooling="cls", **seq),
            BERT_MEAN: UserTowerConfig(kind="transformer", causal=False, pooling="mean", **seq),
            GRU: UserTowerConfig(kind="gru", n_layers=self.n_layers),
        }[name]


@experiment(
    "user-towers",
    "User towers on next-item prediction: mean pooling (plain, time decay, last n) vs "
    "transformer (causal / bidirectional, last-token / CLS / mean pooling, all-positions or "
    "per-positive training) vs GRU.",
    UserTowersConfig,
)
def run(cfg: UserTowersConfig, ctx: RunContext) -> None:
    variants = chosen_variants(cfg.variants, VARIANTS)
    loss = mixed_negatives()
    base = default_two_tower(cfg.dim)
    rows = []
    for seed in ctx.seeds:
        data = offline_data(ctx.quick, seed, cfg.policy, cfg.epsilon, cfg.episodes_per_user)
        wl = world_label(env_config(ctx.quick), seed)
        ev = data.test_set
        for name in ctx.progress(variants, desc=f"seed {seed}"):
            model_cfg = TwoTowerConfig(
                item=base.item, user=cfg.user_tower(name), similarity=base.similarity
            )
            causal = name in ALL_POSITIONS
            tcfg = cfg.train_config(
                seed,
                ctx.threads,
                causal=causal,
                **({"batch_size": cfg.causal_batch_size} if causal else {}),
            )
            with ctx.timer("train") as t:
                model, res, _ = train_two_tower(data, model_cfg, loss, tcfg)
            with ctx.timer("evaluate"):
                gen = two_tower_generator(model, data, name)
                m = evaluate_generator(gen, data)
                ids, _ = gen.retrieve(ev.obs, 100, exclude_seen=False)  # (B, 100)
                nxt = ev.next_item[:, None]  # (B, 1) the first held-out positive
                for k in (10, 100):
                    m[f"next_hit@{k}"] = mean_over_users(hit_rate_at_k(ids, nxt, k))
            steps = sum(-(-h["examples"] // tcfg.batch_size) for h in res.history[: res.best_epoch])
            rows.append(
                {"world": wl, "policy": data.label, "model": name, "seed": seed,
                 "wall_s": t.seconds, "epochs": res.best_epoch, "steps": steps,
                 "params": sum(p.numel() for p in model.user_tower.parameters()), **m}
            )  # fmt: skip
    metrics = [
        "next_hit@10",
        "next_hit@100",
        "recall@10",
        "recall@100",
        "ndcg@10",
        "epochs",
        "steps",
        "params",
    ]
    agg = ctx.report.seed_table(
        "Next-item prediction on held-out users (test period)",
        rows,
        metrics,
        fmt={m: ".3f" for m in metrics}
        | {"epochs": ".1f", "steps": ".0f", "params": ".0f", "wall_s": ".1f"},
        note="next_hit@K: the user's first held-out positive is in the top K; recall@K: share of "
        "all held-out positives in the top K; steps: optimiser steps up to the kept epoch; "
        "params: user-tower parameters, the shared item table included.",
    )
    ctx.report.add_result("rows", rows)
    by = {r["model"]: r for r in agg}
    _claims(ctx, by)
    names = list(by)
    fig = Figure(figsize=(7.0, 0.45 * len(names) + 1.6))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    for off, metric in ((-0.2, "next_hit@100"), (0.2, "recall@100")):
        ax.barh(
            y + off,
            [by[n][metric].mean for n in names],
            0.4,
            xerr=[by[n][metric].std or 0.0 for n in names],
            label=metric,
        )
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("held-out users")
    ax.legend(fontsize=7)
    fig.tight_layout()
    ctx.report.figure(
        "next_item",
        fig,
        "Next-item hit rate@100 and recall@100 of each user tower.",
        data={n: {m: by[n][m].mean for m in ("next_hit@100", "recall@100")} for n in names},
    )
    ctx.report.headline(
        "next-item hit@100: " + ", ".join(f"{n} {by[n]['next_hit@100'].mean:.3f}" for n in by)
    )


def _claims(ctx: RunContext, by: dict) -> None:
    tr = [n for n in TRANSFORMERS if n in by]
    if MEAN in by and tr:
        best = max(tr, key=lambda n: by[n]["next_hit@100"].mean)
        ctx.report.claim_compare(
            "A transformer over events (order, event type, context) beats average pooling on "
            "next-item prediction (hit@100 of the best transformer)",
            by[best]["next_hit@100"],
            ">",
            by[MEAN]["next_hit@100"],
            measured_name=best,
            reference_name=MEAN,
        )
    for variant in (MEAN_DECAY, MEAN_LAST):
        if MEAN in by and variant in by:
            ctx.report.claim_compare(
                f"Recent events matter to average pooling: {variant} beats the plain mean on "
                "next-item hit@100",
                by[variant]["next_hit@100"],
                ">",
                by[MEAN]["next_hit@100"],
                measured_name=variant,
                reference_name=MEAN,
            )
    bi = [n for n in (BERT_CLS, BERT_MEAN) if n in by]
    if SAS in by and bi:
        best_bi = max(bi, key=lambda n: by[n]["next_hit@100"].mean)
        ctx.report.claim_compare(
            "A causal transformer trained on every position (SASRec) is at least as good as the "
            "best bidirectional one on next-item hit@100",
            by[SAS]["next_hit@100"],
            ">=",
            by[best_bi]["next_hit@100"],
            measured_name=SAS,
            reference_name=best_bi,
        )
    if SAS in by and SAS_PER in by:
        hit, hit_ref = by[SAS]["next_hit@100"].mean, by[SAS_PER]["next_hit@100"].mean
        steps, steps_ref = by[SAS]["steps"].mean, by[SAS_PER]["steps"].mean
        ctx.report.claim(
            "Training on all positions at once is more sample-efficient: the same causal "
            "transformer reaches at least the per-positive model's next-item hit@100 with fewer "
            "optimiser steps",
            bool(hit >= hit_ref and steps < steps_ref),
            f"all positions: hit@100 {hit:.4f} in {steps:.0f} steps; per positive: hit@100 "
            f"{hit_ref:.4f} in {steps_ref:.0f} steps",
        )
