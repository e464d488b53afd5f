"""The multi-agent view of the lecture: generator and ranker as two agents with a shared reward.

:class:`TwoAgentRecEnv` is a two-phase environment in the style of PettingZoo's parallel
API (dicts keyed by agent name): in phase "generator" the generator's action is a candidate
set of K item ids; in phase "ranker" the ranker's action is a slate of k positions into that
candidate set; then the user responds and both agents get the same reward.

Single-agent wrappers freeze one of the two so that any Gymnasium RL library can train the
other:

- :class:`RankerEnv`: a frozen generator proposes K candidates; the action is a slate of k
  positions into them (``MultiDiscrete([K] * k)``, distinct).
- :class:`GeneratorEnv`: the action is a candidate set of K distinct item ids; a frozen ranker
  picks the slate from it (the generator is rewarded by what the ranker makes of its set).

They wrap the single-user :class:`simenv.RecEnv` and pass ``gymnasium``'s ``check_env``.

:class:`agents.pettingzoo_env.TwoAgentParallelEnv` exposes :class:`TwoAgentRecEnv` through
PettingZoo's parallel API (alternating phases: one parallel step per agent's turn; needs the
``rl`` extra).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from simenv.clock import format_time, observed_time, released
from simenv.rec_env import RecEnv
from simenv.spaces import SlateSpace

__all__ = ["TwoAgentRecEnv", "RankerEnv", "GeneratorEnv", "train_jointly"]

GENERATOR, RANKER = "generator", "ranker"


def _batch(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[None, ...] for k, v in obs.items()}


class TwoAgentRecEnv:
    """Two agents, one user: generator proposes K candidates, ranker picks k of them.

    ``reset(seed) -> (observations, infos)`` with ``observations = {"generator": user_obs}``;
    ``step({"generator": ids (K,)}) -> ({"ranker": {"user": user_obs, "candidates": ids}}, ...)``
    with zero rewards; ``step({"ranker": positions (k,)})`` shows the slate and returns
    ``({"generator": next_user_obs}, {"generator": r, "ranker": r}, terminations, truncations,
    infos)``. ``agent_selection`` names the agent expected to act.

    Args:
        env: the single-user environment.
        n_candidates: K.
    """

    agents = (GENERATOR, RANKER)

    def __init__(self, env: RecEnv, n_candidates: int) -> None:
        k = env.config.slate_size
        if (
            not isinstance(n_candidates, (int, np.integer))
            or not k <= n_candidates <= env.world.n_items
        ):
            raise ValueError(
                f"n_candidates must be an integer in [{k}, {env.world.n_items}], got {n_candidates!r}"
            )
        self.env = env
        self.K = int(n_candidates)
        self.k = k
        self.agent_selection = GENERATOR
        self._obs: dict[str, np.ndarray] | None = None
        self._cand: np.ndarray | None = None
        self.action_spaces = {
            GENERATOR: SlateSpace(
                env.world.n_items, self.K, sample_pool=env.action_space.sample_pool
            ),
            RANKER: SlateSpace(self.K, k),
        }

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Start a user; the generator acts first."""
        self._obs, info = self.env.reset(seed=seed, options=options)
        self.agent_selection = GENERATOR
        return {GENERATOR: self._obs}, {GENERATOR: info}

    def step(
        self, actions: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, float], dict[str, bool], dict[str, bool], dict[str, Any]]:
        """Act for ``agent_selection`` (a dict with that single key)."""
        if self._obs is None:
            raise RuntimeError("Call reset before using step method.")
        if set(actions) != {self.agent_selection}:
            raise ValueError(
                f"actions must hold exactly the acting agent {self.agent_selection!r}, got {sorted(actions)}"
            )
        zero = {a: 0.0 for a in self.agents}
        false = {a: False for a in self.agents}
        if self.agent_selection == GENERATOR:
            cand = np.asarray(actions[GENERATOR])
            if cand.shape != (self.K,) or not np.issubdtype(cand.dtype, np.integer):
                raise ValueError(
                    f"the generator's action must be {self.K} integer item ids, got {cand.dtype} {cand.shape}"
                )
            _validate_set(self.env, cand)  # range, distinct, released at the user's time
            self._cand = cand.astype(np.int64)
            self.agent_selection = RANKER
            return {RANKER: {"user": self._obs, "candidates": self._cand}}, zero, false, false, {}
        pos = np.asarray(actions[RANKER])
        if pos.shape != (self.k,) or not np.issubdtype(pos.dtype, np.integer):
            raise ValueError(
                f"the ranker's action must be {self.k} integer positions, got {pos.dtype} {pos.shape}"
            )
        if pos.min() < 0 or pos.max() >= self.K or np.unique(pos).size != self.k:
            raise ValueError(
                f"the ranker's positions must be {self.k} distinct values in [0, {self.K - 1}], got {pos.tolist()}"
            )
        assert self._cand is not None
        obs, r, term, trunc, info = self.env.step(self._cand[pos])
        self._obs = obs
        self.agent_selection = GENERATOR
        rew = {a: float(r) for a in self.agents}
        return (
            {GENERATOR: obs},
            rew,
            {a: term for a in self.agents},
            {a: trunc for a in self.agents},
            {GENERATOR: info, RANKER: info},
        )


def _validate_set(env: RecEnv, cand: np.ndarray) -> None:
    """Check a candidate set: ids in range, distinct, released at the user's time."""
    n = env.world.n_items
    if cand.min() < 0 or cand.max() >= n:
        raise ValueError(
            f"generator action item ids must be in [0, {n - 1}], got values in [{cand.min()}, {cand.max()}]"
        )
    if np.unique(cand).size != cand.size:
        raise ValueError("generator action must hold distinct item ids")
    t = env.sim.time[0]
    late = ~released(env.world.catalog.release_time[cand], t)  # simenv.clock: the env's own rule
    if late.any():
        raise ValueError(
            f"generator action contains unreleased item {int(cand[late][0])} at time "
            f"{format_time(observed_time(t))}"
        )


