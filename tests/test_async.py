"""The asynchronous loop: the staleness bound holds, every sampled group is accounted for once,
and with the bound at 0 the loop takes exactly the steps the plain classes take in-process."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import ray
import torch
from loop_checks import assert_versions_follow_updates

from rlaif_ray.config import Config
from rlaif_ray.data.dataset import load_jsonl
from rlaif_ray.launch import run
from rlaif_ray.learner.worker import LearnerWorker
from rlaif_ray.models.policy import VideoLMPolicy
from rlaif_ray.ranker.worker import RankerWorker
from rlaif_ray.rollout.worker import RolloutWorker

pytestmark = pytest.mark.slow


def colour_run(cfg: Config, checkpoint: Path, steps: int) -> Config:
    """RL from the colour checkpoint on colour questions (answers it gets right now and then)."""
    cfg.model.path, cfg.sft.enabled = str(checkpoint), False
    cfg.data.train = str(checkpoint.parent / "colour_train.jsonl")
    cfg.rl.steps, cfg.rl.prompts_per_step, cfg.rl.group_size = steps, 4, 4
    cfg.rl.eval_every, cfg.rl.checkpoint_every, cfg.rl.eval_examples = 100, 100, 8
    cfg.learner.lr = 1e-2
    cfg.rollout.num_threads = cfg.learner.num_threads = 1
    return cfg


def records_of(cfg: Config) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bound", [1, 2])
def test_lag_is_bounded_and_every_group_is_learned_once(
    small_config: Config, colour_checkpoint: Path, bound: int
) -> None:
    cfg = colour_run(small_config, colour_checkpoint, steps=6)
    cfg.rl.max_staleness = bound
    cfg.rollout.num_actors = 2
    cfg.rollout.reference_logprobs = bound == 2  # the rollout scores the reference (tested in test_learner)
    summary = run(cfg)
    records = records_of(cfg)
    assert [r["step"] for r in records] == list(range(1, 7))
    lags = [lag for r in records for lag in r["group_lags"]]
    assert len(lags) == 6 * 4 and all(0 <= lag <= bound for lag in lags)
    assert max(lags) >= 1, "no group was sampled ahead: the loop ran synchronously"
    ids = [gid for r in records for gid in r["group_ids"]]
    assert len(ids) == len(set(ids)), "a group was learned twice"
    # The learner sees the same lags (tied groups, which it skips, aside).
    assert all(r["learner"]["lag_max"] <= max(r["group_lags"]) for r in records if "lag_max" in r["learner"])
    # ... and corrects for them: it reported stale answers itself and weighted their tokens by
    # pi_prox / mu, which differs from 1 once the sampler's version is behind the learner's.
    corrected = [r["learner"] for r in records if r["learner"].get("lag_max", 0) >= 1]
    assert corrected, "the learner never reported a stale answer"
    assert any(abs(stats["is_weight_mean"] - 1.0) > 1e-6 for stats in corrected), corrected
    groups = summary["groups"]
    assert groups["learned"] == len(ids)
    accounted = (
        groups["learned"] + groups["dropped_stale"] + groups["dropped_unranked"] + groups["unlearned_at_end"]
    )
    assert groups["sampled"] == accounted, groups


def test_bound_zero_takes_the_same_steps_as_the_plain_classes(
    small_config: Config, colour_checkpoint: Path
) -> None:
    cfg = colour_run(small_config, colour_checkpoint, steps=3)
    cfg.rl.max_staleness = 0
    summary = run(cfg)
    records = records_of(cfg)
    assert all(lag == 0 for r in records for lag in r["group_lags"])
    final_version = assert_versions_follow_updates(records)
    assert summary["groups"]["unlearned_at_end"] == 0
    served = VideoLMPolicy.from_folder(Path(cfg.run_dir) / "checkpoints" / "final", cfg.model)

    # The same steps through the plain classes: rollout worker -> ranker worker -> learner worker,
    # called one after the other in one process. That process is a Ray worker like the loop's
    # actors (one CPU, so OMP_NUM_THREADS=1 as theirs): this test process's torch, which other
    # tests ran on two threads first, picks other CPU kernels for some small matrix products
    # than a process started with one thread, and the comparison is bit for bit.
    def plain_steps(cfg: Config) -> tuple[int, dict[str, torch.Tensor]]:
        learner = LearnerWorker(cfg, cfg.model.path)
        learner.setup()
        rollout = RolloutWorker(cfg, cfg.model.path)
        ranker = RankerWorker(cfg.ranker, cfg.rl.group_size)
        rng, train = random.Random(cfg.seed), load_jsonl(cfg.data.train)
        for step in range(1, cfg.rl.steps + 1):
            groups = ranker.rank_groups(rollout.rollout(rng.sample(train, cfg.rl.prompts_per_step), step))
            learner.train_step(groups)
            rollout.update_weights(learner.version, learner.export_weights())
        return learner.version, learner.policy.trainable_state_dict()

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        version, expected = ray.get(ray.remote(num_cpus=1)(plain_steps).remote(cfg), timeout=600)
    finally:
        ray.shutdown()
    assert version == summary["weight_version"] == final_version
    got = served.trainable_state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
