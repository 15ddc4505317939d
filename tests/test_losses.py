"""GRPO_rank loss: clipped surrogate, KL estimators, entropy bonus and aggregations, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlaif_ray.algo.losses import aggregate, grpo_loss, kl_penalty, loss_denominator
from rlaif_ray.registry import AGGREGATIONS, KL_ESTIMATORS

LN2 = math.log(2.0)


def close(actual: torch.Tensor | float, expected: float | list, atol: float = 1e-6) -> None:
    actual_t = actual if isinstance(actual, torch.Tensor) else torch.tensor(actual)
    torch.testing.assert_close(
        actual_t.to(torch.float64), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0
    )


def from_ratios(ratios: list[list[float]], old: float = math.log(0.5)) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs requiring grad, old_logprobs) such that exp(logprobs - old) equals ``ratios``."""
    old_t = torch.full((len(ratios), len(ratios[0])), old, dtype=torch.float64)
    logp = (old_t + torch.tensor(ratios, dtype=torch.float64).log()).requires_grad_(True)
    return logp, old_t


# The clipping example used by several tests (eps_low = eps_high = 0.2):
#   row 0, A = +2, ratios 1.5 (clipped: min(3.0, 2.4) = 2.4), 0.5 (unclipped: min(1.0, 1.6) = 1.0),
#                         1.1 (inside the range: 2.2)
#   row 1, A = -1, ratios 1.5 (unclipped: min(-1.5, -1.2) = -1.5), 0.5 (clipped: min(-0.5, -0.8) = -0.8),
#                         3.0 (padding)
RATIOS = [[1.5, 0.5, 1.1], [1.5, 0.5, 3.0]]
ADV = [2.0, -1.0]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
PG = [[-2.4, -1.0, -2.2], [1.5, 0.8]]  # per-token -min(...) on real tokens
# d pg / d logp = -A * ratio where unclipped, 0 where clipped.
PG_GRAD = [[0.0, -2.0 * 0.5, -2.0 * 1.1], [1.0 * 1.5, 0.0, 0.0]]


def clipping_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logp, old = from_ratios(RATIOS)
    return logp, old, torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64)


# --------------------------------------------------------------------------- surrogate and clipping


def test_clipped_surrogate_token_mean_values_and_gradients() -> None:
    logp, old, adv, mask = clipping_case()
    loss, stats = grpo_loss(logp, old, None, adv, mask)
    n = 5  # real tokens
    expected = (sum(PG[0]) + sum(PG[1])) / n
    close(loss, expected)
    loss.backward()
    close(logp.grad, [[g / n for g in row] for row in PG_GRAD])
    # Clipped in the direction of the advantage -> zero gradient; padding -> zero gradient.
    assert logp.grad[0, 0] == 0 and logp.grad[1, 1] == 0 and logp.grad[1, 2] == 0
    # Gradient sign follows the advantage on unclipped tokens: A > 0 -> negative, A < 0 -> positive.
    assert logp.grad[0, 1] < 0 and logp.grad[0, 2] < 0 and logp.grad[1, 0] > 0

    assert stats["loss"] == pytest.approx(expected)
    assert stats["pg_loss"] == pytest.approx(expected)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1 + 1.5 + 0.5) / 5)
    assert stats["ratio_max"] == pytest.approx(1.5)  # the padded 3.0 does not count
    assert "kl" not in stats and "entropy" not in stats
    assert all(isinstance(v, float) for v in stats.values())


def test_clipped_surrogate_seq_mean_token_mean_values_and_gradients() -> None:
    logp, old, adv, mask = clipping_case()
    loss, stats = grpo_loss(logp, old, None, adv, mask, aggregation="seq_mean_token_mean")
    lengths = [3, 2]
    expected = (sum(PG[0]) / 3 + sum(PG[1]) / 2) / 2
    close(loss, expected)
    loss.backward()
    close(logp.grad, [[g / (lengths[b] * 2) for g in row] for b, row in enumerate(PG_GRAD)])
    assert stats["pg_loss"] == pytest.approx(expected)


