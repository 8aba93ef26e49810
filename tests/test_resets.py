"""RRPO/SRPO pieces (arXiv 2605.25507): parent selection, reset steps, localisation, masks and advantages."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from resetrl.algorithms.resets import (
    PARSED_SOURCES,
    localisation_prompt,
    offset_reset_step,
    parse_localised_step,
    prefix_token_length,
    random_reset_step,
    reset_advantages,
    select_parent,
    suffix_loss_mask,
)


def approx(values, abs=1e-5):
    return pytest.approx(values, abs=abs)


# ---------------------------------------------------------------- select_parent


@pytest.mark.parametrize(
    "rewards, expected",
    [
        ([1, 1, 1], ([0, 1, 2], None)),  # too few samples for G1 + a parent
        ([1, 0, 1, 1], ([0, 1, 2, 3], None)),  # a failure, but taking it would leave G1 three samples
        ([1, 0, 1, 1, 1], ([0, 2, 3, 4], 1)),  # the parent is skipped in G1
        ([1, 1, 1, 1, 0], ([0, 1, 2, 3], 4)),
        ([0, 0, 0, 0, 0], ([1, 2, 3, 4], 0)),  # the first failure is the parent, the next four are G1
        ([1, 0, 1, 0, 1, 0], ([0, 2, 3, 4], 1)),  # later failures stay in G1
        ([1] * 8, ([0, 1, 2, 3], None)),  # nothing failed: the caller falls back to a GRPO group
    ],
)
def test_select_parent(rewards, expected):
    assert select_parent(rewards, g1_size=4) == expected


def test_a_partial_reward_below_the_threshold_is_a_failure():
    assert select_parent([1.0, 0.9, 1.0], g1_size=2) == ([0, 2], 1)
    assert select_parent([1.0, 0.9, 1.0], g1_size=2, success_threshold=0.5) == ([0, 1], None)
    assert select_parent([0.5, 1.0, 1.0], g1_size=2, success_threshold=0.5) == ([0, 1], None)  # not below


def test_select_parent_with_an_empty_g1():
    assert select_parent([], g1_size=0) == ([], None)
    assert select_parent([1.0, 0.0], g1_size=0) == ([], 1)
    with pytest.raises(ValueError, match="g1_size"):
        select_parent([1.0], g1_size=-1)


# ---------------------------------------------------------------- reset steps


def test_random_reset_step_is_uniform_over_the_steps():
    rng = random.Random(0)
    draws = [random_reset_step(3, rng) for _ in range(3000)]
    assert set(draws) == {1, 2, 3}
    assert all(900 < draws.count(k) < 1100 for k in (1, 2, 3))
    assert random_reset_step(1, rng) == 1
    with pytest.raises(ValueError, match="at least one step"):
        random_reset_step(0, rng)


@pytest.mark.parametrize("k, m, expected", [(3, 1, 2), (4, 0, 4), (1, 1, 1), (2, 5, 1), (7, 0, 5)])
def test_offset_reset_step_is_clamped_to_the_steps(k, m, expected):
    assert offset_reset_step(k, m, num_steps=5) == expected


def test_prefix_token_length_counts_the_tokens_of_the_steps_before_the_reset():
    step_starts = [0, 9, 21, 30]
    assert [prefix_token_length(step_starts, k) for k in (1, 2, 3, 4)] == [0, 9, 21, 30]
    for k in (0, 5):
        with pytest.raises(ValueError, match="reset_step"):
            prefix_token_length(step_starts, k)


def test_suffix_loss_mask_trains_the_continuation_only():
    mask = suffix_loss_mask(prompt_length=3, prefix_length=2, total_length=8)
    assert mask.dtype == np.uint8
    assert mask.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert suffix_loss_mask(3, 0, 6).tolist() == [0, 0, 0, 1, 1, 1]
    assert suffix_loss_mask(3, 3, 6).tolist() == [0] * 6
    with pytest.raises(ValueError, match="total_length"):
        suffix_loss_mask(3, 4, 6)


# ---------------------------------------------------------------- a worked G1/G2 example


def test_g1_and_g2_advantages_and_masks_by_hand():
    # Fresh rewards [1, 0, 1, 1, 0]: the parent is sample 1, G1 samples 0, 2, 3, 4 with rewards [1, 1, 1, 0].
    g1, parent = select_parent([1, 0, 1, 1, 0], g1_size=4)
    assert (g1, parent) == ([0, 2, 3, 4], 1)
    # G1: mean 0.75, deviations 0.25 x3 and -0.75, unbiased var (3 * 0.0625 + 0.5625) / 3 = 0.25, std 0.5.
    # G2 (4 continuations from the reset, rewards [1, 0, 0, 0]): mean 0.25, std 0.5 -> [1.5, -0.5, -0.5, -0.5].
    g1_adv, g2_adv = reset_advantages([1, 1, 1, 0], [1, 0, 0, 0])
    assert g1_adv.tolist() == approx([0.5, 0.5, 0.5, -1.5])
    assert g2_adv.tolist() == approx([1.5, -0.5, -0.5, -0.5])

    # The parent has 3 steps starting at response tokens 0, 2, 5; resetting at step 2 keeps step 1 (2 tokens).
    # A G2 trajectory: 3 prompt tokens + 2 prefix tokens + 4 continuation tokens.
    prefix = prefix_token_length([0, 2, 5], reset_step=2)
    mask = suffix_loss_mask(prompt_length=3, prefix_length=prefix, total_length=9)
    assert mask.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    token_advantages = float(g2_adv[0]) * mask.astype(np.float32)
    assert token_advantages.tolist() == approx([0, 0, 0, 0, 0, 1.5, 1.5, 1.5, 1.5])


def test_a_g2_whose_continuations_all_fail_has_zero_advantage():
    g1_adv, g2_adv = reset_advantages([1, 1, 1, 0], [0, 0, 0, 0])
    assert g1_adv.tolist() == approx([0.5, 0.5, 0.5, -1.5])
    assert g2_adv.tolist() == [0.0, 0.0, 0.0, 0.0]
    g1_adv, g2_adv = reset_advantages([1, 1, 1, 1], [1, 0, 0, 0])  # and an all-correct G1
    assert g1_adv.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert g2_adv.tolist() == approx([1.5, -0.5, -0.5, -0.5])


def test_reset_advantages_with_the_population_std_of_the_reference_code():
    # G1 [1, 1, 1, 0]: mean 0.75, population var (3 * 0.0625 + 0.5625) / 4 = 0.1875, std 0.4330127
    #   -> 0.25 / 0.4330127 = 0.5773503, -0.75 / 0.4330127 = -1.7320508
    # G2 [1, 0]: mean 0.5, population std 0.5 -> +-1 (the sample std, 0.7071068, would give +-0.7071068)
    g1_adv, g2_adv = reset_advantages([1, 1, 1, 0], [1, 0], ddof=0)
    assert g1_adv.tolist() == approx([0.5773503, 0.5773503, 0.5773503, -1.7320508])
    assert g2_adv.tolist() == approx([1.0, -1.0])
    _, g2_sample = reset_advantages([1, 1, 1, 0], [1, 0], ddof=1)
    assert g2_sample.tolist() == approx([0.7071068, -0.7071068])


def test_reset_advantages_without_std_normalisation_only_center():
    g1_adv, g2_adv = reset_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0]), [1, 0, 0, 0], std_normalize=False)
    assert g1_adv.tolist() == approx([0.25, 0.25, 0.25, -0.75])
    assert g2_adv.tolist() == approx([0.75, -0.25, -0.25, -0.25])


def test_a_parent_with_one_step_resets_to_the_start():
    # One step: RRPO and SRPO can only pick step 1, so the prefix is empty and G2 trains its whole response.
    assert random_reset_step(1, random.Random(7)) == 1
    assert parse_localised_step("The error is in \\boxed{1}", num_steps=1) == (1, "boxed")
    assert parse_localised_step("The error is in \\boxed{3}", num_steps=1) == (1, "fallback")  # out of range
    assert prefix_token_length([0], reset_step=1) == 0
    assert suffix_loss_mask(prompt_length=3, prefix_length=0, total_length=7).tolist() == [0, 0, 0, 1, 1, 1, 1]


# ---------------------------------------------------------------- localisation


def test_localisation_prompt_shows_numbered_steps_and_asks_for_the_originating_step():
    prompt = localisation_prompt(
        "What is 2x if x = 3?", ["Let x = 3.", "\nThen 2x = 5.\n", "Final answer: 5"], final_answer="5"
    )
    assert "What is 2x if x = 3?" in prompt
    assert "Step 1: Let x = 3.\nStep 2: Then 2x = 5.\nStep 3: Final answer: 5" in prompt
    assert "The final answer of this attempt, 5, is wrong." in prompt
    # the reference's instructions, in our words: the origin, not the symptom; a step that cannot be justified;
    # no re-solving; one step in range; a mandatory final \boxed{N} that is a step number
    assert "Find the step where the error originates" in prompt
    assert "not at the symptom" in prompt
    assert "cannot be justified from the problem statement and the steps before it" in prompt
    assert "Do not solve the problem again." in prompt
    assert "Choose exactly one step number, from 1 to 3." in prompt
    assert "must end with a line holding only \\boxed{N}, where N is the number of that step" in prompt
    assert prompt.endswith("Write nothing after it.")
    assert "correct answer is" not in prompt


def test_the_reveal_variant_states_the_gold_answer():
    prompt = localisation_prompt("What is 2x if x = 3?", ["2x = 5."], final_answer="5", gold_answer="6")
    assert "The final answer of this attempt, 5, is wrong. The correct answer is 6." in prompt


def test_localisation_prompt_without_an_extracted_answer():
    prompt = localisation_prompt("Q?", ["I give up."], final_answer=None)
    assert "does not reach a correct final answer" in prompt
    assert "Step 1: I give up." in prompt
    assert "from 1 to 1." in prompt
    with pytest.raises(ValueError, match="at least one step"):
        localisation_prompt("Q?", [], final_answer=None)


@pytest.mark.parametrize(
    "answer, expected",
    [
        # in range: the last \boxed{N}
        ("The sign flips when expanding, so the error originates in step 2.\n\n\\boxed{2}", (2, "boxed")),
        ("\\boxed{ 3 }", (3, "boxed")),
        ("\\boxed{+4}", (4, "boxed")),
        ("I first thought \\boxed{2}, but on reflection \\boxed{4}", (4, "boxed")),
        ("Step 1 is right, Step 2 too, so \\boxed{3}", (3, "boxed")),  # a box beats any mention
        ("\\boxed{0}", (1, "no_error")),  # "no step is wrong": the reference resets at step 1
        # only the last box is read: out of range, it falls through to the mentions (not to the earlier box)
        ("Maybe \\boxed{2}; no, \\boxed{9}", (1, "fallback")),
        ("Step 2 is wrong. \\boxed{99}", (2, "step_mention")),
        ("\\boxed{-2}", (1, "fallback")),
        ("\\boxed{Step 3}", (3, "step_mention")),  # not an integer in the box; its "Step 3" is a mention
        ("\\boxed{3.5} since step 4 is off", (4, "step_mention")),
        ("the error is in step 2 \\boxed{3", (2, "step_mention")),  # the box is never closed
        # "Step N" only: the last mention, in range
        ("Step 3 is wrong: 2 + 2 is not 5.", (3, "step_mention")),
        ("**Step 3** contains the mistake.", (3, "step_mention")),
        ("The error is in step 2, where the sign flips. Step 4 is fine.", (4, "step_mention")),  # last wins
        ("Step 2 is wrong. Step 7 is where it shows.", (1, "fallback")),  # the last mention is out of range
        ("Step 0 is where it goes wrong.", (1, "fallback")),
        ("The error is in step 12.", (1, "fallback")),
        ("STEP 3 is wrong; Step3 too.", (1, "fallback")),  # neither matches the reference's pattern
        # nothing usable: step 1
        ("\\boxed{x}: I cannot tell which step is wrong.", (1, "fallback")),
        ("no idea", (1, "fallback")),
        # empty output: the middle step
        ("", (2, "empty")),
        ("  \n\t ", (2, "empty")),
    ],
)
def test_parse_localised_step(answer, expected):
    assert parse_localised_step(answer, num_steps=5) == expected


def test_parsed_sources_are_those_that_name_a_step():
    assert PARSED_SOURCES == {"boxed", "step_mention"}


def test_parse_localised_step_needs_a_step():
    assert parse_localised_step("no idea", num_steps=1) == (1, "fallback")
    assert parse_localised_step("", num_steps=1) == (1, "empty")  # 1 // 2 = 0, clamped to 1
    assert parse_localised_step("", num_steps=4) == (2, "empty")
    with pytest.raises(ValueError, match="at least one step"):
        parse_localised_step("\\boxed{1}", num_steps=0)
