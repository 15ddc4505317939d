"""The rollout worker: decodes the videos of a batch of prompts and samples a group per prompt.

A plain class (tests build it directly); ``rlaif_ray.launch`` runs it as the named Ray actors
``rollout-0``, ``rollout-1``, ... It serves one weight version at a time and stamps every group
with the version that produced it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rlaif_ray.config import Config
from rlaif_ray.data.dataset import VideoQAExample
from rlaif_ray.data.frames import FrameStore
from rlaif_ray.evaluate import evaluate
from rlaif_ray.groups import Group
from rlaif_ray.logs import setup_logging
from rlaif_ray.rollout.engine import make_engine


class RolloutWorker:
    """Holds a rollout engine (``hf`` or ``vllm``) and the decoded-frame store."""

    def __init__(self, cfg: Config, model_dir: str, rank: int = 0) -> None:
        setup_logging(cfg.log_level)
        self.cfg = cfg
        self.rank = rank
        if cfg.rollout.num_threads:
            torch.set_num_threads(cfg.rollout.num_threads)
        torch.manual_seed(cfg.seed * 1000 + rank)
        self.engine = make_engine(cfg, model_dir)
        self.store = FrameStore(cfg.model.num_frames, self.engine.image_size)
        self.groups_sampled = 0

    def rollout(self, examples: list[VideoQAExample], step: int) -> list[Group]:
        """One group of ``rl.group_size`` answers per example whose video decodes (or that is text-only)."""
        start = time.time()
        loaded = [(ex, self.store.for_example(ex.video)) for ex in examples]
        usable = [(ex, frames) for ex, (ok, frames) in loaded if ok]
        if not usable:
            return []
        g = self.cfg.rl.group_size
        samples = self.engine.sample([f for _, f in usable], [ex.question for ex, _ in usable], g)
        elapsed = time.time() - start
        groups = []
        for i, (ex, _) in enumerate(usable):
            rows = slice(i * g, (i + 1) * g)
            groups.append(
                Group(
                    group_id=f"{step}:{ex.id}",
                    example_id=ex.id,
                    video=ex.video,
                    question=ex.question,
                    reference=ex.answer,
                    question_type=ex.type,
                    completions=samples.texts[rows],
                    completion_ids=samples.token_ids[rows],
                    logprobs=samples.logprobs[rows],
                    weight_version=self.engine.version,
                    rollout_s=elapsed / len(usable),
                )
            )
        self.groups_sampled += len(groups)
        return groups

    def update_weights(self, version: int, state: dict[str, torch.Tensor]) -> int:
        """Serve weight ``version`` from now on; returns the version served."""
        self.engine.load_weights(version, state)
        return self.engine.version

    def version(self) -> int:
        return self.engine.version

    def greedy_answers(self, examples: list[VideoQAExample]) -> list[list[int]]:
        """Token ids of the served version's greedy answer to each example (its video must decode)."""
        frames = [None if ex.video is None else self.store.get(ex.video) for ex in examples]
        return self.engine.sample(frames, [ex.question for ex in examples], 1, greedy=True).token_ids

    def evaluate(self, examples: list[VideoQAExample]) -> dict[str, Any]:
        """Greedy exact-match accuracy of the served version on ``examples``."""

        def answer(frames: list, questions: list[str]) -> list[str]:
            return self.engine.sample(frames, questions, 1, greedy=True).texts

        result = evaluate(answer, examples, self.store)
        result["version"] = self.engine.version
        return result

    def stats(self) -> dict[str, Any]:
        return {
            "groups_sampled": self.groups_sampled,
            "torch_threads": torch.get_num_threads(),
            "skipped_videos": self.store.skipped_videos,
            "version": self.engine.version,
        }
