"""ZeRO-3 on two learner actors with the default model settings (motion tokens, a warm start with
an adapter, so a reference adapter too, DeepSpeed's default persistence threshold).

Under ZeRO-3 every module call fetches its partitioned parameters with a collective, and DeepSpeed
traces the order of those calls to prefetch. Two ranks must therefore run the same modules the
same number of times in every pass, whatever rows they hold; when they did not (the embedding was
called once per row, and 25 answers split 13/12), the ranks issued different collectives from the
second update on and waited for each other for ever (issue 18)."""

from __future__ import annotations

import dataclasses

import pytest
import ray
import torch
from conftest import start_learners

from rlaif_ray.config import Config
from rlaif_ray.data.dataset import load_jsonl
from rlaif_ray.learner.worker import LearnerCollectiveError, LearnerWorker
from rlaif_ray.rollout.worker import RolloutWorker

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("shares", ["uneven", "one_without_video"])
def test_two_zero3_learners_agree_after_updates(default_warm_start: Config, shares: str) -> None:
    """``uneven``: 5 groups of 5 answers, 25 rows: the two ranks hold 13 and 12.
    ``one_without_video``: 4 groups, the last two text-only: rank 1's 10 rows have no video, and
    it must still run the encoder and the projector that rank 0 runs."""
    cfg = dataclasses.replace(default_warm_start)
    cfg.learner = dataclasses.replace(cfg.learner, zero_stage=3, num_actors=2, num_threads=1)
    cfg.learner.collective_timeout_s = 120  # a divergence fails here instead of hanging
    cfg.rl = dataclasses.replace(cfg.rl, prompts_per_step=5 if shares == "uneven" else 4)
    examples = load_jsonl(cfg.data.train)[: cfg.rl.prompts_per_step]
    groups = RolloutWorker(cfg, cfg.model.path).rollout(examples, step=1)
    assert len(groups) == cfg.rl.prompts_per_step and all(g.size == cfg.rl.group_size == 5 for g in groups)
    if shares == "one_without_video":
        groups[2:] = [dataclasses.replace(g, video=None) for g in groups[2:]]
    for g in groups:  # no group tied (a tied one is skipped): every row is learned
        g.ranks, g.rank_status = [float(r) for r in range(g.size)], "ok"
    rows = 5 * len(groups)

    # Nested, so that Ray ships them by value (the test module does not import in an actor).
    def whole_weights(learner: LearnerWorker) -> dict[str, torch.Tensor]:
        """This rank's trainable tensors, gathered (a collective: every rank at once)."""
        from rlaif_ray.learner.engine import gathered_trainable

        with gathered_trainable(learner.policy):
            return learner.policy.trainable_state_dict()

    def partitioned(learner: LearnerWorker) -> int:
        """How many of this rank's parameters ZeRO-3 holds only a part of."""
        return sum(1 for p in learner.policy.parameters() if p.ds_tensor.numel() < p.ds_numel)

    ray.init(num_cpus=4, include_dashboard=False)
    try:
        learners = start_learners(cfg)
        assert all(n > 0 for n in ray.get([a.__ray_call__.remote(partitioned) for a in learners]))
        before = ray.get([a.__ray_call__.remote(whole_weights) for a in learners])
        for update in range(3):  # on-policy: each batch sampled by the version the learners hold
            batch = [dataclasses.replace(g, weight_version=update) for g in groups]
            stats = ray.get([a.train_step.remote(batch) for a in learners], timeout=600)
            assert [s["version"] for s in stats] == [update + 1] * 2, stats
            assert all(s["rows"] == rows and s["skipped_step"] == 0.0 for s in stats)
            assert all(torch.isfinite(torch.tensor(s["loss"])) for s in stats)
        after = ray.get([a.__ray_call__.remote(whole_weights) for a in learners])
    finally:
        ray.shutdown()
    assert before[0].keys() == after[0].keys() == after[1].keys()
    for key in after[0]:
        assert torch.equal(after[0][key], after[1][key]), f"the two learners' {key} differ"
    assert any(not torch.equal(after[0][k], before[0][k]) for k in after[0]), "no weight changed"


def test_a_collective_that_cannot_complete_fails_naming_the_learner_and_the_update(
    small_config: Config,
) -> None:
    """Learner 1 never joins learner 0's update (as when it is stuck, or the two diverged): learner 0
    fails after ``learner.collective_timeout_s`` with an error naming itself and the update, which
    the loop handles as a learner fault, instead of waiting for ever."""
    cfg = small_config
    cfg.learner.num_actors, cfg.learner.num_threads, cfg.learner.collective_timeout_s = 2, 1, 10
    cfg.rl.prompts_per_step, cfg.rl.group_size = 2, 4
    groups = RolloutWorker(cfg, cfg.model.path).rollout(load_jsonl(cfg.data.train)[:2], step=1)
    for g in groups:
        g.ranks, g.rank_status = [float(r) for r in range(g.size)], "ok"
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        learners = start_learners(cfg)
        with pytest.raises(LearnerCollectiveError, match=r"learner-0: a collective of update 1 failed"):
            ray.get(learners[0].train_step.remote(groups), timeout=120)
    finally:
        ray.shutdown()


def test_a_video_that_fails_on_one_learner_only_is_dropped_by_both(default_warm_start: Config) -> None:
    """With ``learner.reencode_videos`` each learner decodes the batch's videos itself; one that is
    unreadable on rank 0's node only must not split the ranks (different rows, different shares,
    different loss totals, a collective one rank never reaches): both drop its rows and agree."""
    cfg = dataclasses.replace(default_warm_start)
    cfg.learner = dataclasses.replace(
        cfg.learner, zero_stage=3, num_actors=2, num_threads=1, reencode_videos=True
    )
    cfg.learner.collective_timeout_s = 120
    cfg.rl = dataclasses.replace(cfg.rl, prompts_per_step=4)
    examples = list({ex.video: ex for ex in load_jsonl(cfg.data.train)}.values())[:4]  # 4 videos
    groups = RolloutWorker(cfg, cfg.model.path).rollout(examples, step=1)
    for g in groups:
        g.ranks, g.rank_status = [float(r) for r in range(g.size)], "ok"
    lost = groups[1].video

    def unreadable_here(learner: LearnerWorker, path: str) -> None:
        """This learner's store takes ``path`` for unreadable (as on a node that lacks the file)."""
        from rlaif_ray.data.video import VideoDecodeError

        learner.store.failures[path] = VideoDecodeError(f"{path}: not on this node", "missing")

    ray.init(num_cpus=4, include_dashboard=False)
    try:
        learners = start_learners(cfg)
        ray.get(learners[0].__ray_call__.remote(unreadable_here, lost))
        stats = ray.get([a.train_step.remote(groups) for a in learners], timeout=600)
    finally:
        ray.shutdown()
    rows = 5 * (len(groups) - 1)
    assert [s["rows"] for s in stats] == [rows, rows], stats
    assert [s["rows_bad_video"] for s in stats] == [5.0, 5.0], stats
    assert [s["version"] for s in stats] == [1, 1] and all(s["skipped_step"] == 0.0 for s in stats)
