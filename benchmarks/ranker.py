"""ranker: why the learned agents reach a fraction of the oracle, factor by factor (issue 10 §1).

The single-stage agent (the ranker over the whole released catalog) is the upper bound of every
pipeline with the same ranker, so whatever holds it back holds back every learned agent. Each
factor below changes one thing of the current recipe (:data:`benchmarks.recipes.CURRENT`) and
measures the single-stage agent's online reward on the same test users (common random numbers:
the simulator's draws are a function of the user, so the comparison is paired per user):

(a) data volume: 1, 3 (current) and 10 logged episodes per user, the same training compute;
(b) exposure: the popularity-policy log vs an in-group uniform exploration log, a log with
    epsilon = 0.5 uniform exploration, the current agent's own closed-loop log appended, and
    16 uniformly drawn released catalog items appended to each training slate as "not
    clicked" examples (``catalog_negatives``);
(c) position bias in the labels: position as a training-time feature served at the top, or
    clicks weighted by the inverse of their position's examination probability;
(d) what the ranker predicts: the click, or the expected reward of the env's reward mix
    (click + like - dislike) from a multi-head ranker;
(e) capacity and features: the crosses removed (all, the item's own, the attribute ones) and
    a wider pair network;
(f) train/serve skew: served with the user's logged history (the observation a training
    request of the user has) instead of the episode's own history only.

Choices are made on validation users (a separate seeded sample); verdicts on test users.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from agents.base import ExpectedRewardOracle, GreedyUtilityOracle
from agents.pipeline import SingleStageAgent
from agents.probe import UtilityProbe
from agents.rollout import rollout
from benchmarks.common import (
    env_config,
    world_label,
)
from benchmarks.recipes import (
    CURRENT,
    IMPROVED,
    RankerRecipe,
    profile_recipe,
    recipe_data,
    recipe_ranker,
    serve,
    train_recipe_ranker,
)
from benchmarks.registry import ExperimentConfig, experiment, param
from benchmarks.runner import RunContext
from benchmarks.stats import paired_effect_over_seeds
from simenv import BatchedRecEnv
from simenv.types import Columns


@dataclass(frozen=True)
class Variant:
    """One line of the diagnosis: a factor, a change of the recipe, the claimed direction."""

    name: str
    factor: str
    recipe: RankerRecipe
    direction: str = ">"  # the hypothesis: the change raises (">") or lowers ("<") the reward
    against: str = "current recipe"  # the variant it is compared with (paired)


FACTORS = {
    "a": "(a) data volume",
    "b": "(b) exposure",
    "c": "(c) position bias",
    "d": "(d) target",
    "e": "(e) capacity and features",
    "f": "(f) train/serve skew",
}


def variants(volumes: tuple[float, ...]) -> list[Variant]:
    """Every diagnosis variant, the current recipe first."""
    c = CURRENT
    out = [Variant("current recipe", "-", c)]
    for v in volumes:
        out.append(
            Variant(f"{v:g} logged episodes per user", FACTORS["a"], c.replace(episodes_per_user=v))
        )
    out += [
        Variant("log: uniform in group", FACTORS["b"], c.replace(policy="in-group-uniform")),
        Variant("log: popularity with epsilon 0.5", FACTORS["b"], c.replace(epsilon=0.5)),
        Variant("log: + own closed-loop log", FACTORS["b"], c.replace(own_log_rounds=1)),
        Variant("catalog negatives (16 per slate)", FACTORS["b"], c.replace(catalog_negatives=16)),
        Variant("position as a feature", FACTORS["c"], c.replace(position="feature")),
        Variant("inverse examination weights", FACTORS["c"], c.replace(position="ipw")),
        Variant(
            "expected reward (click + like - dislike heads)",
            FACTORS["d"],
            c.replace(heads=("click", "like", "dislike")),
        ),
        Variant("no crosses", FACTORS["e"], c.replace(cross_features=()), "<"),
        Variant(
            "no item cross",
            FACTORS["e"],
            c.replace(cross_features=tuple(x for x in c.cross_features if x != "item")),
            "<",
        ),
        Variant(
            "no attribute crosses",
            FACTORS["e"],
            c.replace(cross_features=tuple(x for x in c.cross_features if x in ("item", "age"))),
            "<",
        ),
        Variant("wider pair network", FACTORS["e"], c.replace(hidden=64, mlp=(64, 64))),
        Variant("served with the user's logged history", FACTORS["f"], c.replace(memory=True)),
    ]
    return out


IMPROVED_NAME = "improved recipe"


def improved_variants() -> list[Variant]:
    """Changes of the improved recipe, each compared with the improved recipe (not the current)."""
    i = IMPROVED
    return [
        Variant(
            "improved + a second self-logging round",
            FACTORS["b"],
            i.replace(own_log_rounds=i.own_log_rounds + 1),
            against=IMPROVED_NAME,
        ),
        Variant(
            "improved with 4x the training budget",  # 2x epochs, 2x slates per epoch (--quick caps slates)
            FACTORS["e"],
            i.replace(
                epochs=2 * i.epochs, max_slates_per_epoch=2 * (i.max_slates_per_epoch or 100_000)
            ),
            against=IMPROVED_NAME,
        ),
        Variant(
            "improved + 1 own-log episode per user per round",
            FACTORS["b"],
            i.replace(own_log_episodes=2 * i.own_log_episodes),
            against=IMPROVED_NAME,
        ),
    ]


#: One variant per factor (the strongest of each in the 16-variant run of e5d4f54), in both
#: profiles; the other variants run with ``--set variants=...`` (names as in the table).
QUICK_VARIANTS = (
    "1 logged episodes per user",
    "log: + own closed-loop log",
    "catalog negatives (16 per slate)",
    "position as a feature",
    "expected reward (click + like - dislike heads)",
    "no crosses",
    "served with the user's logged history",
)


@dataclass(frozen=True)
class RankerExperimentConfig(ExperimentConfig):
    """Diagnosis of the single-stage ranker's online reward, factor by factor."""

    max_slates_per_epoch: int | None = param(
        None,
        "slates drawn per epoch by every variant (none: the recipes' own, fewer under --quick)",
    )
    volumes: tuple[float, ...] = param(
        (1.0, 10.0), "episodes per user of the data-volume factor (current: 3)"
    )
    variants: tuple[str, ...] = param(
        QUICK_VARIANTS, "run only these variants (names as in the table; empty: all)"
    )
    valid_users: int = param(80, "validation users per rollout (choices)")
    test_users: int = param(200, "test users per rollout (verdicts)")
    generator_epochs: int | None = param(
        None, "epochs of the self-logging agent's generator (none: the recipe's)"
    )
    min_effect: float = param(0.05, "smallest relative effect a factor's finding counts")
    log_scale: float = param(1.0, "multiplies every log's episodes per user (smoke tests use less)")

    def __post_init__(self) -> None:
        m = self.max_slates_per_epoch
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_slates_per_epoch must be None or an integer >= 1, got {m!r}")
        for name in ("valid_users", "test_users", "generator_epochs"):
            v = getattr(self, name)
            if v is None and name == "generator_epochs":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if any(not v > 0 for v in self.volumes):
            raise ValueError(f"volumes must be > 0 episodes per user, got {self.volumes}")
        if not self.log_scale > 0:
            raise ValueError(f"log_scale must be > 0, got {self.log_scale}")
        if not 0.0 <= self.min_effect:
            raise ValueError(f"min_effect must be >= 0, got {self.min_effect}")
        names = [v.name for v in variants(self.volumes) + improved_variants()]
        unknown = [v for v in self.variants if v not in names]
        if unknown:
            raise ValueError(f"variants {unknown} are not available; choose among {names}")

    @classmethod
    def quick(cls) -> RankerExperimentConfig:
        return replace(cls(), valid_users=150, test_users=250)


