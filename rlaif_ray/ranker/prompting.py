"""The listwise judge prompt, and the strict parser for the judge's answer.

An *ordering* lists the candidates of a group best first, as tiers: a tier is one candidate
index or a list of tied indices, e.g. ``[2, [0, 3], 1]``. In text the same ordering is the
line ``ranking: 2 > 0 = 3 > 1`` (``>`` separates tiers, ``=`` joins tied candidates, indices
count from 0). The judge must answer with exactly one such line; anything else is rejected
with :class:`InvalidOrdering` so that the caller can ask again or fall back. The answer is read
with string operations and ``int`` of ASCII digits only: nothing in it is ever evaluated.

For servers that constrain decoding (vLLM's structured outputs), :func:`structured_output_constraint`
describes the answer format: every valid line as a ``choice`` for small groups
(:func:`ordering_lines`), else a ``regex`` (:func:`ordering_regex`).
"""

from __future__ import annotations

import functools
import itertools
import re

Tier = int | list[int]
Ordering = list[Tier]

_RANKING_LINE = re.compile(r"^\s*ranking\s*:(?P<body>.*)$", re.IGNORECASE)
_RANKING_ANYWHERE = re.compile(r"ranking\s*:", re.IGNORECASE)
_INDEX = re.compile(r"[0-9]+")
_QUOTE_CHARS = 200
# Up to this group size the structured-output constraint lists every valid line (4683 for 6);
# above it, a regex that admits the format with indices in range.
MAX_CHOICE_GROUP_SIZE = 6


class InvalidOrdering(ValueError):
    """A judge answer that is not exactly one valid ordering of the group's candidates."""


def _quote(text: str) -> str:
    """``text`` as a repr, cut to a readable length for error messages and logs."""
    if len(text) > _QUOTE_CHARS:
        return repr(text[:_QUOTE_CHARS]) + f"... ({len(text)} chars)"
    return repr(text)


def _example_ordering(group_size: int) -> Ordering:
    """A format example for ``group_size`` candidates: reversed order, the last two tied."""
    indices = list(range(group_size - 1, -1, -1))
    return [*indices[:-2], indices[-2:]]


def build_ranking_prompt(question: str, reference: str | None, candidates: list[str]) -> str:
    """The listwise prompt: question, reference (when known), all candidates numbered from 0,
    the ranking criteria and the exact answer format."""
    if len(candidates) < 2:
        raise ValueError(f"a ranking prompt needs at least 2 candidates, got {len(candidates)}")
    n = len(candidates)
    lines = [
        "You are a strict judge. Rank the candidate answers to a question about a video.",
        "",
        f"Question: {' '.join(question.split())}",
    ]
    if reference is not None:
        lines.append(f"Reference answer: {' '.join(reference.split())}")
    lines += ["", "Candidate answers:"]
    for i, candidate in enumerate(candidates):
        lines.append(f"[{i}] {' '.join(candidate.split()) or '(empty answer)'}")
    criteria = (
        "A better answer is correct (agrees with the reference answer), then closer to it, then more concise."
        if reference is not None
        else "A better answer is correct, then more complete and precise, then more concise."
    )
    lines += [
        "",
        f"Rank all {n} candidates from best to worst. {criteria}",
        "Reply with a single line in this format (an example of the format, not the answer):",
        format_ordering(_example_ordering(n)),
        f"Use each index 0 to {n - 1} exactly once; '>' means better than, '=' means equally good. "
        "Write nothing else on that line.",
    ]
    return "\n".join(lines)


def format_ordering(ordering: Ordering) -> str:
    """The text form of an ordering: ``[2, [0, 3], 1]`` -> ``'ranking: 2 > 0 = 3 > 1'``."""
    tiers = [" = ".join(str(i) for i in tier) if isinstance(tier, list) else str(tier) for tier in ordering]
    return "ranking: " + " > ".join(tiers)


