"""VinePPO (Kazemnejad et al., ICML 2025, arXiv 2410.01679): step advantages from Monte Carlo state values.

A language environment can be restarted from any prefix, so the value of the state after step t needs no critic:
sample K continuations from prompt + steps 1..t and average their outcome rewards (section 4):

    V_MC(s_t) = 1/K * sum_{k=1..K} R(eta_k),    eta_k ~ pi(. | s_t)

and each step's advantage is the one-step temporal difference of those values, with gamma = 1 and no reward
before the end (the outcome reward r is paid on the last step):

    A(s_t, a_t) = r(s_t, a_t) + gamma * V_MC(s_{t+1}) - V_MC(s_t)  =  V(t+1) - V(t),   V(end) = r

Every token of a step carries that step's advantage; the policy loss is PPO-clip. It is the reset primitive (continue
from a prefix) applied at every step boundary, so a natural baseline for RRPO/SRPO (docs/algorithms.md), at the
cost of K continuations per boundary. To bound that cost, a trajectory with many steps is cut into at most
`max_boundaries` chunks of consecutive steps, and values are estimated only between chunks.

Pure functions, no Ray, Redis or DeepSpeed (docs/design.md). The rollout side samples the continuations.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def boundary_steps(num_steps: int, max_boundaries: int) -> list[int]:
    """The chunk ends of a trajectory of `num_steps` steps: C = min(num_steps, max_boundaries) chunks of
    consecutive steps, as even as possible; chunk c (1-based) ends after step floor(c * num_steps / C).

    Returns the C chunk ends as 1-based step numbers, ascending; the last is always num_steps (the terminal state,
    whose value is the trajectory's own reward). Monte Carlo values are estimated at the other C - 1: from the
    prompt + steps 1..b for each b in result[:-1]. With num_steps <= max_boundaries every step is its own chunk.
    Example: 10 steps, at most 4 chunks -> [2, 5, 7, 10] (chunks of 2, 3, 2 and 3 steps).
    """
    if num_steps < 1:
        raise ValueError(f"a trajectory needs at least one step, got num_steps={num_steps}")
    if max_boundaries < 1:
        raise ValueError(f"max_boundaries must be >= 1 (at least the terminal state), got {max_boundaries}")
    chunks = min(num_steps, max_boundaries)
    return [c * num_steps // chunks for c in range(1, chunks + 1)]


def mc_values(continuation_rewards: Sequence[Sequence[float]]) -> list[float]:
    """V_MC at each boundary: the mean outcome reward of its K continuations (section 4; K may differ per
    boundary). continuation_rewards[j] are the rewards of the continuations sampled from boundary j."""
    values = []
    for j, rewards in enumerate(continuation_rewards):
        if len(rewards) == 0:
            raise ValueError(f"boundary {j} has no continuation rewards; sample K >= 1 continuations per boundary")
        values.append(float(np.mean(np.asarray(rewards, dtype=np.float64))))
    return values


def step_advantages(v_start: float, boundary_values: Sequence[float], final_reward: float) -> list[float]:
    """One advantage per chunk: A_t = V(t) - V(t-1), t = 1..C, with

        V(0) = v_start               the prompt's value: the mean reward of the group's fresh samples, or of K
                                     continuations from the empty prefix
        V(t) = boundary_values[t-1]  the Monte Carlo value after chunk t, for the C - 1 interior boundaries
        V(C) = final_reward          the terminal state: the trajectory's own outcome reward

    (gamma = 1, no intermediate reward). The advantages telescope: their sum is final_reward - v_start, the
    trajectory's outcome advantage against the prompt's value, redistributed over the chunks that earned it.
    """
    values = [float(v_start), *map(float, boundary_values), float(final_reward)]
    return [values[t] - values[t - 1] for t in range(1, len(values))]


def token_advantages(
    chunk_token_starts: Sequence[int], advantages: Sequence[float], response_length: int
) -> np.ndarray:
    """Per-token advantages of one response: chunk c's advantage on its tokens, chunk_token_starts[c] up to the
    next chunk's start (the last chunk runs to response_length).

    chunk_token_starts are response-token offsets, non-decreasing, within 0..response_length (an empty chunk gets
    no token); usually chunk_token_starts[0] = 0, and tokens before it (a kept prefix) get 0.
    Returns float32 [response_length].
    """
    if len(chunk_token_starts) != len(advantages):
        raise ValueError(
            f"{len(chunk_token_starts)} chunk starts but {len(advantages)} advantages; give one advantage per chunk"
        )
    starts = [int(s) for s in chunk_token_starts]
    if any(not 0 <= s <= response_length for s in starts) or any(a > b for a, b in zip(starts, starts[1:])):
        raise ValueError(
            f"chunk_token_starts must be non-decreasing offsets within 0..{response_length} (the response length); "
            f"got {starts}"
        )
    out = np.zeros(response_length, dtype=np.float32)
    ends = starts[1:] + [response_length]
    for start, end, advantage in zip(starts, ends, advantages):
        out[start:end] = advantage
    return out
