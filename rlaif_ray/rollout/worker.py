"""The rollout worker: decodes the videos of a batch of prompts and samples a group per prompt.

A plain class (tests build it directly); ``rlaif_ray.launch`` runs it as the named Ray actors
``rollout-0``, ``rollout-1``, ... It serves one weight version at a time and stamps every group
with the version that produced it.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from typing import Any

import torch

from rlaif_ray.config import Config
from rlaif_ray.data.dataset import VideoQAExample
from rlaif_ray.data.frames import BadVideoFractionError, FrameStore
from rlaif_ray.evaluate import evaluate
from rlaif_ray.groups import Group
from rlaif_ray.logs import setup_logging
from rlaif_ray.process import configure_cpu
from rlaif_ray.registry import import_plugins
from rlaif_ray.rollout.engine import make_engine
from rlaif_ray.telemetry import Telemetry
from rlaif_ray.weights import WeightsMessage


class WeightsBehind(RuntimeError):
    """A rollout actor was asked to sample with a weight version it does not hold."""


class RolloutWorker:
    """Holds a rollout engine (``hf`` or ``vllm``) and the decoded-frame store."""

    def __init__(self, cfg: Config, model_dir: str, rank: int = 0) -> None:
        setup_logging(cfg.log_level)
        import_plugins(cfg.plugins)
        self.cfg = cfg
        self.rank = rank
        configure_cpu(cfg.rollout.num_threads, cfg.rollout.cpu_cores, "rollout")
        torch.manual_seed(cfg.seed * 1000 + rank)
        self.engine = make_engine(cfg, model_dir)
        self._incarnation = f"{os.getpid()}-{time.time_ns()}"
        self.store = FrameStore(
            cfg.model.num_frames, self.engine.image_size, max_pixels=cfg.data.max_video_pixels
        )
        self.groups_sampled = 0
        self.prompts_bad_video = 0
        self.telemetry = Telemetry("rollout", f"rollout-{rank}")
        self.telemetry.set("rlaif_weight_version", self.engine.version)
        # The last prompts given (their video path when it cannot be used, else None): this
        # actor's share of one step, so that the bad-video fraction is judged over a whole batch
        # even when the driver tops the pipeline up a few prompts at a time.
        share = math.ceil(cfg.rl.prompts_per_step / cfg.rollout.num_actors)
        self.recent_bad: deque[str | None] = deque(maxlen=share)

    def rollout(self, examples: list[VideoQAExample], step: int, version: int | None = None) -> list[Group]:
        """One group of ``rl.group_size`` answers per example whose video decodes (or that is text-only).

        ``version``: the weight version the driver last sent this actor. An actor that Ray restarted
        serves the warm start again and raises :class:`WeightsBehind` instead of sampling with it.
        """
        if version is not None and version != self.engine.version:
            raise WeightsBehind(
                f"rollout-{self.rank} serves weight version {self.engine.version}, not {version} (restarted?)"
            )
        start = time.time()
        loaded = [(ex, self.store.for_example(ex.video)) for ex in examples]
        usable = [(ex, frames) for ex, (ok, frames) in loaded if ok]
        self._check_bad_videos([None if ok else ex.video for ex, (ok, _) in loaded])
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
                    visual_features=None
                    if self.cfg.learner.reencode_videos or samples.visual_features is None
                    else samples.visual_features[i],
                    ref_logprobs=None if samples.ref_logprobs is None else samples.ref_logprobs[rows],
                )
            )
        self.groups_sampled += len(groups)
        self.telemetry.count("rlaif_groups_sampled", len(groups))
        return groups

    def _check_bad_videos(self, bad: list[str | None]) -> None:
        """Count the prompts skipped for a bad video (``bad``: one entry per prompt, its video
        path when it cannot be used) and stop the run, with BadVideoFractionError, when more than
        ``data.max_bad_video_fraction`` of the last batch-share of prompts were bad."""
        self.prompts_bad_video += sum(path is not None for path in bad)
        self.telemetry.count("rlaif_videos_skipped", sum(path is not None for path in bad))
        self.recent_bad.extend(bad)
        window = self.recent_bad.maxlen or 1
        bad_paths = [path for path in self.recent_bad if path is not None]
        limit = self.cfg.data.max_bad_video_fraction
        if len(self.recent_bad) < window or len(bad_paths) <= limit * window:
            return
        examples = "; ".join(
            f"{path} ({self.store.reason(path)})" for path in list(dict.fromkeys(bad_paths))[:3]
        )
        raise BadVideoFractionError(
            f"rollout-{self.rank}: {len(bad_paths)} of the last {window} prompts "
            f"({len(bad_paths) / window:.0%}) have a video that cannot be used, more than "
            f"data.max_bad_video_fraction = {limit}; e.g. {examples}. Check that the data's video "
            "paths exist on every node and decode (see the warnings above), or raise the limit."
        )

    def update_weights(self, version: int, weights: WeightsMessage) -> int:
        """Serve weight ``version`` (the learner's export) from now on (a no-op when served
        already); returns the version served."""
        if version == self.engine.version:
            return version
        self.engine.load_weights(version, weights.tensors(), immutable=weights.read_only())
        self.telemetry.set("rlaif_weight_version", self.engine.version)
        return self.engine.version

    def version(self) -> int:
        return self.engine.version

    def __repr__(self) -> str:
        # Ray reads it once, after __init__, for the dashboard's Actors view and the log prefix: only
        # what never changes (the served version is the rlaif_weight_version gauge).
        return f"RolloutWorker(rollout-{self.rank}, {self.cfg.rollout.engine})"

    def incarnation(self) -> str:
        """Differs after every (re)start of this actor's process."""
        return self._incarnation

    def rng_state(self) -> torch.Tensor:
        """The sampling RNG's state (torch's, which the transformers engine samples with)."""
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Continue sampling from a saved :meth:`rng_state` (a resumed run)."""
        torch.set_rng_state(state)

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

    def close(self) -> None:
        """The run is over: the engine removes what it wrote to disk (the vLLM adapter folders)."""
        self.engine.close()

    def stats(self) -> dict[str, Any]:
        return {
            "groups_sampled": self.groups_sampled,
            "torch_threads": torch.get_num_threads(),
            "cpu_cores": sorted(os.sched_getaffinity(0)),
            "skipped_videos": self.store.skipped_videos,
            "skipped_videos_by_reason": self.store.skipped_by_reason,
            "prompts_bad_video": self.prompts_bad_video,
            "version": self.engine.version,
        }
