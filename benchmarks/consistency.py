"""consistency: the generator as the ranker's helper (the lecture's chapter 5), end to end.

The lecture: the candidate generator should retrieve what the ranker would pick ("не просто
угадывать позитивные айтемы, а предсказывать что бы выбрал ранкер"); a source the ranker does
not agree with gets ignored. With the improved ranker (:data:`benchmarks.recipes.IMPROVED`):

1. **The thesis.** A two-tower generator trained on positives only vs generators distilled toward
   the ranker (four losses; lambda chosen per loss on validation users), each feeding the ranker
   K in {50, 100, 200, 500} candidates: recall relative to the ranker RRR@K,10 (held-out
   queries) and the pipeline's online reward (test users, paired). References: the
   single-stage agent (the ranker over the whole catalog), the generator alone serving its own
   top-10, and the two oracles.
2. **The regime map.** The gain of distillation (distilled minus positives-only pipeline, both
   served by the same ranker) against ranker quality (the ranker, then the ranker with a fixed
   error per user-item pair of sigma standard deviations of its scores, :class:`NoisyRanker`) x K
   x lambda, each cell with its verdict; and the lecture's three predictions checked.
3. **Multiple sources.** The union of the positives-only two-tower, the distilled two-tower,
   item2item and top popular (quotas configurable) under the ranker: each source's share of the
   ranker's top-10 and of the served slates, the reward lost when each is removed, and whether
   the positives-only source's share falls when the distilled one joins.

Everything chosen (lambda, the distillation loss, the best pipeline) is chosen on validation
users; the verdicts use other, test users.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from agents.base import ExpectedRewardOracle, GreedyUtilityOracle
from agents.consistency import NoisyRanker, score_scale
from agents.distill import DISTILL_LOSSES, DistillConfig, DistillObjective, teacher_targets
from agents.pipeline import MultiStagePipeline, SingleStageAgent, Source
from agents.rollout import rollout
from benchmarks.common import (
    default_two_tower,
    env_config,
    mixed_negatives,
    two_tower_generator,
    world_label,
)
from benchmarks.recipes import IMPROVED, profile_recipe, recipe_data, recipe_ranker, serve
from benchmarks.registry import ExperimentConfig, experiment, param
from benchmarks.runner import RunContext
from benchmarks.stats import paired_effect_over_seeds, verdict
from retrieval.baselines import Item2Item, TopPopular
from retrieval.metrics import mean_over_users, rrr_at_k
from retrieval.model import TwoTowerModel
from retrieval.train import TrainConfig, fit_two_tower
from simenv import BatchedRecEnv
from simenv.clock import released
from simenv.history import impression_examples, take_obs

# KL distillation on per-query standardised ranker scores (independent of the score scale)
KL = dict(standardize_teacher=True, teacher_temperature=0.5)
POS = "positives only"
SOURCES = ("positives-only two-tower", "distilled two-tower", "item2item", "top popular")


@dataclass(frozen=True)
class ConsistencyConfig(ExperimentConfig):
    """Distillation toward the improved ranker: thesis, regime map, multiple sources."""

    epochs: int = param(3, "generator training epochs (early stopping on validation recall)")
    max_examples_per_epoch: int | None = param(
        80_000, "training examples drawn per generator epoch (none: all)"
    )
    batch_size: int = param(1024, "generator batch size")
    ks: tuple[int, ...] = param((50, 100, 200, 500), "K: candidates the generator gives the ranker")
    select_k: int = param(200, "K at which lambda and the loss are chosen (validation users)")
    losses: tuple[str, ...] = param(DISTILL_LOSSES, "distillation losses compared")
    weights: tuple[float, ...] = param(
        (0.5, 1.0), "lambda grid; each loss's lambda is chosen on validation"
    )
    teacher_queries: int = param(10_000, "training requests the ranker labels")
    all_ks_every_loss: bool = param(
        False,
        "test rollouts of every loss at every K (false: every loss at select_k, positives only "
        "and the loss chosen on validation at every K)",
    )
    valid_users: int = param(100, "validation users per rollout (choices)")
    test_users: int = param(200, "test users per rollout (verdicts)")
    noise_levels: tuple[float, ...] = param(
        (2.0,), "regime map: ranker error in standard deviations of its scores (0 = the ranker)"
    )
    map_weights: tuple[float, ...] = param((0.5, 1.0), "regime map: lambda values")
    map_ks: tuple[int, ...] = param((50, 200), "regime map: K values")
    map_loss: str = param("kl", "regime map: the distillation loss")
    quotas: tuple[int, ...] = param(
        (100, 100, 50, 50),
        "multi-source quotas: positives-only two-tower, distilled two-tower, item2item, top popular",
    )
    min_effect: float = param(0.02, "relative effect a thesis finding counts (0.02 = 2%)")
    log_scale: float = param(
        1.0, "multiplies the recipe's episodes per user (smoke tests use less)"
    )
    ranker_slates: int | None = param(
        None, "slates per ranker epoch (none: the recipe's, fewer under --quick)"
    )

    def __post_init__(self) -> None:
        for name in (
            "epochs",
            "batch_size",
            "select_k",
            "teacher_queries",
            "valid_users",
            "test_users",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        m = self.max_examples_per_epoch
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_examples_per_epoch must be None or an integer >= 1, got {m!r}")
        if not self.ks or any(k < 10 for k in self.ks) or list(self.ks) != sorted(set(self.ks)):
            raise ValueError(f"ks must be increasing integers >= 10, got {self.ks}")
        if self.select_k not in self.ks:
            raise ValueError(f"select_k must be one of ks {self.ks}, got {self.select_k}")
        if not self.map_ks or any(k not in self.ks for k in self.map_ks):
            raise ValueError(
                f"map_ks must be a non-empty subset of ks {self.ks}, got {self.map_ks}"
            )
        bad = [x for x in (*self.losses, self.map_loss) if x not in DISTILL_LOSSES]
        if bad or not self.losses:
            raise ValueError(
                f"losses and map_loss must be among {DISTILL_LOSSES}, got {bad or '()'}"
            )
        for name in ("weights", "map_weights"):
            w = getattr(self, name)
            if not w or any(not 0.0 < x <= 1.0 for x in w):
                raise ValueError(f"{name} must be lambdas in (0, 1], got {w}")
        if any(not s > 0 for s in self.noise_levels):
            raise ValueError(
                f"noise_levels must be > 0 (0 is always the ranker itself), got {self.noise_levels}"
            )
        if len(self.quotas) != 4 or any(
            isinstance(q, bool) or not isinstance(q, int) or q < 1 for q in self.quotas
        ):
            raise ValueError(
                f"quotas must be four integers >= 1 ({', '.join(SOURCES)}), got {self.quotas}"
            )
        if not self.min_effect >= 0:
            raise ValueError(f"min_effect must be >= 0, got {self.min_effect}")
        if not self.log_scale > 0:
            raise ValueError(f"log_scale must be > 0, got {self.log_scale}")
        r = self.ranker_slates
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"ranker_slates must be None or an integer >= 1, got {r!r}")

    @classmethod
    def quick(cls) -> ConsistencyConfig:
        return replace(
            cls(), batch_size=512, max_examples_per_epoch=60_000, losses=("softmax", "kl"),
            teacher_queries=3_000, valid_users=150, test_users=250, noise_levels=(2.0,),
        )  # fmt: skip


def _arm(loss: str, lam: float) -> str:
    return f"distilled {loss}, lambda={lam:g}"


class _Seed:
    """Everything one seed trains and evaluates, with its online results cached by name."""

    def __init__(self, cfg: ConsistencyConfig, ctx: RunContext, seed: int) -> None:
        self.cfg, self.ctx, self.seed = cfg, ctx, seed
        rec = profile_recipe(IMPROVED, ctx.quick)
        rec = rec.replace(episodes_per_user=rec.episodes_per_user * cfg.log_scale)
        if cfg.ranker_slates is not None:
            rec = rec.replace(max_slates_per_epoch=cfg.ranker_slates)
        self.recipe = rec
        self.data = data = recipe_data(ctx.quick, seed, self.recipe)
        self.world, self.k = data.world, data.env.slate_size
        with ctx.timer("ranker"):
            self.ranker, self.ranker_hist, self.ranker_s = recipe_ranker(
                ctx.quick, seed, self.recipe, ctx.threads
            )
        rng = ctx.rng(seed, "consistency-users")
        pick = rng.choice(
            self.world.n_users,
            size=min(self.world.n_users, cfg.valid_users + cfg.test_users),
            replace=False,
        )
        nv = min(cfg.valid_users, pick.size // 2)
        self.users = {"valid": np.sort(pick[:nv]), "test": np.sort(pick[nv:])}
        self.env_seed = {s: ctx.seed_int(seed, f"consistency-{s}") for s in self.users}
        self.env = BatchedRecEnv(
            min(4096, max(u.size for u in self.users.values())), data.env, world=self.world
        )
        self.queries = impression_examples(data.train, data.seq_train, data.history_length).obs
        self.gens: dict[tuple[float, str], TwoTowerModel] = {}
        self.gen_s: dict[tuple[float, str], float] = {}
        self.targets: dict[float, Any] = {}
        self.online: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self.rankers: dict[float, Any] = {0.0: self.ranker}
        self.scale = score_scale(
            self.ranker, take_obs(data.test_set.obs, np.arange(min(200, len(data.test_set))))
        )

    # ---------------------------------------------------------------- models
    def train_config(self) -> TrainConfig:
        c = self.cfg
        return TrainConfig(
            epochs=c.epochs, batch_size=c.batch_size, max_examples_per_epoch=c.max_examples_per_epoch,
            seed=self.seed, progress=False, threads=self.ctx.threads,
        )  # fmt: skip

    def ranker_at(self, sigma: float) -> Any:
        """The ranker with a fixed error of sigma standard deviations of its scores."""
        if sigma not in self.rankers:
            self.rankers[sigma] = NoisyRanker(self.ranker, sigma * self.scale, seed=self.seed)
        return self.rankers[sigma]

    def generator(self, sigma: float, arm: str, loss: str = "", lam: float = 0.0) -> TwoTowerModel:
        """The positives-only generator (``arm == POS``) or one distilled toward ranker_at(sigma)."""
        key = (0.0 if arm == POS else sigma, arm)
        if key in self.gens:
            return self.gens[key]
        data = self.data
        model = TwoTowerModel.build(default_two_tower(64), self.world.catalog)
        extra, weight = None, 0.0
        with self.ctx.timer("generators") as t:
            if arm != POS:
                if sigma not in self.targets:
                    self.targets[sigma] = teacher_targets(
                        self.ranker_at(sigma), self.queries, self.world.catalog.release_time,
                        DistillConfig(max_queries=self.cfg.teacher_queries), self.ctx.rng(self.seed, "teacher", int(1000 * sigma)),
                    )  # fmt: skip
                dcfg = DistillConfig(loss=loss, weight=lam, **(KL if loss == "kl" else {}))
                pool = np.nonzero(released(self.world.catalog.release_time, data.t1))[0]
                extra = DistillObjective(self.targets[sigma], dcfg, model, sample_pool=pool)
                weight = lam
            fit_two_tower(
                model, mixed_negatives(), data.train, data.seq_train, self.train_config(),
                valid=data.valid_set, release_time=self.world.catalog.release_time, extra=extra, extra_weight=weight,
            )  # fmt: skip
        self.gens[key], self.gen_s[key] = model, t.seconds
        return model

    def pipeline(
        self, model: TwoTowerModel, k_cand: int, sigma: float = 0.0, name: str = ""
    ) -> Any:
        gen = two_tower_generator(model, self.data, name or "two-tower")
        pipe = MultiStagePipeline(
            [Source(gen, k_cand, "generator")], self.ranker_at(sigma), self.k, name=name
        )
        return serve(pipe, self.recipe, self.data, name=name)

    # ---------------------------------------------------------------- online
    def reward(self, name: str, split: str, make: Any) -> dict[str, np.ndarray]:
        """Per-user outcomes of an agent on the split's users (built by ``make()`` once)."""
        key = (name, split)
        if key not in self.online:
            with self.ctx.timer("rollouts"):
                res = rollout(
                    self.env,
                    make(),
                    self.users[split].size,
                    seed=self.env_seed[split],
                    users=self.users[split],
                )
            self.online[key] = res.outcomes
        return self.online[key]


