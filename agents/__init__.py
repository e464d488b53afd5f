"""Agents acting in the simulator.

Simple policies, single-stage and multi-stage pipelines, distillation of the generator toward
the ranker, the two-agent view and online rollouts.
"""

from agents.base import (
    Agent,
    ExpectedRewardOracle,
    GreedyUtilityOracle,
    OracleAgent,
    PopularAgent,
    RandomAgent,
)
from agents.multiagent import GeneratorEnv, RankerEnv, TwoAgentRecEnv
from agents.pipeline import (
    MultiStagePipeline,
    SingleStageAgent,
    Source,
    explore_slates,
    union_candidates,
)
from agents.rollout import RolloutResult, rollout, rollout_sharded

__all__ = [
    "Agent",
    "GeneratorEnv",
    "MultiStagePipeline",
    "OracleAgent",
    "GreedyUtilityOracle",
    "ExpectedRewardOracle",
    "PopularAgent",
    "RandomAgent",
    "RankerEnv",
    "RolloutResult",
    "SingleStageAgent",
    "Source",
    "TwoAgentRecEnv",
    "explore_slates",
    "rollout",
    "rollout_sharded",
    "union_candidates",
]
