"""The oracle reset (docs/algorithms.md, "Oracle"): as RRPO, but k is the true first wrong step, found by
`algorithm.reset.step_checker` on synthetic tasks whose every step can be checked. It is the upper bound of what
SRPO's self-localisation can reach (bench/synthetic_testbed.py)."""

from __future__ import annotations

from resetrl.algorithms.resets import oracle_reset_step
from resetrl.methods.base import register_method
from resetrl.methods.reset_rollout import ResetMethod


@register_method
class Oracle(ResetMethod):
    name = "oracle"
    summary = ("as rrpo, but k is the true first wrong step found by algorithm.reset.step_checker (synthetic tasks "
               "only): the upper bound of SRPO's self-localisation")

    def validate(self, cfg):
        super().validate(cfg)
        if cfg.algorithm.reset.step_checker is None:
            raise ValueError(
                f"algorithm.name={self.name} resets at the true first wrong step, which a step checker finds: set "
                "algorithm.reset.step_checker (e.g. algorithm.reset.step_checker=arithmetic_lines)"
            )

    def choose_steps(self, ctx, parents, first_wrong):
        resets = ctx.cfg.algorithm.reset.resets_per_parent
        return [[(oracle_reset_step(k, len(steps)), None)] * resets
                for k, (_state, _parent, _starts, steps) in zip(first_wrong, parents)]