@experiment(
    "consistency",
    "Generator trained on positives vs distilled toward the improved ranker: RRR and online reward at K in {50, 100, 200, 500}; the regime map (ranker quality x K x lambda); multiple candidate sources.",
    ConsistencyConfig,
)
def run(cfg: ConsistencyConfig, ctx: RunContext) -> None:
    seeds = []
    for seed in ctx.seeds:
        st = _Seed(cfg, ctx, seed)
        ctx.log(
            f"seed {seed}: ranker valid AUC {st.ranker_hist.best_metric:.3f} ({st.ranker_s:.0f} s)"
        )
        _thesis(st)
        _regime_map(st)
        _sources(st)
        seeds.append(st)
        ctx.log(f"seed {seed}: done at {ctx.elapsed():.0f} s")
    _report(cfg, ctx, seeds)


# ------------------------------------------------------------------------------ 1. thesis
def _thesis(st: _Seed) -> None:
    cfg, data = st.cfg, st.data
    ev = data.test_set
    st.r_top, _ = st.ranker.top_k(ev.obs, st.k)  # R_10 over the whole released catalog
    st.offline, st.rrr_q = {}, {}
    arms = [(POS, "", 0.0)] + [
        (_arm(loss, lam), loss, lam) for loss in cfg.losses for lam in cfg.weights
    ]
    for arm, loss, lam in st.ctx.progress(arms, desc=f"seed {st.seed} generators"):
        model = st.generator(0.0, arm, loss, lam)
        ids, _ = two_tower_generator(model, data).retrieve(ev.obs, max(cfg.ks), exclude_seen=False)
        st.rrr_q[arm] = {kc: rrr_at_k(ids[:, :kc], st.r_top) for kc in cfg.ks}  # (Q,) per query
        st.offline[arm] = {f"rrr@{kc}": mean_over_users(st.rrr_q[arm][kc]) for kc in cfg.ks}
    sk = cfg.select_k

    def valid_reward(arm: str) -> float:
        model = st.gens[(0.0, arm)]
        out = st.reward(f"{arm} K={sk}", "valid", lambda: st.pipeline(model, sk))
        return float(out["reward"].mean())

    st.lam = {}
    for loss in cfg.losses:
        st.lam[loss] = max(cfg.weights, key=lambda lam, loss=loss: valid_reward(_arm(loss, lam)))
    st.chosen = {loss: _arm(loss, st.lam[loss]) for loss in cfg.losses}
    st.best = max(st.chosen.values(), key=valid_reward)
    # test: positives only and the chosen distilled arm at every K; every other loss (at its
    # lambda) at select_k, or at every K with all_ks_every_loss
    for arm in (POS, *st.chosen.values()):
        model = st.gens[(0.0, arm)]
        for kc in cfg.ks:
            if arm in (POS, st.best) or kc == sk or cfg.all_ks_every_loss:
                st.reward(
                    f"{arm} K={kc}", "test", lambda model=model, kc=kc: st.pipeline(model, kc)
                )
    # the best learned pipeline, chosen on validation among (positives only, best distilled) x K
    for arm in (POS, st.best):
        model = st.gens[(0.0, arm)]
        for kc in cfg.ks:
            st.reward(f"{arm} K={kc}", "valid", lambda model=model, kc=kc: st.pipeline(model, kc))
    st.best_pipe = max(
        (f"{arm} K={kc}" for arm in (POS, st.best) for kc in cfg.ks),
        key=lambda n: st.online[(n, "valid")]["reward"].mean(),
    )
    # references
    k, rec = st.k, st.recipe
    st.reward(
        "single-stage",
        "test",
        lambda: serve(SingleStageAgent(st.ranker, k), rec, data, "single-stage"),
    )
    pos_gen = two_tower_generator(st.gens[(0.0, POS)], data, "generator alone")
    st.reward(
        "generator alone (top-10)", "test", lambda: serve(_GeneratorAgent(pos_gen, k), rec, data)
    )
    st.reward("oracle-utility", "test", lambda: GreedyUtilityOracle(st.env))
    st.reward("oracle-expected-reward", "test", lambda: ExpectedRewardOracle(st.env))