def test_asymmetric_clip_range() -> None:
    # A > 0, ratio 1.25: clipped when eps_high = 0.2, not when eps_high = 0.3 (clip-higher).
    for eps_high, clipped in ((0.2, True), (0.3, False)):
        logp, old = from_ratios([[1.25]])
        loss, stats = grpo_loss(
            logp, old, None, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 1), eps_high=eps_high
        )
        loss.backward()
        if clipped:
            close(loss, -1.2)
            assert logp.grad.item() == 0.0
            assert stats["clip_frac"] == 1.0
        else:
            close(loss, -1.25)
            close(logp.grad, [[-1.25]])
            assert stats["clip_frac"] == 0.0
    # A < 0, ratio 0.75: clipped by eps_low = 0.2 (0.8 > 0.75), free with eps_low = 0.3.
    for eps_low, clipped in ((0.2, True), (0.3, False)):
        logp, old = from_ratios([[0.75]])
        loss, _ = grpo_loss(
            logp, old, None, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 1), eps_low=eps_low
        )
        loss.backward()
        close(loss, 0.8 if clipped else 0.75)
        close(logp.grad, [[0.0 if clipped else 0.75]])


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_on_policy_loss_is_minus_weighted_mean_advantage(aggregation: str) -> None:
    logp = torch.full((2, 3), -1.3, dtype=torch.float64, requires_grad=True)
    old = logp.detach().clone()  # ratio = 1
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor(MASK, dtype=torch.float64)
    loss, stats = grpo_loss(logp, old, None, adv, mask, aggregation=aggregation)
    if aggregation == "token_mean":
        expected = -(3 * 2.0 + 2 * -1.0) / 5  # each token weighs the same
    else:
        expected = -(2.0 + -1.0) / 2  # each sequence weighs the same
    close(loss, expected)
    assert stats["clip_frac"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["ratio_max"] == pytest.approx(1.0)
    # d/dlogp of -ratio * A at ratio 1 is -A (scaled by the aggregation weight).
    loss.backward()
    if aggregation == "token_mean":
        close(logp.grad, [[-2.0 / 5] * 3, [1.0 / 5, 1.0 / 5, 0.0]])
    else:
        close(logp.grad, [[-2.0 / 6] * 3, [1.0 / 4, 1.0 / 4, 0.0]])


def test_padding_contributes_nothing_even_if_garbage() -> None:
    logp, old, adv, mask = clipping_case()
    loss_ref, _ = grpo_loss(logp, old, None, adv, mask)
    garbage_logp = logp.detach().clone()
    garbage_logp[1, 2] = 50.0  # huge ratio on a padded token
    garbage_old = old.clone()
    garbage_old[1, 2] = -50.0
    garbage_logp.requires_grad_(True)
    loss, stats = grpo_loss(garbage_logp, garbage_old, None, adv, mask)
    close(loss, loss_ref.item())
    loss.backward()
    assert garbage_logp.grad[1, 2] == 0.0
    assert math.isfinite(stats["ratio_max"]) and stats["ratio_max"] == pytest.approx(1.5)


def test_bool_mask_equals_float_mask() -> None:
    logp, old, adv, mask = clipping_case()
    loss_f, _ = grpo_loss(logp, old, None, adv, mask)
    loss_b, _ = grpo_loss(logp, old, None, adv, mask.bool())
    close(loss_b, loss_f.item())


def test_low_precision_inputs_are_computed_in_float32() -> None:
    logp = torch.full((1, 2), -1.0, dtype=torch.bfloat16, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), None, torch.tensor([3.0]), torch.ones(1, 2))
    assert loss.dtype == torch.float32
    close(loss, -3.0)
    loss.backward()
    assert logp.grad is not None and logp.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand() -> None:
    logp = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.3)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.3)]], dtype=torch.float64)
    # k1 = log pi - log ref: ln 2, -ln 2, 0.
    close(kl_penalty(logp, ref, "k1"), [[LN2, -LN2, 0.0]])
    # k3 = exp(d) - d - 1, d = log ref - log pi: d = -ln2 -> 0.5 + ln2 - 1; d = ln2 -> 2 - ln2 - 1; d = 0 -> 0.
    close(kl_penalty(logp, ref, "k3"), [[0.5 + LN2 - 1.0, 1.0 - LN2, 0.0]])
    close(kl_penalty(logp, ref), [[0.5 + LN2 - 1.0, 1.0 - LN2, 0.0]])  # k3 is the default
    assert set(KL_ESTIMATORS.names()) >= {"k1", "k3"}


@settings(deadline=None, max_examples=100, derandomize=True)
@given(
    st.lists(st.floats(-30.0, 0.0), min_size=1, max_size=8),
    st.lists(st.floats(-30.0, 0.0), min_size=1, max_size=8),
)
def test_k3_is_non_negative_and_finite(a: list[float], b: list[float]) -> None:
    n = min(len(a), len(b))
    logp = torch.tensor([a[:n]], dtype=torch.float32)
    ref = torch.tensor([b[:n]], dtype=torch.float32)
    k3 = kl_penalty(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    assert (k3 >= 0).all()


def test_unknown_kl_estimator() -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="k5.*registered: k1, k3"):
        kl_penalty(x, x, "k5")
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_loss(x, x, x, torch.zeros(1), torch.ones(1, 2), kl_coef=0.1, kl_estimator="k5")


