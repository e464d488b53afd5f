"""rl: RL libraries on the env, and RL-trained agents in the two-stage system.

Three questions, each answered paired over the same users (common random numbers):

1. Does a standard RL library learn here? Stable-Baselines3 PPO (``MultiInputPolicy``)
   through :mod:`simenv.wrappers` (an 8-d embedding query over PureSVD item vectors from a
   random log, the pooled history as observation, ``VecNormalize``) on
   ``simenv/RecEnv-small-v0``, against uniformly random and popular slates.
2. Does optimising the long-term return beat next-click training? The candidate generator
   of the pipeline (same ranker, K candidates) trained three ways: supervised softmax on
   logged clicks (the project's default recipe), REINFORCE with the top-K off-policy
   correction of Chen et al. 2019 and a discount ``gamma`` over the user's whole episode
   (sessions and return visits), and the same REINFORCE with ``gamma = 0`` (myopic). The
   REINFORCE generators start from the supervised one and learn from the log (logged
   Plackett-Luce propensities, learned behaviour head), then online rounds (sampled
   candidates). Outcomes: reward per user over whole lifetimes, return rate, and the share
   of the supervised pipeline's gap to the oracle that RL closes.
3. The two-agent view: generator (REINFORCE on the pipeline's reward) and ranker
   (supervised on the impressions the pipeline produced) trained jointly for a few rounds,
   against the supervised pipeline.

The log has one episode per user (returns need whole episodes; see
``agents.reinforce.step_returns``). K = 100 candidates (not the consistency experiment's
200): every online rollout runs the ranker over K candidates for every user at every step,
and this experiment runs about a dozen of them per seed.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from matplotlib.figure import Figure

from agents.base import OracleAgent, PopularAgent, RandomAgent
from agents.multiagent import train_jointly
from agents.pipeline import MultiStagePipeline, Source
from agents.reinforce import ReinforceConfig, ReinforceData, ReinforceGenerator, train_online
from agents.rollout import rollout
from benchmarks.common import (
    default_two_tower,
    env_config,
    mixed_negatives,
    offline_data,
    trained_ranker,
    two_tower_generator,
    world_label,
)
from benchmarks.registry import ExperimentConfig, experiment, param
from benchmarks.runner import RunContext
from benchmarks.stats import paired_effect_over_seeds
from ranking import RankerTrainConfig
from retrieval.model import TwoTowerModel
from retrieval.train import TrainConfig, fit_two_tower
from simenv import BatchedRecEnv, EnvConfig, RecEnv, UniformPolicy, collect
from simenv.types import Columns
from simenv.wrappers import (
    AdapterAgent,
    EmbeddingAction,
    HistoryEmbeddingObservation,
    log_item_embeddings,
)

OUTCOMES = ("reward", "returned", "sessions", "slates", "clicks")


# user slots stepped at once: every slot acts until the last episode of the run ends (up to
# the 200-step horizon), so a wave of all users at once computes ~10x more rows than it records
# (mean episodes are ~25 slates); 256 slots play users back to back and waste little. Per-user
# outcomes do not depend on it (common random numbers per user).
SLOTS = 256


@dataclass(frozen=True)
class RLConfig(ExperimentConfig):
    """PPO on the small env; REINFORCE (top-K corrected) vs supervised generators; joint training."""

    policy: str = param("popularity", "behaviour policy of the log (one episode per user)")
    epsilon: float = param(0.05, "its uniform exploration")
    episodes_per_user: float = param(
        0.5, "logged episodes per user, at most 1 (returns need one whole episode per user)"
    )
    ranker_epochs: int = param(1, "ranker training epochs")
    epochs: int = param(3, "supervised generator epochs (early stopping on validation recall)")
    quota: int = param(
        100, "K: candidates the generator gives the ranker (and K of the top-K correction)"
    )
    gamma: float = param(0.9, "discount per slate of the long-term REINFORCE")
    rf_epochs: int = param(1, "REINFORCE epochs over the logged requests")
    rf_requests: int = param(6_000, "logged requests drawn per REINFORCE epoch")
    rf_lr: float = param(1e-3, "REINFORCE learning rate")
    weight_cap: float = param(10.0, "cap c on the importance weight pi / beta")
    online_rounds: int = param(1, "online REINFORCE rounds after the logged ones")
    online_users: int = param(300, "user episodes per online round")
    joint_rounds: int = param(1, "rounds of the two-agent joint training")
    eval_users: int = param(400, "users per evaluation rollout")
    ppo_steps: int = param(16_384, "SB3 PPO env steps on RecEnv-small-v0 (0 skips PPO)")
    horizon: int = param(
        0, "slates per episode online (0: the profile's horizon; smoke tests cut it)"
    )

    def __post_init__(self) -> None:
        for name in ("ranker_epochs", "epochs", "quota", "rf_epochs", "rf_requests",
                     "online_users", "eval_users"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("online_rounds", "joint_rounds", "ppo_steps", "horizon"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(
                f"gamma must be in (0, 1) (the myopic variant is run anyway), got {self.gamma}"
            )
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if not 0.0 < self.episodes_per_user <= 1.0:
            raise ValueError(f"episodes_per_user must be in (0, 1], got {self.episodes_per_user}")

    @classmethod
    def quick(cls) -> RLConfig:
        return replace(
            cls(), episodes_per_user=1.0, ranker_epochs=1, epochs=3, rf_requests=8_000,
            online_rounds=1, online_users=300, joint_rounds=1, eval_users=300, ppo_steps=8_192,
        )  # fmt: skip


# ---------------------------------------------------------------------------- PPO (SB3)
def ppo_small_env(seed: int, steps: int, threads: int | None) -> dict[str, np.ndarray]:
    """SB3 PPO through the embedding adapter on RecEnv-small-v0.

    Returns per-user rewards of PPO, uniformly random and popular slates over all 300 users
    (same users, same per-user streams).
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    if threads:
        torch.set_num_threads(threads)
    cfg = EnvConfig.small()
    env = BatchedRecEnv(300, cfg)
    world = env.world
    log = collect(
        env, UniformPolicy(world, cfg.slate_size, seed=seed), 300, seed=10 + seed, progress=False
    )
    vec = log_item_embeddings(log, world.n_users, world.n_items, dim=8, seed=seed)
    clicks = np.bincount(log[Columns.ITEM][log[Columns.FEEDBACK] > 0], minlength=world.n_items)

    def make():
        return HistoryEmbeddingObservation(EmbeddingAction(RecEnv(cfg, world=world), vec), vec)

    venv = VecNormalize(DummyVecEnv([make] * 8), norm_obs=True, norm_reward=True, gamma=0.9)
    venv.seed(seed)
    model = PPO(
        "MultiInputPolicy", venv, n_steps=64, batch_size=128, learning_rate=1e-3, gamma=0.9,
        gae_lambda=0.95, ent_coef=0.0, n_epochs=10, seed=seed, verbose=0,
        policy_kwargs=dict(net_arch=[64, 64], log_std_init=-0.5),
    )  # fmt: skip
    model.learn(steps)
    venv.training = False
    probe = make()
    agent = AdapterAgent(
        lambda x: model.predict(venv.normalize_obs(x), deterministic=True)[0],
        probe.env,
        probe,
        "ppo",
    )
    k = cfg.slate_size
    out = {}
    for name, ag in (
        ("PPO (SB3)", agent),
        ("random", RandomAgent(world, k, seed=seed)),
        ("popular", PopularAgent(clicks, world.catalog.release_time, k)),
    ):
        out[name] = rollout(env, ag, 300, seed=100 + seed).outcomes["reward"]
    return out


