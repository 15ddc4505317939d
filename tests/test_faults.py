"""Faults during a run on a real local Ray cluster: actors killed from outside the loop, a job
stopped and resumed. The run goes on, versions keep rising, and every sampled group is accounted
for exactly once (learned, dropped or rolled back, with the reason)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from test_async import colour_run, records_of

from rlaif_ray.config import Config, load_config
from rlaif_ray.launch import run
from rlaif_ray.ledger import OUTCOMES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def kill_when(cfg: Config, steps_done: int, name: str) -> threading.Thread:
    """A thread that kills the named actor (Ray may restart it: ``no_restart=False``) once the run's
    ``metrics.jsonl`` holds ``steps_done`` records, as a node failure would."""
    metrics = Path(cfg.run_dir) / "metrics.jsonl"

    def watch() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            if not ray.is_initialized() and metrics.is_file():  # the run ended: never start a Ray
                return
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps_done:
                ray.kill(ray.get_actor(name), no_restart=False)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (killed, not yet reaped by its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def stop_when(
    cfg: Config, steps_done: int, name: str, stopped: list[int], gone: list[int], after_update: bool = False
) -> threading.Thread:
    """A thread that stops (SIGSTOP) the named actor's process once the run's ``metrics.jsonl``
    holds ``steps_done`` records: alive but answering nothing, as a wedged judge client or a
    deadlocked call leaves it. With ``after_update`` (a learner) a thread in the actor stops it the
    moment its next update that raises the weight version has returned, so that what the driver
    asks next, the export of the new weights that the rollout actors wait for, never runs. The
    process id goes into ``stopped``; once the process is gone, the number of records then goes
    into ``gone``."""
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    pid_file = Path(cfg.run_dir).parent / f"{name}.pid"

    def records() -> int:
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    def stop_after_update(learner: Any) -> None:  # (runs in the learner actor)
        def in_update() -> bool:
            frames = list(sys._current_frames().values())
            while frames:
                frame = frames.pop()
                if frame.f_code.co_name == "train_step":
                    return True
                frames += [frame.f_back] if frame.f_back else []
            return False

        def watch_version(version: int) -> None:
            while learner.version == version or in_update():  # (until that update has returned)
                time.sleep(0.001)
            pid_file.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)

        threading.Thread(target=watch_version, args=(learner.version,), daemon=True).start()

    def watch() -> None:
        deadline = time.time() + 600
        asked = False
        while time.time() < deadline and not stopped:
            if not ray.is_initialized() and metrics.is_file():
                return
            if asked and pid_file.is_file():
                stopped.append(int(pid_file.read_text()))
            elif records() >= steps_done and not asked:
                actor = ray.get_actor(name)
                if after_update:
                    ray.get(actor.__ray_call__.remote(stop_after_update))
                    asked = True
                else:
                    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
            time.sleep(0.05)
        while stopped and time.time() < deadline:
            if not alive(stopped[0]):
                gone.append(records())
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("role", ["ranker", "rollout", "learner"])
def test_a_stopped_actor_is_killed_at_its_deadline_and_the_run_finishes(
    small_config: Config, colour_checkpoint: Path, role: str
) -> None:
    """A ranker, rollout or learner actor stopped mid-run answers nothing: after
    ``rl.actor_timeout_s`` (plus the ranker's per-group deadline for a ranker) the driver kills its
    process, it is replaced, restarted or (the learners) restored, its work is asked again, and
    every step is learned, within a bound, with every group accounted. The learner stops the moment
    an update that raised its version has returned, so that the export of its weights hangs and
    the rollout actors' next requests wait for them: the learner is blamed, not the rollout actors."""
    cfg = colour_run(small_config, colour_checkpoint, steps=5)
    cfg.rl.actor_timeout_s, cfg.ranker.group_deadline_s = 15.0, 5.0
    cfg.ranker.min_actors = cfg.ranker.max_actors = 1
    cfg.rollout.num_actors = 2
    name = {"ranker": "ranker-0", "rollout": "rollout-1", "learner": "learner-0"}[role]
    stopped: list[int] = []
    gone: list[int] = []
    # (the learner from the first update after record 1 that raises its version: mid-run even when
    # an update is skipped, as step 3 often is)
    learner = role == "learner"
    stopper = stop_when(cfg, 1 if learner else 2, name, stopped, gone, after_update=learner)
    started = time.time()
    try:
        summary = run(cfg)
    finally:
        stopper.join()
        for pid in stopped:  # (the driver's kill ends it; never leave a stopped process behind)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    took = time.time() - started
    assert stopped, f"{name} was never stopped"
    # Its process was killed while the run went on (not by Ray's shutdown at the end).
    assert gone and gone[0] < 5, gone
    # 15 s of deadline (+ 4 groups x 5 s for a ranker), a restart, 5 short steps: well under 5 min.
    assert took < 300, took
    records = records_of(cfg)
    assert summary["steps"] == 5 and summary["groups"]["learned"] == 5 * 4
    assert_accounted(summary)
    faults = summary["faults"]
    stuck = {"stuck_ranker": 0, "stuck_rollout": 0, "stuck_learner": 0, f"stuck_{role}": 1}
    assert {key: faults[key] for key in stuck} == stuck
    if role == "ranker":
        assert faults["ranker_restarts"] >= 1
    elif role == "rollout":
        assert faults["rollout_restarts"] >= 1
        assert all(lag == 0 for r in records for lag in r["group_lags"])
    else:  # restored from the warm start (no checkpoint yet): the first steps are learned again
        assert faults["learner_restores"] == 1
        assert_versions_rise(records)
    if role != "learner":
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    else:
        assert [r["step"] for r in records][-5:] == [1, 2, 3, 4, 5]


def assert_versions_rise(records: list[dict]) -> None:
    """Each update publishes a version above every one before (an update skipped because all its
    groups were tied publishes none: its record keeps the version, or the restored one's, which a
    learner restore publishes without a record of its own), also across a learner restore."""
    versions = [r["weight_version"] for r in records]
    for before, record in zip(versions, records[1:], strict=False):
        skipped = record["learner"].get("skipped_step")
        assert record["weight_version"] >= before if skipped else record["weight_version"] > before, versions


def assert_accounted(summary: dict) -> None:
    """Every sampled group is learned, dropped, rolled back, lost with a stopped job or left at the end."""
    groups = summary["groups"]
    assert groups["sampled"] == sum(groups[k] for k in OUTCOMES), groups


@pytest.mark.parametrize("bound", [0, 1])
def test_rollout_actor_killed_mid_run(small_config: Config, colour_checkpoint: Path, bound: int) -> None:
    """Ray restarts the actor; the driver sends it the newest weights before its prompts again, so
    no group is sampled by weights older than the bound allows (every lag is 0 at staleness 0) and
    the run finishes; at bound 1 too, where the actor dies with prompts sampled ahead."""
    cfg = colour_run(small_config, colour_checkpoint, steps=5)
    cfg.rollout.num_actors = 2
    cfg.rl.max_staleness = bound
    killer = kill_when(cfg, 2, "rollout-1")
    summary = run(cfg)
    killer.join()
    records = records_of(cfg)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert summary["faults"]["rollout_restarts"] >= 1
    assert all(lag <= bound for r in records for lag in r["group_lags"])
    assert_versions_rise(records)
    assert summary["groups"]["learned"] == 5 * 4 and summary["groups"]["dropped_stale"] == 0
    assert_accounted(summary)


@pytest.mark.parametrize("bound", [0, 1])
def test_learner_killed_mid_run(small_config: Config, colour_checkpoint: Path, bound: int) -> None:
    """Every learner is restored from the newest checkpoint; the updates after it are rolled back
    and learned again, under versions above every version served before; at bound 1 too, where
    groups sampled ahead by the rolled-back weights are dropped, never learned."""
    cfg = colour_run(small_config, colour_checkpoint, steps=5)
    cfg.rl.checkpoint_every, cfg.rl.keep_checkpoints = 2, 1
    cfg.rl.max_staleness = bound
    killer = kill_when(cfg, 3, "learner-0")
    summary = run(cfg)
    killer.join()
    records = records_of(cfg)
    restores = summary["faults"]["restores"]
    assert summary["faults"]["learner_restores"] == 1 and len(restores) == 1
    # The kill comes once 3 steps are recorded: the newest checkpoint then is step 2's, or step 4's
    # when the loop (faster at bound 1) got there first.
    at, to = restores[0]["at_step"], restores[0]["to_step"]
    assert to in (2, 4) and at >= to, restores
    assert summary["groups"]["rolled_back"] == (at - to) * 4 == restores[0]["rolled_back_groups"]
    assert summary["steps"] == 5 and summary["groups"]["learned"] == 5 * 4
    assert_versions_rise(records)
    # Every step up to the kill (one whose checkpoint was being written when it came has no
    # record), then every step after the checkpoint again.
    steps, redo = [r["step"] for r in records], list(range(to + 1, 6))
    assert steps[len(steps) - len(redo) :] == redo, steps
    assert steps[: len(steps) - len(redo)] in (list(range(1, at + 1)), list(range(1, at))), steps
    assert all(lag <= bound for r in records for lag in r["group_lags"])
    assert_accounted(summary)
    # The newest checkpoint alone is kept (rl.keep_checkpoints=1), whole, with its config.
    checkpoints = Path(cfg.run_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["final", "step_4"]
    assert load_config(str(checkpoints / "step_4" / "config.yaml")).learner.lr == cfg.learner.lr


def final_policy_files(run_dir: Path) -> dict[str, Any]:
    """Every file of the final checkpoint's policy (adapter, projector, policy.json): the weights as
    bytes, the JSON files parsed (peft writes ``target_modules``, a set, in the process's hash order)."""
    final = run_dir / "checkpoints" / "final"
    files = [final / "policy.json", final / "projector.safetensors", *sorted((final / "adapter").iterdir())]
    out: dict[str, Any] = {}
    for f in files:
        if f.suffix == ".json":
            content = json.loads(f.read_text())
            if isinstance(content.get("target_modules"), list):
                content["target_modules"] = sorted(content["target_modules"])
            out[str(f.relative_to(final))] = content
        else:
            out[str(f.relative_to(final))] = f.read_bytes()
    return out


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_stopped_job_resumes_exactly(small_config: Config, colour_checkpoint: Path, tmp_path: Path) -> None:
    """A job stopped after its third step (Ctrl-C on its driver) resumes from its newest checkpoint
    with ``resume=RUN_DIR`` and ends with the same weights as an uninterrupted run of the same seed:
    the learner's state, the data order and the sampling RNG all came back. Only the steps after
    that checkpoint run again. (12 steps of ~0.3 s: the stop lands well before the end.)"""
    steps = 12
    cfg = colour_run(small_config, colour_checkpoint, steps=steps)
    cfg.rl.checkpoint_every = 2
    straight = run(cfg)
    expected = final_policy_files(Path(cfg.run_dir))

    stopped_dir = tmp_path / "stopped"
    cfg.run_dir = str(stopped_dir)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Ctrl-C as in a terminal: a test run in the background (nohup, `cmd &`) inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler; the driver gets it back.
    ctrl_c_able = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('rlaif_ray.launch', run_name='__main__')"
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", ctrl_c_able, "--config", str(config_file)],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    metrics = stopped_dir / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, 400)
        os.killpg(driver.pid, signal.SIGINT)
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert not (stopped_dir / "summary.json").exists(), "the job finished before it was stopped"
    recorded = len(metrics.read_text().splitlines())
    assert 3 <= recorded < steps
    assert (stopped_dir / "checkpoints" / "step_2" / "trainer_state.json").is_file()

    resumed = run(load_config(str(stopped_dir / "config.yaml"), [f"resume={stopped_dir}"]))
    newest = int(resumed["resumed_from"].rsplit("step_", 1)[1])
    assert newest % 2 == 0 and 2 <= newest <= recorded
    assert resumed["steps_run_by_this_job"] == steps - newest
    assert [r["step"] for r in records_of(cfg)] == list(range(1, steps + 1))
    got = final_policy_files(stopped_dir)
    assert got.keys() == expected.keys() and "projector.safetensors" in got
    for name, content in expected.items():
        assert got[name] == content, f"{name} differs from the uninterrupted run's"
    assert resumed["groups"]["learned"] == straight["groups"]["learned"] == steps * 4
    assert resumed["groups"]["rolled_back"] >= (recorded - newest) * 4  # stopped-job steps after it
    assert_accounted(resumed)
    assert json.loads((stopped_dir / "summary.json").read_text())["steps"] == steps


def test_resume_refuses_another_config(small_config: Config, tmp_path: Path) -> None:
    from rlaif_ray.config import ConfigError
    from rlaif_ray.launch import prepare_run

    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg = small_config
    cfg.run_dir = str(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    other = load_config(str(run_dir / "config.yaml"), [f"resume={run_dir}", "learner.lr=0.5", "rl.steps=99"])
    expected = re.escape(f"learner.lr: {cfg.learner.lr!r} in the run, 0.5 now")
    with pytest.raises(ConfigError, match=expected) as err:
        prepare_run(other)
    assert "rl.steps" not in str(err.value)  # how long a run goes on may change
    same = load_config(str(run_dir / "config.yaml"), [f"resume={run_dir}"])
    with pytest.raises(ConfigError, match="no whole checkpoint"):
        prepare_run(same)