class _GeneratorAgent:
    """The generator alone: its own top-k over the released catalog is the slate."""

    def __init__(self, generator: Any, k: int) -> None:
        self.generator, self.k, self.name = generator, k, "generator alone"
        self.last_candidates = None

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        ids, _ = self.generator.retrieve(obs, self.k, exclude_seen=False)
        return ids


# ------------------------------------------------------------------------------ 2. regime map
def _regime_map(st: _Seed) -> None:
    cfg = st.cfg
    st.map = {}  # (sigma, lam, K) -> (treatment, control) per-user rewards
    pos = st.gens[(0.0, POS)]

    def name(arm: str, kc: int, sigma: float) -> str:  # sigma 0: the thesis's rollout
        return f"{arm} K={kc}" + ("" if sigma == 0 else f" sigma={sigma:g}")

    for sigma in st.ctx.progress((0.0, *cfg.noise_levels), desc=f"seed {st.seed} regime map"):
        for kc in cfg.map_ks:
            ctrl = st.reward(
                name(POS, kc, sigma), "test", lambda kc=kc, s=sigma: st.pipeline(pos, kc, s)
            )
            for lam in cfg.map_weights:
                arm = _arm(cfg.map_loss, lam)
                model = st.generator(sigma, arm, cfg.map_loss, lam)
                tr = st.reward(
                    name(arm, kc, sigma),
                    "test",
                    lambda m=model, kc=kc, s=sigma: st.pipeline(m, kc, s),
                )
                st.map[(sigma, lam, kc)] = (tr["reward"], ctrl["reward"])


