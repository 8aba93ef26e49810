"""Chain arithmetic: the synthetic task whose every step is checkable (docs/algorithms.md, "Oracle").

A problem is a start number and 4-8 operations applied left to right:

    question  "From 12: +7 *2 -5 +3"
    response  "12+7=19</step>19*2=38</step>38-5=33</step>33+3=36</step>Answer: 36"

Each step uses the previous step's result, so one slip carries into every later step and the final answer: the
true first wrong step is what a reset should go back to, and `chain_lines` finds it. Every value stays in
0..MAX_VALUE (small numbers a tiny model can partly learn). Pure functions, no Ray, Redis or DeepSpeed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

MAX_VALUE = 99
STEP_DELIMITER = "</step>"  # resetrl's default algorithm.reset.step_delimiter
OPERATORS = "+-*"

_QUESTION = re.compile(r"^From (\d+):((?: [+\-*]\d+)+)$")
_OPERATION = re.compile(r" ([+\-*])(\d+)")
_EQUATION = re.compile(r"^(\d+)\s*([+\-*])\s*(\d+)\s*=\s*(-?\d+)$")
_ANSWER = re.compile(r"^Answer:\s*(-?\d+)$")


@dataclass(frozen=True)
class ChainProblem:
    start: int
    operations: tuple[tuple[str, int], ...]  # (operator, operand), applied left to right

    @property
    def question(self) -> str:
        return f"From {self.start}: " + " ".join(f"{op}{operand}" for op, operand in self.operations)

    def values(self) -> list[int]:
        """The running value before the first operation and after each one."""
        values = [self.start]
        for op, operand in self.operations:
            values.append(apply(values[-1], op, operand))
        return values

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def expert_steps(self) -> list[str]:
        """One equation per operation, without the delimiter and without the answer line (resetrl's
        expert_solution_text appends "Answer: X" itself)."""
        values = self.values()
        return [f"{a}{op}{operand}={b}" for (op, operand), a, b in zip(self.operations, values, values[1:])]


def apply(value: int, op: str, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    raise ValueError(f"unknown operator {op!r}: the chain task uses {OPERATORS}")


def response_text(steps: list[str], final_answer: int | str) -> str:
    """The response the policy is trained to write: the steps, each closed by the delimiter, then the answer."""
    return "".join(step + STEP_DELIMITER for step in steps) + f"Answer: {final_answer}"


@dataclass(frozen=True)
class ChainSpec:
    """What problems look like: min_ops..max_ops operations from `operators` on a start in 2..max_start; + and -
    take 1..9, * takes 2 or 3; every running value stays in 0..max_value."""

    min_ops: int = 4
    max_ops: int = 8
    operators: str = OPERATORS
    max_start: int = 20
    max_value: int = MAX_VALUE

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"chain task: need 1 <= min_ops <= max_ops, got {self.min_ops}..{self.max_ops}")
        if not self.operators or set(self.operators) - set(OPERATORS) or not {"+", "-"} & set(self.operators):
            raise ValueError(f"chain task: operators {self.operators!r} must hold + or - and only {OPERATORS}")
        if not 2 <= self.max_start <= self.max_value - 9:
            raise ValueError(f"chain task: need 2 <= max_start <= max_value - 9, got {self.max_start}, {self.max_value}")


def random_problem(rng: random.Random, spec: ChainSpec) -> ChainProblem:
    """A problem drawn from `spec`; an operation that would leave 0..max_value is never drawn."""
    value = rng.randint(2, spec.max_start)
    start, operations = value, []
    for _ in range(rng.randint(spec.min_ops, spec.max_ops)):
        choices = []
        if "+" in spec.operators:
            choices += [("+", n) for n in range(1, 10) if value + n <= spec.max_value]
        if "-" in spec.operators:
            choices += [("-", n) for n in range(1, 10) if value - n >= 0]
        if "*" in spec.operators:
            choices += [("*", n) for n in (2, 3) if 2 <= value and value * n <= spec.max_value]
        # Draw the operator first, so * is as likely as + or - whenever it is allowed.
        op = rng.choice(sorted({op for op, _n in choices}))
        operand = rng.choice([n for o, n in choices if o == op])
        operations.append((op, operand))
        value = apply(value, op, operand)
    return ChainProblem(start, tuple(operations))


def unique_problems(rng: random.Random, count: int, spec: ChainSpec, exclude: set[str] = frozenset()) -> list[ChainProblem]:
    """`count` problems with distinct questions, none of them in `exclude`."""
    seen, problems = set(exclude), []
    for _ in range(count * 100):
        problem = random_problem(rng, spec)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
            if len(problems) == count:
                return problems
    raise ValueError(f"could not draw {count} distinct chain problems from {spec}: ask for fewer")


def parse_question(question: str) -> ChainProblem | None:
    """"From 12: +7 *2" -> ChainProblem(12, (("+", 7), ("*", 2))); None for any other text."""
    match = _QUESTION.match(question.strip())
    if match is None:
        return None
    operations = tuple((op, int(n)) for op, n in _OPERATION.findall(match.group(2)))
    return ChainProblem(int(match.group(1)), operations)


def corrupted_steps(problem: ChainProblem, wrong_step: int, rng: random.Random) -> tuple[list[str], int]:
    """(steps, final answer) of a trace whose first mistake is step `wrong_step` (1-based; len(operations) + 1 is
    the answer step), for localisation examples. The mistake is a miscalculation, a mis-copied operand or
    operator, or a mis-copied previous result; later steps compute correctly from the wrong value, as a model that
    slipped once would. The answer line is the last element of `steps`."""
    count = len(problem.operations)
    if not 1 <= wrong_step <= count + 1:
        raise ValueError(f"wrong_step must be in 1..{count + 1} for a chain of {count} operations, got {wrong_step}")
    value, steps = problem.start, []
    for number, (op, operand) in enumerate(problem.operations, start=1):
        left, result = value, apply(value, op, operand)
        if number == wrong_step:
            left, op, operand, result = _slip(value, op, operand, rng)
        steps.append(f"{left}{op}{operand}={result}")
        value = result
    final = value
    if wrong_step == count + 1:
        final = rng.choice([v for v in range(max(0, value - 3), value + 4) if v != value])
    return steps + [f"Answer: {final}"], final


def _slip(value: int, op: str, operand: int, rng: random.Random) -> tuple[int, str, int, int]:
    """(left, op, operand, result) of one wrong equation in place of `value op operand`, all numbers >= 0."""
    right = apply(value, op, operand)
    kind = rng.choice(["result", "operand", "operator", "carry"])
    left, wrong_op, wrong_operand = value, op, operand
    if kind == "operand":
        wrong_operand = rng.choice([n for n in ((2, 3) if op == "*" else range(1, 10)) if n != operand])
    elif kind == "operator":
        wrong_op = rng.choice([o for o in OPERATORS if o != op])
        wrong_operand = min(operand, 3) if wrong_op == "*" else operand
    elif kind == "carry":
        left = rng.choice([v for v in range(max(0, value - 3), value + 4) if v != value])
    result = apply(left, wrong_op, wrong_operand)
    if result < 0:  # values never go below 0 in this task: make it a miscalculation instead
        kind, left, wrong_op, wrong_operand = "result", value, op, operand
    if kind == "result" or (left, result) == (value, right):
        result = rng.choice([v for v in range(max(0, right - 3), right + 4) if v != right])
    return left, wrong_op, wrong_operand, result


def chain_lines(steps: list[str], prompt) -> int | None:
    """Step checker (resetrl.algorithms.step_checkers, "chain_lines"): the 1-based number of the first wrong step
    of a chain-task trace, or None when every step given is right (a complete correct trace, or one cut short).

    `steps` are the trace's steps without the delimiter; `prompt.question` is the chain. Step i <= n (n
    operations) must be "a op b = c" with a the true value so far, (op, b) the question's i-th operation and
    c = a op b; step n + 1 must be "Answer: X" with X the chain's value. Anything else at a position is wrong
    there (a malformed line, an early answer, an extra equation, any step after the answer).
    """
    problem = parse_question(getattr(prompt, "question", "") or "")
    if problem is None:
        raise ValueError(
            f"step checker chain_lines: question {getattr(prompt, 'question', None)!r} is not a chain problem "
            "('From N: +a *b -c ...'); use algorithm.reset.step_checker=chain_lines only with the chain testbed's data"
        )
    values = problem.values()
    count = len(problem.operations)
    for number, step in enumerate(steps, start=1):
        text = step.replace(STEP_DELIMITER, " ").strip()
        if number <= count:
            equation = _EQUATION.match(text)
            op, operand = problem.operations[number - 1]
            if equation is None or (int(equation.group(1)), equation.group(2), int(equation.group(3)),
                                    int(equation.group(4))) != (values[number - 1], op, operand, values[number]):
                return number
        else:
            answer = _ANSWER.match(text)
            if number > count + 1 or answer is None or int(answer.group(1)) != values[-1]:
                return number
    return None
