"""``RecEnv``: one simulated user per episode, a slate of items per step."""

from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
import numpy as np

from simenv.clock import released
from simenv.config import EnvConfig, UserModelConfig, WorldConfig
from simenv.core import Simulator, StepResult
from simenv.spaces import SlateSpace, observation_space
from simenv.streams import seed_key
from simenv.world import World

__all__ = ["RecEnv", "make_world"]


@functools.lru_cache(maxsize=8)
def _cached_world(config: WorldConfig, seed: int, user_model: UserModelConfig) -> World:
    return World(config, seed=seed, user_model=user_model)


def make_world(config: EnvConfig, world: World | None, world_seed: int) -> World:
    """The env's world: the given one (checked against ``config``) or a cached build."""
    if world is None:
        return _cached_world(config.world, int(world_seed), config.user_model)
    if not isinstance(world, World):
        raise ValueError(f"world must be a simenv.World, got {type(world).__name__}")
    if world.user_model != config.user_model:
        raise ValueError(
            "world.user_model differs from config.user_model; build the world with "
            "World(config.world, seed, user_model=config.user_model)"
        )
    return world


def _single_info(res: StepResult | None, sim: Simulator, full: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"user": int(sim.user[0]), "group": int(sim.group[0])}
    if res is not None:
        info.update(
            affinity=res.affinity[0],
            click_prob=res.click_prob[0],
            clicked_position=int(res.chosen[0]),
            event=int(res.event[0]),
            watch_minutes=float(res.watch[0]),
            session=int(res.session[0]),
            session_end=bool(res.session_end[0]),
        )
        if full:
            _, best = sim.best_slates(1)
            info["best_utility"] = float(best[0, 0])
    return info


