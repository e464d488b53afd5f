"""perf-env: how fast the simulator steps users, and what a big world costs to build.

Measured side by side in one run (the machine is shared and noisy, so ratios are what count;
absolute speeds and build times are per CPU second of the process, single-threaded, which is
the wall time on an idle core, and are printed per wall second too):
``BatchedRecEnv`` stepping B users at once with numpy vs ``gymnasium.vector.SyncVectorEnv``
of single-user ``RecEnv`` on the same world; plus the wall time and peak memory of building a
1,000,000-item, 1,000,000-user world (each build in a fresh subprocess, so the peak is the
build's own).

Findings: throughput against its target (t interval over the repetitions), the batched /
sync ratio against its bar (a log-scale t interval over repetitions measured side by side)
and the world-build time against "in seconds" (under 10 s; t interval over the builds).
The build's peak memory is deterministic (set by the arrays allocated), so its bar is a
sanity check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import gymnasium as gym
import numpy as np
from matplotlib.figure import Figure

from benchmarks.registry import ExperimentConfig, experiment, param
from benchmarks.runner import RunContext
from benchmarks.stats import mean_std, one_sample_effect, ratio_effect
from simenv import BatchedRecEnv, EnvConfig, RecEnv, World, WorldConfig
from simenv.clock import released


@dataclass(frozen=True)
class PerfEnvConfig(ExperimentConfig):
    """Simulator throughput and world-build cost."""

    n_items: int = param(100_000, "catalog size of the stepped world")
    batch: int = param(10_000, "users stepped at once by BatchedRecEnv")
    sync_batch: int = param(64, "RecEnv copies in the SyncVectorEnv baseline")
    steps: int = param(100, "timed steps per measurement (after warm-up)")
    sync_steps: int = param(40, "timed steps of the SyncVectorEnv baseline")
    repeats: int = param(3, "alternating repeats of each measurement (median reported)")
    scaling_batches: tuple[int, ...] = param(
        (100, 1_000, 10_000, 30_000), "B values of the scaling curve"
    )
    build_items: int = param(1_000_000, "items of the big world built in a subprocess")
    build_users: int = param(1_000_000, "users of the big world built in a subprocess")
    target_steps_per_s: float = param(1_000_000.0, "target user-steps/s of BatchedRecEnv")
    target_ratio: float = param(100.0, "target ratio BatchedRecEnv / SyncVectorEnv")
    build_repeats: int = param(3, "builds of the big world, each in a fresh subprocess")
    target_build_s: float = param(10.0, "target seconds to build the big world ('in seconds')")
    target_build_gib: float = param(2.0, "target peak GiB to build the big world")

    def __post_init__(self) -> None:
        for name in (
            "n_items",
            "batch",
            "sync_batch",
            "steps",
            "sync_steps",
            "repeats",
            "build_items",
            "build_users",
            "build_repeats",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def quick(cls) -> PerfEnvConfig:
        return replace(
            cls(),
            steps=30,
            sync_steps=15,
            repeats=2,
            scaling_batches=(100, 1_000, 10_000),
            build_items=200_000,
            build_users=200_000,
            build_repeats=2,
        )


def _slates(world: World, batch: int, k: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` batches of random slates of distinct items released at time 0 (policy cost excluded)."""
    pool = np.nonzero(released(world.catalog.release_time, 0.0))[0]
    out = []
    for _ in range(n):
        base = rng.integers(0, pool.size - 4 * k, size=(batch, 1))
        offs = np.argsort(rng.random((batch, 4 * k)), axis=1)[:, :k]
        out.append(pool[base + offs])
    return out


def _rates(n_user_steps: int, step: Callable[[int], Any], steps: int) -> tuple[float, float]:
    """User-steps per CPU second of this process and per wall second, over ``steps`` calls."""
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(steps):
        step(i)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return n_user_steps / max(cpu, 1e-9), n_user_steps / max(wall, 1e-9)


def _batched_rates(env: BatchedRecEnv, slates: list[np.ndarray], steps: int) -> tuple[float, float]:
    """BatchedRecEnv user-steps per CPU second and per wall second (after 3 warm-up steps)."""
    for i in range(3):
        env.step(slates[i % len(slates)])
    return _rates(env.num_envs * steps, lambda i: env.step(slates[i % len(slates)]), steps)


def _sync_rates(
    envs: gym.vector.SyncVectorEnv, slates: list[np.ndarray], steps: int
) -> tuple[float, float]:
    """SyncVectorEnv user-steps per CPU second and per wall second (after 2 warm-up steps)."""
    for i in range(2):
        envs.step(slates[i % len(slates)])
    return _rates(envs.num_envs * steps, lambda i: envs.step(slates[i % len(slates)]), steps)


def _time_batched(env: BatchedRecEnv, slates: list[np.ndarray], steps: int) -> float:
    """BatchedRecEnv user-steps per wall second (used by benchmarks.perf)."""
    return _batched_rates(env, slates, steps)[1]


