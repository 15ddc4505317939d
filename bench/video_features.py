"""The learner's video work: send the rollout's frozen-encoder output with each group, or decode
and encode every video again at the learner (``learner.reencode_videos``)?

    python bench/video_features.py [--prompts 64] [--reps 5] [--name video_features]

Both measured on this machine, per step of ``--prompts`` groups, one torch thread:

* ``reencode``: what a learner does per step when the groups bring no features: decode every
  video (decord, into an empty frame store) and run the frozen encoder and pooling on it.
* ``send``: the features' extra cost on their way to the learner: the groups go through Ray's
  object store to another process (``ray.put`` here, ``ray.get`` in a Ray task, as a driver hands a
  batch to a learner actor) with and without their features, taken in turn; the median of the
  differences is what sending costs. Measured at the default task's size and at the paper's (VLM-RLAIF: 50 frames x 576
  patches of a CLIP ViT-L/14-336 pooled to 50 + 576 = 626 tokens of width 1024, in bf16).

At the paper's size the re-encoding side is an estimate, not a measurement: decoding 50 frames
of a 336 px video is measured here (a synthetic clip written at that size), and the encoder's
forward is counted in FLOPs (2 x 304 M parameters x 577 tokens x 50 frames) at an assumed 40%
of an H100's dense bf16 peak. Prints a table and writes ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from bench.common import print_table, write_result  # noqa: E402
from rlaif_ray.config import load_config  # noqa: E402
from rlaif_ray.data.dataset import load_jsonl  # noqa: E402
from rlaif_ray.data.frames import FrameStore  # noqa: E402
from rlaif_ray.data.synthetic import (  # noqa: E402
    Scene,
    ensure_data,  # noqa: E402
    render,
)
from rlaif_ray.data.video import load_frames, write_video  # noqa: E402
from rlaif_ray.groups import Group  # noqa: E402
from rlaif_ray.models.policy import VideoLMPolicy  # noqa: E402
from rlaif_ray.models.tiny import ensure_model  # noqa: E402

PAPER_TOKENS, PAPER_WIDTH, PAPER_FRAMES, PAPER_SIZE = 626, 1024, 50, 336
VIT_L_PARAMS, VIT_L_TOKENS = 304e6, 577  # CLIP ViT-L/14 at 336 px: 24 x 24 patches + CLS
H100_BF16_DENSE_FLOPS, ASSUMED_UTILISATION = 989e12, 0.4


def median_s(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def groups_with(features: list[torch.Tensor | None]) -> list[Group]:
    """Groups of 5 one-token answers carrying ``features`` (the rest as small as a real group's)."""
    return [
        Group(
            group_id=f"g{i}",
            example_id=f"e{i}",
            video=f"videos/{i:05d}.mp4",
            question="what colour is the circle ?",
            reference="red",
            completions=["red"] * 5,
            completion_ids=[[7, 2]] * 5,
            logprobs=[[-0.5, -0.1]] * 5,
            weight_version=0,
            visual_features=f,
        )
        for i, f in enumerate(features)
    ]


@ray.remote(num_cpus=1)
def receive(groups: list[Group]) -> int:
    """What a learner actor does first with a batch: have it (deserialised) in its process."""
    return sum(0 if g.visual_features is None else g.visual_features.numel() for g in groups)


def send_s(features: list[torch.Tensor], reps: int) -> dict[str, float]:
    """Seconds to hand a batch of groups to another process with and without ``features``: the
    two taken in turn, ``reps`` times (so that the machine's load falls on both alike), medians."""

    def hand_over(batch: list[Group]) -> float:
        start = time.perf_counter()
        ray.get(receive.remote(ray.put(batch)))
        return time.perf_counter() - start

    with_features, without = groups_with(features), groups_with([None] * len(features))
    hand_over(with_features)  # warm the worker
    pairs = [(hand_over(with_features), hand_over(without)) for _ in range(reps)]
    return {
        "with_s": statistics.median(w for w, _ in pairs),
        "without_s": statistics.median(w for _, w in pairs),
        "extra_s": statistics.median(w - wo for w, wo in pairs),
        "megabytes": sum(f.numel() * f.element_size() for f in features) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--prompts", type=int, default=64, help="groups per step")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--name", default="video_features")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    ensure_data(cfg)
    policy = VideoLMPolicy.from_folder(ensure_model(cfg), cfg.model).eval()
    videos = list(dict.fromkeys(ex.video for ex in load_jsonl(cfg.data.train) if ex.video))[: args.prompts]

    def reencode() -> torch.Tensor:
        store = FrameStore(cfg.model.num_frames, policy.image_size, max_pixels=cfg.data.max_video_pixels)
        pixels = torch.stack([policy.preprocess(store.get(v)) for v in videos])
        return policy.visual_features(pixels)

    default_features = [row.clone() for row in reencode().unbind(0)]  # as a rollout sends them
    reencode_s = median_s(reencode, args.reps)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        default_send = send_s(default_features, args.reps)
        paper = [torch.zeros(PAPER_TOKENS, PAPER_WIDTH, dtype=torch.bfloat16) for _ in videos]
        paper_send = send_s(paper, args.reps)
    finally:
        ray.shutdown()

    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "paper.mp4"
        rng = np.random.default_rng(0)
        write_video(clip, render(Scene("red", "circle", "right", 2), PAPER_FRAMES, PAPER_SIZE, rng), fps=10)
        decode_paper_s = median_s(lambda: load_frames(str(clip), PAPER_FRAMES, None, None), args.reps)
    encode_paper_s = (
        2 * VIT_L_PARAMS * VIT_L_TOKENS * PAPER_FRAMES / (H100_BF16_DENSE_FLOPS * ASSUMED_UTILISATION)
    )
    n = len(videos)
    rows = [
        [
            "default (measured)",
            f"{tuple(default_features[0].shape)} fp32",
            default_send["megabytes"],
            reencode_s,
            default_send["extra_s"],
        ],
        [
            "paper (send measured, re-encode estimated)",
            f"({PAPER_TOKENS}, {PAPER_WIDTH}) bf16",
            paper_send["megabytes"],
            n * (decode_paper_s + encode_paper_s),
            paper_send["extra_s"],
        ],
    ]
    print(f"per step of {n} groups, one torch thread")
    print_table(["setting", "features per group", "MB sent", "reencode_s", "send_extra_s"], rows)
    result = {
        "prompts": n,
        "reps": args.reps,
        "default": {
            "feature_shape": list(default_features[0].shape),
            "reencode_s": reencode_s,
            "send": default_send,
            "send_extra_s": default_send["extra_s"],
        },
        "paper": {
            "feature_shape": [PAPER_TOKENS, PAPER_WIDTH],
            "send": paper_send,
            "send_extra_s": paper_send["extra_s"],
            "decode_per_video_s": decode_paper_s,
            "encode_per_video_s_estimate": encode_paper_s,
            "reencode_s_estimate": n * (decode_paper_s + encode_paper_s),
            "assumptions": {
                "encoder": "CLIP ViT-L/14-336, 304 M parameters, 577 tokens per frame",
                "gpu": "H100 dense bf16 989 TFLOPS at 40% utilisation",
            },
        },
    }
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
