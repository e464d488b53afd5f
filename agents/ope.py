"""Off-policy evaluation of slate policies, checked against the simulator's truth.

The estimand: the expected number of clicks per slate a target policy ``pi`` would get at
the states of the log, ``V(pi) = E_{s ~ log} E_{A ~ pi(s)} [sum_j c_j(s, A)]`` (a click =
any engagement: click, like or dislike). The simulator knows it exactly: at every logged
step, before the user responds, :class:`TruthRecorder` asks each target policy for its
slate and computes that slate's click probabilities in the user's hidden state (the
multinomial-logit choice of :class:`simenv.RecEnv`, :func:`slate_click_probabilities`); no
real dataset can do this. The online value (the policy acting on its own state
distribution) differs from ``V(pi)`` when the policy changes which states users reach; the
``ope`` experiment reports both.

Estimators (per-request terms, so standard errors and sub-sample estimates are bincounts):

- ``ips``: slate-level inverse propensity scoring, ``w_{1:k} sum_j c_j`` with
  ``w_{1:j} = prod_{l <= j} pi(a_l | a_<l, s) / mu(a_l | a_<l, s)``. Unbiased with no
  assumption on the reward; its variance explodes with the slate space (a deterministic
  target almost never matches a logged slate).
- ``snips``: self-normalised IPS, ``sum_i w_i R_i / sum_i w_i`` (biased, bounded).
- ``cascade``: the cascade / reward-interaction estimator (Li et al. 2018's cascade model;
  McInerney et al. 2020's RIPS without its self-normalisation; obp's
  ``SlateRewardInteractionIPS``): ``sum_j w_{1:j} c_j``. Unbiased if the click at position j
  depends only on the items at positions <= j; the weights of early positions stay small.
- ``dm``: the direct method, ``sum_j q(s, pi(s)_j, j)`` with ``q`` a click model built from
  the ranker (its score, calibrated per position by logistic regression on the log).
- ``dr``: doubly robust with cascade weights (Kiyohara et al. 2022's cascade-DR),
  ``DM + sum_j w_{1:j} (c_j - q(s, a_j, j))``; unbiased when either the cascade assumption
  holds or ``q`` is right, and lower variance than ``cascade`` when ``q`` is good.

Why cascade and not the pseudo-inverse (Swaminathan et al. 2017) or the independence
estimator (Li et al. 2018): both need the logging policy's *marginal* probability of each
item at each position. The project's loggers sample Plackett-Luce slates, whose logged
propensities are per-position *conditionals* ``mu(a_j | a_<j)``; their marginals have no
closed form (a sum over every prefix), while the cascade weights are exactly products of
those conditionals. The simulator's choice model (a multinomial logit over the whole slate)
satisfies none of the assumptions exactly; the experiment measures how much that costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from simenv.batched_env import BatchedRecEnv
from simenv.clock import released
from simenv.log import ImpressionLog
from simenv.types import Columns, EventType, Obs, obs_users

__all__ = [
    "ESTIMATORS",
    "TargetPolicy",
    "DeterministicTarget",
    "UniformTarget",
    "EpsilonGreedyTarget",
    "PopularityTarget",
    "ClickModel",
    "TruthRecorder",
    "OPEData",
    "slate_click_probabilities",
    "estimate",
    "estimate_by_chunk",
    "bootstrap_estimates",
]

ESTIMATORS = ("ips", "snips", "cascade", "dm", "dr")


# ---------------------------------------------------------------------------- truth
def slate_click_probabilities(env: BatchedRecEnv, slates: np.ndarray) -> np.ndarray:
    """Click probability of each slate position in every slot's current hidden state (truth).

    ``P(j) = exp(u_j) / (exp(u_0) + sum_l exp(u_l))`` with ``u_j`` the current utility of the
    item at position j plus its position term (``RecEnv`` equations 1-2); evaluation only.

    Args:
        env: the batched env, in the state of the observation the slates answer.
        slates: int (B, k) item ids.

    Returns:
        float64 (B, k).
    """
    sim = env.sim
    s = np.asarray(slates, dtype=np.int64)
    util = sim.true_utility(s).astype(np.float64) + sim.pos_bias[None, : s.shape[1]]  # (B, k)
    u0 = float(sim.um.no_click_utility)
    m = np.maximum(util.max(axis=1), u0)[:, None]
    e = np.exp(util - m)
    return e / (e.sum(axis=1, keepdims=True) + np.exp(u0 - m))


# ---------------------------------------------------------------------------- targets
class TargetPolicy(Protocol):
    """A policy to evaluate: draw slates, and give the conditional probabilities of a slate."""

    name: str

    def draw(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """One slate per row (B, k)."""
        ...

    def conditional(self, obs: dict[str, np.ndarray], slates: np.ndarray) -> np.ndarray:
        """``pi(a_j | a_<j, s)`` of the given slates (B, k)."""
        ...


class DeterministicTarget:
    """A deterministic agent (``act(obs) -> slates``): ``pi(a_j | a_<j) = 1[a_<=j == its slate]``.

    Args:
        agent: e.g. a pipeline, the popular agent, a single-stage ranker.
        name: label.
    """

    stochastic = False

    def __init__(self, agent: Any, name: str | None = None) -> None:
        self.agent = agent
        self.name = name or getattr(agent, "name", type(agent).__name__)
        self._last: tuple[int, np.ndarray] | None = None

    def draw(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """The agent's slates (cached for the matching :meth:`conditional` call)."""
        s = np.asarray(self.agent.act(obs), dtype=np.int64)
        self._last = (id(obs), s)
        return s

    def conditional(self, obs: dict[str, np.ndarray], slates: np.ndarray) -> np.ndarray:
        """1 while the logged prefix equals the agent's slate, then 0."""
        mine = self._last[1] if self._last and self._last[0] == id(obs) else self.draw(obs)
        match = np.cumprod(np.asarray(slates) == mine, axis=1)  # (B, k) prefix match
        return match.astype(np.float64)


