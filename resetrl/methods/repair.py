"""Self-repair: supervision internalization (IOP, arXiv 2605.05226; docs/algorithms.md, "Self-repair").

G samples per prompt train as a GRPO group (records of the GRPO method). Up to `repair.repairs_per_prompt` failed samples of
each prompt go back to the policy with a repair prompt (problem + the failed attempt + a correct sibling when
one exists); all repairs of the batch are one engine call. A repair the verifier accepts becomes a positive
sample for the *original* prompt (method "repair", a supervised record: weighted NLL, since it was sampled under
the repair prompt), with the loss gated to its first K spans that differ from the failed attempt
(repair.diff_mask).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from resetrl.actors.engines.base import SamplingSettings
from resetrl.actors.trajectories import (
    RolloutContext, credit_groups, groups_with_signal, report_record_shortfall, supervised_record,
)
from resetrl.algorithms.repair import diff_mask, repair_prompt
from resetrl.data import render_text
from resetrl.methods.base import Method, OptionsSection, ratio, register_method
from resetrl.methods.grpo import GRPO, outcome_groups
from resetrl.record import ExperienceRecord, PromptRecord


class RepairConfig(OptionsSection):
    """algorithm.repair: the policy repairs its own failed trajectories."""

    repairs_per_prompt: int = Field(1, ge=1, description="failed trajectories sent back for repair per prompt")
    diff_spans: int = Field(3, ge=1, description="K: the loss is gated to the first K differing token spans")
    span_mode: Literal["k", "2k", "all"] = Field("k", description="how many differing spans are trained: K, 2K or all")
    advantage: float = Field(1.0, gt=0, description="weight of the repaired tokens (a positive sample)")
    loss_coef: float = Field(1.0, ge=0, description="weight of the repair loss next to the policy-gradient loss")
    temperature: float = Field(0.7, gt=0, description="sampling temperature of the repair")
    success_threshold: float = Field(1.0, description="reward below this = failed (repair it); a repair needs >= this")


@register_method
class Repair(Method):
    name = "repair"
    summary = ("GRPO group, plus: failed trajectories go back to the policy with a repair prompt; an accepted repair "
               "is trained as a positive sample (weighted NLL) on its first K differing token spans")
    options_key = "repair"
    Options = RepairConfig
    records_per_prompt_text = "(rollout.group_size + repair.repairs_per_prompt)"
    derived_metrics = {
        "repair_success_rate": ("repairs the verifier accepted / repairs attempted",
                                lambda s: ratio(s.get("repairs_accepted", 0), s.get("repairs_attempted", 0))),
        "repair_trained_token_fraction": ("repair tokens inside the trained diff spans / tokens of accepted repairs",
                                          lambda s: ratio(s.get("repair_tokens_trained", 0), s.get("repair_tokens", 0))),
    }

    def records_per_prompt(self, cfg):
        return cfg.rollout.group_size + cfg.algorithm.repair.repairs_per_prompt

    def rollout(self, ctx, prompts, group_ids, prompt_ids):
        return repair_rollout(ctx, prompts, group_ids, prompt_ids)

    def loss_weights(self, records, cfg, learnable):
        has_supervised = any(r.target_token_ids is not None for r in records)
        return 1.0, cfg.algorithm.repair.loss_coef if has_supervised else 0.0, 0.0


def repair_rollout(ctx: RolloutContext, prompts: list[PromptRecord], group_ids: list[str], prompt_ids: list[list[int]]) -> list[ExperienceRecord]:
    repair = ctx.cfg.algorithm.repair
    groups = outcome_groups(ctx, prompts, group_ids, prompt_ids, ctx.cfg.rollout.group_size)
    records: list[ExperienceRecord] = credit_groups(ctx, groups_with_signal(ctx, groups), GRPO.name)
    requests = []  # (prompt, group id, prompt ids, failed completion, repair prompt ids)
    for group in groups:
        prompt, group_id, ids, completions, rewards = (group.prompt, group.group_id, group.context_ids,
                                                       group.completions, group.rewards)
        failed = [c for c, r in zip(completions, rewards) if r < repair.success_threshold][: repair.repairs_per_prompt]
        reference = next((c.text for c, r in zip(completions, rewards) if r >= repair.success_threshold), None)
        for index, attempt in enumerate(failed):
            message = repair_prompt(prompt.question, attempt.text, reference)
            requests.append((prompt, f"{group_id}/repair.{index}", ids, attempt, render_text(ctx.tokenizer, ctx.cfg.data, message)))
            ctx.stats["repairs_with_reference"] += reference is not None

    if requests:
        sampling = SamplingSettings(ctx.sampling.max_new_tokens, repair.temperature, ctx.sampling.top_p, stop=ctx.sampling.stop)
        outputs = ctx.generate([request[-1] for request in requests], 1, sampling)
        for (prompt, group_id, ids, attempt, _), (fixed,) in zip(requests, outputs):
            records += _accepted_repair(ctx, prompt, group_id, ids, attempt, fixed)
    report_record_shortfall(ctx, len(prompts), len(records))
    return records


def _accepted_repair(ctx: RolloutContext, prompt: PromptRecord, group_id: str, ids: list[int], attempt, fixed) -> list[ExperienceRecord]:
    repair = ctx.cfg.algorithm.repair
    ctx.stats["repairs_attempted"] += 1
    reward = ctx.score(prompt, fixed.text, fixed)
    if reward < repair.success_threshold:
        return []
    ctx.stats["repairs_accepted"] += 1
    mask = diff_mask(attempt.token_ids, fixed.token_ids, repair.diff_spans, repair.span_mode)
    if not mask.any():
        ctx.stats["repairs_without_diff"] += 1  # the "repair" is the failed attempt itself: nothing to credit
        return []
    ctx.stats["repair_tokens"] += len(fixed.token_ids)
    ctx.stats["repair_tokens_trained"] += int(mask.sum())
    return [supervised_record(ctx, prompt=prompt, group_id=group_id, method=Repair.name, context_ids=ids,
                              target_ids=fixed.token_ids, target_mask=mask, weight=repair.advantage, reward=reward)]
