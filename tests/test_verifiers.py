"""Verifiers: answer extraction from real-looking model outputs, and the scores they give."""

from __future__ import annotations

import threading

import msgpack
import pytest
import reasoning_gym

from resetrl.record import PromptRecord, decode_prompt, encode_prompt
from resetrl.verifiers import get_verifier, register
from resetrl.verifiers.math_answer import extract_answer


def prompt_with_answer(answer: str, task: str = "basic_arithmetic") -> PromptRecord:
    return PromptRecord(prompt_id="t-0-0", question="Calculate it.", answer=answer, task=task)


# (response, gold answer, extracted answer, math score): the shapes SmolLM2-135M-Instruct writes.
CASES = [
    ("3 + 9 = 12, so the answer is \\boxed{12}.", "12", "12", 1.0),
    ("We add them.\n3 + 9 = 12\nAnswer: 12", "12", "12", 1.0),
    ("First, 3 + 9 = 12.\nThe answer is 12.", "12", "12", 1.0),
    ("**Answer:** 12", "12", "12", 1.0),
    ("**Answer: 12**", "12", "12", 1.0),
    ("The final answer is: $12$", "12", "12", 1.0),
    ("Answer:\n12", "12", "12", 1.0),
    ("The final answer to the arithmetic problem is 12.", "12", "12", 1.0),
    ("To answer this, add them: 3 + 9 = 12", "12", None, 0.0),
    ("Answer: 3 + 9 = 12", "12", "12", 1.0),
    ("Answer: <12>", "12", "12", 1.0),
    ("ANSWER: 12 apples", "12", "12 apples", 1.0),
    ("3 + 9 = 13\nAnswer: 13", "12", "13", 0.0),
    ("Answer: 12\nWait, 3 + 9 = 11.\nAnswer: 11", "12", "11", 0.0),
    ("Let's think. 3 plus 9 is twelve.", "12", None, 0.0),
    ("3 + 9 is 12", "12", None, 0.0),
    ("Answer: -4", "-4", "-4", 1.0),
    ("Answer: \u22124", "-4", "-4", 1.0),
    ("Answer: 4", "-4", "4", 0.0),
    ("\\boxed{-4}", "4", "-4", 0.0),
    ("The answer is \\boxed{\\frac{3}{4}}.", "3/4", "\\frac{3}{4}", 1.0),
    ("Answer: 0.75", "3/4", "0.75", 1.0),
    ("Answer: 6/8", "3/4", "6/8", 1.0),
    ("Answer: 1,234", "1234", "1234", 1.0),
    ("Answer: $1{,}234$.", "1234", "1234", 1.0),
    ("Answer: 1,234,567", "1234567", "1234567", 1.0),
    ("Answer: 12.0", "12", "12.0", 1.0),
    ("Answer: 3 + 9", "12", "3 + 9", 0.0),  # restating the question is not answering it
    ("State the final answer to the following arithmetic problem: 0 + 12 =", "12", "0 + 12", 0.0),
    ("Answer: 12.5", "12", "12.5", 0.0),
    ("\\boxed{12}\nAnswer: 13", "12", "12", 1.0),  # \boxed wins over an Answer line
    ("so \\boxed{\\frac{1}{2", "1/2", None, 0.0),  # truncated by the token limit: braces never close
    ("Answer:", "12", None, 0.0),
    ("", "12", None, 0.0),
]


@pytest.mark.parametrize("response, gold, extracted, score", CASES)
def test_math_verifier_on_model_outputs(response, gold, extracted, score):
    assert extract_answer(response) == extracted
    assert get_verifier("math")(response, prompt_with_answer(gold)) == score


def test_boxed_answer_keeps_nested_braces():
    assert extract_answer("so \\boxed{\\frac{1}{2}} and more text") == "\\frac{1}{2}"


def test_math_verifier_works_outside_the_main_thread():
    # math-verify's timeout uses signal.alarm, which raises in any other thread (e.g. a threaded Ray actor).
    scores = []
    thread = threading.Thread(target=lambda: scores.append(get_verifier("math")("Answer: 7", prompt_with_answer("7"))))
    thread.start()
    thread.join()
    assert scores == [1.0]


def test_unknown_verifier_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown verifier 'exact' .*registered: .*math.*reasoning_gym"):
        get_verifier("exact")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register("math")(lambda response_text, prompt: 0.0)


def entry_as_prompt(task: str, index: int, **task_config) -> tuple[dict, PromptRecord]:
    """A reasoning-gym entry and the PromptRecord it becomes after a trip through the queue's wire format."""
    entry = reasoning_gym.create_dataset(task, size=index + 1, seed=3, **task_config)[index]
    metadata = msgpack.unpackb(msgpack.packb(entry["metadata"]))  # tuples come back as lists
    record = PromptRecord(f"{task}-3-{index}", entry["question"], entry["answer"], task, metadata)
    return entry, decode_prompt(encode_prompt(record))


@pytest.mark.parametrize("task", ["basic_arithmetic", "chain_sum"])
def test_reasoning_gym_verifier_scores_like_the_task_scorer(task):
    entry, prompt = entry_as_prompt(task, 5, min_terms=2, max_terms=3, min_digits=1, max_digits=2)
    assert isinstance(entry["metadata"]["difficulty"]["num_terms"], tuple)
    assert isinstance(prompt.metadata["difficulty"]["num_terms"], list)
    gold = entry["answer"]
    verifier = get_verifier("reasoning_gym")
    assert verifier(f"Some working.\nAnswer: {gold}", prompt) == 1.0
    assert verifier(f"\\boxed{{{gold}}}", prompt) == 1.0
    assert verifier("I don't know.", prompt) == 0.0
    wrong = str(int(gold) + 1000)
    score_fn = reasoning_gym.get_score_answer_fn(task)
    assert verifier(f"Answer: {wrong}", prompt) == score_fn(wrong, entry) < 1.0


def test_chain_sum_scorer_tolerates_format():
    _, prompt = entry_as_prompt("chain_sum", 0, min_terms=2, max_terms=2, min_digits=3, max_digits=3)
    assert get_verifier("reasoning_gym")(f"Answer: {int(prompt.answer):,}.00", prompt) == 1.0


def test_basic_arithmetic_scorer_gives_partial_credit_that_math_does_not():
    # basic_arithmetic's scorer credits len(gold)/len(answer) when the gold answer is a substring of the answer.
    prompt = prompt_with_answer("12", task="basic_arithmetic")
    assert get_verifier("reasoning_gym")("Answer: -12", prompt) == pytest.approx(2 / 3)
    assert get_verifier("math")("Answer: -12", prompt) == 0.0


def test_reasoning_gym_verifier_names_an_unknown_task():
    with pytest.raises(ValueError, match="algorithm.verifier"):
        get_verifier("reasoning_gym")("Answer: 1", prompt_with_answer("1", task="not_a_task"))
