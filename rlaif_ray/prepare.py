"""Build what a run needs when it is missing: the synthetic data, the tiny model, the video judge.

Real runs point ``data.*``, ``model.path`` and ``ranker.judge_path`` at existing files and never
reach the builders. From the command line::

    python -m rlaif_ray.prepare judge --config configs/rlaif.yaml [key=value ...]
    python -m rlaif_ray.prepare distill --config configs/rlaif.yaml --out FILE [key=value ...]

``distill`` writes the training lines with the judge's greedy answer on every line nobody
labelled (:func:`label_with_judge`): the data of the ``distill`` baseline, SFT on the judge's
answers, against which RL from the same judge's rankings is measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from rlaif_ray.config import Config, load_config, with_absolute_paths

log = logging.getLogger(__name__)


JUDGE_STATE = "judge_state.json"


def ensure_judge(cfg: Config) -> Path:
    """The video judge of ``ranker.judge_path``, built there when it holds no checkpoint (and
    ``judge.build_if_missing``): the policy's base model trained by SFT, best on val kept, on
    synthetic data of its own (``judge.data_dir``, ``judge.videos`` videos from ``judge.seed``), then
    measured on the policy's test split into ``judge_state.json``."""
    if not cfg.ranker.judge_path:
        raise ValueError("ranker.judge_path must name the judge's folder")
    path = Path(cfg.ranker.judge_path)
    if (path / "policy.json").is_file():
        return path
    if not cfg.judge.build_if_missing:
        raise FileNotFoundError(
            f"ranker.judge_path {str(path)!r} holds no policy.json and judge.build_if_missing is false"
        )
    if cfg.judge.seed == cfg.data.synthetic_seed:
        raise ValueError(
            f"judge.seed = {cfg.judge.seed} equals data.synthetic_seed: the judge's data must come from "
            "another seed, so that it never sees the policy's val or test videos"
        )
    from rlaif_ray.sft import run_sft

    folder = Path(cfg.judge.data_dir)
    judge_cfg = copy.deepcopy(cfg)
    judge_cfg.data.train, judge_cfg.data.val = str(folder / "train.jsonl"), str(folder / "val.jsonl")
    judge_cfg.data.test = str(folder / "test.jsonl")
    judge_cfg.data.synthetic_dir, judge_cfg.data.synthetic_seed = str(folder), cfg.judge.seed
    judge_cfg.data.synthetic_videos, judge_cfg.data.synthetic_label_fraction = cfg.judge.videos, 1.0
    judge_cfg.sft.output_dir, judge_cfg.sft.init_from = str(path), None
    judge_cfg.sft.steps, judge_cfg.sft.eval_every = cfg.judge.sft_steps, cfg.judge.eval_every
    judge_cfg.sft.keep_best = True
    log.info("building the video judge into %s (SFT on %s, seed %d)", path, folder, cfg.judge.seed)
    sft = run_sft(judge_cfg)
    state = {
        "data_dir": str(folder),
        "seed": cfg.judge.seed,
        "sft": {k: sft[k] for k in ("steps", "saved_step", "train_examples", "train_s")},
        "val_accuracy": max(h["val_accuracy"] for h in sft["history"]),
        "policy_test": measure_judge(cfg, path),
    }
    (path / JUDGE_STATE).write_text(json.dumps(state, indent=2))
    return path


