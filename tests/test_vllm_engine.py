"""The vLLM rollout engine, run for real with vLLM's CPU build, against the transformers engine.

One vLLM engine is built per module (~30 s). The checkpoint (``colour_checkpoint``) names several
colours, so that answers depend on the video and on the adapter, and a run that ignored either
would fail the controls.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import TEST_VISUAL_TOKENS
from loop_checks import assert_versions_follow_updates

from rlaif_ray.config import Config, load_config
from rlaif_ray.data.dataset import VideoQAExample, load_jsonl
from rlaif_ray.data.frames import FrameStore
from rlaif_ray.launch import Trainer, prepare_run, warm_start
from rlaif_ray.models.policy import VideoLMPolicy
from rlaif_ray.rollout import vllm_engine  # `make install` puts vLLM in: never skipped
from rlaif_ray.rollout.engine import HFEngine

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def vllm_config(synthetic_dir: Path, model_dir: Path, work: Path, *overrides: str) -> Config:
    return load_config(
        str(REPO / "configs" / "default.yaml"),
        [
            f"data.train={synthetic_dir / 'train.jsonl'}",
            f"data.val={synthetic_dir / 'val.jsonl'}",
            f"data.test={synthetic_dir / 'test.jsonl'}",
            "data.synthetic_dir=null",
            f"model.path={model_dir}",
            TEST_VISUAL_TOKENS,  # the colour checkpoint's
            "model.build_tiny_if_missing=false",
            "sft.enabled=false",
            "rollout.engine=vllm",
            "rollout.vllm_enforce_eager=true",
            f"rollout.adapter_dir={work / 'adapters'}",
            f"run_dir={work / 'run'}",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def colour_examples(synthetic_dir: Path) -> list[VideoQAExample]:
    examples = [ex for ex in load_jsonl(synthetic_dir / "test.jsonl") if ex.type == "colour"]
    assert len(examples) >= 16
    return examples[:16]


@pytest.fixture(scope="module")
def engines(synthetic_dir: Path, colour_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """(vLLM engine, transformers engine, config) on the same checkpoint."""
    cfg = vllm_config(synthetic_dir, colour_checkpoint, tmp_path_factory.mktemp("vllm"))
    engine = vllm_engine.VLLMEngine(cfg, str(colour_checkpoint))
    yield engine, HFEngine(cfg, str(colour_checkpoint)), cfg
    del engine


def inputs(examples: list[VideoQAExample], size: int) -> tuple[list[np.ndarray], list[str]]:
    store = FrameStore(8, size)
    return [store.get(ex.video) for ex in examples], [ex.question for ex in examples]


def test_greedy_answers_equal_transformers_and_need_adapter_and_video(engines, colour_examples) -> None:
    engine, hf, _ = engines
    frames, questions = inputs(colour_examples, engine.image_size)
    served = engine.sample(frames, questions, 1, greedy=True)
    assert served.token_ids == hf.sample(frames, questions, 1, greedy=True).token_ids
    assert len(set(served.texts)) >= 3, served.texts  # the answers depend on the video

    blank = engine.sample([np.zeros_like(f) for f in frames], questions, 1, greedy=True)
    assert blank.token_ids != served.token_ids
    adapter, engine.lora_request = engine.lora_request, None  # the base LM, same projector
    try:
        base = engine.sample(frames, questions, 1, greedy=True)
    finally:
        engine.lora_request = adapter
    assert base.token_ids != served.token_ids


def test_text_only_prompts_equal_transformers(engines, colour_examples) -> None:
    engine, hf, _ = engines
    frames, questions = inputs(colour_examples[:4], engine.image_size)
    mixed = [frames[0], None, frames[2], None]  # two text-only questions among video ones
    served = engine.sample(mixed, questions, 1, greedy=True)
    assert served.token_ids == hf.sample(mixed, questions, 1, greedy=True).token_ids


def test_sampled_logprobs_equal_the_learners(engines, colour_examples, colour_checkpoint: Path) -> None:
    """vLLM's log-probs of sampled tokens are the learner's: the first importance ratio is 1."""
    engine, _, cfg = engines
    group = 4
    frames, questions = inputs(colour_examples[:8], engine.image_size)
    samples = engine.sample(frames, questions, group)
    assert len(samples.token_ids) == 8 * group
    policy = VideoLMPolicy.from_folder(colour_checkpoint, cfg.model)
    policy.eval()
    with torch.no_grad():
        pixels = torch.stack([policy.preprocess(f) for f in frames])
        features = policy.visual_features(pixels).repeat_interleave(group, dim=0)
        prompts = [policy.prompt_ids(q) for q in questions for _ in range(group)]
        logprobs, mask, _ = policy.answer_logprobs(
            None, prompts, samples.token_ids, temperature=cfg.rollout.temperature, features=features
        )
    for i, row in enumerate(samples.logprobs):
        assert mask[i].sum().item() == len(row)
        diff = (logprobs[i, : len(row)] - torch.tensor(row)).abs().max().item()
        assert diff <= 1e-4, (i, diff)
    # Each prompt's frozen-encoder output comes with the samples (what the learner then uses).
    assert len(samples.visual_features) == 8
    torch.testing.assert_close(torch.stack(samples.visual_features), features[::group], rtol=0, atol=1e-5)


def test_prefix_caching_is_on(engines) -> None:
    engine, _, _ = engines
    assert engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is True


def test_new_versions_are_served_and_old_adapters_evicted(engines, colour_examples) -> None:
    engine, hf, cfg = engines
    frames, questions = inputs(colour_examples, engine.image_size)
    before = engine.sample(frames, questions, 1, greedy=True).token_ids
    state = hf.policy.trainable_state_dict()
    gen = torch.Generator().manual_seed(1)

    def perturbed() -> dict[str, torch.Tensor]:
        return {
            k: v + torch.randn(v.shape, generator=gen) * 0.5 if "lm_head.lora_B" in k else v
            for k, v in state.items()
        }

    first = perturbed()
    engine.load_weights(1, first)
    hf.load_weights(1, first)
    after = engine.sample(frames, questions, 1, greedy=True).token_ids
    assert after != before
    assert after == hf.sample(frames, questions, 1, greedy=True).token_ids
    keep = cfg.rl.max_staleness + 1
    for version in range(2, 52):
        engine.load_weights(version, perturbed())
        assert len(engine.loaded_loras()) <= keep
        assert len(list(engine.adapters.dir.iterdir())) <= keep
    assert engine.version == 51 and engine.lora_request.lora_int_id in engine.loaded_loras()


def vllm_loop_config(
    synthetic_dir: Path, colour_checkpoint: Path, tmp_path: Path, steps: int, every: int
) -> Config:
    """A short loop with 2 vLLM rollout actors on the colour questions (answers the warm start gets
    right at times), evaluating and checkpointing every ``every`` steps."""
    return vllm_config(
        synthetic_dir,
        colour_checkpoint,
        tmp_path,
        f"data.train={colour_checkpoint.parent / 'colour_train.jsonl'}",
        f"rl.steps={steps}",
        "rl.prompts_per_step=4",
        "rl.group_size=4",
        f"rl.eval_every={every}",
        f"rl.checkpoint_every={every}",
        "rl.eval_examples=8",
        "rollout.num_actors=2",
        "rollout.num_threads=1",
        "learner.num_threads=1",
        "learner.lr=1e-2",
    )


def test_loop_with_vllm_rollouts(synthetic_dir: Path, colour_checkpoint: Path, tmp_path: Path) -> None:
    """A few GRPO_rank steps with vLLM rollout actors: versions advance, every actor serves the
    learner's latest weights (its greedy answers equal the transformers engine's on them), and those
    weights were learned (their greedy answers differ from the warm start's on some prompts)."""
    cfg = vllm_loop_config(synthetic_dir, colour_checkpoint, tmp_path, steps=3, every=2)
    ray.init(num_cpus=4, resources={"ranker": 2}, include_dashboard=False)
    try:
        cfg, run_dir, model_dir = prepare_run(cfg)
        trainer = Trainer(cfg, run_dir, warm_start(cfg, model_dir))
        summary = trainer.run()
        # The run removed the adapter folders its engines wrote (each engine, a folder of its own).
        leftover = [p for p in Path(cfg.rollout.adapter_dir).rglob("*") if p.is_file()]
        assert not leftover, leftover[:3]
        examples = [ex for ex in load_jsonl(cfg.data.test) if ex.type == "colour"][:8]
        served = ray.get([actor.greedy_answers.remote(examples) for actor in trainer.rollouts])
    finally:
        ray.shutdown()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final_version = assert_versions_follow_updates(records)
    assert summary["steps"] == 3 and summary["weight_version"] == final_version
    assert [s["version"] for s in summary["rollout"]] == [final_version] * 2
    assert all(r["learner"]["rows"] > 0 for r in records)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    final = run_dir / "checkpoints" / "final"
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    reference = HFEngine(cfg, str(final))
    frames, questions = inputs(examples, reference.image_size)
    expected = reference.sample(frames, questions, 1, greedy=True).token_ids
    assert served == [expected, expected]
    # What they serve is learned: the final weights answer some prompts otherwise than the start.
    wider = [ex for ex in load_jsonl(cfg.data.test) if ex.type == "colour"][:32]
    frames, questions = inputs(wider, reference.image_size)
    start = HFEngine(cfg, str(colour_checkpoint)).sample(frames, questions, 1, greedy=True).token_ids
    assert reference.sample(frames, questions, 1, greedy=True).token_ids != start


def test_a_vllm_rollout_actor_killed_mid_run_serves_the_newest_version_again(
    synthetic_dir: Path, colour_checkpoint: Path, tmp_path: Path
) -> None:
    """Ray restarts a killed vLLM rollout actor; its fresh engine names adapters by version from
    scratch, and the driver sends it the newest weights before its prompts again: no group is
    sampled by old weights, and at the end both actors hold the final version."""
    from test_faults import assert_accounted, kill_when

    cfg = vllm_loop_config(synthetic_dir, colour_checkpoint, tmp_path, steps=4, every=100)
    ray.init(num_cpus=4, resources={"ranker": 2}, include_dashboard=False)
    try:
        cfg, run_dir, model_dir = prepare_run(cfg)
        trainer = Trainer(cfg, run_dir, warm_start(cfg, model_dir))
        killer = kill_when(cfg, 2, "rollout-1")
        summary = trainer.run()
        killer.join()
    finally:
        ray.shutdown()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final_version = assert_versions_follow_updates(records)
    assert summary["steps"] == 4 and summary["faults"]["rollout_restarts"] >= 1
    assert all(lag == 0 for r in records for lag in r["group_lags"])
    assert [s["version"] for s in summary["rollout"]] == [final_version] * 2
    assert_accounted(summary)
