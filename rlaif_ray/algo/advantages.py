"""Rank-aware advantages for GRPO_rank (pure torch, no Ray, no I/O).

A group is the G answers sampled for one prompt. The ranker returns an *ordering* of
the group, best first, ties allowed; :func:`ranks_from_orderings` turns orderings into
0-based ranks (0 = best, tied answers share the mean of the positions they occupy), and
:func:`rank_advantages` maps ranks to zero-sum advantages with a named, registered
method. ``score`` is plain GRPO on scalar scores, for an oracle that scores instead of
ranking.

Every rank method keeps these properties, for any group size G >= 2:

* zero sum per group;
* a strictly better (lower) rank gives a strictly higher advantage;
* equal ranks give equal advantages, and an all-tied group gives exact zeros;
* permuting the group permutes the advantages the same way.

Advantages are computed in float64 and returned in the input's floating dtype (or the
default dtype for integer input).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from rlaif_ray.registry import ADVANTAGES

__all__ = [
    "STD_EPS",
    "advantages_for",
    "dcg_advantages",
    "dcg_std_advantages",
    "estimator_takes",
    "linear_advantages",
    "rank_advantages",
    "ranks_from_orderings",
    "register_advantage",
    "score_advantages",
]

STD_EPS = 1e-6
"""Added to the group std before dividing, so that a zero-spread group stays finite."""

AdvantageFn = Callable[[torch.Tensor], torch.Tensor]
InputKind = Literal["ranks", "scores"]


def register_advantage(
    name: str, *, takes: InputKind = "ranks", standardised: bool = False
) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register an advantage estimator under ``name`` (in :data:`rlaif_ray.registry.ADVANTAGES`).

    The function maps a [B, G] tensor to [B, G] advantages. ``takes`` says whether it consumes
    ranks (0 = best; the ranker's orderings) or scores (higher = better; the oracle's scalar
    scores, which the learner then needs on every group). ``standardised`` marks estimators
    whose output is already divided by the group std, so that ``scale_by_std`` does not divide
    twice.
    """
    if takes not in ("ranks", "scores"):
        raise ValueError(f"takes must be 'ranks' or 'scores', got {takes!r}")
    return ADVANTAGES.register(name, takes=takes, standardised=standardised)


def estimator_takes(name: str) -> InputKind:
    """What the estimator registered as ``name`` consumes: ``"ranks"`` or ``"scores"``."""
    return ADVANTAGES.traits(name)["takes"]


# --------------------------------------------------------------------------- orderings


def _tier_members(tier: object) -> list[object]:
    if isinstance(tier, list | tuple):
        return list(tier)
    return [tier]


def _check_index(item: object) -> str | None:
    """Return why ``item`` is not a valid candidate index, or None if it is one."""
    if isinstance(item, bool) or not isinstance(item, numbers.Integral):
        return f"entries must be ints or lists/tuples of ints, got {type(item).__name__} {item!r}"
    return None


def _ordering_ranks(ordering: object, group_size: int) -> list[float]:
    """Ranks of one ordering, or ValueError naming what is wrong with it."""

    def bad(reason: str) -> ValueError:
        return ValueError(f"invalid ordering {ordering!r} for a group of {group_size}: {reason}")

    if not isinstance(ordering, list | tuple):
        raise bad(f"an ordering must be a list or tuple of tiers, got {type(ordering).__name__}")
    ranks: list[float | None] = [None] * group_size
    position = 0
    for tier in ordering:
        members = _tier_members(tier)
        if not members:
            raise bad("empty tier")
        for item in members:
            why = _check_index(item)
            if why is not None:
                raise bad(why)
        # Tied members occupy positions position .. position + n - 1; each gets their mean.
        shared = position + (len(members) - 1) / 2.0
        for item in members:
            idx = int(item)  # type: ignore[call-overload]
            if not 0 <= idx < group_size:
                raise bad(f"index {idx} out of range 0..{group_size - 1}")
            if ranks[idx] is not None:
                raise bad(f"duplicate index {idx}")
            ranks[idx] = shared
        position += len(members)
    missing = [i for i, r in enumerate(ranks) if r is None]
    if missing:
        raise bad(f"missing indices {missing}")
    return [float(r) for r in ranks]  # type: ignore[arg-type]


