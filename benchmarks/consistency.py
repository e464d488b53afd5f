"""consistency: the generator as the ranker's helper (the lecture's chapter 5).

One ranker for everything. A generator trained on positives only is compared with generators
distilled toward the ranker (four losses): recall relative to the ranker (RRR@K,10 over
K in {50, 100, 200, 500}), pipeline regret, and the online reward of the pipeline in the
simulator next to the single-stage agent (the ranker over the whole catalog) and the oracle.
Then the ranker is made imperfect (a fixed error per user-item pair) and the distillation
weight lambda is swept: imitating an imperfect ranker blindly is not optimal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from matplotlib.figure import Figure

from agents.base import OracleAgent, PopularAgent, RandomAgent
from agents.consistency import NoisyRanker, pipeline_regret, rrr_table, score_scale
from agents.distill import DistillConfig, DistillObjective, teacher_targets
from agents.pipeline import MultiStagePipeline, SingleStageAgent, Source
from agents.rollout import rollout
from benchmarks.common import (
    default_two_tower,
    env_config,
    evaluate_generator,
    mixed_negatives,
    offline_data,
    two_tower_generator,
    world_label,
)
from benchmarks.registry import ExperimentConfig, experiment, param
from benchmarks.runner import RunContext
from ranking import Ranker, RankerConfig, RankerTrainConfig, train_ranker
from retrieval.model import TwoTowerModel
from retrieval.train import TrainConfig, fit_two_tower
from simenv import BatchedRecEnv
from simenv.clock import released
from simenv.history import impression_examples, take_obs

# KL distillation on per-query standardised ranker scores (independent of the score scale)
KL = dict(loss="kl", standardize_teacher=True, teacher_temperature=0.5)


@dataclass(frozen=True)
class ConsistencyConfig(ExperimentConfig):
    """Distillation of the generator toward the ranker, offline and online."""

    policy: str = param("popularity", "behaviour policy of the training log")
    epsilon: float = param(0.05, "its uniform exploration")
    episodes_per_user: float = param(3.0, "logged user episodes per user of the world")
    ranker_epochs: int = param(3, "ranker training epochs")
    epochs: int = param(10, "generator training epochs (early stopping on validation recall)")
    batch_size: int = param(1024, "generator batch size")
    quota: int = param(200, "K: candidates the generator gives the ranker")
    losses: tuple[str, ...] = param(
        ("softmax", "kl", "pairwise", "mse"), "distillation losses compared"
    )
    weights: tuple[float, ...] = param((1.0, 0.5), "lambda values of the loss comparison")
    teacher_queries: int = param(20_000, "training requests the ranker labels")
    online_users: int = param(2_000, "users per online rollout")
    noise_sigma: float = param(
        1.0, "error of the imperfect ranker, in standard deviations of its scores over the catalog"
    )
    sweep: tuple[float, ...] = param(
        (0.0, 0.25, 0.5, 0.75, 1.0), "lambda values of the imperfect-ranker sweep"
    )

    @classmethod
    def quick(cls) -> ConsistencyConfig:
        return replace(
            cls(), ranker_epochs=1, epochs=3, batch_size=512, losses=("softmax", "kl"), weights=(1.0,),
            teacher_queries=3_000, online_users=200, sweep=(0.0, 0.5, 1.0),
        )  # fmt: skip


def _train_distilled(data, targets, dcfg: DistillConfig, tcfg: TrainConfig) -> TwoTowerModel:
    model = TwoTowerModel.build(default_two_tower(64), data.world.catalog)
    pool = np.nonzero(released(data.world.catalog.release_time, data.t1))[0]
    obj = DistillObjective(targets, dcfg, model, sample_pool=pool)
    fit_two_tower(
        model, mixed_negatives(), data.train, data.seq_train, tcfg, valid=data.valid_set,
        release_time=data.world.catalog.release_time, extra=obj, extra_weight=dcfg.weight,
    )  # fmt: skip
    return model


@experiment(
    "consistency",
    "Generator trained on positives vs distilled toward the ranker: RRR curves, regret, online reward; lambda sweep with an imperfect ranker.",
    ConsistencyConfig,
)
def run(cfg: ConsistencyConfig, ctx: RunContext) -> None:
    off_rows, on_rows, sweep_rows, curves = [], [], [], {}
    for seed in ctx.seeds:
        data = offline_data(ctx.quick, seed, cfg.policy, cfg.epsilon, cfg.episodes_per_user)
        world, wl, k = data.world, world_label(env_config(ctx.quick), seed), data.env.slate_size
        # 1. the ranker (impression-aware, on the training period)
        with ctx.timer("ranker") as t_r:
            ranker = Ranker(world.catalog, RankerConfig(seed=seed))
            hist = train_ranker(
                ranker, data.train, data.seq_trval,
                RankerTrainConfig(epochs=cfg.ranker_epochs, progress=False, seed=seed, threads=ctx.threads),
                valid_log=data.valid,
            )  # fmt: skip
        ctx.log(f"seed {seed}: ranker valid AUC {hist.valid_auc[-1]:.3f} in {t_r.seconds:.0f} s")
        ev = data.test_set
        r_top, _ = ranker.top_k(ev.obs, k)  # R_k over the whole released catalog
        tcfg = TrainConfig(
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            seed=seed,
            progress=False,
            threads=ctx.threads,
        )
        # 2. generators: positives only, and distilled
        gens = {}
        with ctx.timer("generators") as t_g:
            base = TwoTowerModel.build(default_two_tower(64), world.catalog)
            fit_two_tower(
                base,
                mixed_negatives(),
                data.train,
                data.seq_train,
                tcfg,
                valid=data.valid_set,
                release_time=world.catalog.release_time,
            )
            gens["positives only"] = base
            queries = impression_examples(data.train, data.seq_train, data.history_length).obs
            targets = teacher_targets(
                ranker,
                queries,
                world.catalog.release_time,
                DistillConfig(max_queries=cfg.teacher_queries),
                ctx.rng(seed, "teacher"),
            )
            for loss in ctx.progress(cfg.losses, desc=f"seed {seed} distillation"):
                for lam in cfg.weights:
                    gens[f"distilled {loss}, lambda={lam:g}"] = _train_distilled(
                        data, targets, DistillConfig(loss=loss, weight=lam), tcfg
                    )
        for name, model in gens.items():
            gen = two_tower_generator(model, data, name)
            rr = rrr_table(gen, r_top, ev.obs)
            m = evaluate_generator(gen, data, ks=(100,), auc_users=200)
            pipe = MultiStagePipeline([Source(gen, cfg.quota)], ranker, k, name=name)
            reg = pipeline_regret(pipe, ranker, ev.obs, world)
            off_rows.append(
                {
                    "world": wl,
                    "policy": data.label,
                    "model": name,
                    "seed": seed,
                    "wall_s": t_g.seconds / len(gens),
                    **rr,
                    **reg,
                    "recall@100": m["recall@100"],
                    "norm_leakage@100": m["norm_leakage@100"],
                }
            )
            curves.setdefault(name, []).append([rr[f"rrr@{K}"] for K in (50, 100, 200, 500)])
        # 3. online: the same users for every agent
        best = max(
            (n for n in gens if n != "positives only"),
            key=lambda n: off_rows[-len(gens) + list(gens).index(n)]["rrr@200"],
        )
        env = BatchedRecEnv(min(cfg.online_users, 4096), data.env, world=world)
        agents = {
            "random": RandomAgent(world, k, seed=seed),
            "popular": PopularAgent(data.train_counts, world.catalog.release_time, k),
            f"pipeline K={cfg.quota}, positives only": MultiStagePipeline(
                [Source(two_tower_generator(gens["positives only"], data), cfg.quota)], ranker, k
            ),
            f"pipeline K={cfg.quota}, {best}": MultiStagePipeline(
                [Source(two_tower_generator(gens[best], data), cfg.quota)], ranker, k
            ),
            "single-stage (ranker over the catalog)": SingleStageAgent(ranker, k),
            "oracle": OracleAgent(env),
        }
        for name, agent in ctx.progress(list(agents.items()), desc=f"seed {seed} online"):
            res = rollout(env, agent, cfg.online_users, seed=1000 + seed)
            on_rows.append(
                {
                    "world": wl,
                    "policy": "online",
                    "model": name,
                    "seed": seed,
                    "wall_s": res.seconds,
                    **{
                        key: res.outcomes[key]
                        for key in ("reward", "clicks", "watch_minutes", "slates", "returned")
                    },
                }
            )
        # 4. imperfect ranker: lambda sweep
        noisy = NoisyRanker(
            ranker,
            cfg.noise_sigma * score_scale(ranker, take_obs(ev.obs, np.arange(min(200, len(ev))))),
            seed=seed,
        )
        n_targets = teacher_targets(
            noisy,
            queries,
            world.catalog.release_time,
            DistillConfig(max_queries=cfg.teacher_queries),
            ctx.rng(seed, "noisy-teacher"),
        )
        for lam in ctx.progress(cfg.sweep, desc=f"seed {seed} lambda sweep"):
            if lam == 0.0:
                model = gens["positives only"]
            else:
                model = _train_distilled(
                    data, n_targets, DistillConfig(loss="kl", weight=lam), tcfg
                )
            gen = two_tower_generator(model, data)
            res = rollout(
                env,
                MultiStagePipeline([Source(gen, cfg.quota)], noisy, k),
                cfg.online_users,
                seed=2000 + seed,
            )
            sweep_rows.append(
                {
                    "world": wl,
                    "policy": f"noisy ranker sigma={cfg.noise_sigma:g}",
                    "model": f"lambda={lam:g}",
                    "seed": seed,
                    "wall_s": res.seconds,
                    "reward": res.outcomes["reward"],
                }
            )

    rep = ctx.report
    ctx.report.section(
        "Setup",
        "The ranker (DCN-v2 over user, item and cross features, click head) is trained on the training period's "
        "impressions. "
        "R_k is its top-10 over the whole released catalog for the held-out users. Generators: the default two-tower "
        "recipe (ID items, mean pooling, cosine with learnable temperature, in-batch + uniform negatives, logQ3) "
        "trained on positives only, or distilled toward the ranker's choices on its top-"
        f"{DistillConfig().pool_size - DistillConfig().uniform_extra} + {DistillConfig().uniform_extra} uniform items per training request "
        "with L = (1 - lambda) L_true + lambda L_distill. Regret columns: served slate vs the single-stage slate "
        f"(pipeline with K={cfg.quota}); true affinity is the world's ground truth, used for evaluation only.",
    )
    off = rep.seed_table(
        "Consistency with the ranker (offline, held-out users)", off_rows,
        ["rrr@50", "rrr@100", "rrr@200", "rrr@500", "wrrr@200", "score_ratio", "affinity_ratio", "served_in_single_stage", "recall@100", "norm_leakage@100"],
        fmt=".3f",
    )  # fmt: skip
    on = rep.seed_table(
        "Online: whole user lifetimes in BatchedRecEnv (same users for every agent)", on_rows, [],
        online=["reward", "clicks", "watch_minutes", "slates", "returned"], fmt=".3f",
    )  # fmt: skip
    sw = rep.seed_table(
        "Imperfect ranker: online reward against the distillation weight lambda",
        sweep_rows,
        [],
        online=["reward"],
        fmt=".3f",
    )
    rep.add_result("offline_rows", off_rows)
    rep.add_result("sweep_lambdas", list(cfg.sweep))
    by_off = {r["model"]: r for r in off}
    by_on = {r["model"]: r for r in on}
    distilled = [n for n in by_off if n != "positives only"]
    best = max(distilled, key=lambda n: by_off[n]["rrr@200"].mean)
    rep.claim_compare(
        "Distillation raises RRR@200,10 over the generator trained on positives only",
        by_off[best]["rrr@200"],
        ">",
        by_off["positives only"]["rrr@200"],
        measured_name=best,
        reference_name="positives only",
    )
    pipe_best = next(n for n in by_on if n.startswith("pipeline") and "distilled" in n)
    pipe_base = next(n for n in by_on if n.startswith("pipeline") and "positives only" in n)
    single = "single-stage (ranker over the catalog)"
    rep.claim_compare(
        "... and the pipeline's online reward with it",
        by_on[pipe_best]["reward"],
        ">",
        by_on[pipe_base]["reward"],
        measured_name=pipe_best,
        reference_name=pipe_base,
    )
    ratio = by_on[pipe_best]["reward"].mean / by_on[single]["reward"].mean
    rep.claim(
        f"The distilled pipeline at K={cfg.quota} earns at least 90% of the single-stage agent's online reward",
        bool(ratio >= 0.9),
        f"ratio = {ratio:.3f} ({by_on[pipe_best]['reward'].mean:.3f} / {by_on[single]['reward'].mean:.3f})",
    )
    rep.claim_compare(
        "The single-stage agent earns less than the oracle",
        by_on[single]["reward"],
        "<",
        by_on["oracle"]["reward"],
        measured_name="single-stage",
        reference_name="oracle",
    )
    sweep = {r["model"]: r["reward"].mean for r in sw}
    best_lam = max(sweep, key=sweep.get)
    rep.claim(
        "With an imperfect ranker, full imitation (lambda = 1) is not the best end-to-end",
        bool(sweep["lambda=1"] < max(v for name, v in sweep.items() if name != "lambda=1")),
        "online reward by lambda: "
        + ", ".join(f"{n}: {v:.3f}" for n, v in sweep.items())
        + f"; best {best_lam}",
    )
    fig = Figure(figsize=(9, 3.6))
    ax = fig.add_subplot(1, 2, 1)
    for name, rows in curves.items():
        ax.plot([50, 100, 200, 500], np.mean(rows, axis=0), "o-", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("K (candidates)")
    ax.set_ylabel("RRR@K,10")
    ax.legend(fontsize=6)
    ax2 = fig.add_subplot(1, 2, 2)
    lams = [float(n.split("=")[1]) for n in sweep]
    ax2.plot(lams, list(sweep.values()), "o-")
    ax2.set_xlabel("lambda (weight of the distillation loss)")
    ax2.set_ylabel("online reward per user")
    ax2.set_title(f"imperfect ranker (sigma={cfg.noise_sigma:g})", fontsize=8)
    fig.tight_layout()
    rep.figure(
        "rrr_and_sweep",
        fig,
        "Left: recall relative to the ranker against K. Right: online reward against lambda with an imperfect ranker.",
    )
    rep.headline(
        f"RRR@200,10: positives only {by_off['positives only']['rrr@200'].mean:.3f} -> {best} {by_off[best]['rrr@200'].mean:.3f}; "
        f"online reward {by_on[pipe_base]['reward'].mean:.2f} -> {by_on[pipe_best]['reward'].mean:.2f} "
        f"(single-stage {by_on[single]['reward'].mean:.2f}, oracle {by_on['oracle']['reward'].mean:.2f})"
    )
