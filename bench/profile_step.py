"""Where one RL step's time goes, and how step time grows with group size, prompts and frames.

    python bench/profile_step.py [key=value ...] [--group-sizes 2 5 8] [--prompts 16 32 64]
        [--frames 4 8 16] [--reps 3] [--threads 1] [--compare-rounds 2] [--top 15] [--quick]
        [--name NAME]

(config overrides first: the list options would take them as their values)

One synchronous step of the default config (``configs/default.yaml``: 64 prompts x G=5 answers,
8 frames per video, from the SFT warm start), run in this process through the plain classes, as
``tests/test_async.py`` does: ``RolloutWorker`` (transformers engine) samples a group per
prompt, ``RankerWorker`` (ground-truth oracle) orders each group, ``LearnerWorker`` (DeepSpeed
ZeRO-2, gloo) takes the GRPO_rank step, and the new weights go back to the rollout worker
(``export_weights`` -> ``update_weights``, no object store). Stages, timed separately:

* ``decode``: every video of the batch decoded (decord) into a fresh frame store of the rollout
  worker (and of the learner with ``learner.reencode_videos=true``; by default the learner takes
  the rollout's encoder output and decodes nothing), as on a data set too large for the stores to hold (with the tiny
  default's 400 videos they hold every one after a few steps: subtract this stage for that case);
* ``sample``: ``RolloutWorker.rollout`` (frozen encoder, projector, ``generate``);
* ``rank``: ``RankerWorker.rank_groups``;
* ``learn``: ``LearnerWorker.train_step`` (forward, reference forward, backward, optimizer step);
* ``sync``: ``export_weights`` + ``update_weights``.

Both workers run on ``--threads`` torch threads (1 by default; ``0`` keeps the config's 2). On a
machine shared with other work, a 2-thread torch process stalls at every parallel region whenever
one of its threads is descheduled: here whole phases of steps ran 20-30x slower (this process's
CPU time equal to the wall time: one thread spinning while the other waited for a core), at the
same load average as phases at full speed. One thread does not stall that way: its step times
follow the load smoothly.

After one untimed warm-up step, one step runs under cProfile (the functions of ``rlaif_ray``
by cumulative time, and the ``--top`` functions by their own time), then ``--reps`` unprofiled
steps give the stage times (median; also the fastest step, this process's CPU seconds and the
machine's load average: on a shared machine other work slows some steps). Then the side by side:
the earlier path (``learner.shared_prefix=false learner.reencode_videos=true``: every answer its
own prompt + answer sequence, every video decoded and encoded again at the learner) and the
default, in turn for ``--compare-rounds`` rounds, fresh workers each time, with the fraction of
LM token positions the shared prefix removes from the batch beside it. Sampling is the same in
both arms (each prompt prefilled once; that has no switch). Then the sweeps: one
setting changed at a time from the default (``rl.group_size``, ``rl.prompts_per_step``,
``model.num_frames``), every point (the default value's too) with fresh workers, one warm-up step
and ``--reps`` timed steps. The SFT checkpoint was trained with 8 frames and loads only with 8,
so the frames sweep starts from the base tiny model (a fresh LoRA) at every point, 8 included. Prints tables and writes ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import print_table, token_fraction_removed, write_result  # noqa: E402
from rlaif_ray.checkpoint import finished_checkpoint  # noqa: E402
from rlaif_ray.config import Config, load_config, with_absolute_paths  # noqa: E402
from rlaif_ray.data.dataset import VideoQAExample, load_jsonl  # noqa: E402
from rlaif_ray.data.frames import FrameStore  # noqa: E402
from rlaif_ray.data.synthetic import ensure_data  # noqa: E402
from rlaif_ray.learner.worker import LearnerWorker  # noqa: E402
from rlaif_ray.logs import setup_logging  # noqa: E402
from rlaif_ray.models.tiny import ensure_model  # noqa: E402
from rlaif_ray.ranker.worker import RankerWorker  # noqa: E402
from rlaif_ray.rollout.worker import RolloutWorker  # noqa: E402

STAGES = ("decode", "sample", "rank", "learn", "sync")
# The side by side: the learner before the shared prefix and the rollout's features (every answer
# its own full sequence; every video decoded and encoded again at the learner), and the default.
COMPARE = {
    "earlier": ["learner.shared_prefix=false", "learner.reencode_videos=true"],
    "default": [],
}


@dataclass
class Workers:
    """The three plain workers of one setting, in this process."""

    cfg: Config
    rollout: RolloutWorker
    ranker: RankerWorker
    learner: LearnerWorker


def build_workers(cfg: Config, policy_dir: str) -> Workers:
    """Learner first (it joins the process group), then the rollout and ranker workers."""
    learner = LearnerWorker(cfg, policy_dir)
    learner.setup()
    return Workers(cfg, RolloutWorker(cfg, policy_dir), RankerWorker(cfg.ranker, cfg.rl.group_size), learner)


def fresh_store(store: FrameStore) -> FrameStore:
    """An empty frame store with ``store``'s settings."""
    return FrameStore(store.num_frames, store.size, store.capacity, store.max_pixels)


