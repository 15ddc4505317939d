"""The DeepSpeed learner on real Ray actors: one step on 2 learners equals one step on 1 learner."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from rlaif_ray.algo.losses import token_mean
from rlaif_ray.config import Config
from rlaif_ray.data.dataset import load_jsonl
from rlaif_ray.learner.worker import LearnerWorker, _pad, build_rows, shard, split_groups
from rlaif_ray.ranker.worker import RankerWorker
from rlaif_ray.rollout.worker import RolloutWorker
from rlaif_ray.weights import WeightsMessage


def ranked_groups(cfg: Config, n_prompts: int) -> list:
    """Real groups: sampled by the rollout worker, ordered by the ground-truth ranker."""
    examples = load_jsonl(cfg.data.train)[:n_prompts]
    groups = RolloutWorker(cfg, cfg.model.path).rollout(examples, step=1)
    ranker = RankerWorker(cfg.ranker, cfg.rl.group_size)
    return ranker.rank_groups(groups)


def owned(weights: WeightsMessage) -> dict[str, torch.Tensor]:
    """Copies of an export read from the object store (its views end with the Ray session)."""
    return {k: v.clone() for k, v in weights.tensors().items()}


def one_step(cfg: Config, groups: list, world_size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    actor_cls = ray.remote(LearnerWorker)
    learners = [
        actor_cls.options(num_cpus=0.5).remote(cfg, cfg.model.path, r, world_size) for r in range(world_size)
    ]
    addr, port = ray.get(learners[0].address.remote())
    ray.get([learner.setup.remote(addr, port) for learner in learners])

    def local_partition(learner: LearnerWorker) -> tuple[int, int]:
        """(elements this rank holds, elements of the whole model); nested so that Ray ships it by value."""
        params = list(learner.policy.parameters())
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        return held, sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)

    partition = ray.get([learner.__ray_call__.remote(local_partition) for learner in learners])
    before = owned(ray.get([learner.export_weights.remote() for learner in learners])[0])
    stats = ray.get([learner.train_step.remote(groups) for learner in learners])
    after = ray.get([learner.export_weights.remote() for learner in learners])
    ray.get([learner.save.remote(str(Path(cfg.run_dir) / f"saved_{world_size}")) for learner in learners])
    for learner in learners:
        ray.kill(learner)
    assert after[1:] == [None] * (world_size - 1), "only rank 0 returns the weights"
    # ZeRO-2's flat buffer travels whole; ZeRO-3's gathered tensors are packed into one copy.
    assert len(after[0].buffers) == 1, f"the export travels as {len(after[0].buffers)} buffers"
    return {"stats": stats[0], "before": before, "partition": partition}, owned(after[0])


def test_shard_covers_everything_once() -> None:
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sum(parts, []) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_build_rows_skips_tied_and_unranked_groups(small_config: Config) -> None:
    groups = ranked_groups(small_config, 4)
    groups[0].ranks = [1.5] * small_config.rl.group_size  # all tied: no signal
    groups[1].ranks, groups[1].rank_status = None, "dropped"
    rows, stats = build_rows(groups, small_config)
    assert stats["groups_skipped_tied"] >= 1 and stats["groups_unranked"] == 1
    assert all(r.video != groups[0].video or r.question != groups[0].question for r in rows)
    # Advantages are zero-sum within each kept group.
    g = small_config.rl.group_size
    for i in range(0, len(rows), g):
        assert abs(sum(r.advantage for r in rows[i : i + g])) < 1e-6


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_learners_take_the_same_step_as_one(small_config: Config, zero_stage: int) -> None:
    cfg = small_config
    cfg.rl.prompts_per_step, cfg.rl.group_size = 6, 4
    cfg.learner.micro_batch_size = 8  # several micro-batches per rank
    cfg.learner.lr = 1e-2  # a visible step
    cfg.learner.num_threads = 1  # two learner processes share the machine's cores
    # Every tensor of the tiny model is below DeepSpeed's default threshold: partition them all.
    cfg.learner.zero_stage, cfg.learner.zero3_persistence_threshold = zero_stage, 0
    groups = ranked_groups(cfg, cfg.rl.prompts_per_step)
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        one, w1 = one_step(cfg, groups, world_size=1)
        cfg.learner.num_actors = 2
        two, w2 = one_step(cfg, groups, world_size=2)
    finally:
        ray.shutdown()
    if zero_stage == 3:  # each of the two ranks holds about half of every parameter
        for held, total in two["partition"]:
            assert held < 0.6 * total, (held, total)
    # Both checkpoints hold the whole (gathered) weights: the same tensors as the export.
    for world_size, weights in ((1, w1), (2, w2)):
        saved = load_file(
            str(Path(cfg.run_dir) / f"saved_{world_size}" / "adapter" / "adapter_model.safetensors")
        )
        assert len(saved) == sum(".lora_" in k for k in weights)
        assert all(t.numel() > 0 for t in saved.values())
    assert one["stats"]["rows"] > 0 and one["stats"]["version"] == 1.0
    changed = [k for k in w1 if not torch.allclose(w1[k], one["before"][k])]
    assert changed, "the step changed no weight"
    assert any(k.startswith("projector.") for k in changed) and any(".lora_" in k for k in changed)
    # The global gradient (before clipping) is the same: each rank's share is weighted right.
    assert one["stats"]["grad_norm"] > 0
    assert abs(two["stats"]["grad_norm"] - one["stats"]["grad_norm"]) <= 1e-4 * one["stats"]["grad_norm"]
    for key in w1:
        # Adam's first step is lr * g / (|g| + eps): where |g| ~ eps, float-rounding differences
        # between the two reductions move the update by a fraction of lr, so compare against lr.
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-2 * cfg.learner.lr, msg=f"{key} differs")


def sequence_logprobs(learner: LearnerWorker, groups: list) -> torch.Tensor:
    """Summed token log-probs [n_groups, G] of every sampled answer under the learner's policy."""
    rows, _ = build_rows(groups, learner.cfg)
    assert len(rows) == sum(g.size for g in groups)
    with torch.no_grad():
        features = learner._visual_features(rows)
        prompts = [learner.policy.prompt_ids(r.question) for r in rows]
        logprobs, mask, _ = learner.policy.answer_logprobs(
            None, prompts, [r.completion_ids for r in rows], features=features
        )
    return (logprobs * mask).sum(-1).view(len(groups), -1)


