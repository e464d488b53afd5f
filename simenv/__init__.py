"""simenv: users of a recommender as a Markov decision process (Gymnasium environments).

Registered ids:
- ``simenv/RecEnv-v0``: the default world (20,000 items, 10,000 users), slate 10, horizon 200.
  ``gymnasium.make_vec(..., vectorization_mode="vector_entry_point")`` gives a
  :class:`BatchedRecEnv`.
- ``simenv/RecEnv-small-v0``: a 500-item world, slate 5, horizon 100, for quick RL training.
"""

from gymnasium.envs.registration import register, registry

from simenv.batched_env import BatchedRecEnv
from simenv.collect import collect
from simenv.config import EnvConfig, RewardConfig, UserModelConfig, WorldConfig
from simenv.log import ImpressionLog, LogFormatError
from simenv.policies import InGroupPolicy, LoggingPolicy, PopularityPolicy, UniformPolicy
from simenv.rec_env import RecEnv
from simenv.shard import collect_sharded
from simenv.types import Columns, EventType, ItemCatalog, Obs
from simenv.world import World

__all__ = [
    "BatchedRecEnv",
    "Columns",
    "collect",
    "collect_sharded",
    "ImpressionLog",
    "InGroupPolicy",
    "LogFormatError",
    "LoggingPolicy",
    "PopularityPolicy",
    "UniformPolicy",
    "EnvConfig",
    "EventType",
    "ItemCatalog",
    "Obs",
    "RecEnv",
    "RewardConfig",
    "UserModelConfig",
    "World",
    "WorldConfig",
]


def _small_config() -> EnvConfig:
    return EnvConfig.small()


if "simenv/RecEnv-v0" not in registry:
    register(
        id="simenv/RecEnv-v0",
        entry_point="simenv.rec_env:RecEnv",
        vector_entry_point="simenv.batched_env:BatchedRecEnv",
        max_episode_steps=EnvConfig().max_steps,
    )
    register(
        id="simenv/RecEnv-small-v0",
        entry_point="simenv.rec_env:RecEnv",
        vector_entry_point="simenv.batched_env:BatchedRecEnv",
        max_episode_steps=EnvConfig.small().max_steps,
        kwargs={"config": EnvConfig.small()},
    )
