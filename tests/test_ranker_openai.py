"""The ``openai`` ranker backend against a real OpenAI-compatible HTTP server on 127.0.0.1.

The server (stdlib ``ThreadingHTTPServer``) answers POST /v1/chat/completions. Its behaviour is
scripted per test: rank the candidates it reads from the prompt with the ground-truth rule, answer
garbage (or no content at all), fail the first k calls with an HTTP status, sleep before answering,
or hang until released. It records the Authorization headers, the request bodies and the most
requests it had in flight at once. With ``expected_key`` it answers 401 to any other key, and with
``echo_key`` its error messages repeat the Authorization header it got, as a careless proxy might.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from rlaif_ray.algo.advantages import ranks_from_orderings
from rlaif_ray.config import RankerConfig
from rlaif_ray.groups import Group
from rlaif_ray.learner.engine import free_port
from rlaif_ray.ranker import (
    GroundTruthRanker,
    OpenAIRanker,
    RankerWorker,
    RankPrompt,
    format_ordering,
    make_backend,
)
from rlaif_ray.ranker.prompting import ordering_lines, ordering_regex

KEY_ENV = "RLAIF_RAY_TEST_JUDGE_KEY"
_CANDIDATE_LINE = re.compile(r"^\[(\d+)\] (.*)$", re.MULTILINE)
_REFERENCE_LINE = re.compile(r"^Reference answer: (.*)$", re.MULTILINE)


def rank_by_reference(prompt: str) -> str:
    """A well-behaved judge: reasons in one line, then ranks the prompt's candidates by the reference."""
    reference = _REFERENCE_LINE.search(prompt)
    candidates = [text for _, text in _CANDIDATE_LINE.findall(prompt)]
    ordering = GroundTruthRanker().rank(RankPrompt("", reference.group(1) if reference else ""), candidates)
    return "I compared every candidate with the reference.\n" + format_ordering(ordering)