@pytest.mark.parametrize("reverse", [False, True])
def test_one_step_raises_the_best_answer_over_the_worst(small_config: Config, reverse: bool) -> None:
    """Wiring: a step moves probability from each group's worst-ranked answer to its best-ranked one.

    The ranks are set here, by answer index, so that the test knows the best and the worst; with
    ``reverse`` they are flipped and the step must move the other way. A sign flip in the
    advantage, or an advantage attached to the wrong answer, fails one of the two cases.
    """
    cfg = small_config
    cfg.rl.prompts_per_step, cfg.rl.group_size = 8, 4
    cfg.algo.kl_coef = 0.0  # the surrogate alone
    cfg.learner.lr = 2e-3
    examples = load_jsonl(cfg.data.train)[: cfg.rl.prompts_per_step]
    groups = RolloutWorker(cfg, cfg.model.path).rollout(examples, step=1)
    order = list(range(cfg.rl.group_size))
    for g in groups:
        g.ranks = [float(r) for r in (order[::-1] if reverse else order)]
        g.rank_status = "ok"
    best, worst = (cfg.rl.group_size - 1, 0) if reverse else (0, cfg.rl.group_size - 1)
    distinct = [i for i, g in enumerate(groups) if g.completion_ids[best] != g.completion_ids[worst]]
    assert len(distinct) >= 4, "too few groups whose best and worst answers differ"

    learner = LearnerWorker(cfg, cfg.model.path)
    learner.setup()
    before = sequence_logprobs(learner, groups)
    stats = learner.train_step(groups)
    after = sequence_logprobs(learner, groups)
    assert stats["rows"] == len(groups) * cfg.rl.group_size
    margin_gain = (after[:, best] - after[:, worst]) - (before[:, best] - before[:, worst])
    assert bool((margin_gain[distinct] > 0).all()), margin_gain[distinct].tolist()


