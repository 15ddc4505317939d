"""A local OpenAI-compatible judge with a fixed answer delay and a cap on requests in flight.

    judge = start_delayed_judge(delay_s=0.2, max_inflight=32)
    cfg.ranker.openai_base_url = judge.base_url
    ...
    judge.stop()

A stdlib ``ThreadingHTTPServer`` on 127.0.0.1 (an ephemeral port, a thread per connection, HTTP/1.1
keep-alive) answers ``POST /v1/chat/completions``. Each request first takes one of ``max_inflight``
slots (a semaphore: extra requests wait for a slot), then sleeps ``delay_s``, then answers with a
valid ordering line, so the judge's own limit is ``max_inflight / delay_s`` requests per second,
like a served model whose batch is full. Its answer ranks the prompt's candidates with the
ground-truth rule against the prompt's reference answer (``rule="reference"``; without a reference
every candidate ties) or in the order they are listed (``rule="order"``). It listens on
127.0.0.1 only: ranker actors on other nodes of a cluster cannot reach it.

:meth:`DelayedJudge.stats` says how many requests were answered, the most that were in service or
waiting at once, and the time-weighted mean number in service since the last
:meth:`DelayedJudge.reset_stats`: what a client kept in flight, seen from the server. Used by
``bench/ranker_scaling.py`` and ``bench/async.py``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rlaif_ray.ranker import GroundTruthRanker, RankPrompt, format_ordering

_CANDIDATE_LINE = re.compile(r"^\[(\d+)\] (.*)$", re.MULTILINE)
_REFERENCE_LINE = re.compile(r"^Reference answer: (.*)$", re.MULTILINE)
_EMPTY = "(empty answer)"  # how rlaif_ray.ranker.prompting shows an empty candidate
RULES = ("reference", "order")


def judge_reply(prompt: str, rule: str = "reference") -> str:
    """The judge's answer to a ranking prompt of :func:`rlaif_ray.ranker.build_ranking_prompt`."""
    candidates = ["" if text == _EMPTY else text for _, text in _CANDIDATE_LINE.findall(prompt)]
    if rule == "order":
        ordering: list[Any] = list(range(len(candidates)))
    else:
        reference = _REFERENCE_LINE.search(prompt)
        if reference is None:
            ordering = [list(range(len(candidates)))]
        else:
            ordering = GroundTruthRanker().rank(RankPrompt("", reference.group(1)), candidates)
    return "Ranked by the bench judge.\n" + format_ordering(ordering)


class _Server(ThreadingHTTPServer):
    # Many clients connect at once (8 ranker actors x their threads): the default listen backlog
    # of 5 would make the extra connections wait for the kernel's SYN retry (about a second).
    request_queue_size = 256
    daemon_threads = True


class DelayedJudge:
    """The server; start it with :func:`start_delayed_judge`."""

    def __init__(self, delay_s: float, max_inflight: int, rule: str = "reference") -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if max_inflight < 1 or delay_s < 0:
            raise ValueError("max_inflight must be >= 1 and delay_s >= 0")
        self.delay_s = delay_s
        self.max_inflight = max_inflight
        self.rule = rule
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._lock = threading.Lock()
        self.reset_stats()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.judge = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def limit_per_s(self) -> float:
        """Requests per second the judge can answer at most (``max_inflight / delay_s``)."""
        return self.max_inflight / self.delay_s if self.delay_s > 0 else float("inf")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset_stats(self) -> None:
        with self._lock:
            self._since = time.perf_counter()
            self._answered = 0
            self._in_service = 0
            self._waiting = 0
            self._max_in_service = 0
            self._max_waiting = 0
            self._area = 0.0  # integral of the number in service over time
            self._last = self._since

    def stats(self) -> dict[str, Any]:
        """Since the last reset: requests answered, most in service / waiting at once, and the
        time-weighted mean number in service (``max_inflight`` means the judge was full)."""
        with self._lock:
            self._advance()
            elapsed = self._last - self._since
            return {
                "answered": self._answered,
                "max_in_service": self._max_in_service,
                "max_waiting": self._max_waiting,
                "mean_in_service": self._area / elapsed if elapsed > 0 else 0.0,
                "elapsed_s": elapsed,
            }

    def _advance(self) -> None:
        now = time.perf_counter()
        self._area += self._in_service * (now - self._last)
        self._last = now

    def answer(self, body: dict[str, Any]) -> str:
        with self._lock:
            self._waiting += 1
            self._max_waiting = max(self._max_waiting, self._waiting)
        with self._slots:
            with self._lock:
                self._waiting -= 1
                self._advance()
                self._in_service += 1
                self._max_in_service = max(self._max_in_service, self._in_service)
            try:
                time.sleep(self.delay_s)
                content = body["messages"][-1]["content"]
                if isinstance(content, list):  # frames and text: the judge reads the text
                    content = "\n".join(part["text"] for part in content if part.get("type") == "text")
                return judge_reply(content, self.rule)
            finally:
                with self._lock:
                    self._advance()
                    self._in_service -= 1
                    self._answered += 1


def start_delayed_judge(
    delay_s: float = 0.2, max_inflight: int = 32, rule: str = "reference"
) -> DelayedJudge:
    """Start a judge on 127.0.0.1 in background threads; ``.base_url`` for the client, ``.stop()``."""
    return DelayedJudge(delay_s, max_inflight, rule)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a served model's endpoint
    # Headers and body leave in one segment (flushed after each request), and without Nagle's
    # algorithm: else a kept-alive connection waits for the client's delayed ACK (~40 ms) between them.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        content = self.server.judge.answer(body)  # type: ignore[attr-defined]
        self._send(
            200,
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "judge"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) and left

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: one line per request would drown the benchmark's output."""
