"""Checkpoints: which files make one, how they are written, and the rules for going on from one.

Two kinds, each a folder:

* an RL checkpoint ``<run_dir>/checkpoints/step_<N>`` (and ``final``), written atomically by
  :func:`write_checkpoint`: the policy files (``policy.json``, the LoRA adapter, the projector;
  :meth:`rlaif_ray.models.policy.VideoLMPolicy.save`), ``deepspeed/`` (every learner rank's
  partition of the trainable parameters, optimizer and scheduler) and ``learner_rng_rank<R>.pt``
  (:meth:`rlaif_ray.learner.worker.LearnerWorker.save_state`), :data:`ROLLOUT_RNG` (the rollout
  actors' sampling RNGs), :data:`TRAINER_STATE` (the loop's step, versions, group ledger, data
  order) and ``config.yaml``. ``resume=<run_dir>`` goes on from the newest (:func:`resume_point`),
  with the same config except the :data:`RESUMABLE` settings.
* an SFT checkpoint ``sft.output_dir``: the policy files and :data:`SFT_STATE`, whose
  ``fingerprint`` (:func:`fingerprint`) decides whether a later run may reuse it as its warm start.

The learner and the policy save and load their own state; this module decides what a checkpoint
holds and when one may be used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlaif_ray.config import Config, ConfigError, flat_keys, load_config, with_absolute_paths

TRAINER_STATE = "trainer_state.json"
ROLLOUT_RNG = "rollout_rng.pt"
SFT_STATE = "sft_state.json"


def write_checkpoint(root: Path, name: str, write: Callable[[Path], None], keep: int) -> Path:
    """Write checkpoint ``root/<name>`` atomically: ``write`` fills a temporary folder, which is
    renamed when whole (replacing an older one of that name: a step learned again after a
    restore). Only the newest ``keep`` ``step_*`` checkpoints are kept."""
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        old = root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    steps = sorted(checkpoint_steps(root))
    for step in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(root / f"step_{step}")
    return final


def checkpoint_steps(root: Path) -> list[int]:
    """The steps of the whole ``step_<N>`` checkpoints under ``root`` (temporary folders excluded)."""
    if not root.is_dir():
        return []
    return [
        int(p.name.removeprefix("step_"))
        for p in root.glob("step_*")
        if p.name.removeprefix("step_").isdigit() and (p / TRAINER_STATE).is_file()
    ]


def latest_checkpoint(run_dir: Path) -> str | None:
    """The newest whole ``step_<N>`` checkpoint of a run folder, or None."""
    steps = checkpoint_steps(run_dir / "checkpoints")
    return str(run_dir / "checkpoints" / f"step_{max(steps)}") if steps else None


def json_to_tuple(value: Any) -> Any:
    """``random.Random.getstate()`` after a JSON round trip (lists) back to nested tuples."""
    return tuple(json_to_tuple(v) for v in value) if isinstance(value, list) else value


# Settings a resumed run may change: they decide how long it runs and what it writes, not what
# it learns.
RESUMABLE = {
    "resume",
    "run_dir",
    "log_level",
    "rl.steps",
    "rl.time_limit_s",
    "rl.eval_every",
    "rl.checkpoint_every",
    "rl.keep_checkpoints",
    "rollout.max_restarts",
    "learner.max_restores",
    "learner.setup_timeout_s",
    "rl.actor_timeout_s",
}


def resume_point(cfg: Config) -> tuple[Path, Path]:
    """The run folder named by ``resume`` and its newest whole checkpoint; the config must be the
    one that run was trained with, except for :data:`RESUMABLE` settings."""
    run_dir = Path(cfg.resume).absolute()
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"resume={cfg.resume!r}: {saved_path} does not exist (not a run folder)")
    saved = flat_keys(with_absolute_paths(load_config(str(saved_path))).to_dict())
    now = flat_keys(cfg.to_dict())
    differ = [
        f"{k}: {saved.get(k)!r} in the run, {now.get(k)!r} now"
        for k in now
        if k not in RESUMABLE and saved.get(k) != now.get(k)
    ]
    if differ:
        raise ConfigError(
            f"resume={cfg.resume!r}: the config differs from the one the run was trained with "
            f"({saved_path}): " + "; ".join(differ)
        )
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise ConfigError(
            f"resume={cfg.resume!r}: no whole checkpoint under {run_dir / 'checkpoints'} (the run stopped "
            f"before its first, every rl.checkpoint_every={cfg.rl.checkpoint_every} steps)"
        )
    return run_dir, Path(folder)


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """The loop's state saved in checkpoint ``folder``."""
    state = json.loads((folder / TRAINER_STATE).read_text())
    if "ledger" not in state:
        raise ConfigError(
            f"resume: {folder} was written by a version of rlaif_ray before the group ledger "
            f"(its {TRAINER_STATE} has no 'ledger'); this version cannot resume it"
        )
    return state


def split_metrics(metrics_path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (the checkpoint's) in the file; return
    the later ones (the stopped job's updates after the checkpoint, which a resume undoes)."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))
    return [r for r in records if r["step"] > step]


def fingerprint(cfg: Config, model_dir: str | Path) -> dict[str, Any]:
    """What an SFT checkpoint depends on: the SFT and model settings, the base model (hash of its
    small files, size of each file) and the train file (hash of its bytes).

    Settings that do not change the recipe are left out: logging, evaluation cadence, output
    folder, reuse, and the top-level ``seed``, so that runs of several RL seeds start from one warm
    start (as the benchmarks do). Two fingerprints are compared key by key
    (:func:`fingerprint_differences`).
    """
    sft = {
        k: v
        for k, v in dataclasses.asdict(cfg.sft).items()
        if k not in ("output_dir", "reuse", "eval_every", "log_every")
    }
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file())
    model = hashlib.sha256()
    for path in files:
        model.update(f"{path.relative_to(model_dir)}:{path.stat().st_size}".encode())
        if path.stat().st_size < 1 << 20:  # configs, tokenizer files; weights by size only
            model.update(path.read_bytes())
    return {
        **{f"sft.{k}": v for k, v in sft.items()},
        **{f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items() if k != "path"},
        "base model files": model.hexdigest(),
        "data.train contents": hashlib.sha256(Path(cfg.data.train).read_bytes()).hexdigest(),
    }


def fingerprint_differences(saved: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for every setting that differs (everything when nothing was saved)."""
    if saved is None:
        return ["no fingerprint saved (a checkpoint made before fingerprints)"]
    return [
        f"{key}: {saved.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]


def finished_checkpoint(folder: str | Path) -> dict[str, Any] | None:
    """The saved SFT state when ``folder`` holds a finished SFT checkpoint, else None."""
    state = Path(folder) / SFT_STATE
    if not state.is_file():
        return None
    data = json.loads(state.read_text())
    return data if data.get("finished") else None


def init_checkpoint(cfg: Config) -> str | None:
    """``sft.init_from``, checked: a finished SFT checkpoint other than ``sft.output_dir``."""
    folder = cfg.sft.init_from
    if folder is None:
        return None
    if Path(folder).resolve() == Path(cfg.sft.output_dir).resolve():
        raise ValueError(f"sft.init_from = {folder!r} is sft.output_dir: continue into another folder")
    if finished_checkpoint(folder) is None:
        raise ValueError(f"sft.init_from = {folder!r}: no finished SFT checkpoint there (no {SFT_STATE})")
    return folder
