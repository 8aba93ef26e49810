"""DAPO's reward and group options: the soft overlong penalty and the dynamic-sampling filter."""

from __future__ import annotations

import pytest
import torch

from resetrl.algorithms.shaping import group_has_signal, overlong_penalty


@pytest.mark.parametrize(
    "length, expected",
    [
        (50, 0.0),
        (80, 0.0),  # max_length - buffer_length: the ramp starts after it
        (90, -0.5),  # (90 - 80) / 20
        (95, -0.75),
        (100, -1.0),
        (101, -1.0),
        (500, -1.0),
    ],
)
def test_overlong_penalty_ramps_over_the_buffer(length, expected):
    assert overlong_penalty(length, max_length=100, buffer_length=20) == pytest.approx(expected)


def test_overlong_penalty_scales_with_penalty():
    assert overlong_penalty(90, max_length=100, buffer_length=20, penalty=0.5) == pytest.approx(-0.25)
    assert overlong_penalty(120, max_length=100, buffer_length=20, penalty=0.5) == pytest.approx(-0.5)


def test_overlong_penalty_edge_buffers():
    # no buffer: only responses longer than the budget are penalised
    assert overlong_penalty(100, max_length=100, buffer_length=0) == 0.0
    assert overlong_penalty(101, max_length=100, buffer_length=0) == -1.0
    # the whole budget as buffer: the ramp starts at 0
    assert overlong_penalty(50, max_length=100, buffer_length=100) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_penalty(50, max_length=100, buffer_length=150)


@pytest.mark.parametrize(
    "rewards, expected",
    [
        ([1.0, 0.0, 0.0, 0.0], True),
        ([0.0, 0.1], True),  # population std 0.05
        ([1.0, 1.0, 1.0, 1.0], False),
        ([0.0, 0.0, 0.0, 0.0], False),
        ([0.3, 0.3, 0.3], False),
        ([0.5], False),
        ([], False),
        ([0.5, 0.5 + 1e-9], False),  # std 5e-10 <= eps
    ],
)
def test_group_has_signal(rewards, expected):
    assert group_has_signal(rewards) is expected


def test_group_has_signal_with_a_larger_eps_and_a_tensor():
    assert group_has_signal([0.0, 0.1], eps=0.1) is False  # std 0.05
    assert group_has_signal(torch.tensor([1.0, 0.0])) is True