def test_kl_term_in_loss_value_gradient_and_stats() -> None:
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.5), 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    adv = torch.zeros(1, dtype=torch.float64)  # isolate the KL term
    k3 = [0.5 + LN2 - 1.0, 1.0 - LN2]
    loss, stats = grpo_loss(logp, logp.detach(), ref, adv, mask, kl_coef=0.1, kl_estimator="k3")
    close(loss, 0.1 * sum(k3) / 2)
    assert stats["kl"] == pytest.approx(sum(k3) / 2)
    loss.backward()
    # d k3 / d logp = 1 - exp(log ref - log pi): 1 - 0.5 and 1 - 2.
    close(logp.grad, [[0.1 * (1 - 0.5) / 2, 0.1 * (1 - 2.0) / 2, 0.0]])

    # k1 in the loss: value ln2 - ln2 = 0 on average here, gradient 1 per real token.
    logp.grad = None
    loss1, stats1 = grpo_loss(logp, logp.detach(), ref, adv, mask, kl_coef=0.5, kl_estimator="k1")
    close(loss1, 0.0)
    assert stats1["kl"] == pytest.approx(0.0, abs=1e-9)
    loss1.backward()
    close(logp.grad, [[0.5 / 2, 0.5 / 2, 0.0]])


def test_kl_reported_but_not_added_when_coef_zero() -> None:
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    loss, stats = grpo_loss(logp, logp, ref, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 1))
    close(loss, -1.0)
    assert stats["kl"] == pytest.approx(0.5 + LN2 - 1.0)


# --------------------------------------------------------------------------- entropy


def test_entropy_bonus() -> None:
    logp = torch.full((2, 2), -1.0, dtype=torch.float64, requires_grad=True)
    ent = torch.tensor([[1.0, 2.0], [3.0, 100.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    loss, stats = grpo_loss(logp, logp.detach(), None, adv, mask, entropy=ent, entropy_coef=0.01)
    # pg = -1 on each of the 3 real tokens; entropy bonus -0.01 * (1 + 2 + 3) / 3.
    close(loss, -1.0 - 0.01 * 6.0 / 3)
    assert stats["entropy"] == pytest.approx(2.0)
    assert stats["pg_loss"] == pytest.approx(-1.0)
    loss.backward()
    close(ent.grad, [[-0.01 / 3, -0.01 / 3], [-0.01 / 3, 0.0]])
    # Entropy given with coefficient 0: reported, not added.
    loss0, stats0 = grpo_loss(logp, logp.detach(), None, adv, mask, entropy=ent)
    close(loss0, -1.0)
    assert stats0["entropy"] == pytest.approx(2.0)


# --------------------------------------------------------------------------- aggregation


def test_aggregations_by_hand_with_unequal_lengths() -> None:
    nan = float("nan")
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0], [nan, nan, nan]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    tm = aggregate(values, mask, "token_mean")
    close(tm, (1 + 2 + 3 + 10) / 4)
    tm.backward()
    close(values.grad, [[0.25] * 3, [0.25, 0.0, 0.0], [0.0] * 3])

    values.grad = None
    sm = aggregate(values, mask, "seq_mean_token_mean")
    close(sm, ((1 + 2 + 3) / 3 + 10 / 1) / 2)  # the empty third sequence is left out
    sm.backward()
    close(values.grad, [[1 / 6] * 3, [0.5, 0.0, 0.0], [0.0] * 3])
    assert set(AGGREGATIONS.names()) >= {"token_mean", "seq_mean_token_mean"}
    assert loss_denominator("token_mean") == "tokens" and loss_denominator("seq_mean_token_mean") == "answers"


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_aggregations_of_an_empty_mask_are_zero(mode: str) -> None:
    values = torch.ones(2, 3, requires_grad=True)
    out = aggregate(values, torch.zeros(2, 3), mode)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(values.grad, torch.zeros(2, 3))


def test_all_padding_batch_gives_finite_zero_loss() -> None:
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = grpo_loss(logp, logp.detach(), None, torch.ones(2), torch.zeros(2, 3))
    assert loss.item() == 0.0
    assert all(math.isfinite(v) for v in stats.values())


def test_unknown_aggregation() -> None:
    with pytest.raises(ValueError, match="seq_mean_token_mean"):
        aggregate(torch.zeros(1, 2), torch.ones(1, 2), "sum")
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), None, torch.zeros(1), torch.ones(1, 2), aggregation="x"
        )


