"""The ranker: ground-truth oracle, strict ordering parser, RankerWorker retries/fallbacks, local judge."""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import Counter

import pytest
import torch

from rlaif_ray.algo.advantages import ranks_from_orderings
from rlaif_ray.answers import is_correct, normalize_answer, part_accuracy, token_f1
from rlaif_ray.config import ConfigError, RankerConfig, load_config
from rlaif_ray.groups import Group
from rlaif_ray.ranker import (
    GroundTruthRanker,
    InvalidOrdering,
    JudgeRanker,
    NoReference,
    Ordering,
    RankerBackend,
    RankerWorker,
    RankPrompt,
    build_ranking_prompt,
    format_ordering,
    make_backend,
    parse_ordering,
)
from rlaif_ray.ranker.worker import _Runners


def make_group(completions: list[str], reference: str | None = "red circle", group_id: str = "g0") -> Group:
    return Group(
        group_id=group_id,
        example_id="ex0",
        video="videos/ex0.mp4",
        question="What shape is moving?",
        reference=reference,
        completions=completions,
        completion_ids=[[1, 2] for _ in completions],
        logprobs=[[-0.5, -0.5] for _ in completions],
        weight_version=0,
    )


def gt_ranks(reference: str, candidates: list[str]) -> list[float]:
    ordering = GroundTruthRanker().rank(RankPrompt("q", reference), candidates)
    return ranks_from_orderings([ordering], len(candidates))[0].tolist()


# --------------------------------------------------------------------------- ground truth


def test_normalize_answer() -> None:
    assert normalize_answer("  The RED, circle!\n") == "the red circle"
    assert normalize_answer("moving_left.") == "moving left"


def test_ground_truth_correct_before_wrong() -> None:
    ranks = gt_ranks("red circle", ["blue square", "Red circle.", "red square", "red circle"])
    assert ranks[1] == ranks[3] == 0.5
    assert min(ranks[0], ranks[2]) > 0.5


def test_ground_truth_closer_wrong_answers_first() -> None:
    reference = "red circle moving left"
    candidates = [
        "green triangle",
        "blue square moving right",
        "red circle moving right",
        "red circle moving left",
    ]
    assert gt_ranks(reference, candidates) == [3.0, 2.0, 1.0, 0.0]


def test_ground_truth_concision_among_equally_close() -> None:
    # Same token F1 (0.5) against "red circle": the shorter answer wins; same for F1 0.
    assert gt_ranks("red circle", ["red circle big huge shiny spinning", "red square"]) == [1.0, 0.0]
    assert gt_ranks("red circle", ["blue square", "blue"]) == [1.0, 0.0]


def test_ground_truth_identical_answers_tie() -> None:
    ordering = GroundTruthRanker().rank(
        RankPrompt("q", "red circle"), ["blue!", "Red circle", "red  circle.", "Blue"]
    )
    assert ordering == [[1, 2], [0, 3]]
    assert gt_ranks("red", ["blue", "blue", "blue"]) == [1.0, 1.0, 1.0]


def test_ground_truth_permutation_equivariant() -> None:
    reference = "red circle moving left"
    candidates = [
        "red circle moving left",
        "red circle",
        "blue square",
        "red circle moving right",
        "left",
        "blue",
    ]
    ranks = gt_ranks(reference, candidates)
    rng = random.Random(0)
    for _ in range(5):
        perm = list(range(len(candidates)))
        rng.shuffle(perm)
        assert gt_ranks(reference, [candidates[i] for i in perm]) == [ranks[i] for i in perm]


def test_ground_truth_scores_and_missing_reference() -> None:
    ranker = GroundTruthRanker()
    assert ranker.scores(RankPrompt("q", "Red circle"), ["red circle!", "red square", "RED CIRCLE"]) == [
        1.0,
        0.0,
        1.0,
    ]
    assert ranker.scores(RankPrompt("q", None), ["a", "b"]) is None
    with pytest.raises(NoReference, match="ranker.backend=video_judge"):
        ranker.rank(RankPrompt("q", None), ["a", "b"])