def test_learner_scores_without_dropout(small_config: Config) -> None:
    """With lora_dropout the sampler (eval mode) and the learner still score the same function:
    every importance ratio of the first pass is 1. A fresh adapter's B is zero (dropout has no
    effect yet), so the check is on the second step, after the rollout worker took the update."""
    cfg = small_config
    cfg.model.lora_dropout = 0.5
    cfg.learner.lr = 1e-2
    rollout = RolloutWorker(cfg, cfg.model.path)
    examples = load_jsonl(cfg.data.train)[:4]
    learner = LearnerWorker(cfg, cfg.model.path)
    learner.setup()
    for step in (1, 2):
        groups = rollout.rollout(examples, step=step)
        for g in groups:
            g.ranks, g.rank_status = [float(i) for i in range(g.size)], "ok"
        stats = learner.train_step(groups)
        rollout.update_weights(step, learner.export_weights())
    assert stats["rows"] == 4 * cfg.rl.group_size
    assert stats["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_the_learning_rate_warms_up_and_a_restored_learner_goes_on_with_it(
    small_config: Config, tmp_path: Path
) -> None:
    """``learner.warmup_steps=4``: the updates run at lr/4, lr/2, 3 lr/4, then lr; a learner restored
    from a checkpoint taken after 2 updates runs its next one at 3 lr/4 again."""
    cfg = small_config
    cfg.learner.lr, cfg.learner.warmup_steps = 1e-3, 4
    groups = RolloutWorker(cfg, cfg.model.path).rollout(load_jsonl(cfg.data.train)[:2], step=1)
    for g in groups:
        g.ranks, g.rank_status = [float(i) for i in range(g.size)], "ok"
    learner = LearnerWorker(cfg, cfg.model.path)
    learner.setup()
    lrs = [learner.train_step(groups)["lr"] for _ in range(2)]
    learner.save_state(str(tmp_path / "checkpoint"))
    lrs += [learner.train_step(groups)["lr"] for _ in range(3)]
    assert lrs == pytest.approx([lr * cfg.learner.lr for lr in (0.25, 0.5, 0.75, 1.0, 1.0)])
    learner.load_state(str(tmp_path / "checkpoint"))
    assert learner.train_step(groups)["lr"] == pytest.approx(0.75 * cfg.learner.lr)


def test_pi_prox_of_stale_groups_is_the_learners_policy_before_the_step(small_config: Config) -> None:
    """Groups sampled one version behind: the importance weights ``min(pi_prox / mu, cap)`` the
    loss reports, in both of 2 epochs, are those of the learner's own log-probs before the step
    (computed here by a separate forward), not the behaviour policy's (weights of 1) nor those of
    the weights the first epoch moved to."""
    cfg = small_config
    cfg.learner.lr, cfg.learner.epochs_per_batch, cfg.algo.is_cap = 1e-2, 2, 100.0
    cfg.rl.prompts_per_step, cfg.rl.group_size = 4, 4
    cfg.learner.micro_batch_size = 16  # one micro-batch: the check below sees every row at once
    rollout = RolloutWorker(cfg, cfg.model.path)
    examples = load_jsonl(cfg.data.train)[:8]
    learner = LearnerWorker(cfg, cfg.model.path)
    learner.setup()

    def ranked(groups: list) -> list:
        for g in groups:
            g.ranks, g.rank_status = [float(i) for i in range(g.size)], "ok"
        return groups

    stale = ranked(rollout.rollout(examples[4:], step=2))  # sampled by version 0
    learner.train_step(ranked(rollout.rollout(examples[:4], step=1)))  # the learner: version 1
    rows, _ = build_rows(stale, cfg)
    with torch.no_grad():
        prox, mask, _ = learner.policy.answer_logprobs(None, **learner._policy_inputs(split_groups(rows)))
    behaviour = _pad([r.old_logprobs for r in rows], prox.shape[1], prox.device)
    expected = token_mean(torch.exp(prox - behaviour).clamp(max=cfg.algo.is_cap), mask).item()
    assert abs(expected - 1.0) > 1e-4  # the learner moved: the weights are not all 1
    stats = learner.train_step(stale)
    assert stats["lag_max"] == 1.0
    assert stats["is_weight_mean"] == pytest.approx(expected, abs=1e-5)
    assert stats["ratio_mean"] != pytest.approx(1.0, abs=1e-6)  # the second epoch moved away from pi_prox