# ---------------------------------------------------------------------------- the pipelines
def _pipeline(gen, ranker, k, quota, name):
    return MultiStagePipeline([Source(gen, quota)], ranker, k, name=name)


@experiment(
    "rl",
    "RL on the env: SB3 PPO vs random/popular; REINFORCE top-K corrected generators (long-term vs myopic) vs supervised in the same pipeline; generator and ranker trained jointly.",
    RLConfig,
)
def run(cfg: RLConfig, ctx: RunContext) -> None:
    ppo_runs: dict[str, list[np.ndarray]] = {}
    rows, per_seed, gap_rows, curves = [], {}, [], {}
    for seed in ctx.seeds:
        # ---- 1. SB3 PPO on the small env
        if cfg.ppo_steps:
            with ctx.timer("ppo") as t_p:
                res = ppo_small_env(seed, cfg.ppo_steps, ctx.threads)
            for name, r in res.items():
                ppo_runs.setdefault(name, []).append(r)
            ctx.log(
                f"seed {seed}: PPO {res['PPO (SB3)'].mean():.2f} vs random {res['random'].mean():.2f} ({t_p.seconds:.0f} s)"
            )
        # ---- 2. one log, one ranker, the supervised generator
        data = offline_data(ctx.quick, seed, cfg.policy, cfg.epsilon, cfg.episodes_per_user)
        world, k = data.world, data.env.slate_size
        wl = world_label(env_config(ctx.quick), seed)
        with ctx.timer("ranker") as t_r:
            ranker = trained_ranker(data, seed, cfg.ranker_epochs, ctx.threads)
        with ctx.timer("supervised") as t_s:
            sup = TwoTowerModel.build(default_two_tower(64), world.catalog)
            fit_two_tower(
                sup, mixed_negatives(), data.train, data.seq_train,
                TrainConfig(epochs=cfg.epochs, batch_size=1024, seed=seed, progress=False, threads=ctx.threads),
                valid=data.valid_set, release_time=world.catalog.release_time,
            )  # fmt: skip
        ctx.log(
            f"seed {seed}: ranker {t_r.seconds:.0f} s, supervised generator {t_s.seconds:.0f} s"
        )
        env = BatchedRecEnv(
            min(cfg.online_users, SLOTS),
            data.env,
            world=world,
            max_episode_steps=cfg.horizon or None,
        )
        # ---- 3. REINFORCE from the log, then online (long-term and myopic)
        agents, walls = {}, {}
        for gamma, label in (
            (cfg.gamma, f"REINFORCE gamma={cfg.gamma:g}"),
            (0.0, "REINFORCE gamma=0 (myopic)"),
        ):
            rcfg = ReinforceConfig(
                gamma=gamma, top_k=cfg.quota, weight_cap=cfg.weight_cap, epochs=cfg.rf_epochs,
                max_requests_per_epoch=cfg.rf_requests, lr=cfg.rf_lr, seed=seed, threads=ctx.threads,
            )  # fmt: skip
            with ctx.timer("reinforce") as t_rf:
                rd = ReinforceData.from_log(
                    data.train, data.seq_all, rcfg.history_length, gamma, returns_log=data.log
                )
                agent = ReinforceGenerator(copy.deepcopy(sup), world.catalog)
                t_off = time.perf_counter()
                agent.fit(rd, rcfg)
                t_off = time.perf_counter() - t_off
                if gamma > 0:
                    agents[f"{label}, from the log only"] = _pipeline(
                        copy.deepcopy(agent).generator(data.train_counts),
                        ranker,
                        k,
                        cfg.quota,
                        label,
                    )
                    walls[f"{label}, from the log only"] = t_off
                online = train_online(
                    agent, env, ranker, replace(rcfg, epochs=1, max_requests_per_epoch=None),
                    cfg.online_rounds, cfg.online_users, seed,
                ) if cfg.online_rounds else []  # fmt: skip
                curves.setdefault(label, []).append([r["reward_per_user"] for r in online])
            name = f"{label}, log + {cfg.online_rounds} online rounds"
            agents[name] = _pipeline(agent.generator(data.train_counts), ranker, k, cfg.quota, name)
            walls[name] = t_rf.seconds
        # ---- 4. the two-agent view: generator and ranker trained jointly
        if cfg.joint_rounds:
            with ctx.timer("joint") as t_j:
                rcfg = ReinforceConfig(
                    gamma=cfg.gamma, top_k=cfg.quota, weight_cap=cfg.weight_cap, epochs=1,
                    lr=cfg.rf_lr, seed=seed, threads=ctx.threads,
                )  # fmt: skip
                agent = ReinforceGenerator(copy.deepcopy(sup), world.catalog)
                joint_ranker = copy.deepcopy(ranker)
                train_jointly(
                    agent, joint_ranker, env, rcfg, cfg.joint_rounds, cfg.online_users, seed,
                    RankerTrainConfig(epochs=1, progress=False, seed=seed, threads=ctx.threads),
                )  # fmt: skip
            name = f"joint: REINFORCE generator + retrained ranker, {cfg.joint_rounds} rounds"
            agents[name] = _pipeline(
                agent.generator(data.train_counts), joint_ranker, k, cfg.quota, name
            )
            walls[name] = t_j.seconds
        # ---- 5. online evaluation: the same users for every agent
        base = {
            "random": RandomAgent(world, k, seed=seed),
            "popular": PopularAgent(data.train_counts, world.catalog.release_time, k),
            f"supervised softmax generator, K={cfg.quota}": _pipeline(
                two_tower_generator(sup, data), ranker, k, cfg.quota, "supervised"
            ),
        }
        eval_env = BatchedRecEnv(
            min(cfg.eval_users, SLOTS), data.env, world=world, max_episode_steps=cfg.horizon or None
        )
        everyone = {**base, **agents, "oracle (greedy utility)": OracleAgent(eval_env)}
        out = {}
        for name, ag in ctx.progress(list(everyone.items()), desc=f"seed {seed} online"):
            r = rollout(eval_env, ag, cfg.eval_users, seed=1000 + seed)
            out[name] = r.outcomes
            rows.append({
                "world": wl, "policy": data.label, "model": name, "seed": seed,
                "wall_s": walls.get(name, t_s.seconds if name.startswith("supervised") else r.seconds),
                **{key: r.outcomes[key] for key in OUTCOMES},
            })  # fmt: skip
        per_seed[seed] = out
        sup_name = f"supervised softmax generator, K={cfg.quota}"
        o, s = out["oracle (greedy utility)"]["reward"].mean(), out[sup_name]["reward"].mean()
        for name in agents:
            gap = (out[name]["reward"].mean() - s) / (o - s) if o != s else float("nan")
            gap_rows.append({"model": name, "seed": seed, "gap_closed": gap})

    # ---- report
    if ppo_runs:
        ppo, rnd, pop = ppo_runs["PPO (SB3)"], ppo_runs["random"], ppo_runs["popular"]
        ctx.report.table(
            "SB3 PPO on RecEnv-small-v0 (reward per user, all 300 users, mean over seeds)",
            [{"agent": n, "reward": float(np.mean([x.mean() for x in v]))} for n, v in ppo_runs.items()],
            fmt=".2f", note=f"{cfg.ppo_steps} env steps; settings in simenv/wrappers.py and tests/agents/test_sb3_ppo.py.",
        )  # fmt: skip
        ctx.report.finding(
            "SB3 PPO (MultiInputPolicy, embedding-query adapter) earns at least 20% more reward per user than uniformly random slates",
            paired_effect_over_seeds(ppo, rnd, relative=True), metric="reward per user",
            direction=">", min_effect=0.2,
        )  # fmt: skip
        ctx.report.finding(
            "SB3 PPO earns at least 20% more reward per user than the popular agent",
            paired_effect_over_seeds(ppo, pop, relative=True), metric="reward per user",
            direction=">", min_effect=0.2,
        )  # fmt: skip
    agg = ctx.report.seed_table(
        "Online, whole user lifetimes (same users for every agent)", rows, [],
        online=list(OUTCOMES), fmt=".3f",
    )  # fmt: skip
    seeds = list(per_seed)
    sup_name = f"supervised softmax generator, K={cfg.quota}"
    long_name = f"REINFORCE gamma={cfg.gamma:g}, log + {cfg.online_rounds} online rounds"
    myopic = f"REINFORCE gamma=0 (myopic), log + {cfg.online_rounds} online rounds"

    def eff(a, b, key, relative):
        return paired_effect_over_seeds(
            [per_seed[s][a][key] for s in seeds],
            [per_seed[s][b][key] for s in seeds],
            relative=relative,
        )

    ctx.report.finding(
        f"REINFORCE with the top-K correction and gamma={cfg.gamma:g} earns at least 2% more reward per user than the supervised softmax generator in the same pipeline",
        eff(long_name, sup_name, "reward", True), metric="reward per user", direction=">", min_effect=0.02,
    )  # fmt: skip
    ctx.report.finding(
        f"... and more users come back (return rate, gamma={cfg.gamma:g} vs supervised)",
        eff(long_name, sup_name, "returned", False), metric="return rate", direction=">",
    )  # fmt: skip
    ctx.report.finding(
        f"Optimising the long-term return (gamma={cfg.gamma:g}) earns at least 2% more reward per user than myopic REINFORCE (gamma=0)",
        eff(long_name, myopic, "reward", True), metric="reward per user", direction=">", min_effect=0.02,
    )  # fmt: skip
    ctx.report.finding(
        f"... and raises the return rate (gamma={cfg.gamma:g} vs gamma=0)",
        eff(long_name, myopic, "returned", False), metric="return rate", direction=">",
    )  # fmt: skip
    off_name = f"REINFORCE gamma={cfg.gamma:g}, from the log only"
    ctx.report.finding(
        f"From the log alone (no online rounds), REINFORCE gamma={cfg.gamma:g} earns at least 2% more reward per user than the supervised generator",
        eff(off_name, sup_name, "reward", True), metric="reward per user", direction=">", min_effect=0.02,
    )  # fmt: skip
    if cfg.joint_rounds:
        joint = f"joint: REINFORCE generator + retrained ranker, {cfg.joint_rounds} rounds"
        ctx.report.finding(
            "The jointly trained generator and ranker earn at least 2% more reward per user than the supervised pipeline",
            eff(joint, sup_name, "reward", True), metric="reward per user", direction=">", min_effect=0.02,
        )  # fmt: skip
    rand = [per_seed[s]["random"]["reward"].mean() for s in seeds]
    orc = [per_seed[s]["oracle (greedy utility)"]["reward"].mean() for s in seeds]
    supm = [per_seed[s][sup_name]["reward"].mean() for s in seeds]
    ctx.report.sanity(
        "the greedy-utility oracle earns more than the supervised pipeline, which earns more than random",
        passed=bool(np.mean(orc) > np.mean(supm) > np.mean(rand)),
        evidence=f"oracle {np.mean(orc):.2f}, supervised {np.mean(supm):.2f}, random {np.mean(rand):.2f}",
    )
    gap_agg = {}
    for r in gap_rows:
        gap_agg.setdefault(r["model"], []).append(r["gap_closed"])
    ctx.report.table(
        "Share of the supervised pipeline's gap to the oracle that each RL generator closes",
        [{"model": m, "gap_closed": float(np.mean(v)), "gap_closed_std": float(np.std(v, ddof=1)) if len(v) > 1 else None}
         for m, v in gap_agg.items()],
        fmt={"gap_closed": "+.3f", "gap_closed_std": ".3f"},
        note="(RL - supervised) / (oracle - supervised), reward per user, mean and std over seeds; negative = worse than supervised.",
    )  # fmt: skip
    if any(len(c) and len(c[0]) for c in curves.values()):
        fig = Figure(figsize=(5.5, 3.5))
        ax = fig.add_subplot()
        for label, runs in curves.items():
            if runs and runs[0]:
                ax.plot(np.arange(1, len(runs[0]) + 1), np.mean(runs, axis=0), "o-", label=label)
        ax.set_xlabel("online round")
        ax.set_ylabel("reward per user (collecting, sampled candidates)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        ctx.report.figure(
            "online_rounds",
            fig,
            "Reward per user of the sampled REINFORCE pipeline while it collects each online round.",
        )
    by = {r["model"]: r for r in agg}
    ctx.report.headline(
        f"reward per user: supervised {by[sup_name]['reward'].mean:.2f}, REINFORCE gamma={cfg.gamma:g} "
        f"{by[long_name]['reward'].mean:.2f}, myopic {by[myopic]['reward'].mean:.2f}, oracle "
        f"{by['oracle (greedy utility)']['reward'].mean:.2f}"
    )
