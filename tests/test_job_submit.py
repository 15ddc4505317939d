"""`ray job submit` of the launch entry point against a `ray start --head` cluster of our own."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rlaif_ray.config import Config
from rlaif_ray.learner.engine import free_port

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def head_node():
    """A Ray head node with a 'ranker' resource; `ray stop` on exit (token auth stays on)."""
    port, dashboard = free_port(), free_port()
    # A short temp dir: Ray's unix sockets live there and their paths have a length limit.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    # A token of the test's own: a fresh machine has no ~/.ray/auth_token yet.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=4",
            '--resources={"ranker": 2}',
            f"--temp-dir={temp_dir}",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_succeeds(head_node, small_config: Config, tmp_path: Path) -> None:
    address, env = head_node
    cfg = small_config
    run_dir = tmp_path / "job_run"
    overrides = [
        f"data.train={cfg.data.train}",
        f"data.val={cfg.data.val}",
        f"data.test={cfg.data.test}",
        "data.synthetic_dir=null",
        f"model.path={cfg.model.path}",
        f"sft.output_dir={cfg.sft.output_dir}",
        "sft.steps=5",
        "sft.eval_every=5",
        "sft.batch_size=8",
        "rl.steps=2",
        "rl.prompts_per_step=4",
        "rl.group_size=4",
        "rl.eval_examples=8",
        f"run_dir={run_dir}",
    ]
    submit = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            f"--address={address}",
            f"--working-dir={REPO}",
            "--submission-id=rlaif-test",
            "--",
            sys.executable,
            "-m",
            "rlaif_ray.launch",
            "--config",
            "configs/default.yaml",
            *overrides,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    # The job's status from the Jobs API (in a process whose RAY_AUTH_MODE is set from the start).
    query = (
        "from ray.job_submission import JobSubmissionClient as C; "
        f"print(C({address!r}).get_job_status('rlaif-test').value)"
    )
    status = subprocess.run(
        [sys.executable, "-c", query], env=env, capture_output=True, text=True, timeout=120
    )
    lines = status.stdout.strip().splitlines()
    assert lines and lines[-1] == "SUCCEEDED", (
        submit.stdout[-3000:] + submit.stderr[-3000:] + status.stderr[-2000:]
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["accuracy_after"] <= 1.0
