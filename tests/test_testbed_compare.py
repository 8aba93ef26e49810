"""Across-seed statistics of the testbed comparison (resetrl/testbed/compare.py), on hand-computed curves."""

from __future__ import annotations

import math

import pytest

from resetrl.testbed.compare import (
    EvalPoint, best_after_start, bootstrap_ci, compare_methods, cost_to_reach, curve_band, eval_points, stat_block,
)


def summary(accuracies: list[float], tokens_per_step: int = 100, seconds_per_step: float = 10.0, **extra) -> dict:
    """A run summary evaluated at versions 0, 1, 2, ... (one evaluation per step)."""
    steps = len(accuracies) - 1
    return {
        "eval_curve": [{"policy_version": v, "accuracy": a, "tokens_generated": v * tokens_per_step}
                       for v, a in enumerate(accuracies)],
        "step_end_seconds": [seconds_per_step * (v + 1) for v in range(steps)],
        **extra,
    }


def test_eval_points_take_wall_time_from_the_step_ends():
    points = eval_points(summary([0.2, 0.3, 0.25]))
    assert points == [EvalPoint(0, 0.0, 0.2), EvalPoint(100, 10.0, 0.3), EvalPoint(200, 20.0, 0.25)]
    with pytest.raises(ValueError, match="eval.holdout"):
        eval_points({"eval_curve": []})


def test_grpo_best_is_its_peak_after_the_start():
    assert best_after_start(eval_points(summary([0.2, 0.3, 0.25]))) == 0.3
    assert best_after_start(eval_points(summary([0.4, 0.3, 0.1]))) == 0.3  # eroded below its start
    assert best_after_start(eval_points(summary([0.4]))) == 0.4


def test_cost_to_reach_is_the_first_point_at_the_target():
    points = eval_points(summary([0.2, 0.25, 0.35, 0.3]))
    assert cost_to_reach(points, 0.3, lambda p: p.tokens) == 200
    assert cost_to_reach(points, 0.3, lambda p: p.seconds) == 20.0
    assert cost_to_reach(points, 0.5, lambda p: p.tokens) == math.inf


def test_bootstrap_of_identical_values_is_a_point_and_brackets_the_mean():
    assert bootstrap_ci([0.3, 0.3, 0.3], lambda v: sum(v) / len(v)) == (0.3, 0.3)
    low, high = bootstrap_ci([0.0, 1.0], lambda v: sum(v) / len(v))
    assert (low, high) == (0.0, 1.0)  # resamples are {0,0}, {0,1}, {1,0}, {1,1}: means 0, 0.5, 1
    low, high = bootstrap_ci([0.1, 0.2, 0.3, 0.4], lambda v: sum(v) / len(v))
    assert 0.1 <= low < 0.25 < high <= 0.4


def test_stat_block_keeps_never_reached_as_null():
    block = stat_block([100, 300, math.inf], "median")
    assert block["median"] == 300 and block["reached"] == 2 and block["values"] == [100, 300, None]
    assert block["ci95_high"] is None  # a resample of mostly inf has an infinite median
    assert stat_block([0.1, 0.3], "mean")["mean"] == 0.2


def test_curve_band_holds_each_seed_at_its_last_evaluation():
    curves = [eval_points(summary([0.2, 0.4])), eval_points(summary([0.2, 0.2]))]
    band = curve_band(curves, [0, 50, 100], lambda p: p.tokens)
    assert band["mean"] == pytest.approx([0.2, 0.2, 0.3])
    assert band["ci95_low"][2] == pytest.approx(0.2) and band["ci95_high"][2] == pytest.approx(0.4)


def test_compare_methods_pairs_seeds_with_grpo():
    counters = {"localisation_correct": 3, "localisation_checked": 4, "g2_successes": 1, "g2_samples": 8,
                "tokens_generated": 1000}
    runs = {
        "grpo": {0: summary([0.2, 0.3, 0.25]), 1: summary([0.2, 0.22, 0.4])},
        "oracle": {0: summary([0.2, 0.35, 0.4], counters=counters), 1: summary([0.2, 0.3, 0.3], counters=counters)},
    }
    table = compare_methods(runs, reference="grpo")
    oracle, grpo = table["oracle"], table["grpo"]
    # seed 0: GRPO's best 0.3 -> oracle reaches it at 100 tokens; seed 1: GRPO's best 0.4 -> oracle never does
    assert oracle["tokens_to_grpo_best"]["values"] == [100, None]
    assert grpo["tokens_to_grpo_best"]["values"] == [100, 200]
    assert oracle["tokens_ratio_to_grpo"]["values"] == [1.0, None]  # 100/100; never / 200
    assert grpo["tokens_ratio_to_grpo"]["values"] == [1.0, 1.0]
    assert oracle["wall_to_grpo_best"]["values"] == [10.0, None]
    assert oracle["accuracy_at_budget"]["mean"] == 0.35
    assert oracle["accuracy_gain_vs_grpo"]["values"] == [0.15, -0.1]
    assert oracle["localisation_accuracy"] == 0.75 and oracle["g2_success_rate"] == 0.125
    assert oracle["discarded_token_fraction"] is None and grpo["localisation_accuracy"] is None
    with pytest.raises(ValueError, match="grpo"):
        compare_methods({"oracle": runs["oracle"]}, reference="grpo")
