"""RRPO, Random Reset Policy Optimization (arXiv 2605.25507; docs/algorithms.md, "RRPO"): reset a failed parent at
a uniformly random step k and resample G2 continuations from prompt + steps 1..k-1 (resetrl/methods/reset_rollout.py)."""

from __future__ import annotations

from resetrl.algorithms.resets import random_reset_step
from resetrl.methods.base import entry_rng, register_method
from resetrl.methods.reset_rollout import ResetMethod


@register_method
class RRPO(ResetMethod):
    name = "rrpo"
    summary = ("GRPO group G1 plus, for a failed parent, a reset at a uniformly random step k and G2 continuations "
               "from prompt + steps 1..k-1; G1 and G2 z-scored separately; G2 trains on its continuation only")

    def choose_steps(self, ctx, parents, first_wrong):
        resets = ctx.cfg.algorithm.reset.resets_per_parent
        picks = []
        for state, _parent, _starts, steps in parents:
            rng = entry_rng(ctx, state.group_id)  # the same steps whichever worker processes the entry
            picks.append([(random_reset_step(len(steps), rng), None) for _ in range(resets)])
        return picks
