"""Reading frames from video files (decord) and writing small videos (PyAV).

``load_frames`` is the only way the project reads videos: it samples a fixed number of frames
evenly over the whole clip and turns every failure (missing, empty, truncated, not a video, no
frames, too large, undecodable) into :class:`VideoDecodeError`, whose ``reason`` is one of
:data:`REASONS`, so that callers can count and skip bad videos by reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import av
import decord
import numpy as np

# decord forwards FFmpeg's log lines to stderr; failures reach us as exceptions anyway.
decord.logging.set_level(decord.logging.QUIET)

# Why a video cannot be used, as counted in the metrics (``FrameStore.skipped_by_reason``).
REASONS = (
    "missing",  # no such file
    "not_a_file",  # a directory or another non-regular file
    "empty",  # 0 bytes
    "unreadable",  # FFmpeg cannot open it as a video: truncated before its index, or not a video
    "no_video_stream",  # a media file without a video stream (e.g. audio only)
    "no_frames",  # a video stream without a single frame
    "too_large",  # more pixels per frame than allowed: refused before decoding
    "decode_failed",  # opens, but its frames do not decode (e.g. truncated inside the frame data)
)


class VideoDecodeError(Exception):
    """A video file that cannot be read; the message names the file and the cause.

    ``reason`` is one of :data:`REASONS`.
    """

    def __init__(self, message: str, reason: str = "decode_failed") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown video failure reason {reason!r} (known: {REASONS})")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[VideoDecodeError], tuple[str, str]]:
        # Exceptions pickle their args only: keep the reason when one crosses a process (Ray).
        return type(self), (str(self), self.reason)


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


def _first_line(error: BaseException) -> str:
    """The cause in an FFmpeg/decord error: its first line (decord's can run on with a C++ stack
    trace) without decord's ``[time] source.cc:line:`` prefix, or PyAV's ``strerror`` without
    the errno and file name around it."""
    text = getattr(error, "strerror", None) or str(error).strip()
    line = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text.splitlines()[0]) if text else ""
    return line or type(error).__name__


def _check_file(path: Path) -> None:
    """Raise VideoDecodeError unless ``path`` is a non-empty regular file."""
    if not path.is_file():
        if path.exists():
            raise VideoDecodeError(f"{path}: not a regular file", "not_a_file")
        raise VideoDecodeError(f"{path}: no such file", "missing")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes)", "empty")


def probe_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(height, width)`` of the largest video stream, from the container's headers (PyAV).

    Reads no frame data beyond what FFmpeg needs to identify the streams, so a huge video can be
    refused before it is decoded. Raises VideoDecodeError (``unreadable``, ``no_video_stream``).
    """
    try:
        with av.open(str(path)) as container:
            sizes = [(s.codec_context.height, s.codec_context.width) for s in container.streams.video]
    except (av.FFmpegError, OSError) as error:
        raise VideoDecodeError(
            f"{path}: FFmpeg cannot read it as a video ({_first_line(error)}): truncated, or not a video file",
            "unreadable",
        ) from error
    if not sizes:
        raise VideoDecodeError(
            f"{path}: no video stream (audio only, or an empty media file)", "no_video_stream"
        )
    return max(sizes, key=lambda hw: hw[0] * hw[1])


def _has_no_frames(path: Path) -> bool:
    """True when the first video stream decodes to the end without a single frame (PyAV)."""
    try:
        with av.open(str(path)) as container:
            return next(container.decode(video=0), None) is None
    except (av.FFmpegError, OSError):
        return False  # data that fails to decode: a decoding failure, not an empty stream


def _decode(path: Path, num_frames: int, hw: tuple[int, int] | None) -> np.ndarray:
    """``num_frames`` evenly sampled frames via decord; every failure as VideoDecodeError."""
    height, width = hw if hw is not None else (-1, -1)
    no_frames = VideoDecodeError(f"{path}: the video has no frames", "no_frames")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height, num_threads=1)
        num_available = len(reader)
        if num_available == 0:
            raise no_frames
        indices = sample_indices(num_available, num_frames).tolist()
        decoded = {index: _compact(reader[index].asnumpy()) for index in sorted(set(indices))}
        return np.stack([decoded[index] for index in indices])
    except VideoDecodeError:
        raise
    except (decord.DECORDError, RuntimeError, ValueError, IndexError) as error:
        # decord fails on a stream without frames (e.g. an empty avi) before it can count them.
        if _has_no_frames(path):
            raise no_frames from error
        raise VideoDecodeError(
            f"{path}: cannot decode video ({_first_line(error)})", "decode_failed"
        ) from error


def load_frames(
    path: str | os.PathLike[str],
    num_frames: int,
    size: int | tuple[int, int] | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Decode ``num_frames`` frames sampled evenly over the whole video.

    Args:
        path: a video file in any container/codec FFmpeg reads (mp4, webm, avi, ...).
        num_frames: how many frames to return (>= 1).
        size: resize every frame to ``size x size`` (int) or ``(height, width)``; None keeps
            the video's size.
        max_pixels: refuse, before decoding, a video whose frames have more than this many
            pixels (height x width; FFmpeg decodes every frame at full size, whatever ``size``);
            None: no limit.

    Returns:
        uint8 array ``[num_frames, height, width, 3]`` (RGB).

    Raises:
        VideoDecodeError: the file is missing, empty, truncated, not a video, has no frames, is
            larger than ``max_pixels`` or cannot be decoded (``reason`` says which).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    hw = _frame_size(size)
    path = Path(path)
    _check_file(path)
    height, width = probe_size(path)
    if max_pixels is not None and height * width > max_pixels:
        raise VideoDecodeError(
            f"{path}: {width}x{height} frames ({height * width} pixels) exceed the limit of {max_pixels} "
            "pixels per frame (data.max_video_pixels); refused before decoding",
            "too_large",
        )
    frames = _decode(path, num_frames, hw)
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
