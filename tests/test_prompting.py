"""The structured-output description of the ordering format: every valid line, and the regex."""

from __future__ import annotations

import math
import re

import pytest

from rlaif_ray.algo.advantages import ranks_from_orderings
from rlaif_ray.ranker.prompting import (
    MAX_CHOICE_GROUP_SIZE,
    InvalidOrdering,
    format_ordering,
    ordering_lines,
    ordering_regex,
    parse_ordering,
    structured_output_constraint,
)


def fubini(n: int) -> int:
    """The number of weak orderings of n items: a(n) = sum_k C(n, k) a(n - k), a(0) = 1."""
    a = [1]
    for m in range(1, n + 1):
        a.append(sum(math.comb(m, k) * a[m - k] for k in range(1, m + 1)))
    return a[n]


@pytest.mark.parametrize("group_size", [2, 3, 4, 5, 6])
def test_ordering_lines_are_every_ordering_once_in_canonical_form(group_size: int) -> None:
    lines = ordering_lines(group_size)
    assert len(lines) == fubini(group_size) == [3, 13, 75, 541, 4683][group_size - 2]
    assert len(set(lines)) == len(lines)
    rank_vectors = set()
    for line in lines:
        ordering = parse_ordering(line, group_size)
        assert format_ordering(ordering) == line  # canonical spacing
        assert all(tier == sorted(tier) for tier in ordering if isinstance(tier, list))  # ties ascending
        rank_vectors.add(tuple(ranks_from_orderings([ordering], group_size)[0].tolist()))
    # As many different rankings as there are weak orderings: the list misses none.
    assert len(rank_vectors) == len(lines)


def test_ordering_lines_small_case() -> None:
    assert set(ordering_lines(2)) == {"ranking: 0 > 1", "ranking: 1 > 0", "ranking: 0 = 1"}
    with pytest.raises(ValueError):
        ordering_lines(1)


@pytest.mark.parametrize("group_size", [2, 3, 4, 5])
def test_ordering_regex_admits_every_valid_line(group_size: int) -> None:
    pattern = re.compile(ordering_regex(group_size))
    assert all(pattern.fullmatch(line) for line in ordering_lines(group_size))


@pytest.mark.parametrize(
    "text",
    [
        "ranking: 0 > 1 > 2 > 4",  # index out of range
        "ranking: 0 > 1 > 2",  # too few indices
        "ranking: 0 > 1 > 2 > 3 > 0",  # too many
        "ranking: 0 >> 1 > 2 > 3",
        "ranking: 0, 1, 2, 3",
        "ranking:0>1>2>3",  # the canonical spacing only
        "Ranking: 0 > 1 > 2 > 3",
        "ranking: 0 > 1 > 2 > 3.",
        "I think ranking: 0 > 1 > 2 > 3",
        "ranking: 00 > 1 > 2 > 3",
    ],
)
def test_ordering_regex_rejects_other_text(text: str) -> None:
    assert re.fullmatch(ordering_regex(4), text) is None


def test_ordering_regex_two_digit_indices_and_duplicates() -> None:
    pattern = re.compile(ordering_regex(12))
    valid = "ranking: 11 > 10 = 9 > 8 > 7 > 6 > 5 > 4 > 3 > 2 > 1 > 0"
    assert pattern.fullmatch(valid) and parse_ordering(valid, 12)[:2] == [11, [10, 9]]
    assert pattern.fullmatch(valid.replace("11", "12")) is None
    # A repeated index fits the regex; the strict parser rejects it (and the worker retries).
    duplicate = "ranking: 5 > 5 > 5 > 5 > 5 > 5 > 5 > 5 > 5 > 5 > 5 > 5"
    assert pattern.fullmatch(duplicate)
    with pytest.raises(InvalidOrdering, match="appears twice"):
        parse_ordering(duplicate, 12)


def test_structured_output_constraint_choice_then_regex() -> None:
    assert structured_output_constraint(4) == {"choice": list(ordering_lines(4))}
    assert len(structured_output_constraint(MAX_CHOICE_GROUP_SIZE)["choice"]) == fubini(MAX_CHOICE_GROUP_SIZE)
    assert structured_output_constraint(MAX_CHOICE_GROUP_SIZE + 1) == {
        "regex": ordering_regex(MAX_CHOICE_GROUP_SIZE + 1)
    }


def test_parser_refuses_huge_and_padded_indices_quickly() -> None:
    """An index of thousands of digits is refused as out of range, not handed to int() (which would
    raise a plain ValueError past 4300 digits); leading zeros still read as the index they pad."""
    huge = "ranking: " + "9" * 100_000 + " > 0 > 1 > 2"
    with pytest.raises(InvalidOrdering, match=r"index 9999999999\.\.\. out of range 0\.\.3") as info:
        parse_ordering(huge, 4)
    assert len(str(info.value)) < 400
    with pytest.raises(InvalidOrdering, match="index 0000000004 out of range"):
        parse_ordering("ranking: 0000000004 > 0 > 1 > 2", 4)
    assert parse_ordering("ranking: 003 > 0 > 1 > 2", 4) == [3, 0, 1, 2]
    assert parse_ordering("ranking: 11 > " + " > ".join(str(i) for i in range(11)), 12)[0] == 11
