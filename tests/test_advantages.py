"""GRPO_rank advantages: orderings -> ranks, rank methods, score (plain GRPO)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlaif_ray.algo.advantages import (
    advantages_for,
    estimator_takes,
    rank_advantages,
    ranks_from_orderings,
    register_advantage,
    score_advantages,
)
from rlaif_ray.registry import ADVANTAGES

RANK_METHODS = ["dcg", "dcg_std", "linear"]
PROPERTY_SETTINGS = settings(deadline=None, max_examples=100, derandomize=True)


def dcg_gain(r: float) -> float:
    return 1.0 / math.log2(r + 2.0)


# --------------------------------------------------------------------------- strategies


@st.composite
def tiered_ordering(draw: st.DrawFn, group_size: int) -> list:
    """A random ordering of range(group_size) with random ties, tiers as ints or lists/tuples."""
    perm = draw(st.permutations(range(group_size)))
    tie_with_previous = draw(st.lists(st.booleans(), min_size=group_size - 1, max_size=group_size - 1))
    tiers: list[list[int]] = [[perm[0]]]
    for idx, tie in zip(perm[1:], tie_with_previous, strict=True):
        if tie:
            tiers[-1].append(idx)
        else:
            tiers.append([idx])
    out: list = []
    for tier in tiers:
        form = draw(st.sampled_from(["int", "list", "tuple"]))
        if len(tier) == 1 and form == "int":
            out.append(tier[0])
        elif form == "tuple":
            out.append(tuple(tier))
        else:
            out.append(tier)
    return out


@st.composite
def ordering_batch(draw: st.DrawFn, min_g: int = 2, max_g: int = 16) -> tuple[int, list[list]]:
    g = draw(st.integers(min_g, max_g))
    b = draw(st.integers(1, 4))
    return g, [draw(tiered_ordering(g)) for _ in range(b)]


def tier_positions(ordering: list) -> dict[int, list[int]]:
    """Candidate -> list of the positions its tier occupies (an independent way to read ties)."""
    flat: list[tuple[int, int]] = []  # (tier number, candidate)
    for k, tier in enumerate(ordering):
        for c in tier if isinstance(tier, list | tuple) else [tier]:
            flat.append((k, c))
    out: dict[int, list[int]] = {}
    for c_tier, c in flat:
        out[c] = [pos for pos, (k, _) in enumerate(flat) if k == c_tier]
    return out


# --------------------------------------------------------------------------- orderings -> ranks


def test_ranks_from_orderings_example_with_tie() -> None:
    ranks = ranks_from_orderings([[2, [0, 3], 1]], group_size=4)
    assert ranks.shape == (1, 4)
    assert ranks.dtype == torch.float32
    # cand2 first (position 0); cand0, cand3 share positions 1 and 2; cand1 last (position 3).
    assert ranks.tolist() == [[1.5, 3.0, 0.0, 1.5]]


def test_ranks_from_orderings_several_groups_and_forms() -> None:
    orderings = [
        [0, 1, 2],  # strict
        [[0, 1, 2]],  # all tied: every candidate occupies positions 0, 1, 2 -> mean 1
        [(2,), (1, 0)],  # tuples, tie at the bottom: positions 1 and 2 -> 1.5
    ]
    ranks = ranks_from_orderings(orderings, group_size=3, dtype=torch.float64)
    assert ranks.dtype == torch.float64
    assert ranks.tolist() == [[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [1.5, 1.5, 0.0]]


def test_ranks_from_orderings_empty_batch() -> None:
    ranks = ranks_from_orderings([], group_size=5)
    assert ranks.shape == (0, 5)


@PROPERTY_SETTINGS
@given(ordering_batch())
def test_ranks_from_orderings_properties(batch: tuple[int, list[list]]) -> None:
    g, orderings = batch
    ranks = ranks_from_orderings(orderings, group_size=g, dtype=torch.float64)
    assert ranks.shape == (len(orderings), g)
    for row, ordering in zip(ranks.tolist(), orderings, strict=True):
        assert sum(row) == pytest.approx(g * (g - 1) / 2)
        for cand, positions in tier_positions(ordering).items():
            assert row[cand] == pytest.approx(sum(positions) / len(positions))


@pytest.mark.parametrize(
    ("ordering", "what"),
    [
        ([0, 1, 2], "missing"),
        ([0, 1, [1, 2], 3], "duplicate"),
        ([0, 1, 2, 4], "out of range"),
        ([0, 1, 2, -1, 3], "out of range"),
        ([0, [], 1, 2, 3], "empty tier"),
        ([0, True, 2, 3], "bool"),
        ([0, "1", 2, 3], "str"),
        ([0, 1.0, 2, 3], "float"),
        ([0, [1, [2]], 3], "list"),
        ("0123", "str"),
        (7, "int"),
    ],
)
def test_ranks_from_orderings_rejects_invalid(ordering: object, what: str) -> None:
    with pytest.raises(ValueError) as info:
        ranks_from_orderings([[0, 1, 2, 3], ordering], group_size=4)
    message = str(info.value)
    assert repr(ordering) in message
    assert what in message


@pytest.mark.parametrize("group_size", [0, 1, True, 2.0])
def test_ranks_from_orderings_rejects_group_size(group_size: object) -> None:
    with pytest.raises(ValueError, match="group_size"):
        ranks_from_orderings([[0, 1]], group_size=group_size)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- hand-computed methods


def test_dcg_hand_computed() -> None:
    ranks = torch.tensor([[1.5, 3.0, 0.0, 1.5]], dtype=torch.float64)
    gains = [dcg_gain(r) for r in (1.5, 3.0, 0.0, 1.5)]
    mean = sum(gains) / 4
    expected = torch.tensor([[g - mean for g in gains]], dtype=torch.float64)
    torch.testing.assert_close(rank_advantages(ranks, "dcg"), expected)
    # The default method is dcg.
    torch.testing.assert_close(rank_advantages(ranks), expected)


def test_linear_hand_computed() -> None:
    # G = 4: gain (3 - r) / 3 -> [0.5, 0, 1, 0.5], mean 0.5.
    ranks = torch.tensor([[1.5, 3.0, 0.0, 1.5]])
    torch.testing.assert_close(rank_advantages(ranks, "linear"), torch.tensor([[0.0, -0.5, 0.5, 0.0]]))
    # G = 3, strict: gains 1, 0.5, 0 -> centred 0.5, 0, -0.5.
    ranks3 = torch.tensor([[2.0, 0.0, 1.0]])
    torch.testing.assert_close(rank_advantages(ranks3, "linear"), torch.tensor([[-0.5, 0.5, 0.0]]))


def test_dcg_std_and_scale_by_std_hand_computed() -> None:
    ranks = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    gains = [dcg_gain(r) for r in (0.0, 1.0, 2.0)]
    mean = sum(gains) / 3
    centred = [g - mean for g in gains]
    std = math.sqrt(sum(c * c for c in centred) / 3)  # population std
    expected = torch.tensor([[c / (std + 1e-6) for c in centred]], dtype=torch.float64)
    torch.testing.assert_close(rank_advantages(ranks, "dcg_std"), expected)
    torch.testing.assert_close(rank_advantages(ranks, "dcg", scale_by_std=True), expected)
    # dcg_std is already standardised: scale_by_std must not divide a second time.
    torch.testing.assert_close(rank_advantages(ranks, "dcg_std", scale_by_std=True), expected)


def test_integer_ranks_accepted() -> None:
    out = rank_advantages(torch.tensor([[0, 1]]), "linear")
    assert out.is_floating_point()
    torch.testing.assert_close(out, torch.tensor([[0.5, -0.5]]))


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("scale_by_std", [False, True])
@pytest.mark.parametrize("method", RANK_METHODS)
@PROPERTY_SETTINGS
@given(batch=ordering_batch())
def test_rank_method_properties(method: str, scale_by_std: bool, batch: tuple[int, list[list]]) -> None:
    g, orderings = batch
    ranks = ranks_from_orderings(orderings, group_size=g)
    adv = rank_advantages(ranks, method, scale_by_std=scale_by_std)
    assert adv.shape == ranks.shape
    assert torch.isfinite(adv).all()
    # Zero sum per group.
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(len(orderings)), atol=1e-5, rtol=0)
    for r_row, a_row in zip(ranks.tolist(), adv.tolist(), strict=True):
        if len(set(r_row)) == 1:
            assert a_row == [0.0] * g
        for i in range(g):
            for j in range(g):
                if r_row[i] < r_row[j]:
                    assert a_row[i] > a_row[j], (i, j, r_row, a_row)
                elif r_row[i] == r_row[j]:
                    assert a_row[i] == a_row[j], (i, j, r_row, a_row)
        if scale_by_std or method == "dcg_std":
            if len(set(r_row)) > 1:
                std = torch.tensor(a_row, dtype=torch.float64).std(correction=0).item()
                assert std == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("scale_by_std", [False, True])
@pytest.mark.parametrize("method", RANK_METHODS)
@PROPERTY_SETTINGS
@given(batch=ordering_batch(), data=st.data())
def test_rank_method_permutation_equivariant(
    method: str, scale_by_std: bool, batch: tuple[int, list[list]], data: st.DataObject
) -> None:
    g, orderings = batch
    ranks = ranks_from_orderings(orderings, group_size=g)
    perm = torch.tensor(data.draw(st.permutations(range(g))))
    adv = rank_advantages(ranks, method, scale_by_std=scale_by_std)
    adv_of_permuted = rank_advantages(ranks[:, perm], method, scale_by_std=scale_by_std)
    torch.testing.assert_close(adv_of_permuted, adv[:, perm], atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale_by_std", [False, True])
@pytest.mark.parametrize("method", RANK_METHODS)
@pytest.mark.parametrize("g", list(range(2, 17)))
def test_all_tied_group_gives_exact_zeros(method: str, scale_by_std: bool, g: int) -> None:
    ranks = ranks_from_orderings([[list(range(g))], list(range(g))], group_size=g)
    adv = rank_advantages(ranks, method, scale_by_std=scale_by_std)
    assert torch.equal(adv[0], torch.zeros(g))
    assert not torch.equal(adv[1], torch.zeros(g))  # the other group is untouched


@pytest.mark.parametrize("scale_by_std", [False, True])
@pytest.mark.parametrize("method", ["dcg", "dcg_std"])
@PROPERTY_SETTINGS
@given(g=st.integers(3, 16), data=st.data())
def test_dcg_top_step_larger_than_bottom_step(
    method: str, scale_by_std: bool, g: int, data: st.DataObject
) -> None:
    perm = data.draw(st.permutations(range(g)))
    ranks = torch.tensor([perm], dtype=torch.float32)  # candidate i has rank perm[i]
    adv = rank_advantages(ranks, method, scale_by_std=scale_by_std)[0]
    at_rank = {int(r): adv[i].item() for i, r in enumerate(perm)}
    top_step = at_rank[0] - at_rank[1]
    bottom_step = at_rank[g - 2] - at_rank[g - 1]
    assert top_step > bottom_step > 0


@PROPERTY_SETTINGS
@given(g=st.integers(2, 16), data=st.data())
def test_linear_is_evenly_spaced(g: int, data: st.DataObject) -> None:
    perm = data.draw(st.permutations(range(g)))
    adv = rank_advantages(torch.tensor([perm], dtype=torch.float64), "linear")[0]
    at_rank = [adv[perm.index(r)].item() for r in range(g)]
    steps = [at_rank[k] - at_rank[k + 1] for k in range(g - 1)]
    for step in steps:
        assert step == pytest.approx(1.0 / (g - 1))


# --------------------------------------------------------------------------- rank validation


@pytest.mark.parametrize("method", RANK_METHODS)
@pytest.mark.parametrize(
    ("ranks", "match"),
    [
        (torch.tensor([0.0, 1.0]), "2-D"),
        (torch.zeros(2, 2, 2), "2-D"),
        (torch.zeros(3, 1), "G >= 2"),
        (torch.tensor([[-0.5, 1.0]]), r"\[0, G-1\]"),
        (torch.tensor([[0.0, 3.0, 1.0]]), r"\[0, G-1\]"),
        (torch.tensor([[0.0, float("nan")]]), "finite"),
    ],
)
def test_rank_advantages_rejects_bad_ranks(method: str, ranks: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rank_advantages(ranks, method)


def test_unknown_method_lists_known_names() -> None:
    with pytest.raises(ValueError) as info:
        rank_advantages(torch.tensor([[0.0, 1.0]]), "ndcg_nope")
    for name in ("dcg", "dcg_std", "linear", "score", "ndcg_nope"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="algo.advantage = 'nope'.*dcg_std"):
        advantages_for("nope", ranks=torch.tensor([[0.0, 1.0]]))


def test_rank_advantages_refuses_score_method() -> None:
    with pytest.raises(ValueError, match="scores"):
        rank_advantages(torch.tensor([[0.0, 1.0]]), "score")


# --------------------------------------------------------------------------- registry


def test_registry_contents() -> None:
    assert {"dcg", "dcg_std", "linear", "score"} <= set(ADVANTAGES.names())
    assert estimator_takes("score") == "scores"
    assert all(estimator_takes(m) == "ranks" for m in RANK_METHODS)


def test_register_advantage_adds_a_method_and_refuses_duplicates() -> None:
    name = "_test_top1"

    @register_advantage(name)
    def top1(ranks: torch.Tensor) -> torch.Tensor:
        gain = (ranks == 0).to(torch.float32)
        return gain - gain.mean(dim=1, keepdim=True)

    try:
        out = advantages_for(name, ranks=torch.tensor([[1.0, 0.0]]))
        torch.testing.assert_close(out, torch.tensor([[-0.5, 0.5]]))
        with pytest.raises(ValueError, match="already registered"):
            register_advantage(name)(top1)
    finally:
        ADVANTAGES.unregister(name)


# --------------------------------------------------------------------------- scores (plain GRPO)


def test_score_advantages_hand_computed() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0], [5.0, -1.0, 5.0]], dtype=torch.float64)
    expected = []
    for row in scores.tolist():
        mean = sum(row) / len(row)
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / len(row))
        expected.append([(x - mean) / (std + 1e-6) for x in row])
    out = score_advantages(scores)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    # Higher score -> higher advantage, zero sum.
    assert out[0, 2] > out[0, 1] > out[0, 0]
    torch.testing.assert_close(out.sum(dim=1), torch.zeros(2, dtype=torch.float64))


def test_score_advantages_equal_scores_give_exact_zeros() -> None:
    scores = torch.tensor([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [0.0, 1.0, 0.0]])
    out = score_advantages(scores)
    assert torch.equal(out[:2], torch.zeros(2, 3))
    assert out[2, 1] > 0


def test_score_advantages_eps() -> None:
    scores = torch.tensor([[0.0, 2.0]], dtype=torch.float64)  # mean 1, population std 1
    torch.testing.assert_close(
        score_advantages(scores, eps=1.0), torch.tensor([[-0.5, 0.5]], dtype=torch.float64)
    )


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        (torch.tensor([1.0, 2.0]), "2-D"),
        (torch.zeros(2, 1), "G >= 2"),
        (torch.tensor([[1.0, float("inf")]]), "finite"),
    ],
)
def test_score_advantages_rejects_bad_scores(scores: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        score_advantages(scores)


# --------------------------------------------------------------------------- dispatcher


def test_advantages_for_dispatches_by_name() -> None:
    ranks = torch.tensor([[0.0, 2.0, 1.0]])
    scores = torch.tensor([[3.0, 1.0, 2.0]])
    for method in RANK_METHODS:
        torch.testing.assert_close(advantages_for(method, ranks=ranks), rank_advantages(ranks, method))
    torch.testing.assert_close(
        advantages_for("dcg", ranks=ranks, scale_by_std=True), rank_advantages(ranks, "dcg_std")
    )
    torch.testing.assert_close(advantages_for("score", scores=scores), score_advantages(scores))


def test_advantages_for_needs_the_right_input() -> None:
    with pytest.raises(ValueError, match="needs ranks"):
        advantages_for("dcg", scores=torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="needs scores"):
        advantages_for("score", ranks=torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="no advantage estimator is registered"):
        advantages_for("nope", ranks=torch.tensor([[0.0, 1.0]]))
