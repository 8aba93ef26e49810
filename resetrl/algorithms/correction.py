"""Rollout correction: importance weights between the rollout engine's log-probs and the learner's own
(algorithm.is_correction, is_level, is_cap). Pure functions on tensors; resetrl/algorithms/objective.py applies them.

The engine samples from pi_rollout (vLLM in bf16, other kernels, maybe a stale policy version); the learner trains
pi_theta. Their log-probs of the same tokens differ, most on GPUs in bf16, and an objective that treats the engine's
log-probs as pi_old is then biased (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
training"; Liu, Li et al. 2025, "When speed kills stability"). The correction re-weights each trained token by

    rho_t = pi_learner_old(y_t) / pi_rollout(y_t)                      level "token"
    rho   = prod_t pi_learner_old(y_t) / pi_rollout(y_t)              level "sequence" (over the trained tokens)

- tis (truncated IS):  w = min(rho, C)
- mis (masked IS):     w = rho if rho <= C else 0          (the token, or the whole sequence, is dropped)

as TRL's `vllm_importance_sampling_mode` (token_truncate, token_mask, sequence_truncate, sequence_mask) and verl's
rollout correction do. The weights are constants (no gradient flows through them: they change the sampling
measure, not the objective) and multiply the policy-gradient loss of each token; a masked token keeps its place in
the loss's normaliser, as in TRL. Log-ratios are clamped to [-20, 20] before exp, as verl's SAFETY_BOUND, and the
cap is compared in log space, so a long sequence's product cannot overflow.

Statistics are token means over the trained tokens (a sequence's weight counts once per token), so a step's
micro-batches add up to the step's mean when weighted by their token shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from resetrl.registry import Registry

LEVELS = ("token", "sequence")
_MAX_LOG_RATIO = 20.0

# name -> (log_ratio, cap) -> (weights, hit): hit marks the ratios the cap acted on (truncated or masked).
IS_CORRECTIONS: Registry[Callable[[Tensor, float], tuple[Tensor, Tensor]]] = Registry(
    "importance-sampling correction", "algorithm.is_correction"
)


@IS_CORRECTIONS.register("none")
def no_correction(log_ratio: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    return torch.ones_like(log_ratio), torch.zeros_like(log_ratio, dtype=torch.bool)


@IS_CORRECTIONS.register("tis")
def truncated_weights(log_ratio: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """w = min(rho, C) (Ionides 2008, truncated importance sampling; TRL token_truncate / sequence_truncate)."""
    hit = log_ratio > math.log(cap)
    return torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)).clamp(max=cap), hit


@IS_CORRECTIONS.register("mis")
def masked_weights(log_ratio: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """w = rho where rho <= C, else 0 (TRL token_mask / sequence_mask)."""
    hit = log_ratio > math.log(cap)
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    return torch.where(hit, torch.zeros_like(ratio), ratio), hit


@dataclass(frozen=True)
class Correction:
    weights: Tensor  # [B, T-1], detached; 1 outside the loss mask
    stats: dict[str, float]


def _token_mean(values: Tensor, mask: Tensor) -> float:
    return float(values[mask].float().mean()) if bool(mask.any()) else 0.0


def rollout_correction(
    learner_logprobs: Tensor,
    rollout_logprobs: Tensor,
    loss_mask: Tensor,
    mode: str = "none",
    level: str = "token",
    cap: float = 2.0,
) -> Correction:
    """Importance weights pi_learner_old / pi_rollout for the trained tokens (module docstring), and statistics:

    logp_mismatch_mean, logp_mismatch_max: |logp_rollout - logp_learner| over the trained tokens (always, also with
    mode "none": the mismatch is worth watching before correcting it); is_weight_mean: mean weight;
    is_truncated_fraction (tis) / is_masked_fraction (mis): fraction of trained tokens whose ratio exceeded the cap
    (0 for the other mode).

    All tensors are [B, T-1] and next-token aligned (resetrl/algorithms/losses.py); learner_logprobs are detached.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown algorithm.is_level '{level}'; use one of {', '.join(LEVELS)}")
    if cap <= 1.0:
        raise ValueError(f"algorithm.is_cap must be above 1 (got {cap}): a cap at or below 1 cuts tokens on which "
                         "the learner and the engine agree")
    compute = IS_CORRECTIONS.get(mode)
    with torch.no_grad():
        mask = loss_mask > 0
        # where(), not multiplication: a NaN the producer left on an untrained position must not reach a sum.
        log_ratio = torch.where(mask, learner_logprobs.detach().float() - rollout_logprobs.float(),
                                torch.zeros_like(learner_logprobs, dtype=torch.float32))
        if level == "sequence":
            weights, hit = compute(log_ratio.sum(dim=-1, keepdim=True), cap)
            weights, hit = weights.expand_as(log_ratio), hit.expand_as(log_ratio)
        else:
            weights, hit = compute(log_ratio, cap)
        weights = torch.where(mask, weights, torch.ones_like(weights))
        mismatch = log_ratio.abs()
        hit_fraction = _token_mean(hit.float(), mask)
        stats = {
            "logp_mismatch_mean": _token_mean(mismatch, mask),
            "logp_mismatch_max": float(mismatch[mask].max()) if bool(mask.any()) else 0.0,
            "is_weight_mean": _token_mean(weights, mask),
            "is_truncated_fraction": hit_fraction if mode == "tis" else 0.0,
            "is_masked_fraction": hit_fraction if mode == "mis" else 0.0,
        }
    return Correction(weights=weights.contiguous(), stats=stats)
