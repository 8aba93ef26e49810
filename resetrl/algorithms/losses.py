"""Policy losses and the KL penalty: pure functions on tensors (no Ray, Redis or DeepSpeed).

Alignment: every per-token tensor here is "next-token aligned" with shape [B, T-1]: position t holds the value for
token t+1, the token predicted from tokens 0..t. `token_logprobs(logits, token_ids)` produces that layout from a
model's [B, T, V] logits, and learner/batching.py lays out loss masks, advantages and behaviour log-probs the same.

Aggregation (how per-token losses become one scalar), chosen by AlgorithmConfig.loss_aggregation:
- "token_mean": sum over all trained tokens / number of trained tokens (GRPO as in DAPO, arXiv 2503.14476, eq. 8:
  every token weighs the same, so long responses are not down-weighted).
- "seq_mean_token_sum": Dr.GRPO (arXiv 2503.20783, section 3.2): per sequence, sum over its trained tokens divided
  by a constant `norm_length` (the generation budget, rollout.max_new_tokens), then the mean over sequences. The
  constant removes GRPO's 1/|o_i| length bias without making the loss scale with the batch's longest answer.
- "seq_mean_token_mean": per sequence, the mean over its trained tokens; then the mean over the sequences that have
  at least one trained token (GRPO's original 1/G sum_i 1/|o_i| sum_t, arXiv 2402.03300 eq. 3; verl's
  "seq-mean-token-mean"; the RRPO/SRPO reference loss, docs/algorithms.md). A sequence with no trained token (a
  supervised row, an empty continuation) neither adds to nor dilutes the mean. (The reference divides by every
  sequence of its micro-batch, trained or not; the two agree whenever each sequence has a trained token.)

`aggregation_count` gives the count an aggregation divides by, so a caller that splits a batch into micro-batches
can weight each micro-batch's loss by its share of the whole batch's count.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from resetrl.registry import Registry

AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")

# name -> policy loss with the signature of ppo_clip_loss
POLICY_LOSSES: Registry[Callable[..., tuple[Tensor, dict[str, float]]]] = Registry(
    "policy loss", "algorithm.policy_loss"
)

# exp() of a log-ratio beyond this overflows float32 gradients to inf/NaN even where the loss clips it away;
# the same guard as verl's core_algos (clamp of the log-ratio to [-20, 20]).
_MAX_LOG_RATIO = 20.0


def token_logprobs(logits: Tensor, token_ids: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """log softmax(logits / T) of each next token: out[b, t] = log p(token_ids[b, t+1] | token_ids[b, :t+1]).

    logits [B, T, V], token_ids [B, T] -> [B, T-1] float32. temperature is a float or a [B] tensor (one per
    sequence: the temperature the rollout engine sampled with, so the ratio compares the same distributions).
    """
    logits = logits[:, :-1].float()
    if isinstance(temperature, Tensor):
        temperature = temperature.to(device=logits.device, dtype=logits.dtype).view(-1, 1, 1)
    logits = logits / temperature
    targets = token_ids[:, 1:].long().unsqueeze(-1)
    # gather - logsumexp == log_softmax(...).gather(...) without materialising a second [B, T, V] tensor.
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def aggregate(per_token: Tensor, loss_mask: Tensor, aggregation: str = "token_mean",
              norm_length: int | None = None) -> Tensor:
    """Reduce a [B, T] per-token loss over the tokens where loss_mask is set (see the module docstring)."""
    mask = loss_mask > 0
    # where(), not multiplication: a NaN or inf on a masked-out position must not leak into the sum.
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))
    if aggregation == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if aggregation == "seq_mean_token_sum":
        if not norm_length:
            raise ValueError("seq_mean_token_sum needs norm_length, the constant generation budget (max_new_tokens)")
        return (masked.sum(dim=-1) / norm_length).mean()
    if aggregation == "seq_mean_token_mean":
        tokens = mask.sum(dim=-1)
        trained = tokens > 0
        per_sequence = masked.sum(dim=-1) / tokens.clamp(min=1)
        return per_sequence.sum() / trained.sum().clamp(min=1)
    raise ValueError(f"unknown loss aggregation '{aggregation}'; use one of {', '.join(AGGREGATIONS)}")


def aggregation_count(loss_mask: Tensor, aggregation: str = "token_mean") -> int:
    """What `aggregate` divides by for this mask: trained tokens (token_mean), sequences (seq_mean_token_sum) or
    sequences with at least one trained token (seq_mean_token_mean). A batch split into micro-batches gets the
    whole batch's aggregate by weighting each micro-batch's loss with count(micro-batch) / count(batch)."""
    mask = loss_mask > 0
    if aggregation == "token_mean":
        return int(mask.sum())
    if aggregation == "seq_mean_token_sum":
        return int(mask.shape[0])
    if aggregation == "seq_mean_token_mean":
        return int(mask.any(dim=-1).sum())
    raise ValueError(f"unknown loss aggregation '{aggregation}'; use one of {', '.join(AGGREGATIONS)}")


def _masked_mean(values: Tensor, mask: Tensor) -> float:
    mask = mask > 0
    if not bool(mask.any()):
        return 0.0
    return float(values.detach()[mask].float().mean())


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    norm_length: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7), as a loss to minimise, per token:

        rho = exp(logp - logp_behaviour)
        l   = max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high))

    eps_high > eps_low is DAPO's clip-higher (arXiv 2503.14476, eq. 10). With dual_clip = c > 1 (Ye et al. 2020,
    arXiv 1912.09729, eq. 5), a token with A < 0 has its loss capped at -c * A, so a huge ratio on a bad token
    cannot dominate the batch: l = min(l, -c * A) where A < 0.

    All tensors are [B, T-1] and next-token aligned (module docstring). Returns the aggregated loss and detached
    token-mean statistics: clip_fraction (tokens where the clipped term is the one used), dual_clip_fraction,
    ratio_mean, ratio_max, approx_kl (k3 estimate of KL(behaviour || current) over the trained tokens).
    """
    log_ratio = (logprobs - behaviour_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    per_token = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dual_active = torch.zeros_like(clip_active)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual_active = (advantages < 0) & (per_token > cap)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, cap), per_token)
    loss = aggregate(per_token, loss_mask, aggregation, norm_length)

    with torch.no_grad():
        mask = loss_mask > 0
        stats = {
            "clip_fraction": _masked_mean(clip_active.float(), mask),
            "dual_clip_fraction": _masked_mean(dual_active.float(), mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "ratio_max": float(ratio[mask].max()) if bool(mask.any()) else 0.0,
            "approx_kl": _masked_mean(ratio - 1.0 - log_ratio, mask),
        }
    return loss, stats


def k3_kl(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    loss_mask: Tensor,
    aggregation: str = "token_mean",
    norm_length: int | None = None,
) -> Tensor:
    """KL(pi_theta || pi_ref) per token with Schulman's k3 estimator (http://joschu.net/blog/kl-approx.html),
    unbiased and always >= 0 for samples from pi_theta, as in GRPO (arXiv 2402.03300, eq. 4):

        k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1

    aggregated over loss_mask the same way as the policy loss, so `pg + kl_coef * kl` keeps one token weighting.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    per_token = torch.exp(log_ratio) - log_ratio - 1.0
    return aggregate(per_token, loss_mask, aggregation, norm_length)


@POLICY_LOSSES.register("pg")
def pg_loss(
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    aggregation: str = "token_mean",
    norm_length: int | None = None,
    **_,
) -> tuple[Tensor, dict[str, float]]:
    """Unclipped importance-weighted policy gradient. Per token (the log-ratio clamped to [-20, 20]):

        l_t = -A_t * rho_t,   rho_t = exp(logp_t - logp_behaviour_t)

    then reduced over loss_mask by `aggregation` (module docstring). Its gradient is -A_t * rho_t * grad logp_t: at
    rho = 1 (on-policy) REINFORCE's -A_t * grad logp_t; off-policy, rho is the importance weight. Nothing is clipped,
    so a stale or diverging token is not held back: the clipped ppo_clip_loss is the stabler choice
    (docs/algorithms.md).

    With aggregation="seq_mean_token_mean" and one advantage A_i per sequence (constant over its trained tokens),
    the loss is -mean_i[A_i * mean_{t in suffix_i} rho_t], over the sequences with at least one trained token.
    The RRPO/SRPO reference code's default loss (arXiv 2605.25507; its `srpo` loss) is
    -mean_i[A_i * mean_{t in suffix_i} logp_t]: log pi, not the ratio, and no behaviour log-probs. The two have
    the same gradient at rho = 1; the loss *values* differ (ours is -mean_i A_i there). Off-policy they differ:
    the reference ignores staleness, this loss corrects for it.

    Same arguments, aggregation and statistics keys as ppo_clip_loss, so the learner can swap them by name; clip
    arguments (clip_eps_low, clip_eps_high, dual_clip) are accepted and ignored, and the clip fractions are 0.
    """
    log_ratio = (logprobs - behaviour_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    loss = aggregate(-advantages * ratio, loss_mask, aggregation, norm_length)

    with torch.no_grad():
        mask = loss_mask > 0
        stats = {
            "clip_fraction": 0.0,
            "dual_clip_fraction": 0.0,
            "ratio_mean": _masked_mean(ratio, mask),
            "ratio_max": float(ratio[mask].max()) if bool(mask.any()) else 0.0,
            "approx_kl": _masked_mean(ratio - 1.0 - log_ratio, mask),
        }
    return loss, stats


def supervised_loss(logprobs: Tensor, weights: Tensor, loss_mask: Tensor) -> Tensor:
    """Weighted NLL of target tokens, token-mean over loss_mask:  l = -w_t * log p(token_t).

    For text the policy did not sample under this context: an expert solution (SuperRL's L_SFT, w = 1: the mean
    token NLL, arXiv 2506.01096) or a repaired trajectory reused as a positive sample (IOP, w = its advantage).
    There is no behaviour log-prob to form an importance ratio with, so none is used: at w = 1 this is plain SFT.
    Tensors are [B, T-1] and next-token aligned like the policy losses.
    """
    return aggregate(-weights * logprobs, loss_mask, "token_mean")
