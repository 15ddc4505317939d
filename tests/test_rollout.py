"""The rollout worker (plain class): groups, broken videos skipped and counted, weight updates."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import pytest
import ray
import torch
from test_video import BAD_VIDEOS, make_bad_video
from test_weights import through_pickle

from rlaif_ray.config import Config
from rlaif_ray.data.dataset import VideoQAExample, load_jsonl
from rlaif_ray.data.frames import BadVideoFractionError
from rlaif_ray.process import configure_cpu
from rlaif_ray.rollout.worker import RolloutWorker
from rlaif_ray.weights import WeightsMessage


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
    assert worker.update_weights(3, WeightsMessage.of(state)) == 3
    assert worker.version() == 3 and worker.evaluate(examples)["version"] == 3
    after = greedy(worker)
    assert after != before, "the answers did not change with the weights"
    # What is served is the new weights: a fresh worker given the same tensors answers the same.
    fresh = RolloutWorker(cfg, cfg.model.path)
    fresh.update_weights(3, WeightsMessage.of(state))
    assert greedy(fresh) == after
    served = worker.engine.policy.trainable_state_dict()
    assert all(torch.equal(served[k], state[k]) for k in state)


def test_weights_from_the_object_store_are_served_without_a_copy(small_config: Config) -> None:
    """A read-only message (what Ray's object store hands an actor) is served as it is: the
    parameters are views of its buffers. A message of live tensors made in-process is copied, so
    that changing those tensors later does not change what is served."""
    worker = RolloutWorker(small_config, small_config.model.path)
    policy = worker.engine.policy
    state = {k: v + 0.01 for k, v in policy.trainable_state_dict().items()}
    live = WeightsMessage.of(state)
    assert not live.read_only()
    worker.update_weights(1, live)
    for value in state.values():
        value.add_(1.0)
    served = policy.trainable_tensors()
    assert all(not torch.equal(served[k], state[k]) for k in state)

    stored = through_pickle(WeightsMessage.of(state))
    assert stored.read_only()
    worker.update_weights(2, stored)
    spans = [(buffer.ctypes.data, buffer.ctypes.data + buffer.nbytes) for buffer in stored.buffers]
    served = policy.trainable_tensors()
    for key, value in state.items():
        assert any(lo <= served[key].data_ptr() < hi for lo, hi in spans), key
        assert torch.equal(served[key], value), key


def test_num_threads_and_cpu_cores_set_the_actors_process(small_config: Config) -> None:
    """Ray pins an actor's torch to one thread per requested CPU; ``rollout.num_threads`` lifts it.
    ``rollout.cpu_cores`` pins every thread of the actor's process (Ray's own included)."""
    core = max(os.sched_getaffinity(0))
    small_config.rollout.num_threads = 2
    small_config.rollout.cpu_cores = [core]
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        actor = ray.remote(RolloutWorker).options(num_cpus=1).remote(small_config, small_config.model.path)
        stats = ray.get(actor.stats.remote())
        assert stats["torch_threads"] == 2 and stats["cpu_cores"] == [core]
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        threads = list(Path(f"/proc/{pid}/task").iterdir())
        assert len(threads) > 2  # Ray's threads besides the main one
        assert all(os.sched_getaffinity(int(t.name)) == {core} for t in threads)
    finally:
        ray.shutdown()
    with pytest.raises(ValueError, match=r"'rollout.cpu_cores' = \[100000\]: cores \[100000\] are not"):
        configure_cpu(0, [100_000], "rollout")


def test_rollout_and_evaluation_skip_and_count_every_kind_of_bad_video(
    small_config: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = small_config
    cfg.rl.group_size = 2
    cfg.data.max_bad_video_fraction = 1.0  # counting here, stopping in the next test
    worker = RolloutWorker(cfg, cfg.model.path)
    good = load_jsonl(cfg.data.train)[:2]
    bad = [
        VideoQAExample(
            id=f"bad-{kind}", video=str(make_bad_video(tmp_path, kind)), question="q ?", answer="red"
        )
        for kind in BAD_VIDEOS
    ]
    with caplog.at_level(logging.WARNING, logger="rlaif_ray.data.frames"):
        for step in (1, 2):
            groups = worker.rollout([good[0], *bad, good[1]], step=step)
            assert [g.example_id for g in groups] == [ex.id for ex in good]
        result = worker.evaluate([*bad, *good])

    by_reason = dict(Counter(BAD_VIDEOS.values()))
    stats = worker.stats()
    assert stats["skipped_videos"] == len(bad) and stats["prompts_bad_video"] == 2 * len(bad)
    assert stats["skipped_videos_by_reason"] == by_reason
    assert result["n"] == len(good) and result["skipped_videos"] == len(bad)
    assert result["skipped_videos_by_reason"] == by_reason
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == len(bad), "one warning per video, not per use"
    for ex in bad:
        assert sum(str(ex.video) in w for w in warnings) == 1


def test_rollout_stops_when_more_than_the_limit_of_a_batch_is_bad(
    small_config: Config, tmp_path: Path
) -> None:
    """The fraction is judged over the actor's share of one step (here 4 prompts), not per call:
    the driver tops its pipeline up a few prompts at a time."""
    cfg = small_config
    cfg.rl.group_size, cfg.rl.prompts_per_step, cfg.data.max_bad_video_fraction = 2, 4, 0.5
    worker = RolloutWorker(cfg, cfg.model.path)
    good = load_jsonl(cfg.data.train)[:2]
    gone = [VideoQAExample(f"gone-{i}", str(tmp_path / f"gone_{i}.mp4"), "q ?") for i in range(3)]
    text = VideoQAExample("text", str(make_bad_video(tmp_path, "text")), "q ?")

    assert worker.rollout([gone[0]], step=1) == []  # 1 prompt: not a batch yet
    assert len(worker.rollout([good[0], good[1], gone[1]], step=2)) == 2  # last 4: 2 bad, at the limit
    assert worker.rollout([text], step=3) == []  # last 4: good, good, gone-1, text: still 2 bad
    with pytest.raises(BadVideoFractionError) as info:
        worker.rollout([gone[2]], step=4)  # last 4: good, gone-1, text, gone-2: 3 bad

    message = str(info.value)
    assert "3 of the last 4 prompts (75%)" in message and "data.max_bad_video_fraction = 0.5" in message
    assert f"{gone[1].video} (missing)" in message and f"{text.video} (unreadable)" in message
    assert worker.stats()["prompts_bad_video"] == 4
