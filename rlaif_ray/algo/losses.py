"""The GRPO_rank policy loss: clipped surrogate, KL to the reference, entropy bonus.

Pure torch, no Ray, no I/O. Shapes: per-token tensors are [B, T] (B sequences, T answer
tokens, right-padded), ``mask`` is 1 for real answer tokens and 0 for padding, and
advantages are [B], one per sequence, broadcast over its tokens.

With ``rho_t = exp(log pi(a_t) - log pi_old(a_t))`` and sequence advantage ``A``::

    pg_t   = -w_t * min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A)
    loss_t = pg_t + kl_coef * kl_t - entropy_coef * entropy_t
    loss   = aggregate(loss_t, mask, aggregation)

Plain GRPO (DeepSeekMath) is this loss with ``score`` advantages. ``w_t`` is 1 on-policy; for
answers sampled by an older weight version (the asynchronous loop) it is the decoupled,
truncated importance weight of :func:`grpo_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from rlaif_ray.registry import AGGREGATIONS, KL_ESTIMATORS

__all__ = [
    "LOG_RATIO_CLAMP",
    "aggregate",
    "behaviour_weights",
    "grpo_loss",
    "kl_k1",
    "kl_k3",
    "kl_penalty",
    "loss_denominator",
    "register_aggregation",
    "register_kl",
    "seq_mean_token_mean",
    "token_mean",
]

LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to +-this before ``exp`` so that one stray token cannot give inf/NaN."""

KlFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AggFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

Denominator = Literal["tokens", "answers"]


def register_kl(name: str) -> Callable[[KlFn], KlFn]:
    """Register a per-token KL(pi || pi_ref) estimator ``fn(logprobs, ref_logprobs) -> [B, T]``
    under ``name`` (in :data:`rlaif_ray.registry.KL_ESTIMATORS`)."""
    return KL_ESTIMATORS.register(name)


def register_aggregation(name: str, *, denominator: Denominator) -> Callable[[AggFn], AggFn]:
    """Register a masked aggregation ``fn(values [B, T], mask [B, T]) -> scalar`` under ``name``
    (in :data:`rlaif_ray.registry.AGGREGATIONS`).

    ``denominator`` is what the aggregation averages over across a whole batch, ``"tokens"``
    (every real token weighs the same) or ``"answers"`` (every answer does): the learner weighs
    each micro-batch's and each rank's loss by its share of it, so that the update equals one
    pass over the whole batch.
    """
    return AGGREGATIONS.register(name, denominator=denominator)


def loss_denominator(aggregation: str) -> Denominator:
    """What the aggregation registered as ``aggregation`` averages over."""
    return AGGREGATIONS.traits(aggregation)["denominator"]


# --------------------------------------------------------------------------- KL estimators


@register_kl("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = ``log pi - log pi_ref``: unbiased for KL(pi || pi_ref) under samples of pi, can be negative.

    As a *loss term* k1 does not regularise: on samples drawn from pi its expected gradient is
    ``E_pi[grad log pi] = 0``, so in expectation it pulls nothing towards pi_ref (only its noise
    reaches the weights). It is useful as a value to report, or as a penalty folded into the
    reward (the PPO-RLHF recipe); as the loss's ``kl_estimator`` use ``k3``, whose gradient is
    that of KL(pi || pi_ref).
    """
    return logprobs - ref_logprobs


@register_kl("k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = ``exp(d) - d - 1`` with ``d = log pi_ref - log pi`` (Schulman's estimator).

    Unbiased for KL(pi || pi_ref) under samples of pi and never negative (``e^d >= 1 + d``).
    Computed as ``expm1(d) - d`` (accurate for small d), floored at 0 against rounding;
    ``d`` is clamped to +-LOG_RATIO_CLAMP before ``exp``.
    """
    d = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.expm1(d) - d).clamp_min(0.0)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL penalty with the named estimator (``k1`` or ``k3``); ValueError for unknown names."""
    fn = KL_ESTIMATORS.get(estimator)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"ref_logprobs shape {tuple(ref_logprobs.shape)} != logprobs shape {tuple(logprobs.shape)}"
        )
    return fn(logprobs, ref_logprobs)


# --------------------------------------------------------------------------- aggregation


def _masked(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values with padding set to 0 (so NaN/inf in padding cannot leak) and the mask as values' dtype."""
    keep = mask.bool()
    return torch.where(keep, values, torch.zeros_like(values)), keep.to(values.dtype)


