"""Step checkers (the true first wrong step of a checkable trace) and the oracle reset that uses them.

Hand-made arithmetic traces with the wrong step known by construction; then the oracle path of the reset rollout
on the real tiny HF engine, with a step checker registered by the test so the true step is known for any text.
"""

from __future__ import annotations

import random

import pytest

from resetrl.actors.engines import SamplingSettings
from resetrl.methods import get_method
from resetrl.actors.trajectories import RolloutContext
from resetrl.algorithms.resets import oracle_reset_step
from resetrl.algorithms.step_checkers import arithmetic_lines, chain_operations, get_step_checker, register
from resetrl.config import ConfigError, config_from_dict
from resetrl.data import render_prompt
from resetrl.record import PromptRecord

CHAIN = PromptRecord("p0", "3 + 5 - 2 + 4", "10", "synthetic")
CORRECT = ["3 + 5 = 8", "8 - 2 = 6", "6 + 4 = 10", "Answer: 10"]


def with_step(index: int, text: str) -> list[str]:
    steps = list(CORRECT)
    steps[index - 1] = text
    return steps


def test_a_correct_trace_has_no_wrong_step():
    assert arithmetic_lines(CORRECT, CHAIN) is None


@pytest.mark.parametrize("steps, expected", [
    (with_step(2, "8 - 2 = 5"), 2),                      # miscalculated
    (with_step(2, "8 - 3 = 5"), 2),                      # arithmetic right, but the question says "- 2"
    (["3 + 5 = 9", "9 - 2 = 7", "7 + 4 = 11", "Answer: 11"], 1),  # the error propagates; the first one counts
    (with_step(3, "6 + 4 equals 10"), 3),                # malformed
    (with_step(4, "Answer: 11"), 4),                     # the answer disagrees with the last result
    (["3 + 5 = 8", "8 - 2 = 6", "Answer: 6"], 3),        # answered before the chain is complete
    (CORRECT[:3] + ["10 + 1 = 11", "Answer: 11"], 4),    # an equation after the chain is complete
    (CORRECT + ["Answer: 10"], 5),                       # anything after the answer
])
def test_the_first_wrong_step_is_found(steps, expected):
    assert arithmetic_lines(steps, CHAIN) == expected


def test_a_trace_cut_off_before_its_answer_has_no_visible_wrong_step():
    assert arithmetic_lines(CORRECT[:2], CHAIN) is None


def test_without_a_chain_question_lines_are_checked_by_arithmetic_and_gold_answer_only():
    prompt = PromptRecord("p1", "What is 6 times 7?", "42", "synthetic")
    assert arithmetic_lines(["6 * 7 = 42", "Answer: 42"], prompt) is None
    assert arithmetic_lines(["6 * 7 = 41", "Answer: 41"], prompt) == 1
    assert arithmetic_lines(["6 * 7 = 42", "Answer: 43"], prompt) == 2


def test_chain_questions_are_read_left_to_right():
    assert chain_operations("3 + 5 - 2") == [("+", 3), ("+", 5), ("-", 2)]
    assert chain_operations("3 * 5") is None and chain_operations("7") is None


def test_the_oracle_resets_at_the_true_first_wrong_step_or_at_the_last_step():
    assert oracle_reset_step(arithmetic_lines(with_step(2, "8 - 2 = 5"), CHAIN), 4) == 2
    assert oracle_reset_step(None, 4) == 4  # nothing visible is wrong: resample the ending
    assert oracle_reset_step(9, 4) == 4
    with pytest.raises(ValueError):
        oracle_reset_step(1, 0)


def test_oracle_needs_a_registered_step_checker():
    with pytest.raises(ConfigError, match="algorithm.reset.step_checker"):
        config_from_dict({"algorithm": {"name": "oracle"}})
    with pytest.raises(ConfigError, match="not a registered step checker"):
        config_from_dict({"algorithm": {"name": "oracle", "reset": {"step_checker": "nope"}}})
    cfg = config_from_dict({"algorithm": {"name": "oracle", "reset": {"step_checker": "arithmetic_lines"}}})
    assert cfg.records_per_prompt == 8 and cfg.algorithm.dual_clip == 3.0
    assert get_step_checker("arithmetic_lines") is arithmetic_lines


@register("test_second_to_last_step")
def second_to_last_step(steps: list[str], prompt) -> int | None:
    """A checker for any text: the true first wrong step is the second-to-last (None for one-step parents)."""
    return len(steps) - 1 if len(steps) > 1 else None


def even_length_reward(text: str, prompt: PromptRecord) -> float:
    return float(len(text.split()) % 2 == 0)


def run_with_checker(tiny_hf, method: str):
    engine, tokenizer = tiny_hf
    cfg = config_from_dict({
        "algorithm": {"name": method, "reset": {"step_delimiter": " ", "step_checker": "test_second_to_last_step"}},
        "rollout": {"max_new_tokens": 12},
    })
    ctx = RolloutContext(cfg, engine, tokenizer, even_length_reward,
                         SamplingSettings(max_new_tokens=12, temperature=1.0), policy_version=0, rng=random.Random(0))
    prompts = [PromptRecord(f"p{i}", f"What is {i} + {i}?", str(2 * i), "basic_arithmetic") for i in range(6)]
    ids = [render_prompt(tokenizer, cfg.data, p) for p in prompts]
    records = get_method(cfg.algorithm.name).rollout(ctx, prompts, [f"{p.prompt_id}@0" for p in prompts], ids)
    return ctx, prompts, records


def test_the_oracle_rollout_resets_each_parent_at_the_checkers_step(tiny_hf):
    ctx, prompts, records = run_with_checker(tiny_hf, "oracle")
    stats = ctx.stats
    assert stats["resets"] > 0 and len(records) == 8 * len(prompts)
    assert stats["localisations"] == 0  # the oracle never asks the policy
    # Every parent with >1 step resets at n - 1, one-step parents (checker None) at their only step.
    unknown = stats["first_wrong_step_unknown"]
    assert stats["reset_step_sum"] == stats["parent_steps_sum"] - (stats["resets"] - unknown)
    assert stats["localisation_checked"] == stats["resets"] - unknown
    assert stats["localisation_correct"] == stats["localisation_checked"]


def test_rrpo_localisation_is_scored_against_the_checker_as_the_random_baseline(tiny_hf):
    ctx, _prompts, _records = run_with_checker(tiny_hf, "rrpo")
    stats = ctx.stats
    assert stats["localisation_checked"] == stats["resets"] - stats["first_wrong_step_unknown"] > 0
    # Uniform k in 1..n hits n - 1 about 1/n of the time: rarely always, for these 8-12-step parents.
    assert stats["localisation_correct"] < stats["localisation_checked"]