# --------------------------------------------------------------------------- validation


def _args() -> dict[str, torch.Tensor | None]:
    return {
        "logprobs": torch.zeros(2, 3),
        "old_logprobs": torch.zeros(2, 3),
        "ref_logprobs": torch.zeros(2, 3),
        "advantages": torch.zeros(2),
        "mask": torch.ones(2, 3),
    }


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("logprobs", torch.zeros(6)),
        ("old_logprobs", torch.zeros(2, 4)),
        ("ref_logprobs", torch.zeros(3, 3)),
        ("mask", torch.ones(2, 2)),
        ("advantages", torch.zeros(2, 1)),
        ("advantages", torch.zeros(3)),
    ],
)
def test_shape_errors_name_the_argument(name: str, bad: torch.Tensor) -> None:
    args = _args()
    args[name] = bad
    with pytest.raises(ValueError, match=name):
        grpo_loss(**args)  # type: ignore[arg-type]


def test_entropy_shape_error() -> None:
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(**_args(), entropy=torch.zeros(2, 2), entropy_coef=0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"eps_low": -0.1}, "eps_low"),
        ({"eps_low": 1.0}, "eps_low"),
        ({"eps_high": -0.1}, "eps_high"),
        ({"eps_high": float("nan")}, "eps_high"),
        ({"kl_coef": -1.0}, "kl_coef"),
        ({"entropy_coef": 0.1}, "entropy"),
    ],
)
def test_coefficient_errors_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        grpo_loss(**_args(), **kwargs)  # type: ignore[arg-type]


def test_ref_required_only_with_kl() -> None:
    args = _args()
    args["ref_logprobs"] = None
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(**args, kl_coef=0.1)  # type: ignore[arg-type]
    loss, _ = grpo_loss(**args)  # type: ignore[arg-type]
    assert loss.item() == 0.0


# --------------------------------------------------------------------------- off-policy correction


def test_decoupled_truncated_importance_weights_by_hand() -> None:
    """With behaviour log-probs mu, each token's clipped term is scaled by min(pi_prox / mu, cap)."""
    logp, prox = clipping_case()[:2]
    adv = torch.tensor(ADV, dtype=torch.float64)
    mask = torch.tensor(MASK, dtype=torch.float64)
    # pi_prox / mu per token: 0.5, 1.0, 4.0 (capped at 2), 1.5, 0.25, (padding) 8.0
    w = [[0.5, 1.0, 4.0], [1.5, 0.25, 8.0]]
    behaviour = prox - torch.tensor(w, dtype=torch.float64).log()
    loss, stats = grpo_loss(logp, prox, None, adv, mask, behaviour_logprobs=behaviour, is_cap=2.0)
    capped = [[0.5, 1.0, 2.0], [1.5, 0.25]]
    expected = (
        sum(c * pg for cr, pr in zip(capped, PG, strict=True) for c, pg in zip(cr, pr, strict=True)) / 5
    )
    close(loss, expected)
    loss.backward()
    close(
        logp.grad,
        [
            [c * g / 5 for c, g in zip(cr, gr, strict=False)] + [0.0] * (3 - len(cr))
            for cr, gr in zip(capped, PG_GRAD, strict=True)
        ],
    )
    assert stats["is_weight_mean"] == pytest.approx((0.5 + 1.0 + 2.0 + 1.5 + 0.25) / 5)
    assert stats["is_capped_frac"] == pytest.approx(1 / 5)  # the padded 8.0 does not count
    # The weights are constants: mu gets no gradient, and equal log-probs give the on-policy loss.
    on_policy, _ = grpo_loss(logp.detach(), prox, None, adv, mask, behaviour_logprobs=prox)
    plain, _ = grpo_loss(logp.detach(), prox, None, adv, mask)
    close(on_policy, plain.item())


def test_behaviour_logprobs_shape_and_cap_are_checked() -> None:
    logp, prox, adv, mask = clipping_case()
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        grpo_loss(logp, prox, None, adv, mask, behaviour_logprobs=prox[:, :2])
    with pytest.raises(ValueError, match="is_cap"):
        grpo_loss(logp, prox, None, adv, mask, behaviour_logprobs=prox, is_cap=0.0)