def test_make_backend_by_name() -> None:
    assert isinstance(make_backend(RankerConfig()), GroundTruthRanker)
    with pytest.raises(ValueError, match="ranker.backend = 'nope': no ranker backend is registered"):
        make_backend(RankerConfig(backend="nope"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- prompt and parser


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ranking: 2 > 0 = 3 > 1", [2, [0, 3], 1]),
        ("RANKING:2>0=3>1", [2, [0, 3], 1]),
        ("  Ranking :\t3 >2>  1 >0  ", [3, 2, 1, 0]),
        ("I compared them carefully.\nranking: 0 = 1 = 2 = 3\n", [[0, 1, 2, 3]]),
    ],
)
def test_parse_ordering_accepts(text: str, expected: Ordering) -> None:
    assert parse_ordering(text, 4) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ranking: 2 > 0 > 1", r"indices \[3\] missing"),
        ("ranking: 2 > 0 = 2 > 1 > 3", "index 2 appears twice"),
        ("ranking: 2 > 0 > 1 > 4", "index 4 out of range 0..3"),
        ("ranking: 2 > 0 > 1 > 3.", r"'3\.' is not a candidate index"),
        ("ranking: 2 > 0 > 1 > 3 because 2 is right", "is not a candidate index"),
        ("ranking: 2 >> 0 > 1 > 3", "empty tier"),
        ("Final ranking: 2 > 0 > 1 > 3", "text before 'ranking:'"),
        ("ranking: 2 > 0 > 1 > 3\nranking: 0 > 1 > 2 > 3", "2 'ranking:' lines"),
        ("The best answer is 2, then 0, 3 and 1.", "no 'ranking:' line"),
        ("", "no 'ranking:' line"),
    ],
)
def test_parse_ordering_rejects(text: str, problem: str) -> None:
    with pytest.raises(InvalidOrdering, match=problem) as info:
        parse_ordering(text, 4)
    assert repr(text)[:40] in str(info.value)  # the message quotes the answer


def test_parse_ordering_truncates_long_answers() -> None:
    text = "no ranking here " * 100
    with pytest.raises(InvalidOrdering) as info:
        parse_ordering(text, 3)
    assert len(str(info.value)) < 300 and "1600 chars" in str(info.value)


def test_format_ordering_round_trip() -> None:
    for ordering in ([2, [0, 3], 1], [[0, 1, 2, 3]], [3, 2, 1, 0]):
        assert parse_ordering(format_ordering(ordering), 4) == ordering
    assert format_ordering([2, [0, 3], 1]) == "ranking: 2 > 0 = 3 > 1"


def test_ranking_prompt_lists_everything_and_its_example_parses() -> None:
    prompt = build_ranking_prompt("What shape\nis moving?", "red circle", ["blue", "red\ncircle", ""])
    assert "Question: What shape is moving?" in prompt
    assert "Reference answer: red circle" in prompt
    assert "[0] blue\n[1] red circle\n[2] (empty answer)" in prompt
    assert parse_ordering(prompt, 3) == [2, [1, 0]]  # its one format line is a valid ordering
    assert "Reference answer" not in build_ranking_prompt("q", None, ["a", "b"])


# --------------------------------------------------------------------------- worker


