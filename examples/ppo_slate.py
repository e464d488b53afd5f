"""PPO with a Plackett-Luce slate policy on simenv's native vector env, in one file (CleanRL style).

Read top to bottom: arguments, environment, agent, rollout + GAE, PPO update, evaluation.

- Environment: ``gymnasium.make_vec("simenv/RecEnv-small-v0", num_envs=B,
  vectorization_mode="vector_entry_point")``, a :class:`simenv.BatchedRecEnv` stepping B
  users at once (B in the hundreds), next-step autoreset.
- Policy: the slate is the action. A user vector ``u = actor(features(obs))`` scores every
  item through learned item embeddings, ``logits_i = <u, e_i>`` (unreleased items masked);
  the slate is a Plackett-Luce sample without replacement (Gumbel top-k), whose
  log-probability is ``sum_j [logit(a_j) - logsumexp(logits over items not yet picked)]``.
- Features: the mean of the embeddings of the history's (item + event type) and log1p of
  the session index and position in session, through one linear layer and tanh (the date
  is left out: its scale would swamp an untrained history encoding).
- Autoreset: a slot whose episode ended at step t ignores its action at t+1 and returns
  the next user's first observation with reward 0; those reset steps are masked out of the
  loss, GAE does not chain across them, and truncated episodes bootstrap from the value of
  their final observation.
- Entropy bonus: the entropy of the first position's softmax (the slate's entropy has no
  closed form).

Run: ``python examples/ppo_slate.py`` (a few minutes on one core; it ends with the reward
per user of the greedy policy against uniformly random slates, over the same users with the
same per-user random streams). The tests run it with a tiny budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import simenv  # noqa: F401  (registers the env ids)
from agents.base import RandomAgent
from agents.rollout import rollout
from simenv.types import EventType, Obs
from simenv.wrappers import released_items


@dataclass
class Args:
    env_id: str = "simenv/RecEnv-small-v0"
    """registered env id"""
    num_envs: int = 256
    """B, users stepped at once"""
    num_steps: int = 16
    """steps per rollout per env (a batch is num_envs * num_steps transitions)"""
    total_timesteps: int = 300_000
    """env steps (user-steps) in total"""
    learning_rate: float = 3e-3
    """Adam step size"""
    gamma: float = 0.9
    """discount per slate"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    update_epochs: int = 4
    """epochs over each rollout"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    clip_coef: float = 0.2
    """PPO ratio clip"""
    ent_coef: float = 0.01
    """weight of the first-position entropy"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    max_grad_norm: float = 0.5
    """gradient clipping"""
    dim: int = 32
    """embedding size"""
    eval_users: int = 300
    """users in the final evaluation"""
    seed: int = 1
    """seed of everything"""
    threads: int = 1
    """torch threads"""


def parse_args() -> Args:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Args):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    return Args(**vars(p.parse_args()))


def to_tensors(obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v)) for k, v in obs.items()}


