"""Advantage estimators: pure functions from a group's outcome rewards to one advantage per trajectory.

No Ray, Redis or DeepSpeed here (STYLE.md). The rollout actor spreads a trajectory's advantage over its trained
tokens; the learner only ever sees per-token advantages.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def grpo_advantages(rewards: Tensor, std_normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantages (DeepSeekMath, Shao et al. 2024, arXiv 2402.03300, section 4.1.2):

        A_i = (r_i - mean(r)) / (std(r) + eps)

    with the unbiased sample std over the G rewards of one group (as TRL and verl compute it). A group whose
    rewards are all equal (G = 1 included) carries no signal: its advantages are exactly 0, not 0/eps noise.

    std_normalize=False is Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783,
    eq. 3): A_i = r_i - mean(r). Dividing by the std up-weights groups that are nearly all right or all wrong.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be one group, a 1-D tensor [G]; got shape {tuple(rewards.shape)}")
    if rewards.numel() < 2 or bool(rewards.max() == rewards.min()):
        return torch.zeros_like(rewards)
    centered = rewards - rewards.mean()
    if not std_normalize:
        return centered
    return centered / (rewards.std() + eps)


def dr_grpo_advantages(rewards: Tensor) -> Tensor:
    """Dr.GRPO (arXiv 2503.20783, eq. 3): A_i = r_i - mean(r), no std normalisation."""
    return grpo_advantages(rewards, std_normalize=False)


# name -> estimator(rewards [G]) -> advantages [G]
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
}
