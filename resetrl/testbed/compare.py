"""Across-seed statistics of a method comparison (bench/synthetic_testbed.py): held-out accuracy curves from run
summaries, the cost to reach GRPO's best accuracy, and percentile-bootstrap 95% intervals. Pure functions.

Seeds are paired: seed s of every method starts from the same SFT model and data, so a method's seed-s run is
compared with GRPO's seed-s run (its best accuracy, its accuracy at the budget).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EvalPoint:
    tokens: int  # generated tokens when this policy version was published
    seconds: float  # train-loop seconds at that moment (start-up excluded)
    accuracy: float


def eval_points(summary: dict) -> list[EvalPoint]:
    """The held-out curve of one `resetrl train --summary` JSON. Version v's time is the loop time at the end of
    step v (`step_end_seconds`); version 0 (the SFT start) costs nothing."""
    ends = summary.get("step_end_seconds") or []
    points = []
    for point in summary.get("eval_curve") or []:
        version, tokens = point["policy_version"], point.get("tokens_generated")
        if tokens is None:
            continue  # a version trained before a resume: no token count in this run
        seconds = 0.0 if version == 0 else float(ends[min(version, len(ends)) - 1]) if ends else math.nan
        points.append(EvalPoint(int(tokens), seconds, float(point["accuracy"])))
    if not points:
        raise ValueError("the run summary has no eval_curve: run with eval.holdout > 0")
    return points


def best_after_start(points: Sequence[EvalPoint]) -> float:
    """GRPO's best held-out accuracy: its peak over the points after the start (the start alone if there are
    none), so a curve that only falls below its start still has a target the other methods must reach."""
    trained = [p.accuracy for p in points if p.tokens > 0]
    return max(trained) if trained else points[0].accuracy


def cost_to_reach(points: Sequence[EvalPoint], target: float, cost: Callable[[EvalPoint], float]) -> float:
    """cost(p) of the first point with accuracy >= target; inf when the curve never gets there."""
    for point in points:
        if point.accuracy >= target - 1e-9:
            return cost(point)
    return math.inf


def bootstrap_ci(values: Sequence[float], statistic: Callable[[list[float]], float], resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of statistic(values), resampling the values (the seeds) with replacement."""
    if not values:
        return math.nan, math.nan
    rng = random.Random(seed)
    draws = sorted(statistic(rng.choices(values, k=len(values))) for _ in range(resamples))
    return draws[int(0.025 * (resamples - 1))], draws[int(0.975 * (resamples - 1))]


def _finite(value: float) -> float | None:
    return None if value is None or math.isinf(value) or math.isnan(value) else round(value, 4)


def stat_block(values: Sequence[float], of: str) -> dict:
    """{median, mean, ci95_low, ci95_high, ci_of, n, values}: the 95% interval is of the median or the mean (`of`);
    inf (never reached) stays in the statistics and is written as null."""
    values = [float(v) for v in values]
    statistic = statistics.median if of == "median" else statistics.fmean
    low, high = bootstrap_ci(values, statistic)
    finite = [v for v in values if not math.isinf(v)]
    return {
        "median": _finite(statistics.median(values)) if values else None,
        "mean": _finite(statistics.fmean(values)) if values else None,
        "ci95_low": _finite(low), "ci95_high": _finite(high), "ci_of": of, "n": len(values),
        "reached": len(finite), "values": [_finite(v) for v in values],
    }


def curve_band(curves: Sequence[Sequence[EvalPoint]], grid: Sequence[float], x: Callable[[EvalPoint], float]) -> dict:
    """Mean accuracy across seeds at each grid x (each seed's last evaluation at or before x) and its bootstrap
    95% band; a grid x before a seed's first point uses that seed's first accuracy."""
    mean, low, high = [], [], []
    for at in grid:
        values = []
        for points in curves:
            before = [p.accuracy for p in points if x(p) <= at + 1e-9]
            values.append(before[-1] if before else points[0].accuracy)
        lo, hi = bootstrap_ci(values, statistics.fmean, resamples=2000)
        mean.append(statistics.fmean(values))
        low.append(lo)
        high.append(hi)
    return {"x": list(grid), "mean": mean, "ci95_low": low, "ci95_high": high}


def compare_methods(runs: dict[str, dict[int, dict]], reference: str) -> dict:
    """Per method, from runs[method][seed] = summary (the `reference` method included: GRPO in the bench):
    tokens_to_grpo_best and wall_to_grpo_best (median over seeds, inf = not reached), accuracy_at_budget and
    accuracy_gain_vs_grpo (mean over seeds, paired by seed), and the reset counters pooled over seeds."""
    if reference not in runs:
        raise ValueError(f"the comparison needs {reference} runs: it is the reference")
    grpo = {seed: eval_points(summary) for seed, summary in runs[reference].items()}
    table = {}
    for method, by_seed in runs.items():
        seeds = sorted(seed for seed in by_seed if seed in grpo)
        curves = {seed: eval_points(by_seed[seed]) for seed in seeds}
        targets = {seed: best_after_start(grpo[seed]) for seed in seeds}
        tokens = [cost_to_reach(curves[s], targets[s], lambda p: p.tokens) for s in seeds]
        grpo_tokens = [cost_to_reach(grpo[s], targets[s], lambda p: p.tokens) for s in seeds]
        table[method] = {
            "seeds": seeds,
            "tokens_to_grpo_best": stat_block(tokens, "median"),
            # Per seed, a method's tokens over GRPO's own; a seed whose GRPO peak is its start (0 tokens) has none.
            "tokens_ratio_to_grpo": stat_block([t / g for t, g in zip(tokens, grpo_tokens) if 0 < g < math.inf],
                                               "median"),
            "wall_to_grpo_best": stat_block([cost_to_reach(curves[s], targets[s], lambda p: p.seconds) for s in seeds], "median"),
            "accuracy_at_budget": stat_block([curves[s][-1].accuracy for s in seeds], "mean"),
            "accuracy_gain_vs_grpo": stat_block([curves[s][-1].accuracy - grpo[s][-1].accuracy for s in seeds], "mean"),
            "accuracy_start": stat_block([curves[s][0].accuracy for s in seeds], "mean"),
            "accuracy_best": stat_block([max(p.accuracy for p in curves[s]) for s in seeds], "mean"),
            **pooled_rates([by_seed[s] for s in seeds]),
        }
    return table


def pooled_rates(summaries: Sequence[dict]) -> dict:
    """localisation_accuracy, g2_success_rate and discarded_token_fraction over all seeds' counters (a ratio of
    sums, so a seed with more resets weighs more); null where the runs do not count it."""
    def pooled(numerator: str, denominator: str, rate: str) -> float | None:
        counters = [s.get("counters") or {} for s in summaries]
        if all(denominator in c and numerator in c for c in counters) and counters:
            total = sum(float(c[denominator]) for c in counters)
            return round(sum(float(c[numerator]) for c in counters) / total, 4) if total else None
        rates = [s[rate] for s in summaries if s.get(rate) is not None]
        return round(statistics.median(rates), 4) if rates else None

    return {
        "localisation_accuracy": pooled("localisation_correct", "localisation_checked", "localisation_accuracy"),
        "g2_success_rate": pooled("g2_successes", "g2_samples", "g2_success_rate"),
        "discarded_token_fraction": pooled("tokens_discarded", "tokens_generated", "discarded_token_fraction"),
    }
