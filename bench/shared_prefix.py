"""The learner stage with each group's prompt and video work done once, against today's path.

    python bench/shared_prefix.py [--prompts 64] [--reps 5] [--threads 1] [--name shared_prefix] [key=value ...]

One batch of the default step (``configs/default.yaml``: 64 prompts x G = 5, from the SFT warm
start when it exists, else the base model), sampled by ``RolloutWorker`` and ranked by the ground
truth, then ``LearnerWorker.train_step`` on it in four arms, taken in turn (``--reps`` rounds, so
that the machine's load falls on every arm alike; the median is reported):

* ``full``: every answer its own prompt + answer sequence, the video decoded (into an empty
  frame store) and encoded at the learner (``learner.shared_prefix=false``,
  ``learner.reencode_videos=true``): the path before the shared prefix;
* ``prefix``: the shared prefix, videos re-encoded at the learner;
* ``features``: full sequences, the rollout's encoder output used;
* ``both``: the shared prefix and the rollout's encoder output (the default).

The learner runs at lr 0 so that every arm learns the same batch from the same weights. The limit
beside it: the fraction of LM token positions the shared prefix removes from each pass,
``1 - (P + sum of answer lengths) / (G x P + sum of answer lengths)`` over the batch's groups
(P: a group's prompt length with its visual tokens). Prints a table and writes
``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import print_table, token_fraction_removed, write_result  # noqa: E402
from rlaif_ray.checkpoint import finished_checkpoint  # noqa: E402
from rlaif_ray.config import load_config  # noqa: E402
from rlaif_ray.data.dataset import load_jsonl  # noqa: E402
from rlaif_ray.data.frames import FrameStore  # noqa: E402
from rlaif_ray.data.synthetic import ensure_data  # noqa: E402
from rlaif_ray.learner.worker import LearnerWorker  # noqa: E402
from rlaif_ray.models.tiny import ensure_model  # noqa: E402
from rlaif_ray.ranker.worker import RankerWorker  # noqa: E402
from rlaif_ray.rollout.worker import RolloutWorker  # noqa: E402

ARMS = {  # (learner.shared_prefix, the rollout's encoder output used)
    "full": (False, False),
    "prefix": (True, False),
    "features": (False, True),
    "both": (True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5, help="rounds of the four arms")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: the config's)")
    parser.add_argument("--name", default="shared_prefix")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    threads = [f"rollout.num_threads={args.threads}", f"learner.num_threads={args.threads}"]
    cfg = load_config(
        args.config,
        [f"rl.prompts_per_step={args.prompts}", *(threads if args.threads else []), *args.overrides],
    )
    ensure_data(cfg)
    policy_dir = cfg.sft.output_dir if finished_checkpoint(cfg.sft.output_dir) else str(ensure_model(cfg))
    cfg.learner.lr = 0.0
    learner = LearnerWorker(cfg, policy_dir)
    learner.setup()
    examples = load_jsonl(cfg.data.train)[: args.prompts]
    groups = RolloutWorker(cfg, policy_dir).rollout(examples, step=1)
    groups = RankerWorker(cfg.ranker, cfg.rl.group_size).rank_groups(groups)
    without_features = [dataclasses.replace(g, visual_features=None) for g in groups]
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    rows_learned = {}
    for rep in range(args.reps + 1):  # the first round warms up
        for arm, (shared, sent) in ARMS.items():
            learner.cfg.learner.shared_prefix = shared
            learner.store = FrameStore(
                learner.store.num_frames, learner.store.size, max_pixels=learner.store.max_pixels
            )
            start = time.perf_counter()
            stats = learner.train_step(groups if sent else without_features)
            if rep:
                times[arm].append(time.perf_counter() - start)
            rows_learned[arm] = stats["rows"]
    medians = {arm: statistics.median(t) for arm, t in times.items()}
    removed = token_fraction_removed(learner, [g for g in groups if g.ranks is not None])
    print(
        f"learner stage, {len(groups)} groups of {cfg.rl.group_size} ({rows_learned['both']:.0f} answers "
        f"learned), median of {args.reps}, {torch.get_num_threads()} torch thread(s)"
    )
    print_table(
        ["arm", "shared prefix", "rollout features", "learn_s", "speed-up vs full"],
        [[arm, *ARMS[arm], medians[arm], f"{medians['full'] / medians[arm]:.2f}x"] for arm in ARMS],
    )
    print(f"LM token positions the shared prefix removes from each pass: {removed:.1%}")
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "policy_dir": policy_dir,
        "groups": len(groups),
        "rows_learned": rows_learned,
        "learn_s": times,
        "median_s": medians,
        "speedup_vs_full": {arm: medians["full"] / medians[arm] for arm in ARMS},
        "token_fraction_removed": removed,
    }
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