class ScriptedRanker(RankerBackend):
    """Answers with the scripted judge texts in turn, parsed strictly; the last one repeats."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.calls = 0

    def rank(self, prompt: RankPrompt, candidates: list[str]) -> Ordering:
        text = self.texts[min(self.calls, len(self.texts) - 1)]
        self.calls += 1
        return parse_ordering(text, len(candidates))


class FixedRanker(RankerBackend):
    """Returns the same ordering object every time, valid or not, or raises the given error."""

    def __init__(self, answer: Ordering | Exception) -> None:
        self.answer = answer

    def rank(self, prompt: RankPrompt, candidates: list[str]) -> Ordering:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_worker_retries_nonsense_then_accepts(caplog: pytest.LogCaptureFixture) -> None:
    backend = ScriptedRanker(["I cannot decide.", "ranking: 0 > 1", "ranking: 1 > 0 = 2"])
    worker = RankerWorker(RankerConfig(max_retries=2), group_size=3, backend=backend)
    with caplog.at_level(logging.WARNING, logger="rlaif_ray.ranker.worker"):
        group = worker.rank_group(make_group(["a", "b", "c"], group_id="grp-7"))
    assert group.rank_status == "ok"
    assert group.ranks == [1.5, 0.0, 1.5]
    assert group.rank_attempts == 3 and backend.calls == 3
    assert group.scores is None  # this backend only ranks
    assert group.rank_s > 0
    stats = worker.stats()
    assert stats["groups"] == 1 and stats["ok"] == 1
    assert stats["attempts"] == 3 and stats["retries"] == 2 and stats["invalid"] == 2
    assert stats["fallbacks"] == 0 and stats["dropped"] == 0
    assert stats["errors"] == {"InvalidOrdering": 2}
    assert stats["rank_s"] >= group.rank_s
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("grp-7" in w for w in warnings)
    assert "I cannot decide." in warnings[0] and "indices [2] missing" in warnings[1]


def test_worker_falls_back_to_tie_when_always_nonsense() -> None:
    worker = RankerWorker(RankerConfig(max_retries=2), group_size=4, backend=ScriptedRanker(["best is 2"]))
    group = worker.rank_group(make_group(["a", "b", "c", "d"]))
    assert group.rank_status == "fallback_tie"
    assert group.ranks == [1.5, 1.5, 1.5, 1.5]
    assert group.rank_attempts == 3
    stats = worker.stats()
    assert stats["fallbacks"] == 1 and stats["ok"] == 0 and stats["invalid"] == 3 and stats["retries"] == 2


def test_worker_drops_when_configured() -> None:
    cfg = RankerConfig(max_retries=1, fallback="drop")
    worker = RankerWorker(cfg, group_size=3, backend=ScriptedRanker(["ranking: 0 > 1 > 1"]))
    groups = worker.rank_groups([make_group(["a", "b", "c"], group_id=f"g{i}") for i in range(3)])
    assert [g.rank_status for g in groups] == ["dropped"] * 3
    assert all(g.ranks is None and g.rank_attempts == 2 for g in groups)
    stats = worker.stats()
    assert stats["dropped"] == 3 and stats["fallbacks"] == 3 and stats["fallback_tie"] == 0
    assert stats["attempts"] == 6 and stats["invalid"] == 6 and stats["deadline_expired"] == 0


def test_worker_never_accepts_an_invalid_ordering_object() -> None:
    worker = RankerWorker(RankerConfig(max_retries=1), group_size=3, backend=FixedRanker([0, [0, 2]]))
    group = worker.rank_group(make_group(["a", "b", "c"]))
    assert group.rank_status == "fallback_tie" and group.ranks == [1.0, 1.0, 1.0]
    assert worker.stats()["invalid"] == 2


def test_worker_counts_backend_errors_by_kind() -> None:
    backend = FixedRanker(ConnectionError("judge unreachable"))
    worker = RankerWorker(RankerConfig(max_retries=0), group_size=2, backend=backend)
    group = worker.rank_group(make_group(["a", "b"]))
    assert group.rank_status == "fallback_tie" and group.rank_attempts == 1
    stats = worker.stats()
    assert stats["errors"] == {"ConnectionError": 1} and stats["invalid"] == 0 and stats["retries"] == 0


def test_worker_with_ground_truth_fills_ranks_and_scores() -> None:
    worker = RankerWorker(RankerConfig(), group_size=4)
    groups = worker.rank_groups(
        [
            make_group(["blue", "red circle", "red square", "Red circle!"], group_id="a"),
            make_group(["blue", "red circle", "red", "green"], reference=None, group_id="b"),
        ]
    )
    assert groups[0].rank_status == "ok" and groups[0].rank_attempts == 1
    assert groups[0].ranks == [3.0, 0.5, 2.0, 0.5]
    assert groups[0].scores == [0.0, 1.0, 0.0, 1.0]
    assert groups[0].correct == [0.0, 1.0, 0.0, 1.0]
    # No reference: the ground-truth oracle cannot rank it. It is left unranked (never tied: a tie
    # would pass for a judgement) and counted, without a try at the backend.
    assert groups[1].rank_status == "no_reference" and groups[1].ranks is None
    assert groups[1].scores is None and groups[1].correct is None and groups[1].rank_attempts == 0
    stats = worker.stats()
    assert stats["groups"] == 2 and stats["ok"] == 1 and stats["no_reference"] == 1
    assert stats["fallbacks"] == 0 and stats["errors"] == {}


def test_worker_rejects_groups_of_the_wrong_size() -> None:
    worker = RankerWorker(RankerConfig(), group_size=4)
    with pytest.raises(ValueError, match="has 3 answers; this ranker expects 4"):
        worker.rank_group(make_group(["a", "b", "c"]))


class HangingRanker(RankerBackend):
    """Hangs on groups whose question starts with "hang" until released (then fails), ranks the others
    with the ground-truth rule; counts its calls per question."""

    def __init__(self, concurrency: int = 1) -> None:
        self.concurrency = concurrency
        self.release = threading.Event()
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    def rank(self, prompt: RankPrompt, candidates: list[str]) -> Ordering:
        with self.lock:
            self.calls[prompt.question] += 1
        if prompt.question.startswith("hang"):
            self.release.wait(30)
            raise ConnectionError("the judge hung up")
        return GroundTruthRanker().rank(prompt, candidates)


def wait_for_threads_to_end(prefix: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(t.name.startswith(prefix) for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_deadline_gives_a_hung_group_the_fallback_and_moves_on(caplog: pytest.LogCaptureFixture) -> None:
    backend = HangingRanker()
    worker = RankerWorker(RankerConfig(max_retries=2, group_deadline_s=0.3), group_size=4, backend=backend)
    groups = [make_group(["blue", "red circle", "red", "Red circle"], group_id=f"d{i}") for i in range(3)]
    groups[1].question = "hang: what shape is moving?"
    start = time.perf_counter()
    try:
        with caplog.at_level(logging.WARNING, logger="rlaif_ray.ranker.worker"):
            ranked = worker.rank_groups(groups)
        elapsed = time.perf_counter() - start
    finally:
        backend.release.set()
    assert [g.rank_status for g in ranked] == ["ok", "fallback_tie", "ok"]
    assert ranked[1].ranks == [1.5] * 4 and ranked[1].rank_attempts == 1
    assert ranked[0].ranks == ranked[2].ranks == [3.0, 0.5, 2.0, 0.5]
    assert 0.3 <= ranked[1].rank_s <= elapsed < 10  # the group behind the hung one was not held up for good
    stats = worker.stats()
    assert stats["deadline_expired"] == 1 and stats["fallbacks"] == stats["fallback_tie"] == 1
    assert stats["ok"] == 2 and stats["errors"] == {}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "group d1 passed its deadline of 0.3 s" in messages[0] and "no answer yet" in messages[0]
    # Released, the abandoned call fails; it is not counted and starts no further attempt.
    wait_for_threads_to_end("rank-d1")
    assert backend.calls["hang: what shape is moving?"] == 1
    assert worker.stats()["errors"] == {} and len(caplog.records) == 1


def test_deadline_frees_the_slots_of_a_concurrent_backend() -> None:
    backend = HangingRanker(concurrency=2)
    worker = RankerWorker(RankerConfig(group_deadline_s=0.3), group_size=2, backend=backend)
    groups = [make_group(["red circle", "blue"], group_id=f"c{i}") for i in range(5)]
    for group in groups[:4]:
        group.question = f"hang {group.group_id}"
    try:
        ranked = worker.rank_groups(groups)
    finally:
        backend.release.set()
    assert [g.rank_status for g in ranked] == ["fallback_tie"] * 4 + ["ok"]
    # Two at a time: two waves of hung groups expire before the last group starts.
    waves = sorted(g.rank_s for g in ranked[:4])
    assert waves[0] >= 0.3 and waves[2] >= waves[1] + 0.25  # the second wave started when the first expired
    # The last group starts when a slot of the second wave frees (its expiry is stamped a moment later).
    assert waves[3] - 0.05 <= ranked[4].rank_s < 10
    assert worker.stats()["deadline_expired"] == 4


class SlowNonsense(RankerBackend):
    """Answers out of format after ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def rank(self, prompt: RankPrompt, candidates: list[str]) -> Ordering:
        time.sleep(self.delay_s)
        return parse_ordering("I would rather not say.", len(candidates))


