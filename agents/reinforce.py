"""A REINFORCE candidate generator with the top-K off-policy correction (Chen et al. 2019).

The lecture frames the recommender as an RL agent and the generator as the stage that
"reduces the action space". This module trains the softmax two-tower generator by policy
gradient on long-term return instead of next-click likelihood, as in Chen, Beutel,
Covington, Jain, Belletti, Chi, "Top-K Off-Policy Correction for a REINFORCE Recommender
System" (WSDM 2019):

- Policy: ``pi(a|s) = softmax_a(sim(u(s), v_a) / tau)`` over the items released at the
  request time (the two-tower model of :mod:`retrieval.model`; serving is its top-K, so
  the trained policy plugs into :class:`agents.pipeline.MultiStagePipeline` unchanged).
- Return of a shown item: ``G = r(a) + gamma R_{t+1}``, its own reward plus the discounted
  return of the rest of the user's episode, ``R_t = sum_{t' >= t} gamma^{t'-t} r_{t'}`` with
  ``r_t`` the reward of slate ``t``; the episode runs over sessions until the user churns,
  so a user who comes back adds to the return (retention counts). ``gamma = 0`` is the
  myopic (next-click) variant.
- Top-K off-policy correction (Chen et al. eq. 6): the gradient of each logged (s, a) is
  ``min(pi(a|s) / beta(a|s), c) * lambda_K(s, a) * A * grad log pi(a|s)`` with
  ``lambda_K = K (1 - pi(a|s))^(K-1)``: the policy proposes a set of K items, and an item
  already likely to be in the set gains little from more probability.
- Behaviour policy ``beta``: ``"learned"`` — a separate softmax head over the same user
  state with the gradient blocked into the state (Chen et al. section 4.3), fitted to the
  logged shown items; ``"logged"`` — the single-draw probability of the item under the
  logging policy's Plackett-Luce weights, recovered exactly from the logged per-position
  propensities (:func:`plackett_luce_single_draw`); online, ``beta`` is the frozen policy
  that collected the round.
- Variance reduction beyond the paper: ``A = G - V(s)`` with a learned value baseline
  (gradient blocked into the state; unbiased), advantages scaled by their batch standard
  deviation, and the correction weights normalised to mean 1 per batch (a self-normalised
  step size: the top-K multiplier is up to K and would otherwise set the learning rate).

A slate of k items is treated as k actions of one state, each credited with its own
return ``G``; the next state depends on the whole slate, which this credit assignment
ignores (as does Chen et al.'s one-action-per-event view).

Training from logs needs whole episodes: :func:`step_returns` raises if a log interleaves
two episodes of one user (collect each user at most once per log, as
``collect(..., n_users <= world.n_users)`` does).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from agents.pipeline import MultiStagePipeline, Source
from retrieval.model import TwoTowerGenerator, TwoTowerModel
from retrieval.train import to_torch_obs
from simenv.batched_env import BatchedRecEnv
from simenv.collect import collect
from simenv.history import EventSequences, impression_examples
from simenv.log import ImpressionLog
from simenv.types import Columns, ItemCatalog, Obs

__all__ = [
    "ReinforceConfig",
    "ReinforceData",
    "ReinforceGenerator",
    "SampledTwoTowerGenerator",
    "plackett_luce_single_draw",
    "step_returns",
    "train_online",
]

BEHAVIOURS = ("learned", "logged")


@dataclass(frozen=True)
class ReinforceConfig:
    """How the REINFORCE generator is trained.

    Attributes:
        gamma: discount per slate in ``[0, 1)``; 0 is the myopic (next-click) variant.
        top_k: K of the top-K correction (the candidates the generator gives the ranker).
        weight_cap: cap ``c`` on the importance weight ``pi / beta``.
        behaviour: ``"learned"`` (a behaviour head) or ``"logged"`` (logged PL propensities).
        baseline: subtract a learned value ``V(s)`` from the return.
        epochs: passes over the training requests.
        batch_size: requests per step (each with its k shown items).
        lr: Adam learning rate of the policy and the heads.
        max_requests_per_epoch: requests drawn per epoch (None: all).
        history_length: L of the rebuilt observations.
        grad_clip: max gradient norm.
        seed: seed of shuffles and sampling.
        threads: ``torch.set_num_threads`` during training (None: leave).
        progress: tqdm bar.
    """

    gamma: float = 0.9
    top_k: int = 200
    weight_cap: float = 10.0
    behaviour: str = "learned"
    baseline: bool = True
    epochs: int = 2
    batch_size: int = 256
    lr: float = 1e-3
    max_requests_per_epoch: int | None = None
    history_length: int = 32
    grad_clip: float = 5.0
    seed: int = 0
    threads: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.gamma, (int, float)) and 0.0 <= self.gamma < 1.0):
            raise ValueError(f"gamma must be a number in [0, 1), got {self.gamma!r}")
        for name in ("top_k", "epochs", "batch_size", "history_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.weight_cap, (int, float)) and self.weight_cap >= 1.0):
            raise ValueError(f"weight_cap must be a number >= 1, got {self.weight_cap!r}")
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour must be one of {BEHAVIOURS}, got {self.behaviour!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"lr must be a number in (0, 1), got {self.lr!r}")
        if self.max_requests_per_epoch is not None and (
            not isinstance(self.max_requests_per_epoch, int) or self.max_requests_per_epoch < 1
        ):
            raise ValueError(
                f"max_requests_per_epoch must be None or an integer >= 1, got {self.max_requests_per_epoch!r}"
            )
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip!r}")


# ---------------------------------------------------------------------------- data
def step_returns(log: ImpressionLog, gamma: float) -> dict[str, np.ndarray]:
    """Per request: its reward ``r_t``, return ``R_t`` and the next request's return.

    Episodes are found per user by the (session, session_step) chain: a request continues
    the previous one of its user if it is ``(s, j + 1)`` or ``(s + 1, 0)``; ``(0, 0)``
    starts a new episode. ``R_t = r_t + gamma R_{t+1}`` within an episode, 0 after its end.

    Returns:
        ``request`` int64 (n,) sorted request ids, ``reward`` (n,), ``ret`` (n,) and
        ``ret_next`` (n,) float64.

    Raises:
        ValueError: for ``gamma`` outside ``[0, 1]`` or a log whose episodes of one user
            interleave (two episodes of a user running at the same time).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    c = log.columns
    req_all = c[Columns.REQUEST]
    req, first = np.unique(req_all, return_index=True)
    reward = np.bincount(
        np.searchsorted(req, req_all), weights=c[Columns.REWARD].astype(np.float64),
        minlength=req.size,
    )  # fmt: skip
    user = c[Columns.USER][first]
    sess = c[Columns.SESSION][first].astype(np.int64)
    step = c["session_step"][first].astype(np.int64)
    order = np.lexsort((req, user))  # by user, then request (collection) order
    u, s, j = user[order], sess[order], step[order]
    same_user = np.r_[False, u[1:] == u[:-1]]
    cont = same_user & (
        ((s == np.r_[-1, s[:-1]]) & (j == np.r_[-1, j[:-1]] + 1))
        | ((s == np.r_[-1, s[:-1]] + 1) & (j == 0))
    )
    start = (s == 0) & (j == 0)
    bad = ~cont & ~start
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise ValueError(
            f"log interleaves episodes of user {int(u[i])} (request {int(req[order][i])} at "
            f"session {int(s[i])}, step {int(j[i])} does not continue the previous one); "
            "returns need whole episodes: collect each user at most once per log"
        )
    if (cont & start).any():
        raise ValueError("inconsistent episode chain (a continuing request at session 0 step 0)")
    r = reward[order]
    ends = np.r_[~cont[1:], True]  # last request of each episode
    ep_id = np.cumsum(~cont) - 1  # episode of each request (sorted order)
    last = np.zeros(int(ep_id[-1]) + 1 if ep_id.size else 0, dtype=np.int64)
    last[ep_id[ends]] = np.nonzero(ends)[0]
    back = last[ep_id] - np.arange(r.size)  # steps to the episode's last request
    ret = np.zeros(r.size)
    # R_t = r_t + gamma R_{t+1}: one vectorised pass per distance to the end (<= horizon)
    by_back = np.argsort(back, kind="stable")
    bounds = np.searchsorted(back[by_back], np.arange(int(back.max(initial=-1)) + 2))
    for d in range(bounds.size - 1):
        rows = by_back[bounds[d] : bounds[d + 1]]
        ret[rows] = r[rows] + (gamma * ret[rows + 1] if d > 0 else 0.0)
    ret_next = np.where(ends, 0.0, np.r_[ret[1:], 0.0])
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size)
    return {"request": req, "reward": reward, "ret": ret[inv], "ret_next": ret_next[inv]}


