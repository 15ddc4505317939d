"""Does RL from rankings learn? GRPO_rank vs plain GRPO on the default task, same budget and seeds.

    python bench/rl_learning.py [--minutes 10] [--methods grpo_rank] [--name NAME] [key=value ...]

Both runs start from the same SFT checkpoint (trained first if missing), run the whole Ray
pipeline for ``--minutes`` of RL, and are evaluated on the held-out test split before and after.
``grpo_rank`` uses DCG rank advantages from the ground-truth oracle's orderings; ``grpo`` uses
plain GRPO advantages on the same oracle's binary correctness. Prints a table and writes
``bench/results/rl_learning.json`` (``--name`` for other variants, e.g. another learning rate).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from rlaif_ray.config import load_config  # noqa: E402
from rlaif_ray.launch import run  # noqa: E402

METHODS = {"grpo_rank": "dcg", "grpo": "score"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)
    )
    parser.add_argument(
        "--name", default="rl_learning", help="result file bench/results/<name>.json (keep the default's)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {}
    for name in args.methods.split(","):
        cfg = load_config(
            args.config,
            [
                *args.overrides,
                f"algo.advantage={METHODS[name]}",
                "rl.steps=100000",
                "rl.eval_split=test",  # as recorded in bench/results/rl_learning.json
                "rl.final_test=false",
                f"rl.time_limit_s={args.minutes * 60}",
                f"run_dir=runs/{args.name}-{name}",
            ],
        )
        summary = run(cfg)
        results[name] = {
            key: summary[key]
            for key in (
                "accuracy_before",
                "accuracy_after",
                "per_type_before",
                "per_type_after",
                "steps",
                "rl_wall_s",
                "eval_examples",
                "evals",
            )
        }
        results[name]["gain"] = summary["accuracy_after"] - summary["accuracy_before"]
    rows = [
        [name, r["accuracy_before"], r["accuracy_after"], r["gain"], r["steps"], round(r["rl_wall_s"])]
        for name, r in results.items()
    ]
    print_table(["method", "acc_before", "acc_after", "gain", "steps", "rl_wall_s"], rows)
    path = write_result(
        args.name,
        {"config": args.config, "overrides": args.overrides, "minutes": args.minutes, "results": results},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
