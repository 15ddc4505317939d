"""The project's video-QA format: JSONL, one example per line.

Each line is a JSON object with the keys

- ``question`` (required): the question text;
- ``video`` (optional): a path, relative to the JSONL file's folder or absolute; without it (or
  null) the example is text-only: its prompt has no video placeholder and no visual tokens;
- ``answer`` (optional): the reference answer, or null;
- ``id`` (optional): unique in the file; defaults to ``"<file stem>-<line number>"``;
- ``type`` (optional): the question type (e.g. ``"colour"``), for per-type accuracy.

Blank lines are ignored; the file is UTF-8 (a leading byte-order mark is allowed). Invalid JSON,
bytes that are not UTF-8, a missing or any other key, a key repeated within the line, a wrong
type, an empty ``video`` or ``question`` or a repeated ``id`` makes the line bad.
:func:`read_jsonl` returns the good examples together with one :class:`DatasetError` per bad line;
:func:`load_jsonl` either raises the first error (``on_error="raise"``) or drops the bad lines and
logs each one and how many (``on_error="skip"``). :func:`check_data` does this for a run's three
splits before anything else starts and returns the counts.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlaif_ray.config import Config

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("question",)
_OPTIONAL_KEYS = ("video", "id", "answer", "type")


class DatasetError(ValueError):
    """A bad dataset line; the message names the file, the line number and the problem."""


@dataclass
class VideoQAExample:
    """One question about one video (an absolute path), or a text-only question (``video`` None)."""

    id: str
    video: str | None
    question: str
    answer: str | None = None
    type: str | None = None


@dataclass
class LoadReport:
    """What :func:`read_jsonl` found: the good examples and one error per bad line, in file order."""

    examples: list[VideoQAExample] = field(default_factory=list)
    errors: list[DatasetError] = field(default_factory=list)


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; raises ValueError when a key appears twice (json would keep the last)."""
    repeated = sorted(key for key, n in Counter(key for key, _ in pairs).items() if n > 1)
    if repeated:
        raise ValueError(f"repeated keys {repeated} in one object")
    return dict(pairs)


