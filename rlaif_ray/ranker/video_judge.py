"""``video_judge``: a video-language model as the Oracle, looking at the video it ranks answers for.

The judge is a checkpoint in this project's policy format (``ranker.judge_path``: ``policy.json``,
``adapter/``, ``projector.safetensors``): frozen open_clip encoder, projector, LM with LoRA. For a
group it scores every candidate answer ``a`` by its length-normalised log-likelihood given the
video ``v`` and the question ``q``,

    s(a) = (1 / |a|) * sum_t log p_judge(a_t | v, q, a_<t)      (|a| counts the answer's EOS),

in one batched forward (the video encoded once), and orders the candidates by ``s``, best first.
Answers that are equal after :func:`normalize_answer` are scored as that one text, so they tie; an
empty answer ranks last (its score is one below the lowest other score, so that ``scores()`` stays
finite for plain GRPO). ``scores()`` returns the same ``s``, so ``algo.advantage=score`` learns from
the very scalar this ranking orders by. The judge runs where its actor runs: on the GPU Ray gives
it (``ranker.num_gpus_per_actor``), else on the CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from rlaif_ray.answers import normalize_answer
from rlaif_ray.config import ModelConfig, RankerConfig
from rlaif_ray.ranker.backends import RankerBackend, RankPrompt, register_backend
from rlaif_ray.ranker.prompting import Ordering


def ordering_from_scores(scores: list[float]) -> Ordering:
    """Tiers of candidate indices, highest score first; equal scores share a tier."""
    ordering: Ordering = []
    for value in sorted(set(scores), reverse=True):
        tier = [i for i, s in enumerate(scores) if s == value]
        ordering.append(tier[0] if len(tier) == 1 else tier)
    return ordering


@register_backend("video_judge")
class VideoJudgeRanker(RankerBackend):
    """Orders answers by a video-language judge's length-normalised log-likelihood (module docstring)."""

    needs_video = True

    def __init__(self, cfg: RankerConfig) -> None:
        from rlaif_ray.models.policy import VideoLMPolicy, read_policy_spec

        if not cfg.judge_path:
            raise ValueError(
                "ranker.judge_path must name a policy-format checkpoint for the video_judge backend"
            )
        spec = read_policy_spec(cfg.judge_path)
        # The judge's input settings are the ones it was trained with.
        model_cfg = ModelConfig(**spec.get("trained_with", {}))
        self.policy = VideoLMPolicy.from_folder(cfg.judge_path, model_cfg)
        self.policy.requires_grad_(False)
        self.policy.eval()
        if torch.cuda.is_available():
            self.policy.to("cuda")
        self._recent: OrderedDict[Any, list[float]] = OrderedDict()  # rank() then scores() of a group

    @torch.no_grad()
    def scores(self, prompt: RankPrompt, candidates: list[str]) -> list[float]:
        key = (prompt.video, prompt.question, tuple(candidates))
        if key in self._recent:
            return list(self._recent[key])
        texts = [normalize_answer(c) for c in candidates]
        distinct = sorted({t for t in texts if t})
        value: dict[str, float] = {}
        if distinct:
            video = prompt.frames is not None
            features = None
            if video:
                pixels = self.policy.preprocess(prompt.frames).unsqueeze(0)
                features = self.policy.visual_features(pixels).expand(len(distinct), -1, -1)
            prompt_ids = self.policy.prompt_ids(prompt.question, video=video)
            logprobs, mask, _ = self.policy.answer_logprobs(
                None,
                [prompt_ids] * len(distinct),
                [self.policy.answer_ids(t) for t in distinct],
                features=features,
            )
            mean = ((logprobs * mask).sum(-1) / mask.sum(-1)).tolist()
            value = dict(zip(distinct, mean, strict=True))
        floor = min(value.values(), default=0.0) - 1.0  # an empty answer: below every other
        out = [value.get(t, floor) for t in texts]
        self._recent[key] = out
        if len(self._recent) > 64:
            self._recent.popitem(last=False)
        return list(out)

    def rank(self, prompt: RankPrompt, candidates: list[str]) -> Ordering:
        return ordering_from_scores(self.scores(prompt, candidates))
