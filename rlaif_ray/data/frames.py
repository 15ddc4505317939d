"""Decoded-frame store shared by SFT, evaluation, rollout and the learner.

Decoding is the slow part for small models, so decoded clips are kept (bounded, least recently
used first out). A video that cannot be used is remembered, warned about once (naming the file
and the problem), skipped and counted by reason (``VideoDecodeError.reason``): the run goes on.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict

import numpy as np

from rlaif_ray.config import DataConfig
from rlaif_ray.data.video import VideoDecodeError, load_frames

log = logging.getLogger(__name__)


class BadVideoFractionError(RuntimeError):
    """Too many of a batch's videos cannot be used (``data.max_bad_video_fraction``): the run stops."""


class FrameStore:
    """``uint8 [T, H, W, 3]`` frames per video path, decoded once with decord.

    Args:
        num_frames: frames sampled per video.
        size: frame side after resizing (None: the video's own size).
        capacity: decoded videos kept in memory.
        max_pixels: videos with more pixels per frame are refused before decoding
            (``data.max_video_pixels``; None: no limit).
    """

    def __init__(
        self,
        num_frames: int,
        size: int | None = None,
        capacity: int = 4096,
        max_pixels: int | None = DataConfig.max_video_pixels,
    ) -> None:
        self.num_frames = num_frames
        self.size = size
        self.capacity = capacity
        self.max_pixels = max_pixels
        self._frames: OrderedDict[str, np.ndarray] = OrderedDict()
        self.failures: dict[str, VideoDecodeError] = {}

    def get(self, path: str) -> np.ndarray:
        """Frames of ``path``; raises VideoDecodeError (also on later calls) for a broken video."""
        if path in self.failures:
            known = self.failures[path]
            raise VideoDecodeError(str(known), known.reason)
        if path in self._frames:
            self._frames.move_to_end(path)
            return self._frames[path]
        try:
            frames = load_frames(path, self.num_frames, self.size, self.max_pixels)
        except VideoDecodeError as exc:
            self.failures[path] = exc
            log.warning("skipping video (%s): %s", exc.reason, exc)
            raise
        self._frames[path] = frames
        if len(self._frames) > self.capacity:
            self._frames.popitem(last=False)
        return frames

    def try_get(self, path: str) -> np.ndarray | None:
        """Frames of ``path``, or None (counted in ``failures``) when it cannot be decoded."""
        try:
            return self.get(path)
        except VideoDecodeError:
            return None

    def for_example(self, video: str | None) -> tuple[bool, np.ndarray | None]:
        """(usable, frames) of an example's video: a text-only example (``video`` None) is usable
        without frames; a video that does not decode is not usable (and counted)."""
        if video is None:
            return True, None
        frames = self.try_get(video)
        return frames is not None, frames

    def reason(self, path: str) -> str | None:
        """Why ``path`` could not be used (a ``VideoDecodeError.reason``), or None if it could."""
        failure = self.failures.get(path)
        return None if failure is None else failure.reason

    @property
    def skipped_videos(self) -> int:
        """Distinct videos that could not be used so far."""
        return len(self.failures)

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        """Distinct videos that could not be used so far, per reason (only reasons seen)."""
        return dict(sorted(Counter(f.reason for f in self.failures.values()).items()))
