"""When the held-out evaluation runs, and its results in step / token terms (config section `eval`).

The driver owns one `HeldOutEval`: a blocking evaluation before the first step, one evaluation in flight at a
time beside training every `eval.every` steps, and a blocking one after the last step. Each result carries the
policy version the evaluator actually scored; `eval_curve` adds the generated tokens that version had cost, so
methods can be compared at equal generation budgets (bench/algorithms.py).
"""

from __future__ import annotations

import logging

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
