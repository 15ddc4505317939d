"""The whole GRPO_rank loop on a real local Ray cluster, tiny sizes, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rlaif_ray.config import Config
from rlaif_ray.launch import run


def test_loop_runs_end_to_end(small_config: Config) -> None:
    cfg = small_config
    cfg.sft.steps, cfg.sft.eval_every, cfg.sft.batch_size = 10, 10, 8
    cfg.rl.steps, cfg.rl.prompts_per_step, cfg.rl.group_size = 3, 4, 4
    cfg.rl.eval_every, cfg.rl.checkpoint_every, cfg.rl.eval_examples = 2, 2, 16
    cfg.rollout.num_actors = 2
    cfg.ranker.min_actors, cfg.ranker.max_actors, cfg.ranker.scale_up_backlog = 1, 2, 1
    cfg.learner.lr = 1e-2

    summary = run(cfg)

    run_dir = Path(cfg.run_dir)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # Groups reached the rankers and the learner; versions advance by one per step.
    assert [r["weight_version"] for r in records] == [1, 2, 3]
    assert all(r["groups"] == 4 and r["samples"] == 16 for r in records)
    assert all(r["learner"]["rows"] > 0 or r["learner"]["groups_skipped_tied"] == 4 for r in records)
    # Each step samples with the version published after the previous step.
    assert [r["rollout_versions"] for r in records] == [[0], [1], [2]]
    assert summary["ranker"]["groups"] == 12 and summary["ranker"]["actors"] >= 1
    assert summary["ranker"]["scale_ups"] >= 1  # backlog 4 > 1 per actor: the pool grew
    assert [s["version"] for s in summary["rollout"]] == [3, 3]  # every rollout actor serves the newest
    for key in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["steps"] == 3 and summary["wall_s"] > 0
    assert "eval" in records[1] and "checkpoint" in records[1]
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["accuracy_after"] == summary["accuracy_after"]

    # The LoRA weights changed: the final adapter differs from the SFT warm start.
    sft = load_file(str(Path(cfg.sft.output_dir) / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(run_dir / "checkpoints" / "final" / "adapter" / "adapter_model.safetensors"))
    assert sft.keys() == final.keys()
    assert any(not torch.equal(sft[k], final[k]) for k in sft)
    assert (run_dir / "checkpoints" / "step_2" / "projector.safetensors").is_file()
