"""loop: the recommender learning from its own feedback (the lecture's "ideal" third property).

Starting from uniformly random slates, rounds of act -> log -> retrain (ranker and generator,
warm-started). Compared: the default loop (epsilon-greedy exploration, generator trained on
positives and distilled toward the ranker, in-batch + uniform negatives) and a loop without
exploration whose generator sees only in-batch negatives from its own slates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from matplotlib.figure import Figure

from agents.loop import LoopConfig, closed_loop
from benchmarks.common import env_config, get_world, world_label
from benchmarks.registry import ExperimentConfig, experiment, param
from benchmarks.runner import RunContext
from simenv import BatchedRecEnv


@dataclass(frozen=True)
class LoopExperimentConfig(ExperimentConfig):
    """Closed-loop rounds with and without exploration."""

    rounds: int = param(4, "retrain-and-act rounds after the random start")
    users_per_round: int = param(2_000, "user episodes per round")
    quota: int = param(200, "K candidates from the generator")
    epsilon: float = param(0.1, "epsilon-greedy exploration of the default loop")
    ranker_epochs: int = param(2, "ranker epochs per round")
    generator_epochs: int = param(3, "generator epochs per round")
    teacher_queries: int = param(10_000, "requests labelled by the ranker per round")

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 2:
            raise ValueError(
                f"rounds must be an integer >= 2 (the claims compare the last round with round 1), got {self.rounds!r}"
            )
        for name in (
            "users_per_round",
            "quota",
            "ranker_epochs",
            "generator_epochs",
            "teacher_queries",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")

    @classmethod
    def quick(cls) -> LoopExperimentConfig:
        return replace(
            cls(),
            rounds=3,
            users_per_round=400,
            ranker_epochs=1,
            generator_epochs=2,
            teacher_queries=2_000,
        )


@experiment(
    "loop",
    "Closed loop from a random-logging start: reward, popularity concentration and folding per round, with and without exploration.",
    LoopExperimentConfig,
)
def run(cfg: LoopExperimentConfig, ctx: RunContext) -> None:
    variants = {
        "explore (eps), positives + distill, mixed negatives": LoopConfig(
            rounds=cfg.rounds, users_per_round=cfg.users_per_round, quota=cfg.quota, exploration="epsilon",
            epsilon=cfg.epsilon, generator_target="both", uniform_negatives=1024, ranker_epochs=cfg.ranker_epochs,
            generator_epochs=cfg.generator_epochs, teacher_queries=cfg.teacher_queries,
        ),
        "greedy, positives only, in-batch negatives": LoopConfig(
            rounds=cfg.rounds, users_per_round=cfg.users_per_round, quota=cfg.quota, exploration="greedy",
            generator_target="positives", uniform_negatives=0, ranker_epochs=cfg.ranker_epochs,
            generator_epochs=cfg.generator_epochs, teacher_queries=cfg.teacher_queries,
        ),
    }  # fmt: skip
    rows, per_round = [], {}
    for seed in ctx.seeds:
        world = get_world(ctx.quick, seed)
        env_cfg = env_config(ctx.quick)
        env = BatchedRecEnv(min(cfg.users_per_round, 4096), env_cfg, world=world)
        for name, lc in variants.items():
            with ctx.timer("loop") as t:
                rounds = closed_loop(
                    env,
                    lc,
                    seed,
                    threads=ctx.threads,
                    progress=lambda it, desc, label=f"{name} seed {seed}": ctx.progress(
                        it, desc=label
                    ),
                )
            for r in rounds:
                rows.append(
                    {
                        "world": world_label(env_cfg, seed),
                        "policy": name,
                        "model": f"round {r['round']}",
                        "seed": seed,
                        "wall_s": r["train_s"] + r["act_s"],
                        "reward": r["reward"],
                        **{
                            k: r[k]
                            for k in (
                                "clicks",
                                "top1pct_share",
                                "gini",
                                "shown_items",
                                "leakage@100",
                            )
                        },
                    }
                )
                per_round.setdefault(name, {}).setdefault(r["round"], []).append(r["reward_mean"])
            ctx.log(f"{name} seed {seed}: {t.seconds:.0f} s")
    agg = ctx.report.seed_table(
        "Per round (round 0 = uniformly random slates)", rows, ["clicks", "top1pct_share", "gini", "shown_items", "leakage@100"],
        online=["reward"], by=("world", "policy", "model"), fmt=".3f",
    )  # fmt: skip
    by = {(r["policy"], r["model"]): r for r in agg}
    main, greedy = list(variants)
    last = f"round {cfg.rounds}"
    ctx.report.claim_compare(
        "The closed loop improves reward over rounds from a random-logging start (last round vs the random start)",
        by[(main, last)]["reward"],
        ">",
        by[(main, "round 0")]["reward"],
        measured_name=last,
        reference_name="round 0",
    )
    ctx.report.claim_compare(
        "... and keeps improving after the first retrain (last round vs round 1)",
        by[(main, last)]["reward"],
        ">",
        by[(main, "round 1")]["reward"],
        measured_name=last,
        reference_name="round 1",
    )
    ctx.report.claim_compare(
        "Without exploration, what is shown concentrates on popular items (Gini of impressions, last round)",
        by[(greedy, last)]["gini"],
        ">",
        by[(main, last)]["gini"],
        measured_name="greedy",
        reference_name="exploring",
    )
    ctx.report.claim_compare(
        "Without exploration or uniform negatives, the generator folds (leakage@100, last round)",
        by[(greedy, last)]["leakage@100"],
        ">",
        by[(main, last)]["leakage@100"],
        measured_name="greedy, in-batch only",
        reference_name="exploring, mixed",
    )
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.add_subplot()
    for name, rr in per_round.items():
        xs = sorted(rr)
        ax.plot(xs, [sum(rr[x]) / len(rr[x]) for x in xs], "o-", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("online reward per user")
    ax.legend(fontsize=7)
    fig.tight_layout()
    ctx.report.figure(
        "reward_by_round", fig, "Online reward per user by round (round 0: random slates)."
    )
    ctx.report.headline(
        f"reward {by[(main, 'round 0')]['reward'].mean:.2f} (random start) -> {by[(main, last)]['reward'].mean:.2f} after {cfg.rounds} rounds "
        f"with exploration; greedy/in-batch-only loop {by[(greedy, last)]['reward'].mean:.2f}"
    )
