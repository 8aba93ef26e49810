"""RRPO and SRPO: reset a failed trajectory at a step and resample from there (arXiv 2605.25507).

Per prompt (ALGORITHMS.md, "RRPO" and "SRPO"): fresh samples give G1 and one failed *parent*; a reset step k is
chosen in the parent (uniformly for RRPO, by the policy itself for SRPO, at the true first wrong step for the
synthetic testbed's oracle); continuations sampled from prompt + the parent's steps 1..k-1 form G2. Advantages are z-scores within G1 and within G2 separately, and G2
trains on its continuation tokens only. These are the pure pieces of that recipe; the rollout actor strings them
together. No Ray, Redis or DeepSpeed here (STYLE.md).
"""

from __future__ import annotations

import random
import re

import numpy as np
import torch
from torch import Tensor

from resetrl.algorithms.advantages import grpo_advantages

# The number inside the last \boxed{...}: "\boxed{3}", "\boxed{ 3 }", "\boxed{Step 3}", "\boxed{-1}".
_BOXED_STEP = re.compile(r"\\boxed\{\s*(?:step\s*)?([+-]?\d+)\s*\}", re.IGNORECASE)
_STEP_MENTION = re.compile(r"\bstep\s*([+-]?\d+)", re.IGNORECASE)


def select_parent(rewards: list[float], g1_size: int, success_threshold: float = 1.0) -> tuple[list[int], int | None]:
    """Split the fresh samples drawn so far (rewards in sampling order) into G1 and the reset parent.

    - parent: the first sample with reward < success_threshold, but only once at least g1_size + 1 samples exist
      (before that, None: the parent must leave g1_size others for G1). None also when no sample failed.
    - G1: the first g1_size sample indices, skipping the parent (so with a parent, exactly g1_size of them).
      Without a parent: the first min(g1_size, len(rewards)) indices; the caller either samples more or, at
      ResetConfig.max_fresh_samples, falls back to a plain GRPO group.

    The parent is used for the reset only and never trained on. Example, g1_size 4 and rewards [1, 0, 1, 0, 1]:
    parent 1 (the first failure), G1 [0, 2, 3, 4].
    """
    if g1_size < 0:
        raise ValueError(f"g1_size must be >= 0 (ResetConfig.g1_size), got {g1_size}")
    parent = None
    if len(rewards) >= g1_size + 1:
        parent = next((i for i, reward in enumerate(rewards) if reward < success_threshold), None)
    g1 = [i for i in range(len(rewards)) if i != parent][:g1_size]
    return g1, parent


def random_reset_step(num_steps: int, rng: random.Random) -> int:
    """RRPO's reset step: uniform in 1..num_steps (the prefix is steps 1..k-1, so k = 1 resamples from scratch)."""
    if num_steps < 1:
        raise ValueError(f"a parent needs at least one step to reset, got num_steps={num_steps}")
    return rng.randint(1, num_steps)


def oracle_reset_step(first_wrong_step: int | None, num_steps: int) -> int:
    """The oracle reset step (algorithm.name=oracle): the true first wrong step, found by a step checker
    (resetrl.algorithms.step_checkers), clamped to 1..num_steps. It is the upper bound of what SRPO's
    self-localisation can reach. A failed parent in which the checker finds no wrong step (e.g. cut off before its
    answer) resets at its last step: every step before it checked out, so only the ending is resampled."""
    if num_steps < 1:
        raise ValueError(f"a parent needs at least one step to reset, got num_steps={num_steps}")
    if first_wrong_step is None:
        return num_steps
    return min(max(first_wrong_step, 1), num_steps)


