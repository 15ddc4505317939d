"""The ``openai`` ranker against a real ``vllm serve`` of the tiny judge, as users deploy a judge.

One server per module (vLLM's CPU build here): the tiny judge is built from config into a temp
folder and served on 127.0.0.1. The judge is untrained, so what it answers is the constraint's
doing: with structured output every answer is an ordering line, without it none is.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_server import vllm_server

from rlaif_ray.config import Config, RankerConfig
from rlaif_ray.data.synthetic import (
    ANSWERS_BY_TYPE,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    VOCABULARY,
    Scene,
    questions,
)
from rlaif_ray.groups import Group
from rlaif_ray.learner.worker import build_rows
from rlaif_ray.models.tiny import build_tokenizer
from rlaif_ray.ranker import JudgeRanker, RankerWorker, build_ranking_prompt, make_backend
from rlaif_ray.ranker.prompting import ordering_regex, structured_output_constraint
from rlaif_ray.ranker.tiny_judge import build_tiny_judge

GROUP_SIZE = 5


@pytest.fixture(scope="module")
def vllm_judge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``vllm serve`` of the tiny judge (served name "judge"); yields its base URL."""
    tmp = tmp_path_factory.mktemp("vllm_judge")
    with vllm_server(build_tiny_judge(tmp / "judge"), tmp / "server.log") as url:
        yield url


def judge_cfg(base_url: str, structured: bool) -> RankerConfig:
    return RankerConfig(
        backend="openai",
        openai_frames=0,  # the tiny judge served here is a text-only LM
        openai_base_url=base_url,
        openai_model="judge",
        openai_structured_output=structured,
        openai_timeout_s=120.0,
        max_retries=0,
    )


def synthetic_groups(n: int, seed: int = 0) -> list[Group]:
    """``n`` groups of :data:`GROUP_SIZE` answers to synthetic-task questions, written in the task's
    words and tokenised by the tiny policy's tokenizer (log-probs are placeholders: no policy ran)."""
    rng = random.Random(seed)
    tokenizer = build_tokenizer(list(VOCABULARY))
    groups = []
    for i in range(n):
        scene = Scene(
            rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS)), rng.randint(1, 3)
        )
        kind, question, answer = rng.choice(questions(scene))
        completions = [
            rng.choice(ANSWERS_BY_TYPE[kind]) if rng.random() < 0.7 else " ".join(rng.sample(VOCABULARY, 2))
            for _ in range(GROUP_SIZE)
        ]
        ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        groups.append(
            Group(
                group_id=f"g{i}",
                example_id=f"ex{i}",
                video=f"videos/ex{i}.mp4",
                question=question,
                reference=answer,
                completions=completions,
                completion_ids=ids,
                logprobs=[[-1.0] * len(x) for x in ids],
                weight_version=0,
                question_type=kind,
            )
        )
    return groups


def test_tiny_judge_loads_in_transformers(tmp_path: Path) -> None:
    judge = JudgeRanker(
        RankerConfig(backend="judge", judge_model_path=str(build_tiny_judge(tmp_path / "judge")))
    )
    line = "ranking: 2 > 0 = 3 > 1"
    assert judge.tokenizer.decode(judge.tokenizer(line)["input_ids"]) == line  # byte-level: spells it
    text = judge.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    assert isinstance(judge.generate(build_ranking_prompt("q", "red", ["red", "blue"])), str)


@pytest.mark.slow
def test_structured_output_judge_ranks_groups_for_the_learner(vllm_judge: str) -> None:
    worker = RankerWorker(judge_cfg(vllm_judge, structured=True), group_size=GROUP_SIZE)
    groups = worker.rank_groups(synthetic_groups(16))
    ok = [g for g in groups if g.rank_status == "ok"]
    assert len(ok) >= 15, worker.stats()
    assert any(len(set(g.ranks)) >= 2 for g in ok)  # not every answer an all-tie
    rows, stats = build_rows(groups, Config())
    assert rows and any(row.advantage != 0.0 for row in rows)
    assert len(rows) == GROUP_SIZE * (len(groups) - int(stats["groups_skipped_tied"]))


@pytest.mark.slow
def test_without_structured_output_the_untrained_judge_is_out_of_format(vllm_judge: str) -> None:
    worker = RankerWorker(judge_cfg(vllm_judge, structured=False), group_size=GROUP_SIZE)
    groups = worker.rank_groups(synthetic_groups(4, seed=1))
    assert [g.rank_status for g in groups] == ["fallback_tie"] * 4
    stats = worker.stats()
    assert stats["invalid"] == 4 and stats["fallbacks"] == 4 and stats["errors"] == {"InvalidOrdering": 4}
    rows, _ = build_rows(groups, Config())
    assert rows == []  # all-tied fallbacks carry no signal


@pytest.mark.slow
def test_large_groups_get_the_regex(vllm_judge: str) -> None:
    backend = make_backend(judge_cfg(vllm_judge, structured=True))
    candidates = ["red", "blue", "green", "yellow", "circle", "square", "up", "two"]
    prompt = build_ranking_prompt("what colour is the circle ?", "red", candidates)
    answer = backend.complete(prompt, structured_output_constraint(len(candidates)))
    assert re.fullmatch(ordering_regex(len(candidates)), answer)
