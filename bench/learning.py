"""Learning comparisons under one protocol: arms (task x method x seed), val to choose, test to report.

    python bench/learning.py [--tasks default graded] [--methods dcg score] [--seeds 0 1 2]
        [--minutes 10] [--name learning] [--report-only] [key=value ...]

Every arm is one run of the whole Ray pipeline (``rlaif_ray.launch.run``) from the task's SFT
warm start (trained once per task, shared by the seeds: its fingerprint leaves the seed out), for
``--minutes`` of RL wall time (``rl.time_limit_s``; evaluations do not count), evaluated on the val
split every ``rl.eval_every`` steps (``rl.eval_split=val``: choose settings there) and once on
the test split at the end (``rl.final_test``: report that). ``seed=S`` sets the initialisation of
what RL adds and the order of the prompts.

Arms are resumable in parts: each finished arm writes ``bench/results/<name>/<task>-<method>-seed<S>.json``
and is skipped when that file exists, so the comparison can be run a few arms at a time (by
different ``--methods``/``--seeds``) and the report (``--report-only``) made from whatever has
accumulated. The report, ``bench/results/<name>.json``, gives per task and method, as mean ± sd
over the seeds: test exact-match and part accuracy at the end, and the val accuracy at the end and
averaged over the second half of the evaluations (one noisy evaluation moves an end point more).

Tasks: ``default`` (the built-in task: one-word answers) and ``graded`` (``describe`` questions
only, "red circle up", judged part by part: data generated into ``data/graded/``, its own SFT
checkpoint). Methods (the ground-truth oracle's orderings or scores in every case):

* ``dcg``: GRPO_rank, DCG rank advantages;
* ``dcg_std``: the same, standardised per group like GRPO's advantages (the same scale: a
  different step size is then not what makes the difference);
* ``score``: plain GRPO on binary correctness;
* ``score_parts``: plain GRPO on part accuracy (a graded scalar reward).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, print_table, write_result  # noqa: E402
from rlaif_ray.config import load_config  # noqa: E402
from rlaif_ray.launch import run  # noqa: E402

METHODS: dict[str, list[str]] = {
    "dcg": ["algo.advantage=dcg"],
    "dcg_std": ["algo.advantage=dcg_std"],
    "score": ["algo.advantage=score", "ranker.score=binary"],
    "score_parts": ["algo.advantage=score", "ranker.score=parts"],
}
TASKS: dict[str, list[str]] = {
    "default": [],
    "graded": [
        "data.synthetic_dir=data/graded",
        "data.train=data/graded/train.jsonl",
        "data.val=data/graded/val.jsonl",
        "data.test=data/graded/test.jsonl",
        "data.synthetic_question_types=[describe]",
        "sft.output_dir=checkpoints/sft_graded",
    ],
}


def arm_overrides(task: str, method: str, seed: int, minutes: float, name: str) -> list[str]:
    """The config overrides of one arm."""
    return [
        *TASKS[task],
        *METHODS[method],
        f"seed={seed}",
        "rl.steps=100000",
        f"rl.time_limit_s={minutes * 60}",
        "rl.eval_split=val",
        "rl.final_test=true",
        f"run_dir=runs/bench_{name}/{task}-{method}-seed{seed}",
    ]


def second_half_mean(evals: list[dict[str, Any]]) -> float:
    """The mean accuracy of the evaluations in the second half of the run (by step)."""
    last = evals[-1]["step"]
    later = [e["accuracy"] for e in evals if e["step"] > last / 2]
    return statistics.mean(later)


def run_arm(args: argparse.Namespace, task: str, method: str, seed: int, path: Path) -> None:
    cfg = load_config(
        args.config, [*args.overrides, *arm_overrides(task, method, seed, args.minutes, args.name)]
    )
    summary = run(cfg)
    arm = {
        "task": task,
        "method": method,
        "seed": seed,
        "minutes": args.minutes,
        "overrides": [*args.overrides, *arm_overrides(task, method, seed, args.minutes, args.name)],
        "steps": summary["steps"],
        "rl_wall_s": summary["rl_wall_s"],
        "val_before": summary["accuracy_before"],
        "val_after": summary["accuracy_after"],
        "val_second_half": second_half_mean(summary["evals"]),
        "test_accuracy": summary["test"]["accuracy"],
        "test_part_accuracy": summary["test"]["part_accuracy"],
        "test_per_type": summary["test"]["per_type"],
        "test_examples": summary["test"]["n"],
        "evals": summary["evals"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(arm, indent=2) + "\n")
    tmp.replace(path)  # an arm's file exists only once the arm is whole


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def report(name: str) -> dict[str, Any]:
    """Mean ± sd over seeds per (task, method) of every arm file under bench/results/<name>/."""
    arms = [json.loads(p.read_text()) for p in sorted((RESULTS / name).glob("*.json"))]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for arm in arms:
        groups.setdefault((arm["task"], arm["method"]), []).append(arm)
    table = []
    for (task, method), group in sorted(groups.items()):
        table.append(
            {
                "task": task,
                "method": method,
                "seeds": sorted(a["seed"] for a in group),
                "steps": mean_sd([a["steps"] for a in group]),
                **{
                    key: mean_sd([a[key] for a in group])
                    for key in (
                        "test_accuracy",
                        "test_part_accuracy",
                        "val_after",
                        "val_second_half",
                        "val_before",
                    )
                },
            }
        )
    rows = [
        [r["task"], r["method"], len(r["seeds"]), round(r["steps"]["mean"])]
        + [
            f"{r[k]['mean']:.3f} ± {r[k]['sd']:.3f}"
            for k in ("test_accuracy", "test_part_accuracy", "val_after", "val_second_half")
        ]
        for r in table
    ]
    print_table(
        ["task", "method", "seeds", "steps", "test_acc", "test_parts", "val_end", "val_2nd_half"], rows
    )
    return {"arms": len(arms), "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["default", "graded"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=10.0, help="RL wall time per arm")
    parser.add_argument(
        "--name", default="learning", help="arms under bench/results/<name>/, report <name>.json"
    )
    parser.add_argument("--report-only", action="store_true", help="only report the arms already run")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every arm")
    args = parser.parse_args()
    if not args.report_only:
        for task in args.tasks:
            for method in args.methods:
                for seed in args.seeds:
                    path = RESULTS / args.name / f"{task}-{method}-seed{seed}.json"
                    if path.exists():
                        print(f"== {path.name}: done already", flush=True)
                        continue
                    print(f"== arm {task} {method} seed {seed}", flush=True)
                    run_arm(args, task, method, seed, path)
    result = report(args.name)
    path = write_result(args.name, {"config": args.config, "overrides": args.overrides, **result})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
