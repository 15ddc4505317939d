"""Supervised warm start: train projector + LoRA on the train split with DeepSpeed.

    python -m rlaif_ray.sft --config configs/default.yaml [key=value ...]

Writes the checkpoint to ``sft.output_dir`` (``adapter/``, ``projector.safetensors``,
``policy.json``), its per-step log to ``sft_metrics.jsonl`` and ``sft_state.json``, which marks the
checkpoint finished so that ``rlaif_ray.launch`` reuses it.

``sft.init_from`` continues from a finished checkpoint, ``sft.time_limit_s`` stops on training
time (evaluations excluded) and ``sft.keep_best`` saves the evaluation with the best val accuracy:
together, "more SFT for the same time" and "a converged SFT chosen on val" (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from rlaif_ray.checkpoint import SFT_STATE, fingerprint, init_checkpoint
from rlaif_ray.config import Config, load_config
from rlaif_ray.data.dataset import VideoQAExample, load_jsonl
from rlaif_ray.data.frames import FrameStore
from rlaif_ray.data.synthetic import ensure_data
from rlaif_ray.evaluate import evaluate, greedy_answer_fn
from rlaif_ray.learner.engine import build_engine, gathered_trainable, init_distributed
from rlaif_ray.logs import setup_logging
from rlaif_ray.models.policy import VideoLMPolicy
from rlaif_ray.models.tiny import ensure_model
from rlaif_ray.process import configure_cpu

log = logging.getLogger(__name__)


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood of the target answers: ``-sum(m * logp) / sum(m)``."""
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)


def training_batch(
    policy: VideoLMPolicy, store: FrameStore, examples: list[VideoQAExample]
) -> tuple[torch.Tensor | None, list[list[int]], list[list[int]]] | None:
    """Pixels (of the video examples, None if all are text-only), prompt ids and answer ids of the
    examples whose video decodes or that are text-only (None if there is none)."""
    frames, prompts, answers = [], [], []
    for ex in examples:
        ok, clip = store.for_example(ex.video)
        if not ok:
            continue
        frames.append(clip)
        prompts.append(policy.prompt_ids(ex.question, video=clip is not None))
        answers.append(policy.answer_ids(ex.answer or ""))
    if not prompts:
        return None
    return policy.pixels(frames), prompts, answers


def save_checkpoint(policy: VideoLMPolicy, out: Path) -> None:
    with gathered_trainable(policy):  # under ZeRO-3 the trainable tensors are partitioned
        policy.save(out)


def run_sft(cfg: Config) -> dict[str, Any]:
    """Train (from the base model or ``sft.init_from``), evaluate on the val split, save (the last
    state, or the best on val under ``sft.keep_best``); returns the state written to ``sft_state.json``."""
    setup_logging(cfg.log_level)
    ensure_data(cfg)
    model_dir = ensure_model(cfg)
    out = Path(cfg.sft.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SFT_STATE).unlink(missing_ok=True)  # unfinished until the new state is written
    # SFT runs in a task with the learner's resources.
    configure_cpu(cfg.learner.num_threads, cfg.learner.cpu_cores, "learner")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    train = [ex for ex in load_jsonl(cfg.data.train, on_error=cfg.data.on_bad_line) if ex.answer]
    val = load_jsonl(cfg.data.val, on_error=cfg.data.on_bad_line)
    if not train:
        raise ValueError(f"{cfg.data.train}: no example with an answer to train on")
    start_dir = init_checkpoint(cfg) or model_dir
    policy = VideoLMPolicy.from_folder(start_dir, cfg.model, seed=cfg.seed)
    store = FrameStore(cfg.model.num_frames, policy.image_size, max_pixels=cfg.data.max_video_pixels)
    init_distributed("gloo" if not torch.cuda.is_available() else "nccl")
    engine = build_engine(
        policy,
        lr=cfg.sft.lr,
        weight_decay=cfg.sft.weight_decay,
        zero_stage=cfg.sft.zero_stage,
        grad_clip=cfg.sft.grad_clip,
        micro_batch_size=cfg.sft.batch_size,
        warmup_steps=cfg.sft.warmup_steps,
        dtype=cfg.model.dtype,
        zero3_persistence_threshold=cfg.learner.zero3_persistence_threshold,
    )

    start = time.time()
    train_s = 0.0  # training time alone: what sft.time_limit_s limits
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None  # the history entry saved under sft.keep_best

    def evaluate_val(step: int) -> dict[str, Any]:
        """Evaluate on val, note it in ``history`` and, when it is the best so far under
        ``sft.keep_best``, save it."""
        nonlocal best
        policy.eval()
        result = evaluate(greedy_answer_fn(policy, cfg.rollout.max_new_tokens), val, store)
        policy.train()
        entry = {
            "step": step,
            "wall_s": time.time() - start,
            "train_s": train_s,
            "val_accuracy": result["accuracy"],
            "val_part_accuracy": result["part_accuracy"],
        }
        history.append(entry)
        if cfg.sft.keep_best and (best is None or entry["val_accuracy"] > best["val_accuracy"]):
            best = entry
            save_checkpoint(policy, out)
        return result

    if cfg.sft.keep_best:  # the starting point is a candidate too
        evaluate_val(0)
    step = 0
    with (out / "sft_metrics.jsonl").open("w") as metrics:
        while step < cfg.sft.steps:
            step += 1
            tick = time.time()
            batch = training_batch(policy, store, rng.sample(train, min(cfg.sft.batch_size, len(train))))
            if batch is None:
                continue
            pixels, prompts, answers = batch
            logprobs, mask, _ = engine(pixels, prompts, answers)
            loss = sft_loss(logprobs, mask)
            engine.backward(loss)
            engine.step()
            train_s += time.time() - tick
            out_of_time = 0 < cfg.sft.time_limit_s <= train_s
            record: dict[str, Any] = {
                "step": step,
                "loss": loss.item(),
                "wall_s": time.time() - start,
                "train_s": train_s,
            }
            if step % cfg.sft.eval_every == 0 or step == cfg.sft.steps or out_of_time:
                record["val"] = evaluate_val(step)
            if step % cfg.sft.log_every == 0 or "val" in record:
                val_text = f" val_acc={record['val']['accuracy']:.3f}" if "val" in record else ""
                print(
                    f"[sft] step {step}/{cfg.sft.steps} loss={record['loss']:.4f}{val_text} "
                    f"({record['wall_s']:.0f}s)",
                    flush=True,
                )
            metrics.write(json.dumps(record) + "\n")
            if out_of_time:
                print(
                    f"[sft] sft.time_limit_s={cfg.sft.time_limit_s:g} reached after step {step}", flush=True
                )
                break
    if not cfg.sft.keep_best or best is None:
        save_checkpoint(policy, out)
    state = {
        "finished": True,
        "steps": step,
        "saved_step": best["step"] if cfg.sft.keep_best and best else step,
        "init_from": cfg.sft.init_from,
        "wall_s": time.time() - start,
        "train_s": train_s,
        "history": history,
        # Training lines with an answer (the ones SFT learns from; lines without one are skipped).
        "train_examples": len(train),
        "skipped_videos": store.skipped_videos,
        "model": str(model_dir),
        "fingerprint": fingerprint(cfg, model_dir),
    }
    # Written last and atomically: it marks the checkpoint finished.
    tmp = out / f".{SFT_STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, out / SFT_STATE)
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="SFT warm start of projector + LoRA")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    state = run_sft(load_config(args.config, args.overrides))
    print(json.dumps({k: v for k, v in state.items() if k != "history"}))


if __name__ == "__main__":
    main()
