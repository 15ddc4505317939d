"""GRPO_rank algorithm: rank -> advantage mappings, KL estimators and the policy loss (pure torch)."""

from rlaif_ray.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    advantages_for,
    get_advantage_fn,
    rank_advantages,
    ranks_from_orderings,
    register_advantage,
    score_advantages,
)
from rlaif_ray.algo.losses import AGGREGATIONS, KL_ESTIMATORS, aggregate, grpo_loss, kl_penalty

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "advantages_for",
    "aggregate",
    "get_advantage_fn",
    "grpo_loss",
    "kl_penalty",
    "rank_advantages",
    "ranks_from_orderings",
    "register_advantage",
    "score_advantages",
]
