"""The entry point: config -> SFT warm start -> Ray actors -> GRPO_rank loop -> run folder.

    python -m rlaif_ray.launch --config configs/default.yaml [key=value ...]
    ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . -- python -m rlaif_ray.launch --config configs/default.yaml

As a plain command it starts a local Ray; under ``ray job submit`` (``RAY_ADDRESS`` is set) it
joins that cluster. Per step: the rollout actors sample a group per prompt, the ranker pool
orders each group, every learner rank takes one GRPO_rank step, and learner 0's new LoRA +
projector weights go through the object store to every rollout actor before it samples again.
The run folder holds ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``checkpoints/``,
TensorBoard event files (every number of every metrics record, written as the run goes) and, at
the end, ``curves.png`` (``rlaif_ray.plot``).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import ray
import torch
import yaml
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from rlaif_ray.checkpoint import (
    ROLLOUT_RNG,
    TRAINER_STATE,
    fingerprint,
    fingerprint_differences,
    finished_checkpoint,
    json_to_tuple,
    latest_checkpoint,
    load_trainer_state,
    resume_point,
    split_metrics,
    write_checkpoint,
)
from rlaif_ray.config import Config, ConfigError, load_config, with_absolute_paths
from rlaif_ray.data.dataset import check_data, load_jsonl
from rlaif_ray.data.synthetic import ensure_data
from rlaif_ray.groups import Group
from rlaif_ray.learner.worker import LearnerCollectiveError, LearnerWorker, shard
from rlaif_ray.ledger import GroupLedger
from rlaif_ray.logs import ScalarWriter, progress_line, setup_logging
from rlaif_ray.models.tiny import ensure_model
from rlaif_ray.plot import plot_runs
from rlaif_ray.prepare import ensure_judge
from rlaif_ray.process import ask_whereabouts, kill_for_certain
from rlaif_ray.ranker.backends import backend_class
from rlaif_ray.ranker.pool import RankerPool
from rlaif_ray.rollout.worker import RolloutWorker, WeightsBehind
from rlaif_ray.sft import run_sft
from rlaif_ray.telemetry import LoopMetrics, Telemetry

log = logging.getLogger(__name__)


def init_ray(cfg: Config) -> Any:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it), else start a local one
    whose dashboard listens on ``dashboard_host`` only (127.0.0.1 by default)."""
    if os.environ.get("RAY_ADDRESS"):
        return ray.init()
    # Logical CPUs: enough for every actor at once (they take turns on the real cores).
    needed = (
        cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor
        + cfg.learner.num_actors * cfg.learner.num_cpus_per_actor
        + cfg.ranker.max_actors * cfg.ranker.num_cpus_per_actor
        + 1
    )
    resources = {cfg.ranker.resource: float(cfg.ranker.max_actors)} if cfg.ranker.resource else {}
    return ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(needed)),
        resources=resources,
        dashboard_host=cfg.dashboard_host,
    )


def warm_start(cfg: Config, model_dir: Path) -> str:
    """The folder RL starts from: the SFT checkpoint (trained now, or reused), else the base model."""
    if not cfg.sft.enabled:
        return str(model_dir)
    state = finished_checkpoint(cfg.sft.output_dir)
    if cfg.sft.reuse and state:
        differences = fingerprint_differences(state.get("fingerprint"), fingerprint(cfg, model_dir))
        if not differences:
            print(f"[launch] reusing the SFT checkpoint in {cfg.sft.output_dir}", flush=True)
            return cfg.sft.output_dir
        print(
            f"[launch] the SFT checkpoint in {cfg.sft.output_dir} was made with other settings, so it is "
            "trained again: " + "; ".join(differences),
            flush=True,
        )
    print(f"[launch] SFT warm start: {cfg.sft.steps} steps -> {cfg.sft.output_dir}", flush=True)
    # In a task of its own (one process group per process; on a GPU cluster, on a GPU node).
    task = ray.remote(
        num_cpus=cfg.learner.num_cpus_per_actor, num_gpus=cfg.learner.num_gpus_per_actor, max_calls=1
    )(run_sft)
    ray.get(task.remote(cfg))
    return cfg.sft.output_dir


def judge_ready(cfg: Config) -> None:
    """Build the video judge (``ranker.judge_path``) when the run ranks with one and it is missing:
    an SFT of its own (``judge.*``), in a task of its own like the warm start."""
    if cfg.ranker.backend != "video_judge" or (Path(cfg.ranker.judge_path) / "policy.json").is_file():
        return
    print(f"[launch] building the video judge -> {cfg.ranker.judge_path}", flush=True)
    task = ray.remote(
        num_cpus=cfg.learner.num_cpus_per_actor, num_gpus=cfg.learner.num_gpus_per_actor, max_calls=1
    )(ensure_judge)
    ray.get(task.remote(cfg))


def start_learners(cfg: Config, policy_dir: str) -> list[Any]:
    """``learner.num_actors`` named learner actors forming one torch.distributed group."""
    lc = cfg.learner
    actor_cls = ray.remote(LearnerWorker)
    learners = [
        actor_cls.options(
            name=f"learner-{rank}", num_cpus=lc.num_cpus_per_actor, num_gpus=lc.num_gpus_per_actor
        ).remote(cfg, policy_dir, rank, lc.num_actors)
        for rank in range(lc.num_actors)
    ]
    master_addr, master_port = ray.get(learners[0].address.remote())
    setups = [learner.setup.remote(master_addr, master_port) for learner in learners]
    locks = build_locks()
    if locks:
        log.warning("DeepSpeed's op build may wait on these lock files: %s", ", ".join(locks))
    try:
        ray.get(setups, timeout=lc.setup_timeout_s)
    except GetTimeoutError:
        stop_actors(learners)
        locks = build_locks()
        raise RuntimeError(
            f"the learners were not set up within learner.setup_timeout_s={lc.setup_timeout_s:g} s. "
            "They wait for the torch.distributed rendezvous of all learner.num_actors ranks (are there "
            "enough free CPUs/GPUs for every learner?) and, on the CPU, for DeepSpeed's build of its "
            "communication op, which waits for a lock file to go away; a build killed midway leaves "
            "it behind. "
            + (
                f"Lock files now: {', '.join(locks)}: delete them if no build is running."
                if locks
                else f"No lock file under {extensions_dir()} now."
            )
        ) from None
    return learners


