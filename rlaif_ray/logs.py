"""What a job log shows: our own lines stand out, the libraries' chatter stays out of the way.

:func:`setup_logging` is called with the config's ``log_level`` by the driver (``launch.main``),
by every actor (``RolloutWorker``, ``LearnerWorker``, ``RankerWorker``) and by ``run_sft``:

* ``quiet`` (default): our ``rlaif_ray.*`` loggers at INFO, printed as ``[rlaif_ray] ...``
  (``[rlaif_ray] WARNING: ...`` for a skipped video, a bad data line, a ranker fallback); every
  library only at WARNING or above, some less: transformers at ERROR and without progress bars,
  open_clip's INFO lines and its "initialized randomly" warning (it logs on the root logger)
  dropped, DeepSpeed and vLLM (``VLLM_LOGGING_LEVEL``, inherited by its engine process) at
  WARNING (DeepSpeed's warning about our optimizer and its "built successfully" print dropped), torch's "No CUDA runtime is found" build notice and Ray's token-authentication notice
  dropped, FutureWarning / DeprecationWarning ignored unless raised in ``rlaif_ray`` code.
* ``info``: the libraries' INFO lines and progress bars come back.
* ``debug``: everything at DEBUG, ours included.

Errors are never hidden. :class:`ScalarWriter` writes each metrics record's numbers as
TensorBoard scalars; :func:`progress_line` is the job log's line per RL step.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

LogLevel = Literal["quiet", "info", "debug"]
LEVELS: tuple[str, ...] = ("quiet", "info", "debug")
# The driver exports its level here, so that the local Ray cluster it starts (and every process
# that cluster starts) inherits it; ``setup_logging()`` without a level reads it.
ENV_VAR = "RLAIF_RAY_LOG_LEVEL"
OURS = "rlaif_ray"


class _ConsoleFormatter(logging.Formatter):
    """``[rlaif_ray] msg`` (with the level name from WARNING up) for ours, ``LEVEL name: msg`` else."""

    def __init__(self) -> None:
        super().__init__()
        self._ours = logging.Formatter("[rlaif_ray] %(message)s")
        self._ours_loud = logging.Formatter("[rlaif_ray] %(levelname)s: %(message)s")
        self._other = logging.Formatter("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if is_ours(record.name):
            return (self._ours if record.levelno < logging.WARNING else self._ours_loud).format(record)
        return self._other.format(record)


class _OpenClipChatter(logging.Filter):
    """Drops open_clip's records below ERROR (it logs on the root logger, so no logger name tells
    them apart: its file path does)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        path = record.pathname.replace("\\", "/")
        return "/open_clip/" not in path


class _ChosenOptimizerNotice(logging.Filter):
    """Drops DeepSpeed's "untested optimizer" warning: the learner's ``FiniteAdamW`` is an AdamW
    that DeepSpeed does not know by name, allowed on purpose (``zero_allow_untested_optimizer``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in str(record.msg)


def quiet_prints() -> contextlib.AbstractContextManager[Any]:
    """Swallow what a library ``print``s inside the block when the level is ``quiet`` (DeepSpeed
    prints "DeepSpeed ... built successfully" each time it loads its CPU communication op)."""
    if os.environ.get(ENV_VAR, "quiet") == "quiet":
        return contextlib.redirect_stdout(io.StringIO())
    return contextlib.nullcontext()


class _NoColour(logging.Filter):
    """Strips ANSI colour codes from a record (Ray colours its dashboard address unconditionally)."""

    _codes = re.compile(r"\x1b\[[0-9;]*m")

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._codes.sub("", str(record.msg))
        if isinstance(record.args, tuple):
            record.args = tuple(self._codes.sub("", a) if isinstance(a, str) else a for a in record.args)
        return True


class _Console(logging.StreamHandler):
    """The one console handler :func:`setup_logging` installs on the root logger. It writes to
    whatever ``sys.stderr`` is when a record comes (a test may swap it and close the old one)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def is_ours(name: str) -> bool:
    return name == OURS or name.startswith(OURS + ".")


def setup_logging(level: str | None = None) -> str:
    """Set up this process's logging for ``level`` (``quiet``, ``info`` or ``debug``; None: the
    level the driver exported in ``RLAIF_RAY_LOG_LEVEL``, else ``quiet``). Safe to call again.

    Takes over the console: the root logger gets one handler (to stderr) in place of plain
    console handlers (``logging.basicConfig``'s); other handlers (files, pytest's) stay.
    Returns the level used.
    """
    if level is None:
        level = os.environ.get(ENV_VAR) or "quiet"
    if level not in LEVELS:
        raise ValueError(f"log_level = {level!r}: expected one of {', '.join(LEVELS)}")
    quiet = level == "quiet"
    libs = {"quiet": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}[level]
    os.environ[ENV_VAR] = level

    # Our loggers: INFO (DEBUG in debug), through the root logger's console handler.
    logging.getLogger(OURS).setLevel(logging.DEBUG if level == "debug" else logging.INFO)
    root = logging.getLogger()
    root.setLevel(libs)
    consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    for handler in list(root.handlers):
        plain = type(handler) is logging.StreamHandler and handler.stream in consoles
        if plain or isinstance(handler, _Console):
            root.removeHandler(handler)
    console = _Console()
    console.setFormatter(_ConsoleFormatter())
    root.addHandler(console)
    for old in [f for f in root.filters if isinstance(f, _OpenClipChatter)]:
        root.removeFilter(old)
    if quiet:
        root.addFilter(_OpenClipChatter())

    _setup_transformers(level)
    if not quiet:  # deepspeed sets its logger to WARNING when imported: import it first
        try:
            import deepspeed.utils.logging  # noqa: F401
        except ImportError:
            pass
    _set_logger("DeepSpeed", libs)  # deepspeed.utils.logger: its own handler, not propagated
    deepspeed_logger = logging.getLogger("DeepSpeed")
    for old in [f for f in deepspeed_logger.filters if isinstance(f, _ChosenOptimizerNotice)]:
        deepspeed_logger.removeFilter(old)
    if quiet:
        deepspeed_logger.addFilter(_ChosenOptimizerNotice())
    # vLLM configures its logger from the environment when imported (also in its engine process).
    os.environ["VLLM_LOGGING_LEVEL"] = logging.getLevelName(libs)
    _set_logger("vllm", libs)
    # A notice, not a problem: the JIT build of DeepSpeed's CPU op finds no CUDA on a CPU machine.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR if quiet else logging.NOTSET)
    # Ray: its token-authentication notice (the README says how authentication works) and, where
    # the log is not a terminal, the colour codes around each actor's prefix.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR if quiet else logging.NOTSET
    )
    ray_worker = logging.getLogger("ray._private.worker")  # "Started a local Ray instance ..."
    for old in [f for f in ray_worker.filters if isinstance(f, _NoColour)]:
        ray_worker.removeFilter(old)
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        ray_worker.addFilter(_NoColour())
    _setup_warnings(quiet)
    return level


