"""Build what the built-in default needs when it is missing: the synthetic data and the tiny model.

Real runs point ``data.*`` and ``model.path`` at existing files and never reach the builders.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rlaif_ray.config import Config

log = logging.getLogger(__name__)


def ensure_data(cfg: Config) -> None:
    """Generate the synthetic video-QA task when the configured JSONL files are missing."""
    paths = [Path(cfg.data.train), Path(cfg.data.val), Path(cfg.data.test)]
    if all(p.is_file() for p in paths):
        return
    if cfg.data.synthetic_dir is None:
        missing = [str(p) for p in paths if not p.is_file()]
        raise FileNotFoundError(f"data files {missing} not found and data.synthetic_dir is null")
    from rlaif_ray.data.synthetic import generate

    log.info("generating %d synthetic videos into %s", cfg.data.synthetic_videos, cfg.data.synthetic_dir)
    generate(
        cfg.data.synthetic_dir,
        cfg.data.synthetic_videos,
        cfg.data.synthetic_seed,
        val_frac=cfg.data.synthetic_val_frac,
        test_frac=cfg.data.synthetic_test_frac,
        question_types=cfg.data.synthetic_question_types,
        label_fraction=cfg.data.synthetic_label_fraction,
    )
    still_missing = [str(p) for p in paths if not p.is_file()]
    if still_missing:
        raise FileNotFoundError(
            f"data files {still_missing} not found after generating into {cfg.data.synthetic_dir}"
        )


def ensure_model(cfg: Config) -> Path:
    """The model folder of ``model.path``; the tiny default is built there when missing and allowed."""
    path = Path(cfg.model.path)
    if (path / "policy.json").is_file():
        return path
    if not cfg.model.build_tiny_if_missing:
        raise FileNotFoundError(
            f"model.path {str(path)!r} holds no policy.json and model.build_tiny_if_missing is false"
        )
    from rlaif_ray.models.tiny import build_tiny

    log.info("building the tiny default model into %s", path)
    return build_tiny(path, seed=cfg.seed)
