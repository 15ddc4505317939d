"""Converters from public video-QA layouts to the project's JSONL format.

Supported layouts:

- MSVD-QA / MSRVTT-QA: one JSON list of ``{"question", "answer", "video_id" | "video", "id"}``;
  the video is ``<video_dir>/<name>.<ext>`` where name is the id itself or ``vid<id>`` (MSVD) /
  ``video<id>`` (MSRVTT). The question type is the question's first word (what, who, ...).
- ActivityNet-QA: a question list ``[{"question", "question_id", "video_name"}]`` and an answer
  list ``[{"answer", "question_id", "type"}]``; the video is ``v_<video_name>.<ext>`` or
  ``<video_name>.<ext>``. Integer types are named after the dataset's README.

Videos are looked up recursively under ``video_dir``. Questions whose video is missing are
dropped and counted (:class:`Conversion`); the CLI's ``--strict`` turns that into a failure::

    python -m rlaif_ray.data.convert msvd --qa test_qa.json --video-dir videos --out test.jsonl
    python -m rlaif_ray.data.convert activitynet --questions test_q.json --answers test_a.json \\
        --video-dir videos --out test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlaif_ray.data.dataset import DatasetError, VideoQAExample, save_jsonl

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")

# From the ActivityNet-QA README: question types 0-2, answer types 3-8.
ACTIVITYNET_TYPES = {
    0: "motion",
    1: "spatial_relation",
    2: "temporal_relation",
    3: "yes_no",
    4: "color",
    5: "object",
    6: "location",
    7: "number",
    8: "other",
}

_QUESTION_WORDS = ("what", "who", "how", "when", "where", "why", "which")


@dataclass
class Conversion:
    """Converted examples, and the videos that were not found (their questions are dropped)."""

    examples: list[VideoQAExample] = field(default_factory=list)
    missing_videos: list[str] = field(default_factory=list)
    skipped_questions: int = 0


class VideoIndex:
    """The video files under a folder (recursively), found by file name without extension.

    When several files share a name, the extension listed first in ``extensions`` wins.
    """

    def __init__(self, video_dir: str | os.PathLike[str], extensions: Sequence[str] = VIDEO_EXTENSIONS):
        video_dir = Path(os.path.abspath(video_dir))
        if not video_dir.is_dir():
            raise FileNotFoundError(f"video folder not found: {video_dir}")
        rank = {ext.lower(): i for i, ext in enumerate(extensions)}
        found: dict[str, tuple[int, str]] = {}
        for root, dirs, files in os.walk(video_dir):
            dirs.sort()
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() in rank and (stem not in found or rank[ext.lower()] < found[stem][0]):
                    found[stem] = (rank[ext.lower()], os.path.join(root, name))
        self._paths = {stem: path for stem, (_, path) in found.items()}

    def find(self, names: Sequence[str]) -> str | None:
        """The absolute path of the first of ``names`` that exists, or None."""
        for name in names:
            if name in self._paths:
                return self._paths[name]
        return None


def _read_json_list(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as file:
        try:
            data = json.load(file)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}: invalid JSON ({error})") from error
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list, got {type(data).__name__}")
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise DatasetError(f"{path}: item {index}: expected an object, got {type(item).__name__}")
    return data


def _text(item: dict[str, Any], key: str, where: str) -> str:
    """A required string (or integer, as in MSVD/MSRVTT video ids) field as text."""
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise DatasetError(f"{where}: {key!r} must be a non-empty string or integer, got {value!r}")
    return str(value).strip()


def _question_type(question: str) -> str:
    words = question.lower().split()
    return words[0] if words and words[0] in _QUESTION_WORDS else "other"


def _add(conversion: Conversion, seen_ids: dict[str, str], example: VideoQAExample, where: str) -> None:
    if example.id in seen_ids:
        raise DatasetError(f"{where}: duplicate id {example.id!r} (first at {seen_ids[example.id]})")
    seen_ids[example.id] = where
    conversion.examples.append(example)


def _convert_qa_list(
    qa_path: str | os.PathLike[str], videos: VideoIndex, source: str, video_prefix: str
) -> Conversion:
    conversion = Conversion()
    missing: set[str] = set()
    seen_ids: dict[str, str] = {}
    for index, item in enumerate(_read_json_list(qa_path)):
        where = f"{qa_path}: item {index}"
        video_key = "video_id" if "video_id" in item else "video"
        name = _text(item, video_key, where)
        question = _text(item, "question", where)
        video = videos.find([name, f"{video_prefix}{name}"])
        if video is None:
            missing.add(name)
            conversion.skipped_questions += 1
            continue
        item_id = _text(item, "id", where) if "id" in item else str(index)
        example = VideoQAExample(
            id=f"{source}-{item_id}",
            video=video,
            question=question,
            answer=_text(item, "answer", where),
            type=_question_type(question),
        )
        _add(conversion, seen_ids, example, where)
    conversion.missing_videos = sorted(missing)
    return conversion


def convert_msvd_qa(
    qa_path: str | os.PathLike[str],
    video_dir: str | os.PathLike[str],
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> Conversion:
    """Convert an MSVD-QA question file; videos are ``<id>.<ext>`` or ``vid<id>.<ext>``."""
    return _convert_qa_list(qa_path, VideoIndex(video_dir, extensions), "msvd", "vid")


def convert_msrvtt_qa(
    qa_path: str | os.PathLike[str],
    video_dir: str | os.PathLike[str],
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> Conversion:
    """Convert an MSRVTT-QA question file; videos are ``<id>.<ext>`` or ``video<id>.<ext>``."""
    return _convert_qa_list(qa_path, VideoIndex(video_dir, extensions), "msrvtt", "video")


def convert_activitynet_qa(
    questions_path: str | os.PathLike[str],
    answers_path: str | os.PathLike[str],
    video_dir: str | os.PathLike[str],
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> Conversion:
    """Convert ActivityNet-QA question and answer files; a question without answer gets None."""
    videos = VideoIndex(video_dir, extensions)
    answers: dict[str, dict[str, Any]] = {}
    for index, item in enumerate(_read_json_list(answers_path)):
        answers[_text(item, "question_id", f"{answers_path}: item {index}")] = item

    conversion = Conversion()
    missing: set[str] = set()
    seen_ids: dict[str, str] = {}
    for index, item in enumerate(_read_json_list(questions_path)):
        where = f"{questions_path}: item {index}"
        question_id = _text(item, "question_id", where)
        name = _text(item, "video_name", where)
        question = _text(item, "question", where)
        video = videos.find([f"v_{name}", name])
        if video is None:
            missing.add(name)
            conversion.skipped_questions += 1
            continue
        answer_item = answers.get(question_id)
        answer = type_name = None
        if answer_item is not None:
            answer_where = f"{answers_path}: question_id {question_id!r}"
            answer = _text(answer_item, "answer", answer_where)
            if answer_item.get("type") is not None:
                raw_type = _text(answer_item, "type", answer_where)
                type_name = ACTIVITYNET_TYPES.get(int(raw_type), raw_type) if raw_type.isdigit() else raw_type
        example = VideoQAExample(
            id=question_id, video=video, question=question, answer=answer, type=type_name
        )
        _add(conversion, seen_ids, example, where)
    conversion.missing_videos = sorted(missing)
    return conversion


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m rlaif_ray.data.convert", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="layout", required=True)
    for layout in ("msvd", "msrvtt"):
        layout_parser = sub.add_parser(layout, help=f"{layout.upper()}-QA question file")
        layout_parser.add_argument("--qa", required=True, help="JSON list of questions with answers")
    activitynet = sub.add_parser("activitynet", help="ActivityNet-QA question and answer files")
    activitynet.add_argument("--questions", required=True, help="*_q.json")
    activitynet.add_argument("--answers", required=True, help="*_a.json")
    for layout_parser in sub.choices.values():
        layout_parser.add_argument(
            "--video-dir", required=True, help="folder searched recursively for videos"
        )
        layout_parser.add_argument("--out", required=True, help="JSONL file to write")
        layout_parser.add_argument(
            "--ext", nargs="+", default=list(VIDEO_EXTENSIONS), help="video extensions, preferred first"
        )
        layout_parser.add_argument("--strict", action="store_true", help="fail if any video is missing")
    args = parser.parse_args(argv)

    if args.layout == "activitynet":
        conversion = convert_activitynet_qa(args.questions, args.answers, args.video_dir, args.ext)
    else:
        convert = convert_msvd_qa if args.layout == "msvd" else convert_msrvtt_qa
        conversion = convert(args.qa, args.video_dir, args.ext)

    if conversion.missing_videos:
        shown = ", ".join(conversion.missing_videos[:5])
        more = f" and {len(conversion.missing_videos) - 5} more" if len(conversion.missing_videos) > 5 else ""
        message = (
            f"{len(conversion.missing_videos)} videos not found in {args.video_dir} ({shown}{more}); "
            f"{conversion.skipped_questions} questions"
        )
        if args.strict:
            print(f"error: {message} cannot be converted; nothing written", file=sys.stderr)
            return 1
        print(f"warning: {message} skipped", file=sys.stderr)
    save_jsonl(args.out, conversion.examples)
    print(f"wrote {len(conversion.examples)} examples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