@register_aggregation("token_mean", denominator="tokens")
def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_{b,t} m_bt v_bt / sum_{b,t} m_bt``: every real token in the batch weighs the same.

    An all-padding batch gives 0 (still connected to the graph).
    """
    v, m = _masked(values, mask)
    return v.sum() / m.sum().clamp_min(1.0)


@register_aggregation("seq_mean_token_mean", denominator="answers")
def seq_mean_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_{b in S} (sum_t m_bt v_bt / sum_t m_bt)``, S = sequences with at least one real token.

    Every sequence weighs the same whatever its length; empty sequences are left out, and
    a batch with no real tokens gives 0.
    """
    v, m = _masked(values, mask)
    lengths = m.sum(dim=-1)
    per_seq = v.sum(dim=-1) / lengths.clamp_min(1.0)
    present = (lengths > 0).to(values.dtype)
    return (per_seq * present).sum() / present.sum().clamp_min(1.0)


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean") -> torch.Tensor:
    """Reduce per-token ``values`` [B, T] under ``mask`` [B, T] to a scalar with the named mode."""
    fn = AGGREGATIONS.get(mode)
    if values.dim() != 2 or values.shape != mask.shape:
        raise ValueError(
            f"values and mask must both be [B, T], got {tuple(values.shape)} and {tuple(mask.shape)}"
        )
    return fn(values, mask)


# --------------------------------------------------------------------------- the loss


def _check_like(name: str, x: torch.Tensor | None, shape: torch.Size) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} like logprobs, got {tuple(x.shape)}")


def _check_args(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
    kl_coef: float,
    entropy_coef: float,
    aggregation: str,
    kl_estimator: str,
) -> None:
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2:
        shape = tuple(logprobs.shape) if isinstance(logprobs, torch.Tensor) else type(logprobs).__name__
        raise ValueError(f"logprobs must be a [B, T] tensor, got {shape}")
    shape = logprobs.shape
    _check_like("old_logprobs", old_logprobs, shape)
    _check_like("ref_logprobs", ref_logprobs, shape)
    _check_like("mask", mask, shape)
    _check_like("entropy", entropy, shape)
    if not isinstance(advantages, torch.Tensor) or advantages.shape != shape[:1]:
        got = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must have shape ({shape[0]},), one per sequence, got {got}")
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
    if not eps_high >= 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    if not kl_coef >= 0.0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0.0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef > 0")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"entropy is required when entropy_coef != 0 (got entropy_coef={entropy_coef})")
    AGGREGATIONS.get(aggregation)  # ValueErrors naming the registered ones
    KL_ESTIMATORS.get(kl_estimator)


