"""Batched group advantages (GRPO / Dr.GRPO over many groups at once), checked against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from resetrl.algorithms.advantages import ADVANTAGE_ESTIMATORS, group_advantages, grpo_advantages


def approx(values, abs=1e-5):
    return pytest.approx(values, abs=abs)


def test_sample_and_population_std():
    # [1, 0, 0, 0]: mean 0.25, deviations 0.75 and -0.25 x3, sum of squares 0.75.
    # ddof=1: var 0.75 / 3 = 0.25, std 0.5 -> [1.5, -0.5 x3]
    # ddof=0: var 0.75 / 4 = 0.1875, std 0.4330127 -> 0.75 / 0.4330127 = 1.7320508, -0.25 / 0.4330127 = -0.5773503
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert group_advantages(rewards, [0] * 4).tolist() == approx([1.5, -0.5, -0.5, -0.5])
    population = [1.7320508, -0.5773503, -0.5773503, -0.5773503]
    assert group_advantages(rewards, [0] * 4, ddof=0).tolist() == approx(population)
    assert grpo_advantages(rewards, ddof=0).tolist() == approx(population)


def test_interleaved_groups_are_normalised_apart():
    # group a (positions 0, 2, 4): [1, 0.5, 0], mean 0.5, sum of squares 0.5 -> ddof=1 std 0.5 -> [1, 0, -1]
    # group b (positions 1, 3, 5): [0, 2, 1],   mean 1,   sum of squares 2   -> ddof=1 std 1   -> [-1, 1, 0]
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.0])
    ids = ["a", "b", "a", "b", "a", "b"]
    assert group_advantages(rewards, ids).tolist() == approx([1.0, -1.0, 0.0, 1.0, -1.0, 0.0])
    # ddof=0: a's std sqrt(0.5 / 3) = 0.4082483 -> +-1.2247449; b's std sqrt(2 / 3) = 0.8164966 -> +-1.2247449
    assert group_advantages(rewards, ids, ddof=0).tolist() == approx(
        [1.2247449, -1.2247449, 0.0, 1.2247449, -1.2247449, 0.0]
    )
    # Dr.GRPO: centred within each group only
    assert group_advantages(rewards, ids, std_normalize=False).tolist() == approx([0.5, -1.0, 0.0, 1.0, -0.5, 0.0])
    # a tensor of group ids works the same
    assert group_advantages(rewards, torch.tensor([7, 3, 7, 3, 7, 3])).tolist() == approx(
        [1.0, -1.0, 0.0, 1.0, -1.0, 0.0]
    )


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("std_normalize", [True, False])
def test_singleton_and_all_equal_groups_get_exactly_zero(ddof, std_normalize):
    # groups: s1 = [0.3] alone, eq = [0.1, 0.1, 0.1], g = [1, 0], s2 = [0.7] alone
    rewards = torch.tensor([0.3, 0.1, 1.0, 0.1, 0.0, 0.1, 0.7])
    ids = ["s1", "eq", "g", "eq", "g", "eq", "s2"]
    out = group_advantages(rewards, ids, std_normalize=std_normalize, ddof=ddof)
    assert out[[0, 1, 3, 5, 6]].tolist() == [0.0] * 5  # exactly, not eps noise
    # g = [1, 0]: mean 0.5; sample std 0.7071068, population std 0.5, or no division
    expected = {(True, 1): 0.7071068, (True, 0): 1.0, (False, 1): 0.5, (False, 0): 0.5}[(std_normalize, ddof)]
    assert out[[2, 4]].tolist() == approx([expected, -expected])


def test_output_is_float32_in_input_order_and_empty_input_is_fine():
    out = group_advantages([1, 0, 1, 0], [1, 1, 2, 2])  # int rewards, list input
    assert out.dtype == torch.float32 and out.tolist() == approx([0.7071068, -0.7071068, 0.7071068, -0.7071068])
    assert group_advantages(torch.zeros(0), []).tolist() == []


def test_bad_shapes_say_what_is_wrong():
    with pytest.raises(ValueError, match="3 entries but there are 2 rewards"):
        group_advantages(torch.tensor([1.0, 0.0]), [0, 0, 1])
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        group_advantages(torch.zeros(2, 2), [0, 0])
    with pytest.raises(ValueError, match="group_index must be 1-D"):
        group_advantages(torch.zeros(4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="ddof"):
        group_advantages(torch.zeros(2), [0, 0], ddof=-1)


def test_registered_estimators_take_the_batched_signature():
    rewards, ids = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.0]), ["a", "b", "a", "b", "a", "b"]
    assert ADVANTAGE_ESTIMATORS["group_zscore"](rewards, ids).tolist() == approx([1.0, -1.0, 0.0, 1.0, -1.0, 0.0])
    assert ADVANTAGE_ESTIMATORS["group_zscore"](rewards, ids, ddof=0).tolist() == approx(
        [1.2247449, -1.2247449, 0.0, 1.2247449, -1.2247449, 0.0]
    )
    assert ADVANTAGE_ESTIMATORS["group_centered"](rewards, ids).tolist() == approx([0.5, -1.0, 0.0, 1.0, -0.5, 0.0])