def test_the_learner_takes_the_rollouts_encoder_output_instead_of_decoding(
    small_config: Config, tmp_path: Path
) -> None:
    """Groups bring their video's frozen-encoder output from the rollout: the learner trains on
    them without decoding (their video paths no longer exist here), and takes the step that
    decoding and encoding the videos itself (``learner.reencode_videos``) gives."""
    cfg = small_config
    cfg.rl.prompts_per_step, cfg.rl.group_size = 4, 4
    cfg.learner.lr = 1e-2
    examples = load_jsonl(cfg.data.train)[: cfg.rl.prompts_per_step]
    groups = RolloutWorker(cfg, cfg.model.path).rollout(examples, step=1)
    for g in groups:
        assert g.visual_features is not None and g.visual_features.dim() == 2
        # its own storage, not a view of the batch's (pickled alone, a view carries the whole batch)
        features = g.visual_features
        assert features.untyped_storage().nbytes() == features.numel() * features.element_size()
        g.ranks, g.rank_status = [float(r) for r in range(g.size)], "ok"
    gone = [dataclasses.replace(g, video=str(tmp_path / f"gone-{i}.mp4")) for i, g in enumerate(groups)]
    learner = LearnerWorker(cfg, cfg.model.path)
    learner.setup()
    shipped = learner.train_step(gone)
    assert shipped["rows"] == 16 and shipped["rows_bad_video"] == 0 and shipped["version"] == 1.0
    assert learner.store.skipped_videos == 0 and not learner.store._frames, "the learner decoded a video"
    from_rollout = learner.export_weights().tensors()

    cfg.learner.reencode_videos = True
    reencoded_groups = RolloutWorker(cfg, cfg.model.path).rollout(examples, step=1)
    assert all(g.visual_features is None for g in reencoded_groups)  # the rollout sends none
    for g in reencoded_groups:
        g.ranks, g.rank_status = [float(r) for r in range(g.size)], "ok"
    learner = LearnerWorker(cfg, cfg.model.path)
    learner.setup()
    reencoded = learner.train_step(reencoded_groups)
    assert len(learner.store._frames) == len({g.video for g in groups})  # decoded here, once each
    assert reencoded["loss"] == pytest.approx(shipped["loss"], abs=1e-6)
    for key, value in learner.export_weights().tensors().items():
        torch.testing.assert_close(value, from_rollout[key], rtol=0, atol=1e-2 * cfg.learner.lr, msg=key)


def test_the_learner_takes_the_rollouts_reference_logprobs(
    small_config: Config, colour_checkpoint: Path
) -> None:
    """``rollout.reference_logprobs``: the rollout scores its answers under the reference (the
    warm-start adapter, not the weights it now serves) as the learner's own reference pass does,
    and a learner given them skips that pass and takes the same step."""
    cfg = small_config
    cfg.rl.prompts_per_step, cfg.rl.group_size = 4, 4
    cfg.learner.lr, cfg.algo.kl_coef = 1e-2, 0.5
    model = str(colour_checkpoint)
    examples = load_jsonl(cfg.data.train)[:8]

    def ranked(groups: list) -> list:
        for g in groups:
            g.ranks, g.rank_status = [float(r) for r in range(g.size)], "ok"
        return groups

    learners = [LearnerWorker(cfg, model) for _ in range(2)]
    for learner in learners:
        learner.setup()
    first = ranked(RolloutWorker(cfg, model).rollout(examples[:4], step=1))
    assert all(g.ref_logprobs is None for g in first)  # off by default
    for learner in learners:
        learner.train_step(first)  # the policy moves away from the reference
    cfg.rollout.reference_logprobs = True
    rollout = RolloutWorker(cfg, model)
    rollout.update_weights(1, learners[0].export_weights())
    groups = ranked(rollout.rollout(examples[4:], step=2))
    rows, _ = build_rows(groups, cfg)
    ref, mask, _ = learners[0].policy.answer_logprobs(
        None, reference=True, **learners[0]._policy_inputs(split_groups(rows))
    )
    shipped = _pad([r.ref_logprobs for r in rows], ref.shape[1], ref.device)
    torch.testing.assert_close(shipped, ref, rtol=0, atol=1e-5)
    behaviour = _pad([r.old_logprobs for r in rows], ref.shape[1], ref.device)
    assert ((behaviour - shipped).abs() * mask).max() > 1e-3, "the reference is the served policy"

    passes = []
    reference_mode = learners[0].policy.reference_mode
    learners[0].policy.reference_mode = lambda: passes.append(1) or reference_mode()
    with_ref = learners[0].train_step(groups)
    assert not passes, "the learner ran its reference pass on groups that brought their own"
    without = learners[1].train_step([dataclasses.replace(g, ref_logprobs=None) for g in groups])
    assert with_ref["kl"] > 1e-4
    for key in ("loss", "kl"):
        assert with_ref[key] == pytest.approx(without[key], abs=1e-5), key
    after = learners[1].export_weights().tensors()
    for key, value in learners[0].export_weights().tensors().items():
        torch.testing.assert_close(value, after[key], rtol=0, atol=1e-2 * cfg.learner.lr, msg=key)
