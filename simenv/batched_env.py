"""``BatchedRecEnv``: B users stepped at once in numpy, a native ``gymnasium.vector.VectorEnv``."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from simenv.clock import released
from simenv.config import EnvConfig, check_range
from simenv.core import Simulator, StepResult
from simenv.rec_env import make_world
from simenv.spaces import SlateSpace, observation_space
from simenv.streams import seed_key
from simenv.world import World

__all__ = ["BatchedRecEnv"]


class BatchedRecEnv(VectorEnv):
    """B independent users of :class:`simenv.RecEnv`, stepped together with batched numpy.

    Same dynamics as ``RecEnv`` (see its docstring for the equations and spaces), same
    next-step autoreset as gymnasium 1.x vector envs: when a user's episode ends at step t
    (terminated or truncated), the action for that slot at step t+1 is ignored (not even
    validated), a new user is drawn, and step t+1 returns that user's first observation with
    reward 0 and ``terminated = truncated = False``. Users finish independently.

    Common random numbers: every random draw is a counter-based hash of (the seed of the last
    ``reset(seed=)``, user id, that user's episode number since then, step, draw index) (see
    :mod:`simenv.streams`), so a user's outcomes depend only on that user and the slates shown
    to them, never on the other slots, on B, or on the order users start in (users that are
    drawn, not given, come from per-slot streams). ``num_envs=1`` reproduces ``RecEnv``'s
    trajectory exactly for the same seed, across episodes.

    Reachable as ``gymnasium.make_vec("simenv/RecEnv-v0", num_envs=B,
    vectorization_mode="vector_entry_point")``.

    Args:
        num_envs: B, user slots.
        config: environment config.
        world: a prebuilt world (otherwise built from ``config.world`` and cached).
        world_seed: seed of the world.
        max_episode_steps: overrides ``config.max_steps`` (``make_vec`` passes the spec's).
        render_mode: ``None`` (no rendering).

    ``infos`` has, per slot: ``user``, ``group``, and after a step ``affinity`` (B, k),
    ``click_prob`` (B, k), ``clicked_position``, ``event``, ``watch_minutes``, ``session``,
    ``session_end`` (each with its ``_key`` mask as gymnasium vector infos do); with
    ``info_level="full"`` also ``best_utility``.
    """

    metadata: dict[str, Any] = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        config: EnvConfig | None = None,
        world: World | None = None,
        world_seed: int = 0,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        check_range("num_envs", num_envs, 1, 100_000_000, integer=True)
        config = EnvConfig() if config is None else config
        if not isinstance(config, EnvConfig):
            raise ValueError(f"config must be an EnvConfig, got {type(config).__name__}")
        if max_episode_steps is not None:
            check_range("max_episode_steps", max_episode_steps, 1, 10_000_000, integer=True)
            config = config.replace(max_steps=int(max_episode_steps))
        if render_mode is not None:
            raise ValueError(f"render_mode must be None for BatchedRecEnv, got {render_mode!r}")
        self.config = config
        self.render_mode = None
        self.num_envs = int(num_envs)
        self.world = make_world(config, world, world_seed)
        self.sim = Simulator(self.world, config, self.num_envs)
        n_items = self.world.n_items
        pool = np.nonzero(released(self.world.items.release_time, 0.0))[0]
        self.single_action_space = SlateSpace(n_items, config.slate_size, sample_pool=pool)
        self.action_space = SlateSpace(
            n_items, config.slate_size, batch=self.num_envs, sample_pool=pool
        )
        self.single_observation_space = observation_space(
            n_items, self.world.n_users, config.history_length
        )
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._needs_reset = np.zeros(self.num_envs, dtype=bool)
        self._started = False
        self._queue = np.zeros(0, dtype=np.int64)
        self._all = np.arange(self.num_envs)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Draw B new users. ``options={"user_ids": array (B,)}`` picks them.

        A ``seed`` keys every later random draw and restarts the users' episode counts; without
        one the streams go on (a first reset without a seed takes a key from OS entropy).
        """
        super().reset(seed=seed)
        if seed is not None or self.sim.stream_key is None:
            key = seed_key(seed) if seed is not None else int(self.np_random.integers(2**63))
            self.sim.seed_streams(key)
        users = None
        if options and "user_ids" in options:
            users = np.asarray(options["user_ids"])
            if users.shape != (self.num_envs,) or not np.issubdtype(users.dtype, np.integer):
                raise ValueError(
                    f"options['user_ids'] must be an int array of shape ({self.num_envs},), got {users!r}"
                )
            if users.min() < 0 or users.max() >= self.world.n_users:
                raise ValueError(f"options['user_ids'] must be in [0, {self.world.n_users - 1}]")
        if users is None and self._queue.size:
            users = self._pop_queue(self.num_envs)
        self.sim.reset_slots(self._all, users)
        self._needs_reset[:] = False
        self._started = True
        return self.sim.observation(), self._info(None)

    def step(
        self, actions: Any
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Show one slate per slot. Invalid actions of acting slots raise ``ValueError``; no state changes then."""
        if not self._started:
            raise RuntimeError("Call reset before using step method.")
        resetting = self._needs_reset
        any_reset = bool(resetting.any())
        active = ~resetting if any_reset else None
        slate = self.sim.validate(
            actions, None if active is None else np.nonzero(active)[0], name="actions"
        )
        res = self.sim.step(slate, active)
        if any_reset:
            rows = np.nonzero(resetting)[0]
            self.sim.reset_slots(rows, self._pop_queue(rows.size))
            res.reward[rows] = 0.0
            res.terminated[rows] = False
            res.truncated[rows] = False
        self._needs_reset = res.terminated | res.truncated
        return (
            self.sim.observation(),
            res.reward,
            res.terminated,
            res.truncated,
            self._info(res, resetting if any_reset else None),
        )

    def queue_users(self, user_ids: np.ndarray) -> None:
        """Users to start next, in order, at the coming autoresets (then random draws resume).

        Lets a data collector run each user of a list exactly once. Queued users replace the
        random user draw (the start-time draw still happens).
        """
        ids = np.asarray(user_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"user_ids must be a 1-D int array, got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.world.n_users):
            raise ValueError(f"user_ids must be in [0, {self.world.n_users - 1}]")
        self._queue = np.concatenate([self._queue, ids.astype(np.int64)])

    def _pop_queue(self, n: int) -> np.ndarray | None:
        if self._queue.size < n:
            return None if self._queue.size == 0 else self._fill_queue(n)
        head, self._queue = self._queue[:n], self._queue[n:]
        return head

    def _fill_queue(self, n: int) -> np.ndarray:
        # fewer queued users than slots to reset: the rest (-1) get users drawn by their slots
        extra = np.full(n - self._queue.size, -1, dtype=np.int64)
        head, self._queue = np.concatenate([self._queue, extra]), np.zeros(0, dtype=np.int64)
        return head

    def _info(self, res: StepResult | None, resetting: np.ndarray | None = None) -> dict[str, Any]:
        sim = self.sim
        info: dict[str, Any] = {"user": sim.user.copy(), "group": sim.group.copy()}
        if res is not None:
            info.update(
                affinity=res.affinity,
                click_prob=res.click_prob,
                clicked_position=res.chosen,
                event=res.event,
                watch_minutes=res.watch,
                session=res.session,
                session_end=res.session_end,
            )
            if self.config.info_level == "full":
                info["best_utility"] = sim.best_slates(1)[1][:, 0]
        valid = np.ones(self.num_envs, dtype=bool)
        masks = {}
        for key in info:
            m = valid
            if resetting is not None and key not in ("user", "group"):
                m = ~resetting
            masks["_" + key] = m
        info.update(masks)
        return info

    def best_slates(self, k: int | None = None, kind: str = "utility") -> np.ndarray:
        """Oracle slates (B, k), reading the truth.

        ``kind="utility"``: the released items of highest current click utility;
        ``"expected_reward"``: the greedy build in the expected reward of the reward mix (see
        :meth:`simenv.core.Simulator.best_slates`).
        """
        return self.sim.best_slates(k, kind=kind)[0]

    def expected_reward(self, slates: np.ndarray) -> np.ndarray:
        """Expected reward (B,) of showing these slates now (reads the truth; one step)."""
        return self.sim.expected_reward(slates)
