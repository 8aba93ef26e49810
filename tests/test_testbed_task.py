"""The chain testbed's task (resetrl/testbed/chain_task.py) and its step checker `chain_lines`: a hand-checked
problem, generator invariants, and the first wrong step of hand-made traces."""

from __future__ import annotations

import json
import random

import pytest

from resetrl.algorithms.step_checkers import get_step_checker
from resetrl.algorithms.steps import split_steps
from resetrl.config import DataConfig
from resetrl.data import build_prompts
from resetrl.record import PromptRecord
from resetrl.testbed.chain_task import (
    STEP_DELIMITER, ChainProblem, ChainSpec, chain_lines, corrupted_steps, parse_question, random_problem,
    response_text, unique_problems,
)

# 12 +7 -> 19, *2 -> 38, -5 -> 33, +3 -> 36 (by hand)
PROBLEM = ChainProblem(12, (("+", 7), ("*", 2), ("-", 5), ("+", 3)))
PROMPT = PromptRecord("p0", "From 12: +7 *2 -5 +3", "36", "chain")
CORRECT = ["12+7=19", "19*2=38", "38-5=33", "33+3=36", "Answer: 36"]


def test_a_hand_checked_problem():
    assert PROBLEM.question == "From 12: +7 *2 -5 +3"
    assert PROBLEM.values() == [12, 19, 38, 33, 36]
    assert PROBLEM.answer == 36
    assert PROBLEM.expert_steps() == CORRECT[:-1]
    assert response_text(PROBLEM.expert_steps(), PROBLEM.answer) == (
        "12+7=19</step>19*2=38</step>38-5=33</step>33+3=36</step>Answer: 36")
    assert parse_question(PROBLEM.question) == PROBLEM


def test_the_response_splits_into_the_steps_the_checker_reads():
    text = response_text(PROBLEM.expert_steps(), PROBLEM.answer)
    steps = [text[a:b].replace(STEP_DELIMITER, "").strip() for a, b in split_steps(text, STEP_DELIMITER)]
    assert steps == CORRECT


def test_generated_problems_stay_in_range_and_repeat_under_a_seed():
    spec = ChainSpec(min_ops=4, max_ops=8, max_value=99)
    problems = [random_problem(random.Random(seed), spec) for seed in range(300)]
    assert problems[:20] == [random_problem(random.Random(seed), spec) for seed in range(20)]
    assert {len(p.operations) for p in problems} == set(range(4, 9))
    assert {op for p in problems for op, _n in p.operations} == {"+", "-", "*"}
    for p in problems:
        assert 2 <= p.start <= spec.max_start
        assert all(0 <= v <= 99 for v in p.values())
        assert all((1 <= n <= 9) if op in "+-" else n in (2, 3) for op, n in p.operations)
        assert parse_question(p.question) == p


def test_unique_problems_are_distinct_and_avoid_the_excluded():
    held = unique_problems(random.Random(0), 50, ChainSpec())
    rest = unique_problems(random.Random(1), 500, ChainSpec(), exclude={p.question for p in held})
    questions = [p.question for p in rest]
    assert len(set(questions)) == 500
    assert not set(questions) & {p.question for p in held}


def test_a_correct_trace_has_no_wrong_step():
    assert chain_lines(CORRECT, PROMPT) is None
    assert chain_lines(CORRECT[:2], PROMPT) is None  # cut short: nothing wrong yet
    assert chain_lines([" 12 + 7 = 19 ", "19*2=38</step>"], PROMPT) is None  # spaces and a leftover delimiter


def with_step(index: int, text: str) -> list[str]:
    steps = list(CORRECT)
    steps[index - 1] = text
    return steps


@pytest.mark.parametrize("steps, expected", [
    (with_step(2, "19*2=36"), 2),                                    # miscalculated
    (with_step(3, "38-6=32"), 3),                                    # arithmetic right, operand mis-copied
    (with_step(3, "38+5=43"), 3),                                    # operator mis-copied
    (with_step(2, "18*2=36"), 2),                                    # previous result mis-carried
    (["12+7=18", "18*2=36", "36-5=31", "31+3=34", "Answer: 34"], 1),  # the first slip counts, not its echoes
    (with_step(5, "Answer: 35"), 5),                                 # wrong final answer
    (with_step(2, "19 times 2 is 38"), 2),                           # malformed
    (["12+7=19", "19*2=38", "Answer: 38"], 3),                       # answer before the chain is done
    (CORRECT[:4] + ["36+1=37", "Answer: 37"], 5),                    # an equation after the last operation
    (CORRECT + ["Answer: 36"], 6),                                   # anything after the answer
])
def test_the_first_wrong_step_of_hand_made_traces(steps, expected):
    assert chain_lines(steps, PROMPT) == expected


def test_every_corruption_is_found_at_its_step():
    rng = random.Random(0)
    for problem in unique_problems(rng, 60, ChainSpec()):
        for wrong in range(1, len(problem.operations) + 2):
            steps, final = corrupted_steps(problem, wrong, rng)
            record = PromptRecord("p", problem.question, str(problem.answer), "chain")
            assert chain_lines(steps, record) == wrong, (problem, wrong, steps)
            assert steps[-1] == f"Answer: {final}"
            assert final != problem.answer or wrong <= len(problem.operations)


def test_it_is_registered_and_refuses_other_tasks():
    assert get_step_checker("chain_lines") is chain_lines
    with pytest.raises(ValueError, match="chain_lines.*not a chain problem"):
        chain_lines(["3 + 5 = 8"], PromptRecord("p", "3 + 5", "8", "other"))


def test_the_jsonl_rows_load_as_resetrl_reads_them(tmp_path):
    from resetrl.testbed.build import _write_problems

    path = tmp_path / "problems.jsonl"
    _write_problems(path, [PROBLEM])
    assert json.loads(path.read_text()) == {"id": "chain-0", "problem": PROMPT.question, "answer": "36",
                                            "steps": CORRECT[:-1]}
    [prompt] = build_prompts(DataConfig(source="jsonl", path=str(path)))  # what `resetrl train` reads
    assert (prompt.question, prompt.answer, prompt.metadata["expert_steps"]) == (PROMPT.question, "36", CORRECT[:-1])


def test_the_taught_localisation_answer_parses_as_its_step():
    from resetrl.algorithms.resets import parse_localised_step
    from resetrl.testbed.sft import localisation_answer

    assert localisation_answer(PROBLEM, 3) == "1: 12+7=19 ok\n2: 19*2=38 ok\n3: 38-5=33 wrong\n\\boxed{3}"
    assert localisation_answer(PROBLEM, 5).endswith("4: 33+3=36 ok\n5: Answer: 36 wrong\n\\boxed{5}")
    for k in range(1, 6):
        assert parse_localised_step(localisation_answer(PROBLEM, k), 5)[0] == k