def behaviour_weights(
    prox_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance weights ``w_t = min(pi_prox(a_t) / mu(a_t), cap)`` (constants, no gradient).

    ``mu`` is the behaviour policy, the weight version that sampled the answer; ``pi_prox`` the
    learner's weights at the start of the update. The log-ratio is clamped to +-LOG_RATIO_CLAMP.
    """
    log_w = (prox_logprobs.detach() - behaviour_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_w).clamp(max=cap)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    aggregation: str = "token_mean",
    behaviour_logprobs: torch.Tensor | None = None,
    is_cap: float = 2.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped GRPO surrogate with KL penalty and entropy bonus; returns ``(loss, stats)``.

    Per token, with ``rho = exp(logprobs - old_logprobs)`` and A the sequence's advantage::

        pg   = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
        loss = pg + kl_coef * kl_penalty(logprobs, ref_logprobs, kl_estimator) - entropy_coef * entropy

    then ``aggregate(loss, mask, aggregation)``. Gradients flow through ``logprobs`` (and
    ``entropy``); ``old_logprobs``, ``ref_logprobs`` and ``advantages`` are constants.
    Where the clipped term is chosen (A > 0 and rho > 1 + eps_high, or A < 0 and
    rho < 1 - eps_low) the token's gradient is zero. Log-ratios are clamped to
    +-LOG_RATIO_CLAMP. Computation is in at least float32.

    ``ref_logprobs`` may be None when ``kl_coef == 0``; if given, the KL is reported.

    Off-policy answers (decoupled PPO, as in AReaL, with verl's truncated importance sampling):
    when the answers were sampled by an older weight version ``mu``, pass its log-probs as
    ``behaviour_logprobs`` and the learner's log-probs at the start of this update (``pi_prox``,
    no gradient) as ``old_logprobs``. The trust region is then taken around ``pi_prox`` and the
    off-policy gap is corrected by a weight per token::

        pg_t = -w_t * min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A),
        rho_t = pi(a_t) / pi_prox(a_t),   w_t = min(pi_prox(a_t) / mu(a_t), is_cap)

    so that ``E_mu[w rho A] = E_pi[A]`` wherever the cap does not bind. With
    ``behaviour_logprobs=None`` (on-policy: ``mu = pi_prox``), ``w_t = 1``.

    Stats (python floats): ``loss``, ``pg_loss`` (aggregated like the loss), ``clip_frac``
    (share of real tokens where the clipped term was chosen and differs), ``ratio_mean``
    and ``ratio_max`` over real tokens, ``kl`` (token-mean over real tokens, when
    ``ref_logprobs`` is given), ``entropy`` (token mean, when given) and, with
    ``behaviour_logprobs``, ``is_weight_mean`` and ``is_capped_frac`` (share of real tokens whose
    weight was truncated at ``is_cap``).
    """
    _check_args(
        logprobs,
        old_logprobs,
        ref_logprobs,
        advantages,
        mask,
        entropy,
        eps_low,
        eps_high,
        kl_coef,
        entropy_coef,
        aggregation,
        kl_estimator,
    )
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    logp = logprobs.to(dtype)
    old = old_logprobs.detach().to(dtype)
    adv = advantages.detach().to(dtype).unsqueeze(-1)
    keep = mask.bool()

    log_ratio = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    surr = ratio * adv
    surr_clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    pg = -torch.minimum(surr, surr_clipped)
    weights = None
    if behaviour_logprobs is not None:
        _check_like("behaviour_logprobs", behaviour_logprobs, logprobs.shape)
        if not is_cap > 0:
            raise ValueError(f"is_cap must be > 0, got {is_cap}")
        weights = behaviour_weights(old, behaviour_logprobs.to(dtype), is_cap)
        pg = weights * pg
    per_token = pg

    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logp, ref_logprobs.detach().to(dtype), kl_estimator)
        if kl_coef > 0.0:
            per_token = per_token + kl_coef * kl
    if entropy is not None and entropy_coef != 0.0:
        per_token = per_token - entropy_coef * entropy.to(dtype)

    loss = aggregate(per_token, mask, aggregation)

    with torch.no_grad():
        n_real = keep.sum()
        clipped = (surr_clipped < surr) & keep
        stats: dict[str, float] = {
            "loss": loss.item(),
            "pg_loss": aggregate(pg, mask, aggregation).item(),
            "clip_frac": (clipped.sum() / n_real.clamp_min(1)).item(),
            "ratio_mean": token_mean(ratio, mask).item(),
            "ratio_max": ratio[keep].max().item() if n_real > 0 else 0.0,
        }
        if kl is not None:
            stats["kl"] = token_mean(kl, mask).item()
        if entropy is not None:
            stats["entropy"] = token_mean(entropy.to(dtype), mask).item()
        if weights is not None:
            stats["is_weight_mean"] = token_mean(weights, mask).item()
            stats["is_capped_frac"] = ((weights >= is_cap) & keep).sum().item() / max(1, n_real.item())
    return loss, stats