def ranks_from_orderings(
    orderings: Sequence[Sequence[int | Sequence[int]]],
    group_size: int,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Turn B orderings of groups of ``group_size`` into ranks [B, G].

    An ordering lists tiers best first; a tier is a candidate index or a list/tuple of
    indices tied at that position. Each index 0..G-1 must appear exactly once. A tier of
    n items starting at position p gives each of them rank ``p + (n - 1) / 2``, the mean
    of the positions p..p+n-1 it occupies; e.g. for G = 4, ``[2, [0, 3], 1]`` gives ranks
    ``[1.5, 3, 0, 1.5]``. Ranks of a group always sum to G (G - 1) / 2.

    Raises ValueError (showing the ordering) for a missing, duplicate or out-of-range
    index, an empty tier, or an entry that is not an int (bools, strings and floats are
    refused), and for ``group_size < 2``. B = 0 gives an empty [0, G] tensor.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if isinstance(orderings, str | bytes) or not isinstance(orderings, Sequence):
        raise ValueError(f"orderings must be a sequence of orderings, got {orderings!r}")
    group_size = int(group_size)
    rows = [_ordering_ranks(ordering, group_size) for ordering in orderings]
    if not rows:
        return torch.zeros(0, group_size, dtype=dtype)
    return torch.tensor(rows, dtype=dtype)


# --------------------------------------------------------------------------- helpers


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _check_group_tensor(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{what} must be 2-D [B, G], got shape {tuple(x.shape)}")
    if x.shape[1] < 2:
        raise ValueError(f"{what} must have group size G >= 2, got shape {tuple(x.shape)}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{what} must be finite")


def _check_ranks(ranks: torch.Tensor) -> None:
    _check_group_tensor(ranks, "ranks")
    g = ranks.shape[1]
    if ranks.numel() and (ranks.min() < 0 or ranks.max() > g - 1):
        raise ValueError(
            f"ranks must lie in [0, G-1] = [0, {g - 1}], got values in "
            f"[{ranks.min().item()}, {ranks.max().item()}]"
        )


def _tied_groups(x: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1]: True where every member of the group has the same value."""
    if x.shape[0] == 0:
        return torch.zeros(0, 1, dtype=torch.bool, device=x.device)
    return (x.amax(dim=1, keepdim=True) == x.amin(dim=1, keepdim=True)).to(x.device)


def _centre(gain: torch.Tensor, tied: torch.Tensor) -> torch.Tensor:
    """``gain - mean(gain)`` per group, with exact zeros for all-tied groups.

    Rounding can make ``x - mean([x, x, x])`` a tiny non-zero; tied groups are zeroed.
    """
    centred = gain - gain.mean(dim=1, keepdim=True)
    return torch.where(tied, torch.zeros_like(centred), centred)


def _std_scale(adv: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """``adv / (std(adv) + eps)`` per group, population std (correction 0); zeros stay zeros."""
    std = adv.std(dim=1, keepdim=True, correction=0)
    return adv / (std + eps)


# --------------------------------------------------------------------------- rank methods


def _dcg_gain(ranks: torch.Tensor) -> torch.Tensor:
    """DCG discount as a gain: ``g(r) = 1 / log2(r + 2)``; g(0) = 1, decreasing and convex."""
    return 1.0 / torch.log2(ranks + 2.0)


@register_advantage("dcg")
def dcg_advantages(ranks: torch.Tensor) -> torch.Tensor:
    """DCG advantages: ``A_i = g(r_i) - mean_j g(r_j)`` with ``g(r) = 1 / log2(r + 2)``.

    Because g is convex and decreasing, a swap near the top of the ranking moves the
    advantage more than one near the bottom (g(0) - g(1) > g(G-2) - g(G-1)).
    """
    _check_ranks(ranks)
    r = ranks.to(torch.float64)
    return _centre(_dcg_gain(r), _tied_groups(r)).to(_out_dtype(ranks))


@register_advantage("dcg_std", standardised=True)
def dcg_std_advantages(ranks: torch.Tensor) -> torch.Tensor:
    """DCG advantages divided by the group std: ``A_i / (std_j A_j + eps)`` (population std)."""
    _check_ranks(ranks)
    r = ranks.to(torch.float64)
    adv = _centre(_dcg_gain(r), _tied_groups(r))
    return _std_scale(adv).to(_out_dtype(ranks))


@register_advantage("linear")
def linear_advantages(ranks: torch.Tensor) -> torch.Tensor:
    """Evenly spaced ladder: ``g(r) = (G - 1 - r) / (G - 1)`` (1 for the best, 0 for the worst), centred.

    ``A_i = g(r_i) - mean_j g(r_j)``; every step of one rank is worth ``1 / (G - 1)``.
    """
    _check_ranks(ranks)
    r = ranks.to(torch.float64)
    g = ranks.shape[1]
    gain = (g - 1 - r) / (g - 1)
    return _centre(gain, _tied_groups(r)).to(_out_dtype(ranks))


def rank_advantages(ranks: torch.Tensor, method: str = "dcg", scale_by_std: bool = False) -> torch.Tensor:
    """Advantages [B, G] from ranks [B, G] (0 = best, fractional for ties) with a named rank method.

    ``scale_by_std`` divides each group by its population std plus ``STD_EPS``
    (``A_i / (std_j A_j + eps)``); an all-tied group stays exactly zero. Methods already
    divided by the std (``dcg_std``) are not divided twice. Raises ValueError for an
    unknown or score-based method, or ranks that are not 2-D, have G < 2, or lie
    outside [0, G-1].
    """
    fn = ADVANTAGES.get(method)
    if estimator_takes(method) != "ranks":
        raise ValueError(
            f"advantage method {method!r} takes scores, not ranks; use score_advantages "
            f"or advantages_for({method!r}, scores=...)"
        )
    adv = fn(ranks)
    if scale_by_std and not ADVANTAGES.traits(method)["standardised"]:
        adv = _std_scale(adv.to(torch.float64)).to(adv.dtype)
    return adv


# --------------------------------------------------------------------------- scores


def score_advantages(scores: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """Plain GRPO advantages from scores [B, G] (higher = better).

    ``A_i = (R_i - mean_j R_j) / (std_j R_j + eps)`` with the population std
    (correction 0); a group of equal scores gives exact zeros.
    """
    _check_group_tensor(scores, "scores")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    s = scores.to(torch.float64)
    adv = _centre(s, _tied_groups(s))
    std = s.std(dim=1, keepdim=True, correction=0)
    adv = adv / (std + eps)
    return adv.to(_out_dtype(scores))


register_advantage("score", takes="scores", standardised=True)(score_advantages)


def advantages_for(
    method: str,
    *,
    ranks: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    scale_by_std: bool = False,
) -> torch.Tensor:
    """The one entry point the config calls by name: ``method`` registered in
    :data:`rlaif_ray.registry.ADVANTAGES`.

    Estimators that take ranks (``dcg``, ``dcg_std``, ``linear``) need ``ranks``; those that take
    scores (``score``) need ``scores``. ValueError when the needed input is missing or the method
    is unknown.
    """
    if estimator_takes(method) == "ranks":
        if ranks is None:
            raise ValueError(f"advantage method {method!r} needs ranks=..., got none")
        return rank_advantages(ranks, method=method, scale_by_std=scale_by_std)
    if scores is None:
        raise ValueError(f"advantage method {method!r} needs scores=..., got none")
    return ADVANTAGES.get(method)(scores)
