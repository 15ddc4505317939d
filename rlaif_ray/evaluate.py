"""Held-out exact-match accuracy of a policy: greedy answers judged by the ground-truth oracle.

    python -m rlaif_ray.evaluate --checkpoint DIR --data test.jsonl [--out result.json]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from rlaif_ray.config import ModelConfig, load_config
from rlaif_ray.data.dataset import VideoQAExample, load_jsonl
from rlaif_ray.data.frames import FrameStore
from rlaif_ray.models.policy import VideoLMPolicy
from rlaif_ray.ranker.backends import normalize_answer


@torch.no_grad()
def evaluate(policy: VideoLMPolicy, examples: list[VideoQAExample], store: FrameStore, batch_size: int = 64,
             max_new_tokens: int = 6) -> dict[str, Any]:
    """Greedy-decode every example with an answer; return accuracy overall and per question type.

    An answer is correct when its normalised text equals the normalised reference (the same
    rule as the ground-truth oracle). Examples whose video does not decode are skipped and counted.
    """
    was_training = policy.training
    policy.eval()
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    skipped = 0
    scored = [ex for ex in examples if ex.answer is not None]
    for start in range(0, len(scored), batch_size):
        rows, pixels = [], []
        for ex in scored[start:start + batch_size]:
            frames = store.try_get(ex.video)
            if frames is None:
                skipped += 1
                continue
            rows.append(ex)
            pixels.append(policy.preprocess(frames))
        if not rows:
            continue
        samples = policy.sample(torch.stack(pixels), [policy.prompt_ids(ex.question) for ex in rows], group_size=1,
                                temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, greedy=True)
        for ex, text in zip(rows, samples.texts, strict=True):
            hit = int(normalize_answer(text) == normalize_answer(ex.answer or ""))
            for key in ("all", ex.type or "untyped"):
                correct[key] += hit
                total[key] += 1
    policy.train(was_training)
    n = total["all"]
    return {
        "accuracy": correct["all"] / n if n else 0.0,
        "n": n,
        "per_type": {k: correct[k] / total[k] for k in sorted(total) if k != "all"},
        "skipped_videos": skipped,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="exact-match accuracy of a checkpoint on a JSONL split")
    parser.add_argument("--checkpoint", required=True, help="a model folder (policy.json [+ adapter/])")
    parser.add_argument("--data", required=True, help="JSONL file with answers")
    parser.add_argument("--config", default=None, help="config whose model section to use (default: built-in)")
    parser.add_argument("--out", default=None, help="where to write the JSON result")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    model_cfg: ModelConfig = load_config(args.config).model
    policy = VideoLMPolicy.from_folder(args.checkpoint, model_cfg)
    examples = load_jsonl(args.data, on_error="skip")
    result = evaluate(policy, examples, FrameStore(model_cfg.num_frames, policy.image_size), args.batch_size)
    result.update({"checkpoint": str(args.checkpoint), "data": str(args.data)})
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"eval_{Path(args.data).stem}.json"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