# ------------------------------------------------------------------------------ 3. sources
def _sources(st: _Seed) -> None:
    cfg, data, world = st.cfg, st.data, st.world
    inter = data.interactions()
    gens = {
        SOURCES[0]: two_tower_generator(st.gens[(0.0, POS)], data, SOURCES[0]),
        SOURCES[1]: two_tower_generator(st.gens[(0.0, st.best)], data, SOURCES[1]),
        SOURCES[2]: Item2Item().fit(inter, world.catalog),
        SOURCES[3]: TopPopular().fit(inter, world.catalog),
    }
    quotas = dict(zip(SOURCES, cfg.quotas, strict=True))

    def make(names: tuple[str, ...]) -> MultiStagePipeline:
        return MultiStagePipeline(
            [Source(gens[n], quotas[n], n) for n in names], st.ranker, st.k, name=" + ".join(names)
        )

    st.src = {}
    ev = data.test_set
    configs = {
        "all four": SOURCES,
        **{f"without {n}": tuple(x for x in SOURCES if x != n) for n in SOURCES},
    }
    for label, names in configs.items():
        # offline: the ranker's top-10 over the union, per held-out query
        pipe = make(names)
        pipe.act(ev.obs)
        offline = pipe.source_shares()
        per_user = dict(zip(pipe.source_names, pipe.last_source_hits.mean(axis=2), strict=True))
        # online: served slates on the test users
        holder: dict[str, Any] = {}

        def build(names=names, holder=holder) -> Any:
            holder["pipe"] = make(names)
            return serve(holder["pipe"], st.recipe, data)

        out = st.reward(f"sources: {label}", "test", build)
        online = holder["pipe"].source_shares() if "pipe" in holder else None
        st.src[label] = {
            "offline": offline,
            "online": online,
            "per_user": per_user,
            "reward": out["reward"],
        }


