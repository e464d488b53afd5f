"""ope: off-policy estimators checked against the simulator's true value.

A behaviour policy (popularity Plackett-Luce with uniform exploration, propensities logged)
plays user episodes; at every step the simulator also computes, for each target policy, the
true expected clicks of the slate that policy would have shown in the user's hidden state
(:class:`agents.ope.TruthRecorder`). The estimators of :mod:`agents.ope` (slate IPS, SNIPS,
the cascade estimator, the direct method with a click model from the ranker, cascade doubly
robust) then estimate each target's value from the log, and bootstrap logs of 1k-100k
sessions give bias, standard deviation and RMSE against the log size. The Open Bandit
Pipeline's slate estimators (``obp``, where installed) run on the same arrays as an anchor.

The truth is the value at the log's states; the table also shows each policy's online value
(acting on its own state distribution), which one-step estimators do not target.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from matplotlib.figure import Figure

from agents.base import PopularAgent
from agents.ope import (
    ESTIMATORS,
    ClickModel,
    DeterministicTarget,
    EpsilonGreedyTarget,
    PopularityTarget,
    TruthRecorder,
    UniformTarget,
    bootstrap_estimates,
    estimate,
)
from agents.pipeline import MultiStagePipeline, Source
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
from benchmarks.stats import paired_effect
from retrieval.model import TwoTowerModel
from retrieval.train import TrainConfig, fit_two_tower
from simenv import BatchedRecEnv, PopularityPolicy, collect
from simenv.history import impression_examples

# user slots stepped at once: every slot acts until the last episode of the run ends (up to
# the 200-step horizon), so a wave of all users at once computes ~10x more rows than it records
# (mean episodes are ~25 slates); 256 slots play users back to back and waste little. Per-user
# outcomes do not depend on it (common random numbers per user).
SLOTS = 256


@dataclass(frozen=True)
class OPEConfig(ExperimentConfig):
    """Off-policy estimators vs the simulator's truth, against the log size."""

    behaviour_epsilon: float = param(0.2, "uniform exploration of the behaviour policy")
    train_episodes_per_user: float = param(
        1.0, "logged episodes per user of the models' training log"
    )
    log_users: int = param(2_500, "user episodes in the evaluation log (the bootstrap population)")
    sizes: tuple[int, ...] = param((1_000, 3_000, 10_000, 30_000, 100_000), "log sizes (sessions)")
    replicates: int = param(200, "bootstrap logs per size")
    quota: int = param(200, "K of the pipeline target")
    ranker_epochs: int = param(2, "ranker epochs (the DM's click model and the pipeline)")
    epochs: int = param(5, "generator epochs of the pipeline target")
    truth_draws: int = param(3, "slates drawn per step for a stochastic target's truth")
    online_users: int = param(600, "users of each target's online run")
    calibration_requests: int = param(20_000, "logged requests that calibrate the click model")
    horizon: int = param(0, "slates per episode (0: the profile's horizon; smoke tests cut it)")

    def __post_init__(self) -> None:
        if not 0.0 < self.behaviour_epsilon <= 1.0:
            raise ValueError(
                f"behaviour_epsilon must be in (0, 1] (full support), got {self.behaviour_epsilon}"
            )
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 0:
            raise ValueError(f"horizon must be an integer >= 0, got {self.horizon!r}")
        if not self.train_episodes_per_user > 0:
            raise ValueError(
                f"train_episodes_per_user must be > 0, got {self.train_episodes_per_user}"
            )
        if not self.sizes or any(not isinstance(s, int) or s < 10 for s in self.sizes):
            raise ValueError(f"sizes must be integers >= 10, got {self.sizes!r}")
        for name in ("log_users", "replicates", "quota", "ranker_epochs", "epochs", "truth_draws",
                     "online_users", "calibration_requests"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")

    @classmethod
    def quick(cls) -> OPEConfig:
        return replace(
            cls(), log_users=1_500, sizes=(300, 1_000, 3_000, 10_000), replicates=100,
            ranker_epochs=1, epochs=3, truth_draws=2, online_users=500, calibration_requests=5_000,
        )  # fmt: skip


def _nanmean(v) -> float:
    a = np.asarray(v, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


class _Acting:
    """A target policy as an agent (``act`` = one draw), for its online run."""

    def __init__(self, target) -> None:
        self.target, self.name = target, target.name
        self.last_candidates = None

    def act(self, obs):
        return self.target.draw(obs)


def _obp_anchor(data, t: int, k: int) -> dict[str, float] | str:
    """Obp's SlateStandardIPS and SlateRewardInteractionIPS on the same arrays (or why not)."""
    try:
        from obp.ope import SlateRewardInteractionIPS, SlateStandardIPS
    except Exception as e:  # noqa: BLE001  (report the reason, whatever it is)
        return f"obp unavailable: {type(e).__name__}: {e}"
    n = len(data)
    mu_cum = np.cumprod(data.behaviour, axis=1)
    pi_cum = np.cumprod(data.target[t], axis=1)
    common = dict(
        slate_id=np.repeat(np.arange(n), k), reward=data.clicks.ravel(),
        position=np.tile(np.arange(k), n),
    )  # fmt: skip
    try:
        std = SlateStandardIPS(len_list=k).estimate_policy_value(
            **common,
            pscore=np.repeat(mu_cum[:, -1], k),
            evaluation_policy_pscore=np.repeat(pi_cum[:, -1], k),
        )
        rips = SlateRewardInteractionIPS(len_list=k).estimate_policy_value(
            **common, pscore_cascade=mu_cum.ravel(), evaluation_policy_pscore_cascade=pi_cum.ravel()
        )
    except Exception as e:  # noqa: BLE001  (obp's input checks: report, do not crash the run)
        return f"obp raised {type(e).__name__}: {e}"
    return {"ips": float(std), "cascade": float(rips)}


@experiment(
    "ope",
    "Off-policy estimators (IPS, SNIPS, cascade, DM from the ranker, cascade DR) vs the simulator's true value: bias, std, RMSE against log size; obp anchor.",
    OPEConfig,
)
def run(cfg: OPEConfig, ctx: RunContext) -> None:
    value_rows, err_rows, anchor_rows = [], [], []
    curves: dict[tuple[str, str], list[list[float]]] = {}
    sq_err_10k: dict[tuple[str, str], list[np.ndarray]] = {}
    target_names: list[str] = []
    for seed in ctx.seeds:
        data = offline_data(ctx.quick, seed, "popularity", 0.05, cfg.train_episodes_per_user)
        world, k = data.world, data.env.slate_size
        wl = world_label(env_config(ctx.quick), seed)
        # ---- the models behind the pipeline target and the direct method
        with ctx.timer("models") as t_m:
            ranker = trained_ranker(data, seed, cfg.ranker_epochs, ctx.threads)
            gen = TwoTowerModel.build(default_two_tower(64), world.catalog)
            fit_two_tower(
                gen, mixed_negatives(), data.train, data.seq_train,
                TrainConfig(epochs=cfg.epochs, seed=seed, progress=False, threads=ctx.threads),
                valid=data.valid_set, release_time=world.catalog.release_time,
            )  # fmt: skip
            ex = impression_examples(data.train, data.seq_train, data.history_length)
            rows = ctx.rng(seed, "calibration").choice(
                len(ex.items), min(cfg.calibration_requests, len(ex.items)), replace=False
            )
            obs = {key: v[rows] for key, v in ex.obs.items()}
            click_model = ClickModel(ranker, k).fit(
                ranker.score(obs, ex.items[rows]), ex.labels[rows]
            )
        ctx.log(f"seed {seed}: ranker + generator + click model {t_m.seconds:.0f} s")
        targets = [
            DeterministicTarget(
                MultiStagePipeline([Source(two_tower_generator(gen, data), cfg.quota)], ranker, k),
                f"pipeline (two-tower K={cfg.quota} -> ranker)",
            ),
            DeterministicTarget(
                PopularAgent(data.train_counts, world.catalog.release_time, k), "popular"
            ),
            UniformTarget(
                world.catalog.release_time, k, seed=ctx.seed_int(seed, "uniform"), name="random"
            ),
            EpsilonGreedyTarget(
                data.train_counts,
                world.catalog.release_time,
                k,
                0.5,
                seed=ctx.seed_int(seed, "eg"),
                name="epsilon-greedy over logged popularity (eps=0.5)",
            ),
            PopularityTarget(
                world,
                k,
                epsilon=0.05,
                seed=ctx.seed_int(seed, "pl"),
                name="logging policy with eps=0.05",
            ),
        ]
        target_names = [t.name for t in targets]
        # ---- the evaluation log, with the truth at every logged state
        env = BatchedRecEnv(
            min(cfg.log_users, SLOTS), data.env, world=world, max_episode_steps=cfg.horizon or None
        )
        behaviour = PopularityPolicy(
            world, k, cfg.behaviour_epsilon, seed=ctx.seed_int(seed, "behaviour")
        )
        rec = TruthRecorder(env, behaviour, targets, click_model, n_draws=cfg.truth_draws)
        with ctx.timer("log") as t_l:
            log = collect(env, rec, cfg.log_users, seed=ctx.seed_int(seed, "log"), progress=False)
            od = rec.data(log)
        n_sess = int(od.session_key.max()) + 1
        ctx.log(
            f"seed {seed}: log of {len(od)} requests / {n_sess} sessions with truth in {t_l.seconds:.0f} s"
        )
        ctx.report.sanity(
            f"seed {seed}: the behaviour's true expected clicks match its observed clicks (on-policy)",
            passed=bool(abs(od.behaviour_truth.mean() - od.clicks.sum(1).mean()) < 4 * od.clicks.sum(1).std() / np.sqrt(len(od))),
            evidence=f"truth {od.behaviour_truth.mean():.4f}, observed {od.clicks.sum(1).mean():.4f} clicks per slate",
        )  # fmt: skip
        rng = ctx.rng(seed, "bootstrap")
        for t, tgt in enumerate(targets):
            truth = float(od.truth[t].mean())
            on = rollout(env, _Acting(tgt), cfg.online_users, seed=ctx.seed_int(seed, "online"))
            clicks = on.outcomes["clicks"].sum() / max(on.outcomes["slates"].sum(), 1)
            full = estimate(od, t)
            value_rows.append({
                "seed": seed, "world": wl, "target": tgt.name, "truth (logged states)": truth,
                "online value": float(clicks),
                **{f"{e}": full[e]["value"] for e in ESTIMATORS},
            })  # fmt: skip
            anchor = _obp_anchor(od, t, k)
            if isinstance(anchor, dict):
                anchor_rows.append({"seed": seed, "target": tgt.name, "ips (ours)": full["ips"]["value"],
                                    "ips (obp)": anchor["ips"], "cascade (ours)": full["cascade"]["value"],
                                    "cascade (obp)": anchor["cascade"]})  # fmt: skip
            else:
                anchor_rows.append({"seed": seed, "target": tgt.name, "note": anchor})
            boot = bootstrap_estimates(od, t, cfg.sizes, cfg.replicates, rng)
            for size, by_est in boot.items():
                for e, vals in by_est.items():
                    err = vals - truth
                    fin = np.isfinite(err)
                    err_rows.append({
                        "seed": seed, "target": tgt.name, "estimator": e, "sessions": size,
                        "bias": float(err[fin].mean()) if fin.any() else np.nan,
                        "std": float(err[fin].std(ddof=1)) if fin.sum() > 1 else np.nan,
                        "rmse": float(np.sqrt(np.mean(err[fin] ** 2))) if fin.any() else np.nan,
                        "rel_rmse": float(np.sqrt(np.mean(err[fin] ** 2)) / truth) if fin.any() else np.nan,
                        "undefined": float(1 - fin.mean()),
                    })  # fmt: skip
                    if fin.any():
                        curves.setdefault((tgt.name, e), []).append(
                            [size, float(np.sqrt(np.mean(err[fin] ** 2)))]
                        )
                    if size == 10_000:
                        sq_err_10k.setdefault((tgt.name, e), []).append(err**2)

    # ---- report
    ctx.report.table(
        "True value at the logged states, online value, and each estimator on the whole log (clicks per slate)",
        value_rows, fmt=".4f",
        note="truth: expected clicks of the target's slate in the user's hidden state at every logged request (the estimand); online: the target acting on its own state distribution.",
    )  # fmt: skip
    agg: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    for r in err_rows:
        d = agg.setdefault((r["target"], r["estimator"], r["sessions"]), {})
        for m in ("bias", "std", "rmse", "rel_rmse", "undefined"):
            d.setdefault(m, []).append(r[m])
    table = [
        {
            "target": tg,
            "estimator": e,
            "sessions": s,
            **{m: _nanmean(v) for m, v in d.items()},
        }
        for (tg, e, s), d in agg.items()
    ]
    ctx.report.table(
        "Bias, standard deviation and RMSE against the log size (bootstrap logs of whole sessions)",
        table, fmt={"bias": "+.4f", "std": ".4f", "rmse": ".4f", "rel_rmse": ".3f", "undefined": ".2f"},
        note=f"{cfg.replicates} bootstrap logs per size and seed, mean over seeds; rel_rmse = RMSE / truth; undefined = share of logs where SNIPS had no positive weight.",
    )  # fmt: skip
    at10 = [r for r in table if r["sessions"] == 10_000]
    if at10:
        ctx.report.table(
            "RMSE at 10,000 sessions",
            [{"target": tg, **{e: next((r["rmse"] for r in at10 if r["target"] == tg and r["estimator"] == e), None)
                               for e in ESTIMATORS}} for tg in target_names],
            fmt=".4f",
        )  # fmt: skip
        # findings: paired over bootstrap replicates (same resampled logs for both estimators)
        for tg in target_names:
            if (tg, "dr") in sq_err_10k and (tg, "cascade") in sq_err_10k:
                dr = np.concatenate(sq_err_10k[(tg, "dr")])
                ca = np.concatenate(sq_err_10k[(tg, "cascade")])
                ok = np.isfinite(dr) & np.isfinite(ca)
                ctx.report.finding(
                    f"{tg}: cascade DR (ranker click model) has a lower mean squared error than the cascade IPS estimator at 10k sessions",
                    paired_effect(dr[ok], ca[ok], unit="bootstrap logs"), metric="squared error (clicks per slate)^2",
                    direction="<",
                    note="bootstrap logs resample one population, so the interval is conditional on it",
                )  # fmt: skip
    if anchor_rows and "note" not in anchor_rows[0]:
        diffs = [
            max(
                abs(r["ips (ours)"] - r["ips (obp)"]), abs(r["cascade (ours)"] - r["cascade (obp)"])
            )
            for r in anchor_rows
        ]
        ctx.report.sanity(
            "our slate IPS and cascade estimators equal obp's SlateStandardIPS and SlateRewardInteractionIPS on the same arrays",
            passed=bool(max(diffs) < 1e-9 * max(1.0, max(abs(r["ips (obp)"]) for r in anchor_rows)) + 1e-12),
            evidence=f"largest absolute difference {max(diffs):.3g}",
        )  # fmt: skip
    ctx.report.table("Anchor: the Open Bandit Pipeline on the same logs", anchor_rows, fmt=".6f")
    fig = Figure(figsize=(4.0 * len(target_names), 3.4))
    for i, tg in enumerate(target_names):
        ax = fig.add_subplot(1, len(target_names), i + 1)
        for e in ESTIMATORS:
            pts = curves.get((tg, e))
            if pts:
                arr = np.array(pts)
                xs = sorted(set(arr[:, 0]))
                ys = [_nanmean(arr[arr[:, 0] == x, 1]) for x in xs]
                ax.loglog(xs, ys, "o-", label=e)
        ax.set_title(tg, fontsize=7)
        ax.set_xlabel("sessions in the log")
        if i == 0:
            ax.set_ylabel("RMSE (clicks per slate)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    ctx.report.figure(
        "rmse_vs_log_size", fig, "RMSE of each estimator against the log size, per target policy."
    )
    best = {}
    for tg in target_names:
        rows = [r for r in (at10 or table) if r["target"] == tg and np.isfinite(r["rmse"])]
        if rows:
            b = min(rows, key=lambda r: r["rmse"])
            best[tg] = f"{b['estimator']} {b['rmse']:.3f}"
    ctx.report.headline(
        "lowest RMSE at 10k sessions: " + "; ".join(f"{k}: {v}" for k, v in best.items())
    )