def plackett_luce_single_draw(propensities: np.ndarray) -> np.ndarray:
    """Single-draw probabilities ``w_a / sum_all w`` of a Plackett-Luce slate's items.

    The logged propensity at position j is ``p_j = w_{a_j} / (W - sum_{i<j} w_{a_i})``, so
    ``q_j = w_{a_j} / W`` follows exactly: ``q_0 = p_0``, ``q_j = p_j (1 - sum_{i<j} q_i)``.
    For a policy that mixes PL with uniform draws per position it is an approximation.

    Args:
        propensities: float ``(n, k)`` per-position propensities, in slate order.

    Returns:
        float64 ``(n, k)``.
    """
    p = np.asarray(propensities, dtype=np.float64)
    if p.ndim != 2 or not np.isfinite(p).all() or (p <= 0).any() or (p > 1).any():
        raise ValueError("propensities must be a finite (n, k) array in (0, 1]")
    q = np.empty_like(p)
    used = np.zeros(p.shape[0])
    for j in range(p.shape[1]):  # k positions
        q[:, j] = p[:, j] * np.maximum(1.0 - used, 0.0)
        used += q[:, j]
    return q


@dataclass(eq=False)
class ReinforceData:
    """Logged requests ready for policy-gradient training.

    Attributes:
        obs: batched observations ``(n, ...)`` at each request.
        items: int64 ``(n, k)`` the shown items.
        reward: float32 ``(n, k)`` each shown item's own reward.
        returns: float32 ``(n, k)`` ``G = r(a) + gamma R_{t+1}``.
        behaviour: float64 ``(n, k)`` logged single-draw probabilities (NaN when the log has
            no propensities).
    """

    obs: dict[str, np.ndarray]
    items: np.ndarray
    reward: np.ndarray
    returns: np.ndarray
    behaviour: np.ndarray

    def __len__(self) -> int:
        return int(self.items.shape[0])

    @classmethod
    def from_log(
        cls,
        log: ImpressionLog,
        sequences: EventSequences,
        history_length: int,
        gamma: float,
        before: float | None = None,
        returns_log: ImpressionLog | None = None,
    ) -> ReinforceData:
        """Requests of ``log`` (optionally only those before time ``before``).

        Args:
            log: the impressions to learn from.
            sequences: engagement events for the histories (e.g. of ``log`` itself).
            history_length: L.
            gamma: discount per slate.
            before: keep requests with time < ``before`` (a training cut-off).
            returns_log: the log the returns are computed on (default ``log``); pass the
                whole log when ``log`` is a time split of it, so episodes are not cut.
        """
        ex = impression_examples(log, sequences, history_length)
        c = log.columns
        order = np.lexsort((c[Columns.POSITION], c[Columns.REQUEST]))
        k = ex.items.shape[1]
        req = c[Columns.REQUEST][order].reshape(-1, k)[:, 0]
        rew = c[Columns.REWARD][order].reshape(-1, k).astype(np.float32)
        prop = c[Columns.PROPENSITY][order].reshape(-1, k)
        if np.isfinite(prop).all() and (prop > 0).all():
            beh = plackett_luce_single_draw(prop)
        else:
            beh = np.full(prop.shape, np.nan)
        sr = step_returns(log if returns_log is None else returns_log, gamma)
        pos = np.searchsorted(sr["request"], req)
        if (pos >= sr["request"].size).any() or (
            sr["request"][np.minimum(pos, sr["request"].size - 1)] != req
        ).any():
            raise ValueError("returns_log must contain every request of log")
        g = (rew + gamma * sr["ret_next"][pos][:, None]).astype(np.float32)
        keep = np.ones(req.size, bool) if before is None else ex.obs[Obs.CONTEXT][:, 0] < before
        rows = np.nonzero(keep)[0]
        obs = {key: v[rows] for key, v in ex.obs.items()}
        return cls(obs, ex.items[rows], rew[rows], g[rows], beh[rows])


