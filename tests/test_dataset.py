"""The JSONL dataset format and the converters from public video-QA layouts."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from rlaif_ray.config import Config, DataConfig, load_config
from rlaif_ray.data.convert import (
    VideoIndex,
    convert_activitynet_qa,
    convert_msrvtt_qa,
    convert_msvd_qa,
    main,
)
from rlaif_ray.data.dataset import (
    DatasetError,
    VideoQAExample,
    check_data,
    load_jsonl,
    read_jsonl,
    save_jsonl,
)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_resolves_paths_and_fills_defaults(tmp_path: Path):
    elsewhere = tmp_path / "elsewhere" / "clip.avi"
    (tmp_path / "data").mkdir()
    path = write_lines(
        tmp_path / "data" / "qa.jsonl",
        [
            json.dumps(
                {"video": "videos/a.mp4", "question": "what is it ?", "answer": "cat", "type": "what"}
            ),
            "",
            "   ",
            json.dumps({"id": "x", "video": str(elsewhere), "question": "why ?", "answer": None}),
            json.dumps({"video": "../up.mp4", "question": "who ?"}),
            json.dumps({"question": "what is two plus two ?", "answer": "four"}),
            json.dumps({"video": None, "question": "and three ?"}),
        ],
    )

    examples = load_jsonl(path)

    assert examples == [
        VideoQAExample("qa-1", str(tmp_path / "data" / "videos" / "a.mp4"), "what is it ?", "cat", "what"),
        VideoQAExample("x", str(elsewhere), "why ?", None, None),
        VideoQAExample("qa-5", str(tmp_path / "up.mp4"), "who ?", None, None),
        VideoQAExample("qa-6", None, "what is two plus two ?", "four", None),  # text-only
        VideoQAExample("qa-7", None, "and three ?", None, None),
    ]


def test_save_then_load_round_trips_and_writes_relative_paths(tmp_path: Path):
    examples = [
        VideoQAExample("a", str(tmp_path / "videos" / "1.mp4"), "what colour ?", "red", "colour"),
        VideoQAExample("b", str(tmp_path.parent / "outside.mp4"), "über ?", None, None),
        VideoQAExample("c", None, "text only ?", "yes", None),
    ]
    path = tmp_path / "out.jsonl"

    save_jsonl(path, examples)

    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records[0]["video"] == "videos/1.mp4"
    assert records[1]["video"] == str(tmp_path.parent / "outside.mp4")
    assert "answer" not in records[1] and "type" not in records[1]
    assert "video" not in records[2]
    assert load_jsonl(path) == examples


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"video": "a.mp4"}', "missing key 'question'"),
    ('{"video": "", "question": "q ?"}', "'video' must be a non-empty string or null"),
    ('{"video": "a.mp4", "question": "  "}', "'question' must be a non-empty string"),
    ('{"video": 3, "question": "q ?"}', "'video' must be a non-empty string or null"),
    ('{"video": "a.mp4", "question": "q ?", "id": 7}', "'id' must be a non-empty string"),
    ('{"video": "a.mp4", "question": "q ?", "answer": 1}', "'answer' must be a string or null"),
    ('{"video": "a.mp4", "question": "q ?", "type": ["x"]}', "'type' must be a string or null"),
    ('{"video": "a.mp4", "question": "q ?", "label": "x"}', "unknown keys ['label']"),
    ('{"video": "a.mp4", "question": "q ?", "question": "r ?"}', "repeated keys ['question'] in one object"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES, ids=[p for _, p in BAD_LINES])
def test_bad_line_raises_naming_file_line_and_problem(tmp_path: Path, line: str, problem: str):
    good = json.dumps({"video": "a.mp4", "question": "q ?"})
    path = write_lines(tmp_path / "qa.jsonl", [good, "", line, good])

    with pytest.raises(DatasetError) as info:
        load_jsonl(path)

    assert f"{path}:3:" in str(info.value)
    assert problem in str(info.value)


def test_duplicate_id_names_both_lines(tmp_path: Path):
    path = write_lines(
        tmp_path / "qa.jsonl",
        [
            json.dumps({"id": "same", "video": "a.mp4", "question": "q ?"}),
            json.dumps({"id": "other", "video": "a.mp4", "question": "q ?"}),
            json.dumps({"id": "same", "video": "b.mp4", "question": "q ?"}),
        ],
    )

    with pytest.raises(DatasetError, match=r"qa\.jsonl:3: duplicate id 'same' \(first on line 1\)"):
        load_jsonl(path)


def test_skip_drops_and_counts_bad_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = write_lines(
        tmp_path / "qa.jsonl",
        [
            json.dumps({"video": "a.mp4", "question": "one ?"}),
            "{broken",
            json.dumps({"video": "a.mp4", "question": "two ?", "extra": 1}),
            json.dumps({"video": "b.mp4", "question": "three ?"}),
        ],
    )

    report = read_jsonl(path)
    with caplog.at_level(logging.WARNING, logger="rlaif_ray.data.dataset"):
        examples = load_jsonl(path, on_error="skip")

    assert [e.question for e in examples] == ["one ?", "three ?"]
    assert examples == report.examples
    assert [str(e).split(": ")[0] for e in report.errors] == [f"{path}:2", f"{path}:3"]
    assert "skipped 2 bad lines, kept 2 examples" in caplog.text


def test_line_that_is_not_utf8_is_one_bad_line(tmp_path: Path):
    good = json.dumps({"video": "a.mp4", "question": "q ?"}).encode()
    latin1 = json.dumps({"video": "a.mp4", "question": "caf\u00e9 ?"}, ensure_ascii=False).encode("latin-1")
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b"\n".join([good, latin1, good.replace(b"q ?", b"r ?")]) + b"\n")

    report = read_jsonl(path)

    assert [e.question for e in report.examples] == ["q ?", "r ?"]
    assert [str(e) for e in report.errors] == [
        f"{path}:2: not UTF-8 text (byte 0xe9 at byte offset 35: invalid continuation byte)"
    ]


def test_leading_byte_order_mark_is_allowed(tmp_path: Path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q ?"}) + "\n", encoding="utf-8-sig")

    assert [e.question for e in load_jsonl(path)] == ["q ?"]


def test_load_rejects_unknown_policy(tmp_path: Path):
    path = write_lines(tmp_path / "qa.jsonl", [])
    with pytest.raises(ValueError, match="on_error"):
        load_jsonl(path, on_error="ignore")  # type: ignore[arg-type]


def data_config(tmp_path: Path, on_bad_line: str, bad: dict[str, list[str]]) -> Config:
    """A config whose train/val/test files each hold two good lines and the ``bad`` lines of that split."""
    overrides = ["data.synthetic_dir=null", f"data.on_bad_line={on_bad_line}"]
    for split in ("train", "val", "test"):
        good = [json.dumps({"video": "a.mp4", "question": f"{split} {i} ?", "answer": "a"}) for i in range(2)]
        path = write_lines(tmp_path / f"{split}.jsonl", [good[0], *bad.get(split, []), good[1]])
        overrides.append(f"data.{split}={path}")
    return load_config(None, overrides)


def test_check_data_counts_bad_lines_per_file_and_warns_with_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    cfg = data_config(tmp_path, "skip", {"train": ["{oops", '{"question": 3}'], "test": ['{"q": "x"}']})

    with caplog.at_level(logging.WARNING, logger="rlaif_ray.data.dataset"):
        counts = check_data(cfg)

    assert counts == {
        "train": {"path": cfg.data.train, "examples": 2, "bad_lines": 2, "without_answer": 0},
        "val": {"path": cfg.data.val, "examples": 2, "bad_lines": 0, "without_answer": 0},
        "test": {"path": cfg.data.test, "examples": 2, "bad_lines": 1, "without_answer": 0},
    }
    assert f"{cfg.data.train}:2: invalid JSON" in caplog.text
    assert f"{cfg.data.train}:3: 'question' must be a non-empty string" in caplog.text
    assert f"{cfg.data.test}:2: unknown keys ['q']" in caplog.text


def test_check_data_stops_at_the_first_bad_line_under_raise(tmp_path: Path):
    cfg = data_config(tmp_path, "raise", {"val": ['{"question": "q ?", "answer": 4}']})

    with pytest.raises(DatasetError, match=re.escape(f"{cfg.data.val}:2: 'answer' must be a string or null")):
        check_data(cfg)


def test_check_data_names_a_missing_file_and_a_train_split_without_examples(tmp_path: Path):
    cfg = data_config(tmp_path, "skip", {})
    cfg.data.test = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(
        DatasetError, match=re.escape(f"data.test = {cfg.data.test}: cannot read it (No such file")
    ):
        check_data(cfg)

    cfg = data_config(tmp_path, "skip", {})
    write_lines(Path(cfg.data.train), ["{oops", "[]"])
    with pytest.raises(
        DatasetError, match=re.escape(f"data.train = {cfg.data.train}: no usable example (2 bad")
    ):
        check_data(cfg)


def test_readme_states_the_default_on_bad_line():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"by default (`data.on_bad_line={DataConfig().on_bad_line}`)" in " ".join(readme.split())


# --- converters --------------------------------------------------------------------------


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_video_index_prefers_extension_order_and_searches_subfolders(tmp_path: Path):
    touch(tmp_path / "videos", "a.avi", "a.mp4", "notes.txt")
    touch(tmp_path / "videos" / "part2", "b.webm")

    index = VideoIndex(tmp_path / "videos")

    assert index.find(["a"]) == str(tmp_path / "videos" / "a.mp4")
    assert index.find(["missing", "b"]) == str(tmp_path / "videos" / "part2" / "b.webm")
    assert index.find(["notes"]) is None
    assert VideoIndex(tmp_path / "videos", extensions=[".avi"]).find(["a"]) == str(
        tmp_path / "videos" / "a.avi"
    )


def test_msvd_qa(tmp_path: Path):
    touch(tmp_path / "videos", "vid1.avi", "vid2.avi")
    qa = write_json(
        tmp_path / "test_qa.json",
        [
            {"answer": "man", "id": 0, "question": "who is singing ?", "video_id": 1},
            {"answer": "guitar", "id": 1, "question": "what is he playing ?", "video_id": 2},
            {"answer": "dog", "id": 2, "question": "Which animal runs ?", "video_id": 3},
            {"answer": "two", "id": 3, "question": "count the cats", "video_id": 1},
        ],
    )

    conversion = convert_msvd_qa(qa, tmp_path / "videos")

    assert conversion.examples == [
        VideoQAExample("msvd-0", str(tmp_path / "videos" / "vid1.avi"), "who is singing ?", "man", "who"),
        VideoQAExample(
            "msvd-1", str(tmp_path / "videos" / "vid2.avi"), "what is he playing ?", "guitar", "what"
        ),
        VideoQAExample("msvd-3", str(tmp_path / "videos" / "vid1.avi"), "count the cats", "two", "other"),
    ]
    assert conversion.missing_videos == ["3"]
    assert conversion.skipped_questions == 1


def test_msrvtt_qa_with_video_names_and_no_ids(tmp_path: Path):
    touch(tmp_path / "videos", "video7.mp4", "video8.mp4")
    qa = write_json(
        tmp_path / "val_qa.json",
        [
            {"answer": "car", "question": "what is shown ?", "video_id": 7},
            {"answer": "woman", "question": "who talks ?", "video": "video8"},
        ],
    )

    conversion = convert_msrvtt_qa(qa, tmp_path / "videos")

    assert [(e.id, Path(e.video).name) for e in conversion.examples] == [
        ("msrvtt-0", "video7.mp4"),
        ("msrvtt-1", "video8.mp4"),
    ]
    assert conversion.missing_videos == []


def test_qa_list_errors_name_the_file_and_item(tmp_path: Path):
    touch(tmp_path / "videos", "vid1.avi")
    qa = write_json(
        tmp_path / "qa.json", [{"answer": "a", "question": "q ?", "video_id": 1}, {"answer": "a"}]
    )
    with pytest.raises(DatasetError, match=r"qa\.json: item 1: 'video'"):
        convert_msvd_qa(qa, tmp_path / "videos")

    duplicated = write_json(
        tmp_path / "dup.json",
        [{"id": 5, "answer": "a", "question": "q ?", "video_id": 1}] * 2,
    )
    with pytest.raises(DatasetError, match="duplicate id 'msvd-5'"):
        convert_msvd_qa(duplicated, tmp_path / "videos")

    with pytest.raises(DatasetError, match="expected a JSON list"):
        convert_msvd_qa(write_json(tmp_path / "dict.json", {"a": 1}), tmp_path / "videos")


def test_activitynet_qa(tmp_path: Path):
    touch(tmp_path / "videos", "v_abc.mp4", "xyz.mkv")
    questions = write_json(
        tmp_path / "test_q.json",
        [
            {"video_name": "abc", "question": "is the man running", "question_id": "v_abc_1"},
            {"video_name": "xyz", "question": "what color is the ball", "question_id": "v_xyz_0"},
            {"video_name": "xyz", "question": "where is it", "question_id": "v_xyz_1"},
            {"video_name": "gone", "question": "what happens", "question_id": "v_gone_0"},
        ],
    )
    answers = write_json(
        tmp_path / "test_a.json",
        [
            {"answer": "yes", "type": 3, "question_id": "v_abc_1"},
            {"answer": "red", "type": 4, "question_id": "v_xyz_0"},
            {"answer": "nothing", "type": 8, "question_id": "v_gone_0"},
        ],
    )

    conversion = convert_activitynet_qa(questions, answers, tmp_path / "videos")

    assert conversion.examples == [
        VideoQAExample(
            "v_abc_1", str(tmp_path / "videos" / "v_abc.mp4"), "is the man running", "yes", "yes_no"
        ),
        VideoQAExample(
            "v_xyz_0", str(tmp_path / "videos" / "xyz.mkv"), "what color is the ball", "red", "color"
        ),
        VideoQAExample("v_xyz_1", str(tmp_path / "videos" / "xyz.mkv"), "where is it", None, None),
    ]
    assert conversion.missing_videos == ["gone"]
    assert conversion.skipped_questions == 1


def test_cli_writes_loadable_jsonl_and_reports_missing_videos(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    touch(tmp_path / "videos", "vid1.mp4")
    qa = write_json(
        tmp_path / "qa.json",
        [
            {"answer": "man", "id": 0, "question": "who ?", "video_id": 1},
            {"answer": "cat", "id": 1, "question": "what ?", "video_id": 2},
            {"answer": "dog", "id": 2, "question": "what ?", "video_id": 2},
        ],
    )
    out = tmp_path / "out" / "test.jsonl"
    args = ["msvd", "--qa", str(qa), "--video-dir", str(tmp_path / "videos"), "--out", str(out)]

    assert main([*args, "--strict"]) == 1
    assert not out.exists()
    assert "1 videos not found" in capsys.readouterr().err

    assert main(args) == 0
    captured = capsys.readouterr()
    assert "2 questions skipped" in captured.err
    assert "wrote 1 examples" in captured.out
    assert load_jsonl(out) == [
        VideoQAExample("msvd-0", str(tmp_path / "videos" / "vid1.mp4"), "who ?", "man", "who")
    ]


def test_cli_activitynet(tmp_path: Path):
    touch(tmp_path / "videos", "v_abc.mp4")
    questions = write_json(tmp_path / "q.json", [{"video_name": "abc", "question": "q", "question_id": "1"}])
    answers = write_json(tmp_path / "a.json", [{"answer": "yes", "type": 3, "question_id": "1"}])
    out = tmp_path / "anet.jsonl"

    status = main(
        ["activitynet", "--questions", str(questions), "--answers", str(answers)]
        + ["--video-dir", str(tmp_path / "videos"), "--out", str(out), "--strict"]
    )

    assert status == 0
    assert load_jsonl(out)[0].type == "yes_no"


def test_check_data_counts_unlabelled_training_lines_and_refuses_them_in_val(tmp_path: Path) -> None:
    """Training lines may omit the answer (counted); a val or test line without one is an error
    naming the split, the file and a line, since accuracy is measured against the answers."""
    labelled = '{"question": "q", "answer": "a"}\n'
    (tmp_path / "train.jsonl").write_text(
        labelled + '{"question": "q2"}\n{"question": "q3", "answer": null}\n'
    )
    (tmp_path / "val.jsonl").write_text(labelled)
    (tmp_path / "test.jsonl").write_text(labelled + '{"question": "q4", "id": "no-answer"}\n')
    cfg = load_config(None, [f"data.{s}={tmp_path / s}.jsonl" for s in ("train", "val", "test")])
    with pytest.raises(
        DatasetError, match=r"data.test = .*test.jsonl: 1 line\(s\) without an answer .*'no-answer'"
    ):
        check_data(cfg)
    (tmp_path / "test.jsonl").write_text(labelled)
    counts = check_data(cfg)
    assert counts["train"]["without_answer"] == 2 and counts["train"]["examples"] == 3
    assert counts["val"]["without_answer"] == counts["test"]["without_answer"] == 0
