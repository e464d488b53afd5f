"""Where an agent's slates sit in the user's true utility: a measuring wrapper (reads the truth).

:class:`UtilityProbe` wraps any agent and, at every step, compares the slate it serves with the
truth the simulator holds for that user at that moment (drifted preference, fatigue, group; the
quantity :class:`agents.base.GreedyUtilityOracle` ranks by): where the served items rank among
the released catalog in true click utility, how many of the greedy oracle's top-k they hit, how
many belong to the user's group, and how often the training log showed the oracle's picks. It
does not change what the agent serves or any random draw of the run (it only reads the state),
so a probed rollout has the same outcomes as an unprobed one.

The question it answers is why a learned agent earns a fraction of the oracle: a ranker that
lands in the user's group and near the top percentile but rarely on the oracle's exact items is
limited by how precisely it knows items, and the exposure column says how many of those items
the log ever showed it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from simenv.clock import released
from simenv.types import Obs, obs_users

__all__ = ["UtilityProbe"]


class UtilityProbe:
    """Wraps ``agent``; measures each served slate against the user's true current utility.

    Args:
        agent: the agent (``act(obs)``); its slates, propensities and candidates pass through.
        env: the :class:`simenv.BatchedRecEnv` the rollout runs in (read, never changed).
        exposure: impressions per item in the agent's training log, shape ``(n_items,)``
            (optional; without it the exposure statistics are not computed).
        chunk: items per block when the utility of the whole catalog is computed.
        block: observation rows measured at once (memory: about ``block x n_items`` floats).

    After a rollout, :meth:`summary` gives the means over every probed (user, step).
    """

    def __init__(
        self,
        agent: Any,
        env: Any,
        exposure: np.ndarray | None = None,
        chunk: int = 8192,
        block: int = 256,
    ) -> None:
        if not hasattr(agent, "act"):
            raise ValueError(f"agent must have act(obs), got {type(agent).__name__}")
        sim = getattr(env, "sim", None)
        if sim is None or not hasattr(sim, "true_utility"):
            raise ValueError(f"env must be a simenv.BatchedRecEnv, got {type(env).__name__}")
        n = int(sim.n_items)
        if exposure is not None:
            exposure = np.asarray(exposure, dtype=np.float64)
            if exposure.shape != (n,) or not np.all(np.isfinite(exposure)) or exposure.min() < 0:
                raise ValueError(
                    f"exposure must be finite impressions >= 0 per item, shape ({n},), got shape "
                    f"{exposure.shape}"
                )
        for name, v in (("chunk", chunk), ("block", block)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.agent, self.env, self.exposure = agent, env, exposure
        self.chunk, self.block = chunk, block
        self.name = getattr(agent, "name", type(agent).__name__)
        self.last_candidates: np.ndarray | None = None
        self.last_propensities: np.ndarray | None = None
        self.last_scores: np.ndarray | None = None
        self._sums: dict[str, float] = {}
        self.rows = 0  # probed (user, step) pairs
        self.unmatched = 0  # observation rows whose env slot could not be identified
        self.seconds = 0.0  # spent measuring (not acting)

    def act(self, obs: dict[str, np.ndarray]) -> Any:
        """The wrapped agent's answer, unchanged; the slate is measured on the way."""
        out = self.agent.act(obs)
        for attr in ("last_candidates", "last_propensities", "last_scores"):
            setattr(self, attr, getattr(self.agent, attr, None))
        slates = np.asarray(out[0] if isinstance(out, tuple) else out, dtype=np.int64)
        users = obs_users(obs)
        if slates.shape[0] == users.shape[0] and users.size:
            t0 = time.perf_counter()
            self._measure(slates, users, np.asarray(obs[Obs.CONTEXT])[:, 0].astype(np.float64))
            self.seconds += time.perf_counter() - t0
        return out

    def _slots(self, users: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The env slot of each observation row (same user, same clock), and which rows matched.

        A row matches when exactly one slot holds its user at its time (an idle slot may keep a
        finished user's id, so the clock tells them apart); other rows are left out and counted.
        """
        sim = self.env.sim
        match = (sim.user[None, :] == users[:, None]) & (
            np.abs(sim.time[None, :] - times[:, None]) <= 1e-6
        )  # (rows, B)
        return match.argmax(axis=1), match.sum(axis=1) == 1

    def _measure(self, slates: np.ndarray, users: np.ndarray, times: np.ndarray) -> None:
        slot, ok = self._slots(users, times)
        self.unmatched += int((~ok).sum())
        rows, served = slot[ok], slates[ok]
        for s in range(0, rows.size, self.block):  # bounded memory: block x n_items x k
            self._measure_block(rows[s : s + self.block], served[s : s + self.block])

    def _measure_block(self, rows: np.ndarray, served: np.ndarray) -> None:
        sim = self.env.sim
        b, k = served.shape
        n = int(sim.n_items)
        util = np.empty((b, n), dtype=np.float32)
        for s in range(0, n, self.chunk):
            ids = np.arange(s, min(n, s + self.chunk))
            util[:, s : s + ids.size] = sim.true_utility(ids, rows=rows)
        util[~released(sim.release[None, :], sim.time[rows, None])] = -np.inf
        live = np.isfinite(util)
        n_live = np.maximum(live.sum(axis=1), 1)
        u_served = np.take_along_axis(util, served, axis=1)  # (b, k)
        # percentile: the share of the user's reachable released items below each served item
        below = np.zeros((b, k), dtype=np.int64)
        for j in range(k):  # k slate positions, each a vectorised pass over (b, n)
            below[:, j] = ((util < u_served[:, j : j + 1]) & live).sum(axis=1)
        pct = below / n_live[:, None]
        top = np.argpartition(-util, k - 1, axis=1)[:, :k]  # the greedy oracle's top-k
        hit = (served[:, :, None] == top[:, None, :]).any(axis=2)
        same = sim.item_group[served] == sim.group[rows][:, None]
        add = {
            "percentile": pct.mean(axis=1).sum(),
            "oracle_overlap": hit.mean(axis=1).sum(),
            "in_group": same.mean(axis=1).sum(),
            "reachable_items": float(live.sum()),  # summary(): per row
        }
        if self.exposure is not None:
            e_top, e_served = self.exposure[top], self.exposure[served]
            add["oracle_never_shown"] = (e_top == 0).mean(axis=1).sum()
            add["served_never_shown"] = (e_served == 0).mean(axis=1).sum()
            add["oracle_log_impressions"] = np.log1p(e_top).mean(axis=1).sum()
            add["served_log_impressions"] = np.log1p(e_served).mean(axis=1).sum()
        for key, v in add.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(v)
        self.rows += b

    def summary(self) -> dict[str, float]:
        """Means over the probed (user, step) pairs.

        Keys: ``percentile`` (mean share of the user's reachable released items with lower true
        utility than a served item: 1 = the top), ``oracle_overlap`` (share of the slate in the
        greedy oracle's top-k), ``in_group`` (share in the user's group), ``reachable_items``
        (released items of finite utility per user), and with ``exposure``:
        ``oracle_never_shown`` / ``served_never_shown`` (share of the oracle's / the served items
        the training log never showed) and ``oracle_log_impressions`` /
        ``served_log_impressions`` (mean log(1 + impressions)); ``rows`` and ``unmatched``.
        """
        out = {k: v / max(self.rows, 1) for k, v in self._sums.items()}
        out["rows"] = float(self.rows)
        out["unmatched"] = float(self.unmatched)
        return out
