"""Decoded-frame store shared by SFT, evaluation, rollout and the learner.

Decoding is the slow part for small models, so decoded clips are kept (bounded, least recently
used first out). A video that fails to decode is remembered, skipped and counted: the run goes on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from rlaif_ray.data.video import VideoDecodeError, load_frames

log = logging.getLogger(__name__)


class FrameStore:
    """``uint8 [T, H, W, 3]`` frames per video path, decoded once with decord."""

    def __init__(self, num_frames: int, size: int | None = None, capacity: int = 4096) -> None:
        self.num_frames = num_frames
        self.size = size
        self.capacity = capacity
        self._frames: OrderedDict[str, np.ndarray] = OrderedDict()
        self.failures: dict[str, str] = {}

    def get(self, path: str) -> np.ndarray:
        """Frames of ``path``; raises VideoDecodeError (also on later calls) for a broken video."""
        if path in self.failures:
            raise VideoDecodeError(self.failures[path])
        if path in self._frames:
            self._frames.move_to_end(path)
            return self._frames[path]
        try:
            frames = load_frames(path, self.num_frames, self.size)
        except VideoDecodeError as exc:
            self.failures[path] = str(exc)
            log.warning("skipping video: %s", exc)
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

    @property
    def skipped_videos(self) -> int:
        return len(self.failures)
