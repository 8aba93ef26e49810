"""RRPO and SRPO: reset a failed trajectory at a step and resample from there (arXiv 2605.25507).

Per prompt (docs/algorithms.md, "RRPO" and "SRPO"): fresh samples give G1 and one failed *parent*; a reset step k
is chosen in the parent (uniformly for RRPO, by the policy itself for SRPO, at the true first wrong step for the
synthetic testbed's oracle); continuations sampled from prompt + the parent's steps 1..k-1 form G2. Advantages are
z-scores within G1 and within G2 separately, and G2 trains on its continuation tokens only. These are the pure
pieces of that recipe; the rollout side strings them together. No Ray, Redis or DeepSpeed here (docs/design.md).
"""

from __future__ import annotations

import random
import re

import numpy as np
import torch
from torch import Tensor

from resetrl.algorithms.advantages import group_advantages

_BOXED = "\\boxed{"
_INTEGER = re.compile(r"[+-]?[0-9]+")
# "Step 3", "step  3", "**Step 3**"; not "STEP 3" or "Step3" (the reference's rule, parse_localised_step).
_STEP_MENTION = re.compile(r"[Ss]tep\s+([0-9]+)")

# parse_localised_step sources that mean the model's answer named a step in range (localisation_parse_rate).
PARSED_SOURCES = frozenset({"boxed", "step_mention"})


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
    """SRPO's localisation request (the user message): in which step of this failed attempt does the error start?

    `steps` are the parent's step texts without the step delimiter; they are shown as "Step 1: ...", one per line.
    `final_answer` is the answer extracted from the attempt (None: no answer could be extracted). With
    `gold_answer` the correct answer is revealed (the paper's "reveal" variant; the reference's autonomy level 1).

    Written after the reference's default prompt (autonomy level 2, docs/algorithms.md): the model is told the
    answer is wrong and asked for the step where the error *originates* (a step whose claims cannot be justified
    from the problem and the earlier steps), not the later step where the symptom shows; not to solve the problem
    again; and to end with a line `\\boxed{N}`, N a step number, which parse_localised_step reads.
    """
    if not steps:
        raise ValueError("a localisation prompt needs at least one step of the failed attempt; got none")
    n = len(steps)
    attempt = "\n".join(f"Step {i}: {step.strip()}" for i, step in enumerate(steps, start=1))
    if final_answer is None:
        verdict = "This attempt does not reach a correct final answer."
    else:
        verdict = f"The final answer of this attempt, {final_answer.strip()}, is wrong."
    if gold_answer is not None:
        verdict += f" The correct answer is {gold_answer.strip()}."
    return (
        "Below is a problem and an attempt at it, written one step at a time.\n\n"
        f"Problem:\n{question.strip()}\n\n"
        f"Attempt:\n{attempt}\n\n"
        f"{verdict} So at least one step is wrong.\n\n"
        "Find the step where the error originates. That is the first step whose claims cannot be justified from "
        "the problem statement and the steps before it, not the later step where the mistake becomes visible: a "
        "misread condition, an unsupported assumption or a faulty deduction can look harmless for several steps "
        "before it produces a wrong result. Point at the origin, not at the symptom.\n\n"
        "Do not solve the problem again. Your only task is to name that step.\n\n"
        "Rules:\n"
        f"- Choose exactly one step number, from 1 to {n}.\n"
        "- Stop at the first step you cannot justify.\n"
        "- Your reply must end with a line holding only \\boxed{N}, where N is the number of that step (not the "
        "answer to the problem). Write nothing after it."
    )


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced; None if there is none or it is never closed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 1
    for i in range(start + len(_BOXED), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len(_BOXED):i]
    return None


def parse_localised_step(text: str, num_steps: int) -> tuple[int, str]:
    """Read the reset step from the model's localisation answer -> (k, source), 1 <= k <= num_steps.

    The rule of the reference code (its `_parse_error_step`, plus what its SRPO loop does with the result):
    1. Only the *last* `\\boxed{...}` is read (braces balanced). An integer N in it, 1 <= N <= num_steps, gives
       (N, "boxed"). N = 0 (the model says no step is wrong) gives (1, "no_error"): the reference returns 0 and
       its SRPO loop clamps it to step 1. Anything else in the last box (out of range, not an integer,
       "Step 3", never closed) falls through; earlier boxes are never read.
    2. Only the *last* "Step N" / "step N" mention (letter S of either case, then whitespace, then digits; the
       last box's text included) is read: 1 <= N <= num_steps gives (N, "step_mention"), otherwise it falls
       through; earlier mentions are never read.
    3. (1, "fallback"): reset at the first step, i.e. resample the whole response.
    An empty or whitespace-only answer gives (max(1, num_steps // 2), "empty") instead. The reference meant
    that for a zero-token output; in its SRPO loop a bug turns it into step 1, and a whitespace-only text would
    reach rule 3 there.

    Out-of-range numbers are skipped, never clamped. The last mention wins even where it misreads the model
    ("the error is in step 2; step 4 is fine" gives 4). PARSED_SOURCES are the sources that named a step.
    """
    if num_steps < 1:
        raise ValueError(f"a parent needs at least one step to localise an error in, got num_steps={num_steps}")
    if not text.strip():
        return max(1, num_steps // 2), "empty"
    boxed = _last_boxed(text)
    if boxed is not None and _INTEGER.fullmatch(boxed.strip()):
        k = int(boxed)
        if k == 0:
            return 1, "no_error"
        if 1 <= k <= num_steps:
            return k, "boxed"
    mentions = _STEP_MENTION.findall(text)
    if mentions and 1 <= int(mentions[-1]) <= num_steps:
        return int(mentions[-1]), "step_mention"
    return 1, "fallback"


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
    g1_rewards: list[float] | Tensor,
    g2_rewards: list[float] | Tensor,
    std_normalize: bool = True,
    ddof: int = 1,
) -> tuple[Tensor, Tensor]:
    """RRPO/SRPO advantages: a GRPO z-score within G1 and, separately, within G2 (group_advantages; a group whose
    rewards are all equal gets 0). Normalising G2 on its own makes its advantages credit for the steps after the
    shared prefix only. std_normalize=False is the Dr.GRPO variant (centering only). ddof=0 is the population std
    the reference code uses (numpy's default; it adds no eps and zeroes groups with std < 1e-8); ddof=1 the sample
    std of GRPO."""
    g1 = torch.as_tensor(g1_rewards, dtype=torch.float32).reshape(-1)
    g2 = torch.as_tensor(g2_rewards, dtype=torch.float32).reshape(-1)
    both = group_advantages(torch.cat([g1, g2]), ["g1"] * g1.numel() + ["g2"] * g2.numel(),
                            std_normalize=std_normalize, ddof=ddof)
    return both[: g1.numel()], both[g1.numel():]
