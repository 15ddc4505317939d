"""Shared fixtures: a small synthetic data set and the tiny model, built once per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rlaif_ray.config import Config, load_config  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 synthetic videos (train/val/test JSONL), seed 0."""
    from rlaif_ray.data.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(out, 240, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny model folder, built from config."""
    from rlaif_ray.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0)


# The visual tokens the loop, fault and engine tests were calibrated with (their learning-rate
# and step choices, and the colour checkpoint's mix of right and wrong answers): the default is
# now "motion", which the policy tests, the config test and the metrics run cover.
TEST_VISUAL_TOKENS = "model.visual_tokens=patch"


DEFAULT_YAML = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")


def session_data_and_model(synthetic_dir: Path, tiny_model_dir: Path) -> list[str]:
    """Overrides that point the default config at the session's data and tiny model."""
    return [
        f"data.train={synthetic_dir / 'train.jsonl'}",
        f"data.val={synthetic_dir / 'val.jsonl'}",
        f"data.test={synthetic_dir / 'test.jsonl'}",
        "data.synthetic_dir=null",
        f"model.path={tiny_model_dir}",
        "model.build_tiny_if_missing=false",
    ]


@pytest.fixture
def small_config(synthetic_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> Config:
    """The default config pointed at the session's data and model, with small sizes."""
    return load_config(
        DEFAULT_YAML,
        [
            TEST_VISUAL_TOKENS,
            *session_data_and_model(synthetic_dir, tiny_model_dir),
            f"sft.output_dir={tmp_path / 'sft'}",
            f"run_dir={tmp_path / 'run'}",
        ],
    )


@pytest.fixture(scope="session")
def colour_checkpoint(
    synthetic_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An SFT checkpoint (adapter + projector) whose greedy answers depend on the video.

    Trained on the colour questions only, until it names several colours (about 15 s): answers
    that differ between videos and from blank frames make engine comparisons meaningful.
    """
    from rlaif_ray.sft import run_sft

    rows = [json.loads(line) for line in (synthetic_dir / "train.jsonl").read_text().splitlines()]
    colour = [{**row, "video": str(synthetic_dir / row["video"])} for row in rows if row["type"] == "colour"]
    out = tmp_path_factory.mktemp("colour_sft")
    train = out / "colour_train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in colour))
    cfg = load_config(
        DEFAULT_YAML,
        [
            *session_data_and_model(synthetic_dir, tiny_model_dir),
            f"data.train={train}",
            TEST_VISUAL_TOKENS,
            f"sft.output_dir={out / 'checkpoint'}",
            "sft.steps=120",
            "sft.eval_every=120",
            "sft.batch_size=16",
            "sft.lr=1e-3",
            "sft.warmup_steps=0",
        ],
    )
    run_sft(cfg)
    return out / "checkpoint"


@pytest.fixture(scope="session")
def default_warm_start(
    synthetic_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Config:
    """The default config (motion tokens) after an SFT warm start with the default SFT settings,
    shortened to 30 steps (an adapter and a projector: the learners then hold a reference adapter)."""
    out = tmp_path_factory.mktemp("default_warm_start")
    overrides = [
        f"sft.output_dir={out / 'sft'}",
        "sft.steps=30",
        "sft.eval_every=30",
        f"run_dir={out / 'run'}",
    ]
    cfg = load_config(DEFAULT_YAML, [*session_data_and_model(synthetic_dir, tiny_model_dir), *overrides])
    assert cfg.model.visual_tokens == "motion"
    from rlaif_ray.sft import run_sft

    run_sft(cfg)
    cfg.model.path, cfg.sft.enabled = cfg.sft.output_dir, False
    return cfg


def start_learners(cfg: Config, world_size: int = 2) -> list:
    """``world_size`` learner actors (half a CPU each) of ``cfg``, set up together; Ray must be up."""
    import ray

    from rlaif_ray.learner.worker import LearnerWorker

    actor_cls = ray.remote(LearnerWorker)
    learners = [
        actor_cls.options(num_cpus=0.5).remote(cfg, cfg.model.path, rank, world_size)
        for rank in range(world_size)
    ]
    addr, port = ray.get(learners[0].address.remote())
    ray.get([learner.setup.remote(addr, port) for learner in learners], timeout=300)
    return learners
