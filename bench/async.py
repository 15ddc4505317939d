"""Synchronous vs asynchronous RL loop: answers per second, learner wait, lags and accuracy.

    python bench/async.py [key=value ...] [--steps 20] [--staleness 0 1 2]
        [--rankers ground_truth openai] [--seeds 0 1 2] [--judge-seeds 0] [--delay-s 0.2]
        [--judge-max-inflight 32] [--eval-examples 160] [--pin ROLLOUT_CORE LEARNER_CORE]
        [--quick] [--name NAME]

(config overrides for every arm first: the list options would take them as their values)

Runs the whole loop (``rlaif_ray.launch.run``) on the built-in tiny default once per arm: each
ranker in ``--rankers`` x each staleness bound ``rl.max_staleness`` in ``--staleness`` (0 is the
synchronous loop) x each seed, the same ``--steps`` updates in every arm, each arm a separate
``run()`` with its own run folder under ``runs/bench_<name>/``. The rankers:

* ``ground_truth``: the synthetic task's oracle (no I/O: ranking costs next to nothing);
* ``openai``: the ``openai`` backend against a local judge (``bench/delayed_judge.py``) that
  answers each group after ``--delay-s`` (at most ``--judge-max-inflight`` at once). The judge
  reads the reference and the candidates from the prompt and orders them with the ground-truth
  rule, so its orderings match the ``ground_truth`` ranker's; what it adds is latency. This arm
  runs on ``--judge-seeds`` only (default: the first seed): it measures speed.

Per arm: answers per second of the RL loop (answers learned / RL wall time, evaluations
excluded: the sum of ``samples`` in ``metrics.jsonl`` over the summary's ``rl_wall_s``), the
speed-up over the synchronous arm of the same ranker and seed, the same two from step 2 on (the
first step fills the pipeline and may wait for a ranker actor the pool starts then; with few
steps it weighs on the totals), the first step's time, the mean learner wait per step
(``time.wait_s``: the learner idle while a batch is sampled and ranked), the histogram of group
lags, and held-out accuracy (greedy exact match, ``rl.eval_examples`` test questions) before and
after the equal steps; the accuracy comparison is the ``ground_truth`` ranker's, over the seeds.
No evaluation happens during the run (``rl.eval_every`` > steps) and no intermediate checkpoint.
``--pin 0 1`` puts the rollout actor on core 0 and the learner on core 1 (one torch thread each)
in every arm, so that overlapping them does not split the same cores: what stages on nodes of
their own would see.

The SFT warm start (``sft.output_dir``, reused when finished) is made once, before the first arm,
and every arm starts from it. All arms share one local Ray instance (started here, as
``rlaif_ray.launch`` would); between arms the previous arm's named actors are killed.
Prints a table per ranker and writes ``bench/results/<name>.json`` after every arm.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from bench.common import print_table, write_result  # noqa: E402
from bench.delayed_judge import start_delayed_judge  # noqa: E402
from rlaif_ray.config import Config, load_config, with_absolute_paths  # noqa: E402
from rlaif_ray.data.synthetic import ensure_data  # noqa: E402
from rlaif_ray.launch import init_ray, run, warm_start  # noqa: E402
from rlaif_ray.models.tiny import ensure_model  # noqa: E402

RANKERS = ("ground_truth", "openai")


def arm_config(args: argparse.Namespace, ranker: str, staleness: int, seed: int, judge_url: str) -> Config:
    overrides = [
        *args.overrides,
        f"seed={seed}",
        f"rl.steps={args.steps}",
        f"rl.max_staleness={staleness}",
        f"rl.eval_every={args.steps + 1}",  # evaluate before and after only
        f"rl.checkpoint_every={args.steps + 1}",  # no checkpoint inside the timed loop
        f"rl.eval_examples={args.eval_examples}",
        "rl.eval_split=test",  # a speed benchmark with a fixed setting: nothing is chosen on it
        "rl.final_test=false",
        "rl.time_limit_s=0",
        "sft.reuse=true",
        f"run_dir=runs/bench_{args.name}/{ranker}-k{staleness}-seed{seed}",
        f"ranker.backend={ranker}",
    ]
    if args.pin:
        # Every arm, the synchronous one too: the rollout on one core and the learner on another,
        # one torch thread each, as stages on nodes of their own would run.
        rollout_core, learner_core = args.pin
        overrides += [
            f"rollout.cpu_cores=[{rollout_core}]",
            f"learner.cpu_cores=[{learner_core}]",
            "rollout.num_threads=1",
            "learner.num_threads=1",
        ]
    elif staleness > 0 and args.async_threads:
        # Rollout and learning run at the same time here: one machine's cores are shared, not
        # taken in turn as the synchronous arm (the config's thread counts) takes them.
        overrides += [
            f"rollout.num_threads={args.async_threads}",
            f"learner.num_threads={args.async_threads}",
        ]
    if ranker == "openai":
        overrides += [
            f"ranker.openai_base_url={judge_url}",
            "ranker.openai_model=bench-judge",
            "ranker.openai_frames=0",  # the delayed judge reads text only: no frames to encode
            "ranker.openai_api_key_env=RLAIF_RAY_BENCH_JUDGE_KEY",  # unset: the key "EMPTY"
        ]
    return load_config(args.config, overrides)


def clear_named_actors(timeout_s: float = 60.0) -> None:
    """Kill the named actors a finished run left (learner-*, rollout-*, ranker-*) and wait until
    their names are free, so that the next run can take them."""
    gc.collect()
    for name in ray.util.list_named_actors():
        try:
            ray.kill(ray.get_actor(name))
        except ValueError:
            pass  # already gone
    deadline = time.time() + timeout_s
    while left := ray.util.list_named_actors():
        if time.time() > deadline:
            raise RuntimeError(f"actors {left} still registered {timeout_s:.0f}s after ray.kill")
        time.sleep(0.2)


def measure(summary: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The arm's figures from its summary and metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    samples = sum(r["samples"] for r in records)
    lags = Counter(lag for r in records for lag in r["group_lags"])

    def mean_time(key: str) -> float:
        return statistics.mean(r["time"][key] for r in records) if records else 0.0

    # Without the first step, which fills the pipeline and may wait for a ranker actor that the
    # pool adds then (a cold start of seconds): the rate the loop keeps once it runs.
    later = records[1:]
    later_s = sum(r["time"]["step_s"] for r in later)
    return {
        "steps": summary["steps"],
        "samples": samples,
        "rl_wall_s": summary["rl_wall_s"],
        "answers_per_s": samples / summary["rl_wall_s"] if summary["rl_wall_s"] > 0 else 0.0,
        "answers_per_s_from_step_2": sum(r["samples"] for r in later) / later_s if later_s > 0 else None,
        "first_step_s": records[0]["time"]["step_s"] if records else None,
        "wait_s_mean": mean_time("wait_s"),
        "learn_s_mean": mean_time("learn_s"),
        "sync_s_mean": mean_time("sync_s"),
        "step_s_mean": mean_time("step_s"),
        "rank_s_mean": mean_time("rank_s"),
        "lag_hist": {str(k): lags[k] for k in sorted(lags)},
        "accuracy_before": summary["accuracy_before"],
        "accuracy_after": summary["accuracy_after"],
        "eval_examples": summary["eval_examples"],
        "groups": summary["groups"],
        "ranker_stats": summary["ranker"],
        "run_dir": str(run_dir),
    }


def mean_sd(values: list[float]) -> dict[str, float | None]:
    return {
        "mean": statistics.mean(values) if values else None,
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def aggregate(arms: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per ranker and staleness bound: means and spreads over the seeds; speed-up per seed
    against the synchronous arm of the same ranker and seed."""
    by_key = {(a["ranker"], a["max_staleness"], a["seed"]): a for a in arms}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for ranker in dict.fromkeys(a["ranker"] for a in arms):
        out[ranker] = {}
        for k in sorted({a["max_staleness"] for a in arms if a["ranker"] == ranker}):
            group = [a for a in arms if a["ranker"] == ranker and a["max_staleness"] == k]
            speedups = [
                a["answers_per_s"] / sync["answers_per_s"]
                for a in group
                if (sync := by_key.get((ranker, 0, a["seed"]))) and sync["answers_per_s"] > 0
            ]
            lags: Counter[str] = Counter()
            for a in group:
                lags.update(a["lag_hist"])
            later_speedups = [
                a["answers_per_s_from_step_2"] / sync["answers_per_s_from_step_2"]
                for a in group
                if (sync := by_key.get((ranker, 0, a["seed"])))
                and a["answers_per_s_from_step_2"]
                and sync["answers_per_s_from_step_2"]
            ]
            out[ranker][str(k)] = {
                "seeds": [a["seed"] for a in group],
                "answers_per_s": mean_sd([a["answers_per_s"] for a in group]),
                "speedup_vs_sync": mean_sd(speedups),
                "answers_per_s_from_step_2": mean_sd(
                    [a["answers_per_s_from_step_2"] for a in group if a["answers_per_s_from_step_2"]]
                ),
                "speedup_vs_sync_from_step_2": mean_sd(later_speedups),
                "first_step_s": mean_sd([a["first_step_s"] for a in group if a["first_step_s"] is not None]),
                "wait_s_mean": mean_sd([a["wait_s_mean"] for a in group]),
                "learn_s_mean": mean_sd([a["learn_s_mean"] for a in group]),
                "accuracy_before": mean_sd([a["accuracy_before"] for a in group]),
                "accuracy_after": mean_sd([a["accuracy_after"] for a in group]),
                "lag_hist": dict(sorted(lags.items(), key=lambda kv: int(kv[0]))),
                "dropped_stale": sum(a["groups"]["dropped_stale"] for a in group),
            }
    return out


