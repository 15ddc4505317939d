"""How held-out accuracy grows with SFT steps and wall time on this machine.

    python bench/sft_curve.py [--steps 1500] [--eval-every 100] [--seeds 0 1 2] [--name NAME] [key=value ...]

Trains the default config's SFT warm start for ``--steps`` steps once per seed (``seed=S``: the
initialisation of the LoRA adapters and projector, and the order of the batches; the data stays),
into a scratch folder (the default checkpoint is not touched), evaluates on the val split every
``--eval-every`` steps, prints a table (mean ± sd over the seeds of the accuracy and of the
direction questions' accuracy, the hardest type) and writes ``bench/results/<name>.json``
(default ``sft_curve``) with every evaluation of every seed, per question type.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from rlaif_ray.config import load_config  # noqa: E402
from rlaif_ray.data.synthetic import ANSWERS_BY_TYPE  # noqa: E402
from rlaif_ray.sft import run_sft  # noqa: E402


def chance_accuracy() -> float:
    """Expected accuracy of guessing uniformly among each question type's answers."""
    return sum(1 / len(a) for a in ANSWERS_BY_TYPE.values()) / len(ANSWERS_BY_TYPE)


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--name", default="sft_curve", help="result file bench/results/<name>.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    runs = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as scratch:
            cfg = load_config(
                args.config,
                [
                    *args.overrides,
                    f"seed={seed}",
                    f"sft.steps={args.steps}",
                    f"sft.eval_every={args.eval_every}",
                    f"sft.output_dir={scratch}",
                ],
            )
            run_sft(cfg)
            lines = (Path(scratch) / "sft_metrics.jsonl").read_text().splitlines()
        runs[seed] = [
            {"step": r["step"], "wall_s": r["wall_s"], **r["val"]}
            for r in map(json.loads, lines)
            if "val" in r
        ]
    rows = []
    for i, first in enumerate(runs[args.seeds[0]]):
        evals = [runs[seed][i] for seed in args.seeds]
        rows.append(
            [
                first["step"],
                round(statistics.mean(e["wall_s"] for e in evals), 1),
                mean_sd([e["accuracy"] for e in evals]),
                mean_sd([e["per_type"]["direction"] for e in evals]),
            ]
        )
    print_table(["step", "wall_s", "val_accuracy", "val_direction"], rows)
    chance_by_type = {t: 1 / len(a) for t, a in ANSWERS_BY_TYPE.items()}
    path = write_result(
        args.name,
        {
            "config": args.config,
            "overrides": args.overrides,
            "seeds": args.seeds,
            "visual_tokens": cfg.model.visual_tokens,
            "batch_size": cfg.sft.batch_size,
            "lr": cfg.sft.lr,
            "chance_accuracy": chance_accuracy(),
            "chance_by_type": chance_by_type,
            "val_examples": runs[args.seeds[0]][0]["n"],
            "runs": runs,
        },
    )
    print(
        f"chance accuracy {chance_accuracy():.3f} (direction {chance_by_type['direction']:.2f}); wrote {path}"
    )


if __name__ == "__main__":
    main()
