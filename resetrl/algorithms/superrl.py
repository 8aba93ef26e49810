"""SuperRL (arXiv 2506.01096; docs/algorithms.md, "SuperRL"): policy gradient where the rewards carry signal, SFT on
the expert solution where they do not.

Per prompt i, gate c_i = 1 if any of its rollouts got a positive reward (variant: any positive advantage), and

    L = mean_i [ c_i L_PG,i + (1 - c_i) L_SFT,i ]

with L_SFT the mean token NLL of the expert solution (losses.supervised_loss). The learner sees a step's records,
not its prompts' losses, so it computes L_PG over the policy-gradient records and L_SFT over the SFT records and
mixes them with gate_loss_weights. Variants: one switch for a whole batch (batch_gate) and learnable uncertainty
weights (uncertainty_weights). Pure functions, no Ray, Redis or DeepSpeed (docs/design.md, "Roles and data flow").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def prompt_gate(rewards: Sequence[float], advantages: Sequence[float] | None = None, mode: str = "reward") -> int:
    """c for one prompt: 1 if any rollout reward > 0 (mode "reward") or any advantage > 0 (mode "advantage")."""
    if mode == "reward":
        return int(any(r > 0 for r in rewards))
    if mode == "advantage":
        if advantages is None:
            raise ValueError("prompt_gate(mode='advantage') needs the group's advantages")
        return int(any(a > 0 for a in advantages))
    raise ValueError(f"unknown SuperRL gate '{mode}'; use 'reward' or 'advantage' (or batch_gate)")


def batch_gate(rewards_per_prompt: Sequence[Sequence[float]], min_success: float = 0.5) -> int:
    """One c for a whole batch (SuperRL's batch-level switch): 1 when at least min_success of its prompts have a
    rollout with a positive reward, i.e. rewards are dense enough for policy gradient; else the batch is SFT."""
    if not rewards_per_prompt:
        return 0
    solved = sum(any(r > 0 for r in rewards) for rewards in rewards_per_prompt)
    return int(solved / len(rewards_per_prompt) >= min_success)


def gate_loss_weights(pg_prompts: int, sft_prompts: int) -> tuple[float, float]:
    """(w_pg, w_sft) = the fractions of a step's prompts with c = 1 and c = 0, so that w_pg L_PG + w_sft L_SFT is
    the mean over prompts of c L_PG + (1 - c) L_SFT (each L a token mean within its own prompts)."""
    total = pg_prompts + sft_prompts
    if total == 0:
        return 1.0, 0.0
    return pg_prompts / total, sft_prompts / total


def uncertainty_weights(log_sigma: Tensor, has_pg: bool = True, has_sft: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Learnable uncertainty weights (Kendall et al. 2018, arXiv 1705.07115, as SuperRL's variant uses them):

        L = exp(-2 s_pg) L_PG + exp(-2 s_sft) L_SFT + s_pg + s_sft,   log_sigma = [s_pg, s_sft]

    Returns (w_pg, w_sft, regulariser) with L = w_pg L_PG + w_sft L_SFT + regulariser; the weights are linear
    factors, so the learner can apply them micro-batch by micro-batch. A term absent from the batch (no PG or no
    SFT records) gets weight 0 and no regulariser, which would otherwise push its s to -infinity.
    """
    zero = torch.zeros((), dtype=log_sigma.dtype, device=log_sigma.device)
    s_pg, s_sft = log_sigma[0], log_sigma[1]
    w_pg = torch.exp(-2 * s_pg) if has_pg else zero
    w_sft = torch.exp(-2 * s_sft) if has_sft else zero
    regulariser = (s_pg if has_pg else zero) + (s_sft if has_sft else zero)
    return w_pg, w_sft, regulariser