class FakeJudgeServer:
    """A scriptable OpenAI-compatible chat-completions server on an ephemeral port."""

    def __init__(self) -> None:
        self.reply: Callable[[str], str | None] = rank_by_reference
        self.fail_first = 0
        self.fail_status = 500
        self.delay_s = 0.0
        self.expected_key: str | None = None
        self.echo_key = False
        self.release = threading.Event()  # set at teardown: ends every delay and hang at once
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth_headers: list[str | None] = []
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.judge = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def handle(self, body: dict, authorization: str | None) -> tuple[int, dict]:
        with self.lock:
            self.calls += 1
            call = self.calls
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.auth_headers.append(authorization)
            self.bodies.append(body)
        try:
            self.release.wait(self.delay_s)
            echo = f" (request had Authorization: {authorization})" if self.echo_key else ""
            if self.expected_key is not None and authorization != f"Bearer {self.expected_key}":
                return 401, {"error": {"message": f"invalid API key{echo}", "type": "invalid_request_error"}}
            if call <= self.fail_first:
                return self.fail_status, {
                    "error": {"message": f"scripted failure {call}{echo}", "type": "server_error"}
                }
            message = body["messages"][-1]["content"]
            if isinstance(message, list):  # content parts: images first, then the text
                message = next(part["text"] for part in message if part["type"] == "text")
            content = self.reply(message)
            return 200, {
                "id": f"chatcmpl-{call}",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        finally:
            with self.lock:  # before the reply is written, so the client cannot overlap the next call
                self.in_flight -= 1


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, payload = self.server.judge.handle(body, self.headers.get("Authorization"))  # type: ignore[attr-defined]
        self._send(status, payload)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def server() -> Iterator[FakeJudgeServer]:
    judge = FakeJudgeServer()
    judge.thread.start()
    yield judge
    judge.release.set()
    judge.httpd.shutdown()
    judge.httpd.server_close()


def openai_cfg(server: FakeJudgeServer, **overrides: object) -> RankerConfig:
    values: dict = dict(
        backend="openai",
        openai_base_url=server.base_url,
        openai_model="tiny-judge",
        openai_api_key_env=KEY_ENV,
        openai_timeout_s=2.0,
        openai_backoff_s=0.01,
        openai_max_concurrency=2,
        max_retries=2,
        openai_frames=0,  # a text-only judge: the groups here have no video to decode
    )
    values.update(overrides)
    return RankerConfig(**values)


def make_group(completions: list[str], group_id: str = "g0", reference: str | None = "red circle") -> Group:
    return Group(
        group_id=group_id,
        example_id="ex0",
        video="videos/ex0.mp4",
        question="What shape is moving?",
        reference=reference,
        completions=completions,
        completion_ids=[[1] for _ in completions],
        logprobs=[[-1.0] for _ in completions],
        weight_version=3,
    )


ANSWERS = ["blue square", "red circle", "red square", "Red circle."]


def worker_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages the ranker worker logged (the backend's own lines left out)."""
    return [r.getMessage() for r in caplog.records if r.name == "rlaif_ray.ranker.worker"]


def test_ranks_a_group_through_http(server: FakeJudgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    cfg = openai_cfg(server)
    worker = RankerWorker(cfg, group_size=4)
    assert isinstance(worker.backend, OpenAIRanker)
    group = worker.rank_group(make_group(ANSWERS))
    expected = ranks_from_orderings([GroundTruthRanker().rank(RankPrompt("", "red circle"), ANSWERS)], 4)[
        0
    ].tolist()
    assert group.rank_status == "ok" and group.rank_attempts == 1
    assert group.ranks == expected == [3.0, 0.5, 2.0, 0.5]
    assert group.scores is None  # an API judge ranks, it does not score
    assert server.auth_headers == ["Bearer sk-test-123"]
    body = server.bodies[0]
    assert body["model"] == "tiny-judge" and body["temperature"] == 0.0
    prompt = body["messages"][-1]["content"]
    assert "What shape is moving?" in prompt and "Reference answer: red circle" in prompt
    assert all(f"[{i}] {answer}" in prompt for i, answer in enumerate(ANSWERS))
    assert "structured_outputs" not in body  # off by default
    assert worker.stats()["errors"] == {}


def test_structured_output_request_field(server: FakeJudgeServer) -> None:
    backend = make_backend(openai_cfg(server, openai_structured_output=True))
    assert backend.rank(RankPrompt("q", "red circle"), ANSWERS) == [[1, 3], 2, 0]
    assert server.bodies[0]["structured_outputs"] == {"choice": list(ordering_lines(4))}
    seven = ["red circle", "blue", "red", "green", "red circle", "blue square", "up"]
    assert backend.rank(RankPrompt("q", "red circle"), seven) == [[0, 4], 2, [1, 3, 6], 5]
    assert server.bodies[1]["structured_outputs"] == {"regex": ordering_regex(7)}


def test_missing_key_env_sends_dummy_key(server: FakeJudgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    ordering = make_backend(openai_cfg(server)).rank(RankPrompt("q", "red"), ["blue", "red"])
    assert ordering == [1, 0]
    assert server.auth_headers == ["Bearer EMPTY"]


def test_garbage_answers_fall_back_to_tie(server: FakeJudgeServer) -> None:
    server.reply = lambda prompt: "Candidate 1 is clearly the best one."
    worker = RankerWorker(openai_cfg(server, max_retries=2), group_size=4)
    group = worker.rank_group(make_group(ANSWERS))
    assert group.rank_status == "fallback_tie" and group.ranks == [1.5] * 4
    assert server.calls == 3
    stats = worker.stats()
    assert stats["invalid"] == 3 and stats["fallbacks"] == 1 and stats["errors"] == {"InvalidOrdering": 3}


def test_a_reply_that_is_no_chat_completion_is_a_counted_failure(
    server: FakeJudgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 200 whose JSON is not an object (here a list) is an error naming the server, retried by
    the worker, then the fallback."""
    monkeypatch.setattr(server, "handle", lambda body, authorization: (200, ["not", "a", "completion"]))
    backend = make_backend(openai_cfg(server))
    with pytest.raises(ValueError, match=f"{server.base_url}.*no JSON object"):
        backend.rank(RankPrompt("q", "red"), ["blue", "red"])
    worker = RankerWorker(openai_cfg(server, max_retries=1), group_size=4)
    group = worker.rank_group(make_group(ANSWERS))
    assert group.rank_status == "fallback_tie" and worker.stats()["errors"] == {"ValueError": 2}


@pytest.mark.parametrize("status", [500, 429])
def test_transient_errors_are_retried_with_backoff(server: FakeJudgeServer, status: int) -> None:
    server.fail_first, server.fail_status = 2, status
    cfg = openai_cfg(server, max_retries=0, openai_max_retries=2, openai_backoff_s=0.05)
    worker = RankerWorker(cfg, group_size=4)
    start = time.perf_counter()
    group = worker.rank_group(make_group(ANSWERS))
    assert time.perf_counter() - start >= 0.05 + 0.1  # back-off 0.05 s, then 0.1 s
    assert group.rank_status == "ok" and group.ranks == [3.0, 0.5, 2.0, 0.5]
    assert server.calls == 3
    assert worker.backend.transport_retries == 2
    stats = worker.stats()
    assert stats["attempts"] == 1 and stats["errors"] == {}


def test_persistent_server_errors_are_counted_and_fall_back(server: FakeJudgeServer) -> None:
    server.fail_first = 100
    worker = RankerWorker(openai_cfg(server, max_retries=1, openai_max_retries=2), group_size=4)
    group = worker.rank_group(make_group(ANSWERS))
    assert group.rank_status == "fallback_tie" and group.rank_attempts == 2
    assert server.calls == 6  # 2 worker attempts x (1 call + 2 back-off retries): the documented bound
    assert worker.backend.transport_retries == 4
    assert worker.stats()["errors"] == {"InternalServerError": 2}


def test_client_errors_are_not_retried_by_backoff(server: FakeJudgeServer) -> None:
    server.fail_first, server.fail_status = 100, 400
    worker = RankerWorker(openai_cfg(server, max_retries=1, openai_max_retries=2), group_size=4)
    assert worker.rank_group(make_group(ANSWERS)).rank_status == "fallback_tie"
    assert server.calls == 2  # one call per worker attempt
    assert worker.backend.transport_retries == 0
    assert worker.stats()["errors"] == {"BadRequestError": 2}


def test_timeout_is_a_counted_failure(server: FakeJudgeServer) -> None:
    server.delay_s = 0.5
    cfg = openai_cfg(server, openai_timeout_s=0.1, max_retries=1, openai_max_retries=1, fallback="drop")
    worker = RankerWorker(cfg, group_size=4)
    group = worker.rank_group(make_group(ANSWERS))
    assert group.rank_status == "dropped" and group.ranks is None
    assert worker.backend.transport_retries == 2
    # 2 worker attempts x (1 call + 1 back-off retry), all timed out; the server may log the last late.
    deadline = time.monotonic() + 2.0
    while server.calls < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.calls == 4
    stats = worker.stats()
    assert stats["dropped"] == 1 and stats["errors"] == {"APITimeoutError": 2}


def test_concurrency_limit_through_rank_groups(server: FakeJudgeServer) -> None:
    server.delay_s = 0.2
    worker = RankerWorker(openai_cfg(server, openai_max_concurrency=2), group_size=4)
    groups = worker.rank_groups([make_group(ANSWERS, group_id=f"g{i}") for i in range(6)])
    assert [g.rank_status for g in groups] == ["ok"] * 6
    assert all(g.ranks == [3.0, 0.5, 2.0, 0.5] for g in groups)
    assert server.calls == 6
    assert server.max_in_flight == 2  # never more than the limit, and it did overlap


def test_semaphore_bounds_direct_callers(server: FakeJudgeServer) -> None:
    server.delay_s = 0.2
    backend = make_backend(openai_cfg(server, openai_max_concurrency=2))
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(backend.rank(RankPrompt("q", "red"), ["blue", "red"])))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [[1, 0]] * 4
    assert server.calls == 4 and server.max_in_flight == 2


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        ("ranking: 1 = 3 > 2", r"indices [0] missing"),
        ("ranking: 1 = 3 > 2 > 0 > 1", "index 1 appears twice"),
        ("ranking: 1 = 3 > 2 > 4", "index 4 out of range 0..3"),
        ("The second answer is the best one, then the fourth.", "no 'ranking:' line"),
        ('{"ranking": [1, 3, 2, 0]}', "no 'ranking:' line"),
        ("", "no 'ranking:' line in judge answer ''"),
        (None, "no 'ranking:' line in judge answer ''"),  # a reply without content
    ],
)
def test_each_bad_answer_is_retried_logged_counted_then_falls_back(
    server: FakeJudgeServer, caplog: pytest.LogCaptureFixture, reply: str | None, problem: str
) -> None:
    server.reply = lambda prompt: reply
    worker = RankerWorker(openai_cfg(server, max_retries=1), group_size=4)
    with caplog.at_level(logging.WARNING, logger="rlaif_ray.ranker.worker"):
        group = worker.rank_group(make_group(ANSWERS, group_id="bad-7"))
    assert group.rank_status == "fallback_tie" and group.ranks == [1.5] * 4 and group.rank_attempts == 2
    assert server.calls == 2
    stats = worker.stats()
    assert stats["invalid"] == 2 and stats["retries"] == 1 and stats["fallbacks"] == 1
    assert stats["errors"] == {"InvalidOrdering": 2} and stats["deadline_expired"] == 0
    messages = worker_messages(caplog)
    assert len(messages) == 3 and all("group bad-7 " in m and problem in m for m in messages)
    assert messages[-1].endswith("fallback_tie (ranker.fallback=tie)")


@pytest.mark.parametrize(("status", "error"), [(500, "InternalServerError"), (429, "RateLimitError")])
def test_persistent_http_errors_fall_back_after_the_documented_bound(
    server: FakeJudgeServer, status: int, error: str
) -> None:
    server.fail_first, server.fail_status = 100, status
    worker = RankerWorker(openai_cfg(server, max_retries=1, openai_max_retries=1), group_size=4)
    group = worker.rank_group(make_group(ANSWERS))
    assert group.rank_status == "fallback_tie" and group.rank_attempts == 2
    assert server.calls == 4  # (1 + max_retries) * (1 + openai_max_retries)
    stats = worker.stats()
    assert stats["errors"] == {error: 2} and stats["transport_retries"] == 2 and stats["fallbacks"] == 1


def test_connection_refused_is_retried_with_backoff_then_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # bound and released: nothing listens there
    cfg = RankerConfig(
        backend="openai",
        openai_base_url=f"http://127.0.0.1:{port}/v1",
        openai_timeout_s=2.0,
        openai_backoff_s=0.05,
        openai_max_retries=2,
        max_retries=1,
        openai_frames=0,
    )
    worker = RankerWorker(cfg, group_size=4)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="rlaif_ray.ranker"):
        group = worker.rank_group(make_group(ANSWERS, group_id="refused"))
    assert time.perf_counter() - start >= 2 * (0.05 + 0.1)  # each attempt backed off 0.05 s, then 0.1 s
    assert group.rank_status == "fallback_tie" and group.rank_attempts == 2
    stats = worker.stats()
    assert stats["errors"] == {"APIConnectionError": 2} and stats["transport_retries"] == 4
    assert stats["fallbacks"] == 1 and stats["invalid"] == 0
    messages = [r.getMessage() for r in caplog.records]
    retries = [m for m in messages if m.startswith("openai ranker: request to")]
    assert len(retries) == 4 and all(f"127.0.0.1:{port}" in m and "retry" in m for m in retries)
    last = messages[-1]
    assert last.startswith("ranker: group refused has no valid ordering after 2 attempt(s)")
    assert "APIConnectionError: Connection error. (ConnectError:" in last and "refused" in last


def test_a_hung_judge_meets_the_group_deadline(
    server: FakeJudgeServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.delay_s = 60  # until the fixture releases it: longer than the client's timeout below
    cfg = openai_cfg(server, openai_timeout_s=30, group_deadline_s=0.5, max_retries=2)
    worker = RankerWorker(cfg, group_size=4)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="rlaif_ray.ranker.worker"):
        groups = worker.rank_groups([make_group(ANSWERS, group_id=f"h{i}") for i in range(3)])
    elapsed = time.perf_counter() - start
    assert [g.rank_status for g in groups] == ["fallback_tie"] * 3
    assert elapsed < 10  # two at a time (openai_max_concurrency=2): about 1 s, not 30 s per request
    # h0 and h1 were asked once (no attempt starts after a deadline); h2 waited for a connection
    # slot, which the two hung requests still hold until the client's timeout.
    assert server.calls == 2
    stats = worker.stats()
    assert stats["deadline_expired"] == 3 and stats["errors"] == {}
    messages = worker_messages(caplog)
    assert len(messages) == 3
    assert all(f"group h{i} passed its deadline of 0.5 s" in m for i, m in enumerate(messages))
    assert all("during attempt 1 (no answer yet)" in m for m in messages)
    server.delay_s, server.reply = 0.0, lambda prompt: "no ranking"
    server.release.set()  # the hung requests are answered; the abandoned calls end quietly
    deadline = time.monotonic() + 10
    while worker._runners.busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker._runners.busy() == 0
    assert server.calls == 3 and worker.stats()["errors"] == {} and len(worker_messages(caplog)) == 3


def decoded_images(body: dict) -> list[np.ndarray]:
    """Every image of a request's user message, decoded from its base64 data URL."""
    images = []
    for part in body["messages"][-1]["content"]:
        if part["type"] == "image_url":
            head, data = part["image_url"]["url"].split(",", 1)
            assert head == "data:image/png;base64"
            images.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))))
    return images


def test_frames_of_the_video_go_before_the_text_and_the_reference_line_only_when_known(
    server: FakeJudgeServer, synthetic_dir
) -> None:
    """``ranker.openai_frames`` evenly spaced frames of the group's video, decoded by the ranker as
    the policy samples them, reach the server as PNG images before the question and the numbered
    candidates; a prompt nobody labelled has no reference line; 0 frames sends the text alone."""
    from rlaif_ray.data.dataset import load_jsonl
    from rlaif_ray.data.frames import FrameStore

    example = load_jsonl(synthetic_dir / "test.jsonl")[0]
    frames = FrameStore(8).get(example.video)
    group = make_group(ANSWERS, group_id="seen")
    group.video, group.reference = example.video, None
    worker = RankerWorker(openai_cfg(server, openai_frames=4), group_size=4, num_frames=8)
    ranked = worker.rank_group(group)
    assert ranked.rank_status == "ok"
    body = server.bodies[-1]
    parts = body["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 4 + ["text"]
    images = decoded_images(body)
    for image, index in zip(images, [0, 2, 5, 7], strict=True):  # linspace(0, 7, 4), rounded
        assert np.array_equal(image, frames[index])
    assert "Reference answer" not in parts[-1]["text"] and "[3] Red circle." in parts[-1]["text"]
    text_only = RankerWorker(openai_cfg(server, openai_frames=0), group_size=4)
    group.reference = "red circle"
    assert text_only.rank_group(group).rank_status == "ok"
    assert isinstance(server.bodies[-1]["messages"][-1]["content"], str)
    assert "Reference answer: red circle" in server.bodies[-1]["messages"][-1]["content"]
