"""SRPO, Self-localised Reset Policy Optimization (arXiv 2605.25507; docs/algorithms.md, "SRPO"): as RRPO, but
the reset step k is where the policy itself says its failed attempt went wrong. The localisation request
(resets.localisation_prompt) goes to the same policy; its answer is parsed by resets.parse_localised_step."""

from __future__ import annotations

from resetrl.actors.engines.base import SamplingSettings
from resetrl.algorithms.resets import localisation_prompt, parse_localised_step
from resetrl.data import render_text
from resetrl.methods.base import register_method
from resetrl.methods.reset_rollout import ResetMethod
from resetrl.verifiers.math_answer import extract_answer


@register_method
class SRPO(ResetMethod):
    name = "srpo"
    summary = ("as rrpo, but k is where the policy itself says the error originates (a localisation request to the "
               "same policy, answer parsed from its last \\boxed{k})")

    def choose_steps(self, ctx, parents, first_wrong):
        """Ask the policy where its failed attempt went wrong; all parents in one engine call."""
        reset_cfg = ctx.cfg.algorithm.reset
        prompts_ids = []
        for state, parent, _starts, steps in parents:
            gold = state.prompt.answer if reset_cfg.reveal_gold_answer else None
            message = localisation_prompt(state.prompt.question, steps, extract_answer(parent.text), gold)
            prompts_ids.append(render_text(ctx.tokenizer, ctx.cfg.data, message))
        sampling = SamplingSettings(
            max_new_tokens=reset_cfg.localisation_max_tokens, temperature=reset_cfg.localisation_temperature
        )
        outputs = ctx.generate(prompts_ids, reset_cfg.resets_per_parent, sampling)
        chosen = []
        for (_state, _parent, _starts, steps), ids, completions in zip(parents, prompts_ids, outputs):
            picks = []
            for completion in completions:
                step, source = parse_localised_step(completion.text, len(steps))
                ctx.stats["localisations"] += 1
                ctx.stats["localisation_parsed"] += source in ("boxed", "step_mention")
                picks.append((step, (ids, completion)))
            chosen.append(picks)
        return chosen