def test_deadline_bounds_the_retries_of_a_slow_invalid_judge(caplog: pytest.LogCaptureFixture) -> None:
    worker = RankerWorker(
        RankerConfig(max_retries=1000, group_deadline_s=0.5, fallback="drop"),
        group_size=3,
        backend=SlowNonsense(0.1),
    )
    with caplog.at_level(logging.WARNING, logger="rlaif_ray.ranker.worker"):
        group = worker.rank_group(make_group(["a", "b", "c"], group_id="slow"))
    assert group.rank_status == "dropped" and group.ranks is None
    assert 2 <= group.rank_attempts <= 7 and 0.5 <= group.rank_s < 5
    stats = worker.stats()
    assert stats["deadline_expired"] == stats["dropped"] == stats["fallbacks"] == 1
    assert stats["invalid"] in (group.rank_attempts - 1, group.rank_attempts)  # the last may be cut off
    assert stats["retries"] == group.rank_attempts - 1
    last = caplog.records[-1].getMessage()
    assert "group slow passed its deadline" in last and "InvalidOrdering: no 'ranking:' line" in last
    assert last.endswith("dropped (ranker.fallback=drop)")
    wait_for_threads_to_end("rank-slow")


class FailsForSomeReferences(RankerBackend):
    """The ground-truth rule, except that it fails for groups whose reference is "unknowable"."""

    def rank(self, prompt: RankPrompt, candidates: list[str]) -> Ordering:
        if prompt.reference == "unknowable":
            raise ValueError("no ordering for this group")
        return GroundTruthRanker().rank(prompt, candidates)


