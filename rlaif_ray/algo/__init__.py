"""GRPO_rank algorithm: rank -> advantage mappings, KL estimators and the policy loss (pure torch)."""

from rlaif_ray.algo.advantages import (
    advantages_for,
    estimator_takes,
    rank_advantages,
    ranks_from_orderings,
    register_advantage,
    score_advantages,
)
from rlaif_ray.algo.losses import aggregate, grpo_loss, kl_penalty

__all__ = [
    "advantages_for",
    "aggregate",
    "estimator_takes",
    "grpo_loss",
    "kl_penalty",
    "rank_advantages",
    "ranks_from_orderings",
    "register_advantage",
    "score_advantages",
]
