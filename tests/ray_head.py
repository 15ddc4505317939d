"""A ``ray start --head`` node of a test's own, for the tests that need a real cluster process
(``ray job submit``, the autoscaler): every port its own, its own short ``--temp-dir``, and stopped
by ending the processes of that temp dir only, never by ``ray stop`` (which ends every Ray process
of the machine, other users' clusters and benchmarks included).

``ray start --temp-dir=DIR`` writes the cluster's address to ``DIR/ray_current_cluster``, not to
the default ``/tmp/ray/ray_current_cluster`` that a plain ``ray.init()`` reads, and nothing here
sets ``RAY_ADDRESS``: a later test's ``ray.init()`` starts its own local Ray as before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from rlaif_ray.learner.engine import free_port

RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class HeadNode:
    """A running head node: where to reach it and the environment it was started with."""

    temp_dir: str
    gcs_address: str  # ip:port, for ray.init(address=...)
    dashboard_url: str  # http://127.0.0.1:port, for ray job submit
    env: dict[str, str]

    def log_tail(self, name: str, chars: int = 3000) -> str:
        """The end of the session log ``name`` (e.g. ``monitor.log``), for failure messages."""
        path = Path(self.temp_dir) / "session_latest" / "logs" / name
        try:
            return f"--- {name} ---\n" + path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"--- {name}: {exc.strerror} ---"


def stop_head_node(temp_dir: str) -> None:
    """End the processes of the head node started with ``--temp-dir=temp_dir`` (each names that
    folder on its command line; so do the nodes an autoscaler started from it), and their children:
    not ``ray stop``, which ends every Ray process of the machine, other users' clusters included."""
    procs = set()
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in proc.info["cmdline"] or []):
            procs.add(proc)
            with contextlib.suppress(psutil.Error):
                procs.update(proc.children(recursive=True))
    for proc in procs:  # SIGKILL, as `ray stop --force` does: gcs_server may sit out a SIGTERM
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)


def processes_of(temp_dir: str) -> list[psutil.Process]:
    """The live processes whose command line names ``temp_dir``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in proc.info["cmdline"] or []):
            found.append(proc)
    return found


@contextlib.contextmanager
def head_node(
    *args: str, env: dict[str, str] | None = None, port: int | None = None, timeout_s: float = 180
) -> Iterator[HeadNode]:
    """Start ``ray start --head ARGS`` on free ports (GCS ``port`` when given), with ``env`` added to
    this process's environment; stop it and remove its temp dir on exit. The dashboard listens on
    127.0.0.1 only; the job agent gets a port of its own: the default one (52365) may belong to
    another Ray on the machine, and an agent without its port answers every job submission with
    "No available agent"."""
    port = port or free_port()
    dashboard, agent, client = free_port(), free_port(), free_port()
    # A short temp dir: Ray's unix sockets live there and their paths have a length limit.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    full_env = {**os.environ, **(env or {})}
    try:
        start = subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                f"--dashboard-port={dashboard}",
                f"--dashboard-agent-listen-port={agent}",
                "--dashboard-host=127.0.0.1",
                f"--ray-client-server-port={client}",
                f"--temp-dir={temp_dir}",
                *args,
            ],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if start.returncode != 0:
            raise RuntimeError(f"ray start --head failed:\n{start.stdout[-3000:]}\n{start.stderr[-3000:]}")
        # The address `ray start` wrote for this cluster (in its temp dir: see the module docstring).
        gcs_address = (Path(temp_dir) / "ray_current_cluster").read_text().strip()
        yield HeadNode(temp_dir, gcs_address, f"http://127.0.0.1:{dashboard}", full_env)
    finally:
        stop_head_node(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
