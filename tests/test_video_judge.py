"""The ``video_judge`` backend: a video-language model that looks at the video orders the answers,
so that RL can learn from prompts nobody labelled. The judge here is the colour checkpoint (an SFT
of the tiny policy on colour questions, whose greedy answers depend on the video)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from rlaif_ray.algo.advantages import ranks_from_orderings
from rlaif_ray.config import Config, ConfigError, RankerConfig, load_config
from rlaif_ray.data.dataset import load_jsonl
from rlaif_ray.data.frames import FrameStore
from rlaif_ray.data.synthetic import ANSWERS_BY_TYPE
from rlaif_ray.groups import Group
from rlaif_ray.launch import prepare_run, run
from rlaif_ray.ranker import RankerWorker, RankPrompt, VideoJudgeRanker
from rlaif_ray.ranker.video_judge import ordering_from_scores

COLOURS = sorted(ANSWERS_BY_TYPE["colour"])


@pytest.fixture(scope="module")
def judge(colour_checkpoint: Path) -> VideoJudgeRanker:
    return VideoJudgeRanker(RankerConfig(backend="video_judge", judge_path=str(colour_checkpoint)))


def colour_prompts(synthetic_dir: Path, split: str) -> list[RankPrompt]:
    """The colour questions of a split, with their frames as the ranker decodes them."""
    store = FrameStore(8)
    return [
        RankPrompt(ex.question, ex.answer, ex.type, ex.video, store.get(ex.video))
        for ex in load_jsonl(synthetic_dir / f"{split}.jsonl")
        if ex.type == "colour"
    ]


def test_ordering_from_scores_puts_the_highest_first_and_ties_equal_scores() -> None:
    assert ordering_from_scores([-1.0, -0.5, -1.0, -3.0]) == [1, [0, 2], 3]
    assert ordering_from_scores([0.0, 0.0]) == [[0, 1]]


def test_equal_answers_tie_an_empty_one_ranks_last_and_scores_order_as_ranks(
    judge: VideoJudgeRanker, synthetic_dir: Path
) -> None:
    prompt = colour_prompts(synthetic_dir, "test")[0]
    candidates = ["red", "Red!", "", "blue", "green", "  "]
    ranks = ranks_from_orderings([judge.rank(prompt, candidates)], len(candidates))[0].tolist()
    assert ranks[0] == ranks[1]  # the same answer up to case and punctuation
    assert ranks[2] == ranks[5] == 4.5  # the empty answers share the last two places
    scores = judge.scores(prompt, candidates)
    assert all(np.isfinite(scores)) and scores[0] == scores[1] and scores[2] < min(scores[:2] + scores[3:5])
    # The ranking is the order of the scores (plain GRPO learns from the same scalar).
    for i in range(len(candidates)):
        for j in range(len(candidates)):
            assert (scores[i] > scores[j]) == (ranks[i] < ranks[j])


def test_the_judge_follows_the_video_and_not_with_blank_frames(
    judge: VideoJudgeRanker, synthetic_dir: Path
) -> None:
    """On 50 pairs of videos whose correct colours differ, asked the same question with the same
    candidates (every colour), the judge's first choice changes with the video on at least 80% of
    the pairs; with blank frames in place of both videos it never does (a judge that ignored the
    video would pass the first half and fail this control)."""
    prompts = colour_prompts(synthetic_dir, "train")
    rng = np.random.default_rng(0)
    pairs = []
    while len(pairs) < 50:
        a, b = (prompts[i] for i in rng.choice(len(prompts), 2, replace=False))
        if a.reference != b.reference:
            pairs.append((a, b))

    def first_choice(prompt: RankPrompt, frames: np.ndarray) -> list[int] | int:
        blanked = RankPrompt(prompt.question, None, prompt.question_type, prompt.video, frames)
        return judge.rank(blanked, COLOURS)[0]

    follows = sum(first_choice(a, a.frames) != first_choice(b, b.frames) for a, b in pairs)
    assert follows >= 40, f"the first choice followed the video on {follows} of 50 pairs"
    blank = np.zeros_like(pairs[0][0].frames)
    assert sum(first_choice(a, blank) != first_choice(b, blank) for a, b in pairs) == 0
    # And it mostly names the right colour (chance: 1 in 6).
    right = sum(first_choice(p, p.frames) == COLOURS.index(p.reference) for pair in pairs for p in pair)
    assert right >= 80, f"{right} of 100 first choices were the video's colour"


def make_group(video: str, reference: str | None, group_id: str) -> Group:
    answers = ["red", "blue", "green"]
    return Group(
        group_id=group_id,
        example_id=group_id,
        video=video,
        question="What colour is the shape?",
        reference=reference,
        completions=answers,
        completion_ids=[[1] for _ in answers],
        logprobs=[[-1.0] for _ in answers],
        weight_version=0,
        question_type="colour",
    )


def test_the_ranker_decodes_the_video_and_counts_one_that_does_not_decode(
    judge: VideoJudgeRanker, synthetic_dir: Path, tmp_path: Path
) -> None:
    video = colour_prompts(synthetic_dir, "test")[0].video
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    worker = RankerWorker(RankerConfig(backend="video_judge"), group_size=3, backend=judge, num_frames=8)
    good, unlabelled, bad = worker.rank_groups(
        [make_group(video, "red", "g"), make_group(video, None, "u"), make_group(str(broken), "red", "b")]
    )
    assert good.rank_status == unlabelled.rank_status == "ok"
    assert good.ranks == unlabelled.ranks and good.scores == unlabelled.scores  # the judge needs no label
    assert good.correct == [1.0, 0.0, 0.0] and unlabelled.correct is None
    assert bad.rank_status == "bad_video" and bad.ranks is None and bad.rank_attempts == 0
    stats = worker.stats()
    assert stats["bad_video"] == 1 and stats["ok"] == 2 and stats["fallbacks"] == 0
    # Agreement with the labels is counted on the labelled group only (one right answer, "red").
    judge_first = [i for i, r in enumerate(good.ranks) if r == min(good.ranks)]
    assert stats["top1_checked"] == 1 and stats["top1_agrees"] == int(judge_first == [0])


def half_unlabelled(colour_checkpoint: Path, out: Path) -> str:
    """The colour checkpoint's training questions, every other video's without its answer."""
    rows = [
        json.loads(line)
        for line in (colour_checkpoint.parent / "colour_train.jsonl").read_text().splitlines()
    ]
    for i, row in enumerate(rows):
        if i % 2:
            del row["answer"]
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(out)


@pytest.mark.slow
def test_rl_on_prompts_without_reference_ranked_by_the_video_judge(
    small_config: Config, colour_checkpoint: Path, tmp_path: Path
) -> None:
    """Lines without an answer: SFT trains on the others only, the loop samples them all and the
    video judge ranks them, and summary.json counts the groups that had no reference. The
    ground-truth oracle refuses such data before anything starts, naming the backend to use."""
    cfg = small_config
    cfg.data.train = half_unlabelled(colour_checkpoint, tmp_path / "half.jsonl")
    with pytest.raises(ConfigError, match=r"without an answer.*ranker.backend=video_judge"):
        prepare_run(cfg)
    cfg.ranker.backend, cfg.ranker.judge_path = "video_judge", str(colour_checkpoint)
    cfg.sft.steps, cfg.sft.eval_every, cfg.sft.batch_size = 5, 5, 8
    cfg.rl.steps, cfg.rl.prompts_per_step, cfg.rl.group_size = 2, 8, 4
    cfg.rl.eval_every, cfg.rl.eval_examples = 2, 8
    cfg.rollout.num_threads = cfg.learner.num_threads = 1
    summary = run(cfg)
    sft_state = json.loads((Path(cfg.sft.output_dir) / "sft_state.json").read_text())
    labelled = sum(1 for ex in load_jsonl(cfg.data.train) if ex.answer)
    assert sft_state["train_examples"] == labelled < len(load_jsonl(cfg.data.train))
    records = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and summary["groups"]["sampled"] >= 16
    assert 0 < summary["groups_without_reference"] < summary["groups"]["sampled"]
    assert summary["ranker"]["ok"] >= 16 and summary["ranker"]["no_reference"] == 0
    assert summary["groups"]["dropped_unranked"] == 0
    assert all(r["learner"]["rows"] > 0 for r in records if not r["learner"].get("skipped_step"))


@pytest.mark.slow
def test_prepare_judge_builds_a_judge_on_data_of_its_own_and_measures_it(
    small_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m rlaif_ray.prepare judge`` trains the judge on synthetic data from its own seed
    (never the policy's split), keeps the best on val, and writes judge_state.json with its greedy
    and top-1 ranking accuracy on the policy's test split; a second call finds it and trains nothing."""
    from rlaif_ray.prepare import JUDGE_STATE, ensure_judge, main

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(small_config.to_dict()))
    judge_dir, data_dir = tmp_path / "judge", tmp_path / "judge_data"
    overrides = [
        "ranker.backend=video_judge",
        f"ranker.judge_path={judge_dir}",
        f"judge.data_dir={data_dir}",
        "judge.seed=5",
        "judge.videos=24",
        "judge.sft_steps=20",
        "judge.eval_every=10",
    ]
    main(["judge", "--config", str(config), *overrides])
    state = json.loads((judge_dir / JUDGE_STATE).read_text())
    assert (
        f'"top1_ranking_accuracy": {state["policy_test"]["top1_ranking_accuracy"]}' in capsys.readouterr().out
    )
    assert state["seed"] == 5 and state["data_dir"] == str(data_dir)
    assert 0 < state["sft"]["train_examples"] <= 24 * 4 and state["sft"]["saved_step"] in (0, 10, 20)
    policy_test = load_jsonl(small_config.data.test)
    assert state["policy_test"]["n"] == state["policy_test"]["ranked"] == len(policy_test)
    assert 0 <= state["policy_test"]["top1_ranking_accuracy"] <= 1
    assert 0 <= state["policy_test"]["greedy_accuracy"] <= 1
    judge_videos = {
        ex.video for split in ("train", "val", "test") for ex in load_jsonl(data_dir / f"{split}.jsonl")
    }
    assert judge_videos.isdisjoint(ex.video for ex in policy_test)
    assert all(str(data_dir) in video for video in judge_videos)
    # It ranks as a backend, and a second build finds it.
    judge_cfg = load_config(str(config), overrides)
    VideoJudgeRanker(judge_cfg.ranker)
    before = (judge_dir / JUDGE_STATE).stat().st_mtime_ns
    assert ensure_judge(judge_cfg) == judge_dir and (judge_dir / JUDGE_STATE).stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="judge.seed = 0 equals data.synthetic_seed"):
        ensure_judge(
            load_config(str(config), [*overrides, f"ranker.judge_path={tmp_path / 'other'}", "judge.seed=0"])
        )


