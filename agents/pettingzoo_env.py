"""The two-agent view (:class:`agents.multiagent.TwoAgentRecEnv`) through PettingZoo's parallel API.

PettingZoo's ``ParallelEnv`` steps every live agent at once, while the pipeline is sequential
within one request: the generator proposes K candidates, then the ranker picks the slate
from them. :class:`TwoAgentParallelEnv` maps this onto the parallel API with alternating
phases, one parallel step per phase, so each request of the user takes two parallel steps:

1. generator phase (``obs["phase"] == [0]``): the generator's action is the candidate set;
   the ranker's action is ignored (a no-op: any value, or left out of the dict);
2. ranker phase (``obs["phase"] == [1]``): the ranker's action picks the slate from the
   candidates, which are now in the observation; the generator's action is ignored.

pettingzoo is an optional dependency (``pip install -e .[rl]``); importing this module without
it raises an ImportError that says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

try:
    from pettingzoo import ParallelEnv
except ImportError as e:  # the test that hides pettingzoo checks this message
    raise ImportError(
        "agents.pettingzoo_env needs pettingzoo, an optional dependency of the 'rl' extra: "
        "pip install -e .[rl]"
    ) from e

from agents.multiagent import GENERATOR, RANKER, TwoAgentRecEnv
from simenv.rec_env import RecEnv

__all__ = ["TwoAgentParallelEnv"]

PHASE, CANDIDATES = "phase", "candidates"


class TwoAgentParallelEnv(ParallelEnv):
    """Generator and ranker of one user as a PettingZoo ``ParallelEnv`` (alternating phases).

    Agents: ``"generator"`` and ``"ranker"``, both live for the whole user episode.

    Observation (the same for both agents, so either knows whose turn it is): the user's
    observation (the keys of ``env.observation_space``) plus ``candidates`` (K,) int64 and
    ``phase`` (1,) int64. In the generator phase ``phase == [0]`` and ``candidates`` is all
    -1 (nothing proposed yet for this request); in the ranker phase ``phase == [1]`` and
    ``candidates`` holds the generator's K item ids. The user part does not change between
    the two phases of a request (the user has seen nothing yet).

    Actions: generator ``SlateSpace(N, K)``, K distinct item ids, released at the user's
    time (its ``sample`` draws from the items released at time 0, valid at any time); ranker
    ``SlateSpace(K, k)``, k distinct positions into the candidates, best first: the slate is
    ``candidates[positions]``. The acting agent's action is required and checked (a
    ``ValueError`` naming the problem, nothing changes); the other agent's action is ignored,
    so a parallel client may send a sampled action, ``None``, or nothing for it.

    Rewards: one shared reward. A generator-phase step gives both agents 0.0; a ranker-phase
    step gives both the user's reward for the slate. Each agent's episode return is therefore
    the user's return.

    Episode end: both agents end together, at the ranker-phase step where the user's episode
    ends: ``terminations`` are True for both when the user churns, ``truncations`` True for
    both after the env's ``max_steps`` slates (the underlying :class:`simenv.RecEnv`'s
    rules); ``agents`` is then empty, the last observation is the user's final state in
    generator-phase form, and ``step`` raises until ``reset``. A generator-phase step never
    ends the episode. Infos: ``reset`` gives both agents the env's reset info; a
    ranker-phase step gives both the env's step info (ground truth, for evaluation only); a
    generator-phase step gives empty dicts.

    Seeds: ``reset(seed=s)`` seeds the user environment (:meth:`simenv.RecEnv.reset`) and the
    two action spaces (from ``numpy.random.SeedSequence(s)``), so sampled actions replay for
    the same seed; ``reset()`` continues the streams.

    Args:
        env: the single-user environment.
        n_candidates: K, in ``[slate_size, n_items]``.
    """

    metadata: dict[str, Any] = {"name": "simenv_two_agent_v0", "render_modes": []}

    def __init__(self, env: RecEnv, n_candidates: int) -> None:
        self.two = TwoAgentRecEnv(env, n_candidates)
        self.K, self.k = self.two.K, self.two.k
        self.possible_agents = [GENERATOR, RANKER]
        self.agents: list[str] = []
        n_items = env.world.n_items
        obs_space = spaces.Dict(
            {
                **env.observation_space.spaces,
                CANDIDATES: spaces.Box(-1, n_items - 1, shape=(self.K,), dtype=np.int64),
                PHASE: spaces.Box(0, 1, shape=(1,), dtype=np.int64),
            }
        )
        # one space object per agent, returned as is by observation_space/action_space
        self.observation_spaces = {GENERATOR: obs_space, RANKER: obs_space}
        self.action_spaces = dict(self.two.action_spaces)
        self._user: dict[str, np.ndarray] | None = None

    def observation_space(self, agent: str) -> spaces.Dict:
        """The observation space of ``agent`` (the same object at every call)."""
        return self.observation_spaces[self._check_agent(agent)]

    def action_space(self, agent: str) -> spaces.Space:
        """The action space of ``agent`` (the same object at every call)."""
        return self.action_spaces[self._check_agent(agent)]

    def _check_agent(self, agent: str) -> str:
        if agent not in self.possible_agents:
            raise ValueError(f"agent must be one of {self.possible_agents}, got {agent!r}")
        return agent

    def _observe(self, candidates: np.ndarray | None) -> dict[str, dict[str, np.ndarray]]:
        assert self._user is not None
        cand = np.full(self.K, -1, np.int64) if candidates is None else candidates
        phase = np.array([0 if candidates is None else 1], np.int64)
        # a dict per agent (the arrays are shared: treat them as read-only)
        return {a: {**self._user, CANDIDATES: cand, PHASE: phase} for a in self.possible_agents}

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, Any]]]:
        """A new user; the generator acts first. ``options`` as :meth:`simenv.RecEnv.reset`."""
        obs, infos = self.two.reset(seed=seed, options=options)
        if seed is not None:
            ss = np.random.SeedSequence(seed).spawn(len(self.possible_agents))
            for agent, s in zip(self.possible_agents, ss, strict=True):
                self.action_spaces[agent].seed(int(s.generate_state(1)[0]))
        self._user = obs[GENERATOR]
        self.agents = list(self.possible_agents)
        info = infos[GENERATOR]
        return self._observe(None), {a: info for a in self.possible_agents}

    def step(
        self, actions: dict[str, Any]
    ) -> tuple[
        dict[str, dict[str, np.ndarray]],
        dict[str, float],
        dict[str, bool],
        dict[str, bool],
        dict[str, dict[str, Any]],
    ]:
        """One phase: the acting agent's action is applied, the other's ignored."""
        if not self.agents:
            raise RuntimeError(
                "Call reset before using step method (the episode has ended or not started)."
            )
        unknown = set(actions) - set(self.possible_agents)
        if unknown:
            raise ValueError(
                f"actions must be keyed by agents in {self.possible_agents}, got {sorted(unknown)}"
            )
        acting = self.two.agent_selection
        if actions.get(acting) is None:
            raise ValueError(f"actions must hold the acting agent {acting!r} (its phase)")
        if acting == GENERATOR:
            out, rew, term, trunc, _ = self.two.step({GENERATOR: np.asarray(actions[GENERATOR])})
            empty: dict[str, dict[str, Any]] = {a: {} for a in self.possible_agents}
            return self._observe(out[RANKER]["candidates"]), rew, term, trunc, empty
        out, rew, term, trunc, info = self.two.step({RANKER: np.asarray(actions[RANKER])})
        self._user = out[GENERATOR]
        if any(term.values()) or any(trunc.values()):
            self.agents = []
        return self._observe(None), rew, term, trunc, info

    def render(self) -> None:
        """No rendering (``render_modes`` is empty)."""
        return None
