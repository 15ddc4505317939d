"""The rollout worker (plain class): groups, broken videos skipped and counted, weight updates."""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from rlaif_ray.config import Config
from rlaif_ray.data.dataset import VideoQAExample, load_jsonl
from rlaif_ray.rollout.worker import RolloutWorker


def test_rollout_groups_and_broken_videos(small_config: Config, tmp_path: Path) -> None:
    cfg = small_config
    cfg.rl.group_size = 3
    worker = RolloutWorker(cfg, cfg.model.path)
    examples = load_jsonl(cfg.data.train)[:3]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    bad = VideoQAExample(id="bad", video=str(broken), question=examples[0].question, answer="red")
    groups = worker.rollout([examples[0], bad, *examples[1:]], step=7)
    assert [g.example_id for g in groups] == [ex.id for ex in examples]  # the broken one is skipped
    assert worker.stats()["skipped_videos"] == 1
    for group, ex in zip(groups, examples, strict=True):
        assert group.group_id == f"7:{ex.id}" and group.reference == ex.answer
        assert group.size == 3 and group.weight_version == 0
        for ids, logp in zip(group.completion_ids, group.logprobs, strict=True):
            assert len(ids) == len(logp) >= 1 and all(lp <= 0 for lp in logp)


def test_update_weights_changes_what_is_served(small_config: Config) -> None:
    cfg = small_config
    worker = RolloutWorker(cfg, cfg.model.path)
    examples = load_jsonl(cfg.data.test)[:8]
    frames = [worker.store.get(ex.video) for ex in examples]
    questions = [ex.question for ex in examples]

    def greedy(w: RolloutWorker) -> list[list[int]]:
        return w.engine.sample(frames, questions, 1, greedy=True).token_ids

    before = greedy(worker)
    state = worker.engine.policy.trainable_state_dict()
    # A large LoRA B makes the adapter dominate the output layer.
    gen = torch.Generator().manual_seed(0)
    state = {
        k: (torch.randn(v.shape, generator=gen) * 5 if "lm_head.lora_B" in k else v) for k, v in state.items()
    }
    assert worker.update_weights(3, state) == 3
    assert worker.version() == 3 and worker.evaluate(examples)["version"] == 3
    after = greedy(worker)
    assert after != before, "the answers did not change with the weights"
    # What is served is the new weights: a fresh worker given the same tensors answers the same.
    fresh = RolloutWorker(cfg, cfg.model.path)
    fresh.update_weights(3, state)
    assert greedy(fresh) == after
    served = worker.engine.policy.trainable_state_dict()
    assert all(torch.equal(served[k], state[k]) for k in state)


def test_num_threads_overrides_rays_one_thread_per_cpu(small_config: Config) -> None:
    """Ray pins an actor's torch to one thread per requested CPU; ``rollout.num_threads`` lifts it."""
    small_config.rollout.num_threads = 2
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        actor = ray.remote(RolloutWorker).options(num_cpus=1).remote(small_config, small_config.model.path)
        assert ray.get(actor.stats.remote())["torch_threads"] == 2
    finally:
        ray.shutdown()