def parse_ordering(text: str, group_size: int) -> Ordering:
    """Parse a judge answer strictly into an ordering of ``group_size`` candidates.

    The text may hold other lines (e.g. reasoning), but exactly one line must mention
    ``ranking:``; that line must start with it (case-insensitive) and hold nothing but the
    indices 0..group_size-1, each exactly once, separated by ``>`` and ``=``. Single
    candidates come back as ints and ties as lists. Raises :class:`InvalidOrdering` quoting
    the text and saying what is wrong.
    """
    candidates = [line for line in text.splitlines() if _RANKING_ANYWHERE.search(line)]
    if not candidates:
        raise InvalidOrdering(f"no 'ranking:' line in judge answer {_quote(text)}")
    if len(candidates) > 1:
        raise InvalidOrdering(
            f"{len(candidates)} 'ranking:' lines (expected exactly one) in judge answer {_quote(text)}"
        )
    line = candidates[0]
    match = _RANKING_LINE.match(line)
    if match is None:
        raise InvalidOrdering(
            f"text before 'ranking:' on the ranking line {_quote(line)} of judge answer {_quote(text)}"
        )
    ordering: Ordering = []
    seen: set[int] = set()
    for tier_text in match["body"].split(">"):
        tier: list[int] = []
        for token in tier_text.split("="):
            token = token.strip()
            if not _INDEX.fullmatch(token):
                what = "an empty tier or tie" if not token else f"{_quote(token)} is not a candidate index"
                raise InvalidOrdering(f"{what} in ranking line {_quote(line)} of judge answer {_quote(text)}")
            # Compared as text first: int() of thousands of digits is slow, then refused.
            if len(token.lstrip("0")) > len(str(group_size)) or int(token) >= group_size:
                raise InvalidOrdering(
                    f"index {token if len(token) <= 10 else token[:10] + '...'} out of range "
                    f"0..{group_size - 1} in judge answer {_quote(text)}"
                )
            index = int(token)
            if index in seen:
                raise InvalidOrdering(f"index {index} appears twice in judge answer {_quote(text)}")
            seen.add(index)
            tier.append(index)
        ordering.append(tier[0] if len(tier) == 1 else tier)
    missing = sorted(set(range(group_size)) - seen)
    if missing:
        raise InvalidOrdering(
            f"indices {missing} missing (each of 0..{group_size - 1} must appear once) in judge answer {_quote(text)}"
        )
    return ordering


def _ordered_partitions(indices: tuple[int, ...]) -> list[Ordering]:
    """Every ordering of ``indices`` as tiers, best first, indices ascending within a tier."""
    if not indices:
        return [[]]
    orderings: list[Ordering] = []
    for size in range(1, len(indices) + 1):
        for first in itertools.combinations(indices, size):
            rest = tuple(i for i in indices if i not in first)
            tier: Tier = first[0] if size == 1 else list(first)
            orderings += [[tier, *tail] for tail in _ordered_partitions(rest)]
    return orderings


@functools.cache
def ordering_lines(group_size: int) -> tuple[str, ...]:
    """Every valid ordering line of ``group_size`` candidates, once each, in canonical form.

    Canonical: tiers best first, the indices of a tie ascending, spaced as :func:`format_ordering`
    writes them. Their number is the Fubini number of ``group_size`` (3, 13, 75, 541, 4683 for
    2..6), so this is meant for small groups only.
    """
    if group_size < 2:
        raise ValueError(f"an ordering needs at least 2 candidates, got {group_size}")
    return tuple(format_ordering(o) for o in _ordered_partitions(tuple(range(group_size))))


def ordering_regex(group_size: int) -> str:
    """A regex for the ordering format of ``group_size`` candidates: ``ranking: `` then exactly
    ``group_size`` indices in range, joined by `` > `` or `` = ``.

    It cannot forbid a repeated index (with exactly ``group_size`` indices, one then is missing):
    :func:`parse_ordering` rejects such answers. Plain groups and alternations only, so that
    grammar engines (xgrammar, outlines, llguidance) and Python's ``re`` read it alike.
    """
    if group_size < 2:
        raise ValueError(f"an ordering needs at least 2 candidates, got {group_size}")
    index = "(" + "|".join(str(i) for i in range(group_size)) + ")"
    return f"ranking: {index}( (>|=) {index}){{{group_size - 1}}}"


def structured_output_constraint(group_size: int) -> dict[str, list[str] | str]:
    """The structured-output constraint that admits only ordering lines of ``group_size`` candidates:
    ``{"choice": [...every valid line...]}`` up to :data:`MAX_CHOICE_GROUP_SIZE`, else
    ``{"regex": ordering_regex(group_size)}`` (vLLM's ``structured_outputs`` request field)."""
    if group_size <= MAX_CHOICE_GROUP_SIZE:
        return {"choice": list(ordering_lines(group_size))}
    return {"regex": ordering_regex(group_size)}
