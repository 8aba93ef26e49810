"""The step objective: how one micro-batch's losses combine into its part of the step loss (docs/algorithms.md,
"The learner's loss"). A pure function on tensors (no DeepSpeed), so the learner's step reads
batch -> loss -> backward -> step -> publish, and the composition is tested on hand-made tensors.

The step loss over the whole batch (all micro-batches of all ranks) is

    L = w_pg * (L_PG + kl_coef * KL) + w_sft * L_SFT + regulariser

where L_PG is the policy loss (algorithm.policy_loss) aggregated over the batch's policy-gradient tokens (or
sequences), KL the k3 KL to the reference model aggregated the same way, L_SFT the weighted NLL of supervised
targets (expert solutions, repairs) as a token mean over the batch's supervised tokens, and (w_pg, w_sft,
regulariser) the method's loss weights (resetrl/methods/base.py, Method.loss_weights). A micro-batch contributes its
shares of the batch's normalisers, so the micro-batch losses of a step add up to L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from resetrl.algorithms.correction import rollout_correction
from resetrl.algorithms.losses import POLICY_LOSSES, k3_kl, supervised_loss


@dataclass(frozen=True)
class LossSettings:
    policy_loss: str = "ppo_clip"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip: float | None = None
    aggregation: str = "token_mean"
    norm_length: int | None = None  # the generation budget, for seq_mean_token_sum
    kl_coef: float = 0.0
    is_correction: str = "none"  # none, tis or mis (resetrl/algorithms/correction.py)
    is_level: str = "token"  # token or sequence
    is_cap: float = 2.0


@dataclass(frozen=True)
class Shares:
    """This micro-batch's fractions of the step's normalisers (computed over the whole batch)."""

    pg: float  # of the policy-gradient normaliser (tokens for token means, sequences for sequence means)
    pg_tokens: float  # of the policy-gradient tokens: statistics are token means
    sft: float  # of the supervised tokens
    micro_batches: int  # micro-batches in the step (all ranks): the regulariser is spread evenly over them


def micro_batch_loss(
    settings: LossSettings,
    shares: Shares,
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    sft_mask: Tensor,
    ref_logprobs: Tensor | None = None,
    weights: tuple = (1.0, 0.0, 0.0),
    old_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """This micro-batch's part of the step loss, and its parts of the step's statistics (to be summed over the
    step's micro-batches, except logp_mismatch_max: the step's is their maximum). Per-token tensors are [B, T-1]
    and next-token aligned (resetrl/algorithms/losses.py). old_logprobs: the learner's own log-probs from a no-grad
    forward before the step (learner.recompute_old_logprobs), else None."""
    w_pg, w_sft, regulariser = weights
    # The learner's pi_old: recomputed, or this forward's own log-probs, detached: the step's one optimizer update
    # comes after every micro-batch's forward, so these weights are still the pre-step ones (docs/algorithms.md).
    learner_old = logprobs.detach() if old_logprobs is None else old_logprobs
    correction = rollout_correction(learner_old, behaviour_logprobs, loss_mask, settings.is_correction,
                                    settings.is_level, settings.is_cap)
    # With a correction or a recomputed pi_old, the PPO ratio is pi_theta / pi_learner_old and the IS weight carries
    # pi_learner_old / pi_rollout (decoupled PPO); otherwise the ratio is against the rollout's log-probs.
    proximal = behaviour_logprobs if old_logprobs is None and settings.is_correction == "none" else learner_old
    # The weight scales each token's policy loss through its advantage: every registered policy loss is positively
    # homogeneous in A per token, l(w A) = w l(A) for w >= 0 (tests/test_correction.py checks each one).
    pg_loss, stats = POLICY_LOSSES[settings.policy_loss](
        logprobs, proximal, advantages * correction.weights, loss_mask,
        clip_eps_low=settings.clip_eps_low, clip_eps_high=settings.clip_eps_high, dual_clip=settings.dual_clip,
        aggregation=settings.aggregation, norm_length=settings.norm_length,
    )
    if ref_logprobs is None:
        kl = torch.zeros((), device=logprobs.device)
    else:
        kl = k3_kl(logprobs, ref_logprobs, loss_mask, settings.aggregation, settings.norm_length)
    sft_loss = supervised_loss(logprobs, advantages, sft_mask)
    loss = (w_pg * (pg_loss + settings.kl_coef * kl) * shares.pg + w_sft * sft_loss * shares.sft
            + regulariser / shares.micro_batches)
    parts = {
        "loss": float(loss.detach()),
        "pg_loss": float(pg_loss.detach()) * shares.pg,
        "sft_loss": float(sft_loss.detach()) * shares.sft,
        "kl": float(kl.detach()) * shares.pg,
    }
    for name in ("clip_fraction", "dual_clip_fraction", "ratio_mean", "approx_kl"):
        parts[name] = stats[name] * shares.pg_tokens
    for name in ("logp_mismatch_mean", "is_weight_mean", "is_truncated_fraction", "is_masked_fraction"):
        parts[name] = correction.stats[name] * shares.pg_tokens
    parts["logp_mismatch_max"] = correction.stats["logp_mismatch_max"]
    return loss, parts