def localisation_prompt(
    question: str, steps: list[str], final_answer: str | None, gold_answer: str | None = None
) -> str:
    """SRPO's localisation request (the user message): which step of this failed attempt is the first wrong one?

    `steps` are the parent's step texts without the step delimiter; they are shown as "Step 1: ...", one per line.
    `final_answer` is the answer extracted from the attempt (None: no answer could be extracted). With
    `gold_answer` the correct answer is revealed (the paper's "reveal" variant). The model is told not to solve
    the problem again and to answer \\boxed{k}, which parse_localised_step reads.
    """
    attempt = "\n".join(f"Step {i}: {step.strip()}" for i, step in enumerate(steps, start=1))
    if final_answer is None:
        verdict = "This attempt does not reach a correct final answer."
    else:
        verdict = f"The final answer of this attempt, {final_answer.strip()}, is wrong."
    if gold_answer is not None:
        verdict += f" The correct answer is {gold_answer.strip()}."
    return (
        "Below is a problem and an attempted solution written one step at a time.\n\n"
        f"Problem:\n{question.strip()}\n\n"
        f"Attempted solution:\n{attempt}\n\n"
        f"{verdict}\n"
        "Find the step where the error originates: the first step that contains a mistake. "
        "Do not solve the problem again.\n"
        f"Answer with the number of that step, between 1 and {len(steps)}, as \\boxed{{k}}."
    )


def parse_localised_step(text: str, num_steps: int) -> tuple[int, str]:
    """Read the step number from the model's localisation answer -> (k, source), k clamped to 1..num_steps.

    source is "boxed" (the last \\boxed{k} with an integer k, "\\boxed{Step 3}" included), else "step_mention"
    (the last "Step k" / "step k" in the text), else "fallback" (k = num_steps // 2), as ALGORITHMS.md describes the
    paper's rule. The *last* mention wins even where it misreads: "the error is in step 2 ... Step 4 is fine"
    gives 4; we keep the rule as specified rather than guess at the model's meaning. A parsed number out of range
    (0, 99, -1) is clamped but keeps its source label, so metrics count what the model wrote, not how it was
    repaired; the fallback is clamped too (num_steps 1 -> k 1).
    """
    if num_steps < 1:
        raise ValueError(f"a parent needs at least one step to localise an error in, got num_steps={num_steps}")
    boxed = _BOXED_STEP.findall(text)
    mentions = _STEP_MENTION.findall(text)
    if boxed:
        k, source = int(boxed[-1]), "boxed"
    elif mentions:
        k, source = int(mentions[-1]), "step_mention"
    else:
        k, source = num_steps // 2, "fallback"
    return min(max(k, 1), num_steps), source


def offset_reset_step(k: int, m: int, num_steps: int) -> int:
    """Reset m steps before the chosen step (ResetConfig.step_offset): k - m clamped to 1..num_steps."""
    return min(max(k - m, 1), num_steps)


def prefix_token_length(step_starts: list[int], reset_step: int) -> int:
    """Response tokens kept from the parent when resetting at step k: those of steps 1..k-1 = step_starts[k-1]."""
    if not 1 <= reset_step <= len(step_starts):
        raise ValueError(f"reset_step must be in 1..{len(step_starts)} (the parent's steps), got {reset_step}")
    return step_starts[reset_step - 1]


def suffix_loss_mask(prompt_length: int, prefix_length: int, total_length: int) -> np.ndarray:
    """uint8 [total_length] loss mask of a G2 trajectory (prompt + parent prefix + continuation): 1 on the
    continuation tokens only, so G2's reward difference credits the steps after the reset alone."""
    trained_from = prompt_length + prefix_length
    if min(prompt_length, prefix_length) < 0 or trained_from > total_length:
        raise ValueError(
            f"prompt_length {prompt_length} + prefix_length {prefix_length} must be non-negative and fit in "
            f"total_length {total_length}"
        )
    mask = np.zeros(total_length, dtype=np.uint8)
    mask[trained_from:] = 1
    return mask


def reset_advantages(
    g1_rewards: list[float] | Tensor, g2_rewards: list[float] | Tensor, std_normalize: bool = True
) -> tuple[Tensor, Tensor]:
    """RRPO/SRPO advantages: a GRPO z-score within G1 and, separately, within G2 (grpo_advantages; a group whose
    rewards are all equal gets 0). Normalising G2 on its own makes its advantages credit for the steps after the
    shared prefix only. std_normalize=False is the Dr.GRPO variant (centering only)."""
    g1 = grpo_advantages(torch.as_tensor(g1_rewards, dtype=torch.float32), std_normalize=std_normalize)
    g2 = grpo_advantages(torch.as_tensor(g2_rewards, dtype=torch.float32), std_normalize=std_normalize)
    return g1, g2
