"""The Oracle ranker: backends that order a group of answers, the judge prompt and parser, the worker."""

from rlaif_ray.ranker.backends import (
    GroundTruthRanker,
    JudgeRanker,
    NoReference,
    OpenAIRanker,
    RankerBackend,
    RankPrompt,
    backend_class,
    make_backend,
    register_backend,
)
from rlaif_ray.ranker.prompting import (
    InvalidOrdering,
    Ordering,
    build_ranking_prompt,
    format_ordering,
    parse_ordering,
)
from rlaif_ray.ranker.video_judge import VideoJudgeRanker
from rlaif_ray.ranker.worker import RankerWorker

__all__ = [
    "GroundTruthRanker",
    "InvalidOrdering",
    "JudgeRanker",
    "NoReference",
    "OpenAIRanker",
    "Ordering",
    "RankPrompt",
    "RankerBackend",
    "RankerWorker",
    "VideoJudgeRanker",
    "backend_class",
    "build_ranking_prompt",
    "format_ordering",
    "make_backend",
    "parse_ordering",
    "register_backend",
]
