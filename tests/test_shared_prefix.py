"""Shared-prefix learning (``learner.shared_prefix``): each group's prompt runs through the LM once
and its answers on the prompt's keys and values. It must give what every answer's own full
sequence gives: the same log-probs, loss and gradient of every trainable parameter (fp32, 1e-5),
in one process and on two learners (ZeRO-2 and ZeRO-3) that hold whole groups."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import DEFAULT_YAML, start_learners

from rlaif_ray.algo.losses import grpo_loss
from rlaif_ray.config import Config, load_config
from rlaif_ray.data.dataset import load_jsonl
from rlaif_ray.learner.worker import LearnerWorker, TrainRow, shard, split_groups
from rlaif_ray.models.policy import VideoLMPolicy
from rlaif_ray.rollout.worker import RolloutWorker

TOLERANCE = 1e-5
QUESTIONS = ["what colour is the circle ?", "how many shapes are there ?", "which direction does it move ?"]
# Answers of 1 to 5 tokens (with the end token), some repeated within a group.
WORDS = ["red", "two three one", "left up", "blue", "up down left right", "", "one"]


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path) -> VideoLMPolicy:
    """The default model with a reference adapter and non-zero LoRA B (so every LoRA tensor, A
    included, has a gradient to compare)."""
    pol = VideoLMPolicy.from_folder(tiny_model_dir, load_config(DEFAULT_YAML).model, seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pol.lm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    pol.freeze_reference()
    with torch.no_grad():  # the policy moves away from its reference, so the KL term is not zero
        for name, param in pol.lm.named_parameters():
            if "lora_B" in name and param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return pol


def loss_and_grads(
    policy: VideoLMPolicy,
    prompts: list[list[int]],
    pixels: torch.Tensor | None,
    answers: list[list[int]],
    group_sizes: list[int],
    shared: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs, the GRPO loss (clipped ratio against perturbed behaviour log-probs, k3 KL to the
    reference, entropy bonus) and every trainable parameter's gradient, either path."""
    sizes = torch.tensor(group_sizes)
    kwargs = (
        {"prompts": prompts, "pixels": pixels, "group_sizes": group_sizes}
        if shared
        else {
            "prompts": [p for p, n in zip(prompts, group_sizes, strict=True) for _ in range(n)],
            "pixels": None if pixels is None else pixels.repeat_interleave(sizes[: len(pixels)], dim=0),
        }
    )
    policy.zero_grad(set_to_none=True)
    logprobs, mask, entropy = policy.answer_logprobs(answers=answers, with_entropy=True, **kwargs)
    ref, _, _ = policy.answer_logprobs(answers=answers, reference=True, **kwargs)
    generator = torch.Generator().manual_seed(1)
    behaviour = (logprobs.detach() + 0.1 * torch.randn(logprobs.shape, generator=generator)) * mask
    advantages = torch.randn(len(answers), generator=generator)
    loss, _ = grpo_loss(
        logprobs, behaviour, ref, advantages, mask, kl_coef=0.1, entropy=entropy, entropy_coef=0.01
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    return logprobs.detach(), loss.detach(), grads


def test_shared_prefix_gives_the_full_sequence_loss_and_gradients(policy: VideoLMPolicy) -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, size=(8, 48, 48, 3), dtype=np.uint8) for _ in range(2)]
    pixels = torch.stack([policy.preprocess(f) for f in frames])
    # Two video groups and a text-only one (text-only prompts take no visual row), sizes 3, 2, 4.
    prompts = [policy.prompt_ids(q, video=i < 2) for i, q in enumerate(QUESTIONS)]
    group_sizes = [3, 2, 4]
    answers = [policy.answer_ids(WORDS[(3 * i) % len(WORDS)]) for i in range(sum(group_sizes))]
    assert len({len(a) for a in answers}) >= 3 and min(len(a) for a in answers) == 1
    full = loss_and_grads(policy, prompts, pixels, answers, group_sizes, shared=False)
    shared = loss_and_grads(policy, prompts, pixels, answers, group_sizes, shared=True)
    assert torch.allclose(full[0], shared[0], atol=TOLERANCE, rtol=0)
    assert abs(full[1].item() - shared[1].item()) <= TOLERANCE
    assert full[2].keys() == shared[2].keys()
    assert any(n.startswith("projector.") for n in full[2]) and any("lora_A" in n for n in full[2])
    for name, grad in full[2].items():
        assert grad.abs().max() > 0, f"{name} has no gradient: the comparison would say nothing"
        assert torch.allclose(grad, shared[2][name], atol=TOLERANCE, rtol=0), name


