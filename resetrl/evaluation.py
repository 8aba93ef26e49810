"""When the held-out evaluation runs, and its results in step / token terms (config section `eval`).

The driver owns one `HeldOutEval`: a blocking evaluation before the first step, one evaluation in flight at a
time beside training every `eval.every` steps, and a blocking one after the last step. Each result carries the
policy version the evaluator actually scored; `eval_curve` adds the generated tokens that version had cost, so
methods can be compared at equal generation budgets (bench/algorithms.py).

With eval.samples = n answers per problem, each result also carries pass@1..n (`pass_at_k`), estimated from the same
n answers with the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374, eq. 1).
"""

from __future__ import annotations

import logging
import math

import ray

log = logging.getLogger(__name__)


class HeldOutEval:
    def __init__(self, evaluator, every: int):
        self.evaluator = evaluator  # a Ray handle of resetrl.actors.evaluator.Evaluator
        self.every = every
        self.results: list[dict] = []
        self._in_flight = None

    def run_now(self) -> dict:
        """Evaluate and wait (before the first and after the last step)."""
        self.collect(wait=True)
        result = ray.get(self.evaluator.evaluate.remote())
        self._keep(result)
        return result

    def after_step(self, step: int) -> None:
        """Start an evaluation beside training when `step` is on the schedule and none is running."""
        self.collect(wait=False)
        if self.every and step % self.every == 0 and self._in_flight is None:
            self._in_flight = self.evaluator.evaluate.remote()

    def collect(self, wait: bool) -> None:
        if self._in_flight is None:
            return
        done, _ = ray.wait([self._in_flight], timeout=None if wait else 0)
        if done:
            self._keep(ray.get(self._in_flight))
            self._in_flight = None

    def _keep(self, result: dict) -> None:
        if self.results and self.results[-1]["policy_version"] == result["policy_version"]:
            return  # the final evaluation of a version already scored beside training
        self.results.append(result)
        log.info("held-out accuracy %.3f at policy version %d", result["accuracy"], result["policy_version"])


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k answers drawn without replacement from n is correct), c of the n correct:

        pass@k = 1 - C(n - c, k) / C(n, k)

    (Chen et al. 2021, arXiv 2107.03374, eq. 1; unbiased, unlike 1 - (1 - c/n)^k). Exact integer binomials:
    Python divides them to the nearest float, so large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_curve(correct_counts: list[int], n: int) -> dict[int, float]:
    """{k: mean over problems of pass@k} for k = 1..n; correct_counts[i] = correct answers of problem i out of n.
    pass@1 is the mean accuracy."""
    return {k: sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in range(1, n + 1)}


def eval_scalars(point: dict) -> dict:
    """One eval_curve point as flat scalars for the metrics sink: pass_at_k {k: v} becomes `pass@k` (TensorBoard
    `eval/pass@k`); everything else as it is (the sink keeps the finite numbers)."""
    scalars = {name: value for name, value in point.items() if name not in ("policy_version", "pass_at_k")}
    scalars.update({f"pass@{k}": value for k, value in point.get("pass_at_k", {}).items()})
    return scalars


def eval_summary(results: list[dict], tokens_generated_by_step: list[int]) -> dict:
    """Summary fields: each result with the tokens generated up to its policy version, first and last accuracy.

    tokens_generated_by_step[i] is the run's generated-token counter when step i + 1 ended; version 0 cost 0.
    """
    curve = []
    for result in results:
        version = result["policy_version"]
        if version == 0:
            tokens = 0
        elif version <= len(tokens_generated_by_step):
            tokens = tokens_generated_by_step[version - 1]
        else:
            tokens = None  # a version trained before a resume: its token count is not in this run's curve
        curve.append({**result, "tokens_generated": tokens})
    return {
        "eval_curve": curve,
        "eval_accuracy_first": curve[0]["accuracy"] if curve else None,
        "eval_accuracy_last": curve[-1]["accuracy"] if curve else None,
    }
