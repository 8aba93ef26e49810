"""VinePPO's pure pieces (arXiv 2410.01679): chunk boundaries, Monte Carlo values, step and token advantages."""

from __future__ import annotations

import numpy as np
import pytest

from resetrl.algorithms.vineppo import boundary_steps, mc_values, step_advantages, token_advantages


def approx(values, abs=1e-6):
    return pytest.approx(values, abs=abs)


@pytest.mark.parametrize(
    "num_steps, max_boundaries, expected",
    [
        (10, 4, [2, 5, 7, 10]),  # chunks of 2, 3, 2, 3 steps
        (6, 3, [2, 4, 6]),
        (7, 2, [3, 7]),
        (5, 3, [1, 3, 5]),
        (3, 8, [1, 2, 3]),  # under the cap: every step is its own chunk
        (4, 4, [1, 2, 3, 4]),
        (5, 1, [5]),  # one chunk: no interior value, the whole response is one action
        (1, 3, [1]),
    ],
)
def test_boundary_steps_group_steps_evenly(num_steps, max_boundaries, expected):
    assert boundary_steps(num_steps, max_boundaries) == expected


def test_boundary_steps_needs_a_step_and_a_boundary():
    with pytest.raises(ValueError, match="at least one step"):
        boundary_steps(0, 4)
    with pytest.raises(ValueError, match="max_boundaries"):
        boundary_steps(5, 0)


def test_mc_values_are_the_mean_continuation_rewards():
    assert mc_values([[1, 0, 0, 1], [1, 1, 1], [0.5]]) == approx([0.5, 1.0, 0.5])
    assert mc_values([]) == []
    with pytest.raises(ValueError, match="boundary 1 has no continuation rewards"):
        mc_values([[1.0], []])


def test_step_advantages_are_value_differences_ending_at_the_reward():
    # V = [0.25, 0.5, 1.0, 1.0]: a successful trajectory whose first two chunks raised its chance of success
    assert step_advantages(0.25, [0.5, 1.0], 1.0) == approx([0.25, 0.5, 0.0])
    # V = [0.5, 0.75, 0.25, 0.0]: a failure; the second chunk is where the chance of success dropped
    assert step_advantages(0.5, [0.75, 0.25], 0.0) == approx([0.25, -0.5, -0.25])
    # no interior boundary: one chunk, A = r - V(0), the outcome advantage against the prompt's value
    assert step_advantages(0.4, [], 1.0) == approx([0.6])


def test_token_advantages_spread_each_chunk_over_its_tokens():
    out = token_advantages([0, 3, 5], [0.25, 0.5, -1.0], response_length=7)
    assert out.dtype == np.float32
    assert out.tolist() == approx([0.25, 0.25, 0.25, 0.5, 0.5, -1.0, -1.0])
    # tokens before the first chunk (a kept prefix) get 0; an empty chunk gets no token
    assert token_advantages([2, 4, 4], [1.0, 2.0, 3.0], 6).tolist() == approx([0, 0, 1, 1, 3, 3])


def test_token_advantages_reject_inconsistent_chunks():
    with pytest.raises(ValueError, match="2 chunk starts but 3 advantages"):
        token_advantages([0, 3], [1.0, 2.0, 3.0], 5)
    with pytest.raises(ValueError, match="non-decreasing"):
        token_advantages([0, 4, 2], [1.0, 2.0, 3.0], 5)
    with pytest.raises(ValueError, match="within 0..5"):
        token_advantages([0, 6], [1.0, 2.0], 5)


def test_a_worked_trajectory():
    # A failed trajectory (reward 0) of 5 steps starting at response tokens 0, 4, 9, 12, 20; 25 response tokens;
    # at most 3 chunks: steps {1}, {2, 3}, {4, 5}, MC values after steps 1 and 3.
    boundaries = boundary_steps(5, 3)
    assert boundaries == [1, 3, 5]
    step_starts = [0, 4, 9, 12, 20]
    # K = 4 continuations from prompt + step 1 (3 of 4 succeed) and from prompt + steps 1..3 (1 of 4)
    values = mc_values([[1, 0, 1, 1], [0, 0, 1, 0]])
    assert values == approx([0.75, 0.25])
    # V(0) = 0.5 (half the group's fresh samples succeeded): A = [0.75 - 0.5, 0.25 - 0.75, 0 - 0.25]
    advantages = step_advantages(0.5, values, 0.0)
    assert advantages == approx([0.25, -0.5, -0.25])
    chunk_starts = [0] + [step_starts[b] for b in boundaries[:-1]]  # chunk c+1 starts where step b+1 starts
    assert chunk_starts == [0, 4, 12]
    out = token_advantages(chunk_starts, advantages, 25)
    assert out.tolist() == approx([0.25] * 4 + [-0.5] * 8 + [-0.25] * 13)
