"""The entry point: config -> SFT warm start -> Ray actors -> GRPO_rank loop -> run folder.

    python -m rlaif_ray.launch --config configs/default.yaml [key=value ...]
    ray job submit --working-dir . -- python -m rlaif_ray.launch --config configs/default.yaml

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
import copy
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import ray
import yaml

from rlaif_ray.config import Config, load_config
from rlaif_ray.data.dataset import load_jsonl
from rlaif_ray.groups import Group
from rlaif_ray.learner.worker import LearnerWorker, shard
from rlaif_ray.logs import ScalarWriter, setup_logging
from rlaif_ray.plot import plot_runs
from rlaif_ray.prepare import ensure_data, ensure_model
from rlaif_ray.ranker.pool import RankerPool
from rlaif_ray.rollout.worker import RolloutWorker
from rlaif_ray.sft import finished_checkpoint, run_sft

log = logging.getLogger(__name__)


def init_ray(cfg: Config) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it), else start a local one."""
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    # Logical CPUs: enough for every actor at once (they take turns on the real cores).
    needed = (
        cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor
        + cfg.learner.num_actors * cfg.learner.num_cpus_per_actor
        + cfg.ranker.max_actors * cfg.ranker.num_cpus_per_actor
        + 1
    )
    resources = {cfg.ranker.resource: float(cfg.ranker.max_actors)} if cfg.ranker.resource else {}
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), resources=resources)


def warm_start(cfg: Config, model_dir: Path) -> str:
    """The folder RL starts from: the SFT checkpoint (trained now, or reused), else the base model."""
    if not cfg.sft.enabled:
        return str(model_dir)
    if cfg.sft.reuse and finished_checkpoint(cfg.sft.output_dir):
        print(f"[launch] reusing the SFT checkpoint in {cfg.sft.output_dir}", flush=True)
        return cfg.sft.output_dir
    print(f"[launch] SFT warm start: {cfg.sft.steps} steps -> {cfg.sft.output_dir}", flush=True)
    # In a task of its own (one process group per process; on a GPU cluster, on a GPU node).
    task = ray.remote(
        num_cpus=cfg.learner.num_cpus_per_actor, num_gpus=cfg.learner.num_gpus_per_actor, max_calls=1
    )(run_sft)
    ray.get(task.remote(cfg))
    return cfg.sft.output_dir


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
    ray.get([learner.setup.remote(master_addr, master_port) for learner in learners])
    return learners


def start_rollouts(cfg: Config, policy_dir: str) -> list[Any]:
    """``rollout.num_actors`` named rollout actors, each serving weight version 0."""
    rc = cfg.rollout
    actor_cls = ray.remote(RolloutWorker)
    return [
        actor_cls.options(
            name=f"rollout-{rank}", num_cpus=rc.num_cpus_per_actor, num_gpus=rc.num_gpus_per_actor
        ).remote(cfg, policy_dir, rank)
        for rank in range(rc.num_actors)
    ]