class UniformTarget:
    """Uniformly random distinct released items: ``pi(a_j | a_<j) = 1 / (N_released - j)``."""

    stochastic = True

    def __init__(self, release_time: np.ndarray, k: int, seed: int, name: str = "random") -> None:
        self.release = np.asarray(release_time)
        self.k, self.name = int(k), name
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0x0F1]))
        self._sorted = np.sort(np.asarray(release_time, dtype=np.float32))
        self._order = np.argsort(np.asarray(release_time, dtype=np.float32), kind="stable")

    def _n_released(self, obs):
        t = np.asarray(obs[Obs.CONTEXT])[:, 0].astype(np.float32)
        return np.searchsorted(self._sorted, t, side="right")  # (B,)

    def draw(self, obs: dict[str, np.ndarray], m: int | None = None) -> np.ndarray:
        """The k (or m) distinct released items of a uniformly random order.

        i.i.d. uniform draws over the released prefix of the release order, first occurrences
        kept: the distinct values in order of first appearance are a uniformly random ordered
        sample without replacement (memory O(B m), not O(B N)).
        """
        m = self.k if m is None else int(m)
        n_rel = self._n_released(obs)
        if (n_rel < m).any():
            raise ValueError(f"fewer than {m} items are released at some query time")
        b = n_rel.size
        out = np.full((b, m), -1, dtype=np.int64)
        todo = np.arange(b)
        width = 2 * m + 8
        while todo.size:
            draws = self.rng.integers(n_rel[todo, None], size=(todo.size, width))  # (R, W)
            same = draws[:, :, None] == draws[:, None, :]  # (R, W, W)
            first = ~np.tril(same, k=-1).any(axis=2)  # first occurrence of each value
            rank = np.cumsum(first, axis=1)
            ok = rank[:, -1] >= m
            take = first & (rank <= m)
            r, c = np.nonzero(take[ok])
            out[todo[ok][r], rank[ok][r, c] - 1] = draws[ok][r, c]
            todo = todo[~ok]
            width *= 2
        return self._order[out]

    def conditional(self, obs: dict[str, np.ndarray], slates: np.ndarray) -> np.ndarray:
        """``1 / (N_released - j)`` (0 for an unreleased item)."""
        n_rel = self._n_released(obs).astype(np.float64)
        p = 1.0 / (n_rel[:, None] - np.arange(self.k)[None, :])
        t = np.asarray(obs[Obs.CONTEXT])[:, 0]
        return np.where(released(self.release[slates], t[:, None]), p, 0.0)


