"""GRPO options that act on rewards and groups before advantages are computed (DAPO, arXiv 2503.14476).

Pure functions, no Ray, Redis or DeepSpeed (docs/design.md, "Roles and data flow"): the rollout actor adds the overlong penalty to a
trajectory's reward, and drops (and the driver refills) groups without signal when dynamic sampling is on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def overlong_penalty(response_length: int, max_length: int, buffer_length: int, penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476, "Overlong Reward Shaping"), scaled by `penalty`, to add
    to the reward:

        0                                              if |y| <= L_max - L_cache
        -penalty * (|y| - (L_max - L_cache)) / L_cache if L_max - L_cache < |y| <= L_max
        -penalty                                       if |y| > L_max

    with L_max = max_length (the generation budget) and L_cache = buffer_length (AlgorithmConfig.overlong_buffer;
    0 turns the ramp into a step: only responses longer than max_length are penalised).
    """
    if not 0 <= buffer_length <= max_length:
        raise ValueError(
            f"overlong buffer_length must be in 0..max_length ({max_length}), got {buffer_length}: "
            "set algorithm.overlong_buffer below rollout.max_new_tokens"
        )
    ramp_start = max_length - buffer_length
    if response_length <= ramp_start:
        return 0.0
    if response_length > max_length:
        return -float(penalty)
    return -float(penalty) * (response_length - ramp_start) / buffer_length


def group_has_signal(rewards: Sequence[float], eps: float = 1e-6) -> bool:
    """DAPO dynamic sampling (arXiv 2503.14476, "Dynamic Sampling"): keep a group only if its rewards differ, i.e.
    their (population) std exceeds eps. A group that is all right or all wrong has zero GRPO advantage everywhere
    and only dilutes the batch; a single-trajectory or empty group has no signal either."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return rewards.size > 0 and float(rewards.std()) > eps