def measure_judge(cfg: Config, path: Path) -> dict[str, Any]:
    """The judge in ``path`` on the policy's test split (``data.test``): its greedy accuracy, and its
    top-1 ranking accuracy, the share of questions whose reference it ranks first among every
    answer the split gives to questions of that type."""
    from rlaif_ray.answers import normalize_answer
    from rlaif_ray.config import RankerConfig
    from rlaif_ray.data.dataset import load_jsonl
    from rlaif_ray.data.frames import FrameStore
    from rlaif_ray.evaluate import evaluate, greedy_answer_fn
    from rlaif_ray.ranker.backends import RankPrompt
    from rlaif_ray.ranker.video_judge import VideoJudgeRanker

    test = [ex for ex in load_jsonl(cfg.data.test) if ex.answer is not None]
    judge = VideoJudgeRanker(RankerConfig(backend="video_judge", judge_path=str(path)))
    store = FrameStore(judge.policy.cfg.num_frames, max_pixels=cfg.data.max_video_pixels)
    greedy = evaluate(greedy_answer_fn(judge.policy, cfg.rollout.max_new_tokens), test, store)
    answers: dict[str | None, set[str]] = defaultdict(set)
    for ex in test:
        answers[ex.type].add(normalize_answer(ex.answer))
    first = ranked = 0
    for ex in test:
        frames = store.try_get(ex.video) if ex.video is not None else None
        if ex.video is not None and frames is None:
            continue
        candidates = sorted(answers[ex.type])
        top = judge.rank(RankPrompt(ex.question, None, ex.type, ex.video, frames), candidates)[0]
        first += isinstance(top, int) and candidates[top] == normalize_answer(ex.answer)
        ranked += 1
    return {
        "n": greedy["n"],
        "greedy_accuracy": greedy["accuracy"],
        "per_type": greedy.get("per_type"),
        "top1_ranking_accuracy": first / ranked if ranked else None,
        "ranked": ranked,
    }


def label_with_judge(cfg: Config, out: str | Path, batch_size: int = 64) -> dict[str, int]:
    """Write ``data.train`` to ``out`` (JSONL, absolute video paths) with the greedy answer of the
    judge in ``ranker.judge_path`` (built when missing, as :func:`ensure_judge`) on every line that
    has no answer; lines with an answer are kept as they are. A line whose video does not decode
    keeps no answer (SFT skips it) and is counted. Returns the counts: ``lines``, ``labelled``
    (already had an answer), ``judge_labelled`` and ``bad_video``."""
    from rlaif_ray.config import RankerConfig
    from rlaif_ray.data.dataset import load_jsonl
    from rlaif_ray.data.frames import FrameStore
    from rlaif_ray.evaluate import greedy_answer_fn
    from rlaif_ray.ranker.video_judge import VideoJudgeRanker

    judge = VideoJudgeRanker(RankerConfig(backend="video_judge", judge_path=str(ensure_judge(cfg))))
    answer = greedy_answer_fn(judge.policy, cfg.rollout.max_new_tokens)
    examples = load_jsonl(cfg.data.train, on_error=cfg.data.on_bad_line)
    store = FrameStore(judge.policy.cfg.num_frames, capacity=batch_size, max_pixels=cfg.data.max_video_pixels)
    unlabelled = [ex for ex in examples if ex.answer is None]
    judged = 0
    for start in range(0, len(unlabelled), batch_size):  # decoded a batch at a time, not all at once
        decoded = [(ex, store.for_example(ex.video)) for ex in unlabelled[start : start + batch_size]]
        batch = [(ex, frames) for ex, (ok, frames) in decoded if ok]
        if not batch:
            continue
        texts = answer([frames for _, frames in batch], [ex.question for ex, _ in batch])
        for (ex, _), text in zip(batch, texts, strict=True):
            ex.answer = text
        judged += len(batch)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [{key: value for key, value in vars(ex).items() if value is not None} for ex in examples]
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {
        "lines": len(examples),
        "labelled": len(examples) - len(unlabelled),
        "judge_labelled": judged,
        "bad_video": len(unlabelled) - judged,
    }


def main(argv: list[str] | None = None) -> None:
    """The command line: ``judge`` builds the video judge of a config (when missing); ``distill``
    writes the training lines with the judge's answers where they had none."""
    parser = argparse.ArgumentParser(prog="python -m rlaif_ray.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["judge", "distill"])
    parser.add_argument("--config", default=None, help="a YAML config (default: the dataclass defaults)")
    parser.add_argument("--out", help="distill: the JSONL file to write")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_intermixed_args(argv)
    from rlaif_ray.logs import setup_logging

    cfg = with_absolute_paths(load_config(args.config, args.overrides))
    setup_logging(cfg.log_level)
    if args.what == "distill":
        if not args.out:
            parser.error("distill needs --out FILE")
        print(json.dumps(label_with_judge(cfg, args.out)), flush=True)
        return
    path = ensure_judge(cfg)
    state = path / JUDGE_STATE
    print(state.read_text() if state.is_file() else f"the judge in {path} was there already", flush=True)


if __name__ == "__main__":
    main()
