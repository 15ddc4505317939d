"""Rollout engines: what samples G answers per video prompt and serves a given weight version.

``hf`` runs the policy with transformers (CPU or GPU; the default and the tests). ``vllm`` runs
the language model in vLLM with the LoRA adapter of each version (vLLM's GPU or CPU build, see
vllm_engine.py).
Both take decoded frames and questions and return :class:`~rlaif_ray.models.policy.Samples`.
"""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np
import torch

from rlaif_ray.config import Config
from rlaif_ray.models.policy import ADAPTER_DIR, Samples, VideoLMPolicy
from rlaif_ray.registry import ROLLOUT_ENGINES


class RolloutEngine(abc.ABC):
    """Samples answers under the weight version it serves."""

    version: int = 0
    # Frames are decoded at this size (the vision encoder's input size).
    image_size: int

    @abc.abstractmethod
    def sample(
        self, frames: list[np.ndarray | None], questions: list[str], group_size: int, greedy: bool = False
    ) -> Samples:
        """``group_size`` answers for each (frames, question), prompt-major; frames None: text-only."""

    @abc.abstractmethod
    def load_weights(self, version: int, state: dict[str, torch.Tensor], immutable: bool = False) -> None:
        """Serve ``version``, whose trainable tensors (LoRA + projector) are ``state``; with
        ``immutable`` they never change (read from the object store): the engine may keep them
        instead of copying."""

    def close(self) -> None:  # noqa: B027 (an engine that writes nothing has nothing to remove)
        """Remove what the engine wrote to disk (nothing unless it says otherwise)."""


def torch_device() -> torch.device:
    """This process's device: its GPU (Ray sets CUDA_VISIBLE_DEVICES per actor), else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


@ROLLOUT_ENGINES.register("hf")
class HFEngine(RolloutEngine):
    """The policy itself, sampling with transformers ``generate`` on :func:`torch_device`."""

    def __init__(self, cfg: Config, model_dir: str) -> None:
        self.cfg = cfg
        self.policy = VideoLMPolicy.from_folder(model_dir, cfg.model, seed=cfg.seed)
        # rollout.reference_logprobs: this engine scores the KL penalty's reference, which is the
        # warm-start adapter when there is one, as on the learner (LearnerWorker.setup).
        self.scores_reference = cfg.rollout.reference_logprobs and cfg.algo.kl_coef > 0
        if self.scores_reference and (Path(model_dir) / ADAPTER_DIR).is_dir():
            self.policy.freeze_reference()
        self.policy.to(torch_device()).eval()
        self.image_size = self.policy.image_size
        self.version = 0

    def sample(
        self, frames: list[np.ndarray | None], questions: list[str], group_size: int, greedy: bool = False
    ) -> Samples:
        r = self.cfg.rollout
        return self.policy.sample_frames(
            frames,
            questions,
            group_size,
            r.temperature,
            r.top_p,
            r.max_new_tokens,
            greedy=greedy,
            score_reference=self.scores_reference and not greedy,
        )

    def load_weights(self, version: int, state: dict[str, torch.Tensor], immutable: bool = False) -> None:
        # A policy on the CPU serves immutable tensors (views of the object store's shared memory,
        # one copy per node for every actor on it) as they are, instead of copying them: it never
        # writes its parameters, and the views keep the version's object alive until the next one.
        self.policy.load_trainable_state_dict(state, share=immutable)
        self.version = version


# Registered by its path: vLLM is imported only when a rollout actor builds that engine.
ROLLOUT_ENGINES.register_lazy("vllm", "rlaif_ray.rollout.vllm_engine:VLLMEngine")


def make_engine(cfg: Config, model_dir: str) -> RolloutEngine:
    """The engine registered as ``rollout.engine`` (:data:`rlaif_ray.registry.ROLLOUT_ENGINES`),
    built from ``cfg`` and the policy folder ``model_dir``."""
    return ROLLOUT_ENGINES.get(cfg.rollout.engine)(cfg, model_dir)
