"""load_frames / write_video on real files of every container and codec we promise to read."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from rlaif_ray.data.video import VideoDecodeError, load_frames, sample_indices, write_video

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


def _valid_mp4_bytes(tmp_path: Path) -> bytes:
    # Noise compresses badly, so the file is large and its index (moov, written last) is far
    # from the start.
    frames = np.random.default_rng(1).integers(0, 256, size=(20, 64, 64, 3), dtype=np.uint8)
    write_video(tmp_path / "valid.mp4", frames)
    return (tmp_path / "valid.mp4").read_bytes()


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "garbage", "text", "directory"])
def test_bad_files_raise_video_decode_error_naming_the_file(tmp_path: Path, kind: str):
    path = tmp_path / f"bad_{kind}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = _valid_mp4_bytes(tmp_path)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(2).integers(0, 256, size=20_000, dtype=np.uint8).tobytes())
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "directory":
        path.mkdir()

    with pytest.raises(VideoDecodeError) as info:
        load_frames(path, 4)

    assert str(path) in str(info.value)


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