class RankerEnv(gym.Env):
    """Single-agent view for training the ranker: a frozen generator proposes the candidates.

    Observation: the user's observation plus ``candidates`` (K,) int64. Action: k distinct
    positions into the candidates (``SlateSpace(K, k)``). Reward: the user's reward.

    Args:
        env: the single-user environment.
        generator: frozen; ``retrieve(obs (1, ...), K, exclude_seen) -> (ids (1, K), scores)``.
        n_candidates: K.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, env: RecEnv, generator: Any, n_candidates: int) -> None:
        self.two = TwoAgentRecEnv(env, n_candidates)
        self.generator = generator
        self.K, self.k = self.two.K, self.two.k
        base = env.observation_space
        self.observation_space = spaces.Dict(
            {
                **base.spaces,
                "candidates": spaces.Box(0, env.world.n_items - 1, shape=(self.K,), dtype=np.int64),
            }
        )
        self.action_space = SlateSpace(self.K, self.k)

    def _propose(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, _ = self.generator.retrieve(_batch(obs), self.K, exclude_seen=False)
        ids = ids[0]
        if (ids < 0).any():
            raise RuntimeError(f"the frozen generator returned fewer than K={self.K} candidates")
        out, *_ = self.two.step({GENERATOR: ids})
        return {**obs, "candidates": out[RANKER]["candidates"]}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """New user; the generator's candidates come with the observation."""
        super().reset(seed=seed)
        obs, infos = self.two.reset(seed=seed, options=options)
        return self._propose(obs[GENERATOR]), infos[GENERATOR]

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Show the slate made of the chosen candidate positions."""
        obs, rew, term, trunc, info = self.two.step({RANKER: np.asarray(action)})
        nxt = obs[GENERATOR]
        done = term[RANKER] or trunc[RANKER]
        full = {**nxt, "candidates": self.two._cand} if done else self._propose(nxt)
        return full, rew[RANKER], term[RANKER], trunc[RANKER], info[RANKER]


class GeneratorEnv(gym.Env):
    """Single-agent view for training the generator: a frozen ranker picks the slate from its set.

    Observation: the user's observation. Action: K distinct item ids (``SlateSpace(N, K)``),
    released at the user's time. Reward: the user's reward for the slate the ranker built.

    Args:
        env: the single-user environment.
        ranker: frozen; ``score(obs (1, ...), candidates (1, K)) -> (1, K)``.
        n_candidates: K.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, env: RecEnv, ranker: Any, n_candidates: int) -> None:
        self.two = TwoAgentRecEnv(env, n_candidates)
        self.ranker = ranker
        self.K, self.k = self.two.K, self.two.k
        self.observation_space = env.observation_space
        self.action_space = self.two.action_spaces[GENERATOR]

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """New user."""
        super().reset(seed=seed)
        if seed is not None:
            self.action_space.seed(seed)
        obs, infos = self.two.reset(seed=seed, options=options)
        return obs[GENERATOR], infos[GENERATOR]

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """The ranker ranks the proposed set; the user sees its top k."""
        out, *_ = self.two.step({GENERATOR: np.asarray(action)})
        view = out[RANKER]
        scores = np.asarray(self.ranker.score(_batch(view["user"]), view["candidates"][None, :]))[0]
        pos = np.argsort(-scores, kind="stable")[: self.k]
        obs, rew, term, trunc, info = self.two.step({RANKER: pos.astype(np.int64)})
        return obs[GENERATOR], rew[GENERATOR], term[GENERATOR], trunc[GENERATOR], info[GENERATOR]


def train_jointly(
    generator: Any,
    ranker: Any,
    env: Any,
    config: Any,
    rounds: int,
    users_per_round: int,
    seed: int,
    ranker_config: Any,
    progress: bool = False,
) -> list[dict[str, float]]:
    """The two agents learn from their shared reward, round by round (batched).

    Each round the pipeline (the generator sampling K candidates from its softmax policy,
    the ranker picking the slate) plays ``users_per_round`` whole user episodes; then the
    generator takes a REINFORCE step with the top-K off-policy correction on that round's
    returns (:func:`agents.reinforce.train_online`) and the ranker is trained, warm, on the
    impressions the pipeline produced (supervised, :func:`ranking.train_ranker`). This is
    :class:`TwoAgentRecEnv`'s game played by B users at once: both agents act on every
    request and get the same reward.

    (For multi-agent RL libraries, :class:`agents.pettingzoo_env.TwoAgentParallelEnv` serves
    the same game one user at a time through PettingZoo's parallel API.)

    Args:
        generator: a :class:`agents.reinforce.ReinforceGenerator` (trained in place).
        ranker: a :class:`ranking.Ranker` (trained in place).
        env: a :class:`simenv.BatchedRecEnv`.
        config: the generator's :class:`agents.reinforce.ReinforceConfig`.
        rounds: rounds.
        users_per_round: user episodes per round.
        seed: seed of the users and draws.
        ranker_config: :class:`ranking.RankerTrainConfig` of each ranker update.
        progress: tqdm bars.

    Returns:
        Per round: reward per user while collecting and the generator's training stats.
    """
    from agents.reinforce import train_online
    from ranking import train_ranker
    from simenv.history import EventSequences

    def retrain(log: Any) -> Any:
        train_ranker(ranker, log, EventSequences.from_log(log, env.world.n_items), ranker_config)
        return ranker

    return train_online(
        generator, env, ranker, config, rounds, users_per_round, seed,
        retrain_ranker=retrain, progress=progress,
    )  # fmt: skip
