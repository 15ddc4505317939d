"""How ranking throughput scales with ranker actors against a slow judge (a served model over HTTP).

    python bench/ranker_scaling.py [key=value ...] [--actors 1 2 4 8] [--groups 64] [--trials 3]
        [--delay-s 0.2] [--judge-max-inflight 32] [--concurrency 4] [--parts 4] [--quick] [--name NAME]

A local OpenAI-compatible judge (``bench/delayed_judge.py``) answers every chat completion after
``--delay-s`` with a valid ordering, at most ``--judge-max-inflight`` requests at once (more
wait), so it can answer at most ``judge_max_inflight / delay_s`` groups per second (160 by
default). For each pool size N (``ranker.min_actors = ranker.max_actors = N``, backend ``openai``,
``ranker.openai_max_concurrency = --concurrency`` requests per actor) the pool ranks ``--groups``
groups of ``rl.group_size`` answers, ``--trials`` times, along two paths:

* ``blocking``: one ``RankerPool.rank(groups)`` call;
* ``streaming``: the groups submitted in ``--parts`` parts one after another, as rollout actors
  deliver them (``submit``), finished chunks collected as they come (``in_flight`` / ``collect``),
  the way ``rlaif_ray.launch.Trainer`` drives the pool.

Reports groups per second, parallel efficiency against one actor on the same path, the fraction
of the judge's limit reached, and what the judge saw: the time-weighted mean and the most
requests in service at once (the in-flight depth the pool kept up). Each pool is warmed up
(actors started, then two full waves of requests: every slot's connection and thread made) before it is
timed. Prints a table and writes
``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from bench.common import print_table, write_result  # noqa: E402
from bench.delayed_judge import start_delayed_judge  # noqa: E402
from rlaif_ray.config import Config, load_config  # noqa: E402
from rlaif_ray.groups import Group  # noqa: E402
from rlaif_ray.ranker.pool import RankerPool  # noqa: E402

QUESTIONS = [
    ("what colour is the triangle ?", ["red", "blue", "green", "yellow", "red triangle", ""]),
    ("what shape is moving ?", ["circle", "square", "triangle", "a circle", "star", ""]),
    ("which direction does the circle move ?", ["left", "right", "up", "down", "to the left", ""]),
]


def make_groups(n: int, group_size: int, prefix: str, rng: random.Random) -> list[Group]:
    """``n`` groups of ``group_size`` short answers with references (distinct ids)."""
    groups = []
    for i in range(n):
        question, answers = QUESTIONS[i % len(QUESTIONS)]
        completions = [rng.choice(answers) for _ in range(group_size)]
        groups.append(
            Group(
                group_id=f"{prefix}:{i}",
                example_id=f"ex{i}",
                video="unused.mp4",
                question=question,
                reference=answers[0],
                completions=completions,
                completion_ids=[[1]] * group_size,
                logprobs=[[-1.0]] * group_size,
                weight_version=0,
            )
        )
    return groups


def rank_streaming(pool: RankerPool, groups: list[Group], parts: int) -> list[Group]:
    """Submit ``groups`` in ``parts`` parts, collecting finished chunks between submissions, then
    collect the rest as each chunk finishes (the driver's loop in ``rlaif_ray.launch``)."""
    size = math.ceil(len(groups) / parts)
    ranked: list[Group] = []
    for start in range(0, len(groups), size):
        pool.submit(groups[start : start + size])
        done, _ = ray.wait(pool.in_flight(), num_returns=len(pool.in_flight()), timeout=0)
        for ref in done:
            ranked.extend(pool.collect(ref))
    while len(ranked) < len(groups):
        done, _ = ray.wait(pool.in_flight(), num_returns=1)
        ranked.extend(pool.collect(done[0]))
    return ranked


def stop_pool(pool: RankerPool, timeout_s: float = 60.0) -> None:
    """Kill the pool's actors and wait until their names are free for the next pool."""
    names = list(pool.actors)
    for name in names:
        ray.kill(pool.actors.pop(name))
    deadline = time.time() + timeout_s
    while set(names) & set(ray.util.list_named_actors()):
        if time.time() > deadline:
            raise RuntimeError(f"ranker actors {names} still registered {timeout_s:.0f}s after ray.kill")
        time.sleep(0.1)


def trial(pool: RankerPool, judge: Any, groups: list[Group], path: str, parts: int) -> dict[str, Any]:
    judge.reset_stats()
    start = time.perf_counter()
    ranked = pool.rank(groups) if path == "blocking" else rank_streaming(pool, groups, parts)
    wall = time.perf_counter() - start
    seen = judge.stats()
    statuses = [g.rank_status for g in ranked]
    if len(ranked) != len(groups) or statuses.count("ok") != len(groups):
        raise RuntimeError(f"{path}: {len(ranked)} of {len(groups)} groups back, statuses {set(statuses)}")
    return {
        "wall_s": wall,
        "groups_per_s": len(groups) / wall,
        "judge_requests": seen["answered"],
        "judge_mean_in_service": seen["mean_in_service"],
        "judge_max_in_service": seen["max_in_service"],
        "judge_max_waiting": seen["max_waiting"],
    }


def summarise(trials: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [t["groups_per_s"] for t in trials]
    return {
        "groups_per_s": statistics.mean(rates),
        "groups_per_s_sd": statistics.stdev(rates) if len(rates) > 1 else 0.0,
        "judge_mean_in_service": statistics.mean(t["judge_mean_in_service"] for t in trials),
        "judge_max_in_service": max(t["judge_max_in_service"] for t in trials),
        "trials": trials,
    }


def pool_config(args: argparse.Namespace, actors: int, base_url: str) -> Config:
    return load_config(
        args.config,
        [
            *args.overrides,
            "ranker.backend=openai",
            "ranker.openai_frames=0",  # the delayed judge reads text only
            f"ranker.openai_base_url={base_url}",
            "ranker.openai_api_key_env=RLAIF_RAY_BENCH_JUDGE_KEY",  # unset: the key "EMPTY"
            f"ranker.openai_max_concurrency={args.concurrency}",
            f"ranker.min_actors={actors}",
            f"ranker.max_actors={actors}",
            f"rl.group_size={args.group_size}",
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--groups", type=int, default=64, help="groups ranked per trial")
    parser.add_argument("--group-size", type=int, default=5)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--delay-s", type=float, default=0.2, help="the judge's delay per request")
    parser.add_argument("--judge-max-inflight", type=int, default=32)
    parser.add_argument(
        "--concurrency", type=int, default=4, help="ranker.openai_max_concurrency (requests per actor)"
    )
    parser.add_argument("--parts", type=int, default=4, help="submissions per trial on the streaming path")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (1-2 actors, 1 trial)")
    parser.add_argument(
        "--name", help="result file bench/results/<name>.json (ranker_scaling, or ranker_scaling_quick)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for the pool")
    args = parser.parse_args()
    if args.quick:
        args.actors, args.groups, args.trials, args.parts = [1, 2], 16, 1, 2
    args.name = args.name or ("ranker_scaling_quick" if args.quick else "ranker_scaling")

    judge = start_delayed_judge(args.delay_s, args.judge_max_inflight)
    limit = judge.limit_per_s
    print(
        f"judge: {args.delay_s * 1000:.0f} ms per request, at most {args.judge_max_inflight} in flight "
        f"-> at most {limit:.0f} groups/s; ranker.openai_max_concurrency={args.concurrency} per actor "
        f"({max(args.actors) * args.concurrency} requests at most with {max(args.actors)} actors); "
        f"{args.groups} groups of {args.group_size} per trial, {args.trials} trials, "
        f"streaming in {args.parts} parts",
        flush=True,
    )
    cfg = pool_config(args, max(args.actors), judge.base_url)
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        needed = max(args.actors) * cfg.ranker.num_cpus_per_actor + 1
        resources = {cfg.ranker.resource: float(max(args.actors))} if cfg.ranker.resource else {}
        ray.init(
            num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), resources=resources, include_dashboard=False
        )
    rng = random.Random(0)
    paths = ("blocking", "streaming")
    results: dict[str, dict[str, Any]] = {path: {} for path in paths}
    try:
        for actors in args.actors:
            pool = RankerPool(pool_config(args, actors, judge.base_url))
            # Warm up: every actor started, then a full wave of requests twice (every request slot's
            # connection and thread made, the first trial pays no set-up).
            for wave in range(2):
                pool.rank(
                    make_groups(actors * args.concurrency, args.group_size, f"warmup{actors}.{wave}", rng)
                )
            runs: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
            for t in range(args.trials):
                for path in paths:  # interleaved, so that drift of the machine hits both alike
                    groups = make_groups(args.groups, args.group_size, f"n{actors}t{t}{path}", rng)
                    runs[path].append(trial(pool, judge, groups, path, args.parts))
            stats = pool.stats()
            if stats["actors"] != actors or stats["scale_ups"] or stats["restarts"]:
                print(f"warning: the pool changed size during the trials: {stats}", flush=True)
            stop_pool(pool)
            for path in paths:
                results[path][str(actors)] = summarise(runs[path])
                r = results[path][str(actors)]
                print(
                    f"  {path:9s} {actors} actor(s): {r['groups_per_s']:.1f} groups/s, "
                    f"judge kept {r['judge_mean_in_service']:.1f} in service on average",
                    flush=True,
                )
    finally:
        ray.shutdown()
        judge.stop()

    rows = []
    for path in paths:
        base = results[path].get(str(min(args.actors)))
        for actors in args.actors:
            r = results[path][str(actors)]
            r["efficiency"] = (
                r["groups_per_s"] * min(args.actors) / (actors * base["groups_per_s"]) if base else None
            )
            r["fraction_of_judge_limit"] = r["groups_per_s"] / limit
            rows.append(
                [
                    path,
                    actors,
                    f"{r['groups_per_s']:.1f}",
                    f"{r['groups_per_s_sd']:.1f}",
                    f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-",
                    f"{r['fraction_of_judge_limit']:.2f}",
                    f"{r['judge_mean_in_service']:.1f}",
                    r["judge_max_in_service"],
                ]
            )
    print()
    print(
        f"openai_max_concurrency={args.concurrency} per actor; judge limit {limit:.0f} groups/s "
        f"({args.judge_max_inflight} in flight x {args.delay_s:g} s); efficiency vs "
        f"{min(args.actors)} actor(s) on the same path"
    )
    print_table(
        [
            "path",
            "actors",
            "groups/s",
            "sd",
            "efficiency",
            "frac_judge_limit",
            "judge_mean_inflight",
            "judge_max_inflight",
        ],
        rows,
    )
    path = write_result(
        args.name,
        {
            "config": args.config,
            "overrides": args.overrides,
            "quick": args.quick,
            "judge": {
                "delay_s": args.delay_s,
                "max_inflight": args.judge_max_inflight,
                "limit_groups_per_s": limit,
            },
            "openai_max_concurrency": args.concurrency,
            "groups_per_trial": args.groups,
            "group_size": args.group_size,
            "trials": args.trials,
            "streaming_parts": args.parts,
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