def sampled_accuracy(groups: list[Group]) -> float | None:
    """Fraction of sampled answers the oracle scored correct (None when it gives no scores)."""
    scores = [s for g in groups if g.scores is not None for s in g.scores]
    return sum(scores) / len(scores) if scores else None


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
    """

    def __init__(self, cfg: Config, run_dir: Path, policy_dir: str) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.train = load_jsonl(cfg.data.train, on_error=cfg.data.on_bad_line)
        self.test = load_jsonl(cfg.data.test, on_error=cfg.data.on_bad_line)
        if cfg.rl.eval_examples:
            self.test = self.test[: cfg.rl.eval_examples]
        self.rng = random.Random(cfg.seed)
        self.learners = start_learners(cfg, policy_dir)
        self.rollouts = start_rollouts(cfg, policy_dir)
        self.pool = RankerPool(cfg)
        self.version = 0
        self.draws = 0  # sampling requests so far: each draw's groups are ids "<draw>:<example>"
        self.sampling: dict[Any, tuple[int, int]] = {}  # rollout ref -> (draw, prompts asked)
        self.ready: list[Group] = []  # ranked, waiting for the learner, in arrival order
        self.order: dict[str, tuple[int, int]] = {}  # group id -> (draw, position): the sampling order
        self.syncs: list[Any] = []
        self.empty_draws = 0
        self.learning = 0  # groups in the learner's update now
        self.updates_left = cfg.rl.steps
        # Every group sampled ends up learned (of which skipped_tied carried no signal), dropped
        # (too stale, or unranked by the ranker's "drop" fallback) or, at the end, unlearned.
        self.counts = {
            "sampled": 0,
            "learned": 0,
            "skipped_tied": 0,
            "dropped_stale": 0,
            "dropped_unranked": 0,
        }

    def evaluate(self) -> dict[str, Any]:
        """Held-out accuracy of the served version (rollout-0, greedy)."""
        return ray.get(self.rollouts[0].evaluate.remote(self.test))

    def in_pipeline(self) -> int:
        """Groups asked of the rollout actors, being ranked, ranked and waiting, or being learned."""
        return sum(n for _, n in self.sampling.values()) + self.pool.pending + len(self.ready) + self.learning

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
                self.sampling[actor.rollout.remote(part, self.draws)] = (self.draws, len(part))

    def on_sampled(self, ref: Any) -> None:
        draw, _ = self.sampling.pop(ref)
        groups = ray.get(ref)
        for position, group in enumerate(groups):
            self.order[group.group_id] = (draw, position)
        self.counts["sampled"] += len(groups)
        self.pool.submit(groups)

    def on_ranked(self, ref: Any) -> None:
        for group in self.pool.collect(ref):
            if group.ranks is None:  # the ranker's "drop" fallback
                self.counts["dropped_unranked"] += 1
                self.order.pop(group.group_id, None)
            else:
                self.ready.append(group)

    def take_batch(self) -> list[Group] | None:
        """``rl.prompts_per_step`` ranked groups within the staleness bound (oldest first, then in
        sampling order), or None while too few have arrived. Groups over the bound are dropped."""
        fresh = []
        for group in self.ready:
            if self.version - group.weight_version <= self.cfg.rl.max_staleness:
                fresh.append(group)
                continue
            log.warning("group %s of version %d is too old: dropped", group.group_id, group.weight_version)
            self.counts["dropped_stale"] += 1
            self.order.pop(group.group_id, None)
        self.ready = fresh
        size = self.cfg.rl.prompts_per_step
        if len(self.ready) < size:
            return None
        # Oldest version first (a group ranked late must not fall behind newer ones and out of
        # the bound), then in sampling order, so that a run does not depend on ranking times.
        self.ready.sort(key=lambda g: (g.weight_version, self.order[g.group_id]))
        batch, self.ready = self.ready[:size], self.ready[size:]
        for group in batch:
            del self.order[group.group_id]
        return batch

    def sync_weights(self) -> None:
        """Learner 0's weights -> object store (one copy) -> every rollout actor, ahead of its next
        sampling request. Every learner takes part in the export (a collective under ZeRO-3)."""
        state_ref, *others = [learner.export_weights.remote() for learner in self.learners]
        self.syncs = [
            actor.update_weights.remote(self.version, state_ref) for actor in self.rollouts
        ] + others

    def progress(self, until: list[Any] | None = None) -> bool:
        """Handle the next finished sampling or ranking request, or return True once every reference
        in ``until`` (the learner's update) is done: the rollouts and rankers work meanwhile."""
        if until is not None and not ray.wait(until, num_returns=len(until), timeout=0)[1]:
            return True
        waiting = list(self.sampling) + self.pool.in_flight() + (until or [])
        if not waiting:
            raise RuntimeError("nothing is being sampled or ranked, yet no batch is ready")
        done, _ = ray.wait(waiting, num_returns=1)
        if done[0] in self.sampling:
            before = self.counts["sampled"]
            self.on_sampled(done[0])
            self.empty_draws = self.empty_draws + 1 if self.counts["sampled"] == before else 0
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

    def save(self, name: str) -> str:
        folder = str(self.run_dir / "checkpoints" / name)
        ray.get([learner.save.remote(folder) for learner in self.learners])
        return folder

    def step(self, step: int) -> dict[str, Any]:
        t0 = time.time()
        self.sample_ahead()
        batch = self.wait_for_batch()
        t1 = time.time()
        lags = [self.version - g.weight_version for g in batch]
        groups_ref = ray.put(batch)
        updates = [learner.train_step.remote(groups_ref) for learner in self.learners]
        self.learning = len(batch)
        while not self.progress(until=updates):
            self.sample_ahead()
        learner_stats = ray.get(updates)[0]
        self.learning = 0
        self.updates_left -= 1
        self.counts["learned"] += len(batch)
        self.counts["skipped_tied"] += int(learner_stats.get("groups_skipped_tied", 0))
        t2 = time.time()
        ray.get(self.syncs)  # the previous update's weights reached every rollout actor
        if not learner_stats.get("skipped_step"):
            self.version = int(learner_stats["version"])
            self.sync_weights()
        self.sample_ahead()  # sample the next prompts while this step is recorded and evaluated
        t3 = time.time()
        return {
            "step": step,
            "samples": sum(g.size for g in batch),
            "groups": len(batch),
            "weight_version": self.version,
            "rollout_versions": sorted({g.weight_version for g in batch}),
            "group_ids": [g.group_id for g in batch],
            "group_lags": lags,
            "sampled_accuracy": sampled_accuracy(batch),
            "ranker": self.pool.stats(),
            "pipeline": {**self.counts, "in_flight": self.in_pipeline()},
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

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        start = time.time()
        scalars = ScalarWriter(self.run_dir)  # TensorBoard: tensorboard --logdir runs/
        before = self.evaluate()
        print(f"[rl] held-out accuracy before RL: {before['accuracy']:.3f} (n={before['n']})", flush=True)
        scalars.write(0, {"eval": before})
        evals = [{"step": 0, **before}]
        rl_start = time.time()
        eval_s = 0.0  # evaluation time does not count against rl.time_limit_s
        steps_done = 0
        with (self.run_dir / "metrics.jsonl").open("w") as metrics:
            for step in range(1, cfg.rl.steps + 1):
                record = self.step(step)
                steps_done = step
                out_of_time = (
                    bool(cfg.rl.time_limit_s) and time.time() - rl_start - eval_s >= cfg.rl.time_limit_s
                )
                if step % cfg.rl.eval_every == 0 and step != cfg.rl.steps and not out_of_time:
                    t = time.time()
                    ray.get(self.syncs)
                    record["eval"] = self.evaluate()
                    evals.append({"step": step, **record["eval"]})
                    eval_s += time.time() - t
                if step % cfg.rl.checkpoint_every == 0:
                    record["checkpoint"] = self.save(f"step_{step}")
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                scalars.write(step, record)
                eta_s = (time.time() - rl_start) / step * (cfg.rl.steps - step)
                if cfg.rl.time_limit_s:
                    eta_s = min(eta_s, max(0.0, cfg.rl.time_limit_s - (time.time() - rl_start - eval_s)))
                print(progress_line(record, cfg.rl.steps, eta_s), flush=True)
                if "eval" in record:
                    print(
                        f"[rl] held-out accuracy at step {step}: {record['eval']['accuracy']:.3f} "
                        f"(n={record['eval']['n']})",
                        flush=True,
                    )
                if out_of_time:
                    print(
                        f"[rl] rl.time_limit_s={cfg.rl.time_limit_s:g} reached after {step} steps", flush=True
                    )
                    break
        rl_wall_s = time.time() - rl_start - eval_s
        ray.get(self.syncs)
        after = self.evaluate() if steps_done else before
        evals.append({"step": steps_done, **after})
        if steps_done:
            scalars.write(steps_done, {"eval": after})
        scalars.close()
        final = self.save("final")
        summary = {
            "accuracy_before": before["accuracy"],
            "accuracy_after": after["accuracy"],
            "per_type_before": before["per_type"],
            "per_type_after": after["per_type"],
            "eval_examples": after["n"],
            "steps": steps_done,
            "weight_version": self.version,
            "max_staleness": cfg.rl.max_staleness,
            "wall_s": time.time() - start,
            "rl_wall_s": rl_wall_s,
            "evals": evals,
            "groups": {**self.counts, "unlearned_at_end": self.in_pipeline()},
            "ranker": self.pool.stats(),
            "rollout": ray.get([a.stats.remote() for a in self.rollouts]),
            "checkpoint": final,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        try:
            plot_runs([self.run_dir], self.run_dir / "curves.png")
        except Exception as exc:  # the run's results are on disk already: a figure is not worth more
            log.warning("could not draw %s: %r", self.run_dir / "curves.png", exc)
        print(
            f"[rl] held-out accuracy after RL: {after['accuracy']:.3f} "
            f"({after['accuracy'] - before['accuracy']:+.3f}); run folder {self.run_dir}",
            flush=True,
        )
        return summary


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


def with_absolute_paths(cfg: Config) -> Config:
    """Resolve the config's relative paths against the driver's directory (actors run elsewhere)."""
    cfg = copy.deepcopy(cfg)
    for section, key in [
        ("data", "train"),
        ("data", "val"),
        ("data", "test"),
        ("data", "synthetic_dir"),
        ("model", "path"),
        ("sft", "output_dir"),
        ("ranker", "judge_model_path"),
    ]:
        value = getattr(getattr(cfg, section), key)
        if value:
            setattr(getattr(cfg, section), key, str(Path(value).absolute()))
    return cfg


def prepare_run(cfg: Config) -> tuple[Config, Path, Path]:
    """Absolute paths, the run folder with its ``config.yaml``, the data and the model folder."""
    cfg = with_absolute_paths(cfg)
    run_dir = Path(cfg.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = run_dir.absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    ensure_data(cfg)
    return cfg, run_dir, ensure_model(cfg)


def run(cfg: Config) -> dict[str, Any]:
    """The whole pipeline on ``cfg``; returns the summary written to ``summary.json``."""
    cfg, run_dir, model_dir = prepare_run(cfg)
    started_ray = not ray.is_initialized()
    if started_ray:
        init_ray(cfg)
    try:
        policy_dir = warm_start(cfg, model_dir)
        return Trainer(cfg, run_dir, policy_dir).run()
    finally:
        if started_ray:
            ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Oracle-RLAIF (GRPO_rank) on Ray")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. rl.steps=10")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    setup_logging(cfg.log_level)
    run(cfg)


if __name__ == "__main__":
    main()