def test_shared_prefix_checks_the_group_sizes(policy: VideoLMPolicy) -> None:
    prompts = [policy.prompt_ids(q, video=False) for q in QUESTIONS[:2]]
    answers = [policy.answer_ids("red")] * 4
    with pytest.raises(ValueError, match="group_sizes"):
        policy.answer_logprobs(None, prompts, answers, group_sizes=[2, 1])


def test_groups_are_never_split_between_learners_or_micro_batches() -> None:
    rows = [TrainRow(None, "q", [1], [0.0], 0.0, 0, f"g{i // 5}") for i in range(25)]
    groups = split_groups(rows)
    assert [len(g) for g in groups] == [5] * 5
    assert all(len({r.group_id for r in g}) == 1 for g in groups)
    shares = [shard(groups, rank, 2) for rank in range(2)]
    assert [len(s) for s in shares] == [3, 2] and [r for s in shares for g in s for r in g] == rows


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_learners_get_the_full_sequence_gradients(default_warm_start: Config, zero_stage: int) -> None:
    """5 groups of 5 sampled answers, 2 learners (3 groups and 2): the gradients each learner holds
    before the step equal, with and without the shared prefix, and between the two learners."""
    cfg = dataclasses.replace(default_warm_start)
    cfg.learner = dataclasses.replace(cfg.learner, zero_stage=zero_stage, num_actors=2, num_threads=1, lr=0.0)
    cfg.learner.collective_timeout_s = 120
    cfg.rl = dataclasses.replace(cfg.rl, prompts_per_step=5)
    groups = RolloutWorker(cfg, cfg.model.path).rollout(load_jsonl(cfg.data.train)[:5], step=1)
    assert len({len(ids) for g in groups for ids in g.completion_ids}) >= 2  # answers of several lengths
    for g in groups:
        g.ranks, g.rank_status = [float(r) for r in range(g.size)], "ok"

    # Nested, so that Ray ships it by value (the test module does not import in an actor).
    def gradients_of_one_update(
        learner: LearnerWorker, groups: list, shared: bool
    ) -> dict[str, torch.Tensor]:
        """Run ``train_step`` with ``learner.shared_prefix=shared`` and return every trainable
        parameter's whole gradient, taken just before the optimizer step (``safe_get_full_grad``, a
        collective under ZeRO-3: every rank calls it in the same order). The learners run at lr 0, so
        the weights stay as they were for the next call."""
        from deepspeed.utils import safe_get_full_grad

        learner.cfg.learner.shared_prefix = shared
        grads: dict[str, torch.Tensor] = {}
        step = learner.engine.step

        def capture_then_step() -> None:
            for name, param in learner.policy.named_parameters():
                if param.requires_grad:
                    grads[name] = safe_get_full_grad(param).detach().clone()
            step()

        learner.engine.step = capture_then_step
        try:
            stats = learner.train_step(groups)
        finally:
            del learner.engine.step
        assert stats["skipped_step"] == 0.0 and stats["rows"] == 5 * len(groups), stats
        return grads

    ray.init(num_cpus=4, include_dashboard=False)
    try:
        learners = start_learners(cfg)
        by_path = {}
        for shared in (False, True):
            by_path[shared] = ray.get(
                [a.__ray_call__.remote(gradients_of_one_update, groups, shared) for a in learners],
                timeout=600,
            )
    finally:
        ray.shutdown()
    full, shared = by_path[False][0], by_path[True][0]
    assert full.keys() == shared.keys() and any(g.abs().max() > 0 for g in full.values())
    for name in full:
        assert torch.equal(by_path[True][0][name], by_path[True][1][name]), f"the learners' {name} differ"
        assert torch.allclose(full[name], shared[name], atol=TOLERANCE, rtol=0), name
