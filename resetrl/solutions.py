"""Worked solutions as text: split into expert steps, and the final answer in the two conventions datasets use.

- GSM8K: the solution ends with a line `#### <answer>`; `<<a*b=c>>` notes record what the annotators' calculator
  computed and are not part of the prose.
- MATH (Hendrycks et al. 2021): the answer is the last `\\boxed{...}` (or `\\fbox{...}`) of the solution.

SRL and SuperRL train on the expert steps (docs/algorithms.md); the verifier scores against the final answer.
"""

from __future__ import annotations

import re

_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
_FINAL_ANSWER_LINE = re.compile(r"^\s*####\s*(.*?)\s*$")
_BOX_OPENERS = ("\\boxed{", "\\fbox{")


def solution_steps(solution: str) -> list[str]:
    """An expert solution as a list of steps: one step per non-blank line, without GSM8K calculator notes
    (`<<a*b=c>>`) and without the final `#### answer` line. A one-line solution is split on sentence ends."""
    lines = []
    for line in _CALCULATOR_NOTE.sub("", solution).splitlines():
        if line.strip() and not _FINAL_ANSWER_LINE.match(line):
            lines.append(" ".join(line.split()))
    if len(lines) == 1:
        lines = [piece.strip() for piece in re.split(r"(?<=[.!?])\s+", lines[0]) if piece.strip()]
    return lines


def gsm_final_answer(solution: str) -> str | None:
    """The answer after GSM8K's `####` marker, without thousands separators; None when there is no marker."""
    for line in reversed(solution.splitlines()):
        if match := _FINAL_ANSWER_LINE.match(line):
            return match.group(1).replace(",", "")
    return None


def last_boxed(solution: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` in `solution`, braces balanced (`\\boxed{\\frac{1}{2}}`
    gives `\\frac{1}{2}`); None when there is none or its braces never close."""
    start = max(solution.rfind(opener) + len(opener) if opener in solution else -1 for opener in _BOX_OPENERS)
    if start < 0:
        return None
    depth = 1
    for index in range(start, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[index], 0)
        if depth == 0:
            return solution[start:index].strip()
    return None


def expert_solution_text(steps: list[str], answer: str, step_end: str = "\n") -> str:
    """The expert solution as a training target (SuperRL's SFT): each step followed by `step_end`, then the answer
    line; the default is the default prompt template's format ("step\nstep\nAnswer: X")."""
    return "".join(step + step_end for step in steps) + f"Answer: {answer}"