class RecEnv(gym.Env):
    r"""One simulated user per episode; the agent shows a slate of k items at each step.

    ## Description
    A user of the hidden :class:`simenv.World` (drawn at reset) meets the recommender in
    sessions. At each step the agent shows a slate of ``k`` distinct released items; the user
    clicks at most one of them (or none), watches part of it, maybe likes or dislikes it, and
    their interests, fatigue and patience change. When the session budget runs out the session
    ends; the user comes back later with a probability that rises with how satisfying the
    session was, or churns (the episode terminates).

    ## Equations (per step; ``p`` the user's current unit preference, ``z_i`` item latent)
    1. Utility of the item at slate position ``j``:
       ``u_j = alpha <p, z_i> + beta_q q_i + beta_pop (log pop_i - mean) - F[topic_i] - eta log(1 + j)``,
       ``-inf`` for items of another group (``+ log(epsilon)`` if ``cross_group_epsilon > 0``).
    2. Choice, multinomial logit with a no-click option of utility ``u_0``:
       ``P(j) = e^{u_j} / (e^{u_0} + sum_l e^{u_l})``.
    3. Response of a clicked item: watch fraction
       ``w = sigmoid(kappa (<p, z_i> - offset) + 0.5 q_i - F[topic_i] + sigma * N(0, 1))``;
       dislike if ``w < dislike_threshold``, like with probability ``like_probability`` if
       ``w >= like_threshold``, else a plain click; watch minutes ``w * length_i``.
    4. Reward: ``c_click * click + c_like * like + c_dislike * dislike + c_watch * minutes``.
    5. Transitions: time advances by ``step_minutes + minutes``; fatigue decays
       ``F <- F 2^{-dt / half_life}`` and ``F[topic_i] += fatigue_increment`` on a click;
       interest drift ``p <- (p + rho w (z_i - p)) / |p + rho w (z_i - p)|`` (a step toward
       the item, renormalised: ``p`` stays a unit vector); session budget
       ``b <- min(patience, b + refill * s - step_cost)`` with satisfaction
       ``s = w + 0.5 like - 0.5 dislike`` (0 without a click).
    6. Session end when ``b <= 0``: the user returns with probability
       ``(0.5 + 0.5 activity) * sigmoid(return_slope (mean s in session - return_reference))``
       after an exponential gap of mean ``mean_session_gap / activity`` days (fatigue decays over
       the gap, the budget refills to the patience); otherwise the user churns.

    ## Action Space
    :class:`simenv.spaces.SlateSpace` ``(k,)`` int64: k distinct item ids in ``[0, N)``, each
    released (``release_time <= current time``, compared at the float32 time the observation
    carries: :func:`simenv.clock.released`). Anything else raises ``ValueError`` and leaves the
    state unchanged.

    ## Observation Space
    ``Dict``: ``item_ids`` (L,) int64, ``events`` (L,) int64 (:class:`simenv.types.EventType`),
    ``dt`` (L,) float32 days since each event, ``mask`` (L,) int8 — the last L engagement
    events, oldest first, left-padded; ``context`` (3,) float32 = (time in days, session index,
    position in session); ``user`` (1,) int64 the user id.

    ## Rewards
    The mix of step 4 (default: click + like - dislike).

    ## Starting State
    A uniformly drawn user (or ``options={"user_id": u}``) with their initial preference, zero
    fatigue, a full budget ``b = patience`` (each user's, drawn with the world:
    ``patience = 1 + Gamma(4, mean_patience / 4)``, mean ``mean_patience + 1``), an empty
    history, starting at a time uniform in ``[0, start_time_max]`` days.

    ## Episode End
    Terminated when the user churns (does not return after a session). Truncated after
    ``max_steps`` slates.

    ## Arguments
    | argument | default | meaning |
    |---|---|---|
    | ``config`` | ``EnvConfig()`` | world, user model, reward, k=10, L=32, max_steps=200 |
    | ``world`` | ``None`` | a prebuilt :class:`World` (otherwise built from ``config.world``, cached) |
    | ``world_seed`` | 0 | seed of the world (the hidden truth); the env's own seed is ``reset(seed=)`` |

    ``info`` carries ground truth for evaluation only: user id, group, the true affinity and
    choice probability of each shown item, the clicked position, event, watch minutes, and with
    ``info_level="full"`` the best achievable current utility.

    ## Version History
    * v0: initial version.

    Example:
        >>> env = RecEnv(EnvConfig.small())
        >>> obs, info = env.reset(seed=0)
        >>> sorted(obs), info["user"]
        (['context', 'dt', 'events', 'item_ids', 'mask', 'user'], 34)
    """

    metadata: dict[str, Any] = {"render_modes": ["ansi"]}

    def __init__(
        self,
        config: EnvConfig | None = None,
        world: World | None = None,
        world_seed: int = 0,
        render_mode: str | None = None,
    ) -> None:
        self.config = EnvConfig() if config is None else config
        if not isinstance(self.config, EnvConfig):
            raise ValueError(f"config must be an EnvConfig, got {type(self.config).__name__}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.render_mode = render_mode
        self.world = make_world(self.config, world, world_seed)
        self.sim = Simulator(self.world, self.config, 1)
        n_items = self.world.n_items
        pool = np.nonzero(released(self.world.items.release_time, 0.0))[0]
        self.action_space = SlateSpace(n_items, self.config.slate_size, sample_pool=pool)
        self.observation_space = observation_space(
            n_items, self.world.n_users, self.config.history_length
        )
        self._needs_reset = True
        self._last: StepResult | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start a new user. ``options={"user_id": u}`` picks the user.

        A ``seed`` keys every later random draw (common random numbers: a hash of seed, user,
        the user's episode number, step and draw index, see :mod:`simenv.streams`) and restarts
        the episode counts; without one the streams go on.
        """
        super().reset(seed=seed)
        if seed is not None or self.sim.stream_key is None:
            key = seed_key(seed) if seed is not None else int(self.np_random.integers(2**63))
            self.sim.seed_streams(key)
        users = None
        if options and "user_id" in options:
            u = options["user_id"]
            if (
                isinstance(u, bool)
                or not isinstance(u, (int, np.integer))
                or not 0 <= u < self.world.n_users
            ):
                raise ValueError(
                    f"options['user_id'] must be an int in [0, {self.world.n_users - 1}], got {u!r}"
                )
            users = np.array([u])
        self.sim.reset_slots(np.array([0]), users)
        self._needs_reset = False
        self._last = None
        return self._obs(), _single_info(None, self.sim, False)

    def _obs(self) -> dict[str, np.ndarray]:
        obs = self.sim.observation()
        return {k: v[0, ...] for k, v in obs.items()}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Show one slate. Invalid actions raise ``ValueError`` and change nothing."""
        if self._needs_reset:
            raise RuntimeError(
                "Call reset before using step method (the episode has ended or not started)."
            )
        try:
            a = np.asarray(action)
        except (ValueError, TypeError) as e:  # e.g. ragged nested lists
            raise ValueError(
                f"action must be an integer array of shape ({self.config.slate_size},), got "
                f"{action!r} ({e})"
            ) from None
        if a.shape != (self.config.slate_size,):
            raise ValueError(f"action must have shape ({self.config.slate_size},), got {a.shape}")
        slate = self.sim.validate(a[None, :])
        res = self.sim.step(slate)
        self._last = res
        terminated, truncated = bool(res.terminated[0]), bool(res.truncated[0])
        self._needs_reset = terminated or truncated
        info = _single_info(res, self.sim, self.config.info_level == "full")
        return self._obs(), float(res.reward[0]), terminated, truncated, info

    def render(self) -> str | None:
        """Text summary of the user's state (``render_mode="ansi"``)."""
        if self.render_mode != "ansi":
            return None
        s = self.sim
        return (
            f"user={s.user[0]} group={s.group[0]} t={s.time[0]:.3f}d session={s.session[0]} "
            f"pos={s.position[0]} budget={s.budget[0]:.2f} history={int(s.h_mask[0].sum())}"
        )

    # ------------------------------------------------------------------ truth (oracles only)
    def best_slate(self, kind: str = "utility") -> np.ndarray:
        """Oracle slate, reading the truth.

        ``kind="utility"``: the k released items of highest current click utility;
        ``"expected_reward"``: the greedy build in the expected reward of the reward mix (see
        :meth:`simenv.core.Simulator.best_slates`).
        """
        return self.sim.best_slates(kind=kind)[0][0]

    def expected_reward(self, slate: np.ndarray) -> float:
        """Expected reward of showing this slate now (reads the truth; one step)."""
        return float(self.sim.expected_reward(np.asarray(slate)[None, :])[0])
