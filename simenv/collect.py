"""``collect``: roll a policy in the batched env and record an :class:`ImpressionLog`."""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from simenv.batched_env import BatchedRecEnv
from simenv.config import check_range
from simenv.log import ImpressionLog
from simenv.types import Columns, Obs, obs_users

__all__ = ["collect"]


def collect(
    env: BatchedRecEnv,
    policy: Any,
    n_users: int,
    seed: int = 0,
    users: np.ndarray | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    active_only: bool = False,
) -> ImpressionLog:
    """Run ``policy`` for ``n_users`` whole user episodes and return their impressions.

    Each slot of the batched env plays one user episode after another; once ``n_users``
    episodes have started, slots whose episode ends stop being recorded, and collection ends
    when every recorded episode has ended (or after ``max_steps`` env steps, cutting episodes).

    Args:
        env: a :class:`BatchedRecEnv` (its ``num_envs`` users run in parallel).
        policy: ``act(obs) -> slates`` or ``-> (slates, propensities)`` (or propensities in
            ``last_propensities``); ``last_candidates`` (B, K) after ``act`` is recorded as the
            candidate set when present.
        n_users: number of user episodes to record.
        seed: the env's reset seed.
        users: user ids to run, in order (default: a seeded permutation of the population,
            so no user appears twice while ``n_users <= n_users in the world``).
        max_steps: safety cap on env steps.
        progress: show a tqdm bar (episodes finished).
        meta: extra entries for the log's ``meta``.
        active_only: call the policy only on the slots whose step is recorded (an episode of
            ``users`` that is running); slots that finished their episodes or are resetting
            get a fixed valid slate and are not recorded. Once most episodes have ended, the
            policy is no longer evaluated for idle slots (the tail of a few long episodes costs
            what those episodes cost); the recorded rows are the same as without it whenever
            the simulator's draws of a user do not depend on the other slots' slates. A policy
            that reads the env's state instead of the observation (an oracle) may still return
            all B slates; the live rows are taken from them.

    Returns:
        The log, rows in step order, with ``meta`` recording the seed, policy and world.
    """
    if not isinstance(env, BatchedRecEnv):
        raise ValueError(f"env must be a simenv.BatchedRecEnv, got {type(env).__name__}")
    check_range("n_users", n_users, 1, 1e9, integer=True)
    b = env.num_envs
    if users is None:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC011EC7]))
        pop = env.world.n_users
        users = np.concatenate([rng.permutation(pop) for _ in range(-(-n_users // pop))])[:n_users]
    users = np.asarray(users, dtype=np.int64)
    if users.shape != (n_users,):
        raise ValueError(f"users must have shape ({n_users},), got {users.shape}")
    first = users[:b]
    if first.size < b:  # more slots than users: pad with later-ignored random users
        first = np.concatenate([first, users[np.arange(b - first.size) % users.size]])
    obs, _ = env.reset(seed=seed, options={"user_ids": first})
    env.queue_users(users[b:])
    started = min(b, n_users)
    recording = np.arange(b) < n_users
    resetting = np.zeros(b, dtype=bool)  # slots whose next step is an autoreset (not recorded)
    k = env.config.slate_size
    parts: dict[str, list[np.ndarray]] = {
        c: []
        for c in (
            Columns.USER,
            Columns.TIME,
            Columns.SESSION,
            "session_step",
            Columns.REQUEST,
            Columns.POSITION,
            Columns.ITEM,
            Columns.FEEDBACK,
            Columns.WATCH,
            Columns.REWARD,
            Columns.PROPENSITY,
        )
    }
    cand_parts: list[np.ndarray] = []
    cand_req: list[np.ndarray] = []
    next_request = 0
    finished = 0
    steps = 0
    positions = np.tile(np.arange(k, dtype=np.int16), b)
    bar = tqdm(
        total=n_users,
        desc=f"collect {getattr(policy, 'name', type(policy).__name__)}",
        disable=not progress,
        unit="user",
    )
    while recording.any():
        if max_steps is not None and steps >= max_steps:
            break
        live = np.nonzero(recording & ~resetting)[0] if active_only else None
        if live is not None and live.size == 0:  # every recorded slot is resetting this step
            out, cands = (np.zeros((0, k), np.int64), None), None
        else:
            out = policy.act(obs if live is None else {key: v[live] for key, v in obs.items()})
            cands = getattr(policy, "last_candidates", None)
        slates, prop = (
            out if isinstance(out, tuple) else (out, getattr(policy, "last_propensities", None))
        )
        slates = np.asarray(slates, dtype=np.int64)
        if live is not None and slates.shape[0] == b and live.size != b:
            # a policy that reads the env itself (an oracle) may answer for every slot
            slates = slates[live]
            prop = None if prop is None else np.asarray(prop)[live]
            cands = None if cands is None else np.asarray(cands)[live]
        if live is not None:  # scatter the live rows into full-size arrays
            full = np.broadcast_to(env.sim.safe_slate, (b, k)).copy()
            full[live] = slates
            slates = full
            if prop is not None:
                p_full = np.ones((b, k), np.float32)
                p_full[live] = np.asarray(prop, np.float32)
                prop = p_full
            if cands is not None:
                c_full = np.full((b, np.shape(cands)[1]), -1, np.int64)
                c_full[live] = np.asarray(cands, np.int64)
                cands = c_full
        ctx = obs[Obs.CONTEXT]
        user_now = obs_users(obs)
        obs, reward, term, trunc, info = env.step(slates)
        steps += 1
        rows = np.nonzero(recording & ~resetting)[0]
        resetting = term | trunc
        n = rows.size
        req = next_request + np.arange(n)
        next_request += n
        chosen = info["clicked_position"][rows]
        fb = np.zeros((n, k), dtype=np.int8)
        watch = np.zeros((n, k), dtype=np.float32)
        rew = np.zeros((n, k), dtype=np.float32)
        hit = np.nonzero(chosen >= 0)[0]
        fb[hit, chosen[hit]] = info["event"][rows][hit]
        watch[hit, chosen[hit]] = info["watch_minutes"][rows][hit]
        rew[hit, chosen[hit]] = reward[rows][hit]
        parts[Columns.USER].append(np.repeat(user_now[rows], k))
        parts[Columns.TIME].append(np.repeat(ctx[rows, 0].astype(np.float64), k))
        parts[Columns.SESSION].append(np.repeat(ctx[rows, 1].astype(np.int32), k))
        parts["session_step"].append(np.repeat(ctx[rows, 2].astype(np.int32), k))
        parts[Columns.REQUEST].append(np.repeat(req, k))
        parts[Columns.POSITION].append(positions[: n * k])
        parts[Columns.ITEM].append(slates[rows].ravel())
        parts[Columns.FEEDBACK].append(fb.ravel())
        parts[Columns.WATCH].append(watch.ravel())
        parts[Columns.REWARD].append(rew.ravel())
        parts[Columns.PROPENSITY].append(
            np.full(n * k, np.nan, np.float32)
            if prop is None
            else np.asarray(prop, np.float32)[rows].ravel()
        )
        if cands is not None:
            cand_parts.append(np.asarray(cands, dtype=np.int64)[rows])
            cand_req.append(req)
        done = np.nonzero((term | trunc) & recording)[0]
        if done.size:
            finished += done.size
            bar.update(done.size)
            # the slots that ended start a new user next step; record them while users remain
            n_new = min(done.size, n_users - started)
            started += n_new
            recording[done[n_new:]] = False
    bar.close()
    cols = {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in parts.items()}
    if cand_parts:
        width = max(c.shape[1] for c in cand_parts)
        cand = np.concatenate(
            [np.pad(c, ((0, 0), (0, width - c.shape[1])), constant_values=-1) for c in cand_parts]
        )
        creq = np.concatenate(cand_req)
    else:
        cand = creq = None
    info_meta = {
        "seed": int(seed),
        "policy": getattr(policy, "name", type(policy).__name__),
        "n_users": int(n_users),
        "episodes_finished": int(finished),
        "env_steps": int(steps),
        "world": env.world.config.to_dict(),
        "world_seed": int(env.world.seed),
        "slate_size": int(k),
    }
    info_meta.update(meta or {})
    return ImpressionLog(cols, cand, creq, info_meta)