class Agent(nn.Module):
    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.item = nn.Embedding(n_items, dim)  # item embeddings: history encoder and scorer
        self.event = nn.Embedding(EventType.n_types(), dim)
        self.mix = nn.Linear(dim + 2, dim)  # pooled history + (session, position)
        self.actor = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.critic = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, 1))
        nn.init.normal_(self.item.weight, std=0.1)

    def features(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = obs[Obs.MASK].float()  # (B, L)
        x = self.item(obs[Obs.ITEMS]) + self.event(obs[Obs.EVENTS])  # (B, L, d)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        ctx = torch.log1p(obs[Obs.CONTEXT][:, 1:])  # (B, 2) session, position (not the date)
        return torch.tanh(self.mix(torch.cat([pooled, ctx], dim=1)))  # (B, d)

    def logits(self, h: torch.Tensor, released: torch.Tensor) -> torch.Tensor:
        s = self.actor(h) @ self.item.weight.T  # (B, N)
        return s.masked_fill(~released, -torch.inf)

    def value(self, h: torch.Tensor) -> torch.Tensor:
        return self.critic(h).squeeze(-1)  # (B,)


def sample_slate(logits: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(logits.shape, generator=gen).clamp_(1e-12, 1.0)
    return torch.topk(logits - torch.log(-torch.log(u)), k, dim=1).indices  # Gumbel top-k = PL


def slate_log_prob(logits: torch.Tensor, slate: torch.Tensor) -> torch.Tensor:
    lp = torch.zeros(slate.shape[0])
    masked = logits
    for j in range(slate.shape[1]):  # k positions: log softmax over the items not yet picked
        pick = slate[:, j : j + 1]
        lp = lp + masked.gather(1, pick).squeeze(1) - torch.logsumexp(masked, dim=1)
        masked = masked.scatter(1, pick, -torch.inf)
    return lp


def first_position_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(1)


class GreedyAgent:
    """The trained policy as a project agent: the k items of highest logit (no sampling)."""

    name = "ppo-greedy"

    def __init__(self, agent: Agent, release: np.ndarray, k: int) -> None:
        self.agent, self.release, self.k = agent, release, k

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        rel = torch.from_numpy(released_items(self.release, obs[Obs.CONTEXT][:, 0]))
        logits = self.agent.logits(self.agent.features(to_tensors(obs)), rel)
        return torch.topk(logits, self.k, dim=1).indices.numpy()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)  # scripts may seed globally; the library never does
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)

    # ---- environment
    envs = gym.make_vec(
        args.env_id, num_envs=args.num_envs, vectorization_mode="vector_entry_point"
    )
    world = envs.unwrapped.world
    release = world.catalog.release_time
    k = envs.unwrapped.config.slate_size
    B, T = args.num_envs, args.num_steps

    # ---- agent
    agent = Agent(world.n_items, args.dim)
    opt = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    obs, _ = envs.reset(seed=args.seed)
    prev_done = np.zeros(B, bool)  # the next step of these slots is a reset step
    ep_ret, ep_returns = np.zeros(B), []
    n_updates = max(1, args.total_timesteps // (B * T))
    t0 = time.time()
    for update in range(1, n_updates + 1):
        # ---- rollout: T steps of B users
        buf_obs, buf_rel, buf_act, buf_logp, buf_val = [], [], [], [], []
        buf_rew, buf_valid, buf_term, buf_trunc = [], [], [], []
        for _ in range(T):
            o = to_tensors(obs)
            rel = torch.from_numpy(released_items(release, obs[Obs.CONTEXT][:, 0]))
            with torch.no_grad():
                h = agent.features(o)
                logits = agent.logits(h, rel)
                slate = sample_slate(logits, k, gen)
                logp, value = slate_log_prob(logits, slate), agent.value(h)
            obs, r, term, trunc, _ = envs.step(slate.numpy())
            buf_obs.append(o)
            buf_rel.append(rel)
            buf_act.append(slate)
            buf_logp.append(logp)
            buf_val.append(value)
            buf_rew.append(torch.as_tensor(r, dtype=torch.float32))
            buf_valid.append(torch.from_numpy(~prev_done))
            buf_term.append(torch.from_numpy(term))
            buf_trunc.append(torch.from_numpy(trunc))
            ep_ret += np.where(prev_done, 0.0, r)
            done = term | trunc
            ep_returns.extend(ep_ret[done].tolist())
            ep_ret[done] = 0.0
            prev_done = done
        with torch.no_grad():
            next_value = agent.value(agent.features(to_tensors(obs)))  # (B,)

        # ---- GAE over valid steps; no chaining across episode ends
        values = torch.stack(buf_val + [next_value])  # (T + 1, B)
        adv = torch.zeros(T, B)
        last = torch.zeros(B)
        for t in reversed(range(T)):
            term_t, trunc_t = buf_term[t].float(), buf_trunc[t].float()
            # a truncated episode bootstraps from its final observation (the obs at t + 1)
            boot = (1.0 - term_t) * values[t + 1]
            delta = buf_rew[t] + args.gamma * boot - values[t]
            cont = 1.0 - torch.maximum(term_t, trunc_t)
            last = delta + args.gamma * args.gae_lambda * cont * last
            last = last * buf_valid[t].float()  # reset steps carry nothing
            adv[t] = last
        ret = adv + values[:-1]

        # ---- PPO update on the valid transitions
        flat = lambda xs: torch.cat(xs)  # noqa: E731  (T * B rows)
        b_obs = {key: flat([o[key] for o in buf_obs]) for key in buf_obs[0]}
        b_rel, b_act, b_logp = flat(buf_rel), flat(buf_act), flat(buf_logp)
        b_adv, b_ret, b_valid = adv.reshape(-1), ret.reshape(-1), flat(buf_valid)
        idx_valid = torch.nonzero(b_valid).squeeze(1)
        mb = max(1, idx_valid.numel() // args.num_minibatches)
        for _ in range(args.update_epochs):
            perm = idx_valid[torch.randperm(idx_valid.numel(), generator=gen)]
            for s in range(0, perm.numel() - mb + 1, mb):  # full minibatches only
                i = perm[s : s + mb]
                h = agent.features({key: v[i] for key, v in b_obs.items()})
                logits = agent.logits(h, b_rel[i])
                ratio = torch.exp(slate_log_prob(logits, b_act[i]) - b_logp[i])
                a = b_adv[i]
                a = (a - a.mean()) / (a.std() + 1e-8)
                pg = torch.max(-a * ratio, -a * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef))
                v_loss = 0.5 * ((agent.value(h) - b_ret[i]) ** 2).mean()
                ent = first_position_entropy(logits).mean()
                loss = pg.mean() - args.ent_coef * ent + args.vf_coef * v_loss
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                opt.step()
        recent = np.mean(ep_returns[-200:]) if ep_returns else float("nan")
        print(
            f"update {update}/{n_updates} steps {update * B * T} episode_return {recent:.2f} "
            f"value_loss {v_loss.item():.3f} entropy {ent.item():.2f} ({time.time() - t0:.0f} s)"
        )

    # ---- evaluation: every user plays one whole episode under each agent, same user streams
    env = envs.unwrapped  # the BatchedRecEnv
    ppo = rollout(env, GreedyAgent(agent, release, k), args.eval_users, seed=args.seed + 1)
    rnd = rollout(env, RandomAgent(world, k, seed=args.seed), args.eval_users, seed=args.seed + 1)
    diff = ppo.outcomes["reward"] - rnd.outcomes["reward"]  # paired over the same users
    half = 1.96 * diff.std(ddof=1) / np.sqrt(diff.size)
    print(
        f"eval {diff.size} users, reward per user: greedy PPO {ppo.outcomes['reward'].mean():.2f}, "
        f"uniform random {rnd.outcomes['reward'].mean():.2f}, paired difference "
        f"{diff.mean():+.2f} +- {half:.2f}"
    )
    envs.close()


if __name__ == "__main__":
    main()
