"""Time ``make run`` on a config, twice: first with nothing of it built (its synthetic data, SFT
checkpoint and, for a video-judge config, the judge and the judge's data removed), then again
reusing them. Writes ``bench/results/make_run_<name>.json`` (wall times, the runs' summaries and
the judge's ``judge_state.json``) and prints a table.

    python bench/make_run.py --config configs/rlaif.yaml --name rlaif    # ~15 min here

The environment is installed beforehand (``make install``): the times are the runs' own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_result  # noqa: E402
from rlaif_ray.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/rlaif.yaml")
    parser.add_argument("--name", default="rlaif")
    args = parser.parse_args()
    cfg = load_config(str(ROOT / args.config))
    built = [cfg.data.synthetic_dir, cfg.sft.output_dir]
    if cfg.ranker.backend == "video_judge":
        built += [cfg.ranker.judge_path, cfg.judge.data_dir]
    for path in built:
        if path:
            shutil.rmtree(ROOT / path, ignore_errors=True)
    runs = []
    for attempt in ("first", "second"):
        run_dir = f"runs/make_run_{args.name}_{attempt}"
        shutil.rmtree(ROOT / run_dir, ignore_errors=True)
        command = ["make", "run", f"CONFIG={args.config}", f"ARGS=run_dir={run_dir}"]
        start = time.time()
        subprocess.run(command, cwd=ROOT, check=True)
        summary = json.loads((ROOT / run_dir / "summary.json").read_text())
        keys = (
            "accuracy_before",
            "accuracy_after",
            "test",
            "groups_without_reference",
            "groups",
            "rl_wall_s",
        )
        runs.append(
            {
                "run": attempt,
                "command": " ".join(command),
                "wall_s": time.time() - start,
                "summary": {k: summary.get(k) for k in keys},
            }
        )
    judge_state = None
    if cfg.ranker.backend == "video_judge":
        judge_state = json.loads((ROOT / cfg.ranker.judge_path / "judge_state.json").read_text())
    path = write_result(
        f"make_run_{args.name}", {"config": args.config, "runs": runs, "judge_state": judge_state}
    )
    print_table(
        ["run", "wall s", "val before", "val after", "test after"],
        [
            [
                r["run"],
                r["wall_s"],
                r["summary"]["accuracy_before"],
                r["summary"]["accuracy_after"],
                r["summary"]["test"]["accuracy"],
            ]
            for r in runs
        ],
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
