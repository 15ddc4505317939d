"""Answer matching: when a sampled answer counts as the reference's, and how much of it does.

At the bottom of the package (no model, no network client): evaluation, the rollout actors'
sampled accuracy, the ground-truth ranker and the data tools all compare answers with these.
"""

from __future__ import annotations

import re
from collections import Counter

_NON_WORD = re.compile(r"[^\w\s]|_")


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation replaced by spaces, runs of whitespace collapsed to one space."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def token_f1(prediction: str, reference: str) -> float:
    """Token-overlap F1 of two normalised texts (1.0 when both are empty)."""
    pred, ref = prediction.split(), reference.split()
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def part_accuracy(prediction: str, reference: str) -> float:
    """The fraction of parts right, in any order, of two normalised texts (1.0 when both are empty).

    The parts are the words. With ``P`` and ``R`` the multisets of the prediction's and the
    reference's words, ``part_accuracy = |P ∩ R| / max(|P|, |R|)``: the parts of the reference
    that the prediction names, over the longer of the two, so that naming extra parts (e.g. every
    colour at once) costs as much as missing one. It is 1.0 exactly when ``P == R`` (the same
    words in any order: "red circle up" for "circle up red") and, for a one-word reference,
    1 / (number of words) when the prediction contains the word, else 0.
    """
    pred, ref = prediction.split(), reference.split()
    if not pred or not ref:
        return float(pred == ref)
    return sum((Counter(pred) & Counter(ref)).values()) / max(len(pred), len(ref))


def is_correct(prediction: str, reference: str) -> bool:
    """Exact match of two answers up to normalisation and the order of their parts."""
    return part_accuracy(normalize_answer(prediction), normalize_answer(reference)) == 1.0
