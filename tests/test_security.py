"""Secrets and untrusted answers: the judge's API key goes to the judge and nowhere else, and nothing
a judge answers is ever run as code.

The judge is the scriptable OpenAI-compatible server of ``test_ranker_openai`` (a real HTTP server on
127.0.0.1): it checks the key it is sent, and its error messages echo the Authorization header, as a
careless proxy might, so that a key that reached an error message would show up in the logs.
"""

from __future__ import annotations

import ast
import json
import logging
import pickle
import traceback
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import ray
import yaml
from test_ranker_openai import ANSWERS, KEY_ENV, FakeJudgeServer, make_group, openai_cfg

from rlaif_ray.config import Config, ConfigError, load_config
from rlaif_ray.ranker import InvalidOrdering, RankerWorker, make_backend, parse_ordering
from rlaif_ray.ranker.backends import read_api_key

FAKE_KEY = "sk-rlaif-FAKE-0123456789-secret"  # recognisable anywhere it might leak
RANKER_SOURCES = Path(__file__).resolve().parents[1] / "rlaif_ray" / "ranker"


@pytest.fixture
def judge() -> Iterator[FakeJudgeServer]:
    """The judge, accepting FAKE_KEY only, its error messages echoing the key it got."""
    server = FakeJudgeServer()
    server.expected_key, server.echo_key = FAKE_KEY, True
    server.thread.start()
    yield server
    server.release.set()
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def everything_logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The HTTP client's loggers at DEBUG (they log requests and responses there), ours at INFO, the
    rest at WARNING (the worker's logging set-up), all into ``caplog``."""
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def assert_no_key(*texts: str) -> None:
    for text in texts:
        assert FAKE_KEY not in text
        assert FAKE_KEY[8:24] not in text  # nor a good part of it


def leak_surface(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> list[str]:
    """What a user or a log collector could read: log records (formatted, with their arguments)
    and everything the process printed."""
    out, err = capfd.readouterr()
    records = [f"{r.name} {r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records]
    return [*records, out, err]


def test_key_from_the_environment_reaches_the_judge_and_nowhere_else(
    judge: FakeJudgeServer,
    monkeypatch: pytest.MonkeyPatch,
    everything_logged: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    cfg = openai_cfg(judge, max_retries=1, openai_max_retries=1)
    worker = RankerWorker(cfg, group_size=4)
    assert worker.rank_group(make_group(ANSWERS, group_id="ok")).rank_status == "ok"
    judge.fail_first = judge.calls + 100  # from now on: 500, the message echoing the key
    group = worker.rank_group(make_group(ANSWERS, group_id="failing"))
    assert group.rank_status == "fallback_tie"
    with pytest.raises(openai.InternalServerError) as info:
        worker.backend.complete("a prompt")
    exc = info.value
    assert "request had Authorization: Bearer ***" in str(exc)  # the echo, scrubbed
    assert set(judge.auth_headers) == {f"Bearer {FAKE_KEY}"}  # the key did go to the judge
    assert_no_key(
        str(exc),
        repr(exc),
        exc.message,
        repr(exc.args),
        str(exc.body),
        "".join(traceback.format_exception(exc)),
        json.dumps(worker.stats()),
        repr(group),
        yaml.safe_dump(load_config(None, [f"ranker.openai_api_key_env={KEY_ENV}"]).to_dict()),
        pickle.dumps(cfg).decode("latin-1"),
        *leak_surface(everything_logged, capfd),
    )
    assert any("request had Authorization: Bearer ***" in r.getMessage() for r in everything_logged.records)


def test_key_from_a_file_reaches_the_judge_and_nowhere_else(
    judge: FakeJudgeServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    everything_logged: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-the-wrong-one")  # the file wins over the environment
    key_file = tmp_path / "judge.key"
    key_file.write_text(f"  {FAKE_KEY}\n")
    cfg = load_config(
        None,
        [
            "ranker.backend=openai",
            "ranker.openai_frames=0",
            f"ranker.openai_base_url={judge.base_url}",
            f"ranker.openai_api_key_env={KEY_ENV}",
            f"ranker.openai_api_key_file={key_file}",
            "ranker.openai_backoff_s=0.01",
            "ranker.max_retries=0",
            "ranker.openai_max_retries=1",
            "rl.group_size=4",
        ],
    )
    worker = RankerWorker(cfg.ranker, group_size=4)
    assert worker.rank_group(make_group(ANSWERS)).rank_status == "ok"
    judge.fail_first, judge.fail_status = judge.calls + 100, 503
    assert worker.rank_group(make_group(ANSWERS, group_id="failing")).rank_status == "fallback_tie"
    assert set(judge.auth_headers) == {f"Bearer {FAKE_KEY}"}
    assert worker.stats()["errors"] == {"InternalServerError": 1}
    dump = yaml.safe_dump(cfg.to_dict(), sort_keys=False)  # what launch writes to config.yaml
    assert f"openai_api_key_file: {key_file}" in dump  # the file's name only
    assert_no_key(dump, json.dumps(worker.stats()), *leak_surface(everything_logged, capfd))


def test_a_rejected_key_is_not_repeated_in_the_error(
    judge: FakeJudgeServer,
    monkeypatch: pytest.MonkeyPatch,
    everything_logged: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    judge.expected_key = "sk-the-right-one"
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    worker = RankerWorker(openai_cfg(judge, max_retries=1), group_size=4)
    group = worker.rank_group(make_group(ANSWERS, group_id="rejected"))
    assert group.rank_status == "fallback_tie" and judge.calls == 2  # 401 is not retried by back-off
    assert worker.stats()["errors"] == {"AuthenticationError": 2}
    messages = [r.getMessage() for r in everything_logged.records if r.name == "rlaif_ray.ranker.worker"]
    assert any(
        "group rejected" in m and "invalid API key (request had Authorization: Bearer ***)" in m
        for m in messages
    )
    assert_no_key(*leak_surface(everything_logged, capfd))


def test_key_file_errors_name_the_file(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["ranker.backend=openai", f"ranker.openai_api_key_file={tmp_path / 'absent.key'}"]
    )
    with pytest.raises(
        ValueError, match=r"ranker.openai_api_key_file: cannot read .*absent.key: No such file"
    ):
        make_backend(cfg.ranker)
    (tmp_path / "empty.key").write_text("\n\n")
    cfg.ranker.openai_api_key_file = str(tmp_path / "empty.key")
    with pytest.raises(ValueError, match=r"empty.key is empty \(its first line must be the key\)"):
        read_api_key(cfg.ranker)


def test_a_key_pasted_as_the_variable_name_is_refused_without_echo() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"ranker.openai_api_key_env={FAKE_KEY}"])
    assert "ranker.openai_api_key_env" in str(info.value) and "not the key itself" in str(info.value)
    assert_no_key(str(info.value))


MARKER = "pwned-by-the-judge"


def harmful_answers(marker: Path) -> list[str]:
    """Judge answers that would create ``marker`` (or worse) if anything evaluated them."""
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    return [
        f"ranking: {touch}",
        f"ranking: 0 > 1 > 2 > 3; {touch}",
        f"ranking: [0, 1, 2, 3] if {touch} else 0",
        "ranking: eval('0') > 1 > 2 > 3",
        "ranking: {{7*7}} > 0 > 1 > 2",
        "ranking: ０ > １ > ２ > ３",  # full-width digits: int() would take them, the format does not
        "ranking: 0x1 > 0 > 2 > 3",
        "ranking: 1_0 > 0 > 2 > 3",
        f"!!python/object/apply:os.system ['touch {marker}']",
        json.dumps({"ranking": f"{touch}"}),
    ]


def test_harmful_answers_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / MARKER
    for answer in harmful_answers(marker):
        with pytest.raises(InvalidOrdering):
            parse_ordering(answer, 4)
    assert not marker.exists()


def test_harmful_answers_through_the_judge_fall_back_and_never_run(
    judge: FakeJudgeServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    marker = tmp_path / MARKER
    answers = iter(harmful_answers(marker))
    judge.reply = lambda prompt: next(answers)
    worker = RankerWorker(openai_cfg(judge, max_retries=1), group_size=4)
    groups = worker.rank_groups([make_group(ANSWERS, group_id=f"h{i}") for i in range(5)])
    assert [g.rank_status for g in groups] == ["fallback_tie"] * 5
    assert worker.stats()["invalid"] == 10 and judge.calls == 10
    assert not marker.exists()


FORBIDDEN_CALLS = {
    "eval",
    "exec",
    "compile",
    "__import__",
    "ast.literal_eval",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "os.system",
    "os.popen",
}
FORBIDDEN_MODULES = {"pickle", "marshal", "subprocess", "shelve"}


def dotted_name(node: ast.expr) -> str:
    """``a.b.c`` for a name or attribute chain, "" for anything else (a call's result, a subscript)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def test_the_ranker_code_has_no_way_to_run_an_answer() -> None:
    """Nothing in the ranker package can evaluate text: no eval, exec, compile (the builtin; re's is
    fine), __import__, ast.literal_eval, yaml.load, os.system or os.popen call, no pickle, marshal,
    subprocess or shelve import. A judge answer is read with string operations and int() of ASCII
    digits only."""
    found = []
    for path in sorted(RANKER_SOURCES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and dotted_name(node.func) in FORBIDDEN_CALLS:
                found.append(f"{path.name}:{node.lineno} {dotted_name(node.func)}()")
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names = (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                )
                found += [
                    f"{path.name}:{node.lineno} import {n}"
                    for n in names
                    if n.split(".")[0] in FORBIDDEN_MODULES
                ]
    assert found == []
    assert len(list(RANKER_SOURCES.glob("*.py"))) >= 5  # the scan saw the package


def test_local_dashboard_listens_on_loopback_only(small_config: Config) -> None:
    """The Ray the launcher starts serves its dashboard on 127.0.0.1 unless ``dashboard_host`` says otherwise."""
    from rlaif_ray.launch import init_ray

    context = init_ray(small_config)
    try:
        assert context.dashboard_url.startswith("127.0.0.1:"), context.dashboard_url
    finally:
        ray.shutdown()
