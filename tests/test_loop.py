"""The whole GRPO_rank loop on a real local Ray cluster, tiny sizes, a few steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from loop_checks import assert_versions_follow_updates, updated
from safetensors.torch import load_file

from rlaif_ray.config import Config, apply_overrides, config_from_dict
from rlaif_ray.launch import run
from rlaif_ray.sft import run_sft


def easy_task(train: str, out: Path, answer: str = "red") -> str:
    """The colour questions of ``train`` with one answer for all: learnable in a few RL steps."""
    rows = [json.loads(line) for line in Path(train).read_text().splitlines()]
    folder = str(Path(train).parent)
    easy = [
        {**row, "answer": answer, "video": str(Path(folder, row["video"]))}
        for row in rows
        if row.get("type") == "colour"
    ]
    out.write_text("".join(json.dumps(row) + "\n" for row in easy))
    return str(out)


def test_loop_runs_end_to_end(small_config: Config, tmp_path: Path) -> None:
    cfg = small_config
    # A short SFT on the real task teaches the answer words (each colour now and then) ...
    # (colour questions get a colour, "red" about one time in six).
    cfg.sft.steps, cfg.sft.eval_every, cfg.sft.batch_size = 100, 100, 16
    cfg.sft.lr, cfg.sft.warmup_steps = 2e-3, 0
    run_sft(cfg)
    # ... and RL starts from that checkpoint on a task that rewards one colour everywhere.
    cfg.model.path, cfg.sft.enabled = cfg.sft.output_dir, False
    cfg.data.train = easy_task(cfg.data.train, tmp_path / "easy_train.jsonl")
    cfg.rl.steps, cfg.rl.prompts_per_step, cfg.rl.group_size = 6, 8, 4
    cfg.rl.eval_every, cfg.rl.checkpoint_every, cfg.rl.eval_examples = 2, 2, 16
    cfg.rollout.num_actors = 2
    cfg.ranker.min_actors, cfg.ranker.max_actors, cfg.ranker.scale_up_backlog = 1, 2, 1
    # Large enough to learn in a few steps, small enough that no step wrecks the policy (5e-3 sent
    # the KL to ~20 in one step, and whether a later step then had every group tied depended on
    # the processor's floating point).
    cfg.learner.lr = 3e-3
    # Evaluations during the run on val (12 questions here), the final report once on test (16).
    val = tmp_path / "val12.jsonl"
    rows = [json.loads(line) for line in Path(cfg.data.val).read_text().splitlines()[:12]]
    folder = Path(cfg.data.val).parent
    val.write_text("".join(json.dumps({**row, "video": str(folder / row["video"])}) + "\n" for row in rows))
    cfg.data.val = str(val)

    summary = run(cfg)

    run_dir = Path(cfg.run_dir)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # Groups reached the rankers and the learner; each applied update publishes the next version
    # (a step whose groups all tie, which this easy task can reach, carries no signal and
    # publishes none), and each step samples with the version the step before it left.
    final_version = assert_versions_follow_updates(records)
    assert all(r["groups"] == 8 and r["samples"] == 32 for r in records)
    assert all(r["learner"]["rows"] > 0 for r in records if updated(r))
    # It learns: the answer rewarded on every question is sampled more and more often.
    sampled = [r["sampled_accuracy"] for r in records]
    assert sum(sampled[-3:]) / 3 >= sampled[0] + 0.25, sampled
    assert summary["ranker"]["groups"] == 48 and summary["ranker"]["actors"] >= 1
    assert summary["ranker"]["scale_ups"] >= 1  # backlog 4 > 1 per actor: the pool grew
    # Every rollout actor serves the newest version.
    assert summary["weight_version"] == final_version
    assert [s["version"] for s in summary["rollout"]] == [final_version] * 2
    assert [e["step"] for e in summary["evals"]] == [0, 2, 4, 6]
    assert summary["eval_split"] == "val" and {e["n"] for e in summary["evals"]} == {12}
    assert summary["test"]["n"] == 16 and 0 <= summary["test"]["accuracy"] <= summary["test"]["part_accuracy"]
    assert summary["steps"] == 6 and summary["wall_s"] > 0
    assert "eval" in records[1] and "checkpoint" in records[1]
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["accuracy_after"] == summary["accuracy_after"]

    # The LoRA weights changed: the final adapter differs from the SFT warm start.
    sft = load_file(str(Path(cfg.sft.output_dir) / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(run_dir / "checkpoints" / "final" / "adapter" / "adapter_model.safetensors"))
    assert sft.keys() == final.keys()
    assert any(not torch.equal(sft[k], final[k]) for k in sft)
    assert (run_dir / "checkpoints" / "step_2" / "projector.safetensors").is_file()


@pytest.mark.parametrize(
    "overrides",
    [
        ["learner.zero_stage=3", "learner.num_actors=2", "learner.zero3_persistence_threshold=0"],
        ["model.dtype=bfloat16"],
    ],
    ids=["zero3_two_learners", "bf16"],
)
def test_loop_with_paper_scale_settings(small_config: Config, overrides: list[str]) -> None:
    """A few steps with the settings of configs/paper_7b.yaml that the CPU can run."""
    cfg = config_from_dict(apply_overrides(small_config.to_dict(), overrides))
    cfg.sft.enabled = False
    cfg.rl.steps, cfg.rl.prompts_per_step, cfg.rl.group_size = 2, 4, 4
    cfg.rl.eval_every, cfg.rl.eval_examples = 2, 8
    cfg.learner.num_threads = 1
    summary = run(cfg)
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2
    final_version = assert_versions_follow_updates(records)
    assert all(r["learner"]["rows"] > 0 and math.isfinite(r["learner"]["loss"]) for r in records)
    assert summary["weight_version"] == final_version
    assert [s["version"] for s in summary["rollout"]] == [final_version]
    # The weights changed: the run starts from the base model, whose LoRA B matrices are zero.
    final = load_file(
        str(Path(cfg.run_dir) / "checkpoints" / "final" / "adapter" / "adapter_model.safetensors")
    )
    lora_b = [t for name, t in final.items() if "lora_B" in name]
    assert lora_b and any(bool(t.float().abs().sum() > 0) for t in lora_b)
    assert all(bool(torch.isfinite(t.float()).all()) for t in final.values())


def text_only(path: str, out: Path) -> str:
    """The questions of a split without their videos: a text-only task."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    out.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "video"}) + "\n" for row in rows))
    return str(out)


def test_loop_on_text_only_prompts(small_config: Config, tmp_path: Path) -> None:
    """Prompts without a video go through sampling, ranking, learning and evaluation."""
    cfg = small_config
    cfg.data.train = text_only(cfg.data.train, tmp_path / "text_train.jsonl")
    cfg.data.test = text_only(cfg.data.test, tmp_path / "text_test.jsonl")
    cfg.sft.steps, cfg.sft.eval_every, cfg.sft.batch_size = 5, 5, 8
    cfg.rl.steps, cfg.rl.prompts_per_step, cfg.rl.group_size = 2, 4, 4
    cfg.rl.eval_every, cfg.rl.eval_examples = 2, 8
    summary = run(cfg)
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and summary["eval_examples"] == 8
    assert all(r["groups"] == 4 and r["learner"]["rows"] > 0 for r in records)
    assert summary["rollout"][0]["skipped_videos"] == 0
    assert summary["weight_version"] == assert_versions_follow_updates(records)
