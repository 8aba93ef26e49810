"""Advantage estimators: pure functions from outcome rewards to one advantage per trajectory.

No Ray, Redis or DeepSpeed here (docs/design.md). The rollout side spreads a trajectory's advantage over its trained
tokens; the learner only ever sees per-token advantages.

The registered estimators are batched, like verl's compute_grpo_outcome_advantage(..., index): one call takes the
rewards of any number of groups, interleaved or not, and the group id of each reward.

    ADVANTAGE_ESTIMATORS["group_zscore"](rewards [N], group_index [N], ddof=1, eps=1e-6) -> advantages [N]
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch
from torch import Tensor

from resetrl.registry import Registry

# name -> estimator(rewards [N], group_index [N], *, ddof, eps) -> advantages [N]
ADVANTAGE_ESTIMATORS: Registry[Callable[..., Tensor]] = Registry("advantage estimator")


def _group_ids(group_index: Sequence[Hashable] | Tensor, n: int) -> tuple[Tensor, int]:
    """Dense ids 0..G-1 for arbitrary group labels (strings, ints, a tensor), in order of first appearance."""
    if isinstance(group_index, Tensor):
        if group_index.dim() != 1:
            raise ValueError(f"group_index must be 1-D [N]; got shape {tuple(group_index.shape)}")
        labels = group_index.tolist()
    else:
        labels = list(group_index)
    if len(labels) != n:
        raise ValueError(
            f"group_index has {len(labels)} entries but there are {n} rewards; give one group id per reward"
        )
    dense: dict[Hashable, int] = {}
    ids = [dense.setdefault(label, len(dense)) for label in labels]
    return torch.tensor(ids, dtype=torch.long), len(dense)


def group_advantages(
    rewards: Tensor,
    group_index: Sequence[Hashable] | Tensor,
    *,
    std_normalize: bool = True,
    ddof: int = 1,
    eps: float = 1e-6,
) -> Tensor:
    """GRPO outcome advantages for many groups at once (DeepSeekMath, Shao et al. 2024, arXiv 2402.03300,
    section 4.1.2), each reward z-scored within the rewards that share its group id:

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps),    g = group_index[i]

    std_g is the sample std (ddof=1, Bessel-corrected, as TRL and verl compute it) or the population std (ddof=0,
    numpy's default, what the RRPO/SRPO reference code uses for G1 and G2; docs/algorithms.md). A group whose
    rewards are all equal, a group of one included, carries no signal: its advantages are exactly 0, not 0/eps
    noise. std_normalize=False is Dr.GRPO (Liu et al. 2025, arXiv 2503.20783, eq. 3): A_i = r_i - mean_g(r).

    rewards [N] float; group_index: N hashable labels (any order, groups may interleave) or a [N] tensor.
    Returns float32 [N] in the order of `rewards`. Statistics are computed in float64.
    """
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N]; got shape {tuple(rewards.shape)}")
    if ddof < 0:
        raise ValueError(f"ddof must be 0 (population std) or 1 (sample std), got {ddof}")
    values = rewards.to(torch.float64)
    n = values.numel()
    ids, num_groups = _group_ids(group_index, n)
    if n == 0:
        return torch.zeros(0, dtype=torch.float32)

    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, ids, torch.ones_like(values))
    means = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, ids, values) / counts
    centered = values - means[ids]
    lowest = torch.full((num_groups,), float("inf"), dtype=torch.float64).scatter_reduce(0, ids, values, "amin")
    highest = torch.full((num_groups,), float("-inf"), dtype=torch.float64).scatter_reduce(0, ids, values, "amax")
    # Equal rewards: the float mean of equal values can differ from them by an ulp, so zero them explicitly.
    silent = highest == lowest
    if std_normalize:
        # count <= ddof: the sample std of a single reward is undefined; such a group has no signal either.
        silent |= counts <= ddof
        sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, ids, centered * centered)
        std = (sq / (counts - ddof).clamp(min=1)).sqrt()
        centered = centered / (std[ids] + eps)
    return torch.where(silent[ids], torch.zeros_like(centered), centered).to(torch.float32)


def grpo_advantages(rewards: Tensor, std_normalize: bool = True, eps: float = 1e-6, ddof: int = 1) -> Tensor:
    """group_advantages for one group: rewards [G] -> advantages [G] (see there for the formula)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be one group, a 1-D tensor [G]; got shape {tuple(rewards.shape)}")
    return group_advantages(rewards, [0] * rewards.numel(), std_normalize=std_normalize, ddof=ddof, eps=eps)


@ADVANTAGE_ESTIMATORS.register("group_zscore")
def grpo_group_advantages(rewards: Tensor, group_index: Sequence[Hashable] | Tensor, *, ddof: int = 1,
                          eps: float = 1e-6) -> Tensor:
    """GRPO: z-score within each group (group_advantages with std_normalize=True)."""
    return group_advantages(rewards, group_index, std_normalize=True, ddof=ddof, eps=eps)


@ADVANTAGE_ESTIMATORS.register("group_centered")
def dr_grpo_advantages(rewards: Tensor, group_index: Sequence[Hashable] | Tensor, *, ddof: int = 1,
                       eps: float = 1e-6) -> Tensor:
    """Dr.GRPO (arXiv 2503.20783, eq. 3): A_i = r_i - mean_g(r), no std normalisation (ddof, eps unused)."""
    return group_advantages(rewards, group_index, std_normalize=False, ddof=ddof, eps=eps)
