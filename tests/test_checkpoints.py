"""The learner's full state round trip and updates with a NaN skipped (plain classes, no Ray), and
a learner set-up that cannot finish failing with what it waits for."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import ray
import torch

from rlaif_ray.checkpoint import TRAINER_STATE, checkpoint_steps, latest_checkpoint
from rlaif_ray.config import Config
from rlaif_ray.data.dataset import load_jsonl
from rlaif_ray.launch import start_learners, warm_start
from rlaif_ray.learner.worker import LearnerWorker
from rlaif_ray.rollout.worker import RolloutWorker


def ranked(cfg: Config, step: int, rollout: RolloutWorker, examples: list) -> list:
    """Groups sampled now, ranked by answer index (a fixed, non-tied order)."""
    groups = rollout.rollout(examples, step=step)
    for g in groups:
        g.ranks, g.rank_status = [float(i) for i in range(g.size)], "ok"
    return groups


def test_restored_learner_takes_the_same_next_step(small_config: Config, tmp_path: Path) -> None:
    """Save after one step, take a second; a fresh learner restored from the save takes the same
    second step bit for bit (weights, Adam moments and scheduler come back), and publishes the
    version it is given."""
    cfg = small_config
    cfg.learner.lr = 1e-2
    examples = load_jsonl(cfg.data.train)[:4]
    rollout = RolloutWorker(cfg, cfg.model.path)
    first, second = ranked(cfg, 1, rollout, examples), ranked(cfg, 2, rollout, examples)

    learner = LearnerWorker(cfg, cfg.model.path)
    learner.setup()
    learner.train_step(first)
    learner.save_state(str(tmp_path / "ckpt"))
    learner.train_step(second)
    expected = learner.export_weights().tensors()

    restored = LearnerWorker(cfg, cfg.model.path)
    restored.setup()
    assert restored.load_state(str(tmp_path / "ckpt"), version=7) == 7
    saved = restored.policy.trainable_state_dict()  # a copy: restored trains on
    assert any(not torch.equal(saved[k], expected[k]) for k in expected), "the second step changed nothing"
    stats = restored.train_step(second)
    got = restored.export_weights().tensors()
    assert stats["version"] == 8
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name

    # Without the optimizer state the second step differs: the check above can fail.
    fresh = LearnerWorker(cfg, cfg.model.path)
    fresh.setup()
    fresh.policy.load_trainable_state_dict(saved)
    fresh.train_step(second)
    assert any(not torch.equal(fresh.export_weights().tensors()[k], expected[k]) for k in expected)


def test_nan_update_is_skipped_and_counted(small_config: Config) -> None:
    """A NaN in the batch (here the sampler's log-probs, so the loss and every gradient) skips the
    update: the weights and the version stay, the skip is counted, and the next clean batch learns."""
    cfg = small_config
    cfg.learner.lr = 1e-2
    examples = load_jsonl(cfg.data.train)[:4]
    rollout = RolloutWorker(cfg, cfg.model.path)
    groups = ranked(cfg, 1, rollout, examples)
    learner = LearnerWorker(cfg, cfg.model.path)
    learner.setup()
    before = learner.policy.trainable_state_dict()

    poisoned = ranked(cfg, 1, rollout, examples)
    poisoned[0].logprobs[0][0] = math.nan
    stats = learner.train_step(poisoned)
    assert stats["skipped_step"] == 1.0 and stats["skipped_nonfinite"] == 1.0
    assert learner.version == 0
    after = learner.export_weights().tensors()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
        assert torch.isfinite(after[name]).all()

    stats = learner.train_step(groups)
    assert stats["skipped_step"] == 0.0 and stats["version"] == 1.0
    assert any(not torch.equal(learner.export_weights().tensors()[k], before[k]) for k in before)


def test_learner_setup_deadline_names_the_stale_lock(
    small_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock file left by a killed build of DeepSpeed's CPU op would make every later learner wait
    forever: setup fails at ``learner.setup_timeout_s`` with a message naming the lock file."""
    lock = tmp_path / "extensions" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(lock.parents[1]))
    cfg = small_config
    cfg.learner.setup_timeout_s = 20
    ray.init(num_cpus=2, runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": str(lock.parents[1])}})
    try:
        with pytest.raises(RuntimeError, match=f"learner.setup_timeout_s=20 s.*Lock files now: {lock}"):
            start_learners(cfg, cfg.model.path)
    finally:
        ray.shutdown()


def test_partial_checkpoints_are_never_resumed_from(tmp_path: Path) -> None:
    """Only whole checkpoints count: a temporary folder left by a crash while writing, or a step
    folder without its loop state, is passed over for the previous whole one."""
    root = tmp_path / "checkpoints"
    for name, whole in [("step_2", True), ("step_4", True), (".step_6.tmp", True), ("step_8", False)]:
        (root / name).mkdir(parents=True)
        if whole:
            (root / name / TRAINER_STATE).write_text("{}")
    assert sorted(checkpoint_steps(root)) == [2, 4]
    assert latest_checkpoint(tmp_path) == str(root / "step_4")
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_sft_checkpoint_is_reused_only_with_the_same_fingerprint(
    small_config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    """The SFT checkpoint is reused when nothing it depends on changed, and trained again, with a line
    naming the setting, when one did (here the learning rate); logging settings do not count."""
    cfg = small_config
    cfg.sft.steps, cfg.sft.eval_every, cfg.sft.batch_size = 2, 100, 4
    cfg.learner.num_threads = 1
    model_dir = Path(cfg.model.path)
    ray.init(num_cpus=2)
    try:
        warm_start(cfg, model_dir)
        state = Path(cfg.sft.output_dir) / "sft_state.json"
        first = state.stat().st_mtime_ns
        cfg.sft.log_every = 7  # does not change the weights
        warm_start(cfg, model_dir)
        assert "reusing the SFT checkpoint" in capsys.readouterr().out
        assert state.stat().st_mtime_ns == first
        cfg.sft.lr = 1e-3
        warm_start(cfg, model_dir)
        out = capsys.readouterr().out
        assert "trained again: sft.lr: 0.0005 -> 0.001" in out, out
        assert state.stat().st_mtime_ns != first
    finally:
        ray.shutdown()