# ------------------------------------------------------------------------------ report
def _eff(seeds: list[_Seed], a: str, b: str, relative: bool = True, split: str = "test"):
    return paired_effect_over_seeds(
        [s.online[(a, split)]["reward"] for s in seeds],
        [s.online[(b, split)]["reward"] for s in seeds],
        relative=relative,
    )


def _report(cfg: ConsistencyConfig, ctx: RunContext, seeds: list[_Seed]) -> None:
    rep = ctx.report
    rec = seeds[0].recipe
    wl = {s.seed: world_label(env_config(ctx.quick), s.seed) for s in seeds}
    rep.section(
        "Setup",
        f"The improved ranker (log {rec.policy}, epsilon {rec.epsilon:g}, {rec.episodes_per_user:g} episodes per user; heads "
        f"{', '.join(rec.heads)}; served {'with' if rec.memory else 'without'} the user's logged history; see the ranker "
        "experiment) is trained once per seed. Generators: the default two-tower recipe (ID items, mean pooling, cosine "
        "with learnable temperature, in-batch + uniform negatives, logQ3) trained on positives only, or with "
        "L = (1 - lambda) L_true + lambda L_distill toward the ranker's choices on its top-"
        f"{DistillConfig().pool_size - DistillConfig().uniform_extra} + {DistillConfig().uniform_extra} uniform items of "
        f"{cfg.teacher_queries:,} training requests. Lambda of each loss and the distilled arm are chosen on "
        f"{cfg.valid_users} validation users at K={cfg.select_k}; verdicts use {cfg.test_users} other test users, the "
        "same users for every agent with the same random streams (paired per user; over seeds, a t interval over "
        "the per-seed paired effects). RRR@K,10 is measured on held-out queries of the test period.",
    )
    # 1. thesis table
    off_rows, on_rows = [], []
    for s in seeds:
        for arm in (POS, *s.chosen.values()):
            off_rows.append({"world": wl[s.seed], "policy": s.data.label, "model": arm, "seed": s.seed,
                             "wall_s": s.gen_s[(0.0, arm)], **{f"rrr@{kc}": s.offline[arm][f"rrr@{kc}"] for kc in cfg.ks}})  # fmt: skip
            for kc in (kc for kc in cfg.ks if (f"{arm} K={kc}", "test") in s.online):
                on_rows.append({"world": wl[s.seed], "policy": f"K={kc}", "model": arm if arm == POS else "distilled (" + arm.split("distilled ")[1] + ")",
                                "seed": s.seed, "wall_s": 0.0, "reward": s.online[(f"{arm} K={kc}", "test")]["reward"]})  # fmt: skip
        for name in (
            "single-stage",
            "generator alone (top-10)",
            "oracle-utility",
            "oracle-expected-reward",
        ):
            on_rows.append({"world": wl[s.seed], "policy": "reference", "model": name, "seed": s.seed, "wall_s": 0.0,
                            "reward": s.online[(name, "test")]["reward"]})  # fmt: skip
    rep.seed_table("Recall relative to the ranker, RRR@K,10 (held-out queries)", off_rows, [f"rrr@{kc}" for kc in cfg.ks], fmt=".3f",
                   note="wall_s: generator training seconds.")  # fmt: skip
    rep.seed_table("Online reward per user (test users)", on_rows, [], online=["reward"], fmt=".3f")
    rows = []
    for kc in cfg.ks:
        eff = paired_effect_over_seeds(
            [s.online[(f"{s.best} K={kc}", "test")]["reward"] for s in seeds],
            [s.online[(f"{POS} K={kc}", "test")]["reward"] for s in seeds],
            relative=True,
        )
        f = rep.finding(
            f"At K={kc}, the pipeline whose generator is distilled toward the ranker (loss and lambda chosen on validation) "
            f"earns at least {100 * cfg.min_effect:g}% more online reward than with the positives-only generator",
            eff, metric="online reward per user, test users (relative)", direction=">", min_effect=cfg.min_effect,
        )  # fmt: skip
        rrr = paired_effect_over_seeds(
            [_defined(s.rrr_q[s.best][kc]) for s in seeds],
            [_defined(s.rrr_q[POS][kc]) for s in seeds],
            unit="queries",
        )
        rows.append({"K": kc, "RRR@K,10 positives only": float(np.mean([s.offline[POS][f"rrr@{kc}"] for s in seeds])),
                     "RRR@K,10 distilled": float(np.mean([s.offline[s.best][f"rrr@{kc}"] for s in seeds])),
                     "reward positives only": eff.control, "reward distilled": eff.treatment,
                     "effect": eff.format(".3g"), "verdict": f.verdict,
                     "RRR effect": rrr.format(".3g")})  # fmt: skip
    rep.table("The thesis: distilled vs positives-only pipeline at each K (test users)", rows,
              fmt={"RRR@K,10 positives only": ".3f", "RRR@K,10 distilled": ".3f", "reward positives only": ".2f", "reward distilled": ".2f"},
              note="Distilled arm per seed: " + "; ".join(f"seed {s.seed}: {s.best}" for s in seeds) + ". Lambda per loss (validation): "
              + "; ".join(f"seed {s.seed}: " + ", ".join(f"{loss} {s.lam[loss]:g}" for loss in cfg.losses) for s in seeds) + ".")  # fmt: skip
    sk = cfg.select_k
    rrr_eff = paired_effect_over_seeds(
        [_defined(s.rrr_q[s.best][sk]) for s in seeds],
        [_defined(s.rrr_q[POS][sk]) for s in seeds],
        unit="queries",
    )
    rep.finding(
        f"Distillation raises recall relative to the ranker, RRR@{sk},10, over the positives-only generator",
        rrr_eff, metric=f"RRR@{sk},10 per held-out query", direction=">",
    )  # fmt: skip
    # targets of the improved ranker
    rep.finding(
        "The single-stage ranker earns more than the generator alone serving its own top-10",
        _eff(seeds, "single-stage", "generator alone (top-10)"), metric="online reward per user (relative)", direction=">",
    )  # fmt: skip
    rep.finding(
        f"The single-stage ranker earns at least as much as the positives-only pipeline at K={sk}",
        _eff(seeds, "single-stage", f"{POS} K={sk}"), metric="online reward per user (relative)", direction=">",
    )  # fmt: skip
    best = paired_effect_over_seeds(
        [s.online[(s.best_pipe, "test")]["reward"] for s in seeds],
        [0.5 * s.online[("oracle-utility", "test")]["reward"] for s in seeds],
    )
    rep.finding(
        "The best learned pipeline (chosen on validation) earns at least half of the greedy-utility oracle's reward",
        best, metric="reward per user minus half the oracle's", direction=">",
        note="best pipeline per seed: " + "; ".join(f"{s.seed}: {s.best_pipe}" for s in seeds),
    )  # fmt: skip
    rep.sanity(
        "RRR@K,10 grows with K for every generator (nested top-K lists)",
        bool(all(np.all(np.diff([s.offline[a][f"rrr@{kc}"] for kc in cfg.ks]) >= 0) for s in seeds for a in s.offline)),
        "RRR@K,10 of every generator and seed, K = " + ", ".join(map(str, cfg.ks)),
    )  # fmt: skip
    _report_map(cfg, rep, seeds)
    _report_sources(cfg, rep, seeds)
    share = np.mean(
        [
            s.online[(s.best_pipe, "test")]["reward"].mean()
            / s.online[("oracle-utility", "test")]["reward"].mean()
            for s in seeds
        ]
    )
    rep.add_result("oracle_share_best_pipeline", float(share))
    _figure(cfg, rep, seeds)
    k0 = cfg.ks[0]
    rep.headline(
        f"RRR@{sk},10 {np.mean([s.offline[POS][f'rrr@{sk}'] for s in seeds]):.3f} -> {np.mean([s.offline[s.best][f'rrr@{sk}'] for s in seeds]):.3f}; "
        f"reward at K={k0}: positives only {np.mean([s.online[(f'{POS} K={k0}', 'test')]['reward'].mean() for s in seeds]):.2f}, "
        f"distilled {np.mean([s.online[(f'{s.best} K={k0}', 'test')]['reward'].mean() for s in seeds]):.2f}; single-stage "
        f"{np.mean([s.online[('single-stage', 'test')]['reward'].mean() for s in seeds]):.2f}; best pipeline {100 * share:.0f}% of the greedy oracle"
    )


