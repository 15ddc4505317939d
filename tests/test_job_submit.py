"""`ray job submit` against a `ray start --head` cluster of our own: the launch entry point runs as a
job, and the job's upload (``cluster/runtime_env.yaml``) holds the code only, whether or not Ray
reads ``.gitignore`` or skips its own default folders (the jobs run with
``RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1`` and ``RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES=''``)."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray_head
from ray_head import RAY

from rlaif_ray.config import Config

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
# Ray packs the working directory without what .gitignore lists and without its own default
# excludes (.git, .venv, venv, __pycache__ in Ray 2.60); with these two set it skips neither, so
# that only the runtime env's excludes keep the environment, the data and the runs out of the upload.
ONLY_OUR_EXCLUDES = {"RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1", "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES": ""}


@pytest.fixture(scope="module")
def head_node():
    """A Ray head node with a 'ranker' resource, stopped on exit (token auth stays on)."""
    # A token of the test's own: a fresh machine has no ~/.ray/auth_token yet.
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    with ray_head.head_node("--num-cpus=4", '--resources={"ranker": 2}', env=env) as head:
        yield head.dashboard_url, head.env


def job_submit(
    address: str, env: dict[str, str], args: list[str], cwd: Path | None = None, timeout: int = 900
) -> subprocess.CompletedProcess[str]:
    """``ray job submit --address=ADDRESS ARGS`` with ``ONLY_OUR_EXCLUDES``, submitted again while the
    new head node's job agent is not up yet (it can lag ``ray start`` on a busy machine)."""
    deadline = time.monotonic() + 120
    while True:
        submit = subprocess.run(
            [RAY, "job", "submit", f"--address={address}", *args],
            env={**env, **ONLY_OUR_EXCLUDES},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if "No available agent to submit job" not in submit.stderr or time.monotonic() > deadline:
            return submit
        time.sleep(2)


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
    submit = job_submit(
        address,
        env,
        [
            f"--runtime-env={RUNTIME_ENV}",
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


# The job's view of its working directory: every file path in it, to the file named by argv[1].
LIST_FILES = """
import json, os, sys
paths = [os.path.relpath(os.path.join(root, name)) for root, _, names in os.walk(".") for name in names]
open(sys.argv[1], "w").write(json.dumps(sorted(paths)))
"""
# (path, uploaded?) in a working directory laid out like the repository.
LAYOUT = [
    (".venv/bin/MARKER", False),
    ("data/synthetic/MARKER.mp4", False),
    ("runs/20260101-000000/MARKER", False),
    ("checkpoints/sft/MARKER", False),
    (".git/MARKER", False),
    ("bench/gpu_wheels/MARKER.whl", False),
    ("rlaif_ray/__pycache__/MARKER.pyc", False),
    ("rlaif_ray.egg-info/MARKER", False),
    ("judge.key", False),
    ("rlaif_ray/data/MARKER.py", True),  # a package of the code, not the data folder
    ("bench/results/MARKER.json", True),
    ("list_files.py", True),
]


def submit_listing(address: str, env: dict[str, str], work: Path, out: Path, *options: str) -> list[str]:
    """Submit ``list_files.py`` with ``work`` as working directory; the files the job saw there."""
    args = [*options, f"--working-dir={work}", "--", sys.executable, "list_files.py", str(out)]
    # From the top of the working directory, as the README has it.
    submit = job_submit(address, env, args, cwd=work, timeout=300)
    assert submit.returncode == 0 and out.exists(), submit.stdout[-2000:] + submit.stderr[-2000:]
    return json.loads(out.read_text())


def test_job_uploads_the_code_only(head_node, tmp_path: Path) -> None:
    address, env = head_node
    work = tmp_path / "work"
    shutil.copytree(REPO / "rlaif_ray", work / "rlaif_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "cluster", work / "cluster")
    shutil.copy(REPO / ".gitignore", work / ".gitignore")  # ignored by Ray here (ONLY_OUR_EXCLUDES)
    for path, _ in LAYOUT:
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(LIST_FILES if path == "list_files.py" else "marker\n")
    seen = submit_listing(
        address, env, work, tmp_path / "with.json", "--runtime-env=cluster/runtime_env.yaml"
    )
    assert {path: path in seen for path, _ in LAYOUT} == dict(LAYOUT)
    assert "rlaif_ray/launch.py" in seen and "cluster/runtime_env.yaml" in seen
    # Without the excludes the same upload takes everything: the check above is not Ray's doing.
    seen = submit_listing(address, env, work, tmp_path / "without.json")
    assert [path for path, _ in LAYOUT if path not in seen] == []
