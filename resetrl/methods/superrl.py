"""SuperRL (arXiv 2506.01096; docs/algorithms.md, "SuperRL"): per prompt, policy gradient or SFT on the expert.

G samples per prompt (all prompts in one engine call), outcome rewards, GRPO advantages. The gate c decides what
the prompt trains on: c = 1 -> its G trajectories as policy-gradient records (method "superrl"); c = 0 -> one
SFT record of the expert solution (method "superrl-sft": prompt + expert tokens, target_token_ids set), which the
learner trains with the token-mean NLL and mixes with the policy gradient (losses.supervised_loss, and this
method's loss_weights: gate_loss_weights or the learnable uncertainty weights). A c = 0 prompt without an expert
solution keeps its policy-gradient records.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from resetrl.actors.trajectories import (
    RolloutContext, ScoredGroup, credit_groups, groups_with_signal, report_record_shortfall, supervised_record,
)
from resetrl.algorithms.advantages import grpo_advantages
from resetrl.algorithms.superrl import batch_gate, gate_loss_weights, prompt_gate, uncertainty_weights
from resetrl.data import expert_solution_text
from resetrl.methods.base import Method, OptionsSection, ratio, register_method
from resetrl.methods.grpo import outcome_groups
from resetrl.record import ExperienceRecord, PromptRecord


class SuperRLConfig(OptionsSection):
    """algorithm.superrl: per prompt, policy gradient if any rollout succeeded, else SFT on the expert."""

    gate: Literal["reward", "advantage", "batch"] = Field(
        "reward", description="reward: c = 1 if any rollout reward > 0; advantage: if any advantage > 0; batch: one "
        "switch for the whole rollout batch, c = 1 if at least batch_min_success of its prompts have a reward > 0"
    )
    batch_min_success: float = Field(0.5, ge=0, le=1, description="gate=batch: fraction of prompts with a success")
    weighting: Literal["gate", "uncertainty"] = Field(
        "gate", description="gate: c L_PG + (1 - c) L_SFT averaged over prompts; uncertainty: learnable weights "
        "exp(-2 s_pg) L_PG + exp(-2 s_sft) L_SFT + s_pg + s_sft"
    )
    uncertainty_lr: float = Field(1e-2, gt=0, description="learning rate of s_pg, s_sft (weighting=uncertainty)")
    step_end: str = Field("\n", min_length=1, description="written after each expert step in the SFT target, before "
                          "'Answer: X': the format the policy answers in (e.g. '</step>' where steps close with it)")


@register_method
class SuperRL(Method):
    name = "superrl"
    summary = ("per prompt, gate c = 1 if any rollout got reward > 0: c = 1 trains the G rollouts with the policy "
               "loss, c = 0 trains the expert solution with the token-mean NLL")
    options_key = "superrl"
    Options = SuperRLConfig
    derived_metrics = {
        "superrl_sft_fraction": ("SuperRL prompts trained on the expert solution (gate c = 0) / prompts",
                                 lambda s: ratio(s.get("superrl_sft_prompts", 0), s.get("superrl_prompts", 0))),
    }

    def rollout(self, ctx, prompts, group_ids, prompt_ids):
        return superrl_rollout(ctx, prompts, group_ids, prompt_ids)

    def learnable_loss_parameters(self, cfg, device):
        if cfg.algorithm.superrl.weighting != "uncertainty":
            return None
        return torch.zeros(2, device=device, requires_grad=True)  # [s_pg, s_sft]

    def loss_weights(self, records, cfg, learnable):
        supervised = [r for r in records if r.target_token_ids is not None]
        if learnable is not None:
            return uncertainty_weights(learnable, has_pg=len(supervised) < len(records), has_sft=bool(supervised))
        if not supervised:
            return 1.0, 0.0, 0.0
        # The gate's weights: the step's fractions of prompts on each path.
        sft_prompts = {r.prompt_id for r in supervised}
        pg_prompts = {r.prompt_id for r in records if r.target_token_ids is None} - sft_prompts
        return (*gate_loss_weights(len(pg_prompts), len(sft_prompts)), 0.0)


def superrl_rollout(ctx: RolloutContext, prompts: list[PromptRecord], group_ids: list[str],
                    prompt_ids: list[list[int]]) -> list[ExperienceRecord]:
    algo = ctx.cfg.algorithm
    groups = outcome_groups(ctx, prompts, group_ids, prompt_ids, ctx.cfg.rollout.group_size)
    # Only the "advantage" gate reads per-group advantages; the trained ones come from credit_groups below.
    advantages = [grpo_advantages(torch.tensor(g.rewards, dtype=torch.float32), std_normalize=algo.std_normalize).tolist()
                  if algo.superrl.gate == "advantage" else None for g in groups]
    if algo.superrl.gate == "batch":
        gates = [batch_gate([g.rewards for g in groups], algo.superrl.batch_min_success)] * len(groups)
    else:
        gates = [prompt_gate(g.rewards, a, algo.superrl.gate) for g, a in zip(groups, advantages)]

    records: list[ExperienceRecord] = []
    policy_groups: list[ScoredGroup] = []
    for group, gate in zip(groups, gates):
        ctx.stats["superrl_prompts"] += 1
        steps = group.prompt.metadata.get("expert_steps")
        if not gate and steps:
            ctx.stats["superrl_sft_prompts"] += 1
            records.append(_expert_record(ctx, group.prompt, group.group_id, group.context_ids, list(steps),
                                          reward=max(group.rewards)))
            continue
        if not gate:
            ctx.stats["superrl_prompts_without_expert"] += 1
        policy_groups.append(group)
    records += credit_groups(ctx, groups_with_signal(ctx, policy_groups), SuperRL.name)
    report_record_shortfall(ctx, len(prompts), len(records))
    return records


def _expert_record(ctx: RolloutContext, prompt: PromptRecord, group_id: str, ids: list[int], steps: list[str],
                   reward: float) -> ExperienceRecord:
    """Prompt + the expert solution (and the end-of-sequence token, so the model also learns where to stop)."""
    step_end = ctx.cfg.algorithm.superrl.step_end
    target = ctx.tokenizer.encode(expert_solution_text(steps, prompt.answer, step_end), add_special_tokens=False)
    if ctx.tokenizer.eos_token_id is not None:
        target.append(ctx.tokenizer.eos_token_id)
    return supervised_record(ctx, prompt=prompt, group_id=f"{group_id}/sft", method=f"{SuperRL.name}-sft",
                             context_ids=ids, target_ids=target, reward=reward)
