"""How held-out accuracy grows with SFT steps and wall time on this machine.

    python bench/sft_curve.py [--steps 1500] [--eval-every 100] [key=value ...]

Trains the default config's SFT warm start for ``--steps`` steps (into a scratch folder, the
default checkpoint is not touched), evaluates on the val split every ``--eval-every`` steps,
prints a table and writes ``bench/results/sft_curve.json``.
"""

from __future__ import annotations

import argparse
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(
            args.config,
            [
                *args.overrides,
                f"sft.steps={args.steps}",
                f"sft.eval_every={args.eval_every}",
                f"sft.output_dir={scratch}",
            ],
        )
        state = run_sft(cfg)
    rows = [[h["step"], round(h["wall_s"], 1), h["val_accuracy"]] for h in state["history"]]
    print_table(["step", "wall_s", "val_accuracy"], rows)
    path = write_result(
        "sft_curve",
        {
            "config": args.config,
            "overrides": args.overrides,
            "batch_size": cfg.sft.batch_size,
            "lr": cfg.sft.lr,
            "chance_accuracy": chance_accuracy(),
            "history": state["history"],
        },
    )
    print(f"chance accuracy {chance_accuracy():.3f}; wrote {path}")


if __name__ == "__main__":
    main()
