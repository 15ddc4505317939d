"""The job log (rlaif_ray.logs.setup_logging): our lines stand out, the libraries' chatter is gone
by default and comes back with log_level=info. Real libraries in real subprocesses: open_clip and
transformers through building and loading the tiny model, DeepSpeed's own logger, and a whole
``python -m rlaif_ray.launch`` job."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlaif_ray.config import ConfigError, load_config
from rlaif_ray.logs import setup_logging

ROOT = Path(__file__).resolve().parents[1]

# Emits through each library the way a run does, after setup_logging(argv[1]).
SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, warnings
    from rlaif_ray.logs import setup_logging

    setup_logging(sys.argv[1])
    if sys.argv[1] != "debug":
        from rlaif_ray.config import ModelConfig
        from rlaif_ray.models.policy import VideoLMPolicy
        from rlaif_ray.models.tiny import build_tiny

        folder = build_tiny(sys.argv[2], seed=0)  # open_clip (root logger) + transformers
        VideoLMPolicy.from_folder(folder, ModelConfig())  # "Loading weights" progress bar
        from deepspeed.utils import logger as deepspeed_logger

        deepspeed_logger.info("deepspeed says hello")
    logging.getLogger("rlaif_ray.data.frames").warning("skipping video %s: no frames", "bad.mp4")
    logging.getLogger("rlaif_ray.ranker.pool").info("ranker pool: 8 groups waiting, added ranker-1")
    logging.getLogger("rlaif_ray.sft").debug("our debug line")
    logging.getLogger("somelib.core").info("somelib info line")
    logging.getLogger("somelib.core").warning("somelib warning line")
    warnings.warn_explicit("somelib api goes away", FutureWarning, "somelib/core.py", 1, module="somelib.core")
    warnings.warn_explicit("our api goes away", FutureWarning, "rlaif_ray/x.py", 1, module="rlaif_ray.x")
    print("VLLM_LOGGING_LEVEL=" + os.environ["VLLM_LOGGING_LEVEL"], flush=True)
    """
)


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RLAIF_RAY_LOG_LEVEL")}
    out.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    out.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    for key in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "VLLM_LOGGING_LEVEL"):
        out.pop(key, None)  # as a fresh shell has them (an earlier test may have set them here)
    return out


def emit(level: str, tmp_path: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, level, str(tmp_path / "tiny")],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


LIBRARY_CHATTER = [
    "Loading weights",  # transformers' progress bars
    "Writing model shards",
    "Parsing model identifier",  # open_clip's INFO lines (root logger)
    "initialized randomly",  # open_clip's WARNING on the tiny model built from scratch
    "deepspeed says hello",
    "somelib info line",
    "somelib api goes away",
]


def test_quiet_hides_library_chatter_and_keeps_ours(tmp_path: Path) -> None:
    log = emit("quiet", tmp_path)
    for noise in LIBRARY_CHATTER:
        assert noise not in log, (noise, log)
    assert "[rlaif_ray] WARNING: skipping video bad.mp4: no frames" in log
    assert "[rlaif_ray] ranker pool: 8 groups waiting, added ranker-1" in log
    assert "our debug line" not in log
    assert "WARNING somelib.core: somelib warning line" in log  # other libraries' warnings stay
    assert "FutureWarning: our api goes away" in log  # a FutureWarning raised in our code stays
    assert "VLLM_LOGGING_LEVEL=WARNING" in log


def test_info_brings_library_lines_back(tmp_path: Path) -> None:
    log = emit("info", tmp_path)
    for line in LIBRARY_CHATTER:
        assert line in log, (line, log)
    assert "[rlaif_ray] ranker pool: 8 groups waiting" in log
    assert "VLLM_LOGGING_LEVEL=INFO" in log


