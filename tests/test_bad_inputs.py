"""Bad videos met by the learner, and the bad-input settings (issue 9, item 3).

Videos that fail in load_frames / FrameStore: tests/test_video.py; in the rollout worker and
its evaluation: tests/test_rollout.py; bad data lines and check_data: tests/test_dataset.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_video import make_bad_video

from rlaif_ray.config import Config, ConfigError, load_config
from rlaif_ray.data.dataset import load_jsonl
from rlaif_ray.learner.worker import LearnerWorker
from rlaif_ray.rollout.worker import RolloutWorker


def test_learner_drops_and_counts_rows_whose_video_went_bad(small_config: Config, tmp_path: Path) -> None:
    """With ``learner.reencode_videos`` (the learner decodes and encodes the videos itself), a video
    that decoded for the rollout actor but not for the learner (deleted since, or not on the
    learner's node): its rows are dropped and counted, the step goes on with the rest. (By default
    the groups bring the rollout's encoder output and the learner decodes nothing:
    test_learner.py.)"""
    cfg = small_config
    cfg.rl.group_size, cfg.rl.prompts_per_step = 2, 4
    cfg.learner.reencode_videos = True
    groups = RolloutWorker(cfg, cfg.model.path).rollout(load_jsonl(cfg.data.train)[:4], step=1)
    for group in groups:
        group.ranks, group.rank_status = [0.0, 1.0], "ok"
    groups[0].video = str(tmp_path / "gone.mp4")
    groups[1].video = str(make_bad_video(tmp_path, "text"))
    learner = LearnerWorker(cfg, cfg.model.path)
    learner.setup()

    stats = learner.train_step(groups)

    assert stats["rows_bad_video"] == 2 * cfg.rl.group_size and stats["rows"] == 2 * cfg.rl.group_size
    assert stats["skipped_videos"] == 2
    assert stats["skipped_videos_missing"] == 1 and stats["skipped_videos_unreadable"] == 1
    assert stats["skipped_step"] == 0.0 and stats["version"] == 1.0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.max_bad_video_fraction=1.5", "a fraction in [0, 1]"),
        ("data.max_bad_video_fraction=-0.1", "a fraction in [0, 1]"),
        ("data.max_video_pixels=0", "an integer >= 1"),
    ],
)
def test_bad_input_settings_are_validated(override: str, expected: str) -> None:
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}' = {value}: expected {expected}")):
        load_config(None, [override])