def _users(
    world: Any, n_valid: int, n_test: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint seeded samples of the world's users (validation, test)."""
    n = world.n_users
    pick = rng.choice(n, size=min(n, n_valid + n_test), replace=False)
    n_valid = min(n_valid, pick.size // 2)
    return np.sort(pick[:n_valid]), np.sort(pick[n_valid:])


@experiment(
    "ranker",
    "Why the learned single-stage ranker earns a fraction of the oracle: data volume, exposure, position bias, target, crosses, train/serve skew; paired over users.",
    RankerExperimentConfig,
)
def run(cfg: RankerExperimentConfig, ctx: RunContext) -> None:
    todo = [
        v
        for v in variants(cfg.volumes)
        if not cfg.variants or v.name in cfg.variants or v.name == "current recipe"
    ]
    todo.append(Variant(IMPROVED_NAME, "chosen", IMPROVED))
    todo += [v for v in improved_variants() if v.name in cfg.variants]
    # the profile's budget, then the overrides (smoke tests); with none, the current and the
    # improved rankers are the ones the consistency and loop experiments share (recipe_ranker)
    shared = (
        cfg.log_scale == 1.0 and cfg.max_slates_per_epoch is None and cfg.generator_epochs is None
    )

    def adjust(r: RankerRecipe) -> RankerRecipe:
        r = profile_recipe(r, ctx.quick)
        if cfg.max_slates_per_epoch is not None:
            r = r.replace(max_slates_per_epoch=cfg.max_slates_per_epoch)
        if cfg.generator_epochs is not None:
            r = r.replace(generator_epochs=cfg.generator_epochs)
        return r.replace(
            episodes_per_user=r.episodes_per_user * cfg.log_scale,
            own_log_episodes=r.own_log_episodes * cfg.log_scale,
        )

    todo = [replace(v, recipe=adjust(v.recipe)) for v in todo]
    current = todo[0].recipe
    rows: list[dict[str, Any]] = []
    test: dict[str, list[np.ndarray]] = {}
    valid: dict[str, list[float]] = {}
    oracle_test: list[np.ndarray] = []
    ref_rows: list[dict[str, Any]] = []
    probe_rows: list[dict[str, Any]] = []
    for seed in ctx.seeds:
        base = recipe_data(ctx.quick, seed, current)
        world, k = base.world, base.env.slate_size
        wl = world_label(env_config(ctx.quick), seed)
        users_v, users_t = _users(
            world, cfg.valid_users, cfg.test_users, ctx.rng(seed, "ranker-users")
        )
        env = BatchedRecEnv(min(4096, max(users_v.size, users_t.size)), base.env, world=world)
        seed_v, seed_t = ctx.seed_int(seed, "valid-rollout"), ctx.seed_int(seed, "test-rollout")
        base_exposure = _exposure(base)
        for oracle in (GreedyUtilityOracle(env), ExpectedRewardOracle(env)):
            probe = UtilityProbe(oracle, env, base_exposure)
            res = rollout(env, probe, users_t.size, seed=seed_t, users=users_t)
            probe_rows.append(_probe_row(wl, "reads the truth", oracle.name, seed, probe))
            if oracle.name == GreedyUtilityOracle.name:
                oracle_test.append(res.outcomes["reward"])
            ref_rows.append(
                {
                    "world": wl,
                    "policy": "reads the truth",
                    "model": oracle.name,
                    "seed": seed,
                    "wall_s": res.seconds,
                    **{key: res.outcomes[key] for key in ("reward", "slates", "likes")},
                }
            )
        for var in ctx.progress(todo, desc=f"seed {seed} variants"):
            keep = shared and var.name in ("current recipe", IMPROVED_NAME)
            with ctx.timer("train") as t_train:
                if var.recipe.log_key == current.log_key and not var.recipe.own_log_rounds:
                    data = base
                else:  # one-off logs are not kept in memory, except the shared recipes'
                    data = recipe_data(ctx.quick, seed, var.recipe, cache=keep)
                if keep:
                    ranker, hist, _ = recipe_ranker(ctx.quick, seed, var.recipe, ctx.threads)
                else:
                    ranker, hist = train_recipe_ranker(data, var.recipe, seed, ctx.threads)
            agent = serve(SingleStageAgent(ranker, k), var.recipe, data)
            with ctx.timer("rollout") as t_roll:
                r_v = rollout(env, agent, users_v.size, seed=seed_v, users=users_v)
                probe = UtilityProbe(agent, env, _exposure(data)) if var.name in PROBED else None
                r_t = rollout(env, probe or agent, users_t.size, seed=seed_t, users=users_t)
            probe_s = 0.0 if probe is None else probe.seconds  # measuring is not serving
            if probe is not None:
                probe_rows.append(_probe_row(wl, data.label, var.name, seed, probe))
            valid.setdefault(var.name, []).append(float(r_v.outcomes["reward"].mean()))
            test.setdefault(var.name, []).append(r_t.outcomes["reward"])
            rows.append({
                "world": wl, "policy": data.label, "model": var.name, "factor": var.factor, "seed": seed,
                "wall_s": t_train.seconds + t_roll.seconds - probe_s, "train_s": t_train.seconds,
                "rollout_s": t_roll.seconds - probe_s,
                "valid_auc": hist.valid_auc[hist.best_epoch] if hist.valid_auc else float("nan"),
                "valid_reward": float(r_v.outcomes["reward"].mean()),
                "reward": r_t.outcomes["reward"], "slates": r_t.outcomes["slates"], "likes": r_t.outcomes["likes"],
            })  # fmt: skip
            ctx.log(
                f"seed {seed} {var.name}: valid {valid[var.name][-1]:.2f}, test {r_t.outcomes['reward'].mean():.2f} "
                f"(train {t_train.seconds:.0f} s, rollouts {t_roll.seconds - probe_s:.0f} s)"
            )
            del data
    _report(cfg, ctx, todo, rows, ref_rows, test, valid, oracle_test, probe_rows)


#: Variants whose test rollouts are probed against the truth (:class:`agents.probe.UtilityProbe`).
PROBED = ("current recipe", IMPROVED_NAME, *(v.name for v in improved_variants()))


def _exposure(data: Any) -> np.ndarray:
    """Impressions per item in the training log the variant's ranker learned from."""
    return np.bincount(data.train[Columns.ITEM], minlength=data.world.n_items).astype(np.float64)


def _probe_row(world: str, policy: str, model: str, seed: int, probe: UtilityProbe) -> dict:
    return {"world": world, "policy": policy, "model": model, "seed": seed, "wall_s": 0.0,
            **{k: v for k, v in probe.summary().items() if k not in ("rows", "unmatched")}}  # fmt: skip


def _report(cfg, ctx, todo, rows, ref_rows, test, valid, oracle_test, probe_rows) -> None:
    rep = ctx.report
    current = todo[0].recipe
    rep.section(
        "Setup",
        "One ranker per variant, each a single change of the current recipe (click head, popularity-policy log "
        f"with epsilon {CURRENT.epsilon:g} and {CURRENT.episodes_per_user:g} episodes per user, {CURRENT.epochs} epochs of at most "
        f"{current.max_slates_per_epoch:,} slates, served on the episode's own history), served as the single-stage agent "
        "(its top-10 over the whole released catalog) to the same users. The simulator's draws are a function of "
        "(user, episode, step): every agent meets the same users with the same random streams, so effects are "
        "paired per user; with several seeds, the interval is a t interval over the per-seed paired effects. "
        f"Choices use {cfg.valid_users} validation users, verdicts {cfg.test_users} other test users. "
        f"The improved recipe: log {IMPROVED.policy} (epsilon {IMPROVED.epsilon:g}, {IMPROVED.episodes_per_user:g} episodes per user), "
        f"heads {', '.join(IMPROVED.heads)}, position {IMPROVED.position}, memory {'on' if IMPROVED.memory else 'off'}, "
        f"{IMPROVED.own_log_rounds} round(s) of self-logging ({IMPROVED.own_log_episodes:g} episodes per user, epsilon "
        f"{IMPROVED.own_log_epsilon:g}), {IMPROVED.catalog_negatives} catalog negatives per training slate.",
    )
    table = rep.seed_table(
        "Single-stage reward by variant (test users)", rows, ["valid_reward", "valid_auc", "train_s", "rollout_s"],
        online=["reward", "slates", "likes"], by=("world", "policy", "model"), fmt=".3f",
    )  # fmt: skip
    del table
    rep.seed_table(
        "References: the oracles (test users; they read the truth)", ref_rows, [],
        online=["reward", "slates", "likes"], fmt=".3f",
    )  # fmt: skip
    rep.seed_table(
        "Where the served items sit in the user's true utility (test users; probed)", probe_rows,
        ["percentile", "oracle_overlap", "in_group", "oracle_never_shown", "served_never_shown",
         "oracle_log_impressions", "served_log_impressions", "reachable_items"], fmt=".3f",
        note="Every step of the test rollouts, against the simulator's truth for that user at that moment "
        "(agents.probe.UtilityProbe; the probe reads the state and changes nothing): percentile = share of the "
        "user's reachable released items with lower true click utility than a served item (1 = the top); "
        "oracle_overlap = share of the slate among the greedy-utility oracle's top-10; in_group = share in the "
        "user's group; *_never_shown = share of the oracle's top-10 / of the served items with no impression in "
        "the training log the ranker learned from; *_log_impressions = mean log(1 + impressions); "
        "reachable_items = released items of finite utility per user.",
    )  # fmt: skip
    eff_rows = []
    findings = []
    for var in todo:
        if var.name == "current recipe":
            continue
        eff = paired_effect_over_seeds(test[var.name], test[var.against], relative=True)
        text = (
            f"{var.factor}: {var.name} {'raises' if var.direction == '>' else 'lowers'} the single-stage "
            f"reward by at least {100 * cfg.min_effect:g}%"
        )
        if var.against != "current recipe":
            text += f" over the {var.against}"
        if var.name == IMPROVED_NAME:
            text = "The improved recipe raises the single-stage reward by at least 50%"
        f = rep.finding(
            text, eff, metric=f"single-stage reward per user, test users (relative to the {var.against})",
            direction=var.direction, min_effect=0.5 if var.name == IMPROVED_NAME else cfg.min_effect,
        )  # fmt: skip
        findings.append(f)
        eff_rows.append({
            "factor": var.factor, "variant": var.name,
            "valid reward": float(np.mean(valid[var.name])),
            "test reward": float(np.mean([x.mean() for x in test[var.name]])),
            "against": var.against, "effect": eff.format(".3g"), "verdict": f.verdict,
        })  # fmt: skip
    rep.table(
        "Diagnosis: each factor's paired effect on the single-stage reward (test users)", eff_rows,
        fmt={"valid reward": ".2f", "test reward": ".2f"},
        note="Effect: relative change of the mean reward per user against the variant named in 'against', 95% interval "
        "(paired over users; over seeds when several). Valid reward: mean over seeds on the validation users.",
    )  # fmt: skip
    # choices on validation: the best variant of each factor, and whether it beats the current recipe
    choice_rows = []
    for code, factor in FACTORS.items():
        del code
        cands = [v.name for v in todo if v.factor == factor and v.against == "current recipe"]
        if not cands:
            continue
        best = max(cands, key=lambda n: np.mean(valid[n]))
        gain = np.mean(valid[best]) - np.mean(valid["current recipe"])
        choice_rows.append(
            {
                "factor": factor,
                "best on validation": best,
                "valid gain": float(gain),
                "chosen": bool(gain > 0),
            }
        )
    if choice_rows:  # none when only variants of the improved recipe ran
        rep.table("Validation choice per factor", choice_rows, fmt={"valid gain": "+.2f"})
    ranked = sorted(
        (r for r in eff_rows if r["variant"] != IMPROVED_NAME),
        key=lambda r: -r["test reward"],
    )
    rep.section(
        "Reading the diagnosis",
        "Variants by test reward (current recipe "
        f"{np.mean([x.mean() for x in test['current recipe']]):.2f}): "
        + "; ".join(f"{r['variant']} {r['test reward']:.2f} ({r['verdict']})" for r in ranked)
        + ".\n\nTwo mechanisms are specific to how the data is made. (1) Train/serve skew: training "
        "observations are rebuilt from the log keyed by user, so a training request sees the user's events from "
        "every episode of that user in the log (several episodes per user are logged), while an online episode "
        "starts with an empty history; the history crosses (topic, creator, group engagement) then describe "
        "users the ranker never meets online. Fewer logged episodes per user or serving with the user's logged "
        "history (the observation training used) both remove the skew. (2) Exposure: a behaviour log shows "
        "items in proportions unrelated to what the ranker will pick; the agent's own epsilon-greedy log shows "
        "what a personalised agent shows (repeated topics, fatigue, dislikes), which the ranker then learns to "
        "avoid.",
    )
    imp = test[IMPROVED_NAME]
    share = [i.mean() / o.mean() for i, o in zip(imp, oracle_test, strict=True)]
    eff = paired_effect_over_seeds(imp, [0.5 * o for o in oracle_test])
    rep.finding(
        "The improved single-stage agent earns at least half of the greedy-utility oracle's reward",
        eff, metric="reward per user minus half the oracle's (test users)", direction=">",
    )  # fmt: skip
    cur = test["current recipe"]
    rep.sanity(
        "The greedy-utility oracle earns more than the current single-stage agent",
        bool(np.mean([o.mean() for o in oracle_test]) > np.mean([c.mean() for c in cur])),
        f"oracle {np.mean([o.mean() for o in oracle_test]):.2f}, current {np.mean([c.mean() for c in cur]):.2f}",
    )
    rep.add_result(
        "oracle_share",
        {
            "improved": share,
            "current": [c.mean() / o.mean() for c, o in zip(cur, oracle_test, strict=True)],
        },
    )
    # figure: relative effects with intervals
    fig = Figure(figsize=(7.5, 0.35 * len(eff_rows) + 1.2))
    ax = fig.add_subplot()
    ys = np.arange(len(eff_rows))[::-1]
    for y, var in zip(ys, [v for v in todo if v.name != "current recipe"], strict=True):
        e = paired_effect_over_seeds(test[var.name], test[var.against], relative=True)
        lo = e.low if e.low is not None else e.estimate
        hi = e.high if e.high is not None else e.estimate
        ax.plot([100 * lo, 100 * hi], [y, y], "-", color="tab:blue")
        ax.plot([100 * e.estimate], [y], "o", color="tab:blue")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels(
        [
            f"{r['factor'].split(')')[0]}) {r['variant']}"
            + ("" if r["against"] == "current recipe" else " (vs improved)")
            for r in eff_rows
        ],
        fontsize=7,
    )
    ax.set_xlabel(
        "change of the single-stage reward vs the current recipe (%; 'vs improved': vs the improved)"
    )
    fig.tight_layout()
    rep.figure(
        "diagnosis",
        fig,
        "Each factor's paired effect on the single-stage reward, with 95% intervals.",
    )
    rep.headline(
        f"single-stage reward: current recipe {np.mean([c.mean() for c in cur]):.2f} -> improved "
        f"{np.mean([i.mean() for i in imp]):.2f} ({100 * np.mean(share):.0f}% of the greedy oracle's "
        f"{np.mean([o.mean() for o in oracle_test]):.2f})"
    )