# ---------------------------------------------------------------------------- model
class ReinforceGenerator(nn.Module):
    """A two-tower softmax policy trained by REINFORCE, with behaviour and value heads.

    Args:
        policy: the two-tower model (e.g. a copy of a supervised generator's, to fine-tune).
        catalog: the public catalog (release times, n_items).
    """

    def __init__(self, policy: TwoTowerModel, catalog: ItemCatalog) -> None:
        super().__init__()
        self.policy = policy
        self.catalog = catalog
        d = self._dim()
        self.behaviour_items = nn.Embedding(catalog.n_items, d)
        nn.init.normal_(self.behaviour_items.weight, std=0.05)
        self.behaviour_bias = nn.Parameter(torch.zeros(catalog.n_items))
        self.value = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 1))
        self._release = torch.as_tensor(np.asarray(catalog.release_time, dtype=np.float64))

    def _dim(self) -> int:
        with torch.no_grad():
            return int(self.policy.item_vectors(torch.zeros(1, dtype=torch.long)).shape[-1])

    # ---- forward pieces
    def _state(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.policy.similarity.prepare(self.policy.user_vectors(obs))  # (B, d)

    def _released(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        t = obs[Obs.CONTEXT][:, 0].double()
        return self._release[None, :] <= t[:, None]  # (B, N)

    def policy_log_probs(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``log pi(.|s)`` over the catalog ``(B, N)``, ``-inf`` for unreleased items."""
        u = self.policy.user_vectors(obs)  # (B, d)
        v = self.policy.item_vectors(torch.arange(self.catalog.n_items))  # (N, d)
        logits = self.policy.similarity(u, v)  # (B, N) = sim / tau
        return torch.log_softmax(logits.masked_fill(~self._released(obs), -torch.inf), dim=1)

    def behaviour_log_probs(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``log beta(.|s)`` of the learned head ``(B, N)`` (state gradient blocked)."""
        s = self._state(obs).detach()
        logits = s @ self.behaviour_items.weight.T + self.behaviour_bias  # (B, N)
        return torch.log_softmax(logits.masked_fill(~self._released(obs), -torch.inf), dim=1)

    def state_value(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``V(s)`` ``(B,)`` (state gradient blocked)."""
        return self.value(self._state(obs).detach()).squeeze(-1)

    # ---- training
    def fit(
        self,
        data: ReinforceData,
        config: ReinforceConfig,
        behaviour_model: TwoTowerModel | None = None,
    ) -> dict[str, list[float]]:
        """Train on logged requests; returns per-epoch means of the losses and weights.

        Args:
            data: the requests.
            config: training options.
            behaviour_model: the policy that collected ``data`` (online rounds): its
                ``pi`` is ``beta``, overriding ``config.behaviour``.
        """
        if config.behaviour == "logged" and behaviour_model is None:
            if not np.isfinite(data.behaviour).all():
                raise ValueError("behaviour='logged' needs a log with finite propensities")
        old_threads = torch.get_num_threads()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        try:
            return self._fit(data, config, behaviour_model)
        finally:
            torch.set_num_threads(old_threads)

    def _fit(self, data, config, behaviour_model):
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x5E1F]))
        opt = torch.optim.Adam(self.parameters(), lr=config.lr)
        n = len(data)
        per_epoch = (
            n if config.max_requests_per_epoch is None else min(n, config.max_requests_per_epoch)
        )
        history: dict[str, list[float]] = {
            k: []
            for k in ("policy_loss", "behaviour_nll", "value_loss", "weight", "lambda_k", "capped")
        }
        K = float(config.top_k)
        self.train()
        for epoch in range(config.epochs):
            rows = rng.permutation(n)[:per_epoch]
            sums = dict.fromkeys(history, 0.0)
            n_batches = 0
            batches = range(0, per_epoch, config.batch_size)
            for s0 in tqdm(
                batches, desc=f"reinforce epoch {epoch + 1}", disable=not config.progress
            ):
                idx = rows[s0 : s0 + config.batch_size]
                obs = to_torch_obs({key: v[idx] for key, v in data.obs.items()})
                items = torch.from_numpy(data.items[idx])  # (b, k)
                g = torch.from_numpy(data.returns[idx]).float()  # (b, k)
                logp_all = self.policy_log_probs(obs)  # (b, N)
                logp = logp_all.gather(1, items)  # (b, k) log pi(a|s)
                pi = logp.exp().detach()
                # beta(a|s): the collecting policy, the learned head, or the logged PL draw
                blogp_all = self.behaviour_log_probs(obs)
                beh_nll = -blogp_all.gather(1, items).mean()
                if behaviour_model is not None:
                    with torch.no_grad():
                        beta = (
                            _model_log_probs(behaviour_model, obs, self._released(obs))
                            .gather(1, items)
                            .exp()
                        )
                elif config.behaviour == "logged":
                    beta = torch.from_numpy(data.behaviour[idx]).float()
                else:
                    beta = blogp_all.gather(1, items).exp().detach()
                ratio = pi / beta.clamp_min(1e-12)
                w = ratio.clamp(max=config.weight_cap)  # capped importance weight
                lam = K * torch.exp((K - 1.0) * torch.log1p(-pi.clamp(max=1 - 1e-6)))  # lambda_K
                coef = w * lam
                coef = coef / coef.mean().clamp_min(1e-12)  # self-normalised step size
                if config.baseline:
                    v = self.state_value(obs)  # (b,)
                    value_loss = ((v[:, None] - g) ** 2).mean()
                    adv = g - v.detach()[:, None]
                else:
                    value_loss = torch.zeros(())
                    adv = g
                adv = adv / adv.std().clamp_min(1e-6)
                policy_loss = -(coef * adv * logp).mean()  # top-K corrected REINFORCE
                loss = policy_loss + beh_nll + value_loss
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.parameters(), config.grad_clip)
                opt.step()
                for key, val in (
                    ("policy_loss", policy_loss.item()), ("behaviour_nll", beh_nll.item()),
                    ("value_loss", float(value_loss.detach())), ("weight", float(w.mean())),
                    ("lambda_k", float(lam.mean())), ("capped", float((ratio > config.weight_cap).float().mean())),
                ):  # fmt: skip
                    sums[key] += val
                n_batches += 1
            for key in history:
                history[key].append(sums[key] / max(n_batches, 1))
        self.eval()
        return history

    # ---- serving
    def generator(
        self, popularity: np.ndarray | None = None, name: str = "reinforce"
    ) -> TwoTowerGenerator:
        """The policy's top-K as a candidate generator (greedy serving)."""
        return TwoTowerGenerator(self.policy, self.catalog, popularity, name=name)

    def sampler(self, seed: int, name: str = "reinforce-sampled") -> SampledTwoTowerGenerator:
        """The policy sampling K candidates without replacement (exploration, online rounds)."""
        return SampledTwoTowerGenerator(self.policy, self.catalog, seed=seed, name=name)


def _model_log_probs(
    model: TwoTowerModel, obs: dict[str, torch.Tensor], released: torch.Tensor
) -> torch.Tensor:
    u = model.user_vectors(obs)
    v = model.item_vectors(torch.arange(released.shape[1]))
    return torch.log_softmax(model.similarity(u, v).masked_fill(~released, -torch.inf), dim=1)


class SampledTwoTowerGenerator(TwoTowerGenerator):
    """K candidates drawn from ``pi`` without replacement (Gumbel top-K), released items only.

    ``retrieve`` returns the drawn ids in draw order with their logits.
    """

    def __init__(
        self, model: TwoTowerModel, catalog: ItemCatalog, seed: int, name: str = "sampled"
    ) -> None:
        super().__init__(model, catalog, name=name)
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6A3B]))

    def retrieve(
        self, obs: dict[str, np.ndarray], k: int, exclude_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gumbel top-k of the logits (a Plackett-Luce sample of k distinct released items)."""
        logits = self.score_all(obs, exclude_seen=exclude_seen).astype(np.float64)  # (B, N)
        gumbel = -np.log(-np.log(self.rng.uniform(1e-300, 1.0, size=logits.shape)))
        noisy = logits + gumbel  # -inf stays -inf
        k = min(int(k), logits.shape[1])
        ids = np.argpartition(-noisy, k - 1, axis=1)[:, :k]
        ok = np.isfinite(np.take_along_axis(noisy, ids, axis=1))
        order = np.argsort(-np.take_along_axis(noisy, ids, axis=1), axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        ok = np.take_along_axis(ok, order, axis=1)
        sc = np.take_along_axis(logits, ids, axis=1)
        return np.where(ok, ids, -1), np.where(ok, sc, -np.inf).astype(np.float32)


# ---------------------------------------------------------------------------- online
def train_online(
    agent: ReinforceGenerator,
    env: BatchedRecEnv,
    ranker: Any,
    config: ReinforceConfig,
    rounds: int,
    users_per_round: int,
    seed: int,
    retrain_ranker: Any | None = None,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Rounds of (act with the sampled policy in the pipeline -> REINFORCE on that log).

    Each round, a frozen copy of the policy samples K candidates per request (Gumbel
    top-K), the ranker picks the slate, ``users_per_round`` whole user episodes are
    collected; the policy is then trained on them with ``beta`` = the frozen copy's
    ``pi``. With ``retrain_ranker(log) -> ranker`` the ranker is retrained after each
    round on the impressions of that round (the two-agent view: both agents learn from
    the shared reward).

    Returns:
        Per round: mean reward per user of the collected episodes and the training stats.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if not isinstance(users_per_round, int) or users_per_round < 1:
        raise ValueError(f"users_per_round must be an integer >= 1, got {users_per_round!r}")
    k = env.config.slate_size
    out = []
    for r in range(rounds):
        frozen = copy.deepcopy(agent.policy).eval()
        sampler = SampledTwoTowerGenerator(frozen, agent.catalog, seed=seed * 1000 + r)
        pipe = MultiStagePipeline(
            [Source(sampler, config.top_k)], ranker, k, name="reinforce-online"
        )
        n = min(users_per_round, env.world.n_users)
        users = np.random.default_rng(np.random.SeedSequence([seed, r, 0x0A11])).choice(
            env.world.n_users, size=n, replace=False
        )
        log = collect(env, pipe, n_users=n, seed=seed * 1000 + r, users=users, progress=progress)
        seq = EventSequences.from_log(log, agent.catalog.n_items)
        data = ReinforceData.from_log(log, seq, config.history_length, config.gamma)
        hist = agent.fit(data, config, behaviour_model=frozen)
        if retrain_ranker is not None:
            ranker = retrain_ranker(log)
        rewards = log[Columns.REWARD].sum() / n
        out.append(
            {
                "round": r + 1,
                "reward_per_user": float(rewards),
                **{key: v[-1] for key, v in hist.items()},
            }
        )
    return out