def test_debug_shows_our_debug_lines(tmp_path: Path) -> None:
    log = emit("debug", tmp_path)
    assert "[rlaif_ray] our debug line" in log and "somelib info line" in log
    assert "VLLM_LOGGING_LEVEL=DEBUG" in log


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, filters, level = list(root.handlers), list(root.filters), root.level
    environ = dict(os.environ)
    yield
    root.handlers[:], root.filters[:] = handlers, filters
    root.setLevel(level)
    os.environ.clear()
    os.environ.update(environ)


def test_setup_logging_is_idempotent_and_takes_over_the_console(restore_logging: None) -> None:
    root = logging.getLogger()
    plain = logging.StreamHandler(sys.stderr)  # what logging.basicConfig installs
    root.addHandler(plain)
    others = [h for h in root.handlers if h is not plain]  # pytest's capture handlers stay
    assert setup_logging("info") == "info"
    setup_logging("quiet")
    assert plain not in root.handlers
    ours = [h for h in root.handlers if h not in others]
    assert len(ours) == 1  # one console handler, however often it is called
    assert os.environ["RLAIF_RAY_LOG_LEVEL"] == "quiet"
    assert setup_logging() == "quiet"  # an actor without the config: the level the driver exported
    with pytest.raises(ValueError, match="log_level"):
        setup_logging("loud")


def test_config_key(tmp_path: Path) -> None:
    assert load_config(str(ROOT / "configs" / "default.yaml")).log_level == "quiet"
    assert load_config(str(ROOT / "configs" / "default.yaml"), ["log_level=info"]).log_level == "info"
    with pytest.raises(ConfigError, match="log_level"):
        load_config(str(ROOT / "configs" / "default.yaml"), ["log_level=loud"])


@pytest.mark.slow
def test_job_log_of_a_real_run(tmp_path: Path) -> None:
    """A whole job, tiny sizes, data and model built by the driver: the log a person reads."""
    run_dir = tmp_path / "run"
    data = tmp_path / "data"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlaif_ray.launch",
            "--config",
            "configs/default.yaml",
            f"data.train={data / 'train.jsonl'}",
            f"data.val={data / 'val.jsonl'}",
            f"data.test={data / 'test.jsonl'}",
            f"data.synthetic_dir={data}",
            "data.synthetic_videos=60",
            f"model.path={tmp_path / 'tiny'}",
            f"sft.output_dir={tmp_path / 'sft'}",
            "sft.steps=4",
            "sft.eval_every=4",
            "sft.batch_size=8",
            "rl.steps=3",
            "rl.prompts_per_step=4",
            "rl.group_size=3",
            "rl.eval_every=2",
            "rl.eval_examples=8",
            f"run_dir={run_dir}",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=540,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    print(log)  # shown by pytest -s or on failure: what a user sees
    assert "[rl] held-out accuracy before RL:" in log
    assert "[rl] held-out accuracy at step 2:" in log
    assert "[rl] held-out accuracy after RL:" in log
    for step in (1, 2, 3):
        line = next(ln for ln in log.splitlines() if f"[rl] step {step}/3 |" in ln)
        for field in ("samples/s", "sampled_acc", "loss", "kl", f"v{step} lag<=0", "ETA"):
            assert field in line, (field, line)
    assert "[rlaif_ray] generating 60 synthetic videos" in log  # our INFO lines stand out
    for noise in (
        "Loading weights",
        "Writing model shards",
        "FutureWarning",
        "DeprecationWarning",
        "initialized randomly",
        "INFO root:",  # open_clip
        "Parsing model identifier",
        "[INFO]",  # DeepSpeed's format
        "No CUDA runtime is found",
        "untested optimizer",  # DeepSpeed, about the FiniteAdamW we chose
        "built successfully",  # DeepSpeed's print when it loads its CPU comm op
        "\x1b[",  # colour codes in a log that is not a terminal
    ):
        assert noise not in log, (noise, log)

    assert (run_dir / "curves.png").is_file() and (run_dir / "curves.png").stat().st_size > 10_000
    assert list(run_dir.glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
