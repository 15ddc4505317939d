"""The ``openai`` ranker's frames reach a real vision-language model served by vLLM.

One ``vllm serve`` per module (vLLM's CPU build) of a tiny LLaVA-style judge built from config
(:func:`rlaif_ray.ranker.tiny_judge.build_tiny_vision_judge`: random weights, 16 prompt tokens per
image). The ranker decodes real synthetic videos with the policy's frame sampler and sends
``ranker.openai_frames`` of them; the server's reported prompt tokens show how many arrived.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_server import vllm_server

from rlaif_ray.config import Config, RankerConfig
from rlaif_ray.data.synthetic import ANSWERS_BY_TYPE
from rlaif_ray.groups import Group
from rlaif_ray.learner.worker import build_rows
from rlaif_ray.ranker import RankerWorker
from rlaif_ray.ranker.tiny_judge import IMAGE_TOKENS, build_tiny_vision_judge

NUM_FRAMES = 8  # the policy's frame sampler: what the ranker decodes
GROUP_SIZE = 3  # every question type has at least 3 answers


@pytest.fixture(scope="module")
def vision_judge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``vllm serve`` of the tiny vision judge, up to :data:`NUM_FRAMES` images per prompt."""
    tmp = tmp_path_factory.mktemp("vllm_vision_judge")
    with vllm_server(
        build_tiny_vision_judge(tmp / "judge"),
        tmp / "server.log",
        f'--limit-mm-per-prompt={{"image": {NUM_FRAMES}}}',
    ) as url:
        yield url


def video_groups(synthetic_dir: Path, n: int, unlabelled: bool = False) -> list[Group]:
    """One group per test-split line of ``synthetic_dir`` (its real video), whose candidates are the
    first :data:`GROUP_SIZE` answers of the question type's vocabulary; without the reference when
    ``unlabelled``."""
    lines = [json.loads(line) for line in (synthetic_dir / "test.jsonl").read_text().splitlines()][:n]
    groups = []
    for i, line in enumerate(lines):
        answers = list(ANSWERS_BY_TYPE[line["type"]])[:GROUP_SIZE]
        groups.append(
            Group(
                group_id=f"g{i}",
                example_id=line["id"],
                video=str(synthetic_dir / line["video"]),
                question=line["question"],
                reference=None if unlabelled else line["answer"],
                completions=answers,
                completion_ids=[[1] for _ in answers],
                logprobs=[[-1.0] for _ in answers],
                weight_version=0,
                question_type=line["type"],
            )
        )
    return groups


def rank(url: str, frames: int, groups: list[Group]) -> tuple[list[Group], dict]:
    cfg = RankerConfig(
        backend="openai",
        openai_frames=frames,
        openai_base_url=url,
        openai_model="judge",
        openai_structured_output=True,  # the untrained judge can only answer an ordering line
        openai_timeout_s=120.0,
        max_retries=0,
    )
    worker = RankerWorker(cfg, group_size=GROUP_SIZE, num_frames=NUM_FRAMES)
    return worker.rank_groups(groups), worker.stats()


@pytest.mark.slow
def test_prompt_tokens_grow_with_the_frames_sent(vision_judge: str, synthetic_dir: Path) -> None:
    tokens = {}
    for frames in (0, 2, 4, 8):
        _, stats = rank(vision_judge, frames, video_groups(synthetic_dir, 3))
        assert stats["ok"] == 3 and stats["bad_video"] == 0, stats
        tokens[frames] = stats["prompt_tokens"]
    assert tokens[0] > 0
    # each image is IMAGE_TOKENS placeholder tokens of the prompt (plus the separator the chat
    # template puts after it): text-only < 2 frames < 4 < 8, by at least that much per frame
    for fewer, more in ((0, 2), (2, 4), (4, 8)):
        assert tokens[more] - tokens[fewer] >= 3 * (more - fewer) * IMAGE_TOKENS, tokens


@pytest.mark.slow
def test_orderings_from_the_frames_reach_the_learner(vision_judge: str, synthetic_dir: Path) -> None:
    groups = video_groups(synthetic_dir, 6, unlabelled=True)  # the judge needs no reference
    ranked, stats = rank(vision_judge, 4, groups)
    assert stats["ok"] == len(groups) and stats["no_reference"] == 0, stats
    assert all(g.rank_status == "ok" and len(g.ranks) == g.size for g in ranked)
    rows, row_stats = build_rows(ranked, Config())
    assert len(rows) == GROUP_SIZE * (len(ranked) - int(row_stats["groups_skipped_tied"]))
    assert rows and any(row.advantage != 0.0 for row in rows)


@pytest.mark.slow
def test_a_video_that_does_not_decode_is_counted_not_sent(
    vision_judge: str, synthetic_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    good, bad = video_groups(synthetic_dir, 2)
    bad.video = str(broken)
    (good, bad), stats = rank(vision_judge, 4, [good, bad])
    assert good.rank_status == "ok" and bad.rank_status == "bad_video" and bad.ranks is None
    assert stats["bad_video"] == 1 and stats["attempts"] == 1, stats
