"""Serving with the user's logged history: the recommender remembers its users.

Training observations are rebuilt from the log by :class:`simenv.history.EventSequences`, keyed
by user: a training request sees the user's last L engagement events before it, from every
episode of that user in the log. Online, the simulator starts every episode with an empty
history. A model trained on the first and served on the second meets a train/serve skew (and
a cold start on every episode's first slates that no production system has: it knows its
users). :class:`UserMemory` closes the gap on the serving side: before the wrapped agent acts,
each observation's history becomes the user's logged events before the request time merged
with the events of the running episode, ordered by time, the last L kept: the observation a
training request of the same user at that time would have had, plus what happened since.

Only the public log is read (the user id is part of the observation); never the world's truth.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simenv.history import EventSequences
from simenv.types import Obs, obs_users

__all__ = ["UserMemory", "merge_histories"]

_HISTORY_KEYS = (Obs.ITEMS, Obs.EVENTS, Obs.DT, Obs.MASK)


def merge_histories(
    first: dict[str, np.ndarray], second: dict[str, np.ndarray], length: int
) -> dict[str, np.ndarray]:
    """Merge two batched histories (B, L1) and (B, L2) by time; keep the last ``length`` events.

    Events are ordered by their age ``dt`` (oldest first; ties keep ``first`` before
    ``second``); padding (mask 0) goes to the front, as in the simulator's observations. The
    other keys (context, user) are taken from ``second``.

    Returns:
        A new observation dict with histories of width ``length``.
    """
    mask = np.concatenate([first[Obs.MASK], second[Obs.MASK]], axis=1) > 0  # (B, L1 + L2)
    dt = np.concatenate([first[Obs.DT], second[Obs.DT]], axis=1).astype(np.float64)
    # primary key: real events after padding; secondary: older (larger dt) first; stable
    order = np.lexsort((-np.where(mask, dt, 0.0), mask), axis=1)[:, -length:]  # (B, length)
    out = {k: v for k, v in second.items() if k not in _HISTORY_KEYS}
    for key in _HISTORY_KEYS:
        both = np.concatenate([first[key], second[key]], axis=1)
        out[key] = np.take_along_axis(both, order, axis=1)
    real = out[Obs.MASK] > 0
    out[Obs.ITEMS] = np.where(real, out[Obs.ITEMS], 0).astype(np.int64)
    out[Obs.EVENTS] = np.where(real, out[Obs.EVENTS], 0).astype(np.int64)
    out[Obs.DT] = np.where(real, out[Obs.DT], 0).astype(np.float32)
    out[Obs.MASK] = real.astype(second[Obs.MASK].dtype)
    return out


class UserMemory:
    """An agent served with each user's logged history merged into the observation.

    Args:
        agent: the wrapped agent (``act(obs) -> slates``).
        sequences: the log's engagement events (e.g. of the training and validation
            periods: what the models were trained with).
        history_length: L of the merged observation (the env's history length).
        name: label for reports (default ``"<agent name> + memory"``).

    ``last_candidates``, ``last_propensities`` and ``last_scores`` of the wrapped agent are
    passed through after each call.
    """

    def __init__(
        self,
        agent: Any,
        sequences: EventSequences,
        history_length: int,
        name: str | None = None,
    ) -> None:
        if not hasattr(agent, "act"):
            raise ValueError(f"agent must have act(obs), got {type(agent).__name__}")
        if not isinstance(sequences, EventSequences):
            raise ValueError(
                f"sequences must be a simenv.history.EventSequences, got {type(sequences).__name__}"
            )
        if isinstance(history_length, bool) or not isinstance(history_length, int):
            raise ValueError(f"history_length must be an integer >= 1, got {history_length!r}")
        if history_length < 1:
            raise ValueError(f"history_length must be an integer >= 1, got {history_length!r}")
        self.agent = agent
        self.sequences = sequences
        self.history_length = history_length
        self.name = name or f"{getattr(agent, 'name', type(agent).__name__)} + memory"
        self.last_candidates: np.ndarray | None = None
        self.last_propensities: np.ndarray | None = None
        self.last_scores: np.ndarray | None = None

    def observe(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The observation the wrapped agent sees: logged events before the request + episode."""
        users = obs_users(obs)
        times = np.asarray(obs[Obs.CONTEXT])[:, 0].astype(np.float64)
        logged = self.sequences.history(users, times, self.history_length)
        return merge_histories(logged, obs, self.history_length)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The wrapped agent's slates for the remembered observations."""
        out = self.agent.act(self.observe(obs))
        for attr in ("last_candidates", "last_propensities", "last_scores"):
            setattr(self, attr, getattr(self.agent, attr, None))
        return out
