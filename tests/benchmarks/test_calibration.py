"""Calibration of the verdicts on the simulator itself (not on synthetic numbers).

With common random numbers (every simulator draw keyed by env seed, user, episode and step),
two agents meet the same users under the same luck, so the paired per-user difference of
reward carries only what the agents do differently:

- A/A: two differently seeded instances of the same stochastic agent (uniformly random
  slates), compared on 200 disjoint blocks of users, give HOLDS or REFUTED for "A earns
  more than A'" (minimum effect 0) in at most 10% of the blocks (nominal 5%);
- identical agents give identical per-user outcomes (the paired difference is exactly 0);
- a planted effect (the same agent serving one deliberately bad item, from a group the user
  never engages with, at the top of every slate) is found: HOLDS.
"""

from __future__ import annotations

import functools

import numpy as np

from agents.base import PopularAgent, RandomAgent
from agents.rollout import rollout
from benchmarks.stats import paired_effect, verdict
from simenv import BatchedRecEnv, EnvConfig, World, WorldConfig
from simenv.types import obs_users

BLOCKS, BLOCK = 200, 40  # A/A comparisons x users in each


@functools.lru_cache(maxsize=1)
def _world() -> tuple[EnvConfig, World]:
    cfg = EnvConfig(
        world=WorldConfig(
            n_items=400, n_users=BLOCKS * BLOCK, n_groups=2, n_topics=8, latent_dim=8,
            n_creators=40,
        ),
        max_steps=20,
    )  # fmt: skip
    return cfg, World(cfg.world, seed=0, user_model=cfg.user_model)


def _rewards(agent, env_seed: int = 7) -> np.ndarray:
    cfg, world = _world()
    env = BatchedRecEnv(4_000, cfg, world=world)
    users = np.arange(world.n_users)
    return rollout(env, agent, len(users), seed=env_seed, users=users).outcomes["reward"]


def test_a_a_comparisons_give_few_false_verdicts():
    cfg, world = _world()
    a = _rewards(RandomAgent(world, cfg.slate_size, seed=1))
    b = _rewards(RandomAgent(world, cfg.slate_size, seed=2))
    assert not np.array_equal(a, b)  # the two instances do act differently
    verdicts = [
        verdict(paired_effect(a[i * BLOCK : (i + 1) * BLOCK], b[i * BLOCK : (i + 1) * BLOCK]))
        for i in range(BLOCKS)
    ]
    false = sum(v != "INCONCLUSIVE" for v in verdicts)
    assert false <= 0.10 * BLOCKS, f"{false} of {BLOCKS} A/A comparisons were not INCONCLUSIVE"
    # the same agent twice: common random numbers make every user's outcome identical
    again = _rewards(RandomAgent(world, cfg.slate_size, seed=1))
    np.testing.assert_array_equal(again, a)  # same seeds, same computation: bitwise


class _Sabotaged:
    """The popular agent's slates with the top slot taken by an item of another group."""

    name = "sabotaged"

    def __init__(self, agent: PopularAgent, world: World) -> None:
        self.agent, self.world = agent, world
        released = np.flatnonzero(world.items.release_time <= 0)
        released = released[np.argsort(world.items.popularity[released])]  # least popular first
        g = world.items.group[released]
        # per user group: the least popular released item of another group (never in a
        # popular slate, never engaged with: users click only inside their group)
        self.bad = np.array([released[g != grp][0] for grp in range(world.config.n_groups)])
        self.last_candidates = None

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        slates = np.array(self.agent.act(obs), copy=True)  # (B, k)
        slates[:, 0] = self.bad[self.world.users.group[obs_users(obs)]]
        return slates


def test_a_planted_bad_item_is_detected():
    cfg, world = _world()
    popular = PopularAgent(world.items.popularity, world.items.release_time, cfg.slate_size)
    good = _rewards(popular)
    bad = _rewards(_Sabotaged(popular, world))
    eff = paired_effect(good, bad, relative=True)
    assert verdict(eff, ">") == "HOLDS", eff