def test_rank_chunk_reports_what_grew_since_the_last_chunk() -> None:
    worker = RankerWorker(RankerConfig(max_retries=1), group_size=3, backend=FailsForSomeReferences())
    first, counts1 = worker.rank_chunk([make_group(["a", "red circle", "b"], group_id="x")])
    second, counts2 = worker.rank_chunk(
        [
            make_group(["a", "b", "c"], reference="unknowable", group_id="y"),
            make_group(["a", "b", "c"], group_id="z"),
        ]
    )
    assert first[0].rank_status == "ok" and [g.rank_status for g in second] == ["fallback_tie", "ok"]
    # x has one right answer of three and it is ranked first: agreement with the label counted
    assert counts1 == {"groups": 1, "ok": 1, "attempts": 1, "top1_checked": 1, "top1_agrees": 1, "errors": {}}
    assert counts2 == {
        "groups": 2,
        "ok": 1,
        "attempts": 3,
        "retries": 1,
        "fallbacks": 1,
        "fallback_tie": 1,
        "errors": {"ValueError": 2},
    }
    stats = worker.stats()
    for key in ("groups", "ok", "attempts", "retries", "fallbacks"):
        assert stats[key] == counts1.get(key, 0) + counts2.get(key, 0)


def test_deadline_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"'ranker.group_deadline_s' = 0.0: expected seconds > 0"):
        load_config(None, ["ranker.group_deadline_s=0"])
    assert load_config(None, ["ranker.group_deadline_s=2.5"]).ranker.group_deadline_s == 2.5


# --------------------------------------------------------------------------- local judge