def fmt(stat: dict[str, Any], digits: int = 2) -> str:
    if stat["mean"] is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['sd']:.{digits}f}" if stat["sd"] is not None else "")


def print_tables(summary: dict[str, dict[str, dict[str, Any]]]) -> None:
    for ranker, rows_by_k in summary.items():
        print(f"\nranker {ranker} (mean ± sd over seeds)")
        rows = [
            [
                k,
                len(s["seeds"]),
                fmt(s["answers_per_s"], 1),
                fmt(s["speedup_vs_sync"]),
                fmt(s["answers_per_s_from_step_2"], 1),
                fmt(s["speedup_vs_sync_from_step_2"]),
                fmt(s["first_step_s"], 1),
                fmt(s["wait_s_mean"]),
                fmt(s["learn_s_mean"]),
                " ".join(f"{lag}:{n}" for lag, n in s["lag_hist"].items()),
                s["dropped_stale"],
                fmt(s["accuracy_before"], 3),
                fmt(s["accuracy_after"], 3),
            ]
            for k, s in rows_by_k.items()
        ]
        print_table(
            [
                "max_staleness",
                "seeds",
                "answers/s",
                "speedup",
                "answers/s_step2+",
                "speedup_step2+",
                "step1_s",
                "wait_s/step",
                "learn_s/step",
                "lags (lag:groups)",
                "dropped",
                "acc_before",
                "acc_after",
            ],
            rows,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--steps", type=int, default=20, help="updates per arm (the same in every arm)")
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2], help="rl.max_staleness values")
    parser.add_argument("--rankers", nargs="+", choices=RANKERS, default=list(RANKERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--judge-seeds", type=int, nargs="+", help="seeds of the openai arms (default: the first seed)"
    )
    parser.add_argument("--eval-examples", type=int, default=160, help="rl.eval_examples (0: all)")
    parser.add_argument(
        "--async-threads",
        type=int,
        default=1,
        help="rollout/learner torch threads of the arms with max_staleness > 0 (0: the config's)",
    )
    parser.add_argument(
        "--pin",
        type=int,
        nargs=2,
        metavar=("ROLLOUT_CORE", "LEARNER_CORE"),
        help="every arm: the rollout actor on one core, the learner on another, one thread each "
        "(rollout.cpu_cores / learner.cpu_cores; --async-threads is then unused)",
    )
    parser.add_argument("--delay-s", type=float, default=0.2, help="the judge's delay per group")
    parser.add_argument("--judge-max-inflight", type=int, default=32)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 2 steps of 8 prompts, bounds 0 and 1, one seed"
    )
    parser.add_argument(
        "--name", help="bench/results/<name>.json and runs/bench_<name>/ (async, or async_quick)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every arm")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.staleness, args.seeds, args.eval_examples = 2, [0, 1], [0], 16
        args.overrides = [
            "rl.prompts_per_step=8",
            "sft.steps=10",
            "sft.output_dir=runs/bench_async_quick/sft",
            *args.overrides,
        ]
    args.name = args.name or ("async_quick" if args.quick else "async") + ("_pinned" if args.pin else "")
    judge_seeds = args.judge_seeds if args.judge_seeds is not None else args.seeds[:1]

    plan = [
        (ranker, k, seed)
        for seed in sorted(set(args.seeds) | set(judge_seeds))
        for ranker in args.rankers
        if seed in (judge_seeds if ranker == "openai" else args.seeds)
        for k in args.staleness
    ]
    if not plan:
        parser.error("no arm to run: check --rankers, --staleness, --seeds and --judge-seeds")
    judge = start_delayed_judge(args.delay_s, args.judge_max_inflight)
    first = with_absolute_paths(arm_config(args, *plan[0], judge.base_url))
    rc = first.ranker
    print(
        f"{len(plan)} arms of {args.steps} steps x {first.rl.prompts_per_step} prompts x "
        f"G={first.rl.group_size}; judge: {args.delay_s * 1000:.0f} ms per group, at most "
        f"{args.judge_max_inflight} in flight; ranker pool {rc.min_actors}..{rc.max_actors} actors, "
        f"openai_max_concurrency={rc.openai_max_concurrency}",
        flush=True,
    )
    result: dict[str, Any] = {
        "config": args.config,
        "overrides": args.overrides,
        "quick": args.quick,
        "pin": {"rollout_core": args.pin[0], "learner_core": args.pin[1]} if args.pin else None,
        "steps": args.steps,
        "prompts_per_step": first.rl.prompts_per_step,
        "group_size": first.rl.group_size,
        "staleness": args.staleness,
        "seeds": args.seeds,
        "judge_seeds": judge_seeds,
        "judge": {
            "delay_s": args.delay_s,
            "max_inflight": args.judge_max_inflight,
            "rule": judge.rule,
            "ranker_min_actors": rc.min_actors,
            "ranker_max_actors": rc.max_actors,
            "openai_max_concurrency": rc.openai_max_concurrency,
        },
        "sft": {"output_dir": first.sft.output_dir, "steps": first.sft.steps},
        "arms": [],
        "complete": False,
    }
    started = time.time()
    init_ray(first)
    try:
        ensure_data(first)
        t = time.time()
        result["sft"]["policy_dir"] = warm_start(first, ensure_model(first))
        result["sft"]["wall_s"] = time.time() - t
        for ranker, k, seed in plan:
            clear_named_actors()
            cfg = arm_config(args, ranker, k, seed, judge.base_url)
            print(f"== arm {ranker} max_staleness={k} seed={seed} -> {cfg.run_dir}", flush=True)
            t = time.time()
            summary = run(cfg)
            arm = {"ranker": ranker, "max_staleness": k, "seed": seed, "wall_s": time.time() - t}
            arm.update(measure(summary, Path(cfg.run_dir).absolute()))
            result["arms"].append(arm)
            result["summary"] = aggregate(result["arms"])
            result["total_wall_s"] = time.time() - started
            write_result(args.name, result)
            print(
                f"== {ranker} k={k} seed={seed}: {arm['answers_per_s']:.1f} answers/s, "
                f"wait {arm['wait_s_mean']:.2f} s/step, lags {arm['lag_hist']}, "
                f"accuracy {arm['accuracy_before']:.3f} -> {arm['accuracy_after']:.3f} "
                f"(arm {arm['wall_s']:.0f} s)",
                flush=True,
            )
    finally:
        ray.shutdown()
        judge.stop()
    result["complete"] = True
    result["total_wall_s"] = time.time() - started
    path = write_result(args.name, result)
    print_tables(result["summary"])
    if "openai" in result["summary"]:
        print(
            "\nThe openai arm's judge orders the answers with the ground-truth rule after a delay: it "
            "measures speed. Compare accuracy on the ground_truth arm (more seeds)."
        )
    print(f"total {result['total_wall_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
