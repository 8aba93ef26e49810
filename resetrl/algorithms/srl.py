"""SRL — Supervised Reinforcement Learning (arXiv 2510.25992; docs/algorithms.md, "SRL").

An expert solution s_1..s_N becomes N-1 instances: problem + s_1..s_{k-1}, target s_k, for k = 2..N. The model
answers `<think>...</think>` and then its step; only the step is scored, by its similarity to s_k:

    r = difflib.SequenceMatcher(None, step, s_k).ratio()  in [0, 1];  malformed output -> -1

GRPO runs on these rewards, and dynamic sampling keeps an instance only if its rewards differ (std > eps,
shaping.group_has_signal).
Pure functions, no Ray, Redis or DeepSpeed (docs/design.md, "Roles and data flow").
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

THINK_CLOSE = "</think>"
MALFORMED_REWARD = -1.0


@dataclass(frozen=True)
class SRLInstance:
    step: int  # k, 1-based index of the target step in the expert solution
    previous_steps: tuple[str, ...]  # s_1..s_{k-1}
    target: str  # s_k


def srl_instances(steps: list[str]) -> list[SRLInstance]:
    """N expert steps -> N-1 instances, k = 2..N (the paper's step-wise decomposition; k = 1 has no context)."""
    return [SRLInstance(k, tuple(steps[: k - 1]), steps[k - 1]) for k in range(2, len(steps) + 1)]


def srl_prompt(question: str, previous_steps: tuple[str, ...] | list[str]) -> str:
    """The user message of one instance: the problem, the expert's steps so far, and the request for the next one."""
    shown = "\n".join(f"Step {i}: {step}" for i, step in enumerate(previous_steps, start=1))
    return (
        f"Problem: {question}\n\nThe solution so far:\n{shown}\n\n"
        f"Think about what comes next inside <think> and </think>, then write only step {len(previous_steps) + 1} "
        "of the solution after </think>."
    )


def parse_step(response: str, require_think: bool = True) -> str | None:
    """The step the model wrote: the text after the last `</think>`, stripped. None when malformed: no
    `</think>` (unless require_think is False, then the whole response is the step) or nothing after it."""
    if THINK_CLOSE in response:
        step = response.rsplit(THINK_CLOSE, 1)[1]
    elif require_think:
        return None
    else:
        step = response
    step = step.strip()
    return step or None


def step_similarity_reward(response: str, target: str, require_think: bool = True) -> float:
    """SRL's reward: SequenceMatcher ratio of the parsed step vs the expert step; -1 for a malformed response.

    ratio = 2 M / (|a| + |b|) with M the matched characters (difflib), so 1.0 is an exact copy and 0.0 shares
    nothing. Whitespace is normalised first, so a reflowed line is not punished.
    """
    step = parse_step(response, require_think)
    if step is None:
        return MALFORMED_REWARD
    return difflib.SequenceMatcher(None, " ".join(step.split()), " ".join(target.split())).ratio()