class EpsilonGreedyTarget:
    """Epsilon-greedy over item scores, position by position.

    Each position gets the best remaining released item by ``scores`` with probability
    ``1 - eps``, a uniformly random remaining released item with probability ``eps``.

    ``pi(a_j | a_<j) = (1 - eps) 1[a_j = best remaining] + eps / (N_released - j)`` (the
    rule of ``agents.pipeline.explore_slates``'s epsilon mode, over the whole catalog).

    Args:
        scores: float (N,) item scores, e.g. the logging policy's weights (its greedy variant).
        release_time: (N,).
        k: slate size.
        epsilon: exploration rate in [0, 1].
        seed: seed of the draws.
    """

    stochastic = True

    def __init__(
        self, scores: np.ndarray, release_time: np.ndarray, k: int, epsilon: float, seed: int,
        name: str = "epsilon-greedy",
    ) -> None:  # fmt: skip
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        self.scores = np.asarray(scores, dtype=np.float64)
        self.release = np.asarray(release_time)
        self.k, self.eps, self.name = int(k), float(epsilon), name
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE95]))
        self._uniform = UniformTarget(release_time, k, seed + 1)
        self._by_score = np.lexsort((np.arange(self.scores.size), -self.scores))  # best first
        self._rel_by_score = np.asarray(self.release, dtype=np.float32)[self._by_score]

    def _ranked(self, obs, width):
        """(B, width) the best released items by score, best first."""
        t = np.asarray(obs[Obs.CONTEXT])[:, 0].astype(np.float32)
        w = min(self.scores.size, 4 * width + 64)
        ok = self._rel_by_score[None, :w] <= t[:, None]
        if (ok.sum(axis=1) < width).any():
            ok = self._rel_by_score[None, :] <= t[:, None]
        idx = np.argsort(~ok, axis=1, kind="stable")[:, :width]
        return self._by_score[idx]

    def _best_remaining(self, obs, prefix_rows):
        """(B, k): the best released item not in the logged prefix a_<j, for each j."""
        ranked = self._ranked(obs, 2 * self.k)  # (B, 2k) enough: at most k-1 are taken
        out = np.empty(prefix_rows.shape, dtype=np.int64)
        for j in range(self.k):  # k positions
            taken = (ranked[:, :, None] == prefix_rows[:, None, :j]).any(axis=2)  # (B, 2k)
            out[:, j] = ranked[np.arange(ranked.shape[0]), np.argmax(~taken, axis=1)]
        return out

    def draw(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Sequential epsilon-greedy slates."""
        b = np.asarray(obs[Obs.CONTEXT]).shape[0]
        rows = np.arange(b)
        # a uniformly random order of 2k released items: its first item not yet in the slate
        # is a uniform draw among the remaining released items (exchangeability)
        pool = self._uniform.draw(obs, 2 * self.k)  # (B, 2k)
        ranked = self._ranked(obs, 2 * self.k)  # (B, 2k) best first
        explore = self.rng.random((b, self.k)) < self.eps
        slate = np.full((b, self.k), -1, dtype=np.int64)
        for j in range(self.k):  # k positions
            best = ranked[rows, np.argmax(~(ranked[:, :, None] == slate[:, None, :j]).any(2), 1)]
            pick = pool[rows, np.argmax(~(pool[:, :, None] == slate[:, None, :j]).any(2), 1)]
            slate[:, j] = np.where(explore[:, j], pick, best)
        return slate

    def conditional(self, obs: dict[str, np.ndarray], slates: np.ndarray) -> np.ndarray:
        """``(1 - eps) 1[a_j = best remaining] + eps / (N_released - j)``."""
        s = np.asarray(slates, dtype=np.int64)
        best = self._best_remaining(obs, s)
        return (1.0 - self.eps) * (s == best) + self.eps * self._uniform.conditional(obs, s)


class PopularityTarget:
    """A Plackett-Luce popularity policy (:class:`simenv.PopularityPolicy`) as a target.

    ``q(i) = (1 - eps) w_i / Z + eps / N_released`` over released items (``w`` the policy's
    popularity weights), ``pi(a_j | a_<j) = q(a_j) / (1 - sum_{l<j} q(a_l))``
    (:meth:`simenv.policies.LoggingPolicy.slate_propensities`): e.g. the logging policy with
    another exploration rate.

    Args:
        world: the world the policy serves.
        k: slate size.
        epsilon: its uniform share.
        seed: seed of the draws.
        beta: popularity exponent (as ``PopularityPolicy``).
        name: label.
    """

    stochastic = True

    def __init__(
        self, world: Any, k: int, epsilon: float, seed: int, beta: float = 0.5,
        name: str | None = None,
    ) -> None:  # fmt: skip
        from simenv.policies import PopularityPolicy

        self.policy = PopularityPolicy(world, k, epsilon, seed, beta)
        self.k, self.eps = int(k), float(epsilon)
        self.name = name or f"popularity PL eps={epsilon:g}"

    def draw(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """A Plackett-Luce slate."""
        return self.policy.act(obs)[0]

    def conditional(self, obs: dict[str, np.ndarray], slates: np.ndarray) -> np.ndarray:
        """The Plackett-Luce factors of the given slates."""
        return self.policy.slate_propensities(obs, slates)


# ---------------------------------------------------------------------------- click model
class ClickModel:
    """``q(s, a, j) = sigmoid(alpha_j + beta_j * ranker_score(s, a))``: the DM's reward model.

    The ranker's scores (any scale) are calibrated per slate position by logistic regression
    on logged impressions (clicks of any kind as labels), so the direct method uses the
    ranker the project trains, with the position effect it does not model.

    Args:
        ranker: anything with ``score(obs, candidates) -> (B, K)``.
        k: slate size.
    """

    def __init__(self, ranker: Any, k: int) -> None:
        self.ranker, self.k = ranker, int(k)
        self.alpha = np.zeros(k)
        self.beta = np.ones(k)

    def fit(self, scores: np.ndarray, clicks: np.ndarray, iters: int = 50) -> ClickModel:
        """Newton steps of the per-position logistic regression on (B, k) scores and clicks."""
        s = np.asarray(scores, dtype=np.float64)
        y = np.asarray(clicks, dtype=np.float64)
        mu, sd = s[np.isfinite(s)].mean(), s[np.isfinite(s)].std() + 1e-12
        x = np.where(np.isfinite(s), (s - mu) / sd, -10.0)
        self._mu, self._sd = mu, sd
        for j in range(self.k):  # k positions, 2 parameters each
            a, b = 0.0, 1.0
            xj, yj = x[:, j], y[:, j]
            for _ in range(iters):
                p = 1.0 / (1.0 + np.exp(-(a + b * xj)))
                g = np.array([np.sum(p - yj), np.sum((p - yj) * xj)])
                w = p * (1 - p) + 1e-9
                h = np.array([[w.sum(), (w * xj).sum()], [(w * xj).sum(), (w * xj * xj).sum()]])
                step = np.linalg.solve(h + 1e-6 * np.eye(2), g)
                a, b = a - step[0], b - step[1]
                if np.abs(step).max() < 1e-8:
                    break
            self.alpha[j], self.beta[j] = a, b
        return self

    def predict(self, obs: dict[str, np.ndarray], slates: np.ndarray) -> np.ndarray:
        """``q`` (B, k) for the items of ``slates`` at their positions."""
        s = np.asarray(self.ranker.score(obs, np.asarray(slates)), dtype=np.float64)
        x = np.where(np.isfinite(s), (s - self._mu) / self._sd, -10.0)
        return 1.0 / (1.0 + np.exp(-(self.alpha[None, :] + self.beta[None, :] * x)))


# ---------------------------------------------------------------------------- the log + truth
class TruthRecorder:
    """A behaviour policy wrapper that records, at every step, what OPE needs and the truth.

    Pass it to :func:`simenv.collect` in place of the behaviour policy. Before returning the
    behaviour's slates it computes, for each target: the conditional probabilities of the
    behaviour's slate, the true expected clicks of the target's own slate in the current
    hidden state (averaged over ``n_draws`` draws for stochastic targets), and, with a click
    model, the DM terms. Rows are keyed by (user, session, session step, time) and aligned
    with the log's requests by :meth:`data`.

    Args:
        env: the env ``collect`` will step (its hidden state is read; evaluation only).
        behaviour: the logging policy (``act -> (slates, propensities)``).
        targets: target policies.
        click_model: optional :class:`ClickModel` for ``dm`` / ``dr``.
        n_draws: slates drawn per stochastic target per step for the truth.
    """

    def __init__(
        self,
        env: BatchedRecEnv,
        behaviour: Any,
        targets: Sequence[Any],
        click_model: ClickModel | None = None,
        n_draws: int = 4,
    ) -> None:
        self.env, self.behaviour, self.targets = env, behaviour, list(targets)
        self.click_model, self.n_draws = click_model, int(n_draws)
        self.name = getattr(behaviour, "name", "behaviour")
        self.last_candidates = None
        self._parts: dict[str, list[np.ndarray]] = {}

    def _add(self, key: str, value: np.ndarray) -> None:
        self._parts.setdefault(key, []).append(np.asarray(value))

    def act(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The behaviour's slates and propensities; records the OPE quantities."""
        slates, prop = self.behaviour.act(obs)
        ctx = np.asarray(obs[Obs.CONTEXT])
        self._add("user", obs_users(obs))
        self._add("session", ctx[:, 1].astype(np.int64))
        self._add("step", ctx[:, 2].astype(np.int64))
        self._add("time", ctx[:, 0].astype(np.float64))
        self._add("behaviour_truth", slate_click_probabilities(self.env, slates).sum(axis=1))
        if self.click_model is not None:
            self._add("q_logged", self.click_model.predict(obs, slates))
        for i, tgt in enumerate(self.targets):
            draws = self.n_draws if getattr(tgt, "stochastic", False) else 1
            truth = np.zeros(slates.shape[0])
            dm = np.zeros(slates.shape[0])
            for _ in range(draws):
                t_slates = tgt.draw(obs)
                truth += slate_click_probabilities(self.env, t_slates).sum(axis=1) / draws
                if self.click_model is not None:
                    dm += self.click_model.predict(obs, t_slates).sum(axis=1) / draws
            self._add(f"truth_{i}", truth)
            self._add(f"dm_{i}", dm)
            self._add(f"target_{i}", tgt.conditional(obs, slates))
        return slates, prop

    def data(self, log: ImpressionLog) -> OPEData:
        """Align the recorded rows with ``log``'s requests (one row per request)."""
        rec = {k: np.concatenate(v) for k, v in self._parts.items()}
        if "user" not in rec:
            raise ValueError(
                "recorded rows do not cover the log's requests (was the recorder used?)"
            )
        c = log.columns
        order = np.lexsort((c[Columns.POSITION], c[Columns.REQUEST]))
        k = int(log.meta.get("slate_size", 0)) or int(c[Columns.POSITION].max()) + 1
        first = order[::k]
        keys_log = np.stack(
            [
                c[Columns.USER][first].astype(np.float64),
                c[Columns.SESSION][first].astype(np.float64),
                c["session_step"][first].astype(np.float64),
                c[Columns.TIME][first].astype(np.float64),
            ],
            axis=1,
        )
        keys_rec = np.stack([rec["user"], rec["session"], rec["step"], rec["time"]], axis=1).astype(
            np.float64
        )
        idx = _match_rows(keys_log, keys_rec)
        fb = c[Columns.FEEDBACK][order].reshape(-1, k)
        clicks = np.isin(fb, [int(EventType.CLICK), int(EventType.LIKE), int(EventType.DISLIKE)])
        prop = c[Columns.PROPENSITY][order].reshape(-1, k).astype(np.float64)
        n_t = len(self.targets)
        return OPEData(
            names=[t.name for t in self.targets],
            user=c[Columns.USER][first].astype(np.int64),
            session_key=_session_keys(c, first),
            clicks=clicks.astype(np.float64),
            behaviour=prop,
            target=np.stack([rec[f"target_{i}"][idx] for i in range(n_t)]),
            truth=np.stack([rec[f"truth_{i}"][idx] for i in range(n_t)]),
            dm=np.stack([rec[f"dm_{i}"][idx] for i in range(n_t)]),
            q_logged=rec["q_logged"][idx] if "q_logged" in rec else None,
            behaviour_truth=rec["behaviour_truth"][idx],
        )


def _match_rows(keys_log: np.ndarray, keys_rec: np.ndarray) -> np.ndarray:
    """Index into ``keys_rec`` of each row of ``keys_log`` (exact match; raises otherwise)."""
    if keys_rec.shape[0] == 0:
        raise ValueError("recorded rows do not cover the log's requests (was the recorder used?)")
    fields = [("", keys_rec.dtype)] * keys_rec.shape[1]
    view_r = np.ascontiguousarray(keys_rec).view(fields).ravel()  # rows as records
    view_l = np.ascontiguousarray(keys_log).view(fields).ravel()
    o = np.argsort(view_r, kind="stable")  # lexicographic over the key columns
    pos = np.minimum(np.searchsorted(view_r[o], view_l), view_r.size - 1)
    if not (view_r[o][pos] == view_l).all():
        raise ValueError("recorded rows do not cover the log's requests (was the recorder used?)")
    return o[pos]


def _session_keys(c: dict[str, np.ndarray], first: np.ndarray) -> np.ndarray:
    """A key per request of its (user, episode, session): sessions are the unit of log size."""
    user = c[Columns.USER][first].astype(np.int64)
    sess = c[Columns.SESSION][first].astype(np.int64)
    step = c["session_step"][first].astype(np.int64)
    req = c[Columns.REQUEST][first]
    order = np.lexsort((req, user))
    u, s, j = user[order], sess[order], step[order]
    new_episode = np.r_[True, (u[1:] != u[:-1]) | ((s[1:] == 0) & (j[1:] == 0))]
    new_session = new_episode | np.r_[True, s[1:] != s[:-1]]
    key = np.cumsum(new_session) - 1
    out = np.empty_like(key)
    out[order] = key
    return out


@dataclass(eq=False)
class OPEData:
    """One row per logged request (n), one slice per target policy (T).

    Attributes:
        names: target names (T,).
        user: int64 (n,).
        session_key: int64 (n,) the (user, episode, session) each request belongs to.
        clicks: float (n, k) click (any engagement) at each position.
        behaviour: float (n, k) logged ``mu(a_j | a_<j, s)``.
        target: float (T, n, k) ``pi(a_j | a_<j, s)`` of the logged slates.
        truth: float (T, n) true expected clicks of each target's slate at the logged state.
        dm: float (T, n) the click model's expected clicks of each target's slate.
        q_logged: float (n, k) the click model at the logged items, or None.
        behaviour_truth: float (n,) true expected clicks of the logged slate.
    """

    names: list[str]
    user: np.ndarray
    session_key: np.ndarray
    clicks: np.ndarray
    behaviour: np.ndarray
    target: np.ndarray
    truth: np.ndarray
    dm: np.ndarray
    q_logged: np.ndarray | None
    behaviour_truth: np.ndarray

    def __len__(self) -> int:
        return int(self.clicks.shape[0])


def _terms(data: OPEData, t: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Per-request (numerator, denominator or None) of every estimator for target ``t``."""
    ratio = data.target[t] / data.behaviour  # (n, k) conditional ratios
    w_cum = np.cumprod(ratio, axis=1)  # (n, k) w_{1:j}
    c = data.clicks
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        "ips": (w_cum[:, -1] * c.sum(axis=1), None),
        "snips": (w_cum[:, -1] * c.sum(axis=1), w_cum[:, -1]),
        "cascade": ((w_cum * c).sum(axis=1), None),
    }
    if data.q_logged is not None:
        out["dm"] = (data.dm[t], None)
        out["dr"] = (data.dm[t] + (w_cum * (c - data.q_logged)).sum(axis=1), None)
    return out


def estimate(data: OPEData, t: int) -> dict[str, dict[str, float]]:
    """Every estimator's value and standard error for target ``t`` over the whole log.

    Returns:
        name -> {"value", "se"} (the SNIPS standard error by the delta method).
    """
    res = {}
    for name, (num, den) in _terms(data, t).items():
        n = num.size
        if den is None:
            res[name] = {"value": float(num.mean()), "se": float(num.std(ddof=1) / np.sqrt(n))}
        else:
            v = float(num.sum() / max(den.sum(), 1e-300))
            resid = (num - v * den) / max(den.mean(), 1e-300)
            res[name] = {"value": v, "se": float(resid.std(ddof=1) / np.sqrt(n))}
    return res


def estimate_by_chunk(
    data: OPEData, t: int, chunk: np.ndarray, n_chunks: int
) -> dict[str, np.ndarray]:
    """Every estimator on each chunk of the log (chunk id per request, -1 = unused).

    Returns:
        name -> float (n_chunks,) estimates (NaN for an empty chunk).
    """
    keep = chunk >= 0
    ch = chunk[keep]
    count = np.bincount(ch, minlength=n_chunks).astype(np.float64)
    out = {}
    for name, (num, den) in _terms(data, t).items():
        s_num = np.bincount(ch, weights=num[keep], minlength=n_chunks)
        if den is None:
            out[name] = np.where(count > 0, s_num / np.maximum(count, 1), np.nan)
        else:
            s_den = np.bincount(ch, weights=den[keep], minlength=n_chunks)
            out[name] = np.where(s_den > 0, s_num / np.where(s_den > 0, s_den, 1.0), np.nan)
    return out


def bootstrap_estimates(
    data: OPEData,
    t: int,
    sizes: Sequence[int],
    replicates: int,
    rng: np.random.Generator,
) -> dict[int, dict[str, np.ndarray]]:
    """Every estimator on bootstrap logs of ``size`` sessions (sessions drawn with replacement).

    A session (one user's visit: the requests between two absences) is the unit of log size;
    a bootstrap log of n sessions weighs each session's requests by how often it was drawn.
    Everything reduces to per-session sums, so a replicate is one matrix product.

    Returns:
        size -> name -> float (replicates,) estimates.
    """
    key = data.session_key
    n_sess = int(key.max()) + 1
    count = np.bincount(key, minlength=n_sess).astype(np.float64)  # requests per session
    sums = {}
    for name, (num, den) in _terms(data, t).items():
        sums[name] = (
            np.bincount(key, weights=num, minlength=n_sess),
            None if den is None else np.bincount(key, weights=den, minlength=n_sess),
        )
    out: dict[int, dict[str, np.ndarray]] = {}
    for size in sizes:
        mult = rng.multinomial(int(size), np.full(n_sess, 1.0 / n_sess), size=replicates)  # (R, S)
        mult = mult.astype(np.float64)
        n_req = mult @ count  # (R,)
        res = {}
        for name, (s_num, s_den) in sums.items():
            top = mult @ s_num
            if s_den is None:
                res[name] = top / n_req
            else:
                den = mult @ s_den
                res[name] = np.where(den > 0, top / np.where(den > 0, den, 1.0), np.nan)
        out[int(size)] = res
    return out