def _defined(values: np.ndarray) -> np.ndarray:
    """A per-query metric with undefined entries (NaN: no ranker row) set to 0 for pairing."""
    return np.nan_to_num(np.asarray(values, dtype=np.float64))


def _report_map(cfg: ConsistencyConfig, rep: Any, seeds: list[_Seed]) -> None:
    sigmas = (0.0, *cfg.noise_levels)
    cells, effs = [], {}
    for sigma in sigmas:
        for kc in cfg.map_ks:
            for lam in cfg.map_weights:
                eff = paired_effect_over_seeds(
                    [s.map[(sigma, lam, kc)][0] for s in seeds],
                    [s.map[(sigma, lam, kc)][1] for s in seeds],
                    relative=True,
                )
                effs[(sigma, kc, lam)] = eff
                cells.append({"ranker error (sd)": sigma, "K": kc, "lambda": lam, "gain": eff.format(".3g"),
                              "verdict": verdict(eff, ">", 0.0)})  # fmt: skip
    rep.table(
        f"Regime map: online reward gain of distillation ({cfg.map_loss}) over positives-only, by ranker error x K x lambda",
        cells, note="Both pipelines are served by the same (noisy) ranker; the generator is distilled toward that ranker. "
        "Gain: relative, paired over test users (over seeds when several); verdict of 'distillation raises the reward'.",
    )  # fmt: skip
    rep.add_result("regime_map", [{**c} for c in cells])
    # the lecture's predictions
    kmin, kmax = min(cfg.map_ks), max(cfg.map_ks)
    lam_full = max(cfg.map_weights)
    if kmin != kmax:
        d = paired_effect_over_seeds(
            [s.map[(0.0, lam_full, kmin)][0] - s.map[(0.0, lam_full, kmin)][1] for s in seeds],
            [s.map[(0.0, lam_full, kmax)][0] - s.map[(0.0, lam_full, kmax)][1] for s in seeds],
        )
        f = rep.finding(
            f"Lecture: the gain of distillation grows as K shrinks (gain at K={kmin} above the gain at K={kmax}; the ranker, lambda={lam_full:g})",
            d, metric="difference of the paired reward gains (reward per user)", direction=">",
        )  # fmt: skip
        if f.verdict == "REFUTED":
            rep.section(
                "Where the lecture's prediction fails",
                f"The gain does not grow as K shrinks here: {f.line()}",
            )
    if cfg.noise_levels:
        worst = max(cfg.noise_levels)
        d = paired_effect_over_seeds(
            [s.map[(0.0, lam_full, kmin)][0] - s.map[(0.0, lam_full, kmin)][1] for s in seeds],
            [s.map[(worst, lam_full, kmin)][0] - s.map[(worst, lam_full, kmin)][1] for s in seeds],
        )
        rep.finding(
            f"Lecture: the gain of distillation grows as the ranker gets better (the ranker vs the ranker with {worst:g} sd of error; K={kmin}, lambda={lam_full:g})",
            d, metric="difference of the paired reward gains (reward per user)", direction=">",
        )  # fmt: skip
        inter = [x for x in cfg.map_weights if x < lam_full]
        if inter:
            mid = inter[len(inter) // 2] if len(inter) > 1 else inter[0]
            d = paired_effect_over_seeds(
                [s.map[(worst, mid, kmin)][0] for s in seeds],
                [s.map[(worst, lam_full, kmin)][0] for s in seeds],
                relative=True,
            )
            rep.finding(
                f"Lecture: with a poor ranker ({worst:g} sd of error) an intermediate lambda ({mid:g}) beats full imitation (lambda={lam_full:g}) at K={kmin}",
                d, metric="online reward per user (relative)", direction=">",
            )  # fmt: skip


def _report_sources(cfg: ConsistencyConfig, rep: Any, seeds: list[_Seed]) -> None:
    rows = []
    for label in ["all four", *[f"without {n}" for n in SOURCES]]:
        for n in SOURCES:
            if label == f"without {n}":
                continue
            rows.append({
                "sources": label, "source": n,
                "share of the ranker's top-10 (offline)": float(np.mean([s.src[label]["offline"][n]["served"] for s in seeds])),
                "exclusive share (offline)": float(np.mean([s.src[label]["offline"][n]["exclusive"] for s in seeds])),
                "share of served slates (online)": float(np.mean([s.src[label]["online"][n]["served"] for s in seeds])),
            })  # fmt: skip
    rep.table(
        "Multiple sources: each source's share of what the ranker picks from the union "
        f"(quotas {', '.join(f'{n} {q}' for n, q in zip(SOURCES, cfg.quotas, strict=True))})",
        rows, fmt=".3f",
        note="Share: the fraction of the ranker's top-10 (held-out queries) or of the served slates (test users online) that "
        "the source retrieved (an item several sources retrieved counts for each); exclusive: retrieved by that source alone.",
    )  # fmt: skip
    loss_rows = []
    for n in SOURCES:
        eff = paired_effect_over_seeds(
            [s.src[f"without {n}"]["reward"] for s in seeds],
            [s.src["all four"]["reward"] for s in seeds],
            relative=True,
        )
        f = rep.finding(
            f"Removing the {n} source lowers the multi-source pipeline's reward", eff,
            metric="online reward per user (relative to all four sources)", direction="<",
        )  # fmt: skip
        loss_rows.append({"removed": n, "reward change": eff.format(".3g"), "verdict": f.verdict})
    rep.table(
        "Multiple sources: reward when each source is removed (test users, paired)", loss_rows
    )
    share_with = [s.src["all four"]["per_user"][SOURCES[0]] for s in seeds]
    share_without = [s.src[f"without {SOURCES[1]}"]["per_user"][SOURCES[0]] for s in seeds]
    rep.finding(
        "Lecture: the positives-only source's share of the ranker's top-10 falls when the distilled source joins",
        paired_effect_over_seeds(share_with, share_without, unit="queries"),
        metric="share of the ranker's top-10 per held-out query", direction="<",
    )  # fmt: skip


def _figure(cfg: ConsistencyConfig, rep: Any, seeds: list[_Seed]) -> None:
    fig = Figure(figsize=(11, 3.6))
    ax = fig.add_subplot(1, 3, 1)
    arms = [POS, *seeds[0].chosen.values()]
    for arm in arms:
        ax.plot(
            cfg.ks,
            [
                np.mean([s.offline[arm][f"rrr@{kc}"] for s in seeds if arm in s.offline])
                for kc in cfg.ks
            ],
            "o-",
            label=arm,
        )
    ax.set_xscale("log")
    ax.set_xlabel("K (candidates)")
    ax.set_ylabel("RRR@K,10")
    ax.legend(fontsize=6)
    ax2 = fig.add_subplot(1, 3, 2)
    for arm, lab in ((POS, POS), ("best", "distilled (chosen on validation)")):
        ys = [
            np.mean(
                [
                    s.online[(f"{s.best if arm == 'best' else POS} K={kc}", "test")][
                        "reward"
                    ].mean()
                    for s in seeds
                ]
            )
            for kc in cfg.ks
        ]
        ax2.plot(cfg.ks, ys, "o-", label=lab)
    ax2.axhline(
        np.mean([s.online[("single-stage", "test")]["reward"].mean() for s in seeds]),
        color="k",
        ls="--",
        lw=0.8,
        label="single-stage",
    )
    ax2.set_xscale("log")
    ax2.set_xlabel("K (candidates)")
    ax2.set_ylabel("online reward per user")
    ax2.legend(fontsize=6)
    ax3 = fig.add_subplot(1, 3, 3)
    sigmas = (0.0, *cfg.noise_levels)
    kmin = min(cfg.map_ks)
    grid = np.array(
        [
            [
                np.mean(
                    [
                        s.map[(sg, lam, kmin)][0].mean() / s.map[(sg, lam, kmin)][1].mean() - 1
                        for s in seeds
                    ]
                )
                for lam in cfg.map_weights
            ]
            for sg in sigmas
        ]
    )
    im = ax3.imshow(
        100 * grid,
        cmap="RdBu",
        vmin=-abs(100 * grid).max() - 1e-9,
        vmax=abs(100 * grid).max() + 1e-9,
        aspect="auto",
    )
    for i in range(len(sigmas)):
        for j in range(len(cfg.map_weights)):
            ax3.text(j, i, f"{100 * grid[i, j]:+.0f}%", ha="center", va="center", fontsize=7)
    ax3.set_xticks(range(len(cfg.map_weights)))
    ax3.set_xticklabels([f"{x:g}" for x in cfg.map_weights])
    ax3.set_yticks(range(len(sigmas)))
    ax3.set_yticklabels([f"{x:g}" for x in sigmas])
    ax3.set_xlabel("lambda")
    ax3.set_ylabel("ranker error (sd of its scores)")
    ax3.set_title(f"gain of distillation, K={kmin}", fontsize=8)
    fig.colorbar(im, ax=ax3, fraction=0.046)
    fig.tight_layout()
    rep.figure(
        "thesis_and_map",
        fig,
        "Left: recall relative to the ranker against K. Middle: online reward against K. Right: the regime map at the "
        "smallest K (relative gain of distillation by ranker error and lambda).",
    )