def build_locks() -> list[str]:
    """The ``lock`` files of torch extension builds (each build folder holds one while it builds)."""
    root = Path(extensions_dir())
    return sorted(str(p) for p in root.glob("*/lock")) + sorted(str(p) for p in root.glob("*/*/lock"))


def extensions_dir() -> str:
    """Where torch builds C++ extensions (DeepSpeed's CPU op): ``TORCH_EXTENSIONS_DIR`` or torch's default."""
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def stop_actors(actors: list[Any], timeout_s: float = 60.0) -> None:
    """Kill ``actors`` and wait until each is dead, so that their names can be taken again."""
    for actor in actors:
        ray.kill(actor)
    deadline = time.time() + timeout_s
    for actor in actors:
        while time.time() < deadline:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=1)
            except (RayActorError, GetTimeoutError):
                break


def start_rollouts(cfg: Config, policy_dir: str) -> list[Any]:
    """``rollout.num_actors`` named rollout actors, each serving weight version 0."""
    rc = cfg.rollout
    actor_cls = ray.remote(RolloutWorker)
    return [
        actor_cls.options(
            name=f"rollout-{rank}",
            num_cpus=rc.num_cpus_per_actor,
            num_gpus=rc.num_gpus_per_actor,
            max_restarts=rc.max_restarts,
            max_task_retries=0,  # the driver re-sends the weights first, then the prompts
        ).remote(cfg, policy_dir, rank)
        for rank in range(rc.num_actors)
    ]


def sampled_accuracy(groups: list[Group]) -> float | None:
    """Fraction of sampled answers that match their reference (None when no group has one)."""
    correct = [c for g in groups if g.correct is not None for c in g.correct]
    return sum(correct) / len(correct) if correct else None


class LearnersDied(RuntimeError):
    """A learner actor died: the loop restores every learner before it goes on."""


class ActorStuck(RuntimeError):
    """An actor answered nothing within ``rl.actor_timeout_s``: it is killed and handled as dead."""


