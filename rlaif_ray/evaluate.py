"""Held-out accuracy: greedy answers judged by the ground-truth oracle's rules (exact match, parts right).

python -m rlaif_ray.evaluate --checkpoint DIR --data test.jsonl [--out result.json]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rlaif_ray.answers import normalize_answer, part_accuracy
from rlaif_ray.config import load_config
from rlaif_ray.data.dataset import VideoQAExample, load_jsonl
from rlaif_ray.data.frames import FrameStore
from rlaif_ray.models.policy import VideoLMPolicy, read_policy_spec

AnswerFn = Callable[[list[np.ndarray], list[str]], list[str]]


def greedy_answer_fn(policy: VideoLMPolicy, max_new_tokens: int) -> AnswerFn:
    """Greedy answers of ``policy`` (the evaluation decoding)."""

    def answer(frames: list[np.ndarray], questions: list[str]) -> list[str]:
        return policy.sample_frames(frames, questions, 1, 1.0, 1.0, max_new_tokens, greedy=True).texts

    return answer


def evaluate(
    answer_fn: AnswerFn, examples: list[VideoQAExample], store: FrameStore, batch_size: int = 64
) -> dict[str, Any]:
    """Answer every example that has a reference; accuracy overall and per question type.

    ``accuracy``: exact match, an answer being correct when its normalised words are the
    reference's in any order (the ground-truth oracle's rule, ``is_correct``); ``part_accuracy``:
    the mean fraction of parts right (``part_accuracy``: for graded answers such as "red circle
    up", partial credit; for one-word answers it adds credit for the word said among others).
    Examples whose video cannot be used are skipped and counted:
    ``skipped_videos`` (examples) and ``skipped_videos_by_reason`` (examples per
    ``VideoDecodeError.reason``); the store warns once per video.
    """
    correct: dict[str, int] = defaultdict(int)
    parts: dict[str, float] = defaultdict(float)
    total: dict[str, int] = defaultdict(int)
    skipped: Counter[str] = Counter()
    scored = [ex for ex in examples if ex.answer is not None]
    for start in range(0, len(scored), batch_size):
        rows, frames = [], []
        for ex in scored[start : start + batch_size]:
            ok, clip = store.for_example(ex.video)
            if not ok:
                skipped[store.reason(ex.video) or "unknown"] += 1
                continue
            rows.append(ex)
            frames.append(clip)
        if not rows:
            continue
        texts = answer_fn(frames, [ex.question for ex in rows])
        for ex, text in zip(rows, texts, strict=True):
            part = part_accuracy(normalize_answer(text), normalize_answer(ex.answer or ""))
            for key in ("all", ex.type or "untyped"):
                correct[key] += int(part == 1.0)
                parts[key] += part
                total[key] += 1
    n = total["all"]
    return {
        "accuracy": correct["all"] / n if n else 0.0,
        "n": n,
        "per_type": {k: correct[k] / total[k] for k in sorted(total) if k != "all"},
        "part_accuracy": parts["all"] / n if n else 0.0,
        "per_type_part_accuracy": {k: parts[k] / total[k] for k in sorted(total) if k != "all"},
        "skipped_videos": sum(skipped.values()),
        "skipped_videos_by_reason": dict(sorted(skipped.items())),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="exact-match accuracy of a checkpoint on a JSONL split")
    parser.add_argument("--checkpoint", required=True, help="a model folder (policy.json [+ adapter/])")
    parser.add_argument("--data", required=True, help="JSONL file with answers")
    parser.add_argument(
        "--config",
        default=None,
        help="config whose model section to use (default: built-in, with the checkpoint's trained_with)",
    )
    parser.add_argument("--out", default=None, help="where to write the JSON result")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.config is None:  # the checkpoint's own input settings
        for key, value in read_policy_spec(args.checkpoint).get("trained_with", {}).items():
            setattr(cfg.model, key, value)
    policy = VideoLMPolicy.from_folder(args.checkpoint, cfg.model)
    policy.eval()
    store = FrameStore(cfg.model.num_frames, policy.image_size, max_pixels=cfg.data.max_video_pixels)
    examples = load_jsonl(args.data, on_error="skip")
    result = evaluate(greedy_answer_fn(policy, cfg.rollout.max_new_tokens), examples, store, args.batch_size)
    result.update({"checkpoint": str(args.checkpoint), "data": str(args.data)})
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"eval_{Path(args.data).stem}.json"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
