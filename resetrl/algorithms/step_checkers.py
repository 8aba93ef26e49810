"""Step checkers: where a reasoning trace first goes wrong, when every step can be checked (docs/benchmarks.md,
"Synthetic testbed").

A step checker is a pure function `first_wrong_step(steps: list[str], prompt) -> int | None`: `steps` are the
trace's step texts in order (as the reset rollout splits a parent: one step per element, delimiter removed),
`prompt` the problem (a PromptRecord: `.question`, `.answer`). It returns the 1-based number of the first wrong
step, or None when every step it sees checks out (e.g. a trace cut off before its answer). Knowing the true first
wrong step gives the oracle reset (algorithm.name=oracle) and a way to score SRPO's self-localisation.
Register one with `@register("name")`, look it up with `get_step_checker(name)` (algorithm.reset.step_checker).
No Ray, Redis or DeepSpeed here: pure functions.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from resetrl.registry import Registry

StepChecker = Callable[[list[str], Any], "int | None"]

STEP_CHECKERS: Registry[StepChecker] = Registry("step checker", "algorithm.reset.step_checker")
register = STEP_CHECKERS.register  # @register("name") makes a function available as get_step_checker("name")
get_step_checker = STEP_CHECKERS.get
registered = STEP_CHECKERS.names


_INT = r"[+-]?\d+"
_EQUATION = re.compile(rf"^({_INT})\s*([+\-*])\s*({_INT})\s*=\s*({_INT})$")
_ANSWER = re.compile(rf"^answer\s*:\s*({_INT})\.?$", re.IGNORECASE)
_CHAIN_TERM = re.compile(r"\s*([+-])\s*(\d+)")
_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def chain_operations(question: str) -> list[tuple[str, int]] | None:
    """'3 + 5 - 2' -> [('+', 3), ('+', 5), ('-', 2)]: a chain of + and - over non-negative ints, else None.

    Only + and - chains are read: evaluated left to right they give the same value as with precedence, so the
    expected i-th step is unambiguous ("running total op term").
    """
    text = question.strip()
    head = re.match(r"\s*(\d+)", text)
    if head is None:
        return None
    terms = [("+", int(head.group(1)))]
    position = head.end()
    while position < len(text):
        match = _CHAIN_TERM.match(text, position)
        if match is None:
            return None
        terms.append((match.group(1), int(match.group(2))))
        position = match.end()
    return terms if len(terms) > 1 else None


@register("arithmetic_lines")
def arithmetic_lines(steps: list[str], prompt) -> int | None:
    """First wrong step of a trace written one equation per line: "a op b = c" (ints; + - *), then "Answer: X".

    A step is wrong when it is
    - malformed (neither "a op b = c" nor "Answer: X"),
    - arithmetically wrong (a op b != c, checked exactly),
    - off the problem's chain, when the question is a + / - chain ("3 + 5 - 2 + 4", read by chain_operations):
      equation i must be "running total op_i term_i" (so a copied-wrong operand or a skipped term is wrong, not
      only a miscalculation), and an equation after the chain is complete is wrong,
    - an answer line that disagrees with the last equation's result or with the gold answer (prompt.answer),
      or an answer before the chain is complete; anything after the answer line is wrong too.
    None when no step is wrong: e.g. a trace that stops (truncated) before its answer line.
    """
    chain = chain_operations(getattr(prompt, "question", "") or "")
    gold = str(getattr(prompt, "answer", "")).strip()
    running = chain[0][1] if chain else None  # the value the next equation must start from
    equations = 0
    last_result = None
    answered = False
    for number, step in enumerate(steps, start=1):
        text = step.strip()
        if answered:
            return number
        answer = _ANSWER.match(text)
        if answer is not None:
            value = int(answer.group(1))
            if last_result is None or value != last_result or (gold and str(value) != gold):
                return number
            if chain is not None and equations != len(chain) - 1:
                return number
            answered = True
            continue
        equation = _EQUATION.match(text)
        if equation is None:
            return number
        a, op, b, c = int(equation.group(1)), equation.group(2), int(equation.group(3)), int(equation.group(4))
        if _OPERATIONS[op](a, b) != c:
            return number
        if chain is not None:
            if equations + 1 >= len(chain):
                return number
            expected_op, expected_term = chain[equations + 1]
            if (a, op, b) != (running, expected_op, expected_term):
                return number
            running = c
        equations += 1
        last_result = c
    return None


# The chain testbed's checker lives with its task (bench/synthetic_testbed.py); registered here so the name is known
# wherever step checkers are looked up.
from resetrl.testbed.chain_task import chain_lines  # noqa: E402

register("chain_lines", chain_lines)
