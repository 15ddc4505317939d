"""load_frames / write_video on real files of every container and codec we promise to read."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import av
import numpy as np
import pytest

from rlaif_ray.config import DataConfig
from rlaif_ray.data.frames import FrameStore
from rlaif_ray.data.video import VideoDecodeError, load_frames, probe_size, sample_indices, write_video

# Frame t is flat grey at level 10 + 20 t: the decoded level tells which frame was sampled.
LEVEL_STEP = 20


def level_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    levels = 10 + LEVEL_STEP * np.arange(num_frames, dtype=np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def decoded_indices(frames: np.ndarray) -> list[int]:
    """Which level_frames index each decoded frame shows (nearest level)."""
    means = frames.reshape(len(frames), -1).mean(axis=1)
    return np.round((means - 10) / LEVEL_STEP).astype(int).tolist()


def require_encoder(codec: str) -> None:
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")


FORMATS = [
    # (file name, codec, (height, width), fps)
    ("h264.mp4", "libx264", (48, 64), 8),
    ("h264_odd.mp4", "libx264", (33, 47), 8),
    ("mpeg4.mp4", "mpeg4", (33, 47), 7),
    ("vp8.webm", "libvpx", (33, 47), 13),
    ("vp9.webm", "libvpx-vp9", (30, 41), 25),
    ("mpeg4.avi", "mpeg4", (47, 33), 8),
    ("mjpeg.avi", "mjpeg", (35, 29), 11),
]


@pytest.mark.parametrize(("name", "codec", "hw", "fps"), FORMATS, ids=[f[0] for f in FORMATS])
def test_decodes_every_container_and_codec(
    tmp_path: Path, name: str, codec: str, hw: tuple[int, int], fps: int
):
    require_encoder(codec)
    path = tmp_path / name
    write_video(path, level_frames(9, *hw), fps=fps, codec=codec)

    frames = load_frames(path, 5)

    assert frames.dtype == np.uint8
    assert frames.shape == (5, *hw, 3)
    assert decoded_indices(frames) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize(("size", "hw"), [(32, (32, 32)), ((17, 23), (17, 23)), ((96, 80), (96, 80))])
def test_resizes_to_the_requested_size(tmp_path: Path, size: int | tuple[int, int], hw: tuple[int, int]):
    path = tmp_path / "clip.mp4"
    write_video(path, level_frames(6, 40, 54))

    frames = load_frames(path, 6, size=size)

    assert frames.shape == (6, *hw, 3)
    assert decoded_indices(frames) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("width", [16, 24, 48, 72, 96, 160])
def test_widths_where_decord_pads_rows(tmp_path: Path, width: int):
    # decord 0.6 returns padded rows as extra "channels" for these widths (see video._compact).
    frames = level_frames(4, 20, width)
    frames[:, :, : width // 2, 0] = 255
    path = tmp_path / "clip.mp4"
    write_video(path, frames)

    for decoded in (load_frames(path, 4), load_frames(path, 4, size=(20, width))):
        assert decoded.shape == (4, 20, width, 3)
        right_half = decoded[:, :, width // 2 + 4 :]
        assert decoded_indices(right_half) == [0, 1, 2, 3]
        assert decoded[:, 4:-4, 2 : width // 2 - 4, 0].min() > 230


def test_short_clip_repeats_frames(tmp_path: Path):
    path = tmp_path / "short.mp4"
    write_video(path, level_frames(3, 32, 32))

    frames = load_frames(path, 8)

    assert frames.shape == (8, 32, 32, 3)
    assert decoded_indices(frames) == [0, 0, 1, 1, 1, 1, 2, 2]


def test_single_frame_request_takes_the_first_frame(tmp_path: Path):
    path = tmp_path / "clip.mp4"
    write_video(path, level_frames(7, 32, 32))

    assert decoded_indices(load_frames(path, 1)) == [0]


def test_sample_indices_cover_the_clip_evenly():
    assert sample_indices(100, 4).tolist() == [0, 33, 66, 99]
    assert sample_indices(1, 3).tolist() == [0, 0, 0]


def test_keeps_rgb_channel_order(tmp_path: Path):
    frames = np.zeros((4, 32, 48, 3), dtype=np.uint8)
    frames[:, :, :16, 0] = 220  # red | green | blue stripes
    frames[:, :, 16:32, 1] = 220
    frames[:, :, 32:, 2] = 220
    path = tmp_path / "rgb.mp4"
    write_video(path, frames)

    decoded = load_frames(path, 2).astype(int)

    stripe_means = [decoded[:, 4:-4, x0 + 3 : x0 + 13].mean(axis=(0, 1, 2)) for x0 in (0, 16, 32)]
    for channel, mean in enumerate(stripe_means):
        assert mean[channel] > 190
        assert np.delete(mean, channel).max() < 40


def test_decoding_is_deterministic(tmp_path: Path):
    frames = np.random.default_rng(0).integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    write_video(tmp_path / "a.mp4", frames)
    write_video(tmp_path / "b.mp4", frames)

    first = load_frames(tmp_path / "a.mp4", 4, size=24)

    np.testing.assert_array_equal(first, load_frames(tmp_path / "a.mp4", 4, size=24))
    np.testing.assert_array_equal(first, load_frames(tmp_path / "b.mp4", 4, size=24))


def test_rejects_non_positive_num_frames(tmp_path: Path):
    path = tmp_path / "clip.mp4"
    write_video(path, level_frames(3, 16, 16))
    with pytest.raises(ValueError, match="num_frames"):
        load_frames(path, 0)


# Every kind of unusable video file, and the reason load_frames gives for it.
BAD_VIDEOS = {
    "missing": "missing",
    "directory": "not_a_file",
    "empty": "empty",
    "truncated": "unreadable",  # cut before its index (mp4 writes it last)
    "garbage": "unreadable",
    "text": "unreadable",  # a text file named .mp4
    "audio_only": "no_video_stream",
    "zero_frames": "no_frames",
    "truncated_frames": "decode_failed",  # index first (faststart), cut inside the frame data
    "huge": "too_large",  # 4000 x 3000, above the default data.max_video_pixels
}


def _noise(num_frames: int) -> np.ndarray:
    # Noise compresses badly: the file is large, its index (moov) far from the start.
    return np.random.default_rng(1).integers(0, 256, size=(num_frames, 64, 64, 3), dtype=np.uint8)


def _write_with_av(path: Path, codec: str, frames: np.ndarray, options: dict[str, str] | None = None) -> None:
    """Write frames (possibly none, which write_video refuses) with container options."""
    with av.open(str(path), mode="w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _write_audio_only(path: Path) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())


def make_bad_video(folder: Path, kind: str) -> Path:
    """A real file of one of the BAD_VIDEOS kinds, at ``folder / bad_<kind>.<ext>``."""
    path = folder / f"bad_{kind}.{'avi' if kind == 'zero_frames' else 'mp4'}"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        write_video(folder / "whole.mp4", _noise(20))
        data = (folder / "whole.mp4").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(2).integers(0, 256, size=20_000, dtype=np.uint8).tobytes())
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "audio_only":
        _write_audio_only(path)
    elif kind == "zero_frames":
        _write_with_av(path, "mpeg4", _noise(0))
    elif kind == "truncated_frames":
        _write_with_av(folder / "faststart.mp4", "libx264", _noise(20), {"movflags": "faststart"})
        data = (folder / "faststart.mp4").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "huge":
        frames = np.zeros((2, 3000, 4000, 3), dtype=np.uint8)
        frames[1] = 200
        write_video(path, frames)
    elif kind != "missing":
        raise ValueError(f"unknown bad video kind {kind!r}")
    return path


@pytest.mark.parametrize("kind", list(BAD_VIDEOS))
def test_bad_files_raise_video_decode_error_naming_the_file_and_reason(tmp_path: Path, kind: str):
    path = make_bad_video(tmp_path, kind)

    with pytest.raises(VideoDecodeError) as info:
        load_frames(path, 4, size=32, max_pixels=DataConfig.max_video_pixels)

    assert str(path) in str(info.value)
    assert info.value.reason == BAD_VIDEOS[kind], str(info.value)
    # The reason survives pickling (errors cross processes under Ray).
    assert pickle.loads(pickle.dumps(info.value)).reason == BAD_VIDEOS[kind]


def test_huge_video_is_refused_before_decoding_and_decodes_without_the_limit(tmp_path: Path):
    path = make_bad_video(tmp_path, "huge")
    assert probe_size(path) == (3000, 4000)
    with pytest.raises(
        VideoDecodeError, match=r"4000x3000 frames \(12000000 pixels\).*refused before decoding"
    ):
        load_frames(path, 2, size=16, max_pixels=4000 * 3000 - 1)
    # The file itself is fine: at the limit it decodes.
    assert load_frames(path, 2, size=16, max_pixels=4000 * 3000).shape == (2, 16, 16, 3)


def test_frame_store_warns_once_per_video_and_counts_by_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    good = tmp_path / "good.mp4"
    write_video(good, level_frames(4, 32, 32))
    bad = {
        kind: str(make_bad_video(tmp_path, kind)) for kind in ("missing", "text", "garbage", "zero_frames")
    }
    store = FrameStore(4, 16)

    with caplog.at_level(logging.WARNING, logger="rlaif_ray.data.frames"):
        for _ in range(3):  # every video met three times
            assert store.for_example(str(good))[0] and store.for_example(None) == (True, None)
            for path in bad.values():
                assert store.for_example(path) == (False, None)
            with pytest.raises(VideoDecodeError) as info:
                store.get(bad["text"])
            assert info.value.reason == "unreadable"

    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == len(bad), warnings  # once per video, not once per use
    for kind, path in bad.items():
        assert sum(path in w and f"({BAD_VIDEOS[kind]})" in w for w in warnings) == 1
    assert store.skipped_videos == 4
    assert store.skipped_by_reason == {"missing": 1, "no_frames": 1, "unreadable": 2}
    assert store.reason(bad["missing"]) == "missing" and store.reason(str(good)) is None


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 8, 8, 3), dtype=np.float32),
        np.zeros((8, 8, 3), dtype=np.uint8),
        np.zeros((2, 8, 8, 4), dtype=np.uint8),
        np.zeros((0, 8, 8, 3), dtype=np.uint8),
    ],
    ids=["float", "3d", "rgba", "no-frames"],
)
def test_write_video_rejects_bad_frames(tmp_path: Path, frames: np.ndarray):
    with pytest.raises(ValueError, match="frames"):
        write_video(tmp_path / "x.mp4", frames)
