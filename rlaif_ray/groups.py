"""The plain record that flows between stages: one prompt and its group of sampled answers.

A ``Group`` is created by a rollout actor, ranked by a ranker actor and consumed by the learner.
It holds plain Python data, and the frozen encoder's output for its video (a CPU tensor, which the
ranker pool leaves behind when it sends the group to a ranker actor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Group:
    """G answers sampled for one prompt (about a video, or text-only), plus what each stage adds to it."""

    group_id: str
    example_id: str
    video: str | None
    question: str
    reference: str | None
    completions: list[str]
    completion_ids: list[list[int]]
    # Per-token log-probabilities of ``completion_ids`` under the policy that sampled them.
    logprobs: list[list[float]]
    weight_version: int
    question_type: str | None = None
    rollout_s: float = 0.0
    # Filled by the ranker: 0-based ranks (0 = best, ties share the mean position).
    ranks: list[float] | None = None
    # Optional per-answer scores from the oracle (higher is better: 1.0 correct / 0.0 wrong for
    # ground truth, a judge's length-normalised log-likelihood for video_judge).
    scores: list[float] | None = None
    # Per answer, 1.0 if it matches the reference, else 0.0 (None without a reference): what the
    # sampled accuracy counts, whichever oracle ranked the group.
    correct: list[float] | None = None
    # "ok", "fallback_tie" (no valid ordering after retries: all tied), "dropped", or unranked for
    # want of an input: "no_reference" (a backend that needs one), "bad_video" (did not decode).
    rank_status: str = "pending"
    rank_attempts: int = 0
    rank_s: float = 0.0
    # The frozen encoder's output for ``video`` [N, D] (before the projector), from the rollout
    # actor that sampled the group: the learner projects it instead of decoding and encoding the
    # video again (None: text-only, or ``learner.reencode_videos``).
    visual_features: Any = None
    # Per-token log-probabilities of ``completion_ids`` under the reference policy, from the
    # rollout actor (``rollout.reference_logprobs``); None: the learner computes them.
    ref_logprobs: list[list[float]] | None = None

    @property
    def size(self) -> int:
        return len(self.completions)
