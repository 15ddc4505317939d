"""The synthetic video-QA task: real videos whose pixels agree with the answers."""

from __future__ import annotations

import json
from pathlib import Path

import decord
import numpy as np
import pytest

from rlaif_ray.data.dataset import VideoQAExample, load_jsonl
from rlaif_ray.data.synthetic import (
    ANSWERS_BY_TYPE,
    COLOURS,
    DIRECTIONS,
    QUESTION_TYPES,
    VOCABULARY,
    generate,
    main,
)
from rlaif_ray.data.video import load_frames

N_VIDEOS = 12
SEED = 3
SIZE = 64


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("synthetic"), N_VIDEOS, seed=SEED, val_frac=0.2, test_frac=0.2)


@pytest.fixture(scope="module")
def examples(task: dict[str, Path]) -> dict[str, list[VideoQAExample]]:
    return {split: load_jsonl(path) for split, path in task.items()}


def answers_by_video(examples: dict[str, list[VideoQAExample]]) -> dict[str, dict[str, str]]:
    """video -> {question type: answer}."""
    table: dict[str, dict[str, str]] = {}
    for split_examples in examples.values():
        for example in split_examples:
            assert example.type is not None and example.answer is not None
            table.setdefault(example.video, {})[example.type] = example.answer
    return table


def foreground(frame: np.ndarray) -> np.ndarray:
    """Pixels that are not the black background."""
    return frame.max(axis=-1) > 80


def runs(occupied: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in a 1-D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], occupied.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def test_writes_splits_with_disjoint_videos(task: dict[str, Path], examples: dict[str, list[VideoQAExample]]):
    assert set(task) == {"train", "val", "test"}
    videos = {split: {e.video for e in split_examples} for split, split_examples in examples.items()}
    assert [len(videos[s]) for s in ("train", "val", "test")] == [8, 2, 2]
    assert not (
        videos["train"] & videos["val"] or videos["train"] & videos["test"] or videos["val"] & videos["test"]
    )
    all_videos = set.union(*videos.values())
    assert sorted(Path(v).name for v in all_videos) == [f"{i:05d}.mp4" for i in range(N_VIDEOS)]
    assert all(Path(v).parent == task["train"].parent / "videos" for v in all_videos)


def test_every_video_has_one_question_per_type(examples: dict[str, list[VideoQAExample]]):
    for answers in answers_by_video(examples).values():
        assert sorted(answers) == sorted(QUESTION_TYPES)
        for qtype, answer in answers.items():
            assert answer in ANSWERS_BY_TYPE[qtype]


def test_vocabulary_covers_every_word(examples: dict[str, list[VideoQAExample]]):
    assert VOCABULARY == sorted(set(VOCABULARY))
    assert set(QUESTION_TYPES) == set(ANSWERS_BY_TYPE)
    for answers in ANSWERS_BY_TYPE.values():
        assert set(answers) <= set(VOCABULARY)
    for split_examples in examples.values():
        for example in split_examples:
            assert example.question == example.question.lower()
            assert example.question.endswith(" ?")
            assert set(example.question.split()) <= set(VOCABULARY)
            assert example.answer in VOCABULARY


def test_pixels_agree_with_the_answers(examples: dict[str, list[VideoQAExample]]):
    for video, answers in answers_by_video(examples).items():
        num_frames = len(decord.VideoReader(video, ctx=decord.cpu(0)))
        assert 8 <= num_frames <= 16
        frames = load_frames(video, num_frames).astype(np.int64)
        assert frames.shape == (num_frames, SIZE, SIZE, 3)
        first, last = foreground(frames[0]), foreground(frames[-1])

        # direction: the centroid moves at least a third of the frame along the stated axis
        dx, dy = DIRECTIONS[answers["direction"]]
        (y0, x0), (y1, x1) = np.argwhere(first).mean(axis=0), np.argwhere(last).mean(axis=0)
        along, across = ((x1 - x0) * dx, y1 - y0) if dx else ((y1 - y0) * dy, x1 - x0)
        assert along >= SIZE / 3, (video, answers)
        # (not exactly 0: each shape's pixel count varies with its sub-pixel position)
        assert abs(across) < 3, (video, answers)

        # colour: the foreground's mean colour is nearest to the answer's colour
        mean_colour = frames[0][first].mean(axis=0)
        nearest = min(COLOURS, key=lambda name: np.sum((np.array(COLOURS[name]) - mean_colour) ** 2))
        assert nearest == answers["colour"], (video, mean_colour)

        # count: the shapes sit in separate lanes across the motion axis
        lanes = runs(first.any(axis=1 if dx else 0))
        assert len(lanes) == ["one", "two", "three"].index(answers["count"]) + 1, (video, answers)

        # shape: how much of its bounding box the first shape fills
        lane = first[lanes[0][0] : lanes[0][1]] if dx else first[:, lanes[0][0] : lanes[0][1]]
        ys, xs = np.nonzero(lane)
        fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        expected_fill = {"square": (0.97, 1.0), "circle": (0.68, 0.95), "triangle": (0.45, 0.68)}[
            answers["shape"]
        ]
        assert expected_fill[0] <= fill <= expected_fill[1], (video, answers, fill)


