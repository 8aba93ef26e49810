"""The "reasoning_gym" verifier: the math verifier's answer extraction, scored by reasoning-gym's own scorer.

The scorer is `score_answer(answer, entry)` of the prompt's task, with the entry rebuilt from the PromptRecord.
Two things differ from scoring inside reasoning-gym:
- the metadata went through msgpack, so its tuples are lists and non-str keys are str (resetrl.data);
  the scorers we use do not look at those fields (tests/test_verifiers.py checks basic_arithmetic and chain_sum);
- the scorer belongs to a dataset built with the task's default config, as `reasoning_gym.get_score_answer_fn`
  does; the few scorers that read `self.config` (e.g. decimal_arithmetic, puzzle24, time_intervals,
  polynomial_equations) then use the default values.
Some scorers give partial credit: e.g. basic_arithmetic's default scorer gives len(gold)/len(answer) when the
gold answer is a substring of the answer, so "-12" scores 2/3 against "12". Use "math" for exact numeric reward.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import reasoning_gym

from resetrl.record import PromptRecord
from resetrl.verifiers import register
from resetrl.verifiers.math_answer import extract_answer


@functools.lru_cache(maxsize=None)
def _scorer(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    try:
        return reasoning_gym.get_score_answer_fn(task)
    except ValueError as exc:
        raise ValueError(
            f"prompt task '{task}' is not a reasoning-gym dataset, so the 'reasoning_gym' verifier cannot score it; "
            "set algorithm.verifier to 'math' or data.task to a reasoning-gym dataset name"
        ) from exc


@register("reasoning_gym")
def reasoning_gym_verifier(response_text: str, prompt: PromptRecord) -> float:
    answer = extract_answer(response_text)
    if answer is None:
        return 0.0
    entry = {"question": prompt.question, "answer": prompt.answer, "metadata": prompt.metadata}
    return min(max(float(_scorer(prompt.task)(answer, entry)), 0.0), 1.0)