def step(w: Workers, examples: list[VideoQAExample], number: int) -> dict[str, float]:
    """One synchronous RL step on ``examples``: seconds per stage and in all, this process's CPU
    seconds (all threads) and the machine's 1-minute load average when it started."""
    times: dict[str, float] = {"load_avg": os.getloadavg()[0]}
    cpu = time.process_time()
    t = time.perf_counter()
    # Empty frame stores: every video of the batch is decoded in this step, by the rollout worker
    # and, when it encodes the videos itself (learner.reencode_videos), by the learner.
    w.rollout.store, w.learner.store = fresh_store(w.rollout.store), fresh_store(w.learner.store)
    for ex in examples:
        w.rollout.store.for_example(ex.video)
        if w.cfg.learner.reencode_videos:
            w.learner.store.for_example(ex.video)
    times["decode"] = time.perf_counter() - t
    t = time.perf_counter()
    groups = w.rollout.rollout(examples, number)
    times["sample"] = time.perf_counter() - t
    t = time.perf_counter()
    groups = w.ranker.rank_groups(groups)
    times["rank"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = w.learner.train_step(groups)
    times["learn"] = time.perf_counter() - t
    t = time.perf_counter()
    w.rollout.update_weights(w.learner.version, w.learner.export_weights())
    times["sync"] = time.perf_counter() - t
    times["step"] = sum(times[s] for s in STAGES)
    times["cpu"] = time.process_time() - cpu
    times["answers"] = float(sum(g.size for g in groups))
    times["answer_tokens"] = float(sum(len(ids) for g in groups for ids in g.completion_ids))
    times["rows_learned"] = stats.get("rows", 0.0)  # answers of groups not all tied
    times["prefix_removed"] = token_fraction_removed(w.learner, [g for g in groups if g.ranks is not None])
    if stats.get("skipped_step"):
        raise RuntimeError(f"the learner skipped step {number}: {stats}")
    return times


def timed_steps(
    w: Workers, train: list[VideoQAExample], rng: random.Random, reps: int, first: int
) -> list[dict[str, float]]:
    """``reps`` steps on fresh random prompts (numbered from ``first``)."""
    return [step(w, rng.sample(train, w.cfg.rl.prompts_per_step), first + i) for i in range(reps)]


def medians(steps: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over ``steps``; ``step_min``: the fastest step (the least disturbed on a
    shared machine)."""
    out = {key: statistics.median(s[key] for s in steps) for key in steps[0]}
    out["step_min"] = min(s["step"] for s in steps)
    return out


def short_name(func: tuple[str, int, str]) -> str:
    """``path:line(function)`` with the repository or site-packages prefix cut off."""
    path, line, name = func
    if path == "~":  # a C function: pstats writes "~" for its file
        return name
    for marker in ("site-packages/", f"{REPO}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{line}({name})"


def profile_tables(profiler: cProfile.Profile, step_s: float, top: int) -> dict[str, list[dict[str, Any]]]:
    """The profiled step's rlaif_ray functions by cumulative time (>= 1 % of the step) and the
    ``top`` functions of any origin by their own time."""
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = [
        {"function": short_name(func), "calls": nc, "self_s": tt, "cum_s": ct}
        for func, (_, nc, tt, ct, _) in stats.items()
    ]
    ours = [r for r in rows if r["function"].startswith("rlaif_ray/") and r["cum_s"] >= 0.01 * step_s]
    return {
        "rlaif_ray_by_cumulative": sorted(ours, key=lambda r: -r["cum_s"]),
        "top_by_self": sorted(rows, key=lambda r: -r["self_s"])[:top],
    }


def profile_step(w: Workers, examples: list[VideoQAExample], number: int, top: int) -> dict[str, Any]:
    """One step under cProfile: its stage times (inflated by the profiler) and the two tables."""
    profiler = cProfile.Profile()
    profiler.enable()
    times = step(w, examples, number)
    profiler.disable()
    return {"stage_s": times, **profile_tables(profiler, times["step"], top)}


def policy_folder(cfg: Config, config_path: str, overrides: list[str]) -> str:
    """The SFT warm start (trained now by ``python -m rlaif_ray.sft`` when missing), else the base model."""
    model_dir = ensure_model(cfg)
    if not cfg.sft.enabled:
        return str(model_dir)
    if not finished_checkpoint(cfg.sft.output_dir):
        print(f"SFT warm start -> {cfg.sft.output_dir}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "rlaif_ray.sft", "--config", config_path, *overrides], check=True
        )
    return cfg.sft.output_dir


def sweep_point(
    args: argparse.Namespace, overrides: list[str], policy_dir: str | None, seed_offset: int
) -> dict[str, Any]:
    """Fresh workers for the config with ``overrides``, one warm-up and ``--reps`` timed steps."""
    cfg = with_absolute_paths(load_config(args.config, [*args.overrides, *overrides]))
    folder = policy_dir or str(ensure_model(cfg))
    w = build_workers(cfg, folder)
    train = load_jsonl(cfg.data.train, on_error=cfg.data.on_bad_line)
    rng = random.Random(cfg.seed + seed_offset)
    timed_steps(w, train, rng, 1, 1)
    steps = timed_steps(w, train, rng, args.reps, 2)
    del w
    gc.collect()
    point = medians(steps)
    return {
        "overrides": overrides,
        "policy_dir": folder,
        "median": point,
        "steps": steps,
        "answers_per_s": point["answers"] / point["step"],
    }


def print_stage_table(title: str, point: dict[str, float]) -> None:
    """Seconds and share of each stage of one point (medians)."""
    print(f"\n{title}")
    rows = [[s, point[s], f"{100 * point[s] / point['step']:.1f}%"] for s in STAGES]
    print_table(["stage", "seconds", "share"], [*rows, ["step", point["step"], "100%"]])
    print(
        f"(fastest step {point['step_min']:.2f} s; CPU {point['cpu']:.2f} s; load average {point['load_avg']:.1f})"
    )


def print_profile(profile: dict[str, Any]) -> None:
    """The two cProfile tables of the profiled step."""
    step_s = profile["stage_s"]["step"]
    print(
        f"\ncProfile of one step ({step_s:.2f} s under the profiler): rlaif_ray functions by cumulative time"
    )
    print_table(
        ["function", "calls", "cum s", "share"],
        [
            [r["function"], r["calls"], r["cum_s"], f"{100 * r['cum_s'] / step_s:.1f}%"]
            for r in profile["rlaif_ray_by_cumulative"]
        ],
    )
    print("\nfunctions by own time")
    print_table(
        ["function", "calls", "self s", "share"],
        [
            [r["function"], r["calls"], r["self_s"], f"{100 * r['self_s'] / step_s:.1f}%"]
            for r in profile["top_by_self"]
        ],
    )


def print_sweeps(sweeps: dict[str, list[dict[str, Any]]]) -> None:
    """One row per sweep point: stage medians, step time, CPU, answers learned, load."""
    print("\nstep time (median seconds) as one setting changes; decode: cold frame stores")
    print(
        "(step min: the fastest step; cpu: this process's CPU seconds per step; learned: answers the "
        "learner trained on, all-tied groups skipped; load: 1-min load average)"
    )
    rows = []
    for key, points in sweeps.items():
        for p in points:
            m = p["median"]
            rows.append(
                [
                    key,
                    p["value"],
                    *(m[s] for s in STAGES),
                    m["step"],
                    m["step_min"],
                    m["step"] - m["decode"],
                    m["cpu"],
                    int(m["rows_learned"]),
                    f"{p['answers_per_s']:.1f}",
                    f"{m['load_avg']:.1f}",
                ]
            )
    print_table(
        [
            "setting",
            "value",
            *STAGES,
            "step",
            "step min",
            "step w/o decode",
            "cpu",
            "learned",
            "answers/s",
            "load",
        ],
        rows,
    )


def compare(args: argparse.Namespace, policy_dir: str) -> dict[str, Any]:
    """The :data:`COMPARE` arms in turn, ``--compare-rounds`` times, each round fresh workers (one
    warm-up, ``--reps`` timed steps): per arm the medians over every timed step, and the default's
    speed-up over the earlier path per stage."""
    steps: dict[str, list[dict[str, float]]] = {name: [] for name in COMPARE}
    for r in range(args.compare_rounds):
        for name, overrides in COMPARE.items():
            print(f"== compare round {r + 1}/{args.compare_rounds}: {name}", flush=True)
            steps[name] += sweep_point(args, overrides, policy_dir, seed_offset=200 + r)["steps"]
    arms = {name: {"overrides": COMPARE[name], "median": medians(s), "steps": s} for name, s in steps.items()}
    before, after = arms["earlier"]["median"], arms["default"]["median"]
    speedup = {key: before[key] / after[key] for key in (*STAGES, "step") if after[key] > 0}
    speedup["step_without_decode"] = (before["step"] - before["decode"]) / (after["step"] - after["decode"])
    return {"rounds": args.compare_rounds, "arms": arms, "speedup": speedup}


def print_compare(side: dict[str, Any]) -> None:
    """Stage medians of both arms and the default's speed-up over the earlier path."""
    before, after = side["arms"]["earlier"]["median"], side["arms"]["default"]["median"]
    print(
        f"\nside by side ({side['rounds']} rounds in turn): the earlier path (learner.shared_prefix=false, "
        "learner.reencode_videos=true) against the default"
    )
    rows = [[key, before[key], after[key], f"{side['speedup'][key]:.2f}x"] for key in (*STAGES, "step")]
    rows.append(
        [
            "step w/o decode",
            before["step"] - before["decode"],
            after["step"] - after["decode"],
            f"{side['speedup']['step_without_decode']:.2f}x",
        ]
    )
    print_table(["stage", "earlier (s)", "default (s)", "speed-up"], rows)
    print(f"LM token positions the shared prefix removes from each pass: {after['prefix_removed']:.1%}")


def main() -> None:
    """Parse the options, profile and time the default step, run the sweeps, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[2, 5, 8], help="rl.group_size points")
    parser.add_argument(
        "--prompts", type=int, nargs="+", default=[16, 32, 64], help="rl.prompts_per_step points"
    )
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16], help="model.num_frames points")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per point (after one warm-up)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the rollout and learner workers (rollout/learner.num_threads); 0: the config's",
    )
    parser.add_argument(
        "--compare-rounds",
        type=int,
        default=2,
        help="rounds of the side by side (the earlier path and the default in turn); 0: none",
    )
    parser.add_argument("--top", type=int, default=15, help="functions listed by their own time")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 8 prompts, one timed step, 2 points per sweep"
    )
    parser.add_argument("--name", help="bench/results/<name>.json (profile_step, or profile_step_quick)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every point")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.group_sizes, args.prompts, args.frames = 1, [2, 5], [4, 8], [4, 8]
        args.compare_rounds = min(args.compare_rounds, 1)
        args.overrides = ["rl.prompts_per_step=8", *args.overrides]
    if args.reps < 1 or args.threads < 0 or args.compare_rounds < 0:
        parser.error("--reps must be at least 1, --threads and --compare-rounds at least 0")
    if args.threads:
        args.overrides = [
            f"rollout.num_threads={args.threads}",
            f"learner.num_threads={args.threads}",
            *args.overrides,
        ]
    args.name = args.name or ("profile_step_quick" if args.quick else "profile_step")
    cfg = with_absolute_paths(load_config(args.config, args.overrides))
    setup_logging(cfg.log_level)
    ensure_data(cfg)
    policy_dir = policy_folder(cfg, args.config, args.overrides)
    started = time.time()
    result: dict[str, Any] = {
        "config": args.config,
        "overrides": args.overrides,
        "quick": args.quick,
        "reps": args.reps,
        "policy_dir": policy_dir,
        "setting": {
            "prompts_per_step": cfg.rl.prompts_per_step,
            "group_size": cfg.rl.group_size,
            "num_frames": cfg.model.num_frames,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "engine": cfg.rollout.engine,
            "ranker": cfg.ranker.backend,
            "zero_stage": cfg.learner.zero_stage,
            "rollout_threads": cfg.rollout.num_threads,
            "learner_threads": cfg.learner.num_threads,
        },
        "complete": False,
    }

    # The default step: profiled once, then timed.
    w = build_workers(cfg, policy_dir)
    result["torch_threads"] = torch.get_num_threads()
    train = load_jsonl(cfg.data.train, on_error=cfg.data.on_bad_line)
    rng = random.Random(cfg.seed)
    timed_steps(w, train, rng, 1, 1)
    result["profile"] = profile_step(w, rng.sample(train, cfg.rl.prompts_per_step), 2, args.top)
    steps = timed_steps(w, train, rng, args.reps, 3)
    result["default"] = {"median": medians(steps), "steps": steps}
    del w
    gc.collect()
    write_result(args.name, result)
    print_stage_table("stages of the default step (median)", result["default"]["median"])
    print_profile(result["profile"])

    if args.compare_rounds:
        result["compare"] = compare(args, policy_dir)
        write_result(args.name, result)
        print_compare(result["compare"])

    sweeps: dict[str, list[dict[str, Any]]] = {
        "rl.group_size": [],
        "rl.prompts_per_step": [],
        "model.num_frames": [],
    }
    plan = [
        ("rl.group_size", args.group_sizes, policy_dir),
        ("rl.prompts_per_step", args.prompts, policy_dir),
        ("model.num_frames", args.frames, None),  # from the base model at every point
    ]
    # Every point measured in its sweep (the default's too): a sweep's points lie close in time.
    for key, values, folder in plan:
        for i, value in enumerate(values):
            print(f"== {key}={value}", flush=True)
            point = sweep_point(args, [f"{key}={value}"], folder, seed_offset=100 + i)
            sweeps[key].append({"value": value, **point})
            result["sweeps"] = sweeps
            result["total_wall_s"] = time.time() - started
            write_result(args.name, result)
    result["complete"] = True
    result["total_wall_s"] = time.time() - started
    path = write_result(args.name, result)
    print_stage_table("stages of the default step (median)", result["default"]["median"])
    print_profile(result["profile"])
    if args.compare_rounds:
        print_compare(result["compare"])
    print_sweeps(sweeps)
    print(f"total {result['total_wall_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