def build_tiny_judge(folder: str) -> None:
    """A random 1-layer Llama and a word-level tokenizer, written like a real checkpoint folder.

    The vocabulary lacks the word "ranking", so the judge can never produce a valid answer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    words = (
        "you are a strict judge rank the candidate answers to question about video red blue circle".split()
    )
    vocab = {token: i for i, token in enumerate(specials + words + list("0123456789>=:[]().,;'"))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


def test_judge_backend_runs_end_to_end_and_its_garbage_is_rejected(tmp_path) -> None:
    build_tiny_judge(str(tmp_path))
    cfg = RankerConfig(backend="judge", judge_model_path=str(tmp_path), judge_max_new_tokens=8, max_retries=1)
    judge = make_backend(cfg)
    assert isinstance(judge, JudgeRanker)
    prompt = build_ranking_prompt("What shape is moving?", "red circle", ["red circle", "blue", "red"])
    text = judge.generate(prompt)
    assert text == judge.generate(prompt)  # greedy decoding is deterministic
    assert "ranking" not in text.lower()
    with pytest.raises(InvalidOrdering, match="no 'ranking:' line"):
        judge.rank(RankPrompt("What shape is moving?", "red circle"), ["red circle", "blue", "red"])

    worker = RankerWorker(cfg, group_size=3, backend=judge)
    group = worker.rank_group(make_group(["red circle", "blue", "red"]))
    assert group.rank_status == "fallback_tie" and group.ranks == [1.0, 1.0, 1.0]
    assert group.rank_attempts == 2
    stats = worker.stats()
    assert stats["invalid"] == 2 and stats["fallbacks"] == 1 and stats["errors"] == {"InvalidOrdering": 2}


def test_ground_truth_ranks_an_empty_answer_last() -> None:
    """Concision must not reward saying nothing: an empty answer is below every wrong answer."""
    ordering = GroundTruthRanker().rank(
        RankPrompt("what colour ?", "red"), ["", "blue green yellow", "red", "  "]
    )
    assert ordering == [2, 1, [0, 3]]


# --------------------------------------------------------------------------- graded answers


def test_part_accuracy_by_hand() -> None:
    assert part_accuracy("red circle up", "red circle up") == 1.0
    assert part_accuracy("circle up red", "red circle up") == 1.0  # any order
    assert part_accuracy("red circle down", "red circle up") == pytest.approx(2 / 3)
    assert part_accuracy("red", "red circle up") == pytest.approx(1 / 3)
    # Naming every colour costs as much as missing parts: 3 right of 6 words said.
    assert part_accuracy("red blue green circle up left", "red circle up") == pytest.approx(3 / 6)
    assert part_accuracy("red circle up up", "red circle up") == pytest.approx(3 / 4)  # a repeat
    assert part_accuracy("red red", "red") == pytest.approx(1 / 2)
    assert part_accuracy("", "red") == 0.0 and part_accuracy("", "") == 1.0
    assert is_correct("Circle, UP red!", "red circle up") and not is_correct("red red", "red")


def test_ground_truth_orders_graded_answers_by_parts_right() -> None:
    reference = "red circle up"
    candidates = [
        "blue square left",  # 0 parts
        "red circle down",  # 2/3
        "circle up red",  # correct, another order
        "",  # empty: last
        "red",  # 1/3
        "red circle up up",  # 3/4
        "red blue green circle up",  # 3/5
    ]
    ranks = gt_ranks(reference, candidates)
    assert ranks == [5.0, 2.0, 0.0, 6.0, 4.0, 1.0, 3.0]
    assert GroundTruthRanker().scores(RankPrompt("q", reference), candidates) == [
        0.0,
        0.0,
        1.0,
        0.0,
        0.0,
        0.0,
        0.0,
    ]
    parts = GroundTruthRanker(RankerConfig(score="parts")).scores(RankPrompt("q", reference), candidates)
    assert parts == pytest.approx([0.0, 2 / 3, 1.0, 0.0, 1 / 3, 3 / 4, 3 / 5])
    with pytest.raises(ValueError, match="ranker.score"):
        GroundTruthRanker(RankerConfig(score="graded"))  # type: ignore[arg-type]


def test_one_word_references_rank_as_before_graded_answers_existed() -> None:
    """For a one-word reference, ordering by parts right is the old rule: exact match first,
    then token F1, then concision (the default task's figures do not move)."""

    def old_rule(reference: str, candidates: list[str]) -> list[float]:
        keys = [
            (n != reference, not n, -token_f1(n, reference), len(n.split()))
            for n in map(normalize_answer, candidates)
        ]
        ordering: Ordering = []
        for key in sorted(set(keys)):
            tier = [i for i, k in enumerate(keys) if k == key]
            ordering.append(tier[0] if len(tier) == 1 else tier)
        return ranks_from_orderings([ordering], len(candidates))[0].tolist()

    rng = random.Random(0)
    words = ["red", "blue", "circle", "up", "two", ""]
    for _ in range(300):
        candidates = [" ".join(rng.choices(words, k=rng.randint(0, 3))) for _ in range(5)]
        reference = rng.choice(words[:-1])
        assert gt_ranks(reference, candidates) == old_rule(reference, candidates), (reference, candidates)


def test_rank_threads_are_reused_and_a_hung_call_keeps_its_own() -> None:
    """Calls run on daemon threads kept for the next ones; a new thread starts only when every
    thread is busy (here: 3 calls blocked at once), and none is lost when a call raises."""
    runners = _Runners()
    done = queue.SimpleQueue()

    def settle() -> None:  # until every thread is free again (it is once its call has returned)
        deadline = time.monotonic() + 10
        while runners.busy() and time.monotonic() < deadline:
            time.sleep(0.001)

    for i in range(20):  # one after another: one thread serves them all
        runners.run(lambda i=i: done.put(i))
        assert done.get(timeout=10) == i
        settle()
        if i == 10:
            runners.run(lambda: 1 / 0)  # logged; the thread goes on serving
            settle()
    assert runners._threads == 1
    release = threading.Event()
    for _ in range(3):
        runners.run(lambda: (release.wait(10), done.put("blocked")))
    deadline = time.monotonic() + 10
    while runners._threads < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runners._threads == 3 and runners.busy() == 3
    release.set()
    assert [done.get(timeout=10) for _ in range(3)] == ["blocked"] * 3
    settle()
    for i in range(5):
        runners.run(lambda i=i: done.put(i))
        assert done.get(timeout=10) == i
        settle()
    assert runners._threads == 3 and runners.busy() == 0