def _set_logger(name: str, level: int) -> None:
    """A library logger and the handlers it owns (DeepSpeed's and vLLM's filter by level too)."""
    logger = logging.getLogger(name)
    logger.setLevel(level)
    for handler in logger.handlers:
        handler.setLevel(level)


def _setup_transformers(level: str) -> None:
    os.environ["TRANSFORMERS_VERBOSITY"] = {"quiet": "error", "info": "info", "debug": "debug"}[level]
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1" if level == "quiet" else "0"
    if "transformers" not in sys.modules and "huggingface_hub" not in sys.modules:
        return  # it reads both variables when imported (a ranker process may never import it)
    from transformers.utils import logging as hf_logging

    if level == "quiet":
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        return
    if level == "info":
        hf_logging.set_verbosity_info()
    else:
        hf_logging.set_verbosity_debug()
    hf_logging.enable_progress_bar()


_OUR_MODULES = r"rlaif_ray(\..*)?"
_NOISY = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)


def _setup_warnings(quiet: bool) -> None:
    """Quiet: FutureWarning / DeprecationWarning raised in other modules are ignored (ours shown).
    Otherwise FutureWarning is shown again (Python's default; DeprecationWarning stays as Python
    has it). Child processes started later (Ray workers, vLLM's engine) get the same through
    PYTHONWARNINGS until their own ``setup_logging`` call."""
    if quiet:
        for category in _NOISY:
            warnings.filterwarnings("ignore", category=category)
            warnings.filterwarnings("default", category=category, module=_OUR_MODULES)
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    else:
        warnings.filterwarnings("default", category=FutureWarning)
        if os.environ.get("PYTHONWARNINGS") == "ignore::FutureWarning,ignore::DeprecationWarning":
            del os.environ["PYTHONWARNINGS"]


def flat_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number of a (nested) metrics record, keys joined with ``/``: ``learner/loss``,
    ``time/learn_s``, ``eval/accuracy``, ``eval/per_type/colour``. Booleans, strings, lists and
    None are left out, and so is the top-level ``step``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_scalars(value, name + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and name != "step":
            out[name] = float(value)
    return out


class ScalarWriter:
    """TensorBoard event files in ``folder``: :meth:`write` adds a record's numbers at a step."""

    def __init__(self, folder: str | Path) -> None:
        from torch.utils.tensorboard.writer import FileWriter

        self._writer = FileWriter(str(folder))

    def write(self, step: int, record: dict[str, Any]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        # One event holding every scalar of the record: an event per scalar cost the driver about
        # ten times as much, on the path between two updates.
        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in flat_scalars(record).items()]
        self._writer.add_summary(Summary(value=values), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> ScalarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_line(record: dict[str, Any], steps: int, eta_s: float | None = None) -> str:
    """The job log's line for one RL step, e.g.

    ``[rl] step 3/60 | 21.4 samples/s | sampled_acc 0.412 | loss 0.0123 kl 0.0031 clip 0.000 |
    v3 lag<=0 | 14.9s (wait 8.1 learn 6.6 sync 0.2) | ETA 14m13s``

    step/total; answers learned per second of this step; the oracle's accuracy on the answers
    sampled (n/a without references); the learner's loss, KL to the reference policy and clipped
    fraction; the weight version now served and the largest lag (versions) of the groups learned;
    the step's wall time and its stages; the time left at the mean step time so far.
    """
    lrn, t = record["learner"], record["time"]
    acc = record["sampled_accuracy"]
    lags = record["group_lags"]
    rate = record["samples"] / t["step_s"] if t["step_s"] > 0 else 0.0
    learner = [
        f"{name} {lrn[key]:.{digits}f}"
        for key, name, digits in (("loss", "loss", 4), ("kl", "kl", 4), ("clip_frac", "clip", 3))
        if key in lrn
    ]
    parts = [
        f"[rl] step {record['step']}/{steps}",
        f"{rate:.1f} samples/s",
        f"sampled_acc {acc:.3f}" if acc is not None else "sampled_acc n/a",
        " ".join(learner) or "no update",
        f"v{record['weight_version']} " + (f"lag<={max(lags)}" if lags else "lag n/a"),
        f"{t['step_s']:.1f}s (wait {t['wait_s']:.1f} learn {t['learn_s']:.1f} sync {t['sync_s']:.1f})",
    ]
    if eta_s is not None:
        parts.append(f"ETA {duration(eta_s)}")
    return " | ".join(parts)


def duration(seconds: float) -> str:
    """``42s``, ``6m05s``, ``2h03m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