def _parse_line(line: str, folder: Path, default_id: str) -> VideoQAExample:
    """One JSONL line -> example; raises ValueError with a message without file/line context."""
    try:
        record: Any = json.loads(line, object_pairs_hook=_object_without_repeated_keys)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error})") from error
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown} (allowed: {[*_REQUIRED_KEYS, *_OPTIONAL_KEYS]})")
    for key in _REQUIRED_KEYS:
        if key not in record:
            raise ValueError(f"missing key {key!r}")
    for key in ("question", "id"):
        if key in record and (not isinstance(record[key], str) or not record[key].strip()):
            raise ValueError(f"{key!r} must be a non-empty string, got {record[key]!r}")
    video = record.get("video")
    if video is not None and (not isinstance(video, str) or not video.strip()):
        raise ValueError(f"'video' must be a non-empty string or null (text-only), got {video!r}")
    for key in ("answer", "type"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise ValueError(f"{key!r} must be a string or null, got {record[key]!r}")
    return VideoQAExample(
        id=record.get("id", default_id),
        # normpath, not resolve: keep symlinked dataset folders as the user named them.
        video=None if video is None else os.path.normpath(folder / video),
        question=record["question"],
        answer=record.get("answer"),
        type=record.get("type"),
    )


def _decode(raw: bytes) -> str:
    """One line's bytes as UTF-8 text; raises ValueError naming the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = raw[error.start : error.start + 1].hex()
        raise ValueError(
            f"not UTF-8 text (byte 0x{bad} at byte offset {error.start}: {error.reason})"
        ) from None


def read_jsonl(path: str | os.PathLike[str]) -> LoadReport:
    """Read every line of a JSONL dataset, collecting bad lines instead of raising.

    Raises:
        OSError: the file cannot be opened.
    """
    path = Path(os.path.abspath(path))
    report = LoadReport()
    line_of_id: dict[str, int] = {}
    # Bytes, decoded line by line: a line that is not UTF-8 is one bad line, not a failed file.
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            try:
                line = _decode(raw)
                if not line.strip():
                    continue
                example = _parse_line(line, path.parent, default_id=f"{path.stem}-{number}")
                if example.id in line_of_id:
                    raise ValueError(f"duplicate id {example.id!r} (first on line {line_of_id[example.id]})")
            except ValueError as error:
                report.errors.append(DatasetError(f"{path}:{number}: {error}"))
                continue
            line_of_id[example.id] = number
            report.examples.append(example)
    return report


def load_jsonl(
    path: str | os.PathLike[str], on_error: Literal["raise", "skip"] = "raise"
) -> list[VideoQAExample]:
    """Load a JSONL dataset (format in the module docstring).

    Args:
        path: the JSONL file.
        on_error: ``"raise"``: raise the first bad line's :class:`DatasetError`; ``"skip"``:
            drop bad lines, logging each one and their count as warnings. Use
            :func:`read_jsonl` to get the bad lines as data.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = read_jsonl(path)
    _apply_policy(report, path, on_error)
    return report.examples


def _apply_policy(report: LoadReport, path: str | os.PathLike[str], on_error: str) -> None:
    """Raise the first bad line's error (``"raise"``), or log every bad line and their count."""
    if not report.errors:
        return
    if on_error == "raise":
        raise report.errors[0]
    for error in report.errors:
        logger.warning("skipped bad line: %s", error)
    logger.warning(
        "%s: skipped %d bad lines, kept %d examples", path, len(report.errors), len(report.examples)
    )


def check_data(cfg: Config) -> dict[str, dict[str, Any]]:
    """Read ``data.train``, ``data.val`` and ``data.test`` under ``data.on_bad_line``, so that a
    bad file or line is reported (file and line) before SFT or any actor starts.

    Training lines may omit ``answer`` (prompts nobody labelled: SFT skips them, RL ranks them
    with a judge); val and test lines are what accuracy is measured on, so each needs one.

    Returns:
        per split, ``{"path", "examples", "bad_lines", "without_answer"}`` (for ``summary.json``).

    Raises:
        DatasetError: a bad line under ``on_bad_line="raise"``, a file that cannot be read, a val
            or test line without an answer, or a train split without a usable example.
    """
    counts: dict[str, dict[str, Any]] = {}
    for split in ("train", "val", "test"):
        path = getattr(cfg.data, split)
        try:
            report = read_jsonl(path)
        except OSError as error:
            raise DatasetError(
                f"data.{split} = {path}: cannot read it ({error.strerror or error})"
            ) from error
        _apply_policy(report, path, cfg.data.on_bad_line)
        unlabelled = [ex for ex in report.examples if ex.answer is None]
        if unlabelled and split != "train":
            raise DatasetError(
                f"data.{split} = {path}: {len(unlabelled)} line(s) without an answer (e.g. id "
                f"{unlabelled[0].id!r}): evaluation needs a reference answer on every line"
            )
        counts[split] = {
            "path": str(path),
            "examples": len(report.examples),
            "bad_lines": len(report.errors),
            "without_answer": len(unlabelled),
        }
        if not report.examples:
            logger.warning("data.%s = %s: no usable example (%d bad lines)", split, path, len(report.errors))
    if not counts["train"]["examples"]:
        raise DatasetError(
            f"data.train = {cfg.data.train}: no usable example ({counts['train']['bad_lines']} bad lines)"
        )
    return counts


def save_jsonl(path: str | os.PathLike[str], examples: Iterable[VideoQAExample]) -> None:
    """Write examples as JSONL, the inverse of :func:`load_jsonl`.

    Videos inside the file's folder are written relative to it (so the folder can be moved);
    others keep an absolute path. ``answer`` and ``type`` are omitted when None.
    """
    path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for example in examples:
        record: dict[str, str] = {"id": example.id}
        if example.video is not None:
            video = Path(os.path.abspath(example.video))
            record["video"] = (
                video.relative_to(path.parent).as_posix() if video.is_relative_to(path.parent) else str(video)
            )
        record["question"] = example.question
        if example.answer is not None:
            record["answer"] = example.answer
        if example.type is not None:
            record["type"] = example.type
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    path.write_text("".join(lines), encoding="utf-8")
