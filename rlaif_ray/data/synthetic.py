"""A synthetic video-QA task that needs the video, and its motion, to be answered.

Each video (H.264 mp4, 64x64 by default, 8 to 16 frames) shows one to three identical shapes
(circle, square or triangle; red, green, blue or yellow) on a black background, moving together
left, right, up or down by 40-50% of the frame over the clip. Every video gets one question of
each type in :data:`QUESTION_TYPES`; the answers are single lowercase words
(:data:`ANSWERS_BY_TYPE`), the question words are separated by spaces with "?" as its own word,
and :data:`VOCABULARY` lists every word of every question and answer.

The split is by video: ``train.jsonl``, ``val.jsonl`` and ``test.jsonl`` share no video. The
output is a function of the arguments only; video ``i`` depends on ``(seed, i)`` alone, so a
larger ``n_videos`` adds videos without changing the first ones (the split does change)::

    python -m rlaif_ray.data.synthetic --out data/synthetic --n 400 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlaif_ray.config import Config, ConfigError
from rlaif_ray.data.dataset import VideoQAExample, save_jsonl

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 30),
    "blue": (40, 70, 235),
    "yellow": (230, 210, 30),
}
SHAPES = ["circle", "square", "triangle"]
# (dx, dy) in image coordinates: y grows downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
COUNT_WORDS = ["one", "two", "three"]
BACKGROUND = (0, 0, 0)
FPS = 8
SPLITS = ("train", "val", "test")

QUESTION_TYPES = ["colour", "shape", "direction", "count"]
ANSWERS_BY_TYPE: dict[str, list[str]] = {
    "colour": list(COLOURS),
    "shape": SHAPES,
    "direction": list(DIRECTIONS),
    "count": COUNT_WORDS,
}
# Graded questions: an answer of several parts, e.g. "what is moving ?" -> "red circle up" (colour,
# shape and direction, in any order), judged part by part (rlaif_ray.ranker.backends.part_accuracy).
# Not in the default task: ask for them with ``question_types``.
GRADED_TYPES = ["describe"]
ALL_TYPES = QUESTION_TYPES + GRADED_TYPES


@dataclass(frozen=True)
class Scene:
    """What one video shows; everything its questions ask about."""

    colour: str
    shape: str
    direction: str
    count: int


def questions(scene: Scene, types: list[str] = QUESTION_TYPES) -> list[tuple[str, str, str]]:
    """``(type, question, answer)`` for every type in ``types`` (of :data:`ALL_TYPES`), in that order."""
    # Naming the shape in a question gives away only the answer to the shape question, which
    # itself names no shape.
    subject = f"is the {scene.shape}" if scene.count == 1 else f"are the {scene.shape}s"
    mover = f"does the {scene.shape}" if scene.count == 1 else f"do the {scene.shape}s"
    by_type = {
        "colour": (f"what colour {subject} ?", scene.colour),
        "shape": ("what shape is moving ?", scene.shape),
        "direction": (f"which direction {mover} move ?", scene.direction),
        "count": ("how many shapes are there ?", COUNT_WORDS[scene.count - 1]),
        "describe": ("what is moving ?", f"{scene.colour} {scene.shape} {scene.direction}"),
    }
    unknown = [t for t in types if t not in by_type]
    if unknown:
        raise ValueError(f"unknown question types {unknown}; expected some of {ALL_TYPES}")
    return [(t, *by_type[t]) for t in types]


def _all_words() -> list[str]:
    words: set[str] = set()
    for colour, shape, direction, count in itertools.product(COLOURS, SHAPES, DIRECTIONS, (1, 2, 3)):
        for _, question, answer in questions(Scene(colour, shape, direction, count), ALL_TYPES):
            words.update(question.split())
            words.update(answer.split())
    return sorted(words)


VOCABULARY: list[str] = _all_words()


def _shape_mask(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a shape centred at (cx, cy) with half-extent ``radius``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    if shape == "square":
        return (np.abs(x - cx) <= radius) & (np.abs(y - cy) <= radius)
    # Triangle pointing up: zero width at the top, full width at the bottom.
    depth = y - (cy - radius)
    return (depth >= 0) & (depth <= 2 * radius) & (np.abs(x - cx) <= depth / 2)


def render(scene: Scene, num_frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Frames ``[num_frames, size, size, 3]`` of ``scene``; positions drawn from ``rng``.

    The shapes sit in separate lanes across the motion axis, so they never overlap, and all
    move by the same 40-50% of the frame along it, staying fully inside the frame.
    """
    radius = rng.uniform(0.08, 0.11) * size
    travel = rng.uniform(0.4, 0.5) * size
    dx, dy = DIRECTIONS[scene.direction]
    lane = size / scene.count
    jitter = max(0.0, lane / 2 - radius - 1)
    starts = []
    for k in range(scene.count):
        across = lane * (k + 0.5) + rng.uniform(-jitter, jitter)
        # Drawn for motion towards +axis, then mirrored for left/up.
        along = rng.uniform(radius + 1, size - radius - 1 - travel)
        if dx + dy < 0:
            along = size - along
        starts.append((along, across) if dx else (across, along))

    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    colour = np.array(COLOURS[scene.colour], dtype=np.uint8)
    for t in range(num_frames):
        shift = travel * t / (num_frames - 1)
        for x0, y0 in starts:
            frames[t][_shape_mask(scene.shape, x0 + dx * shift, y0 + dy * shift, radius, size)] = colour
    return frames