def _time_sync(envs: gym.vector.SyncVectorEnv, slates: list[np.ndarray], steps: int) -> float:
    """SyncVectorEnv user-steps per wall second (used by benchmarks.perf)."""
    return _sync_rates(envs, slates, steps)[1]


_BUILD_SNIPPET = """
import json, time
from simenv import World, WorldConfig
c0, t0 = time.process_time(), time.perf_counter()
w = World(WorldConfig(n_items={items}, n_users={users}), seed=0)
secs, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({{"seconds": secs, "cpu_seconds": cpu, "peak_bytes": peak}}))
"""

_BASELINE_SNIPPET = """
import json
import simenv
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"peak_bytes": peak}))
"""


def _subprocess_json(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@experiment(
    "perf-env",
    "User-steps/s of BatchedRecEnv vs SyncVectorEnv of RecEnv, scaling in B, and the cost of a 1M x 1M world.",
    PerfEnvConfig,
)
def run(cfg: PerfEnvConfig, ctx: RunContext) -> None:
    seed = ctx.seeds[0]
    env_cfg = EnvConfig(world=WorldConfig(n_items=cfg.n_items))
    with ctx.timer("world") as tw:
        world = World(env_cfg.world, seed=seed, user_model=env_cfg.user_model)
    rng = ctx.rng(seed, "slates")
    k = env_cfg.slate_size
    batched = BatchedRecEnv(cfg.batch, env_cfg, world=world)
    batched.reset(seed=seed)
    sync = gym.vector.SyncVectorEnv(
        [lambda: RecEnv(env_cfg, world=world) for _ in range(cfg.sync_batch)]
    )
    sync.reset(seed=seed)
    slates_b = _slates(world, cfg.batch, k, 8, rng)
    slates_s = _slates(world, cfg.sync_batch, k, 8, rng)
    fast, slow, fast_wall, slow_wall = [], [], [], []  # per CPU second / per wall second
    for _ in ctx.progress(range(cfg.repeats), desc="batched vs sync"):
        cpu, wall = _batched_rates(batched, slates_b, cfg.steps)
        fast.append(cpu)
        fast_wall.append(wall)
        cpu, wall = _sync_rates(sync, slates_s, cfg.sync_steps)
        slow.append(cpu)
        slow_wall.append(wall)
    sync.close()
    fast_m, slow_m = float(np.median(fast)), float(np.median(slow))
    ratio = fast_m / slow_m
    rows = [
        {
            "env": f"BatchedRecEnv (B={cfg.batch})",
            "user_steps_per_cpu_s": fast_m,
            "user_steps_per_wall_s": float(np.median(fast_wall)),
            "runs (per CPU s)": ", ".join(f"{x:,.0f}" for x in fast),
        },
        {
            "env": f"SyncVectorEnv of RecEnv (B={cfg.sync_batch})",
            "user_steps_per_cpu_s": slow_m,
            "user_steps_per_wall_s": float(np.median(slow_wall)),
            "runs (per CPU s)": ", ".join(f"{x:,.0f}" for x in slow),
        },
    ]
    ctx.report.section(
        "Setup",
        f"World: {cfg.n_items:,} items, {env_cfg.world.n_users:,} users, slate {k}, full dynamics "
        f"(MNL with position bias, fatigue, drift, budget, returns), history L={env_cfg.history_length}. "
        f"Slates are random distinct released items drawn before timing (the policy's cost is excluded; "
        f"validation of every action is included). Measurements alternate {cfg.repeats} times; medians shown. "
        f"World build for the stepped world: {tw.seconds:.2f} s.",
    )
    ctx.report.table(
        "Throughput (user-steps per second)",
        rows,
        fmt={"user_steps_per_cpu_s": ",.0f", "user_steps_per_wall_s": ",.0f"},
        note="Per CPU second of the process (time.process_time; one thread, so on an idle core "
        "the same as per wall second) and per wall second (lower when the machine is shared).",
    )
    ctx.report.add_result("batched_user_steps_per_s", fast)
    ctx.report.add_result("sync_user_steps_per_s", slow)
    ctx.report.add_result("batched_user_steps_per_wall_s", fast_wall)
    ctx.report.add_result("sync_user_steps_per_wall_s", slow_wall)
    ctx.report.add_result("ratio", ratio)
    ctx.report.finding(
        f"BatchedRecEnv reaches {cfg.target_steps_per_s:,.0f} user-steps/s at B={cfg.batch:,}, "
        f"{cfg.n_items:,} items",
        one_sample_effect(fast, cfg.target_steps_per_s, relative=True, unit="repetitions"),
        metric="user-steps per CPU second, relative to the target",
        note=f"runs: {', '.join(f'{x:,.0f}' for x in fast)} user-steps per CPU second "
        f"({', '.join(f'{x:,.0f}' for x in fast_wall)} per wall second)",
    )
    ctx.report.finding(
        f"BatchedRecEnv is at least {cfg.target_ratio:g}x SyncVectorEnv of RecEnv (same world, "
        "measured side by side in each repetition)",
        ratio_effect(fast, slow, bar=cfg.target_ratio, unit="repetitions"),
        metric="ratio of user-steps per CPU second",
    )

    # scaling in B
    scale_rows = []
    for b in ctx.progress(cfg.scaling_batches, desc="scaling in B"):
        env = BatchedRecEnv(b, env_cfg, world=world)
        env.reset(seed=seed)
        sl = _slates(world, b, k, 4, rng)
        steps = max(5, min(cfg.steps * cfg.batch // b, 2_000))
        cpu, wall = _batched_rates(env, sl, steps)
        scale_rows.append({"B": b, "user_steps_per_s": cpu, "user_steps_per_wall_s": wall})
    ctx.report.table(
        "Scaling with the number of users stepped at once",
        scale_rows,
        fmt={"user_steps_per_s": ",.0f", "user_steps_per_wall_s": ",.0f"},
        note="user_steps_per_s: per CPU second of the process.",
    )
    fig = Figure(figsize=(5, 3.4))
    ax = fig.add_subplot()
    ax.plot(
        [r["B"] for r in scale_rows],
        [r["user_steps_per_s"] for r in scale_rows],
        "o-",
        label="BatchedRecEnv",
    )
    ax.axhline(slow_m, color="gray", ls="--", label=f"SyncVectorEnv (B={cfg.sync_batch})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("users stepped at once (B)")
    ax.set_ylabel("user-steps per CPU second")
    ax.legend()
    fig.tight_layout()
    ctx.report.figure("scaling", fig, "User-steps per second against B (log-log).")

    # world build cost in a fresh process
    base = _subprocess_json(_BASELINE_SNIPPET)
    builds = [
        _subprocess_json(_BUILD_SNIPPET.format(items=cfg.build_items, users=cfg.build_users))
        for _ in ctx.progress(range(cfg.build_repeats), desc="big world builds")
    ]
    secs = np.array([b["cpu_seconds"] for b in builds])
    wall = np.array([b["seconds"] for b in builds])
    gibs = np.array([b["peak_bytes"] for b in builds]) / 2**30
    ctx.report.table(
        "Building a big world (fresh process)",
        [
            {
                "items": cfg.build_items,
                "users": cfg.build_users,
                "builds": len(builds),
                "cpu_seconds": mean_std(secs),
                "wall_seconds": mean_std(wall),
                "peak_GiB": mean_std(gibs),
                "interpreter_and_imports_GiB": base["peak_bytes"] / 2**30,
            }
        ],
        fmt={
            "cpu_seconds": ".2f",
            "wall_seconds": ".2f",
            "peak_GiB": ".2f",
            "interpreter_and_imports_GiB": ".2f",
            "items": ",d",
            "users": ",d",
        },
        note="Mean ± std over the builds, each in a fresh process. CPU seconds of the build "
        "(one thread: its wall time on an idle core); wall seconds grow when the machine is "
        "shared. Peak resident memory "
        "(VmHWM, which exec resets) of the whole process, interpreter and imports included.",
    )
    ctx.report.add_result(
        "build",
        {
            "seconds": secs.tolist(),
            "wall_seconds": wall.tolist(),
            "peak_bytes": [b["peak_bytes"] for b in builds],
            "items": cfg.build_items,
            "users": cfg.build_users,
        },
    )
    ctx.report.finding(
        f"A {cfg.build_items:,}-item, {cfg.build_users:,}-user world builds in seconds: under "
        f"{cfg.target_build_s:g} s",
        one_sample_effect(secs, cfg.target_build_s, unit="builds"),
        metric="build CPU seconds minus the bar",
        direction="<",
        note=f"builds: {', '.join(f'{x:.2f} s' for x in secs)} CPU "
        f"({', '.join(f'{x:.2f} s' for x in wall)} wall)",
    )
    # Peak memory is set by the arrays the world allocates (the same in every build and on
    # every load): nothing random can push it over the bar, so it guards the run, not a claim.
    ctx.report.sanity(
        f"... and in under {cfg.target_build_gib:g} GiB peak memory",
        bool(gibs.max() < cfg.target_build_gib),
        f"peak {gibs.max():.2f} GiB (interpreter and imports alone "
        f"{base['peak_bytes'] / 2**30:.2f} GiB) vs {cfg.target_build_gib:g} GiB",
    )
    ctx.report.headline(
        f"BatchedRecEnv {fast_m:,.0f} user-steps/s at B={cfg.batch:,}, {ratio:.0f}x SyncVectorEnv; "
        f"{cfg.build_items:,}x{cfg.build_users:,} world in {secs.mean():.1f} s, {gibs.max():.2f} GiB"
    )
