"""loop: the recommender learning from its own feedback (the lecture's "ideal" third property).

Starting from uniformly random slates, rounds of act -> log -> retrain (ranker and generator,
warm-started). Compared, round by round on the same users (paired; the simulator's draws are a
function of the user):

- the greedy loop: no exploration, a click ranker, a generator trained on positives with
  in-batch negatives only (its own slates are its only negatives);
- the improved loop: the improved ranker recipe (heads and serving of
  :data:`benchmarks.recipes.IMPROVED`), the generator trained on positives and distilled toward
  the ranker, epsilon-greedy slates, and an exploration source outside the candidates (uniform
  released items, a small quota), so exploration reaches items the generator never retrieves;
- the improved loop without that exploration source (what the source itself changes).

Per round: reward, concentration of what was shown (Gini of impressions, top-1% share, catalog
coverage) and the generator's leakage@100 (folding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from agents.loop import LoopConfig, closed_loop
from benchmarks.common import env_config, get_world, world_label
from benchmarks.recipes import IMPROVED
from benchmarks.registry import ExperimentConfig, experiment, param
from benchmarks.runner import RunContext
from benchmarks.stats import paired_effect_over_seeds, unpaired_effect
from simenv import BatchedRecEnv

GREEDY = "greedy loop"
IMPROVED_LOOP = "improved loop"
NO_SOURCE = "improved loop, no exploration source"
CONCENTRATION = ("gini", "top1pct_share", "shown_items", "leakage@100")


@dataclass(frozen=True)
class LoopExperimentConfig(ExperimentConfig):
    """Closed-loop rounds: the greedy loop vs the improved loop (with and without the exploration source)."""

    rounds: int = param(3, "retrain-and-act rounds after the random start")
    users_per_round: int = param(1_000, "user episodes per round")
    quota: int = param(200, "K candidates from the generator")
    epsilon: float = param(0.1, "epsilon-greedy exploration of the improved loop")
    explore_quota: int = param(20, "candidates per request from the exploration source")
    explore_kind: str = param("uniform", "exploration source: uniform released items or new ones")
    distill_weight: float = param(0.5, "lambda of the improved loop's generator")
    ranker_epochs: int = param(2, "ranker epochs per round")
    generator_epochs: int = param(3, "generator epochs per round")
    teacher_queries: int = param(6_000, "requests labelled by the ranker per round")

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 2:
            raise ValueError(
                f"rounds must be an integer >= 2 (the findings compare the last round with round 1), got {self.rounds!r}"
            )
        for name in (
            "users_per_round",
            "quota",
            "ranker_epochs",
            "generator_epochs",
            "teacher_queries",
            "explore_quota",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if not 0.0 < self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in (0, 1], got {self.distill_weight}")
        if self.explore_kind not in ("uniform", "new"):
            raise ValueError(f"explore_kind must be 'uniform' or 'new', got {self.explore_kind!r}")

    @classmethod
    def quick(cls) -> LoopExperimentConfig:
        return replace(
            cls(), rounds=3, users_per_round=400, ranker_epochs=1, generator_epochs=2, teacher_queries=2_000,
        )  # fmt: skip

    def variants(self) -> dict[str, LoopConfig]:
        """The three loops compared."""
        common = dict(
            rounds=self.rounds, users_per_round=self.users_per_round, quota=self.quota,
            ranker_epochs=self.ranker_epochs, generator_epochs=self.generator_epochs,
            teacher_queries=self.teacher_queries,
        )  # fmt: skip
        improved = LoopConfig(
            **common, exploration="epsilon", epsilon=self.epsilon, generator_target="both",
            distill_weight=self.distill_weight, uniform_negatives=1024, heads=IMPROVED.heads,
            memory=IMPROVED.memory, explore_quota=self.explore_quota, explore_kind=self.explore_kind,
            catalog_negatives=IMPROVED.catalog_negatives,
        )  # fmt: skip
        return {
            GREEDY: LoopConfig(
                **common, exploration="greedy", generator_target="positives", uniform_negatives=0
            ),
            IMPROVED_LOOP: improved,
            NO_SOURCE: replace(improved, explore_quota=0),
        }


@experiment(
    "loop",
    "Closed loop from a random-logging start: reward, popularity concentration and folding per round; the greedy loop vs the improved loop with an exploration source outside the candidates.",
    LoopExperimentConfig,
)
def run(cfg: LoopExperimentConfig, ctx: RunContext) -> None:
    variants = cfg.variants()
    rows: list[dict[str, Any]] = []
    per: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for seed in ctx.seeds:
        world = get_world(ctx.quick, seed)
        env_cfg = env_config(ctx.quick)
        env = BatchedRecEnv(min(cfg.users_per_round, 4096), env_cfg, world=world)
        for name, lc in variants.items():
            with ctx.timer("loop") as t:
                rounds = closed_loop(
                    env, lc, seed, threads=ctx.threads,
                    progress=lambda it, desc, label=f"{name} seed {seed}": ctx.progress(it, desc=label),
                )  # fmt: skip
            for r in rounds:
                rows.append({
                    "world": world_label(env_cfg, seed), "policy": name, "model": f"round {r['round']}",
                    "seed": seed, "wall_s": r["train_s"] + r["act_s"], "reward": r["reward"],
                    **{key: r[key] for key in ("clicks", *CONCENTRATION)},
                })  # fmt: skip
                per.setdefault(name, {}).setdefault(r["round"], []).append(r)
            ctx.log(f"{name} seed {seed}: {t.seconds:.0f} s")
    _report(cfg, ctx, rows, per)


def _report(
    cfg: LoopExperimentConfig, ctx: RunContext, rows: list[dict[str, Any]], per: dict
) -> None:
    rep = ctx.report
    rep.section(
        "Setup",
        f"Each loop starts from {cfg.users_per_round:,} user episodes of uniformly random slates, then for {cfg.rounds} rounds "
        "retrains its ranker and generator on everything logged so far and serves the next users. Round r of every loop "
        "meets the same users with the same random streams, so loops compare paired per user within a round (over seeds: "
        "a t interval over the per-seed effects). Concentration statistics are one number per round and seed: their "
        "interval is over seeds (none with one seed). "
        f"Improved loop: ranker heads {', '.join(IMPROVED.heads)}, served {'with' if IMPROVED.memory else 'without'} the "
        f"user's logged history, {IMPROVED.catalog_negatives} catalog negatives per ranker training slate, generator = positives + KL distillation (lambda {cfg.distill_weight:g}), epsilon-greedy slates "
        f"(epsilon {cfg.epsilon:g}) over the generator's {cfg.quota} candidates plus {cfg.explore_quota} from an exploration "
        f"source ({cfg.explore_kind} released items).",
    )
    agg = rep.seed_table(
        "Per round (round 0 = uniformly random slates)", rows, ["clicks", *CONCENTRATION],
        online=["reward"], by=("world", "policy", "model"), fmt=".3f",
    )  # fmt: skip
    del agg
    last = cfg.rounds
    eff_rows = []
    for r in range(1, last + 1):
        for name in (IMPROVED_LOOP, NO_SOURCE):
            e = paired_effect_over_seeds(
                [x["reward"] for x in per[name][r]],
                [x["reward"] for x in per[GREEDY][r]],
                relative=True,
            )
            conc = {
                f"{key} (vs greedy)": f"{np.mean([x[key] for x in per[name][r]]):.3f} vs {np.mean([x[key] for x in per[GREEDY][r]]):.3f}"
                for key in ("gini", "top1pct_share", "shown_items")
            }
            eff_rows.append({"round": r, "loop": name, "reward vs greedy": e.format(".3g"), **conc})
    rep.table("Paired against the greedy loop, round by round", eff_rows)

    def over_seeds(name: str, ref: str, key: str, r: int = last, relative: bool = False):
        return paired_effect_over_seeds(
            [[x[key]] for x in per[name][r]],
            [[x[key]] for x in per[ref][r]],
            relative=relative,
            unit="rounds",
        )

    rep.finding(
        "The improved loop earns more reward than the greedy loop in the last round",
        paired_effect_over_seeds([x["reward"] for x in per[IMPROVED_LOOP][last]], [x["reward"] for x in per[GREEDY][last]], relative=True),
        metric=f"reward per user, round {last} (relative)", direction=">",
    )  # fmt: skip
    rep.finding(
        "The improved loop keeps improving after its first retrain (last round vs round 1; different users, unpaired)",
        _unpaired_over_seeds(per, IMPROVED_LOOP, last, 1), metric="reward per user (relative)", direction=">",
    )  # fmt: skip
    rep.finding(
        "The closed loop improves on its random start (improved loop, last round vs round 0; unpaired)",
        _unpaired_over_seeds(per, IMPROVED_LOOP, last, 0), metric="reward per user (relative)", direction=">",
    )  # fmt: skip
    rep.finding(
        "What the improved loop shows is less concentrated than the greedy loop's (Gini of impressions, last round)",
        over_seeds(IMPROVED_LOOP, GREEDY, "gini"), metric="Gini of impressions over items", direction="<",
    )  # fmt: skip
    rep.finding(
        "The exploration source lowers concentration (Gini, last round: improved loop with vs without the source)",
        over_seeds(IMPROVED_LOOP, NO_SOURCE, "gini"), metric="Gini of impressions over items", direction="<",
    )  # fmt: skip
    rep.finding(
        "The exploration source raises catalog coverage (share of items shown, last round)",
        over_seeds(IMPROVED_LOOP, NO_SOURCE, "shown_items"), metric="share of the catalog shown", direction=">",
    )  # fmt: skip
    rep.finding(
        "The exploration source costs at most 5% of the improved loop's reward (last round)",
        paired_effect_over_seeds([x["reward"] for x in per[IMPROVED_LOOP][last]], [0.95 * x["reward"] for x in per[NO_SOURCE][last]]),
        metric="reward per user minus 95% of the loop without the source", direction=">",
    )  # fmt: skip
    rep.finding(
        "Without exploration or uniform negatives, the generator folds (leakage@100, last round: greedy above improved)",
        over_seeds(GREEDY, IMPROVED_LOOP, "leakage@100"), metric="leakage@100 (share of other-group items)", direction=">",
    )  # fmt: skip
    rep.sanity(
        "Round 0 is the same uniformly random start for every loop (same reward per user)",
        bool(all(np.array_equal(a["reward"], b["reward"]) for a, b in zip(per[GREEDY][0], per[IMPROVED_LOOP][0], strict=True))),
        "round-0 rewards of the greedy and the improved loop compared user by user",
    )  # fmt: skip
    fig = Figure(figsize=(10, 3.4))
    for i, (key, label) in enumerate(
        (
            ("reward_mean", "online reward per user"),
            ("gini", "Gini of impressions"),
            ("shown_items", "share of the catalog shown"),
        )
    ):
        ax = fig.add_subplot(1, 3, i + 1)
        for name, rr in per.items():
            xs = sorted(rr)
            ax.plot(xs, [np.mean([x[key] for x in rr[r]]) for r in xs], "o-", label=name)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        if i == 0:
            ax.legend(fontsize=6)
    fig.tight_layout()
    rep.figure(
        "loop_rounds", fig, "Reward, concentration and coverage by round (round 0: random slates)."
    )
    m = {n: np.mean([x["reward_mean"] for x in per[n][last]]) for n in per}
    g = {n: np.mean([x["gini"] for x in per[n][last]]) for n in per}
    rep.headline(
        f"round {last}: improved loop reward {m[IMPROVED_LOOP]:.2f} (Gini {g[IMPROVED_LOOP]:.3f}) vs greedy loop "
        f"{m[GREEDY]:.2f} (Gini {g[GREEDY]:.3f}); without the exploration source {m[NO_SOURCE]:.2f} (Gini {g[NO_SOURCE]:.3f})"
    )


def _unpaired_over_seeds(per: dict, name: str, r1: int, r0: int):
    """Round r1 vs round r0 of one loop (different users): Welch per seed, t over seeds."""
    from benchmarks.stats import combine_seeds

    return combine_seeds(
        [
            unpaired_effect(a["reward"], b["reward"], relative=True)
            for a, b in zip(per[name][r1], per[name][r0], strict=True)
        ]
    )