class Trainer:
    """Drives the actors through the GRPO_rank loop and writes the run folder.

    One loop for every staleness bound. Rollout actors sample ahead while the rankers order and
    the learner learns: the driver keeps ``(rl.max_staleness + 1) * rl.prompts_per_step`` groups
    in the pipeline (being sampled, being ranked, or ranked and waiting), ranked groups stream in
    as each chunk finishes, and every update takes exactly ``rl.prompts_per_step`` of them, oldest
    first. A group's lag is the learner's version at the update that learns it minus the version
    that sampled it; a group whose lag would exceed ``rl.max_staleness`` is dropped and counted.
    With the bound at 0 this is the synchronous, on-policy loop: sample, rank, learn, sync.
    After each update every rollout actor is sent the new weights before any further sampling
    request (Ray runs an actor's calls in order), so what it samples next uses them.

    Faults (see the README's "Operations: what survives what"): a dead rollout actor is restarted
    by Ray; the driver sends it the newest weights, then its prompts again. Dead learners are
    replaced and restored from the newest checkpoint; the updates since then are rolled back and
    learned again from fresh samples, under weight versions above every version served so far.
    ``resume`` continues a stopped run from its newest checkpoint.
    """

    def __init__(self, cfg: Config, run_dir: Path, policy_dir: str) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.policy_dir = policy_dir
        self.train = load_jsonl(cfg.data.train, on_error=cfg.data.on_bad_line)
        self.heldout = self.load_split(cfg.rl.eval_split)  # the evaluations during the run
        self.rng = random.Random(cfg.seed)
        self.learners = start_learners(cfg, policy_dir)
        self.rollouts = start_rollouts(cfg, policy_dir)
        # Each actor's (node, pid), asked as it starts: a stuck one is killed for certain.
        self.learners_where = [ask_whereabouts(learner) for learner in self.learners]
        self.rollouts_where = [ask_whereabouts(actor) for actor in self.rollouts]
        self.pool = RankerPool(cfg)
        self.version = 0  # the version the learners hold (and the rollout actors are sent)
        self.state_ref: Any = None  # the object-store copy of that version's weights
        self.ledger = GroupLedger(cfg.rl.max_staleness)  # every sampled group's life and outcome
        self.draws = 0  # sampling requests so far: each draw's groups are ids "<draw>:<example>"
        # rollout ref -> (draw, rollout actor index, the examples asked for)
        self.sampling: dict[Any, tuple[int, int, list[Any]]] = {}
        self.sampling_version: dict[Any, int] = {}  # rollout ref -> the version it samples with
        # (rollout actor index or -1 for a learner, ref, deadline): the calls a new version waits for
        self.syncs: list[tuple[int, Any, float]] = []
        self.due: dict[Any, float] = {}  # sampling request, learner update or export -> its deadline
        self.sent = [0] * len(self.rollouts)  # the weight version last sent to each rollout actor
        self.deferred: list[tuple[int, int, list[Any]]] = []  # draws to ask again after a restore
        self.incarnations = ray.get([actor.incarnation.remote() for actor in self.rollouts])
        self.empty_draws = 0
        self.step_no = 0  # updates that stand (rolled-back ones are taken off)
        self.updates_left = cfg.rl.steps
        self.checkpoint_step = 0
        self.evals: list[dict[str, Any]] = []
        self.restores: list[dict[str, Any]] = []
        self.faults = {"rollout_restarts": 0, "learner_restores": 0, "stuck_rollout": 0, "stuck_learner": 0}
        self.rows_bad_video = 0  # answers the learner dropped because their video failed there
        self.sampled_without_reference = 0  # groups sampled for prompts nobody labelled
        self.metrics = LoopMetrics()  # live metrics (Ray dashboard, Prometheus)
        # The last step's record (metrics.jsonl, TensorBoard, live metrics, job log), written while
        # the learner runs the next update instead of before it is sent: see write_record.
        self.unwritten: Callable[[], None] | None = None

    # ---- sampling and ranking

    def load_split(self, split: str) -> list[Any]:
        """The first ``rl.eval_examples`` examples (0: all) of ``data.<split>``."""
        examples = load_jsonl(getattr(self.cfg.data, split), on_error=self.cfg.data.on_bad_line)
        return examples[: self.cfg.rl.eval_examples] if self.cfg.rl.eval_examples else examples

    def evaluate(self, examples: list[Any] | None = None) -> dict[str, Any]:
        """Held-out accuracy of the served version (rollout-0, greedy) on ``examples`` (default:
        the ``rl.eval_split`` split)."""
        chosen = self.heldout if examples is None else examples
        while True:
            result = self.from_rollout(0, lambda actor: actor.evaluate.remote(chosen), "an evaluation")
            if result["version"] == self.sent[0]:
                if examples is None:
                    Telemetry("rollout", "rollout-0").set("rlaif_heldout_accuracy", result["accuracy"])
                return result
            self.on_rollout_death(0, WeightsBehind(f"rollout-0 evaluated version {result['version']}"))

    # ---- deadlines: an actor that answers nothing in time is handled as a dead one

    def from_rollout(self, index: int, call: Callable[[Any], Any], what: str) -> Any:
        """``call(actor)``'s result from rollout actor ``index``, waiting at most
        ``rl.actor_timeout_s``; an actor that dies or is stuck is restarted (and sent the newest
        weights) and asked again."""
        while True:
            ref = call(self.rollouts[index])
            try:
                return ray.get(ref, timeout=self.cfg.rl.actor_timeout_s)
            except GetTimeoutError:
                exc: Exception = self.stuck_rollout(index, what)
            except RayActorError as died:
                exc = died
            self.on_rollout_death(index, exc)

    def stuck_rollout(self, index: int, what: str) -> ActorStuck:
        """Kill rollout actor ``index`` (Ray restarts it), count it, and say so."""
        self.faults["stuck_rollout"] += 1
        exc = ActorStuck(
            f"rollout-{index} did not answer {what} within rl.actor_timeout_s={self.cfg.rl.actor_timeout_s:g} s"
        )
        log.warning("%s: killed, Ray restarts it", exc)
        kill_for_certain(self.rollouts[index], self.rollouts_where[index], no_restart=False)
        # Its requests fail with it, or (those Ray had not sent it yet) go to the restarted actor:
        # their deadlines start again.
        self.retrack([ref for ref, (_, i, _) in self.sampling.items() if i == index])
        return exc

    def stuck_learners(self, what: str) -> ActorStuck:
        """Kill every learner (the loop then restores them from the newest checkpoint), count it."""
        self.faults["stuck_learner"] += 1
        exc = ActorStuck(
            f"the learners did not finish {what} within rl.actor_timeout_s={self.cfg.rl.actor_timeout_s:g} s"
        )
        log.warning("%s: killed, restoring them", exc)
        for learner, where in zip(self.learners, self.learners_where, strict=True):
            kill_for_certain(learner, where)
        self.forget_learner_calls()  # (they fail with them)
        # The sampling requests may have waited for the weights the learners were exporting.
        self.retrack(list(self.sampling))
        return exc

    def track(self, ref: Any) -> Any:
        """Give the call ``ref`` (a sampling request, a learner update or export) its deadline."""
        self.due[ref] = time.monotonic() + self.cfg.rl.actor_timeout_s
        return ref

    def retrack(self, refs: list[Any]) -> None:
        """Give the calls ``refs`` a new deadline."""
        for ref in refs:
            self.track(ref)

    def forget_learner_calls(self) -> None:
        """Drop the deadlines of the learners' calls (those of learners that are gone)."""
        for ref in [r for r in self.due if r not in self.sampling]:
            del self.due[ref]

    def seconds_to_due(self) -> float | None:
        """Seconds until the first tracked call is due (0: one is past it), None if none is tracked."""
        return max(0.0, min(self.due.values()) - time.monotonic()) if self.due else None

    def kill_stuck(self) -> None:
        """Kill the actors of the tracked calls past their deadline and the stuck ranker actors: their
        calls then fail, and the paths for a dead actor restart or replace them and ask again.

        The learners are judged first: a rollout actor's sampling request waits behind the loading
        of the newest weights, which waits for the learners' export of them."""
        self.pool.kill_stuck()
        now = time.monotonic()
        expired = [ref for ref, due in self.due.items() if now > due]
        if not expired:
            return
        ready, _ = ray.wait(expired, num_returns=len(expired), timeout=0, fetch_local=False)
        for ref in ready:  # (a call that has finished, or failed, is handled as it comes)
            del self.due[ref]
        stuck = [ref for ref in expired if ref not in ready]
        learner_calls = [ref for ref in stuck if ref not in self.sampling]
        if learner_calls:
            exports = {ref for index, ref, _ in self.syncs if index < 0}
            what = f"the export of version {self.version}" if learner_calls[0] in exports else "an update"
            self.stuck_learners(what)
        else:
            for ref in stuck:
                if ref in self.due and self.due[ref] < now:  # (not given a new deadline just now)
                    draw, index, _ = self.sampling[ref]
                    self.stuck_rollout(index, f"its sampling request {draw}")

    def in_pipeline(self) -> int:
        """Groups asked of the rollout actors, being ranked, ranked and waiting, or being learned."""
        asked = sum(len(examples) for _, _, examples in [*self.sampling.values(), *self.deferred])
        return asked + self.ledger.live

    def sample_ahead(self) -> None:
        """Ask the rollout actors for prompts until the pipeline holds what the bound allows.

        A group sampled now is learned after every group ahead of it in the pipeline; with at most
        ``(max_staleness + 1) * prompts_per_step`` groups in it, at most ``max_staleness`` updates
        come between the version that samples it and the update that learns it. Nothing is asked
        for beyond what the remaining updates will learn.
        """
        rounds = min(self.cfg.rl.max_staleness + 1, self.updates_left)
        target = rounds * self.cfg.rl.prompts_per_step
        missing = target - self.in_pipeline()
        if missing <= 0:
            return
        examples = self.rng.sample(self.train, min(missing, len(self.train)))
        self.draws += 1
        n = len(self.rollouts)
        for i, actor in enumerate(self.rollouts):
            part = shard(examples, i, n)
            if part:
                ref = self.track(actor.rollout.remote(part, self.draws, self.sent[i]))
                self.sampling[ref], self.sampling_version[ref] = (self.draws, i, part), self.sent[i]

    def on_rollout_death(self, index: int, exc: Exception) -> None:
        """A call to rollout actor ``index`` failed (or found it serving older weights): wait until
        Ray has restarted it (up to ``rollout.max_restarts`` times), then send it the newest
        weights ahead of anything else. A restart is counted once, however many calls it failed."""
        actor = self.rollouts[index]
        deadline = time.time() + 600
        while True:
            try:
                incarnation = ray.get(actor.incarnation.remote(), timeout=60)
                break
            except (ActorUnavailableError, GetTimeoutError):  # restarting
                if time.time() > deadline:
                    raise RuntimeError(f"rollout-{index} did not come back within 600 s: {exc}") from exc
                time.sleep(0.2)
            except ActorDiedError as died:
                raise RuntimeError(
                    f"rollout-{index} died and Ray restarts it no more "
                    f"(rollout.max_restarts={self.cfg.rollout.max_restarts}): {died}"
                ) from exc
        if incarnation != self.incarnations[index]:
            self.incarnations[index] = incarnation
            self.rollouts_where[index] = ask_whereabouts(actor)
            self.faults["rollout_restarts"] += 1
            log.warning(
                "rollout-%d died (%s): restarted, now sent weight version %d", index, exc, self.version
            )
        if self.state_ref is not None:  # (an actor that holds this version already ignores it)
            ref = actor.update_weights.remote(self.version, self.state_ref)
            self.syncs.append((index, ref, time.monotonic() + self.cfg.rl.actor_timeout_s))
            self.sent[index] = self.version

    def on_sampled(self, ref: Any) -> int | None:
        """Queue a finished draw's groups for ranking; returns how many came back, or None when the
        draw is asked again (its actor was restarted, or lacked the newest weights)."""
        draw, index, examples = self.sampling.pop(ref)
        del self.sampling_version[ref]
        self.due.pop(ref, None)
        try:
            groups = ray.get(ref)
        except (RayActorError, WeightsBehind) as exc:
            if not self.learners_alive():  # the weights it lacks died with a learner
                self.deferred.append((draw, index, examples))
                raise LearnersDied(f"a learner died; rollout-{index}: {exc}") from exc
            self.on_rollout_death(index, exc)
            self.resample(draw, index, examples)
            return None
        self.sampled_without_reference += sum(g.reference is None for g in groups)
        if groups:
            lag = self.version - min(g.weight_version for g in groups)
            Telemetry("rollout", f"rollout-{index}").set("rlaif_rollout_weight_lag", lag)
        self.pool.submit(self.ledger.sampled(groups, draw))
        return len(groups)

    def resample(self, draw: int, index: int, examples: list[Any]) -> None:
        """Ask rollout actor ``index`` for a draw's prompts again (with the version last sent to it)."""
        ref = self.track(self.rollouts[index].rollout.remote(examples, draw, self.sent[index]))
        self.sampling[ref], self.sampling_version[ref] = (draw, index, examples), self.sent[index]

    def on_ranked(self, ref: Any) -> None:
        self.ledger.ranked(self.pool.collect(ref))

    def take_batch(self) -> list[Group] | None:
        """``rl.prompts_per_step`` ranked groups within the staleness bound, oldest first
        (:meth:`GroupLedger.take_batch`), or None while too few have arrived."""
        return self.ledger.take_batch(
            self.version, self.cfg.rl.prompts_per_step, self.oldest_pending_version()
        )

    def oldest_pending_version(self) -> int | None:
        """The oldest weight version among the groups being sampled or ranked (None if none)."""
        versions = [*self.sampling_version.values(), self.pool.oldest_pending_version()]
        return min((v for v in versions if v is not None), default=None)

    def sync_weights(self) -> None:
        """Learner 0's weights -> object store (one copy) -> every rollout actor, ahead of its next
        sampling request. Every learner takes part in the export (a collective under ZeRO-3)."""
        exports = [self.track(learner.export_weights.remote()) for learner in self.learners]
        self.state_ref = exports[0]
        due = self.due[exports[0]]
        # The exports first: a stuck learner must not pass for a stuck rollout actor.
        self.syncs = [(-1, ref, due) for ref in exports] + [
            (i, actor.update_weights.remote(self.version, self.state_ref), due)
            for i, actor in enumerate(self.rollouts)
        ]
        self.sent = [self.version] * len(self.rollouts)

    def finish_syncs(self) -> bool:
        """Wait until every rollout actor holds the newest weights. A rollout actor that died is sent
        them again once restarted. Returns False when a learner died or its export's collective
        failed."""
        while self.syncs:
            index, ref, due = self.syncs.pop(0)
            self.due.pop(ref, None)
            try:
                # (learner 0's export is the weights: waited for here, not fetched; its errors
                # reach the rollout actors' calls)
                done, _ = ray.wait([ref], timeout=max(0.0, due - time.monotonic()), fetch_local=False)
                if not done:
                    raise GetTimeoutError
                if ref is not self.state_ref:
                    ray.get(ref)
            except GetTimeoutError:
                if index < 0:
                    self.stuck_learners(f"the export of version {self.version}")
                    return False
                self.on_rollout_death(index, self.stuck_rollout(index, f"loading version {self.version}"))
            except LearnerCollectiveError as exc:  # the export (a collective) failed
                log.error("%s", exc)
                return False
            except RayActorError as exc:
                if index < 0 or not self.learners_alive():
                    return False
                self.on_rollout_death(index, exc)
        return True

    def learners_alive(self) -> bool:
        try:
            ray.get([learner.__ray_ready__.remote() for learner in self.learners], timeout=60)
        except (RayActorError, GetTimeoutError):
            return False
        return True

    def progress(self, until: list[Any] | None = None) -> bool:
        """Handle the next finished sampling or ranking request, or return True once every reference
        in ``until`` (the learner's update) is done: the rollouts and rankers work meanwhile."""
        self.kill_stuck()  # (their calls fail now, and are handled below as a dead actor's)
        if until is not None:
            finished, pending = ray.wait(until, num_returns=len(until), timeout=0)
            ray.get(finished)  # a learner whose update failed fails it now, not once every rank is done
            if not pending:
                return True
        waiting = list(self.sampling) + self.pool.in_flight() + (until or [])
        if not waiting:
            raise RuntimeError("nothing is being sampled or ranked, yet no batch is ready")
        due = [t for t in (self.pool.seconds_to_wait(), self.seconds_to_due()) if t is not None]
        done, _ = ray.wait(waiting, num_returns=1, timeout=min(due) if due else None)
        if not done:  # an idle ranker actor is due to retire, or a call is past its deadline
            self.kill_stuck()
            self.pool.retire_idle()
        elif done[0] in self.sampling:
            returned = self.on_sampled(done[0])
            if returned is not None:
                self.empty_draws = self.empty_draws + 1 if returned == 0 else 0
            if self.empty_draws >= 10 * len(self.rollouts):
                raise RuntimeError(
                    "the rollout actors returned no group 10 times in a row: does any video decode?"
                )
        elif done[0] in self.pool.in_flight():
            self.on_ranked(done[0])
        return False

    def wait_for_batch(self) -> list[Group]:
        """Keep sampling and ranking until a batch is ready."""
        while (batch := self.take_batch()) is None:
            self.sample_ahead()
            self.progress()
        return batch

    # ---- checkpoints, restore and resume

    def save(self, name: str) -> str:
        """Write checkpoint ``checkpoints/<name>`` (:mod:`rlaif_ray.checkpoint`): the learners' full
        state, the rollout actors' sampling RNGs, the loop's state and the config."""

        def write(folder: Path) -> None:
            saves = [learner.save_state.remote(str(folder)) for learner in self.learners]
            try:
                ray.get(saves, timeout=self.cfg.rl.actor_timeout_s)
            except GetTimeoutError:
                raise LearnersDied(str(self.stuck_learners(f"saving {name}"))) from None
            except RayActorError as exc:
                raise LearnersDied(f"a learner died saving {name}: {exc}") from exc
            rngs = [
                self.from_rollout(i, lambda actor: actor.rng_state.remote(), "its RNG state")
                for i in range(len(self.rollouts))
            ]
            torch.save(rngs, folder / ROLLOUT_RNG)
            state = {
                "step": self.step_no,
                "version": self.version,
                "draws": self.draws,
                "rng": self.rng.getstate(),
                "ledger": self.ledger.snapshot(),
                "faults": self.faults,
                "rows_bad_video": self.rows_bad_video,
                "sampled_without_reference": self.sampled_without_reference,
                "evals": self.evals,
                "restores": self.restores,
            }
            (folder / TRAINER_STATE).write_text(json.dumps(state))
            (folder / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

        final = write_checkpoint(self.run_dir / "checkpoints", name, write, self.cfg.rl.keep_checkpoints)
        if name.startswith("step_"):
            self.ledger.checkpointed()
            self.checkpoint_step = self.step_no
        return str(final)

    def restore_learners(self, reason: Exception) -> None:
        """Replace every learner (one died: the process group is gone) and restore them from the
        newest checkpoint, or from the warm start when there is none yet. The updates since then
        are rolled back; the restored weights are published as a version above every version
        served so far, and groups sampled by rolled-back weights are dropped (counted)."""
        self.write_record()
        self.faults["learner_restores"] += 1
        if self.faults["learner_restores"] > self.cfg.learner.max_restores:
            raise RuntimeError(
                f"learners died {self.faults['learner_restores']} times (learner.max_restores="
                f"{self.cfg.learner.max_restores}): {reason}"
            ) from reason
        folder = latest_checkpoint(self.run_dir)
        new_version = self.version + 1
        updates, rolled = self.ledger.roll_back(new_version)
        log.warning(
            "a learner died (%s): restoring every learner from %s; %d update(s) (%d groups) rolled back",
            reason,
            folder or "the warm start",
            updates,
            rolled,
        )
        stop_actors(self.learners)
        self.learners = start_learners(self.cfg, self.policy_dir)
        self.learners_where = [ask_whereabouts(learner) for learner in self.learners]
        if folder is None:
            ray.get([learner.set_version.remote(new_version) for learner in self.learners])
        else:
            ray.get([learner.load_state.remote(folder, new_version) for learner in self.learners])
        self.restores.append(
            {"at_step": self.step_no, "to_step": self.checkpoint_step, "rolled_back_groups": rolled}
        )
        self.step_no = self.checkpoint_step
        self.updates_left = self.cfg.rl.steps - self.step_no
        self.version = new_version
        self.syncs = []
        self.forget_learner_calls()  # (the replaced learners' exports)
        self.sync_weights()
        for draw, index, examples in self.deferred:
            self.resample(draw, index, examples)
        self.deferred = []

    def resume(self, folder: Path, metrics_path: Path) -> None:
        """Continue from checkpoint ``folder``: the learners' state, the loop's counts, data order and
        the rollout actors' sampling RNGs. Records of later steps in ``metrics.jsonl`` (learned, then
        lost with the stopped job) are taken out and their groups counted as rolled back; the groups
        that were in the pipeline at the stop are counted as lost."""
        state = load_trainer_state(folder)
        later = split_metrics(metrics_path, state["step"])
        self.faults.update(state["faults"])
        self.evals, self.restores = state["evals"], state["restores"]
        self.rows_bad_video = state["rows_bad_video"]
        self.sampled_without_reference = state.get("sampled_without_reference", 0)
        self.rng.setstate(json_to_tuple(state["rng"]))
        self.draws = state["draws"]
        self.step_no = self.checkpoint_step = state["step"]
        self.updates_left = self.cfg.rl.steps - self.step_no
        seen = max([state["version"]] + [r["weight_version"] for r in later])
        self.version = state["version"] if seen == state["version"] else seen + 1
        # The stopped job's updates after the checkpoint are rolled back, what it had live is lost.
        self.ledger = GroupLedger.resumed(
            self.cfg.rl.max_staleness, state["ledger"], [r["pipeline"] for r in later], floor=self.version
        )
        ray.get([learner.load_state.remote(str(folder), self.version) for learner in self.learners])
        rngs = torch.load(folder / ROLLOUT_RNG, weights_only=False)
        ray.get([a.set_rng_state.remote(rngs[i % len(rngs)]) for i, a in enumerate(self.rollouts)])
        self.sync_weights()
        self.finish_syncs()
        print(
            f"[rl] resumed from {folder} at step {self.step_no} (weight version {self.version}); "
            f"{len(later)} later step(s) rolled back",
            flush=True,
        )

    # ---- one update

    def step(self) -> dict[str, Any] | None:
        """One update; None when a learner died and the learners were restored instead."""
        t0 = time.time()
        try:
            self.sample_ahead()
            batch = self.wait_for_batch()
            t1 = time.time()
            lags = [self.version - g.weight_version for g in batch]
            groups_ref = ray.put(batch)
            updates = [self.track(learner.train_step.remote(groups_ref)) for learner in self.learners]
            self.write_record()
            try:
                while not self.progress(until=updates):
                    self.sample_ahead()
                learner_stats = ray.get(updates)[0]
            finally:
                for ref in updates:
                    self.due.pop(ref, None)
        except (RayActorError, LearnersDied, LearnerCollectiveError) as exc:
            self.restore_learners(exc)
            return None
        self.updates_left -= 1
        self.step_no += 1
        self.ledger.learned(
            skipped_tied=int(learner_stats.get("groups_skipped_tied", 0)),
            skipped_nonfinite=learner_stats.get("skipped_nonfinite", 0) > 0,
        )
        self.rows_bad_video += int(learner_stats.get("rows_bad_video", 0))
        t2 = time.time()
        if not self.finish_syncs():  # the previous update's weights reached every rollout actor
            self.restore_learners(RuntimeError("a learner died while exporting its weights"))
            return None
        if not learner_stats.get("skipped_step"):
            self.version = int(learner_stats["version"])
            self.sync_weights()
        t3 = time.time()
        return {
            "step": self.step_no,
            "samples": sum(g.size for g in batch),
            "answer_tokens_mean": sum(len(ids) for g in batch for ids in g.completion_ids)
            / max(1, sum(g.size for g in batch)),
            "groups": len(batch),
            "weight_version": self.version,
            "rollout_versions": sorted({g.weight_version for g in batch}),
            "group_ids": [g.group_id for g in batch],
            "group_lags": lags,
            "sampled_accuracy": sampled_accuracy(batch),
            "ranker": self.pool.stats(),
            "pipeline": {**self.ledger.snapshot(), "in_flight": self.in_pipeline()},
            "faults": dict(self.faults),
            "learner": learner_stats,
            "time": {
                "wait_s": t1 - t0,
                "rollout_s": sum(g.rollout_s for g in batch) / len(batch),
                "rank_s": sum(g.rank_s for g in batch) / len(batch),
                "learn_s": t2 - t1,
                "sync_s": t3 - t2,
                "step_s": t3 - t0,
            },
        }

    def run(self, resume_from: Path | None = None) -> dict[str, Any]:
        """The whole run: the evaluation before RL (or the resume from ``resume_from``), the
        updates, then the final evaluations, checkpoint and ``summary.json``, which it returns."""
        start = time.time()
        metrics_path = self.run_dir / "metrics.jsonl"
        scalars = ScalarWriter(self.run_dir)  # TensorBoard: tensorboard --logdir runs/
        if resume_from is None:
            before = self.evaluate()
            print(
                f"[rl] held-out accuracy before RL: {before['accuracy']:.3f} "
                f"({self.cfg.rl.eval_split}, n={before['n']})",
                flush=True,
            )
            scalars.write(0, {"eval": before})
            self.evals = [{"step": 0, **before}]
            metrics_path.write_text("")
        else:
            self.resume(resume_from, metrics_path)
        first_step = self.step_no
        rl_wall_s = self.learn(metrics_path, scalars)
        return self.finish(scalars, resume_from, first_step, start, rl_wall_s)

    def learn(self, metrics_path: Path, scalars: ScalarWriter) -> float:
        """Updates until ``rl.steps`` (or ``rl.time_limit_s``), each recorded in ``metrics_path``,
        TensorBoard and the live metrics, with the evaluations and checkpoints the config asks
        for. Returns the seconds it took, evaluations excluded.

        A step's record is written once the next update has been sent (:meth:`write_record`), so
        that the learner does not wait for it; a step that evaluates, checkpoints or ends the run
        is written at once."""
        cfg = self.cfg
        first_step = self.step_no
        rl_start = time.time()
        eval_s = 0.0  # evaluation time does not count against rl.time_limit_s
        with metrics_path.open("a") as metrics:
            try:
                while self.step_no < cfg.rl.steps:
                    record = self.step()  # (it wrote the previous step's record, or a restore did)
                    if record is None:  # learners restored: the loop goes on from the checkpoint's step
                        continue
                    step = record["step"]
                    out_of_time = (
                        bool(cfg.rl.time_limit_s) and time.time() - rl_start - eval_s >= cfg.rl.time_limit_s
                    )
                    evaluate = step % cfg.rl.eval_every == 0 and step != cfg.rl.steps and not out_of_time
                    if (evaluate or step % cfg.rl.checkpoint_every == 0) and not self.finish_syncs():
                        self.restore_learners(RuntimeError("a learner died while exporting its weights"))
                        continue
                    if evaluate:
                        t = time.time()
                        record["eval"] = self.evaluate()
                        self.evals.append({"step": step, **record["eval"]})
                        eval_s += time.time() - t
                    if step % cfg.rl.checkpoint_every == 0:
                        try:
                            record["checkpoint"] = self.save(f"step_{step}")
                        except LearnersDied as exc:  # (dead or stuck while saving)
                            self.restore_learners(exc)
                            continue
                    done = step - first_step
                    eta_s = (time.time() - rl_start) / max(done, 1) * (cfg.rl.steps - step)
                    if cfg.rl.time_limit_s:
                        eta_s = min(eta_s, max(0.0, cfg.rl.time_limit_s - (time.time() - rl_start - eval_s)))
                    self.unwritten = functools.partial(self.write_step, metrics, scalars, record, eta_s)
                    if evaluate or "checkpoint" in record or out_of_time:
                        self.write_record()
                    if out_of_time:
                        print(
                            f"[rl] rl.time_limit_s={cfg.rl.time_limit_s:g} reached after {step} steps",
                            flush=True,
                        )
                        break
                    self.sample_ahead()  # the next prompts while this step is recorded and evaluated
            finally:  # the last step's record, also when the run stops with an error
                self.write_record()
        return time.time() - rl_start - eval_s

    def write_step(
        self, metrics: TextIO, scalars: ScalarWriter, record: dict[str, Any], eta_s: float
    ) -> None:
        """A step's ``record``: a line of ``metrics``, TensorBoard scalars, the live metrics and the job log."""
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        scalars.write(record["step"], record)
        self.metrics.publish(record)
        print(progress_line(record, self.cfg.rl.steps, eta_s), flush=True)
        if "eval" in record:
            print(
                f"[rl] held-out accuracy at step {record['step']}: {record['eval']['accuracy']:.3f} "
                f"({self.cfg.rl.eval_split}, n={record['eval']['n']})",
                flush=True,
            )

    def write_record(self) -> None:
        """Write the last step's record if it is not written yet. :meth:`step` calls it right
        after sending the next update, so that the learner does not wait while the driver writes
        (metrics.jsonl, TensorBoard, live metrics, log line: a noticeable share of a small step)."""
        write, self.unwritten = self.unwritten, None
        if write is not None:
            write()

    def finish(
        self,
        scalars: ScalarWriter,
        resume_from: Path | None,
        first_step: int,
        started_at: float,
        rl_wall_s: float,
    ) -> dict[str, Any]:
        """After the last update: the final evaluations (``rl.eval_split``, then ``data.test``
        once with ``rl.final_test``), the final checkpoint, ``summary.json`` and ``curves.png``.
        ``started_at``: the run's start (``time.time()``); ``rl_wall_s``: what :meth:`learn` took."""
        cfg = self.cfg
        while not self.finish_syncs():
            self.restore_learners(RuntimeError("a learner died while exporting its final weights"))
        before = self.evals[0]
        after = self.evaluate() if self.step_no else before
        self.evals.append({"step": self.step_no, **after})
        if self.step_no:
            scalars.write(self.step_no, {"eval": after})
        scalars.close()
        final_test = None  # the final report's split: evaluated once, at the end
        if cfg.rl.final_test and cfg.rl.eval_split != "test":
            final_test = self.evaluate(self.load_split("test"))
            print(
                f"[rl] test accuracy after RL: {final_test['accuracy']:.3f} (n={final_test['n']})", flush=True
            )
        self.ledger.end_run()
        try:
            final = self.save("final")
        except LearnersDied as exc:
            raise RuntimeError(
                f"{exc}: the final checkpoint was not written; resume={self.run_dir} goes on from the "
                "newest step checkpoint"
            ) from exc
        rollout_stats = [
            self.from_rollout(i, lambda actor: actor.stats.remote(), "its counters")
            for i in range(len(self.rollouts))
        ]
        ray.get([actor.close.remote() for actor in self.rollouts], timeout=self.cfg.rl.actor_timeout_s)
        summary = {
            "eval_split": cfg.rl.eval_split,
            "accuracy_before": before["accuracy"],
            "accuracy_after": after["accuracy"],
            "part_accuracy_before": before.get("part_accuracy"),  # (absent in runs resumed from older code)
            "part_accuracy_after": after.get("part_accuracy"),
            "per_type_before": before["per_type"],
            "per_type_after": after["per_type"],
            "eval_examples": after["n"],
            "test": final_test,
            "steps": self.step_no,
            "steps_run_by_this_job": self.step_no - first_step,
            "resumed_from": str(resume_from) if resume_from else None,
            "weight_version": self.version,
            "max_staleness": cfg.rl.max_staleness,
            "wall_s": time.time() - started_at,
            "rl_wall_s": rl_wall_s,
            "evals": self.evals,
            "groups": self.ledger.snapshot(),
            # Groups sampled for prompts without a reference answer (ranked by a judge only).
            "groups_without_reference": self.sampled_without_reference,
            "faults": {
                **self.faults,
                "ranker_restarts": self.pool.restarts,
                "stuck_ranker": self.pool.stuck,
                "restores": self.restores,
            },
            "ranker": self.pool.stats(),
            "rollout": rollout_stats,
            "bad_inputs": {
                "data_lines": json.loads((self.run_dir / "data_check.json").read_text()),
                "prompts_bad_video": sum(s["prompts_bad_video"] for s in rollout_stats),
                "learner_rows_bad_video": self.rows_bad_video,
            },
            "checkpoint": final,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        try:
            plot_runs([self.run_dir], self.run_dir / "curves.png")
        except Exception as exc:  # the run's results are on disk already: a figure is not worth more
            log.warning("could not draw %s: %r", self.run_dir / "curves.png", exc)
        print(
            f"[rl] held-out accuracy after RL: {after['accuracy']:.3f} "
            f"({cfg.rl.eval_split}, {after['accuracy'] - before['accuracy']:+.3f}); run folder {self.run_dir}",
            flush=True,
        )
        return summary


def prepare_run(cfg: Config) -> tuple[Config, Path, Path]:
    """Absolute paths, the run folder with its ``config.yaml``, the data (checked line by line
    before anything starts: ``data_check.json``) and the model folder."""
    cfg = with_absolute_paths(cfg)
    if cfg.resume:
        run_dir, _ = resume_point(cfg)
    else:
        run_dir = Path(cfg.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}").absolute()
        run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    ensure_data(cfg)
    data = check_data(cfg)
    (run_dir / "data_check.json").write_text(json.dumps(data, indent=2))
    unlabelled = data["train"]["without_answer"]
    if unlabelled and backend_class(cfg.ranker.backend).needs_reference:
        raise ConfigError(
            f"data.train = {cfg.data.train} has {unlabelled} line(s) without an answer, and "
            f"ranker.backend={cfg.ranker.backend} ranks against the reference answer: rank prompts "
            "nobody labelled with a judge that looks at the video (ranker.backend=video_judge, "
            "ranker.judge_path=...)"
        )
    return cfg, run_dir, ensure_model(cfg)


def run(cfg: Config) -> dict[str, Any]:
    """The whole pipeline on ``cfg``; returns the summary written to ``summary.json``."""
    cfg, run_dir, model_dir = prepare_run(cfg)
    started_ray = not ray.is_initialized()
    if started_ray:
        init_ray(cfg)
    try:
        judge_ready(cfg)
        policy_dir = warm_start(cfg, model_dir)
        resume_from = resume_point(cfg)[1] if cfg.resume else None
        return Trainer(cfg, run_dir, policy_dir).run(resume_from)
    finally:
        if started_ray:
            ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Oracle-RLAIF (GRPO_rank) on Ray")
    parser.add_argument(
        "--config",
        default=None,
        help="YAML config (default: configs/default.yaml, or the run's own config.yaml with resume=RUN_DIR)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="key=value config overrides, e.g. rl.steps=10; resume=RUN_DIR continues a run",
    )
    args = parser.parse_args(argv)
    config = args.config
    if config is None:
        resume = [o.split("=", 1)[1] for o in args.overrides if o.startswith("resume=")]
        config = str(Path(resume[-1]) / "config.yaml") if resume else "configs/default.yaml"
    cfg = load_config(config, args.overrides)
    setup_logging(cfg.log_level)
    run(cfg)


if __name__ == "__main__":
    main()