def test_distill_labels_only_the_unlabelled_prompts_with_the_judges_greedy_answers(
    small_config: Config, colour_checkpoint: Path, judge: VideoJudgeRanker, tmp_path: Path
) -> None:
    """``python -m rlaif_ray.prepare distill``: every line nobody labelled gets the judge's greedy
    answer, every labelled line keeps its own; a line whose video does not decode keeps none."""
    from rlaif_ray.evaluate import greedy_answer_fn
    from rlaif_ray.prepare import main

    half = Path(half_unlabelled(colour_checkpoint, tmp_path / "half.jsonl"))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    lines = half.read_text().splitlines()
    lines.append(json.dumps({"id": "broken", "video": str(broken), "question": "what colour is the shape ?"}))
    half.write_text("\n".join(lines) + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(small_config.to_dict()))
    out = tmp_path / "distilled.jsonl"
    overrides = [f"data.train={half}", "ranker.backend=video_judge", f"ranker.judge_path={colour_checkpoint}"]
    main(["distill", "--config", str(config), "--out", str(out), *overrides])

    before, after = load_jsonl(half), load_jsonl(out)
    assert [ex.id for ex in after] == [ex.id for ex in before]
    unlabelled = [(b, a) for b, a in zip(before, after, strict=True) if b.answer is None and b.id != "broken"]
    assert unlabelled and all(a.answer for _, a in unlabelled)
    for b, a in zip(before, after, strict=True):
        if b.answer is not None:
            assert a == b  # labelled lines untouched
    assert after[-1].id == "broken" and after[-1].answer is None
    store = FrameStore(8)
    frames = [store.get(b.video) for b, _ in unlabelled]
    greedy = greedy_answer_fn(judge.policy, small_config.rollout.max_new_tokens)
    assert [a.answer for _, a in unlabelled] == greedy(frames, [b.question for b, _ in unlabelled])
    assert len({a.answer for _, a in unlabelled}) >= 2  # answers that depend on the video
