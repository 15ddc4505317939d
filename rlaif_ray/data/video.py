"""Reading frames from video files (decord) and writing small videos (PyAV).

``load_frames`` is the only way the project reads videos: it samples a fixed number of frames
evenly over the whole clip and turns every failure (missing, empty, truncated or undecodable
file) into :class:`VideoDecodeError`, so that callers can count and skip bad videos.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import decord
import numpy as np

# decord forwards FFmpeg's log lines to stderr; failures reach us as exceptions anyway.
decord.logging.set_level(decord.logging.QUIET)


class VideoDecodeError(Exception):
    """A video file that cannot be read; the message names the file and the cause."""


def _frame_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``size`` as ``(height, width)``, or None to keep the video's own size."""
    if size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"frame size must be positive, got {size!r}")
    return height, width


def sample_indices(num_available: int, num_frames: int) -> np.ndarray:
    """``num_frames`` evenly spaced frame indices over ``[0, num_available - 1]``.

    The first and last frames are always included; a clip with fewer frames than asked
    repeats frames.
    """
    return np.linspace(0, num_available - 1, num_frames).round().astype(np.int64)


def _compact(frame: np.ndarray) -> np.ndarray:
    """Drop the row padding decord 0.6 leaves in some frames.

    When FFmpeg pads an RGB row to ``linesize`` bytes and ``linesize`` is a multiple of the
    width (e.g. width 48 -> 192 bytes), decord hands out ``[H, W, linesize / W]`` instead of
    ``[H, W, 3]`` (and ``get_batch`` fails), so we read frame by frame and cut the padding.
    """
    height, width, channels = frame.shape
    if channels == 3:
        return frame
    return frame.reshape(height, width * channels)[:, : width * 3].reshape(height, width, 3)


def load_frames(
    path: str | os.PathLike[str], num_frames: int, size: int | tuple[int, int] | None = None
) -> np.ndarray:
    """Decode ``num_frames`` frames sampled evenly over the whole video.

    Args:
        path: a video file in any container/codec FFmpeg reads (mp4, webm, avi, ...).
        num_frames: how many frames to return (>= 1).
        size: resize every frame to ``size x size`` (int) or ``(height, width)``; None keeps
            the video's size.

    Returns:
        uint8 array ``[num_frames, height, width, 3]`` (RGB).

    Raises:
        VideoDecodeError: the file is missing, empty, truncated or cannot be decoded.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    hw = _frame_size(size)
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(
            f"{path}: no such file" if not path.exists() else f"{path}: not a regular file"
        )
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes)")

    height, width = hw if hw is not None else (-1, -1)
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height, num_threads=1)
        num_available = len(reader)
        if num_available == 0:
            raise VideoDecodeError(f"{path}: the video has no frames")
        indices = sample_indices(num_available, num_frames).tolist()
        decoded = {index: _compact(reader[index].asnumpy()) for index in sorted(set(indices))}
        frames = np.stack([decoded[index] for index in indices])
    except VideoDecodeError:
        raise
    except (decord.DECORDError, RuntimeError, ValueError, IndexError) as error:
        # decord's messages can run on with a C++ stack trace; the first line names the cause.
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VideoDecodeError(f"{path}: cannot decode video ({cause})") from error

    expected = (num_frames, *(hw if hw is not None else frames.shape[1:3]), 3)
    if frames.dtype != np.uint8 or frames.shape != expected:
        raise VideoDecodeError(f"{path}: decoder returned {frames.dtype} {frames.shape}, expected {expected}")
    return frames


def _pixel_format(codec: str, height: int, width: int) -> str:
    if codec == "mjpeg":
        return "yuvj420p"
    # libx264 rejects odd sizes in 4:2:0; full-resolution chroma keeps the exact size.
    if codec == "libx264" and (height % 2 or width % 2):
        return "yuv444p"
    return "yuv420p"


def write_video(
    path: str | os.PathLike[str], frames: np.ndarray, fps: int = 8, codec: str = "libx264"
) -> None:
    """Encode RGB frames into a video file; the container follows the file extension.

    Deterministic (single-threaded encoder): the same frames give the same decoded video.
    Tested codecs: ``libx264`` (mp4), ``mpeg4`` (mp4/avi), ``mjpeg`` (avi), ``libvpx`` and
    ``libvpx-vp9`` (webm). Odd frame sizes work; with libx264 they are stored as yuv444p,
    which FFmpeg-based readers decode but some hardware players do not.

    Args:
        path: output file, e.g. ``clip.mp4``.
        frames: uint8 array ``[T, H, W, 3]`` (RGB), T >= 1.
        fps: frames per second.
        codec: an FFmpeg encoder name available to PyAV.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T>=1, H, W, 3], got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        # libx264: small near-lossless files, fast (the synthetic task writes hundreds of them).
        options = {"preset": "ultrafast", "crf": "12"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width = width
        stream.height = height
        stream.pix_fmt = _pixel_format(codec, height, width)
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