def generate(
    out_dir: str | os.PathLike[str],
    n_videos: int,
    seed: int = 0,
    frames_min: int = 8,
    frames_max: int = 16,
    size: int = 64,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    question_types: list[str] = QUESTION_TYPES,
    label_fraction: float = 1.0,
) -> dict[str, Path]:
    """Write ``n_videos`` videos and their questions under ``out_dir``.

    Writes ``out_dir/videos/NNNNN.mp4`` and ``out_dir/{train,val,test}.jsonl``; val and test
    get ``round(n_videos * frac)`` videos each, train the rest (at least one). Each video gets one
    question of each of ``question_types`` (the videos do not depend on them). The questions of
    ``round(label_fraction * n_train)`` training videos (chosen from ``seed``) keep their answers;
    the other training lines are written without ``answer``: prompts nobody labelled, for RL
    from a judge. Val and test always keep theirs.

    Returns:
        ``{"train": path, "val": path, "test": path}`` of the JSONL files.
    """
    if n_videos < 1:
        raise ValueError(f"n_videos must be >= 1, got {n_videos}")
    if not 2 <= frames_min <= frames_max:
        raise ValueError(f"need 2 <= frames_min <= frames_max, got {frames_min}, {frames_max}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if not question_types or len(set(question_types)) != len(question_types):
        raise ValueError(f"question_types must be distinct and not empty, got {question_types}")
    questions(Scene("red", "circle", "up", 1), question_types)  # unknown types: ValueError now
    n_val, n_test = round(n_videos * val_frac), round(n_videos * test_frac)
    if min(val_frac, test_frac) < 0 or n_val + n_test >= n_videos:
        raise ValueError(f"val_frac={val_frac}, test_frac={test_frac} leave no training video of {n_videos}")
    if not 0 <= label_fraction <= 1:
        raise ValueError(f"label_fraction must be in [0, 1], got {label_fraction}")

    from rlaif_ray.data.video import write_video  # PyAV and decord: only when writing videos

    out_dir = Path(out_dir)
    video_dir = out_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    examples_by_video = []
    for index in range(n_videos):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
        scene = Scene(
            colour=str(rng.choice(list(COLOURS))),
            shape=str(rng.choice(SHAPES)),
            direction=str(rng.choice(list(DIRECTIONS))),
            count=int(rng.integers(1, 4)),
        )
        num_frames = int(rng.integers(frames_min, frames_max + 1))
        video = video_dir / f"{index:05d}.mp4"
        write_video(video, render(scene, num_frames, size, rng), fps=FPS)
        examples_by_video.append(
            [
                VideoQAExample(
                    id=f"{index:05d}-{qtype}",
                    video=str(video.absolute()),
                    question=question,
                    answer=answer,
                    type=qtype,
                )
                for qtype, question, answer in questions(scene, question_types)
            ]
        )

    order = np.random.default_rng(seed).permutation(n_videos)
    split_videos = {
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[n_val + n_test :],
    }
    train = sorted(split_videos["train"])
    n_labelled = round(label_fraction * len(train))
    labelled_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(n_videos, 1)))
    unlabelled = set(train) - {int(i) for i in labelled_rng.choice(train, n_labelled, replace=False)}
    for i in unlabelled:
        examples_by_video[i] = [dataclasses.replace(ex, answer=None) for ex in examples_by_video[i]]
    paths = {}
    for split in SPLITS:
        paths[split] = out_dir / f"{split}.jsonl"
        save_jsonl(paths[split], [ex for i in sorted(split_videos[split]) for ex in examples_by_video[i]])
    return paths


def ensure_data(cfg: Config) -> None:
    """Generate the synthetic video-QA task when the configured JSONL files are missing."""
    paths = [Path(cfg.data.train), Path(cfg.data.val), Path(cfg.data.test)]
    if all(p.is_file() for p in paths):
        return
    if cfg.data.synthetic_dir is None:
        missing = [str(p) for p in paths if not p.is_file()]
        raise FileNotFoundError(f"data files {missing} not found and data.synthetic_dir is null")
    types = cfg.data.synthetic_question_types
    if not types or len(set(types)) != len(types) or not set(types) <= set(ALL_TYPES):
        raise ConfigError(
            f"config key 'data.synthetic_question_types' = {types!r}: expected distinct question "
            f"types of {ALL_TYPES}"
        )
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


def main(argv: list[str] | None = None) -> None:
    """The command line: generate the task and print where it went."""
    parser = argparse.ArgumentParser(
        prog="python -m rlaif_ray.data.synthetic", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, required=True, help="number of videos")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames-min", type=int, default=8)
    parser.add_argument("--frames-max", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="frame height and width in pixels")
    parser.add_argument("--val-frac", type=float, default=0.1)
    parser.add_argument("--test-frac", type=float, default=0.1)
    parser.add_argument(
        "--types", nargs="+", default=QUESTION_TYPES, choices=ALL_TYPES, help="question types per video"
    )
    parser.add_argument(
        "--label-fraction", type=float, default=1.0, help="fraction of training videos with answers"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = generate(
        args.out,
        args.n,
        seed=args.seed,
        frames_min=args.frames_min,
        frames_max=args.frames_max,
        size=args.size,
        val_frac=args.val_frac,
        test_frac=args.test_frac,
        question_types=args.types,
        label_fraction=args.label_fraction,
    )
    print(f"generated {args.n} videos in {time.perf_counter() - start:.1f} s")
    for split, path in paths.items():
        with path.open(encoding="utf-8") as file:
            print(f"  {split}: {sum(1 for _ in file)} questions in {path}")


if __name__ == "__main__":
    main()