def test_same_seed_same_task_and_frames(task: dict[str, Path], tmp_path: Path):
    again = generate(tmp_path / "again", N_VIDEOS, seed=SEED, val_frac=0.2, test_frac=0.2)
    for split in task:
        assert again[split].read_text() == task[split].read_text()
    for index in range(N_VIDEOS):
        name = f"videos/{index:05d}.mp4"
        np.testing.assert_array_equal(
            load_frames(task["train"].parent / name, 16), load_frames(again["train"].parent / name, 16)
        )

    # video i depends on (seed, i) only: fewer videos leave the first ones unchanged
    fewer = generate(tmp_path / "fewer", 3, seed=SEED)
    for index in range(3):
        name = f"videos/{index:05d}.mp4"
        np.testing.assert_array_equal(
            load_frames(task["train"].parent / name, 16), load_frames(fewer["train"].parent / name, 16)
        )


def test_other_seed_other_task(task: dict[str, Path], tmp_path: Path):
    other = generate(tmp_path / "other", N_VIDEOS, seed=SEED + 1, val_frac=0.2, test_frac=0.2)
    assert other["train"].read_text() != task["train"].read_text()


def test_answers_are_not_constant(examples: dict[str, list[VideoQAExample]]):
    # 12 videos: every question type sees at least two different answers.
    table = answers_by_video(examples)
    for qtype in QUESTION_TYPES:
        assert len({answers[qtype] for answers in table.values()}) >= 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_videos": 0},
        {"n_videos": 4, "frames_min": 1},
        {"n_videos": 4, "frames_min": 9, "frames_max": 8},
        {"n_videos": 4, "size": 8},
        {"n_videos": 4, "val_frac": 0.5, "test_frac": 0.5},
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, int | float]):
    with pytest.raises(ValueError):
        generate(tmp_path, seed=0, **kwargs)  # type: ignore[arg-type]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    main(
        [
            "--out",
            str(tmp_path),
            "--n",
            "4",
            "--seed",
            "1",
            "--frames-min",
            "4",
            "--frames-max",
            "4",
            "--size",
            "32",
        ]
    )

    assert "generated 4 videos" in capsys.readouterr().out
    train = load_jsonl(tmp_path / "train.jsonl")
    assert len(train) == 4 * len(QUESTION_TYPES)
    assert load_frames(train[0].video, 4).shape == (4, 32, 32, 3)


def test_graded_describe_questions_name_colour_shape_and_direction(tmp_path: Path) -> None:
    paths = generate(
        tmp_path, 6, seed=SEED, val_frac=0.2, test_frac=0.2, question_types=["describe", "colour"]
    )
    rows = [ex for path in paths.values() for ex in load_jsonl(path)]
    by_video: dict[str, dict[str, VideoQAExample]] = {}
    for ex in rows:
        by_video.setdefault(ex.video, {})[ex.type or ""] = ex
    assert len(by_video) == 6 and all(set(v) == {"describe", "colour"} for v in by_video.values())
    for questions in by_video.values():
        describe = questions["describe"]
        colour, shape, direction = (describe.answer or "").split()
        assert colour == questions["colour"].answer  # the same scene as the colour question's
        assert shape in ANSWERS_BY_TYPE["shape"] and direction in ANSWERS_BY_TYPE["direction"]
        assert describe.question == "what is moving ?"
        assert set(describe.question.split()) | {colour, shape, direction} <= set(VOCABULARY)
    # The videos do not depend on the question types: the same pixels as the default task's.
    default = generate(tmp_path / "default", 6, seed=SEED, val_frac=0.2, test_frac=0.2)
    video = sorted(by_video)[0]
    other = str(default["train"].parent / "videos" / Path(video).name)
    assert np.array_equal(load_frames(video, 4), load_frames(other, 4))
    with pytest.raises(ValueError, match="unknown question types"):
        generate(tmp_path / "bad", 3, question_types=["colour", "mood"])


def test_label_fraction_keeps_the_answers_of_that_share_of_training_videos(tmp_path: Path) -> None:
    """The questions of round(fraction * training videos) videos keep their answers, the others
    are written without one; val and test keep every answer; the choice follows the seed."""
    paths = generate(tmp_path / "a", 20, seed=3, val_frac=0.2, test_frac=0.2, label_fraction=0.25)
    train = load_jsonl(paths["train"])
    answered = {ex.video for ex in train if ex.answer is not None}
    unanswered = {ex.video for ex in train if ex.answer is None}
    assert len(answered) == round(0.25 * 12) and len(unanswered) == 12 - len(answered)
    assert not answered & unanswered  # a video's questions are all labelled or none is
    unanswered_names = {Path(v).name for v in unanswered}
    lines = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert all("answer" not in line for line in lines if Path(line["video"]).name in unanswered_names)
    for split in ("val", "test"):
        assert all(ex.answer for ex in load_jsonl(paths[split]))
    again = generate(tmp_path / "b", 20, seed=3, val_frac=0.2, test_frac=0.2, label_fraction=0.25)
    same = {Path(ex.video).name for ex in load_jsonl(again["train"]) if ex.answer is not None}
    assert same == {Path(v).name for v in answered}
    with pytest.raises(ValueError, match="label_fraction"):
        generate(tmp_path / "c", 20, seed=3, label_fraction=1.5)
